//! `lb-proxy --config FILE` on bad files: the proxy must exit at once with status 2, name the
//! field and the bad value on stderr, and bind nothing (docs/configuration.md). And
//! `--check` on the shipped example passes.
//!
//! Run: `cargo test -p lb-proxy --test config_errors`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// This test's address: the bad files' valid listeners and admin API point here.
const IP: &str = "127.0.1.22";

/// How long an invalid file may take to be refused.
const QUICK: Duration = Duration::from_secs(5);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

struct Run {
    /// `None` when it had to be killed.
    code: Option<i32>,
    elapsed: Duration,
    stdout: String,
    stderr: String,
}

/// Runs the proxy binary with `args` from `dir` and waits (at most 20 s) for it to end.
fn run_proxy(env: &TestEnv, tag: &str, args: &[&str], dir: &Path) -> Run {
    let out = env.dir.join(format!("{tag}.stdout"));
    let err = env.dir.join(format!("{tag}.stderr"));
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_lb-proxy"))
        .env("NO_COLOR", "1")
        .env_remove("LB_PROXY_CONFIG")
        .env_remove("RUST_LOG")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn lb-proxy");
    let mut guard = ChildGuard::new(tag, child);
    let status = guard.wait_timeout(Duration::from_secs(20));
    Run {
        code: status.map(|s| s.code().unwrap_or(-1)),
        elapsed: started.elapsed(),
        stdout: fs::read_to_string(&out).unwrap_or_default(),
        stderr: fs::read_to_string(&err).unwrap_or_default(),
    }
}

/// A bad file, what its error must name, and the SIP port of its valid listeners (if any).
struct Bad {
    name: &'static str,
    yaml: String,
    /// Strings stderr must contain: the field path and the bad value.
    expect: &'static [&'static str],
    /// UDP and TCP port of its valid listeners on `IP`, checked free afterwards.
    port: Option<u16>,
}

fn valid_head(port: u16) -> String {
    format!(
        "listeners:\n  - udp:{IP}:{port}\n  - tcp:{IP}:{port}\n\
         admin:\n  listen: {IP}:{}\n",
        port + 1000
    )
}

fn bad_files() -> Vec<Bad> {
    let dests =
        "destinations:\n  - id: mrcp-1\n    uri: sip:127.0.1.22:5080\n    resources: pstn=100\n";
    vec![
        Bad {
            name: "unknown_transport",
            // The second listener is valid: it must not be bound either.
            yaml: format!(
                "listeners:\n  - sctp:{IP}:5161\n  - udp:{IP}:5061\nadmin:\n  listen: {IP}:6061\n{dests}"
            ),
            expect: &["listeners[0]", "sctp"],
            port: Some(5061),
        },
        Bad {
            name: "bad_resources",
            yaml: format!(
                "{}{dests}  - id: mrcp-2\n    uri: sip:127.0.1.22:5090\n    resources: pstn=lots\n",
                valid_head(5062)
            ),
            expect: &["destinations[1].resources", "lots"],
            port: Some(5062),
        },
        Bad {
            name: "bad_duration",
            yaml: format!(
                "{}timers:\n  t1: 500ms\n  inviteTimeout: ten seconds\n{dests}",
                valid_head(5063)
            ),
            expect: &["timers.inviteTimeout", "ten seconds"],
            port: Some(5063),
        },
        Bad {
            name: "unknown_key",
            yaml: format!(
                "{}routing:\n  mode: absolute\n  maxAtempts: 3\n{dests}",
                valid_head(5064)
            ),
            expect: &["routing", "maxAtempts"],
            port: Some(5064),
        },
        Bad {
            name: "duplicate_id",
            yaml: format!(
                "{}{dests}  - id: mrcp-1\n    uri: sip:127.0.1.22:5090\n    resources: pstn=50\n",
                valid_head(5065)
            ),
            expect: &["destinations[1].id", "mrcp-1"],
            port: Some(5065),
        },
        Bad {
            name: "bad_mode",
            yaml: format!("{}routing:\n  mode: fastest\n{dests}", valid_head(5066)),
            expect: &["routing.mode", "fastest"],
            port: Some(5066),
        },
    ]
}

/// Binds `IP:port` over UDP and TCP and the admin port (`port + 1000`, TCP): proves the
/// proxy left them free.
fn assert_free(port: u16, what: &str) {
    let udp = UdpSocket::bind((IP, port));
    assert!(
        udp.is_ok(),
        "{what}: UDP {IP}:{port} not free after the proxy exited: {udp:?}"
    );
    for p in [port, port + 1000] {
        let tcp = TcpListener::bind((IP, p));
        assert!(
            tcp.is_ok(),
            "{what}: TCP {IP}:{p} not free after the proxy exited: {tcp:?}"
        );
    }
}

