//! Heap allocations of the proxy core per call and per parse, counted by a counting global
//! allocator (`stats_alloc`, no `unsafe` here), and the core's time per call, with the fixed
//! list of `bench/lb-proxy.yaml` and with SDP routing (`bench/lb-proxy-sdp.yaml`: the offer's
//! one `speechrecog` channel reserved, settled by the answer).
//!
//!   cargo bench -p lb-proxy --bench alloc
//!
//! The core is driven in-process, no sockets, through complete calls the way the UDP benchmark
//! runs them (bench/sipp/uac.xml and uas.xml against bench/lb-proxy.yaml): the client's INVITE
//! with an MRCP offer, the server's 100 and 200 (Record-Route copied, MRCP answer), the client's
//! ACK and BYE through the proxy's Record-Route, the server's 200 to the BYE. What is counted is
//! what the runtime does per received datagram: the parse (with the transport's one copy of the
//! datagram), `on_message`, `take_outbound` and the timers due; building the peers' messages
//! and reading what the proxy sent are not counted.

use lb_proxy::config::Config;
use lb_proxy::destinations::Destinations;
use lb_proxy::proxy::Proxy;
use lb_proxy::sip::{Message, Transport};
use lb_proxy::transport::{Flow, Inbound, Outbound};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const CONFIG: &str = "
listeners:
  - address: udp:127.0.8.2:5060
    group: 1
routing:
  resources: [pstn]
  mode: absolute
destinations:
  - {id: udp-a, group: 1, uri: \"sip:127.0.8.11:5080\", resources: pstn=100000}
";

/// The same with SDP routing.
const SDP_CONFIG: &str = "
listeners:
  - address: udp:127.0.8.2:5060
    group: 1
routing:
  resources: sdp
  mode: absolute
destinations:
  - {id: udp-a, group: 1, uri: \"sip:127.0.8.11:5080\", resources: speechrecog=100000}
";

const CLIENT: &str = "127.0.8.1:5070";
const SERVER: &str = "127.0.8.11:5080";
const WARM_UP: usize = 2_000;
const CALLS: usize = 20_000;
const PARSES: usize = 20_000;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// Allocation counts summed over the counted sections.
#[derive(Default, Clone, Copy)]
struct Count {
    allocs: usize,
    reallocs: usize,
    bytes: usize,
}

impl Count {
    fn add(&mut self, s: stats_alloc::Stats) {
        self.allocs += s.allocations;
        self.reallocs += s.reallocations;
        self.bytes += s.bytes_allocated + s.bytes_reallocated.max(0) as usize;
    }
}

/// The header lines of `name` in `text` (full lines, the name as sipp's `[last_X:]` writes it).
fn lines<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    head.split("\r\n")
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        })
        .collect()
}

fn value<'a>(text: &'a str, name: &str) -> &'a str {
    lines(text, name)
        .first()
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn with_length(head: String, body: &str) -> String {
    format!("{head}Content-Length: {}\r\n\r\n{body}", body.len())
}

const OFFER: &str = "v=0\r\no=UniMRCPClient 53655765 2353687637 IN IP4 127.0.8.1\r\ns=-\r\n\
c=IN IP4 127.0.8.1\r\nt=0 0\r\nm=application 9 TCP/MRCPv2 1\r\na=setup:active\r\n\
a=connection:new\r\na=resource:speechrecog\r\na=cmid:1\r\nm=audio 4000 RTP/AVP 0 101\r\n\
a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n\
a=sendonly\r\na=ptime:20\r\na=mid:1\r\n";

fn answer(n: usize) -> String {
    format!(
        "v=0\r\no=UniMRCPServer 2890844526 2890842808 IN IP4 127.0.8.11\r\ns=-\r\n\
c=IN IP4 127.0.8.11\r\nt=0 0\r\nm=application 1544 TCP/MRCPv2 1\r\na=setup:passive\r\n\
a=connection:new\r\na=channel:4242x{n}@speechrecog\r\na=cmid:1\r\n\
m=audio 5000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\na=recvonly\r\na=ptime:20\r\na=mid:1\r\n"
    )
}

fn invite(n: usize) -> String {
    with_length(
        format!(
            "INVITE sip:service@127.0.8.2:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP {CLIENT};branch=z9hG4bK-4242-{n}-0\r\n\
From: \"mrcp client\" <sip:client@{CLIENT}>;tag=4242SIPpTag00{n}\r\n\
To: <sip:service@127.0.8.2:5060>\r\n\
Call-ID: {n}-4242@127.0.8.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:client@{CLIENT};transport=UDP>\r\n\
Max-Forwards: 70\r\n\
User-Agent: sipp-bench-uac\r\n\
Content-Type: application/sdp\r\n"
        ),
        OFFER,
    )
}

