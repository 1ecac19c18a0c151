//! Harness for the operator's tests against a real control plane (etcd + kube-apiserver from
//! `tests/k8s/`, no fake API server), real `lb-proxy` processes and sipp.
//!
//! - One control plane serves every test of the binary: the first test that needs it starts it
//!   (`tests/k8s/control-plane.sh start`), applies `crds/mrcpserver.yaml` and waits for the CRD
//!   to be Established; the last test that holds it stops it by PID when it drops (panics
//!   included). A watchdog shell stops it too if the test process dies without unwinding. A test
//!   that takes the control plane down (`ControlPlane::outage`) lives in a binary of its own.
//! - Each test has its own namespace (`it-<name>`), runs its operators with `--namespace`, and
//!   takes its own loopback addresses: proxies, operators and sipp clients on `127.0.4.T`
//!   (T = 1..=14: 1 to 11, 13 and 14 in `k8s_operator.rs`, 12 in `k8s_outage.rs`; a second
//!   address `127.0.4.(100 + T)` when a test needs two), pod IPs in `127.0.3.0/24` (see
//!   `TestEnv::pod_ip`); tests in other files use `TestEnv::new_at` with addresses of their
//!   own (`rbac.rs`: `127.0.5.0/24`). Nothing is sent outside loopback: the pod IPs the
//!   proxies receive (and may probe) are 127.x, and every process is started with the proxy
//!   environment variables removed.
//! - There is no kubelet: pods stay Pending until a test writes their status (IP, phase,
//!   Ready condition) through the `status` subresource.
//! - Every process is a child held by a guard that kills it by PID on drop. A test's files
//!   (configs, logs, sipp statistics) live in `target/tmp/lb-operator-k8s/<test>-<pid>-<ms>/`;
//!   on a failure they are kept and the logs' tails printed.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use lb_api::admin::{DestinationStatus, DestinationsStatus};
use lb_operator::crd::MrcpServer;
// What the operator's tests use from the shared support crate (each test binary a part).
#[allow(unused_imports)]
pub use mrcp_lb_test_support::{
    clean_env, eventually, keep_requested, mark_failed, metric_value, millis, ms, read_lossy, repo,
    some_test_failed, strip_ansi, tail, AdminClient, ChildGuard, Show, Sipp, SippBuilder,
};
use serde_json::{json, Value};
use std::fs;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Environment variables the operator reads its flags from: removed so that only the test's
/// flags count.
pub const OPERATOR_VARS: [&str; 16] = [
    "LB_OPERATOR_NAMESPACE",
    "LB_OPERATOR_POD_SELECTOR",
    "LB_OPERATOR_CLASS",
    "LB_OPERATOR_PROXY_SELECTOR",
    "LB_OPERATOR_PROXY_NAMESPACE",
    "LB_OPERATOR_PROXY_ADMIN_PORT",
    "LB_OPERATOR_PROXY_URLS",
    "LB_OPERATOR_PROXY_CLUSTER_PORT",
    "LB_OPERATOR_TOKEN_FILE",
    "LB_OPERATOR_LISTEN",
    "LB_OPERATOR_RESYNC_SECONDS",
    "LB_OPERATOR_LEASE_NAME",
    "LB_OPERATOR_LOAD_INTERVAL_SECONDS",
    "POD_NAMESPACE",
    "POD_NAME",
    "LB_OPERATOR_LOG_LEVEL",
];

/// Keep shared folders (the control plane's): a test failed, or `KEEP_TEST_FILES=1`.
fn keep_files() -> bool {
    some_test_failed() || keep_requested()
}

// ---------------------------------------------------------------------------------------------
// Control plane

