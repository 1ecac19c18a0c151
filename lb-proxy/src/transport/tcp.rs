//! TCP: Content-Length framing, CRLF keep-alives, size and idle limits, and one connection per
//! peer reused in both directions (responses go back on the connection the request came on).

use bytes::{Buf, Bytes, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{ConnId, ErrorToken, Flow, Inbound};
use crate::metrics::Metrics;
use crate::runtime::Event;
use crate::sip::{header_end, Message, Transport};

/// Limits applied to every connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message_size: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
}

type Writer = mpsc::Sender<Bytes>;

/// Open connections, by id and by peer address.
#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    inner: Mutex<Conns>,
}

#[derive(Default)]
struct Conns {
    by_id: HashMap<ConnId, (SocketAddr, Writer)>,
    by_addr: HashMap<SocketAddr, ConnId>,
}

impl Registry {
    fn add(&self, remote: SocketAddr, writer: Writer) -> ConnId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut c) = self.inner.lock() {
            c.by_id.insert(id, (remote, writer));
            c.by_addr.insert(remote, id);
        }
        id
    }

    fn remove(&self, id: ConnId) {
        if let Ok(mut c) = self.inner.lock() {
            if let Some((addr, _)) = c.by_id.remove(&id) {
                if c.by_addr.get(&addr) == Some(&id) {
                    c.by_addr.remove(&addr);
                }
            }
        }
    }

    fn writer(&self, conn: Option<ConnId>, remote: SocketAddr) -> Option<Writer> {
        let c = self.inner.lock().ok()?;
        conn.and_then(|id| c.by_id.get(&id))
            .or_else(|| c.by_addr.get(&remote).and_then(|id| c.by_id.get(id)))
            .map(|(_, w)| w.clone())
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|c| c.by_id.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything a connection task needs.
#[derive(Clone)]
pub struct Shared {
    pub registry: Arc<Registry>,
    pub events: mpsc::Sender<Event>,
    pub counters: Arc<Metrics>,
    pub limits: Limits,
    pub shutdown: CancellationToken,
    /// Bind address of each listener, by index: outgoing connections leave from its IP.
    pub binds: Arc<Vec<SocketAddr>>,
}

/// Accepts connections on one listener until shutdown.
pub async fn accept(listener: TcpListener, index: usize, shared: Shared) {
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!("tcp accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.shutdown.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        spawn_connection(stream, remote, index, shared.clone(), None);
    }
}

fn spawn_connection(
    stream: TcpStream,
    remote: SocketAddr,
    listener: usize,
    shared: Shared,
    first: Option<Bytes>,
) -> ConnId {
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    if let Some(first) = first {
        let _ = tx.try_send(first);
    }
    let id = shared.registry.add(remote, tx.clone());
    let (read, write) = stream.into_split();
    tokio::spawn(write_loop(write, rx));
    tokio::spawn(async move {
        let flow = Flow {
            transport: Transport::Tcp,
            listener,
            remote,
            conn: Some(id),
        };
        read_loop(read, flow, &shared, tx).await;
        shared.registry.remove(id);
        debug!(%remote, "tcp connection closed");
    });
    id
}

async fn write_loop(mut write: tokio::net::tcp::OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) {
    while let Some(data) = rx.recv().await {
        if write.write_all(&data).await.is_err() {
            return;
        }
    }
    let _ = write.shutdown().await;
}

/// What the framer found at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Need more bytes.
    Incomplete,
    /// `\r\n\r\n` keep-alive ping (RFC 5626 4.4.1): answer with `\r\n`.
    Ping,
    /// A lone `\r\n` (pong, or padding): skip.
    Skip(usize),
    /// One whole message of this many bytes.
    Message(usize),
    /// The stream cannot be framed (too large, bad Content-Length): close it.
    Invalid(String),
}

/// Frames one message by Content-Length (RFC 3261 18.3).
pub fn frame(buf: &[u8], max: usize) -> Frame {
    if buf.starts_with(b"\r\n\r\n") {
        return Frame::Ping;
    }
    if buf.starts_with(b"\r\n") {
        return if buf.len() < 4 && b"\r\n\r\n".starts_with(buf) {
            Frame::Incomplete
        } else {
            Frame::Skip(2)
        };
    }
    if buf.starts_with(b"\n") {
        return Frame::Skip(1);
    }
    let Some(hend) = header_end(buf) else {
        if buf.len() > max {
            return Frame::Invalid(format!("no end of headers within {max} bytes"));
        }
        return Frame::Incomplete;
    };
    let cl = match content_length(&buf[..hend]) {
        Ok(cl) => cl,
        Err(e) => return Frame::Invalid(e),
    };
    // Content-Length is the peer's number: the sum may not even fit.
    let Some(total) = hend.checked_add(cl).filter(|t| *t <= max) else {
        return Frame::Invalid(format!(
            "message of {hend} header bytes and Content-Length {cl} exceeds {max}"
        ));
    };
    if buf.len() < total {
        Frame::Incomplete
    } else {
        Frame::Message(total)
    }
}

/// Content-Length from raw header bytes (0 when absent): the first header line of that name,
/// as the parser finds it. Not the start line, and not a folded continuation line (the parser
/// joins that to the header above it), or the framer and the parser would disagree on where
/// the body ends, and so on where the next message starts.
fn content_length(head: &[u8]) -> Result<usize, String> {
    let text = String::from_utf8_lossy(head);
    for line in text.split('\n').skip(1) {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l") {
            return value
                .trim()
                .parse()
                .map_err(|_| format!("bad Content-Length {:?}", value.trim()));
        }
    }
    Ok(0)
}

