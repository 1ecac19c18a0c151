//! The admin HTTP API.
//!
//! | endpoint | |
//! |---|---|
//! | `GET /healthz` | the process is alive |
//! | `GET /readyz` | listeners bound, a destination set loaded, not shutting down |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /v1/destinations` | every destination with load, state, probe statistics |
//! | `PUT /v1/destinations` | replace the whole set (JSON `DestinationSet`, versioned) |
//! | `POST /v1/destinations/{id}/state` | `{"action": "enable" \| "disable" \| "drain"}` |
//! | `GET /v1/dialogs/stats` | active, early, processed, expired, failed |
//!
//! Write endpoints require `Authorization: Bearer <token>` when a token is configured
//! (`admin.tokenFile` or `LB_PROXY_ADMIN_TOKEN`); the comparison takes the same time wherever
//! the tokens differ. Reads stay open. Every request is answered by the core task through the
//! event channel, so the API never touches call state directly.

// Handlers return axum's `Response` as their error: it is what they answer with.
#![allow(clippy::result_large_err)]

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lb_api::admin::{ErrorBody, StateChange};
use lb_api::DestinationSet;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::proxy::{Applied, Control, SetError};

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    /// The core's control queue.
    pub control: mpsc::Sender<Control>,
    pub token: Option<Arc<str>>,
}

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

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/v1/destinations",
            get(get_destinations).put(put_destinations),
        )
        .route("/v1/destinations/{id}/state", post(post_state))
        .route("/v1/dialogs/stats", get(dialog_stats))
        .route("/v1/cluster", get(cluster))
        .with_state(api)
}

pub async fn serve(listener: TcpListener, api: Api, shutdown: CancellationToken) {
    let _ = axum::serve(listener, router(api))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
