//! Harness for the real-socket tests: the proxy binary and sipp (`sip-tester`) processes on
//! loopback addresses, the admin API over plain HTTP, sipp's statistics files.
//!
//! Each test takes its own loopback address (127.0.1.N) so the tests of a binary can run in
//! parallel: proxy on N:5060 (UDP and TCP), admin on N:8081, servers on N:5080 and N:5090,
//! clients on N:5070 (and N:5071 for a second one). sipp's control and media sockets get
//! per-process ports on the same address.
//!
//! IPv6 tests share the one IPv6 loopback address, `::1`: they put their sipp processes there
//! with `Sipp::server_at`/`Sipp::client_at` on ports no other test uses, keep the proxy's admin
//! API on their own 127.0.1.N, and start their `TestEnv` with `TestEnv::with_sipp_slots` so that
//! the media ports sipp binds on `::1` (20000 + 10 × slot) do not collide either.
//!
//! Every process is a child held by a guard that kills it (by its PID) and reaps it on drop,
//! panics included. A test's files (config, proxy log, sipp logs and statistics) live in
//! `target/tmp/<test>-<pid>-<ms>/`; they are kept, and the interesting ones printed, when the
//! test fails, and removed when it passes (unless `KEEP_TEST_FILES=1`). `SIPP_TRACE_MSG=1`
//! makes every sipp log the messages it sends and receives (`messages.log`).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const PROXY_PORT: u16 = 5060;
pub const ADMIN_PORT: u16 = 8081;
pub const CLIENT_PORT: u16 = 5070;
pub const CLIENT2_PORT: u16 = 5071;
pub const SERVER1_PORT: u16 = 5080;
pub const SERVER2_PORT: u16 = 5090;

/// The repository's `tests/sipp/` folder.
pub fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("tests")
        .join("sipp")
}

pub fn scenario(name: &str) -> PathBuf {
    let p = scenario_dir().join(name);
    assert!(p.is_file(), "no scenario {}", p.display());
    p
}

fn sipp_bin() -> String {
    std::env::var("SIPP").unwrap_or_else(|_| "sipp".to_string())
}

/// Polls `f` every `every` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(every);
    }
}

// ---------------------------------------------------------------------------------------------
// Test environment

/// One test's address and folder. Create it first in a test so it is dropped last: by then
/// every process guard has killed its process, and on a failure the logs are complete.
pub struct TestEnv {
    pub name: String,
    pub ip: String,
    pub dir: PathBuf,
    next_slot: AtomicU16,
}

impl TestEnv {
    pub fn new(name: &str, ip: &str) -> TestEnv {
        TestEnv::with_sipp_slots(name, ip, 0)
    }

