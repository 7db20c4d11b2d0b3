//! [`MapStore`] over the real kernel maps, and read-only access to pinned maps.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use std::os::fd::AsFd as _;

use aya::maps::{Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray};
use sockmesh_common::{
    BackendInfo, BackendKey, ConnKey, EndpointHealth, EndpointKey, MaglevChunk, ServiceHealth,
    ServiceKey, ServicePolicy, ServiceStats, ServiceValue, SlotKey, Tiers, counter, map_names,
    resolve::{RoutingMaps, TableMaps, backend_key, published_indices},
};

use super::{
    DataplaneError,
    counters::{CounterArray, Counts},
    keys::{port_from_map, service_key, words_to_ip},
    store::{BatchError, MapName, MapStore, Refusals, Running, Snapshot, StoreError},
    sys,
};
use crate::model::ServiceAddr;

/// Every map the agent writes, of a loaded or pinned datapath: the three routing
/// maps and the per-service counters.
pub struct KernelMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, BackendKey, BackendInfo>,
    maglev: HashMap<MapData, SlotKey, MaglevChunk>,
    stats: Array<MapData, ServiceStats>,
    /// `stats` mapped writable, from the first slot claimed or released in an
    /// apply to its end ([`MapStore::rest`]).
    counter_array: Option<CounterArray>,
    policies: HashMap<MapData, ServiceKey, ServicePolicy>,
    endpoint_health: HashMap<MapData, EndpointKey, EndpointHealth>,
    service_health: HashMap<MapData, ServiceKey, ServiceHealth>,
    tiers: HashMap<MapData, SlotKey, Tiers>,
    /// The last epoch given to a service health entry. Starts at the wall clock's
    /// nanoseconds, so an agent started later never repeats the epoch of an
    /// entry pinned by an earlier one.
    epoch: u64,
    /// Entries the maps refused for want of room.
    refused: Refusals,
}

/// The maps [`KernelMaps`] holds, taken from a loaded object or opened from pins.
pub struct WrittenMaps {
    pub services: Map,
    pub slots: Map,
    pub backends: Map,
    pub maglev: Map,
    pub stats: Map,
    pub policies: Map,
    pub endpoint_health: Map,
    pub service_health: Map,
    pub tiers: Map,
}

