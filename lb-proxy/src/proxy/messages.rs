//! Building and sending messages: responses the proxy makes, where responses go (RFC 3261
//! 18.2.2, RFC 3581), what a forwarded request gets (Max-Forwards, Via, Record-Route), and the
//! requests the proxy builds from others (ACK, CANCEL).

use super::*;
use std::fmt::Write as _;

/// The ACK for a non-2xx final response (RFC 3261 17.1.1.3): same branch and Request-URI as
/// the INVITE, To from the response.
pub(in crate::proxy) fn make_ack(invite: &Message, resp: &Message) -> Message {
    same_transaction(
        invite,
        Method::Ack,
        resp.get(&HeaderName::To).unwrap_or_default(),
    )
}

/// A request in the INVITE's own transaction (ACK for a non-2xx, CANCEL): its Request-URI,
/// top Via, From, Call-ID, CSeq number and Route set, with the given method and To.
pub(in crate::proxy) fn same_transaction(invite: &Message, method: Method, to: &str) -> Message {
    let mut m = Message::request(method.clone(), invite.request_uri().unwrap_or_default());
    if let Some(v) = invite.get(&HeaderName::Via) {
        m.push(HeaderName::Via, v.to_string());
    }
    m.push(HeaderName::MaxForwards, Text::from_static("70"));
    if let Some(v) = invite.get(&HeaderName::From) {
        m.push(HeaderName::From, v.to_string());
    }
    m.push(HeaderName::To, to.to_string());
    if let Some(v) = invite.get(&HeaderName::CallId) {
        m.push(HeaderName::CallId, v.to_string());
    }
    let seq = invite.cseq().map(|c| c.0).unwrap_or(1);
    m.push(HeaderName::CSeq, format!("{seq} {method}"));
    for r in invite.get_all(&HeaderName::Route) {
        m.push(HeaderName::Route, r.to_string());
    }
    m
}

/// The Contact URI of a message, when it is a SIP URI a request can be sent to: one the parser
/// would take as a Request-URI (no white space, no control or non-ASCII character), or a
/// request with it as Request-URI (the BYE the proxy sends on expiry) would not even parse.
pub(in crate::proxy) fn contact_target(msg: &Message) -> Option<String> {
    let uri = name_addr_uri(msg.get(&HeaderName::Contact)?);
    (SipUri::check(uri).is_ok() && check_request_uri(uri).is_ok()).then(|| uri.to_string())
}

/// `Retry-After: 30;duration=60 (comment)` → 30 s.
pub(in crate::proxy) fn retry_after(msg: &Message) -> Option<u64> {
    let v = msg.get(&HeaderName::RetryAfter)?;
    v.split([';', ' ', '(']).next()?.trim().parse().ok()
}

