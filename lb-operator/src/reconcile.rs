//! One round of the loop, [`Reconciler::reconcile_once`]: compute the destination set from the
//! caches, hand it (and the proxy list) to the pushers when it changed, add the proxies' latest
//! live load (read in the background by [`crate::loads`], never waited for) and, as leader,
//! write the statuses and Events.

use k8s_openapi::api::core::v1::Pod;
use lb_api::{DestinationSet, DestinationSpec};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tracing::info;

use crate::context::Context;
use crate::loads::LoadHandle;
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
    /// Where the proxy list for the load reads goes and the loads come from.
    loads: LoadHandle,
}

impl Reconciler {
    pub fn new(push: PushHandle, loads: LoadHandle) -> Reconciler {
        Reconciler {
            push,
            current: None,
            was_leading: false,
            status: StatusWriter::default(),
            loads,
        }
    }

    /// Resolves when the proxies' loads changed since the last round took them (never when
    /// they are not read).
    pub async fn loads_changed(&mut self) {
        if self.loads.loads.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// compute → push → status, over the caches as they are now. `leading`: whether this
    /// replica may write (statuses, Events; the pushers ask for themselves).
    pub async fn reconcile_once(&mut self, ctx: &Context, leading: bool) {
        ctx.metrics.reconciles.inc();
        let started = Instant::now();
        // Only this operator's class: another class's MrcpServers are another release's (or
        // tenant's), neither in its set nor in its statuses, Events and metrics.
        let server_objs: Vec<_> = ctx
            .stores
            .servers
            .state()
            .into_iter()
            .filter(|s| ctx.settings.claims(s))
            .collect();
        let pod_objs = ctx.stores.pods.state();
        let pod_refs: Vec<&Pod> = pod_objs.iter().map(|p| p.pod()).collect();
        let mut computed = compute(server_objs.iter().map(|s| s.as_ref()), &pod_refs);
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
        let load_urls = Some(load_urls(ctx, &proxy_refs));
        self.loads.proxies.send_if_modified(|old| {
            let c = *old != load_urls;
            if c {
                *old = load_urls;
            }
            c
        });
        let loads = self.loads.loads.borrow_and_update().clone();
        if let Some(l) = &loads {
            for view in &mut computed.servers {
                model::apply_loads(view, l);
            }
        }
        if leading {
            ctx.metrics.leader.set(1);
            let keep_loads = loads.is_none() && ctx.settings.load_interval.is_some();
            let failing = self
                .push
                .failing
                .lock()
                .map(|f| f.clone())
                .unwrap_or_else(|p| p.into_inner().clone());
            self.status
                .write(ctx, &server_objs, &computed, keep_loads, &failing)
                .await;
            ctx.metrics.servers.update(&computed.servers);
        } else {
            ctx.metrics.leader.set(0);
            ctx.metrics.servers.clear();
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
    let scheme = crate::proxy_http::scheme(&ctx.settings);
    proxy_pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| crate::pods::pod_ip(p).map(|ip| proxy_url(scheme, ip, port)))
        .chain(ctx.settings.proxy_urls.iter().cloned())
        .collect()
}

/// The admin URLs to read the live load from: every proxy pod with an IP that has not
/// finished, terminating ones included (a draining replica still holds sessions), and the
/// `--proxy-url` proxies.
fn load_urls(ctx: &Context, proxy_pods: &[&Pod]) -> BTreeSet<String> {
    let port = ctx.settings.proxy_admin_port;
    let scheme = crate::proxy_http::scheme(&ctx.settings);
    proxy_pods
        .iter()
        .filter(|p| !crate::pods::finished(p))
        .filter_map(|p| crate::pods::pod_ip(p).map(|ip| proxy_url(scheme, ip, port)))
        .chain(ctx.settings.proxy_urls.iter().cloned())
        .collect()
}

fn proxy_url(scheme: &str, ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("{scheme}://[{ip}]:{port}")
    } else {
        format!("{scheme}://{ip}:{port}")
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(ip: &str) -> DestinationSpec {
        serde_json::from_value(serde_json::json!({
            "id": ip,
            "uri": format!("sip:{ip}:8060"),
            "resources": "pstn=100",
        }))
        .unwrap()
    }

    fn set(version: u64, dests: &[DestinationSpec]) -> DestinationSet {
        DestinationSet {
            version,
            destinations: dests.to_vec(),
            peers: None,
        }
    }

    #[test]
    fn the_first_set_takes_the_clock_as_its_version() {
        let d = [dest("10.0.0.1")];
        let s = next_set(None, &d, None, 0, false, 5_000).unwrap();
        assert_eq!(
            (s.version, s.destinations, s.peers),
            (5_000, d.to_vec(), None)
        );
    }

    #[test]
    fn an_unchanged_round_keeps_the_set() {
        let d = [dest("10.0.0.1")];
        let current = set(5_000, &d);
        assert_eq!(
            next_set(Some(&current), &d, None, 4_999, false, 9_000),
            None
        );
    }

    #[test]
    fn a_change_is_versioned_above_the_last_set_even_with_the_clock_behind() {
        let current = set(5_000, &[dest("10.0.0.1")]);
        let d = [dest("10.0.0.1"), dest("10.0.0.2")];
        let s = next_set(Some(&current), &d, None, 0, false, 1_000).unwrap();
        assert_eq!(s.version, 5_001);
        let peers = Some(vec!["10.1.0.1:7070".parse().unwrap()]);
        let s = next_set(
            Some(&current),
            &current.destinations,
            peers,
            0,
            false,
            9_000,
        )
        .unwrap();
        assert_eq!(s.version, 9_000, "a peer list change is a new set");
    }

    #[test]
    fn a_proxy_holding_a_newer_version_raises_the_next_one_above_it() {
        let d = [dest("10.0.0.1")];
        let current = set(5_000, &d);
        let s = next_set(Some(&current), &d, None, 7_000, false, 6_000).unwrap();
        assert_eq!(s.version, 7_001);
        assert_eq!(s.destinations, d.to_vec());
    }

    #[test]
    fn taking_the_lead_versions_the_same_set_anew() {
        let d = [dest("10.0.0.1")];
        let current = set(5_000, &d);
        let s = next_set(Some(&current), &d, None, 0, true, 8_000).unwrap();
        assert_eq!(s.version, 8_000);
    }

    #[test]
    fn proxy_urls_bracket_ipv6() {
        assert_eq!(proxy_url("http", "10.0.0.1", 8081), "http://10.0.0.1:8081");
        assert_eq!(proxy_url("http", "fd00::1", 8081), "http://[fd00::1]:8081");
        assert_eq!(
            proxy_url("https", "10.0.0.1", 8081),
            "https://10.0.0.1:8081"
        );
    }
}