impl KernelMaps {
    /// Wraps maps taken from a loaded object.
    pub fn new(maps: WrittenMaps) -> Result<Self, DataplaneError> {
        let conv = |name: &'static str| move |source| DataplaneError::Map { name, source };
        Ok(Self {
            services: HashMap::try_from(maps.services).map_err(conv(map_names::SERVICES))?,
            slots: HashMap::try_from(maps.slots).map_err(conv(map_names::SLOTS))?,
            backends: HashMap::try_from(maps.backends).map_err(conv(map_names::BACKENDS))?,
            maglev: HashMap::try_from(maps.maglev).map_err(conv(map_names::MAGLEV))?,
            stats: Array::try_from(maps.stats).map_err(conv(map_names::SERVICE_STATS))?,
            counter_array: None,
            policies: HashMap::try_from(maps.policies).map_err(conv(map_names::SERVICE_POLICY))?,
            endpoint_health: HashMap::try_from(maps.endpoint_health)
                .map_err(conv(map_names::ENDPOINT_HEALTH))?,
            service_health: HashMap::try_from(maps.service_health)
                .map_err(conv(map_names::SERVICE_HEALTH))?,
            tiers: HashMap::try_from(maps.tiers).map_err(conv(map_names::TIERS))?,
            epoch: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2)),
            refused: Refusals::default(),
        })
    }

    /// Opens the maps pinned for `layout` (no program is loaded).
    pub fn open_pinned(layout: &super::PinLayout) -> Result<Self, DataplaneError> {
        let maps_dir = &layout.maps;
        let health = &layout.health;
        Self::new(WrittenMaps {
            policies: Map::HashMap(open_pin(health, map_names::SERVICE_POLICY)?),
            endpoint_health: Map::HashMap(open_pin(health, map_names::ENDPOINT_HEALTH)?),
            service_health: Map::HashMap(open_pin(health, map_names::SERVICE_HEALTH)?),
            tiers: Map::HashMap(open_pin(maps_dir, map_names::TIERS)?),
            services: Map::HashMap(open_pin(maps_dir, map_names::SERVICES)?),
            slots: Map::HashMap(open_pin(maps_dir, map_names::SLOTS)?),
            backends: Map::HashMap(open_pin(maps_dir, map_names::BACKENDS)?),
            maglev: Map::HashMap(open_pin(maps_dir, map_names::MAGLEV)?),
            stats: Map::Array(open_pin(maps_dir, map_names::SERVICE_STATS)?),
        })
    }

    /// The backends a connect() to `service` can reach now (what the published slots
    /// point at), sorted; `None` if the service is not in the map. A slot that does
    /// not resolve (an update raced this read) is `MapError::KeyNotFound`. Each
    /// backend is looked up once, however many slots it holds.
    pub fn reachable(&self, service: &ServiceAddr) -> Result<Option<Vec<(IpAddr, u16)>>, MapError> {
        let Some(value) = self.service(&service_key(service))? else {
            return Ok(None);
        };
        let mut indexes = std::collections::BTreeSet::new();
        if published_indices(self, &value, |i| {
            indexes.insert(i);
        })?
        .is_err()
        {
            return Err(MapError::KeyNotFound);
        }
        let mut out = Vec::with_capacity(indexes.len());
        for i in indexes {
            match self.backend(&backend_key(&value, i))? {
                Some(info) => out.push((words_to_ip(info.addr), port_from_map(info.port))),
                None => return Err(MapError::KeyNotFound),
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(Some(out))
    }
}

impl KernelMaps {
    /// The counter array, mapped writable on first use.
    fn counter_array(&mut self) -> Result<&CounterArray, StoreError> {
        if self.counter_array.is_none() {
            self.counter_array = Some(map_counters(&self.stats, true)?);
        }
        self.counter_array.as_ref().ok_or_else(|| StoreError {
            map: MapName::ServiceStats,
            op: "mmap",
            source: "no mapping".into(),
        })
    }
}

/// Maps the counter array `stats` into memory, writable if `writable`.
fn map_counters(
    stats: &Array<MapData, ServiceStats>,
    writable: bool,
) -> Result<CounterArray, StoreError> {
    CounterArray::map(stats.map().fd().as_fd(), stats.len(), writable).map_err(|e| StoreError {
        map: MapName::ServiceStats,
        op: "mmap",
        source: Box::new(e),
    })
}

/// An absent key is `None`.
fn found<V>(r: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

impl RoutingMaps for KernelMaps {
    type Backend = BackendInfo;
    type Error = MapError;
    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, MapError> {
        found(self.services.get(key, 0))
    }
    fn slot(&self, key: &SlotKey) -> Result<Option<u32>, MapError> {
        found(self.slots.get(key, 0))
    }
    fn maglev(&self, key: &SlotKey, entry: usize) -> Result<Option<u32>, MapError> {
        Ok(found(self.maglev.get(key, 0))?
            .and_then(|c| c.entries.get(entry).map(|&i| u32::from(i))))
    }
    fn backend(&self, key: &BackendKey) -> Result<Option<BackendInfo>, MapError> {
        found(self.backends.get(key, 0))
    }
    fn with_tiers<R>(
        &self,
        key: &SlotKey,
        f: impl FnOnce(&Tiers) -> R,
    ) -> Result<Option<R>, MapError> {
        Ok(found(self.tiers.get(key, 0))?.map(|t| f(&t)))
    }
}

impl TableMaps for KernelMaps {
    fn maglev_chunk(&self, key: &SlotKey) -> Result<Option<MaglevChunk>, MapError> {
        found(self.maglev.get(key, 0))
    }
}

fn open_pin(dir: &Path, name: &'static str) -> Result<MapData, DataplaneError> {
    let path: PathBuf = dir.join(name);
    if !path.exists() {
        return Err(DataplaneError::NotInstalled { path });
    }
    MapData::from_pin(&path).map_err(|source| DataplaneError::Map { name, source })
}

fn err(map: MapName, op: &'static str) -> impl FnOnce(MapError) -> StoreError {
    move |e| StoreError {
        map,
        op,
        source: Box::new(e),
    }
}

/// [`err`] for a write that may add an entry: a refusal for want of room is
/// counted in `refused`.
fn put_err<'a>(
    refused: &'a mut Refusals,
    map: MapName,
    op: &'static str,
) -> impl FnOnce(MapError) -> StoreError + 'a {
    move |e| {
        let e = err(map, op)(e);
        refused.note(&e);
        e
    }
}

