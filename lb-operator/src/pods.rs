//! One pod → one destination: selector matching, readiness, capacity annotations.

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use lb_api::{DesiredState, DestinationSpec, ProbeMode, Resources};
use std::collections::BTreeMap;

use crate::crd::{MrcpServerSpec, SipTransport, PSTN_CAPACITY, RESOURCES};

/// Kubernetes label-selector semantics: every `matchLabels` pair and every
/// `matchExpressions` requirement must hold; an empty selector matches every pod.
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    if let Some(ml) = &sel.match_labels {
        if !ml.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            return false;
        }
    }
    for e in sel.match_expressions.iter().flatten() {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        let ok = match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false, // Unknown operators match nothing, as in Kubernetes.
        };
        if !ok {
            return false;
        }
    }
    true
}

/// What the operator keeps of a watched pod: exactly the fields the destination set and the
/// statuses read — name, namespace, UID, labels, deletion timestamp, the capacity annotations,
/// IP, phase and the Ready condition. Everything else (spec, managed fields, other annotations,
/// container statuses) is skipped while the JSON is read, never allocated: the watch on every
/// pod of the cluster (or of `--namespace`) costs a few hundred bytes per unrelated pod (its
/// name and labels) instead of the whole object (measured in BENCHMARKS.md, "Operator
/// memory"). Listed and watched as a Pod (`/api/v1/pods`); [`WatchedPod::pod`] is that slim
/// Pod, what [`slim`] would make of the full object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WatchedPod(pub Pod);

impl WatchedPod {
    pub fn pod(&self) -> &Pod {
        &self.0
    }
}

impl k8s_openapi::Resource for WatchedPod {
    const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for WatchedPod {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.0.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

/// The parts of a pod's JSON that [`WatchedPod`] reads; serde skips every other field.
mod wire {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Deserialize)]
    pub struct Pod {
        #[serde(default)]
        pub metadata: Meta,
        pub status: Option<Status>,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct Meta {
        pub name: Option<String>,
        pub namespace: Option<String>,
        pub uid: Option<String>,
        pub resource_version: Option<String>,
        pub labels: Option<BTreeMap<String, String>>,
        pub annotations: Option<BTreeMap<String, String>>,
        pub deletion_timestamp: Option<Time>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Status {
        #[serde(rename = "podIP")]
        pub pod_ip: Option<String>,
        pub phase: Option<String>,
        pub conditions: Option<Vec<Condition>>,
    }

    #[derive(Deserialize)]
    pub struct Condition {
        #[serde(rename = "type")]
        pub type_: String,
        pub status: String,
    }
}

impl<'de> serde::Deserialize<'de> for WatchedPod {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = wire::Pod::deserialize(d)?;
        let m = w.metadata;
        let status = w.status.map(|s| PodStatus {
            pod_ip: s.pod_ip,
            phase: s.phase,
            conditions: s.conditions.map(|cs| {
                cs.into_iter()
                    .map(|c| PodCondition {
                        type_: c.type_,
                        status: c.status,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        });
        let pod = Pod {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                labels: m.labels,
                annotations: m.annotations,
                deletion_timestamp: m.deletion_timestamp,
                ..Default::default()
            },
            spec: None,
            status,
        };
        Ok(WatchedPod(slim(pod)))
    }
}

/// The capacity annotations of `annotations`, None when there are none.
fn ours(annotations: Option<BTreeMap<String, String>>) -> Option<BTreeMap<String, String>> {
    let mut a = annotations?;
    a.retain(|k, _| k == PSTN_CAPACITY || k == RESOURCES);
    (!a.is_empty()).then_some(a)
}

/// A pod cut down to what [`WatchedPod`] keeps: the capacity annotations only, the Ready
/// condition only (its type and status), no spec.
pub fn slim(pod: Pod) -> Pod {
    let m = pod.metadata;
    let status = pod.status.map(|s| PodStatus {
        pod_ip: s.pod_ip,
        phase: s.phase,
        conditions: s.conditions.map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| PodCondition {
                    type_: c.type_,
                    status: c.status,
                    ..Default::default()
                })
                .collect()
        }),
        ..Default::default()
    });
    Pod {
        metadata: ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            labels: m.labels,
            annotations: ours(m.annotations),
            deletion_timestamp: m.deletion_timestamp,
            ..Default::default()
        },
        spec: None,
        status,
    }
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn pod_ip(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .pod_ip
        .as_deref()
        .filter(|ip| !ip.is_empty())
}

/// Phase Succeeded or Failed: the pod's containers will not run again.
pub fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// A stable id for the life of a pod: namespace, name and the start of its UID. A pod
/// recreated under the same name is a new destination (its predecessor's calls are not its
/// load).
pub fn destination_id(pod: &Pod) -> String {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let uid: String = pod
        .metadata
        .uid
        .as_deref()
        .unwrap_or("")
        .chars()
        .take(8)
        .collect();
    format!("{ns}/{name}@{uid}")
}

/// A capacity annotation that could not be used: named, with its value and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadAnnotation {
    pub annotation: &'static str,
    pub value: String,
    pub reason: String,
}

