//! lb-proxy's own lazy message layer against rsip (a full typed SIP model, the conformance
//! oracle of the unit tests) on the same captured messages: what reading a message costs the
//! proxy, and what a fully typed parse would.
//!
//!   cargo bench -p lb-proxy --bench parse
//!
//! Messages: the sipp client's INVITE with its MRCP SDP offer and the server's 200 with
//! Record-Route, captured on the wire (fuzz/corpus/sip_datagram/). "read" parses and then reads
//! what the proxy reads of every message (top Via and its branch, Call-ID, CSeq, From and To
//! tags, Max-Forwards).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lb_proxy::sip::Message;
use std::hint::black_box;
use std::path::Path;

fn corpus(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus/sip_datagram")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    for name in ["sipp-uac-invite-sdp.sip", "sipp-uas-200-record-route.sip"] {
        let data = corpus(name);
        g.bench_with_input(BenchmarkId::new("lb-proxy", name), &data, |b, d| {
            b.iter(|| Message::parse(black_box(d)).map(|m| m.headers.len()))
        });
        g.bench_with_input(BenchmarkId::new("lb-proxy-read", name), &data, |b, d| {
            b.iter(|| {
                let m = Message::parse(black_box(d)).unwrap_or_else(|e| panic!("{e}"));
                let via = m.top_via().map(|v| v.branch().map(str::len));
                (
                    via,
                    m.call_id().map(str::len),
                    m.cseq(),
                    m.from_tag().map(str::len),
                    m.to_tag().map(str::len),
                    m.max_forwards(),
                )
            })
        });
        g.bench_with_input(BenchmarkId::new("rsip", name), &data, |b, d| {
            b.iter(|| rsip::SipMessage::try_from(black_box(d.as_slice())).map(|m| m.is_request()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
