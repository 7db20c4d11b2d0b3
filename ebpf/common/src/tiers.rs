//! Envoy's priority levels: which part of a service's slots a connect() draws
//! from. The agent lays a service's slots out in ranges, per level its healthy,
//! degraded and all hosts (each range weighted within the level by locality and
//! host weight), and computes the levels' loads from their host counts less the
//! hosts ejected now: [`loads`], then [`choice_table`], which maps each percent
//! of a connect()'s draw to a range. The kernel programs read one byte of that
//! table per connect ([`Tiers::choice`]); the agent writes a new table when
//! sock_ops reports an ejection (a ring buffer) and when one runs out, so a level
//! whose hosts are ejected spills to the next as Envoy's does.
//!
//! The arithmetic is Envoy's (`recalculatePerPriorityState`, `distributeLoad`,
//! `recalculatePerPriorityPanic`, `isHostSetInPanic`,
//! `recalculateLoadInTotalPanic` in its load balancer base), in its own integer
//! percentages:
//! - a level's health is `min(100, overprovisioning × healthy / hosts)` (hosts
//!   excluding excluded ones), its degraded availability likewise;
//! - the normalized total is `min(100, Σ health + Σ degraded)`;
//! - each level takes `min(left, health × 100 / normalized)` of the traffic in
//!   order, then the degraded parts likewise, and what rounding leaves goes to the
//!   first level with health (else the first with degraded availability);
//! - below a normalized total of 100, a level whose healthy and degraded share of
//!   its hosts is under the panic threshold is in panic: its load goes to all its
//!   hosts, ejected and unhealthy ones too; if every level is in panic, the loads
//!   follow the levels' total host counts instead.
//!
//! The arithmetic runs in the agent: in a kernel program the verifier walked
//! every combination of its branches (over a million instructions for connect4).

use crate::MAX_TIERS;

/// A range of a generation's slots: `len` slots from `start`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotRange {
    pub start: u16,
    pub len: u16,
}

/// One priority level of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tier {
    /// Slots of its healthy hosts, weighted by their locality's effective weight
    /// and their own.
    pub healthy_slots: SlotRange,
    /// Slots of its degraded hosts, likewise.
    pub degraded_slots: SlotRange,
    /// Slots of all its hosts, by host weight: what it serves in panic.
    pub all_slots: SlotRange,
    /// Hosts, excluded ones left out (Envoy's denominator).
    pub hosts: u32,
    /// Healthy and degraded hosts, as the control plane reported them.
    pub healthy: u32,
    pub degraded: u32,
    /// Every host, excluded ones too (the loads of a total panic).
    pub total: u32,
    /// Always 0.
    pub pad: u32,
}

/// Value of `SM_TIERS`: a service's levels, for one slot generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiers {
    /// Levels in use, 1..=[`MAX_TIERS`], by priority.
    pub count: u32,
    /// The assignment's `policy.overprovisioning_factor`, percent (Envoy's
    /// default 140).
    pub overprovisioning: u32,
    /// The cluster's `healthy_panic_threshold`, percent, truncated to an integer
    /// as Envoy does (0 disables panic).
    pub panic_percent: u32,
    /// Always 0.
    pub pad: u32,
    pub tiers: [Tier; MAX_TIERS],
    /// For a draw `r` in `0..100`, the range a connect() takes: `3 × level +`
    /// [`HEALTHY`], [`DEGRADED`] or [`ALL`] (a level in panic), or [`NO_RANGE`].
    /// 128 entries, the last 28 unused: the kernel programs index it with
    /// `r & 127`, a bound the verifier can see (it cannot see one in `r % 100`).
    pub choice: [u8; CHOICES],
}

/// Entries of [`Tiers::choice`].
pub const CHOICES: usize = 128;

impl Default for Tiers {
    fn default() -> Self {
        Self {
            count: 0,
            overprovisioning: 0,
            panic_percent: 0,
            pad: 0,
            tiers: [Tier::default(); MAX_TIERS],
            choice: [NO_RANGE; CHOICES],
        }
    }
}

/// A level's healthy range, in [`Tiers::choice`].
pub const HEALTHY: u8 = 0;
/// A level's degraded range.
pub const DEGRADED: u8 = 1;
/// All of a level's hosts: the level is in panic (ejections are ignored).
pub const ALL: u8 = 2;
/// No range: nothing can serve.
pub const NO_RANGE: u8 = u8::MAX;

/// Hosts of each level ejected now, healthy and degraded apart: 8 bits per
/// level in one word each (at most `MAX_EJECTED`, 16, are ejected at once).
/// Shifts, not an array: the kernel programs add to it at a level read from a
/// map, and an index into the stack that the verifier must know exactly would
/// make it walk every combination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ejected {
    pub healthy: u64,
    pub degraded: u64,
}