    /// As `new`, numbering this test's sipp processes from `first_slot` (control port
    /// 8800 + slot, media ports 20000 + 10 × slot): for tests whose sipp processes share an
    /// address with another test's (`::1`).
    pub fn with_sipp_slots(name: &str, ip: &str, first_slot: u16) -> TestEnv {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "{name}-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis()
        ));
        fs::create_dir_all(&dir).expect("create test dir");
        TestEnv {
            name: name.to_string(),
            ip: ip.to_string(),
            dir,
            next_slot: AtomicU16::new(first_slot),
        }
    }

    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }

    pub fn proxy_target(&self) -> String {
        self.addr(PROXY_PORT)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.addr(ADMIN_PORT).parse().expect("admin address")
    }

    /// A private sub-folder for one process.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let d = self.dir.join(name);
        fs::create_dir_all(&d).expect("create process dir");
        d
    }

    /// sipp's control and media ports, unique per sipp process of this test.
    fn sipp_ports(&self) -> (u16, u16) {
        let k = self.next_slot.fetch_add(1, Ordering::SeqCst);
        (8800 + k, 20000 + 10 * k)
    }

    fn dump_logs(&self) {
        eprintln!(
            "\n===== {}: test failed; files kept in {} =====",
            self.name,
            self.dir.display()
        );
        let mut files = Vec::new();
        collect_files(&self.dir, &mut files);
        files.sort();
        for f in &files {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name == "proxy.log" {
                print_tail(f, 200);
            } else if name.ends_with("errors.log") {
                print_head(f, 60);
            }
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if thread::panicking() {
            self.dump_logs();
        } else if std::env::var_os("KEEP_TEST_FILES").is_some_and(|v| v != "0") {
            eprintln!("{}: files kept in {}", self.name, self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                collect_files(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The text without ANSI colour sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn print_tail(path: &Path, lines: usize) {
    let text = strip_ansi(&read_lossy(path));
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    eprintln!(
        "----- {} (last {} of {} lines) -----",
        path.display(),
        all.len() - from,
        all.len()
    );
    for l in &all[from..] {
        eprintln!("{l}");
    }
}

fn print_head(path: &Path, lines: usize) {
    let text = read_lossy(path);
    if text.trim().is_empty() {
        return;
    }
    let all: Vec<&str> = text.lines().collect();
    eprintln!(
        "----- {} (first {} of {} lines) -----",
        path.display(),
        all.len().min(lines),
        all.len()
    );
    for l in all.iter().take(lines) {
        eprintln!("{l}");
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process killed (SIGKILL, by PID) and reaped when dropped.
pub struct ChildGuard {
    pub name: String,
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(name: &str, child: Child) -> ChildGuard {
        ChildGuard {
            name: name.to_string(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    /// Waits for the process to end on its own; kills it and returns `None` after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                self.kill();
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal to this process only (by PID) with the `kill` utility.
    pub fn signal(&self, sig: &str) {
        if self.child.is_some() {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(self.pid().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Proxy

/// One destination of the proxy config; the test's sipp server for it listens on `port`.
#[derive(Clone, Debug)]
pub struct Dest {
    pub id: u32,
    pub port: u16,
    pub resources: String,
    pub tcp: bool,
}

impl Dest {
    pub fn udp(id: u32, port: u16, resources: &str) -> Dest {
        Dest {
            id,
            port,
            resources: resources.to_string(),
            tcp: false,
        }
    }
    pub fn tcp(id: u32, port: u16, resources: &str) -> Dest {
        Dest {
            tcp: true,
            ..Dest::udp(id, port, resources)
        }
    }
}

/// The proxy config for this test's address: UDP and TCP listeners on :5060, admin on :8081,
/// the given routing mode and destinations; `extra` is appended (top-level YAML sections such
/// as `dialogs:`).
pub fn config_yaml(env: &TestEnv, mode: &str, dests: &[Dest], extra: &str) -> String {
    let ip = &env.ip;
    let mut y = format!(
        "listeners:\n  - udp:{ip}:{PROXY_PORT}\n  - tcp:{ip}:{PROXY_PORT}\n\
         admin:\n  listen: {ip}:{ADMIN_PORT}\n\
         routing:\n  group: 1\n  resources: [pstn]\n  mode: {mode}\n  allowOverCapacity: false\n  \
         maxAttempts: 3\n  failoverCodes: [\"408\", \"5xx\"]\n  retryAfter: 5s\n\
         timers:\n  t1: 500ms\n  inviteTimeout: 3s\n  inviteFinalTimeout: 30s\n\
         destinations:\n"
    );
    for d in dests {
        let transport = if d.tcp { ";transport=tcp" } else { "" };
        writeln!(
            y,
            "  - id: {}\n    group: 1\n    uri: sip:{ip}:{}{transport}\n    resources: {}",
            d.id, d.port, d.resources
        )
        .unwrap();
    }
    y.push_str(extra);
    y
}

pub struct Proxy {
    pub guard: ChildGuard,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Proxy {
    /// Writes `config` and starts the proxy; returns once its admin API answers.
    pub fn start(env: &TestEnv, config: &str) -> Proxy {
        let dir = env.subdir("proxy");
        let cfg = dir.join("config.yaml");
        fs::write(&cfg, config).expect("write config");
        // proxy.log sits in the test's root folder so a failure prints it first.
        let log = env.dir.join("proxy.log");
        let stderr = fs::File::create(&log).expect("create proxy log");
        let stdout = fs::File::create(dir.join("stdout.log")).expect("create proxy stdout");
        let child = Command::new(env!("CARGO_BIN_EXE_lb-proxy"))
            .env("NO_COLOR", "1")
            .arg("--config")
            .arg(&cfg)
            .arg("--log-level")
            .arg("debug")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn lb-proxy");
        let mut proxy = Proxy {
            guard: ChildGuard::new("lb-proxy", child),
            admin: env.admin_addr(),
            log,
        };
        let admin = proxy.admin;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = proxy.guard.try_wait() {
                panic!(
                    "lb-proxy exited during startup with {st}; config:\n{config}\nlog:\n{}",
                    read_lossy(&proxy.log)
                );
            }
            if let Ok((200, _)) = http_get(admin, "/v1/dialogs/stats") {
                break;
            }
            if Instant::now() >= deadline {
                panic!("lb-proxy admin API at {admin} did not answer within 15 s");
            }
            thread::sleep(Duration::from_millis(50));
        }
        proxy
    }

    pub fn stats(&self) -> DialogStats {
        dialog_stats(self.admin)
    }

    pub fn destinations(&self) -> Vec<DestState> {
        destinations(self.admin)
    }

    /// Panics unless the proxy is still running.
    pub fn assert_running(&mut self) {
        if let Some(st) = self.guard.try_wait() {
            panic!("lb-proxy exited with {st}");
        }
    }

    /// Waits until every listed destination id reports `state`.
    pub fn wait_state(&self, ids: &[&str], state: &str, timeout: Duration) {
        let admin = self.admin;
        wait_for(
            &format!("destinations {ids:?} to be {state}"),
            timeout,
            Duration::from_millis(100),
            || {
                let ds = destinations(admin);
                ids.iter()
                    .all(|id| ds.iter().any(|d| d.id == *id && d.state == state))
                    .then_some(())
            },
        );
    }

    /// Waits until the proxy holds no dialog and no destination carries load; returns the
    /// stats seen then.
    pub fn wait_idle(&self, timeout: Duration) -> DialogStats {
        let admin = self.admin;
        let deadline = Instant::now() + timeout;
        loop {
            let s = dialog_stats(admin);
            let ds = destinations(admin);
            if s.active == 0 && s.early == 0 && ds.iter().all(|d| d.load == 0) {
                return s;
            }
            if Instant::now() >= deadline {
                panic!("proxy not idle after {timeout:?}: {s:?} {ds:?}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Admin API

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAccept: application/json\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end in {text:?}")))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let body = if head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"))
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn try_get_json(addr: SocketAddr, path: &str) -> Result<Value, String> {
    let (code, body) = http_get(addr, path).map_err(|e| format!("GET {path}: {e}"))?;
    if code != 200 {
        return Err(format!("GET {path} answered {code}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e} in {body:?}"))
}

pub fn get_json(addr: SocketAddr, path: &str) -> Value {
    try_get_json(addr, path).unwrap_or_else(|e| panic!("{e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DialogStats {
    pub active: u64,
    pub early: u64,
    pub processed: u64,
    pub expired: u64,
    pub failed: u64,
}

pub fn try_dialog_stats(admin: SocketAddr) -> Result<DialogStats, String> {
    let v = try_get_json(admin, "/v1/dialogs/stats")?;
    let f = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("/v1/dialogs/stats has no number {k:?}: {v}"))
    };
    Ok(DialogStats {
        active: f("active")?,
        early: f("early")?,
        processed: f("processed")?,
        expired: f("expired")?,
        failed: f("failed")?,
    })
}

pub fn dialog_stats(admin: SocketAddr) -> DialogStats {
    try_dialog_stats(admin).unwrap_or_else(|e| panic!("{e}"))
}

/// One numeric field of `/v1/dialogs/stats` (e.g. `malformed`, `routed`).
pub fn stats_number(admin: SocketAddr, key: &str) -> u64 {
    let v = get_json(admin, "/v1/dialogs/stats");
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("/v1/dialogs/stats has no number {key:?}: {v}"))
}

/// The Prometheus text of `GET /metrics`.
pub fn metrics_text(admin: SocketAddr) -> String {
    match http_get(admin, "/metrics") {
        Ok((200, body)) => body,
        Ok((code, body)) => panic!("GET /metrics answered {code}: {body}"),
        Err(e) => panic!("GET /metrics: {e}"),
    }
}

/// One sample line of a Prometheus text exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl MetricSample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

fn bad_metrics_line(line: &str) -> ! {
    panic!("unreadable metrics line {line:?}")
}

/// The sample lines of a Prometheus text exposition (comments skipped). Label values are read
/// with their escapes (`\\`, `\"`, `\n`) undone; a line that cannot be read panics.
pub fn parse_metrics(text: &str) -> Vec<MetricSample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or_else(|| bad_metrics_line(line));
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices();
            let mut key = String::new();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        end = Some(i + 1);
                        break;
                    }
                    ',' | ' ' => {}
                    '=' => {
                        if chars.next().map(|(_, c)| c) != Some('"') {
                            bad_metrics_line(line);
                        }
                        let mut val = String::new();
                        loop {
                            match chars.next().map(|(_, c)| c) {
                                Some('"') => break,
                                Some('\\') => match chars.next().map(|(_, c)| c) {
                                    Some('n') => val.push('\n'),
                                    Some(c) => val.push(c),
                                    None => bad_metrics_line(line),
                                },
                                Some(c) => val.push(c),
                                None => bad_metrics_line(line),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), val);
                    }
                    c => key.push(c),
                }
            }
            rest = &r[end.unwrap_or_else(|| bad_metrics_line(line))..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| match v {
                "+Inf" => Some(f64::INFINITY),
                "-Inf" => Some(f64::NEG_INFINITY),
                v => v.parse().ok(),
            })
            .unwrap_or_else(|| bad_metrics_line(line));
        out.push(MetricSample {
            name,
            labels,
            value,
        });
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestState {
    pub id: String,
    pub uri: String,
    pub state: String,
    /// Load on the `pstn` resource.
    pub load: u64,
    pub capacity: u64,
}

fn parse_destination(d: &Value) -> Result<DestState, String> {
    let id = match d.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        other => return Err(format!("destination without id ({other:?}): {d}")),
    };
    let pstn = d
        .get("resources")
        .and_then(Value::as_array)
        .and_then(|rs| {
            rs.iter()
                .find(|r| r.get("name").and_then(Value::as_str) == Some("pstn"))
        })
        .ok_or_else(|| format!("destination {id} has no pstn resource: {d}"))?;
    Ok(DestState {
        uri: d
            .get("uri")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        state: d
            .get("state")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("destination {id} has no state: {d}"))?
            .to_string(),
        load: pstn
            .get("load")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("destination {id} has no pstn load: {d}"))?,
        capacity: pstn.get("capacity").and_then(Value::as_u64).unwrap_or(0),
        id,
    })
}

pub fn try_destinations(admin: SocketAddr) -> Result<Vec<DestState>, String> {
    let v = try_get_json(admin, "/v1/destinations")?;
    v.get("destinations")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("/v1/destinations has no destinations array: {v}"))?
        .iter()
        .map(parse_destination)
        .collect()
}

pub fn destinations(admin: SocketAddr) -> Vec<DestState> {
    try_destinations(admin).unwrap_or_else(|e| panic!("{e}"))
}

pub fn dest<'a>(ds: &'a [DestState], id: &str) -> &'a DestState {
    ds.iter()
        .find(|d| d.id == id)
        .unwrap_or_else(|| panic!("no destination {id} in {ds:?}"))
}

/// Samples per-destination loads in the background.
pub struct LoadSampler {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Vec<LoadSample>>>,
}

#[derive(Debug, Clone)]
pub struct LoadSample {
    /// Time since the sampler started.
    pub at: Duration,
    pub loads: BTreeMap<String, u64>,
    pub stats: DialogStats,
}

impl LoadSampler {
    pub fn start(admin: SocketAddr, every: Duration) -> LoadSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = thread::spawn(move || {
            let t0 = Instant::now();
            let mut out = Vec::new();
            while !stop2.load(Ordering::SeqCst) {
                // A failed poll (proxy busy) is skipped, not fatal: the samples are checked later.
                if let (Ok(ds), Ok(stats)) = (try_destinations(admin), try_dialog_stats(admin)) {
                    out.push(LoadSample {
                        at: t0.elapsed(),
                        loads: ds.into_iter().map(|d| (d.id, d.load)).collect(),
                        stats,
                    });
                }
                thread::sleep(every);
            }
            out
        });
        LoadSampler {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> Vec<LoadSample> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .map(|h| h.join().expect("sampler thread"))
            .unwrap_or_default()
    }
}

impl Drop for LoadSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// sipp

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `-t u1`
    Udp,
    /// `-t t1`
    Tcp,
}

impl Transport {
    fn flag(self) -> &'static str {
        match self {
            Transport::Udp => "u1",
            Transport::Tcp => "t1",
        }
    }
}

/// A scenario file from `tests/sipp/` or one of sipp's built-in scenarios (`-sn`).
#[derive(Clone, Debug)]
pub enum Scenario {
    File(&'static str),
    Builtin(&'static str),
}

/// A running sipp process: a server (`-p 5080`, runs until stopped) or a client (`-m N`).
pub struct Sipp {
    pub name: String,
    pub dir: PathBuf,
    guard: ChildGuard,
    started: Instant,
}

/// What a finished sipp left: exit status, last line of `-trace_stat`, last line of
/// `-trace_counts` (per-message counters), the error log.
#[derive(Debug, Clone)]
pub struct SippReport {
    pub name: String,
    /// `None` when the harness had to kill it.
    pub exit: Option<i32>,
    pub elapsed: Duration,
    pub stats: HashMap<String, String>,
    pub counts: HashMap<String, String>,
    pub errors: String,
}

impl SippReport {
    pub fn stat(&self, key: &str) -> u64 {
        self.stats
            .get(key)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{}: no numeric stat {key:?}", self.name))
    }
    pub fn successful(&self) -> u64 {
        self.stat("SuccessfulCall(C)")
    }
    pub fn failed(&self) -> u64 {
        self.stat("FailedCall(C)")
    }
    /// Sum of the `-trace_counts` columns named `<index>_<suffix>`, e.g. `INVITE_Recv`.
    pub fn count(&self, suffix: &str) -> u64 {
        assert!(
            !self.counts.is_empty(),
            "{}: no -trace_counts data (was it a server?)",
            self.name
        );
        let tail = format!("_{suffix}");
        self.counts
            .iter()
            .filter(|(k, _)| k.ends_with(&tail))
            .map(|(_, v)| v.trim().parse::<u64>().unwrap_or(0))
            .sum()
    }
    /// INVITEs this server received (first transmissions; retransmissions are counted apart).
    pub fn invites(&self) -> u64 {
        self.count("INVITE_Recv")
    }
    /// Response time 1 (`rtd="true"`) as sipp measured it, cumulated mean.
    pub fn response_time(&self) -> Duration {
        let v = self
            .stats
            .get("ResponseTime1(C)")
            .unwrap_or_else(|| panic!("{}: no ResponseTime1(C)", self.name));
        parse_sipp_duration(v).unwrap_or_else(|| panic!("{}: bad duration {v:?}", self.name))
    }
    pub fn summary(&self) -> String {
        let get = |k: &str| self.stats.get(k).map(String::as_str).unwrap_or("?");
        let invites = if self.counts.is_empty() {
            String::new()
        } else {
            format!(" invites_received={}", self.invites())
        };
        format!(
            "{}: exit={:?} elapsed={:.1?}{invites} created={} successful={} failed={} current={} \
             retrans={} unexpected={} timeout_recv={} dead_call_msgs={} out_of_call_msgs={} \
             errors={:?}",
            self.name,
            self.exit,
            self.elapsed,
            get("TotalCallCreated"),
            get("SuccessfulCall(C)"),
            get("FailedCall(C)"),
            get("CurrentCall"),
            get("Retransmissions(C)"),
            get("FailedUnexpectedMessage(C)"),
            get("FailedTimeoutOnRecv(C)"),
            get("DeadCallMsgs(C)"),
            get("OutOfCallMsgs(C)"),
            self.errors.lines().take(12).collect::<Vec<_>>().join(" | ")
        )
    }
    /// Messages that belonged to no live call: for a call already ended (`DeadCallMsgs`,
    /// e.g. a final response retransmitted after it was ACKed) or to no call at all
    /// (`OutOfCallMsgs`).
    pub fn stray_messages(&self) -> u64 {
        self.stat("DeadCallMsgs(C)") + self.stat("OutOfCallMsgs(C)")
    }
    pub fn assert_no_stray_messages(&self) {
        assert_eq!(
            self.stray_messages(),
            0,
            "{} received messages for ended or unknown calls (retransmissions not absorbed?); {}",
            self.name,
            self.summary()
        );
    }
    /// Panics (with the details) unless sipp exited 0 with `calls` successful calls and none
    /// failed.
    pub fn assert_all_ok(&self, calls: u64) {
        assert!(
            self.exit == Some(0) && self.successful() == calls && self.failed() == 0,
            "expected {calls} successful calls and none failed; {}",
            self.summary()
        );
    }
}

/// sipp prints durations as `HH:MM:SS:uuuuuu`.
fn parse_sipp_duration(s: &str) -> Option<Duration> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    if parts.len() != 4 {
        return None;
    }
    let h: u64 = parts[0].parse().ok()?;
    let m: u64 = parts[1].parse().ok()?;
    let sec: u64 = parts[2].parse().ok()?;
    let us: u64 = parts[3].parse().ok()?;
    Some(Duration::from_secs(h * 3600 + m * 60 + sec) + Duration::from_micros(us))
}

/// Header line and last line of a sipp CSV, as a map.
fn last_csv_row(path: &Path) -> HashMap<String, String> {
    let text = read_lossy(path);
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return HashMap::new();
    };
    let Some(last) = lines.next_back() else {
        return HashMap::new();
    };
    header
        .split(';')
        .map(str::to_string)
        .zip(last.split(';').map(str::to_string))
        .collect()
}

fn find_file(dir: &Path, suffix: &str) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(suffix))
        })
}

impl Sipp {
    fn spawn(env: &TestEnv, name: &str, scen: &Scenario, args: &[String]) -> Sipp {
        let dir = env.subdir(name);
        let (cp, mp) = env.sipp_ports();
        let mut cmd = Command::new(sipp_bin());
        match scen {
            Scenario::File(f) => cmd.arg("-sf").arg(scenario(f)),
            Scenario::Builtin(n) => cmd.arg("-sn").arg(n),
        };
        // SIPP_TRACE_MSG=1 logs every message each sipp sends and receives (messages.log).
        if std::env::var_os("SIPP_TRACE_MSG").is_some_and(|v| v != "0") {
            cmd.arg("-trace_msg")
                .arg("-message_file")
                .arg(dir.join("messages.log"));
        }
        cmd.args(["-nostdin", "-trace_err", "-trace_stat", "-fd", "1"])
            .arg("-error_file")
            .arg(dir.join("errors.log"))
            .arg("-stf")
            .arg(dir.join("stat.csv"))
            .args(["-ci", &env.ip, "-cp", &cp.to_string()])
            .args(["-mp", &mp.to_string()])
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("screen.log")).expect("create screen log"))
            .stderr(fs::File::create(dir.join("stderr.log")).expect("create stderr log"));
        fs::write(dir.join("command.txt"), format!("{cmd:?}\n")).expect("write command");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn sipp (install sip-tester?): {e}"));
        Sipp {
            name: name.to_string(),
            dir,
            guard: ChildGuard::new(name, child),
            started: Instant::now(),
        }
    }

    /// A sipp server on this test's address; it runs until `stop`. `-d` is passed as `pause_ms`
    /// (only scenarios with a `<pause/>` use it).
    pub fn server(
        env: &TestEnv,
        name: &str,
        scenario: &'static str,
        port: u16,
        transport: Transport,
        pause_ms: u64,
    ) -> Sipp {
        let local = SocketAddr::new(env.ip.parse().expect("test IP"), port);
        Sipp::server_at(env, name, scenario, local, transport, pause_ms)
    }

    /// As `server`, on another address than the test's (e.g. `[::1]:16080`). Its control
    /// socket stays on the test's address.
    pub fn server_at(
        env: &TestEnv,
        name: &str,
        scenario: &'static str,
        local: SocketAddr,
        transport: Transport,
        pause_ms: u64,
    ) -> Sipp {
        Sipp::server_with(env, name, scenario, local, transport, pause_ms, &[])
    }

    /// As `server_at`, with `-trace_msg`: every message it receives and sends is logged to
    /// `messages.log` in its folder (see `server_messages`).
    pub fn server_traced(
        env: &TestEnv,
        name: &str,
        scenario: &'static str,
        local: SocketAddr,
        transport: Transport,
        pause_ms: u64,
    ) -> Sipp {
        let log = env.subdir(name).join("messages.log");
        let log = log.to_string_lossy().into_owned();
        Sipp::server_with(
            env,
            name,
            scenario,
            local,
            transport,
            pause_ms,
            &["-trace_msg", "-message_file", &log],
        )
    }

    fn server_with(
        env: &TestEnv,
        name: &str,
        scenario: &'static str,
        local: SocketAddr,
        transport: Transport,
        pause_ms: u64,
        extra: &[&str],
    ) -> Sipp {
        let mut args: Vec<String> = vec![
            "-i".into(),
            local.ip().to_string(),
            "-p".into(),
            local.port().to_string(),
            "-t".into(),
            transport.flag().into(),
            "-trace_counts".into(),
            "-d".into(),
            pause_ms.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let s = Sipp::spawn(env, name, &Scenario::File(scenario), &args);
        // Ready when it has bound its port: it writes its first statistics row at once.
        let stat = s.dir.join("stat.csv");
        wait_for(
            &format!("sipp server {name} to start"),
            Duration::from_secs(10),
            Duration::from_millis(20),
            || (read_lossy(&stat).lines().count() >= 2).then_some(()),
        );
        s
    }

    /// A sipp client sending to the proxy. `extra` carries `-m`, `-r`, `-d`, `-l`...;
    /// a global `-timeout` makes sipp give up (and fail) on its own after `timeout`.
    pub fn client(
        env: &TestEnv,
        name: &str,
        scenario: Scenario,
        port: u16,
        transport: Transport,
        timeout: Duration,
        extra: &[&str],
    ) -> Sipp {
        let local = SocketAddr::new(env.ip.parse().expect("test IP"), port);
        let target = env.proxy_target();
        Sipp::client_at(
            env, name, scenario, local, &target, transport, timeout, extra,
        )
    }

    /// As `client`, from another address than the test's (e.g. `[::1]:16070`) to `target`
    /// (`IP:port`, IPv6 as `[::1]:16060`). Its control socket stays on the test's address.
    #[allow(clippy::too_many_arguments)]
    pub fn client_at(
        env: &TestEnv,
        name: &str,
        scenario: Scenario,
        local: SocketAddr,
        target: &str,
        transport: Transport,
        timeout: Duration,
        extra: &[&str],
    ) -> Sipp {
        let mut args: Vec<String> = vec![
            "-i".into(),
            local.ip().to_string(),
            "-p".into(),
            local.port().to_string(),
            "-t".into(),
            transport.flag().into(),
            "-timeout".into(),
            format!("{}s", timeout.as_secs().max(1)),
            "-timeout_error".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(target.to_string());
        Sipp::spawn(env, name, &scenario, &args)
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// The start line and Call-ID of every message a `server_traced` sipp received, in
    /// order.
    pub fn received_messages(&self) -> Vec<(String, String)> {
        let text = read_lossy(&self.dir.join("messages.log"));
        let mut out = Vec::new();
        let mut blocks = text.split("----------------------------------------------- ");
        blocks.next();
        for b in blocks {
            let mut lines = b.lines();
            let Some(_stamp) = lines.next() else { continue };
            if !lines.next().is_some_and(|l| l.contains("message received")) {
                continue;
            }
            let mut lines = lines.skip_while(|l| l.trim().is_empty());
            let Some(start) = lines.next() else { continue };
            let call_id = lines
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    (n.eq_ignore_ascii_case("call-id") || n == "i").then(|| v.trim().to_string())
                })
                .unwrap_or_default();
            out.push((start.trim().to_string(), call_id));
        }
        out
    }

    pub fn running(&mut self) -> bool {
        self.guard.try_wait().is_none()
    }

    /// Waits for a client to end (at most its `-timeout` plus a margin) and reads its files.
    pub fn wait(mut self, timeout: Duration) -> SippReport {
        let st = self.guard.wait_timeout(timeout + Duration::from_secs(10));
        self.report(st.map(|s| s.code().unwrap_or(-1)))
    }

    /// The current statistics row (written every second) of a running sipp.
    pub fn live_stats(&self) -> HashMap<String, String> {
        last_csv_row(&self.dir.join("stat.csv"))
    }

    /// Waits until the server has no call open (per its once-a-second statistics, taking a
    /// row written after this call), so that late messages (ACK, retransmissions) are in.
    pub fn wait_no_calls(&self, timeout: Duration) {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let stat = self.dir.join("stat.csv");
        let deadline = Instant::now() + timeout;
        loop {
            let row = last_csv_row(&stat);
            let written = row
                .get("CurrentTime")
                .and_then(|t| t.split('\t').next_back())
                .and_then(|t| t.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            let current = row.get("CurrentCall").and_then(|c| c.parse::<u64>().ok());
            if written > since && current == Some(0) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "sipp {} still has calls open after {timeout:?}: CurrentCall={current:?}",
                    self.name
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops a server gracefully (SIGUSR1: sipp writes its final statistics and exits),
    /// killing it if it has not ended within a few seconds, and reads its files.
    pub fn stop(mut self) -> SippReport {
        self.guard.signal("USR1");
        let st = self.guard.wait_timeout(Duration::from_secs(5));
        self.report(st.map(|s| s.code().unwrap_or(-1)))
    }

    fn report(&mut self, exit: Option<i32>) -> SippReport {
        self.guard.kill();
        let counts = find_file(&self.dir, "_counts.csv")
            .map(|p| last_csv_row(&p))
            .unwrap_or_default();
        SippReport {
            name: self.name.clone(),
            exit,
            elapsed: self.started.elapsed(),
            stats: last_csv_row(&self.dir.join("stat.csv")),
            counts,
            errors: read_lossy(&self.dir.join("errors.log")),
        }
    }
}

/// Asserts a server ended without failed calls (every call it took went through its scenario:
/// e.g. its 200/503/487 was ACKed, its BYE answered) and returns its report.
pub fn assert_server_clean(r: &SippReport) {
    assert_eq!(
        r.failed(),
        0,
        "server {} had failed calls; {}",
        r.name,
        r.summary()
    );
}

// ---------------------------------------------------------------------------------------------
// Admin API writes, raw responses, config file, sipp statistics history

/// A raw HTTP response: status code, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub code: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics (showing the body) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not a JSON body ({e}): {:?}", self.body))
    }
}

/// One HTTP/1.1 request (`Connection: close`); `bearer` adds `Authorization: Bearer <token>`,
/// `headers` any other header, `body` is sent as `application/json`.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    bearer: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        write!(req, "{k}: {v}\r\n").unwrap();
    }
    if let Some(t) = bearer {
        write!(req, "Authorization: Bearer {t}\r\n").unwrap();
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method != "GET" {
        write!(
            req,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
        .unwrap();
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end in {text:?}")))?;
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok(HttpResponse {
        code,
        headers,
        body,
    })
}

/// `http_request`, panicking on a transport error.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> HttpResponse {
    http_request(addr, method, path, &[], bearer, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// `PUT /v1/destinations` with a JSON body.
pub fn put_destinations(admin: SocketAddr, bearer: Option<&str>, body: &str) -> HttpResponse {
    http(admin, "PUT", "/v1/destinations", bearer, Some(body))
}

/// `POST /v1/destinations/{id}/state` with `{"action": action}`.
pub fn post_state(admin: SocketAddr, bearer: Option<&str>, id: &str, action: &str) -> HttpResponse {
    let body = serde_json::json!({ "action": action }).to_string();
    http(
        admin,
        "POST",
        &format!("/v1/destinations/{id}/state"),
        bearer,
        Some(&body),
    )
}

/// The raw JSON of `GET /v1/destinations`.
pub fn destinations_json(admin: SocketAddr) -> Value {
    get_json(admin, "/v1/destinations")
}

/// The raw JSON of one destination in `GET /v1/destinations`, if listed.
pub fn destination_json(admin: SocketAddr, id: &str) -> Option<Value> {
    destinations_json(admin)
        .get("destinations")?
        .as_array()?
        .iter()
        .find(|d| parse_destination(d).is_ok_and(|p| p.id == id))
        .cloned()
}

/// The config file `Proxy::start` wrote (what a SIGHUP re-reads).
pub fn proxy_config_path(env: &TestEnv) -> PathBuf {
    env.dir.join("proxy").join("config.yaml")
}

/// Whether the proxy log (ANSI colours removed) contains `needle`.
pub fn proxy_log_contains(proxy: &Proxy, needle: &str) -> bool {
    strip_ansi(&read_lossy(&proxy.log)).contains(needle)
}

/// One row of a sipp `-trace_stat` file: when it was written (Unix seconds) and the calls
/// open then.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SippStatRow {
    pub at: f64,
    pub current_calls: u64,
}

impl Sipp {
    /// Every statistics row written so far (one a second with `-fd 1`), oldest first.
    pub fn stat_rows(&self) -> Vec<SippStatRow> {
        let text = read_lossy(&self.dir.join("stat.csv"));
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let Some(header) = lines.next() else {
            return Vec::new();
        };
        let cols: Vec<&str> = header.split(';').collect();
        let time_col = cols.iter().position(|c| *c == "CurrentTime");
        let calls_col = cols.iter().position(|c| *c == "CurrentCall");
        let (Some(tc), Some(cc)) = (time_col, calls_col) else {
            return Vec::new();
        };
        lines
            .filter_map(|l| {
                let f: Vec<&str> = l.split(';').collect();
                let at = f
                    .get(tc)?
                    .split('\t')
                    .next_back()?
                    .trim()
                    .parse::<f64>()
                    .ok()?;
                let current_calls = f.get(cc)?.trim().parse::<u64>().ok()?;
                Some(SippStatRow { at, current_calls })
            })
            .collect()
    }
}

/// Unix time now, in seconds.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
