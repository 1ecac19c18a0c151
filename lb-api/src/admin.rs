//! The proxy's admin API bodies: what `GET /v1/destinations` returns, what
//! `POST /v1/destinations/{id}/state` takes, `GET /v1/dialogs/stats`, and the per-session
//! control of `GET /v1/dialogs` and `DELETE /v1/dialogs[/{id}]`.

use serde::{Deserialize, Serialize};

use crate::ProbeMode;

/// Effective state of a destination in the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Takes new calls.
    Up,
    /// Failed (INVITE timeout, probes) or not ready: no new calls.
    Down,
    /// No new calls; open calls continue.
    Draining,
    /// Switched off by hand: no new calls.
    Disabled,
}

impl State {
    pub const ALL: [State; 4] = [State::Up, State::Down, State::Draining, State::Disabled];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Draining => "draining",
            State::Disabled => "disabled",
        }
    }
}

/// The `reason` of a destination the set itself marks down (Kubernetes: the pod is not
/// Ready): the proxy's own judgement is not in it.
pub const REASON_SET_DOWN: &str = "down (set: not ready)";
/// The `reason` of a destination the set itself marks draining (a terminating pod).
pub const REASON_SET_DRAINING: &str = "draining (set)";

/// Whether a destination's `reason` only repeats what the set says (the operator's own
/// input, possibly a push behind), rather than what the proxy found (probes, INVITE
/// timeouts) or was told by hand.
pub fn reason_is_from_set(reason: &str) -> bool {
    reason == REASON_SET_DOWN || reason == REASON_SET_DRAINING
}

/// `POST /v1/destinations/{id}/state` body, as OpenSIPS `lb_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateChange {
    pub action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Clear manual state and health: the destination takes calls again (probing may take
    /// it down again).
    Enable,
    /// No new calls until enabled.
    Disable,
    /// No new calls; open calls continue.
    Drain,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    pub name: String,
    pub capacity: u32,
    /// Calls this proxy set up and still counts.
    pub load: u32,
    /// What routing sees: this proxy's load plus its live peers' (equal to `load` without a
    /// cluster).
    #[serde(default)]
    pub cluster_load: u32,
    /// The destination answered 406 to a session asking for this resource (SDP routing):
    /// sessions asking for it go elsewhere for a probe interval.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_acceptable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeStatus {
    pub mode: ProbeMode,
    pub sent: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
    /// Moving average of the OPTIONS round trip, in milliseconds.
    pub latency_ms: Option<f64>,
    /// Status code of the last reply, or 408 for a timeout.
    pub last_code: Option<u16>,
}

/// One destination as the proxy sees it (the equivalent of OpenSIPS `lb_list`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationStatus {
    pub id: String,
    pub group: u32,
    pub uri: String,
    /// Resolved address, when known.
    pub address: Option<String>,
    pub state: State,
    /// Why it is in that state, e.g. "probe failures", "not ready", "manual".
    pub reason: String,
    /// No longer in the set; shown until its open calls end.
    pub removed: bool,
    pub resources: Vec<ResourceStatus>,
    /// Open calls (dialogs) on this destination.
    pub open_calls: u32,
    /// Calls routed here since the proxy started.
    pub calls: u64,
    pub probe: ProbeStatus,
    /// Unix time (seconds) of the last state change.
    pub last_change: u64,
}

/// `GET /v1/destinations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationsStatus {
    pub version: u64,
    /// Unix time (seconds) of the last set update; 0 when none was loaded.
    pub updated: u64,
    pub destinations: Vec<DestinationStatus>,
}

/// `GET /v1/dialogs/stats`: the counters OpenSIPS' `get_statistics dialog:` reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DialogStats {
    /// Answered (2xx), not ended.
    pub active: u64,
    /// Provisional with To tag, not answered yet.
    pub early: u64,
    /// Created since start.
    pub processed: u64,
    /// Ended by the proxy's lifetime or Session-Expires limit.
    pub expired: u64,
    /// Never established (cancelled, rejected, no destination).
    pub failed: u64,
}

