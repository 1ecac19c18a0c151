//! What every part of the loop shares, made once at start-up (as in kube-rs controller-rs):
//! the API client, the settings, the Event recorder, the metrics and the watched caches.

use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use std::net::IpAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::crd::MANAGER;
use crate::metrics::Metrics;
use crate::model;
use crate::settings::Settings;
use crate::watches::Stores;

pub struct Context {
    pub client: Client,
    pub settings: Settings,
    /// Publishes Events as [`MANAGER`], with this replica's Lease identity as the instance.
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// MrcpServers, pods and proxy pods, filled by the watches.
    pub stores: Stores,
    /// The IPs of the `--proxy-url` proxies, listed with the discovered proxy pods as the
    /// set's `peers`; None when no peer list is pushed (see [`static_peer_ips`]).
    pub static_peer_ips: Option<Vec<IpAddr>>,
}

impl Context {
    /// Starts the watches; the caches fill in the background (see [`Stores::wait_synced`]).
    pub fn start(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        shutdown: &CancellationToken,
    ) -> Context {
        let stores = Stores::start(&client, &settings, shutdown);
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: settings.lease.as_ref().map(|l| l.identity.clone()),
            },
        );
        let static_peer_ips = static_peer_ips(&settings);
        Context {
            client,
            settings,
            recorder,
            metrics,
            stores,
            static_peer_ips,
        }
    }
}

/// The proxies' cluster addresses: discovered pods at their pod IP, static proxies at the
/// IP of their URL. A static proxy named by host name has no address the operator can
/// name, and a list without it would replace the peers the proxies have: push none then.
fn static_peer_ips(settings: &Settings) -> Option<Vec<IpAddr>> {
    let port = settings.proxy_cluster_port?;
    let mut ips = Vec::new();
    for url in &settings.proxy_urls {
        match model::url_ip(url) {
            Some(ip) => ips.push(ip),
            None => {
                warn!(
                    proxy = %url,
                    "--proxy-url names a host, not an IP address: its cluster address \
                     (IP:{port}) is unknown, so the sets carry no peer list and every proxy \
                     keeps the cluster.peers of its config file (use IP addresses, or \
                     --proxy-cluster-port 0 to say so)"
                );
                return None;
            }
        }
    }
    Some(ips)
}
