//! SDP routing (`routing.resources: sdp`) through the real proxy, driven by sipp playing
//! UniMRCP 1.8's client and servers with the SDP they write: each session lands on a server
//! offering every MRCPv2 resource of its offer, and counts one unit per channel, from the offer
//! (reserved) through the answer (a rejected channel released) and re-INVITEs (channels added
//! and removed on the same server) to the BYE (all released); a 406 fails the session over and
//! keeps that server from the resource; pools send sessions to a group by Request-URI user.
//!
//! Every step is checked on the admin API (`GET /v1/destinations`: load per resource of every
//! destination) while sipp holds the call open, and every server's INVITEs are counted.
//!
//! Needs `sipp` (Debian package `sip-tester`). Run: `cargo test -p lb-proxy --test sipp_sdp`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// A third server's port, for the tests with three.
const SERVER3_PORT: u16 = 5100;

/// How long a load may take to show; the calls hold each step 1.5 to 2 s.
const LOAD_WAIT: Duration = Duration::from_secs(10);

/// Load per resource of every destination: `{"1": {"speechrecog": 2}}`.
type Loads = BTreeMap<String, BTreeMap<String, u32>>;

fn loads(admin: SocketAddr) -> Result<Loads, String> {
    Ok(try_destinations_status(admin)?
        .destinations
        .iter()
        .map(|d| (d.id.clone(), resource_loads(d)))
        .collect())
}

/// `Loads` written out: `&[("1", &[("speechrecog", 2)])]`.
fn loads_of(dests: &[(&str, &[(&str, u32)])]) -> Loads {
    dests
        .iter()
        .map(|(id, rs)| {
            let rs = rs.iter().map(|(r, n)| (r.to_string(), *n)).collect();
            (id.to_string(), rs)
        })
        .collect()
}

/// Waits until the loads are exactly `want` (every destination, every resource), panicking
/// with the loads last seen after `LOAD_WAIT`.
fn expect_loads(proxy: &Proxy, step: &str, want: &[(&str, &[(&str, u32)])]) {
    expect(proxy, step, loads_of(want));
}

fn expect(proxy: &Proxy, step: &str, want: Loads) {
    wait_ok(step, LOAD_WAIT, ms(50), || {
        let seen = loads(proxy.admin)?;
        if seen == want {
            Ok(())
        } else {
            Err(format!("{seen:?}, want {want:?}"))
        }
    });
    eprintln!("{step}: {want:?}");
}

/// The routing section of every test: SDP routing, nothing per session, no fallback.
fn sdp_sandbox(env: &TestEnv) -> Sandbox<'_> {
    Sandbox::new(env).resources("sdp")
}

#[test]
fn synthesizer_and_recognizer_sessions_go_where_their_resource_is() {
    let env = test_env!("sdp_one_resource", "127.0.9.2");
    const N: u64 = 3;
    const N32: u32 = N as u32;
    let (proxy, [asr, tts]) = sdp_sandbox(&env)
        .serve_as(
            "asr",
            Dest::udp(1, SERVER1_PORT, "speechrecog=10"),
            "uas.xml",
        )
        .serve_as(
            "tts",
            Dest::udp(2, SERVER2_PORT, "speechsynth=10"),
            "uas_synth.xml",
        )
        .start();
    expect_loads(
        &proxy,
        "before the calls",
        &[("1", &[("speechrecog", 0)]), ("2", &[("speechsynth", 0)])],
    );

    // N synthesizer and N recognizer sessions, open together for 2 s.
    let synth = Sipp::uac(&env, "synth_client")
        .scenario("uac_synth.xml")
        .calls_together(N)
        .rate(20)
        .hold(secs(2))
        .start();
    let recog = Sipp::uac(&env, "recog_client")
        .scenario("uac_recog.xml")
        .port(CLIENT2_PORT)
        .calls_together(N)
        .rate(20)
        .hold(secs(2))
        .start();
    expect_loads(
        &proxy,
        "N sessions of each kind open",
        &[
            ("1", &[("speechrecog", N32)]),
            ("2", &[("speechsynth", N32)]),
        ],
    );
    let synth = synth.wait(secs(30));
    let recog = recog.wait(secs(30));
    eprintln!("{}\n{}", synth.summary(), recog.summary());
    expect_loads(
        &proxy,
        "after the BYEs",
        &[("1", &[("speechrecog", 0)]), ("2", &[("speechsynth", 0)])],
    );

    let [asr, tts] = drain([asr, tts]);
    eprintln!("{}\n{}", asr.summary(), tts.summary());
    synth.assert_all_ok(N);
    recog.assert_all_ok(N);
    assert_server_clean(&asr);
    assert_server_clean(&tts);
    assert_eq!(
        (asr.invites(), tts.invites()),
        (N, N),
        "the recognizer sessions go to the ASR server, the synthesizer ones to the TTS server"
    );
    proxy.wait_idle(secs(10));
}

