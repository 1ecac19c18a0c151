//! The control side through the real proxy, driven by sipp: OPTIONS probing takes a dead (or
//! engine-offline) server down and brings a restarted one back with hysteresis, a destination
//! set replaced in the middle of traffic keeps every call's load, draining or removing a
//! destination stops new calls while its open calls end normally, and SIGHUP re-reads the set
//! from the file (a broken file, or one without a `destinations` key, changes nothing). The
//! probe counters and the down state also show in `/metrics`.
//!
//! Each test has its own address, 127.0.1.30 to 127.0.1.36 and 127.0.1.39 (`sipp_admin` has
//! .37 and .38); servers on :5080, :5090 and, for a third destination, :5100.
//!
//! Needs `sipp` (Debian package `sip-tester`). Run: `cargo test -p lb-proxy --test sipp_control`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use lb_api::admin::{DestinationStatus, DestinationsStatus, State};
use mrcp_lb_test_support::*;
use std::fs;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

/// A third server's port, for the tests that add a destination.
const SERVER3_PORT: u16 = 5100;

/// Fast probing: a probe a second, 500 ms to answer, two failures take a destination down and
/// two successes bring it back.
const PROBING: &str = "probing:\n  interval: 1s\n  timeout: 500ms\n  failureThreshold: 2\n  \
                       successThreshold: 2\n";
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_THRESHOLD: u32 = 2;
/// Slack on top of interval × threshold for the probe timeout, scheduling and polling.
const PROBE_MARGIN: Duration = Duration::from_millis(2000);

fn find<'a>(s: &'a DestinationsStatus, id: &str) -> Option<&'a DestinationStatus> {
    s.destinations.iter().find(|d| d.id == id)
}

fn dest_uri(env: &TestEnv, port: u16) -> String {
    format!("sip:{}:{port}", env.ip)
}

/// Short calls (`-d 200`) on `port`, all at once-ish; waits for them and returns the report.
fn short_calls(env: &TestEnv, name: &str, port: u16, calls: u64) -> SippReport {
    let n = calls.to_string();
    let r = Sipp::uac(env, name)
        .port(port)
        .timeout(secs(20))
        .rate(10)
        .limit(20)
        .hold(ms(200))
        .args(["-m", &n])
        .run();
    eprintln!("{}", r.summary());
    r
}

/// `calls` long calls (`ms` each) on CLIENT_PORT, left running.
fn long_calls(env: &TestEnv, calls: u64, ms: u64) -> Sipp {
    let n = calls.to_string();
    let d = ms.to_string();
    Sipp::uac(env, "long_calls")
        .rate(10)
        .args(["-m", &n, "-l", &n, "-d", &d])
        .start()
}