/// Whether a failed map syscall failed with `errno`.
fn is_errno(r: &Result<(), MapError>, errno: i32) -> bool {
    matches!(r, Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(errno))
}

/// Deleting an absent key is fine: the caller wanted it gone.
fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    if is_errno(&r, libc::ENOENT) || matches!(r, Err(MapError::KeyNotFound)) {
        return Ok(());
    }
    r
}

/// The kernel's answer to a command it does not have (`ENOTSUPP`, 524: a map
/// type without batch operations), or to a `bpf(2)` command number it does not
/// know (`EINVAL`).
const ENOTSUPP: i32 = 524;

/// Writes `keys[i]` → `values[i]` into `map` with `flags` in batches; where the
/// kernel refuses the batch command itself, one by one (which also names the
/// entry an `EINVAL` was about).
fn put_batch<K: aya::Pod + Sync, V: aya::Pod + Sync>(
    map: &mut HashMap<MapData, K, V>,
    refused: &mut Refusals,
    name: MapName,
    keys: &[K],
    values: &[V],
    flags: u64,
) -> Result<(), BatchError> {
    let r = put_batch_once(map, name, keys, values, flags);
    if let Err(e) = &r {
        refused.note(&e.source);
    }
    r
}

fn put_batch_once<K: aya::Pod + Sync, V: aya::Pod + Sync>(
    map: &mut HashMap<MapData, K, V>,
    name: MapName,
    keys: &[K],
    values: &[V],
    flags: u64,
) -> Result<(), BatchError> {
    let fd = map.map().fd().as_fd();
    // A bulk write's backend and slot entries are reached only once their
    // service is published, after them: they are written on two threads. The
    // services and their counters are written in order (what is written of them
    // is told by the entries before the first failure).
    let written = if matches!(name, MapName::Backends | MapName::Slots) {
        sys::map_update_batch_split(fd, keys, values, flags)
    } else {
        sys::map_update_batch(fd, keys, values, flags)
    };
    let from = match written {
        Ok(()) => return Ok(()),
        Err(f)
            if f.written == 0
                && matches!(f.error.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) =>
        {
            0
        }
        Err(f) => {
            return Err(BatchError {
                written: f.written,
                source: StoreError {
                    map: name,
                    op: "batch insert",
                    source: Box::new(f.error),
                },
            });
        }
    };
    for (i, (k, v)) in keys.iter().zip(values).enumerate().skip(from) {
        map.insert(k, v, flags).map_err(|e| BatchError {
            written: i,
            source: err(name, "insert")(e),
        })?;
    }
    Ok(())
}

