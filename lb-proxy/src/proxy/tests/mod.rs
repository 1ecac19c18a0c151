//! Deterministic tests of the proxy core: transactions, failover and dialogs.
//!
//! The core is driven directly: messages are injected as if received on a listener from a peer,
//! time is a fake clock moved by hand (each timer runs at its own due time), and everything the
//! proxy queues is parsed back so that the assertions read headers.
//!
//! The peers are a sipp-like UAC (`Call`) and UniMRCP-like servers (`Uas`) at
//! 127.0.0.1:5080 (pstn=100) and 127.0.0.1:5090 (pstn=50); the proxy listens on UDP and TCP
//! 127.0.0.1:5060.

#![allow(clippy::unwrap_used)]
//!
//! The harness is this file; the tests are by concern, as the core is: `failover.rs`,
//! `dialog.rs`, `transaction.rs`, `admission.rs`, `relay.rs`, `probe.rs`, `control.rs`,
//! `share.rs`, `tls.rs`, `shutdown.rs`.

use super::*;
use crate::sip::header_param;
use lb_api::admin::{Action, State};
use lb_api::{DesiredState, DestinationSet};
use std::fmt::Write as _;

const UDP_L: usize = 0;

const TCP_L: usize = 1;

const S1: &str = "127.0.0.1:5080";

const S2: &str = "127.0.0.1:5090";

const TWO_DESTS: &str = r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50}
"#;

/// The standard listeners and short timers (T1 500 ms, INVITE timeout 3 s, final-response
/// timeout 10 s), with `extra` top-level sections and the given destination list.
fn config(destinations: &str, extra: &str) -> Config {
    let yaml = format!(
        "listeners:
  - udp:127.0.0.1:5060
  - tcp:127.0.0.1:5060
timers:
  t1: 500ms
  t2: 4s
  t4: 5s
  inviteTimeout: 3s
  inviteFinalTimeout: 10s
{extra}
destinations:{destinations}"
    );
    Config::from_yaml(&yaml).unwrap()
}

const CLIENT_SDP: &str = "v=0\r\n\
o=sipp 3816 1 IN IP4 192.168.0.5\r\n\
s=-\r\n\
c=IN IP4 192.168.0.5\r\n\
t=0 0\r\n\
m=application 9 TCP/MRCPv2 1\r\n\
a=setup:active\r\n\
a=connection:new\r\n\
a=resource:speechsynth\r\n\
a=cmid:1\r\n\
m=audio 6000 RTP/AVP 0 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=recvonly\r\n\
a=mid:1\r\n";

const SERVER_SDP: &str = "v=0\r\n\
o=UniMRCPServer 2890844526 2890844527 IN IP4 127.0.0.1\r\n\
s=-\r\n\
c=IN IP4 127.0.0.1\r\n\
t=0 0\r\n\
m=application 1544 TCP/MRCPv2 1\r\n\
a=setup:passive\r\n\
a=connection:new\r\n\
a=channel:32AECB234338@speechsynth\r\n\
a=cmid:1\r\n\
m=audio 5000 RTP/AVP 0\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=sendonly\r\n\
a=mid:1\r\n";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A SIP peer outside the proxy, as the proxy sees it: transport, our listener, its address
/// and, for TCP, the connection.
#[derive(Debug, Clone, Copy)]
struct Peer {
    transport: Transport,
    listener: usize,
    addr: SocketAddr,
    conn: Option<u64>,
}

impl Peer {
    fn udp_server(a: &str) -> Peer {
        Peer {
            transport: Transport::Udp,
            listener: UDP_L,
            addr: addr(a),
            conn: None,
        }
    }

    fn flow(&self) -> Flow {
        Flow {
            transport: self.transport,
            listener: self.listener,
            remote: self.addr,
            conn: self.conn,
        }
    }
}

/// One message the proxy queued, parsed back.
#[derive(Debug)]
struct Sent {
    out: Outbound,
    msg: Message,
}

impl Sent {
    fn to(&self) -> SocketAddr {
        match &self.out.target {
            Target::Addr(a) => *a,
            Target::Host(h, p) => panic!("unresolved target {h}:{p}"),
        }
    }

    fn is(&self, m: Method) -> bool {
        self.msg.method() == Some(&m)
    }

    fn code(&self) -> Option<u16> {
        self.msg.code()
    }

    fn get(&self, h: HeaderName) -> Option<&str> {
        self.msg.get(&h)
    }

    fn all(&self, h: HeaderName) -> Vec<String> {
        self.msg.get_all(&h).map(str::to_string).collect()
    }

    fn vias(&self) -> Vec<Via> {
        self.msg
            .get_all(&HeaderName::Via)
            .map(|v| Via::parse(v).unwrap())
            .collect()
    }

