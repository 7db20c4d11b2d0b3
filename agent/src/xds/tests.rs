//! Translation and accept/reject tests on real Envoy YAML, decoded by reflection.

use std::net::IpAddr;

use super::{
    decode::{Kind, discovery_response_from_text},
    state::{Update, XdsState},
};
use crate::model::{Backend, Protocol, ServiceAddr};

mod acceptance;
mod documents;
pub(crate) mod dump;
mod left_alone;
mod limits;
mod shared;

pub(super) fn full(yaml: &str) -> Update {
    let resp = discovery_response_from_text(yaml).expect("decodes");
    Update::Full {
        version: resp.version_info,
        resources: resp.resources,
        kept: Vec::new(),
        positions: Vec::new(),
    }
}

/// A state-of-the-world update from YAML (also used by `core`'s tests).
pub(super) fn sotw(kind: Kind, version: &str, yaml: &str) -> Update {
    let resp = discovery_response_from_text(yaml).expect("decodes");
    Update::SotW {
        kind,
        version: version.into(),
        resources: resp.resources,
    }
}

fn svc(vip: &str, port: u16, protocol: Protocol) -> ServiceAddr {
    ServiceAddr {
        vip: vip.parse().expect("ip"),
        port,
        protocol,
    }
}

fn be(addr: &str, port: u16, weight: u32) -> Backend {
    Backend::new(addr.parse::<IpAddr>().expect("ip"), port).weighted(weight)
}

const TCP_EDS: &str = r#"
version_info: "1"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: reviews
  address: { socket_address: { address: 10.96.0.10, port_value: 9080 } }
  filter_chains:
  - filters:
    - name: envoy.filters.network.tcp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: reviews
        cluster: reviews
        idleTimeout: 30s
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: reviews
  type: EDS
  connectTimeout: 1s
  eds_cluster_config: { service_name: reviews.default.svc, eds_config: { ads: {} } }
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  clusterName: reviews.default.svc
  endpoints:
  - locality: { zone: a }
    loadBalancingWeight: 2
    lb_endpoints:
    - endpoint: { address: { socket_address: { address: 10.1.0.1, port_value: 8080 } } }
      load_balancing_weight: 3
    - endpoint: { address: { socket_address: { address: 10.1.0.2, port_value: 8080 } } }
      health_status: DRAINING
    - endpoint: { address: { socket_address: { address: 10.1.0.3, port_value: 8080 } } }
      health_status: UNHEALTHY
  - locality: { zone: b }
    lb_endpoints:
    - endpoint: { address: { socket_address: { address: 10.1.0.4, port_value: 8080 } } }
      health_status: HEALTHY
  - priority: 1
    lb_endpoints:
    - endpoint: { address: { socket_address: { address: 10.1.0.9, port_value: 8080 } } }
"#;

/// Each active backend's share of new connections, by address (a service
/// without levels: its weights' shares).
fn shares(service: &crate::model::Service) -> Vec<(String, f64)> {
    let total: f64 = service
        .iter()
        .filter(|b| b.state == crate::model::BackendState::Active)
        .map(|b| f64::from(b.weight))
        .sum();
    service
        .iter()
        .filter(|b| b.state == crate::model::BackendState::Active)
        .map(|b| (b.address.to_string(), f64::from(b.weight) / total))
        .collect()
}

fn assert_shares(service: &crate::model::Service, want: &[(&str, f64)], why: &str) {
    let got = shares(service);
    assert_eq!(got.len(), want.len(), "{why}: {got:?}");
    for ((a, s), (wa, ws)) in got.iter().zip(want) {
        assert_eq!(a, wa, "{why}: {got:?}");
        assert!(
            (s - ws).abs() < 1e-5,
            "{why}: {a} has {s}, Envoy gives {ws}: {got:?}"
        );
    }
}

/// Envoy's arithmetic (its "Priority levels" and "Overprovisioning factor"
/// pages), without `locality_weighted_lb_config`, so locality weights are not
/// read: priority 0 has 3 hosts that count (10.1.0.2 is DRAINING, excluded), 2
/// of them healthy: health min(100, 140 × 2 / 3) = 93; priority 1 is healthy
/// (100); the normalized total is 100, so priority 0 takes 93 % (shared 3:1 by
/// endpoint weight) and priority 1 the other 7 %.
#[test]
fn tcp_proxy_over_eds_with_health_locality_and_priority() {
    let mut st = XdsState::new();
    st.apply(full(TCP_EDS)).result().expect("accepted");
    let backends = &st.table().services[&svc("10.96.0.10", 9080, Protocol::Tcp)];
    assert_shares(
        backends,
        &[
            ("10.1.0.1", 0.93 * 0.75),
            ("10.1.0.4", 0.93 * 0.25),
            ("10.1.0.9", 0.07),
        ],
        "priority 0 at 93 % health spills 7 % to priority 1",
    );
    let draining: Vec<String> = backends
        .iter()
        .filter(|b| b.state == crate::model::BackendState::Draining)
        .map(|b| b.address.to_string())
        .collect();
    assert_eq!(
        draining,
        ["10.1.0.2", "10.1.0.3"],
        "kept for their connections"
    );
    assert_eq!(st.wanted(Kind::Endpoint), ["reviews.default.svc"]);
}

#[test]
fn lower_priority_and_degraded_take_over_only_when_needed() {
    let yaml = TCP_EDS
        .replace(
            "      load_balancing_weight: 3\n",
            "      load_balancing_weight: 3\n      health_status: UNHEALTHY\n",
        )
        .replace(
            "      health_status: HEALTHY\n",
            "      health_status: DEGRADED\n",
        );
    let mut st = XdsState::new();
    st.apply(full(&yaml)).result().expect("accepted");
    // Priority 0: no healthy host, 1 degraded of 3 (degraded availability 46);
    // priority 1 healthy (100): the normalized total is 100 and the healthy loads
    // come first, so priority 1 takes everything and no level is in panic.
    assert_shares(
        &st.table().services[&svc("10.96.0.10", 9080, Protocol::Tcp)],
        &[("10.1.0.9", 1.0)],
        "priority 1 healthy beats priority 0 degraded",
    );

    let yaml = yaml.replace("  - priority: 1\n", "  - priority: 1\n    lb_endpoints: []\n  - priority: 2\n").replace(
        "    - endpoint: { address: { socket_address: { address: 10.1.0.9, port_value: 8080 } } }\n",
        "    - endpoint: { address: { socket_address: { address: 10.1.0.9, port_value: 8080 } } }\n      health_status: TIMEOUT\n",
    );
    st.apply(full(&yaml)).result().expect("accepted");
    // Now only priority 0's degraded host is available (normalized total 46):
    // every level is below the panic threshold of 50 % (priority 0: 1 of 3),
    // so the loads follow the levels' host counts, excluded hosts included (4
    // and 1: 80 % and 20 %), and each level's load goes to all its hosts by
    // weight (Envoy's total panic): 10.1.0.1 (weight 3) 80 × 3 / 6.
    assert_shares(
        &st.table().services[&svc("10.96.0.10", 9080, Protocol::Tcp)],
        &[
            ("10.1.0.1", 0.40),
            ("10.1.0.2", 0.8 / 6.0),
            ("10.1.0.3", 0.8 / 6.0),
            ("10.1.0.4", 0.8 / 6.0),
            ("10.1.0.9", 0.20),
        ],
        "total panic",
    );
}

