//! Dialog bookkeeping through the real proxy, driven by sipp: the counters of
//! `/v1/dialogs/stats` and the per-destination load, and the dialog lifetime limit.
//!
//! Needs `sipp` (Debian package `sip-tester`). Run: `cargo test -p lb-proxy --test sipp_dialogs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::time::{Duration, Instant};

fn dests() -> Vec<Dest> {
    vec![
        Dest::udp(1, SERVER1_PORT, "pstn=100"),
        Dest::udp(2, SERVER2_PORT, "pstn=50"),
    ]
}

/// Starts `scenario` on both server ports, runs `calls` calls of `client` through the proxy
/// while sampling the proxy, stops the servers and checks everyone ended clean.
fn phase(
    env: &TestEnv,
    proxy: &mut Proxy,
    label: &str,
    server_scenario: &'static str,
    client_scenario: &'static str,
    calls: u64,
    client_args: &[&str],
) -> Vec<LoadSample> {
    let s1 = Sipp::uas(env, &format!("{label}_server1"))
        .scenario(server_scenario)
        .port(SERVER1_PORT)
        .start();
    let s2 = Sipp::uas(env, &format!("{label}_server2"))
        .scenario(server_scenario)
        .port(SERVER2_PORT)
        .start();
    proxy.wait_state(&["1", "2"], "up", Duration::from_secs(10));
    let sampler = LoadSampler::start(proxy.admin, Duration::from_millis(100));
    let n = calls.to_string();
    let mut args = vec!["-m", n.as_str(), "-r", "4", "-l", "20"];
    args.extend_from_slice(client_args);
    let client = Sipp::uac(env, &format!("{label}_client"))
        .scenario(client_scenario)
        .args(args)
        .run();
    let samples = sampler.finish();
    eprintln!("{}", client.summary());
    proxy.assert_running();
    let [s1, s2] = drain([s1, s2]);
    eprintln!("{}\n{}", s1.summary(), s2.summary());
    client.assert_all_ok(calls);
    assert_server_clean(&s1);
    assert_server_clean(&s2);
    // Final responses are ACKed and so no longer retransmitted; nothing arrives for a call
    // that has ended.
    client.assert_no_stray_messages();
    s1.assert_no_stray_messages();
    s2.assert_no_stray_messages();
    assert_eq!(
        s1.invites() + s2.invites(),
        calls,
        "{label}: servers took {} + {} INVITEs",
        s1.invites(),
        s2.invites()
    );
    let stats = proxy.wait_idle(Duration::from_secs(10));
    eprintln!("{label}: proxy idle with {stats:?}");
    samples
}

#[test]
fn counters_return_to_zero_after_answered_cancelled_and_rejected_calls() {
    let env = test_env!("dialog_counters", "127.0.1.11");
    // Each phase starts its own servers.
    let (mut proxy, []) = Sandbox::new(&env).dests(&dests()).start();

    // 6 answered calls of 1 s, ended by the client's BYE.
    let answered = phase(
        &env,
        &mut proxy,
        "answered",
        "uas.xml",
        "uac.xml",
        6,
        &["-d", "1000"],
    );
    let max_active = answered.iter().map(|s| s.stats.active).max().unwrap_or(0);
    let max_load: u64 = answered
        .iter()
        .map(|s| s.loads.values().sum::<u64>())
        .max()
        .unwrap_or(0);
    assert!(
        max_active >= 1 && max_load >= 1,
        "answered calls never showed as active dialogs / load (max active {max_active}, \
         max load {max_load})"
    );

    // 4 calls that ring for 1 s and are cancelled by the client.
    let cancelled = phase(
        &env,
        &mut proxy,
        "cancelled",
        "uas_ringing.xml",
        "uac_cancel.xml",
        4,
        &["-d", "1000"],
    );
    let max_early = cancelled.iter().map(|s| s.stats.early).max().unwrap_or(0);
    assert!(
        max_early >= 1,
        "ringing calls (180 with to-tag) never showed as early dialogs"
    );
    let max_load: u64 = cancelled
        .iter()
        .map(|s| s.loads.values().sum::<u64>())
        .max()
        .unwrap_or(0);
    assert!(max_load >= 1, "ringing calls never showed as load");

    // 4 calls refused by the server with 486 (passed through to the client).
    phase(
        &env,
        &mut proxy,
        "rejected",
        "uas_486.xml",
        "uac_expect_486.xml",
        4,
        &[],
    );

    let stats = proxy.wait_idle(Duration::from_secs(10));
    let ds = proxy.destinations();
    eprintln!("final: {stats:?} {ds:?}");
    assert_eq!(
        stats,
        DialogStats {
            active: 0,
            early: 0,
            processed: 14,
            expired: 0,
            failed: 8,
        },
        "after 6 answered, 4 cancelled and 4 rejected calls"
    );
    assert!(ds.iter().all(|d| d.load == 0), "load left behind: {ds:?}");
}

#[test]
fn dialog_lifetime_limit_sends_bye_to_both_sides() {
    let env = test_env!("dialog_lifetime", "127.0.1.12");
    let (mut proxy, [server]) = Sandbox::new(&env)
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=100"), "uas_expect_bye.xml")
        .extra("dialogs:\n  lifetime: 2s\n")
        .start();

    // Neither side hangs up: both wait for a BYE, which only the proxy can send, when the
    // 2 s lifetime has passed. Both scenarios check the BYE carries their dialog's tags.
    let t0 = Instant::now();
    let client = Sipp::uac(&env, "client")
        .scenario("uac_long_expect_bye.xml")
        .timeout(secs(15))
        .calls(1)
        .start();
    let admin = proxy.admin;
    wait_for(
        "the call to be answered",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || (dialog_stats(admin).active == 1).then_some(()),
    );
    let client = client.wait(Duration::from_secs(15));
    let took = t0.elapsed();
    eprintln!("{} (wall {took:?})", client.summary());
    proxy.assert_running();
    let server = server.drain();
    eprintln!("{}", server.summary());

    client.assert_all_ok(1);
    assert_server_clean(&server);
    assert_eq!(server.invites(), 1, "{}", server.summary());
    assert_eq!(
        server.count("BYE_Recv"),
        1,
        "the server should have received the proxy's BYE: {}",
        server.summary()
    );
    assert!(
        took >= Duration::from_millis(1800),
        "the call ended after {took:?}, before its 2 s lifetime"
    );
    assert!(took < Duration::from_secs(10), "the call lasted {took:?}");

    let stats = wait_for(
        "expired=1 with nothing active",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let s = dialog_stats(admin);
            (s.expired == 1 && s.active == 0 && s.early == 0).then_some(s)
        },
    );
    eprintln!("final: {stats:?}");
    assert_eq!(stats.processed, 1, "{stats:?}");
    assert_eq!(
        stats.failed, 0,
        "an expired call was established: {stats:?}"
    );
    let ds = proxy.destinations();
    assert_eq!(dest(&ds, "1").load, 0, "load left behind: {ds:?}");
}
