//! The core over in-memory sinks: kernel writes that fail, lag or block, a
//! migrating datapath, and what the admin server reads meanwhile.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use super::*;
use crate::model::{Backend, Changes, Protocol, RoutingTable, ServiceAddr};

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
    core.set_source(SourceState::Connected);
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let admin = crate::admin::Admin {
        viewer: core.viewer(),
        bpffs: "/nonexistent/sockmesh-test".into(),
        enrollment: None,
    };
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
    let answers = scrape(&admin);
    let [metrics, ready, dump] = answers;
    assert_eq!((metrics.0, ready.0), (200, 200));
    let dump: serde_json::Value = serde_json::from_str(&dump.1).expect("json");
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

/// `/metrics`, `/readyz` and `/config_dump` of `admin`, answered on another
/// thread within 10 s (status, body).
fn scrape(admin: &crate::admin::Admin) -> [(u16, String); 3] {
    let admin = admin.clone();
    let (answer_tx, answer) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let answers = ["/metrics", "/readyz", "/config_dump"].map(|path| {
            let r = rt.block_on(crate::admin::route(&admin, path));
            let status = r.status().as_u16();
            let body = rt
                .block_on(http_body_util::BodyExt::collect(r.into_body()))
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            (status, body)
        });
        let _ = answer_tx.send(answers);
    });
    answer
        .recv_timeout(Duration::from_secs(10))
        .expect("the admin server answered")
}

#[test]
fn the_admin_server_answers_while_the_core_is_locked_by_an_update() {
    let mut core = core_over(Fake::default());
    let t0 = Instant::now();
    sync_only_a(&mut core, t0);
    core.set_source(SourceState::Connected);
    let admin = crate::admin::Admin {
        viewer: core.viewer(),
        bpffs: "/nonexistent/sockmesh-test".into(),
        enrollment: None,
    };
    let core = Arc::new(Mutex::new(core));
    // A source holding the lock for as long as the test wants, as one does
    // while it decodes and translates a large update.
    let held = core.lock().expect("lock");
    let [metrics, ready, dump] = scrape(&admin);
    assert_eq!((metrics.0, ready.0, dump.0), (200, 200, 200));
    assert_eq!(ready.1, "ready\n");
    assert!(
        metrics.1.contains("sockmesh_xds_connected 1"),
        "{}",
        metrics.1
    );
    let dump: serde_json::Value = serde_json::from_str(&dump.1).expect("json");
    assert_eq!(dump["services"].as_array().map(Vec::len), Some(1), "{dump}");
    drop(held);
}

#[test]
fn a_dump_taken_across_a_commit_shows_the_table_it_was_published_with() {
    let mut core = core_over(Fake::default());
    let t0 = Instant::now();
    sync_only_a(&mut core, t0);
    let mut viewer = core.viewer();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (view, table) = rt.block_on(viewer.with_table()).expect("a view");
    assert_eq!(table.services.len(), 1);
    // The commit copies the table the reader holds instead of changing it.
    handle(&mut core, eds(&["a", "b"]), t0).expect("eds a, b");
    assert_eq!(
        table.services.len(),
        1,
        "the reader's table changed under it"
    );
    assert_eq!(view.core.table.upgrade().map(|t| t.services.len()), Some(1));
    drop((view, table));
    let (_, table) = rt.block_on(viewer.with_table()).expect("a view");
    assert_eq!(table.services.len(), 2, "the newer view's table");
    drop(table);
    // A view whose table has since changed no longer upgrades (the commit,
    // with no reader holding the table, changed it in place): the next one
    // is read instead.
    let old = viewer.now();
    let only_a = LDS_TWO
        .split("- \"@type\"")
        .take(2)
        .collect::<Vec<_>>()
        .join("- \"@type\"");
    handle(&mut core, sotw(Kind::Listener, &only_a), t0).expect("lds a");
    assert!(old.core.table.upgrade().is_none());
    let (_, table) = rt.block_on(viewer.with_table()).expect("a view");
    assert_eq!(table.services.len(), 1);
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

/// A sink that records the services each refresh of the levels' loads asked
/// for (`None`: all of them).
#[derive(Clone, Default)]
struct Refreshes {
    inner: Fake,
    asked: Arc<Mutex<Vec<Option<Vec<sockmesh_common::ServiceKey>>>>>,
}

impl TableSink for Refreshes {
    fn apply(&mut self, table: &RoutingTable) -> Result<usize, SinkError> {
        self.inner.apply(table)
    }
    fn apply_changes(&mut self, changes: &Changes) -> Result<usize, SinkError> {
        self.inner.apply_changes(changes)
    }
    fn table(&self) -> RoutingTable {
        self.inner.table()
    }
    fn refresh_levels(
        &mut self,
        only: Option<&[sockmesh_common::ServiceKey]>,
    ) -> Result<Option<u64>, SinkError> {
        self.asked
            .lock()
            .expect("lock")
            .push(only.map(<[_]>::to_vec));
        Ok(None)
    }
}

#[test]
fn a_write_of_some_services_refreshes_the_levels_of_those_only() {
    let sink = Refreshes::default();
    let mut core = core_over(sink.clone());
    let t0 = Instant::now();
    handle(&mut core, sotw(Kind::Cluster, CDS_TWO), t0).expect("cds");
    handle(&mut core, sotw(Kind::Listener, LDS_TWO), t0).expect("lds");
    handle(&mut core, eds(&["a", "b"]), t0).expect("eds a, b");
    sink.asked.lock().expect("lock").clear();
    // One service's endpoints change: the write touches a only, and so does
    // the refresh after it: a walk of every service on each write would put
    // each change behind the whole table.
    let update = sotw(
        Kind::Endpoint,
        r#"
resources:
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: a
  endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.1.4.2, port_value: 80 } } } } ] } ]
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: b
  endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.1.4.1, port_value: 80 } } } } ] } ]
