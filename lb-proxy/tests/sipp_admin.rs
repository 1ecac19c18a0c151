//! The admin API of the real proxy, over plain HTTP: every endpoint's status codes and bodies,
//! readiness without and with a destination set, versioned and validated set updates that
//! leave the old set in force when refused, manual state, and the bearer token on writes.
//!
//! No SIP traffic: the destinations point at ports where nothing listens (probing is slow by
//! default, so they stay up for the length of a test).
//! Run: `cargo test -p lb-proxy --test sipp_admin`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use lb_api::admin::{DestinationsStatus, ErrorBody, State};
use mrcp_lb_test_support::*;
use serde_json::{json, Value};
use std::fs;

/// id, group, URI, (resource, capacity)s, state, removed.
type SpecView = (String, u32, String, Vec<(String, u32)>, State, bool);

/// The set's destinations as the proxy took them (what a refused update must not change).
fn specs(s: &DestinationsStatus) -> Vec<SpecView> {
    s.destinations
        .iter()
        .map(|d| {
            (
                d.id.clone(),
                d.group,
                d.uri.clone(),
                d.resources
                    .iter()
                    .map(|r| (r.name.clone(), r.capacity))
                    .collect(),
                d.state,
                d.removed,
            )
        })
        .collect()
}

/// Panics unless `r` is an error with one of `codes` and a JSON `ErrorBody`; returns the body.
fn expect_error(what: &str, r: &HttpResponse, codes: &[u16]) -> ErrorBody {
    assert!(
        codes.contains(&r.code),
        "{what}: expected {codes:?}, got {} {}",
        r.code,
        r.body
    );
    let body: ErrorBody = serde_json::from_str(&r.body).unwrap_or_else(|e| {
        panic!(
            "{what}: error body is not {{error, field}} JSON ({e}): {:?}",
            r.body
        )
    });
    assert!(!body.error.is_empty(), "{what}: empty error message");
    body
}

fn object_keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

fn sorted(keys: &[&str]) -> Vec<String> {
    let mut k: Vec<String> = keys.iter().map(|s| s.to_string()).collect();
    k.sort();
    k
}

