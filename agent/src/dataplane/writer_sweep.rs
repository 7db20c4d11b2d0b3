//! Health entries the kernel made for endpoints their service no longer has.
//!
//! sock_ops creates an endpoint's `SM_EP_HEALTH` entry at its first failed
//! connect. A connect placed before the endpoint left its service can fail after
//! the writer deleted the endpoint's entry (a SYN to a pod that is gone waits
//! seconds for its answer): the entry made then belongs to nothing the writer
//! knows, and it would stay for good. The datapath task sweeps them.

use std::collections::HashSet;

use sockmesh_common::{EndpointKey, service_flags};

use super::{MapWriter, WriteError, endpoint_key};
use crate::dataplane::{keys::service_addr, store::MapStore};

impl<S: MapStore> MapWriter<S> {
    /// Deletes the `SM_EP_HEALTH` entries of endpoints that are not a backend of
    /// an outlier-detecting service now; returns how many. The mirror is what
    /// the kernel publishes (the sweep runs between writes, on the writer's
    /// thread), so an endpoint being added is never taken for one gone.
    pub fn sweep_endpoint_health(&mut self) -> Result<usize, WriteError> {
        let live: HashSet<EndpointKey> = self
            .mirror
            .services
            .iter()
            .filter(|(_, inst)| inst.flags & service_flags::OUTLIER != 0)
            .flat_map(|(key, inst)| inst.backends.values().map(|b| endpoint_key(key, &b)))
            .collect();
        let stale: Vec<EndpointKey> = self
            .store
            .endpoint_health_keys()
            .map_err(WriteError::Snapshot)?
            .into_iter()
            .filter(|k| !live.contains(k))
            .collect();
        for k in &stale {
            self.store
                .del_endpoint_health(k)
                .map_err(|source| match service_addr(&k.service) {
                    Some(service) => WriteError::Store { service, source },
                    None => WriteError::Snapshot(source),
                })?;
        }
        Ok(stale.len())
    }
}

#[cfg(test)]
mod tests {
    use sockmesh_common::EndpointKey;

    use crate::{
        dataplane::{
            MapWriter, service_key,
            store::{MemStore, Op},
        },
        model::{Backend, Health, LbPolicy, Outlier, Protocol, RoutingTable, Service, ServiceAddr},
    };

    fn svc(last: u8) -> ServiceAddr {
        ServiceAddr {
            vip: std::net::IpAddr::from([10, 96, 0, last]),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn health(key: &ServiceAddr, last: u8) -> EndpointKey {
        EndpointKey {
            service: service_key(key),
            addr: crate::dataplane::keys::ip_to_words([10, 1, 0, last].into()),
            port: 8080u16.to_be(),
            pad: 0,
        }
    }

    #[test]
    fn only_entries_of_endpoints_no_outlier_detecting_service_has_are_swept() {
        let outlier = Health {
            outlier: Some(Outlier {
                consecutive: 5,
                enforcing: 100,
                base_ejection_ms: 30_000,
                max_ejection_ms: 300_000,
                interval_ms: 10_000,
                max_ejection_percent: 100,
                panic_percent: 0,
            }),
            max_connections: None,
        };
        let backends = |n: u8| -> Vec<Backend> {
            (1..=n)
                .map(|i| Backend::new([10, 1, 0, i].into(), 8080))
                .collect()
        };
        let mut t = RoutingTable::default();
        t.insert(
            svc(1),
            Service::new(backends(2), LbPolicy::Random).with_health(outlier),
        );
        // Same endpoints, no outlier detection: the kernel makes no entry.
        t.insert(svc(2), backends(2));
        let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
        w.apply(&t).expect("apply");
        // The kernel's entries: two of service 1's backends (kept), one of an
        // endpoint service 1 dropped, one under service 2, one of a service gone.
        let kept = [health(&svc(1), 1), health(&svc(1), 2)];
        let stale = [health(&svc(1), 3), health(&svc(2), 1), health(&svc(9), 1)];
        w.store_mut()
            .endpoint_health
            .extend(kept.iter().chain(&stale).copied());
        assert_eq!(w.sweep_endpoint_health().expect("sweep"), 3);
        assert_eq!(
            w.store()
                .endpoint_health
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            kept
        );
        assert!(
            stale
                .iter()
                .all(|k| w.store().log.contains(&Op::DelEndpointHealth(*k)))
        );
        assert_eq!(w.sweep_endpoint_health().expect("again"), 0);
    }
}
