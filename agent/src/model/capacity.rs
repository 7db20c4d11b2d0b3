//! The routing maps' capacities and the one check against them.
//!
//! The state checks every update with [`Limits::check`] before it commits it, so
//! an update that does not fit is NACKed and never reaches the kernel; the map
//! writer runs the same check again only as an assertion (a table that reaches
//! it has passed).

use sockmesh_common::{
    MAX_BACKENDS_TOTAL, MAX_MAGLEV_SERVICES, MAX_REVERSE_ENTRIES, MAX_REVERSE_UDP_ENTRIES,
    MAX_SERVICES, MAX_SLOTS_TOTAL,
};

use super::{Backend, BackendState, Changes, RoutingTable, Service};

/// Capacities of the routing maps (their `max_entries`), set at install
/// (`--max-services`, `--max-backends`, `--max-slots`, `--max-maglev-services`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub services: u32,
    pub backends: u32,
    pub slots: u32,
    /// Services that may have a Maglev table (the Maglev map holds that many
    /// tables of the largest size, plus one being rewritten).
    pub maglev: u32,
    /// Open redirected sockets the reverse map holds (`--max-reverse`), and
    /// unconnected UDP peers its LRU holds (`--max-reverse-udp`). The kernel
    /// programs fill them; no update is checked against them.
    pub reverse: u32,
    pub reverse_udp: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            services: MAX_SERVICES,
            backends: MAX_BACKENDS_TOTAL,
            slots: MAX_SLOTS_TOTAL,
            maglev: MAX_MAGLEV_SERVICES,
            reverse: MAX_REVERSE_ENTRIES,
            reverse_udp: MAX_REVERSE_UDP_ENTRIES,
        }
    }
}

/// What a table takes of the maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub services: usize,
    pub backends: usize,
    /// Entries of the slot map (a Maglev service's slots are in its table).
    pub slots: usize,
    /// Maglev tables (services with a consistent-hash policy).
    pub maglev: usize,
}

/// An update beyond the maps' capacities.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error("{count} services exceed the limit of {limit} (--max-services)")]
    Services { count: usize, limit: u32 },
    #[error(
        "{count} backends (+{transient} at the peak while services are rewritten) exceed the backend map's capacity of {limit} (--max-backends)"
    )]
    Backends {
        count: usize,
        transient: usize,
        limit: u32,
    },
    #[error(
        "{count} selection slots (+{transient} at the peak while services are rewritten) exceed the slot map's capacity of {limit} (--max-slots)"
    )]
    Slots {
        count: usize,
        transient: usize,
        limit: u32,
    },
    #[error(
        "{count} services with a Maglev table (MAGLEV or RING_HASH clusters) exceed the limit of {limit} (--max-maglev-services)"
    )]
    Maglev { count: usize, limit: u32 },
}

/// The selection slots a service takes: its active backends' (see
/// [`crate::lb::weighted_slots`]), or its priority levels' ranges.
pub fn slot_count(service: &Service) -> usize {
    if let Some(levels) = &service.levels {
        return crate::lb::levels::layout(levels).0.len();
    }
    active_slot_count(&service.backends)
}

/// The selection slots of `backends`' active ones.
pub fn active_slot_count(backends: &[Backend]) -> usize {
    crate::lb::slot_count(
        backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
            .map(|b| b.weight),
    )
}

impl Usage {
    /// One service's backends and slots (or Maglev table).
    pub fn of_service(service: &Service) -> Self {
        let maglev = service.policy.is_maglev();
        Self {
            services: 1,
            backends: service.len(),
            slots: if maglev { 0 } else { slot_count(service) },
            maglev: usize::from(maglev),
        }
    }

    /// A whole table's.
    pub fn of_table(table: &RoutingTable) -> Self {
        table
            .services
            .values()
            .map(Self::of_service)
            .fold(Self::default(), |a, b| a.plus(&b))
    }

    pub fn plus(&self, o: &Self) -> Self {
        Self {
            services: self.services + o.services,
            backends: self.backends + o.backends,
            slots: self.slots + o.slots,
            maglev: self.maglev + o.maglev,
        }
    }

    pub fn minus(&self, o: &Self) -> Self {
        Self {
            services: self.services.saturating_sub(o.services),
            backends: self.backends.saturating_sub(o.backends),
            slots: self.slots.saturating_sub(o.slots),
            maglev: self.maglev.saturating_sub(o.maglev),
        }
    }