#[test]
fn a_session_with_two_channels_goes_to_the_server_with_both_and_counts_both() {
    let env = test_env!("sdp_two_resources", "127.0.9.3");
    const N: u64 = 2;
    const N32: u32 = N as u32;
    // The single-resource servers are far bigger: only "both" offers both resources.
    let (proxy, [asr, tts, both]) = sdp_sandbox(&env)
        .serve_as(
            "asr",
            Dest::udp(1, SERVER1_PORT, "speechrecog=100"),
            "uas.xml",
        )
        .serve_as(
            "tts",
            Dest::udp(2, SERVER2_PORT, "speechsynth=100"),
            "uas_synth.xml",
        )
        .serve_as(
            "both",
            Dest::udp(3, SERVER3_PORT, "speechsynth=5;speechrecog=5"),
            "uas_synth_recog.xml",
        )
        .start();

    let client = Sipp::uac(&env, "client")
        .scenario("uac_synth_recog.xml")
        .calls_together(N)
        .rate(20)
        .hold(secs(2))
        .start();
    expect_loads(
        &proxy,
        "N two-channel sessions open",
        &[
            ("1", &[("speechrecog", 0)]),
            ("2", &[("speechsynth", 0)]),
            ("3", &[("speechrecog", N32), ("speechsynth", N32)]),
        ],
    );
    let client = client.wait(secs(30));
    eprintln!("{}", client.summary());
    expect_loads(
        &proxy,
        "after the BYEs",
        &[
            ("1", &[("speechrecog", 0)]),
            ("2", &[("speechsynth", 0)]),
            ("3", &[("speechrecog", 0), ("speechsynth", 0)]),
        ],
    );

    let [asr, tts, both] = drain([asr, tts, both]);
    eprintln!("{}\n{}\n{}", asr.summary(), tts.summary(), both.summary());
    client.assert_all_ok(N);
    for s in [&asr, &tts, &both] {
        assert_server_clean(s);
    }
    assert_eq!(
        (asr.invites(), tts.invites(), both.invites()),
        (0, 0, N),
        "only the server with both resources may take a session asking for both"
    );
    let accepted = scraped_sum(
        proxy.admin,
        "mrcp_lb_sdp_channels_total",
        &[("outcome", "accepted")],
    );
    assert_eq!(accepted, 2.0 * N as f64, "2 channels accepted per session");
    proxy.wait_idle(secs(10));
}

#[test]
fn reinvites_add_and_remove_channels_on_the_same_server() {
    let env = test_env!("sdp_reinvite", "127.0.9.4");
    // Two equal servers: after the session opens on one, the other is as free for a
    // recognizer, yet the channel a re-INVITE adds is counted where the session is.
    let resources = "speechsynth=10;speechrecog=10";
    let (proxy, [s1, s2]) = sdp_sandbox(&env)
        .serve(
            Dest::udp(1, SERVER1_PORT, resources),
            "uas_reinvite_channels.xml",
        )
        .serve(
            Dest::udp(2, SERVER2_PORT, resources),
            "uas_reinvite_channels.xml",
        )
        .start();

    // Each step lasts 1.5 s: synthesizer; synthesizer + recognizer; recognizer; BYE.
    let client = Sipp::uac(&env, "client")
        .scenario("uac_reinvite_channels.xml")
        .calls(1)
        .hold(ms(1500))
        .start();
    let on = |id: &str, synth: u32, recog: u32| -> Loads {
        let idle: &[(&str, u32)] = &[("speechrecog", 0), ("speechsynth", 0)];
        let busy: &[(&str, u32)] = &[("speechrecog", recog), ("speechsynth", synth)];
        let (l1, l2) = if id == "1" {
            (busy, idle)
        } else {
            (idle, busy)
        };
        loads_of(&[("1", l1), ("2", l2)])
    };
    let opened = wait_ok("the synthesizer session", LOAD_WAIT, ms(50), || {
        let seen = loads(proxy.admin)?;
        ["1", "2"]
            .into_iter()
            .find(|id| seen == on(id, 1, 0))
            .ok_or_else(|| format!("{seen:?}"))
    });
    let other = if opened == "1" { "2" } else { "1" };
    eprintln!("the session opened on destination {opened}");
    expect(
        &proxy,
        "the re-INVITE adding a recognizer, counted on the same server",
        on(opened, 1, 1),
    );
    expect(
        &proxy,
        "the re-INVITE removing the synthesizer (port 0)",
        on(opened, 0, 1),
    );
    expect(&proxy, "after the BYE", on(opened, 0, 0));

    let client = client.wait(secs(30));
    eprintln!("{}", client.summary());
    let [s1, s2] = drain([s1, s2]);
    eprintln!("{}\n{}", s1.summary(), s2.summary());
    client.assert_all_ok(1);
    assert_server_clean(&s1);
    assert_server_clean(&s2);
    let invites = |id: &str| {
        if id == "1" {
            s1.invites()
        } else {
            s2.invites()
        }
    };
    assert_eq!(
        (invites(opened), invites(other)),
        (3, 0),
        "the INVITE and both re-INVITEs go to the server of the session"
    );
    proxy.wait_idle(secs(10));
}

