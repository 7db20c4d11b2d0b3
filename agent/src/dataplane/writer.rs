//! The single writer of the maps the agent owns.
//!
//! [`MapWriter`] keeps a mirror of what the kernel maps hold, turns a desired
//! [`RoutingTable`] into the difference, and writes it in an order that never shows
//! a kernel program a half-written service (see `ebpf/programs/src/maps.rs`):
//! backends → slots (and priority levels, `SM_TIERS`) of the unpublished
//! generation → service value (publish) → delete the old generation's slots and
//! levels → delete unreferenced backends. A service's health settings
//! (`SM_SVC_POLICY`) and its kernel health entry (`SM_SVC_HEALTH`, created with a
//! new epoch) are written before the value that names them and deleted after the
//! last one that did; its endpoints' health (`SM_EP_HEALTH`) goes with an
//! endpoint that leaves, and all of it when outlier detection is turned off.
//!
//! It also owns each service's counter slot in `SM_SERVICE_STATS`: claimed,
//! zeroed and named after the service, before the first value that names it is
//! published, released once the service is unpublished, so the kernel programs
//! only add on the connect path and a service's counters exist exactly while the
//! service does.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use foldhash::{HashMap, HashSet, HashSetExt as _};

use sockmesh_common::{
    BackendInfo, BackendKey, EndpointKey, MAGLEV_CHUNK, MaglevChunk, NO_STATS, ServiceKey,
    ServicePolicy, ServiceValue, SlotKey, Tiers, backend_state, service_flags,
};
use tracing::{debug, warn};

use super::{
    entries::info_of,
    keys::{service_addr, service_key},
    mirror::{Installed, MapEntries, Mirror, SlotMap, is_direct, slot_index},
    published::PublishedMap,
    store::{MapStore, Snapshot, StoreError},
};
use crate::{
    lb::{MaglevKey, maglev_table, weighted_slots},
    model::{
        CapacityError, Changes, LbPolicy, Limits, ModelError, Protocol, RoutingTable, Service,
        ServiceAddr, Usage, write_order,
    },
};

