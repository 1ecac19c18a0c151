//! Hostile input: the proxy is no open relay (docs/relay-policy.md). While sipp runs calls
//! through the proxy, a stranger (an address that is neither a caller of a known call nor a
//! destination) sends every shape an open relay would forward: requests with a To tag naming
//! a trap, forged Routes to the proxy followed by the trap, tokens that are garbage or copied
//! from another call, a forged 2xx, over UDP and TCP. A trap socket (UDP and TCP) listens where
//! they point. Nothing may reach it; every refused request but ACK gets a 404; the refusals are
//! counted by reason; and every call sipp runs meanwhile succeeds.
//!
//! Run with and without a Record-Route key. Needs `sipp` (Debian package `sip-tester`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::collections::BTreeMap;
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

const CALLS: u64 = 40;
const ROUNDS: usize = 3;

/// A request from `from` (its Via) with the given Routes, Request-URI and dialog identifiers.
#[allow(clippy::too_many_arguments)]
fn request(
    method: &str,
    ruri: &str,
    routes: &[String],
    call_id: &str,
    from_tag: &str,
    to_tag: Option<&str>,
    from: SocketAddr,
    transport: &str,
    body: &str,
) -> String {
    let mut m = format!(
        "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/{transport} {from};branch=z9hG4bK-{call_id}-{method};rport\r\n"
    );
    for r in routes {
        m.push_str(&format!("Route: {r}\r\n"));
    }
    let to_tag = to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
    m.push_str(&format!(
        "Max-Forwards: 70\r\nFrom: <sip:stranger@{from}>;tag={from_tag}\r\n\
         To: <sip:victim@{from}>{to_tag}\r\nCall-ID: {call_id}\r\nCSeq: 1 {method}\r\n\
         Contact: <sip:stranger@{from}>\r\n"
    ));
    if !body.is_empty() {
        m.push_str("Content-Type: application/sdp\r\n");
    }
    m.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    m
}

fn header<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    msg.split("\r\n")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .collect()
}

fn status(msg: &str) -> Option<u16> {
    msg.strip_prefix("SIP/2.0 ")?.get(..3)?.parse().ok()
}

/// Receives on `sock` until `done` says so or `limit` passes.
fn collect(
    sock: &UdpSocket,
    limit: Duration,
    got: &mut Vec<String>,
    done: impl Fn(&[String]) -> bool,
) {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline && !done(got) {
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("stranger socket: {e}"),
        }
    }
}

const SDP: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
                   m=application 9 TCP/MRCPv2 1\r\na=setup:active\r\na=connection:new\r\n\
                   a=resource:speechrecog\r\na=cmid:1\r\nm=audio 4000 RTP/AVP 0\r\na=mid:1\r\n";

/// The stranger's own call, set up properly through the proxy: its Record-Route (with the
/// token when a key is set) is what the forgeries copy.
fn own_call(sock: &UdpSocket, me: SocketAddr, proxy: &str) -> (Vec<String>, String, String) {
    let call_id = format!("stranger-own@{}", me.ip());
    let invite = request(
        "INVITE",
        &format!("sip:service@{proxy}"),
        &[],
        &call_id,
        "own",
        None,
        me,
        "UDP",
        SDP,
    );
    let proxy_addr: SocketAddr = proxy.parse().unwrap();
    sock.send_to(invite.as_bytes(), proxy_addr).unwrap();
    let mut got = Vec::new();
    collect(sock, Duration::from_secs(10), &mut got, |g| {
        g.iter().any(|m| status(m) == Some(200))
    });
    let ok = got
        .iter()
        .find(|m| status(m) == Some(200))
        .unwrap_or_else(|| panic!("the stranger's own call was not answered: {got:#?}"));
    let rr: Vec<String> = header(ok, "Record-Route")
        .into_iter()
        .map(str::to_string)
        .collect();
    let to = header(ok, "To")[0];
    let to_tag = to.split(";tag=").nth(1).unwrap().to_string();
    let contact = header(ok, "Contact")[0]
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string();
    // ACK along the route set (Record-Route reversed).
    let mut routes = rr.clone();
    routes.reverse();
    let ack = request(
        "ACK",
        &contact,
        &routes,
        &call_id,
        "own",
        Some(&to_tag),
        me,
        "UDP",
        "",
    );
    sock.send_to(ack.as_bytes(), proxy_addr).unwrap();
    (routes, to_tag, call_id)
}

struct Shape {
    what: &'static str,
    text: String,
    tcp: bool,
    /// The refusal reason it is counted under.
    reason: &'static str,
}

