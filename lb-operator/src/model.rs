//! All `MrcpServer`s and pods → the one destination set every proxy gets, and each server's
//! status. A pure function: the watches feed it, tests call it directly.

use k8s_openapi::api::core::v1::Pod;
use lb_api::{DesiredState, DestinationSpec, Resources};
use std::collections::{BTreeMap, BTreeSet, HashSet};
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
    /// Ready condition: status ("True"/"False"), reason, message.
    pub ready: (bool, &'static str, String),
}

/// A pod whose annotation could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub problem: BadAnnotation,
}

#[derive(Debug, Clone, Default)]
pub struct Computed {
    /// Sorted by id, so equal inputs give equal sets.
    pub destinations: Vec<DestinationSpec>,
    pub servers: Vec<ServerView>,
    pub warnings: Vec<Warning>,
}

/// Computes the destination set and the servers' statuses.
pub fn compute<'a>(
    servers: impl IntoIterator<Item = &'a MrcpServer>,
    pods: &[&'a Pod],
) -> Computed {
    let mut out = Computed::default();
    let mut taken = HashSet::new();
    let mut servers: Vec<&MrcpServer> = servers.into_iter().collect();
    servers.sort_by_key(|s| (s.metadata.namespace.clone(), s.metadata.name.clone()));
    for server in servers {
        let ns = server.metadata.namespace.clone().unwrap_or_default();
        let name = server.metadata.name.clone().unwrap_or_default();
        let mut status = MrcpServerStatus {
            observed_generation: server.metadata.generation,
            ..Default::default()
        };
        let default: Resources = match server.spec.default_resources.parse() {
            Ok(r) => r,
            Err(e) => {
                let msg = format!(
                    "spec.defaultResources {:?}: {e}",
                    server.spec.default_resources
                );
                out.servers.push(ServerView {
                    namespace: ns,
                    name,
                    status,
                    ready: (false, "InvalidSpec", msg),
                });
                continue;
            }
        };
        let mut matched = 0;
        let mut capacity: BTreeMap<String, u64> = BTreeMap::new();
        // Every resource a destination offers, ready or not: listed in `resources`.
        let mut offered: BTreeSet<String> = BTreeSet::new();
        for pod in pods
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()))
        {
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            if !pods::selector_matches(&server.spec.selector, &labels) {
                continue;
            }
            matched += 1;
            let Some((dest, bad)) = pods::destination(&server.spec, &default, pod) else {
                continue;
            };
            if let Some(problem) = bad {
                out.warnings.push(Warning {
                    namespace: ns.clone(),
                    pod: pod.metadata.name.clone().unwrap_or_default(),
                    uid: pod.metadata.uid.clone().unwrap_or_default(),
                    problem,
                });
            }
            // A pod matched by two servers belongs to the first (by namespace/name).
            if !taken.insert(dest.id.clone()) {
                continue;
            }
            let state = match dest.state {
                DesiredState::Active => "active",
                DesiredState::Draining => "draining",
                DesiredState::Down => "down",
            };
            offered.extend(dest.resources.iter().map(|(r, _)| r.to_string()));
            if dest.state == DesiredState::Active {
                status.ready_destinations += 1;
                for (r, c) in dest.resources.iter() {
                    *capacity.entry(r.to_string()).or_default() += u64::from(c);
                }
            }
            status.destinations.push(DestinationEntry {
                pod: pod.metadata.name.clone().unwrap_or_default(),
                id: dest.id.clone(),
                uri: dest.uri.clone(),
                resources: dest.resources.to_string(),
                state: state.to_string(),
            });
            out.destinations.push(dest);
        }
        status.capacity_summary = capacity
            .iter()
            .map(|(r, c)| format!("{r}={c}"))
            .collect::<Vec<_>>()
            .join(";");
        status.resources = offered
            .into_iter()
            .map(|name| ResourceUsage {
                capacity: capacity.get(&name).copied().unwrap_or(0),
                name,
                load: None,
            })
            .collect();
        status.load_summary = load_summary(&status.resources);
        status.capacity = capacity;
        status.destinations.sort_by(|a, b| a.pod.cmp(&b.pod));
        let ready = match (matched, status.ready_destinations) {
            (0, _) => (
                false,
                "NoMatchingPods",
                "no pod matches spec.selector".to_string(),
            ),
            (_, 0) => (
                false,
                "NoReadyPods",
                format!("{matched} pods match, none is Ready with an IP"),
            ),
            (_, n) => (
                true,
                "DestinationsReady",
                format!("{n} destinations take calls"),
            ),
        };
        out.servers.push(ServerView {
            namespace: ns,
            name,
            status,
            ready,
        });
    }
    out.destinations.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Puts the proxies' live load into a status computed by [`compute`]: each resource's
/// sessions summed over the server's destinations (`status.destinations`, whatever their
/// state); a resource that only carries sessions (no destination offers it any more) is added
/// with capacity 0. With no replica in the sum the loads stay unknown.
pub fn apply_loads(status: &mut MrcpServerStatus, loads: &ProxyLoads) {
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
        for d in &status.destinations {
            for (name, load) in loads.by_destination.get(&d.id).into_iter().flatten() {
                let s = sums.entry(name.clone()).or_default();
                *s = s.saturating_add(*load);
            }
        }
        let capacity: BTreeMap<&str, u64> = status
            .resources
            .iter()
            .map(|r| (r.name.as_str(), r.capacity))
            .collect();
        status.resources = sums
            .into_iter()
            .map(|(name, load)| ResourceUsage {
                capacity: capacity.get(name.as_str()).copied().unwrap_or(0),
                name,
                load: Some(load),
            })
            .collect();
    }
    status.load_summary = load_summary(&status.resources);
}

/// Until the first loads are read (an operator that just started or took the lead), a status
/// keeps the loads it shows (`previous`), so that a restart does not blank them for an
/// interval.
pub fn keep_loads(status: &mut MrcpServerStatus, previous: Option<&MrcpServerStatus>) {
    let Some(prev) = previous.filter(|p| p.load_from.is_some()) else {
        return;
    };
    status.load_from = prev.load_from;
    for r in &mut status.resources {
        r.load = prev
            .resources
            .iter()
            .find(|p| p.name == r.name)
            .and_then(|p| p.load);
    }
    status.load_summary = load_summary(&status.resources);
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
                .insert(r.to_string(), *n);
        }
        l
    }

    fn usage(name: &str, capacity: u64, load: Option<u64>) -> ResourceUsage {
        ResourceUsage {
            name: name.into(),
            capacity,
            load,
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
            apply_loads(&mut v.status, &l);
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
        apply_loads(&mut c.servers[0].status, &loads(2, 0, &[]));
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
        apply_loads(&mut c.servers[0].status, &loads(2, 1, &[]));
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
        let mut st = compute([&asr], &refs).servers[0].status.clone();
        keep_loads(&mut st, Some(&previous));
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
        let mut fresh = compute([&asr], &refs).servers[0].status.clone();
        keep_loads(&mut fresh, Some(&MrcpServerStatus::default()));
        keep_loads(&mut fresh, None);
        assert_eq!(fresh.load_from, None);
        assert_eq!(fresh.load_summary, "speechrecog=?/60;speechsynth=?/10");
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
