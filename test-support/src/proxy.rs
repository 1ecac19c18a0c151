//! The `lb-proxy` process of a test, its config, and `Sandbox`: a proxy with sipp servers
//! behind it, started in one expression.

use crate::admin::{
    destinations, destinations_status, dialog_stats, http_get, DestState, DialogStats,
};
use crate::env::{read_lossy, strip_ansi, TestEnv, ADMIN_PORT, PROXY_PORT};
use crate::poll::wait_for;
use crate::process::{clean_env, ChildGuard};
use crate::sipp::{secs, Sipp, SippBuilder, Transport};
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// One destination of the proxy config; the test's sipp server for it listens on `port`.
#[derive(Clone, Debug)]
pub struct Dest {
    pub id: u32,
    pub port: u16,
    pub resources: String,
    pub tcp: bool,
    /// Its `group` (1, the listeners' group, unless `in_group` says otherwise).
    pub group: u32,
}

impl Dest {
    pub fn udp(id: u32, port: u16, resources: &str) -> Dest {
        Dest {
            id,
            port,
            resources: resources.to_string(),
            tcp: false,
            group: 1,
        }
    }
    pub fn tcp(id: u32, port: u16, resources: &str) -> Dest {
        Dest {
            tcp: true,
            ..Dest::udp(id, port, resources)
        }
    }

    /// In another group than the listeners' (1): only sessions a `routing.pools` rule sends
    /// there reach it.
    pub fn in_group(self, group: u32) -> Dest {
        Dest { group, ..self }
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
            "  - id: {}\n    group: {}\n    uri: sip:{ip}:{}{transport}\n    resources: {}",
            d.id, d.group, d.port, d.resources
        )
        .expect("write to a String");
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
    /// Writes `config` (to `<test>/proxy/config.yaml`, what a SIGHUP re-reads) and starts the
    /// test's `lb-proxy`; returns once its admin API answers.
    pub fn start(env: &TestEnv, config: &str) -> Proxy {
        let dir = env.subdir("proxy");
        let cfg = dir.join("config.yaml");
        fs::write(&cfg, config).expect("write config");
        // proxy.log sits in the test's root folder so a failure prints it first.
        let log = env.dir.join("proxy.log");
        let stderr = fs::File::create(&log).expect("create proxy log");
        let stdout = fs::File::create(dir.join("stdout.log")).expect("create proxy stdout");
        let child = clean_env(&mut Command::new(env.proxy_bin()))
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
        let deadline = Instant::now() + secs(15);
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

    /// Waits until every listed destination id reports `state` (whatever its resources).
    pub fn wait_state(&self, ids: &[&str], state: &str, timeout: Duration) {
        let admin = self.admin;
        wait_for(
            &format!("destinations {ids:?} to be {state}"),
            timeout,
            Duration::from_millis(100),
            || {
                let ds = destinations_status(admin).destinations;
                ids.iter()
                    .all(|id| ds.iter().any(|d| d.id == *id && d.state.as_str() == state))
                    .then_some(())
            },
        );
    }

    /// Waits until the proxy holds no dialog and no destination carries load on any
    /// resource; returns the stats seen then.
    pub fn wait_idle(&self, timeout: Duration) -> DialogStats {
        let admin = self.admin;
        let deadline = Instant::now() + timeout;
        loop {
            let s = dialog_stats(admin);
            let ds = destinations_status(admin).destinations;
            let unloaded = ds.iter().all(|d| d.resources.iter().all(|r| r.load == 0));
            if s.active == 0 && s.early == 0 && unloaded {
                return s;
            }
            if Instant::now() >= deadline {
                panic!("proxy not idle after {timeout:?}: {s:?} {ds:?}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether its log (ANSI colours removed) contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        strip_ansi(&read_lossy(&self.log)).contains(needle)
    }
}

/// The config file `Proxy::start` wrote (what a SIGHUP re-reads).
pub fn proxy_config_path(env: &TestEnv) -> PathBuf {
    env.dir.join("proxy").join("config.yaml")
}

/// Whether the proxy log (ANSI colours removed) contains `needle`.
pub fn proxy_log_contains(proxy: &Proxy, needle: &str) -> bool {
    proxy.log_contains(needle)
}

/// A change to a sipp server's builder (scenario, pause, ...).
type Tweak<'e> = Box<dyn FnOnce(SippBuilder<'e>) -> SippBuilder<'e> + 'e>;

enum Served<'e> {
    /// On a destination's port: its transport, and whether `start` waits for it, come from
    /// the destination(s) of the config on that port.
    OnPort {
        name: String,
        port: u16,
        tweak: Tweak<'e>,
    },
    /// As the test built it; `start` waits for destination `dest` when given.
    Built {
        builder: Box<SippBuilder<'e>>,
        dest: Option<String>,
    },
}

/// The set-up most proxy tests share: a proxy (`config_yaml`: routing `mode`, destinations,
/// `extra` sections; or a config of the test's own) and sipp servers behind it, started in
/// that order (or servers first); `start` returns once every served destination is up.
///
/// ```text
/// let (mut proxy, [s1, s2]) = Sandbox::new(&env)
///     .serve(Dest::udp(1, SERVER1_PORT, "pstn=50"), "uas.xml")
///     .serve_as("server2_503", Dest::udp(2, SERVER2_PORT, "pstn=100"), "uas_503.xml")
///     .start();
/// ```
#[must_use]
pub struct Sandbox<'e> {
    env: &'e TestEnv,
    mode: String,
    dests: Vec<Dest>,
    served: Vec<Served<'e>>,
    extra: String,
    custom: Option<String>,
    no_set: bool,
    edits: Vec<Box<dyn Fn(String) -> String + 'e>>,
    servers_first: bool,
    wait_up: bool,
    resources: Option<String>,
    routing: String,
}

impl<'e> Sandbox<'e> {
    /// Absolute routing, no destination yet.
    pub fn new(env: &'e TestEnv) -> Self {
        Sandbox {
            env,
            mode: "absolute".to_string(),
            dests: Vec::new(),
            served: Vec::new(),
            extra: String::new(),
            custom: None,
            no_set: false,
            edits: Vec::new(),
            servers_first: false,
            wait_up: true,
            resources: None,
            routing: String::new(),
        }
    }

