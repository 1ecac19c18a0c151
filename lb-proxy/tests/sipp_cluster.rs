//! Several proxy replicas sharing one view of load, driven by sipp: three lb-proxy processes
//! route calls to the same two small servers at once and never oversell them by more than the
//! documented bound (N - 1 calls); a killed replica's load disappears from the others within
//! `peerTimeout`; a BYE that reaches another replica than the INVITE ends the call and frees
//! its load.
//!
//! Needs `sipp` (Debian package `sip-tester`). Run: `cargo test -p lb-proxy --test sipp_cluster`.
//! Addresses: 127.0.7.1-3 and 127.0.7.11-12.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use serde_json::Value;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const CLUSTER_PORT: u16 = 7070;
const PEER_TIMEOUT_MS: u64 = 1000;

/// The config of one replica at `ip`: the usual listeners and admin API, probing, the
/// destinations (on `servers_ip`), and a `cluster` section naming every replica.
fn replica_config(
    ip: &str,
    replicas: &[&str],
    servers_ip: &str,
    dests: &[(u32, u16, u32)],
) -> String {
    let mut y = format!(
        "listeners:\n  - udp:{ip}:{PROXY_PORT}\n  - tcp:{ip}:{PROXY_PORT}\n\
         admin:\n  listen: {ip}:{ADMIN_PORT}\n\
         routing:\n  group: 1\n  resources: [pstn]\n  mode: absolute\n  maxAttempts: 2\n  retryAfter: 1s\n\
         probing:\n  interval: 1s\n\
         timers:\n  t1: 500ms\n  inviteTimeout: 3s\n\
         cluster:\n  listen: {ip}:{CLUSTER_PORT}\n  name: replica-{ip}\n  heartbeat: 200ms\n  peerTimeout: {PEER_TIMEOUT_MS}ms\n  peers:\n"
    );
    for r in replicas {
        writeln!(y, "    - {r}:{CLUSTER_PORT}").unwrap();
    }
    y.push_str("destinations:\n");
    for (id, port, pstn) in dests {
        writeln!(
            y,
            "  - id: {id}\n    group: 1\n    uri: sip:{servers_ip}:{port}\n    resources: pstn={pstn}"
        )
        .unwrap();
    }
    y
}

fn cluster(admin: SocketAddr) -> Value {
    get_json(admin, "/v1/cluster")
}

fn wait_cluster_size(admin: SocketAddr, size: u64) {
    wait_for(
        &format!("{admin} to see {size} live replicas"),
        Duration::from_secs(10),
        Duration::from_millis(50),
        || (cluster(admin)["size"].as_u64() == Some(size)).then_some(()),
    );
}

