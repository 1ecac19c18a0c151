//! The admin API over TLS (`admin.tls`), with curl as the client: it answers HTTPS with the
//! configured certificate (and nothing in clear), the token rules hold over it, and a new
//! certificate written over the files is presented to new connections without a restart,
//! while a changed file that does not load leaves the last good certificate in place.
//!
//! Each run makes a throwaway PKI with the openssl CLI in its folder.
//! Needs `curl` and `openssl` (scripts/install-deps.sh). Address: 127.0.14.3.
//! Run: `cargo test -p lb-proxy --test admin_tls`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::pki;
use mrcp_lb_test_support::*;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const IP: &str = "127.0.14.3";

/// A certificate `name` for the test's IP address, issued by the test CA.
fn issue(dir: &Path, name: &str) {
    pki::issue(
        dir,
        name,
        &format!("subjectAltName=IP:{IP}\nbasicConstraints=critical,CA:FALSE"),
        "ca",
    );
}

/// `curl` GET over HTTPS trusting the test CA: (HTTP status, body, the served certificate's
/// subject CN), or curl's error.
fn curl(dir: &Path, path: &str, bearer: Option<&str>) -> Result<(u16, String, String), String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-v", "--noproxy", "*", "--max-time", "3", "--cacert"])
        .arg(dir.join("ca.crt"))
        .args(["-w", "\n%{http_code}"])
        .arg(format!("https://{IP}:{ADMIN_PORT}{path}"));
    if let Some(t) = bearer {
        cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    let out = cmd.stdin(Stdio::null()).output().expect("run curl");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    if !out.status.success() {
        return Err(stderr);
    }
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let cn = stderr
        .lines()
        .find_map(|l| {
            l.split_once("subject: CN=")
                .map(|(_, cn)| cn.trim().to_string())
        })
        .unwrap_or_default();
    Ok((code.trim().parse().unwrap_or(0), body.to_string(), cn))
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> Result<(), String>) {
    let end = Instant::now() + timeout;
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if Instant::now() >= end => panic!("timed out: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn admin_api_over_tls_with_the_certificate_reloaded_in_place() {
    let env = test_env!("admin_tls", IP);
    let pki = env.subdir("pki");
    pki::self_signed_ca(&pki, "ca");
    issue(&pki, "admin-one");
    issue(&pki, "admin-two");
    // What the proxy reads (a Secret volume in Kubernetes).
    let live = env.subdir("live");
    fs::copy(pki.join("admin-one.crt"), live.join("tls.crt")).unwrap();
    fs::copy(pki.join("admin-one.key"), live.join("tls.key")).unwrap();
    fs::write(live.join("token"), "tls-t0k3n\n").unwrap();

    let admin = format!("admin:\n  listen: {}\n", env.admin_addr());
    let config = config_yaml(&env, "absolute", &[], "").replace(
        &admin,
        &format!(
            "{admin}  tokenFile: {dir}/token\n  protectReads: true\n  tls:\n    certFile: \
             {dir}/tls.crt\n    keyFile: {dir}/tls.key\n    reloadInterval: 200ms\n",
            dir = live.display()
        ),
    );
    let cfg = env.subdir("proxy").join("config.yaml");
    fs::write(&cfg, &config).unwrap();
    let log = env.dir.join("proxy.log");
    let child = clean_env(&mut Command::new(env.proxy_bin()))
        .env("NO_COLOR", "1")
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn lb-proxy");
    let mut guard = ChildGuard::new("lb-proxy", child);

    wait_for(Duration::from_secs(15), || {
        match curl(&pki, "/healthz", None)? {
            (200, body, cn) if body == "ok\n" && cn == "admin-one" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // Nothing in clear on the admin port.
    assert!(
        http_get(env.admin_addr(), "/healthz").map_or(true, |(code, _)| code != 200),
        "plain HTTP answered"
    );
    // The token rules hold over TLS.
    assert_eq!(curl(&pki, "/v1/destinations", None).unwrap().0, 401);
    assert_eq!(
        curl(&pki, "/v1/destinations", Some("tls-t0k3n")).unwrap().0,
        200
    );

    // A changed file that does not load: the last good certificate stays.
    fs::write(
        live.join("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nnot one\n",
    )
    .unwrap();
    wait_for(Duration::from_secs(5), || {
        let text = fs::read_to_string(&log).unwrap_or_default();
        text.contains("does not load")
            .then_some(())
            .ok_or("no warning yet".to_string())
    });
    assert_eq!(curl(&pki, "/healthz", None).unwrap().2, "admin-one");

    // The new pair, as a Secret update writes it: presented without a restart.
    let t = Instant::now();
    fs::copy(pki.join("admin-two.key"), live.join("tls.key")).unwrap();
    fs::copy(pki.join("admin-two.crt"), live.join("tls.crt")).unwrap();
    wait_for(Duration::from_secs(5), || {
        match curl(&pki, "/healthz", None)? {
            (200, _, cn) if cn == "admin-two" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    eprintln!(
        "[admin_tls] new certificate presented {:?} after the files changed (reload every 200 ms)",
        t.elapsed()
    );
    assert!(guard.try_wait().is_none(), "lb-proxy exited");
}
