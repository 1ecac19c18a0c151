//! Load sharing between proxy replicas, with no I/O (the proxy core drives it).
//!
//! Every replica counts the calls it set up itself (its local load) and sends the list of its
//! non-zero loads, numbered by a sequence that grows with every local change, to each peer in
//! one UDP datagram: as soon as its load changes (one datagram per batch of events), and at
//! least every heartbeat. Each update also acknowledges the highest sequence received from
//! every peer. A replica routes on its own load plus the latest load of every live peer, and
//! holds at most max(1, free / N) calls per destination that not every live peer has
//! acknowledged (see [`crate::destinations`]): N replicas together exceed a capacity by at
//! most N - 1 calls. A peer silent for `peerTimeout` is dead and its load stops counting.
//!
//! A BYE for a dialog this replica does not know (set up through another replica) is
//! announced in the updates as an end notice until every live peer has acknowledged it; the
//! replica that holds the dialog ends it and frees its load.
//!
//! With a shared key (`cluster.keyFile`), every datagram starts with the HMAC-SHA256 of its
//! JSON body; datagrams whose tag does not verify are refused before they are parsed.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config;

/// Version of the update datagram; others are refused.
pub const WIRE_VERSION: u8 = 1;

/// The largest update the proxy sends (a UDP datagram on any network).
pub const MAX_UPDATE: usize = 65_000;

/// One update datagram (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub v: u8,
    /// The sender's node id (name plus a random suffix chosen at start).
    pub node: String,
    /// Grows with every change of the sender's load or end notices.
    pub seq: u64,
    /// Highest `seq` the sender has received from each node.
    #[serde(default)]
    pub acks: Vec<(String, u64)>,
    /// The sender's non-zero loads: (destination id, resource, calls).
    #[serde(default)]
    pub loads: Vec<(String, String, u32)>,
    /// Dialogs that ended through the sender but were set up through another replica.
    #[serde(default)]
    pub ends: Vec<EndNotice>,
}

/// A dialog ended by a BYE that went through another replica: its Call-ID and the From and
/// To tags of that BYE (which of the two is the caller's depends on who hung up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndNotice {
    pub call_id: String,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Peer {
    /// Where updates go and come from.
    pub addr: SocketAddr,
    /// Node id of the last update received from it.
    pub node: Option<String>,
    /// Highest sequence received from it.
    pub seq: u64,
    /// Highest sequence of ours it has acknowledged.
    pub acked: u64,
    pub heard: Option<Instant>,
    pub loads: Vec<(String, String, u32)>,
    /// The address is this replica's own (the pushed list names every replica).
    pub is_self: bool,
}

/// What an update received from a peer asks of the proxy.
#[derive(Debug, Default)]
pub struct Received {
    /// Its loads changed: routing must see them.
    pub changed: bool,
    /// Dialogs that may be ours and ended through that peer.
    pub ends: Vec<EndNotice>,
}

/// Length of the HMAC-SHA256 tag in front of an authenticated datagram.
const TAG: usize = 32;

#[derive(Debug)]
pub struct Cluster {
    pub node: String,
    /// Shared key authenticating the datagrams, when configured.
    key: Option<config::Key>,
    /// An update too large for a datagram was reported once.
    oversize_warned: bool,
    heartbeat: Duration,
    timeout: Duration,
    peers: Vec<Peer>,
    /// End notices being announced, with the sequence that first carried them.
    ends: Vec<(u64, EndNotice)>,
    ack_owed: bool,
    last_sent: Option<Instant>,
    sent_seq: u64,
    /// Since when some local change waits for a live peer's acknowledgement.
    unacked_since: Option<Instant>,
}

/// Why an update datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("version {0} (this proxy speaks {WIRE_VERSION})")]
    Version(u8),
    #[error("{0} is not a configured peer")]
    NotAPeer(SocketAddr),
}

