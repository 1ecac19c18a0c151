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

use super::*;
use crate::sip::header_param;
use lb_api::admin::State;
use std::fmt::Write as _;

// ---- configuration ------------------------------------------------------------------------

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

// ---- SDP bodies ----------------------------------------------------------------------------

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

// ---- harness -------------------------------------------------------------------------------

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

// ---- SIP text ------------------------------------------------------------------------------

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

// ---- 1, 2: forwarding the initial INVITE ---------------------------------------------------

#[test]
fn initial_invite_goes_to_the_least_loaded_destination_rewritten() {
    let mut h = Harness::new();
    let call = Call::udp("c1");
    h.recv(call.peer, &call.invite());
    let out = h.out();
    assert_eq!(out.len(), 2, "100 Trying and the INVITE:{}", describe(&out));

    // 100 Trying at once, to where the request came from (rport), with received/rport filled.
    let trying = &out[0];
    assert_eq!(trying.code(), Some(100));
    trying.assert_to(&call.peer);
    let v = &trying.vias()[0];
    assert_eq!(v.branch(), Some(call.invite_branch().as_str()));
    assert_eq!(v.param("received"), Some(Some("10.0.0.5")));
    assert_eq!(v.param("rport"), Some(Some("40000")));
    assert_eq!(trying.msg.to_tag(), None, "no To tag on 100");

    // The INVITE: to 5080 (100 free beats 50 free), over UDP from the UDP listener.
    let inv = &out[1];
    assert!(inv.is(Method::Invite));
    inv.assert_to(&Peer::udp_server(S1));
    assert!(inv.out.on_error.is_some(), "sends carry an error token");
    let vias = inv.vias();
    assert_eq!(vias.len(), 2);
    assert_eq!(
        (
            vias[0].transport.as_str(),
            vias[0].host.as_str(),
            vias[0].port
        ),
        ("UDP", "127.0.0.1", Some(5060))
    );
    assert!(vias[0].branch().unwrap().starts_with("z9hG4bK"));
    assert_ne!(vias[0].branch(), Some(call.invite_branch().as_str()));
    assert_eq!(
        vias[0].param("rport"),
        Some(None),
        "our UDP Via asks for rport"
    );
    // The client's Via, RFC 3581.
    assert_eq!(
        (vias[1].host.as_str(), vias[1].port),
        ("192.168.0.5", Some(5061))
    );
    assert_eq!(vias[1].branch(), Some(call.invite_branch().as_str()));
    assert_eq!(vias[1].param("received"), Some(Some("10.0.0.5")));
    assert_eq!(vias[1].param("rport"), Some(Some("40000")));

    assert_eq!(inv.msg.max_forwards(), Some(69));
    assert_eq!(
        inv.all(HeaderName::RecordRoute),
        vec!["<sip:127.0.0.1:5060;transport=udp;lr>".to_string()]
    );
    assert_eq!(inv.ruri(), "sip:service@127.0.0.1:5080");
    // Dialog identifiers and the rest untouched.
    assert_eq!(inv.get(HeaderName::From), Some(call.from.as_str()));
    assert_eq!(inv.get(HeaderName::To), Some(call.to.as_str()));
    assert_eq!(inv.get(HeaderName::CallId), Some(call.call_id.as_str()));
    assert_eq!(inv.get(HeaderName::CSeq), Some("1 INVITE"));
    assert_eq!(inv.get(HeaderName::Contact), Some(call.contact.as_str()));
    assert_eq!(
        inv.get(HeaderName::Other("Subject".into())),
        Some("MRCP synthesis")
    );
    // SDP byte for byte, Content-Length right.
    assert_eq!(&inv.msg.body[..], CLIENT_SDP.as_bytes());
    assert!(inv.out.data.ends_with(CLIENT_SDP.as_bytes()));
    let cl = CLIENT_SDP.len().to_string();
    assert_eq!(inv.get(HeaderName::ContentLength), Some(cl.as_str()));
    assert_eq!(inv.msg.count(&HeaderName::ContentLength), 1);

    assert_eq!((h.load(0), h.load(1)), (1, 0));
    let st = h.proxy.dialog_stats();
    assert_eq!((st.processed, st.active, st.early), (1, 0, 0));
    assert_eq!(h.proxy.route_stats().routed, 1);
}

#[test]
fn tcp_caller_to_udp_server_gets_a_double_record_route() {
    let mut h = Harness::new();
    let call = Call::tcp("c2");
    h.recv(call.peer, &call.invite());
    let mut out = h.out();
    let trying = take(&mut out, "100 Trying", |s| s.code() == Some(100));
    trying.assert_to(&call.peer);
    let inv = take(&mut out, "INVITE", |s| s.is(Method::Invite));
    inv.assert_to(&Peer::udp_server(S1));
    assert_eq!(inv.out.listener, UDP_L, "sent from the UDP listener");

    let rr = inv.all(HeaderName::RecordRoute);
    assert_eq!(rr.len(), 2, "{rr:?}");
    let top = SipUri::parse(name_addr_uri(&rr[0])).unwrap();
    let second = SipUri::parse(name_addr_uri(&rr[1])).unwrap();
    for (u, t) in [(&top, "udp"), (&second, "tcp")] {
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", Some(5060)));
        assert_eq!(u.param("transport"), Some(Some(t)), "{rr:?}");
        assert!(u.has_param("lr"), "{rr:?}");
        assert_eq!(u.param("r2"), Some(Some("on")), "{rr:?}");
    }

    let vias = inv.vias();
    assert_eq!(vias[0].transport, "UDP");
    // The caller did not ask for rport and wrote its real address: its Via is untouched.
    assert_eq!(
        inv.msg.get_all(&HeaderName::Via).nth(1),
        Some(call.via(&call.invite_branch()).as_str())
    );
}

// ---- SIP over TLS ----------------------------------------------------------------------------

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

#[test]
fn tls_call_stays_on_tls_both_sides() {
    let mut h = tls_harness(
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5081;transport=tls", resources: pstn=100}
"#,
    );
    let mut call = tls_call("t1");
    let inv = place(&mut h, &call);
    let server = Peer {
        transport: Transport::Tls,
        listener: TLS_L,
        addr: addr("127.0.0.1:5081"),
        conn: None,
    };
    inv.assert_to(&server);
    assert_eq!(
        inv.out.server_name.as_deref(),
        Some("127.0.0.1"),
        "the certificate is checked against the URI host"
    );
    let via = &inv.vias()[0];
    assert_eq!(
        (via.transport.as_str(), via.host.as_str(), via.port),
        ("TLS", "127.0.0.1", Some(5061))
    );
    assert_eq!(via.param("rport"), None, "no rport over a stream");
    assert_eq!(
        inv.all(HeaderName::RecordRoute),
        vec!["<sip:127.0.0.1:5061;transport=tls;lr>".to_string()],
        "one entry: both sides use the TLS listener"
    );
    assert_eq!(inv.ruri(), "sip:service@127.0.0.1:5081;transport=tls");

    // Reliable transport: no retransmission of the INVITE at T1, 2T1...
    h.advance_to(ms(2900));
    assert_none(&h.out(), "no retransmission over TLS");

    // The server answers on the connection the INVITE opened; the 200 goes back on the
    // caller's own TLS connection.
    let srv = Uas {
        peer: Peer {
            conn: Some(11),
            ..server
        },
        tag: "srv-t1".into(),
        record_route: Vec::new(),
    };
    let ok = answer(&mut h, &mut call, &srv, &inv, &[]);
    ok.assert_to(&call.peer);
    assert_eq!(h.proxy.dialog_stats().active, 1);

    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE", |s| s.is(Method::Bye));
    bye.assert_to(&server);
    assert_eq!(bye.out.server_name.as_deref(), Some("127.0.0.1"));
    assert_eq!(bye.vias()[0].transport, "TLS");
    h.recv(srv.peer, &response(&bye.msg, 200, None, &[], ""));
    let mut out = h.out();
    let ok = take(&mut out, "200 to BYE", |s| s.code() == Some(200));
    ok.assert_to(&call.peer);
    assert_eq!(ok.out.server_name, None, "a client is not verified by name");
    let st = h.proxy.dialog_stats();
    assert_eq!((st.active, st.processed, st.failed), (0, 1, 0));
    assert_eq!(h.load(0), 0);
}

#[test]
fn tls_server_name_is_the_destination_host_name() {
    let mut h = tls_harness(
        r#"
  - {id: a, group: 1, uri: "sips:mrcp-a.speech.example", resources: pstn=100}
"#,
    );
    let d = h.proxy.destinations_mut().get_mut(0).unwrap();
    assert_eq!(d.transport, Transport::Tls, "sips: is TLS");
    d.addr = Some(addr("127.0.0.3:5061"));
    let call = Call::udp("t2");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer {
        transport: Transport::Tls,
        listener: TLS_L,
        addr: addr("127.0.0.3:5061"),
        conn: None,
    });
    assert_eq!(
        inv.out.server_name.as_deref(),
        Some("mrcp-a.speech.example")
    );
    let rr = inv.all(HeaderName::RecordRoute);
    assert_eq!(
        rr,
        vec![
            "<sip:127.0.0.1:5061;transport=tls;lr;r2=on>".to_string(),
            "<sip:127.0.0.1:5060;transport=udp;lr;r2=on>".to_string()
        ],
        "two entries: the caller came over UDP"
    );
}

#[test]
fn a_tls_destination_without_a_tls_listener_is_invalid() {
    let e = Config::from_yaml(
        "listeners: [\"udp:127.0.0.1:5060\"]\ndestinations:\n - {id: 1, uri: \"sips:127.0.0.1\", resources: pstn=1}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("destinations[0].uri") && e.contains("no tls listener"),
        "{e}"
    );
}

// ---- 3, 4, 5: dialogs ------------------------------------------------------------------------

