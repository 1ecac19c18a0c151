//! The initial INVITE and failover: routing, retransmission, timeouts, 503 holds, transport errors.

use super::*;

#[test]
fn initial_invite_goes_to_the_least_loaded_destination_rewritten() {
    let mut h = Harness::new();
    let call = Call::udp("c1");
    h.recv(call.peer, &call.invite());
    let out = h.out();
    assert_eq!(out.len(), 2, "100 Trying and the INVITE:{}", describe(&out));

    // 100 Trying at once, to where the request came from (rport), with received/rport filled.
    let trying = &out[0];
    assert_eq!(trying.code(), Some(100));
    trying.assert_to(&call.peer);
    let v = &trying.vias()[0];
    assert_eq!(v.branch(), Some(call.invite_branch().as_str()));
    assert_eq!(v.param("received"), Some(Some("10.0.0.5")));
    assert_eq!(v.param("rport"), Some(Some("40000")));
    assert_eq!(trying.msg.to_tag(), None, "no To tag on 100");

    // The INVITE: to 5080 (100 free beats 50 free), over UDP from the UDP listener.
    let inv = &out[1];
    assert!(inv.is(Method::Invite));
    inv.assert_to(&Peer::udp_server(S1));
    assert!(inv.out.on_error.is_some(), "sends carry an error token");
    let vias = inv.vias();
    assert_eq!(vias.len(), 2);
    assert_eq!(
        (&*vias[0].transport, &*vias[0].host, vias[0].port),
        ("UDP", "127.0.0.1", Some(5060))
    );
    assert!(vias[0].branch().unwrap().starts_with("z9hG4bK"));
    assert_ne!(vias[0].branch(), Some(call.invite_branch().as_str()));
    assert_eq!(
        vias[0].param("rport"),
        Some(None),
        "our UDP Via asks for rport"
    );
    // The client's Via, RFC 3581.
    assert_eq!((&*vias[1].host, vias[1].port), ("192.168.0.5", Some(5061)));
    assert_eq!(vias[1].branch(), Some(call.invite_branch().as_str()));
    assert_eq!(vias[1].param("received"), Some(Some("10.0.0.5")));
    assert_eq!(vias[1].param("rport"), Some(Some("40000")));

    assert_eq!(inv.msg.max_forwards(), Some(69));
    assert_eq!(
        inv.all(HeaderName::RecordRoute),
        vec!["<sip:127.0.0.1:5060;transport=udp;lr>".to_string()]
    );
    assert_eq!(inv.ruri(), "sip:service@127.0.0.1:5080");
    // Dialog identifiers and the rest untouched.
    assert_eq!(inv.get(HeaderName::From), Some(call.from.as_str()));
    assert_eq!(inv.get(HeaderName::To), Some(call.to.as_str()));
    assert_eq!(inv.get(HeaderName::CallId), Some(call.call_id.as_str()));
    assert_eq!(inv.get(HeaderName::CSeq), Some("1 INVITE"));
    assert_eq!(inv.get(HeaderName::Contact), Some(call.contact.as_str()));
    assert_eq!(
        inv.get(HeaderName::Other("Subject".into())),
        Some("MRCP synthesis")
    );
    // SDP byte for byte, Content-Length right.
    assert_eq!(&inv.msg.body[..], CLIENT_SDP.as_bytes());
    assert!(inv.out.data.ends_with(CLIENT_SDP.as_bytes()));
    let cl = CLIENT_SDP.len().to_string();
    assert_eq!(inv.get(HeaderName::ContentLength), Some(cl.as_str()));
    assert_eq!(inv.msg.count(&HeaderName::ContentLength), 1);

    assert_eq!((h.load(0), h.load(1)), (1, 0));
    let st = h.proxy.dialog_stats();
    assert_eq!((st.processed, st.active, st.early), (1, 0, 0));
    assert_eq!(h.proxy.route_stats().routed, 1);
}

