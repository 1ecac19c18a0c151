//! The live destination set: each destination's spec, resolved address, health and load.
//!
//! Load lives beside the spec and is keyed by the destination's stable slot, so a new spec for
//! the same id never resets it.

use lb_api::{DestinationSet, DestinationSpec};
use serde::Serialize;
use std::net::SocketAddr;
use std::time::SystemTime;

use crate::routing::{Candidate, Capacity};
use crate::sip::{SipUri, Transport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Takes new calls.
    Up,
    /// Failed (INVITE timeout or probes): no new calls until it recovers.
    Down,
    /// No new calls; open calls continue.
    Draining,
    /// Switched off by an operator.
    Disabled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Draining => "draining",
            State::Disabled => "disabled",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ResourceLoad {
    pub name: String,
    pub capacity: u32,
    pub load: u32,
}

#[derive(Debug, Clone)]
pub struct Destination {
    pub spec: DestinationSpec,
    pub uri: SipUri,
    pub transport: Transport,
    /// Resolved address; None until a host name resolves.
    pub addr: Option<SocketAddr>,
    pub state: State,
    pub resources: Vec<ResourceLoad>,
    /// No longer in the set: kept only until its open calls end.
    pub removed: bool,
    pub last_change: SystemTime,
    /// Calls routed here since start.
    pub calls: u64,
    /// Answered 503 with Retry-After: no new calls until then.
    pub held_until: Option<std::time::Instant>,
}

impl Destination {
    fn new(spec: DestinationSpec) -> Result<Destination, String> {
        let uri = SipUri::parse(&spec.uri)?;
        let resources = spec
            .resources
            .iter()
            .map(|(name, capacity)| ResourceLoad {
                name: name.to_string(),
                capacity,
                load: 0,
            })
            .collect();
        Ok(Destination {
            transport: uri.transport(),
            addr: uri.socket_addr(),
            uri,
            spec,
            state: State::Up,
            resources,
            removed: false,
            last_change: SystemTime::now(),
            calls: 0,
            held_until: None,
        })
    }

    pub fn set_state(&mut self, state: State) {
        if self.state != state {
            self.state = state;
            self.last_change = SystemTime::now();
        }
    }

    pub fn total_load(&self) -> u32 {
        self.resources.iter().map(|r| r.load).max().unwrap_or(0)
    }
}

impl Candidate for Destination {
    fn group(&self) -> u32 {
        self.spec.group
    }
    fn usable(&self) -> bool {
        self.state == State::Up && !self.removed && self.addr.is_some() && self.held_until.is_none()
    }
    fn resource(&self, name: &str) -> Option<Capacity> {
        self.resources
            .iter()
            .find(|r| r.name == name)
            .map(|r| Capacity {
                capacity: r.capacity,
                load: r.load,
            })
    }
}

/// All destinations, indexed by slot. A slot is stable for the life of the process.
#[derive(Debug, Default)]
pub struct Destinations {
    pub slots: Vec<Destination>,
    pub version: u64,
}

impl Destinations {
    /// Builds the set from a validated spec.
    pub fn from_set(set: &DestinationSet) -> Result<Destinations, String> {
        let slots = set
            .destinations
            .iter()
            .cloned()
            .map(Destination::new)
            .collect::<Result<_, _>>()?;
        Ok(Destinations {
            slots,
            version: set.version,
        })
    }

    pub fn get(&self, slot: usize) -> Option<&Destination> {
        self.slots.get(slot)
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Destination> {
        self.slots.get_mut(slot)
    }

    /// Counts one call on each requested resource of a destination.
    pub fn acquire(&mut self, slot: usize, resources: &[String]) {
        if let Some(d) = self.slots.get_mut(slot) {
            d.calls += 1;
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
            for r in d.resources.iter_mut() {
                if resources.contains(&r.name) {
                    r.load = r.load.saturating_sub(1);
                }
            }
        }
    }

    /// Slot of a destination whose address and transport match (for in-dialog requests).
    pub fn find_by_addr(&self, addr: SocketAddr) -> Option<usize> {
        self.slots.iter().position(|d| d.addr == Some(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> DestinationSet {
        serde_json::from_str(
            r#"{"destinations":[
            {"id":"a","uri":"sip:127.0.0.1:5080","resources":"pstn=10;tts=5"},
            {"id":"b","uri":"sip:mrcp.example:5090;transport=tcp","resources":"pstn=5"}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn load_counts_only_requested_resources() {
        let mut d = Destinations::from_set(&set()).unwrap();
        let pstn = vec!["pstn".to_string()];
        d.acquire(0, &pstn);
        d.acquire(0, &pstn);
        assert_eq!(d.slots[0].resources[0].load, 2);
        assert_eq!(d.slots[0].resources[1].load, 0);
        d.release(0, &pstn);
        d.release(0, &pstn);
        d.release(0, &pstn);
        assert_eq!(d.slots[0].resources[0].load, 0, "never below zero");
    }

    #[test]
    fn host_names_wait_for_resolution() {
        let d = Destinations::from_set(&set()).unwrap();
        assert_eq!(d.slots[1].transport, Transport::Tcp);
        assert!(d.slots[1].addr.is_none());
        assert!(
            !d.slots[1].usable(),
            "unresolved destinations take no calls"
        );
        assert!(d.slots[0].usable());
    }
}
