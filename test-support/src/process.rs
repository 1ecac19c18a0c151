//! Child processes held by a guard that kills them by PID (never by name) and reaps them on
//! drop, panics included.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Environment variables that would send HTTP(S) through a proxy: removed from every child.
const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Removes the HTTP proxy variables from `cmd` and exempts loopback, so that nothing a test
/// starts sends its traffic outside loopback.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    cmd.env("NO_PROXY", "127.0.0.0/8,localhost")
        .env("no_proxy", "127.0.0.0/8,localhost")
}

/// A child process killed (SIGKILL, by its PID) and reaped when dropped.
pub struct ChildGuard {
    pub name: String,
    pid: u32,
    child: Option<Child>,
    /// How it ended, once reaped.
    exit: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn new(name: &str, child: Child) -> ChildGuard {
        ChildGuard {
            name: name.to_string(),
            pid: child.id(),
            child: Some(child),
            exit: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How the process ended, if it has; reaps it then (it stays ended: later calls answer
    /// the same).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait().expect("try_wait") {
                self.child = None;
                self.exit = Some(st);
            }
        }
        self.exit
    }

    pub fn running(&mut self) -> bool {
        self.try_wait().is_none() && self.child.is_some()
    }

    /// Waits for the process to end on its own; kills it and returns `None` after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline || self.child.is_none() {
                self.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to end (async); `None` if it still runs after `timeout` (it is
    /// left running).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline || self.child.is_none() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a signal (e.g. "TERM", "HUP", "USR1") to this process only, by PID, with the
    /// `kill` utility; panics if `kill` fails. Nothing is sent once the process is reaped.
    pub fn signal(&self, sig: &str) {
        if self.child.is_some() {
            let st = clean_env(&mut Command::new("kill"))
                .arg(format!("-{sig}"))
                .arg(self.pid.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .expect("run kill");
            assert!(
                st.success(),
                "kill -{sig} {} ({}) failed",
                self.pid,
                self.name
            );
        }
    }

    /// SIGKILL by PID and reap; nothing when already reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            if let Ok(st) = c.wait() {
                self.exit = Some(st);
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
