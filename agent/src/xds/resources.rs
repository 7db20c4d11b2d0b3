//! The store of accepted xDS resources: by type and name, each kept as its protobuf
//! encoding and decoded only when a change needs it.

use std::collections::BTreeMap;

use sockmesh_proto::pb::envoy::config::{
    cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
    route::v3::RouteConfiguration,
};

use super::decode::Kind;

/// The xDS resources currently accepted, by name, each kept in its protobuf
/// encoding (see [`Encoded`]).
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub listeners: BTreeMap<String, Encoded<Listener>>,
    pub routes: BTreeMap<String, Encoded<RouteConfiguration>>,
    pub clusters: BTreeMap<String, Encoded<Cluster>>,
    /// ClusterLoadAssignments by `cluster_name` (the EDS service name).
    pub endpoints: BTreeMap<String, Encoded<ClusterLoadAssignment>>,
    /// The last good DNS answers of each STRICT_DNS/LOGICAL_DNS cluster, by
    /// cluster name (the agent resolves them; see `xds::dns`).
    pub dns: BTreeMap<String, super::clusters::DnsAnswers>,
}

/// One accepted resource, held as its protobuf encoding and decoded when a change
/// needs it. The decoded prost structs are about 50 times larger than their
/// encoding (`Cluster` alone is 3.4 KB before any field is set; 10,000 services
/// took 226 MiB decoded, 4 MiB encoded), and only the resources a change touches
/// are ever read again.
#[derive(Clone, PartialEq, Eq)]
pub struct Encoded<T> {
    bytes: Box<[u8]>,
    kind: std::marker::PhantomData<fn() -> T>,
}

impl<T: prost::Message + Default> Encoded<T> {
    pub fn new(message: &T) -> Self {
        Self::from_bytes(message.encode_to_vec().into_boxed_slice())
    }

    /// Wraps bytes that [`Encoded::new`] produced (an undo log handing them back).
    pub fn from_bytes(bytes: Box<[u8]>) -> Self {
        Self {
            bytes,
            kind: std::marker::PhantomData,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Box<[u8]> {
        self.bytes
    }

    /// The message. The bytes are prost's own encoding of a message, so they
    /// decode; were that ever to fail, the failure is logged and the message reads
    /// as empty rather than taking the agent down.
    pub fn decode(&self) -> T {
        T::decode(&*self.bytes).unwrap_or_else(|e| {
            tracing::error!(error = %e, "re-decoding a stored resource failed");
            T::default()
        })
    }
}

impl<T> std::fmt::Debug for Encoded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoded({} bytes)", self.bytes.len())
    }
}

/// The encoding a resource had before an update changed it (`None`: it was
/// absent), to put back if the update is undone.
pub type Previous = Option<Box<[u8]>>;

impl Resources {
    /// The names held of `kind`.
    pub fn names(&self, kind: Kind) -> Box<dyn Iterator<Item = &str> + '_> {
        match kind {
            Kind::Cluster => Box::new(self.clusters.keys().map(String::as_str)),
            Kind::Endpoint => Box::new(self.endpoints.keys().map(String::as_str)),
            Kind::Listener => Box::new(self.listeners.keys().map(String::as_str)),
            Kind::Route => Box::new(self.routes.keys().map(String::as_str)),
        }
    }

    pub fn contains(&self, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Cluster => self.clusters.contains_key(name),
            Kind::Endpoint => self.endpoints.contains_key(name),
            Kind::Listener => self.listeners.contains_key(name),
            Kind::Route => self.routes.contains_key(name),
        }
    }

    /// Stores `bytes` as `name`. `None` if the same encoding was stored already
    /// (nothing changed), else `Some(previous)`.
    pub fn put(&mut self, kind: Kind, name: &str, bytes: &[u8]) -> Option<Previous> {
        fn put_in<T: prost::Message + Default>(
            map: &mut BTreeMap<String, Encoded<T>>,
            name: &str,
            bytes: &[u8],
        ) -> Option<Previous> {
            if map.get(name).is_some_and(|old| old.bytes() == bytes) {
                return None;
            }
            let new = Encoded::from_bytes(bytes.into());
            Some(map.insert(name.to_owned(), new).map(Encoded::into_bytes))
        }
        match kind {
            Kind::Cluster => put_in(&mut self.clusters, name, bytes),
            Kind::Endpoint => put_in(&mut self.endpoints, name, bytes),
            Kind::Listener => put_in(&mut self.listeners, name, bytes),
            Kind::Route => put_in(&mut self.routes, name, bytes),
        }
    }

    /// Puts back what [`Self::put`] or [`Self::remove`] replaced.
    pub fn restore(&mut self, kind: Kind, name: String, previous: Previous) {
        let Some(bytes) = previous else {
            self.remove(kind, &name);
            return;
        };
        match kind {
            Kind::Cluster => {
                self.clusters.insert(name, Encoded::from_bytes(bytes));
            }
            Kind::Endpoint => {
                self.endpoints.insert(name, Encoded::from_bytes(bytes));
            }
            Kind::Listener => {
                self.listeners.insert(name, Encoded::from_bytes(bytes));
            }
            Kind::Route => {
                self.routes.insert(name, Encoded::from_bytes(bytes));
            }
        }
    }

    pub fn remove(&mut self, kind: Kind, name: &str) -> Previous {
        match kind {
            Kind::Cluster => self.clusters.remove(name).map(Encoded::into_bytes),
            Kind::Endpoint => self.endpoints.remove(name).map(Encoded::into_bytes),
            Kind::Listener => self.listeners.remove(name).map(Encoded::into_bytes),
            Kind::Route => self.routes.remove(name).map(Encoded::into_bytes),
        }
    }
}
