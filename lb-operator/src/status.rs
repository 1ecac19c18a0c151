//! Writing what the operator found back to the cluster (leader only): each MrcpServer's status
//! with its Ready condition, by server-side apply under the one field manager [`MANAGER`], and
//! a Warning Event on a pod whose capacity annotation cannot be read.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::Resource;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tracing::{debug, warn};

use crate::context::Context;
use crate::crd::{MrcpServer, MrcpServerStatus, MANAGER};
use crate::error::Error;
use crate::model::{self, Computed, ServerView, Warning};

/// Writes statuses (server-side apply, only when they change) and Warning events for bad
/// annotations (once per pod and value). Remembers what it wrote, so a round that changes
/// nothing makes no API call.
#[derive(Default)]
pub struct StatusWriter {
    written: HashMap<(String, String), serde_json::Value>,
    warned: HashSet<(String, &'static str, String)>,
}

impl StatusWriter {
    /// Writes every status that differs from what the server holds, and the Events not yet
    /// published. Failures are logged and counted; the next round tries again.
    /// `keep_loads`: the proxies' loads are not read yet; each status keeps the loads it
    /// shows ([`model::keep_loads`]).
    pub async fn write(
        &mut self,
        ctx: &Context,
        servers: &[Arc<MrcpServer>],
        computed: &Computed,
        keep_loads: bool,
    ) {
        for view in &computed.servers {
            let Some(obj) = servers.iter().find(|s| {
                s.metadata.namespace.as_deref() == Some(&view.namespace)
                    && s.metadata.name.as_deref() == Some(&view.name)
            }) else {
                continue;
            };
            if let Err(e) = self.write_status(ctx, obj, view, keep_loads).await {
                ctx.metrics.error(&e);
                warn!(server = %view.name, "{e}");
            }
        }
        for w in &computed.warnings {
            if let Err(e) = self.warn_once(ctx, w).await {
                ctx.metrics.error(&e);
                warn!("{e}");
            }
        }
    }

    /// Forgets what was written: after leadership comes (back), every status is checked again.
    pub fn forget(&mut self) {
        self.written.clear();
    }

    async fn write_status(
        &mut self,
        ctx: &Context,
        obj: &MrcpServer,
        view: &ServerView,
        keep_loads: bool,
    ) -> Result<(), Error> {
        let mut status = with_condition(obj, view);
        if keep_loads {
            model::keep_loads(&mut status, obj.status.as_ref());
        }
        let key = (view.namespace.clone(), view.name.clone());
        let Ok(value) = serde_json::to_value(&status) else {
            return Ok(());
        };
        if self.written.get(&key) == Some(&value)
            || obj
                .status
                .as_ref()
                .and_then(|s| serde_json::to_value(s).ok())
                .as_ref()
                == Some(&value)
        {
            self.written.insert(key, value);
            return Ok(());
        }
        let api: Api<MrcpServer> = Api::namespaced(ctx.client.clone(), &view.namespace);
        let patch = serde_json::json!({
            "apiVersion": "mrcp-lb.io/v1alpha1",
            "kind": "MrcpServer",
            "status": value,
        });
        api.patch_status(
            &view.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::Status)?;
        debug!(server = %view.name, "status written");
        self.written.insert(key, patch["status"].clone());
        Ok(())
    }

    /// One Warning Event per pod and bad annotation value.
    async fn warn_once(&mut self, ctx: &Context, w: &Warning) -> Result<(), Error> {
        let key = (w.uid.clone(), w.problem.annotation, w.problem.value.clone());
        if self.warned.contains(&key) {
            return Ok(());
        }
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &w.namespace);
        let Ok(Some(pod)) = pods.get_opt(&w.pod).await else {
            return Ok(());
        };
        let note = format!(
            "pod {}/{}: {}; using the MrcpServer's defaultResources",
            w.namespace, w.pod, w.problem
        );
        warn!("{note}");
        let ev = KubeEvent {
            type_: EventType::Warning,
            reason: "InvalidCapacityAnnotation".into(),
            note: Some(note),
            action: "Register".into(),
            secondary: None,
        };
        ctx.recorder
            .publish(&ev, &pod.object_ref(&()))
            .await
            .map_err(|source| Error::Event {
                pod: format!("{}/{}", w.namespace, w.pod),
                source,
            })?;
        self.warned.insert(key);
        Ok(())
    }
}

/// The status with its Ready condition; the transition time stays as it was while the
/// condition's status does not change.
fn with_condition(obj: &MrcpServer, view: &ServerView) -> MrcpServerStatus {
    let (ok, reason, message) = &view.ready;
    let status_str = if *ok { "True" } else { "False" };
    let previous = obj
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .filter(|c| c.status == status_str)
        .map(|c| c.last_transition_time.clone());
    let mut status = view.status.clone();
    status.conditions = vec![Condition {
        type_: "Ready".into(),
        status: status_str.into(),
        reason: (*reason).into(),
        message: message.clone(),
        observed_generation: obj.metadata.generation,
        last_transition_time: previous.unwrap_or(Time(Timestamp::now())),
    }];
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_with_ready(status: Option<(&str, &str)>) -> MrcpServer {
        let spec = serde_json::json!({"selector": {"matchLabels": {"app": "unimrcp"}}});
        let mut s = MrcpServer::new("asr", serde_json::from_value(spec).unwrap());
        s.metadata.generation = Some(4);
        s.status = status.map(|(st, at)| MrcpServerStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: st.into(),
                reason: "Before".into(),
                message: String::new(),
                observed_generation: Some(3),
                last_transition_time: Time(at.parse().unwrap()),
            }],
            ..Default::default()
        });
        s
    }

    fn view(ready: bool) -> ServerView {
        ServerView {
            namespace: "speech".into(),
            name: "asr".into(),
            status: MrcpServerStatus::default(),
            ready: (ready, "DestinationsReady", "1 of 1 ready".into()),
        }
    }

    #[test]
    fn the_ready_condition_keeps_its_transition_time_until_its_status_flips() {
        let since = "2024-01-02T03:04:05Z";
        let obj = server_with_ready(Some(("True", since)));
        let kept = with_condition(&obj, &view(true));
        let c = &kept.conditions[0];
        assert_eq!(c.last_transition_time.0.to_string(), since);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str(), c.observed_generation),
            ("True", "DestinationsReady", Some(4))
        );
        let flipped = with_condition(&obj, &view(false));
        let c = &flipped.conditions[0];
        assert_eq!(c.status, "False");
        assert_ne!(c.last_transition_time.0.to_string(), since);
    }
}
