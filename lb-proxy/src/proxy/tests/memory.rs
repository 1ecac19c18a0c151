//! What a dialog and the transactions held after its 2xx cost (issue 13, "memory per
//! dialog"): the sizes of the records, and the resident memory of N calls placed, answered
//! and ACKed the way bench/sipp/uac.xml and uas.xml do it, while their INVITE transactions
//! are still held (before Timer L / M, 64×T1) and once those are gone (dialogs only).
//!
//! A measurement, not a check: `cargo test -p lb-proxy --lib memory_per_dialog -- --ignored
//! --nocapture --test-threads=1` (LB_MEM_DIALOGS calls, 50,000 by default). The process's
//! VmRSS is read around each step, so nothing else should run in it meanwhile.

use super::*;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

const CLIENT: &str = "127.0.8.1:5070";

/// The INVITE of bench/sipp/uac.xml, call `i`.
fn bench_invite(i: usize) -> String {
    let sdp = "v=0\r\no=UniMRCPClient 53655765 2353687637 IN IP4 127.0.8.1\r\ns=-\r\n\
c=IN IP4 127.0.8.1\r\nt=0 0\r\nm=application 9 TCP/MRCPv2 1\r\na=setup:active\r\n\
a=connection:new\r\na=resource:speechrecog\r\na=cmid:1\r\nm=audio 4000 RTP/AVP 0 101\r\n\
a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n\
a=sendonly\r\na=ptime:20\r\na=mid:1\r\n";
    format!(
        "INVITE sip:service@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP {CLIENT};branch=z9hG4bK-4242-{i}-0\r\n\
From: \"mrcp client\" <sip:client@{CLIENT}>;tag=4242SIPpTag00{i}\r\n\
To: <sip:service@127.0.0.1:5060>\r\n\
Call-ID: {i}-4242@127.0.8.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:client@{CLIENT};transport=UDP>\r\n\
Max-Forwards: 70\r\n\
User-Agent: sipp-bench-uac\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
}

/// The 200 of bench/sipp/uas.xml to the forwarded INVITE.
fn bench_ok(inv: &Message, server: SocketAddr, i: usize) -> String {
    let sdp = "v=0\r\no=UniMRCPServer 2890844526 2890844527 IN IP4 127.0.8.11\r\ns=-\r\n\
c=IN IP4 127.0.8.11\r\nt=0 0\r\nm=application 1544 TCP/MRCPv2 1\r\na=setup:passive\r\n\
a=connection:new\r\na=channel:32AECB234338@speechrecog\r\na=cmid:1\r\n\
m=audio 5000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=recvonly\r\na=mid:1\r\n";
    let mut s = String::from("SIP/2.0 200 OK\r\n");
    for v in inv.get_all(&HeaderName::Via) {
        let _ = write!(s, "Via: {v}\r\n");
    }
    for r in inv.get_all(&HeaderName::RecordRoute) {
        let _ = write!(s, "Record-Route: {r}\r\n");
    }
    let get = |h: HeaderName| inv.get(&h).unwrap_or_default().to_string();
    let _ = write!(
        s,
        "From: {}\r\nTo: {};tag=4243SIPpTag01{i}\r\nCall-ID: {}\r\nCSeq: {}\r\n\
Contact: <sip:mrcp@{server};transport=UDP>\r\nServer: sipp-bench-uas\r\n\
Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        get(HeaderName::From),
        get(HeaderName::To),
        get(HeaderName::CallId),
        get(HeaderName::CSeq),
        sdp.len()
    );
    s
}

/// The ACK of bench/sipp/uac.xml, to the 200 the caller got.
fn bench_ack(ok: &Message, i: usize) -> String {
    let mut s = format!(
        "ACK {} SIP/2.0\r\nVia: SIP/2.0/UDP {CLIENT};branch=z9hG4bK-4242-{i}-2\r\n",
        name_addr_uri(ok.get(&HeaderName::Contact).unwrap_or_default())
    );
    let rr: Vec<&str> = ok.get_all(&HeaderName::RecordRoute).collect();
    for r in rr.iter().rev() {
        let _ = write!(s, "Route: {r}\r\n");
    }
    let get = |h: HeaderName| ok.get(&h).unwrap_or_default().to_string();
    let _ = write!(
        s,
        "From: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: 1 ACK\r\n\
Contact: <sip:client@{CLIENT};transport=UDP>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        get(HeaderName::From),
        get(HeaderName::To),
        get(HeaderName::CallId),
    );
    s
}

fn inbound(text: &str, from: SocketAddr) -> Inbound {
    Inbound {
        msg: Message::parse(text.as_bytes()).unwrap(),
        flow: Flow {
            transport: Transport::Udp,
            listener: UDP_L,
            remote: from,
            conn: None,
        },
    }
}

/// Places, answers and ACKs call `i`.
fn bench_call(h: &mut Harness, i: usize) {
    let now = h.now;
    h.proxy
        .on_message(now, inbound(&bench_invite(i), addr(CLIENT)));
    let out = h.proxy.take_outbound();
    let fwd = out
        .iter()
        .find(|o| o.data.starts_with(b"INVITE"))
        .expect("forwarded INVITE");
    let Target::Addr(server) = fwd.target else {
        panic!("unresolved target")
    };
    let inv = Message::parse(&fwd.data).unwrap();
    h.proxy
        .on_message(now, inbound(&bench_ok(&inv, server, i), server));
    let out = h.proxy.take_outbound();
    let ok = out
        .iter()
        .find(|o| o.data.starts_with(b"SIP/2.0 200"))
        .expect("200 to the caller");
    let ok = Message::parse(&ok.data).unwrap();
    h.proxy
        .on_message(now, inbound(&bench_ack(&ok, i), addr(CLIENT)));
    let out = h.proxy.take_outbound();
    assert!(
        out.iter().any(|o| o.data.starts_with(b"ACK")),
        "ACK relayed"
    );
}

#[test]
#[ignore = "a measurement: run it alone with --ignored --nocapture --test-threads=1"]
fn memory_per_dialog() {
    let n: usize = std::env::var("LB_MEM_DIALOGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    println!("size_of: ServerTx {} ServerKey {} ClientTx {} ClientKey {} Dialog {} DialogKey {} Message {} Outbound {} Flow {} timer entry {}",
        std::mem::size_of::<ServerTx>(),
        std::mem::size_of::<ServerKey>(),
        std::mem::size_of::<ClientTx>(),
        std::mem::size_of::<ClientKey>(),
        std::mem::size_of::<Dialog>(),
        std::mem::size_of::<DialogKey>(),
        std::mem::size_of::<Message>(),
        std::mem::size_of::<Outbound>(),
        std::mem::size_of::<Flow>(),
        std::mem::size_of::<Reverse<(Instant, u64, Timer)>>(),
    );
    let dests = r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=10000000}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=10000000}