#[test]
fn weighted_clusters_multiply_into_backend_weights() {
    let yaml = r#"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: l
  address: { socket_address: { address: 10.96.0.11, port_value: 80 } }
  filter_chains:
  - filters:
    - name: tcp
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: s
        weighted_clusters:
          clusters: [ { name: v1, weight: 90 }, { name: v2, weight: 10 } ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: v1
  load_assignment:
    cluster_name: v1
    endpoints: [ { lb_endpoints: [
      { endpoint: { address: { socket_address: { address: 10.1.1.1, port_value: 80 } } } },
      { endpoint: { address: { socket_address: { address: 10.1.1.2, port_value: 80 } } } } ] } ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: v2
  load_assignment:
    cluster_name: v2
    endpoints: [ { lb_endpoints: [
      { endpoint: { address: { socket_address: { address: 10.1.2.1, port_value: 80 } } } } ] } ]
"#;
    let mut st = XdsState::new();
    st.apply(full(yaml)).result().expect("accepted");
    let b = &st.table().services[&svc("10.96.0.11", 80, Protocol::Tcp)];
    let w: Vec<u32> = b.iter().map(|b| b.weight).collect();
    assert_eq!(w, [450_000, 450_000, 100_000]);
}

#[test]
fn virtual_outbound_http_rds_and_udp_listeners() {
    let yaml = r#"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: virtualOutbound
  address: { socket_address: { address: 0.0.0.0, port_value: 15001 } }
  filter_chains:
  - filter_chain_match:
      destination_port: 443
      prefix_ranges: [ { address_prefix: 10.96.1.1, prefix_len: 32 }, { address_prefix: 10.96.1.2, prefix_len: 32 }, { address_prefix: 10.0.0.0, prefix_len: 8 } ]
    filters:
    - name: tcp
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: s
        cluster: web
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: 0.0.0.0_8080
  address: { socket_address: { address: 0.0.0.0, port_value: 8080 } }
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: http
        rds: { route_config_name: "8080", config_source: { ads: {} } }
        http_filters: [ { name: envoy.filters.http.router, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router } } ]
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: dns
  address: { socket_address: { address: 10.96.0.53, port_value: 53, protocol: UDP } }
  udp_listener_config: {}
  listener_filters:
  - name: envoy.filters.udp_listener.udp_proxy
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig
      stat_prefix: dns
      cluster: web
- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: "8080"
  virtual_hosts:
  - name: productpage
    domains: [ "productpage.default.svc.cluster.local", "10.96.2.1", "10.96.2.1:8080", "10.96.2.2:9999" ]
    routes:
    - match: { prefix: /api }
      route: { cluster: other }
    - match: { prefix: / }
      route: { cluster: web, timeout: 0s }
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  type: STATIC
  load_assignment:
    cluster_name: web
    endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.1.3.1, port_value: 80 } } } } ] } ]
"#;
    let mut st = XdsState::new();
    st.apply(full(yaml)).result().expect("accepted");
    let keys: Vec<String> = st
        .table()
        .services
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        keys,
        [
            "10.96.0.53:53/udp",
            "10.96.1.1:443/tcp",
            "10.96.1.2:443/tcp",
            "10.96.2.1:8080/tcp"
        ]
    );
    assert_eq!(st.wanted(Kind::Route), ["8080"]);
    assert!(
        st.take_new_notes()
            .iter()
            .any(|l| l.text().contains("10.0.0.0/8")),
        "a wide prefix range is reported, not expanded"
    );
}

#[test]
fn warming_keeps_previous_backends_until_endpoints_arrive() {
    let mut st = XdsState::new();
    let listener = r#"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: l
  address: { socket_address: { address: 10.96.0.12, port_value: 80 } }
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: c } } ] } ]
"#;
    st.apply(sotw(Kind::Listener, "1", listener))
        .result()
        .expect("lds");
    assert!(
        st.table().services.is_empty(),
        "not published before its cluster warms"
    );
    assert_eq!(st.warming().len(), 1);
    let cds = r#"
resources:
- { "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: c, type: EDS, eds_cluster_config: { eds_config: { ads: {} } } }
"#;
    st.apply(sotw(Kind::Cluster, "1", cds))
        .result()
        .expect("cds");
    assert!(
        st.table().services.is_empty(),
        "cluster known, endpoints not yet"
    );
    assert_eq!(st.wanted(Kind::Endpoint), ["c"]);
    let eds = r#"
resources:
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: c
  endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.1.4.1, port_value: 80 } } } } ] } ]
"#;
    st.apply(sotw(Kind::Endpoint, "1", eds))
        .result()
        .expect("eds");
    assert_eq!(
        st.table().services[&svc("10.96.0.12", 80, Protocol::Tcp)],
        [be("10.1.4.1", 80, 1)]
    );
    // A new cluster version that is EDS again keeps the endpoints known.
    st.apply(sotw(Kind::Cluster, "2", cds))
        .result()
        .expect("cds again");
    assert_eq!(st.table().services.len(), 1);
}

#[test]
fn delta_adds_and_removes_and_remembers_versions() {
    let resp = discovery_response_from_text(TCP_EDS).expect("decodes");
    let mut st = XdsState::new();
    for kind in Kind::ALL {
        let added = resp
            .resources
            .iter()
            .filter(|a| a.type_url == kind.type_url())
            .map(|a| (String::new(), "v1".to_owned(), a.clone()))
            .collect();
        st.apply(Update::Delta {
            kind,
            added,
            removed: vec![],
        })
        .result()
        .expect("delta");
    }
    assert_eq!(st.table().services.len(), 1);
    assert_eq!(st.resource_versions(Kind::Listener)["reviews"], "v1");
    st.apply(Update::Delta {
        kind: Kind::Listener,
        added: vec![],
        removed: vec!["reviews".into()],
    })
    .result()
    .expect("removal");
    assert!(st.table().services.is_empty());
    assert!(st.resource_versions(Kind::Listener).is_empty());
}

#[test]
fn json_camel_case_and_malformed_documents() {
    let json = r#"{"versionInfo":"7","resources":[{"@type":"type.googleapis.com/envoy.config.cluster.v3.Cluster","name":"c","connectTimeout":"0.25s","loadAssignment":{"clusterName":"c","endpoints":[{"lbEndpoints":[{"endpoint":{"address":{"socketAddress":{"address":"fd00::1","portValue":80}}},"loadBalancingWeight":5}]}]}}]}"#;
    let resp = discovery_response_from_text(json).expect("camelCase JSON decodes");
    assert_eq!(resp.version_info, "7");
    assert_eq!(resp.resources.len(), 1);

    // A field sockmesh does not know is ignored and counted, as Envoy's dynamic
    // configuration ignores it.
    let (resp, notes) = super::decode::discovery_response_with_opaque("resources:\n- \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: c\n  bogus_field: 1\n")
        .expect("an unknown field is ignored");
    assert_eq!(resp.resources.len(), 1);
    assert_eq!(
        notes.unknown_fields,
        super::unknown::UnknownFields::from([(
            "envoy.config.cluster.v3.Cluster.bogus_field".to_owned(),
            1
        )])
    );
    // Errors point at the line and column.
    let err = discovery_response_from_text("resources: [\n  {name: }\n").expect_err("no @type");
    assert!(err.to_string().ends_with("at line 2 column 3"), "{err}");
    let err = discovery_response_from_text("{\n  \"resources\": [\n    {\"name\": }\n  ]\n}")
        .expect_err("JSON syntax");
    assert!(err.to_string().ends_with("at line 3 column 14"), "{err}");
    let err = discovery_response_from_text("resources: [\n  { name: \n").expect_err("YAML syntax");
    assert!(err.to_string().contains("at line 3 column 1"), "{err}");
    let err =
        discovery_response_from_text("resources:\n- \"@type\": type.googleapis.com/no.such.Type\n")
            .expect_err("unknown type");
    assert!(err.to_string().contains("no.such.Type"), "{err}");
}

