//! `GET /metrics` after real calls: the dialog counter, the per-destination load gauges and
//! the INVITE setup histogram are there with the values the calls imply, and the whole
//! exposition passes `promtool check metrics` (Debian package `prometheus`; the test fails,
//! saying so, when `promtool` is missing).
//!
//! Needs `sipp` (Debian package `sip-tester`) and `promtool`.
//! Run: `cargo test -p lb-proxy --test sipp_metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const CALLS: u64 = 10;

fn promtool() -> String {
    std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_string())
}

fn no_promtool(e: std::io::Error) -> ! {
    panic!(
        "cannot run `{}` ({e}): install the Debian package `prometheus` \
         (apt-get install --no-install-recommends prometheus), or set PROMTOOL to a promtool \
         binary",
        promtool()
    )
}

/// Fails at once, with an install hint, when promtool cannot be run.
fn require_promtool() {
    let out = Command::new(promtool())
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| no_promtool(e));
    assert!(
        out.status.success(),
        "`{} --version` failed: {}",
        promtool(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pipes `text` through `promtool check metrics`; panics with its findings unless it passes.
fn promtool_check(text: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| no_promtool(e));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("wait for promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- metrics ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn samples<'a>(all: &'a [MetricSample], name: &str) -> Vec<&'a MetricSample> {
    all.iter().filter(|s| s.name == name).collect()
}

fn single(all: &[MetricSample], name: &str) -> f64 {
    let s = samples(all, name);
    assert_eq!(s.len(), 1, "expected one {name} sample, got {s:?}");
    s[0].value
}

#[test]
fn metrics_after_calls_are_complete_and_valid() {
    require_promtool();
    let env = test_env!("metrics", "127.0.1.24");
    let dests = [
        Dest::udp(1, SERVER1_PORT, "pstn=100"),
        Dest::udp(2, SERVER2_PORT, "pstn=50"),
    ];
    // Relative mode spreads the calls over both destinations.
    let (mut proxy, [s1, s2]) = Sandbox::new(&env)
        .mode("relative")
        .dests(&dests)
        .uas("server1", SERVER1_PORT, "uas.xml")
        .uas("server2", SERVER2_PORT, "uas.xml")
        .start();

    let calls = CALLS.to_string();
    let client = Sipp::uac(&env, "client")
        .rate(10)
        .limit(20)
        .hold(ms(1000))
        .args(["-m", &calls])
        .start();
    // While calls are up, the load gauges show them.
    let during = wait_for(
        "load in mrcp_lb_destination_load during the calls",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let all = parse_metrics(&metrics_text(proxy.admin));
            let load: f64 = samples(&all, "mrcp_lb_destination_load")
                .iter()
                .map(|s| s.value)
                .sum();
            (load > 0.0).then_some(load)
        },
    );
    eprintln!("load during the calls: {during}");
    let client = client.wait(Duration::from_secs(30));
    eprintln!("{}", client.summary());
    let [s1, s2] = drain([s1, s2]);
    client.assert_all_ok(CALLS);
    assert_server_clean(&s1);
    assert_server_clean(&s2);
    proxy.wait_idle(Duration::from_secs(10));
    proxy.assert_running();

    let text = metrics_text(proxy.admin);
    let all = parse_metrics(&text);

    // Dialogs: every call counted once.
    for needle in [
        "mrcp_lb_dialogs_processed_total",
        "mrcp_lb_destination_load{",
        "mrcp_lb_invite_setup_seconds_bucket",
    ] {
        assert!(text.contains(needle), "no {needle} in /metrics:\n{text}");
    }
    assert_eq!(
        single(&all, "mrcp_lb_dialogs_processed_total"),
        CALLS as f64,
        "mrcp_lb_dialogs_processed_total"
    );

    // Load gauges: one per destination (pstn), back to 0 now that the calls are over.
    let loads = samples(&all, "mrcp_lb_destination_load");
    for id in ["1", "2"] {
        let l: Vec<_> = loads
            .iter()
            .filter(|s| s.label("destination") == Some(id))
            .collect();
        assert_eq!(
            l.len(),
            1,
            "expected one mrcp_lb_destination_load line for destination {id}: {loads:?}"
        );
        assert_eq!(l[0].label("resource"), Some("pstn"), "{:?}", l[0]);
        assert_eq!(
            l[0].value, 0.0,
            "destination {id} load after the calls: {:?}",
            l[0]
        );
    }

    // Setup histogram: one observation per call, cumulative buckets ending at +Inf.
    let count = single(&all, "mrcp_lb_invite_setup_seconds_count");
    assert_eq!(count, CALLS as f64, "mrcp_lb_invite_setup_seconds_count");
    let buckets = samples(&all, "mrcp_lb_invite_setup_seconds_bucket");
    assert!(buckets.len() > 1, "{buckets:?}");
    let mut last = 0.0;
    for b in &buckets {
        assert!(b.value >= last, "buckets not cumulative: {buckets:?}");
        last = b.value;
    }
    let inf = buckets
        .iter()
        .find(|b| b.label("le") == Some("+Inf"))
        .unwrap_or_else(|| panic!("no +Inf bucket: {buckets:?}"));
    assert_eq!(inf.value, count, "+Inf bucket differs from _count");

    promtool_check(&text);
}
