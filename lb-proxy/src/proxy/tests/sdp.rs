//! SDP routing (`routing.resources: sdp`): sessions counted by the MRCPv2 channels of their
//! offer, settled by the answer and by re-INVITEs, 406 as "not offered here", and pools.

use super::*;

/// Speech recognition only on 5080, synthesis only on 5090.
const ASR_TTS: &str = r#"
  - {id: asr, group: 1, uri: "sip:127.0.0.1:5080", resources: speechrecog=10}
  - {id: tts, group: 1, uri: "sip:127.0.0.1:5090", resources: speechsynth=20}
"#;

/// Both resources on both servers, 5080 the larger.
const BOTH: &str = r#"
  - {id: big, group: 1, uri: "sip:127.0.0.1:5080", resources: speechrecog=20;speechsynth=20}
  - {id: small, group: 1, uri: "sip:127.0.0.1:5090", resources: speechrecog=10;speechsynth=10}
"#;

const SDP_ROUTING: &str = "routing:\n  resources: sdp\n";

/// The offer UniMRCP 1.8's client writes: one `m=application` per channel (port 9, or 0 for a
/// channel a re-INVITE removes), then the audio.
fn offer(channels: &[(&str, u16)]) -> String {
    let mut s = String::from(
        "v=0\r\no=UniMRCPClient 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\n\
         c=IN IP4 127.0.0.1\r\nt=0 0\r\n",
    );
    for (i, (resource, port)) in channels.iter().enumerate() {
        let connection = if i == 0 { "new" } else { "existing" };
        let _ = write!(
            s,
            "m=application {port} TCP/MRCPv2 1\r\na=setup:active\r\na=connection:{connection}\r\n\
             a=resource:{resource}\r\na=cmid:1\r\n"
        );
    }
    s.push_str(
        "m=audio 4000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n\
         a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendonly\r\n\
         a=ptime:20\r\na=mid:1\r\n",
    );
    s
}

/// UniMRCP server's answer: an accepted channel gets a port and `a=channel`, a rejected one
/// port 0.
fn answer_sdp(channels: &[Option<&str>]) -> String {
    let mut s = String::from(
        "v=0\r\no=UniMRCPServer 2890844526 2890844527 IN IP4 127.0.0.1\r\ns=-\r\n\
         c=IN IP4 127.0.0.1\r\nt=0 0\r\n",
    );
    for c in channels {
        match c {
            Some(resource) => {
                let _ = write!(
                    s,
                    "m=application 1544 TCP/MRCPv2 1\r\na=setup:passive\r\n\
                     a=connection:new\r\na=channel:19512x4@{resource}\r\na=cmid:1\r\n"
                );
            }
            None => s.push_str("m=application 0 TCP/MRCPv2 1\r\na=cmid:1\r\n"),
        }
    }
    s.push_str("m=audio 5000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=recvonly\r\na=mid:1\r\n");
    s
}

fn invite_with(call: &Call, body: &str, extra: &[(&str, String)]) -> String {
    let mut h = vec![
        ("Via", call.via(&call.invite_branch())),
        ("Max-Forwards", "70".into()),
        ("From", call.from.clone()),
        ("To", call.to.clone()),
        ("Call-ID", call.call_id.clone()),
        ("CSeq", "1 INVITE".into()),
        ("Contact", call.contact.clone()),
    ];
    h.extend(extra.iter().cloned());
    sip(&format!("INVITE {} SIP/2.0", call.ruri), &h, body)
}

/// Sends the INVITE; returns the one the proxy forwarded (after the 100 to the caller).
fn place_offer(h: &mut Harness, call: &Call, body: &str) -> Sent {
    h.recv(call.peer, &invite_with(call, body, &[]));
    let mut out = h.out();
    take(&mut out, "100 Trying", |s| s.code() == Some(100));
    let inv = take(&mut out, "forwarded INVITE", |s| s.is(Method::Invite));
    assert_none(&out, "after the INVITE");
    inv
}

