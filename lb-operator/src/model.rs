//! All `MrcpServer`s and pods → the one destination set every proxy gets, and each server's
//! status. A pure function: the watches feed it, tests call it directly.

use k8s_openapi::api::core::v1::Pod;
use lb_api::admin::State;
use lb_api::{DesiredState, DestinationSpec, Resources};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use crate::crd::{DestinationEntry, LoadFrom, MrcpServer, MrcpServerStatus, ResourceUsage};
use crate::loads::ProxyLoads;
use crate::pods::{self, BadAnnotation};

/// A server's status without the condition timestamps (the writer keeps those stable).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerView {
    pub namespace: String,
    pub name: String,
    pub status: MrcpServerStatus,
    /// Ready condition: status ("True"/"False"), reason, message. Follows `status`
    /// ([`finish`]).
    pub ready: (bool, &'static str, String),
    /// Pods its selector matches.
    pub matched: u32,
    /// Matching pods that are another MrcpServer's destinations already: that server
    /// (`namespace/name`) → how many.
    pub held_by: BTreeMap<String, u32>,
    /// Why the spec cannot be used, when it cannot.
    pub invalid: Option<String>,
}

/// A pod whose annotation could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    /// The MrcpServer that selects the pod.
    pub server: String,
    pub problem: BadAnnotation,
}

#[derive(Debug, Clone, Default)]
pub struct Computed {
    /// Sorted by id, so equal inputs give equal sets.
    pub destinations: Vec<DestinationSpec>,
    pub servers: Vec<ServerView>,
    pub warnings: Vec<Warning>,
}

/// Computes the destination set and the servers' statuses (without the proxies' view:
/// [`apply_loads`] adds it).
pub fn compute<'a>(
    servers: impl IntoIterator<Item = &'a MrcpServer>,
    pods: &[&'a Pod],
) -> Computed {
    let mut out = Computed::default();
    // Destination id → the server (namespace/name) whose destination it is.
    let mut taken: HashMap<String, String> = HashMap::new();
    let no_labels = BTreeMap::new();
    let mut servers: Vec<&MrcpServer> = servers.into_iter().collect();
    servers.sort_by_key(|s| (s.metadata.namespace.clone(), s.metadata.name.clone()));
    for server in servers {
        let ns = server.metadata.namespace.clone().unwrap_or_default();
        let name = server.metadata.name.clone().unwrap_or_default();
        let mut view = ServerView {
            namespace: ns.clone(),
            name: name.clone(),
            status: MrcpServerStatus {
                observed_generation: server.metadata.generation,
                ..Default::default()
            },
            ready: (false, "", String::new()),
            matched: 0,
            held_by: BTreeMap::new(),
            invalid: None,
        };
        let default: Resources = match server.spec.default_resources.parse() {
            Ok(r) => r,
            Err(e) => {
                view.invalid = Some(format!(
                    "spec.defaultResources {:?}: {e}",
                    server.spec.default_resources
                ));
                finish(&mut view);
                out.servers.push(view);
                continue;
            }
        };
        let owner = format!("{ns}/{name}");
        for pod in pods
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()))
        {
            let labels = pod.metadata.labels.as_ref().unwrap_or(&no_labels);
            if !pods::selector_matches(&server.spec.selector, labels) {
                continue;
            }
            view.matched += 1;
            let Some((dest, bad)) = pods::destination(&server.spec, &default, pod) else {
                continue;
            };
            if let Some(problem) = bad {
                out.warnings.push(Warning {
                    namespace: ns.clone(),
                    pod: pod.metadata.name.clone().unwrap_or_default(),
                    uid: pod.metadata.uid.clone().unwrap_or_default(),
                    server: name.clone(),
                    problem,
                });
            }
            // A pod matched by two servers belongs to the first (by namespace/name).
            match taken.entry(dest.id.clone()) {
                Entry::Occupied(holder) => {
                    *view.held_by.entry(holder.get().clone()).or_default() += 1;
                    continue;
                }
                Entry::Vacant(slot) => {
                    slot.insert(owner.clone());
                }
            }
            let state = match dest.state {
                DesiredState::Active => "active",
                DesiredState::Draining => "draining",
                DesiredState::Down => "down",
            };
            view.status.destinations.push(DestinationEntry {
                pod: pod.metadata.name.clone().unwrap_or_default(),
                id: dest.id.clone(),
                uri: dest.uri.clone(),
                resources: dest.resources.to_string(),
                state: state.to_string(),
                proxy_state: None,
                proxy_reason: None,
                sessions: None,
            });
            out.destinations.push(dest);
        }
        view.status.destinations.sort_by(|a, b| a.pod.cmp(&b.pod));
        finish(&mut view);
        out.servers.push(view);
    }
    out.destinations.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// How a destination counts in a status: Kubernetes' state, then the proxies' view of a pod
