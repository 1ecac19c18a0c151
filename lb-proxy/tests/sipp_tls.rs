//! SIP over TLS against real peers (docs/configuration.md `tls`). sipp (Debian's) has no TLS,
//! so socat carries it on both sides:
//!
//! sipp client (TCP) → socat TCP-LISTEN → OPENSSL (checks the proxy's certificate) →
//! lb-proxy `tls` listener → TLS (the proxy checks the server's certificate) →
//! socat OPENSSL-LISTEN (the server's certificate) → TCP → sipp server.
//!
//! Each test makes its own throwaway PKI with the openssl CLI in its folder: a test CA, a
//! certificate for the proxy (IP SAN) and one per server. Calls go end to end; a destination
//! whose certificate does not verify (wrong name, unknown issuer) is never used; a client
//! that speaks plain TCP to the TLS port is dropped while TLS calls go on.
//!
//! Addresses: 127.0.1.81 to 127.0.1.85.
//!
//! Needs `sipp` (sip-tester), `socat` and `openssl` (scripts/install-deps.sh).
//! Run: `cargo test -p lb-proxy --test sipp_tls`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TLS_PORT: u16 = 5061;
/// Where the client-side socat listens for sipp's TCP.
const CLIENT_SOCAT_PORT: u16 = 15061;
const SERVER3_PORT: u16 = 5100;
/// A server's TLS port (its socat) is its sipp port + 1.
const fn tls_port(sipp_port: u16) -> u16 {
    sipp_port + 1
}

// ---- certificates -------------------------------------------------------------------------

/// A throwaway PKI in the test's folder, made with the openssl CLI.
struct Pki {
    dir: PathBuf,
    /// The CA certificate (a path the proxy and socat read).
    ca: PathBuf,
    /// The CA key's file name in `dir`.
    ca_key: String,
}

/// A certificate and its key (PEM files).
struct Cert {
    crt: PathBuf,
    key: PathBuf,
}

/// Runs `openssl` with `args` (split at spaces; file names are relative to `dir`).
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (install it: scripts/install-deps.sh)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openssl {args} failed: {err}");
}

/// A new P-256 key, unencrypted.
const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";

/// A new key and a self-signed CA certificate `name` (openssl's v3_ca: CA:TRUE); returns the
/// file names (in `dir`).
fn self_signed_ca(dir: &Path, name: &str) -> (String, String) {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    openssl(
        dir,
        &format!("req -x509 {NEW_KEY} -keyout {key} -out {crt} -days 2 -subj /CN={name}"),
    );
    (crt, key)
}

impl Pki {
    fn new(env: &TestEnv) -> Pki {
        let dir = env.dir.join("pki");
        fs::create_dir_all(&dir).unwrap();
        let (ca, ca_key) = self_signed_ca(&dir, "test-ca");
        Pki {
            ca: dir.join(ca),
            ca_key,
            dir,
        }
    }

