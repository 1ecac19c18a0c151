//! The relay rule (relay.rs, docs/relay-policy.md): requests with a To tag go only where a
//! dialog of ours, or the proof in our Record-Route, says they may.
//!
//! A stranger at 10.66.0.1 sends the shapes an open relay would forward; the trap it names is
//! 10.99.0.1:5060. A restarted proxy (a fresh core with the same configuration) stands for a
//! proxy that does not hold the dialog.

use super::*;

const TRAP: &str = "10.99.0.1:5060";

fn stranger() -> Peer {
    Peer {
        transport: Transport::Udp,
        listener: UDP_L,
        addr: addr("10.66.0.1:5060"),
        conn: None,
    }
}

/// A request with a To tag from the stranger: `routes` as Route headers, `ruri` as target.
fn forged(
    method: &str,
    ruri: &str,
    routes: &[&str],
    call_id: &str,
    from_tag: &str,
    to_tag: &str,
) -> String {
    let mut h = vec![(
        "Via",
        format!("SIP/2.0/UDP 10.66.0.1:5060;branch=z9hG4bK-forged-{method}-{call_id}"),
    )];
    for r in routes {
        h.push(("Route", r.to_string()));
    }
    h.extend([
        ("Max-Forwards", "70".to_string()),
        ("From", format!("<sip:a@10.66.0.1>;tag={from_tag}")),
        ("To", format!("<sip:b@10.99.0.1>;tag={to_tag}")),
        ("Call-ID", call_id.to_string()),
        ("CSeq", format!("7 {method}")),
    ]);
    if method == "INVITE" {
        h.push(("Contact", "<sip:a@10.66.0.1:5060>".to_string()));
    }
    sip(&format!("{method} {ruri} SIP/2.0"), &h, "")
}

fn refused_count(h: &Harness, reason: &str) -> f64 {
    sample(
        h,
        &format!("mrcp_lb_relay_refused_total{{reason=\"{reason}\"}}"),
    )
}

/// Sends `text` from the stranger and checks the answer: 404 back to it (nothing for an
/// ACK), nothing anywhere else, one more refusal counted under `reason`.
fn assert_refused(h: &mut Harness, from: Peer, text: &str, reason: &str) {
    let before = refused_count(h, reason);
    h.recv(from, text);
    let mut out = h.out();
    assert!(
        out.iter().all(|s| s.to() != addr(TRAP)),
        "a message reached the trap:{}",
        describe(&out)
    );
    if !text.starts_with("ACK ") {
        let nf = take(&mut out, "404", |s| s.code() == Some(404));
        assert_eq!(
            nf.to().ip(),
            from.addr.ip(),
            "the 404 goes back to the sender"
        );
    }
    assert_none(&out, &format!("after refusing:\n{text}"));
    assert_eq!(
        refused_count(h, reason),
        before + 1.0,
        "counted as {reason}"
    );
}

/// A config file with Record-Route keys, unique per test.
fn key_file(name: &str, keys: &str) -> String {
    let path = std::env::temp_dir().join(format!("lb-rr-{name}-{}", std::process::id()));
    std::fs::write(&path, keys).unwrap();
    format!(
        "recordRoute:\n  keyFile: {}\n  rotationGrace: 60s",
        path.display()
    )
}

const KEY1: &str = "first-key-0123456789abcdef";
const KEY2: &str = "second-key-0123456789abcdef";

/// A call through `h` to the first server, answered; returns it with its INVITE as the server
/// saw it (for the server's own requests).
fn answered_call(h: &mut Harness, id: &str) -> (Call, Uas, Sent) {
    let mut call = Call::udp(id);
    let inv = place(h, &call);
    let srv = Uas::new(&inv.to().to_string(), &format!("{id}srv"));
    answer(h, &mut call, &srv, &inv, &[]);
    (call, srv, inv)
}