    fn branch(&self) -> String {
        self.msg.top_via().unwrap().branch().unwrap().to_string()
    }

    fn ruri(&self) -> &str {
        self.msg.request_uri().unwrap()
    }

    /// Sent to `peer` the way the proxy reaches it (transport, listener, address, connection).
    fn assert_to(&self, peer: &Peer) {
        assert_eq!(
            (
                self.out.transport,
                self.out.listener,
                self.to(),
                self.out.conn
            ),
            (peer.transport, peer.listener, peer.addr, peer.conn),
            "where {} went",
            self.label()
        );
    }

    fn label(&self) -> String {
        let first = match &self.msg.start {
            StartLine::Request { method, uri } => format!("{method} {uri}"),
            StartLine::Response { code, reason } => format!("{code} {reason}"),
        };
        let cseq = self.get(HeaderName::CSeq).unwrap_or("-");
        format!(
            "{first} ({cseq}) -> {}/{} listener {} conn {:?}",
            self.out.transport,
            self.to(),
            self.out.listener,
            self.out.conn
        )
    }
}

fn describe(out: &[Sent]) -> String {
    let mut s = String::new();
    for m in out {
        let _ = write!(s, "\n  {}", m.label());
    }
    if s.is_empty() {
        s.push_str(" nothing");
    }
    s
}

/// Removes and returns the one message of `out` that matches.
fn take(out: &mut Vec<Sent>, what: &str, f: impl Fn(&Sent) -> bool) -> Sent {
    let found: Vec<usize> = (0..out.len()).filter(|&i| f(&out[i])).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {what}, the proxy sent:{}",
        describe(out)
    );
    out.remove(found[0])
}

fn assert_none(out: &[Sent], what: &str) {
    assert!(
        out.is_empty(),
        "expected nothing else ({what}), the proxy sent:{}",
        describe(out)
    );
}

struct Harness {
    proxy: Proxy,
    start: Instant,
    now: Instant,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(TWO_DESTS, "")
    }

    fn with(destinations: &str, extra: &str) -> Harness {
        let cfg = config(destinations, extra);
        let dests = Destinations::from_set(cfg.destinations.as_ref().unwrap()).unwrap();
        let now = Instant::now();
        Harness {
            proxy: Proxy::new(Arc::new(cfg), dests),
            start: now,
            now,
        }
    }

    /// Moves the clock to `at` after the start, running every timer at its own due time.
    fn advance_to(&mut self, at: Duration) {
        let target = self.start + at;
        assert!(target >= self.now, "the clock only moves forward");
        while let Some(t) = self.proxy.next_timer() {
            if t > target {
                break;
            }
            self.now = self.now.max(t);
            self.proxy.on_timer(self.now);
        }
        self.now = target;
        self.proxy.on_timer(self.now);
    }

    fn recv(&mut self, from: Peer, text: &str) {
        let msg = Message::parse(text.as_bytes())
            .unwrap_or_else(|e| panic!("test message does not parse: {e}\n{text}"));
        self.proxy.on_message(
            self.now,
            Inbound {
                msg,
                flow: from.flow(),
            },
        );
    }

    /// Everything queued since the last call, parsed back.
    fn out(&mut self) -> Vec<Sent> {
        self.proxy
            .take_outbound()
            .into_iter()
            .map(|out| {
                let msg = Message::parse(&out.data).unwrap_or_else(|e| {
                    panic!(
                        "the proxy sent an unparsable message: {e}\n{}",
                        String::from_utf8_lossy(&out.data)
                    )
                });
                Sent { out, msg }
            })
            .collect()
    }

    fn load(&self, slot: usize) -> u32 {
        self.proxy.destinations().get(slot).unwrap().total_load()
    }

    fn state(&self, slot: usize) -> State {
        self.proxy.destinations().get(slot).unwrap().state()
    }
}

/// A message text: start line, headers in order, Content-Type for a body and Content-Length.
fn sip(start: &str, headers: &[(&str, String)], body: &str) -> String {
    let mut s = format!("{start}\r\n");
    for (n, v) in headers {
        let _ = write!(s, "{n}: {v}\r\n");
    }
    if !body.is_empty() {
        s.push_str("Content-Type: application/sdp\r\n");
    }
    let _ = write!(s, "Content-Length: {}\r\n\r\n{body}", body.len());
    s
}

fn reason(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        183 => "Session Progress",
        200 => "OK",
        481 => "Call/Transaction Does Not Exist",
        486 => "Busy Here",
        487 => "Request Terminated",
        503 => "Service Unavailable",
        _ => "Whatever",
    }
}