#[test]
fn answered_call_relays_200_ack_bye_and_frees_the_load() {
    let mut h = Harness::new();
    let mut call = Call::udp("c3");
    let srv = Uas::new(S1, "srv3");
    let inv = place(&mut h, &call);
    assert_eq!(inv.to(), addr(S1));

    // 200 upstream, without our Via, to the caller's flow.
    h.recv(srv.peer, &srv.reply(&inv.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200", |s| s.code() == Some(200));
    assert_none(&out, "after the 200");
    ok.assert_to(&call.peer);
    let vias = ok.vias();
    assert_eq!(vias.len(), 1, "our Via is removed");
    assert_eq!(vias[0].branch(), Some(call.invite_branch().as_str()));
    assert_eq!(vias[0].host, "192.168.0.5");
    assert_eq!(ok.msg.to_tag(), Some("srv3"));
    assert_eq!(
        ok.all(HeaderName::RecordRoute),
        vec!["<sip:127.0.0.1:5060;transport=udp;lr>".to_string()]
    );
    assert_eq!(&ok.msg.body[..], SERVER_SDP.as_bytes());
    let st = h.proxy.dialog_stats();
    assert_eq!((st.active, st.early, st.failed), (1, 0, 0));
    assert_eq!(h.load(0), 1);

    // ACK with Route: forwarded to the server, our Route removed.
    call.answered(&ok.msg);
    assert_eq!(
        call.routes,
        vec!["<sip:127.0.0.1:5060;transport=udp;lr>".to_string()]
    );
    h.recv(call.peer, &call.ack());
    let mut out = h.out();
    let ack = take(&mut out, "ACK", |s| s.is(Method::Ack));
    assert_none(&out, "after the ACK");
    ack.assert_to(&srv.peer);
    assert_eq!(ack.ruri(), "sip:mrcp@127.0.0.1:5080;transport=udp");
    assert_eq!(ack.get(HeaderName::Route), None, "our Route is consumed");
    let vias = ack.vias();
    assert_eq!(vias.len(), 2);
    assert!(vias[0].branch().unwrap().starts_with("z9hG4bK"));
    assert_eq!(vias[0].host, "127.0.0.1");
    assert_eq!(h.proxy.dialog_stats().active, 1);

    // BYE from the caller: forwarded, dialog over, load back to 0.
    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE", |s| s.is(Method::Bye));
    assert_none(&out, "after the BYE");
    bye.assert_to(&srv.peer);
    assert_eq!(bye.ruri(), "sip:mrcp@127.0.0.1:5080;transport=udp");
    assert_eq!(bye.get(HeaderName::Route), None);
    assert_eq!(bye.get(HeaderName::CSeq), Some("2 BYE"));
    let st = h.proxy.dialog_stats();
    assert_eq!(
        (st.active, st.processed, st.failed, st.expired),
        (0, 1, 0, 0)
    );
    assert_eq!(h.load(0), 0);

    // 200 to the BYE goes back to the caller, without our Via.
    h.recv(srv.peer, &response(&bye.msg, 200, None, &[], ""));
    let mut out = h.out();
    let ok = take(&mut out, "200 to BYE", |s| s.code() == Some(200));
    assert_none(&out, "after the 200 to BYE");
    ok.assert_to(&call.peer);
    assert_eq!(ok.get(HeaderName::CSeq), Some("2 BYE"));
    assert_eq!(ok.vias().len(), 1);
    assert_eq!(
        ok.vias()[0].branch(),
        Some(format!("z9hG4bK-{}-2-BYE", call.call_id).as_str())
    );
}

#[test]
fn transactions_and_dialog_are_gone_after_a_call() {
    let mut h = Harness::new();
    let mut call = Call::udp("c3b");
    let srv = Uas::new(S1, "srv3b");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE", |s| s.is(Method::Bye));
    h.recv(srv.peer, &response(&bye.msg, 200, None, &[], ""));
    h.out();
    h.advance_to(secs(40));
    assert_eq!(
        h.proxy.sizes(),
        (0, 0, 0),
        "server txs, client txs, dialogs"
    );
}

#[test]
fn callee_bye_reaches_the_caller_on_its_tcp_connection() {
    let mut h = Harness::new();
    let mut call = Call::tcp("c4");
    let srv = Uas::new(S1, "srv4");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    assert_eq!(h.proxy.dialog_stats().active, 1);

    h.recv(srv.peer, &srv.bye(&inv.msg));
    let mut out = h.out();
    let bye = take(&mut out, "BYE to the caller", |s| s.is(Method::Bye));
    assert_none(&out, "after the BYE");
    // The caller's own TCP connection, from the TCP listener.
    bye.assert_to(&call.peer);
    assert_eq!(bye.ruri(), "sip:sipp@127.0.0.1:41000;transport=tcp");
    assert_eq!(bye.get(HeaderName::Route), None, "both our Routes consumed");
    let vias = bye.vias();
    assert_eq!(vias.len(), 2);
    assert_eq!(
        (vias[0].transport.as_str(), vias[0].port),
        ("TCP", Some(5060))
    );
    assert_eq!(bye.msg.from_tag(), Some("srv4"));
    assert_eq!(bye.msg.to_tag(), Some(call.tag()));
    let st = h.proxy.dialog_stats();
    assert_eq!((st.active, st.expired, st.failed), (0, 0, 0));
    assert_eq!(h.load(0), 0);
}

#[test]
fn response_to_a_callee_bye_goes_back_to_the_callee_across_transports() {
    // Caller on TCP, server on UDP: the server's BYE goes out over TCP with our TCP Via (no
    // rport). The caller's 200 must come back to the server that sent the BYE.
    let mut h = Harness::new();
    let mut call = Call::tcp("c4b");
    let srv = Uas::new(S1, "srv4b");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.recv(srv.peer, &srv.bye(&inv.msg));
    let mut out = h.out();
    let bye = take(&mut out, "BYE to the caller", |s| s.is(Method::Bye));
    bye.assert_to(&call.peer);

    h.recv(call.peer, &response(&bye.msg, 200, None, &[], ""));
    let mut out = h.out();
    let ok = take(&mut out, "200 to the BYE", |s| s.code() == Some(200));
    assert_none(&out, "after the 200");
    assert_eq!(ok.vias().len(), 1, "our Via removed");
    assert_eq!(ok.vias()[0].port, Some(5080));
    ok.assert_to(&srv.peer);
}

#[test]
fn requests_without_route_are_routed_by_dialog_memory() {
    let mut h = Harness::new();
    let mut call = Call::udp("c5");
    call.ignore_rr = true;
    let srv = Uas::new(S1, "srv5");
    let inv = place(&mut h, &call);
    h.recv(srv.peer, &srv.reply(&inv.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200", |s| s.code() == Some(200));
    call.answered(&ok.msg);

    // ACK to the proxy's own address, no Route.
    let ack_text = call.ack();
    assert!(ack_text.starts_with("ACK sip:service@127.0.0.1:5060 SIP/2.0"));
    assert!(!ack_text.contains("Route:"));
    h.recv(call.peer, &ack_text);
    let mut out = h.out();
    let ack = take(&mut out, "ACK", |s| s.is(Method::Ack));
    assert_none(&out, "after the ACK");
    ack.assert_to(&srv.peer);
    assert_eq!(ack.ruri(), "sip:mrcp@127.0.0.1:5080;transport=udp");

    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE", |s| s.is(Method::Bye));
    assert_none(&out, "after the BYE");
    bye.assert_to(&srv.peer);
    assert_eq!(bye.ruri(), "sip:mrcp@127.0.0.1:5080;transport=udp");
    assert_eq!(h.proxy.dialog_stats().active, 0);
    assert_eq!(h.load(0), 0);

    // A dialog the proxy does not know: 481, nothing forwarded.
    let mut stray = Call::udp("unknown");
    stray.ignore_rr = true;
    stray.to = "<sip:service@127.0.0.1:5060>;tag=gone".into();
    h.recv(stray.peer, &stray.bye());
    let mut out = h.out();
    let nope = take(&mut out, "481", |s| s.code() == Some(481));
    assert_none(&out, "after the 481");
    nope.assert_to(&stray.peer);
    assert_eq!(nope.get(HeaderName::CSeq), Some("2 BYE"));
}

// ---- 6, 7, 8, 9: timers and failover -------------------------------------------------------

#[test]
fn unanswered_invite_is_retransmitted_then_fails_over_and_marks_down() {
    let mut h = Harness::new();
    let call = Call::udp("c6");
    let inv = place(&mut h, &call);
    assert_eq!(inv.to(), addr(S1));

    // Timer A: T1, then 2*T1 later.
    h.advance_to(ms(499));
    assert_none(&h.out(), "before T1");
    h.advance_to(ms(500));
    let mut out = h.out();
    let re = take(&mut out, "retransmission at T1", |s| s.is(Method::Invite));
    assert_none(&out, "at T1");
    assert_eq!(re.to(), addr(S1));
    assert_eq!(re.out.data, inv.out.data, "same bytes");
    h.advance_to(ms(1499));
    assert_none(&h.out(), "before T1 + 2*T1");
    h.advance_to(ms(1500));
    let mut out = h.out();
    let re = take(&mut out, "retransmission at 3*T1", |s| s.is(Method::Invite));
    assert_none(&out, "at 3*T1");
    assert_eq!(re.out.data, inv.out.data);
    h.advance_to(ms(2999));
    assert_none(&h.out(), "before inviteTimeout");

    // inviteTimeout: 5080 marked down, the call goes to 5090 on a new branch.
    h.advance_to(ms(3000));
    let mut out = h.out();
    let inv2 = take(&mut out, "INVITE to the second destination", |s| {
        s.is(Method::Invite)
    });
    assert_none(&out, "at the timeout (nothing to the caller)");
    inv2.assert_to(&Peer::udp_server(S2));
    assert_eq!(inv2.ruri(), "sip:service@127.0.0.1:5090");
    assert_ne!(inv2.branch(), inv.branch());
    assert_eq!(&inv2.msg.body[..], CLIENT_SDP.as_bytes());
    assert_eq!(h.state(0), State::Down);
    assert_eq!((h.load(0), h.load(1)), (0, 1));
    let rs = h.proxy.route_stats();
    assert_eq!((rs.routed, rs.failovers), (2, 1));

    // Only the new branch retransmits.
    h.advance_to(ms(3500));
    let mut out = h.out();
    let re = take(&mut out, "retransmission", |s| s.is(Method::Invite));
    assert_none(&out, "at 3.5 s");
    assert_eq!(re.to(), addr(S2));

    // The second server answers: the caller gets its 200.
    let srv2 = Uas::new(S2, "srv6");
    h.recv(srv2.peer, &srv2.reply(&inv2.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200", |s| s.code() == Some(200));
    assert_none(&out, "after the 200");
    ok.assert_to(&call.peer);
    assert_eq!(ok.msg.to_tag(), Some("srv6"));
    assert_eq!(ok.vias().len(), 1);
    assert_eq!(h.proxy.dialog_stats().active, 1);
    assert_eq!((h.load(0), h.load(1)), (0, 1));
}

#[test]
fn late_200_from_a_timed_out_branch_is_hung_up_not_relayed() {
    // The first server answers just after the proxy gave up on it: the proxy must ACK and
    // BYE that answer itself; the caller must not see a second dialog.
    let mut h = Harness::new();
    let call = Call::udp("c6b");
    let inv = place(&mut h, &call);
    h.advance_to(ms(3000));
    let mut out = h.out();
    take(&mut out, "INVITE to the second destination", |s| {
        s.is(Method::Invite) && s.to() == addr(S2)
    });
    h.advance_to(ms(3100));
    h.out();

    let srv1 = Uas::new(S1, "late");
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let to_caller: Vec<String> = out
        .iter()
        .filter(|s| s.to() == call.peer.addr)
        .map(Sent::label)
        .collect();
    assert!(
        to_caller.is_empty(),
        "the late 200 was relayed to the caller: {to_caller:?}"
    );
    let ack = take(&mut out, "ACK to the late server", |s| s.is(Method::Ack));
    assert_eq!(ack.to(), addr(S1));
    let bye = take(&mut out, "BYE to the late server", |s| s.is(Method::Bye));
    assert_eq!(bye.to(), addr(S1));
    assert_eq!(bye.msg.to_tag(), Some("late"));
}

#[test]
fn provisional_without_final_cancels_and_fails_over_without_marking_down() {
    let mut h = Harness::new();
    let call = Call::udp("c7");
    let srv1 = Uas::new(S1, "srv7a");
    let inv = place(&mut h, &call);
    assert_eq!(inv.to(), addr(S1));

    h.recv(srv1.peer, &srv1.reply(&inv.msg, 180, &[], ""));
    let mut out = h.out();
    let ringing = take(&mut out, "180 to the caller", |s| s.code() == Some(180));
    assert_none(&out, "after the 180");
    ringing.assert_to(&call.peer);
    assert_eq!(ringing.vias().len(), 1);
    assert_eq!(h.proxy.dialog_stats().early, 1);

    // No retransmission after a provisional, no failover at inviteTimeout.
    h.advance_to(ms(9999));
    assert_none(&h.out(), "before inviteFinalTimeout");

    h.advance_to(secs(10));
    let mut out = h.out();
    let cancel = take(&mut out, "CANCEL", |s| s.is(Method::Cancel));
    let inv2 = take(&mut out, "INVITE to the second destination", |s| {
        s.is(Method::Invite)
    });
    assert_none(&out, "at the final-response timeout");
    cancel.assert_to(&srv1.peer);
    assert_eq!(
        cancel.branch(),
        inv.branch(),
        "CANCEL on the INVITE's branch"
    );
    assert_eq!(cancel.vias().len(), 1);
    assert_eq!(cancel.ruri(), inv.ruri());
    assert_eq!(cancel.get(HeaderName::CSeq), Some("1 CANCEL"));
    assert_eq!(cancel.get(HeaderName::CallId), inv.get(HeaderName::CallId));
    assert_eq!(cancel.get(HeaderName::From), inv.get(HeaderName::From));
    assert_eq!(cancel.get(HeaderName::To), inv.get(HeaderName::To));
    inv2.assert_to(&Peer::udp_server(S2));
    assert_ne!(inv2.branch(), inv.branch());

    assert_eq!(h.state(0), State::Up, "a slow answer does not mark it down");
    assert_eq!((h.load(0), h.load(1)), (0, 1));
    assert_eq!(h.proxy.route_stats().failovers, 1);
    assert_eq!(h.proxy.dialog_stats().early, 0);

    // The first server confirms: 200 to CANCEL, 487 to INVITE (ACKed, not relayed).
    h.recv(
        srv1.peer,
        &response(&cancel.msg, 200, Some("srv7a"), &[], ""),
    );
    assert_none(&h.out(), "200 to our CANCEL is absorbed");
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 487, &[], ""));
    let mut out = h.out();
    let ack = take(&mut out, "ACK for the 487", |s| s.is(Method::Ack));
    assert_none(&out, "the 487 is not relayed");
    ack.assert_to(&srv1.peer);
    assert_eq!(ack.branch(), inv.branch());

    // The second server answers the call.
    let srv2 = Uas::new(S2, "srv7b");
    h.recv(srv2.peer, &srv2.reply(&inv2.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200", |s| s.code() == Some(200));
    ok.assert_to(&call.peer);
    assert_eq!(ok.msg.to_tag(), Some("srv7b"));
    assert_eq!(h.proxy.dialog_stats().active, 1);
}

#[test]
fn a_ringing_branch_that_goes_silent_is_forgotten() {
    // Found by fuzzing: a branch given up on at inviteFinalTimeout (180, then nothing) was
    // cancelled but never removed when the server answered neither the CANCEL nor the INVITE:
    // one client transaction leaked per such call.
    let mut h = Harness::new();
    let call = Call::udp("c7s");
    let srv1 = Uas::new(S1, "srv7s");
    let inv = place(&mut h, &call);
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 180, &[], ""));
    h.advance_to(secs(10));
    let mut out = h.out();
    take(&mut out, "CANCEL", |s| s.is(Method::Cancel));
    let inv2 = take(&mut out, "INVITE to the second destination", |s| {
        s.is(Method::Invite)
    });
    // The second server turns the call down; the first one stays silent.
    let srv2 = Uas::new(S2, "srv7t");
    h.recv(srv2.peer, &srv2.reply(&inv2.msg, 486, &[], ""));
    h.advance_to(secs(60));
    assert_eq!(h.proxy.sizes(), (0, 0, 0), "transactions and dialogs left");
    assert_eq!((h.load(0), h.load(1)), (0, 0));
}

#[test]
fn bye_in_the_early_dialog_then_silence_still_ends_the_invite() {
    // Found by fuzzing: the caller's BYE in the early dialog ended the dialog while the INVITE
    // was pending; when the branch then timed out, failover found no dialog and returned,
    // leaving the INVITE's server transaction open forever and the caller without a final.
    let mut h = Harness::new();
    let mut call = Call::udp("c7b");
    let srv1 = Uas::new(S1, "srv7c");
    let inv = place(&mut h, &call);
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 180, &[], ""));
    let mut out = h.out();
    let ringing = take(&mut out, "180", |s| s.code() == Some(180));
    call.answered(&ringing.msg);
    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    take(&mut out, "BYE to the server", |s| s.is(Method::Bye));
    assert_none(&out, "after the BYE");
    // The server answers nothing; at inviteFinalTimeout the branch is cancelled.
    h.advance_to(secs(10));
    let mut out = h.out();
    let fin = take(&mut out, "487 to the caller", |s| s.code() == Some(487));
    fin.assert_to(&call.peer);
    take(&mut out, "CANCEL", |s| s.is(Method::Cancel));
    h.advance_to(secs(120));
    assert_eq!(h.proxy.sizes(), (0, 0, 0), "transactions and dialogs left");
}

#[test]
fn server_503_is_acknowledged_and_fails_over() {
    let mut h = Harness::new();
    let call = Call::udp("c8");
    let srv1 = Uas::new(S1, "srv8");
    let inv = place(&mut h, &call);

    h.recv(srv1.peer, &srv1.reply(&inv.msg, 503, &[], ""));
    let mut out = h.out();
    let ack = take(&mut out, "ACK for the 503", |s| s.is(Method::Ack));
    let inv2 = take(&mut out, "INVITE to the second destination", |s| {
        s.is(Method::Invite)
    });
    assert_none(&out, "nothing to the caller");
    ack.assert_to(&srv1.peer);
    assert_eq!(ack.branch(), inv.branch(), "ACK of a non-2xx: same branch");
    assert_eq!(ack.vias().len(), 1);
    assert_eq!(ack.msg.to_tag(), Some("srv8"));
    assert_eq!(ack.ruri(), inv.ruri());
    assert_eq!(ack.get(HeaderName::CSeq), Some("1 ACK"));
    assert_eq!(ack.get(HeaderName::From), inv.get(HeaderName::From));
    inv2.assert_to(&Peer::udp_server(S2));
    assert_ne!(inv2.branch(), inv.branch());
    assert_eq!(h.state(0), State::Up, "a 503 does not mark it down");
    assert_eq!((h.load(0), h.load(1)), (0, 1));
    assert_eq!(h.proxy.route_stats().failovers, 1);
}

#[test]
fn busy_486_is_relayed_without_failover() {
    let mut h = Harness::new();
    let call = Call::udp("c8b");
    let srv1 = Uas::new(S1, "srv8b");
    let inv = place(&mut h, &call);
    h.recv(
        srv1.peer,
        &srv1.reply(&inv.msg, 486, &[("Warning", "399 srv busy".into())], ""),
    );
    let mut out = h.out();
    let ack = take(&mut out, "ACK for the 486", |s| s.is(Method::Ack));
    let busy = take(&mut out, "486 to the caller", |s| s.code() == Some(486));
    assert_none(&out, "no failover");
    ack.assert_to(&srv1.peer);
    assert_eq!(ack.branch(), inv.branch());
    busy.assert_to(&call.peer);
    assert_eq!(
        busy.msg.start,
        StartLine::Response {
            code: 486,
            reason: "Busy Here".into()
        }
    );
    assert_eq!(
        busy.msg.to_tag(),
        Some("srv8b"),
        "the server's response, not ours"
    );
    assert_eq!(
        busy.get(HeaderName::Other("Warning".into())),
        Some("399 srv busy")
    );
    assert_eq!(busy.vias().len(), 1);
    assert_eq!(busy.vias()[0].branch(), Some(call.invite_branch().as_str()));
    let st = h.proxy.dialog_stats();
    assert_eq!((st.failed, st.active, st.early), (1, 0, 0));
    assert_eq!((h.load(0), h.load(1)), (0, 0));
    assert_eq!(h.proxy.route_stats().failovers, 0);
}

#[test]
fn all_destinations_503_gives_503_with_retry_after() {
    let mut h = Harness::new();
    let call = Call::udp("c9");
    let inv = place(&mut h, &call);
    let srv1 = Uas::new(S1, "srv9a");
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 503, &[], ""));
    let mut out = h.out();
    take(&mut out, "ACK to 5080", |s| s.is(Method::Ack));
    let inv2 = take(&mut out, "INVITE to 5090", |s| s.is(Method::Invite));
    assert_eq!(inv2.to(), addr(S2));

    let srv2 = Uas::new(S2, "srv9b");
    h.recv(srv2.peer, &srv2.reply(&inv2.msg, 503, &[], ""));
    let mut out = h.out();
    let ack = take(&mut out, "ACK to 5090", |s| s.is(Method::Ack));
    ack.assert_to(&srv2.peer);
    let fail = take(&mut out, "503 to the caller", |s| s.code() == Some(503));
    assert_none(&out, "no destination left");
    fail.assert_to(&call.peer);
    assert_eq!(fail.get(HeaderName::RetryAfter), Some("5"));
    assert_eq!(fail.vias().len(), 1);
    assert!(fail.msg.to_tag().is_some());
    let st = h.proxy.dialog_stats();
    assert_eq!((st.failed, st.active), (1, 0));
    assert_eq!((h.load(0), h.load(1)), (0, 0));
    let rs = h.proxy.route_stats();
    assert_eq!(
        (rs.routed, rs.failovers, rs.rejected_no_capacity),
        (2, 1, 0)
    );
}