/// The server behind `inv` answers 200 with `body`; the caller ACKs.
fn accept(h: &mut Harness, call: &mut Call, inv: &Sent, body: &str) {
    let srv = Uas::new(&inv.to().to_string(), "srv");
    h.recv(srv.peer, &srv.reply(&inv.msg, 200, &[], body));
    let mut out = h.out();
    let ok = take(&mut out, "200 to the caller", |s| s.code() == Some(200));
    call.answered(&ok.msg);
    h.recv(call.peer, &call.ack());
    h.out();
}

/// A re-INVITE from the caller with `body`, answered `code` (with `answer` on a 2xx).
fn reinvite(h: &mut Harness, call: &mut Call, body: &str, code: u16, answer: &str) {
    h.recv(call.peer, &call.in_dialog("INVITE", &[], body));
    let mut out = h.out();
    take(&mut out, "100 to the re-INVITE", |s| s.code() == Some(100));
    let fwd = take(&mut out, "re-INVITE to the server", |s| {
        s.is(Method::Invite)
    });
    let srv = Uas::new(&fwd.to().to_string(), "srv");
    let body = if code == 200 { answer } else { "" };
    h.recv(srv.peer, &srv.reply(&fwd.msg, code, &[], body));
    let mut out = h.out();
    take(&mut out, "the re-INVITE's answer to the caller", |s| {
        s.code() == Some(code)
    });
    if code == 200 {
        h.recv(call.peer, &call.ack());
        h.out();
    }
}

/// Load per resource of the destination `id`, sorted by name: what the admin API shows.
fn loads(h: &Harness, id: &str) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = status_of(h, id)
        .unwrap()
        .resources
        .into_iter()
        .map(|r| (r.name, r.load))
        .collect();
    v.sort();
    v
}

fn status_of(h: &Harness, id: &str) -> Option<lb_api::admin::DestinationStatus> {
    h.proxy
        .destinations()
        .visible()
        .find(|d| d.spec.id == id)
        .map(|d| d.status())
}

fn reason_of(m: &Message) -> String {
    match &m.start {
        StartLine::Response { reason, .. } => reason.to_string(),
        StartLine::Request { .. } => String::new(),
    }
}

fn l(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
    pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
}

#[test]
fn each_session_goes_where_its_resource_is() {
    let mut h = Harness::with(ASR_TTS, SDP_ROUTING);
    let synth = place_offer(&mut h, &Call::udp("s1"), &offer(&[("speechsynth", 9)]));
    assert_eq!(
        synth.to(),
        addr(S2),
        "a synthesizer session goes to the TTS server"
    );
    let recog = place_offer(&mut h, &Call::udp("r1"), &offer(&[("speechrecog", 9)]));
    assert_eq!(
        recog.to(),
        addr(S1),
        "a recognizer session goes to the ASR server"
    );
    assert_eq!(loads(&h, "asr"), l(&[("speechrecog", 1)]));
    assert_eq!(loads(&h, "tts"), l(&[("speechsynth", 1)]));
    // Nobody offers a recorder: 503, nothing counted.
    h.recv(
        Call::udp("x1").peer,
        &invite_with(&Call::udp("x1"), &offer(&[("recorder", 9)]), &[]),
    );
    let mut out = h.out();
    take(&mut out, "503", |s| s.code() == Some(503));
    assert_eq!(loads(&h, "asr"), l(&[("speechrecog", 1)]));
}