/// A response as a UA builds it (RFC 3261 8.2.6): every Via, From, To (with `to_tag` added
/// when the request's To has none), Call-ID and CSeq copied, then `extra`.
fn response(
    req: &Message,
    code: u16,
    to_tag: Option<&str>,
    extra: &[(&str, String)],
    body: &str,
) -> String {
    let mut h: Vec<(&str, String)> = Vec::new();
    for v in req.get_all(&HeaderName::Via) {
        h.push(("Via", v.to_string()));
    }
    h.push(("From", req.get(&HeaderName::From).unwrap().to_string()));
    let mut to = req.get(&HeaderName::To).unwrap().to_string();
    if let (Some(tag), None) = (to_tag, req.to_tag()) {
        let _ = write!(to, ";tag={tag}");
    }
    h.push(("To", to));
    h.push(("Call-ID", req.call_id().unwrap().to_string()));
    h.push(("CSeq", req.get(&HeaderName::CSeq).unwrap().to_string()));
    h.extend(extra.iter().cloned());
    sip(&format!("SIP/2.0 {code} {}", reason(code)), &h, body)
}

/// A sipp-like caller: its transport and address as the proxy sees them, and its dialog
/// state once answered.
struct Call {
    peer: Peer,
    /// Via sent-by as the client writes it.
    sent_by: String,
    rport: bool,
    call_id: String,
    from: String,
    to: String,
    contact: String,
    ruri: String,
    cseq: u32,
    /// Route set and remote target learnt from the 2xx.
    routes: Vec<String>,
    target: Option<String>,
    /// Sends in-dialog requests to the proxy without Route, like sipp's built-in uac.
    ignore_rr: bool,
}

impl Call {
    /// A UDP client behind NAT: it writes 192.168.0.5:5061 in Via (asking for rport) and its
    /// packets come from 10.0.0.5:40000.
    fn udp(id: &str) -> Call {
        Call {
            peer: Peer {
                transport: Transport::Udp,
                listener: UDP_L,
                addr: addr("10.0.0.5:40000"),
                conn: None,
            },
            sent_by: "192.168.0.5:5061".into(),
            rport: true,
            call_id: format!("{id}-3816@192.168.0.5"),
            from: format!("sipp <sip:sipp@192.168.0.5:5061>;tag={id}SIPpTag00"),
            to: "<sip:service@127.0.0.1:5060>".into(),
            contact: "<sip:sipp@192.168.0.5:5061>".into(),
            ruri: "sip:service@127.0.0.1:5060".into(),
            cseq: 1,
            routes: Vec::new(),
            target: None,
            ignore_rr: false,
        }
    }

    /// A TCP client on connection 7 from 127.0.0.1:41000, without rport.
    fn tcp(id: &str) -> Call {
        Call {
            peer: Peer {
                transport: Transport::Tcp,
                listener: TCP_L,
                addr: addr("127.0.0.1:41000"),
                conn: Some(7),
            },
            sent_by: "127.0.0.1:41000".into(),
            rport: false,
            call_id: format!("{id}-4242@127.0.0.1"),
            from: format!("sipp <sip:sipp@127.0.0.1:41000>;tag={id}SIPpTag01"),
            to: "<sip:service@127.0.0.1:5060>".into(),
            contact: "<sip:sipp@127.0.0.1:41000;transport=tcp>".into(),
            ruri: "sip:service@127.0.0.1:5060;transport=tcp".into(),
            cseq: 1,
            routes: Vec::new(),
            target: None,
            ignore_rr: false,
        }
    }

    fn tag(&self) -> &str {
        header_param(&self.from, "tag").unwrap()
    }

    fn via(&self, branch: &str) -> String {
        format!(
            "SIP/2.0/{} {};branch={branch}{}",
            self.peer.transport.as_str(),
            self.sent_by,
            if self.rport { ";rport" } else { "" }
        )
    }

    fn invite_branch(&self) -> String {
        format!("z9hG4bK-{}-1", self.call_id)
    }

    /// The initial INVITE with an MRCPv2 offer.
    fn invite(&self) -> String {
        sip(
            &format!("INVITE {} SIP/2.0", self.ruri),
            &[
                ("Via", self.via(&self.invite_branch())),
                ("Max-Forwards", "70".into()),
                ("From", self.from.clone()),
                ("To", self.to.clone()),
                ("Call-ID", self.call_id.clone()),
                ("CSeq", "1 INVITE".into()),
                ("Contact", self.contact.clone()),
                ("Subject", "MRCP synthesis".into()),
                ("User-Agent", "sipp".into()),
            ],
            CLIENT_SDP,
        )
    }

    /// A request outside a dialog (OPTIONS, REGISTER), to the proxy.
    fn out_of_dialog(&self, method: &str, extra: &[(&str, String)]) -> String {
        let mut h = vec![
            (
                "Via",
                self.via(&format!("z9hG4bK-{}-{method}", self.call_id)),
            ),
            ("Max-Forwards", "70".into()),
            ("From", self.from.clone()),
            ("To", self.to.clone()),
            ("Call-ID", self.call_id.clone()),
            ("CSeq", format!("1 {method}")),
        ];
        h.extend(extra.iter().cloned());
        sip(&format!("{method} {} SIP/2.0", self.ruri), &h, "")
    }

