//! The control side of the core: replacing the destination set, manual state, status views
//! and the gauges exported at scrape time. The admin API and SIGHUP reach these through the
//! runtime's event channel, so they run on the core task between two messages and never race
//! the call path.

use lb_api::admin::{
    Action, ClusterStatus, DestinationsStatus, DialogEnded, DialogList, DialogStats, DrainStatus,
    State,
};
use lb_api::{DestinationSet, FieldError};
use serde::Serialize;
use std::time::{Instant, SystemTime};
use tokio::sync::oneshot;
use tracing::info;

use super::sessions::{DialogFilter, DialogQuery, EndBatch, EndError};
use super::{ClientState, Proxy, Role, ServerState};
use crate::config::{check_set, Key};
use crate::destinations::{unix, Health, Manual};
use crate::dialog::DialogKey;

/// Requests from the admin API, the reloaders and the signal handler, answered by the core
/// task between two messages (the runtime forwards them on its event queue).
#[derive(Debug)]
pub enum Control {
    Status(oneshot::Sender<DestinationsStatus>),
    Stats(oneshot::Sender<Stats>),
    /// Prometheus text exposition.
    Metrics(oneshot::Sender<String>),
    /// Ok when ready to take calls, else why not.
    Ready(oneshot::Sender<Result<(), &'static str>>),
    Replace(DestinationSet, oneshot::Sender<Result<Applied, SetError>>),
    /// A set re-read from the config file: versioned by the core.
    Reload(DestinationSet, oneshot::Sender<Result<Applied, SetError>>),
    Manual(String, Action, oneshot::Sender<Option<State>>),
    /// SIGTERM: stop taking new calls; answers what is still open: (dialogs, transactions).
    Drain(oneshot::Sender<(u64, u64)>),
    Cluster(oneshot::Sender<ClusterStatus>),
    /// `recordRoute.keyFile` changed: its first key signs from now on.
    RouteKeys(Vec<Key>),
    /// Whether a destination is drained cluster-wide (`GET /v1/destinations/wait-drained`,
    /// which asks again until it is or its timeout passes).
    DrainStatus(DrainTarget, oneshot::Sender<DrainStatus>),
    /// `GET /v1/dialogs`: one page.
    Dialogs(DialogQuery, oneshot::Sender<DialogList>),
    /// `DELETE /v1/dialogs/{id}`: BYE to both sides, load released.
    EndDialog(DialogKey, oneshot::Sender<Result<DialogEnded, EndError>>),
    /// `DELETE /v1/dialogs?destination=ID`: one batch, after a cursor (the API asks again
    /// until `next` is None).
    EndDialogs(DialogFilter, u64, oneshot::Sender<EndBatch>),
    /// The liveness watchdog (`/healthz`): answered at once by a core that turns over.
    Alive(oneshot::Sender<()>),
    /// Test builds only (feature `test-stall`): the core thread blocks for this long, so that
    /// the watchdog can be seen to fail.
    #[cfg(feature = "test-stall")]
    Stall(std::time::Duration),
}

/// The destination(s) a drain wait is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainTarget {
    /// A pod as the operator names its destination: `NAMESPACE/NAME@UID-PREFIX` (lb-operator
    /// `pods::destination_id`). Every id of the pod matches, whatever its UID: the one a
    /// restart in place keeps, and an older one still carrying calls.
    Pod { namespace: String, name: String },
    /// One destination id, exactly (a set written by hand).
    Id(String),
}

impl DrainTarget {
    /// `pod=NAMESPACE/NAME`, both parts Kubernetes names (lowercase RFC 1123 labels and dots,
    /// at most 253 characters). The error names what is wrong.
    pub fn pod(value: &str) -> Result<DrainTarget, String> {
        let Some((namespace, name)) = value.split_once('/') else {
            return Err(format!("{value:?} is not NAMESPACE/NAME"));
        };
        for (what, part) in [("namespace", namespace), ("name", name)] {
            let ok = !part.is_empty()
                && part.len() <= 253
                && part.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                })
                && part.as_bytes()[0].is_ascii_alphanumeric()
                && part.as_bytes()[part.len() - 1].is_ascii_alphanumeric();
            if !ok {
                return Err(format!(
                    "{value:?}: the {what} {part:?} is not a Kubernetes name \
                     (lowercase letters, digits, '-' and '.', starting and ending alphanumeric)"
                ));
            }
        }
        Ok(DrainTarget::Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// Whether the destination `id` is this target's.
    pub fn matches(&self, id: &str) -> bool {
        match self {
            DrainTarget::Id(want) => id == want,
            DrainTarget::Pod { namespace, name } => {
                let pod = id.rsplit_once('@').map_or(id, |(pod, _uid)| pod);
                pod.split_once('/')
                    .is_some_and(|(ns, n)| ns == namespace && n == name)
            }
        }
    }
}

