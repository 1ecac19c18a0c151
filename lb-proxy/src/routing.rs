//! Where a new call goes: the least-loaded choice of OpenSIPS `load_balancer`, as a pure
//! function over a snapshot of the destinations.
//!
//! For each candidate (right group, offers every requested resource, usable, not tried yet for
//! this call) the availability of each requested resource is `capacity - load` (absolute mode)
//! or the free share of the capacity (relative mode); the candidate's availability is the
//! minimum over the requested resources. The highest availability wins; ties are broken at
//! random so that equal servers share calls instead of the first one taking them all.
//!
//! [`choose`] is the scan over every destination, and the reference; the proxy chooses through
//! [`Index`] (`Destinations::choose`), which keeps the candidates ordered by availability and
//! gives the same answer without the scan.

use rand::Rng;

mod index;

pub use index::{Index, MAX_ORDERS};

/// Capacity and current load of one resource on one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub capacity: u32,
    pub load: u32,
}

/// What the routing choice needs to know of a destination.
pub trait Candidate {
    fn group(&self) -> u32;
    /// Up and enabled: may take new calls.
    fn usable(&self) -> bool;
    fn resource(&self, name: &str) -> Option<Capacity>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// Free channels: `capacity - load`.
    #[default]
    Absolute,
    /// Free share of the capacity, so calls split in proportion to capacity.
    Relative,
}

/// The routing policy in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    pub mode: Mode,
    /// Choose a destination even when it has no free capacity left.
    pub allow_over_capacity: bool,
}

/// What one call asks for.
#[derive(Debug, Clone, Copy)]
pub struct Want<'a> {
    pub group: u32,
    pub resources: &'a [String],
}

/// Availability in a unit comparable across destinations: channels (absolute) or parts per
/// million of capacity (relative).
pub(crate) fn availability(c: Capacity, mode: Mode) -> i64 {
    let free = i64::from(c.capacity) - i64::from(c.load);
    match mode {
        Mode::Absolute => free,
        Mode::Relative if c.capacity == 0 => i64::MIN / 2,
        Mode::Relative => free * 1_000_000 / i64::from(c.capacity),
    }
}

/// The availability of `d` for a call of `group` asking for `resources` (the minimum over
/// them; a resource listed k times needs k units), or None when `d` is no candidate at all: another group, not usable, lacking a
/// resource, or nothing asked for. The scan and the index both rank by it.
pub(crate) fn standing<C: Candidate>(
    d: &C,
    group: u32,
    resources: &[String],
    mode: Mode,
) -> Option<i64> {
    if resources.is_empty() || d.group() != group || !d.usable() {
        return None;
    }
    let mut avail = i64::MAX;
    for r in resources {
        let mut c = d.resource(r)?;
        // A resource asked for k times (two recognizer channels in one session) needs k
        // free units: what is free after the other k - 1 are taken.
        let others = resources
            .iter()
            .filter(|x| *x == r)
            .count()
            .saturating_sub(1);
        c.load = c
            .load
            .saturating_add(u32::try_from(others).unwrap_or(u32::MAX));
        avail = avail.min(availability(c, mode));
    }
    Some(avail)
}

