//! UDP: one socket per listener; each datagram is one message.
//!
//! The core owns the UDP sockets (no task and no channel between a datagram and the core):
//! when a socket turns readable it reads every waiting datagram with `recvmmsg`, up to
//! [`BATCH`] per system call, and at the end of each turn it writes everything the turn
//! produced for a socket with `sendmmsg`. Other systems than Linux read and write one
//! datagram per call.

use bytes::Bytes;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::debug;

use super::{Flow, Inbound};
use crate::metrics::Metrics;
use crate::sip::{Message, Transport};

/// Datagrams read or written by one system call at most.
pub const BATCH: usize = 32;

/// No UDP payload exceeds 65,535 bytes (65,507 over IPv4), so nothing is ever cut short.
const SLOT: usize = 65_536;

/// Limits applied to every datagram.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Larger datagrams are dropped unparsed.
    pub max_message_size: usize,
    /// Header fields per message.
    pub max_headers: usize,
}

/// Waits until one of `sockets` has a datagram to read; returns its index.
pub fn poll_readable(sockets: &[Option<Arc<UdpSocket>>], cx: &mut Context<'_>) -> Poll<usize> {
    for (i, s) in sockets.iter().enumerate() {
        if let Some(s) = s {
            if s.poll_recv_ready(cx).is_ready() {
                return Poll::Ready(i);
            }
        }
    }
    Poll::Pending
}

/// What a listener's datagram became.
pub enum Received {
    Message(Inbound),
    /// Dropped (too large, keep-alive) or answered with a 400 here.
    Nothing,
}

/// Checks and parses one datagram; a malformed one is counted and, when it can be addressed,
/// answered with a 400 straight away.
pub fn datagram(
    sock: &UdpSocket,
    data: &[u8],
    remote: SocketAddr,
    listener: usize,
    limits: Limits,
    counters: &Metrics,
) -> Received {
    let n = data.len();
    if n > limits.max_message_size {
        counters.malformed.inc();
        debug!(%remote, "datagram of {n} bytes exceeds udp.maxMessageSize: dropped");
        return Received::Nothing;
    }
    if data.iter().all(|b| *b == b'\r' || *b == b'\n') {
        return Received::Nothing; // keep-alive
    }
    let flow = Flow {
        transport: Transport::Udp,
        listener,
        remote,
        conn: None,
    };
    match Message::parse_limited(data, limits.max_headers) {
        Ok(msg) => Received::Message(Inbound { msg, flow }),
        Err(e) => {
            counters.malformed(&e);
            debug!(%remote, "malformed datagram: {}", e.reason);
            if let Some(resp) = crate::sip::bad_request(&e) {
                let _ = sock.try_send_to(&resp, remote);
            }
            Received::Nothing
        }
    }
}

/// The receive buffers of one socket: [`BATCH`] slots of 64 KiB (only the pages a datagram
/// touches are ever resident).
pub struct Receiver {
    bufs: Vec<u8>,
    meta: [(usize, Option<SocketAddr>); BATCH],
    #[cfg(target_os = "linux")]
    headers: nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>,
}

impl Default for Receiver {
    fn default() -> Self {
        Receiver {
            bufs: vec![0u8; BATCH * SLOT],
            meta: [(0, None); BATCH],
            #[cfg(target_os = "linux")]
            headers: nix::sys::socket::MultiHeaders::preallocate(BATCH, None),
        }
    }
}

