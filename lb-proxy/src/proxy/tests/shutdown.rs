//! Faults and graceful shutdown: dead servers, draining.

use super::*;

#[test]
fn a_server_that_dies_after_its_provisional_leaves_no_transaction_behind() {
    // 180, then the server is gone: at inviteFinalTimeout the call fails over and the CANCEL
    // gets no answer either. Once the call is over, nothing of it may stay in memory.
    let mut h = Harness::new();
    let mut call = Call::udp("f1");
    let srv1 = Uas::new(S1, "srv-f1");
    let srv2 = Uas::new(S2, "srv-f2");
    let inv = place(&mut h, &call);
    inv.assert_to(&srv1.peer);
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 180, &[], ""));
    h.out();
    h.advance_to(secs(10));
    let mut out = h.out();
    take(&mut out, "CANCEL to the dead server", |s| {
        s.is(Method::Cancel)
    });
    let inv2 = take(&mut out, "INVITE to the second server", |s| {
        s.is(Method::Invite)
    });
    inv2.assert_to(&srv2.peer);
    h.recv(srv2.peer, &srv2.reply(&inv2.msg, 200, &[], SERVER_SDP));
    let mut out = h.out();
    let ok = take(&mut out, "200 to the caller", |s| s.code() == Some(200));
    call.answered(&ok.msg);
    h.recv(call.peer, &call.ack());
    h.out();
    hang_up(&mut h, &mut call, &srv2);
    h.advance_to(secs(120));
    h.out();
    assert_eq!(
        h.proxy.sizes(),
        (0, 0, 0),
        "server txs, client txs, dialogs left behind"
    );
}

#[test]
fn reinvite_with_a_provisional_but_no_final_gets_408_and_leaves_nothing_behind() {
    // The server answers a re-INVITE with 100 Trying and then nothing (it hung): at
    // inviteFinalTimeout the proxy CANCELs downstream, and the caller must get a final
    // response too, or its re-INVITE hangs and the proxy keeps the transaction forever.
    let mut h = Harness::new();
    let mut call = Call::udp("r1");
    let srv = Uas::new(S1, "srv-r1");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    let reinvite = call.in_dialog("INVITE", &[], CLIENT_SDP);
    h.recv(call.peer, &reinvite);
    let mut out = h.out();
    take(&mut out, "100 to the caller", |s| s.code() == Some(100));
    let fwd = take(&mut out, "re-INVITE to the server", |s| {
        s.is(Method::Invite)
    });
    h.recv(srv.peer, &srv.reply(&fwd.msg, 100, &[], ""));
    h.out();

    h.advance_to(secs(10));
    let mut out = h.out();
    let cancel = take(&mut out, "CANCEL to the server", |s| s.is(Method::Cancel));
    cancel.assert_to(&srv.peer);
    let fail = take(&mut out, "final response to the caller", |s| {
        s.code().is_some_and(|c| c >= 200)
    });
    fail.assert_to(&call.peer);
    assert_eq!(fail.code(), Some(408));
    assert_eq!(fail.get(HeaderName::CSeq), Some("2 INVITE"));
    assert_eq!(
        h.proxy.dialog_stats().active,
        1,
        "a failed re-INVITE does not end the dialog"
    );
    // The caller ACKs the 408 (hop by hop: absorbed); the server never answers the CANCEL.
    let ack = sip(
        &format!("ACK {} SIP/2.0", fwd.ruri()),
        &[
            (
                "Via",
                call.via(&format!("z9hG4bK-{}-2-INVITE", call.call_id)),
            ),
            ("Max-Forwards", "70".into()),
            ("From", call.from.clone()),
            ("To", call.to.clone()),
            ("Call-ID", call.call_id.clone()),
            ("CSeq", "2 ACK".into()),
        ],
        "",
    );
    h.recv(call.peer, &ack);
    assert_none(&h.out(), "the ACK of the 408 is absorbed");
    h.advance_to(secs(60));
    h.out();
    hang_up(&mut h, &mut call, &srv);
    h.advance_to(secs(120));
    assert_eq!(
        h.proxy.sizes(),
        (0, 0, 0),
        "server txs, client txs, dialogs left behind"
    );
}

#[test]
fn draining_counts_open_calls_and_transactions_in_flight() {
    // SIGTERM waits until nothing is open: a BYE ends its dialog at once, but the proxy must
    // stay until the BYE's 200 has been relayed back, or the caller never gets it.
    let mut h = Harness::new();
    let mut call = Call::udp("d1");
    let srv = Uas::new(S1, "srv-d1");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.proxy.start_draining();
    assert!(h.proxy.is_draining());
    assert_eq!(h.proxy.open_work(), (1, 0), "(dialogs, transactions)");

    // New calls: 503 with Retry-After, no dialog, nothing forwarded.
    let late = Call::udp("d2");
    refused(&mut h, &late, "a new call while draining");
    assert_eq!(h.proxy.open_work(), (1, 0));

    // OPTIONS to the proxy itself (an upstream's health check) says it is going away.
    h.recv(late.peer, &late.out_of_dialog("OPTIONS", &[]));
    let mut out = h.out();
    let busy = take(&mut out, "answer to OPTIONS", |s| s.code().is_some());
    assert_eq!(busy.code(), Some(503));
    assert!(busy.get(HeaderName::RetryAfter).is_some());

    // The BYE of the open call is relayed; its transaction is in flight until the 200.
    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE", |s| s.is(Method::Bye));
    bye.assert_to(&srv.peer);
    assert_eq!(h.proxy.dialog_stats().active, 0);
    assert_eq!(h.proxy.open_work(), (0, 1), "the BYE is in flight");
    h.recv(srv.peer, &response(&bye.msg, 200, None, &[], ""));
    let mut out = h.out();
    take(&mut out, "200 to the BYE", |s| s.code() == Some(200)).assert_to(&call.peer);
    assert_eq!(h.proxy.open_work(), (0, 0));
}

#[test]
fn draining_waits_for_the_byes_the_proxy_sends_itself() {
    // A dialog that expires while draining: the proxy's own BYEs are retransmitted until
    // answered (or timer F), so the process must not exit before.
    let mut h = Harness::with(TWO_DESTS, "dialogs:\n  lifetime: 20s\n");
    let mut call = Call::udp("d3");
    let srv = Uas::new(S1, "srv-d3");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    h.proxy.start_draining();
    h.advance_to(secs(20));
    let mut out = h.out();
    let (to_srv, to_caller) = expiry_byes(&mut out, &call, &srv);
    assert_eq!(h.proxy.open_work(), (0, 2), "two BYEs in flight");
    h.recv(srv.peer, &response(&to_srv.msg, 200, None, &[], ""));
    assert_eq!(h.proxy.open_work(), (0, 1));
    h.recv(call.peer, &response(&to_caller.msg, 200, None, &[], ""));
    assert_eq!(h.proxy.open_work(), (0, 0));
}
