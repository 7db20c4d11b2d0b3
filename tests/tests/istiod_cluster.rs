//! What a real cluster always has, against a live istiod, delta and SotW: the
//! cluster-local services (`kubernetes.default`, kube-dns), whose endpoints istiod
//! sends only to a proxy of their cluster (`CLUSTER_ID`); a Service with
//! `internalTrafficPolicy: Local`, whose endpoints it sends only when they are on
//! the proxy's node (`NODE_NAME`); and an ambient namespace beside sidecar ones,
//! whose pods' endpoints come as HBONE tunnels (`envoy_internal_address`) unless
//! the node says `DISABLE_HBONE_SEND`, which sockmesh does.
//!
//! Six agents, each a node of its own: on node-a and on node-b of the cluster
//! (`Kubernetes`), and on node-b of another cluster (`other`), each speaking delta
//! and SotW. Each must get the backends Envoy would get as a sidecar on that node. The expectations are written from those rules
//! (istiod's `pilot/pkg/model/cluster_local.go`, `endpoint_builder.go`) and the
//! Kubernetes objects, not from istiod's output.

use std::time::Duration;

use sockmesh_tests::{
    istiod::{Istiod, Options},
    istiod_lab::{Agent, AgentSpec, NODE_A, NODE_B, Pods, Table, base_objects, table},
    kube::{self, Endpoint, Pod, Port, tcp},
    wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");
/// The API server's address (an endpoint without a Pod, as the apiserver
/// writes it for itself).
const APISERVER: &str = "10.10.0.100";
const COREDNS: [(&str, &str, &str); 2] = [
    ("coredns-1", "10.10.1.31", NODE_A),
    ("coredns-2", "10.10.1.32", NODE_B),
];
/// The `internalTrafficPolicy: Local` service's pods.
const CACHE: [(&str, &str, &str); 3] = [
    ("cache-a1", "10.10.1.41", NODE_A),
    ("cache-a2", "10.10.1.42", NODE_A),
    ("cache-b1", "10.10.1.43", NODE_B),
];
/// The ambient namespace's pods, which istio-cni has annotated.
const AMBIENT: [(&str, &str, &str); 2] = [
    ("amb-1", "10.10.2.1", NODE_A),
    ("amb-2", "10.10.2.2", NODE_B),
];
/// A plain sidecar namespace's pods beside them.
const SIDECAR: [(&str, &str, &str); 2] = [
    ("web-1", "10.10.3.1", NODE_A),
    ("web-2", "10.10.3.2", NODE_B),
];

fn slice_of(ns: &str, svc: &str, pods: &[(&str, &str, &str)], ports: &[(&str, u16)]) -> String {
    let eps: Vec<Endpoint> = pods
        .iter()
        .map(|(n, ip, node)| Endpoint::pod(ip, n, node))
        .collect();
    kube::endpoint_slice(ns, svc, &format!("{svc}-1"), &eps, ports)
}

fn cluster(agents: &[(&str, &str)]) -> String {
    let mut objs = base_objects(agents);
    objs.push(kube::service(
        "default",
        "kubernetes",
        Some("10.96.0.1"),
        None,
        &[tcp("https", 443, 6443)],
        "",
    ));
    objs.push(kube::endpoint_slice(
        "default",
        "kubernetes",
        "kubernetes",
        &[Endpoint::address(APISERVER, NODE_A)],
        &[("https", 6443)],
    ));
    let udp = Port {
        name: "dns",
        port: 53,
        target: 53,
        protocol: "UDP",
    };
    objs.push(kube::service(
        "kube-system",
        "kube-dns",
        Some("10.96.0.10"),
        Some("kube-dns"),
        &[udp, tcp("dns-tcp", 53, 53), tcp("metrics", 9153, 9153)],
        "",
    ));
    objs.extend(
        COREDNS
            .iter()
            .map(|(n, ip, node)| Pod::new("kube-system", n, ip, node, "kube-dns").yaml()),
    );
    objs.push(slice_of(
        "kube-system",
        "kube-dns",
        &COREDNS,
        &[("dns-tcp", 53), ("metrics", 9153)],
    ));
    objs.push(kube::namespace("app", &[]));
    objs.push(kube::service(
        "app",
        "cache",
        Some("10.96.1.40"),
        Some("cache"),
        &[tcp("tcp-redis", 6379, 6379)],
        "internalTrafficPolicy: Local",
    ));
    objs.extend(
        CACHE
            .iter()
            .map(|(n, ip, node)| Pod::new("app", n, ip, node, "cache").yaml()),
    );
    objs.push(slice_of("app", "cache", &CACHE, &[("tcp-redis", 6379)]));
    objs.push(kube::service(
        "app",
        "web",
        Some("10.96.1.50"),
        Some("web"),
        &[tcp("http", 80, 8080)],
        "",
    ));
    objs.extend(
        SIDECAR
            .iter()
            .map(|(n, ip, node)| Pod::new("app", n, ip, node, "web").yaml()),
    );
    objs.push(slice_of("app", "web", &SIDECAR, &[("http", 8080)]));
    objs.push(kube::namespace(
        "mesh",
        &[("istio.io/dataplane-mode", "ambient")],
    ));
    objs.push(kube::service(
        "mesh",
        "amb",
        Some("10.96.2.10"),
        Some("amb"),
        &[tcp("http", 80, 8080)],
        "",
    ));
    objs.extend(AMBIENT.iter().map(|(n, ip, node)| {
        Pod::new("mesh", n, ip, node, "amb")
            .annotation("ambient.istio.io/redirection", "enabled")
            .yaml()
    }));
    objs.push(slice_of("mesh", "amb", &AMBIENT, &[("http", 8080)]));
    kube::docs(objs)
}

fn served() -> Vec<(&'static str, u16, &'static str)> {
    let mut s = vec![(APISERVER, 6443, "apiserver")];
    for (n, ip, _) in COREDNS {
        s.extend([(ip, 53, n), (ip, 9153, n)]);
    }
    for (n, ip, _) in CACHE {
        s.push((ip, 6379, n));
    }
    for (n, ip, _) in AMBIENT.iter().chain(&SIDECAR) {
        s.push((*ip, 8080, *n));
    }
    s
}

/// The backends a sidecar on `node` in cluster `cluster_id` gets.
fn expected(node: &str, cluster_id: &str) -> Table {
    let home = cluster_id == sockmesh_tests::istiod_lab::CLUSTER_ID;
    let at = |pods: &[(&str, &str, &str)], port: u16, only_node: Option<&str>| -> Vec<String> {
        pods.iter()
            .filter(|(_, _, n)| only_node.is_none_or(|o| o == *n))
            .map(|(_, ip, _)| format!("{ip}:{port}"))
            .collect()
    };
    // Cluster-local: only for a proxy of their own cluster.
    let local = |v: Vec<String>| if home { v } else { Vec::new() };
    let entries = [
        (
            "10.96.0.1:443/tcp",
            local(vec![format!("{APISERVER}:6443")]),
        ),
        ("10.96.0.10:53/tcp", local(at(&COREDNS, 53, None))),
        ("10.96.0.10:9153/tcp", local(at(&COREDNS, 9153, None))),
        // internalTrafficPolicy: Local: this node's pods only, and node names
        // mean something only in their own cluster.
        ("10.96.1.40:6379/tcp", local(at(&CACHE, 6379, Some(node)))),
        ("10.96.1.50:80/tcp", at(&SIDECAR, 8080, None)),
        // Ambient pods: their own address and target port.
        ("10.96.2.10:80/tcp", at(&AMBIENT, 8080, None)),
    ];
    let refs: Vec<(&str, Vec<&str>)> = entries
        .iter()
        .map(|(k, v)| (*k, v.iter().map(String::as_str).collect()))
        .collect();
    let refs: Vec<(&str, &[&str])> = refs.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    table(&refs)
}

/// Names of the pods among `pods` on `node` (all with `None`).
fn names(pods: &[(&str, &str, &str)], node: Option<&str>) -> Vec<String> {
    let mut v: Vec<String> = pods
        .iter()
        .filter(|(_, _, n)| node.is_none_or(|o| o == *n))
        .map(|(name, _, _)| (*name).to_owned())
        .collect();
    v.sort();
    v
}

/// Each endpoint's address in a ClusterLoadAssignment (istiod's JSON): `IP:PORT`,
/// or `internal LISTENER ID` for an `envoy_internal_address`; sorted.
fn endpoint_addresses(cla: &serde_json::Value) -> Vec<String> {
    let mut out: Vec<String> = cla["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["lbEndpoints"].as_array().into_iter().flatten())
        .map(|e| {
            let a = &e["endpoint"]["address"];
            if let Some(s) = a.get("socketAddress") {
                format!(
                    "{}:{}",
                    s["address"].as_str().unwrap_or("?"),
                    s["portValue"]
                )
            } else {
                let i = &a["envoyInternalAddress"];
                format!(
                    "internal {} {}",
                    i["serverListenerName"].as_str().unwrap_or("?"),
                    i["endpointId"].as_str().unwrap_or("?")
                )
            }
        })
        .collect();
    out.sort();
    out
}

fn check(pods: &Pods, agent: &Agent) {
    let node = agent.spec.node;
    let home = agent.spec.cluster_id == sockmesh_tests::istiod_lab::CLUSTER_ID;
    agent.wait_table(
        &format!(
            "the view of a sidecar on {node} in cluster {}",
            agent.spec.cluster_id
        ),
        &expected(node, agent.spec.cluster_id),
    );
    agent.assert_clean();
    let refused = vec!["E111".to_owned()]; // ECONNREFUSED: a service without endpoints
    let want = |v: Vec<String>| if home { v } else { refused.clone() };
    assert_eq!(
        pods.reached(agent, "10.96.0.1:443", 10),
        want(vec!["apiserver".into()])
    );
    assert_eq!(
        pods.reached(agent, "10.96.0.10:53", 60),
        want(names(&COREDNS, None))
    );
    assert_eq!(
        pods.reached(agent, "10.96.1.40:6379", 60),
        want(names(&CACHE, Some(node)))
    );
    assert_eq!(
        pods.reached(agent, "10.96.1.50:80", 60),
        names(&SIDECAR, None)
    );
    assert_eq!(
        pods.reached(agent, "10.96.2.10:80", 60),
        names(&AMBIENT, None)
    );
}

#[test]
fn istiod_cluster_local_node_local_and_ambient() {
    let pods = Pods::new(PROBE, &served());
    let mut specs = Vec::new();
    for protocol in ["delta", "sotw"] {
        specs.push(AgentSpec::on_node_a(protocol));
        specs.push(AgentSpec {
            pod: format!("sockmesh-b-{protocol}"),
            node: NODE_B,
            ..AgentSpec::on_node_a(protocol)
        });
        specs.push(AgentSpec {
            pod: format!("sockmesh-other-{protocol}"),
            node: NODE_B,
            cluster_id: "other",
            ..AgentSpec::on_node_a(protocol)
        });
    }
    // A node that does not say DISABLE_HBONE_SEND, only to read what istiod
    // generates for it.
    specs.push(AgentSpec {
        pod: "sockmesh-hbone".into(),
        extra: vec!["--node-metadata".into(), "DISABLE_HBONE_SEND=false".into()],
        ..AgentSpec::on_node_a("delta")
    });
    let names: Vec<(&str, &str)> = specs.iter().map(|s| (s.pod.as_str(), s.node)).collect();
    let istiod = Istiod::start(&cluster(&names), "", &Options::default());
    let agents: Vec<Agent> = specs
        .into_iter()
        .map(|s| Agent::start(&istiod, s))
        .collect();
    // What istiod sends decides it: the ambient pods' endpoints are HBONE tunnels
    // (the `connect_originate` internal listener) for a node that does not say
    // DISABLE_HBONE_SEND, their own addresses for sockmesh's.
    let (hbone, agents) = agents.split_last().expect("agents");
    let amb = "outbound|80||amb.mesh.svc.cluster.local";
    let addresses = |proxy: &str| {
        wait_until("istiod's endpoints of amb", Duration::from_secs(10), || {
            istiod
                .load_assignment(proxy, amb)
                .map(|cla| endpoint_addresses(&cla))
        })
    };
    assert_eq!(
        addresses(&hbone.proxy()),
        [
            "internal connect_originate 10.10.2.1:8080",
            "internal connect_originate 10.10.2.2:8080"
        ]
    );
    for agent in agents {
        assert_eq!(
            addresses(&agent.proxy()),
            ["10.10.2.1:8080", "10.10.2.2:8080"],
            "{}",
            agent.proxy()
        );
    }
    for agent in agents {
        check(&pods, agent);
        wait_until(
            "istiod to see every response ACKed",
            Duration::from_secs(10),
            || istiod.acked_all(&agent.proxy()),
        );
    }
}
