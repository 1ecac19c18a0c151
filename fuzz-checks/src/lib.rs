//! Hostile-input checks of lb-proxy: the properties the fuzz targets in `fuzz/` test, shared
//! with `tests/corpus_replay.rs`, which replays the seed corpus and every input that ever failed
//! on stable Rust. A crate of its own (not published) so that none of this is compiled into the
//! lb-proxy library; it drives lb-proxy through its public API only.
//!
//! Each entry point takes bytes as a peer could send them, runs them through the code the proxy
//! runs on network input, and panics when a property does not hold:
//!
//! - [`datagram`]: one UDP datagram. Parsing never panics; every header the proxy reads can be
//!   read; a parsed message serialises to bytes that parse back to the same message; the
//!   rewrites the proxy makes before forwarding (received/rport, Route removal, Request-URI,
//!   Record-Route, Max-Forwards, our Via) and the responses it builds itself produce messages
//!   that parse; a rejected request gets a `400` that parses (unless it had to copy an
//!   unreadable CSeq), or nothing. The datagram, and the body of a message that parses, also
//!   go through [`sdp`].
//! - [`sdp`]: an SDP body as SDP routing reads it (offer and answer). Reading never panics;
//!   an offer that reads names at most `MAX_CHANNELS` resources, each a token; an answer
//!   accepts only what was offered.
//! - [`stream`]: a TCP byte stream, cut into reads at points the input chooses. Framing gives
//!   the same messages whatever the cuts, each framed message is checked as a datagram, and the
//!   parser sees the body the framer cut.
//! - [`core`]: the sans-IO proxy core driven by a script of messages from clients and servers,
//!   generated answers, transport errors and clock steps. It never panics, everything it sends
//!   parses, and once the clock has run past every timer nothing is left: no transaction, no
//!   dialog, no load on a destination. Its UDP listeners route by SDP (the servers' 2xx carry
//!   an answer to the offer, re-INVITEs add and remove channels), the TCP one by a fixed list.

#![forbid(unsafe_code)]

use bytes::{Buf, BytesMut};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lb_proxy::config::Config;
use lb_proxy::destinations::Destinations;
use lb_proxy::metrics::Metrics;
use lb_proxy::proxy::Proxy;
use lb_proxy::sip::{
    bad_request, check_name_addr, header_param, is_stateless_tag, name_addr_uri, HeaderName,
    Message, Method, ParseError, SipUri, Text, Transport, Via,
};
use lb_proxy::transport::tcp::{frame, no_length_answer, Frame};
use lb_proxy::transport::{Flow, Inbound, Outbound, Target};

// ---- (a) one datagram -----------------------------------------------------------------------

/// One UDP datagram, as `transport::udp::receive` handles it.
pub fn datagram(data: &[u8]) {
    // The receiver drops CRLF keep-alives before parsing.
    if data.iter().all(|b| *b == b'\r' || *b == b'\n') {
        return;
    }
    sdp(data);
    message(data);
}

/// An SDP body, as SDP routing reads an offer and an answer (`lb_proxy::sdp`).
pub fn sdp(data: &[u8]) {
    use lb_proxy::sdp::{read, MAX_CHANNELS, MAX_RESOURCE_LEN};
    let offer = read(data, true);
    let answer = read(data, false);
    if let Err(e) = &offer {
        assert!(!e.to_string().is_empty(), "an SDP error without a reason");
    }
    let Ok(offer) = offer else { return };
    let Ok(answer) = answer else {
        panic!("an offer that reads is no answer: {answer:?}");
    };
    assert_eq!(
        offer.list.len(),
        answer.list.len(),
        "offer and answer see other sections"
    );
    let offered: Vec<&str> = offer.offered().collect();
    assert!(offered.len() <= MAX_CHANNELS, "{} channels", offered.len());
    for r in &offered {
        assert!(
            !r.is_empty()
                && r.len() <= MAX_RESOURCE_LEN
                && r.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
            "resource {r:?} is no token"
        );
    }
    assert!(
        offer.list.windows(2).all(|w| w[0].mline < w[1].mline),
        "sections out of order"
    );
    // The body read as its own answer accepts a subset of what it offers.
    let accepted = answer.accepted_of(&offer);
    let mut left = offered.clone();
    for a in &accepted {
        let Some(i) = left.iter().position(|o| o == a) else {
            panic!("{a:?} accepted but not offered ({offered:?})");
        };
        left.swap_remove(i);
    }
}

