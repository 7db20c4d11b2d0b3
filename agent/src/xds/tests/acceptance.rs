//! What of an update is accepted, as Envoy decides it: each refused resource keeps
//! its last good version and is named in the NACK, every valid one is applied
//! (`CdsApiHelper::onConfigUpdate`, `LdsApiImpl::onConfigUpdate`, and EDS/RDS per
//! resource); over state of the world, delta and the file source alike.

use super::{full, sotw};
use crate::{
    model::LbPolicy,
    xds::{
        decode::{Kind, discovery_response_from_text},
        state::{Applied, Update, XdsState},
    },
};

const TCP: &str =
    "\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

fn listener(name: &str, vip: &str) -> String {
    format!(
        "- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: {name}\n  address: {{ socket_address: {{ address: {vip}, port_value: 80 }} }}\n  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ {TCP}, stat_prefix: s, cluster: {name} }} }} ] }} ]\n"
    )
}

fn cluster(name: &str, extra: &str) -> String {
    format!(
        "- {{ \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: {name}, type: EDS, eds_cluster_config: {{ eds_config: {{ ads: {{}} }} }}{extra} }}\n"
    )
}

fn assignment(name: &str, ip: &str, port: u32) -> String {
    format!(
        "- \"@type\": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment\n  cluster_name: {name}\n  endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }} }} ] }} ]\n"
    )
}

fn doc(parts: &[String]) -> String {
    format!("resources:\n{}", parts.concat())
}

/// Three services a, b, c: VIPs 10.96.0.1-3, endpoints 10.1.0.1-3.
fn three() -> XdsState {
    let mut st = XdsState::new();
    let names = ["a", "b", "c"];
    let parts: Vec<String> = names
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            [
                listener(n, &format!("10.96.0.{}", i + 1)),
                cluster(n, ""),
                assignment(n, &format!("10.1.0.{}", i + 1), 80),
            ]
        })
        .collect();
    st.apply(full(&doc(&parts)))
        .result()
        .expect("three services");
    assert_eq!(lines(&st).len(), 3);
    st
}

fn lines(st: &XdsState) -> Vec<String> {
    super::table_lines(st.table())
}

/// The names the NACK refused, and that it names exactly those.
fn refused_names(applied: &Applied) -> Vec<String> {
    let nack = applied.nack.as_ref().expect("a NACK");
    let names: Vec<String> = applied.refused.iter().map(|r| r.name.clone()).collect();
    for r in &applied.refused {
        assert!(nack.0.contains(&r.error), "{nack} lacks {}", r.error);
    }
    names
}

fn policy(st: &XdsState, vip: &str) -> LbPolicy {
    st.table().services[&super::svc(vip, 80, crate::model::Protocol::Tcp)].policy
}

#[test]
fn one_bad_listener_among_good_ones_over_sotw_delta_and_file() {
    // a and c move to new VIPs; b's new version names no IP.
    let update = [
        listener("a", "10.96.1.1"),
        listener("b", "not-an-ip"),
        listener("c", "10.96.1.3"),
    ];
    let want = [
        "10.96.0.2:80/tcp -> 10.1.0.2:80 w1",
        "10.96.1.1:80/tcp -> 10.1.0.1:80 w1",
        "10.96.1.3:80/tcp -> 10.1.0.3:80 w1",
    ];
    let mut st = three();
    let applied = st.apply(sotw(Kind::Listener, "2", &doc(&update)));
    assert_eq!(refused_names(&applied), ["b"]);
    assert!(applied.nack.as_ref().is_some_and(|n| n.0.contains(
        "Listener \"b\": address.socket_address.address: \"not-an-ip\" is not an IP address"
    )));
    assert_eq!(
        lines(&st),
        want,
        "a and c applied, b keeps its last good version"
    );
    assert_eq!(
        st.version(Kind::Listener),
        "",
        "a NACK does not take the version"
    );
    assert!(st.refused()[&Kind::Listener].contains_key("b"));

    let mut st = three();
    let resp = discovery_response_from_text(&doc(&update)).expect("decodes");
    let added = ["a", "b", "c"]
        .iter()
        .zip(resp.resources)
        .map(|(n, a)| ((*n).to_owned(), "v2".to_owned(), a))
        .collect();
    let applied = st.apply(Update::Delta {
        kind: Kind::Listener,
        added,
        removed: vec![],
    });
    assert_eq!(refused_names(&applied), ["b"]);
    assert_eq!(lines(&st), want);
    assert_eq!(
        st.resource_versions(Kind::Listener)
            .keys()
            .collect::<Vec<_>>(),
        ["a", "c"],
        "a refused resource's version is not taken"
    );

    let mut st = three();
    let mut file: Vec<String> = update.to_vec();
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        file.push(cluster(n, ""));
        file.push(assignment(n, &format!("10.1.0.{}", i + 1), 80));
    }
    let applied = st.apply(full(&doc(&file)));
    assert_eq!(refused_names(&applied), ["b"]);
    assert_eq!(lines(&st), want);
    assert_eq!(st.stats()[&Kind::Listener].rejected, 1);
    assert_eq!(
        st.stats()[&Kind::Cluster].rejected,
        0,
        "only the listener type NACKed"
    );
}

