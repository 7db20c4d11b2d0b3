//! Istio traffic policy through a live istiod, delta and SotW: DestinationRules
//! (`LEAST_REQUEST`, `RANDOM`, `consistentHash` with a ring hash and with Maglev,
//! `outlierDetection`, `connectionPool.tcp.maxConnections`) and a
//! VirtualService's weights between subsets. The kernel must do what Envoy does
//! with what istiod generates from them: the expectations come from Envoy's
//! documented behaviour (a host ejected on its `consecutive_5xx`-th failed connect
//! in a row, `max_connections` open at most, weighted clusters' shares), applied
//! to the Kubernetes objects, never from istiod's output.

use std::{collections::BTreeMap, time::Duration};

use sockmesh::model::LbPolicy;
use sockmesh_tests::{
    hold,
    istiod::{Istiod, Options},
    istiod_lab::{
        Agent, AgentSpec, NODE_A, NODE_B, Pods, base_objects, kernel_service, pods_and_slice,
    },
    kube::{self, Endpoint, Pod, tcp},
    release, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

type Pods3 = [(&'static str, &'static str, &'static str); 3];
const LR: Pods3 = [
    ("lr-1", "10.10.1.1", NODE_A),
    ("lr-2", "10.10.1.2", NODE_A),
    ("lr-3", "10.10.1.3", NODE_B),
];
const RND: Pods3 = [
    ("rnd-1", "10.10.1.11", NODE_A),
    ("rnd-2", "10.10.1.12", NODE_A),
    ("rnd-3", "10.10.1.13", NODE_B),
];
const RING: Pods3 = [
    ("ring-1", "10.10.1.21", NODE_A),
    ("ring-2", "10.10.1.22", NODE_A),
    ("ring-3", "10.10.1.23", NODE_B),
];
const MAG: Pods3 = [
    ("mag-1", "10.10.1.31", NODE_A),
    ("mag-2", "10.10.1.32", NODE_A),
    ("mag-3", "10.10.1.33", NODE_B),
];
/// `flaky-3` has no server: every connect to it is refused (RST). All in the
/// agent's zone: with outlier detection istiod puts other zones' endpoints at a
/// lower priority (locality failover), which Envoy uses only when this one's
/// health falls (see `istiod_locality`).
const FLAKY: Pods3 = [
    ("flaky-1", "10.10.1.41", NODE_A),
    ("flaky-2", "10.10.1.42", NODE_A),
    ("flaky-3", "10.10.1.43", NODE_A),
];
const POOL: [(&str, &str, &str); 2] = [
    ("pool-1", "10.10.1.51", NODE_A),
    ("pool-2", "10.10.1.52", NODE_B),
];
/// (name, address, node, version).
const SHOP: [(&str, &str, &str, &str); 3] = [
    ("shop-v1-1", "10.10.1.61", NODE_A, "v1"),
    ("shop-v1-2", "10.10.1.62", NODE_B, "v1"),
    ("shop-v2-1", "10.10.1.63", NODE_A, "v2"),
];
/// The VirtualService's weights: v1 75 %, v2 25 %.
const V2_PERCENT: u32 = 25;

/// Service name → VIP (all on port 80 → 8080).
const SERVICES: [(&str, &str); 7] = [
    ("lr", "10.96.1.1"),
    ("rnd", "10.96.1.2"),
    ("ring", "10.96.1.3"),
    ("mag", "10.96.1.4"),
    ("flaky", "10.96.1.5"),
    ("pool", "10.96.1.6"),
    ("shop", "10.96.1.7"),
];

fn vip(name: &str) -> String {
    let ip = SERVICES
        .iter()
        .find(|(n, _)| *n == name)
        .expect("service")
        .1;
    format!("{ip}:80")
}

fn cluster(agents: &[(&str, &str)]) -> String {
    let mut objs = base_objects(agents);
    objs.push(kube::namespace("app", &[]));
    for (name, ip) in SERVICES {
        // `tcp-` names make plain TCP services; `http` ones go through istiod's
        // HTTP route (`mag` and `shop`, whose policy needs one).
        let port = if matches!(name, "mag" | "shop") {
            "http"
        } else {
            "tcp-main"
        };
        objs.push(kube::service(
            "app",
            name,
            Some(ip),
            Some(name),
            &[tcp(port, 80, 8080)],
            "",
        ));
    }
    for (name, pods) in [
        ("lr", &LR),
        ("rnd", &RND),
        ("ring", &RING),
        ("mag", &MAG),
        ("flaky", &FLAKY),
    ] {
        let port = if name == "mag" { "http" } else { "tcp-main" };
        objs.extend(pods_and_slice("app", name, name, pods, &[(port, 8080)]));
    }
    objs.extend(pods_and_slice(
        "app",
        "pool",
        "pool",
        &POOL,
        &[("tcp-main", 8080)],
    ));
    let mut eps = Vec::new();
    for (n, ip, node, version) in SHOP {
        objs.push(
            Pod::new("app", n, ip, node, "shop")
                .label("version", version)
                .yaml(),
        );
        eps.push(Endpoint::pod(ip, n, node));
    }
    objs.push(kube::endpoint_slice(
        "app",
        "shop",
        "shop-1",
        &eps,
        &[("http", 8080)],
    ));
    kube::docs(objs)
}

fn destination_rule(name: &str, policy: &str) -> String {
    let mut s = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: app}}\nspec:\n  host: {name}.app.svc.cluster.local\n"
    );
    for line in policy.lines().filter(|l| !l.trim().is_empty()) {
        s.push_str("  ");
        s.push_str(line);
        s.push('\n');
    }
    s
}

