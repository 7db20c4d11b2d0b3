//! The accepted xDS state and the accept/reject decision for each update.
//!
//! An update is decoded and validated completely, applied to the resource set, and
//! translated; if anything fails (a bad resource, a table beyond the datapath's
//! limits) the resource set is rolled back and the update is NACKed, so the last
//! good table stays. Transport-agnostic: the ADS client (SotW and delta), the file
//! source and the REST poller all feed [`XdsState::apply`].

use std::collections::{BTreeMap, BTreeSet, HashSet};

use sockmesh_proto::pb::google::protobuf::Any;

use super::{
    decode::{DecodeError, Kind, Resource, decode_any},
    incremental::{Changes, Dirty, Incremental},
    translate::{Encoded, Resources},
};
use crate::model::{Limits, RoutingTable, Usage, validate_service};

/// One update from a control plane.
#[derive(Clone, Debug)]
pub enum Update {
    /// State of the world for one type: for LDS and CDS the complete set (missing
    /// resources are removed); for RDS and EDS the named resources sent.
    SotW {
        kind: Kind,
        version: String,
        resources: Vec<Any>,
    },
    /// Incremental: resources added or changed (name, version, body), names removed.
    Delta {
        kind: Kind,
        added: Vec<(String, String, Any)>,
        removed: Vec<String>,
    },
    /// Everything at once (file source): replaces all four types. `kept` names
    /// resources the document holds exactly as last accepted (the file source
    /// recognised their text), which stay as they are without being sent again.
    Full {
        version: String,
        resources: Vec<Any>,
        kept: Vec<(Kind, std::sync::Arc<str>)>,
    },
}

impl Update {
    /// Resources added, replaced or removed.
    pub fn resource_count(&self) -> usize {
        match self {
            Update::SotW { resources, .. } | Update::Full { resources, .. } => resources.len(),
            Update::Delta { added, removed, .. } => added.len() + removed.len(),
        }
    }

    fn kinds(&self) -> Vec<Kind> {
        match self {
            Update::SotW { kind, .. } | Update::Delta { kind, .. } => vec![*kind],
            Update::Full { .. } => Kind::ALL.to_vec(),
        }
    }
}

/// A rejected update: the message goes into the NACK's `error_detail`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Nack(pub String);

/// Why a routing table was refused: a service the datapath cannot hold, or a
/// table beyond the maps' capacities.
#[derive(Debug, thiserror::Error)]
pub enum TableRefused {
    #[error(transparent)]
    Service(#[from] crate::model::ModelError),
    #[error(transparent)]
    Capacity(#[from] crate::model::CapacityError),
}

/// What an accepted update changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    /// The services whose backends changed (`None`: removed).
    pub changes: Changes,
    /// The routing table differs from before.
    pub table_changed: bool,
    /// RDS or EDS names to subscribe to changed.
    pub subscriptions_changed: bool,
    /// Endpoints removed outright (not draining) from some service.
    pub removed: std::collections::BTreeSet<crate::model::Endpoint>,
}

/// Counters per type, for metrics and `config_dump`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TypeStats {
    pub received: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub version: String,
    pub last_error: Option<String>,
    /// `version_info` of the last rejected update (SotW and file updates carry one),
    /// so a caller can tell which update a `last_error` belongs to.
    pub rejected_version: Option<String>,
}

/// The accepted resources, the table they translate to, and per-type bookkeeping.
#[derive(Debug, Default)]
pub struct XdsState {
    resources: Resources,
    /// Per-resource versions (delta protocol; `initial_resource_versions`).
    resource_versions: BTreeMap<Kind, BTreeMap<String, String>>,
    inc: Incremental,
    table: RoutingTable,
    stats: BTreeMap<Kind, TypeStats>,
    /// Lines about unsupported features, deduplicated, for logs.
    ignored_seen: BTreeSet<String>,
    /// Resources of types sockmesh does not consume, skipped.
    pub ignored_resources: u64,
    /// Listeners or clusters changed since the last `take_new_ignored`.
    ignored_dirty: bool,
    /// The datapath's capacities: an update beyond them is NACKed.
    limits: Limits,
    /// What `table` takes of the maps.
    usage: Usage,
    /// Clusters changed since the last `take_dns_changed`: the DNS clusters may
    /// have changed.
    dns_dirty: bool,
    /// The table found in the kernel at start: backends for services still warming
    /// until the control plane has delivered everything once.
    seed: RoutingTable,
}

