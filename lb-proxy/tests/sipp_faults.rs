//! Faults with calls open, driven by sipp: a server that dies in the middle of calls, one
//! that black-holes every packet, and the proxy itself killed and restarted between the
//! INVITE and the BYE of long calls.
//!
//! Each test has its own address: 127.0.1.61 (dead server), .62 (black hole), .63 (proxy
//! restart); the graceful shutdown tests (`sipp_shutdown`) have .64 to .66.
//!
//! Needs `sipp` (Debian package `sip-tester`) and `python3` (the black hole). Run:
//! `cargo test -p lb-proxy --test sipp_faults`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// More client ports on the test's address (5070 and 5071 are `CLIENT_PORT`, `CLIENT2_PORT`).
const CLIENT3_PORT: u16 = 5072;
const CLIENT4_PORT: u16 = 5073;

/// Kills a process by PID with SIGKILL (its guard reaps it later).
fn kill_9(pid: u32) {
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stdin(Stdio::null())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -KILL {pid} failed");
}

/// A UDP socket on `ip:port` that reads every datagram and never answers; it logs the first
/// line of each to `log`.
fn black_hole(env: &TestEnv, ip: &str, port: u16, log: &Path) -> ChildGuard {
    let script = r#"
import socket, sys
ip, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((ip, port))
with open(path, "a") as f:
    f.write("ready\n")
    f.flush()
    while True:
        data, _ = s.recvfrom(65535)
        f.write(data.split(b"\r\n", 1)[0].decode("latin-1") + "\n")
        f.flush()
"#;
    let child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(ip)
        .arg(port.to_string())
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(env.dir.join("black_hole.stderr")).unwrap())
        .spawn()
        .expect("spawn python3 (the black hole)");
    let guard = ChildGuard::new("black_hole", child);
    wait_for(
        "the black hole to bind",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            fs::read_to_string(log)
                .is_ok_and(|t| t.starts_with("ready"))
                .then_some(())
        },
    );
    guard
}

/// How server 1 fails in `server_fails_with_calls_open`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    /// Killed (SIGKILL): its port is closed.
    Dies,
    /// Killed, and a socket that never answers takes its address.
    BlackHole,
}

