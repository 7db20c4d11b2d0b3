//! The agent's core: the accepted xDS state and the datapath it drives. Every
//! source calls [`Core::handle`] (through [`locked`]); it decides ACK or NACK and
//! writes the kernel maps when the table changed. After every change the core
//! publishes its view for the admin server (see [`super::view`]), which never
//! takes the lock the sources hold while they work.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use sockmesh_proto::pb::envoy::service::discovery::v3::DiscoveryResponse;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    accept::Refused,
    clusters::{DnsAnswers, DnsTarget},
    decode::Kind,
    dns::Round,
    state::{Accepted, Nack, Note, Update, XdsState},
    view::{CoreView, Places, View, Viewer},
};
use crate::model::{Changes, ServiceAddr};

pub use crate::dataplane::task::{
    DatapathHandle, KernelStatus, LATENCY_BUCKETS, MIGRATION_WARMING_TIMEOUT, PushStats, SinkError,
    TableSink, Write, Written, chain,
};

/// An update with this many resources (an initial push, a full SotW of a big
/// mesh) leaves megabytes freed but held by the allocator: see
/// [`crate::dataplane::task::release_freed_memory`].
/// Below it the trim costs more than it returns: a batch of 1,000 endpoint changes
/// spent 5 % of its time in `malloc_trim` for a few hundred KiB.
const LARGE_UPDATE: usize = 10_000;

/// An EDS update of more assignments than this is translated and written in
/// parts of this many, each part's kernel write running while the next is
/// translated (an initial push of 100,000 assignments: 13 parts); a smaller one
/// in eighths (see `XdsState::prepare`).
const EDS_PART: usize = 8_192;

/// Distinct unknown fields listed by name (in `/metrics` and `/config_dump`): a
/// document may name any number of keys; beyond these they are counted together.
pub const UNKNOWN_FIELDS_LISTED: usize = 256;

/// Where the unknown fields beyond [`UNKNOWN_FIELDS_LISTED`] are counted.
pub const OTHER_UNKNOWN_FIELDS: &str = "(other)";

/// What a handled update asks of its source.
#[derive(Debug, Default)]
pub struct Handled {
    /// RDS or EDS names to subscribe to changed.
    pub subscriptions_changed: bool,
    /// The kernel write, handed to the datapath task: an ADS client waits on it
    /// before it ACKs (or NACKs).
    pub written: Written,
    /// The NACK to send: the update refused whole, or some of its resources (the
    /// others applied).
    pub nack: Option<Nack>,
    /// The resources refused alone.
    pub refused: Vec<Refused>,
}

impl Handled {
    /// Nothing refused: what was handled; else the NACK.
    pub fn result(self) -> Result<Self, Nack> {
        match &self.nack {
            None => Ok(self),
            Some(n) => Err(n.clone()),
        }
    }
}

/// Connection state of the control-plane source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceState {
    #[default]
    Connecting,
    Connected,
    Disconnected,
}

pub struct Core {
    state: XdsState,
    /// The datapath task, which owns the kernel maps.
    kernel: DatapathHandle,
    /// Types accepted at least once since start.
    synced: BTreeSet<Kind>,
    /// The whole table has been handed to the datapath once (later writes are
    /// the changed services only).
    sent_table: bool,
    /// The count of writes sent once the first that carried the control
    /// plane's table was handed over (`None` before): ready when the kernel has
    /// handled that many.
    synced_write: Option<u64>,
    source: SourceState,
    /// Responses of types sockmesh does not consume.
    ignored_types: u64,
    /// Documents the source could not read or parse (a file with a syntax error, a
    /// REST body that is not JSON): nothing reached the state.
    source_errors: u64,
    source_last_error: Option<String>,
    /// Nested `Any`s of types sockmesh does not know, carried opaquely by the text
    /// sources, by type URL (see [`super::opaque`]).
    opaque_types: super::opaque::OpaqueTypes,
    /// Fields of text documents sockmesh does not know, ignored, by
    /// `Message.field` (at most [`UNKNOWN_FIELDS_LISTED`], the rest counted under
    /// [`OTHER_UNKNOWN_FIELDS`]).
    unknown_fields: super::unknown::UnknownFields,
    /// Resolution of the DNS clusters, by cluster name.
    dns: BTreeMap<String, DnsStatus>,
    /// The control-plane connection, for `/config_dump` and `/metrics`.
    connection: crate::admin_types::ConnectionDump,
    /// The DNS clusters to resolve, for the resolver task (see [`super::dns`]).
    dns_targets: watch::Sender<BTreeMap<String, DnsTarget>>,
    /// What the admin server reads, published after every change (see
    /// [`super::view`]).
    view: watch::Sender<Arc<CoreView>>,
    /// The places of the endpoints of the table's services with priority
    /// levels, kept in step with the table (see [`Self::refresh_places`]).
    places: Arc<BTreeMap<ServiceAddr, Arc<Places>>>,
    /// See [`EDS_PART`].
    eds_part: usize,
}

