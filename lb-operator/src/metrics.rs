//! The operator's Prometheus metrics.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::error::Error;
use crate::model::{self, ServerView, Standing};

pub struct Metrics {
    pub registry: Registry,
    /// Recomputations of the destination set (one per batch of watch events).
    pub reconciles: IntCounter,
    /// Errors by kind: push, status, event, lease.
    pub errors: IntCounterVec,
    /// From the set being computed to a proxy acknowledging it.
    pub push_latency: Histogram,
    pub pushes: IntCounterVec,
    pub proxies: IntGauge,
    pub proxies_in_sync: IntGauge,
    pub destinations: IntGauge,
    /// Proxy cluster addresses in the current set's `peers` (0 when no list is pushed).
    pub cluster_peers: IntGauge,
    pub set_version: IntGauge,
    pub leader: IntGauge,
    /// Reads of a proxy's live load (`GET /v1/destinations`) by result (ok, error).
    pub load_reads: IntCounterVec,
    /// Proxy replicas whose load is in the statuses' `resources[].load`.
    pub load_proxies_answered: IntGauge,
    /// Per MrcpServer: what its status says, for dashboards and autoscalers.
    pub servers: ServerMetrics,
}

/// The per-MrcpServer series, set by the leader from the statuses it writes (a follower
/// exports none, so a sum over operator replicas counts each server once). Every proxy
/// replica's own sessions are summed (never the cluster load each also reports), so they count
/// once too.
pub struct ServerMetrics {
    /// `mrcp_lb_server_utilization{namespace,mrcpserver,resource}`: live sessions over the
    /// capacity of the ready destinations (1 with sessions and no capacity; 0 with neither).
    pub utilization: GaugeVec,
    pub load: IntGaugeVec,
    pub capacity: IntGaugeVec,
    pub active_sessions: IntGaugeVec,
    pub destinations: IntGaugeVec,
    /// The label sets set in the last update, so that those of servers and resources gone
    /// are removed.
    shown: Mutex<Shown>,
}

#[derive(Default)]
struct Shown {
    per_resource: BTreeSet<[String; 3]>,
    per_server: BTreeSet<[String; 2]>,
}

const DESTINATION_STATES: [&str; 3] = ["ready", "down", "draining"];

impl ServerMetrics {
    fn new() -> ServerMetrics {
        let per_resource = ["namespace", "mrcpserver", "resource"];
        let per_server = ["namespace", "mrcpserver"];
        ServerMetrics {
            utilization: must(GaugeVec::new(
                Opts::new(
                    "mrcp_lb_server_utilization",
                    "Live sessions over the capacity of the ready destinations of an MrcpServer, \
                     per resource (0 to 1; 1 when sessions remain and no capacity does).",
                ),
                &per_resource,
            )),
            load: must(IntGaugeVec::new(
                Opts::new(
                    "mrcp_lb_server_load",
                    "Live sessions on an MrcpServer's destinations per resource, summed over \
                     the proxy replicas.",
                ),
                &per_resource,
            )),
            capacity: must(IntGaugeVec::new(
                Opts::new(
                    "mrcp_lb_server_capacity",
                    "Capacity of an MrcpServer's ready destinations per resource.",
                ),
                &per_resource,
            )),
            active_sessions: must(IntGaugeVec::new(
                Opts::new(
                    "mrcp_lb_server_active_sessions",
                    "Open sessions (dialogs) on an MrcpServer's destinations, summed over the \
                     proxy replicas.",
                ),
                &per_server,
            )),
            destinations: must(IntGaugeVec::new(
                Opts::new(
                    "mrcp_lb_server_destinations",
                    "An MrcpServer's destinations by state: ready (takes calls), down (not \
                     Ready, or called down by the proxies), draining.",
                ),
                &["namespace", "mrcpserver", "state"],
            )),
            shown: Mutex::new(Shown::default()),
        }
    }

