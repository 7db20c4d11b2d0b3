//! A bounded fuzz target over the file source's and the ADS client's decoders,
//! run with the unit tests (fixed seed, fixed number of cases): seeded mutations
//! of a 21-service configuration (every kind of listener, cluster and route the
//! translation reads, a service left alone and one passed through) as 400 files
//! and 200 ADS responses. Whatever arrives, nothing panics or hangs, and the good
//! configuration sent again gives the good table back.

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use sockmesh_proto::pb::google::protobuf::Any;

use super::{
    decode::{Kind, discovery_response_from_text, discovery_response_to_json},
    filedoc::{Known, read},
    state::{Update, XdsState},
};
use crate::model::RoutingTable;

const TCP: &str =
    "\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

fn listener(name: &str, vip: &str, port: u16, filter: &str) -> String {
    format!(
        "- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: {name}\n  address: {{ socket_address: {{ address: {vip}, port_value: {port} }} }}\n  filter_chains: [ {{ filters: [ {filter} ] }} ]\n"
    )
}

fn tcp(cluster: &str) -> String {
    format!("{{ name: tcp, typed_config: {{ {TCP}, stat_prefix: s, cluster: \"{cluster}\" }} }}")
}

fn eds_cluster(name: &str, extra: &str) -> String {
    format!(
        "- {{ \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: \"{name}\", type: EDS, eds_cluster_config: {{ eds_config: {{ ads: {{}} }} }}{extra} }}\n"
    )
}

fn assignment(name: &str, i: u32, n: u32) -> String {
    let eps: Vec<String> = (0..n)
        .map(|j| {
            format!(
                "{{ endpoint: {{ address: {{ socket_address: {{ address: 10.1.{i}.{}, port_value: 8080 }} }} }}, load_balancing_weight: {} }}",
                j + 1,
                j + 1
            )
        })
        .collect();
    format!(
        "- \"@type\": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment\n  cluster_name: \"{name}\"\n  endpoints:\n  - locality: {{ zone: a }}\n    load_balancing_weight: 2\n    lb_endpoints: [ {} ]\n  - priority: 1\n    lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 10.9.{i}.1, port_value: 8080 }} }} }} }} ]\n",
        eps.join(", ")
    )
}

/// The 21 services, as a file would hold them.
fn mesh() -> String {
    let mut r = String::from("version_info: \"good\"\nresources:\n");
    // 0-9: TCP services on EDS clusters.
    for i in 0..10u32 {
        let name = format!("tcp-{i}");
        r.push_str(&listener(
            &name,
            &format!("10.96.1.{}", i + 1),
            80,
            &tcp(&name),
        ));
        r.push_str(&eds_cluster(&name, ""));
        r.push_str(&assignment(&name, i, 1 + i % 3));
    }
    // 10-13: one wildcard HTTP listener whose route names four VIPs.
    r.push_str(&listener(
        "0.0.0.0_8080",
        "0.0.0.0",
        8080,
        "{ name: hcm, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: h, rds: { route_config_name: \"8080\", config_source: { ads: {} } } } }",
    ));
    let mut vhosts = Vec::new();
    for j in 0..4u32 {
        let name = format!("http-{j}");
        vhosts.push(format!(
            "{{ name: v{j}, domains: [ \"10.96.2.{}:8080\" ], routes: [ {{ match: {{ prefix: / }}, route: {{ cluster: \"{name}\" }} }} ] }}",
            j + 1
        ));
        r.push_str(&eds_cluster(&name, ""));
        r.push_str(&assignment(&name, 20 + j, 2));
    }
    r.push_str(&format!(
        "- {{ \"@type\": type.googleapis.com/envoy.config.route.v3.RouteConfiguration, name: \"8080\", virtual_hosts: [ {} ] }}\n",
        vhosts.join(", ")
    ));
    // 14: weighted clusters.
    r.push_str(&listener(
        "weighted",
        "10.96.3.1",
        80,
        &format!("{{ name: tcp, typed_config: {{ {TCP}, stat_prefix: s, weighted_clusters: {{ clusters: [ {{ name: tcp-0, weight: 3 }}, {{ name: tcp-1, weight: 1 }} ] }} }} }}"),
    ));
    // 15: STATIC.
    r.push_str(&listener("static", "10.96.3.2", 80, &tcp("static")));
    r.push_str("- { \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: static, type: STATIC, load_assignment: { cluster_name: static, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.2.0.1, port_value: 80 } } } } ] } ] } }\n");
    // 16: UDP.
    r.push_str("- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: dns\n  address: { socket_address: { address: 10.96.0.10, port_value: 53, protocol: UDP } }\n  listener_filters: [ { name: udp, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig, stat_prefix: d, cluster: dns } } ]\n");
    r.push_str(&eds_cluster("dns", ""));
    r.push_str(&assignment("dns", 30, 2));
    // 17: Maglev; 18: least requests.
    r.push_str(&listener("maglev", "10.96.3.3", 80, &tcp("maglev")));
    r.push_str(&eds_cluster(
        "maglev",
        ", lb_policy: MAGLEV, maglev_lb_config: { table_size: 251 }",
    ));
    r.push_str(&assignment("maglev", 31, 3));
    r.push_str(&listener("least", "10.96.3.4", 80, &tcp("least")));
    r.push_str(&eds_cluster(
        "least",
        ", lb_policy: LEAST_REQUEST, least_request_lb_config: { choice_count: 3 }",
    ));
    r.push_str(&assignment("least", 32, 3));
    // 19: passed through; 20: left alone.
    r.push_str(&listener(
        "passthrough",
        "10.96.3.5",
        80,
        &tcp("PassthroughCluster"),
    ));
    r.push_str("- { \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: PassthroughCluster, type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED }\n");
    r.push_str(&listener(
        "dubbo",
        "10.96.3.6",
        20880,
        "{ name: dubbo, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.network.dubbo_proxy.v3.DubboProxy, stat_prefix: d } }",
    ));
    r
}

