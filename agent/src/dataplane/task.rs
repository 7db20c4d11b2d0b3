//! The datapath task: the one owner of the kernel maps.
//!
//! The xDS core stages and checks every update, commits it, and hands what changed
//! to this task over a channel ([`DatapathHandle::write`]). The task runs on its own
//! thread, because everything it does is blocking kernel I/O: map writes, the
//! retry of a write that failed, a layout migration going live, and the socket
//! sweep of `--terminate-removed-connections` across every network namespace. No
//! lock is held meanwhile: the core goes on with the next update, and the admin
//! server reads the task's [`KernelStatus`] from a `watch` channel.
//!
//! Commands are handled in the order sent, so the kernel sees updates in the order
//! they were accepted. Each write returns a [`Written`] the sender may wait on
//! (the ADS client does, so an ACK follows the kernel write).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::model::{Changes, Endpoint, RoutingTable, Usage};

use super::{Attachment, EnrollReport, Limits};

/// Why the datapath could not do what the core asked.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Write(#[from] super::WriteError),
    #[error(transparent)]
    Datapath(#[from] super::DataplaneError),
    #[error(transparent)]
    Destroy(#[from] super::destroy::DestroyError),
    #[error("the datapath task has stopped")]
    Stopped,
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
    fn usage(&self) -> Usage {
        Usage::of_table(&self.table())
    }
    /// The maps' capacities (updates beyond them are NACKed).
    fn limits(&self) -> Limits {
        Limits::default()
    }
    /// How full each map is; with `recount`, the maps the kernel programs fill
    /// are counted again if their turn has come (the task's tick).
    fn map_fill(&mut self, _recount: bool) -> Vec<super::fill::MapFill> {
        super::fill::from_usage(&self.usage(), &self.limits())
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
    fn attachment(&self) -> Option<Attachment> {
        None
    }
    /// The other pin layouts this datapath detached and removed.
    fn retired(&self) -> Vec<u32> {
        Vec::new()
    }
    /// Deletes idle open-connection counts of endpoints gone; returns how many.
    fn sweep_conns(&mut self) -> Result<usize, SinkError> {
        Ok(0)
    }
    /// Deletes health entries of endpoints their service no longer has; returns
    /// how many.
    fn sweep_endpoint_health(&mut self) -> Result<usize, SinkError> {
        Ok(0)
    }
    /// The kernel's outlier state (`None`: a sink without a kernel).
    fn health(&self) -> Option<super::HealthReport> {
        None
    }
    /// Rewrites the choice tables of services with priority levels to the
    /// ejections running now (all of them, or `only`); returns when the first
    /// of those ejections ends (`CLOCK_MONOTONIC` ns).
    fn refresh_levels(
        &mut self,
        _only: Option<&[sockmesh_common::ServiceKey]>,
    ) -> Result<Option<u64>, SinkError> {
        Ok(None)
    }
    /// The levels of the services that have them, as written: of all, or
    /// `previous` with `only` those services' brought up to date (see
    /// [`super::published`]).
    fn published_levels(
        &self,
        _only: Option<&BTreeSet<crate::model::ServiceAddr>>,
        _previous: &super::published::PublishedMap,
    ) -> super::published::PublishedMap {
        super::published::PublishedMap::new()
    }
    /// The kernel programs' events (ejections), handed over once to the thread
    /// that reads them.
    fn take_events(&mut self) -> Option<super::events::Events> {
        None
    }

    /// Makes the enrolled cgroups `cgroups` (see [`super::Datapath::enroll`]).
    fn enroll(
        &mut self,
        _cgroups: &BTreeSet<PathBuf>,
        _prune: bool,
    ) -> Result<EnrollReport, SinkError> {
        Err(SinkError::Datapath(super::DataplaneError::NotEnrolling))
    }
}

/// Buckets of the update → kernel latency histogram (seconds): 50 µs … 1 s.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0,
];

/// How long a datapath built beside another layout's waits for warming services
/// (clusters or endpoints not received yet) before it goes live anyway, as Envoy's
/// `initial_fetch_timeout` (15 s) bounds its own warming.
pub const MIGRATION_WARMING_TIMEOUT: Duration = Duration::from_secs(15);

/// Ticks (about a second each) between sweeps of idle connection counts and of
/// health entries of endpoints gone.
const SWEEP_TICKS: u64 = 60;

/// A kernel write of this many map operations (an initial load) leaves its
/// planning buffers freed but held by the allocator: see [`release_freed_memory`].
const LARGE_WRITE: usize = 10_000;

/// Hands memory freed after a large update back to the kernel at once: the
/// transient peak of decoding and writing a 50,000-service push does not stay
/// resident. The agent's jemalloc options (`src/main.rs`) already return free
/// pages at once; this covers a decay time set in `_RJEM_MALLOC_CONF`. In a
/// binary not on jemalloc (a test) it purges jemalloc's unused arenas: nothing.
pub(crate) fn release_freed_memory() {
    // `arena.<MALLCTL_ARENAS_ALL>.purge`: every arena's unused dirty pages.
    const PURGE_ALL: &[u8] = b"arena.4096.purge\0";
    // SAFETY: the name is NUL-terminated and `purge` takes no value (unit).
    if let Err(e) = unsafe { tikv_jemalloc_ctl::raw::write(PURGE_ALL, ()) } {
        tracing::debug!(error = %e, "jemalloc purge");
    }
}

/// Drops `garbage` (a large update's resources) on a thread of its own at the
/// lowest priority, then hands the freed pages back to the kernel (see
/// [`release_freed_memory`]): the deallocations and page returns do not hold up
/// the update's source, and yield the cores to the work that follows.
pub(crate) fn free_apart(garbage: Box<dyn Send>) {
    let freed = move || {
        // SAFETY: `setpriority` reads its plain integer arguments only; `gettid`
        // names this thread. A failure leaves the thread at its priority.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
        }
        drop(garbage);
        release_freed_memory();
    };
    // A thread that cannot start drops the closure, and with it the garbage, here.
    if std::thread::Builder::new()
        .name("sockmesh-free".into())
        .spawn(freed)
        .is_err()
    {
        release_freed_memory();
    }
}

