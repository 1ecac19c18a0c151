//! The relay rule: which requests inside a dialog (those with a To tag) the proxy forwards, and
//! to where. Everything else a peer sends with a To tag is refused here, statelessly, so that
//! nobody can use the proxy to send SIP to an address that no configuration, destination or
//! dialog of ours names. `docs/relay-policy.md` states the rule with the threats it stops.
//!
//! 1. A dialog this proxy holds: towards the other party only (its flow, Contact or recorded
//!    route), whatever the request names.
//! 2. A dialog it does not hold (set up before a restart, or through another replica): the
//!    request must carry a Route to this proxy. With a key, that Route must carry the token
//!    the proxy put in its Record-Route ([`RouteKeys`]), and the token decides: the caller's
//!    requests go to the destination it names and nowhere else; the server's requests are
//!    relayed only when they come from that destination's address. Without a key, the rule
//!    without proof: towards one of our destinations, or from one of them.
//! 3. Anything else: 404 (an ACK is absorbed), counted in `mrcp_lb_relay_refused_total`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tracing::debug;

use super::Proxy;
use crate::config::Key;
use crate::dialog::DialogKey;
use crate::sip::{name_addr_uri, HeaderName, Message, Method, SipUriRef};
use crate::transport::Flow;

/// The Record-Route URI parameter that carries the token.
pub const TOKEN_PARAM: &str = "lbt";

/// Bytes of HMAC-SHA256 kept in a token: 96 bits, as in many MAC-truncating protocols.
const MAC_LEN: usize = 12;

/// Token format version (first byte).
const VERSION: u8 = 1;

/// The keys that sign and check Record-Route tokens: the first signs, all check. A key that
/// was replaced keeps checking until its deadline, so that calls set up before a rotation go
/// on to their end.
#[derive(Debug, Default)]
pub struct RouteKeys {
    keys: Vec<(Key, Option<Instant>)>,
}

