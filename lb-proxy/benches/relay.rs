//! The cost of the relay rule's proof: signing the Record-Route token of a new call (once per
//! forwarded INVITE) and checking one (per in-dialog request of a dialog the proxy does not
//! hold: after a restart, or another replica's).
//!
//!   cargo bench -p lb-proxy --bench relay

use criterion::{criterion_group, criterion_main, Criterion};
use lb_proxy::config::Key;
use lb_proxy::proxy::RouteKeys;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

fn bench(c: &mut Criterion) {
    let keys = RouteKeys::new(vec![Key(b"bench-key-0123456789abcdef".to_vec())]);
    let addr: SocketAddr = "10.1.2.3:8060".parse().unwrap_or_else(|e| panic!("{e}"));
    let call_id = "4a6f2c1e-0b9d-4c44-9a51-2f3e6d7c8b90@10.0.0.5";
    let tag = "1234567890SIPpTag001";
    let dest = "speech/unimrcp-asr-3";
    c.bench_function("relay/sign", |b| {
        b.iter(|| keys.sign(black_box(call_id), black_box(tag), black_box(dest), addr))
    });
    let token = keys
        .sign(call_id, tag, dest, addr)
        .unwrap_or_else(|| panic!("a key signs"));
    let now = Instant::now();
    c.bench_function("relay/check", |b| {
        b.iter(|| keys.check(now, black_box(&token), call_id, tag, dest))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