/// A response of the server to the request it received, copying as sipp's `[last_X:]` do.
fn reply(req: &str, status: &str, to_tag: Option<&str>, extra: &str, body: &str) -> String {
    let mut h = format!("SIP/2.0 {status}\r\n");
    for l in lines(req, "Via") {
        h.push_str(l);
        h.push_str("\r\n");
    }
    if to_tag.is_some() {
        for l in lines(req, "Record-Route") {
            h.push_str(l);
            h.push_str("\r\n");
        }
    }
    h.push_str(lines(req, "From")[0]);
    h.push_str("\r\n");
    h.push_str(lines(req, "To")[0]);
    if let Some(tag) = to_tag {
        h.push_str(";tag=");
        h.push_str(tag);
    }
    h.push_str("\r\n");
    for name in ["Call-ID", "CSeq"] {
        h.push_str(lines(req, name)[0]);
        h.push_str("\r\n");
    }
    h.push_str(extra);
    with_length(h, body)
}

/// An in-dialog request of the client, sent to the 200's Contact through its Record-Route.
fn in_dialog(ok: &str, n: usize, method: &str, cseq: u32) -> String {
    let contact = value(ok, "Contact");
    let target = contact
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap_or_default();
    let mut h = format!(
        "{method} {target} SIP/2.0\r\nVia: SIP/2.0/UDP {CLIENT};branch=z9hG4bK-4242-{n}-{cseq}{method}\r\n"
    );
    let mut routes: Vec<&str> = lines(ok, "Record-Route")
        .into_iter()
        .filter_map(|l| l.split_once(':').map(|(_, v)| v.trim()))
        .collect();
    routes.reverse();
    for r in routes {
        h.push_str("Route: ");
        h.push_str(r);
        h.push_str("\r\n");
    }
    h.push_str(&format!(
        "From: \"mrcp client\" <sip:client@{CLIENT}>;tag=4242SIPpTag00{n}\r\n\
To: {}\r\nCall-ID: {n}-4242@127.0.8.1\r\nCSeq: {cseq} {method}\r\n\
Contact: <sip:client@{CLIENT};transport=UDP>\r\nMax-Forwards: 70\r\n",
        value(ok, "To")
    ));
    with_length(h, "")
}

struct Bench {
    proxy: Proxy,
    now: Instant,
    count: Count,
    /// Time spent in the counted sections.
    busy: Duration,
}

impl Bench {
    /// Hands `text` to the core as received from `from` and returns what it sent, counting the
    /// parse, the handling, the timers now due and the hand-over of the output.
    fn recv(&mut self, from: &str, text: String) -> Vec<Outbound> {
        let datagram = text.into_bytes();
        self.now += Duration::from_millis(1);
        let now = self.now;
        let flow = Flow {
            transport: Transport::Udp,
            listener: 0,
            remote: addr(from),
            conn: None,
        };
        let started = Instant::now();
        let region = Region::new(GLOBAL);
        let msg = parse(&datagram);
        self.proxy.on_message(now, Inbound { msg, flow });
        self.proxy.on_timer(now);
        let out = self.proxy.take_outbound();
        self.count.add(region.change());
        self.busy += started.elapsed();
        out
    }

    fn call(&mut self, n: usize) {
        let out = self.recv(CLIENT, invite(n));
        let fwd = sent_to(&out, SERVER, "INVITE");
        let tag = format!("4242SIPpTag01{n}");
        let out = self.recv(SERVER, reply(&fwd, "100 Trying", None, "", ""));
        assert!(out.is_empty(), "a 100 is not forwarded");
        let contact =
            format!("Contact: <sip:mrcp@{SERVER};transport=UDP>\r\nServer: sipp-bench-uas\r\nContent-Type: application/sdp\r\n");
        let out = self.recv(
            SERVER,
            reply(&fwd, "200 OK", Some(&tag), &contact, &answer(n)),
        );
        let ok = sent_to(&out, CLIENT, "SIP/2.0 200");
        let out = self.recv(CLIENT, in_dialog(&ok, n, "ACK", 1));
        sent_to(&out, SERVER, "ACK");
        self.now += Duration::from_millis(100);
        let out = self.recv(CLIENT, in_dialog(&ok, n, "BYE", 2));
        let bye = sent_to(&out, SERVER, "BYE");
        let contact = format!("Contact: <sip:mrcp@{SERVER};transport=UDP>\r\n");
        let out = self.recv(SERVER, reply(&bye, "200 OK", None, &contact, ""));
        sent_to(&out, CLIENT, "SIP/2.0 200");
    }
}