/// Path of a binary that `tests/k8s/build.sh` caches (it may not exist).
pub fn k8s_bin(name: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"source "$1/tests/k8s/lib.sh" && k8s_bin "$2""#)
        .arg("k8s_bin")
        .arg(repo())
        .arg(name)
        .stdin(Stdio::null())
        .output()
        .expect("run bash to source tests/k8s/lib.sh");
    assert!(
        out.status.success(),
        "cannot locate {name} with tests/k8s/lib.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// etcd + kube-apiserver on 127.0.0.1, with the MrcpServer CRD applied.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    watchdog: Option<ChildGuard>,
}

impl ControlPlane {
    fn start() -> ControlPlane {
        let mut missing = Vec::new();
        for b in ["etcd", "kube-apiserver", "kubectl"] {
            let p = k8s_bin(b);
            if !p.is_file() {
                missing.push(p.display().to_string());
            }
        }
        assert!(
            missing.is_empty(),
            "the control-plane binaries are missing ({}): run `make k8s` (tests/k8s/build.sh) \
             to build them; these tests need a real kube-apiserver and are not skipped",
            missing.join(", ")
        );
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("lb-operator-k8s")
            .join(format!("control-plane-{}-{}", std::process::id(), millis()));
        fs::create_dir_all(&dir).expect("create control-plane dir");
        let script = repo().join("tests/k8s/control-plane.sh");
        let t0 = Instant::now();
        let out = clean_env(&mut Command::new(&script))
            .arg("start")
            .arg(&dir)
            .env_remove("APISERVER_PORT")
            .env_remove("ETCD_PORT")
            .stdin(Stdio::null())
            .output()
            .expect("run tests/k8s/control-plane.sh");
        // Whatever happened, the watchdog stops what was started if this process dies.
        let watchdog = clean_env(&mut Command::new("sh"))
            .arg("-c")
            .arg(r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done; exec "$2" stop "$3""#)
            .arg("lb-operator-test-watchdog")
            .arg(std::process::id().to_string())
            .arg(&script)
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("watchdog.log")).expect("watchdog log"))
            .stderr(Stdio::from(
                fs::File::options()
                    .append(true)
                    .open(dir.join("watchdog.log"))
                    .expect("watchdog log"),
            ))
            .spawn()
            .expect("spawn watchdog");
        let cp = ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            kubectl: k8s_bin("kubectl"),
            dir,
            watchdog: Some(ChildGuard::new("watchdog", watchdog)),
        };
        if !out.status.success() {
            mark_failed();
            panic!(
                "tests/k8s/control-plane.sh start {} failed ({}):\n{}{}",
                cp.dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        eprintln!(
            "[k8s] control plane up in {:.1?} ({})",
            t0.elapsed(),
            cp.dir.display()
        );
        cp.kubectl_ok(&[
            "apply",
            "-f",
            repo().join("crds/mrcpserver.yaml").to_str().unwrap(),
        ]);
        cp.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/mrcpservers.mrcp-lb.io",
        ]);
        cp
    }

    /// Runs kubectl against this control plane; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        let out = clean_env(&mut Command::new(&self.kubectl))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs kubectl and panics unless it succeeds; returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.kubectl(args);
        assert!(ok, "kubectl {args:?} failed:\n{out}{err}");
        out
    }

    /// An outage: kube-apiserver killed (SIGKILL, by the PID control-plane.sh recorded), then
    /// etcd stopped. Every client of this control plane sees it gone, so only a test binary of
    /// its own may do this. `start_again` ends it.
    pub fn outage(&self) {
        let pidfile = self.dir.join("kube-apiserver.pid");
        if let Some(pid) = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        self.stop();
    }

    /// Starts etcd and kube-apiserver again in the same folder (same ports, certificates and
    /// data: every object is still there); returns once the API server is ready.
    pub fn start_again(&self) {
        let out = clean_env(&mut Command::new(repo().join("tests/k8s/control-plane.sh")))
            .arg("start")
            .arg(&self.dir)
            .env_remove("APISERVER_PORT")
            .env_remove("ETCD_PORT")
            .stdin(Stdio::null())
            .output()
            .expect("run tests/k8s/control-plane.sh");
        assert!(
            out.status.success(),
            "tests/k8s/control-plane.sh start {} (again) failed ({}):\n{}{}",
            self.dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops etcd and kube-apiserver by the PIDs control-plane.sh recorded: TERM, then KILL
    /// after 10 s.
    fn stop(&self) {
        for c in ["kube-apiserver", "etcd"] {
            let pidfile = self.dir.join(format!("{c}.pid"));
            let Some(pid) = fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            else {
                continue;
            };
            let runs_it = || {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .ok()
                    .and_then(|b| {
                        b.split(|&x| x == 0)
                            .next()
                            .map(|a| String::from_utf8_lossy(a).ends_with(c))
                    })
                    .unwrap_or(false)
            };
            if runs_it() {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status();
                let deadline = Instant::now() + Duration::from_secs(10);
                while runs_it() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                if runs_it() {
                    let _ = Command::new("kill")
                        .arg("-KILL")
                        .arg(pid.to_string())
                        .status();
                }
            }
            let _ = fs::remove_file(&pidfile);
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The watchdog first, so it does not stop the control plane a second time.
        if let Some(mut w) = self.watchdog.take() {
            w.kill();
        }
        self.stop();
        if keep_files() {
            // The logs stay; etcd's data (tens of MB) only on request.
            if !keep_requested() {
                let _ = fs::remove_dir_all(self.dir.join("etcd-data"));
            }
            eprintln!(
                "[k8s] control plane stopped; files in {}",
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

static CONTROL_PLANE: Mutex<Weak<ControlPlane>> = Mutex::new(Weak::new());

/// The shared control plane, started on first use; it stops when the last holder drops it.
pub fn control_plane() -> Arc<ControlPlane> {
    let mut g = CONTROL_PLANE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cp) = g.upgrade() {
        return cp;
    }
    let cp = Arc::new(ControlPlane::start());
    *g = Arc::downgrade(&cp);
    cp
}

// ---------------------------------------------------------------------------------------------
// Binaries

/// `lb-proxy`, built once per test binary with `cargo build -p lb-proxy --bin lb-proxy` into
/// the same target folder and profile as this test.
pub fn lb_proxy_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let operator = Path::new(env!("CARGO_BIN_EXE_lb-operator"));
        let profile_dir = operator.parent().expect("profile dir");
        let target_dir = profile_dir.parent().expect("target dir");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo())
            .args(["build", "-p", "lb-proxy", "--bin", "lb-proxy"])
            .env("CARGO_TARGET_DIR", target_dir)
            .stdin(Stdio::null());
        if profile != "debug" {
            cmd.args(["--profile", profile]);
        }
        let t0 = Instant::now();
        let out = cmd
            .output()
            .map_err(|e| format!("run cargo build -p lb-proxy: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo build -p lb-proxy failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let bin = profile_dir.join("lb-proxy");
        if !bin.is_file() {
            return Err(format!("{} missing after cargo build", bin.display()));
        }
        eprintln!("[k8s] lb-proxy built in {:.1?}", t0.elapsed());
        Ok(bin)
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// Test environment

/// One test: its namespace, loopback addresses, folder (the shared `TestEnv`, which keeps it
/// and prints the registered logs when the test fails), and API client.
pub struct TestEnv {
    /// Name, address (127.0.4.<index> or the one given to `new_at`: proxies, operators and
    /// sipp clients), folder, logs, sipp ports.
    pub base: mrcp_lb_test_support::TestEnv,
    pub index: u8,
    pub ns: String,
    pub cp: Arc<ControlPlane>,
    pub client: kube::Client,
    pub http: reqwest::Client,
}

impl Deref for TestEnv {
    type Target = mrcp_lb_test_support::TestEnv;
    fn deref(&self) -> &Self::Target {
        &self.base
    }
}

impl TestEnv {
    /// Creates the namespace `it-<name>` (with its default ServiceAccount: no controller
    /// manager makes it) on the shared control plane.
    pub async fn new(name: &str, index: u8) -> TestEnv {
        assert!((1..=15).contains(&index), "test index 1..=15");
        TestEnv::create(name, index, format!("127.0.4.{index}")).await
    }

    /// As `new`, for tests outside `k8s_operator.rs` that bring their own loopback address
    /// (and so their own pod IPs: `pod_ip` is not available).
    pub async fn new_at(name: &str, ip: &str) -> TestEnv {
        TestEnv::create(name, 0, ip.to_string()).await
    }

    async fn create(name: &str, index: u8, ip: String) -> TestEnv {
        let base = mrcp_lb_test_support::TestEnv::new(
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("lb-operator-k8s"),
            name,
            &ip,
        );
        let cp = control_plane();
        let kc = kube::config::Kubeconfig::read_from(&cp.kubeconfig).expect("read kubeconfig");
        let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("kubeconfig");
        cfg.proxy_url = None;
        let client = kube::Client::try_from(cfg).expect("kube client");
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(3))
            .build()
            .expect("http client");
        let ns = format!("it-{name}");
        let env = TestEnv {
            base,
            index,
            ns: ns.clone(),
            cp,
            client,
            http,
        };
        let namespaces: Api<Namespace> = Api::all(env.client.clone());
        let mut n = Namespace::default();
        n.metadata.name = Some(ns.clone());
        namespaces
            .create(&PostParams::default(), &n)
            .await
            .unwrap_or_else(|e| panic!("create namespace {ns}: {e}"));
        let sas: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &ns);
        let mut sa = ServiceAccount::default();
        sa.metadata.name = Some("default".into());
        sas.create(&PostParams::default(), &sa)
            .await
            .unwrap_or_else(|e| panic!("create serviceaccount {ns}/default: {e}"));
        env
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        format!("{}:{port}", self.ip).parse().unwrap()
    }

    /// The IP of this test's pod number `k`: test 1 has 127.0.3.1 to .24; test T ≥ 2 has eight,
    /// 127.0.3.(24 + 8·(T − 2) + k) for k = 1..=8.
    pub fn pod_ip(&self, k: u8) -> String {
        assert!(
            self.index >= 1,
            "pod_ip: this TestEnv has no index (TestEnv::new_at)"
        );
        let (base, max) = match self.index {
            1 => (0, 24),
            t => (24 + 8 * (u16::from(t) - 2), 8),
        };
        assert!((1..=max).contains(&u16::from(k)), "pod number 1..={max}");
        format!("127.0.3.{}", base + u16::from(k))
    }

    /// A log printed if the test fails: the last 80 lines of an operator's, 30 of others'.
    pub fn register_log(&self, name: &str, path: &Path) {
        let lines = if name.starts_with("operator") { 80 } else { 30 };
        self.base.register_log(name, path, Show::Tail(lines));
    }

    // --- Kubernetes objects

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn servers(&self) -> Api<MrcpServer> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates an MrcpServer from a JSON spec.
    pub async fn create_server(&self, name: &str, spec: Value) -> MrcpServer {
        let obj: MrcpServer = serde_json::from_value(json!({
            "apiVersion": "mrcp-lb.io/v1alpha1",
            "kind": "MrcpServer",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("MrcpServer JSON");
        self.servers()
            .create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("create MrcpServer {name}: {e}"))
    }

    /// Creates a pod (Pending: there is no kubelet) with labels, annotations and, optionally,
    /// a finalizer that holds it while it terminates.
    pub async fn create_pod(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
        finalizer: bool,
    ) -> Pod {
        let map = |kv: &[(&str, &str)]| -> Value {
            kv.iter()
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let mut meta = json!({
            "name": name,
            "labels": map(labels),
            "annotations": map(annotations),
        });
        if finalizer {
            meta["finalizers"] = json!(["mrcp-lb.io/test-hold"]);
        }
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": {
                "automountServiceAccountToken": false,
                "containers": [{"name": "unimrcp", "image": "unimrcp-server:test"}],
            },
        }))
        .expect("pod JSON");
        self.pods()
            .create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("create pod {name}: {e}"))
    }

    /// Writes the pod's status as a kubelet would: Running, the IP, the Ready condition.
    pub async fn set_pod_status(&self, name: &str, ip: &str, ready: bool) -> Pod {
        let status = if ready { "True" } else { "False" };
        let patch = json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [
                {"type": "Ready", "status": status},
                {"type": "ContainersReady", "status": status},
            ],
        }});
        self.pods()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("patch status of pod {name}: {e}"))
    }

    pub async fn annotate_pod(&self, name: &str, key: &str, value: &str) -> Pod {
        let patch = json!({"metadata": {"annotations": {key: value}}});
        self.pods()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("annotate pod {name}: {e}"))
    }

    pub async fn delete_pod(&self, name: &str) {
        self.pods()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete pod {name}: {e}"));
    }

    pub async fn remove_finalizers(&self, name: &str) {
        let patch = json!({"metadata": {"finalizers": null}});
        self.pods()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("remove finalizers of pod {name}: {e}"));
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cp.kubectl(args);
        assert!(ok, "kubectl {args:?} failed:\n{out}{err}");
        out
    }

    // --- HTTP

    /// GET over plain HTTP; (status, body).
    pub async fn get(&self, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
        let resp = self
            .http
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
        let code = resp.status().as_u16();
        let body = resp
            .text()
            .await
            .map_err(|e| format!("GET http://{addr}{path} body: {e}"))?;
        Ok((code, body))
    }
}