/// Server 1 carries six long calls when it fails: four whose caller hangs up after 8 s, two
/// that nobody hangs up. New calls must stop going to it as soon as the proxy sees it fail
/// (an INVITE timing out, or probes), its open calls must end (the callers' BYEs, the dialog
/// lifetime of 20 s) and leave no dialog and no load behind.
fn server_fails_with_calls_open(env: &TestEnv, fault: Fault) {
    let probing = match fault {
        // Default probing (every 10 s, 3 failures): the INVITE timeout comes first.
        Fault::Dies => "",
        // Fast probing: the probes take it down before any new call is sent.
        Fault::BlackHole => {
            "probing:\n  interval: 1s\n  timeout: 1s\n  failureThreshold: 2\n  successThreshold: 2\n"
        }
    };
    let (proxy, [s1, s2]) = Sandbox::new(env)
        // Server 1 has the larger capacity: every call goes there while it is up.
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=100"), "uas.xml")
        .serve(Dest::udp(2, SERVER2_PORT, "pstn=50"), "uas.xml")
        .extra(&format!("dialogs:\n  lifetime: 20s\n{probing}"))
        // A BYE nobody answers gets the proxy's 408 after 4 s (default 64 × T1 = 32 s).
        .edit_config(|c| {
            let c = c.replace(
                "inviteFinalTimeout: 30s\n",
                "inviteFinalTimeout: 30s\n  nonInviteTimeout: 4s\n",
            );
            assert!(c.contains("nonInviteTimeout"), "{c}");
            c
        })
        .start();
    let admin = proxy.admin;

    let t0 = Instant::now();
    let hang_up_after_8s = Sipp::uac(env, "bye_after_8s")
        .timeout(secs(50))
        .calls(4)
        .rate(20)
        .limit(4)
        .hold(ms(8000))
        .start();
    let never_hang_up = Sipp::uac(env, "never_hang_up")
        .scenario("uac_long_expect_bye.xml")
        .port(CLIENT2_PORT)
        .timeout(secs(40))
        .calls(2)
        .rate(20)
        .limit(2)
        .start();
    wait_for(
        "6 calls answered by server 1",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            let st = dialog_stats(admin);
            (st.active == 6 && pstn_load(&destination_status(admin, "1")) == 6).then_some(())
        },
    );

    // Server 1 fails.
    kill_9(s1.pid());
    let hole_log = env.dir.join("black_hole.log");
    let _hole =
        (fault == Fault::BlackHole).then(|| black_hole(env, &env.ip, SERVER1_PORT, &hole_log));
    let failed_at = Instant::now();

    let mut new_calls_invites = 10;
    match fault {
        Fault::Dies => {
            // The first new call still goes to server 1 (nothing says it is dead yet): its
            // INVITE times out after 3 s, server 1 is marked down and the call fails over.
            let first = Sipp::uac(env, "first_new_call")
                .port(CLIENT3_PORT)
                .timeout(secs(20))
                .calls(1)
                .hold(ms(200))
                .run();
            eprintln!("{}", first.summary());
            first.assert_all_ok(1);
            assert!(
                first.response_time() >= Duration::from_millis(2900),
                "the first call should have waited for the INVITE timeout: {:?}",
                first.response_time()
            );
            new_calls_invites += 1;
            let d1 = destination_status(admin, "1");
            assert_eq!(
                (d1.state.as_str(), d1.reason.as_str()),
                ("down", "INVITE timeout"),
                "{d1:?}"
            );
            assert_eq!(d1.calls, 7, "6 long calls and the first new call's attempt");
        }
        Fault::BlackHole => {
            proxy.wait_state(&["1"], "down", Duration::from_secs(6));
            let d1 = destination_status(admin, "1");
            eprintln!(
                "black hole: destination 1 down {:?} after the fault ({d1:?})",
                failed_at.elapsed()
            );
            assert_eq!(d1.reason, "probe failures", "{d1:?}");
        }
    }
    let calls_to_1 = destination_status(admin, "1").calls;

    // Every new call now goes to server 2, with no attempt on server 1.
    let more = Sipp::uac(env, "new_calls")
        .port(CLIENT4_PORT)
        .timeout(secs(20))
        .calls(10)
        .rate(5)
        .hold(ms(200))
        .run();
    eprintln!("{}", more.summary());
    more.assert_all_ok(10);
    assert!(
        more.response_time() < Duration::from_millis(500),
        "no new call should wait for server 1: mean response time {:?}",
        more.response_time()
    );
    assert_eq!(
        destination_status(admin, "1").calls,
        calls_to_1,
        "a new call was sent to the failed server"
    );

    // The callers of the 4 calls hang up at ~8 s: their BYEs go to the failed server, and the
    // proxy ends those dialogs (and frees their load) at once.
    wait_for(
        "the 4 hung-up calls to leave server 1's load",
        Duration::from_secs(15).saturating_sub(t0.elapsed()),
        Duration::from_millis(50),
        || (pstn_load(&destination_status(admin, "1")) == 2).then_some(()),
    );
    let byes_done = t0.elapsed();
    eprintln!("load of server 1 down to 2 at {byes_done:?}");
    assert!(
        byes_done >= Duration::from_millis(7900),
        "the load fell before the callers hung up ({byes_done:?})"
    );
    assert_eq!(dialog_stats(admin).active, 2);

    // The 2 calls nobody hangs up end when their 20 s lifetime passes: the proxy sends BYE to
    // both sides (the caller answers it; the failed server does not) and frees the load.
    let never = never_hang_up.wait(Duration::from_secs(40));
    eprintln!("{}", never.summary());
    never.assert_all_ok(2);
    let ended = t0.elapsed();
    assert!(
        ended >= Duration::from_secs(19),
        "the calls nobody hung up ended at {ended:?}, before their 20 s lifetime"
    );
    let stats = proxy.wait_idle(Duration::from_secs(5));
    eprintln!("final stats {stats:?}");
    assert_eq!(stats.expired, 2, "{stats:?}");
    let d1 = destination_status(admin, "1");
    assert_eq!((pstn_load(&d1), d1.open_calls), (0, 0), "{d1:?}");

    // The callers of the 4 calls got the proxy's 408 to their BYE, not the server's 200.
    let hung_up = hang_up_after_8s.wait(Duration::from_secs(50));
    eprintln!("{}", hung_up.summary());
    assert_eq!(
        (hung_up.successful(), hung_up.failed()),
        (0, 4),
        "a BYE to a failed server cannot succeed; {}",
        hung_up.summary()
    );
    assert!(
        hung_up.errors.contains("SIP/2.0 408 Request Timeout"),
        "the callers should have had the proxy's 408 to their BYE; {}",
        hung_up.summary()
    );

    let s2 = s2.drain();
    eprintln!("{}", s2.summary());
    assert_server_clean(&s2);
    assert_eq!(
        s2.invites(),
        new_calls_invites,
        "every new call on server 2"
    );
    assert_eq!(dialog_stats(admin).active, 0);

    if fault == Fault::BlackHole {
        let seen = fs::read_to_string(&hole_log).unwrap();
        let count = |p: &str| seen.lines().filter(|l| l.starts_with(p)).count();
        eprintln!(
            "the black hole swallowed {} BYEs, {} OPTIONS, {} INVITEs",
            count("BYE "),
            count("OPTIONS "),
            count("INVITE ")
        );
        assert!(count("OPTIONS ") >= 2, "probes went in:\n{seen}");
        assert!(count("BYE ") >= 6, "4 callers' and 2 expiry BYEs:\n{seen}");
        assert_eq!(count("INVITE "), 0, "no new call went in:\n{seen}");
    }
}