/// One whole message (a datagram, or a message cut by TCP framing).
pub fn message(data: &[u8]) {
    match Message::parse(data) {
        Ok(msg) => parsed(&msg),
        Err(e) => rejected(&e),
    }
}

/// Parses bytes the proxy produced; they must parse.
fn reparse(data: &[u8], what: &str) -> Message {
    match Message::parse(data) {
        Ok(m) => m,
        Err(e) => panic!(
            "{what} does not parse ({}):\n{}",
            e.reason,
            String::from_utf8_lossy(data)
        ),
    }
}

fn rejected(e: &ParseError) {
    assert!(!e.reason.is_empty(), "a parse error without a reason");
    let Some(resp) = bad_request(e) else {
        return;
    };
    let partial = match e.partial.as_deref() {
        Some(p) => p,
        None => panic!("a 400 without the message it answers"),
    };
    // The 400 copies Via, From, To, Call-ID and CSeq (RFC 3261 8.2.6): it may only fail to
    // parse for a defect it copied, an out-of-range CSeq (RFC 4475 3.1.2.4) or an unreadable
    // From or To (3.1.2.6, 3.1.2.14, 3.1.2.15), that the request had too.
    let r = match Message::parse(&resp) {
        Ok(r) => r,
        Err(again) => {
            let copied_cseq = partial.cseq().is_none() && again.reason.starts_with("bad CSeq");
            let copied_addr = [HeaderName::From, HeaderName::To].iter().any(|h| {
                again.reason.starts_with(&format!("bad {} ", h.as_str()))
                    && check_name_addr(partial.get(h).unwrap_or_default()).is_err()
            });
            assert!(
                copied_cseq || copied_addr,
                "the 400 for a malformed request does not parse ({}) for a reason of its \
                 own:\n{}",
                again.reason,
                String::from_utf8_lossy(&resp)
            );
            return;
        }
    };
    assert_eq!(r.code(), Some(400));
    // A To tag, the request's own or a stateless one, so that an ACK can be matched.
    match partial.to_tag() {
        Some(tag) => assert_eq!(r.to_tag(), Some(tag), "400 keeps the To tag"),
        None => assert!(
            r.to_tag().is_some_and(is_stateless_tag),
            "400 without a stateless To tag: {:?}",
            r.get(&HeaderName::To)
        ),
    }
    assert_eq!(r.call_id(), partial.call_id(), "400 keeps the Call-ID");
    assert_eq!(
        r.get(&HeaderName::CSeq),
        partial.get(&HeaderName::CSeq),
        "400 keeps the CSeq"
    );
    assert_eq!(
        r.top_via(),
        partial.top_via(),
        "400 goes back along the Via"
    );
}

fn parsed(msg: &Message) {
    read_everything(msg);
    if !msg.body.is_empty() {
        sdp(&msg.body);
    }
    // Serialising and parsing again gives the same message (Content-Length is rewritten).
    let again = reparse(&msg.to_bytes(), "a parsed message, serialised");
    assert_same(msg, &again);
    if msg.is_request() {
        let mut received = msg.clone();
        note_received(&mut received);
        answer_locally(&received);
        forward(received);
    } else {
        relay(msg.clone());
    }
}

/// Every accessor the proxy uses on a message, and the URI and Via round trips.
fn read_everything(msg: &Message) {
    let _ = (msg.method(), msg.code(), msg.call_id(), msg.cseq());
    let _ = (msg.from_tag(), msg.to_tag(), msg.max_forwards());
    if let Some(u) = msg.request_uri() {
        uri(u);
    }
    for v in msg.get_all(&HeaderName::Via) {
        if let Some(via) = Via::parse(v) {
            via_round_trip(&via);
        }
    }
    for name in [
        HeaderName::Route,
        HeaderName::RecordRoute,
        HeaderName::Contact,
        HeaderName::From,
        HeaderName::To,
    ] {
        for v in msg.get_all(&name) {
            uri(name_addr_uri(v));
            let _ = header_param(v, "tag");
        }
    }
}

fn uri(s: &str) {
    let Ok(u) = SipUri::parse(s) else { return };
    let _ = (
        u.transport(),
        u.socket_addr(),
        u.port_or_default(),
        u.has_param("lr"),
    );
    let text = u.to_string();
    match SipUri::parse(&text) {
        Ok(again) => assert_eq!(again, u, "URI {s:?} written as {text:?}"),
        Err(e) => panic!("URI {s:?} written as {text:?} does not parse: {e}"),
    }
}

