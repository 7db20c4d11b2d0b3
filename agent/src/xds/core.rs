//! The agent's core: the accepted xDS state and the datapath it drives. Every
//! source calls [`Core::handle`]; it decides ACK or NACK and writes the kernel
//! maps when the table changed.

use std::{
    collections::{BTreeMap, BTreeSet},
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
};

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
    pub source: SourceState,
    /// Responses of types sockmesh does not consume.
    pub ignored_types: u64,
    /// Documents the source could not read or parse (a file with a syntax error, a
    /// REST body that is not JSON): nothing reached the state.
    pub source_errors: u64,
    pub source_last_error: Option<String>,
    /// Nested `Any`s of types sockmesh does not know, carried opaquely by the text
    /// sources, by type URL (see [`super::opaque`]).
    pub opaque_types: super::opaque::OpaqueTypes,
    /// Fields of text documents sockmesh does not know, ignored, by
    /// `Message.field` (at most [`UNKNOWN_FIELDS_LISTED`], the rest counted under
    /// [`OTHER_UNKNOWN_FIELDS`]).
    pub unknown_fields: super::unknown::UnknownFields,
    /// Resolution of the DNS clusters, by cluster name.
    pub dns: BTreeMap<String, DnsStatus>,
    /// The control-plane connection, for `/config_dump` and `/metrics`.
    pub connection: crate::admin_types::ConnectionDump,
    /// The DNS clusters to resolve, for the resolver task (see [`super::dns`]).
    dns_targets: watch::Sender<BTreeMap<String, DnsTarget>>,
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
        Self {
            state,
            kernel,
            synced: BTreeSet::new(),
            sent_table: false,
            source: SourceState::Connecting,
            ignored_types: 0,
            source_errors: 0,
            source_last_error: None,
            opaque_types: super::opaque::OpaqueTypes::new(),
            unknown_fields: super::unknown::UnknownFields::new(),
            dns: BTreeMap::new(),
            connection: crate::admin_types::ConnectionDump::default(),
            dns_targets: watch::Sender::new(BTreeMap::new()),
        }
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
    }

    /// Counts a failed authentication to the control plane (the source logs it).
    pub fn auth_failure(&mut self, failure: &super::auth::AuthFailure) {
        let c = &mut self.connection;
        *c.auth_failures
            .entry(failure.reason.label().to_owned())
            .or_insert(0) += 1;
        c.auth_last_error = Some(failure.detail.clone());
    }

    /// Records a document the source could not read or parse.
    pub fn source_error(&mut self, error: String) {
        self.source_errors += 1;
        self.source_last_error = Some(error);
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
                Write::Table(self.state.table().clone()),
                BTreeSet::new(),
                now,
                warming,
            ));
        }
        self.kernel.tick(warming, now);
    }

    /// How many entries each of the agent's collections holds: the xDS state's
    /// ([`XdsState::sizes`]) and the core's own per-name bookkeeping.
    pub fn state_sizes(&self) -> BTreeMap<&'static str, usize> {
        let mut out = self.state.sizes();
        out.insert("dns_status", self.dns.len());
        out.insert("opaque_types", self.opaque_types.len());
        out.insert("unknown_fields", self.unknown_fields.len());
        out
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
        let result = self.handle_inner(update, received, kinds);
        if size >= LARGE_UPDATE {
            crate::dataplane::task::release_freed_memory();
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
        let write = if !self.sent_table || (behind && self.kernel.idle()) {
            Write::Table(self.state.table().clone())
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

    fn handle_inner(&mut self, update: Update, received: Instant, kinds: Vec<Kind>) -> Handled {
        let applied = self.state.apply(update);
        let whole = applied.nack.is_some() && applied.refused.is_empty();
        if let Some(nack) = &applied.nack {
            if whole {
                warn!(types = ?kinds, error = %nack, "update refused (NACK); keeping the last good state");
            } else {
                warn!(
                    types = ?kinds,
                    refused = applied.refused.len(),
                    error = %nack,
                    "update applied but for the refused resources (NACK), which keep their last good version"
                );
            }
        }
        if whole {
            return Handled {
                nack: applied.nack,
                ..Handled::default()
            };
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
        let written = self.write_kernel(applied.accepted, received, &format!("{kinds:?}"));
        Handled {
            subscriptions_changed,
            written,
            nack: applied.nack,
            refused: applied.refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::model::{Backend, Changes, Protocol, RoutingTable, ServiceAddr};
    use std::time::Duration;

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<(RoutingTable, u32)>>);

    impl TableSink for Fake {
        fn apply(&mut self, table: &RoutingTable) -> Result<usize, SinkError> {
            let mut g = self.0.lock().expect("lock");
            g.0 = table.clone();
            g.1 += 1;
            Ok(1)
        }
        fn apply_changes(&mut self, changes: &Changes) -> Result<usize, SinkError> {
            let mut g = self.0.lock().expect("lock");
            for (s, b) in changes {
                match b {
                    Some(b) => g.0.insert(*s, b.clone()),
                    None => {
                        g.0.services.remove(s);
                    }
                }
            }
            g.1 += 1;
            Ok(1)
        }
        fn table(&self) -> RoutingTable {
            self.0.lock().map(|g| g.0.clone()).unwrap_or_default()
        }
    }

    /// A sink whose writes fail while `failing` is set and which, if `migrating`,
    /// stays pending (built beside another layout's datapath) until activated.
    #[derive(Clone, Default)]
    struct Scripted {
        inner: Fake,
        failing: Arc<Mutex<bool>>,
        migrating: bool,
        activated: Arc<Mutex<Option<RoutingTable>>>,
    }

    impl Scripted {
        fn migrating() -> Self {
            Self {
                migrating: true,
                ..Self::default()
            }
        }

        fn check(&self) -> Result<(), SinkError> {
            if *self.failing.lock().expect("lock") {
                return Err(SinkError::Write(crate::dataplane::WriteError::Snapshot(
                    crate::dataplane::store::StoreError {
                        map: crate::dataplane::store::MapName::Services,
                        op: "update",
                        source: Box::new(std::io::Error::from_raw_os_error(libc::ENOMEM)),
                    },
                )));
            }
            Ok(())
        }
    }

    impl TableSink for Scripted {
        fn apply(&mut self, table: &RoutingTable) -> Result<usize, SinkError> {
            self.check()?;
            self.inner.apply(table)
        }
        fn apply_changes(&mut self, changes: &Changes) -> Result<usize, SinkError> {
            self.check()?;
            self.inner.apply_changes(changes)
        }
        fn table(&self) -> RoutingTable {
            self.inner.table()
        }
        fn pending(&self) -> bool {
            self.migrating && self.activated.lock().is_ok_and(|a| a.is_none())
        }
        fn activate(&mut self) -> Result<Vec<u32>, SinkError> {
            *self.activated.lock().expect("lock") = Some(self.inner.table());
            Ok(vec![1])
        }
    }

    const LDS_TWO: &str = r#"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: a
  address: { socket_address: { address: 10.96.0.1, port_value: 80 } }
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: a } } ] } ]
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: b
  address: { socket_address: { address: 10.96.0.2, port_value: 80 } }
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: b } } ] } ]
"#;
    const CDS_TWO: &str = r#"
