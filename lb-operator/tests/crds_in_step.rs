//! The committed CRD YAML is exactly what the code generates (`make crds` regenerates it).

use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_crds_match_the_code() {
    let generated = lb_operator::crd_yaml().expect("generate CRD");
    let mut places = vec![repo().join("crds/mrcpserver.yaml")];
    let chart = repo().join("charts/mrcp-lb/files/crds/mrcpserver.yaml");
    if repo().join("charts/mrcp-lb").exists() {
        places.push(chart);
    }
    for path in places {
        let committed =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            committed == generated,
            "{} differs from what lb-operator generates: run `make crds`",
            path.display()
        );
    }
}
