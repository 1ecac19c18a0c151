//! Per-session control (`GET /v1/dialogs`, `DELETE /v1/dialogs[/{id}]`) in the core: what a
//! listing shows, filters and pages that stay exact while calls come and go, and ending one
//! dialog or every one on a destination with BYEs built as the expiry path builds them.

use super::*;
use crate::proxy::{dialog_id, DialogFilter, DialogQuery, EndError};
use lb_api::admin::{DialogInfo, DialogState};
use std::time::SystemTime;

fn page(h: &Harness, filter: DialogFilter, after: u64, limit: usize) -> lb_api::admin::DialogList {
    h.proxy.list_dialogs(
        h.now,
        &DialogQuery {
            filter,
            after,
            limit,
        },
    )
}

fn all(h: &Harness, filter: DialogFilter) -> Vec<DialogInfo> {
    let l = page(h, filter, 0, 1000);
    assert_eq!(l.next_cursor, None);
    l.dialogs
}

fn key_of(call: &Call) -> DialogKey {
    DialogKey {
        call_id: call.call_id.as_str().into(),
        caller_tag: call.tag().into(),
    }
}

/// Places a call that the server (S2, destination 2) takes: destination 1 is disabled
/// meanwhile.
fn open_call_on_2(h: &mut Harness, id: &str, srv: &Uas) -> Call {
    h.proxy.set_manual("1", Action::Disable).unwrap();
    let call = open_call(h, id, srv);
    h.proxy.set_manual("1", Action::Enable).unwrap();
    call
}

/// A call that got a 180 with a To tag (early) from S1 and nothing more.
fn ringing_call(h: &mut Harness, id: &str, srv: &Uas) -> Call {
    let call = Call::udp(id);
    let inv = place(h, &call);
    inv.assert_to(&srv.peer);
    h.recv(srv.peer, &srv.reply(&inv.msg, 180, &[], ""));
    let mut out = h.out();
    take(&mut out, "180 to the caller", |s| s.code() == Some(180));
    call
}

/// The `mrcp_lb_dialogs_ended_total{reason="admin"}` line of the exposition.
fn admin_ended(h: &Harness) -> String {
    let text = h.proxy.metrics().encode();
    text.lines()
        .find(|l| l.starts_with("mrcp_lb_dialogs_ended_total{reason=\"admin\"}"))
        .map(str::to_string)
        .unwrap_or_default()
}

#[test]
fn a_listing_shows_each_dialog_with_its_call_state_caller_destination_and_load() {
    let mut h = Harness::new();
    let srv = Uas::new(S1, "ls-srv");
    let call = open_call(&mut h, "ls1", &srv);
    h.advance_to(secs(30));
    let early = ringing_call(&mut h, "ls2", &srv);
    // Within Timer C (10 s here): still ringing.
    h.advance_to(secs(35));

    let l = page(&h, DialogFilter::default(), 0, 100);
    assert_eq!((l.total, l.next_cursor.clone()), (2, None));
    let [a, b] = &l.dialogs[..] else {
        panic!("two dialogs: {l:?}")
    };
    // Oldest first.
    assert_eq!(a.call_id, call.call_id);
    assert_eq!(a.id, dialog_id(&key_of(&call)));
    assert_eq!(a.from_tag, call.tag());
    assert_eq!(a.to_tag.as_deref(), Some("ls-srv"));
    assert_eq!(a.state, DialogState::Confirmed);
    assert_eq!(a.caller, "10.0.0.5:40000", "where its packets come from");
    assert_eq!(a.transport, "udp");
    assert_eq!(a.listener, "udp:127.0.0.1:5060");
    assert_eq!(a.destination.as_deref(), Some("1"));
    assert_eq!(a.destination_uri.as_deref(), Some("sip:127.0.0.1:5080"));
    assert_eq!(a.resources, [("pstn".to_string(), 1)].into());
    assert!((a.age_seconds - 35.0).abs() < 0.001, "{}", a.age_seconds);
    let unix_now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((unix_now - 35.0 - a.started_at).abs() < 5.0, "{a:?}");

    assert_eq!(b.call_id, early.call_id);
    assert_eq!(b.state, DialogState::Early);
    assert_eq!(b.to_tag, None, "known once answered");
    assert!((b.age_seconds - 5.0).abs() < 0.001, "{}", b.age_seconds);
    // The JSON an operator reads.
    let json = serde_json::to_value(&l).unwrap();
    assert_eq!(json["dialogs"][0]["callId"], call.call_id.as_str());
    assert_eq!(json["dialogs"][0]["destinationUri"], "sip:127.0.0.1:5080");
    assert_eq!(json["dialogs"][1]["state"], "early");
    assert!(json.get("nextCursor").is_none(), "{json}");
}