impl Cluster {
    pub fn new(cfg: &config::Cluster, suffix: u32) -> Cluster {
        let mut c = Cluster {
            node: format!("{}-{suffix:08x}", cfg.name),
            key: cfg.key.clone(),
            oversize_warned: false,
            heartbeat: cfg.heartbeat,
            timeout: cfg.peer_timeout,
            peers: Vec::new(),
            ends: Vec::new(),
            ack_owed: false,
            last_sent: None,
            sent_seq: 0,
            unacked_since: None,
        };
        c.set_peers(&cfg.peers);
        c
    }

    /// How often the core ticks the cluster: expiry of silent peers and resending of
    /// unacknowledged updates.
    pub fn tick(&self) -> Duration {
        (self.heartbeat / 5).clamp(Duration::from_millis(10), Duration::from_millis(100))
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// Replaces the peer list; peers that stay keep what was learned from them.
    pub fn set_peers(&mut self, addrs: &[SocketAddr]) {
        let mut old = std::mem::take(&mut self.peers);
        let mut seen = std::collections::HashSet::new();
        for a in addrs {
            if !seen.insert(*a) {
                continue;
            }
            let p = match old.iter().position(|p| p.addr == *a) {
                Some(i) => old.swap_remove(i),
                None => Peer {
                    addr: *a,
                    node: None,
                    seq: 0,
                    acked: 0,
                    heard: None,
                    loads: Vec::new(),
                    is_self: false,
                },
            };
            self.peers.push(p);
        }
        // A new peer learns our state at once.
        self.ack_owed = true;
    }

    fn is_live(&self, p: &Peer, now: Instant) -> bool {
        !p.is_self
            && p.heard
                .is_some_and(|h| now.saturating_duration_since(h) < self.timeout)
    }

    /// Peers heard from within `peerTimeout`.
    pub fn live(&self, now: Instant) -> impl Iterator<Item = &Peer> {
        self.peers.iter().filter(move |p| self.is_live(p, now))
    }

    /// Live replicas sharing load, this one included.
    pub fn size(&self, now: Instant) -> u32 {
        1 + self.live(now).count() as u32
    }

    /// The highest sequence of ours every live peer has acknowledged; None without live peers.
    pub fn min_ack(&self, now: Instant) -> Option<u64> {
        self.live(now).map(|p| p.acked).min()
    }

    /// Seconds the oldest unacknowledged local change has waited (0 when in sync).
    pub fn sync_lag(&self, now: Instant) -> f64 {
        self.unacked_since
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64())
    }

    /// The live peers' loads, summed by destination id and resource.
    pub fn remote_loads(&self, now: Instant) -> HashMap<String, Vec<(String, u32)>> {
        let mut sum: HashMap<String, Vec<(String, u32)>> = HashMap::new();
        for p in self.live(now) {
            for (id, res, n) in &p.loads {
                let list = sum.entry(id.clone()).or_default();
                match list.iter_mut().find(|(r, _)| r == res) {
                    Some((_, total)) => *total = total.saturating_add(*n),
                    None => list.push((res.clone(), *n)),
                }
            }
        }
        sum
    }