fn parse(data: &[u8]) -> Message {
    Message::parse(data).unwrap_or_else(|e| panic!("{e}"))
}

/// The one message of `out` that starts with `start` and goes to `to`, as text.
fn sent_to(out: &[Outbound], to: &str, start: &str) -> String {
    let found: Vec<String> = out
        .iter()
        .filter(|o| matches!(o.target, lb_proxy::transport::Target::Addr(a) if a == addr(to)))
        .map(|o| String::from_utf8_lossy(&o.data).into_owned())
        .filter(|t| t.starts_with(start))
        .collect();
    assert_eq!(found.len(), 1, "one {start} to {to}, out of {}", out.len());
    found.into_iter().next().unwrap_or_default()
}

fn bench(config: &str) -> Bench {
    let cfg = Config::from_yaml(config).unwrap_or_else(|e| panic!("{e}"));
    let set = cfg.destinations.as_ref().unwrap_or_else(|| panic!("a set"));
    let dests = Destinations::from_set(set).unwrap_or_else(|e| panic!("{e}"));
    Bench {
        proxy: Proxy::new(Arc::new(cfg), dests),
        now: Instant::now(),
        count: Count::default(),
        busy: Duration::ZERO,
    }
}

fn main() {
    // The two configurations alternate, three rounds each; the fastest round of each is
    // reported (the least disturbed by anything else on the machine).
    let mut best = [Duration::MAX; 2];
    let mut counts = [Count::default(); 2];
    for round in 0..3 {
        for (i, config) in [CONFIG, SDP_CONFIG].into_iter().enumerate() {
            let mut b = bench(config);
            for n in 0..WARM_UP {
                b.call(n);
            }
            b.count = Count::default();
            b.busy = Duration::ZERO;
            for n in WARM_UP..WARM_UP + CALLS {
                b.call(n);
            }
            best[i] = best[i].min(b.busy);
            if round == 0 {
                counts[i] = b.count;
            }
        }
    }
    for (i, what) in ["fixed list", "SDP routing"].into_iter().enumerate() {
        let c = counts[i];
        println!(
            "per call, {what} ({CALLS} calls, 6 messages each): {:.1} allocations ({:.1} of them reallocations), {:.0} bytes; {:.2} µs in the core (parse, handling, output)",
            (c.allocs + c.reallocs) as f64 / CALLS as f64,
            c.reallocs as f64 / CALLS as f64,
            c.bytes as f64 / CALLS as f64,
            best[i].as_secs_f64() * 1e6 / CALLS as f64,
        );
    }
    println!(
        "per call, SDP routing against the fixed list: {:+.2} µs ({:+.1} %) in the core",
        (best[1].as_secs_f64() - best[0].as_secs_f64()) * 1e6 / CALLS as f64,
        (best[1].as_secs_f64() / best[0].as_secs_f64() - 1.0) * 100.0,
    );
    let mut b = bench(CONFIG);

    // One parse of the client's INVITE and of the server's 200, as received.
    let inv = invite(1);
    let fwd = {
        let out = b.recv(CLIENT, invite(WARM_UP + CALLS + 1));
        sent_to(&out, SERVER, "INVITE")
    };
    let contact =
        format!("Contact: <sip:mrcp@{SERVER};transport=UDP>\r\nServer: sipp-bench-uas\r\nContent-Type: application/sdp\r\n");
    let ok = reply(&fwd, "200 OK", Some("4242SIPpTag01x"), &contact, &answer(1));
    for (name, text) in [("INVITE", inv), ("200", ok)] {
        let data = text.into_bytes();
        let mut c = Count::default();
        for _ in 0..PARSES {
            let region = Region::new(GLOBAL);
            black_box(parse(black_box(&data)));
            c.add(region.change());
        }
        println!(
            "per parse of the {name} ({} bytes): {:.1} allocations, {:.0} bytes",
            data.len(),
            (c.allocs + c.reallocs) as f64 / PARSES as f64,
            c.bytes as f64 / PARSES as f64,
        );
    }
}
