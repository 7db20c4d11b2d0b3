//! Adding many services at once (an initial load, a large file edit) with batched
//! map writes.
//!
//! Each service's writes are planned exactly as the one-service path plans them
//! ([`write_and_publish`] against a [`Recorder`] instead of the maps), with its
//! counter slot claimed as it is planned, then issued map by map: every health
//! setting, Maglev chunk, slot and backend entry, then every service value. No service is published before
//! everything it names is written, which is all the publish order asks of a new
//! service; the batches only drop the per-entry syscall.
//!
//! A batch that fails is undone (a partial publish keeps the services published
//! before the failure) and the services not published go through the one-service
//! path, which reports the failure for the service it belongs to.

use sockmesh_common::{
    BackendInfo, BackendKey, EndpointKey, MaglevChunk, ServiceKey, ServicePolicy, ServiceValue,
    SlotKey, Tiers,
};

use super::{
    ApplyReport, Installed, MapStore, MapWriter, Snapshot, StoreError, WriteError, plan_backends,
    service_key, write_and_publish,
};
use tracing::warn;

use crate::model::{Service, ServiceAddr};

/// A run of this many new services or more is added in bulk; shorter runs take
/// the one-service path (a single change keeps its latency).
pub(super) const BULK_FROM: usize = 32;

/// New services planned and written together (at 10 endpoints, about 1.5 MB of
/// planned entries).
pub(super) const BULK_CHUNK: usize = 4096;

/// The puts one or more new services need, map by map, with where each service's
/// entries start.
#[derive(Default)]
struct Recorder {
    backend_keys: Vec<BackendKey>,
    backend_values: Vec<BackendInfo>,
    slot_keys: Vec<SlotKey>,
    slot_values: Vec<u32>,
    maglev: Vec<(SlotKey, MaglevChunk)>,
    policies: Vec<(ServiceKey, ServicePolicy)>,
    service_health: Vec<ServiceKey>,
    tiers: Vec<(SlotKey, Tiers)>,
    service: Option<(ServiceKey, ServiceValue)>,
    /// The plan deleted something or published twice: not a new service's writes.
    unexpected: bool,
}

/// Where one service's entries lie in the shared [`Recorder`] vectors.
#[derive(Clone, Copy, Default)]
struct Marks {
    backends: usize,
    slots: usize,
    maglev: usize,
    policies: usize,
    service_health: usize,
    tiers: usize,
}

impl Recorder {
    fn marks(&self) -> Marks {
        Marks {
            backends: self.backend_keys.len(),
            slots: self.slot_keys.len(),
            maglev: self.maglev.len(),
            policies: self.policies.len(),
            service_health: self.service_health.len(),
            tiers: self.tiers.len(),
        }
    }

    /// Drops what was recorded since `m`.
    fn truncate(&mut self, m: Marks) {
        self.backend_keys.truncate(m.backends);
        self.backend_values.truncate(m.backends);
        self.slot_keys.truncate(m.slots);
        self.slot_values.truncate(m.slots);
        self.maglev.truncate(m.maglev);
        self.policies.truncate(m.policies);
        self.service_health.truncate(m.service_health);
        self.tiers.truncate(m.tiers);
    }
}