/// Runs `f` on the core under its lock, without holding up the runtime's other
/// tasks: on a worker of a multi-thread runtime the worker first hands its queue
/// to another thread (`block_in_place`), since an update's decoding, validation
/// and translation take seconds at 100,000 services. `None` if the lock is
/// poisoned.
pub fn locked<R>(core: &std::sync::Mutex<Core>, f: impl FnOnce(&mut Core) -> R) -> Option<R> {
    let run = || core.lock().ok().map(|mut c| f(&mut c));
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(run)
        }
        _ => run(),
    }
}

/// How one DNS cluster's resolution goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsStatus {
    /// Rounds of resolution of all its host names.
    pub resolutions: u64,
    /// Host-name resolutions that failed (timeouts, SERVFAIL, REFUSED, ...).
    pub failures: u64,
    pub last_error: Option<String>,
    /// Answers refused (none are since answers beyond the maps' room make the
    /// service limited instead: kept for the dump's shape).
    pub refused: u64,
}

impl Core {
    /// A core over the datapath task `kernel`. The table the datapath already
    /// holds (pins adopted after a restart) seeds the state, so services keep their
    /// backends until the control plane has been heard from, and warming services
    /// do not flap to empty.
    pub fn new(mut kernel: DatapathHandle) -> Self {
        let mut state = XdsState::with_previous(kernel.take_adopted());
        state.set_limits(kernel.limits());
        let core = Self {
            state,
            kernel,
            synced: BTreeSet::new(),
            sent_table: false,
            synced_write: None,
            source: SourceState::Connecting,
            ignored_types: 0,
            source_errors: 0,
            source_last_error: None,
            opaque_types: super::opaque::OpaqueTypes::new(),
            unknown_fields: super::unknown::UnknownFields::new(),
            dns: BTreeMap::new(),
            connection: crate::admin_types::ConnectionDump::default(),
            dns_targets: watch::Sender::new(BTreeMap::new()),
            view: watch::Sender::new(Arc::default()),
            places: Arc::default(),
            eds_part: EDS_PART,
        };
        core.publish();
        core
    }

    /// Translates EDS updates in parts of `part` assignments (see [`EDS_PART`]).
    #[cfg(test)]
    pub fn set_eds_part(&mut self, part: usize) {
        self.eds_part = part;
    }

    /// The channels the admin server reads: this core's views and the datapath
    /// task's status.
    pub fn viewer(&self) -> Viewer {
        Viewer::new(
            self.view.subscribe(),
            self.kernel.subscribe(),
            self.kernel.latency(),
        )
    }

    /// The view of the core as it is now (what [`Self::viewer`] receives after
    /// this core's next change).
    pub fn view(&self) -> View {
        View {
            core: Arc::new(self.core_view()),
            kernel: self.kernel.status(),
            latency: self.kernel.latency(),
        }
    }

    fn core_view(&self) -> CoreView {
        let state = &self.state;
        let dns_answers = self
            .dns_targets
            .borrow()
            .keys()
            .map(|c| (c.clone(), state.dns_answers(c).cloned()))
            .collect();
        CoreView {
            source: self.source,
            synced: self.synced(),
            source_errors: self.source_errors,
            source_last_error: self.source_last_error.clone(),
            ignored_types: self.ignored_types,
            opaque_types: self.opaque_types.clone(),
            unknown_fields: self.unknown_fields.clone(),
            connection: self.connection.clone(),
            dns_status: self.dns.clone(),
            dns_answers,
            stats: state.stats().clone(),
            refused: state.refused().clone(),
            left_alone: state.left_alone(),
            warming: state.warming(),
            passthrough: state.passthrough(),
            unhashable: state.unhashable(),
            limited: state
                .limited()
                .iter()
                .map(|(s, l)| crate::admin_types::LimitedDump {
                    service: s.to_string(),
                    reason: l.limit.label().to_owned(),
                    endpoints: l.endpoints,
                    programmed: l.programmed,
                    why: l.why.clone(),
                })
                .collect(),
            limits: self.kernel.limits(),
            sent: self.kernel.sent(),
            synced_write: self.synced_write.unwrap_or(0),
            state_sizes: self.state_sizes(),
            places: self.places.clone(),
            table: Arc::downgrade(state.shared_table()),
        }
    }

