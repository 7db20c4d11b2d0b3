//! The writer's mirror of the kernel maps: what each installed service holds, built
//! from a snapshot on adoption and turned back into a [`RoutingTable`].

use std::collections::BTreeMap;

use foldhash::{HashMap, HashMapExt as _, HashSet};

use sockmesh_common::{
    BackendKey, MAGLEV_CHUNK, MAX_TIERS, NO_STATS, ServiceKey, ServicePolicy, SlotKey, SlotRange,
    Tiers, backend_state, service_flags,
};

use super::{
    entries::Entries,
    keys::{port_from_map, service_addr, words_to_ip},
    store::Snapshot,
};
use crate::model::{Backend, BackendState, Level, Levels, RoutingTable};

/// A service as installed in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Installed {
    pub(super) id: u32,
    pub(super) generation: u8,
    pub(super) revision: u32,
    /// Published slots: backend index per slot (indexes stay below twice
    /// `MAX_BACKENDS_PER_SERVICE`, so a `u16` holds them: a 16,381-entry Maglev
    /// table takes 32 KiB here).
    pub(super) slots: Box<[u16]>,
    /// Backend entries present in the map, by index.
    pub(super) backends: Entries,
    /// The kernel copy was found inconsistent on adoption: rewrite on next apply.
    pub(super) dirty: bool,
    /// Entries `0..leftover` of the unpublished generation may still exist (a
    /// delete failed after publishing), in `leftover_in`; the next write of this
    /// service removes them.
    pub(super) leftover: u32,
    pub(super) leftover_in: SlotMap,
    /// The service's counter slot in `SM_SERVICE_STATS`, claimed for it
    /// (`NO_STATS`: none).
    pub(super) stats: u32,
    /// The published load-balancing policy.
    pub(super) policy: crate::model::LbPolicy,
    /// The published [`sockmesh_common::ServiceValue::flags`].
    pub(super) flags: u8,
    /// The service's `SM_SVC_POLICY` entry, if it exists; boxed, as most
    /// services have none.
    pub(super) health: Option<Box<ServicePolicy>>,
    /// The published generation's priority levels (`SM_TIERS`), if it has them;
    /// boxed: few services have levels, and the value is 400 bytes.
    pub(super) tiers: Option<Box<Tiers>>,
    /// The service's `SM_SVC_HEALTH` entry exists.
    pub(super) service_health: bool,
}

// Kept per service: a larger entry is a larger table at every size (at
// 100,000 services each 8 bytes here is a megabyte).
const _: () = assert!(std::mem::size_of::<Installed>() <= 96);

/// Where a service's slots are kept: the slot map, one entry per slot, (a
/// Maglev table) the Maglev map, one chunk per `MAGLEV_CHUNK` entries, or nowhere
/// (direct slots: slot `i` is backend index `i`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SlotMap {
    Slots,
    Maglev,
    Direct,
}

impl SlotMap {
    /// Where a service published with `policy` and `flags` keeps its slots.
    pub(super) fn of(policy: crate::model::LbPolicy, flags: u8) -> Self {
        if flags & service_flags::DIRECT != 0 {
            SlotMap::Direct
        } else if policy.is_maglev() {
            SlotMap::Maglev
        } else {
            SlotMap::Slots
        }
    }

    /// Map entries that hold `slots` slots.
    pub(super) fn entries(self, slots: usize) -> usize {
        match self {
            SlotMap::Slots => slots,
            SlotMap::Maglev => slots.div_ceil(MAGLEV_CHUNK),
            SlotMap::Direct => 0,
        }
    }
}

/// A backend index as a slot holds it. Indexes stay below 2 ×
/// MAX_BACKENDS_PER_SERVICE (the lowest free index before and after an update),
/// well within u16; u16::MAX, which names no backend, stands for anything else.
pub(super) fn slot_index(index: u32) -> u16 {
    u16::try_from(index).unwrap_or(u16::MAX)
}

/// Whether `slots` may be published as direct slots: slot `i` names backend `i`.
pub(super) fn is_direct(slots: &[u16]) -> bool {
    slots
        .iter()
        .enumerate()
        .all(|(i, &index)| usize::from(index) == i)
}

