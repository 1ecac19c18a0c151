//! RFC 4475 (SIP torture test messages) as a property of lb-proxy: every message of
//! `fuzz/corpus/sip_datagram/rfc4475-*.sip`, byte for byte, goes the way a UDP datagram goes
//! (`Message::parse_limited` and the transport's stateless `400`, as `transport::udp` does;
//! then the sans-IO core, `Proxy::on_message` and `take_outbound`), and the outcome must be the
//! one in the table. The same table, with the reasons, is in `docs/rfc4475.md`.
//!
//! The RFC describes what an element should do; for a proxy that answers OPTIONS itself, routes
//! INVITEs by load and refuses other methods with 405, each row says what that means here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use lb_proxy::config::Config;
use lb_proxy::destinations::Destinations;
use lb_proxy::metrics::Metrics;
use lb_proxy::proxy::Proxy;
use lb_proxy::sip::{bad_request, is_stateless_tag, HeaderName, Message, Method, Transport};
use lb_proxy::transport::tcp::{frame, Frame};
use lb_proxy::transport::{Flow, Inbound, Target};

/// What lb-proxy does with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Refused by the parser; the transport answers `400 Bad Request` statelessly (with a To
    /// tag the core recognises, so that its ACK is absorbed).
    Refused400,
    /// Refused by the parser; no response can be addressed (a response, or no readable Via,
    /// From, To, Call-ID or CSeq to copy into one): dropped, counted as malformed.
    Dropped,
    /// Accepted; the core answers with this status and sends nothing else.
    Answered(u16),
    /// Accepted; an INVITE outside a dialog: `100 Trying` to the client and the INVITE to the
    /// destination, nothing else.
    Routed,
    /// Accepted; the core sends nothing (a response that matches no transaction).
    Ignored,
}

use Outcome::*;

struct Row {
    /// `fuzz/corpus/sip_datagram/rfc4475-{name}.sip`.
    name: &'static str,
    /// The RFC 4475 section.
    section: &'static str,
    /// Listed by the RFC as a valid message (3.1.1), or to be accepted (3.3.x, 3.4.1).
    valid: bool,
    outcome: Outcome,
}

/// The outcome per message; the reasons are in `docs/rfc4475.md`.
const TABLE: &[Row] = &[
    // 3.1.1: valid messages, all accepted.
    row("wsinv", "3.1.1.1", true, Answered(404)),
    row("intmeth", "3.1.1.2", true, Answered(405)),
    row("esc01", "3.1.1.3", true, Routed),
    row("escnull", "3.1.1.4", true, Answered(405)),
    row("esc02", "3.1.1.5", true, Answered(405)),
    row("lwsdisp", "3.1.1.6", true, Answered(200)),
    row("longreq", "3.1.1.7", true, Routed),
    row("dblreq", "3.1.1.8", true, Answered(405)),
    row("semiuri", "3.1.1.9", true, Answered(200)),
    row("transports", "3.1.1.10", true, Answered(200)),
    row("mpart01", "3.1.1.11", true, Answered(405)),
    row("unreason", "3.1.1.12", true, Ignored),
    row("noreason", "3.1.1.13", true, Ignored),
    // 3.1.2: invalid messages.
    row("badinv01", "3.1.2.1", false, Dropped),
    row("clerr", "3.1.2.2", false, Refused400),
    row("ncl", "3.1.2.3", false, Refused400),
    row("scalar02", "3.1.2.4", false, Refused400),
    row("scalarlg", "3.1.2.5", false, Dropped),
    row("quotbal", "3.1.2.6", false, Refused400),
    row("ltgtruri", "3.1.2.7", false, Refused400),
    row("lwsruri", "3.1.2.8", false, Refused400),
    row("lwsstart", "3.1.2.9", false, Refused400),
    row("trws", "3.1.2.10", false, Refused400),
    row("badaspec", "3.1.2.14", false, Refused400),
    row("baddn", "3.1.2.15", false, Refused400),
    row("badvers", "3.1.2.16", false, Dropped),
    row("mismatch01", "3.1.2.17", false, Refused400),
    row("bigcode", "3.1.2.19", false, Dropped),
    // 3.3: application-layer semantics.
    row("insuf", "3.3.1", false, Dropped),
    row("unkscm", "3.3.2", true, Answered(200)),
    row("unksm2", "3.3.4", true, Answered(405)),
    row("multi01", "3.3.8", false, Refused400),
    row("mcl01", "3.3.9", false, Refused400),
    row("zeromf", "3.3.11", true, Answered(200)),
    // 3.4: backward compatibility.
    row("inv2543", "3.4.1", true, Answered(400)),
];

const fn row(name: &'static str, section: &'static str, valid: bool, outcome: Outcome) -> Row {
    Row {
        name,
        section,
        valid,
        outcome,
    }
}

const CONFIG: &str = r#"
listeners:
  - udp:127.0.0.1:5060
  - tcp:127.0.0.1:5060
destinations:
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100}
"#;

const DESTINATION: &str = "127.0.0.1:5080";
const CLIENT: &str = "192.0.2.7:5060";

fn corpus() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/sip_datagram")
}

