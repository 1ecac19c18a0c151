//! The admin HTTP API.
//!
//! | endpoint | |
//! |---|---|
//! | `GET /healthz` | the core answers within `admin.livenessTimeout` (a watchdog) |
//! | `GET /readyz` | listeners bound, a destination set loaded, not shutting down |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /v1/destinations` | every destination with load, state, probe statistics |
//! | `PUT /v1/destinations` | replace the whole set (JSON `DestinationSet`, versioned) |
//! | `POST /v1/destinations/{id}/state` | `{"action": "enable" \| "disable" \| "drain"}` |
//! | `GET /v1/destinations/wait-drained?pod=NS/NAME&timeout=600s` | waits until the pod's destination carries no session cluster-wide (also `?id=ID`) |
//! | `GET /v1/dialogs/stats` | active, early, processed, expired, failed |
//! | `GET /v1/dialogs?destination=&state=&minAge=&callId=&limit=&cursor=` | this replica's dialogs, one page |
//! | `DELETE /v1/dialogs/{id}` | BYE to both sides of one dialog, load released |
//! | `DELETE /v1/dialogs?destination=ID` | the same for every confirmed dialog on a destination |
//!
//! Write endpoints require `Authorization: Bearer <token>` when a token is configured
//! (`admin.tokenFile` or `LB_PROXY_ADMIN_TOKEN`); the comparison takes the same time wherever
//! the tokens differ. The dialog list needs it too, always (it shows callers' addresses);
//! the other reads need it with `admin.protectReads`, except `/healthz`, `/readyz` and the
//! drain wait ([`OPEN_READS`]). Every request is answered by the core task through the event
//! channel, so the API never touches call state directly.

// Handlers return axum's `Response` as their error: it is what they answer with.
#![allow(clippy::result_large_err)]

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use lb_api::admin::{DialogState, DialogsEnded, ErrorBody, StateChange};
use lb_api::DestinationSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::proxy::{
    parse_dialog_id, Applied, Control, DialogFilter, DialogQuery, DrainTarget, EndError, SetError,
};

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    /// The core's control queue.
    pub control: mpsc::Sender<Control>,
    pub token: Option<Arc<str>>,
    /// Reads need the token too (but [`OPEN_READS`]).
    pub protect_reads: bool,
    /// `/healthz` fails when the core has not answered within this bound.
    pub liveness_timeout: Duration,
    /// The process is stopping: long polls answer at once.
    pub shutdown: CancellationToken,
    /// Drain waits open at once (each asks the core every [`DRAIN_POLL`]): a bound, so that
    /// open reads cannot keep the core busy.
    pub drain_waits: Arc<tokio::sync::Semaphore>,
}

/// Reads open even with `admin.protectReads`: the kubelet's probes and a UniMRCP pod's preStop
/// hook hold no token, and these tell nothing about calls beyond one pod's session count.
pub const OPEN_READS: [&str; 3] = ["/healthz", "/readyz", "/v1/destinations/wait-drained"];

/// The most drain waits open at once; one more gets 503 at once. A fleet's preStop hooks
/// wait for their own pods: a few dozen at the most.
pub const MAX_DRAIN_WAITS: usize = 256;

fn error(code: StatusCode, msg: impl Into<String>, field: Option<String>) -> Response {
    let body = ErrorBody {
        error: msg.into(),
        field,
    };
    (code, Json(body)).into_response()
}

impl Api {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Control,
    ) -> Result<T, Response> {
        let (tx, rx) = oneshot::channel();
        let stopped = || error(StatusCode::SERVICE_UNAVAILABLE, "proxy core stopped", None);
        self.control.send(make(tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), Response> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required",
                None,
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            Err(r)
        }
    }
}

