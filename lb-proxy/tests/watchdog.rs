//! The liveness watchdog, against a real lb-proxy whose core thread is stalled on purpose:
//! `/healthz` answers 200 while the core turns over, 503 within `admin.livenessTimeout` once it
//! does not (so the kubelet's liveness probe restarts a stuck proxy), and 200 again when it
//! turns over again. The stall needs a test build: `POST /v1/test/stall` exists only with the
//! `test-stall` feature, so this file compiles to nothing without it.
//!
//! Run: `cargo test -p lb-proxy --features test-stall --test watchdog` (`make test` does).
//! Address: 127.0.14.2.

#![cfg(feature = "test-stall")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn healthz_fails_while_the_core_is_stalled_and_recovers_after() {
    let env = test_env!("watchdog", "127.0.14.2");
    let token_file = env.subdir("secret").join("token");
    fs::write(&token_file, "w4tchd0g\n").unwrap();
    let admin = format!("admin:\n  listen: {}\n", env.admin_addr());
    let config = config_yaml(&env, "absolute", &[], "").replace(
        &admin,
        &format!(
            "{admin}  tokenFile: {}\n  livenessTimeout: 500ms\n",
            token_file.display()
        ),
    );
    assert!(config.contains("livenessTimeout"), "{config}");
    let proxy = Proxy::start(&env, &config);
    let addr = proxy.admin;
    assert_eq!(http_get(addr, "/healthz").unwrap(), (200, "ok\n".into()));

    // Without the token the stall is refused: a write like any other.
    let r = http(addr, "POST", "/v1/test/stall?ms=3000", None, None);
    assert_eq!(r.code, 401, "{}", r.body);
    let t0 = Instant::now();
    let r = http(
        addr,
        "POST",
        "/v1/test/stall?ms=3000",
        Some("w4tchd0g"),
        None,
    );
    assert_eq!(r.code, 202, "{}", r.body);
    thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let (code, body) = http_get(addr, "/healthz").unwrap();
    let took = t.elapsed();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("did not answer within 500ms"), "{body}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(2),
        "answered after {took:?}"
    );
    eprintln!("[watchdog] stalled core: /healthz 503 after {took:?}");
    // The core turns over again: alive again.
    let back = eventually_sync(Duration::from_secs(10), || {
        matches!(http_get(addr, "/healthz"), Ok((200, _)))
    });
    assert!(back, "/healthz did not recover");
    assert!(
        t0.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        t0.elapsed()
    );
    eprintln!(
        "[watchdog] /healthz 200 again {:?} after the 3 s stall began",
        t0.elapsed()
    );
    assert!(proxy_log_contains(
        &proxy,
        "watchdog: the core did not answer"
    ));
}

/// Polls `f` every 50 ms until it holds or `timeout` passes.
fn eventually_sync(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}
