//! What is refused before routing: advertised address and loops, overload limits, the ACKs of stateless answers.

use super::*;

#[test]
fn advertised_address_goes_in_via_and_record_route_and_routes_back() {
    let mut h = Harness::with(TWO_DESTS, ADVERTISE);
    let mut call = Call::udp("a1");
    let srv = Uas::new(S1, "srv-a1");
    let inv = place(&mut h, &call);
    inv.assert_to(&srv.peer);
    let v = &inv.vias()[0];
    assert_eq!(
        (&*v.transport, &*v.host, v.port),
        ("UDP", "lb.example.com", Some(5070))
    );
    assert_eq!(
        inv.all(HeaderName::RecordRoute),
        vec!["<sip:lb.example.com:5070;transport=udp;lr>".to_string()]
    );
    answer(&mut h, &mut call, &srv, &inv, &[]);

    // An in-dialog request routed through our advertised name (no transport parameter).
    call.routes = vec!["<sip:lb.example.com:5070;lr>".to_string()];
    let bye = call.bye();
    assert!(bye.contains("Route: <sip:lb.example.com:5070;lr>\r\n"));
    h.recv(call.peer, &bye);
    let mut out = h.out();
    let fwd = take(&mut out, "BYE to the server", |s| s.is(Method::Bye));
    assert_none(&out, "after the BYE");
    fwd.assert_to(&srv.peer);
    assert_eq!(fwd.get(HeaderName::Route), None, "our Route popped");
    assert_eq!(fwd.ruri(), "sip:mrcp@127.0.0.1:5080;transport=udp");
    let v = &fwd.vias()[0];
    assert_eq!((&*v.host, v.port), ("lb.example.com", Some(5070)));
    assert_eq!(h.load(0), 0);
    assert_eq!(h.proxy.dialog_stats().active, 0);

    // Probes come from the advertised address too, with the default From on it.
    let mut h = Harness::started(ONE_PROBED, &format!("{ADVERTISE}{PROBING}"));
    let (_, probe) = Prober::default().next(&mut h, secs(10));
    let v = &probe.vias()[0];
    assert_eq!((&*v.host, v.port), ("lb.example.com", Some(5070)));
    assert_eq!(
        name_addr_uri(probe.get(HeaderName::From).unwrap()),
        "sip:mrcp-lb@lb.example.com:5070"
    );
}

#[test]
fn a_request_carrying_our_via_is_a_loop_and_max_forwards_1_goes_out_as_0() {
    let mut h = Harness::with(TWO_DESTS, ADVERTISE);
    let first = Call::udp("l1");
    let inv = place(&mut h, &first);
    let ours = inv.branch();
    let prefix = &ours[..=ours.rfind('-').unwrap()];
    assert!(prefix.starts_with("z9hG4bK"), "{ours}");

    // A new INVITE that went through us already (a server sent it back): its top Via is the
    // server's, then ours, then the caller's.
    let looped = Call::udp("l2");
    let text = looped.invite().replacen(
        "Via: ",
        &format!(
            "Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bK-srv-loop\r\n\
             Via: SIP/2.0/UDP lb.example.com:5070;branch={prefix}beef;rport\r\n\
             Via: "
        ),
        1,
    );
    let server = Peer::udp_server(S1);
    h.recv(server, &text);
    let mut out = h.out();
    let loop_ = take(&mut out, "482", |s| s.code() == Some(482));
    assert_none(&out, "nothing forwarded");
    loop_.assert_to(&server);
    assert_eq!(loop_.get(HeaderName::CSeq), Some("1 INVITE"));
    assert_eq!(h.proxy.route_stats().routed, 1);
    assert_eq!((h.load(0), h.load(1)), (1, 0));

    // Max-Forwards 1 is still forwarded, with 0.
    let last_hop = Call::udp("l3");
    h.recv(
        last_hop.peer,
        &last_hop
            .invite()
            .replace("Max-Forwards: 70", "Max-Forwards: 1"),
    );
    let mut out = h.out();
    take(&mut out, "100 Trying", |s| s.code() == Some(100));
    let fwd = take(&mut out, "INVITE", |s| s.is(Method::Invite));
    assert_none(&out, "after the INVITE");
    assert_eq!(fwd.msg.max_forwards(), Some(0));
}

