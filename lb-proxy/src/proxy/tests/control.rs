//! Destination sets replaced live, manual state, status and gauges.

use super::*;

#[test]
fn replacing_the_set_keeps_open_calls_and_counts_removed_ones_down() {
    let mut h = Harness::new();
    let srv1 = Uas::new(S1, "srv-r1");
    let srv2 = Uas::new(S2, "srv-r2");
    let mut a = open_call(&mut h, "r1", &srv1);
    let mut b = open_call(&mut h, "r2", &srv1);
    // A third call is refused by 5080 (503, no Retry-After) and lands on 5090.
    let mut c = Call::udp("r3");
    let inv = place(&mut h, &c);
    inv.assert_to(&srv1.peer);
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 503, &[], ""));
    let mut out = h.out();
    take(&mut out, "ACK of the 503", |s| s.is(Method::Ack));
    let inv2 = take(&mut out, "INVITE to 5090", |s| s.is(Method::Invite));
    inv2.assert_to(&srv2.peer);
    answer(&mut h, &mut c, &srv2, &inv2, &[]);
    assert_eq!((h.load(0), h.load(1)), (2, 1));

    // 1 resized, 2 removed.
    let r = h.proxy.replace_set(h.now, &dest_set(1, ONLY_1_RESIZED));
    assert_eq!(r.unwrap(), Applied::Replaced);
    let one = status_of(&h, "1").unwrap();
    assert_eq!(one.resources, pstn(200, 2), "load kept, capacity resized");
    assert_eq!(
        (one.open_calls, one.state, one.removed),
        (2, State::Up, false)
    );
    let two = status_of(&h, "2").expect("shown while it carries a call");
    assert!(two.removed);
    assert_eq!(two.reason, "removed from the set");
    assert_eq!((two.open_calls, two.resources[0].load), (1, 1));
    assert_eq!(h.proxy.status().version, 1);

    // A new call refused by 5080 is not failed over to the removed 5090.
    let d = Call::udp("r4");
    let inv = place(&mut h, &d);
    inv.assert_to(&srv1.peer);
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 503, &[], ""));
    let mut out = h.out();
    take(&mut out, "ACK of the 503", |s| s.is(Method::Ack));
    let fail = take(&mut out, "503 to the caller", |s| s.code() == Some(503));
    fail.assert_to(&d.peer);
    assert_none(&out, "no INVITE to a removed destination");

    // The open calls end normally.
    hang_up(&mut h, &mut a, &srv1);
    assert_eq!(h.load(0), 1);
    hang_up(&mut h, &mut b, &srv1);
    assert_eq!(h.load(0), 0);
    let one = status_of(&h, "1").unwrap();
    assert_eq!((one.resources.clone(), one.open_calls), (pstn(200, 0), 0));
    hang_up(&mut h, &mut c, &srv2);
    assert_eq!(h.load(1), 0);
    assert!(status_of(&h, "2").is_none(), "gone with its last call");
    assert_eq!(h.proxy.status().destinations.len(), 1);
    h.proxy.export_gauges(h.now);
    h.proxy.export_gauges(h.now);
    let text = h.proxy.metrics().encode();
    assert!(
        metric_line_of(&text, "mrcp_lb_destination_load", "2", &[]).is_none(),
        "{text}"
    );
    assert_eq!(h.proxy.dialog_stats().active, 0);
}

#[test]
fn set_versions_conflicts_and_invalid_sets() {
    let mut h = Harness::new();
    let v1 = dest_set(
        1,
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=200}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50}
"#,
    );
    assert_eq!(h.proxy.replace_set(h.now, &v1).unwrap(), Applied::Replaced);
    assert_eq!(h.proxy.replace_set(h.now, &v1).unwrap(), Applied::Unchanged);

    let older = DestinationSet {
        version: 0,
        ..v1.clone()
    };
    assert!(
        matches!(
            h.proxy.replace_set(h.now, &older),
            Err(SetError::Conflict(_))
        ),
        "an older version"
    );
    let other = dest_set(1, ONLY_1_RESIZED);
    assert!(
        matches!(
            h.proxy.replace_set(h.now, &other),
            Err(SetError::Conflict(_))
        ),
        "the same version with other content"
    );
    assert_eq!(status_of(&h, "1").unwrap().resources, pstn(200, 0));
    assert!(status_of(&h, "2").is_some_and(|d| !d.removed));

    // Invalid sets name the field and change nothing. Each would send new calls to 5070.
    for (set, field) in [
        (
            r#"
  - {id: 3, group: 1, uri: "sip:127.0.0.1:5070", resources: pstn=1000}
  - {id: 4, group: 1, uri: "mailto:x@example.com", resources: pstn=1000}
"#,
            "destinations[1].uri",
        ),
        (
            r#"
  - {id: 3, group: 1, uri: "sip:127.0.0.1:5070", resources: pstn=1000}
  - {id: 3, group: 1, uri: "sip:127.0.0.1:5071", resources: pstn=1000}
"#,
            "destinations[1].id",
        ),
    ] {
        match h.proxy.replace_set(h.now, &dest_set(2, set)) {
            Err(SetError::Invalid(e)) => assert_eq!(e.field, field, "{e}"),
            other => panic!("expected Invalid({field}), got {other:?}"),
        }
        let st = h.proxy.status();
        assert_eq!(st.version, 1);
        let ids: Vec<&str> = st.destinations.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, vec!["1", "2"]);
    }
    let call = Call::udp("v1");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer::udp_server(S1));

    // The version an invalid set carried is still free.
    let v2 = dest_set(
        2,
        r#"
  - {id: 3, group: 1, uri: "sip:127.0.0.1:5070", resources: pstn=1000}
"#,
    );
    assert_eq!(h.proxy.replace_set(h.now, &v2).unwrap(), Applied::Replaced);
    let call = Call::udp("v2");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer::udp_server("127.0.0.1:5070"));
}

