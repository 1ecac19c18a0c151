//! UDP, TCP and TLS: sockets, stream framing, connection reuse. The proxy core never touches
//! a socket: it receives [`Inbound`] messages and emits [`Outbound`] ones.

pub mod tcp;
pub mod tls;
pub mod udp;

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::sip::{Message, Transport};

/// Identifies one TCP or TLS connection for the life of the process.
pub type ConnId = u64;

/// Where a message came from, or where one goes: transport, the local listener, the peer, and
/// the connection for TCP and TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub transport: Transport,
    pub listener: usize,
    pub remote: SocketAddr,
    pub conn: Option<ConnId>,
}

/// A parsed message from the network.
#[derive(Debug)]
pub struct Inbound {
    pub msg: Message,
    pub flow: Flow,
}

/// A send that failed (connect refused, name did not resolve), handed up with the token the
/// outbound message carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendFailed(pub ErrorToken);

/// The item of the channel the transport tasks hand up on: the runtime's event type, made from
/// what a transport has to say. The transport never names it, so it does not depend on the
/// runtime that wires it.
pub trait Upward: From<Inbound> + From<SendFailed> + Send + 'static {}

impl<T> Upward for T where T: From<Inbound> + From<SendFailed> + Send + 'static {}

/// Where an outbound message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    /// A host name still to be resolved.
    Host(String, u16),
}

/// An opaque token the core attaches to a send so that a transport failure comes back to the
/// transaction that caused it.
pub type ErrorToken = u64;

/// A message to send.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub transport: Transport,
    pub listener: usize,
    pub target: Target,
    /// Existing TCP or TLS connection to use when it is still open.
    pub conn: Option<ConnId>,
    pub data: Bytes,
    pub on_error: Option<ErrorToken>,
    /// TLS: the name the server's certificate must carry if a connection has to be opened
    /// (the destination URI's host); None uses the target's IP address.
    pub server_name: Option<Arc<str>>,
}