    /// This usage (of `table`) once `changes` are applied, and how far above it
    /// the maps go while they are written ([`write_order`], each service's new
    /// backends and slots written beside its old ones before those are freed): the
    /// peak, simulated in the writer's own order, minus the final usage. `before`
    /// gives a changed service's current usage (none if it is new).
    pub fn after(
        &self,
        changes: &Changes,
        before: impl Fn(&super::ServiceAddr) -> Option<Usage>,
    ) -> (Usage, Usage) {
        let mut usage = *self;
        let mut peak = *self;
        for step in write_order(changes, before) {
            if let Some(new) = step.new {
                peak.backends = peak.backends.max(usage.backends + new.backends);
                peak.slots = peak.slots.max(usage.slots + new.slots);
                usage = usage.plus(&new);
            }
            if let Some(old) = step.old {
                usage = usage.minus(&old);
            }
        }
        // Maglev tables take no transient: the map has room for one more table
        // than the limit, and services are rewritten one at a time.
        let transient = Usage {
            services: 0,
            backends: peak.backends.saturating_sub(usage.backends),
            slots: peak.slots.saturating_sub(usage.slots),
            maglev: 0,
        };
        (usage, transient)
    }
}

/// One service's write, in [`write_order`].
#[derive(Clone, Copy, Debug)]
pub struct WriteStep<'a> {
    pub service: &'a super::ServiceAddr,
    /// Its new backends and policy (`None`: removed).
    pub backends: Option<&'a super::Service>,
    /// What it takes now (`None`: new).
    pub old: Option<Usage>,
    /// What it will take (`None`: removed).
    pub new: Option<Usage>,
}

/// The order the map writer applies `changes` in, which [`Usage::after`]
/// simulates for the capacity check, so the check bounds the real peak: removals
/// first (they free capacity), then services by growth, shrinking ones first, in
/// address order among equals.
pub fn write_order(
    changes: &Changes,
    before: impl Fn(&super::ServiceAddr) -> Option<Usage>,
) -> Vec<WriteStep<'_>> {
    let mut steps: Vec<WriteStep<'_>> = changes
        .iter()
        .map(|(service, after)| WriteStep {
            service,
            backends: after.as_ref(),
            old: before(service),
            new: after.as_ref().map(Usage::of_service),
        })
        .collect();
    let size = |u: Option<Usage>| u.map_or(0, |u| (u.backends + u.slots) as i128);
    // Stable: address order (the map's) among steps of equal growth.
    steps.sort_by_key(|s| (s.new.is_some(), size(s.new) - size(s.old)));
    steps
}

