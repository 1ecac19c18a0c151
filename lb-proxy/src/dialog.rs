//! Dialogs: one per call, from the initial INVITE to its end, and the counters OpenSIPS'
//! `dialog` module reports (`get_statistics dialog:`).

use std::sync::Arc;
use std::time::Instant;

use crate::transport::Flow;

/// Call-ID and the caller's From tag. Shared strings: the key is cloned into the
/// transactions and timers of its call, and a clone allocates nothing.
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

/// One side of the call, as needed to reach it with an in-dialog request.
#[derive(Debug, Clone)]
pub struct Party {
    /// The party's Contact URI (remote target).
    pub contact: Option<String>,
    /// Where its messages came from (or where we sent them): reused for in-dialog requests,
    /// which keeps TCP connections and NAT bindings working.
    pub flow: Option<Flow>,
    /// Route set towards the party (Record-Route entries on its side of us).
    pub routes: Vec<String>,
    /// Highest CSeq this party has sent.
    pub cseq: u32,
}

#[derive(Debug, Clone)]
pub struct Dialog {
    pub id: u64,
    pub phase: Phase,
    /// Destination slot currently carrying the call's load.
    pub dest: Option<usize>,
    pub resources: Arc<Vec<String>>,
    pub created: Instant,
    /// Hard lifetime limit.
    pub lifetime_deadline: Instant,
    /// Session-Expires deadline, refreshed by re-INVITE/UPDATE.
    pub session_deadline: Option<Instant>,
    pub to_tag: Option<String>,
    /// From and To of the initial INVITE, as written (To without tag).
    pub from_hdr: String,
    pub to_hdr: String,
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
}

/// The dialog counters, as OpenSIPS names them.
pub use lb_api::admin::DialogStats;