fn via_round_trip(via: &Via) {
    let _ = (via.branch(), via.sent_by(), via.param("rport"));
    let text = via.to_string();
    match Via::parse(&text) {
        Some(again) => assert_eq!(&again, via, "Via written as {text:?}"),
        None => panic!("Via {via:?} written as {text:?} does not parse"),
    }
}

/// Same start line, headers (but Content-Length) and body.
fn assert_same(a: &Message, b: &Message) {
    let headers = |m: &Message| -> Vec<(HeaderName, Text)> {
        m.headers
            .iter()
            .filter(|(n, _)| *n != HeaderName::ContentLength)
            .cloned()
            .collect()
    };
    assert_eq!(a.start, b.start, "start line after a round trip");
    assert_eq!(headers(a), headers(b), "headers after a round trip");
    assert_eq!(a.body, b.body, "body after a round trip");
}

/// What `on_request` does first: note where the request came from (RFC 3581).
fn note_received(msg: &mut Message) {
    let Some(mut via) = msg.top_via() else { return };
    via.set_param("received", Some("192.0.2.7".into()));
    if via.param("rport").is_some() {
        via.set_param("rport", Some("40000".into()));
    }
    if let Some(h) = msg.headers.iter_mut().find(|(n, _)| *n == HeaderName::Via) {
        h.1 = via.to_string().into();
    }
}

/// The responses the proxy builds itself (100, 200 to OPTIONS, 405, 481, 483, 503...).
fn answer_locally(req: &Message) {
    for (code, reason) in [(100, "Trying"), (200, "OK"), (503, "Service Unavailable")] {
        let mut resp = req.response(code, reason);
        if code > 100 && req.to_tag().is_none() {
            if let Some(to) = resp.headers.iter_mut().find(|(n, _)| *n == HeaderName::To) {
                to.1 = format!("{};tag=lb0123456789abcdef", to.1).into();
            }
        }
        resp.push(HeaderName::Allow, "INVITE, ACK");
        resp.push(HeaderName::Server, "mrcp-lb");
        let r = reparse(&resp.to_bytes(), "a response the proxy generates");
        assert_eq!(r.code(), Some(code));
        assert_eq!(r.call_id(), req.call_id());
    }
}

/// The rewrites of a request the proxy forwards (`try_next`, `in_dialog`, `prepare_forward`).
fn forward(mut msg: Message) {
    msg.remove_first(&HeaderName::Route);
    let mut ruri = SipUri {
        secure: false,
        user: None,
        host: "127.0.0.1".into(),
        port: Some(5080),
        params: Vec::new(),
        headers: None,
    };
    if let Some(orig) = msg.request_uri().and_then(|u| SipUri::parse(u).ok()) {
        ruri.user = orig.user;
    }
    let ruri = ruri.to_string();
    msg.set_request_uri(ruri.clone());
    msg.push_front(
        HeaderName::RecordRoute,
        "<sip:127.0.0.1:5060;transport=udp;lr>",
    );
    match msg.max_forwards() {
        Some(n) => msg.set(HeaderName::MaxForwards, n.saturating_sub(1).to_string()),
        None => msg.set(HeaderName::MaxForwards, "70"),
    }
    let branch = "z9hG4bK-lb00000000-1";
    msg.push_front(
        HeaderName::Via,
        format!("SIP/2.0/UDP 127.0.0.1:5060;branch={branch};rport"),
    );
    let out = reparse(&msg.to_bytes(), "a request as the proxy forwards it");
    assert_eq!(out.request_uri(), Some(ruri.as_str()));
    assert_eq!(
        out.top_via().and_then(|v| v.branch().map(str::to_string)),
        Some(branch.to_string())
    );
    assert_eq!(
        out.get(&HeaderName::RecordRoute),
        Some("<sip:127.0.0.1:5060;transport=udp;lr>")
    );
}

/// A response relayed upstream: our Via comes off the top.
fn relay(mut msg: Message) {
    msg.remove_first(&HeaderName::Via);
    if msg.top_via().is_some() {
        reparse(&msg.to_bytes(), "a response as the proxy relays it");
    }
}

// ---- (b) a TCP stream -----------------------------------------------------------------------

/// What the TCP reader did with the stream.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Ping,
    Skip(usize),
    Message(Vec<u8>),
    /// A message head without Content-Length: answered (a request) or dropped, then closed.
    NoLength(Vec<u8>),
    Closed,
    /// Bytes left unframed at the end of the stream.
    Left(Vec<u8>),
}

