//! Delivering the destination set to every proxy replica through its admin API
//! (`PUT /v1/destinations`, the proxy's own JSON types).
//!
//! One task per proxy holds the latest set and pushes it when it changes, and again every
//! resync period (a proxy that restarted, or missed a push, catches up: the proxy treats the
//! same version with the same content as a no-op). Failures retry with exponential backoff.
//! Proxies come and go: the task set follows the discovered list.

use lb_api::DestinationSet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::settings::Settings;

/// The set to push and when it was computed (for the latency metric).
#[derive(Debug, Clone)]
pub struct Desired {
    pub set: Arc<DestinationSet>,
    pub computed: Instant,
}

#[derive(Clone)]
pub struct Pusher {
    pub http: reqwest::Client,
    pub token: Option<Arc<str>>,
    pub resync: Duration,
    pub metrics: Arc<Metrics>,
    /// Highest version a proxy reported in a conflict: the next set must be newer.
    pub floor: Arc<std::sync::atomic::AtomicU64>,
    /// The proxies whose last push failed, with the error.
    pub failing: Failing,
}

/// Proxy admin URL → the error of its last push, for the proxies whose last push failed.
pub type Failing = Arc<Mutex<BTreeMap<String, String>>>;

/// The loop's side of the pushers: where it hands the newest set and the proxy list.
pub struct PushHandle {
    pub desired: watch::Sender<Option<Desired>>,
    /// The proxies' admin base URLs.
    pub proxies: watch::Sender<BTreeSet<String>>,
    /// [`Pusher::floor`]: the next set must be versioned above it.
    pub floor: Arc<std::sync::atomic::AtomicU64>,
    /// [`Pusher::failing`]: what the Events say about proxies that do not take the set.
    pub failing: Failing,
}

struct ProxyTask {
    handle: JoinHandle<()>,
    in_sync: Arc<AtomicBool>,
}

impl Pusher {
    /// Starts the pushers for the `--proxy-url` proxies (the loop adds the discovered ones);
    /// they push while `leading` is true.
    pub fn spawn(
        settings: &Settings,
        metrics: Arc<Metrics>,
        leading: watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) -> Result<PushHandle, Error> {
        let (desired, desired_rx) = watch::channel::<Option<Desired>>(None);
        let (proxies, proxies_rx) =
            watch::channel::<BTreeSet<String>>(settings.proxy_urls.iter().cloned().collect());
        let pusher = Pusher {
            http: crate::proxy_http::client(settings)?,
            token: settings.token.clone().map(Arc::from),
            resync: settings.resync,
            metrics,
            floor: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            failing: Failing::default(),
        };
        let floor = pusher.floor.clone();
        let failing = pusher.failing.clone();
        tokio::spawn(pusher.run(desired_rx, proxies_rx, leading, shutdown));
        Ok(PushHandle {
            desired,
            proxies,
            floor,
            failing,
        })
    }

    /// Follows the proxy list: one push task per proxy base URL (e.g. `http://10.1.2.3:8081`).
    /// Pushes happen only while `enabled` is true (this replica leads).
    pub async fn run(
        self,
        mut desired: watch::Receiver<Option<Desired>>,
        mut proxies: watch::Receiver<BTreeSet<String>>,
        enabled: watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) {
        let mut tasks: BTreeMap<String, ProxyTask> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            let urls = proxies.borrow_and_update().clone();
            tasks.retain(|url, t| {
                let keep = urls.contains(url);
                if !keep {
                    info!(proxy = %url, "proxy gone");
                    t.handle.abort();
                    self.set_failing(url, None);
                }
                keep
            });
            for url in urls {
                if let std::collections::btree_map::Entry::Vacant(slot) = tasks.entry(url) {
                    let url = slot.key().clone();
                    info!(proxy = %url, "proxy found");
                    let in_sync = Arc::new(AtomicBool::new(false));
                    let handle = tokio::spawn(self.clone().push_loop(
                        url,
                        desired.clone(),
                        enabled.clone(),
                        in_sync.clone(),
                        shutdown.clone(),
                    ));
                    slot.insert(ProxyTask { handle, in_sync });
                }
            }
            self.metrics.proxies.set(tasks.len() as i64);
            let synced = tasks
                .values()
                .filter(|t| t.in_sync.load(Ordering::Relaxed))
                .count();
            self.metrics.proxies_in_sync.set(synced as i64);
            tokio::select! {
                r = proxies.changed() => if r.is_err() { break },
                _ = desired.changed() => {}
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
        }
        for t in tasks.values() {
            t.handle.abort();
        }
    }

