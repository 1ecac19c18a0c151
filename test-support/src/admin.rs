//! The proxy's admin API over HTTP.
//!
//! One HTTP client for both programs' tests: reqwest (blocking for the proxy's thread-based
//! tests, async in `AdminClient` for the operator's tokio tests), with no pooling (every
//! request a fresh connection, as a scraper or `curl` makes) and proxies bypassed.
//!
//! Bodies are decoded with the `lb-api` types (`DestinationsStatus`, `DialogStats`): the
//! same definitions the proxy encodes with and the operator reads with, so a test reads what
//! the real consumer reads, and a field the proxy stops sending fails the decoding. The wire
//! format itself (field names, casing) is pinned where it is defined, by `lb-api`'s own
//! tests, and by the tests here that read the raw JSON on purpose (`get_json`,
//! `HttpResponse::json`).

use crate::env::unix_now;
use crate::metrics::{metric_sum, parse_metrics};
use lb_api::admin::{DestinationStatus, DestinationsStatus};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub use lb_api::admin::DialogStats;

fn blocking_client() -> &'static reqwest::blocking::Client {
    static CLIENT: OnceLock<reqwest::blocking::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::blocking::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5))
            .build()
            .expect("http client")
    })
}

/// A raw HTTP response: status code, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub code: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics (showing the body) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not a JSON body ({e}): {:?}", self.body))
    }
}

/// One HTTP/1.1 request; `bearer` adds `Authorization: Bearer <token>`, `headers` any other
/// header (values sent as given, bytes beyond ASCII included), `body` is sent as
/// `application/json` (an empty one too for any method but GET).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    bearer: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<HttpResponse> {
    use reqwest::header::{HeaderName, HeaderValue};
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(std::io::Error::other)?;
    let mut req = blocking_client().request(method.clone(), format!("http://{addr}{path}"));
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(std::io::Error::other)?;
        let value = HeaderValue::from_bytes(v.as_bytes()).map_err(std::io::Error::other)?;
        req = req.header(name, value);
    }
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method != reqwest::Method::GET {
        req = req
            .header("content-type", "application/json")
            .body(body.to_string());
    } else {
        req = req.header("accept", "application/json");
    }
    let resp = req.send().map_err(std::io::Error::other)?;
    let code = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).trim().to_string(),
            )
        })
        .collect();
    let body = resp.text().map_err(std::io::Error::other)?;
    Ok(HttpResponse {
        code,
        headers,
        body,
    })
}

/// A GET; returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[], None, None).map(|r| (r.code, r.body))
}

/// `http_request`, panicking on a transport error.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> HttpResponse {
    http_request(addr, method, path, &[], bearer, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

pub fn try_get_json(addr: SocketAddr, path: &str) -> Result<Value, String> {
    let (code, body) = http_get(addr, path).map_err(|e| format!("GET {path}: {e}"))?;
    if code != 200 {
        return Err(format!("GET {path} answered {code}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e} in {body:?}"))
}

pub fn get_json(addr: SocketAddr, path: &str) -> Value {
    try_get_json(addr, path).unwrap_or_else(|e| panic!("{e}"))
}

fn try_get_typed<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
) -> Result<T, String> {
    let (code, body) = http_get(addr, path).map_err(|e| format!("GET {path}: {e}"))?;
    if code != 200 {
        return Err(format!("GET {path} answered {code}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e} in {body:?}"))
}

pub fn try_dialog_stats(admin: SocketAddr) -> Result<DialogStats, String> {
    try_get_typed(admin, "/v1/dialogs/stats")
}

pub fn dialog_stats(admin: SocketAddr) -> DialogStats {
    try_dialog_stats(admin).unwrap_or_else(|e| panic!("{e}"))
}

/// One numeric field of `/v1/dialogs/stats` (e.g. `malformed`, `routed`).
pub fn stats_number(admin: SocketAddr, key: &str) -> u64 {
    let v = get_json(admin, "/v1/dialogs/stats");
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("/v1/dialogs/stats has no number {key:?}: {v}"))
}

/// The Prometheus text of `GET /metrics`.
pub fn metrics_text(admin: SocketAddr) -> String {
    match http_get(admin, "/metrics") {
        Ok((200, body)) => body,
        Ok((code, body)) => panic!("GET /metrics answered {code}: {body}"),
        Err(e) => panic!("GET /metrics: {e}"),
    }
}

/// `metric_sum` of the process's `/metrics` now: the samples named `name` whose labels
/// include every `labels` pair, summed (0 when none).
pub fn scraped_sum(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&parse_metrics(&metrics_text(admin)), name, labels)
}

