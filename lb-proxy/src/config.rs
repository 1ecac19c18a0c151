//! The YAML configuration: listeners, routing defaults, timers, limits and a static
//! destination list (the way to run without Kubernetes). Every key is documented in
//! `docs/configuration.md`.

use lb_api::{DestinationSet, DestinationSpec, FieldError};
use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::routing::{Mode, Policy};
use crate::sip::{SipUri, Transport};

mod routing;
pub use routing::{pool_group, Pool, Resources, SdpRouting};
use routing::{RawPool, RawResources, RawSdp};

/// A host and port peers use to reach the proxy (Via, Record-Route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    pub fn parse(s: &str) -> Result<HostPort, String> {
        let (host, port) =
            crate::sip::split_host_port(s).ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port = port.ok_or_else(|| format!("{s:?} has no port"))?;
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }
}

/// The global `advertise`: `host:port`, or a host alone, each listener then advertising its
/// own bind port (one address for UDP/TCP on 5060 and TLS on 5061).
#[derive(Debug, Clone, PartialEq, Eq)]
struct GlobalAdvertise {
    host: String,
    port: Option<u16>,
}

impl GlobalAdvertise {
    fn parse(s: &str) -> Result<GlobalAdvertise, String> {
        let (host, port) =
            crate::sip::split_host_port(s).ok_or_else(|| format!("{s:?} is not host[:port]"))?;
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        Ok(GlobalAdvertise {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::sip::write_host(f, &self.host)?;
        write!(f, ":{}", self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub transport: Transport,
    pub bind: SocketAddr,
    /// What goes into Via and Record-Route; the bind address when not configured.
    pub advertise: HostPort,
    /// Group asked for by INVITEs arriving here.
    pub group: u32,
    /// What the sessions arriving here are counted against.
    pub resources: Resources,
}

#[derive(Debug, Clone)]
pub struct Routing {
    pub policy: Policy,
    pub group: u32,
    /// The default for listeners without their own `resources`.
    pub resources: Resources,
    pub sdp: SdpRouting,
    /// First match wins; no match: the listener's group.
    pub pools: Vec<Pool>,
    pub max_attempts: u32,
    pub failover_codes: Vec<CodeSet>,
    pub retry_after: Duration,
}

/// A status code or a class such as `5xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeSet {
    Code(u16),
    Class(u16),
}

impl CodeSet {
    pub fn matches(self, code: u16) -> bool {
        match self {
            CodeSet::Code(c) => c == code,
            CodeSet::Class(c) => code / 100 == c,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Timers {
    pub t1: Duration,
    pub t2: Duration,
    pub t4: Duration,
    /// No response at all from a server within this time: failover and mark it down.
    pub invite_timeout: Duration,
    /// No final response after a provisional within this time: CANCEL and failover.
    pub invite_final_timeout: Duration,
    /// Non-INVITE transaction timeout (timer F).
    pub non_invite_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Dialogs {
    pub lifetime: Duration,
    pub session_timer: bool,
    pub max: usize,
}

#[derive(Debug, Clone)]
pub struct Tcp {
    pub max_message_size: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// A message begun on a connection must be complete within this (slowloris defence).
    pub message_timeout: Duration,
    /// Accepted connections open at once; more are closed at once.
    pub max_connections: usize,
    /// Accepted connections open at once from one source IP.
    pub max_connections_per_source: usize,
}

/// SIP over TLS: what the `tls` listeners present, and how the servers the proxy connects to
/// over TLS are verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// PEM: the proxy's certificate, then the intermediates of its chain.
    pub cert_file: PathBuf,
    /// PEM: the private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM: the roots a destination's certificate must chain to; None: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Check destination certificates (chain and name). Off only when said so, with a warning.
    pub verify_destinations: bool,
}

#[derive(Debug, Clone)]
pub struct Udp {
    /// Larger datagrams are dropped unparsed.
    pub max_message_size: usize,
}

/// Overload limits on what peers send.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Header fields per message (list headers count once per entry); more makes it malformed.
    pub max_headers: usize,
    /// Server transactions waiting for a final response; new requests beyond get 503.
    pub max_pending_transactions: usize,
    /// Per-source rate limit of new requests; None when off.
    pub per_source: Option<PerSource>,
}

/// Which requests the per-source limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RateScope {
    /// Initial INVITEs only.
    Invite,
    /// Every request outside a dialog (no To tag), ACK and CANCEL excepted.
    OutOfDialog,
}

/// What a source over its rate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RateAction {
    /// 503 with Retry-After, statelessly.
    Reject,
    /// Nothing.
    Drop,
}

/// A token bucket per source IP (IPv6: per /64): `rate` requests per `window` on average,
/// `burst` at once.
#[derive(Debug, Clone)]
pub struct PerSource {
    pub rate: u32,
    pub window: Duration,
    pub burst: u32,
    pub scope: RateScope,
    pub action: RateAction,
    /// Sources tracked at once: the table's memory bound.
    pub max_sources: usize,
}

/// OPTIONS health probing.
#[derive(Debug, Clone)]
pub struct Probing {
    pub interval: Duration,
    pub timeout: Duration,
    /// From URI of the probes.
    pub from_uri: String,
    /// Reply codes that count as alive besides 200.
    pub alive_codes: Vec<CodeSet>,
    /// Consecutive failures that mark an up destination down.
    pub failure_threshold: u32,
    /// Consecutive successes that bring a down destination back.
    pub success_threshold: u32,
}

impl Probing {
    pub fn is_alive(&self, code: u16) -> bool {
        code == 200 || self.alive_codes.iter().any(|c| c.matches(code))
    }
}

/// Load sharing between proxy replicas (the `cluster` module).
#[derive(Debug, Clone)]
pub struct Cluster {
    /// UDP address the peer exchange listens on.
    pub listen: SocketAddr,
    /// This replica's name (default: the host name, i.e. the pod name); the node id is the
    /// name plus a random suffix chosen at start, so a restarted replica is a new node.
    pub name: String,
    /// The other replicas' `listen` addresses; a pushed set with `peers` replaces them.
    pub peers: Vec<SocketAddr>,
    /// Longest time between two updates to each peer.
    pub heartbeat: Duration,
    /// A peer silent this long is dead: its load no longer counts.
    pub peer_timeout: Duration,
    /// Shared key: every datagram carries an HMAC-SHA256 tag made with it.
    pub key: Option<Key>,
}

/// A secret key; `{:?}` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(pub Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    /// Bearer token required by the write endpoints; None leaves them open.
    pub token: Option<String>,
    /// The reads (`/metrics`, `/v1/...`) need the token too; `/healthz`, `/readyz` and the
    /// drain wait stay open (probes and preStop hooks hold no token).
    pub protect_reads: bool,
    /// `/healthz` fails when the core has not answered within this bound (a watchdog).
    pub liveness_timeout: Duration,
    /// HTTPS instead of HTTP, the files re-read when they change.
    pub tls: Option<AdminTls>,
}

/// `admin.tls`: the admin API's certificate and key, and how often their files are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub reload_interval: Duration,
}

/// Shows whether a token is set, never the token: a `{:?}` of the config in a log or an error
/// must not leak it.
impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("protect_reads", &self.protect_reads)
            .field("liveness_timeout", &self.liveness_timeout)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub admin: Option<Admin>,
    pub probing: Probing,
    pub routing: Routing,
    pub timers: Timers,
    pub dialogs: Dialogs,
    pub tcp: Tcp,
    /// Present exactly when a listener uses TLS.
    pub tls: Option<Tls>,
    pub udp: Udp,
    pub limits: Limits,
    pub dns_refresh: Duration,
    /// How long SIGTERM waits for open calls before the process exits.
    pub shutdown_drain: Duration,
    /// Load sharing with other replicas; None: this proxy counts alone.
    pub cluster: Option<Cluster>,
    /// The keys that sign the proxy's Record-Route (the relay rule, docs/relay-policy.md).
    pub record_route: RecordRoute,
    /// The static set; None when the file has no `destinations` key (the proxy then waits for
    /// a set pushed through the admin API and is not ready until one arrives).
    pub destinations: Option<DestinationSet>,
}