    /// Takes an update from `from`. Unknown senders and malformed datagrams are refused with
    /// the reason.
    pub fn receive(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<Received, Refused> {
        let body = match &self.key {
            Some(config::Key(key)) => {
                if data.len() < TAG {
                    return Err(Refused::Unauthenticated("shorter than its tag"));
                }
                let (tag, body) = data.split_at(TAG);
                mac(key, body).verify_slice(tag).map_err(|_| {
                    Refused::Unauthenticated("the tag does not verify (another key?)")
                })?;
                body
            }
            None => data,
        };
        let u: Update =
            serde_json::from_slice(body).map_err(|e| Refused::Malformed(e.to_string()))?;
        if u.v != WIRE_VERSION {
            return Err(Refused::Version(u.v));
        }
        let Some(i) = self.peers.iter().position(|p| p.addr == from) else {
            return Err(Refused::NotAPeer(from));
        };
        if u.node == self.node {
            // Our own datagram: the pushed list names this replica too.
            self.peers[i].is_self = true;
            return Ok(Received::default());
        }
        let p = &mut self.peers[i];
        if p.node.as_deref() != Some(u.node.as_str()) {
            // A new replica (or a restart) at that address: start over.
            p.node = Some(u.node.clone());
            p.seq = 0;
            p.acked = 0;
            p.loads.clear();
        }
        p.heard = Some(now);
        if let Some((_, a)) = u.acks.iter().find(|(n, _)| *n == self.node) {
            p.acked = p.acked.max(*a);
        }
        let mut r = Received::default();
        if u.seq > p.seq {
            p.seq = u.seq;
            p.loads = u.loads;
            r.changed = true;
            r.ends = u.ends;
            self.ack_owed = true;
        }
        Ok(r)
    }

    /// Announces a dialog end seen here, as part of update `seq`.
    pub fn add_end(&mut self, seq: u64, end: EndNotice) {
        self.ends.push((seq, end));
    }

    /// Drops end notices every live peer has seen, and notes whether local changes still wait
    /// for an acknowledgement.
    pub fn settle(&mut self, now: Instant, seq: u64) {
        let min = self.min_ack(now);
        match min {
            Some(a) => self.ends.retain(|(s, _)| *s > a),
            None => self.ends.clear(),
        }
        let waiting = min.is_some_and(|a| a < seq);
        match (waiting, self.unacked_since) {
            (true, None) => self.unacked_since = Some(now),
            (false, Some(_)) => self.unacked_since = None,
            _ => {}
        }
    }

    /// The update to send now, if one is due: after a local change (`seq` moved), when a
    /// peer's update needs acknowledging, every tick while a live peer has not acknowledged
    /// our latest, and at least every heartbeat. Returns the datagram and where it goes.
    /// `loads` lists this replica's loads; it is only called when an update is due (the core
    /// asks after every batch of events).
    pub fn outbound(
        &mut self,
        now: Instant,
        seq: u64,
        loads: impl FnOnce() -> Vec<(String, String, u32)>,
    ) -> Option<(Bytes, Vec<SocketAddr>)> {
        let since = self.last_sent.map(|t| now.saturating_duration_since(t));
        let due = self.ack_owed
            || seq != self.sent_seq
            || since.is_none_or(|s| s >= self.heartbeat)
            || (since.is_some_and(|s| s >= self.tick())
                && self.min_ack(now).is_some_and(|a| a < seq));
        if !due {
            return None;
        }
        let targets: Vec<SocketAddr> = self
            .peers
            .iter()
            .filter(|p| !p.is_self)
            .map(|p| p.addr)
            .collect();
        if targets.is_empty() {
            return None;
        }
        let loads = loads();
        let u = Update {
            v: WIRE_VERSION,
            node: self.node.clone(),
            seq,
            acks: self
                .peers
                .iter()
                .filter_map(|p| p.node.clone().map(|n| (n, p.seq)))
                .collect(),
            loads,
            ends: self.ends.iter().map(|(_, e)| e.clone()).collect(),
        };
        let body = serde_json::to_vec(&u).ok()?;
        let data = match &self.key {
            Some(config::Key(key)) => {
                let mut d = mac(key, &body).finalize().into_bytes().to_vec();
                d.extend_from_slice(&body);
                d
            }
            None => body,
        };
        if data.len() > MAX_UPDATE && !self.oversize_warned {
            self.oversize_warned = true;
            tracing::warn!(
                bytes = data.len(),
                "cluster update larger than a UDP datagram: peers will not receive it"
            );
        }
        self.ack_owed = false;
        self.last_sent = Some(now);
        self.sent_seq = seq;
        Some((Bytes::from(data), targets))
    }
}

fn mac(key: &[u8], body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(body);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, peers: &[&str]) -> config::Cluster {
        config::Cluster {
            listen: "127.0.0.1:7070".parse().unwrap(),
            name: name.into(),
            peers: peers.iter().map(|p| p.parse().unwrap()).collect(),
            heartbeat: Duration::from_millis(500),
            peer_timeout: Duration::from_secs(3),
            key: None,
        }
    }