// ---------------------------------------------------------------------------------------------
// lb-proxy

pub struct Proxy {
    pub name: String,
    pub guard: ChildGuard,
    pub sip: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    api: AdminClient,
}

impl Proxy {
    /// A sipp client calling this proxy from `port` on the test's address, 20 new calls a
    /// second; the test adds how many, how long each is held and when it gives up.
    pub fn uac<'e>(&self, env: &'e TestEnv, name: &str, port: u16) -> SippBuilder<'e> {
        Sipp::uac(env, name).port(port).to(self.sip).rate(20)
    }

    /// Starts lb-proxy with UDP+TCP listeners on `sip_port` and the admin API on `admin_port`
    /// (both on the test's IP) and no `destinations` key: it waits for a push. Returns once
    /// its admin API answers.
    pub async fn start(env: &TestEnv, name: &str, sip_port: u16, admin_port: u16) -> Proxy {
        Proxy::start_at(env, name, &env.ip, sip_port, admin_port).await
    }

    /// As `start`, on another loopback address than the test's.
    pub async fn start_at(
        env: &TestEnv,
        name: &str,
        ip: &str,
        sip_port: u16,
        admin_port: u16,
    ) -> Proxy {
        Proxy::start_with(env, name, ip, sip_port, admin_port, "").await
    }

    /// As `start_at`, with `extra` appended to the config file (top-level YAML keys).
    pub async fn start_with(
        env: &TestEnv,
        name: &str,
        ip: &str,
        sip_port: u16,
        admin_port: u16,
        extra: &str,
    ) -> Proxy {
        let listeners = format!("  - udp:{ip}:{sip_port}\n  - tcp:{ip}:{sip_port}\n");
        Proxy::start_with_listeners(env, name, ip, sip_port, admin_port, &listeners, extra).await
    }

    /// As `start_with`, with the `listeners` list written out (YAML items, e.g. one UDP
    /// listener per resource: `"  - {address: udp:IP:5062, resources: [speechsynth]}\n"`);
    /// `sip_port` is the port of the first, which `uac` calls.
    pub async fn start_with_listeners(
        env: &TestEnv,
        name: &str,
        ip: &str,
        sip_port: u16,
        admin_port: u16,
        listeners: &str,
        extra: &str,
    ) -> Proxy {
        Proxy::start_full(env, name, ip, sip_port, admin_port, listeners, "", extra).await
    }

    /// As `start_with`, with a token in `token_file` that every admin call but the probes and
    /// the drain wait needs (`admin.protectReads`).
    pub async fn start_protected(
        env: &TestEnv,
        name: &str,
        sip_port: u16,
        admin_port: u16,
        token_file: &Path,
        extra: &str,
    ) -> Proxy {
        let ip = &env.ip;
        let listeners = format!("  - udp:{ip}:{sip_port}\n  - tcp:{ip}:{sip_port}\n");
        let admin = format!(
            "  tokenFile: {}\n  protectReads: true\n",
            token_file.display()
        );
        Proxy::start_full(
            env, name, ip, sip_port, admin_port, &listeners, &admin, extra,
        )
        .await
    }

    /// Starts lb-proxy; `admin_extra` adds keys to its `admin` section.
    #[allow(clippy::too_many_arguments)]
    async fn start_full(
        env: &TestEnv,
        name: &str,
        ip: &str,
        sip_port: u16,
        admin_port: u16,
        listeners: &str,
        admin_extra: &str,
        extra: &str,
    ) -> Proxy {
        let bin = lb_proxy_bin();
        let dir = env.subdir(name);
        let sip: SocketAddr = format!("{ip}:{sip_port}").parse().unwrap();
        let admin: SocketAddr = format!("{ip}:{admin_port}").parse().unwrap();
        let config = format!(
            "listeners:\n{listeners}\
             admin:\n  listen: {admin}\n{admin_extra}\
             routing:\n  group: 1\n  resources: [pstn]\n  mode: absolute\n\
             timers:\n  inviteTimeout: 3s\n{extra}"
        );
        let cfg = dir.join("config.yaml");
        fs::write(&cfg, &config).expect("write proxy config");
        let log = dir.join("proxy.log");
        let child = clean_env(&mut Command::new(bin))
            .env("NO_COLOR", "1")
            .env_remove("LB_PROXY_ADMIN_TOKEN")
            .arg("--config")
            .arg(&cfg)
            .arg("--log-level")
            .arg("debug")
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("stdout.log")).expect("proxy stdout"))
            .stderr(fs::File::create(&log).expect("proxy log"))
            .spawn()
            .expect("spawn lb-proxy");
        env.register_log(name, &log);
        let mut p = Proxy {
            name: name.to_string(),
            guard: ChildGuard::new(name, child),
            sip,
            admin,
            log,
            api: AdminClient::new(name, admin),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = p.guard.try_wait() {
                panic!(
                    "{name} exited during startup with {st}; config:\n{config}\nlog:\n{}",
                    tail(&p.log, 40)
                );
            }
            if let Ok((200, _)) = p.get("/healthz").await {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: admin API at {admin} did not answer within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.admin)
    }

    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        self.api.get(path).await
    }

    pub async fn readyz(&self) -> u16 {
        self.get("/readyz")
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
            .0
    }

    pub async fn try_destinations(&self) -> Result<DestinationsStatus, String> {
        self.api.destinations().await
    }

    pub async fn destinations(&self) -> DestinationsStatus {
        self.try_destinations()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Capacity and load of one resource of a destination.
pub fn resource(d: &DestinationStatus, name: &str) -> Option<(u32, u32)> {
    d.resources
        .iter()
        .find(|r| r.name == name)
        .map(|r| (r.capacity, r.load))
}

/// The destinations of a set, for messages: id, uri, state, resources.
pub fn describe(set: &DestinationsStatus) -> String {
    let ds: Vec<String> = set
        .destinations
        .iter()
        .map(|d| {
            let rs: Vec<String> = d
                .resources
                .iter()
                .map(|r| format!("{}={}/{}", r.name, r.load, r.capacity))
                .collect();
            format!(
                "{} {} {} [{}]{}",
                d.id,
                d.uri,
                d.state.as_str(),
                rs.join(";"),
                if d.removed { " (removed)" } else { "" }
            )
        })
        .collect();
    format!("version {}: {{{}}}", set.version, ds.join(", "))
}

pub fn by_uri<'a>(set: &'a DestinationsStatus, uri: &str) -> Option<&'a DestinationStatus> {
    set.destinations.iter().find(|d| d.uri == uri)
}