#[test]
fn no_capacity_gives_an_immediate_503_with_retry_after() {
    let mut h = Harness::with(
        "\n  - {id: 1, group: 1, uri: \"sip:127.0.0.1:5080\", resources: pstn=1}\n",
        "",
    );
    let mut first = Call::udp("c9b");
    let srv = Uas::new(S1, "srv9c");
    let inv = place(&mut h, &first);
    answer(&mut h, &mut first, &srv, &inv, &[]);
    assert_eq!(h.load(0), 1);

    let second = Call::udp("c9c");
    let sizes = h.proxy.sizes();
    h.recv(second.peer, &second.invite());
    let mut out = h.out();
    // Refused before any state: no 100, no transaction, no dialog.
    let fail = take(&mut out, "503", |s| s.code() == Some(503));
    assert_none(&out, "nothing forwarded");
    assert_eq!(h.proxy.sizes(), sizes, "nothing kept for the refused call");
    fail.assert_to(&second.peer);
    assert_eq!(fail.get(HeaderName::RetryAfter), Some("5"));
    assert_eq!(fail.get(HeaderName::CallId), Some(second.call_id.as_str()));
    assert!(
        fail.msg.to_tag().is_some(),
        "a final response carries a To tag"
    );
    // A retransmission gets the same answer; the ACK is absorbed.
    h.recv(second.peer, &second.invite());
    let again = take(&mut h.out(), "503 again", |s| s.code() == Some(503));
    assert_eq!(again.msg.to_tag(), fail.msg.to_tag(), "same To tag");
    h.recv(second.peer, &second.ack_non_2xx(&fail.msg));
    assert_none(&h.out(), "the ACK of the 503 is absorbed");
    assert_eq!(h.proxy.sizes(), sizes);
    let rs = h.proxy.route_stats();
    assert_eq!((rs.routed, rs.rejected_no_capacity), (1, 2));
    let st = h.proxy.dialog_stats();
    assert_eq!((st.active, st.failed, st.processed), (1, 2, 3));
    assert_eq!(h.load(0), 1);
}

// ---- 10, 11, 12, 13: transaction details ---------------------------------------------------

#[test]
fn cancel_before_provisional_waits_for_a_provisional_then_cancels() {
    let mut h = Harness::new();
    let call = Call::udp("c10");
    let srv = Uas::new(S1, "srv10");
    let inv = place(&mut h, &call);

    h.recv(call.peer, &call.cancel());
    let mut out = h.out();
    let ok = take(&mut out, "200 to CANCEL", |s| s.code() == Some(200));
    assert_none(&out, "no CANCEL before a provisional");
    ok.assert_to(&call.peer);
    assert_eq!(ok.get(HeaderName::CSeq), Some("1 CANCEL"));

    h.recv(srv.peer, &srv.reply(&inv.msg, 180, &[], ""));
    let mut out = h.out();
    let cancel = take(&mut out, "CANCEL", |s| s.is(Method::Cancel));
    cancel.assert_to(&srv.peer);
    assert_eq!(cancel.branch(), inv.branch());
    assert_eq!(cancel.get(HeaderName::CSeq), Some("1 CANCEL"));
    assert!(
        out.iter().all(|s| s.to() != addr(S1) && s.to() != addr(S2)),
        "only the CANCEL goes downstream:{}",
        describe(&out)
    );

    h.recv(
        srv.peer,
        &response(&cancel.msg, 200, Some("srv10"), &[], ""),
    );
    assert_none(&h.out(), "200 to our CANCEL is absorbed");
    h.recv(srv.peer, &srv.reply(&inv.msg, 487, &[], ""));
    let mut out = h.out();
    let ack = take(&mut out, "ACK for the 487", |s| s.is(Method::Ack));
    ack.assert_to(&srv.peer);
    assert_eq!(ack.branch(), inv.branch());
    let term = take(&mut out, "487 to the caller", |s| s.code() == Some(487));
    assert_none(&out, "no failover after CANCEL");
    term.assert_to(&call.peer);
    assert_eq!(term.get(HeaderName::CSeq), Some("1 INVITE"));

    let st = h.proxy.dialog_stats();
    assert_eq!((st.failed, st.early, st.active), (1, 0, 0));
    assert_eq!((h.load(0), h.load(1)), (0, 0));
    assert_eq!(h.proxy.route_stats().failovers, 0);
}

#[test]
fn retransmitted_invite_is_absorbed_and_answered_with_the_last_response() {
    let mut h = Harness::new();
    let call = Call::udp("c11");
    let srv = Uas::new(S1, "srv11");
    h.recv(call.peer, &call.invite());
    let mut out = h.out();
    let trying = take(&mut out, "100 Trying", |s| s.code() == Some(100));
    let inv = take(&mut out, "INVITE", |s| s.is(Method::Invite));

    h.recv(call.peer, &call.invite());
    let mut out = h.out();
    let again = take(&mut out, "100 Trying again", |s| s.code() == Some(100));
    assert_none(&out, "nothing forwarded again");
    again.assert_to(&call.peer);
    assert_eq!(again.out.data, trying.out.data);
    assert_eq!(h.proxy.route_stats().routed, 1);
    assert_eq!(h.proxy.dialog_stats().processed, 1);
    assert_eq!(h.load(0), 1);

    // After a 180 the 180 is the last response.
    h.recv(srv.peer, &srv.reply(&inv.msg, 180, &[], ""));
    let mut out = h.out();
    let ringing = take(&mut out, "180", |s| s.code() == Some(180));
    h.recv(call.peer, &call.invite());
    let mut out = h.out();
    let again = take(&mut out, "180 again", |s| s.code() == Some(180));
    assert_none(&out, "nothing forwarded again");
    assert_eq!(again.out.data, ringing.out.data);
}