impl Event {
    fn text(&self) -> String {
        match self {
            Event::Message(m) => format!("Message({:?})", String::from_utf8_lossy(m)),
            Event::NoLength(m) => format!("NoLength({:?})", String::from_utf8_lossy(m)),
            Event::Left(m) => format!("Left({:?})", String::from_utf8_lossy(m)),
            other => format!("{other:?}"),
        }
    }
}

/// A TCP byte stream. The first byte chooses the size limit, the next two seed the points where
/// the stream is cut into reads; the rest is the stream.
pub fn stream(data: &[u8]) {
    let [limit, s0, s1, bytes @ ..] = data else {
        return;
    };
    // 1 KiB (the smallest limit the config accepts) to 64 KiB.
    let max = 1024 + usize::from(*limit) * 252;
    let mut seed = u32::from(*s0) << 8 | u32::from(*s1) | 1;
    let mut cuts = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        // xorshift: reads of 1 to 64 bytes, sometimes larger.
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let n = if seed % 8 == 0 {
            (seed >> 8) as usize % 2048 + 1
        } else {
            (seed >> 8) as usize % 64 + 1
        };
        let end = (at + n).min(bytes.len());
        cuts.push(at..end);
        at = end;
    }
    let whole = read_stream(bytes, std::iter::once(0..bytes.len()), max);
    let chunked = read_stream(bytes, cuts.into_iter(), max);
    if whole != chunked {
        let i = whole
            .iter()
            .zip(&chunked)
            .take_while(|(a, b)| a == b)
            .count();
        panic!(
            "framing depends on how the stream was cut into reads: event {i} is\n  {:?} when \
             the stream arrives at once,\n  {:?} when it arrives in pieces",
            whole.get(i).map(Event::text),
            chunked.get(i).map(Event::text)
        );
    }
    for ev in &whole {
        match ev {
            Event::Message(m) => framed(m),
            Event::NoLength(head) => unframed(head),
            _ => {}
        }
    }
}

/// `transport::tcp::read_loop`, without the socket.
fn read_stream(
    bytes: &[u8],
    reads: impl Iterator<Item = std::ops::Range<usize>>,
    max: usize,
) -> Vec<Event> {
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    for read in reads {
        buf.extend_from_slice(&bytes[read]);
        loop {
            match frame(&buf, max) {
                Frame::Incomplete => break,
                Frame::Ping => {
                    assert!(buf.starts_with(b"\r\n\r\n"));
                    buf.advance(4);
                    events.push(Event::Ping);
                }
                Frame::Skip(n) => {
                    assert!(n > 0 && n <= buf.len(), "skip {n} of {}", buf.len());
                    buf.advance(n);
                    events.push(Event::Skip(n));
                }
                Frame::Invalid(reason) => {
                    assert!(!reason.is_empty());
                    events.push(Event::Closed);
                    return events;
                }
                Frame::Message(n) => {
                    assert!(n > 0 && n <= buf.len(), "message {n} of {}", buf.len());
                    assert!(n <= max, "message {n} over the limit {max}");
                    events.push(Event::Message(buf.split_to(n).to_vec()));
                }
                Frame::NoLength(n) => {
                    assert!(n > 0 && n <= buf.len(), "head {n} of {}", buf.len());
                    assert!(n <= max, "head {n} over the limit {max}");
                    assert_eq!(
                        lb_proxy::sip::header_end(&buf[..n]),
                        Some(n),
                        "a head without Content-Length ends at its empty line"
                    );
                    events.push(Event::NoLength(buf[..n].to_vec()));
                    events.push(Event::Closed);
                    return events;
                }
            }
        }
    }
    events.push(Event::Left(buf.to_vec()));
    events
}

/// A message cut from a stream: checked as a datagram, and the parser must see the body the
/// framer cut (otherwise the two disagree on where the next message starts).
fn framed(data: &[u8]) {
    message(data);
    if let (Ok(msg), Some(hend)) = (Message::parse(data), lb_proxy::sip::header_end(data)) {
        assert_eq!(
            msg.body.len(),
            data.len() - hend,
            "the framer and the parser disagree on the body of {:?}",
            String::from_utf8_lossy(data)
        );
    }
}

