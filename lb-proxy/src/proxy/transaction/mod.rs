//! RFC 3261 transactions (17): their keys, states and records. The server side
//! ([`server`]) answers the request it received; the client side ([`client`]) sends a request on,
//! retransmits it over UDP and matches its responses.

use super::*;

mod client;
mod server;

/// Server transaction key (RFC 3261 17.2.3): branch, sent-by and method, with ACK matching
/// INVITE.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(in crate::proxy) struct ServerKey {
    pub(in crate::proxy) branch: String,
    pub(in crate::proxy) sent_by: String,
    pub(in crate::proxy) method: Method,
}

/// Client transaction key (RFC 3261 17.1.3): our branch and the CSeq method.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(in crate::proxy) struct ClientKey {
    pub(in crate::proxy) branch: String,
    pub(in crate::proxy) method: Method,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::proxy) enum ServerState {
    /// Request received, no final response yet.
    Proceeding,
    /// Non-2xx final sent (INVITE: waiting for ACK; others: absorbing retransmissions).
    Completed,
    /// ACK received for a non-2xx final.
    Confirmed,
    /// 2xx forwarded (RFC 6026): absorbs retransmitted INVITEs.
    Accepted,
}

#[derive(Debug)]
pub(in crate::proxy) struct ServerTx {
    pub(in crate::proxy) id: u64,
    pub(in crate::proxy) request: Message,
    /// Where responses go.
    pub(in crate::proxy) reply: Flow,
    pub(in crate::proxy) state: ServerState,
    pub(in crate::proxy) last_response: Option<Bytes>,
    pub(in crate::proxy) retransmit: Duration,
    /// To tag for responses the proxy itself generates.
    pub(in crate::proxy) local_tag: String,
    pub(in crate::proxy) call: Option<Call>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::proxy) enum ClientState {
    /// Sent, nothing received (INVITE: Calling; others: Trying).
    Calling,
    Proceeding,
    /// Final received (INVITE: a non-2xx, which was ACKed).
    Completed,
    /// 2xx received for an INVITE (RFC 6026): its retransmissions are relayed, any other
    /// response is absorbed (the request is no longer kept to ACK it).
    Accepted,
}

#[derive(Debug)]
pub(in crate::proxy) struct ClientTx {
    pub(in crate::proxy) id: u64,
    /// The request as sent (for retransmission, ACK and CANCEL).
    pub(in crate::proxy) request: Message,
    pub(in crate::proxy) out: Outbound,
    pub(in crate::proxy) state: ClientState,
    pub(in crate::proxy) retransmit: Duration,
    /// Upstream transaction; None when the proxy itself sent the request.
    pub(in crate::proxy) server: Option<ServerKey>,
    /// What the transaction is for, beyond relaying.
    pub(in crate::proxy) role: Role,
    pub(in crate::proxy) cancel_pending: bool,
    /// Given up on by the proxy: late responses are absorbed.
    pub(in crate::proxy) abandoned: bool,
    /// Upstream flow for stateless forwarding of 2xx retransmissions.
    pub(in crate::proxy) upstream: Option<Flow>,
}

/// What a client transaction is for, beyond relaying a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::proxy) enum Role {
    /// A relayed in-dialog request, or one the proxy sends itself (CANCEL, BYE).
    Plain,
    /// A branch of an initial INVITE to the destination.
    Branch(DestRef),
    /// An OPTIONS health probe of the destination, sent at that time.
    Probe(DestRef, Instant),
}
