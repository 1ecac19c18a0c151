//! Drain waits (`GET /v1/destinations/wait-drained`): what the core reports for a pod, and
//! what clears the load of a server that restarted in place.

use super::*;
use crate::proxy::DrainTarget;

/// One server, named as the operator names a pod's destination.
const POD_0: &str = r#"
  - {id: "speech/unimrcp-0@7460ce94", group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=10}
"#;

fn pod0() -> DrainTarget {
    DrainTarget::pod("speech/unimrcp-0").unwrap()
}

#[test]
fn a_pod_is_drained_when_it_takes_no_new_calls_and_its_last_call_ended() {
    let mut h = Harness::with(POD_0, "");
    let srv = Uas::new(S1, "drain-srv");
    let mut a = open_call(&mut h, "dr1", &srv);
    let mut b = open_call(&mut h, "dr2", &srv);

    let s = h.proxy.drain_status(h.now, &pod0());
    assert_eq!(
        s.destinations,
        vec!["speech/unimrcp-0@7460ce94".to_string()]
    );
    assert!(s.known && s.taking_calls && !s.drained && !s.cluster);
    assert_eq!(
        (s.local_sessions, s.peer_sessions, s.open_sessions),
        (2, 0, 2)
    );

    // Terminating: the operator pushes it draining.
    let mut set = dest_set(2, POD_0);
    set.destinations[0].state = DesiredState::Draining;
    h.proxy.replace_set(h.now, &set).unwrap();
    let s = h.proxy.drain_status(h.now, &pod0());
    assert!(!s.taking_calls && !s.drained);
    assert_eq!(s.open_sessions, 2);

    hang_up(&mut h, &mut a, &srv);
    assert_eq!(h.proxy.drain_status(h.now, &pod0()).open_sessions, 1);
    assert!(!h.proxy.drain_status(h.now, &pod0()).drained);
    hang_up(&mut h, &mut b, &srv);
    let s = h.proxy.drain_status(h.now, &pod0());
    assert!(s.drained, "{s:?}");
    assert_eq!(s.open_sessions, 0);

    // By exact id too; another uid of the same name is another destination.
    let id = DrainTarget::Id("speech/unimrcp-0@7460ce94".into());
    assert!(h.proxy.drain_status(h.now, &id).drained);
    let other = DrainTarget::Id("speech/unimrcp-0@00000000".into());
    assert!(!h.proxy.drain_status(h.now, &other).known);
}

#[test]
fn an_idle_pod_still_up_is_not_drained_and_an_unknown_one_is() {
    let mut h = Harness::with(POD_0, "");
    let s = h.proxy.drain_status(h.now, &pod0());
    assert!(
        !s.drained && s.taking_calls,
        "zero sessions, but a call may come: not drained until it takes no new ones"
    );
    h.proxy
        .set_manual("speech/unimrcp-0@7460ce94", lb_api::admin::Action::Drain);
    assert!(
        h.proxy.drain_status(h.now, &pod0()).drained,
        "drained by hand"
    );

    let nobody = DrainTarget::pod("speech/unimrcp-7").unwrap();
    let s = h.proxy.drain_status(h.now, &nobody);
    assert!(s.drained && !s.known && s.destinations.is_empty());

    // A replica still waiting for its first set knows nothing yet: it does not say drained.
    let mut cfg = config("", "");
    cfg.destinations = None;
    let empty = Proxy::new(Arc::new(cfg), crate::destinations::Destinations::waiting());
    let s = empty.drain_status(h.now, &nobody);
    assert!(!s.drained && !s.known);
}

#[test]
fn a_server_restarted_in_place_loses_its_calls_and_the_callers_bye_frees_them() {
    // The pod restarts in place: same UID, so the same destination id; the new server process
    // knows none of the old dialogs. The caller notices (its MRCP connection dropped) and
    // hangs up: the proxy relays the BYE and ends the dialog whatever the server answers.
    let mut h = Harness::with(POD_0, "");
    let srv = Uas::new(S1, "restart-srv");
    let mut c = open_call(&mut h, "rs1", &srv);
    assert_eq!(h.load(0), 1);
    h.recv(c.peer, &c.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE to the restarted server", |s| {
        s.is(Method::Bye)
    });
    bye.assert_to(&srv.peer);
    assert_eq!(h.load(0), 0, "freed when the BYE is relayed");
    h.recv(srv.peer, &response(&bye.msg, 481, None, &[], ""));
    let mut out = h.out();
    take(&mut out, "481 to the caller", |s| s.code() == Some(481));
    let s = h.proxy.drain_status(h.now, &pod0());
    assert_eq!((s.open_sessions, s.taking_calls), (0, true));
}

#[test]
fn a_call_nobody_hangs_up_is_freed_by_the_dialog_lifetime() {
    // The same restart, but the caller never sends BYE (it crashed too, or the BYE was lost):
    // `dialogs.lifetime` bounds the phantom load; the proxy then sends BYE both ways itself.
    let mut h = Harness::with(POD_0, "dialogs:\n  lifetime: 10s\n");
    let srv = Uas::new(S1, "lifetime-srv");
    let c = open_call(&mut h, "lt1", &srv);
    h.proxy
        .set_manual("speech/unimrcp-0@7460ce94", lb_api::admin::Action::Drain);
    h.advance_to(secs(9));
    let s = h.proxy.drain_status(h.now, &pod0());
    assert_eq!((s.open_sessions, s.drained), (1, false));
    h.advance_to(secs(10));
    let mut out = h.out();
    expiry_byes(&mut out, &c, &srv);
    let s = h.proxy.drain_status(h.now, &pod0());
    assert_eq!((s.open_sessions, s.drained), (0, true));
}

#[test]
fn a_drain_wait_counts_the_live_peers_calls() {
    let (mut a, mut b) = replica_pair(POD_0);
    settle_pair(&mut a, &mut b);
    let srv = Uas::new(S1, "cluster-srv");
    let mut c = open_call(&mut a, "cw1", &srv);
    settle_pair(&mut a, &mut b);
    b.proxy
        .set_manual("speech/unimrcp-0@7460ce94", lb_api::admin::Action::Drain);
    let s = b.proxy.drain_status(b.now, &pod0());
    assert!(s.cluster && !s.drained, "{s:?}");
    assert_eq!(
        (s.local_sessions, s.peer_sessions),
        (0, 1),
        "A's call, seen by B"
    );

    hang_up(&mut a, &mut c, &srv);
    assert!(
        !b.proxy.drain_status(b.now, &pod0()).drained,
        "B has not heard yet"
    );
    settle_pair(&mut a, &mut b);
    let s = b.proxy.drain_status(b.now, &pod0());
    assert!(s.drained, "{s:?}");

    // A peer that falls silent stops counting: its last report is not kept forever.
    let mut d = open_call(&mut a, "cw2", &srv);
    settle_pair(&mut a, &mut b);
    assert_eq!(b.proxy.drain_status(b.now, &pod0()).peer_sessions, 1);
    b.advance_to(secs(2));
    assert_eq!(b.proxy.drain_status(b.now, &pod0()).peer_sessions, 0);
    hang_up(&mut a, &mut d, &srv);
}