#[test]
fn a_session_with_two_channels_needs_both_and_counts_both() {
    let dests = r#"
  - {id: asr, group: 1, uri: "sip:127.0.0.1:5080", resources: speechrecog=100}
  - {id: both, group: 1, uri: "sip:127.0.0.1:5090", resources: speechrecog=5;speechsynth=5}
"#;
    let mut h = Harness::with(dests, SDP_ROUTING);
    let mut call = Call::udp("two");
    let body = offer(&[("speechsynth", 9), ("speechrecog", 9)]);
    let inv = place_offer(&mut h, &call, &body);
    assert_eq!(inv.to(), addr(S2), "only 5090 has both");
    assert_eq!(
        inv.msg.body,
        body.as_bytes(),
        "the SDP goes through untouched"
    );
    assert_eq!(
        loads(&h, "both"),
        l(&[("speechrecog", 1), ("speechsynth", 1)])
    );
    accept(
        &mut h,
        &mut call,
        &inv,
        &answer_sdp(&[Some("speechsynth"), Some("speechrecog")]),
    );
    assert_eq!(
        loads(&h, "both"),
        l(&[("speechrecog", 1), ("speechsynth", 1)])
    );
    assert_eq!(loads(&h, "asr"), l(&[("speechrecog", 0)]));
    h.recv(call.peer, &call.bye());
    assert_eq!(
        loads(&h, "both"),
        l(&[("speechrecog", 0), ("speechsynth", 0)])
    );
}

#[test]
fn a_channel_the_server_rejects_is_released_at_the_answer() {
    let mut h = Harness::with(BOTH, SDP_ROUTING);
    let mut call = Call::udp("rej");
    let inv = place_offer(
        &mut h,
        &call,
        &offer(&[("speechsynth", 9), ("speechrecog", 9)]),
    );
    assert_eq!(inv.to(), addr(S1));
    assert_eq!(
        loads(&h, "big"),
        l(&[("speechrecog", 1), ("speechsynth", 1)])
    );
    accept(
        &mut h,
        &mut call,
        &inv,
        &answer_sdp(&[Some("speechsynth"), None]),
    );
    assert_eq!(
        loads(&h, "big"),
        l(&[("speechrecog", 0), ("speechsynth", 1)]),
        "the rejected recognizer channel is given back"
    );
    assert_eq!(h.proxy.dialog_stats().active, 1);
    h.recv(call.peer, &call.bye());
    assert_eq!(
        loads(&h, "big"),
        l(&[("speechrecog", 0), ("speechsynth", 0)])
    );
    assert_eq!(h.proxy.destinations().get(0).unwrap().open, 0);
}

#[test]
fn reinvites_add_and_remove_channels_on_the_same_server() {
    let mut h = Harness::with(BOTH, SDP_ROUTING);
    let mut call = Call::udp("re");
    let inv = place_offer(&mut h, &call, &offer(&[("speechsynth", 9)]));
    assert_eq!(inv.to(), addr(S1));
    accept(&mut h, &mut call, &inv, &answer_sdp(&[Some("speechsynth")]));
    assert_eq!(
        loads(&h, "big"),
        l(&[("speechrecog", 0), ("speechsynth", 1)])
    );

    // Adds a recognizer: counted on the same server, though 5090 is no fuller than it.
    let both = offer(&[("speechsynth", 9), ("speechrecog", 9)]);
    let both_answer = answer_sdp(&[Some("speechsynth"), Some("speechrecog")]);
    reinvite(&mut h, &mut call, &both, 200, &both_answer);
    assert_eq!(
        loads(&h, "big"),
        l(&[("speechrecog", 1), ("speechsynth", 1)])
    );
    assert_eq!(
        loads(&h, "small"),
        l(&[("speechrecog", 0), ("speechsynth", 0)])
    );

    // A refused re-INVITE changes nothing.
    let three = offer(&[("speechsynth", 9), ("speechrecog", 9), ("speechrecog", 9)]);
    reinvite(&mut h, &mut call, &three, 488, "");
    assert_eq!(
        loads(&h, "big"),
        l(&[("speechrecog", 1), ("speechsynth", 1)])
    );

    // The same channels again (a session refresh): nothing changes.
    reinvite(&mut h, &mut call, &both, 200, &both_answer);
    assert_eq!(
        loads(&h, "big"),
        l(&[("speechrecog", 1), ("speechsynth", 1)])
    );
    // A refresh without SDP: nothing changes either.
    reinvite(&mut h, &mut call, "", 200, "");
    assert_eq!(
        loads(&h, "big"),
        l(&[("speechrecog", 1), ("speechsynth", 1)])
    );

    // Removes the synthesizer (port 0).
    let synth_gone = offer(&[("speechsynth", 0), ("speechrecog", 9)]);
    reinvite(
        &mut h,
        &mut call,
        &synth_gone,
        200,
        &answer_sdp(&[None, Some("speechrecog")]),
    );
    assert_eq!(
        loads(&h, "big"),
        l(&[("speechrecog", 1), ("speechsynth", 0)])
    );
    assert_eq!(h.proxy.destinations().get(0).unwrap().open, 1);

    h.recv(call.peer, &call.bye());
    assert_eq!(
        loads(&h, "big"),
        l(&[("speechrecog", 0), ("speechsynth", 0)])
    );
    assert_eq!(h.proxy.destinations().get(0).unwrap().open, 0);
}