#[test]
fn strangers_get_404_and_nothing_leaves_with_or_without_a_key() {
    for extra in [String::new(), key_file("strangers", KEY1)] {
        let mut h = Harness::with(TWO_DESTS, &extra);
        let (_call, _srv, _inv) = answered_call(&mut h, "live");
        let s = stranger();
        let trap = format!("sip:x@{TRAP}");
        let us = "<sip:127.0.0.1:5060;lr>";
        let trap_route = format!("<sip:{TRAP};lr>");
        // A To tag and a Request-URI elsewhere, no Route at all.
        for m in ["INVITE", "BYE", "OPTIONS", "INFO"] {
            let text = forged(m, &trap, &[], &format!("no-route-{m}"), "f", "t");
            assert_refused(&mut h, s, &text, "no_route");
        }
        assert_refused(
            &mut h,
            s,
            &forged("ACK", &trap, &[], "nr-ack", "f", "t"),
            "no_route",
        );
        // A forged Route to us, then a stranger's Route or Request-URI.
        let unproven = if extra.is_empty() {
            "stranger_target"
        } else {
            "unsigned"
        };
        for (routes, ruri) in [
            (vec![us, trap_route.as_str()], "sip:127.0.0.1:5080"),
            (vec![us], trap.as_str()),
            (vec![us, us], trap.as_str()),
        ] {
            for m in ["INVITE", "BYE", "ACK"] {
                let text = forged(
                    m,
                    ruri,
                    &routes,
                    &format!("fr-{m}-{}", routes.len()),
                    "f",
                    "t",
                );
                assert_refused(&mut h, s, &text, unproven);
            }
        }
        if !extra.is_empty() {
            // A token that is garbage, or made for another call.
            let bad = "<sip:127.0.0.1:5060;lr;lbt=AQoAAAUTxAAAAAAAAAAAAAAAAAAA>";
            assert_refused(
                &mut h,
                s,
                &forged("BYE", &trap, &[bad], "garbage", "f", "t"),
                "bad_token",
            );
        }
        // The live call was not disturbed.
        assert_eq!(h.proxy.dialog_stats().active, 1);
    }
}

#[test]
fn without_a_key_a_restart_keeps_calls_towards_and_from_destinations() {
    let mut before = Harness::new();
    let (mut call, srv, inv) = answered_call(&mut before, "nokey");
    assert!(
        !inv.all(HeaderName::RecordRoute)[0].contains("lbt="),
        "no key, no token"
    );
    // A restart: a new core with the same configuration holds no dialog.
    let mut h = Harness::new();
    h.now = before.now;
    // The server hangs up: from a destination, so relayed to the caller's Contact.
    h.recv(srv.peer, &srv.bye(&inv.msg));
    let mut out = h.out();
    let bye = take(&mut out, "server's BYE", |s| s.is(Method::Bye));
    assert_eq!(
        bye.to(),
        addr("192.168.0.5:5061"),
        "to the caller's Contact"
    );
    assert_none(&out, "after the server's BYE");
    // The caller's re-INVITE and BYE: towards the destination its Request-URI names.
    h.recv(call.peer, &call.in_dialog("INVITE", &[], CLIENT_SDP));
    let mut out = h.out();
    let reinv = take(&mut out, "re-INVITE", |s| s.is(Method::Invite));
    assert_eq!(reinv.to(), srv.peer.addr);
    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let bye = take(&mut out, "caller's BYE", |s| s.is(Method::Bye));
    assert_eq!(bye.to(), srv.peer.addr);
    // The same Route to us with a Request-URI that is no destination, from a caller that is
    // no destination: refused.
    call.target = Some(format!("sip:x@{TRAP}"));
    assert_refused(&mut h, call.peer, &call.bye(), "stranger_target");
}

#[test]
fn with_a_key_the_token_names_the_destination_and_survives_a_restart() {
    let extra = key_file("restart", KEY1);
    let mut before = Harness::with(TWO_DESTS, &extra);
    let (mut call, srv, inv) = answered_call(&mut before, "key");
    let rr = inv.all(HeaderName::RecordRoute);
    assert_eq!(rr.len(), 1);
    assert!(rr[0].contains(";lbt="), "{rr:?}");

    let mut h = Harness::with(TWO_DESTS, &extra);
    h.now = before.now;
    // The server's BYE, from the server's address: relayed to the caller.
    h.recv(srv.peer, &srv.bye(&inv.msg));
    let mut out = h.out();
    let bye = take(&mut out, "server's BYE", |s| s.is(Method::Bye));
    assert_eq!(bye.to(), addr("192.168.0.5:5061"));
    assert_none(&out, "after the server's BYE");
    // The same BYE from anywhere else: the token is the server side's, so refused.
    let copied = srv.bye(&inv.msg).replace("-bye", "-bye-copied");
    assert_refused(&mut h, stranger(), &copied, "not_from_destination");

    // The caller's BYE goes to the destination the token names, whatever its Request-URI says.
    call.target = Some(format!("sip:x@{TRAP}"));
    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let bye = take(&mut out, "caller's BYE", |s| s.is(Method::Bye));
    assert_eq!(bye.to(), srv.peer.addr, "to the signed destination only");
    assert_none(&out, "after the caller's BYE");

    // The token replayed in another call, or with the tags of another caller: refused.
    let route = call.routes[0].clone();
    let replayed = forged(
        "BYE",
        &format!("sip:x@{TRAP}"),
        &[&route],
        "other-call",
        call.tag(),
        "t",
    );
    assert_refused(&mut h, stranger(), &replayed, "bad_token");
    let other_tag = forged(
        "BYE",
        &format!("sip:x@{TRAP}"),
        &[&route],
        &call.call_id,
        "nottheirs",
        "t",
    );
    assert_refused(&mut h, stranger(), &other_tag, "bad_token");

    // A proxy with another key does not accept it.
    let mut other = Harness::with(TWO_DESTS, &key_file("restart-other", KEY2));
    call.cseq += 1;
    assert_refused(&mut other, call.peer, &call.bye(), "bad_token");
}

