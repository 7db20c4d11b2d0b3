//! Envoy's priority levels, in the kernel: which part of a service's slots a
//! connect() draws from, given each level's host counts and the ejections running
//! now. The agent computes everything that depends only on the control plane's
//! configuration (which hosts are in which level, their locality and host weights
//! within a level: the slots of each [`Tier`]'s ranges); this computes what
//! changes between two control-plane updates: the load of each level, which moves
//! when outlier detection ejects hosts, exactly as Envoy recomputes it when a
//! host's health changes.
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
//! Kept small and branch-light: the kernel programs run it on every connect() of
//! a service with levels, and the verifier walks it on both kernels CI tests.

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
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
}

/// Hosts of a level ejected now: `[healthy, degraded]` per level.
pub type Ejected = [[u32; 2]; MAX_TIERS];

/// Every level's share of new connections, percent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loads {
    pub healthy: [u32; MAX_TIERS],
    pub degraded: [u32; MAX_TIERS],
    /// Bit `i`: level `i` serves all its hosts (panic).
    pub panic: u32,
}

#[inline(always)]
fn ratio(overprovisioning: u64, part: u64, hosts: u64) -> u64 {
    if hosts == 0 {
        return 0;
    }
    (overprovisioning * part / hosts).min(100)
}

/// The levels' loads with `ejected` hosts out of their healthy and degraded
/// counts.
#[inline(always)]
pub fn loads(t: &Tiers, ejected: &Ejected) -> Loads {
    let mut out = Loads::default();
    let opf = u64::from(t.overprovisioning);
    let mut health = [0u64; MAX_TIERS];
    let mut degraded = [0u64; MAX_TIERS];
    let mut live = [0u64; MAX_TIERS];
    let mut sum = 0u64;
    for i in 0..MAX_TIERS {
        let tier = &t.tiers[i];
        let used = (i as u32) < t.count;
        let hosts = if used { u64::from(tier.hosts) } else { 0 };
        let h = u64::from(tier.healthy.saturating_sub(ejected[i][0]));
        let d = u64::from(tier.degraded.saturating_sub(ejected[i][1]));
        health[i] = ratio(opf, h, hosts);
        degraded[i] = ratio(opf, d, hosts);
        live[i] = h + d;
        sum += health[i] + degraded[i];
    }
    let normalized = sum.min(100);
    // Panic, per level, only below a full normalized total.
    let threshold = u64::from(t.panic_percent.min(100));
    let mut in_panic = 0u32;
    let mut all_panic = t.count > 0;
    for i in 0..MAX_TIERS {
        if (i as u32) >= t.count {
            continue;
        }
        let hosts = u64::from(t.tiers[i].hosts);
        // Envoy: (100 × healthy / hosts + 100 × degraded / hosts) < threshold,
        // an empty level counting as 0 %.
        let panic =
            normalized < 100 && threshold > 0 && (hosts == 0 || 100 * live[i] < threshold * hosts);
        if panic {
            in_panic |= 1 << i;
        } else {
            all_panic = false;
        }
    }
    if all_panic {
        // Every level in panic: loads by the levels' host counts, excluded hosts
        // included; what rounding leaves goes to the first level with hosts.
        let total: u64 = (0..MAX_TIERS)
            .filter(|&i| (i as u32) < t.count)
            .map(|i| u64::from(t.tiers[i].total))
            .sum();
        let mut left = 100u64;
        let mut first = MAX_TIERS;
        for i in 0..MAX_TIERS {
            let n = if (i as u32) < t.count {
                u64::from(t.tiers[i].total)
            } else {
                0
            };
            if total > 0 {
                let l = 100 * n / total;
                out.healthy[i] = l as u32;
                left -= l;
            }
            if n > 0 && first == MAX_TIERS {
                first = i;
            }
        }
        // No host at all: level 0.
        let first = if first == MAX_TIERS { 0 } else { first };
        out.healthy[first & (MAX_TIERS - 1)] += left as u32;
        out.panic = in_panic;
        return out;
    }
    if normalized == 0 {
        // Nothing can serve (panic disabled, no healthy or degraded host): level 0.
        out.healthy[0] = 100;
        out.panic = in_panic;
        return out;
    }
    let mut left = 100u64;
    for i in 0..MAX_TIERS {
        let l = (health[i] * 100 / normalized).min(left);
        out.healthy[i] = l as u32;
        left -= l;
    }
    for i in 0..MAX_TIERS {
        let l = (degraded[i] * 100 / normalized).min(left);
        out.degraded[i] = l as u32;
        left -= l;
    }
    if left > 0 {
        let mut first_healthy = MAX_TIERS;
        let mut first_degraded = MAX_TIERS;
        for i in (0..MAX_TIERS).rev() {
            if health[i] > 0 {
                first_healthy = i;
            }
            if degraded[i] > 0 {
                first_degraded = i;
            }
        }
        if first_healthy < MAX_TIERS {
            out.healthy[first_healthy & (MAX_TIERS - 1)] += left as u32;
        } else {
            out.degraded[first_degraded & (MAX_TIERS - 1)] += left as u32;
        }
    }
    out.panic = in_panic;
    out
}

/// Where a connect() draws: a slot range, and whether ejections are ignored there
/// (a level in panic serves all its hosts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub range: SlotRange,
    pub panic: bool,
}

/// The range for a draw `r` (uniform in `0..100`) under `loads`: the healthy loads
/// of every level in order, then the degraded ones (Envoy's `choosePriority`).
#[inline(always)]
pub fn choose(t: &Tiers, loads: &Loads, r: u32) -> Choice {
    let mut r = r;
    for i in 0..MAX_TIERS {
        let l = loads.healthy[i];
        if r < l {
            return at(t, loads, i, false);
        }
        r -= l;
    }
    for i in 0..MAX_TIERS {
        let l = loads.degraded[i];
        if r < l {
            return at(t, loads, i, true);
        }
        r -= l;
    }
    // Loads sum to 100: unreachable for r < 100; level 0's healthy hosts.
    at(t, loads, 0, false)
}

#[inline(always)]
fn at(t: &Tiers, loads: &Loads, i: usize, degraded: bool) -> Choice {
    let tier = &t.tiers[i & (MAX_TIERS - 1)];
    if loads.panic & (1 << i) != 0 {
        return Choice {
            range: tier.all_slots,
            panic: true,
        };
    }
    Choice {
        range: if degraded {
            tier.degraded_slots
        } else {
            tier.healthy_slots
        },
        panic: false,
    }
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

    const NONE: Ejected = [[0; 2]; MAX_TIERS];

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
        ej[0][0] = 1;
        assert_eq!(loads(&t, &ej).healthy[..2], [70, 30]);
        ej[0][0] = 2;
        let l = loads(&t, &ej);
        assert_eq!(l.healthy[..2], [0, 100]);
        assert_eq!(l.panic, 0, "the normalized total is 100: no panic");
        let c = choose(&t, &l, 5);
        assert_eq!(c.range, t.tiers[1].healthy_slots);
    }

    #[test]
    fn all_levels_in_panic_share_by_host_count() {
        let t = tiers(&[level(4, 0, 0), level(12, 1, 0)], 50);
        let l = loads(&t, &NONE);
        assert_eq!(l.panic, 0b11);
        assert_eq!(l.healthy[..2], [25, 75]);
        assert!(choose(&t, &l, 0).panic);
    }
}