/// `pstn` load of destination `id` as this replica's routing sees it (its own + peers').
fn cluster_load(admin: SocketAddr, id: &str) -> u64 {
    let v = get_json(admin, "/v1/destinations");
    v["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .map(|d| d["resources"][0]["clusterLoad"].as_u64().unwrap())
        .unwrap_or(0)
}

fn own_load(admin: SocketAddr, id: &str) -> u64 {
    destinations(admin)
        .iter()
        .find(|d| d.id == id)
        .map(|d| d.load)
        .unwrap_or(0)
}

/// Highest number of calls a server held at once, from the messages it received: a call
/// opens with its first INVITE and closes with its first BYE.
fn max_concurrent(server: &Sipp) -> (usize, usize) {
    let mut open: HashMap<String, ()> = HashMap::new();
    let mut ended: HashMap<String, ()> = HashMap::new();
    let (mut max, mut invites) = (0, 0);
    for (start, call_id) in server.received_messages() {
        if start.starts_with("INVITE ")
            && !open.contains_key(&call_id)
            && !ended.contains_key(&call_id)
        {
            open.insert(call_id, ());
            invites += 1;
            max = max.max(open.len());
        } else if start.starts_with("BYE ") && open.remove(&call_id).is_some() {
            ended.insert(call_id, ());
        }
    }
    (max, invites)
}

#[test]
fn three_replicas_never_oversell_and_a_dead_replicas_load_goes_away() {
    let ips = ["127.0.7.1", "127.0.7.2", "127.0.7.3"];
    let envs: Vec<TestEnv> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| test_env!(&format!("cluster_oversell_{i}"), ip))
        .collect();
    const CAP: u32 = 4;
    let dests = [(1, SERVER1_PORT, CAP), (2, SERVER2_PORT, CAP)];
    let servers: Vec<Sipp> = [SERVER1_PORT, SERVER2_PORT]
        .iter()
        .map(|port| {
            let local = SocketAddr::new(ips[0].parse().unwrap(), *port);
            Sipp::uas(&envs[0], &format!("server{port}"))
                .at(local)
                .trace_messages()
                .start()
        })
        .collect();
    let mut proxies: Vec<Proxy> = envs
        .iter()
        .map(|e| {
            // Signed updates (one key file per replica, same key).
            let key = e.dir.join("cluster.key");
            std::fs::write(&key, "test-cluster-key-0123456789\n").unwrap();
            let config = replica_config(&e.ip, &ips, ips[0], &dests).replace(
                "  peers:\n",
                &format!("  keyFile: {}\n  peers:\n", key.display()),
            );
            Proxy::start(e, &config)
        })
        .collect();
    for p in &proxies {
        p.wait_state(&["1", "2"], "up", Duration::from_secs(10));
        wait_cluster_size(p.admin, 3);
        let m = parse_metrics(&metrics_text(p.admin));
        let peers = |state: &str| {
            m.iter()
                .find(|s| s.name == "mrcp_lb_cluster_peers" && s.label("state") == Some(state))
                .map(|s| s.value)
        };
        // Each lists all three addresses and skips its own.
        assert_eq!((peers("live"), peers("silent")), (Some(2.0), Some(0.0)));
    }

    // Each replica gets 10 calls/s of 2 s: 60 calls wanted at once against 8 channels.
    let clients: Vec<Sipp> = envs
        .iter()
        .map(|e| {
            Sipp::uac(e, "client")
                .scenario("uac_200_or_503.xml")
                .timeout(secs(40))
                .calls(60)
                .rate(10)
                .limit(40)
                .hold(ms(2000))
                .start()
        })
        .collect();
    let reports: Vec<SippReport> = clients
        .into_iter()
        .map(|c| c.wait(Duration::from_secs(40)))
        .collect();
    for r in &reports {
        eprintln!("{}", r.summary());
        assert_eq!(r.failed(), 0, "{}: every call answered 200 or 503", r.name);
    }
    for p in &mut proxies {
        p.assert_running();
    }
    let mut rejected = 0;
    for p in &proxies {
        rejected += stats_number(p.admin, "rejectedNoCapacity");
    }
    let bound = ips.len() - 1;
    let mut answered = 0;
    for s in &servers {
        let (max, invites) = max_concurrent(s);
        answered += invites;
        eprintln!(
            "{}: {invites} calls, at most {max} at once (capacity {CAP}, bound +{bound})",
            s.name
        );
        assert!(
            max <= CAP as usize + bound,
            "{}: {max} calls at once exceed capacity {CAP} + {bound}",
            s.name
        );
        assert!(
            max >= CAP as usize,
            "{}: the load never reached capacity ({max}): the test did not test",
            s.name
        );
    }
    eprintln!("answered {answered}, rejected {rejected} of 180");
    assert!(rejected > 0, "overload must have been refused");
    for p in &proxies {
        p.wait_idle(Duration::from_secs(10));
    }

    // Long calls through the third replica; the others count them.
    let c = &envs[2];
    let long = Sipp::uac(c, "long")
        .port(CLIENT2_PORT)
        .timeout(secs(60))
        .calls(3)
        .rate(10)
        .hold(ms(60000))
        .start();
    wait_for(
        "the first replica to count the third one's 3 calls",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            (cluster_load(proxies[0].admin, "1") + cluster_load(proxies[0].admin, "2") == 3)
                .then_some(())
        },
    );
    assert_eq!(
        own_load(proxies[0].admin, "1") + own_load(proxies[0].admin, "2"),
        0
    );
    let seen: f64 = parse_metrics(&metrics_text(proxies[0].admin))
        .iter()
        .filter(|s| s.name == "mrcp_lb_destination_cluster_load")
        .map(|s| s.value)
        .sum();
    assert_eq!(
        seen, 3.0,
        "the cluster-wide load gauge shows the third replica's calls"
    );
    // The third replica dies (SIGKILL): its load leaves the others' view within peerTimeout.
    let killed = Instant::now();
    proxies[2].guard.kill();
    for p in &proxies[..2] {
        wait_for(
            "the dead replica's load to disappear",
            Duration::from_millis(PEER_TIMEOUT_MS + 2000),
            Duration::from_millis(20),
            || (cluster_load(p.admin, "1") + cluster_load(p.admin, "2") == 0).then_some(()),
        );
        assert_eq!(cluster(p.admin)["size"].as_u64(), Some(2));
    }
    eprintln!(
        "dead replica's load gone from both survivors {} ms after the kill (peerTimeout {PEER_TIMEOUT_MS} ms)",
        killed.elapsed().as_millis()
    );
    drop(long);
    // The survivors keep routing.
    for (i, e) in envs[..2].iter().enumerate() {
        let r = Sipp::uac(e, &format!("after{i}"))
            .port(CLIENT2_PORT)
            .timeout(secs(20))
            .calls(4)
            .rate(10)
            .hold(ms(100))
            .run();
        r.assert_all_ok(4);
    }
    for s in servers {
        s.stop();
    }
}

