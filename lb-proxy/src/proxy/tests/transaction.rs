//! Transaction details: CANCEL, retransmissions absorbed, non-2xx finals retransmitted.

use super::*;

#[test]
fn cancel_before_provisional_waits_for_a_provisional_then_cancels() {
    let mut h = Harness::new();
    let call = Call::udp("c10");
    let srv = Uas::new(S1, "srv10");
    let inv = place(&mut h, &call);

    h.recv(call.peer, &call.cancel());
    let mut out = h.out();
    let ok = take(&mut out, "200 to CANCEL", |s| s.code() == Some(200));
    assert_none(&out, "no CANCEL before a provisional");
    ok.assert_to(&call.peer);
    assert_eq!(ok.get(HeaderName::CSeq), Some("1 CANCEL"));

    h.recv(srv.peer, &srv.reply(&inv.msg, 180, &[], ""));
    let mut out = h.out();
    let cancel = take(&mut out, "CANCEL", |s| s.is(Method::Cancel));
    cancel.assert_to(&srv.peer);
    assert_eq!(cancel.branch(), inv.branch());
    assert_eq!(cancel.get(HeaderName::CSeq), Some("1 CANCEL"));
    assert!(
        out.iter().all(|s| s.to() != addr(S1) && s.to() != addr(S2)),
        "only the CANCEL goes downstream:{}",
        describe(&out)
    );

    h.recv(
        srv.peer,
        &response(&cancel.msg, 200, Some("srv10"), &[], ""),
    );
    assert_none(&h.out(), "200 to our CANCEL is absorbed");
    h.recv(srv.peer, &srv.reply(&inv.msg, 487, &[], ""));
    let mut out = h.out();
    let ack = take(&mut out, "ACK for the 487", |s| s.is(Method::Ack));
    ack.assert_to(&srv.peer);
    assert_eq!(ack.branch(), inv.branch());
    let term = take(&mut out, "487 to the caller", |s| s.code() == Some(487));
    assert_none(&out, "no failover after CANCEL");
    term.assert_to(&call.peer);
    assert_eq!(term.get(HeaderName::CSeq), Some("1 INVITE"));

    let st = h.proxy.dialog_stats();
    assert_eq!((st.failed, st.early, st.active), (1, 0, 0));
    assert_eq!((h.load(0), h.load(1)), (0, 0));
    assert_eq!(h.proxy.route_stats().failovers, 0);
}

#[test]
fn retransmitted_invite_is_absorbed_and_answered_with_the_last_response() {
    let mut h = Harness::new();
    let call = Call::udp("c11");
    let srv = Uas::new(S1, "srv11");
    h.recv(call.peer, &call.invite());
    let mut out = h.out();
    let trying = take(&mut out, "100 Trying", |s| s.code() == Some(100));
    let inv = take(&mut out, "INVITE", |s| s.is(Method::Invite));

    h.recv(call.peer, &call.invite());
    let mut out = h.out();
    let again = take(&mut out, "100 Trying again", |s| s.code() == Some(100));
    assert_none(&out, "nothing forwarded again");
    again.assert_to(&call.peer);
    assert_eq!(again.out.data, trying.out.data);
    assert_eq!(h.proxy.route_stats().routed, 1);
    assert_eq!(h.proxy.dialog_stats().processed, 1);
    assert_eq!(h.load(0), 1);

    // After a 180 the 180 is the last response.
    h.recv(srv.peer, &srv.reply(&inv.msg, 180, &[], ""));
    let mut out = h.out();
    let ringing = take(&mut out, "180", |s| s.code() == Some(180));
    h.recv(call.peer, &call.invite());
    let mut out = h.out();
    let again = take(&mut out, "180 again", |s| s.code() == Some(180));
    assert_none(&out, "nothing forwarded again");
    assert_eq!(again.out.data, ringing.out.data);
}