    /// Publishes the core's view for the admin server.
    fn publish(&self) {
        self.view.send_replace(Arc::new(self.core_view()));
    }

    /// The configuration source's connection changed.
    pub fn set_source(&mut self, source: SourceState) {
        if self.source != source {
            self.source = source;
            self.publish();
        }
    }

    /// How the agent reaches its control plane, for `/config_dump`.
    pub fn set_connection(&mut self, connection: crate::admin_types::ConnectionDump) {
        self.connection = connection;
        self.publish();
    }

    /// Counts a response of a type sockmesh does not consume.
    pub fn ignored_type(&mut self) {
        self.ignored_types += 1;
        self.publish();
    }

    /// Fields of text documents ignored so far, by `Message.field`.
    pub fn unknown_fields(&self) -> &super::unknown::UnknownFields {
        &self.unknown_fields
    }

    /// This node's identity, which seeds the endpoint subsets of services with
    /// more endpoints than one may have (see `fit::subset`).
    pub fn set_node_id(&mut self, node_id: &str) {
        self.state.set_subset_seed(node_id);
    }

    /// The DNS clusters to resolve, as they change.
    pub fn dns_targets(&self) -> watch::Receiver<BTreeMap<String, DnsTarget>> {
        self.dns_targets.subscribe()
    }

    /// A round of resolution of a DNS cluster (`answers`: its host names'
    /// addresses, the last good ones where this round failed), from the agent's
    /// resolver: counted, and the table follows.
    pub fn handle_dns(
        &mut self,
        cluster: &str,
        target: &DnsTarget,
        answers: DnsAnswers,
        round: &Round,
        received: Instant,
    ) {
        // A round resolved for a target that has since changed (other hosts,
        // family or resolvers) is dropped: its task is being replaced.
        if self.dns_targets.borrow().get(cluster) != Some(target) {
            return;
        }
        let status = self.dns.entry(cluster.to_owned()).or_default();
        status.resolutions += 1;
        status.failures += round.failed.len() as u64;
        status.last_error = round.failed.values().next().cloned();
        let accepted = self.state.apply_dns(cluster, answers);
        // Not waited on: the resolver goes on; the status shows a failure.
        drop(self.write_kernel(accepted, received, "dns"));
        self.publish();
    }

    /// Counts what a text document held that was not decoded: opaque nested
    /// `Any`s and unknown fields, each type or field logged the first time.
    pub fn note_text(&mut self, notes: super::decode::TextNotes) {
        for (type_url, n) in notes.opaque {
            if !self.opaque_types.contains_key(&type_url) {
                info!(
                    %type_url,
                    "carrying typed configs of a type sockmesh does not know opaquely (never read)"
                );
            }
            *self.opaque_types.entry(type_url).or_insert(0) += n;
        }
        for (field, n) in notes.unknown_fields {
            let field = if self.unknown_fields.contains_key(&field)
                || self.unknown_fields.len() < UNKNOWN_FIELDS_LISTED
            {
                field
            } else {
                OTHER_UNKNOWN_FIELDS.to_owned()
            };
            if !self.unknown_fields.contains_key(&field) {
                warn!(
                    %field,
                    "ignoring a field sockmesh does not know (as Envoy ignores unknown fields in dynamic configuration)"
                );
            }
            *self.unknown_fields.entry(field).or_insert(0) += n;
        }
        self.publish();
    }

    /// Counts a failed authentication to the control plane (the source logs it).
    pub fn auth_failure(&mut self, failure: &super::auth::AuthFailure) {
        let c = &mut self.connection;
        *c.auth_failures
            .entry(failure.reason.label().to_owned())
            .or_insert(0) += 1;
        c.auth_last_error = Some(failure.detail.clone());
        self.publish();
    }

    /// Records a document the source could not read or parse.
    pub fn source_error(&mut self, error: String) {
        self.source_errors += 1;
        self.source_last_error = Some(error);
        self.publish();
    }

    /// A text source's parsed document: its opaque configs counted, or its error
    /// recorded.
    pub fn document<E: std::fmt::Display>(
        &mut self,
        parsed: Result<(DiscoveryResponse, super::decode::TextNotes), E>,
    ) -> Result<DiscoveryResponse, E> {
        match parsed {
            Ok((resp, notes)) => {
                self.note_text(notes);
                Ok(resp)
            }
            Err(e) => {
                self.source_error(e.to_string());
                Err(e)
            }
        }
    }

