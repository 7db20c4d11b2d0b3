//! Slot resolution, the one lookup chain every reader of the routing maps follows:
//! service key → [`ServiceValue`] → [`SlotKey`] (id, published generation, slot) →
//! backend index → [`BackendKey`] → backend.
//!
//! The kernel programs (`ebpf/programs/src/xlate.rs`) resolve one slot per
//! connect(); the agent's in-memory fake (`MemStore`) and its reader of the pinned
//! maps (`KernelMaps::reachable`) resolve every published slot. All three implement
//! [`RoutingMaps`] over their maps and call the functions below, so the key layout
//! is written once.

use crate::{BackendKey, ServiceKey, ServiceValue, SlotKey};

/// Read access to the three routing maps. Absent keys are `Ok(None)`; `Error` is
/// whatever a lookup itself can fail with (`Infallible` in the kernel and in memory).
pub trait RoutingMaps {
    /// What a backend lookup yields (the kernel copies out only address and port).
    type Backend;
    type Error;
    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, Self::Error>;
    fn slot(&self, key: &SlotKey) -> Result<Option<u32>, Self::Error>;
    fn backend(&self, key: &BackendKey) -> Result<Option<Self::Backend>, Self::Error>;
}

/// Slot `slot` of `service`'s published generation.
#[inline(always)]
pub fn slot_key(service: &ServiceValue, slot: u16) -> SlotKey {
    SlotKey {
        service_id: service.id,
        generation: service.generation,
        pad: 0,
        slot,
    }
}

/// Backend `index` of `service`.
#[inline(always)]
pub fn backend_key(service: &ServiceValue, index: u32) -> BackendKey {
    BackendKey {
        service_id: service.id,
        index,
    }
}

/// What one slot resolves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot<B> {
    Backend(B),
    /// The slot, or the backend it names, is absent: an update replaced the service
    /// between the service lookup and this one (or, read from userspace, the maps are
    /// inconsistent). The key is the slot's.
    Missing(SlotKey),
}

/// Resolves slot `slot` of `service`'s published generation.
#[inline(always)]
pub fn resolve_slot<M: RoutingMaps>(
    maps: &M,
    service: &ServiceValue,
    slot: u16,
) -> Result<Slot<M::Backend>, M::Error> {
    let key = slot_key(service, slot);
    let Some(index) = maps.slot(&key)? else {
        return Ok(Slot::Missing(key));
    };
    Ok(match maps.backend(&backend_key(service, index))? {
        Some(backend) => Slot::Backend(backend),
        None => Slot::Missing(key),
    })
}

/// The slot indexes of `service`'s published generation. The agent keeps
/// `slot_count` within `MAX_SLOTS_PER_SERVICE`, inside the `u16` index range; a
/// larger count (written by something else) is cut at that range.
pub fn published_slots(service: &ServiceValue) -> impl Iterator<Item = u16> {
    (0..=u16::MAX).take(service.slot_count as usize)
}

/// What a forward lookup of one service address found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Picked<B> {
    /// Not a service address.
    NotService,
    /// A service with no active backend (`slot_count` 0).
    NoBackend,
    Backend(B),
    /// The chosen slot did not resolve (see [`Slot::Missing`]); a retry reads the
    /// newly published service value.
    Raced,
}