/// A configuration problem, naming the field and the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("{0}")]
    Field(#[from] FieldError),
}

// ---- raw YAML shape -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    listeners: Vec<RawListener>,
    #[serde(default)]
    advertise: Option<String>,
    #[serde(default)]
    admin: Option<RawAdmin>,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    timers: RawTimers,
    #[serde(default)]
    dialogs: RawDialogs,
    #[serde(default)]
    tcp: RawTcp,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    udp: RawUdp,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    probing: RawProbing,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    cluster: Option<RawCluster>,
    #[serde(default)]
    record_route: RawRecordRoute,
    #[serde(default)]
    destinations: Option<Vec<DestinationSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCluster {
    listen: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    #[serde(default = "default_heartbeat", deserialize_with = "duration")]
    heartbeat: Duration,
    #[serde(default = "default_peer_timeout", deserialize_with = "duration")]
    peer_timeout: Duration,
    /// File holding the shared key that authenticates the peers' datagrams.
    #[serde(default)]
    key_file: Option<String>,
}

/// Environment variable with the cluster key when `cluster.keyFile` is not set.
pub const CLUSTER_KEY_ENV: &str = "LB_PROXY_CLUSTER_KEY";

fn default_heartbeat() -> Duration {
    Duration::from_millis(500)
}

fn default_peer_timeout() -> Duration {
    Duration::from_secs(3)
}

impl RawCluster {
    fn into_cluster(self) -> Result<Cluster, FieldError> {
        let listen = self.listen.parse().map_err(|_| {
            FieldError::new(
                "cluster.listen",
                format!("{:?} is not an IP address and port", self.listen),
            )
        })?;
        let mut peers = Vec::new();
        for (i, p) in self.peers.iter().enumerate() {
            peers.push(p.parse().map_err(|_| {
                FieldError::new(
                    format!("cluster.peers[{i}]"),
                    format!("{p:?} is not an IP address and port"),
                )
            })?);
        }
        if self.heartbeat.is_zero() {
            return Err(FieldError::new(
                "cluster.heartbeat",
                "must be greater than zero",
            ));
        }
        if self.peer_timeout < self.heartbeat * 2 {
            return Err(FieldError::new(
                "cluster.peerTimeout",
                format!(
                    "{:?} is shorter than two heartbeats ({:?}); a live peer would look dead",
                    self.peer_timeout,
                    self.heartbeat * 2
                ),
            ));
        }
        let name = match self.name {
            Some(n) if n.trim().is_empty() => {
                return Err(FieldError::new("cluster.name", "must not be empty"))
            }
            Some(n) => n,
            None => host_name(),
        };
        let key = match &self.key_file {
            Some(path) => {
                let k = std::fs::read_to_string(path).map_err(|e| {
                    FieldError::new("cluster.keyFile", format!("cannot read {path:?}: {e}"))
                })?;
                let k = k.trim().to_string();
                if k.len() < MIN_KEY_LEN {
                    return Err(FieldError::new(
                        "cluster.keyFile",
                        format!(
                            "{path:?} holds {} characters; at least {MIN_KEY_LEN}",
                            k.len()
                        ),
                    ));
                }
                Some(Key(k.into_bytes()))
            }
            None => match std::env::var(CLUSTER_KEY_ENV) {
                Ok(k) if k.trim().len() >= MIN_KEY_LEN => Some(Key(k.trim().as_bytes().to_vec())),
                Ok(k) if !k.trim().is_empty() => {
                    return Err(FieldError::new(
                        CLUSTER_KEY_ENV,
                        format!(
                            "holds {} characters; at least {MIN_KEY_LEN}",
                            k.trim().len()
                        ),
                    ))
                }
                _ => None,
            },
        };
        Ok(Cluster {
            key,
            listen,
            name: name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-._".contains(c) {
                        c
                    } else {
                        '-'
                    }
                })
                .collect(),
            peers,
            heartbeat: self.heartbeat,
            peer_timeout: self.peer_timeout,
        })
    }
}

/// Where the Record-Route keys come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// `recordRoute.keyFile`, re-read while the proxy runs (rotation).
    File,
    /// [`ROUTE_KEY_ENV`].
    Env,
    /// Derived from the cluster key: every replica of a cluster signs alike.
    Cluster,
    /// No key: nothing is signed, and the relay rule without proof applies.
    None,
}