/// A resource that decoded and passed validation, as its encoding.
struct Checked {
    kind: Kind,
    name: String,
    bytes: Box<[u8]>,
    /// A ClusterLoadAssignment's backends, read while it was decoded for
    /// validation, so staging does not decode it a second time.
    backends: Option<Vec<crate::model::Backend>>,
}

/// What an update replaced, to put back on a NACK: (kind, name, the previous
/// encoding or `None` if the resource was absent).
type Undo = Vec<(Kind, String, Option<Box<[u8]>>)>;

impl XdsState {
    pub fn new() -> Self {
        Self::default()
    }

    /// A state whose "previous table" is `table` (what the kernel holds), so
    /// services still warming keep those backends.
    pub fn with_previous(table: RoutingTable) -> Self {
        Self {
            seed: table,
            ..Self::default()
        }
    }

    /// NACK updates that would not fit maps of these capacities.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The routing table of the accepted state.
    pub fn table(&self) -> &RoutingTable {
        &self.table
    }

    #[cfg(test)]
    pub fn debug_indexes(&self) -> String {
        format!("{:#?}", self.inc)
    }

    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    pub fn stats(&self) -> &BTreeMap<Kind, TypeStats> {
        &self.stats
    }

    /// Names to subscribe to for a non-wildcard type (RDS, EDS).
    pub fn wanted(&self, kind: Kind) -> Vec<String> {
        match kind {
            Kind::Route => self.inc.route_names(),
            Kind::Endpoint => self.inc.eds_names(),
            Kind::Cluster | Kind::Listener => Vec::new(),
        }
    }

    /// The versions of the resources held, for a delta reconnect.
    pub fn resource_versions(&self, kind: Kind) -> BTreeMap<String, String> {
        self.resource_versions
            .get(&kind)
            .cloned()
            .unwrap_or_default()
    }

    /// The versions a delta reconnect announces (`initial_resource_versions`):
    /// the resources held that are still wanted. A server takes every name there
    /// as subscribed (istiod adds them to the stream's watches), so an
    /// assignment or route configuration kept after its cluster or listener went
    /// is left out, as Envoy leaves out what it has unsubscribed from.
    pub fn reconnect_versions(&self, kind: Kind) -> BTreeMap<String, String> {
        let mut versions = self.resource_versions(kind);
        if !kind.is_wildcard() {
            let wanted: std::collections::BTreeSet<String> =
                self.wanted(kind).into_iter().collect();
            versions.retain(|name, _| wanted.contains(name));
        }
        versions
    }

    /// The last accepted version of a type (SotW `version_info`).
    pub fn version(&self, kind: Kind) -> String {
        self.stats
            .get(&kind)
            .map(|s| s.version.clone())
            .unwrap_or_default()
    }

    /// Services waiting for their clusters/endpoints.
    pub fn warming(&self) -> Vec<crate::model::ServiceAddr> {
        self.inc.warming().copied().collect()
    }

    /// Services sent to their original destination (ORIGINAL_DST clusters): no
    /// entry in the table.
    pub fn passthrough(&self) -> Vec<crate::model::ServiceAddr> {
        self.inc.passthrough().copied().collect()
    }

    /// Consistent-hash services hashing the client because their hash policy names
    /// a header, cookie, query parameter or filter state (see `Incremental`).
    pub fn unhashable(&self) -> Vec<(crate::model::ServiceAddr, &'static str)> {
        self.inc.unhashable().map(|(s, w)| (*s, w)).collect()
    }

    /// Unsupported features seen for the first time by the last update.
    pub fn take_new_ignored(&mut self) -> Vec<String> {
        let mut fresh = Vec::new();
        // Only listeners and clusters produce such lines.
        if !std::mem::take(&mut self.ignored_dirty) {
            return fresh;
        }
        for line in self.inc.ignored() {
            if self.ignored_seen.insert(line.clone()) {
                fresh.push(line);
            }
        }
        fresh
    }

