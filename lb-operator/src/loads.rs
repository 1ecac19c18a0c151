//! Reading the live load from every proxy replica (`GET /v1/destinations`, the proxy's own
//! JSON types), for the `resources[].load` of the MrcpServer statuses.
//!
//! One task reads every replica at once, each read bounded by [`READ_TIMEOUT`], once per
//! interval (`--load-interval-seconds`, 5 s), and publishes the sum only when it changed: the
//! loop never waits on a proxy, and a status changes for load at most once per interval.
//!
//! Each replica reports `load` (the sessions it set up itself) and `clusterLoad` (its own plus
//! its peers'); only `load` is summed, so a session counts once whichever replica holds it.
//! A replica that does not answer keeps its last answer for [`STALE_AFTER_INTERVALS`]
//! intervals (a slow answer or a restart does not make the load jump), then drops out of the
//! sum; a replica no longer listed drops out at once. [`ProxyLoads::answered`] says how many
//! are in the sum.
//!
//! The reads carry the admin token when the operator has one: a proxy with
//! `admin.protectReads` needs it, and the pushes send it anyway.

use lb_api::admin::{DestinationsStatus, State};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::settings::Settings;

/// The longest one read of one replica may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// A replica's last answer counts this many intervals after it was read.
pub const STALE_AFTER_INTERVALS: u32 = 3;

/// What the proxy replicas that answered say about one destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestinationLoad {
    /// Live sessions per resource, summed over the replicas.
    pub resources: BTreeMap<String, u64>,
    /// Open calls (dialogs), summed over the replicas.
    pub open_calls: u64,
    /// The proxies' view of it: the most severe state a replica reports (down, then
    /// disabled, then draining, then up), with that replica's reason; None when no answering
    /// replica lists it.
    pub view: Option<(State, String)>,
}

/// Live sessions and the proxies' view per destination id, summed over the replicas that
/// answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyLoads {
    pub by_destination: BTreeMap<String, DestinationLoad>,
    /// Replicas listed when the loads were read.
    pub proxies: u32,
    /// Of those, the replicas whose counts are in `by_destination`.
    pub answered: u32,
}

/// One replica's answer about one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    /// Its own load per resource.
    pub resources: BTreeMap<String, u64>,
    /// Its own open calls.
    pub open_calls: u64,
    pub state: State,
    pub reason: String,
}

/// One replica's counts: destination id → what it says about it.
pub type Counts = BTreeMap<String, Count>;

/// The counts of one answer: each destination's `load` per resource (`clusterLoad`, which
/// includes the peers' sessions, is left out), its open calls and its state. A destination
/// the replica shows only until its calls end (`removed`) counts for its sessions, not for
/// its state.
pub fn counts(status: &DestinationsStatus) -> Counts {
    status
        .destinations
        .iter()
        .map(|d| {
            let resources = d
                .resources
                .iter()
                .map(|r| (r.name.clone(), u64::from(r.load)))
                .collect();
            let count = Count {
                resources,
                open_calls: u64::from(d.open_calls),
                state: if d.removed { State::Draining } else { d.state },
                reason: d.reason.clone(),
            };
            (d.id.clone(), count)
        })
        .collect()
}

/// How bad a state is for the proxies' view: the most severe one a replica reports wins. A
/// state that only repeats the set (a replica a push behind) weighs nothing.
fn severity(s: State, reason: &str) -> u8 {
    if lb_api::admin::reason_is_from_set(reason) {
        return 0;
    }
    match s {
        State::Up => 0,
        State::Draining => 1,
        State::Disabled => 2,
        State::Down => 3,
    }
}

/// A replica's last answer and when it came.
#[derive(Debug, Clone)]
pub struct Reading {
    pub at: Instant,
    pub counts: Counts,
}

