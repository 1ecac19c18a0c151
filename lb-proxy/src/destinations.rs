//! The live destination set: each destination's spec, resolved address, health, manual state,
//! probe statistics and load.
//!
//! A destination lives in a slot for as long as it is in the set or still carries calls. Load,
//! health and manual state belong to the slot, so a new set that keeps an id never resets them
//! (Kamailio's call-load mode zeroes every count on reload; this does not).

use lb_api::admin::{DestinationStatus, ProbeStatus, ResourceStatus, State};
use lb_api::{DesiredState, DestinationSet, DestinationSpec, ProbeMode};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use crate::routing::{Candidate, Capacity};
use crate::sip::{SipUri, Transport, UriError};

/// Health as seen by the proxy: INVITE timeouts and OPTIONS probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    /// Marked down by an INVITE timeout.
    DownTimeout,
    /// Marked down by consecutive probe failures.
    DownProbes,
}

/// Manual state set through the admin API (OpenSIPS `lb_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manual {
    None,
    Disabled,
    Draining,
}

#[derive(Debug, Clone)]
pub struct ResourceLoad {
    pub name: String,
    pub capacity: u32,
    /// Calls this proxy set up and still counts.
    pub load: u32,
    /// Calls the other replicas report (zero without a cluster).
    pub remote: u32,
}

impl ResourceLoad {
    /// The load routing sees: this replica's and its live peers'.
    pub fn cluster_load(&self) -> u32 {
        self.load.saturating_add(self.remote)
    }
}

#[derive(Debug, Clone, Default)]
pub struct ProbeStats {
    pub sent: u64,
    pub succeeded: u64,
    /// Failures, timeouts included.
    pub failed: u64,
    pub timeouts: u64,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
    /// Exponential moving average of the round trip, seconds.
    pub latency: Option<f64>,
    pub last_code: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct Destination {
    /// Unique for the life of the process (a reused slot gets a new one).
    pub uid: u64,
    pub spec: DestinationSpec,
    pub uri: SipUri,
    pub transport: Transport,
    /// Resolved address; None until a host name resolves.
    pub addr: Option<SocketAddr>,
    pub health: Health,
    pub manual: Manual,
    pub resources: Vec<ResourceLoad>,
    /// No longer in the set: kept only until its open calls end.
    pub removed: bool,
    pub last_change: SystemTime,
    /// Calls routed here since start.
    pub calls: u64,
    /// Dialogs currently holding load here.
    pub open: u32,
    /// Answered 503 with Retry-After: no new calls until then.
    pub held_until: Option<Instant>,
    pub probe: ProbeStats,
    /// Cluster sequence numbers of the calls routed here that not every live peer has
    /// acknowledged yet (empty without a cluster).
    pub unsynced: VecDeque<u64>,
    /// Live replicas sharing load (copy of `Destinations::cluster_size`).
    sync_n: u32,
}

impl Destination {
    fn new(uid: u64, spec: DestinationSpec) -> Result<Destination, UriError> {
        let uri = SipUri::parse(&spec.uri)?;
        let resources = spec
            .resources
            .iter()
            .map(|(name, capacity)| ResourceLoad {
                name: name.to_string(),
                capacity,
                load: 0,
                remote: 0,
            })
            .collect();
        Ok(Destination {
            uid,
            transport: uri.transport(),
            addr: uri.socket_addr(),
            uri,
            spec,
            health: Health::Up,
            manual: Manual::None,
            resources,
            removed: false,
            last_change: SystemTime::now(),
            calls: 0,
            open: 0,
            held_until: None,
            probe: ProbeStats::default(),
            unsynced: VecDeque::new(),
            sync_n: 1,
        })
    }

    /// The effective state: manual state first, then what the set asks, then health.
    pub fn state(&self) -> State {
        if self.removed {
            // Out of the set but still carrying calls: no new ones, open ones finish.
            return State::Draining;
        }
        match (self.manual, self.spec.state, self.health) {
            (Manual::Disabled, _, _) => State::Disabled,
            (Manual::Draining, _, _) | (_, DesiredState::Draining, _) => State::Draining,
            (_, DesiredState::Down, _) => State::Down,
            (_, _, Health::DownTimeout | Health::DownProbes) => State::Down,
            _ => State::Up,
        }
    }

