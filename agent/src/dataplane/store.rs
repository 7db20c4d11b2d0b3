//! Access to the three routing maps, behind a trait so the writer's ordering can be
//! unit-tested against an in-memory fake.

#[cfg(any(test, feature = "testing"))]
use std::collections::BTreeMap;

use sockmesh_common::{BackendInfo, BackendKey, ServiceKey, ServiceValue, SlotKey};

/// Which map an operation touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapName {
    Services,
    Slots,
    Backends,
}

impl MapName {
    /// The map's name in the ELF object and its pin file name.
    pub fn as_str(self) -> &'static str {
        match self {
            MapName::Services => "SM_SERVICES",
            MapName::Slots => "SM_SLOTS",
            MapName::Backends => "SM_BACKENDS",
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

/// Everything the three routing maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub slots: Vec<(SlotKey, u32)>,
    pub backends: Vec<(BackendKey, BackendInfo)>,
}

/// The routing maps. Deleting an absent key is not an error.
pub trait MapStore {
    fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), StoreError>;
    fn del_service(&mut self, k: &ServiceKey) -> Result<(), StoreError>;
    fn put_slot(&mut self, k: &SlotKey, backend_index: u32) -> Result<(), StoreError>;
    fn del_slot(&mut self, k: &SlotKey) -> Result<(), StoreError>;
    fn put_backend(&mut self, k: &BackendKey, v: &BackendInfo) -> Result<(), StoreError>;
    fn del_backend(&mut self, k: &BackendKey) -> Result<(), StoreError>;
    fn snapshot(&self) -> Result<Snapshot, StoreError>;
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
    pub log: Vec<Op>,
    /// Fail the write with this 0-based index (counted over all writes).
    pub fail_at: Option<usize>,
    pub after_write: Option<AfterWrite>,
}

#[cfg(any(test, feature = "testing"))]
impl MemStore {
    fn record(&mut self, op: Op, map: MapName) -> Result<(), StoreError> {
        if self.fail_at == Some(self.log.len()) {
            self.fail_at = None;
            return Err(StoreError {
                map,
                op: "injected failure",
                source: "injected".into(),
            });
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
        let svc = self.services.get(key)?;
        let mut out = Vec::new();
        for slot in 0..svc.slot_count {
            let sk = SlotKey {
                service_id: svc.id,
                generation: svc.generation,
                pad: 0,
                slot: slot as u16,
            };
            let Some(&index) = self.slots.get(&sk) else {
                return Some(Err(sk));
            };
            let Some(b) = self.backends.get(&BackendKey {
                service_id: svc.id,
                index,
            }) else {
                return Some(Err(sk));
            };
            out.push((b.addr, b.port));
        }
        Some(Ok(out))
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
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            slots: self.slots.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
        })
    }
}