    /// CANCEL of the initial INVITE (same branch and Request-URI).
    fn cancel(&self) -> String {
        sip(
            &format!("CANCEL {} SIP/2.0", self.ruri),
            &[
                ("Via", self.via(&self.invite_branch())),
                ("Max-Forwards", "70".into()),
                ("From", self.from.clone()),
                ("To", self.to.clone()),
                ("Call-ID", self.call_id.clone()),
                ("CSeq", "1 CANCEL".into()),
            ],
            "",
        )
    }

    /// ACK for a non-2xx final response: the INVITE's branch, the response's To.
    fn ack_non_2xx(&self, resp: &Message) -> String {
        sip(
            &format!("ACK {} SIP/2.0", self.ruri),
            &[
                ("Via", self.via(&self.invite_branch())),
                ("Max-Forwards", "70".into()),
                ("From", self.from.clone()),
                ("To", resp.get(&HeaderName::To).unwrap().to_string()),
                ("Call-ID", self.call_id.clone()),
                ("CSeq", "1 ACK".into()),
            ],
            "",
        )
    }

    /// Learns the dialog from the 2xx: To tag, route set (Record-Route reversed), remote
    /// target.
    fn answered(&mut self, ok: &Message) {
        self.to = ok.get(&HeaderName::To).unwrap().to_string();
        let mut rr: Vec<String> = ok
            .get_all(&HeaderName::RecordRoute)
            .map(str::to_string)
            .collect();
        rr.reverse();
        self.routes = rr;
        self.target = Some(name_addr_uri(ok.get(&HeaderName::Contact).unwrap()).to_string());
    }

    /// An in-dialog request (ACK for the 2xx uses the current CSeq, the others the next one).
    fn in_dialog(&mut self, method: &str, extra: &[(&str, String)], body: &str) -> String {
        if method != "ACK" {
            self.cseq += 1;
        }
        let branch = format!("z9hG4bK-{}-{}-{method}", self.call_id, self.cseq);
        let mut h = vec![("Via", self.via(&branch))];
        let ruri = if self.ignore_rr {
            self.ruri.clone()
        } else {
            for r in &self.routes {
                h.push(("Route", r.clone()));
            }
            self.target.clone().unwrap()
        };
        h.extend([
            ("Max-Forwards", "70".to_string()),
            ("From", self.from.clone()),
            ("To", self.to.clone()),
            ("Call-ID", self.call_id.clone()),
            ("CSeq", format!("{} {method}", self.cseq)),
        ]);
        if method == "INVITE" {
            h.push(("Contact", self.contact.clone()));
        }
        h.extend(extra.iter().cloned());
        sip(&format!("{method} {ruri} SIP/2.0"), &h, body)
    }

    fn ack(&mut self) -> String {
        self.in_dialog("ACK", &[], "")
    }

    fn bye(&mut self) -> String {
        self.in_dialog("BYE", &[], "")
    }
}

/// A UniMRCP-like server (UAS) answering what the proxy sends it.
struct Uas {
    peer: Peer,
    tag: String,
    /// Record-Route entries of proxies between us and the server, pushed above ours.
    record_route: Vec<String>,
}

impl Uas {
    fn new(a: &str, tag: &str) -> Uas {
        Uas {
            peer: Peer::udp_server(a),
            tag: tag.to_string(),
            record_route: Vec::new(),
        }
    }

    fn contact(&self) -> String {
        format!("<sip:mrcp@{};transport=udp>", self.peer.addr)
    }

    /// A response to `req`; provisional and 2xx responses to INVITE carry Contact and the
    /// Record-Route entries, like sipp's `[last_Record-Route:]`.
    fn reply(&self, req: &Message, code: u16, extra: &[(&str, String)], body: &str) -> String {
        let mut h: Vec<(&str, String)> = Vec::new();
        let dialog_forming = req.method() == Some(&Method::Invite) && (101..300).contains(&code);
        if dialog_forming {
            for r in &self.record_route {
                h.push(("Record-Route", r.clone()));
            }
            for r in req.get_all(&HeaderName::RecordRoute) {
                h.push(("Record-Route", r.to_string()));
            }
            h.push(("Contact", self.contact()));
        }
        h.push(("Server", "UniMRCP SofiaSIP 1.8.0".into()));
        h.extend(extra.iter().cloned());
        let tag = (code > 100).then_some(self.tag.as_str());
        response(req, code, tag, &h, body)
    }

