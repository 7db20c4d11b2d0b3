//! The store of accepted xDS resources, by type and name: listeners, routes and
//! clusters each as its protobuf encoding, decoded only when a change needs it;
//! a ClusterLoadAssignment as a digest of its encoding and the backends it reads
//! as, which the clusters that use it share. Each keeps the version a delta
//! control plane gave it.

use std::{collections::BTreeMap, sync::Arc};

use foldhash::HashMap;

use sockmesh_proto::pb::envoy::config::{
    cluster::v3::Cluster, listener::v3::Listener, route::v3::RouteConfiguration,
};

use super::decode::Kind;
use crate::model::Backend;

/// The xDS resources currently accepted, by name.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    // Hash maps: every update looks its resources up by name; what lists them
    // (versions held, removals) does not depend on their order.
    pub listeners: HashMap<String, Encoded<Listener>>,
    pub routes: HashMap<String, Encoded<RouteConfiguration>>,
    pub clusters: HashMap<String, Encoded<Cluster>>,
    /// ClusterLoadAssignments by `cluster_name` (the EDS service name).
    pub endpoints: HashMap<String, Assignment>,
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
    /// The version a delta control plane sent it with (`None`: state of the world).
    version: Option<Box<str>>,
    kind: std::marker::PhantomData<fn() -> T>,
}

impl<T: prost::Message + Default> Encoded<T> {
    pub fn new(message: &T) -> Self {
        Self::from_bytes(message.encode_to_vec().into_boxed_slice())
    }

    /// Wraps bytes that [`Encoded::new`] produced, or that were received and
    /// decode as `T`.
    pub fn from_bytes(bytes: Box<[u8]>) -> Self {
        Self {
            bytes,
            version: None,
            kind: std::marker::PhantomData,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
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

/// An accepted ClusterLoadAssignment: what its endpoints read as, shared with
/// the clusters that use it, and a digest of its encoding, which tells a
/// resource sent again unchanged. The assignment is never decoded again: its
/// backends are everything the translation reads of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// XXH3-128 of the encoding received.
    digest: u128,
    pub backends: Arc<[Backend]>,
    /// Its localities' names, by the index the backends' placement gives
    /// (`clusters::locality_names`): what `/config_dump` labels their places
    /// with.
    pub localities: Box<[Box<str>]>,
    version: Option<Box<str>>,
}

impl Assignment {
    /// An assignment whose encoding was `bytes`, read as `backends` in
    /// `localities`.
    pub fn new(bytes: &[u8], backends: Arc<[Backend]>, localities: Box<[Box<str>]>) -> Self {
        Self {
            digest: digest(bytes),
            backends,
            localities,
            version: None,
        }
    }
}

/// The digest an [`Assignment`] keeps of its encoding.
pub fn digest(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

/// One resource of an update as the store takes it.
pub enum Incoming<'a> {
    /// A listener, route configuration or cluster: its encoding.
    Encoded(&'a [u8]),
    /// A ClusterLoadAssignment: the digest of its encoding, its backends and
    /// its localities' names.
    Assignment {
        digest: u128,
        backends: Arc<[Backend]>,
        localities: Box<[Box<str>]>,
    },
}

/// What a stored resource keeps besides its content.
trait Stored {
    fn version(&self) -> Option<&str>;
    fn set_version(&mut self, version: Option<&str>);
}

impl<T> Stored for Encoded<T> {
    fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }
    fn set_version(&mut self, version: Option<&str>) {
        self.version = version.map(Box::from);
    }
}

impl Stored for Assignment {
    fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }
    fn set_version(&mut self, version: Option<&str>) {
        self.version = version.map(Box::from);
    }
}

fn versions_of<V: Stored>(map: &HashMap<String, V>) -> BTreeMap<String, String> {
    map.iter()
        .filter_map(|(n, v)| Some((n.clone(), v.version()?.to_owned())))
        .collect()
}

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

    /// The versions a delta control plane sent the resources of `kind` with
    /// (those sent by state of the world have none), by name.
    pub fn versions(&self, kind: Kind) -> BTreeMap<String, String> {
        match kind {
            Kind::Cluster => versions_of(&self.clusters),
            Kind::Endpoint => versions_of(&self.endpoints),
            Kind::Listener => versions_of(&self.listeners),
            Kind::Route => versions_of(&self.routes),
        }
    }

    /// Stores `incoming` as `name` of `kind`, with `version` (delta). Whether it
    /// changed: `false` if the same resource was stored already (only its
    /// version is recorded then).
    pub fn put(
        &mut self,
        kind: Kind,
        name: &str,
        incoming: Incoming<'_>,
        version: Option<&str>,
    ) -> bool {
        fn put_in<V: Stored>(
            map: &mut HashMap<String, V>,
            name: &str,
            same: impl FnOnce(&V) -> bool,
            new: impl FnOnce() -> V,
            version: Option<&str>,
        ) -> bool {
            if let Some(old) = map.get_mut(name)
                && same(old)
            {
                old.set_version(version);
                return false;
            }
            let mut v = new();
            v.set_version(version);
            map.insert(name.to_owned(), v);
            true
        }
        fn encoded<T>(
            map: &mut HashMap<String, Encoded<T>>,
            name: &str,
            bytes: &[u8],
            version: Option<&str>,
        ) -> bool {
            put_in(
                map,
                name,
                |old| *old.bytes == *bytes,
                || Encoded {
                    bytes: bytes.into(),
                    version: None,
                    kind: std::marker::PhantomData,
                },
                version,
            )
        }
        match (kind, incoming) {
            (Kind::Cluster, Incoming::Encoded(b)) => encoded(&mut self.clusters, name, b, version),
            (Kind::Listener, Incoming::Encoded(b)) => {
                encoded(&mut self.listeners, name, b, version)
            }
            (Kind::Route, Incoming::Encoded(b)) => encoded(&mut self.routes, name, b, version),
            (
                Kind::Endpoint,
                Incoming::Assignment {
                    digest,
                    backends,
                    localities,
                },
            ) => put_in(
                &mut self.endpoints,
                name,
                |old| old.digest == digest,
                || Assignment {
                    digest,
                    backends,
                    localities,
                    version: None,
                },
                version,
            ),
            // A checked assignment always comes read (see `accept::Checked`); any
            // other pairing is a resource of another kind than it says.
            (kind, _) => {
                tracing::error!(
                    ?kind,
                    name,
                    "a resource reached the store in the form of another kind"
                );
                false
            }
        }
    }

    /// Removes `name` of `kind`; whether it was held.
    pub fn remove(&mut self, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Cluster => self.clusters.remove(name).is_some(),
            Kind::Endpoint => self.endpoints.remove(name).is_some(),
            Kind::Listener => self.listeners.remove(name).is_some(),
            Kind::Route => self.routes.remove(name).is_some(),
        }
    }
}