#[test]
fn a_server_that_dies_with_calls_open_takes_no_new_calls_and_its_calls_end() {
    let env = test_env!("server_dies", "127.0.1.61");
    server_fails_with_calls_open(&env, Fault::Dies);
}

#[test]
fn a_black_holed_server_takes_no_new_calls_and_its_calls_end() {
    let env = test_env!("server_black_hole", "127.0.1.62");
    server_fails_with_calls_open(&env, Fault::BlackHole);
}

/// `mrcp_lb_sip_requests_received_total{method}` of a running proxy.
fn requests_received(admin: SocketAddr, method: &str) -> f64 {
    scraped_sum(
        admin,
        "mrcp_lb_sip_requests_received_total",
        &[("method", method)],
    )
}

fn responses_sent(admin: SocketAddr, class: &str) -> f64 {
    scraped_sum(
        admin,
        "mrcp_lb_sip_responses_sent_total",
        &[("class", class)],
    )
}

fn kept_log(env: &TestEnv, name: &str) -> PathBuf {
    env.dir.join(name)
}

#[test]
fn proxy_killed_and_restarted_between_invite_and_bye_calls_still_end_end_to_end() {
    restarted_mid_call(test_env!("proxy_restart", "127.0.1.63"), false);
}

/// The same with a Record-Route key: the calls that outlive the restart pass on the proof of
/// their signed Record-Route alone (no rule without proof applies with a key).
#[test]
fn proxy_restarted_with_a_route_key_relays_the_calls_it_signed() {
    restarted_mid_call(test_env!("proxy_restart_key", "127.0.1.92"), true);
}

