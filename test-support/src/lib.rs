//! What the integration tests of `lb-proxy` and `lb-operator` share (not published).
//!
//! - `process`: child processes held by a guard that kills them by PID and reaps them on drop,
//!   panics included.
//! - `poll`: waiting with a deadline (`wait_for` and `wait_ok` for thread-based tests,
//!   `eventually` for tokio tests).
//! - `env`: one test's address and folder (`TestEnv`, made with `test_env!`).
//! - `admin`: the proxy's admin API over HTTP (reqwest), decoded with the `lb-api` types.
//! - `metrics`: a Prometheus text reader.
//! - `sipp`: sipp processes from a builder (`Sipp::uac(&env, "client").calls(3).rate(10)
//!   .hold(secs(3)).run()`) and what they report.
//! - `proxy`: the `lb-proxy` process, its config, and `Sandbox` (a proxy with sipp servers
//!   behind it).
//!
//! Conventions of the proxy's real-socket tests:
//!
//! Each test takes its own loopback address (127.0.1.N) so the tests of a binary can run in
//! parallel: proxy on N:5060 (UDP and TCP), admin on N:8081, servers on N:5080 and N:5090,
//! clients on N:5070 (and N:5071 for a second one). sipp's control and media sockets get
//! per-process ports on the same address.
//!
//! IPv6 tests share the one IPv6 loopback address, `::1`: they put their sipp processes there
//! with `SippBuilder::at` on ports no other test uses, keep the proxy's admin API on their own
//! 127.0.1.N, and number their sipp processes with `TestEnv::with_sipp_slots` so that the
//! media ports sipp binds on `::1` (20000 + 10 × slot) do not collide either.
//!
//! Every process is a child held by a guard that kills it (by its PID) and reaps it on drop,
//! panics included. A test's files (config, proxy log, sipp logs and statistics) live in
//! `target/tmp/<test>-<pid>-<ms>/`; they are kept, and the interesting ones printed, when the
//! test fails, and removed when it passes (unless `KEEP_TEST_FILES=1`). `SIPP_TRACE_MSG=1`
//! makes every sipp log the messages it sends and receives (`messages.log`).

#![allow(clippy::unwrap_used)]

pub mod admin;
pub mod env;
pub mod metrics;
pub mod pki;
pub mod poll;
pub mod process;
pub mod proxy;
pub mod sipp;

pub use admin::*;
pub use env::*;
pub use metrics::*;
pub use poll::*;
pub use process::*;
pub use proxy::*;
pub use sipp::*;
