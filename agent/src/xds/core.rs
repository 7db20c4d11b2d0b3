//! The agent's core: the accepted xDS state and the datapath it drives. Every
//! source calls [`Core::handle`]; it decides ACK or NACK and writes the kernel
//! maps when the table changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::model::Endpoint;

use super::{
    clusters::{DnsAnswers, DnsTarget},
    decode::Kind,
    dns::Round,
    incremental::Changes,
    state::{Accepted, Nack, Update, XdsState},
};
use crate::model::RoutingTable;

/// Why the datapath could not do what the core asked.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Write(#[from] crate::dataplane::WriteError),
    #[error(transparent)]
    Datapath(#[from] crate::dataplane::DataplaneError),
    #[error(transparent)]
    Destroy(#[from] crate::dataplane::destroy::DestroyError),
}

/// An error with its sources, `outer: inner: …`, for logs and `/config_dump`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// Where accepted tables go: the kernel datapath, or a fake in tests.
pub trait TableSink: Send {
    /// Makes the datapath hold `table`; returns the number of map operations.
    fn apply(&mut self, table: &RoutingTable) -> Result<usize, SinkError>;
    /// Changes some services only (`None`: remove).
    fn apply_changes(&mut self, changes: &Changes) -> Result<usize, SinkError>;
    /// What the datapath holds now (adopted from pins on restart).
    fn table(&self) -> RoutingTable;
    /// What the datapath's maps hold, counted (cheap: for gauges).
    fn usage(&self) -> crate::model::Usage {
        crate::model::Usage::of_table(&self.table())
    }
    /// The maps' capacities (updates beyond them are NACKed).
    fn limits(&self) -> crate::dataplane::Limits {
        crate::dataplane::Limits::default()
    }
    /// Aborts sockets redirected to removed endpoints; returns how many.
    fn terminate(&mut self, _targets: &BTreeSet<Endpoint>) -> Result<usize, SinkError> {
        Ok(0)
    }
    /// Whether the datapath is built but not attached yet, because another pin
    /// layout's datapath serves meanwhile (an upgrade that changed the map layout).
    fn pending(&self) -> bool {
        false
    }
    /// Attaches a pending datapath and removes the other layout's; returns the
    /// layout versions retired.
    fn activate(&mut self) -> Result<Vec<u32>, SinkError> {
        Ok(Vec::new())
    }
    /// How the programs came to be attached (`None`: a sink without a kernel).
    fn attachment(&self) -> Option<crate::dataplane::Attachment> {
        None
    }
    /// The other pin layouts this datapath detached and removed.
    fn retired(&self) -> Vec<u32> {
        Vec::new()
    }
}

fn status_refused(dns: &mut BTreeMap<String, DnsStatus>, cluster: &str, why: &str) {
    let status = dns.entry(cluster.to_owned()).or_default();
    status.refused += 1;
    status.last_error = Some(format!("answers refused: {why}"));
}

impl TableSink for crate::dataplane::Datapath {
    fn apply(&mut self, table: &RoutingTable) -> Result<usize, SinkError> {
        Ok(crate::dataplane::Datapath::apply(self, table)?.map_ops)
    }

    fn apply_changes(&mut self, changes: &Changes) -> Result<usize, SinkError> {
        Ok(crate::dataplane::Datapath::apply_changes(self, changes)?.map_ops)
    }

    fn table(&self) -> RoutingTable {
        crate::dataplane::Datapath::table(self)
    }

    fn limits(&self) -> crate::dataplane::Limits {
        crate::dataplane::Datapath::limits(self)
    }

    fn usage(&self) -> crate::model::Usage {
        crate::dataplane::Datapath::usage(self)
    }

    fn terminate(&mut self, targets: &BTreeSet<Endpoint>) -> Result<usize, SinkError> {
        Ok(crate::dataplane::Datapath::terminate(self, targets)?.destroyed)
    }

    fn pending(&self) -> bool {
        self.is_pending()
    }

    fn activate(&mut self) -> Result<Vec<u32>, SinkError> {
        Ok(crate::dataplane::Datapath::activate(self)?
            .map(|m| m.retired)
            .unwrap_or_default())
    }

    fn attachment(&self) -> Option<crate::dataplane::Attachment> {
        Some(crate::dataplane::Datapath::attachment(self))
    }

    fn retired(&self) -> Vec<u32> {
        crate::dataplane::Datapath::retired(self).to_vec()
    }
}

/// A kernel write that failed: the kernel lags the accepted table until a retry
/// succeeds.
#[derive(Debug, thiserror::Error)]
#[error("writing the kernel maps failed")]
pub struct KernelLag(#[source] SinkError);

/// Timing of the last kernel write, for logs, metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct PushStats {
    pub pushes: u64,
    pub last_map_ops: usize,
    /// Update received → kernel maps written.
    pub last_latency: Duration,
}

/// Buckets of the update → kernel latency histogram (seconds): 50 µs … 1 s.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0,
];