/// Looks `key` up and resolves slot `random() % slot_count`. `random` is called
/// only for a service with active backends.
#[inline(always)]
pub fn pick<M: RoutingMaps>(
    maps: &M,
    key: &ServiceKey,
    random: impl FnOnce() -> u32,
) -> Result<Picked<M::Backend>, M::Error> {
    let Some(service) = maps.service(key)? else {
        return Ok(Picked::NotService);
    };
    if service.slot_count == 0 {
        return Ok(Picked::NoBackend);
    }
    // Below slot_count, which the agent keeps within MAX_SLOTS_PER_SERVICE (≤ 65,536).
    let slot = (random() % service.slot_count) as u16;
    Ok(match resolve_slot(maps, &service, slot)? {
        Slot::Backend(b) => Picked::Backend(b),
        Slot::Missing(_) => Picked::Raced,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::convert::Infallible;
    use std::{collections::BTreeMap, vec::Vec};

    use super::*;

    #[derive(Default)]
    struct Maps {
        services: BTreeMap<ServiceKey, ServiceValue>,
        slots: BTreeMap<SlotKey, u32>,
        backends: BTreeMap<BackendKey, u16>,
    }

    impl RoutingMaps for Maps {
        type Backend = u16;
        type Error = Infallible;
        fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, Infallible> {
            Ok(self.services.get(key).copied())
        }
        fn slot(&self, key: &SlotKey) -> Result<Option<u32>, Infallible> {
            Ok(self.slots.get(key).copied())
        }
        fn backend(&self, key: &BackendKey) -> Result<Option<u16>, Infallible> {
            Ok(self.backends.get(key).copied())
        }
    }

    const KEY: ServiceKey = ServiceKey {
        addr: [0, 0, crate::V4_MAPPED_WORD, 0x0100_000a],
        port: 80u16.to_be(),
        proto: crate::PROTO_TCP,
        pad: 0,
    };

    /// Service 7, generation 1, slots 0..3 → backends 5, 6, 5 (ports 500, 600).
    fn maps() -> Maps {
        let value = ServiceValue {
            id: 7,
            slot_count: 3,
            generation: 1,
            pad: [0; 3],
            revision: 1,
        };
        let mut m = Maps::default();
        m.services.insert(KEY, value);
        for (slot, index) in [(0, 5), (1, 6), (2, 5)] {
            m.slots.insert(slot_key(&value, slot), index);
        }
        m.backends.insert(backend_key(&value, 5), 500);
        m.backends.insert(backend_key(&value, 6), 600);
        // The other generation's slot 0 must not be read.
        m.slots.insert(
            SlotKey {
                generation: 0,
                ..slot_key(&value, 0)
            },
            99,
        );
        m
    }

    fn picked(m: &Maps, r: u32) -> Picked<u16> {
        match pick(m, &KEY, || r) {
            Ok(p) => p,
            Err(never) => match never {},
        }
    }

    #[test]
    fn pick_follows_service_slot_backend() {
        let m = maps();
        assert_eq!(picked(&m, 0), Picked::Backend(500));
        assert_eq!(picked(&m, 4), Picked::Backend(600));
        assert_eq!(picked(&m, u32::MAX), Picked::Backend(500));
        let other = ServiceKey { port: 81, ..KEY };
        assert_eq!(pick(&m, &other, || 0), Ok(Picked::NotService));
    }

    #[test]
    fn empty_service_is_no_backend_without_drawing() {
        let mut m = maps();
        if let Some(v) = m.services.get_mut(&KEY) {
            v.slot_count = 0;
        }
        let r = pick(&m, &KEY, || panic!("no draw for an empty service"));
        assert_eq!(r, Ok(Picked::NoBackend));
    }

    #[test]
    fn a_missing_slot_or_backend_is_a_race() {
        let mut m = maps();
        let value = m.services[&KEY];
        m.slots.remove(&slot_key(&value, 1));
        assert_eq!(picked(&m, 1), Picked::Raced);
        m.backends.remove(&backend_key(&value, 5));
        let all: Vec<_> = published_slots(&value)
            .map(|s| resolve_slot(&m, &value, s))
            .collect();
        assert_eq!(
            all,
            [
                Ok(Slot::Missing(slot_key(&value, 0))),
                Ok(Slot::Missing(slot_key(&value, 1))),
                Ok(Slot::Missing(slot_key(&value, 2))),
            ]
        );
    }

    #[test]
    fn published_slots_stay_in_the_index_range() {
        let mut v = maps().services[&KEY];
        assert_eq!(published_slots(&v).collect::<Vec<_>>(), [0, 1, 2]);
        v.slot_count = u32::MAX;
        assert_eq!(published_slots(&v).count(), 65_536);
    }
}