    /// Accepts or rejects `update`. On rejection nothing changes.
    pub fn apply(&mut self, update: Update) -> Result<Accepted, Nack> {
        for kind in update.kinds() {
            self.stats.entry(kind).or_default().received += 1;
        }
        let result = self.try_apply(&update);
        let version = match &update {
            Update::SotW { version, .. } | Update::Full { version, .. } => Some(version.clone()),
            Update::Delta { .. } => None,
        };
        for kind in update.kinds() {
            let s = self.stats.entry(kind).or_default();
            match &result {
                Ok(_) => {
                    s.accepted += 1;
                    s.last_error = None;
                    if let Some(v) = &version {
                        s.version.clone_from(v);
                    }
                }
                Err(e) => {
                    s.rejected += 1;
                    s.last_error = Some(e.0.clone());
                    s.rejected_version.clone_from(&version);
                }
            }
        }
        result
    }

    fn try_apply(&mut self, update: &Update) -> Result<Accepted, Nack> {
        let mut undo: Undo = Vec::new();
        let mut fresh = BTreeMap::new();
        let mut versions: Vec<(Kind, String, Option<String>)> = Vec::new();
        match update {
            Update::SotW {
                kind, resources, ..
            } => {
                let decoded = decode_all(resources.iter().map(|a| (*kind, a)))?;
                let names: BTreeSet<String> = decoded.iter().map(|r| r.name.clone()).collect();
                if kind.is_wildcard() {
                    for name in self.names(*kind) {
                        if !names.contains(&name) {
                            undo.push((*kind, name.clone(), self.remove(*kind, &name)));
                        }
                    }
                }
                for r in decoded {
                    // A resource sent again unchanged is neither undone nor re-translated.
                    self.put_recorded(r, &mut undo, &mut fresh);
                }
            }
            Update::Delta {
                kind,
                added,
                removed,
            } => {
                let decoded = decode_all(added.iter().map(|(_, _, a)| (*kind, a)))?;
                for ((sent_name, version, _), r) in added.iter().zip(decoded) {
                    if !sent_name.is_empty() && *sent_name != r.name {
                        return Err(Nack(format!(
                            "{} resource {sent_name:?} carries the name {:?}",
                            kind.short(),
                            r.name
                        )));
                    }
                    versions.push((*kind, r.name.clone(), Some(version.clone())));
                    self.put_recorded(r, &mut undo, &mut fresh);
                }
                for name in removed {
                    versions.push((*kind, name.clone(), None));
                    undo.push((*kind, name.clone(), self.remove(*kind, name)));
                }
            }
            Update::Full {
                resources, kept, ..
            } => {
                // Types sockmesh does not consume (secrets, runtime, ...) are skipped
                // and counted, not an error.
                let known = resources.iter().filter_map(|a| {
                    let kind = Kind::from_type_url(&a.type_url);
                    if kind.is_none() {
                        self.ignored_resources += 1;
                    }
                    kind.map(|k| (k, a))
                });
                let decoded = decode_all(known.collect::<Vec<_>>().into_iter())?;
                // As SotW per type: what the document no longer holds is removed;
                // what it holds unchanged is neither undone nor re-translated (one
                // edited resource of a large file costs one resource).
                // One pass over what the state holds: what is kept must be held
                // (else nothing changes), what is neither kept nor sent goes.
                let kept: HashSet<(Kind, &str)> = kept.iter().map(|(k, n)| (*k, &**n)).collect();
                let sent: HashSet<(Kind, &str)> =
                    decoded.iter().map(|r| (r.kind, r.name.as_str())).collect();
                let mut held = 0;
                let mut gone = Vec::new();
                for kind in Kind::ALL {
                    for name in self.held_names(kind) {
                        if kept.contains(&(kind, name)) {
                            held += 1;
                        } else if !sent.contains(&(kind, name)) {
                            gone.push((kind, name.to_owned()));
                        }
                    }
                }
                if held != kept.len() {
                    return Err(Nack(format!(
                        "{} of the {} resources to be kept are not held (resend the whole document)",
                        kept.len() - held,
                        kept.len()
                    )));
                }
                for (kind, name) in gone {
                    let old = self.remove(kind, &name);
                    undo.push((kind, name, old));
                }
                for r in decoded {
                    self.put_recorded(r, &mut undo, &mut fresh);
                }
            }
        }
        let mut dirty = Dirty {
            assignments: fresh,
            ..Dirty::default()
        };
        for (kind, name, _) in &undo {
            let set = match kind {
                Kind::Listener => &mut dirty.listeners,
                Kind::Route => &mut dirty.routes,
                Kind::Cluster => &mut dirty.clusters,
                Kind::Endpoint => &mut dirty.endpoints,
            };
            set.insert(name.clone());
        }
        let accepted = match self.commit_dirty(&dirty, &update.kinds()) {
            Ok(a) => a,
            Err(e) => {
                self.rollback(undo);
                return Err(Nack(format!("the resulting routing table is refused: {e}")));
            }
        };
        for (kind, name, version) in versions {
            let map = self.resource_versions.entry(kind).or_default();
            match version {
                Some(v) => map.insert(name, v),
                None => map.remove(&name),
            };
        }
        Ok(accepted)
    }