/// The incremental translation equals the full one after every step of a long,
/// seeded sequence of delta updates touching listeners (TCP, weighted, HTTP/RDS,
/// left alone, overlapping VIPs), routes, clusters (EDS, STATIC) and endpoints.
#[test]
fn incremental_translation_matches_full_translation() {
    use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

    use super::full::translate;

    let mut rng = StdRng::seed_from_u64(7);
    let mut st = XdsState::new();
    let doc = |body: String| {
        discovery_response_from_text(&format!("resources:\n- {body}\n"))
            .expect("generated YAML decodes")
            .resources
    };
    let mut accepted = 0;
    for step in 0..3000 {
        let kind = Kind::ALL[rng.random_range(0..4)];
        let remove = rng.random_range(0..6) == 0;
        let (name, body) = match kind {
            Kind::Listener => {
                let i = rng.random_range(0..6);
                let vip = rng.random_range(1..5);
                let body = match rng.random_range(0..4) {
                    0 => format!(
                        r#"{{ "@type": type.googleapis.com/envoy.config.listener.v3.Listener, name: l{i}, address: {{ socket_address: {{ address: 10.96.0.{vip}, port_value: 80 }} }}, filter_chains: [ {{ filters: [ {{ name: t, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: c{} }} }} ] }} ] }}"#,
                        rng.random_range(0..5)
                    ),
                    1 => format!(
                        r#"{{ "@type": type.googleapis.com/envoy.config.listener.v3.Listener, name: l{i}, address: {{ socket_address: {{ address: 10.96.0.{vip}, port_value: 80 }} }}, filter_chains: [ {{ filters: [ {{ name: t, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, weighted_clusters: {{ clusters: [ {{ name: c{}, weight: {} }}, {{ name: c{}, weight: 1 }} ] }} }} }} ] }} ] }}"#,
                        rng.random_range(0..5),
                        rng.random_range(1..5),
                        rng.random_range(0..5)
                    ),
                    // Bound to the VIP on the port the wildcard HTTP listener's
                    // virtual hosts name: a Dubbo proxy shadows them.
                    2 => format!(
                        r#"{{ "@type": type.googleapis.com/envoy.config.listener.v3.Listener, name: l{i}, address: {{ socket_address: {{ address: 10.96.0.{vip}, port_value: 8080 }} }}, filter_chains: [ {{ filters: [ {{ name: d, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.dubbo_proxy.v3.DubboProxy, stat_prefix: d }} }} ] }} ] }}"#
                    ),
                    _ => format!(
                        r#"{{ "@type": type.googleapis.com/envoy.config.listener.v3.Listener, name: l{i}, address: {{ socket_address: {{ address: 0.0.0.0, port_value: 8080 }} }}, filter_chains: [ {{ filters: [ {{ name: h, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: h, rds: {{ route_config_name: r{}, config_source: {{ ads: {{}} }} }} }} }} ] }} ] }}"#,
                        rng.random_range(0..3)
                    ),
                };
                (format!("l{i}"), body)
            }
            Kind::Route => {
                let i = rng.random_range(0..3);
                let vip = rng.random_range(1..5);
                (
                    format!("r{i}"),
                    format!(
                        r#"{{ "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration, name: r{i}, virtual_hosts: [ {{ name: v, domains: ["10.96.0.{vip}:8080"], routes: [ {{ match: {{ prefix: / }}, route: {{ cluster: c{} }} }} ] }} ] }}"#,
                        rng.random_range(0..5)
                    ),
                )
            }
            Kind::Cluster => {
                let i = rng.random_range(0..5);
                let body = if rng.random_range(0..3) == 0 {
                    format!(
                        r#"{{ "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: c{i}, type: STATIC, load_assignment: {{ cluster_name: c{i}, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 10.1.9.{}, port_value: 80 }} }} }} }} ] }} ] }} }}"#,
                        rng.random_range(1..9)
                    )
                } else {
                    format!(
                        r#"{{ "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: c{i}, type: EDS, eds_cluster_config: {{ service_name: e{}, eds_config: {{ ads: {{}} }} }} }}"#,
                        rng.random_range(0..4)
                    )
                };
                (format!("c{i}"), body)
            }
            Kind::Endpoint => {
                let i = rng.random_range(0..4);
                let eps: Vec<String> = (0..rng.random_range(0..4))
                    .map(|_| {
                        format!(
                            "{{ endpoint: {{ address: {{ socket_address: {{ address: 10.1.{i}.{}, port_value: 80 }} }} }}, health_status: {} }}",
                            rng.random_range(1..6),
                            ["HEALTHY", "DRAINING", "UNKNOWN"][rng.random_range(0..3)]
                        )
                    })
                    .collect();
                (
                    format!("e{i}"),
                    format!(
                        r#"{{ "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment, cluster_name: e{i}, endpoints: [ {{ lb_endpoints: [ {} ] }} ] }}"#,
                        eps.join(", ")
                    ),
                )
            }
        };
        let before = st.table().clone();
        let update = if remove {
            Update::Delta {
                kind,
                added: vec![],
                removed: vec![name],
            }
        } else {
            let any = doc(body).remove(0);
            Update::Delta {
                kind,
                added: vec![(name, "v".into(), any)],
                removed: vec![],
            }
        };
        if st.apply(update).result().is_ok() {
            accepted += 1;
            let full = translate(st.resources(), &[&before]);
            if st.table() != &full.table {
                eprintln!("{}", st.debug_indexes());
            }
            assert_eq!(st.table(), &full.table, "step {step}: incremental != full");
            let mut eds: Vec<String> = full.eds_names.into_iter().collect();
            eds.sort();
            assert_eq!(st.wanted(Kind::Endpoint), eds, "step {step}: EDS names");
        }
    }
    assert!(accepted > 500, "only {accepted} updates accepted");
}

