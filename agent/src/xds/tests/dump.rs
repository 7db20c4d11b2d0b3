//! What a user sees of refused resources and listeners left alone: `/config_dump`
//! and `/metrics`, from a core over an in-memory sink.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use super::full;
use crate::{
    dataplane::task::{DatapathHandle, SinkError, TableSink},
    model::{Changes, RoutingTable},
    xds::core::Core,
};

/// A sink that holds what it is given, in maps of `limits`.
#[derive(Clone, Default)]
pub(crate) struct Memory(
    pub Arc<Mutex<RoutingTable>>,
    pub Option<crate::model::Limits>,
);

impl TableSink for Memory {
    fn apply(&mut self, table: &RoutingTable) -> Result<usize, SinkError> {
        if let Ok(mut t) = self.0.lock() {
            *t = table.clone();
        }
        Ok(1)
    }
    fn apply_changes(&mut self, changes: &Changes) -> Result<usize, SinkError> {
        if let Ok(mut t) = self.0.lock() {
            for (s, b) in changes {
                match b {
                    Some(b) => t.insert(*s, b.clone()),
                    None => {
                        t.services.remove(s);
                    }
                }
            }
        }
        Ok(1)
    }
    fn table(&self) -> RoutingTable {
        self.0.lock().map(|t| t.clone()).unwrap_or_default()
    }
    fn limits(&self) -> crate::model::Limits {
        self.1.unwrap_or_default()
    }
}

/// `/config_dump` of `core` as it is now.
pub(crate) fn dump_of(core: &Core) -> String {
    crate::admin::config_dump(&core.view(), core.state().table(), &Default::default())
}

pub(crate) fn core() -> Core {
    Core::new(DatapathHandle::spawn(Box::new(Memory::default()), false))
}

const DOC: &str = r#"
version_info: "7"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: dubbo
  address: { socket_address: { address: 240.240.0.3, port_value: 20880 } }
  filter_chains: [ { filters: [ { name: d, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.dubbo_proxy.v3.DubboProxy, stat_prefix: d } } ] } ]
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: bad
  address: { socket_address: { address: 10.96.0.2, port_value: 0 } }
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: web
  address: { socket_address: { address: 10.96.0.1, port_value: 80 } }
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: web } } ] } ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  load_assignment: { cluster_name: web, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.244.1.5, port_value: 8080 } } } } ] } ] }
"#;