    /// The last good answers of a DNS cluster.
    pub fn dns_answers(&self, cluster: &str) -> Option<&super::clusters::DnsAnswers> {
        self.resources.dns.get(cluster)
    }

    /// Whether the DNS clusters may have changed since the last call (a cluster
    /// changed): the core republishes them only then, not on every update.
    pub fn take_dns_changed(&mut self) -> bool {
        std::mem::take(&mut self.dns_dirty)
    }

    /// The DNS clusters (STRICT_DNS, LOGICAL_DNS) and what to resolve for each.
    pub fn dns_targets(&self) -> BTreeMap<String, super::clusters::DnsTarget> {
        self.inc.dns_targets()
    }

    /// New answers for a DNS cluster's host names, from the agent's resolver (not
    /// the control plane). A cluster that is no longer a DNS cluster is left
    /// alone; answers that would break the datapath's limits are refused and
    /// nothing changes.
    pub fn apply_dns(
        &mut self,
        cluster: &str,
        answers: super::clusters::DnsAnswers,
    ) -> Result<Accepted, TableRefused> {
        if !self.inc.is_dns_cluster(cluster) || self.resources.dns.get(cluster) == Some(&answers) {
            return Ok(Accepted::default());
        }
        let previous = self.resources.dns.insert(cluster.to_owned(), answers);
        let mut dirty = Dirty::default();
        dirty.dns.insert(cluster.to_owned());
        let mut accepted = self.commit_dirty(&dirty, &[]).inspect_err(|_| {
            match previous {
                Some(p) => self.resources.dns.insert(cluster.to_owned(), p),
                None => self.resources.dns.remove(cluster),
            };
        })?;
        // A name's addresses changing is not an endpoint removed by the control
        // plane: Envoy keeps connections to a host DNS no longer returns, and a
        // LOGICAL_DNS name behind round-robin DNS changes address every refresh.
        accepted.removed.clear();
        Ok(accepted)
    }

    /// Forgets a DNS cluster's answers (its target changed); its services keep
    /// their backends in the table until the new answers arrive.
    pub fn forget_dns(&mut self, cluster: &str) {
        self.resources.dns.remove(cluster);
    }

    /// Forgets the answers of clusters that are no longer DNS clusters.
    fn prune_dns(&mut self) {
        let targets = self.inc.dns_targets();
        self.resources.dns.retain(|c, _| targets.contains_key(c));
    }