/// Waits until the pstn loads of destinations 1 and 2 are `(l1, l2)`.
fn wait_loads(admin: SocketAddr, l1: u32, l2: u32) {
    wait_for(
        &format!("loads (1, 2) = ({l1}, {l2})"),
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            let s = destinations_status(admin);
            let l = |id| find(&s, id).map(pstn_load);
            (l("1") == Some(l1) && l("2") == Some(l2)).then_some(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Probing

/// Proxy with probing on `PROBING`, destination 1 (pstn=50) and 2 (pstn=100, preferred while
/// up) with a `uas.xml` server each; returns once destination 2 has answered two probes.
fn start_probed_pair(env: &TestEnv) -> (Proxy, Sipp, Sipp) {
    let (proxy, [s1, s2]) = Sandbox::new(env)
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=50"), "uas.xml")
        .serve(Dest::udp(2, SERVER2_PORT, "pstn=100"), "uas.xml")
        .extra(PROBING)
        .no_wait()
        .start();
    let admin = proxy.admin;
    wait_for(
        "destination 2 to answer two probes",
        Duration::from_secs(6),
        Duration::from_millis(100),
        || {
            let d = destination_status(admin, "2");
            (d.probe.consecutive_successes >= 2).then_some(())
        },
    );
    (proxy, s1, s2)
}

/// Stops server 2 and waits for the proxy to take destination 2 down. Returns how long that
/// took, the destination as first seen down, and whether a snapshot showed it still up after
/// exactly one failed probe (the threshold at work).
fn stop_and_wait_down(admin: SocketAddr, s2: Sipp) -> (Duration, DestinationStatus, bool) {
    let r = s2.stop();
    let stopped = Instant::now();
    eprintln!("{}", r.summary());
    let mut up_after_one_failure = false;
    let down = wait_for(
        "destination 2 to be marked down by probes",
        Duration::from_secs(15),
        Duration::from_millis(50),
        || {
            let d = destination_status(admin, "2");
            if d.state == State::Up && d.probe.consecutive_failures == 1 {
                up_after_one_failure = true;
            }
            (d.state == State::Down).then_some(d)
        },
    );
    (stopped.elapsed(), down, up_after_one_failure)
}

#[test]
fn probing_marks_a_dead_server_down_and_brings_it_back() {
    let env = test_env!("probing_dead_server", "127.0.1.30");
    let (mut proxy, s1, s2) = start_probed_pair(&env);
    let admin = proxy.admin;

    // 1. Server 2 dies: two failed probes (≤ interval × threshold + timeout) take it down.
    let (took, down, up_after_one_failure) = stop_and_wait_down(admin, s2);
    eprintln!("destination 2 down after {took:?}: {down:?}");
    let bound = PROBE_INTERVAL * PROBE_THRESHOLD + PROBE_MARGIN;
    assert!(
        took <= bound,
        "destination 2 went down {took:?} after its server stopped (bound {bound:?})"
    );
    assert!(
        down.probe.failed >= 2 && down.probe.consecutive_failures >= 2,
        "down without two failed probes in the counters: {:?}",
        down.probe
    );
    assert_ne!(down.probe.last_code, Some(200), "{:?}", down.probe);
    assert!(
        down.reason.contains("probe"),
        "reason should name the probes: {down:?}"
    );
    assert!(
        up_after_one_failure,
        "never saw destination 2 still up after a single failed probe (failureThreshold 2)"
    );

    // 2. Calls now all go to server 1, at once (no INVITE timeout, no failover).
    let calls2 = destination_status(admin, "2").calls;
    let failovers = stats_number(admin, "failovers");
    let c = short_calls(&env, "client_while_down", CLIENT_PORT, 10);
    c.assert_all_ok(10);
    assert!(
        c.response_time() < Duration::from_millis(1000),
        "calls were slow while destination 2 was down (tried first?): {}",
        c.summary()
    );
    assert_eq!(
        destination_status(admin, "2").calls,
        calls2,
        "a call was routed to the down destination"
    );
    assert_eq!(
        stats_number(admin, "failovers"),
        failovers,
        "calls failed over: the down destination was tried"
    );
    assert_eq!(
        destination_status(admin, "2").state,
        State::Down,
        "it must stay down"
    );

    // 3. A server on the same port again: back up after two successful probes, not one.
    let s2b = Sipp::uas(&env, "server2_restarted")
        .port(SERVER2_PORT)
        .start();
    let restarted = Instant::now();
    let mut down_after_one_success = false;
    let up = wait_for(
        "destination 2 to come back up",
        Duration::from_secs(15),
        Duration::from_millis(50),
        || {
            let d = destination_status(admin, "2");
            if d.state == State::Down && d.probe.consecutive_successes == 1 {
                down_after_one_success = true;
            }
            (d.state == State::Up).then_some(d)
        },
    );
    let took = restarted.elapsed();
    eprintln!("destination 2 up again after {took:?}: {up:?}");
    assert!(
        took <= bound,
        "destination 2 came back {took:?} after its server restarted (bound {bound:?})"
    );
    assert!(
        up.probe.consecutive_successes >= 2,
        "up again before two successful probes: {:?}",
        up.probe
    );
    assert!(
        down_after_one_success,
        "never saw destination 2 still down after a single successful probe (successThreshold 2)"
    );
    assert_eq!(up.probe.last_code, Some(200), "{:?}", up.probe);

    // 4. New calls reach it again (it has the larger capacity, so it takes them all).
    let c = short_calls(&env, "client_after_restart", CLIENT_PORT, 10);
    c.assert_all_ok(10);
    assert_eq!(
        destination_status(admin, "2").calls,
        calls2 + 10,
        "{:?}",
        destination_status(admin, "2")
    );

    proxy.assert_running();
    let [s1, s2b] = drain([s1, s2b]);
    eprintln!("{}\n{}", s1.summary(), s2b.summary());
    assert_server_clean(&s1);
    assert_server_clean(&s2b);
    assert_eq!(s1.invites(), 10, "server 1 takes the calls while 2 is down");
    assert_eq!(
        s2b.invites(),
        10,
        "the restarted server takes the later calls"
    );
    proxy.wait_idle(Duration::from_secs(10));
}

#[test]
fn options_answered_503_marks_destination_down() {
    let env = test_env!("probing_options_503", "127.0.1.31");
    // Destination 2 (larger capacity, preferred while up) answers every OPTIONS with 503, as
    // UniMRCP does with its engine offline; it would answer INVITEs.
    // Servers first: a probe sent before server 2 listens would time out, and the
    // failures counted below must be its 503s.
    let (mut proxy, [s1, s2]) = Sandbox::new(&env)
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=50"), "uas.xml")
        .serve_as(
            "server2_options_503",
            Dest::udp(2, SERVER2_PORT, "pstn=100"),
            "uas_options_503.xml",
        )
        .extra(PROBING)
        .servers_first()
        .no_wait()
        .start();
    let admin = proxy.admin;
    let started = Instant::now();
    let down = wait_for(
        "destination 2 (OPTIONS → 503) to be marked down",
        Duration::from_secs(15),
        Duration::from_millis(50),
        || {
            let d = destination_status(admin, "2");
            (d.state == State::Down).then_some(d)
        },
    );
    let took = started.elapsed();
    eprintln!("destination 2 down after {took:?}: {down:?}");
    // The first probe comes within one interval, the second one interval later.
    let bound = PROBE_INTERVAL * (PROBE_THRESHOLD + 1) + PROBE_MARGIN;
    assert!(took <= bound, "took {took:?} (bound {bound:?})");
    assert_eq!(down.probe.last_code, Some(503), "{:?}", down.probe);
    assert!(
        down.probe.failed >= 2 && down.probe.succeeded == 0,
        "{:?}",
        down.probe
    );
    assert!(down.reason.contains("probe"), "{down:?}");
    let failures = metric_sum(
        &parse_metrics(&metrics_text(admin)),
        "mrcp_lb_destination_probes_total",
        &[("destination", "2"), ("result", "failure")],
    );
    assert!(
        failures >= 2.0,
        "mrcp_lb_destination_probes_total{{destination=\"2\",result=\"failure\"}} = {failures}"
    );

    let c = short_calls(&env, "client", CLIENT_PORT, 6);
    c.assert_all_ok(6);
    assert_eq!(
        destination_status(admin, "2").calls,
        0,
        "a call went to the 503 server"
    );
    assert_eq!(
        destination_status(admin, "2").state,
        State::Down,
        "it must stay down"
    );

    proxy.assert_running();
    s1.wait_no_calls(Duration::from_secs(10));
    let (s1, s2) = (s1.stop(), s2.stop());
    eprintln!("{}\n{}", s1.summary(), s2.summary());
    assert_server_clean(&s1);
    assert_eq!(s1.invites(), 6);
    assert_eq!(s2.invites(), 0, "the 503 server must get no INVITE");
    proxy.wait_idle(Duration::from_secs(10));
}

#[test]
fn metrics_show_probe_results_and_down_state_of_a_dead_server() {
    let env = test_env!("probing_metrics", "127.0.1.32");
    let (mut proxy, s1, s2) = start_probed_pair(&env);
    let admin = proxy.admin;
    let (_, down, _) = stop_and_wait_down(admin, s2);
    eprintln!("{down:?}");

    let text = metrics_text(admin);
    let all = parse_metrics(&text);
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        let hits: Vec<f64> = all
            .iter()
            .filter(|m| m.name == name && labels.iter().all(|(k, v)| m.label(k) == Some(v)))
            .map(|m| m.value)
            .collect();
        assert!(
            hits.len() <= 1,
            "more than one {name} sample for {labels:?}:\n{text}"
        );
        hits.first().copied()
    };
    let uri2 = dest_uri(&env, SERVER2_PORT);
    let successes = value(
        "mrcp_lb_destination_probes_total",
        &[("destination", "2"), ("uri", &uri2), ("result", "success")],
    );
    assert!(
        successes.is_some_and(|v| v >= 2.0),
        "expected mrcp_lb_destination_probes_total{{destination=\"2\",result=\"success\"}} >= 2 \
         (it answered two probes before dying), got {successes:?}:\n{text}"
    );
    let failed: f64 = ["failure", "timeout"]
        .iter()
        .filter_map(|r| {
            value(
                "mrcp_lb_destination_probes_total",
                &[("destination", "2"), ("result", r)],
            )
        })
        .sum();
    assert!(
        failed >= 2.0,
        "expected at least 2 failed/timed-out probes of destination 2 in the metrics:\n{text}"
    );
    assert_eq!(
        value(
            "mrcp_lb_destination_state",
            &[("destination", "2"), ("uri", &uri2), ("state", "down")]
        ),
        Some(1.0),
        "mrcp_lb_destination_state{{destination=\"2\",state=\"down\"}} should be 1:\n{text}"
    );
    assert_eq!(
        value(
            "mrcp_lb_destination_state",
            &[("destination", "2"), ("state", "up")]
        ),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(
            "mrcp_lb_destination_state",
            &[("destination", "1"), ("state", "up")]
        ),
        Some(1.0),
        "{text}"
    );

    proxy.assert_running();
    let s1 = s1.stop();
    assert_server_clean(&s1);
}

// ---------------------------------------------------------------------------------------------
// Set updates under traffic

/// A point where the proxy's load of a destination and its server's open calls were read
/// within `MATCH_WINDOW` of each other.
#[derive(Debug)]
struct Comparison {
    id: &'static str,
    at: f64,
    proxy_load: u64,
    server_calls: u64,
}

const MATCH_WINDOW: f64 = 0.06;
/// Calls that may be in flight between the two readings (INVITE sent but not yet received,
/// BYE answered but not yet seen by the proxy).
const TOLERANCE: u64 = 2;

#[test]
fn set_update_during_traffic_keeps_every_load() {
    let env = test_env!("set_update_traffic", "127.0.1.33");
    // Server 3 answers for the destination the PUT adds.
    let (mut proxy, [s1, s2, s3]) = Sandbox::new(&env)
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=100"), "uas.xml")
        .serve(Dest::udp(2, SERVER2_PORT, "pstn=100"), "uas.xml")
        .uas("server3", SERVER3_PORT, "uas.xml")
        .start();
    let admin = proxy.admin;
    let v0 = destinations_status(admin).version;

    // 60 calls of 3 s at 8 per second: about 24 open at once for most of 8 s.
    const CALLS: u64 = 60;
    let sampler = LoadSampler::start(admin, Duration::from_millis(40));
    let traffic_start = unix_now();
    let client = Sipp::uac(&env, "client")
        .timeout(secs(40))
        .calls(60)
        .rate(8)
        .limit(60)
        .hold(ms(3000))
        .start();
    thread::sleep(Duration::from_millis(4000));

    // Mid-traffic: same ids, capacity of 2 raised (so it keeps taking calls next to the
    // empty newcomer), a new destination 3, a higher version.
    let before = destinations_status(admin);
    let set = serde_json::json!({
        "version": v0 + 1,
        "destinations": [
            {"id": "1", "uri": dest_uri(&env, SERVER1_PORT), "resources": "pstn=100"},
            {"id": "2", "uri": dest_uri(&env, SERVER2_PORT), "resources": "pstn=110"},
            {"id": "3", "uri": dest_uri(&env, SERVER3_PORT), "resources": "pstn=100"},
        ]
    });
    let put_at = unix_now();
    let r = put_destinations(admin, None, &set.to_string());
    assert_eq!(r.code, 200, "PUT answered {}: {}", r.code, r.body);
    let after: DestinationsStatus = serde_json::from_str(&r.body).expect("PUT body");
    eprintln!(
        "loads before the PUT {:?}, in its answer {:?}",
        before
            .destinations
            .iter()
            .map(|d| (&d.id, pstn_load(d)))
            .collect::<Vec<_>>(),
        after
            .destinations
            .iter()
            .map(|d| (&d.id, pstn(d)))
            .collect::<Vec<_>>()
    );
    assert_eq!(after.version, v0 + 1);
    for id in ["1", "2"] {
        let (b, a) = (
            pstn_load(find(&before, id).unwrap()),
            pstn_load(find(&after, id).unwrap()),
        );
        assert!(
            b >= 5,
            "too little traffic on {id} before the PUT to tell ({b})"
        );
        assert!(
            a.abs_diff(b) <= TOLERANCE as u32,
            "load of {id} went from {b} to {a} across the PUT"
        );
    }
    assert_eq!(pstn(find(&after, "2").unwrap()).1, 110, "new capacity of 2");
    assert!(find(&after, "3").is_some(), "3 not in the new set");

    let client = client.wait(Duration::from_secs(40));
    let traffic_end = unix_now();
    eprintln!("{}", client.summary());
    // Only the polls quick enough to be placed in time.
    let samples: Vec<LoadSample> = sampler
        .finish()
        .into_iter()
        .filter(|s| s.took < Duration::from_millis(30))
        .collect();
    proxy.assert_running();
    for s in [&s1, &s2, &s3] {
        s.wait_no_calls(Duration::from_secs(10));
    }

    // Match every statistics row of each server (one a second) with the proxy poll nearest
    // in time.
    let mut comparisons = Vec::new();
    for (id, server) in [("1", &s1), ("2", &s2), ("3", &s3)] {
        for row in server.stat_rows() {
            if row.at < traffic_start || row.at > traffic_end {
                continue;
            }
            let Some(nearest) = samples.iter().min_by(|a, b| {
                (a.unix_at - row.at)
                    .abs()
                    .partial_cmp(&(b.unix_at - row.at).abs())
                    .unwrap()
            }) else {
                continue;
            };
            if (nearest.unix_at - row.at).abs() > MATCH_WINDOW {
                continue;
            }
            comparisons.push(Comparison {
                id,
                at: row.at - traffic_start,
                proxy_load: nearest.loads.get(id).copied().unwrap_or(0),
                server_calls: row.current_calls,
            });
        }
    }
    for c in &comparisons {
        eprintln!(
            "t={:5.2}s dest {}: proxy load {:3}, server open calls {:3}",
            c.at, c.id, c.proxy_load, c.server_calls
        );
    }
    let off: Vec<&Comparison> = comparisons
        .iter()
        .filter(|c| c.proxy_load.abs_diff(c.server_calls) > TOLERANCE)
        .collect();
    assert!(
        off.is_empty(),
        "the proxy's load differs from the calls open on the server: {off:?}"
    );
    let put_rel = put_at - traffic_start;
    for (id, need) in [("1", 3), ("2", 3), ("3", 2)] {
        let n = comparisons
            .iter()
            .filter(|c| c.id == id && c.at > put_rel && c.server_calls > 0)
            .count();
        assert!(
            n >= need,
            "only {n} comparison points with open calls on {id} after the PUT (need {need}); \
             {} proxy polls in all",
            samples.len()
        );
    }

    client.assert_all_ok(CALLS);
    let (s1, s2, s3) = (s1.stop(), s2.stop(), s3.stop());
    eprintln!("{}\n{}\n{}", s1.summary(), s2.summary(), s3.summary());
    for s in [&s1, &s2, &s3] {
        assert_server_clean(s);
    }
    assert_eq!(s1.invites() + s2.invites() + s3.invites(), CALLS);
    assert!(s3.invites() > 0, "the new destination got no call");
    let end = destinations_status(admin);
    for d in &end.destinations {
        assert_eq!(pstn_load(d), 0, "load left at the end: {d:?}");
    }
    let stats = proxy.wait_idle(Duration::from_secs(5));
    assert_eq!((stats.active, stats.early), (0, 0), "{stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
}

// ---------------------------------------------------------------------------------------------
// Drain and removal

/// Proxy with destinations 1 and 2 (pstn=100 each, no probing noise) and a server on each.
fn start_pair(env: &TestEnv) -> (Proxy, Sipp, Sipp) {
    let (proxy, [s1, s2]) = Sandbox::new(env)
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=100"), "uas.xml")
        .serve(Dest::udp(2, SERVER2_PORT, "pstn=100"), "uas.xml")
        .start();
    (proxy, s1, s2)
}

/// The end of both drain tests: the long calls ended well, server 2 got its 3 INVITEs and 3
/// BYEs and nothing failed, server 1 got every other call.
fn check_servers_after_drain(long: &SippReport, s1: Sipp, s2: Sipp, s1_calls: u64) {
    long.assert_all_ok(6);
    let [s1, s2] = drain([s1, s2]);
    eprintln!("{}\n{}", s1.summary(), s2.summary());
    assert_server_clean(&s1);
    assert_server_clean(&s2);
    assert_eq!(s2.invites(), 3, "server 2 must get no new call");
    assert_eq!(
        s2.count("BYE_Recv"),
        3,
        "server 2's open calls must end with a BYE"
    );
    assert_eq!(s1.invites(), s1_calls);
}

#[test]
fn drained_destination_takes_no_new_calls_and_finishes_its_own() {
    let env = test_env!("drain_destination", "127.0.1.34");
    let (mut proxy, s1, s2) = start_pair(&env);
    let admin = proxy.admin;

    // Six calls of 6 s: equal capacities, so three on each.
    let long = long_calls(&env, 6, 6000);
    wait_loads(admin, 3, 3);

    let r = post_state(admin, None, "2", "drain");
    assert_eq!(r.code, 200, "drain answered {}: {}", r.code, r.body);
    assert_eq!(
        r.json(),
        serde_json::json!({"id": "2", "state": "draining"})
    );
    let d2 = destination_status(admin, "2");
    assert_eq!(
        (d2.state, pstn_load(&d2), d2.open_calls),
        (State::Draining, 3, 3)
    );

    // New calls all go to 1 while 2's calls go on.
    let short = short_calls(&env, "short_calls", CLIENT2_PORT, 6);
    short.assert_all_ok(6);
    let d2 = destination_status(admin, "2");
    assert_eq!(d2.calls, 3, "a new call went to the draining destination");
    assert_eq!(
        (d2.state, pstn_load(&d2)),
        (State::Draining, 3),
        "the draining destination's calls must stay open"
    );
    assert_eq!(destination_status(admin, "1").calls, 9);

    let long = long.wait(Duration::from_secs(30));
    eprintln!("{}", long.summary());
    proxy.assert_running();
    let d2 = wait_for(
        "the draining destination's load to reach 0",
        Duration::from_secs(3),
        Duration::from_millis(50),
        || {
            let d = destination_status(admin, "2");
            (pstn_load(&d) == 0).then_some(d)
        },
    );
    assert_eq!((d2.state, d2.open_calls), (State::Draining, 0), "{d2:?}");
    check_servers_after_drain(&long, s1, s2, 9);
    proxy.wait_idle(Duration::from_secs(5));
}

#[test]
fn removed_destination_stays_listed_until_its_calls_end() {
    let env = test_env!("remove_destination", "127.0.1.35");
    let (mut proxy, s1, s2) = start_pair(&env);
    let admin = proxy.admin;
    let v0 = destinations_status(admin).version;

    let long = long_calls(&env, 6, 6000);
    wait_loads(admin, 3, 3);

    // A set without destination 2.
    let set = serde_json::json!({
        "version": v0 + 1,
        "destinations": [
            {"id": "1", "uri": dest_uri(&env, SERVER1_PORT), "resources": "pstn=100"},
        ]
    });
    let r = put_destinations(admin, None, &set.to_string());
    assert_eq!(r.code, 200, "PUT answered {}: {}", r.code, r.body);
    let s = destinations_status(admin);
    assert_eq!(s.version, v0 + 1);
    let d2 = find(&s, "2")
        .unwrap_or_else(|| panic!("removed destination with open calls not listed: {s:?}"));
    assert!(d2.removed, "{d2:?}");
    assert_eq!(pstn_load(d2), 3, "{d2:?}");

    let short = short_calls(&env, "short_calls", CLIENT2_PORT, 6);
    short.assert_all_ok(6);
    let d2 = destination_status(admin, "2");
    assert!(d2.removed, "{d2:?}");
    assert_eq!(d2.calls, 3, "a new call went to the removed destination");
    assert_eq!(pstn_load(&d2), 3, "its calls must stay open");

    // Listed (and marked removed) until its calls end, then gone.
    let mut last_seen = None;
    let gone_after = {
        let t0 = Instant::now();
        wait_for(
            "the removed destination to disappear once its calls ended",
            Duration::from_secs(15),
            Duration::from_millis(50),
            || {
                let s = destinations_status(admin);
                match find(&s, "2") {
                    Some(d) => {
                        assert!(d.removed, "listed without removed=true: {d:?}");
                        last_seen = Some(d.clone());
                        None
                    }
                    None => Some(t0.elapsed()),
                }
            },
        )
    };
    let long = long.wait(Duration::from_secs(30));
    eprintln!(
        "{} (2 gone {gone_after:?} after the short calls)",
        long.summary()
    );
    assert!(
        last_seen.as_ref().is_some_and(|d| pstn_load(d) > 0),
        "never saw the removed destination listed with its calls: {last_seen:?}"
    );
    proxy.assert_running();
    check_servers_after_drain(&long, s1, s2, 9);
    let s = destinations_status(admin);
    assert!(find(&s, "2").is_none(), "{s:?}");
    proxy.wait_idle(Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------------
// SIGHUP

/// (id, pstn capacity, pstn load) of every listed destination, sorted by id.
fn summary(s: &DestinationsStatus) -> Vec<(String, u32, u32, bool)> {
    let mut v: Vec<_> = s
        .destinations
        .iter()
        .map(|d| {
            let (l, c) = pstn(d);
            (d.id.clone(), c, l, d.removed)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn sighup_reloads_the_set_and_a_broken_file_changes_nothing() {
    let env = test_env!("sighup_reload", "127.0.1.36");
    let (mut proxy, s1, s2) = start_pair(&env);
    let admin = proxy.admin;
    let cfg = proxy_config_path(&env);
    let v0 = destinations_status(admin).version;

    let long = long_calls(&env, 4, 5000);
    wait_loads(admin, 2, 2);

    // Capacity of 1 changed, destination 3 added (small, so no call goes to it: no server).
    fs::write(
        &cfg,
        config_yaml(
            &env,
            "absolute",
            &[
                Dest::udp(1, SERVER1_PORT, "pstn=70"),
                Dest::udp(2, SERVER2_PORT, "pstn=100"),
                Dest::udp(3, SERVER3_PORT, "pstn=10"),
            ],
            "",
        ),
    )
    .unwrap();
    proxy.guard.signal("HUP");
    let s = wait_for(
        "the reloaded set",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            let s = destinations_status(admin);
            (s.version > v0).then_some(s)
        },
    );
    eprintln!("after SIGHUP: version {} {:?}", s.version, summary(&s));
    assert_eq!(s.version, v0 + 1, "SIGHUP should apply the next version");
    assert_eq!(
        summary(&s),
        vec![
            ("1".to_string(), 70, 2, false),
            ("2".to_string(), 100, 2, false),
            ("3".to_string(), 10, 0, false),
        ],
        "new capacities and destination 3, loads kept"
    );
    proxy.assert_running();

    // Broken files: YAML that does not parse, then a set that does not validate.
    let good = destinations_status(admin);
    let broken = [
        format!(
            "{}  - id: 4\n    uri: [unclosed\n",
            fs::read_to_string(&cfg).unwrap()
        ),
        config_yaml(
            &env,
            "absolute",
            &[
                Dest::udp(1, SERVER1_PORT, "pstn=lots"),
                Dest::udp(2, SERVER2_PORT, "pstn=100"),
            ],
            "",
        ),
    ];
    let sighup_lines = |proxy: &Proxy| {
        fs::read_to_string(&proxy.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("SIGHUP"))
            .count()
    };
    for (i, text) in broken.iter().enumerate() {
        fs::write(&cfg, text).unwrap();
        let seen = sighup_lines(&proxy);
        proxy.guard.signal("HUP");
        // Each reload is reported in the log: wait for this one's verdict.
        wait_for(
            &format!("the SIGHUP with broken file {i} to be reported in the log"),
            Duration::from_secs(5),
            Duration::from_millis(50),
            || (sighup_lines(&proxy) > seen).then_some(()),
        );
        let log = fs::read_to_string(&proxy.log).unwrap_or_default();
        let verdict = log.lines().rfind(|l| l.contains("SIGHUP")).unwrap_or("");
        eprintln!("broken file {i}: {verdict}");
        assert!(
            verdict.contains("not reloaded") || verdict.contains("rejected"),
            "broken file {i} was not refused: {verdict}"
        );
        proxy.assert_running();
        let s = destinations_status(admin);
        assert_eq!(
            s.version, good.version,
            "broken file {i} changed the version"
        );
        assert_eq!(
            summary(&s),
            summary(&good),
            "broken file {i} changed the set"
        );
    }

    // Still routing: a short call, and the long ones end well.
    let short = short_calls(&env, "short_calls", CLIENT2_PORT, 2);
    short.assert_all_ok(2);
    let long = long.wait(Duration::from_secs(30));
    eprintln!("{}", long.summary());
    long.assert_all_ok(4);
    proxy.assert_running();
    let [s1, s2] = drain([s1, s2]);
    assert_server_clean(&s1);
    assert_server_clean(&s2);
    assert_eq!(s1.invites() + s2.invites(), 6);
    proxy.wait_idle(Duration::from_secs(5));
}

#[test]
fn sighup_of_a_file_without_destinations_keeps_the_pushed_set() {
    let env = test_env!("sighup_no_destinations_key", "127.0.1.39");
    // An operator-managed proxy: the file has no `destinations` key, the set is pushed.
    let (mut proxy, []) = Sandbox::new(&env).without_destinations().start();
    let admin = proxy.admin;
    let set = serde_json::json!({
        "version": 3,
        "destinations": [
            {"id": "1", "uri": dest_uri(&env, SERVER1_PORT), "resources": "pstn=10"},
            {"id": "2", "uri": dest_uri(&env, SERVER2_PORT), "resources": "pstn=20"},
        ]
    });
    let r = put_destinations(admin, None, &set.to_string());
    assert_eq!(r.code, 200, "PUT answered {}: {}", r.code, r.body);
    let pushed = destinations_status(admin);

    // A SIGHUP (log rotation, a habit) re-reads a file that has no set to give.
    let seen = fs::read_to_string(&proxy.log).unwrap_or_default();
    proxy.guard.signal("HUP");
    wait_for(
        "the SIGHUP to be handled",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            let log = fs::read_to_string(&proxy.log).unwrap_or_default();
            (log.matches("SIGHUP").count() > seen.matches("SIGHUP").count()).then_some(())
        },
    );
    proxy.assert_running();
    let s = destinations_status(admin);
    assert_eq!(
        (s.version, summary(&s)),
        (pushed.version, summary(&pushed)),
        "a SIGHUP of a file without a `destinations` key replaced the pushed set (version {} \
         with {} destinations became version {} with {}); an absent key is not an empty set",
        pushed.version,
        pushed.destinations.len(),
        s.version,
        s.destinations.len()
    );
}
