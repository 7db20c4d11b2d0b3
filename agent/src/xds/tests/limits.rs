//! Node-local limits never refuse valid configuration: a service with more
//! endpoints than one may have gets a subset, the maps at capacity leave what
//! does not fit out (or a subset, or the previous version) and list it, and room
//! returning heals it.

use prost::Message as _;
use sockmesh_common::MAX_BACKENDS_PER_SERVICE;
use sockmesh_proto::pb::{
    envoy::config::{
        core::v3::{Address, SocketAddress, address, socket_address},
        endpoint::v3::{
            ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
        },
    },
    google::protobuf::Any,
};

use super::{full, svc};
use crate::{
    model::Protocol,
    xds::{
        decode::Kind,
        fit::Limit,
        state::{Update, XdsState},
    },
};

/// A listener on `vip`:80 to EDS cluster `name`.
fn listener_and_cluster(name: &str, vip: &str) -> String {
    format!(
        "- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: {name}\n  address: {{ socket_address: {{ address: {vip}, port_value: 80 }} }}\n  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: {name} }} }} ] }} ]\n- {{ \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: {name}, type: EDS, eds_cluster_config: {{ eds_config: {{ ads: {{}} }} }} }}\n"
    )
}

/// A ClusterLoadAssignment of `n` endpoints, built directly (a YAML document of
/// 16,000 endpoints takes seconds to decode by reflection in a debug build).
fn assignment(name: &str, n: u32, first: u32) -> Any {
    let endpoint = |i: u32| LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: std::net::Ipv4Addr::from(0x0a00_0000 + first + i).to_string(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(8080)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    let cla = ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: (0..n).map(endpoint).collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    Any {
        type_url: Kind::Endpoint.type_url().to_owned(),
        value: cla.encode_to_vec(),
    }
}

fn eds(assignments: Vec<Any>) -> Update {
    Update::SotW {
        kind: Kind::Endpoint,
        version: "e".into(),
        resources: assignments,
    }
}

#[test]
fn a_service_over_the_endpoint_limit_is_accepted_with_a_subset_and_listed() {
    let max = MAX_BACKENDS_PER_SERVICE;
    assert!(max >= 16_384, "the limit issue 29 asks for");
    let mut st = XdsState::new();
    st.set_subset_seed("node-a");
    st.apply(full(&format!(
        "resources:\n{}",
        listener_and_cluster("big", "10.96.0.1")
    )))
    .result()
    .expect("accepted");
    st.apply(eds(vec![assignment("big", max + 100, 0)]))
        .result()
        .expect("a node limit is not a NACK");
    let big = svc("10.96.0.1", 80, Protocol::Tcp);
    assert_eq!(st.table().services[&big].len(), max as usize);
    let l = &st.limited()[&big];
    assert_eq!(
        (l.limit.clone(), l.endpoints, l.programmed),
        (Limit::Endpoints, max as usize + 100, max as usize)
    );
    // Back under the limit: it fits again, and the listing goes.
    st.apply(eds(vec![assignment("big", max, 0)]))
        .result()
        .expect("accepted");
    assert_eq!(st.table().services[&big].len(), max as usize);
    assert!(st.limited().is_empty());
}

#[test]
fn maps_at_capacity_leave_newcomers_out_never_push_a_service_out_and_heal() {
    let mut st = XdsState::new();
    st.set_limits(crate::dataplane::Limits {
        services: 2,
        ..crate::dataplane::Limits::default()
    });
    let doc = |names: &[(&str, &str)]| {
        let mut d = String::from("resources:\n");
        for (n, vip) in names {
            d.push_str(&listener_and_cluster(n, vip));
        }
        full(&d)
    };
    let (a, b, c) = (
        svc("10.96.0.1", 80, Protocol::Tcp),
        svc("10.96.0.2", 80, Protocol::Tcp),
        svc("10.96.0.3", 80, Protocol::Tcp),
    );
    st.apply(doc(&[("b", "10.96.0.2"), ("c", "10.96.0.3")]))
        .result()
        .expect("two");
    st.apply(eds(vec![assignment("b", 1, 10), assignment("c", 1, 20)]))
        .result()
        .expect("eds");
    assert_eq!(st.table().services.len(), 2);
    // a arrives (and sorts first by address): it waits, b and c stay.
    st.apply(doc(&[
        ("a", "10.96.0.1"),
        ("b", "10.96.0.2"),
        ("c", "10.96.0.3"),
    ]))
    .result()
    .expect("three: accepted");
    st.apply(eds(vec![
        assignment("a", 1, 0),
        assignment("b", 1, 10),
        assignment("c", 1, 20),
    ]))
    .result()
    .expect("accepted");
    assert!(st.table().services.contains_key(&b) && st.table().services.contains_key(&c));
    assert!(!st.table().services.contains_key(&a));
    let l = &st.limited()[&a];
    assert_eq!(l.limit, Limit::LeftOut);
    assert!(
        l.why
            .contains("3 services exceed the limit of 2 (--max-services)"),
        "{}",
        l.why
    );
    // c goes: room returns in the same update, and a takes it.
    st.apply(doc(&[("a", "10.96.0.1"), ("b", "10.96.0.2")]))
        .result()
        .expect("two again");
    assert!(
        st.table().services.contains_key(&a),
        "{:?}",
        st.table().services.keys()
    );
    assert!(st.limited().is_empty());
}

#[test]
fn a_service_in_the_kernel_that_grows_past_the_room_keeps_what_fits_or_its_last_version() {
    let mut st = XdsState::new();
    st.set_limits(crate::dataplane::Limits {
        backends: 6,
        ..crate::dataplane::Limits::default()
    });
    st.apply(full(&format!(
        "resources:\n{}",
        listener_and_cluster("web", "10.96.0.1")
    )))
    .result()
    .expect("accepted");
    st.apply(eds(vec![assignment("web", 2, 0)]))
        .result()
        .expect("2 fit");
    let web = svc("10.96.0.1", 80, Protocol::Tcp);
    // 10 new endpoints (a rollout): written beside the 2 in place, 4 fit.
    st.apply(eds(vec![assignment("web", 10, 100)]))
        .result()
        .expect("accepted");
    let programmed = &st.table().services[&web];
    assert_eq!(programmed.len(), 4);
    assert!(
        programmed.iter().all(|b| u32::from(match b.address {
            std::net::IpAddr::V4(v4) => v4,
            std::net::IpAddr::V6(_) => unreachable!("IPv4"),
        }) >= 0x0a00_0000 + 100),
        "only the new endpoints: none of the two the control plane removed"
    );
    assert_eq!(st.limited()[&web].limit, Limit::Room);
    // Maps raised (a restart with larger --max-backends, or room freed): the
    // next heal programs all 10.
    st.set_limits(crate::dataplane::Limits::default());
    let healed = st.heal();
    assert!(healed.table_changed);
    assert_eq!(st.table().services[&web].len(), 10);
    assert!(st.limited().is_empty());
    // No room even for one more endpoint beside the old ones: the last version
    // stays (listed as stale) rather than an empty service.
    st.set_limits(crate::dataplane::Limits {
        backends: 10,
        ..crate::dataplane::Limits::default()
    });
    st.apply(eds(vec![assignment("web", 10, 200)]))
        .result()
        .expect("accepted");
    assert_eq!(st.table().services[&web].len(), 10);
    assert_eq!(st.limited()[&web].limit, Limit::Stale);
}

#[test]
fn the_slot_map_at_capacity_limits_the_service_not_the_update() {
    let mut st = XdsState::new();
    // 1:3 weights take 4 slots; two services 8, and a rewrite needs its new 4
    // beside its old 4.
    st.set_limits(crate::dataplane::Limits {
        slots: 11,
        ..crate::dataplane::Limits::default()
    });
    let weighted = |name: &str, vip: &str, second: &str| {
        format!(
            "- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: {name}\n  address: {{ socket_address: {{ address: {vip}, port_value: 80 }} }}\n  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: {name} }} }} ] }} ]\n- \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: {name}\n  type: STATIC\n  load_assignment: {{ cluster_name: {name}, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 10.1.0.1, port_value: 80 }} }} }}, load_balancing_weight: 1 }}, {{ endpoint: {{ address: {{ socket_address: {{ address: {second}, port_value: 80 }} }} }}, load_balancing_weight: 3 }} ] }} ] }}\n"
        )
    };
    st.apply(full(&format!(
        "resources:\n{}{}",
        weighted("a", "10.96.0.1", "10.1.0.2"),
        weighted("b", "10.96.0.2", "10.1.0.2")
    )))
    .result()
    .expect("8 slots fit in 11");
    let applied = st.apply(full(&format!(
        "resources:\n{}{}",
        weighted("a", "10.96.0.1", "10.1.0.3"),
        weighted("b", "10.96.0.2", "10.1.0.2")
    )));
    assert!(applied.nack.is_none(), "{:?}", applied.nack);
    let a = svc("10.96.0.1", 80, Protocol::Tcp);
    let l = &st.limited()[&a];
    assert_eq!(l.limit, Limit::Room);
    assert!(
        l.why
            .contains("exceed the slot map's capacity of 11 (--max-slots)"),
        "{}",
        l.why
    );
    assert_eq!(st.table().services[&a].len(), 1);
    assert!(
        st.table().services[&a]
            .iter()
            .all(|b| b.address.to_string() != "10.1.0.2"),
        "the endpoint the control plane removed is not kept"
    );
}

/// Room that returns without a service shrinking (a Maglev service becoming
/// weighted random frees a Maglev table) is found by the core's tick.
#[test]
fn the_core_tick_heals_what_an_update_freed_without_shrinking() {
    use std::{sync::Arc, time::Instant};

    use crate::{
        dataplane::task::TableSink as _,
        xds::{core::Core, tests::dump::Memory},
    };
    let sink = Memory(
        Arc::default(),
        Some(crate::model::Limits {
            maglev: 1,
            ..crate::model::Limits::default()
        }),
    );
    let mut core = Core::new(crate::dataplane::task::DatapathHandle::spawn(
        Box::new(sink.clone()),
        false,
    ));
    let doc = |a_policy: &str| {
        let cluster = |name: &str, policy: &str| {
            format!(
                "- {{ \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: {name}, lb_policy: {policy}, load_assignment: {{ cluster_name: {name}, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 10.1.0.1, port_value: 80 }} }} }} }} ] }} ] }} }}\n"
            )
        };
        let listener = |name: &str, vip: &str| {
            format!(
                "- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: {name}\n  address: {{ socket_address: {{ address: {vip}, port_value: 80 }} }}\n  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: {name} }} }} ] }} ]\n"
            )
        };
        full(&format!(
            "resources:\n{}{}{}{}",
            cluster("a", a_policy),
            cluster("b", "MAGLEV"),
            listener("a", "10.96.0.1"),
            listener("b", "10.96.0.2")
        ))
    };
    let t0 = Instant::now();
    core.handle(doc("MAGLEV"), t0).written.wait_blocking();
    let b = svc("10.96.0.2", 80, Protocol::Tcp);
    assert_eq!(core.state().limited()[&b].limit, Limit::LeftOut);
    core.handle(doc("RANDOM"), t0).written.wait_blocking();
    assert!(
        !sink.table().services.contains_key(&b),
        "not healed by the update"
    );
    core.tick(Instant::now());
    core.flush().wait_blocking();
    assert!(sink.table().services.contains_key(&b), "healed by the tick");
    assert!(core.state().limited().is_empty());
}
