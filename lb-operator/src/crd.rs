//! The `MrcpServer` custom resource: "these pods are MRCP servers".

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Field manager for everything the operator writes.
pub const MANAGER: &str = "mrcp-lb-operator";

/// Pod annotation: PSTN channels of one server, e.g. `"100"`.
pub const PSTN_CAPACITY: &str = "mrcp-lb.io/pstn-capacity";
/// Pod annotation: several resources, e.g. `"pstn=100;tts=20"`, or the MRCPv2 resources of
/// [`MRCP_RESOURCES`]: `"speechrecog=50;speechsynth=200"`.
pub const RESOURCES: &str = "mrcp-lb.io/resources";

/// The MRCPv2 resource types (RFC 6787): the names the proxy counts one unit of
/// per MRCP channel an INVITE's SDP offer asks for (`a=resource:` of each `m=application`
/// line), when it routes by SDP. A pod takes sessions only for the resources it lists; any
/// other name (`pstn`, `tts`) is a plain counter the proxy's `routing.resources` asks for.
pub const MRCP_RESOURCES: [&str; 6] = [
    "speechrecog",
    "dtmfrecog",
    "speechsynth",
    "basicsynth",
    "speakverify",
    "recorder",
];

/// A set of UniMRCP server pods that lb-proxy balances SIP sessions over.
// Two printer columns of type "string" read to clippy as one `type_` given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "mrcp-lb.io",
    version = "v1alpha1",
    kind = "MrcpServer",
    namespaced,
    shortname = "mrcp",
    status = "MrcpServerStatus",
    doc = "A set of UniMRCP (MRCPv2) server pods that lb-proxy balances SIP sessions over.",
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyDestinations",
        description = "Destinations that take new calls"
    ),
    printcolumn(
        name = "Down",
        type_ = "integer",
        json_path = ".status.downDestinations",
        description = "Destinations not Ready, or Ready but called down by the proxies"
    ),
    printcolumn(
        name = "Draining",
        type_ = "integer",
        json_path = ".status.drainingDestinations",
        description = "Terminating destinations whose sessions continue"
    ),
    printcolumn(
        name = "Active",
        type_ = "integer",
        json_path = ".status.activeSessions",
        description = "Open sessions on this server's destinations, over all proxy replicas"
    ),
    printcolumn(
        name = "Capacity",
        type_ = "string",
        json_path = ".status.capacitySummary",
        description = "Capacity of the ready destinations"
    ),
    printcolumn(
        name = "Utilization",
        type_ = "string",
        json_path = ".status.utilization",
        description = "Live sessions over the capacity of the ready destinations, for the most used resource"
    ),
    printcolumn(
        name = "Load",
        type_ = "string",
        json_path = ".status.loadSummary",
        description = "Live sessions/capacity per resource, summed over the proxy replicas",
        priority = "1"
    ),
    printcolumn(
        name = "Class",
        type_ = "string",
        json_path = ".spec.className",
        description = "The operator class that takes this server (none: the default class)",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MrcpServerSpec {
    /// The operator that takes this MrcpServer: the one started with `--class <className>`
    /// (chart value `operator.className`). Absent: the operators started without `--class`.
    /// Two releases or tenants with classes of their own never register each other's servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub class_name: Option<String>,
    /// Selects the MRCP server pods (typically a StatefulSet's), in this namespace.
    pub selector: LabelSelector,
    /// SIP port of the servers.
    #[serde(default = "default_sip_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub sip_port: u16,
    /// SIP transport towards the servers.
    #[serde(default)]
    pub transport: SipTransport,
    /// Load-balancing group the servers join.
    #[serde(default = "default_group")]
    #[schemars(range(min = 0))]
    pub group: u32,
    /// Resources of a pod that has no capacity annotation, as in the OpenSIPS table:
    /// `pstn=100` or `pstn=100;tts=20`.
    #[serde(default = "default_resources")]
    #[schemars(regex(
        pattern = r"^\s*[A-Za-z0-9_-]+\s*=\s*[0-9]+\s*(;\s*[A-Za-z0-9_-]+\s*=\s*[0-9]+\s*)*;?\s*$"
    ))]
    pub default_resources: String,
    /// OPTIONS probing: 0 never, 1 only while down, 2 always.
    #[serde(default = "default_probe_mode")]
    #[schemars(range(min = 0, max = 2))]
    pub probe_mode: u8,
}

