//! The store of accepted xDS resources, by type and name: listeners, routes and
//! clusters each as its protobuf encoding, decoded only when a change needs it;
//! a ClusterLoadAssignment as a digest of its encoding and the backends it reads
//! as, which the clusters that use it share. Each keeps the version a delta
//! control plane gave it.

use std::{collections::BTreeMap, sync::Arc};

use foldhash::{HashMap, HashSet};

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
    pub listeners: Store<Listener>,
    pub routes: Store<RouteConfiguration>,
    pub clusters: Store<Cluster>,
    /// ClusterLoadAssignments by `cluster_name` (the EDS service name).
    pub endpoints: HashMap<String, Assignment>,
    /// The last good DNS answers of each STRICT_DNS/LOGICAL_DNS cluster, by
    /// cluster name (the agent resolves them; see `xds::dns`).
    pub dns: BTreeMap<String, super::clusters::DnsAnswers>,
}

/// Resources of one type, by name. Each is one allocation holding its name, the
/// version a delta control plane sent it with, and its encoding: at 100,000
/// listeners and as many clusters, a map of names to encodings with a version
/// apart took 40 bytes more per resource in its table and two allocations more
/// beside it.
pub struct Store<T> {
    entries: HashSet<Encoded<T>>,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self {
            entries: HashSet::default(),
        }
    }
}

impl<T> Clone for Store<T> {
    fn clone(&self) -> Self {
        Self {
            entries: self.entries.clone(),
        }
    }
}

impl<T> std::fmt::Debug for Store<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<T> Store<T> {
    pub fn get(&self, name: &str) -> Option<&Encoded<T>> {
        self.entries.get(name.as_bytes())
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.entries.contains(name.as_bytes())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The resources and their names, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Encoded<T>)> {
        self.entries.iter().map(|e| (e.name(), e))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(Encoded::name)
    }

    fn remove(&mut self, name: &str) -> bool {
        self.entries.remove(name.as_bytes())
    }

    /// Stores `bytes` as `name` with `version`; whether the encoding changed (a
    /// resource sent again unchanged only has its version recorded).
    fn put(&mut self, name: &str, bytes: &[u8], version: Option<&str>) -> bool {
        let changed = self
            .entries
            .get(name.as_bytes())
            .is_none_or(|old| old.bytes() != bytes);
        let unchanged_version = self
            .entries
            .get(name.as_bytes())
            .is_some_and(|old| old.version() == version);
        if changed || !unchanged_version {
            self.entries.replace(Encoded::with(name, version, bytes));
        }
        changed
    }
}

/// One stored resource: `[name length: u32][version: u32, 0 for none, else its
/// length + 1][name][version][encoding]`, all in one allocation.
pub struct Encoded<T> {
    raw: Box<[u8]>,
    kind: std::marker::PhantomData<fn() -> T>,
}

/// Bytes of [`Encoded`]'s header.
const HEADER: usize = 8;

impl<T> Encoded<T> {
    fn with(name: &str, version: Option<&str>, bytes: &[u8]) -> Self {
        let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let version_field = version.map_or(0, |v| len(v.len()).saturating_add(1));
        let mut raw =
            Vec::with_capacity(HEADER + name.len() + version.map_or(0, str::len) + bytes.len());
        raw.extend_from_slice(&len(name.len()).to_le_bytes());
        raw.extend_from_slice(&version_field.to_le_bytes());
        raw.extend_from_slice(name.as_bytes());
        raw.extend_from_slice(version.unwrap_or_default().as_bytes());
        raw.extend_from_slice(bytes);
        Self {
            raw: raw.into_boxed_slice(),
            kind: std::marker::PhantomData,
        }
    }

    fn field(&self, at: usize) -> usize {
        self.raw
            .get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, |b| u32::from_le_bytes(b) as usize)
    }

    /// Where the name, the version and the encoding end.
    fn ends(&self) -> (usize, usize) {
        let name_end = HEADER + self.field(0);
        (name_end, name_end + self.field(4).saturating_sub(1))
    }

    fn name_bytes(&self) -> &[u8] {
        self.raw.get(HEADER..self.ends().0).unwrap_or_default()
    }

    /// Its name: the bytes of a `&str`, so they read as one.
    pub fn name(&self) -> &str {
        std::str::from_utf8(self.name_bytes()).unwrap_or_default()
    }

    /// The version a delta control plane sent it with (`None`: state of the world).
    pub fn version(&self) -> Option<&str> {
        let (name_end, version_end) = self.ends();
        (self.field(4) > 0)
            .then(|| std::str::from_utf8(self.raw.get(name_end..version_end)?).ok())
            .flatten()
    }

    pub fn bytes(&self) -> &[u8] {
        self.raw.get(self.ends().1..).unwrap_or_default()
    }
}

impl<T: prost::Message + Default> Encoded<T> {
    /// The message. The bytes are prost's own encoding of a message, so they
    /// decode; were that ever to fail, the failure is logged and the message reads
    /// as empty rather than taking the agent down.
    pub fn decode(&self) -> T {
        T::decode(self.bytes()).unwrap_or_else(|e| {
            tracing::error!(error = %e, "re-decoding a stored resource failed");
            T::default()
        })
    }
}

