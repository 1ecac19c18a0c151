//! The operator's RBAC, from the chart exactly as `helm template` renders it.
//!
//! 1. `chart_rbac_is_exactly_what_the_operator_calls` (no cluster): in every supported mode
//!    the rules bound to the operator's ServiceAccount are exactly `needed()` — the calls
//!    lb-operator makes, each listed with the code that makes it — with no wildcard, no
//!    Secret access, no binding for anything else, and the Lease rule naming the Lease the
//!    Deployment's `--lease-name` gives.
//! 2. `operator_reconciles_as_the_charts_serviceaccount_*`: a real kube-apiserver (RBAC on),
//!    the chart's ServiceAccount, Roles and bindings applied, and the real operator run with the
//!    Deployment's args and a TokenRequest token of that ServiceAccount (so the chart's rules
//!    are all it has). It must discover the proxy pods and push with the admin token, write
//!    MrcpServer status, publish a Warning event and then patch it as a series, hold, renew and
//!    release its Lease. The API server's audit log (`tests/k8s/control-plane.sh` records
//!    ServiceAccount requests) then shows that every request was allowed and that every rule
//!    the chart grants was used. The admin token and the ServiceAccount token must appear in
//!    no log (operator and proxies at debug level, a proxy with another token included).
//!
//! Addresses: 127.0.5.0/24 only (k8s_operator.rs uses 127.0.3.x and 127.0.4.x). The two
//! cluster tests run one after the other: a cluster-wide operator would see the other test's
//! objects.
//!
//! Run: `source tests/k8s/env.sh; cargo test -p lb-operator --test rbac -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod k8s_harness;

use k8s_harness::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use lb_operator::crd::MrcpServer;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SEC: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(50);
const PSTN_CAPACITY: &str = "mrcp-lb.io/pstn-capacity";

// ---------------------------------------------------------------------------------------------
// Rendering the chart

/// One permission: a verb on a resource (`pods`, `mrcpservers/status`) of an API group, in a
/// namespace or cluster-wide (`scope` None), optionally for named objects only.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    scope: Option<String>,
    group: String,
    resource: String,
    verb: String,
    names: Vec<String>,
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scope = self.scope.as_deref().unwrap_or("<cluster>");
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{scope}: {} {group}/{}", self.verb, self.resource)?;
        if !self.names.is_empty() {
            write!(f, " {:?}", self.names)?;
        }
        Ok(())
    }
}

fn grant(scope: Option<&str>, group: &str, resource: &str, verb: &str, names: &[&str]) -> Grant {
    Grant {
        scope: scope.map(str::to_string),
        group: group.to_string(),
        resource: resource.to_string(),
        verb: verb.to_string(),
        names: names.iter().map(|n| n.to_string()).collect(),
    }
}

/// What lb-operator calls, given where it watches (`--namespace`, None = everywhere), where the
/// proxies and its Lease live (`--proxy-namespace`, `POD_NAMESPACE`) and the Lease's name.
fn needed(watch: Option<&str>, release: &str, lease: &str) -> BTreeSet<Grant> {
    let mut g = BTreeSet::new();
    // watches.rs `Stores::start`: reflectors (watcher: list, then watch) on MrcpServers and
    // on pods.
    for verb in ["list", "watch"] {
        g.insert(grant(watch, "mrcp-lb.io", "mrcpservers", verb, &[]));
        g.insert(grant(watch, "", "pods", verb, &[]));
    }
    // status.rs `StatusWriter::write_status`: `patch_status` (server-side apply) of each
    // MrcpServer.
    g.insert(grant(
        watch,
        "mrcp-lb.io",
        "mrcpservers/status",
        "patch",
        &[],
    ));
    // status.rs `StatusWriter::warn_once`: `pods.get_opt` of a pod with a bad annotation, then
    // kube's `Recorder::publish`: create the Event, patch it when it repeats (a series).
    g.insert(grant(watch, "", "pods", "get", &[]));
    g.insert(grant(watch, "events.k8s.io", "events", "create", &[]));
    g.insert(grant(watch, "events.k8s.io", "events", "patch", &[]));
    // watches.rs `Stores::start`: the proxy-pod reflector in --proxy-namespace (the release
    // namespace), unless the rules above already cover that namespace.
    if watch.is_some_and(|w| w != release) {
        for verb in ["list", "watch"] {
            g.insert(grant(Some(release), "", "pods", verb, &[]));
        }
    }
    // lease.rs `Elector`: `get_opt`, `create` when missing, `replace` (PUT) to renew, take
    // over and release.
    g.insert(grant(
        Some(release),
        "coordination.k8s.io",
        "leases",
        "create",
        &[],
    ));
    for verb in ["get", "update"] {
        g.insert(grant(
            Some(release),
            "coordination.k8s.io",
            "leases",
            verb,
            &[lease],
        ));
    }
    g
}