fn default_sip_port() -> u16 {
    8060
}
fn default_group() -> u32 {
    lb_api::DEFAULT_GROUP
}
fn default_resources() -> String {
    "pstn=100".to_string()
}
fn default_probe_mode() -> u8 {
    2
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SipTransport {
    #[default]
    Udp,
    Tcp,
}

/// What the operator found.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MrcpServerStatus {
    /// Generation of the spec this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Destinations that take new calls: Ready pods with an IP, not terminating, that the
    /// proxy replicas do not call down (OPTIONS probes, INVITE timeouts, disabled by hand).
    pub ready_destinations: u32,
    /// Destinations that take no new calls and are not draining: pods not Ready, and Ready
    /// pods the proxies call down (the probe view: `destinations[].proxyState`).
    #[serde(default)]
    pub down_destinations: u32,
    /// Terminating pods (and pods drained by hand in a proxy): no new calls, open sessions
    /// continue.
    #[serde(default)]
    pub draining_destinations: u32,
    /// Open sessions (dialogs) on this server's destinations, summed over the proxy replicas
    /// that answered; absent when none did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_sessions: Option<u64>,
    /// The highest `resources[].utilizationPercent`, as `42%`: how full the most used
    /// resource is. Absent while the loads are unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization: Option<String>,
    /// Total capacity of the ready destinations, per resource.
    pub capacity: BTreeMap<String, u64>,
    /// `capacity` as one string, for `kubectl get mrcp`.
    pub capacity_summary: String,
    /// Per resource, sorted by name: the capacity of the ready destinations and the live
    /// sessions on all of this server's destinations, as the proxy replicas count them. Lists
    /// every resource a destination of this server offers or carries sessions of.
    #[serde(default)]
    pub resources: Vec<ResourceUsage>,
    /// `resources` as `name=load/capacity` joined by `;` (`speechrecog=3/50;speechsynth=1/200`),
    /// for `kubectl get mrcp`; `?` for a load no proxy replica reported.
    #[serde(default)]
    pub load_summary: String,
    /// Which proxy replicas the loads come from; absent until the operator has tried to read
    /// them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_from: Option<LoadFrom>,
    /// Every matching pod with an IP.
    pub destinations: Vec<DestinationEntry>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One resource of an MrcpServer: what it offers and what is in use.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceUsage {
    /// The resource name, e.g. `speechrecog`, `speechsynth` (MRCPv2) or `pstn`.
    pub name: String,
    /// Sum over the ready destinations.
    pub capacity: u64,
    /// Live sessions using this resource on any of this server's destinations (ready,
    /// not ready or draining), each replica's own count (`load`, never `clusterLoad`) summed
    /// over the proxy replicas that answered. Absent when none did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<u64>,
    /// `load` over `capacity` in percent, rounded (100 when sessions remain and no capacity
    /// does). Absent with the load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<u32>,
}

/// The proxy replicas behind the loads of a status.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadFrom {
    /// Proxy replicas the operator knows (discovered pods with an IP, terminating ones
    /// included, and `--proxy-url` proxies).
    pub proxies: u32,
    /// Of those, the replicas whose counts are in `load`: each answered
    /// `GET /v1/destinations` recently (a replica that stops answering keeps its last answer
    /// for three read intervals, then drops out).
    pub answered: u32,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationEntry {
    pub pod: String,
    /// Destination id in the proxies.
    pub id: String,
    pub uri: String,
    pub resources: String,
    /// What Kubernetes says: active (Ready), down (not Ready) or draining (terminating).
    pub state: String,
    /// What the proxy replicas say (the probe view): the most severe state one of them
    /// reports (down, disabled, draining, up). A pod Kubernetes calls Ready that the proxies'
    /// OPTIONS probes call down shows `state: active`, `proxyState: down`. Absent when no
    /// replica answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_state: Option<String>,
    /// Why, when `proxyState` is not `up` (e.g. `probe failures`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_reason: Option<String>,
    /// Open sessions on it, summed over the replicas that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<u64>,
}