#[test]
fn a_tcp_destination_without_a_tcp_listener_is_invalid() {
    let cfg = Config::from_yaml(
        "listeners:
  - udp:127.0.0.1:5060
destinations:
  - {id: 1, group: 1, uri: \"sip:127.0.0.1:5080\", resources: pstn=100}
",
    )
    .unwrap();
    let mut h = Harness::from_config(cfg);
    let set = dest_set(
        1,
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090;transport=tcp", resources: pstn=500}
"#,
    );
    match h.proxy.replace_set(h.now, &set) {
        Err(SetError::Invalid(e)) => {
            assert_eq!(e.field, "destinations[1].uri", "{e}");
            assert!(
                e.message.contains("tcp") || e.message.contains("TCP"),
                "{e}"
            );
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    let st = h.proxy.status();
    assert_eq!((st.version, st.destinations.len()), (0, 1));
    let call = Call::udp("t1");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer::udp_server(S1));
}

#[test]
fn health_and_manual_state_survive_a_replace() {
    let mut h = Harness::new();
    let srv1 = Uas::new(S1, "srv-m1");
    let srv2 = Uas::new(S2, "srv-m2");

    // 5080 never answers: marked down; the call lands on 5090.
    let mut x = Call::udp("m1");
    let inv = place(&mut h, &x);
    inv.assert_to(&srv1.peer);
    h.advance_to(secs(3));
    let mut out = h.out();
    let inv2 = take(&mut out, "INVITE to 5090", |s| {
        s.is(Method::Invite) && s.to() == addr(S2)
    });
    answer(&mut h, &mut x, &srv2, &inv2, &[]);
    assert_eq!(h.state(0), State::Down);

    // A replace keeping both ids (5080 resized) keeps the mark.
    let both = |v: u64| {
        dest_set(
            v,
            r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=150}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50}
"#,
        )
    };
    assert_eq!(
        h.proxy.replace_set(h.now, &both(1)).unwrap(),
        Applied::Replaced
    );
    assert_eq!(h.state(0), State::Down, "the health mark survives");
    let one = status_of(&h, "1").unwrap();
    assert_eq!(
        (one.reason.as_str(), one.resources.clone()),
        ("INVITE timeout", pstn(150, 0))
    );
    let mut y = open_call(&mut h, "m2", &srv2);

    // Drain 5090: no new calls, open calls go on and end normally.
    assert_eq!(
        h.proxy.set_manual("2", Action::Drain),
        Some(State::Draining)
    );
    refused(&mut h, &Call::udp("m3"), "5080 down, 5090 draining");
    hang_up(&mut h, &mut x, &srv2);
    assert_eq!(h.load(1), 1);

    // Manual state survives a replace too.
    assert_eq!(
        h.proxy.replace_set(h.now, &both(2)).unwrap(),
        Applied::Replaced
    );
    assert_eq!(h.state(1), State::Draining);
    assert_eq!(h.state(0), State::Down);
    assert_eq!(status_of(&h, "2").unwrap().reason, "drained by hand");

    // Disable: no new calls either.
    assert_eq!(
        h.proxy.set_manual("2", Action::Disable),
        Some(State::Disabled)
    );
    refused(&mut h, &Call::udp("m4"), "5080 down, 5090 disabled");
    hang_up(&mut h, &mut y, &srv2);
    assert_eq!(h.load(1), 0);
    assert_eq!(status_of(&h, "2").unwrap().reason, "disabled by hand");

    // Enable clears the down mark of 5080, which takes calls again.
    assert_eq!(h.proxy.set_manual("1", Action::Enable), Some(State::Up));
    assert_eq!(h.dest(0).health, Health::Up);
    open_call(&mut h, "m5", &srv1);
    assert_eq!(h.proxy.set_manual("2", Action::Enable), Some(State::Up));
    assert_eq!(h.state(1), State::Up);

    assert_eq!(h.proxy.set_manual("nope", Action::Drain), None);
    assert_eq!(h.proxy.set_manual("nope", Action::Enable), None);
}

