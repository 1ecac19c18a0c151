//! The lb-proxy configuration the chart renders is one lb-proxy accepts (`lb-proxy --check`),
//! with the default values and with SDP routing and pools on (`examples/two-pools-values.yaml`
//! and a pool of each kind): the values' schema and the proxy's own validation must agree, or a
//! release installs proxies that exit at start.
//!
//! No cluster: the real helm (`make k8s`) renders the chart, the real lb-proxy (built like the
//! proxies of the other operator tests) checks the ConfigMap's `config.yaml` with the
//! Deployment's `LB_PROXY_ADVERTISE`. The files the config names (the Record-Route key) are
//! written to the test's folder, as the Secret mount would provide them.
//!
//! Run: `cargo test -p lb-operator --test chart_config -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod k8s_harness;

use k8s_harness::*;
use serde_json::{json, Value};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

/// The rendered chart's documents, `helm template` with these extra arguments.
fn render(args: &[&str]) -> Vec<Value> {
    let helm = k8s_bin("helm");
    assert!(
        helm.is_file(),
        "{} missing: run `make k8s` (tests/k8s/build.sh); this test renders the chart with the \
         real helm and is not skipped",
        helm.display()
    );
    let out = clean_env(&mut Command::new(&helm))
        .current_dir(repo())
        .args([
            "template",
            "mrcp-lb",
            "charts/mrcp-lb",
            "--namespace",
            "mrcp",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm template {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("helm output is UTF-8");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|de| serde::Deserialize::deserialize(de).expect("helm output is YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// The proxy's config.yaml, with the files it names moved into `dir`, and the Deployment's
/// `LB_PROXY_ADVERTISE`.
fn proxy_config(docs: &[Value], dir: &Path) -> (Value, String) {
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "mrcp-lb-proxy")
        .expect("the proxy ConfigMap");
    let text = cm["data"]["config.yaml"].as_str().expect("config.yaml");
    let mut config: Value = serde_yaml_ng::from_str(text).expect("config.yaml is YAML");
    if let Some(rr) = config.get_mut("recordRoute") {
        let key = dir.join("route.key");
        fs::write(&key, "a-record-route-key-for-the-check-0123456789\n").unwrap();
        rr["keyFile"] = Value::String(key.display().to_string());
    }
    let deploy = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "mrcp-lb-proxy")
        .expect("the proxy Deployment");
    let advertise = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "LB_PROXY_ADVERTISE"))
        .and_then(|e| e["value"].as_str())
        .expect("LB_PROXY_ADVERTISE")
        .to_string();
    (config, advertise)
}

#[test]
fn the_charts_proxy_config_passes_lb_proxy_check() {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("lb-operator-chart-config")
        .join(format!("{}-{}", std::process::id(), millis()));
    let pools = "proxy.config.routing.pools[0].user=^de-,\
                 proxy.config.routing.pools[0].group=2,\
                 proxy.config.routing.pools[1].header=X-Language,\
                 proxy.config.routing.pools[1].value=^en,\
                 proxy.config.routing.pools[1].group=3";
    // (name, helm arguments, a JSON pointer into the rendered config and what it must hold)
    let cases: [(&str, &[&str], &str, Value); 3] = [
        ("defaults", &[], "/routing/resources", json!(["pstn"])),
        (
            "two-pools",
            &["-f", "examples/two-pools-values.yaml"],
            "/routing/resources",
            json!("sdp"),
        ),
        (
            "two-pools-and-rules",
            &["-f", "examples/two-pools-values.yaml", "--set", pools],
            "/routing/pools/1/header",
            json!("X-Language"),
        ),
    ];
    for (name, args, pointer, want) in cases {
        let dir = base.join(name);
        fs::create_dir_all(&dir).unwrap();
        let (config, advertise) = proxy_config(&render(args), &dir);
        assert_eq!(config.pointer(pointer), Some(&want), "{name}: {config:#}");
        let config = serde_yaml_ng::to_string(&config).unwrap();
        let path = dir.join("config.yaml");
        fs::write(&path, &config).unwrap();
        let out = clean_env(&mut Command::new(lb_proxy_bin()))
            .env("LB_PROXY_ADVERTISE", &advertise)
            .env(
                "LB_PROXY_CLUSTER_KEY",
                "a-cluster-key-for-the-check-0123456789",
            )
            .env_remove("LB_PROXY_ADMIN_TOKEN")
            .arg("--config")
            .arg(&path)
            .arg("--check")
            .stdin(Stdio::null())
            .output()
            .expect("run lb-proxy --check");
        assert!(
            out.status.success(),
            "{name}: lb-proxy --check refused the chart's config ({}):\n{}{}\nconfig:\n{config}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("[chart-config] {name}: accepted (advertise {advertise})");
    }
    if !some_test_failed() && !keep_requested() {
        let _ = fs::remove_dir_all(&base);
    }
}