impl Installed {
    /// What it takes of the maps.
    pub(super) fn usage(&self) -> crate::model::Usage {
        let maglev = self.policy.is_maglev();
        crate::model::Usage {
            services: 1,
            backends: self.backends.len(),
            slots: if maglev { 0 } else { self.slots.len() },
            maglev: usize::from(maglev),
        }
    }

    /// The entries it holds in each map the agent writes.
    pub(super) fn entries(&self) -> MapEntries {
        let published = self.slot_map().entries(self.slots.len());
        let in_map = |map: SlotMap| {
            usize::from(self.slot_map() == map) * published
                + usize::from(self.leftover_in == map) * self.leftover as usize
        };
        MapEntries {
            services: 1,
            stats: usize::from(self.stats != NO_STATS),
            slots: in_map(SlotMap::Slots),
            maglev_chunks: in_map(SlotMap::Maglev),
            maglev_tables: usize::from(self.policy.is_maglev()),
            backends: self.backends.len(),
            policies: usize::from(self.health.is_some()),
            service_health: usize::from(self.service_health),
            tiers: usize::from(self.tiers.is_some()),
            least_conn: usize::from(matches!(
                self.policy,
                crate::model::LbPolicy::LeastConn { .. }
            )),
        }
    }

    /// Where its published slots are kept.
    pub(super) fn slot_map(&self) -> SlotMap {
        SlotMap::of(self.policy, self.flags)
    }

    /// A service about to be written for the first time.
    pub(super) fn new(id: u32) -> Self {
        Self {
            id,
            generation: 1,
            revision: 0,
            slots: Box::default(),
            backends: Entries::default(),
            // Not published yet: the first write must publish even an empty service.
            dirty: true,
            leftover: 0,
            leftover_in: SlotMap::Slots,
            stats: NO_STATS,
            policy: crate::model::LbPolicy::Random,
            flags: 0,
            health: None,
            tiers: None,
            service_health: false,
        }
    }
}

/// Entries of each map the agent writes, as its bookkeeping counts them (the
/// fill ratio of `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapEntries {
    pub services: usize,
    /// Claimed counter slots of `SM_SERVICE_STATS`.
    pub stats: usize,
    /// `SM_SLOTS` entries: published slots and the leftovers of failed deletes.
    pub slots: usize,
    /// `SM_MAGLEV` chunks, and the Maglev tables they make up (the capacity
    /// `--max-maglev-services` counts tables).
    pub maglev_chunks: usize,
    pub maglev_tables: usize,
    pub backends: usize,
    /// `SM_SVC_POLICY` entries.
    pub policies: usize,
    /// `SM_SVC_HEALTH` entries.
    pub service_health: usize,
    /// `SM_TIERS` entries.
    pub tiers: usize,
    /// Services published with least connections: the programs count their
    /// backends' connections in `SM_BACKEND_CONNS` (not a map of their own).
    pub least_conn: usize,
}

impl MapEntries {
    fn zip(self, o: Self, f: impl Fn(usize, usize) -> usize) -> Self {
        Self {
            services: f(self.services, o.services),
            stats: f(self.stats, o.stats),
            slots: f(self.slots, o.slots),
            maglev_chunks: f(self.maglev_chunks, o.maglev_chunks),
            maglev_tables: f(self.maglev_tables, o.maglev_tables),
            backends: f(self.backends, o.backends),
            policies: f(self.policies, o.policies),
            service_health: f(self.service_health, o.service_health),
            tiers: f(self.tiers, o.tiers),
            least_conn: f(self.least_conn, o.least_conn),
        }
    }

    #[must_use]
    pub fn plus(self, o: Self) -> Self {
        self.zip(o, usize::saturating_add)
    }

    #[must_use]
    pub fn minus(self, o: Self) -> Self {
        self.zip(o, usize::saturating_sub)
    }
}

/// The mirror of the kernel maps.
#[derive(Clone, Debug, Default)]
pub(super) struct Mirror {
    pub(super) services: HashMap<ServiceKey, Installed>,
    pub(super) next_id: u32,
}

/// Entries found in the maps that no published service uses (left by an agent that
/// stopped mid-update); adoption deletes them.
#[derive(Debug, Default)]
pub(super) struct Garbage {
    pub(super) slots: Vec<SlotKey>,
    pub(super) backends: Vec<BackendKey>,
    pub(super) maglev: Vec<SlotKey>,
    /// Claimed counter slots no published service holds.
    pub(super) counters: Vec<u32>,
    /// Health settings of services that are not published.
    pub(super) policies: Vec<ServiceKey>,
    /// Priority levels of generations that are not published.
    pub(super) tiers: Vec<SlotKey>,
    /// Kernel health entries of services that are not published with a health
    /// flag.
    pub(super) service_health: Vec<ServiceKey>,
}