/// How long a datapath built beside another layout's waits for warming services
/// (clusters or endpoints not received yet) before it goes live anyway, as Envoy's
/// `initial_fetch_timeout` (15 s) bounds its own warming.
pub const MIGRATION_WARMING_TIMEOUT: Duration = Duration::from_secs(15);

/// An update with this many resources (an initial push, a full SotW of a big
/// mesh) leaves megabytes freed but held by the allocator: see
/// [`release_freed_memory`].
const LARGE_UPDATE: usize = 1_000;

/// Hands memory freed after a large update back to the kernel. glibc keeps freed
/// heap in its arenas, so the transient peak of decoding a 50,000-service push
/// would otherwise stay resident for the agent's lifetime.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; no Rust invariant involved.
    unsafe {
        libc::malloc_trim(0);
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
    sink: Box<dyn TableSink>,
    /// Types accepted at least once since start.
    synced: BTreeSet<Kind>,
    pushed: bool,
    pub push: PushStats,
    pub source: SourceState,
    /// Responses of types sockmesh does not consume.
    pub ignored_types: u64,
    /// Abort sockets connected to endpoints removed from a service.
    pub terminate_removed: bool,
    /// Sockets aborted so far.
    pub terminated: u64,
    /// Update arrival → kernel maps written (shared with `/metrics`).
    pub latency: prometheus_client::metrics::histogram::Histogram,
    /// While the datapath is pending (a layout migration): when the control plane's
    /// table was first written, which starts the warming timeout.
    first_push: Option<Instant>,
    /// A kernel write failed: the maps lag the accepted table until a whole-table
    /// write succeeds (next update, or the next tick).
    kernel_behind: bool,
    /// Kernel writes that failed.
    pub kernel_write_failures: u64,
    /// Documents the source could not read or parse (a file with a syntax error, a
    /// REST body that is not JSON): nothing reached the state.
    pub source_errors: u64,
    pub source_last_error: Option<String>,
    /// Nested `Any`s of types sockmesh does not know, carried opaquely by the text
    /// sources, by type URL (see [`super::opaque`]).
    pub opaque_types: super::opaque::OpaqueTypes,
    /// Resolution of the DNS clusters, by cluster name.
    pub dns: BTreeMap<String, DnsStatus>,
    /// Endpoints removed by updates whose kernel write failed: their sockets are
    /// closed once the kernel catches up.
    pending_removed: BTreeSet<Endpoint>,
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
    /// Answers refused because the table would break the datapath's limits.
    pub refused: u64,
}

