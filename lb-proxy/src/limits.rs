//! Per-source limits: the source key (an IPv4 address, or the /64 of an IPv6 one) and the
//! per-source rate limiter of new requests (Kamailio's `pike`, as a token bucket).
//!
//! The limiter lives in the proxy core (one task), so it needs no lock. Its table is allocated
//! once at its full size (`maxSources` entries) and never grows: a new request costs one hash
//! lookup (SipHash with a random key, so that sources cannot be chosen to collide) and, for a
//! source not seen lately, one insert into space already there.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::config::PerSource;

/// The key sources are counted by: the IPv4 address, or the /64 prefix of an IPv6 address (a
/// single host usually holds a whole /64).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
    }
}

/// What the limiter says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// The source is over its rate.
    Limit,
    /// The table is full of sources active right now: this new one is let through untracked.
    Untracked,
}

/// Token buckets per source, as GCRA: each source keeps only its "theoretical arrival time"
/// (TAT). A request at `t` is allowed when `TAT - t <= tolerance`, and pushes TAT on by one
/// emission interval. A source whose TAT has passed has a full bucket: its entry carries no
/// information and is dropped when room is needed.
pub struct SourceLimiter {
    /// Window / rate, in microseconds.
    interval: u64,
    /// (burst - 1) × interval: how far ahead of now a source's TAT may run.
    tolerance: u64,
    max: usize,
    table: HashMap<IpAddr, u64, RandomState>,
    /// Time zero of the TATs: the first request's time.
    epoch: Option<Instant>,
    /// When full entries were last swept out (µs since epoch).
    last_sweep: u64,
}

/// Sweeping a full table costs a pass over it: at most once per this long.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

impl SourceLimiter {
    pub fn new(cfg: &PerSource) -> SourceLimiter {
        let window = u64::try_from(cfg.window.as_micros()).unwrap_or(u64::MAX);
        let interval = (window / u64::from(cfg.rate.max(1))).max(1);
        SourceLimiter {
            interval,
            tolerance: interval.saturating_mul(u64::from(cfg.burst.max(1) - 1)),
            max: cfg.max_sources,
            table: HashMap::with_capacity_and_hasher(cfg.max_sources, RandomState::new()),
            epoch: None,
            last_sweep: 0,
        }
    }

    fn micros(&mut self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(now);
        u64::try_from(now.saturating_duration_since(epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// Counts one request from `ip` at `now`.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        let t = self.micros(now);
        let key = source_key(ip);
        if self.table.len() >= self.max && !self.table.contains_key(&key) {
            self.sweep(t);
            if self.table.len() >= self.max {
                return Verdict::Untracked;
            }
        }
        match self.table.entry(key) {
            Entry::Occupied(mut e) => {
                let tat = (*e.get()).max(t);
                if tat - t > self.tolerance {
                    return Verdict::Limit;
                }
                *e.get_mut() = tat + self.interval;
                Verdict::Allow
            }
            Entry::Vacant(e) => {
                e.insert(t + self.interval);
                Verdict::Allow
            }
        }
    }

    /// Drops the entries whose bucket is full again (at most once per [`SWEEP_EVERY`]).
    fn sweep(&mut self, t: u64) {
        let every = u64::try_from(SWEEP_EVERY.as_micros()).unwrap_or(u64::MAX);
        if self.last_sweep != 0 && t.saturating_sub(self.last_sweep) < every {
            return;
        }
        self.last_sweep = t.max(1);
        self.table.retain(|_, tat| *tat > t);
    }

    /// Sources tracked now (some may have full buckets, waiting to be swept).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Entries the table holds without allocating.
    pub fn capacity(&self) -> usize {
        self.table.capacity()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{RateAction, RateScope};

    fn cfg(rate: u32, window_ms: u64, burst: u32, max: usize) -> PerSource {
        PerSource {
            rate,
            window: Duration::from_millis(window_ms),
            burst,
            scope: RateScope::Invite,
            action: RateAction::Reject,
            max_sources: max,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(&cfg(10, 1000, 5, 100));
        let a = ip("10.0.0.1");
        for i in 0..5 {
            assert_eq!(l.check(a, t0), Verdict::Allow, "burst request {i}");
        }
        assert_eq!(l.check(a, t0), Verdict::Limit, "the 6th at once");
        assert_eq!(
            l.check(ip("10.0.0.2"), t0),
            Verdict::Allow,
            "another source"
        );
        // One token comes back every 100 ms.
        assert_eq!(l.check(a, t0 + Duration::from_millis(99)), Verdict::Limit);
        assert_eq!(l.check(a, t0 + Duration::from_millis(100)), Verdict::Allow);
        assert_eq!(l.check(a, t0 + Duration::from_millis(101)), Verdict::Limit);
        // Sustained at the rate: 10 a second for 10 seconds, all allowed.
        let mut allowed = 0;
        for i in 0..100u64 {
            let t = t0 + Duration::from_millis(1000 + i * 100);
            if l.check(a, t) == Verdict::Allow {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 100);
        // Twice the rate: half get through (after the burst refills).
        let mut l = SourceLimiter::new(&cfg(10, 1000, 1, 100));
        let allowed = (0..200u64)
            .filter(|i| l.check(a, t0 + Duration::from_millis(i * 50)) == Verdict::Allow)
            .count();
        assert_eq!(allowed, 100);
    }

    #[test]
    fn table_stays_bounded_and_reuses_idle_entries() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(&cfg(1, 1000, 1, 64));
        let cap = l.capacity();
        // A flood from many sources: the table never grows past its size.
        for i in 0..10_000u32 {
            let src = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.check(src, t0 + Duration::from_micros(u64::from(i)));
            assert!(l.len() <= 64);
        }
        assert_eq!(l.capacity(), cap, "no reallocation");
        // Full of sources active within the last second: a newcomer goes untracked.
        assert_eq!(
            l.check(ip("192.168.1.1"), t0 + Duration::from_millis(20)),
            Verdict::Untracked
        );
        // A second later every bucket is full again: the sweep makes room.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(l.check(ip("192.168.1.1"), later), Verdict::Allow);
        assert_eq!(l.len(), 1);
        assert_eq!(l.check(ip("192.168.1.1"), later), Verdict::Limit);
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        assert_eq!(source_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(source_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(&cfg(1, 1000, 1, 10));
        assert_eq!(l.check(ip("2001:db8::1"), t0), Verdict::Allow);
        assert_eq!(l.check(ip("2001:db8::2"), t0), Verdict::Limit, "same /64");
        assert_eq!(l.check(ip("2001:db8:0:1::1"), t0), Verdict::Allow);
    }
}