/// Compares without stopping at the first difference, so the time taken does not tell an
/// attacker how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// Liveness: the core must answer a ping within the bound. A core stuck in a loop (or blocked)
/// fails it, and the kubelet restarts the container; a process whose HTTP server alone runs
/// is not alive.
async fn healthz(State(api): State<Api>) -> Response {
    let (tx, rx) = oneshot::channel();
    let asked = async {
        api.control.send(Control::Alive(tx)).await.ok()?;
        rx.await.ok()
    };
    match tokio::time::timeout(api.liveness_timeout, asked).await {
        Ok(Some(())) => (StatusCode::OK, "ok\n").into_response(),
        Ok(None) => (StatusCode::SERVICE_UNAVAILABLE, "proxy core stopped\n").into_response(),
        Err(_) => {
            tracing::error!(
                "watchdog: the core did not answer within {:?}",
                api.liveness_timeout
            );
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "proxy core did not answer within {:?}\n",
                    api.liveness_timeout
                ),
            )
                .into_response()
        }
    }
}

/// With `admin.protectReads`, every read but [`OPEN_READS`] needs the token (writes check it
/// in their handlers).
async fn read_guard(
    State(api): State<Api>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if api.protect_reads && read && !OPEN_READS.contains(&req.uri().path()) {
        if let Err(r) = api.authorize(req.headers()) {
            return r;
        }
    }
    next.run(req).await
}

/// Test builds only: blocks the core thread for `ms` milliseconds (token required).
#[cfg(feature = "test-stall")]
async fn stall(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, u64>>,
) -> Response {
    if let Err(r) = api.authorize(&headers) {
        return r;
    }
    let ms = q.get("ms").copied().unwrap_or(1000).min(60_000);
    match api
        .control
        .send(Control::Stall(Duration::from_millis(ms)))
        .await
    {
        Ok(()) => (StatusCode::ACCEPTED, format!("stalling {ms} ms\n")).into_response(),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "proxy core stopped", None),
    }
}

async fn readyz(State(api): State<Api>) -> Response {
    match api.ask(Control::Ready).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
        Err(r) => r,
    }
}

async fn metrics(State(api): State<Api>) -> Response {
    match api.ask(Control::Metrics).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(r) => r,
    }
}

async fn get_destinations(State(api): State<Api>) -> Response {
    match api.ask(Control::Status).await {
        Ok(s) => Json(s).into_response(),
        Err(r) => r,
    }
}

async fn put_destinations(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = api.authorize(&headers) {
        return r;
    }
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let set: DestinationSet = match serde_path_to_error::deserialize(de) {
        Ok(s) => s,
        Err(e) => {
            let path = e.path().to_string();
            return error(
                StatusCode::BAD_REQUEST,
                e.into_inner().to_string(),
                (path != ".").then_some(path),
            );
        }
    };
    match api.ask(|tx| Control::Replace(set, tx)).await {
        Ok(Ok(applied)) => match api.ask(Control::Status).await {
            Ok(status) => {
                let code = match applied {
                    Applied::Replaced => StatusCode::OK,
                    Applied::Unchanged => StatusCode::OK,
                };
                (code, Json(status)).into_response()
            }
            Err(r) => r,
        },
        Ok(Err(SetError::Invalid(e))) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.to_string(),
            Some(e.field),
        ),
        Ok(Err(SetError::Conflict(e))) => error(StatusCode::CONFLICT, e, Some("version".into())),
        Err(r) => r,
    }
}

async fn post_state(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = api.authorize(&headers) {
        return r;
    }
    let change: StateChange = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{e}; expected {{\"action\": \"enable\" | \"disable\" | \"drain\"}}"),
                Some("action".into()),
            )
        }
    };
    match api
        .ask(|tx| Control::Manual(id.clone(), change.action, tx))
        .await
    {
        Ok(Some(state)) => Json(serde_json::json!({ "id": id, "state": state })).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no destination with id {id:?}"),
            None,
        ),
        Err(r) => r,
    }
}

/// How often a drain wait asks the core again.
const DRAIN_POLL: Duration = Duration::from_millis(200);
/// The longest drain wait: longer than any sensible `terminationGracePeriodSeconds`.
const MAX_DRAIN_WAIT: Duration = Duration::from_secs(3600);
/// The wait when no `timeout` is given.
const DEFAULT_DRAIN_WAIT: Duration = Duration::from_secs(600);

