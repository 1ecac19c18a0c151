//! The admin bearer token never reaches the proxy's log or output: with the token from
//! `admin.tokenFile` (pretty log) and from `LB_PROXY_ADMIN_TOKEN` (JSON log, as the chart sets
//! it), at `debug` (lb-proxy logs nothing more at `trace`), through accepted and refused
//! writes, bad bodies, wrong and malformed Authorization headers (one carrying the token
//! itself followed by a byte that is not ASCII), `--check`, and a SIGTERM shutdown.
//!
//! No SIP traffic. Addresses: 127.0.5.50 and 127.0.5.51 (one per case).
//! Run: `cargo test -p lb-proxy --test admin_secrets`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use serde_json::json;
use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the token comes from.
enum Source {
    File,
    Env,
}

fn run_case(case: &str, ip: &str, source: Source, level: &str, format: &str) {
    let env = test_env!(case, ip);
    let token = format!("tok-{:032x}", rand::random::<u128>());
    let config = config_yaml(
        &env,
        "absolute",
        &[
            Dest::udp(1, SERVER1_PORT, "pstn=10"),
            Dest::udp(2, SERVER2_PORT, "pstn=20"),
        ],
        "",
    );
    let config = match source {
        Source::File => {
            let token_file = env.dir.join("admin.token");
            fs::write(&token_file, format!("{token}\n")).unwrap();
            config.replacen(
                "admin:\n",
                &format!("admin:\n  tokenFile: {}\n", token_file.display()),
                1,
            )
        }
        Source::Env => config,
    };
    let cfg = env.dir.join("config.yaml");
    fs::write(&cfg, &config).unwrap();
    let command = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_lb-proxy"));
        c.env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env_remove("LB_PROXY_ADMIN_TOKEN")
            .env_remove("LB_PROXY_LOG_LEVEL")
            .env_remove("LB_PROXY_LOG_FORMAT")
            .env_remove("LB_PROXY_ADVERTISE")
            .arg("--config")
            .arg(&cfg)
            .args(["--log-level", level, "--log-format", format])
            .stdin(Stdio::null());
        if let Source::Env = source {
            c.env("LB_PROXY_ADMIN_TOKEN", &token);
        }
        c
    };

    // --check reads the token too.
    let out = command()
        .arg("--check")
        .output()
        .expect("run lb-proxy --check");
    assert!(out.status.success(), "--check: {out:?}");
    let check_out = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let log = env.dir.join("proxy.log");
    let stdout = env.dir.join("stdout.log");
    let child = command()
        .stdout(fs::File::create(&stdout).unwrap())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn lb-proxy");
    let mut guard = ChildGuard::new("lb-proxy", child);
    let admin = env.admin_addr();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !matches!(http_get(admin, "/healthz"), Ok((200, _))) {
        assert!(guard.try_wait().is_none(), "lb-proxy exited");
        assert!(Instant::now() < deadline, "admin API did not answer");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The token is in force.
    let version = get_json(admin, "/v1/destinations")["version"]
        .as_u64()
        .unwrap();
    let set = |v: u64, cap: u32| {
        json!({"version": v, "destinations": [
            {"id": "1", "uri": format!("sip:{ip}:{SERVER1_PORT}"), "resources": format!("pstn={cap}")},
        ]})
        .to_string()
    };
    assert_eq!(
        put_destinations(admin, None, &set(version + 1, 5)).code,
        401
    );
    let r = put_destinations(admin, Some(&token), &set(version + 1, 5));
    assert_eq!(r.code, 200, "{}", r.body);
    // Refused with the right token: a stale version, a bad body, an invalid set.
    assert_eq!(
        put_destinations(admin, Some(&token), &set(version, 6)).code,
        409
    );
    assert_eq!(put_destinations(admin, Some(&token), "{not json").code, 400);
    let bad = json!({"version": version + 2, "destinations": [
        {"id": "1", "uri": "sip:nowhere:1;transport=sctp", "resources": "pstn=1"}]})
    .to_string();
    assert_eq!(put_destinations(admin, Some(&token), &bad).code, 422);
    assert_eq!(post_state(admin, Some(&token), "1", "drain").code, 200);
    assert_eq!(post_state(admin, Some(&token), "9", "drain").code, 404);
    assert_eq!(post_state(admin, Some(&token), "1", "explode").code, 400);
    // Wrong or malformed Authorization headers.
    let with_token_and_junk = format!("Bearer {token}\u{e9}");
    let bare_token = token.clone();
    let basic = format!("Basic {token}");
    let headers: [&str; 4] = ["Bearer wrong", &with_token_and_junk, &bare_token, &basic];
    for h in headers {
        let r = http_request(
            admin,
            "PUT",
            "/v1/destinations",
            &[("Authorization", h)],
            None,
            Some(&set(version + 3, 7)),
        )
        .unwrap();
        assert!(
            r.code == 401 || r.code == 400,
            "Authorization {h:?}: {} {}",
            r.code,
            r.body
        );
    }
    // Reads with the token.
    let r = http(admin, "GET", "/v1/destinations", Some(&token), None);
    assert_eq!(r.code, 200);
    assert!(
        !r.body.contains(&token),
        "GET /v1/destinations shows the token"
    );
    let m = http(admin, "GET", "/metrics", Some(&token), None);
    assert!(!m.body.contains(&token), "/metrics shows the token");

    guard.signal("TERM");
    assert!(
        guard.wait_timeout(Duration::from_secs(10)).is_some(),
        "lb-proxy did not stop on SIGTERM"
    );

    let text = fs::read_to_string(&log).unwrap() + &fs::read_to_string(&stdout).unwrap();
    assert!(
        text.contains("destination set replaced"),
        "{case}: the log does not show the accepted PUT, so it is not the log we think:\n{text}"
    );
    for (what, t) in [("log", &text), ("--check output", &check_out)] {
        assert!(
            !t.contains(&token),
            "{case}: the admin token is in the proxy's {what} ({})",
            env.dir.display()
        );
    }
    eprintln!(
        "[admin_secrets] {case}: {} log lines at {level} ({format}), no token",
        text.lines().count()
    );
}

#[test]
fn token_file_never_logged_at_debug() {
    run_case(
        "secrets_file_debug",
        "127.0.5.50",
        Source::File,
        "debug",
        "pretty",
    );
}

#[test]
fn token_env_never_logged_at_debug_json() {
    run_case(
        "secrets_env_debug",
        "127.0.5.51",
        Source::Env,
        "debug",
        "json",
    );
}
