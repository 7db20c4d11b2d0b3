//! `/config_dump`'s `load_balancing`: each service the kernel serves by priority
//! levels, as the kernel applies them now, to compare with what Envoy would do
//! (`istioctl proxy-config endpoints`).
//!
//! The numbers come from what was written to the kernel, not from the
//! configuration: a level's load is the part of the published choice table (one
//! entry per percent of a connect()'s draw, rewritten as ejections come and go)
//! that names its ranges, and an endpoint's share is its range's load times the
//! slots it holds in that range over the slots of the range's hosts not ejected
//! now (the kernel draws again when it lands on an ejected host, except in a
//! range served in panic, where ejections are ignored). The configuration only
//! labels them: each endpoint's priority and locality.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};
use sockmesh_common::tiers;

use crate::{dataplane::published::PublishedLevels, model::BackendState, xds::clusters::Place};

/// One service's levels as the kernel applies them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LevelsDump {
    /// The assignment's `policy.overprovisioning_factor`, percent.
    pub overprovisioning_factor: u32,
    /// The cluster's `healthy_panic_threshold`, percent (0: no panic).
    pub panic_threshold: u32,
    /// By priority.
    pub levels: Vec<LevelDump>,
    /// Percent of new connections no range serves: refused.
    pub refused_load: u32,
    /// Percent of new connections drawn into a range whose hosts are all
    /// ejected now: the kernel walks on to the service's other hosts until the
    /// choice table follows the ejection.
    pub unsettled_load: u32,
    /// Every endpoint, by `address:port`.
    pub endpoints: BTreeMap<String, EndpointDump>,
}

impl Eq for LevelsDump {}

/// One priority level.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LevelDump {
    /// The assignment's priority of its endpoints (absent: the configuration
    /// does not name them any more, or has no single assignment).
    pub priority: Option<u32>,
    /// Its hosts (excluded, DRAINING, ones left out), healthy and degraded ones
    /// as the control plane reports them, and all of them.
    pub hosts: u32,
    pub healthy: u32,
    pub degraded: u32,
    pub total: u32,
    /// Its healthy and degraded hosts the kernel has ejected now (outlier
    /// detection), which count as unhealthy.
    pub ejected_healthy: u32,
    pub ejected_degraded: u32,
    /// Percent of new connections to its healthy hosts, to its degraded ones,
    /// and to all its hosts (the level is in panic: ejections are ignored).
    pub healthy_load: u32,
    pub degraded_load: u32,
    pub panic_load: u32,
    /// Its localities' shares of the service's new connections, percent, by
    /// `region/zone/sub_zone`.
    pub localities: BTreeMap<String, f64>,
}

/// One endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointDump {
    /// Its level (index in `levels`).
    pub level: usize,
    pub priority: Option<u32>,
    pub locality: Option<String>,
    /// Its EDS health as the kernel holds it: `healthy`, `degraded`,
    /// `unhealthy` or `draining`.
    pub health: String,
    /// The kernel has ejected it now.
    pub ejected: bool,
    /// Its share of the service's new connections now, percent.
    pub share: f64,
}

