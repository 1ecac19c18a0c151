//! Drain before stop (`GET /v1/destinations/wait-drained`), with sipp as the peers: a server
//! whose pod is terminating (its destination `draining`) keeps receiving the BYEs of its open
//! calls, and a wait started while they are open returns when the last one ends; a wait whose
//! timeout passes first answers 504 with what is still open; bad parameters get a 400 that
//! names them; with a `cluster`, the replica the request reaches answers for its peers' calls;
//! an open wait does not delay the proxy's exit on SIGTERM.
//!
//! Needs `sipp` (Debian package `sip-tester`). Run: `cargo test -p lb-proxy --test sipp_drain`.
//! Addresses: 127.0.10.1-6.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use lb_api::admin::{DrainStatus, ErrorBody};
use mrcp_lb_test_support::*;
use serde_json::json;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

/// The destination id the operator gives pod `speech/unimrcp-0`.
const POD_ID: &str = "speech/unimrcp-0@7460ce94";

/// Pushes the set the operator would: the pod's destination, in `state`.
fn push_pod(admin: SocketAddr, ip: &str, version: u64, state: &str) {
    let set = json!({
        "version": version,
        "destinations": [{
            "id": POD_ID, "uri": format!("sip:{ip}:{SERVER1_PORT}"),
            "resources": "pstn=10", "probeMode": 0, "state": state,
        }]
    });
    let r = put_destinations(admin, None, &set.to_string());
    assert_eq!(r.code, 200, "PUT {state}: {}", r.body);
}

/// `GET /v1/destinations/wait-drained?{query}`: the status code, the body, how long it took.
fn wait_drained(admin: SocketAddr, query: &str) -> (u16, String, Duration) {
    let t = Instant::now();
    let path = format!("/v1/destinations/wait-drained?{query}");
    let (code, body) = http_get(admin, &path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (code, body, t.elapsed())
}

fn drain_status(body: &str) -> DrainStatus {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not a DrainStatus ({e}): {body}"))
}

#[test]
fn the_wait_returns_when_the_last_bye_of_a_draining_pod_went_through() {
    let env = test_env!("drain_wait", "127.0.10.1");
    let (proxy, [s1]) = Sandbox::new(&env)
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=10"), "uas.xml")
        .start();
    let admin = proxy.admin;
    push_pod(admin, &env.ip, 100, "active");

    // Three calls of 2.5 s, 100 ms apart: the caller hangs up each one with BYE. (The test's
    // HTTP client gives up after 5 s: the wait must fit.)
    let calls = Sipp::uac(&env, "calls")
        .calls(3)
        .rate(10)
        .limit(3)
        .hold(ms(2500))
        .start();
    wait_for(
        "the 3 calls to be open",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || (proxy.stats().active == 3).then_some(()),
    );
    // The pod is terminating: the operator pushes it draining; its preStop hook waits.
    push_pod(admin, &env.ip, 101, "draining");
    let waiter = thread::spawn(move || wait_drained(admin, "pod=speech/unimrcp-0&timeout=60s"));

    // Watch the load: the moment it reaches zero is when the last BYE went through.
    let zero_at = wait_for(
        "the pod's load to reach zero",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            let d = destination_status(admin, POD_ID);
            if d.open_calls > 0 {
                assert!(!waiter.is_finished(), "the wait returned with calls open");
                None
            } else {
                Some(Instant::now())
            }
        },
    );
    let (code, body, took) = waiter.join().unwrap();
    let returned_after_zero = zero_at.elapsed();
    eprintln!("wait-drained {code} after {took:?}, {returned_after_zero:?} after zero: {body}");
    assert_eq!(code, 200, "{body}");
    let s = drain_status(&body);
    assert!(
        s.drained && s.known && !s.taking_calls && !s.cluster,
        "{s:?}"
    );
    assert_eq!((s.open_sessions, s.local_sessions), (0, 0));
    assert_eq!(s.destinations, vec![POD_ID.to_string()]);
    assert_eq!(s.asked, "pod=speech/unimrcp-0");
    assert!(
        took > Duration::from_millis(1500),
        "returned too soon: {took:?}"
    );
    // The core is asked every 200 ms; a little more for scheduling and HTTP.
    assert!(
        returned_after_zero < Duration::from_millis(600),
        "returned {returned_after_zero:?} after the last call ended"
    );

    let calls = calls.wait(Duration::from_secs(15));
    eprintln!("{}", calls.summary());
    let s1 = s1.drain();
    eprintln!("{}", s1.summary());
    calls.assert_all_ok(3);
    assert_server_clean(&s1);
    assert_eq!(
        (s1.invites(), s1.count("BYE_Recv")),
        (3, 3),
        "the draining server received every BYE"
    );

    // Drained now: a second wait answers at once.
    let (code, body, took) = wait_drained(admin, "pod=speech/unimrcp-0");
    assert_eq!(code, 200, "{body}");
    assert!(took < Duration::from_millis(500), "{took:?}");
}