    pub fn reason(&self) -> &'static str {
        if self.removed {
            return "removed from the set";
        }
        match (self.manual, self.spec.state, self.health) {
            (Manual::Disabled, _, _) => "disabled by hand",
            (Manual::Draining, _, _) => "drained by hand",
            (_, DesiredState::Draining, _) => "draining (set)",
            (_, DesiredState::Down, _) => "down (set: not ready)",
            (_, _, Health::DownTimeout) => "INVITE timeout",
            (_, _, Health::DownProbes) => "probe failures",
            _ if self.addr.is_none() => "address not resolved",
            _ if self.held_until.is_some() => "503 Retry-After",
            _ => "",
        }
    }

    /// Changes something that may change the effective state, noting when it did.
    pub fn change(&mut self, f: impl FnOnce(&mut Destination)) {
        let before = self.state();
        f(self);
        if self.state() != before {
            self.last_change = SystemTime::now();
        }
    }

    /// The highest load over the destination's resources.
    pub fn total_load(&self) -> u32 {
        self.resources.iter().map(|r| r.load).max().unwrap_or(0)
    }

    pub fn set_health(&mut self, h: Health) {
        self.change(|d| d.health = h);
    }

    /// Whether OPTIONS probes go out now (OpenSIPS modes: 0 never, 1 while down, 2 always).
    pub fn wants_probe(&self) -> bool {
        !self.removed
            && match self.spec.probe_mode {
                ProbeMode::Never => false,
                ProbeMode::WhileDown => self.health != Health::Up,
                ProbeMode::Always => true,
            }
    }

    /// The bound on overselling across replicas: with N live replicas, this one may have at
    /// most max(1, free / N) calls on the destination that not every peer has acknowledged,
    /// where free is the destination's free capacity as this replica sees it. All replicas
    /// together can then exceed the capacity by at most N - 1 calls (each one unacknowledged
    /// call taken when one channel looked free); see the README's replica model.
    fn sync_allows(&self) -> bool {
        if self.sync_n <= 1 || self.unsynced.is_empty() {
            return true;
        }
        let free = self
            .resources
            .iter()
            .filter(|r| r.capacity > 0)
            .map(|r| i64::from(r.capacity) - i64::from(r.cluster_load()))
            .min()
            .unwrap_or(0);
        (self.unsynced.len() as i64) < (free / i64::from(self.sync_n)).max(1)
    }

    /// Applies a new spec for the same id, keeping load, health and manual state.
    fn update(&mut self, spec: DestinationSpec) -> Result<(), UriError> {
        if spec.uri != self.spec.uri {
            let uri = SipUri::parse(&spec.uri)?;
            self.transport = uri.transport();
            if uri.host != self.uri.host || uri.port != self.uri.port {
                self.addr = uri.socket_addr();
            }
            self.uri = uri;
        }
        let mut resources: Vec<ResourceLoad> = spec
            .resources
            .iter()
            .map(|(name, capacity)| ResourceLoad {
                name: name.to_string(),
                capacity,
                load: self.load_of(name),
                remote: self
                    .resources
                    .iter()
                    .find(|r| r.name == name)
                    .map_or(0, |r| r.remote),
            })
            .collect();
        // A resource dropped from the spec keeps counting down its open calls, at capacity 0.
        for old in &self.resources {
            if old.load > 0 && !resources.iter().any(|r| r.name == old.name) {
                resources.push(ResourceLoad {
                    capacity: 0,
                    ..old.clone()
                });
            }
        }
        self.change(|d| {
            d.resources = resources;
            d.spec = spec;
            d.removed = false;
        });
        Ok(())
    }

