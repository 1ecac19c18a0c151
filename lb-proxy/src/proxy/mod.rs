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
//!
//! Where things are:
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | [`Proxy`], its entry points and the dispatch of a request or response |
//! | `admission.rs` | 483/482, the pending-transaction limit, the per-source rate, stateless 503 |
//! | `failover.rs` | an initial INVITE: candidates, branch, next destination, 503 hold |
//! | `resources.rs` | what a session is counted against: fixed list or SDP channels, settling, 406 |
//! | `in_dialog.rs` | requests with a To tag: dialog lookup and relay |
//! | `relay.rs` | the relay rule: where an in-dialog request may go (`next_hop`), the signed Record-Route |
//! | `dialog.rs` | dialog lifecycle: 2xx, session timers, BYE on expiry |
//! | `transaction/` | RFC 3261 transactions: keys and states (`mod.rs`), `server.rs`, `client.rs` |
//! | `timers.rs` | the timer queue and what each timer (RFC letter) does when due |
//! | `messages.rs` | building responses and forwarded requests, where responses go |
//! | `probe.rs` | OPTIONS health probes |
//! | `share.rs` | load sharing with other replicas |
//! | `control.rs` | destination set, manual state, status and gauges for the admin API |
//! | `sessions.rs` | per-session control for the admin API: list dialogs by page, end one or all on a destination |

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rustc_hash::FxHashMap as HashMap;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

use crate::cluster::Cluster;
use crate::config::{Config, Listener, RateAction, RateScope};
use crate::destinations::{DestRef, Destinations, Health};
use crate::dialog::{Dialog, DialogKey, DialogStats, End, Party, Phase};
use crate::limits::{SourceLimiter, Verdict};
use crate::metrics::Metrics;
use crate::routing::Want;
use crate::sip::{
    check_request_uri, name_addr_uri, HeaderName, Message, Method, SipUri, SipUriRef, StartLine,
    Text, Transport, Via, BRANCH_COOKIE,
};
use crate::transport::{ErrorToken, Flow, Inbound, Outbound, Target};
use failover::Call;
use messages::{contact_target, fxhash, make_ack, retry_after, same_transaction, session_expires};
use timers::Timer;
use transaction::{
    ClientKey, ClientState, ClientTx, LiveServer, Role, SentRequest, ServerKey, ServerState,
    ServerTx,
};

/// Whether `text` is `ip` as `Display` writes it (the comparison a `to_string` would make),
/// without a `String`.
fn ip_is_written(ip: std::net::IpAddr, text: &str) -> bool {
    use std::io::Write as _;
    // The longest IPv6 text (IPv4-mapped, all groups) is 45 bytes.
    let mut buf = [0u8; 64];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    if write!(cur, "{ip}").is_err() {
        return ip.to_string() == text;
    }
    let n = usize::try_from(cur.position()).unwrap_or(0);
    buf.get(..n) == Some(text.as_bytes())
}

/// The longest a 503 with Retry-After keeps a destination from new calls.
const MAX_HOLD: Duration = Duration::from_secs(300);

const ALLOW: &str =
    "INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO, PRACK, NOTIFY, REFER, MESSAGE";

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
    /// Boxed: the map's spare capacity (up to half of it) then costs a pointer per slot, not
    /// a whole dialog.
    dialogs: HashMap<DialogKey, Box<Dialog>>,
    server_ids: HashMap<u64, ServerKey>,
    client_ids: HashMap<u64, ClientKey>,
    /// Dialogs by serial (the order they were created in): timers name dialogs by it, and the
    /// admin API pages through them in this order.
    dialog_ids: BTreeMap<u64, DialogKey>,
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
    /// Each listener's fixed resources, shared by the dialogs of the calls it takes; None
    /// where the SDP offer says (`routing.resources: sdp`).
    listener_resources: Vec<Option<Arc<Vec<String>>>>,
    /// The resource lists of SDP-routed sessions, each kept once.
    resource_sets: resources::ResourceSets,
    /// Some listener routes by SDP: answers and re-INVITEs may have channels to settle.
    sdp_listeners: bool,
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
        for why in Refusal::ALL {
            metrics.relay_refused.with_label_values(&[why.label()]);
        }
        let mut self_addrs = Vec::new();
        for l in &cfg.listeners {
            self_addrs.push((l.advertise.host.to_ascii_lowercase(), l.advertise.port));
            self_addrs.push((l.bind.ip().to_string(), l.bind.port()));
        }
        let listener_resources = cfg
            .listeners
            .iter()
            .map(|l| resources::listener_rule(&l.resources))
            .collect::<Vec<_>>();
        let sdp_listeners = listener_resources.iter().any(Option::is_none);
        Proxy {
            cfg,
            dests,
            server_txs: HashMap::default(),
            client_txs: HashMap::default(),
            dialogs: HashMap::default(),
            server_ids: HashMap::default(),
            client_ids: HashMap::default(),
            dialog_ids: BTreeMap::new(),
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
            listener_resources,
            resource_sets: resources::ResourceSets::default(),
            sdp_listeners,
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

    /// Moves the messages to send into `into`, keeping both buffers' capacity.
    pub fn drain_outbound(&mut self, into: &mut Vec<Outbound>) {
        into.append(&mut self.out);
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
        let port = port.unwrap_or(5060);
        self.self_addrs
            .iter()
            .any(|(h, p)| h.eq_ignore_ascii_case(host) && *p == port)
    }

    fn is_self_uri(&self, uri: &SipUriRef<'_>) -> bool {
        self.is_self(uri.host, Some(uri.port_or_default()))
    }

    /// Handles one message from the network.
    pub fn on_message(&mut self, now: Instant, inbound: Inbound) {
        let Inbound { msg, flow } = inbound;
        // Every log line of the message's handling carries its call: a call's lines group by
        // call_id. The fields are only read when debug logging is on.
        let span = tracing::debug_span!(
            "sip",
            call_id = msg.call_id().unwrap_or_default(),
            cseq = msg.get(&HeaderName::CSeq).unwrap_or_default(),
            source = %flow.remote,
        );
        let _in_span = span.enter();
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

    fn on_request(&mut self, now: Instant, mut msg: Message, flow: Flow) {
        let Some(via) = msg.top_via() else { return };
        let Some(method) = msg.method().cloned() else {
            return;
        };
        self.metrics.request(&method);
        let branch: Arc<str> = via.branch().unwrap_or_default().into();
        let sent_by: Arc<str> = via.sent_by().into();
        // RFC 3581: note where the request really came from.
        if !ip_is_written(flow.remote.ip(), &via.host) || via.param("rport").is_some() {
            let mut v = via;
            v.set_param("received", Some(flow.remote.ip().to_string()));
            if v.param("rport").is_some() {
                v.set_param("rport", Some(flow.remote.port().to_string()));
            }
            if let Some(h) = msg.headers.iter_mut().find(|(n, _)| *n == HeaderName::Via) {
                h.1 = v.to_string().into();
            }
        }
        let key = ServerKey {
            branch,
            sent_by,
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
}

mod admission;
mod control;
mod dialog;
mod failover;
mod in_dialog;
mod messages;
mod probe;
mod relay;
mod resources;
mod sessions;
mod share;
mod timers;
mod transaction;

pub use control::{Applied, Control, DrainTarget, SetError, Stats};
pub use relay::{Refusal, RouteKeys, TOKEN_PARAM};
pub use sessions::{
    dialog_id, parse_dialog_id, DialogFilter, DialogQuery, EndBatch, EndError, END_BATCH,
    SCAN_BUDGET,
};

#[cfg(test)]
mod tests;