/// Why an apply was refused or did not complete.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The table breaks a datapath rule; nothing was written.
    #[error("invalid routing table: {0}")]
    Invalid(#[from] ModelError),
    /// The table does not fit in the maps; nothing was written. (The state checks
    /// the same before it commits an update, so this is an assertion.)
    #[error("routing table refused: {0}")]
    Capacity(#[from] CapacityError),
    /// A map write failed while updating `service`. Services before it in this apply
    /// are updated, `service` keeps its previous published state, later ones were
    /// not touched.
    #[error("updating service {service}")]
    Store {
        service: ServiceAddr,
        #[source]
        source: StoreError,
    },
    /// Reading the maps failed.
    #[error("reading the routing maps")]
    Snapshot(#[source] StoreError),
}

/// What an apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Routing-map writes and deletes performed (claiming and releasing counter
    /// slots, bookkeeping, are not counted).
    pub map_ops: usize,
}

/// The single owner of the routing maps.
pub struct MapWriter<S: MapStore> {
    store: S,
    mirror: Mirror,
    /// Services, backend entries and slots of all services, kept current so that
    /// `apply_changes` checks capacity without walking every service.
    usage: Usage,
    /// Entries of each map the agent writes, kept current as `usage` is (the
    /// maps' fill ratio).
    entries: MapEntries,
    /// Ids in use (and ids handed out during a full apply), so allocation does not
    /// walk every service.
    ids: HashSet<u32>,
    /// The most services the mirror and ids held since each last gave back
    /// its spare room (see [`Self::shrink_spare`]).
    peak: (usize, usize),
    limits: Limits,
    counters: CounterBook,
    /// Least-connections services draw candidates as Envoy does, with
    /// replacement (`--least-request-draws envoy`), instead of distinct ones.
    envoy_draws: bool,
}

/// The counter slots of `SM_SERVICE_STATS`: which are free, and the failures to
/// report. Counters are not routing: a failed claim (say, the array could not be
/// mapped) does not fail the update; the service is published without counters
/// and claims a slot with its next write. Failures are logged once per apply.
#[derive(Debug, Default)]
struct CounterBook {
    /// Released slots, handed out lowest first.
    free: BTreeSet<u32>,
    /// Slots released during this apply: a program that read the removed
    /// service's value may still add to them, so they are handed out from the
    /// next apply on (or now, if no other slot is left).
    cooling: Vec<u32>,
    /// No slot from here up was ever handed out.
    next: u32,
    /// Slots whose release failed: still claimed in a removed service's name,
    /// released again by the next apply.
    unreleased: Vec<u32>,
    /// Failures since the last report, and the first of them.
    failures: usize,
    first: Option<StoreError>,
}

impl CounterBook {
    /// The book of maps whose claimed slots are `used` (the rest are free).
    fn with_used(used: impl IntoIterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().collect();
        let next = used.last().map_or(0, |&s| s + 1);
        Self {
            free: (0..next).filter(|s| !used.contains(s)).collect(),
            next,
            ..Self::default()
        }
    }

    /// Claims a slot for `key` unless `slot` holds one; true if it claimed.
    fn claim<S: MapStore>(&mut self, store: &mut S, key: &ServiceKey, slot: &mut u32) -> bool {
        if *slot != NO_STATS {
            return false;
        }
        let taken = if let Some(s) = self.free.pop_first() {
            s
        } else if self.next < store.stats_slots() {
            self.next += 1;
            self.next - 1
        } else if let Some(s) = self.cooling.pop() {
            s
        } else {
            // More services than slots: the array is sized as the service map,
            // so the state's capacity check keeps this from happening.
            self.failures += 1;
            return false;
        };
        match store.claim_stats(taken, key) {
            Ok(()) => {
                *slot = taken;
                true
            }
            Err(e) => {
                self.free.insert(taken);
                self.failed(e);
                false
            }
        }
    }

    /// Releases `slot`, if it holds one.
    fn release<S: MapStore>(&mut self, store: &mut S, slot: &mut u32) {
        let s = std::mem::replace(slot, NO_STATS);
        if s == NO_STATS {
            return;
        }
        self.give_back(store, s);
    }

    fn give_back<S: MapStore>(&mut self, store: &mut S, slot: u32) {
        match store.release_stats(slot) {
            Ok(()) => self.cooling.push(slot),
            Err(e) => {
                self.unreleased.push(slot);
                self.failed(e);
            }
        }
    }

    /// Starts an apply: the slots released by the last one may be handed out,
    /// and the releases that failed are tried again.
    fn settle<S: MapStore>(&mut self, store: &mut S) {
        self.free.extend(self.cooling.drain(..));
        for slot in std::mem::take(&mut self.unreleased) {
            self.give_back(store, slot);
        }
    }

    fn failed(&mut self, e: StoreError) {
        self.failures += 1;
        self.first.get_or_insert(e);
    }

    /// Logs the failures since the last report.
    fn report(&mut self) {
        if self.failures > 0 {
            let first = self.first.take();
            warn!(
                map = sockmesh_common::map_names::SERVICE_STATS,
                failures = self.failures,
                error = first.as_ref().map(|e| format!("{e}: {}", e.source)),
                "services published without per-service counters; the routing maps were written regardless"
            );
            self.failures = 0;
        }
    }
}

impl<S: MapStore> MapWriter<S> {
    /// Takes over whatever the maps hold (a restarted agent adopts its predecessor's
    /// table without rewriting it), deleting only entries no published service uses.
    pub fn adopt(mut store: S) -> Result<Self, WriteError> {
        let snapshot = store.snapshot().map_err(WriteError::Snapshot)?;
        let (mirror, garbage) = Mirror::from_snapshot(&snapshot);
        for k in &garbage.slots {
            store.del_slot(k).map_err(WriteError::Snapshot)?;
        }
        for k in &garbage.backends {
            store.del_backend(k).map_err(WriteError::Snapshot)?;
        }
        for k in &garbage.maglev {
            store.del_maglev(k).map_err(WriteError::Snapshot)?;
        }
        for k in &garbage.policies {
            store.del_policy(k).map_err(WriteError::Snapshot)?;
        }
        for k in &garbage.tiers {
            store.del_tiers(k).map_err(WriteError::Snapshot)?;
        }
        for k in &garbage.service_health {
            store.del_service_health(k).map_err(WriteError::Snapshot)?;
        }
        // The slots no service holds are released like a removed service's
        // (a failed release is retried by the next apply).
        let mut counters = CounterBook::with_used(
            mirror
                .services
                .values()
                .map(|inst| inst.stats)
                .filter(|&s| s != NO_STATS)
                .chain(garbage.counters.iter().copied()),
        );
        for &slot in &garbage.counters {
            counters.give_back(&mut store, slot);
        }
        if !garbage.is_empty() {
            warn!(
                slots = garbage.slots.len(),
                backends = garbage.backends.len(),
                maglev_chunks = garbage.maglev.len(),
                counters = garbage.counters.len(),
                health_settings = garbage.policies.len(),
                levels = garbage.tiers.len(),
                health_entries = garbage.service_health.len(),
                "removed map entries left by an interrupted update"
            );
        }
        let mut w = Self {
            store,
            mirror,
            usage: Usage::default(),
            entries: MapEntries::default(),
            ids: HashSet::new(),
            peak: (0, 0),
            limits: Limits::default(),
            counters,
            envoy_draws: false,
        };
        // Every published service has its counters (an earlier claim may have
        // failed, or the slot was not the service's): a new slot is published with
        // the service's next write.
        for (key, inst) in &mut w.mirror.services {
            if w.counters.claim(&mut w.store, key, &mut inst.stats) {
                inst.dirty = true;
            }
        }
        w.counters.report();
        w.recount();
        w.store.rest();
        Ok(w)
    }

    /// Uses `limits` (the maps' real capacities) for every capacity check.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Draws least-connections candidates with replacement, as Envoy does
    /// (every least-connections service is rewritten when this changes).
    #[must_use]
    pub fn with_envoy_draws(mut self, envoy_draws: bool) -> Self {
        self.set_envoy_draws(envoy_draws);
        self
    }

    /// [`Self::with_envoy_draws`], from the next apply on.
    pub fn set_envoy_draws(&mut self, envoy_draws: bool) {
        self.envoy_draws = envoy_draws;
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn recount(&mut self) {
        self.ids = self.mirror.services.values().map(|i| i.id).collect();
        self.usage = self
            .mirror
            .services
            .values()
            .map(Installed::usage)
            .fold(Usage::default(), |a, b| a.plus(&b));
        self.entries = self
            .mirror
            .services
            .values()
            .map(Installed::entries)
            .fold(MapEntries::default(), MapEntries::plus);
    }

    fn counts(&self, key: &ServiceKey) -> (Usage, MapEntries) {
        self.mirror
            .services
            .get(key)
            .map_or_else(Default::default, |i| (i.usage(), i.entries()))
    }

    /// Runs one service operation, keeping the totals current.
    fn counted<T>(
        &mut self,
        key: &ServiceKey,
        op: impl FnOnce(&mut Self) -> Result<T, WriteError>,
    ) -> Result<T, WriteError> {
        let (usage, entries) = self.counts(key);
        let result = op(self);
        let (usage_after, entries_after) = self.counts(key);
        self.usage = self.usage.plus(&usage_after).minus(&usage);
        self.entries = self.entries.plus(entries_after).minus(entries);
        result
    }

    /// What the installed table takes of the maps.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// The entries of each map the agent writes, as its bookkeeping counts them:
    /// `stats`, the installed services' counter slots and those whose release
    /// failed.
    pub fn entries(&self) -> MapEntries {
        MapEntries {
            stats: self.entries.stats + self.counters.unreleased.len(),
            ..self.entries
        }
    }

    /// The installed table, as the kernel sees it.
    pub fn table(&self) -> RoutingTable {
        self.mirror.table()
    }

    /// The levels of the services that have them, as written: of all, or
    /// `previous` with `only` those services' brought up to date (see
    /// [`super::published`]).
    pub fn published_levels(
        &self,
        only: Option<&BTreeSet<ServiceAddr>>,
        previous: &PublishedMap,
    ) -> PublishedMap {
        super::published::published(&self.mirror, only, previous)
    }

    /// The map store (for tests and diagnostics).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The map store, for a writer that adopts it next (a restart, in tests).
    #[cfg(any(test, feature = "testing"))]
    pub fn into_store(self) -> S {
        self.store
    }

    /// Mutable access to the map store (tests inject failures through it).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Makes the kernel maps hold `desired`, writing only what differs. Validation and
    /// capacity are checked before any write.
    pub fn apply(&mut self, desired: &RoutingTable) -> Result<ApplyReport, WriteError> {
        let result = self.apply_all(desired);
        // Whatever happened, the totals follow the mirror.
        self.recount();
        self.counters.report();
        self.shrink_spare();
        self.store.rest();
        result
    }

    /// Gives back the mirror's spare capacity once it holds half or less of the
    /// most it held since the last time. A wave of services replacing another
    /// holds both while the write runs, and a hash map otherwise keeps the
    /// capacity of its largest size for good. Judged by the peak count, not by
    /// `capacity()`: that is what the map takes without growing, which the
    /// tombstones of removed entries lower while it still holds all its room.
    /// (The churn soak's heap still steps up 5 MiB at its second wave with this:
    /// that step is other room, not found yet.)
    fn shrink_spare(&mut self) {
        /// Below this many entries the spare room is not worth a rehash.
        const SMALL: usize = 1_024;
        let services = &mut self.mirror.services;
        self.peak.0 = self.peak.0.max(services.len());
        if self.peak.0 >= 2 * services.len().max(SMALL) {
            services.shrink_to_fit();
            self.peak.0 = services.len();
        }
        self.peak.1 = self.peak.1.max(self.ids.len());
        if self.peak.1 >= 2 * self.ids.len().max(SMALL) {
            self.ids.shrink_to_fit();
            self.peak.1 = self.ids.len();
        }
    }

    fn apply_all(&mut self, desired: &RoutingTable) -> Result<ApplyReport, WriteError> {
        desired.validate()?;
        // The whole table as changes against the mirror: services gone, and those
        // whose kernel copy differs (or was found inconsistent on adoption). The
        // rest are not written, so they take no transient either.
        let wanted: HashMap<ServiceKey, &ServiceAddr> = desired
            .services
            .keys()
            .map(|s| (service_key(s), s))
            .collect();
        let mut changes: Changes = self
            .mirror
            .services
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .filter_map(service_addr)
            .map(|s| (s, None))
            .collect();
        let mut unchanged = 0;
        for (service, backends) in &desired.services {
            let key = service_key(service);
            let current = self.mirror.services.get_mut(&key);
            let same = current.is_some_and(|current| {
                // A service without counters claims a slot and is published again.
                if self
                    .counters
                    .claim(&mut self.store, &key, &mut current.stats)
                {
                    current.dirty = true;
                }
                !current.dirty
                    && plan_backends(current, service.protocol, backends, self.envoy_draws)
                        .is_noop(current)
            });
            if same {
                unchanged += 1;
            } else {
                changes.insert(*service, Some(backends.clone()));
            }
        }
        let mut report = self.apply_changed(&changes)?;
        report.unchanged += unchanged;
        debug!(?report, "routing table applied");
        Ok(report)
    }

    /// Rewrites the choice table of the services with priority levels and outlier
    /// detection (all of them, or `only`) whose levels' loads the ejections
    /// running now move: a level whose hosts are ejected spills to the next, and
    /// its load comes back when they return, as Envoy's does. Returns when the
    /// first of the running ejections ends (`CLOCK_MONOTONIC` ns), when the loads
    /// move again.
    pub fn refresh_levels(
        &mut self,
        only: Option<&[ServiceKey]>,
    ) -> Result<Option<u64>, WriteError> {
        let now = monotonic_ns();
        let keys: Vec<ServiceKey> = match only {
            Some(k) => k.to_vec(),
            None => self
                .mirror
                .services
                .iter()
                .filter(|(_, i)| i.tiers.is_some() && i.flags & service_flags::OUTLIER != 0)
                .map(|(k, _)| *k)
                .collect(),
        };
        let mut next: Option<u64> = None;
        for key in keys {
            let Some(inst) = self.mirror.services.get_mut(&key) else {
                continue;
            };
            let Some(mut t) = inst.tiers.as_deref().copied() else {
                continue;
            };
            let wrap = |source| WriteError::Store {
                service: service_addr(&key).unwrap_or(crate::model::ServiceAddr {
                    vip: std::net::Ipv4Addr::UNSPECIFIED.into(),
                    port: 0,
                    protocol: crate::model::Protocol::Tcp,
                }),
                source,
            };
            let running = self.store.running_ejections(&key, now).map_err(wrap)?;
            with_ejections(&mut t, &running);
            if inst.tiers.as_deref() != Some(&t) {
                self.store
                    .put_tiers(&tiers_key(inst.id, inst.generation), &t)
                    .map_err(wrap)?;
                inst.tiers = Some(Box::new(t));
                debug!(service = ?service_addr(&key), "levels' loads follow the ejections");
            }
            if let Some(end) = running.next_end {
                next = Some(next.map_or(end, |n| n.min(end)));
            }
        }
        Ok(next)
    }

    /// Applies changes to some services (`None`: remove the service), leaving every
    /// other service untouched. Costs O(changed services) map work; the capacity
    /// check walks the mirror's counters only.
    pub fn apply_changes(&mut self, changes: &Changes) -> Result<ApplyReport, WriteError> {
        let result = self.apply_changed(changes);
        self.counters.report();
        self.shrink_spare();
        self.store.rest();
        result
    }

    fn apply_changed(&mut self, changes: &Changes) -> Result<ApplyReport, WriteError> {
        for (service, backends) in changes {
            if let Some(b) = backends {
                crate::model::validate_service(service, b)?;
            }
        }
        let (usage, transient) = self.usage.after(changes, |s| {
            self.mirror
                .services
                .get(&service_key(s))
                .map(Installed::usage)
        });
        self.limits.check(&usage, &transient)?;
        self.counters.settle(&mut self.store);
        let mut report = ApplyReport::default();
        // The order the state's capacity check simulated (removals, then shrinking
        // services, then growing ones), so the maps never go above its peak.
        let order = write_order(changes, |s| {
            self.mirror
                .services
                .get(&service_key(s))
                .map(Installed::usage)
        });
        let steps: Vec<(ServiceAddr, Option<&Service>)> =
            order.iter().map(|s| (*s.service, s.backends)).collect();
        let mut next = 0;
        while let Some(&(service, backends)) = steps.get(next) {
            next += 1;
            // A run of new services (an initial load) is written in bulk.
            let adds: Vec<(ServiceAddr, &Service)> = steps[next - 1..]
                .iter()
                .map_while(|&(s, b)| {
                    b.filter(|_| !self.mirror.services.contains_key(&service_key(&s)))
                        .map(|b| (s, b))
                })
                .collect();
            if adds.len() >= bulk::BULK_FROM {
                next += adds.len() - 1;
                // In chunks: the planning buffers stay small, and the first
                // services are published before the last are planned.
                for chunk in adds.chunks(bulk::BULK_CHUNK) {
                    self.add_bulk(chunk, &mut report)?;
                }
                continue;
            }
            let key = service_key(&service);
            let Some(backends) = backends else {
                let ops = self.counted(&key, |w| w.remove_service(&key))?;
                report.removed += usize::from(ops > 0);
                report.map_ops += ops;
                continue;
            };
            if self.mirror.services.contains_key(&key) {
                match self.counted(&key, |w| w.update_service(&service, &key, backends))? {
                    0 => report.unchanged += 1,
                    ops => {
                        report.updated += 1;
                        report.map_ops += ops;
                    }
                }
            } else {
                report.map_ops +=
                    self.counted(&key, |w| w.add_service(&service, &key, backends))?;
                report.added += 1;
            }
        }
        Ok(report)
    }

    fn alloc_id(&mut self) -> u32 {
        // Ids are not reused soon: a program that read a removed service's value just
        // before removal must not find another service's slots under the same id.
        loop {
            let id = self.mirror.next_id;
            self.mirror.next_id = self.mirror.next_id.wrapping_add(1);
            if self.ids.insert(id) {
                return id;
            }
        }
    }

    fn add_service(
        &mut self,
        service: &ServiceAddr,
        key: &ServiceKey,
        backends: &Service,
    ) -> Result<usize, WriteError> {
        let id = self.alloc_id();
        let mut installed = Installed::new(id);
        // Counters first: the programs count into the slot from the first connect().
        self.counters
            .claim(&mut self.store, key, &mut installed.stats);
        let plan = plan_backends(&installed, service.protocol, backends, self.envoy_draws);
        let mut ops = 0;
        let result = write_and_publish(&mut self.store, key, &mut installed, plan, &mut ops);
        match result {
            Ok(()) => {
                self.mirror.services.insert(*key, installed);
                Ok(ops)
            }
            Err(source) => {
                // Nothing was published; remove what was written.
                rollback(&mut self.store, &installed, id);
                self.counters.release(&mut self.store, &mut installed.stats);
                Err(WriteError::Store {
                    service: *service,
                    source,
                })
            }
        }
    }

    /// Returns the number of map operations (0 when the service was unchanged).
    fn update_service(
        &mut self,
        service: &ServiceAddr,
        key: &ServiceKey,
        backends: &Service,
    ) -> Result<usize, WriteError> {
        let Some(current) = self.mirror.services.get_mut(key) else {
            return Ok(0);
        };
        if self
            .counters
            .claim(&mut self.store, key, &mut current.stats)
        {
            current.dirty = true;
        }
        let plan = plan_backends(current, service.protocol, backends, self.envoy_draws);
        if !current.dirty && plan.is_noop(current) {
            return Ok(0);
        }
        let mut installed = current.clone();
        let mut ops = 0;
        let result = write_and_publish(&mut self.store, key, &mut installed, plan, &mut ops);
        // Keep the mirror exact whatever happened: a failure before publishing leaves
        // the old generation live, but written backend entries exist (and will be
        // reused or removed by the next apply).
        self.mirror.services.insert(*key, installed);
        result.map(|()| ops).map_err(|source| WriteError::Store {
            service: *service,
            source,
        })
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<usize, WriteError> {
        let Some(mut inst) = self.mirror.services.get(key).cloned() else {
            return Ok(0);
        };
        let service = service_addr(key).ok_or_else(|| WriteError::Snapshot(unknown_proto(key)))?;
        let wrap = |source| WriteError::Store { service, source };
        // Unpublish first, then the entries only it could reach. Once unpublished,
        // anything a failed delete leaves behind is unreachable (adoption collects it).
        self.store.del_service(key).map_err(wrap)?;
        self.mirror.services.remove(key);
        self.ids.remove(&inst.id);
        self.counters.release(&mut self.store, &mut inst.stats);
        let mut ops = 1;
        let published = inst.slot_map();
        for entry in 0..published.entries(inst.slots.len()) {
            del_entry(&mut self.store, published, inst.id, inst.generation, entry).map_err(wrap)?;
            ops += 1;
        }
        for entry in 0..inst.leftover as usize {
            del_entry(
                &mut self.store,
                inst.leftover_in,
                inst.id,
                1 - inst.generation,
                entry,
            )
            .map_err(wrap)?;
            ops += 1;
        }
        if inst.tiers.is_some() {
            self.store
                .del_tiers(&tiers_key(inst.id, inst.generation))
                .map_err(wrap)?;
            ops += 1;
        }
        for (index, b) in inst.backends.iter() {
            self.store
                .del_backend(&BackendKey {
                    service_id: inst.id,
                    index,
                })
                .map_err(wrap)?;
            if inst.health.is_some() {
                self.store
                    .del_endpoint_health(&endpoint_key(key, &b))
                    .map_err(wrap)?;
            }
            ops += 1;
        }
        if inst.health.is_some() {
            self.store.del_policy(key).map_err(wrap)?;
            ops += 1;
        }
        if inst.service_health {
            self.store.del_service_health(key).map_err(wrap)?;
            ops += 1;
        }
        Ok(ops)
    }
}

/// Whether two generations' levels are the same apart from their choice tables,
/// which follow the ejections running (see [`MapWriter::refresh_levels`]).
fn same_levels(a: Option<&Tiers>, b: Option<&Tiers>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            Tiers {
                choice: b.choice,
                ..*a
            } == *b
        }
        (None, None) => true,
        _ => false,
    }
}

/// `t`'s choice table with `running` ejections out of its levels' counts.
fn with_ejections(t: &mut Tiers, running: &super::store::Running) {
    let loads = sockmesh_common::tiers::loads(t, &running.ejected);
    t.choice = sockmesh_common::tiers::choice_table(t, &loads);
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the kernel's ejection times.
pub(super) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

/// The `SM_TIERS` key of a generation.
fn tiers_key(service_id: u32, generation: u8) -> SlotKey {
    SlotKey {
        service_id,
        generation,
        pad: 0,
        slot: 0,
    }
}

fn unknown_proto(key: &ServiceKey) -> StoreError {
    StoreError {
        map: super::store::MapName::Services,
        op: "decode",
        source: format!("service key with unknown protocol {}", key.proto).into(),
    }
}

/// The target state of one service's backends.
struct BackendPlan {
    /// Backend entries to hold after the update, by index.
    backends: BTreeMap<u32, BackendInfo>,
    /// Slots to publish (backend index per slot).
    slots: Vec<u16>,
    /// Policy to publish.
    policy: LbPolicy,
    /// Service flags to publish, and the `SM_SVC_POLICY` entry they need.
    flags: u8,
    health: Option<ServicePolicy>,
    /// Priority levels to publish with the slots (flag `TIERS`).
    tiers: Option<Tiers>,
    /// The desired backend list and the index of each of its positions: what
    /// the mirror keeps of the entries once they are written (a service without
    /// levels; see `entries`).
    list: Option<(Arc<[crate::model::Backend]>, Vec<u32>)>,
}

impl BackendPlan {
    fn is_noop(&self, current: &Installed) -> bool {
        *self.slots == *current.slots
            && current.backends.same_as(&self.backends)
            && self.policy == current.policy
            && self.flags == current.flags
            && self.health.as_ref() == current.health.as_deref()
            && same_levels(self.tiers.as_ref(), current.tiers.as_deref())
            && current.leftover == 0
    }

    /// Whether the service needs its kernel health entry (`SM_SVC_HEALTH`).
    fn needs_service_health(&self) -> bool {
        self.flags & service_flags::HEALTH != 0
    }
}

/// Assigns backend indexes and computes the slots.
///
/// A backend keeps its index; a new one takes the lowest index not in use before
/// or after the update, so no index a published slot names changes address before
/// the new slots are published. One exception: a service published with direct
/// slots where one endpoint is replaced by another (equal weights, the same count).
/// The new endpoint takes the index the old one frees, that one entry is rewritten
/// in place and nothing else is written: the write switches every slot from the
/// old set to the new at once, as a publish does, and the update costs one map
/// write instead of a whole slot table and its deletion.
fn plan_backends(
    current: &Installed,
    protocol: Protocol,
    desired: &Service,
    envoy_draws: bool,
) -> BackendPlan {
    let mut plan = plan_of(current, protocol, desired);
    if envoy_draws && matches!(desired.policy, LbPolicy::LeastConn { .. }) {
        plan.flags |= service_flags::ENVOY_DRAWS;
    }
    plan
}

/// [`plan_backends`] but for the draw flag.
fn plan_of(current: &Installed, protocol: Protocol, desired: &Service) -> BackendPlan {
    let direct_now =
        current.slot_map() == SlotMap::Direct && !current.dirty && current.leftover == 0;
    // Tried first: it is the common endpoint change of a direct service. Where it
    // applies to a new backend in the slots, the plan below is not direct (that
    // backend takes an index none held before, which no direct slot has); where
    // its one change is to a backend outside the slots, either plan is a valid
    // write.
    if direct_now {
        let in_place = plan_indexes(current, protocol, desired, true);
        // Exactly one index changes, and the slot count stays: one map write
        // switches the service from the old set to the new, which is the publish
        // protocol's guarantee.
        let rewritten = in_place
            .backends
            .iter()
            .filter(|&(&i, &b)| current.backends.get(i) != Some(b))
            .count();
        if in_place.flags & service_flags::DIRECT != 0
            && in_place.backends.len() == current.backends.len()
            && in_place.slots.len() == current.slots.len()
            && in_place.policy == current.policy
            && in_place.tiers.is_none()
            && rewritten == 1
        {
            return in_place;
        }
    }
    plan_indexes(current, protocol, desired, false)
}

/// [`plan_backends`]' assignment: new backends take the lowest free index, where an
/// index is free unless a backend holds it after the update (`reuse`) or before or
/// after it.
fn plan_indexes(
    current: &Installed,
    protocol: Protocol,
    desired: &Service,
    reuse: bool,
) -> BackendPlan {
    // Sorted and searched: most services hold a few backends, for which a
    // hash map's allocation and hashing cost more.
    let mut by_addr: Vec<(([u32; 4], u16), u32)> = current
        .backends
        .iter()
        .map(|(i, b)| ((b.addr, b.port), i))
        .collect();
    by_addr.sort_unstable();
    let mut backends = BTreeMap::new();
    let mut fresh = Vec::new();
    // The kernel index of each of `desired`'s backends, by position.
    let mut index_of = vec![0u32; desired.len()];
    let level_of = desired
        .levels
        .as_deref()
        .map(crate::lb::levels::level_of_positions)
        .unwrap_or_default();
    for (pos, b) in desired.iter().enumerate() {
        let info = info_of(b, level_of.get(pos).copied().unwrap_or(0));
        match by_addr
            .binary_search_by_key(&(info.addr, info.port), |&(a, _)| a)
            .ok()
            .map(|at| by_addr[at].1)
        {
            Some(i) => {
                backends.insert(i, info);
                index_of[pos] = i;
            }
            None => fresh.push((pos, info)),
        }
    }
    let mut next = 0u32;
    for (pos, info) in fresh {
        while (!reuse && current.backends.contains_key(next)) || backends.contains_key(&next) {
            next += 1;
        }
        backends.insert(next, info);
        index_of[pos] = next;
    }
    let active: Vec<(u32, &BackendInfo)> = backends
        .iter()
        .filter(|(_, b)| b.state == backend_state::ACTIVE)
        .map(|(&i, b)| (i, b))
        .collect();
    let mut tiers = None;
    let slots: Vec<u16> = match (desired.levels.as_deref(), desired.policy) {
        (Some(levels), _) => {
            let (positions, t) = crate::lb::levels::layout(levels);
            tiers = Some(t);
            positions
                .into_iter()
                .map(|pos| slot_index(index_of[pos]))
                .collect()
        }
        (None, LbPolicy::Maglev { table_size }) => {
            // Sorted by address, so the same backends give the same table whatever
            // their order and indexes (a restarted agent rebuilds it identically).
            let mut named: Vec<((MaglevKey, u32), u32)> = active
                .iter()
                .map(|&(i, b)| ((maglev_name(b), b.weight), i))
                .collect();
            named.sort_unstable();
            let keys: Vec<(MaglevKey, u32)> = named.iter().map(|&(k, _)| k).collect();
            maglev_table(&keys, table_size)
                .into_iter()
                .map(|pos| slot_index(named[pos].1))
                .collect()
        }
        (None, LbPolicy::Random | LbPolicy::LeastConn { .. }) => {
            let weights: Vec<u32> = active.iter().map(|&(_, b)| b.weight).collect();
            weighted_slots(&weights)
                .into_iter()
                .map(|pos| slot_index(active[pos].0))
                .collect()
        }
    };
    // The whole of the ejected share: the active backends, or every host of a
    // service with levels (Envoy's outlier detector counts all of a cluster's).
    let hosts = if desired.levels.is_some() {
        desired.len()
    } else {
        active.len()
    };
    let overprovisioning = desired.levels.as_deref().map_or_else(
        || {
            desired
                .first()
                .map_or(crate::model::DEFAULT_OVERPROVISIONING, |b| {
                    b.placement.overprovisioning
                })
        },
        |l| u16::try_from(l.overprovisioning).unwrap_or(u16::MAX),
    );
    let (mut flags, health) = desired.health.to_kernel(protocol, hosts, overprovisioning);
    if tiers.is_some() {
        flags |= service_flags::TIERS;
    } else if !desired.policy.is_maglev() && is_direct(&slots) {
        flags |= service_flags::DIRECT;
    }
    BackendPlan {
        backends,
        slots,
        policy: desired.policy,
        flags,
        health,
        list: desired
            .levels
            .is_none()
            .then(|| (desired.backends.clone(), index_of)),
        tiers,
    }
}

/// A backend's name in its Maglev permutation: address bytes and host-order port.
fn maglev_name(b: &BackendInfo) -> MaglevKey {
    let mut addr = [0u8; 16];
    for (bytes, word) in addr.as_chunks_mut::<4>().0.iter_mut().zip(b.addr) {
        bytes.copy_from_slice(&word.to_ne_bytes());
    }
    (addr, u16::from_be(b.port))
}

/// Key of map entry `entry` of a generation: a slot, or a Maglev chunk.
fn slot_key(service_id: u32, generation: u8, entry: usize) -> SlotKey {
    SlotKey {
        service_id,
        generation,
        pad: 0,
        // Slot counts are bounded by MAX_SLOTS_PER_SERVICE (≤ 65,536), chunk
        // numbers by MAX_MAGLEV_CHUNKS_PER_TABLE.
        slot: entry as u16,
    }
}

/// Writes a generation's slots into `map`: one entry per slot, or one Maglev
/// chunk per `MAGLEV_CHUNK` slots (entries past the table's end are 0).
fn put_generation<S: MapStore>(
    store: &mut S,
    map: SlotMap,
    id: u32,
    generation: u8,
    slots: &[u16],
    ops: &mut usize,
) -> Result<(), StoreError> {
    match map {
        SlotMap::Slots => {
            for (slot, &index) in slots.iter().enumerate() {
                store.put_slot(&slot_key(id, generation, slot), u32::from(index))?;
                *ops += 1;
            }
        }
        SlotMap::Maglev => {
            for (n, part) in slots.chunks(MAGLEV_CHUNK).enumerate() {
                let mut chunk = MaglevChunk {
                    entries: [0; MAGLEV_CHUNK],
                };
                chunk.entries[..part.len()].copy_from_slice(part);
                store.put_maglev(&slot_key(id, generation, n), &chunk)?;
                *ops += 1;
            }
        }
        SlotMap::Direct => {}
    }
    Ok(())
}

/// Deletes map entry `entry` of a generation kept in `map`.
fn del_entry<S: MapStore>(
    store: &mut S,
    map: SlotMap,
    id: u32,
    generation: u8,
    entry: usize,
) -> Result<(), StoreError> {
    let key = slot_key(id, generation, entry);
    match map {
        SlotMap::Slots => store.del_slot(&key),
        SlotMap::Maglev => store.del_maglev(&key),
        // Holds no entries (`SlotMap::entries` is 0): nothing calls this.
        SlotMap::Direct => Ok(()),
    }
}

/// Writes `plan` for one service in publish order, updating `inst` to match the
/// kernel after every step (also when a step fails).
fn write_and_publish<S: MapStore>(
    store: &mut S,
    key: &ServiceKey,
    inst: &mut Installed,
    plan: BackendPlan,
    ops: &mut usize,
) -> Result<(), StoreError> {
    let id = inst.id;
    // 0. Remove what an earlier failed delete left in the unpublished generation.
    while inst.leftover > 0 {
        let entry = inst.leftover as usize - 1;
        del_entry(store, inst.leftover_in, id, 1 - inst.generation, entry)?;
        inst.leftover -= 1;
        *ops += 1;
    }
    // 1. New and changed backend entries. An existing index keeps its address, so
    //    rewriting it (weight/state) never changes what a slot resolves to.
    //    A direct service's replaced endpoint is the exception: its index is
    //    rewritten in place (see `plan_backends`), and the endpoint it held starts
    //    afresh if it comes back, as a removed one does in step 5.
    for (&index, info) in &plan.backends {
        if inst.backends.get(index) != Some(*info) {
            store.put_backend(
                &BackendKey {
                    service_id: id,
                    index,
                },
                info,
            )?;
            *ops += 1;
            if let Some(old) = inst.backends.insert(index, *info)
                && (old.addr, old.port) != (info.addr, info.port)
                && inst.health.is_some()
            {
                store.del_endpoint_health(&endpoint_key(key, &old))?;
                *ops += 1;
            }
        }
    }
    let old_generation = inst.generation;
    let old_entries = inst.slot_map().entries(inst.slots.len());
    let old_map = inst.slot_map();
    let old_flags = inst.flags;
    let needs_service_health = plan.needs_service_health();
    let new_map = SlotMap::of(plan.policy, plan.flags);
    // 2a. Health settings, and the kernel's health entry, before a service value
    //     that names them.
    if let Some(health) = plan.health
        && inst.health.as_deref() != Some(&health)
    {
        store.put_policy(key, &health)?;
        inst.health = Some(Box::new(health));
        *ops += 1;
    }
    if needs_service_health && !inst.service_health {
        store.create_service_health(key)?;
        inst.service_health = true;
        *ops += 1;
    }
    if *plan.slots != *inst.slots
        || inst.dirty
        || plan.policy != inst.policy
        || plan.flags != inst.flags
        || !same_levels(plan.tiers.as_ref(), inst.tiers.as_deref())
    {
        let generation = 1 - old_generation;
        let (policy, choices) = plan.policy.to_kernel();
        let value = ServiceValue {
            id,
            slot_count: plan.slots.len() as u32,
            generation,
            policy,
            choices,
            flags: plan.flags,
            revision: inst.revision.wrapping_add(1),
            stats: inst.stats,
        };
        // 2. Slots (and levels) of the unpublished generation, then 3. publish. On
        //    failure the old generation stays live and the partial new one is
        //    removed.
        // The levels' choice table with the ejections running now (the plan's
        // has none).
        let mut tiers = plan.tiers;
        if let Some(t) = &mut tiers {
            let running = store.running_ejections(key, monotonic_ns())?;
            with_ejections(t, &running);
        }
        let mut publish = || -> Result<(), StoreError> {
            put_generation(store, new_map, id, generation, &plan.slots, ops)?;
            if let Some(t) = &tiers {
                store.put_tiers(&tiers_key(id, generation), t)?;
                *ops += 1;
            }
            store.put_service(key, &value)?;
            *ops += 1;
            Ok(())
        };
        if let Err(e) = publish() {
            for entry in 0..new_map.entries(plan.slots.len()) {
                let _ = del_entry(store, new_map, id, generation, entry);
            }
            if plan.tiers.is_some() {
                let _ = store.del_tiers(&tiers_key(id, generation));
            }
            return Err(e);
        }
        let old_tiers = inst.tiers.take();
        inst.generation = generation;
        inst.revision = value.revision;
        inst.policy = plan.policy;
        inst.flags = plan.flags;
        inst.slots = plan.slots.into_boxed_slice();
        inst.tiers = tiers.map(Box::new);
        inst.dirty = false;
        // The old generation's levels are unreachable now (a failed delete leaves
        // an entry the next publish of that generation replaces).
        if old_tiers.is_some() {
            store.del_tiers(&tiers_key(id, old_generation))?;
            *ops += 1;
        }
        // 4. The old generation is unreachable now. Deleted from the end, so after a
        //    failure exactly `0..leftover` remain.
        // A service's slot entries number at most MAX_SLOTS_PER_SERVICE.
        inst.leftover = u32::try_from(old_entries).unwrap_or(u32::MAX);
        inst.leftover_in = old_map;
        while inst.leftover > 0 {
            del_entry(
                store,
                old_map,
                id,
                old_generation,
                inst.leftover as usize - 1,
            )?;
            inst.leftover -= 1;
            *ops += 1;
        }
    }
    // 5. Backends no slot references any more.
    let stale: Vec<u32> = inst
        .backends
        .keys()
        .filter(|i| !plan.backends.contains_key(i))
        .collect();
    for index in stale {
        store.del_backend(&BackendKey {
            service_id: id,
            index,
        })?;
        if let Some(b) = inst.backends.remove(index)
            && inst.health.is_some()
        {
            // A backend that leaves starts afresh if it comes back (as in Envoy).
            store.del_endpoint_health(&endpoint_key(key, &b))?;
        }
        *ops += 1;
    }
    // 6. Outlier detection turned off: its endpoints' health goes (a later
    //    turn-on starts afresh, as in Envoy); then the health settings and the
    //    kernel health entry no published value names any more.
    if old_flags & service_flags::OUTLIER != 0
        && inst.flags & service_flags::OUTLIER == 0
        && inst.health.is_some()
    {
        for b in inst.backends.values() {
            store.del_endpoint_health(&endpoint_key(key, &b))?;
            *ops += 1;
        }
    }
    if plan.health.is_none() && inst.health.is_some() {
        store.del_policy(key)?;
        inst.health = None;
        *ops += 1;
    }
    if !needs_service_health && inst.service_health && inst.flags & service_flags::HEALTH == 0 {
        store.del_service_health(key)?;
        inst.service_health = false;
        *ops += 1;
    }
    // 7. The entries written, kept as the desired list where they read as it.
    if let Some((list, index_of)) = &plan.list {
        inst.backends.share(list, index_of);
    }
    Ok(())
}

/// The health key of backend `b` of service `key`.
fn endpoint_key(key: &ServiceKey, b: &BackendInfo) -> EndpointKey {
    EndpointKey {
        service: *key,
        addr: b.addr,
        port: b.port,
        pad: 0,
    }
}

/// Undoes the writes of a new service that was never published.
fn rollback<S: MapStore>(store: &mut S, inst: &Installed, id: u32) {
    for index in inst.backends.keys() {
        let _ = store.del_backend(&BackendKey {
            service_id: id,
            index,
        });
    }
}

#[path = "writer_bulk.rs"]
mod bulk;

#[path = "writer_sweep.rs"]
mod sweep;

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;