impl MapStore for KernelMaps {
    fn put_services(
        &mut self,
        keys: &[ServiceKey],
        values: &[ServiceValue],
    ) -> Result<(), BatchError> {
        put_batch(
            &mut self.services,
            &mut self.refused,
            MapName::Services,
            keys,
            values,
            0,
        )
    }
    fn put_slots(&mut self, keys: &[SlotKey], values: &[u32]) -> Result<(), BatchError> {
        put_batch(
            &mut self.slots,
            &mut self.refused,
            MapName::Slots,
            keys,
            values,
            0,
        )
    }
    fn put_backends(
        &mut self,
        keys: &[BackendKey],
        values: &[BackendInfo],
    ) -> Result<(), BatchError> {
        put_batch(
            &mut self.backends,
            &mut self.refused,
            MapName::Backends,
            keys,
            values,
            0,
        )
    }

    fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), StoreError> {
        self.services.insert(k, v, 0).map_err(put_err(
            &mut self.refused,
            MapName::Services,
            "insert",
        ))
    }
    fn del_service(&mut self, k: &ServiceKey) -> Result<(), StoreError> {
        absent_ok(self.services.remove(k)).map_err(err(MapName::Services, "delete"))
    }
    fn put_slot(&mut self, k: &SlotKey, backend_index: u32) -> Result<(), StoreError> {
        self.slots.insert(k, &backend_index, 0).map_err(put_err(
            &mut self.refused,
            MapName::Slots,
            "insert",
        ))
    }
    fn del_slot(&mut self, k: &SlotKey) -> Result<(), StoreError> {
        absent_ok(self.slots.remove(k)).map_err(err(MapName::Slots, "delete"))
    }
    fn put_backend(&mut self, k: &BackendKey, v: &BackendInfo) -> Result<(), StoreError> {
        self.backends.insert(k, v, 0).map_err(put_err(
            &mut self.refused,
            MapName::Backends,
            "insert",
        ))
    }
    fn del_backend(&mut self, k: &BackendKey) -> Result<(), StoreError> {
        absent_ok(self.backends.remove(k)).map_err(err(MapName::Backends, "delete"))
    }
    fn put_maglev(&mut self, k: &SlotKey, v: &MaglevChunk) -> Result<(), StoreError> {
        self.maglev
            .insert(k, v, 0)
            .map_err(put_err(&mut self.refused, MapName::Maglev, "insert"))
    }
    fn del_maglev(&mut self, k: &SlotKey) -> Result<(), StoreError> {
        absent_ok(self.maglev.remove(k)).map_err(err(MapName::Maglev, "delete"))
    }
    fn claim_stats(&mut self, slot: u32, k: &ServiceKey) -> Result<(), StoreError> {
        if self.counter_array()?.claim(slot, k) {
            Ok(())
        } else {
            Err(StoreError {
                map: MapName::ServiceStats,
                op: "claim",
                source: Box::new(std::io::Error::from_raw_os_error(libc::E2BIG)),
            })
        }
    }
    fn release_stats(&mut self, slot: u32) -> Result<(), StoreError> {
        self.counter_array()?.release(slot);
        Ok(())
    }
    fn stats_slots(&self) -> u32 {
        self.stats.len()
    }
    fn rest(&mut self) {
        self.counter_array = None;
    }
    fn put_policy(&mut self, k: &ServiceKey, v: &ServicePolicy) -> Result<(), StoreError> {
        self.policies.insert(k, v, 0).map_err(put_err(
            &mut self.refused,
            MapName::ServicePolicy,
            "insert",
        ))
    }
    fn del_policy(&mut self, k: &ServiceKey) -> Result<(), StoreError> {
        absent_ok(self.policies.remove(k)).map_err(err(MapName::ServicePolicy, "delete"))
    }
    fn del_endpoint_health(&mut self, k: &EndpointKey) -> Result<(), StoreError> {
        absent_ok(self.endpoint_health.remove(k)).map_err(err(MapName::EndpointHealth, "delete"))
    }
    fn create_service_health(&mut self, k: &ServiceKey) -> Result<(), StoreError> {
        self.epoch += 1;
        let entry = ServiceHealth {
            epoch: self.epoch,
            ..ServiceHealth::ZERO
        };
        let flags = u64::from(aya_obj::generated::BPF_NOEXIST);
        let r = self.service_health.insert(k, &entry, flags);
        // Present already (adopted): its counts and ejections stay.
        if is_errno(&r, libc::EEXIST) {
            return Ok(());
        }
        r.map_err(put_err(&mut self.refused, MapName::ServiceHealth, "insert"))
    }
    fn del_service_health(&mut self, k: &ServiceKey) -> Result<(), StoreError> {
        absent_ok(self.service_health.remove(k)).map_err(err(MapName::ServiceHealth, "delete"))
    }
    fn put_tiers(&mut self, k: &SlotKey, v: &Tiers) -> Result<(), StoreError> {
        self.tiers
            .insert(k, v, 0)
            .map_err(put_err(&mut self.refused, MapName::Tiers, "insert"))
    }
    fn del_tiers(&mut self, k: &SlotKey) -> Result<(), StoreError> {
        absent_ok(self.tiers.remove(k)).map_err(err(MapName::Tiers, "delete"))
    }
    fn running_ejections(&self, k: &ServiceKey, now_ns: u64) -> Result<Running, StoreError> {
        let Some(h) =
            found(self.service_health.get(k, 0)).map_err(err(MapName::ServiceHealth, "lookup"))?
        else {
            return Ok(Running::default());
        };
        let mut running = Running::default();
        for e in h.ejections.iter().filter(|e| e.until_ns > now_ns) {
            let key = EndpointKey {
                service: *k,
                addr: e.addr,
                port: e.port,
                pad: 0,
            };
            let holds = found(self.endpoint_health.get(&key, 0))
                .map_err(err(MapName::EndpointHealth, "lookup"))?
                .is_some_and(|ep| ep.ejected_until_ns == e.until_ns);
            if !holds {
                continue;
            }
            match e.state {
                sockmesh_common::backend_state::ACTIVE => running.ejected.add(e.level, false),
                sockmesh_common::backend_state::DEGRADED => running.ejected.add(e.level, true),
                _ => {}
            }
            running.next_end = Some(running.next_end.map_or(e.until_ns, |n| n.min(e.until_ns)));
        }
        Ok(running)
    }
    fn refusals(&self) -> Refusals {
        self.refused.clone()
    }
    fn endpoint_health_keys(&self) -> Result<Vec<EndpointKey>, StoreError> {
        self.endpoint_health
            .keys()
            .collect::<Result<_, _>>()
            .map_err(err(MapName::EndpointHealth, "iterate"))
    }
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            services: self
                .services
                .iter()
                .collect::<Result<_, _>>()
                .map_err(err(MapName::Services, "iterate"))?,
            slots: self
                .slots
                .iter()
                .collect::<Result<_, _>>()
                .map_err(err(MapName::Slots, "iterate"))?,
            backends: self
                .backends
                .iter()
                .collect::<Result<_, _>>()
                .map_err(err(MapName::Backends, "iterate"))?,
            maglev: self
                .maglev
                .iter()
                .collect::<Result<_, _>>()
                .map_err(err(MapName::Maglev, "iterate"))?,
            stats: {
                let mut claimed = Vec::new();
                let mapped;
                let array = match &self.counter_array {
                    Some(a) => a,
                    None => {
                        mapped = map_counters(&self.stats, false)?;
                        &mapped
                    }
                };
                array.for_each(|slot, k, _| claimed.push((slot, k)));
                claimed
            },
            policies: self
                .policies
                .iter()
                .collect::<Result<_, _>>()
                .map_err(err(MapName::ServicePolicy, "iterate"))?,
            tiers: self
                .tiers
                .iter()
                .collect::<Result<_, _>>()
                .map_err(err(MapName::Tiers, "iterate"))?,
            service_health: self
                .service_health
                .keys()
                .collect::<Result<_, _>>()
                .map_err(err(MapName::ServiceHealth, "iterate"))?,
        })
    }
}