#[test]
fn a_final_after_a_2xx_on_the_same_branch_is_absorbed() {
    // Found by fuzzing: once a 2xx has come, the INVITE's client transaction no longer keeps
    // the request (RFC 6026 Accepted), and a 487 arriving after it made the proxy ACK it with
    // an ACK built from nothing: `ACK  SIP/2.0` without Via, From or Call-ID.
    let mut h = Harness::new();
    let mut call = Call::udp("c2xx487");
    let srv = Uas::new(S1, "srv2xx487");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.recv(srv.peer, &srv.reply(&inv.msg, 487, &[], ""));
    assert_none(&h.out(), "after a 487 that follows the 200");
    // Retransmissions of the 200 still reach the caller.
    h.recv(srv.peer, &srv.reply(&inv.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200 retransmission", |s| s.code() == Some(200));
    ok.assert_to(&call.peer);
    assert_none(&out, "after the 200 retransmission");
}

#[test]
fn non_2xx_final_is_retransmitted_over_udp_until_the_ack() {
    let mut h = Harness::new();
    let call = Call::udp("c12");
    let srv = Uas::new(S1, "srv12");
    let inv = place(&mut h, &call);
    h.recv(srv.peer, &srv.reply(&inv.msg, 486, &[], ""));
    let mut out = h.out();
    take(&mut out, "ACK downstream", |s| s.is(Method::Ack));
    let busy = take(&mut out, "486", |s| s.code() == Some(486));

    // Timer G: T1, 2*T1, 4*T1 apart.
    for (quiet, due) in [(499, 500), (1499, 1500), (3499, 3500)] {
        h.advance_to(ms(quiet));
        assert_none(&h.out(), &format!("before {due} ms"));
        h.advance_to(ms(due));
        let mut out = h.out();
        let re = take(&mut out, &format!("486 again at {due} ms"), |s| {
            s.code() == Some(486)
        });
        assert_none(&out, "only the 486");
        re.assert_to(&call.peer);
        assert_eq!(re.out.data, busy.out.data);
    }

    // The caller's ACK stops it and is not forwarded.
    h.recv(call.peer, &call.ack_non_2xx(&busy.msg));
    assert_none(&h.out(), "the ACK is absorbed");
    h.advance_to(secs(40));
    assert_none(&h.out(), "no retransmission after the ACK");
}

#[test]
fn max_forwards_zero_options_and_register_are_answered_locally() {
    let mut h = Harness::new();
    let call = Call::udp("c13");
    h.recv(
        call.peer,
        &call.invite().replace("Max-Forwards: 70", "Max-Forwards: 0"),
    );
    let mut out = h.out();
    let hops = take(&mut out, "483", |s| s.code() == Some(483));
    assert_none(&out, "nothing forwarded");
    hops.assert_to(&call.peer);
    assert_eq!(h.proxy.route_stats().routed, 0);
    assert_eq!((h.load(0), h.load(1)), (0, 0));

    let opt = Call::udp("c13o");
    h.recv(
        opt.peer,
        &opt.out_of_dialog("OPTIONS", &[("Accept", "application/sdp".into())]),
    );
    let mut out = h.out();
    let ok = take(&mut out, "200 to OPTIONS", |s| s.code() == Some(200));
    assert_none(&out, "OPTIONS is answered, not forwarded");
    ok.assert_to(&opt.peer);
    assert_eq!(ok.get(HeaderName::CSeq), Some("1 OPTIONS"));
    let allow = ok.get(HeaderName::Allow).unwrap_or_default();
    for m in ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS"] {
        assert!(allow.contains(m), "Allow: {allow}");
    }

    let reg = Call::udp("c13r");
    h.recv(
        reg.peer,
        &reg.out_of_dialog(
            "REGISTER",
            &[("Contact", reg.contact.clone()), ("Expires", "3600".into())],
        ),
    );
    let mut out = h.out();
    let no = take(&mut out, "405 to REGISTER", |s| s.code() == Some(405));
    assert_none(&out, "REGISTER is not forwarded");
    no.assert_to(&reg.peer);
    assert!(no
        .get(HeaderName::Allow)
        .is_some_and(|a| a.contains("INVITE")));
    assert_eq!(h.proxy.dialog_stats().processed, 0);
}

// ---- 14: dialog limits -----------------------------------------------------------------------

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

#[test]
fn dialog_lifetime_limit_sends_bye_to_both_sides() {
    let mut h = Harness::with(TWO_DESTS, "dialogs:\n  lifetime: 10s\n");
    let mut call = Call::udp("c14");
    let srv = Uas::new(S1, "srv14");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    assert_eq!(h.proxy.dialog_stats().active, 1);

    h.advance_to(ms(9999));
    assert_none(&h.out(), "before the lifetime");
    assert_eq!(h.proxy.dialog_stats().active, 1);
    h.advance_to(secs(10));
    let mut out = h.out();
    let (to_srv, to_caller) = expiry_byes(&mut out, &call, &srv);
    assert_none(&out, "only the two BYEs");
    assert_eq!(to_srv.get(HeaderName::CSeq), Some("2 BYE"));
    assert!(to_caller
        .get(HeaderName::CSeq)
        .is_some_and(|c| c.ends_with(" BYE")));

    let st = h.proxy.dialog_stats();
    assert_eq!((st.expired, st.active, st.failed), (1, 0, 0));
    assert_eq!((h.load(0), h.load(1)), (0, 0));

    // Both sides answer; nothing is relayed.
    h.recv(srv.peer, &response(&to_srv.msg, 200, None, &[], ""));
    h.recv(call.peer, &response(&to_caller.msg, 200, None, &[], ""));
    assert_none(&h.out(), "the 200s to our own BYEs are absorbed");
}

#[test]
fn a_malformed_contact_is_no_target_for_the_expiry_bye() {
    // Found by fuzzing: the caller's Contact was kept as its remote target unchecked, and the
    // BYE at the dialog's lifetime went out with it as Request-URI: a request that does not
    // parse (a bad port; a space in a parameter). The callee still gets its BYE.
    for (i, contact) in [
        "<sip:client@127.0.5.1:5070t;ransport=UDP>",
        "<sip:client@[::1]:5072;tra[:f: :1]nsport=UDP>",
    ]
    .into_iter()
    .enumerate()
    {
        let mut h = Harness::with(TWO_DESTS, "dialogs:\n  lifetime: 10s\n");
        let mut call = Call::udp(&format!("c14b{i}"));
        call.contact = contact.into();
        let srv = Uas::new(S1, "srv14b");
        let inv = place(&mut h, &call);
        answer(&mut h, &mut call, &srv, &inv, &[]);
        h.advance_to(secs(10));
        let mut out = h.out();
        let to_srv = take(&mut out, "BYE to the server", |s| s.is(Method::Bye));
        to_srv.assert_to(&srv.peer);
        assert_none(&out, "no BYE to a caller without a usable Contact");
        assert_eq!(h.proxy.dialog_stats().expired, 1);
        assert_eq!(h.load(0), 0);
    }
}

#[test]
fn session_expires_ends_the_dialog_at_its_deadline() {
    let mut h = Harness::new();
    let mut call = Call::udp("c14b");
    let srv = Uas::new(S1, "srv14b");
    let inv = place(&mut h, &call);
    let se = [("Session-Expires", "60;refresher=uac".to_string())];
    let ok = answer(&mut h, &mut call, &srv, &inv, &se);
    assert_eq!(ok.get(HeaderName::SessionExpires), Some("60;refresher=uac"));

    h.advance_to(ms(59_999));
    assert_none(&h.out(), "before Session-Expires");
    assert_eq!(h.proxy.dialog_stats().active, 1);
    h.advance_to(secs(60));
    let mut out = h.out();
    expiry_byes(&mut out, &call, &srv);
    assert_none(&out, "only the two BYEs");
    let st = h.proxy.dialog_stats();
    assert_eq!((st.expired, st.active), (1, 0));
    assert_eq!(h.load(0), 0);
}

#[test]
fn a_session_expires_beyond_the_clock_leaves_the_lifetime_limit() {
    // Found by fuzzing: `now + Session-Expires` panicked ("overflow when adding duration to
    // instant") for a 2xx with Session-Expires: 18446744073709551615, which killed the task
    // that owns every call.
    let mut h = Harness::with(TWO_DESTS, "dialogs:\n  lifetime: 10s\n");
    let mut call = Call::udp("c14c");
    let srv = Uas::new(S1, "srv14c");
    let inv = place(&mut h, &call);
    let se = [("Session-Expires", "18446744073709551615".to_string())];
    answer(&mut h, &mut call, &srv, &inv, &se);
    assert_eq!(h.proxy.dialog_stats().active, 1);
    h.advance_to(secs(10));
    let mut out = h.out();
    expiry_byes(&mut out, &call, &srv);
    assert_eq!(h.proxy.dialog_stats().expired, 1);
}

#[test]
fn the_largest_cseq_does_not_overflow_the_expiry_bye() {
    // Found with the fuzz harness: a caller's CSeq of 4294967295 made `cseq + 1` for the
    // expiry BYE overflow (a panic with overflow checks, CSeq 0 without).
    let mut h = Harness::with(TWO_DESTS, "dialogs:\n  lifetime: 10s\n");
    let call = Call::udp("c14d");
    let srv = Uas::new(S1, "srv14d");
    h.recv(
        call.peer,
        &call
            .invite()
            .replace("CSeq: 1 INVITE", "CSeq: 4294967295 INVITE"),
    );
    let mut out = h.out();
    let inv = take(&mut out, "forwarded INVITE", |s| s.is(Method::Invite));
    h.recv(srv.peer, &srv.reply(&inv.msg, 200, &[], SERVER_SDP));
    h.out();
    h.advance_to(secs(10));
    let mut out = h.out();
    let to_srv = take(&mut out, "BYE to the server", |s| {
        s.is(Method::Bye) && s.to() == srv.peer.addr
    });
    assert_eq!(to_srv.get(HeaderName::CSeq), Some("4294967295 BYE"));
    assert_eq!(h.proxy.dialog_stats().expired, 1);
}

#[test]
fn a_reinvite_left_without_a_final_gets_408() {
    // Found by fuzzing: a re-INVITE answered only with a provisional was cancelled at
    // inviteFinalTimeout, but its server transaction (no failover for it) never got a final
    // response: the caller waited forever and the transaction leaked.
    let mut h = Harness::new();
    let mut call = Call::udp("c14e");
    let srv = Uas::new(S1, "srv14e");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.recv(call.peer, &call.in_dialog("INVITE", &[], CLIENT_SDP));
    let mut out = h.out();
    let fwd = take(&mut out, "re-INVITE to the server", |s| {
        s.is(Method::Invite)
    });
    take(&mut out, "100 Trying", |s| s.code() == Some(100));
    h.recv(srv.peer, &srv.reply(&fwd.msg, 180, &[], ""));
    take(&mut h.out(), "180 to the caller", |s| s.code() == Some(180));
    h.advance_to(secs(10));
    let mut out = h.out();
    let cancel = take(&mut out, "CANCEL", |s| s.is(Method::Cancel));
    cancel.assert_to(&srv.peer);
    let timeout = take(&mut out, "408 to the caller", |s| s.code() == Some(408));
    timeout.assert_to(&call.peer);
    assert_eq!(timeout.get(HeaderName::CSeq), Some("2 INVITE"));
    h.advance_to(secs(60));
    assert_eq!(h.proxy.sizes(), (0, 0, 1), "only the dialog is left");
    assert_eq!(h.proxy.dialog_stats().active, 1);
}

#[test]
fn reinvite_with_session_expires_pushes_the_deadline() {
    let mut h = Harness::new();
    let mut call = Call::udp("c14c");
    let srv = Uas::new(S1, "srv14c");
    let inv = place(&mut h, &call);
    let se = [("Session-Expires", "60;refresher=uac".to_string())];
    answer(&mut h, &mut call, &srv, &inv, &se);

    // Refresh at 30 s.
    h.advance_to(secs(30));
    h.out();
    let reinvite = call.in_dialog(
        "INVITE",
        &[
            ("Session-Expires", "60;refresher=uac".into()),
            ("Supported", "timer".into()),
        ],
        CLIENT_SDP,
    );
    h.recv(call.peer, &reinvite);
    let mut out = h.out();
    let fwd = take(&mut out, "re-INVITE to the server", |s| {
        s.is(Method::Invite)
    });
    fwd.assert_to(&srv.peer);
    assert_eq!(fwd.get(HeaderName::CSeq), Some("2 INVITE"));
    h.recv(srv.peer, &srv.reply(&fwd.msg, 200, &se, SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200 to the re-INVITE", |s| s.code() == Some(200));
    ok.assert_to(&call.peer);
    h.recv(call.peer, &call.ack());
    let mut out = h.out();
    take(&mut out, "ACK of the re-INVITE", |s| s.is(Method::Ack));

    // The first deadline (60 s) passes quietly; the new one (90 s) ends the dialog.
    h.advance_to(secs(60));
    h.advance_to(ms(89_999));
    let out = h.out();
    assert!(
        !out.iter().any(|s| s.is(Method::Bye)),
        "BYE before the refreshed deadline:{}",
        describe(&out)
    );
    assert_eq!(h.proxy.dialog_stats().active, 1);
    h.advance_to(secs(90));
    let mut out = h.out();
    expiry_byes(&mut out, &call, &srv);
    assert_eq!(h.proxy.dialog_stats().expired, 1);
}

#[test]
fn expiry_bye_towards_the_callee_follows_its_route_set_in_order() {
    // The destination at 5080 is a proxy that record-routes, and forwards to another proxy
    // (10.9.9.2) before the server. Our route set towards the callee is what lies above our
    // Record-Route in the 200, in reverse: 5080 first, then 10.9.9.2.
    let mut h = Harness::with(TWO_DESTS, "dialogs:\n  lifetime: 10s\n");
    let mut call = Call::udp("c14d");
    let mut srv = Uas::new(S1, "srv14d");
    srv.record_route = vec![
        "<sip:10.9.9.2;lr>".to_string(),
        "<sip:127.0.0.1:5080;lr>".to_string(),
    ];
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.advance_to(secs(10));
    let mut out = h.out();
    let bye = take(&mut out, "BYE to the callee side", |s| {
        s.is(Method::Bye) && s.to() == addr(S1)
    });
    assert_eq!(
        bye.all(HeaderName::Route),
        vec![
            "<sip:127.0.0.1:5080;lr>".to_string(),
            "<sip:10.9.9.2;lr>".to_string()
        ]
    );
}

// ---- 15, 16: transport errors and routing ----------------------------------------------------

#[test]
fn transport_error_on_a_tcp_destination_fails_over_at_once() {
    let mut h = Harness::with(
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080;transport=tcp", resources: pstn=100}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50}
"#,
        "",
    );
    let call = Call::udp("c15");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer {
        transport: Transport::Tcp,
        listener: TCP_L,
        addr: addr(S1),
        conn: None,
    });
    assert_eq!(inv.vias()[0].transport, "TCP");
    let token = inv.out.on_error.expect("an error token on the INVITE");

    h.proxy.on_transport_error(h.now, token);
    let mut out = h.out();
    let inv2 = take(&mut out, "INVITE to the second destination", |s| {
        s.is(Method::Invite)
    });
    assert_none(&out, "nothing to the caller");
    inv2.assert_to(&Peer::udp_server(S2));
    assert_ne!(inv2.branch(), inv.branch());
    assert_eq!(h.state(0), State::Down);
    assert_eq!(h.state(1), State::Up);
    assert_eq!((h.load(0), h.load(1)), (0, 1));
    assert_eq!(h.proxy.route_stats().failovers, 1);

    let srv2 = Uas::new(S2, "srv15");
    h.recv(srv2.peer, &srv2.reply(&inv2.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    take(&mut out, "200 to the caller", |s| {
        s.code() == Some(200) && s.to() == call.peer.addr
    });
}

#[test]
fn relative_mode_splits_calls_by_capacity() {
    let mut h = Harness::with(TWO_DESTS, "routing:\n  mode: relative\n");
    let mut per_port = HashMap::<u16, u32>::default();
    for i in 0..30 {
        let mut call = Call::udp(&format!("c16-{i}"));
        let inv = place(&mut h, &call);
        *per_port.entry(inv.to().port()).or_default() += 1;
        let srv = Uas {
            peer: Peer::udp_server(&inv.to().to_string()),
            tag: format!("srv16-{i}"),
            record_route: Vec::new(),
        };
        answer(&mut h, &mut call, &srv, &inv, &[]);
    }
    assert_eq!(
        (per_port.get(&5080), per_port.get(&5090)),
        (Some(&20), Some(&10))
    );
    assert_eq!((h.load(0), h.load(1)), (20, 10));
    let st = h.proxy.dialog_stats();
    assert_eq!((st.active, st.processed, st.failed), (30, 30, 0));
}

// ---- 17: OPTIONS probing -----------------------------------------------------------------------

use lb_api::admin::Action;
use lb_api::{DesiredState, DestinationSet};

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
        (
            vias[0].transport.as_str(),
            vias[0].host.as_str(),
            vias[0].port
        ),
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

#[test]
fn probes_go_out_within_the_first_interval_then_every_interval() {
    let mut h = Harness::started(
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100, probeMode: 2}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090;transport=tcp", resources: pstn=50, probeMode: 2}
"#,
        PROBING,
    );
    let mut probes: Vec<(Duration, Sent)> = Vec::new();
    run_until(&mut h, secs(45), |h, s| {
        assert!(s.is(Method::Options), "only probes: {}", s.label());
        answer_probe(h, &s, 200);
        probes.push((h.elapsed(), s));
    });

    let udp = Peer::udp_server(S1);
    let tcp = Peer {
        transport: Transport::Tcp,
        listener: TCP_L,
        addr: addr(S2),
        conn: None,
    };
    let mut call_ids = std::collections::HashSet::new();
    let mut tags = std::collections::HashSet::new();
    for (slot, peer, ruri) in [
        (0, udp, "sip:127.0.0.1:5080"),
        (1, tcp, "sip:127.0.0.1:5090;transport=tcp"),
    ] {
        let times: Vec<Duration> = probes
            .iter()
            .filter(|(_, s)| s.to() == peer.addr)
            .map(|(t, _)| *t)
            .collect();
        assert!(!times.is_empty(), "no probe to {}", peer.addr);
        assert!(
            times[0] <= secs(10),
            "first probe to {} within the first interval: {times:?}",
            peer.addr
        );
        for w in times.windows(2) {
            assert_eq!(w[1] - w[0], secs(10), "every interval: {times:?}");
        }
        assert!(
            *times.last().unwrap() + secs(10) > secs(45),
            "a probe is missing: {times:?}"
        );
        for (_, p) in probes.iter().filter(|(_, s)| s.to() == peer.addr) {
            check_probe(p, &peer, ruri, "sip:mrcp-lb@127.0.0.1:5060");
            assert!(call_ids.insert(p.get(HeaderName::CallId).unwrap().to_string()));
            assert!(tags.insert(p.msg.from_tag().unwrap().to_string()));
        }
        let st = h.probe_stats(slot);
        let n = times.len() as u64;
        assert_eq!((st.sent, st.succeeded, st.failed), (n, n, 0));
        assert_eq!(st.last_code, Some(200));
        assert_eq!(h.state(slot), State::Up);
    }
}

#[test]
fn probe_failures_take_a_destination_down_only_at_the_threshold() {
    let extra = format!("{PROBING}  aliveCodes: [404]\n  fromUri: \"sip:health@lb.example.com\"\n");
    let mut h = Harness::started(ONE_PROBED, &extra);
    let srv = Peer::udp_server(S1);
    let mut p = Prober::default();

    // Three probes without an answer: up after the first and second timeouts, down after the
    // third, that is (threshold - 1) intervals plus the timeout after the first probe.
    let (t1, first) = p.next(&mut h, secs(10));
    check_probe(
        &first,
        &srv,
        "sip:127.0.0.1:5080",
        "sip:health@lb.example.com",
    );
    for k in 0..3u32 {
        let tk = t1 + secs(10) * k;
        if k > 0 {
            let (t, probe) = p.next(&mut h, tk);
            assert_eq!(t, tk, "probe {} one interval after the last", k + 1);
            probe.assert_to(&srv);
        }
        h.advance_to(tk + ms(2999));
        assert_eq!(
            h.probe_stats(0).consecutive_failures,
            k,
            "before timeout {}",
            k + 1
        );
        assert_eq!(h.state(0), State::Up);
        h.advance_to(tk + secs(3));
        let st = h.probe_stats(0);
        assert_eq!(
            (st.failed, st.consecutive_failures),
            (u64::from(k) + 1, k + 1)
        );
        assert_eq!(st.last_code, Some(408), "a timeout is reported as 408");
        if k < 2 {
            assert_eq!(h.state(0), State::Up, "after {} failure(s)", k + 1);
        }
    }
    assert_eq!(h.state(0), State::Down, "after the third failure");
    assert_eq!(h.dest(0).health, Health::DownProbes);
    assert_eq!(h.dest(0).reason(), "probe failures");
    assert_eq!(h.probe_stats(0).sent, 3, "retransmissions are not probes");
    p.drain(&mut h);
    assert_eq!(p.retransmissions, 6, "UDP: T1 and 3*T1 after each probe");

    // Down: no new calls.
    refused(
        &mut h,
        &Call::udp("p2"),
        "nothing forwarded to a down destination",
    );

    // 404 is configured as alive: two of them bring it back.
    let (t4, probe) = p.next(&mut h, t1 + secs(30));
    assert_eq!(t4, t1 + secs(30));
    answer_probe(&mut h, &probe, 404);
    let st = h.probe_stats(0);
    assert_eq!(
        (st.succeeded, st.consecutive_successes, st.last_code),
        (1, 1, Some(404))
    );
    assert_eq!(h.state(0), State::Down, "one success is not enough");
    let (_, probe) = p.next(&mut h, t1 + secs(40));
    answer_probe(&mut h, &probe, 404);
    assert_eq!(h.state(0), State::Up, "404 counts as alive");

    // A 503 is a failure: the third one takes it down at once, without waiting for a timeout.
    for k in 0..3u32 {
        let (t, probe) = p.next(&mut h, t1 + secs(50) + secs(10) * k);
        answer_probe(&mut h, &probe, 503);
        let st = h.probe_stats(0);
        assert_eq!((st.consecutive_failures, st.last_code), (k + 1, Some(503)));
        assert_eq!(
            h.state(0),
            if k < 2 { State::Up } else { State::Down },
            "after {} 503(s) at {t:?}",
            k + 1
        );
    }
    let st = h.probe_stats(0);
    assert_eq!((st.sent, st.succeeded, st.failed), (8, 2, 6));

    h.proxy.export_gauges(h.now);
    h.proxy.export_gauges(h.now);
    let text = h.proxy.metrics().encode();
    for (result, n) in [("timeout", 3), ("failure", 3), ("success", 2)] {
        let line = metric_line(
            &text,
            "mrcp_lb_destination_probes_total",
            &[("result", result)],
        );
        assert!(line.ends_with(&format!(" {n}")), "{line}");
    }
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

#[test]
fn probe_successes_bring_a_destination_back_with_statistics() {
    let mut h = Harness::started(ONE_PROBED, PROBING);
    let mut p = Prober::default();
    let (t1, _) = p.next(&mut h, secs(10));
    for k in 1..3u32 {
        h.advance_to(t1 + secs(10) * k - ms(1));
        p.next(&mut h, t1 + secs(10) * k);
    }
    h.advance_to(t1 + secs(23));
    assert_eq!(h.state(0), State::Down);
    assert_eq!(h.probe_stats(0).latency, None, "timeouts give no latency");

    // First 200, 200 ms after the probe: still down.
    let (t4, probe) = p.next(&mut h, t1 + secs(30));
    h.advance_to(t4 + ms(200));
    answer_probe(&mut h, &probe, 200);
    assert_eq!(h.state(0), State::Down, "one success of two");
    let st = h.probe_stats(0);
    assert_eq!((st.consecutive_successes, st.consecutive_failures), (1, 0));
    let lat = st.latency.unwrap();
    assert!((lat - 0.2).abs() < 1e-9, "first sample: {lat}");

    // Second consecutive 200, 100 ms after its probe: up.
    let (t5, probe) = p.next(&mut h, t1 + secs(40));
    assert_eq!(t5, t4 + secs(10));
    h.advance_to(t5 + ms(100));
    answer_probe(&mut h, &probe, 200);
    assert_eq!(h.state(0), State::Up, "two consecutive successes");
    assert_eq!(h.dest(0).health, Health::Up);
    let st = h.probe_stats(0);
    assert_eq!(
        (st.sent, st.succeeded, st.failed),
        (5, 2, 3),
        "sent, succeeded, failed"
    );
    assert_eq!((st.consecutive_successes, st.consecutive_failures), (2, 0));
    assert_eq!(st.last_code, Some(200));
    // Moving average: 0.2 + 0.3 * (0.1 - 0.2).
    let lat = st.latency.unwrap();
    assert!((lat - 0.17).abs() < 1e-9, "moving average: {lat}");

    let status = h.proxy.status();
    let ps = &status.destinations[0].probe;
    assert_eq!((ps.sent, ps.succeeded, ps.failed), (5, 2, 3));
    assert_eq!((ps.consecutive_successes, ps.consecutive_failures), (2, 0));
    assert_eq!(ps.last_code, Some(200));
    assert!(
        ps.latency_ms.is_some_and(|l| (l - 170.0).abs() < 1e-6),
        "{ps:?}"
    );
    assert_eq!(status.destinations[0].state, State::Up);
    assert_eq!(status.destinations[0].reason, "");

    h.proxy.export_gauges(h.now);
    h.proxy.export_gauges(h.now);
    let text = h.proxy.metrics().encode();
    let line = metric_line(&text, "mrcp_lb_destination_probe_latency_seconds", &[]);
    let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((v - 0.17).abs() < 1e-9, "{line}");

    // It takes calls again.
    let call = Call::udp("p3");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer::udp_server(S1));
}

#[test]
fn probe_mode_never_and_while_down() {
    // 5080 is probed only while down; 5090 never.
    let mut h = Harness::started(
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100, probeMode: 1}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50, probeMode: 0}
"#,
        PROBING,
    );
    run_until(&mut h, secs(30), |_, s| {
        panic!("nothing while up: {}", s.label())
    });

    // Both servers are silent: the call times out on 5080, then on 5090; both are down.
    let call = Call::udp("p4");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer::udp_server(S1));
    let mut probes = Vec::new();
    let mut others = Vec::new();
    run_until(
        &mut h,
        secs(36),
        answer_probes_200(&mut probes, &mut others),
    );
    assert_eq!(h.state(0), State::Down);
    assert_eq!(h.state(1), State::Down);
    run_until(
        &mut h,
        secs(100),
        answer_probes_200(&mut probes, &mut others),
    );

    assert!(
        probes.iter().all(|p| p.probe.to() == addr(S1)),
        "mode 0 never probes, even when down"
    );
    let times: Vec<Duration> = probes.iter().map(|p| p.at).collect();
    assert_eq!(
        times.len(),
        2,
        "two probes bring 5080 back, then none: {times:?}"
    );
    assert!(
        times[0] > secs(33) && times[0] <= secs(43),
        "probing starts within an interval of the INVITE timeout: {times:?}"
    );
    assert_eq!(times[1] - times[0], secs(10));
    assert!(probes.iter().all(|p| p.before == State::Down));
    for p in &probes {
        check_probe(
            &p.probe,
            &Peer::udp_server(S1),
            "sip:127.0.0.1:5080",
            "sip:mrcp-lb@127.0.0.1:5060",
        );
    }
    assert_eq!(h.state(0), State::Up);
    assert_eq!(
        h.state(1),
        State::Down,
        "nothing brings a mode 0 destination back"
    );
    assert_eq!(h.probe_stats(0).sent, 2);
    assert_eq!(h.probe_stats(1).sent, 0);
    assert!(
        others
            .iter()
            .any(|s| s.code() == Some(503) && s.to() == call.peer.addr),
        "the call failed:{}",
        describe(&others)
    );
}