impl MapStore for Recorder {
    fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), StoreError> {
        self.unexpected |= self.service.replace((*k, *v)).is_some();
        Ok(())
    }
    fn put_slot(&mut self, k: &SlotKey, backend_index: u32) -> Result<(), StoreError> {
        self.slot_keys.push(*k);
        self.slot_values.push(backend_index);
        Ok(())
    }
    fn put_backend(&mut self, k: &BackendKey, v: &BackendInfo) -> Result<(), StoreError> {
        self.backend_keys.push(*k);
        self.backend_values.push(*v);
        Ok(())
    }
    fn put_maglev(&mut self, k: &SlotKey, v: &MaglevChunk) -> Result<(), StoreError> {
        self.maglev.push((*k, *v));
        Ok(())
    }
    fn put_policy(&mut self, k: &ServiceKey, v: &ServicePolicy) -> Result<(), StoreError> {
        self.policies.push((*k, *v));
        Ok(())
    }
    fn claim_stats(&mut self, _: u32, _: &ServiceKey) -> Result<(), StoreError> {
        self.unexpected = true;
        Ok(())
    }
    fn stats_slots(&self) -> u32 {
        0
    }
    fn del_service(&mut self, _: &ServiceKey) -> Result<(), StoreError> {
        self.unexpected = true;
        Ok(())
    }
    fn del_slot(&mut self, _: &SlotKey) -> Result<(), StoreError> {
        self.unexpected = true;
        Ok(())
    }
    fn del_backend(&mut self, _: &BackendKey) -> Result<(), StoreError> {
        self.unexpected = true;
        Ok(())
    }
    fn del_maglev(&mut self, _: &SlotKey) -> Result<(), StoreError> {
        self.unexpected = true;
        Ok(())
    }
    fn release_stats(&mut self, _: u32) -> Result<(), StoreError> {
        self.unexpected = true;
        Ok(())
    }
    fn del_policy(&mut self, _: &ServiceKey) -> Result<(), StoreError> {
        self.unexpected = true;
        Ok(())
    }
    fn del_endpoint_health(&mut self, _: &EndpointKey) -> Result<(), StoreError> {
        self.unexpected = true;
        Ok(())
    }
    fn create_service_health(&mut self, k: &ServiceKey) -> Result<(), StoreError> {
        self.service_health.push(*k);
        Ok(())
    }
    fn del_service_health(&mut self, _: &ServiceKey) -> Result<(), StoreError> {
        self.unexpected = true;
        Ok(())
    }
    fn put_tiers(&mut self, k: &SlotKey, v: &Tiers) -> Result<(), StoreError> {
        self.tiers.push((*k, *v));
        Ok(())
    }
    fn del_tiers(&mut self, _: &SlotKey) -> Result<(), StoreError> {
        self.unexpected = true;
        Ok(())
    }
    fn running_ejections(
        &self,
        _: &ServiceKey,
        _: u64,
    ) -> Result<super::super::store::Running, StoreError> {
        // A service being added has no ejection running.
        Ok(super::super::store::Running::default())
    }
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        // Planning a write never reads the maps.
        Ok(Snapshot::default())
    }
}

/// One new service, planned.
struct Planned<'a> {
    service: ServiceAddr,
    backends: &'a Service,
    key: ServiceKey,
    installed: Installed,
    ops: usize,
    /// Its entries in the recorder: from these marks to the next service's.
    marks: Marks,
    /// Its value's position among the recorded values (`None`: publishes nothing).
    value: Option<usize>,
}

impl<S: MapStore> MapWriter<S> {
    /// Adds `adds` (none of them installed) in bulk, counting into `report`.
    /// Fails with the first service that cannot be written, as the one-service
    /// path does; the services before it are installed.
    pub(super) fn add_bulk(
        &mut self,
        adds: &[(ServiceAddr, &Service)],
        report: &mut ApplyReport,
    ) -> Result<(), WriteError> {
        let mut rec = Recorder::default();
        let mut values: Vec<(ServiceKey, ServiceValue)> = Vec::new();
        let mut planned: Vec<Planned<'_>> = Vec::with_capacity(adds.len());
        // Services whose writes are not a new service's go one by one (none do
        // today; the recorder checks rather than assumes).
        let mut one_by_one: Vec<(ServiceAddr, &Service)> = Vec::new();
        for &(service, backends) in adds {
            let key = service_key(&service);
            let mut installed = Installed::new(self.alloc_id());
            // Counters first: the programs count into the slot from the first
            // connect(), and the value names it.
            self.counters
                .claim(&mut self.store, &key, &mut installed.stats);
            let plan = plan_backends(&installed, service.protocol, backends, self.envoy_draws);
            let marks = rec.marks();
            let mut ops = 0;
            // The recorder never fails.
            let _ = write_and_publish(&mut rec, &key, &mut installed, plan, &mut ops);
            if std::mem::take(&mut rec.unexpected) {
                rec.truncate(marks);
                rec.service = None;
                self.ids.remove(&installed.id);
                self.counters.release(&mut self.store, &mut installed.stats);
                one_by_one.push((service, backends));
                continue;
            }
            let value = rec.service.take().map(|v| {
                values.push(v);
                values.len() - 1
            });
            planned.push(Planned {
                service,
                backends,
                key,
                installed,
                ops,
                marks,
                value,
            });
        }
        let published = self.write_bulk(&rec, &values, &mut planned);
        let rest = planned.split_off(published);
        for p in planned {
            self.usage = self.usage.plus(&p.installed.usage());
            self.entries = self.entries.plus(p.installed.entries());
            self.mirror.services.insert(p.key, p.installed);
            report.added += 1;
            report.map_ops += p.ops;
        }
        // What the batches did not publish (undone), then what was never batched.
        for p in &rest {
            self.ids.remove(&p.installed.id);
        }
        let fallback = rest
            .iter()
            .map(|p| (p.service, p.backends))
            .chain(one_by_one);
        for (service, backends) in fallback {
            let key = service_key(&service);
            report.map_ops += self.counted(&key, |w| w.add_service(&service, &key, backends))?;
            report.added += 1;
        }
        Ok(())
    }