/// The keys that sign the proxy's Record-Route, so that a request of a dialog this proxy does
/// not hold (set up before a restart, or through another replica) can prove where it may go.
#[derive(Debug, Clone)]
pub struct RecordRoute {
    /// The first key signs; every key verifies. Empty with [`KeySource::None`].
    pub keys: Vec<Key>,
    pub source: KeySource,
    /// `recordRoute.keyFile`, re-read every few seconds: a new first key signs from then on.
    pub key_file: Option<PathBuf>,
    /// How long a key that is no longer in the file (or no longer first) is still accepted.
    pub rotation_grace: Duration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRecordRoute {
    #[serde(default)]
    key_file: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    rotation_grace: Option<Duration>,
}

/// Environment variable with the Record-Route keys when `recordRoute.keyFile` is not set.
pub const ROUTE_KEY_ENV: &str = "LB_PROXY_ROUTE_KEY";

/// The shortest key accepted, in characters (cluster and Record-Route keys alike).
const MIN_KEY_LEN: usize = 16;

/// Reads Record-Route keys: white-space separated, the first signs, each at least 16
/// characters. `field` names the source in errors.
pub fn parse_route_keys(field: &str, text: &str) -> Result<Vec<Key>, FieldError> {
    let keys: Vec<Key> = text
        .split_whitespace()
        .map(|k| Key(k.as_bytes().to_vec()))
        .collect();
    if keys.is_empty() {
        return Err(FieldError::new(field, "holds no key"));
    }
    if let Some((i, k)) = keys
        .iter()
        .enumerate()
        .find(|(_, k)| k.0.len() < MIN_KEY_LEN)
    {
        return Err(FieldError::new(
            field,
            format!(
                "key {} holds {} characters; at least {MIN_KEY_LEN}",
                i + 1,
                k.0.len()
            ),
        ));
    }
    Ok(keys)
}

/// Reads the keys of `recordRoute.keyFile`.
pub fn read_route_keys(path: &Path) -> Result<Vec<Key>, FieldError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        FieldError::new(
            "recordRoute.keyFile",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    parse_route_keys(&format!("recordRoute.keyFile {}", path.display()), &text)
}

impl RawRecordRoute {
    fn into_record_route(
        self,
        cluster: Option<&Cluster>,
        lifetime: Duration,
    ) -> Result<RecordRoute, FieldError> {
        let rotation_grace = self.rotation_grace.unwrap_or(lifetime);
        let (keys, source, key_file) = match self.key_file {
            Some(f) if f.trim().is_empty() => {
                return Err(FieldError::new("recordRoute.keyFile", "must not be empty"))
            }
            Some(f) => {
                let path = PathBuf::from(f);
                (read_route_keys(&path)?, KeySource::File, Some(path))
            }
            None => match std::env::var(ROUTE_KEY_ENV) {
                Ok(v) if !v.trim().is_empty() => {
                    (parse_route_keys(ROUTE_KEY_ENV, &v)?, KeySource::Env, None)
                }
                _ => match cluster.and_then(|c| c.key.as_ref()) {
                    Some(k) => (vec![derive_key(k)], KeySource::Cluster, None),
                    None => (Vec::new(), KeySource::None, None),
                },
            },
        };
        Ok(RecordRoute {
            keys,
            source,
            key_file,
            rotation_grace,
        })
    }
}

/// A key of its own for signing Record-Routes, from the cluster key: the two uses never share
/// a MAC key.
fn derive_key(cluster: &Key) -> Key {
    use hmac::{Hmac, Mac};
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&cluster.0)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(b"mrcp-lb record-route v1");
    Key(m.finalize().into_bytes().to_vec())
}

/// The host name (in Kubernetes: the pod name), for the default cluster node name.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "lb-proxy".to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawShutdown {
    #[serde(deserialize_with = "duration")]
    drain_period: Duration,
}