/// A message head the framer found without Content-Length (the connection then closes). The
/// parser must agree that it has none; checked as a datagram; and the framer's answer is the
/// transport's `400` exactly when that can be addressed: a request (not an ACK) whose Via,
/// From, To, Call-ID and CSeq are readable. A response gets nothing.
fn unframed(head: &[u8]) {
    message(head);
    let answer = no_length_answer(head, usize::MAX);
    match Message::parse(head) {
        Ok(msg) => {
            assert!(
                msg.get(&HeaderName::ContentLength).is_none(),
                "the framer found no Content-Length in {:?}",
                String::from_utf8_lossy(head)
            );
            let answerable = matches!(msg.method(), Some(m) if *m != Method::Ack);
            assert_eq!(
                answer.is_some(),
                answerable,
                "answer to a request without Content-Length on a stream: {:?}",
                String::from_utf8_lossy(head)
            );
            if let Some(resp) = answer {
                let r = reparse(&resp, "the 400 to a request without Content-Length");
                assert_eq!(r.code(), Some(400));
                assert_eq!(r.call_id(), msg.call_id());
                assert_eq!(r.top_via(), msg.top_via());
            }
        }
        Err(e) => assert_eq!(
            answer,
            bad_request(&e),
            "a malformed head is answered as such"
        ),
    }
}

// ---- (c) the proxy core ---------------------------------------------------------------------

const CORE_CONFIG: &str = "listeners:
  - udp:127.0.0.1:5060
  - address: tcp:127.0.0.1:5060
    resources: [pstn]
  - udp:[::1]:5060
routing:
  resources: sdp
  sdp:
    perSession: [pstn]
    fallback: [pstn]
timers:
  t1: 500ms
  t2: 4s
  t4: 5s
  inviteTimeout: 3s
  inviteFinalTimeout: 10s
dialogs:
  lifetime: 120s
  max: 8
destinations:
  - {id: 1, group: 1, uri: \"sip:127.0.0.1:5080\", resources: pstn=2;speechrecog=2;speechsynth=1}
  - {id: 2, group: 1, uri: \"sip:127.0.0.1:5090;transport=tcp\", resources: pstn=2;speechrecog=1}
  - {id: 3, group: 1, uri: \"sip:[::1]:5070\", resources: pstn=2;speechrecog=2;speechsynth=2}
";

fn core_config() -> Arc<Config> {
    static CFG: OnceLock<Arc<Config>> = OnceLock::new();
    CFG.get_or_init(|| match Config::from_yaml(CORE_CONFIG) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("fuzzing config: {e}"),
    })
    .clone()
}

fn core_metrics() -> Arc<Metrics> {
    static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
    METRICS.get_or_init(|| Arc::new(Metrics::new())).clone()
}

/// The clients a script can speak as: over UDP, over TCP (connection 7), and over UDP on IPv6.
fn client_flow(which: u8) -> Flow {
    match which % 3 {
        0 => Flow {
            transport: Transport::Udp,
            listener: 0,
            remote: SocketAddr::from(([10, 0, 0, 5], 40000)),
            conn: None,
        },
        1 => Flow {
            transport: Transport::Tcp,
            listener: 1,
            remote: SocketAddr::from(([127, 0, 0, 1], 41000)),
            conn: Some(7),
        },
        _ => Flow {
            transport: Transport::Udp,
            listener: 2,
            remote: SocketAddr::from((Ipv6Addr::LOCALHOST, 40001)),
            conn: None,
        },
    }
}

fn server_flow(o: &Outbound) -> Option<Flow> {
    match o.target {
        Target::Addr(remote) => Some(Flow {
            transport: o.transport,
            listener: o.listener,
            remote,
            conn: o.conn,
        }),
        Target::Host(..) => None,
    }
}

/// With `FUZZ_TRACE` set, [`core`] prints every message in and out (to read a failing script).
fn tracing() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

fn trace(dir: &str, peer: SocketAddr, data: &[u8]) {
    eprintln!("---- {dir} {peer}\n{}", String::from_utf8_lossy(data));
}

struct Core {
    proxy: Proxy,
    start: Instant,
    now: Instant,
    /// Everything the proxy sent, in order.
    sent: Vec<(Outbound, Message)>,
}

impl Core {
    fn deliver(&mut self, msg: Message, flow: Flow) {
        if tracing() {
            trace("from", flow.remote, &msg.to_bytes());
        }
        self.proxy.on_message(self.now, Inbound { msg, flow });
        self.collect();
    }

    fn deliver_bytes(&mut self, data: &[u8], flow: Flow) {
        match Message::parse(data) {
            Ok(msg) => self.deliver(msg, flow),
            Err(e) => rejected(&e),
        }
    }

    /// Runs every timer due up to `by` from now, each at its own time.
    fn advance(&mut self, by: Duration) {
        let target = self.now + by;
        while let Some(t) = self.proxy.next_timer() {
            if t > target {
                break;
            }
            self.now = self.now.max(t);
            self.proxy.on_timer(self.now);
            self.collect();
        }
        self.now = target;
        self.proxy.on_timer(self.now);
        self.collect();
    }

    fn collect(&mut self) {
        for o in self.proxy.take_outbound() {
            if let (true, Target::Addr(to)) = (tracing(), &o.target) {
                trace("to", *to, &o.data);
            }
            let m = reparse(&o.data, "a message the proxy sends");
            self.sent.push((o, m));
        }
        // Keep the script's references short and the memory bounded.
        if self.sent.len() > 64 {
            self.sent.drain(..self.sent.len() - 64);
        }
    }

    /// A sent message picked by the script, counting back from the newest.
    fn pick(&self, sel: u8, requests: bool) -> Option<(Outbound, Message)> {
        let matching: Vec<&(Outbound, Message)> = self
            .sent
            .iter()
            .filter(|(_, m)| m.is_request() == requests)
            .collect();
        if matching.is_empty() {
            return None;
        }
        let i = matching.len() - 1 - usize::from(sel.wrapping_sub(b'0')) % matching.len();
        Some(matching[i].clone())
    }
}

/// A status code from three ASCII digits (any bytes give some code from 100 to 699).
fn digits(d: [u8; 3]) -> u16 {
    let n = d
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d.wrapping_sub(b'0') % 10));
    100 + (n + 600 - 100) % 600
}

