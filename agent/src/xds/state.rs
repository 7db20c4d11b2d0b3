//! The accepted xDS state and the accept/reject decision for each update.
//!
//! An update is decoded and validated resource by resource (`super::accept`): the
//! valid resources are applied and translated, each refused one keeps its last
//! good version and is named in the NACK. A table beyond the datapath's limits
//! rolls the resource set back and NACKs the update. Transport-agnostic: the ADS
//! client (SotW and delta), the file source and the REST poller all feed
//! [`XdsState::apply`].

mod updates;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use sockmesh_proto::pb::google::protobuf::Any;

use super::fit::{Limit, Limited};
use super::{
    accept::{Refused, nack_of},
    decode::Kind,
    incremental::{Changes, Dirty, Incremental},
    translate::Resources,
};
use crate::model::{Limits, RoutingTable, Usage};

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
        /// Where each of `resources` is in its file, when known: errors name it.
        positions: Vec<Option<super::position::Position>>,
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

/// What became of an update: what was applied, and what was refused.
#[derive(Debug, Default)]
#[must_use]
pub struct Applied {
    pub accepted: Accepted,
    /// The NACK, if anything of the update was refused (the update whole, or some
    /// of its resources).
    pub nack: Option<Nack>,
    /// The resources refused alone (the others applied).
    pub refused: Vec<Refused>,
}

impl Applied {
    /// What was applied when nothing was refused, else the NACK (what was valid is
    /// applied either way).
    pub fn result(self) -> Result<Accepted, Nack> {
        match self.nack {
            None => Ok(self.accepted),
            Some(n) => Err(n),
        }
    }
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

impl Accepted {
    /// This, then `later` (a later part of the same update).
    pub fn merge(&mut self, later: Accepted) {
        // An endpoint one part removed and a later one gives a service again is
        // not removed by the two together.
        if !self.removed.is_empty() {
            let back: BTreeSet<crate::model::Endpoint> = later
                .changes
                .iter()
                .filter_map(|(s, after)| Some((s, after.as_ref()?)))
                .flat_map(|(s, after)| {
                    after.iter().map(|b| crate::model::Endpoint {
                        addr: b.address,
                        port: b.port,
                        protocol: s.protocol,
                    })
                })
                .collect();
            self.removed.retain(|e| !back.contains(e));
        }
        self.changes.extend(later.changes);
        self.table_changed |= later.table_changed;
        self.subscriptions_changed |= later.subscriptions_changed;
        self.removed.extend(later.removed);
    }
}

/// Something the translation noticed, logged once while it stands.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Note {
    /// A feature sockmesh does not follow (the rest of the resource applies).
    Ignored(String),
    /// A chain whose traffic sockmesh leaves alone (its terminal filter is not
    /// one it interprets).
    LeftAlone(String),
}

impl Note {
    pub fn text(&self) -> &str {
        match self {
            Note::Ignored(t) | Note::LeftAlone(t) => t,
        }
    }
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
    inc: Incremental,
    /// Shared with the admin server's published view (weakly) and with the
    /// datapath task while it writes the whole table: a commit copies it only when
    /// one of them still holds it (see [`XdsState::shared_table`]).
    table: Arc<RoutingTable>,
    stats: BTreeMap<Kind, TypeStats>,
    /// The notes standing after the last update of listeners or clusters (see
    /// [`XdsState::take_new_notes`]).
    notes_seen: BTreeSet<Note>,
    /// Resources of types sockmesh does not consume, skipped.
    pub ignored_resources: u64,
    /// Listeners or clusters changed since the last `take_new_notes`.
    ignored_dirty: bool,
    /// Resources refused (and holding their last good version, if any), by kind
    /// and name: why.
    refused: BTreeMap<Kind, BTreeMap<String, String>>,
    /// The datapath's capacities: what does not fit waits (see `super::fit`).
    limits: Limits,
    /// Services the node programs otherwise than the configuration asks.
    limited: BTreeMap<crate::model::ServiceAddr, Limited>,
    /// This node's rendezvous seed for endpoint subsets.
    subset_seed: u64,
    /// What `table` takes of the maps.
    usage: Usage,
    /// Clusters changed since the last `take_dns_changed`: the DNS clusters may
    /// have changed.
    dns_dirty: bool,
    /// The table found in the kernel at start: backends for services still warming
    /// until the control plane has delivered everything once.
    seed: RoutingTable,
}