/// A parsed `wait-drained` query: the target, how it was asked, the timeout.
#[derive(Debug, PartialEq, Eq)]
struct DrainWait {
    target: DrainTarget,
    asked: String,
    timeout: Duration,
}

/// A query parameter that cannot be used: (parameter, message).
type ParamError = (String, String);

fn drain_wait(params: &[(String, String)]) -> Result<DrainWait, ParamError> {
    let mut target = None;
    let mut timeout = None;
    for (k, v) in params {
        let seen = match k.as_str() {
            "pod" | "id" => target.is_some(),
            "timeout" => timeout.is_some(),
            other => {
                return Err((
                    other.to_string(),
                    format!("unknown parameter {other:?}; expected pod=NAMESPACE/NAME or id=ID, and timeout"),
                ))
            }
        };
        if seen {
            return Err((
                k.clone(),
                format!("{k}={v:?}: given twice (one of pod or id, and one timeout)"),
            ));
        }
        match k.as_str() {
            "pod" => {
                let t = DrainTarget::pod(v).map_err(|e| ("pod".to_string(), format!("pod={e}")))?;
                target = Some((t, format!("pod={v}")));
            }
            "id" if v.is_empty() => {
                return Err(("id".into(), "id must not be empty".into()));
            }
            "id" => target = Some((DrainTarget::Id(v.clone()), format!("id={v}"))),
            _ => timeout = Some(parse_timeout(v).map_err(|e| ("timeout".to_string(), e))?),
        }
    }
    let Some((target, asked)) = target else {
        return Err((
            "pod".into(),
            "say which destination: pod=NAMESPACE/NAME (as the operator names it) or id=ID".into(),
        ));
    };
    Ok(DrainWait {
        target,
        asked,
        timeout: timeout.unwrap_or(DEFAULT_DRAIN_WAIT),
    })
}

/// `600`, `600s`, `10m`, `1h`, `1500ms`: from 0 to one hour.
fn parse_timeout(v: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "timeout={v:?}: expected a whole number of seconds, or with a unit (ms, s, m, h), \
             e.g. 600s, from 0 to {}s",
            MAX_DRAIN_WAIT.as_secs()
        )
    };
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(bad)?;
    let d = Duration::from_millis(ms);
    if d > MAX_DRAIN_WAIT {
        return Err(format!(
            "timeout={v:?}: at most {}s (one hour)",
            MAX_DRAIN_WAIT.as_secs()
        ));
    }
    Ok(d)
}

/// Waits until the destination is drained cluster-wide (200) or the timeout passes (504,
/// with what is still open); 503 when the proxy stops meanwhile. The core is asked every
/// [`DRAIN_POLL`], so the wait never holds it. A read, open without a token, so that a
/// `preStop` hook needs nothing but curl or wget.
async fn wait_drained(
    State(api): State<Api>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let params = match query {
        Ok(Query(p)) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text(), None),
    };
    let wait = match drain_wait(&params) {
        Ok(w) => w,
        Err((field, msg)) => return error(StatusCode::BAD_REQUEST, msg, Some(field)),
    };
    let Ok(_slot) = api.drain_waits.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_DRAIN_WAITS} drain waits are open already; ask again later"),
            None,
        );
    };
    let start = tokio::time::Instant::now();
    let deadline = start + wait.timeout;
    loop {
        let target = wait.target.clone();
        let mut s = match api.ask(|tx| Control::DrainStatus(target, tx)).await {
            Ok(s) => s,
            Err(r) => return r,
        };
        s.asked.clone_from(&wait.asked);
        s.waited_seconds = start.elapsed().as_secs_f64();
        if s.drained {
            return (StatusCode::OK, Json(s)).into_response();
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return (StatusCode::GATEWAY_TIMEOUT, Json(s)).into_response();
        }
        tokio::select! {
            _ = tokio::time::sleep(DRAIN_POLL.min(deadline - now)) => {}
            _ = api.shutdown.cancelled() => {
                return (StatusCode::SERVICE_UNAVAILABLE, Json(s)).into_response();
            }
        }
    }
}