#[test]
fn a_wait_whose_timeout_passes_answers_504_with_what_is_open() {
    let env = test_env!("drain_timeout", "127.0.10.2");
    let (proxy, [s1]) = Sandbox::new(&env)
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=10"), "uas.xml")
        .start();
    let admin = proxy.admin;
    push_pod(admin, &env.ip, 101, "active");
    let calls = Sipp::uac(&env, "calls")
        .calls(1)
        .limit(1)
        .hold(ms(3000))
        .start();
    wait_for(
        "the call to be open",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || (proxy.stats().active == 1).then_some(()),
    );
    push_pod(admin, &env.ip, 102, "draining");
    let (code, body, took) = wait_drained(admin, "id=speech%2Funimrcp-0%407460ce94&timeout=1500ms");
    eprintln!("wait-drained {code} after {took:?}: {body}");
    assert_eq!(code, 504, "{body}");
    let s = drain_status(&body);
    assert!(!s.drained && s.known, "{s:?}");
    assert_eq!(s.open_sessions, 1);
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert!(s.waited_seconds >= 1.5, "{s:?}");

    // A pod this proxy never knew has nothing open through it: drained at once.
    let (code, body, _) = wait_drained(admin, "pod=speech/unimrcp-1&timeout=0");
    assert_eq!(code, 200, "a pod nobody knows has nothing open: {body}");
    assert!(!drain_status(&body).known);

    let calls = calls.wait(Duration::from_secs(15));
    calls.assert_all_ok(1);
    assert_server_clean(&s1.drain());
}

#[test]
fn bad_parameters_are_named() {
    let env = test_env!("drain_params", "127.0.10.3");
    let (proxy, []) = Sandbox::new(&env)
        .dest(Dest::udp(1, SERVER1_PORT, "pstn=10"))
        .start();
    for (query, field, says) in [
        ("", "pod", "pod=NAMESPACE/NAME"),
        ("pod=unimrcp-0", "pod", "NAMESPACE/NAME"),
        ("pod=Speech/unimrcp-0", "pod", "not a Kubernetes name"),
        ("pod=speech/unimrcp-0&timeout=2d", "timeout", "\"2d\""),
        (
            "pod=speech/unimrcp-0&timeout=2h",
            "timeout",
            "at most 3600s",
        ),
        ("pod=speech/unimrcp-0&id=1", "id", "twice"),
        (
            "pod=speech/unimrcp-0&timout=10s",
            "timout",
            "unknown parameter",
        ),
    ] {
        let (code, body, took) = wait_drained(proxy.admin, query);
        assert_eq!(code, 400, "{query}: {body}");
        assert!(
            took < Duration::from_millis(500),
            "{query}: answered at once"
        );
        let e: ErrorBody = serde_json::from_str(&body).unwrap();
        assert_eq!(e.field.as_deref(), Some(field), "{query}: {body}");
        assert!(e.error.contains(says), "{query}: {body}");
    }
    // By id, a destination of the config file: up, so not drained; 504 at timeout=0.
    let (code, body, _) = wait_drained(proxy.admin, "id=1&timeout=0");
    assert_eq!(code, 504, "{body}");
    assert!(drain_status(&body).taking_calls);
}

/// A replica at `ip` sharing load with `replicas`: the pod's destination (on `server_ip`) in
/// its file, probing off.
fn replica_config(ip: &str, replicas: &[&str], server_ip: &str) -> String {
    let peers: String = replicas
        .iter()
        .map(|r| format!("    - {r}:7070\n"))
        .collect();
    format!(
        "listeners:\n  - udp:{ip}:{PROXY_PORT}\n  - tcp:{ip}:{PROXY_PORT}\n\
         admin:\n  listen: {ip}:{ADMIN_PORT}\n\
         routing:\n  group: 1\n  resources: [pstn]\n  mode: absolute\n\
         cluster:\n  listen: {ip}:7070\n  name: replica-{ip}\n  heartbeat: 200ms\n  peerTimeout: 1s\n  peers:\n{peers}\
         destinations:\n  - id: \"{POD_ID}\"\n    group: 1\n    uri: sip:{server_ip}:{SERVER1_PORT}\n    resources: pstn=10\n    probeMode: 0\n"
    )
}

