//! The proxy core: transactions, failover and dialogs, as a state machine with no I/O.
//!
//! [`Proxy::on_message`] and [`Proxy::on_timer`] take the current time and queue what must be
//! sent in [`Proxy::take_outbound`]. The runtime feeds it from the sockets; tests feed it
//! directly. One task owns it, so no state is shared and nothing on the call path waits on a
//! lock.
//!
//! Behaviour follows RFC 3261 for a transaction-stateful proxy (16.x, 17.x), with the failover
//! of OpenSIPS `lb_start_or_next` + failure route: a branch that times out, or answers with a
//! failover code (408, 5xx by default), is closed properly (CANCEL after a provisional, ACK for
//! a final) and the call goes to the next best destination.

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rustc_hash::FxHashMap as HashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

use crate::cluster::Cluster;
use crate::config::{Config, Listener, RateAction, RateScope};
use crate::destinations::{Destinations, Health};
use crate::dialog::{Dialog, DialogKey, DialogStats, End, Party, Phase};
use crate::limits::{SourceLimiter, Verdict};
use crate::metrics::Metrics;
use crate::routing::{self, Want};
use crate::sip::{
    name_addr_uri, HeaderName, Message, Method, SipUri, StartLine, Transport, Via, BRANCH_COOKIE,
};
use crate::transport::{ErrorToken, Flow, Inbound, Outbound, Target};

/// The longest a 503 with Retry-After keeps a destination from new calls.
const MAX_HOLD: Duration = Duration::from_secs(300);

const ALLOW: &str =
    "INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO, PRACK, NOTIFY, REFER, MESSAGE";

/// Server transaction key (RFC 3261 17.2.3): branch, sent-by and method, with ACK matching
/// INVITE.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ServerKey {
    branch: String,
    sent_by: String,
    method: Method,
}

/// Client transaction key (RFC 3261 17.1.3): our branch and the CSeq method.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    branch: String,
    method: Method,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SState {
    /// Request received, no final response yet.
    Proceeding,
    /// Non-2xx final sent (INVITE: waiting for ACK; others: absorbing retransmissions).
    Completed,
    /// ACK received for a non-2xx final.
    Confirmed,
    /// 2xx forwarded (RFC 6026): absorbs retransmitted INVITEs.
    Accepted,
}

/// Forwarding context of an initial INVITE: the serial failover over destinations.
#[derive(Debug)]
struct Call {
    dialog: DialogKey,
    want_group: u32,
    tried: Vec<usize>,
    attempts: u32,
    /// The live branch, if any.
    branch: Option<ClientKey>,
    /// Best final response received from a server so far.
    best: Option<Message>,
    cancelled: bool,
    received: Instant,
}

#[derive(Debug)]
struct ServerTx {
    id: u64,
    request: Message,
    /// Where responses go.
    reply: Flow,
    state: SState,
    last_response: Option<Bytes>,
    retransmit: Duration,
    /// To tag for responses the proxy itself generates.
    local_tag: String,
    call: Option<Call>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CState {
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
struct ClientTx {
    id: u64,
    /// The request as sent (for retransmission, ACK and CANCEL).
    request: Message,
    out: Outbound,
    state: CState,
    retransmit: Duration,
    /// Upstream transaction; None when the proxy itself sent the request.
    server: Option<ServerKey>,
    /// What the transaction is for, beyond relaying.
    role: Role,
    cancel_pending: bool,
    /// Given up on by the proxy: late responses are absorbed.
    abandoned: bool,
    /// Upstream flow for stateless forwarding of 2xx retransmissions.
    upstream: Option<Flow>,
}

/// What a client transaction is for, beyond relaying a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A relayed in-dialog request, or one the proxy sends itself (CANCEL, BYE).
    Plain,
    /// A branch of an initial INVITE to the destination in (slot, uid).
    Branch(usize, u64),
    /// An OPTIONS health probe of the destination in (slot, uid), sent at that time.
    Probe(usize, u64, Instant),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    ClientRetransmit(u64),
    ClientTimeout(u64),
    ClientFinalTimeout(u64),
    ClientCleanup(u64),
    ServerRetransmit(u64),
    ServerTimeout(u64),
    ServerCleanup(u64),
    Dialog(u64),
    /// End of a Retry-After hold on a destination slot.
    Hold(usize),
    /// Time to probe the destination in (slot, uid).
    Probe(usize, u64),
    /// Load sharing: expire silent peers, resend what is unacknowledged.
    Cluster,
}

/// Routing outcome counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RouteStats {
    pub routed: u64,
    pub failovers: u64,
    pub rejected_no_capacity: u64,
}

pub struct Proxy {
    cfg: Arc<Config>,
    dests: Destinations,
    server_txs: HashMap<ServerKey, ServerTx>,
    client_txs: HashMap<ClientKey, ClientTx>,
    dialogs: HashMap<DialogKey, Dialog>,
    server_ids: HashMap<u64, ServerKey>,
    client_ids: HashMap<u64, ClientKey>,
    dialog_ids: HashMap<u64, DialogKey>,
    timers: BinaryHeap<Reverse<(Instant, u64, Timer)>>,
    out: Vec<Outbound>,
    rng: SmallRng,
    serial: u64,
    branch_prefix: String,
    /// Our own host:port pairs, for Route and Via matching.
    self_addrs: Vec<(String, u16)>,
    /// Shutting down: new calls get 503.
    draining: bool,
    /// Server transactions in `Proceeding` (no final response yet): `limits.maxPendingTransactions`.
    pending: usize,
    /// The per-source rate limit of new requests (`limits.perSource`), when on.
    limiter: Option<SourceLimiter>,
    /// To tag of the 503s the proxy sends statelessly (overload): the ACKs they draw carry it
    /// and are absorbed without any state kept.
    reject_tag: String,
    /// Gauges: active and early dialogs (the counters live in `metrics`).
    stats: DialogStats,
    metrics: Arc<Metrics>,
    /// Load sharing with other replicas, when configured.
    cluster: Option<Cluster>,
    /// Signs our Record-Route and checks the Route of requests in dialogs we do not hold.
    route_keys: RouteKeys,
}

impl Proxy {
    pub fn new(cfg: Arc<Config>, dests: Destinations) -> Proxy {
        Proxy::with_metrics(cfg, dests, Arc::new(Metrics::new()))
    }

    pub fn with_metrics(cfg: Arc<Config>, dests: Destinations, metrics: Arc<Metrics>) -> Proxy {
        Proxy::seeded(cfg, dests, metrics, SmallRng::from_entropy())
    }

    /// As [`Proxy::with_metrics`], with a fixed random seed: branches, tags and probe offsets
    /// come out the same on every run, so that a fuzzer's input replays exactly.
    #[doc(hidden)]
    pub fn with_seed(
        cfg: Arc<Config>,
        dests: Destinations,
        metrics: Arc<Metrics>,
        seed: u64,
    ) -> Proxy {
        Proxy::seeded(cfg, dests, metrics, SmallRng::seed_from_u64(seed))
    }

    fn seeded(
        cfg: Arc<Config>,
        dests: Destinations,
        metrics: Arc<Metrics>,
        mut rng: SmallRng,
    ) -> Proxy {
        let branch_prefix = format!("{BRANCH_COOKIE}-lb{:08x}-", rng.gen::<u32>());
        let cluster = cfg.cluster.as_ref().map(|c| Cluster::new(c, rng.gen()));
        let reject_tag = format!(
            "{}{:016x}",
            crate::sip::STATELESS_TAG_PREFIX,
            rng.gen::<u64>()
        );
        let limiter = cfg.limits.per_source.as_ref().map(SourceLimiter::new);
        let route_keys = RouteKeys::new(cfg.record_route.keys.clone());
        let mut self_addrs = Vec::new();
        for l in &cfg.listeners {
            self_addrs.push((l.advertise.host.to_ascii_lowercase(), l.advertise.port));
            self_addrs.push((l.bind.ip().to_string(), l.bind.port()));
        }
        Proxy {
            cfg,
            dests,
            server_txs: HashMap::default(),
            client_txs: HashMap::default(),
            dialogs: HashMap::default(),
            server_ids: HashMap::default(),
            client_ids: HashMap::default(),
            dialog_ids: HashMap::default(),
            timers: BinaryHeap::new(),
            out: Vec::new(),
            rng,
            serial: 0,
            branch_prefix,
            self_addrs,
            draining: false,
            pending: 0,
            limiter,
            reject_tag,
            stats: DialogStats::default(),
            metrics,
            cluster,
            route_keys,
        }
    }

    pub fn destinations(&self) -> &Destinations {
        &self.dests
    }

    pub fn destinations_mut(&mut self) -> &mut Destinations {
        &mut self.dests
    }

    pub fn dialog_stats(&self) -> DialogStats {
        let m = &self.metrics;
        DialogStats {
            active: self.stats.active,
            early: self.stats.early,
            processed: m.dialogs_processed.get(),
            expired: m.dialogs_expired.get(),
            failed: m.dialogs_failed.get(),
        }
    }

