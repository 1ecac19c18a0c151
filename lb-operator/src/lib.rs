//! `lb-operator`: turns `MrcpServer` resources and pod readiness into the destination set
//! every `lb-proxy` replica routes on.
//!
//! - [`crd`]: the custom resource;
//! - [`pods`]: one pod → one destination (capacity annotations, readiness, draining);
//! - [`model`]: all servers and pods → the destination set and each server's status (pure);
//! - [`push`]: delivering the set to every proxy replica;
//! - [`lease`]: leader election for writes;
//! - [`run`]: the watches and the loop.

#![forbid(unsafe_code)]

pub mod crd;
pub mod lease;
pub mod metrics;
pub mod model;
pub mod pods;
pub mod push;
pub mod run;

use kube::CustomResourceExt;

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> anyhow::Result<String> {
    let crd = crd::MrcpServer::crd();
    Ok(serde_yaml_ng::to_string(&crd)?)
}