#[test]
fn a_channel_the_server_rejects_is_released_at_its_answer() {
    let env = test_env!("sdp_rejected_channel", "127.0.9.5");
    // Destination 1 answers 1.5 s after its 100, accepting the synthesizer and rejecting
    // the recognizer (port 0). Destination 2 is bigger but has no recognizer.
    let (proxy, [s1, tts]) = sdp_sandbox(&env)
        .serve_with(
            Dest::udp(1, SERVER1_PORT, "speechsynth=10;speechrecog=10"),
            |s| s.scenario("uas_reject_recog.xml").pause(ms(1500)),
        )
        .serve_as(
            "tts",
            Dest::udp(2, SERVER2_PORT, "speechsynth=50"),
            "uas_synth.xml",
        )
        .start();

    let client = Sipp::uac(&env, "client")
        .scenario("uac_synth_recog.xml")
        .calls(1)
        .hold(secs(2))
        .start();
    expect_loads(
        &proxy,
        "the offer reserves both channels until the answer",
        &[
            ("1", &[("speechrecog", 1), ("speechsynth", 1)]),
            ("2", &[("speechsynth", 0)]),
        ],
    );
    expect_loads(
        &proxy,
        "the 200 released the rejected recognizer",
        &[
            ("1", &[("speechrecog", 0), ("speechsynth", 1)]),
            ("2", &[("speechsynth", 0)]),
        ],
    );
    // The synthesizer stays counted while the call is open (the client holds it 2 s).
    let stats = proxy.stats();
    assert_eq!(stats.active, 1, "the session is still open: {stats:?}");
    let client = client.wait(secs(30));
    eprintln!("{}", client.summary());
    expect_loads(
        &proxy,
        "after the BYE",
        &[
            ("1", &[("speechrecog", 0), ("speechsynth", 0)]),
            ("2", &[("speechsynth", 0)]),
        ],
    );

    let [s1, tts] = drain([s1, tts]);
    eprintln!("{}\n{}", s1.summary(), tts.summary());
    client.assert_all_ok(1);
    assert_server_clean(&s1);
    assert_server_clean(&tts);
    assert_eq!((s1.invites(), tts.invites()), (1, 0));
    let channels = |outcome| {
        scraped_sum(
            proxy.admin,
            "mrcp_lb_sdp_channels_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(
        (channels("accepted"), channels("rejected")),
        (1.0, 1.0),
        "one channel accepted, one rejected"
    );
    proxy.wait_idle(secs(10));
}

#[test]
fn a_406_fails_over_and_keeps_that_server_from_the_resource() {
    let env = test_env!("sdp_406", "127.0.9.6");
    const N: u64 = 3;
    // Destination 1, the bigger, has no synthesizer engine and answers 406 to every INVITE.
    // A 406 keeps it from the resource for a probe interval: 30 s outlasts the test.
    let (proxy, [big, small]) = sdp_sandbox(&env)
        .routing("  sdp:\n    notAcceptable: true\n")
        .extra("probing:\n  interval: 30s\n")
        .serve_as(
            "big_406",
            Dest::udp(1, SERVER1_PORT, "speechsynth=20;speechrecog=20"),
            "uas_406.xml",
        )
        .serve_as(
            "small",
            Dest::udp(2, SERVER2_PORT, "speechsynth=10"),
            "uas_synth.xml",
        )
        .start();
    let admin = proxy.admin;

    // One synthesizer session after the other, each held 1 s: the first is refused by
    // destination 1 and fails over; the next ones go to destination 2 at once.
    let client = Sipp::uac(&env, "client")
        .scenario("uac_synth.xml")
        .calls(N)
        .limit(1)
        .rate(10)
        .hold(secs(1))
        .start();
    expect_loads(
        &proxy,
        "a session open on the small server",
        &[
            ("1", &[("speechrecog", 0), ("speechsynth", 0)]),
            ("2", &[("speechsynth", 1)]),
        ],
    );
    let client = client.wait(secs(30));
    eprintln!("{}", client.summary());
    expect_loads(
        &proxy,
        "after the BYEs",
        &[
            ("1", &[("speechrecog", 0), ("speechsynth", 0)]),
            ("2", &[("speechsynth", 0)]),
        ],
    );

    // Within the probe interval the 406 still holds, on the session's resource only.
    let d1 = destination_json(admin, "1").expect("destination 1 listed");
    let flag = |name: &str| {
        d1["resources"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["name"] == name))
            .map(|r| r.get("notAcceptable").cloned())
            .unwrap_or_else(|| panic!("destination 1 has no {name}: {d1}"))
    };
    assert_eq!(
        flag("speechsynth"),
        Some(serde_json::Value::Bool(true)),
        "{d1}"
    );
    assert_eq!(
        flag("speechrecog"),
        None,
        "only the session's resource is blamed: {d1}"
    );
    let d2 = destination_status(admin, "2");
    assert!(d2.resources.iter().all(|r| !r.not_acceptable), "{d2:?}");
    let counted = scraped_sum(admin, "mrcp_lb_not_acceptable_total", &[]);
    let held = scraped_sum(
        admin,
        "mrcp_lb_destination_not_acceptable",
        &[("destination", "1"), ("resource", "speechsynth")],
    );

    let [big, small] = drain([big, small]);
    eprintln!("{}\n{}", big.summary(), small.summary());
    // The client never saw the 406: every call went through.
    client.assert_all_ok(N);
    assert_server_clean(&big);
    assert_server_clean(&small);
    assert_eq!(
        (big.invites(), small.invites()),
        (1, N),
        "the 406 server is asked once, then kept from speechsynth"
    );
    assert_eq!(counted, 1.0, "mrcp_lb_not_acceptable_total");
    assert_eq!(
        held, 1.0,
        "mrcp_lb_destination_not_acceptable of 1/speechsynth"
    );
    proxy.wait_idle(secs(10));
}