#[test]
fn invite_timeout_marks_down_and_probes_bring_it_back() {
    let mut h = Harness::started(
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100, probeMode: 2}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50, probeMode: 0}
"#,
        PROBING,
    );
    // Every probe is answered 200 at once: 5080 answers its probes (at least two by 20 s),
    // but not the INVITE.
    let mut probes = Vec::new();
    let mut others = Vec::new();
    run_until(
        &mut h,
        secs(20),
        answer_probes_200(&mut probes, &mut others),
    );
    assert!(h.probe_stats(0).consecutive_successes >= 2);
    assert_eq!(h.state(0), State::Up);

    let mut call = Call::udp("p5");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer::udp_server(S1));
    run_until(
        &mut h,
        secs(23),
        answer_probes_200(&mut probes, &mut others),
    );
    assert_eq!(
        h.state(0),
        State::Down,
        "marked down at once by the INVITE timeout"
    );
    assert_eq!(h.dest(0).reason(), "INVITE timeout");
    assert_eq!(
        h.probe_stats(0).consecutive_successes,
        0,
        "successes before the timeout do not count"
    );
    let inv2 = take(&mut others, "INVITE to 5090", |s| {
        s.is(Method::Invite) && s.to() == addr(S2)
    });
    others.clear();
    let srv2 = Uas::new(S2, "srv-p5");
    answer(&mut h, &mut call, &srv2, &inv2, &[]);

    // While down, new calls go to 5090 although 5080 has more room.
    let mut second = Call::udp("p5b");
    let inv = place(&mut h, &second);
    inv.assert_to(&srv2.peer);
    answer(&mut h, &mut second, &srv2, &inv, &[]);

    run_until(
        &mut h,
        secs(45),
        answer_probes_200(&mut probes, &mut others),
    );
    assert!(
        probes.iter().all(|p| p.probe.to() == addr(S1)),
        "mode 0 is never probed"
    );
    let log: Vec<_> = probes.iter().map(|p| (p.at, p.before, p.after)).collect();
    let down: Vec<_> = log.iter().filter(|p| p.1 == State::Down).collect();
    assert!(down.len() >= 2, "probes while down: {log:?}");
    assert_eq!(down[0].2, State::Down, "one success is not enough: {log:?}");
    assert_eq!(down[1].2, State::Up, "the second brings it back: {log:?}");
    assert_eq!(down[1].0 - down[0].0, secs(10));
    assert_eq!(h.state(0), State::Up);

    // A new call goes to 5080 again.
    let third = Call::udp("p5c");
    let inv = place(&mut h, &third);
    inv.assert_to(&Peer::udp_server(S1));
    assert_eq!((h.load(0), h.load(1)), (1, 2));
}

// ---- 18: live destination sets ----------------------------------------------------------------

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

#[test]
fn replacing_the_set_keeps_open_calls_and_counts_removed_ones_down() {
    let mut h = Harness::new();
    let srv1 = Uas::new(S1, "srv-r1");
    let srv2 = Uas::new(S2, "srv-r2");
    let mut a = open_call(&mut h, "r1", &srv1);
    let mut b = open_call(&mut h, "r2", &srv1);
    // A third call is refused by 5080 (503, no Retry-After) and lands on 5090.
    let mut c = Call::udp("r3");
    let inv = place(&mut h, &c);
    inv.assert_to(&srv1.peer);
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 503, &[], ""));
    let mut out = h.out();
    take(&mut out, "ACK of the 503", |s| s.is(Method::Ack));
    let inv2 = take(&mut out, "INVITE to 5090", |s| s.is(Method::Invite));
    inv2.assert_to(&srv2.peer);
    answer(&mut h, &mut c, &srv2, &inv2, &[]);
    assert_eq!((h.load(0), h.load(1)), (2, 1));

    // 1 resized, 2 removed.
    let r = h.proxy.replace_set(h.now, &dest_set(1, ONLY_1_RESIZED));
    assert_eq!(r.unwrap(), Applied::Replaced);
    let one = status_of(&h, "1").unwrap();
    assert_eq!(one.resources, pstn(200, 2), "load kept, capacity resized");
    assert_eq!(
        (one.open_calls, one.state, one.removed),
        (2, State::Up, false)
    );
    let two = status_of(&h, "2").expect("shown while it carries a call");
    assert!(two.removed);
    assert_eq!(two.reason, "removed from the set");
    assert_eq!((two.open_calls, two.resources[0].load), (1, 1));
    assert_eq!(h.proxy.status().version, 1);

    // A new call refused by 5080 is not failed over to the removed 5090.
    let d = Call::udp("r4");
    let inv = place(&mut h, &d);
    inv.assert_to(&srv1.peer);
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 503, &[], ""));
    let mut out = h.out();
    take(&mut out, "ACK of the 503", |s| s.is(Method::Ack));
    let fail = take(&mut out, "503 to the caller", |s| s.code() == Some(503));
    fail.assert_to(&d.peer);
    assert_none(&out, "no INVITE to a removed destination");

    // The open calls end normally.
    hang_up(&mut h, &mut a, &srv1);
    assert_eq!(h.load(0), 1);
    hang_up(&mut h, &mut b, &srv1);
    assert_eq!(h.load(0), 0);
    let one = status_of(&h, "1").unwrap();
    assert_eq!((one.resources.clone(), one.open_calls), (pstn(200, 0), 0));
    hang_up(&mut h, &mut c, &srv2);
    assert_eq!(h.load(1), 0);
    assert!(status_of(&h, "2").is_none(), "gone with its last call");
    assert_eq!(h.proxy.status().destinations.len(), 1);
    h.proxy.export_gauges(h.now);
    h.proxy.export_gauges(h.now);
    let text = h.proxy.metrics().encode();
    assert!(
        metric_line_of(&text, "mrcp_lb_destination_load", "2", &[]).is_none(),
        "{text}"
    );
    assert_eq!(h.proxy.dialog_stats().active, 0);
}

