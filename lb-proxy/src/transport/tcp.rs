//! TCP: Content-Length framing, CRLF keep-alives, size and idle limits, and one connection per
//! peer reused in both directions (responses go back on the connection the request came on).
//! TLS connections are these same connections once [`super::tls`] has run the handshake: a
//! [`Shared`] with `tls` set serves one transport's listeners and connections.
//!
//! Defences: accepted connections are counted in total and per source (beyond either limit a
//! new one is closed at once), a connection silent for `tcp.idleTimeout` is closed, and so is
//! one that starts a message and does not complete it within `tcp.messageTimeout` (slowloris:
//! a trickle of bytes keeps the idle timer from firing but not this one).

use bytes::{Buf, Bytes, BytesMut};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::tls::Tls;
use super::{ConnId, ErrorToken, Flow, Inbound, SendFailed, Upward};
use crate::metrics::Metrics;
use crate::sip::{bad_request, header_end, Message, ParseError, Transport};

/// Limits applied to every connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message_size: usize,
    /// Header fields per message.
    pub max_headers: usize,
    pub idle_timeout: Duration,
    /// A message begun must be complete within this.
    pub message_timeout: Duration,
    pub connect_timeout: Duration,
    /// Accepted connections open at once, in total and from one source.
    pub max_connections: usize,
    pub max_connections_per_source: usize,
}

/// Accepted connections open, in total and per source (IPv6: per /64).
#[derive(Default)]
pub struct Admission {
    inner: Mutex<Admitted>,
}

#[derive(Default)]
struct Admitted {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// Why an accepted connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerSource,
}

