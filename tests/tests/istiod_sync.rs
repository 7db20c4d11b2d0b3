//! Against a live istiod (`sockmesh-istiod`: istiod's own discovery server over
//! an in-memory Kubernetes), delta and SotW: every Service VIP reaches its pods,
//! headless services and node addresses pass through, and a ServiceEntry with
//! `resolution: DNS` is resolved by the node's resolver (the test's own).
//!
//! The expected backends are what Kubernetes says (the EndpointSlices' addresses
//! and ports, the DNS answers), which is what Envoy gets for these services on
//! this node; nothing is read from istiod's output to make them.

use std::time::Duration;

use sockmesh_tests::{
    istiod::{Istiod, Options},
    istiod_lab::{Agent, AgentSpec, NODE_A, NODE_A_IP, NODE_B, NODE_B_IP, Pods, Resolver, table},
    kube::{self, Endpoint, Pod, tcp},
    wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

/// The pods of `app`, on their nodes: (name, address, node).
const WEB: [(&str, &str, &str); 3] = [
    ("web-1", "10.10.1.1", NODE_A),
    ("web-2", "10.10.1.2", NODE_A),
    ("web-3", "10.10.1.3", NODE_B),
];
const PEERS: [(&str, &str, &str); 2] = [
    ("peer-1", "10.10.1.21", NODE_A),
    ("peer-2", "10.10.1.22", NODE_B),
];
/// The ServiceEntry's host and what the resolver answers for it.
const EXTERNAL_HOST: &str = "api.external.test";
const EXTERNAL: [(&str, &str); 2] = [("ext-1", "10.10.4.1"), ("ext-2", "10.10.4.2")];

fn cluster(agents: &[(&str, &str)]) -> String {
    let mut objs = sockmesh_tests::istiod_lab::base_objects(agents);
    objs.push(kube::namespace("app", &[("istio-injection", "enabled")]));
    objs.push(kube::namespace("monitoring", &[]));
    objs.push(kube::service(
        "app",
        "web",
        Some("10.96.1.10"),
        Some("web"),
        &[tcp("http", 80, 8080), tcp("tcp-admin", 8081, 8081)],
        "",
    ));
    objs.extend(
        WEB.iter()
            .map(|(n, ip, node)| Pod::new("app", n, ip, node, "web").yaml()),
    );
    let eps: Vec<Endpoint> = WEB
        .iter()
        .map(|(n, ip, node)| Endpoint::pod(ip, n, node))
        .collect();
    objs.push(kube::endpoint_slice(
        "app",
        "web",
        "web-1",
        &eps,
        &[("http", 8080), ("tcp-admin", 8081)],
    ));
    objs.push(kube::service(
        "app",
        "db",
        Some("10.96.1.20"),
        Some("db"),
        &[tcp("tcp-postgres", 5432, 5432)],
        "",
    ));
    objs.push(Pod::new("app", "db-1", "10.10.1.11", NODE_A, "db").yaml());
    objs.push(kube::endpoint_slice(
        "app",
        "db",
        "db-1",
        &[Endpoint::pod("10.10.1.11", "db-1", NODE_A)],
        &[("tcp-postgres", 5432)],
    ));
    // Headless: no VIP; istiod sends a listener per pod address, whose cluster
    // is ORIGINAL_DST (the address the client asked for).
    objs.push(kube::service(
        "app",
        "peers",
        None,
        Some("peer"),
        &[tcp("tcp-gossip", 7000, 7000)],
        "",
    ));
    objs.extend(
        PEERS
            .iter()
            .map(|(n, ip, node)| Pod::new("app", n, ip, node, "peer").yaml()),
    );
    let eps: Vec<Endpoint> = PEERS
        .iter()
        .map(|(n, ip, node)| Endpoint::pod(ip, n, node))
        .collect();
    objs.push(kube::endpoint_slice(
        "app",
        "peers",
        "peers-1",
        &eps,
        &[("tcp-gossip", 7000)],
    ));
    // A DaemonSet on the host network: its endpoints are the nodes' addresses.
    objs.push(kube::service(
        "monitoring",
        "node-exporter",
        Some("10.96.1.30"),
        Some("node-exporter"),
        &[tcp("tcp-metrics", 9100, 9100)],
        "",
    ));
    let exporters = [
        ("node-exporter-a", NODE_A_IP, NODE_A),
        ("node-exporter-b", NODE_B_IP, NODE_B),
    ];
    for (n, ip, node) in exporters {
        let mut pod = Pod::new("monitoring", n, ip, node, "node-exporter");
        pod.host_network = true;
        objs.push(pod.yaml());
    }
    let eps: Vec<Endpoint> = exporters
        .iter()
        .map(|(n, ip, node)| Endpoint::pod(ip, n, node))
        .collect();
    objs.push(kube::endpoint_slice(
        "monitoring",
        "node-exporter",
        "node-exporter-1",
        &eps,
        &[("tcp-metrics", 9100)],
    ));
    kube::docs(objs)
}

fn service_entry() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external-api, namespace: app}}
spec:
  hosts: [{EXTERNAL_HOST}]
  addresses: [240.240.1.1]
  ports: [{{number: 443, name: tcp-https, protocol: TCP}}]
  location: MESH_EXTERNAL
  resolution: DNS
