//! Wiring: binds the listeners, runs the transport tasks, the admin server, the resolver and
//! the one task that owns the proxy core.

use anyhow::Context;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::destinations::Destinations;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::sip::Transport;
use crate::transport::{tcp, udp, ErrorToken, Inbound, Outbound, Target};

/// Everything the core task reacts to.
#[derive(Debug)]
pub enum Event {
    Message(Inbound),
    TransportError(ErrorToken),
    /// A destination's host name resolved.
    Resolved {
        id: String,
        addr: SocketAddr,
    },
    Query(Query, oneshot::Sender<serde_json::Value>),
}

#[derive(Debug, Clone, Copy)]
pub enum Query {
    Destinations,
    DialogStats,
    /// Prometheus text exposition.
    Metrics,
}

/// A running proxy: its bound addresses and the handle to stop it.
pub struct Running {
    pub sip: Vec<(Transport, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub done: tokio::task::JoinHandle<()>,
}

/// Binds everything (failing before any traffic when a bind fails) and starts the tasks.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let cfg = Arc::new(cfg);
    let dests = Destinations::from_set(&cfg.destinations).map_err(anyhow::Error::msg)?;
    let shutdown = CancellationToken::new();
    let counters = Arc::new(Metrics::new());
    let (events, rx) = mpsc::channel::<Event>(65_536);

    let mut udp_sockets: Vec<Option<Arc<UdpSocket>>> = Vec::new();
    let mut tcp_listeners = Vec::new();
    let mut bound = Vec::new();
    for (i, l) in cfg.listeners.iter().enumerate() {
        match l.transport {
            Transport::Udp => {
                let s = UdpSocket::bind(l.bind)
                    .await
                    .with_context(|| format!("listeners[{i}]: cannot bind udp:{}", l.bind))?;
                bound.push((Transport::Udp, s.local_addr()?));
                udp_sockets.push(Some(Arc::new(s)));
            }
            Transport::Tcp => {
                let s = TcpListener::bind(l.bind)
                    .await
                    .with_context(|| format!("listeners[{i}]: cannot bind tcp:{}", l.bind))?;
                bound.push((Transport::Tcp, s.local_addr()?));
                tcp_listeners.push((i, s));
                udp_sockets.push(None);
            }
        }
    }
    let admin = match cfg.admin {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("admin.listen: cannot bind {addr}"))?;
            let local = l.local_addr()?;
            tokio::spawn(crate::admin::serve(l, events.clone(), shutdown.clone()));
            Some(local)
        }
        None => None,
    };

    for (i, s) in udp_sockets.iter().enumerate() {
        if let Some(s) = s {
            tokio::spawn(udp::receive(
                s.clone(),
                i,
                events.clone(),
                counters.clone(),
                shutdown.clone(),
            ));
        }
    }
    let tcp_shared = tcp::Shared {
        registry: Arc::new(tcp::Registry::default()),
        events: events.clone(),
        counters: counters.clone(),
        limits: tcp::Limits {
            max_message_size: cfg.tcp.max_message_size,
            idle_timeout: cfg.tcp.idle_timeout,
            connect_timeout: cfg.tcp.connect_timeout,
        },
        shutdown: shutdown.clone(),
        binds: Arc::new(cfg.listeners.iter().map(|l| l.bind).collect()),
    };
    for (i, l) in tcp_listeners {
        tokio::spawn(tcp::accept(l, i, tcp_shared.clone()));
    }
    tokio::spawn(resolve_loop(cfg.clone(), events.clone(), shutdown.clone()));

    let proxy = Proxy::with_metrics(cfg.clone(), dests, counters.clone());
    let io = Io {
        udp: udp_sockets,
        tcp: tcp_shared,
        events: events.clone(),
    };
    let done = tokio::spawn(core_loop(proxy, rx, io, counters, shutdown.clone()));
    for (t, a) in &bound {
        info!("listening on {t}:{a}");
    }
    Ok(Running {
        sip: bound,
        admin,
        shutdown,
        done,
    })
}

struct Io {
    udp: Vec<Option<Arc<UdpSocket>>>,
    tcp: tcp::Shared,
    events: mpsc::Sender<Event>,
}

