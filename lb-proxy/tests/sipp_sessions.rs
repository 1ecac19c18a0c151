//! Per-session control through the real proxy, with sipp as both peers: `GET /v1/dialogs`
//! lists the calls, `DELETE /v1/dialogs/{id}` and `DELETE /v1/dialogs?destination=ID` end
//! them with a BYE that the client and the server each receive within their own dialog
//! (`uac_long_expect_bye.xml` and `uas_expect_bye.xml` check the tags, and neither hangs up
//! by itself), the destination's load drops to 0 at once, the ends are counted, and all of
//! it needs the admin token.
//!
//! Needs `sipp` (Debian package `sip-tester`). Run: `cargo test -p lb-proxy --test sipp_sessions`.
//! Addresses: 127.0.11.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use lb_api::admin::{DialogEnded, DialogList, DialogState, DialogsEnded, ErrorBody};
use mrcp_lb_test_support::*;
use std::fs;
use std::time::Duration;

fn list(admin: std::net::SocketAddr, token: &str, query: &str) -> DialogList {
    let r = http(
        admin,
        "GET",
        &format!("/v1/dialogs{query}"),
        Some(token),
        None,
    );
    assert_eq!(r.code, 200, "GET /v1/dialogs{query}: {}", r.body);
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

fn error_field(r: &HttpResponse) -> Option<String> {
    serde_json::from_str::<ErrorBody>(&r.body)
        .unwrap_or_else(|e| panic!("not an error body ({e}): {}", r.body))
        .field
}

#[test]
fn deleting_dialogs_sends_bye_to_both_sides_and_frees_the_load() {
    let env = test_env!("sessions_end", "127.0.11.1");
    let token = "t0k-sessions-5e55";
    let token_file = env.dir.join("admin.token");
    fs::write(&token_file, format!("{token}\n")).unwrap();
    let (mut proxy, [server]) = Sandbox::new(&env)
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=10"), "uas_expect_bye.xml")
        .edit_config(|c| {
            c.replacen(
                "admin:\n",
                &format!("admin:\n  tokenFile: {}\n", token_file.display()),
                1,
            )
        })
        .start();
    let admin = proxy.admin;

    // Three calls that nobody hangs up: only the proxy's BYEs end them.
    let client = Sipp::uac(&env, "client")
        .scenario("uac_long_expect_bye.xml")
        .timeout(secs(20))
        .calls(3)
        .rate(10)
        .start();
    wait_for(
        "the 3 calls to be answered",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || (dialog_stats(admin).active == 3).then_some(()),
    );

    // The token: the list shows callers' addresses, and the DELETEs end calls.
    for (method, path) in [
        ("GET", "/v1/dialogs".to_string()),
        ("DELETE", "/v1/dialogs/abc".to_string()),
        ("DELETE", "/v1/dialogs?destination=1".to_string()),
    ] {
        for bearer in [None, Some("wrong")] {
            let r = http(admin, method, &path, bearer, None);
            assert_eq!(r.code, 401, "{method} {path} with {bearer:?}: {}", r.body);
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
    }

    let all = list(admin, token, "");
    assert_eq!((all.total, all.dialogs.len()), (3, 3), "{all:?}");
    assert!(all.next_cursor.is_none());
    for d in &all.dialogs {
        assert_eq!(d.state, DialogState::Confirmed);
        assert_eq!(d.destination.as_deref(), Some("1"));
        assert_eq!(d.caller, format!("{}:{CLIENT_PORT}", env.ip));
        assert_eq!(d.listener, format!("udp:{}:{PROXY_PORT}", env.ip));
        assert_eq!(d.resources.get("pstn"), Some(&1));
    }
    // Paging: two pages of 2 and 1, each dialog once.
    let p1 = list(admin, token, "?limit=2");
    let cursor = p1.next_cursor.clone().expect("a next page");
    let p2 = list(admin, token, &format!("?limit=2&cursor={cursor}"));
    assert!(p2.next_cursor.is_none());
    let paged: Vec<_> = p1
        .dialogs
        .iter()
        .chain(&p2.dialogs)
        .map(|d| &d.id)
        .collect();
    let ids: Vec<_> = all.dialogs.iter().map(|d| &d.id).collect();
    assert_eq!(paged, ids);
    // Filters.
    let first = &all.dialogs[0];
    let by_call = list(admin, token, &format!("?callId={}", first.call_id));
    assert_eq!(by_call.dialogs.len(), 1);
    assert_eq!(list(admin, token, "?state=early").dialogs.len(), 0);
    assert_eq!(list(admin, token, "?destination=2").dialogs.len(), 0);
    assert_eq!(list(admin, token, "?minAge=1h").dialogs.len(), 0);
    // Bad input: 400 naming the parameter.
    for (path, field) in [
        ("/v1/dialogs?limit=5000", "limit"),
        ("/v1/dialogs?cursor=x", "cursor"),
        ("/v1/dialogs?state=gone", "state"),
        ("/v1/dialogs?minAge=soon", "minAge"),
        ("/v1/dialogs?bogus=1", "bogus"),
    ] {
        let r = http(admin, "GET", path, Some(token), None);
        assert_eq!(r.code, 400, "{path}: {}", r.body);
        assert_eq!(error_field(&r).as_deref(), Some(field), "{path}");
    }
    for (path, field) in [
        ("/v1/dialogs/not%20an%20id", "id"),
        ("/v1/dialogs/AAAA", "id"),
        ("/v1/dialogs", "destination"),
        ("/v1/dialogs?destination=1&limit=5", "limit"),
    ] {
        let r = http(admin, "DELETE", path, Some(token), None);
        assert_eq!(r.code, 400, "{path}: {}", r.body);
        assert_eq!(error_field(&r).as_deref(), Some(field), "{path}");
    }
    let r = http(
        admin,
        "DELETE",
        "/v1/dialogs?destination=9",
        Some(token),
        None,
    );
    assert_eq!(r.code, 404, "{}", r.body);

    // One dialog by id.
    let path = format!("/v1/dialogs/{}", first.id);
    let r = http(admin, "DELETE", &path, Some(token), None);
    assert_eq!(r.code, 200, "{}", r.body);
    let ended: DialogEnded = serde_json::from_str(&r.body).unwrap();
    assert!(ended.bye_to_caller && ended.bye_to_server, "{ended:?}");
    assert_eq!(ended.dialog.call_id, first.call_id);
    // Released at once, not when the 200s come back.
    let d = destination_status(admin, "1");
    assert_eq!((d.open_calls, pstn_load(&d)), (2, 2));
    let r = http(admin, "DELETE", &path, Some(token), None);
    assert_eq!(r.code, 404, "ended already: {}", r.body);

    // The rest: every dialog on destination 1.
    let r = http(
        admin,
        "DELETE",
        "/v1/dialogs?destination=1",
        Some(token),
        None,
    );
    assert_eq!(r.code, 200, "{}", r.body);
    let bulk: DialogsEnded = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (bulk.ended, bulk.byes_sent, bulk.not_confirmed),
        (2, 4, 0),
        "{bulk:?}"
    );
    let d = destination_status(admin, "1");
    assert_eq!((d.open_calls, pstn_load(&d)), (0, 0), "load left: {d:?}");
    assert_eq!(list(admin, token, "").total, 0);

    // Both sides got their BYE within their own dialog and answered it.
    let client = client.wait(Duration::from_secs(15));
    eprintln!("{}", client.summary());
    proxy.assert_running();
    let server = server.drain();
    eprintln!("{}", server.summary());
    client.assert_all_ok(3);
    assert_server_clean(&server);
    assert_eq!(
        (server.invites(), server.count("BYE_Recv")),
        (3, 3),
        "the server received the proxy's BYEs: {}",
        server.summary()
    );

    let stats = dialog_stats(admin);
    assert_eq!((stats.active, stats.expired, stats.failed), (0, 0, 0));
    assert_eq!(
        scraped_sum(admin, "mrcp_lb_dialogs_ended_total", &[("reason", "admin")]),
        3.0
    );
}

/// A server dies with calls open: one `DELETE /v1/dialogs?destination=1` hangs up its callers
/// (the BYE towards the dead server goes unanswered) and gives its capacity back at once; the
/// calls on the other server go on until they are ended in turn.
#[test]
fn a_dead_servers_calls_are_ended_in_one_request_and_the_others_go_on() {
    let env = test_env!("sessions_dead", "127.0.11.2");
    let (mut proxy, [s1, s2]) = Sandbox::new(&env)
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=10"), "uas_expect_bye.xml")
        .serve(Dest::udp(2, SERVER2_PORT, "pstn=10"), "uas_expect_bye.xml")
        .start();
    let admin = proxy.admin;
    let client = Sipp::uac(&env, "client")
        .scenario("uac_long_expect_bye.xml")
        .timeout(secs(20))
        .calls(4)
        .rate(20)
        .start();
    wait_for(
        "the 4 calls to be answered",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || (dialog_stats(admin).active == 4).then_some(()),
    );
    let on = |id: &str| {
        let d = destination_status(admin, id);
        (d.open_calls, pstn_load(&d))
    };
    let (n1, _) = on("1");
    let (n2, _) = on("2");
    assert_eq!(n1 + n2, 4);
    assert!(
        n1 > 0 && n2 > 0,
        "the calls went to one server only: {n1} {n2}"
    );

    // Server 1 dies with its calls open.
    let s1 = s1.stop();
    eprintln!("{}", s1.summary());
    let r = http(admin, "DELETE", "/v1/dialogs?destination=1", None, None);
    assert_eq!(r.code, 200, "{}", r.body);
    let bulk: DialogsEnded = serde_json::from_str(&r.body).unwrap();
    assert_eq!((bulk.ended, bulk.not_confirmed), (u64::from(n1), 0));
    assert_eq!(bulk.byes_sent, 2 * u64::from(n1));
    assert_eq!(
        on("1"),
        (0, 0),
        "the dead server's capacity is free at once"
    );
    assert_eq!(on("2"), (n2, n2), "the other server's calls go on");
    wait_for(
        "the dead server's callers to answer their BYE",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            (client
                .live_stats()
                .get("SuccessfulCall(C)")
                .map(String::as_str)
                == Some(&*n1.to_string()))
            .then_some(())
        },
    );

    let r = http(admin, "DELETE", "/v1/dialogs?destination=2", None, None);
    assert_eq!(r.code, 200, "{}", r.body);
    let bulk: DialogsEnded = serde_json::from_str(&r.body).unwrap();
    assert_eq!(bulk.ended, u64::from(n2));
    let client = client.wait(Duration::from_secs(15));
    eprintln!("{}", client.summary());
    proxy.assert_running();
    let s2 = s2.drain();
    eprintln!("{}", s2.summary());
    client.assert_all_ok(4);
    assert_server_clean(&s2);
    assert_eq!(s2.count("BYE_Recv"), u64::from(n2));
    assert_eq!((on("1"), on("2")), ((0, 0), (0, 0)));
    let stats = dialog_stats(admin);
    assert_eq!((stats.active, stats.expired), (0, 0));
}