"
    )
}

/// What every pod serves: (address, port, name).
fn served() -> Vec<(&'static str, u16, &'static str)> {
    let mut s = Vec::new();
    for (n, ip, _) in WEB {
        s.push((ip, 8080, n));
        s.push((ip, 8081, n));
    }
    s.push(("10.10.1.11", 5432, "db-1"));
    for (n, ip, _) in PEERS {
        s.push((ip, 7000, n));
    }
    s.push((NODE_A_IP, 9100, "node-exporter-a"));
    s.push((NODE_B_IP, 9100, "node-exporter-b"));
    for (n, ip) in EXTERNAL {
        s.push((ip, 443, n));
    }
    s
}

fn expected(external: &[&str]) -> sockmesh_tests::istiod_lab::Table {
    let web = |port: u16| -> Vec<String> {
        WEB.iter()
            .map(|(_, ip, _)| format!("{ip}:{port}"))
            .collect()
    };
    let (w80, w8081) = (web(8080), web(8081));
    let w80: Vec<&str> = w80.iter().map(String::as_str).collect();
    let w8081: Vec<&str> = w8081.iter().map(String::as_str).collect();
    table(&[
        ("10.96.1.10:80/tcp", &w80),
        ("10.96.1.10:8081/tcp", &w8081),
        ("10.96.1.20:5432/tcp", &["10.10.1.11:5432"]),
        ("10.96.1.30:9100/tcp", &["10.10.0.1:9100", "10.10.0.2:9100"]),
        ("240.240.1.1:443/tcp", external),
    ])
}