#[test]
fn a_406_fails_over_and_keeps_the_server_from_that_resource_for_a_probe_interval() {
    let mut h = Harness::with(BOTH, SDP_ROUTING);
    let mut call = Call::udp("na");
    let inv = place_offer(&mut h, &call, &offer(&[("speechsynth", 9)]));
    assert_eq!(inv.to(), addr(S1));
    let big = Uas::new(S1, "big");
    h.recv(big.peer, &big.reply(&inv.msg, 406, &[], ""));
    let mut out = h.out();
    take(&mut out, "ACK of the 406", |s| s.is(Method::Ack));
    let next = take(&mut out, "INVITE to the next server", |s| {
        s.is(Method::Invite)
    });
    assert_none(&out, "no 406 to the caller: it failed over");
    assert_eq!(next.to(), addr(S2));
    accept(
        &mut h,
        &mut call,
        &next,
        &answer_sdp(&[Some("speechsynth")]),
    );
    let st = status_of(&h, "big").unwrap();
    let synth = st
        .resources
        .iter()
        .find(|r| r.name == "speechsynth")
        .unwrap();
    assert!(synth.not_acceptable, "{st:?}");
    let recog = st
        .resources
        .iter()
        .find(|r| r.name == "speechrecog")
        .unwrap();
    assert!(
        !recog.not_acceptable,
        "only the session's resource is blamed"
    );
    assert_eq!(h.proxy.metrics().not_acceptable.get(), 1);

    // Synthesis goes to 5090 although 5080 is bigger; recognition still goes to 5080.
    let mut c2 = Call::udp("na2");
    let s2 = place_offer(&mut h, &c2, &offer(&[("speechsynth", 9)]));
    assert_eq!(s2.to(), addr(S2));
    accept(&mut h, &mut c2, &s2, &answer_sdp(&[Some("speechsynth")]));
    let mut c3 = Call::udp("na3");
    let r1 = place_offer(&mut h, &c3, &offer(&[("speechrecog", 9)]));
    assert_eq!(r1.to(), addr(S1));
    accept(&mut h, &mut c3, &r1, &answer_sdp(&[Some("speechrecog")]));

    // After a probe interval (10 s by default) 5080 is tried again for synthesis.
    h.advance_to(secs(11));
    h.out();
    let st = status_of(&h, "big").unwrap();
    assert!(st.resources.iter().all(|r| !r.not_acceptable), "{st:?}");
    let s3 = place_offer(&mut h, &Call::udp("na4"), &offer(&[("speechsynth", 9)]));
    assert_eq!(s3.to(), addr(S1));
}

#[test]
fn a_406_from_every_server_reaches_the_caller() {
    let mut h = Harness::with(BOTH, SDP_ROUTING);
    let call = Call::udp("all");
    let inv = place_offer(&mut h, &call, &offer(&[("speechsynth", 9)]));
    let first = Uas::new(&inv.to().to_string(), "a");
    h.recv(first.peer, &first.reply(&inv.msg, 406, &[], ""));
    let mut out = h.out();
    let next = take(&mut out, "INVITE to the next server", |s| {
        s.is(Method::Invite)
    });
    let second = Uas::new(&next.to().to_string(), "b");
    h.recv(second.peer, &second.reply(&next.msg, 406, &[], ""));
    let mut out = h.out();
    let final_ = take(&mut out, "406 to the caller", |s| s.code() == Some(406));
    final_.assert_to(&call.peer);
    assert_eq!(h.proxy.dialog_stats().failed, 1);
    for id in ["big", "small"] {
        assert!(loads(&h, id).iter().all(|(_, n)| *n == 0));
    }
}