async fn dialog_stats(State(api): State<Api>) -> Response {
    match api.ask(Control::Stats).await {
        Ok(s) => Json(s).into_response(),
        Err(r) => r,
    }
}

async fn cluster(State(api): State<Api>) -> Response {
    match api.ask(Control::Cluster).await {
        Ok(s) => Json(s).into_response(),
        Err(r) => r,
    }
}

/// Dialogs per page when `limit` is not given, and the most a page may ask for.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The parameters of `GET /v1/dialogs` (and, without paging, of the bulk `DELETE`).
#[derive(Debug, PartialEq, Eq)]
struct DialogParams {
    filter: DialogFilter,
    after: Option<u64>,
    limit: Option<usize>,
}

fn dialog_params(params: &[(String, String)]) -> Result<DialogParams, ParamError> {
    let mut p = DialogParams {
        filter: DialogFilter::default(),
        after: None,
        limit: None,
    };
    let twice = |k: &str| (k.to_string(), format!("{k} given twice"));
    for (k, v) in params {
        match k.as_str() {
            "destination" => {
                if v.is_empty() {
                    return Err((k.clone(), "destination must not be empty".into()));
                }
                if p.filter.destination.replace(v.clone()).is_some() {
                    return Err(twice(k));
                }
            }
            "callId" => {
                if v.is_empty() {
                    return Err((k.clone(), "callId must not be empty".into()));
                }
                if p.filter.call_id.replace(v.clone()).is_some() {
                    return Err(twice(k));
                }
            }
            "state" => {
                let s = DialogState::ALL
                    .into_iter()
                    .find(|s| s.as_str() == v)
                    .ok_or_else(|| {
                        (
                            k.clone(),
                            format!("state={v:?}: expected trying, early or confirmed"),
                        )
                    })?;
                if p.filter.state.replace(s).is_some() {
                    return Err(twice(k));
                }
            }
            "minAge" | "olderThan" => {
                let d = parse_age(v).map_err(|e| (k.clone(), format!("{k}={e}")))?;
                if p.filter.min_age.replace(d).is_some() {
                    return Err(twice("minAge"));
                }
            }
            "limit" => {
                let n = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        (
                            k.clone(),
                            format!("limit={v:?}: expected a whole number from 1 to {MAX_PAGE}"),
                        )
                    })?;
                if p.limit.replace(n).is_some() {
                    return Err(twice(k));
                }
            }
            "cursor" | "after" => {
                let n = v.parse::<u64>().map_err(|_| {
                    (
                        k.clone(),
                        format!("{k}={v:?}: not a cursor (pass nextCursor as it came)"),
                    )
                })?;
                if p.after.replace(n).is_some() {
                    return Err(twice("cursor"));
                }
            }
            other => {
                return Err((
                    other.to_string(),
                    format!(
                        "unknown parameter {other:?}; expected destination, state, minAge,                          callId, limit, cursor"
                    ),
                ))
            }
        }
    }
    Ok(p)
}

/// `90`, `90s`, `15m`, `2h`, `1d`: a whole number of seconds, or with a unit.
fn parse_age(v: &str) -> Result<Duration, String> {
    let bad = || format!("{v:?}: expected whole seconds, or with a unit (s, m, h, d), e.g. 600s");
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(bad)?;
    Ok(Duration::from_secs(secs))
}

fn query_params(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Vec<(String, String)>, Response> {
    query
        .map(|Query(p)| p)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text(), None))
}

/// `GET /v1/dialogs`: one page of this replica's dialogs. Needs the token: it shows callers'
/// addresses.
async fn list_dialogs(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    if let Err(r) = api.authorize(&headers) {
        return r;
    }
    let p = match query_params(query).map(|q| dialog_params(&q)) {
        Ok(Ok(p)) => p,
        Ok(Err((field, msg))) => return error(StatusCode::BAD_REQUEST, msg, Some(field)),
        Err(r) => return r,
    };
    let q = DialogQuery {
        filter: p.filter,
        after: p.after.unwrap_or(0),
        limit: p.limit.unwrap_or(DEFAULT_PAGE),
    };
    match api.ask(|tx| Control::Dialogs(q, tx)).await {
        Ok(list) => Json(list).into_response(),
        Err(r) => r,
    }
}

