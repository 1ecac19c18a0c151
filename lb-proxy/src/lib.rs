//! `lb-proxy`: a least-loaded SIP load balancer for UniMRCP (MRCPv2) servers.
//!
//! Where things are:
//! - [`sip`]: reading and rewriting SIP messages;
//! - [`transport`]: UDP and TCP sockets, framing, connection reuse;
//! - [`proxy`]: transactions, failover and dialogs (no I/O);
//! - [`routing`]: the least-loaded choice, a pure function;
//! - [`sdp`]: the MRCPv2 channels of an SDP offer or answer;
//! - [`destinations`]: the live set with health and load;
//! - [`limits`]: per-source keys and the per-source rate limiter;
//! - [`logging`]: the binary's buffered log output;
//! - [`config`]: the YAML file; [`admin`]: the HTTP API; [`runtime`]: the wiring.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_tls;
pub mod cluster;
pub mod config;
pub mod destinations;
pub mod dialog;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod runtime;
pub mod sdp;
pub mod sip;
pub mod transport;