#[test]
fn filters_select_by_destination_state_age_and_call_id() {
    let mut h = Harness::new();
    let s1 = Uas::new(S1, "f-s1");
    let s2 = Uas::new(S2, "f-s2");
    let old = open_call(&mut h, "f1", &s1);
    h.advance_to(secs(100));
    let on2 = open_call_on_2(&mut h, "f2", &s2);
    let ringing = ringing_call(&mut h, "f3", &s1);
    h.advance_to(secs(105));

    let ids =
        |f: DialogFilter| -> Vec<String> { all(&h, f).into_iter().map(|d| d.call_id).collect() };
    let on = |d: &str| DialogFilter {
        destination: Some(d.into()),
        ..DialogFilter::default()
    };
    assert_eq!(
        ids(on("1")),
        [old.call_id.as_str(), ringing.call_id.as_str()]
    );
    assert_eq!(ids(on("2")), [on2.call_id.as_str()]);
    assert!(ids(on("nope")).is_empty());
    let state = |s| DialogFilter {
        state: Some(s),
        ..DialogFilter::default()
    };
    assert_eq!(
        ids(state(DialogState::Confirmed)),
        [old.call_id.as_str(), on2.call_id.as_str()]
    );
    assert_eq!(ids(state(DialogState::Early)), [ringing.call_id.as_str()]);
    assert!(ids(state(DialogState::Trying)).is_empty());
    let older = |s| DialogFilter {
        min_age: Some(secs(s)),
        ..DialogFilter::default()
    };
    assert_eq!(
        ids(older(105)),
        [old.call_id.as_str()],
        "105 s old exactly: included"
    );
    assert_eq!(ids(older(106)), Vec::<String>::new());
    assert_eq!(ids(older(5)).len(), 3);
    assert_eq!(ids(older(0)).len(), 3);
    let by_call = DialogFilter {
        call_id: Some(on2.call_id.clone()),
        ..DialogFilter::default()
    };
    assert_eq!(ids(by_call), [on2.call_id.as_str()]);
    let both = DialogFilter {
        destination: Some("1".into()),
        state: Some(DialogState::Confirmed),
        ..DialogFilter::default()
    };
    assert_eq!(ids(both), [old.call_id.as_str()]);
}

#[test]
fn pages_list_every_dialog_once_while_calls_come_and_go() {
    let mut h = Harness::new();
    let srv = Uas::new(S1, "pg-srv");
    let mut calls: Vec<Call> = (0..5)
        .map(|i| open_call(&mut h, &format!("pg{i}"), &srv))
        .collect();

    let p1 = page(&h, DialogFilter::default(), 0, 2);
    assert_eq!(p1.dialogs.len(), 2);
    assert_eq!(p1.total, 5);
    let cursor: u64 = p1.next_cursor.as_deref().unwrap().parse().unwrap();
    // Meanwhile: a call on page 1 and one not listed yet end, a new one begins.
    let mut gone = calls.remove(3);
    hang_up(&mut h, &mut gone, &srv);
    hang_up(&mut h, &mut calls[0], &srv);
    let late = open_call(&mut h, "pg-late", &srv);

    let p2 = page(&h, DialogFilter::default(), cursor, 2);
    let cursor: u64 = p2.next_cursor.as_deref().unwrap().parse().unwrap();
    let p3 = page(&h, DialogFilter::default(), cursor, 2);
    assert_eq!(p3.next_cursor, None, "{p3:?}");
    let listed: Vec<String> = [p1, p2, p3]
        .into_iter()
        .flat_map(|p| p.dialogs)
        .map(|d| d.call_id)
        .collect();
    let want: Vec<String> = ["pg0", "pg1", "pg2", "pg4", "pg-late"]
        .iter()
        .map(|id| format!("{id}-3816@192.168.0.5"))
        .collect();
    assert_eq!(listed, want, "each once, in the order they began");
    assert!(listed.contains(&late.call_id));

    // A page exactly at the end has no next cursor; one past it is empty.
    let tail = page(&h, DialogFilter::default(), u64::MAX, 2);
    assert!(tail.dialogs.is_empty() && tail.next_cursor.is_none());
}

