//! Dialogs: one per call, from the initial INVITE to its end, and the counters OpenSIPS'
//! `dialog` module reports (`get_statistics dialog:`).

use std::sync::Arc;
use std::time::Instant;

use crate::transport::Flow;

/// Call-ID and the caller's From tag. Shared strings: the key is held by the dialog map, the
/// map from timer id to dialog and the call of the INVITE, and a clone costs no copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DialogKey {
    pub call_id: Arc<str>,
    pub caller_tag: Arc<str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// INVITE forwarded, no provisional with a To tag yet.
    Trying,
    /// Provisional response with a To tag.
    Early,
    /// 2xx received.
    Confirmed,
}

/// One side of the call, as needed to reach it with an in-dialog request. Boxed strings and
/// slices (no spare capacity): a dialog lives as long as its call, and there are many.
#[derive(Debug, Clone)]
pub struct Party {
    /// The party's Contact URI (remote target).
    pub contact: Option<Box<str>>,
    /// Where its messages came from (or where we sent them): reused for in-dialog requests,
    /// which keeps TCP connections and NAT bindings working.
    pub flow: Option<Flow>,
    /// Route set towards the party (Record-Route entries on its side of us).
    pub routes: Box<[Box<str>]>,
    /// Highest CSeq this party has sent.
    pub cseq: u32,
}

#[derive(Debug, Clone)]
pub struct Dialog {
    pub id: u64,
    pub phase: Phase,
    /// Destination slot currently carrying the call's load.
    pub dest: Option<usize>,
    /// What the call is counted against on `dest`: the listener's fixed resources, or the
    /// MRCPv2 channels its offer asked for and the server accepted (shared lists).
    pub resources: Arc<Vec<String>>,
    /// `resources` came from the SDP offer: the answer and re-INVITEs settle them.
    pub sdp: bool,
    /// Hard lifetime limit.
    pub lifetime_deadline: Instant,
    /// Session-Expires deadline, refreshed by re-INVITE/UPDATE.
    pub session_deadline: Option<Instant>,
    pub to_tag: Option<Box<str>>,
    /// From and To of the initial INVITE, as written (To without tag): the BYEs the proxy
    /// sends when the dialog expires use them.
    pub from_hdr: Box<str>,
    pub to_hdr: Box<str>,
    pub caller: Party,
    pub callee: Party,
}

impl Dialog {
    pub fn deadline(&self) -> Instant {
        match self.session_deadline {
            Some(s) if s < self.lifetime_deadline => s,
            _ => self.lifetime_deadline,
        }
    }
}

/// Why a dialog ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// BYE.
    Normal,
    /// Never established: rejected, cancelled, or no destination.
    Failed,
    /// The proxy's lifetime or Session-Expires limit passed.
    Expired,
    /// Ended through the admin API (`DELETE /v1/dialogs`).
    Admin,
}

/// The dialog counters, as OpenSIPS names them.
pub use lb_api::admin::DialogStats;