    /// BYE from the callee, built from the INVITE it received: Route from its Record-Route,
    /// Request-URI the caller's Contact, From and To swapped.
    fn bye(&self, invite: &Message) -> String {
        let mut h = vec![(
            "Via",
            format!(
                "SIP/2.0/UDP {};branch=z9hG4bK-{}-bye",
                self.peer.addr, self.tag
            ),
        )];
        for r in invite.get_all(&HeaderName::RecordRoute) {
            h.push(("Route", r.to_string()));
        }
        h.extend([
            ("Max-Forwards", "70".to_string()),
            (
                "From",
                format!("{};tag={}", invite.get(&HeaderName::To).unwrap(), self.tag),
            ),
            ("To", invite.get(&HeaderName::From).unwrap().to_string()),
            ("Call-ID", invite.call_id().unwrap().to_string()),
            ("CSeq", "1 BYE".to_string()),
        ]);
        let ruri = name_addr_uri(invite.get(&HeaderName::Contact).unwrap());
        sip(&format!("BYE {ruri} SIP/2.0"), &h, "")
    }
}

/// Sends the call's INVITE; checks that a 100 Trying goes back to the caller and returns the
/// INVITE the proxy forwarded.
fn place(h: &mut Harness, call: &Call) -> Sent {
    h.recv(call.peer, &call.invite());
    let mut out = h.out();
    let trying = take(&mut out, "100 Trying", |s| s.code() == Some(100));
    trying.assert_to(&call.peer);
    let inv = take(&mut out, "forwarded INVITE", |s| s.is(Method::Invite));
    assert_none(&out, "after the INVITE");
    inv
}

