//! Polling with deadlines: a blocking form for the proxy's thread-based tests, an async one for
//! the operator's tokio tests. Both panic with what they waited for when the deadline passes.

use std::time::{Duration, Instant};

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
        std::thread::sleep(every);
    }
}

/// Polls `f` every `every` until it returns `Ok`, or panics after `timeout` with `what` and
/// what `f` last returned: `wait_for` for conditions whose near misses say what went wrong.
pub fn wait_ok<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last seen: {e}");
                }
            }
        }
        std::thread::sleep(every);
    }
}

/// Calls `f` every `every` until it returns `Ok`; panics after `timeout` with what it last
/// returned.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last seen: {e}");
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}
