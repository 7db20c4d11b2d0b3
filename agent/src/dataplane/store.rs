//! Access to every map the agent writes (the three routing maps, the per-service
//! counters, the health settings), behind a trait so the writer's ordering can be unit-tested against an
//! in-memory fake.

use std::collections::BTreeMap;

#[cfg(any(test, feature = "testing"))]
use sockmesh_common::resolve::{RoutingMaps, Slot, published_slots, resolve_slot};
use sockmesh_common::{
    BackendInfo, BackendKey, EndpointKey, MaglevChunk, ServiceKey, ServicePolicy, ServiceValue,
    SlotKey, Tiers, map_names,
};

/// Which map an operation touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MapName {
    Services,
    Slots,
    Backends,
    ServiceStats,
    Maglev,
    ServicePolicy,
    EndpointHealth,
    ServiceHealth,
    Tiers,
}

impl MapName {
    /// Every map the agent writes.
    pub const ALL: [MapName; 9] = [
        MapName::Services,
        MapName::Slots,
        MapName::Backends,
        MapName::ServiceStats,
        MapName::Maglev,
        MapName::ServicePolicy,
        MapName::EndpointHealth,
        MapName::ServiceHealth,
        MapName::Tiers,
    ];

    /// The map's name in the ELF object and its pin file name.
    pub fn as_str(self) -> &'static str {
        match self {
            MapName::Services => map_names::SERVICES,
            MapName::Slots => map_names::SLOTS,
            MapName::Backends => map_names::BACKENDS,
            MapName::ServiceStats => map_names::SERVICE_STATS,
            MapName::Maglev => map_names::MAGLEV,
            MapName::ServicePolicy => map_names::SERVICE_POLICY,
            MapName::EndpointHealth => map_names::ENDPOINT_HEALTH,
            MapName::ServiceHealth => map_names::SERVICE_HEALTH,
            MapName::Tiers => map_names::TIERS,
        }
    }
}

/// A failed map operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} on {} failed", map.as_str())]
pub struct StoreError {
    pub map: MapName,
    pub op: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl StoreError {
    /// The errno the kernel answered, if a map syscall failed.
    pub fn errno(&self) -> Option<i32> {
        if let Some(aya::maps::MapError::SyscallError(e)) =
            self.source.downcast_ref::<aya::maps::MapError>()
        {
            return e.io_error.raw_os_error();
        }
        self.source
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
    }

    /// Whether the map refused the entry for want of room: a hash map at its
    /// `max_entries` answers `E2BIG` to a new key.
    pub fn is_full(&self) -> bool {
        matches!(self.errno(), Some(libc::E2BIG | libc::ENOSPC))
    }
}

/// Entries each map refused for want of room ([`StoreError::is_full`]) since the
/// store was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refusals(BTreeMap<MapName, u64>);

impl Refusals {
    /// Counts `e` against its map if it is a refusal for want of room.
    pub fn note(&mut self, e: &StoreError) {
        if e.is_full() {
            *self.0.entry(e.map).or_default() += 1;
        }
    }

    /// Refusals of `map` so far.
    pub fn of(&self, map: MapName) -> u64 {
        self.0.get(&map).copied().unwrap_or(0)
    }
}

/// A bulk write that stopped: entries `..written` were written, the one at
/// `written` failed, the rest were not tried.
#[derive(Debug, thiserror::Error)]
#[error("bulk write stopped after {written} entries")]
pub struct BatchError {
    pub written: usize,
    #[source]
    pub source: StoreError,
}

/// Writes `keys[i]` → `values[i]` one by one with `put` (what a store without
/// batch writes does).
fn one_by_one<K, V>(
    keys: &[K],
    values: &[V],
    mut put: impl FnMut(&K, &V) -> Result<(), StoreError>,
) -> Result<(), BatchError> {
    for (written, (k, v)) in keys.iter().zip(values).enumerate() {
        put(k, v).map_err(|source| BatchError { written, source })?;
    }
    Ok(())
}

/// Everything the routing maps hold, and which services have counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub slots: Vec<(SlotKey, u32)>,
    pub backends: Vec<(BackendKey, BackendInfo)>,
    /// Maglev table chunks (the chunk number in the key's `slot`).
    pub maglev: Vec<(SlotKey, MaglevChunk)>,
    /// The claimed counter slots of `SM_SERVICE_STATS` and the service each
    /// names; their counts belong to the kernel programs and are not part of
    /// the table.
    pub stats: Vec<(u32, ServiceKey)>,
    /// Outlier detection and circuit breaking settings (`SM_SVC_POLICY`).
    pub policies: Vec<(ServiceKey, ServicePolicy)>,
    /// Priority levels of slot generations (`SM_TIERS`).
    pub tiers: Vec<(SlotKey, Tiers)>,
    /// Keys of the services' kernel health entries (`SM_SVC_HEALTH`); their
    /// counts belong to the kernel programs.
    pub service_health: Vec<ServiceKey>,
}