/// Inserts raw header lines (from the script) right after the start line, so that the script
/// can add or shadow any header of a generated message.
fn with_extra(msg: &Message, extra: &[u8]) -> Vec<u8> {
    let data = msg.to_bytes();
    if extra.is_empty() {
        return data.to_vec();
    }
    let line_end = memchr::memmem::find(&data, b"\r\n").map_or(data.len(), |i| i + 2);
    let mut out = Vec::with_capacity(data.len() + extra.len() + 2);
    out.extend_from_slice(&data[..line_end]);
    out.extend_from_slice(extra);
    if !extra.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&data[line_end..]);
    out
}

/// A server's answer to a request the proxy sent (as the sipp servers write it: Via, Record-Route,
/// From, To with a tag, Call-ID, CSeq, Contact).
/// A re-INVITE's offer: a synthesizer and a recognizer, as UniMRCP's client writes them.
const REOFFER_TWO: &str = "v=0\r\no=UniMRCPClient 1 2 IN IP4 192.168.0.5\r\ns=-\r\n\
    c=IN IP4 192.168.0.5\r\nt=0 0\r\n\
    m=application 9 TCP/MRCPv2 1\r\na=setup:active\r\na=connection:existing\r\n\
    a=resource:speechsynth\r\na=cmid:1\r\n\
    m=application 9 TCP/MRCPv2 1\r\na=setup:active\r\na=connection:existing\r\n\
    a=resource:speechrecog\r\na=cmid:1\r\n\
    m=audio 4000 RTP/AVP 0\r\na=mid:1\r\n";

/// A re-INVITE's offer that removes its channels (port 0).
const REOFFER_REMOVE: &str = "v=0\r\no=UniMRCPClient 1 3 IN IP4 192.168.0.5\r\ns=-\r\n\
    c=IN IP4 192.168.0.5\r\nt=0 0\r\n\
    m=application 0 TCP/MRCPv2 1\r\na=resource:speechsynth\r\n\
    m=application 0 TCP/MRCPv2 1\r\na=resource:speechrecog\r\n\
    m=audio 4000 RTP/AVP 0\r\na=mid:1\r\n";

