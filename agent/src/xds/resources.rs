//! The store of accepted xDS resources, by type and name: listeners, routes and
//! clusters each as its protobuf encoding, decoded only when a change needs it;
//! a ClusterLoadAssignment as a digest of its encoding and the backends it reads
//! as, which the clusters that use it share. Each keeps the version a delta
//! control plane gave it.

use std::{collections::BTreeMap, sync::Arc};

use foldhash::HashSet;

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
    pub listeners: Store<Encoding<Listener>>,
    pub routes: Store<Encoding<RouteConfiguration>>,
    pub clusters: Store<Encoding<Cluster>>,
    /// ClusterLoadAssignments by `cluster_name` (the EDS service name).
    pub endpoints: Store<Assigned>,
    /// The last good DNS answers of each STRICT_DNS/LOGICAL_DNS cluster, by
    /// cluster name (the agent resolves them; see `xds::dns`).
    pub dns: BTreeMap<String, super::clusters::DnsAnswers>,
}

/// Resources of one type, by name. Each entry is one allocation of its name, the
/// version a delta control plane sent it with and (listeners, routes, clusters)
/// its encoding, beside what the type keeps read ([`Assignment`]): held apart,
/// they would take 40 bytes more per resource in each table and two
/// allocations more beside it (8 MiB a type at 100,000 services).
pub struct Store<V> {
    entries: HashSet<Entry<V>>,
}

/// One stored resource: `raw` is `[name length: u32][version: u32, 0 for none,
/// else its length + 1][name][version][encoding]`; `value` what is kept read.
pub struct Entry<V> {
    raw: Box<[u8]>,
    value: V,
}

/// A listener, route configuration or cluster: its encoding, decoded only when a
/// change needs it.
pub type Encoded<T> = Entry<Encoding<T>>;

/// What an [`Encoded`] keeps besides its bytes: nothing but the type.
pub struct Encoding<T>(std::marker::PhantomData<fn() -> T>);

impl<T> Clone for Encoding<T> {
    fn clone(&self) -> Self {
        Self(std::marker::PhantomData)
    }
}

/// An accepted ClusterLoadAssignment: what its endpoints read as, shared with
/// the clusters that use it, and a digest of its encoding, which tells a
/// resource sent again unchanged. The assignment is never decoded again: its
/// backends are everything the translation reads of it.
pub type Assignment = Entry<Assigned>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assigned {
    /// XXH3-128 of the encoding received (as two words: a `u128`'s alignment
    /// would pad every entry of the table).
    digest: [u64; 2],
    pub backends: Arc<[Backend]>,
    /// Its localities' names, by the index the backends' placement gives
    /// (`clusters::locality_names`): what `/config_dump` labels their places
    /// with.
    pub localities: Box<[Box<str>]>,
}

// Kept per resource: a larger entry is a larger table at every size.
const _: () = assert!(std::mem::size_of::<Assignment>() <= 64);

/// Bytes of an [`Entry`]'s header.
const HEADER: usize = 8;

impl<V> Entry<V> {
    fn with(name: &str, version: Option<&str>, bytes: &[u8], value: V) -> Self {
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
            value,
        }
    }

    fn field(&self, at: usize) -> usize {
        self.raw
            .get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, |b| u32::from_le_bytes(b) as usize)
    }

    /// Where the name and the version end.
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

    /// The encoding it was stored with (empty for an [`Assignment`]).
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

impl<V> std::ops::Deref for Entry<V> {
    type Target = V;
    fn deref(&self) -> &V {
        &self.value
    }
}

impl<V: Clone> Clone for Entry<V> {
    fn clone(&self) -> Self {
        Self {
            raw: self.raw.clone(),
            value: self.value.clone(),
        }
    }
}

// A store looks its resources up by name: an entry hashes and compares as its
// name's bytes.
impl<V> std::hash::Hash for Entry<V> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name_bytes().hash(state);
    }
}

impl<V> PartialEq for Entry<V> {
    fn eq(&self, other: &Self) -> bool {
        self.name_bytes() == other.name_bytes()
    }
}

impl<V> Eq for Entry<V> {}

impl<V> std::borrow::Borrow<[u8]> for Entry<V> {
    fn borrow(&self) -> &[u8] {
        self.name_bytes()
    }
}

impl<V> std::fmt::Debug for Entry<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Entry({:?}, {} bytes)",
            self.version(),
            self.bytes().len()
        )
    }
}

impl<V> Default for Store<V> {
    fn default() -> Self {
        Self {
            entries: HashSet::default(),
        }
    }
}

impl<V: Clone> Clone for Store<V> {
    fn clone(&self) -> Self {
        Self {
            entries: self.entries.clone(),
        }
    }
}

impl<V> std::fmt::Debug for Store<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V> Store<V> {
    pub fn get(&self, name: &str) -> Option<&Entry<V>> {
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
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry<V>)> {
        self.entries.iter().map(|e| (e.name(), e))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(Entry::name)
    }

