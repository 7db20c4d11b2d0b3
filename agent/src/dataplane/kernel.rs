//! [`MapStore`] over the real kernel maps, and read-only access to pinned maps.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};
use sockmesh_common::{
    BackendInfo, BackendKey, ServiceKey, ServiceStats, ServiceValue, SlotKey, counter,
};

use super::{
    DataplaneError,
    store::{MapName, MapStore, Snapshot, StoreError},
};

/// The routing maps of a loaded or pinned datapath.
pub struct KernelMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, BackendKey, BackendInfo>,
}

impl KernelMaps {
    /// Wraps maps taken from a loaded object.
    pub fn new(services: Map, slots: Map, backends: Map) -> Result<Self, DataplaneError> {
        let conv = |name: &'static str, e: MapError| DataplaneError::Map { name, source: e };
        Ok(Self {
            services: HashMap::try_from(services).map_err(|e| conv("SM_SERVICES", e))?,
            slots: HashMap::try_from(slots).map_err(|e| conv("SM_SLOTS", e))?,
            backends: HashMap::try_from(backends).map_err(|e| conv("SM_BACKENDS", e))?,
        })
    }

    /// Opens the routing maps pinned under `maps_dir` (no program is loaded).
    pub fn open_pinned(maps_dir: &Path) -> Result<Self, DataplaneError> {
        Self::new(
            Map::HashMap(open_pin(maps_dir, "SM_SERVICES")?),
            Map::HashMap(open_pin(maps_dir, "SM_SLOTS")?),
            Map::HashMap(open_pin(maps_dir, "SM_BACKENDS")?),
        )
    }
}

impl KernelMaps {
    /// The backends a connect() to `service` can reach now (what the published slots
    /// point at), sorted; `None` if the service is not in the map.
    pub fn reachable(
        &self,
        service: &crate::model::ServiceAddr,
    ) -> Result<Option<Vec<(std::net::IpAddr, u16)>>, MapError> {
        use super::keys::{port_from_map, service_key, words_to_ip};
        let value = match self.services.get(&service_key(service), 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for slot in 0..value.slot_count {
            let key = SlotKey {
                service_id: value.id,
                generation: value.generation,
                pad: 0,
                slot: u16::try_from(slot).unwrap_or(u16::MAX),
            };
            let index = self.slots.get(&key, 0)?;
            let info = self.backends.get(
                &BackendKey {
                    service_id: value.id,
                    index,
                },
                0,
            )?;
            out.push((words_to_ip(info.addr), port_from_map(info.port)));
        }
        out.sort_unstable();
        out.dedup();
        Ok(Some(out))
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

/// Deleting an absent key is fine: the caller wanted it gone.
fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl MapStore for KernelMaps {
    fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), StoreError> {
        self.services
            .insert(k, v, 0)
            .map_err(err(MapName::Services, "insert"))
    }
    fn del_service(&mut self, k: &ServiceKey) -> Result<(), StoreError> {
        absent_ok(self.services.remove(k)).map_err(err(MapName::Services, "delete"))
    }
    fn put_slot(&mut self, k: &SlotKey, backend_index: u32) -> Result<(), StoreError> {
        self.slots
            .insert(k, &backend_index, 0)
            .map_err(err(MapName::Slots, "insert"))
    }
    fn del_slot(&mut self, k: &SlotKey) -> Result<(), StoreError> {
        absent_ok(self.slots.remove(k)).map_err(err(MapName::Slots, "delete"))
    }
    fn put_backend(&mut self, k: &BackendKey, v: &BackendInfo) -> Result<(), StoreError> {
        self.backends
            .insert(k, v, 0)
            .map_err(err(MapName::Backends, "insert"))
    }
    fn del_backend(&mut self, k: &BackendKey) -> Result<(), StoreError> {
        absent_ok(self.backends.remove(k)).map_err(err(MapName::Backends, "delete"))
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
        })
    }
}

/// The datapath counters, summed over CPUs, by name.
pub fn read_counters(maps_dir: &Path) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
    let data = open_pin(maps_dir, "SM_COUNTERS")?;
    let conv = |source| DataplaneError::Map {
        name: "SM_COUNTERS",
        source,
    };
    let array: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(conv)?;
    let mut out = Vec::with_capacity(counter::NAMES.len());
    for (i, name) in counter::NAMES.iter().enumerate() {
        let values = array.get(&(i as u32), 0).map_err(conv)?;
        out.push((*name, values.iter().sum()));
    }
    Ok(out)
}

/// The per-service counter map (`SM_SERVICE_STATS`). The agent creates a zeroed
/// entry before a service is published and deletes it once the service is gone; the
/// programs only add to existing entries.
pub struct ServiceStatsMap {
    map: PerCpuHashMap<MapData, ServiceKey, ServiceStats>,
    cpus: usize,
}

impl ServiceStatsMap {
    /// Wraps the map taken from a loaded object.
    pub fn new(map: Map) -> Result<Self, DataplaneError> {
        let conv = |source| DataplaneError::Map {
            name: "SM_SERVICE_STATS",
            source,
        };
        let cpus = aya::util::nr_cpus()
            .map_err(|(path, source)| DataplaneError::Io {
                path: path.into(),
                source,
            })?
            .get() as usize;
        Ok(Self {
            map: PerCpuHashMap::try_from(map).map_err(conv)?,
            cpus,
        })
    }

    /// Opens the map pinned under `maps_dir`.
    pub fn open_pinned(maps_dir: &Path) -> Result<Self, DataplaneError> {
        Self::new(Map::PerCpuHashMap(open_pin(maps_dir, "SM_SERVICE_STATS")?))
    }

    /// Creates zeroed entries for the services that have none (existing counts stay).
    pub fn ensure<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a ServiceKey>,
    ) -> Result<(), MapError> {
        const BPF_NOEXIST: u64 = 1;
        for key in keys {
            let zero = PerCpuValues::try_from(vec![ServiceStats::default(); self.cpus])?;
            match self.map.insert(key, zero, BPF_NOEXIST) {
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// Deletes the entries of these services.
    pub fn remove<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a ServiceKey>,
    ) -> Result<(), MapError> {
        for key in keys {
            absent_ok(self.map.remove(key))?;
        }
        Ok(())
    }

    /// Deletes every entry whose service is not in `keep`.
    pub fn retain(&mut self, keep: &std::collections::HashSet<ServiceKey>) -> Result<(), MapError> {
        let stale: Vec<ServiceKey> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        self.remove(&stale)
    }

    /// Every service's counters, summed over CPUs.
    pub fn read(&self) -> Result<Vec<(ServiceKey, ServiceStats)>, MapError> {
        let mut out = Vec::new();
        for entry in self.map.iter() {
            let (key, values) = entry?;
            let sum = values
                .iter()
                .fold(ServiceStats::default(), |a, v| ServiceStats {
                    redirects: a.redirects + v.redirects,
                    no_backend: a.no_backend + v.no_backend,
                });
            out.push((key, sum));
        }
        Ok(out)
    }
}