resources:
- { "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: a, type: EDS, eds_cluster_config: { eds_config: { ads: {} } } }
- { "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: b, type: EDS, eds_cluster_config: { eds_config: { ads: {} } } }
"#;
    fn eds(names: &[&str]) -> Update {
        let resources: String = names
            .iter()
            .map(|n| {
                format!(
                    r#"
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: {n}
  endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 10.1.4.1, port_value: 80 }} }} }} }} ] }} ]
"#
                )
            })
            .collect();
        sotw(Kind::Endpoint, &format!("resources:{resources}"))
    }

    fn core_over(sink: impl TableSink + 'static) -> Core {
        Core::new(DatapathHandle::spawn(Box::new(sink), false))
    }

    /// Handles `update` and waits for its kernel write.
    fn handle(core: &mut Core, update: Update, t0: Instant) -> Result<(), Nack> {
        core.handle(update, t0).result()?.written.wait_blocking();
        Ok(())
    }

    /// Ticks and waits for what the tick asked of the datapath task.
    fn tick(core: &mut Core, now: Instant) {
        core.tick(now);
        core.flush().wait_blocking();
    }

    /// Services a and b (LDS, CDS), endpoints for a only: b is warming.
    fn sync_only_a(core: &mut Core, t0: Instant) {
        handle(core, sotw(Kind::Cluster, CDS_TWO), t0).expect("cds");
        handle(core, sotw(Kind::Listener, LDS_TWO), t0).expect("lds");
        handle(core, eds(&["a"]), t0).expect("eds a");
    }

    #[test]
    fn a_migrating_datapath_goes_live_only_with_a_complete_table() {
        let sink = Scripted::migrating();
        let mut core = core_over(sink.clone());
        let t0 = Instant::now();
        sync_only_a(&mut core, t0);
        // Service b is still warming: not live yet, even after a while.
        tick(&mut core, t0 + Duration::from_secs(5));
        assert!(core.kernel().migrating, "went live with a warming service");
        handle(&mut core, eds(&["a", "b"]), t0).expect("eds a, b");
        assert!(!core.kernel().migrating);
        let live = sink
            .activated
            .lock()
            .expect("lock")
            .clone()
            .expect("activated");
        assert_eq!(live.services.len(), 2, "went live without b: {live:?}");
    }

    #[test]
    fn a_migrating_datapath_goes_live_after_the_warming_timeout() {
        let sink = Scripted::migrating();
        let mut core = core_over(sink.clone());
        let t0 = Instant::now();
        tick(&mut core, t0 + MIGRATION_WARMING_TIMEOUT * 2);
        assert!(
            core.kernel().migrating,
            "went live before the control plane was heard"
        );
        sync_only_a(&mut core, t0);
        assert!(core.kernel().migrating);
        tick(&mut core, Instant::now() + MIGRATION_WARMING_TIMEOUT);
        assert!(
            !core.kernel().migrating,
            "b never arrives: live after the timeout"
        );
        let live = sink
            .activated
            .lock()
            .expect("lock")
            .clone()
            .expect("activated");
        assert_eq!(live.services.len(), 1);
    }

    #[test]
    fn a_failed_kernel_write_is_accepted_shown_and_caught_up_on_the_next_tick() {
        let sink = Scripted::default();
        let mut core = core_over(sink.clone());
        let t0 = Instant::now();
        sync_only_a(&mut core, t0);
        assert_eq!(sink.table().services.len(), 1);
        *sink.failing.lock().expect("lock") = true;
        handle(&mut core, eds(&["a", "b"]), t0)
            .expect("valid configuration is accepted although the kernel write fails");
        assert!(core.kernel().behind);
        assert_eq!(
            core.kernel().usage.services,
            1,
            "the gauges count what the kernel holds"
        );
        assert_eq!(core.state().table().services.len(), 2);
        tick(&mut core, Instant::now());
        // The write, and the tick's retry of the whole table.
        assert_eq!(core.kernel().write_failures, 2);
        assert_eq!(
            sink.table().services.len(),
            1,
            "nothing written while failing"
        );
        *sink.failing.lock().expect("lock") = false;
        tick(&mut core, Instant::now());
        assert_eq!(
            sink.table(),
            *core.state().table(),
            "the kernel caught up with the accepted table"
        );
        assert_eq!(sink.table().services.len(), 2);
        assert!(!core.kernel().behind);
    }

    /// A sink whose change writes block until the test lets them go.
    struct Gated {
        inner: Fake,
        armed: Arc<std::sync::atomic::AtomicBool>,
        entered: std::sync::mpsc::Sender<()>,
        permits: std::sync::mpsc::Receiver<()>,
    }

    impl TableSink for Gated {
        fn apply(&mut self, table: &RoutingTable) -> Result<usize, SinkError> {
            self.inner.apply(table)
        }
        fn apply_changes(&mut self, changes: &Changes) -> Result<usize, SinkError> {
            if self.armed.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = self.entered.send(());
                let _ = self.permits.recv_timeout(Duration::from_secs(30));
            }
            self.inner.apply_changes(changes)
        }
        fn table(&self) -> RoutingTable {
            self.inner.table()
        }
    }

    #[test]
    fn an_admin_scrape_during_a_kernel_write_returns_while_the_write_runs() {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (permit, permits) = std::sync::mpsc::channel();
        let fake = Fake::default();
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut core = core_over(Gated {
            inner: fake.clone(),
            armed: armed.clone(),
            entered: entered_tx,
            permits,
        });
        let t0 = Instant::now();
        sync_only_a(&mut core, t0);
        core.source = SourceState::Connected;
        armed.store(true, std::sync::atomic::Ordering::SeqCst);
        let core = Arc::new(Mutex::new(core));
        let written = core
            .lock()
            .expect("lock")
            .handle(eds(&["a", "b"]), t0)
            .result()
            .expect("accepted")
            .written;
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the datapath task is inside the write");
        // The scrape runs on another thread; with a lock held over the write it
        // would wait for the write to end, which only the permit below allows.
        let admin = crate::admin::Admin {
            core: core.clone(),
            bpffs: "/nonexistent/sockmesh-test".into(),
            enrollment: None,
        };
        let (answer_tx, answer) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let metrics = crate::admin::route(&admin, "/metrics").status();
            let ready = crate::admin::route(&admin, "/readyz").status();
            let dump = admin
                .core
                .lock()
                .map(|c| crate::admin::config_dump(&c, &Default::default()))
                .unwrap_or_default();
            let _ = answer_tx.send((metrics, ready, dump));
        });
        let (metrics, ready, dump) = answer
            .recv_timeout(Duration::from_secs(10))
            .expect("the scrape returned while the kernel write runs");
        assert_eq!((metrics.as_u16(), ready.as_u16()), (200, 200));
        let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
        assert_eq!(dump["push"]["writes_in_flight"], 1, "{dump}");
        assert_eq!(
            dump["services"].as_array().map(Vec::len),
            Some(2),
            "accepted"
        );
        assert_eq!(fake.table().services.len(), 1, "not written yet");
        permit.send(()).expect("permit");
        written.wait_blocking();
        let core = core.lock().expect("lock");
        assert_eq!(core.writes_in_flight(), 0);
        assert_eq!(core.kernel().usage.services, 2);
        assert_eq!(fake.table().services.len(), 2);
    }

    fn sotw(kind: Kind, yaml: &str) -> Update {
        crate::xds::tests::sotw(kind, "1", yaml)
    }

    #[test]
    fn adopted_table_is_kept_until_lds_and_cds_arrive_and_warming_keeps_it() {
        let svc = ServiceAddr {
            vip: "10.96.0.12".parse().expect("ip"),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let old = Backend::new("10.1.9.9".parse().expect("ip"), 80);
        let fake = Fake::default();
        fake.0.lock().expect("lock").0.insert(svc, vec![old]);
        let mut core = core_over(fake.clone());
        let cds = r#"
resources:
- { "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: c, type: EDS, eds_cluster_config: { eds_config: { ads: {} } } }
"#;
        handle(&mut core, sotw(Kind::Cluster, cds), Instant::now()).expect("cds");
        assert_eq!(
            fake.0.lock().expect("lock").1,
            0,
            "nothing written before LDS"
        );
        let lds = r#"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: l
  address: { socket_address: { address: 10.96.0.12, port_value: 80 } }
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: c } } ] } ]
"#;
        handle(&mut core, sotw(Kind::Listener, lds), Instant::now()).expect("lds");
        assert_eq!(
            fake.0.lock().expect("lock").0.services[&svc],
            [old],
            "service warming (no EDS yet) keeps the adopted backends"
        );
        let eds = r#"
resources:
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: c
  endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.1.4.1, port_value: 80 } } } } ] } ]
"#;
        handle(&mut core, sotw(Kind::Endpoint, eds), Instant::now()).expect("eds");
        assert_eq!(
            fake.0.lock().expect("lock").0.services[&svc],
            [Backend::new("10.1.4.1".parse().expect("ip"), 80)]
        );
    }
}