/// One random edit of `text`'s bytes.
fn mutate(rng: &mut StdRng, text: &[u8]) -> Vec<u8> {
    let mut out = text.to_vec();
    let edits = rng.random_range(1..6);
    for _ in 0..edits {
        let at = rng.random_range(0..=out.len());
        match rng.random_range(0..8) {
            // A byte flipped, deleted, inserted (any byte: not UTF-8 too).
            0 if at < out.len() => out[at] ^= 1 << rng.random_range(0..8),
            1 if at < out.len() => {
                out.remove(at);
            }
            2 => out.insert(at, rng.random()),
            // A structural character.
            3 => out.insert(at, b"{}[],:\"'#-\n "[rng.random_range(0..12)]),
            // A digit run: large numbers, ports, weights, priorities.
            4 => out
                .splice(at..at, b"4294967296".iter().copied())
                .for_each(drop),
            // A span repeated (duplicate names, keys) or dropped.
            5 => {
                let end = (at + rng.random_range(1..400)).min(out.len());
                let span = out[at..end].to_vec();
                out.splice(end..end, span).for_each(drop);
            }
            6 => {
                let end = (at + rng.random_range(1..200)).min(out.len());
                out.drain(at..end);
            }
            // Truncated mid-write.
            _ => out.truncate(at),
        }
    }
    out
}

/// The good configuration again, then its table.
fn restore(st: &mut XdsState, good: &Update) -> RoutingTable {
    let _ = st.apply(good.clone());
    st.table().clone()
}

/// Runs `f` on a thread and fails if it takes longer than `limit` (a hang).
fn within(limit: Duration, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The worker panicked: show its panic.
            if let Err(e) = worker.join() {
                std::panic::resume_unwind(e);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("the fuzz run hung past {limit:?}"),
    }
}

fn full(resources: Vec<Any>) -> Update {
    Update::Full {
        version: "good".into(),
        resources,
        kept: Vec::new(),
        positions: Vec::new(),
    }
}

#[test]
fn the_mesh_is_21_services_of_every_kind() {
    let resp = discovery_response_from_text(&mesh()).expect("decodes");
    let mut st = XdsState::new();
    st.apply(full(resp.resources)).result().expect("accepted");
    // 21 services: 19 in the table, one passed through, one left alone.
    assert_eq!(
        st.table().services.len(),
        19,
        "{:?}",
        st.table().services.keys()
    );
    assert_eq!(st.passthrough().len(), 1);
    assert_eq!(st.left_alone().len(), 1);
}

