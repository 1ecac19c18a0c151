//! IPv6 through the real proxy, driven by sipp: an IPv6 client calling IPv4 servers (the
//! proxy changes address family, so it must record-route twice), and IPv6 end to end.
//!
//! The only IPv6 loopback address is `::1`, shared by every test: these tests put their sipp
//! processes and proxy listeners there on ports of their own (16060..16099) and keep the
//! admin API on their own 127.0.1.N.
//!
//! Needs `sipp` (Debian package `sip-tester`). Run: `cargo test -p lb-proxy --test sipp_ipv6`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

const CALLS: u64 = 10;

fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
}

/// A proxy config: `listeners` as written, admin on the test's address, two destinations
/// `(id, uri)` with `pstn=100` and `pstn=50`.
fn config(env: &TestEnv, listeners: &[String], dests: &[(u32, String)]) -> String {
    let mut y = String::from("listeners:\n");
    for l in listeners {
        writeln!(y, "  - \"{l}\"").unwrap();
    }
    write!(
        y,
        "admin:\n  listen: {}\n\
         routing:\n  group: 1\n  resources: [pstn]\n  mode: absolute\n  maxAttempts: 3\n\
         timers:\n  t1: 500ms\n  inviteTimeout: 3s\n  inviteFinalTimeout: 30s\n\
         destinations:\n",
        env.admin_addr()
    )
    .unwrap();
    for (i, (id, uri)) in dests.iter().enumerate() {
        let cap = if i == 0 { 100 } else { 50 };
        writeln!(
            y,
            "  - id: {id}\n    group: 1\n    uri: \"{uri}\"\n    resources: pstn={cap}"
        )
        .unwrap();
    }
    y
}

/// The proxy with `config` and two servers running `server_scenario` at `servers` (for
/// destinations 1 and 2), once both are up.
fn start(
    env: &TestEnv,
    config: String,
    server_scenario: &'static str,
    [a1, a2]: [SocketAddr; 2],
) -> (Proxy, [Sipp; 2]) {
    let server = |name: &str, a| Sipp::uas(env, name).scenario(server_scenario).at(a);
    Sandbox::new(env)
        .custom_config(config)
        .server(Some("1"), server("server1", a1))
        .server(Some("2"), server("server2", a2))
        .start()
}

/// Runs `CALLS` calls of uac.xml from `client` to `target`, and checks every call succeeded
/// on every side, the servers took every INVITE between them, and the proxy ends idle with
/// the calls counted.
fn calls_succeed(
    env: &TestEnv,
    proxy: &mut Proxy,
    servers: [Sipp; 2],
    client: SocketAddr,
    target: SocketAddr,
) {
    let calls = CALLS.to_string();
    let client = Sipp::uac(env, "client")
        .at(client)
        .to(target.to_string())
        .rate(5)
        .limit(20)
        .hold(ms(500))
        .args(["-m", &calls])
        .run();
    eprintln!("{}", client.summary());
    proxy.assert_running();

    let reports = drain_all(servers.into());
    // uas_double_rr.xml counts an INVITE without the double Record-Route as a failed call.
    assert_calls_clean(&client, &reports, CALLS);

    let stats = proxy.wait_idle(Duration::from_secs(10));
    assert_eq!(stats.processed, CALLS, "proxy dialog stats: {stats:?}");
    assert_eq!(stats.failed, 0, "proxy dialog stats: {stats:?}");
}

#[test]
fn ipv6_client_to_ipv4_servers() {
    let env = test_env!("ipv6_to_ipv4", "127.0.1.20");
    let proxy_v6 = v6(16060);
    let listeners = [
        format!("udp:{proxy_v6}"),
        format!("udp:{}", env.proxy_target()),
    ];
    let dests = [
        (1, format!("sip:{}", env.addr(SERVER1_PORT))),
        (2, format!("sip:{}", env.addr(SERVER2_PORT))),
    ];
    let ip = env.ip.parse().unwrap();
    // The servers check the INVITE's Record-Route: an IPv4 entry with ;r2=on (towards them)
    // above an IPv6 one (towards the client).
    let (mut proxy, servers) = start(
        &env,
        config(&env, &listeners, &dests),
        "uas_double_rr.xml",
        [
            SocketAddr::new(ip, SERVER1_PORT),
            SocketAddr::new(ip, SERVER2_PORT),
        ],
    );
    calls_succeed(&env, &mut proxy, servers, v6(16070), proxy_v6);
}

#[test]
fn ipv6_end_to_end() {
    // Its sipp processes share ::1 with the other test's client: slots from 50 keep their
    // media ports (20000 + 10 × slot) apart.
    let env = test_env!("ipv6_end_to_end", "127.0.1.21").with_sipp_slots(50);
    let proxy_v6 = v6(16062);
    let (s1, s2) = (v6(16080), v6(16090));
    let listeners = [format!("udp:{proxy_v6}")];
    let dests = [(1, format!("sip:{s1}")), (2, format!("sip:{s2}"))];
    let (mut proxy, servers) = start(&env, config(&env, &listeners, &dests), "uas.xml", [s1, s2]);
    let ds = proxy.destinations();
    for (id, a) in [("1", s1), ("2", s2)] {
        let d = dest(&ds, id);
        assert_eq!(d.uri, format!("sip:{a}"), "destination {id}: {d:?}");
    }
    calls_succeed(&env, &mut proxy, servers, v6(16072), proxy_v6);
}