/// Resources shaped as istiod sends them to a sidecar: per-service outbound
/// listeners named `VIP_PORT`, `outbound|PORT||host` EDS clusters, the HTTP
/// listener `0.0.0.0_PORT` with RDS, and the `virtualOutbound` listener whose
/// filter chains match destination /32s.
#[test]
fn istio_shaped_resources() {
    let yaml = r#"
versionInfo: "2026-11-24T09:00:00Z/42"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: 10.96.0.20_3306
  address: { socketAddress: { address: 10.96.0.20, portValue: 3306 } }
  trafficDirection: OUTBOUND
  bindToPort: false
  filterChains:
  - filters:
    - name: envoy.filters.network.rbac
      typedConfig:
        "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
        statPrefix: tcp.
        rules: { policies: { ns-default: { permissions: [ { any: true } ], principals: [ { authenticated: { principalName: { exact: spiffe://cluster.local/ns/default/sa/app } } } ] } } }
    - name: envoy.filters.network.tcp_proxy
      typedConfig:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        statPrefix: outbound|3306||mysql.default.svc.cluster.local
        cluster: outbound|3306||mysql.default.svc.cluster.local
        idleTimeout: 3600s
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: 0.0.0.0_9080
  address: { socketAddress: { address: 0.0.0.0, portValue: 9080 } }
  trafficDirection: OUTBOUND
  bindToPort: false
  filterChains:
  - filterChainMatch: { transportProtocol: raw_buffer, applicationProtocols: [ http/1.1, h2c ] }
    filters:
    - name: envoy.filters.network.http_connection_manager
      typedConfig:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        statPrefix: outbound_0.0.0.0_9080
        rds: { configSource: { ads: {}, initialFetchTimeout: 0s, resourceApiVersion: V3 }, routeConfigName: "9080" }
        useRemoteAddress: false
        httpFilters:
        - name: envoy.filters.http.router
          typedConfig: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  defaultFilterChain:
    filters:
    - name: envoy.filters.network.tcp_proxy
      typedConfig: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, statPrefix: PassthroughCluster, cluster: PassthroughCluster }
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: virtualOutbound
  address: { socketAddress: { address: 0.0.0.0, portValue: 15001 } }
  useOriginalDst: true
  filterChains:
  - filterChainMatch: { destinationPort: 6379, prefixRanges: [ { addressPrefix: 10.96.0.30, prefixLen: 32 } ] }
    filters:
    - name: envoy.filters.network.tcp_proxy
      typedConfig: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, statPrefix: redis, cluster: "outbound|6379||redis.default.svc.cluster.local" }
  - name: PassthroughFilterChain
    filters:
    - name: envoy.filters.network.tcp_proxy
      typedConfig: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, statPrefix: PassthroughCluster, cluster: PassthroughCluster }
- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: "9080"
  validateClusters: false
  virtualHosts:
  - name: reviews.default.svc.cluster.local:9080
    domains: [ reviews.default.svc.cluster.local, reviews, reviews.default.svc, 10.96.0.10 ]
    includeRequestAttemptCount: true
    routes:
    - name: default
      match: { prefix: / }
      route:
        cluster: outbound|9080||reviews.default.svc.cluster.local
        timeout: 0s
        retryPolicy: { retryOn: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes", numRetries: 2 }
        maxGrpcTimeout: 0s
      decorator: { operation: "reviews.default.svc.cluster.local:9080/*" }
  - name: allow_any
    domains: [ "*" ]
    routes:
    - name: allow_any
      match: { prefix: / }
      route: { cluster: PassthroughCluster, timeout: 0s }
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: PassthroughCluster
  type: ORIGINAL_DST
  connectTimeout: 10s
  lbPolicy: CLUSTER_PROVIDED
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: outbound|9080||reviews.default.svc.cluster.local
  type: EDS
  edsClusterConfig: { edsConfig: { ads: {}, initialFetchTimeout: 0s, resourceApiVersion: V3 }, serviceName: outbound|9080||reviews.default.svc.cluster.local }
  connectTimeout: 10s
  lbPolicy: LEAST_REQUEST
  circuitBreakers: { thresholds: [ { maxConnections: 4294967295, maxPendingRequests: 4294967295, maxRequests: 4294967295, maxRetries: 4294967295 } ] }
  commonLbConfig: {}
  metadata: { filterMetadata: { istio: { services: [ { host: reviews.default.svc.cluster.local, name: reviews, namespace: default } ] } } }
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: outbound|3306||mysql.default.svc.cluster.local
  type: EDS
  edsClusterConfig: { edsConfig: { ads: {}, resourceApiVersion: V3 }, serviceName: outbound|3306||mysql.default.svc.cluster.local }
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: outbound|6379||redis.default.svc.cluster.local
  type: EDS
  edsClusterConfig: { edsConfig: { ads: {}, resourceApiVersion: V3 }, serviceName: outbound|6379||redis.default.svc.cluster.local }
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  clusterName: outbound|9080||reviews.default.svc.cluster.local
  endpoints:
  - locality: { region: us-east1, zone: us-east1-b }
    lbEndpoints:
    - endpoint: { address: { socketAddress: { address: 10.244.1.5, portValue: 9080 } } }
      healthStatus: HEALTHY
      metadata: { filterMetadata: { istio: { workload: "reviews-v1;default;reviews;v1;Kubernetes" } } }
      loadBalancingWeight: 1
    - endpoint: { address: { socketAddress: { address: 10.244.2.7, portValue: 9080 } } }
      healthStatus: HEALTHY
      loadBalancingWeight: 1
    loadBalancingWeight: 2
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  clusterName: outbound|3306||mysql.default.svc.cluster.local
  endpoints: [ { lbEndpoints: [ { endpoint: { address: { socketAddress: { address: 10.244.3.9, portValue: 3306 } } } } ] } ]
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  clusterName: outbound|6379||redis.default.svc.cluster.local
  endpoints: [ { lbEndpoints: [ { endpoint: { address: { socketAddress: { address: 10.244.4.2, portValue: 6379 } } } } ] } ]
"#;
    let mut st = XdsState::new();
    st.apply(full(yaml)).result().expect("accepted");
    let got = table_lines(st.table());
    assert_eq!(
        got,
        [
            "10.96.0.10:9080/tcp -> 10.244.1.5:9080 w1, 10.244.2.7:9080 w1",
            "10.96.0.20:3306/tcp -> 10.244.3.9:3306 w1",
            "10.96.0.30:6379/tcp -> 10.244.4.2:6379 w1",
        ]
    );
    // PassthroughCluster (ORIGINAL_DST) is understood, not ignored; the `*`
    // virtual host of a wildcard listener names no VIP.
    let ignored = st.take_new_notes();
    assert!(
        !ignored.iter().any(|l| l.text().contains("ORIGINAL_DST")),
        "{ignored:?}"
    );
    assert!(st.passthrough().is_empty());
    assert_eq!(st.version(Kind::Listener), "2026-11-24T09:00:00Z/42");
}

/// The shapes istiod generates around pass-through: per-IP listeners of headless
/// services and node addresses whose cluster is ORIGINAL_DST get no entry (the
/// connection goes where it was sent); a weighted mix sends the pass-through share
/// to the VIP itself; a VIP_port listener with an HTTP chain whose RDS has not
/// arrived warms, and its default chain does not stand in; a listener bound to the
/// VIP beats a wildcard listener's virtual host; INBOUND and internal listeners are
/// skipped without a word; istiod's own filter types are carried opaquely.
#[test]
fn passthrough_precedence_pending_routes_and_opaque_types() {
    let yaml = r#"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: 172.16.18.249_9093
  address: { socket_address: { address: 172.16.18.249, port_value: 9093 } }
  traffic_direction: OUTBOUND
  bind_to_port: false
  filter_chains:
  - filters:
    - { name: istio.stats, typed_config: { "@type": type.googleapis.com/stats.PluginConfig, x: 1 } }
    - { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: "outbound|9093||alertmanager-operated" } }
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: 10.96.0.40_80
  address: { socket_address: { address: 10.96.0.40, port_value: 80 } }
  filter_chains:
  - filters:
    - { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, weighted_clusters: { clusters: [ { name: web, weight: 3 }, { name: "outbound|9093||alertmanager-operated", weight: 1 } ] } } }
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: 10.96.0.50_16686
  address: { socket_address: { address: 10.96.0.50, port_value: 16686 } }
  filter_chains:
  - filter_chain_match: { transport_protocol: raw_buffer, application_protocols: [ http/1.1, h2c ] }
    filters:
    - { name: hcm, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: s, rds: { route_config_name: "jaeger:16686", config_source: { ads: {} } } } }
  default_filter_chain:
    filters:
    - { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: web } }
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: 0.0.0.0_80
  address: { socket_address: { address: 0.0.0.0, port_value: 80 } }
  filter_chains:
  - filters:
    - { name: hcm, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: s, route_config: { name: "80", virtual_hosts: [ { name: v, domains: [ "web.default", "10.96.0.40", "10.96.0.41" ], routes: [ { match: { prefix: / }, route: { cluster: other } } ] } ] } } }
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: inbound_8080
  address: { socket_address: { address: 10.244.0.9, port_value: 8080 } }
  traffic_direction: INBOUND
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: web } } ] } ]
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: main_internal
  internal_listener: {}
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: web } } ] } ]
- { "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: "outbound|9093||alertmanager-operated", type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED }
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  load_assignment: { cluster_name: web, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.244.1.5, port_value: 8080 } } } } ] } ] }
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: other
  load_assignment: { cluster_name: other, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.244.1.6, port_value: 8080 } } } } ] } ] }
