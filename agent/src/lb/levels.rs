//! Envoy's load-balancing arithmetic over one load assignment: priority levels,
//! localities, degraded and unhealthy hosts, panic (its architecture overview's
//! "Priority levels", "Overprovisioning factor", "Locality weighted load
//! balancing", "Degraded endpoints" and "Panic threshold"; in its source, the
//! load balancer base's `recalculatePerPriorityState` and the host set's
//! `effectiveLocalityWeight`).
//!
//! Within a level, Envoy picks among the healthy hosts (or, for the level's
//! degraded load, the degraded ones); with `locality_weighted_lb_config` it first
//! picks a locality by its effective weight, `weight × min(1, overprovisioning ×
//! healthy / hosts)` of that locality, then a host by host weight. Those shares
//! depend only on the control plane's configuration, so they become slot weights
//! here. Across levels, the loads depend on how many hosts are healthy, which
//! outlier detection changes between two updates:
//! - a service without outlier detection has a static health: its levels' loads
//!   are computed once, here, and every host gets its overall share as its slot
//!   weight (one weighted set, as any service);
//! - one with outlier detection and one level of healthy hosts is one weighted
//!   set too (its panic is the service's, see `health.rs`);
//! - any other with outlier detection is served by its levels
//!   ([`crate::model::Levels`]): the kernel recomputes the loads at connect()
//!   with the hosts ejected then (`sockmesh_common::tiers`), so a level whose
//!   hosts are ejected spills to the next at once, as Envoy's does.
//!
//! Within a level, an ejected host's share goes to the level's other hosts in
//! proportion to theirs (a redraw), where Envoy would also recompute the
//! locality's effective weight; the two differ only while a locality has fewer
//! than 1/overprovisioning (71 %) of its hosts healthy.

use std::collections::BTreeMap;

use sockmesh_common::{MAX_TIERS, SlotRange, Tier, Tiers, tiers};

use crate::model::{
    Backend, BackendState, Level, LevelJson, Levels, LevelsJson, Placement, Service,
};

/// The cluster's settings Envoy's arithmetic reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LbSettings {
    /// `common_lb_config.locality_weighted_lb_config` is set: localities are
    /// picked by their effective weights first.
    pub locality_weighted: bool,
    /// `common_lb_config.healthy_panic_threshold`, percent, truncated to an
    /// integer as Envoy's `convertPercent` does; 0 disables panic.
    pub panic_percent: u8,
}

impl Default for LbSettings {
    fn default() -> Self {
        Self {
            locality_weighted: false,
            panic_percent: 50,
        }
    }
}

/// Slot weights stand for shares in units of 2^-20.
const SHARE_SCALE: f64 = 1_048_576.0;

/// Slots of a service served by levels, all its ranges together, unless its
/// hosts need more (one slot each): as a weighted set's (`MAX_SLOTS_PER_SERVICE`),
/// shared by the ranges in proportion to their hosts, at most [`RANGE_SLOTS`]
/// each. Slot indexes and a range's length are `u16`.
const LEVEL_SLOTS: usize = sockmesh_common::MAX_SLOTS_PER_SERVICE as usize;

/// Most slots of one range beyond one per host: its hosts' shares to within
/// 1/4,096 of the range's load.
const RANGE_SLOTS: usize = 4096;

/// What one assignment's endpoints become.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub backends: Vec<Backend>,
    /// The levels the kernel chooses among (see the module's documentation).
    pub levels: Option<Levels>,
    /// Priority levels past `MAX_TIERS` left out (their hosts get no load).
    pub dropped_levels: usize,
}

/// Plans `endpoints` (their state is their EDS health class, their weight their
/// own, their placement where the assignment puts them). `dynamic`: health
/// changes between updates (outlier detection) and the service is not Maglev.
pub fn plan(endpoints: &[Backend], settings: LbSettings, dynamic: bool) -> Planned {
    if as_they_are(endpoints, settings) {
        return Planned {
            backends: endpoints.to_vec(),
            levels: None,
            dropped_levels: 0,
        };
    }
    plan_whole(endpoints, settings, dynamic)
}

