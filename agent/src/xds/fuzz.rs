//! Property tests over the decode → validate → translate path (bounded, run in CI
//! with the unit tests): whatever bytes or text arrive, the agent answers with an
//! accept or a NACK, never a panic, and a NACK leaves the table as it was.

use proptest::prelude::*;
use sockmesh_proto::pb::google::protobuf::Any;

use super::{
    decode::{Kind, discovery_response_from_text},
    state::{Update, XdsState},
};

/// A valid resource set to start from and to mutate.
fn seed() -> Vec<Any> {
    discovery_response_from_text(
        r#"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: l
  address: { socket_address: { address: 10.96.0.1, port_value: 80 } }
  filter_chains: [ { filters: [ { name: t, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, weighted_clusters: { clusters: [ { name: c, weight: 3 }, { name: d, weight: 1 } ] } } } ] } ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: c
  type: EDS
  eds_cluster_config: { eds_config: { ads: {} } }
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: d
  load_assignment: { cluster_name: d, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.1.0.9, port_value: 80 } } } } ] } ] }
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: c
  endpoints: [ { priority: 0, load_balancing_weight: 2, lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.1.0.1, port_value: 80 } } }, load_balancing_weight: 5 } ] } ]
"#,
    )
    .expect("seed decodes")
    .resources
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// Byte-level mutations of valid resources, delivered as delta updates.
    #[test]
    fn mutated_protobuf_never_panics(which in 0usize..4, flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8), truncate in any::<Option<usize>>()) {
        let resources = seed();
        let mut st = XdsState::new();
        st.apply(Update::Full { version: "1".into(), resources: resources.clone(), kept: Vec::new(), positions: Vec::new() }).result().expect("seed accepted");
        let before = st.table().clone();
        let mut any = resources[which].clone();
        for (at, byte) in flips {
            if !any.value.is_empty() {
                let i = at % any.value.len();
                any.value[i] ^= byte;
            }
        }
        if let Some(n) = truncate {
            let n = n % (any.value.len() + 1);
            any.value.truncate(n);
        }
        let kind = Kind::from_type_url(&any.type_url).expect("known type");
        let result = st.apply(Update::Delta { kind, added: vec![(String::new(), "2".into(), any)], removed: vec![] }).result();
        if result.is_err() {
            prop_assert_eq!(st.table(), &before, "a NACK changed the table");
        }
    }

    /// Arbitrary bytes under every type URL, including unknown ones.
    #[test]
    fn random_bytes_never_panic(kind in 0usize..4, value in prop::collection::vec(any::<u8>(), 0..256)) {
        let kind = Kind::ALL[kind];
        let mut st = XdsState::new();
        let any = Any { type_url: kind.type_url().to_owned(), value };
        let _ = st.apply(Update::SotW { kind, version: "x".into(), resources: vec![any] }).result();
    }

    /// Arbitrary text as a file-source document: an error or a response, no panic.
    #[test]
    fn random_text_never_panics(text in "\\PC{0,200}") {
        if let Ok(resp) = discovery_response_from_text(&text) {
            let _ = XdsState::new().apply(Update::Full { version: resp.version_info, resources: resp.resources, kept: Vec::new(), positions: Vec::new() }).result();
        }
    }

    /// Structured YAML with random values in the fields that are validated.
    #[test]
    fn random_field_values_never_panic(addr in "[0-9a-z.:]{0,20}", port in any::<u32>(), weight in any::<u32>(), prio in any::<u32>()) {
        let yaml = format!(
            "resources:\n- {{ \"@type\": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment, cluster_name: c, endpoints: [ {{ priority: {prio}, lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: \"{addr}\", port_value: {port} }} }} }}, load_balancing_weight: {weight} }} ] }} ] }}\n"
        );
        if let Ok(resp) = discovery_response_from_text(&yaml) {
            let _ = XdsState::new().apply(Update::Full { version: String::new(), resources: resp.resources, kept: Vec::new(), positions: Vec::new() }).result();
        }
    }
}

/// The mutations start from a complete, valid mesh: the seed is accepted and
/// translates to one service with both clusters' backends, weighted 3:1.
#[test]
fn seed_is_a_complete_valid_mesh() {
    let mut st = XdsState::new();
    st.apply(Update::Full {
        version: "1".into(),
        resources: seed(),
        kept: Vec::new(),
        positions: Vec::new(),
    })
    .result()
    .expect("seed accepted");
    let services = &st.table().services;
    assert_eq!(services.len(), 1, "{services:?}");
    let backends = services.values().next().expect("one service");
    let weight = |ip: &str| {
        backends
            .iter()
            .find(|b| b.address.to_string() == ip)
            .map(|b| b.weight)
    };
    let (c, d) = (
        weight("10.1.0.1").expect("c"),
        weight("10.1.0.9").expect("d"),
    );
    assert_eq!(c, 3 * d, "cluster weights 3:1: {backends:?}");
}