    /// Re-translates what `dirty` touches, checks the result against the
    /// datapath's rules and limits, and makes it the table. On an error nothing
    /// of the state's indexes or table changed (the caller restores resources).
    fn commit_dirty(&mut self, dirty: &Dirty, kinds: &[Kind]) -> Result<Accepted, TableRefused> {
        let staged = self
            .inc
            .stage(&self.resources, dirty, &self.table, &self.seed);
        let usage = check_changes(&self.table, &staged.changes, &self.limits, &self.usage)?;
        // Only listeners and clusters decide what RDS/EDS names are wanted.
        self.ignored_dirty |= !dirty.listeners.is_empty() || !dirty.clusters.is_empty();
        let may_resubscribe =
            !dirty.listeners.is_empty() || !dirty.routes.is_empty() || !dirty.clusters.is_empty();
        let subscriptions = may_resubscribe.then(|| (self.inc.route_names(), self.inc.eds_names()));
        let changes = staged.changes.clone();
        let mut removed = std::collections::BTreeSet::new();
        for (service, after) in &changes {
            if let Some(before) = self.table.services.get(service) {
                crate::model::removed_endpoints(service, before, after.as_ref(), &mut removed);
            }
        }
        self.usage = usage;
        self.inc.commit(staged, &mut self.table);
        let accepted = Accepted {
            table_changed: !changes.is_empty(),
            changes,
            subscriptions_changed: subscriptions
                .is_some_and(|s| s != (self.inc.route_names(), self.inc.eds_names())),
            removed,
        };
        let heard = |k| self.stats.get(&k).is_some_and(|s| s.accepted > 0) || kinds.contains(&k);
        if self.inc.warming().next().is_none() && heard(Kind::Listener) && heard(Kind::Cluster) {
            self.seed = RoutingTable::default();
        }
        if !dirty.clusters.is_empty() {
            self.prune_dns();
            self.dns_dirty = true;
        }
        Ok(accepted)
    }

    fn rollback(&mut self, undo: Undo) {
        for (kind, name, old) in undo.into_iter().rev() {
            match old {
                Some(bytes) => self.restore(kind, name, bytes),
                None => {
                    self.remove(kind, &name);
                }
            }
        }
    }

    fn names(&self, kind: Kind) -> Vec<String> {
        let r = &self.resources;
        match kind {
            Kind::Cluster => r.clusters.keys().cloned().collect(),
            Kind::Endpoint => r.endpoints.keys().cloned().collect(),
            Kind::Listener => r.listeners.keys().cloned().collect(),
            Kind::Route => r.routes.keys().cloned().collect(),
        }
    }

    fn held_names(&self, kind: Kind) -> Box<dyn Iterator<Item = &str> + '_> {
        let r = &self.resources;
        match kind {
            Kind::Cluster => Box::new(r.clusters.keys().map(String::as_str)),
            Kind::Endpoint => Box::new(r.endpoints.keys().map(String::as_str)),
            Kind::Listener => Box::new(r.listeners.keys().map(String::as_str)),
            Kind::Route => Box::new(r.routes.keys().map(String::as_str)),
        }
    }

    /// [`Self::put`], recording what it replaced in `undo` and a changed
    /// assignment's backends in `fresh`.
    fn put_recorded(
        &mut self,
        mut r: Checked,
        undo: &mut Undo,
        fresh: &mut BTreeMap<String, Vec<crate::model::Backend>>,
    ) {
        if let Some(old) = self.put(&r) {
            if let Some(backends) = r.backends.take() {
                fresh.insert(r.name.clone(), backends);
            }
            undo.push((r.kind, r.name, old));
        }
    }

    /// Stores `r`. Returns `None` if the same encoding was stored already (nothing
    /// changed), else `Some(previous encoding, if any)`.
    fn put(&mut self, r: &Checked) -> Option<Option<Box<[u8]>>> {
        fn put_in<T: prost::Message + Default>(
            map: &mut BTreeMap<String, Encoded<T>>,
            r: &Checked,
        ) -> Option<Option<Box<[u8]>>> {
            if map.get(&r.name).is_some_and(|old| old.bytes() == &*r.bytes) {
                return None;
            }
            let new = Encoded::from_bytes(r.bytes.clone());
            Some(map.insert(r.name.clone(), new).map(Encoded::into_bytes))
        }
        let res = &mut self.resources;
        match r.kind {
            Kind::Cluster => put_in(&mut res.clusters, r),
            Kind::Endpoint => put_in(&mut res.endpoints, r),
            Kind::Listener => put_in(&mut res.listeners, r),
            Kind::Route => put_in(&mut res.routes, r),
        }
    }

    /// Puts back an encoding an undo log kept.
    fn restore(&mut self, kind: Kind, name: String, bytes: Box<[u8]>) {
        let res = &mut self.resources;
        match kind {
            Kind::Cluster => {
                res.clusters.insert(name, Encoded::from_bytes(bytes));
            }
            Kind::Endpoint => {
                res.endpoints.insert(name, Encoded::from_bytes(bytes));
            }
            Kind::Listener => {
                res.listeners.insert(name, Encoded::from_bytes(bytes));
            }
            Kind::Route => {
                res.routes.insert(name, Encoded::from_bytes(bytes));
            }
        }
    }

    fn remove(&mut self, kind: Kind, name: &str) -> Option<Box<[u8]>> {
        let res = &mut self.resources;
        match kind {
            Kind::Cluster => res.clusters.remove(name).map(Encoded::into_bytes),
            Kind::Endpoint => res.endpoints.remove(name).map(Encoded::into_bytes),
            Kind::Listener => res.listeners.remove(name).map(Encoded::into_bytes),
            Kind::Route => res.routes.remove(name).map(Encoded::into_bytes),
        }
    }
}

