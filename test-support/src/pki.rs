//! Throwaway certificates for TLS tests, made with the openssl CLI in a test's folder.

use std::path::Path;
use std::process::{Command, Stdio};

/// The `req` options for a new P-256 key, unencrypted.
pub const NEW_EC_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";

/// Runs `openssl` with `args` (split at spaces; file names relative to `dir`); panics with
/// openssl's message when it fails.
pub fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (install it: scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "openssl {args} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA `name` (files `name.crt`, `name.key` in `dir`).
pub fn self_signed_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &format!(
            "req -x509 {NEW_EC_KEY} -keyout {name}.key -out {name}.crt -days 2 -subj /CN={name}"
        ),
    );
}

/// A certificate `name` (files `name.crt`, `name.key`) with the extensions `ext` (e.g.
/// `subjectAltName=IP:127.0.0.1`), issued by the CA `ca` (files `ca.crt`, `ca.key`).
pub fn issue(dir: &Path, name: &str, ext: &str, ca: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), format!("{ext}\n")).expect("write ext");
    openssl(
        dir,
        &format!("req {NEW_EC_KEY} -keyout {name}.key -out {name}.csr -subj /CN={name}"),
    );
    openssl(
        dir,
        &format!(
            "x509 -req -in {name}.csr -CA {ca}.crt -CAkey {ca}.key -CAcreateserial -out {name}.crt \
             -days 2 -extfile {name}.ext"
        ),
    );
}
