//! Prometheus metrics. Counters and histograms are updated where things happen (atomics, no
//! lock on the call path); per-destination gauges are filled from a snapshot of the core at
//! scrape time, so a removed destination disappears from the output with its last call.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::sip::{Method, ParseError};

/// Every metric the proxy exports.
pub struct Metrics {
    pub registry: Registry,
    pub dialogs_active: IntGauge,
    pub dialogs_early: IntGauge,
    pub dialogs_processed: IntCounter,
    pub dialogs_expired: IntCounter,
    pub dialogs_failed: IntCounter,
    /// `mrcp_lb_dialogs_ended_total{reason="admin"}`: dialogs ended through the admin API.
    pub dialogs_ended_admin: IntCounter,
    requests: IntCounterVec,
    /// Pre-resolved children of `requests` for the methods of a normal call.
    req_invite: IntCounter,
    req_ack: IntCounter,
    req_bye: IntCounter,
    req_cancel: IntCounter,
    req_options: IntCounter,
    req_other: IntCounter,
    responses: [IntCounter; 6],
    pub malformed: IntCounter,
    pub malformed_streams: IntCounter,
    pub routed: IntCounter,
    pub failovers: IntCounter,
    pub rejected_no_capacity: IntCounter,
    /// SDP routing: new INVITEs by what their offer gave (channels, fallback, refused, bad).
    pub sdp_offers: IntCounterVec,
    /// SDP routing: MRCPv2 channels settled by an answer, accepted or rejected.
    pub sdp_channels: IntCounterVec,
    /// Pre-resolved children of `sdp_offers` and `sdp_channels`, for the call path.
    pub sdp: SdpCounters,
    /// SDP routing: 406 answers that took a destination out for the session's resources.
    pub not_acceptable: IntCounter,
    /// Requests refused by an overload limit, by reason.
    pub limited_source_rate: IntCounter,
    pub limited_transactions: IntCounter,
    pub limited_dialogs: IntCounter,
    /// Requests with a To tag refused by the relay rule, by reason (the core creates every
    /// reason's series at start, so that each shows from 0).
    pub relay_refused: IntCounterVec,
    /// New requests let through untracked because the per-source table was full.
    pub rate_limit_untracked: IntCounter,
    /// Sources in the per-source table (set at scrape time).
    pub rate_limit_sources: IntGauge,
    pub tcp_connections: IntGauge,
    /// Events queued for the core (set at scrape time).
    pub event_queue: IntGauge,
    pub tcp_refused_total: IntCounter,
    pub tcp_refused_per_source: IntCounter,
    pub tcp_timeout_idle: IntCounter,
    pub tcp_timeout_message: IntCounter,
    /// TLS connections open (also counted in `tcp_connections`).
    pub tls_connections: IntGauge,
    /// Failed TLS handshakes: of accepted connections, of connections the proxy opened.
    pub tls_handshake_failed_accept: IntCounter,
    pub tls_handshake_failed_connect: IntCounter,
    pub invite_setup: Histogram,
    pub dest_capacity: IntGaugeVec,
    pub dest_load: IntGaugeVec,
    pub dest_not_acceptable: IntGaugeVec,
    pub dest_state: IntGaugeVec,
    pub dest_calls: IntGaugeVec,
    pub probes: IntCounterVec,
    pub probe_latency: prometheus::GaugeVec,
    pub set_version: IntGauge,
    pub set_updated: prometheus::Gauge,
    pub cluster: ClusterMetrics,
}

/// The children of the SDP routing counters, resolved once (a label lookup takes a lock).
pub struct SdpCounters {
    pub offers_channels: IntCounter,
    pub offers_fallback: IntCounter,
    pub offers_refused: IntCounter,
    pub offers_bad: IntCounter,
    pub channels_accepted: IntCounter,
    pub channels_rejected: IntCounter,
}

/// Load sharing between replicas.
pub struct ClusterMetrics {
    /// What routing sees per destination: this replica's load plus its live peers'.
    pub dest_load: IntGaugeVec,
    /// Configured peers by state: live (heard within peerTimeout) or silent.
    pub peers: IntGaugeVec,
    /// Age of the oldest local load change not yet acknowledged by every live peer.
    pub sync_lag: prometheus::Gauge,
    /// Seconds since each peer's last update.
    pub peer_age: prometheus::GaugeVec,
    pub updates: IntCounterVec,
    pub ends: IntCounterVec,
}

