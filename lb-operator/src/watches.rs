//! The watches: one reflector (watch + cache) per kind the operator reads — MrcpServers, pods,
//! and the proxy pods when they are found by label — and the change signal that wakes the loop
//! whenever any of them moves.

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::crd::MrcpServer;
use crate::error::Error;
use crate::pods;
use crate::settings::Settings;

/// How long a watch waits before trying again after an error: from 250 ms, doubling, at most
/// [`WatchBackoff::MAX`], with ±20 % jitter; back to the start on the first event that comes
/// through. kube's default goes up to 30 s and only resets after 2 minutes, so after an API
/// server outage of half a minute a watch waited up to 30 s to reconnect, then as long again
/// after the expected "resource version too old" answer: a change made once the API server
/// was back took about a minute to reach the proxies.
pub struct WatchBackoff {
    next: Duration,
    rng: rand::rngs::SmallRng,
}

impl WatchBackoff {
    pub const MIN: Duration = Duration::from_millis(250);
    pub const MAX: Duration = Duration::from_secs(4);

    pub fn new() -> WatchBackoff {
        use rand::SeedableRng;
        WatchBackoff {
            next: Self::MIN,
            rng: rand::rngs::SmallRng::from_entropy(),
        }
    }
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff::new()
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        use rand::Rng;
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(base.mul_f64(self.rng.gen_range(0.8..=1.2)))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

/// Starts a reflector: the store fills from the watch, each object as `keep` leaves it, and
/// `notify` wakes the loop on every change.
fn reflect<K>(
    api: Api<K>,
    cfg: watcher::Config,
    keep: impl FnMut(&mut K) + Send + 'static,
    notify: Arc<Notify>,
    shutdown: CancellationToken,
) -> Store<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, cfg)
        .backoff(WatchBackoff::new())
        .modify(keep)
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                ev = stream.next() => match ev {
                    Some(Ok(_)) => notify.notify_one(),
                    Some(Err(e)) => warn!("watch: {e}"),
                    None => return,
                },
                _ = shutdown.cancelled() => return,
            }
        }
    });
    reader
}

/// The caches the loop reads, and the signal that one of them changed.
pub struct Stores {
    pub servers: Store<MrcpServer>,
    /// The pods that may be MRCP servers: every pod (of `--namespace`), or those
    /// `--pod-selector` selects, each read as only the fields the operator uses ([`pods::WatchedPod`]).
    pub pods: Store<pods::WatchedPod>,
    /// The proxy pods, when they are found by label (`--proxy-selector`).
    pub proxy_pods: Option<Store<Pod>>,
    /// Notified on every event of every watch.
    pub changed: Arc<Notify>,
}

impl Stores {
    /// Starts the watches (in `--namespace`, or everywhere); each ends at `shutdown`.
    pub fn start(client: &Client, settings: &Settings, shutdown: &CancellationToken) -> Stores {
        let changed = Arc::new(Notify::new());
        let ns = settings.namespace.as_deref();
        let servers = reflect(
            api::<MrcpServer>(client, ns),
            watcher::Config::default(),
            |_| {},
            changed.clone(),
            shutdown.clone(),
        );
        // Memory grows with the pods watched: a label selector keeps unrelated pods out of the
        // watch altogether (the API server filters), reading only the fields used keeps what does come in small.
        let mut pod_cfg = watcher::Config::default();
        if let Some(sel) = &settings.pod_selector {
            pod_cfg = pod_cfg.labels(sel);
        }
        let pods = reflect(
            api::<pods::WatchedPod>(client, ns),
            pod_cfg,
            |_| {},
            changed.clone(),
            shutdown.clone(),
        );
        let proxy_pods = settings.proxy_selector.as_ref().map(|sel| {
            let cfg = watcher::Config::default().labels(sel);
            reflect(
                api::<Pod>(client, settings.proxy_namespace.as_deref()),
                cfg,
                |_| {},
                changed.clone(),
                shutdown.clone(),
            )
        });
        Stores {
            servers,
            pods,
            proxy_pods,
            changed,
        }
    }

    /// Waits until every cache holds its first full list: `Ok(true)`. A shutdown meanwhile is
    /// a clean stop, not an error: `Ok(false)`.
    pub async fn wait_synced(&self, shutdown: &CancellationToken) -> Result<bool, Error> {
        let synced = async {
            self.servers.wait_until_ready().await?;
            self.pods.wait_until_ready().await?;
            if let Some(p) = &self.proxy_pods {
                p.wait_until_ready().await?;
            }
            Ok::<(), reflector::store::WriterDropped>(())
        };
        // The reflector tasks drop their writers when the stop comes, so a failed wait that
        // races the cancellation is also a clean stop.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => Ok(false),
            r = synced => match r {
                Ok(()) => Ok(true),
                Err(_) if shutdown.is_cancelled() => Ok(false),
                Err(e) => Err(Error::CacheSync(e)),
            },
        }
    }
}

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn watch_backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = WatchBackoff::new();
        let first: Vec<Duration> = b.by_ref().take(8).collect();
        let bases = [250, 500, 1000, 2000, 4000, 4000, 4000, 4000];
        for (got, base) in first.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *got >= base.mul_f64(0.8) && *got <= base.mul_f64(1.2),
                "{got:?} not within 20 % of {base:?}: {first:?}"
            );
        }
        b.reset();
        let again = b.next().unwrap();
        assert!(again <= Duration::from_millis(300), "{again:?}");
    }
}