#[test]
fn a_set_asking_draining_or_down_takes_no_new_calls() {
    let mut h = Harness::new();
    let srv1 = Uas::new(S1, "srv-s1");
    let srv2 = Uas::new(S2, "srv-s2");
    let mut a = open_call(&mut h, "s1", &srv1);

    let set = |v: u64, s1: &str, s2: &str| {
        dest_set(
            v,
            &format!(
                r#"
  - {{id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100, state: {s1}}}
  - {{id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50, state: {s2}}}
"#
            ),
        )
    };
    let r = h.proxy.replace_set(h.now, &set(1, "draining", "active"));
    assert_eq!(r.unwrap(), Applied::Replaced);
    assert_eq!(
        h.proxy.destinations().get(0).unwrap().spec.state,
        DesiredState::Draining
    );
    assert_eq!(h.state(0), State::Draining);
    assert_eq!(status_of(&h, "1").unwrap().reason, "draining (set)");
    // 5080 has more room but is draining.
    let mut b = open_call(&mut h, "s2", &srv2);
    // Its open call goes on.
    hang_up(&mut h, &mut a, &srv1);
    assert_eq!(h.load(0), 0);

    let r = h.proxy.replace_set(h.now, &set(2, "down", "draining"));
    assert_eq!(r.unwrap(), Applied::Replaced);
    assert_eq!((h.state(0), h.state(1)), (State::Down, State::Draining));
    assert_eq!(status_of(&h, "1").unwrap().reason, "down (set: not ready)");
    refused(&mut h, &Call::udp("s3"), "5080 down, 5090 draining");
    hang_up(&mut h, &mut b, &srv2);

    let r = h.proxy.replace_set(h.now, &set(3, "active", "active"));
    assert_eq!(r.unwrap(), Applied::Replaced);
    assert_eq!((h.state(0), h.state(1)), (State::Up, State::Up));
    open_call(&mut h, "s4", &srv1);
}

#[test]
fn status_and_gauges_reflect_the_destinations() {
    let mut h = Harness::new();
    let srv1 = Uas::new(S1, "srv-g1");
    let mut call = open_call(&mut h, "g1", &srv1);
    let r = h.proxy.replace_set(h.now, &dest_set(3, TWO_DESTS));
    assert_eq!(r.unwrap(), Applied::Replaced);
    assert_eq!(
        h.proxy.set_manual("2", Action::Disable),
        Some(State::Disabled)
    );

    let st = h.proxy.status();
    assert_eq!(st.version, 3);
    assert!(st.updated > 0);
    assert_eq!(st.destinations.len(), 2);
    let one = &st.destinations[0];
    assert_eq!(
        (one.id.as_str(), one.group, one.uri.as_str()),
        ("1", 1, "sip:127.0.0.1:5080")
    );
    assert_eq!(one.address.as_deref(), Some("127.0.0.1:5080"));
    assert_eq!(
        (one.state, one.reason.as_str(), one.removed),
        (State::Up, "", false)
    );
    assert_eq!(one.resources, pstn(100, 1));
    assert_eq!((one.open_calls, one.calls), (1, 1));
    assert_eq!(one.probe.mode, lb_api::ProbeMode::Always);
    let two = &st.destinations[1];
    assert_eq!(
        (two.state, two.reason.as_str()),
        (State::Disabled, "disabled by hand")
    );
    assert_eq!(two.resources, pstn(50, 0));
    assert_eq!((two.open_calls, two.calls), (0, 0));

    h.proxy.export_gauges(h.now);
    h.proxy.export_gauges(h.now);
    let text = h.proxy.metrics().encode();
    let load = metric_line(&text, "mrcp_lb_destination_load", &[("resource", "pstn")]);
    assert!(load.ends_with("} 1"), "{load}");
    assert!(load.contains("uri=\"sip:127.0.0.1:5080\""), "{load}");
    let load2 = metric_line_of(&text, "mrcp_lb_destination_load", "2", &[]).unwrap();
    assert!(load2.ends_with("} 0"), "{load2}");
    let cap = metric_line(&text, "mrcp_lb_destination_capacity", &[]);
    assert!(cap.ends_with("} 100"), "{cap}");
    let up = metric_line(&text, "mrcp_lb_destination_state", &[("state", "up")]);
    assert!(up.ends_with("} 1"), "{up}");
    let disabled = metric_line_of(
        &text,
        "mrcp_lb_destination_state",
        "2",
        &[("state", "disabled")],
    )
    .unwrap();
    assert!(disabled.ends_with("} 1"), "{disabled}");
    let calls = metric_line(&text, "mrcp_lb_destination_calls_routed", &[]);
    assert!(calls.ends_with("} 1"), "{calls}");
    assert!(
        text.contains("\nmrcp_lb_destination_set_version 3\n"),
        "{text}"
    );

    hang_up(&mut h, &mut call, &srv1);
    let one = status_of(&h, "1").unwrap();
    assert_eq!(
        (one.resources.clone(), one.open_calls, one.calls),
        (pstn(100, 0), 0, 1)
    );
    h.proxy.export_gauges(h.now);
    h.proxy.export_gauges(h.now);
    let text = h.proxy.metrics().encode();
    let load = metric_line(&text, "mrcp_lb_destination_load", &[]);
    assert!(load.ends_with("} 0"), "{load}");
}