/// An error body of the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// The offending field, when there is one (e.g. `destinations[2].uri`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// `GET /v1/cluster`: this replica and the peers it shares load with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// False when the proxy runs without a `cluster` section.
    pub enabled: bool,
    /// This replica's node id (name plus a random suffix chosen at start).
    pub node: String,
    /// Live replicas sharing load, this one included.
    pub size: u32,
    /// Seconds the oldest local load change has waited for every live peer (0: in sync).
    pub sync_lag_seconds: f64,
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    /// The peer's cluster address.
    pub addr: String,
    /// Its node id, once heard from.
    pub node: Option<String>,
    /// Heard from within `peerTimeout`.
    pub live: bool,
    /// This replica's own address in the pushed list.
    #[serde(rename = "self")]
    pub is_self: bool,
    /// Milliseconds since its last update; None when never heard from.
    pub last_update_ms: Option<u64>,
    /// Calls it reports, summed over destinations and resources.
    pub load: u64,
}

/// `GET /v1/destinations/wait-drained`: whether a destination (a pod, or an id) carries no
/// session anywhere in the cluster and takes no new ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainStatus {
    /// What was asked, as given: `pod=NS/NAME` or `id=ID`.
    pub asked: String,
    /// No session open through any live replica, and no match takes new calls here.
    pub drained: bool,
    /// The ids that matched (a pod restarted in place keeps its id; one recreated under the
    /// same name has a new one, and both match while the old one carries calls).
    pub destinations: Vec<String>,
    /// False when neither this replica nor a live peer knows a matching destination: nothing
    /// can be open there through mrcp-lb.
    pub known: bool,
    /// Sessions open through this replica.
    pub local_sessions: u64,
    /// Sessions the live peers report (per destination, the highest load over its resources).
    pub peer_sessions: u64,
    /// `localSessions + peerSessions`.
    pub open_sessions: u64,
    /// A match is still `up` here (the operator has not pushed it `draining` yet, or it is not
    /// terminating): a new call may still arrive, so it is not drained even at zero sessions.
    pub taking_calls: bool,
    /// Whether the answer covers the peers (`cluster` configured); false: this replica only.
    pub cluster: bool,
    /// Seconds this request waited.
    pub waited_seconds: f64,
}

/// Where a dialog is in its life (`GET /v1/dialogs`, the `state` filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DialogState {
    /// INVITE forwarded, no provisional response with a To tag yet.
    Trying,
    /// A provisional response with a To tag, no 2xx yet.
    Early,
    /// Answered (2xx): the call runs.
    Confirmed,
}

impl DialogState {
    pub const ALL: [DialogState; 3] = [
        DialogState::Trying,
        DialogState::Early,
        DialogState::Confirmed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DialogState::Trying => "trying",
            DialogState::Early => "early",
            DialogState::Confirmed => "confirmed",
        }
    }
}

/// One dialog this replica holds (`GET /v1/dialogs`; OpenSIPS `dlg_list`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DialogInfo {
    /// URL-safe id for `DELETE /v1/dialogs/{id}`: base64url (no padding) of
    /// `Call-ID + "\n" + caller's From tag`, the key the proxy holds the dialog by. Stable for
    /// the dialog's life, whatever its state.
    pub id: String,
    pub call_id: String,
    /// The caller's tag (From of the INVITE).
    pub from_tag: String,
    /// The server's tag, once the call is answered (2xx).
    pub to_tag: Option<String>,
    pub state: DialogState,
    /// Where the caller's messages come from (`ip:port`), as the proxy sees it.
    pub caller: String,
    /// The caller's transport: `udp`, `tcp` or `tls`.
    pub transport: String,
    /// The proxy listener the call came in on (`udp:127.0.0.1:5060`).
    pub listener: String,
    /// The destination carrying the call's load (none before the first branch is sent).
    pub destination: Option<String>,
    pub destination_uri: Option<String>,
    /// Unix time (seconds) the INVITE arrived.
    pub started_at: f64,
    pub age_seconds: f64,
    /// What the call holds on its destination: units per resource (`{"pstn": 1}`).
    pub resources: std::collections::BTreeMap<String, u32>,
}