#[test]
fn dialogs_max_refuses_new_calls_with_503() {
    let mut h = Harness::with(TWO_DESTS, "dialogs:\n  max: 1\n");
    let srv1 = Uas::new(S1, "srv-dm");
    let mut first = open_call(&mut h, "dm1", &srv1);
    refused_at_once(&mut h, &Call::udp("dm2"), "one dialog open, dialogs.max 1");
    assert_eq!(limited(&h, "dialogs"), 1.0);
    let st = h.proxy.dialog_stats();
    assert_eq!((st.active, st.failed, st.processed), (1, 1, 2));
    // Once the first ends, calls are taken again.
    hang_up(&mut h, &mut first, &srv1);
    open_call(&mut h, "dm3", &srv1);
    assert_eq!(limited(&h, "dialogs"), 1.0);
}

#[test]
fn pending_transaction_limit_gives_503_to_new_requests() {
    let mut h = Harness::with(TWO_DESTS, "limits:\n  maxPendingTransactions: 2\n");
    let srv1 = Uas::new(S1, "srv-pt1");
    let srv2 = Uas::new(S2, "srv-pt2");
    let mut a = Call::udp("pt-a");
    let inv_a = place(&mut h, &a);
    let b = Call::udp("pt-b");
    let inv_b = place(&mut h, &b);
    assert_eq!(h.proxy.pending_transactions(), 2);

    // A third INVITE: refused statelessly.
    refused_at_once(&mut h, &Call::udp("pt-c"), "two transactions pending");
    assert_eq!(limited(&h, "transactions"), 1.0);
    // OPTIONS to the proxy keeps no transaction: still answered.
    h.recv(a.peer, &Call::udp("pt-o").out_of_dialog("OPTIONS", &[]));
    take(&mut h.out(), "200 to OPTIONS", |s| s.code() == Some(200));

    // a answered: one pending left, room for one more.
    let srv_a = if inv_a.to() == srv1.peer.addr {
        &srv1
    } else {
        &srv2
    };
    answer(&mut h, &mut a, srv_a, &inv_a, &[]);
    assert_eq!(h.proxy.pending_transactions(), 1);
    let d = Call::udp("pt-d");
    place(&mut h, &d);
    assert_eq!(h.proxy.pending_transactions(), 2);

    // An in-dialog request beyond the limit gets 503 too, and the dialog stays.
    h.recv(a.peer, &a.bye());
    let mut out = h.out();
    let fail = take(&mut out, "503 to the BYE", |s| s.code() == Some(503));
    assert_none(&out, "the BYE is not forwarded");
    assert_eq!(fail.get(HeaderName::CSeq), Some("2 BYE"));
    assert_eq!(limited(&h, "transactions"), 2.0);
    assert_eq!(
        h.proxy.dialog_stats().active,
        1,
        "the refused BYE ended nothing"
    );

    // b answered: the BYE goes through on retry.
    let srv_b = if inv_b.to() == srv1.peer.addr {
        &srv1
    } else {
        &srv2
    };
    h.recv(srv_b.peer, &srv_b.reply(&inv_b.msg, 486, &[], ""));
    let mut out = h.out();
    take(&mut out, "ACK to the server", |s| s.is(Method::Ack));
    take(&mut out, "486 to the caller", |s| s.code() == Some(486));
    assert_eq!(h.proxy.pending_transactions(), 1);
    a.cseq -= 1;
    h.recv(a.peer, &a.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE", |s| s.is(Method::Bye));
    bye.assert_to(&srv_a.peer);
}

#[test]
fn per_source_rate_limit_refuses_the_excess_of_one_source_only() {
    let mut h = Harness::with(TWO_DESTS, "limits:\n  perSource: {rate: 2, window: 1s}\n");
    let srv1 = Uas::new(S1, "srv-rl1");
    let srv2 = Uas::new(S2, "srv-rl2");
    let mut c1 = Call::udp("rl1");
    let inv1 = place(&mut h, &c1);
    place(&mut h, &Call::udp("rl2"));
    // The third INVITE within the second from the same source: 503.
    refused_at_once(&mut h, &Call::udp("rl3"), "third INVITE in the window");
    assert_eq!(limited(&h, "source_rate"), 1.0);
    // Another source is not affected.
    let mut other = Call::udp("rl4");
    other.peer.addr = addr("10.0.0.6:40000");
    place(&mut h, &other);
    // Out-of-dialog OPTIONS are not counted with the default scope (INVITE).
    h.recv(c1.peer, &Call::udp("rl5").out_of_dialog("OPTIONS", &[]));
    take(&mut h.out(), "200 to OPTIONS", |s| s.code() == Some(200));
    // In-dialog requests and responses are never limited.
    let srv = if inv1.to() == srv1.peer.addr {
        &srv1
    } else {
        &srv2
    };
    answer(&mut h, &mut c1, srv, &inv1, &[]);
    h.recv(c1.peer, &c1.bye());
    take(&mut h.out(), "BYE", |s| s.is(Method::Bye));
    assert_eq!(limited(&h, "source_rate"), 1.0);
    // Half a second later one token is back.
    h.advance_to(ms(500));
    h.out();
    place(&mut h, &Call::udp("rl6"));
    refused_at_once(&mut h, &Call::udp("rl7"), "the token is used");
    assert_eq!(limited(&h, "source_rate"), 2.0);
    assert_eq!(h.proxy.rate_limit_sources(), 2);
}

#[test]
fn per_source_rate_limit_can_drop_and_count_every_out_of_dialog_request() {
    let mut h = Harness::with(
        TWO_DESTS,
        "limits:\n  perSource: {rate: 1, window: 10s, action: drop, scope: outOfDialog}\n",
    );
    let c = Call::udp("rd1");
    h.recv(c.peer, &c.out_of_dialog("OPTIONS", &[]));
    take(&mut h.out(), "200 to OPTIONS", |s| s.code() == Some(200));
    let sizes = h.proxy.sizes();
    h.recv(c.peer, &Call::udp("rd2").out_of_dialog("OPTIONS", &[]));
    assert_none(&h.out(), "the second OPTIONS is dropped");
    h.recv(c.peer, &Call::udp("rd3").invite());
    assert_none(&h.out(), "an INVITE over the rate is dropped");
    assert_eq!(h.proxy.sizes(), sizes);
    assert_eq!(limited(&h, "source_rate"), 2.0);
}

#[test]
fn the_ack_of_the_transports_400_is_absorbed() {
    let mut h = Harness::new();
    let mut c = Call::udp("c400");
    // Aimed at a destination: an ACK the core took for an in-dialog one would go there.
    c.ruri = format!("sip:mrcp@{S1}");
    // Two spaces after the method: the parser refuses it, the transport answers 400.
    let bad = c.invite().replacen("INVITE ", "INVITE  ", 1);
    let e = Message::parse(bad.as_bytes()).unwrap_err();
    let resp = Message::parse(&crate::sip::bad_request(&e).unwrap()).unwrap();
    assert_eq!(resp.code(), Some(400));
    let tag = resp.to_tag().unwrap();
    assert!(crate::sip::is_stateless_tag(tag), "{tag}");
    // A retransmission would get the same tag.
    let again = Message::parse(&crate::sip::bad_request(&e).unwrap()).unwrap();
    assert_eq!(again.to_tag(), Some(tag));
    let sizes = h.proxy.sizes();
    let refused = "mrcp_lb_relay_refused_total{reason=\"no_route\"}";
    h.recv(c.peer, &c.ack_non_2xx(&resp));
    assert_none(&h.out(), "the ACK of the stateless 400 is absorbed");
    assert_eq!(h.proxy.sizes(), sizes, "and leaves nothing behind");
    assert_eq!(sample(&h, refused), 0.0, "as the answer to our 400");

    // The same ACK with another To tag is taken for an end-to-end one, and the relay rule
    // refuses it (no dialog, no Route to us): the absorption above is the tag's doing.
    let other = resp
        .get(&HeaderName::To)
        .unwrap()
        .replace(tag, "lb-not-ours");
    let mut ack = resp.clone();
    ack.set(HeaderName::To, other);
    h.recv(c.peer, &c.ack_non_2xx(&ack));
    assert_none(&h.out(), "the relay rule absorbs it");
    assert_eq!(
        sample(&h, refused),
        1.0,
        "as an in-dialog ACK nobody may relay"
    );
}

#[test]
fn the_ack_of_the_cores_own_400_is_absorbed() {
    let mut h = Harness::new();
    let mut c = Call::udp("c400core");
    c.ruri = format!("sip:mrcp@{S1}");
    // No From tag: the core answers 400 itself.
    c.from = "sipp <sip:sipp@192.168.0.5:5061>".into();
    h.recv(c.peer, &c.invite());
    let resp = take(&mut h.out(), "400", |s| s.code() == Some(400));
    let tag = resp.msg.to_tag().unwrap().to_string();
    assert!(crate::sip::is_stateless_tag(&tag), "{tag}");
    h.recv(c.peer, &c.ack_non_2xx(&resp.msg));
    assert_none(&h.out(), "the ACK of the core's 400 is absorbed");
    assert_eq!(
        sample(&h, "mrcp_lb_relay_refused_total{reason=\"no_route\"}"),
        0.0,
        "as the answer to our 400, not as a stray in-dialog ACK"
    );
}
