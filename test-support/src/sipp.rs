//! sipp (`sip-tester`) processes, started with a builder instead of positional arguments:
//!
//! ```text
//! let server = Sipp::uas(&env, "server1").port(SERVER1_PORT).start();
//! let client = Sipp::uac(&env, "client").calls(3).rate(10).hold(secs(3)).run();
//! ```
//!
//! Every sipp gets its own folder (`<test>/<name>/`: command line, screen, statistics, error
//! log) and its own control and media ports on the test's address (`TestEnv::sipp_ports`).
//! `SIPP_TRACE_MSG=1` makes every sipp log the messages it sends and receives
//! (`messages.log`); `SIPP=/path/to/sipp` picks another binary.

use crate::env::{read_lossy, repo, Show, TestEnv, CLIENT_PORT};
use crate::poll::wait_for;
use crate::process::{clean_env, ChildGuard};
use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The repository's `tests/sipp/` folder.
pub fn scenario_dir() -> PathBuf {
    repo().join("tests").join("sipp")
}

pub fn scenario(name: &str) -> PathBuf {
    let p = scenario_dir().join(name);
    assert!(p.is_file(), "no scenario {}", p.display());
    p
}

fn sipp_bin() -> String {
    std::env::var("SIPP").unwrap_or_else(|_| "sipp".to_string())
}

/// A duration of `n` seconds (builder arguments read better with it).
pub const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A duration of `n` milliseconds.
pub const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Sends calls to a target and ends on its own (`-m`), or gives up after its timeout.
    Client,
    /// Answers on its address until stopped.
    Server,
}

/// How to start one sipp: `Sipp::uac` or `Sipp::uas`, then the settings that differ from the
/// defaults, then `start` (or `run` for a client: start and wait for it to end).
#[must_use]
pub struct SippBuilder<'e> {
    env: &'e TestEnv,
    name: String,
    role: Role,
    scenario: Scenario,
    local: Option<SocketAddr>,
    port: Option<u16>,
    target: Option<String>,
    transport: Transport,
    timeout: Duration,
    calls: Option<u64>,
    rate: Option<String>,
    limit: Option<u64>,
    hold: Option<Duration>,
    trace_messages: bool,
    args: Vec<String>,
}

impl<'e> SippBuilder<'e> {
    fn new(env: &'e TestEnv, name: &str, role: Role, scenario: Scenario) -> Self {
        SippBuilder {
            env,
            name: name.to_string(),
            role,
            scenario,
            local: None,
            port: None,
            target: None,
            transport: Transport::Udp,
            timeout: secs(30),
            calls: None,
            rate: None,
            limit: None,
            hold: None,
            trace_messages: false,
            args: Vec::new(),
        }
    }

    /// A scenario file of `tests/sipp/` (defaults: `uac.xml` for a client, `uas.xml` for a
    /// server).
    pub fn scenario(mut self, file: &'static str) -> Self {
        self.scenario = Scenario::File(file);
        self
    }

    /// A scenario given as a value (a file or a built-in one).
    pub fn play(mut self, scenario: Scenario) -> Self {
        self.scenario = scenario;
        self
    }

    /// One of sipp's built-in scenarios (`-sn uac`).
    pub fn builtin(mut self, name: &'static str) -> Self {
        self.scenario = Scenario::Builtin(name);
        self
    }

    /// Local port on the test's address (a client's default: `CLIENT_PORT`).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Local address other than the test's (e.g. `[::1]:16080`). Its control socket stays on
    /// the test's address.
    pub fn at(mut self, local: SocketAddr) -> Self {
        self.local = Some(local);
        self
    }

    /// Where a client sends (`IP:port`, IPv6 as `[::1]:16060`); default: the test's proxy.
    pub fn to(mut self, target: impl ToString) -> Self {
        self.target = Some(target.to_string());
        self
    }

    pub fn transport(mut self, t: Transport) -> Self {
        self.transport = t;
        self
    }

    /// `-t t1`: one TCP connection.
    pub fn tcp(self) -> Self {
        self.transport(Transport::Tcp)
    }

    /// `-m`: the client ends after this many calls.
    pub fn calls(mut self, n: u64) -> Self {
        self.calls = Some(n);
        self
    }

    /// `-r`: new calls per second (per `-rp` period when one is given with `arg`).
    pub fn rate(mut self, r: impl ToString) -> Self {
        self.rate = Some(r.to_string());
        self
    }

    /// `-m n -l n`: the client makes `n` calls and may hold them all open together.
    pub fn calls_together(self, n: u64) -> Self {
        self.calls(n).limit(n)
    }