/// `GET /v1/dialogs`: one page, oldest dialog first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DialogList {
    pub dialogs: Vec<DialogInfo>,
    /// Pass as `cursor` for the next page; absent on the last page. A page may hold fewer
    /// than `limit` dialogs (even none) and still have a next one: each request looks at a
    /// bounded number of dialogs, so that a filter matching few of many never stalls calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// Dialogs this replica holds now, in every state, before any filter.
    pub total: u64,
}

/// `DELETE /v1/dialogs/{id}`: the dialog as it was, and the BYEs the proxy sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DialogEnded {
    pub dialog: DialogInfo,
    /// A BYE went to the caller (false: no usable Contact or flow for it).
    pub bye_to_caller: bool,
    /// A BYE went to the server.
    pub bye_to_server: bool,
}

/// `DELETE /v1/dialogs?destination=ID`: what ending every dialog on a destination did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DialogsEnded {
    pub destination: String,
    /// Confirmed dialogs ended (BYE to both sides, load released).
    pub ended: u64,
    /// BYEs sent (two per ended dialog, fewer where a side has no usable Contact).
    pub byes_sent: u64,
    /// Dialogs still being set up, left alone: their INVITE transaction ends them (the
    /// failover timers, a CANCEL or a final response).
    pub not_confirmed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire names of the dialog bodies, as the README documents them.
    #[test]
    fn dialog_bodies_on_the_wire() {
        let d = DialogInfo {
            id: "YQpi".into(),
            call_id: "a".into(),
            from_tag: "b".into(),
            to_tag: None,
            state: DialogState::Confirmed,
            caller: "10.0.0.5:40000".into(),
            transport: "udp".into(),
            listener: "udp:127.0.0.1:5060".into(),
            destination: Some("1".into()),
            destination_uri: Some("sip:127.0.0.1:5080".into()),
            started_at: 1.5,
            age_seconds: 2.0,
            resources: [("pstn".to_string(), 1)].into(),
        };
        let list = DialogList {
            dialogs: vec![d.clone()],
            next_cursor: Some("7".into()),
            total: 1,
        };
        let v = serde_json::to_value(&list).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "dialogs": [{
                    "id": "YQpi", "callId": "a", "fromTag": "b", "toTag": null,
                    "state": "confirmed", "caller": "10.0.0.5:40000", "transport": "udp",
                    "listener": "udp:127.0.0.1:5060", "destination": "1",
                    "destinationUri": "sip:127.0.0.1:5080", "startedAt": 1.5,
                    "ageSeconds": 2.0, "resources": {"pstn": 1}
                }],
                "nextCursor": "7",
                "total": 1
            })
        );
        let last = DialogList {
            next_cursor: None,
            ..list
        };
        assert!(serde_json::to_value(&last)
            .unwrap()
            .get("nextCursor")
            .is_none());
        let ended = DialogsEnded {
            destination: "1".into(),
            ended: 2,
            byes_sent: 4,
            not_confirmed: 1,
        };
        assert_eq!(
            serde_json::to_value(&ended).unwrap(),
            serde_json::json!({"destination": "1", "ended": 2, "byesSent": 4, "notConfirmed": 1})
        );
        let one = DialogEnded {
            dialog: d,
            bye_to_caller: true,
            bye_to_server: false,
        };
        let v = serde_json::to_value(&one).unwrap();
        assert_eq!(
            (v["byeToCaller"].clone(), v["byeToServer"].clone()),
            (true.into(), false.into())
        );
        assert_eq!(v["dialog"]["callId"], "a");
    }
}