fn sync(protocols: &[&'static str]) {
    let pods = Pods::new(PROBE, &served());
    let resolver = Resolver::start(1);
    resolver.dns.set(
        EXTERNAL_HOST,
        &EXTERNAL.iter().map(|(_, ip)| *ip).collect::<Vec<_>>(),
    );
    let specs: Vec<AgentSpec> = protocols.iter().map(|p| AgentSpec::on_node_a(p)).collect();
    let names: Vec<(&str, &str)> = specs.iter().map(|s| (s.pod.as_str(), s.node)).collect();
    let istiod = Istiod::start(&cluster(&names), &service_entry(), &Options::default());
    let agents: Vec<Agent> = specs
        .into_iter()
        .map(|s| Agent::start_with(&istiod, s, |cmd| resolver.for_agent(cmd)))
        .collect();

    let want = expected(&["10.10.4.1:443", "10.10.4.2:443"]);
    for agent in &agents {
        agent.wait_table("every Service VIP and the ServiceEntry", &want);
        wait_until(
            "istiod to see every response ACKed",
            Duration::from_secs(10),
            || istiod.acked_all(&agent.proxy()),
        );
        agent.assert_clean();

        // Every VIP reaches exactly its pods (60 connects miss one of 3 equally
        // likely backends with probability 3 × (2/3)^60 < 1e-10).
        let web = ["web-1", "web-2", "web-3"];
        assert_eq!(pods.reached(agent, "10.96.1.10:80", 60), web);
        assert_eq!(pods.reached(agent, "10.96.1.10:8081", 60), web);
        assert_eq!(pods.reached(agent, "10.96.1.20:5432", 10), ["db-1"]);
        assert_eq!(
            pods.reached(agent, "10.96.1.30:9100", 60),
            ["node-exporter-a", "node-exporter-b"]
        );
        assert_eq!(
            pods.reached(agent, "240.240.1.1:443", 60),
            ["ext-1", "ext-2"]
        );

        // Pass through: a headless service's pod address and a node's address are
        // reached as asked, never balanced to another pod (the table has none of
        // them, checked above; the kernel leaves such connections alone).
        for (name, ip, _) in PEERS {
            let to = format!("{ip}:7000");
            assert_eq!(pods.reached(agent, &to, 20), [name], "{to}");
            assert_eq!(pods.peer(agent, &to), format!("{to} {name}"));
        }
        assert_eq!(
            pods.reached(agent, "10.10.0.1:9100", 20),
            ["node-exporter-a"]
        );
    }

    // The resolver's answer changes: the DNS cluster follows (it asks the node's
    // resolver, the test's, again when the 1 s TTL runs out).
    resolver.dns.set(EXTERNAL_HOST, &["10.10.4.2"]);
    let want = expected(&["10.10.4.2:443"]);
    for agent in &agents {
        agent.wait_table("the ServiceEntry's new DNS answer", &want);
        assert_eq!(pods.reached(agent, "240.240.1.1:443", 20), ["ext-2"]);
        agent.assert_clean();
    }
    assert!(resolver.dns.queries() > 0);
}

#[test]
fn istiod_sync_delta_and_sotw() {
    sync(&["delta", "sotw"]);
}

/// A mesh-wide default Sidecar in the root namespace, narrowed as many meshes
/// narrow it (`./*` and `istio-system/*`), applies to the agent's namespace
/// too: the node would see only istio-system's services. The Sidecar of
/// `deploy/kubernetes/istio/sidecar.yaml`, in the agent's namespace, takes
/// precedence there (istiod's `getSidecarScope`), and the node sees the whole
/// mesh again.
#[test]
fn istiod_sidecar_yaml_gives_the_node_the_whole_mesh() {
    let pods = Pods::new(PROBE, &served());
    let specs = [AgentSpec::on_node_a("delta"), AgentSpec::on_node_a("sotw")];
    let names: Vec<(&str, &str)> = specs.iter().map(|s| (s.pod.as_str(), s.node)).collect();
    let mut objs = vec![cluster(&names)];
    objs.push(kube::service(
        "istio-system",
        "tracing",
        Some("10.96.0.40"),
        Some("tracing"),
        &[tcp("tcp-zipkin", 9411, 9411)],
        "",
    ));
    objs.push(Pod::new("istio-system", "tracing-1", "10.10.1.51", NODE_A, "tracing").yaml());
    objs.push(kube::endpoint_slice(
        "istio-system",
        "tracing",
        "tracing-1",
        &[Endpoint::pod("10.10.1.51", "tracing-1", NODE_A)],
        &[("tcp-zipkin", 9411)],
    ));
    let narrow = "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec:
  egress:
  - hosts: [\"./*\", \"istio-system/*\"]
";
    let istiod = Istiod::start(&kube::docs(objs), narrow, &Options::default());
    let agents: Vec<Agent> = specs
        .into_iter()
        .map(|s| Agent::start(&istiod, s))
        .collect();
    let tracing = ("10.96.0.40:9411/tcp", &["10.10.1.51:9411"][..]);
    for agent in &agents {
        agent.wait_table("only istio-system's services", &table(&[tracing]));
        agent.assert_clean();
    }
    let sidecar = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/kubernetes/istio/sidecar.yaml"),
    )
    .expect("deploy/kubernetes/istio/sidecar.yaml");
    istiod.apply_config(&sidecar);
    // The whole mesh: the sync test's services (the ServiceEntry is not in this
    // cluster) and istio-system's.
    let mut want = expected(&[]);
    want.remove("240.240.1.1:443/tcp");
    want.insert(tracing.0.to_owned(), vec![tracing.1[0].to_owned()]);
    for agent in &agents {
        agent.wait_table("the whole mesh", &want);
        agent.assert_clean();
        assert_eq!(pods.reached(agent, "10.96.1.20:5432", 5), ["db-1"]);
    }
}