/// A UniMRCP server's answer to the offer in `req`: every MRCPv2 channel accepted for a 200;
/// for another 2xx, the channels whose bit is set in `code - 200` are rejected (port 0).
fn answer_sdp(req: &Message, code: u16) -> Option<String> {
    use std::fmt::Write as _;
    let offer = lb_proxy::sdp::read(&req.body, true).ok()?;
    let reject = code.saturating_sub(200);
    let mut s = String::from("v=0\r\no=UniMRCPServer 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n");
    let sections = offer.list.last().map_or(0, |c| c.mline + 1);
    for m in 0..sections {
        match offer.list.iter().position(|c| c.mline == m) {
            Some(i) if i < 16 && reject & (1 << i) == 0 => {
                let r = offer.list[i].resource.unwrap_or("speechrecog");
                let _ = write!(
                    s,
                    "m=application 1544 TCP/MRCPv2 1\r\na=setup:passive\r\n\
                     a=channel:fuzz{i}@{r}\r\na=cmid:1\r\n"
                );
            }
            Some(_) => s.push_str("m=application 0 TCP/MRCPv2 1\r\n"),
            None => s.push_str("m=audio 5000 RTP/AVP 0\r\n"),
        }
    }
    Some(s)
}

fn answer(req: &Message, code: u16, to: SocketAddr) -> Message {
    let mut resp = req.response(code, "Fuzz");
    if (200..300).contains(&code) && req.method() == Some(&Method::Invite) {
        if let Some(body) = answer_sdp(req, code) {
            resp.push(HeaderName::ContentType, "application/sdp");
            resp.body = bytes::Bytes::from(body);
        }
    }
    let rrs: Vec<String> = req
        .get_all(&HeaderName::RecordRoute)
        .map(str::to_string)
        .collect();
    for rr in rrs {
        resp.push(HeaderName::RecordRoute, rr);
    }
    if code > 100 && req.to_tag().is_none() {
        if let Some(t) = resp.headers.iter_mut().find(|(n, _)| *n == HeaderName::To) {
            t.1 = format!("{};tag=srv1", t.1).into();
        }
    }
    let mut host = String::new();
    let _ = lb_proxy::sip::write_host(&mut host, &to.ip().to_string());
    resp.push(
        HeaderName::Contact,
        format!("<sip:mrcp@{host}:{}>", to.port()),
    );
    resp
}

/// A client's request within the dialog of a response it received (ACK, BYE, CANCEL, re-INVITE):
/// to the Contact, along the Record-Route set, as the sipp client writes it.
fn in_dialog(resp: &Message, method: Method) -> Message {
    let target = resp
        .get(&HeaderName::Contact)
        .map(|c| name_addr_uri(c).to_string())
        .unwrap_or_else(|| "sip:127.0.0.1:5060".into());
    let mut req = Message::request(method.clone(), &target);
    req.push(
        HeaderName::Via,
        "SIP/2.0/UDP 192.168.0.5:5061;branch=z9hG4bK-client-1;rport",
    );
    let routes: Vec<String> = resp
        .get_all(&HeaderName::RecordRoute)
        .map(str::to_string)
        .collect();
    for r in routes.into_iter().rev() {
        req.push(HeaderName::Route, r);
    }
    for h in [HeaderName::From, HeaderName::To, HeaderName::CallId] {
        if let Some(v) = resp.get(&h) {
            req.push(h.clone(), v.to_string());
        }
    }
    let seq = resp.cseq().map_or(1, |c| c.0);
    let seq = match method {
        Method::Ack | Method::Cancel => seq,
        _ => seq.saturating_add(1),
    };
    req.push(HeaderName::CSeq, format!("{seq} {method}"));
    req.push(HeaderName::MaxForwards, "70");
    req
}

