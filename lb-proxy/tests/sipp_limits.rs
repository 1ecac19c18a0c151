//! Limits and flood defences against real peers (docs/configuration.md `limits`, `tcp`,
//! `udp`): the per-source rate limit refuses the flooding source only, too many header fields
//! get a 400, a datagram over the size limit is dropped, the TCP connection limits refuse the
//! extra connections while calls on the admitted ones go on, a slowloris connection is closed,
//! the pending-transaction limit answers 503, and 20,000 INVITEs refused for capacity leave
//! the proxy's memory flat.
//!
//! Addresses: 127.0.1.41 to 127.0.1.49 (a second source address where a test needs one).
//!
//! Needs `sipp` (Debian package `sip-tester`). Run: `cargo test -p lb-proxy --test sipp_limits`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use socket2::{Domain, Socket, Type};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

/// The value of the sample `name{labels}` (labels as `k=v` pairs; none for a plain metric).
fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let all = parse_metrics(&metrics_text(admin));
    let found: Vec<&MetricSample> = all
        .iter()
        .filter(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.label(k) == Some(v))
        })
        .collect();
    assert_eq!(found.len(), 1, "one sample {name}{labels:?}, got {found:?}");
    found[0].value
}

fn limited(admin: SocketAddr, reason: &str) -> u64 {
    metric(
        admin,
        "mrcp_lb_requests_limited_total",
        &[("reason", reason)],
    ) as u64
}

/// A TCP connection to `to` from `from_ip` (any port): the source address the proxy sees.
fn try_connect_from(from_ip: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let local: SocketAddr = format!("{from_ip}:0").parse().unwrap();
    s.bind(&local.into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(2))?;
    let s: TcpStream = s.into();
    s.set_nodelay(true)?;
    Ok(s)
}

fn connect_from(from_ip: &str, to: SocketAddr) -> TcpStream {
    try_connect_from(from_ip, to).unwrap_or_else(|e| panic!("connect {from_ip} -> {to}: {e}"))
}

