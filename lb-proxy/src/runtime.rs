//! Wiring: binds the listeners, runs the transport tasks, the admin server, the resolver, the
//! SIGHUP reloader and the one task that owns the proxy core.

use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{read_route_keys, Config, Key, Overrides};
use crate::destinations::Destinations;
use crate::metrics::Metrics;
use crate::proxy::{Applied, Proxy};
pub use crate::proxy::{Control, Stats};
use crate::sip::Transport;
use crate::transport::{tcp, tls, udp, ErrorToken, Inbound, Outbound, SendFailed, Target};

/// Everything the core task reacts to.
#[derive(Debug)]
pub enum Event {
    Message(Inbound),
    TransportError(ErrorToken),
    /// A load update from a peer replica.
    Peer {
        from: SocketAddr,
        data: bytes::Bytes,
    },
    /// A destination's host name resolved.
    Resolved {
        id: String,
        addr: SocketAddr,
    },
    Control(Control),
}

impl From<Inbound> for Event {
    fn from(m: Inbound) -> Event {
        Event::Message(m)
    }
}

impl From<SendFailed> for Event {
    fn from(SendFailed(t): SendFailed) -> Event {
        Event::TransportError(t)
    }
}

/// A running proxy: its bound addresses and the handle to stop it.
pub struct Running {
    pub sip: Vec<(Transport, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub done: tokio::task::JoinHandle<()>,
    pub handle: Handle,
}

/// Talks to the running core from outside (main's signal handling).
#[derive(Clone)]
pub struct Handle {
    events: mpsc::Sender<Event>,
}

impl Handle {
    /// Graceful shutdown: readiness turns false and new INVITEs get 503 (so an upstream
    /// retries elsewhere) while transactions in flight finish and in-dialog requests keep
    /// being relayed; returns when no dialog and no transaction is open any more, or when
    /// `period` has passed.
    pub async fn drain(&self, period: Duration) {
        let deadline = tokio::time::Instant::now() + period;
        loop {
            let (tx, rx) = oneshot::channel();
            if self
                .events
                .send(Event::Control(Control::Drain(tx)))
                .await
                .is_err()
            {
                return;
            }
            let (dialogs, transactions) = rx.await.unwrap_or((0, 0));
            if dialogs == 0 && transactions == 0 {
                info!("drained: no dialog or transaction open");
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(
                    dialogs,
                    transactions, "drain period over with dialogs or transactions still open"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Messages parsed by the transport tasks and not yet handled by the core, at most. Beyond,
/// the receivers wait and the kernel's socket buffers fill (then drop, for UDP): under an
/// overload this queue is what holds memory (about 1.7 KB per INVITE).
pub const EVENT_QUEUE: usize = 65_536;

/// Requested size of UDP socket buffers (the kernel caps it at net.core.rmem_max/wmem_max).
const UDP_BUFFER: usize = 4 << 20;

/// Host names of the destinations, for the resolver: (id, host, port).
type Names = Vec<(String, String, u16)>;

/// Binds everything (failing before any traffic when a bind fails) and starts the tasks.
/// `config_path`, when given, is re-read on SIGHUP for a new destination set.
pub async fn start(cfg: Config, reload: Option<(PathBuf, Overrides)>) -> anyhow::Result<Running> {
    let prepared = prepare(cfg).map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    start_prepared(prepared, reload).await
}

/// A configuration with the material its files name loaded: what `--check` checks and what
/// the proxy then runs with, read once.
pub struct Prepared {
    cfg: Config,
    tls: Option<Arc<tls::Tls>>,
    admin_tls: Option<crate::admin_tls::AdminTls>,
}

/// Loads what the configuration names on disk (TLS certificates and keys), so that a bad file
/// stops the proxy before it binds anything, naming the field.
pub fn prepare(cfg: Config) -> Result<Prepared, lb_api::FieldError> {
    let tls = match &cfg.tls {
        Some(t) => Some(Arc::new(tls::Tls::load(t)?)),
        None => None,
    };
    let admin_tls = match cfg.admin.as_ref().and_then(|a| a.tls.as_ref()) {
        Some(t) => Some(crate::admin_tls::AdminTls::load(t)?),
        None => None,
    };
    Ok(Prepared {
        cfg,
        tls,
        admin_tls,
    })
}

impl Prepared {
    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

/// As [`start`], with the configuration already prepared.
pub async fn start_prepared(
    prepared: Prepared,
    reload: Option<(PathBuf, Overrides)>,
) -> anyhow::Result<Running> {
    let Prepared {
        cfg,
        tls,
        admin_tls,
    } = prepared;
    let cfg = Arc::new(cfg);
    let dests = match &cfg.destinations {
        Some(set) => Destinations::from_set(set)?,
        None => Destinations::waiting(),
    };
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let (events, rx) = mpsc::channel::<Event>(EVENT_QUEUE);

    let mut udp_sockets: Vec<Option<std::net::UdpSocket>> = Vec::new();
    let mut tcp_listeners = Vec::new();
    let mut bound = Vec::new();
    for (i, l) in cfg.listeners.iter().enumerate() {
        match l.transport {
            Transport::Udp => {
                // Bound here, registered with the core's own runtime on its thread.
                let s = std::net::UdpSocket::bind(l.bind)
                    .with_context(|| format!("listeners[{i}]: cannot bind udp:{}", l.bind))?;
                s.set_nonblocking(true)?;
                // A larger receive buffer rides out bursts (capped by net.core.rmem_max).
                let sock = socket2::SockRef::from(&s);
                let _ = sock.set_recv_buffer_size(UDP_BUFFER);
                let _ = sock.set_send_buffer_size(UDP_BUFFER);
                bound.push((Transport::Udp, s.local_addr()?));
                udp_sockets.push(Some(s));
            }
            Transport::Tcp | Transport::Tls => {
                let t = l.transport;
                let s = TcpListener::bind(l.bind)
                    .await
                    .with_context(|| format!("listeners[{i}]: cannot bind {t}:{}", l.bind))?;
                bound.push((t, s.local_addr()?));
                tcp_listeners.push((i, t, s));
                udp_sockets.push(None);
            }
        }
    }
    let cluster_sock = match &cfg.cluster {
        Some(c) => {
            let s = UdpSocket::bind(c.listen)
                .await
                .with_context(|| format!("cluster.listen: cannot bind udp:{}", c.listen))?;
            let s = Arc::new(s);
            tokio::spawn(receive_peers(s.clone(), events.clone(), shutdown.clone()));
            info!("sharing load with peers from udp:{}", s.local_addr()?);
            Some(s)
        }
        None => None,
    };
    let admin = match &cfg.admin {
        Some(a) => {
            let l = TcpListener::bind(a.listen)
                .await
                .with_context(|| format!("admin.listen: cannot bind {}", a.listen))?;
            let local = l.local_addr()?;
            let api = crate::admin::Api {
                control: control_queue(events.clone()),
                token: a.token.clone().map(Arc::from),
                protect_reads: a.protect_reads,
                liveness_timeout: a.liveness_timeout,
                shutdown: shutdown.clone(),
                drain_waits: Arc::new(tokio::sync::Semaphore::new(crate::admin::MAX_DRAIN_WAITS)),
            };
            match admin_tls {
                Some(t) => {
                    tokio::spawn(crate::admin_tls::watch(
                        t.certs.clone(),
                        t.reload_interval,
                        shutdown.clone(),
                    ));
                    let l = crate::admin_tls::TlsListener::new(l, t.acceptor, shutdown.clone());
                    tokio::spawn(crate::admin::serve(l, api, shutdown.clone()));
                    info!("admin API on https://{local}");
                }
                None => {
                    tokio::spawn(crate::admin::serve(l, api, shutdown.clone()));
                }
            }
            Some(local)
        }
        None => None,
    };

    if cfg.tls.as_ref().is_some_and(|t| !t.verify_destinations) {
        warn!(
            "tls.verifyDestinations is false: certificates of the servers the proxy \
             connects to over TLS are NOT checked; anyone on the path can pose as one"
        );
    }
    let tcp_shared = tcp::Shared {
        tls: None,
        registry: Arc::new(tcp::Registry::default()),
        events: events.clone(),
        counters: metrics.clone(),
        limits: tcp::Limits {
            max_message_size: cfg.tcp.max_message_size,
            max_headers: cfg.limits.max_headers,
            idle_timeout: cfg.tcp.idle_timeout,
            message_timeout: cfg.tcp.message_timeout,
            connect_timeout: cfg.tcp.connect_timeout,
            max_connections: cfg.tcp.max_connections,
            max_connections_per_source: cfg.tcp.max_connections_per_source,
        },
        admission: Arc::new(tcp::Admission::default()),
        shutdown: shutdown.clone(),
        binds: Arc::new(cfg.listeners.iter().map(|l| l.bind).collect()),
    };
    // TLS: the same limits and admission (tcp.maxConnections counts both), its own registry.
    let tls_shared = tls.map(|tls| tcp::Shared {
        tls: Some(tls),
        registry: Arc::new(tcp::Registry::default()),
        ..tcp_shared.clone()
    });
    // The listeners move to the core's runtime (accepted connections are served there).
    let mut streams = Vec::new();
    for (i, t, l) in tcp_listeners {
        let shared = match (t, &tls_shared) {
            (Transport::Tls, Some(s)) => s.clone(),
            _ => tcp_shared.clone(),
        };
        streams.push((i, l.into_std()?, shared));
    }

    let mut proxy = Proxy::with_metrics(cfg.clone(), dests, metrics.clone());
    proxy.start(Instant::now());
    let (names_tx, names_rx) = watch::channel(host_names(&proxy));
    tokio::spawn(resolve_loop(
        cfg.dns_refresh,
        names_rx,
        events.clone(),
        shutdown.clone(),
    ));
    if let Some(path) = &cfg.record_route.key_file {
        tokio::spawn(watch_route_keys(
            path.clone(),
            cfg.record_route.keys.clone(),
            events.clone(),
            shutdown.clone(),
        ));
    }
    if let Some((path, overrides)) = reload {
        tokio::spawn(reload_on_sighup(
            path,
            overrides,
            events.clone(),
            shutdown.clone(),
        ));
    }
    let core = Core {
        proxy,
        metrics,
        names: names_tx,
        queued: 0,
        udp_limits: udp::Limits {
            max_message_size: cfg.udp.max_message_size,
            max_headers: cfg.limits.max_headers,
        },
    };
    let parts = IoParts {
        cluster: cluster_sock,
        udp: udp_sockets,
        streams,
        tcp: tcp_shared,
        tls: tls_shared,
        events: events.clone(),
        main: tokio::runtime::Handle::current(),
    };
    let done = spawn_core(core, rx, parts, shutdown.clone())?;
    for (t, a) in &bound {
        info!("listening on {t}:{a}");
    }
    Ok(Running {
        sip: bound,
        admin,
        shutdown,
        done,
        handle: Handle { events },
    })
}

/// What the core's thread needs to build its [`Io`]: the UDP sockets are registered with its
/// own runtime there.
struct IoParts {
    cluster: Option<Arc<UdpSocket>>,
    udp: Vec<Option<std::net::UdpSocket>>,
    /// TCP and TLS listeners: (listener index, socket, what its connections share).
    streams: Vec<(usize, std::net::TcpListener, tcp::Shared<Event>)>,
    tcp: tcp::Shared<Event>,
    tls: Option<tcp::Shared<Event>>,
    events: mpsc::Sender<Event>,
    main: tokio::runtime::Handle,
}

/// Runs the core on a thread of its own with a single-threaded runtime: the SIP path (read,
/// handle, write) never leaves that thread. UDP sockets are polled by the core itself; the
/// TCP and TLS connection tasks run on the same runtime, so a message they frame reaches the
/// core without waking another thread. The admin API, the resolver, the peer exchange and
/// signals stay on the main runtime. The core stops when
/// `shutdown` is cancelled or when the main runtime goes away (a test that ends without
/// cancelling). The returned task completes when the core has stopped.
fn spawn_core(
    core: Core,
    rx: mpsc::Receiver<Event>,
    parts: IoParts,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build the core's runtime")?;
    let stop = CancellationToken::new();
    let guard = stop.clone().drop_guard();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let core_stop = stop.clone();
    std::thread::Builder::new()
        .name("lb-core".into())
        .spawn(move || {
            rt.block_on(async move {
                let io = match Io::new(parts) {
                    Ok(io) => io,
                    Err(e) => {
                        tracing::error!("udp sockets: {e}");
                        return;
                    }
                };
                core.run(rx, io, core_stop).await;
            });
            let _ = done_tx.send(());
        })
        .context("cannot start the core's thread")?;
    Ok(tokio::spawn(async move {
        let mut done_rx = done_rx;
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = &mut done_rx => return,
        }
        // Dropping the guard stops the core, here or when this task is dropped with its runtime.
        drop(guard);
        let _ = done_rx.await;
    }))
}

struct Io {
    /// The peer exchange socket, when the proxy shares load.
    cluster: Option<Arc<UdpSocket>>,
    udp: Vec<Option<udp::Socket>>,
    tcp: tcp::Shared<Event>,
    /// Present when a tls listener is configured.
    tls: Option<tcp::Shared<Event>>,
    events: mpsc::Sender<Event>,
    /// The main runtime: name lookups run there.
    main: tokio::runtime::Handle,
}

impl Io {
    fn new(p: IoParts) -> std::io::Result<Io> {
        for (i, l, shared) in p.streams {
            tokio::spawn(tcp::accept(TcpListener::from_std(l)?, i, shared));
        }
        let udp = p
            .udp
            .into_iter()
            .map(|s| s.map(udp::register).transpose())
            .collect::<std::io::Result<_>>()?;
        Ok(Io {
            cluster: p.cluster,
            udp,
            tcp: p.tcp,
            tls: p.tls,
            events: p.events,
            main: p.main,
        })
    }

    fn send(&self, out: Outbound) {
        let addr = match &out.target {
            Target::Addr(a) => *a,
            Target::Host(host, port) => {
                // Resolve off the core, then send.
                let (host, port) = (host.clone(), *port);
                let io = Io {
                    cluster: None,
                    udp: self.udp.clone(),
                    tcp: self.tcp.clone(),
                    tls: self.tls.clone(),
                    events: self.events.clone(),
                    main: self.main.clone(),
                };
                self.main.spawn(async move {
                    match tokio::net::lookup_host((host.as_str(), port))
                        .await
                        .ok()
                        .and_then(|mut a| a.next())
                    {
                        Some(a) => io.send(Outbound {
                            target: Target::Addr(a),
                            ..out
                        }),
                        None => {
                            if let Some(t) = out.on_error {
                                let _ = io.events.send(Event::TransportError(t)).await;
                            }
                        }
                    }
                });
                return;
            }
        };
        match out.transport {
            Transport::Udp => {
                let Some(Some(sock)) = self.udp.get(out.listener) else {
                    return;
                };
                match sock.try_send_to(&out.data, addr) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let sock = sock.clone();
                        tokio::spawn(async move {
                            let _ = udp::send_when_writable(&sock, &out.data, addr).await;
                        });
                    }
                    Err(e) => {
                        debug!(%addr, "udp send failed: {e}");
                        if let Some(t) = out.on_error {
                            let _ = self.events.try_send(Event::TransportError(t));
                        }
                    }
                }
            }
            Transport::Tcp => tcp::send(
                &self.tcp,
                out.listener,
                addr,
                out.conn,
                out.data,
                out.on_error,
                None,
            ),
            Transport::Tls => match &self.tls {
                Some(tls) => tcp::send(
                    tls,
                    out.listener,
                    addr,
                    out.conn,
                    out.data,
                    out.on_error,
                    out.server_name,
                ),
                // The config allows no tls destination without a tls listener.
                None => {
                    if let Some(t) = out.on_error {
                        let _ = self.events.try_send(Event::TransportError(t));
                    }
                }
            },
        }
    }
}

struct Core {
    proxy: Proxy,
    metrics: Arc<Metrics>,
    names: watch::Sender<Names>,
    /// Events waiting in the queue when the current batch began (exported at scrape time).
    queued: usize,
    udp_limits: udp::Limits,
}

impl Core {
    async fn run(mut self, mut rx: mpsc::Receiver<Event>, io: Io, shutdown: CancellationToken) {
        let mut receivers: Vec<Option<udp::Receiver>> = io
            .udp
            .iter()
            .map(|s| s.as_ref().map(|_| udp::Receiver::default()))
            .collect();
        let mut senders: Vec<udp::Sender> = io.udp.iter().map(|_| udp::Sender::default()).collect();
        let mut queues: Vec<Vec<udp::Datagram>> = io.udp.iter().map(|_| Vec::new()).collect();
        let mut outbound = Vec::new();
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        loop {
            // One timer entry, moved only when the next deadline changes: a new entry per turn
            // made tokio wake its own (running) driver through the eventfd every time.
            let next = self.proxy.next_timer();
            if next != armed {
                if let Some(t) = next {
                    sleep.as_mut().reset(t.into());
                }
                armed = next;
            }
            tokio::select! {
                (i, read) = std::future::poll_fn(|cx| udp::poll_read(&io.udp, &mut receivers, cx)) => {
                    match (read, io.udp.get(i), receivers.get(i)) {
                        (Ok(n), Some(Some(sock)), Some(Some(r))) => {
                            self.on_datagrams(Instant::now(), i, sock, r, n);
                        }
                        (Err(e), _, _) => debug!("udp receive: {e}"),
                        _ => {}
                    }
                }
                ev = rx.recv() => {
                    let Some(ev) = ev else { return };
                    self.queued = rx.len();
                    let now = Instant::now();
                    self.handle(now, ev);
                    // Drain what is already queued before flushing.
                    for _ in 0..256 {
                        match rx.try_recv() {
                            Ok(ev) => self.handle(now, ev),
                            Err(_) => break,
                        }
                    }
                }
                _ = &mut sleep, if armed.is_some() => self.proxy.on_timer(Instant::now()),
                _ = shutdown.cancelled() => return,
            }
            self.proxy.drain_outbound(&mut outbound);
            for out in outbound.drain(..) {
                match (out.transport, &out.target, queues.get_mut(out.listener)) {
                    (Transport::Udp, Target::Addr(to), Some(q)) => q.push(udp::Datagram {
                        to: *to,
                        data: out.data,
                        token: out.on_error,
                    }),
                    _ => io.send(out),
                }
            }
            for ((q, sock), sender) in queues.iter_mut().zip(&io.udp).zip(&mut senders) {
                if q.is_empty() {
                    continue;
                }
                match sock {
                    Some(sock) => {
                        sender.send_all(sock, q, |d, e| {
                            debug!(to = %d.to, "udp send failed: {e}");
                            if let Some(t) = d.token {
                                let _ = io.events.try_send(Event::TransportError(t));
                            }
                        });
                    }
                    None => q.clear(),
                }
            }
            if let Some(sock) = &io.cluster {
                if let Some((data, targets)) = self.proxy.take_cluster_outbound(Instant::now()) {
                    for t in targets {
                        if let Err(e) = sock.try_send_to(&data, t) {
                            debug!(peer = %t, "cluster update not sent: {e}");
                        }
                    }
                }
            }
        }
    }

    /// Handles the `n` datagrams UDP listener `listener` just read.
    fn on_datagrams(
        &mut self,
        now: Instant,
        listener: usize,
        sock: &UdpSocket,
        r: &udp::Receiver,
        n: usize,
    ) {
        let limits = self.udp_limits;
        let metrics = &self.metrics;
        let proxy = &mut self.proxy;
        r.each(n, |data, from| {
            if let udp::Received::Message(m) =
                udp::datagram(sock, data, from, listener, limits, metrics)
            {
                proxy.on_message(now, m);
            }
        });
    }

    fn handle(&mut self, now: Instant, ev: Event) {
        let proxy = &mut self.proxy;
        match ev {
            Event::Message(m) => proxy.on_message(now, m),
            Event::TransportError(t) => proxy.on_transport_error(now, t),
            Event::Peer { from, data } => proxy.on_peer(now, from, &data),
            Event::Resolved { id, addr } => {
                let dests = proxy.destinations_mut();
                if let Some(d) = dests.find(&id).and_then(|s| dests.get_mut(s)) {
                    if d.addr != Some(addr) {
                        info!(destination = %id, %addr, "destination address resolved");
                        d.addr = Some(addr);
                    }
                }
            }
            Event::Control(c) => self.control(now, c),
        }
    }

    fn control(&mut self, now: Instant, c: Control) {
        let proxy = &mut self.proxy;
        match c {
            Control::Status(reply) => {
                let _ = reply.send(proxy.status());
            }
            Control::Stats(reply) => {
                let r = proxy.route_stats();
                let _ = reply.send(Stats {
                    dialogs: proxy.dialog_stats(),
                    routed: r.routed,
                    failovers: r.failovers,
                    rejected_no_capacity: r.rejected_no_capacity,
                    malformed: self.metrics.malformed.get(),
                });
            }
            Control::Metrics(reply) => {
                proxy.export_gauges(now);
                self.metrics.event_queue.set(self.queued as i64);
                let _ = reply.send(self.metrics.encode());
            }
            Control::Ready(reply) => {
                let r = if proxy.is_draining() {
                    Err("draining: shutting down")
                } else if !proxy.has_set() {
                    Err("no destination set loaded yet")
                } else {
                    Ok(())
                };
                let _ = reply.send(r);
            }
            Control::Replace(set, reply) => {
                let r = proxy.replace_set(now, &set);
                let _ = reply.send(r);
                self.publish_names();
            }
            Control::Reload(set, reply) => {
                let r = proxy.reload_set(now, set);
                let _ = reply.send(r);
                self.publish_names();
            }
            Control::Manual(id, action, reply) => {
                let _ = reply.send(proxy.set_manual(&id, action));
            }
            Control::Drain(reply) => {
                proxy.start_draining();
                let _ = reply.send(proxy.open_work());
            }
            Control::Cluster(reply) => {
                let _ = reply.send(proxy.cluster_status(now));
            }
            Control::RouteKeys(keys) => proxy.rotate_route_keys(now, keys),
            Control::DrainStatus(target, reply) => {
                let _ = reply.send(proxy.drain_status(now, &target));
            }
            Control::Dialogs(query, reply) => {
                let _ = reply.send(proxy.list_dialogs(now, &query));
            }
            Control::EndDialog(key, reply) => {
                let _ = reply.send(proxy.end_dialog_by_key(now, &key));
            }
            Control::EndDialogs(filter, after, reply) => {
                let _ = reply.send(proxy.end_dialogs(now, &filter, after));
            }
            Control::Alive(reply) => {
                let _ = reply.send(());
            }
            #[cfg(feature = "test-stall")]
            Control::Stall(d) => {
                // The core thread blocks, as a bug would: nothing else runs on it meanwhile.
                warn!("test-stall: the core thread sleeps {d:?}");
                std::thread::sleep(d);
            }
        }
    }

    fn publish_names(&self) {
        let names = host_names(&self.proxy);
        self.names.send_if_modified(|old| {
            let changed = *old != names;
            if changed {
                *old = names;
            }
            changed
        });
    }
}

/// Receives the peers' load updates for the core (checked and applied there).
async fn receive_peers(
    sock: Arc<UdpSocket>,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors of earlier sends (a peer not started yet) land here.
                    debug!("cluster socket: {e}");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let data = bytes::Bytes::copy_from_slice(&buf[..n]);
        if events.send(Event::Peer { from, data }).await.is_err() {
            return;
        }
    }
}

/// Destinations given by host name rather than IP.
fn host_names(proxy: &Proxy) -> Names {
    proxy
        .destinations()
        .visible()
        .filter_map(|d| {
            let u = &d.uri;
            u.ip()
                .is_none()
                .then(|| (d.spec.id.clone(), u.host.clone(), u.port_or_default()))
        })
        .collect()
}

/// Resolves destinations given by host name, at once when the set changes and again every
/// `dns.refreshInterval`, so a name that moved stops getting calls at its old address.
async fn resolve_loop(
    every: Duration,
    mut names: watch::Receiver<Names>,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    loop {
        let list = names.borrow_and_update().clone();
        for (id, host, port) in &list {
            match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(addrs) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    // Prefer IPv4 when both are offered: listeners are usually IPv4.
                    let pick = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first());
                    if let Some(addr) = pick {
                        let ev = Event::Resolved {
                            id: id.clone(),
                            addr: *addr,
                        };
                        if events.send(ev).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => warn!(destination = %id, %host, "cannot resolve: {e}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every.max(Duration::from_secs(1))) => {}
            r = names.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// A queue for control requests (the admin API's), forwarded onto the core's event queue: the
/// admin API speaks the proxy's control API and knows nothing of the runtime's events.
fn control_queue(events: mpsc::Sender<Event>) -> mpsc::Sender<Control> {
    let (tx, mut rx) = mpsc::channel::<Control>(64);
    tokio::spawn(async move {
        while let Some(c) = rx.recv().await {
            if events.send(Event::Control(c)).await.is_err() {
                return;
            }
        }
    });
    tx
}

/// How often `recordRoute.keyFile` is re-read (a Kubernetes Secret volume changes in place).
const KEY_FILE_POLL: Duration = Duration::from_secs(5);

/// Re-reads `recordRoute.keyFile` every few seconds and hands a changed key list to the core.
/// A file that cannot be read or holds a bad key is reported once and changes nothing.
async fn watch_route_keys(
    path: PathBuf,
    mut keys: Vec<Key>,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(KEY_FILE_POLL) => {}
            _ = shutdown.cancelled() => return,
        }
        let new = match read_route_keys(&path) {
            Ok(k) => k,
            Err(e) => {
                if !failing {
                    warn!("{e}; the keys in force stay");
                }
                failing = true;
                continue;
            }
        };
        failing = false;
        if new == keys {
            continue;
        }
        info!(
            "recordRoute.keyFile {} changed: {} key(s), the first signs from now on",
            path.display(),
            new.len()
        );
        keys = new.clone();
        if events
            .send(Event::Control(Control::RouteKeys(new)))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Re-reads the config file on SIGHUP and applies its destination set (other keys need a
/// restart). A file that does not parse is reported and changes nothing.
async fn reload_on_sighup(
    path: PathBuf,
    overrides: Overrides,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP; reloads disabled");
        return;
    };
    loop {
        tokio::select! {
            r = hup.recv() => if r.is_none() { return },
            _ = shutdown.cancelled() => return,
        }
        let set = match Config::load_with(&path, &overrides) {
            Ok(Config {
                destinations: Some(set),
                ..
            }) => set,
            Ok(_) => {
                // No `destinations` key: the file does not manage the set (the operator
                // pushes it), so a SIGHUP (log rotation, say) must not empty it.
                info!(
                    "SIGHUP: {} has no destinations; the set in force stays",
                    path.display()
                );
                continue;
            }
            Err(e) => {
                warn!("SIGHUP: {} not reloaded: {e}", path.display());
                continue;
            }
        };
        let (tx, rx) = oneshot::channel();
        if events
            .send(Event::Control(Control::Reload(set, tx)))
            .await
            .is_err()
        {
            return;
        }
        match rx.await {
            Ok(Ok(Applied::Replaced)) => {
                info!("SIGHUP: destination set reloaded from {}", path.display())
            }
            Ok(Ok(Applied::Unchanged)) => info!("SIGHUP: destination set unchanged"),
            Ok(Err(e)) => warn!("SIGHUP: destination set rejected, the old one stays: {e}"),
            Err(_) => return,
        }
    }
}