fn restarted_mid_call(env: TestEnv, key: bool) {
    let extra = if key {
        let path = env.subdir("key").join("route.key");
        fs::write(&path, "restart-test-key-0123456789abcdef\n").unwrap();
        format!("recordRoute:\n  keyFile: {}\n", path.display())
    } else {
        String::new()
    };
    // Server 1 takes re-INVITEs; server 2 hangs up its calls itself after 6 s.
    let sandbox = Sandbox::new(&env)
        .serve_as(
            "server1_reinvite",
            Dest::udp(1, SERVER1_PORT, "pstn=100"),
            "uas_reinvite.xml",
        )
        .dest(Dest::udp(2, SERVER2_PORT, "pstn=100"))
        .uas_with("server2_hangs_up", SERVER2_PORT, |s| {
            s.scenario("uas_bye.xml").pause(ms(6000))
        })
        .extra(&extra);
    // The restart below uses the same config.
    let config = sandbox.config();
    let (mut proxy, [s1, s2]) = sandbox.start();
    let admin = proxy.admin;

    // Five calls to server 1 (server 2 disabled meanwhile): re-INVITE after 5 s, BYE 1 s later.
    assert_eq!(post_state(admin, None, "2", "disable").code, 200);
    let reinviting = Sipp::uac(&env, "reinvite_then_bye")
        .scenario("uac_reinvite.xml")
        .calls(5)
        .rate(20)
        .limit(5)
        .hold(ms(5000))
        .start();
    wait_for(
        "5 calls on server 1",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || (dialog_stats(admin).active == 5).then_some(()),
    );
    // Three calls to server 2, which hangs up after 6 s through the proxy.
    assert_eq!(post_state(admin, None, "2", "enable").code, 200);
    assert_eq!(post_state(admin, None, "1", "disable").code, 200);
    let hung_up_by_server = Sipp::uac(&env, "server_hangs_up")
        .scenario("uac_long_expect_bye.xml")
        .port(CLIENT2_PORT)
        .calls(3)
        .rate(20)
        .limit(3)
        .start();
    wait_for(
        "3 calls on server 2",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            let (d1, d2) = (
                destination_status(admin, "1"),
                destination_status(admin, "2"),
            );
            (dialog_stats(admin).active == 8 && pstn_load(&d1) == 5 && pstn_load(&d2) == 3)
                .then_some(())
        },
    );

    // SIGKILL, and the same proxy again on the same address and config.
    proxy.guard.kill();
    fs::rename(&proxy.log, kept_log(&env, "proxy-before-restart.log")).unwrap();
    let restarted_at = Instant::now();
    let proxy = Proxy::start(&env, &config);
    eprintln!("proxy back in {:?}", restarted_at.elapsed());

    // What the restart lost: the 8 open calls are neither counted nor loaded.
    let st = proxy.stats();
    let (d1, d2) = (
        destination_status(admin, "1"),
        destination_status(admin, "2"),
    );
    assert_eq!((st.active, st.processed), (0, 0), "{st:?}");
    assert_eq!((pstn_load(&d1), pstn_load(&d2)), (0, 0), "{d1:?} {d2:?}");
    assert_eq!(
        (d1.state.as_str(), d2.state.as_str()),
        ("up", "up"),
        "manual state is not kept either"
    );

    // The re-INVITEs and BYEs route by their Route header and Request-URI.
    let reinviting = reinviting.wait(Duration::from_secs(30));
    let hung_up_by_server = hung_up_by_server.wait(Duration::from_secs(30));
    eprintln!("{}\n{}", reinviting.summary(), hung_up_by_server.summary());
    let [s1, s2] = drain([s1, s2]);
    eprintln!("{}\n{}", s1.summary(), s2.summary());

    reinviting.assert_all_ok(5);
    hung_up_by_server.assert_all_ok(3);
    assert_server_clean(&s1);
    assert_server_clean(&s2);
    assert_eq!(s1.invites(), 10, "5 INVITEs and 5 re-INVITEs on server 1");
    assert_eq!(s1.count("BYE_Recv"), 5);
    assert_eq!(s2.invites(), 3);

    // All of it went through the restarted proxy, none refused as unknown (481).
    assert_eq!(requests_received(admin, "INVITE"), 5.0, "the re-INVITEs");
    assert_eq!(
        requests_received(admin, "BYE"),
        8.0,
        "5 from callers, 3 from server 2"
    );
    assert_eq!(
        responses_sent(admin, "4xx"),
        0.0,
        "no 481 for a dialog it forgot"
    );
    let st = proxy.stats();
    assert_eq!((st.active, st.processed), (0, 0), "{st:?}");
    let ds = destinations_status(admin);
    assert!(ds.destinations.iter().all(|d| pstn_load(d) == 0), "{ds:?}");
    let refused = scraped_sum(admin, "mrcp_lb_relay_refused_total", &[]);
    assert_eq!(
        refused, 0.0,
        "the relay rule refused nothing of these calls"
    );
}