#[test]
fn admin_endpoints_answer_as_documented() {
    let env = test_env!("admin_endpoints", "127.0.1.37");
    let (mut proxy, []) = Sandbox::new(&env).without_destinations().start();
    let admin = proxy.admin;
    let ip = &env.ip;

    // Liveness, readiness without a set, metrics, the empty view.
    let r = http(admin, "GET", "/healthz", None, None);
    assert_eq!((r.code, r.body.trim()), (200, "ok"), "/healthz");
    let r = http(admin, "GET", "/readyz", None, None);
    assert_eq!(r.code, 503, "/readyz without a destination set: {}", r.body);
    let r = http(admin, "GET", "/metrics", None, None);
    assert_eq!(r.code, 200, "/metrics: {}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "/metrics content type: {:?}",
        r.header("content-type")
    );
    let m = parse_metrics(&r.body);
    assert!(
        m.iter().any(|s| s.name == "mrcp_lb_dialogs_active"),
        "/metrics without mrcp_lb_dialogs_active:\n{}",
        r.body
    );
    let empty = destinations_status(admin);
    assert_eq!(
        (empty.version, empty.updated, empty.destinations.len()),
        (0, 0, 0),
        "{empty:?}"
    );

    // The first set: 200 with the new view, and the proxy becomes ready.
    let set5 = json!({
        "version": 5,
        "destinations": [
            {"id": "a", "uri": format!("sip:{ip}:5080"), "resources": "pstn=10", "probeMode": 0},
            {"id": 7, "group": 1, "uri": format!("sip:{ip}:5090;transport=tcp"),
             "resources": "pstn=20;tts=5", "state": "draining"},
        ]
    });
    let r = put_destinations(admin, None, &set5.to_string());
    assert_eq!(r.code, 200, "first PUT: {}", r.body);
    let view: DestinationsStatus =
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("PUT body ({e}): {}", r.body));
    assert_eq!(view.version, 5);
    let r = http(admin, "GET", "/readyz", None, None);
    assert_eq!(r.code, 200, "/readyz after a PUT: {}", r.body);

    // The view's shape, key by key (camelCase, as README and lb-api say).
    let v = destinations_json(admin);
    assert_eq!(
        object_keys(&v),
        sorted(&["version", "updated", "destinations"])
    );
    assert_eq!(v["version"], json!(5));
    assert!(v["updated"].as_u64().is_some_and(|u| u > 0), "{v}");
    let ds = v["destinations"].as_array().expect("destinations array");
    assert_eq!(ds.len(), 2, "{v}");
    for d in ds {
        assert_eq!(
            object_keys(d),
            sorted(&[
                "id",
                "group",
                "uri",
                "address",
                "state",
                "reason",
                "removed",
                "resources",
                "openCalls",
                "calls",
                "probe",
                "lastChange"
            ]),
            "{d}"
        );
        assert_eq!(
            object_keys(&d["probe"]),
            sorted(&[
                "mode",
                "sent",
                "succeeded",
                "failed",
                "consecutiveSuccesses",
                "consecutiveFailures",
                "latencyMs",
                "lastCode"
            ]),
            "{d}"
        );
        for r in d["resources"].as_array().expect("resources array") {
            assert_eq!(
                object_keys(r),
                sorted(&["name", "capacity", "load", "clusterLoad"]),
                "{d}"
            );
        }
    }
    let a = &ds[0];
    assert_eq!(a["id"], json!("a"));
    assert_eq!(a["address"], json!(format!("{ip}:5080")));
    assert_eq!((&a["state"], &a["removed"]), (&json!("up"), &json!(false)));
    assert_eq!(a["probe"]["mode"], json!(0));
    assert_eq!(
        a["resources"],
        json!([{"name": "pstn", "capacity": 10, "load": 0, "clusterLoad": 0}])
    );
    let b = &ds[1];
    assert_eq!(b["id"], json!("7"), "a numeric id is shown as a string");
    assert_eq!(b["state"], json!("draining"), "{b}");
    assert_eq!(b["probe"]["mode"], json!(2), "probeMode defaults to 2");
    assert_eq!(b["resources"].as_array().map(Vec::len), Some(2), "{b}");
    let good = destinations_status(admin);

    // The same version with the same content again: 200, nothing changes.
    let r = put_destinations(admin, None, &set5.to_string());
    assert_eq!(r.code, 200, "idempotent PUT: {}", r.body);
    assert_eq!(specs(&destinations_status(admin)), specs(&good));
    assert_eq!(destinations_status(admin).version, 5);

    // The same version with other content, and an older version: 409.
    let mut other = set5.clone();
    other["destinations"][0]["resources"] = json!("pstn=11");
    let r = put_destinations(admin, None, &other.to_string());
    expect_error("same version, other content", &r, &[409]);
    let mut older = other.clone();
    older["version"] = json!(4);
    let r = put_destinations(admin, None, &older.to_string());
    let e = expect_error("older version", &r, &[409]);
    assert_eq!(e.field.as_deref(), Some("version"), "{e:?}");
    assert_eq!(specs(&destinations_status(admin)), specs(&good));

    // Invalid sets (at a higher version, so only the content is wrong): refused whole with
    // the field named; the old set stays.
    let with = |i: usize, key: &str, val: Value| {
        let mut s = set5.clone();
        s["version"] = json!(6);
        s["destinations"][i][key] = val;
        s.to_string()
    };
    let mut dup = set5.clone();
    dup["version"] = json!(6);
    dup["destinations"][1]["id"] = json!("a");
    let cases: Vec<(&str, String, &[u16], &str, &str)> = vec![
        (
            "bad URI",
            with(1, "uri", json!("http://example.com/")),
            &[422],
            "destinations[1].uri",
            "",
        ),
        (
            "duplicate id",
            dup.to_string(),
            &[422],
            "destinations[1].id",
            "",
        ),
        (
            "capacity not a number",
            with(0, "resources", json!("pstn=lots")),
            &[400, 422],
            "destinations[0].resources",
            "lots",
        ),
        (
            "unknown field",
            with(0, "weight", json!(3)),
            &[400, 422],
            "destinations[0]",
            "weight",
        ),
        (
            "bad state",
            with(1, "state", json!("sleeping")),
            &[400, 422],
            "destinations[1].state",
            "sleeping",
        ),
    ];
    for (what, body, codes, field, in_message) in cases {
        let r = put_destinations(admin, None, &body);
        let e = expect_error(what, &r, codes);
        eprintln!("{what}: {} {e:?}", r.code);
        let named = e.field.as_deref().unwrap_or("");
        assert!(
            named.starts_with(field),
            "{what}: the error should name {field:?}, got field {:?}: {e:?}",
            e.field
        );
        assert!(
            e.error.contains(in_message),
            "{what}: the message should mention {in_message:?}: {e:?}"
        );
        let now = destinations_status(admin);
        assert_eq!(now.version, 5, "{what} changed the version");
        assert_eq!(specs(&now), specs(&good), "{what} changed the set");
    }
    let r = put_destinations(admin, None, "{not json");
    expect_error("body that does not parse", &r, &[400]);
    assert_eq!(specs(&destinations_status(admin)), specs(&good));

    // Manual state: unknown id 404, bad action 400, drain and enable 200.
    let r = post_state(admin, None, "nope", "drain");
    expect_error("state of an unknown id", &r, &[404]);
    let r = post_state(admin, None, "a", "explode");
    expect_error("unknown action", &r, &[400]);
    let r = http(
        admin,
        "POST",
        "/v1/destinations/a/state",
        None,
        Some("{\"act\": \"drain\"}"),
    );
    expect_error("body without action", &r, &[400]);
    assert_eq!(destinations_status(admin).destinations[0].state, State::Up);
    let r = post_state(admin, None, "a", "drain");
    assert_eq!(r.code, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"id": "a", "state": "draining"}));
    assert_eq!(
        destinations_status(admin).destinations[0].state,
        State::Draining
    );
    let r = post_state(admin, None, "a", "disable");
    assert_eq!(r.json(), json!({"id": "a", "state": "disabled"}));
    let r = post_state(admin, None, "a", "enable");
    assert_eq!(r.json(), json!({"id": "a", "state": "up"}));
    assert_eq!(destinations_status(admin).destinations[0].state, State::Up);

    // Dialog stats.
    let v = get_json(admin, "/v1/dialogs/stats");
    for k in ["active", "early", "processed", "expired", "failed"] {
        assert!(
            v[k].as_u64().is_some(),
            "/v1/dialogs/stats without {k}: {v}"
        );
    }

    // Cluster view of a proxy without a cluster section: alone, nothing shared.
    let c = get_json(admin, "/v1/cluster");
    assert_eq!(
        (&c["enabled"], &c["size"], &c["peers"]),
        (&json!(false), &json!(1), &json!([])),
        "{c}"
    );
    proxy.assert_running();
}