impl Io {
    fn send(&self, out: Outbound) {
        let addr = match &out.target {
            Target::Addr(a) => *a,
            Target::Host(host, port) => {
                // Resolve off the core task, then send.
                let (host, port) = (host.clone(), *port);
                let io = Io {
                    udp: self.udp.clone(),
                    tcp: self.tcp.clone(),
                    events: self.events.clone(),
                };
                tokio::spawn(async move {
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
                            let _ = sock.send_to(&out.data, addr).await;
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
            ),
        }
    }
}

async fn core_loop(
    mut proxy: Proxy,
    mut rx: mpsc::Receiver<Event>,
    io: Io,
    counters: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let next = proxy.next_timer();
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { return };
                let now = Instant::now();
                handle(&mut proxy, now, ev, &counters);
                // Drain what is already queued before flushing.
                for _ in 0..256 {
                    match rx.try_recv() {
                        Ok(ev) => handle(&mut proxy, now, ev, &counters),
                        Err(_) => break,
                    }
                }
            }
            _ = sleep => proxy.on_timer(Instant::now()),
            _ = shutdown.cancelled() => return,
        }
        for out in proxy.take_outbound() {
            io.send(out);
        }
    }
}

fn handle(proxy: &mut Proxy, now: Instant, ev: Event, counters: &Metrics) {
    match ev {
        Event::Message(m) => proxy.on_message(now, m),
        Event::TransportError(t) => proxy.on_transport_error(now, t),
        Event::Resolved { id, addr } => {
            if let Some(d) = proxy
                .destinations_mut()
                .slots
                .iter_mut()
                .find(|d| d.spec.id == id)
            {
                if d.addr != Some(addr) {
                    info!(destination = %id, %addr, "destination resolved");
                    d.addr = Some(addr);
                }
            }
        }
        Event::Query(q, reply) => {
            let v = match q {
                Query::Destinations => destinations_json(proxy),
                Query::Metrics => {
                    proxy.export_gauges();
                    serde_json::Value::String(counters.encode())
                }
                Query::DialogStats => {
                    let mut v = serde_json::to_value(proxy.dialog_stats()).unwrap_or_default();
                    if let Some(o) = v.as_object_mut() {
                        let r = proxy.route_stats();
                        o.insert("routed".into(), r.routed.into());
                        o.insert("failovers".into(), r.failovers.into());
                        o.insert("rejectedNoCapacity".into(), r.rejected_no_capacity.into());
                        o.insert("malformed".into(), counters.malformed.get().into());
                    }
                    v
                }
            };
            let _ = reply.send(v);
        }
    }
}

fn destinations_json(proxy: &Proxy) -> serde_json::Value {
    let d = proxy.destinations();
    let list: Vec<_> = d
        .slots
        .iter()
        .filter(|x| !x.removed || x.total_load() > 0)
        .map(|x| {
            json!({
                "id": x.spec.id,
                "group": x.spec.group,
                "uri": x.spec.uri,
                "address": x.addr.map(|a| a.to_string()),
                "state": x.state,
                "resources": x.resources,
                "calls": x.calls,
                "held": x.held_until.is_some(),
                "lastChange": x.last_change.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            })
        })
        .collect();
    json!({ "version": d.version, "destinations": list })
}

/// Resolves destinations given by host name, now and every `dns.refreshInterval`, so a name
/// that moved stops getting calls at its old address.
async fn resolve_loop(cfg: Arc<Config>, events: mpsc::Sender<Event>, shutdown: CancellationToken) {
    let names: Vec<(String, String, u16)> = cfg
        .destinations
        .destinations
        .iter()
        .filter_map(|d| {
            let u = crate::sip::SipUri::parse(&d.uri).ok()?;
            u.ip()
                .is_none()
                .then(|| (d.id.clone(), u.host.clone(), u.port_or_default()))
        })
        .collect();
    if names.is_empty() {
        return;
    }
    loop {
        for (id, host, port) in &names {
            match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(mut addrs) => {
                    if let Some(addr) = addrs.next() {
                        let _ = events
                            .send(Event::Resolved {
                                id: id.clone(),
                                addr,
                            })
                            .await;
                    }
                }
                Err(e) => warn!(destination = %id, %host, "cannot resolve: {e}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.dns_refresh.max(Duration::from_secs(1))) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