/// `helm template` output as JSON documents.
struct Rendered {
    release: String,
    namespace: String,
    docs: Vec<Value>,
}

fn helm_template(release: &str, namespace: &str, set: &[&str]) -> Rendered {
    let helm = k8s_bin("helm");
    assert!(
        helm.is_file(),
        "{} missing: run `make k8s` (tests/k8s/build.sh); this test renders the chart with the \
         real helm and is not skipped",
        helm.display()
    );
    let mut cmd = Command::new(&helm);
    clean_env(&mut cmd)
        .arg("template")
        .arg(release)
        .arg(repo().join("charts/mrcp-lb"))
        .args(["--namespace", namespace]);
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.stdin(Stdio::null()).output().expect("run helm");
    assert!(
        out.status.success(),
        "helm template {release} --set {set:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("helm output is UTF-8");
    let mut docs = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(de).expect("helm output is YAML");
        if !v.is_null() {
            docs.push(v);
        }
    }
    Rendered {
        release: release.to_string(),
        namespace: namespace.to_string(),
        docs,
    }
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

impl Rendered {
    fn of_kind(&self, kind: &str) -> std::vec::IntoIter<&Value> {
        let docs: Vec<&Value> = self.docs.iter().filter(|d| d["kind"] == kind).collect();
        docs.into_iter()
    }

    fn name(d: &Value) -> &str {
        d["metadata"]["name"].as_str().expect("metadata.name")
    }

    /// The namespace a namespaced object lands in (helm installs into the release namespace).
    fn ns_of(&self, d: &Value) -> String {
        d["metadata"]["namespace"]
            .as_str()
            .unwrap_or(&self.namespace)
            .to_string()
    }

    fn operator_deployment(&self) -> &Value {
        let ds: Vec<&Value> = self
            .of_kind("Deployment")
            .filter(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator")
            .collect();
        assert_eq!(ds.len(), 1, "one operator Deployment");
        ds[0]
    }

    fn operator_container(&self) -> &Value {
        let cs = self.operator_deployment()["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("containers");
        cs.iter()
            .find(|c| c["name"] == "lb-operator")
            .expect("lb-operator container")
    }

    fn operator_args(&self) -> Vec<String> {
        strs(&self.operator_container()["args"])
    }

    /// The value of `--flag=value` in the operator's args.
    fn operator_flag(&self, flag: &str) -> Option<String> {
        let prefix = format!("--{flag}=");
        self.operator_args()
            .iter()
            .find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
    }

    fn operator_sa(&self) -> String {
        self.operator_deployment()["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .expect("the operator Deployment names its ServiceAccount")
            .to_string()
    }

    /// The rules of the Role or ClusterRole a binding refers to.
    fn role_rules(&self, binding: &Value) -> &Value {
        let kind = binding["roleRef"]["kind"].as_str().expect("roleRef.kind");
        let name = binding["roleRef"]["name"].as_str().expect("roleRef.name");
        let bns = self.ns_of(binding);
        let role = self
            .of_kind(kind)
            .find(|r| Self::name(r) == name && (kind == "ClusterRole" || self.ns_of(r) == bns))
            .unwrap_or_else(|| {
                panic!("binding {} refers to a missing {kind} {name}", {
                    Self::name(binding)
                })
            });
        assert!(
            role.get("aggregationRule").is_none(),
            "{kind} {name}: an aggregated role's rules are not in the chart"
        );
        &role["rules"]
    }

    /// Every permission the ServiceAccount `sa` (of the release namespace) gets from the
    /// chart's bindings, one per verb, resource and group.
    fn grants_of(&self, sa: &str) -> BTreeSet<Grant> {
        let mut out = BTreeSet::new();
        for kind in ["RoleBinding", "ClusterRoleBinding"] {
            for b in self.of_kind(kind) {
                let subjects = b["subjects"].as_array().cloned().unwrap_or_default();
                let ours = subjects.iter().any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == sa
                        && s["namespace"].as_str() == Some(&self.namespace)
                });
                if !ours {
                    continue;
                }
                let scope = (kind == "RoleBinding").then(|| self.ns_of(b));
                let rules = self.role_rules(b).as_array().cloned().unwrap_or_default();
                for r in rules {
                    assert!(
                        r.get("nonResourceURLs").is_none(),
                        "non-resource URLs granted: {r}"
                    );
                    let names = strs(&r["resourceNames"]);
                    for group in strs(&r["apiGroups"]) {
                        for resource in strs(&r["resources"]) {
                            for verb in strs(&r["verbs"]) {
                                out.insert(Grant {
                                    scope: scope.clone(),
                                    group: group.clone(),
                                    resource: resource.clone(),
                                    verb,
                                    names: names.clone(),
                                });
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// The RBAC objects, with the release namespace filled in where helm would set it.
    fn rbac_objects(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for d in &self.docs {
            let kind = d["kind"].as_str().unwrap_or("");
            if !matches!(
                kind,
                "ServiceAccount" | "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding"
            ) {
                continue;
            }
            let mut d = d.clone();
            if !kind.starts_with("Cluster") && d["metadata"]["namespace"].is_null() {
                d["metadata"]["namespace"] = json!(self.namespace);
            }
            out.push(d);
        }
        out
    }
}

fn show(set: &BTreeSet<Grant>) -> String {
    set.iter()
        .map(|g| format!("  {g}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Checks one rendering; returns the operator's grants.
fn check_rendering(r: &Rendered, watch: Option<&str>) -> BTreeSet<Grant> {
    let what = format!("release {} in {}, watch {watch:?}", r.release, r.namespace);
    let sa = r.operator_sa();
    assert!(
        r.of_kind("ServiceAccount").any(|s| Rendered::name(s) == sa),
        "{what}: the chart does not create the operator's ServiceAccount {sa}"
    );
    // Where the operator looks, and where its Lease lives, as the code will see it.
    assert_eq!(
        r.operator_flag("namespace").as_deref(),
        watch,
        "{what}: --namespace"
    );
    assert_eq!(
        r.operator_flag("proxy-namespace").as_deref(),
        Some(r.namespace.as_str()),
        "{what}: --proxy-namespace"
    );
    let pod_ns_env = r.operator_container()["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == "POD_NAMESPACE"))
        .map(|v| v["valueFrom"]["fieldRef"]["fieldPath"].clone());
    assert_eq!(
        pod_ns_env,
        Some(json!("metadata.namespace")),
        "{what}: the Lease namespace (POD_NAMESPACE) must be the pod's own"
    );
    let lease = r
        .operator_flag("lease-name")
        .unwrap_or_else(|| panic!("{what}: no --lease-name"));

    let have = r.grants_of(&sa);
    let want = needed(watch, &r.namespace, &lease);
    let extra: BTreeSet<Grant> = have.difference(&want).cloned().collect();
    let missing: BTreeSet<Grant> = want.difference(&have).cloned().collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{what}: the operator's RBAC differs from what it calls.\nGranted but not called:\n{}\n\
         Called but not granted:\n{}\nGranted:\n{}",
        show(&extra),
        show(&missing),
        show(&have)
    );

    // Nothing else in the chart holds or hands out permissions.
    for kind in ["Role", "ClusterRole"] {
        for role in r.of_kind(kind) {
            for rule in role["rules"].as_array().cloned().unwrap_or_default() {
                for key in ["apiGroups", "resources", "verbs", "resourceNames"] {
                    assert!(
                        !strs(&rule[key]).iter().any(|x| x.contains('*')),
                        "{what}: {kind} {} has a wildcard in {key}: {rule}",
                        Rendered::name(role)
                    );
                }
                assert!(
                    !strs(&rule["resources"])
                        .iter()
                        .any(|x| x == "secrets" || x.starts_with("secrets/")),
                    "{what}: {kind} {} grants Secret access (the token is mounted, not read \
                     through the API): {rule}",
                    Rendered::name(role)
                );
            }
        }
    }
    let roles = r.of_kind("Role").count() + r.of_kind("ClusterRole").count();
    let mut bound = 0;
    for kind in ["RoleBinding", "ClusterRoleBinding"] {
        for b in r.of_kind(kind) {
            bound += 1;
            let subjects = b["subjects"].as_array().cloned().unwrap_or_default();
            assert_eq!(
                subjects,
                vec![json!({"kind": "ServiceAccount", "name": sa, "namespace": r.namespace})],
                "{what}: {kind} {} binds something other than the operator",
                Rendered::name(b)
            );
        }
    }
    assert_eq!(
        roles, bound,
        "{what}: every Role/ClusterRole of the chart is bound once, to the operator"
    );
    // The proxies talk to no API: their pods run without a ServiceAccount token.
    for kind in ["Deployment", "DaemonSet"] {
        for d in r.of_kind(kind) {
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == "proxy" {
                let spec = &d["spec"]["template"]["spec"];
                assert_eq!(
                    spec["automountServiceAccountToken"],
                    json!(false),
                    "{what}: the proxy {kind} mounts a ServiceAccount token"
                );
                assert_ne!(spec["serviceAccountName"], json!(sa), "{what}");
            }
        }
    }
    have
}

#[test]
fn chart_rbac_is_exactly_what_the_operator_calls() {
    // (release, namespace, --set, watched namespace)
    let modes: [(&str, &str, &[&str], Option<&str>); 5] = [
        ("mrcp-lb", "mrcp-system", &[], None),
        (
            "mrcp-lb",
            "mrcp-system",
            &["operator.watchNamespace=speech"],
            Some("speech"),
        ),
        (
            "lb",
            "speech",
            &["operator.watchNamespace=speech"],
            Some("speech"),
        ),
        (
            "edge",
            "sip",
            &[
                "proxy.kind=DaemonSet",
                "proxy.hostNetwork=true",
                "operator.watchNamespace=speech",
            ],
            Some("speech"),
        ),
        (
            "mrcp-lb",
            "mrcp-system",
            &[
                "fullnameOverride=voice",
                "operator.replicas=2",
                "adminToken.existingSecret=voice-token",
            ],
            None,
        ),
    ];
    for (release, ns, set, watch) in modes {
        let r = helm_template(release, ns, set);
        let grants = check_rendering(&r, watch);
        eprintln!(
            "[rbac] {release} in {ns} --set {set:?}: {} grants\n{}",
            grants.len(),
            show(&grants)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Against a real API server

/// One cluster test at a time: a cluster-wide operator sees every namespace.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Addresses of one cluster test, all in 127.0.5.0/24.
struct Addrs {
    /// The operator (metrics) and the first proxy (its pod IP).
    proxy: &'static str,
    /// A proxy configured with another admin token.
    other_proxy: &'static str,
    /// IPs of the two MRCP server pods.
    pods: [&'static str; 2],
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("create private file");
    std::io::Write::write_all(&mut f, text.as_bytes()).expect("write private file");
}

/// A kubeconfig for the same API server that authenticates with `token` only.
fn token_kubeconfig(cp_kubeconfig: &Path, token: &str, path: &Path) {
    let admin: Value =
        serde_yaml_ng::from_str(&fs::read_to_string(cp_kubeconfig).expect("read kubeconfig"))
            .expect("kubeconfig YAML");
    let cluster = admin["clusters"][0]["cluster"].clone();
    assert!(cluster["server"].is_string(), "{admin}");
    let kc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": "operator"}}],
        "current-context": "operator",
    });
    write_private(path, &serde_json::to_string_pretty(&kc).unwrap());
}

/// lb-proxy with the admin token from `LB_PROXY_ADMIN_TOKEN` (as the chart passes it) and the
/// admin API on `ip:admin_port`, logging at debug level.
async fn start_proxy(
    env: &TestEnv,
    name: &str,
    ip: &str,
    admin_port: u16,
    token: &str,
) -> (ChildGuard, PathBuf) {
    let dir = env.subdir(name);
    let config = format!(
        "listeners:\n  - udp:{ip}:5060\n  - tcp:{ip}:5060\n\
         admin:\n  listen: {ip}:{admin_port}\n\
         routing:\n  group: 1\n  resources: [pstn]\n  mode: absolute\n"
    );
    let cfg = dir.join("config.yaml");
    fs::write(&cfg, &config).unwrap();
    let log = dir.join("proxy.log");
    let child = clean_env(&mut Command::new(lb_proxy_bin()))
        .env("NO_COLOR", "1")
        .env("LB_PROXY_ADMIN_TOKEN", token)
        .arg("--config")
        .arg(&cfg)
        .arg("--log-level")
        .arg("debug")
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("stdout.log")).unwrap())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn lb-proxy");
    env.register_log(name, &log);
    let mut guard = ChildGuard::new(name, child);
    let url = format!("http://{ip}:{admin_port}/healthz");
    let deadline = Instant::now() + 15 * SEC;
    loop {
        if let Some(st) = guard.try_wait() {
            panic!("{name} exited with {st}:\n{}", tail(&log, 30));
        }
        if env
            .http
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        assert!(Instant::now() < deadline, "{name}: {url} did not answer");
        tokio::time::sleep(POLL).await;
    }
    (guard, log)
}

/// A pod as the MRCP servers' (or the proxies') StatefulSet would make it, already Running
/// and Ready with `ip` (there is no kubelet).
async fn ready_pod(
    client: &kube::Client,
    ns: &str,
    name: &str,
    labels: Value,
    annotations: Value,
    ip: &str,
) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{"name": "c", "image": "test:0"}],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {ns}/{name}: {e}"));
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "ContainersReady", "status": "True"},
        ],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("status of pod {ns}/{name}: {e}"));
}

async fn create_namespace(client: &kube::Client, ns: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.to_string());
    namespaces
        .create(&PostParams::default(), &n)
        .await
        .unwrap_or_else(|e| panic!("create namespace {ns}: {e}"));
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("default".into());
    sas.create(&PostParams::default(), &sa)
        .await
        .unwrap_or_else(|e| panic!("create serviceaccount {ns}/default: {e}"));
}

/// One request of the audit log, as far as RBAC sees it.
#[derive(Debug)]
struct Audited {
    verb: String,
    group: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    code: Option<i64>,
    decision: String,
    uri: String,
}

impl Audited {
    fn matches(&self, g: &Grant) -> bool {
        self.verb == g.verb
            && self.group == g.group
            && self.resource == g.resource
            && (g.scope.is_none() || g.scope == self.namespace)
            && (g.names.is_empty() || self.name.as_ref().is_some_and(|n| g.names.contains(n)))
    }
}

fn audit_of(cp_dir: &Path, user: &str) -> Vec<Audited> {
    let text = fs::read_to_string(cp_dir.join("audit.log")).expect(
        "the control plane's audit.log (tests/k8s/control-plane.sh writes it for \
         ServiceAccount requests)",
    );
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["user"]["username"] == user)
        .filter(|e| e["stage"] == "ResponseComplete" || e["stage"] == "ResponseStarted")
        .map(|e| {
            let o = &e["objectRef"];
            let mut resource = o["resource"].as_str().unwrap_or("").to_string();
            if let Some(sub) = o["subresource"].as_str() {
                resource = format!("{resource}/{sub}");
            }
            Audited {
                verb: e["verb"].as_str().unwrap_or("").to_string(),
                group: o["apiGroup"].as_str().unwrap_or("").to_string(),
                resource,
                namespace: o["namespace"].as_str().map(str::to_string),
                name: o["name"].as_str().map(str::to_string),
                code: e["responseStatus"]["code"].as_i64(),
                decision: e["annotations"]["authorization.k8s.io/decision"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                uri: e["requestURI"].as_str().unwrap_or("").to_string(),
            }
        })
        .collect()
}

/// Everything the operator does, as the chart's ServiceAccount: `watch` is the chart's
/// `operator.watchNamespace` (None: cluster-wide, the MRCP servers then in `app_ns`).
async fn run_as_the_charts_serviceaccount(
    test: &str,
    ip: &str,
    watch: Option<&str>,
    app_ns: &str,
    addrs: Addrs,
) {
    let cp = control_plane(); // Kept up while the other cluster test waits.
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = TestEnv::new_at(test, ip).await;
    let release = env.ns.clone();
    let client = env.client.clone();
    create_namespace(&client, app_ns).await;

    // The chart, rendered for this release; its RBAC objects applied as helm would.
    let mut set = vec![];
    let watch_set = watch.map(|w| format!("operator.watchNamespace={w}"));
    if let Some(s) = &watch_set {
        set.push(s.as_str());
    }
    let name = test.to_string();
    let r = helm_template(&name, &release, &set);
    let grants = check_rendering(&r, watch);
    let list = json!({"apiVersion": "v1", "kind": "List", "items": r.rbac_objects()});
    let rbac_file = env.dir.join("rbac.json");
    fs::write(&rbac_file, serde_json::to_string_pretty(&list).unwrap()).unwrap();
    env.kubectl(&["apply", "-f", rbac_file.to_str().unwrap()]);
    let sa = r.operator_sa();
    let user = format!("system:serviceaccount:{release}:{sa}");

    // Its token, from the TokenRequest API: what the kubelet would mount.
    let sa_token = env
        .kubectl(&["-n", &release, "create", "token", &sa, "--duration=1h"])
        .trim()
        .to_string();
    assert!(sa_token.len() > 100, "a JWT: {sa_token:?}");
    let op_dir = env.subdir("operator");
    let kubeconfig = op_dir.join("kubeconfig");
    token_kubeconfig(&cp.kubeconfig, &sa_token, &kubeconfig);
    // The admin token the chart's Secret would hold; another one for a proxy that must refuse.
    let admin_token = format!("adm-{:032x}", rand::random::<u128>());
    let other_token = format!("oth-{:032x}", rand::random::<u128>());
    let token_file = op_dir.join("token");
    write_private(&token_file, &admin_token);

    // The proxies, and their pods labelled as the chart labels them.
    let admin_port: u16 = r
        .operator_flag("proxy-admin-port")
        .expect("--proxy-admin-port")
        .parse()
        .unwrap();
    let (_p1, p1_log) = start_proxy(&env, "proxy", addrs.proxy, admin_port, &admin_token).await;
    let (_p2, p2_log) = start_proxy(
        &env,
        "proxy-other",
        addrs.other_proxy,
        admin_port,
        &other_token,
    )
    .await;
    let selector = r.operator_flag("proxy-selector").expect("--proxy-selector");
    let labels: serde_json::Map<String, Value> = selector
        .split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("k=v selector");
            (k.to_string(), json!(v))
        })
        .collect();
    ready_pod(
        &client,
        &release,
        "proxy-0",
        Value::Object(labels.clone()),
        json!({}),
        addrs.proxy,
    )
    .await;
    ready_pod(
        &client,
        &release,
        "proxy-1",
        Value::Object(labels),
        json!({}),
        addrs.other_proxy,
    )
    .await;

    // The operator with the Deployment's args; only the token path, the listen address and
    // the log level (debug, everything) differ.
    let identity = format!("{name}-operator-0");
    let listen = format!("{}:8090", addrs.proxy);
    let args: Vec<String> = r
        .operator_args()
        .into_iter()
        .map(|a| {
            if a.starts_with("--token-file=") {
                format!("--token-file={}", token_file.display())
            } else if a.starts_with("--listen=") {
                format!("--listen={listen}")
            } else if a.starts_with("--log-level=") {
                "--log-level=debug".to_string()
            } else {
                a
            }
        })
        .collect();
    let op_log = op_dir.join("operator.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lb-operator"));
    clean_env(&mut cmd);
    for v in OPERATOR_VARS {
        cmd.env_remove(v);
    }
    cmd.env("KUBECONFIG", &kubeconfig)
        .env_remove("RUST_LOG")
        .env("POD_NAME", &identity)
        .env("POD_NAMESPACE", &release)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&op_log).unwrap())
        .stderr(fs::File::options().append(true).open(&op_log).unwrap());
    fs::write(op_dir.join("command.txt"), format!("{args:?}\n")).unwrap();
    let mut op = ChildGuard::new("operator", cmd.spawn().expect("spawn lb-operator"));
    env.register_log("operator", &op_log);
    let metrics_url = format!("http://{listen}/metrics");
    let ready_url = format!("http://{listen}/readyz");
    eventually(
        "the operator's caches to sync",
        20 * SEC,
        POLL,
        async || {
            if let Some(st) = op.try_wait() {
                panic!("the operator exited with {st}:\n{}", tail(&op_log, 40));
            }
            let code = env.http.get(&ready_url).send().await;
            match code {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("/readyz {}", r.status())),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;

    // An MrcpServer and its pods: one good annotation, one bad.
    let servers: Api<MrcpServer> = Api::namespaced(client.clone(), app_ns);
    let server: MrcpServer = serde_json::from_value(json!({
        "apiVersion": "mrcp-lb.io/v1alpha1",
        "kind": "MrcpServer",
        "metadata": {"name": "asr"},
        "spec": {"selector": {"matchLabels": {"app": "unimrcp"}}, "defaultResources": "pstn=70",
                 "probeMode": 0},
    }))
    .unwrap();
    servers
        .create(&PostParams::default(), &server)
        .await
        .expect("create MrcpServer");
    let app = json!({"app": "unimrcp"});
    ready_pod(
        &client,
        app_ns,
        "mrcp-0",
        app.clone(),
        json!({PSTN_CAPACITY: "40"}),
        addrs.pods[0],
    )
    .await;
    ready_pod(
        &client,
        app_ns,
        "mrcp-1",
        app,
        json!({PSTN_CAPACITY: "lots"}),
        addrs.pods[1],
    )
    .await;

    // Pushed, with the token, to the proxy discovered by its pod's labels.
    let uris: Vec<String> = addrs
        .pods
        .iter()
        .map(|ip| format!("sip:{ip}:8060"))
        .collect();
    let dest_url = format!("http://{}:{admin_port}/v1/destinations", addrs.proxy);
    eventually("both pods in the proxy's set", 20 * SEC, POLL, async || {
        let body: Value = env
            .http
            .get(&dest_url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let have: BTreeSet<String> = body["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["uri"].as_str().map(str::to_string))
            .collect();
        uris.iter()
            .all(|u| have.contains(u))
            .then_some(())
            .ok_or(format!("{body}"))
    })
    .await;
    // The proxy with another token refused every push.
    let other_url = format!("http://{}:{admin_port}/v1/destinations", addrs.other_proxy);
    let other: Value = env
        .http
        .get(&other_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        other["destinations"].as_array().map(Vec::len),
        Some(0),
        "a proxy with another token took a push: {other}"
    );

    // Status written (server-side apply on the status subresource).
    eventually("the MrcpServer's status", 10 * SEC, POLL, async || {
        let s = servers.get("asr").await.map_err(|e| e.to_string())?;
        let st = s.status.ok_or("no status")?;
        (st.destinations.len() == 2 && st.conditions.iter().any(|c| c.type_ == "Ready"))
            .then_some(())
            .ok_or(format!("{st:?}"))
    })
    .await;

    // A Warning event for the bad annotation; a second bad value repeats it as a series
    // (a PATCH of the same Event).
    let events: Api<Event> = Api::namespaced(client.clone(), app_ns);
    let find_event = async || -> Result<Event, String> {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let ours: Vec<&Event> = list
            .items
            .iter()
            .filter(|e| {
                e.reason.as_deref() == Some("InvalidCapacityAnnotation")
                    && e.regarding
                        .as_ref()
                        .is_some_and(|r| r.name.as_deref() == Some("mrcp-1"))
            })
            .collect();
        match ours.as_slice() {
            [e] => Ok((*e).clone()),
            other => Err(format!("{} events for mrcp-1", other.len())),
        }
    };
    let first = eventually("a Warning event for mrcp-1", 10 * SEC, POLL, async || {
        find_event().await
    })
    .await;
    assert_eq!(first.type_.as_deref(), Some("Warning"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), app_ns);
    pods.patch(
        "mrcp-1",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"annotations": {PSTN_CAPACITY: "many"}}})),
    )
    .await
    .unwrap();
    eventually(
        "the event repeated as a series",
        10 * SEC,
        POLL,
        async || {
            let e = find_event().await?;
            (e.metadata.name == first.metadata.name
                && e.series.as_ref().is_some_and(|s| s.count >= 2))
            .then_some(())
            .ok_or(format!("{:?} series {:?}", e.metadata.name, e.series))
        },
    )
    .await;

    // The Lease: created, held by this replica, renewed.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &release);
    let lease_name = r.operator_flag("lease-name").unwrap();
    let renew_of = async || -> Result<String, String> {
        let l = leases.get(&lease_name).await.map_err(|e| e.to_string())?;
        let spec = l.spec.unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(identity.as_str()) {
            return Err(format!("holder {:?}", spec.holder_identity));
        }
        spec.renew_time
            .map(|t| format!("{:?}", t.0))
            .ok_or("no renewTime".to_string())
    };
    let t1 = eventually(
        "the Lease held by the operator",
        10 * SEC,
        POLL,
        async || renew_of().await,
    )
    .await;
    eventually("the Lease renewed", 10 * SEC, POLL, async || {
        let t = renew_of().await?;
        (t != t1).then_some(()).ok_or(t)
    })
    .await;

    // No API error counted.
    let m = env
        .http
        .get(&metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for kind in ["status", "event"] {
        let v = metric_value(
            &m,
            &format!("mrcp_lb_operator_errors_total{{kind=\"{kind}\"}}"),
        );
        assert!(v.unwrap_or(0.0) == 0.0, "{kind} errors: {v:?}");
    }

    // A clean stop releases the Lease (one more PUT).
    op.signal("TERM");
    let st = op.wait_exit(10 * SEC).await;
    assert!(
        st.is_some_and(|s| s.success()),
        "the operator did not stop cleanly: {st:?}\n{}",
        tail(&op_log, 20)
    );
    let l = leases.get(&lease_name).await.unwrap();
    assert_eq!(
        l.spec.and_then(|s| s.holder_identity),
        None,
        "the Lease was not released"
    );

    // The audit log: every request allowed, every rule used.
    let audited = audit_of(&cp.dir, &user);
    assert!(!audited.is_empty(), "no audited request from {user}");
    let refused: Vec<String> = audited
        .iter()
        .filter(|a| a.decision != "allow" || a.code == Some(403))
        .map(|a| format!("{} {} ({:?}, {})", a.verb, a.uri, a.code, a.decision))
        .collect();
    assert!(
        refused.is_empty(),
        "requests refused to {user}:\n{}",
        refused.join("\n")
    );
    let unmatched: Vec<String> = audited
        .iter()
        .filter(|a| !grants.iter().any(|g| a.matches(g)))
        .map(|a| format!("{a:?}"))
        .collect();
    assert!(
        unmatched.is_empty(),
        "requests no rule of the chart covers (yet allowed?):\n{}",
        unmatched.join("\n")
    );
    let unused: BTreeSet<Grant> = grants
        .iter()
        .filter(|g| !audited.iter().any(|a| a.matches(g)))
        .cloned()
        .collect();
    assert!(
        unused.is_empty(),
        "granted but never used by the operator:\n{}",
        show(&unused)
    );
    let mut used: BTreeSet<(String, String, String)> = BTreeSet::new();
    for a in &audited {
        used.insert((a.verb.clone(), a.group.clone(), a.resource.clone()));
    }
    eprintln!(
        "[rbac] {test}: {} requests as {user}, all allowed; every one of the {} grants used: \
         {used:?}",
        audited.len(),
        grants.len()
    );

    // No secret in any log: not the admin token (operator, both proxies), not the
    // ServiceAccount token (operator).
    let logs = [
        ("operator", &op_log),
        ("proxy", &p1_log),
        ("proxy-other", &p2_log),
    ];
    let jwt_signature = sa_token.rsplit('.').next().unwrap();
    for (what, path) in logs {
        let text = fs::read_to_string(path).unwrap();
        assert!(
            text.contains("listening on") || text.contains("caches synced"),
            "{what}: not the log of a process that started ({})",
            path.display()
        );
        assert!(
            !text.contains(&admin_token),
            "the admin token is in the {what} log {}",
            path.display()
        );
        assert!(
            !text.contains(&other_token),
            "proxy-other's token is in the {what} log {}",
            path.display()
        );
        assert!(
            !text.contains(jwt_signature),
            "the ServiceAccount token is in the {what} log {}",
            path.display()
        );
    }
    let op_text = fs::read_to_string(&op_log).unwrap();
    assert!(
        op_text.contains("rejected with 401"),
        "the operator did not log the refused pushes (so the failure path was not checked):\n{}",
        tail(&op_log, 20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reconciles_as_the_charts_serviceaccount_cluster_wide() {
    run_as_the_charts_serviceaccount(
        "rbac-cluster",
        "127.0.5.1",
        None,
        "it-rbac-cluster-app",
        Addrs {
            proxy: "127.0.5.1",
            other_proxy: "127.0.5.2",
            pods: ["127.0.5.11", "127.0.5.12"],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reconciles_as_the_charts_serviceaccount_in_one_namespace() {
    run_as_the_charts_serviceaccount(
        "rbac-ns",
        "127.0.5.21",
        Some("it-rbac-ns-speech"),
        "it-rbac-ns-speech",
        Addrs {
            proxy: "127.0.5.21",
            other_proxy: "127.0.5.22",
            pods: ["127.0.5.31", "127.0.5.32"],
        },
    )
    .await;
}