/// `GET /v1/dialogs/stats`: the OpenSIPS dialog counters plus routing outcomes.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    #[serde(flatten)]
    pub dialogs: DialogStats,
    pub routed: u64,
    pub failovers: u64,
    pub rejected_no_capacity: u64,
    pub malformed: u64,
}

/// Why a destination set was not applied.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    /// The set is invalid; the old one stays in force.
    #[error("{0}")]
    Invalid(#[from] FieldError),
    /// Older than the set in force, or the same version with other content.
    #[error("{0}")]
    Conflict(String),
}

/// What applying a set did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Same version and content as the set in force: nothing to do.
    Unchanged,
    Replaced,
}

impl Proxy {
    /// Starts what runs on its own: probing of the initial set.
    pub fn start(&mut self, now: Instant) {
        for slot in 0..self.dests.len() {
            self.schedule_first_probe(now, slot);
        }
        self.start_cluster(now);
        self.refresh_cluster(now);
    }

    /// New Record-Route keys (the key file changed): the first signs from now on, and keys
    /// that left the list keep verifying for `recordRoute.rotationGrace`.
    pub fn rotate_route_keys(&mut self, now: Instant, keys: Vec<crate::config::Key>) {
        let grace = self.cfg.record_route.rotation_grace;
        self.route_keys.rotate(now, keys, grace);
    }

    /// Replaces the destination set atomically. Ids that stay keep load, health and manual
    /// state; removed ids take no new calls and count their open calls down to zero. An
    /// invalid set changes nothing. The same version with the same content is a no-op; an
    /// older version, or the same version with other content, is a conflict.
    pub fn replace_set(&mut self, now: Instant, set: &DestinationSet) -> Result<Applied, SetError> {
        check_set(&self.cfg.listeners, set)?;
        if self.dests.updated.is_some() {
            let current = self.dests.version;
            if set.version < current {
                return Err(SetError::Conflict(format!(
                    "version {} is older than the set in force ({current})",
                    set.version
                )));
            }
            if set.version == current {
                return if self.same_as_current(set) {
                    // The peer list is not part of the set's content: the same set with
                    // other peers still updates them.
                    if let Some(peers) = &set.peers {
                        self.set_peers(now, peers);
                    }
                    Ok(Applied::Unchanged)
                } else {
                    Err(SetError::Conflict(format!(
                        "version {current} is in force with other content; send a new version"
                    )))
                };
            }
        }
        let fresh = self
            .dests
            .replace(set)
            .map_err(|e| SetError::Invalid(FieldError::new("destinations", e.to_string())))?;
        for slot in fresh {
            self.schedule_first_probe(now, slot);
        }
        match &set.peers {
            Some(peers) => self.set_peers(now, peers),
            None => self.refresh_cluster(now),
        }
        self.metrics.set_updated.set(unix_f64(SystemTime::now()));
        info!(
            version = set.version,
            destinations = set.destinations.len(),
            "destination set replaced"
        );
        Ok(Applied::Replaced)
    }

    /// Applies a set re-read from the config file (SIGHUP): the next version when it differs
    /// from the set in force.
    pub fn reload_set(
        &mut self,
        now: Instant,
        mut set: DestinationSet,
    ) -> Result<Applied, SetError> {
        if self.dests.updated.is_some() && self.same_as_current(&set) {
            return Ok(Applied::Unchanged);
        }
        set.version = self.dests.version + 1;
        self.replace_set(now, &set)
    }

    fn same_as_current(&self, set: &DestinationSet) -> bool {
        let current: Vec<_> = self
            .dests
            .iter()
            .filter(|d| !d.removed)
            .map(|d| &d.spec)
            .collect();
        current.len() == set.destinations.len()
            && set.destinations.iter().all(|s| current.contains(&s))
    }

    /// Enables, disables or drains one destination by hand (OpenSIPS `lb_status`). Enabling
    /// also clears a down health mark; probing may set it again.
    pub fn set_manual(&mut self, id: &str, action: Action) -> Option<State> {
        let slot = self.dests.find(id)?;
        let d = self.dests.get_mut(slot)?;
        d.change(|d| match action {
            Action::Enable => {
                d.manual = Manual::None;
                d.health = Health::Up;
                d.held_until = None;
                // A fresh start: the full failure threshold again before probes take it down.
                d.probe.consecutive_failures = 0;
            }
            Action::Disable => d.manual = Manual::Disabled,
            Action::Drain => d.manual = Manual::Draining,
        });
        info!(destination = %id, ?action, state = d.state().as_str(), "manual state change");
        Some(d.state())
    }

