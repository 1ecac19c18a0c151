//! The control plane goes down under a running operator (leader by Lease) and proxy: the proxy
//! keeps routing on its last set; when kube-apiserver is back, a change made then (a pod added,
//! the MrcpServer's default capacity changed) reaches the proxy with no restart of anything.
//!
//! This test stops the control plane, so it has a binary of its own (its own control plane,
//! test index 12: 127.0.4.12, pods 127.0.3.105 to .112; see `k8s_harness/mod.rs`).
//!
//! Run: `source tests/k8s/env.sh && cargo test -p lb-operator --test k8s_outage -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod k8s_harness;

use k8s_harness::*;
use kube::api::{Api, Patch, PatchParams};
use lb_api::admin::{DestinationsStatus, State};
use lb_operator::crd::MrcpServer;
use serde_json::json;
use std::time::{Duration, Instant};

const APP: (&str, &str) = ("app", "unimrcp");
const PSTN_CAPACITY: &str = "mrcp-lb.io/pstn-capacity";
const SEC: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(50);

fn uri(ip: &str) -> String {
    format!("sip:{ip}:8060")
}

fn live(set: &DestinationsStatus) -> Vec<&lb_api::admin::DestinationStatus> {
    set.destinations.iter().filter(|d| !d.removed).collect()
}

