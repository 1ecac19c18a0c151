//! The routing choice without a scan: the candidates of each (group, requested resources, mode)
//! kept ordered by availability, so that a choice costs the same at 1,000 destinations as at 2.
//!
//! An [`Order`] holds, for one (group, resource list, mode), every slot that `choose` would
//! consider before looking at `tried` and at the over-capacity rule: right group, `usable()`,
//! offering every requested resource. They sit in buckets by availability (a `BTreeMap` from
//! availability to the slots that have exactly it); a slot's bucket and position are recorded,
//! so moving a slot is a `swap_remove` and a push. The best candidate is a random member of
//! the highest bucket: one random draw over the whole tie, the same distribution as the
//! reservoir sampling of the scan. Slots in `tried` are skipped by position; a bucket holding
//! only tried slots sends the choice one bucket lower.
//!
//! [`Index`] holds the orders, created the first time a (group, resources, mode) is asked for
//! and kept in step from then on. Its owner (`Destinations`) tells it which slots changed:
//! [`Index::refresh`] moves a slot at once (acquire, release), [`Index::mark`] notes a slot
//! handed out for change (`&mut Destination`) and the next choice recomputes the noted slots
//! first. At most [`MAX_ORDERS`] orders are kept; a combination beyond that is answered by the
//! linear scan [`super::choose`], which stays the reference for what the orders answer.

use rand::Rng;
use std::collections::BTreeMap;

use super::{standing, Candidate, Mode, Policy, Want};

/// How many (group, resources, mode) combinations get an order. The proxy asks for one per
/// listener (its group and resources), so a handful in practice.
pub const MAX_ORDERS: usize = 16;

/// The candidates for one (group, resources, mode), by availability.
#[derive(Debug)]
struct Order {
    group: u32,
    resources: Vec<String>,
    mode: Mode,
    /// Availability to the slots that have exactly it; no bucket is empty.
    buckets: BTreeMap<i64, Vec<usize>>,
    /// For each slot: its availability and its position in that bucket, None when it is no
    /// candidate.
    at: Vec<Option<(i64, usize)>>,
}

impl Order {
    fn new<C: Candidate>(slots: &[C], group: u32, resources: &[String], mode: Mode) -> Order {
        let mut o = Order {
            group,
            resources: resources.to_vec(),
            mode,
            buckets: BTreeMap::new(),
            at: Vec::with_capacity(slots.len()),
        };
        for (slot, d) in slots.iter().enumerate() {
            o.update(slot, d);
        }
        o
    }

    fn is_for(&self, want: Want<'_>, mode: Mode) -> bool {
        self.group == want.group && self.mode == mode && self.resources == want.resources
    }

    /// Puts `slot` where its destination `d` now stands.
    fn update<C: Candidate>(&mut self, slot: usize, d: &C) {
        let now = standing(d, self.group, &self.resources, self.mode);
        if slot >= self.at.len() {
            self.at.resize(slot + 1, None);
        }
        let was = self.at[slot];
        if was.map(|(a, _)| a) == now {
            return;
        }
        if let Some((a, pos)) = was {
            if let Some(bucket) = self.buckets.get_mut(&a) {
                bucket.swap_remove(pos);
                if let Some(&moved) = bucket.get(pos) {
                    self.at[moved] = Some((a, pos));
                }
                if bucket.is_empty() {
                    self.buckets.remove(&a);
                }
            }
        }
        self.at[slot] = now.map(|a| {
            let bucket = self.buckets.entry(a).or_default();
            bucket.push(slot);
            (a, bucket.len() - 1)
        });
    }

    /// A random one of the most available candidates not in `tried`.
    fn pick(
        &self,
        tried: &[usize],
        allow_over_capacity: bool,
        rng: &mut impl Rng,
    ) -> Option<usize> {
        let mut skip = Vec::new();
        for (&avail, bucket) in self.buckets.iter().rev() {
            if avail <= 0 && !allow_over_capacity {
                return None;
            }
            // Positions of the tried slots in this bucket, ascending and once each.
            skip.clear();
            skip.extend(tried.iter().filter_map(|&s| match self.at.get(s) {
                Some(&Some((a, pos))) if a == avail => Some(pos),
                _ => None,
            }));
            skip.sort_unstable();
            skip.dedup();
            let left = bucket.len() - skip.len();
            if left == 0 {
                continue;
            }
            // The n-th position not skipped.
            let mut n = rng.gen_range(0..left);
            for &p in &skip {
                if p <= n {
                    n += 1;
                }
            }
            return bucket.get(n).copied();
        }
        None
    }
}

/// The orders of one destination set, and the slots changed since they were last brought in
/// step.
#[derive(Debug, Default)]
pub struct Index {
    orders: Vec<Order>,
    /// Slots handed out for change since the last choice, each once.
    dirty: Vec<usize>,
    is_dirty: Vec<bool>,
}

impl Index {
    /// Notes that the destination in `slot` may have changed in any way.
    pub fn mark(&mut self, slot: usize) {
        if slot >= self.is_dirty.len() {
            self.is_dirty.resize(slot + 1, false);
        }
        if !self.is_dirty[slot] {
            self.is_dirty[slot] = true;
            self.dirty.push(slot);
        }
    }

    /// Notes that every one of `n` slots may have changed.
    pub fn mark_all(&mut self, n: usize) {
        for slot in 0..n {
            self.mark(slot);
        }
    }

    /// Brings `slot` in step now, its destination being `slots[slot]`.
    pub fn refresh<C: Candidate>(&mut self, slots: &[C], slot: usize) {
        if let Some(d) = slots.get(slot) {
            for o in &mut self.orders {
                o.update(slot, d);
            }
        }
    }

    /// Brings every noted slot in step.
    fn flush<C: Candidate>(&mut self, slots: &[C]) {
        if self.dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        for &slot in &dirty {
            if let Some(flag) = self.is_dirty.get_mut(slot) {
                *flag = false;
            }
            self.refresh(slots, slot);
        }
        // Keep the allocation for the next round.
        dirty.clear();
        self.dirty = dirty;
    }

    /// The choice [`super::choose`] makes over `slots` (the same candidates, the same
    /// availability, ties broken uniformly at random), through the order of `want`.
    pub fn choose<C: Candidate>(
        &mut self,
        slots: &[C],
        want: Want<'_>,
        tried: &[usize],
        policy: Policy,
        rng: &mut impl Rng,
    ) -> Option<usize> {
        self.flush(slots);
        let found = self.orders.iter().position(|o| o.is_for(want, policy.mode));
        let i = match found {
            Some(i) => i,
            None if self.orders.len() < MAX_ORDERS && !want.resources.is_empty() => {
                self.orders
                    .push(Order::new(slots, want.group, want.resources, policy.mode));
                self.orders.len() - 1
            }
            None => return super::choose(slots, want, tried, policy, rng),
        };
        self.orders[i].pick(tried, policy.allow_over_capacity, rng)
    }
}