impl std::fmt::Display for BadAnnotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "annotation {}={:?}: {}",
            self.annotation, self.value, self.reason
        )
    }
}

/// The pod's resources: `mrcp-lb.io/resources` when present, else the default with `pstn`
/// set from `mrcp-lb.io/pstn-capacity`, else the default. A bad annotation falls back to the
/// default and is reported.
pub fn resources(pod: &Pod, default: &Resources) -> (Resources, Option<BadAnnotation>) {
    let ann = pod.metadata.annotations.as_ref();
    if let Some(v) = ann.and_then(|a| a.get(RESOURCES)) {
        return match v.parse::<Resources>() {
            Ok(r) => (r, None),
            Err(e) => (
                default.clone(),
                Some(BadAnnotation {
                    annotation: RESOURCES,
                    value: v.clone(),
                    reason: e.to_string(),
                }),
            ),
        };
    }
    if let Some(v) = ann.and_then(|a| a.get(PSTN_CAPACITY)) {
        return match v.trim().parse::<u32>() {
            Ok(n) => {
                let mut items: Vec<(String, u32)> = default
                    .iter()
                    .filter(|(name, _)| *name != "pstn")
                    .map(|(name, c)| (name.to_string(), c))
                    .collect();
                items.insert(0, ("pstn".to_string(), n));
                (Resources::new(items), None)
            }
            Err(_) => (
                default.clone(),
                Some(BadAnnotation {
                    annotation: PSTN_CAPACITY,
                    value: v.clone(),
                    reason: "not a whole number from 0 to 4294967295".to_string(),
                }),
            ),
        };
    }
    (default.clone(), None)
}