#[test]
fn a_bye_through_another_replica_ends_the_call_and_frees_the_load() {
    let ips = ["127.0.7.11", "127.0.7.12"];
    let (ea, eb) = (
        test_env!("cluster_bye_a", ips[0]),
        test_env!("cluster_bye_b", ips[1]),
    );
    let dests = [(1, SERVER1_PORT, 100)];
    let server = Sipp::uas(&ea, "server").port(SERVER1_PORT).start();
    let a = Proxy::start(&ea, &replica_config(ips[0], &ips, ips[0], &dests));
    let b = Proxy::start(&eb, &replica_config(ips[1], &ips, ips[0], &dests));
    a.wait_state(&["1"], "up", Duration::from_secs(10));
    wait_cluster_size(a.admin, 2);
    wait_cluster_size(b.admin, 2);

    const N: u64 = 5;
    // Both halves number their calls 1..N: same Call-ID and From tag for the same number.
    let cid = ["-cid_str", "cross-%u@test"];
    let contact = format!("mrcp@{}:{SERVER1_PORT}", ips[0]);

    // Calls set up through A, no BYE yet.
    let n = N.to_string();
    Sipp::uac(&ea, "setup")
        .scenario("uac_cross_setup.xml")
        .timeout(secs(20))
        .rate(10)
        .args([cid[0], cid[1], "-m", &n])
        .run()
        .assert_all_ok(N);
    assert_eq!(a.stats().active, N);
    assert_eq!(own_load(a.admin, "1"), N);
    wait_for(
        "B to see A's calls",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || (cluster_load(b.admin, "1") == N).then_some(()),
    );
    assert_eq!(own_load(b.admin, "1"), 0);

    // The callers hang up through B, which never saw these calls.
    Sipp::uac(&eb, "hangup")
        .scenario("uac_bye_only.xml")
        .at(SocketAddr::new(ips[1].parse().unwrap(), CLIENT2_PORT))
        .to(eb.proxy_target())
        .timeout(secs(20))
        .rate(10)
        .args([cid[0], cid[1], "-key", "server_contact", &contact, "-m", &n])
        .run()
        .assert_all_ok(N);
    let freed = Instant::now();
    let stats = a.wait_idle(Duration::from_secs(5));
    eprintln!(
        "A freed the load {} ms after the last BYE through B: {stats:?}",
        freed.elapsed().as_millis()
    );
    wait_for(
        "B to see the load freed",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || (cluster_load(b.admin, "1") == 0).then_some(()),
    );
    let applied = parse_metrics(&metrics_text(a.admin))
        .into_iter()
        .find(|m| {
            m.name == "mrcp_lb_cluster_dialog_ends_total" && m.label("direction") == Some("applied")
        })
        .map(|m| m.value)
        .unwrap_or(0.0);
    assert_eq!(applied, N as f64, "A ended each dialog on B's notice");
    // Every call ended at the server: it got each BYE (relayed by B).
    let s = server.drain();
    assert_eq!(s.failed(), 0, "{}", s.summary());
    assert_eq!(s.invites(), N);
    assert_eq!(s.count("BYE_Recv"), N, "{}", s.summary());
}