#[test]
fn tcp_caller_to_udp_server_gets_a_double_record_route() {
    let mut h = Harness::new();
    let call = Call::tcp("c2");
    h.recv(call.peer, &call.invite());
    let mut out = h.out();
    let trying = take(&mut out, "100 Trying", |s| s.code() == Some(100));
    trying.assert_to(&call.peer);
    let inv = take(&mut out, "INVITE", |s| s.is(Method::Invite));
    inv.assert_to(&Peer::udp_server(S1));
    assert_eq!(inv.out.listener, UDP_L, "sent from the UDP listener");

    let rr = inv.all(HeaderName::RecordRoute);
    assert_eq!(rr.len(), 2, "{rr:?}");
    let top = SipUri::parse(name_addr_uri(&rr[0])).unwrap();
    let second = SipUri::parse(name_addr_uri(&rr[1])).unwrap();
    for (u, t) in [(&top, "udp"), (&second, "tcp")] {
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", Some(5060)));
        assert_eq!(u.param("transport"), Some(Some(t)), "{rr:?}");
        assert!(u.has_param("lr"), "{rr:?}");
        assert_eq!(u.param("r2"), Some(Some("on")), "{rr:?}");
    }

    let vias = inv.vias();
    assert_eq!(vias[0].transport, "UDP");
    // The caller did not ask for rport and wrote its real address: its Via is untouched.
    assert_eq!(
        inv.msg.get_all(&HeaderName::Via).nth(1),
        Some(call.via(&call.invite_branch()).as_str())
    );
}