    pub fn route_stats(&self) -> RouteStats {
        let m = &self.metrics;
        RouteStats {
            routed: m.routed.get(),
            failovers: m.failovers.get(),
            rejected_no_capacity: m.rejected_no_capacity.get(),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Messages queued for sending since the last call.
    pub fn take_outbound(&mut self) -> Vec<Outbound> {
        std::mem::take(&mut self.out)
    }

    /// When the next timer is due.
    pub fn next_timer(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _, _))| *t)
    }

    /// Server transactions waiting for a final response.
    pub fn pending_transactions(&self) -> usize {
        self.pending
    }

    /// Sources in the per-source rate limit table (0 when the limit is off).
    pub fn rate_limit_sources(&self) -> usize {
        self.limiter.as_ref().map_or(0, SourceLimiter::len)
    }

    /// Open transactions and dialogs, for tests and diagnostics.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (
            self.server_txs.len(),
            self.client_txs.len(),
            self.dialogs.len(),
        )
    }

    fn next_serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    fn new_branch(&mut self) -> String {
        let n = self.next_serial();
        format!("{}{n:x}", self.branch_prefix)
    }

    fn new_tag(&mut self) -> String {
        format!("lb{:016x}", self.rng.gen::<u64>())
    }

    fn arm(&mut self, at: Instant, t: Timer) {
        let seq = self.next_serial();
        self.timers.push(Reverse((at, seq, t)));
        // Timers are cancelled lazily (a fired timer whose object is gone does nothing), so
        // entries of ended dialogs could pile up for their whole lifetime limit: drop them
        // when they outnumber the live objects.
        let live = self.client_ids.len() + self.server_ids.len() + self.dialog_ids.len();
        if self.timers.len() > 1024 + 4 * live {
            self.compact_timers();
        }
    }

    fn compact_timers(&mut self) {
        let timers = std::mem::take(&mut self.timers);
        self.timers = timers
            .into_iter()
            .filter(|Reverse((_, _, t))| match t {
                Timer::ClientRetransmit(id)
                | Timer::ClientTimeout(id)
                | Timer::ClientFinalTimeout(id)
                | Timer::ClientCleanup(id) => self.client_ids.contains_key(id),
                Timer::ServerRetransmit(id)
                | Timer::ServerTimeout(id)
                | Timer::ServerCleanup(id) => self.server_ids.contains_key(id),
                Timer::Dialog(id) => self.dialog_ids.contains_key(id),
                Timer::Hold(_) | Timer::Probe(..) | Timer::Cluster => true,
            })
            .collect();
    }

    fn listener(&self, i: usize) -> &Listener {
        &self.cfg.listeners[i]
    }

    /// The listener to send from towards `addr` over `transport`: same transport and address
    /// family when there is one.
    fn out_listener(&self, transport: Transport, to_v6: Option<bool>) -> Option<usize> {
        let ls = &self.cfg.listeners;
        ls.iter()
            .position(|l| l.transport == transport && to_v6.is_none_or(|v6| l.bind.is_ipv6() == v6))
            .or_else(|| ls.iter().position(|l| l.transport == transport))
    }

    fn is_self(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.to_ascii_lowercase();
        let port = port.unwrap_or(5060);
        self.self_addrs
            .iter()
            .any(|(h, p)| *h == host && *p == port)
    }

    fn is_self_uri(&self, uri: &SipUri) -> bool {
        self.is_self(&uri.host, Some(uri.port_or_default()))
    }

    // ---- sending ------------------------------------------------------------------------

    fn send(&mut self, flow: Flow, data: Bytes, on_error: Option<ErrorToken>) {
        self.push_out(flow, data, on_error);
    }

    /// Sends a response upstream, counting it by class.
    fn send_response(&mut self, flow: Flow, code: u16, data: Bytes) {
        self.metrics.response_sent(code);
        self.push_out(flow, data, None);
    }

    fn push_out(&mut self, flow: Flow, data: Bytes, on_error: Option<ErrorToken>) {
        let out = self.outbound(flow, data, on_error);
        self.out.push(out);
    }

    fn outbound(&self, flow: Flow, data: Bytes, on_error: Option<ErrorToken>) -> Outbound {
        Outbound {
            transport: flow.transport,
            listener: flow.listener,
            target: Target::Addr(flow.remote),
            conn: flow.conn,
            data,
            on_error,
            server_name: match flow.transport {
                Transport::Tls => self.tls_server_name(flow.remote),
                _ => None,
            },
        }
    }

    /// The name a TLS connection to `remote` verifies the server's certificate against: the
    /// host of the destination URI at that address (its name, or its IP literal). None for
    /// any other peer (a client's address, say): the transport then uses the IP.
    fn tls_server_name(&self, remote: SocketAddr) -> Option<Arc<str>> {
        self.dests
            .slots
            .iter()
            .find(|d| d.addr == Some(remote) && d.transport == Transport::Tls)
            .map(|d| Arc::from(d.uri.host.as_str()))
    }

    /// Sends a response the proxy generates to a request it received, statelessly: a request
    /// without To tag gets the stateless tag, so the ACK of an error answered here (400 for no
    /// From tag, 482, 483) is recognised and absorbed like the 503's.
    fn reply(&mut self, req: &Message, flow: Flow, code: u16, reason: &str) {
        let tag = self.reject_tag.clone();
        let resp = self.make_response(req, code, reason, Some(&tag));
        let target = self.response_flow(req, flow);
        self.send_response(target, code, resp.to_bytes());
    }

    /// Answers `503` with Retry-After statelessly: no transaction, no dialog. The To tag is
    /// [`Proxy::reject_tag`] ([`crate::sip::STATELESS_TAG_PREFIX`]), by which the caller's ACK is
    /// recognised and absorbed.
    fn reject(&mut self, req: &Message, flow: Flow) {
        let tag = (req.to_tag().is_none()).then(|| self.reject_tag.clone());
        let resp = self.make_response(req, 503, "Service Unavailable", tag.as_deref());
        let target = self.response_flow(req, flow);
        self.send_response(target, 503, resp.to_bytes());
    }

    /// Whether a new server transaction may start; answers 503 and counts it when not.
    fn admit_transaction(&mut self, req: &Message, flow: Flow) -> bool {
        if self.pending < self.cfg.limits.max_pending_transactions {
            return true;
        }
        self.metrics.limited_transactions.inc();
        debug!(
            call_id = req.call_id().unwrap_or_default(),
            pending = self.pending,
            "limits.maxPendingTransactions reached: 503"
        );
        if req.method() == Some(&Method::Invite) && req.to_tag().is_none() {
            self.metrics.dialogs_processed.inc();
            self.metrics.dialogs_failed.inc();
        }
        self.reject(req, flow);
        false
    }

    /// The per-source rate limit (Kamailio `pike`), for a request outside a dialog; answers
    /// or drops it and returns false when its source is over the rate.
    fn within_rate(&mut self, now: Instant, req: &Message, method: &Method, flow: Flow) -> bool {
        let Some(limiter) = self.limiter.as_mut() else {
            return true;
        };
        let Some(p) = self.cfg.limits.per_source.as_ref() else {
            return true;
        };
        if p.scope == RateScope::Invite && *method != Method::Invite {
            return true;
        }
        match limiter.check(flow.remote.ip(), now) {
            Verdict::Allow => true,
            Verdict::Untracked => {
                self.metrics.rate_limit_untracked.inc();
                true
            }
            Verdict::Limit => {
                self.metrics.limited_source_rate.inc();
                if p.action == RateAction::Reject {
                    if *method == Method::Invite {
                        self.metrics.dialogs_processed.inc();
                        self.metrics.dialogs_failed.inc();
                    }
                    self.reject(req, flow);
                }
                false
            }
        }
    }

    fn make_response(
        &mut self,
        req: &Message,
        code: u16,
        reason: &str,
        tag: Option<&str>,
    ) -> Message {
        let mut resp = req.response(code, reason);
        if code > 100 && req.to_tag().is_none() {
            let tag = match tag {
                Some(t) => t.to_string(),
                None => self.new_tag(),
            };
            if let Some(to) = resp.headers.iter_mut().find(|(n, _)| *n == HeaderName::To) {
                to.1.push_str(";tag=");
                to.1.push_str(&tag);
            }
        }
        match code {
            405 | 200 if req.method() != Some(&Method::Invite) => {
                resp.push(HeaderName::Allow, ALLOW.to_string())
            }
            503 => resp.push(
                HeaderName::RetryAfter,
                self.cfg.routing.retry_after.as_secs().max(1).to_string(),
            ),
            _ => {}
        }
        resp.push(
            HeaderName::Server,
            concat!("mrcp-lb/", env!("CARGO_PKG_VERSION")).to_string(),
        );
        resp
    }

    /// Where responses to a request go (RFC 3261 18.2.2, RFC 3581): over the connection it
    /// came on for TCP; for UDP to the source address when `rport` was asked for, otherwise to
    /// the source IP and the Via port.
    fn response_flow(&self, req: &Message, flow: Flow) -> Flow {
        if flow.transport.is_stream() {
            return flow;
        }
        match req.top_via() {
            Some(v) if v.param("rport").is_none() => Flow {
                remote: SocketAddr::new(flow.remote.ip(), v.port.unwrap_or(5060)),
                ..flow
            },
            _ => flow,
        }
    }

    /// Where a response goes when no transaction remembers it: the next Via.
    fn via_flow(&self, via: &Via) -> Option<Flow> {
        let transport = Transport::parse(&via.transport)?;
        let ip = via
            .param("received")
            .flatten()
            .and_then(|r| r.parse().ok())
            .or_else(|| via.host.parse().ok())?;
        let port = via
            .param("rport")
            .flatten()
            .and_then(|p| p.parse().ok())
            .or(via.port)
            .unwrap_or(transport.default_port());
        let remote = SocketAddr::new(ip, port);
        let listener = self.out_listener(transport, Some(remote.is_ipv6()))?;
        Some(Flow {
            transport,
            listener,
            remote,
            conn: None,
        })
    }

    // ---- entry points ---------------------------------------------------------------------

    /// Handles one message from the network.
    pub fn on_message(&mut self, now: Instant, inbound: Inbound) {
        let Inbound { msg, flow } = inbound;
        if msg.is_request() {
            self.on_request(now, msg, flow);
        } else {
            self.on_response(now, msg, flow);
        }
    }

    /// Runs every timer due at `now`.
    pub fn on_timer(&mut self, now: Instant) {
        while let Some(Reverse((at, _, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, _, timer))) = self.timers.pop() else {
                break;
            };
            self.fire(now, timer);
        }
    }

    /// A send failed (TCP connect refused, name did not resolve): the transaction that sent it
    /// treats it as a timeout at once (RFC 3261 8.1.3.1).
    pub fn on_transport_error(&mut self, now: Instant, token: ErrorToken) {
        if let Some(key) = self.client_ids.get(&token).cloned() {
            debug!(branch = %key.branch, "transport error");
            self.client_timeout(now, key, true);
        }
    }

    // ---- requests -------------------------------------------------------------------------

    fn on_request(&mut self, now: Instant, mut msg: Message, flow: Flow) {
        let Some(via) = msg.top_via() else { return };
        let Some(method) = msg.method().cloned() else {
            return;
        };
        self.metrics.request(&method);
        // RFC 3581: note where the request really came from.
        if flow.remote.ip().to_string() != via.host || via.param("rport").is_some() {
            let mut v = via.clone();
            v.set_param("received", Some(flow.remote.ip().to_string()));
            if v.param("rport").is_some() {
                v.set_param("rport", Some(flow.remote.port().to_string()));
            }
            if let Some(h) = msg.headers.iter_mut().find(|(n, _)| *n == HeaderName::Via) {
                h.1 = v.to_string();
            }
        }
        let branch = via.branch().unwrap_or_default().to_string();
        let key = ServerKey {
            branch,
            sent_by: via.sent_by(),
            method: if method == Method::Ack {
                Method::Invite
            } else {
                method.clone()
            },
        };
        match method {
            Method::Ack => return self.on_ack(now, msg, flow, key),
            Method::Cancel => return self.on_cancel(now, msg, flow, key),
            _ => {}
        }
        // A retransmission: answer with the last response, forward nothing.
        if let Some(tx) = self.server_txs.get(&key) {
            if let Some(last) = tx.last_response.clone() {
                let reply = tx.reply;
                self.send(reply, last, None);
            }
            return;
        }
        if msg.to_tag().is_some() {
            return self.in_dialog(now, msg, flow, key);
        }
        // Out of a dialog: the per-source rate, before any routing work.
        if !self.within_rate(now, &msg, &method, flow) {
            return;
        }
        match method {
            Method::Invite => self.initial_invite(now, msg, flow, key),
            // A health check of the proxy itself: going away while draining.
            Method::Options if self.draining => self.reply(&msg, flow, 503, "Service Unavailable"),
            Method::Options => self.reply(&msg, flow, 200, "OK"),
            _ => self.reply(&msg, flow, 405, "Method Not Allowed"),
        }
    }

    /// Checks Max-Forwards and loops before a request is forwarded; answers and returns false
    /// when it must not be.
    fn may_forward(&mut self, msg: &Message, flow: Flow) -> bool {
        if msg.max_forwards() == Some(0) {
            self.reply(msg, flow, 483, "Too Many Hops");
            return false;
        }
        // Only a Via carrying our branch prefix can be ours: parse just those.
        let looped = msg
            .get_all(&HeaderName::Via)
            .filter(|v| v.contains(self.branch_prefix.as_str()))
            .filter_map(Via::parse)
            .any(|v| {
                self.is_self(&v.host, v.port)
                    && v.branch()
                        .is_some_and(|b| b.starts_with(&self.branch_prefix))
            });
        if looped {
            self.reply(msg, flow, 482, "Loop Detected");
            return false;
        }
        true
    }

    /// Decrements Max-Forwards (or adds it) and pushes our Via for the listener used.
    fn prepare_forward(&mut self, msg: &mut Message, out_listener: usize, branch: &str) {
        match msg.max_forwards() {
            Some(n) => msg.set(HeaderName::MaxForwards, n.saturating_sub(1).to_string()),
            None => msg.set(HeaderName::MaxForwards, "70".to_string()),
        }
        let l = self.listener(out_listener);
        let mut via = format!(
            "SIP/2.0/{} {};branch={branch}",
            l.transport.as_str(),
            l.advertise
        );
        if l.transport == Transport::Udp {
            via.push_str(";rport");
        }
        msg.push_front(HeaderName::Via, via);
    }

    /// Our Record-Route entry for `listener`, carrying the token when a key is configured.
    fn record_route_uri(&self, listener: usize, double: bool, token: Option<&str>) -> String {
        let l = self.listener(listener);
        let mut uri = format!("<sip:{};transport={};lr", l.advertise, l.transport.lower());
        if double {
            uri.push_str(";r2=on");
        }
        if let Some(t) = token {
            uri.push_str(&format!(";{}={t}", relay::TOKEN_PARAM));
        }
        uri.push('>');
        uri
    }

    fn new_server_tx(&mut self, msg: Message, flow: Flow, key: &ServerKey) -> u64 {
        let id = self.next_serial();
        let reply = self.response_flow(&msg, flow);
        let local_tag = self.new_tag();
        self.pending += 1;
        self.server_txs.insert(
            key.clone(),
            ServerTx {
                id,
                request: msg,
                reply,
                state: SState::Proceeding,
                last_response: None,
                retransmit: self.cfg.timers.t1,
                local_tag,
                call: None,
            },
        );
        self.server_ids.insert(id, key.clone());
        id
    }

    fn initial_invite(&mut self, now: Instant, msg: Message, flow: Flow, key: ServerKey) {
        if !self.may_forward(&msg, flow) {
            return;
        }
        let (Some(call_id), Some(from_tag)) = (msg.call_id(), msg.from_tag()) else {
            return self.reply(&msg, flow, 400, "Missing From tag");
        };
        let dkey = DialogKey {
            call_id: call_id.to_string(),
            caller_tag: from_tag.to_string(),
        };
        if self.dialogs.contains_key(&dkey) {
            // Same Call-ID and From tag with a new branch: a merged request (RFC 3261 8.2.2.2).
            return self.reply(&msg, flow, 482, "Loop Detected");
        }
        let listener = self.listener(flow.listener);
        let want_group = listener.group;
        let resources = Arc::new(listener.resources.clone());
        // Calls that cannot be taken are refused before any state is kept: under overload
        // each costs one response and nothing more.
        if self.draining {
            self.metrics.dialogs_processed.inc();
            self.metrics.dialogs_failed.inc();
            return self.reject(&msg, flow);
        }
        if self.dialogs.len() >= self.cfg.dialogs.max {
            debug!(call_id = %dkey.call_id, "dialogs.max reached: 503");
            self.metrics.limited_dialogs.inc();
            self.metrics.dialogs_processed.inc();
            self.metrics.dialogs_failed.inc();
            return self.reject(&msg, flow);
        }
        let want = Want {
            group: want_group,
            resources: &resources,
        };
        let first = routing::choose(
            &self.dests.slots,
            want,
            &[],
            self.cfg.routing.policy,
            &mut self.rng,
        );
        let Some(first) = first else {
            self.metrics.rejected_no_capacity.inc();
            self.metrics.dialogs_processed.inc();
            self.metrics.dialogs_failed.inc();
            self.metrics.invite_setup.observe(0.0);
            info!(call_id = %dkey.call_id, status = 503, "call: no destination with capacity");
            return self.reject(&msg, flow);
        };
        if !self.admit_transaction(&msg, flow) {
            return;
        }
        let trying = self.make_response(&msg, 100, "Trying", None).to_bytes();
        self.new_server_tx(msg.clone(), flow, &key);
        let reply = self.server_txs.get(&key).map(|t| t.reply);
        if let Some(reply) = reply {
            self.send_response(reply, 100, trying.clone());
        }
        if let Some(tx) = self.server_txs.get_mut(&key) {
            tx.last_response = Some(trying);
        }
        let callee_contact = None;
        let id = self.next_serial();
        let dialog = Dialog {
            id,
            phase: Phase::Trying,
            dest: None,
            resources,
            created: now,
            lifetime_deadline: now + self.cfg.dialogs.lifetime,
            session_deadline: None,
            to_tag: None,
            from_hdr: msg.get(&HeaderName::From).unwrap_or_default().to_string(),
            to_hdr: msg.get(&HeaderName::To).unwrap_or_default().to_string(),
            caller: Party {
                contact: contact_target(&msg),
                flow: Some(flow),
                routes: msg
                    .get_all(&HeaderName::RecordRoute)
                    .map(str::to_string)
                    .collect(),
                cseq: msg.cseq().map(|c| c.0).unwrap_or(0),
            },
            callee: Party {
                contact: callee_contact,
                flow: None,
                routes: Vec::new(),
                cseq: 0,
            },
        };
        self.metrics.dialogs_processed.inc();
        self.dialogs.insert(dkey.clone(), dialog);
        self.dialog_ids.insert(id, dkey.clone());
        if let Some(tx) = self.server_txs.get_mut(&key) {
            tx.call = Some(Call {
                dialog: dkey,
                want_group,
                tried: Vec::new(),
                attempts: 0,
                branch: None,
                best: None,
                cancelled: false,
                received: now,
            });
        }
        self.branch_to(now, &key, first);
    }

    /// Sends the INVITE of `key` to the best destination not tried yet, or ends the call.
    fn try_next(&mut self, now: Instant, key: &ServerKey) {
        let Some(tx) = self.server_txs.get(key) else {
            return;
        };
        let Some(call) = tx.call.as_ref() else { return };
        let Some(dialog) = self.dialogs.get(&call.dialog) else {
            // A BYE ended the early dialog (RFC 3261 15): no other branch, and the INVITE
            // still needs its final response.
            return self.final_local(now, key, 487, "Request Terminated");
        };
        let resources = dialog.resources.clone();
        let choice = if call.attempts >= self.cfg.routing.max_attempts {
            None
        } else {
            let want = Want {
                group: call.want_group,
                resources: &resources,
            };
            routing::choose(
                &self.dests.slots,
                want,
                &call.tried,
                self.cfg.routing.policy,
                &mut self.rng,
            )
        };
        let Some(slot) = choice else {
            return self.call_failed(now, key);
        };
        self.branch_to(now, key, slot);
    }

    /// Sends the INVITE of `key` to the destination in `slot`.
    fn branch_to(&mut self, now: Instant, key: &ServerKey, slot: usize) {
        let Some(resources) = self
            .server_txs
            .get(key)
            .and_then(|tx| tx.call.as_ref())
            .and_then(|call| self.dialogs.get(&call.dialog))
            .map(|d| d.resources.clone())
        else {
            return;
        };
        let Some(dest) = self.dests.get(slot) else {
            return;
        };
        let Some(addr) = dest.addr else { return };
        let dest_transport = dest.transport;
        let dest_uri = dest.uri.clone();
        let dest_id = dest.spec.id.clone();
        let dest_uid = dest.uid;
        let Some(out_l) = self.out_listener(dest_transport, Some(addr.is_ipv6())) else {
            warn!(destination = %dest_id, "no listener for transport {dest_transport}");
            return self.call_failed(now, key);
        };
        let tx = match self.server_txs.get_mut(key) {
            Some(tx) => tx,
            None => return,
        };
        let in_flow = tx.reply;
        let mut fwd = tx.request.clone();
        let Some(call) = tx.call.as_mut() else { return };
        call.tried.push(slot);
        call.attempts += 1;
        if call.attempts > 1 {
            self.metrics.failovers.inc();
        }
        let dkey = call.dialog.clone();
        self.dests.acquire(slot, &resources);
        if let Some(d) = self.dialogs.get_mut(&dkey) {
            d.dest = Some(slot);
            d.callee.flow = Some(Flow {
                transport: dest_transport,
                listener: out_l,
                remote: addr,
                conn: None,
            });
        }
        // Request-URI: the server's own address, keeping the caller's user part.
        let mut ruri = dest_uri.clone();
        if let Some(orig) = fwd.request_uri().and_then(|u| SipUri::parse(u).ok()) {
            ruri.user = orig.user;
        }
        fwd.set_request_uri(ruri.to_string());
        // Record-Route: one entry, or two when the two sides differ (transport or family),
        // signed for this call and destination (the relay rule, relay.rs).
        let token = self
            .route_keys
            .sign(&dkey.call_id, &dkey.caller_tag, &dest_id, addr);
        let token = token.as_deref();
        let in_l = in_flow.listener;
        if in_l == out_l {
            let rr = self.record_route_uri(in_l, false, token);
            fwd.push_front(HeaderName::RecordRoute, rr);
        } else {
            let (rr_in, rr_out) = (
                self.record_route_uri(in_l, true, token),
                self.record_route_uri(out_l, true, token),
            );
            fwd.push_front(HeaderName::RecordRoute, rr_in);
            fwd.push_front(HeaderName::RecordRoute, rr_out);
        }
        let branch = self.new_branch();
        self.prepare_forward(&mut fwd, out_l, &branch);
        let flow = Flow {
            transport: dest_transport,
            listener: out_l,
            remote: addr,
            conn: None,
        };
        let ckey = ClientKey {
            branch,
            method: Method::Invite,
        };
        if let Some(call) = self.server_txs.get_mut(key).and_then(|t| t.call.as_mut()) {
            call.branch = Some(ckey.clone());
        }
        self.metrics.routed.inc();
        debug!(call_id = %dkey.call_id, destination = %dest_id, "INVITE forwarded");
        self.start_client(
            now,
            ckey,
            fwd,
            flow,
            Some(key.clone()),
            Role::Branch(slot, dest_uid),
            Some(in_flow),
        );
    }

    /// Creates a client transaction, sends its request and arms its timers.
    #[allow(clippy::too_many_arguments)]
    fn start_client(
        &mut self,
        now: Instant,
        key: ClientKey,
        request: Message,
        flow: Flow,
        server: Option<ServerKey>,
        role: Role,
        upstream: Option<Flow>,
    ) {
        let id = self.next_serial();
        let data = request.to_bytes();
        let out = self.outbound(flow, data, Some(id));
        self.out.push(out.clone());
        let t = &self.cfg.timers;
        let (t1, invite_timeout, non_invite_timeout) =
            (t.t1, t.invite_timeout, t.non_invite_timeout);
        if flow.transport == Transport::Udp {
            self.arm(now + t1, Timer::ClientRetransmit(id));
        }
        let timeout = match role {
            Role::Probe(..) => self.cfg.probing.timeout,
            _ if key.method == Method::Invite => invite_timeout,
            _ => non_invite_timeout,
        };
        self.arm(now + timeout, Timer::ClientTimeout(id));
        self.client_ids.insert(id, key.clone());
        self.client_txs.insert(
            key,
            ClientTx {
                id,
                request,
                out,
                state: CState::Calling,
                retransmit: t1,
                server,
                role,
                cancel_pending: false,
                abandoned: false,
                upstream,
            },
        );
    }

    /// No destination (left): the best response a server gave, or 503 with Retry-After.
    fn call_failed(&mut self, now: Instant, key: &ServerKey) {
        let Some(tx) = self.server_txs.get_mut(key) else {
            return;
        };
        let Some(call) = tx.call.as_mut() else { return };
        let best = call.best.take();
        let tried = call.tried.len();
        match best {
            Some(resp) if resp.code() != Some(503) => self.final_upstream(now, key, resp),
            _ => {
                if tried == 0 {
                    self.metrics.rejected_no_capacity.inc();
                }
                self.final_local(now, key, 503, "Service Unavailable")
            }
        }
    }

    /// Sends a final response the proxy generates for a server transaction.
    fn final_local(&mut self, now: Instant, key: &ServerKey, code: u16, reason: &str) {
        let Some(tx) = self.server_txs.get(key) else {
            return;
        };
        let req = tx.request.clone();
        let tag = tx.local_tag.clone();
        let mut resp = self.make_response(&req, code, reason, Some(&tag));
        // The request's Via as received (with received/rport) is what the response carries.
        resp.remove_all(&HeaderName::Via);
        for v in req.get_all(&HeaderName::Via) {
            resp.push(HeaderName::Via, v.to_string());
        }
        self.final_upstream(now, key, resp);
    }

    /// Sends a final response upstream and moves the server transaction on.
    fn final_upstream(&mut self, now: Instant, key: &ServerKey, resp: Message) {
        let Some(code) = resp.code() else { return };
        let data = resp.to_bytes();
        let t = self.cfg.timers.clone();
        let Some(tx) = self.server_txs.get_mut(key) else {
            return;
        };
        if matches!(tx.state, SState::Completed | SState::Confirmed) {
            return;
        }
        let reply = tx.reply;
        let id = tx.id;
        let is_invite = key.method == Method::Invite;
        let call = tx.call.take();
        let reliable = reply.transport.is_stream();
        if tx.state == SState::Proceeding {
            self.pending = self.pending.saturating_sub(1);
        }
        if (200..300).contains(&code) {
            // RFC 6026: retransmitted INVITEs are absorbed silently (the UAS retransmits its
            // 2xx itself), so nothing of the request or the response needs keeping: at high
            // call rates these lingering transactions are most of the memory.
            tx.state = SState::Accepted;
            tx.last_response = None;
            tx.request = Message::request(Method::Invite, "");
        } else {
            tx.last_response = Some(data.clone());
            tx.state = SState::Completed;
        }
        self.send_response(reply, code, data);
        if is_invite && !(200..300).contains(&code) {
            if !reliable {
                self.arm(now + t.t1, Timer::ServerRetransmit(id));
            }
            self.arm(now + t.t1 * 64, Timer::ServerTimeout(id));
        } else if is_invite {
            self.arm(now + t.t1 * 64, Timer::ServerCleanup(id));
        } else {
            let wait = if reliable { Duration::ZERO } else { t.t1 * 64 };
            self.arm(now + wait, Timer::ServerCleanup(id));
        }
        if let Some(call) = call {
            let setup = now.saturating_duration_since(call.received);
            self.metrics.invite_setup.observe(setup.as_secs_f64());
            if !(200..300).contains(&code) {
                self.end_dialog(&call.dialog, End::Failed);
            }
            let dest = self
                .dialogs
                .get(&call.dialog)
                .and_then(|d| d.dest)
                .and_then(|s| self.dests.get(s))
                .map(|d| d.spec.id.clone())
                .unwrap_or_else(|| "-".to_string());
            info!(
                call_id = %call.dialog.call_id,
                destination = %dest,
                status = code,
                attempts = call.attempts,
                setup_ms = setup.as_secs_f64() * 1000.0,
                "call"
            );
        }
    }

    fn on_ack(&mut self, now: Instant, msg: Message, flow: Flow, key: ServerKey) {
        // ACK for a non-2xx final we sent: absorbed here (hop-by-hop).
        if let Some(tx) = self.server_txs.get_mut(&key) {
            if tx.state == SState::Completed {
                tx.state = SState::Confirmed;
                let id = tx.id;
                let wait = if tx.reply.transport.is_stream() {
                    Duration::ZERO
                } else {
                    self.cfg.timers.t4
                };
                self.arm(now + wait, Timer::ServerCleanup(id));
                return;
            }
            if tx.state == SState::Confirmed {
                return;
            }
        }
        // ACK for a response sent statelessly (our 503, the transport's 400): nothing to do.
        if msg.to_tag().is_some_and(crate::sip::is_stateless_tag) {
            return;
        }
        // ACK for a 2xx: end to end, routed like any in-dialog request.
        if msg.to_tag().is_some() {
            self.in_dialog(now, msg, flow, key);
        }
    }

    fn on_cancel(&mut self, now: Instant, msg: Message, flow: Flow, key: ServerKey) {
        let invite_key = ServerKey {
            method: Method::Invite,
            ..key
        };
        let Some(tx) = self.server_txs.get_mut(&invite_key) else {
            return self.reply(&msg, flow, 481, "Call/Transaction Does Not Exist");
        };
        let proceeding = tx.state == SState::Proceeding;
        let branch = match tx.call.as_mut() {
            Some(call) if proceeding => {
                call.cancelled = true;
                call.branch.clone()
            }
            _ => None,
        };
        self.reply(&msg, flow, 200, "OK");
        if !proceeding {
            return;
        }
        match branch {
            Some(ckey) => self.cancel_branch(now, &ckey, None),
            // A re-INVITE being relayed, or no live branch: nothing to cancel downstream.
            None => self.final_local(now, &invite_key, 487, "Request Terminated"),
        }
    }

    /// Sends CANCEL on an INVITE branch once it has a provisional response (RFC 3261 9.1),
    /// or marks it to be cancelled when one arrives.
    fn cancel_branch(&mut self, now: Instant, ckey: &ClientKey, reason: Option<&str>) {
        let Some(ctx) = self.client_txs.get_mut(ckey) else {
            return;
        };
        match ctx.state {
            CState::Calling => {
                ctx.cancel_pending = true;
                return;
            }
            CState::Completed | CState::Accepted => return,
            CState::Proceeding => {}
        }
        let req = &ctx.request;
        // RFC 3261 9.1: same Request-URI, top Via, From, To, Call-ID, CSeq number and Route.
        let to = req.get(&HeaderName::To).unwrap_or_default().to_string();
        let mut cancel = same_transaction(req, Method::Cancel, &to);
        if let Some(reason) = reason {
            cancel.push(HeaderName::Reason, reason.to_string());
        }
        let flow = Flow {
            transport: ctx.out.transport,
            listener: ctx.out.listener,
            remote: match ctx.out.target {
                Target::Addr(a) => a,
                Target::Host(..) => return,
            },
            conn: ctx.out.conn,
        };
        let key = ClientKey {
            branch: ckey.branch.clone(),
            method: Method::Cancel,
        };
        if !self.client_txs.contains_key(&key) {
            self.start_client(now, key, cancel, flow, None, Role::Plain, None);
        }
    }

    /// Requests inside a dialog: routed by their Route headers (loose routing), or by the
    /// dialog's memory when the client sends them straight to the proxy without Route.
    fn in_dialog(&mut self, now: Instant, mut msg: Message, flow: Flow, key: ServerKey) {
        let Some(method) = msg.method().cloned() else {
            return;
        };
        let is_ack = method == Method::Ack;
        if !self.may_forward(&msg, flow) {
            return;
        }
        // The relay rule (relay.rs): where it may go, if anywhere.
        let hop = match self.next_hop(now, &mut msg, flow) {
            Ok(hop) => hop,
            Err(Refusal::NoTarget) if !is_ack => {
                self.metrics.relay_refused(Refusal::NoTarget);
                return self.reply(&msg, flow, 481, "Call/Transaction Does Not Exist");
            }
            Err(why) => return self.refuse_relay(&msg, flow, why),
        };
        let mut target = hop.target;
        let (dkey, from_caller) = match hop.dialog {
            Some((k, fc)) => (Some(k), Some(fc)),
            None => (None, None),
        };
        // Send from a listener of the target's transport and family.
        if let Some(l) = self.out_listener(target.transport, Some(target.remote.is_ipv6())) {
            target.listener = l;
        } else {
            if !is_ack {
                self.reply(&msg, flow, 503, "Service Unavailable");
            }
            return;
        }
        if !is_ack && !self.admit_transaction(&msg, flow) {
            return;
        }
        // Track the dialog: CSeq, and BYE ends it.
        if let (Some(k), Some(fc)) = (&dkey, from_caller) {
            let seq = msg.cseq().map(|c| c.0).unwrap_or(0);
            if let Some(d) = self.dialogs.get_mut(k) {
                let party = if fc { &mut d.caller } else { &mut d.callee };
                party.cseq = party.cseq.max(seq);
                if !is_ack {
                    party.flow = Some(flow);
                }
            }
            if method == Method::Bye {
                self.end_dialog(k, End::Normal);
            }
        } else if method == Method::Bye && dkey.is_none() {
            // Set up through another replica (or before a restart): its owner frees the load.
            self.announce_end(&msg);
        }
        if is_ack {
            // Stateless, but the branch must be unique and stable across retransmissions.
            let branch = format!("{}a{:x}", self.branch_prefix, fxhash(&key.branch));
            self.prepare_forward(&mut msg, target.listener, &branch);
            self.send(target, msg.to_bytes(), None);
            return;
        }
        let upstream = self.response_flow(&msg, flow);
        self.new_server_tx(msg.clone(), flow, &key);
        if method == Method::Invite {
            let trying = self.make_response(&msg, 100, "Trying", None).to_bytes();
            self.send_response(upstream, 100, trying.clone());
            if let Some(tx) = self.server_txs.get_mut(&key) {
                tx.last_response = Some(trying);
            }
        }
        let branch = self.new_branch();
        self.prepare_forward(&mut msg, target.listener, &branch);
        let ckey = ClientKey { branch, method };
        self.start_client(
            now,
            ckey,
            msg,
            target,
            Some(key),
            Role::Plain,
            Some(upstream),
        );
    }

    fn find_dialog(&self, msg: &Message) -> Option<DialogKey> {
        let call_id = msg.call_id()?.to_string();
        for tag in [msg.from_tag(), msg.to_tag()].into_iter().flatten() {
            let k = DialogKey {
                call_id: call_id.clone(),
                caller_tag: tag.to_string(),
            };
            if self.dialogs.contains_key(&k) {
                return Some(k);
            }
        }
        None
    }

    /// Where a URI points: its transport and address, when the host is an IP literal or a
    /// known destination's host name.
    fn uri_flow(&self, uri: &SipUri) -> Option<Flow> {
        let transport = uri.transport();
        let remote = uri.socket_addr().or_else(|| {
            self.dests
                .slots
                .iter()
                .find(|d| d.uri.host.eq_ignore_ascii_case(&uri.host) && d.uri.port == uri.port)
                .and_then(|d| d.addr)
        })?;
        Some(Flow {
            transport,
            listener: self.out_listener(transport, Some(remote.is_ipv6()))?,
            remote,
            conn: None,
        })
    }

    // ---- responses ------------------------------------------------------------------------

    fn on_response(&mut self, now: Instant, mut msg: Message, _flow: Flow) {
        let Some(via) = msg.top_via() else { return };
        let Some(code) = msg.code() else { return };
        let Some((_, method)) = msg.cseq() else {
            return;
        };
        let branch = via.branch().unwrap_or_default().to_string();
        let key = ClientKey {
            branch,
            method: method.clone(),
        };
        let Some(ctx) = self.client_txs.get_mut(&key) else {
            // No transaction: forward 2xx to INVITE statelessly if the Via is ours
            // (retransmissions after the transaction ended).
            // Only a branch this process made: a forged response relays nothing.
            if (200..300).contains(&code)
                && method == Method::Invite
                && self.is_self(&via.host, via.port)
                && key.branch.starts_with(&self.branch_prefix)
            {
                msg.remove_first(&HeaderName::Via);
                if let Some(next) = msg.top_via().and_then(|v| self.via_flow(&v)) {
                    self.send_response(next, code, msg.to_bytes());
                }
            }
            return;
        };
        if ctx.server.is_some() && msg.count(&HeaderName::Via) < 2 {
            // Nothing to relay it to: the server dropped the caller's Via.
            debug!(branch = %key.branch, "response without the caller's Via dropped");
            return;
        }
        let id = ctx.id;
        let reliable = ctx.out.transport.is_stream();
        let is_invite = method == Method::Invite;
        // Retransmitted final on a completed transaction.
        if matches!(ctx.state, CState::Completed | CState::Accepted) {
            if is_invite && (200..300).contains(&code) {
                // A 2xx retransmission: relayed, unless the branch was given up on (then our
                // own ACK and BYE have already answered it).
                if let Some(up) = ctx.upstream.filter(|_| !ctx.abandoned) {
                    msg.remove_first(&HeaderName::Via);
                    self.send_response(up, code, msg.to_bytes());
                }
            } else if is_invite && ctx.state == CState::Completed {
                let ack = make_ack(&ctx.request, &msg);
                let out = Outbound {
                    data: ack.to_bytes(),
                    on_error: None,
                    ..ctx.out.clone()
                };
                self.out.push(out);
            }
            return;
        }
        if code < 200 {
            let was_calling = ctx.state == CState::Calling;
            ctx.state = CState::Proceeding;
            let cancel_pending = ctx.cancel_pending;
            let abandoned = ctx.abandoned;
            let server = ctx.server.clone();
            if is_invite && was_calling {
                self.arm(
                    now + self.cfg.timers.invite_final_timeout,
                    Timer::ClientFinalTimeout(id),
                );
            }
            if !is_invite && was_calling && !reliable {
                // Non-INVITE in Proceeding retransmits at T2.
                if let Some(c) = self.client_txs.get_mut(&key) {
                    c.retransmit = self.cfg.timers.t2;
                }
            }
            // Cancelled by the caller, or given up on after a timeout: stop it ringing.
            if cancel_pending || (abandoned && is_invite) {
                return self.cancel_branch(now, &key, None);
            }
            if abandoned || code == 100 {
                return;
            }
            if let Some(skey) = server {
                if is_invite {
                    self.note_provisional(&skey, &msg);
                }
                msg.remove_first(&HeaderName::Via);
                let data = msg.to_bytes();
                if let Some(stx) = self.server_txs.get_mut(&skey) {
                    if stx.state == SState::Proceeding {
                        stx.last_response = Some(data.clone());
                        let reply = stx.reply;
                        self.send_response(reply, code, data);
                    }
                }
            }
            return;
        }
        // Final response.
        ctx.state = if is_invite && (200..300).contains(&code) {
            CState::Accepted
        } else {
            CState::Completed
        };
        if ctx.state == CState::Accepted && !ctx.abandoned {
            // Only the upstream flow is needed from now on (to relay 2xx retransmissions).
            ctx.request = Message::request(Method::Invite, "");
            ctx.out.data = Bytes::new();
        }
        let abandoned = ctx.abandoned;
        let server = ctx.server.clone();
        let role = ctx.role;
        let cleanup = if reliable {
            Duration::ZERO
        } else if is_invite {
            self.cfg.timers.t1 * 64
        } else {
            self.cfg.timers.t4
        };
        if is_invite && !(200..300).contains(&code) {
            let ack = make_ack(&ctx.request, &msg);
            let out = Outbound {
                data: ack.to_bytes(),
                on_error: None,
                ..ctx.out.clone()
            };
            self.out.push(out);
        }
        self.arm(now + cleanup, Timer::ClientCleanup(id));
        if abandoned {
            if (200..300).contains(&code) && is_invite {
                self.hang_up_late_answer(now, &key, &msg);
            }
            return;
        }
        if let Role::Probe(slot, uid, sent) = role {
            let alive = self.cfg.probing.is_alive(code);
            return self.probe_result(
                slot,
                uid,
                code,
                alive.then(|| now.saturating_duration_since(sent)),
            );
        }
        let Some(skey) = server else {
            return; // Our own request (CANCEL, expiry BYE): nothing to relay.
        };
        let is_call = self.server_txs.get(&skey).is_some_and(|t| t.call.is_some());
        if is_invite && is_call {
            let dest = match role {
                Role::Branch(slot, uid) => Some((slot, uid)),
                _ => None,
            };
            self.branch_final(now, &skey, msg, dest);
        } else {
            if is_invite && (200..300).contains(&code) {
                self.refresh_session(now, &msg);
            }
            msg.remove_first(&HeaderName::Via);
            self.final_upstream(now, &skey, msg);
        }
    }

    /// A provisional with a To tag makes the dialog early.
    fn note_provisional(&mut self, skey: &ServerKey, msg: &Message) {
        let Some(dkey) = self
            .server_txs
            .get(skey)
            .and_then(|t| t.call.as_ref())
            .map(|c| c.dialog.clone())
        else {
            return;
        };
        if msg.to_tag().is_none() {
            return;
        }
        if let Some(d) = self.dialogs.get_mut(&dkey) {
            if d.phase == Phase::Trying {
                d.phase = Phase::Early;
                self.stats.early += 1;
            }
        }
    }

    /// A final response on the live branch of an initial INVITE.
    fn branch_final(
        &mut self,
        now: Instant,
        skey: &ServerKey,
        mut msg: Message,
        dest: Option<(usize, u64)>,
    ) {
        let Some(code) = msg.code() else { return };
        if code == 503 {
            if let (Some((slot, uid)), Some(secs)) = (dest, retry_after(&msg)) {
                self.hold(now, slot, uid, secs);
            }
        }
        let Some(call) = self.server_txs.get_mut(skey).and_then(|t| t.call.as_mut()) else {
            return;
        };
        call.branch = None;
        let dkey = call.dialog.clone();
        let cancelled = call.cancelled;
        msg.remove_first(&HeaderName::Via);
        if (200..300).contains(&code) {
            self.confirm_dialog(now, &dkey, &msg);
            return self.final_upstream(now, skey, msg);
        }
        self.release_branch(&dkey);
        let failover = self
            .cfg
            .routing
            .failover_codes
            .iter()
            .any(|c| c.matches(code));
        if cancelled || !failover {
            return self.final_upstream(now, skey, msg);
        }
        if let Some(call) = self.server_txs.get_mut(skey).and_then(|t| t.call.as_mut()) {
            let better = match &call.best {
                None => true,
                Some(b) => rank(code) < rank(b.code().unwrap_or(500)),
            };
            if better {
                call.best = Some(msg);
            }
        }
        self.try_next(now, skey);
    }

    /// A server that answered 503 with Retry-After takes no new calls for that long
    /// (RFC 3261 21.5.4), capped at [`MAX_HOLD`].
    fn hold(&mut self, now: Instant, slot: usize, uid: u64, secs: u64) {
        let until = now + Duration::from_secs(secs).min(MAX_HOLD);
        if let Some(d) = self.dests.live_mut(slot, uid) {
            if d.held_until.is_none_or(|h| h < until) {
                debug!(destination = %d.spec.id, secs, "503 with Retry-After: destination held");
                d.held_until = Some(until);
                self.arm(until, Timer::Hold(slot));
            }
        }
    }

    /// The branch's destination stops carrying the call's load.
    fn release_branch(&mut self, dkey: &DialogKey) {
        if let Some(d) = self.dialogs.get_mut(dkey) {
            if let Some(slot) = d.dest.take() {
                self.dests.release(slot, &d.resources);
            }
            if d.phase == Phase::Early {
                d.phase = Phase::Trying;
                self.stats.early = self.stats.early.saturating_sub(1);
            }
        }
    }

    fn confirm_dialog(&mut self, now: Instant, dkey: &DialogKey, msg: &Message) {
        let session_timer = self.cfg.dialogs.session_timer;
        // Record-Route entries above ours are the callee's side of the route set; towards the
        // callee the next hop is the entry just above ours (RFC 3261 12.1.2).
        let rrs: Vec<&str> = msg.get_all(&HeaderName::RecordRoute).collect();
        let ours = rrs
            .iter()
            .position(|r| SipUri::parse(name_addr_uri(r)).is_ok_and(|u| self.is_self_uri(&u)));
        let callee_routes: Option<Vec<String>> =
            ours.map(|i| rrs[..i].iter().rev().map(|s| s.to_string()).collect());
        let Some(d) = self.dialogs.get_mut(dkey) else {
            return;
        };
        if d.phase == Phase::Confirmed {
            return;
        }
        if d.phase == Phase::Early {
            self.stats.early = self.stats.early.saturating_sub(1);
        }
        d.phase = Phase::Confirmed;
        self.stats.active += 1;
        d.to_tag = msg.to_tag().map(str::to_string);
        d.callee.contact = contact_target(msg);
        if let Some(routes) = callee_routes {
            d.callee.routes = routes;
        }
        if session_timer {
            if let Some(se) = session_expires(msg) {
                // Past what the clock can hold (a peer may write any number): no session
                // limit, the dialog lifetime still applies.
                d.session_deadline = now.checked_add(se);
            }
        }
        let (id, deadline) = (d.id, d.deadline());
        self.arm(deadline, Timer::Dialog(id));
    }

    /// A 2xx to a re-INVITE or UPDATE with Session-Expires pushes the dialog's deadline.
    fn refresh_session(&mut self, now: Instant, msg: &Message) {
        if !self.cfg.dialogs.session_timer {
            return;
        }
        let Some(se) = session_expires(msg) else {
            return;
        };
        if let Some(k) = self.find_dialog(msg) {
            if let Some(d) = self.dialogs.get_mut(&k) {
                d.session_deadline = now.checked_add(se);
            }
        }
    }

    /// A 2xx from a branch the proxy had given up on: acknowledge it and hang it up, so the
    /// server does not hold a call nobody will use.
    fn hang_up_late_answer(&mut self, now: Instant, key: &ClientKey, resp: &Message) {
        let Some(ctx) = self.client_txs.get(key) else {
            return;
        };
        let ack = make_ack(&ctx.request, resp);
        let out = ctx.out.clone();
        let mut target_flow = Flow {
            transport: out.transport,
            listener: out.listener,
            remote: match out.target {
                Target::Addr(a) => a,
                Target::Host(..) => return,
            },
            conn: out.conn,
        };
        let mut ack = ack;
        if let Some(c) = contact_target(resp) {
            ack.set_request_uri(c);
        }
        let branch = self.new_branch();
        ack.remove_all(&HeaderName::Via);
        self.prepare_forward(&mut ack, out.listener, &branch);
        self.send(target_flow, ack.to_bytes(), None);
        let mut bye = ack.clone();
        bye.start = StartLine::Request {
            method: Method::Bye,
            uri: bye.request_uri().unwrap_or_default().to_string(),
        };
        let seq = resp.cseq().map_or(1, |c| c.0).saturating_add(1);
        bye.set(HeaderName::CSeq, format!("{seq} BYE"));
        let branch = self.new_branch();
        bye.remove_all(&HeaderName::Via);
        self.prepare_forward(&mut bye, out.listener, &branch);
        target_flow.conn = None;
        warn!(
            call_id = resp.call_id().unwrap_or_default(),
            "late 2xx on an abandoned branch: hanging up"
        );
        self.start_client(
            now,
            ClientKey {
                branch,
                method: Method::Bye,
            },
            bye,
            target_flow,
            None,
            Role::Plain,
            None,
        );
    }

    // ---- timers ---------------------------------------------------------------------------

    fn fire(&mut self, now: Instant, timer: Timer) {
        match timer {
            Timer::ClientRetransmit(id) => {
                let Some(key) = self.client_ids.get(&id).cloned() else {
                    return;
                };
                let t2 = self.cfg.timers.t2;
                let Some(ctx) = self.client_txs.get_mut(&key) else {
                    return;
                };
                let is_invite = key.method == Method::Invite;
                let active = !ctx.abandoned
                    && match ctx.state {
                        CState::Calling => true,
                        CState::Proceeding => !is_invite,
                        CState::Completed | CState::Accepted => false,
                    };
                if !active {
                    return;
                }
                self.out.push(ctx.out.clone());
                ctx.retransmit = if is_invite {
                    ctx.retransmit * 2
                } else if ctx.state == CState::Proceeding {
                    t2
                } else {
                    (ctx.retransmit * 2).min(t2)
                };
                let next = now + ctx.retransmit;
                self.arm(next, Timer::ClientRetransmit(id));
            }
            Timer::ClientTimeout(id) => {
                let Some(key) = self.client_ids.get(&id).cloned() else {
                    return;
                };
                self.client_timeout(now, key, false);
            }
            Timer::ClientFinalTimeout(id) => {
                let Some(key) = self.client_ids.get(&id).cloned() else {
                    return;
                };
                let Some(ctx) = self.client_txs.get_mut(&key) else {
                    return;
                };
                if ctx.state != CState::Proceeding || ctx.abandoned {
                    return;
                }
                // Provisional but no final in time: CANCEL and try the next server.
                ctx.abandoned = true;
                let server = ctx.server.clone();
                // Kept 64*T1 for a late final (ACKed) or 2xx (hung up), then dropped even if
                // the server never answers the CANCEL (RFC 3261 9.1).
                let linger = self.cfg.timers.t1 * 64;
                self.arm(now + linger, Timer::ClientCleanup(id));
                self.cancel_branch(
                    now,
                    &key,
                    Some("SIP;cause=408;text=\"final response timeout\""),
                );
                let Some(skey) = server else { return };
                if self.server_txs.get(&skey).is_some_and(|t| t.call.is_some()) {
                    self.branch_gave_up(now, &skey);
                } else {
                    // A relayed re-INVITE: no other server to try, so the caller gets the
                    // final response now (the 487 the CANCEL brings is absorbed).
                    self.final_local(now, &skey, 408, "Request Timeout");
                }
            }
            Timer::ClientCleanup(id) => {
                if let Some(key) = self.client_ids.remove(&id) {
                    self.client_txs.remove(&key);
                }
            }
            Timer::ServerRetransmit(id) => {
                let Some(key) = self.server_ids.get(&id).cloned() else {
                    return;
                };
                let t2 = self.cfg.timers.t2;
                let Some(tx) = self.server_txs.get_mut(&key) else {
                    return;
                };
                if tx.state != SState::Completed {
                    return;
                }
                if let Some(last) = tx.last_response.clone() {
                    let reply = tx.reply;
                    tx.retransmit = (tx.retransmit * 2).min(t2);
                    let next = now + tx.retransmit;
                    self.send(reply, last, None);
                    self.arm(next, Timer::ServerRetransmit(id));
                }
            }
            Timer::ServerTimeout(id) | Timer::ServerCleanup(id) => {
                if let Some(key) = self.server_ids.remove(&id) {
                    if let Some(tx) = self.server_txs.remove(&key) {
                        if tx.state == SState::Proceeding {
                            self.pending = self.pending.saturating_sub(1);
                        }
                    }
                }
            }
            Timer::Probe(slot, uid) => self.probe_due(now, slot, uid),
            Timer::Cluster => self.cluster_tick(now),
            Timer::Hold(slot) => {
                if let Some(d) = self.dests.get_mut(slot) {
                    if d.held_until.is_some_and(|h| h <= now) {
                        d.held_until = None;
                    }
                }
            }
            Timer::Dialog(id) => {
                let Some(key) = self.dialog_ids.get(&id).cloned() else {
                    return;
                };
                let Some(d) = self.dialogs.get(&key) else {
                    return;
                };
                let deadline = d.deadline();
                if deadline > now {
                    // Refreshed since the timer was set.
                    self.arm(deadline, Timer::Dialog(id));
                    return;
                }
                self.expire_dialog(now, &key);
            }
        }
    }

    fn client_timeout(&mut self, now: Instant, key: ClientKey, transport_error: bool) {
        let Some(ctx) = self.client_txs.get_mut(&key) else {
            return;
        };
        let is_invite = key.method == Method::Invite;
        let timed_out = match ctx.state {
            CState::Calling => true,
            CState::Proceeding => !is_invite || transport_error,
            CState::Completed | CState::Accepted => false,
        };
        if !timed_out || ctx.abandoned {
            return;
        }
        ctx.abandoned = true;
        let id = ctx.id;
        let server = ctx.server.clone();
        let role = ctx.role;
        let cancel_pending = ctx.cancel_pending;
        if is_invite {
            // Kept a while, so that a late answer is hung up rather than relayed.
            let linger = self.cfg.timers.t1 * 64;
            self.arm(now + linger, Timer::ClientCleanup(id));
        } else {
            ctx.state = CState::Completed;
            self.arm(now, Timer::ClientCleanup(id));
        }
        match role {
            Role::Branch(slot, uid) if is_invite => {
                if let Some(d) = self.dests.live_mut(slot, uid) {
                    warn!(destination = %d.spec.id, uri = %d.spec.uri, "no response to INVITE: marked down");
                    d.probe.consecutive_successes = 0;
                    d.set_health(Health::DownTimeout);
                }
            }
            Role::Probe(slot, uid, _) => return self.probe_result(slot, uid, 408, None),
            _ => {}
        }
        let Some(skey) = server else { return };
        let is_call = self.server_txs.get(&skey).is_some_and(|t| t.call.is_some());
        if is_invite && is_call {
            if cancel_pending {
                let dkey = self
                    .server_txs
                    .get_mut(&skey)
                    .and_then(|t| t.call.as_mut())
                    .map(|c| {
                        c.branch = None;
                        c.dialog.clone()
                    });
                if let Some(dkey) = dkey {
                    self.release_branch(&dkey);
                }
                return self.final_local(now, &skey, 487, "Request Terminated");
            }
            self.branch_gave_up(now, &skey);
        } else {
            self.final_local(now, &skey, 408, "Request Timeout");
        }
    }

    /// The live branch of a call timed out: release its load and try the next destination.
    fn branch_gave_up(&mut self, now: Instant, skey: &ServerKey) {
        let Some(call) = self.server_txs.get_mut(skey).and_then(|t| t.call.as_mut()) else {
            return;
        };
        call.branch = None;
        let dkey = call.dialog.clone();
        let cancelled = call.cancelled;
        self.release_branch(&dkey);
        if cancelled {
            return self.final_local(now, skey, 487, "Request Terminated");
        }
        self.try_next(now, skey);
    }

    // ---- dialogs --------------------------------------------------------------------------

    fn end_dialog(&mut self, key: &DialogKey, how: End) {
        let Some(d) = self.dialogs.remove(key) else {
            return;
        };
        self.dialog_ids.remove(&d.id);
        if let Some(slot) = d.dest {
            self.dests.release(slot, &d.resources);
        }
        match d.phase {
            Phase::Confirmed => self.stats.active = self.stats.active.saturating_sub(1),
            Phase::Early => self.stats.early = self.stats.early.saturating_sub(1),
            Phase::Trying => {}
        }
        match how {
            End::Normal => {}
            End::Failed => self.metrics.dialogs_failed.inc(),
            End::Expired => self.metrics.dialogs_expired.inc(),
        }
    }

    /// The lifetime or Session-Expires limit passed: BYE to both sides, load freed.
    fn expire_dialog(&mut self, now: Instant, key: &DialogKey) {
        let Some(d) = self.dialogs.get(key).cloned() else {
            return;
        };
        if d.phase == Phase::Confirmed {
            let to_tagged = match &d.to_tag {
                Some(t) => format!("{};tag={t}", d.to_hdr),
                None => d.to_hdr.clone(),
            };
            // Towards the callee: as the caller.
            if let (Some(contact), Some(flow)) = (&d.callee.contact, d.callee.flow) {
                let bye = self.make_bye(
                    key,
                    contact,
                    &d.from_hdr,
                    &to_tagged,
                    d.caller.cseq.saturating_add(1),
                    &d.callee.routes,
                );
                self.send_own(now, bye, flow);
            }
            // Towards the caller: as the callee.
            if let (Some(contact), Some(flow)) = (&d.caller.contact, d.caller.flow) {
                let seq = d.callee.cseq.max(1).saturating_add(1);
                let bye =
                    self.make_bye(key, contact, &to_tagged, &d.from_hdr, seq, &d.caller.routes);
                self.send_own(now, bye, flow);
            }
        }
        info!(call_id = %key.call_id, "dialog expired: BYE sent to both sides");
        self.end_dialog(key, End::Expired);
    }

    fn make_bye(
        &self,
        key: &DialogKey,
        ruri: &str,
        from: &str,
        to: &str,
        cseq: u32,
        routes: &[String],
    ) -> Message {
        let mut bye = Message::request(Method::Bye, ruri);
        for r in routes {
            bye.push(HeaderName::Route, r.clone());
        }
        bye.push(HeaderName::From, from.to_string());
        bye.push(HeaderName::To, to.to_string());
        bye.push(HeaderName::CallId, key.call_id.clone());
        bye.push(HeaderName::CSeq, format!("{cseq} BYE"));
        bye.push(
            HeaderName::Reason,
            "SIP;cause=408;text=\"dialog expired\"".to_string(),
        );
        bye
    }

    /// Sends a request the proxy originates, in a client transaction of its own.
    fn send_own(&mut self, now: Instant, mut req: Message, mut flow: Flow) {
        let Some(l) = self.out_listener(flow.transport, Some(flow.remote.is_ipv6())) else {
            return;
        };
        flow.listener = l;
        let branch = self.new_branch();
        self.prepare_forward(&mut req, l, &branch);
        let Some(method) = req.method().cloned() else {
            return;
        };
        self.start_client(
            now,
            ClientKey { branch, method },
            req,
            flow,
            None,
            Role::Plain,
            None,
        );
    }
}

