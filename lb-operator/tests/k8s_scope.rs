//! Scope: which MrcpServers and pods an operator takes, against a real kube-apiserver.
//!
//! - `--class NAME` takes the MrcpServers whose `spec.className` is NAME, an operator without
//!   it those without a className: two operators on one namespace each register, report and
//!   export only their own class, and a server whose className changes moves across.
//! - `--pod-selector` keeps the pods it does not select out of the watch: a pod the
//!   MrcpServer selects is no destination until it carries the label; a selector the API
//!   server refuses stops the start-up with a message naming the flag.
//!
//! A binary of its own (its own control plane), on loopback addresses of its own: operators
//! on 127.0.12.1, pod IPs 127.0.12.11 to .19 (never dialled: no proxy is given).
//!
//! Run: `source tests/k8s/env.sh && cargo test -p lb-operator --test k8s_scope`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod k8s_harness;

use k8s_harness::*;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SEC: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(100);

/// The MrcpServers an operator exports `mrcp_lb_server_destinations{state="ready"}` for, with
/// the value: what it registered, per server.
fn ready_by_server(metrics: &str) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with("mrcp_lb_server_destinations{") && l.contains("state=\"ready\""))
        .filter_map(|l| {
            let (_, rest) = l.split_once("mrcpserver=\"")?;
            let (name, _) = rest.split_once('"')?;
            let v = l.rsplit_once(' ')?.1.parse().ok()?;
            Some((name.to_string(), v))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Waits until `op` registers exactly `servers` (name, ready destinations) and no other.
async fn exports(op: &Operator, servers: &[(&str, f64)]) {
    let want: Vec<(String, f64)> = servers.iter().map(|(s, v)| (s.to_string(), *v)).collect();
    let n: f64 = servers.iter().map(|(_, v)| v).sum();
    eventually(
        &format!("operator {} exports exactly {want:?}", op.name),
        15 * SEC,
        POLL,
        async || {
            let got = ready_by_server(&op.metrics().await?);
            let total = op.metric("mrcp_lb_operator_destinations").await?;
            if got == want && total == Some(n) {
                Ok(())
            } else {
                Err(format!("{got:?}, {total:?} destinations"))
            }
        },
    )
    .await
}

async fn ready_destinations(env: &TestEnv, server: &str) -> Option<u32> {
    let s = env.servers().get(server).await.ok()?;
    s.status.map(|st| st.ready_destinations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_takes_only_the_mrcpservers_of_its_class() {
    let env = TestEnv::new_at("class", "127.0.12.1").await;
    for (pod, app, ip) in [("a-0", "a", "127.0.12.11"), ("b-0", "b", "127.0.12.12")] {
        env.create_pod(pod, &[("app", app)], &[], false).await;
        env.set_pod_status(pod, ip, true).await;
    }
    env.create_server("plain", json!({"selector": {"matchLabels": {"app": "a"}}}))
        .await;
    env.create_server(
        "tenant",
        json!({"className": "tenant-b", "selector": {"matchLabels": {"app": "b"}}}),
    )
    .await;
    let default_op = Operator::start(&env, "default", 18081, &[], &[]).await;
    let class_op = Operator::start(&env, "tenant-b", 18082, &[], &["--class", "tenant-b"]).await;

    exports(&default_op, &[("plain", 1.0)]).await;
    exports(&class_op, &[("tenant", 1.0)]).await;
    // Each status is written, by the operator of its class.
    for server in ["plain", "tenant"] {
        eventually(
            &format!("{server} status"),
            15 * SEC,
            POLL,
            async || match ready_destinations(&env, server).await {
                Some(1) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        )
        .await;
    }

    // The tenant's server leaves its class: the default operator takes it, the tenant's
    // operator lets it go.
    let patch = json!({"spec": {"className": null}});
    env.servers()
        .patch("tenant", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    exports(&default_op, &[("plain", 1.0), ("tenant", 1.0)]).await;
    exports(&class_op, &[]).await;

    // The API server keeps class names to DNS labels.
    let bad = json!({"spec": {"className": "Tenant_B"}});
    let refused = env
        .servers()
        .patch("plain", &PatchParams::default(), &Patch::Merge(&bad))
        .await;
    assert!(refused.is_err(), "className Tenant_B was accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_selector_keeps_unselected_pods_out_of_the_watch() {
    let env = TestEnv::new_at("podsel", "127.0.12.2").await;
    env.create_pod(
        "s-0",
        &[("app", "s"), ("mrcp-lb.io/server", "")],
        &[],
        false,
    )
    .await;
    env.set_pod_status("s-0", "127.0.12.15", true).await;
    env.create_pod("s-1", &[("app", "s")], &[], false).await;
    env.set_pod_status("s-1", "127.0.12.16", true).await;
    env.create_server("s", json!({"selector": {"matchLabels": {"app": "s"}}}))
        .await;
    let op = Operator::start(
        &env,
        "selected",
        18083,
        &[],
        &["--pod-selector", "mrcp-lb.io/server"],
    )
    .await;
    let destinations = async |n: f64| {
        eventually(
            &format!("{n} destinations"),
            15 * SEC,
            POLL,
            async || match op.metric("mrcp_lb_operator_destinations").await? {
                Some(v) if v == n => Ok(()),
                other => Err(format!("{other:?}")),
            },
        )
        .await
    };
    // s-1 is the MrcpServer's, but not the operator's to see.
    destinations(1.0).await;
    tokio::time::sleep(SEC).await;
    destinations(1.0).await;
    let patch = json!({"metadata": {"labels": {"mrcp-lb.io/server": ""}}});
    env.pods()
        .patch("s-1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    destinations(2.0).await;
    drop(op);

    // A selector the API server cannot parse: the operator says so and stops.
    let started = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lb-operator"));
    clean_env(&mut cmd);
    let out = cmd
        .env("KUBECONFIG", &env.cp.kubeconfig)
        .args(["--namespace", &env.ns, "--listen", "127.0.12.2:18084"])
        .args(["--pod-selector", "app in (a"])
        .stdin(Stdio::null())
        .output()
        .expect("run lb-operator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--pod-selector \"app in (a\""), "{err}");
    assert!(started.elapsed() < 15 * SEC, "{:?}", started.elapsed());
}