    #[test]
    fn with_a_key_only_datagrams_tagged_with_it_are_taken() {
        let now = Instant::now();
        let keyed = |name: &str, key: &[u8]| config::Cluster {
            key: Some(config::Key(key.to_vec())),
            ..cfg(name, &[A, B])
        };
        let mut a = Cluster::new(&keyed("a", b"k1"), 1);
        let mut b = Cluster::new(&keyed("b", b"k1"), 2);
        let mut x = Cluster::new(&keyed("x", b"k2"), 3);
        let mut plain = Cluster::new(&cfg("p", &[A, B]), 4);
        let (d, _) = a.outbound(now, 1, || load("d1", 2)).unwrap();
        assert!(b.receive(now, addr(A), &d).unwrap().changed);
        let (wrong, _) = x.outbound(now, 1, || load("d1", 9)).unwrap();
        let e = b.receive(now, addr(A), &wrong).unwrap_err();
        assert!(matches!(e, Refused::Unauthenticated(_)), "{e}");
        assert!(e.to_string().starts_with("unauthenticated"), "{e}");
        let (untagged, _) = plain.outbound(now, 2, || load("d1", 9)).unwrap();
        assert!(matches!(
            b.receive(now, addr(A), &untagged),
            Err(Refused::Unauthenticated(_))
        ));
        // A flipped bit in the body.
        let mut forged = d.to_vec();
        let last = forged.len() - 2;
        forged[last] ^= 1;
        assert!(b.receive(now, addr(A), &forged).is_err());
        assert_eq!(b.remote_loads(now)["d1"], vec![("pstn".to_string(), 2)]);
    }

    const A: &str = "127.0.0.1:7070";
    const B: &str = "127.0.0.2:7070";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn load(id: &str, n: u32) -> Vec<(String, String, u32)> {
        vec![(id.into(), "pstn".into(), n)]
    }

    /// Delivers what `from` has to send to `to`.
    fn deliver(
        now: Instant,
        from: &mut Cluster,
        from_addr: &str,
        to: &mut Cluster,
        seq: u64,
        n: u32,
    ) -> Option<Received> {
        let (data, targets) = from.outbound(now, seq, || load("d1", n))?;
        assert!(targets.contains(&addr(if from_addr == A { B } else { A })));
        Some(to.receive(now, addr(from_addr), &data).unwrap())
    }

    #[test]
    fn loads_flow_and_acknowledgements_settle() {
        let now = Instant::now();
        let mut a = Cluster::new(&cfg("a", &[A, B]), 1);
        let mut b = Cluster::new(&cfg("b", &[A, B]), 2);
        // Each learns it is one of the listed addresses from its own first datagram.
        let (own, _) = a.outbound(now, 0, Vec::new).unwrap();
        a.receive(now, addr(A), &own).unwrap();
        assert!(a.peers()[0].is_self);
        assert_eq!(a.size(now), 1, "nobody heard yet");

        let r = deliver(now, &mut a, A, &mut b, 1, 3).unwrap();
        assert!(r.changed);
        assert_eq!(b.remote_loads(now)["d1"], vec![("pstn".to_string(), 3)]);
        assert_eq!(b.size(now), 2);
        // b owes an ack, a sees it.
        deliver(now, &mut b, B, &mut a, 0, 0).unwrap();
        assert_eq!(a.min_ack(now), Some(1));
        a.settle(now, 1);
        assert_eq!(a.sync_lag(now), 0.0);
        // Nothing new: no datagram until the heartbeat.
        assert!(a.outbound(now, 1, || load("d1", 3)).is_none());
        assert!(a
            .outbound(now + Duration::from_millis(500), 1, || load("d1", 3))
            .is_some());
    }

    #[test]
    fn unacknowledged_updates_are_resent_every_tick_and_lag_grows() {
        let t0 = Instant::now();
        let mut a = Cluster::new(&cfg("a", &[B]), 1);
        let mut b = Cluster::new(&cfg("b", &[A]), 2);
        deliver(t0, &mut b, B, &mut a, 1, 0).unwrap();
        assert!(a.outbound(t0, 0, Vec::new).is_some(), "ack owed");
        // A local change b never acknowledges (lost).
        assert!(a.outbound(t0, 1, || load("d1", 1)).is_some());
        a.settle(t0, 1);
        let tick = a.tick();
        assert!(a.outbound(t0 + tick / 2, 1, || load("d1", 1)).is_none());
        assert!(
            a.outbound(t0 + tick, 1, || load("d1", 1)).is_some(),
            "resent"
        );
        a.settle(t0 + tick, 1);
        assert!(a.sync_lag(t0 + tick) >= tick.as_secs_f64());
    }