fn run(name: &str, ip: &str, stranger_ip: &str, trap_ip: &str, key: bool) {
    let env = test_env!(name, ip);
    let dests = [
        Dest::udp(1, SERVER1_PORT, "pstn=100"),
        Dest::udp(2, SERVER2_PORT, "pstn=100"),
    ];
    let extra = if key {
        let path = env.subdir("key").join("route.key");
        std::fs::write(&path, "relay-test-key-0123456789abcdef\n").unwrap();
        format!("recordRoute:\n  keyFile: {}\n", path.display())
    } else {
        String::new()
    };
    let (mut proxy, [s1, s2]) = Sandbox::new(&env)
        .mode("relative")
        .dests(&dests)
        .uas("server1", SERVER1_PORT, "uas.xml")
        .uas("server2", SERVER2_PORT, "uas.xml")
        .extra(&extra)
        .start();

    let trap_udp = UdpSocket::bind(format!("{trap_ip}:5060")).expect("bind UDP trap");
    let trap_tcp = TcpListener::bind(format!("{trap_ip}:5060")).expect("bind TCP trap");
    trap_tcp.set_nonblocking(true).unwrap();
    let sock = UdpSocket::bind(format!("{stranger_ip}:5060")).expect("bind stranger");
    let me = sock.local_addr().unwrap();
    let proxy_target = env.proxy_target();
    let proxy_addr: SocketAddr = proxy_target.parse().unwrap();

    // Calls from a real client all along.
    let calls = CALLS.to_string();
    let client = Sipp::uac(&env, "client")
        .timeout(secs(60))
        .rate(10)
        .limit(20)
        .hold(ms(1000))
        .args(["-m", &calls])
        .start();
    wait_for(
        "the first calls to be set up",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || (stats_number(proxy.admin, "routed") >= 3).then_some(()),
    );

    let (own_routes, own_to_tag, own_call_id) = own_call(&sock, me, &proxy_target);
    if key {
        assert!(
            own_routes[0].contains(";lbt="),
            "a signed Record-Route: {own_routes:?}"
        );
    }
    let trap = format!("sip:x@{trap_ip}:5060");
    let trap_route = format!("<sip:{trap_ip}:5060;lr>");
    let us = format!("<sip:{proxy_target};lr>");
    let (unproven, bad) = if key {
        ("unsigned", "bad_token")
    } else {
        ("stranger_target", "stranger_target")
    };
    let garbage = format!("<sip:{proxy_target};lr;lbt=AQoAAAUTxAAAAAAAAAAAAAAAAAAA>");

    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    let mut want_404: Vec<String> = Vec::new();
    let mut sent = 0u64;
    for round in 0..ROUNDS {
        let id = |k: &str| format!("hostile-{k}-{round}@{stranger_ip}");
        let mk = |m: &str, ruri: &str, routes: &[String], k: &str, transport: &str| {
            request(m, ruri, routes, &id(k), "f", Some("t"), me, transport, "")
        };
        let shapes = vec![
            Shape {
                what: "INVITE with a To tag to the trap",
                text: mk("INVITE", &trap, &[], "inv", "UDP"),
                tcp: false,
                reason: "no_route",
            },
            Shape {
                what: "BYE to the trap",
                text: mk("BYE", &trap, &[], "bye", "UDP"),
                tcp: false,
                reason: "no_route",
            },
            Shape {
                what: "OPTIONS with a To tag to the trap",
                text: mk("OPTIONS", &trap, &[], "opt", "UDP"),
                tcp: false,
                reason: "no_route",
            },
            Shape {
                what: "ACK to the trap",
                text: mk("ACK", &trap, &[], "ack", "UDP"),
                tcp: false,
                reason: "no_route",
            },
            Shape {
                what: "forged Route to us, then the trap's Route",
                text: mk(
                    "BYE",
                    &format!("sip:{ip}:{SERVER1_PORT}"),
                    &[us.clone(), trap_route.clone()],
                    "rr",
                    "UDP",
                ),
                tcp: false,
                reason: unproven,
            },
            Shape {
                what: "forged Route to us, Request-URI the trap",
                text: mk("INVITE", &trap, std::slice::from_ref(&us), "ru", "UDP"),
                tcp: false,
                reason: unproven,
            },
            Shape {
                what: "forged Route to us, ACK to the trap",
                text: mk("ACK", &trap, std::slice::from_ref(&us), "rack", "UDP"),
                tcp: false,
                reason: unproven,
            },
            Shape {
                what: "a garbage token",
                text: mk(
                    "INFO",
                    &trap,
                    std::slice::from_ref(&garbage),
                    "garbage",
                    "UDP",
                ),
                tcp: false,
                reason: bad,
            },
            Shape {
                what: "the token of another call",
                text: mk("BYE", &trap, &own_routes, "replay", "UDP"),
                tcp: false,
                reason: bad,
            },
            Shape {
                what: "BYE to the trap over TCP",
                text: mk("BYE", &format!("{trap};transport=tcp"), &[], "tbye", "TCP"),
                tcp: true,
                reason: "no_route",
            },
            Shape {
                what: "forged Route over TCP",
                text: mk(
                    "BYE",
                    &format!("{trap};transport=tcp"),
                    std::slice::from_ref(&us),
                    "trr",
                    "TCP",
                ),
                tcp: true,
                reason: unproven,
            },
        ];
        for s in shapes {
            eprintln!("round {round}: {}", s.what);
            *expected.entry(s.reason).or_default() += 1;
            sent += 1;
            if s.tcp {
                let mut c = TcpStream::connect(proxy_addr).expect("connect to the proxy");
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                // Over TCP the Via names the connection's own address.
                let text = s
                    .text
                    .replace(&me.to_string(), &c.local_addr().unwrap().to_string());
                c.write_all(text.as_bytes()).unwrap();
                let mut buf = [0u8; 4096];
                let n = std::io::Read::read(&mut c, &mut buf).expect("an answer over TCP");
                let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                assert_eq!(status(&answer), Some(404), "{}: {answer}", s.what);
            } else {
                if !s.text.starts_with("ACK ") {
                    want_404.push(header(&s.text, "Call-ID")[0].to_string());
                }
                sock.send_to(s.text.as_bytes(), proxy_addr).unwrap();
            }
        }
        // A forged 2xx: our Via on top (a branch that is not ours), the trap's below.
        let ok = format!(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP {proxy_target};branch=z9hG4bK-forged-{round}\r\n\
             Via: SIP/2.0/UDP {trap_ip}:5060;branch=z9hG4bK-victim\r\nFrom: <sip:a@x>;tag=f\r\n\
             To: <sip:b@x>;tag=t\r\nCall-ID: {}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
            id("2xx")
        );
        sock.send_to(ok.as_bytes(), proxy_addr).unwrap();
        thread::sleep(Duration::from_millis(500));
    }

    // Every refused request but ACK got its 404, back to the stranger.
    let mut answers = Vec::new();
    collect(&sock, Duration::from_secs(5), &mut answers, |got| {
        want_404.iter().all(|id| {
            got.iter()
                .any(|a| status(a) == Some(404) && header(a, "Call-ID") == [id.as_str()])
        })
    });
    for id in &want_404 {
        assert!(
            answers
                .iter()
                .any(|a| status(a) == Some(404) && header(a, "Call-ID") == [id.as_str()]),
            "no 404 for {id}; the stranger got {answers:#?}"
        );
    }

    // The stranger's own call ends with a BYE whose Request-URI names the trap: it belongs to
    // a real call, so it goes to that call's server, not to the trap.
    let bye = request(
        "BYE",
        &trap,
        &own_routes,
        &own_call_id,
        "own",
        Some(&own_to_tag),
        me,
        "UDP",
        "",
    )
    .replace("CSeq: 1 BYE", "CSeq: 2 BYE");
    sock.send_to(bye.as_bytes(), proxy_addr).unwrap();
    let mut got = Vec::new();
    collect(&sock, Duration::from_secs(5), &mut got, |g| {
        g.iter()
            .any(|m| status(m) == Some(200) && header(m, "CSeq") == ["2 BYE"])
    });
    assert!(
        got.iter()
            .any(|m| status(m) == Some(200) && header(m, "CSeq") == ["2 BYE"]),
        "the server did not answer the stranger's own BYE: {got:#?}"
    );

    let client = client.wait(Duration::from_secs(60));
    eprintln!("{}", client.summary());
    let [s1, s2] = drain([s1, s2]);

    // Nothing reached the trap, over UDP or TCP.
    trap_udp
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 65536];
    let mut trapped = Vec::new();
    while let Ok((n, from)) = trap_udp.recv_from(&mut buf) {
        trapped.push(format!(
            "udp from {from}: {}",
            String::from_utf8_lossy(&buf[..n])
        ));
    }
    while let Ok((_, from)) = trap_tcp.accept() {
        trapped.push(format!("tcp connection from {from}"));
    }
    eprintln!(
        "sent {sent} hostile requests and {ROUNDS} forged 2xx; the trap got {}",
        trapped.len()
    );
    assert!(
        trapped.is_empty(),
        "messages reached the trap: {trapped:#?}"
    );

    // Counted by reason.
    let metrics = parse_metrics(&metrics_text(proxy.admin));
    for (reason, n) in &expected {
        let got = metrics
            .iter()
            .find(|m| m.name == "mrcp_lb_relay_refused_total" && m.label("reason") == Some(reason))
            .map(|m| m.value)
            .unwrap_or_else(|| panic!("no mrcp_lb_relay_refused_total{{reason={reason}}}"));
        eprintln!("refused {reason}: {got}");
        assert_eq!(got, *n as f64, "refusals counted as {reason}");
    }

    // The calls went on untouched.
    client.assert_all_ok(CALLS);
    assert_server_clean(&s1);
    assert_server_clean(&s2);
    assert_eq!(
        s1.invites() + s2.invites(),
        CALLS + 1,
        "the servers took the client's calls and the stranger's own call, nothing more"
    );
    let stats = proxy.wait_idle(Duration::from_secs(10));
    assert_eq!(stats.failed, 0, "{stats:?}");
    proxy.assert_running();
}

#[test]
fn no_relay_for_strangers_without_a_key() {
    run(
        "relay-nokey",
        "127.0.1.90",
        "127.0.2.90",
        "127.0.3.90",
        false,
    );
}

#[test]
fn no_relay_for_strangers_with_a_signed_record_route() {
    run("relay-key", "127.0.1.91", "127.0.2.91", "127.0.3.91", true);
}