#[test]
fn unanswered_invite_is_retransmitted_then_fails_over_and_marks_down() {
    let mut h = Harness::new();
    let call = Call::udp("c6");
    let inv = place(&mut h, &call);
    assert_eq!(inv.to(), addr(S1));

    // Timer A: T1, then 2*T1 later.
    h.advance_to(ms(499));
    assert_none(&h.out(), "before T1");
    h.advance_to(ms(500));
    let mut out = h.out();
    let re = take(&mut out, "retransmission at T1", |s| s.is(Method::Invite));
    assert_none(&out, "at T1");
    assert_eq!(re.to(), addr(S1));
    assert_eq!(re.out.data, inv.out.data, "same bytes");
    h.advance_to(ms(1499));
    assert_none(&h.out(), "before T1 + 2*T1");
    h.advance_to(ms(1500));
    let mut out = h.out();
    let re = take(&mut out, "retransmission at 3*T1", |s| s.is(Method::Invite));
    assert_none(&out, "at 3*T1");
    assert_eq!(re.out.data, inv.out.data);
    h.advance_to(ms(2999));
    assert_none(&h.out(), "before inviteTimeout");

    // inviteTimeout: 5080 marked down, the call goes to 5090 on a new branch.
    h.advance_to(ms(3000));
    let mut out = h.out();
    let inv2 = take(&mut out, "INVITE to the second destination", |s| {
        s.is(Method::Invite)
    });
    assert_none(&out, "at the timeout (nothing to the caller)");
    inv2.assert_to(&Peer::udp_server(S2));
    assert_eq!(inv2.ruri(), "sip:service@127.0.0.1:5090");
    assert_ne!(inv2.branch(), inv.branch());
    assert_eq!(&inv2.msg.body[..], CLIENT_SDP.as_bytes());
    assert_eq!(h.state(0), State::Down);
    assert_eq!((h.load(0), h.load(1)), (0, 1));
    let rs = h.proxy.route_stats();
    assert_eq!((rs.routed, rs.failovers), (2, 1));

    // Only the new branch retransmits.
    h.advance_to(ms(3500));
    let mut out = h.out();
    let re = take(&mut out, "retransmission", |s| s.is(Method::Invite));
    assert_none(&out, "at 3.5 s");
    assert_eq!(re.to(), addr(S2));

    // The second server answers: the caller gets its 200.
    let srv2 = Uas::new(S2, "srv6");
    h.recv(srv2.peer, &srv2.reply(&inv2.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200", |s| s.code() == Some(200));
    assert_none(&out, "after the 200");
    ok.assert_to(&call.peer);
    assert_eq!(ok.msg.to_tag(), Some("srv6"));
    assert_eq!(ok.vias().len(), 1);
    assert_eq!(h.proxy.dialog_stats().active, 1);
    assert_eq!((h.load(0), h.load(1)), (0, 1));
}

#[test]
fn late_200_from_a_timed_out_branch_is_hung_up_not_relayed() {
    // The first server answers just after the proxy gave up on it: the proxy must ACK and
    // BYE that answer itself; the caller must not see a second dialog.
    let mut h = Harness::new();
    let call = Call::udp("c6b");
    let inv = place(&mut h, &call);
    h.advance_to(ms(3000));
    let mut out = h.out();
    take(&mut out, "INVITE to the second destination", |s| {
        s.is(Method::Invite) && s.to() == addr(S2)
    });
    h.advance_to(ms(3100));
    h.out();

    let srv1 = Uas::new(S1, "late");
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let to_caller: Vec<String> = out
        .iter()
        .filter(|s| s.to() == call.peer.addr)
        .map(Sent::label)
        .collect();
    assert!(
        to_caller.is_empty(),
        "the late 200 was relayed to the caller: {to_caller:?}"
    );
    let ack = take(&mut out, "ACK to the late server", |s| s.is(Method::Ack));
    assert_eq!(ack.to(), addr(S1));
    let bye = take(&mut out, "BYE to the late server", |s| s.is(Method::Bye));
    assert_eq!(bye.to(), addr(S1));
    assert_eq!(bye.msg.to_tag(), Some("late"));
}

#[test]
fn provisional_without_final_cancels_and_fails_over_without_marking_down() {
    let mut h = Harness::new();
    let call = Call::udp("c7");
    let srv1 = Uas::new(S1, "srv7a");
    let inv = place(&mut h, &call);
    assert_eq!(inv.to(), addr(S1));

    h.recv(srv1.peer, &srv1.reply(&inv.msg, 180, &[], ""));
    let mut out = h.out();
    let ringing = take(&mut out, "180 to the caller", |s| s.code() == Some(180));
    assert_none(&out, "after the 180");
    ringing.assert_to(&call.peer);
    assert_eq!(ringing.vias().len(), 1);
    assert_eq!(h.proxy.dialog_stats().early, 1);

    // No retransmission after a provisional, no failover at inviteTimeout.
    h.advance_to(ms(9999));
    assert_none(&h.out(), "before inviteFinalTimeout");

    h.advance_to(secs(10));
    let mut out = h.out();
    let cancel = take(&mut out, "CANCEL", |s| s.is(Method::Cancel));
    let inv2 = take(&mut out, "INVITE to the second destination", |s| {
        s.is(Method::Invite)
    });
    assert_none(&out, "at the final-response timeout");
    cancel.assert_to(&srv1.peer);
    assert_eq!(
        cancel.branch(),
        inv.branch(),
        "CANCEL on the INVITE's branch"
    );
    assert_eq!(cancel.vias().len(), 1);
    assert_eq!(cancel.ruri(), inv.ruri());
    assert_eq!(cancel.get(HeaderName::CSeq), Some("1 CANCEL"));
    assert_eq!(cancel.get(HeaderName::CallId), inv.get(HeaderName::CallId));
    assert_eq!(cancel.get(HeaderName::From), inv.get(HeaderName::From));
    assert_eq!(cancel.get(HeaderName::To), inv.get(HeaderName::To));
    inv2.assert_to(&Peer::udp_server(S2));
    assert_ne!(inv2.branch(), inv.branch());

    assert_eq!(h.state(0), State::Up, "a slow answer does not mark it down");
    assert_eq!((h.load(0), h.load(1)), (0, 1));
    assert_eq!(h.proxy.route_stats().failovers, 1);
    assert_eq!(h.proxy.dialog_stats().early, 0);

    // The first server confirms: 200 to CANCEL, 487 to INVITE (ACKed, not relayed).
    h.recv(
        srv1.peer,
        &response(&cancel.msg, 200, Some("srv7a"), &[], ""),
    );
    assert_none(&h.out(), "200 to our CANCEL is absorbed");
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 487, &[], ""));
    let mut out = h.out();
    let ack = take(&mut out, "ACK for the 487", |s| s.is(Method::Ack));
    assert_none(&out, "the 487 is not relayed");
    ack.assert_to(&srv1.peer);
    assert_eq!(ack.branch(), inv.branch());

    // The second server answers the call.
    let srv2 = Uas::new(S2, "srv7b");
    h.recv(srv2.peer, &srv2.reply(&inv2.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200", |s| s.code() == Some(200));
    ok.assert_to(&call.peer);
    assert_eq!(ok.msg.to_tag(), Some("srv7b"));
    assert_eq!(h.proxy.dialog_stats().active, 1);
}

#[test]
fn a_ringing_branch_that_goes_silent_is_forgotten() {
    // Found by fuzzing: a branch given up on at inviteFinalTimeout (180, then nothing) was
    // cancelled but never removed when the server answered neither the CANCEL nor the INVITE:
    // one client transaction leaked per such call.
    let mut h = Harness::new();
    let call = Call::udp("c7s");
    let srv1 = Uas::new(S1, "srv7s");
    let inv = place(&mut h, &call);
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 180, &[], ""));
    h.advance_to(secs(10));
    let mut out = h.out();
    take(&mut out, "CANCEL", |s| s.is(Method::Cancel));
    let inv2 = take(&mut out, "INVITE to the second destination", |s| {
        s.is(Method::Invite)
    });
    // The second server turns the call down; the first one stays silent.
    let srv2 = Uas::new(S2, "srv7t");
    h.recv(srv2.peer, &srv2.reply(&inv2.msg, 486, &[], ""));
    h.advance_to(secs(60));
    assert_eq!(h.proxy.sizes(), (0, 0, 0), "transactions and dialogs left");
    assert_eq!((h.load(0), h.load(1)), (0, 0));
}