/// The allocator's bytes allocated to the agent and resident (what the RSS holds
/// of the heap), when the agent runs on jemalloc.
pub fn heap_bytes() -> Option<(usize, usize)> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    Some((
        tikv_jemalloc_ctl::stats::allocated::read().ok()?,
        tikv_jemalloc_ctl::stats::resident::read().ok()?,
    ))
}

/// Timing of the last kernel write, for logs, metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushStats {
    pub pushes: u64,
    pub last_map_ops: usize,
    /// Update received → kernel maps written.
    pub last_latency: Duration,
}

/// What the kernel holds and how the task is doing, published after every
/// command: `/readyz`, `/metrics` and `/config_dump` read it without a lock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelStatus {
    /// A write failed: the maps lag the accepted table until a whole-table write
    /// succeeds.
    pub behind: bool,
    pub push: PushStats,
    /// Kernel writes that failed.
    pub write_failures: u64,
    /// Sockets aborted so far (`--terminate-removed-connections`).
    pub terminated: u64,
    /// What the maps hold, counted.
    pub usage: Usage,
    /// How full each map is.
    pub maps: Vec<super::fill::MapFill>,
    pub attachment: Option<Attachment>,
    pub retired: Vec<u32>,
    /// Built beside another layout's datapath, waiting to go live.
    pub migrating: bool,
    /// Commands handled so far (see [`DatapathHandle::sent`]).
    pub handled: u64,
    /// Enrolled cgroups with the programs attached (enrollment only).
    pub enrolled_cgroups: usize,
    /// The services with priority levels, as written: their choice tables follow
    /// the ejections, so this is published after each rewrite too.
    pub levels: std::sync::Arc<super::published::PublishedMap>,
}

/// What to write.
#[derive(Debug)]
pub enum Write {
    /// Make the maps hold this whole table (the first write, and the catch-up
    /// after a failed one; the writer diffs it against its mirror of the maps).
    /// Shared with the core's state, which copies it only if it changes the
    /// table while the write runs.
    Table(std::sync::Arc<RoutingTable>),
    /// Change these services only.
    Changes(Changes),
}

