//! Load distribution through the real proxy, driven by sipp: capacities 100 and 50,
//! 2-second calls at 50 calls/s for 10 s (about 100 calls open at once).
//!
//! Needs `sipp` (Debian package `sip-tester`). Run: `cargo test -p lb-proxy --test sipp_routing`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mrcp_lb_test_support::*;
use std::time::Duration;

const RATE: &str = "50";
const CALLS: u64 = 500;
const CALL_MS: &str = "2000";

struct Run {
    client: SippReport,
    s1: SippReport,
    s2: SippReport,
    samples: Vec<LoadSample>,
}

fn run_load(env: &TestEnv, mode: &str) -> Run {
    let (mut proxy, [s1, s2]) = Sandbox::new(env)
        .mode(mode)
        .serve(Dest::udp(1, SERVER1_PORT, "pstn=100"), "uas.xml")
        .serve(Dest::udp(2, SERVER2_PORT, "pstn=50"), "uas.xml")
        .start();

    let sampler = LoadSampler::start(proxy.admin, Duration::from_millis(250));
    let client = Sipp::uac(env, "client")
        .timeout(secs(60))
        .rate(RATE)
        .calls(CALLS)
        .limit(300)
        .args(["-d", CALL_MS])
        .start();
    let client = client.wait(Duration::from_secs(60));
    let samples = sampler.finish();
    proxy.assert_running();
    eprintln!("{}", client.summary());

    let [s1, s2] = drain([s1, s2]);
    eprintln!("{}\n{}", s1.summary(), s2.summary());
    proxy.wait_idle(Duration::from_secs(10));
    Run {
        client,
        s1,
        s2,
        samples,
    }
}

/// Mean load of each destination over the samples taken while the traffic is steady:
/// from 4 s after the first call (2 s of ramp-up plus margin) to 9 s (calls start for 10 s).
fn steady_means(samples: &[LoadSample]) -> (f64, f64, usize) {
    let first = samples
        .iter()
        .find(|s| s.loads.values().sum::<u64>() > 0)
        .map(|s| s.at)
        .expect("no sample ever showed load: is load reported?");
    let window: Vec<&LoadSample> = samples
        .iter()
        .filter(|s| {
            s.at >= first + Duration::from_secs(4) && s.at <= first + Duration::from_secs(9)
        })
        .collect();
    assert!(
        window.len() >= 8,
        "only {} load samples in the steady window",
        window.len()
    );
    let mean = |id: &str| {
        window
            .iter()
            .map(|s| *s.loads.get(id).unwrap_or(&0) as f64)
            .sum::<f64>()
            / window.len() as f64
    };
    (mean("1"), mean("2"), window.len())
}

// Whatever the exact number of open calls (sipp's pace varies a little), each mode keeps its
// own quantity level across the destinations; the other mode's is far off (about 16 free
// calls apart, or 0.25 apart in used fraction, at 100 open calls).

/// Absolute mode: free capacity (capacity - load) equal on both destinations.
fn free_capacity_gap(m1: f64, m2: f64) -> f64 {
    (100.0 - m1) - (50.0 - m2)
}

/// Relative mode: used fraction of capacity equal on both destinations.
fn used_fraction_gap(m1: f64, m2: f64) -> f64 {
    m1 / 100.0 - m2 / 50.0
}

fn print_samples(samples: &[LoadSample]) {
    for s in samples.iter().step_by(4) {
        eprintln!(
            "  t={:5.2}s loads={:?} active={}",
            s.at.as_secs_f64(),
            s.loads,
            s.stats.active
        );
    }
}

#[test]
fn absolute_mode_levels_free_capacity_75_25() {
    let env = test_env!("absolute_mode", "127.0.1.1");
    let run = run_load(&env, "absolute");
    print_samples(&run.samples);

    run.client.assert_all_ok(CALLS);
    assert_server_clean(&run.s1);
    assert_server_clean(&run.s2);
    assert_eq!(
        run.s1.invites() + run.s2.invites(),
        CALLS,
        "servers took {} + {} INVITEs",
        run.s1.invites(),
        run.s2.invites()
    );

    // Absolute mode sends each call where the most capacity is free: with ~100 calls open
    // on capacities 100 and 50, free capacity levels at 25 each: loads 75 and 25.
    let (m1, m2, n) = steady_means(&run.samples);
    eprintln!("steady mean loads over {n} samples: dest1={m1:.1} dest2={m2:.1}");
    assert!(
        (60.0..=90.0).contains(&m1) && (10.0..=40.0).contains(&m2),
        "absolute mode: steady loads should be near 75/25, got {m1:.1}/{m2:.1}"
    );
    let gap = free_capacity_gap(m1, m2);
    assert!(
        gap.abs() <= 4.0,
        "absolute mode: free capacity should level out (100-{m1:.1} vs 50-{m2:.1}), \
         differs by {gap:.1}"
    );
}

#[test]
fn relative_mode_splits_calls_2_to_1() {
    let env = test_env!("relative_mode", "127.0.1.2");
    let run = run_load(&env, "relative");
    print_samples(&run.samples);

    run.client.assert_all_ok(CALLS);
    assert_server_clean(&run.s1);
    assert_server_clean(&run.s2);
    let (c1, c2) = (run.s1.invites(), run.s2.invites());
    assert_eq!(c1 + c2, CALLS, "servers took {c1} + {c2} INVITEs");

    // Relative mode keeps the same fraction of each capacity in use: calls split 100:50.
    let ratio = c1 as f64 / c2.max(1) as f64;
    eprintln!("relative mode: server1 took {c1}, server2 took {c2} (ratio {ratio:.2})");
    assert!(
        (1.8..=2.2).contains(&ratio),
        "relative mode: calls should split 2:1 (within 10%), got {c1}:{c2} = {ratio:.2}"
    );
    let (m1, m2, n) = steady_means(&run.samples);
    eprintln!("steady mean loads over {n} samples: dest1={m1:.1} dest2={m2:.1}");
    let gap = used_fraction_gap(m1, m2);
    assert!(
        gap.abs() <= 0.06,
        "relative mode: used fractions should level out ({m1:.1}/100 vs {m2:.1}/50), \
         differ by {gap:.3}"
    );
}