#[test]
fn a_406_without_sdp_routing_or_with_not_acceptable_off_is_final() {
    for extra in [
        "routing:\n  resources: [speechsynth]\n",
        "routing:\n  resources: sdp\n  sdp:\n    notAcceptable: false\n",
    ] {
        let mut h = Harness::with(BOTH, extra);
        let call = Call::udp("off");
        let inv = place_offer(&mut h, &call, &offer(&[("speechsynth", 9)]));
        let srv = Uas::new(&inv.to().to_string(), "a");
        h.recv(srv.peer, &srv.reply(&inv.msg, 406, &[], ""));
        let mut out = h.out();
        take(&mut out, "406 to the caller", |s| s.code() == Some(406));
        assert!(
            out.iter().all(|s| !s.is(Method::Invite)),
            "{extra}: no failover"
        );
    }
}

#[test]
fn per_session_resources_are_taken_too() {
    let dests = r#"
  - {id: a, group: 1, uri: "sip:127.0.0.1:5080", resources: pstn=1;speechsynth=10}
  - {id: b, group: 1, uri: "sip:127.0.0.1:5090", resources: pstn=5;speechsynth=5}
"#;
    let mut h = Harness::with(
        dests,
        "routing:\n  resources: sdp\n  sdp:\n    perSession: [pstn]\n",
    );
    let first = place_offer(&mut h, &Call::udp("p1"), &offer(&[("speechsynth", 9)]));
    // a: min(1, 10) = 1 free; b: min(5, 5) = 5 free.
    assert_eq!(first.to(), addr(S2));
    assert_eq!(loads(&h, "b"), l(&[("pstn", 1), ("speechsynth", 1)]));
}

#[test]
fn offers_without_channel_take_the_fallback_or_get_488_and_bad_sdp_gets_400() {
    let audio_only = "v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 4000 RTP/AVP 0\r\n";
    // No fallback: 488, nothing kept.
    let mut h = Harness::with(BOTH, SDP_ROUTING);
    for (id, body) in [("n1", audio_only), ("n2", "")] {
        let call = Call::udp(id);
        h.recv(call.peer, &invite_with(&call, body, &[]));
        let mut out = h.out();
        let r = take(&mut out, "488", |s| s.code() == Some(488));
        assert!(reason_of(&r.msg).contains("No MRCP channel"));
        assert_none(&out, "after the 488");
    }
    assert_eq!(h.proxy.sizes(), (0, 0, 0), "nothing kept");
    // Unreadable SDP: 400 saying why.
    let bad = "v=0\r\nm=application 9 TCP/MRCPv2 1\r\na=setup:active\r\n";
    let call = Call::udp("bad");
    h.recv(call.peer, &invite_with(&call, bad, &[]));
    let mut out = h.out();
    let r = take(&mut out, "400", |s| s.code() == Some(400));
    assert!(
        reason_of(&r.msg).contains("a=resource"),
        "{:?}",
        reason_of(&r.msg)
    );
    let bad_offers = h
        .proxy
        .metrics()
        .sdp_offers
        .with_label_values(&["bad"])
        .get();
    assert_eq!(bad_offers, 1);

    // With a fallback, the audio-only offer is counted against it.
    let mut h = Harness::with(
        BOTH,
        "routing:\n  resources: sdp\n  sdp:\n    fallback: [speechrecog]\n",
    );
    let inv = place_offer(&mut h, &Call::udp("fb"), audio_only);
    assert_eq!(inv.to(), addr(S1));
    assert_eq!(
        loads(&h, "big"),
        l(&[("speechrecog", 1), ("speechsynth", 0)])
    );
}

