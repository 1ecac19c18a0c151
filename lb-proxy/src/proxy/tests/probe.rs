//! OPTIONS health probes: schedule, thresholds, statistics, modes, across set changes.

use super::*;

#[test]
fn probes_go_out_within_the_first_interval_then_every_interval() {
    let mut h = Harness::started(
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100, probeMode: 2}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090;transport=tcp", resources: pstn=50, probeMode: 2}
"#,
        PROBING,
    );
    let mut probes: Vec<(Duration, Sent)> = Vec::new();
    run_until(&mut h, secs(45), |h, s| {
        assert!(s.is(Method::Options), "only probes: {}", s.label());
        answer_probe(h, &s, 200);
        probes.push((h.elapsed(), s));
    });

    let udp = Peer::udp_server(S1);
    let tcp = Peer {
        transport: Transport::Tcp,
        listener: TCP_L,
        addr: addr(S2),
        conn: None,
    };
    let mut call_ids = std::collections::HashSet::new();
    let mut tags = std::collections::HashSet::new();
    for (slot, peer, ruri) in [
        (0, udp, "sip:127.0.0.1:5080"),
        (1, tcp, "sip:127.0.0.1:5090;transport=tcp"),
    ] {
        let times: Vec<Duration> = probes
            .iter()
            .filter(|(_, s)| s.to() == peer.addr)
            .map(|(t, _)| *t)
            .collect();
        assert!(!times.is_empty(), "no probe to {}", peer.addr);
        assert!(
            times[0] <= secs(10),
            "first probe to {} within the first interval: {times:?}",
            peer.addr
        );
        for w in times.windows(2) {
            assert_eq!(w[1] - w[0], secs(10), "every interval: {times:?}");
        }
        assert!(
            *times.last().unwrap() + secs(10) > secs(45),
            "a probe is missing: {times:?}"
        );
        for (_, p) in probes.iter().filter(|(_, s)| s.to() == peer.addr) {
            check_probe(p, &peer, ruri, "sip:mrcp-lb@127.0.0.1:5060");
            assert!(call_ids.insert(p.get(HeaderName::CallId).unwrap().to_string()));
            assert!(tags.insert(p.msg.from_tag().unwrap().to_string()));
        }
        let st = h.probe_stats(slot);
        let n = times.len() as u64;
        assert_eq!((st.sent, st.succeeded, st.failed), (n, n, 0));
        assert_eq!(st.last_code, Some(200));
        assert_eq!(h.state(slot), State::Up);
    }
}

#[test]
fn probe_failures_take_a_destination_down_only_at_the_threshold() {
    let extra = format!("{PROBING}  aliveCodes: [404]\n  fromUri: \"sip:health@lb.example.com\"\n");
    let mut h = Harness::started(ONE_PROBED, &extra);
    let srv = Peer::udp_server(S1);
    let mut p = Prober::default();

    // Three probes without an answer: up after the first and second timeouts, down after the
    // third, that is (threshold - 1) intervals plus the timeout after the first probe.
    let (t1, first) = p.next(&mut h, secs(10));
    check_probe(
        &first,
        &srv,
        "sip:127.0.0.1:5080",
        "sip:health@lb.example.com",
    );
    for k in 0..3u32 {
        let tk = t1 + secs(10) * k;
        if k > 0 {
            let (t, probe) = p.next(&mut h, tk);
            assert_eq!(t, tk, "probe {} one interval after the last", k + 1);
            probe.assert_to(&srv);
        }
        h.advance_to(tk + ms(2999));
        assert_eq!(
            h.probe_stats(0).consecutive_failures,
            k,
            "before timeout {}",
            k + 1
        );
        assert_eq!(h.state(0), State::Up);
        h.advance_to(tk + secs(3));
        let st = h.probe_stats(0);
        assert_eq!(
            (st.failed, st.consecutive_failures),
            (u64::from(k) + 1, k + 1)
        );
        assert_eq!(st.last_code, Some(408), "a timeout is reported as 408");
        if k < 2 {
            assert_eq!(h.state(0), State::Up, "after {} failure(s)", k + 1);
        }
    }
    assert_eq!(h.state(0), State::Down, "after the third failure");
    assert_eq!(h.dest(0).health, Health::DownProbes);
    assert_eq!(h.dest(0).reason(), "probe failures");
    assert_eq!(h.probe_stats(0).sent, 3, "retransmissions are not probes");
    p.drain(&mut h);
    assert_eq!(p.retransmissions, 6, "UDP: T1 and 3*T1 after each probe");

    // Down: no new calls.
    refused(
        &mut h,
        &Call::udp("p2"),
        "nothing forwarded to a down destination",
    );

    // 404 is configured as alive: two of them bring it back.
    let (t4, probe) = p.next(&mut h, t1 + secs(30));
    assert_eq!(t4, t1 + secs(30));
    answer_probe(&mut h, &probe, 404);
    let st = h.probe_stats(0);
    assert_eq!(
        (st.succeeded, st.consecutive_successes, st.last_code),
        (1, 1, Some(404))
    );
    assert_eq!(h.state(0), State::Down, "one success is not enough");
    let (_, probe) = p.next(&mut h, t1 + secs(40));
    answer_probe(&mut h, &probe, 404);
    assert_eq!(h.state(0), State::Up, "404 counts as alive");

    // A 503 is a failure: the third one takes it down at once, without waiting for a timeout.
    for k in 0..3u32 {
        let (t, probe) = p.next(&mut h, t1 + secs(50) + secs(10) * k);
        answer_probe(&mut h, &probe, 503);
        let st = h.probe_stats(0);
        assert_eq!((st.consecutive_failures, st.last_code), (k + 1, Some(503)));
        assert_eq!(
            h.state(0),
            if k < 2 { State::Up } else { State::Down },
            "after {} 503(s) at {t:?}",
            k + 1
        );
    }
    let st = h.probe_stats(0);
    assert_eq!((st.sent, st.succeeded, st.failed), (8, 2, 6));

    h.proxy.export_gauges(h.now);
    h.proxy.export_gauges(h.now);
    let text = h.proxy.metrics().encode();
    for (result, n) in [("timeout", 3), ("failure", 3), ("success", 2)] {
        let line = metric_line(
            &text,
            "mrcp_lb_destination_probes_total",
            &[("result", result)],
        );
        assert!(line.ends_with(&format!(" {n}")), "{line}");
    }
}

