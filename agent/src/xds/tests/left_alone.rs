//! Listeners whose terminal filter sockmesh does not interpret: valid
//! configuration left alone, as pass-through leaves traffic alone. Envoy's own
//! behaviour is the oracle: a connection to VIP:port reaches the listener bound to
//! it, whose filter handles it; a wildcard listener's virtual host naming the same
//! VIP is never consulted.

use super::full;
use crate::{
    model::Protocol,
    xds::state::{Note, XdsState},
};

/// Aeraki's shape: a Dubbo service behind `meta_protocol_proxy` in a TypedStruct,
/// on a listener bound to the VIP; a wildcard HTTP listener on the same port whose
/// virtual host names the VIP; a plain TCP service; a UDP listener whose filter is
/// Envoy's DNS filter.
const MESH: &str = r#"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: 240.240.0.3_20880
  address: { socket_address: { address: 240.240.0.3, port_value: 20880 } }
  traffic_direction: OUTBOUND
  filter_chains:
  - filters:
    - name: envoy.filters.network.meta_protocol_proxy
      typed_config:
        "@type": type.googleapis.com/udpa.type.v1.TypedStruct
        type_url: type.googleapis.com/aeraki.meta_protocol_proxy.v1alpha.MetaProtocolProxy
        value: { stat_prefix: dubbo, application_protocol: dubbo }
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: 0.0.0.0_20880
  address: { socket_address: { address: 0.0.0.0, port_value: 20880 } }
  filter_chains:
  - filters:
    - { name: hcm, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: s, route_config: { name: r, virtual_hosts: [ { name: v, domains: [ "240.240.0.3", "240.240.0.4" ], routes: [ { match: { prefix: / }, route: { cluster: web } } ] } ] } } }
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: 10.96.0.10_53
  address: { socket_address: { address: 10.96.0.10, port_value: 53, protocol: UDP } }
  listener_filters:
  - { name: envoy.filters.udp.dns_filter, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig, stat_prefix: d } }
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: 10.96.0.20_80
  address: { socket_address: { address: 10.96.0.20, port_value: 80 } }
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: web } } ] } ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  load_assignment: { cluster_name: web, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.244.1.5, port_value: 8080 } } } } ] } ] }
"#;

#[test]
fn a_listener_sockmesh_cannot_interpret_is_applied_left_alone_and_listed() {
    let mut st = XdsState::new();
    st.apply(full(MESH)).result().expect("valid configuration");
    let services: Vec<String> = st
        .table()
        .services
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        services,
        ["10.96.0.20:80/tcp", "240.240.0.4:20880/tcp"],
        "the Dubbo VIP is the bound listener's, left alone; the virtual host keeps the VIP no listener binds"
    );
    assert!(st.passthrough().is_empty() && st.warming().is_empty());
    let left: Vec<(String, Vec<String>)> = st.left_alone();
    let names: Vec<&str> = left.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(names, ["10.96.0.10_53", "240.240.0.3_20880"]);
    let why = left
        .iter()
        .flat_map(|(_, w)| w)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        why.contains("\"envoy.filters.network.meta_protocol_proxy\" (type.googleapis.com/udpa.type.v1.TypedStruct wrapping type.googleapis.com/aeraki.meta_protocol_proxy.v1alpha.MetaProtocolProxy)"),
        "{why}"
    );
    assert!(why.contains("no udp_proxy among its filters"), "{why}");
    let notes = st.take_new_notes();
    let left_notes = notes
        .iter()
        .filter(|n| matches!(n, Note::LeftAlone(_)))
        .count();
    assert_eq!(left_notes, 2, "{notes:?}");

    // The Dubbo listener goes: the wildcard listener's virtual host takes its VIP.
    let without = MESH
        .replace("  name: 240.240.0.3_20880\n", "  name: gone\n")
        .replace(
            "address: { socket_address: { address: 240.240.0.3, port_value: 20880 } }",
            "address: { socket_address: { address: 240.240.0.9, port_value: 20881 } }",
        );
    st.apply(full(&without)).result().expect("valid");
    assert!(
        st.table()
            .services
            .contains_key(&super::svc("240.240.0.3", 20880, Protocol::Tcp)),
        "{:?}",
        st.table().services.keys()
    );
    // What is remembered as logged is what stands: the note went with its
    // listener, so it is logged again when the listener returns.
    let _ = st.take_new_notes();
    st.apply(full(MESH)).result().expect("valid");
    let again = st.take_new_notes();
    assert!(
        again.iter().any(|n| n.text().contains("240.240.0.3_20880")),
        "{again:?}"
    );
}
