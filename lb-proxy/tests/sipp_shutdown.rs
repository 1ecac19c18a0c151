//! Graceful shutdown on SIGTERM, with sipp as the peers: readiness turns false at once, new
//! INVITEs get 503, calls set up before (and their transactions in flight) finish through the
//! proxy, and the process exits 0 as soon as nothing is open, or when `shutdown.drainPeriod`
//! ends.
//!
//! Needs `sipp` (Debian package `sip-tester`). Run: `cargo test -p lb-proxy --test sipp_shutdown`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

fn readyz(proxy: &Proxy) -> (u16, String) {
    http_get(proxy.admin, "/readyz").expect("GET /readyz")
}

/// Sends SIGTERM and returns when it was sent.
fn sigterm(proxy: &Proxy) -> Instant {
    let t = Instant::now();
    proxy.guard.signal("TERM");
    t
}

/// A proxy with destination 1 (pstn=10) and `shutdown.drainPeriod`; the test adds its server.
fn sandbox<'e>(env: &'e TestEnv, drain_period: &str) -> Sandbox<'e> {
    Sandbox::new(env)
        .dest(Dest::udp(1, SERVER1_PORT, "pstn=10"))
        .extra(&format!("shutdown:\n  drainPeriod: {drain_period}\n"))
}

/// Waits (at most `limit`) for the proxy to exit after the SIGTERM sent at `t0`; returns its
/// status and how long after the signal it went.
fn wait_exit(proxy: &mut Proxy, t0: Instant, limit: Duration) -> (ExitStatus, Duration) {
    let st = proxy
        .guard
        .wait_timeout(limit)
        .unwrap_or_else(|| panic!("lb-proxy did not exit within {limit:?} of SIGTERM"));
    let after = t0.elapsed();
    eprintln!("lb-proxy exited {after:?} after SIGTERM with {st}");
    (st, after)
}

/// Polls /readyz until it answers 503; returns how long after `since` that was, and the body.
fn wait_not_ready(proxy: &Proxy, since: Instant) -> (Duration, String) {
    wait_for(
        "/readyz to answer 503",
        Duration::from_secs(2),
        Duration::from_millis(10),
        || match readyz(proxy) {
            (503, body) => Some((since.elapsed(), body)),
            _ => None,
        },
    )
}

#[test]
fn sigterm_refuses_new_calls_finishes_open_ones_and_exits_when_they_end() {
    let env = test_env!("shutdown_drain", "127.0.1.64");
    // The server answers INVITE 1.5 s after its 100 and BYE 400 ms after receiving it, so
    // transactions are in flight when the signal comes and when the last dialog ends.
    let (mut proxy, [s1]) = sandbox(&env, "20s")
        .uas("server1", SERVER1_PORT, "uas_slow_bye.xml")
        .start();
    assert_eq!(readyz(&proxy).0, 200);

    // Three calls of 3 s: INVITE now, 200 after 1.5 s, BYE 3 s later, its 200 400 ms after.
    let calls = Sipp::uac(&env, "calls")
        .calls(3)
        .rate(10)
        .limit(3)
        .hold(ms(3000))
        .start();
    let admin = proxy.admin;
    wait_for(
        "the 3 INVITEs to reach the server",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || (dest(&destinations(admin), "1").load == 3).then_some(()),
    );
    let before = proxy.stats();
    assert_eq!(before.active, 0, "not answered yet: {before:?}");

    let t0 = sigterm(&proxy);
    let (not_ready_after, body) = wait_not_ready(&proxy, t0);
    eprintln!("/readyz 503 {not_ready_after:?} after SIGTERM: {body:?}");
    assert!(
        not_ready_after < Duration::from_millis(500),
        "readiness must turn false at once, took {not_ready_after:?}"
    );
    assert!(body.contains("draining"), "{body:?}");

    // A new call is refused at once with 503 and Retry-After (checked by the scenario).
    let refused = Sipp::uac(&env, "new_call")
        .scenario("uac_expect_503.xml")
        .port(CLIENT2_PORT)
        .timeout(secs(10))
        .calls(1)
        .run();
    eprintln!("{}", refused.summary());
    refused.assert_all_ok(1);
    assert!(
        refused.response_time() < Duration::from_millis(500),
        "the 503 should come at once, came after {:?}",
        refused.response_time()
    );

    // The open calls: answered after the signal, hung up through the proxy.
    let (st, exited_after) = wait_exit(&mut proxy, t0, Duration::from_secs(25));
    let calls = calls.wait(Duration::from_secs(30));
    eprintln!("{}", calls.summary());
    let s1 = s1.drain();
    eprintln!("{}", s1.summary());

    assert_eq!(st.code(), Some(0), "exit status after SIGTERM");
    calls.assert_all_ok(3);
    assert_server_clean(&s1);
    assert_eq!(
        s1.invites(),
        3,
        "only the calls set up before SIGTERM reach the server"
    );
    assert_eq!(s1.count("BYE_Recv"), 3, "every BYE was relayed");
    // The last 200 to a BYE comes 1.5 s + 3 s + 0.4 s after the INVITEs, which the signal
    // followed closely. The process must stay until then (the callers got it: checked above),
    // and go right after, long before the 20 s drain period.
    assert!(
        exited_after >= Duration::from_millis(3500),
        "exited {exited_after:?} after SIGTERM: before the open calls ended"
    );
    assert!(
        exited_after < Duration::from_secs(10),
        "exited {exited_after:?} after SIGTERM: it should go as soon as nothing is open"
    );
    assert!(proxy_log_contains(
        &proxy,
        "drained: no dialog or transaction open"
    ));
}

#[test]
fn drain_period_over_exits_0_with_calls_still_open() {
    let env = test_env!("shutdown_period", "127.0.1.65");
    // Nobody hangs up: both sides wait for a BYE.
    let (mut proxy, [s1]) = sandbox(&env, "3s")
        .uas("server1", SERVER1_PORT, "uas_expect_bye.xml")
        .start();
    let call = Sipp::uac(&env, "endless_call")
        .scenario("uac_long_expect_bye.xml")
        .timeout(secs(20))
        .calls(1)
        .start();
    let admin = proxy.admin;
    wait_for(
        "the call to be answered",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || (dialog_stats(admin).active == 1).then_some(()),
    );

    let t0 = sigterm(&proxy);
    wait_not_ready(&proxy, t0);
    let (st, exited_after) = wait_exit(&mut proxy, t0, Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "exit status after the drain period");
    assert!(
        exited_after >= Duration::from_millis(2900) && exited_after < Duration::from_secs(5),
        "with a call open the proxy should leave when the 3 s drain period ends, left after \
         {exited_after:?}"
    );
    assert!(proxy_log_contains(&proxy, "drain period over"));
    // The proxy does not end the call: both sides still hold it.
    assert_eq!(
        s1.live_stats()
            .get("CurrentCall")
            .and_then(|c| c.parse::<u64>().ok()),
        Some(1),
        "the server's call should still be open"
    );
    drop(call);
}

#[test]
fn sigterm_with_nothing_open_exits_0_at_once() {
    let env = test_env!("shutdown_idle", "127.0.1.66");
    let (mut proxy, []) = sandbox(&env, "30s").start();
    let t0 = sigterm(&proxy);
    let (st, took) = wait_exit(&mut proxy, t0, Duration::from_secs(10));
    assert_eq!(st.code(), Some(0));
    assert!(
        took < Duration::from_secs(1),
        "nothing open: no reason to wait, took {took:?}"
    );
}