enum Command {
    Write {
        write: Write,
        /// Endpoints removed outright: their sockets are closed once the kernel no
        /// longer selects them.
        removed: BTreeSet<Endpoint>,
        /// When the update arrived (for the latency histogram).
        received: Instant,
        /// Services still warming: a pending datapath goes live only without any,
        /// or after [`MIGRATION_WARMING_TIMEOUT`].
        warming: usize,
        done: oneshot::Sender<()>,
    },
    /// Periodic work: a pending datapath may go live.
    Tick { warming: usize, now: Instant },
    /// Enrollment: attach to these cgroups (and, with `prune`, only these). Sent
    /// by an [`EnrollHandle`], not counted in [`DatapathHandle::sent`].
    Enroll {
        cgroups: BTreeSet<PathBuf>,
        prune: bool,
        done: oneshot::Sender<Result<EnrollReport, SinkError>>,
    },
    /// Answers once every earlier command is handled.
    Flush(oneshot::Sender<()>),
    /// The kernel ejected an endpoint of this service (an event of `SM_EVENTS`).
    Ejected(sockmesh_common::ServiceKey),
    /// Ends the task (other senders, the events thread and the enroller, may
    /// still hold the channel open).
    Stop,
}

/// A write handed to the task; [`Written::wait`] returns once it is in the kernel
/// (or failed, which the status shows).
#[derive(Debug, Default)]
#[must_use = "dropping it does not cancel the write; wait on it to know it is done"]
pub struct Written(Option<oneshot::Receiver<()>>);

impl Written {
    /// Nothing to write.
    pub fn none() -> Self {
        Self(None)
    }

    /// This write, then `later` (handed over after it): waiting for the later
    /// one waits for both, the task writing in order.
    pub fn then(self, later: Written) -> Self {
        if later.0.is_some() { later } else { self }
    }

    /// Waits for the write (from async code).
    pub async fn wait(self) {
        if let Some(rx) = self.0 {
            // An error only means the task has stopped: nothing left to wait for.
            let _ = rx.await;
        }
    }

    /// Waits for the write (from a thread that is not a runtime worker).
    pub fn wait_blocking(self) {
        if let Some(rx) = self.0 {
            let _ = rx.blocking_recv();
        }
    }
}

/// The core's side of the task: sends commands, reads the status.
pub struct DatapathHandle {
    tx: mpsc::Sender<Command>,
    status: watch::Receiver<KernelStatus>,
    limits: Limits,
    adopted: RoutingTable,
    /// Update arrival → kernel maps written (shared with `/metrics`).
    latency: Histogram,
    sent: u64,
    thread: Option<thread::JoinHandle<()>>,
}

impl DatapathHandle {
    /// Starts the task over `sink`. With `terminate_removed`, the sockets of
    /// endpoints removed outright are aborted after each write.
    pub fn spawn(mut sink: Box<dyn TableSink>, terminate_removed: bool) -> Self {
        let limits = sink.limits();
        let adopted = sink.table();
        let latency = Histogram::new(LATENCY_BUCKETS);
        let mut task = Task {
            status: KernelStatus {
                usage: sink.usage(),
                maps: sink.map_fill(true),
                attachment: sink.attachment(),
                retired: sink.retired(),
                migrating: sink.pending(),
                // Adopted from the pins: shown before the first write.
                levels: std::sync::Arc::new(sink.published_levels(None, &Default::default())),
                ..KernelStatus::default()
            },
            sink,
            terminate_removed,
            pending_removed: BTreeSet::new(),
            pushed: false,
            first_push: None,
            latency: latency.clone(),
            ticks: 0,
            ejected: BTreeMap::new(),
            levels_due: None,
        };
        let (status_tx, status) = watch::channel(task.status.clone());
        let (tx, rx) = mpsc::channel();
        if let Some(events) = task.sink.take_events() {
            let tx = tx.clone();
            let reader = thread::Builder::new()
                .name("datapath-events".into())
                .spawn(move || events.run(|service| tx.send(Command::Ejected(service)).is_ok()));
            if let Err(e) = reader {
                warn!(error = %e, "could not start the kernel events thread; levels follow ejections once a second");
            }
        }
        let thread = thread::Builder::new()
            .name("datapath".into())
            .spawn(move || task.run(&rx, &status_tx))
            .ok();
        if thread.is_none() {
            tracing::error!("could not start the datapath thread; the kernel maps will not follow");
        }
        Self {
            tx,
            status,
            limits,
            adopted,
            latency,
            sent: 0,
            thread,
        }
    }

    /// What the datapath held when it started (pins adopted after a restart).
    pub fn take_adopted(&mut self) -> RoutingTable {
        std::mem::take(&mut self.adopted)
    }

    /// The maps' capacities.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The latest status.
    pub fn status(&self) -> KernelStatus {
        self.status.borrow().clone()
    }

