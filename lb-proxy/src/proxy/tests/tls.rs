//! SIP over TLS through the core: both sides on TLS, server names, listeners.

use super::*;

#[test]
fn tls_call_stays_on_tls_both_sides() {
    let mut h = tls_harness(
        r#"
  - {id: 1, group: 1, uri: "sip:127.0.0.1:5081;transport=tls", resources: pstn=100}
"#,
    );
    let mut call = tls_call("t1");
    let inv = place(&mut h, &call);
    let server = Peer {
        transport: Transport::Tls,
        listener: TLS_L,
        addr: addr("127.0.0.1:5081"),
        conn: None,
    };
    inv.assert_to(&server);
    assert_eq!(
        inv.out.server_name.as_deref(),
        Some("127.0.0.1"),
        "the certificate is checked against the URI host"
    );
    let via = &inv.vias()[0];
    assert_eq!(
        (&*via.transport, &*via.host, via.port),
        ("TLS", "127.0.0.1", Some(5061))
    );
    assert_eq!(via.param("rport"), None, "no rport over a stream");
    assert_eq!(
        inv.all(HeaderName::RecordRoute),
        vec!["<sip:127.0.0.1:5061;transport=tls;lr>".to_string()],
        "one entry: both sides use the TLS listener"
    );
    assert_eq!(inv.ruri(), "sip:service@127.0.0.1:5081;transport=tls");

    // Reliable transport: no retransmission of the INVITE at T1, 2T1...
    h.advance_to(ms(2900));
    assert_none(&h.out(), "no retransmission over TLS");

    // The server answers on the connection the INVITE opened; the 200 goes back on the
    // caller's own TLS connection.
    let srv = Uas {
        peer: Peer {
            conn: Some(11),
            ..server
        },
        tag: "srv-t1".into(),
        record_route: Vec::new(),
    };
    let ok = answer(&mut h, &mut call, &srv, &inv, &[]);
    ok.assert_to(&call.peer);
    assert_eq!(h.proxy.dialog_stats().active, 1);

    h.recv(call.peer, &call.bye());
    let mut out = h.out();
    let bye = take(&mut out, "BYE", |s| s.is(Method::Bye));
    bye.assert_to(&server);
    assert_eq!(bye.out.server_name.as_deref(), Some("127.0.0.1"));
    assert_eq!(bye.vias()[0].transport, "TLS");
    h.recv(srv.peer, &response(&bye.msg, 200, None, &[], ""));
    let mut out = h.out();
    let ok = take(&mut out, "200 to BYE", |s| s.code() == Some(200));
    ok.assert_to(&call.peer);
    assert_eq!(ok.out.server_name, None, "a client is not verified by name");
    let st = h.proxy.dialog_stats();
    assert_eq!((st.active, st.processed, st.failed), (0, 1, 0));
    assert_eq!(h.load(0), 0);
}

#[test]
fn tls_server_name_is_the_destination_host_name() {
    let mut h = tls_harness(
        r#"
  - {id: a, group: 1, uri: "sips:mrcp-a.speech.example", resources: pstn=100}
"#,
    );
    let d = h.proxy.destinations_mut().get_mut(0).unwrap();
    assert_eq!(d.transport, Transport::Tls, "sips: is TLS");
    d.addr = Some(addr("127.0.0.3:5061"));
    let call = Call::udp("t2");
    let inv = place(&mut h, &call);
    inv.assert_to(&Peer {
        transport: Transport::Tls,
        listener: TLS_L,
        addr: addr("127.0.0.3:5061"),
        conn: None,
    });
    assert_eq!(
        inv.out.server_name.as_deref(),
        Some("mrcp-a.speech.example")
    );
    let rr = inv.all(HeaderName::RecordRoute);
    assert_eq!(
        rr,
        vec![
            "<sip:127.0.0.1:5061;transport=tls;lr;r2=on>".to_string(),
            "<sip:127.0.0.1:5060;transport=udp;lr;r2=on>".to_string()
        ],
        "two entries: the caller came over UDP"
    );
}

#[test]
fn a_tls_destination_without_a_tls_listener_is_invalid() {
    let e = Config::from_yaml(
        "listeners: [\"udp:127.0.0.1:5060\"]\ndestinations:\n - {id: 1, uri: \"sips:127.0.0.1\", resources: pstn=1}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("destinations[0].uri") && e.contains("no tls listener"),
        "{e}"
    );
}