/// The datapath counters, summed over CPUs, by name.
pub fn read_counters(maps_dir: &Path) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
    let data = open_pin(maps_dir, map_names::COUNTERS)?;
    let conv = |source| DataplaneError::Map {
        name: map_names::COUNTERS,
        source,
    };
    let array: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(conv)?;
    let mut out = Vec::with_capacity(counter::NAMES.len());
    for (i, name) in (0u32..).zip(counter::NAMES) {
        let values = array.get(&i, 0).map_err(conv)?;
        out.push((name, values.iter().sum()));
    }
    Ok(out)
}

/// The counter array pinned under `maps_dir` (`SM_SERVICE_STATS`), mapped
/// read-only. Only this map is opened: a scrape reads nothing else.
pub fn open_counter_array(maps_dir: &Path) -> Result<CounterArray, DataplaneError> {
    let name = map_names::SERVICE_STATS;
    let conv = |source| DataplaneError::Map { name, source };
    let data = open_pin(maps_dir, name)?;
    let map: Array<MapData, ServiceStats> = Array::try_from(Map::Array(data)).map_err(conv)?;
    CounterArray::map(map.map().fd().as_fd(), map.len(), false).map_err(|e| {
        conv(MapError::SyscallError(aya::sys::SyscallError {
            call: "mmap",
            io_error: e,
        }))
    })
}