    /// Sets the series from the statuses (as written), removing those of servers and
    /// resources gone. The load series exist only while some proxy replica answers.
    pub fn update(&self, views: &[ServerView]) {
        let mut shown = self.shown.lock().unwrap_or_else(|p| p.into_inner());
        let mut per_resource = BTreeSet::new();
        let mut per_server = BTreeSet::new();
        for v in views.iter().filter(|v| v.invalid.is_none()) {
            let (ns, name) = (v.namespace.as_str(), v.name.as_str());
            per_server.insert([ns.to_string(), name.to_string()]);
            let mut counts = [0i64; 3];
            for d in &v.status.destinations {
                match Standing::of(d) {
                    Standing::Ready => counts[0] += 1,
                    Standing::NotReady | Standing::CalledDown => counts[1] += 1,
                    Standing::Draining => counts[2] += 1,
                }
            }
            for (state, n) in DESTINATION_STATES.iter().zip(counts) {
                self.destinations
                    .with_label_values(&[ns, name, state])
                    .set(n);
            }
            match v.status.active_sessions {
                Some(n) => self
                    .active_sessions
                    .with_label_values(&[ns, name])
                    .set(i64::try_from(n).unwrap_or(i64::MAX)),
                None => {
                    let _ = self.active_sessions.remove_label_values(&[ns, name]);
                }
            }
            for r in &v.status.resources {
                let labels = [ns, name, r.name.as_str()];
                per_resource.insert(labels.map(str::to_string));
                self.capacity
                    .with_label_values(&labels)
                    .set(i64::try_from(r.capacity).unwrap_or(i64::MAX));
                match r.load {
                    Some(l) => {
                        self.load
                            .with_label_values(&labels)
                            .set(i64::try_from(l).unwrap_or(i64::MAX));
                        self.utilization
                            .with_label_values(&labels)
                            .set(model::utilization(l, r.capacity));
                    }
                    None => {
                        let _ = self.load.remove_label_values(&labels);
                        let _ = self.utilization.remove_label_values(&labels);
                    }
                }
            }
        }
        for gone in shown.per_resource.difference(&per_resource) {
            let labels = [gone[0].as_str(), gone[1].as_str(), gone[2].as_str()];
            let _ = self.capacity.remove_label_values(&labels);
            let _ = self.load.remove_label_values(&labels);
            let _ = self.utilization.remove_label_values(&labels);
        }
        for gone in shown.per_server.difference(&per_server) {
            let _ = self
                .active_sessions
                .remove_label_values(&[gone[0].as_str(), gone[1].as_str()]);
            for state in DESTINATION_STATES {
                let _ = self.destinations.remove_label_values(&[
                    gone[0].as_str(),
                    gone[1].as_str(),
                    state,
                ]);
            }
        }
        *shown = Shown {
            per_resource,
            per_server,
        };
    }