/// The server answers the forwarded INVITE with 200 (plus `extra`); the caller gets it and
/// ACKs, and the ACK reaches the server. Returns the 200 the caller got.
fn answer(
    h: &mut Harness,
    call: &mut Call,
    srv: &Uas,
    inv: &Sent,
    extra: &[(&str, String)],
) -> Sent {
    h.recv(srv.peer, &srv.reply(&inv.msg, 200, extra, SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200 to the caller", |s| s.code() == Some(200));
    ok.assert_to(&call.peer);
    assert_none(&out, "after the 200");
    call.answered(&ok.msg);
    h.recv(call.peer, &call.ack());
    let mut out = h.out();
    let ack = take(&mut out, "ACK to the server", |s| s.is(Method::Ack));
    assert_eq!(ack.to(), srv.peer.addr, "ACK goes to the server");
    assert_none(&out, "after the ACK");
    ok
}

const TLS_L: usize = 2;

/// The standard listeners plus `tls:127.0.0.1:5061`, and `destinations`. The TLS listener is
/// added after the YAML is read: the core never touches the certificate files the `tls`
/// section would name.
fn tls_harness(destinations: &str) -> Harness {
    let mut cfg = config("", "");
    cfg.listeners.push(crate::config::Listener {
        transport: Transport::Tls,
        bind: addr("127.0.0.1:5061"),
        advertise: crate::config::HostPort {
            host: "127.0.0.1".into(),
            port: 5061,
        },
        ..cfg.listeners[TCP_L].clone()
    });
    let set = lb_api::DestinationSet {
        version: 0,
        destinations: serde_yaml_ng::from_str(destinations).unwrap(),
        peers: None,
    };
    crate::config::check_set(&cfg.listeners, &set).unwrap();
    let dests = Destinations::from_set(&set).unwrap();
    cfg.destinations = Some(set);
    let now = Instant::now();
    Harness {
        proxy: Proxy::new(Arc::new(cfg), dests),
        start: now,
        now,
    }
}

/// A client on TLS connection 9 from 127.0.0.1:41001.
fn tls_call(id: &str) -> Call {
    let mut call = Call::tcp(id);
    call.peer = Peer {
        transport: Transport::Tls,
        listener: TLS_L,
        addr: addr("127.0.0.1:41001"),
        conn: Some(9),
    };
    call
}

/// Takes the two BYEs of an expired dialog and checks them: to the server as the caller, to
/// the caller as the callee.
fn expiry_byes(out: &mut Vec<Sent>, call: &Call, srv: &Uas) -> (Sent, Sent) {
    let to_srv = take(out, "BYE to the server", |s| {
        s.is(Method::Bye) && s.to() == srv.peer.addr
    });
    let to_caller = take(out, "BYE to the caller", |s| {
        s.is(Method::Bye) && s.to() == call.peer.addr
    });
    to_srv.assert_to(&srv.peer);
    assert_eq!(to_srv.ruri(), "sip:mrcp@127.0.0.1:5080;transport=udp");
    assert_eq!(to_srv.msg.from_tag(), Some(call.tag()));
    assert_eq!(to_srv.msg.to_tag(), Some(srv.tag.as_str()));
    assert_eq!(to_srv.get(HeaderName::CallId), Some(call.call_id.as_str()));
    assert!(to_srv.vias()[0].branch().unwrap().starts_with("z9hG4bK"));
    to_caller.assert_to(&call.peer);
    assert_eq!(to_caller.ruri(), "sip:sipp@192.168.0.5:5061");
    assert_eq!(
        to_caller.msg.from_tag(),
        Some(srv.tag.as_str()),
        "From = callee"
    );
    assert_eq!(
        name_addr_uri(to_caller.get(HeaderName::From).unwrap()),
        "sip:service@127.0.0.1:5060"
    );
    assert_eq!(to_caller.msg.to_tag(), Some(call.tag()), "To = caller");
    assert_eq!(
        name_addr_uri(to_caller.get(HeaderName::To).unwrap()),
        "sip:sipp@192.168.0.5:5061"
    );
    assert_eq!(
        to_caller.get(HeaderName::CallId),
        Some(call.call_id.as_str())
    );
    (to_srv, to_caller)
}

/// Probing every 10 s, 3 s timeout, down after 3 failures, up after 2 successes.
const PROBING: &str = "probing:
  interval: 10s
  timeout: 3s
  failureThreshold: 3
  successThreshold: 2
";

/// One destination, always probed.
const ONE_PROBED: &str = r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100, probeMode: 2}
"#;

impl Harness {
    /// A harness whose proxy has been started, as the runtime does right after building it:
    /// probing runs from the start of the fake clock.
    fn started(destinations: &str, extra: &str) -> Harness {
        let mut h = Harness::with(destinations, extra);
        h.proxy.start(h.now);
        h
    }

    /// A harness on a configuration of its own (other listeners), not started.
    fn from_config(cfg: Config) -> Harness {
        let dests = Destinations::from_set(cfg.destinations.as_ref().unwrap()).unwrap();
        let now = Instant::now();
        Harness {
            proxy: Proxy::new(Arc::new(cfg), dests),
            start: now,
            now,
        }
    }

    /// Time since the start of the fake clock.
    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn dest(&self, slot: usize) -> &crate::destinations::Destination {
        self.proxy.destinations().get(slot).unwrap()
    }

    fn probe_stats(&self, slot: usize) -> crate::destinations::ProbeStats {
        self.dest(slot).probe.clone()
    }
}

/// Runs the clock to `until`, one timer due time at a time, handing each message the proxy
/// sends to `on_sent` as soon as it is sent (so that it can be answered at that instant).
fn run_until(h: &mut Harness, until: Duration, mut on_sent: impl FnMut(&mut Harness, Sent)) {
    let target = h.start + until;
    assert!(target >= h.now, "the clock only moves forward");
    loop {
        for s in h.out() {
            on_sent(h, s);
        }
        match h.proxy.next_timer() {
            Some(t) if t <= target => {
                h.now = h.now.max(t);
                h.proxy.on_timer(h.now);
            }
            _ => break,
        }
    }
    h.now = target;
    h.proxy.on_timer(h.now);
    for s in h.out() {
        on_sent(h, s);
    }
}

/// The destination a probe went to answers it with `code`.
fn answer_probe(h: &mut Harness, probe: &Sent, code: u16) {
    let peer = Peer {
        transport: probe.out.transport,
        listener: probe.out.listener,
        addr: probe.to(),
        conn: None,
    };
    h.recv(peer, &response(&probe.msg, code, Some("probed"), &[], ""));
}

/// A probe answered 200 at once, with the state of its destination before and after.
struct Answered {
    at: Duration,
    before: State,
    after: State,
    probe: Sent,
}

/// An `on_sent` for [`run_until`]: answers every probe 200 at once and logs it; keeps
/// everything else.
fn answer_probes_200<'a>(
    probes: &'a mut Vec<Answered>,
    others: &'a mut Vec<Sent>,
) -> impl FnMut(&mut Harness, Sent) + 'a {
    move |h, s| {
        if !s.is(Method::Options) {
            return others.push(s);
        }
        let slot = if s.to() == addr(S1) { 0 } else { 1 };
        let before = h.state(slot);
        answer_probe(h, &s, 200);
        probes.push(Answered {
            at: h.elapsed(),
            before,
            after: h.state(slot),
            probe: s,
        });
    }
}

/// Steps through the probes of tests that answer each one by hand: the clock runs timer by
/// timer until a new OPTIONS goes out. Retransmissions of earlier probes are counted; the
/// proxy must send nothing else.
#[derive(Default)]
struct Prober {
    branches: std::collections::HashSet<String>,
    retransmissions: u32,
}