fn check_refused(run: &Run, bad: &Bad, file: &Path, mode: &str) {
    let what = format!("{} ({mode})", bad.name);
    assert_eq!(
        run.code,
        Some(2),
        "{what}: expected exit status 2 for an invalid file (docs/configuration.md), got {:?}\n\
         stderr: {}",
        run.code,
        run.stderr
    );
    assert!(
        run.elapsed < QUICK,
        "{what}: took {:?} to refuse the file",
        run.elapsed
    );
    for e in bad.expect {
        assert!(
            run.stderr.contains(e),
            "{what}: stderr does not name {e:?}:\n{}",
            run.stderr
        );
    }
    assert!(
        run.stderr.contains(&file.display().to_string()),
        "{what}: stderr does not name the file {}:\n{}",
        file.display(),
        run.stderr
    );
}

#[test]
fn bad_files_are_refused_naming_field_and_value_and_bind_nothing() {
    let env = test_env!("config_errors", IP);
    for bad in bad_files() {
        let file = env.dir.join(format!("{}.yaml", bad.name));
        fs::write(&file, &bad.yaml).unwrap();
        let path = file.to_str().unwrap();

        let run = run_proxy(&env, bad.name, &["--config", path], &env.dir);
        eprintln!(
            "{}: exit {:?} in {:?}: {}",
            bad.name,
            run.code,
            run.elapsed,
            run.stderr.trim()
        );
        check_refused(&run, &bad, &file, "run");
        if let Some(port) = bad.port {
            assert_free(port, bad.name);
        }

        let check = run_proxy(
            &env,
            &format!("{}-check", bad.name),
            &["--config", path, "--check"],
            &env.dir,
        );
        check_refused(&check, &bad, &file, "--check");
    }
}

/// Stronger than "free afterwards": with the valid listener's ports held by this test, a
/// proxy that bound before validating would fail on the bind (exit 1, "address in use")
/// instead of reporting the bad field.
#[test]
fn bad_file_is_refused_before_any_bind() {
    let env = test_env!("config_errors_held", IP);
    let port = 5067;
    let _udp = UdpSocket::bind((IP, port)).expect("hold UDP port");
    let _tcp = TcpListener::bind((IP, port)).expect("hold TCP port");
    let _admin = TcpListener::bind((IP, port + 1000)).expect("hold admin port");
    let bad = Bad {
        name: "held_ports_bad_duration",
        yaml: format!(
            "{}timers:\n  inviteFinalTimeout: 30 secs\n",
            valid_head(port)
        ),
        expect: &["timers.inviteFinalTimeout", "30 secs"],
        port: None,
    };
    let file = env.dir.join("held.yaml");
    fs::write(&file, &bad.yaml).unwrap();
    let run = run_proxy(
        &env,
        bad.name,
        &["--config", file.to_str().unwrap()],
        &env.dir,
    );
    check_refused(&run, &bad, &file, "run");
    assert!(
        !run.stderr.to_ascii_lowercase().contains("in use"),
        "the proxy tried to bind before validating:\n{}",
        run.stderr
    );
}

/// The documented examples pass `--check` (and `--check` binds nothing, so this does not
/// clash with anything on 127.0.0.1).
#[test]
fn examples_pass_check() {
    let env = test_env!("config_check_example", IP);
    let root = repo_root();
    for example in ["examples/standalone.yaml", "examples/sdp-routing.yaml"] {
        let run = run_proxy(
            &env,
            "example-check",
            &["--config", example, "--check"],
            &root,
        );
        assert_eq!(
            run.code,
            Some(0),
            "--check on {example}: exit {:?}\nstdout: {}\nstderr: {}",
            run.code,
            run.stdout,
            run.stderr
        );
        assert!(run.elapsed < QUICK, "--check took {:?}", run.elapsed);
        assert!(
            run.stdout.contains("valid"),
            "--check printed no verdict: {:?}",
            run.stdout
        );
    }
}

/// Unknown keys are errors that name the key (docs/configuration.md), in the object form of a
/// listener too.
#[test]
fn unknown_key_in_listener_object_is_named() {
    let env = test_env!("config_listener_key", IP);
    let bad = Bad {
        name: "listener_unknown_key",
        yaml: format!(
            "listeners:\n  - udp:{IP}:5068\n  - address: tcp:{IP}:5068\n    advertize: lb.example.com:5068\n"
        ),
        expect: &["listeners[1]", "advertize"],
        port: Some(5068),
    };
    let file = env.dir.join("listener_key.yaml");
    fs::write(&file, &bad.yaml).unwrap();
    let run = run_proxy(
        &env,
        bad.name,
        &["--config", file.to_str().unwrap()],
        &env.dir,
    );
    eprintln!("{}: exit {:?}: {}", bad.name, run.code, run.stderr.trim());
    check_refused(&run, &bad, &file, "run");
    assert_free(5068, bad.name);
}