#[test]
fn probe_successes_bring_a_destination_back_with_statistics() {
    let mut h = Harness::started(ONE_PROBED, PROBING);
    let mut p = Prober::default();
    let (t1, _) = p.next(&mut h, secs(10));
    for k in 1..3u32 {
        h.advance_to(t1 + secs(10) * k - ms(1));
        p.next(&mut h, t1 + secs(10) * k);
    }
    h.advance_to(t1 + secs(23));
    assert_eq!(h.state(0), State::Down);
    assert_eq!(h.probe_stats(0).latency, None, "timeouts give no latency");

    // First 200, 200 ms after the probe: still down.
    let (t4, probe) = p.next(&mut h, t1 + secs(30));
    h.advance_to(t4 + ms(200));
    answer_probe(&mut h, &probe, 200);
    assert_eq!(h.state(0), State::Down, "one success of two");
    let st = h.probe_stats(0);
    assert_eq!((st.consecutive_successes, st.consecutive_failures), (1, 0));
    let lat = st.latency.unwrap();
    assert!((lat - 0.2).abs() < 1e-9, "first sample: {lat}");

    // Second consecutive 200, 100 ms after its probe: up.
    let (t5, probe) = p.next(&mut h, t1 + secs(40));
    assert_eq!(t5, t4 + secs(10));
    h.advance_to(t5 + ms(100));
    answer_probe(&mut h, &probe, 200);
    assert_eq!(h.state(0), State::Up, "two consecutive successes");
    assert_eq!(h.dest(0).health, Health::Up);
    let st = h.probe_stats(0);
    assert_eq!(
        (st.sent, st.succeeded, st.failed),
        (5, 2, 3),
        "sent, succeeded, failed"
    );
    assert_eq!((st.consecutive_successes, st.consecutive_failures), (2, 0));
    assert_eq!(st.last_code, Some(200));
    // Moving average: 0.2 + 0.3 * (0.1 - 0.2).
    let lat = st.latency.unwrap();
    assert!((lat - 0.17).abs() < 1e-9, "moving average: {lat}");

    let status = h.proxy.status();
    let ps = &status.destinations[0].probe;
    assert_eq!((ps.sent, ps.succeeded, ps.failed), (5, 2, 3));
    assert_eq!((ps.consecutive_successes, ps.consecutive_failures), (2, 0));
    assert_eq!(ps.last_code, Some(200));
    assert!(
        ps.latency_ms.is_some_and(|l| (l - 170.0).abs() < 1e-6),
        "{ps:?}"
    );
    assert_eq!(status.destinations[0].state, State::Up);
    assert_eq!(status.destinations[0].reason, "");

    h.proxy.export_gauges(h.now);
    h.proxy.export_gauges(h.now);
    let text = h.proxy.metrics().encode();
    let line = metric_line(&text, "mrcp_lb_destination_probe_latency_seconds", &[]);
    let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((v - 0.17).abs() < 1e-9, "{line}");

    // It takes calls again.
    let call = Call::udp("p3");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer::udp_server(S1));
}