#[test]
fn one_bad_cluster_among_good_ones_keeps_its_last_good_version() {
    let update = [
        cluster("a", ", lb_policy: LEAST_REQUEST"),
        cluster(
            "b",
            ", lb_policy: LEAST_REQUEST, least_request_lb_config: { choice_count: 1 }",
        ),
        cluster("c", ", lb_policy: LEAST_REQUEST"),
    ];
    for delta in [false, true] {
        let mut st = three();
        let applied = if delta {
            let resp = discovery_response_from_text(&doc(&update)).expect("decodes");
            st.apply(Update::Delta {
                kind: Kind::Cluster,
                added: resp
                    .resources
                    .into_iter()
                    .map(|a| (String::new(), "v2".to_owned(), a))
                    .collect(),
                removed: vec![],
            })
        } else {
            st.apply(sotw(Kind::Cluster, "2", &doc(&update)))
        };
        assert_eq!(refused_names(&applied), ["b"], "delta: {delta}");
        let least = LbPolicy::LeastConn { choices: 2 };
        assert_eq!(policy(&st, "10.96.0.1"), least);
        assert_eq!(
            policy(&st, "10.96.0.2"),
            LbPolicy::Random,
            "b's last good cluster"
        );
        assert_eq!(policy(&st, "10.96.0.3"), least);
    }
}

#[test]
fn one_bad_assignment_among_good_ones() {
    let update = [
        assignment("a", "10.1.1.1", 80),
        assignment("b", "10.1.1.2", 0),
        assignment("c", "10.1.1.3", 80),
    ];
    let mut st = three();
    let applied = st.apply(sotw(Kind::Endpoint, "2", &doc(&update)));
    assert_eq!(refused_names(&applied), ["b"]);
    assert_eq!(
        lines(&st),
        [
            "10.96.0.1:80/tcp -> 10.1.1.1:80 w1",
            "10.96.0.2:80/tcp -> 10.1.0.2:80 w1",
            "10.96.0.3:80/tcp -> 10.1.1.3:80 w1",
        ]
    );
    // b fixed: accepted, no longer refused.
    st.apply(sotw(
        Kind::Endpoint,
        "3",
        &doc(&[assignment("b", "10.1.1.2", 80)]),
    ))
    .result()
    .expect("fixed");
    assert!(st.refused().is_empty(), "{:?}", st.refused());
    assert!(lines(&st).contains(&"10.96.0.2:80/tcp -> 10.1.1.2:80 w1".to_owned()));
}

#[test]
fn a_refused_listener_no_longer_sent_is_forgotten() {
    let mut st = three();
    // b held and refused; d new and refused.
    let _ = st.apply(sotw(
        Kind::Listener,
        "2",
        &doc(&[
            listener("a", "10.96.0.1"),
            listener("b", "x"),
            listener("c", "10.96.0.3"),
            listener("d", "y"),
        ]),
    ));
    assert_eq!(st.refused()[&Kind::Listener].len(), 2);
    st.apply(sotw(
        Kind::Listener,
        "3",
        &doc(&[listener("a", "10.96.0.1"), listener("c", "10.96.0.3")]),
    ))
    .result()
    .expect("b and d gone");
    assert!(st.refused().is_empty(), "{:?}", st.refused());
    assert_eq!(lines(&st).len(), 2);
}

