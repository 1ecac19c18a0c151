//! The `lb-proxy` process of a test, its config, and `Sandbox`: a proxy with sipp servers
//! behind it, started in one expression.

use crate::admin::{destinations, dialog_stats, http_get, DestState, DialogStats};
use crate::env::{read_lossy, strip_ansi, TestEnv, ADMIN_PORT, PROXY_PORT};
use crate::poll::wait_for;
use crate::process::{clean_env, ChildGuard};
use crate::sipp::{secs, Sipp, Transport};
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

struct Served {
    name: String,
    scenario: &'static str,
    port: u16,
}

/// The set-up most proxy tests share: a proxy (`config_yaml`: routing `mode`, destinations,
/// `extra` sections) and a sipp server behind each served destination, started in that
/// order; `start` returns once every served destination is up.
///
/// ```ignore
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
    served: Vec<Served>,
    extra: String,
    wait_up: bool,
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
            wait_up: true,
        }
    }

    /// `routing.mode` (`absolute` or `relative`).
    pub fn mode(mut self, mode: &str) -> Self {
        self.mode = mode.to_string();
        self
    }

    /// A destination in the config that nothing answers for (unless the test starts it).
    pub fn dest(mut self, d: Dest) -> Self {
        self.dests.push(d);
        self
    }

    /// A destination and its sipp server `server<id>`, on its port and transport.
    pub fn serve(self, d: Dest, scenario: &'static str) -> Self {
        let name = format!("server{}", d.id);
        self.serve_as(&name, d, scenario)
    }

    /// As `serve`, naming the server.
    pub fn serve_as(self, name: &str, d: Dest, scenario: &'static str) -> Self {
        let port = d.port;
        self.dest(d).uas(name, port, scenario)
    }

    /// Destinations in the config, in order (see `dest`).
    pub fn dests(mut self, ds: &[Dest]) -> Self {
        self.dests.extend(ds.iter().cloned());
        self
    }

    /// A sipp server `name` for the destination on `port` (with its transport), playing
    /// `scenario`.
    pub fn uas(mut self, name: &str, port: u16, scenario: &'static str) -> Self {
        self.served.push(Served {
            name: name.to_string(),
            scenario,
            port,
        });
        self
    }

    /// Top-level YAML sections appended to the config (`dialogs:`, `limits:`...).
    pub fn extra(mut self, yaml: &str) -> Self {
        self.extra.push_str(yaml);
        self
    }

    /// Returns as soon as the servers run, without waiting for their destinations to be up.
    pub fn no_wait(mut self) -> Self {
        self.wait_up = false;
        self
    }

    /// The config it starts the proxy with.
    pub fn config(&self) -> String {
        config_yaml(self.env, &self.mode, &self.dests, &self.extra)
    }

    /// Starts the proxy, then the servers (in the order given), then waits (10 s at most)
    /// until every served destination is up. `N` is the number of served destinations.
    pub fn start<const N: usize>(self) -> (Proxy, [Sipp; N]) {
        assert_eq!(
            self.served.len(),
            N,
            "the sandbox serves {} destinations",
            self.served.len()
        );
        let proxy = Proxy::start(self.env, &self.config());
        let servers: Vec<Sipp> = self
            .served
            .iter()
            .map(|s| {
                let tcp = self.dests.iter().any(|d| d.port == s.port && d.tcp);
                let transport = if tcp { Transport::Tcp } else { Transport::Udp };
                Sipp::uas(self.env, &s.name)
                    .scenario(s.scenario)
                    .port(s.port)
                    .transport(transport)
                    .start()
            })
            .collect();
        if self.wait_up {
            let ids: Vec<String> = self
                .dests
                .iter()
                .filter(|d| self.served.iter().any(|s| s.port == d.port))
                .map(|d| d.id.to_string())
                .collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            proxy.wait_state(&ids, "up", secs(10));
        }
        let Ok(servers) = servers.try_into() else {
            unreachable!("checked above")
        };
        (proxy, servers)
    }
}
