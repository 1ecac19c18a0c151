//! Types that `lb-proxy` and `lb-operator` both speak.
//!
//! The destination set is what the operator computes from Kubernetes and what the proxy routes
//! on. It is defined once, here, so the two programs can never disagree on its shape.

#![forbid(unsafe_code)]

pub mod admin;
mod resources;

pub use resources::{Resources, ResourcesError};

use serde::{Deserialize, Deserializer, Serialize};

/// Load-balancing group when none is given (as in OpenSIPS `lb_start("1", ...)`).
pub const DEFAULT_GROUP: u32 = 1;

/// OPTIONS probing mode, numbered as in OpenSIPS `load_balancer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum ProbeMode {
    /// 0: never probe.
    Never,
    /// 1: probe only while the destination is down.
    WhileDown,
    /// 2: always probe.
    #[default]
    Always,
}

impl From<ProbeMode> for u8 {
    fn from(m: ProbeMode) -> u8 {
        match m {
            ProbeMode::Never => 0,
            ProbeMode::WhileDown => 1,
            ProbeMode::Always => 2,
        }
    }
}

impl TryFrom<u8> for ProbeMode {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            0 => Ok(ProbeMode::Never),
            1 => Ok(ProbeMode::WhileDown),
            2 => Ok(ProbeMode::Always),
            other => Err(format!("probe mode must be 0, 1 or 2, got {other}")),
        }
    }
}

/// One MRCP server as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationSpec {
    /// Stable identity: load, health and manual state are kept per id across set updates.
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    /// Load-balancing group.
    #[serde(default = "default_group")]
    pub group: u32,
    /// SIP URI of the server, e.g. `sip:10.0.0.5:8060` or `sip:mrcp-0.mrcp:8060;transport=tcp`.
    pub uri: String,
    /// Resources with capacities, e.g. `pstn=100;tts=20`.
    pub resources: Resources,
    /// OPTIONS probing mode.
    #[serde(default)]
    pub probe_mode: ProbeMode,
    /// What the control plane wants: `active` (default), `draining` (no new calls, open calls
    /// continue; a terminating pod) or `down` (no new calls; a pod that is not Ready).
    #[serde(default, skip_serializing_if = "DesiredState::is_active")]
    pub state: DesiredState,
}

/// The state a destination set asks for; health and manual state in the proxy come on top.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    #[default]
    Active,
    Draining,
    Down,
}

impl DesiredState {
    pub fn is_active(&self) -> bool {
        *self == DesiredState::Active
    }
}

fn default_group() -> u32 {
    DEFAULT_GROUP
}

/// A complete destination set, replaced atomically.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationSet {
    /// Monotonic version chosen by whoever computed the set.
    #[serde(default)]
    pub version: u64,
    pub destinations: Vec<DestinationSpec>,
    /// The other proxy replicas' cluster addresses (`ip:port`), with which this proxy shares
    /// its per-destination load. Absent: the proxy keeps the peers it has (its config file's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<std::net::SocketAddr>>,
}

/// A problem with one field of a destination set, named by its path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl DestinationSet {
    /// Checks what can be checked without a SIP parser: ids present and unique, resources
    /// present. URIs are checked by the proxy, which owns the SIP grammar.
    pub fn validate(&self) -> Result<(), FieldError> {
        let mut seen = std::collections::HashSet::new();
        for (i, d) in self.destinations.iter().enumerate() {
            if d.id.trim().is_empty() {
                return Err(FieldError::new(
                    format!("destinations[{i}].id"),
                    "must not be empty",
                ));
            }
            if !seen.insert(d.id.as_str()) {
                return Err(FieldError::new(
                    format!("destinations[{i}].id"),
                    format!("duplicate id {:?}", d.id),
                ));
            }
            if d.resources.is_empty() {
                return Err(FieldError::new(
                    format!("destinations[{i}].resources"),
                    "must name at least one resource, e.g. \"pstn=100\"",
                ));
            }
        }
        Ok(())
    }
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        N(u64),
    }
    Ok(match Id::deserialize(d)? {
        Id::S(s) => s,
        Id::N(n) => n.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_round_trips_through_json() {
        let json = r#"{"version":7,"destinations":[
            {"id":1,"uri":"sip:127.0.0.1:5080","resources":"pstn=100"},
            {"id":"b","group":2,"uri":"sip:127.0.0.1:5090","resources":"pstn=50;tts=20","probeMode":1}]}"#;
        let set: DestinationSet = serde_json::from_str(json).unwrap();
        assert_eq!(set.version, 7);
        assert_eq!(set.destinations[0].id, "1");
        assert_eq!(set.destinations[0].group, 1);
        assert_eq!(set.destinations[0].probe_mode, ProbeMode::Always);
        assert_eq!(set.destinations[1].resources.get("tts"), Some(20));
        assert_eq!(set.destinations[1].probe_mode, ProbeMode::WhileDown);
        let again: DestinationSet =
            serde_json::from_str(&serde_json::to_string(&set).unwrap()).unwrap();
        assert_eq!(again, set);
    }

    #[test]
    fn peers_are_optional_socket_addresses() {
        let set: DestinationSet = serde_json::from_str(r#"{"destinations":[]}"#).unwrap();
        assert_eq!(set.peers, None, "absent: keep the proxy's own peers");
        assert!(!serde_json::to_string(&set).unwrap().contains("peers"));
        let set: DestinationSet =
            serde_json::from_str(r#"{"destinations":[],"peers":["127.0.0.2:7070","[::1]:7070"]}"#)
                .unwrap();
        assert_eq!(set.peers.as_ref().map(Vec::len), Some(2));
        let de =
            &mut serde_json::Deserializer::from_str(r#"{"destinations":[],"peers":["pod-a"]}"#);
        let err = serde_path_to_error::deserialize::<_, DestinationSet>(de).unwrap_err();
        assert_eq!(err.path().to_string(), "peers[0]");
    }

    #[test]
    fn duplicate_ids_name_the_field() {
        let json = r#"{"destinations":[
            {"id":"a","uri":"sip:127.0.0.1:5080","resources":"pstn=1"},
            {"id":"a","uri":"sip:127.0.0.1:5090","resources":"pstn=1"}]}"#;
        let set: DestinationSet = serde_json::from_str(json).unwrap();
        let err = set.validate().unwrap_err();
        assert_eq!(err.field, "destinations[1].id");
    }

    #[test]
    fn bad_probe_mode_is_rejected() {
        let json = r#"{"id":"a","uri":"sip:x","resources":"pstn=1","probeMode":3}"#;
        let err = serde_json::from_str::<DestinationSpec>(json).unwrap_err();
        assert!(err.to_string().contains("0, 1 or 2"), "{err}");
    }
}