    /// The status channel, for readers that must not take the core's lock.
    pub fn subscribe(&self) -> watch::Receiver<KernelStatus> {
        self.status.clone()
    }

    pub fn latency(&self) -> Histogram {
        self.latency.clone()
    }

    /// Commands sent so far: the task has handled every one of them when
    /// [`KernelStatus::handled`] equals it.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Whether the task has handled everything sent to it.
    pub fn idle(&self) -> bool {
        self.status.borrow().handled == self.sent
    }

    /// Hands a write to the task.
    pub fn write(
        &mut self,
        write: Write,
        removed: BTreeSet<Endpoint>,
        received: Instant,
        warming: usize,
    ) -> Written {
        let (done, rx) = oneshot::channel();
        self.send(Command::Write {
            write,
            removed,
            received,
            warming,
            done,
        });
        Written(Some(rx))
    }

    /// Periodic work.
    pub fn tick(&mut self, warming: usize, now: Instant) {
        self.send(Command::Tick { warming, now });
    }

    /// A sender of enrollments to the task, for the Kubernetes watcher (which
    /// runs apart from the xDS core that owns this handle).
    pub fn enroller(&self) -> EnrollHandle {
        EnrollHandle {
            tx: self.tx.clone(),
        }
    }

    /// Returns once every command sent before is handled.
    pub fn flush(&mut self) -> Written {
        let (done, rx) = oneshot::channel();
        self.send(Command::Flush(done));
        Written(Some(rx))
    }

    fn send(&mut self, c: Command) {
        if self.tx.send(c).is_ok() {
            self.sent += 1;
        } else {
            tracing::error!("the datapath task has stopped; the kernel maps no longer follow");
        }
    }

    /// Stops the task once it has handled what was sent, and waits for it.
    pub fn stop(&mut self) {
        // After everything sent before it; a closed channel would end the loop
        // too, but the events thread and the enroller hold senders of their own.
        let _ = self.tx.send(Command::Stop);
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends enrollments to the datapath task: the one owner of the programs and
/// their links. An enrollment waits behind the writes sent before it (a large
/// initial load holds it for the load's time).
#[derive(Clone, Debug)]
pub struct EnrollHandle {
    tx: mpsc::Sender<Command>,
}

impl EnrollHandle {
    /// Makes the enrolled cgroups `cgroups` (with `prune`, only those); returns
    /// what the datapath did, once it is done.
    pub async fn enroll(
        &self,
        cgroups: BTreeSet<PathBuf>,
        prune: bool,
    ) -> Result<EnrollReport, SinkError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Command::Enroll {
                cgroups,
                prune,
                done,
            })
            .map_err(|_| SinkError::Stopped)?;
        rx.await.map_err(|_| SinkError::Stopped)?
    }
}

struct Task {
    sink: Box<dyn TableSink>,
    terminate_removed: bool,
    status: KernelStatus,
    /// Endpoints removed by writes that failed: their sockets are closed once the
    /// kernel catches up.
    pending_removed: BTreeSet<Endpoint>,
    /// A write has succeeded (the kernel holds the control plane's table).
    pushed: bool,
    /// While the datapath is pending (a layout migration): when the first write
    /// happened, which starts the warming timeout.
    first_push: Option<Instant>,
    latency: Histogram,
    /// Ticks handled (for the periodic sweep).
    ticks: u64,
    /// Backends ejected at the last tick, by (service, backend): their ejections.
    ejected: BTreeMap<(String, String), u32>,
    /// When the first ejection running in a service with levels ends
    /// (`CLOCK_MONOTONIC` ns): its levels' loads move then.
    levels_due: Option<u64>,
}

impl Task {
    /// Logs each ejection the kernel made, and each return, since the last tick.
    fn log_ejections(&mut self) {
        let Some(report) = self.sink.health() else {
            return;
        };
        let now: BTreeMap<(String, String), u32> = report
            .ejected()
            .map(|e| ((e.service.clone(), e.backend.clone()), e.ejections))
            .collect();
        for ((service, backend), ejections) in &now {
            if self.ejected.get(&(service.clone(), backend.clone())) != Some(ejections) {
                let left = report
                    .ejected()
                    .find(|e| &e.service == service && &e.backend == backend)
                    .and_then(|e| e.ejected_for_ms);
                info!(
                    %service,
                    %backend,
                    ejections,
                    ejected_for_ms = left,
                    "outlier detection: backend ejected after consecutive failed connects"
                );
            }
        }
        for (service, backend) in self.ejected.keys() {
            if !now.contains_key(&(service.clone(), backend.clone())) {
                info!(%service, %backend, "outlier detection: backend returned");
            }
        }
        self.ejected = now;
    }