"#;
    let (resp, opaque) =
        super::decode::discovery_response_with_opaque(yaml).expect("istiod's types carried");
    assert_eq!(opaque.opaque["type.googleapis.com/stats.PluginConfig"], 1);
    let mut st = XdsState::new();
    st.apply(Update::Full {
        version: "1".into(),
        resources: resp.resources,
        kept: Vec::new(),
        positions: Vec::new(),
    })
    .result()
    .expect("accepted");
    let got = table_lines(st.table());
    assert_eq!(
        got,
        [
            // Bound to the VIP: beats 0.0.0.0_80's virtual host; a quarter of the
            // connections go to the original destination, the VIP itself.
            "10.96.0.40:80/tcp -> 10.96.0.40:80 w250000, 10.244.1.5:8080 w750000",
            "10.96.0.41:80/tcp -> 10.244.1.6:8080 w1",
        ]
    );
    let passthrough: Vec<String> = st.passthrough().iter().map(ToString::to_string).collect();
    assert_eq!(passthrough, ["172.16.18.249:9093/tcp"]);
    let warming: Vec<String> = st.warming().iter().map(ToString::to_string).collect();
    assert_eq!(
        warming,
        ["10.96.0.50:16686/tcp"],
        "the RDS route is pending"
    );
    let ignored = st.take_new_notes();
    assert!(ignored.is_empty(), "{ignored:?}");

    // An unknown type in the filter that decides the cluster is valid
    // configuration that sockmesh leaves alone: the rest is applied.
    let bad = yaml.replace(
        "- { name: tcp, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: \"outbound|9093||alertmanager-operated\" } }",
        "- { name: mystery, typed_config: { \"@type\": type.googleapis.com/acme.Proxy } }",
    );
    assert_ne!(bad, yaml);
    let (resp, _) = super::decode::discovery_response_with_opaque(&bad).expect("decodes");
    let mut st = XdsState::new();
    st.apply(Update::Full {
        version: "2".into(),
        resources: resp.resources,
        kept: Vec::new(),
        positions: Vec::new(),
    })
    .result()
    .expect("a terminal filter of an unknown type is not an error");
    assert_eq!(table_lines(st.table()), got);
    assert!(
        st.passthrough().is_empty(),
        "left alone, not passed through"
    );
    let left = st.left_alone();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].0, "172.16.18.249_9093");
    assert!(
        left[0].1[0].contains(
            "filter_chains[0]: left alone: its terminal filter \"mystery\" (type.googleapis.com/acme.Proxy)"
        ),
        "{left:?}"
    );
    let notes = st.take_new_notes();
    assert!(
        matches!(&notes[..], [super::state::Note::LeftAlone(_)]),
        "logged once: {notes:?}"
    );
    assert!(st.take_new_notes().is_empty());
}

/// Each service as `VIP:port/proto -> addr:port wWEIGHT, …`.
fn table_lines(table: &crate::model::RoutingTable) -> Vec<String> {
    table
        .services
        .iter()
        .map(|(s, b)| {
            let b: Vec<String> = b
                .iter()
                .map(|b| format!("{}:{} w{}", b.address, b.port, b.weight))
                .collect();
            format!("{s} -> {}", b.join(", "))
        })
        .collect()
}

/// A ServiceEntry with `resolution: DNS` as istiod sends it: a STRICT_DNS cluster
/// with two host names (one of them twice at different ports), and a LOGICAL_DNS
/// one.
const DNS_CLUSTERS: &str = r#"
version_info: "1"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: ext
  address: { socket_address: { address: 240.240.0.5, port_value: 443 } }
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: "outbound|443||ext.example" } } ] } ]
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: logical
  address: { socket_address: { address: 240.240.0.6, port_value: 80 } }
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: "outbound|80||one.example" } } ] } ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: "outbound|443||ext.example"
  type: STRICT_DNS
  dns_lookup_family: V4_ONLY
  dns_refresh_rate: 2s
  respect_dns_ttl: true
  dns_resolvers: [ { socket_address: { address: 127.0.0.1, port_value: 5353 } } ]
  load_assignment:
    cluster_name: "outbound|443||ext.example"
    endpoints:
    - lb_endpoints:
      - endpoint: { address: { socket_address: { address: a.ext.example, port_value: 443 } } }
        load_balancing_weight: 2
      - endpoint: { address: { socket_address: { address: b.ext.example, port_value: 8443 } } }
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: "outbound|80||one.example"
  type: LOGICAL_DNS
  load_assignment:
    cluster_name: "outbound|80||one.example"
    endpoints:
    - lb_endpoints:
      - endpoint: { address: { socket_address: { address: one.example, port_value: 80 } } }
"#;

fn answers(pairs: &[(&str, &[&str])]) -> super::clusters::DnsAnswers {
    pairs
        .iter()
        .map(|(h, ips)| {
            let ips = ips.iter().map(|i| i.parse().expect("ip")).collect();
            ((*h).to_owned(), ips)
        })
        .collect()
}

#[test]
fn dns_clusters_warm_until_resolved_then_follow_their_answers() {
    let mut st = XdsState::new();
    st.apply(full(DNS_CLUSTERS)).result().expect("accepted");
    let ext = svc("240.240.0.5", 443, Protocol::Tcp);
    let one = svc("240.240.0.6", 80, Protocol::Tcp);
    assert_eq!(st.warming(), [ext, one], "nothing resolved yet");
    let targets = st.dns_targets();
    let t = &targets["outbound|443||ext.example"];
    assert_eq!(
        t.hosts.iter().collect::<Vec<_>>(),
        ["a.ext.example", "b.ext.example"]
    );
    assert_eq!(t.family, super::clusters::DnsFamily::V4Only);
    assert_eq!(t.refresh, std::time::Duration::from_secs(2));
    assert_eq!(t.failure_base, t.refresh);
    assert_eq!(t.failure_max, t.refresh * 10);
    assert!(t.respect_ttl);
    assert_eq!(t.resolvers, ["127.0.0.1:5353".parse().expect("addr")]);
    assert!(
        targets["outbound|80||one.example"].resolvers.is_empty(),
        "no resolvers of its own: the node's /etc/resolv.conf"
    );

    let a = st.apply_dns(
        "outbound|443||ext.example",
        answers(&[
            ("a.ext.example", &["192.0.2.1", "192.0.2.2"]),
            ("b.ext.example", &["192.0.2.9"]),
        ]),
    );
    assert!(a.table_changed);
    assert_eq!(
        st.table().services[&ext],
        [
            be("192.0.2.1", 443, 2),
            be("192.0.2.2", 443, 2),
            be("192.0.2.9", 8443, 1)
        ],
        "STRICT_DNS: every address of every host name, with the endpoint's weight"
    );
    st.apply_dns(
        "outbound|80||one.example",
        answers(&[("one.example", &["198.51.100.1", "198.51.100.2"])]),
    );
    assert_eq!(
        st.table().services[&one],
        [be("198.51.100.1", 80, 1)],
        "LOGICAL_DNS: the first address only"
    );
    assert!(st.warming().is_empty());

    // The same answers again change nothing; a name that lost an address follows.
    let same = st.apply_dns(
        "outbound|80||one.example",
        answers(&[("one.example", &["198.51.100.1", "198.51.100.2"])]),
    );
    assert!(!same.table_changed);
    st.apply_dns(
        "outbound|443||ext.example",
        answers(&[("a.ext.example", &["192.0.2.2"]), ("b.ext.example", &[])]),
    );
    // A lone backend's weight is its whole share: weights are kept as the
    // smallest integers in the same ratios.
    assert_eq!(st.table().services[&ext], [be("192.0.2.2", 443, 1)]);

    // Answers for a cluster that is not a DNS cluster are ignored.
    let other = st.apply_dns("reviews", answers(&[("x", &["10.0.0.1"])]));
    assert_eq!(other, super::state::Accepted::default());
}

