//! One round of the loop, [`Reconciler::reconcile_once`]: compute the destination set from the
//! caches, hand it (and the proxy list) to the pushers when it changed, and, as leader, write
//! the statuses and Events.

use k8s_openapi::api::core::v1::Pod;
use lb_api::{DestinationSet, DestinationSpec};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tracing::info;

use crate::context::Context;
use crate::model::{self, compute};
use crate::push::{Desired, PushHandle};
use crate::status::StatusWriter;

/// What the loop keeps from one round to the next.
pub struct Reconciler {
    /// Where the sets and the proxy list go.
    push: PushHandle,
    /// The last set handed to the pushers.
    current: Option<Arc<DestinationSet>>,
    /// Whether this replica led in the last round.
    was_leading: bool,
    status: StatusWriter,
}

impl Reconciler {
    pub fn new(push: PushHandle) -> Reconciler {
        Reconciler {
            push,
            current: None,
            was_leading: false,
            status: StatusWriter::default(),
        }
    }

    /// compute → push → status, over the caches as they are now. `leading`: whether this
    /// replica may write (statuses, Events; the pushers ask for themselves).
    pub async fn reconcile_once(&mut self, ctx: &Context, leading: bool) {
        ctx.metrics.reconciles.inc();
        let started = Instant::now();
        let server_objs = ctx.stores.servers.state();
        let pod_objs = ctx.stores.pods.state();
        let pod_refs: Vec<&Pod> = pod_objs.iter().map(|p| p.as_ref()).collect();
        let computed = compute(server_objs.iter().map(|s| s.as_ref()), &pod_refs);
        let proxy_objs = ctx
            .stores
            .proxy_pods
            .as_ref()
            .map(|pp| pp.state())
            .unwrap_or_default();
        let proxy_refs: Vec<&Pod> = proxy_objs.iter().map(|p| p.as_ref()).collect();
        let peers = ctx
            .settings
            .proxy_cluster_port
            .zip(ctx.static_peer_ips.as_deref())
            .map(|(port, ips)| model::peers(&proxy_refs, ips, port));

        // A replica that just took the lead versions its set now: a standby's set was
        // versioned when it computed it, possibly before the old leader's last push.
        let took_lead = leading && !self.was_leading;
        self.was_leading = leading;
        let floor = self.push.floor.load(Ordering::Relaxed);
        if let Some(set) = next_set(
            self.current.as_deref(),
            &computed.destinations,
            peers,
            floor,
            took_lead,
            unix_millis(),
        ) {
            self.publish(ctx, set, started);
        }
        if ctx.stores.proxy_pods.is_some() {
            let urls = proxy_urls(ctx, &proxy_refs);
            self.push.proxies.send_if_modified(|old| {
                let c = *old != urls;
                if c {
                    *old = urls;
                }
                c
            });
        }
        if leading {
            ctx.metrics.leader.set(1);
            self.status.write(ctx, &server_objs, &computed).await;
        } else {
            ctx.metrics.leader.set(0);
            self.status.forget(); // Rewrite everything when leadership comes (back).
        }
    }

    /// Hands a new set to the pushers, with its log line and metrics.
    fn publish(&mut self, ctx: &Context, set: DestinationSet, computed: Instant) {
        if self.current.as_ref().is_none_or(|c| c.peers != set.peers) {
            if let Some(list) = &set.peers {
                let list: Vec<String> = list.iter().map(ToString::to_string).collect();
                info!(peers = %list.join(","), "proxy cluster peers");
            }
            ctx.metrics
                .cluster_peers
                .set(set.peers.as_ref().map_or(0, |p| p.len() as i64));
        }
        info!(
            version = set.version,
            destinations = set.destinations.len(),
            peers = set.peers.as_ref().map_or(0, Vec::len),
            "destination set computed"
        );
        ctx.metrics.destinations.set(set.destinations.len() as i64);
        ctx.metrics.set_version.set(set.version as i64);
        let set = Arc::new(set);
        let _ = self.push.desired.send(Some(Desired {
            set: set.clone(),
            computed,
        }));
        self.current = Some(set);
    }
}

/// The set to push after this round, or None while `current` still stands. A new set is due
/// when the destinations or peers changed, when a proxy reported a version at or above the
/// current one (`floor`), or when this replica just took the lead. Its version is the clock in
/// milliseconds, but always above the last version and above `floor`.
fn next_set(
    current: Option<&DestinationSet>,
    destinations: &[DestinationSpec],
    peers: Option<Vec<SocketAddr>>,
    floor: u64,
    took_lead: bool,
    now_millis: u64,
) -> Option<DestinationSet> {
    let changed = took_lead
        || current.is_none_or(|c| {
            c.destinations != destinations || c.peers != peers || c.version <= floor
        });
    if !changed {
        return None;
    }
    let last = current.map_or(0, |c| c.version);
    Some(DestinationSet {
        version: now_millis.max(last + 1).max(floor + 1),
        destinations: destinations.to_vec(),
        peers,
    })
}

/// The admin URLs to push to: every proxy pod with an IP that is not terminating, and the
/// `--proxy-url` proxies.
fn proxy_urls(ctx: &Context, proxy_pods: &[&Pod]) -> BTreeSet<String> {
    let port = ctx.settings.proxy_admin_port;
    proxy_pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| crate::pods::pod_ip(p).map(|ip| proxy_url(ip, port)))
        .chain(ctx.settings.proxy_urls.iter().cloned())
        .collect()
}

fn proxy_url(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]:{port}")
    } else {
        format!("http://{ip}:{port}")
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