impl RouteKeys {
    pub fn new(keys: Vec<Key>) -> RouteKeys {
        RouteKeys {
            keys: keys.into_iter().map(|k| (k, None)).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// A new list of keys (the key file changed): its first key signs from now on; keys in
    /// force before that are not in the new list are still accepted for `grace`.
    pub fn rotate(&mut self, now: Instant, new: Vec<Key>, grace: Duration) {
        let until = now + grace;
        let mut keys: Vec<(Key, Option<Instant>)> = new.into_iter().map(|k| (k, None)).collect();
        for (old, deadline) in self.keys.drain(..) {
            if keys.iter().any(|(k, _)| *k == old) {
                continue;
            }
            let deadline = deadline.map_or(until, |d| d.min(until));
            if deadline > now {
                keys.push((old, Some(deadline)));
            }
        }
        self.keys = keys;
    }

    /// The token for a call routed to a destination, or None without a key.
    pub fn sign(
        &self,
        call_id: &str,
        caller_tag: &str,
        dest_id: &str,
        addr: SocketAddr,
    ) -> Option<String> {
        let (key, _) = self.keys.first()?;
        let tag = mac(key, call_id, caller_tag, dest_id, addr)
            .finalize()
            .into_bytes();
        let mut raw = Vec::with_capacity(1 + 16 + 2 + MAC_LEN);
        raw.push(VERSION);
        match addr.ip() {
            IpAddr::V4(ip) => raw.extend_from_slice(&ip.octets()),
            IpAddr::V6(ip) => raw.extend_from_slice(&ip.octets()),
        }
        raw.extend_from_slice(&addr.port().to_be_bytes());
        raw.extend_from_slice(&tag[..MAC_LEN]);
        Some(URL_SAFE_NO_PAD.encode(raw))
    }

    /// The destination address a token names, when one of the keys made it for this call and
    /// a destination of that id (the whole check the relay rule runs per candidate).
    pub fn check(
        &self,
        now: Instant,
        token: &str,
        call_id: &str,
        caller_tag: &str,
        dest_id: &str,
    ) -> Option<SocketAddr> {
        let t = Token::decode(token)?;
        self.verify(now, &t, call_id, caller_tag, dest_id)
            .then_some(t.addr)
    }

    /// Whether `token` was made by one of the keys for this call and destination.
    fn verify(
        &self,
        now: Instant,
        token: &Token,
        call_id: &str,
        caller_tag: &str,
        dest_id: &str,
    ) -> bool {
        self.keys
            .iter()
            .filter(|(_, deadline)| deadline.is_none_or(|d| now < d))
            .any(|(key, _)| {
                mac(key, call_id, caller_tag, dest_id, token.addr)
                    .verify_truncated_left(&token.mac)
                    .is_ok()
            })
    }
}

/// A decoded token: the destination's address in the clear, and the MAC that binds it to the
/// call and the destination's id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    addr: SocketAddr,
    mac: [u8; MAC_LEN],
}

impl Token {
    fn decode(s: &str) -> Option<Token> {
        // The longest token (IPv6) is 31 bytes, 42 characters: refuse more before decoding.
        if s.len() > 48 {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(s).ok()?;
        let (&version, rest) = raw.split_first()?;
        if version != VERSION {
            return None;
        }
        let ip_len = rest.len().checked_sub(2 + MAC_LEN)?;
        let ip: IpAddr = match ip_len {
            4 => <[u8; 4]>::try_from(&rest[..4]).ok()?.into(),
            16 => <[u8; 16]>::try_from(&rest[..16]).ok()?.into(),
            _ => return None,
        };
        let port = u16::from_be_bytes([rest[ip_len], rest[ip_len + 1]]);
        let mac = <[u8; MAC_LEN]>::try_from(&rest[ip_len + 2..]).ok()?;
        Some(Token {
            addr: SocketAddr::new(ip, port),
            mac,
        })
    }
}

/// HMAC-SHA256 over the call (Call-ID, the caller's From tag) and the destination (id and
/// address), each field length-prefixed so that no two inputs run together alike.
fn mac(
    key: &Key,
    call_id: &str,
    caller_tag: &str,
    dest_id: &str,
    addr: SocketAddr,
) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&key.0)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    let addr = addr.to_string();
    for field in [call_id, caller_tag, dest_id, addr.as_str()] {
        m.update(&(field.len() as u64).to_be_bytes());
        m.update(field.as_bytes());
    }
    m
}

/// Why a request with a To tag was not relayed (the `reason` label of
/// `mrcp_lb_relay_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No dialog of ours, and no Route to this proxy.
    NoRoute,
    /// A Route to this proxy without a token, while a key is configured.
    Unsigned,
    /// A token that no key made for this call and any destination at its address.
    BadToken,
    /// A valid token for the server's side of the call, from another address.
    NotFromDestination,
    /// The next hop is no party of the dialog (held dialog), or, without a key, neither the
    /// target nor the source is a destination.
    StrangerTarget,
    /// Nothing says where the request goes (a Route to us and nothing after it).
    NoTarget,
    /// No destination set loaded yet (a restart, before the operator's first push): dropped
    /// without an answer, so that the sender's retransmission passes once the set is in.
    NoSet,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NoRoute => "no_route",
            Refusal::Unsigned => "unsigned",
            Refusal::BadToken => "bad_token",
            Refusal::NotFromDestination => "not_from_destination",
            Refusal::StrangerTarget => "stranger_target",
            Refusal::NoTarget => "no_target",
            Refusal::NoSet => "no_set",
        }
    }

    pub const ALL: [Refusal; 7] = [
        Refusal::NoRoute,
        Refusal::Unsigned,
        Refusal::BadToken,
        Refusal::NotFromDestination,
        Refusal::StrangerTarget,
        Refusal::NoTarget,
        Refusal::NoSet,
    ];
}

/// Where an in-dialog request goes, and the dialog it belongs to when this proxy holds it
/// (with whether the caller sent it).
pub(super) struct Hop {
    pub target: Flow,
    pub dialog: Option<(DialogKey, bool)>,
}