/// The sum over the listed replicas whose last answer is at most `stale_after` old.
pub fn aggregate(
    proxies: &BTreeSet<String>,
    readings: &HashMap<String, Reading>,
    now: Instant,
    stale_after: Duration,
) -> ProxyLoads {
    let mut out = ProxyLoads {
        proxies: u32::try_from(proxies.len()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    for url in proxies {
        let Some(r) = readings.get(url) else { continue };
        if now.saturating_duration_since(r.at) > stale_after {
            continue;
        }
        out.answered += 1;
        for (id, count) in &r.counts {
            let sums = out.by_destination.entry(id.clone()).or_default();
            for (name, load) in &count.resources {
                let s = sums.resources.entry(name.clone()).or_default();
                *s = s.saturating_add(*load);
            }
            sums.open_calls = sums.open_calls.saturating_add(count.open_calls);
            if sums
                .view
                .as_ref()
                .is_none_or(|(s, r)| severity(count.state, &count.reason) > severity(*s, r))
            {
                sums.view = Some((count.state, count.reason.clone()));
            }
        }
    }
    out
}

/// The loop's side of the reader.
pub struct LoadHandle {
    /// The replicas to read (admin base URLs); None until the loop has listed them once.
    pub proxies: watch::Sender<Option<BTreeSet<String>>>,
    /// The latest sum; None until the first round of reads.
    pub loads: watch::Receiver<Option<Arc<ProxyLoads>>>,
}

impl LoadHandle {
    /// A handle whose reader never reports (`--load-interval-seconds 0`): statuses carry no
    /// load.
    pub fn off() -> LoadHandle {
        let (proxies, _) = watch::channel(None);
        let (_, loads) = watch::channel(None);
        LoadHandle { proxies, loads }
    }
}

pub struct LoadReader {
    http: reqwest::Client,
    token: Option<String>,
    interval: Duration,
    metrics: Arc<Metrics>,
}

impl LoadReader {
    /// Starts the reader (when `settings.load_interval` is set); it ends at `shutdown`.
    pub fn spawn(
        settings: &Settings,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<LoadHandle, Error> {
        let Some(interval) = settings.load_interval else {
            return Ok(LoadHandle::off());
        };
        let (proxies, proxies_rx) = watch::channel(None);
        let (loads_tx, loads) = watch::channel(None);
        let reader = LoadReader {
            http: crate::proxy_http::client(settings)?,
            token: settings.token.clone(),
            interval,
            metrics,
        };
        tokio::spawn(reader.run(proxies_rx, loads_tx, shutdown));
        Ok(LoadHandle { proxies, loads })
    }

    async fn run(
        self,
        mut proxies: watch::Receiver<Option<BTreeSet<String>>>,
        out: watch::Sender<Option<Arc<ProxyLoads>>>,
        shutdown: CancellationToken,
    ) {
        let stale_after = self.interval * STALE_AFTER_INTERVALS;
        let mut readings: HashMap<String, Reading> = HashMap::new();
        // Replicas whose last read failed, so that a replica down for long logs once.
        let mut failing: BTreeSet<String> = BTreeSet::new();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let Some(urls) = proxies.borrow_and_update().clone() else {
                // Not listed yet: read as soon as the loop lists them.
                tokio::select! {
                    r = proxies.changed() => if r.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
                tick.reset_immediately();
                continue;
            };
            readings.retain(|url, _| urls.contains(url));
            failing.retain(|url| urls.contains(url));
            let answers =
                futures::future::join_all(urls.iter().map(|url| self.read(url.clone()))).await;
            let now = Instant::now();
            for (url, answer) in answers {
                match answer {
                    Ok(counts) => {
                        self.metrics.load_reads.with_label_values(&["ok"]).inc();
                        if failing.remove(&url) {
                            info!(proxy = %url, "proxy answers load reads again");
                        }
                        readings.insert(url, Reading { at: now, counts });
                    }
                    Err(e) => {
                        self.metrics.load_reads.with_label_values(&["error"]).inc();
                        let kept = readings.contains_key(&url);
                        if failing.insert(url.clone()) {
                            warn!(
                                proxy = %url,
                                "load read failed ({e}); {} for up to {stale_after:?}",
                                if kept { "its last answer counts" } else { "no load from it" }
                            );
                        } else {
                            debug!(proxy = %url, "load read failed: {e}");
                        }
                    }
                }
            }
            let sum = aggregate(&urls, &readings, now, stale_after);
            self.metrics
                .load_proxies_answered
                .set(i64::from(sum.answered));
            out.send_if_modified(|old| {
                let changed = old.as_deref() != Some(&sum);
                if changed {
                    debug!(
                        proxies = sum.proxies,
                        answered = sum.answered,
                        "proxy loads changed"
                    );
                    *old = Some(Arc::new(sum));
                }
                changed
            });
        }
    }

    /// One replica's counts, or why not, within [`READ_TIMEOUT`].
    async fn read(&self, url: String) -> (String, Result<Counts, String>) {
        let mut req = self
            .http
            .get(format!("{url}/v1/destinations"))
            .timeout(READ_TIMEOUT);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let answer = async {
            let resp = req.send().await.map_err(|e| e.to_string())?;
            let status = resp.status();
            if !status.is_success() {
                return Err(format!("answered {status}"));
            }
            let body: DestinationsStatus = resp.json().await.map_err(|e| e.to_string())?;
            Ok(counts(&body))
        }
        .await;
        (url, answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_api::admin::DestinationStatus;

    /// A destination as a proxy reports it (from its JSON, so that fields the proxy adds
    /// later with a default do not break the test).
    fn dest(id: &str, resources: &[(&str, u32, u32)]) -> DestinationStatus {
        dest_in(id, resources, "up", "", 0)
    }

    fn dest_in(
        id: &str,
        resources: &[(&str, u32, u32)],
        state: &str,
        reason: &str,
        open_calls: u32,
    ) -> DestinationStatus {
        let resources: Vec<serde_json::Value> = resources
            .iter()
            .map(|(name, load, cluster_load)| {
                serde_json::json!({
                    "name": name, "capacity": 100, "load": load, "clusterLoad": cluster_load,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "id": id,
            "group": 1,
            "uri": "sip:127.0.0.1:8060",
            "address": null,
            "state": state,
            "reason": reason,
            "removed": false,
            "resources": resources,
            "openCalls": open_calls,
            "calls": 0,
            "probe": {
                "mode": 2, "sent": 0, "succeeded": 0, "failed": 0, "consecutiveSuccesses": 0,
                "consecutiveFailures": 0, "latencyMs": null, "lastCode": null,
            },
            "lastChange": 0,
        }))
        .unwrap()
    }

    fn answer(dests: Vec<DestinationStatus>) -> Counts {
        counts(&DestinationsStatus {
            version: 1,
            updated: 0,
            destinations: dests,
        })
    }

    fn urls(u: &[&str]) -> BTreeSet<String> {
        u.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn each_replica_counts_its_own_load_never_the_cluster_load() {
        // Two replicas sharing load: each sees 3 sessions on asr-0 (clusterLoad), of which
        // it set up 2 and 1.
        let t0 = Instant::now();
        let readings = HashMap::from([
            (
                "http://a".to_string(),
                Reading {
                    at: t0,
                    counts: answer(vec![dest(
                        "ns/asr-0@1",
                        &[("speechrecog", 2, 3), ("speechsynth", 0, 1)],
                    )]),
                },
            ),
            (
                "http://b".to_string(),
                Reading {
                    at: t0,
                    counts: answer(vec![
                        dest(
                            "ns/asr-0@1",
                            &[("speechrecog", 1, 3), ("speechsynth", 1, 1)],
                        ),
                        dest("ns/tts-0@2", &[("speechsynth", 4, 4)]),
                    ]),
                },
            ),
        ]);
        let sum = aggregate(
            &urls(&["http://a", "http://b"]),
            &readings,
            t0,
            Duration::from_secs(15),
        );
        assert_eq!((sum.proxies, sum.answered), (2, 2));
        let asr = &sum.by_destination["ns/asr-0@1"];
        assert_eq!(asr.resources["speechrecog"], 3, "2 + 1, not 3 + 3");
        assert_eq!(asr.resources["speechsynth"], 1);
        assert_eq!(sum.by_destination["ns/tts-0@2"].resources["speechsynth"], 4);
    }

    #[test]
    fn a_silent_replica_counts_until_its_answer_is_stale_and_an_unlisted_one_not_at_all() {
        let t0 = Instant::now();
        let stale_after = Duration::from_secs(15);
        let readings = HashMap::from([
            (
                "http://a".to_string(),
                Reading {
                    at: t0,
                    counts: answer(vec![dest("d", &[("speechrecog", 2, 2)])]),
                },
            ),
            (
                "http://old".to_string(),
                Reading {
                    at: t0,
                    counts: answer(vec![dest("d", &[("speechrecog", 5, 5)])]),
                },
            ),
        ]);
        let listed = urls(&["http://a", "http://silent"]);
        let fresh = aggregate(
            &listed,
            &readings,
            t0 + Duration::from_secs(15),
            stale_after,
        );
        assert_eq!((fresh.proxies, fresh.answered), (2, 1));
        assert_eq!(fresh.by_destination["d"].resources["speechrecog"], 2);
        let stale = aggregate(
            &listed,
            &readings,
            t0 + Duration::from_secs(16),
            stale_after,
        );
        assert_eq!((stale.proxies, stale.answered), (2, 0));
        assert!(stale.by_destination.is_empty());
    }

    #[test]
    fn equal_answers_give_equal_sums() {
        // The reader publishes only a changed sum: the same counts read later must compare
        // equal, whatever the time of the reading.
        let t0 = Instant::now();
        let reading = |at| {
            HashMap::from([(
                "http://a".to_string(),
                Reading {
                    at,
                    counts: answer(vec![dest("d", &[("speechrecog", 1, 1)])]),
                },
            )])
        };
        let listed = urls(&["http://a"]);
        let s = Duration::from_secs(15);
        assert_eq!(
            aggregate(&listed, &reading(t0), t0, s),
            aggregate(&listed, &reading(t0 + s), t0 + s, s)
        );
    }

    #[test]
    fn open_calls_add_up_and_the_most_severe_state_a_replica_reports_is_the_view() {
        let t0 = Instant::now();
        let reading = |dests| Reading {
            at: t0,
            counts: answer(dests),
        };
        let readings = HashMap::from([
            (
                "http://a".to_string(),
                reading(vec![
                    dest_in("d", &[("pstn", 2, 3)], "up", "", 2),
                    dest_in("e", &[("pstn", 0, 0)], "draining", "manual", 0),
                ]),
            ),
            (
                "http://b".to_string(),
                reading(vec![
                    dest_in("d", &[("pstn", 1, 3)], "down", "probe failures", 1),
                    dest_in("e", &[("pstn", 0, 0)], "up", "", 0),
                ]),
            ),
        ]);
        let sum = aggregate(
            &urls(&["http://a", "http://b"]),
            &readings,
            t0,
            Duration::from_secs(15),
        );
        let d = &sum.by_destination["d"];
        assert_eq!(d.open_calls, 3);
        assert_eq!(d.view, Some((State::Down, "probe failures".to_string())));
        assert_eq!(
            sum.by_destination["e"].view,
            Some((State::Draining, "manual".to_string()))
        );
    }
}