    async fn push_loop(
        self,
        url: String,
        mut desired: watch::Receiver<Option<Desired>>,
        mut enabled: watch::Receiver<bool>,
        in_sync: Arc<AtomicBool>,
        shutdown: CancellationToken,
    ) {
        let mut acked: Option<u64> = None;
        let mut backoff = Duration::from_millis(100);
        let mut last_push = Instant::now();
        loop {
            let current = desired.borrow_and_update().clone();
            let leading = *enabled.borrow_and_update();
            let due = match (&current, acked) {
                (Some(d), Some(v)) => d.set.version != v || last_push.elapsed() >= self.resync,
                (Some(_), None) => true,
                (None, _) => false,
            };
            let mut wait = self.resync;
            if let (true, true, Some(d)) = (leading, due, &current) {
                last_push = Instant::now();
                match self.put(&url, &d.set).await {
                    Ok(()) => {
                        if acked != Some(d.set.version) {
                            self.metrics
                                .push_latency
                                .observe(d.computed.elapsed().as_secs_f64());
                            debug!(proxy = %url, version = d.set.version, "set pushed");
                        }
                        self.metrics.pushes.with_label_values(&["ok"]).inc();
                        acked = Some(d.set.version);
                        in_sync.store(true, Ordering::Relaxed);
                        self.set_failing(&url, None);
                        backoff = Duration::from_millis(100);
                    }
                    Err(e) => {
                        if let PushError::Conflict(_) = e {
                            // The proxy holds a newer version (a previous leader with a clock
                            // ahead of ours): the next set is versioned above it.
                            if let Some(v) = self.version_of(&url).await {
                                self.floor.fetch_max(v, Ordering::Relaxed);
                            }
                        }
                        in_sync.store(false, Ordering::Relaxed);
                        self.metrics.pushes.with_label_values(&[e.label()]).inc();
                        let e = Error::Push(e);
                        self.metrics.error(&e);
                        self.set_failing(&url, Some(e.to_string()));
                        warn!(proxy = %url, "push failed, retrying in {backoff:?}: {e}");
                        wait = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            } else if !leading {
                in_sync.store(false, Ordering::Relaxed);
                self.set_failing(&url, None);
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                r = desired.changed() => if r.is_err() { return },
                r = enabled.changed() => if r.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
        }
    }

    fn set_failing(&self, url: &str, error: Option<String>) {
        // A poisoned lock only means a panic elsewhere mid-update: the map is still a map.
        let mut failing = self
            .failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match error {
            Some(e) => {
                failing.insert(url.to_string(), e);
            }
            None => {
                failing.remove(url);
            }
        }
    }

    async fn version_of(&self, url: &str) -> Option<u64> {
        let mut req = self
            .http
            .get(format!("{url}/v1/destinations"))
            .timeout(Duration::from_secs(5));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.ok()?;
        let status: lb_api::admin::DestinationsStatus = resp.json().await.ok()?;
        Some(status.version)
    }

    async fn put(&self, url: &str, set: &DestinationSet) -> Result<(), PushError> {
        let mut req = self
            .http
            .put(format!("{url}/v1/destinations"))
            .timeout(Duration::from_secs(5))
            .json(set);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| PushError::Http(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        if status == reqwest::StatusCode::CONFLICT {
            return Err(PushError::Conflict(body));
        }
        Err(PushError::Rejected(status.as_u16(), body))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    Http(String),
    #[error("version conflict: {0}")]
    Conflict(String),
    #[error("rejected with {0}: {1}")]
    Rejected(u16, String),
}

impl PushError {
    pub fn label(&self) -> &'static str {
        match self {
            PushError::Http(_) => "error",
            PushError::Conflict(_) => "conflict",
            PushError::Rejected(..) => "rejected",
        }
    }
}
