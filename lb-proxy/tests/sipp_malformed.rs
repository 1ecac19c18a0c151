//! Malformed input while calls go on: garbage datagrams and broken TCP streams sent to the
//! proxy must be answered `400 Bad Request` when they can be addressed, dropped otherwise,
//! counted in `/v1/dialogs/stats` `malformed`, and never disturb the calls sipp runs meanwhile
//! (README: "Malformed messages ... never disturb other calls").
//!
//! Needs `sipp` (Debian package `sip-tester`). Run: `cargo test -p lb-proxy --test sipp_malformed`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

const CALLS: u64 = 50;
/// The test's own UDP socket for garbage (no sipp uses it).
const GARBAGE_PORT: u16 = 5075;
/// Rounds of garbage sent during the calls.
const ROUNDS: usize = 3;

/// A well-formed INVITE with an SDP body from `from` (its Via, Contact) to the proxy at
/// `proxy`; the caller breaks it.
fn invite(from: SocketAddr, proxy: &str, call_id: &str, branch: &str) -> String {
    let body = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
                m=application 9 TCP/MRCPv2 1\r\na=resource:speechrecog\r\n";
    format!(
        "INVITE sip:service@{proxy} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch={branch}\r\n\
         From: <sip:garbage@{from}>;tag=g-{call_id}\r\n\
         To: <sip:service@{proxy}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:garbage@{from}>\r\n\
         Max-Forwards: 70\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Deterministic noise (xorshift), never all CR/LF (which would be a keep-alive).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    out[0] = 0xff;
    out
}

fn set_content_length(msg: &str, value: &str) -> String {
    let start = msg.find("Content-Length: ").expect("Content-Length") + "Content-Length: ".len();
    let end = start + msg[start..].find("\r\n").unwrap();
    format!("{}{value}{}", &msg[..start], &msg[end..])
}

/// The garbage of one round: (what, datagram, Call-ID when the request must get a 400).
fn datagrams(round: usize, me: SocketAddr, proxy: &str) -> Vec<(String, Vec<u8>, Option<String>)> {
    let id = |k: &str| format!("garbage-{k}-{round}@{}", me.ip());
    let branch = |k: &str| format!("z9hG4bK-garbage-{k}-{round}");
    let whole = invite(me, proxy, &id("trunc"), &branch("trunc"));
    // Cut in the middle of the headers: no end of headers.
    let truncated = whole[..whole.find("CSeq:").unwrap() + 3].to_string();
    let long_cl = set_content_length(&invite(me, proxy, &id("cl"), &branch("cl")), "9999");
    let bad_cseq = invite(me, proxy, &id("cseq"), &branch("cseq"))
        .replace("CSeq: 1 INVITE", "CSeq: abc INVITE");
    vec![
        (
            "random bytes".to_string(),
            noise(0x9e37_79b9_7f4a_7c15 + round as u64, 700),
            None,
        ),
        ("truncated INVITE".to_string(), truncated.into_bytes(), None),
        (
            "INVITE with Content-Length: 9999".to_string(),
            long_cl.into_bytes(),
            // RFC 3261 18.3: a request whose body is shorter than its Content-Length SHOULD
            // get a 400, and the README promises one whenever it can be addressed.
            Some(id("cl")),
        ),
        (
            "INVITE with CSeq: abc INVITE".to_string(),
            bad_cseq.into_bytes(),
            Some(id("cseq")),
        ),
    ]
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads a SIP message from a TCP stream: the head (and no body: a 400 has none). `Ok(None)`
/// when the proxy closed the connection; `Err` on a timeout.
fn read_tcp_message(s: &mut TcpStream, timeout: Duration) -> Result<Option<String>, String> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if text.contains("\r\n\r\n") {
                    return Ok(Some(text));
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(format!("{e} after {} bytes", buf.len())),
        }
    }
}