#[test]
fn dns_answers_beyond_the_maps_room_are_accepted_and_the_service_limited_to_what_fits() {
    let mut st = XdsState::new();
    st.set_limits(crate::dataplane::Limits {
        services: 8,
        backends: 4,
        ..crate::dataplane::Limits::default()
    });
    st.apply(full(DNS_CLUSTERS)).result().expect("accepted");
    let good = answers(&[("a.ext.example", &["192.0.2.1"]), ("b.ext.example", &[])]);
    st.apply_dns("outbound|443||ext.example", good);
    let many = answers(&[
        (
            "a.ext.example",
            &["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"],
        ),
        ("b.ext.example", &["192.0.2.5"]),
    ]);
    st.apply_dns("outbound|443||ext.example", many.clone());
    assert_eq!(st.dns_answers("outbound|443||ext.example"), Some(&many));
    // 1 backend in the kernel; 5 asked for; the new version is written beside the
    // old one, so 3 fit in the 4 the map holds.
    let ext = svc("240.240.0.5", 443, Protocol::Tcp);
    assert_eq!(st.table().services[&ext].len(), 3, "{:?}", st.table());
    let l = &st.limited()[&ext];
    assert_eq!(
        (l.limit.clone(), l.endpoints, l.programmed),
        (super::fit::Limit::Room, 5, 3)
    );
    assert!(
        l.why.contains("exceed the backend map's capacity of 4"),
        "{}",
        l.why
    );
}

#[test]
fn a_cluster_that_stops_being_a_dns_cluster_forgets_its_answers() {
    let mut st = XdsState::new();
    st.apply(full(DNS_CLUSTERS)).result().expect("accepted");
    st.apply_dns(
        "outbound|80||one.example",
        answers(&[("one.example", &["198.51.100.1"])]),
    );
    let static_cluster = DNS_CLUSTERS
        .replace("type: LOGICAL_DNS", "type: STATIC")
        .replace("address: one.example", "address: 198.51.100.7");
    st.apply(full(&static_cluster)).result().expect("accepted");
    assert!(!st.dns_targets().contains_key("outbound|80||one.example"));
    assert_eq!(st.dns_answers("outbound|80||one.example"), None);
    assert_eq!(
        st.table().services[&svc("240.240.0.6", 80, Protocol::Tcp)],
        [be("198.51.100.7", 80, 1)]
    );
}

/// A listener on `vip`:80 to `cluster`, and `cluster` (STATIC, one endpoint)
/// with `policy` (extra Cluster fields in YAML flow form).
fn policy_doc(clusters: &[(&str, &str)], route: &str) -> String {
    let mut out = format!(
        r#"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: l
  address: {{ socket_address: {{ address: 10.96.0.1, port_value: 80 }} }}
  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, {route} }} }} ] }} ]
"#
    );
    for (i, (name, policy)) in clusters.iter().enumerate() {
        out.push_str(&format!(
            r#"
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: {name}
  type: STATIC
  {policy}
  load_assignment: {{ cluster_name: {name}, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 10.1.0.{n}, port_value: 80 }} }} }} }} ] }} ] }}
"#,
            n = i + 1
        ));
    }
    out
}

fn policy_of(doc: &str) -> crate::model::LbPolicy {
    let mut st = XdsState::new();
    st.apply(full(doc)).result().expect("accepted");
    st.table().services[&svc("10.96.0.1", 80, Protocol::Tcp)].policy
}

#[test]
fn cluster_lb_policy_becomes_the_services_kernel_policy() {
    use crate::model::LbPolicy;
    let one = |policy: &str| policy_of(&policy_doc(&[("c", policy)], "cluster: c"));
    // Istio's default: LEAST_REQUEST, Envoy's choice_count 2.
    assert_eq!(
        one("lb_policy: LEAST_REQUEST"),
        LbPolicy::LeastConn { choices: 2 }
    );
    assert_eq!(
        one("lb_policy: LEAST_REQUEST\n  least_request_lb_config: { choice_count: 5 }"),
        LbPolicy::LeastConn { choices: 5 }
    );
    // More draws than MAX_CHOICES are cut there.
    assert_eq!(
        one("lb_policy: LEAST_REQUEST\n  least_request_lb_config: { choice_count: 100 }"),
        LbPolicy::LeastConn {
            choices: sockmesh_common::MAX_CHOICES
        }
    );
    // The typed form.
    assert_eq!(
        one(
            r#"load_balancing_policy: { policies: [ { typed_extension_config: { name: lr, typed_config: { "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest, choice_count: 3 } } } ] }"#
        ),
        LbPolicy::LeastConn { choices: 3 }
    );
    assert_eq!(one("lb_policy: ROUND_ROBIN"), LbPolicy::Random);
    assert_eq!(one("lb_policy: RANDOM"), LbPolicy::Random);
    assert_eq!(one(""), LbPolicy::Random, "the default is ROUND_ROBIN");
    // Consistent hashing: a Maglev table, of the cluster's size or the default.
    let default = sockmesh_common::DEFAULT_MAGLEV_TABLE_SIZE;
    assert_eq!(
        one("lb_policy: MAGLEV"),
        LbPolicy::Maglev {
            table_size: default
        }
    );
    assert_eq!(
        one("lb_policy: MAGLEV\n  maglev_lb_config: { table_size: 251 }"),
        LbPolicy::Maglev { table_size: 251 }
    );
    assert_eq!(
        one(
            r#"load_balancing_policy: { policies: [ { typed_extension_config: { name: m, typed_config: { "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev, table_size: 509 } } } ] }"#
        ),
        LbPolicy::Maglev { table_size: 509 }
    );
    // A ring hash is served by a Maglev table (its ring sizes do not apply).
    assert_eq!(
        one("lb_policy: RING_HASH\n  ring_hash_lb_config: { minimum_ring_size: 1024 }"),
        LbPolicy::Maglev {
            table_size: default
        }
    );
    // Weighted clusters that agree keep the policy; that disagree, random.
    let weighted =
        "weighted_clusters: { clusters: [ { name: a, weight: 1 }, { name: b, weight: 1 } ] }";
    assert_eq!(
        policy_of(&policy_doc(
            &[
                ("a", "lb_policy: LEAST_REQUEST"),
                ("b", "lb_policy: LEAST_REQUEST")
            ],
            weighted
        )),
        LbPolicy::LeastConn { choices: 2 }
    );
    assert_eq!(
        policy_of(&policy_doc(
            &[
                ("a", "lb_policy: LEAST_REQUEST"),
                ("b", "lb_policy: RANDOM")
            ],
            weighted
        )),
        LbPolicy::Random
    );
}

#[test]
fn a_hash_on_what_connect_cannot_see_is_reported_for_consistent_hash_services_only() {
    let s = svc("10.96.0.1", 80, Protocol::Tcp);
    let route = "cluster: c, hash_policy: [ { filter_state: { key: io.istio.peer } } ]";
    let mut st = XdsState::new();
    st.apply(full(&policy_doc(&[("c", "lb_policy: MAGLEV")], route)))
        .result()
        .expect("maglev");
    assert_eq!(st.unhashable(), [(s, "filter state")]);
    // The same hash policy before a weighted-random cluster says nothing: there
    // is no hash to follow.
    st.apply(full(&policy_doc(&[("c", "lb_policy: RANDOM")], route)))
        .result()
        .expect("random");
    assert!(st.unhashable().is_empty());
    // source_ip is what a consistent hash at connect() keys on: honoured.
    st.apply(full(&policy_doc(
        &[("c", "lb_policy: RING_HASH")],
        "cluster: c, hash_policy: [ { source_ip: {} } ]",
    )))
    .result()
    .expect("ring hash on the source address");
    assert!(st.unhashable().is_empty());
}

