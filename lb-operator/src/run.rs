//! The operator's loop: watch MrcpServers, pods and proxy replicas; on every change compute the
//! destination set, hand it to the pushers, and (as leader) write statuses and events.

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource};
use lb_api::DestinationSet;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::crd::{MrcpServer, MANAGER};
use crate::lease::Elector;
use crate::metrics::Metrics;
use crate::model::{self, compute, Computed, ServerView};
use crate::push::{Desired, Pusher};

/// Everything the operator is told on its command line.
#[derive(Clone)]
pub struct Settings {
    /// Watch MrcpServers and pods in this namespace only; all namespaces when None.
    pub namespace: Option<String>,
    /// Label selector of the proxy pods (their admin API gets the set).
    pub proxy_selector: Option<String>,
    /// Namespace of the proxy pods.
    pub proxy_namespace: Option<String>,
    pub proxy_admin_port: u16,
    /// Proxies at fixed admin URLs (outside the cluster, or tests).
    pub proxy_urls: Vec<String>,
    /// UDP port of the proxies' cluster listener: the pushed set lists every proxy replica at
    /// `<IP>:<port>` as the replicas' `peers`. None: no peer list is pushed (the proxies keep
    /// the peers of their config files).
    pub proxy_cluster_port: Option<u16>,
    pub token: Option<String>,
    pub listen: SocketAddr,
    pub resync: Duration,
    /// Lease for leader election; None runs as the only writer.
    pub lease: Option<LeaseSettings>,
}

/// Every field but the admin token, which shows only whether it is set: a `{:?}` of the
/// settings in a log must not leak it.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("namespace", &self.namespace)
            .field("proxy_selector", &self.proxy_selector)
            .field("proxy_namespace", &self.proxy_namespace)
            .field("proxy_admin_port", &self.proxy_admin_port)
            .field("proxy_urls", &self.proxy_urls)
            .field("proxy_cluster_port", &self.proxy_cluster_port)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("listen", &self.listen)
            .field("resync", &self.resync)
            .field("lease", &self.lease)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
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

