//! Writing what the operator found back to the cluster (leader only): each MrcpServer's status
//! with its Ready condition, by server-side apply under the one field manager [`MANAGER`], and
//! the Events of [`crate::events`] on the MrcpServers (and on a pod whose capacity annotation
//! cannot be read).

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::Resource;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use tracing::{debug, info, warn};

use crate::context::Context;
use crate::crd::{DestinationEntry, MrcpServer, MrcpServerStatus, MANAGER};
use crate::error::Error;
use crate::events::{self, Notice};
use crate::model::{self, Computed, ServerView, Warning};

type Key = (String, String);

/// Writes statuses (server-side apply, only when they change) and Events. Remembers what it
/// wrote and said, so a round that changes nothing makes no API call.
#[derive(Default)]
pub struct StatusWriter {
    written: HashMap<Key, serde_json::Value>,
    /// Bad annotations warned about: (pod uid, annotation, value).
    warned: HashSet<(String, &'static str, String)>,
    /// The destinations each server's status last showed: what its Events compare with.
    /// Before the first write of this replica, the status the server holds.
    shown: HashMap<Key, Vec<DestinationEntry>>,
    /// The pods-held Warning last given to each server (its note).
    held: HashMap<Key, String>,
    /// Proxies warned about as failing pushes, until a push to them succeeds.
    push_warned: BTreeSet<String>,
}

impl StatusWriter {
    /// Writes every status that differs from what the server holds, and the Events not yet
    /// published. Failures are logged and counted; the next round tries again.
    /// `keep_loads`: the proxies' loads are not read yet; each status keeps the loads it
    /// shows ([`model::keep_loads`]). `failing_pushes`: proxy → error, for the proxies whose
    /// last push failed.
    pub async fn write(
        &mut self,
        ctx: &Context,
        servers: &[Arc<MrcpServer>],
        computed: &Computed,
        keep_loads: bool,
        failing_pushes: &BTreeMap<String, String>,
    ) {
        let objs: BTreeMap<Key, &MrcpServer> = servers
            .iter()
            .filter_map(|s| {
                let key = (s.metadata.namespace.clone()?, s.metadata.name.clone()?);
                Some((key, s.as_ref()))
            })
            .collect();
        for view in &computed.servers {
            let key = (view.namespace.clone(), view.name.clone());
            let Some(obj) = objs.get(&key) else { continue };
            if let Err(e) = self.write_status(ctx, obj, view, keep_loads).await {
                ctx.metrics.error(&e);
                warn!(server = %view.name, "{e}");
            }
            self.held_warning(ctx, obj, view).await;
        }
        for w in &computed.warnings {
            if let Err(e) = self.warn_once(ctx, w, &objs).await {
                ctx.metrics.error(&e);
                warn!("{e}");
            }
        }
        self.push_warnings(ctx, &objs, failing_pushes).await;
    }

    /// Forgets what was written: after leadership comes (back), every status is checked again.
    pub fn forget(&mut self) {
        self.written.clear();
        self.shown.clear();
        self.push_warned.clear();
    }

    async fn write_status(
        &mut self,
        ctx: &Context,
        obj: &MrcpServer,
        view: &ServerView,
        keep_loads: bool,
    ) -> Result<(), Error> {
        let status = status_of(obj, view, keep_loads);
        let key = (view.namespace.clone(), view.name.clone());
        let Ok(value) = serde_json::to_value(&status) else {
            return Ok(());
        };
        let unchanged = self.written.get(&key) == Some(&value)
            || obj
                .status
                .as_ref()
                .and_then(|s| serde_json::to_value(s).ok())
                .as_ref()
                == Some(&value);
        if !unchanged {
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
        }
        self.written.insert(key.clone(), value);
        // What changed for the destinations since the status last shown.
        let before = match self.shown.get(&key) {
            Some(b) => b.clone(),
            None => obj
                .status
                .as_ref()
                .map(|s| s.destinations.clone())
                .unwrap_or_default(),
        };
        self.shown.insert(key, status.destinations.clone());
        let reference = obj.object_ref(&());
        for n in events::destination_notices(&before, &status.destinations) {
            publish(ctx, &reference, &n).await?;
        }
        Ok(())
    }