/// `DELETE /v1/dialogs/{id}`: BYE to both sides, load released. 404 for no such dialog, 409
/// for one still being set up.
async fn end_dialog(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = api.authorize(&headers) {
        return r;
    }
    let key = match parse_dialog_id(&id) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e, Some("id".into())),
    };
    match api.ask(|tx| Control::EndDialog(key, tx)).await {
        Ok(Ok(ended)) => Json(ended).into_response(),
        Ok(Err(EndError::NotFound)) => error(
            StatusCode::NOT_FOUND,
            format!("no dialog with id {id:?} on this replica (ended already, or held by another)"),
            None,
        ),
        Ok(Err(EndError::NotConfirmed(d))) => error(
            StatusCode::CONFLICT,
            format!(
                "dialog {id:?} is {} (not answered yet): its INVITE transaction ends it",
                d.state.as_str()
            ),
            Some("state".into()),
        ),
        Err(r) => r,
    }
}

/// `DELETE /v1/dialogs?destination=ID` (optionally `minAge`, `callId`, `state=confirmed`): ends
/// every confirmed dialog on the destination, asking the core batch by batch so that calls go
/// on meanwhile. 404 when the destination is unknown here.
async fn end_dialogs(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    if let Err(r) = api.authorize(&headers) {
        return r;
    }
    let p = match query_params(query).map(|q| dialog_params(&q)) {
        Ok(Ok(p)) => p,
        Ok(Err((field, msg))) => return error(StatusCode::BAD_REQUEST, msg, Some(field)),
        Err(r) => return r,
    };
    if p.after.is_some() || p.limit.is_some() {
        let field = if p.after.is_some() { "cursor" } else { "limit" };
        return error(
            StatusCode::BAD_REQUEST,
            format!("{field} is for GET; DELETE ends every match"),
            Some(field.into()),
        );
    }
    let Some(destination) = p.filter.destination.clone() else {
        return error(
            StatusCode::BAD_REQUEST,
            "say which destination: DELETE /v1/dialogs?destination=ID (ending every dialog              of the proxy at once is not offered)",
            Some("destination".into()),
        );
    };
    let mut total = DialogsEnded {
        destination,
        ended: 0,
        byes_sent: 0,
        not_confirmed: 0,
    };
    let mut after = 0;
    loop {
        let filter = p.filter.clone();
        let batch = match api.ask(|tx| Control::EndDialogs(filter, after, tx)).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        if !batch.known && total.ended == 0 && batch.ended == 0 {
            return error(
                StatusCode::NOT_FOUND,
                format!("no destination with id {:?}", total.destination),
                Some("destination".into()),
            );
        }
        total.ended += batch.ended;
        total.byes_sent += batch.byes_sent;
        total.not_confirmed += batch.not_confirmed;
        match batch.next {
            Some(n) => after = n,
            None => break,
        }
    }
    Json(total).into_response()
}

pub fn router(api: Api) -> Router {
    let r = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/v1/destinations",
            get(get_destinations).put(put_destinations),
        )
        .route("/v1/destinations/wait-drained", get(wait_drained))
        .route("/v1/destinations/{id}/state", post(post_state))
        .route("/v1/dialogs/stats", get(dialog_stats))
        .route("/v1/dialogs", get(list_dialogs).delete(end_dialogs))
        .route("/v1/dialogs/{id}", delete(end_dialog))
        .route("/v1/cluster", get(cluster));
    #[cfg(feature = "test-stall")]
    let r = r.route("/v1/test/stall", post(stall));
    r.layer(axum::middleware::from_fn_with_state(
        api.clone(),
        read_guard,
    ))
    .with_state(api)
}