    /// `routing.mode` (`absolute` or `relative`).
    pub fn mode(mut self, mode: &str) -> Self {
        self.mode = mode.to_string();
        self
    }

    /// `routing.resources`: what each session is counted against (`[pstn]` by default; `sdp`
    /// counts the MRCPv2 channels of its offer).
    pub fn resources(mut self, resources: &str) -> Self {
        self.resources = Some(resources.to_string());
        self
    }

    /// More keys of the `routing:` section (`sdp:`, `pools:`), indented as its keys are (two
    /// spaces): `"  pools:\n    - user: \"^de-\"\n      group: 2\n"`.
    pub fn routing(mut self, yaml: &str) -> Self {
        self.routing.push_str(yaml);
        self
    }

    /// A destination in the config that nothing answers for (unless the test starts it).
    pub fn dest(mut self, d: Dest) -> Self {
        self.dests.push(d);
        self
    }

    /// A destination and its sipp server `server<id>`, on its port and transport.
    pub fn serve(self, d: Dest, scenario: &'static str) -> Self {
        self.serve_with(d, move |s| s.scenario(scenario))
    }

    /// As `serve`, naming the server.
    pub fn serve_as(self, name: &str, d: Dest, scenario: &'static str) -> Self {
        let port = d.port;
        self.dest(d).uas(name, port, scenario)
    }

