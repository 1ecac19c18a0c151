//! Replays the fuzz seed corpus (`fuzz/corpus/<target>/`) and every input that once made a
//! fuzz target fail (`lb-proxy/tests/fuzz-regressions/<target>/`) through the same checks the
//! fuzz targets run (this crate's), so that `cargo test` guards them on stable Rust, without
//! nightly or libFuzzer.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    out.sort();
    out
}

/// Runs `check` on every corpus and regression input of `target`; fails naming each input
/// that panics.
fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let corpus = files(&root.join("fuzz/corpus").join(target));
    let regressions = files(&root.join("lb-proxy/tests/fuzz-regressions").join(target));
    assert!(
        !corpus.is_empty(),
        "no seed corpus for {target} in fuzz/corpus/{target}"
    );
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs fail (the panic messages are above):\n  {}",
        failed.len(),
        corpus.len() + regressions.len(),
        failed.join("\n  ")
    );
}

#[test]
fn sip_datagram() {
    replay("sip_datagram", lb_proxy_fuzz_checks::datagram);
}

#[test]
fn tcp_stream() {
    replay("tcp_stream", lb_proxy_fuzz_checks::stream);
}

#[test]
fn proxy_core() {
    replay("proxy_core", lb_proxy_fuzz_checks::core);
}