    /// Graceful shutdown: from now on new calls (and OPTIONS to the proxy) get 503; open ones
    /// continue.
    pub fn start_draining(&mut self) {
        if !self.draining {
            let (dialogs, transactions) = self.open_work();
            info!(dialogs, transactions, "draining: new calls get 503");
            self.draining = true;
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// What a graceful shutdown waits for: dialogs not ended yet (in any phase), and
    /// transactions in flight: requests received and not answered yet (a relayed BYE until
    /// its 200 is back), and requests the proxy sent itself (an expiry BYE, a CANCEL) until
    /// answered or timed out. Probes and branches already given up on do not count.
    pub fn open_work(&self) -> (u64, u64) {
        let serving = self
            .server_txs
            .values()
            .filter(|t| t.state == ServerState::Proceeding && t.call().is_none())
            .count();
        let own = self
            .client_txs
            .values()
            .filter(|c| {
                c.server.is_none()
                    && c.role == Role::Plain
                    && !c.abandoned
                    && c.state != ClientState::Completed
            })
            .count();
        (self.dialogs.len() as u64, (serving + own) as u64)
    }

    /// Whether the destinations `target` names are drained: no session open through this
    /// replica or a live peer, and none takes new calls here. A target nobody knows is
    /// drained (no session can be open there through mrcp-lb), once a set is loaded: a replica
    /// still waiting for its first set knows nothing yet, so it is not. `asked` and
    /// `waitedSeconds` are left for the caller.
    pub fn drain_status(&self, now: Instant, target: &DrainTarget) -> DrainStatus {
        let mut ids: Vec<String> = Vec::new();
        let (mut local, mut taking_calls) = (0u64, false);
        for d in self.dests.visible().filter(|d| target.matches(&d.spec.id)) {
            ids.push(d.spec.id.clone());
            local += u64::from(d.open);
            taking_calls |= d.state() == State::Up;
        }
        let mut peers = 0u64;
        if let Some(c) = &self.cluster {
            for (id, loads) in c.remote_loads(now) {
                if !target.matches(&id) {
                    continue;
                }
                // Peers report load per resource, not sessions: the highest load over the
                // resources stands for the sessions (exact with a fixed list, an upper bound
                // when SDP routing counts two channels of one resource), zero only at zero.
                peers += u64::from(loads.iter().map(|(_, n)| *n).max().unwrap_or(0));
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids.sort();
        let open = local + peers;
        DrainStatus {
            asked: String::new(),
            drained: self.has_set() && open == 0 && !taking_calls,
            known: !ids.is_empty(),
            destinations: ids,
            local_sessions: local,
            peer_sessions: peers,
            open_sessions: open,
            taking_calls,
            cluster: self.cluster.is_some(),
            waited_seconds: 0.0,
        }
    }

    /// Whether a destination set is loaded (from the file or pushed).
    pub fn has_set(&self) -> bool {
        self.dests.updated.is_some()
    }

    /// `GET /v1/destinations`.
    pub fn status(&self) -> DestinationsStatus {
        DestinationsStatus {
            version: self.dests.version,
            updated: self.dests.updated.map(unix).unwrap_or(0),
            destinations: self.dests.visible().map(|d| d.status()).collect(),
        }
    }

    /// Fills the gauges that mirror the core's state, before a scrape.
    pub fn export_gauges(&self, now: Instant) {
        self.export_cluster_gauges(now);
        let m = &self.metrics;
        m.dialogs_active.set(self.stats.active as i64);
        m.dialogs_early.set(self.stats.early as i64);
        m.set_version.set(self.dests.version as i64);
        m.rate_limit_sources.set(self.rate_limit_sources() as i64);
        m.dest_capacity.reset();
        m.dest_load.reset();
        m.dest_not_acceptable.reset();
        m.dest_state.reset();
        m.dest_calls.reset();
        m.probes.reset();
        m.probe_latency.reset();
        for d in self.dests.visible() {
            let (id, uri) = (d.spec.id.as_str(), d.spec.uri.as_str());
            for r in &d.resources {
                m.dest_capacity
                    .with_label_values(&[id, uri, &r.name])
                    .set(i64::from(r.capacity));
                m.dest_load
                    .with_label_values(&[id, uri, &r.name])
                    .set(i64::from(r.load));
                if r.refused_until.is_some() {
                    m.dest_not_acceptable
                        .with_label_values(&[id, uri, &r.name])
                        .set(1);
                }
            }
            let state = d.state();
            for st in State::ALL {
                m.dest_state
                    .with_label_values(&[id, uri, st.as_str()])
                    .set(i64::from(state == st));
            }
            m.dest_calls
                .with_label_values(&[id, uri])
                .set(d.calls as i64);
            // Counters rebuilt from the destination's own totals: monotonic for its life,
            // gone with it.
            let p = &d.probe;
            for (result, n) in [
                ("success", p.succeeded),
                ("failure", p.failed - p.timeouts),
                ("timeout", p.timeouts),
            ] {
                if n > 0 {
                    m.probes.with_label_values(&[id, uri, result]).inc_by(n);
                }
            }
            if let Some(avg) = p.latency {
                m.probe_latency.with_label_values(&[id, uri]).set(avg);
            }
        }
    }
}

fn unix_f64(t: SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