    #[test]
    fn silent_peer_stops_counting_and_a_restart_starts_over() {
        let t0 = Instant::now();
        let mut a = Cluster::new(&cfg("a", &[B]), 1);
        let mut b = Cluster::new(&cfg("b", &[A]), 2);
        deliver(t0, &mut b, B, &mut a, 7, 4).unwrap();
        assert_eq!(a.size(t0), 2);
        let later = t0 + Duration::from_secs(3);
        assert_eq!(a.size(later), 1, "dead after peerTimeout");
        assert!(a.remote_loads(later).is_empty());
        // b restarts: a new node id with a lower sequence is taken.
        let mut b2 = Cluster::new(&cfg("b", &[A]), 3);
        let r = deliver(later, &mut b2, B, &mut a, 1, 2).unwrap();
        assert!(r.changed);
        assert_eq!(a.remote_loads(later)["d1"], vec![("pstn".to_string(), 2)]);
    }

    #[test]
    fn stale_and_foreign_datagrams_change_nothing() {
        let now = Instant::now();
        let mut a = Cluster::new(&cfg("a", &[B]), 1);
        let mut b = Cluster::new(&cfg("b", &[A]), 2);
        let (d5, _) = b.outbound(now, 5, || load("d1", 5)).unwrap();
        let (d4, _) = b.outbound(now, 4, || load("d1", 4)).unwrap();
        assert!(a.receive(now, addr(B), &d5).unwrap().changed);
        assert!(!a.receive(now, addr(B), &d4).unwrap().changed, "reordered");
        assert_eq!(a.remote_loads(now)["d1"], vec![("pstn".to_string(), 5)]);
        let e = a.receive(now, addr("127.0.0.9:7070"), &d5).unwrap_err();
        assert_eq!(e, Refused::NotAPeer(addr("127.0.0.9:7070")));
        assert!(e.to_string().contains("not a configured peer"), "{e}");
        let e = a.receive(now, addr(B), b"{\"v\":1").unwrap_err();
        assert!(matches!(e, Refused::Malformed(_)), "{e}");
        let e = a
            .receive(now, addr(B), br#"{"v":9,"node":"x","seq":1}"#)
            .unwrap_err();
        assert_eq!(e, Refused::Version(9));
        assert!(e.to_string().contains("version 9"), "{e}");
    }

    #[test]
    fn end_notices_repeat_until_every_live_peer_acknowledged() {
        let now = Instant::now();
        let mut a = Cluster::new(&cfg("a", &[B]), 1);
        let mut b = Cluster::new(&cfg("b", &[A]), 2);
        deliver(now, &mut a, A, &mut b, 1, 0).unwrap();
        deliver(now, &mut b, B, &mut a, 1, 0).unwrap();
        let end = EndNotice {
            call_id: "c1".into(),
            tags: vec!["t1".into(), "t2".into()],
        };
        a.add_end(2, end.clone());
        let r = deliver(now, &mut a, A, &mut b, 2, 0).unwrap();
        assert_eq!(r.ends, vec![end.clone()]);
        a.settle(now, 2);
        let (again, _) = a.outbound(now + a.tick(), 2, Vec::new).unwrap();
        let u: Update = serde_json::from_slice(&again).unwrap();
        assert_eq!(u.ends, vec![end], "not acknowledged yet: still announced");
        deliver(now, &mut b, B, &mut a, 1, 0).unwrap();
        a.settle(now, 2);
        let (done, _) = a
            .outbound(now + a.tick() + a.heartbeat, 2, Vec::new)
            .unwrap();
        let u: Update = serde_json::from_slice(&done).unwrap();
        assert!(u.ends.is_empty());
    }
}