    /// Takes the levels as written into the status; whether they changed. The
    /// services with levels are looked at (a refresh may have rewritten their
    /// choice tables), and those `written` (`None`: the whole table was): not
    /// the whole mirror, on a write's path to its acknowledgement.
    fn note_levels(&mut self, written: Option<&BTreeSet<crate::model::ServiceAddr>>) -> bool {
        let only = written.map(|w| {
            let mut only: BTreeSet<_> = self.status.levels.keys().copied().collect();
            only.extend(w);
            only
        });
        let now = self
            .sink
            .published_levels(only.as_ref(), &self.status.levels);
        let changed = now != *self.status.levels;
        if changed {
            self.status.levels = std::sync::Arc::new(now);
        }
        changed
    }

    /// Rewrites the choice tables to the ejections running and publishes the
    /// levels as written.
    fn follow_ejections(
        &mut self,
        only: Option<&[sockmesh_common::ServiceKey]>,
        status: &watch::Sender<KernelStatus>,
    ) {
        self.refresh_levels(only);
        if self.note_levels(Some(&BTreeSet::new())) {
            status.send_replace(self.status.clone());
        }
    }

    /// Rewrites the levels' choice tables to the ejections running (`only`
    /// those services, or all) and notes when they move next.
    fn refresh_levels(&mut self, only: Option<&[sockmesh_common::ServiceKey]>) {
        match self.sink.refresh_levels(only) {
            Ok(due) => {
                self.levels_due = match (only, due, self.levels_due) {
                    (Some(_), Some(d), Some(old)) => Some(d.min(old)),
                    (Some(_), None, old) => old,
                    (_, d, _) => d,
                }
            }
            Err(e) => {
                warn!(error = %chain(&e), "rewriting the levels' loads after ejections failed")
            }
        }
    }

    /// Deletes what the kernel programs left of endpoints gone: idle connection
    /// counts, and health entries a late connect failure made.
    fn sweep(&mut self) {
        match self.sink.sweep_conns() {
            Ok(0) => {}
            Ok(n) => info!(
                entries = n,
                "deleted idle connection counts of endpoints gone"
            ),
            Err(e) => warn!(error = %chain(&e), "sweeping idle connection counts failed"),
        }
        match self.sink.sweep_endpoint_health() {
            Ok(0) => {}
            Ok(n) => info!(
                entries = n,
                "deleted health entries of endpoints their service no longer has"
            ),
            Err(e) => warn!(error = %chain(&e), "sweeping endpoint health entries failed"),
        }
    }

    /// How long until the levels' loads move next (an ejection ends).
    fn levels_wait(&self) -> Option<Duration> {
        let due = self.levels_due?;
        Some(Duration::from_nanos(
            due.saturating_sub(super::writer::monotonic_ns()),
        ))
    }