#[test]
fn mutated_files_never_panic_or_hang_and_the_good_file_restores_the_table() {
    within(Duration::from_secs(600), || {
        let yaml = mesh();
        let resp = discovery_response_from_text(&yaml).expect("decodes");
        let json = discovery_response_to_json(&resp).expect("JSON");
        let good = full(resp.resources);
        let mut st = XdsState::new();
        st.apply(good.clone()).result().expect("good");
        let want = st.table().clone();
        let mut rng = StdRng::seed_from_u64(29);
        // What the split decode remembers of the good JSON file: mutated files are
        // read against it, so resources it recognises are kept, not decoded.
        let known = read(&json, &Known::default()).expect("good JSON").next;
        let (mut refused, mut applied) = (0, 0);
        for case in 0..400 {
            let base = if case % 2 == 0 { &yaml } else { &json };
            let bytes = mutate(&mut rng, base.as_bytes());
            let started = Instant::now();
            let outcome = super::position::utf8(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|text| read(text, &known).map_err(|e| e.to_string()));
            match outcome {
                Err(_) => refused += 1,
                Ok(r) => {
                    applied += 1;
                    let _ = st.apply(Update::Full {
                        version: r.version,
                        resources: r.changed,
                        kept: r.kept,
                        positions: r.positions,
                    });
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "case {case} took {:?}",
                started.elapsed()
            );
            // The file fixed: the good table.
            assert_eq!(restore(&mut st, &good), want, "case {case}");
        }
        assert!(
            refused > 40 && applied > 40,
            "refused {refused}, applied {applied}"
        );
    });
}

#[test]
fn mutated_ads_responses_never_panic_or_hang_and_the_good_state_restores_the_table() {
    within(Duration::from_secs(600), || {
        let resp = discovery_response_from_text(&mesh()).expect("decodes");
        let by_kind = |kind: Kind| -> Vec<Any> {
            resp.resources
                .iter()
                .filter(|a| a.type_url == kind.type_url())
                .cloned()
                .collect()
        };
        let good: Vec<Update> = Kind::ALL
            .into_iter()
            .map(|kind| Update::SotW {
                kind,
                version: "good".into(),
                resources: by_kind(kind),
            })
            .collect();
        let mut st = XdsState::new();
        for u in &good {
            st.apply(u.clone()).result().expect("good");
        }
        let want = st.table().clone();
        assert_eq!(want.services.len(), 19);
        let mut rng = StdRng::seed_from_u64(2929);
        for case in 0..200 {
            let kind = Kind::ALL[rng.random_range(0..4)];
            let mut resources = by_kind(kind);
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..resources.len());
                match rng.random_range(0..5) {
                    0 => resources[i].value = mutate(&mut rng, &resources[i].value),
                    1 => {
                        resources[i].type_url = Kind::ALL[rng.random_range(0..4)].type_url().into()
                    }
                    2 => {
                        let copy = resources[i].clone();
                        resources.push(copy);
                    }
                    3 => {
                        resources.remove(i);
                    }
                    _ => {
                        let n = resources[i].value.len();
                        resources[i].value.truncate(rng.random_range(0..=n));
                    }
                }
                if resources.is_empty() {
                    break;
                }
            }
            let update = if rng.random_range(0..2) == 0 {
                Update::SotW {
                    kind,
                    version: format!("m{case}"),
                    resources,
                }
            } else {
                Update::Delta {
                    kind,
                    added: resources
                        .into_iter()
                        .map(|a| (String::new(), format!("m{case}"), a))
                        .collect(),
                    removed: Vec::new(),
                }
            };
            let started = Instant::now();
            let _ = st.apply(update);
            assert!(started.elapsed() < Duration::from_secs(20), "case {case}");
            for u in &good {
                let _ = st.apply(u.clone());
            }
            assert_eq!(st.table(), &want, "case {case}");
        }
    });
}