/// Picks the index of the destination for a new call, or `None` when no candidate is left.
/// `tried` holds the indices already tried for this call. A scan over `dests`: the reference
/// for [`Index::choose`].
pub fn choose<C: Candidate>(
    dests: &[C],
    want: Want<'_>,
    tried: &[usize],
    policy: Policy,
    rng: &mut impl Rng,
) -> Option<usize> {
    let mut best: Option<(i64, usize)> = None;
    let mut ties = 0u32;
    for (i, d) in dests.iter().enumerate() {
        let Some(avail) = standing(d, want.group, want.resources, policy.mode) else {
            continue;
        };
        if tried.contains(&i) || (avail <= 0 && !policy.allow_over_capacity) {
            continue;
        }
        match best {
            Some((b, _)) if avail < b => {}
            Some((b, _)) if avail == b => {
                // Reservoir sampling: each of the k tied candidates wins with probability 1/k.
                ties += 1;
                if rng.gen_range(0..ties) == 0 {
                    best = Some((avail, i));
                }
            }
            _ => {
                best = Some((avail, i));
                ties = 1;
            }
        }
    }
    best.map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[derive(Clone)]
    struct D {
        group: u32,
        usable: bool,
        res: Vec<(&'static str, u32, u32)>,
    }

    impl Candidate for D {
        fn group(&self) -> u32 {
            self.group
        }
        fn usable(&self) -> bool {
            self.usable
        }
        fn resource(&self, name: &str) -> Option<Capacity> {
            self.res
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|&(_, capacity, load)| Capacity { capacity, load })
        }
    }

    fn d(res: &[(&'static str, u32, u32)]) -> D {
        D {
            group: 1,
            usable: true,
            res: res.to_vec(),
        }
    }

    fn pstn() -> Vec<String> {
        vec!["pstn".to_string()]
    }

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(7)
    }

    fn pick(dests: &[D], res: &[String], tried: &[usize], policy: Policy) -> Option<usize> {
        let want = Want {
            group: 1,
            resources: res,
        };
        choose(dests, want, tried, policy, &mut rng())
    }

    #[test]
    fn seed_document_worked_example() {
        // 100 and 50 channels, 20 and 10 used: 80 and 40 free, the first wins.
        let dests = [d(&[("pstn", 100, 20)]), d(&[("pstn", 50, 10)])];
        assert_eq!(pick(&dests, &pstn(), &[], Policy::default()), Some(0));
    }

    #[test]
    fn absolute_mode_takes_most_free_channels() {
        let dests = [d(&[("pstn", 100, 80)]), d(&[("pstn", 50, 10)])];
        assert_eq!(pick(&dests, &pstn(), &[], Policy::default()), Some(1));
    }

    #[test]
    fn relative_mode_takes_largest_free_share() {
        // 100 with 40 used is 60% free; 50 with 15 used is 70% free.
        let dests = [d(&[("pstn", 100, 40)]), d(&[("pstn", 50, 15)])];
        let relative = Policy {
            mode: Mode::Relative,
            ..Policy::default()
        };
        assert_eq!(pick(&dests, &pstn(), &[], relative), Some(1));
        assert_eq!(pick(&dests, &pstn(), &[], Policy::default()), Some(0));
    }

    #[test]
    fn relative_mode_converges_to_capacity_ratio() {
        let mut dests = [d(&[("pstn", 100, 0)]), d(&[("pstn", 50, 0)])];
        let relative = Policy {
            mode: Mode::Relative,
            ..Policy::default()
        };
        let mut r = rng();
        let res = pstn();
        for _ in 0..90 {
            let want = Want {
                group: 1,
                resources: &res,
            };
            let i = choose(&dests, want, &[], relative, &mut r).unwrap();
            dests[i].res[0].2 += 1;
        }
        assert_eq!((dests[0].res[0].2, dests[1].res[0].2), (60, 30));
    }

    #[test]
    fn multi_resource_uses_the_minimum() {
        // A: pstn 90 free, tts 5 free -> 5. B: pstn 20 free, tts 10 free -> 10.
        let dests = [
            d(&[("pstn", 100, 10), ("tts", 10, 5)]),
            d(&[("pstn", 50, 30), ("tts", 20, 10)]),
        ];
        let both = vec!["pstn".to_string(), "tts".to_string()];
        assert_eq!(pick(&dests, &both, &[], Policy::default()), Some(1));
        // Asking for pstn alone, A wins.
        assert_eq!(pick(&dests, &pstn(), &[], Policy::default()), Some(0));
    }

    #[test]
    fn a_resource_asked_twice_needs_two_free_units() {
        // Two recognizer channels in one session: A has one free unit, B two.
        let dests = [d(&[("asr", 100, 99)]), d(&[("asr", 10, 8)])];
        let twice = vec!["asr".to_string(), "asr".to_string()];
        assert_eq!(pick(&dests, &twice, &[], Policy::default()), Some(1));
        let once = vec!["asr".to_string()];
        let full = [d(&[("asr", 100, 99)])];
        assert_eq!(pick(&full, &once, &[], Policy::default()), Some(0));
        assert_eq!(pick(&full, &twice, &[], Policy::default()), None);
    }

    #[test]
    fn destinations_without_a_requested_resource_are_skipped() {
        let dests = [d(&[("pstn", 100, 0)]), d(&[("pstn", 5, 0), ("tts", 5, 0)])];
        let tts = vec!["tts".to_string()];
        assert_eq!(pick(&dests, &tts, &[], Policy::default()), Some(1));
        let asr = vec!["asr".to_string()];
        assert_eq!(pick(&dests, &asr, &[], Policy::default()), None);
        assert_eq!(pick(&dests, &[], &[], Policy::default()), None);
    }

    #[test]
    fn full_destinations_are_skipped_unless_over_capacity_allowed() {
        let dests = [d(&[("pstn", 10, 10)]), d(&[("pstn", 5, 7)])];
        assert_eq!(pick(&dests, &pstn(), &[], Policy::default()), None);
        let over = Policy {
            allow_over_capacity: true,
            ..Policy::default()
        };
        // 0 free beats -2 free.
        assert_eq!(pick(&dests, &pstn(), &[], over), Some(0));
    }

    #[test]
    fn zero_capacity_is_never_chosen_in_relative_mode() {
        let dests = [d(&[("pstn", 0, 0)])];
        let relative = Policy {
            mode: Mode::Relative,
            ..Policy::default()
        };
        assert_eq!(pick(&dests, &pstn(), &[], relative), None);
    }

    #[test]
    fn tried_group_and_unusable_are_excluded() {
        let mut other_group = d(&[("pstn", 1000, 0)]);
        other_group.group = 2;
        let mut down = d(&[("pstn", 1000, 0)]);
        down.usable = false;
        let dests = [
            d(&[("pstn", 100, 0)]),
            other_group,
            down,
            d(&[("pstn", 10, 0)]),
        ];
        assert_eq!(pick(&dests, &pstn(), &[], Policy::default()), Some(0));
        assert_eq!(pick(&dests, &pstn(), &[0], Policy::default()), Some(3));
        assert_eq!(pick(&dests, &pstn(), &[0, 3], Policy::default()), None);
    }

    #[test]
    fn ties_are_spread_at_random() {
        let dests = vec![d(&[("pstn", 10, 0)]); 4];
        let res = pstn();
        let mut r = rng();
        let mut hits = [0u32; 4];
        for _ in 0..4000 {
            let want = Want {
                group: 1,
                resources: &res,
            };
            hits[choose(&dests, want, &[], Policy::default(), &mut r).unwrap()] += 1;
        }
        for h in hits {
            assert!((800..1200).contains(&h), "uneven spread {hits:?}");
        }
    }
}
