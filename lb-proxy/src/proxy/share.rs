//! The core's side of load sharing between replicas ([`crate::cluster`]): peers' updates in,
//! this replica's load out, end notices for dialogs set up through another replica.

use bytes::Bytes;
use lb_api::admin::{ClusterStatus, PeerStatus};
use std::net::SocketAddr;
use std::time::Instant;
use tracing::{debug, info};

use super::{Proxy, Timer};
use crate::cluster::EndNotice;
use crate::dialog::{DialogKey, End};
use crate::sip::Message;

impl Proxy {
    /// Starts the cluster tick (expiry of silent peers, resending of unacknowledged updates).
    pub(super) fn start_cluster(&mut self, now: Instant) {
        if let Some(c) = &self.cluster {
            let at = now + c.tick();
            self.arm(at, Timer::Cluster);
        }
    }

    pub(super) fn cluster_tick(&mut self, now: Instant) {
        self.refresh_cluster(now);
        self.start_cluster(now);
    }

    /// An update datagram from a peer.
    pub fn on_peer(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let updates = &self.metrics.cluster.updates;
        match c.receive(now, from, data) {
            Ok(r) => {
                updates.with_label_values(&["received"]).inc();
                for e in r.ends {
                    self.end_foreign(&e);
                }
                self.refresh_cluster(now);
            }
            Err(e) => {
                updates.with_label_values(&["refused"]).inc();
                debug!(%from, "peer update refused: {e}");
            }
        }
    }

    /// A peer announced the end of a dialog that went through it: ours to end, if we hold it.
    fn end_foreign(&mut self, e: &EndNotice) {
        for tag in &e.tags {
            let key = DialogKey {
                call_id: e.call_id.as_str().into(),
                caller_tag: tag.as_str().into(),
            };
            if self.dialogs.contains_key(&key) {
                debug!(call_id = %e.call_id, "dialog ended through another replica");
                self.end_dialog(&key, End::Normal);
                self.metrics
                    .cluster
                    .ends
                    .with_label_values(&["applied"])
                    .inc();
                return;
            }
        }
    }

    /// A BYE for a dialog this replica does not hold: the replica that set it up learns of the
    /// end from our updates.
    pub(super) fn announce_end(&mut self, msg: &Message) {
        if self.cluster.is_none() {
            return;
        }
        let Some(call_id) = msg.call_id() else {
            return;
        };
        let tags: Vec<String> = [msg.from_tag(), msg.to_tag()]
            .into_iter()
            .flatten()
            .map(str::to_string)
            .collect();
        if tags.is_empty() {
            return;
        }
        let end = EndNotice {
            call_id: call_id.to_string(),
            tags,
        };
        self.dests.seq += 1;
        let seq = self.dests.seq;
        if let Some(c) = self.cluster.as_mut() {
            c.add_end(seq, end);
        }
        self.metrics
            .cluster
            .ends
            .with_label_values(&["announced"])
            .inc();
    }

    /// Brings routing up to date with the cluster: live replicas, their loads, and which of
    /// our calls every live peer has acknowledged.
    pub(super) fn refresh_cluster(&mut self, now: Instant) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let n = c.size(now);
        if n != self.dests.cluster_size {
            if self.dests.cluster_size != 0 {
                info!(
                    replicas = n,
                    was = self.dests.cluster_size,
                    "live replicas sharing load changed"
                );
            }
            self.dests.set_cluster_size(n);
        }
        self.dests.set_remote(&c.remote_loads(now));
        if let Some(a) = c.min_ack(now) {
            self.dests.acknowledged(a);
        }
        c.settle(now, self.dests.seq);
    }

    /// Replaces the peers (from a pushed set).
    pub(super) fn set_peers(&mut self, now: Instant, peers: &[SocketAddr]) {
        if let Some(c) = self.cluster.as_mut() {
            c.set_peers(peers);
            self.refresh_cluster(now);
        } else if !peers.is_empty() {
            debug!("the set names peers but this proxy has no cluster section: ignored");
        }
    }

    /// The update to send to the peers now, if one is due: the datagram and its targets.
    pub fn take_cluster_outbound(&mut self, now: Instant) -> Option<(Bytes, Vec<SocketAddr>)> {
        let c = self.cluster.as_mut()?;
        let dests = &self.dests;
        let out = c.outbound(now, dests.seq, || {
            dests
                .visible()
                .flat_map(|d| {
                    d.resources
                        .iter()
                        .filter(|r| r.load > 0)
                        .map(|r| (d.spec.id.clone(), r.name.clone(), r.load))
                })
                .collect()
        });
        if let Some((_, targets)) = &out {
            self.metrics
                .cluster
                .updates
                .with_label_values(&["sent"])
                .inc_by(targets.len() as u64);
        }
        out
    }

    /// `GET /v1/cluster`.
    pub fn cluster_status(&self, now: Instant) -> ClusterStatus {
        let Some(c) = &self.cluster else {
            return ClusterStatus {
                enabled: false,
                node: String::new(),
                size: 1,
                sync_lag_seconds: 0.0,
                peers: Vec::new(),
            };
        };
        let live: Vec<SocketAddr> = c.live(now).map(|p| p.addr).collect();
        ClusterStatus {
            enabled: true,
            node: c.node.clone(),
            size: c.size(now),
            sync_lag_seconds: c.sync_lag(now),
            peers: c
                .peers()
                .iter()
                .map(|p| PeerStatus {
                    addr: p.addr.to_string(),
                    node: p.node.clone(),
                    live: live.contains(&p.addr),
                    is_self: p.is_self,
                    last_update_ms: p
                        .heard
                        .map(|h| now.saturating_duration_since(h).as_millis() as u64),
                    load: p.loads.iter().map(|(_, _, n)| u64::from(*n)).sum(),
                })
                .collect(),
        }
    }

    /// Fills the cluster gauges before a scrape.
    pub(super) fn export_cluster_gauges(&self, now: Instant) {
        let m = &self.metrics.cluster;
        m.dest_load.reset();
        m.peers.reset();
        m.peer_age.reset();
        for d in self.dests.visible() {
            for r in &d.resources {
                m.dest_load
                    .with_label_values(&[d.spec.id.as_str(), d.spec.uri.as_str(), &r.name])
                    .set(i64::from(r.cluster_load()));
            }
        }
        let Some(c) = &self.cluster else {
            return;
        };
        let live = c.live(now).count() as i64;
        let configured = c.peers().iter().filter(|p| !p.is_self).count() as i64;
        m.peers.with_label_values(&["live"]).set(live);
        m.peers
            .with_label_values(&["silent"])
            .set(configured - live);
        m.sync_lag.set(c.sync_lag(now));
        for p in c.peers().iter().filter(|p| !p.is_self) {
            if let Some(h) = p.heard {
                m.peer_age
                    .with_label_values(&[&p.addr.to_string()])
                    .set(now.saturating_duration_since(h).as_secs_f64());
            }
        }
    }
}