#[test]
fn config_dump_and_metrics_list_refused_resources_and_listeners_left_alone() {
    let mut core = core();
    let handled = core.handle(full(DOC), Instant::now());
    assert_eq!(handled.refused.len(), 1, "{:?}", handled.nack);
    handled.written.wait_blocking();
    let dump: serde_json::Value = serde_json::from_str(&dump_of(&core)).expect("JSON");
    assert_eq!(
        dump["refused"]["lds"]["bad"],
        "Listener \"bad\": address.socket_address.port_value: 0 is out of range (1-65535)",
        "{dump}"
    );
    assert_eq!(dump["not_interpreted"][0]["listener"], "dubbo", "{dump}");
    assert!(
        dump["not_interpreted"][0]["why"][0]
            .as_str()
            .is_some_and(|w| w.contains("DubboProxy")),
        "{dump}"
    );
    assert_eq!(dump["services"].as_array().map(Vec::len), Some(1), "{dump}");
    let metrics = crate::admin::metrics(&core.view(), &[], &[], &[], &Default::default());
    for line in [
        "sockmesh_xds_refused_resources{type=\"lds\"} 1",
        "sockmesh_xds_refused_resources{type=\"cds\"} 0",
        "sockmesh_xds_not_interpreted_listeners 1",
        "sockmesh_xds_updates_total{type=\"lds\",result=\"rejected\"} 1",
        "sockmesh_xds_updates_total{type=\"cds\",result=\"accepted\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    // Unknown fields of text documents: counted by field, at most 256 listed.
    let mut notes = crate::xds::decode::TextNotes::default();
    for i in 0..300 {
        notes
            .unknown_fields
            .insert(format!("envoy.config.cluster.v3.Cluster.knob_{i:03}"), 2);
    }
    core.note_text(notes);
    assert_eq!(
        core.unknown_fields().len(),
        crate::xds::core::UNKNOWN_FIELDS_LISTED + 1
    );
    assert_eq!(
        core.unknown_fields()[crate::xds::core::OTHER_UNKNOWN_FIELDS],
        88
    );
    let metrics = crate::admin::metrics(&core.view(), &[], &[], &[], &Default::default());
    let line =
        "sockmesh_xds_unknown_fields_total{field=\"envoy.config.cluster.v3.Cluster.knob_000\"} 2";
    assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    let dump: serde_json::Value = serde_json::from_str(&dump_of(&core)).expect("JSON");
    assert_eq!(dump["unknown_fields"]["(other)"], 88, "{dump}");
}

#[test]
fn a_service_the_maps_leave_out_is_degraded_in_readyz_and_listed() {
    let sink = Memory(
        Arc::default(),
        Some(crate::model::Limits {
            services: 1,
            ..crate::model::Limits::default()
        }),
    );
    let mut core = Core::new(DatapathHandle::spawn(Box::new(sink.clone()), false));
    let two = DOC.replace("name: bad\n  address: { socket_address: { address: 10.96.0.2, port_value: 0 } }", "name: b\n  address: { socket_address: { address: 10.96.0.2, port_value: 80 } }\n  filter_chains: [ { filters: [ { name: tcp, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: web } } ] } ]");
    let handled = core.handle(full(&two), Instant::now());
    assert!(handled.nack.is_none(), "{:?}", handled.nack);
    handled.written.wait_blocking();
    core.set_source(crate::xds::core::SourceState::Connected);
    assert_eq!(sink.table().services.len(), 1);
    let (status, text) = crate::admin::readiness(&core.view());
    assert_eq!(status.as_u16(), 200);
    assert_eq!(
        text,
        "ready, degraded: 1 service limited by this node's maps (see /config_dump, limited)"
    );
    let metrics = crate::admin::metrics(&core.view(), &[], &[], &[], &Default::default());
    let line = "sockmesh_services_limited{reason=\"capacity_left_out\"} 1";
    assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    let dump: serde_json::Value = serde_json::from_str(&dump_of(&core)).expect("JSON");
    assert_eq!(dump["limited"][0]["service"], "10.96.0.2:80/tcp", "{dump}");
    assert_eq!(dump["limited"][0]["reason"], "capacity_left_out", "{dump}");
}

/// [`Memory`] that reports the levels a real writer (over in-memory maps)
/// published.
#[derive(Clone, Default)]
struct Published(
    Memory,
    Arc<Mutex<crate::dataplane::published::PublishedMap>>,
);

impl TableSink for Published {
    fn apply(&mut self, table: &RoutingTable) -> Result<usize, SinkError> {
        self.0.apply(table)
    }
    fn apply_changes(&mut self, changes: &Changes) -> Result<usize, SinkError> {
        self.0.apply_changes(changes)
    }
    fn table(&self) -> RoutingTable {
        self.0.table()
    }
    fn published_levels(
        &self,
        _only: Option<&std::collections::BTreeSet<crate::model::ServiceAddr>>,
        _previous: &crate::dataplane::published::PublishedMap,
    ) -> crate::dataplane::published::PublishedMap {
        self.1.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// Priority 0 in zone a (b1, b2), priority 1 in zone b (b3, b4), outlier
/// detection: the kernel serves it by levels.
const ZONES: &str = r#"
version_info: "1"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: zones
  address: { socket_address: { address: 10.96.0.70, port_value: 80 } }
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: zones } } ] } ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: zones
  outlier_detection: { consecutive_5xx: 3 }
  load_assignment:
    cluster_name: zones
    endpoints:
    - priority: 0
      locality: { region: r, zone: a }
      lb_endpoints:
      - endpoint: { address: { socket_address: { address: 10.10.1.11, port_value: 8080 } } }
      - endpoint: { address: { socket_address: { address: 10.10.1.12, port_value: 8080 } } }
    - priority: 1
      locality: { region: r, zone: b }
      lb_endpoints:
      - endpoint: { address: { socket_address: { address: 10.10.1.13, port_value: 8080 } } }
      - endpoint: { address: { socket_address: { address: 10.10.1.14, port_value: 8080 } } }
"#;