/// An out-of-dialog OPTIONS from the connection's own address.
fn options(local: SocketAddr, proxy: SocketAddr, id: &str) -> String {
    format!(
        "OPTIONS sip:{proxy} SIP/2.0\r\n\
         Via: SIP/2.0/TCP {local};branch=z9hG4bK-{id}\r\n\
         From: <sip:limits@{local}>;tag={id}\r\n\
         To: <sip:{proxy}>\r\n\
         Call-ID: {id}@limits\r\n\
         CSeq: 1 OPTIONS\r\n\
         Max-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// What became of a connection: a SIP message head read from it, closed by the proxy, or
/// nothing within the timeout.
#[derive(Debug, PartialEq)]
enum Outcome {
    Message(String),
    Closed,
    Silent,
}

fn read_head(s: &mut TcpStream, timeout: Duration) -> Outcome {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return Outcome::Closed,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if text.contains("\r\n\r\n") {
                    return Outcome::Message(text);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return Outcome::Closed
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Outcome::Silent
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Sends an OPTIONS over `s` and expects the proxy's 200.
fn assert_answers(s: &mut TcpStream, proxy: SocketAddr, id: &str) {
    let local = s.local_addr().unwrap();
    s.write_all(options(local, proxy, id).as_bytes())
        .unwrap_or_else(|e| panic!("{id}: write on an admitted connection: {e}"));
    match read_head(s, Duration::from_secs(5)) {
        Outcome::Message(m) => assert!(m.starts_with("SIP/2.0 200 "), "{id}: {m}"),
        other => panic!("{id}: no answer to OPTIONS on an admitted connection: {other:?}"),
    }
}

/// Connects from `from_ip` and expects the proxy to drop the connection at once, without
/// answering anything. (The kernel completes the handshake before the proxy sees the
/// connection, so the reset comes after it: during the connect, or on the first read.)
fn assert_refused(from_ip: &str, proxy: SocketAddr, id: &str) {
    let mut s = match try_connect_from(from_ip, proxy) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
        Err(e) => panic!("{id}: connect: {e}"),
    };
    let s = &mut s;
    let local = s.local_addr().unwrap();
    // The write may already fail: the proxy reset the connection.
    let _ = s.write_all(options(local, proxy, id).as_bytes());
    match read_head(s, Duration::from_secs(3)) {
        Outcome::Closed => {}
        other => panic!("{id}: connection beyond the limit not refused: {other:?}"),
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

#[test]
fn per_source_rate_limit_refuses_the_flooding_source_only() {
    let env = test_env!("limits-rate", "127.0.1.41");
    let flood_ip = "127.0.1.42";
    let dests = [
        Dest::udp(1, SERVER1_PORT, "pstn=1000"),
        Dest::udp(2, SERVER2_PORT, "pstn=1000"),
    ];
    let extra = "limits:\n  perSource: {rate: 10, window: 1s, burst: 10}\n";
    let (mut proxy, [s1, s2]) = Sandbox::new(&env)
        .dests(&dests)
        .uas("server1", SERVER1_PORT, "uas.xml")
        .uas("server2", SERVER2_PORT, "uas.xml")
        .extra(extra)
        .start();

    // A normal client at 5 calls/s, under the limit, for 6 s.
    let normal = Sipp::uac(&env, "normal")
        .timeout(secs(60))
        .calls(30)
        .rate(5)
        .hold(ms(200))
        .start();
    // Meanwhile another source floods at 200 INVITEs/s for 3 s.
    let flood = Sipp::uac(&env, "flood")
        .scenario("uac_200_or_503.xml")
        .at(format!("{flood_ip}:{CLIENT_PORT}").parse().unwrap())
        .to(env.proxy_target())
        .timeout(secs(60))
        .calls(600)
        .rate(200)
        .hold(ms(100))
        .limit(600)
        .args(["-trace_counts"])
        .start();
    let flood = flood.wait(Duration::from_secs(60));
    let normal = normal.wait(Duration::from_secs(60));
    eprintln!("{}\n{}", normal.summary(), flood.summary());
    let [s1, s2] = drain([s1, s2]);
    proxy.assert_running();

    normal.assert_all_ok(30);
    // Every flood call ended as its scenario allows: 200 (then BYE) or 503 with Retry-After.
    flood.assert_all_ok(600);
    let refused = flood.count("503_Recv");
    let allowed = 600 - refused;
    let secs = flood.elapsed.as_secs_f64();
    eprintln!("flood: {allowed} allowed, {refused} refused in {secs:.1} s");
    assert!(allowed >= 10, "the burst of 10 passes: {allowed} allowed");
    assert!(
        (allowed as f64) <= 10.0 + 10.0 * (secs + 1.0),
        "at most burst + rate × time get through: {allowed} in {secs:.1} s"
    );
    // Each refusal was counted, retransmitted INVITEs answered again included.
    assert_eq!(
        limited(proxy.admin, "source_rate"),
        refused + flood.count("503_Retrans"),
        "mrcp_lb_requests_limited_total{{reason=\"source_rate\"}}"
    );
    assert_eq!(
        s1.invites() + s2.invites(),
        30 + allowed,
        "the servers saw the normal calls and the allowed flood calls only"
    );
    assert_server_clean(&s1);
    assert_server_clean(&s2);
    assert_eq!(
        metric(proxy.admin, "mrcp_lb_rate_limit_sources", &[]),
        2.0,
        "two sources tracked"
    );
}

/// An OPTIONS to the proxy from `me` with a body of `body_len` bytes.
fn udp_options(me: SocketAddr, proxy: SocketAddr, id: &str, body_len: usize) -> Vec<u8> {
    format!(
        "OPTIONS sip:{proxy} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-{id}\r\n\
         From: <sip:limits@{me}>;tag={id}\r\nTo: <sip:{proxy}>\r\nCall-ID: {id}@limits\r\n\
         CSeq: 1 OPTIONS\r\nContent-Type: text/plain\r\nContent-Length: {body_len}\r\n\r\n{}",
        "x".repeat(body_len)
    )
    .into_bytes()
}

#[test]
fn too_many_header_fields_get_400_oversized_datagrams_are_dropped() {
    let env = test_env!("limits-headers", "127.0.1.43");
    let dests = [Dest::udp(1, SERVER1_PORT, "pstn=100")];
    let extra = "limits:\n  maxHeaders: 32\nudp:\n  maxMessageSize: 4096\n";
    let (mut proxy, [s1]) = Sandbox::new(&env)
        .dests(&dests)
        .uas("server1", SERVER1_PORT, "uas.xml")
        .extra(extra)
        .start();
    let malformed_before = stats_number(proxy.admin, "malformed");

    let normal = Sipp::uac(&env, "normal")
        .timeout(secs(60))
        .calls(10)
        .rate(10)
        .hold(ms(100))
        .start();
    // 51 header fields each, over UDP and over TCP.
    let many_udp = Sipp::uac(&env, "many-udp")
        .scenario("uac_many_headers_expect_400.xml")
        .port(CLIENT2_PORT)
        .calls(5)
        .rate(10)
        .args(["-trace_counts"])
        .start();
    let many_tcp = Sipp::uac(&env, "many-tcp")
        .scenario("uac_many_headers_expect_400.xml")
        .port(5072)
        .tcp()
        .calls(5)
        .rate(10)
        .args(["-trace_counts"])
        .start();
    // A request whose From comes after 40 padding fields: a 400 cannot be addressed from
    // what lies within the limit, so it is dropped (and counted).
    let sock = UdpSocket::bind(env.addr(5075)).unwrap();
    let me = sock.local_addr().unwrap();
    let proxy_addr: SocketAddr = env.proxy_target().parse().unwrap();
    let mut raw = format!(
        "INVITE sip:service@{proxy_addr} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-raw\r\n"
    );
    for i in 0..40 {
        raw.push_str(&format!("X-Pad-{i}: {i}\r\n"));
    }
    raw.push_str(&format!(
        "From: <sip:raw@{me}>;tag=raw\r\nTo: <sip:service@{proxy_addr}>\r\nCall-ID: raw@x\r\n\
         CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ));
    sock.send_to(raw.as_bytes(), proxy_addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 8192];
    if let Ok((n, _)) = sock.recv_from(&mut buf) {
        panic!(
            "an unaddressable message got an answer: {}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    // udp.maxMessageSize 4096: a 3,000-byte OPTIONS is answered, a 5,000-byte one dropped.
    let small = udp_options(me, proxy_addr, "small", 2700);
    assert!(small.len() < 4096);
    sock.send_to(&small, proxy_addr).unwrap();
    let (n, _) = sock
        .recv_from(&mut buf)
        .expect("no answer to an OPTIONS under udp.maxMessageSize");
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(answer.starts_with("SIP/2.0 200 "), "{answer}");
    let big = udp_options(me, proxy_addr, "big", 4700);
    assert!(big.len() > 4096);
    sock.send_to(&big, proxy_addr).unwrap();
    if let Ok((n, _)) = sock.recv_from(&mut buf) {
        panic!(
            "a datagram over udp.maxMessageSize got an answer: {}",
            String::from_utf8_lossy(&buf[..n])
        );
    }

    let (normal, many_udp, many_tcp) = (
        normal.wait(Duration::from_secs(60)),
        many_udp.wait(Duration::from_secs(30)),
        many_tcp.wait(Duration::from_secs(30)),
    );
    eprintln!(
        "{}\n{}\n{}",
        normal.summary(),
        many_udp.summary(),
        many_tcp.summary()
    );
    let s1 = s1.drain();
    proxy.assert_running();
    normal.assert_all_ok(10);
    many_udp.assert_all_ok(5);
    many_tcp.assert_all_ok(5);
    assert_server_clean(&s1);
    assert_eq!(
        s1.invites(),
        10,
        "no INVITE with too many fields was forwarded"
    );
    let malformed = stats_number(proxy.admin, "malformed");
    assert_eq!(
        malformed - malformed_before,
        12 + many_udp.count("INVITE_Retrans") + many_tcp.count("INVITE_Retrans"),
        "10 answered 400, one unaddressable and one oversized dropped, all counted malformed"
    );
}

#[test]
fn tcp_connection_limits_refuse_extra_connections_while_calls_go_on() {
    let env = test_env!("limits-tcp-conns", "127.0.1.44");
    let (other, third) = ("127.0.1.45", "127.0.1.46");
    let dests = [Dest::udp(1, SERVER1_PORT, "pstn=100")];
    let extra = "tcp:\n  maxConnections: 4\n  maxConnectionsPerSource: 2\n";
    let (mut proxy, [s1]) = Sandbox::new(&env)
        .dests(&dests)
        .uas("server1", SERVER1_PORT, "uas.xml")
        .extra(extra)
        .start();
    let proxy_addr: SocketAddr = env.proxy_target().parse().unwrap();

    // sipp over one TCP connection from the test's address: 20 calls over about 6 s.
    let client = Sipp::uac(&env, "client")
        .tcp()
        .timeout(secs(60))
        .calls(20)
        .rate(4)
        .hold(ms(500))
        .start();
    wait_for(
        "sipp's first call",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || (stats_number(proxy.admin, "routed") >= 1).then_some(()),
    );

    // The second connection from this source is admitted, the third and fourth refused.
    let ip = env.ip.as_str();
    let mut a = connect_from(ip, proxy_addr);
    assert_answers(&mut a, proxy_addr, "conn-a");
    assert_refused(ip, proxy_addr, "conn-b");
    assert_refused(ip, proxy_addr, "conn-c");
    // Another source has its own allowance, until the total of 4 is reached.
    let mut d = connect_from(other, proxy_addr);
    assert_answers(&mut d, proxy_addr, "conn-d");
    let mut e = connect_from(other, proxy_addr);
    assert_answers(&mut e, proxy_addr, "conn-e");
    assert_refused(third, proxy_addr, "conn-f");
    assert_eq!(
        metric(
            proxy.admin,
            "mrcp_lb_tcp_connections_refused_total",
            &[("reason", "per_source")]
        ),
        2.0
    );
    assert_eq!(
        metric(
            proxy.admin,
            "mrcp_lb_tcp_connections_refused_total",
            &[("reason", "total")]
        ),
        1.0
    );
    assert_eq!(metric(proxy.admin, "mrcp_lb_tcp_connections", &[]), 4.0);
    // A closed connection gives its place back.
    drop(a);
    let mut g = wait_for(
        "the closed connection's place to be free",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || {
            let mut g = try_connect_from(ip, proxy_addr).ok()?;
            let local = g.local_addr().unwrap();
            let _ = g.write_all(options(local, proxy_addr, "conn-g").as_bytes());
            match read_head(&mut g, Duration::from_secs(2)) {
                Outcome::Message(m) if m.starts_with("SIP/2.0 200 ") => Some(g),
                _ => None,
            }
        },
    );
    assert_answers(&mut g, proxy_addr, "conn-g2");

    let client = client.wait(Duration::from_secs(60));
    eprintln!("{}", client.summary());
    let s1 = s1.drain();
    proxy.assert_running();
    client.assert_all_ok(20);
    assert_server_clean(&s1);
    assert_eq!(s1.invites(), 20);
}

#[test]
fn slowloris_connection_is_closed_while_calls_go_on() {
    let env = test_env!("limits-slowloris", "127.0.1.47");
    let dests = [Dest::udp(1, SERVER1_PORT, "pstn=100")];
    let extra = "tcp:\n  messageTimeout: 1s\n";
    let (mut proxy, [s1]) = Sandbox::new(&env)
        .dests(&dests)
        .uas("server1", SERVER1_PORT, "uas.xml")
        .extra(extra)
        .start();
    let proxy_addr: SocketAddr = env.proxy_target().parse().unwrap();

    // Calls over TCP whose connection is silent for more than 1 s between messages.
    let client = Sipp::uac(&env, "client")
        .tcp()
        .timeout(secs(60))
        .calls(6)
        .rate(2)
        .hold(ms(1500))
        .start();

    // The slowloris: the start of a request, then one byte every 200 ms. Each byte resets an
    // idle timer; the message deadline is what closes it.
    let mut slow = connect_from(&env.ip, proxy_addr);
    let msg = options(slow.local_addr().unwrap(), proxy_addr, "slowloris");
    let started = Instant::now();
    slow.write_all(&msg.as_bytes()[..40]).unwrap();
    let mut closed_after = None;
    for byte in &msg.as_bytes()[40..60] {
        if slow.write_all(std::slice::from_ref(byte)).is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        match read_head(&mut slow, Duration::from_millis(200)) {
            Outcome::Closed => {
                closed_after = Some(started.elapsed());
                break;
            }
            Outcome::Silent => {}
            Outcome::Message(m) => panic!("the slowloris got an answer: {m}"),
        }
    }
    let closed_after = closed_after.expect("the slowloris connection was never closed (4 s)");
    eprintln!("slowloris closed after {closed_after:?}");
    assert!(
        closed_after >= Duration::from_millis(800) && closed_after < Duration::from_secs(3),
        "closed after {closed_after:?}, expected about tcp.messageTimeout (1 s)"
    );

    // A peer sending whole messages, slowly, is not affected: four OPTIONS over 2.4 s, and
    // one split in two halves 500 ms apart.
    let mut steady = connect_from(&env.ip, proxy_addr);
    for i in 0..4 {
        assert_answers(&mut steady, proxy_addr, &format!("steady-{i}"));
        thread::sleep(Duration::from_millis(600));
    }
    let msg = options(steady.local_addr().unwrap(), proxy_addr, "halves");
    steady.write_all(&msg.as_bytes()[..50]).unwrap();
    thread::sleep(Duration::from_millis(500));
    steady.write_all(&msg.as_bytes()[50..]).unwrap();
    match read_head(&mut steady, Duration::from_secs(3)) {
        Outcome::Message(m) => assert!(m.starts_with("SIP/2.0 200 "), "{m}"),
        other => panic!("a message in two halves 500 ms apart: {other:?}"),
    }

    let client = client.wait(Duration::from_secs(60));
    eprintln!("{}", client.summary());
    let s1 = s1.drain();
    proxy.assert_running();
    client.assert_all_ok(6);
    assert_server_clean(&s1);
    let timed_out = |reason| {
        metric(
            proxy.admin,
            "mrcp_lb_tcp_connections_timed_out_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(timed_out("message"), 1.0, "the slowloris only");
    assert_eq!(timed_out("idle"), 0.0);
}

#[test]
fn pending_transaction_limit_answers_503() {
    let env = test_env!("limits-pending", "127.0.1.48");
    let dests = [
        Dest::udp(1, SERVER1_PORT, "pstn=100"),
        Dest::udp(2, SERVER2_PORT, "pstn=100"),
    ];
    let extra = "limits:\n  maxPendingTransactions: 3\n";
    // Servers that answer 2 s after their 100: transactions stay pending that long.
    fn slow(s: SippBuilder<'_>) -> SippBuilder<'_> {
        s.scenario("uas_slow.xml").pause(ms(2000))
    }
    let (mut proxy, [s1, s2]) = Sandbox::new(&env)
        .dests(&dests)
        .uas_with("server1", SERVER1_PORT, slow)
        .uas_with("server2", SERVER2_PORT, slow)
        .extra(extra)
        .start();

    let first = Sipp::uac(&env, "first")
        .timeout(secs(60))
        .calls(3)
        .rate(50)
        .hold(ms(100))
        .start();
    wait_for(
        "three INVITEs forwarded",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || (stats_number(proxy.admin, "routed") >= 3).then_some(()),
    );
    // Three pending: the next INVITEs are refused, statelessly, with Retry-After.
    let refused = Sipp::uac(&env, "refused")
        .scenario("uac_expect_503.xml")
        .port(CLIENT2_PORT)
        .calls(5)
        .rate(20)
        .args(["-trace_counts"])
        .start();
    let refused = refused.wait(Duration::from_secs(30));
    eprintln!("{}", refused.summary());
    let routed_meanwhile = stats_number(proxy.admin, "routed");
    let first = first.wait(Duration::from_secs(60));
    eprintln!("{}", first.summary());
    let [s1, s2] = drain([s1, s2]);
    proxy.assert_running();

    refused.assert_all_ok(5);
    assert_eq!(
        routed_meanwhile, 3,
        "nothing forwarded while the limit held"
    );
    first.assert_all_ok(3);
    assert_server_clean(&s1);
    assert_server_clean(&s2);
    assert_eq!(s1.invites() + s2.invites(), 3);
    assert_eq!(
        limited(proxy.admin, "transactions"),
        5 + refused.count("INVITE_Retrans"),
        "mrcp_lb_requests_limited_total{{reason=\"transactions\"}}"
    );
}

/// INVITEs refused for capacity keep no state, so 20,000 of them leave the proxy's resident
/// memory where it was.
#[test]
fn refused_invites_keep_memory_flat() {
    let env = test_env!("limits-memory", "127.0.1.49");
    let dests = [Dest::udp(1, SERVER1_PORT, "pstn=0")];
    let (mut proxy, [s1]) = Sandbox::new(&env)
        .dests(&dests)
        .uas("server1", SERVER1_PORT, "uas.xml")
        .start();
    let pid = proxy.guard.pid();

    let run = |name: &str, calls: u64| {
        let c = Sipp::uac(&env, name)
            .scenario("uac_expect_503.xml")
            .timeout(secs(120))
            .calls(calls)
            .rate(2000)
            .limit(4000)
            .start();
        let r = c.wait(Duration::from_secs(120));
        eprintln!("{}", r.summary());
        r.assert_all_ok(calls);
    };
    // Warm up (allocator pools, buffers, the admin API), then measure.
    run("warmup", 2000);
    thread::sleep(Duration::from_millis(500));
    let before = vm_rss_kib(pid);
    run("flood", 20_000);
    thread::sleep(Duration::from_millis(500));
    let after = vm_rss_kib(pid);
    eprintln!("VmRSS {before} KiB before, {after} KiB after 20,000 refused INVITEs");
    proxy.assert_running();
    let s1 = s1.stop();
    assert_eq!(s1.invites(), 0);
    assert!(
        stats_number(proxy.admin, "rejectedNoCapacity") >= 22_000,
        "every INVITE was refused for capacity"
    );
    let stats = proxy.stats();
    assert_eq!((stats.active, stats.early), (0, 0));
    // Keeping each refused call's transaction until its ACK (and 5 s beyond) would hold
    // thousands at 2,000/s: tens of MiB.
    assert!(
        after <= before + 4096,
        "resident memory grew by {} KiB over 20,000 refused INVITEs",
        after.saturating_sub(before)
    );
}
