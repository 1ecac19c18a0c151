//! The operator's loop: start the watches, the election, the pushers and the HTTP server; once
//! the caches are synced, run [`Reconciler::reconcile_once`] on every change (and every 5 s)
//! until shutdown.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::Client;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::context::Context;
use crate::error::Error;
use crate::lease::Leadership;
use crate::loads::LoadReader;
use crate::metrics::Metrics;
use crate::push::Pusher;
use crate::reconcile::Reconciler;

// Where these lived before the split: callers that name them through `run` keep working.
pub use crate::settings::{LeaseSettings, Settings};
pub use crate::watches::WatchBackoff;

/// Runs until shutdown.
pub async fn run(
    settings: Settings,
    client: Client,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    check_pod_selector(&client, &settings).await?;
    let metrics = Arc::new(Metrics::new());
    let ctx = Context::start(client, settings, metrics.clone(), &shutdown);
    let leadership = Leadership::start(
        &ctx.client,
        ctx.settings.lease.as_ref(),
        metrics.clone(),
        &shutdown,
    );
    let push = Pusher::spawn(
        &ctx.settings,
        metrics.clone(),
        leadership.leading.clone(),
        shutdown.clone(),
    )?;

    let loads = LoadReader::spawn(&ctx.settings, metrics.clone(), shutdown.clone())?;

    // Health and metrics.
    let ready = Arc::new(AtomicBool::new(false));
    let listener = crate::http::bind(ctx.settings.listen).await?;
    tokio::spawn(crate::http::serve(
        listener,
        metrics.clone(),
        ready.clone(),
        shutdown.clone(),
    ));

    // Caches first; a shutdown meanwhile is a clean stop, not an error.
    if !ctx.stores.wait_synced(&shutdown).await? {
        leadership.finish().await;
        return Ok(());
    }
    ready.store(true, Ordering::Relaxed);
    info!("caches synced");

    let mut reconciler = Reconciler::new(push, loads);
    let mut leading = leadership.leading.clone();
    loop {
        // Batch bursts of events (a StatefulSet scaling touches many pods at once).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now_leading = *leading.borrow_and_update();
        reconciler.reconcile_once(&ctx, now_leading).await;
        tokio::select! {
            _ = ctx.stores.changed.notified() => {}
            _ = leading.changed() => {}
            // New loads from the proxies: at most one per load interval.
            _ = reconciler.loads_changed() => {}
            // Resync: conflicts raise the floor, statuses are re-checked.
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    leadership.finish().await;
    Ok(())
}

/// A `--pod-selector` the API server cannot parse would only show as a watch error repeated
/// forever: one LIST of at most one pod finds out first, and stops the start-up with a message
/// naming the flag. Any other failure (the API server not reachable yet) is left to the
/// watches, which retry.
async fn check_pod_selector(client: &Client, settings: &Settings) -> Result<(), Error> {
    let Some(sel) = &settings.pod_selector else {
        return Ok(());
    };
    let pods: Api<Pod> = match settings.namespace.as_deref() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match pods
        .list_metadata(&ListParams::default().labels(sel).limit(1))
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 400 => Err(Error::PodSelector {
            selector: sel.clone(),
            message: s.message,
        }),
        _ => Ok(()),
    }
}