impl Proxy {
    /// The relay rule for a request with a To tag: strips our own Route entries and returns
    /// where the request goes, or why it goes nowhere. May rewrite the Request-URI (a request
    /// sent straight to us without Route, in a dialog we hold).
    pub(super) fn next_hop(
        &self,
        now: Instant,
        msg: &mut Message,
        flow: Flow,
    ) -> Result<Hop, Refusal> {
        let held = self.find_dialog(msg).and_then(|k| {
            let from_caller = msg.from_tag()? == &*k.caller_tag;
            Some((k, from_caller))
        });
        // Tokens are only read for a dialog we do not hold.
        let tokens = self.strip_own_routes(msg, held.is_none());
        if let Some((key, from_caller)) = held {
            let target = self.held_hop(msg, &key, from_caller)?;
            return Ok(Hop {
                target,
                dialog: Some((key, from_caller)),
            });
        }
        let Some(tokens) = tokens else {
            // Addressed to us: a dialog we do not know (481). Addressed elsewhere: a relay.
            let to_us = msg
                .request_uri()
                .and_then(|u| SipUriRef::parse(u).ok())
                .is_some_and(|u| self.is_self_uri(&u));
            return Err(if to_us {
                Refusal::NoTarget
            } else {
                Refusal::NoRoute
            });
        };
        if !self.has_set() {
            return Err(Refusal::NoSet);
        }
        let target = if self.route_keys.is_empty() {
            self.unproven_hop(msg, flow)?
        } else {
            self.proven_hop(now, msg, flow, &tokens)?
        };
        Ok(Hop {
            target,
            dialog: None,
        })
    }

    /// Removes the Route entries that name this proxy (one, or two after a double
    /// Record-Route) and returns the tokens they carried (when `keep_tokens`); None when there
    /// was none.
    fn strip_own_routes(&self, msg: &mut Message, keep_tokens: bool) -> Option<Vec<String>> {
        let mut tokens = None::<Vec<String>>;
        while let Some(first) = msg.get(&HeaderName::Route) {
            match SipUriRef::parse(name_addr_uri(first)) {
                Ok(u) if self.is_self_uri(&u) => {
                    let found = tokens.get_or_insert_with(Vec::new);
                    if let Some(t) = u.param(TOKEN_PARAM).flatten().filter(|_| keep_tokens) {
                        if !found.iter().any(|f| f == t) {
                            found.push(t.to_string());
                        }
                    }
                    msg.remove_first(&HeaderName::Route);
                }
                _ => break,
            }
        }
        tokens
    }

    /// The next hop named by the request itself: the first Route left, else the
    /// Request-URI unless it names us. None when neither points anywhere we can reach.
    fn named_hop(&self, msg: &Message) -> Result<Flow, Refusal> {
        let next = match msg.get(&HeaderName::Route) {
            Some(r) => SipUriRef::parse(name_addr_uri(r)).ok(),
            None => msg
                .request_uri()
                .and_then(|u| SipUriRef::parse(u).ok())
                .filter(|u| !self.is_self_uri(u)),
        };
        next.and_then(|u| self.uri_flow(&u))
            .ok_or(Refusal::NoTarget)
    }

    /// A dialog we hold: towards the other party, and only there.
    fn held_hop(
        &self,
        msg: &mut Message,
        key: &DialogKey,
        from_caller: bool,
    ) -> Result<Flow, Refusal> {
        let Some(d) = self.dialogs.get(key) else {
            return Err(Refusal::NoTarget);
        };
        let party = if from_caller { &d.callee } else { &d.caller };
        let target = match msg.get(&HeaderName::Route) {
            Some(r) => SipUriRef::parse(name_addr_uri(r))
                .ok()
                .and_then(|u| self.uri_flow(&u)),
            None => match msg.request_uri().and_then(|u| SipUriRef::parse(u).ok()) {
                // The remote target itself: the party's own flow (keeps TCP connections and
                // NAT bindings), else its URI.
                Some(ruri) if !self.is_self_uri(&ruri) => {
                    party.flow.or_else(|| self.uri_flow(&ruri))
                }
                // Sent straight to us without Route: only the dialog knows where it goes.
                _ => {
                    if let Some(c) = &party.contact {
                        msg.set_request_uri(c.to_string());
                    }
                    party.flow
                }
            },
        };
        let target = target.ok_or(Refusal::NoTarget)?;
        let uri_addr = |u: &str| SipUriRef::parse(name_addr_uri(u)).ok()?.socket_addr();
        let is_party = party.flow.is_some_and(|f| f.remote == target.remote)
            || party.contact.as_deref().and_then(uri_addr) == Some(target.remote)
            || party
                .routes
                .iter()
                .any(|r| uri_addr(r) == Some(target.remote));
        if is_party {
            Ok(target)
        } else {
            Err(Refusal::StrangerTarget)
        }
    }