impl Garbage {
    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty()
            && self.backends.is_empty()
            && self.maglev.is_empty()
            && self.counters.is_empty()
            && self.policies.is_empty()
            && self.tiers.is_empty()
            && self.service_health.is_empty()
    }
}

impl Mirror {
    pub(super) fn from_snapshot(snap: &Snapshot) -> (Self, Garbage) {
        let mut services: HashMap<ServiceKey, Installed> = HashMap::new();
        let mut by_id: HashMap<u32, ServiceKey> = HashMap::new();
        let mut next_id = 0u32;
        for (k, v) in &snap.services {
            by_id.insert(v.id, *k);
            next_id = next_id.max(v.id.wrapping_add(1));
            services.insert(
                *k,
                Installed {
                    id: v.id,
                    generation: v.generation,
                    revision: v.revision,
                    // Direct slots name their own index; the others are read below.
                    slots: if v.flags & service_flags::DIRECT != 0 {
                        (0..v.slot_count.min(u32::from(u16::MAX)))
                            .map(slot_index)
                            .collect()
                    } else {
                        vec![u16::MAX; v.slot_count as usize].into()
                    },
                    backends: Entries::default(),
                    dirty: false,
                    leftover: 0,
                    leftover_in: SlotMap::Slots,
                    stats: v.stats,
                    policy: crate::model::LbPolicy::from_kernel(v),
                    flags: v.flags,
                    health: None,
                    tiers: None,
                    service_health: false,
                },
            );
        }
        let mut garbage = Garbage::default();
        for (k, b) in &snap.backends {
            match by_id.get(&k.service_id).and_then(|sk| services.get_mut(sk)) {
                Some(inst) => {
                    inst.backends.insert(k.index, *b);
                }
                None => garbage.backends.push(*k),
            }
        }
        for (k, index) in &snap.slots {
            let inst = by_id.get(&k.service_id).and_then(|sk| services.get_mut(sk));
            match inst {
                Some(inst)
                    if k.generation == inst.generation
                        && inst.slot_map() == SlotMap::Slots
                        && usize::from(k.slot) < inst.slots.len() =>
                {
                    // An index beyond u16 names no backend: the service is dirty.
                    inst.slots[usize::from(k.slot)] = u16::try_from(*index).unwrap_or(u16::MAX);
                }
                _ => garbage.slots.push(*k),
            }
        }
        for (k, chunk) in &snap.maglev {
            let inst = by_id.get(&k.service_id).and_then(|sk| services.get_mut(sk));
            let first = usize::from(k.slot) * MAGLEV_CHUNK;
            match inst {
                Some(inst)
                    if k.generation == inst.generation
                        && inst.slot_map() == SlotMap::Maglev
                        && first < inst.slots.len() =>
                {
                    let n = (inst.slots.len() - first).min(MAGLEV_CHUNK);
                    for (slot, &index) in
                        inst.slots[first..first + n].iter_mut().zip(&chunk.entries)
                    {
                        *slot = index;
                    }
                }
                _ => garbage.maglev.push(*k),
            }
        }
        // A service keeps the slot its value names if the slot is claimed in its
        // name; any other claimed slot is released, and a service without one
        // claims a new slot (and is published again with it).
        let mut kept: HashSet<u32> = HashSet::default();
        let owners: HashMap<u32, ServiceKey> = snap.stats.iter().copied().collect();
        for (key, inst) in &mut services {
            if owners.get(&inst.stats) == Some(key) {
                kept.insert(inst.stats);
            } else {
                inst.stats = NO_STATS;
            }
        }
        garbage.counters = snap
            .stats
            .iter()
            .map(|&(slot, _)| slot)
            .filter(|s| !kept.contains(s))
            .collect();
        for (key, policy) in &snap.policies {
            match services.get_mut(key) {
                Some(inst) => inst.health = Some(Box::new(*policy)),
                None => garbage.policies.push(*key),
            }
        }
        for (k, t) in &snap.tiers {
            let inst = by_id.get(&k.service_id).and_then(|sk| services.get_mut(sk));
            match inst {
                Some(inst)
                    if k.generation == inst.generation
                        && inst.flags & service_flags::TIERS != 0 =>
                {
                    inst.tiers = Some(Box::new(*t));
                }
                _ => garbage.tiers.push(*k),
            }
        }
        for key in &snap.service_health {
            match services.get_mut(key) {
                Some(inst) if inst.flags & service_flags::HEALTH != 0 => {
                    inst.service_health = true;
                }
                _ => garbage.service_health.push(*key),
            }
        }
        for inst in services.values_mut() {
            inst.dirty = inst
                .slots
                .iter()
                .any(|&i| i == u16::MAX || !inst.backends.contains_key(u32::from(i)))
                || (inst.flags & service_flags::TIERS != 0 && inst.tiers.is_none())
                || (inst.flags & service_flags::HEALTH != 0 && !inst.service_health);
        }
        (Self { services, next_id }, garbage)
    }