impl Prober {
    /// Takes what the proxy sent since the last look: retransmissions of earlier probes only.
    fn drain(&mut self, h: &mut Harness) {
        for s in h.out() {
            assert!(
                s.is(Method::Options) && self.branches.contains(&s.branch()),
                "only retransmissions of probes: {}",
                s.label()
            );
            self.retransmissions += 1;
        }
    }

    /// The next new probe, sent by `limit` after the start, with the time it went out.
    fn next(&mut self, h: &mut Harness, limit: Duration) -> (Duration, Sent) {
        let target = h.start + limit;
        loop {
            let mut found = None;
            for s in h.out() {
                assert!(s.is(Method::Options), "only probes: {}", s.label());
                if self.branches.insert(s.branch()) {
                    assert!(found.is_none(), "two new probes at once");
                    found = Some(s);
                } else {
                    self.retransmissions += 1;
                }
            }
            if let Some(s) = found {
                return (h.elapsed(), s);
            }
            match h.proxy.next_timer() {
                Some(t) if t <= target => {
                    h.now = h.now.max(t);
                    h.proxy.on_timer(h.now);
                }
                _ => panic!(
                    "no probe by {limit:?} (now {:?}, next timer {:?})",
                    h.elapsed(),
                    h.proxy.next_timer().map(|t| t - h.start)
                ),
            }
        }
    }
}

/// Checks one OPTIONS probe: where it went and how it is built.
fn check_probe(p: &Sent, to: &Peer, ruri: &str, from_uri: &str) {
    assert!(p.is(Method::Options), "{}", p.label());
    p.assert_to(to);
    assert!(p.out.on_error.is_some(), "probes carry an error token");
    assert_eq!(p.ruri(), ruri);
    let vias = p.vias();
    assert_eq!(vias.len(), 1, "only our Via");
    let (transport, rport) = match to.transport {
        Transport::Udp => ("UDP", Some(None)),
        Transport::Tcp => ("TCP", None),
        Transport::Tls => ("TLS", None),
    };
    assert_eq!(
        (&*vias[0].transport, &*vias[0].host, vias[0].port),
        (transport, "127.0.0.1", Some(5060)),
        "our Via, from the advertised address of the {transport} listener"
    );
    assert_eq!(vias[0].param("rport"), rport);
    assert!(vias[0].branch().unwrap().starts_with("z9hG4bK"));
    let from = p.get(HeaderName::From).unwrap();
    assert_eq!(name_addr_uri(from), from_uri, "From: {from}");
    assert!(
        p.msg.from_tag().is_some_and(|t| !t.is_empty()),
        "From has a tag: {from}"
    );
    assert_eq!(name_addr_uri(p.get(HeaderName::To).unwrap()), ruri);
    assert_eq!(p.msg.to_tag(), None);
    assert_eq!(p.get(HeaderName::CSeq), Some("1 OPTIONS"));
    assert_eq!(p.msg.max_forwards(), Some(70));
    assert!(p.get(HeaderName::CallId).is_some_and(|c| !c.is_empty()));
}

/// The line of a metric whose labels include `destination="1"` and `labels`.
fn metric_line<'a>(text: &'a str, name: &str, labels: &[(&str, &str)]) -> &'a str {
    metric_line_of(text, name, "1", labels)
        .unwrap_or_else(|| panic!("no {name} for destination 1 {labels:?} in:\n{text}"))
}

fn metric_line_of<'a>(
    text: &'a str,
    name: &str,
    dest: &str,
    labels: &[(&str, &str)],
) -> Option<&'a str> {
    text.lines().find(|l| {
        l.starts_with(&format!("{name}{{"))
            && l.contains(&format!("destination=\"{dest}\""))
            && labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
    })
}

/// A destination set from a YAML list in the format of the configuration file.
fn dest_set(version: u64, destinations: &str) -> DestinationSet {
    let destinations: Vec<lb_api::DestinationSpec> = serde_yaml_ng::from_str(destinations).unwrap();
    DestinationSet {
        version,
        destinations,
        peers: None,
    }
}

fn status_of(h: &Harness, id: &str) -> Option<lb_api::admin::DestinationStatus> {
    h.proxy
        .status()
        .destinations
        .into_iter()
        .find(|d| d.id == id)
}

fn pstn(capacity: u32, load: u32) -> Vec<lb_api::admin::ResourceStatus> {
    vec![lb_api::admin::ResourceStatus {
        name: "pstn".into(),
        capacity,
        load,
        cluster_load: load,
        not_acceptable: false,
    }]
}

/// Sends an INVITE that no destination can take: a 503 at once (no 100, no state kept),
/// nothing forwarded; the caller ACKs the 503.
fn refused(h: &mut Harness, call: &Call, why: &str) {
    let txs = h.proxy.sizes().0;
    h.recv(call.peer, &call.invite());
    assert_eq!(
        h.proxy.sizes().0,
        txs,
        "no transaction kept for a refused call"
    );
    let mut out = h.out();
    let fail = take(&mut out, "503", |s| s.code() == Some(503));
    fail.assert_to(&call.peer);
    assert_none(&out, why);
    h.recv(call.peer, &call.ack_non_2xx(&fail.msg));
    assert_none(&h.out(), "the ACK of the 503 is absorbed");
}