#[test]
fn set_versions_conflicts_and_invalid_sets() {
    let mut h = Harness::new();
    let v1 = dest_set(
        1,
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=200}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50}
"#,
    );
    assert_eq!(h.proxy.replace_set(h.now, &v1).unwrap(), Applied::Replaced);
    assert_eq!(h.proxy.replace_set(h.now, &v1).unwrap(), Applied::Unchanged);

    let older = DestinationSet {
        version: 0,
        ..v1.clone()
    };
    assert!(
        matches!(
            h.proxy.replace_set(h.now, &older),
            Err(SetError::Conflict(_))
        ),
        "an older version"
    );
    let other = dest_set(1, ONLY_1_RESIZED);
    assert!(
        matches!(
            h.proxy.replace_set(h.now, &other),
            Err(SetError::Conflict(_))
        ),
        "the same version with other content"
    );
    assert_eq!(status_of(&h, "1").unwrap().resources, pstn(200, 0));
    assert!(status_of(&h, "2").is_some_and(|d| !d.removed));

    // Invalid sets name the field and change nothing. Each would send new calls to 5070.
    for (set, field) in [
        (
            r#"
  - {id: 3, group: 1, uri: "sip:127.0.0.1:5070", resources: pstn=1000}
  - {id: 4, group: 1, uri: "mailto:x@example.com", resources: pstn=1000}
"#,
            "destinations[1].uri",
        ),
        (
            r#"
  - {id: 3, group: 1, uri: "sip:127.0.0.1:5070", resources: pstn=1000}
  - {id: 3, group: 1, uri: "sip:127.0.0.1:5071", resources: pstn=1000}
"#,
            "destinations[1].id",
        ),
    ] {
        match h.proxy.replace_set(h.now, &dest_set(2, set)) {
            Err(SetError::Invalid(e)) => assert_eq!(e.field, field, "{e}"),
            other => panic!("expected Invalid({field}), got {other:?}"),
        }
        let st = h.proxy.status();
        assert_eq!(st.version, 1);
        let ids: Vec<&str> = st.destinations.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, vec!["1", "2"]);
    }
    let call = Call::udp("v1");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer::udp_server(S1));

    // The version an invalid set carried is still free.
    let v2 = dest_set(
        2,
        r#"
  - {id: 3, group: 1, uri: "sip:127.0.0.1:5070", resources: pstn=1000}
"#,
    );
    assert_eq!(h.proxy.replace_set(h.now, &v2).unwrap(), Applied::Replaced);
    let call = Call::udp("v2");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer::udp_server("127.0.0.1:5070"));
}

#[test]
fn a_tcp_destination_without_a_tcp_listener_is_invalid() {
    let cfg = Config::from_yaml(
        "listeners:
  - udp:127.0.0.1:5060
destinations:
  - {id: 1, group: 1, uri: \"sip:127.0.0.1:5080\", resources: pstn=100}
",
    )
    .unwrap();
    let mut h = Harness::from_config(cfg);
    let set = dest_set(
        1,
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090;transport=tcp", resources: pstn=500}
"#,
    );
    match h.proxy.replace_set(h.now, &set) {
        Err(SetError::Invalid(e)) => {
            assert_eq!(e.field, "destinations[1].uri", "{e}");
            assert!(
                e.message.contains("tcp") || e.message.contains("TCP"),
                "{e}"
            );
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    let st = h.proxy.status();
    assert_eq!((st.version, st.destinations.len()), (0, 1));
    let call = Call::udp("t1");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer::udp_server(S1));
}

// ---- 19: manual state and the state a set asks for ---------------------------------------------

#[test]
fn health_and_manual_state_survive_a_replace() {
    let mut h = Harness::new();
    let srv1 = Uas::new(S1, "srv-m1");
    let srv2 = Uas::new(S2, "srv-m2");

    // 5080 never answers: marked down; the call lands on 5090.
    let mut x = Call::udp("m1");
    let inv = place(&mut h, &x);
    inv.assert_to(&srv1.peer);
    h.advance_to(secs(3));
    let mut out = h.out();
    let inv2 = take(&mut out, "INVITE to 5090", |s| {
        s.is(Method::Invite) && s.to() == addr(S2)
    });
    answer(&mut h, &mut x, &srv2, &inv2, &[]);
    assert_eq!(h.state(0), State::Down);

    // A replace keeping both ids (5080 resized) keeps the mark.
    let both = |v: u64| {
        dest_set(
            v,
            r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=150}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50}
"#,
        )
    };
    assert_eq!(
        h.proxy.replace_set(h.now, &both(1)).unwrap(),
        Applied::Replaced
    );
    assert_eq!(h.state(0), State::Down, "the health mark survives");
    let one = status_of(&h, "1").unwrap();
    assert_eq!(
        (one.reason.as_str(), one.resources.clone()),
        ("INVITE timeout", pstn(150, 0))
    );
    let mut y = open_call(&mut h, "m2", &srv2);

    // Drain 5090: no new calls, open calls go on and end normally.
    assert_eq!(
        h.proxy.set_manual("2", Action::Drain),
        Some(State::Draining)
    );
    refused(&mut h, &Call::udp("m3"), "5080 down, 5090 draining");
    hang_up(&mut h, &mut x, &srv2);
    assert_eq!(h.load(1), 1);

    // Manual state survives a replace too.
    assert_eq!(
        h.proxy.replace_set(h.now, &both(2)).unwrap(),
        Applied::Replaced
    );
    assert_eq!(h.state(1), State::Draining);
    assert_eq!(h.state(0), State::Down);
    assert_eq!(status_of(&h, "2").unwrap().reason, "drained by hand");

    // Disable: no new calls either.
    assert_eq!(
        h.proxy.set_manual("2", Action::Disable),
        Some(State::Disabled)
    );
    refused(&mut h, &Call::udp("m4"), "5080 down, 5090 disabled");
    hang_up(&mut h, &mut y, &srv2);
    assert_eq!(h.load(1), 0);
    assert_eq!(status_of(&h, "2").unwrap().reason, "disabled by hand");

    // Enable clears the down mark of 5080, which takes calls again.
    assert_eq!(h.proxy.set_manual("1", Action::Enable), Some(State::Up));
    assert_eq!(h.dest(0).health, Health::Up);
    open_call(&mut h, "m5", &srv1);
    assert_eq!(h.proxy.set_manual("2", Action::Enable), Some(State::Up));
    assert_eq!(h.state(1), State::Up);

    assert_eq!(h.proxy.set_manual("nope", Action::Drain), None);
    assert_eq!(h.proxy.set_manual("nope", Action::Enable), None);
}

#[test]
fn a_set_asking_draining_or_down_takes_no_new_calls() {
    let mut h = Harness::new();
    let srv1 = Uas::new(S1, "srv-s1");
    let srv2 = Uas::new(S2, "srv-s2");
    let mut a = open_call(&mut h, "s1", &srv1);

    let set = |v: u64, s1: &str, s2: &str| {
        dest_set(
            v,
            &format!(
                r#"
  - {{id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100, state: {s1}}}
  - {{id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50, state: {s2}}}
"#
            ),
        )
    };
    let r = h.proxy.replace_set(h.now, &set(1, "draining", "active"));
    assert_eq!(r.unwrap(), Applied::Replaced);
    assert_eq!(
        h.proxy.destinations().get(0).unwrap().spec.state,
        DesiredState::Draining
    );
    assert_eq!(h.state(0), State::Draining);
    assert_eq!(status_of(&h, "1").unwrap().reason, "draining (set)");
    // 5080 has more room but is draining.
    let mut b = open_call(&mut h, "s2", &srv2);
    // Its open call goes on.
    hang_up(&mut h, &mut a, &srv1);
    assert_eq!(h.load(0), 0);

    let r = h.proxy.replace_set(h.now, &set(2, "down", "draining"));
    assert_eq!(r.unwrap(), Applied::Replaced);
    assert_eq!((h.state(0), h.state(1)), (State::Down, State::Draining));
    assert_eq!(status_of(&h, "1").unwrap().reason, "down (set: not ready)");
    refused(&mut h, &Call::udp("s3"), "5080 down, 5090 draining");
    hang_up(&mut h, &mut b, &srv2);

    let r = h.proxy.replace_set(h.now, &set(3, "active", "active"));
    assert_eq!(r.unwrap(), Applied::Replaced);
    assert_eq!((h.state(0), h.state(1)), (State::Up, State::Up));
    open_call(&mut h, "s4", &srv1);
}

// ---- 20: advertised address and loops ----------------------------------------------------------

const ADVERTISE: &str = "advertise: \"lb.example.com:5070\"\n";

#[test]
fn advertised_address_goes_in_via_and_record_route_and_routes_back() {
    let mut h = Harness::with(TWO_DESTS, ADVERTISE);
    let mut call = Call::udp("a1");
    let srv = Uas::new(S1, "srv-a1");
    let inv = place(&mut h, &call);
    inv.assert_to(&srv.peer);
    let v = &inv.vias()[0];
    assert_eq!(
        (v.transport.as_str(), v.host.as_str(), v.port),
        ("UDP", "lb.example.com", Some(5070))
    );
    assert_eq!(
        inv.all(HeaderName::RecordRoute),
        vec!["<sip:lb.example.com:5070;transport=udp;lr>".to_string()]
    );
    answer(&mut h, &mut call, &srv, &inv, &[]);

    // An in-dialog request routed through our advertised name (no transport parameter).
    call.routes = vec!["<sip:lb.example.com:5070;lr>".to_string()];
    let bye = call.bye();
    assert!(bye.contains("Route: <sip:lb.example.com:5070;lr>\r\n"));
    h.recv(call.peer, &bye);
    let mut out = h.out();
    let fwd = take(&mut out, "BYE to the server", |s| s.is(Method::Bye));
    assert_none(&out, "after the BYE");
    fwd.assert_to(&srv.peer);
    assert_eq!(fwd.get(HeaderName::Route), None, "our Route popped");
    assert_eq!(fwd.ruri(), "sip:mrcp@127.0.0.1:5080;transport=udp");
    let v = &fwd.vias()[0];
    assert_eq!((v.host.as_str(), v.port), ("lb.example.com", Some(5070)));
    assert_eq!(h.load(0), 0);
    assert_eq!(h.proxy.dialog_stats().active, 0);

    // Probes come from the advertised address too, with the default From on it.
    let mut h = Harness::started(ONE_PROBED, &format!("{ADVERTISE}{PROBING}"));
    let (_, probe) = Prober::default().next(&mut h, secs(10));
    let v = &probe.vias()[0];
    assert_eq!((v.host.as_str(), v.port), ("lb.example.com", Some(5070)));
    assert_eq!(
        name_addr_uri(probe.get(HeaderName::From).unwrap()),
        "sip:mrcp-lb@lb.example.com:5070"
    );
}

#[test]
fn a_request_carrying_our_via_is_a_loop_and_max_forwards_1_goes_out_as_0() {
    let mut h = Harness::with(TWO_DESTS, ADVERTISE);
    let first = Call::udp("l1");
    let inv = place(&mut h, &first);
    let ours = inv.branch();
    let prefix = &ours[..=ours.rfind('-').unwrap()];
    assert!(prefix.starts_with("z9hG4bK"), "{ours}");

    // A new INVITE that went through us already (a server sent it back): its top Via is the
    // server's, then ours, then the caller's.
    let looped = Call::udp("l2");
    let text = looped.invite().replacen(
        "Via: ",
        &format!(
            "Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bK-srv-loop\r\n\
             Via: SIP/2.0/UDP lb.example.com:5070;branch={prefix}beef;rport\r\n\
             Via: "
        ),
        1,
    );
    let server = Peer::udp_server(S1);
    h.recv(server, &text);
    let mut out = h.out();
    let loop_ = take(&mut out, "482", |s| s.code() == Some(482));
    assert_none(&out, "nothing forwarded");
    loop_.assert_to(&server);
    assert_eq!(loop_.get(HeaderName::CSeq), Some("1 INVITE"));
    assert_eq!(h.proxy.route_stats().routed, 1);
    assert_eq!((h.load(0), h.load(1)), (1, 0));

    // Max-Forwards 1 is still forwarded, with 0.
    let last_hop = Call::udp("l3");
    h.recv(
        last_hop.peer,
        &last_hop
            .invite()
            .replace("Max-Forwards: 70", "Max-Forwards: 1"),
    );
    let mut out = h.out();
    take(&mut out, "100 Trying", |s| s.code() == Some(100));
    let fwd = take(&mut out, "INVITE", |s| s.is(Method::Invite));
    assert_none(&out, "after the INVITE");
    assert_eq!(fwd.msg.max_forwards(), Some(0));
}

// ---- 21: status and gauges ---------------------------------------------------------------------

