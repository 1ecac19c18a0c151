//! UDP: one socket per listener; each datagram is one message.

use std::sync::Arc;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Flow, Inbound, Upward};
use crate::metrics::Metrics;
use crate::sip::{Message, Transport};

/// Limits applied to every datagram.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Larger datagrams are dropped unparsed.
    pub max_message_size: usize,
    /// Header fields per message.
    pub max_headers: usize,
}

/// Receives datagrams until shutdown; malformed ones get a 400 when it can be addressed.
pub async fn receive<E: Upward>(
    socket: Arc<UdpSocket>,
    listener: usize,
    limits: Limits,
    events: mpsc::Sender<E>,
    counters: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    // No UDP payload exceeds 65,535 bytes (65,507 over IPv4), so nothing is ever cut short.
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, remote) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors surface here on some systems; they concern one peer only.
                    debug!("udp receive: {e}");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let data = &buf[..n];
        if n > limits.max_message_size {
            counters.malformed.inc();
            debug!(%remote, "datagram of {n} bytes exceeds udp.maxMessageSize: dropped");
            continue;
        }
        if data.iter().all(|b| *b == b'\r' || *b == b'\n') {
            continue; // keep-alive
        }
        let flow = Flow {
            transport: Transport::Udp,
            listener,
            remote,
            conn: None,
        };
        match Message::parse_limited(bytes::Bytes::copy_from_slice(data), limits.max_headers) {
            Ok(msg) => {
                if events.send(E::from(Inbound { msg, flow })).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                counters.malformed(&e);
                debug!(%remote, "malformed datagram: {}", e.reason);
                if let Some(resp) = crate::sip::bad_request(&e) {
                    let _ = socket.try_send_to(&resp, remote);
                }
            }
        }
    }
}