#[test]
fn a_final_after_a_2xx_on_the_same_branch_is_absorbed() {
    // Found by fuzzing: once a 2xx has come, the INVITE's client transaction no longer keeps
    // the request (RFC 6026 Accepted), and a 487 arriving after it made the proxy ACK it with
    // an ACK built from nothing: `ACK  SIP/2.0` without Via, From or Call-ID.
    let mut h = Harness::new();
    let mut call = Call::udp("c2xx487");
    let srv = Uas::new(S1, "srv2xx487");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.recv(srv.peer, &srv.reply(&inv.msg, 487, &[], ""));
    assert_none(&h.out(), "after a 487 that follows the 200");
    // Retransmissions of the 200 still reach the caller.
    h.recv(srv.peer, &srv.reply(&inv.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200 retransmission", |s| s.code() == Some(200));
    ok.assert_to(&call.peer);
    assert_none(&out, "after the 200 retransmission");
}

#[test]
fn non_2xx_final_is_retransmitted_over_udp_until_the_ack() {
    let mut h = Harness::new();
    let call = Call::udp("c12");
    let srv = Uas::new(S1, "srv12");
    let inv = place(&mut h, &call);
    h.recv(srv.peer, &srv.reply(&inv.msg, 486, &[], ""));
    let mut out = h.out();
    take(&mut out, "ACK downstream", |s| s.is(Method::Ack));
    let busy = take(&mut out, "486", |s| s.code() == Some(486));

    // Timer G: T1, 2*T1, 4*T1 apart.
    for (quiet, due) in [(499, 500), (1499, 1500), (3499, 3500)] {
        h.advance_to(ms(quiet));
        assert_none(&h.out(), &format!("before {due} ms"));
        h.advance_to(ms(due));
        let mut out = h.out();
        let re = take(&mut out, &format!("486 again at {due} ms"), |s| {
            s.code() == Some(486)
        });
        assert_none(&out, "only the 486");
        re.assert_to(&call.peer);
        assert_eq!(re.out.data, busy.out.data);
    }

    // The caller's ACK stops it and is not forwarded.
    h.recv(call.peer, &call.ack_non_2xx(&busy.msg));
    assert_none(&h.out(), "the ACK is absorbed");
    h.advance_to(secs(40));
    assert_none(&h.out(), "no retransmission after the ACK");
}

#[test]
fn max_forwards_zero_options_and_register_are_answered_locally() {
    let mut h = Harness::new();
    let call = Call::udp("c13");
    h.recv(
        call.peer,
        &call.invite().replace("Max-Forwards: 70", "Max-Forwards: 0"),
    );
    let mut out = h.out();
    let hops = take(&mut out, "483", |s| s.code() == Some(483));
    assert_none(&out, "nothing forwarded");
    hops.assert_to(&call.peer);
    assert_eq!(h.proxy.route_stats().routed, 0);
    assert_eq!((h.load(0), h.load(1)), (0, 0));

    let opt = Call::udp("c13o");
    h.recv(
        opt.peer,
        &opt.out_of_dialog("OPTIONS", &[("Accept", "application/sdp".into())]),
    );
    let mut out = h.out();
    let ok = take(&mut out, "200 to OPTIONS", |s| s.code() == Some(200));
    assert_none(&out, "OPTIONS is answered, not forwarded");
    ok.assert_to(&opt.peer);
    assert_eq!(ok.get(HeaderName::CSeq), Some("1 OPTIONS"));
    let allow = ok.get(HeaderName::Allow).unwrap_or_default();
    for m in ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS"] {
        assert!(allow.contains(m), "Allow: {allow}");
    }

    let reg = Call::udp("c13r");
    h.recv(
        reg.peer,
        &reg.out_of_dialog(
            "REGISTER",
            &[("Contact", reg.contact.clone()), ("Expires", "3600".into())],
        ),
    );
    let mut out = h.out();
    let no = take(&mut out, "405 to REGISTER", |s| s.code() == Some(405));
    assert_none(&out, "REGISTER is not forwarded");
    no.assert_to(&reg.peer);
    assert!(no
        .get(HeaderName::Allow)
        .is_some_and(|a| a.contains("INVITE")));
    assert_eq!(h.proxy.dialog_stats().processed, 0);
}