/// The ejections of a service running at a time: how many hosts of each of its
/// levels they take out, and when the first of them ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Running {
    pub ejected: sockmesh_common::tiers::Ejected,
    /// `CLOCK_MONOTONIC` ns.
    pub next_end: Option<u64>,
}

/// The maps the agent writes. Deleting an absent key is not an error.
pub trait MapStore {
    fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), StoreError>;
    fn del_service(&mut self, k: &ServiceKey) -> Result<(), StoreError>;
    fn put_slot(&mut self, k: &SlotKey, backend_index: u32) -> Result<(), StoreError>;
    fn del_slot(&mut self, k: &SlotKey) -> Result<(), StoreError>;
    fn put_backend(&mut self, k: &BackendKey, v: &BackendInfo) -> Result<(), StoreError>;
    fn del_backend(&mut self, k: &BackendKey) -> Result<(), StoreError>;
    fn put_maglev(&mut self, k: &SlotKey, v: &MaglevChunk) -> Result<(), StoreError>;
    fn del_maglev(&mut self, k: &SlotKey) -> Result<(), StoreError>;
    /// Gives counter slot `slot` to `k`, its counts zeroed.
    fn claim_stats(&mut self, slot: u32, k: &ServiceKey) -> Result<(), StoreError>;
    /// Gives counter slot `slot` back.
    fn release_stats(&mut self, slot: u32) -> Result<(), StoreError>;
    /// Counter slots the array holds.
    fn stats_slots(&self) -> u32;
    fn put_policy(&mut self, k: &ServiceKey, v: &ServicePolicy) -> Result<(), StoreError>;
    fn del_policy(&mut self, k: &ServiceKey) -> Result<(), StoreError>;
    /// Forgets an endpoint's health (the kernel's failure count and ejection).
    fn del_endpoint_health(&mut self, k: &EndpointKey) -> Result<(), StoreError>;
    /// Creates `k`'s kernel health entry (zeroed, with an epoch no earlier
    /// entry had) unless it exists (its counts stay).
    fn create_service_health(&mut self, k: &ServiceKey) -> Result<(), StoreError>;
    /// Deletes `k`'s kernel health entry.
    fn del_service_health(&mut self, k: &ServiceKey) -> Result<(), StoreError>;
    fn put_tiers(&mut self, k: &SlotKey, v: &Tiers) -> Result<(), StoreError>;
    fn del_tiers(&mut self, k: &SlotKey) -> Result<(), StoreError>;
    /// The ejections of `k` the kernel runs at `now_ns` (`CLOCK_MONOTONIC`), as
    /// its programs count them: a slot of its `SM_SVC_HEALTH` entry whose end is
    /// later and whose endpoint's `SM_EP_HEALTH` entry holds that end.
    fn running_ejections(&self, k: &ServiceKey, now_ns: u64) -> Result<Running, StoreError>;
    fn snapshot(&self) -> Result<Snapshot, StoreError>;
    /// The keys of every `SM_EP_HEALTH` entry (the kernel creates them; a store
    /// without them has none).
    fn endpoint_health_keys(&self) -> Result<Vec<EndpointKey>, StoreError> {
        Ok(Vec::new())
    }
    /// Entries each map refused for want of room so far (a store that cannot
    /// run out of room refuses none).
    fn refusals(&self) -> Refusals {
        Refusals::default()
    }
    /// The writer is done until its next apply: let go of what is only held
    /// for writing (the kernel store unmaps the counter array, which would
    /// otherwise count in the agent's resident memory: 5 MiB at 125,000
    /// services).
    fn rest(&mut self) {}

    /// Writes many services' values at once (`keys[i]` → `values[i]`, in order).
    /// The default writes them one by one; the kernel store batches them.
    fn put_services(
        &mut self,
        keys: &[ServiceKey],
        values: &[ServiceValue],
    ) -> Result<(), BatchError> {
        one_by_one(keys, values, |k, v| self.put_service(k, v))
    }
    /// Writes many slot entries at once, as [`MapStore::put_services`].
    fn put_slots(&mut self, keys: &[SlotKey], values: &[u32]) -> Result<(), BatchError> {
        one_by_one(keys, values, |k, v| self.put_slot(k, *v))
    }
    /// Writes many backend entries at once, as [`MapStore::put_services`].
    fn put_backends(
        &mut self,
        keys: &[BackendKey],
        values: &[BackendInfo],
    ) -> Result<(), BatchError> {
        one_by_one(keys, values, |k, v| self.put_backend(k, v))
    }
}