// ---------------------------------------------------------------------------------------------
// lb-operator

pub struct Operator {
    pub name: String,
    pub guard: ChildGuard,
    pub listen: SocketAddr,
    pub log: PathBuf,
    api: AdminClient,
}

impl Operator {
    /// Starts lb-operator for the test's namespace with `--proxy-url` for each proxy,
    /// `--listen` on the test's IP, `--resync-seconds 2` and `extra` flags; returns once its
    /// /healthz answers.
    pub async fn start(
        env: &TestEnv,
        name: &str,
        port: u16,
        proxies: &[&Proxy],
        extra: &[&str],
    ) -> Operator {
        Operator::start_with_kubeconfig(env, name, port, proxies, extra, &env.cp.kubeconfig).await
    }

    pub async fn start_with_kubeconfig(
        env: &TestEnv,
        name: &str,
        port: u16,
        proxies: &[&Proxy],
        extra: &[&str],
        kubeconfig: &Path,
    ) -> Operator {
        let listen = env.addr(port);
        let dir = env.subdir("operators");
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lb-operator"));
        clean_env(&mut cmd);
        for v in OPERATOR_VARS {
            cmd.env_remove(v);
        }
        cmd.env("KUBECONFIG", kubeconfig)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .arg("--namespace")
            .arg(&env.ns)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--resync-seconds")
            .arg("2")
            .arg("--log-level")
            .arg("info,lb_operator=debug");
        for p in proxies {
            cmd.arg("--proxy-url").arg(p.url());
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::from(fs::File::create(&log).expect("operator log")))
            .stderr(Stdio::from(
                fs::File::options()
                    .append(true)
                    .open(&log)
                    .expect("operator log"),
            ));
        fs::write(
            dir.join(format!("{name}.command.txt")),
            format!("{cmd:?}\n"),
        )
        .unwrap();
        let child = cmd.spawn().expect("spawn lb-operator");
        env.register_log(&format!("operator {name}"), &log);
        let mut op = Operator {
            name: name.to_string(),
            guard: ChildGuard::new(name, child),
            listen,
            log,
            api: AdminClient::new(name, listen),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = op.guard.try_wait() {
                panic!(
                    "operator {name} exited during startup with {st}; log:\n{}",
                    tail(&op.log, 40)
                );
            }
            if let Ok((200, _)) = op.get("/healthz").await {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "operator {name}: /healthz at {listen} did not answer within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        op
    }

    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        self.api.get(path).await
    }

    pub async fn metrics(&self) -> Result<String, String> {
        self.api.metrics().await
    }

    /// The value of one series, e.g. `mrcp_lb_operator_leader` or
    /// `mrcp_lb_operator_pushes_total{result="ok"}`; None when absent.
    pub async fn metric(&self, series: &str) -> Result<Option<f64>, String> {
        Ok(metric_value(&self.metrics().await?, series))
    }

    pub fn log_text(&self) -> String {
        strip_ansi(&read_lossy(&self.log))
    }

    /// Lines of the log that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// sipp

// ---------------------------------------------------------------------------------------------
// Numbers

/// Nearest-rank percentile of durations (p in 0..=100).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    assert!(!sorted.is_empty());
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}