    fn load_of(&self, name: &str) -> u32 {
        self.resources
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.load)
            .unwrap_or(0)
    }

    pub fn status(&self) -> DestinationStatus {
        DestinationStatus {
            id: self.spec.id.clone(),
            group: self.spec.group,
            uri: self.spec.uri.clone(),
            address: self.addr.map(|a| a.to_string()),
            state: self.state(),
            reason: self.reason().to_string(),
            removed: self.removed,
            resources: self
                .resources
                .iter()
                .map(|r| ResourceStatus {
                    name: r.name.clone(),
                    capacity: r.capacity,
                    load: r.load,
                    cluster_load: r.cluster_load(),
                })
                .collect(),
            open_calls: self.open,
            calls: self.calls,
            probe: ProbeStatus {
                mode: self.spec.probe_mode,
                sent: self.probe.sent,
                succeeded: self.probe.succeeded,
                failed: self.probe.failed,
                consecutive_successes: self.probe.consecutive_successes,
                consecutive_failures: self.probe.consecutive_failures,
                latency_ms: self.probe.latency.map(|s| s * 1000.0),
                last_code: self.probe.last_code,
            },
            last_change: unix(self.last_change),
        }
    }
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Candidate for Destination {
    fn group(&self) -> u32 {
        self.spec.group
    }
    fn usable(&self) -> bool {
        self.state() == State::Up
            && !self.removed
            && self.addr.is_some()
            && self.held_until.is_none()
            && self.sync_allows()
    }
    fn resource(&self, name: &str) -> Option<Capacity> {
        self.resources
            .iter()
            .find(|r| r.name == name)
            .map(|r| Capacity {
                capacity: r.capacity,
                load: r.cluster_load(),
            })
    }
}

/// A destination as a transaction or a timer remembers it: its slot, and the uid of the
/// destination that held the slot then (a slot freed by a removal is reused, with a new uid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestRef {
    pub slot: usize,
    pub uid: u64,
}

/// All destinations, by slot.
#[derive(Debug, Default)]
pub struct Destinations {
    pub slots: Vec<Destination>,
    pub version: u64,
    /// When a set was last loaded; None while the proxy waits for its first set.
    pub updated: Option<SystemTime>,
    next_uid: u64,
    /// Bumped by every change of this replica's load (the cluster's update sequence).
    pub seq: u64,
    /// Live replicas sharing load, this one included (1 without a cluster).
    pub cluster_size: u32,
}

impl Destinations {
    /// Builds the set from a validated spec.
    pub fn from_set(set: &DestinationSet) -> Result<Destinations, UriError> {
        let mut d = Destinations::default();
        d.replace(set)?;
        Ok(d)
    }

    /// An empty set, waiting for the first push (no destinations in the config file).
    pub fn waiting() -> Destinations {
        Destinations::default()
    }

    pub fn get(&self, slot: usize) -> Option<&Destination> {
        self.slots.get(slot)
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Destination> {
        self.slots.get_mut(slot)
    }

    /// The reference a transaction or a timer keeps to the destination in `slot`.
    pub fn dest_ref(&self, slot: usize) -> Option<DestRef> {
        self.get(slot).map(|d| DestRef { slot, uid: d.uid })
    }

    /// The destination in `slot`, if the slot still holds the one with `uid` (slots are
    /// reused once a removed destination has no call left).
    pub fn live_mut(&mut self, DestRef { slot, uid }: DestRef) -> Option<&mut Destination> {
        self.slots.get_mut(slot).filter(|d| d.uid == uid)
    }

    pub fn find(&self, id: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|d| !d.is_free() && d.spec.id == id)
    }

    /// Replaces the whole set atomically. Ids that stay keep their slot, load, health and
    /// manual state; new ids get a slot; ids that went are marked removed and keep counting
    /// down their open calls. Returns the slots that are new. The set must be validated.
    pub fn replace(&mut self, set: &DestinationSet) -> Result<Vec<usize>, UriError> {
        // Build every new destination first, so a bad URI changes nothing.
        let mut staged: Vec<(Option<usize>, DestinationSpec)> = Vec::new();
        let mut ids = HashMap::new();
        for spec in &set.destinations {
            SipUri::parse(&spec.uri)?;
            ids.insert(spec.id.as_str(), ());
            staged.push((self.find(&spec.id), spec.clone()));
        }
        let mut fresh = Vec::new();
        for (slot, spec) in staged {
            match slot {
                Some(i) => self.slots[i].update(spec)?,
                None => {
                    self.next_uid += 1;
                    let mut d = Destination::new(self.next_uid, spec)?;
                    d.sync_n = self.cluster_size.max(1);
                    let i = match self.slots.iter().position(Destination::is_free) {
                        Some(i) => {
                            self.slots[i] = d;
                            i
                        }
                        None => {
                            self.slots.push(d);
                            self.slots.len() - 1
                        }
                    };
                    fresh.push(i);
                }
            }
        }
        for d in self.slots.iter_mut() {
            if !d.is_free() && !ids.contains_key(d.spec.id.as_str()) {
                d.change(|d| d.removed = true);
            }
        }
        self.version = set.version;
        self.updated = Some(SystemTime::now());
        Ok(fresh)
    }

