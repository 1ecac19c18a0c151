//! What the operator tells users on their MrcpServers as Kubernetes Events: pods registered,
//! draining and removed, pods the proxies call down and up again, pods another MrcpServer
//! holds, proxies that do not take the destination set, bad capacity annotations. Pure
//! functions from one status to the next; [`crate::status`] publishes them (leader only).

use std::collections::BTreeMap;

use crate::crd::DestinationEntry;
use crate::model::{Standing, Warning};

/// One Event to publish: Normal or Warning, its reason (CamelCase, fixed), the action the
/// operator took, a note for humans and the pod it is about (in the MrcpServer's namespace).
/// Events with the same reason and action on the same object are one series (the first note
/// stays): naming the pod as the related object keeps each pod's Events apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
    pub pod: Option<String>,
}

/// The API server refuses an Event note longer than 1 kB.
const MAX_NOTE: usize = 1024;

impl Notice {
    fn new(warning: bool, reason: &'static str, action: &'static str, note: String) -> Notice {
        Notice {
            warning,
            reason,
            action,
            note: truncate(note, MAX_NOTE),
            pod: None,
        }
    }

    fn about(mut self, pod: &str) -> Notice {
        self.pod = Some(pod.to_string());
        self
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// The Events one MrcpServer's destinations give from one status (`before`) to the next
/// (`after`), matched by destination id (a pod restarted in place keeps its id; a new pod
/// with the same name has a new one).
pub fn destination_notices(before: &[DestinationEntry], after: &[DestinationEntry]) -> Vec<Notice> {
    let old: BTreeMap<&str, &DestinationEntry> =
        before.iter().map(|d| (d.id.as_str(), d)).collect();
    let new: BTreeMap<&str, &DestinationEntry> = after.iter().map(|d| (d.id.as_str(), d)).collect();
    let mut out = Vec::new();
    for (id, d) in &new {
        let was = old.get(id).copied();
        let now = Standing::of(d);
        let then = was.map(Standing::of);
        match was {
            None => out.push(
                Notice::new(
                    false,
                    "Registered",
                    "Register",
                    format!(
                        "pod {} registered as {} ({}){}",
                        d.pod,
                        d.uri,
                        d.resources,
                        match d.state.as_str() {
                            "active" => "",
                            "draining" => ", terminating",
                            _ => ", not Ready yet",
                        }
                    ),
                )
                .about(&d.pod),
            ),
            Some(w) if w.state != "draining" && d.state == "draining" => out.push(
                Notice::new(
                    false,
                    "Draining",
                    "Drain",
                    format!(
                        "pod {} is terminating: it takes no new sessions{}",
                        d.pod,
                        match d.sessions {
                            Some(n) => format!("; {n} open sessions continue"),
                            None => "; its open sessions continue".to_string(),
                        }
                    ),
                )
                .about(&d.pod),
            ),
            _ => {}
        }
        if now == Standing::CalledDown && then != Some(Standing::CalledDown) {
            out.push(
                Notice::new(
                    true,
                    "ProbeDown",
                    "Probe",
                    format!(
                        "pod {} is Ready, but the proxies call it {}: {}; no new sessions go to it",
                        d.pod,
                        d.proxy_state.as_deref().unwrap_or("down"),
                        d.proxy_reason.as_deref().unwrap_or("no reason given")
                    ),
                )
                .about(&d.pod),
            );
        }
        if then == Some(Standing::CalledDown) && now == Standing::Ready {
            out.push(
                Notice::new(
                    false,
                    "ProbeUp",
                    "Probe",
                    format!("the proxies call pod {} up again: it takes sessions", d.pod),
                )
                .about(&d.pod),
            );
        }
    }
    for (id, d) in &old {
        if !new.contains_key(id) {
            out.push(
                Notice::new(
                    false,
                    "Removed",
                    "Deregister",
                    format!("pod {} ({}) is no longer a destination", d.pod, d.uri),
                )
                .about(&d.pod),
            );
        }
    }
    out
}

/// The Warning for pods that another MrcpServer holds, with the text that identifies it (a
/// new text is a new Warning).
pub fn held_notice(matched: u32, held_by: &BTreeMap<String, u32>) -> Option<Notice> {
    if held_by.is_empty() {
        return None;
    }
    let holders: Vec<String> = held_by
        .iter()
        .map(|(s, n)| format!("{n} by MrcpServer {s}"))
        .collect();
    Some(Notice::new(
        true,
        "PodsHeldByAnotherServer",
        "Register",
        format!(
            "{matched} pods match spec.selector, and some are destinations of another \
             MrcpServer already ({}): a pod belongs to the first MrcpServer by namespace/name \
             that selects it; make the selectors disjoint",
            holders.join(", ")
        ),
    ))
}

/// The Warning, on every MrcpServer, for a proxy that does not take the destination set.
pub fn push_notice(proxy: &str, error: &str) -> Notice {
    Notice::new(
        true,
        "PushFailed",
        "Push",
        format!(
            "proxy {proxy} did not take the destination set: {error}; retrying (it routes on \
             the set it has)"
        ),
    )
}

/// The Warning, on the MrcpServer, for a pod whose capacity annotation cannot be read (the
/// pod gets its own).
pub fn annotation_notice(w: &Warning) -> Notice {
    Notice::new(
        true,
        "InvalidCapacityAnnotation",
        "Register",
        format!(
            "pod {}: {}; using the MrcpServer's defaultResources",
            w.pod, w.problem
        ),
    )
    .about(&w.pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pod: &str, id: &str, state: &str, proxy: Option<(&str, &str)>) -> DestinationEntry {
        DestinationEntry {
            pod: pod.into(),
            id: id.into(),
            uri: format!("sip:{pod}:8060"),
            resources: "pstn=10".into(),
            state: state.into(),
            proxy_state: proxy.map(|(s, _)| s.to_string()),
            proxy_reason: proxy.map(|(_, r)| r.to_string()).filter(|r| !r.is_empty()),
            sessions: Some(2),
        }
    }

    fn reasons(n: &[Notice]) -> Vec<(&'static str, bool)> {
        assert!(
            n.iter().all(|n| n.pod.is_some()),
            "each names its pod: {n:?}"
        );
        n.iter().map(|n| (n.reason, n.warning)).collect()
    }

    #[test]
    fn registration_draining_and_removal() {
        let a = entry("a", "ns/a@1", "active", None);
        let b = entry("b", "ns/b@2", "down", None);
        let n = destination_notices(&[], &[a.clone(), b.clone()]);
        assert_eq!(reasons(&n), [("Registered", false), ("Registered", false)]);
        assert!(n[1].note.ends_with("not Ready yet"), "{:?}", n[1].note);
        let a_draining = entry("a", "ns/a@1", "draining", None);
        let n = destination_notices(&[a.clone(), b.clone()], std::slice::from_ref(&a_draining));
        assert_eq!(reasons(&n), [("Draining", false), ("Removed", false)]);
        assert!(n[0].note.contains("2 open sessions"), "{:?}", n[0].note);
        // Nothing changed: nothing to say; still draining: said once.
        assert!(destination_notices(&[a.clone(), b.clone()], &[a, b]).is_empty());
        let once = std::slice::from_ref(&a_draining);
        assert!(destination_notices(once, once).is_empty());
    }

    #[test]
    fn a_ready_pod_the_proxies_call_down_is_a_warning_and_its_recovery_a_normal_event() {
        let up = entry("a", "ns/a@1", "active", Some(("up", "")));
        let down = entry("a", "ns/a@1", "active", Some(("down", "probe failures")));
        let n = destination_notices(std::slice::from_ref(&up), std::slice::from_ref(&down));
        assert_eq!(reasons(&n), [("ProbeDown", true)]);
        assert!(n[0].note.contains("probe failures"), "{:?}", n[0].note);
        assert!(
            destination_notices(std::slice::from_ref(&down), std::slice::from_ref(&down))
                .is_empty()
        );
        let n = destination_notices(&[down], &[up]);
        assert_eq!(reasons(&n), [("ProbeUp", false)]);
        // A replica a push behind (its state repeats the old set) is no judgement.
        let stale = entry(
            "a",
            "ns/a@1",
            "active",
            Some(("down", lb_api::admin::REASON_SET_DOWN)),
        );
        let was_down = entry("a", "ns/a@1", "down", None);
        assert!(destination_notices(&[was_down], &[stale]).is_empty());
    }

    #[test]
    fn notes_fit_the_api_servers_limit() {
        let n = push_notice("http://10.0.0.1:8081", &"x".repeat(5000));
        assert!(n.note.len() <= MAX_NOTE && n.note.ends_with("..."));
        let mut held = BTreeMap::new();
        held.insert("speech/asr".to_string(), 2);
        let n = held_notice(2, &held).unwrap();
        assert!(
            n.warning && n.note.contains("2 by MrcpServer speech/asr"),
            "{n:?}"
        );
        assert_eq!(held_notice(2, &BTreeMap::new()), None);
    }
}