/// `Session-Expires: 600;refresher=uac` → 600 s.
pub(in crate::proxy) fn session_expires(msg: &Message) -> Option<Duration> {
    let v = msg.get(&HeaderName::SessionExpires)?;
    let secs: u64 = v.split(';').next()?.trim().parse().ok()?;
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// A small stable hash for deriving stateless branches.
pub(in crate::proxy) fn fxhash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Proxy {
    pub(in crate::proxy) fn send(&mut self, flow: Flow, data: Bytes, on_error: Option<ErrorToken>) {
        self.push_out(flow, data, on_error);
    }

    /// Sends a response upstream, counting it by class.
    pub(in crate::proxy) fn send_response(&mut self, flow: Flow, code: u16, data: Bytes) {
        self.metrics.response_sent(code);
        self.push_out(flow, data, None);
    }

    pub(in crate::proxy) fn push_out(
        &mut self,
        flow: Flow,
        data: Bytes,
        on_error: Option<ErrorToken>,
    ) {
        let out = self.outbound(flow, data, on_error);
        self.out.push(out);
    }

    pub(in crate::proxy) fn outbound(
        &self,
        flow: Flow,
        data: Bytes,
        on_error: Option<ErrorToken>,
    ) -> Outbound {
        Outbound {
            transport: flow.transport,
            listener: flow.listener,
            target: Target::Addr(flow.remote),
            conn: flow.conn,
            data,
            on_error,
            server_name: match flow.transport {
                Transport::Tls => self.tls_server_name(flow.remote),
                _ => None,
            },
        }
    }

    /// The name a TLS connection to `remote` verifies the server's certificate against: the
    /// host of the destination URI at that address (its name, or its IP literal). None for
    /// any other peer (a client's address, say): the transport then uses the IP.
    pub(in crate::proxy) fn tls_server_name(&self, remote: SocketAddr) -> Option<Arc<str>> {
        self.dests
            .iter()
            .find(|d| d.addr == Some(remote) && d.transport == Transport::Tls)
            .map(|d| Arc::from(d.uri.host.as_str()))
    }

    /// Sends a response the proxy generates to a request it received, statelessly: a request
    /// without To tag gets the stateless tag, so the ACK of an error answered here (400 for no
    /// From tag, 482, 483) is recognised and absorbed like the 503's.
    pub(in crate::proxy) fn reply(&mut self, req: &Message, flow: Flow, code: u16, reason: &str) {
        let tag = self.reject_tag.clone();
        let resp = self.make_response(req, code, reason, Some(&tag));
        let target = self.response_flow(req, flow);
        self.send_response(target, code, resp.to_bytes());
    }

    pub(in crate::proxy) fn make_response(
        &mut self,
        req: &Message,
        code: u16,
        reason: &str,
        tag: Option<&str>,
    ) -> Message {
        let mut resp = req.response(code, reason);
        if code > 100 && req.to_tag().is_none() {
            let tag = match tag {
                Some(t) => t.to_string(),
                None => self.new_tag(),
            };
            if let Some(to) = resp.headers.iter_mut().find(|(n, _)| *n == HeaderName::To) {
                to.1 = format!("{};tag={tag}", to.1).into();
            }
        }
        match code {
            405 | 200 if req.method() != Some(&Method::Invite) => {
                resp.push(HeaderName::Allow, Text::from_static(ALLOW))
            }
            503 => resp.push(
                HeaderName::RetryAfter,
                self.cfg.routing.retry_after.as_secs().max(1).to_string(),
            ),
            _ => {}
        }
        resp.push(
            HeaderName::Server,
            Text::from_static(concat!("mrcp-lb/", env!("CARGO_PKG_VERSION"))),
        );
        resp
    }

    /// Where responses to a request go (RFC 3261 18.2.2, RFC 3581): over the connection it
    /// came on for TCP; for UDP to the source address when `rport` was asked for, otherwise to
    /// the source IP and the Via port.
    pub(in crate::proxy) fn response_flow(&self, req: &Message, flow: Flow) -> Flow {
        if flow.transport.is_stream() {
            return flow;
        }
        match req.get(&HeaderName::Via).and_then(Via::port_and_rport) {
            Some((port, false)) => Flow {
                remote: SocketAddr::new(flow.remote.ip(), port.unwrap_or(5060)),
                ..flow
            },
            _ => flow,
        }
    }

    /// Where a response goes when no transaction remembers it: the next Via.
    pub(in crate::proxy) fn via_flow(&self, via: &Via) -> Option<Flow> {
        let transport = Transport::parse(&via.transport)?;
        let ip = via
            .param("received")
            .flatten()
            .and_then(|r| r.parse().ok())
            .or_else(|| via.host.parse().ok())?;
        let port = via
            .param("rport")
            .flatten()
            .and_then(|p| p.parse().ok())
            .or(via.port)
            .unwrap_or(transport.default_port());
        let remote = SocketAddr::new(ip, port);
        let listener = self.out_listener(transport, Some(remote.is_ipv6()))?;
        Some(Flow {
            transport,
            listener,
            remote,
            conn: None,
        })
    }

    /// Decrements Max-Forwards (or adds it) and pushes our Via for the listener used.
    pub(in crate::proxy) fn prepare_forward(
        &mut self,
        msg: &mut Message,
        out_listener: usize,
        branch: &str,
    ) {
        match msg.max_forwards() {
            Some(n) => msg.set(HeaderName::MaxForwards, number(n.saturating_sub(1))),
            None => msg.set(HeaderName::MaxForwards, Text::from_static("70")),
        }
        let l = self.listener(out_listener);
        // One String of the right size, written in place.
        let mut via = String::with_capacity(40 + l.advertise.host.len() + branch.len());
        let _ = write!(
            via,
            "SIP/2.0/{} {};branch={branch}",
            l.transport.as_str(),
            l.advertise
        );
        if l.transport == Transport::Udp {
            via.push_str(";rport");
        }
        msg.push_front(HeaderName::Via, via);
    }

    /// Our Record-Route entry for `listener`, carrying the token when a key is configured.
    pub(in crate::proxy) fn record_route_uri(
        &self,
        listener: usize,
        double: bool,
        token: Option<&str>,
    ) -> String {
        let l = self.listener(listener);
        let mut uri = format!("<sip:{};transport={};lr", l.advertise, l.transport.lower());
        if double {
            uri.push_str(";r2=on");
        }
        if let Some(t) = token {
            uri.push(';');
            uri.push_str(relay::TOKEN_PARAM);
            uri.push('=');
            uri.push_str(t);
        }
        uri.push('>');
        uri
    }
}

/// A Max-Forwards value: below 100 (all that a request relayed normally carries) a static
/// string, no allocation.
fn number(n: u32) -> Text {
    const ONE: &str = "0123456789";
    const TWO: &str = "10111213141516171819202122232425262728293031323334353637383940414243444546\
                       47484950515253545556575859606162636465666768697071727374757677787980818283\
                       84858687888990919293949596979899";
    let i = n as usize;
    let s = match n {
        0..=9 => ONE.get(i..i + 1),
        10..=99 => TWO.get(2 * (i - 10)..2 * (i - 10) + 2),
        _ => None,
    };
    match s {
        Some(s) => Text::from_static(s),
        None => Text::from(n.to_string()),
    }
}

#[cfg(test)]
mod number_tests {
    #[test]
    fn numbers() {
        for n in [0u32, 1, 9, 10, 11, 42, 69, 70, 99, 100, 12345, u32::MAX] {
            assert_eq!(&*super::number(n), n.to_string(), "{n}");
        }
    }
}