    /// Sets the number of live replicas sharing load; dropping to one forgets what was
    /// waiting for acknowledgement.
    pub fn set_cluster_size(&mut self, n: u32) {
        self.cluster_size = n;
        for d in &mut self.slots {
            d.sync_n = n;
            if n <= 1 {
                d.unsynced.clear();
            }
        }
    }

    /// Every live peer has acknowledged the updates up to `seq`.
    pub fn acknowledged(&mut self, seq: u64) {
        for d in &mut self.slots {
            while d.unsynced.front().is_some_and(|s| *s <= seq) {
                d.unsynced.pop_front();
            }
        }
    }

    /// Sets every destination's remote load from the peers' reports, by destination id and
    /// resource name.
    pub fn set_remote(&mut self, remote: &HashMap<String, Vec<(String, u32)>>) {
        for d in &mut self.slots {
            let reported = remote.get(d.spec.id.as_str());
            for r in &mut d.resources {
                r.remote = reported
                    .and_then(|l| l.iter().find(|(name, _)| *name == r.name))
                    .map_or(0, |(_, n)| *n);
            }
        }
    }

    /// Counts one call on each requested resource of a destination.
    pub fn acquire(&mut self, slot: usize, resources: &[String]) {
        if let Some(d) = self.slots.get_mut(slot) {
            self.seq += 1;
            if self.cluster_size > 1 {
                d.unsynced.push_back(self.seq);
            }
            d.calls += 1;
            d.open += 1;
            for r in d.resources.iter_mut() {
                if resources.contains(&r.name) {
                    r.load += 1;
                }
            }
        }
    }

    /// Frees one call on each requested resource of a destination.
    pub fn release(&mut self, slot: usize, resources: &[String]) {
        if let Some(d) = self.slots.get_mut(slot) {
            self.seq += 1;
            d.open = d.open.saturating_sub(1);
            for r in d.resources.iter_mut() {
                if resources.contains(&r.name) {
                    r.load = r.load.saturating_sub(1);
                }
            }
            // A resource dropped from the spec disappears with its last call.
            d.resources.retain(|r| {
                r.capacity > 0 || r.load > 0 || d.spec.resources.get(&r.name).is_some()
            });
        }
    }

    /// Destinations to show: in the set, or removed but still carrying calls.
    pub fn visible(&self) -> impl Iterator<Item = &Destination> {
        self.slots.iter().filter(|d| !d.is_free())
    }
}

impl Destination {
    /// Removed and carrying no call: the slot can be reused.
    pub fn is_free(&self) -> bool {
        self.removed && self.open == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(json: &str) -> DestinationSet {
        serde_json::from_str(json).unwrap()
    }

    fn two() -> DestinationSet {
        set(r#"{"version":1,"destinations":[
            {"id":"a","uri":"sip:127.0.0.1:5080","resources":"pstn=10;tts=5"},
            {"id":"b","uri":"sip:mrcp.example:5090;transport=tcp","resources":"pstn=5"}]}"#)
    }

    fn pstn() -> Vec<String> {
        vec!["pstn".to_string()]
    }

    #[test]
    fn load_counts_only_requested_resources() {
        let mut d = Destinations::from_set(&two()).unwrap();
        d.acquire(0, &pstn());
        d.acquire(0, &pstn());
        assert_eq!(d.slots[0].resources[0].load, 2);
        assert_eq!(d.slots[0].resources[1].load, 0);
        assert_eq!(d.slots[0].open, 2);
        d.release(0, &pstn());
        d.release(0, &pstn());
        d.release(0, &pstn());
        assert_eq!(d.slots[0].resources[0].load, 0, "never below zero");
    }