    /// A Warning when another MrcpServer holds some of the pods this one selects, once per
    /// change of who holds them.
    async fn held_warning(&mut self, ctx: &Context, obj: &MrcpServer, view: &ServerView) {
        let key = (view.namespace.clone(), view.name.clone());
        let Some(n) = events::held_notice(view.matched, &view.held_by) else {
            self.held.remove(&key);
            return;
        };
        if self.held.get(&key) == Some(&n.note) {
            return;
        }
        warn!(server = %view.name, "{}", n.note);
        match publish(ctx, &obj.object_ref(&()), &n).await {
            Ok(()) => {
                self.held.insert(key, n.note);
            }
            Err(e) => {
                ctx.metrics.error(&e);
                warn!("{e}");
            }
        }
    }

    /// A Warning on every MrcpServer when a proxy starts failing pushes (once per failing
    /// spell).
    async fn push_warnings(
        &mut self,
        ctx: &Context,
        objs: &BTreeMap<Key, &MrcpServer>,
        failing: &BTreeMap<String, String>,
    ) {
        self.push_warned.retain(|p| failing.contains_key(p));
        for (proxy, error) in failing {
            if self.push_warned.contains(proxy) {
                continue;
            }
            let n = events::push_notice(proxy, error);
            let mut all = true;
            for obj in objs.values() {
                if let Err(e) = publish(ctx, &obj.object_ref(&()), &n).await {
                    ctx.metrics.error(&e);
                    warn!("{e}");
                    all = false;
                }
            }
            if all {
                self.push_warned.insert(proxy.clone());
            }
        }
    }

    /// One Warning Event per pod and bad annotation value, on the pod and on its MrcpServer.
    async fn warn_once(
        &mut self,
        ctx: &Context,
        w: &Warning,
        objs: &BTreeMap<Key, &MrcpServer>,
    ) -> Result<(), Error> {
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
        let on_pod = Notice {
            warning: true,
            reason: "InvalidCapacityAnnotation",
            action: "Register",
            note,
            pod: None,
        };
        publish(ctx, &pod.object_ref(&()), &on_pod).await?;
        if let Some(server) = objs.get(&(w.namespace.clone(), w.server.clone())) {
            publish(ctx, &server.object_ref(&()), &events::annotation_notice(w)).await?;
        }
        self.warned.insert(key);
        Ok(())
    }
}

/// Publishes one Event about `reference` as this replica.
async fn publish(ctx: &Context, reference: &ObjectReference, n: &Notice) -> Result<(), Error> {
    if !n.warning {
        info!(
            object = reference.name.as_deref().unwrap_or(""),
            reason = n.reason,
            "{}",
            n.note
        );
    }
    let ev = KubeEvent {
        type_: if n.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: n.reason.into(),
        note: Some(n.note.clone()),
        action: n.action.into(),
        secondary: n.pod.as_ref().map(|pod| ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: reference.namespace.clone(),
            name: Some(pod.clone()),
            ..Default::default()
        }),
    };
    ctx.recorder
        .publish(&ev, reference)
        .await
        .map_err(|source| Error::Event {
            object: format!(
                "{} {}/{}",
                reference.kind.as_deref().unwrap_or(""),
                reference.namespace.as_deref().unwrap_or(""),
                reference.name.as_deref().unwrap_or("")
            ),
            source,
        })
}

/// The status to write: the computed one, keeping the loads it shows while the proxies'
/// loads are not read yet, with its Ready condition.
fn status_of(obj: &MrcpServer, view: &ServerView, keep_loads: bool) -> MrcpServerStatus {
    if keep_loads {
        let mut kept = view.clone();
        model::keep_loads(&mut kept, obj.status.as_ref());
        return with_condition(obj, &kept);
    }
    with_condition(obj, view)
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
            matched: 1,
            held_by: Default::default(),
            invalid: None,
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