#[test]
fn probe_mode_never_and_while_down() {
    // 5080 is probed only while down; 5090 never.
    let mut h = Harness::started(
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100, probeMode: 1}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50, probeMode: 0}
"#,
        PROBING,
    );
    run_until(&mut h, secs(30), |_, s| {
        panic!("nothing while up: {}", s.label())
    });

    // Both servers are silent: the call times out on 5080, then on 5090; both are down.
    let call = Call::udp("p4");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer::udp_server(S1));
    let mut probes = Vec::new();
    let mut others = Vec::new();
    run_until(
        &mut h,
        secs(36),
        answer_probes_200(&mut probes, &mut others),
    );
    assert_eq!(h.state(0), State::Down);
    assert_eq!(h.state(1), State::Down);
    run_until(
        &mut h,
        secs(100),
        answer_probes_200(&mut probes, &mut others),
    );

    assert!(
        probes.iter().all(|p| p.probe.to() == addr(S1)),
        "mode 0 never probes, even when down"
    );
    let times: Vec<Duration> = probes.iter().map(|p| p.at).collect();
    assert_eq!(
        times.len(),
        2,
        "two probes bring 5080 back, then none: {times:?}"
    );
    assert!(
        times[0] > secs(33) && times[0] <= secs(43),
        "probing starts within an interval of the INVITE timeout: {times:?}"
    );
    assert_eq!(times[1] - times[0], secs(10));
    assert!(probes.iter().all(|p| p.before == State::Down));
    for p in &probes {
        check_probe(
            &p.probe,
            &Peer::udp_server(S1),
            "sip:127.0.0.1:5080",
            "sip:mrcp-lb@127.0.0.1:5060",
        );
    }
    assert_eq!(h.state(0), State::Up);
    assert_eq!(
        h.state(1),
        State::Down,
        "nothing brings a mode 0 destination back"
    );
    assert_eq!(h.probe_stats(0).sent, 2);
    assert_eq!(h.probe_stats(1).sent, 0);
    assert!(
        others
            .iter()
            .any(|s| s.code() == Some(503) && s.to() == call.peer.addr),
        "the call failed:{}",
        describe(&others)
    );
}

#[test]
fn invite_timeout_marks_down_and_probes_bring_it_back() {
    let mut h = Harness::started(
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100, probeMode: 2}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50, probeMode: 0}
"#,
        PROBING,
    );
    // Every probe is answered 200 at once: 5080 answers its probes (at least two by 20 s),
    // but not the INVITE.
    let mut probes = Vec::new();
    let mut others = Vec::new();
    run_until(
        &mut h,
        secs(20),
        answer_probes_200(&mut probes, &mut others),
    );
    assert!(h.probe_stats(0).consecutive_successes >= 2);
    assert_eq!(h.state(0), State::Up);

    let mut call = Call::udp("p5");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer::udp_server(S1));
    run_until(
        &mut h,
        secs(23),
        answer_probes_200(&mut probes, &mut others),
    );
    assert_eq!(
        h.state(0),
        State::Down,
        "marked down at once by the INVITE timeout"
    );
    assert_eq!(h.dest(0).reason(), "INVITE timeout");
    assert_eq!(
        h.probe_stats(0).consecutive_successes,
        0,
        "successes before the timeout do not count"
    );
    let inv2 = take(&mut others, "INVITE to 5090", |s| {
        s.is(Method::Invite) && s.to() == addr(S2)
    });
    others.clear();
    let srv2 = Uas::new(S2, "srv-p5");
    answer(&mut h, &mut call, &srv2, &inv2, &[]);

    // While down, new calls go to 5090 although 5080 has more room.
    let mut second = Call::udp("p5b");
    let inv = place(&mut h, &second);
    inv.assert_to(&srv2.peer);
    answer(&mut h, &mut second, &srv2, &inv, &[]);

    run_until(
        &mut h,
        secs(45),
        answer_probes_200(&mut probes, &mut others),
    );
    assert!(
        probes.iter().all(|p| p.probe.to() == addr(S1)),
        "mode 0 is never probed"
    );
    let log: Vec<_> = probes.iter().map(|p| (p.at, p.before, p.after)).collect();
    let down: Vec<_> = log.iter().filter(|p| p.1 == State::Down).collect();
    assert!(down.len() >= 2, "probes while down: {log:?}");
    assert_eq!(down[0].2, State::Down, "one success is not enough: {log:?}");
    assert_eq!(down[1].2, State::Up, "the second brings it back: {log:?}");
    assert_eq!(down[1].0 - down[0].0, secs(10));
    assert_eq!(h.state(0), State::Up);

    // A new call goes to 5080 again.
    let third = Call::udp("p5c");
    let inv = place(&mut h, &third);
    inv.assert_to(&Peer::udp_server(S1));
    assert_eq!((h.load(0), h.load(1)), (1, 2));
}