#[test]
fn a_rotated_key_keeps_calls_for_the_grace_period_and_a_listed_one_for_good() {
    let mut before = Harness::with(TWO_DESTS, &key_file("rot-a", KEY1));
    let (mut call, srv, _inv) = answered_call(&mut before, "rot");

    // Restarted with the new key first and the old one still listed: accepted.
    let mut both = Harness::with(TWO_DESTS, &key_file("rot-b", &format!("{KEY2}\n{KEY1}\n")));
    both.recv(call.peer, &call.bye());
    let bye = take(&mut both.out(), "BYE with the listed old key", |s| {
        s.is(Method::Bye)
    });
    assert_eq!(bye.to(), srv.peer.addr);

    // The key file changed under a running proxy: the old key verifies for rotationGrace
    // (60 s here), then no more.
    let mut h = Harness::with(TWO_DESTS, &key_file("rot-c", KEY1));
    h.advance_to(secs(1));
    h.proxy
        .rotate_route_keys(h.now, vec![crate::config::Key(KEY2.as_bytes().to_vec())]);
    h.advance_to(secs(59));
    h.recv(call.peer, &call.bye());
    let bye = take(&mut h.out(), "BYE within the grace", |s| s.is(Method::Bye));
    assert_eq!(bye.to(), srv.peer.addr);
    h.advance_to(secs(62));
    h.out(); // the BYE's retransmissions: its server never answered
    call.cseq += 1;
    assert_refused(&mut h, call.peer, &call.bye(), "bad_token");
    // New calls carry tokens of the new key, which a proxy with only the new key accepts.
    let (mut fresh, fsrv, _) = answered_call(&mut h, "rot-new");
    let mut only_new = Harness::with(TWO_DESTS, &key_file("rot-d", KEY2));
    only_new.recv(fresh.peer, &fresh.bye());
    let bye = take(&mut only_new.out(), "BYE signed by the new key", |s| {
        s.is(Method::Bye)
    });
    assert_eq!(bye.to(), fsrv.peer.addr);
}

#[test]
fn in_a_held_dialog_requests_go_to_the_other_party_only() {
    let mut h = Harness::new();
    let (mut call, srv, inv) = answered_call(&mut h, "held");
    // A Route to a stranger after ours, in the caller's name: refused, the call goes on.
    let ours = call.routes.clone();
    call.routes.push(format!("<sip:{TRAP};lr>"));
    assert_refused(
        &mut h,
        call.peer,
        &call.in_dialog("INFO", &[], ""),
        "stranger_target",
    );
    // The server's request with a stranger's Route after ours: refused too.
    let bye = srv.bye(&inv.msg).replacen(
        "Max-Forwards",
        &format!("Route: <sip:{TRAP};lr>\r\nMax-Forwards"),
        1,
    );
    assert_refused(&mut h, srv.peer, &bye, "stranger_target");
    // A Request-URI that names a stranger, no Route: as before, to the party the proxy knows.
    call.routes = ours;
    call.target = Some(format!("sip:x@{TRAP}"));
    h.recv(call.peer, &call.in_dialog("INFO", &[], ""));
    let info = take(&mut h.out(), "INFO", |s| s.is(Method::Info));
    assert_eq!(info.to(), srv.peer.addr, "to the server of the call");
    assert_eq!(h.proxy.dialog_stats().active, 1);
}

