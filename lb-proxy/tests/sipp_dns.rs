//! A destination given by host name is resolved (through the system resolver, here
//! `localhost` from /etc/hosts) and takes calls at the resolved address.
//!
//! Needs `sipp`. Run: `cargo test -p lb-proxy --test sipp_dns`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::net::SocketAddr;
use std::time::Duration;

#[test]
fn host_name_destination_is_resolved_and_takes_calls() {
    let env = test_env!("dns_destination", "127.0.1.40");
    let ip = &env.ip;
    // Only `localhost` resolves without a network here; it is 127.0.0.1 (and ::1, which the
    // proxy passes over for its IPv4 listener). Port 15180 is used by no other test.
    let config = format!(
        "listeners: [\"udp:{ip}:{PROXY_PORT}\"]\n\
         admin: {{listen: \"{ip}:{ADMIN_PORT}\"}}\n\
         dns: {{refreshInterval: 1s}}\n\
         destinations:\n  - {{id: named, uri: \"sip:localhost:15180\", resources: pstn=10}}\n"
    );
    let server_addr: SocketAddr = "127.0.0.1:15180".parse().unwrap();
    let (mut proxy, [server]) = Sandbox::new(&env)
        .custom_config(config)
        .server(Some("named"), Sipp::uas(&env, "server").at(server_addr))
        .start();
    let d = destination_json(proxy.admin, "named").expect("listed");
    assert_eq!(
        d["address"], "127.0.0.1:15180",
        "resolved to the IPv4 address: {d}"
    );

    let client = Sipp::uac(&env, "client")
        .calls(5)
        .rate(5)
        .limit(10)
        .hold(ms(100))
        .run();
    proxy.assert_running();
    let server = server.drain();
    client.assert_all_ok(5);
    assert_eq!(server.invites(), 5, "every call reached the named server");
    proxy.wait_idle(Duration::from_secs(10));
}