#[test]
fn replaced_sets_probe_new_destinations_once_and_removed_ones_no_more() {
    let mut h = Harness::started(TWO_DESTS, PROBING);
    let mut probes = Vec::new();
    let mut others = Vec::new();
    run_until(
        &mut h,
        secs(15),
        answer_probes_200(&mut probes, &mut others),
    );

    // 5090 goes (it carries nothing: gone at once), then comes back under the same id, before
    // its old probe timer fires; 5070 is new.
    let only_1 = dest_set(
        1,
        "\n  - {id: 1, group: 1, uri: \"sip:127.0.0.1:5080\", resources: pstn=100}\n",
    );
    assert_eq!(
        h.proxy.replace_set(h.now, &only_1).unwrap(),
        Applied::Replaced
    );
    assert!(status_of(&h, "2").is_none());
    let back = dest_set(
        2,
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50}
  - {id: 3, group: 1, uri: "sip:127.0.0.1:5070", resources: pstn=10}
"#,
    );
    assert_eq!(
        h.proxy.replace_set(h.now, &back).unwrap(),
        Applied::Replaced
    );
    probes.clear();
    run_until(
        &mut h,
        secs(75),
        answer_probes_200(&mut probes, &mut others),
    );
    assert_none(&others, "only probes");
    for a in [S1, S2, "127.0.0.1:5070"] {
        let times: Vec<Duration> = probes
            .iter()
            .filter(|p| p.probe.to() == addr(a))
            .map(|p| p.at)
            .collect();
        assert!(
            !times.is_empty() && times[0] <= secs(25),
            "{a} probed within an interval: {times:?}"
        );
        for w in times.windows(2) {
            assert_eq!(
                w[1] - w[0],
                secs(10),
                "{a}: one probe per interval: {times:?}"
            );
        }
    }

    // Removed for good: no more probes, even while it still carries a call.
    let srv3 = Uas::new("127.0.0.1:5070", "srv-x3");
    let srv1 = Uas::new(S1, "srv-x1");
    let mut calls = Vec::new();
    // 5080 refuses, 5090 refuses: the call lands on 5070.
    let mut call = Call::udp("x1");
    let inv = place(&mut h, &call);
    inv.assert_to(&srv1.peer);
    h.recv(srv1.peer, &srv1.reply(&inv.msg, 503, &[], ""));
    let mut out = h.out();
    let inv2 = take(&mut out, "INVITE to 5090", |s| s.is(Method::Invite));
    inv2.assert_to(&Peer::udp_server(S2));
    h.recv(
        Peer::udp_server(S2),
        &Uas::new(S2, "srv-x2").reply(&inv2.msg, 503, &[], ""),
    );
    let mut out = h.out();
    let inv3 = take(&mut out, "INVITE to 5070", |s| s.is(Method::Invite));
    inv3.assert_to(&srv3.peer);
    answer(&mut h, &mut call, &srv3, &inv3, &[]);
    calls.push(call);
    let without_3 = dest_set(
        3,
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=100}
  - {id: 2, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=50}
"#,
    );
    assert_eq!(
        h.proxy.replace_set(h.now, &without_3).unwrap(),
        Applied::Replaced
    );
    assert!(status_of(&h, "3").is_some_and(|d| d.removed));
    probes.clear();
    run_until(
        &mut h,
        secs(120),
        answer_probes_200(&mut probes, &mut others),
    );
    assert!(
        probes.iter().all(|p| p.probe.to() != srv3.peer.addr),
        "a removed destination is not probed"
    );
    hang_up(&mut h, &mut calls[0], &srv3);
    assert!(status_of(&h, "3").is_none());
}

#[test]
fn enable_gives_a_destination_the_full_failure_threshold_again() {
    // Down after three failed probes, enabled by hand: "failureThreshold consecutive failures
    // take an up destination down" should count from the enable, not before it.
    let mut h = Harness::started(ONE_PROBED, PROBING);
    let mut p = Prober::default();
    let (t1, _) = p.next(&mut h, secs(10));
    for k in 1..3u32 {
        p.next(&mut h, t1 + secs(10) * k);
    }
    h.advance_to(t1 + secs(23));
    assert_eq!(h.state(0), State::Down);
    assert_eq!(h.proxy.set_manual("1", Action::Enable), Some(State::Up));

    // One more probe without an answer.
    let (t4, _) = p.next(&mut h, t1 + secs(30));
    h.advance_to(t4 + secs(3));
    assert_eq!(h.probe_stats(0).failed, 4);
    assert_eq!(
        h.state(0),
        State::Up,
        "one failure after the enable took it down again (consecutive_failures = {})",
        h.probe_stats(0).consecutive_failures
    );
}