    /// Writes the recorded entries, then publishes the values; returns how many of
    /// `planned` (from the start) are published. The entries of the others are
    /// deleted again.
    fn write_bulk(
        &mut self,
        rec: &Recorder,
        values: &[(ServiceKey, ServiceValue)],
        planned: &mut [Planned<'_>],
    ) -> usize {
        let written = (|| -> Result<(), StoreError> {
            for (k, v) in &rec.policies {
                self.store.put_policy(k, v)?;
            }
            for k in &rec.service_health {
                self.store.create_service_health(k)?;
            }
            for (k, v) in &rec.tiers {
                self.store.put_tiers(k, v)?;
            }
            for (k, v) in &rec.maglev {
                self.store.put_maglev(k, v)?;
            }
            self.store
                .put_slots(&rec.slot_keys, &rec.slot_values)
                .map_err(|e| e.source)?;
            self.store
                .put_backends(&rec.backend_keys, &rec.backend_values)
                .map_err(|e| e.source)
        })();
        let published = match written {
            Err(e) => {
                warn!(error = %e, cause = %e.source, services = planned.len(),
                    "a bulk write failed; writing these services one by one");
                0
            }
            Ok(()) => {
                let (keys, vals): (Vec<ServiceKey>, Vec<ServiceValue>) =
                    values.iter().copied().unzip();
                match self.store.put_services(&keys, &vals) {
                    Ok(()) => planned.len(),
                    Err(e) => {
                        warn!(error = %e.source, cause = %e.source.source, published = e.written,
                            services = planned.len(),
                            "a bulk publish failed; writing the rest one by one");
                        // The services up to the first value not written.
                        planned
                            .iter()
                            .position(|p| p.value.is_some_and(|v| v >= e.written))
                            .unwrap_or(planned.len())
                    }
                }
            }
        };
        self.undo(rec, planned, published);
        published
    }

    /// Deletes the entries and counters of `planned[published..]` (never
    /// published, so nothing can reach them).
    fn undo(&mut self, rec: &Recorder, planned: &mut [Planned<'_>], published: usize) {
        let Some(first) = planned.get(published) else {
            return;
        };
        let m = first.marks;
        for (k, _) in &rec.policies[m.policies..] {
            let _ = self.store.del_policy(k);
        }
        for k in &rec.service_health[m.service_health..] {
            let _ = self.store.del_service_health(k);
        }
        for (k, _) in &rec.tiers[m.tiers..] {
            let _ = self.store.del_tiers(k);
        }
        for (k, _) in &rec.maglev[m.maglev..] {
            let _ = self.store.del_maglev(k);
        }
        for k in &rec.slot_keys[m.slots..] {
            let _ = self.store.del_slot(k);
        }
        for k in &rec.backend_keys[m.backends..] {
            let _ = self.store.del_backend(k);
        }
        for p in &mut planned[published..] {
            self.counters
                .release(&mut self.store, &mut p.installed.stats);
        }
    }
}