/// One admitted connection; dropping it gives its place back.
pub struct Ticket {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Admission {
    /// Takes a place for a connection from `ip`, or says which limit is reached. Called once
    /// per accepted connection, never per message.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Result<Ticket, Refusal> {
        let source = crate::limits::source_key(ip);
        let mut a = self.inner.lock().map_err(|_| Refusal::Total)?;
        if a.total >= limits.max_connections {
            return Err(Refusal::Total);
        }
        let n = a.per_source.entry(source).or_insert(0);
        if *n >= limits.max_connections_per_source {
            return Err(Refusal::PerSource);
        }
        *n += 1;
        a.total += 1;
        Ok(Ticket {
            admission: self.clone(),
            source,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut a) = self.admission.inner.lock() {
            a.total = a.total.saturating_sub(1);
            if let Some(n) = a.per_source.get_mut(&self.source) {
                *n -= 1;
                if *n == 0 {
                    a.per_source.remove(&self.source);
                }
            }
        }
    }
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

/// Everything a connection task of one transport (TCP, or TLS) needs.
pub struct Shared<E> {
    /// Set for the TLS transport: handshakes on accept and connect.
    pub tls: Option<Arc<Tls>>,
    /// This transport's connections (TCP and TLS keep separate registries).
    pub registry: Arc<Registry>,
    pub events: mpsc::Sender<E>,
    pub counters: Arc<Metrics>,
    pub limits: Limits,
    /// Accepted connections, TCP and TLS together.
    pub admission: Arc<Admission>,
    pub shutdown: CancellationToken,
    /// Bind address of each listener, by index: outgoing connections leave from its IP.
    pub binds: Arc<Vec<SocketAddr>>,
}

// Not derived: `E` itself need not be Clone.
impl<E> Clone for Shared<E> {
    fn clone(&self) -> Self {
        Shared {
            tls: self.tls.clone(),
            registry: self.registry.clone(),
            events: self.events.clone(),
            counters: self.counters.clone(),
            limits: self.limits,
            admission: self.admission.clone(),
            shutdown: self.shutdown.clone(),
            binds: self.binds.clone(),
        }
    }
}

impl<E> Shared<E> {
    pub fn transport(&self) -> Transport {
        if self.tls.is_some() {
            Transport::Tls
        } else {
            Transport::Tcp
        }
    }
}

/// Accepts connections on one listener until shutdown.
pub async fn accept<E: Upward>(listener: TcpListener, index: usize, shared: Shared<E>) {
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
        let ticket = match shared.admission.admit(remote.ip(), &shared.limits) {
            Ok(t) => t,
            Err(why) => {
                let (counter, limit) = match why {
                    Refusal::Total => (&shared.counters.tcp_refused_total, "tcp.maxConnections"),
                    Refusal::PerSource => (
                        &shared.counters.tcp_refused_per_source,
                        "tcp.maxConnectionsPerSource",
                    ),
                };
                counter.inc();
                debug!(%remote, "tcp connection refused: {limit} reached");
                // Reset rather than close: no TIME_WAIT left behind by a connection flood.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = NewConn {
            remote,
            listener: index,
            shared: shared.clone(),
            first: None,
            ticket: Some(ticket),
        };
        match &shared.tls {
            None => {
                let (read, write) = stream.into_split();
                conn.run(read, write);
            }
            Some(tls) => {
                tokio::spawn(super::tls::accept(tls.clone(), stream, conn));
            }
        }
    }
}

/// A connection about to run: its peer, the listener it belongs to, the message to send first
/// (on connections the proxy opens) and the admission ticket (on accepted ones).
pub(super) struct NewConn<E> {
    pub remote: SocketAddr,
    pub listener: usize,
    pub shared: Shared<E>,
    pub first: Option<Bytes>,
    pub ticket: Option<Ticket>,
}

impl<E: Upward> NewConn<E> {
    /// Registers the connection, then reads, frames and writes until it closes. `read` and
    /// `write` are the halves of a TCP stream or of a TLS stream over one.
    pub(super) fn run<R, W>(self, read: R, write: W) -> ConnId
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let NewConn {
            remote,
            listener,
            shared,
            first,
            ticket,
        } = self;
        let (tx, rx) = mpsc::channel::<Bytes>(1024);
        if let Some(first) = first {
            let _ = tx.try_send(first);
        }
        let id = shared.registry.add(remote, tx.clone());
        tokio::spawn(write_loop(write, rx));
        let transport = shared.transport();
        shared.counters.tcp_connections.inc();
        if transport == Transport::Tls {
            shared.counters.tls_connections.inc();
        }
        tokio::spawn(async move {
            let flow = Flow {
                transport,
                listener,
                remote,
                conn: Some(id),
            };
            read_loop(read, flow, &shared, tx).await;
            shared.registry.remove(id);
            shared.counters.tcp_connections.dec();
            if transport == Transport::Tls {
                shared.counters.tls_connections.dec();
            }
            drop(ticket);
            debug!(%remote, "{transport} connection closed");
        });
        id
    }
}

/// Bytes gathered from the queue into one write at most.
const WRITE_BATCH: usize = 64 * 1024;

/// Writes what the core queues for one connection: everything already queued goes out in one
/// write (one system call, one TLS record) instead of one per message.
async fn write_loop<W: AsyncWrite + Unpin>(mut write: W, mut rx: mpsc::Receiver<Bytes>) {
    let mut batch = bytes::BytesMut::new();
    while let Some(data) = rx.recv().await {
        let ok = match rx.try_recv() {
            // The common case, one message waiting: written from its own buffer.
            Err(_) => write.write_all(&data).await.is_ok(),
            Ok(next) => {
                batch.clear();
                batch.extend_from_slice(&data);
                batch.extend_from_slice(&next);
                while batch.len() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(more) => batch.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                write.write_all(&batch).await.is_ok()
            }
        };
        // flush: a no-op on TCP; over TLS it pushes out a record still buffered.
        if !ok || write.flush().await.is_err() {
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
    /// A message head of this many bytes (up to the empty line) without Content-Length: on a
    /// stream nothing says where its body ends (RFC 3261 18.3, 20.14). A request is answered
    /// `400` ([`no_length_answer`]), a response dropped; then the connection is closed.
    NoLength(usize),
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
        Ok(Some(cl)) => cl,
        Ok(None) if hend <= max => return Frame::NoLength(hend),
        Ok(None) => return Frame::Invalid(format!("header section over {max} bytes")),
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

/// Content-Length from raw header bytes (None when absent), as the parser finds it: on the
/// logical header lines, folded continuation lines joined to the line above them as the parser
/// joins them (so `Content-Length` with its `: 0` on a continuation line is one, and a
/// continuation of the start line is none), or the framer and the parser would disagree on
/// where the body ends, and so on where the next message starts. Two of them are an error,
/// even when equal (RFC 4475 3.3.9 mcl01: over a stream the framing is lost).
fn content_length(head: &[u8]) -> Result<Option<usize>, String> {
    let text = String::from_utf8_lossy(head);
    let folded = |l: &&str| l.starts_with([' ', '\t']);
    let mut raw = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty())
        .peekable();
    // The start line, with what is folded into it.
    raw.next();
    while raw.next_if(folded).is_some() {}
    let mut found = None;
    while let Some(first) = raw.next() {
        // Only a folded header costs a copy.
        let mut joined: Option<String> = None;
        while let Some(more) = raw.next_if(folded) {
            let j = joined.get_or_insert_with(|| first.to_string());
            j.push(' ');
            j.push_str(more.trim());
        }
        let line = joined.as_deref().unwrap_or(first);
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l") {
            if found.is_some() {
                return Err("more than one Content-Length".to_string());
            }
            let cl = value
                .trim()
                .parse()
                .map_err(|_| format!("bad Content-Length {:?}", value.trim()))?;
            found = Some(cl);
        }
    }
    Ok(found)
}

/// The `400` for a message head framed without Content-Length ([`Frame::NoLength`]), when it is
/// a request to which one can be addressed; None for a response (nobody to answer).
pub fn no_length_answer(head: &[u8], max_headers: usize) -> Option<Bytes> {
    let e = match Message::parse_limited(Bytes::copy_from_slice(head), max_headers) {
        Ok(msg) => ParseError {
            reason: "no Content-Length on a stream (RFC 3261 18.3)".to_string(),
            partial: Some(Box::new(msg)),
        },
        Err(e) => e,
    };
    bad_request(&e)
}

async fn read_loop<R: AsyncRead + Unpin, E: Upward>(
    mut read: R,
    flow: Flow,
    shared: &Shared<E>,
    writer: Writer,
) {
    let limits = shared.limits;
    let mut buf = BytesMut::with_capacity(8192);
    // When the first bytes of the message now incomplete in `buf` arrived.
    let mut begun: Option<tokio::time::Instant> = None;
    loop {
        loop {
            match frame(&buf, limits.max_message_size) {
                Frame::Incomplete => break,
                Frame::Ping => {
                    buf.advance(4);
                    begun = None;
                    let _ = writer.try_send(Bytes::from_static(b"\r\n"));
                }
                Frame::Skip(n) => {
                    buf.advance(n);
                    begun = None;
                }
                Frame::Invalid(reason) => {
                    shared.counters.malformed_stream();
                    debug!(remote = %flow.remote, "closing tcp connection: {reason}");
                    return;
                }
                Frame::NoLength(n) => {
                    shared.counters.malformed_stream();
                    debug!(remote = %flow.remote, "closing tcp connection: no Content-Length");
                    if let Some(resp) = no_length_answer(&buf[..n], limits.max_headers) {
                        // Queued before the connection's writer ends: it goes out, then FIN.
                        let _ = writer.try_send(resp);
                    }
                    return;
                }
                Frame::Message(n) => {
                    let data = buf.split_to(n).freeze();
                    begun = None;
                    match Message::parse_limited(data, limits.max_headers) {
                        Ok(msg) => {
                            let ev = E::from(Inbound { msg, flow });
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
        // Silence is allowed for the idle timeout; a message begun must end by its deadline.
        let now = tokio::time::Instant::now();
        let idle_deadline = now + limits.idle_timeout;
        let deadline = match begun {
            None if buf.is_empty() => idle_deadline,
            None => {
                begun = Some(now);
                idle_deadline.min(now + limits.message_timeout)
            }
            Some(t) => idle_deadline.min(t + limits.message_timeout),
        };
        let read_more = tokio::time::timeout_at(deadline, read.read_buf(&mut buf));
        tokio::select! {
            r = read_more => match r {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
                Err(_) => {
                    if deadline < idle_deadline {
                        shared.counters.tcp_timeout_message.inc();
                        debug!(
                            remote = %flow.remote,
                            "closing tcp connection: message not complete within tcp.messageTimeout"
                        );
                    } else {
                        shared.counters.tcp_timeout_idle.inc();
                        debug!(remote = %flow.remote, "closing idle tcp connection");
                    }
                    return;
                }
            },
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// Sends over an open connection to the peer, or opens one (for TLS, verifying the server
/// as `server_name`, or as its IP address when None). A connection that cannot be opened
/// within `tcp.connectTimeout`, handshake included, reports `on_error` back to the core.
pub fn send<E: Upward>(
    shared: &Shared<E>,
    listener: usize,
    remote: SocketAddr,
    conn: Option<ConnId>,
    data: Bytes,
    on_error: Option<ErrorToken>,
    server_name: Option<Arc<str>>,
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
        let open = async {
            let stream = connect_from(local, remote).await?;
            let _ = stream.set_nodelay(true);
            let conn = NewConn {
                remote,
                listener,
                shared: shared.clone(),
                first: Some(data),
                ticket: None,
            };
            match &shared.tls {
                None => {
                    let (read, write) = stream.into_split();
                    conn.run(read, write);
                }
                Some(tls) => {
                    let stream = tls
                        .connect(stream, remote, server_name.as_deref())
                        .await
                        .inspect_err(|_| shared.counters.tls_handshake_failed_connect.inc())?;
                    let (read, write) = tokio::io::split(stream);
                    conn.run(read, write);
                }
            }
            Ok::<(), std::io::Error>(())
        };
        let why = match tokio::time::timeout(shared.limits.connect_timeout, open).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        debug!(%remote, "{} connect failed: {why}", shared.transport());
        if let Some(t) = on_error {
            let _ = shared.events.send(E::from(SendFailed(t))).await;
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
        assert_eq!(frame(no_cl, 1000), Frame::NoLength(no_cl.len() - 3));
        // The other way round (found by the fuzzer): the name on one line, `: 3` folded onto
        // the next is Content-Length 3 for the parser, so for the framer too.
        let split = "OPTIONS sip:x SIP/2.0\r\nContent-Length\r\n : 3\r\n\r\n";
        let mut stream = split.as_bytes().to_vec();
        stream.extend_from_slice(b"abcdef");
        assert_eq!(frame(&stream, 1000), Frame::Message(split.len() + 3));
        // (The parser refuses it for want of Via and the rest, but reads its body so.)
        let body = match Message::parse(&stream[..split.len() + 3]) {
            Ok(m) => Some(m.body.len()),
            Err(e) => e.partial.map(|m| m.body.len()),
        };
        assert_eq!(body, Some(3));
        // A line folded into the start line is no header.
        let start = b"OPTIONS sip:x SIP/2.0\r\n Content-Length: 3\r\n\r\nabc";
        assert_eq!(frame(start, 1000), Frame::NoLength(start.len() - 3));
    }

    const NO_LENGTH: &str = "INVITE sip:a@127.0.0.1 SIP/2.0\r\n\
Via: SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bK-nl\r\n\
From: <sip:c@10.0.0.1>;tag=1\r\n\
To: <sip:a@127.0.0.1>\r\n\
Call-ID: no-length@10.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Max-Forwards: 70\r\n\r\n";

    #[test]
    fn a_request_without_content_length_is_a_400_then_close() {
        // RFC 3261 18.3: over a stream Content-Length says where the body ends; without it
        // the next message cannot be found (UDP keeps it optional).
        let mut stream = NO_LENGTH.as_bytes().to_vec();
        stream.extend_from_slice(b"v=0\r\n");
        assert_eq!(frame(&stream, 1000), Frame::NoLength(NO_LENGTH.len()));
        let resp = no_length_answer(&stream[..NO_LENGTH.len()], 128).expect("a 400");
        let resp = Message::parse(&resp).expect("the 400 parses");
        assert_eq!(resp.code(), Some(400));
        assert_eq!(resp.call_id(), Some("no-length@10.0.0.1"));
        assert!(
            resp.to_tag().is_some_and(crate::sip::is_stateless_tag),
            "{:?}",
            resp.get(&crate::sip::HeaderName::To)
        );
        // The same head arrives in pieces: no decision before the empty line.
        assert_eq!(frame(&stream[..20], 1000), Frame::Incomplete);
        // Over UDP the same message is fine.
        assert!(Message::parse(NO_LENGTH.as_bytes()).is_ok());
    }

    #[test]
    fn a_response_without_content_length_is_dropped() {
        let resp = "SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bK-nl\r\n\
                    From: <sip:c@10.0.0.1>;tag=1\r\nTo: <sip:a@127.0.0.1>;tag=2\r\n\
                    Call-ID: x\r\nCSeq: 1 INVITE\r\n\r\n";
        assert_eq!(frame(resp.as_bytes(), 1000), Frame::NoLength(resp.len()));
        assert_eq!(
            no_length_answer(resp.as_bytes(), 128),
            None,
            "nobody to answer"
        );
        // An ACK is never answered either.
        let ack = NO_LENGTH.replace("INVITE", "ACK");
        assert_eq!(frame(ack.as_bytes(), 1000), Frame::NoLength(ack.len()));
        assert_eq!(no_length_answer(ack.as_bytes(), 128), None);
    }

    #[test]
    fn two_content_lengths_close() {
        // RFC 4475 3.3.9 (mcl01): which one frames the stream? Neither.
        let two = b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 3\r\nl: 3\r\n\r\nabc";
        assert!(matches!(frame(two, 1000), Frame::Invalid(_)));
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