pub async fn serve<L>(listener: L, api: Api, shutdown: CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let _ = axum::serve(listener, router(api))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Serves `api` on a free loopback port (127.0.14.1: this module's tests only).
    async fn serve_api(api: Api) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.14.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, api, CancellationToken::new()));
        addr
    }

    fn api(control: mpsc::Sender<Control>, protect_reads: bool) -> Api {
        Api {
            control,
            token: Some("t0k3n".into()),
            protect_reads,
            liveness_timeout: Duration::from_millis(300),
            shutdown: CancellationToken::new(),
            drain_waits: Arc::new(tokio::sync::Semaphore::new(MAX_DRAIN_WAITS)),
        }
    }

    /// A core that answers what these tests ask.
    fn answering_core(mut rx: mpsc::Receiver<Control>) {
        tokio::spawn(async move {
            while let Some(c) = rx.recv().await {
                match c {
                    Control::Alive(r) => drop(r.send(())),
                    Control::Ready(r) => drop(r.send(Ok(()))),
                    Control::Status(r) => drop(r.send(lb_api::admin::DestinationsStatus {
                        version: 1,
                        updated: 0,
                        destinations: vec![],
                    })),
                    _ => {}
                }
            }
        });
    }

    async fn get(addr: std::net::SocketAddr, path: &str, bearer: Option<&str>) -> (u16, String) {
        let (path, bearer) = (path.to_string(), bearer.map(str::to_string));
        tokio::task::spawn_blocking(move || {
            let r = mrcp_lb_test_support::http_request(
                addr,
                "GET",
                &path,
                &[],
                bearer.as_deref(),
                None,
            )
            .unwrap();
            (r.code, r.body)
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn healthz_fails_when_the_core_does_not_turn_over() {
        // A core that takes requests off its queue and never answers, as a stuck loop would
        // (the queue holds one: the second probe waits to be queued, and fails alike).
        let (control, mut rx) = mpsc::channel(1);
        let stuck = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(c) = rx.recv().await {
                held.push(c);
            }
        });
        let addr = serve_api(api(control, false)).await;
        for _ in 0..2 {
            let t = std::time::Instant::now();
            let (code, body) = get(addr, "/healthz", None).await;
            assert_eq!(code, 503, "{body}");
            assert!(body.contains("did not answer within 300ms"), "{body}");
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        }
        stuck.abort();
        // A core that answers: alive.
        let (control, rx) = mpsc::channel(1);
        answering_core(rx);
        let addr = serve_api(api(control, false)).await;
        assert_eq!(get(addr, "/healthz", None).await, (200, "ok\n".into()));
        // A core that is gone: not alive either.
        let (control, rx) = mpsc::channel(1);
        drop(rx);
        let addr = serve_api(api(control, false)).await;
        assert_eq!(get(addr, "/healthz", None).await.0, 503);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_protect_reads_only_probes_and_the_drain_wait_are_open() {
        let (control, rx) = mpsc::channel(8);
        answering_core(rx);
        let addr = serve_api(api(control.clone(), true)).await;
        for path in [
            "/v1/destinations",
            "/metrics",
            "/v1/dialogs/stats",
            "/v1/cluster",
        ] {
            let (code, body) = get(addr, path, None).await;
            assert_eq!(code, 401, "{path}: {body}");
            assert_eq!(get(addr, path, Some("wrong")).await.0, 401, "{path}");
        }
        assert_eq!(get(addr, "/v1/destinations", Some("t0k3n")).await.0, 200);
        assert_eq!(get(addr, "/healthz", None).await.0, 200);
        assert_eq!(get(addr, "/readyz", None).await.0, 200);
        // Open: a bad parameter is a 400, not a 401.
        let (code, body) = get(addr, "/v1/destinations/wait-drained?pod=x", None).await;
        assert_eq!(code, 400, "{body}");
        // Without the option reads are open.
        let addr = serve_api(api(control, false)).await;
        assert_eq!(get(addr, "/v1/destinations", None).await.0, 200);
    }

    /// Past the bound on open drain waits, one more is refused at once, without asking the
    /// core anything.
    #[tokio::test]
    async fn drain_waits_are_bounded() {
        let (control, mut core) = mpsc::channel(1);
        let api = Api {
            control,
            token: None,
            protect_reads: false,
            liveness_timeout: Duration::from_secs(3),
            shutdown: CancellationToken::new(),
            drain_waits: Arc::new(tokio::sync::Semaphore::new(0)),
        };
        let r = wait_drained(State(api), Ok(Query(q(&[("id", "x")])))).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(core.try_recv().is_err(), "the core was asked");
    }

    #[test]
    fn drain_wait_parameters() {
        let w = drain_wait(&q(&[("pod", "speech/unimrcp-0"), ("timeout", "90s")])).unwrap();
        assert_eq!(
            w,
            DrainWait {
                target: DrainTarget::Pod {
                    namespace: "speech".into(),
                    name: "unimrcp-0".into()
                },
                asked: "pod=speech/unimrcp-0".into(),
                timeout: Duration::from_secs(90),
            }
        );
        let w = drain_wait(&q(&[("id", "7")])).unwrap();
        assert_eq!(
            (w.target, w.timeout),
            (DrainTarget::Id("7".into()), DEFAULT_DRAIN_WAIT)
        );
        let field = |pairs: &[(&str, &str)]| drain_wait(&q(pairs)).unwrap_err();
        assert_eq!(field(&[]).0, "pod", "a target is required");
        assert_eq!(field(&[("pod", "unimrcp-0")]).0, "pod", "namespace missing");
        assert_eq!(
            field(&[("pod", "Speech/x")]).0,
            "pod",
            "not a Kubernetes name"
        );
        assert_eq!(field(&[("pod", "speech/")]).0, "pod");
        assert_eq!(field(&[("pod", "a/b"), ("id", "c")]).0, "id", "both");
        assert_eq!(field(&[("id", "")]).0, "id");
        assert_eq!(
            field(&[("id", "a"), ("podd", "x")]).0,
            "podd",
            "a typo is named"
        );
        let (f, msg) = field(&[("id", "a"), ("timeout", "2d")]);
        assert_eq!(f, "timeout");
        assert!(msg.contains("\"2d\""), "{msg}");
        let (f, msg) = field(&[("id", "a"), ("timeout", "5000s")]);
        assert_eq!(f, "timeout");
        assert!(msg.contains("at most 3600s"), "{msg}");
        assert_eq!(
            field(&[("id", "a"), ("timeout", "1"), ("timeout", "2")]).0,
            "timeout"
        );
    }

    #[test]
    fn drain_timeouts() {
        let t = |s: &str| parse_timeout(s);
        assert_eq!(t("600"), Ok(Duration::from_secs(600)));
        assert_eq!(t("600s"), Ok(Duration::from_secs(600)));
        assert_eq!(t("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(t("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(t("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(t("0"), Ok(Duration::ZERO));
        for bad in [
            "",
            "s",
            "-1",
            "1.5s",
            "2h",
            "61m",
            "10 s",
            "99999999999999999999",
            "3601",
        ] {
            assert!(t(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn pods_match_every_uid_of_their_name() {
        let pod = DrainTarget::pod("speech/unimrcp-0").unwrap();
        assert!(pod.matches("speech/unimrcp-0@7460ce94"));
        assert!(pod.matches("speech/unimrcp-0@"));
        assert!(pod.matches("speech/unimrcp-0"));
        assert!(!pod.matches("speech/unimrcp-01@7460ce94"));
        assert!(!pod.matches("other/unimrcp-0@7460ce94"));
        assert!(!pod.matches("unimrcp-0"));
        let id = DrainTarget::Id("speech/unimrcp-0@7460ce94".into());
        assert!(id.matches("speech/unimrcp-0@7460ce94"));
        assert!(!id.matches("speech/unimrcp-0@00000000"));
    }

    /// The dialog endpoints need the token, the list included (it shows callers'
    /// addresses): without it, or with another, 401 and the core is never asked; with it,
    /// the request reaches the core.
    #[tokio::test]
    async fn dialog_endpoints_need_the_token() {
        let (control, mut core) = mpsc::channel(4);
        let api = Api {
            control,
            token: Some("s3cret".into()),
            protect_reads: false,
            liveness_timeout: Duration::from_secs(3),
            shutdown: CancellationToken::new(),
            drain_waits: Arc::new(tokio::sync::Semaphore::new(1)),
        };
        let with = |v: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(header::AUTHORIZATION, v.parse().unwrap());
            }
            h
        };
        let id = || Path("YQpi".to_string());
        let all = || Ok(Query(q(&[("destination", "1")])));
        for bad in [
            None,
            Some("Bearer nope"),
            Some("s3cret"),
            Some("Basic s3cret"),
        ] {
            let r = list_dialogs(State(api.clone()), with(bad), Ok(Query(vec![]))).await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "GET with {bad:?}");
            let r = end_dialog(State(api.clone()), id(), with(bad)).await;
            assert_eq!(
                r.status(),
                StatusCode::UNAUTHORIZED,
                "DELETE id with {bad:?}"
            );
            let r = end_dialogs(State(api.clone()), with(bad), all()).await;
            assert_eq!(
                r.status(),
                StatusCode::UNAUTHORIZED,
                "DELETE all with {bad:?}"
            );
        }
        assert!(core.try_recv().is_err(), "the core was asked");
        // With the token: the core is asked (and answers that it knows no such dialog).
        let answer = tokio::spawn(async move {
            match core.recv().await {
                Some(Control::EndDialog(key, tx)) => {
                    assert_eq!((&*key.call_id, &*key.caller_tag), ("a", "b"));
                    let _ = tx.send(Err(EndError::NotFound));
                }
                other => panic!("{other:?}"),
            }
        });
        let r = end_dialog(State(api.clone()), id(), with(Some("Bearer s3cret"))).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        answer.await.unwrap();
    }

    #[test]
    fn dialog_list_parameters() {
        let p = dialog_params(&q(&[
            ("destination", "speech/unimrcp-0@7460ce94"),
            ("state", "confirmed"),
            ("minAge", "10m"),
            ("callId", "abc@host"),
            ("limit", "1000"),
            ("cursor", "42"),
        ]))
        .unwrap();
        assert_eq!(
            p,
            DialogParams {
                filter: DialogFilter {
                    destination: Some("speech/unimrcp-0@7460ce94".into()),
                    state: Some(DialogState::Confirmed),
                    min_age: Some(Duration::from_secs(600)),
                    call_id: Some("abc@host".into()),
                },
                after: Some(42),
                limit: Some(1000),
            }
        );
        let p = dialog_params(&q(&[("olderThan", "90"), ("after", "7")])).unwrap();
        assert_eq!(
            (p.filter.min_age, p.after),
            (Some(Duration::from_secs(90)), Some(7))
        );
        assert_eq!(dialog_params(&[]).unwrap().limit, None);
        let field = |pairs: &[(&str, &str)]| dialog_params(&q(pairs)).unwrap_err().0;
        for (pairs, want) in [
            (&[("limit", "0")][..], "limit"),
            (&[("limit", "1001")], "limit"),
            (&[("limit", "-1")], "limit"),
            (&[("limit", "ten")], "limit"),
            (&[("cursor", "abc")], "cursor"),
            (&[("after", "-1")], "after"),
            (&[("cursor", "1"), ("after", "2")], "cursor"),
            (&[("state", "Confirmed")], "state"),
            (&[("state", "terminated")], "state"),
            (&[("minAge", "1.5")], "minAge"),
            (&[("minAge", "99999999999999999999d")], "minAge"),
            (&[("olderThan", "3w")], "olderThan"),
            (&[("destination", "")], "destination"),
            (&[("callId", "")], "callId"),
            (&[("destination", "1"), ("destination", "2")], "destination"),
            (&[("dest", "1")], "dest"),
        ] {
            assert_eq!(field(pairs), want, "{pairs:?}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