/// Kubernetes calls Ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Takes new calls.
    Ready,
    /// Not Ready in Kubernetes.
    NotReady,
    /// Ready in Kubernetes, but the proxies call it down (or it is disabled by hand).
    CalledDown,
    Draining,
}

impl Standing {
    pub fn of(d: &DestinationEntry) -> Standing {
        // A state that repeats the set is a replica a push behind, not its judgement.
        let own = !d
            .proxy_reason
            .as_deref()
            .is_some_and(lb_api::admin::reason_is_from_set);
        match (d.state.as_str(), d.proxy_state.as_deref()) {
            ("draining", _) => Standing::Draining,
            ("active", Some("down" | "disabled")) if own => Standing::CalledDown,
            ("active", Some("draining")) if own => Standing::Draining,
            ("active", _) => Standing::Ready,
            _ => Standing::NotReady,
        }
    }
}

/// Everything a status derives from its destinations, their loads and the proxies' view:
/// the counts, the capacity of the ready destinations, the resources with their utilization,
/// the summaries and the Ready condition. Idempotent: called again after each change.
pub fn finish(view: &mut ServerView) {
    if let Some(msg) = &view.invalid {
        view.ready = (false, "InvalidSpec", msg.clone());
        return;
    }
    let st = &mut view.status;
    let (mut ready, mut down, mut draining) = (0, 0, 0);
    let mut capacity: BTreeMap<String, u64> = BTreeMap::new();
    // Every resource a destination offers, ready or not, and every one that carries
    // sessions: listed in `resources`.
    let known = st.load_from.is_some_and(|f| f.answered > 0);
    let before: BTreeMap<&str, Option<u64>> = st
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.load))
        .collect();
    let mut loads: BTreeMap<String, Option<u64>> = before
        .iter()
        .filter(|(_, l)| l.is_some_and(|l| l > 0))
        .map(|(n, l)| (n.to_string(), *l))
        .collect();
    let mut called_down: Vec<String> = Vec::new();
    for d in &st.destinations {
        let resources: Resources = d.resources.parse().unwrap_or_default();
        for (r, _) in resources.iter() {
            loads
                .entry(r.to_string())
                .or_insert_with(|| before.get(r).copied().unwrap_or(known.then_some(0)));
        }
        match Standing::of(d) {
            Standing::Ready => {
                ready += 1;
                for (r, c) in resources.iter() {
                    *capacity.entry(r.to_string()).or_default() += u64::from(c);
                }
            }
            Standing::NotReady => down += 1,
            Standing::CalledDown => {
                down += 1;
                called_down.push(format!(
                    "{} ({})",
                    d.pod,
                    d.proxy_reason
                        .as_deref()
                        .unwrap_or(d.proxy_state.as_deref().unwrap_or("down"))
                ));
            }
            Standing::Draining => draining += 1,
        }
    }
    st.ready_destinations = ready;
    st.down_destinations = down;
    st.draining_destinations = draining;
    st.resources = loads
        .into_iter()
        .map(|(name, load)| {
            let cap = capacity.get(&name).copied().unwrap_or(0);
            ResourceUsage {
                utilization_percent: load.map(|l| utilization_percent(l, cap)),
                capacity: cap,
                name,
                load,
            }
        })
        .collect();
    st.utilization = st
        .resources
        .iter()
        .filter_map(|r| r.utilization_percent)
        .max()
        .map(|p| format!("{p}%"));
    st.capacity_summary = capacity
        .iter()
        .map(|(r, c)| format!("{r}={c}"))
        .collect::<Vec<_>>()
        .join(";");
    st.load_summary = load_summary(&st.resources);
    st.capacity = capacity;
    view.ready = condition(view.matched, ready, &view.held_by, &called_down);
}

/// `load` over `capacity` in percent, rounded; a resource with sessions and no capacity is
/// full.
pub fn utilization_percent(load: u64, capacity: u64) -> u32 {
    if capacity == 0 {
        return if load > 0 { 100 } else { 0 };
    }
    let p = (u128::from(load) * 100 + u128::from(capacity) / 2) / u128::from(capacity);
    u32::try_from(p).unwrap_or(u32::MAX)
}

/// `load / capacity` as a ratio, as [`utilization_percent`] decides the edge cases.
pub fn utilization(load: u64, capacity: u64) -> f64 {
    if capacity == 0 {
        return if load > 0 { 1.0 } else { 0.0 };
    }
    load as f64 / capacity as f64
}

