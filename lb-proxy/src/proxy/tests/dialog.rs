//! Dialogs: relayed 200/ACK/BYE, load freed, dialog memory, lifetime and session timers.

use super::*;

#[test]
fn answered_call_relays_200_ack_bye_and_frees_the_load() {
    let mut h = Harness::new();
    let mut call = Call::udp("c3");
    let srv = Uas::new(S1, "srv3");
    let inv = place(&mut h, &call);
    assert_eq!(inv.to(), addr(S1));

    // 200 upstream, without our Via, to the caller's flow.
    h.recv(srv.peer, &srv.reply(&inv.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200", |s| s.code() == Some(200));
    assert_none(&out, "after the 200");
    ok.assert_to(&call.peer);
    let vias = ok.vias();
    assert_eq!(vias.len(), 1, "our Via is removed");
    assert_eq!(vias[0].branch(), Some(call.invite_branch().as_str()));
    assert_eq!(vias[0].host, "192.168.0.5");
    assert_eq!(ok.msg.to_tag(), Some("srv3"));
    assert_eq!(
        ok.all(HeaderName::RecordRoute),
        vec!["<sip:127.0.0.1:5060;transport=udp;lr>".to_string()]
    );
    assert_eq!(&ok.msg.body[..], SERVER_SDP.as_bytes());
    let st = h.proxy.dialog_stats();
    assert_eq!((st.active, st.early, st.failed), (1, 0, 0));
    assert_eq!(h.load(0), 1);

    // ACK with Route: forwarded to the server, our Route removed.
    call.answered(&ok.msg);
    assert_eq!(
        call.routes,
        vec!["<sip:127.0.0.1:5060;transport=udp;lr>".to_string()]
    );
    h.recv(call.peer, &call.ack());
    let mut out = h.out();
    let ack = take(&mut out, "ACK", |s| s.is(Method::Ack));
    assert_none(&out, "after the ACK");
    ack.assert_to(&srv.peer);
    assert_eq!(ack.ruri(), "sip:mrcp@127.0.0.1:5080;transport=udp");
    assert_eq!(ack.get(HeaderName::Route), None, "our Route is consumed");
    let vias = ack.vias();
    assert_eq!(vias.len(), 2);
    assert!(vias[0].branch().unwrap().starts_with("z9hG4bK"));
    assert_eq!(vias[0].host, "127.0.0.1");
    assert_eq!(h.proxy.dialog_stats().active, 1);

    // BYE from the caller: forwarded, dialog over, load back to 0.
    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE", |s| s.is(Method::Bye));
    assert_none(&out, "after the BYE");
    bye.assert_to(&srv.peer);
    assert_eq!(bye.ruri(), "sip:mrcp@127.0.0.1:5080;transport=udp");
    assert_eq!(bye.get(HeaderName::Route), None);
    assert_eq!(bye.get(HeaderName::CSeq), Some("2 BYE"));
    let st = h.proxy.dialog_stats();
    assert_eq!(
        (st.active, st.processed, st.failed, st.expired),
        (0, 1, 0, 0)
    );
    assert_eq!(h.load(0), 0);

    // 200 to the BYE goes back to the caller, without our Via.
    h.recv(srv.peer, &response(&bye.msg, 200, None, &[], ""));
    let mut out = h.out();
    let ok = take(&mut out, "200 to BYE", |s| s.code() == Some(200));
    assert_none(&out, "after the 200 to BYE");
    ok.assert_to(&call.peer);
    assert_eq!(ok.get(HeaderName::CSeq), Some("2 BYE"));
    assert_eq!(ok.vias().len(), 1);
    assert_eq!(
        ok.vias()[0].branch(),
        Some(format!("z9hG4bK-{}-2-BYE", call.call_id).as_str())
    );
}

#[test]
fn transactions_and_dialog_are_gone_after_a_call() {
    let mut h = Harness::new();
    let mut call = Call::udp("c3b");
    let srv = Uas::new(S1, "srv3b");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE", |s| s.is(Method::Bye));
    h.recv(srv.peer, &response(&bye.msg, 200, None, &[], ""));
    h.out();
    h.advance_to(secs(40));
    assert_eq!(
        h.proxy.sizes(),
        (0, 0, 0),
        "server txs, client txs, dialogs"
    );
}

#[test]
fn callee_bye_reaches_the_caller_on_its_tcp_connection() {
    let mut h = Harness::new();
    let mut call = Call::tcp("c4");
    let srv = Uas::new(S1, "srv4");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    assert_eq!(h.proxy.dialog_stats().active, 1);

    h.recv(srv.peer, &srv.bye(&inv.msg));
    let mut out = h.out();
    let bye = take(&mut out, "BYE to the caller", |s| s.is(Method::Bye));
    assert_none(&out, "after the BYE");
    // The caller's own TCP connection, from the TCP listener.
    bye.assert_to(&call.peer);
    assert_eq!(bye.ruri(), "sip:sipp@127.0.0.1:41000;transport=tcp");
    assert_eq!(bye.get(HeaderName::Route), None, "both our Routes consumed");
    let vias = bye.vias();
    assert_eq!(vias.len(), 2);
    assert_eq!((&*vias[0].transport, vias[0].port), ("TCP", Some(5060)));
    assert_eq!(bye.msg.from_tag(), Some("srv4"));
    assert_eq!(bye.msg.to_tag(), Some(call.tag()));
    let st = h.proxy.dialog_stats();
    assert_eq!((st.active, st.expired, st.failed), (0, 0, 0));
    assert_eq!(h.load(0), 0);
}

#[test]
fn response_to_a_callee_bye_goes_back_to_the_callee_across_transports() {
    // Caller on TCP, server on UDP: the server's BYE goes out over TCP with our TCP Via (no
    // rport). The caller's 200 must come back to the server that sent the BYE.
    let mut h = Harness::new();
    let mut call = Call::tcp("c4b");
    let srv = Uas::new(S1, "srv4b");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.recv(srv.peer, &srv.bye(&inv.msg));
    let mut out = h.out();
    let bye = take(&mut out, "BYE to the caller", |s| s.is(Method::Bye));
    bye.assert_to(&call.peer);

    h.recv(call.peer, &response(&bye.msg, 200, None, &[], ""));
    let mut out = h.out();
    let ok = take(&mut out, "200 to the BYE", |s| s.code() == Some(200));
    assert_none(&out, "after the 200");
    assert_eq!(ok.vias().len(), 1, "our Via removed");
    assert_eq!(ok.vias()[0].port, Some(5080));
    ok.assert_to(&srv.peer);
}

#[test]
fn requests_without_route_are_routed_by_dialog_memory() {
    let mut h = Harness::new();
    let mut call = Call::udp("c5");
    call.ignore_rr = true;
    let srv = Uas::new(S1, "srv5");
    let inv = place(&mut h, &call);
    h.recv(srv.peer, &srv.reply(&inv.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200", |s| s.code() == Some(200));
    call.answered(&ok.msg);

    // ACK to the proxy's own address, no Route.
    let ack_text = call.ack();
    assert!(ack_text.starts_with("ACK sip:service@127.0.0.1:5060 SIP/2.0"));
    assert!(!ack_text.contains("Route:"));
    h.recv(call.peer, &ack_text);
    let mut out = h.out();
    let ack = take(&mut out, "ACK", |s| s.is(Method::Ack));
    assert_none(&out, "after the ACK");
    ack.assert_to(&srv.peer);
    assert_eq!(ack.ruri(), "sip:mrcp@127.0.0.1:5080;transport=udp");

    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE", |s| s.is(Method::Bye));
    assert_none(&out, "after the BYE");
    bye.assert_to(&srv.peer);
    assert_eq!(bye.ruri(), "sip:mrcp@127.0.0.1:5080;transport=udp");
    assert_eq!(h.proxy.dialog_stats().active, 0);
    assert_eq!(h.load(0), 0);

    // A dialog the proxy does not know: 481, nothing forwarded.
    let mut stray = Call::udp("unknown");
    stray.ignore_rr = true;
    stray.to = "<sip:service@127.0.0.1:5060>;tag=gone".into();
    h.recv(stray.peer, &stray.bye());
    let mut out = h.out();
    let nope = take(&mut out, "481", |s| s.code() == Some(481));
    assert_none(&out, "after the 481");
    nope.assert_to(&stray.peer);
    assert_eq!(nope.get(HeaderName::CSeq), Some("2 BYE"));
}

#[test]
fn dialog_lifetime_limit_sends_bye_to_both_sides() {
    let mut h = Harness::with(TWO_DESTS, "dialogs:\n  lifetime: 10s\n");
    let mut call = Call::udp("c14");
    let srv = Uas::new(S1, "srv14");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    assert_eq!(h.proxy.dialog_stats().active, 1);

    h.advance_to(ms(9999));
    assert_none(&h.out(), "before the lifetime");
    assert_eq!(h.proxy.dialog_stats().active, 1);
    h.advance_to(secs(10));
    let mut out = h.out();
    let (to_srv, to_caller) = expiry_byes(&mut out, &call, &srv);
    assert_none(&out, "only the two BYEs");
    assert_eq!(to_srv.get(HeaderName::CSeq), Some("2 BYE"));
    assert!(to_caller
        .get(HeaderName::CSeq)
        .is_some_and(|c| c.ends_with(" BYE")));

    let st = h.proxy.dialog_stats();
    assert_eq!((st.expired, st.active, st.failed), (1, 0, 0));
    assert_eq!((h.load(0), h.load(1)), (0, 0));

    // Both sides answer; nothing is relayed.
    h.recv(srv.peer, &response(&to_srv.msg, 200, None, &[], ""));
    h.recv(call.peer, &response(&to_caller.msg, 200, None, &[], ""));
    assert_none(&h.out(), "the 200s to our own BYEs are absorbed");
}

#[test]
fn a_malformed_contact_is_no_target_for_the_expiry_bye() {
    // Found by fuzzing: the caller's Contact was kept as its remote target unchecked, and the
    // BYE at the dialog's lifetime went out with it as Request-URI: a request that does not
    // parse (a bad port; a space in a parameter). The callee still gets its BYE.
    for (i, contact) in [
        "<sip:client@127.0.5.1:5070t;ransport=UDP>",
        "<sip:client@[::1]:5072;tra[:f: :1]nsport=UDP>",
    ]
    .into_iter()
    .enumerate()
    {
        let mut h = Harness::with(TWO_DESTS, "dialogs:\n  lifetime: 10s\n");
        let mut call = Call::udp(&format!("c14b{i}"));
        call.contact = contact.into();
        let srv = Uas::new(S1, "srv14b");
        let inv = place(&mut h, &call);
        answer(&mut h, &mut call, &srv, &inv, &[]);
        h.advance_to(secs(10));
        let mut out = h.out();
        let to_srv = take(&mut out, "BYE to the server", |s| s.is(Method::Bye));
        to_srv.assert_to(&srv.peer);
        assert_none(&out, "no BYE to a caller without a usable Contact");
        assert_eq!(h.proxy.dialog_stats().expired, 1);
        assert_eq!(h.load(0), 0);
    }
}

#[test]
fn session_expires_ends_the_dialog_at_its_deadline() {
    let mut h = Harness::new();
    let mut call = Call::udp("c14b");
    let srv = Uas::new(S1, "srv14b");
    let inv = place(&mut h, &call);
    let se = [("Session-Expires", "60;refresher=uac".to_string())];
    let ok = answer(&mut h, &mut call, &srv, &inv, &se);
    assert_eq!(ok.get(HeaderName::SessionExpires), Some("60;refresher=uac"));

    h.advance_to(ms(59_999));
    assert_none(&h.out(), "before Session-Expires");
    assert_eq!(h.proxy.dialog_stats().active, 1);
    h.advance_to(secs(60));
    let mut out = h.out();
    expiry_byes(&mut out, &call, &srv);
    assert_none(&out, "only the two BYEs");
    let st = h.proxy.dialog_stats();
    assert_eq!((st.expired, st.active), (1, 0));
    assert_eq!(h.load(0), 0);
}

#[test]
fn a_session_expires_beyond_the_clock_leaves_the_lifetime_limit() {
    // Found by fuzzing: `now + Session-Expires` panicked ("overflow when adding duration to
    // instant") for a 2xx with Session-Expires: 18446744073709551615, which killed the task
    // that owns every call.
    let mut h = Harness::with(TWO_DESTS, "dialogs:\n  lifetime: 10s\n");
    let mut call = Call::udp("c14c");
    let srv = Uas::new(S1, "srv14c");
    let inv = place(&mut h, &call);
    let se = [("Session-Expires", "18446744073709551615".to_string())];
    answer(&mut h, &mut call, &srv, &inv, &se);
    assert_eq!(h.proxy.dialog_stats().active, 1);
    h.advance_to(secs(10));
    let mut out = h.out();
    expiry_byes(&mut out, &call, &srv);
    assert_eq!(h.proxy.dialog_stats().expired, 1);
}

#[test]
fn the_largest_cseq_does_not_overflow_the_expiry_bye() {
    // Found with the fuzz harness: a caller's CSeq of 4294967295 made `cseq + 1` for the
    // expiry BYE overflow (a panic with overflow checks, CSeq 0 without).
    let mut h = Harness::with(TWO_DESTS, "dialogs:\n  lifetime: 10s\n");
    let call = Call::udp("c14d");
    let srv = Uas::new(S1, "srv14d");
    h.recv(
        call.peer,
        &call
            .invite()
            .replace("CSeq: 1 INVITE", "CSeq: 4294967295 INVITE"),
    );
    let mut out = h.out();
    let inv = take(&mut out, "forwarded INVITE", |s| s.is(Method::Invite));
    h.recv(srv.peer, &srv.reply(&inv.msg, 200, &[], SERVER_SDP));
    h.out();
    h.advance_to(secs(10));
    let mut out = h.out();
    let to_srv = take(&mut out, "BYE to the server", |s| {
        s.is(Method::Bye) && s.to() == srv.peer.addr
    });
    assert_eq!(to_srv.get(HeaderName::CSeq), Some("4294967295 BYE"));
    assert_eq!(h.proxy.dialog_stats().expired, 1);
}

#[test]
fn a_reinvite_left_without_a_final_gets_408() {
    // Found by fuzzing: a re-INVITE answered only with a provisional was cancelled at
    // inviteFinalTimeout, but its server transaction (no failover for it) never got a final
    // response: the caller waited forever and the transaction leaked.
    let mut h = Harness::new();
    let mut call = Call::udp("c14e");
    let srv = Uas::new(S1, "srv14e");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.recv(call.peer, &call.in_dialog("INVITE", &[], CLIENT_SDP));
    let mut out = h.out();
    let fwd = take(&mut out, "re-INVITE to the server", |s| {
        s.is(Method::Invite)
    });
    take(&mut out, "100 Trying", |s| s.code() == Some(100));
    h.recv(srv.peer, &srv.reply(&fwd.msg, 180, &[], ""));
    take(&mut h.out(), "180 to the caller", |s| s.code() == Some(180));
    h.advance_to(secs(10));
    let mut out = h.out();
    let cancel = take(&mut out, "CANCEL", |s| s.is(Method::Cancel));
    cancel.assert_to(&srv.peer);
    let timeout = take(&mut out, "408 to the caller", |s| s.code() == Some(408));
    timeout.assert_to(&call.peer);
    assert_eq!(timeout.get(HeaderName::CSeq), Some("2 INVITE"));
    h.advance_to(secs(60));
    assert_eq!(h.proxy.sizes(), (0, 0, 1), "only the dialog is left");
    assert_eq!(h.proxy.dialog_stats().active, 1);
}

#[test]
fn reinvite_with_session_expires_pushes_the_deadline() {
    let mut h = Harness::new();
    let mut call = Call::udp("c14c");
    let srv = Uas::new(S1, "srv14c");
    let inv = place(&mut h, &call);
    let se = [("Session-Expires", "60;refresher=uac".to_string())];
    answer(&mut h, &mut call, &srv, &inv, &se);

    // Refresh at 30 s.
    h.advance_to(secs(30));
    h.out();
    let reinvite = call.in_dialog(
        "INVITE",
        &[
            ("Session-Expires", "60;refresher=uac".into()),
            ("Supported", "timer".into()),
        ],
        CLIENT_SDP,
    );
    h.recv(call.peer, &reinvite);
    let mut out = h.out();
    let fwd = take(&mut out, "re-INVITE to the server", |s| {
        s.is(Method::Invite)
    });
    fwd.assert_to(&srv.peer);
    assert_eq!(fwd.get(HeaderName::CSeq), Some("2 INVITE"));
    h.recv(srv.peer, &srv.reply(&fwd.msg, 200, &se, SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200 to the re-INVITE", |s| s.code() == Some(200));
    ok.assert_to(&call.peer);
    h.recv(call.peer, &call.ack());
    let mut out = h.out();
    take(&mut out, "ACK of the re-INVITE", |s| s.is(Method::Ack));

    // The first deadline (60 s) passes quietly; the new one (90 s) ends the dialog.
    h.advance_to(secs(60));
    h.advance_to(ms(89_999));
    let out = h.out();
    assert!(
        !out.iter().any(|s| s.is(Method::Bye)),
        "BYE before the refreshed deadline:{}",
        describe(&out)
    );
    assert_eq!(h.proxy.dialog_stats().active, 1);
    h.advance_to(secs(90));
    let mut out = h.out();
    expiry_byes(&mut out, &call, &srv);
    assert_eq!(h.proxy.dialog_stats().expired, 1);
}

#[test]
fn expiry_bye_towards_the_callee_follows_its_route_set_in_order() {
    // The destination at 5080 is a proxy that record-routes, and forwards to another proxy
    // (10.9.9.2) before the server. Our route set towards the callee is what lies above our
    // Record-Route in the 200, in reverse: 5080 first, then 10.9.9.2.
    let mut h = Harness::with(TWO_DESTS, "dialogs:\n  lifetime: 10s\n");
    let mut call = Call::udp("c14d");
    let mut srv = Uas::new(S1, "srv14d");
    srv.record_route = vec![
        "<sip:10.9.9.2;lr>".to_string(),
        "<sip:127.0.0.1:5080;lr>".to_string(),
    ];
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.advance_to(secs(10));
    let mut out = h.out();
    let bye = take(&mut out, "BYE to the callee side", |s| {
        s.is(Method::Bye) && s.to() == addr(S1)
    });
    assert_eq!(
        bye.all(HeaderName::Route),
        vec![
            "<sip:127.0.0.1:5080;lr>".to_string(),
            "<sip:10.9.9.2;lr>".to_string()
        ]
    );
}