#[test]
fn status_and_gauges_reflect_the_destinations() {
    let mut h = Harness::new();
    let srv1 = Uas::new(S1, "srv-g1");
    let mut call = open_call(&mut h, "g1", &srv1);
    let r = h.proxy.replace_set(h.now, &dest_set(3, TWO_DESTS));
    assert_eq!(r.unwrap(), Applied::Replaced);
    assert_eq!(
        h.proxy.set_manual("2", Action::Disable),
        Some(State::Disabled)
    );

    let st = h.proxy.status();
    assert_eq!(st.version, 3);
    assert!(st.updated > 0);
    assert_eq!(st.destinations.len(), 2);
    let one = &st.destinations[0];
    assert_eq!(
        (one.id.as_str(), one.group, one.uri.as_str()),
        ("1", 1, "sip:127.0.0.1:5080")
    );
    assert_eq!(one.address.as_deref(), Some("127.0.0.1:5080"));
    assert_eq!(
        (one.state, one.reason.as_str(), one.removed),
        (State::Up, "", false)
    );
    assert_eq!(one.resources, pstn(100, 1));
    assert_eq!((one.open_calls, one.calls), (1, 1));
    assert_eq!(one.probe.mode, lb_api::ProbeMode::Always);
    let two = &st.destinations[1];
    assert_eq!(
        (two.state, two.reason.as_str()),
        (State::Disabled, "disabled by hand")
    );
    assert_eq!(two.resources, pstn(50, 0));
    assert_eq!((two.open_calls, two.calls), (0, 0));

    h.proxy.export_gauges(h.now);
    h.proxy.export_gauges(h.now);
    let text = h.proxy.metrics().encode();
    let load = metric_line(&text, "mrcp_lb_destination_load", &[("resource", "pstn")]);
    assert!(load.ends_with("} 1"), "{load}");
    assert!(load.contains("uri=\"sip:127.0.0.1:5080\""), "{load}");
    let load2 = metric_line_of(&text, "mrcp_lb_destination_load", "2", &[]).unwrap();
    assert!(load2.ends_with("} 0"), "{load2}");
    let cap = metric_line(&text, "mrcp_lb_destination_capacity", &[]);
    assert!(cap.ends_with("} 100"), "{cap}");
    let up = metric_line(&text, "mrcp_lb_destination_state", &[("state", "up")]);
    assert!(up.ends_with("} 1"), "{up}");
    let disabled = metric_line_of(
        &text,
        "mrcp_lb_destination_state",
        "2",
        &[("state", "disabled")],
    )
    .unwrap();
    assert!(disabled.ends_with("} 1"), "{disabled}");
    let calls = metric_line(&text, "mrcp_lb_destination_calls_routed", &[]);
    assert!(calls.ends_with("} 1"), "{calls}");
    assert!(
        text.contains("\nmrcp_lb_destination_set_version 3\n"),
        "{text}"
    );

    hang_up(&mut h, &mut call, &srv1);
    let one = status_of(&h, "1").unwrap();
    assert_eq!(
        (one.resources.clone(), one.open_calls, one.calls),
        (pstn(100, 0), 0, 1)
    );
    h.proxy.export_gauges(h.now);
    h.proxy.export_gauges(h.now);
    let text = h.proxy.metrics().encode();
    let load = metric_line(&text, "mrcp_lb_destination_load", &[]);
    assert!(load.ends_with("} 0"), "{load}");
}

// ---- 22: probing across set changes and manual state ---------------------------------------------

#[test]
fn replaced_sets_probe_new_destinations_once_and_removed_ones_no_more() {
    let mut h = Harness::started(TWO_DESTS, PROBING);
    let mut probes = Vec::new();
    let mut others = Vec::new();
    run_until(
        &mut h,
        secs(15),
        answer_probes_200(&mut probes, &mut others),
    );

    // 5090 goes (it carries nothing: gone at once), then comes back under the same id, before
    // its old probe timer fires; 5070 is new.
    let only_1 = dest_set(
        1,
        "\n  - {id: 1, group: 1, uri: \"sip:127.0.0.1:5080\", resources: pstn=100}\n",
    );
    assert_eq!(
        h.proxy.replace_set(h.now, &only_1).unwrap(),
        Applied::Replaced
    );
    assert!(status_of(&h, "2").is_none());
    let back = dest_set(
        2,
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50}
  - {id: 3, group: 1, uri: "sip:127.0.0.1:5070", resources: pstn=10}
"#,
    );
    assert_eq!(
        h.proxy.replace_set(h.now, &back).unwrap(),
        Applied::Replaced
    );
    probes.clear();
    run_until(
        &mut h,
        secs(75),
        answer_probes_200(&mut probes, &mut others),
    );
    assert_none(&others, "only probes");
    for a in [S1, S2, "127.0.0.1:5070"] {
        let times: Vec<Duration> = probes
            .iter()
            .filter(|p| p.probe.to() == addr(a))
            .map(|p| p.at)
            .collect();
        assert!(
            !times.is_empty() && times[0] <= secs(25),
            "{a} probed within an interval: {times:?}"
        );
        for w in times.windows(2) {
            assert_eq!(
                w[1] - w[0],
                secs(10),
                "{a}: one probe per interval: {times:?}"
            );
        }
    }

    // Removed for good: no more probes, even while it still carries a call.
    let srv3 = Uas::new("127.0.0.1:5070", "srv-x3");
    let srv1 = Uas::new(S1, "srv-x1");
    let mut calls = Vec::new();
    // 5080 refuses, 5090 refuses: the call lands on 5070.
    let mut call = Call::udp("x1");
    let inv = place(&mut h, &call);
    inv.assert_to(&srv1.peer);
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 503, &[], ""));
    let mut out = h.out();
    let inv2 = take(&mut out, "INVITE to 5090", |s| s.is(Method::Invite));
    inv2.assert_to(&Peer::udp_server(S2));
    h.recv(
        Peer::udp_server(S2),
        &Uas::new(S2, "srv-x2").reply(&inv2.msg, 503, &[], ""),
    );
    let mut out = h.out();
    let inv3 = take(&mut out, "INVITE to 5070", |s| s.is(Method::Invite));
    inv3.assert_to(&srv3.peer);
    answer(&mut h, &mut call, &srv3, &inv3, &[]);
    calls.push(call);
    let without_3 = dest_set(
        3,
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50}
"#,
    );
    assert_eq!(
        h.proxy.replace_set(h.now, &without_3).unwrap(),
        Applied::Replaced
    );
    assert!(status_of(&h, "3").is_some_and(|d| d.removed));
    probes.clear();
    run_until(
        &mut h,
        secs(120),
        answer_probes_200(&mut probes, &mut others),
    );
    assert!(
        probes.iter().all(|p| p.probe.to() != srv3.peer.addr),
        "a removed destination is not probed"
    );
    hang_up(&mut h, &mut calls[0], &srv3);
    assert!(status_of(&h, "3").is_none());
}

#[test]
fn enable_gives_a_destination_the_full_failure_threshold_again() {
    // Down after three failed probes, enabled by hand: "failureThreshold consecutive failures
    // take an up destination down" should count from the enable, not before it.
    let mut h = Harness::started(ONE_PROBED, PROBING);
    let mut p = Prober::default();
    let (t1, _) = p.next(&mut h, secs(10));
    for k in 1..3u32 {
        p.next(&mut h, t1 + secs(10) * k);
    }
    h.advance_to(t1 + secs(23));
    assert_eq!(h.state(0), State::Down);
    assert_eq!(h.proxy.set_manual("1", Action::Enable), Some(State::Up));

    // One more probe without an answer.
    let (t4, _) = p.next(&mut h, t1 + secs(30));
    h.advance_to(t4 + secs(3));
    assert_eq!(h.probe_stats(0).failed, 4);
    assert_eq!(
        h.state(0),
        State::Up,
        "one failure after the enable took it down again (consecutive_failures = {})",
        h.probe_stats(0).consecutive_failures
    );
}

// ---- load sharing between replicas -----------------------------------------------------------

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

#[test]
fn replicas_route_on_each_others_load_and_a_bye_through_the_other_frees_it() {
    let one_each = r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=10}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=10}
"#;
    let (mut a, mut b) = replica_pair(one_each);
    settle_pair(&mut a, &mut b);
    assert_eq!(a.proxy.cluster_status(a.now).size, 2);
    assert_eq!(b.proxy.cluster_status(b.now).size, 2);

    // Two calls through A: one on each server (equal capacity, least loaded).
    let mut c1 = Call::udp("cl1");
    let inv1 = place(&mut a, &c1);
    let first = inv1.to();
    let srv1 = Uas::new(&first.to_string(), "cl1srv");
    answer(&mut a, &mut c1, &srv1, &inv1, &[]);
    let slot1 = usize::from(first != addr(S1));
    assert_eq!(a.load(slot1), 1);
    assert_eq!(b.load(slot1), 0, "B has not heard yet");
    settle_pair(&mut a, &mut b);
    assert_eq!(cluster_load(&b, slot1), 1, "B sees A's call");
    assert_eq!(b.load(slot1), 0, "as A's, not its own");

    // B's next call goes to the other server: the one A loaded is busier cluster-wide.
    let c2 = Call::udp("cl2");
    let inv2 = place(&mut b, &c2);
    assert_ne!(inv2.to(), first, "B routes on the cluster-wide load");

    // A's caller hangs up through B (another replica behind the same address): B relays the
    // BYE by its Route and Request-URI and announces the end; A frees the load.
    b.recv(c1.peer, &c1.bye());
    let mut out = b.out();
    let bye = take(&mut out, "BYE relayed by B", |s| s.is(Method::Bye));
    assert_eq!(
        bye.to(),
        first,
        "to the server of A's call, without B knowing the dialog"
    );
    assert_eq!(a.proxy.dialog_stats().active, 1);
    settle_pair(&mut a, &mut b);
    assert_eq!(a.proxy.dialog_stats().active, 0, "A ended its dialog");
    assert_eq!(a.load(slot1), 0, "and freed its load");
    settle_pair(&mut a, &mut b);
    assert_eq!(cluster_load(&b, slot1), 0, "B sees it freed");
    let m = a.proxy.metrics().encode();
    assert!(
        m.contains("mrcp_lb_cluster_dialog_ends_total{direction=\"applied\"} 1"),
        "{m}"
    );
}

#[test]
fn near_capacity_a_replica_holds_one_unacknowledged_call_per_destination() {
    let small = r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=3}
"#;
    let (mut a, mut b) = replica_pair(small);
    settle_pair(&mut a, &mut b);
    // Free 3, two replicas: max(1, 3 / 2) = 1 call may wait for B's acknowledgement.
    let c1 = Call::udp("nc1");
    place(&mut a, &c1);
    let c2 = Call::udp("nc2");
    a.recv(c2.peer, &c2.invite());
    let mut out = a.out();
    let busy = take(
        &mut out,
        "503 while the first call is unacknowledged",
        |s| s.code() == Some(503),
    );
    busy.assert_to(&c2.peer);
    assert!(busy.get(HeaderName::RetryAfter).is_some());
    // B acknowledges: the next call may go.
    settle_pair(&mut a, &mut b);
    assert_eq!(cluster_load(&b, 0), 1);
    let c3 = Call::udp("nc3");
    place(&mut a, &c3);
    // A silent peer stops counting: alone again, no acknowledgement is awaited.
    a.advance_to(ms(1500));
    a.out(); // retransmissions of the unanswered INVITEs and of the 503
    assert_eq!(a.proxy.cluster_status(a.now).size, 1);
    let c4 = Call::udp("nc4");
    place(&mut a, &c4);
    let c5 = Call::udp("nc5");
    a.recv(c5.peer, &c5.invite());
    let mut out = a.out();
    take(&mut out, "503: capacity 3 used by A's own calls", |s| {
        s.code() == Some(503)
    });
}

#[test]
fn a_pushed_peer_list_replaces_the_configured_one() {
    let (mut a, _) = replica_pair(TWO_DESTS);
    let mut set = dest_set(2, TWO_DESTS);
    set.peers = Some(vec![addr("127.0.0.1:7075")]);
    a.proxy.replace_set(a.now, &set).unwrap();
    let st = a.proxy.cluster_status(a.now);
    let peers: Vec<&str> = st.peers.iter().map(|p| p.addr.as_str()).collect();
    assert_eq!(peers, vec!["127.0.0.1:7075"]);
    // The same set again with other peers is unchanged content, yet the peers follow.
    set.peers = Some(vec![addr(CL_A), addr(CL_B)]);
    assert_eq!(
        a.proxy.replace_set(a.now, &set).unwrap(),
        Applied::Unchanged
    );
    assert_eq!(a.proxy.cluster_status(a.now).peers.len(), 2);
}

// ---- 23: overload limits ---------------------------------------------------------------------

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

#[test]
fn dialogs_max_refuses_new_calls_with_503() {
    let mut h = Harness::with(TWO_DESTS, "dialogs:\n  max: 1\n");
    let srv1 = Uas::new(S1, "srv-dm");
    let mut first = open_call(&mut h, "dm1", &srv1);
    refused_at_once(&mut h, &Call::udp("dm2"), "one dialog open, dialogs.max 1");
    assert_eq!(limited(&h, "dialogs"), 1.0);
    let st = h.proxy.dialog_stats();
    assert_eq!((st.active, st.failed, st.processed), (1, 1, 2));
    // Once the first ends, calls are taken again.
    hang_up(&mut h, &mut first, &srv1);
    open_call(&mut h, "dm3", &srv1);
    assert_eq!(limited(&h, "dialogs"), 1.0);
}