/// (state, pstn capacity) of every live destination, by URI, sorted.
fn shape(set: &DestinationsStatus) -> Vec<(String, State, u32)> {
    let mut v: Vec<(String, State, u32)> = live(set)
        .iter()
        .map(|d| {
            let cap = resource(d, "pstn").map(|(c, _)| c).unwrap_or(0);
            (d.uri.clone(), d.state, cap)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn open_calls(set: &DestinationsStatus) -> u32 {
    set.destinations.iter().map(|d| d.open_calls).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_down_proxies_keep_routing_and_converge_when_it_returns() {
    let env = TestEnv::new("apiserver-outage", 12).await;
    let ips = [env.pod_ip(1), env.pod_ip(2), env.pod_ip(3)];
    let mut servers = Vec::new();
    for (k, ip) in ips.iter().enumerate() {
        servers.push(
            Sipp::uas(&env, &format!("uas-{k}"))
                .at(format!("{ip}:8060").parse().unwrap())
                .start_async()
                .await,
        );
    }
    let proxy = Proxy::start(&env, "proxy", 5060, 8081).await;
    let lease = [
        "--lease-name",
        "mrcp-lb-operator",
        "--identity",
        "op-outage",
        "--lease-namespace",
        &env.ns,
    ];
    let mut op = Operator::start(&env, "operator", 8090, &[&proxy], &lease).await;
    let op_pid = op.guard.pid();
    env.create_server(
        "asr",
        json!({
            "selector": {"matchLabels": {"app": "unimrcp"}},
            "sipPort": 8060,
            "defaultResources": "pstn=100",
            "probeMode": 2,
        }),
    )
    .await;
    for (k, name) in ["mrcp-0", "mrcp-1"].iter().enumerate() {
        env.create_pod(name, &[APP], &[], false).await;
        env.set_pod_status(name, &ips[k], true).await;
    }
    let before = eventually(
        "2 destinations up in the proxy",
        15 * SEC,
        POLL,
        async || {
            let set = proxy.try_destinations().await?;
            let want = vec![
                (uri(&ips[0]), State::Up, 100),
                (uri(&ips[1]), State::Up, 100),
            ];
            (shape(&set) == want)
                .then_some(set.clone())
                .ok_or(describe(&set))
        },
    )
    .await;
    eventually("the operator to lead", 20 * SEC, POLL, async || {
        match op.metric("mrcp_lb_operator_leader").await? {
            Some(1.0) => Ok(()),
            v => Err(format!("leader={v:?}")),
        }
    })
    .await;
    // A call that stays open through the outage.
    let long = proxy
        .uac(&env, "uac-long", 5070)
        .calls_together(1)
        .hold(ms(70_000))
        .timeout(120 * SEC)
        .start();
    eventually("the long call to be open", 10 * SEC, POLL, async || {
        let set = proxy.try_destinations().await?;
        (open_calls(&set) == 1).then_some(()).ok_or(describe(&set))
    })
    .await;

    // ---- Outage: kube-apiserver killed, etcd stopped.
    let down_at = Instant::now();
    env.cp.outage();
    assert!(
        env.pods().list(&Default::default()).await.is_err(),
        "the API server still answers after the outage began"
    );
    eprintln!("[outage] control plane down");

    // Longer than the Lease (15 s): the operator loses it, nobody can write anything.
    let mut during = Vec::new();
    while down_at.elapsed() < 20 * SEC {
        let set = proxy.destinations().await;
        assert_eq!(
            (set.version, shape(&set)),
            (before.version, shape(&before)),
            "the proxy's set changed while the API server was down: {}",
            describe(&set)
        );
        assert_eq!(proxy.readyz().await, 200);
        during.push(set);
        tokio::time::sleep(2 * SEC).await;
    }
    // The proxy routes on its last set meanwhile.
    let calls = proxy
        .uac(&env, "uac-during", 5071)
        .calls_together(10)
        .hold(ms(200))
        .timeout(20 * SEC)
        .start();
    calls.wait_async(30 * SEC).await.assert_all_ok(10);
    assert!(op.guard.running(), "the operator exited during the outage");
    assert_eq!(op.get("/healthz").await.map(|r| r.0), Ok(200));
    let leader_during = op.metric("mrcp_lb_operator_leader").await.unwrap();
    let watch_errors = op.log_lines("watch:").len();
    eprintln!(
        "[outage] {} checks over {:.0?}: proxy kept version {} and its routing; operator \
         leader={leader_during:?}, {watch_errors} watch error lines",
        during.len(),
        down_at.elapsed(),
        before.version
    );
    assert!(watch_errors > 0, "the operator never noticed the outage");

    // ---- The control plane returns; changes are made at once.
    env.cp.start_again();
    let back_at = Instant::now();
    eprintln!(
        "[outage] control plane back after {:.1?}",
        down_at.elapsed()
    );
    // The MrcpServer's default capacity (mrcp-0 and mrcp-1 have no annotation) and a new pod
    // with the largest capacity: it should take every new call.
    let servers_api: Api<MrcpServer> = env.servers();
    servers_api
        .patch(
            "asr",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"defaultResources": "pstn=80"}})),
        )
        .await
        .expect("patch the MrcpServer");
    env.create_pod("mrcp-2", &[APP], &[(PSTN_CAPACITY, "500")], false)
        .await;
    env.set_pod_status("mrcp-2", &ips[2], true).await;
    let changed_at = Instant::now();

    let after = eventually("the new set in the proxy", 120 * SEC, POLL, async || {
        let set = proxy.try_destinations().await?;
        let want = vec![
            (uri(&ips[0]), State::Up, 80),
            (uri(&ips[1]), State::Up, 80),
            (uri(&ips[2]), State::Up, 500),
        ];
        (shape(&set) == want)
            .then_some(set.clone())
            .ok_or(describe(&set))
    })
    .await;
    let converged = changed_at.elapsed();
    eprintln!(
        "[outage] new set (version {}) in the proxy {converged:.1?} after the change, {:.1?} \
         after the API server returned: {}",
        after.version,
        back_at.elapsed(),
        describe(&after)
    );
    assert!(after.version > before.version);
    // Watches retry at most every 4 s (`WatchBackoff`): reconnect, then re-list after the
    // "resource version too old" answer of a restarted API server.
    assert!(
        converged < 20 * SEC,
        "the change took {converged:.1?} to reach the proxy after the API server returned"
    );
    assert_eq!(
        open_calls(&after),
        1,
        "the call open through the outage keeps its load: {}",
        describe(&after)
    );
    // The operator was never restarted, and leads again.
    assert!(op.guard.running(), "the operator exited");
    assert_eq!(op.guard.pid(), op_pid);
    eventually(
        "the operator to lead again",
        30 * SEC,
        POLL,
        async || match op.metric("mrcp_lb_operator_leader").await? {
            Some(1.0) => Ok(()),
            v => Err(format!("leader={v:?}")),
        },
    )
    .await;

    // New calls go by the new set: all to mrcp-2, the largest free capacity.
    let calls = proxy
        .uac(&env, "uac-after", 5072)
        .calls_together(5)
        .hold(ms(200))
        .timeout(20 * SEC)
        .start();
    calls.wait_async(30 * SEC).await.assert_all_ok(5);
    let set = proxy.destinations().await;
    let d2 = by_uri(&set, &uri(&ips[2])).expect("mrcp-2 listed");
    assert_eq!(d2.calls, 5, "{}", describe(&set));

    long.wait_async(120 * SEC).await.assert_all_ok(1);
    drop(servers);
}