/// `GET /v1/destinations`, decoded.
pub fn try_destinations_status(admin: SocketAddr) -> Result<DestinationsStatus, String> {
    try_get_typed(admin, "/v1/destinations")
}

pub fn destinations_status(admin: SocketAddr) -> DestinationsStatus {
    try_destinations_status(admin).unwrap_or_else(|e| panic!("{e}"))
}

/// One destination of `GET /v1/destinations`, decoded; panics when it is not listed.
pub fn destination_status(admin: SocketAddr, id: &str) -> DestinationStatus {
    let s = destinations_status(admin);
    s.destinations
        .iter()
        .find(|d| d.id == id)
        .cloned()
        .unwrap_or_else(|| panic!("destination {id} not listed: {s:?}"))
}

/// A destination's `pstn` resource: (load, capacity); panics when it has none.
pub fn pstn(d: &DestinationStatus) -> (u32, u32) {
    let r = d
        .resources
        .iter()
        .find(|r| r.name == "pstn")
        .unwrap_or_else(|| panic!("destination {} has no pstn: {d:?}", d.id));
    (r.load, r.capacity)
}

/// A destination's `pstn` load.
pub fn pstn_load(d: &DestinationStatus) -> u32 {
    pstn(d).0
}

/// A destination's load on each of its resources, by name (SDP routing counts several).
pub fn resource_loads(d: &DestinationStatus) -> BTreeMap<String, u32> {
    d.resources
        .iter()
        .map(|r| (r.name.clone(), r.load))
        .collect()
}

/// A destination as most tests look at it: its id, URI, state and the `pstn` resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestState {
    pub id: String,
    pub uri: String,
    pub state: String,
    /// Load on the `pstn` resource.
    pub load: u64,
    pub capacity: u64,
}

impl DestState {
    fn from_status(d: &lb_api::admin::DestinationStatus) -> Result<DestState, String> {
        let pstn = d
            .resources
            .iter()
            .find(|r| r.name == "pstn")
            .ok_or_else(|| format!("destination {} has no pstn resource: {d:?}", d.id))?;
        Ok(DestState {
            id: d.id.clone(),
            uri: d.uri.clone(),
            state: d.state.as_str().to_string(),
            load: u64::from(pstn.load),
            capacity: u64::from(pstn.capacity),
        })
    }
}

pub fn try_destinations(admin: SocketAddr) -> Result<Vec<DestState>, String> {
    try_destinations_status(admin)?
        .destinations
        .iter()
        .map(DestState::from_status)
        .collect()
}

pub fn destinations(admin: SocketAddr) -> Vec<DestState> {
    try_destinations(admin).unwrap_or_else(|e| panic!("{e}"))
}

pub fn dest<'a>(ds: &'a [DestState], id: &str) -> &'a DestState {
    ds.iter()
        .find(|d| d.id == id)
        .unwrap_or_else(|| panic!("no destination {id} in {ds:?}"))
}

/// `PUT /v1/destinations` with a JSON body.
pub fn put_destinations(admin: SocketAddr, bearer: Option<&str>, body: &str) -> HttpResponse {
    http(admin, "PUT", "/v1/destinations", bearer, Some(body))
}