    /// What the datapath task reports: what the kernel's maps hold (not what the
    /// state accepted: they differ while a kernel write lags or is in flight),
    /// pushes, failures, the attachment.
    pub fn kernel(&self) -> KernelStatus {
        self.kernel.status()
    }

    /// Writes handed to the datapath task that it has not finished yet.
    pub fn writes_in_flight(&self) -> u64 {
        self.kernel
            .sent()
            .saturating_sub(self.kernel.status().handled)
    }

    /// Update arrival → kernel maps written (shared with `/metrics`).
    pub fn latency(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.kernel.latency()
    }

    /// The datapath maps' capacities.
    pub fn limits(&self) -> crate::dataplane::Limits {
        self.kernel.limits()
    }

    /// Returns once the datapath task has handled everything sent to it.
    pub fn flush(&mut self) -> Written {
        self.kernel.flush()
    }

    /// Stops the datapath task once it has handled what was sent (at exit).
    pub fn stop_datapath(&mut self) {
        self.kernel.stop();
    }

    /// Periodic work: after a failed kernel write, hand the whole table to the
    /// datapath again (the writer diffs it against its mirror of the maps, so only
    /// what lags is written); a pending datapath goes live once its table is
    /// complete, or when the warming timeout runs out.
    pub fn tick(&mut self, now: Instant) {
        // Services the maps had no room for are tried again.
        if self.synced() {
            let healed = self.state.heal();
            if healed.table_changed {
                drop(self.write_kernel(healed, now, "heal"));
            }
        }
        let warming = self.state.warming().len();
        // Only when the task is idle: a retry already queued is not doubled.
        if self.synced() && self.kernel.idle() && self.kernel.status().behind {
            drop(self.kernel.write(
                Write::Table(self.state.shared_table().clone()),
                BTreeSet::new(),
                now,
                warming,
            ));
        }
        self.kernel.tick(warming, now);
        self.publish();
    }