/// `/config_dump`'s `load_balancing` follows what the writer publishes: the
/// loads of the choice table as written, with the running ejections, each
/// endpoint labelled with its place in the assignment.
#[test]
fn config_dump_shows_the_levels_as_the_kernel_applies_them() {
    use crate::dataplane::{MapWriter, service_key, store::MemStore};
    let sink = Published::default();
    let mut core = Core::new(DatapathHandle::spawn(Box::new(sink.clone()), false));
    let handled = core.handle(full(ZONES), Instant::now());
    assert!(handled.nack.is_none(), "{:?}", handled.nack);
    handled.written.wait_blocking();
    let mut writer = MapWriter::adopt(MemStore::default()).expect("adopt");
    writer.apply(core.state().table()).expect("written");
    let publish = |writer: &MapWriter<MemStore>, core: &mut Core| {
        let previous = sink.1.lock().map(|m| m.clone()).unwrap_or_default();
        if let Ok(mut m) = sink.1.lock() {
            *m = writer.published_levels(None, &previous);
        }
        core.flush().wait_blocking();
    };
    publish(&writer, &mut core);
    let dump = |core: &Core, health: &crate::dataplane::HealthReport| -> serde_json::Value {
        let text = crate::admin::config_dump(&core.view(), core.state().table(), health);
        serde_json::from_str(&text).expect("JSON")
    };
    let d = dump(&core, &Default::default());
    let lb = &d["load_balancing"]["10.96.0.70:80/tcp"];
    assert_eq!(lb["levels"][0]["healthy_load"], 100, "{lb}");
    assert_eq!(lb["levels"][1]["healthy_load"], 0, "{lb}");
    assert_eq!(lb["levels"][1]["priority"], 1, "{lb}");
    assert_eq!(lb["endpoints"]["10.10.1.11:8080"]["share"], 50.0, "{lb}");
    assert_eq!(
        lb["endpoints"]["10.10.1.13:8080"]["locality"], "r/b/",
        "{lb}"
    );
    assert_eq!(lb["levels"][0]["localities"]["r/a/"], 100.0, "{lb}");

    // The kernel ejects b1: the writer rewrites the choice table with it.
    let key = service_key(&crate::model::ServiceAddr {
        vip: "10.96.0.70".parse().expect("ip"),
        port: 80,
        protocol: crate::model::Protocol::Tcp,
    });
    let mut running = crate::dataplane::store::Running::default();
    running.ejected.add(0, false);
    writer.store_mut().running.insert(key, running);
    writer.refresh_levels(None).expect("refreshed");
    publish(&writer, &mut core);
    let health = crate::dataplane::HealthReport {
        endpoints: vec![crate::dataplane::EndpointHealthReport {
            service: "10.96.0.70:80/tcp".into(),
            backend: "10.10.1.11:8080".into(),
            failures: 0,
            ejections: 1,
            multiplier: 1,
            ejected_for_ms: Some(30_000),
        }],
        services: Vec::new(),
    };
    let d = dump(&core, &health);
    let lb = &d["load_balancing"]["10.96.0.70:80/tcp"];
    assert_eq!(lb["levels"][0]["healthy_load"], 70, "{lb}");
    assert_eq!(lb["levels"][0]["ejected_healthy"], 1, "{lb}");
    assert_eq!(lb["levels"][1]["healthy_load"], 30, "{lb}");
    assert_eq!(lb["endpoints"]["10.10.1.11:8080"]["ejected"], true, "{lb}");
    assert_eq!(lb["endpoints"]["10.10.1.11:8080"]["share"], 0.0, "{lb}");
    assert_eq!(lb["endpoints"]["10.10.1.12:8080"]["share"], 70.0, "{lb}");
    assert_eq!(lb["endpoints"]["10.10.1.14:8080"]["share"], 15.0, "{lb}");
}

/// Levels adopted from the pins (an agent restarted) are in the status before
/// the first write.
#[test]
fn adopted_levels_are_shown_before_the_first_write() {
    use crate::dataplane::{MapWriter, store::MemStore};
    let mut first = Core::new(DatapathHandle::spawn(Box::new(Memory::default()), false));
    first
        .handle(full(ZONES), Instant::now())
        .written
        .wait_blocking();
    let mut writer = MapWriter::adopt(MemStore::default()).expect("adopt");
    writer.apply(first.state().table()).expect("written");
    let sink = Published::default();
    if let Ok(mut m) = sink.1.lock() {
        *m = writer.published_levels(None, &Default::default());
    }
    let core = Core::new(DatapathHandle::spawn(Box::new(sink), false));
    let services: Vec<String> = core
        .kernel()
        .levels
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(services, ["10.96.0.70:80/tcp"]);
}