/// One write, as recorded by [`MemStore`].
#[cfg(any(test, feature = "testing"))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutService(ServiceKey),
    DelService(ServiceKey),
    PutSlot(SlotKey),
    DelSlot(SlotKey),
    PutBackend(BackendKey),
    DelBackend(BackendKey),
    PutMaglev(SlotKey),
    DelMaglev(SlotKey),
    ClaimStats(u32, ServiceKey),
    ReleaseStats(u32),
    PutPolicy(ServiceKey),
    DelPolicy(ServiceKey),
    DelEndpointHealth(EndpointKey),
    CreateServiceHealth(ServiceKey),
    DelServiceHealth(ServiceKey),
    PutTiers(SlotKey),
    DelTiers(SlotKey),
}

/// A resolved backend: address words and port, as in the maps.
#[cfg(any(test, feature = "testing"))]
pub type Resolved = ([u32; 4], u16);

/// Hook run after every write of a [`MemStore`].
#[cfg(any(test, feature = "testing"))]
pub type AfterWrite = Box<dyn FnMut(&MemStore, &Op)>;

/// In-memory maps that behave like the kernel's (replace-by-key, delete-if-present),
/// record every write, can fail the n-th write, and can check an invariant after
/// each write — which is how the publish order is tested without a kernel.
#[cfg(any(test, feature = "testing"))]
#[derive(Default)]
pub struct MemStore {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<BackendKey, BackendInfo>,
    pub maglev: BTreeMap<SlotKey, MaglevChunk>,
    /// Claimed counter slots, and the service each names.
    pub stats: BTreeMap<u32, ServiceKey>,
    /// Counter slots the array holds (`None`: as many as asked for).
    pub stats_slots: Option<u32>,
    pub policies: BTreeMap<ServiceKey, ServicePolicy>,
    /// Endpoint health entries (the kernel creates them; tests seed them).
    pub endpoint_health: std::collections::BTreeSet<EndpointKey>,
    /// Service health entries, by their epoch.
    pub service_health: BTreeMap<ServiceKey, u64>,
    pub tiers: BTreeMap<SlotKey, Tiers>,
    /// The last epoch handed out.
    pub epoch: u64,
    /// What [`MapStore::running_ejections`] answers (the kernel runs ejections;
    /// tests set them).
    pub running: BTreeMap<ServiceKey, Running>,
    pub log: Vec<Op>,
    /// Fail the write with this 0-based index (counted over all writes).
    pub fail_at: Option<usize>,
    /// Fail every write equal to this one (a failure that persists).
    pub fail_op: Option<Op>,
    /// Injected failures are the kernel's answer of a full map (`E2BIG`).
    pub fail_full: bool,
    /// Entries refused as a full map refuses them (injected with `fail_full`).
    pub refused: Refusals,
    pub after_write: Option<AfterWrite>,
}