/// Every claimed slot of the counter array pinned under `maps_dir`, as `f`
/// turns it (its index, service and counts; `None`: left out).
pub fn read_service_stats_as<T>(
    maps_dir: &Path,
    mut f: impl FnMut(u32, ServiceKey, Counts) -> Option<T>,
) -> Result<Vec<T>, DataplaneError> {
    let array = open_counter_array(maps_dir)?;
    let mut out = Vec::new();
    array.for_each(|slot, k, counts| out.extend(f(slot, k, counts)));
    Ok(out)
}

/// The open-connection counts pinned in `conns_dir` (`SM_BACKEND_CONNS`).
pub fn read_conns(conns_dir: &Path) -> Result<Vec<(ConnKey, u64)>, DataplaneError> {
    read_all(conns_dir, map_names::BACKEND_CONNS)
}

/// Every entry of the endpoint and the service health maps.
pub type HealthEntries = (
    Vec<(EndpointKey, EndpointHealth)>,
    Vec<(ServiceKey, ServiceHealth)>,
);

/// The kernel's health state pinned in `health_dir`: every endpoint entry
/// (`SM_EP_HEALTH`) and every service entry (`SM_SVC_HEALTH`), each only if
/// asked for (empty if not).
pub fn read_health(
    health_dir: &Path,
    endpoints: bool,
    services: bool,
) -> Result<HealthEntries, DataplaneError> {
    let endpoints = if endpoints {
        read_all::<EndpointKey, EndpointHealth>(health_dir, map_names::ENDPOINT_HEALTH)?
    } else {
        Vec::new()
    };
    let services = if services {
        read_all::<ServiceKey, ServiceHealth>(health_dir, map_names::SERVICE_HEALTH)?
    } else {
        Vec::new()
    };
    Ok((endpoints, services))
}

/// Every entry of hash map `name` pinned in `dir`, thousands per batch call
/// where the kernel has batch lookups (5.6), else two calls per entry.
fn read_all<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<Vec<(K, V)>, DataplaneError> {
    let conv = |source| DataplaneError::Map { name, source };
    let map: HashMap<MapData, K, V> =
        HashMap::try_from(Map::HashMap(open_pin(dir, name)?)).map_err(conv)?;
    let mut out = Vec::new();
    let batched = sys::map_for_each(map.map().fd().as_fd(), READ_CHUNK, |k, v| out.push((k, v)));
    if batched.is_ok() {
        return Ok(out);
    }
    map.iter()
        .map(|entry| entry.map_err(conv))
        .collect::<Result<Vec<_>, _>>()
}

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call.
const READ_CHUNK: usize = 16_384;