#[test]
fn a_name_twice_keeps_the_first_in_state_of_the_world_and_refuses_a_delta() {
    let mut st = three();
    let twice = [
        cluster("a", ", lb_policy: LEAST_REQUEST"),
        cluster("a", ""),
        cluster("b", ""),
        cluster("c", ""),
    ];
    let applied = st.apply(sotw(Kind::Cluster, "2", &doc(&twice)));
    assert_eq!(refused_names(&applied), ["a"]);
    assert!(
        applied.refused[0]
            .error
            .contains("duplicate cluster a found")
    );
    assert_eq!(policy(&st, "10.96.0.1"), LbPolicy::LeastConn { choices: 2 });

    let mut st = three();
    let before = lines(&st);
    let resp = discovery_response_from_text(&doc(&twice)).expect("decodes");
    let applied = st.apply(Update::Delta {
        kind: Kind::Cluster,
        added: resp
            .resources
            .into_iter()
            .map(|a| (String::new(), "v2".to_owned(), a))
            .collect(),
        removed: vec![],
    });
    assert_eq!(
        applied.nack.map(|n| n.0),
        Some("duplicate name a found among added/updated resources".to_owned())
    );
    assert_eq!(lines(&st), before);
    assert_eq!(
        policy(&st, "10.96.0.1"),
        LbPolicy::Random,
        "nothing applied"
    );
}

#[test]
fn an_undecodable_resource_refuses_the_update_whole() {
    let mut st = three();
    let before = lines(&st);
    let Update::SotW { mut resources, .. } = sotw(
        Kind::Endpoint,
        "2",
        &doc(&[
            assignment("a", "10.1.1.1", 80),
            assignment("c", "10.1.1.3", 80),
        ]),
    ) else {
        unreachable!("sotw() builds a SotW update")
    };
    resources[1].value = vec![0xff, 0xff, 0xff];
    let applied = st.apply(Update::SotW {
        kind: Kind::Endpoint,
        version: "2".into(),
        resources,
    });
    let nack = applied.nack.expect("refused");
    assert!(
        nack.0.contains("refused whole") && nack.0.contains("ClusterLoadAssignment resources[1]"),
        "{nack}"
    );
    assert!(applied.refused.is_empty());
    assert_eq!(lines(&st), before, "a is not applied either");
}

/// Assignments no cluster references any more are dropped with their versions,
/// so a reconnect does not announce them (and istiod does not watch them again).
#[test]
fn assignments_nothing_references_are_pruned_with_their_versions() {
    let mut st = XdsState::new();
    let delta = |kind: Kind, parts: &[String]| {
        let resp = discovery_response_from_text(&doc(parts)).expect("decodes");
        Update::Delta {
            kind,
            added: resp
                .resources
                .into_iter()
                .map(|a| (String::new(), "v1".to_owned(), a))
                .collect(),
            removed: vec![],
        }
    };
    st.apply(delta(Kind::Cluster, &[cluster("a", ""), cluster("b", "")]))
        .result()
        .expect("clusters");
    st.apply(delta(
        Kind::Endpoint,
        &[
            assignment("a", "10.1.0.1", 80),
            assignment("b", "10.1.0.2", 80),
        ],
    ))
    .result()
    .expect("endpoints");
    assert_eq!(st.resource_versions(Kind::Endpoint).len(), 2);
    st.apply(Update::Delta {
        kind: Kind::Cluster,
        added: vec![],
        removed: vec!["b".into()],
    })
    .result()
    .expect("b gone");
    assert_eq!(st.wanted(Kind::Endpoint), ["a"]);
    assert_eq!(
        st.resource_versions(Kind::Endpoint)
            .keys()
            .collect::<Vec<_>>(),
        ["a"]
    );
    assert!(!st.resources().endpoints.contains_key("b"));
}

/// What an update removed outright (for `--terminate-removed-connections`): an
/// endpoint gone, not one that drains.
#[test]
fn an_endpoint_gone_is_removed_one_draining_is_not() {
    let mut st = three();
    let draining = "- \"@type\": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment\n  cluster_name: b\n  endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.1.0.2, port_value: 80 } } }, health_status: DRAINING } ] } ]\n".to_owned();
    let accepted = st
        .apply(sotw(
            Kind::Endpoint,
            "2",
            &doc(&[assignment("a", "10.1.1.1", 80), draining]),
        ))
        .result()
        .expect("accepted");
    let removed: Vec<String> = accepted
        .removed
        .iter()
        .map(|e| format!("{}:{}", e.addr, e.port))
        .collect();
    assert_eq!(removed, ["10.1.0.1:80"]);
}