#[cfg(any(test, feature = "testing"))]
impl MemStore {
    fn record(&mut self, op: Op, map: MapName) -> Result<(), StoreError> {
        let injected = |what: &'static str, full: bool| {
            let source: Box<dyn std::error::Error + Send + Sync> = if full {
                Box::new(std::io::Error::from_raw_os_error(libc::E2BIG))
            } else {
                "injected".into()
            };
            StoreError {
                map,
                op: what,
                source,
            }
        };
        if self.fail_at == Some(self.log.len()) {
            self.fail_at = None;
            let e = injected("injected failure", self.fail_full);
            self.refused.note(&e);
            return Err(e);
        }
        if self.fail_op.as_ref() == Some(&op) {
            let e = injected("injected persistent failure", self.fail_full);
            self.refused.note(&e);
            return Err(e);
        }
        self.log.push(op);
        Ok(())
    }

    fn after(&mut self) {
        if let (Some(mut hook), Some(op)) = (self.after_write.take(), self.log.last().cloned()) {
            hook(self, &op);
            self.after_write = Some(hook);
        }
    }

    /// What a kernel program would pick from for `key` right now: `None` if no such
    /// service, otherwise every slot resolved to (address words, port), or the slot
    /// that does not resolve.
    pub fn resolve(&self, key: &ServiceKey) -> Option<Result<Vec<Resolved>, SlotKey>> {
        fn never<T>(e: std::convert::Infallible) -> T {
            match e {}
        }
        let service = self.service(key).unwrap_or_else(never)?;
        let resolved = published_slots(&service)
            .map(
                |slot| match resolve_slot(self, &service, slot).unwrap_or_else(never) {
                    Slot::Backend(b) => Ok((b.addr, b.port)),
                    Slot::Missing(key) => Err(key),
                },
            )
            .collect();
        Some(resolved)
    }
}

#[cfg(any(test, feature = "testing"))]
impl RoutingMaps for MemStore {
    type Backend = BackendInfo;
    type Error = std::convert::Infallible;
    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, Self::Error> {
        Ok(self.services.get(key).copied())
    }
    fn slot(&self, key: &SlotKey) -> Result<Option<u32>, Self::Error> {
        Ok(self.slots.get(key).copied())
    }
    fn maglev(&self, key: &SlotKey, entry: usize) -> Result<Option<u32>, Self::Error> {
        Ok(self
            .maglev
            .get(key)
            .and_then(|c| c.entries.get(entry))
            .map(|&i| u32::from(i)))
    }
    fn backend(&self, key: &BackendKey) -> Result<Option<BackendInfo>, Self::Error> {
        Ok(self.backends.get(key).copied())
    }
    fn with_tiers<R>(
        &self,
        key: &SlotKey,
        f: impl FnOnce(&Tiers) -> R,
    ) -> Result<Option<R>, Self::Error> {
        Ok(self.tiers.get(key).map(f))
    }
}