/// Starts a reflector: the store fills from the watch, and `notify` wakes the loop on every
/// change.
fn reflect<K>(
    api: Api<K>,
    cfg: watcher::Config,
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

/// Runs until shutdown.
pub async fn run(
    settings: Settings,
    client: Client,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let notify = Arc::new(Notify::new());
    let ns = settings.namespace.as_deref();
    let servers = reflect(
        api::<MrcpServer>(&client, ns),
        watcher::Config::default(),
        notify.clone(),
        shutdown.clone(),
    );
    let pods = reflect(
        api::<Pod>(&client, ns),
        watcher::Config::default(),
        notify.clone(),
        shutdown.clone(),
    );
    let proxy_pods = settings.proxy_selector.as_ref().map(|sel| {
        let cfg = watcher::Config::default().labels(sel);
        reflect(
            api::<Pod>(&client, settings.proxy_namespace.as_deref()),
            cfg,
            notify.clone(),
            shutdown.clone(),
        )
    });

    // The proxies' cluster addresses: discovered pods at their pod IP, static proxies at the
    // IP of their URL. A static proxy named by host name has no address the operator can
    // name, and a list without it would replace the peers the proxies have: push none then.
    let static_peer_ips: Option<Vec<IpAddr>> = settings.proxy_cluster_port.and_then(|port| {
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
    });

    // Leadership.
    let (leading_tx, leading) = watch::channel(settings.lease.is_none());
    let mut elector_task = None;
    if let Some(l) = &settings.lease {
        let elector = Elector {
            api: Api::<Lease>::namespaced(client.clone(), &l.namespace),
            name: l.name.clone(),
            identity: l.identity.clone(),
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(2),
        };
        elector_task = Some(tokio::spawn(elector.run(leading_tx, shutdown.clone())));
    } else {
        std::mem::forget(leading_tx); // Always leading; keep the channel open.
    }

    // Pushers.
    let (desired_tx, desired_rx) = watch::channel::<Option<Desired>>(None);
    let (proxies_tx, proxies_rx) =
        watch::channel::<BTreeSet<String>>(settings.proxy_urls.iter().cloned().collect());
    let pusher = Pusher {
        http: reqwest::Client::builder().build()?,
        token: settings.token.clone().map(Arc::from),
        resync: settings.resync,
        metrics: metrics.clone(),
        floor: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    let floor = pusher.floor.clone();
    tokio::spawn(pusher.run(desired_rx, proxies_rx, leading.clone(), shutdown.clone()));

    // Health and metrics.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    tokio::spawn(serve_http(
        listener,
        metrics.clone(),
        ready.clone(),
        shutdown.clone(),
    ));

    // Caches first; a shutdown meanwhile is a clean stop, not an error.
    let synced = async {
        servers.wait_until_ready().await?;
        pods.wait_until_ready().await?;
        if let Some(p) = &proxy_pods {
            p.wait_until_ready().await?;
        }
        Ok::<(), reflector::store::WriterDropped>(())
    };
    // The reflector tasks drop their writers when the stop comes, so a failed wait that
    // races the cancellation is also a clean stop.
    let stopped = tokio::select! {
        biased;
        _ = shutdown.cancelled() => true,
        r = synced => match r {
            Ok(()) => false,
            Err(_) if shutdown.is_cancelled() => true,
            Err(e) => return Err(e.into()),
        },
    };
    if stopped {
        finish(elector_task).await;
        return Ok(());
    }
    ready.store(true, Ordering::Relaxed);
    info!("caches synced");

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: settings.lease.as_ref().map(|l| l.identity.clone()),
        },
    );
    let mut writer = StatusWriter {
        client: client.clone(),
        written: HashMap::new(),
        warned: HashSet::new(),
        recorder,
        metrics: metrics.clone(),
    };
    let mut current: Option<Arc<DestinationSet>> = None;
    let mut leading = leading;
    let mut was_leading = false;
    loop {
        // Batch bursts of events (a StatefulSet scaling touches many pods at once).
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics.reconciles.inc();
        let started = Instant::now();
        let server_objs = servers.state();
        let pod_objs = pods.state();
        let pod_refs: Vec<&Pod> = pod_objs.iter().map(|p| p.as_ref()).collect();
        let computed = compute(server_objs.iter().map(|s| s.as_ref()), &pod_refs);
        let proxy_objs = proxy_pods.as_ref().map(|pp| pp.state()).unwrap_or_default();
        let proxy_refs: Vec<&Pod> = proxy_objs.iter().map(|p| p.as_ref()).collect();
        let peers = settings
            .proxy_cluster_port
            .zip(static_peer_ips.as_deref())
            .map(|(port, ips)| model::peers(&proxy_refs, ips, port));

        let floor_v = floor.load(Ordering::Relaxed);
        let now_leading = *leading.borrow_and_update();
        // A replica that just took the lead versions its set now: a standby's set was
        // versioned when it computed it, possibly before the old leader's last push.
        let took_lead = now_leading && !was_leading;
        was_leading = now_leading;
        let changed = took_lead
            || current.as_ref().is_none_or(|c| {
                c.destinations != computed.destinations || c.peers != peers || c.version <= floor_v
            });
        if changed {
            if current.as_ref().is_none_or(|c| c.peers != peers) {
                if let Some(list) = &peers {
                    let list: Vec<String> = list.iter().map(ToString::to_string).collect();
                    info!(peers = %list.join(","), "proxy cluster peers");
                }
                metrics
                    .cluster_peers
                    .set(peers.as_ref().map_or(0, |p| p.len() as i64));
            }
            let last = current.as_ref().map(|c| c.version).unwrap_or(0);
            let version = unix_millis().max(last + 1).max(floor_v + 1);
            let set = Arc::new(DestinationSet {
                version,
                destinations: computed.destinations.clone(),
                peers,
            });
            info!(
                version,
                destinations = set.destinations.len(),
                peers = set.peers.as_ref().map_or(0, Vec::len),
                "destination set computed"
            );
            metrics.destinations.set(set.destinations.len() as i64);
            metrics.set_version.set(version as i64);
            let _ = desired_tx.send(Some(Desired {
                set: set.clone(),
                computed: started,
            }));
            current = Some(set);
        }
        if proxy_pods.is_some() {
            let urls: BTreeSet<String> = proxy_refs
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| {
                    crate::pods::pod_ip(p).map(|ip| proxy_url(ip, settings.proxy_admin_port))
                })
                .chain(settings.proxy_urls.iter().cloned())
                .collect();
            proxies_tx.send_if_modified(|old| {
                let c = *old != urls;
                if c {
                    *old = urls;
                }
                c
            });
        }
        if now_leading {
            metrics.leader.set(1);
            writer.write(&server_objs, &computed).await;
        } else {
            metrics.leader.set(0);
            writer.written.clear(); // Rewrite everything when leadership comes (back).
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = leading.changed() => {}
            // Resync: conflicts raise the floor, statuses are re-checked.
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    finish(elector_task).await;
    Ok(())
}