    /// `-l`: at most this many calls open at once.
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }

    /// `-d`: how long a client holds each call (the scenario's `<pause/>`).
    pub fn hold(mut self, d: Duration) -> Self {
        self.hold = Some(d);
        self
    }

    /// `-d` for a server: the length of its scenario's `<pause/>` (0 by default).
    pub fn pause(self, d: Duration) -> Self {
        self.hold(d)
    }

    /// A client's global `-timeout` (default 30 s): sipp gives up, and fails, on its own
    /// after it; `run` waits that long plus a margin.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// `-trace_msg`: every message it receives and sends goes to `messages.log` in its folder
    /// (see `Sipp::received_messages`).
    pub fn trace_messages(mut self) -> Self {
        self.trace_messages = true;
        self
    }

    /// Any other sipp option (`-rp`, `-key`, `-inf`...), in order.
    pub fn arg(mut self, a: impl ToString) -> Self {
        self.args.push(a.to_string());
        self
    }

    pub fn args<S: ToString>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(|a| a.to_string()));
        self
    }

    fn local(&self) -> SocketAddr {
        self.local.unwrap_or_else(|| {
            let port = match (self.port, self.role) {
                (Some(p), _) => p,
                (None, Role::Client) => CLIENT_PORT,
                (None, Role::Server) => panic!("sipp server {}: no port", self.name),
            };
            self.env.socket_addr(port)
        })
    }

    fn spawn_process(&self) -> Sipp {
        let local = self.local();
        let mut args: Vec<String> = vec![
            "-i".into(),
            local.ip().to_string(),
            "-p".into(),
            local.port().to_string(),
            "-t".into(),
            self.transport.flag().into(),
        ];
        match self.role {
            Role::Client => args.extend([
                "-timeout".into(),
                format!("{}s", self.timeout.as_secs().max(1)),
                "-timeout_error".into(),
            ]),
            Role::Server => args.push("-trace_counts".into()),
        }
        let flags = [
            ("-m", self.calls.map(|n| n.to_string())),
            ("-r", self.rate.clone()),
            ("-l", self.limit.map(|n| n.to_string())),
        ];
        for (flag, v) in flags {
            if let Some(v) = v {
                args.extend([flag.to_string(), v]);
            }
        }
        if let Some(d) = self
            .hold
            .or((self.role == Role::Server).then_some(Duration::ZERO))
        {
            args.extend(["-d".to_string(), d.as_millis().to_string()]);
        }
        if self.trace_messages {
            let log = self.env.subdir(&self.name).join("messages.log");
            args.extend([
                "-trace_msg".to_string(),
                "-message_file".to_string(),
                log.to_string_lossy().into_owned(),
            ]);
        }
        args.extend(self.args.iter().cloned());
        if self.role == Role::Client {
            args.push(
                self.target
                    .clone()
                    .unwrap_or_else(|| self.env.proxy_target()),
            );
        }
        Sipp::spawn(self.env, &self.name, &self.scenario, &args)
    }

    /// Starts it. A server is returned once it has bound its port (it writes its first
    /// statistics row at once).
    pub fn start(self) -> Sipp {
        let s = self.spawn_process();
        if self.role == Role::Server {
            let stat = s.dir.join("stat.csv");
            wait_for(
                &format!("sipp server {} to start", self.name),
                secs(10),
                ms(20),
                || (read_lossy(&stat).lines().count() >= 2).then_some(()),
            );
        }
        s
    }

    /// As `start`, for async tests: waits for a server to bind without blocking the runtime,
    /// and fails at once if it exits instead.
    pub async fn start_async(self) -> Sipp {
        let mut s = self.spawn_process();
        if self.role == Role::Server {
            let stat = s.dir.join("stat.csv");
            let deadline = Instant::now() + secs(10);
            while read_lossy(&stat).lines().count() < 2 {
                if let Some(st) = s.guard.try_wait() {
                    panic!(
                        "sipp server {} exited with {st}: {}",
                        self.name,
                        read_lossy(&s.dir.join("stderr.log"))
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "sipp server {} did not start",
                    self.name
                );
                tokio::time::sleep(ms(20)).await;
            }
        }
        s
    }

    /// A client: starts it and waits for it to end (at most its timeout plus a margin).
    pub fn run(self) -> SippReport {
        assert_eq!(
            self.role,
            Role::Client,
            "run is for clients; start a server"
        );
        let timeout = self.timeout;
        self.start().wait(timeout)
    }
}

