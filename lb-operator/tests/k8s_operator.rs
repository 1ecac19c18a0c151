//! lb-operator against a real control plane (etcd + kube-apiserver built by `make k8s`), real
//! lb-proxy processes and sipp: registration, capacity changes under load, readiness and
//! termination, deletion, restarts, bad annotations, status, leader election (crash and
//! graceful handover), health, proxy discovery by label, early shutdown, cluster peers, and
//! the per-resource load in the status, read from two proxy replicas.
//!
//! Run: `cargo test -p lb-operator --test k8s_operator -- --nocapture` (the latency figures and
//! takeover times are printed). See `k8s_harness/mod.rs` for addresses and process handling.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod k8s_harness;

use k8s_harness::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use lb_api::admin::{DestinationsStatus, State};
use serde_json::json;
use std::time::{Duration, Instant};

const APP: (&str, &str) = ("app", "unimrcp");
/// The pod annotations the operator reads (spelled out: they are the contract).
const PSTN_CAPACITY: &str = "mrcp-lb.io/pstn-capacity";
const RESOURCES: &str = "mrcp-lb.io/resources";
const SEC: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(20);

/// A destination's URI, its pod, and its resources with their capacities.
type Expected<'a> = (String, &'a str, Vec<(&'a str, u32)>);

fn uri(ip: &str) -> String {
    format!("sip:{ip}:8060")
}

fn server_spec(app: &str, default_resources: &str, probe_mode: u8) -> serde_json::Value {
    json!({
        "selector": {"matchLabels": {"app": app}},
        "sipPort": 8060,
        "defaultResources": default_resources,
        "probeMode": probe_mode,
    })
}

/// Destinations still in the set (not merely shown while their calls end).
fn live(set: &DestinationsStatus) -> Vec<&lb_api::admin::DestinationStatus> {
    set.destinations.iter().filter(|d| !d.removed).collect()
}

/// Waits until `uri` is listed in `proxy` with `state`; returns its id.
async fn wait_state(proxy: &Proxy, uri: &str, state: State, timeout: Duration) -> String {
    eventually(
        &format!("{uri} to be {} in {}", state.as_str(), proxy.name),
        timeout,
        POLL,
        async || {
            let set = proxy.try_destinations().await?;
            match by_uri(&set, uri) {
                Some(d) if d.state == state && !d.removed => Ok(d.id.clone()),
                _ => Err(describe(&set)),
            }
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// 1. Registration, two proxy replicas, pod-Ready → visible-in-proxy latency

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_pods_register_with_their_capacities_in_every_proxy() {
    let env = TestEnv::new("registration", 1).await;
    let pa = Proxy::start(&env, "proxy-a", 5060, 8081).await;
    let pb = Proxy::start(&env, "proxy-b", 5062, 8082).await;
    for p in [&pa, &pb] {
        assert_eq!(p.readyz().await, 503, "{}: ready before any push", p.name);
    }
    env.create_server("asr", server_spec("unimrcp", "pstn=100", 0))
        .await;
    env.create_pod("mrcp-0", &[APP], &[(PSTN_CAPACITY, "50")], false)
        .await;
    env.create_pod("mrcp-1", &[APP], &[(RESOURCES, "pstn=30;tts=10")], false)
        .await;
    env.create_pod("mrcp-2", &[APP], &[], false).await;
    // Ready with an IP, but not selected: never a destination.
    env.create_pod("web-0", &[("app", "web")], &[], false).await;
    env.set_pod_status("web-0", &env.pod_ip(4), true).await;

    let op = Operator::start(&env, "operator", 8090, &[&pa, &pb], &[]).await;
    for (k, name) in ["mrcp-0", "mrcp-1", "mrcp-2"].iter().enumerate() {
        env.set_pod_status(name, &env.pod_ip(k as u8 + 1), true)
            .await;
    }
    // (URI, pod, resources with their capacities)
    let expected: Vec<Expected> = vec![
        (uri(&env.pod_ip(1)), "mrcp-0", vec![("pstn", 50)]),
        (
            uri(&env.pod_ip(2)),
            "mrcp-1",
            vec![("pstn", 30), ("tts", 10)],
        ),
        (uri(&env.pod_ip(3)), "mrcp-2", vec![("pstn", 100)]),
    ];
    let check = |set: &DestinationsStatus| -> Result<(), String> {
        let ds = live(set);
        if ds.len() != expected.len() {
            return Err(describe(set));
        }
        for (u, pod, res) in &expected {
            let Some(d) = by_uri(set, u) else {
                return Err(describe(set));
            };
            let mut got: Vec<(&str, u32)> = d
                .resources
                .iter()
                .map(|r| (r.name.as_str(), r.capacity))
                .collect();
            got.sort();
            if d.state != State::Up || &got != res || d.group != 1 || !d.id.contains(pod) {
                return Err(describe(set));
            }
        }
        Ok(())
    };
    let mut sets = Vec::new();
    for p in [&pa, &pb] {
        let set = eventually(
            &format!("3 destinations with their capacities in {}", p.name),
            10 * SEC,
            POLL,
            async || {
                let s = p.try_destinations().await?;
                check(&s).map(|_| s)
            },
        )
        .await;
        eprintln!("[registration] {}: {}", p.name, describe(&set));
        sets.push(set);
    }
    let ids = |s: &DestinationsStatus| {
        let mut v: Vec<String> = s.destinations.iter().map(|d| d.id.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(
        ids(&sets[0]),
        ids(&sets[1]),
        "both proxies hold the same ids"
    );
    for p in [&pa, &pb] {
        assert_eq!(
            p.readyz().await,
            200,
            "{}: not ready after the push",
            p.name
        );
    }
    eventually("operator: 2 proxies in sync", 10 * SEC, POLL, async || {
        let m = op.metrics().await?;
        let known = metric_value(&m, "mrcp_lb_operator_proxies");
        let in_sync = metric_value(&m, "mrcp_lb_operator_proxies_in_sync");
        (known == Some(2.0) && in_sync == Some(2.0))
            .then_some(())
            .ok_or(format!("proxies={known:?} in_sync={in_sync:?}"))
    })
    .await;

    // Latency: 20 more pods, marked Ready one at a time; both proxies polled every 10 ms.
    let n = 20u8;
    for i in 0..n {
        env.create_pod(&format!("lat-{i:02}"), &[APP], &[], false)
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for p in [&pa, &pb] {
        let set = p.destinations().await;
        assert_eq!(
            live(&set).len(),
            3,
            "{}: pods without an IP must not be destinations: {}",
            p.name,
            describe(&set)
        );
    }
    let mut first = Vec::new();
    let mut both = Vec::new();
    for i in 0..n {
        let name = format!("lat-{i:02}");
        let ip = env.pod_ip(5 + i);
        let u = uri(&ip);
        let t0 = Instant::now();
        env.set_pod_status(&name, &ip, true).await;
        let (mut seen_a, mut seen_b) = (None, None);
        while seen_a.is_none() || seen_b.is_none() {
            let (a, b) = tokio::join!(pa.try_destinations(), pb.try_destinations());
            let now = t0.elapsed();
            let up = |r: &Result<DestinationsStatus, String>| {
                r.as_ref()
                    .is_ok_and(|s| by_uri(s, &u).is_some_and(|d| d.state == State::Up))
            };
            if seen_a.is_none() && up(&a) {
                seen_a = Some(now);
            }
            if seen_b.is_none() && up(&b) {
                seen_b = Some(now);
            }
            assert!(
                now < 10 * SEC,
                "{name} ({u}) not up in both proxies 10 s after Ready: a={seen_a:?} b={seen_b:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (a, b) = (seen_a.unwrap(), seen_b.unwrap());
        first.push(a.min(b));
        both.push(a.max(b));
    }
    first.sort();
    both.sort();
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    eprintln!(
        "[registration] pod Ready -> up in a proxy, {n} pods: first proxy p50 {} p99 {} max {}; \
         both proxies p50 {} p99 {} max {}",
        ms(percentile(&first, 50.0)),
        ms(percentile(&first, 99.0)),
        ms(*first.last().unwrap()),
        ms(percentile(&both, 50.0)),
        ms(percentile(&both, 99.0)),
        ms(*both.last().unwrap()),
    );
    let m = op.metrics().await.unwrap();
    eprintln!(
        "[registration] operator push latency histogram: count {:?} sum {:?} s",
        metric_value(&m, "mrcp_lb_operator_push_latency_seconds_count"),
        metric_value(&m, "mrcp_lb_operator_push_latency_seconds_sum"),
    );
    assert!(
        percentile(&both, 99.0) < SEC,
        "p99 of pod Ready -> visible in both proxies is {:?} (>= 1 s); all: {both:?}",
        percentile(&both, 99.0)
    );
    for p in [&pa, &pb] {
        let set = p.destinations().await;
        assert_eq!(live(&set).len(), 23, "{}: {}", p.name, describe(&set));
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Capacity change while calls are open

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_change_keeps_the_load_of_open_calls() {
    let env = TestEnv::new("capacity", 2).await;
    let ip = env.pod_ip(1);
    let server = Sipp::uas(&env, "uas")
        .at(format!("{ip}:8060").parse().unwrap())
        .start_async()
        .await;
    let proxy = Proxy::start(&env, "proxy", 5060, 8081).await;
    let _op = Operator::start(&env, "operator", 8090, &[&proxy], &[]).await;
    // A real server listens on the pod's IP:port: the proxy may probe it (mode 2).
    env.create_server("asr", server_spec("unimrcp", "pstn=100", 2))
        .await;
    env.create_pod("mrcp-0", &[APP], &[(PSTN_CAPACITY, "100")], false)
        .await;
    env.set_pod_status("mrcp-0", &ip, true).await;
    let u = uri(&ip);
    let id = wait_state(&proxy, &u, State::Up, 10 * SEC).await;

    let client = proxy
        .uac(&env, "uac", 5070)
        .calls_together(3)
        .hold(ms(20_000))
        .timeout(60 * SEC)
        .start();
    eventually("3 open calls on mrcp-0", 15 * SEC, POLL, async || {
        let set = proxy.try_destinations().await?;
        let d = by_uri(&set, &u).ok_or(describe(&set))?;
        (resource(d, "pstn") == Some((100, 3)) && d.open_calls == 3)
            .then_some(())
            .ok_or(describe(&set))
    })
    .await;

    let t0 = Instant::now();
    env.annotate_pod("mrcp-0", PSTN_CAPACITY, "200").await;
    let d = eventually(
        "capacity 200 on mrcp-0",
        5 * SEC,
        Duration::from_millis(10),
        async || {
            let set = proxy.try_destinations().await?;
            let d = by_uri(&set, &u).ok_or(describe(&set))?;
            (resource(d, "pstn").map(|r| r.0) == Some(200))
                .then(|| d.clone())
                .ok_or(describe(&set))
        },
    )
    .await;
    eprintln!(
        "[capacity] annotation 100 -> 200 visible in the proxy after {:.1} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(d.id, id, "the destination kept its id");
    assert_eq!(resource(&d, "pstn"), Some((200, 3)), "load kept: {d:?}");
    assert_eq!(d.open_calls, 3);
    assert_eq!(d.state, State::Up);
    // And after a few resync pushes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let set = proxy.destinations().await;
    assert_eq!(live(&set).len(), 1, "{}", describe(&set));
    let d = by_uri(&set, &u).unwrap();
    assert_eq!(
        (d.id.as_str(), resource(d, "pstn")),
        (id.as_str(), Some((200, 3))),
        "{}",
        describe(&set)
    );

    let report = client.wait_async(60 * SEC).await;
    report.assert_all_ok(3);
    eventually("load back to 0", 10 * SEC, POLL, async || {
        let set = proxy.try_destinations().await?;
        let d = by_uri(&set, &u).ok_or(describe(&set))?;
        (resource(d, "pstn") == Some((200, 0)))
            .then_some(())
            .ok_or(describe(&set))
    })
    .await;
    let srv = server.stop_async().await;
    assert_eq!(srv.stat("FailedCall(C)"), 0, "{}", srv.summary());
}

// ---------------------------------------------------------------------------------------------
// 3. Not Ready → down; terminating → draining; gone → removed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_termination_map_to_down_draining_and_removal() {
    let env = TestEnv::new("lifecycle", 3).await;
    let proxy = Proxy::start(&env, "proxy", 5060, 8081).await;
    let _op = Operator::start(&env, "operator", 8090, &[&proxy], &[]).await;
    env.create_server("asr", server_spec("unimrcp", "pstn=100", 0))
        .await;
    env.create_pod("mrcp-0", &[APP], &[], true).await;
    env.create_pod("mrcp-1", &[APP], &[], false).await;
    let (u0, u1) = (uri(&env.pod_ip(1)), uri(&env.pod_ip(2)));
    env.set_pod_status("mrcp-0", &env.pod_ip(1), true).await;
    env.set_pod_status("mrcp-1", &env.pod_ip(2), true).await;
    let id0 = wait_state(&proxy, &u0, State::Up, 10 * SEC).await;
    let id1 = wait_state(&proxy, &u1, State::Up, 10 * SEC).await;

    env.set_pod_status("mrcp-0", &env.pod_ip(1), false).await;
    assert_eq!(wait_state(&proxy, &u0, State::Down, 5 * SEC).await, id0);
    assert_eq!(wait_state(&proxy, &u1, State::Up, SEC).await, id1);
    env.set_pod_status("mrcp-0", &env.pod_ip(1), true).await;
    assert_eq!(wait_state(&proxy, &u0, State::Up, 5 * SEC).await, id0);

    // Terminating (Ready still True): the finalizer holds the pod with a deletionTimestamp.
    env.delete_pod("mrcp-0").await;
    let pod = env
        .pods()
        .get("mrcp-0")
        .await
        .expect("pod held by its finalizer");
    assert!(
        pod.metadata.deletion_timestamp.is_some(),
        "{:?}",
        pod.metadata
    );
    assert_eq!(wait_state(&proxy, &u0, State::Draining, 5 * SEC).await, id0);

    env.remove_finalizers("mrcp-0").await;
    eventually("pod mrcp-0 gone", 10 * SEC, POLL, async || {
        match env.pods().get_opt("mrcp-0").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("mrcp-0 removed from the proxy", 5 * SEC, POLL, async || {
        let set = proxy.try_destinations().await?;
        let gone = !set.destinations.iter().any(|d| d.id == id0);
        let other_up = by_uri(&set, &u1).is_some_and(|d| d.state == State::Up);
        (gone && other_up).then_some(()).ok_or(describe(&set))
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. Deleting an MrcpServer removes its destinations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_mrcpserver_removes_its_destinations() {
    let env = TestEnv::new("delete-server", 4).await;
    let proxy = Proxy::start(&env, "proxy", 5060, 8081).await;
    let _op = Operator::start(&env, "operator", 8090, &[&proxy], &[]).await;
    env.create_server("asr", server_spec("asr", "pstn=100", 0))
        .await;
    env.create_server("tts", server_spec("tts", "pstn=20", 0))
        .await;
    for (k, (name, app)) in [("asr-0", "asr"), ("asr-1", "asr"), ("tts-0", "tts")]
        .into_iter()
        .enumerate()
    {
        env.create_pod(name, &[("app", app)], &[], false).await;
        env.set_pod_status(name, &env.pod_ip(k as u8 + 1), true)
            .await;
    }
    let (a0, a1, t0) = (
        uri(&env.pod_ip(1)),
        uri(&env.pod_ip(2)),
        uri(&env.pod_ip(3)),
    );
    for u in [&a0, &a1, &t0] {
        wait_state(&proxy, u, State::Up, 10 * SEC).await;
    }
    env.servers()
        .delete("asr", &DeleteParams::default())
        .await
        .expect("delete MrcpServer asr");
    let set = eventually("asr's destinations removed", 10 * SEC, POLL, async || {
        let set = proxy.try_destinations().await?;
        let uris: Vec<&str> = set.destinations.iter().map(|d| d.uri.as_str()).collect();
        (uris == [t0.as_str()])
            .then(|| set.clone())
            .ok_or(describe(&set))
    })
    .await;
    let v = set.version;
    env.servers()
        .delete("tts", &DeleteParams::default())
        .await
        .expect("delete MrcpServer tts");
    eventually("an empty set in the proxy", 10 * SEC, POLL, async || {
        let set = proxy.try_destinations().await?;
        (set.destinations.is_empty() && set.version > v)
            .then_some(())
            .ok_or(describe(&set))
    })
    .await;
    // The pods themselves are untouched.
    assert_eq!(
        env.pods()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        3
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Operator restart: the proxies keep their set; a new operator converges without conflicts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_restart_keeps_the_set_and_converges() {
    let env = TestEnv::new("restart", 5).await;
    let ip = env.pod_ip(1);
    let server = Sipp::uas(&env, "uas")
        .at(format!("{ip}:8060").parse().unwrap())
        .start_async()
        .await;
    let proxy = Proxy::start(&env, "proxy", 5060, 8081).await;
    let mut op1 = Operator::start(&env, "operator-1", 8090, &[&proxy], &[]).await;
    // mrcp-1 has no server behind its IP: no probing (mode 0).
    env.create_server("asr", server_spec("unimrcp", "pstn=100", 0))
        .await;
    env.create_pod("mrcp-0", &[APP], &[], false).await;
    env.create_pod("mrcp-1", &[APP], &[], false).await;
    env.set_pod_status("mrcp-0", &ip, true).await;
    env.set_pod_status("mrcp-1", &env.pod_ip(2), false).await;
    let (u0, u1) = (uri(&ip), uri(&env.pod_ip(2)));
    let id0 = wait_state(&proxy, &u0, State::Up, 10 * SEC).await;
    let id1 = wait_state(&proxy, &u1, State::Down, 10 * SEC).await;

    let long = proxy
        .uac(&env, "uac-long", 5070)
        .calls_together(1)
        .hold(ms(15_000))
        .timeout(40 * SEC)
        .start();
    eventually("1 open call on mrcp-0", 10 * SEC, POLL, async || {
        let set = proxy.try_destinations().await?;
        let d = by_uri(&set, &u0).ok_or(describe(&set))?;
        (resource(d, "pstn") == Some((100, 1)))
            .then_some(())
            .ok_or(describe(&set))
    })
    .await;
    let before = proxy.destinations().await;
    assert_eq!(
        op1.metric("mrcp_lb_operator_pushes_total{result=\"conflict\"}")
            .await
            .unwrap()
            .unwrap_or(0.0),
        0.0
    );

    op1.guard.signal("TERM");
    let st = op1.guard.wait_exit(10 * SEC).await;
    assert!(
        st.is_some_and(|s| s.success()),
        "operator-1 did not exit cleanly within 10 s of SIGTERM: {st:?}"
    );
    // Longer than the resync period: nobody pushes, the proxy keeps what it has.
    tokio::time::sleep(3 * SEC).await;
    let during = proxy.destinations().await;
    assert_eq!(during.version, before.version, "{}", describe(&during));
    assert_eq!(describe(&during), describe(&before));
    assert_eq!(proxy.readyz().await, 200);
    // Routing still works without an operator.
    let short = proxy
        .uac(&env, "uac-short", 5071)
        .calls_together(1)
        .hold(ms(200))
        .timeout(20 * SEC)
        .start();
    short.wait_async(20 * SEC).await.assert_all_ok(1);

    let op2 = Operator::start(&env, "operator-2", 8091, &[&proxy], &[]).await;
    let after = eventually("a push from operator-2", 10 * SEC, POLL, async || {
        let set = proxy.try_destinations().await?;
        (set.version > before.version)
            .then(|| set.clone())
            .ok_or(describe(&set))
    })
    .await;
    let d0 = by_uri(&after, &u0).expect("mrcp-0 still listed");
    let d1 = by_uri(&after, &u1).expect("mrcp-1 still listed");
    assert_eq!((d0.id.as_str(), d0.state), (id0.as_str(), State::Up));
    assert_eq!((d1.id.as_str(), d1.state), (id1.as_str(), State::Down));
    assert_eq!(
        resource(d0, "pstn"),
        Some((100, 1)),
        "load of the open call kept"
    );
    assert_eq!(live(&after).len(), 2, "{}", describe(&after));

    // Resyncs (every 2 s) re-push the same version: no new versions, no conflicts.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let later = proxy.destinations().await;
    assert_eq!(later.version, after.version, "{}", describe(&later));
    let m = op2.metrics().await.unwrap();
    let conflicts = metric_value(&m, "mrcp_lb_operator_pushes_total{result=\"conflict\"}");
    let ok = metric_value(&m, "mrcp_lb_operator_pushes_total{result=\"ok\"}");
    let in_sync = metric_value(&m, "mrcp_lb_operator_proxies_in_sync");
    eprintln!("[restart] operator-2: pushes ok={ok:?} conflict={conflicts:?} in_sync={in_sync:?}");
    assert_eq!(conflicts.unwrap_or(0.0), 0.0, "409 conflicts after restart");
    assert!(ok.unwrap_or(0.0) >= 2.0, "resync pushes: ok={ok:?}");
    assert_eq!(in_sync, Some(1.0));

    long.wait_async(40 * SEC).await.assert_all_ok(1);
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// 6. A malformed capacity annotation: Warning event, default capacity, operator unaffected

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_annotation_gives_a_warning_event_and_the_default() {
    let env = TestEnv::new("bad-annotation", 6).await;
    let proxy = Proxy::start(&env, "proxy", 5060, 8081).await;
    let mut op = Operator::start(&env, "operator", 8090, &[&proxy], &[]).await;
    env.create_server("asr", server_spec("unimrcp", "pstn=70", 0))
        .await;
    env.create_pod("mrcp-0", &[APP], &[(PSTN_CAPACITY, "lots")], false)
        .await;
    env.create_pod("mrcp-1", &[APP], &[(PSTN_CAPACITY, "40")], false)
        .await;
    env.set_pod_status("mrcp-0", &env.pod_ip(1), true).await;
    env.set_pod_status("mrcp-1", &env.pod_ip(2), true).await;
    let (u0, u1) = (uri(&env.pod_ip(1)), uri(&env.pod_ip(2)));
    eventually(
        "mrcp-0 with the default pstn=70, mrcp-1 with 40",
        10 * SEC,
        POLL,
        async || {
            let set = proxy.try_destinations().await?;
            let c0 = by_uri(&set, &u0).and_then(|d| resource(d, "pstn"));
            let c1 = by_uri(&set, &u1).and_then(|d| resource(d, "pstn"));
            (c0 == Some((70, 0)) && c1 == Some((40, 0)))
                .then_some(())
                .ok_or(describe(&set))
        },
    )
    .await;

    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    let ev = eventually(
        "a Warning event for pod mrcp-0",
        10 * SEC,
        POLL,
        async || {
            let list = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .find(|e| {
                    e.reason.as_deref() == Some("InvalidCapacityAnnotation")
                        && e.regarding.as_ref().is_some_and(|r| {
                            r.kind.as_deref() == Some("Pod") && r.name.as_deref() == Some("mrcp-0")
                        })
                })
                .cloned()
                .ok_or_else(|| {
                    let seen: Vec<String> = list
                        .items
                        .iter()
                        .map(|e| format!("{:?} {:?} {:?}", e.type_, e.reason, e.note))
                        .collect();
                    format!("{seen:?}")
                })
        },
    )
    .await;
    eprintln!(
        "[bad-annotation] event: {:?} {:?} {:?}",
        ev.type_, ev.reason, ev.note
    );
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    let note = ev.note.clone().unwrap_or_default();
    assert!(
        note.contains("mrcp-lb.io/pstn-capacity") && note.contains("lots"),
        "the note must name the annotation and its value: {note:?}"
    );
    // No event for the good pod.
    let list = events.list(&ListParams::default()).await.unwrap();
    assert!(
        !list.items.iter().any(|e| e
            .regarding
            .as_ref()
            .is_some_and(|r| r.name.as_deref() == Some("mrcp-1"))),
        "unexpected event for mrcp-1"
    );
    // kubectl shows it as well.
    let out = env.kubectl(&["get", "events", "-n", &env.ns]);
    assert!(out.contains("InvalidCapacityAnnotation"), "{out}");
    // And the MrcpServer has its own, naming the pod and the value.
    let (t, note) = wait_event(&env, "asr", "InvalidCapacityAnnotation", "pod mrcp-0").await;
    assert_eq!(t, "Warning");
    assert!(note.contains("lots"), "{note}");

    assert!(op.guard.running(), "operator exited");
    assert_eq!(op.get("/healthz").await.unwrap().0, 200);
    // Fixing the annotation takes effect.
    env.annotate_pod("mrcp-0", PSTN_CAPACITY, "60").await;
    eventually("mrcp-0 with pstn=60", 5 * SEC, POLL, async || {
        let set = proxy.try_destinations().await?;
        (by_uri(&set, &u0).and_then(|d| resource(d, "pstn")) == Some((60, 0)))
            .then_some(())
            .ok_or(describe(&set))
    })
    .await;
    assert!(op.guard.running(), "operator exited");
}

// ---------------------------------------------------------------------------------------------
// 7. Status subresource and printer columns

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_printer_columns() {
    let env = TestEnv::new("status", 7).await;
    let proxy = Proxy::start(&env, "proxy", 5060, 8081).await;
    let _op = Operator::start(&env, "operator", 8090, &[&proxy], &[]).await;
    env.create_server("asr", server_spec("asr", "pstn=100", 0))
        .await;
    env.create_server("empty", server_spec("nothing", "pstn=100", 0))
        .await;
    env.create_pod("asr-0", &[("app", "asr")], &[(PSTN_CAPACITY, "80")], false)
        .await;
    env.create_pod("asr-1", &[("app", "asr")], &[], false).await;
    env.create_pod("asr-2", &[("app", "asr")], &[], false).await;
    env.set_pod_status("asr-0", &env.pod_ip(1), true).await;
    env.set_pod_status("asr-1", &env.pod_ip(2), true).await;
    env.set_pod_status("asr-2", &env.pod_ip(3), false).await;

    let status_of = async |name: &str, want_capacity: &str| -> Result<(), String> {
        let s = env.servers().get(name).await.map_err(|e| e.to_string())?;
        let gen = s.metadata.generation;
        let st = s.status.clone().ok_or("no status yet")?;
        let ready = st.conditions.iter().find(|c| c.type_ == "Ready");
        let ok = st.observed_generation == gen
            && st.capacity_summary == want_capacity
            && ready.is_some_and(|c| c.observed_generation == gen);
        ok.then_some(())
            .ok_or(format!("generation {gen:?}, status {st:?}"))
    };
    eventually("status of asr", 10 * SEC, POLL, async || {
        status_of("asr", "pstn=180").await
    })
    .await;
    let asr = env.servers().get("asr").await.unwrap();
    let st = asr.status.clone().unwrap();
    assert_eq!(st.ready_destinations, 2, "{st:?}");
    assert_eq!(st.capacity.get("pstn"), Some(&180), "{st:?}");
    let mut states: Vec<(String, String)> = st
        .destinations
        .iter()
        .map(|d| (d.pod.clone(), d.state.clone()))
        .collect();
    states.sort();
    assert_eq!(
        states,
        [("asr-0", "active"), ("asr-1", "active"), ("asr-2", "down")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "DestinationsReady")
    );

    eventually("status of empty", 10 * SEC, POLL, async || {
        status_of("empty", "").await
    })
    .await;
    let empty = env.servers().get("empty").await.unwrap();
    let st = empty.status.clone().unwrap();
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NoMatchingPods")
    );
    assert_eq!(st.ready_destinations, 0);

    let table = env.kubectl(&["get", "mrcp", "-n", &env.ns]);
    eprintln!("[status] kubectl get mrcp:\n{table}");
    assert_columns(&table);
    let rows = table_rows(&table);
    let row = rows
        .iter()
        .find(|r| r["NAME"] == "asr")
        .unwrap_or_else(|| panic!("no asr row: {table}"));
    let cells = |row: &std::collections::BTreeMap<String, String>| -> Vec<String> {
        ["READY", "DOWN", "DRAINING", "CAPACITY"]
            .iter()
            .map(|c| row[*c].clone())
            .collect()
    };
    assert_eq!(cells(row), ["2", "1", "0", "pstn=180"], "{table}");
    // -o wide adds the load per resource.
    let wide = env.kubectl(&["get", "mrcp", "-n", &env.ns, "-o", "wide"]);
    assert!(wide.lines().next().unwrap().contains(" LOAD "), "{wide}");

    // A spec change: a new generation, observed, and the capacity follows.
    env.servers()
        .patch(
            "asr",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"defaultResources": "pstn=120"}})),
        )
        .await
        .expect("patch asr spec");
    eventually(
        "status of asr after the spec change",
        10 * SEC,
        POLL,
        async || status_of("asr", "pstn=200").await,
    )
    .await;
    let asr = env.servers().get("asr").await.unwrap();
    assert!(asr.metadata.generation >= Some(2), "{:?}", asr.metadata);
    let table = env.kubectl(&["get", "mrcp", "asr", "-n", &env.ns]);
    let rows = table_rows(&table);
    assert_eq!(cells(&rows[0]), ["2", "1", "0", "pstn=200"], "{table}");
}

// ---------------------------------------------------------------------------------------------
// 8. Leader election

async fn leader_of(ops: &[&Operator]) -> Result<usize, String> {
    let mut leaders = Vec::new();
    let mut seen = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let v = op.metric("mrcp_lb_operator_leader").await?;
        seen.push(format!("{}={v:?}", op.name));
        if v == Some(1.0) {
            leaders.push(i);
        } else if v != Some(0.0) {
            return Err(format!("{seen:?}"));
        }
    }
    match leaders[..] {
        [one] => Ok(one),
        _ => Err(format!("leaders: {seen:?}")),
    }
}

/// The Lease `mrcp-lb-operator` in `ns`: holder identity and renew time, as seen now.
async fn lease_state(env: &TestEnv, ns: &str) -> (Option<String>, Option<String>) {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), ns);
    let spec = leases
        .get_opt("mrcp-lb-operator")
        .await
        .expect("read Lease")
        .and_then(|l| l.spec)
        .unwrap_or_default();
    (
        spec.holder_identity,
        spec.renew_time.map(|t| t.0.to_string()),
    )
}

fn lease_flags(ns: &str, id: &str) -> Vec<String> {
    [
        "--lease-name",
        "mrcp-lb-operator",
        "--identity",
        id,
        "--lease-namespace",
        ns,
    ]
    .map(str::to_string)
    .to_vec()
}

async fn wait_leading(op: &Operator, timeout: Duration) {
    eventually(
        &format!("{} to lead", op.name),
        timeout,
        Duration::from_millis(50),
        async || match op.metric("mrcp_lb_operator_leader").await? {
            Some(1.0) => Ok(()),
            v => Err(format!("leader={v:?}")),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_pushes_and_a_follower_takes_over_after_a_crash() {
    let env = TestEnv::new("leader", 8).await;
    let proxy = Proxy::start(&env, "proxy", 5060, 8081).await;
    let ids = ["op-a", "op-b"];
    let mut ops = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let flags = lease_flags("default", id);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        ops.push(Operator::start(&env, id, 8090 + i as u16, &[&proxy], &flags).await);
    }
    env.create_server("asr", server_spec("unimrcp", "pstn=100", 0))
        .await;
    env.create_pod("mrcp-0", &[APP], &[], false).await;
    env.set_pod_status("mrcp-0", &env.pod_ip(1), true).await;
    wait_state(&proxy, &uri(&env.pod_ip(1)), State::Up, 10 * SEC).await;

    let refs: Vec<&Operator> = ops.iter().collect();
    let leader = eventually("exactly one leader", 10 * SEC, POLL, async || {
        leader_of(&refs).await
    })
    .await;
    let follower = 1 - leader;
    // Stable: still exactly that one a few renewals later.
    tokio::time::sleep(3 * SEC).await;
    assert_eq!(leader_of(&refs).await.unwrap(), leader);
    assert_eq!(
        lease_state(&env, "default").await.0.as_deref(),
        Some(ids[leader])
    );
    let follower_pushes = ops[follower]
        .metric("mrcp_lb_operator_pushes_total{result=\"ok\"}")
        .await
        .unwrap()
        .unwrap_or(0.0);
    assert_eq!(follower_pushes, 0.0, "the follower pushed");
    eprintln!("[leader] {} leads, {} follows", ids[leader], ids[follower]);

    // Crash the leader: its lease expires (15 s) and the follower takes over.
    ops[leader].guard.signal("KILL");
    let t0 = Instant::now();
    assert!(ops[leader].guard.wait_exit(5 * SEC).await.is_some());
    wait_leading(&ops[follower], 25 * SEC).await;
    let takeover = t0.elapsed();
    eprintln!("[leader] takeover after SIGKILL of the leader: {takeover:.1?} (lease 15 s)");
    assert!(takeover < 20 * SEC, "takeover took {takeover:?}");
    assert_eq!(
        lease_state(&env, "default").await.0.as_deref(),
        Some(ids[follower])
    );
    // The new leader brings the proxy in step with its own set (before anything changes).
    let new_leader = &ops[follower];
    let m = eventually(
        "the new leader in sync with the proxy",
        10 * SEC,
        POLL,
        async || {
            let m = new_leader.metrics().await?;
            let in_sync = metric_value(&m, "mrcp_lb_operator_proxies_in_sync");
            (in_sync == Some(1.0))
                .then(|| m.clone())
                .ok_or(format!("in_sync={in_sync:?}"))
        },
    )
    .await;
    eprintln!(
        "[leader] new leader in sync {:.1?} after the takeover; pushes ok={:?} conflict={:?}",
        t0.elapsed() - takeover,
        metric_value(&m, "mrcp_lb_operator_pushes_total{result=\"ok\"}"),
        metric_value(&m, "mrcp_lb_operator_pushes_total{result=\"conflict\"}")
    );
    // The new leader pushes changes.
    env.create_pod("mrcp-1", &[APP], &[], false).await;
    let t1 = Instant::now();
    env.set_pod_status("mrcp-1", &env.pod_ip(2), true).await;
    wait_state(&proxy, &uri(&env.pod_ip(2)), State::Up, 5 * SEC).await;
    eprintln!(
        "[leader] new pod pushed by the new leader in {:.1?}",
        t1.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_releases_the_lease() {
    let env = TestEnv::new("handover", 10).await;
    let proxy = Proxy::start(&env, "proxy", 5060, 8081).await;
    let ns = env.ns.clone();
    env.create_server("asr", server_spec("unimrcp", "pstn=100", 0))
        .await;
    let names = ["op-a", "op-b", "op-c", "op-d"];
    let start = async |i: usize| {
        let flags = lease_flags(&ns, names[i]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Operator::start(&env, names[i], 8090 + i as u16, &[&proxy], &flags).await
    };
    let mut leader = start(0).await;
    wait_leading(&leader, 10 * SEC).await;
    // Three handovers, each from a leader that has been idle for a while (nothing to
    // reconcile) when it gets SIGTERM, as in a rolling update.
    for cycle in 1..names.len() {
        let standby = start(cycle).await;
        eventually(
            &format!("{} synced, following", standby.name),
            10 * SEC,
            POLL,
            async || {
                let ready = standby.get("/readyz").await?.0;
                let l = standby.metric("mrcp_lb_operator_leader").await?;
                (ready == 200 && l == Some(0.0))
                    .then_some(())
                    .ok_or(format!("readyz {ready} leader {l:?}"))
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(400 + 500 * cycle as u64)).await;

        leader.guard.signal("TERM");
        let t0 = Instant::now();
        let st = leader.guard.wait_exit(10 * SEC).await;
        let exited = t0.elapsed();
        assert!(
            st.is_some_and(|s| s.success()),
            "{} on SIGTERM: {st:?}",
            leader.name
        );
        let at_exit = lease_state(&env, &ns).await;
        eprintln!(
            "[handover] {} exited {exited:.1?} after SIGTERM; Lease then: holder {:?}, renewTime {:?}",
            leader.name, at_exit.0, at_exit.1
        );
        wait_leading(&standby, 25 * SEC).await;
        let handover = t0.elapsed();
        eprintln!(
            "[handover] {} leads {handover:.1?} after SIGTERM of {} (renew period 2 s, lease 15 s)",
            standby.name, leader.name
        );
        // Released: empty, or already taken by the standby (it may try between the leader's
        // release and this read).
        let released = at_exit
            .0
            .as_deref()
            .is_none_or(|h| h.is_empty() || h == standby.name);
        assert!(
            released && handover < 6 * SEC,
            "a leader stopped with SIGTERM must release its Lease so that a standby takes over \
             at its next try (~2 s): after {} exited (status {st:?}, {exited:.1?} after SIGTERM) \
             the Lease still named holder {:?} (renewTime {:?}), and {} took over only after \
             {handover:.1?}, when the lease expired; {}'s log:\n{}",
            leader.name,
            at_exit.0,
            at_exit.1,
            standby.name,
            leader.name,
            leader.log_text()
        );
        // The new leader pushes.
        let pod = format!("mrcp-{cycle}");
        env.create_pod(&pod, &[APP], &[], false).await;
        env.set_pod_status(&pod, &env.pod_ip(cycle as u8), true)
            .await;
        wait_state(&proxy, &uri(&env.pod_ip(cycle as u8)), State::Up, 5 * SEC).await;
        leader = standby;
    }
}

// ---------------------------------------------------------------------------------------------
// 9. The operator's own HTTP: /healthz, /readyz, /metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let env = TestEnv::new("health", 9).await;
    let proxy = Proxy::start(&env, "proxy", 5060, 8081).await;

    // An operator whose API server does not answer: alive, not ready.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let kc = std::fs::read_to_string(&env.cp.kubeconfig).unwrap();
    let server_line = kc
        .lines()
        .find(|l| l.trim_start().starts_with("server: "))
        .unwrap()
        .to_string();
    let bad = kc.replace(
        &server_line,
        &format!("    server: https://127.0.0.1:{closed}"),
    );
    let bad_path = env.dir.join("unreachable.kubeconfig");
    std::fs::write(&bad_path, bad).unwrap();
    let unsynced =
        Operator::start_with_kubeconfig(&env, "op-unsynced", 8091, &[&proxy], &[], &bad_path).await;
    assert_eq!(unsynced.get("/healthz").await.unwrap().0, 200);
    for _ in 0..5 {
        let (code, body) = unsynced.get("/readyz").await.unwrap();
        assert_eq!(code, 503, "ready without a reachable API server: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(unsynced);
    assert_eq!(
        proxy.readyz().await,
        503,
        "an unsynced operator pushed a set"
    );

    let op = Operator::start(&env, "operator", 8090, &[&proxy], &[]).await;
    let (code, body) = op.get("/healthz").await.unwrap();
    assert_eq!((code, body.trim()), (200, "ok"));
    eventually("/readyz 200", 10 * SEC, POLL, async || {
        match op.get("/readyz").await? {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    env.create_server("asr", server_spec("unimrcp", "pstn=100", 0))
        .await;
    env.create_pod("mrcp-0", &[APP], &[], false).await;
    env.set_pod_status("mrcp-0", &env.pod_ip(1), true).await;
    wait_state(&proxy, &uri(&env.pod_ip(1)), State::Up, 10 * SEC).await;
    let set = proxy.destinations().await;
    let text = eventually(
        "operator metrics in step with the proxy",
        10 * SEC,
        POLL,
        async || {
            let m = op.metrics().await?;
            let ok = metric_value(&m, "mrcp_lb_operator_destination_set_version")
                == Some(set.version as f64)
                && metric_value(&m, "mrcp_lb_operator_destinations") == Some(1.0)
                && metric_value(&m, "mrcp_lb_operator_proxies_in_sync") == Some(1.0);
            ok.then(|| m.clone()).ok_or(m)
        },
    )
    .await;
    assert!(
        text.contains("mrcp_lb_operator_push_latency_seconds_bucket{le=\"0.01\"}"),
        "{text}"
    );
    let count = metric_value(&text, "mrcp_lb_operator_push_latency_seconds_count").unwrap_or(0.0);
    assert!(count >= 1.0, "no push latency observed: {text}");
    assert_eq!(
        metric_value(&text, "mrcp_lb_operator_leader"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "mrcp_lb_operator_proxies"),
        Some(1.0),
        "{text}"
    );
    assert!(metric_value(&text, "mrcp_lb_operator_reconciles_total").unwrap_or(0.0) >= 1.0);
    assert!(
        metric_value(&text, "mrcp_lb_operator_pushes_total{result=\"ok\"}").unwrap_or(0.0) >= 1.0
    );
    let (code, _) = op.get("/nonexistent").await.unwrap();
    assert_eq!(code, 404);
}

// ---------------------------------------------------------------------------------------------
// 11. Proxies discovered with --proxy-selector

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_discovered_by_label_selector_get_the_set() {
    let env = TestEnv::new("discovery", 11).await;
    let second_ip = format!("127.0.4.{}", 100 + env.index);
    let pa = Proxy::start(&env, "proxy-a", 5060, 8081).await;
    let pb = Proxy::start_at(&env, "proxy-b", &second_ip, 5060, 8081).await;
    // The proxies' own pods: the operator pushes to <podIP>:--proxy-admin-port.
    let component = ("app.kubernetes.io/component", "proxy");
    for (name, ip) in [
        ("lb-proxy-0", env.ip.clone()),
        ("lb-proxy-1", second_ip.clone()),
    ] {
        env.create_pod(name, &[component], &[], false).await;
        env.set_pod_status(name, &ip, true).await;
    }
    let ns = env.ns.clone();
    let op = Operator::start(
        &env,
        "operator",
        8090,
        &[],
        &[
            "--proxy-selector",
            "app.kubernetes.io/component=proxy",
            "--proxy-namespace",
            &ns,
            "--proxy-admin-port",
            "8081",
        ],
    )
    .await;
    env.create_server("asr", server_spec("unimrcp", "pstn=100", 0))
        .await;
    env.create_pod("mrcp-0", &[APP], &[], false).await;
    env.set_pod_status("mrcp-0", &env.pod_ip(1), true).await;
    for p in [&pa, &pb] {
        wait_state(p, &uri(&env.pod_ip(1)), State::Up, 10 * SEC).await;
        assert_eq!(p.readyz().await, 200, "{}", p.name);
    }
    // The proxy pods themselves are not destinations.
    assert_eq!(live(&pa.destinations().await).len(), 1);
    eventually("2 proxies known and in sync", 10 * SEC, POLL, async || {
        let m = op.metrics().await?;
        let known = metric_value(&m, "mrcp_lb_operator_proxies");
        let in_sync = metric_value(&m, "mrcp_lb_operator_proxies_in_sync");
        (known == Some(2.0) && in_sync == Some(2.0))
            .then_some(())
            .ok_or(format!("proxies={known:?} in_sync={in_sync:?}"))
    })
    .await;

    // A proxy pod that goes away gets no more pushes.
    env.delete_pod("lb-proxy-1").await;
    eventually("1 proxy known", 10 * SEC, POLL, async || {
        let m = op.metrics().await?;
        let known = metric_value(&m, "mrcp_lb_operator_proxies");
        (known == Some(1.0))
            .then_some(())
            .ok_or(format!("proxies={known:?}"))
    })
    .await;
    env.create_pod("mrcp-1", &[APP], &[], false).await;
    env.set_pod_status("mrcp-1", &env.pod_ip(2), true).await;
    wait_state(&pa, &uri(&env.pod_ip(2)), State::Up, 5 * SEC).await;
    tokio::time::sleep(3 * SEC).await; // more than a resync period
    let b = pb.destinations().await;
    assert!(
        by_uri(&b, &uri(&env.pod_ip(2))).is_none(),
        "a proxy whose pod is gone still gets pushes: {}",
        describe(&b)
    );
}

// ---------------------------------------------------------------------------------------------
// 12. SIGTERM while the caches are still syncing (API server unreachable)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_before_the_caches_sync_exits_cleanly() {
    // Shares 127.0.4.9 with the health test, on other ports.
    let env = TestEnv::new("early-stop", 9).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let kc = std::fs::read_to_string(&env.cp.kubeconfig).unwrap();
    let server_line = kc
        .lines()
        .find(|l| l.trim_start().starts_with("server: "))
        .unwrap()
        .to_string();
    let bad_path = env.dir.join("unreachable.kubeconfig");
    std::fs::write(
        &bad_path,
        kc.replace(
            &server_line,
            &format!("    server: https://127.0.0.1:{closed}"),
        ),
    )
    .unwrap();
    let mut op =
        Operator::start_with_kubeconfig(&env, "op-unsynced", 8095, &[], &[], &bad_path).await;
    tokio::time::sleep(SEC).await;
    assert_eq!(op.get("/readyz").await.unwrap().0, 503);
    op.guard.signal("TERM");
    let st = op.guard.wait_exit(5 * SEC).await;
    assert!(
        st.is_some_and(|s| s.success()),
        "a stop requested with SIGTERM before the caches synced must exit 0, got {st:?}; log:\n{}",
        tail(&op.log, 5)
    );
}

// ---------------------------------------------------------------------------------------------
// 13. The proxy replicas' cluster addresses are every proxy's peers

/// The `addr` of every peer a proxy's `GET /v1/cluster` lists, sorted, without the proxy's own
/// `own` address (a proxy may list itself or skip itself: both are fine).
async fn cluster_peers(proxy: &Proxy, own: &str) -> Result<Vec<String>, String> {
    let (code, body) = proxy.get("/v1/cluster").await?;
    if code != 200 {
        return Err(format!(
            "{}: /v1/cluster answered {code}: {body}",
            proxy.name
        ));
    }
    let v: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| format!("{}: /v1/cluster: {e} in {body}", proxy.name))?;
    let peers = v["peers"]
        .as_array()
        .ok_or_else(|| format!("{}: /v1/cluster has no peers array: {body}", proxy.name))?;
    let mut addrs = Vec::new();
    for p in peers {
        let a = p["addr"]
            .as_str()
            .ok_or_else(|| format!("{}: /v1/cluster peer without addr: {body}", proxy.name))?;
        if a != own {
            addrs.push(a.to_string());
        }
    }
    addrs.sort();
    Ok(addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_pods_are_the_cluster_peers_of_every_proxy() {
    let env = TestEnv::new("peers", 13).await;
    let second_ip = format!("127.0.4.{}", 100 + env.index);
    let (a_addr, b_addr) = (format!("{}:7070", env.ip), format!("{second_ip}:7070"));
    let cluster = |ip: &str| {
        format!("cluster:\n  listen: {ip}:7070\n  heartbeat: 200ms\n  peerTimeout: 1s\n")
    };
    let pa = Proxy::start_with(&env, "proxy-a", &env.ip, 5060, 8081, &cluster(&env.ip)).await;
    let pb = Proxy::start_with(
        &env,
        "proxy-b",
        &second_ip,
        5060,
        8081,
        &cluster(&second_ip),
    )
    .await;
    // The proxies' own pods, discovered by label; a finalizer holds lb-proxy-1 while it
    // terminates, as a kubelet does while the replica drains.
    let component = ("app.kubernetes.io/component", "proxy");
    for (name, ip, hold) in [
        ("lb-proxy-0", env.ip.clone(), false),
        ("lb-proxy-1", second_ip.clone(), true),
    ] {
        env.create_pod(name, &[component], &[], hold).await;
        env.set_pod_status(name, &ip, true).await;
    }
    let ns = env.ns.clone();
    let op = Operator::start(
        &env,
        "operator",
        8090,
        &[],
        &[
            "--proxy-selector",
            "app.kubernetes.io/component=proxy",
            "--proxy-namespace",
            &ns,
            "--proxy-admin-port",
            "8081",
            "--proxy-cluster-port",
            "7070",
        ],
    )
    .await;

    // What the operator pushes: both replicas at <podIP>:7070, sorted.
    let pushed = |want: &[&str]| {
        let op = &op;
        let want = want.join(",");
        async move {
            let line = op
                .log_lines("proxy cluster peers")
                .pop()
                .ok_or("no \"proxy cluster peers\" log line yet")?;
            let n = op.metric("mrcp_lb_operator_cluster_peers").await?;
            (line.contains(&format!("peers={want}")) && n == Some(want.split(',').count() as f64))
                .then_some(())
                .ok_or(format!("gauge {n:?}, last line: {line}"))
        }
    };
    eventually(
        "the operator pushes both peers",
        10 * SEC,
        POLL,
        async || pushed(&[&a_addr, &b_addr]).await,
    )
    .await;
    // What every proxy holds.
    for (p, own, other) in [(&pa, &a_addr, &b_addr), (&pb, &b_addr, &a_addr)] {
        eventually(
            &format!("{} peers: {other}", p.name),
            10 * SEC,
            POLL,
            async || {
                let got = cluster_peers(p, own).await?;
                (got == [other.as_str()])
                    .then_some(())
                    .ok_or(format!("{got:?}"))
            },
        )
        .await;
    }
    let v1 = pa.destinations().await.version;
    assert_eq!(pb.destinations().await.version, v1);

    // Terminating: no more pushes to it, but still a peer (it drains calls the others must
    // count): the set does not change.
    env.delete_pod("lb-proxy-1").await;
    eventually("1 proxy to push to", 10 * SEC, POLL, async || {
        let known = op.metric("mrcp_lb_operator_proxies").await?;
        (known == Some(1.0))
            .then_some(())
            .ok_or(format!("proxies={known:?}"))
    })
    .await;
    tokio::time::sleep(3 * SEC).await; // more than a resync period
    pushed(&[&a_addr, &b_addr]).await.unwrap();
    assert_eq!(
        cluster_peers(&pa, &a_addr).await.unwrap(),
        [b_addr.as_str()]
    );
    assert_eq!(
        pa.destinations().await.version,
        v1,
        "a terminating proxy pod changed the set"
    );

    // Gone: the list shrinks, in a new version.
    env.remove_finalizers("lb-proxy-1").await;
    eventually("the operator pushes one peer", 10 * SEC, POLL, async || {
        pushed(&[&a_addr]).await
    })
    .await;
    eventually(
        "proxy-a: no other peer, newer version",
        10 * SEC,
        POLL,
        async || {
            let got = cluster_peers(&pa, &a_addr).await?;
            let v = pa.try_destinations().await?.version;
            (got.is_empty() && v > v1)
                .then_some(())
                .ok_or(format!("peers {got:?}, version {v} (was {v1})"))
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 14. Per-resource capacity and load in the status, summed over two proxy replicas

/// The `(name, capacity, load)` of each resource in an MrcpServer's status, the load summary
/// and `loadFrom` (proxies, answered).
async fn resource_status(
    env: &TestEnv,
    name: &str,
) -> Result<(Vec<(String, u64, Option<u64>)>, String, Option<(u32, u32)>), String> {
    let s = env.servers().get(name).await.map_err(|e| e.to_string())?;
    let st = s.status.ok_or("no status yet")?;
    Ok((
        st.resources
            .iter()
            .map(|r| (r.name.clone(), r.capacity, r.load))
            .collect(),
        st.load_summary,
        st.load_from.map(|f| (f.proxies, f.answered)),
    ))
}

/// Waits until the MrcpServer's `loadSummary` and `loadFrom` are as wanted; returns the
/// resources.
async fn wait_load(
    env: &TestEnv,
    name: &str,
    summary: &str,
    from: (u32, u32),
    timeout: Duration,
) -> Vec<(String, u64, Option<u64>)> {
    eventually(
        &format!("{name}: loadSummary {summary}, loadFrom {from:?}"),
        timeout,
        POLL,
        async || {
            let (res, got, got_from) = resource_status(env, name).await?;
            (got == summary && got_from == Some(from))
                .then_some(res.clone())
                .ok_or(format!("{got} from {got_from:?}: {res:?}"))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_load_per_mrcp_resource_summed_over_proxy_replicas() {
    let env = TestEnv::new("resource-load", 14).await;
    // What this test builds is examples/two-pools.yaml: the API server takes the example as
    // written (StatefulSets, Services and MrcpServers, against the CRD's schema).
    let example = repo().join("examples/two-pools.yaml");
    let applied = env.kubectl(&[
        "apply",
        "--dry-run=server",
        "-n",
        &env.ns,
        "-f",
        example.to_str().unwrap(),
    ]);
    assert_eq!(applied.matches("(server dry run)").count(), 6, "{applied}");
    let second_ip = format!("127.0.4.{}", 100 + env.index);
    // Two replicas sharing load (their clusterLoad counts both), each with a listener per
    // MRCP resource: INVITEs to :5060 take speechrecog, to :5062 speechsynth.
    let proxy = async |name: &str, ip: &str| {
        let listeners = format!(
            "  - {{address: \"udp:{ip}:5060\", resources: [speechrecog]}}\n  \
               - {{address: \"udp:{ip}:5062\", resources: [speechsynth]}}\n"
        );
        let cluster =
            format!("cluster:\n  listen: {ip}:7070\n  heartbeat: 200ms\n  peerTimeout: 1s\n");
        Proxy::start_with_listeners(&env, name, ip, 5060, 8081, &listeners, &cluster).await
    };
    let pa = proxy("proxy-a", &env.ip).await;
    let pb = proxy("proxy-b", &second_ip).await;
    let component = ("app.kubernetes.io/component", "proxy");
    for (name, ip) in [("lb-proxy-0", &env.ip), ("lb-proxy-1", &second_ip)] {
        env.create_pod(name, &[component], &[], false).await;
        env.set_pod_status(name, ip, true).await;
    }
    // An ASR-only pool and a TTS-only pool, as in examples/two-pools.yaml; asr-1 is not Ready.
    let (asr_ip, tts_ip) = (env.pod_ip(1), env.pod_ip(3));
    let uas = async |name: &str, ip: &str| {
        Sipp::uas(&env, name)
            .at(format!("{ip}:8060").parse().unwrap())
            .start_async()
            .await
    };
    let asr_server = uas("uas-asr", &asr_ip).await;
    let tts_server = uas("uas-tts", &tts_ip).await;
    env.create_server("asr", server_spec("asr", "speechrecog=10", 0))
        .await;
    env.create_server("tts", server_spec("tts", "speechsynth=10", 0))
        .await;
    for (pod, app, resources, ip, ready) in [
        ("asr-0", "asr", "speechrecog=50", asr_ip.clone(), true),
        ("asr-1", "asr", "speechrecog=50", env.pod_ip(2), false),
        ("tts-0", "tts", "speechsynth=200", tts_ip.clone(), true),
    ] {
        env.create_pod(pod, &[("app", app)], &[(RESOURCES, resources)], false)
            .await;
        env.set_pod_status(pod, &ip, ready).await;
    }
    let ns = env.ns.clone();
    let op = Operator::start(
        &env,
        "operator",
        8090,
        &[],
        &[
            "--proxy-selector",
            "app.kubernetes.io/component=proxy",
            "--proxy-namespace",
            &ns,
            "--proxy-admin-port",
            "8081",
            "--proxy-cluster-port",
            "7070",
            "--load-interval-seconds",
            "2",
        ],
    )
    .await;
    for p in [&pa, &pb] {
        wait_state(p, &uri(&asr_ip), State::Up, 10 * SEC).await;
        wait_state(p, &uri(&tts_ip), State::Up, 10 * SEC).await;
    }
    // No session yet: loads known and zero; capacity of the Ready pods only.
    let res = wait_load(&env, "asr", "speechrecog=0/50", (2, 2), 10 * SEC).await;
    assert_eq!(res, [("speechrecog".to_string(), 50, Some(0))]);
    wait_load(&env, "tts", "speechsynth=0/200", (2, 2), 10 * SEC).await;

    // Two ASR sessions and one TTS session through proxy-a, one ASR session through proxy-b.
    let hold = ms(40_000);
    let uac = |name: &str, port: u16, to: std::net::SocketAddr, n: u64| {
        Sipp::uac(&env, name)
            .port(port)
            .to(to)
            .rate(20)
            .calls_together(n)
            .hold(hold)
            .timeout(60 * SEC)
            .start()
    };
    let t_calls = Instant::now();
    let tts_addr: std::net::SocketAddr = format!("{}:5062", env.ip).parse().unwrap();
    let asr_a = uac("asr-a", 5070, pa.sip, 2);
    let tts_a = uac("tts-a", 5072, tts_addr, 1);
    let asr_b = uac("asr-b", 5074, pb.sip, 1);
    // Each replica's own load and the cluster load it routes on.
    let own_and_cluster = async |p: &Proxy, ip: &str, r: &str| -> Result<(u32, u32), String> {
        let set = p.try_destinations().await?;
        let d = by_uri(&set, &uri(ip)).ok_or(describe(&set))?;
        let x = d
            .resources
            .iter()
            .find(|x| x.name == r)
            .ok_or(describe(&set))?;
        Ok((x.load, x.cluster_load))
    };
    eventually(
        "the replicas share their loads",
        15 * SEC,
        POLL,
        async || {
            let a = own_and_cluster(&pa, &asr_ip, "speechrecog").await?;
            let b = own_and_cluster(&pb, &asr_ip, "speechrecog").await?;
            let t = own_and_cluster(&pa, &tts_ip, "speechsynth").await?;
            (a == (2, 3) && b == (1, 3) && t == (1, 1))
                .then_some(())
                .ok_or(format!("asr a {a:?} b {b:?}, tts a {t:?}"))
        },
    )
    .await;
    // 3, not 6: each replica's own load is summed, not the cluster load both report.
    let res = wait_load(&env, "asr", "speechrecog=3/50", (2, 2), 10 * SEC).await;
    assert_eq!(res, [("speechrecog".to_string(), 50, Some(3))]);
    // The operator's per-MrcpServer series say the same.
    let series = |name: &str| {
        format!(
            "{name}{{mrcpserver=\"asr\",namespace=\"{}\",resource=\"speechrecog\"}}",
            env.ns
        )
    };
    eventually("mrcp_lb_server_load 3", 5 * SEC, POLL, async || {
        let v = op.metric(&series("mrcp_lb_server_load")).await?;
        (v == Some(3.0)).then_some(()).ok_or(format!("{v:?}"))
    })
    .await;
    assert_eq!(
        op.metric(&series("mrcp_lb_server_utilization"))
            .await
            .unwrap(),
        Some(0.06)
    );
    wait_load(&env, "tts", "speechsynth=1/200", (2, 2), 10 * SEC).await;
    eprintln!(
        "[resource-load] status shows the sessions {:.1} s after the calls started",
        t_calls.elapsed().as_secs_f64()
    );
    // Loads read every 2 s that do not change write nothing.
    let version = async || {
        let s = env.servers().get("asr").await.unwrap();
        s.metadata.resource_version.unwrap_or_default()
    };
    let before = version().await;
    tokio::time::sleep(6 * SEC).await;
    assert_eq!(
        version().await,
        before,
        "the status was rewritten with nothing changed"
    );
    let table = env.kubectl(&["get", "mrcp", "-n", &env.ns, "-o", "wide"]);
    eprintln!("[resource-load] kubectl get mrcp -o wide:\n{table}");
    let rows = table_rows(&table);
    for want in [
        ["asr", "1", "3", "speechrecog=50", "6%", "speechrecog=3/50"],
        [
            "tts",
            "1",
            "1",
            "speechsynth=200",
            "1%",
            "speechsynth=1/200",
        ],
    ] {
        let got: Vec<Vec<&str>> = rows
            .iter()
            .map(|r| {
                ["NAME", "READY", "ACTIVE", "CAPACITY", "UTILIZATION", "LOAD"]
                    .iter()
                    .map(|c| r.get(*c).map_or("", String::as_str))
                    .collect()
            })
            .collect();
        assert!(got.iter().any(|g| *g == want), "no row {want:?}: {table}");
    }

    // proxy-b stops answering (SIGSTOP: its admin API accepts connections and never
    // answers). Reconciliation goes on meanwhile: asr-1 turning Ready shows at once.
    pb.guard.signal("STOP");
    let t_stop = Instant::now();
    env.set_pod_status("asr-1", &env.pod_ip(2), true).await;
    eventually("asr-1 Ready in the status", 10 * SEC, POLL, async || {
        let s = env.servers().get("asr").await.map_err(|e| e.to_string())?;
        let st = s.status.ok_or("no status")?;
        (st.ready_destinations == 2)
            .then_some(())
            .ok_or(format!("{st:?}"))
    })
    .await;
    let took = t_stop.elapsed();
    eprintln!(
        "[resource-load] a pod turning Ready showed in the status after {:.0} ms with a \
         replica not answering",
        took.as_secs_f64() * 1000.0
    );
    assert!(
        took < lb_operator::loads::READ_TIMEOUT,
        "the status waited on the silent replica: {took:?}"
    );
    // Its last answer still counts after a read failed (for three intervals: 6 s here)...
    eventually("a failed load read", 10 * SEC, POLL, async || {
        let n = op
            .metric("mrcp_lb_operator_load_reads_total{result=\"error\"}")
            .await?;
        (n >= Some(1.0)).then_some(()).ok_or(format!("{n:?}"))
    })
    .await;
    let failed = t_stop.elapsed();
    let (res, summary, from) = resource_status(&env, "asr").await.unwrap();
    assert_eq!(
        (summary.as_str(), from),
        ("speechrecog=3/100", Some((2, 2))),
        "{failed:?} after the stop, a read failed and the last answer no longer counts: {res:?}"
    );
    // ... then it drops out of the sum.
    let res = wait_load(&env, "asr", "speechrecog=2/100", (2, 1), 15 * SEC).await;
    assert_eq!(res, [("speechrecog".to_string(), 100, Some(2))]);
    eprintln!(
        "[resource-load] first failed read {:.1} s after the stop, the silent replica left \
         the sum after {:.1} s",
        failed.as_secs_f64(),
        t_stop.elapsed().as_secs_f64()
    );
    pb.guard.signal("CONT");
    wait_load(&env, "asr", "speechrecog=3/100", (2, 2), 15 * SEC).await;

    // Calls end: loads back to 0.
    for (c, n) in [(asr_a, 2), (tts_a, 1), (asr_b, 1)] {
        c.wait_async(60 * SEC).await.assert_all_ok(n);
    }
    wait_load(&env, "asr", "speechrecog=0/100", (2, 2), 15 * SEC).await;
    wait_load(&env, "tts", "speechsynth=0/200", (2, 2), 15 * SEC).await;
    for srv in [asr_server, tts_server] {
        let r = srv.stop_async().await;
        assert_eq!(r.stat("FailedCall(C)"), 0, "{}", r.summary());
    }
}

// ---------------------------------------------------------------------------------------------
// 15. Live utilization, the probe view, Events and per-MrcpServer metrics

/// `kubectl get mrcp` has the columns the issue asks for, in order.
fn assert_columns(table: &str) {
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "READY",
            "DOWN",
            "DRAINING",
            "ACTIVE",
            "CAPACITY",
            "UTILIZATION",
            "AGE"
        ],
        "{table}"
    );
}

/// `kubectl get` output as one map per row, column name → value.
fn table_rows(table: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    lines
        .map(|l| {
            header
                .iter()
                .map(|h| h.to_string())
                .zip(l.split_whitespace().map(str::to_string))
                .collect()
        })
        .collect()
}

/// The Events on an MrcpServer: (type, reason, note), oldest first.
async fn server_events(env: &TestEnv, server: &str) -> Vec<(String, String, String)> {
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    let mut list = events
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    list.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
    list.iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("MrcpServer") && r.name.as_deref() == Some(server)
            })
        })
        .map(|e| {
            (
                e.type_.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.note.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// Waits for an Event on `server` with `reason` whose note contains `needle`; returns its
/// type and note.
async fn wait_event(env: &TestEnv, server: &str, reason: &str, needle: &str) -> (String, String) {
    eventually(
        &format!("a {reason} Event on {server} saying {needle:?}"),
        15 * SEC,
        POLL,
        async || {
            let all = server_events(env, server).await;
            all.iter()
                .find(|(_, r, n)| r == reason && n.contains(needle))
                .map(|(t, _, n)| (t.clone(), n.clone()))
                .ok_or(format!("{all:?}"))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utilization_probe_view_events_and_server_metrics() {
    let env = TestEnv::new("utilization", 15).await;
    let probing = "probing:\n  interval: 300ms\n  timeout: 300ms\n  failureThreshold: 2\n  \
                   successThreshold: 1\n";
    // The proxy's reads need the admin token (admin.protectReads): the operator's load reads
    // carry it.
    let token_file = env.subdir("secret").join("token");
    std::fs::write(&token_file, "r34d-t0k3n\n").unwrap();
    let proxy = Proxy::start_protected(&env, "proxy", 5060, 8081, &token_file, probing).await;
    let (code, _) = env.get(proxy.admin, "/v1/destinations").await.unwrap();
    assert_eq!(code, 401, "reads need the token");
    let op = Operator::start(
        &env,
        "operator",
        8090,
        &[&proxy],
        &[
            "--load-interval-seconds",
            "1",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    let (ip0, ip1) = (env.pod_ip(1), env.pod_ip(2));
    // asr-0 answers OPTIONS; asr-1 is Ready in Kubernetes but nothing answers at its IP.
    let uas0 = Sipp::uas(&env, "uas-0")
        .at(format!("{ip0}:8060").parse().unwrap())
        .start_async()
        .await;
    env.create_server("asr", server_spec("asr", "pstn=4", 2))
        .await;
    // asr-0 is held by a finalizer when deleted, as a kubelet's grace period holds a pod.
    env.create_pod("asr-0", &[("app", "asr")], &[], true).await;
    env.create_pod("asr-1", &[("app", "asr")], &[], false).await;
    env.set_pod_status("asr-0", &ip0, true).await;
    env.set_pod_status("asr-1", &ip1, true).await;

    let status = async || -> Result<lb_operator::crd::MrcpServerStatus, String> {
        let s = env.servers().get("asr").await.map_err(|e| e.to_string())?;
        s.status.ok_or("no status yet".to_string())
    };
    let counts = |st: &lb_operator::crd::MrcpServerStatus| {
        (
            st.ready_destinations,
            st.down_destinations,
            st.draining_destinations,
        )
    };
    // The probe view: asr-1 is Ready, the proxy's probes call it down.
    let st = eventually(
        "asr-1 called down by the probes",
        15 * SEC,
        POLL,
        async || {
            let st = status().await?;
            let asr1 = st.destinations.iter().find(|d| d.pod == "asr-1");
            (counts(&st) == (1, 1, 0)
                && asr1.is_some_and(|d| {
                    d.state == "active" && d.proxy_state.as_deref() == Some("down")
                }))
            .then_some(st.clone())
            .ok_or(format!("{st:?}"))
        },
    )
    .await;
    let asr1 = st.destinations.iter().find(|d| d.pod == "asr-1").unwrap();
    assert_eq!(asr1.proxy_reason.as_deref(), Some("probe failures"));
    assert_eq!(
        st.capacity_summary, "pstn=4",
        "a called-down pod adds no capacity"
    );
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "True");
    assert!(
        ready
            .message
            .contains("the proxies call down asr-1 (probe failures)"),
        "{ready:?}"
    );
    for pod in ["asr-0", "asr-1"] {
        let (t, _) = wait_event(&env, "asr", "Registered", &format!("pod {pod} ")).await;
        assert_eq!(t, "Normal");
    }
    let (t, note) = wait_event(&env, "asr", "ProbeDown", "pod asr-1").await;
    assert_eq!(t, "Warning");
    assert!(note.contains("probe failures"), "{note}");

    // Two held calls: 2 of 4 on the one ready pod.
    let t_calls = Instant::now();
    let calls = Sipp::uac(&env, "uac")
        .port(5070)
        .to(proxy.sip)
        .rate(20)
        .calls_together(2)
        .hold(ms(20_000))
        .timeout(60 * SEC)
        .start();
    // The text format lists labels by name.
    let labels = format!("mrcpserver=\"asr\",namespace=\"{}\"", env.ns);
    let utilization = format!("mrcp_lb_server_utilization{{{labels},resource=\"pstn\"}}");
    eventually("utilization 0.5 exported", 15 * SEC, POLL, async || {
        let u = op.metric(&utilization).await?;
        (u == Some(0.5)).then_some(()).ok_or(format!("{u:?}"))
    })
    .await;
    let to_metric = t_calls.elapsed();
    let st = eventually("status at 50%", 15 * SEC, POLL, async || {
        let st = status().await?;
        (st.utilization.as_deref() == Some("50%") && st.active_sessions == Some(2))
            .then_some(st.clone())
            .ok_or(format!("{st:?}"))
    })
    .await;
    let to_status = t_calls.elapsed();
    eprintln!(
        "[utilization] calls started → metric {:.1} s, → status {:.1} s (load read every 1 s)",
        to_metric.as_secs_f64(),
        to_status.as_secs_f64()
    );
    let pstn = st.resources.iter().find(|r| r.name == "pstn").unwrap();
    assert_eq!(
        (pstn.capacity, pstn.load, pstn.utilization_percent),
        (4, Some(2), Some(50))
    );
    for (series, want) in [
        (format!("mrcp_lb_server_active_sessions{{{labels}}}"), 2.0),
        (
            format!("mrcp_lb_server_load{{{labels},resource=\"pstn\"}}"),
            2.0,
        ),
        (
            format!("mrcp_lb_server_capacity{{{labels},resource=\"pstn\"}}"),
            4.0,
        ),
        (
            format!("mrcp_lb_server_destinations{{{labels},state=\"ready\"}}"),
            1.0,
        ),
        (
            format!("mrcp_lb_server_destinations{{{labels},state=\"down\"}}"),
            1.0,
        ),
        (
            format!("mrcp_lb_server_destinations{{{labels},state=\"draining\"}}"),
            0.0,
        ),
    ] {
        assert_eq!(op.metric(&series).await.unwrap(), Some(want), "{series}");
    }
    let table = env.kubectl(&["get", "mrcp", "-n", &env.ns]);
    eprintln!("[utilization] kubectl get mrcp:\n{table}");
    assert_columns(&table);
    let rows = table_rows(&table);
    let row = rows.iter().find(|r| r["NAME"] == "asr").expect("asr row");
    let got: Vec<&str> = [
        "READY",
        "DOWN",
        "DRAINING",
        "ACTIVE",
        "CAPACITY",
        "UTILIZATION",
    ]
    .iter()
    .map(|c| row[*c].as_str())
    .collect();
    assert_eq!(got, ["1", "1", "0", "2", "pstn=4", "50%"], "{table}");

    // asr-1's server comes up: the probes call it up, its capacity counts.
    let uas1 = Sipp::uas(&env, "uas-1")
        .at(format!("{ip1}:8060").parse().unwrap())
        .start_async()
        .await;
    let (t, _) = wait_event(&env, "asr", "ProbeUp", "pod asr-1").await;
    assert_eq!(t, "Normal");
    eventually("asr-1 ready, 2 of 8", 15 * SEC, POLL, async || {
        let st = status().await?;
        (counts(&st) == (2, 0, 0) && st.utilization.as_deref() == Some("25%"))
            .then_some(())
            .ok_or(format!("{st:?}"))
    })
    .await;
    eventually("utilization 0.25 exported", 15 * SEC, POLL, async || {
        let u = op.metric(&utilization).await?;
        (u == Some(0.25)).then_some(()).ok_or(format!("{u:?}"))
    })
    .await;

    // A second MrcpServer selecting the same pods: its status names the one that holds them.
    env.create_server("asr-copy", server_spec("asr", "pstn=4", 2))
        .await;
    let copy = eventually("asr-copy's condition", 15 * SEC, POLL, async || {
        let s = env
            .servers()
            .get("asr-copy")
            .await
            .map_err(|e| e.to_string())?;
        let c = s
            .status
            .and_then(|st| st.conditions.into_iter().find(|c| c.type_ == "Ready"))
            .ok_or("no condition yet")?;
        (c.reason == "PodsHeldByAnotherServer")
            .then_some(c.clone())
            .ok_or(format!("{c:?}"))
    })
    .await;
    assert_eq!(copy.status, "False");
    let holder = format!("MrcpServer {}/asr", env.ns);
    assert!(copy.message.contains(&holder), "{copy:?}");
    let (t, note) = wait_event(&env, "asr-copy", "PodsHeldByAnotherServer", &holder).await;
    assert_eq!(t, "Warning", "{note}");

    // asr-0 terminates with its 2 sessions open (it holds both: asr-1 was down when they
    // started): Draining, with its sessions.
    env.delete_pod("asr-0").await;
    let (t, note) = wait_event(&env, "asr", "Draining", "pod asr-0").await;
    assert_eq!(t, "Normal");
    assert!(note.contains("2 open sessions"), "{note}");
    let st = status().await.unwrap();
    assert_eq!(counts(&st), (1, 0, 1), "{st:?}");
    assert_eq!(st.active_sessions, Some(2));
    calls.wait_async(60 * SEC).await.assert_all_ok(2);
    eventually("no session left", 15 * SEC, POLL, async || {
        let st = status().await?;
        (st.active_sessions == Some(0))
            .then_some(())
            .ok_or(format!("{st:?}"))
    })
    .await;

    // The proxy stops answering (SIGSTOP): pushes time out, a Warning on every MrcpServer.
    proxy.guard.signal("STOP");
    env.remove_finalizers("asr-0").await;
    let (t, note) = wait_event(&env, "asr", "PushFailed", &proxy.url()).await;
    assert_eq!(t, "Warning", "{note}");
    wait_event(&env, "asr-copy", "PushFailed", &proxy.url()).await;
    proxy.guard.signal("CONT");
    let (t, _) = wait_event(&env, "asr", "Removed", "pod asr-0").await;
    assert_eq!(t, "Normal");
    // Each change said once.
    let all = server_events(&env, "asr").await;
    for reason in ["ProbeDown", "ProbeUp", "Draining", "Removed"] {
        let n: i32 = all.iter().filter(|(_, r, _)| r == reason).map(|_| 1).sum();
        assert_eq!(n, 1, "{reason}: {all:?}");
    }
    for srv in [uas0, uas1] {
        let r = srv.stop_async().await;
        assert_eq!(r.stat("FailedCall(C)"), 0, "{}", r.summary());
    }
}
