//! UDP: one socket per listener; each datagram is one message.
//!
//! The core owns the UDP sockets (no task and no channel between a datagram and the core):
//! when a socket turns readable it reads what waits with one `recvmmsg`, up to [`BATCH`]
//! datagrams, and at the end of each turn it writes everything the turn produced for a socket
//! with one `sendmmsg`. A read that returns fewer than [`BATCH`] datagrams emptied the socket:
//! its readiness is cleared then and there (the read reports `WouldBlock` to tokio after
//! keeping what it got), so a datagram costs one read, not a second one that only learns
//! `EAGAIN` (the epoll registration is edge-triggered: a datagram arriving after the read wakes
//! the core again). Other systems than Linux read and write one datagram
//! per call.

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

/// A UDP listener socket, registered with the core's runtime.
pub type Socket = Arc<UdpSocket>;

/// Registers a bound, non-blocking socket with the current runtime.
pub fn register(s: std::net::UdpSocket) -> io::Result<Socket> {
    UdpSocket::from_std(s).map(Arc::new)
}

/// Reads one batch from the first of `sockets` that has datagrams waiting, into its
/// receiver; returns the socket's index and what the read gave (`Ok(n)`, n ≥ 1, datagrams).
/// Pending (wake-ups registered on every socket) when none has anything.
pub fn poll_read(
    sockets: &[Option<Socket>],
    receivers: &mut [Option<Receiver>],
    cx: &mut Context<'_>,
) -> Poll<(usize, io::Result<usize>)> {
    for (i, (s, r)) in sockets.iter().zip(receivers.iter_mut()).enumerate() {
        let (Some(s), Some(r)) = (s, r) else { continue };
        while s.poll_recv_ready(cx).is_ready() {
            r.got = 0;
            // A short batch emptied the socket: the closure keeps it and says WouldBlock, so
            // that tokio clears the readiness now instead of after one more read.
            let res = s.try_io(Interest::READABLE, || {
                let n = r.recv(s)?;
                r.got = n;
                if n < BATCH {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(n)
                }
            });
            match res {
                Ok(n) => return Poll::Ready((i, Ok(n))),
                Err(_) if r.got > 0 => return Poll::Ready((i, Ok(r.got))),
                // Nothing was waiting: readiness is cleared; poll again to register the wake-up.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready((i, Err(e))),
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
    // The one copy of the datagram: header values are views of it from here on.
    match Message::parse_limited(Bytes::copy_from_slice(data), limits.max_headers) {
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
    /// Datagrams the last read got.
    got: usize,
    #[cfg(target_os = "linux")]
    headers: nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>,
}

impl Default for Receiver {
    fn default() -> Self {
        Receiver {
            bufs: vec![0u8; BATCH * SLOT],
            meta: [(0, None); BATCH],
            got: 0,
            #[cfg(target_os = "linux")]
            headers: nix::sys::socket::MultiHeaders::preallocate(BATCH, None),
        }
    }
}

impl Receiver {
    /// Calls `each` with every datagram of the last read (`n` of them) and its source.
    pub fn each(&self, n: usize, mut each: impl FnMut(&[u8], SocketAddr)) {
        for (i, (len, from)) in self.meta[..n.min(BATCH)].iter().enumerate() {
            // A datagram without a source address (not for an unconnected IP socket) has
            // nowhere to answer: skip it.
            if let Some(from) = from {
                let start = i * SLOT;
                each(&self.bufs[start..start + (*len).min(SLOT)], *from);
            }
        }
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
        sock: &Socket,
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
                    if let Err(e) = send_when_writable(&sock, &d.data, d.to).await {
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

/// Sends one datagram, waiting for room in the socket's send buffer.
pub async fn send_when_writable(sock: &Socket, data: &[u8], to: SocketAddr) -> io::Result<()> {
    sock.send_to(data, to).await.map(|_| ())
}