impl Core {
    /// A core over `sink`. The table the datapath already holds (pins adopted after a
    /// restart) seeds the state, so services keep their backends until the control
    /// plane has been heard from, and warming services do not flap to empty.
    pub fn new(sink: Box<dyn TableSink>) -> Self {
        let mut state = XdsState::with_previous(sink.table());
        state.set_limits(sink.limits());
        Self {
            state,
            sink,
            synced: BTreeSet::new(),
            pushed: false,
            push: PushStats::default(),
            source: SourceState::Connecting,
            ignored_types: 0,
            terminate_removed: false,
            terminated: 0,
            latency: prometheus_client::metrics::histogram::Histogram::new(LATENCY_BUCKETS),
            first_push: None,
            kernel_behind: false,
            kernel_write_failures: 0,
            source_errors: 0,
            source_last_error: None,
            opaque_types: super::opaque::OpaqueTypes::new(),
            dns: BTreeMap::new(),
            pending_removed: BTreeSet::new(),
            dns_targets: watch::Sender::new(BTreeMap::new()),
        }
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
        match self.state.apply_dns(cluster, answers) {
            Ok(accepted) => {
                if let Err(e) = self.write_kernel(&accepted, received, "dns") {
                    warn!(cluster, error = %chain(&e), "DNS answers accepted; the kernel write failed");
                }
            }
            Err(e) => {
                status_refused(&mut self.dns, cluster, &e);
                warn!(cluster, error = %e, "DNS answers refused; keeping the last good addresses");
            }
        }
    }

    /// Counts the opaque nested `Any`s of a document; a type seen for the first
    /// time is logged.
    pub fn note_opaque(&mut self, found: super::opaque::OpaqueTypes) {
        for (type_url, n) in found {
            if !self.opaque_types.contains_key(&type_url) {
                info!(
                    %type_url,
                    "carrying typed configs of a type sockmesh does not know opaquely (never read)"
                );
            }
            *self.opaque_types.entry(type_url).or_insert(0) += n;
        }
    }

    /// Records a document the source could not read or parse.
    pub fn source_error(&mut self, error: String) {
        self.source_errors += 1;
        self.source_last_error = Some(error);
    }

    /// How the datapath's programs came to be attached.
    pub fn attachment(&self) -> Option<crate::dataplane::Attachment> {
        self.sink.attachment()
    }

    /// The other pin layouts the datapath retired.
    pub fn retired(&self) -> Vec<u32> {
        self.sink.retired()
    }

    /// What the kernel's maps hold (not what the state accepted: they differ
    /// while a kernel write lags).
    pub fn kernel_usage(&self) -> crate::model::Usage {
        self.sink.usage()
    }

    /// Whether the kernel lags the accepted table (a write failed; retried every
    /// tick).
    pub fn kernel_behind(&self) -> bool {
        self.kernel_behind
    }

    /// The datapath maps' capacities.
    pub fn limits(&self) -> crate::dataplane::Limits {
        self.sink.limits()
    }

    /// Whether the datapath waits to go live (a layout migration in progress).
    pub fn migrating(&self) -> bool {
        self.sink.pending()
    }