impl Default for RawShutdown {
    fn default() -> Self {
        RawShutdown {
            drain_period: Duration::from_secs(30),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawProbing {
    #[serde(deserialize_with = "duration")]
    interval: Duration,
    #[serde(deserialize_with = "duration")]
    timeout: Duration,
    from_uri: Option<String>,
    alive_codes: Vec<RawCode>,
    failure_threshold: u32,
    success_threshold: u32,
}

impl Default for RawProbing {
    fn default() -> Self {
        RawProbing {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(3),
            from_uri: None,
            alive_codes: Vec::new(),
            failure_threshold: 3,
            success_threshold: 2,
        }
    }
}

enum RawListener {
    Short(String),
    Full(RawListenerFull),
}

// Not `#[serde(untagged)]`: that hides why the object form failed (an unknown key, say).
impl<'de> Deserialize<'de> for RawListener {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawListener;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"transport:address:port\" or {address, advertise, group, resources}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawListener, E> {
                Ok(RawListener::Short(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawListener, A::Error> {
                RawListenerFull::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawListener::Full)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawListenerFull {
    address: String,
    #[serde(default)]
    advertise: Option<String>,
    #[serde(default)]
    group: Option<u32>,
    #[serde(default)]
    resources: Option<RawResources>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAdmin {
    listen: String,
    /// File holding the bearer token for write endpoints.
    #[serde(default)]
    token_file: Option<String>,
    #[serde(default)]
    protect_reads: bool,
    #[serde(default, deserialize_with = "opt_duration")]
    liveness_timeout: Option<Duration>,
    #[serde(default)]
    tls: Option<RawAdminTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAdminTls {
    cert_file: String,
    key_file: String,
    #[serde(default, deserialize_with = "opt_duration")]
    reload_interval: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawRouting {
    group: u32,
    resources: RawResources,
    sdp: RawSdp,
    pools: Vec<RawPool>,
    mode: Mode,
    allow_over_capacity: bool,
    max_attempts: u32,
    failover_codes: Vec<RawCode>,
    #[serde(deserialize_with = "duration")]
    retry_after: Duration,
}

impl Default for RawRouting {
    fn default() -> Self {
        RawRouting {
            group: lb_api::DEFAULT_GROUP,
            resources: RawResources::List(vec!["pstn".to_string()]),
            sdp: RawSdp::default(),
            pools: Vec::new(),
            mode: Mode::Absolute,
            allow_over_capacity: false,
            max_attempts: 3,
            failover_codes: vec![RawCode::S("408".into()), RawCode::S("5xx".into())],
            retry_after: Duration::from_secs(5),
        }
    }
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum RawCode {
    N(u16),
    S(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawTimers {
    #[serde(deserialize_with = "duration")]
    t1: Duration,
    #[serde(deserialize_with = "duration")]
    t2: Duration,
    #[serde(deserialize_with = "duration")]
    t4: Duration,
    #[serde(deserialize_with = "duration")]
    invite_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    invite_final_timeout: Duration,
    #[serde(deserialize_with = "opt_duration")]
    non_invite_timeout: Option<Duration>,
}

impl Default for RawTimers {
    fn default() -> Self {
        RawTimers {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
            invite_timeout: Duration::from_secs(3),
            invite_final_timeout: Duration::from_secs(30),
            non_invite_timeout: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawDialogs {
    #[serde(deserialize_with = "duration")]
    lifetime: Duration,
    session_timer: bool,
    max: usize,
}

impl Default for RawDialogs {
    fn default() -> Self {
        RawDialogs {
            lifetime: Duration::from_secs(12 * 3600),
            session_timer: true,
            max: 1_000_000,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawTcp {
    max_message_size: usize,
    #[serde(deserialize_with = "duration")]
    idle_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    connect_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    message_timeout: Duration,
    max_connections: usize,
    max_connections_per_source: usize,
}

impl Default for RawTcp {
    fn default() -> Self {
        RawTcp {
            max_message_size: 65_535,
            idle_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(2),
            message_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_connections_per_source: 1024,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTls {
    cert_file: String,
    key_file: String,
    #[serde(default)]
    ca_file: Option<String>,
    #[serde(default = "verify_by_default")]
    verify_destinations: bool,
}

fn verify_by_default() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawUdp {
    max_message_size: usize,
}

impl Default for RawUdp {
    fn default() -> Self {
        RawUdp {
            max_message_size: 65_535,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawLimits {
    max_headers: usize,
    max_pending_transactions: usize,
    per_source: RawPerSource,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_headers: 128,
            max_pending_transactions: 20_000,
            per_source: RawPerSource::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawPerSource {
    rate: u32,
    #[serde(deserialize_with = "duration")]
    window: Duration,
    burst: Option<u32>,
    scope: RateScope,
    action: RateAction,
    max_sources: usize,
}

impl Default for RawPerSource {
    fn default() -> Self {
        RawPerSource {
            rate: 0,
            window: Duration::from_secs(1),
            burst: None,
            scope: RateScope::Invite,
            action: RateAction::Reject,
            max_sources: 65_536,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawDns {
    #[serde(deserialize_with = "duration")]
    refresh_interval: Duration,
}

impl Default for RawDns {
    fn default() -> Self {
        RawDns {
            refresh_interval: Duration::from_secs(30),
        }
    }
}

/// Parses `500ms`, `3s`, `2m`, `12h`, `1d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as \"500ms\", \"3s\" or \"12h\""))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86400),
        _ => return Err(format!("{s:?} has an unknown unit; use ms, s, m, h or d")),
    };
    Ok(d)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::N(n) => Ok(Duration::from_secs(n)),
        Raw::S(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn parse_listener(s: &str, field: &str) -> Result<(Transport, SocketAddr), FieldError> {
    let (t, addr) = s.split_once(':').ok_or_else(|| {
        FieldError::new(
            field,
            format!("{s:?} is not transport:address:port, e.g. \"udp:127.0.0.1:5060\""),
        )
    })?;
    let transport = Transport::parse(t).ok_or_else(|| {
        FieldError::new(
            field,
            format!("unknown transport {t:?} in {s:?}; use udp, tcp or tls"),
        )
    })?;
    let bind: SocketAddr = addr.parse().map_err(|_| {
        FieldError::new(
            field,
            format!("{addr:?} is not an IP address and port (IPv6 as [::1]:5060)"),
        )
    })?;
    Ok((transport, bind))
}

fn parse_codes(codes: &[RawCode], path: &str) -> Result<Vec<CodeSet>, FieldError> {
    codes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let field = format!("{path}[{i}]");
            let s = match c {
                RawCode::N(n) => n.to_string(),
                RawCode::S(s) => s.trim().to_string(),
            };
            let bad = || {
                FieldError::new(
                    &field,
                    format!("{s:?} is not a status code (e.g. 408) or class (e.g. 5xx)"),
                )
            };
            if let Some(class) = s.strip_suffix("xx").or_else(|| s.strip_suffix("XX")) {
                let c: u16 = class.parse().map_err(|_| bad())?;
                if !(3..=6).contains(&c) {
                    return Err(bad());
                }
                Ok(CodeSet::Class(c))
            } else {
                let c: u16 = s.parse().map_err(|_| bad())?;
                if !(300..700).contains(&c) {
                    return Err(bad());
                }
                Ok(CodeSet::Code(c))
            }
        })
        .collect()
}

/// How long `/healthz` waits for the core to answer before it fails.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(3);

/// Environment variable holding the admin bearer token when `admin.tokenFile` is not set.
pub const TOKEN_ENV: &str = "LB_PROXY_ADMIN_TOKEN";

/// Checks a destination set against the grammar and the listeners: every URI parses and
/// names a transport the proxy has a listener for.
pub fn check_set(listeners: &[Listener], set: &DestinationSet) -> Result<(), FieldError> {
    validate_destinations(set)?;
    for (i, d) in set.destinations.iter().enumerate() {
        if let Ok(uri) = SipUri::parse(&d.uri) {
            let t = uri.transport();
            if !listeners.iter().any(|l| l.transport == t) {
                return Err(FieldError::new(
                    format!("destinations[{i}].uri"),
                    format!("{:?} uses {t}, but no {t} listener is configured", d.uri),
                ));
            }
        }
    }
    Ok(())
}

/// Checks the parts of a destination set that need the SIP grammar: each URI.
pub fn validate_destinations(set: &DestinationSet) -> Result<(), FieldError> {
    set.validate()?;
    for (i, d) in set.destinations.iter().enumerate() {
        let uri = SipUri::parse(&d.uri)
            .map_err(|e| FieldError::new(format!("destinations[{i}].uri"), e.to_string()))?;
        if let Some(t) = uri.param("transport").flatten() {
            if Transport::parse(t).is_none() {
                return Err(FieldError::new(
                    format!("destinations[{i}].uri"),
                    format!(
                        "unsupported transport {t:?} in {:?}; use udp, tcp or tls",
                        d.uri
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, &Overrides::default())
    }

    /// Reads the file, with command-line overrides applied before validation.
    pub fn load_with(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml_with(&text, overrides)
    }

    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml_with(text, &Overrides::default())
    }

    pub fn from_yaml_with(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let mut inner = e.into_inner().to_string();
            // serde_yaml_ng starts its message with the (less precise) path it knows: drop it.
            if let Some((prefix, rest)) = inner.split_once(": ") {
                if !prefix.contains(' ') && path.starts_with(prefix) {
                    inner = rest.to_string();
                }
            }
            if path == "." || path.is_empty() {
                ConfigError::Syntax(inner)
            } else {
                ConfigError::Syntax(format!("{path}: {inner}"))
            }
        })?;
        let mut raw: RawConfig = raw;
        if let Some(a) = &overrides.advertise {
            GlobalAdvertise::parse(a).map_err(|e| FieldError::new("--advertise", e))?;
            raw.advertise = Some(a.clone());
        }
        if let Some(l) = &overrides.admin_listen {
            let addr = parse_listen(l).ok_or_else(|| {
                FieldError::new(
                    "--admin-listen",
                    format!("{l:?} is not an IP address and port"),
                )
            })?;
            match raw.admin.as_mut() {
                Some(a) => a.listen = addr.to_string(),
                None => {
                    return Err(FieldError::new(
                        "--admin-listen",
                        "the file has no `admin` section to listen for",
                    )
                    .into())
                }
            }
        }
        raw.into_config()
    }
}

/// Settings given on the command line (or environment) that take precedence over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `host:port` (or a host alone: each listener's own port) for Via and Record-Route of
    /// every listener without its own `advertise` (in Kubernetes: the pod IP from the downward
    /// API, or the Service address).
    pub advertise: Option<String>,
    /// `ip:port` for the admin API instead of the file's `admin.listen` (in Kubernetes: the
    /// pod IP from the downward API, `$(POD_IP):8081`; a bare IPv6 address is accepted).
    pub admin_listen: Option<String>,
}

/// `ip:port`, `[v6]:port` or `v6:port` (a pod IP pasted in front of a port).
fn parse_listen(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    let (host, port) = s.rsplit_once(':')?;
    Some(SocketAddr::new(host.parse().ok()?, port.parse().ok()?))
}

impl RawConfig {
    fn into_config(self) -> Result<Config, ConfigError> {
        let routing = {
            let r = &self.routing;
            let resources = r.resources.build("routing.resources")?;
            let pools = r
                .pools
                .iter()
                .enumerate()
                .map(|(i, p)| p.build(i))
                .collect::<Result<Vec<_>, _>>()?;
            if r.max_attempts == 0 {
                return Err(FieldError::new("routing.maxAttempts", "must be at least 1").into());
            }
            Routing {
                policy: Policy {
                    mode: r.mode,
                    allow_over_capacity: r.allow_over_capacity,
                },
                group: r.group,
                resources,
                sdp: r.sdp.build()?,
                pools,
                max_attempts: r.max_attempts,
                failover_codes: parse_codes(&r.failover_codes, "routing.failoverCodes")?,
                retry_after: r.retry_after,
            }
        };
        let global_adv = match &self.advertise {
            Some(a) => {
                Some(GlobalAdvertise::parse(a).map_err(|e| FieldError::new("advertise", e))?)
            }
            None => None,
        };
        if self.listeners.is_empty() {
            return Err(FieldError::new(
                "listeners",
                "at least one listener is needed, e.g. \"udp:127.0.0.1:5060\"",
            )
            .into());
        }
        let mut listeners = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let field = format!("listeners[{i}]");
            let (addr, adv, group, resources) = match l {
                RawListener::Short(s) => (s.as_str(), None, None, None),
                RawListener::Full(f) => (
                    f.address.as_str(),
                    f.advertise.as_deref(),
                    f.group,
                    f.resources.clone(),
                ),
            };
            let (transport, bind) = parse_listener(addr, &field)?;
            let advertise = match adv {
                Some(a) => HostPort::parse(a)
                    .map_err(|e| FieldError::new(format!("{field}.advertise"), e))?,
                None => match &global_adv {
                    Some(a) => HostPort {
                        host: a.host.clone(),
                        port: a.port.unwrap_or(bind.port()),
                    },
                    None => {
                        if bind.ip().is_unspecified() {
                            return Err(FieldError::new(
                                field.clone(),
                                format!("binds {bind}, which peers cannot reach: set `advertise` (globally or on this listener)"),
                            )
                            .into());
                        }
                        HostPort {
                            host: bind.ip().to_string(),
                            port: bind.port(),
                        }
                    }
                },
            };
            let resources = match &resources {
                Some(r) => r.build(&format!("{field}.resources"))?,
                None => routing.resources.clone(),
            };
            if listeners
                .iter()
                .any(|x: &Listener| x.transport == transport && x.bind == bind)
            {
                return Err(FieldError::new(field, format!("{addr:?} is listed twice")).into());
            }
            listeners.push(Listener {
                transport,
                bind,
                advertise,
                group: group.unwrap_or(routing.group),
                resources,
            });
        }
        let admin = match &self.admin {
            Some(a) => {
                let listen = a.listen.parse().map_err(|_| {
                    FieldError::new(
                        "admin.listen",
                        format!("{:?} is not an IP address and port", a.listen),
                    )
                })?;
                let token = match &a.token_file {
                    Some(path) => {
                        let t = std::fs::read_to_string(path).map_err(|e| {
                            FieldError::new("admin.tokenFile", format!("cannot read {path:?}: {e}"))
                        })?;
                        let t = t.trim().to_string();
                        if t.is_empty() {
                            return Err(FieldError::new(
                                "admin.tokenFile",
                                format!("{path:?} is empty"),
                            )
                            .into());
                        }
                        Some(t)
                    }
                    None => std::env::var(TOKEN_ENV)
                        .ok()
                        .map(|t| t.trim().to_string())
                        .filter(|t| !t.is_empty()),
                };
                if a.protect_reads && token.is_none() {
                    return Err(FieldError::new(
                        "admin.protectReads",
                        "is true but no token is configured (admin.tokenFile or \
                         LB_PROXY_ADMIN_TOKEN)",
                    )
                    .into());
                }
                let liveness_timeout = a.liveness_timeout.unwrap_or(DEFAULT_LIVENESS_TIMEOUT);
                if liveness_timeout.is_zero() {
                    return Err(FieldError::new(
                        "admin.livenessTimeout",
                        "must be above 0 (e.g. \"3s\")",
                    )
                    .into());
                }
                let tls = match &a.tls {
                    Some(t) => {
                        let path = |field: &str, v: &str| {
                            if v.trim().is_empty() {
                                Err(FieldError::new(field, "must name a PEM file"))
                            } else {
                                Ok(PathBuf::from(v))
                            }
                        };
                        let reload_interval = t.reload_interval.unwrap_or(Duration::from_secs(10));
                        if reload_interval.is_zero() {
                            return Err(FieldError::new(
                                "admin.tls.reloadInterval",
                                "must be above 0 (e.g. \"10s\")",
                            )
                            .into());
                        }
                        Some(AdminTls {
                            cert_file: path("admin.tls.certFile", &t.cert_file)?,
                            key_file: path("admin.tls.keyFile", &t.key_file)?,
                            reload_interval,
                        })
                    }
                    None => None,
                };
                Some(Admin {
                    listen,
                    token,
                    protect_reads: a.protect_reads,
                    liveness_timeout,
                    tls,
                })
            }
            None => None,
        };
        let p = &self.probing;
        if p.interval.is_zero() {
            return Err(FieldError::new("probing.interval", "must be greater than zero").into());
        }
        if p.timeout.is_zero() {
            return Err(FieldError::new("probing.timeout", "must be greater than zero").into());
        }
        if p.failure_threshold == 0 {
            return Err(FieldError::new("probing.failureThreshold", "must be at least 1").into());
        }
        if p.success_threshold == 0 {
            return Err(FieldError::new("probing.successThreshold", "must be at least 1").into());
        }
        let from_uri = match &p.from_uri {
            Some(u) => {
                SipUri::parse(u).map_err(|e| FieldError::new("probing.fromUri", e.to_string()))?;
                u.clone()
            }
            None => format!("sip:mrcp-lb@{}", listeners[0].advertise),
        };
        let probing = Probing {
            interval: p.interval,
            timeout: p.timeout,
            from_uri,
            alive_codes: parse_codes(&p.alive_codes, "probing.aliveCodes")?,
            failure_threshold: p.failure_threshold,
            success_threshold: p.success_threshold,
        };
        let t = &self.timers;
        for (name, d) in [
            ("timers.t1", t.t1),
            ("timers.t2", t.t2),
            ("timers.t4", t.t4),
            ("timers.inviteTimeout", t.invite_timeout),
            ("timers.inviteFinalTimeout", t.invite_final_timeout),
        ] {
            if d.is_zero() {
                return Err(FieldError::new(name, "must be greater than zero").into());
            }
        }
        let timers = Timers {
            t1: t.t1,
            t2: t.t2,
            t4: t.t4,
            invite_timeout: t.invite_timeout,
            invite_final_timeout: t.invite_final_timeout,
            non_invite_timeout: t.non_invite_timeout.unwrap_or(t.t1 * 64),
        };
        if self.dialogs.lifetime.is_zero() {
            return Err(FieldError::new("dialogs.lifetime", "must be greater than zero").into());
        }
        if self.tcp.max_message_size < 1024 {
            return Err(FieldError::new(
                "tcp.maxMessageSize",
                format!("{} is too small; at least 1024", self.tcp.max_message_size),
            )
            .into());
        }
        let tcp = &self.tcp;
        if tcp.message_timeout.is_zero() {
            return Err(FieldError::new("tcp.messageTimeout", "must be greater than zero").into());
        }
        if tcp.max_connections == 0 {
            return Err(FieldError::new("tcp.maxConnections", "must be at least 1").into());
        }
        if tcp.max_connections_per_source == 0 {
            return Err(
                FieldError::new("tcp.maxConnectionsPerSource", "must be at least 1").into(),
            );
        }
        if self.udp.max_message_size < 1024 {
            return Err(FieldError::new(
                "udp.maxMessageSize",
                format!("{} is too small; at least 1024", self.udp.max_message_size),
            )
            .into());
        }
        let limits = self.limits.into_limits()?;
        let tls = tls_section(self.tls, &listeners)?;
        let destinations = match self.destinations {
            Some(list) => {
                let set = DestinationSet {
                    version: 0,
                    destinations: list,
                    peers: None,
                };
                check_set(&listeners, &set)?;
                Some(set)
            }
            None => None,
        };
        let cluster = self.cluster.map(RawCluster::into_cluster).transpose()?;
        Ok(Config {
            listeners,
            admin,
            probing,
            routing,
            timers,
            dialogs: Dialogs {
                lifetime: self.dialogs.lifetime,
                session_timer: self.dialogs.session_timer,
                max: self.dialogs.max,
            },
            tcp: Tcp {
                max_message_size: self.tcp.max_message_size,
                idle_timeout: self.tcp.idle_timeout,
                connect_timeout: self.tcp.connect_timeout,
                message_timeout: self.tcp.message_timeout,
                max_connections: self.tcp.max_connections,
                max_connections_per_source: self.tcp.max_connections_per_source,
            },
            tls,
            udp: Udp {
                max_message_size: self.udp.max_message_size,
            },
            limits,
            dns_refresh: self.dns.refresh_interval,
            shutdown_drain: self.shutdown.drain_period,
            record_route: self
                .record_route
                .into_record_route(cluster.as_ref(), self.dialogs.lifetime)?,
            cluster,
            destinations,
        })
    }
}

/// The `tls` section, required by a `tls` listener and only then. Its files are read by the
/// runtime (`runtime::prepare`, which `--check` runs too), before anything is bound.
fn tls_section(raw: Option<RawTls>, listeners: &[Listener]) -> Result<Option<Tls>, FieldError> {
    let first_tls = listeners.iter().position(|l| l.transport == Transport::Tls);
    let raw = match (raw, first_tls) {
        (None, None) => return Ok(None),
        (None, Some(i)) => {
            return Err(FieldError::new(
                format!("listeners[{i}]"),
                "a tls listener needs the `tls` section with certFile and keyFile",
            ))
        }
        (Some(_), None) => {
            return Err(FieldError::new(
                "tls",
                "is set but no listener uses tls: add one, e.g. \"tls:0.0.0.0:5061\"",
            ))
        }
        (Some(raw), Some(_)) => raw,
    };
    let path = |field: &str, v: &str| {
        if v.trim().is_empty() {
            Err(FieldError::new(field, "must name a PEM file"))
        } else {
            Ok(PathBuf::from(v))
        }
    };
    let tls = Tls {
        cert_file: path("tls.certFile", &raw.cert_file)?,
        key_file: path("tls.keyFile", &raw.key_file)?,
        ca_file: raw
            .ca_file
            .as_deref()
            .map(|f| path("tls.caFile", f))
            .transpose()?,
        verify_destinations: raw.verify_destinations,
    };
    Ok(Some(tls))
}

impl RawLimits {
    fn into_limits(self) -> Result<Limits, FieldError> {
        // A request needs Via, From, To, Call-ID and CSeq: fewer could not carry even those.
        if self.max_headers < 8 {
            return Err(FieldError::new(
                "limits.maxHeaders",
                format!("{} is too small; at least 8", self.max_headers),
            ));
        }
        if self.max_pending_transactions == 0 {
            return Err(FieldError::new(
                "limits.maxPendingTransactions",
                "must be at least 1",
            ));
        }
        let p = self.per_source;
        let per_source = if p.rate == 0 {
            None
        } else {
            if p.window.is_zero() {
                return Err(FieldError::new(
                    "limits.perSource.window",
                    "must be greater than zero",
                ));
            }
            let burst = p.burst.unwrap_or(p.rate);
            if burst == 0 {
                return Err(FieldError::new(
                    "limits.perSource.burst",
                    "must be at least 1",
                ));
            }
            if p.max_sources == 0 {
                return Err(FieldError::new(
                    "limits.perSource.maxSources",
                    "must be at least 1",
                ));
            }
            Some(PerSource {
                rate: p.rate,
                window: p.window,
                burst,
                scope: p.scope,
                action: p.action,
                max_sources: p.max_sources,
            })
        };
        Ok(Limits {
            max_headers: self.max_headers,
            max_pending_transactions: self.max_pending_transactions,
            per_source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STANDALONE: &str = include_str!("../../examples/standalone.yaml");

    fn err(yaml: &str) -> String {
        Config::from_yaml(yaml).unwrap_err().to_string()
    }

    #[test]
    fn debug_output_hides_the_admin_token() {
        let a = Admin {
            listen: "127.0.0.1:8081".parse().unwrap(),
            token: Some("s3cr3t-admin-token".into()),
            protect_reads: false,
            liveness_timeout: DEFAULT_LIVENESS_TIMEOUT,
            tls: None,
        };
        let shown = format!("{a:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        let none = Admin { token: None, ..a };
        assert!(format!("{none:?}").contains("token: None"));
    }

    #[test]
    fn admin_reads_protection_needs_a_token_and_the_liveness_bound_is_checked() {
        let base = "listeners: [udp:127.0.0.1:5060]\nadmin:\n  listen: 127.0.0.1:8081\n";
        let e = err(&format!("{base}  protectReads: true\n"));
        assert!(e.contains("admin.protectReads"), "{e}");
        let e = err(&format!("{base}  livenessTimeout: 0s\n"));
        assert!(e.contains("admin.livenessTimeout"), "{e}");
        let c = Config::from_yaml(&format!("{base}  livenessTimeout: 750ms\n")).unwrap();
        let a = c.admin.unwrap();
        assert_eq!(a.liveness_timeout, Duration::from_millis(750));
        assert!(!a.protect_reads);
    }

    #[test]
    fn admin_listen_override_takes_a_pod_ip_of_either_family() {
        assert_eq!(
            parse_listen("10.1.2.3:8081"),
            Some("10.1.2.3:8081".parse().unwrap())
        );
        assert_eq!(
            parse_listen("fd00::7:8081"),
            Some("[fd00::7]:8081".parse().unwrap())
        );
        assert_eq!(
            parse_listen("[fd00::7]:8081"),
            Some("[fd00::7]:8081".parse().unwrap())
        );
        assert_eq!(parse_listen(":8081"), None, "an empty POD_IP");
        assert_eq!(parse_listen("pod:8081"), None);
    }

    #[test]
    fn cluster_section_is_checked_field_by_field() {
        let base = "listeners: [udp:127.0.0.1:5060]\ncluster:\n";
        let e = err(&format!("{base}  listen: nowhere\n"));
        assert!(e.contains("cluster.listen") && e.contains("nowhere"), "{e}");
        let e = err(&format!(
            "{base}  listen: 127.0.0.1:7070\n  peers: [127.0.0.2:7070, pod-b]\n"
        ));
        assert!(e.contains("cluster.peers[1]") && e.contains("pod-b"), "{e}");
        let e = err(&format!(
            "{base}  listen: 127.0.0.1:7070\n  heartbeat: 2s\n  peerTimeout: 3s\n"
        ));
        assert!(e.contains("cluster.peerTimeout"), "{e}");
        let dir = std::env::temp_dir().join(format!("lb-cluster-key-{}", std::process::id()));
        std::fs::write(&dir, "short\n").unwrap();
        let e = err(&format!(
            "{base}  listen: 127.0.0.1:7070\n  keyFile: {}\n",
            dir.display()
        ));
        assert!(
            e.contains("cluster.keyFile") && e.contains("at least 16"),
            "{e}"
        );
        std::fs::write(&dir, "0123456789abcdef-long-enough\n").unwrap();
        let c = Config::from_yaml(&format!(
            "{base}  listen: 127.0.0.1:7070\n  name: lb a\n  keyFile: {}\n",
            dir.display()
        ))
        .unwrap();
        let _ = std::fs::remove_file(&dir);
        let cl = c.cluster.unwrap();
        assert_eq!(cl.name, "lb-a", "made safe for a node id");
        assert_eq!(cl.key, Some(Key(b"0123456789abcdef-long-enough".to_vec())));
        assert!(
            !format!("{cl:?}").contains("0123456789"),
            "the key never shows"
        );
    }

    #[test]
    fn standalone_example_loads() {
        let c = Config::from_yaml(STANDALONE).unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[0].transport, Transport::Udp);
        assert_eq!(c.listeners[1].transport, Transport::Tcp);
        assert_eq!(c.admin.unwrap().listen, "127.0.0.1:8081".parse().unwrap());
        let set = c.destinations.unwrap();
        assert_eq!(set.destinations.len(), 2);
        assert_eq!(set.destinations[1].resources.get("pstn"), Some(50));
        assert_eq!(c.probing.interval, Duration::from_secs(10));
        assert_eq!(c.probing.from_uri, "sip:mrcp-lb@127.0.0.1:5060");
        assert_eq!(c.timers.invite_timeout, Duration::from_secs(3));
        assert_eq!(c.dialogs.lifetime, Duration::from_secs(12 * 3600));
    }

    #[test]
    fn bad_fields_are_named() {
        let e = err("listeners: [\"sctp:127.0.0.1:5060\"]\n");
        assert!(e.contains("listeners[0]") && e.contains("sctp"), "{e}");
        let e = err("listeners: [\"udp:127.0.0.1:5060\"]\nrouting: {mode: fastest}\n");
        assert!(e.contains("routing.mode") && e.contains("fastest"), "{e}");
        let e = err("listeners: [\"udp:127.0.0.1:5060\"]\ntimers: {inviteTimeout: 3 seconds}\n");
        assert!(
            e.contains("timers.inviteTimeout") && e.contains("3 seconds"),
            "{e}"
        );
        let e = err("listeners: [\"udp:127.0.0.1:5060\"]\ndestinations:\n - {id: 1, uri: \"http://x\", resources: pstn=1}\n");
        assert!(
            e.contains("destinations[0].uri") && e.contains("http://x"),
            "{e}"
        );
        let e = err("listeners: [\"udp:127.0.0.1:5060\"]\ndestinations:\n - {id: 1, uri: \"sip:x\", resources: pstn=many}\n");
        assert!(
            e.contains("destinations[0].resources") && e.contains("many"),
            "{e}"
        );
        let e = err("listeners: [\"udp:0.0.0.0:5060\"]\n");
        assert!(e.contains("listeners[0]") && e.contains("advertise"), "{e}");
        let e = err("listeners:\n - {address: \"udp:127.0.0.1:5060\", advertize: \"x:1\"}\n");
        assert!(e.contains("listeners[0]") && e.contains("advertize"), "{e}");
        let e = err("listeners: [\"udp:127.0.0.1:5060\"]\ntimers: {t1: soon}\n");
        assert_eq!(e.matches("timers").count(), 1, "path said once: {e}");
        let e = err("listeners: [\"udp:127.0.0.1:5060\"]\nroutng: {}\n");
        assert!(e.contains("routng"), "{e}");
        let e = err("listeners: [\"udp:127.0.0.1:5060\"]\nrouting: {failoverCodes: [\"5x\"]}\n");
        assert!(e.contains("routing.failoverCodes[0]"), "{e}");
    }

    #[test]
    fn listener_overrides_and_advertise() {
        let c = Config::from_yaml(
            "listeners:\n - address: \"tcp:[::1]:5070\"\n   advertise: \"lb.example.com:5070\"\n   group: 2\n   resources: [tts]\n - udp:0.0.0.0:5060\nadvertise: \"10.1.2.3:5060\"\n",
        )
        .unwrap();
        assert_eq!(c.listeners[0].advertise.to_string(), "lb.example.com:5070");
        assert_eq!(c.listeners[0].group, 2);
        assert_eq!(
            c.listeners[0].resources,
            Resources::Fixed(vec!["tts".to_string()])
        );
        assert_eq!(c.listeners[1].advertise.to_string(), "10.1.2.3:5060");
        // A host alone: each listener keeps its own port.
        let c = Config::from_yaml_with(
            "listeners: [\"udp:0.0.0.0:5060\", \"tcp:[::]:5070\"]\n",
            &Overrides {
                advertise: Some("10.1.2.3".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.listeners[0].advertise.to_string(), "10.1.2.3:5060");
        assert_eq!(c.listeners[1].advertise.to_string(), "10.1.2.3:5070");
        let e = err("listeners: [\"udp:127.0.0.1:5060\"]\nadvertise: \"10.1.2.3:http\"\n");
        assert!(
            e.contains("advertise") && e.contains("10.1.2.3:http"),
            "{e}"
        );
    }

    #[test]
    fn limits_defaults_and_errors() {
        let c = Config::from_yaml("listeners: [\"udp:127.0.0.1:5060\"]\n").unwrap();
        assert_eq!(c.limits.max_headers, 128);
        assert_eq!(c.limits.max_pending_transactions, 20_000);
        assert!(
            c.limits.per_source.is_none(),
            "per-source limit off by default"
        );
        assert_eq!(c.tcp.message_timeout, Duration::from_secs(10));
        assert_eq!(c.tcp.max_connections, 4096);
        assert_eq!(c.tcp.max_connections_per_source, 1024);
        assert_eq!(c.udp.max_message_size, 65_535);

        let c = Config::from_yaml(
            "listeners: [\"udp:127.0.0.1:5060\"]\nlimits:\n  perSource: {rate: 10, window: 2s, action: drop, scope: outOfDialog}\n",
        )
        .unwrap();
        let p = c.limits.per_source.unwrap();
        assert_eq!(
            (p.rate, p.burst, p.window),
            (10, 10, Duration::from_secs(2))
        );
        assert_eq!(
            (p.scope, p.action),
            (RateScope::OutOfDialog, RateAction::Drop)
        );

        let head = "listeners: [\"udp:127.0.0.1:5060\"]\n";
        for (yaml, field) in [
            ("limits: {maxHeaders: 3}", "limits.maxHeaders"),
            (
                "limits: {maxPendingTransactions: 0}",
                "limits.maxPendingTransactions",
            ),
            (
                "limits: {perSource: {rate: 5, window: 0s}}",
                "limits.perSource.window",
            ),
            (
                "limits: {perSource: {rate: 5, burst: 0}}",
                "limits.perSource.burst",
            ),
            (
                "limits: {perSource: {rate: 5, maxSources: 0}}",
                "limits.perSource.maxSources",
            ),
            (
                "limits: {perSource: {rate: 5, action: ban}}",
                "limits.perSource.action",
            ),
            ("tcp: {messageTimeout: 0s}", "tcp.messageTimeout"),
            ("tcp: {maxConnections: 0}", "tcp.maxConnections"),
            (
                "tcp: {maxConnectionsPerSource: 0}",
                "tcp.maxConnectionsPerSource",
            ),
            ("udp: {maxMessageSize: 10}", "udp.maxMessageSize"),
        ] {
            let e = err(&format!("{head}{yaml}\n"));
            assert!(e.contains(field), "{yaml}: {e}");
        }
    }

    #[test]
    fn tls_section_required_by_tls_listeners_only() {
        let c = Config::from_yaml("listeners: [\"udp:127.0.0.1:5060\"]\n").unwrap();
        assert!(c.tls.is_none());
        let e = err("listeners: [\"udp:127.0.0.1:5060\", \"tls:127.0.0.1:5061\"]\n");
        assert!(
            e.contains("listeners[1]") && e.contains("`tls` section"),
            "{e}"
        );
        let e =
            err("listeners: [\"udp:127.0.0.1:5060\"]\ntls: {certFile: a.pem, keyFile: b.pem}\n");
        assert!(
            e.starts_with("tls:") && e.contains("no listener uses tls"),
            "{e}"
        );
        let e = err("listeners: [\"tls:127.0.0.1:5061\"]\ntls: {keyFile: b.pem}\n");
        assert!(e.contains("tls") && e.contains("certFile"), "{e}");
        let e = err(
            "listeners: [\"tls:127.0.0.1:5061\"]\ntls: {certFile: a.pem, keyFile: b.pem, verify: no}\n",
        );
        assert!(e.contains("tls") && e.contains("verify"), "{e}");
        let e = err("listeners: [\"sctp:127.0.0.1:5061\"]\n");
        assert!(e.contains("use udp, tcp or tls"), "{e}");
    }

    #[test]
    fn tls_file_names_must_not_be_empty() {
        let e = err("listeners: [\"tls:127.0.0.1:5061\"]\ntls: {certFile: \"\", keyFile: x}\n");
        assert!(e.contains("tls.certFile") && e.contains("PEM file"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43200)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("3 fortnights").is_err());
        assert!(parse_duration("s").is_err());
    }
}