#[test]
fn ending_a_dialog_sends_bye_to_both_sides_within_it_and_releases_the_load_at_once() {
    let mut h = Harness::new();
    let mut call = Call::udp("end1");
    let srv = Uas::new(S1, "end-srv");
    let inv = place(&mut h, &call);
    answer(&mut h, &mut call, &srv, &inv, &[]);
    // The caller has sent CSeq 2 (an INFO) since: the BYE to the server must be above it.
    h.recv(call.peer, &call.in_dialog("INFO", &[], ""));
    let mut out = h.out();
    let info = take(&mut out, "INFO", |s| s.is(Method::Info));
    h.recv(srv.peer, &response(&info.msg, 200, None, &[], ""));
    h.out();
    assert_eq!(h.load(0), 1);

    let ended = h.proxy.end_dialog_by_key(h.now, &key_of(&call)).unwrap();
    assert!(ended.bye_to_caller && ended.bye_to_server, "{ended:?}");
    assert_eq!(ended.dialog.call_id, call.call_id);
    assert_eq!(ended.dialog.state, DialogState::Confirmed);
    let mut out = h.out();
    let (to_srv, to_caller) = expiry_byes(&mut out, &call, &srv);
    assert_none(&out, "only the two BYEs");
    assert_eq!(to_srv.get(HeaderName::CSeq), Some("3 BYE"));
    assert_eq!(to_caller.get(HeaderName::CSeq), Some("2 BYE"));
    for bye in [&to_srv, &to_caller] {
        assert_eq!(
            bye.get(HeaderName::Reason),
            Some("SIP;cause=200;text=\"ended by administrator\"")
        );
        assert_eq!(
            bye.get(HeaderName::Route),
            None,
            "no route set on either side"
        );
    }

    // Load and counters at once, before any 200.
    assert_eq!(h.load(0), 0);
    let st = h.proxy.dialog_stats();
    assert_eq!((st.active, st.expired, st.failed), (0, 0, 0));
    assert_eq!(
        admin_ended(&h),
        "mrcp_lb_dialogs_ended_total{reason=\"admin\"} 1"
    );
    assert_eq!(h.proxy.sizes().2, 0, "no dialog left");

    // Both sides answer 200: absorbed.
    h.recv(srv.peer, &response(&to_srv.msg, 200, None, &[], ""));
    h.recv(call.peer, &response(&to_caller.msg, 200, None, &[], ""));
    assert_none(&h.out(), "the 200s to our own BYEs are absorbed");

    // Ending it again: gone.
    assert_eq!(
        h.proxy.end_dialog_by_key(h.now, &key_of(&call)),
        Err(EndError::NotFound)
    );

    // A caller that sent its own BYE meanwhile (crossing ours): relayed by its Route and
    // Request-URI as for any dialog the proxy does not hold, so the server answers it (481
    // from a server that already ended the call); no load moves, no dialog comes back.
    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let late = take(&mut out, "late BYE relayed", |s| s.is(Method::Bye));
    late.assert_to(&srv.peer);
    assert_none(&out, "after the late BYE");
    h.recv(srv.peer, &response(&late.msg, 481, None, &[], ""));
    let mut out = h.out();
    let nf = take(&mut out, "481 back to the caller", |s| {
        s.code() == Some(481)
    });
    nf.assert_to(&call.peer);
    assert_eq!((h.load(0), h.proxy.sizes().2), (0, 0));
    assert_eq!(h.proxy.dialog_stats().active, 0);
}

#[test]
fn a_dialog_being_set_up_is_not_ended_by_hand() {
    let mut h = Harness::new();
    let srv = Uas::new(S1, "ns-srv");
    let call = ringing_call(&mut h, "ns1", &srv);
    match h.proxy.end_dialog_by_key(h.now, &key_of(&call)) {
        Err(EndError::NotConfirmed(d)) => assert_eq!(d.state, DialogState::Early),
        other => panic!("{other:?}"),
    }
    assert_none(&h.out(), "nothing sent");
    assert_eq!(h.load(0), 1);
    assert_eq!(h.proxy.dialog_stats().early, 1);
}