#[test]
fn pools_send_sessions_to_a_group_by_request_uri_user() {
    let env = test_env!("sdp_pools", "127.0.9.7");
    const N: u64 = 2;
    const N32: u32 = N as u32;
    // Destination 2 (group 2) is the bigger: a session of the listeners' group 1 reaching it
    // would show that the group was ignored.
    let (proxy, [en, de]) = sdp_sandbox(&env)
        .routing("  pools:\n    - user: \"^de-\"\n      group: 2\n")
        .serve_as(
            "group1",
            Dest::udp(1, SERVER1_PORT, "speechrecog=10"),
            "uas.xml",
        )
        .serve_as(
            "group2",
            Dest::udp(2, SERVER2_PORT, "speechrecog=20").in_group(2),
            "uas.xml",
        )
        .start();

    // Recognizer sessions to sip:de-DE@proxy (uac.xml takes the user part from -s) and to
    // sip:proxy (no user part, as UniMRCP's client writes it), open together.
    let german = Sipp::uac(&env, "de_client")
        .scenario("uac.xml")
        .args(["-s", "de-DE"])
        .calls_together(N)
        .rate(20)
        .hold(secs(2))
        .start();
    let plain = Sipp::uac(&env, "plain_client")
        .scenario("uac_recog.xml")
        .port(CLIENT2_PORT)
        .calls_together(N)
        .rate(20)
        .hold(secs(2))
        .start();
    expect_loads(
        &proxy,
        "N sessions open in each group",
        &[
            ("1", &[("speechrecog", N32)]),
            ("2", &[("speechrecog", N32)]),
        ],
    );
    let german = german.wait(secs(30));
    let plain = plain.wait(secs(30));
    eprintln!("{}\n{}", german.summary(), plain.summary());
    expect_loads(
        &proxy,
        "after the BYEs",
        &[("1", &[("speechrecog", 0)]), ("2", &[("speechrecog", 0)])],
    );

    let [en, de] = drain([en, de]);
    eprintln!("{}\n{}", en.summary(), de.summary());
    german.assert_all_ok(N);
    plain.assert_all_ok(N);
    assert_server_clean(&en);
    assert_server_clean(&de);
    assert_eq!(
        (en.invites(), de.invites()),
        (N, N),
        "de-DE sessions go to group 2, sessions without user part to group 1"
    );
    proxy.wait_idle(secs(10));
}