/// Preference among final responses when all branches failed (RFC 3261 16.7, simplified):
/// 6xx, then 4xx, 3xx, then 5xx; 503 last.
fn rank(code: u16) -> u16 {
    match code {
        503 => 1000,
        600..=699 => code - 600,
        400..=499 => 100 + code - 400,
        300..=399 => 200 + code - 300,
        _ => 300 + code,
    }
}

/// The ACK for a non-2xx final response (RFC 3261 17.1.1.3): same branch and Request-URI as
/// the INVITE, To from the response.
fn make_ack(invite: &Message, resp: &Message) -> Message {
    same_transaction(
        invite,
        Method::Ack,
        resp.get(&HeaderName::To).unwrap_or_default(),
    )
}

/// A request in the INVITE's own transaction (ACK for a non-2xx, CANCEL): its Request-URI,
/// top Via, From, Call-ID, CSeq number and Route set, with the given method and To.
fn same_transaction(invite: &Message, method: Method, to: &str) -> Message {
    let mut m = Message::request(method.clone(), invite.request_uri().unwrap_or_default());
    if let Some(v) = invite.get(&HeaderName::Via) {
        m.push(HeaderName::Via, v.to_string());
    }
    m.push(HeaderName::MaxForwards, "70".into());
    if let Some(v) = invite.get(&HeaderName::From) {
        m.push(HeaderName::From, v.to_string());
    }
    m.push(HeaderName::To, to.to_string());
    if let Some(v) = invite.get(&HeaderName::CallId) {
        m.push(HeaderName::CallId, v.to_string());
    }
    let seq = invite.cseq().map(|c| c.0).unwrap_or(1);
    m.push(HeaderName::CSeq, format!("{seq} {method}"));
    for r in invite.get_all(&HeaderName::Route) {
        m.push(HeaderName::Route, r.to_string());
    }
    m
}

