//! Calls through the real proxy over each transport combination and dialog shape, driven by
//! sipp. Every call must succeed on both sides.
//!
//! Needs `sipp` (Debian package `sip-tester`). Run: `cargo test -p lb-proxy --test sipp_transport`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::time::Duration;

const CALLS: u64 = 10;

fn two_udp_dests() -> Vec<Dest> {
    vec![
        Dest::udp(1, SERVER1_PORT, "pstn=100"),
        Dest::udp(2, SERVER2_PORT, "pstn=50"),
    ]
}

/// Runs `CALLS` calls of `client_scenario` over `client_transport` against two servers running
/// `server_scenario`, and checks every call succeeded on the client and on the servers, the
/// servers took every INVITE between them, and the proxy ends idle.
fn calls_succeed(
    env: &TestEnv,
    dests: &[Dest],
    server_scenario: &'static str,
    server_pause_ms: u64,
    client_scenario: Scenario,
    client_transport: Transport,
    client_args: &[&str],
) -> (SippReport, Vec<SippReport>) {
    let (mut proxy, servers) = dests
        .iter()
        .fold(Sandbox::new(env), |sandbox, d| {
            sandbox.serve_with(d.clone(), |s| {
                s.scenario(server_scenario).pause(ms(server_pause_ms))
            })
        })
        .start_all();

    let calls = CALLS.to_string();
    let mut args = vec!["-m", calls.as_str(), "-r", "5", "-l", "20"];
    args.extend_from_slice(client_args);
    let client = Sipp::uac(env, "client")
        .play(client_scenario)
        .transport(client_transport)
        .args(args)
        .run();
    eprintln!("{}", client.summary());
    proxy.assert_running();

    let reports = drain_all(servers);
    assert_calls_clean(&client, &reports, CALLS);

    let stats = proxy.wait_idle(Duration::from_secs(10));
    assert_eq!(stats.processed, CALLS, "proxy dialog stats: {stats:?}");
    (client, reports)
}

#[test]
fn udp_client_to_udp_servers() {
    let env = test_env!("udp_udp", "127.0.1.3");
    calls_succeed(
        &env,
        &two_udp_dests(),
        "uas.xml",
        0,
        Scenario::File("uac.xml"),
        Transport::Udp,
        &["-d", "500"],
    );
}

#[test]
fn tcp_client_to_udp_servers() {
    let env = test_env!("tcp_udp", "127.0.1.4");
    calls_succeed(
        &env,
        &two_udp_dests(),
        "uas.xml",
        0,
        Scenario::File("uac.xml"),
        Transport::Tcp,
        &["-d", "500"],
    );
}

#[test]
fn udp_client_to_tcp_server() {
    let env = test_env!("udp_tcp", "127.0.1.5");
    // The TCP server has the larger capacity, so absolute mode sends it the calls.
    let dests = [
        Dest::tcp(1, SERVER1_PORT, "pstn=100"),
        Dest::udp(2, SERVER2_PORT, "pstn=50"),
    ];
    let (_, servers) = calls_succeed(
        &env,
        &dests,
        "uas.xml",
        0,
        Scenario::File("uac.xml"),
        Transport::Udp,
        &["-d", "500"],
    );
    assert!(
        servers[0].invites() > 0,
        "the TCP server took no call: {}",
        servers[0].summary()
    );
}

#[test]
fn server_side_bye_goes_through_the_proxy() {
    let env = test_env!("server_bye", "127.0.1.6");
    // uas_bye.xml hangs up after 500 ms, sending its BYE to the top Record-Route; the client
    // (uac_long_expect_bye.xml) must receive it with its own dialog's tags and answer 200,
    // and the server must get that 200.
    calls_succeed(
        &env,
        &two_udp_dests(),
        "uas_bye.xml",
        500,
        Scenario::File("uac_long_expect_bye.xml"),
        Transport::Udp,
        &[],
    );
}

#[test]
fn client_ignoring_record_route_is_routed_by_dialog() {
    let env = test_env!("builtin_uac", "127.0.1.7");
    // sipp's built-in uac sends ACK and BYE to the proxy with its own R-URI and no Route
    // header: the proxy must route them by its dialog memory.
    calls_succeed(
        &env,
        &two_udp_dests(),
        "uas.xml",
        0,
        Scenario::Builtin("uac"),
        Transport::Udp,
        &["-d", "500"],
    );
}