/// The proxy core run by a script. The script is a list of steps separated by NUL bytes; the
/// first byte of a step says what it does, and the arguments are ASCII so that seeds read well:
///
/// - `M` peer, bytes: a message from client `peer` (`0` UDP, `1` TCP, `2` UDP over IPv6);
/// - `S` n, bytes: the same bytes from the server the n-th newest request went to;
/// - `R` n, code (three digits), extra header lines: that server answers that request;
/// - `C` n, method (`A`CK, `B`YE, `C`ANCEL, re-`I`NVITE), extra header lines: the client that
///   got the n-th newest response sends that request in its dialog;
/// - `T` milliseconds (up to five digits): the clock moves on, each timer running at its own
///   time;
/// - `E` n: sending the n-th newest request failed (a TCP connect refused).
///
/// After the script the clock runs for an hour: by then every transaction and dialog must be
/// gone and every destination's load back to zero.
pub fn core(data: &[u8]) {
    let cfg = core_config();
    let Some(set) = cfg.destinations.as_ref() else {
        panic!("fuzzing config without destinations");
    };
    let dests = match Destinations::from_set(set) {
        Ok(d) => d,
        Err(e) => panic!("fuzzing destinations: {e}"),
    };
    let now = Instant::now();
    let mut c = Core {
        proxy: Proxy::with_seed(cfg, dests, core_metrics(), 1),
        start: now,
        now,
        sent: Vec::new(),
    };
    c.proxy.start(now);
    for step in data.split(|b| *b == 0).take(64) {
        let [op, rest @ ..] = step else { continue };
        match (op, rest) {
            (b'M', [peer, bytes @ ..]) => {
                c.deliver_bytes(bytes, client_flow(peer.wrapping_sub(b'0')))
            }
            (b'S', [n, bytes @ ..]) => {
                let flow = c.pick(*n, true).and_then(|(o, _)| server_flow(&o));
                if let Some(flow) = flow {
                    c.deliver_bytes(bytes, flow);
                }
            }
            (b'R', [n, d @ ..]) => {
                let (code, extra) = match d {
                    [a, b, c, extra @ ..] => (digits([*a, *b, *c]), extra),
                    _ => continue,
                };
                let Some((o, req)) = c.pick(*n, true) else {
                    continue;
                };
                let Some(flow) = server_flow(&o) else {
                    continue;
                };
                let resp = answer(&req, code, flow.remote);
                c.deliver_bytes(&with_extra(&resp, extra), flow);
            }
            (b'C', [n, m, extra @ ..]) => {
                let Some((o, resp)) = c.pick(*n, false) else {
                    continue;
                };
                let Some(flow) = server_flow(&o) else {
                    continue;
                };
                let (method, offer) = match m {
                    b'A' => (Method::Ack, None),
                    b'B' => (Method::Bye, None),
                    b'C' => (Method::Cancel, None),
                    // A re-INVITE that removes every channel; one that offers two.
                    b'R' => (Method::Invite, Some(REOFFER_REMOVE)),
                    _ => (Method::Invite, Some(REOFFER_TWO)),
                };
                let mut req = in_dialog(&resp, method);
                if let Some(body) = offer {
                    req.push(HeaderName::ContentType, "application/sdp");
                    req.body = bytes::Bytes::from_static(body.as_bytes());
                }
                c.deliver_bytes(&with_extra(&req, extra), flow);
            }
            (b'T', ms) => {
                let ms = ms
                    .iter()
                    .take(5)
                    .fold(0u64, |n, d| n * 10 + u64::from(d.wrapping_sub(b'0') % 10));
                c.advance(Duration::from_millis(ms));
            }
            (b'E', [n, ..]) => {
                let token = c.pick(*n, true).and_then(|(o, _)| o.on_error);
                if let Some(t) = token {
                    c.proxy.on_transport_error(c.now, t);
                    c.collect();
                }
            }
            _ => {}
        }
    }
    // Stop probing (it never ends by itself), then let every timer run out: transactions,
    // dialogs (lifetime), the BYEs that end them, probes in flight.
    for slot in 0..3 {
        if let Some(d) = c.proxy.destinations_mut().get_mut(slot) {
            d.spec.probe_mode = lb_api::ProbeMode::Never;
        }
    }
    for _ in 0..4 {
        c.advance(Duration::from_secs(900));
    }
    let (server_txs, client_txs, dialogs) = c.proxy.sizes();
    assert_eq!(
        (server_txs, client_txs, dialogs),
        (0, 0, 0),
        "transactions or dialogs left an hour after the script (started {:?} ago)",
        c.now.duration_since(c.start)
    );
    for slot in 0..3 {
        if let Some(d) = c.proxy.destinations().get(slot) {
            assert_eq!(d.total_load(), 0, "load left on destination {}", d.spec.id);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// The SDP seed of the core target reaches what it is there for: a channel rejected by
    /// the answer, channels added and removed by re-INVITEs, all settled (and, as `core`
    /// asserts, every unit given back in the end).
    #[test]
    fn sdp_seed_settles_channels() {
        let seed = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/corpus/proxy_core/sdp-reject-then-reinvites"
        ))
        .unwrap();
        let m = super::core_metrics();
        let count = |o: &str| m.sdp_channels.with_label_values(&[o]).get();
        let (accepted, rejected) = (count("accepted"), count("rejected"));
        super::core(&seed);
        // 202 accepts 1 of 2; the re-INVITE's 200 accepts 2; the removal accepts none.
        assert_eq!(count("accepted") - accepted, 3);
        assert_eq!(count("rejected") - rejected, 1);
    }
}