fn config() -> String {
    kube::docs([
        destination_rule(
            "lr",
            "trafficPolicy:\n  loadBalancer: {simple: LEAST_REQUEST}",
        ),
        destination_rule("rnd", "trafficPolicy:\n  loadBalancer: {simple: RANDOM}"),
        destination_rule(
            "ring",
            "trafficPolicy:\n  loadBalancer:\n    consistentHash: {useSourceIp: true, ringHash: {minimumRingSize: 1024}}",
        ),
        // A header is nothing a socket balancer sees: the client is hashed instead.
        destination_rule(
            "mag",
            "trafficPolicy:\n  loadBalancer:\n    consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}",
        ),
        destination_rule(
            "flaky",
            "trafficPolicy:\n  outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}",
        ),
        destination_rule(
            "pool",
            "trafficPolicy:\n  connectionPool:\n    tcp: {maxConnections: 5}",
        ),
        destination_rule(
            "shop",
            "subsets:\n- {name: v1, labels: {version: v1}}\n- {name: v2, labels: {version: v2}}",
        ),
        format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop, namespace: app}}
spec:
  hosts: [shop.app.svc.cluster.local]
  http:
  - route:
    - destination: {{host: shop.app.svc.cluster.local, subset: v1}}
      weight: {}
    - destination: {{host: shop.app.svc.cluster.local, subset: v2}}
      weight: {V2_PERCENT}
",
            100 - V2_PERCENT
        ),
    ])
}

fn served() -> Vec<(&'static str, u16, &'static str)> {
    let mut s: Vec<(&str, u16, &str)> = Vec::new();
    for pods in [&LR, &RND, &RING, &MAG] {
        s.extend(pods.iter().map(|(n, ip, _)| (*ip, 8080, *n)));
    }
    // flaky-3 refuses: no server.
    s.extend(FLAKY.iter().take(2).map(|(n, ip, _)| (*ip, 8080, *n)));
    s.extend(POOL.iter().map(|(n, ip, _)| (*ip, 8080, *n)));
    s.extend(SHOP.iter().map(|(n, ip, _, _)| (*ip, 8080, *n)));
    s
}

/// Every service has its pods in the kernel.
fn wait_synced(agent: &Agent) {
    wait_until(
        &format!("{}: every service's pods in the kernel", agent.proxy()),
        Duration::from_secs(30),
        || {
            let t = agent.table();
            let missing: Vec<&str> = SERVICES
                .iter()
                .filter(|(n, ip)| {
                    let want = match *n {
                        "pool" => 2,
                        _ => 3,
                    };
                    t.get(&format!("{ip}:80/tcp"))
                        .is_none_or(|b| b.len() != want)
                })
                .map(|(n, _)| *n)
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("{missing:?} in {t:?}"))
            }
        },
    );
}

fn policy(agent: &Agent, name: &str) -> LbPolicy {
    kernel_service(agent, &format!("{}/tcp", vip(name)))
        .expect("service in the kernel")
        .policy
}