/// [`plan`], step by step.
fn plan_whole(endpoints: &[Backend], settings: LbSettings, dynamic: bool) -> Planned {
    // Envoy keeps the first endpoint of an address.
    let mut seen: foldhash::HashSet<_> = foldhash::HashSetExt::with_capacity(endpoints.len());
    let hosts: Vec<Backend> = endpoints
        .iter()
        .filter(|b| seen.insert((b.address, b.port)))
        .copied()
        .collect();
    // What the kernel needs of a host's placement once planned: the
    // overprovisioning factor (a service without levels' panic).
    let planned = |b: &Backend, state: BackendState| {
        b.in_state(state).placed(Placement {
            overprovisioning: b.placement.overprovisioning,
            ..Placement::default()
        })
    };
    let mut priorities: Vec<u8> = hosts.iter().map(|b| b.placement.priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    let dropped_levels = priorities.len().saturating_sub(MAX_TIERS);
    priorities.truncate(MAX_TIERS);
    let overprovisioning = u32::from(
        hosts
            .first()
            .map_or(crate::model::DEFAULT_OVERPROVISIONING, |b| {
                b.placement.overprovisioning
            }),
    );
    let levels = Levels {
        overprovisioning,
        panic_percent: u32::from(settings.panic_percent),
        levels: priorities
            .iter()
            .map(|&p| level(&hosts, p, settings, overprovisioning))
            .collect(),
    };
    let simple = levels.levels.len() <= 1 && hosts.iter().all(|b| b.state == BackendState::Active);
    if dynamic && !simple {
        let backends = hosts
            .iter()
            .map(|b| {
                let state = if priorities.contains(&b.placement.priority) {
                    b.state
                } else {
                    BackendState::Draining
                };
                planned(b, state)
            })
            .collect();
        return Planned {
            backends,
            levels: Some(levels),
            dropped_levels,
        };
    }
    // One range takes every connection (the usual case): its own weights (host
    // weights, or locality shares). Otherwise each host's overall share.
    let weights: Vec<u32> = match full_range(&levels) {
        Some(range) => {
            let mut w = vec![0u32; hosts.len()];
            for &(pos, weight) in range {
                w[pos] = weight;
            }
            w
        }
        None => static_shares(&levels, hosts.len(), &tiers::Ejected::NONE)
            .into_iter()
            .map(|share| if share > 0.0 { scaled(share).max(1) } else { 0 })
            .collect(),
    };
    // The smallest integers in the same ratios (what `sockmesh services` shows).
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let backends = hosts
        .iter()
        .zip(&weights)
        .map(|(b, &w)| {
            if w > 0 {
                planned(b, BackendState::Active).weighted(w / g)
            } else {
                planned(b, BackendState::Draining)
            }
        })
        .collect();
    Planned {
        backends,
        levels: None,
        dropped_levels,
    }
}

/// Whether [`plan`] leaves `endpoints` as they are, with no levels: the usual
/// assignment, with distinct addresses, every host active in one locality at
/// priority 0 (no placement but the overprovisioning factor, at least 100, so
/// the level takes all the load), no locality weighting, and weights with no
/// common factor. It is most of a batch's staging: a service's endpoint change
/// plans its whole list again, and a service of one cluster so planned holds
/// the cluster's own list.
pub fn as_they_are(endpoints: &[Backend], settings: LbSettings) -> bool {
    /// Distinct addresses are checked pairwise up to this many hosts.
    const PAIRWISE: usize = 32;
    let Some(first) = endpoints.first() else {
        return false;
    };
    let placement = Placement {
        overprovisioning: first.placement.overprovisioning,
        ..Placement::default()
    };
    !settings.locality_weighted
        && endpoints.len() <= PAIRWISE
        && placement.overprovisioning >= 100
        && endpoints
            .iter()
            .all(|b| b.state == BackendState::Active && b.placement == placement)
        && endpoints.iter().map(|b| b.weight).fold(0, gcd) == 1
        && endpoints.iter().enumerate().all(|(i, a)| {
            endpoints[..i]
                .iter()
                .all(|b| (b.address, b.port) != (a.address, a.port))
        })
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The one range that takes all of `levels`' load with no host ejected, if one
/// does.
fn full_range(levels: &Levels) -> Option<&[(usize, u32)]> {
    let loads = tiers::loads(&counts(levels), &tiers::Ejected::NONE);
    levels
        .levels
        .iter()
        .enumerate()
        .take(MAX_TIERS)
        .find_map(|(i, l)| {
            let panic = loads.panic & (1 << i) != 0;
            match (loads.healthy[i], loads.degraded[i]) {
                (100, 0) if panic => Some(l.all.as_slice()),
                (0, 100) if panic => Some(l.all.as_slice()),
                (100, 0) => Some(l.healthy.as_slice()),
                (0, 100) => Some(l.degraded.as_slice()),
                _ => None,
            }
        })
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a share is within 0..=1, scaled to at most 2^20"
)]
fn scaled(share: f64) -> u32 {
    (share * SHARE_SCALE).round() as u32
}

/// Level `priority` of `hosts`.
fn level(hosts: &[Backend], priority: u8, settings: LbSettings, overprovisioning: u32) -> Level {
    let members: Vec<usize> = (0..hosts.len())
        .filter(|&i| hosts[i].placement.priority == priority)
        .collect();
    let count = |state| members.iter().filter(|&&i| hosts[i].state == state).count() as u32;
    Level {
        healthy: range(
            hosts,
            &members,
            BackendState::Active,
            settings,
            overprovisioning,
        ),
        degraded: range(
            hosts,
            &members,
            BackendState::Degraded,
            settings,
            overprovisioning,
        ),
        all: members
            .iter()
            .map(|&i| (i, hosts[i].weight.max(1)))
            .collect(),
        hosts: members.len() as u32 - count(BackendState::Draining),
        healthy_hosts: count(BackendState::Active),
        degraded_hosts: count(BackendState::Degraded),
        total: members.len() as u32,
    }
}

/// The hosts of `members` in `state`, each with its slot weight: its host weight,
/// or with locality weighting its locality's share of the effective weights times
/// its share of the locality's hosts in that state. Hosts whose locality has no
/// effective weight get no slot; if no locality has any, Envoy picks among all of
/// them by host weight.
fn range(
    hosts: &[Backend],
    members: &[usize],
    state: BackendState,
    settings: LbSettings,
    overprovisioning: u32,
) -> Vec<(usize, u32)> {
    let in_state: Vec<usize> = members
        .iter()
        .copied()
        .filter(|&i| hosts[i].state == state)
        .collect();
    let by_weight = || {
        in_state
            .iter()
            .map(|&i| (i, hosts[i].weight.max(1)))
            .collect()
    };
    if !settings.locality_weighted {
        return by_weight();
    }
    // Per locality: (weight, hosts not excluded, hosts in `state`, their weight).
    let mut localities: BTreeMap<u16, (u32, u32, u32, u64)> = BTreeMap::new();
    for &i in members {
        let b = &hosts[i];
        let l = localities.entry(b.placement.locality).or_default();
        l.0 = b.placement.locality_weight;
        if b.state != BackendState::Draining {
            l.1 += 1;
        }
        if b.state == state {
            l.2 += 1;
            l.3 += u64::from(b.weight.max(1));
        }
    }
    let effective = |&(weight, n, k, _): &(u32, u32, u32, u64)| {
        if n == 0 {
            return 0.0;
        }
        f64::from(weight)
            * (f64::from(overprovisioning) / 100.0 * f64::from(k) / f64::from(n)).min(1.0)
    };
    let total: f64 = localities.values().map(effective).sum();
    if total <= 0.0 {
        return by_weight();
    }
    in_state
        .iter()
        .filter_map(|&i| {
            let b = &hosts[i];
            let l = localities.get(&b.placement.locality)?;
            let share = effective(l) / total * f64::from(b.weight.max(1)) / l.3 as f64;
            (share > 0.0).then(|| (i, scaled(share).max(1)))
        })
        .collect()
}

/// The kernel's view of `levels`' counts (ranges left empty).
fn counts(levels: &Levels) -> Tiers {
    let mut t = Tiers {
        count: levels.levels.len().min(MAX_TIERS) as u32,
        overprovisioning: levels.overprovisioning,
        panic_percent: levels.panic_percent,
        ..Tiers::default()
    };
    for (tier, l) in t.tiers.iter_mut().zip(&levels.levels) {
        *tier = Tier {
            hosts: l.hosts,
            healthy: l.healthy_hosts,
            degraded: l.degraded_hosts,
            total: l.total,
            ..Tier::default()
        };
    }
    t
}

/// Each host's share of the service's new connections (0..=1), by position, with
/// `ejected` hosts out of their levels' counts: the levels' loads, each spread
/// over the range it serves by the range's weights.
pub fn static_shares(levels: &Levels, hosts: usize, ejected: &tiers::Ejected) -> Vec<f64> {
    let loads = tiers::loads(&counts(levels), ejected);
    let mut shares = vec![0.0; hosts];
    for (i, l) in levels.levels.iter().enumerate().take(MAX_TIERS) {
        let (healthy, degraded) = (loads.healthy[i], loads.degraded[i]);
        let mut spread = |range: &[(usize, u32)], load: u32| {
            let total: f64 = range.iter().map(|&(_, w)| f64::from(w)).sum();
            if load == 0 || total <= 0.0 {
                return;
            }
            for &(pos, w) in range {
                if let Some(s) = shares.get_mut(pos) {
                    *s += f64::from(load) / 100.0 * f64::from(w) / total;
                }
            }
        };
        if loads.panic & (1 << i) != 0 {
            spread(&l.all, healthy + degraded);
        } else {
            spread(&l.healthy, healthy);
            spread(&l.degraded, degraded);
        }
    }
    shares
}

/// The slots of a service served by `levels` (each slot names a position in the
/// service's backends) and its `SM_TIERS` value: per level its healthy, degraded
/// and all-hosts ranges, one after another (a level whose hosts are all healthy
/// serves its panic from its healthy range), within its slot budget.
pub fn layout(levels: &Levels) -> (Vec<usize>, Tiers) {
    let mut t = counts(levels);
    // Ranges to lay out: (level, which: 0 healthy, 1 degraded, 2 all).
    let mut ranges: Vec<(usize, u8, &Range)> = Vec::new();
    for (i, l) in levels.levels.iter().enumerate().take(MAX_TIERS) {
        ranges.push((i, tiers::HEALTHY, &l.healthy));
        ranges.push((i, tiers::DEGRADED, &l.degraded));
        if !same_hosts(&l.all, &l.healthy) {
            ranges.push((i, tiers::ALL, &l.all));
        }
    }
    let total: usize = ranges.iter().map(|(_, _, r)| r.len()).sum();
    let mut slots = Vec::new();
    for (i, which, members) in ranges {
        let cap = (LEVEL_SLOTS * members.len() / total.max(1)).min(RANGE_SLOTS);
        let weights: Vec<u32> = members.iter().map(|&(_, w)| w).collect();
        let start = slots.len();
        slots.extend(
            crate::lb::weighted_slots_capped(&weights, cap)
                .into_iter()
                .map(|k| members[k].0),
        );
        #[expect(
            clippy::cast_possible_truncation,
            reason = "within LEVEL_SLOTS (or one per host), a u16"
        )]
        let range = SlotRange {
            start: start as u16,
            len: (slots.len() - start) as u16,
        };
        let tier = &mut t.tiers[i];
        match which {
            tiers::HEALTHY => {
                tier.healthy_slots = range;
                tier.all_slots = range;
            }
            tiers::DEGRADED => tier.degraded_slots = range,
            _ => tier.all_slots = range,
        }
    }
    // The loads with no host ejected; the writer recomputes them with the
    // ejections running when it publishes, and as they come and go.
    t.choice = tiers::choice_table(&t, &tiers::loads(&t, &tiers::Ejected::NONE));
    (slots, t)
}

