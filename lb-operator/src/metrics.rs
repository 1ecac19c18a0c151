//! The operator's Prometheus metrics.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::error::Error;

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