    fn remove(&mut self, name: &str) -> bool {
        self.entries.remove(name.as_bytes())
    }

    /// The versions held, by name.
    fn versions(&self) -> BTreeMap<String, String> {
        self.iter()
            .filter_map(|(n, e)| Some((n.to_owned(), e.version()?.to_owned())))
            .collect()
    }

    /// Stores `name` with `version`, its encoding `bytes` and `value`, unless the
    /// entry held is `same`: then only its version is recorded. Whether it
    /// changed.
    fn put(
        &mut self,
        name: &str,
        version: Option<&str>,
        bytes: &[u8],
        same: impl FnOnce(&Entry<V>) -> bool,
        value: impl FnOnce() -> V,
    ) -> bool {
        // A resource sent again unchanged (every one of a state-of-the-world
        // push that did not change) is left where it is.
        let held = self.entries.get(name.as_bytes());
        let held_same = held.is_some_and(same);
        if held_same && held.is_some_and(|old| old.version() == version) {
            return false;
        }
        if held_same {
            // The same resource under another version: its value moves over.
            if let Some(old) = self.entries.take(name.as_bytes()) {
                self.entries
                    .insert(Entry::with(name, version, bytes, old.value));
            }
            return false;
        }
        // New or changed: one lookup replaces what was held.
        self.entries
            .replace(Entry::with(name, version, bytes, value()));
        true
    }
}

impl<T> Store<Encoding<T>> {
    fn put_encoded(&mut self, name: &str, bytes: &[u8], version: Option<&str>) -> bool {
        self.put(
            name,
            version,
            bytes,
            |old| old.bytes() == bytes,
            || Encoding(std::marker::PhantomData),
        )
    }
}

/// The digest an [`Assignment`] keeps of its encoding.
pub fn digest(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

fn words(digest: u128) -> [u64; 2] {
    [(digest >> 64) as u64, digest as u64]
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

impl Resources {
    /// The names held of `kind`.
    pub fn names(&self, kind: Kind) -> Box<dyn Iterator<Item = &str> + '_> {
        match kind {
            Kind::Cluster => Box::new(self.clusters.keys()),
            Kind::Endpoint => Box::new(self.endpoints.keys()),
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
            Kind::Cluster => self.clusters.versions(),
            Kind::Endpoint => self.endpoints.versions(),
            Kind::Listener => self.listeners.versions(),
            Kind::Route => self.routes.versions(),
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
        match (kind, incoming) {
            (Kind::Cluster, Incoming::Encoded(b)) => self.clusters.put_encoded(name, b, version),
            (Kind::Listener, Incoming::Encoded(b)) => self.listeners.put_encoded(name, b, version),
            (Kind::Route, Incoming::Encoded(b)) => self.routes.put_encoded(name, b, version),
            (
                Kind::Endpoint,
                Incoming::Assignment {
                    digest,
                    backends,
                    localities,
                },
            ) => self.endpoints.put(
                name,
                version,
                &[],
                |old| old.digest == words(digest),
                || Assigned {
                    digest: words(digest),
                    backends,
                    localities,
                },
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
            Kind::Endpoint => self.endpoints.remove(name),
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
        let mut store: Store<Encoding<Listener>> = Store::default();
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
            assert!(
                store.put_encoded(name, bytes, version.as_deref()),
                "{name} is new"
            );
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
        assert!(!store.put_encoded(name, bytes, Some("again")), "unchanged");
        assert_eq!(store.get(name).and_then(Encoded::version), Some("again"));
        assert!(store.put_encoded(name, b"other", None), "changed");
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

    /// An assignment sent again with the same digest keeps what it read as (the
    /// clusters share its backends) and takes the new version; another digest
    /// replaces it.
    #[test]
    fn an_assignment_sent_again_keeps_its_backends() {
        let mut res = Resources::default();
        let backends: Arc<[Backend]> =
            vec![Backend::new(std::net::IpAddr::from([10, 0, 0, 1]), 80)].into();
        let incoming = |digest, backends: &Arc<[Backend]>| Incoming::Assignment {
            digest,
            backends: backends.clone(),
            localities: Box::default(),
        };
        assert!(res.put(Kind::Endpoint, "e", incoming(1, &backends), Some("1")));
        let again: Arc<[Backend]> = backends.to_vec().into();
        assert!(!res.put(Kind::Endpoint, "e", incoming(1, &again), Some("2")));
        let held = res.endpoints.get("e").expect("held");
        assert!(Arc::ptr_eq(&held.backends, &backends));
        assert_eq!(held.version(), Some("2"));
        assert!(res.put(Kind::Endpoint, "e", incoming(2, &again), None));
        let held = res.endpoints.get("e").expect("held");
        assert!(Arc::ptr_eq(&held.backends, &again));
        assert_eq!(res.versions(Kind::Endpoint), BTreeMap::new());
    }
}