fn balancing(pods: &Pods, agent: &Agent) {
    // LEAST_REQUEST (Envoy's default choice_count, 2) and RANDOM.
    assert_eq!(policy(agent, "lr"), LbPolicy::LeastConn { choices: 2 });
    assert_eq!(policy(agent, "rnd"), LbPolicy::Random);
    // 60 connections held open on the least-request service spread as the least
    // loaded of two draws puts them (the `least_conn` test's bound, 15-25 each).
    let (held, holder) = hold(&pods.probe, &pods.client, &agent.cgroup, &vip("lr"), 60);
    assert_eq!(held.len(), 3, "{held:?}");
    assert!(held.values().all(|n| (15..=25).contains(n)), "{held:?}");
    release(holder);

    // Consistent hashing: a ring hash is served by a Maglev table of sockmesh's
    // default size (the ring's sizes do not apply), Maglev by a table of the
    // DestinationRule's `tableSize`; either way one client stays on one backend.
    // 30 connects of one client under a random policy would all reach one of 3
    // backends with probability 3^-29.
    for (name, size) in [
        ("ring", sockmesh_common::DEFAULT_MAGLEV_TABLE_SIZE),
        ("mag", 65_537),
    ] {
        assert_eq!(
            policy(agent, name),
            LbPolicy::Maglev { table_size: size },
            "{name}"
        );
        let reached = pods.reached(agent, &vip(name), 30);
        assert_eq!(reached.len(), 1, "{name}: {reached:?}");
    }
    // The header is not visible at connect(): said in /config_dump.
    let dump = agent.admin.dump();
    let why = dump["hash_on_client"][format!("{}/tcp", vip("mag"))]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(why.contains("header"), "{}", dump["hash_on_client"]);
}

fn outlier(pods: &Pods, agent: &Agent) {
    // consecutive5xxErrors 3: Envoy counts a failed connect (a locally originated
    // error, without split_external_local_origin_errors) as a 5xx, so the dead pod
    // is ejected on its third refused connect in a row, and then gets none until
    // its 60 s are up. 300 sequential connects take well under a second.
    let out = pods.connect(agent, &vip("flaky"), 300);
    let refused = out.iter().filter(|r| r.starts_with('E')).count();
    assert_eq!(refused, 3, "{}: refused {refused} of 300", agent.proxy());
    let ejected = agent.metric(&format!(
        "sockmesh_outlier_ejected{{service=\"{}/tcp\",backend=\"10.10.1.43:8080\"}}",
        vip("flaky")
    ));
    assert_eq!(ejected, 1.0, "flaky-3 ejected");
}

fn circuit_breaker(pods: &Pods, agent: &Agent) {
    // maxConnections 5: Envoy's circuit breaker max_connections; sockmesh counts
    // the node's connections, so 8 held give exactly 5 served and 3 refused.
    let (held, holder) = hold(&pods.probe, &pods.client, &agent.cgroup, &vip("pool"), 8);
    let served: u64 = held
        .iter()
        .filter(|(k, _)| k.starts_with("pool-"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(served, 5, "{held:?}");
    assert_eq!(held.get("E111"), Some(&3), "{held:?}");
    release(holder);
}

fn subsets(pods: &Pods, agent: &Agent) {
    // The route's weighted clusters: v1 75 %, v2 25 %, each subset's pods equal
    // within it. The kernel's weights give those shares exactly (within the
    // slot table's quantisation) ...
    let svc = kernel_service(agent, &format!("{}/tcp", vip("shop"))).expect("shop");
    let total: u32 = svc.iter().map(|b| b.weight).sum();
    let v2: u32 = svc
        .iter()
        .filter(|b| b.address.to_string() == "10.10.1.63")
        .map(|b| b.weight)
        .sum();
    let share = f64::from(v2) / f64::from(total);
    assert!(
        (share - f64::from(V2_PERCENT) / 100.0).abs() < 0.01,
        "v2 share {share} of {svc:?}"
    );
    // ... and the connections follow: v2's count of 800 is binomial (mean 200,
    // sd 12.2); 135..=265 is ±5.3 sd, a false failure below 1e-6.
    let t: BTreeMap<String, u32> = pods.tally(agent, &vip("shop"), 800);
    let v2 = t.get("shop-v2-1").copied().unwrap_or(0);
    assert!((135..=265).contains(&v2), "{t:?}");
    assert_eq!(t.values().sum::<u32>(), 800, "failures: {t:?}");
}

#[test]
fn istiod_destination_rules_and_subsets() {
    let pods = Pods::new(PROBE, &served());
    let specs = [AgentSpec::on_node_a("delta"), AgentSpec::on_node_a("sotw")];
    let names: Vec<(&str, &str)> = specs.iter().map(|s| (s.pod.as_str(), s.node)).collect();
    let istiod = Istiod::start(&cluster(&names), &config(), &Options::default());
    let agents: Vec<Agent> = specs
        .into_iter()
        .map(|s| Agent::start(&istiod, s))
        .collect();
    for agent in &agents {
        wait_synced(agent);
        wait_until(
            "istiod to see every response ACKed",
            Duration::from_secs(10),
            || istiod.acked_all(&agent.proxy()),
        );
        agent.assert_clean();
        balancing(&pods, agent);
        outlier(&pods, agent);
        circuit_breaker(&pods, agent);
        subsets(&pods, agent);
        agent.assert_clean();
    }
}