    /// No key: towards one of our destinations, or from one of them.
    fn unproven_hop(&self, msg: &Message, flow: Flow) -> Result<Flow, Refusal> {
        let target = self.named_hop(msg)?;
        let to_destination = self.dests.iter().any(|d| d.addr == Some(target.remote));
        let from_destination = self.is_destination_ip(flow.remote.ip());
        if to_destination || from_destination {
            Ok(target)
        } else {
            Err(Refusal::StrangerTarget)
        }
    }

    /// With a key: the token names the destination and binds it to the call.
    fn proven_hop(
        &self,
        now: Instant,
        msg: &Message,
        flow: Flow,
        tokens: &[String],
    ) -> Result<Flow, Refusal> {
        if tokens.is_empty() {
            return Err(Refusal::Unsigned);
        }
        let call_id = msg.call_id().unwrap_or_default();
        let (from_tag, to_tag) = (msg.from_tag(), msg.to_tag());
        for token in tokens.iter().filter_map(|t| Token::decode(t)) {
            for d in self.dests.iter().filter(|d| d.addr == Some(token.addr)) {
                let signed_for = |tag: Option<&str>| {
                    tag.is_some_and(|tag| {
                        self.route_keys
                            .verify(now, &token, call_id, tag, &d.spec.id)
                    })
                };
                // The caller's request (its From tag signed): to that destination only.
                if signed_for(from_tag) {
                    let listener = self
                        .out_listener(d.transport, Some(token.addr.is_ipv6()))
                        .ok_or(Refusal::NoTarget)?;
                    return Ok(Flow {
                        transport: d.transport,
                        listener,
                        remote: token.addr,
                        conn: None,
                    });
                }
                // The server's request (the caller's tag is its To tag): from there only.
                if signed_for(to_tag) {
                    if flow.remote.ip() != token.addr.ip() {
                        return Err(Refusal::NotFromDestination);
                    }
                    return self.named_hop(msg);
                }
            }
        }
        Err(Refusal::BadToken)
    }

    fn is_destination_ip(&self, ip: IpAddr) -> bool {
        self.dests
            .iter()
            .any(|d| d.addr.is_some_and(|a| a.ip() == ip))
    }