fn message(name: &str) -> Vec<u8> {
    let path = corpus().join(format!("rfc4475-{name}.sip"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn proxy(cfg: &Arc<Config>) -> Proxy {
    let dests = Destinations::from_set(cfg.destinations.as_ref().unwrap()).unwrap();
    Proxy::with_seed(cfg.clone(), dests, Arc::new(Metrics::new()), 4475)
}

/// What happens to `data` arriving as one UDP datagram from the client.
fn outcome(cfg: &Arc<Config>, data: &[u8]) -> Result<Outcome, String> {
    let client: SocketAddr = CLIENT.parse().unwrap();
    let datagram = bytes::Bytes::copy_from_slice(data);
    let msg = match Message::parse_limited(datagram, cfg.limits.max_headers) {
        Ok(msg) => msg,
        Err(e) => {
            let Some(resp) = bad_request(&e) else {
                return Ok(Dropped);
            };
            // The 400 may copy the defect that made the request malformed (an out-of-range
            // CSeq, an unreadable To), so it is read as text here.
            let text = String::from_utf8_lossy(&resp);
            if !text.starts_with("SIP/2.0 400 Bad Request\r\n") {
                return Err(format!("the transport answered {text}"));
            }
            let partial = e.partial.as_deref().ok_or("a 400 without a partial")?;
            let to = text
                .lines()
                .find(|l| l.starts_with("To: "))
                .ok_or("400 without To")?;
            let tagged = match partial.to_tag() {
                Some(tag) => to.contains(&format!("tag={tag}")),
                None => to
                    .rsplit_once(";tag=")
                    .is_some_and(|(_, t)| is_stateless_tag(t)),
            };
            if !tagged {
                return Err(format!("400 without the stateless To tag: {to}"));
            }
            return Ok(Refused400);
        }
    };
    let mut p = proxy(cfg);
    let flow = Flow {
        transport: Transport::Udp,
        listener: 0,
        remote: client,
        conn: None,
    };
    p.on_message(Instant::now(), Inbound { msg, flow });
    let mut sent = Vec::new();
    for o in p.take_outbound() {
        let m = Message::parse(&o.data).map_err(|e| format!("the proxy sent junk: {e}"))?;
        let to = match o.target {
            Target::Addr(a) => a.to_string(),
            Target::Host(h, port) => format!("{h}:{port}"),
        };
        sent.push((to, m));
    }
    let to_client = |to: &str| {
        to.parse::<SocketAddr>()
            .is_ok_and(|a| a.ip() == client.ip())
    };
    match &sent[..] {
        [] => Ok(Ignored),
        [(to, r)] if to_client(to) && r.code().is_some_and(|c| c >= 200) => {
            Ok(Answered(r.code().unwrap_or_default()))
        }
        [(t1, trying), (t2, fwd)]
            if to_client(t1)
                && trying.code() == Some(100)
                && t2 == DESTINATION
                && fwd.method() == Some(&Method::Invite) =>
        {
            Ok(Routed)
        }
        other => Err(format!(
            "unexpected: {:?}",
            other
                .iter()
                .map(|(to, m)| format!("{to} {:?}", m.start))
                .collect::<Vec<_>>()
        )),
    }
}

#[test]
fn every_torture_message_has_its_outcome() {
    let cfg = Arc::new(Config::from_yaml(CONFIG).unwrap());
    let mut wrong = Vec::new();
    for r in TABLE {
        let got = outcome(&cfg, &message(r.name));
        if got.as_ref() != Ok(&r.outcome) {
            wrong.push(format!(
                "{} ({}): expected {:?}, got {:?}",
                r.name, r.section, r.outcome, got
            ));
        }
        // What the RFC calls valid is never refused by the parser.
        if r.valid && matches!(r.outcome, Refused400 | Dropped) {
            wrong.push(format!(
                "{}: a valid message in the table as refused",
                r.name
            ));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

#[test]
fn the_table_covers_the_corpus() {
    let mut files: Vec<String> = std::fs::read_dir(corpus())
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(
                name.strip_prefix("rfc4475-")?
                    .strip_suffix(".sip")?
                    .to_string(),
            )
        })
        .collect();
    files.sort();
    let mut rows: Vec<String> = TABLE.iter().map(|r| r.name.to_string()).collect();
    rows.sort();
    assert_eq!(files, rows, "one row per rfc4475-*.sip file");
}

/// What the TCP framer makes of the message as the start of a stream.
fn framed(data: &[u8]) -> String {
    match frame(data, 65_535) {
        Frame::Message(n) if n == data.len() => "message".into(),
        Frame::Message(n) => format!("message of {n} bytes, then more"),
        Frame::NoLength(_) => "no Content-Length".into(),
        Frame::Invalid(_) => "closed".into(),
        Frame::Incomplete => "waits".into(),
        other => format!("{other:?}"),
    }
}

/// The framing errors the RFC names for streams: a Content-Length beyond the data waits for
/// more (3.1.2.2), a negative one or two of them close the connection (3.1.2.3, 3.3.9), two
/// messages are two (3.1.1.8), and none at all is a 400 then close (RFC 3261 18.3; 3.4.1 has
/// none, being RFC 2543 over UDP).
#[test]
fn over_tcp() {
    let cases = [
        ("clerr", "waits"),
        ("ncl", "closed"),
        ("mcl01", "closed"),
        ("dblreq", "message of 300 bytes, then more"),
        ("inv2543", "no Content-Length"),
        ("wsinv", "message"),
        ("longreq", "message"),
    ];
    let mut wrong = Vec::new();
    for (name, want) in cases {
        let got = framed(&message(name));
        if got != want {
            wrong.push(format!("{name}: expected {want}, got {got}"));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    let inv2543 = message("inv2543");
    let Frame::NoLength(n) = frame(&inv2543, 65_535) else {
        unreachable!()
    };
    let resp = lb_proxy::transport::tcp::no_length_answer(&inv2543[..n], 128).unwrap();
    let resp = Message::parse(&resp).unwrap();
    assert_eq!(resp.code(), Some(400));
    assert!(resp.to_tag().is_some_and(is_stateless_tag));
    assert_eq!(
        resp.get(&HeaderName::CallId),
        Some("inv2543.1717@ift.client.example.com")
    );
}