/// The destination for a pod that matches a server's selector, or None while it has no IP or
/// has finished. Not Ready → `down`; terminating → `draining`.
pub fn destination(
    spec: &MrcpServerSpec,
    default: &Resources,
    pod: &Pod,
) -> Option<(DestinationSpec, Option<BadAnnotation>)> {
    let ip = pod_ip(pod)?;
    if finished(pod) {
        return None;
    }
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let transport = match spec.transport {
        SipTransport::Udp => "",
        SipTransport::Tcp => ";transport=tcp",
    };
    let state = if pod.metadata.deletion_timestamp.is_some() {
        DesiredState::Draining
    } else if is_ready(pod) {
        DesiredState::Active
    } else {
        DesiredState::Down
    };
    let (resources, bad) = resources(pod, default);
    let probe_mode = ProbeMode::try_from(spec.probe_mode).unwrap_or_default();
    Some((
        DestinationSpec {
            id: destination_id(pod),
            group: spec.group,
            uri: format!("sip:{host}:{}{transport}", spec.sip_port),
            resources,
            probe_mode,
            state,
        },
        bad,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub(crate) fn pod(name: &str, ip: Option<&str>, ready: bool, ann: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("speech".into());
        p.metadata.uid = Some("0123456789abcdef".into());
        p.metadata.labels = Some(labels(&[("app", "unimrcp")]));
        p.metadata.annotations = Some(labels(ann));
        p.status = Some(PodStatus {
            pod_ip: ip.map(str::to_string),
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        p
    }

    fn spec() -> MrcpServerSpec {
        serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"app": "unimrcp"}},
            "defaultResources": "pstn=100;tts=20"
        }))
        .unwrap()
    }

    fn default() -> Resources {
        "pstn=100;tts=20".parse().unwrap()
    }

    #[test]
    fn selectors() {
        let l = labels(&[("app", "unimrcp"), ("tier", "asr")]);
        let mut s = LabelSelector::default();
        assert!(selector_matches(&s, &l), "empty matches all");
        s.match_labels = Some(labels(&[("app", "unimrcp")]));
        assert!(selector_matches(&s, &l));
        s.match_expressions = Some(vec![LabelSelectorRequirement {
            key: "tier".into(),
            operator: "In".into(),
            values: Some(vec!["tts".into()]),
        }]);
        assert!(!selector_matches(&s, &l));
        s.match_expressions = Some(vec![
            LabelSelectorRequirement {
                key: "tier".into(),
                operator: "NotIn".into(),
                values: Some(vec!["tts".into()]),
            },
            LabelSelectorRequirement {
                key: "zone".into(),
                operator: "DoesNotExist".into(),
                values: None,
            },
        ]);
        assert!(selector_matches(&s, &l));
        s.match_labels = Some(labels(&[("app", "other")]));
        assert!(!selector_matches(&s, &l));
    }

    #[test]
    fn ready_pod_is_an_active_destination() {
        let (d, bad) = destination(
            &spec(),
            &default(),
            &pod("mrcp-0", Some("127.0.2.1"), true, &[]),
        )
        .unwrap();
        assert_eq!(d.id, "speech/mrcp-0@01234567");
        assert_eq!(d.uri, "sip:127.0.2.1:8060");
        assert_eq!(d.state, DesiredState::Active);
        assert_eq!(d.resources.to_string(), "pstn=100;tts=20");
        assert_eq!(d.probe_mode, ProbeMode::Always);
        assert!(bad.is_none());
    }

    #[test]
    fn readiness_ip_and_termination() {
        assert!(destination(&spec(), &default(), &pod("a", None, true, &[])).is_none());
        let (d, _) = destination(
            &spec(),
            &default(),
            &pod("a", Some("127.0.2.1"), false, &[]),
        )
        .unwrap();
        assert_eq!(d.state, DesiredState::Down);
        let mut p = pod("a", Some("127.0.2.1"), true, &[]);
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(
            destination(&spec(), &default(), &p).unwrap().0.state,
            DesiredState::Draining
        );
        let (d, _) = destination(&spec(), &default(), &pod("v6", Some("::1"), true, &[])).unwrap();
        assert_eq!(d.uri, "sip:[::1]:8060");
    }

    #[test]
    fn capacity_annotations() {
        let p = pod("a", Some("127.0.2.1"), true, &[(PSTN_CAPACITY, "50")]);
        let (r, bad) = resources(&p, &default());
        assert_eq!(r.to_string(), "pstn=50;tts=20");
        assert!(bad.is_none());
        let p = pod(
            "a",
            Some("127.0.2.1"),
            true,
            &[(RESOURCES, "pstn=30;asr=10"), (PSTN_CAPACITY, "50")],
        );
        assert_eq!(resources(&p, &default()).0.to_string(), "pstn=30;asr=10");
    }

    #[test]
    fn bad_annotations_fall_back_and_name_the_value() {
        let p = pod("a", Some("127.0.2.1"), true, &[(PSTN_CAPACITY, "lots")]);
        let (r, bad) = resources(&p, &default());
        assert_eq!(r, default());
        let bad = bad.unwrap();
        assert_eq!(bad.annotation, PSTN_CAPACITY);
        assert!(bad.to_string().contains("\"lots\""), "{bad}");
        let p = pod("a", Some("127.0.2.1"), true, &[(RESOURCES, "pstn=-1")]);
        let (r, bad) = resources(&p, &default());
        assert_eq!(r, default());
        assert!(bad
            .unwrap()
            .to_string()
            .contains("mrcp-lb.io/resources=\"pstn=-1\""));
    }

    #[test]
    fn a_slimmed_pod_gives_the_same_destination_and_keeps_nothing_else() {
        use k8s_openapi::api::core::v1::{Container, PodSpec};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};
        let mut full = pod(
            "a",
            Some("127.0.2.1"),
            true,
            &[
                (RESOURCES, "speechrecog=5"),
                ("checksum/config", "0123456789abcdef"),
            ],
        );
        full.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        full.metadata.generate_name = Some("a-".into());
        full.spec = Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let status = full.status.as_mut().unwrap();
        status.conditions.as_mut().unwrap().push(PodCondition {
            type_: "PodScheduled".into(),
            status: "True".into(),
            ..Default::default()
        });
        status.host_ip = Some("10.0.0.1".into());
        for deleting in [false, true] {
            if deleting {
                full.metadata.deletion_timestamp = Some(Time(Default::default()));
            }
            let slim = slim(full.clone());
            let json = serde_json::to_string(&full).unwrap();
            let watched: WatchedPod = serde_json::from_str(&json).unwrap();
            assert_eq!(watched.pod(), &slim, "read from JSON as slimmed");
            assert_eq!(
                destination(&spec(), &default(), &slim),
                destination(&spec(), &default(), &full)
            );
            assert_eq!(slim.metadata.labels, full.metadata.labels);
            assert_eq!(
                slim.metadata.annotations,
                Some(labels(&[(RESOURCES, "speechrecog=5")]))
            );
            assert!(slim.spec.is_none() && slim.metadata.managed_fields.is_none());
            let st = slim.status.unwrap();
            assert_eq!(st.conditions.map(|c| c.len()), Some(1));
            assert_eq!(st.host_ip, None);
        }
        // Not Ready, no annotations, no status at all: still the same answers.
        let mut bare = pod("b", Some("127.0.2.2"), false, &[]);
        assert_eq!(
            destination(&spec(), &default(), &slim(bare.clone())),
            destination(&spec(), &default(), &bare)
        );
        bare.status = None;
        assert!(destination(&spec(), &default(), &slim(bare)).is_none());
    }
}
