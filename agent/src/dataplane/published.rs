//! What the kernel holds of each service served by priority levels, as the
//! writer wrote it: the published generation's `SM_TIERS` value (host counts and
//! the choice table, written with the ejections running then) and the hosts of
//! each of its slot ranges, weighted by the slots they hold. The datapath task
//! publishes it with its status; `/config_dump` turns it into each level's load
//! and each endpoint's share.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use sockmesh_common::Tiers;

use super::{
    keys::{port_from_map, service_addr, service_key, words_to_ip},
    mirror::{Installed, Mirror, levels_of, state_of},
};
use crate::model::{Backend, Levels, ServiceAddr};

/// One service's levels as published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedLevels {
    /// The service's backends in index order: the positions the ranges name.
    pub backends: Vec<Backend>,
    /// Each level's ranges, their hosts weighted by the slots they hold, and its
    /// host counts.
    pub levels: Levels,
    /// The `SM_TIERS` value as written.
    pub tiers: Tiers,
    /// Which publish this is (service id, generation, revision): the ranges are
    /// read from the slots again only when it changes.
    stamp: (u32, u8, u32),
}

impl PublishedLevels {
    /// Levels as a publish would hold them (tests build them by hand).
    #[cfg(any(test, feature = "testing"))]
    pub fn new(backends: Vec<Backend>, levels: Levels, tiers: Tiers) -> Self {
        Self {
            backends,
            levels,
            tiers,
            stamp: (0, 0, 0),
        }
    }
}

/// Every service with levels, by service.
pub type PublishedMap = BTreeMap<ServiceAddr, Arc<PublishedLevels>>;

/// The levels `mirror` holds: of every service, or with `only`, `previous` with
/// those services' entries brought up to date (added, replaced, removed). An
/// entry whose publish is the same is reused (its choice table updated):
/// counting a range's slots is done once per publish, not once per ejection.
pub(super) fn published(
    mirror: &Mirror,
    only: Option<&BTreeSet<ServiceAddr>>,
    previous: &PublishedMap,
) -> PublishedMap {
    let entry = |service: &ServiceAddr, inst: &Installed| {
        let tiers = inst.tiers.as_ref()?;
        let stamp = (inst.id, inst.generation, inst.revision);
        Some(match previous.get(service) {
            Some(p) if p.stamp == stamp && p.backends.len() == inst.backends.len() => {
                if p.tiers == **tiers {
                    Arc::clone(p)
                } else {
                    Arc::new(PublishedLevels {
                        tiers: **tiers,
                        ..PublishedLevels::clone(p)
                    })
                }
            }
            _ => Arc::new(of(inst, tiers, stamp)),
        })
    };
    let Some(only) = only else {
        return mirror
            .services
            .iter()
            .filter_map(|(key, inst)| {
                let service = service_addr(key)?;
                Some((service, entry(&service, inst)?))
            })
            .collect();
    };
    let mut out = previous.clone();
    for service in only {
        match mirror
            .services
            .get(&service_key(service))
            .and_then(|inst| entry(service, inst))
        {
            Some(e) => out.insert(*service, e),
            None => out.remove(service),
        };
    }
    out
}

fn of(inst: &Installed, tiers: &Tiers, stamp: (u32, u8, u32)) -> PublishedLevels {
    let backends = inst
        .backends
        .values()
        .map(|b| {
            Backend::new(words_to_ip(b.addr), port_from_map(b.port))
                .weighted(b.weight)
                .in_state(state_of(b.state))
        })
        .collect();
    PublishedLevels {
        backends,
        levels: levels_of(inst, tiers),
        tiers: *tiers,
        stamp,
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{
        dataplane::{MapWriter, service_key, store::MemStore},
        lb::levels::{LbSettings, plan},
        model::{Health, LbPolicy, Outlier, Placement, Protocol, RoutingTable, Service},
    };

    fn svc() -> ServiceAddr {
        ServiceAddr {
            vip: [10, 96, 0, 1].into(),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    /// Priority 0: 2 hosts, priority 1: 2 hosts, outlier detection.
    fn table() -> RoutingTable {
        let host = |i: u8, priority: u8| {
            Backend::new(IpAddr::from([10, 0, 0, i]), 80).placed(Placement {
                priority,
                ..Placement::default()
            })
        };
        let hosts = [host(1, 0), host(2, 0), host(3, 1), host(4, 1)];
        let planned = plan(&hosts, LbSettings::default(), true);
        let health = Health {
            outlier: Some(Outlier {
                consecutive: 3,
                enforcing: 100,
                base_ejection_ms: 30_000,
                max_ejection_ms: 300_000,
                interval_ms: 10_000,
                max_ejection_percent: 100,
                panic_percent: 50,
            }),
            max_connections: None,
        };
        let mut t = RoutingTable::default();
        t.insert(
            svc(),
            Service::new(planned.backends, LbPolicy::Random)
                .with_health(health)
                .with_levels(planned.levels),
        );
        t
    }

    #[test]
    fn the_published_levels_are_what_was_written_and_follow_its_choice_table() {
        let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
        w.apply(&table()).expect("written");
        let first = w.published_levels(None, &PublishedMap::new());
        let p = &first[&svc()];
        let written = *w.store().tiers.values().next().expect("SM_TIERS entry");
        assert_eq!(p.tiers, written);
        assert_eq!(p.backends.len(), 4);
        // Each range's hosts, weighted by the slots they hold.
        let slots: u32 = p.levels.levels[0].healthy.iter().map(|&(_, w)| w).sum();
        assert_eq!(
            slots,
            u32::from(p.tiers.tiers[0].healthy_slots.len),
            "{p:?}"
        );
        // Nothing moved: the same entry, looked at alone or with all.
        let only = BTreeSet::from([svc()]);
        let again = w.published_levels(Some(&only), &first);
        assert!(Arc::ptr_eq(&again[&svc()], p));
        assert!(Arc::ptr_eq(&w.published_levels(None, &first)[&svc()], p));
        // An ejection: the rewritten choice table, the same ranges.
        let mut running = crate::dataplane::store::Running::default();
        running.ejected.add(0, false);
        w.store_mut().running.insert(service_key(&svc()), running);
        w.refresh_levels(None).expect("refreshed");
        let after = w.published_levels(Some(&only), &first);
        let q = &after[&svc()];
        assert_ne!(q.tiers.choice, p.tiers.choice);
        assert_eq!(q.tiers, *w.store().tiers.values().next().expect("entry"));
        assert_eq!(q.levels, p.levels);
        // Gone from the maps, gone from the view; a service not looked at stays
        // as it was.
        w.apply(&RoutingTable::default()).expect("removed");
        assert_eq!(w.published_levels(Some(&BTreeSet::new()), &after), after);
        assert!(w.published_levels(Some(&only), &after).is_empty());
        assert!(w.published_levels(None, &after).is_empty());
    }
}