/// The caller hangs up; the BYE reaches `srv`.
fn hang_up(h: &mut Harness, call: &mut Call, srv: &Uas) {
    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE", |s| s.is(Method::Bye));
    assert_none(&out, "after the BYE");
    bye.assert_to(&srv.peer);
    h.recv(srv.peer, &response(&bye.msg, 200, None, &[], ""));
    let mut out = h.out();
    let ok = take(&mut out, "200 to the BYE", |s| s.code() == Some(200));
    ok.assert_to(&call.peer);
}

/// Places and answers a call, checking which server gets it.
fn open_call(h: &mut Harness, id: &str, srv: &Uas) -> Call {
    let mut call = Call::udp(id);
    let inv = place(h, &call);
    inv.assert_to(&srv.peer);
    answer(h, &mut call, srv, &inv, &[]);
    call
}

const ONLY_1_RESIZED: &str = r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=200}
"#;

const ADVERTISE: &str = "advertise: \"lb.example.com:5070\"\n";

const CL_A: &str = "127.0.0.1:7071";

const CL_B: &str = "127.0.0.1:7072";

/// Two replicas with the same listeners (as behind one Service address) and the same
/// destinations, each naming both cluster addresses (the operator pushes one list to all).
fn replica_pair(destinations: &str) -> (Harness, Harness) {
    let cluster = |listen: &str, name: &str| {
        format!(
            "probing:\n  interval: 1h\ncluster:\n  listen: {listen}\n  name: {name}\n  heartbeat: 100ms\n  peerTimeout: 1s\n  peers: [\"{CL_A}\", \"{CL_B}\"]"
        )
    };
    let mut a = Harness::with(destinations, &cluster(CL_A, "a"));
    let mut b = Harness::with(destinations, &cluster(CL_B, "b"));
    a.proxy.start(a.now);
    b.proxy.start(b.now);
    (a, b)
}

/// Carries the update `from` has due (if any) to `to`; true when one went.
fn sync(from: &mut Harness, from_addr: &str, to: &mut Harness) -> bool {
    let Some((data, targets)) = from.proxy.take_cluster_outbound(from.now) else {
        return false;
    };
    assert!(targets.contains(&addr(CL_A)) || targets.contains(&addr(CL_B)));
    to.proxy.on_peer(to.now, addr(from_addr), &data);
    // A replica also receives its own datagram (the list names it): it learns to skip itself.
    from.proxy.on_peer(from.now, addr(from_addr), &data);
    true
}

/// Updates both ways until neither has anything due.
fn settle_pair(a: &mut Harness, b: &mut Harness) {
    for _ in 0..4 {
        let x = sync(a, CL_A, b);
        let y = sync(b, CL_B, a);
        if !x && !y {
            return;
        }
    }
}

fn cluster_load(h: &Harness, slot: usize) -> u32 {
    let d = h.proxy.destinations().get(slot).unwrap();
    d.resources[0].cluster_load()
}

/// The value of one sample of the metrics text, e.g. `mrcp_lb_requests_limited_total{reason="dialogs"}`.
fn sample(h: &Harness, line_start: &str) -> f64 {
    let text = h.proxy.metrics().encode();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {line_start} in:\n{text}"))
}

fn limited(h: &Harness, reason: &str) -> f64 {
    sample(
        h,
        &format!("mrcp_lb_requests_limited_total{{reason=\"{reason}\"}}"),
    )
}

/// The call's INVITE is answered 503 with Retry-After at once, nothing forwarded, nothing kept.
fn refused_at_once(h: &mut Harness, call: &Call, why: &str) -> Sent {
    let sizes = h.proxy.sizes();
    h.recv(call.peer, &call.invite());
    let mut out = h.out();
    let fail = take(&mut out, "503", |s| s.code() == Some(503));
    assert_none(&out, why);
    fail.assert_to(&call.peer);
    assert_eq!(fail.get(HeaderName::RetryAfter), Some("5"), "{why}");
    assert_eq!(h.proxy.sizes(), sizes, "{why}: nothing kept");
    h.recv(call.peer, &call.ack_non_2xx(&fail.msg));
    assert_none(&h.out(), "the ACK of a stateless 503 is absorbed");
    fail
}

mod admission;
mod control;
mod dialog;
mod drain;
mod failover;
mod memory;
mod probe;
mod relay;
mod sdp;
mod sessions;
mod share;
mod shutdown;
mod tls;
mod transaction;