/// The Ready condition of a server: whether it has a destination that takes calls, and if
/// not, why not, naming the MrcpServer that holds its pods and the pods the proxies call
/// down.
fn condition(
    matched: u32,
    ready: u32,
    held_by: &BTreeMap<String, u32>,
    called_down: &[String],
) -> (bool, &'static str, String) {
    let held: u32 = held_by.values().sum();
    let holders = || {
        held_by
            .iter()
            .map(|(s, n)| format!("{n} by MrcpServer {s}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let held_note = || {
        format!(
            "{held} of them {} a destination of another MrcpServer already ({}; a pod \
             belongs to the first MrcpServer by namespace/name that selects it)",
            if held == 1 { "is" } else { "are" },
            holders()
        )
    };
    if matched == 0 {
        return (
            false,
            "NoMatchingPods",
            "no pod matches spec.selector".to_string(),
        );
    }
    if ready > 0 {
        let mut msg = format!("{ready} destinations take calls");
        if !called_down.is_empty() {
            msg += &format!("; the proxies call down {}", called_down.join(", "));
        }
        if held > 0 {
            msg += &format!("; {matched} pods match, {}", held_note());
        }
        return (true, "DestinationsReady", msg);
    }
    if held == matched {
        return (
            false,
            "PodsHeldByAnotherServer",
            format!("{matched} pods match, {}", held_note()),
        );
    }
    if !called_down.is_empty() {
        return (
            false,
            "DestinationsDown",
            format!(
                "{} Ready, but the proxies call {} down: {}",
                if called_down.len() == 1 {
                    "1 pod is".to_string()
                } else {
                    format!("{} pods are", called_down.len())
                },
                if called_down.len() == 1 { "it" } else { "them" },
                called_down.join(", ")
            ),
        );
    }
    let mut msg = format!("{matched} pods match, none is Ready with an IP");
    if held > 0 {
        msg = format!(
            "{matched} pods match: {}; none of the others is Ready with an IP",
            held_note()
        );
    }
    (false, "NoReadyPods", msg)
}

/// Puts the proxies' live load and their view of each destination into a server computed by
/// [`compute`]: each resource's sessions summed over the server's destinations
/// (`status.destinations`, whatever their state), each destination's open sessions and the
/// most severe state a replica gives it; a resource that only carries sessions (no
/// destination offers it any more) is added with capacity 0. With no replica in the sum the
/// loads and the view stay unknown.
pub fn apply_loads(view: &mut ServerView, loads: &ProxyLoads) {
    let status = &mut view.status;
    status.load_from = Some(LoadFrom {
        proxies: loads.proxies,
        answered: loads.answered,
    });
    if loads.answered > 0 {
        let mut sums: BTreeMap<String, u64> = status
            .resources
            .iter()
            .map(|r| (r.name.clone(), 0))
            .collect();
        let mut active = 0u64;
        for d in &mut status.destinations {
            let seen = loads.by_destination.get(&d.id);
            for (name, load) in seen.into_iter().flat_map(|s| &s.resources) {
                let s = sums.entry(name.clone()).or_default();
                *s = s.saturating_add(*load);
            }
            let open = seen.map_or(0, |s| s.open_calls);
            active = active.saturating_add(open);
            d.sessions = Some(open);
            let view = seen.and_then(|s| s.view.as_ref());
            d.proxy_state = view.map(|(state, _)| state.as_str().to_string());
            d.proxy_reason = view
                .filter(|(state, reason)| *state != State::Up && !reason.is_empty())
                .map(|(_, reason)| reason.clone());
        }
        status.active_sessions = Some(active);
        status.resources = sums
            .into_iter()
            .map(|(name, load)| ResourceUsage {
                name,
                capacity: 0,
                load: Some(load),
                utilization_percent: None,
            })
            .collect();
    }
    finish(view);
}

/// Until the first loads are read (an operator that just started or took the lead), a status
/// keeps the loads and the proxies' view it shows (`previous`), so that a restart does not
/// blank them for an interval.
pub fn keep_loads(view: &mut ServerView, previous: Option<&MrcpServerStatus>) {
    let Some(prev) = previous.filter(|p| p.load_from.is_some()) else {
        return;
    };
    let status = &mut view.status;
    status.load_from = prev.load_from;
    status.active_sessions = prev.active_sessions;
    for r in &mut status.resources {
        r.load = prev
            .resources
            .iter()
            .find(|p| p.name == r.name)
            .and_then(|p| p.load);
    }
    for d in &mut status.destinations {
        if let Some(p) = prev.destinations.iter().find(|p| p.id == d.id) {
            d.proxy_state.clone_from(&p.proxy_state);
            d.proxy_reason.clone_from(&p.proxy_reason);
            d.sessions = p.sessions;
        }
    }
    finish(view);
}

/// `name=load/capacity` joined by `;`, `?` for an unknown load: the `kubectl get mrcp` column.
pub fn load_summary(resources: &[ResourceUsage]) -> String {
    resources
        .iter()
        .map(|r| match r.load {
            Some(l) => format!("{}={l}/{}", r.name, r.capacity),
            None => format!("{}=?/{}", r.name, r.capacity),
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// The proxy replicas' cluster addresses (`ip:port`), the `peers` of the pushed set: every
/// proxy pod with an IP that has not finished (phase Succeeded or Failed), whether Ready or
/// not and whether terminating or not (a starting replica is about to take calls, a draining
/// one still holds its calls: the others must count its load until the pod is gone), plus the
/// statically listed proxies (`static_ips`). Sorted and without duplicates, so that equal
/// inputs give equal lists and a changed list is a changed set.
pub fn peers(proxy_pods: &[&Pod], static_ips: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    proxy_pods
        .iter()
        .filter(|p| !pods::finished(p))
        .filter_map(|p| pods::pod_ip(p)?.parse::<IpAddr>().ok())
        .chain(static_ips.iter().copied())
        .map(|ip| SocketAddr::new(ip, port))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The IP address in a statically listed proxy's admin URL (`http://10.1.2.3:8081`,
/// `http://[fd00::1]:8081`), whose cluster address is that IP and the cluster port; None when
/// the URL names its host (its address is then unknown to the operator).
pub fn url_ip(url: &str) -> Option<IpAddr> {
    let url = reqwest::Url::parse(url).ok()?;
    let host = url.host_str()?;
    // IPv6 hosts come bracketed.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};

    fn server(name: &str, app: &str, extra: serde_json::Value) -> MrcpServer {
        let mut spec = serde_json::json!({"selector": {"matchLabels": {"app": app}}});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        let mut s = MrcpServer::new(name, serde_json::from_value(spec).unwrap());
        s.metadata.namespace = Some("speech".into());
        s.metadata.generation = Some(3);
        s
    }

    fn pod(name: &str, app: &str, ip: &str, ready: bool, pstn: Option<&str>) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("speech".into());
        p.metadata.uid = Some(format!("uid-{name}"));
        p.metadata.labels = Some([("app".to_string(), app.to_string())].into());
        if let Some(c) = pstn {
            p.metadata.annotations =
                Some([(crate::crd::PSTN_CAPACITY.to_string(), c.to_string())].into());
        }
        p.status = Some(PodStatus {
            pod_ip: Some(ip.into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        p
    }

    #[test]
    fn servers_and_pods_become_one_set_and_statuses() {
        let a = server(
            "asr",
            "unimrcp",
            serde_json::json!({"group": 2, "transport": "tcp"}),
        );
        let empty = server("tts", "nothing", serde_json::json!({}));
        let pods = [
            pod("mrcp-0", "unimrcp", "127.0.2.1", true, Some("100")),
            pod("mrcp-1", "unimrcp", "127.0.2.2", true, Some("50")),
            pod("mrcp-2", "unimrcp", "127.0.2.3", false, None),
            pod("other", "web", "127.0.2.9", true, None),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let c = compute([&a, &empty], &refs);
        assert_eq!(c.destinations.len(), 3);
        assert_eq!(c.destinations[0].uri, "sip:127.0.2.1:8060;transport=tcp");
        assert_eq!(c.destinations[0].group, 2);
        assert_eq!(c.destinations[2].state, DesiredState::Down);
        let asr = c.servers.iter().find(|s| s.name == "asr").unwrap();
        assert_eq!(asr.status.ready_destinations, 2);
        assert_eq!(asr.status.capacity_summary, "pstn=150");
        assert_eq!(asr.status.observed_generation, Some(3));
        assert_eq!(asr.ready.1, "DestinationsReady");
        assert_eq!(asr.status.destinations.len(), 3);
        let tts = c.servers.iter().find(|s| s.name == "tts").unwrap();
        assert_eq!(
            tts.ready,
            (
                false,
                "NoMatchingPods",
                "no pod matches spec.selector".to_string()
            )
        );
    }

    #[test]
    fn bad_annotation_is_a_warning_and_the_default_is_used() {
        let a = server(
            "asr",
            "unimrcp",
            serde_json::json!({"defaultResources": "pstn=10"}),
        );
        let pods = [pod("mrcp-0", "unimrcp", "127.0.2.1", true, Some("many"))];
        let refs: Vec<&Pod> = pods.iter().collect();
        let c = compute([&a], &refs);
        assert_eq!(c.destinations[0].resources.to_string(), "pstn=10");
        assert_eq!(c.warnings.len(), 1);
        assert_eq!(c.warnings[0].pod, "mrcp-0");
        assert!(c.warnings[0].problem.to_string().contains("\"many\""));
    }

    #[test]
    fn equal_inputs_give_equal_sets() {
        let a = server("asr", "unimrcp", serde_json::json!({}));
        let pods = [
            pod("mrcp-1", "unimrcp", "127.0.2.2", true, None),
            pod("mrcp-0", "unimrcp", "127.0.2.1", true, None),
        ];
        let fwd: Vec<&Pod> = pods.iter().collect();
        let rev: Vec<&Pod> = pods.iter().rev().collect();
        assert_eq!(
            compute([&a], &fwd).destinations,
            compute([&a], &rev).destinations
        );
    }

    #[test]
    fn no_ready_pods_and_invalid_spec() {
        let a = server("asr", "unimrcp", serde_json::json!({}));
        let pods = [pod("mrcp-0", "unimrcp", "127.0.2.1", false, None)];
        let refs: Vec<&Pod> = pods.iter().collect();
        assert_eq!(compute([&a], &refs).servers[0].ready.1, "NoReadyPods");
        let bad = server(
            "asr",
            "unimrcp",
            serde_json::json!({"defaultResources": "pstn=99999999999"}),
        );
        let c = compute([&bad], &refs);
        assert_eq!(c.servers[0].ready.1, "InvalidSpec");
        assert!(c.destinations.is_empty());
    }

    fn annotated(name: &str, app: &str, ip: &str, ready: bool, resources: &str) -> Pod {
        let mut p = pod(name, app, ip, ready, None);
        p.metadata.annotations =
            Some([(crate::crd::RESOURCES.to_string(), resources.to_string())].into());
        p
    }

    fn loads(proxies: u32, answered: u32, per: &[(&str, &str, u64)]) -> ProxyLoads {
        let mut l = ProxyLoads {
            proxies,
            answered,
            ..Default::default()
        };
        for (id, r, n) in per {
            l.by_destination
                .entry(id.to_string())
                .or_default()
                .resources
                .insert(r.to_string(), *n);
        }
        l
    }

    fn usage(name: &str, capacity: u64, load: Option<u64>) -> ResourceUsage {
        ResourceUsage {
            name: name.into(),
            capacity,
            load,
            utilization_percent: load.map(|l| utilization_percent(l, capacity)),
        }
    }

    #[test]
    fn resources_list_ready_capacity_and_every_offered_resource() {
        let asr = server("asr", "asr", serde_json::json!({}));
        let pods = [
            annotated("asr-0", "asr", "127.0.2.1", true, "speechrecog=50"),
            annotated("asr-1", "asr", "127.0.2.2", true, "speechrecog=50"),
            // Not ready: its resources are listed, its capacity is not counted.
            annotated(
                "asr-2",
                "asr",
                "127.0.2.3",
                false,
                "speechrecog=50;recorder=10",
            ),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let c = compute([&asr], &refs);
        let st = &c.servers[0].status;
        assert_eq!(
            st.resources,
            [usage("recorder", 0, None), usage("speechrecog", 100, None)]
        );
        assert_eq!(st.load_summary, "recorder=?/0;speechrecog=?/100");
        assert_eq!(st.capacity_summary, "speechrecog=100");
        assert_eq!(st.load_from, None);
    }

    #[test]
    fn loads_are_summed_over_the_servers_destinations_whatever_their_state() {
        let asr = server("asr", "asr", serde_json::json!({}));
        let tts = server("tts", "tts", serde_json::json!({}));
        let pods = [
            annotated("asr-0", "asr", "127.0.2.1", true, "speechrecog=50"),
            annotated("asr-1", "asr", "127.0.2.2", false, "speechrecog=50"),
            annotated("tts-0", "tts", "127.0.2.3", true, "speechsynth=200"),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let mut c = compute([&asr, &tts], &refs);
        let id: Vec<String> = pods.iter().map(pods::destination_id).collect();
        let l = loads(
            2,
            2,
            &[
                (&id[0], "speechrecog", 3),
                // Sessions still open on a pod that is no longer Ready count too.
                (&id[1], "speechrecog", 1),
                // A resource the pod no longer offers (its annotation changed): listed.
                (&id[1], "speechsynth", 2),
                (&id[2], "speechsynth", 1),
                // Another server's or a deleted pod's destination: not this server's.
                ("speech/gone@12345678", "speechrecog", 7),
            ],
        );
        for v in &mut c.servers {
            apply_loads(v, &l);
        }
        let asr = &c.servers[0].status;
        assert_eq!(
            asr.resources,
            [
                usage("speechrecog", 50, Some(4)),
                usage("speechsynth", 0, Some(2))
            ]
        );
        assert_eq!(asr.load_summary, "speechrecog=4/50;speechsynth=2/0");
        assert_eq!(
            asr.load_from,
            Some(LoadFrom {
                proxies: 2,
                answered: 2
            })
        );
        let tts = &c.servers[1].status;
        assert_eq!(tts.resources, [usage("speechsynth", 200, Some(1))]);
        assert_eq!(tts.load_summary, "speechsynth=1/200");
    }

    #[test]
    fn no_replica_answering_leaves_the_load_unknown() {
        let asr = server("asr", "asr", serde_json::json!({}));
        let pods = [annotated(
            "asr-0",
            "asr",
            "127.0.2.1",
            true,
            "speechrecog=50",
        )];
        let refs: Vec<&Pod> = pods.iter().collect();
        let mut c = compute([&asr], &refs);
        apply_loads(&mut c.servers[0], &loads(2, 0, &[]));
        let st = &c.servers[0].status;
        assert_eq!(st.resources, [usage("speechrecog", 50, None)]);
        assert_eq!(st.load_summary, "speechrecog=?/50");
        assert_eq!(
            st.load_from,
            Some(LoadFrom {
                proxies: 2,
                answered: 0
            })
        );
        // One answering replica with nothing open: load 0, known.
        apply_loads(&mut c.servers[0], &loads(2, 1, &[]));
        assert_eq!(c.servers[0].status.load_summary, "speechrecog=0/50");
    }

    #[test]
    fn before_the_first_read_a_status_keeps_the_loads_it_shows() {
        let asr = server("asr", "asr", serde_json::json!({}));
        let pods = [annotated(
            "asr-0",
            "asr",
            "127.0.2.1",
            true,
            "speechrecog=60;speechsynth=10",
        )];
        let refs: Vec<&Pod> = pods.iter().collect();
        let previous = MrcpServerStatus {
            resources: vec![usage("speechrecog", 50, Some(3))],
            load_from: Some(LoadFrom {
                proxies: 1,
                answered: 1,
            }),
            ..Default::default()
        };
        let mut view = compute([&asr], &refs).servers[0].clone();
        keep_loads(&mut view, Some(&previous));
        let st = &view.status;
        // The capacity is today's; the load the last one shown.
        assert_eq!(
            st.resources,
            [
                usage("speechrecog", 60, Some(3)),
                usage("speechsynth", 10, None)
            ]
        );
        assert_eq!(st.load_summary, "speechrecog=3/60;speechsynth=?/10");
        assert_eq!(st.load_from, previous.load_from);
        // A status that never had loads stays without.
        let mut fresh = compute([&asr], &refs).servers[0].clone();
        keep_loads(&mut fresh, Some(&MrcpServerStatus::default()));
        keep_loads(&mut fresh, None);
        assert_eq!(fresh.status.load_from, None);
        assert_eq!(
            fresh.status.load_summary,
            "speechrecog=?/60;speechsynth=?/10"
        );
    }

    /// Loads where each destination also has the proxies' view and open calls.
    fn seen(
        proxies: u32,
        per: &[(&str, &str, u64, u64, lb_api::admin::State, &str)],
    ) -> ProxyLoads {
        let mut l = ProxyLoads {
            proxies,
            answered: proxies,
            ..Default::default()
        };
        for (id, r, load, open, state, reason) in per {
            let d = l.by_destination.entry(id.to_string()).or_default();
            d.resources.insert(r.to_string(), *load);
            d.open_calls = *open;
            d.view = Some((*state, reason.to_string()));
        }
        l
    }

    #[test]
    fn a_ready_pod_the_proxies_call_down_counts_as_down_and_loses_its_capacity() {
        use lb_api::admin::State;
        let asr = server("asr", "asr", serde_json::json!({}));
        let mut terminating = annotated("asr-3", "asr", "127.0.2.4", true, "speechrecog=50");
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let pods = [
            annotated("asr-0", "asr", "127.0.2.1", true, "speechrecog=50"),
            annotated("asr-1", "asr", "127.0.2.2", true, "speechrecog=50"),
            annotated("asr-2", "asr", "127.0.2.3", false, "speechrecog=50"),
            terminating,
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let mut c = compute([&asr], &refs);
        let before = c.servers[0].status.clone();
        assert_eq!(
            (
                before.ready_destinations,
                before.down_destinations,
                before.draining_destinations
            ),
            (2, 1, 1)
        );
        assert_eq!(before.capacity_summary, "speechrecog=100");
        assert_eq!((before.active_sessions, before.utilization), (None, None));
        let id: Vec<String> = pods.iter().map(pods::destination_id).collect();
        let l = seen(
            2,
            &[
                (&id[0], "speechrecog", 10, 10, State::Up, ""),
                (&id[1], "speechrecog", 0, 0, State::Down, "probe failures"),
                (
                    &id[2],
                    "speechrecog",
                    0,
                    0,
                    State::Down,
                    "down (set: not ready)",
                ),
                (
                    &id[3],
                    "speechrecog",
                    3,
                    3,
                    State::Draining,
                    "draining (set)",
                ),
            ],
        );
        apply_loads(&mut c.servers[0], &l);
        let v = &c.servers[0];
        let st = &v.status;
        assert_eq!(
            (
                st.ready_destinations,
                st.down_destinations,
                st.draining_destinations
            ),
            (1, 2, 1),
            "asr-1 is Ready but called down"
        );
        assert_eq!(st.capacity_summary, "speechrecog=50");
        assert_eq!(st.active_sessions, Some(13));
        assert_eq!(
            st.resources,
            [ResourceUsage {
                name: "speechrecog".into(),
                capacity: 50,
                load: Some(13),
                utilization_percent: Some(26),
            }]
        );
        assert_eq!(st.utilization.as_deref(), Some("26%"));
        let asr1 = &st.destinations[1];
        assert_eq!(
            (
                asr1.state.as_str(),
                asr1.proxy_state.as_deref(),
                asr1.proxy_reason.as_deref(),
                asr1.sessions
            ),
            ("active", Some("down"), Some("probe failures"), Some(0))
        );
        assert_eq!(st.destinations[0].proxy_reason, None, "up: no reason");
        assert!(v.ready.0);
        assert!(
            v.ready
                .2
                .contains("the proxies call down asr-1 (probe failures)"),
            "{:?}",
            v.ready
        );

        // Both Ready pods called down: not Ready, and the condition says why.
        let l = seen(
            1,
            &[
                (&id[0], "speechrecog", 0, 0, State::Down, "INVITE timeout"),
                (
                    &id[1],
                    "speechrecog",
                    0,
                    0,
                    State::Disabled,
                    "disabled by hand",
                ),
            ],
        );
        let mut c = compute([&asr], &refs);
        apply_loads(&mut c.servers[0], &l);
        let v = &c.servers[0];
        assert_eq!(v.status.utilization.as_deref(), Some("0%"));
        assert_eq!(v.status.capacity_summary, "");
        assert_eq!(
            v.ready,
            (
                false,
                "DestinationsDown",
                "2 pods are Ready, but the proxies call them down: asr-0 (INVITE timeout), \
                 asr-1 (disabled by hand)"
                    .to_string()
            )
        );
    }

    #[test]
    fn a_replica_a_push_behind_does_not_call_a_ready_pod_down() {
        use lb_api::admin::State;
        let asr = server("asr", "asr", serde_json::json!({}));
        let pods = [annotated("asr-0", "asr", "127.0.2.1", true, "pstn=10")];
        let refs: Vec<&Pod> = pods.iter().collect();
        let id = pods::destination_id(&pods[0]);
        let mut c = compute([&asr], &refs);
        apply_loads(
            &mut c.servers[0],
            &seen(
                1,
                &[(&id, "pstn", 0, 0, State::Down, "down (set: not ready)")],
            ),
        );
        assert_eq!(c.servers[0].status.ready_destinations, 1);
        assert_eq!(c.servers[0].ready.1, "DestinationsReady");
    }

    #[test]
    fn utilization_rounds_and_a_resource_without_capacity_is_full_with_sessions() {
        assert_eq!(utilization_percent(1, 3), 33);
        assert_eq!(utilization_percent(2, 3), 67);
        assert_eq!(utilization_percent(150, 100), 150);
        assert_eq!(utilization_percent(0, 0), 0);
        assert_eq!(utilization_percent(4, 0), 100);
        assert_eq!(utilization(1, 4), 0.25);
        assert_eq!((utilization(0, 0), utilization(2, 0)), (0.0, 1.0));
    }

    #[test]
    fn pods_another_server_holds_are_named_in_the_condition() {
        let first = server("asr", "unimrcp", serde_json::json!({}));
        let second = server("copy", "unimrcp", serde_json::json!({}));
        let pods = [
            pod("mrcp-0", "unimrcp", "127.0.2.1", true, None),
            pod("mrcp-1", "unimrcp", "127.0.2.2", true, None),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let c = compute([&second, &first], &refs);
        assert_eq!(c.destinations.len(), 2, "each pod once");
        let asr = &c.servers[0];
        assert_eq!(
            (asr.name.as_str(), asr.ready.1),
            ("asr", "DestinationsReady")
        );
        assert!(asr.held_by.is_empty());
        let copy = &c.servers[1];
        assert_eq!(
            copy.held_by,
            BTreeMap::from([("speech/asr".to_string(), 2)])
        );
        assert_eq!(
            (copy.ready.0, copy.ready.1),
            (false, "PodsHeldByAnotherServer")
        );
        assert!(
            copy.ready.2.starts_with(
                "2 pods match, 2 of them are a destination of another \
                 MrcpServer already (2 by MrcpServer speech/asr"
            ),
            "{}",
            copy.ready.2
        );
        assert!(copy.status.destinations.is_empty());
    }

    fn proxy_pod(name: &str, ip: Option<&str>, ready: bool, phase: &str) -> Pod {
        let mut p = pod(name, "lb-proxy", ip.unwrap_or(""), ready, None);
        if let Some(st) = p.status.as_mut() {
            st.phase = Some(phase.into());
            if ip.is_none() {
                st.pod_ip = None;
            }
        }
        p
    }

    fn addrs(v: &[SocketAddr]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn peers_are_every_running_proxy_pod_at_the_cluster_port() {
        let mut draining = proxy_pod("lb-2", Some("10.0.0.3"), false, "Running");
        draining.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let pods = [
            proxy_pod("lb-1", Some("10.0.0.2"), true, "Running"),
            // Starting: not Ready yet, but it will take calls.
            proxy_pod("lb-0", Some("10.0.0.10"), false, "Running"),
            // Draining: terminating, still holds calls.
            draining,
            // No IP yet: no address to name.
            proxy_pod("lb-3", None, false, "Pending"),
            // Finished: holds nothing.
            proxy_pod("lb-4", Some("10.0.0.5"), false, "Failed"),
            proxy_pod("lb-5", Some("10.0.0.6"), false, "Succeeded"),
            // Same IP as lb-1 (a hostNetwork replica's node): one peer.
            proxy_pod("lb-6", Some("10.0.0.2"), true, "Running"),
            proxy_pod("lb-7", Some("fd00::7"), true, "Running"),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let got = peers(&refs, &["192.0.2.1".parse().unwrap()], 7070);
        assert_eq!(
            addrs(&got),
            [
                "10.0.0.2:7070",
                "10.0.0.3:7070",
                "10.0.0.10:7070",
                "192.0.2.1:7070",
                "[fd00::7]:7070"
            ]
        );
        // Sorted by address, not by name or watch order: the same pods in another order give
        // the same list.
        let rev: Vec<&Pod> = pods.iter().rev().collect();
        assert_eq!(peers(&rev, &["192.0.2.1".parse().unwrap()], 7070), got);
        assert!(peers(&[], &[], 7070).is_empty());
    }

    #[test]
    fn a_pod_going_away_changes_the_peers() {
        let pods = [
            proxy_pod("lb-0", Some("10.0.0.1"), true, "Running"),
            proxy_pod("lb-1", Some("10.0.0.2"), true, "Running"),
        ];
        let both: Vec<&Pod> = pods.iter().collect();
        let one: Vec<&Pod> = pods.iter().take(1).collect();
        assert_ne!(peers(&both, &[], 7070), peers(&one, &[], 7070));
        assert_eq!(addrs(&peers(&one, &[], 9000)), ["10.0.0.1:9000"]);
    }

    #[test]
    fn static_proxy_urls_give_their_ip() {
        assert_eq!(
            url_ip("http://10.1.2.3:8081"),
            Some("10.1.2.3".parse().unwrap())
        );
        assert_eq!(
            url_ip("https://10.1.2.3"),
            Some("10.1.2.3".parse().unwrap())
        );
        assert_eq!(
            url_ip("http://[fd00::1]:8081/"),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(url_ip("http://lb-0.example.com:8081"), None);
        assert_eq!(url_ip("http://localhost:8081"), None);
        assert_eq!(url_ip("not a url"), None);
    }
}
