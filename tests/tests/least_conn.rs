//! Least connections on real sockets: the kernel counts every connection it places
//! on a least-connections service, spreads open connections evenly, keeps the
//! counts across an agent restart, and releases every count when the sockets go
//! away, failed connects included.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use sockmesh::model::{Backend, Endpoint, LbPolicy, Protocol, RoutingTable, Service, ServiceAddr};
use sockmesh_tests::{PodLab, audit::Expect, hold, install, release, run, scaled, wait_until};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

/// Pods 10.10.1.11..13:8080 serve `b1`..`b3`; 10.10.1.14 has no server (its
/// connects are refused).
fn lab() -> PodLab {
    PodLab::new(PROBE, 4, 3)
}

fn service() -> ServiceAddr {
    PodLab::service()
}

fn backend(i: u8) -> Backend {
    PodLab::pod(i)
}

fn endpoint(i: u8) -> Endpoint {
    Endpoint {
        addr: IpAddr::from([10, 10, 1, 10 + i]),
        port: 8080,
        protocol: Protocol::Tcp,
    }
}

fn least_conn(pods: &[u8], choices: u8) -> RoutingTable {
    let mut t = RoutingTable::default();
    t.insert(
        service(),
        Service::new(
            pods.iter().map(|&i| backend(i)).collect(),
            LbPolicy::LeastConn { choices },
        ),
    );
    t
}

/// The kernel's open-connection counts in `lab`, by endpoint (zeros left out).
fn apply(lab: &mut PodLab, t: &RoutingTable) {
    lab.dp().apply(t).expect("apply");
}