impl Ejected {
    pub const NONE: Self = Self {
        healthy: 0,
        degraded: 0,
    };

    /// One more ejected host of `level` (healthy, or `degraded`).
    #[inline(always)]
    pub fn add(&mut self, level: u8, degraded: bool) {
        let one = 1u64 << ((u64::from(level) & (MAX_TIERS as u64 - 1)) * 8);
        if degraded {
            self.degraded += one;
        } else {
            self.healthy += one;
        }
    }

    /// `[healthy, degraded]` ejected hosts of `level`.
    #[inline(always)]
    pub fn of(&self, level: usize) -> [u32; 2] {
        let shift = (level & (MAX_TIERS - 1)) * 8;
        [
            ((self.healthy >> shift) & 0xff) as u32,
            ((self.degraded >> shift) & 0xff) as u32,
        ]
    }
}

/// Every level's share of new connections, percent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loads {
    pub healthy: [u32; MAX_TIERS],
    pub degraded: [u32; MAX_TIERS],
    /// Bit `i`: level `i` serves all its hosts (panic).
    pub panic: u32,
}

fn ratio(overprovisioning: u64, part: u64, hosts: u64) -> u64 {
    if hosts == 0 {
        return 0;
    }
    (overprovisioning * part / hosts).min(100)
}

/// The levels' loads with `ejected` hosts out of their healthy and degraded
/// counts.
pub fn loads(t: &Tiers, ejected: &Ejected) -> Loads {
    let mut out = Loads::default();
    let opf = u64::from(t.overprovisioning);
    let count = (t.count as usize).min(MAX_TIERS);
    let levels = &t.tiers[..count];
    // Per level: its health, its degraded availability, its hosts that are
    // healthy or degraded now, and its hosts (excluded ones left out).
    let mut state = [(0u64, 0u64, 0u64, 0u64); MAX_TIERS];
    for ((i, tier), st) in levels.iter().enumerate().zip(state.iter_mut()) {
        let [eh, ed] = ejected.of(i);
        let hosts = u64::from(tier.hosts);
        let h = u64::from(tier.healthy.saturating_sub(eh));
        let d = u64::from(tier.degraded.saturating_sub(ed));
        *st = (ratio(opf, h, hosts), ratio(opf, d, hosts), h + d, hosts);
    }
    let state = &state[..count];
    let normalized = state.iter().map(|s| s.0 + s.1).sum::<u64>().min(100);
    // Panic, per level, only below a full normalized total: Envoy's
    // `100 × healthy / hosts + 100 × degraded / hosts < threshold`, an empty level
    // counting as 0 %.
    let threshold = u64::from(t.panic_percent.min(100));
    for (i, &(_, _, live, hosts)) in state.iter().enumerate() {
        if normalized < 100 && threshold > 0 && (hosts == 0 || 100 * live < threshold * hosts) {
            out.panic |= 1 << i;
        }
    }
    if count > 0 && out.panic.count_ones() as usize == count {
        // Every level in panic: loads by the levels' host counts, excluded hosts
        // included; what rounding leaves goes to the first level with hosts (or
        // level 0 when no level has any).
        let total: u64 = levels.iter().map(|l| u64::from(l.total)).sum();
        let mut left = 100;
        if let Some(total) = core::num::NonZeroU64::new(total) {
            for (load, l) in out.healthy.iter_mut().zip(levels) {
                let share = 100 * u64::from(l.total) / total;
                *load = share as u32;
                left -= share;
            }
        }
        let first = levels.iter().position(|l| l.total > 0).unwrap_or(0);
        out.healthy[first] += left as u32;
        return out;
    }
    if normalized == 0 {
        // Nothing can serve (panic disabled, no healthy or degraded host): level 0.
        out.healthy[0] = 100;
        return out;
    }
    let mut left = 100u64;
    for (load, s) in out.healthy.iter_mut().zip(state) {
        let l = (s.0 * 100 / normalized).min(left);
        *load = l as u32;
        left -= l;
    }
    for (load, s) in out.degraded.iter_mut().zip(state) {
        let l = (s.1 * 100 / normalized).min(left);
        *load = l as u32;
        left -= l;
    }
    if left > 0 {
        if let Some(i) = state.iter().position(|s| s.0 > 0) {
            out.healthy[i] += left as u32;
        } else if let Some(i) = state.iter().position(|s| s.1 > 0) {
            out.degraded[i] += left as u32;
        }
    }
    out
}

/// The range for every draw `r` in `0..100` under `loads`, as [`Tiers::choice`]
/// holds it: the healthy loads of every level in order, then the degraded ones
/// (Envoy's `choosePriority`), a level in panic serving all its hosts.
pub fn choice_table(t: &Tiers, loads: &Loads) -> [u8; CHOICES] {
    let mut table = [NO_RANGE; CHOICES];
    for (r, entry) in (0u32..).zip(table.iter_mut().take(100)) {
        let (level, which) = choose_level(loads, r);
        *entry = if (level as u32) < t.count {
            (level * 3) as u8 + which
        } else {
            NO_RANGE
        };
    }
    table
}