"#,
    );
    handle(&mut core, update, t0).expect("eds a changed");
    let a = crate::dataplane::service_key(&ServiceAddr {
        vip: "10.96.0.1".parse().expect("vip"),
        port: 80,
        protocol: Protocol::Tcp,
    });
    assert_eq!(*sink.asked.lock().expect("lock"), vec![Some(vec![a])]);
    // The tick's refresh stays the safety net over all of them.
    tick(&mut core, t0);
    assert_eq!(sink.asked.lock().expect("lock").last(), Some(&None));
}

/// A sink that records each write: the whole table (`None`) or the services
/// a change wrote.
#[derive(Clone, Default)]
struct Writes {
    inner: Fake,
    log: Arc<Mutex<Vec<Option<usize>>>>,
}

impl TableSink for Writes {
    fn apply(&mut self, table: &RoutingTable) -> Result<usize, SinkError> {
        self.log.lock().expect("lock").push(None);
        self.inner.apply(table)
    }
    fn apply_changes(&mut self, changes: &Changes) -> Result<usize, SinkError> {
        self.log.lock().expect("lock").push(Some(changes.len()));
        self.inner.apply_changes(changes)
    }
    fn table(&self) -> RoutingTable {
        self.inner.table()
    }
}

/// A core whose EDS deltas go in parts of two assignments, over a sink that
/// records its writes.
fn in_parts_of_two() -> (Writes, Core) {
    let sink = Writes::default();
    let mut core = core_over(sink.clone());
    core.set_eds_part(2);
    (sink, core)
}

/// Listeners, clusters and assignments of `n` services handled, and the
/// sink's log of writes cleared.
fn serving(core: &mut Core, sink: &Writes, n: usize, t0: Instant) {
    let (lds, cds) = services(n);
    handle(core, cds, t0).expect("cds");
    handle(core, lds, t0).expect("lds");
    handle(core, eds_delta(n, 80, Vec::new()), t0).expect("eds");
    sink.log.lock().expect("lock").clear();
}

/// Listeners and clusters `c0` … `c{n-1}`, each listener on 10.96.1.i:80.
fn services(n: usize) -> (Update, Update) {
    let lds: String = (0..n)
        .map(|i| {
            format!(
                r#"
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: l{i}
  address: {{ socket_address: {{ address: 10.96.1.{i}, port_value: 80 }} }}
  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: c{i} }} }} ] }} ]
"#
            )
        })
        .collect();
    let cds: String = (0..n)
        .map(|i| format!("\n- {{ \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: c{i}, type: EDS, eds_cluster_config: {{ eds_config: {{ ads: {{}} }} }} }}"))
        .collect();
    (
        sotw(Kind::Listener, &format!("resources:{lds}")),
        sotw(Kind::Cluster, &format!("resources:{cds}")),
    )
}