/// `p`'s levels as the kernel applies them with `ejected` endpoints ejected now,
/// labelled with `places` (the configuration's, when there is one).
pub fn dump(
    p: &PublishedLevels,
    ejected: &BTreeSet<(IpAddr, u16)>,
    places: Option<&BTreeMap<(IpAddr, u16), Place>>,
) -> LevelsDump {
    let t = &p.tiers;
    let is_ejected = |pos: usize| {
        p.backends
            .get(pos)
            .is_some_and(|b| ejected.contains(&(b.address, b.port)))
    };
    let place = |pos: usize| {
        let b = p.backends.get(pos)?;
        places?.get(&(b.address, b.port))
    };
    // How many of the 100 draws name each range.
    let mut draws: BTreeMap<u8, u32> = BTreeMap::new();
    for &code in &t.choice[..100] {
        *draws.entry(code).or_default() += 1;
    }
    let mut out = LevelsDump {
        overprovisioning_factor: t.overprovisioning,
        panic_threshold: t.panic_percent,
        ..LevelsDump::default()
    };
    let mut share = vec![0.0f64; p.backends.len()];
    for (&code, &count) in &draws {
        let level = p.levels.levels.get(usize::from(code / 3));
        let (Some(level), Some((range, panic))) = (level, tiers::range_of(t, code)) else {
            out.refused_load += count;
            continue;
        };
        let hosts = match code % 3 {
            tiers::HEALTHY => &level.healthy,
            tiers::DEGRADED => &level.degraded,
            _ => &level.all,
        };
        let serving: Vec<(usize, u32)> = hosts
            .iter()
            .copied()
            .filter(|&(pos, _)| panic || !is_ejected(pos))
            .collect();
        let slots: u64 = serving.iter().map(|&(_, w)| u64::from(w)).sum();
        if range.len == 0 || hosts.is_empty() {
            out.refused_load += count;
        } else if slots == 0 {
            out.unsettled_load += count;
        } else {
            for (pos, w) in serving {
                if let Some(s) = share.get_mut(pos) {
                    *s += f64::from(count) * f64::from(w) / slots as f64;
                }
            }
        }
    }
    for (i, level) in p.levels.levels.iter().enumerate() {
        let tier = t.tiers.get(i).copied().unwrap_or_default();
        let code = |which: u8| {
            u8::try_from(i * 3)
                .ok()
                .and_then(|c| draws.get(&(c + which)).copied())
                .unwrap_or(0)
        };
        let mut dump = LevelDump {
            priority: level
                .all
                .iter()
                .find_map(|&(pos, _)| place(pos))
                .map(|p| p.priority),
            hosts: tier.hosts,
            healthy: tier.healthy,
            degraded: tier.degraded,
            total: tier.total,
            healthy_load: code(tiers::HEALTHY),
            degraded_load: code(tiers::DEGRADED),
            panic_load: code(tiers::ALL),
            ..LevelDump::default()
        };
        for &(pos, _) in &level.all {
            let Some(b) = p.backends.get(pos) else {
                continue;
            };
            let ejected = is_ejected(pos);
            match b.state {
                BackendState::Active if ejected => dump.ejected_healthy += 1,
                BackendState::Degraded if ejected => dump.ejected_degraded += 1,
                _ => {}
            }
            let locality = place(pos).map(|p| p.locality.clone());
            if let Some(l) = &locality {
                *dump.localities.entry(l.clone()).or_default() += share[pos];
            }
            out.endpoints.insert(
                crate::dataplane::backend_display(b.address, b.port),
                EndpointDump {
                    level: i,
                    priority: place(pos).map(|p| p.priority),
                    locality,
                    health: health_name(b.state).to_owned(),
                    ejected,
                    share: rounded(share[pos]),
                },
            );
        }
        for s in dump.localities.values_mut() {
            *s = rounded(*s);
        }
        out.levels.push(dump);
    }
    out
}

/// A percentage to 3 decimals (the slot tables' precision is finer than that).
fn rounded(percent: f64) -> f64 {
    (percent * 1_000.0).round() / 1_000.0
}

fn health_name(s: BackendState) -> &'static str {
    match s {
        BackendState::Active => "healthy",
        BackendState::Degraded => "degraded",
        BackendState::Unhealthy => "unhealthy",
        BackendState::Draining => "draining",
    }
}

#[cfg(test)]
mod tests {
    use sockmesh_common::{SlotRange, Tier, Tiers, tiers::Ejected};

    use super::*;
    use crate::model::{Backend, Level, Levels};

    fn ip(i: u8) -> IpAddr {
        [10, 10, 1, i].into()
    }

    /// Priority 0 (b1, b2) and priority 1 (b3, b4), every host healthy, each range
    /// one slot per host (b2 holding 3 in its level's), choice table written with
    /// `ejected` running.
    fn two_levels(ejected: &Ejected) -> PublishedLevels {
        let backends: Vec<Backend> = (1..=4).map(|i| Backend::new(ip(i), 80)).collect();
        let level = |a: usize, b: usize, wb: u32| Level {
            healthy: vec![(a, 1), (b, wb)],
            degraded: vec![],
            all: vec![(a, 1), (b, wb)],
            hosts: 2,
            healthy_hosts: 2,
            degraded_hosts: 0,
            total: 2,
        };
        let levels = Levels {
            overprovisioning: 140,
            panic_percent: 50,
            levels: vec![level(0, 1, 3), level(2, 3, 1)],
        };
        let tier = |start: u16, len: u16| {
            let r = SlotRange { start, len };
            Tier {
                healthy_slots: r,
                all_slots: r,
                hosts: 2,
                healthy: 2,
                total: 2,
                ..Tier::default()
            }
        };
        let mut t = Tiers {
            count: 2,
            overprovisioning: 140,
            panic_percent: 50,
            ..Tiers::default()
        };
        t.tiers[0] = tier(0, 4);
        t.tiers[1] = tier(4, 2);
        t.choice = tiers::choice_table(&t, &tiers::loads(&t, ejected));
        PublishedLevels::new(backends, levels, t)
    }

