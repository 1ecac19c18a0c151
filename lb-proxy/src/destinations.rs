//! The live destination set: each destination's spec, resolved address, health, manual state,
//! probe statistics and load.
//!
//! A destination lives in a slot for as long as it is in the set or still carries calls. Load,
//! health and manual state belong to the slot, so a new set that keeps an id never resets them
//! (Kamailio's call-load mode zeroes every count on reload; this does not).

use lb_api::admin::{DestinationStatus, ProbeStatus, ResourceStatus, State};
use lb_api::{DesiredState, DestinationSet, DestinationSpec, ProbeMode};
use rand::Rng;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use crate::routing::{Candidate, Capacity, Index, Policy, Want};
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
    /// Answered 406 to a session asking for this resource (SDP routing): no session asking
    /// for it goes here until then, or until its capacity changes.
    pub refused_until: Option<Instant>,
    /// A 2xx accepted a channel of this resource since its capacity was last set: a 406 is
    /// not blamed on it while a resource of the session that is not proven is there to blame.
    pub proven: bool,
}

impl ResourceLoad {
    fn new(name: &str, capacity: u32) -> ResourceLoad {
        ResourceLoad {
            name: name.to_string(),
            capacity,
            load: 0,
            remote: 0,
            refused_until: None,
            proven: false,
        }
    }

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
            .map(|(name, capacity)| ResourceLoad::new(name, capacity))
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
            (_, DesiredState::Draining, _) => lb_api::admin::REASON_SET_DRAINING,
            (_, DesiredState::Down, _) => lb_api::admin::REASON_SET_DOWN,
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
            .map(|(name, capacity)| {
                let old = self.resources.iter().find(|r| r.name == name);
                // What a 406 or a 2xx taught about the resource holds while its capacity does.
                let same = old.filter(|o| o.capacity == capacity);
                ResourceLoad {
                    load: old.map_or(0, |o| o.load),
                    remote: old.map_or(0, |o| o.remote),
                    refused_until: same.and_then(|o| o.refused_until),
                    proven: same.is_some_and(|o| o.proven),
                    ..ResourceLoad::new(name, capacity)
                }
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

    /// Keeps sessions asking for `resources` away until `until` (a 406). The resources
    /// blamed: those not proven by an accepted channel, or all of them when every one is.
    /// Returns their names.
    pub fn refuse(&mut self, resources: &[String], until: Instant) -> Vec<String> {
        let asked = |r: &ResourceLoad| resources.contains(&r.name);
        let unproven = self.resources.iter().any(|r| asked(r) && !r.proven);
        let mut blamed = Vec::new();
        for r in self.resources.iter_mut() {
            if asked(r) && (!unproven || !r.proven) {
                r.refused_until = Some(until);
                blamed.push(r.name.clone());
            }
        }
        blamed
    }

    /// Ends the refusals (406) due by `now`; whether one ended.
    pub fn end_refusals(&mut self, now: Instant) -> bool {
        let mut ended = false;
        for r in self.resources.iter_mut() {
            if r.refused_until.is_some_and(|u| u <= now) {
                r.refused_until = None;
                ended = true;
            }
        }
        ended
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
                    not_acceptable: r.refused_until.is_some(),
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
            .find(|r| r.name == name && r.refused_until.is_none())
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
///
/// The slots are reached through [`Destinations::get`], [`Destinations::iter`] and the
/// `&mut` hand-outs ([`Destinations::get_mut`], [`Destinations::live_mut`]), never directly:
/// the routing index (`index`) must learn of every change that can move a destination in the
/// routing order (load, remote load, health, manual state, hold, address, removal, spec). A
/// `&mut Destination` handed out marks its slot, and the next [`Destinations::choose`] brings
/// the marked slots in step; `acquire` and `release` move their slot at once.
#[derive(Debug, Default)]
pub struct Destinations {
    slots: Vec<Destination>,
    /// The candidates ordered by availability, per (group, resources, mode) asked for.
    index: Index,
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

    /// The destination in `slot`, for change: the routing index looks at it again before the
    /// next choice.
    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Destination> {
        let d = self.slots.get_mut(slot)?;
        self.index.mark(slot);
        Some(d)
    }

    /// Every slot, free ones included, in slot order.
    pub fn iter(&self) -> std::slice::Iter<'_, Destination> {
        self.slots.iter()
    }

    /// Every slot, free ones included, as a slice (for the reference scan `routing::choose`).
    pub fn as_slice(&self) -> &[Destination] {
        &self.slots
    }

    /// The number of slots, free ones included.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The destination for a new call: the choice of [`crate::routing::choose`] (least loaded, ties
    /// at random), made through the routing index so that it does not scan every slot.
    pub fn choose(
        &mut self,
        want: Want<'_>,
        tried: &[usize],
        policy: Policy,
        rng: &mut impl Rng,
    ) -> Option<usize> {
        self.index.choose(&self.slots, want, tried, policy, rng)
    }

    /// The reference a transaction or a timer keeps to the destination in `slot`.
    pub fn dest_ref(&self, slot: usize) -> Option<DestRef> {
        self.get(slot).map(|d| DestRef { slot, uid: d.uid })
    }

    /// The destination in `slot`, if the slot still holds the one with `uid` (slots are
    /// reused once a removed destination has no call left).
    /// The routing index looks at it again before the next choice, as with `get_mut`.
    pub fn live_mut(&mut self, DestRef { slot, uid }: DestRef) -> Option<&mut Destination> {
        let d = self.slots.get_mut(slot).filter(|d| d.uid == uid)?;
        self.index.mark(slot);
        Some(d)
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
                Some(i) => {
                    self.index.mark(i);
                    self.slots[i].update(spec)?;
                }
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
                    self.index.mark(i);
                    fresh.push(i);
                }
            }
        }
        for (i, d) in self.slots.iter_mut().enumerate() {
            if !d.is_free() && !ids.contains_key(d.spec.id.as_str()) {
                d.change(|d| d.removed = true);
                self.index.mark(i);
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
        // The overselling bound of every destination moved.
        self.index.mark_all(self.slots.len());
    }

    /// Every live peer has acknowledged the updates up to `seq`.
    pub fn acknowledged(&mut self, seq: u64) {
        for (slot, d) in self.slots.iter_mut().enumerate() {
            let before = d.unsynced.len();
            while d.unsynced.front().is_some_and(|s| *s <= seq) {
                d.unsynced.pop_front();
            }
            if d.unsynced.len() != before {
                self.index.mark(slot);
            }
        }
    }

    /// Sets every destination's remote load from the peers' reports, by destination id and
    /// resource name.
    pub fn set_remote(&mut self, remote: &HashMap<String, Vec<(String, u32)>>) {
        for (slot, d) in self.slots.iter_mut().enumerate() {
            let reported = remote.get(d.spec.id.as_str());
            let mut changed = false;
            for r in &mut d.resources {
                let now = reported
                    .and_then(|l| l.iter().find(|(name, _)| *name == r.name))
                    .map_or(0, |(_, n)| *n);
                changed |= r.remote != now;
                r.remote = now;
            }
            if changed {
                self.index.mark(slot);
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
            d.add_units(resources);
            self.index.refresh(&self.slots, slot);
        }
    }

    /// Counts one more unit of each of `resources` (a name twice: two units) for a call the
    /// destination already carries: a channel added by a re-INVITE.
    pub fn add_units<S: AsRef<str>>(&mut self, slot: usize, resources: &[S]) {
        if let Some(d) = self.slots.get_mut(slot) {
            self.seq += 1;
            d.add_units(resources);
            self.index.refresh(&self.slots, slot);
        }
    }

    /// Frees one unit of each of `resources` for a call the destination keeps carrying: a
    /// channel the server rejected or a re-INVITE removed.
    pub fn remove_units<S: AsRef<str>>(&mut self, slot: usize, resources: &[S]) {
        if let Some(d) = self.slots.get_mut(slot) {
            self.seq += 1;
            d.remove_units(resources);
            self.index.refresh(&self.slots, slot);
        }
    }

    /// A 2xx accepted channels of `resources` here (see [`ResourceLoad::proven`]).
    pub fn proven<S: AsRef<str>>(&mut self, slot: usize, resources: &[S]) {
        if let Some(d) = self.slots.get_mut(slot) {
            for r in d.resources.iter_mut() {
                // As the offer wrote them: resource names compare in any case.
                if resources
                    .iter()
                    .any(|n| n.as_ref().eq_ignore_ascii_case(&r.name))
                {
                    r.proven = true;
                }
            }
        }
    }

    /// Frees one call on each requested resource of a destination.
    pub fn release(&mut self, slot: usize, resources: &[String]) {
        if let Some(d) = self.slots.get_mut(slot) {
            self.seq += 1;
            d.open = d.open.saturating_sub(1);
            d.remove_units(resources);
            self.index.refresh(&self.slots, slot);
        }
    }

    /// Destinations to show: in the set, or removed but still carrying calls.
    pub fn visible(&self) -> impl Iterator<Item = &Destination> {
        self.slots.iter().filter(|d| !d.is_free())
    }
}

impl Destination {
    fn add_units<S: AsRef<str>>(&mut self, resources: &[S]) {
        for name in resources {
            let name = name.as_ref();
            match self.resources.iter_mut().find(|r| r.name == name) {
                Some(r) => r.load += 1,
                // Not offered here (a re-INVITE added a channel the destination does not
                // list): counted at capacity 0, so that it shows and is given back.
                None => self.resources.push(ResourceLoad {
                    load: 1,
                    ..ResourceLoad::new(name, 0)
                }),
            }
        }
    }

    fn remove_units<S: AsRef<str>>(&mut self, resources: &[S]) {
        for name in resources {
            if let Some(r) = self.resources.iter_mut().find(|r| r.name == name.as_ref()) {
                r.load = r.load.saturating_sub(1);
            }
        }
        // A resource dropped from the spec disappears with its last call.
        let spec = &self.spec;
        self.resources
            .retain(|r| r.capacity > 0 || r.load > 0 || spec.resources.get(&r.name).is_some());
    }

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

    mod index {
        //! The routing index against the scan it replaces: random sequences of every kind of
        //! change, and after each a handful of random choices made both ways.

        use super::*;
        use crate::routing::{availability, choose, Mode};
        use lb_api::Resources;
        use rand::rngs::SmallRng;
        use rand::SeedableRng;

        const NAMES: [&str; 3] = ["pstn", "tts", "asr"];

        fn random_set(rng: &mut SmallRng, version: u64) -> DestinationSet {
            let ids: Vec<usize> = (0..12).filter(|_| rng.gen_bool(0.7)).collect();
            let destinations = ids
                .into_iter()
                .map(|k| {
                    let mut resources = Vec::new();
                    for n in NAMES {
                        if rng.gen_bool(0.6) {
                            resources.push((n.to_string(), rng.gen_range(0..6)));
                        }
                    }
                    let uri = if rng.gen_bool(0.15) {
                        format!("sip:host{k}.example:5060")
                    } else {
                        format!("sip:127.0.0.{}:5060", k + 1)
                    };
                    DestinationSpec {
                        id: format!("d{k}"),
                        group: rng.gen_range(1..=2),
                        uri,
                        resources: Resources::new(resources),
                        probe_mode: ProbeMode::Always,
                        state: match rng.gen_range(0..8) {
                            0 => DesiredState::Draining,
                            1 => DesiredState::Down,
                            _ => DesiredState::Active,
                        },
                    }
                })
                .collect();
            DestinationSet {
                version,
                destinations,
                peers: None,
            }
        }

        fn random_resources(rng: &mut SmallRng) -> Vec<String> {
            let lists: [&[&str]; 8] = [
                &[],
                &["pstn"],
                &["tts"],
                &["asr"],
                &["pstn", "tts"],
                &["tts", "pstn"],
                &["pstn", "pstn"],
                &["pstn", "tts", "asr"],
            ];
            lists[rng.gen_range(0..lists.len())]
                .iter()
                .map(|n| n.to_string())
                .collect()
        }

        /// What the scan ranks `d` by, None when it is no candidate.
        fn worth(d: &Destination, group: u32, resources: &[String], mode: Mode) -> Option<i64> {
            if resources.is_empty() || d.spec.group != group || !d.usable() {
                return None;
            }
            // A resource listed k times needs k units: its availability after k - 1.
            resources
                .iter()
                .map(|r| {
                    let k = resources.iter().filter(|x| *x == r).count() as u32;
                    d.resource(r).map(|c| {
                        availability(
                            Capacity {
                                load: c.load + k - 1,
                                ..c
                            },
                            mode,
                        )
                    })
                })
                .min()
                .flatten()
        }

        fn random_change(d: &mut Destinations, rng: &mut SmallRng, version: &mut u64) {
            let slot = rng.gen_range(0..=d.len());
            match rng.gen_range(0..13) {
                0 | 1 => d.acquire(slot, &random_resources(rng)),
                2 | 3 => d.release(slot, &random_resources(rng)),
                4 => {
                    let h =
                        [Health::Up, Health::DownTimeout, Health::DownProbes][rng.gen_range(0..3)];
                    if let Some(x) = d.get_mut(slot) {
                        x.set_health(h);
                    }
                }
                5 => {
                    let m = [Manual::None, Manual::Disabled, Manual::Draining][rng.gen_range(0..3)];
                    if let Some(x) = d.get_mut(slot) {
                        x.change(|x| x.manual = m);
                    }
                }
                6 => {
                    let hold = rng.gen_bool(0.5).then(Instant::now);
                    if let Some(x) = d.dest_ref(slot).and_then(|r| d.live_mut(r)) {
                        x.held_until = hold;
                    }
                }
                7 => {
                    let addr = rng
                        .gen_bool(0.5)
                        .then(|| SocketAddr::from(([127, 0, 0, 99], 5060)));
                    if let Some(x) = d.get_mut(slot) {
                        x.addr = addr;
                    }
                }
                8 => {
                    let mut remote = HashMap::new();
                    for k in 0..12 {
                        if rng.gen_bool(0.3) {
                            let mut loads = Vec::new();
                            for n in NAMES {
                                if rng.gen_bool(0.5) {
                                    loads.push((n.to_string(), rng.gen_range(0..5)));
                                }
                            }
                            remote.insert(format!("d{k}"), loads);
                        }
                    }
                    d.set_remote(&remote);
                }
                9 => d.set_cluster_size(rng.gen_range(1..=3)),
                10 => {
                    let seq = rng.gen_range(0..=d.seq);
                    d.acknowledged(seq);
                }
                11 => {
                    *version += 1;
                    let set = random_set(rng, *version);
                    if let Err(e) = d.replace(&set) {
                        panic!("random set: {e}");
                    }
                }
                _ => {
                    let load = rng.gen_range(0..8);
                    if let Some(r) = d.get_mut(slot).and_then(|x| x.resources.first_mut()) {
                        r.load = load;
                    }
                }
            }
        }

        #[test]
        fn the_index_chooses_as_the_scan_does() {
            let mut chosen = 0;
            for seed in 0..300 {
                let mut rng = SmallRng::seed_from_u64(seed);
                let mut version = 1;
                let mut d = match Destinations::from_set(&random_set(&mut rng, version)) {
                    Ok(d) => d,
                    Err(e) => panic!("random set: {e}"),
                };
                for _ in 0..200 {
                    random_change(&mut d, &mut rng, &mut version);
                    for _ in 0..3 {
                        let resources = random_resources(&mut rng);
                        let want = Want {
                            group: rng.gen_range(1..=3),
                            resources: &resources,
                        };
                        let policy = Policy {
                            mode: if rng.gen_bool(0.5) {
                                Mode::Absolute
                            } else {
                                Mode::Relative
                            },
                            allow_over_capacity: rng.gen_bool(0.3),
                        };
                        let tried: Vec<usize> = (0..rng.gen_range(0..4))
                            .map(|_| rng.gen_range(0..=d.len()))
                            .collect();
                        let fast = d.choose(want, &tried, policy, &mut rng);
                        let slow = choose(d.as_slice(), want, &tried, policy, &mut rng);
                        let rank = |s: usize| {
                            d.get(s)
                                .and_then(|x| worth(x, want.group, &resources, policy.mode))
                        };
                        if let Some(s) = fast {
                            assert!(!tried.contains(&s), "seed {seed}: chose tried slot {s}");
                            assert!(rank(s).is_some(), "seed {seed}: chose no candidate {s}");
                            chosen += 1;
                        }
                        assert_eq!(
                            fast.map(rank),
                            slow.map(rank),
                            "seed {seed}: index chose {fast:?}, scan {slow:?} for \
                             {resources:?} tried {tried:?} {policy:?}"
                        );
                    }
                }
            }
            assert!(chosen > 10_000, "too few choices exercised: {chosen}");
        }

        fn four_equal() -> Destinations {
            let set = DestinationSet {
                version: 1,
                destinations: (0..4)
                    .map(|k| DestinationSpec {
                        id: format!("d{k}"),
                        group: 1,
                        uri: format!("sip:127.0.0.{}:5060", k + 1),
                        resources: Resources::new(vec![("pstn".to_string(), 10)]),
                        probe_mode: ProbeMode::Always,
                        state: DesiredState::Active,
                    })
                    .collect(),
                peers: None,
            };
            match Destinations::from_set(&set) {
                Ok(d) => d,
                Err(e) => panic!("set: {e}"),
            }
        }

        #[test]
        fn the_index_spreads_ties_at_random() {
            let mut d = four_equal();
            let res = pstn();
            let mut rng = SmallRng::seed_from_u64(7);
            let want = Want {
                group: 1,
                resources: &res,
            };
            let mut hits = [0u32; 4];
            for _ in 0..4000 {
                if let Some(s) = d.choose(want, &[], Policy::default(), &mut rng) {
                    hits[s] += 1;
                }
            }
            for h in hits {
                assert!((800..1200).contains(&h), "uneven spread {hits:?}");
            }
            // With slot 1 tried, the three others share.
            let mut hits = [0u32; 4];
            for _ in 0..3000 {
                if let Some(s) = d.choose(want, &[1], Policy::default(), &mut rng) {
                    hits[s] += 1;
                }
            }
            assert_eq!(hits[1], 0);
            for s in [0, 2, 3] {
                assert!((800..1200).contains(&hits[s]), "uneven spread {hits:?}");
            }
        }

        #[test]
        fn the_index_follows_load_and_state() {
            let mut d = four_equal();
            let res = pstn();
            let mut rng = SmallRng::seed_from_u64(7);
            let want = Want {
                group: 1,
                resources: &res,
            };
            let mut pick = |d: &mut Destinations| d.choose(want, &[], Policy::default(), &mut rng);
            // Every call goes to the least loaded: 40 calls fill the four evenly.
            for _ in 0..40 {
                let s = pick(&mut d).unwrap();
                d.acquire(s, &res);
            }
            assert!(d.iter().all(|x| x.resources[0].load == 10));
            assert_eq!(pick(&mut d), None, "all full");
            d.release(2, &res);
            assert_eq!(pick(&mut d), Some(2));
            d.get_mut(2).unwrap().set_health(Health::DownProbes);
            assert_eq!(pick(&mut d), None, "the only free one is down");
            d.get_mut(2).unwrap().set_health(Health::Up);
            assert_eq!(pick(&mut d), Some(2));
        }
    }
}