/// A delta of the assignments of `c0` … `c{n-1}` (one endpoint each, port
/// `port`), and `extra` resources sent after them.
fn eds_delta(
    n: usize,
    port: u16,
    extra: Vec<(String, String, sockmesh_proto::pb::google::protobuf::Any)>,
) -> Update {
    let yaml: String = (0..n)
        .map(|i| {
            format!(
                r#"
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: c{i}
  endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 10.1.5.{i}, port_value: {port} }} }} }} }} ] }} ]
"#
            )
        })
        .collect();
    let Update::SotW { resources, .. } = sotw(Kind::Endpoint, &format!("resources:{yaml}")) else {
        unreachable!("sotw")
    };
    let mut added: Vec<_> = resources
        .into_iter()
        .enumerate()
        .map(|(i, a)| (format!("c{i}"), "1".to_owned(), a))
        .collect();
    added.extend(extra);
    Update::Delta {
        kind: Kind::Endpoint,
        added,
        removed: Vec::new(),
    }
}

#[test]
fn a_large_eds_delta_is_written_in_parts_once_the_kernel_follows_the_table() {
    let (sink, mut core) = in_parts_of_two();
    let t0 = Instant::now();
    let (lds, cds) = services(6);
    // Assignments before the listeners: the first write, the whole table, waits
    // for LDS and CDS, so the parts are written together then.
    handle(&mut core, cds, t0).expect("cds");
    handle(&mut core, eds_delta(6, 80, Vec::new()), t0).expect("eds");
    assert!(sink.log.lock().expect("lock").is_empty());
    handle(&mut core, lds, t0).expect("lds");
    assert_eq!(*sink.log.lock().expect("lock"), vec![None]);
    assert_eq!(sink.table().services.len(), 6);
    // Now each part is handed over as it is translated: three writes of two
    // services, not one of six, and the update is counted once.
    sink.log.lock().expect("lock").clear();
    handle(&mut core, eds_delta(6, 81, Vec::new()), t0).expect("eds again");
    assert_eq!(
        *sink.log.lock().expect("lock"),
        vec![Some(2), Some(2), Some(2)]
    );
    let table = sink.table();
    assert!(
        table
            .services
            .values()
            .all(|s| s.iter().all(|b| b.port == 81)),
        "{table:?}"
    );
    let stats = &core.state().stats()[&Kind::Endpoint];
    assert_eq!((stats.received, stats.accepted), (2, 2));
}

/// A delta smaller than a part goes in eighths of at least 128 assignments,
/// each handed to the kernel while the next is translated; below twice that it
/// goes whole.
#[test]
fn a_smaller_eds_delta_is_written_in_eighths() {
    let sink = Writes::default();
    let mut core = core_over(sink.clone());
    let t0 = Instant::now();
    serving(&mut core, &sink, 200, t0);
    handle(&mut core, eds_delta(200, 81, Vec::new()), t0).expect("eds again");
    assert_eq!(*sink.log.lock().expect("lock"), vec![Some(128), Some(72)]);
    sink.log.lock().expect("lock").clear();
    handle(&mut core, eds_delta(100, 82, Vec::new()), t0).expect("a small one");
    assert_eq!(*sink.log.lock().expect("lock"), vec![Some(100)]);
    assert_eq!(sink.table().services.len(), 200);
}

#[test]
fn an_undecodable_assignment_refuses_a_large_eds_delta_whole_parts_or_not() {
    let (sink, mut core) = in_parts_of_two();
    let t0 = Instant::now();
    serving(&mut core, &sink, 6, t0);
    // The last resource sent does not decode: Envoy refuses the response whole,
    // so no part of it reaches the kernel.
    let garbage = sockmesh_proto::pb::google::protobuf::Any {
        type_url: Kind::Endpoint.type_url().to_owned(),
        value: vec![0xff, 0xff, 0xff],
    };
    let nack = handle(
        &mut core,
        eds_delta(6, 81, vec![("c9".into(), "1".into(), garbage)]),
        t0,
    )
    .expect_err("refused whole");
    assert!(nack.0.contains("refused whole"), "{nack}");
    assert!(sink.log.lock().expect("lock").is_empty());
    assert!(
        sink.table()
            .services
            .values()
            .all(|s| s.iter().all(|b| b.port == 80))
    );
}
