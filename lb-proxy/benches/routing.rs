//! Routing microbenchmark over 2, 100 and 1000 real destinations (`Destinations` built from a
//! destination set, as the proxy holds them).
//!
//!   cargo bench -p lb-proxy --bench routing
//!
//! Two loads per size: `varied` (loads differ, one destination is the best) and `idle` (every
//! destination tied, so the random tie-break runs over all of them: the scan's worst case).
//!
//! - `choose`: the choice as the proxy makes it, `Destinations::choose` through the routing
//!   index;
//! - `call`: that choice plus the `acquire` and `release` of the chosen destination, each of
//!   which moves it in the index (what a call costs the index over its life);
//! - `scan`: the reference scan `lb_proxy::routing::choose` over every slot (what `choose` cost
//!   before the index).
//!
//! `make bench` runs it with a shorter measurement and copies the `choose` figures to
//! BENCHMARKS.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lb_api::{DesiredState, DestinationSet, DestinationSpec, ProbeMode, Resources};
use lb_proxy::destinations::Destinations;
use lb_proxy::routing::{choose, Policy, Want};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use std::hint::black_box;

const SIZES: [usize; 3] = [2, 100, 1000];

/// `n` destinations in group 1 with `pstn=100;tts=20`, as the operator would push them.
fn destinations(n: usize) -> Destinations {
    let set = DestinationSet {
        version: 1,
        destinations: (0..n)
            .map(|i| DestinationSpec {
                id: format!("mrcp-{i}"),
                group: 1,
                uri: format!("sip:10.{}.{}.{}:8060", i / 65536, (i / 256) % 256, i % 256),
                resources: Resources::new(vec![("pstn".to_string(), 100), ("tts".to_string(), 20)]),
                probe_mode: ProbeMode::Always,
                state: DesiredState::Active,
            })
            .collect(),
        peers: None,
    };
    match Destinations::from_set(&set) {
        Ok(d) => d,
        Err(e) => panic!("destination set: {e}"),
    }
}

/// Loads spread over 1..97 so that one destination (the last, at 0) has the most free
/// channels.
fn varied(n: usize) -> Destinations {
    let mut d = destinations(n);
    for slot in 0..n {
        if let Some(x) = d.get_mut(slot) {
            x.resources[0].load = if slot + 1 == n {
                0
            } else {
                ((slot * 37 + 11) % 97) as u32 + 1
            };
        }
    }
    d
}

fn bench_routing(c: &mut Criterion) {
    let pstn = vec!["pstn".to_string()];
    let want = Want {
        group: 1,
        resources: &pstn,
    };
    for name in ["choose", "call", "scan"] {
        let mut group = c.benchmark_group(name);
        for n in SIZES {
            group.throughput(Throughput::Elements(n as u64));
            for (case, mut dests) in [("varied", varied(n)), ("idle", destinations(n))] {
                let mut rng = SmallRng::seed_from_u64(7);
                let id = BenchmarkId::new(case, n);
                match name {
                    "choose" => group.bench_function(id, |b| {
                        b.iter(|| black_box(dests.choose(want, &[], Policy::default(), &mut rng)))
                    }),
                    "call" => group.bench_function(id, |b| {
                        b.iter(|| {
                            let s = dests.choose(want, &[], Policy::default(), &mut rng);
                            if let Some(s) = s {
                                dests.acquire(s, &pstn);
                                dests.release(s, &pstn);
                            }
                            black_box(s)
                        })
                    }),
                    _ => group.bench_function(id, |b| {
                        b.iter(|| {
                            black_box(choose(
                                black_box(dests.as_slice()),
                                want,
                                &[],
                                Policy::default(),
                                &mut rng,
                            ))
                        })
                    }),
                };
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_routing);
criterion_main!(benches);