/// `POST /v1/destinations/{id}/state` with `{"action": action}`.
pub fn post_state(admin: SocketAddr, bearer: Option<&str>, id: &str, action: &str) -> HttpResponse {
    let body = serde_json::json!({ "action": action }).to_string();
    http(
        admin,
        "POST",
        &format!("/v1/destinations/{id}/state"),
        bearer,
        Some(&body),
    )
}

/// The raw JSON of `GET /v1/destinations`.
pub fn destinations_json(admin: SocketAddr) -> Value {
    get_json(admin, "/v1/destinations")
}

/// The raw JSON of one destination in `GET /v1/destinations`, if listed.
pub fn destination_json(admin: SocketAddr, id: &str) -> Option<Value> {
    destinations_json(admin)
        .get("destinations")?
        .as_array()?
        .iter()
        .find(|d| d.get("id").and_then(Value::as_str) == Some(id))
        .cloned()
}

/// Samples per-destination loads in the background.
pub struct LoadSampler {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Vec<LoadSample>>>,
}

#[derive(Debug, Clone)]
pub struct LoadSample {
    /// Time since the sampler started.
    pub at: Duration,
    /// Wall-clock time (Unix seconds) in the middle of the `/v1/destinations` request, to
    /// match the sample with sipp's statistics rows.
    pub unix_at: f64,
    /// How long that request took: how precisely `unix_at` places the loads.
    pub took: Duration,
    pub loads: BTreeMap<String, u64>,
    pub stats: DialogStats,
}

impl LoadSampler {
    pub fn start(admin: SocketAddr, every: Duration) -> LoadSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = thread::spawn(move || {
            let t0 = Instant::now();
            let mut out = Vec::new();
            while !stop2.load(Ordering::SeqCst) {
                // A failed poll (proxy busy) is skipped, not fatal: the samples are checked later.
                let (asked, asked_unix) = (Instant::now(), unix_now());
                let ds = try_destinations(admin);
                let (took, answered_unix) = (asked.elapsed(), unix_now());
                if let (Ok(ds), Ok(stats)) = (ds, try_dialog_stats(admin)) {
                    out.push(LoadSample {
                        at: t0.elapsed(),
                        unix_at: (asked_unix + answered_unix) / 2.0,
                        took,
                        loads: ds.into_iter().map(|d| (d.id, d.load)).collect(),
                        stats,
                    });
                }
                thread::sleep(every);
            }
            out
        });
        LoadSampler {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> Vec<LoadSample> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .map(|h| h.join().expect("sampler thread"))
            .unwrap_or_default()
    }
}

impl Drop for LoadSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The admin API of one process for async (tokio) tests: the operator's harness reads its
/// proxies and operators with it.
#[derive(Clone)]
pub struct AdminClient {
    pub addr: SocketAddr,
    /// Names the process in error messages.
    pub name: String,
    http: reqwest::Client,
}

impl AdminClient {
    pub fn new(name: &str, addr: SocketAddr) -> AdminClient {
        AdminClient {
            addr,
            name: name.to_string(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(3))
                .build()
                .expect("http client"),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// GET; (status, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        let url = format!("http://{}{path}", self.addr);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let code = resp.status().as_u16();
        let body = resp.text().await.map_err(|e| format!("GET {url}: {e}"))?;
        Ok((code, body))
    }

    /// GET a 200 with a JSON body, decoded.
    pub async fn get_typed<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let (code, body) = self.get(path).await?;
        if code != 200 {
            return Err(format!("{}: {path} answered {code}: {body}", self.name));
        }
        serde_json::from_str(&body).map_err(|e| format!("{}: {path}: {e} in {body}", self.name))
    }

    pub async fn destinations(&self) -> Result<DestinationsStatus, String> {
        self.get_typed("/v1/destinations").await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String, String> {
        match self.get("/metrics").await? {
            (200, body) => Ok(body),
            (code, body) => Err(format!("{}: /metrics answered {code}: {body}", self.name)),
        }
    }
}