fn counts(lab: &PodLab) -> BTreeMap<Endpoint, u64> {
    sockmesh::dataplane::read_conns(&lab.bpffs.0)
        .expect("read SM_BACKEND_CONNS")
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Waits until the kernel holds no open-connection count in `lab`.
fn wait_released(lab: &PodLab, what: &str) {
    wait_until(what, scaled(Duration::from_secs(5)), || {
        let c = counts(lab);
        c.is_empty().then_some(()).ok_or(c)
    });
}

#[test]
fn least_connections_spreads_open_connections_and_every_count_returns_to_zero() {
    let mut lab = lab();
    apply(
        &mut lab,
        &least_conn(&[1, 2, 3], sockmesh_common::MAX_CHOICES),
    );

    // 60 connections held open: least connections keeps them even (20 each);
    // a random pick would leave a backend outside 15..=25 in about a third of
    // runs.
    let (reached, holder) = hold(PROBE, &lab.client, &lab.cgroup, "10.96.0.10:80", 60);
    assert_eq!(
        reached.keys().collect::<Vec<_>>(),
        ["b1", "b2", "b3"],
        "{reached:?}"
    );
    for (name, n) in &reached {
        assert!((15..=25).contains(n), "{name}: {n} of 60 ({reached:?})");
    }
    // The kernel counted each of them on its endpoint.
    let want: BTreeMap<Endpoint, u64> = (1..=3u8)
        .map(|i| (endpoint(i), reached[&format!("b{i}")]))
        .collect();
    assert_eq!(counts(&lab), want);
    lab.audit().assert(
        "60 connections held",
        &Expect::services(1, 3).least_conn(60).reverse(60),
    );

    // An agent restart (the datapath dropped, installed again over its pins)
    // keeps the counts: they describe sockets, which outlive the agent.
    drop(lab.dp.take());
    lab.dp = Some(install(&lab.cgroup, &lab.bpffs));
    assert_eq!(counts(&lab), want, "counts lost across a restart");
    lab.audit().assert(
        "60 connections held across a restart",
        &Expect::services(1, 3).least_conn(60).reverse(60),
    );

    // The sockets close: every count goes back to zero.
    release(holder);
    wait_released(&lab, "every count released");
    lab.audit()
        .assert("the 60 connections closed", &Expect::services(1, 3));

    // Thousands of connects, a quarter of them to a backend that refuses them:
    // each socket is counted when placed and released when closed, a failed one
    // too, and no count goes below zero (it would wrap to a huge value).
    apply(&mut lab, &least_conn(&[1, 2, 3, 4], 2));
    let mut cmd = lab.client_command(PROBE);
    cmd.args([
        "connect",
        "10.96.0.10:80",
        "2000",
        &scaled(Duration::from_secs(30)).as_millis().to_string(),
    ]);
    let out = run(cmd);
    let lines: Vec<&str> = out.lines().collect();
    let refused = lines.iter().filter(|l| l.ends_with(" E111")).count();
    let served = lines
        .iter()
        .filter(|l| l.ends_with(" b1") || l.ends_with(" b2") || l.ends_with(" b3"))
        .count();
    assert!(lines.len() >= 500, "only {} connects ran", lines.len());
    assert_eq!(refused + served, lines.len(), "unexpected outcomes: {out}");
    assert!(
        refused > 0 && served > 0,
        "{refused} refused, {served} served"
    );
    wait_released(
        &lab,
        "every count released after failed and served connects",
    );
    // Idle entries of endpoints still in a service stay; those of endpoints gone
    // are swept, so the map does not fill with pods long dead.
    let entries = |lab: &PodLab| -> Vec<Endpoint> {
        sockmesh::dataplane::read_conns(&lab.bpffs.0)
            .expect("read")
            .into_iter()
            .map(|(e, _)| e)
            .collect()
    };
    let dp = lab.dp.as_mut().expect("datapath");
    assert_eq!(
        dp.sweep_conns().expect("sweep"),
        0,
        "every endpoint is live"
    );
    assert_eq!(entries(&lab), (1..=4).map(endpoint).collect::<Vec<_>>());
    apply(&mut lab, &least_conn(&[1], 2));
    assert_eq!(lab.dp().sweep_conns().expect("sweep"), 3);
    assert_eq!(entries(&lab), [endpoint(1)]);
    eprintln!(
        "least connections: held 60 as {reached:?}; {} connects ({refused} refused), all counts back to 0",
        lines.len()
    );
    lab.finish(&Expect::services(1, 1));
}

/// Istio's shapes: its default `LEAST_REQUEST` (with the locality-weighted
/// config istiod adds) on one service, a DestinationRule `consistentHash` cluster
/// (`MAGLEV`) on another.
fn istio_clusters() -> String {
    let service = |name: &str, vip: &str, cluster_fields: &str| {
        format!(
            r#"
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: {name}
  address: {{ socket_address: {{ address: {vip}, port_value: 80 }} }}
  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {name}, cluster: "outbound|80||{name}.default.svc.cluster.local" }} }} ] }} ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: "outbound|80||{name}.default.svc.cluster.local"
  type: STATIC
  {cluster_fields}
  load_assignment:
    cluster_name: "outbound|80||{name}.default.svc.cluster.local"
    endpoints:
    - locality: {{ region: r1, zone: z1 }}
      lb_endpoints:
      - endpoint: {{ address: {{ socket_address: {{ address: 10.10.1.11, port_value: 8080 }} }} }}
      - endpoint: {{ address: {{ socket_address: {{ address: 10.10.1.12, port_value: 8080 }} }} }}
"#
        )
    };
    format!(
        "version_info: istio\nresources:{}{}",
        service(
            "reviews",
            "10.96.0.30",
            "lb_policy: LEAST_REQUEST\n  common_lb_config: { locality_weighted_lb_config: {} }"
        ),
        service(
            "ratings",
            "10.96.0.31",
            "lb_policy: MAGLEV\n  maglev_lb_config: { table_size: 65537 }"
        ),
    )
}