/// The Contact URI of a message, when it is a SIP URI a request can be sent to. A malformed
/// one (or one with white space, which cannot stand in a request line) is no remote target: a
/// request with it as Request-URI would not even parse.
fn contact_target(msg: &Message) -> Option<String> {
    let uri = name_addr_uri(msg.get(&HeaderName::Contact)?);
    (SipUri::parse(uri).is_ok() && !uri.contains(char::is_whitespace)).then(|| uri.to_string())
}

/// `Retry-After: 30;duration=60 (comment)` → 30 s.
fn retry_after(msg: &Message) -> Option<u64> {
    let v = msg.get(&HeaderName::RetryAfter)?;
    v.split([';', ' ', '(']).next()?.trim().parse().ok()
}

/// `Session-Expires: 600;refresher=uac` → 600 s.
fn session_expires(msg: &Message) -> Option<Duration> {
    let v = msg.get(&HeaderName::SessionExpires)?;
    let secs: u64 = v.split(';').next()?.trim().parse().ok()?;
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// A small stable hash for deriving stateless branches.
fn fxhash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

mod control;
mod probe;
mod relay;
mod share;

pub use control::{Applied, SetError};
pub use relay::{Refusal, RouteKeys, TOKEN_PARAM};

#[cfg(test)]
mod tests;