    fn run(&mut self, rx: &mpsc::Receiver<Command>, status: &watch::Sender<KernelStatus>) {
        loop {
            let c = match self.levels_wait() {
                Some(wait) => match rx.recv_timeout(wait) {
                    Ok(c) => c,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.follow_ejections(None, status);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                },
                None => match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                },
            };
            // The services this command wrote (`None`: all of them).
            let mut written = Some(BTreeSet::new());
            let tick = matches!(c, Command::Tick { .. });
            let done = match c {
                Command::Write {
                    write,
                    removed,
                    received,
                    warming,
                    done,
                } => {
                    written = match &write {
                        Write::Table(_) => None,
                        Write::Changes(c) => Some(c.keys().copied().collect()),
                    };
                    self.write(write, removed, received);
                    self.maybe_go_live(warming, Instant::now());
                    // A write puts the levels' loads of the services it wrote as
                    // the table has them: the ejections running move them again.
                    // Only those: the other services' choice tables are as they
                    // were, and a walk of the whole mirror on every write would
                    // put each change behind the whole table (the tick's
                    // refresh walks it).
                    let keys: Option<Vec<_>> = written
                        .as_ref()
                        .map(|w| w.iter().map(super::keys::service_key).collect());
                    self.refresh_levels(keys.as_deref());
                    Some(done)
                }
                Command::Stop => return,
                Command::Ejected(service) => {
                    // Not one of the commands the handle counts (the events
                    // thread sends it).
                    self.follow_ejections(Some(std::slice::from_ref(&service)), status);
                    continue;
                }
                Command::Tick { warming, now } => {
                    self.maybe_go_live(warming, now);
                    self.log_ejections();
                    // A safety net for events the ring buffer dropped.
                    self.refresh_levels(None);
                    self.ticks += 1;
                    if self.ticks.is_multiple_of(SWEEP_TICKS) {
                        self.sweep();
                    }
                    None
                }
                Command::Flush(done) => Some(done),
                Command::Enroll {
                    cgroups,
                    prune,
                    done,
                } => {
                    let report = self.sink.enroll(&cgroups, prune);
                    if let Ok(r) = &report {
                        self.status.enrolled_cgroups = r.attached.len();
                    }
                    let _ = done.send(report);
                    status.send_replace(self.status.clone());
                    // Not one of the core's commands: `handled` counts only those.
                    continue;
                }
            };
            self.status.handled += 1;
            self.note_levels(written.as_ref());
            self.status.usage = self.sink.usage();
            self.status.maps = self.sink.map_fill(tick);
            self.status.migrating = self.sink.pending();
            self.status.attachment = self.sink.attachment();
            self.status.retired = self.sink.retired();
            status.send_replace(self.status.clone());
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
    }

    fn write(&mut self, write: Write, removed: BTreeSet<Endpoint>, received: Instant) {
        let whole = matches!(write, Write::Table(_));
        let started = Instant::now();
        let result = match &write {
            Write::Table(t) => self.sink.apply(t),
            Write::Changes(c) => self.sink.apply_changes(c),
        };
        drop(write);
        let ops = match result {
            Ok(ops) => {
                if ops >= LARGE_WRITE {
                    release_freed_memory();
                }
                ops
            }
            Err(e) => {
                // The update stays accepted (the control plane is not told
                // "rejected" for the node's own trouble); the kernel lags, which
                // /readyz, /metrics and /config_dump show, and the core sends the
                // whole table again on its next tick.
                self.status.behind = true;
                self.status.write_failures += 1;
                self.pending_removed.extend(removed);
                warn!(error = %chain(&e), "writing the kernel maps failed; retrying the whole table every second");
                return;
            }
        };
        let caught_up = whole && self.status.behind;
        if whole {
            self.status.behind = false;
        }
        self.pushed = true;
        self.first_push.get_or_insert(received);
        let latency = received.elapsed();
        self.status.push = PushStats {
            pushes: self.status.push.pushes + 1,
            last_map_ops: ops,
            last_latency: latency,
        };
        self.latency.observe(latency.as_secs_f64());
        let mut removed = removed;
        if !self.status.behind {
            removed.append(&mut self.pending_removed);
        }
        if caught_up {
            info!(
                map_ops = ops,
                "kernel maps caught up with the accepted table"
            );
        } else {
            info!(
                map_ops = ops,
                latency_us = latency.as_micros(),
                write_us = started.elapsed().as_micros(),
                "routing table applied"
            );
        }
        self.terminate(&removed);
    }

    /// With `--terminate-removed-connections`, aborts the sockets redirected to
    /// `removed` endpoints (the kernel no longer selects them).
    fn terminate(&mut self, removed: &BTreeSet<Endpoint>) {
        if !self.terminate_removed || removed.is_empty() {
            return;
        }
        match self.sink.terminate(removed) {
            Ok(n) => {
                self.status.terminated += n as u64;
                info!(
                    endpoints = removed.len(),
                    sockets = n,
                    "closed sockets of removed endpoints"
                );
            }
            Err(e) => warn!(error = %chain(&e), "closing sockets of removed endpoints failed"),
        }
    }

    /// A pending datapath goes live once the control plane's table is written and
    /// complete (no service warming), or when the warming timeout runs out.
    fn maybe_go_live(&mut self, warming: usize, now: Instant) {
        if !self.sink.pending() || !self.pushed || self.status.behind {
            return;
        }
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
                "datapath attached; the other pin layouts' programs detached and pins removed"
            ),
            Err(e) => tracing::error!(
                error = %chain(&e),
                "attaching the new datapath failed; the old layout keeps serving, retrying"
            ),
        }
    }
}