    /// As `serve`, the server's builder changed by `tweak` (`|s| s.scenario(..).pause(..)`).
    pub fn serve_with(
        self,
        d: Dest,
        tweak: impl FnOnce(SippBuilder<'e>) -> SippBuilder<'e> + 'e,
    ) -> Self {
        let (name, port) = (format!("server{}", d.id), d.port);
        self.dest(d).uas_with(&name, port, tweak)
    }

    /// Destinations in the config, in order (see `dest`).
    pub fn dests(mut self, ds: &[Dest]) -> Self {
        self.dests.extend(ds.iter().cloned());
        self
    }

    /// A sipp server `name` for the destination on `port` (with its transport), playing
    /// `scenario`.
    pub fn uas(self, name: &str, port: u16, scenario: &'static str) -> Self {
        self.uas_with(name, port, move |s| s.scenario(scenario))
    }

    /// As `uas`, the server's builder changed by `tweak`.
    pub fn uas_with(
        mut self,
        name: &str,
        port: u16,
        tweak: impl FnOnce(SippBuilder<'e>) -> SippBuilder<'e> + 'e,
    ) -> Self {
        self.served.push(Served::OnPort {
            name: name.to_string(),
            port,
            tweak: Box::new(tweak),
        });
        self
    }

    /// A sipp server as the test built it (another address, a config of its own); `start`
    /// waits for destination `dest` to be up when one is given.
    pub fn server(mut self, dest: Option<&str>, builder: SippBuilder<'e>) -> Self {
        self.served.push(Served::Built {
            builder: Box::new(builder),
            dest: dest.map(str::to_string),
        });
        self
    }

    /// Top-level YAML sections appended to the config (`dialogs:`, `limits:`...).
    pub fn extra(mut self, yaml: &str) -> Self {
        self.extra.push_str(yaml);
        self
    }

    /// The whole config as the test wrote it (TLS, IPv6, DNS...), instead of `config_yaml`;
    /// its servers are given with `server`.
    pub fn custom_config(mut self, yaml: impl Into<String>) -> Self {
        self.custom = Some(yaml.into());
        self
    }

    /// A config without the `destinations` key: the proxy of an operator, whose set is pushed
    /// (`PUT /v1/destinations`), not read from the file.
    pub fn without_destinations(mut self) -> Self {
        self.no_set = true;
        self
    }

    /// A change to the config text (a key `config_yaml` does not write), applied in order.
    pub fn edit_config(mut self, edit: impl Fn(String) -> String + 'e) -> Self {
        self.edits.push(Box::new(edit));
        self
    }

    /// Starts the servers before the proxy (so that its first probes find them).
    pub fn servers_first(mut self) -> Self {
        self.servers_first = true;
        self
    }

    /// Returns as soon as the servers run, without waiting for their destinations to be up.
    pub fn no_wait(mut self) -> Self {
        self.wait_up = false;
        self
    }

    /// The config it starts the proxy with.
    pub fn config(&self) -> String {
        let base = match &self.custom {
            Some(yaml) => {
                assert!(
                    self.dests.is_empty() && self.extra.is_empty(),
                    "a custom config has its own destinations and sections"
                );
                yaml.clone()
            }
            None if self.no_set => {
                assert!(
                    self.dests.is_empty(),
                    "destinations in a config without any"
                );
                let y = config_yaml(self.env, &self.mode, &[], "");
                let y = y
                    .strip_suffix("destinations:\n")
                    .expect("config_yaml ends with the destinations key");
                assert!(!y.contains("destinations"), "{y}");
                format!("{y}{}", self.extra)
            }
            None => config_yaml(self.env, &self.mode, &self.dests, &self.extra),
        };
        let base = if self.resources.is_some() || !self.routing.is_empty() {
            assert!(
                self.custom.is_none(),
                "a custom config has its own routing section"
            );
            let resources = self.resources.as_deref().unwrap_or("[pstn]");
            let line = "  resources: [pstn]\n";
            assert!(base.contains(line), "{base}");
            base.replacen(
                line,
                &format!("  resources: {resources}\n{}", self.routing),
                1,
            )
        } else {
            base
        };
        self.edits.iter().fold(base, |c, edit| edit(c))
    }

    /// Starts the proxy, then the servers (in the order given), then waits (10 s at most)
    /// until every served destination is up. `N` is the number of servers.
    pub fn start<const N: usize>(self) -> (Proxy, [Sipp; N]) {
        let (proxy, servers) = self.start_all();
        let n = servers.len();
        let Ok(servers) = servers.try_into() else {
            panic!("the sandbox has {n} servers, not {N}")
        };
        (proxy, servers)
    }

    /// As `start`, for any number of servers.
    pub fn start_all(mut self) -> (Proxy, Vec<Sipp>) {
        let config = self.config();
        let env = self.env;
        let mut wait_ids = Vec::new();
        let mut builders = Vec::new();
        for served in std::mem::take(&mut self.served) {
            match served {
                Served::OnPort { name, port, tweak } => {
                    let on_port: Vec<&Dest> =
                        self.dests.iter().filter(|d| d.port == port).collect();
                    let tcp = on_port.iter().any(|d| d.tcp);
                    let transport = if tcp { Transport::Tcp } else { Transport::Udp };
                    wait_ids.extend(on_port.iter().map(|d| d.id.to_string()));
                    builders.push(tweak(Sipp::uas(env, &name).port(port).transport(transport)));
                }
                Served::Built { builder, dest } => {
                    wait_ids.extend(dest);
                    builders.push(*builder);
                }
            }
        }
        let mut proxy = None;
        if !self.servers_first {
            proxy = Some(Proxy::start(env, &config));
        }
        let servers: Vec<Sipp> = builders.into_iter().map(SippBuilder::start).collect();
        let proxy = proxy.unwrap_or_else(|| Proxy::start(env, &config));
        if self.wait_up && !wait_ids.is_empty() {
            let ids: Vec<&str> = wait_ids.iter().map(String::as_str).collect();
            proxy.wait_state(&ids, "up", secs(10));
        }
        (proxy, servers)
    }
}