#[test]
fn a_listener_with_its_own_list_ignores_the_sdp() {
    let yaml = format!(
        "listeners:
  - udp:127.0.0.1:5060
  - address: tcp:127.0.0.1:5060
    resources: [speechsynth]
routing:
  resources: sdp
destinations:{BOTH}"
    );
    let cfg = Config::from_yaml(&yaml).unwrap();
    let dests = Destinations::from_set(cfg.destinations.as_ref().unwrap()).unwrap();
    let now = Instant::now();
    let mut h = Harness {
        proxy: Proxy::new(Arc::new(cfg), dests),
        start: now,
        now,
    };
    // Over TCP a recognizer offer still counts as one speechsynth.
    place_offer(&mut h, &Call::tcp("t"), &offer(&[("speechrecog", 9)]));
    assert_eq!(
        loads(&h, "big"),
        l(&[("speechrecog", 0), ("speechsynth", 1)])
    );
}

#[test]
fn pools_send_sessions_to_a_group_by_user_part_or_header() {
    let dests = r#"
  - {id: en, group: 1, uri: "sip:127.0.0.1:5080", resources: speechrecog=10}
  - {id: de, group: 2, uri: "sip:127.0.0.1:5090", resources: speechrecog=10}
  - {id: fr, group: 3, uri: "sip:127.0.0.1:5070", resources: speechrecog=10}
"#;
    let extra = "routing:
  resources: sdp
  pools:
    - user: \"^de(-|$)\"
      group: 2
    - header: X-Language
      value: \"^fr\"
      group: 3
";
    let mut h = Harness::with(dests, extra);
    let recog = offer(&[("speechrecog", 9)]);
    let mut de = Call::udp("de");
    de.ruri = "sip:de-DE@127.0.0.1:5060".into();
    assert_eq!(place_offer(&mut h, &de, &recog).to(), addr(S2));
    let fr = Call::udp("fr");
    h.recv(
        fr.peer,
        &invite_with(&fr, &recog, &[("x-language", "fr-FR".into())]),
    );
    let mut out = h.out();
    let inv = take(&mut out, "INVITE", |s| s.is(Method::Invite));
    assert_eq!(inv.to(), addr("127.0.0.1:5070"));
    // No rule matches (no user part, like UniMRCP's client): the listener's group.
    let plain = place_offer(&mut h, &Call::udp("plain"), &recog);
    assert_eq!(plain.to(), addr(S1));
    let mut dex = Call::udp("dex");
    dex.ruri = "sip:dexter@127.0.0.1:5060".into();
    assert_eq!(place_offer(&mut h, &dex, &recog).to(), addr(S1));
}

#[test]
fn pool_and_resource_settings_name_the_field_and_the_value() {
    let cases = [
        ("routing:\n  resources: sdq\n", "routing.resources", "sdq"),
        (
            "routing:\n  resources: []\n",
            "routing.resources",
            "at least one",
        ),
        (
            "routing:\n  resources: [\"speech recog\"]\n",
            "routing.resources[0]",
            "speech recog",
        ),
        (
            "routing:\n  sdp:\n    perSession: [\"a:b\"]\n",
            "routing.sdp.perSession[0]",
            "a:b",
        ),
        (
            "routing:\n  sdp:\n    notAcceptible: true\n",
            "routing.sdp",
            "notAcceptible",
        ),
        (
            "routing:\n  pools:\n    - user: \"(de\"\n      group: 2\n",
            "routing.pools[0].user",
            "(de",
        ),
        (
            "routing:\n  pools:\n    - header: X-Lang\n      group: 2\n",
            "routing.pools[0].value",
            "needs",
        ),
        (
            "routing:\n  pools:\n    - group: 2\n",
            "routing.pools[0]",
            "needs `user`",
        ),
        (
            "routing:\n  pools:\n    - header: \"X Lang\"\n      value: x\n      group: 2\n",
            "routing.pools[0].header",
            "X Lang",
        ),
    ];
    for (extra, field, value) in cases {
        let yaml = format!("listeners:\n  - udp:127.0.0.1:5060\n{extra}");
        let e = Config::from_yaml(&yaml).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains(value), "{extra:?}: {e}");
    }
}