impl Receiver {
    /// Reads the datagrams waiting on `sock`, one batch (one system call on Linux): calls
    /// `each` with every datagram and its source, and returns how many were read. `Ok(0)`
    /// means nothing was waiting (readiness is cleared, so the next poll waits for more).
    pub fn read_batch(
        &mut self,
        sock: &UdpSocket,
        mut each: impl FnMut(&[u8], SocketAddr),
    ) -> io::Result<usize> {
        let n = match sock.try_io(Interest::READABLE, || self.recv(sock)) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        };
        for (i, (len, from)) in self.meta[..n].iter().enumerate() {
            // A datagram without a source address (not for an unconnected IP socket) has
            // nowhere to answer: skip it.
            if let Some(from) = from {
                let start = i * SLOT;
                each(&self.bufs[start..start + (*len).min(SLOT)], *from);
            }
        }
        Ok(n)
    }

    #[cfg(target_os = "linux")]
    fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        use nix::sys::socket::{recvmmsg, MsgFlags};
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;
        let mut chunks = self.bufs.chunks_mut(SLOT);
        let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] = std::array::from_fn(|_| {
            [IoSliceMut::new(match chunks.next() {
                Some(c) => c,
                None => &mut [],
            })]
        });
        let got = recvmmsg(
            sock.as_raw_fd(),
            &mut self.headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        let mut n = 0;
        for m in got {
            self.meta[n] = (m.bytes, m.address.and_then(to_std));
            n += 1;
        }
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    #[cfg(not(target_os = "linux"))]
    fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        let (len, from) = sock.try_recv_from(&mut self.bufs[..SLOT])?;
        self.meta[0] = (len, Some(from));
        Ok(1)
    }
}

#[cfg(target_os = "linux")]
fn to_std(a: nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// One datagram to write.
pub struct Datagram {
    pub to: SocketAddr,
    pub data: Bytes,
    /// Handed back when the write fails.
    pub token: Option<super::ErrorToken>,
}

/// Writes datagrams in batches (one `sendmmsg` per [`BATCH`] on Linux).
pub struct Sender {
    #[cfg(target_os = "linux")]
    headers: nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>,
}

impl Default for Sender {
    fn default() -> Self {
        Sender {
            #[cfg(target_os = "linux")]
            headers: nix::sys::socket::MultiHeaders::preallocate(BATCH, None),
        }
    }
}

impl Sender {
    /// Writes every datagram of `queue` (emptied). A datagram the kernel refuses for a reason
    /// of its own is reported to `failed` with its error; when the socket's send buffer is
    /// full, what is left is written asynchronously, in order, by a task.
    pub fn send_all(
        &mut self,
        sock: &Arc<UdpSocket>,
        queue: &mut Vec<Datagram>,
        mut failed: impl FnMut(&Datagram, io::Error),
    ) {
        let mut i = 0;
        while i < queue.len() {
            let end = (i + BATCH).min(queue.len());
            match self.send(sock, &queue[i..end]) {
                Ok(0) => break,
                Ok(n) => i += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // The first datagram of the batch failed (sendmmsg reports an error only
                    // when nothing was sent): report it and go on with the next.
                    failed(&queue[i], e);
                    i += 1;
                }
            }
        }
        if i < queue.len() {
            let rest: Vec<Datagram> = queue.drain(i..).collect();
            let sock = sock.clone();
            tokio::spawn(async move {
                for d in rest {
                    if let Err(e) = sock.send_to(&d.data, d.to).await {
                        debug!(to = %d.to, "udp send failed: {e}");
                    }
                }
            });
        }
        queue.clear();
    }

    #[cfg(target_os = "linux")]
    fn send(&mut self, sock: &UdpSocket, batch: &[Datagram]) -> io::Result<usize> {
        use nix::sys::socket::{sendmmsg, ControlMessage, MsgFlags, SockaddrStorage};
        use std::io::IoSlice;
        use std::os::fd::AsRawFd;
        let n = batch.len().min(BATCH);
        let iovs: [[IoSlice<'_>; 1]; BATCH] =
            std::array::from_fn(|i| [IoSlice::new(batch.get(i).map_or(&[][..], |d| &d.data[..]))]);
        let addrs: [Option<SockaddrStorage>; BATCH] =
            std::array::from_fn(|i| batch.get(i).map(|d| SockaddrStorage::from(d.to)));
        let cmsgs: [ControlMessage<'_>; 0] = [];
        let sent = sendmmsg(
            sock.as_raw_fd(),
            &mut self.headers,
            iovs[..n].iter(),
            &addrs[..n],
            cmsgs,
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        Ok(sent.count())
    }

    #[cfg(not(target_os = "linux"))]
    fn send(&mut self, sock: &UdpSocket, batch: &[Datagram]) -> io::Result<usize> {
        match batch.first() {
            Some(d) => sock.try_send_to(&d.data, d.to).map(|_| 1),
            None => Ok(0),
        }
    }
}