"#;
    // Signed Record-Route, as bench/run.sh runs it.
    let keys = std::env::temp_dir().join(format!("lb-mem-keys-{}", std::process::id()));
    std::fs::write(&keys, "bench-route-key-0123456789abcdef\n").unwrap();
    let mut h = Harness::with(
        dests,
        &format!("recordRoute:\n  keyFile: {}\n", keys.display()),
    );
    // Warm up (maps and the timer heap grow in steps): the figures are of the next n.
    for i in 0..1000 {
        bench_call(&mut h, i);
    }
    let rss0 = rss_kib();
    for i in 1000..1000 + n {
        bench_call(&mut h, i);
    }
    let rss1 = rss_kib();
    let (stx, ctx, dialogs) = h.proxy.sizes();
    println!(
        "{n} calls answered, transactions held: server {stx}, client {ctx}, dialogs {dialogs}; \
         VmRSS +{} KiB, {:.0} bytes per call",
        rss1 - rss0,
        (rss1 - rss0) as f64 * 1024.0 / n as f64
    );
    // Past Timer L / M: only the dialogs are left.
    h.advance_to(secs(40));
    let (stx, ctx, _) = h.proxy.sizes();
    assert_eq!((stx, ctx), (0, 0), "transactions gone after 64×T1");
    // The freed memory stays with the allocator: the next n dialogs reuse it, so the
    // cost of dialogs alone is the growth of n more calls whose transactions also go.
    let rss2 = rss_kib();
    for i in 1000 + n..1000 + 2 * n {
        bench_call(&mut h, i);
    }
    h.advance_to(secs(80));
    let rss3 = rss_kib();
    let _ = std::fs::remove_file(&keys);
    println!(
        "dialogs {}: VmRSS after Timer L {rss2} KiB; {n} more calls, their transactions gone: \
         +{} KiB, {:.0} bytes per dialog (an upper bound: the first n calls' freed \
         transactions are reused first)",
        h.proxy.sizes().2,
        rss3.saturating_sub(rss2),
        rss3.saturating_sub(rss2) as f64 * 1024.0 / n as f64
    );
}