impl ClusterMetrics {
    fn new(r: &Registry) -> ClusterMetrics {
        let sync_lag = prometheus::Gauge::new(
            "mrcp_lb_cluster_sync_lag_seconds",
            "How long the oldest change of this replica's load has waited for every live \
             peer's acknowledgement (0: in sync).",
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        register(r, sync_lag.clone());
        let peer_age = prometheus::GaugeVec::new(
            Opts::new(
                "mrcp_lb_cluster_peer_last_update_seconds",
                "Seconds since the last update from each configured peer.",
            ),
            &["peer"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        register(r, peer_age.clone());
        ClusterMetrics {
            dest_load: gauge_vec(
                r,
                "mrcp_lb_destination_cluster_load",
                "Live dialogs on a destination's resource as routing sees them: this \
                 replica's plus its live peers'.",
                &["destination", "uri", "resource"],
            ),
            peers: gauge_vec(
                r,
                "mrcp_lb_cluster_peers",
                "Configured peer replicas by state (live: heard within peerTimeout).",
                &["state"],
            ),
            sync_lag,
            peer_age,
            updates: counter_vec(
                r,
                "mrcp_lb_cluster_updates_total",
                "Load updates exchanged with peers (sent, received, refused).",
                &["direction"],
            ),
            ends: counter_vec(
                r,
                "mrcp_lb_cluster_dialog_ends_total",
                "Dialogs ended through another replica: announced here, or applied here.",
                &["direction"],
            ),
        }
    }
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(r, c.clone());
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(r, g.clone());
    g
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(r, c.clone());
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(r, g.clone());
    g
}

fn register(r: &Registry, c: impl prometheus::core::Collector + 'static) {
    // Names are fixed in this file; a clash is a programming error caught by the tests.
    if let Err(e) = r.register(Box::new(c)) {
        panic!("metric registration: {e}");
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let requests = counter_vec(
            &r,
            "mrcp_lb_sip_requests_received_total",
            "SIP requests received, by method.",
            &["method"],
        );
        let responses = counter_vec(
            &r,
            "mrcp_lb_sip_responses_sent_total",
            "SIP responses sent upstream (relayed or generated), by status class.",
            &["class"],
        );
        let class = |c: &str| responses.with_label_values(&[c]);
        let responses_by_class = [
            class("1xx"),
            class("2xx"),
            class("3xx"),
            class("4xx"),
            class("5xx"),
            class("6xx"),
        ];
        let invite_setup = Histogram::with_opts(
            HistogramOpts::new(
                "mrcp_lb_invite_setup_seconds",
                "Time from an initial INVITE received to its final response sent.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        register(&r, invite_setup.clone());
        let probe_latency = prometheus::GaugeVec::new(
            Opts::new(
                "mrcp_lb_destination_probe_latency_seconds",
                "Moving average of OPTIONS probe round-trip time.",
            ),
            &["destination", "uri"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        register(&r, probe_latency.clone());
        let set_updated = prometheus::Gauge::new(
            "mrcp_lb_destination_set_last_update_timestamp_seconds",
            "Unix time of the last destination set update.",
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        register(&r, set_updated.clone());
        let limited = counter_vec(
            &r,
            "mrcp_lb_requests_limited_total",
            "Requests refused by an overload limit (503, or dropped): source_rate (limits.perSource), \
             transactions (limits.maxPendingTransactions), dialogs (dialogs.max).",
            &["reason"],
        );
        let refused = counter_vec(
            &r,
            "mrcp_lb_tcp_connections_refused_total",
            "Accepted TCP connections closed at once: total (tcp.maxConnections), per_source \
             (tcp.maxConnectionsPerSource).",
            &["reason"],
        );
        let timed_out = counter_vec(
            &r,
            "mrcp_lb_tcp_connections_timed_out_total",
            "TCP connections closed for silence (idle, tcp.idleTimeout) or for a message not \
             complete in time (message, tcp.messageTimeout).",
            &["reason"],
        );
        let handshakes_failed = counter_vec(
            &r,
            "mrcp_lb_tls_handshakes_failed_total",
            "TLS handshakes that failed: accept (a client of a tls listener: not TLS, no common \
             protocol, too slow), connect (a server the proxy connected to: certificate not \
             verified, name mismatch, refused).",
            &["side"],
        );
        let dialogs_ended = counter_vec(
            &r,
            "mrcp_lb_dialogs_ended_total",
            "Dialogs the proxy ended itself with a BYE to both sides, by reason: admin \
             (DELETE /v1/dialogs). The lifetime and Session-Expires limits count in \
             mrcp_lb_dialogs_expired_total.",
            &["reason"],
        );
        let relay_refused = counter_vec(
            &r,
            "mrcp_lb_relay_refused_total",
            "Requests with a To tag the proxy refused to relay (docs/relay-policy.md): no_route \
             (no dialog of ours, no Route to us), unsigned / bad_token (our Route without a \
             valid token), not_from_destination (the server side's token from another \
             address), stranger_target (a next hop that is no party or destination), \
             no_target (nothing names where it goes), no_set (no destination set loaded yet: \
             dropped unanswered, a retransmission passes later).",
            &["reason"],
        );
        let sdp_offers = {
            let v = counter_vec(
                &r,
                "mrcp_lb_sdp_offers_total",
                "New INVITEs under SDP routing by what their offer gave: channels (counted \
                 by its MRCPv2 channels), fallback (no channel: routing.sdp.fallback), \
                 refused (no channel, no fallback: 488), bad (unreadable SDP: 400).",
                &["outcome"],
            );
            for o in ["channels", "fallback", "refused", "bad"] {
                v.with_label_values(&[o]);
            }
            v
        };
        let sdp_channels = {
            let v = counter_vec(
                &r,
                "mrcp_lb_sdp_channels_total",
                "MRCPv2 channels settled by a server's answer: accepted, or rejected (and \
                 released at once).",
                &["outcome"],
            );
            for o in ["accepted", "rejected"] {
                v.with_label_values(&[o]);
            }
            v
        };
        Metrics {
            relay_refused,
            limited_source_rate: limited.with_label_values(&["source_rate"]),
            limited_transactions: limited.with_label_values(&["transactions"]),
            limited_dialogs: limited.with_label_values(&["dialogs"]),
            rate_limit_untracked: counter(
                &r,
                "mrcp_lb_rate_limit_untracked_total",
                "New requests not rate-limited because the per-source table was full of active sources.",
            ),
            rate_limit_sources: gauge(
                &r,
                "mrcp_lb_rate_limit_sources",
                "Sources held in the per-source rate limit table.",
            ),
            event_queue: gauge(
                &r,
                "mrcp_lb_event_queue_depth",
                "Messages received and parsed but not yet handled by the core (at most 65536): above zero for long, the core cannot keep up.",
            ),
            tcp_connections: gauge(
                &r,
                "mrcp_lb_tcp_connections",
                "TCP connections open (accepted and opened by the proxy), TLS ones included.",
            ),
            tls_connections: gauge(
                &r,
                "mrcp_lb_tls_connections",
                "TLS connections open (accepted and opened by the proxy); also counted in mrcp_lb_tcp_connections.",
            ),
            tcp_refused_total: refused.with_label_values(&["total"]),
            tcp_refused_per_source: refused.with_label_values(&["per_source"]),
            tcp_timeout_idle: timed_out.with_label_values(&["idle"]),
            tcp_timeout_message: timed_out.with_label_values(&["message"]),
            tls_handshake_failed_accept: handshakes_failed.with_label_values(&["accept"]),
            tls_handshake_failed_connect: handshakes_failed.with_label_values(&["connect"]),
            dialogs_active: gauge(
                &r,
                "mrcp_lb_dialogs_active",
                "Answered dialogs not ended yet.",
            ),
            dialogs_early: gauge(
                &r,
                "mrcp_lb_dialogs_early",
                "Dialogs with a provisional response, not answered yet.",
            ),
            dialogs_processed: counter(
                &r,
                "mrcp_lb_dialogs_processed_total",
                "Dialogs created since start.",
            ),
            dialogs_expired: counter(
                &r,
                "mrcp_lb_dialogs_expired_total",
                "Dialogs ended by the lifetime or Session-Expires limit.",
            ),
            dialogs_failed: counter(
                &r,
                "mrcp_lb_dialogs_failed_total",
                "Dialogs never established (rejected, cancelled, no destination).",
            ),
            dialogs_ended_admin: dialogs_ended.with_label_values(&["admin"]),
            req_invite: requests.with_label_values(&["INVITE"]),
            req_ack: requests.with_label_values(&["ACK"]),
            req_bye: requests.with_label_values(&["BYE"]),
            req_cancel: requests.with_label_values(&["CANCEL"]),
            req_options: requests.with_label_values(&["OPTIONS"]),
            req_other: requests.with_label_values(&["other"]),
            requests,
            responses: responses_by_class,
            malformed: counter(
                &r,
                "mrcp_lb_sip_messages_malformed_total",
                "Messages dropped or answered 400 because they could not be parsed.",
            ),
            malformed_streams: counter(
                &r,
                "mrcp_lb_tcp_streams_malformed_total",
                "TCP connections closed because their byte stream could not be framed.",
            ),
            routed: counter(
                &r,
                "mrcp_lb_calls_routed_total",
                "INVITE branches sent to a destination (first tries and failovers).",
            ),
            failovers: counter(
                &r,
                "mrcp_lb_failovers_total",
                "INVITEs retried on another destination.",
            ),
            rejected_no_capacity: counter(
                &r,
                "mrcp_lb_rejected_no_capacity_total",
                "INVITEs answered 503 because no destination had capacity.",
            ),
            sdp: SdpCounters {
                offers_channels: sdp_offers.with_label_values(&["channels"]),
                offers_fallback: sdp_offers.with_label_values(&["fallback"]),
                offers_refused: sdp_offers.with_label_values(&["refused"]),
                offers_bad: sdp_offers.with_label_values(&["bad"]),
                channels_accepted: sdp_channels.with_label_values(&["accepted"]),
                channels_rejected: sdp_channels.with_label_values(&["rejected"]),
            },
            sdp_offers,
            sdp_channels,
            not_acceptable: counter(
                &r,
                "mrcp_lb_not_acceptable_total",
                "406 answers that failed a session over and kept the destination from its \
                 resources for a probe interval (SDP routing).",
            ),
            invite_setup,
            dest_capacity: gauge_vec(
                &r,
                "mrcp_lb_destination_capacity",
                "Capacity of a destination's resource.",
                &["destination", "uri", "resource"],
            ),
            dest_load: gauge_vec(
                &r,
                "mrcp_lb_destination_load",
                "Live dialogs on a destination's resource.",
                &["destination", "uri", "resource"],
            ),
            dest_not_acceptable: gauge_vec(
                &r,
                "mrcp_lb_destination_not_acceptable",
                "1 while a destination is kept from a resource after answering 406 to a \
                 session asking for it (SDP routing).",
                &["destination", "uri", "resource"],
            ),
            dest_state: gauge_vec(
                &r,
                "mrcp_lb_destination_state",
                "1 for the destination's current state (up, down, draining, disabled).",
                &["destination", "uri", "state"],
            ),
            dest_calls: gauge_vec(
                &r,
                "mrcp_lb_destination_calls_routed",
                "Calls routed to the destination since start.",
                &["destination", "uri"],
            ),
            probes: counter_vec(
                &r,
                "mrcp_lb_destination_probes_total",
                "OPTIONS probes by result (success, failure, timeout).",
                &["destination", "uri", "result"],
            ),
            probe_latency,
            set_version: gauge(
                &r,
                "mrcp_lb_destination_set_version",
                "Version of the destination set in force.",
            ),
            set_updated,
            cluster: ClusterMetrics::new(&r),
            registry: r,
        }
    }

    pub fn relay_refused(&self, reason: &str) {
        self.relay_refused.with_label_values(&[reason]).inc();
    }

    pub fn request(&self, m: &Method) {
        match m {
            Method::Invite => &self.req_invite,
            Method::Ack => &self.req_ack,
            Method::Bye => &self.req_bye,
            Method::Cancel => &self.req_cancel,
            Method::Options => &self.req_options,
            Method::Update
            | Method::Info
            | Method::Prack
            | Method::Register
            | Method::Subscribe
            | Method::Notify
            | Method::Refer
            | Method::Message
            | Method::Publish => {
                return self.requests.with_label_values(&[m.as_str()]).inc();
            }
            Method::Other(_) => &self.req_other,
        }
        .inc();
    }

    pub fn response_sent(&self, code: u16) {
        let i = usize::from(code / 100).saturating_sub(1).min(5);
        self.responses[i].inc();
    }

    pub fn malformed(&self, _e: &ParseError) {
        self.malformed.inc();
    }

    pub fn malformed_stream(&self) {
        self.malformed_streams.inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