/// `levels` of a service cut to the backends at positions `kept` (ascending) of
/// the old list, which are `backends` of the new one: each range keeps its
/// hosts that stay, renumbered, and each level counts the hosts it keeps.
pub fn retain(levels: &Levels, kept: &[usize], backends: &[Backend]) -> Levels {
    let new_pos = |old: usize| kept.binary_search(&old).ok();
    let cut = |range: &Range| -> Range {
        range
            .iter()
            .filter_map(|&(pos, w)| Some((new_pos(pos)?, w)))
            .collect()
    };
    Levels {
        levels: levels
            .levels
            .iter()
            .map(|l| {
                let all = cut(&l.all);
                let count = |state: BackendState| {
                    all.iter()
                        .filter(|&&(p, _)| backends[p].state == state)
                        .count() as u32
                };
                Level {
                    healthy: cut(&l.healthy),
                    degraded: cut(&l.degraded),
                    hosts: all.len() as u32 - count(BackendState::Draining),
                    healthy_hosts: count(BackendState::Active),
                    degraded_hosts: count(BackendState::Degraded),
                    total: all.len() as u32,
                    all,
                }
            })
            .collect(),
        ..levels.clone()
    }
}

/// The level of each position of a service's backends (0 for a position no level
/// names), for `BackendInfo::level`.
pub fn level_of_positions(levels: &Levels) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, l) in levels.levels.iter().enumerate().take(MAX_TIERS) {
        for &(pos, _) in &l.all {
            if out.len() <= pos {
                out.resize(pos + 1, 0);
            }
            #[expect(clippy::cast_possible_truncation, reason = "i < MAX_TIERS")]
            {
                out[pos] = i as u8;
            }
        }
    }
    out
}

