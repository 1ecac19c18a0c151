//! The admin HTTP API: read-only views of the destinations and dialog counters.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::runtime::{Event, Query};

type Events = mpsc::Sender<Event>;

async fn ask(events: &Events, q: Query) -> Json<serde_json::Value> {
    let (tx, rx) = oneshot::channel();
    if events.send(Event::Query(q, tx)).await.is_err() {
        return Json(serde_json::json!({"error": "proxy core stopped"}));
    }
    Json(rx.await.unwrap_or_default())
}

async fn destinations(State(events): State<Events>) -> Json<serde_json::Value> {
    ask(&events, Query::Destinations).await
}

async fn dialog_stats(State(events): State<Events>) -> Json<serde_json::Value> {
    ask(&events, Query::DialogStats).await
}

async fn metrics(State(events): State<Events>) -> impl axum::response::IntoResponse {
    let Json(v) = ask(&events, Query::Metrics).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        v.as_str().unwrap_or_default().to_string(),
    )
}

pub async fn serve(listener: TcpListener, events: Events, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/destinations", get(destinations))
        .route("/v1/dialogs/stats", get(dialog_stats))
        .route("/metrics", get(metrics))
        .with_state(events);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}