async fn read_loop(
    mut read: tokio::net::tcp::OwnedReadHalf,
    flow: Flow,
    shared: &Shared,
    writer: Writer,
) {
    let limits = shared.limits;
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        loop {
            match frame(&buf, limits.max_message_size) {
                Frame::Incomplete => break,
                Frame::Ping => {
                    buf.advance(4);
                    let _ = writer.try_send(Bytes::from_static(b"\r\n"));
                }
                Frame::Skip(n) => buf.advance(n),
                Frame::Invalid(reason) => {
                    shared.counters.malformed_stream();
                    debug!(remote = %flow.remote, "closing tcp connection: {reason}");
                    return;
                }
                Frame::Message(n) => {
                    let data = buf.split_to(n).freeze();
                    match Message::parse(&data) {
                        Ok(msg) => {
                            let ev = Event::Message(Inbound { msg, flow });
                            if shared.events.send(ev).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            shared.counters.malformed(&e);
                            debug!(remote = %flow.remote, "malformed message: {}", e.reason);
                            if let Some(resp) = crate::sip::bad_request(&e) {
                                let _ = writer.try_send(resp);
                            }
                        }
                    }
                }
            }
        }
        let read_more = tokio::time::timeout(limits.idle_timeout, read.read_buf(&mut buf));
        tokio::select! {
            r = read_more => match r {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
                Err(_) => {
                    debug!(remote = %flow.remote, "closing idle tcp connection");
                    return;
                }
            },
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// Sends over an open connection to the peer, or opens one. A connection that cannot be
/// opened reports `on_error` back to the core.
pub fn send(
    shared: &Shared,
    listener: usize,
    remote: SocketAddr,
    conn: Option<ConnId>,
    data: Bytes,
    on_error: Option<ErrorToken>,
) {
    if let Some(w) = shared.registry.writer(conn, remote) {
        if w.try_send(data).is_ok() {
            return;
        }
        debug!(%remote, "tcp send queue full or closed; dropping message");
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let local = shared.binds.get(listener).copied();
        let connect =
            tokio::time::timeout(shared.limits.connect_timeout, connect_from(local, remote));
        match connect.await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                spawn_connection(stream, remote, listener, shared, Some(data));
            }
            Ok(Err(e)) => {
                debug!(%remote, "tcp connect failed: {e}");
                if let Some(t) = on_error {
                    let _ = shared.events.send(Event::TransportError(t)).await;
                }
            }
            Err(_) => {
                debug!(%remote, "tcp connect timed out");
                if let Some(t) = on_error {
                    let _ = shared.events.send(Event::TransportError(t)).await;
                }
            }
        }
    });
}

/// Connects from the listener's IP (any port) when it has one of the remote's family, so that
/// servers see the proxy's address, not whatever the kernel picks.
async fn connect_from(local: Option<SocketAddr>, remote: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if remote.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    if let Some(l) = local {
        if l.is_ipv6() == remote.is_ipv6() && !l.ip().is_unspecified() {
            socket.bind(SocketAddr::new(l.ip(), 0))?;
        }
    }
    socket.connect(remote).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 3\r\n\r\nabc";

    #[test]
    fn frames_by_content_length() {
        assert_eq!(frame(MSG, 1000), Frame::Message(MSG.len()));
        assert_eq!(frame(&MSG[..MSG.len() - 1], 1000), Frame::Incomplete);
        let mut two = MSG.to_vec();
        two.extend_from_slice(MSG);
        assert_eq!(frame(&two, 1000), Frame::Message(MSG.len()));
        let compact = b"OPTIONS sip:x SIP/2.0\r\nl: 0\r\n\r\n";
        assert_eq!(frame(compact, 1000), Frame::Message(compact.len()));
    }

    #[test]
    fn folded_lines_are_not_content_length() {
        // A continuation line ` l: 5` belongs to the header above it: the parser reads
        // Content-Length 0 here, and the framer must too, or it would take the first five
        // bytes of the next message as this one's body.
        let head = "OPTIONS sip:x SIP/2.0\r\nSubject: a\r\n l: 5\r\nContent-Length: 0\r\n\r\n";
        let mut stream = head.as_bytes().to_vec();
        stream.extend_from_slice(b"hello");
        assert_eq!(frame(&stream, 1000), Frame::Message(head.len()));
        let no_cl = b"OPTIONS sip:x SIP/2.0\r\nSubject: a\r\n\tContent-Length: 3\r\n\r\nabc";
        assert_eq!(frame(no_cl, 1000), Frame::Message(no_cl.len() - 3));
    }

    #[test]
    fn keepalives() {
        assert_eq!(frame(b"\r\n\r\n", 1000), Frame::Ping);
        assert_eq!(frame(b"\r\n", 1000), Frame::Incomplete);
        assert_eq!(frame(b"\r\nOPTIONS", 1000), Frame::Skip(2));
    }

    #[test]
    fn limits_and_bad_lengths_close() {
        assert!(matches!(frame(MSG, 20), Frame::Invalid(_)));
        assert!(matches!(frame(&[b'x'; 100], 50), Frame::Invalid(_)));
        assert!(matches!(
            frame(b"OPTIONS sip:x SIP/2.0\r\nContent-Length: -1\r\n\r\n", 1000),
            Frame::Invalid(_)
        ));
        assert!(matches!(
            frame(
                b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 99999999\r\n\r\n",
                1000
            ),
            Frame::Invalid(_)
        ));
        // Found by fuzzing: header length + Content-Length overflowed (a panic with overflow
        // checks; with wrapping, a bogus small frame).
        assert!(matches!(
            frame(b"I\nContent-Length:18446744073709551615\n\n", 65535),
            Frame::Invalid(_)
        ));
    }
}