impl Limits {
    /// Whether `usage`, with `transient` more backends and slots at the peak while
    /// services are rewritten, fits in the maps.
    pub fn check(&self, usage: &Usage, transient: &Usage) -> Result<(), CapacityError> {
        if usage.services > self.services as usize {
            return Err(CapacityError::Services {
                count: usage.services,
                limit: self.services,
            });
        }
        if usage.backends + transient.backends > self.backends as usize {
            return Err(CapacityError::Backends {
                count: usage.backends,
                transient: transient.backends,
                limit: self.backends,
            });
        }
        if usage.slots + transient.slots > self.slots as usize {
            return Err(CapacityError::Slots {
                count: usage.slots,
                transient: transient.slots,
                limit: self.slots,
            });
        }
        if usage.maglev > self.maglev as usize {
            return Err(CapacityError::Maglev {
                count: usage.maglev,
                limit: self.maglev,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServiceAddr};

    fn svc(i: u8) -> ServiceAddr {
        ServiceAddr {
            vip: std::net::IpAddr::from([10, 96, 0, i]),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn backends(n: u8, weight: u32) -> Vec<Backend> {
        (1..=n)
            .map(|i| Backend::new(std::net::IpAddr::from([10, 1, 0, i]), 80).weighted(weight))
            .collect()
    }

    #[test]
    fn usage_after_changes_counts_replaced_added_and_removed_services() {
        let mut table = RoutingTable::default();
        table.insert(svc(1), backends(2, 1));
        table.insert(svc(2), backends(3, 1));
        let usage = Usage::of_table(&table);
        assert_eq!(
            usage,
            Usage {
                services: 2,
                backends: 5,
                slots: 5,
                maglev: 0,
            }
        );
        let changes: Changes = [
            (svc(1), None),
            (svc(2), Some(backends(4, 1).into())),
            (svc(3), Some(backends(1, 1).into())),
        ]
        .into();
        let (after, transient) =
            usage.after(&changes, |s| table.services.get(s).map(Usage::of_service));
        assert_eq!(
            after,
            Usage {
                services: 2,
                backends: 5,
                slots: 5,
                maglev: 0,
            }
        );
        // svc(1) removed first (3 left), svc(2) 3 → 4 beside its old 3 (peak 7),
        // svc(3) added (5): 2 above the final usage at the peak.
        assert_eq!((transient.backends, transient.slots), (2, 2));
    }

    #[test]
    fn the_peak_is_simulated_in_the_writers_order_shrinking_services_first() {
        // A and B grow 1 → 5, C shrinks 9 → 1: 11 backends before and after. In
        // address order the maps would reach 20 (A and B's growth before C frees
        // anything); the writer shrinks C first, so the peak is 12.
        let mut table = RoutingTable::default();
        table.insert(svc(1), backends(1, 1));
        table.insert(svc(2), backends(1, 1));
        table.insert(svc(3), backends(9, 1));
        let before = |s: &ServiceAddr| table.services.get(s).map(Usage::of_service);
        let changes: Changes = [
            (svc(1), Some(backends(5, 1).into())),
            (svc(2), Some(backends(5, 1).into())),
            (svc(3), Some(backends(1, 1).into())),
        ]
        .into();
        let order: Vec<ServiceAddr> = write_order(&changes, before)
            .iter()
            .map(|s| *s.service)
            .collect();
        assert_eq!(order, [svc(3), svc(1), svc(2)]);
        let (after, transient) = Usage::of_table(&table).after(&changes, before);
        assert_eq!((after.backends, transient.backends), (11, 1));
    }

    #[test]
    fn every_limit_is_checked_with_the_rewrite_transient() {
        let limits = Limits {
            services: 2,
            backends: 10,
            slots: 10,
            maglev: 1,
            ..Limits::default()
        };
        let ok = Usage {
            services: 2,
            backends: 6,
            slots: 6,
            maglev: 1,
        };
        let t = Usage {
            services: 0,
            backends: 4,
            slots: 4,
            maglev: 0,
        };
        assert_eq!(limits.check(&ok, &t), Ok(()));
        let more = Usage { services: 3, ..ok };
        assert_eq!(
            limits.check(&more, &t).map_err(|e| e.to_string()),
            Err("3 services exceed the limit of 2 (--max-services)".into())
        );
        let backends = Usage { backends: 7, ..ok };
        assert!(matches!(
            limits.check(&backends, &t),
            Err(CapacityError::Backends { count: 7, .. })
        ));
        let slots = Usage { slots: 7, ..ok };
        assert_eq!(
            limits.check(&slots, &t).map_err(|e| e.to_string()),
            Err("7 selection slots (+4 at the peak while services are rewritten) exceed the slot map's capacity of 10 (--max-slots)".into())
        );
        let maglev = Usage { maglev: 2, ..ok };
        assert_eq!(
            limits.check(&maglev, &t).map_err(|e| e.to_string()),
            Err("2 services with a Maglev table (MAGLEV or RING_HASH clusters) exceed the limit of 1 (--max-maglev-services)".into())
        );
    }

    #[test]
    fn a_maglev_service_takes_a_table_not_slots() {
        let service = Service::new(
            backends(3, 1),
            crate::model::LbPolicy::Maglev { table_size: 251 },
        );
        assert_eq!(
            Usage::of_service(&service),
            Usage {
                services: 1,
                backends: 3,
                slots: 0,
                maglev: 1,
            }
        );
        // Random → Maglev frees the slots and takes a table.
        let mut table = RoutingTable::default();
        table.insert(svc(1), backends(3, 1));
        let changes: Changes = [(svc(1), Some(service))].into();
        let (after, _) = Usage::of_table(&table)
            .after(&changes, |s| table.services.get(s).map(Usage::of_service));
        assert_eq!((after.slots, after.maglev), (0, 1));
    }

    #[test]
    fn weighted_services_take_their_slot_count() {
        // 1:3 reduces to 4 slots; a draining backend takes none.
        let mut b = vec![
            Backend::new([10, 1, 0, 1].into(), 80).weighted(100),
            Backend::new([10, 1, 0, 2].into(), 80).weighted(300),
        ];
        assert_eq!(active_slot_count(&b), 4);
        b[1].state = BackendState::Draining;
        assert_eq!(active_slot_count(&b), 1);
    }
}