    /// Removes every series (this replica stopped leading).
    pub fn clear(&self) {
        self.update(&[]);
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric names and labels are constants in this file: a failure is a programming error.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reconciles = must(IntCounter::new(
            "mrcp_lb_operator_reconciles_total",
            "Recomputations of the destination set.",
        ));
        let errors = must(IntCounterVec::new(
            Opts::new(
                "mrcp_lb_operator_errors_total",
                "Errors by kind (push, status, event, lease).",
            ),
            &["kind"],
        ));
        let push_latency = must(Histogram::with_opts(
            HistogramOpts::new(
                "mrcp_lb_operator_push_latency_seconds",
                "Time from a destination set being computed to a proxy acknowledging it.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        ));
        let pushes = must(IntCounterVec::new(
            Opts::new(
                "mrcp_lb_operator_pushes_total",
                "Pushes to proxies by result (ok, conflict, error).",
            ),
            &["result"],
        ));
        let proxies = must(IntGauge::new(
            "mrcp_lb_operator_proxies",
            "Proxy replicas known.",
        ));
        let proxies_in_sync = must(IntGauge::new(
            "mrcp_lb_operator_proxies_in_sync",
            "Proxy replicas holding the current destination set.",
        ));
        let destinations = must(IntGauge::new(
            "mrcp_lb_operator_destinations",
            "Destinations in the current set.",
        ));
        let cluster_peers = must(IntGauge::new(
            "mrcp_lb_operator_cluster_peers",
            "Proxy replicas' cluster addresses in the current destination set's peers.",
        ));
        let set_version = must(IntGauge::new(
            "mrcp_lb_operator_destination_set_version",
            "Version of the current destination set.",
        ));
        let leader = must(IntGauge::new(
            "mrcp_lb_operator_leader",
            "1 while this replica holds the leader lease.",
        ));
        let load_reads = must(IntCounterVec::new(
            Opts::new(
                "mrcp_lb_operator_load_reads_total",
                "Reads of a proxy's live load for the MrcpServer statuses, by result (ok, error).",
            ),
            &["result"],
        ));
        let load_proxies_answered = must(IntGauge::new(
            "mrcp_lb_operator_load_proxies_answered",
            "Proxy replicas whose live load is in the MrcpServer statuses.",
        ));
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(push_latency.clone()),
            Box::new(pushes.clone()),
            Box::new(proxies.clone()),
            Box::new(proxies_in_sync.clone()),
            Box::new(destinations.clone()),
            Box::new(cluster_peers.clone()),
            Box::new(set_version.clone()),
            Box::new(leader.clone()),
            Box::new(load_reads.clone()),
            Box::new(load_proxies_answered.clone()),
        ] {
            must(registry.register(c));
        }
        let servers = ServerMetrics::new();
        for c in [
            Box::new(servers.utilization.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(servers.load.clone()),
            Box::new(servers.capacity.clone()),
            Box::new(servers.active_sessions.clone()),
            Box::new(servers.destinations.clone()),
        ] {
            must(registry.register(c));
        }
        Metrics {
            registry,
            reconciles,
            errors,
            push_latency,
            pushes,
            proxies,
            proxies_in_sync,
            destinations,
            cluster_peers,
            set_version,
            leader,
            load_reads,
            load_proxies_answered,
            servers,
        }
    }

    /// Counts `e` in `mrcp_lb_operator_errors_total`, under its [`Error::metric_label`].
    pub fn error(&self, e: &Error) {
        self.errors.with_label_values(&[e.metric_label()]).inc();
    }

    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DestinationEntry, MrcpServerStatus, ResourceUsage};

    fn view(name: &str, load: Option<u64>, states: &[&str]) -> ServerView {
        let destinations = states
            .iter()
            .enumerate()
            .map(|(i, s)| DestinationEntry {
                pod: format!("{name}-{i}"),
                id: format!("speech/{name}-{i}@{i}"),
                uri: String::new(),
                resources: "pstn=10".into(),
                state: s.to_string(),
                proxy_state: None,
                proxy_reason: None,
                sessions: None,
            })
            .collect();
        ServerView {
            namespace: "speech".into(),
            name: name.into(),
            status: MrcpServerStatus {
                resources: vec![ResourceUsage {
                    name: "pstn".into(),
                    capacity: 20,
                    load,
                    utilization_percent: None,
                }],
                active_sessions: load,
                destinations,
                ..Default::default()
            },
            ready: (true, "", String::new()),
            matched: 0,
            held_by: Default::default(),
            invalid: None,
        }
    }

    fn series(m: &Metrics) -> Vec<String> {
        m.encode()
            .lines()
            .filter(|l| l.starts_with("mrcp_lb_server_"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn server_series_follow_the_statuses_and_go_with_their_server() {
        let m = Metrics::new();
        m.servers.update(&[
            view("asr", Some(5), &["active", "active", "draining"]),
            view("tts", None, &["down"]),
        ]);
        let s = series(&m);
        let has = |line: &str| s.iter().any(|l| l == line);
        assert!(
            has(
                r#"mrcp_lb_server_utilization{mrcpserver="asr",namespace="speech",resource="pstn"} 0.25"#
            ),
            "{s:#?}"
        );
        assert!(has(
            r#"mrcp_lb_server_active_sessions{mrcpserver="asr",namespace="speech"} 5"#
        ));
        assert!(has(
            r#"mrcp_lb_server_destinations{mrcpserver="asr",namespace="speech",state="draining"} 1"#
        ));
        assert!(has(
            r#"mrcp_lb_server_capacity{mrcpserver="tts",namespace="speech",resource="pstn"} 20"#
        ));
        // No load known for tts: no utilization, rather than a 0 an autoscaler would trust.
        assert!(
            !s.iter()
                .any(|l| l.contains(r#"utilization{mrcpserver="tts""#)),
            "{s:#?}"
        );
        m.servers.update(&[view("tts", Some(0), &["active"])]);
        let s = series(&m);
        assert!(
            !s.iter().any(|l| l.contains(r#"mrcpserver="asr""#)),
            "{s:#?}"
        );
        m.servers.clear();
        assert!(series(&m).is_empty(), "{:#?}", series(&m));
    }
}
