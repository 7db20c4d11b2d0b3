//! Incremental translation: an update recomputes only what it touches.
//!
//! [`super::full::translate`] rebuilds the whole table from every resource;
//! at 10,000 services that is ~100 ms per update. Here each listener's services and
//! each cluster's backends are cached, with reverse indexes (route → listeners,
//! EDS name → clusters, cluster → services), so a ClusterLoadAssignment change
//! recomputes the services of the clusters that use it and nothing else. The result
//! is the same as the full translation (a unit test checks this after every step of
//! a long update sequence).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use foldhash::HashMap;

use super::{
    clusters::{
        ClusterBackends, ClusterSource, DnsTarget, ServiceBackends, cluster_backends,
        cluster_policy, cluster_source, service_backends,
    },
    translate::{Notes, Resources, ServiceSpec, listener_services},
    users::Users,
};
use crate::model::{Health, LbPolicy, RoutingTable, Service, ServiceAddr};

/// What one cluster contributes. A view is kept per cluster for the cluster's
/// lifetime, so what most clusters leave at its default is boxed apart: inline,
/// it would make a view 144 bytes, a table of 21 MiB at 100,000 clusters.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ClusterView {
    /// The EDS name it subscribes to, if any.
    eds: Option<Box<str>>,
    backends: ClusterBackends,
    policy: LbPolicy,
    /// `None`: every field of [`ClusterRest`] at its default.
    rest: Option<Box<ClusterRest>>,
}

/// The rest of a [`ClusterView`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ClusterRest {
    /// The names the agent resolves for it (STRICT_DNS, LOGICAL_DNS).
    dns: Option<DnsTarget>,
    health: Health,
    settings: crate::lb::levels::LbSettings,
    /// Why the kernel places its connections otherwise than it asks.
    fallback: Option<&'static str>,
    ignored: Option<String>,
}

impl ClusterView {
    fn new(
        eds: Option<&str>,
        backends: ClusterBackends,
        policy: LbPolicy,
        rest: ClusterRest,
    ) -> Self {
        Self {
            eds: eds.map(Box::from),
            backends,
            policy,
            rest: (rest != ClusterRest::default()).then(|| Box::new(rest)),
        }
    }

    fn rest(&self) -> &ClusterRest {
        static DEFAULT: std::sync::LazyLock<ClusterRest> =
            std::sync::LazyLock::new(ClusterRest::default);
        self.rest.as_deref().unwrap_or(&DEFAULT)
    }
}

// Kept per cluster: a larger view is a larger table at every size.
const _: () = assert!(std::mem::size_of::<ClusterView>() <= 56);

/// Names touched by an update, per type.
#[derive(Clone, Debug, Default)]
pub struct Dirty {
    pub listeners: BTreeSet<String>,
    pub routes: BTreeSet<String>,
    pub clusters: BTreeSet<String>,
    pub endpoints: BTreeSet<String>,
    /// Clusters whose DNS answers changed.
    pub dns: BTreeSet<String>,
}

pub use crate::model::Changes;

/// A listener's recomputed services, the routes it references, and what it
/// ignored or left alone.
type ListenerView = (Vec<ServiceSpec>, BTreeSet<String>, Notes);

/// Recomputed pieces, not yet committed.
#[derive(Default)]
pub struct Staged {
    specs: HashMap<String, ListenerView>,
    removed_listeners: BTreeSet<String>,
    clusters: HashMap<String, Option<ClusterView>>,
    pub changes: Changes,
    /// Services defined by the re-staged listeners, and by which.
    staged_owners: BTreeMap<ServiceAddr, BTreeSet<String>>,
    warming_now: BTreeSet<ServiceAddr>,
    not_warming: BTreeSet<ServiceAddr>,
    passthrough_now: BTreeSet<ServiceAddr>,
    not_passthrough: BTreeSet<ServiceAddr>,
    unhashable_now: BTreeMap<ServiceAddr, &'static str>,
    not_unhashable: BTreeSet<ServiceAddr>,
}

