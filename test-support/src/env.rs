//! One test's address and folder, and the text helpers for the logs kept in it.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

pub const PROXY_PORT: u16 = 5060;
pub const ADMIN_PORT: u16 = 8081;
pub const CLIENT_PORT: u16 = 5070;
pub const CLIENT2_PORT: u16 = 5071;
pub const SERVER1_PORT: u16 = 5080;
pub const SERVER2_PORT: u16 = 5090;

/// The test environment of the calling test binary: its files under cargo's
/// `CARGO_TARGET_TMPDIR` and, in lb-proxy's own tests, the `lb-proxy` binary cargo built for
/// them (`CARGO_BIN_EXE_lb-proxy`). Both are compile-time variables of the *test* crate, so
/// this is a macro: it expands where the test is compiled.
#[macro_export]
macro_rules! test_env {
    ($name:expr, $ip:expr) => {
        $crate::TestEnv::new(env!("CARGO_TARGET_TMPDIR"), $name, $ip)
            .with_proxy_bin(option_env!("CARGO_BIN_EXE_lb-proxy"))
    };
}

/// Set when a test of this binary fails, so shared folders (the operator's control plane) are
/// kept for inspection.
static SOME_TEST_FAILED: AtomicBool = AtomicBool::new(false);

/// Records that a test of this binary failed (a `TestEnv` dropped in a panic does it too).
pub fn mark_failed() {
    SOME_TEST_FAILED.store(true, Ordering::SeqCst);
}

/// Whether a test of this binary has failed so far.
pub fn some_test_failed() -> bool {
    SOME_TEST_FAILED.load(Ordering::SeqCst)
}

/// `KEEP_TEST_FILES=1`: keep every test's files, passed or failed.
pub fn keep_requested() -> bool {
    std::env::var_os("KEEP_TEST_FILES").is_some_and(|v| v != "0")
}

/// Milliseconds since the Unix epoch.
pub fn millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis()
}

/// Unix time now, in seconds.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// The repository's root folder.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// How much of a log to print when a test fails.
#[derive(Clone, Copy, Debug)]
pub enum Show {
    Head(usize),
    Tail(usize),
}

struct Log {
    label: String,
    path: PathBuf,
    show: Show,
}

/// One test's address and folder. Create it first in a test so it is dropped last: by then
/// every process guard has killed its process, and on a failure the logs are complete.
///
/// The folder is `<tmp>/<name>-<pid>-<ms>/`; on a failure it is kept and the logs printed:
/// every log registered with `register_log`, then any `proxy.log` (last 200 lines) and
/// `*errors.log` (first 60 lines) found in it; on success it is removed unless
/// `KEEP_TEST_FILES=1`.
pub struct TestEnv {
    pub name: String,
    pub ip: String,
    pub dir: PathBuf,
    proxy_bin: Option<PathBuf>,
    logs: Mutex<Vec<Log>>,
    next_slot: AtomicU16,
}

impl TestEnv {
    /// A folder for test `name` under `tmp` (the test crate's `CARGO_TARGET_TMPDIR`: see
    /// `test_env!`), processes on `ip`.
    pub fn new(tmp: impl AsRef<Path>, name: &str, ip: &str) -> TestEnv {
        let dir = tmp
            .as_ref()
            .join(format!("{name}-{}-{}", std::process::id(), millis()));
        fs::create_dir_all(&dir).expect("create test dir");
        TestEnv {
            name: name.to_string(),
            ip: ip.to_string(),
            dir,
            proxy_bin: None,
            logs: Mutex::new(Vec::new()),
            next_slot: AtomicU16::new(0),
        }
    }

    /// The `lb-proxy` binary `Proxy::start` runs.
    pub fn with_proxy_bin(mut self, bin: Option<impl AsRef<Path>>) -> TestEnv {
        self.proxy_bin = bin.map(|b| b.as_ref().to_path_buf());
        self
    }

    /// Numbers this test's sipp processes from `first_slot` (control port 8800 + slot, media
    /// ports 20000 + 10 × slot): for tests whose sipp processes share an address with another
    /// test's (`::1`).
    pub fn with_sipp_slots(self, first_slot: u16) -> TestEnv {
        self.next_slot.store(first_slot, Ordering::SeqCst);
        self
    }

    pub fn proxy_bin(&self) -> &Path {
        self.proxy_bin
            .as_deref()
            .expect("no lb-proxy binary: create the TestEnv with test_env! in lb-proxy's tests")
    }

    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }

    pub fn socket_addr(&self, port: u16) -> SocketAddr {
        self.addr(port).parse().expect("test address")
    }

    pub fn proxy_target(&self) -> String {
        self.addr(PROXY_PORT)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.socket_addr(ADMIN_PORT)
    }

    /// A private sub-folder for one process.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let d = self.dir.join(name);
        fs::create_dir_all(&d).expect("create process dir");
        d
    }

    /// sipp's control and media ports, unique per sipp process of this test.
    pub fn sipp_ports(&self) -> (u16, u16) {
        let k = self.next_slot.fetch_add(1, Ordering::SeqCst);
        (8800 + k, 20000 + 10 * k)
    }

    /// A log to print (as `show` says) if the test fails.
    pub fn register_log(&self, label: &str, path: &Path, show: Show) {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        if !logs.iter().any(|l| l.path == path) {
            logs.push(Log {
                label: label.to_string(),
                path: path.to_path_buf(),
                show,
            });
        }
    }

    fn dump_logs(&self) {
        eprintln!(
            "\n===== {}: test failed; files kept in {} =====",
            self.name,
            self.dir.display()
        );
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        for l in logs.iter() {
            print_log(&l.label, &l.path, l.show);
        }
        let mut files = Vec::new();
        collect_files(&self.dir, &mut files);
        files.sort();
        for f in files.iter().filter(|f| !logs.iter().any(|l| &l.path == *f)) {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name == "proxy.log" {
                print_log("", f, Show::Tail(200));
            } else if name.ends_with("errors.log") {
                print_log("", f, Show::Head(60));
            }
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            SOME_TEST_FAILED.store(true, Ordering::SeqCst);
            self.dump_logs();
        } else if keep_requested() {
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

/// A file's text (invalid UTF-8 replaced); empty when it cannot be read.
pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The text without ANSI colour sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
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

/// The last `lines` lines of a log, colours removed.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = strip_ansi(&read_lossy(path));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn print_log(label: &str, path: &Path, show: Show) {
    let text = strip_ansi(&read_lossy(path));
    if text.trim().is_empty() {
        return;
    }
    let all: Vec<&str> = text.lines().collect();
    let label = if label.is_empty() {
        String::new()
    } else {
        format!("{label}: ")
    };
    let shown = match show {
        Show::Head(n) => &all[..all.len().min(n)],
        Show::Tail(n) => &all[all.len().saturating_sub(n)..],
    };
    let which = if matches!(show, Show::Head(_)) {
        "first"
    } else {
        "last"
    };
    eprintln!(
        "----- {label}{} ({which} {} of {} lines) -----",
        path.display(),
        shown.len(),
        all.len()
    );
    for l in shown {
        eprintln!("{l}");
    }
}
