//! Failover and admission through the real proxy, driven by sipp: a destination that does
//! not answer, one that answers 503, and no capacity left at all.
//!
//! Needs `sipp` (Debian package `sip-tester`). Run: `cargo test -p lb-proxy --test sipp_failover`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::time::{Duration, Instant};

#[test]
fn dead_destination_fails_over_and_is_marked_down() {
    let env = test_env!("dead_destination", "127.0.1.8");
    // Destination 2 (nothing listens on :5090) has the larger capacity, so it is tried first;
    // with no answer in inviteTimeout (3 s) the call must fail over to destination 1.
    let (mut proxy, [s1]) = Sandbox::new(&env)
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=50"), "uas.xml")
        .dest(Dest::udp(2, SERVER2_PORT, "pstn=100"))
        .start();

    let client = Sipp::uac(&env, "client")
        .timeout(secs(40))
        .calls(10)
        .rate(2)
        .limit(20)
        .hold(ms(200))
        .run();
    eprintln!("{}", client.summary());
    proxy.assert_running();
    let ds = proxy.destinations();
    eprintln!("destinations after the calls: {ds:?}");

    let s1 = s1.drain();
    eprintln!("{}", s1.summary());

    client.assert_all_ok(10);
    assert_server_clean(&s1);
    assert_eq!(s1.invites(), 10, "server1 should have answered every call");
    assert_eq!(
        dest(&ds, "2").state,
        "down",
        "the destination that never answered should be down: {ds:?}"
    );
    assert_eq!(dest(&ds, "1").state, "up", "{ds:?}");
    proxy.wait_idle(Duration::from_secs(10));
}

#[test]
fn destination_answering_503_fails_over() {
    let env = test_env!("destination_503", "127.0.1.9");
    // Destination 2 (larger capacity, tried first) refuses every INVITE with 503: the proxy
    // must ACK the 503 and send the call to destination 1; the client never sees the 503.
    let (mut proxy, [good, bad]) = Sandbox::new(&env)
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=50"), "uas.xml")
        .serve_as(
            "server2_503",
            Dest::udp(2, SERVER2_PORT, "pstn=100"),
            "uas_503.xml",
        )
        .start();

    let client = Sipp::uac(&env, "client")
        .calls(10)
        .rate(5)
        .limit(20)
        .hold(ms(300))
        .run();
    eprintln!("{}", client.summary());
    proxy.assert_running();

    let [good, bad] = drain([good, bad]);
    eprintln!("{}\n{}", good.summary(), bad.summary());

    client.assert_all_ok(10);
    assert!(
        bad.invites() >= 1,
        "the 503 server never saw an INVITE, so failover was not exercised: {}",
        bad.summary()
    );
    // Every 503 it sent was ACKed (otherwise its calls fail on retransmission timeout).
    assert_server_clean(&bad);
    assert_server_clean(&good);
    assert_eq!(
        good.invites(),
        10,
        "the good server should have answered every call"
    );
    proxy.wait_idle(Duration::from_secs(10));
}

#[test]
fn no_capacity_left_answers_503_at_once() {
    let env = test_env!("capacity_exhausted", "127.0.1.10");
    let (mut proxy, [s1, s2]) = Sandbox::new(&env)
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=2"), "uas.xml")
        .serve(Dest::udp(2, SERVER2_PORT, "pstn=1"), "uas.xml")
        .start();

    // Three calls of 6 s fill capacities 2 + 1.
    let long = Sipp::uac(&env, "long_calls")
        .calls(3)
        .rate(10)
        .limit(3)
        .hold(ms(6000))
        .start();
    let admin = proxy.admin;
    wait_for(
        "the 3 calls to fill both destinations (loads 2 and 1)",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            let ds = destinations(admin);
            (dest(&ds, "1").load == 2 && dest(&ds, "2").load == 1).then_some(())
        },
    );

    // A 4th call must be refused by the proxy itself, at once, with 503 and Retry-After
    // (uac_expect_503.xml checks the header), not after a server timeout.
    let t0 = Instant::now();
    let fourth = Sipp::uac(&env, "fourth_call")
        .scenario("uac_expect_503.xml")
        .port(CLIENT2_PORT)
        .timeout(secs(10))
        .calls(1)
        .run();
    let took = t0.elapsed();
    eprintln!("{} (wall {took:?})", fourth.summary());
    fourth.assert_all_ok(1);
    let rt = fourth.response_time();
    assert!(
        rt < Duration::from_millis(1000),
        "the 503 should come at once (no server is asked), came after {rt:?}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "the refused call took {took:?} in all (inviteTimeout is 3 s)"
    );
    let ds = proxy.destinations();
    assert_eq!(
        (dest(&ds, "1").load, dest(&ds, "2").load),
        (2, 1),
        "the refused call must not add load: {ds:?}"
    );

    let long = long.wait(Duration::from_secs(30));
    eprintln!("{}", long.summary());
    proxy.assert_running();
    let [s1, s2] = drain([s1, s2]);
    long.assert_all_ok(3);
    assert_server_clean(&s1);
    assert_server_clean(&s2);
    assert_eq!(
        s1.invites() + s2.invites(),
        3,
        "the refused call must not reach a server"
    );
    let stats = proxy.wait_idle(Duration::from_secs(10));
    eprintln!("final stats {stats:?}");
}