#[cfg(any(test, feature = "testing"))]
impl MapStore for MemStore {
    fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), StoreError> {
        self.record(Op::PutService(*k), MapName::Services)?;
        self.services.insert(*k, *v);
        self.after();
        Ok(())
    }
    fn del_service(&mut self, k: &ServiceKey) -> Result<(), StoreError> {
        self.record(Op::DelService(*k), MapName::Services)?;
        self.services.remove(k);
        self.after();
        Ok(())
    }
    fn put_slot(&mut self, k: &SlotKey, backend_index: u32) -> Result<(), StoreError> {
        self.record(Op::PutSlot(*k), MapName::Slots)?;
        self.slots.insert(*k, backend_index);
        self.after();
        Ok(())
    }
    fn del_slot(&mut self, k: &SlotKey) -> Result<(), StoreError> {
        self.record(Op::DelSlot(*k), MapName::Slots)?;
        self.slots.remove(k);
        self.after();
        Ok(())
    }
    fn put_backend(&mut self, k: &BackendKey, v: &BackendInfo) -> Result<(), StoreError> {
        self.record(Op::PutBackend(*k), MapName::Backends)?;
        self.backends.insert(*k, *v);
        self.after();
        Ok(())
    }
    fn del_backend(&mut self, k: &BackendKey) -> Result<(), StoreError> {
        self.record(Op::DelBackend(*k), MapName::Backends)?;
        self.backends.remove(k);
        self.after();
        Ok(())
    }
    fn put_maglev(&mut self, k: &SlotKey, v: &MaglevChunk) -> Result<(), StoreError> {
        self.record(Op::PutMaglev(*k), MapName::Maglev)?;
        self.maglev.insert(*k, *v);
        self.after();
        Ok(())
    }
    fn del_maglev(&mut self, k: &SlotKey) -> Result<(), StoreError> {
        self.record(Op::DelMaglev(*k), MapName::Maglev)?;
        self.maglev.remove(k);
        self.after();
        Ok(())
    }
    fn claim_stats(&mut self, slot: u32, k: &ServiceKey) -> Result<(), StoreError> {
        self.record(Op::ClaimStats(slot, *k), MapName::ServiceStats)?;
        self.stats.insert(slot, *k);
        self.after();
        Ok(())
    }
    fn release_stats(&mut self, slot: u32) -> Result<(), StoreError> {
        self.record(Op::ReleaseStats(slot), MapName::ServiceStats)?;
        self.stats.remove(&slot);
        self.after();
        Ok(())
    }
    fn stats_slots(&self) -> u32 {
        self.stats_slots.unwrap_or(u32::MAX - 1)
    }
    fn put_policy(&mut self, k: &ServiceKey, v: &ServicePolicy) -> Result<(), StoreError> {
        self.record(Op::PutPolicy(*k), MapName::ServicePolicy)?;
        self.policies.insert(*k, *v);
        self.after();
        Ok(())
    }
    fn del_policy(&mut self, k: &ServiceKey) -> Result<(), StoreError> {
        self.record(Op::DelPolicy(*k), MapName::ServicePolicy)?;
        self.policies.remove(k);
        self.after();
        Ok(())
    }
    fn del_endpoint_health(&mut self, k: &EndpointKey) -> Result<(), StoreError> {
        self.record(Op::DelEndpointHealth(*k), MapName::EndpointHealth)?;
        self.endpoint_health.remove(k);
        self.after();
        Ok(())
    }
    fn create_service_health(&mut self, k: &ServiceKey) -> Result<(), StoreError> {
        self.record(Op::CreateServiceHealth(*k), MapName::ServiceHealth)?;
        if !self.service_health.contains_key(k) {
            self.epoch += 1;
            self.service_health.insert(*k, self.epoch);
        }
        self.after();
        Ok(())
    }
    fn del_service_health(&mut self, k: &ServiceKey) -> Result<(), StoreError> {
        self.record(Op::DelServiceHealth(*k), MapName::ServiceHealth)?;
        self.service_health.remove(k);
        self.after();
        Ok(())
    }
    fn put_tiers(&mut self, k: &SlotKey, v: &Tiers) -> Result<(), StoreError> {
        self.record(Op::PutTiers(*k), MapName::Tiers)?;
        self.tiers.insert(*k, *v);
        self.after();
        Ok(())
    }
    fn del_tiers(&mut self, k: &SlotKey) -> Result<(), StoreError> {
        self.record(Op::DelTiers(*k), MapName::Tiers)?;
        self.tiers.remove(k);
        self.after();
        Ok(())
    }
    fn running_ejections(&self, k: &ServiceKey, _now_ns: u64) -> Result<Running, StoreError> {
        Ok(self.running.get(k).copied().unwrap_or_default())
    }
    fn refusals(&self) -> Refusals {
        self.refused.clone()
    }
    fn endpoint_health_keys(&self) -> Result<Vec<EndpointKey>, StoreError> {
        Ok(self.endpoint_health.iter().copied().collect())
    }
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            policies: self.policies.iter().map(|(k, v)| (*k, *v)).collect(),
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            slots: self.slots.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            maglev: self.maglev.iter().map(|(k, v)| (*k, *v)).collect(),
            stats: self.stats.iter().map(|(s, k)| (*s, *k)).collect(),
            tiers: self.tiers.iter().map(|(k, v)| (*k, *v)).collect(),
            service_health: self.service_health.keys().copied().collect(),
        })
    }
}