    pub(super) fn table(&self) -> RoutingTable {
        let mut table = RoutingTable::default();
        for (key, inst) in &self.services {
            let Some(service) = service_addr(key) else {
                continue;
            };
            let live: HashSet<u32> = inst.slots.iter().map(|&i| u32::from(i)).collect();
            let backends: Vec<Backend> = inst
                .backends
                .iter()
                .map(|(i, b)| {
                    let state = match b.state {
                        _ if inst.tiers.is_none() && live.contains(&i) => BackendState::Active,
                        _ if inst.tiers.is_none() => BackendState::Draining,
                        s => state_of(s),
                    };
                    Backend::new(words_to_ip(b.addr), port_from_map(b.port))
                        .weighted(b.weight)
                        .in_state(state)
                })
                .collect();
            let health = crate::model::Health::from_kernel(inst.flags, inst.health.as_deref());
            let levels = inst.tiers.as_ref().map(|t| levels_of(inst, t));
            table.insert(
                service,
                crate::model::Service::new(backends, inst.policy)
                    .with_health(health)
                    .with_levels(levels),
            );
        }
        table
    }
}

/// A backend's state in a service with levels, from its [`BackendInfo::state`].
pub(super) fn state_of(state: u8) -> BackendState {
    match state {
        backend_state::ACTIVE => BackendState::Active,
        backend_state::DEGRADED => BackendState::Degraded,
        backend_state::UNHEALTHY => BackendState::Unhealthy,
        _ => BackendState::Draining,
    }
}

/// The levels a published generation serves, read back from its `SM_TIERS` value
/// and its slots: each range's hosts weighted by the slots they hold (positions
/// are the service's backends in index order, as [`Mirror::table`] lists them).
pub(super) fn levels_of(inst: &Installed, t: &Tiers) -> Levels {
    let position: BTreeMap<u16, usize> = inst
        .backends
        .keys()
        .enumerate()
        .filter_map(|(pos, i)| Some((u16::try_from(i).ok()?, pos)))
        .collect();
    let weights = |r: SlotRange| -> Vec<(usize, u32)> {
        let mut held: BTreeMap<usize, u32> = BTreeMap::new();
        let end = (usize::from(r.start) + usize::from(r.len)).min(inst.slots.len());
        for index in inst
            .slots
            .get(usize::from(r.start)..end)
            .unwrap_or_default()
        {
            if let Some(&pos) = position.get(index) {
                *held.entry(pos).or_default() += 1;
            }
        }
        held.into_iter().collect()
    };
    Levels {
        overprovisioning: t.overprovisioning,
        panic_percent: t.panic_percent,
        levels: t
            .tiers
            .iter()
            .take((t.count as usize).min(MAX_TIERS))
            .map(|tier| Level {
                healthy: weights(tier.healthy_slots),
                degraded: weights(tier.degraded_slots),
                all: weights(tier.all_slots),
                hosts: tier.hosts,
                healthy_hosts: tier.healthy,
                degraded_hosts: tier.degraded,
                total: tier.total,
            })
            .collect(),
    }
}

/// The routing table held by a snapshot of the maps (no agent needed).
pub fn table_from_snapshot(snap: &Snapshot) -> RoutingTable {
    Mirror::from_snapshot(snap).0.table()
}