    fn places() -> BTreeMap<(IpAddr, u16), Place> {
        (1..=4)
            .map(|i| {
                let (priority, zone) = if i <= 2 { (0, "a") } else { (1, "b") };
                let place = Place {
                    priority,
                    locality: format!("r/{zone}/"),
                };
                ((ip(i), 80), place)
            })
            .collect()
    }

    #[test]
    fn loads_and_shares_are_read_from_the_choice_table_and_the_slots() {
        let p = two_levels(&Ejected::NONE);
        let d = dump(&p, &BTreeSet::new(), Some(&places()));
        assert_eq!(d.levels[0].healthy_load, 100);
        assert_eq!(d.levels[1].healthy_load, 0);
        assert_eq!(d.levels[0].priority, Some(0));
        assert_eq!(d.levels[1].priority, Some(1));
        // b2 holds 3 of its range's 4 slots.
        assert_eq!(d.endpoints["10.10.1.1:80"].share, 25.0);
        assert_eq!(d.endpoints["10.10.1.2:80"].share, 75.0);
        assert_eq!(d.endpoints["10.10.1.3:80"].share, 0.0);
        assert_eq!(d.levels[0].localities["r/a/"], 100.0);
        assert_eq!(
            d.endpoints["10.10.1.4:80"].locality.as_deref(),
            Some("r/b/")
        );
        assert_eq!((d.refused_load, d.unsettled_load), (0, 0));
    }

    /// One host of priority 0 ejected: the choice table the writer published
    /// with that ejection gives priority 0 70 % (Envoy: 1 of 2 healthy, health
    /// min(100, 140 × 1 / 2)) and the kernel's redraw gives all of it to b2.
    #[test]
    fn an_ejection_moves_the_loads_the_table_was_written_with() {
        let mut running = Ejected::NONE;
        running.add(0, false);
        let p = two_levels(&running);
        let ejected = BTreeSet::from([(ip(1), 80)]);
        let d = dump(&p, &ejected, Some(&places()));
        assert_eq!(
            (d.levels[0].healthy_load, d.levels[1].healthy_load),
            (70, 30)
        );
        assert_eq!(d.levels[0].ejected_healthy, 1);
        assert!(d.endpoints["10.10.1.1:80"].ejected);
        assert_eq!(d.endpoints["10.10.1.1:80"].share, 0.0);
        assert_eq!(d.endpoints["10.10.1.2:80"].share, 70.0);
        assert_eq!(d.endpoints["10.10.1.3:80"].share, 15.0);
        assert_eq!(d.levels[1].localities["r/b/"], 30.0);
        // The table as published is what counts: an ejection the writer has not
        // followed yet leaves the loads, and only the redraw moves.
        let stale = two_levels(&Ejected::NONE);
        let d = dump(&stale, &ejected, None);
        assert_eq!(d.levels[0].healthy_load, 100);
        assert_eq!(d.endpoints["10.10.1.2:80"].share, 100.0);
        assert_eq!(d.levels[0].priority, None);
    }

    #[test]
    fn a_range_in_panic_ignores_ejections_and_one_all_ejected_is_unsettled() {
        let mut p = two_levels(&Ejected::NONE);
        p.tiers.choice[..100].fill(tiers::ALL);
        let both = BTreeSet::from([(ip(1), 80), (ip(2), 80)]);
        let d = dump(&p, &both, None);
        assert_eq!(d.levels[0].panic_load, 100);
        assert_eq!(d.endpoints["10.10.1.1:80"].share, 25.0);
        p.tiers.choice[..100].fill(tiers::HEALTHY);
        let d = dump(&p, &both, None);
        assert_eq!(
            (d.unsettled_load, d.endpoints["10.10.1.2:80"].share),
            (100, 0.0)
        );
        p.tiers.choice[..100].fill(tiers::NO_RANGE);
        assert_eq!(dump(&p, &both, None).refused_load, 100);
    }
}