/// The most of one refused resource's error the state keeps (for `/config_dump`).
const REFUSED_ERROR_BYTES: usize = 1_024;

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

    /// Program what fits maps of these capacities (see `super::fit`).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// This node's seed for the subsets of services with more endpoints than one
    /// may have (each node keeps another subset: see `fit::subset`).
    pub fn set_subset_seed(&mut self, node_id: &str) {
        self.subset_seed = xxhash_rust::xxh3::xxh3_64(node_id.as_bytes());
    }

    /// Services the node programs otherwise than the configuration asks (a subset
    /// of their endpoints, their previous version, or nothing), and how.
    pub fn limited(&self) -> &BTreeMap<crate::model::ServiceAddr, Limited> {
        &self.limited
    }

    /// Tries the services limited by the maps' room again (room may have returned
    /// since: a write that failed then succeeded, a service that shrank).
    pub fn heal(&mut self) -> Accepted {
        if self.limited.values().all(|l| l.limit == Limit::Endpoints) {
            return Accepted::default();
        }
        self.commit_dirty(&Dirty::default(), &[])
    }

    /// How many entries each of the state's collections holds, by name: the
    /// resources (their versions are stored with them), the translation's caches and indexes, the
    /// bookkeeping of refused and limited resources. A leak audit compares them
    /// with what the configuration implies (`/config_dump`'s `state`).
    pub fn sizes(&self) -> BTreeMap<&'static str, usize> {
        let r = &self.resources;
        let mut out: BTreeMap<&'static str, usize> = [
            ("listeners", r.listeners.len()),
            ("routes", r.routes.len()),
            ("clusters", r.clusters.len()),
            ("endpoints", r.endpoints.len()),
            ("dns_answers", r.dns.len()),
            ("notes_seen", self.notes_seen.len()),
            ("refused", self.refused.values().map(BTreeMap::len).sum()),
            ("limited", self.limited.len()),
            ("services", self.table.services.len()),
            ("seed_services", self.seed.services.len()),
        ]
        .into_iter()
        .collect();
        out.extend(self.inc.sizes());
        out
    }

    /// The routing table of the accepted state.
    pub fn table(&self) -> &RoutingTable {
        &self.table
    }

    /// The routing table, shared: a reader holding it sees it as it is now while
    /// the state goes on; the next commit then copies the table instead of
    /// changing it in place.
    pub fn shared_table(&self) -> &Arc<RoutingTable> {
        &self.table
    }

    #[cfg(test)]
    pub fn debug_indexes(&self) -> String {
        format!("{:#?}", self.inc)
    }

    /// Where service `s`'s load assignment places each of its endpoints
    /// (priority, locality), if it has one assignment.
    pub fn places(
        &self,
        s: &crate::model::ServiceAddr,
    ) -> Option<BTreeMap<(std::net::IpAddr, u16), super::clusters::Place>> {
        self.inc.places(&self.resources, s)
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
        self.resources.versions(kind)
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

    /// The listeners whose traffic (that of some chain, or all) sockmesh leaves
    /// alone, and why, one line per chain.
    pub fn left_alone(&self) -> Vec<(String, Vec<String>)> {
        self.inc
            .left_alone()
            .map(|(l, why)| (l.clone(), why.clone()))
            .collect()
    }

    /// Notes (features ignored, chains left alone) that appeared with the last
    /// update of listeners or clusters: each is logged once while it stands.
    pub fn take_new_notes(&mut self) -> Vec<Note> {
        // Only listeners and clusters produce notes.
        if !std::mem::take(&mut self.ignored_dirty) {
            return Vec::new();
        }
        let current: BTreeSet<Note> = self
            .inc
            .ignored()
            .into_iter()
            .map(Note::Ignored)
            .chain(
                self.inc
                    .left_alone()
                    .flat_map(|(_, why)| why.iter().cloned().map(Note::LeftAlone)),
            )
            .collect();
        let fresh = current.difference(&self.notes_seen).cloned().collect();
        // Only what stands is remembered: the set is bounded by the resources
        // held, and a note that returns after it went is logged again.
        self.notes_seen = current;
        fresh
    }

    /// Applies `update`: every valid resource, each refused one keeping its last
    /// good version; an update refused whole changes nothing.
    pub fn apply(&mut self, update: Update) -> Applied {
        let mut parts = match self.begin(&update, usize::MAX) {
            Ok(parts) => parts,
            Err(whole) => return whole,
        };
        let mut accepted = Accepted::default();
        while let Some(part) = self.next_part(&mut parts) {
            accepted.merge(part);
        }
        self.finish(&update, parts, accepted)
    }

    /// [`Self::apply`] in steps: the update's valid resources put in the store
    /// (`Err`: refused whole, nothing changed), to be translated by
    /// [`Self::next_part`] (an EDS delta of more than `part` assignments in
    /// parts of `part`, so each part can be written to the kernel while the next
    /// is translated) and closed by [`Self::finish`].
    pub fn begin(&mut self, update: &Update, part: usize) -> Result<updates::Parts, Applied> {
        for kind in update.kinds() {
            self.stats.entry(kind).or_default().received += 1;
        }
        self.prepare(update, part)
            .map_err(|nack| self.settled(update, Accepted::default(), Vec::new(), Some(nack)))
    }

    /// Closes a begun update whose parts are all committed: `accepted` is what
    /// they changed together (the subscriptions changed if any part's did).
    pub fn finish(
        &mut self,
        update: &Update,
        parts: updates::Parts,
        accepted: Accepted,
    ) -> Applied {
        let refused = self.settle(parts);
        self.settled(update, accepted, refused, None)
    }

    /// The counters of an update's types, and what it asks of its source.
    fn settled(
        &mut self,
        update: &Update,
        accepted: Accepted,
        refused: Vec<Refused>,
        whole: Option<Nack>,
    ) -> Applied {
        let version = match update {
            Update::SotW { version, .. } | Update::Full { version, .. } => Some(version.clone()),
            Update::Delta { .. } => None,
        };
        for kind in update.kinds() {
            let of_kind: Vec<Refused> =
                refused.iter().filter(|r| r.kind == kind).cloned().collect();
            let error = match &whole {
                Some(n) => Some(n.0.clone()),
                None => (!of_kind.is_empty()).then(|| nack_of(&of_kind).0),
            };
            let s = self.stats.entry(kind).or_default();
            match error {
                None => {
                    s.accepted += 1;
                    s.last_error = None;
                    if let Some(v) = &version {
                        s.version.clone_from(v);
                    }
                }
                Some(e) => {
                    s.rejected += 1;
                    s.last_error = Some(e);
                    s.rejected_version.clone_from(&version);
                }
            }
        }
        // A control plane's assignments and route configurations that no cluster or
        // listener references any more are dropped (Envoy drops a resource with
        // its last watch); a file's are what the file says.
        if accepted.subscriptions_changed && !matches!(update, Update::Full { .. }) {
            self.prune_unreferenced();
        }
        let nack = whole.or_else(|| (!refused.is_empty()).then(|| nack_of(&refused)));
        Applied {
            accepted,
            nack,
            refused,
        }
    }

    /// Drops the assignments and route configurations nothing references, with
    /// their versions and refusals: they are not sent as held on a reconnect and
    /// take no memory.
    fn prune_unreferenced(&mut self) {
        for kind in [Kind::Endpoint, Kind::Route] {
            let wanted: BTreeSet<String> = self.wanted(kind).into_iter().collect();
            let gone: Vec<String> = self
                .resources
                .names(kind)
                .filter(|n| !wanted.contains(*n))
                .map(str::to_owned)
                .collect();
            for name in gone {
                self.resources.remove(kind, &name);
            }
            if let Some(r) = self.refused.get_mut(&kind) {
                r.retain(|n, _| wanted.contains(n));
            }
        }
        self.refused.retain(|_, m| !m.is_empty());
    }

    /// The resources refused now (each holding its last good version, if it had
    /// one), by kind and name: why.
    pub fn refused(&self) -> &BTreeMap<Kind, BTreeMap<String, String>> {
        &self.refused
    }

    /// Records what an applied update did to each resource's standing: `accepted`
    /// and `gone` names are no longer refused; `refused` ones are, until a later
    /// version is accepted or they are removed.
    fn note_refused<'a>(
        &mut self,
        accepted: impl Iterator<Item = (Kind, &'a str)>,
        refused: &[Refused],
    ) {
        for (kind, name) in accepted {
            if let Some(m) = self.refused.get_mut(&kind) {
                m.remove(name);
            }
        }
        for r in refused {
            self.refused.entry(r.kind).or_default().insert(
                r.name.clone(),
                super::accept::truncate_to(&r.error, REFUSED_ERROR_BYTES),
            );
        }
        self.refused.retain(|_, m| !m.is_empty());
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
    /// alone.
    pub fn apply_dns(&mut self, cluster: &str, answers: super::clusters::DnsAnswers) -> Accepted {
        if !self.inc.is_dns_cluster(cluster) || self.resources.dns.get(cluster) == Some(&answers) {
            return Accepted::default();
        }
        self.resources.dns.insert(cluster.to_owned(), answers);
        let mut dirty = Dirty::default();
        dirty.dns.insert(cluster.to_owned());
        let mut accepted = self.commit_dirty(&dirty, &[]);
        // A name's addresses changing is not an endpoint removed by the control
        // plane: Envoy keeps connections to a host DNS no longer returns, and a
        // LOGICAL_DNS name behind round-robin DNS changes address every refresh.
        accepted.removed.clear();
        accepted
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

    /// Re-translates what `dirty` touches and makes what of it the maps take the
    /// table (see `super::fit`).
    fn commit_dirty(&mut self, dirty: &Dirty, kinds: &[Kind]) -> Accepted {
        let mut staged = self
            .inc
            .stage(&self.resources, dirty, &self.table, &self.seed);
        // Room may return when a service goes or shrinks (and on every tick).
        let heal = dirty.listeners.is_empty()
            && dirty.routes.is_empty()
            && dirty.clusters.is_empty()
            && dirty.endpoints.is_empty()
            && dirty.dns.is_empty()
            || staged.changes.iter().any(|(s, after)| {
                self.table
                    .services
                    .get(s)
                    .is_some_and(|before| after.as_ref().is_none_or(|a| a.len() < before.len()))
            });
        let before = self.limited.clone();
        let fitted = super::fit::fit(
            &super::fit::Maps {
                table: &self.table,
                usage: self.usage,
                limits: self.limits,
                seed: self.subset_seed,
            },
            std::mem::take(&mut staged.changes),
            &mut self.limited,
            heal,
        );
        self.log_limited(&before);
        staged.changes = fitted.changes;
        // Only listeners and clusters decide what RDS/EDS names are wanted.
        self.ignored_dirty |= !dirty.listeners.is_empty() || !dirty.clusters.is_empty();
        let may_resubscribe =
            !dirty.listeners.is_empty() || !dirty.routes.is_empty() || !dirty.clusters.is_empty();
        let subscriptions = may_resubscribe.then(|| (self.inc.route_names(), self.inc.eds_names()));
        let changes = staged.changes.clone();
        let mut removed = BTreeSet::new();
        for (service, after) in &changes {
            if let Some(before) = self.table.services.get(service) {
                removed_endpoints(service, before, after.as_ref(), &mut removed);
            }
        }
        self.usage = fitted.usage;
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
        accepted
    }

    /// Logs each service that became limited, changed how, or fits again.
    fn log_limited(&self, before: &BTreeMap<crate::model::ServiceAddr, Limited>) {
        for (s, l) in &self.limited {
            if before.get(s).is_none_or(|b| b.limit != l.limit) {
                tracing::warn!(
                    service = %s,
                    limit = l.limit.label(),
                    endpoints = l.endpoints,
                    programmed = l.programmed,
                    why = %l.why,
                    "service limited by this node (valid configuration; it heals when room returns)"
                );
            }
        }
        for s in before.keys().filter(|s| !self.limited.contains_key(s)) {
            tracing::info!(service = %s, "service no longer limited by this node");
        }
    }
}

/// The endpoints of `service` in `before` and absent (in any state) from `after`:
/// what a change removed outright (draining ones stay). In one pass over each
/// list: a service may have 16,384 endpoints, and comparing each with each took
/// seconds.
fn removed_endpoints(
    service: &crate::model::ServiceAddr,
    before: &[crate::model::Backend],
    after: Option<&crate::model::Service>,
    out: &mut BTreeSet<crate::model::Endpoint>,
) {
    let kept: foldhash::HashSet<(std::net::IpAddr, u16)> = after
        .into_iter()
        .flat_map(|a| a.iter().map(|b| (b.address, b.port)))
        .collect();
    out.extend(
        before
            .iter()
            .filter(|b| !kept.contains(&(b.address, b.port)))
            .map(|b| crate::model::Endpoint {
                addr: b.address,
                port: b.port,
                protocol: service.protocol,
            }),
    );
}
