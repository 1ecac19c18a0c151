//! `lb-operator`: turns `MrcpServer` resources and pod readiness into the destination set
//! every `lb-proxy` replica routes on.
//!
//! - [`crd`]: the custom resource;
//! - [`pods`]: one pod → one destination (capacity annotations, readiness, draining), and
//!   the slim pod the watch reads ([`pods::WatchedPod`]);
//! - [`model`]: all servers and pods → the destination set and each server's status (pure);
//! - [`events`]: what changed between two statuses, as Events for users (pure);
//! - [`push`]: delivering the set to every proxy replica;
//! - [`proxy_http`]: the HTTP(S) client for the proxies' admin API;
//! - [`loads`]: reading every proxy replica's live load, for the statuses;
//! - [`lease`]: leader election for writes;
//! - [`run`]: start-up and the loop, over
//!   - [`settings`]: what the command line says;
//!   - [`context`]: what the loop shares (client, settings, recorder, metrics, caches);
//!   - [`watches`]: the reflectors and the change signal;
//!   - [`reconcile`]: one round, compute → push → status;
//!   - [`status`]: MrcpServer statuses and Events (server-side apply);
//!   - [`http`]: `/metrics`, `/healthz`, `/readyz`;
//!   - [`error`]: the operator's errors and their metric label;
//!   - [`metrics`]: the Prometheus metrics, the per-MrcpServer ones included.

#![forbid(unsafe_code)]

pub mod context;
pub mod crd;
pub mod error;
pub mod events;
pub mod http;
pub mod lease;
pub mod loads;
pub mod metrics;
pub mod model;
pub mod pods;
pub mod proxy_http;
pub mod push;
pub mod reconcile;
pub mod run;
pub mod settings;
pub mod status;
pub mod watches;

pub use error::Error;

use kube::CustomResourceExt;

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> anyhow::Result<String> {
    let mut crd = serde_json::to_value(crd::MrcpServer::crd())?;
    drop_unknown_formats(&mut crd);
    Ok(serde_yaml_ng::to_string(&crd)?)
}

/// schemars writes formats such as `uint32` that Kubernetes does not know (the API server
/// warns on apply); the bounds are in `minimum`/`maximum` already.
fn drop_unknown_formats(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let unknown = map.get("format").and_then(|f| f.as_str()).is_some_and(|f| {
                matches!(
                    f,
                    "uint" | "uint8" | "uint16" | "uint32" | "uint64" | "int8" | "int16"
                )
            });
            if unknown {
                map.remove("format");
            }
            map.values_mut().for_each(drop_unknown_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_unknown_formats),
        _ => {}
    }
}