#[test]
fn garbage_during_calls_is_counted_answered_and_harmless() {
    let env = test_env!("malformed", "127.0.1.23");
    let dests = [
        Dest::udp(1, SERVER1_PORT, "pstn=100"),
        Dest::udp(2, SERVER2_PORT, "pstn=100"),
    ];
    let (mut proxy, [s1, s2]) = Sandbox::new(&env)
        .mode("relative")
        .dests(&dests)
        .uas("server1", SERVER1_PORT, "uas.xml")
        .uas("server2", SERVER2_PORT, "uas.xml")
        .start();
    let malformed_before = stats_number(proxy.admin, "malformed");

    let proxy_udp = env.proxy_target();
    let proxy_addr: SocketAddr = proxy_udp.parse().unwrap();
    let sock = UdpSocket::bind(env.addr(GARBAGE_PORT)).expect("bind garbage socket");
    let me = sock.local_addr().unwrap();

    // A steady stream of calls: 50 at 10/s, 1 s each.
    let calls = CALLS.to_string();
    let client = Sipp::uac(&env, "client")
        .timeout(secs(60))
        .rate(10)
        .limit(30)
        .hold(ms(1000))
        .args(["-m", &calls])
        .start();
    // Start once calls are up.
    wait_for(
        "the first calls to be set up",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || (stats_number(proxy.admin, "routed") >= 3).then_some(()),
    );

    let mut sent = 0u64;
    let mut want_400: Vec<String> = Vec::new();
    let mut tcp_results: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        for (what, data, answer) in datagrams(round, me, &proxy_udp) {
            eprintln!("round {round}: sending {what} ({} bytes)", data.len());
            sock.send_to(&data, proxy_addr).expect("send garbage");
            sent += 1;
            want_400.extend(answer);
        }
        match round {
            0 => {
                // A stream whose Content-Length cannot be read: it cannot be framed, so the
                // proxy must drop the connection (or answer 400), not wait on it.
                let mut tcp = TcpStream::connect(proxy_addr).expect("connect TCP listener");
                let local = tcp.local_addr().unwrap();
                let msg = set_content_length(
                    &invite(
                        local,
                        &proxy_udp,
                        "garbage-tcp-cl@x",
                        "z9hG4bK-garbage-tcp-cl",
                    )
                    .replace("SIP/2.0/UDP", "SIP/2.0/TCP"),
                    "abc",
                );
                tcp.write_all(msg.as_bytes()).unwrap();
                match read_tcp_message(&mut tcp, Duration::from_secs(5)) {
                    Ok(None) => tcp_results.push("bad Content-Length: connection closed".into()),
                    Ok(Some(r)) if r.starts_with("SIP/2.0 400") => {
                        tcp_results.push("bad Content-Length: 400".into())
                    }
                    Ok(Some(r)) => panic!("TCP message with Content-Length: abc got {r:?}"),
                    Err(e) => panic!(
                        "TCP message with Content-Length: abc: the proxy neither answered nor \
                         closed the connection within 5 s ({e})"
                    ),
                }
            }
            1 => {
                // A framable but malformed request over a fresh TCP connection: the TCP
                // listener still works and answers 400 on the same connection.
                let mut tcp = TcpStream::connect(proxy_addr).expect("connect TCP listener");
                let local = tcp.local_addr().unwrap();
                let msg = invite(
                    local,
                    &proxy_udp,
                    "garbage-tcp-cseq@x",
                    "z9hG4bK-garbage-tcp",
                )
                .replace("SIP/2.0/UDP", "SIP/2.0/TCP")
                .replace("CSeq: 1 INVITE", "CSeq: abc INVITE");
                tcp.write_all(msg.as_bytes()).unwrap();
                let r = read_tcp_message(&mut tcp, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("no answer over TCP to CSeq: abc INVITE: {e}"))
                    .unwrap_or_else(|| panic!("TCP connection closed on CSeq: abc INVITE"));
                assert!(
                    r.starts_with("SIP/2.0 400"),
                    "TCP CSeq: abc INVITE answered {r:?}"
                );
                assert_eq!(header(&r, "Call-ID"), Some("garbage-tcp-cseq@x"), "{r}");
                tcp_results.push("bad CSeq over TCP: 400".into());
            }
            _ => {}
        }
        thread::sleep(Duration::from_millis(700));
    }

    // Collect what came back to the garbage socket.
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut answers: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                eprintln!(
                    "garbage socket got from {from}: {}",
                    text.lines().next().unwrap_or("")
                );
                answers.push(text);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let got_all = want_400
                    .iter()
                    .all(|id| answers.iter().any(|a| header(a, "Call-ID") == Some(id)));
                if got_all {
                    break;
                }
            }
            Err(e) => panic!("garbage socket: {e}"),
        }
    }

    let client = client.wait(Duration::from_secs(60));
    eprintln!("{}", client.summary());
    proxy.assert_running();
    let [s1, s2] = drain([s1, s2]);
    eprintln!("{}\n{}", s1.summary(), s2.summary());
    eprintln!("TCP: {tcp_results:?}");

    // Every call went through, untouched by the garbage.
    client.assert_all_ok(CALLS);
    assert_server_clean(&s1);
    assert_server_clean(&s2);
    assert_eq!(
        s1.invites() + s2.invites(),
        CALLS,
        "servers took {} + {} INVITEs for {CALLS} calls (garbage forwarded?)",
        s1.invites(),
        s2.invites()
    );

    // The addressable malformed INVITEs (bad CSeq number; body shorter than Content-Length)
    // got their 400, to the Via (this socket).
    for id in &want_400 {
        let a = answers
            .iter()
            .find(|a| header(a, "Call-ID") == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no 400 for the malformed INVITE {id}; got {answers:#?}"));
        assert!(a.starts_with("SIP/2.0 400 "), "answer to {id}: {a}");
        let via = header(a, "Via").unwrap_or("");
        assert!(
            via.contains(&me.to_string()) && via.contains("z9hG4bK-garbage-"),
            "400 for {id} does not carry the request's Via: {a}"
        );
    }
    for a in &answers {
        assert!(
            a.starts_with("SIP/2.0 400 "),
            "only 400s may come back to the garbage socket, got: {a}"
        );
    }

    // Counted, and no dialog came of them.
    let malformed = stats_number(proxy.admin, "malformed");
    assert!(
        malformed >= malformed_before + sent,
        "malformed counter went from {malformed_before} to {malformed} after {sent} bad \
         datagrams"
    );
    let stats = proxy.wait_idle(Duration::from_secs(10));
    eprintln!("proxy idle: {stats:?}, malformed {malformed_before} -> {malformed}");
    assert_eq!(stats.processed, CALLS, "proxy dialog stats: {stats:?}");
    assert_eq!(stats.failed, 0, "proxy dialog stats: {stats:?}");
    proxy.assert_running();
}