    #[test]
    fn host_names_wait_for_resolution() {
        let d = Destinations::from_set(&two()).unwrap();
        assert_eq!(d.slots[1].transport, Transport::Tcp);
        assert!(d.slots[1].addr.is_none());
        assert!(
            !d.slots[1].usable(),
            "unresolved destinations take no calls"
        );
        assert!(d.slots[0].usable());
    }

    #[test]
    fn replace_keeps_load_health_and_manual_state_of_ids_that_stay() {
        let mut d = Destinations::from_set(&two()).unwrap();
        d.acquire(0, &pstn());
        d.acquire(0, &pstn());
        d.slots[0].set_health(Health::DownProbes);
        d.slots[0].manual = Manual::Draining;
        let fresh = d
            .replace(&set(r#"{"version":2,"destinations":[
                {"id":"c","uri":"sip:127.0.0.1:5070","resources":"pstn=1"},
                {"id":"a","uri":"sip:127.0.0.1:5080","resources":"pstn=20"}]}"#))
            .unwrap();
        assert_eq!(d.version, 2);
        let a = &d.slots[d.find("a").unwrap()];
        assert_eq!(a.resources[0].capacity, 20, "capacity resized");
        assert_eq!(a.resources[0].load, 2, "load kept");
        assert_eq!(a.health, Health::DownProbes);
        assert_eq!(a.manual, Manual::Draining);
        assert_eq!(a.resources.len(), 1, "tts had no load: gone");
        assert!(d.find("b").is_none(), "b carried nothing: gone at once");
        assert!(d.slots[1].is_free());
        assert_eq!(fresh, vec![2]);
        assert_eq!(d.slots[2].spec.id, "c");
        // The next new id reuses b's free slot.
        let fresh = d
            .replace(&set(r#"{"version":3,"destinations":[
                {"id":"a","uri":"sip:127.0.0.1:5080","resources":"pstn=20"},
                {"id":"c","uri":"sip:127.0.0.1:5070","resources":"pstn=1"},
                {"id":"d","uri":"sip:127.0.0.1:5060","resources":"pstn=1"}]}"#))
            .unwrap();
        assert_eq!(fresh, vec![1]);
        assert_ne!(d.slots[1].uid, 2, "a reused slot gets a new uid");
    }

    #[test]
    fn removed_destination_keeps_counting_down_its_calls() {
        let mut d = Destinations::from_set(&two()).unwrap();
        d.acquire(0, &pstn());
        d.replace(&set(r#"{"version":2,"destinations":[]}"#))
            .unwrap();
        assert!(d.slots[0].removed);
        assert!(!d.slots[0].usable(), "no new calls");
        assert!(!d.slots[0].is_free(), "still carries a call");
        assert_eq!(d.visible().count(), 1);
        d.release(0, &pstn());
        assert!(d.slots[0].is_free());
        assert_eq!(d.visible().count(), 0);
    }

    #[test]
    fn a_bad_uri_changes_nothing() {
        let mut d = Destinations::from_set(&two()).unwrap();
        let err = d.replace(&set(r#"{"version":2,"destinations":[
            {"id":"z","uri":"sip:127.0.0.1:1","resources":"pstn=1"},
            {"id":"y","uri":"mailto:x","resources":"pstn=1"}]}"#));
        assert!(err.is_err());
        assert_eq!(d.version, 1);
        assert_eq!(d.visible().count(), 2);
        assert!(d.find("z").is_none());
    }

    #[test]
    fn effective_state_orders_manual_set_and_health() {
        let mut d = Destinations::from_set(&two()).unwrap();
        let a = &mut d.slots[0];
        assert_eq!(a.state(), State::Up);
        a.set_health(Health::DownTimeout);
        assert_eq!(a.state(), State::Down);
        a.spec.state = DesiredState::Draining;
        assert_eq!(a.state(), State::Draining);
        a.manual = Manual::Disabled;
        assert_eq!(a.state(), State::Disabled);
    }
}