    /// Refuses a request the relay rule does not allow, counted by reason and logged with its
    /// source: 404 statelessly; 481 for one addressed to us whose dialog we do not know; no
    /// answer to an ACK, nor while no destination set is loaded (the retransmission passes
    /// later).
    pub(super) fn refuse_relay(&mut self, msg: &Message, flow: Flow, why: Refusal) {
        self.metrics.relay_refused(why.label());
        debug!(
            source = %flow.remote,
            transport = %flow.transport,
            call_id = msg.call_id().unwrap_or_default(),
            reason = why.label(),
            "in-dialog request refused by the relay rule"
        );
        if msg.method() == Some(&Method::Ack) {
            return;
        }
        match why {
            Refusal::NoSet => {}
            Refusal::NoTarget => self.reply(msg, flow, 481, "Call/Transaction Does Not Exist"),
            _ => self.reply(msg, flow, 404, "Not Found"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Key {
        Key(s.as_bytes().to_vec())
    }

    #[test]
    fn a_token_verifies_for_its_call_and_destination_only() {
        let keys = RouteKeys::new(vec![key("0123456789abcdef")]);
        let now = Instant::now();
        for addr in ["10.0.0.5:5060", "[2001:db8::5]:5070"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let t = keys.sign("call-1", "tagA", "ns/pod-0", addr).unwrap();
            assert!(t.len() <= 42, "{t}");
            let tok = Token::decode(&t).unwrap();
            assert_eq!(tok.addr, addr);
            assert!(keys.verify(now, &tok, "call-1", "tagA", "ns/pod-0"));
            assert!(!keys.verify(now, &tok, "call-2", "tagA", "ns/pod-0"));
            assert!(!keys.verify(now, &tok, "call-1", "tagB", "ns/pod-0"));
            assert!(!keys.verify(now, &tok, "call-1", "tagA", "ns/pod-1"));
            // Another address with the same MAC: the address is bound too.
            let moved = Token {
                addr: "10.0.0.6:5060".parse().unwrap(),
                ..tok.clone()
            };
            assert!(!keys.verify(now, &moved, "call-1", "tagA", "ns/pod-0"));
            // Another key.
            let other = RouteKeys::new(vec![key("fedcba9876543210")]);
            assert!(!other.verify(now, &tok, "call-1", "tagA", "ns/pod-0"));
        }
        // Fields run together differently do not collide.
        let a: SocketAddr = "10.0.0.5:5060".parse().unwrap();
        let t = Token::decode(&keys.sign("ab", "c", "x", a).unwrap()).unwrap();
        assert!(!keys.verify(now, &t, "a", "bc", "x"));
    }

    #[test]
    fn no_key_signs_nothing() {
        let keys = RouteKeys::default();
        assert!(keys.is_empty());
        assert_eq!(
            keys.sign("c", "t", "d", "10.0.0.5:5060".parse().unwrap()),
            None
        );
    }

    #[test]
    fn garbage_tokens_decode_to_nothing() {
        for t in [
            "",
            "A",
            "!!!!",
            "AQ",
            &"A".repeat(49),
            // Version 2.
            &URL_SAFE_NO_PAD.encode([2u8; 19]),
            // An address of 5 bytes.
            &URL_SAFE_NO_PAD.encode([1u8; 20]),
        ] {
            assert_eq!(Token::decode(t), None, "{t:?}");
        }
    }

    #[test]
    fn a_rotated_key_is_accepted_until_its_grace_ends() {
        let (old, new) = (key("old-key-0123456789"), key("new-key-0123456789"));
        let t0 = Instant::now();
        let mut keys = RouteKeys::new(vec![old.clone()]);
        let addr: SocketAddr = "10.0.0.5:5060".parse().unwrap();
        let tok = Token::decode(&keys.sign("c", "t", "d", addr).unwrap()).unwrap();
        keys.rotate(t0, vec![new.clone()], Duration::from_secs(60));
        // The new key signs.
        let fresh = Token::decode(&keys.sign("c", "t", "d", addr).unwrap()).unwrap();
        assert_ne!(fresh, tok);
        assert!(keys.verify(t0, &fresh, "c", "t", "d"));
        // The old one still checks, for the grace period only.
        assert!(keys.verify(t0 + Duration::from_secs(59), &tok, "c", "t", "d"));
        assert!(!keys.verify(t0 + Duration::from_secs(60), &tok, "c", "t", "d"));
        // A second rotation does not extend the old key's deadline, and drops it once past.
        keys.rotate(
            t0 + Duration::from_secs(30),
            vec![key("third-key-0123456789")],
            Duration::from_secs(600),
        );
        assert!(!keys.verify(t0 + Duration::from_secs(61), &tok, "c", "t", "d"));
        assert!(keys.verify(t0 + Duration::from_secs(61), &fresh, "c", "t", "d"));
        keys.rotate(
            t0 + Duration::from_secs(700),
            vec![key("third-key-0123456789")],
            Duration::ZERO,
        );
        assert_eq!(keys.keys.len(), 1);
        // A key still listed (not first) keeps checking without a deadline.
        let mut keys = RouteKeys::new(vec![old.clone()]);
        keys.rotate(t0, vec![new, old], Duration::ZERO);
        assert!(keys.verify(t0 + Duration::from_secs(3600), &tok, "c", "t", "d"));
    }
}