/// The caches and indexes.
#[derive(Debug, Default)]
pub struct Incremental {
    // The maps looked up by name on every update are hash maps (a B-tree's
    // descent compares whole names at each level: the largest cost of a batch's
    // translation); what is listed in order is sorted when it is listed.
    specs: HashMap<String, Vec<ServiceSpec>>,
    /// The route configurations of the listeners that reference any.
    listener_routes: HashMap<String, BTreeSet<String>>,
    /// What each listener ignored or left alone (listeners with nothing to say
    /// are absent).
    listener_notes: BTreeMap<String, Notes>,
    route_users: HashMap<String, Users<String>>,
    clusters: HashMap<String, ClusterView>,
    eds_users: HashMap<String, Users<String>>,
    owners: HashMap<ServiceAddr, Users<String>>,
    cluster_users: HashMap<String, Users<ServiceAddr>>,
    warming: BTreeSet<ServiceAddr>,
    passthrough: BTreeSet<ServiceAddr>,
    /// Consistent-hash services whose hash policy names what connect() cannot see
    /// (logged when that starts), and what.
    unhashable: BTreeMap<ServiceAddr, &'static str>,
}

impl Incremental {
    /// How many entries each cache and index holds (`/config_dump`'s `state`).
    pub fn sizes(&self) -> [(&'static str, usize); 11] {
        [
            ("listener_specs", self.specs.len()),
            ("listener_routes", self.listener_routes.len()),
            ("listener_notes", self.listener_notes.len()),
            ("route_users", self.route_users.len()),
            ("cluster_views", self.clusters.len()),
            ("eds_users", self.eds_users.len()),
            ("service_owners", self.owners.len()),
            ("cluster_users", self.cluster_users.len()),
            ("warming", self.warming.len()),
            ("passthrough", self.passthrough.len()),
            ("unhashable", self.unhashable.len()),
        ]
    }

    /// Route names referenced by listeners (RDS subscription).
    pub fn route_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .route_users
            .iter()
            .filter(|(_, u)| !u.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        names.sort_unstable();
        names
    }

    /// EDS names referenced by clusters (EDS subscription).
    pub fn eds_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .eds_users
            .iter()
            .filter(|(_, u)| !u.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        names.sort_unstable();
        names
    }

    pub fn warming(&self) -> impl Iterator<Item = &ServiceAddr> {
        self.warming.iter()
    }

    /// Services sent to their original destination (no entry in the table).
    pub fn passthrough(&self) -> impl Iterator<Item = &ServiceAddr> {
        self.passthrough.iter()
    }

    /// Consistent-hash services whose hash policy names what connect() cannot see,
    /// and what (they hash the client instead).
    pub fn unhashable(&self) -> impl Iterator<Item = (&ServiceAddr, &'static str)> {
        self.unhashable.iter().map(|(s, what)| (s, *what))
    }

    /// Whether `cluster` is a DNS cluster (STRICT_DNS, LOGICAL_DNS).
    pub fn is_dns_cluster(&self, cluster: &str) -> bool {
        self.clusters
            .get(cluster)
            .is_some_and(|v| v.rest().dns.is_some())
    }

    /// The DNS clusters and what to resolve for each.
    pub fn dns_targets(&self) -> BTreeMap<String, DnsTarget> {
        self.clusters
            .iter()
            .filter_map(|(name, v)| Some((name.clone(), v.rest().dns.clone()?)))
            .collect()
    }

    /// Route configurations listeners reference that have not arrived.
    pub fn pending_routes<'a>(&'a self, res: &'a Resources) -> impl Iterator<Item = &'a String> {
        self.route_users
            .iter()
            .filter(|(name, users)| !users.is_empty() && !res.routes.contains_key(name))
            .map(|(name, _)| name)
    }

    /// Unsupported features seen in the current resources.
    pub fn ignored(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .listener_notes
            .values()
            .flat_map(|n| n.ignored.iter().cloned())
            .collect();
        let mut clusters: Vec<String> = self
            .clusters
            .values()
            .filter_map(|c| c.rest().ignored.clone())
            .collect();
        clusters.sort_unstable();
        out.extend(clusters);
        out
    }

    /// The listeners whose traffic (some chain's, or all) sockmesh leaves alone,
    /// and why, one line per chain.
    pub fn left_alone(&self) -> impl Iterator<Item = (&String, &Vec<String>)> {
        self.listener_notes
            .iter()
            .filter(|(_, n)| !n.left_alone.is_empty())
            .map(|(l, n)| (l, &n.left_alone))
    }

    /// Where the load assignment of service `s` places each endpoint, when `s`
    /// takes its endpoints from one cluster with an assignment (EDS or inline):
    /// the owner's spec as [`Incremental::stage`] resolves it, read from `res`.
    pub fn places(
        &self,
        res: &Resources,
        s: &ServiceAddr,
    ) -> Option<BTreeMap<(std::net::IpAddr, u16), super::clusters::Place>> {
        let spec = self
            .owners
            .get(s)?
            .iter()
            .filter_map(|l| {
                let spec = self.specs.get(l)?.iter().find(|x| x.service == *s)?;
                Some((spec.precedence, l, spec))
            })
            .min_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
            .map(|(_, _, spec)| spec)?;
        let [(cluster, _)] = spec.clusters.as_slice() else {
            return None;
        };
        match self.clusters.get(cluster)?.eds.as_deref() {
            Some(eds) => {
                let a = res.endpoints.get(eds)?;
                Some(super::clusters::places(&a.backends, &a.localities))
            }
            None => Some(super::clusters::endpoint_places(
                &res.clusters.get(cluster)?.decode().load_assignment?,
            )),
        }
    }

    /// Recomputes what `dirty` touches against `res` (already updated). `table` is
    /// the current table; `seed` the one adopted at start.
    pub fn stage(
        &self,
        res: &Resources,
        dirty: &Dirty,
        table: &RoutingTable,
        seed: &RoutingTable,
    ) -> Staged {
        let mut st = Staged::default();
        let mut listeners = dirty.listeners.clone();
        for r in &dirty.routes {
            if let Some(users) = self.route_users.get(r) {
                listeners.extend(users.iter().cloned());
            }
        }
        let names: Vec<&String> = listeners.iter().collect();
        let views = in_parallel(&names, |&l| {
            res.listeners.get(l).map(|listener| {
                let mut routes = BTreeSet::new();
                let mut notes = Notes::default();
                let specs =
                    listener_services(&listener.decode(), &res.routes, &mut routes, &mut notes);
                (specs, routes, notes)
            })
        });
        for (l, view) in names.into_iter().zip(views) {
            match view {
                Some(view) => {
                    st.specs.insert(l.clone(), view);
                }
                None => {
                    st.removed_listeners.insert(l.clone());
                }
            }
        }
        let mut clusters = dirty.clusters.clone();
        clusters.extend(dirty.dns.iter().cloned());
        for e in &dirty.endpoints {
            if let Some(users) = self.eds_users.get(e) {
                clusters.extend(users.iter().cloned());
            }
        }
        let backends_of = |c: &str, source: &ClusterSource<'_>| cluster_backends(c, source, res);
        let names: Vec<&String> = clusters.iter().collect();
        let views = in_parallel(&names, |&c| {
            // A cluster reached only through its ClusterLoadAssignment keeps what
            // its own resource says (decoding the Cluster again took half of an
            // EDS batch's staging): only its backends are read anew.
            let eds_only = !dirty.clusters.contains(c) && !dirty.dns.contains(c);
            if eds_only
                && let Some(view) = self.clusters.get(c)
                && let Some(eds) = view.eds.as_deref()
                && view.rest().ignored.is_none()
                && res.clusters.contains_key(c)
            {
                let backends = backends_of(c, &ClusterSource::Eds(eds.to_owned()));
                return Some(ClusterView {
                    backends,
                    ..view.clone()
                });
            }
            res.clusters.get(c).map(|cluster| {
                let cluster = cluster.decode();
                let policy = cluster_policy(&cluster);
                let rest = ClusterRest {
                    health: policy.health,
                    settings: policy.settings,
                    fallback: policy.fallback,
                    ..ClusterRest::default()
                };
                match cluster_source(&cluster) {
                    Ok(source) => {
                        let (eds, dns) = match &source {
                            ClusterSource::Eds(eds) => (Some(eds.as_str()), None),
                            ClusterSource::Dns { target, .. } => (None, Some(target.clone())),
                            _ => (None, None),
                        };
                        ClusterView::new(
                            eds,
                            backends_of(c, &source),
                            policy.policy,
                            ClusterRest { dns, ..rest },
                        )
                    }
                    Err(why) => ClusterView::new(
                        None,
                        ClusterBackends::Backends(Arc::default()),
                        policy.policy,
                        ClusterRest {
                            ignored: Some(format!("Cluster {c:?}: {why}")),
                            ..rest
                        },
                    ),
                }
            })
        });
        for (c, view) in names.into_iter().zip(views) {
            st.clusters.insert(c.clone(), view);
        }
        for (l, (specs, _, _)) in &st.specs {
            for spec in specs {
                st.staged_owners
                    .entry(spec.service)
                    .or_default()
                    .insert(l.clone());
            }
        }
        // Services whose result may differ.
        let mut services: BTreeSet<ServiceAddr> = BTreeSet::new();
        for l in &listeners {
            if let Some(old) = self.specs.get(l) {
                services.extend(old.iter().map(|s| s.service));
            }
            if let Some((new, _, _)) = st.specs.get(l) {
                services.extend(new.iter().map(|s| s.service));
            }
        }
        for c in &clusters {
            if let Some(users) = self.cluster_users.get(c) {
                services.extend(users.iter().copied());
            }
        }
        let services: Vec<ServiceAddr> = services.into_iter().collect();
        let resolved = in_parallel(&services, |s| self.resolve(&st, &listeners, s));
        for (s, resolved) in services.into_iter().zip(resolved) {
            let new = match resolved {
                Resolved::Gone => {
                    st.not_warming.insert(s);
                    st.not_passthrough.insert(s);
                    None
                }
                Resolved::Passthrough => {
                    st.not_warming.insert(s);
                    st.passthrough_now.insert(s);
                    None
                }
                Resolved::Backends(b, unhashable) => {
                    match unhashable {
                        Some(what) => {
                            st.unhashable_now.insert(s, what);
                        }
                        None => {
                            st.not_unhashable.insert(s);
                        }
                    }
                    st.not_warming.insert(s);
                    st.not_passthrough.insert(s);
                    Some(b)
                }
                Resolved::Warming => {
                    st.warming_now.insert(s);
                    st.not_passthrough.insert(s);
                    table
                        .services
                        .get(&s)
                        .or_else(|| seed.services.get(&s))
                        .cloned()
                }
            };
            if table.services.get(&s) != new.as_ref() {
                st.changes.insert(s, new);
            }
        }
        st
    }

    /// The backends of service `s` under the staged state.
    fn resolve(
        &self,
        st: &Staged,
        dirty_listeners: &BTreeSet<String>,
        s: &ServiceAddr,
    ) -> Resolved {
        // Owners: committed ones not re-staged, plus staged ones that define `s`.
        let mut owners: BTreeSet<&String> = self
            .owners
            .get(s)
            .map(|o| o.iter().filter(|l| !dirty_listeners.contains(*l)).collect())
            .unwrap_or_default();
        if let Some(staged) = st.staged_owners.get(s) {
            owners.extend(staged.iter());
        }
        // The owner Envoy's original-destination matching would pick: the lowest
        // precedence, then the first listener by name.
        let spec = owners
            .iter()
            .filter_map(|l| {
                st.specs
                    .get(*l)
                    .map(|(specs, _, _)| specs)
                    .or_else(|| self.specs.get(*l))
                    .and_then(|specs| specs.iter().find(|x| x.service == *s))
                    .map(|spec| (spec.precedence, *l, spec))
            })
            .min_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
            .map(|(_, _, spec)| spec);
        let Some(spec) = spec else {
            return Resolved::Gone;
        };
        // The listener Envoy would pick runs a filter sockmesh does not interpret:
        // no entry, the connection goes where it was sent.
        if spec.left_alone {
            return Resolved::Gone;
        }
        let view = |name: &str| {
            match st.clusters.get(name) {
                Some(staged) => staged.as_ref(),
                None => self.clusters.get(name),
            }
            .map(|v| (&v.backends, v.policy, v.rest().health, v.rest().settings))
        };
        match service_backends(spec, view) {
            ServiceBackends::Warming => Resolved::Warming,
            ServiceBackends::Passthrough => Resolved::Passthrough,
            ServiceBackends::Backends(b) => {
                // A consistent-hash service asked to hash what connect() cannot see.
                let unhashable = spec.unhashable.filter(|_| b.policy.is_maglev());
                Resolved::Backends(b, unhashable)
            }
        }
    }

    /// Makes the staged state current. The table is copied first if another
    /// holder shares it (see `XdsState::shared_table`), and only when it changes.
    pub fn commit(&mut self, st: Staged, table: &mut std::sync::Arc<RoutingTable>) {
        for l in st.removed_listeners.iter().chain(st.specs.keys()) {
            self.unindex_listener(l);
        }
        for (l, (mut specs, routes, notes)) in st.specs {
            // Kept for the listener's lifetime: most hold one service in a vector
            // grown for four.
            specs.shrink_to_fit();
            for spec in &specs {
                self.owners
                    .entry(spec.service)
                    .or_default()
                    .insert(l.clone());
                for (c, _) in &spec.clusters {
                    self.cluster_users
                        .entry(c.clone())
                        .or_default()
                        .insert(spec.service);
                }
            }
            for r in &routes {
                self.route_users
                    .entry(r.clone())
                    .or_default()
                    .insert(l.clone());
            }
            self.specs.insert(l.clone(), specs);
            // Most listeners (TCP ones) reference no route configuration.
            if !routes.is_empty() {
                self.listener_routes.insert(l.clone(), routes);
            }
            if notes.is_empty() {
                self.listener_notes.remove(&l);
            } else {
                self.listener_notes.insert(l, notes);
            }
        }
        for (c, view) in st.clusters {
            // Replaced in place: an EDS update changes most views' backends only.
            let old = match view {
                Some(view) => match self.clusters.get_mut(&c) {
                    Some(held) => Some(std::mem::replace(held, view)),
                    None => {
                        self.clusters.insert(c.clone(), view);
                        None
                    }
                },
                None => self.clusters.remove(&c),
            };
            let new = self.clusters.get(&c);
            // A policy fallback is logged when it starts, not on every EDS update.
            if let Some(why) = new.and_then(|v| v.rest().fallback)
                && old.as_ref().and_then(|o| o.rest().fallback) != Some(why)
            {
                tracing::info!(cluster = %c, "load-balancing policy: {why}");
            }
            let new_eds = new.and_then(|v| v.eds.as_deref());
            if old.as_ref().and_then(|o| o.eds.as_deref()) == new_eds {
                continue;
            }
            if let Some(e) = old.and_then(|o| o.eds)
                && let Some(users) = self.eds_users.get_mut(&*e)
            {
                users.remove(&c);
                if users.is_empty() {
                    self.eds_users.remove(&*e);
                }
            }
            if let Some(e) = new_eds {
                self.eds_users.entry(e.to_owned()).or_default().insert(c);
            }
        }
        for s in st.not_warming {
            self.warming.remove(&s);
        }
        self.warming.extend(st.warming_now);
        for s in st.not_passthrough {
            self.passthrough.remove(&s);
        }
        self.passthrough.extend(st.passthrough_now);
        for s in st.not_unhashable {
            self.unhashable.remove(&s);
        }
        for (s, what) in st.unhashable_now {
            if self.unhashable.insert(s, what) != Some(what) {
                tracing::info!(
                    service = %s,
                    "hash policy: {what} cannot be seen at connect(); the consistent hash keys on the client (its source address or network namespace) instead"
                );
            }
        }
        if st.changes.is_empty() {
            return;
        }
        let table = std::sync::Arc::make_mut(table);
        // Many changes at once (an initial load) build the table anew, in order:
        // a B-tree built from sorted entries has full nodes, where one grown by
        // inserts in order leaves each node it splits half empty (a table of
        // 100,000 services built whole: 8 MiB instead of 15).
        if st.changes.len() >= table.services.len() / REBUILD_FROM {
            let old = std::mem::take(&mut table.services);
            table.services = merged(old, st.changes).collect();
            return;
        }
        for (s, b) in st.changes {
            match b {
                Some(b) => {
                    table.services.insert(s, b);
                }
                None => {
                    table.services.remove(&s);
                }
            }
        }
    }

    fn unindex_listener(&mut self, l: &str) {
        if let Some(specs) = self.specs.remove(l) {
            for spec in specs {
                if let Some(o) = self.owners.get_mut(&spec.service) {
                    o.remove(l);
                    if o.is_empty() {
                        self.owners.remove(&spec.service);
                    }
                }
                for (c, _) in &spec.clusters {
                    // Another owner may still use this cluster for this service.
                    let still = self.owners.get(&spec.service).is_some_and(|o| {
                        o.iter().any(|other| {
                            self.specs.get(other).is_some_and(|ss| {
                                ss.iter().any(|x| {
                                    x.service == spec.service
                                        && x.clusters.iter().any(|(n, _)| n == c)
                                })
                            })
                        })
                    });
                    if !still && let Some(u) = self.cluster_users.get_mut(c) {
                        u.remove(&spec.service);
                        if u.is_empty() {
                            self.cluster_users.remove(c);
                        }
                    }
                }
            }
        }
        if let Some(routes) = self.listener_routes.remove(l) {
            for r in routes {
                if let Some(u) = self.route_users.get_mut(&r) {
                    u.remove(l);
                    if u.is_empty() {
                        self.route_users.remove(&r);
                    }
                }
            }
        }
        self.listener_notes.remove(l);
    }
}

/// Changes to at least 1/`REBUILD_FROM` of the table's services rebuild it.
const REBUILD_FROM: usize = 4;

/// The services of `table` with `changes` applied, in order.
fn merged(
    table: BTreeMap<ServiceAddr, Service>,
    changes: crate::model::Changes,
) -> impl Iterator<Item = (ServiceAddr, Service)> {
    let mut table = table.into_iter().peekable();
    let mut changes = changes.into_iter().peekable();
    std::iter::from_fn(move || {
        loop {
            let next = match (table.peek(), changes.peek()) {
                (None, None) => return None,
                (Some(_), None) => table.next(),
                (Some((t, _)), Some((c, _))) if t < c => table.next(),
                (Some((t, _)), Some((c, _))) if t == c => {
                    table.next();
                    changes.next().and_then(|(s, b)| Some((s, b?)))
                }
                _ => changes.next().and_then(|(s, b)| Some((s, b?))),
            };
            if next.is_some() {
                return next;
            }
        }
    })
}

/// Updates of at least this many listeners, clusters or services are staged on
/// every core (each one's view reads the committed state and the resources
/// only). The unit tests stage everything so, and the translation's tests hold
/// it to the full translation.
const PARALLEL_STAGE_FROM: usize = if cfg!(test) { 2 } else { 1_024 };

/// `f` of each of `items`, in their order: on every core from
/// [`PARALLEL_STAGE_FROM`] items.
fn in_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    super::in_chunks(items, PARALLEL_STAGE_FROM, |part| {
        part.iter().map(&f).collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect()
}

enum Resolved {
    Gone,
    Warming,
    Passthrough,
    /// The backends, and what the hash policy names that a consistent hash at
    /// connect() cannot follow.
    Backends(Service, Option<&'static str>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Protocol};
    use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

    /// Against the changes applied one by one, over seeded tables and changes of
    /// every relative size: additions, replacements, removals of present and
    /// absent services, at either end and between.
    #[test]
    fn a_rebuilt_table_equals_the_changes_applied_one_by_one() {
        let mut rng = StdRng::seed_from_u64(7);
        let addr = |i: u16| ServiceAddr {
            vip: std::net::IpAddr::from([10, 0, 0, 1]),
            port: i,
            protocol: Protocol::Tcp,
        };
        let service = |n: u16| {
            Service::new(
                vec![Backend::new(std::net::IpAddr::from([10, 1, 0, 1]), n)],
                LbPolicy::Random,
            )
        };
        for round in 0..200 {
            let span = 1 + round % 40;
            let mut table = BTreeMap::new();
            for _ in 0..rng.random_range(0..span) {
                table.insert(addr(rng.random_range(1..=span)), service(round));
            }
            let mut changes = crate::model::Changes::new();
            for _ in 0..rng.random_range(0..span) {
                let s = rng.random_range(1..=span);
                let b = rng.random_range(0..2) == 0;
                changes.insert(addr(s), b.then(|| service(1000 + s)));
            }
            let mut want = table.clone();
            for (s, b) in changes.clone() {
                match b {
                    Some(b) => want.insert(s, b),
                    None => want.remove(&s),
                };
            }
            let got: BTreeMap<_, _> = merged(table, changes).collect();
            assert_eq!(got, want, "round {round}");
        }
    }
}