#[test]
fn istio_least_request_and_maglev_clusters_are_honoured_and_shown() {
    let pods = sockmesh_tests::TwoPods::serving(PROBE, ["r1", "r2"]);
    let agent = sockmesh_tests::FileAgent::start("resources.yaml", &istio_clusters(), &[]);
    let (admin, bpffs) = (&agent.admin, &agent.bpffs);
    let policy = |vip: &str| {
        sockmesh::dataplane::read_table(&bpffs.0)
            .ok()
            .and_then(|t| {
                t.services
                    .iter()
                    .find(|(s, _)| s.vip.to_string() == vip)
                    .map(|(_, s)| s.policy)
            })
    };
    wait_until(
        "both services in the kernel",
        Duration::from_secs(15),
        || policy("10.96.0.31").is_some(),
    );
    // The kernel holds each service's policy: DestinationRule-style MAGLEV with
    // Envoy's default table size is a Maglev table of that size.
    assert_eq!(
        policy("10.96.0.30"),
        Some(LbPolicy::LeastConn { choices: 2 })
    );
    assert_eq!(
        policy("10.96.0.31"),
        Some(LbPolicy::Maglev { table_size: 65537 })
    );
    let dump = admin.dump();
    let listed = |vip: &str| {
        dump["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["vip"] == vip))
            .map(|s| s["lb_policy"].clone())
    };
    assert_eq!(
        listed("10.96.0.30"),
        Some(serde_json::json!({ "least_conn": { "choices": 2 } })),
        "{dump}"
    );
    assert_eq!(
        listed("10.96.0.31"),
        Some(serde_json::json!({ "maglev": { "table_size": 65537 } })),
        "{dump}"
    );
    // The consistent-hash service keeps this client (its network namespace) on
    // one pod.
    let (reached, holder) = hold(PROBE, &pods.client, &agent.cgroup, "10.96.0.31:80", 10);
    assert_eq!(reached.len(), 1, "one client, one backend: {reached:?}");
    assert_eq!(reached.values().sum::<u64>(), 10, "{reached:?}");
    release(holder);

    // Ten connections held through the least-request service (choice_count 2 of
    // 2 pods: both draws land on the busier pod a quarter of the time, so not
    // exactly 5 and 5; all 10 on one pod has a chance of 4e-6), each counted, as
    // /metrics reports while they are open.
    let (reached, holder) = hold(PROBE, &pods.client, &agent.cgroup, "10.96.0.30:80", 10);
    assert_eq!(reached.values().sum::<u64>(), 10, "{reached:?}");
    assert!(
        reached.len() == 2 && reached.values().all(|n| (1..=9).contains(n)),
        "{reached:?}"
    );
    let reported = |when: &str| {
        for (pod, name) in [("10.10.1.11", "r1"), ("10.10.1.12", "r2")] {
            let series = format!("sockmesh_backend_connections{{backend=\"{pod}:8080/tcp\"}}");
            assert_eq!(
                admin.metric(&series),
                Some(reached[name] as f64),
                "{series}, {when}"
            );
        }
    };
    reported("held");
    let settled = Expect::services(2, 4).xds(2, 2, 0, 0);
    agent.audit().assert(
        "ten connections held",
        &settled.clone().least_conn(10).reverse(10),
    );
    // The service turns random while they are open: no service is counted any
    // more, and the counts of the connections still open are still reported
    // (the agent stops walking the count map only once it is empty).
    agent.replace(&istio_clusters().replace("lb_policy: LEAST_REQUEST", "lb_policy: RANDOM"));
    wait_until(
        "the service random in the kernel, and the datapath's status after it",
        Duration::from_secs(15),
        || {
            policy("10.96.0.30") == Some(LbPolicy::Random)
                && admin.dump()["push"]["writes_in_flight"] == 0
        },
    );
    reported("no least-connections service installed");
    // Still, after two counts of the kernel-filled maps: each time, five more
    // connections held (to the other service) move the reverse map's count up.
    let reverse = || admin.metric("sockmesh_map_fill_ratio{map=\"reverse\"}");
    let mut extra = Vec::new();
    for round in ["a count", "another count"] {
        let before = reverse();
        extra.push(hold(PROBE, &pods.client, &agent.cgroup, "10.96.0.31:80", 5).1);
        wait_until(round, Duration::from_secs(10), || reverse() > before);
    }
    extra.into_iter().for_each(release);
    reported("no least-connections service installed, two counts later");
    release(holder);
    wait_until(
        "the gauges back to nothing",
        Duration::from_secs(10),
        || {
            admin
                .metric("sockmesh_backend_connections{backend=\"10.10.1.11:8080/tcp\"}")
                .is_none()
        },
    );
    agent.audit().assert("the connections closed", &settled);
    agent.clear_and_audit();
}