#[test]
fn bye_in_the_early_dialog_then_silence_still_ends_the_invite() {
    // Found by fuzzing: the caller's BYE in the early dialog ended the dialog while the INVITE
    // was pending; when the branch then timed out, failover found no dialog and returned,
    // leaving the INVITE's server transaction open forever and the caller without a final.
    let mut h = Harness::new();
    let mut call = Call::udp("c7b");
    let srv1 = Uas::new(S1, "srv7c");
    let inv = place(&mut h, &call);
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 180, &[], ""));
    let mut out = h.out();
    let ringing = take(&mut out, "180", |s| s.code() == Some(180));
    call.answered(&ringing.msg);
    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    take(&mut out, "BYE to the server", |s| s.is(Method::Bye));
    assert_none(&out, "after the BYE");
    // The server answers nothing; at inviteFinalTimeout the branch is cancelled.
    h.advance_to(secs(10));
    let mut out = h.out();
    let fin = take(&mut out, "487 to the caller", |s| s.code() == Some(487));
    fin.assert_to(&call.peer);
    take(&mut out, "CANCEL", |s| s.is(Method::Cancel));
    h.advance_to(secs(120));
    assert_eq!(h.proxy.sizes(), (0, 0, 0), "transactions and dialogs left");
}

#[test]
fn server_503_is_acknowledged_and_fails_over() {
    let mut h = Harness::new();
    let call = Call::udp("c8");
    let srv1 = Uas::new(S1, "srv8");
    let inv = place(&mut h, &call);

    h.recv(srv1.peer, &srv1.reply(&inv.msg, 503, &[], ""));
    let mut out = h.out();
    let ack = take(&mut out, "ACK for the 503", |s| s.is(Method::Ack));
    let inv2 = take(&mut out, "INVITE to the second destination", |s| {
        s.is(Method::Invite)
    });
    assert_none(&out, "nothing to the caller");
    ack.assert_to(&srv1.peer);
    assert_eq!(ack.branch(), inv.branch(), "ACK of a non-2xx: same branch");
    assert_eq!(ack.vias().len(), 1);
    assert_eq!(ack.msg.to_tag(), Some("srv8"));
    assert_eq!(ack.ruri(), inv.ruri());
    assert_eq!(ack.get(HeaderName::CSeq), Some("1 ACK"));
    assert_eq!(ack.get(HeaderName::From), inv.get(HeaderName::From));
    inv2.assert_to(&Peer::udp_server(S2));
    assert_ne!(inv2.branch(), inv.branch());
    assert_eq!(h.state(0), State::Up, "a 503 does not mark it down");
    assert_eq!((h.load(0), h.load(1)), (0, 1));
    assert_eq!(h.proxy.route_stats().failovers, 1);
}

