//! Load sharing between replicas.

use super::*;

#[test]
fn replicas_route_on_each_others_load_and_a_bye_through_the_other_frees_it() {
    let one_each = r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=10}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=10}
"#;
    let (mut a, mut b) = replica_pair(one_each);
    settle_pair(&mut a, &mut b);
    assert_eq!(a.proxy.cluster_status(a.now).size, 2);
    assert_eq!(b.proxy.cluster_status(b.now).size, 2);

    // Two calls through A: one on each server (equal capacity, least loaded).
    let mut c1 = Call::udp("cl1");
    let inv1 = place(&mut a, &c1);
    let first = inv1.to();
    let srv1 = Uas::new(&first.to_string(), "cl1srv");
    answer(&mut a, &mut c1, &srv1, &inv1, &[]);
    let slot1 = usize::from(first != addr(S1));
    assert_eq!(a.load(slot1), 1);
    assert_eq!(b.load(slot1), 0, "B has not heard yet");
    settle_pair(&mut a, &mut b);
    assert_eq!(cluster_load(&b, slot1), 1, "B sees A's call");
    assert_eq!(b.load(slot1), 0, "as A's, not its own");

    // B's next call goes to the other server: the one A loaded is busier cluster-wide.
    let c2 = Call::udp("cl2");
    let inv2 = place(&mut b, &c2);
    assert_ne!(inv2.to(), first, "B routes on the cluster-wide load");

    // A's caller hangs up through B (another replica behind the same address): B relays the
    // BYE by its Route and Request-URI and announces the end; A frees the load.
    b.recv(c1.peer, &c1.bye());
    let mut out = b.out();
    let bye = take(&mut out, "BYE relayed by B", |s| s.is(Method::Bye));
    assert_eq!(
        bye.to(),
        first,
        "to the server of A's call, without B knowing the dialog"
    );
    assert_eq!(a.proxy.dialog_stats().active, 1);
    settle_pair(&mut a, &mut b);
    assert_eq!(a.proxy.dialog_stats().active, 0, "A ended its dialog");
    assert_eq!(a.load(slot1), 0, "and freed its load");
    settle_pair(&mut a, &mut b);
    assert_eq!(cluster_load(&b, slot1), 0, "B sees it freed");
    let m = a.proxy.metrics().encode();
    assert!(
        m.contains("mrcp_lb_cluster_dialog_ends_total{direction=\"applied\"} 1"),
        "{m}"
    );
}

#[test]
fn near_capacity_a_replica_holds_one_unacknowledged_call_per_destination() {
    let small = r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=3}
"#;
    let (mut a, mut b) = replica_pair(small);
    settle_pair(&mut a, &mut b);
    // Free 3, two replicas: max(1, 3 / 2) = 1 call may wait for B's acknowledgement.
    let c1 = Call::udp("nc1");
    place(&mut a, &c1);
    let c2 = Call::udp("nc2");
    a.recv(c2.peer, &c2.invite());
    let mut out = a.out();
    let busy = take(
        &mut out,
        "503 while the first call is unacknowledged",
        |s| s.code() == Some(503),
    );
    busy.assert_to(&c2.peer);
    assert!(busy.get(HeaderName::RetryAfter).is_some());
    // B acknowledges: the next call may go.
    settle_pair(&mut a, &mut b);
    assert_eq!(cluster_load(&b, 0), 1);
    let c3 = Call::udp("nc3");
    place(&mut a, &c3);
    // A silent peer stops counting: alone again, no acknowledgement is awaited.
    a.advance_to(ms(1500));
    a.out(); // retransmissions of the unanswered INVITEs and of the 503
    assert_eq!(a.proxy.cluster_status(a.now).size, 1);
    let c4 = Call::udp("nc4");
    place(&mut a, &c4);
    let c5 = Call::udp("nc5");
    a.recv(c5.peer, &c5.invite());
    let mut out = a.out();
    take(&mut out, "503: capacity 3 used by A's own calls", |s| {
        s.code() == Some(503)
    });
}

#[test]
fn a_pushed_peer_list_replaces_the_configured_one() {
    let (mut a, _) = replica_pair(TWO_DESTS);
    let mut set = dest_set(2, TWO_DESTS);
    set.peers = Some(vec![addr("127.0.0.1:7075")]);
    a.proxy.replace_set(a.now, &set).unwrap();
    let st = a.proxy.cluster_status(a.now);
    let peers: Vec<&str> = st.peers.iter().map(|p| p.addr.as_str()).collect();
    assert_eq!(peers, vec!["127.0.0.1:7075"]);
    // The same set again with other peers is unchanged content, yet the peers follow.
    set.peers = Some(vec![addr(CL_A), addr(CL_B)]);
    assert_eq!(
        a.proxy.replace_set(a.now, &set).unwrap(),
        Applied::Unchanged
    );
    assert_eq!(a.proxy.cluster_status(a.now).peers.len(), 2);
}