impl<T> Clone for Encoded<T> {
    fn clone(&self) -> Self {
        Self {
            raw: self.raw.clone(),
            kind: std::marker::PhantomData,
        }
    }
}

// A store looks its resources up by name: an entry hashes and compares as its
// name's bytes.
impl<T> std::hash::Hash for Encoded<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name_bytes().hash(state);
    }
}

impl<T> PartialEq for Encoded<T> {
    fn eq(&self, other: &Self) -> bool {
        self.name_bytes() == other.name_bytes()
    }
}

impl<T> Eq for Encoded<T> {}

impl<T> std::borrow::Borrow<[u8]> for Encoded<T> {
    fn borrow(&self) -> &[u8] {
        self.name_bytes()
    }
}

impl<T> std::fmt::Debug for Encoded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoded({} bytes)", self.bytes().len())
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

impl Stored for Assignment {
    fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }
    fn set_version(&mut self, version: Option<&str>) {
        self.version = version.map(Box::from);
    }
}

fn versions_of<'a, V: 'a>(
    entries: impl Iterator<Item = (&'a str, &'a V)>,
    version: impl Fn(&V) -> Option<&str>,
) -> BTreeMap<String, String> {
    entries
        .filter_map(|(n, v)| Some((n.to_owned(), version(v)?.to_owned())))
        .collect()
}

impl Resources {
    /// The names held of `kind`.
    pub fn names(&self, kind: Kind) -> Box<dyn Iterator<Item = &str> + '_> {
        match kind {
            Kind::Cluster => Box::new(self.clusters.keys()),
            Kind::Endpoint => Box::new(self.endpoints.keys().map(String::as_str)),
            Kind::Listener => Box::new(self.listeners.keys()),
            Kind::Route => Box::new(self.routes.keys()),
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
            Kind::Cluster => versions_of(self.clusters.iter(), Encoded::version),
            Kind::Endpoint => versions_of(
                self.endpoints.iter().map(|(n, a)| (n.as_str(), a)),
                Stored::version,
            ),
            Kind::Listener => versions_of(self.listeners.iter(), Encoded::version),
            Kind::Route => versions_of(self.routes.iter(), Encoded::version),
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
        match (kind, incoming) {
            (Kind::Cluster, Incoming::Encoded(b)) => self.clusters.put(name, b, version),
            (Kind::Listener, Incoming::Encoded(b)) => self.listeners.put(name, b, version),
            (Kind::Route, Incoming::Encoded(b)) => self.routes.put(name, b, version),
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
            Kind::Cluster => self.clusters.remove(name),
            Kind::Endpoint => self.endpoints.remove(name).is_some(),
            Kind::Listener => self.listeners.remove(name),
            Kind::Route => self.routes.remove(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each resource reads back its own name, version and encoding, whatever
    /// their lengths (empty ones included, and an empty version apart from none);
    /// a resource sent again unchanged is not a change, but its new version is
    /// kept; the others are untouched.
    #[test]
    fn a_store_keeps_each_name_version_and_encoding() {
        let mut store: Store<Listener> = Store::default();
        let cases: Vec<(String, Option<String>, Vec<u8>)> = (0..300usize)
            .map(|i| {
                let name = "n".repeat(i % 7) + &i.to_string();
                let version = match i % 3 {
                    0 => None,
                    1 => Some(String::new()),
                    _ => Some("v".repeat(i)),
                };
                (
                    name,
                    version,
                    vec![u8::try_from(i % 256).unwrap_or(0); i % 11],
                )
            })
            .collect();
        for (name, version, bytes) in &cases {
            assert!(store.put(name, bytes, version.as_deref()), "{name} is new");
        }
        assert_eq!(store.len(), cases.len());
        for (name, version, bytes) in &cases {
            let e = store.get(name).expect("stored");
            assert_eq!(
                (e.name(), e.version(), e.bytes()),
                (name.as_str(), version.as_deref(), bytes.as_slice())
            );
        }
        let (name, _, bytes) = &cases[5];
        assert!(!store.put(name, bytes, Some("again")), "unchanged");
        assert_eq!(store.get(name).and_then(Encoded::version), Some("again"));
        assert!(store.put(name, b"other", None), "changed");
        assert_eq!(store.get(name).map(Encoded::bytes), Some(&b"other"[..]));
        assert!(store.remove(name) && !store.contains_key(name));
        assert!(!store.remove(name));
        for (n, version, bytes) in cases.iter().filter(|c| c.0 != *name) {
            let e = store.get(n).expect("still stored");
            assert_eq!(
                (e.version(), e.bytes()),
                (version.as_deref(), bytes.as_slice())
            );
        }
        let mut names: Vec<&str> = store.keys().collect();
        names.sort_unstable();
        let mut want: Vec<&str> = cases
            .iter()
            .map(|c| c.0.as_str())
            .filter(|n| n != name)
            .collect();
        want.sort_unstable();
        assert_eq!(names, want);
    }
}