#[test]
fn busy_486_is_relayed_without_failover() {
    let mut h = Harness::new();
    let call = Call::udp("c8b");
    let srv1 = Uas::new(S1, "srv8b");
    let inv = place(&mut h, &call);
    h.recv(
        srv1.peer,
        &srv1.reply(&inv.msg, 486, &[("Warning", "399 srv busy".into())], ""),
    );
    let mut out = h.out();
    let ack = take(&mut out, "ACK for the 486", |s| s.is(Method::Ack));
    let busy = take(&mut out, "486 to the caller", |s| s.code() == Some(486));
    assert_none(&out, "no failover");
    ack.assert_to(&srv1.peer);
    assert_eq!(ack.branch(), inv.branch());
    busy.assert_to(&call.peer);
    assert_eq!(
        busy.msg.start,
        StartLine::Response {
            code: 486,
            reason: "Busy Here".into()
        }
    );
    assert_eq!(
        busy.msg.to_tag(),
        Some("srv8b"),
        "the server's response, not ours"
    );
    assert_eq!(
        busy.get(HeaderName::Other("Warning".into())),
        Some("399 srv busy")
    );
    assert_eq!(busy.vias().len(), 1);
    assert_eq!(busy.vias()[0].branch(), Some(call.invite_branch().as_str()));
    let st = h.proxy.dialog_stats();
    assert_eq!((st.failed, st.active, st.early), (1, 0, 0));
    assert_eq!((h.load(0), h.load(1)), (0, 0));
    assert_eq!(h.proxy.route_stats().failovers, 0);
}

#[test]
fn all_destinations_503_gives_503_with_retry_after() {
    let mut h = Harness::new();
    let call = Call::udp("c9");
    let inv = place(&mut h, &call);
    let srv1 = Uas::new(S1, "srv9a");
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 503, &[], ""));
    let mut out = h.out();
    take(&mut out, "ACK to 5080", |s| s.is(Method::Ack));
    let inv2 = take(&mut out, "INVITE to 5090", |s| s.is(Method::Invite));
    assert_eq!(inv2.to(), addr(S2));

    let srv2 = Uas::new(S2, "srv9b");
    h.recv(srv2.peer, &srv2.reply(&inv2.msg, 503, &[], ""));
    let mut out = h.out();
    let ack = take(&mut out, "ACK to 5090", |s| s.is(Method::Ack));
    ack.assert_to(&srv2.peer);
    let fail = take(&mut out, "503 to the caller", |s| s.code() == Some(503));
    assert_none(&out, "no destination left");
    fail.assert_to(&call.peer);
    assert_eq!(fail.get(HeaderName::RetryAfter), Some("5"));
    assert_eq!(fail.vias().len(), 1);
    assert!(fail.msg.to_tag().is_some());
    let st = h.proxy.dialog_stats();
    assert_eq!((st.failed, st.active), (1, 0));
    assert_eq!((h.load(0), h.load(1)), (0, 0));
    let rs = h.proxy.route_stats();
    assert_eq!(
        (rs.routed, rs.failovers, rs.rejected_no_capacity),
        (2, 1, 0)
    );
}