#[test]
fn a_maglev_table_size_that_is_not_a_prime_is_nacked_one_beyond_the_kernel_is_capped() {
    let mut st = XdsState::new();
    st.apply(full(&policy_doc(
        &[(
            "c",
            "lb_policy: MAGLEV\n  maglev_lb_config: { table_size: 251 }",
        )],
        "cluster: c",
    )))
    .result()
    .expect("a prime");
    let before = st.table().clone();
    let doc = |size: &str| {
        policy_doc(
            &[(
                "c",
                &format!("lb_policy: MAGLEV\n  maglev_lb_config: {{ table_size: {size} }}"),
            )],
            "cluster: c",
        )
    };
    let nack = st.apply(full(&doc("1000"))).result().expect_err("refused");
    assert!(
        nack.0.contains(
            "Cluster \"c\": maglev_lb_config.table_size: 1000 is not a prime (Maglev needs a prime table size)"
        ),
        "{nack}"
    );
    assert_eq!(st.table(), &before, "the last good table stays");
    // 65,539 is a prime Envoy accepts; the kernel's largest table is 65,537.
    assert_eq!(
        policy_of(&doc("65539")),
        crate::model::LbPolicy::Maglev { table_size: 65_537 }
    );
}

#[test]
fn a_policy_change_alone_is_a_change_of_the_service() {
    let mut st = XdsState::new();
    st.apply(full(&policy_doc(
        &[("c", "lb_policy: RANDOM")],
        "cluster: c",
    )))
    .result()
    .expect("random");
    let accepted = st
        .apply(full(&policy_doc(
            &[("c", "lb_policy: LEAST_REQUEST")],
            "cluster: c",
        )))
        .result()
        .expect("least request");
    let s = svc("10.96.0.1", 80, Protocol::Tcp);
    assert!(accepted.table_changed);
    assert_eq!(
        accepted.changes[&s].as_ref().map(|x| x.policy),
        Some(crate::model::LbPolicy::LeastConn { choices: 2 })
    );
    assert!(accepted.removed.is_empty(), "no endpoint removed");
}

#[test]
fn an_agent_restarted_during_a_dns_outage_keeps_the_kernels_backends() {
    // The kernel held this DNS service's backends when the agent restarted.
    let ext = svc("240.240.0.5", 443, Protocol::Tcp);
    let mut adopted = crate::model::RoutingTable::default();
    adopted.insert(ext, vec![be("192.0.2.1", 443, 2)]);
    let mut st = XdsState::with_previous(adopted);
    st.apply(full(DNS_CLUSTERS)).result().expect("accepted");
    // Every host fails its first resolution: no answers at all.
    let outage = super::dns::Round {
        failed: [
            ("a.ext.example".to_owned(), "timeout".to_owned()),
            ("b.ext.example".to_owned(), "timeout".to_owned()),
        ]
        .into(),
        ..super::dns::Round::default()
    };
    let hosts = ["a.ext.example".to_owned(), "b.ext.example".to_owned()];
    let merged = outage.merge_into(&super::clusters::DnsAnswers::new(), &hosts);
    st.apply_dns("outbound|443||ext.example", merged);
    assert!(st.warming().contains(&ext), "still warming");
    assert_eq!(
        st.table().services[&ext],
        [be("192.0.2.1", 443, 2)],
        "the kernel's backends stay through the outage"
    );
    // DNS answers again: the cluster follows.
    st.apply_dns(
        "outbound|443||ext.example",
        answers(&[("a.ext.example", &["192.0.2.7"]), ("b.ext.example", &[])]),
    );
    assert_eq!(st.table().services[&ext], [be("192.0.2.7", 443, 1)]);
    assert!(!st.warming().contains(&ext));
}

#[test]
fn a_file_sent_again_changes_nothing_and_one_edit_changes_one_service() {
    let mut st = XdsState::new();
    let first = st.apply(full(TCP_EDS)).result().expect("accepted");
    assert!(first.table_changed);
    let reviews = svc("10.96.0.10", 9080, Protocol::Tcp);
    assert!(first.changes.contains_key(&reviews));

    // The same document again (an editor's save without a change, a ConfigMap
    // resync): nothing is re-translated, nothing reaches the kernel.
    let again = st.apply(full(TCP_EDS)).result().expect("accepted");
    assert!(!again.table_changed, "{again:?}");
    assert!(again.changes.is_empty(), "{again:?}");

    // One endpoint edited: that service, and only it, changes.
    let edited = TCP_EDS.replace("10.1.0.1,", "10.1.0.5,");
    assert_ne!(edited, TCP_EDS);
    let one = st.apply(full(&edited)).result().expect("accepted");
    assert_eq!(one.changes.keys().collect::<Vec<_>>(), [&reviews]);
    let backends = &one.changes[&reviews]
        .as_ref()
        .expect("still there")
        .backends;
    assert!(
        backends.iter().any(|b| b.address.to_string() == "10.1.0.5"),
        "{backends:?}"
    );

    // What the document no longer holds is removed: here the listener.
    let cluster = edited
        .find("- \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster")
        .expect("a cluster");
    let without_listener = format!("version_info: \"2\"\nresources:\n{}", &edited[cluster..]);
    let gone = st
        .apply(full(&without_listener))
        .result()
        .expect("accepted");
    assert_eq!(gone.changes.get(&reviews), Some(&None), "{gone:?}");
}

#[test]
fn kept_resources_stay_unsent_and_a_kept_name_the_state_lacks_is_refused() {
    let mut st = XdsState::new();
    st.apply(full(TCP_EDS)).result().expect("accepted");
    let reviews = svc("10.96.0.10", 9080, Protocol::Tcp);
    let Update::Full { resources, .. } = full(TCP_EDS) else {
        unreachable!("full() builds a full update")
    };
    let names: Vec<(Kind, std::sync::Arc<str>)> = resources
        .iter()
        .filter_map(|a| {
            let kind = Kind::from_type_url(&a.type_url)?;
            let r = super::decode::decode_any(a, kind).ok()?;
            Some((kind, r.name().into()))
        })
        .collect();
    assert!(names.len() >= 3, "{names:?}");
    let kept_only = |version: &str, kept| Update::Full {
        version: version.into(),
        resources: Vec::new(),
        kept,
        positions: Vec::new(),
    };

    // Everything kept, nothing sent: nothing is removed, nothing changes.
    let all_kept = st
        .apply(kept_only("2", names.clone()))
        .result()
        .expect("accepted");
    assert!(all_kept.changes.is_empty(), "{all_kept:?}");
    assert!(st.table().services.contains_key(&reviews));

    // The listener neither kept nor sent: removed, as from a whole document.
    let without_listener: Vec<_> = names
        .iter()
        .filter(|(k, _)| *k != Kind::Listener)
        .cloned()
        .collect();
    let gone = st
        .apply(kept_only("3", without_listener))
        .result()
        .expect("accepted");
    assert_eq!(gone.changes.get(&reviews), Some(&None), "{gone:?}");

    // A kept name the state does not hold (the listener just removed) is refused
    // and changes nothing.
    let before = st.table().clone();
    let err = st
        .apply(kept_only("4", names))
        .result()
        .expect_err("the listener is not held");
    assert!(err.0.contains("not held"), "{err}");
    assert_eq!(*st.table(), before);
}