/// Decodes every resource; all errors are reported together.
///
/// Each resource is kept only in its encoding once checked: decoding a whole update
/// first would hold every decoded message at once (about 230 MiB for an initial
/// push of 10,000 services), and the allocator keeps such a peak as resident memory.
fn decode_all<'a>(items: impl Iterator<Item = (Kind, &'a Any)>) -> Result<Vec<Checked>, Nack> {
    let items: Vec<(Kind, &Any)> = items.collect();
    let read_backends = items.len() < READ_BACKENDS_BELOW;
    // In order: a name sent twice keeps its last body, as decoded serially.
    let parts = super::in_chunks(&items, PARALLEL_DECODE_FROM, |part| {
        decode_part(part, read_backends)
    });
    let mut out = Vec::with_capacity(items.len());
    let mut errors: Vec<String> = Vec::new();
    for (checked, errs) in parts {
        out.extend(checked);
        errors.extend(errs);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(Nack(errors.join("; ")))
    }
}

/// Updates of at least this many resources are decoded on every core (protobuf
/// decode and validation share nothing between resources).
const PARALLEL_DECODE_FROM: usize = 2_000;

/// Updates of fewer resources keep each assignment's backends from its validation
/// decode (a batch of 1,000 endpoint changes then decodes each once). A larger one,
/// an initial load, would hold them all at once: 50,000 assignments' backends took
/// 30 MiB more of the agent's resident memory after the load, for no faster load.
const READ_BACKENDS_BELOW: usize = 5_000;

fn decode_part(items: &[(Kind, &Any)], read_backends: bool) -> (Vec<Checked>, Vec<String>) {
    let mut out = Vec::with_capacity(items.len());
    let mut errors: Vec<String> = Vec::new();
    for &(kind, any) in items {
        match decode_any(any, kind) {
            Ok(r) => out.push(Checked {
                kind: r.kind(),
                name: r.name().to_owned(),
                backends: match &r {
                    Resource::Endpoint(e) if read_backends => {
                        Some(super::clusters::assignment_backends(e))
                    }
                    _ => None,
                },
                // The bytes received: decoding them gives what was checked
                // (re-encoding the decoded message cost a tenth of a large update).
                bytes: any.value.clone().into_boxed_slice(),
            }),
            Err(DecodeError::WrongType { type_url, .. })
                if Kind::from_type_url(&type_url).is_none() =>
            {
                errors.push(format!("resource type {type_url} is not supported"));
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    (out, errors)
}

/// The datapath's rules, checked on the changed services only, and every map
/// capacity (services, backends, slots), with the transient of a service being
/// rewritten. Returns the table's usage after the changes.
fn check_changes(
    table: &RoutingTable,
    changes: &Changes,
    limits: &Limits,
    usage: &Usage,
) -> Result<Usage, TableRefused> {
    for (service, after) in changes {
        if let Some(b) = after {
            validate_service(service, b)?;
        }
    }
    let (after, transient) = usage.after(changes, |s| table.services.get(s).map(Usage::of_service));
    limits.check(&after, &transient)?;
    Ok(after)
}