#[test]
fn pending_transaction_limit_gives_503_to_new_requests() {
    let mut h = Harness::with(TWO_DESTS, "limits:\n  maxPendingTransactions: 2\n");
    let srv1 = Uas::new(S1, "srv-pt1");
    let srv2 = Uas::new(S2, "srv-pt2");
    let mut a = Call::udp("pt-a");
    let inv_a = place(&mut h, &a);
    let b = Call::udp("pt-b");
    let inv_b = place(&mut h, &b);
    assert_eq!(h.proxy.pending_transactions(), 2);

    // A third INVITE: refused statelessly.
    refused_at_once(&mut h, &Call::udp("pt-c"), "two transactions pending");
    assert_eq!(limited(&h, "transactions"), 1.0);
    // OPTIONS to the proxy keeps no transaction: still answered.
    h.recv(a.peer, &Call::udp("pt-o").out_of_dialog("OPTIONS", &[]));
    take(&mut h.out(), "200 to OPTIONS", |s| s.code() == Some(200));

    // a answered: one pending left, room for one more.
    let srv_a = if inv_a.to() == srv1.peer.addr {
        &srv1
    } else {
        &srv2
    };
    answer(&mut h, &mut a, srv_a, &inv_a, &[]);
    assert_eq!(h.proxy.pending_transactions(), 1);
    let d = Call::udp("pt-d");
    place(&mut h, &d);
    assert_eq!(h.proxy.pending_transactions(), 2);

    // An in-dialog request beyond the limit gets 503 too, and the dialog stays.
    h.recv(a.peer, &a.bye());
    let mut out = h.out();
    let fail = take(&mut out, "503 to the BYE", |s| s.code() == Some(503));
    assert_none(&out, "the BYE is not forwarded");
    assert_eq!(fail.get(HeaderName::CSeq), Some("2 BYE"));
    assert_eq!(limited(&h, "transactions"), 2.0);
    assert_eq!(
        h.proxy.dialog_stats().active,
        1,
        "the refused BYE ended nothing"
    );

    // b answered: the BYE goes through on retry.
    let srv_b = if inv_b.to() == srv1.peer.addr {
        &srv1
    } else {
        &srv2
    };
    h.recv(srv_b.peer, &srv_b.reply(&inv_b.msg, 486, &[], ""));
    let mut out = h.out();
    take(&mut out, "ACK to the server", |s| s.is(Method::Ack));
    take(&mut out, "486 to the caller", |s| s.code() == Some(486));
    assert_eq!(h.proxy.pending_transactions(), 1);
    a.cseq -= 1;
    h.recv(a.peer, &a.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE", |s| s.is(Method::Bye));
    bye.assert_to(&srv_a.peer);
}

#[test]
fn per_source_rate_limit_refuses_the_excess_of_one_source_only() {
    let mut h = Harness::with(TWO_DESTS, "limits:\n  perSource: {rate: 2, window: 1s}\n");
    let srv1 = Uas::new(S1, "srv-rl1");
    let srv2 = Uas::new(S2, "srv-rl2");
    let mut c1 = Call::udp("rl1");
    let inv1 = place(&mut h, &c1);
    place(&mut h, &Call::udp("rl2"));
    // The third INVITE within the second from the same source: 503.
    refused_at_once(&mut h, &Call::udp("rl3"), "third INVITE in the window");
    assert_eq!(limited(&h, "source_rate"), 1.0);
    // Another source is not affected.
    let mut other = Call::udp("rl4");
    other.peer.addr = addr("10.0.0.6:40000");
    place(&mut h, &other);
    // Out-of-dialog OPTIONS are not counted with the default scope (INVITE).
    h.recv(c1.peer, &Call::udp("rl5").out_of_dialog("OPTIONS", &[]));
    take(&mut h.out(), "200 to OPTIONS", |s| s.code() == Some(200));
    // In-dialog requests and responses are never limited.
    let srv = if inv1.to() == srv1.peer.addr {
        &srv1
    } else {
        &srv2
    };
    answer(&mut h, &mut c1, srv, &inv1, &[]);
    h.recv(c1.peer, &c1.bye());
    take(&mut h.out(), "BYE", |s| s.is(Method::Bye));
    assert_eq!(limited(&h, "source_rate"), 1.0);
    // Half a second later one token is back.
    h.advance_to(ms(500));
    h.out();
    place(&mut h, &Call::udp("rl6"));
    refused_at_once(&mut h, &Call::udp("rl7"), "the token is used");
    assert_eq!(limited(&h, "source_rate"), 2.0);
    assert_eq!(h.proxy.rate_limit_sources(), 2);
}

#[test]
fn per_source_rate_limit_can_drop_and_count_every_out_of_dialog_request() {
    let mut h = Harness::with(
        TWO_DESTS,
        "limits:\n  perSource: {rate: 1, window: 10s, action: drop, scope: outOfDialog}\n",
    );
    let c = Call::udp("rd1");
    h.recv(c.peer, &c.out_of_dialog("OPTIONS", &[]));
    take(&mut h.out(), "200 to OPTIONS", |s| s.code() == Some(200));
    let sizes = h.proxy.sizes();
    h.recv(c.peer, &Call::udp("rd2").out_of_dialog("OPTIONS", &[]));
    assert_none(&h.out(), "the second OPTIONS is dropped");
    h.recv(c.peer, &Call::udp("rd3").invite());
    assert_none(&h.out(), "an INVITE over the rate is dropped");
    assert_eq!(h.proxy.sizes(), sizes);
    assert_eq!(limited(&h, "source_rate"), 2.0);
}

// ---- faults and graceful shutdown -----------------------------------------------------------

#[test]
fn a_server_that_dies_after_its_provisional_leaves_no_transaction_behind() {
    // 180, then the server is gone: at inviteFinalTimeout the call fails over and the CANCEL
    // gets no answer either. Once the call is over, nothing of it may stay in memory.
    let mut h = Harness::new();
    let mut call = Call::udp("f1");
    let srv1 = Uas::new(S1, "srv-f1");
    let srv2 = Uas::new(S2, "srv-f2");
    let inv = place(&mut h, &call);
    inv.assert_to(&srv1.peer);
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 180, &[], ""));
    h.out();
    h.advance_to(secs(10));
    let mut out = h.out();
    take(&mut out, "CANCEL to the dead server", |s| {
        s.is(Method::Cancel)
    });
    let inv2 = take(&mut out, "INVITE to the second server", |s| {
        s.is(Method::Invite)
    });
    inv2.assert_to(&srv2.peer);
    h.recv(srv2.peer, &srv2.reply(&inv2.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200 to the caller", |s| s.code() == Some(200));
    call.answered(&ok.msg);
    h.recv(call.peer, &call.ack());
    h.out();
    hang_up(&mut h, &mut call, &srv2);
    h.advance_to(secs(120));
    h.out();
    assert_eq!(
        h.proxy.sizes(),
        (0, 0, 0),
        "server txs, client txs, dialogs left behind"
    );
}

#[test]
fn reinvite_with_a_provisional_but_no_final_gets_408_and_leaves_nothing_behind() {
    // The server answers a re-INVITE with 100 Trying and then nothing (it hung): at
    // inviteFinalTimeout the proxy CANCELs downstream, and the caller must get a final
    // response too, or its re-INVITE hangs and the proxy keeps the transaction forever.
    let mut h = Harness::new();
    let mut call = Call::udp("r1");
    let srv = Uas::new(S1, "srv-r1");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    let reinvite = call.in_dialog("INVITE", &[], CLIENT_SDP);
    h.recv(call.peer, &reinvite);
    let mut out = h.out();
    take(&mut out, "100 to the caller", |s| s.code() == Some(100));
    let fwd = take(&mut out, "re-INVITE to the server", |s| {
        s.is(Method::Invite)
    });
    h.recv(srv.peer, &srv.reply(&fwd.msg, 100, &[], ""));
    h.out();

    h.advance_to(secs(10));
    let mut out = h.out();
    let cancel = take(&mut out, "CANCEL to the server", |s| s.is(Method::Cancel));
    cancel.assert_to(&srv.peer);
    let fail = take(&mut out, "final response to the caller", |s| {
        s.code().is_some_and(|c| c >= 200)
    });
    fail.assert_to(&call.peer);
    assert_eq!(fail.code(), Some(408));
    assert_eq!(fail.get(HeaderName::CSeq), Some("2 INVITE"));
    assert_eq!(
        h.proxy.dialog_stats().active,
        1,
        "a failed re-INVITE does not end the dialog"
    );
    // The caller ACKs the 408 (hop by hop: absorbed); the server never answers the CANCEL.
    let ack = sip(
        &format!("ACK {} SIP/2.0", fwd.ruri()),
        &[
            (
                "Via",
                call.via(&format!("z9hG4bK-{}-2-INVITE", call.call_id)),
            ),
            ("Max-Forwards", "70".into()),
            ("From", call.from.clone()),
            ("To", call.to.clone()),
            ("Call-ID", call.call_id.clone()),
            ("CSeq", "2 ACK".into()),
        ],
        "",
    );
    h.recv(call.peer, &ack);
    assert_none(&h.out(), "the ACK of the 408 is absorbed");
    h.advance_to(secs(60));
    h.out();
    hang_up(&mut h, &mut call, &srv);
    h.advance_to(secs(120));
    assert_eq!(
        h.proxy.sizes(),
        (0, 0, 0),
        "server txs, client txs, dialogs left behind"
    );
}

#[test]
fn draining_counts_open_calls_and_transactions_in_flight() {
    // SIGTERM waits until nothing is open: a BYE ends its dialog at once, but the proxy must
    // stay until the BYE's 200 has been relayed back, or the caller never gets it.
    let mut h = Harness::new();
    let mut call = Call::udp("d1");
    let srv = Uas::new(S1, "srv-d1");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.proxy.start_draining();
    assert!(h.proxy.is_draining());
    assert_eq!(h.proxy.open_work(), (1, 0), "(dialogs, transactions)");

    // New calls: 503 with Retry-After, no dialog, nothing forwarded.
    let late = Call::udp("d2");
    refused(&mut h, &late, "a new call while draining");
    assert_eq!(h.proxy.open_work(), (1, 0));

    // OPTIONS to the proxy itself (an upstream's health check) says it is going away.
    h.recv(late.peer, &late.out_of_dialog("OPTIONS", &[]));
    let mut out = h.out();
    let busy = take(&mut out, "answer to OPTIONS", |s| s.code().is_some());
    assert_eq!(busy.code(), Some(503));
    assert!(busy.get(HeaderName::RetryAfter).is_some());

    // The BYE of the open call is relayed; its transaction is in flight until the 200.
    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE", |s| s.is(Method::Bye));
    bye.assert_to(&srv.peer);
    assert_eq!(h.proxy.dialog_stats().active, 0);
    assert_eq!(h.proxy.open_work(), (0, 1), "the BYE is in flight");
    h.recv(srv.peer, &response(&bye.msg, 200, None, &[], ""));
    let mut out = h.out();
    take(&mut out, "200 to the BYE", |s| s.code() == Some(200)).assert_to(&call.peer);
    assert_eq!(h.proxy.open_work(), (0, 0));
}

#[test]
fn draining_waits_for_the_byes_the_proxy_sends_itself() {
    // A dialog that expires while draining: the proxy's own BYEs are retransmitted until
    // answered (or timer F), so the process must not exit before.
    let mut h = Harness::with(TWO_DESTS, "dialogs:\n  lifetime: 20s\n");
    let mut call = Call::udp("d3");
    let srv = Uas::new(S1, "srv-d3");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.proxy.start_draining();
    h.advance_to(secs(20));
    let mut out = h.out();
    let (to_srv, to_caller) = expiry_byes(&mut out, &call, &srv);
    assert_eq!(h.proxy.open_work(), (0, 2), "two BYEs in flight");
    h.recv(srv.peer, &response(&to_srv.msg, 200, None, &[], ""));
    assert_eq!(h.proxy.open_work(), (0, 1));
    h.recv(call.peer, &response(&to_caller.msg, 200, None, &[], ""));
    assert_eq!(h.proxy.open_work(), (0, 0));
}

#[test]
fn the_ack_of_the_transports_400_is_absorbed() {
    let mut h = Harness::new();
    let mut c = Call::udp("c400");
    // Aimed at a destination: an ACK the core took for an in-dialog one would go there.
    c.ruri = format!("sip:mrcp@{S1}");
    // Two spaces after the method: the parser refuses it, the transport answers 400.
    let bad = c.invite().replacen("INVITE ", "INVITE  ", 1);
    let e = Message::parse(bad.as_bytes()).unwrap_err();
    let resp = Message::parse(&crate::sip::bad_request(&e).unwrap()).unwrap();
    assert_eq!(resp.code(), Some(400));
    let tag = resp.to_tag().unwrap();
    assert!(crate::sip::is_stateless_tag(tag), "{tag}");
    // A retransmission would get the same tag.
    let again = Message::parse(&crate::sip::bad_request(&e).unwrap()).unwrap();
    assert_eq!(again.to_tag(), Some(tag));
    let sizes = h.proxy.sizes();
    let refused = "mrcp_lb_relay_refused_total{reason=\"no_route\"}";
    h.recv(c.peer, &c.ack_non_2xx(&resp));
    assert_none(&h.out(), "the ACK of the stateless 400 is absorbed");
    assert_eq!(h.proxy.sizes(), sizes, "and leaves nothing behind");
    assert_eq!(sample(&h, refused), 0.0, "as the answer to our 400");

    // The same ACK with another To tag is taken for an end-to-end one, and the relay rule
    // refuses it (no dialog, no Route to us): the absorption above is the tag's doing.
    let other = resp
        .get(&HeaderName::To)
        .unwrap()
        .replace(tag, "lb-not-ours");
    let mut ack = resp.clone();
    ack.set(HeaderName::To, other);
    h.recv(c.peer, &c.ack_non_2xx(&ack));
    assert_none(&h.out(), "the relay rule absorbs it");
    assert_eq!(
        sample(&h, refused),
        1.0,
        "as an in-dialog ACK nobody may relay"
    );
}

#[test]
fn the_ack_of_the_cores_own_400_is_absorbed() {
    let mut h = Harness::new();
    let mut c = Call::udp("c400core");
    c.ruri = format!("sip:mrcp@{S1}");
    // No From tag: the core answers 400 itself.
    c.from = "sipp <sip:sipp@192.168.0.5:5061>".into();
    h.recv(c.peer, &c.invite());
    let resp = take(&mut h.out(), "400", |s| s.code() == Some(400));
    let tag = resp.msg.to_tag().unwrap().to_string();
    assert!(crate::sip::is_stateless_tag(&tag), "{tag}");
    h.recv(c.peer, &c.ack_non_2xx(&resp.msg));
    assert_none(&h.out(), "the ACK of the core's 400 is absorbed");
    assert_eq!(
        sample(&h, "mrcp_lb_relay_refused_total{reason=\"no_route\"}"),
        0.0,
        "as the answer to our 400, not as a stray in-dialog ACK"
    );
}

mod relay;