#[test]
fn a_large_update_decodes_on_every_core_and_reports_every_bad_resource_in_order() {
    use prost::Message as _;
    use sockmesh_proto::pb::{
        envoy::config::endpoint::v3::ClusterLoadAssignment, google::protobuf::Any,
    };
    // Above the parallel threshold, with a bad resource in the first and in the
    // last chunk.
    let yaml = |name: &str, port: u32| {
        format!(
            "cluster_name: {name}\nendpoints:\n- lb_endpoints:\n  - endpoint: {{ address: {{ socket_address: {{ address: 10.1.0.1, port_value: {port} }} }} }}\n"
        )
    };
    let any = |name: &str, port: u32| {
        let (cla, _) = super::decode::message_from_text::<ClusterLoadAssignment>(
            "envoy.config.endpoint.v3.ClusterLoadAssignment",
            &yaml(name, port),
        )
        .expect("decodes");
        Any {
            type_url: Kind::Endpoint.type_url().into(),
            value: cla.encode_to_vec(),
        }
    };
    let n = 2_100;
    let added = |bad: &[usize]| -> Vec<(String, String, Any)> {
        (0..n)
            .map(|i| {
                let name = format!("svc-{i}");
                let port = if bad.contains(&i) { 0 } else { 8080 };
                let a = any(&name, port);
                (name, "1".to_owned(), a)
            })
            .collect()
    };
    let mut st = XdsState::new();
    let err = st
        .apply(Update::Delta {
            kind: Kind::Endpoint,
            added: added(&[5, n - 5]),
            removed: Vec::new(),
        })
        .result()
        .expect_err("two bad ports");
    let first = err.0.find("\"svc-5\"").expect("the first chunk's error");
    let last = err
        .0
        .find(&format!("\"svc-{}\"", n - 5))
        .expect("the last chunk's error");
    assert!(first < last, "{err}");
    st.apply(Update::Delta {
        kind: Kind::Endpoint,
        added: added(&[]),
        removed: Vec::new(),
    })
    .result()
    .expect("all good");
}

/// Two TCP services as istiod sends them to a sidecar over delta ADS (listener
/// `VIP_PORT`, cluster and assignment `outbound|PORT||HOST`).
const ISTIOD_TWO_SERVICES: &str = r#"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: 10.96.1.10_80
  address: { socket_address: { address: 10.96.1.10, port_value: 80 } }
  traffic_direction: OUTBOUND
  filter_chains:
  - filters:
    - name: envoy.filters.network.tcp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: outbound|80||web.app.svc.cluster.local
        cluster: outbound|80||web.app.svc.cluster.local
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: 10.96.1.30_80
  address: { socket_address: { address: 10.96.1.30, port_value: 80 } }
  traffic_direction: OUTBOUND
  filter_chains:
  - filters:
    - name: envoy.filters.network.tcp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: outbound|80||old.app.svc.cluster.local
        cluster: outbound|80||old.app.svc.cluster.local
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: outbound|80||web.app.svc.cluster.local
  type: EDS
  eds_cluster_config: { service_name: outbound|80||web.app.svc.cluster.local, eds_config: { ads: {}, initial_fetch_timeout: 0s, resource_api_version: V3 } }
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: outbound|80||old.app.svc.cluster.local
  type: EDS
  eds_cluster_config: { service_name: outbound|80||old.app.svc.cluster.local, eds_config: { ads: {}, initial_fetch_timeout: 0s, resource_api_version: V3 } }
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: outbound|80||web.app.svc.cluster.local
  endpoints:
  - locality: { region: region-1, zone: zone-a }
    lb_endpoints:
    - endpoint: { address: { socket_address: { address: 10.10.1.1, port_value: 8080 } } }
      health_status: HEALTHY
      load_balancing_weight: 1
    load_balancing_weight: 1
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: outbound|80||old.app.svc.cluster.local
  endpoints:
  - locality: { region: region-1, zone: zone-a }
    lb_endpoints:
    - endpoint: { address: { socket_address: { address: 10.10.3.1, port_value: 8080 } } }
      health_status: HEALTHY
      load_balancing_weight: 1
    load_balancing_weight: 1
"#;

/// Found against a live istiod (`istiod_stream`): istiod takes every name of a
/// delta reconnect's `initial_resource_versions` as subscribed, so an
/// assignment kept after its cluster was removed must not be announced, or the
/// new stream watches (and istiod pushes) endpoints nothing uses any more.
#[test]
fn a_delta_reconnect_announces_only_the_resources_still_wanted() {
    let resp = discovery_response_from_text(ISTIOD_TWO_SERVICES).expect("decodes");
    let mut st = XdsState::new();
    for kind in Kind::ALL {
        let added = resp
            .resources
            .iter()
            .filter(|a| a.type_url == kind.type_url())
            .map(|a| {
                (
                    String::new(),
                    "2026-12-07T03:27:39Z/1".to_owned(),
                    a.clone(),
                )
            })
            .collect();
        st.apply(Update::Delta {
            kind,
            added,
            removed: vec![],
        })
        .result()
        .expect("istiod's resources are accepted");
    }
    assert_eq!(st.table().services.len(), 2);
    let web = "outbound|80||web.app.svc.cluster.local";
    let old = "outbound|80||old.app.svc.cluster.local";
    // What a stream's first request announces (`initial_resource_versions`).
    let announced = |st: &XdsState, kind: Kind| {
        let wanted = st.wanted(kind).into_iter().collect();
        let first = super::requests::initial(
            kind,
            &Default::default(),
            &wanted,
            st.resource_versions(kind),
            super::requests::MAX_REQUEST_BYTES,
        );
        // A protobuf map: in no order.
        let mut names = first
            .into_iter()
            .flat_map(|r| r.initial_resource_versions.into_keys())
            .collect::<Vec<_>>();
        names.sort();
        names
    };
    assert_eq!(announced(&st, Kind::Endpoint), [old, web]);
    // The Service is deleted: istiod removes its listener and cluster (delta
    // removals), and sends nothing for the assignment, whose subscription the
    // agent ends.
    for (kind, name) in [(Kind::Listener, "10.96.1.30_80"), (Kind::Cluster, old)] {
        st.apply(Update::Delta {
            kind,
            added: vec![],
            removed: vec![name.into()],
        })
        .result()
        .expect("removal");
    }
    assert_eq!(st.wanted(Kind::Endpoint), [web]);
    assert_eq!(announced(&st, Kind::Endpoint), [web]);
    // Wildcard types announce what they hold.
    assert_eq!(
        announced(&st, Kind::Cluster),
        st.resource_versions(Kind::Cluster)
            .into_keys()
            .collect::<Vec<_>>()
    );
    assert_eq!(announced(&st, Kind::Listener), ["10.96.1.10_80"]);
}

/// Two parts of one update merged: an endpoint the first removed and the
/// second gives a service again is not removed (its sockets stay), one removed
/// by either and given back by neither is.
#[test]
fn merged_parts_remove_only_what_neither_gives_back() {
    use super::state::Accepted;
    use crate::model::{Endpoint, Service};
    let a = svc("10.96.0.1", 80, Protocol::Tcp);
    let b = svc("10.96.0.2", 80, Protocol::Tcp);
    let ep = |ip: &str| Endpoint {
        addr: ip.parse().expect("ip"),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let mut first = Accepted {
        changes: [(a, Some(Service::from(vec![be("10.1.0.2", 80, 1)])))].into(),
        table_changed: true,
        subscriptions_changed: false,
        removed: [ep("10.1.0.1"), ep("10.1.0.9")].into(),
    };
    let second = Accepted {
        changes: [(b, Some(Service::from(vec![be("10.1.0.1", 80, 1)])))].into(),
        table_changed: true,
        subscriptions_changed: true,
        removed: [ep("10.1.0.3")].into(),
    };
    first.merge(second);
    assert_eq!(
        first.removed,
        [ep("10.1.0.9"), ep("10.1.0.3")].into_iter().collect()
    );
    assert_eq!(first.changes.len(), 2);
    assert!(first.subscriptions_changed);
}