#[test]
fn ending_every_dialog_on_a_destination_leaves_the_others() {
    let mut h = Harness::new();
    let s1 = Uas::new(S1, "all-s1");
    let s2 = Uas::new(S2, "all-s2");
    let calls: Vec<Call> = (0..3)
        .map(|i| open_call(&mut h, &format!("all{i}"), &s1))
        .collect();
    let other = open_call_on_2(&mut h, "all-other", &s2);
    let early = ringing_call(&mut h, "all-early", &s1);
    assert_eq!((h.load(0), h.load(1)), (4, 1));

    let on1 = DialogFilter {
        destination: Some("1".into()),
        ..DialogFilter::default()
    };
    let b = h.proxy.end_dialogs(h.now, &on1, 0);
    assert!(b.known);
    assert_eq!(
        (b.ended, b.byes_sent, b.not_confirmed, b.next),
        (3, 6, 1, None)
    );
    let mut out = h.out();
    for c in &calls {
        let of_call = |s: &Sent| s.is(Method::Bye) && s.get(HeaderName::CallId) == Some(&c.call_id);
        let to_srv = take(&mut out, "BYE to the server", |s| {
            of_call(s) && s.to() == addr(S1)
        });
        assert_eq!(to_srv.msg.from_tag(), Some(c.tag()));
        assert_eq!(to_srv.get(HeaderName::CSeq), Some("2 BYE"));
        let to_caller = take(&mut out, "BYE to the caller", |s| {
            of_call(s) && s.to() == c.peer.addr
        });
        assert_eq!(to_caller.msg.to_tag(), Some(c.tag()));
    }
    assert_none(&out, "two BYEs per call of destination 1, nothing else");
    assert_eq!(
        (h.load(0), h.load(1)),
        (1, 1),
        "the early call and destination 2's"
    );
    let left: Vec<String> = all(&h, DialogFilter::default())
        .into_iter()
        .map(|d| d.call_id)
        .collect();
    assert_eq!(left, [other.call_id.as_str(), early.call_id.as_str()]);
    assert_eq!(
        admin_ended(&h),
        "mrcp_lb_dialogs_ended_total{reason=\"admin\"} 3"
    );

    let none = DialogFilter {
        destination: Some("nope".into()),
        ..DialogFilter::default()
    };
    let b = h.proxy.end_dialogs(h.now, &none, 0);
    assert!(!b.known);
    assert_eq!(b.ended, 0);
}

#[test]
fn a_bulk_end_works_in_bounded_batches() {
    let mut h = Harness::with(
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=1000}
"#,
        "",
    );
    let srv = Uas::new(S1, "bb-srv");
    let n = crate::proxy::END_BATCH + 5;
    for i in 0..n {
        open_call(&mut h, &format!("bb{i}"), &srv);
    }
    let on1 = DialogFilter {
        destination: Some("1".into()),
        ..DialogFilter::default()
    };
    let first = h.proxy.end_dialogs(h.now, &on1, 0);
    assert_eq!(first.ended as usize, crate::proxy::END_BATCH);
    let next = first.next.expect("more to do");
    assert_eq!(h.out().len(), 2 * crate::proxy::END_BATCH);
    let second = h.proxy.end_dialogs(h.now, &on1, next);
    assert_eq!((second.ended, second.next), (5, None));
    assert_eq!(h.load(0), 0);
}

#[test]
fn a_page_looks_at_a_bounded_number_of_dialogs() {
    let mut h = Harness::with(
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=20000}
"#,
        "",
    );
    let budget = crate::proxy::SCAN_BUDGET;
    for i in 0..budget + 10 {
        h.recv(
            Call::udp(&format!("sb{i}")).peer,
            &Call::udp(&format!("sb{i}")).invite(),
        );
    }
    h.out();
    assert_eq!(h.proxy.sizes().2, budget + 10);
    // A filter that matches none of them: the first request stops after the budget, empty
    // but with a cursor; the second looks at the last 10 and ends the listing.
    let confirmed = DialogFilter {
        state: Some(DialogState::Confirmed),
        ..DialogFilter::default()
    };
    let t = std::time::Instant::now();
    let p1 = page(&h, confirmed.clone(), 0, 1000);
    eprintln!(
        "a page over {budget} dialogs: {:?} (debug build)",
        t.elapsed()
    );
    assert!(p1.dialogs.is_empty());
    let cursor: u64 = p1
        .next_cursor
        .as_deref()
        .expect("more to look at")
        .parse()
        .unwrap();
    let p2 = page(&h, confirmed, cursor, 1000);
    assert!(p2.dialogs.is_empty() && p2.next_cursor.is_none(), "{p2:?}");
    // The same bound for a bulk end.
    let on1 = DialogFilter {
        destination: Some("1".into()),
        ..DialogFilter::default()
    };
    let b = h.proxy.end_dialogs(h.now, &on1, 0);
    assert_eq!((b.ended, b.not_confirmed as usize), (0, budget));
    let b = h
        .proxy
        .end_dialogs(h.now, &on1, b.next.expect("more to look at"));
    assert_eq!((b.ended, b.not_confirmed, b.next), (0, 10, None));
    assert_none(&h.out(), "dialogs being set up are left alone");
}