/// The level and range a draw `r` falls in.
fn choose_level(loads: &Loads, r: u32) -> (usize, u8) {
    let mut r = r;
    for i in 0..MAX_TIERS {
        if r < loads.healthy[i] {
            return (i, panic_or(loads, i, HEALTHY));
        }
        r -= loads.healthy[i];
    }
    for i in 0..MAX_TIERS {
        if r < loads.degraded[i] {
            return (i, panic_or(loads, i, DEGRADED));
        }
        r -= loads.degraded[i];
    }
    (0, panic_or(loads, 0, HEALTHY))
}

fn panic_or(loads: &Loads, i: usize, which: u8) -> u8 {
    if loads.panic & (1 << i) != 0 {
        ALL
    } else {
        which
    }
}

/// The range a [`Tiers::choice`] entry names, and whether it is served in panic
/// (ejections ignored); `None` for [`NO_RANGE`] or a level past the table.
/// Straight-line: the kernel programs run it on every connect() of a service
/// with levels.
#[inline(always)]
pub fn range_of(t: &Tiers, code: u8) -> Option<(SlotRange, bool)> {
    let level = usize::from(code / 3);
    if level >= MAX_TIERS {
        return None;
    }
    let tier = &t.tiers[level];
    Some(match code % 3 {
        HEALTHY => (tier.healthy_slots, false),
        DEGRADED => (tier.degraded_slots, false),
        _ => (tier.all_slots, true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(hosts: u32, healthy: u32, degraded: u32) -> Tier {
        Tier {
            hosts,
            healthy,
            degraded,
            total: hosts,
            ..Tier::default()
        }
    }

    fn tiers(levels: &[Tier], panic_percent: u32) -> Tiers {
        let mut t = Tiers {
            count: levels.len() as u32,
            overprovisioning: 140,
            panic_percent,
            ..Tiers::default()
        };
        t.tiers[..levels.len()].copy_from_slice(levels);
        t
    }

    const NONE: Ejected = Ejected::NONE;

    /// Envoy's documented examples (the "Priority levels" page of its
    /// architecture overview), spelled as host counts.
    #[test]
    fn priority_loads_follow_envoys_table() {
        let cases: [(u32, u32, u32, u32); 4] = [
            // P0 healthy of 100, P1 healthy of 100 → P0 load, P1 load
            (100, 100, 100, 0),
            (72, 100, 100, 0),
            (71, 100, 99, 1),
            (50, 100, 70, 30),
        ];
        for (h0, h1, l0, l1) in cases {
            let t = tiers(&[level(100, h0, 0), level(100, h1, 0)], 50);
            let l = loads(&t, &NONE);
            assert_eq!((l.healthy[0], l.healthy[1]), (l0, l1), "P0 {h0}% healthy");
        }
        let t = tiers(&[level(100, 25, 0), level(100, 25, 0)], 0);
        let l = loads(&t, &NONE);
        assert_eq!((l.healthy[0], l.healthy[1]), (50, 50));
    }

    /// An ejection is a health change: ejecting the only healthy host of level 0
    /// sends everything to level 1.
    #[test]
    fn ejections_spill_to_the_next_level() {
        let t = tiers(&[level(2, 2, 0), level(2, 2, 0)], 50);
        assert_eq!(loads(&t, &NONE).healthy[..2], [100, 0]);
        let mut ej = NONE;
        ej.add(0, false);
        assert_eq!(ej.of(0), [1, 0]);
        assert_eq!(loads(&t, &ej).healthy[..2], [70, 30]);
        ej.add(0, false);
        let l = loads(&t, &ej);
        assert_eq!(l.healthy[..2], [0, 100]);
        assert_eq!(l.panic, 0, "the normalized total is 100: no panic");
        let table = choice_table(&t, &l);
        assert!(table[..100].iter().all(|&c| c == 3 + HEALTHY), "{table:?}");
        assert_eq!(
            range_of(&t, table[5]),
            Some((t.tiers[1].healthy_slots, false))
        );
    }

    #[test]
    fn all_levels_in_panic_share_by_host_count() {
        let t = tiers(&[level(4, 0, 0), level(12, 1, 0)], 50);
        let l = loads(&t, &NONE);
        assert_eq!(l.panic, 0b11);
        assert_eq!(l.healthy[..2], [25, 75]);
        let table = choice_table(&t, &l);
        assert_eq!(table[24], ALL);
        assert_eq!(table[25], 3 + ALL);
        assert!(range_of(&t, table[0]).is_some_and(|(_, panic)| panic));
        assert_eq!(range_of(&t, NO_RANGE), None);
    }
}