#[test]
fn no_capacity_gives_an_immediate_503_with_retry_after() {
    let mut h = Harness::with(
        "\n  - {id: 1, group: 1, uri: \"sip:127.0.0.1:5080\", resources: pstn=1}\n",
        "",
    );
    let mut first = Call::udp("c9b");
    let srv = Uas::new(S1, "srv9c");
    let inv = place(&mut h, &first);
    answer(&mut h, &mut first, &srv, &inv, &[]);
    assert_eq!(h.load(0), 1);

    let second = Call::udp("c9c");
    let sizes = h.proxy.sizes();
    h.recv(second.peer, &second.invite());
    let mut out = h.out();
    // Refused before any state: no 100, no transaction, no dialog.
    let fail = take(&mut out, "503", |s| s.code() == Some(503));
    assert_none(&out, "nothing forwarded");
    assert_eq!(h.proxy.sizes(), sizes, "nothing kept for the refused call");
    fail.assert_to(&second.peer);
    assert_eq!(fail.get(HeaderName::RetryAfter), Some("5"));
    assert_eq!(fail.get(HeaderName::CallId), Some(second.call_id.as_str()));
    assert!(
        fail.msg.to_tag().is_some(),
        "a final response carries a To tag"
    );
    // A retransmission gets the same answer; the ACK is absorbed.
    h.recv(second.peer, &second.invite());
    let again = take(&mut h.out(), "503 again", |s| s.code() == Some(503));
    assert_eq!(again.msg.to_tag(), fail.msg.to_tag(), "same To tag");
    h.recv(second.peer, &second.ack_non_2xx(&fail.msg));
    assert_none(&h.out(), "the ACK of the 503 is absorbed");
    assert_eq!(h.proxy.sizes(), sizes);
    let rs = h.proxy.route_stats();
    assert_eq!((rs.routed, rs.rejected_no_capacity), (1, 2));
    let st = h.proxy.dialog_stats();
    assert_eq!((st.active, st.failed, st.processed), (1, 2, 3));
    assert_eq!(h.load(0), 1);
}

#[test]
fn transport_error_on_a_tcp_destination_fails_over_at_once() {
    let mut h = Harness::with(
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080;transport=tcp", resources: pstn=100}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50}
"#,
        "",
    );
    let call = Call::udp("c15");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer {
        transport: Transport::Tcp,
        listener: TCP_L,
        addr: addr(S1),
        conn: None,
    });
    assert_eq!(inv.vias()[0].transport, "TCP");
    let token = inv.out.on_error.expect("an error token on the INVITE");

    h.proxy.on_transport_error(h.now, token);
    let mut out = h.out();
    let inv2 = take(&mut out, "INVITE to the second destination", |s| {
        s.is(Method::Invite)
    });
    assert_none(&out, "nothing to the caller");
    inv2.assert_to(&Peer::udp_server(S2));
    assert_ne!(inv2.branch(), inv.branch());
    assert_eq!(h.state(0), State::Down);
    assert_eq!(h.state(1), State::Up);
    assert_eq!((h.load(0), h.load(1)), (0, 1));
    assert_eq!(h.proxy.route_stats().failovers, 1);

    let srv2 = Uas::new(S2, "srv15");
    h.recv(srv2.peer, &srv2.reply(&inv2.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    take(&mut out, "200 to the caller", |s| {
        s.code() == Some(200) && s.to() == call.peer.addr
    });
}

#[test]
fn relative_mode_splits_calls_by_capacity() {
    let mut h = Harness::with(TWO_DESTS, "routing:\n  mode: relative\n");
    let mut per_port = HashMap::<u16, u32>::default();
    for i in 0..30 {
        let mut call = Call::udp(&format!("c16-{i}"));
        let inv = place(&mut h, &call);
        *per_port.entry(inv.to().port()).or_default() += 1;
        let srv = Uas {
            peer: Peer::udp_server(&inv.to().to_string()),
            tag: format!("srv16-{i}"),
            record_route: Vec::new(),
        };
        answer(&mut h, &mut call, &srv, &inv, &[]);
    }
    assert_eq!(
        (per_port.get(&5080), per_port.get(&5090)),
        (Some(&20), Some(&10))
    );
    assert_eq!((h.load(0), h.load(1)), (20, 10));
    let st = h.proxy.dialog_stats();
    assert_eq!((st.active, st.processed, st.failed), (30, 30, 0));
}