#[test]
fn a_bye_through_another_replica_is_proven_by_the_cluster_key() {
    let dir = std::env::temp_dir().join(format!("lb-rr-cluster-{}", std::process::id()));
    std::fs::write(&dir, "cluster-key-0123456789abcdef").unwrap();
    let cluster = |listen: &str, name: &str| {
        format!(
            "probing:\n  interval: 1h\ncluster:\n  listen: {listen}\n  name: {name}\n  keyFile: {}\n  peers: [\"{CL_A}\", \"{CL_B}\"]",
            dir.display()
        )
    };
    let mut a = Harness::with(TWO_DESTS, &cluster(CL_A, "a"));
    let mut b = Harness::with(TWO_DESTS, &cluster(CL_B, "b"));
    let (mut call, srv, _inv) = answered_call(&mut a, "xrep");
    assert!(
        call.routes[0].contains(";lbt="),
        "signed with the key derived from the cluster key"
    );
    // The caller's BYE with a Request-URI gone astray reaches B: the token sends it to A's
    // server only.
    call.target = Some(format!("sip:x@{TRAP}"));
    b.recv(call.peer, &call.bye());
    let mut out = b.out();
    let bye = take(&mut out, "BYE relayed by B", |s| s.is(Method::Bye));
    assert_eq!(bye.to(), srv.peer.addr);
    assert_none(&out, "after the BYE");
}

#[test]
fn a_forged_2xx_with_our_via_is_not_relayed() {
    let mut h = Harness::new();
    let ok = sip(
        "SIP/2.0 200 OK",
        &[
            (
                "Via",
                "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-forged".to_string(),
            ),
            ("Via", format!("SIP/2.0/UDP {TRAP};branch=z9hG4bK-victim")),
            ("From", "<sip:a@10.66.0.1>;tag=f".to_string()),
            ("To", "<sip:b@10.99.0.1>;tag=t".to_string()),
            ("Call-ID", "forged-2xx".to_string()),
            ("CSeq", "1 INVITE".to_string()),
        ],
        "",
    );
    h.recv(stranger(), &ok);
    assert_none(&h.out(), "a 2xx whose top Via is not a branch of ours");
}

#[test]
fn before_its_set_arrives_a_restarted_proxy_holds_back_and_the_retransmission_passes() {
    let extra = key_file("noset", KEY1);
    let mut before = Harness::with(TWO_DESTS, &extra);
    let (mut call, srv, _inv) = answered_call(&mut before, "noset");
    // Restarted without a set in the file: the operator has not pushed yet.
    let cfg = Arc::new(config(TWO_DESTS, &extra));
    let set = cfg.destinations.clone().unwrap();
    let mut h = Harness::with(TWO_DESTS, &extra);
    h.proxy = Proxy::new(cfg, Destinations::waiting());
    let bye = call.bye();
    h.recv(call.peer, &bye);
    assert_none(&h.out(), "no answer while the set is missing");
    assert_eq!(refused_count(&h, "no_set"), 1.0);
    h.proxy.replace_set(h.now, &set).unwrap();
    // The caller retransmits the BYE (same branch): now it goes to the server.
    h.recv(call.peer, &bye);
    let sent = take(&mut h.out(), "BYE after the set arrived", |s| {
        s.is(Method::Bye)
    });
    assert_eq!(sent.to(), srv.peer.addr);
}

#[test]
fn a_double_record_route_carries_the_token_twice_and_both_routes_are_ours() {
    let extra = key_file("double", KEY1);
    let mut before = Harness::with(TWO_DESTS, &extra);
    let mut call = Call::tcp("dbl");
    let inv = place(&mut before, &call);
    let rr = inv.all(HeaderName::RecordRoute);
    assert_eq!(rr.len(), 2, "{rr:?}");
    let token = |r: &str| {
        SipUri::parse(name_addr_uri(r))
            .unwrap()
            .param(TOKEN_PARAM)
            .flatten()
            .map(str::to_string)
    };
    assert!(token(&rr[0]).is_some());
    assert_eq!(token(&rr[0]), token(&rr[1]), "one token on both entries");
    let srv = Uas::new(S1, "dblsrv");
    before.recv(srv.peer, &srv.reply(&inv.msg, 200, &[], SERVER_SDP));
    let ok = take(&mut before.out(), "200", |s| s.code() == Some(200));
    call.answered(&ok.msg);

    // After a restart the caller's BYE over TCP, with both Routes: to the UDP server.
    let mut h = Harness::with(TWO_DESTS, &extra);
    h.recv(call.peer, &call.bye());
    let bye = take(&mut h.out(), "BYE", |s| s.is(Method::Bye));
    assert_eq!(bye.to(), srv.peer.addr);
    assert_eq!(bye.out.transport, Transport::Udp);
    assert!(
        bye.all(HeaderName::Route).is_empty(),
        "both of our Routes stripped"
    );
}