/// A range's hosts: (position in the service's backends, slot weight).
type Range = Vec<(usize, u32)>;

/// Whether two ranges name the same hosts with proportional weights.
fn same_hosts(a: &[(usize, u32)], b: &[(usize, u32)]) -> bool {
    let (Some(&(_, wa)), Some(&(_, wb))) = (a.first(), b.first()) else {
        return a.is_empty() && b.is_empty();
    };
    a.len() == b.len()
        && a.iter().zip(b).all(|(&(pa, x), &(pb, y))| {
            pa == pb && u64::from(x) * u64::from(wb) == u64::from(y) * u64::from(wa)
        })
}

/// `levels` of `service` as `/config_dump` shows them, with `ejected` hosts out.
pub fn to_json(service: &Service, levels: &Levels, ejected: &tiers::Ejected) -> LevelsJson {
    let loads = tiers::loads(&counts(levels), ejected);
    let shares = static_shares(levels, service.backends.len(), ejected);
    LevelsJson {
        overprovisioning: levels.overprovisioning,
        panic_percent: levels.panic_percent,
        levels: levels
            .levels
            .iter()
            .enumerate()
            .map(|(i, l)| LevelJson {
                hosts: l.hosts,
                healthy_hosts: l.healthy_hosts,
                degraded_hosts: l.degraded_hosts,
                healthy_load: loads.healthy[i],
                degraded_load: loads.degraded[i],
                panic: loads.panic & (1 << i) != 0,
                shares: l
                    .all
                    .iter()
                    .filter_map(|&(pos, _)| {
                        let b = service.backends.get(pos)?;
                        let key = crate::dataplane::backend_display(b.address, b.port);
                        Some((key, (shares[pos] * 100_000.0).round() / 1_000.0))
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shortcut agrees with the whole plan wherever it applies, over seeded
    /// assignments near the usual one (a duplicate address, a draining host, a
    /// second priority or locality, locality weighting, shared weight factors, a
    /// low overprovisioning factor), and applies to the usual one.
    #[test]
    fn the_usual_assignment_plans_as_it_is() {
        use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(11);
        let mut applied = 0;
        for round in 0..3_000 {
            let n = rng.random_range(1..=40);
            let overprovisioning = if rng.random_range(0..10) == 0 {
                50
            } else {
                140
            };
            let mut hosts: Vec<Backend> = (0..n)
                .map(|i| {
                    Backend::new(std::net::IpAddr::from([10, 0, 0, i as u8]), 80)
                        .weighted(if rng.random_range(0..4) == 0 { 2 } else { 1 })
                        .placed(Placement {
                            overprovisioning,
                            ..Placement::default()
                        })
                })
                .collect();
            match rng.random_range(0..8) {
                0 => hosts[rng.random_range(0..n)].address = hosts[0].address,
                1 => hosts[rng.random_range(0..n)].state = BackendState::Draining,
                2 => hosts[rng.random_range(0..n)].placement.priority = 1,
                3 => hosts[rng.random_range(0..n)].placement.locality = 1,
                4 => hosts.iter_mut().for_each(|b| b.weight *= 3),
                _ => {}
            }
            let settings = LbSettings {
                locality_weighted: rng.random_range(0..10) == 0,
                ..LbSettings::default()
            };
            let dynamic = rng.random_range(0..2) == 0;
            if as_they_are(&hosts, settings) {
                applied += 1;
                let whole = plan_whole(&hosts, settings, dynamic);
                assert_eq!(whole.backends, hosts, "round {round}");
                assert_eq!(whole.levels, None, "round {round}");
                assert_eq!(whole.dropped_levels, 0, "round {round}");
                assert_eq!(plan(&hosts, settings, dynamic), whole, "round {round}");
            }
        }
        assert!(applied > 500, "the shortcut applied {applied} times");
        let usual: Vec<Backend> = (0..10u8)
            .map(|i| Backend::new(std::net::IpAddr::from([10, 0, 1, i]), 80))
            .collect();
        assert!(as_they_are(&usual, LbSettings::default()));
    }

    fn host(i: u8, priority: u8, locality: u16, locality_weight: u32) -> Backend {
        Backend::new(format!("10.0.{priority}.{i}").parse().expect("ip"), 80).placed(Placement {
            priority,
            locality,
            locality_weight,
            ..Placement::default()
        })
    }

    fn weights(p: &Planned) -> Vec<u32> {
        p.backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
            .map(|b| b.weight)
            .collect()
    }

    /// The two zones: 10 endpoints in zone a (locality weight 10), 2 in
    /// zone b (weight 2): with locality weighting every endpoint gets 1/12, as
    /// with equal endpoint weights and no locality weighting.
    #[test]
    fn locality_weights_are_shares_of_the_localities_not_factors() {
        let mut eps: Vec<Backend> = (0..10).map(|i| host(i, 0, 0, 10)).collect();
        eps.extend((10..12).map(|i| host(i, 0, 1, 2)));
        let weighted = LbSettings {
            locality_weighted: true,
            ..LbSettings::default()
        };
        let p = plan(&eps, weighted, false);
        let w = weights(&p);
        assert_eq!(w.len(), 12);
        assert!(w.iter().all(|&x| x == w[0]), "{w:?}");
        let p = plan(&eps, LbSettings::default(), false);
        assert!(weights(&p).iter().all(|&x| x == 1));
    }

    /// Priority 0 with 1 healthy endpoint of 10, priority 1 all healthy: 14 % and
    /// 86 % (Envoy's overprovisioning of 1.4).
    #[test]
    fn a_level_with_few_healthy_hosts_spills_to_the_next() {
        let mut eps: Vec<Backend> = (0..10)
            .map(|i| {
                let b = host(i, 0, 0, 0);
                if i == 0 {
                    b
                } else {
                    b.in_state(BackendState::Unhealthy)
                }
            })
            .collect();
        eps.extend((0..10).map(|i| host(i, 1, 1, 0)));
        let p = plan(&eps, LbSettings::default(), false);
        let total: f64 = weights(&p).iter().map(|&w| f64::from(w)).sum();
        let first = f64::from(p.backends[0].weight) / total;
        assert!((first - 0.14).abs() < 1e-6, "{first}");
        // With outlier detection the kernel keeps the levels.
        let p = plan(&eps, LbSettings::default(), true);
        let levels = p.levels.expect("levels");
        assert_eq!(levels.levels.len(), 2);
        let (slots, t) = layout(&levels);
        assert_eq!(t.tiers[0].healthy_slots, SlotRange { start: 0, len: 1 });
        assert_eq!(t.tiers[0].all_slots.len, 10);
        assert_eq!(t.tiers[1].healthy_slots.len, 10);
        assert_eq!(t.tiers[1].all_slots, t.tiers[1].healthy_slots);
        assert_eq!(slots.len(), 21);
    }

    #[test]
    fn one_level_of_healthy_hosts_with_outlier_detection_is_one_set() {
        let eps: Vec<Backend> = (0..3).map(|i| host(i, 0, 0, 0)).collect();
        let p = plan(&eps, LbSettings::default(), true);
        assert!(p.levels.is_none());
        assert_eq!(weights(&p).len(), 3);
    }

    #[test]
    fn levels_past_the_kernels_are_dropped_and_counted() {
        let eps: Vec<Backend> = (0..10).map(|i| host(0, i, 0, 0)).collect();
        let p = plan(&eps, LbSettings::default(), true);
        assert_eq!(p.dropped_levels, 2);
        assert_eq!(p.levels.expect("levels").levels.len(), MAX_TIERS);
    }
}