    /// A server certificate for the IP address `san`, issued by the CA whose certificate and
    /// key are the files `ca` (in this PKI's folder).
    fn issue_by(&self, name: &str, san: &str, ca: (&str, &str)) -> Cert {
        let d = &self.dir;
        let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
        fs::write(
            d.join(format!("{name}.ext")),
            format!(
                "subjectAltName=IP:{san}\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )
        .unwrap();
        let subj = format!("-subj /CN={name}");
        openssl(
            d,
            &format!("req {NEW_KEY} -keyout {key} -out {name}.csr {subj}"),
        );
        openssl(
            d,
            &format!(
                "x509 -req -in {name}.csr -CA {} -CAkey {} -CAcreateserial -out {crt} -days 2 \
                 -extfile {name}.ext",
                ca.0, ca.1
            ),
        );
        Cert {
            crt: d.join(crt),
            key: d.join(key),
        }
    }

    fn issue(&self, name: &str, san: &str) -> Cert {
        self.issue_by(name, san, ("test-ca.crt", &self.ca_key))
    }

    /// A certificate for `san` from a CA the proxy does not know.
    fn rogue(&self, name: &str, san: &str) -> Cert {
        let (ca, key) = self_signed_ca(&self.dir, &format!("{name}-ca"));
        self.issue_by(name, san, (&ca, &key))
    }
}

// ---- socat --------------------------------------------------------------------------------

/// A socat process (with `fork`: a child per connection), killed by PID with its children.
struct Socat {
    guard: ChildGuard,
}

impl Socat {
    /// Runs `socat -d -d <a> <b>` and waits until it listens on `ip:port`.
    fn start(env: &TestEnv, name: &str, a: &str, b: &str, ip: &str, port: u16) -> Socat {
        let log = fs::File::create(env.dir.join(format!("{name}.socat.log"))).unwrap();
        let child = Command::new("socat")
            .args(["-d", "-d", a, b])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn socat (install it: scripts/install-deps.sh)");
        let s = Socat {
            guard: ChildGuard::new(name, child),
        };
        wait_for(
            &format!("socat {name} to listen on {ip}:{port}"),
            Duration::from_secs(5),
            Duration::from_millis(20),
            || listening(ip, port).then_some(()),
        );
        s
    }

    /// sipp's TCP on `ip:CLIENT_SOCAT_PORT` to the proxy's TLS port, checking the proxy's
    /// certificate against the test CA and the proxy's IP.
    fn client_side(env: &TestEnv, pki: &Pki) -> Socat {
        let ip = &env.ip;
        Socat::start(
            env,
            "client-tls",
            &format!("TCP-LISTEN:{CLIENT_SOCAT_PORT},bind={ip},reuseaddr,fork"),
            &format!(
                "OPENSSL:{ip}:{TLS_PORT},bind={ip},cafile={},verify=1",
                pki.ca.display()
            ),
            ip,
            CLIENT_SOCAT_PORT,
        )
    }

    /// TLS with `cert` on `ip:tls_port(sipp_port)`, to the TCP sipp server on `sipp_port`.
    fn server_side(env: &TestEnv, name: &str, cert: &Cert, sipp_port: u16) -> Socat {
        let ip = &env.ip;
        let port = tls_port(sipp_port);
        Socat::start(
            env,
            name,
            &format!(
                "OPENSSL-LISTEN:{port},bind={ip},reuseaddr,fork,cert={},key={},verify=0",
                cert.crt.display(),
                cert.key.display()
            ),
            &format!("TCP:{ip}:{sipp_port},bind={ip}"),
            ip,
            port,
        )
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        // The children first (by PID), so none outlives the test, then socat itself.
        let pid = self.guard.pid();
        for child in children_of(pid) {
            let _ = Command::new("kill")
                .args(["-KILL", &child.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        self.guard.kill();
    }
}

/// The processes whose parent is `pid` (from /proc/*/stat).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Whether a TCP socket listens on `ip:port` (IPv4, from /proc/net/tcp).
fn listening(ip: &str, port: u16) -> bool {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    let want = format!("{:08X}:{port:04X}", u32::from_le_bytes(ip.octets()),);
    fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
    })
}

// ---- proxy --------------------------------------------------------------------------------

/// A TLS destination: its id, its sipp server's TCP port (its TLS port is one more), capacity.
struct TlsDest {
    id: u32,
    sipp_port: u16,
    pstn: u32,
}

/// UDP, TCP and TLS listeners on this test's address, admin on :8081, the `tls` section with the
/// proxy's certificate, the test CA and `verify` (verifyDestinations), TLS destinations, then
/// `extra` (top-level YAML).
fn tls_config(env: &TestEnv, pki: &Pki, dests: &[TlsDest], verify: bool, extra: &str) -> String {
    let ip = &env.ip;
    let proxy = pki.issue("proxy", ip);
    let mut y = format!(
        "listeners:\n  - udp:{ip}:{PROXY_PORT}\n  - tcp:{ip}:{PROXY_PORT}\n  - tls:{ip}:{TLS_PORT}\n\
         admin:\n  listen: {ip}:{ADMIN_PORT}\n\
         tls:\n  certFile: {}\n  keyFile: {}\n  caFile: {}\n  verifyDestinations: {verify}\n\
         routing:\n  resources: [pstn]\n  mode: absolute\n  maxAttempts: 3\n\
         timers:\n  inviteTimeout: 3s\n\
         destinations:\n",
        proxy.crt.display(),
        proxy.key.display(),
        pki.ca.display()
    );
    for d in dests {
        y.push_str(&format!(
            "  - id: {}\n    uri: sip:{ip}:{};transport=tls\n    resources: pstn={}\n",
            d.id,
            tls_port(d.sipp_port),
            d.pstn
        ));
    }
    y.push_str(extra);
    y
}

/// Failed TLS handshakes on `side` (`accept` or `connect`).
fn handshakes_failed(admin: SocketAddr, side: &str) -> u64 {
    let name = "mrcp_lb_tls_handshakes_failed_total";
    scraped_sum(admin, name, &[("side", side)]) as u64
}

/// A sipp client (TCP) calling through the client-side socat.
fn tls_client(env: &TestEnv, name: &str, calls: u64, extra: &[&str]) -> Sipp {
    let local: SocketAddr = env.addr(CLIENT_PORT).parse().unwrap();
    let target = env.addr(CLIENT_SOCAT_PORT);
    let calls = calls.to_string();
    let mut args = vec!["-m", calls.as_str()];
    args.extend_from_slice(extra);
    Sipp::uac(env, name)
        .at(local)
        .to(target)
        .tcp()
        .timeout(secs(40))
        .args(args)
        .start()
}

// ---- tests --------------------------------------------------------------------------------

const CALLS: u64 = 10;

/// Who issued the certificate of the server in [`OneServer`].
enum Issuer {
    TestCa,
    Unknown,
}

/// A proxy with one TLS destination (id 1): a TCP sipp server running `scenario` behind socat
/// with a certificate for its address from `issuer`, and the client-side socat. Dropped in
/// this order: proxy first.
struct OneServer {
    proxy: Proxy,
    server: Sipp,
    _server_tls: Socat,
    _client_tls: Socat,
}

impl OneServer {
    /// `verify` is `tls.verifyDestinations`; `extra` top-level YAML.
    fn start(
        env: &TestEnv,
        scenario: &'static str,
        issuer: Issuer,
        verify: bool,
        extra: &str,
    ) -> OneServer {
        let pki = Pki::new(env);
        let server_cert = match issuer {
            Issuer::TestCa => pki.issue("server1", &env.ip),
            Issuer::Unknown => pki.rogue("server1", &env.ip),
        };
        let dests = [TlsDest {
            id: 1,
            sipp_port: SERVER1_PORT,
            pstn: 100,
        }];
        // Not waited for: the proxy reaches the server through socat, started below.
        let (proxy, [server]) = Sandbox::new(env)
            .custom_config(tls_config(env, &pki, &dests, verify, extra))
            .server(
                None,
                Sipp::uas(env, "server1")
                    .scenario(scenario)
                    .port(SERVER1_PORT)
                    .tcp(),
            )
            .start();
        OneServer {
            proxy,
            server,
            _server_tls: Socat::server_side(env, "server1-tls", &server_cert, SERVER1_PORT),
            _client_tls: Socat::client_side(env, &pki),
        }
    }

    /// Waits for the server's calls to end, stops it and checks it failed none; the proxy
    /// must still run. Returns the proxy, for what the test checks after.
    fn finish(self) -> (Proxy, SippReport) {
        let OneServer {
            mut proxy, server, ..
        } = self;
        proxy.assert_running();
        let server = server.drain();
        eprintln!("{}", server.summary());
        assert_server_clean(&server);
        server.assert_no_stray_messages();
        (proxy, server)
    }
}

/// Waits for a client and checks all its calls succeeded.
fn all_ok(client: Sipp, calls: u64) -> SippReport {
    let client = client.wait(Duration::from_secs(40));
    eprintln!("{}", client.summary());
    client.assert_all_ok(calls);
    client.assert_no_stray_messages();
    client
}

/// TLS callers and plain TCP callers side by side, to a server reached over TLS; OPTIONS
/// probes over TLS too.
#[test]
fn calls_go_end_to_end_over_tls_with_probes() {
    let env = test_env!("tls_calls", "127.0.1.81");
    let probing = "probing:\n  interval: 1s\n";
    let one = OneServer::start(&env, "uas_tls.xml", Issuer::TestCa, true, probing);
    let admin = one.proxy.admin;
    let probes_ok = || {
        let uri = format!("sip:{}:5081;transport=tls", env.ip);
        let labels = [("destination", "1"), ("uri", &uri), ("result", "success")];
        scraped_sum(admin, "mrcp_lb_destination_probes_total", &labels)
    };
    wait_for(
        "an OPTIONS probe over TLS to succeed",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || (probes_ok() >= 1.0).then_some(()),
    );

    let args = ["-r", "5", "-l", "20", "-d", "500"];
    let client = tls_client(&env, "client", CALLS, &args);
    let calls = CALLS.to_string();
    let mut tcp_args = vec!["-m", calls.as_str()];
    tcp_args.extend_from_slice(&args);
    let tcp_client = Sipp::uac(&env, "tcp-client")
        .port(CLIENT2_PORT)
        .tcp()
        .timeout(secs(40))
        .args(tcp_args)
        .start();
    // Two TLS connections while the calls run: the client's, and the one to the server.
    wait_for(
        "the client's and the server's TLS connections",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || (scraped_sum(admin, "mrcp_lb_tls_connections", &[]) >= 2.0).then_some(()),
    );
    all_ok(client, CALLS);
    all_ok(tcp_client, CALLS);
    // uas_tls.xml fails a call whose INVITE lacks the proxy's TLS Via or Record-Route.
    let (proxy, server) = one.finish();
    assert_eq!(server.invites(), 2 * CALLS, "{}", server.summary());
    assert!(
        server.count("OPTIONS_Recv") >= 1,
        "no probe reached the server"
    );
    let stats = proxy.wait_idle(Duration::from_secs(10));
    assert_eq!((stats.processed, stats.failed), (2 * CALLS, 0), "{stats:?}");
    assert_eq!(handshakes_failed(admin, "accept"), 0);
    assert_eq!(handshakes_failed(admin, "connect"), 0);
}

#[test]
fn a_destination_whose_certificate_does_not_verify_is_not_used() {
    let env = test_env!("tls_bad_cert", "127.0.1.82");
    let pki = Pki::new(&env);
    // The largest capacities go to the bad ones, so that calls try them first: a certificate
    // from the test CA for another address, and one for this address from an unknown CA.
    let servers = [
        (SERVER1_PORT, 300, pki.issue("wrong-name", "127.0.1.99")),
        (SERVER2_PORT, 200, pki.rogue("unknown-ca", &env.ip)),
        (SERVER3_PORT, 100, pki.issue("good", &env.ip)),
    ];
    let dests: Vec<TlsDest> = servers
        .iter()
        .enumerate()
        .map(|(i, (port, pstn, _))| TlsDest {
            id: i as u32 + 1,
            sipp_port: *port,
            pstn: *pstn,
        })
        .collect();
    // Probes rare: the calls, not the probes, find the bad certificates.
    let extra = "probing:\n  interval: 60s\n";
    let mut proxy = Proxy::start(&env, &tls_config(&env, &pki, &dests, true, extra));
    let servers = servers.map(|(port, _, cert)| {
        let name = format!("server{port}");
        let s = Sipp::uas(&env, &name)
            .scenario("uas_tls.xml")
            .port(port)
            .tcp()
            .start();
        let tls = Socat::server_side(&env, &format!("{name}-tls"), &cert, port);
        (s, tls)
    });
    let _client_tls = Socat::client_side(&env, &pki);

    let client = tls_client(&env, "client", CALLS, &["-r", "5", "-l", "20", "-d", "300"]);
    all_ok(client, CALLS);
    proxy.assert_running();
    let admin = proxy.admin;
    let reports: Vec<SippReport> = servers
        .into_iter()
        .map(|(s, _tls)| {
            s.wait_no_calls(Duration::from_secs(10));
            s.stop()
        })
        .collect();
    for r in &reports {
        eprintln!("{}", r.summary());
    }
    assert_eq!(reports[0].invites(), 0, "wrong-name server used");
    assert_eq!(reports[1].invites(), 0, "unknown-CA server used");
    assert_eq!(reports[2].invites(), CALLS, "{}", reports[2].summary());
    assert_server_clean(&reports[2]);
    let ds = proxy.destinations();
    let states: Vec<&str> = ["1", "2", "3"]
        .map(|id| dest(&ds, id).state.as_str())
        .to_vec();
    assert_eq!(states, ["down", "down", "up"], "{ds:?}");
    let failovers = stats_number(admin, "failovers");
    assert!(failovers >= 2, "failovers: {failovers}");
    let failed = handshakes_failed(admin, "connect");
    assert!(failed >= 2, "connect-side handshake failures: {failed}");
    assert!(
        proxy_log_contains(&proxy, "invalid peer certificate"),
        "the proxy log says why"
    );
    let stats = proxy.wait_idle(Duration::from_secs(10));
    assert_eq!((stats.processed, stats.failed), (CALLS, 0), "{stats:?}");
}

/// Opens a TCP connection to the proxy's TLS port, writes `data` and returns how long the
/// proxy took to close it (panics after `limit`).
fn closed_after(to: SocketAddr, data: &[u8], limit: Duration) -> Duration {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    let t0 = Instant::now();
    s.write_all(data).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return t0.elapsed(),
            // A TLS alert is all the proxy may answer: never SIP.
            Ok(n) => assert!(
                !String::from_utf8_lossy(&buf[..n]).contains("SIP/2.0"),
                "the proxy answered plain SIP on its TLS port"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return t0.elapsed(),
            Err(e) => panic!("connection to {to} not closed within {limit:?}: {e}"),
        }
    }
}

#[test]
fn plain_tcp_to_the_tls_port_is_dropped_while_tls_calls_go_on() {
    let env = test_env!("tls_plain_client", "127.0.1.83");
    let tcp = "tcp:\n  messageTimeout: 2s\n";
    let one = OneServer::start(&env, "uas.xml", Issuer::TestCa, true, tcp);
    let tls_addr: SocketAddr = env.addr(TLS_PORT).parse().unwrap();
    let admin = one.proxy.admin;

    // 20 TLS calls of 2 s each, 5 a second: calls are open while the bad clients come.
    let calls = 20;
    let client = tls_client(
        &env,
        "client",
        calls,
        &["-r", "5", "-l", "20", "-d", "2000"],
    );
    wait_for(
        "TLS calls to be open",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || (dialog_stats(admin).active >= 2).then_some(()),
    );

    // sipp speaking plain SIP over TCP to the TLS port: its calls cannot go anywhere.
    let plain = Sipp::uac(&env, "plain-client")
        .at(env.addr(CLIENT2_PORT).parse().unwrap())
        .to(env.addr(TLS_PORT))
        .tcp()
        .timeout(secs(5))
        .calls(3)
        .rate(3)
        .hold(ms(500))
        .start();
    // A plain INVITE by hand: the connection is closed at once, nothing answered.
    let invite = format!(
        "INVITE sip:svc@{ip}:{TLS_PORT} SIP/2.0\r\nVia: SIP/2.0/TCP {ip}:5999;branch=z9hG4bK-plain\r\n\
         Max-Forwards: 70\r\nFrom: <sip:a@{ip}>;tag=p1\r\nTo: <sip:svc@{ip}>\r\n\
         Call-ID: plain-1@{ip}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        ip = env.ip
    );
    let took = closed_after(tls_addr, invite.as_bytes(), Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(1),
        "plain INVITE: closed after {took:?}"
    );
    // A connection that never starts its handshake holds its place tcp.messageTimeout (2 s).
    let took = closed_after(tls_addr, b"", Duration::from_secs(6));
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "silent connection: closed after {took:?}"
    );

    let plain = plain.wait(Duration::from_secs(10));
    eprintln!("{}", plain.summary());
    all_ok(client, calls);
    let (proxy, server) = one.finish();
    assert_eq!(server.invites(), calls, "{}", server.summary());
    // (sipp may stop before its statistics say anything: no row counts as no call.)
    let plain_ok = plain
        .stats
        .get("SuccessfulCall(C)")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert_eq!(plain_ok, 0, "{}", plain.summary());
    // Only the TLS client's INVITEs reached the core: none of the plain ones.
    let invites = scraped_sum(
        admin,
        "mrcp_lb_sip_requests_received_total",
        &[("method", "INVITE")],
    ) as u64;
    assert_eq!(invites, calls, "INVITEs the proxy received");
    assert_eq!(stats_number(admin, "malformed"), 0);
    // sipp's connection(s), the plain INVITE, the silent one.
    let failed = handshakes_failed(admin, "accept");
    assert!(failed >= 3, "accept-side handshake failures: {failed}");
    let stats = proxy.wait_idle(Duration::from_secs(10));
    assert_eq!((stats.processed, stats.failed), (calls, 0), "{stats:?}");
}

#[test]
fn unverified_destinations_only_when_configured_with_a_warning() {
    let env = test_env!("tls_no_verify", "127.0.1.84");
    let one = OneServer::start(&env, "uas_tls.xml", Issuer::Unknown, false, "");
    let calls = 5;
    all_ok(
        tls_client(&env, "client", calls, &["-r", "5", "-d", "200"]),
        calls,
    );
    let (proxy, server) = one.finish();
    assert_eq!(server.invites(), calls, "{}", server.summary());
    assert!(
        proxy_log_contains(&proxy, "tls.verifyDestinations is false"),
        "the proxy warns that it does not check servers"
    );
    assert_eq!(handshakes_failed(proxy.admin, "connect"), 0);
}

/// `lb-proxy --config FILE --check`: exit status and stderr.
fn check(file: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lb-proxy"))
        .arg("--config")
        .arg(file)
        .arg("--check")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_tls_files_stop_the_proxy_naming_the_field() {
    let env = test_env!("tls_bad_files", "127.0.1.85");
    let pki = Pki::new(&env);
    let proxy = pki.issue("proxy", &env.ip);
    let other = pki.issue("other", &env.ip);
    let head = format!("listeners: [\"tls:{}:{TLS_PORT}\"]\n", env.ip);
    let section = |crt: &Path, key: &Path, ca: &Path| {
        format!(
            "{head}tls: {{certFile: {}, keyFile: {}, caFile: {}}}\n",
            crt.display(),
            key.display(),
            ca.display()
        )
    };
    let cases = [
        // The key of another certificate.
        (section(&proxy.crt, &other.key, &pki.ca), "tls.keyFile"),
        // A key where the certificate should be.
        (section(&proxy.key, &proxy.key, &pki.ca), "tls.certFile"),
        // A key where the CA certificates should be.
        (section(&proxy.crt, &proxy.key, &proxy.key), "tls.caFile"),
    ];
    for (i, (yaml, field)) in cases.iter().enumerate() {
        let file = env.dir.join(format!("bad{i}.yaml"));
        fs::write(&file, yaml).unwrap();
        let (code, stderr) = check(&file);
        assert_eq!(code, Some(2), "{yaml}: {stderr}");
        assert!(stderr.contains(field), "{yaml}: want {field} in {stderr}");
    }
    let file = env.dir.join("good.yaml");
    fs::write(&file, section(&proxy.crt, &proxy.key, &pki.ca)).unwrap();
    let (code, stderr) = check(&file);
    assert_eq!(code, Some(0), "{stderr}");
}