/// Waits (briefly) for the elector to release the lease, so that a standby takes over at once
/// instead of when the lease expires.
async fn finish(elector: Option<tokio::task::JoinHandle<()>>) {
    if let Some(task) = elector {
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            warn!("the lease was not released within 5 s");
        }
    }
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

/// Writes statuses (server-side apply, only when they change) and Warning events for bad
/// annotations (once per pod and value).
struct StatusWriter {
    client: Client,
    written: HashMap<(String, String), serde_json::Value>,
    warned: HashSet<(String, &'static str, String)>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
}

impl StatusWriter {
    async fn write(&mut self, servers: &[Arc<MrcpServer>], computed: &Computed) {
        for view in &computed.servers {
            let Some(obj) = servers.iter().find(|s| {
                s.metadata.namespace.as_deref() == Some(&view.namespace)
                    && s.metadata.name.as_deref() == Some(&view.name)
            }) else {
                continue;
            };
            let status = with_condition(obj, view);
            let key = (view.namespace.clone(), view.name.clone());
            let value = match serde_json::to_value(&status) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if self.written.get(&key) == Some(&value)
                || obj
                    .status
                    .as_ref()
                    .and_then(|s| serde_json::to_value(s).ok())
                    .as_ref()
                    == Some(&value)
            {
                self.written.insert(key, value);
                continue;
            }
            let api: Api<MrcpServer> = Api::namespaced(self.client.clone(), &view.namespace);
            let patch = serde_json::json!({
                "apiVersion": "mrcp-lb.io/v1alpha1",
                "kind": "MrcpServer",
                "status": value,
            });
            match api
                .patch_status(
                    &view.name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(_) => {
                    debug!(server = %view.name, "status written");
                    self.written.insert(key, patch["status"].clone());
                }
                Err(e) => {
                    self.metrics.error("status");
                    warn!(server = %view.name, "status update failed: {e}");
                }
            }
        }
        for w in &computed.warnings {
            let key = (w.uid.clone(), w.problem.annotation, w.problem.value.clone());
            if self.warned.contains(&key) {
                continue;
            }
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &w.namespace);
            let Ok(Some(pod)) = pods.get_opt(&w.pod).await else {
                continue;
            };
            let note = format!(
                "pod {}/{}: {}; using the MrcpServer's defaultResources",
                w.namespace, w.pod, w.problem
            );
            warn!("{note}");
            let ev = KubeEvent {
                type_: EventType::Warning,
                reason: "InvalidCapacityAnnotation".into(),
                note: Some(note),
                action: "Register".into(),
                secondary: None,
            };
            match self.recorder.publish(&ev, &pod.object_ref(&())).await {
                Ok(()) => {
                    self.warned.insert(key);
                }
                Err(e) => {
                    self.metrics.error("event");
                    warn!("event for pod {}/{} failed: {e}", w.namespace, w.pod);
                }
            }
        }
    }
}

/// The status with its Ready condition; the transition time stays as it was while the
/// condition's status does not change.
fn with_condition(obj: &MrcpServer, view: &ServerView) -> crate::crd::MrcpServerStatus {
    let (ok, reason, message) = &view.ready;
    let status_str = if *ok { "True" } else { "False" };
    let previous = obj
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .filter(|c| c.status == status_str)
        .map(|c| c.last_transition_time.clone());
    let mut status = view.status.clone();
    status.conditions = vec![Condition {
        type_: "Ready".into(),
        status: status_str.into(),
        reason: (*reason).into(),
        message: message.clone(),
        observed_generation: obj.metadata.generation,
        last_transition_time: previous.unwrap_or(Time(Timestamp::now())),
    }];
    status
}

async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m = metrics.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced\n")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = m.encode();
                async move { text }
            }),
        );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn debug_output_hides_the_admin_token() {
        let s = Settings {
            namespace: None,
            proxy_selector: None,
            proxy_namespace: None,
            proxy_admin_port: 8081,
            proxy_urls: vec![],
            proxy_cluster_port: Some(7070),
            token: Some("s3cr3t-admin-token".into()),
            listen: "127.0.0.1:8080".parse().unwrap(),
            resync: Duration::from_secs(10),
            lease: None,
        };
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("token: Some(\"<redacted>\")"), "{shown}");
        assert!(shown.contains("proxy_admin_port: 8081"), "{shown}");
    }

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