    /// How many entries each of the agent's collections holds: the xDS state's
    /// ([`XdsState::sizes`]) and the core's own per-name bookkeeping.
    pub fn state_sizes(&self) -> BTreeMap<&'static str, usize> {
        let mut out = self.state.sizes();
        out.insert("dns_status", self.dns.len());
        out.insert("opaque_types", self.opaque_types.len());
        out.insert("unknown_fields", self.unknown_fields.len());
        out.insert("places", self.places.len());
        out
    }

    /// Keeps [`Self::places`] in step with the table: the services `changed`
    /// names, or all of them (`None`). Only services with priority levels have
    /// places: decoding an assignment for every service of a large mesh on every
    /// update would cost more than the update.
    fn refresh_places(&mut self, changed: Option<&Changes>) {
        let table = self.state.table();
        let levelled = |s: &ServiceAddr| {
            table
                .services
                .get(s)
                .is_some_and(|service| service.levels.is_some())
        };
        let Some(changes) = changed else {
            let places = table
                .services
                .keys()
                .filter(|s| levelled(s))
                .filter_map(|s| Some((*s, Arc::new(self.state.places(s)?))))
                .collect();
            self.places = Arc::new(places);
            return;
        };
        if !changes
            .keys()
            .any(|s| levelled(s) || self.places.contains_key(s))
        {
            return;
        }
        let places = Arc::make_mut(&mut self.places);
        for s in changes.keys() {
            match levelled(s).then(|| self.state.places(s)).flatten() {
                Some(p) => {
                    places.insert(*s, Arc::new(p));
                }
                None => {
                    places.remove(s);
                }
            }
        }
    }

    pub fn state(&self) -> &XdsState {
        &self.state
    }

    /// Whether the kernel is driven by the control plane yet: LDS and CDS have been
    /// accepted once (until then the adopted table stays as it is).
    pub fn synced(&self) -> bool {
        self.synced.contains(&Kind::Listener) && self.synced.contains(&Kind::Cluster)
    }

    /// Applies what of one update is valid; a change of the table is handed to the
    /// datapath task (see [`Handled::written`]), what was refused is the NACK.
    pub fn handle(&mut self, update: Update, received: Instant) -> Handled {
        let kinds: Vec<Kind> = match &update {
            Update::SotW { kind, .. } | Update::Delta { kind, .. } => vec![*kind],
            Update::Full { .. } => Kind::ALL.to_vec(),
        };
        let size = update.resource_count();
        let result = self.handle_inner(&update, received, kinds);
        self.publish();
        if size >= LARGE_UPDATE {
            // Freeing a 150,000-resource push is hundreds of thousands of
            // deallocations and page returns (80–175 ms of the 50k file's load
            // when the source waited for it). Not after the kernel write: that
            // would hold every part of an initial load until its one write.
            crate::dataplane::task::free_apart(Box::new(update));
        }
        result
    }

    /// Tells the resolver task which DNS clusters there are now (after an update
    /// that changed clusters; an EDS update does not walk them).
    fn publish_dns_targets(&mut self) {
        if !self.state.take_dns_changed() {
            return;
        }
        let targets = self.state.dns_targets();
        self.dns.retain(|c, _| targets.contains_key(c));
        // A target that changed (family, resolvers, hosts) starts from fresh
        // answers: the old ones are not the last good answers of the new question.
        let changed: Vec<String> = {
            let before = self.dns_targets.borrow();
            targets
                .iter()
                .filter(|(c, t)| before.get(*c).is_some_and(|b| b != *t))
                .map(|(c, _)| c.clone())
                .collect()
        };
        for cluster in changed {
            self.state.forget_dns(&cluster);
        }
        self.dns_targets.send_if_modified(|t| {
            let changed = *t != targets;
            *t = targets;
            changed
        });
    }

    /// Hands what an accepted update changed to the datapath task, once the table
    /// is the control plane's. `what` names the update for logs.
    fn write_kernel(&mut self, accepted: Accepted, received: Instant, what: &str) -> Written {
        if accepted.table_changed {
            self.refresh_places(Some(&accepted.changes));
        }
        let behind = self.kernel.status().behind;
        if !self.synced() || !(accepted.table_changed || !self.sent_table || behind) {
            debug!(
                types = what,
                synced = self.synced(),
                "update accepted; table unchanged"
            );
            return Written::none();
        }
        // The first write makes the kernel equal to the whole table (it may hold an
        // adopted one); later writes touch the changed services only, unless an
        // earlier write failed and the kernel has to catch up.
        if !self.sent_table {
            self.refresh_places(None);
        }
        let write = if !self.sent_table || (behind && self.kernel.idle()) {
            Write::Table(self.state.shared_table().clone())
        } else {
            Write::Changes(accepted.changes)
        };
        self.sent_table = true;
        debug!(
            types = what,
            services = self.state.table().services.len(),
            "update accepted; handed to the datapath"
        );
        let warming = self.state.warming().len();
        self.kernel
            .write(write, accepted.removed, received, warming)
    }

    fn handle_inner(&mut self, update: &Update, received: Instant, kinds: Vec<Kind>) -> Handled {
        let what = format!("{kinds:?}");
        let mut parts = match self.state.begin(update, self.eds_part) {
            Ok(parts) => parts,
            Err(whole) => {
                if let Some(nack) = &whole.nack {
                    warn!(types = ?kinds, error = %nack, "update refused (NACK); keeping the last good state");
                }
                return Handled {
                    nack: whole.nack,
                    ..Handled::default()
                };
            }
        };
        // The parts of a large EDS update: each is handed to the datapath task
        // while the next is translated, once the kernel follows the control
        // plane's table. Until then (the first write is the whole table, and
        // readiness waits for it) they are written together at the end.
        let mut carried = Accepted::default();
        let mut subscriptions_changed = false;
        let mut written = Written::none();
        while let Some(part) = self.state.next_part(&mut parts) {
            subscriptions_changed |= part.subscriptions_changed;
            carried.merge(part);
            if parts.remaining() > 0 && self.sent_table && self.synced() {
                let ahead = std::mem::take(&mut carried);
                written = written.then(self.write_kernel(ahead, received, &what));
            }
        }
        carried.subscriptions_changed = subscriptions_changed;
        let applied = self.state.finish(update, parts, carried);
        if let Some(nack) = &applied.nack {
            warn!(
                types = ?kinds,
                refused = applied.refused.len(),
                error = %nack,
                "update applied but for the refused resources (NACK), which keep their last good version"
            );
        }
        for note in self.state.take_new_notes() {
            match note {
                Note::Ignored(line) => warn!("ignored: {line}"),
                Note::LeftAlone(line) => info!("not interpreted: {line}"),
            }
        }
        self.synced.extend(kinds.iter().copied());
        self.publish_dns_targets();
        let subscriptions_changed = applied.accepted.subscriptions_changed;
        // A failed write is counted, shown and retried, not NACKed.
        let written = written.then(self.write_kernel(applied.accepted, received, &what));
        if self.synced_write.is_none() && self.synced() {
            self.synced_write = Some(self.kernel.sent());
        }
        Handled {
            subscriptions_changed,
            written,
            nack: applied.nack,
            refused: applied.refused,
        }
    }
}

#[cfg(test)]
mod tests;