    /// Periodic work: after a failed kernel write, write the whole table again (the
    /// writer diffs it against its mirror of the maps, so only what lags is
    /// written); a pending datapath goes live once its table is complete, or when
    /// the warming timeout runs out.
    pub fn tick(&mut self, now: Instant) {
        if self.kernel_behind && self.synced() {
            match self.sink.apply(self.state.table()) {
                Ok(ops) => {
                    self.kernel_behind = false;
                    self.pushed = true;
                    info!(
                        map_ops = ops,
                        "kernel maps caught up with the accepted table"
                    );
                    let removed = std::mem::take(&mut self.pending_removed);
                    self.terminate(&removed);
                }
                Err(e) => {
                    self.kernel_write_failures += 1;
                    warn!(error = %chain(&e), "writing the kernel maps failed again; retrying");
                }
            }
        }
        if !self.sink.pending() || !self.pushed || self.kernel_behind {
            return;
        }
        let warming = self.state.warming().len();
        let timed_out = self
            .first_push
            .is_some_and(|t| now.duration_since(t) >= MIGRATION_WARMING_TIMEOUT);
        if warming > 0 && !timed_out {
            return;
        }
        if warming > 0 {
            warn!(
                warming,
                "going live although some services are still warming (no cluster or endpoints yet)"
            );
        }
        match self.sink.activate() {
            Ok(retired) => info!(
                ?retired,
                services = self.state.table().services.len(),
                "datapath attached; the other pin layouts' programs detached and pins removed"
            ),
            Err(e) => tracing::error!(
                error = %chain(&e),
                "attaching the new datapath failed; the old layout keeps serving, retrying"
            ),
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

    /// Accepts (and pushes to the kernel) or rejects one update.
    pub fn handle(&mut self, update: Update, received: Instant) -> Result<Accepted, Nack> {
        let kinds: Vec<Kind> = match &update {
            Update::SotW { kind, .. } | Update::Delta { kind, .. } => vec![*kind],
            Update::Full { .. } => Kind::ALL.to_vec(),
        };
        let size = update.resource_count();
        let result = self.handle_inner(update, received, kinds);
        if size >= LARGE_UPDATE {
            release_freed_memory();
        }
        result
    }

    /// With `--terminate-removed-connections`, aborts the sockets redirected to
    /// `removed` endpoints (once the kernel no longer selects them).
    fn terminate(&mut self, removed: &BTreeSet<Endpoint>) {
        if !self.terminate_removed || removed.is_empty() {
            return;
        }
        match self.sink.terminate(removed) {
            Ok(n) => {
                self.terminated += n as u64;
                info!(
                    endpoints = removed.len(),
                    sockets = n,
                    "closed sockets of removed endpoints"
                );
            }
            Err(e) => warn!(error = %chain(&e), "closing sockets of removed endpoints failed"),
        }
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

    /// Writes what an accepted update changed into the kernel, once the table is
    /// the control plane's. `what` names the update for logs.
    fn write_kernel(
        &mut self,
        accepted: &Accepted,
        received: Instant,
        what: &str,
    ) -> Result<(), KernelLag> {
        if self.synced() && (accepted.table_changed || !self.pushed || self.kernel_behind) {
            // The first write makes the kernel equal to the whole table (it may hold
            // an adopted one); later writes touch the changed services only, unless
            // an earlier write failed and the kernel has to catch up.
            let result = if self.pushed && !self.kernel_behind {
                self.sink.apply_changes(&accepted.changes)
            } else {
                self.sink.apply(self.state.table())
            };
            // The update is valid and stays accepted (the control plane is not told
            // "rejected" for the node's own trouble); the kernel lags, which
            // /readyz, /metrics and /config_dump show, and is brought up to the
            // accepted table by the next update or tick.
            let ops = result.map_err(|e| {
                self.kernel_behind = true;
                self.kernel_write_failures += 1;
                // Their sockets are closed once the kernel has caught up.
                self.pending_removed.extend(accepted.removed.iter().copied());
                warn!(error = %chain(&e), "writing the kernel maps failed; retrying the whole table every second");
                KernelLag(e)
            })?;
            self.kernel_behind = false;
            self.pushed = true;
            self.first_push.get_or_insert(received);
            self.push = PushStats {
                pushes: self.push.pushes + 1,
                last_map_ops: ops,
                last_latency: received.elapsed(),
            };
            self.latency.observe(self.push.last_latency.as_secs_f64());
            let mut removed = std::mem::take(&mut self.pending_removed);
            removed.extend(accepted.removed.iter().copied());
            self.terminate(&removed);
            info!(
                types = what,
                services = self.state.table().services.len(),
                map_ops = ops,
                latency_us = self.push.last_latency.as_micros(),
                "routing table applied"
            );
        } else {
            debug!(
                types = what,
                synced = self.synced(),
                "update accepted; table unchanged"
            );
        }
        Ok(())
    }

    fn handle_inner(
        &mut self,
        update: Update,
        received: Instant,
        kinds: Vec<Kind>,
    ) -> Result<Accepted, Nack> {
        let accepted = match self.state.apply(update) {
            Ok(a) => a,
            Err(nack) => {
                warn!(types = ?kinds, error = %nack, "update rejected (NACK); keeping the last good state");
                return Err(nack);
            }
        };
        for line in self.state.take_new_ignored() {
            warn!("ignored: {line}");
        }
        self.synced.extend(kinds.iter().copied());
        self.publish_dns_targets();
        // A failed write is counted, shown and retried, not NACKed.
        let _ = self.write_kernel(&accepted, received, &format!("{kinds:?}"));
        self.tick(Instant::now());
        Ok(accepted)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::model::{Backend, Protocol, ServiceAddr};

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

    /// Services a and b (LDS, CDS), endpoints for a only: b is warming.
    fn sync_only_a(core: &mut Core, t0: Instant) {
        core.handle(sotw(Kind::Cluster, CDS_TWO), t0).expect("cds");
        core.handle(sotw(Kind::Listener, LDS_TWO), t0).expect("lds");
        core.handle(eds(&["a"]), t0).expect("eds a");
    }

    #[test]
    fn a_migrating_datapath_goes_live_only_with_a_complete_table() {
        let sink = Scripted::migrating();
        let mut core = Core::new(Box::new(sink.clone()));
        let t0 = Instant::now();
        sync_only_a(&mut core, t0);
        // Service b is still warming: not live yet, even after a while.
        core.tick(t0 + Duration::from_secs(5));
        assert!(core.migrating(), "went live with a warming service");
        core.handle(eds(&["a", "b"]), t0).expect("eds a, b");
        assert!(!core.migrating());
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
        let mut core = Core::new(Box::new(sink.clone()));
        let t0 = Instant::now();
        core.tick(t0 + MIGRATION_WARMING_TIMEOUT * 2);
        assert!(
            core.migrating(),
            "went live before the control plane was heard"
        );
        sync_only_a(&mut core, t0);
        assert!(core.migrating());
        core.tick(Instant::now() + MIGRATION_WARMING_TIMEOUT);
        assert!(!core.migrating(), "b never arrives: live after the timeout");
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
        let mut core = Core::new(Box::new(sink.clone()));
        let t0 = Instant::now();
        sync_only_a(&mut core, t0);
        assert_eq!(sink.table().services.len(), 1);
        *sink.failing.lock().expect("lock") = true;
        core.handle(eds(&["a", "b"]), t0)
            .expect("valid configuration is accepted although the kernel write fails");
        assert!(core.kernel_behind());
        assert_eq!(
            core.kernel_usage().services,
            1,
            "the gauges count what the kernel holds"
        );
        assert_eq!(core.state().table().services.len(), 2);
        core.tick(Instant::now());
        // The write, the retry at the end of handling, the tick's retry.
        assert_eq!(core.kernel_write_failures, 3);
        assert_eq!(
            sink.table().services.len(),
            1,
            "nothing written while failing"
        );
        *sink.failing.lock().expect("lock") = false;
        core.tick(Instant::now());
        assert_eq!(
            sink.table(),
            *core.state().table(),
            "the kernel caught up with the accepted table"
        );
        assert_eq!(sink.table().services.len(), 2);
        assert!(!core.kernel_behind());
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
        let mut core = Core::new(Box::new(fake.clone()));
        let cds = r#"
resources:
- { "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: c, type: EDS, eds_cluster_config: { eds_config: { ads: {} } } }
"#;
        core.handle(sotw(Kind::Cluster, cds), Instant::now())
            .expect("cds");
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
        core.handle(sotw(Kind::Listener, lds), Instant::now())
            .expect("lds");
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
        core.handle(sotw(Kind::Endpoint, eds), Instant::now())
            .expect("eds");
        assert_eq!(
            fake.0.lock().expect("lock").0.services[&svc],
            [Backend::new("10.1.4.1".parse().expect("ip"), 80)]
        );
    }
}
