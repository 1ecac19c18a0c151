//! The layers of lb-proxy stay layers: no cycle among its top-level modules.
//!
//! Reads `src/` and takes, for each top-level module (`config`, `transport`, `proxy`, ... with
//! everything below it), the `crate::<module>` paths its code names outside comments and
//! `#[cfg(test)]` modules. The graph of those edges must be acyclic; a cycle fails the test
//! and is printed, with the files that make each edge. `docs/architecture.md` draws the
//! layers.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.map(|e| e.path()).unwrap_or_else(|e| panic!("{e}"));
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without what follows its first `#[cfg(test)]`
/// (test modules come last in this code base).
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module names a piece of code reaches as `crate::name`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut g: Graph = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap_or(&f);
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or_default()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let edges = g.entry(top.clone()).or_default();
        for dep in crate_paths(&code(&text)) {
            if dep != top {
                edges
                    .entry(dep)
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
    }
    g
}

/// A cycle through `start`, if any: depth-first search over the edges.
fn cycle_from(g: &Graph, start: &str) -> Option<Vec<String>> {
    fn walk(
        g: &Graph,
        node: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(node).map(|e| e.keys()).into_iter().flatten() {
            if next == start {
                return true;
            }
            if g.contains_key(next) && seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    let mut seen = BTreeSet::new();
    walk(g, start, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn top_level_modules_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    assert!(
        g.contains_key("proxy") && g.contains_key("transport"),
        "{g:?}"
    );
    let mut cycles = Vec::new();
    for m in g.keys() {
        if let Some(c) = cycle_from(&g, m) {
            let mut lines = Vec::new();
            for (i, a) in c.iter().enumerate() {
                let b = &c[(i + 1) % c.len()];
                let files: Vec<&str> = g[a][b].iter().map(String::as_str).collect();
                lines.push(format!("  {a} -> {b} (in {})", files.join(", ")));
            }
            cycles.push(lines.join("\n"));
        }
    }
    assert!(
        cycles.is_empty(),
        "module cycles:\n{}\n\nthe edges: {:#?}",
        cycles.join("\n\n"),
        g.iter()
            .map(|(m, e)| (m, e.keys().collect::<Vec<_>>()))
            .collect::<BTreeMap<_, _>>()
    );
}

#[test]
fn the_check_sees_a_cycle() {
    let mut g: Graph = BTreeMap::new();
    let edge = |g: &mut Graph, a: &str, b: &str| {
        g.entry(a.into())
            .or_default()
            .entry(b.into())
            .or_default()
            .insert(format!("{a}.rs"));
    };
    edge(&mut g, "config", "transport");
    edge(&mut g, "transport", "runtime");
    edge(&mut g, "runtime", "config");
    edge(&mut g, "sip", "config");
    assert_eq!(
        cycle_from(&g, "config"),
        Some(vec!["config".into(), "transport".into(), "runtime".into()])
    );
    assert_eq!(cycle_from(&g, "sip"), None);
    assert_eq!(
        crate_paths(&code(
            "use crate::sip::Message; // crate::proxy\nlet x = crate::metrics::M;"
        )),
        ["metrics".to_string(), "sip".to_string()]
            .into_iter()
            .collect()
    );
}