#[test]
fn admin_token_guards_writes_and_leaves_reads_open() {
    let env = test_env!("admin_token", "127.0.1.38");
    let token = "t0k-4f1c9e-secret";
    let token_file = env.dir.join("admin.token");
    fs::write(&token_file, format!("{token}\n")).unwrap();
    let (mut proxy, []) = Sandbox::new(&env)
        .dest(Dest::udp(1, SERVER1_PORT, "pstn=10"))
        .dest(Dest::udp(2, SERVER2_PORT, "pstn=20"))
        .edit_config(|c| {
            c.replacen(
                "admin:\n",
                &format!("admin:\n  tokenFile: {}\n", token_file.display()),
                1,
            )
        })
        .start();
    let admin = proxy.admin;
    let v0 = destinations_status(admin).version;

    // Reads need no token.
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/destinations",
        "/v1/dialogs/stats",
        "/v1/cluster",
    ] {
        let r = http(admin, "GET", path, None, None);
        assert_eq!(r.code, 200, "GET {path} without a token: {}", r.body);
    }

    let set = json!({
        "version": v0 + 1,
        "destinations": [
            {"id": "1", "uri": format!("sip:{}:{SERVER1_PORT}", env.ip), "resources": "pstn=15"},
        ]
    })
    .to_string();
    let state_body = json!({"action": "drain"}).to_string();
    let wrong_auth: [(&str, Vec<(&str, String)>); 4] = [
        ("no Authorization", vec![]),
        (
            "a wrong token",
            vec![("Authorization", "Bearer not-the-token".to_string())],
        ),
        (
            "the token with a suffix",
            vec![("Authorization", format!("Bearer {token}x"))],
        ),
        (
            "the token without the Bearer scheme",
            vec![("Authorization", token.to_string())],
        ),
    ];
    for (what, headers) in &wrong_auth {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = http_request(admin, "PUT", "/v1/destinations", &h, None, Some(&set)).unwrap();
        assert_eq!(r.code, 401, "PUT with {what}: {}", r.body);
        let r = http_request(
            admin,
            "POST",
            "/v1/destinations/1/state",
            &h,
            None,
            Some(&state_body),
        )
        .unwrap();
        assert_eq!(r.code, 401, "POST with {what}: {}", r.body);
    }
    let s = destinations_status(admin);
    assert_eq!(s.version, v0, "a refused PUT changed the version");
    assert_eq!(s.destinations.len(), 2, "a refused PUT changed the set");
    assert!(
        s.destinations.iter().all(|d| d.state == State::Up),
        "a refused POST changed a state: {s:?}"
    );

    // The right token.
    let r = post_state(admin, Some(token), "2", "drain");
    assert_eq!(r.code, 200, "POST with the token: {}", r.body);
    assert_eq!(r.json(), json!({"id": "2", "state": "draining"}));
    let r = put_destinations(admin, Some(token), &set);
    assert_eq!(r.code, 200, "PUT with the token: {}", r.body);
    let s = destinations_status(admin);
    assert_eq!(s.version, v0 + 1);
    assert_eq!(s.destinations.len(), 1, "{s:?}");
    assert_eq!(s.destinations[0].resources[0].capacity, 15);
    proxy.assert_running();
}
