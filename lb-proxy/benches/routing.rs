//! Routing microbenchmark: `lb_proxy::routing::choose` over 2, 100 and 1000 real destinations
//! (`Destinations` built from a destination set, as the proxy holds them).
//!
//!   cargo bench -p lb-proxy --bench routing
//!
//! Two cases per size: `varied` (loads differ, one destination is the best) and `idle` (every
//! destination tied, so the random tie-break runs over all of them: the worst case).
//! `make bench` runs it with a shorter measurement and copies the figures to BENCHMARKS.md.

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

fn bench_choose(c: &mut Criterion) {
    let pstn = vec!["pstn".to_string()];
    let mut group = c.benchmark_group("choose");
    for n in SIZES {
        // Loads spread over 0..99 so that one destination has the most free channels.
        let mut varied = destinations(n);
        for (i, d) in varied.slots.iter_mut().enumerate() {
            d.resources[0].load = ((i * 37 + 11) % 97) as u32 + 1;
        }
        if let Some(d) = varied.slots.last_mut() {
            d.resources[0].load = 0;
        }
        let idle = destinations(n);
        group.throughput(Throughput::Elements(n as u64));
        for (case, dests) in [("varied", &varied), ("idle", &idle)] {
            let mut rng = SmallRng::seed_from_u64(7);
            group.bench_with_input(BenchmarkId::new(case, n), &dests.slots, |b, slots| {
                b.iter(|| {
                    let want = Want {
                        group: 1,
                        resources: &pstn,
                    };
                    black_box(choose(
                        black_box(slots.as_slice()),
                        want,
                        &[],
                        Policy::default(),
                        &mut rng,
                    ))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_choose);
criterion_main!(benches);