/// A running sipp process: a server (runs until stopped) or a client (ends after `-m` calls).
pub struct Sipp {
    pub name: String,
    pub dir: PathBuf,
    pub guard: ChildGuard,
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
    let (Some(header), Some(last)) = (lines.next(), lines.next_back()) else {
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
    /// A client sending to the test's proxy from `CLIENT_PORT` over UDP with `uac.xml`,
    /// giving up after 30 s; change what differs with the builder.
    pub fn uac<'e>(env: &'e TestEnv, name: &str) -> SippBuilder<'e> {
        SippBuilder::new(env, name, Role::Client, Scenario::File("uac.xml"))
    }

    /// A server answering with `uas.xml` over UDP on the test's address; give its `port`
    /// (or `at`).
    pub fn uas<'e>(env: &'e TestEnv, name: &str) -> SippBuilder<'e> {
        SippBuilder::new(env, name, Role::Server, Scenario::File("uas.xml"))
    }

    fn spawn(env: &TestEnv, name: &str, scen: &Scenario, args: &[String]) -> Sipp {
        let dir = env.subdir(name);
        let (cp, mp) = env.sipp_ports();
        let mut cmd = Command::new(sipp_bin());
        clean_env(&mut cmd);
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
            .unwrap_or_else(|e| panic!("spawn sipp (install sip-tester: make deps): {e}"));
        env.register_log(
            &format!("sipp {name} errors"),
            &dir.join("errors.log"),
            Show::Head(60),
        );
        Sipp {
            name: name.to_string(),
            dir,
            guard: ChildGuard::new(name, child),
            started: Instant::now(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// The start line and Call-ID of every message a `trace_messages` sipp received, in
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
        self.guard.running()
    }

    /// Waits for a client to end (at most `timeout` plus a margin; kills it then) and reads
    /// its files.
    pub fn wait(mut self, timeout: Duration) -> SippReport {
        let st = self.guard.wait_timeout(timeout + secs(10));
        self.report(st.map(|s| s.code().unwrap_or(-1)))
    }

    /// `wait` for async tests: waits up to `timeout` without blocking the runtime.
    pub async fn wait_async(mut self, timeout: Duration) -> SippReport {
        let st = self.guard.wait_exit(timeout).await;
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
            .expect("clock after 1970")
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
            std::thread::sleep(ms(100));
        }
    }

    /// Stops a server gracefully (SIGUSR1: sipp writes its final statistics and exits),
    /// killing it if it has not ended within a few seconds, and reads its files.
    pub fn stop(mut self) -> SippReport {
        self.guard.signal("USR1");
        let st = self.guard.wait_timeout(secs(5));
        self.report(st.map(|s| s.code().unwrap_or(-1)))
    }

    /// `stop` for async tests.
    pub async fn stop_async(mut self) -> SippReport {
        self.guard.signal("USR1");
        let st = self.guard.wait_exit(secs(5)).await;
        self.report(st.map(|s| s.code().unwrap_or(-1)))
    }

    /// A server's end: waits until it has no call open (10 s at most), then stops it.
    pub fn drain(self) -> SippReport {
        self.wait_no_calls(secs(10));
        self.stop()
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

/// Ends servers: waits until none has a call open (10 s at most each), then stops them all.
pub fn drain<const N: usize>(servers: [Sipp; N]) -> [SippReport; N] {
    for s in &servers {
        s.wait_no_calls(secs(10));
    }
    servers.map(Sipp::stop)
}

/// Ends any number of servers as `drain` does, printing each one's summary.
pub fn drain_all(servers: Vec<Sipp>) -> Vec<SippReport> {
    for s in &servers {
        s.wait_no_calls(secs(10));
    }
    let reports: Vec<SippReport> = servers.into_iter().map(Sipp::stop).collect();
    for r in &reports {
        eprintln!("{}", r.summary());
    }
    reports
}

/// Asserts `calls` calls went through cleanly end to end: the client made them all, every
/// server ended clean (`assert_server_clean`), nobody received a message for an ended or
/// unknown call, and the servers took exactly `calls` INVITEs between them.
pub fn assert_calls_clean(client: &SippReport, servers: &[SippReport], calls: u64) {
    client.assert_all_ok(calls);
    client.assert_no_stray_messages();
    for r in servers {
        assert_server_clean(r);
        r.assert_no_stray_messages();
    }
    let invites: u64 = servers.iter().map(SippReport::invites).sum();
    assert_eq!(
        invites, calls,
        "servers took {invites} INVITEs for {calls} calls"
    );
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