#[test]
fn with_a_cluster_one_replica_answers_for_the_calls_of_all() {
    let ips = ["127.0.10.4", "127.0.10.5"];
    let envs: Vec<TestEnv> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| test_env!(&format!("drain_cluster_{i}"), ip))
        .collect();
    let server = Sipp::uas(&envs[0], "server")
        .at(SocketAddr::new(ips[0].parse().unwrap(), SERVER1_PORT))
        .start();
    let proxies: Vec<Proxy> = envs
        .iter()
        .map(|e| Proxy::start(e, &replica_config(&e.ip, &ips, ips[0])))
        .collect();
    let (a, b) = (proxies[0].admin, proxies[1].admin);
    for admin in [a, b] {
        wait_for(
            "both replicas to share load",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || (get_json(admin, "/v1/cluster")["size"].as_u64() == Some(2)).then_some(()),
        );
    }

    // Two calls through A; B, which the preStop's request reaches, holds none of them.
    let calls = Sipp::uac(&envs[0], "calls")
        .calls(2)
        .rate(10)
        .limit(2)
        .hold(ms(2500))
        .start();
    wait_for(
        "B to see A's 2 calls",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || (destination_status(b, POD_ID).resources[0].cluster_load == 2).then_some(()),
    );
    for admin in [a, b] {
        push_pod(admin, ips[0], 100, "draining");
    }
    let (code, body, _) = wait_drained(b, "pod=speech/unimrcp-0&timeout=0");
    assert_eq!(code, 504, "{body}");
    let s = drain_status(&body);
    assert!(s.cluster && !s.drained, "{s:?}");
    assert_eq!(
        (s.local_sessions, s.peer_sessions),
        (0, 2),
        "A's calls, seen by B"
    );

    let waiter = thread::spawn(move || wait_drained(b, "pod=speech/unimrcp-0&timeout=60s"));
    let zero_at = wait_for(
        "A's calls to end",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            if destination_status(a, POD_ID).open_calls > 0 {
                assert!(
                    !waiter.is_finished(),
                    "B's wait returned with A's calls open"
                );
                None
            } else {
                Some(Instant::now())
            }
        },
    );
    let (code, body, took) = waiter.join().unwrap();
    let after = zero_at.elapsed();
    eprintln!("cluster wait-drained {code} after {took:?}, {after:?} after A's zero: {body}");
    assert_eq!(code, 200, "{body}");
    let s = drain_status(&body);
    assert!(s.drained && s.cluster && s.open_sessions == 0, "{s:?}");
    // A's update goes at once; then one poll.
    assert!(
        after < Duration::from_millis(800),
        "{after:?} after the last BYE"
    );

    let calls = calls.wait(Duration::from_secs(15));
    calls.assert_all_ok(2);
    let server = server.drain();
    assert_server_clean(&server);
    assert_eq!(
        server.count("BYE_Recv"),
        2,
        "every BYE reached the draining server"
    );
}

#[test]
fn a_wait_does_not_hold_the_proxy_when_it_stops() {
    let env = test_env!("drain_stop", "127.0.10.6");
    let (mut proxy, []) = Sandbox::new(&env)
        .dest(Dest::udp(1, SERVER1_PORT, "pstn=10"))
        .start();
    let admin = proxy.admin;
    // Destination 1 is up: the wait has nothing to end it but its timeout.
    let waiter = thread::spawn(move || {
        let path = "/v1/destinations/wait-drained?id=1&timeout=60s";
        http_get(admin, path).map_err(|e| e.to_string())
    });
    thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    proxy.guard.signal("TERM");
    let st = proxy
        .guard
        .wait_timeout(Duration::from_secs(3))
        .expect("lb-proxy did not exit within 3 s of SIGTERM with a wait open");
    eprintln!("exited {:?} after SIGTERM with {st}", t0.elapsed());
    assert_eq!(st.code(), Some(0));
    match waiter.join().unwrap() {
        Ok((code, body)) => {
            assert_eq!(code, 503, "{body}");
            assert!(!drain_status(&body).drained, "{body}");
        }
        // The process may also be gone before the answer is written.
        Err(e) => eprintln!("the wait ended with the process: {e}"),
    }
}
