//! Multi-zone Pods through a live istiod, delta and SotW: the kernel shares
//! connections as Envoy does with what istiod generates for a sidecar in
//! zone-a, by Envoy's documented arithmetic ("Locality weighted load balancing",
//! "Priority levels", "Overprovisioning factor"):
//! - no DestinationRule: istiod groups endpoints by zone (a locality weight of its
//!   endpoint count) but sets no `locality_weighted_lb_config`, so Envoy picks
//!   endpoints by their own weights: every pod the same share, whatever its zone
//!   (10 pods in zone-a, 2 in zone-b: 1/12 each);
//! - `localityLbSetting.distribute` 50/50 over 3 pods in zone-a and 1 in zone-b:
//!   istiod sets the locality weights and `locality_weighted_lb_config`; Envoy
//!   picks the zone by weight, then a pod in it (1/6 each in zone-a, 1/2 for
//!   zone-b's pod);
//! - `outlierDetection` (which turns on istiod's default locality failover):
//!   zone-a at priority 0, zone-b at 1. All healthy: everything to zone-a. One of
//!   zone-a's two pods dies: ejected after its third refused connect, priority 0
//!   is 50 % healthy, × 1.4 (the overprovisioning factor) = 70 % of the
//!   connections, 30 % spill to zone-b. The other dies too: 3 more refused, then
//!   all to zone-b. Back: when their ejections end, zone-a again.
//!
//! The shares are checked with real connections, each count within ±5.5
//! standard deviations of its binomial mean (all of a case's pods together: a
//! false failure below 1e-6).

use std::{collections::BTreeMap, time::Duration};

use sockmesh_tests::{
    Proc, add_addr,
    istiod::{Istiod, Options},
    istiod_lab::{Agent, AgentSpec, NODE_A, NODE_B, Pods, base_objects, pods_and_slice},
    kube::{self, tcp},
    serve, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

type PodSpec = (String, String, &'static str);

/// `n` pods `prefix-zone-i` at `10.10.BASE.i` (zone-a) or `10.10.BASE.(10+i)`.
fn zone(prefix: &str, base: u8, node: &'static str, n: u8) -> Vec<PodSpec> {
    let (z, offset) = if node == NODE_A { ("a", 0) } else { ("b", 10) };
    (1..=n)
        .map(|i| {
            (
                format!("{prefix}-{z}{i}"),
                format!("10.10.{base}.{}", offset + i),
                node,
            )
        })
        .collect()
}

struct Case {
    name: &'static str,
    vip: &'static str,
    pods: Vec<PodSpec>,
}

fn cases() -> [Case; 3] {
    let mut spread = zone("spread", 5, NODE_A, 10);
    spread.extend(zone("spread", 5, NODE_B, 2));
    let mut dist = zone("dist", 6, NODE_A, 3);
    dist.extend(zone("dist", 6, NODE_B, 1));
    let mut fo = zone("fo", 7, NODE_A, 2);
    fo.extend(zone("fo", 7, NODE_B, 2));
    [
        Case {
            name: "spread",
            vip: "10.96.5.1",
            pods: spread,
        },
        Case {
            name: "dist",
            vip: "10.96.6.1",
            pods: dist,
        },
        Case {
            name: "fo",
            vip: "10.96.7.1",
            pods: fo,
        },
    ]
}

fn cluster(agents: &[(&str, &str)], cases: &[Case]) -> String {
    let mut objs = base_objects(agents);
    objs.push(kube::namespace("app", &[]));
    for c in cases {
        objs.push(kube::service(
            "app",
            c.name,
            Some(c.vip),
            Some(c.name),
            &[tcp("tcp-main", 80, 8080)],
            "",
        ));
        let pods: Vec<(&str, &str, &str)> = c
            .pods
            .iter()
            .map(|(n, ip, node)| (n.as_str(), ip.as_str(), *node))
            .collect();
        objs.extend(pods_and_slice(
            "app",
            c.name,
            c.name,
            &pods,
            &[("tcp-main", 8080)],
        ));
    }
    kube::docs(objs)
}

const CONFIG: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dist, namespace: app}
spec:
  host: dist.app.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        enabled: true
        distribute:
        - from: region-1/zone-a/*
          to: {\"region-1/zone-a/*\": 50, \"region-1/zone-b/*\": 50}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: fo, namespace: app}
spec:
  host: fo.app.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 8s, maxEjectionPercent: 100}
";

/// Asserts each pod's count of `total` is within ±5.5 sd of `total × share`.
fn shares(what: &str, got: &BTreeMap<String, u32>, total: u32, want: &[(&str, f64)]) {
    for (pod, p) in want {
        let n = f64::from(total);
        let (mean, sd) = (n * p, (n * p * (1.0 - p)).sqrt());
        let c = f64::from(got.get(*pod).copied().unwrap_or(0));
        assert!(
            (c - mean).abs() <= 5.5 * sd,
            "{what}: {pod} got {c} of {total}, want {mean:.0} ± {:.0} (Envoy's share {p:.3}); all: {got:?}",
            5.5 * sd
        );
    }
}

fn zone_a_b(got: &BTreeMap<String, u32>, prefix: &str) -> (u32, u32, u32) {
    let count = |z: &str| {
        got.iter()
            .filter(|(k, _)| k.starts_with(&format!("{prefix}-{z}")))
            .map(|(_, v)| v)
            .sum()
    };
    (
        count("a"),
        count("b"),
        got.get("E111").copied().unwrap_or(0),
    )
}

#[test]
fn istiod_multi_zone_shares_and_failover_as_envoy() {
    let cases = cases();
    // Every pod but fo's zone-a ones is served by one process; those two each by
    // their own, so each can die on its own.
    let mut served: Vec<(&str, u16, &str)> = Vec::new();
    let mut fo_a: Vec<(String, String)> = Vec::new();
    for c in &cases {
        for (n, ip, node) in &c.pods {
            if c.name == "fo" && *node == NODE_A {
                fo_a.push((n.clone(), ip.clone()));
            } else {
                served.push((ip, 8080, n));
            }
        }
    }
    let pods = Pods::new(PROBE, &served);
    for (_, ip) in &fo_a {
        add_addr(&pods.backend, "sm1", &format!("{ip}/16"));
    }
    let start_fo = |i: usize| -> Proc {
        serve(
            &pods.backend,
            PROBE,
            [format!("{}:8080={}", fo_a[i].1, fo_a[i].0)],
        )
    };
    let mut fo_servers: Vec<Option<Proc>> = (0..fo_a.len()).map(|i| Some(start_fo(i))).collect();

    let specs = [AgentSpec::on_node_a("delta"), AgentSpec::on_node_a("sotw")];
    let names: Vec<(&str, &str)> = specs.iter().map(|s| (s.pod.as_str(), s.node)).collect();
    let istiod = Istiod::start(&cluster(&names, &cases), CONFIG, &Options::default());
    let agents: Vec<Agent> = specs
        .into_iter()
        .map(|s| Agent::start(&istiod, s))
        .collect();
    for a in &agents {
        wait_until(
            &format!("{}: every case's service", a.proxy()),
            Duration::from_secs(30),
            || {
                let t = a.table();
                cases
                    .iter()
                    .all(|c| {
                        t.get(&format!("{}:80/tcp", c.vip))
                            .is_some_and(|b| !b.is_empty())
                    })
                    .then_some(())
                    .ok_or(format!("{t:?}"))
            },
        );
        a.assert_clean();
    }

    for a in &agents {
        let who = a.proxy();
        // No DestinationRule: 1/12 each.
        let spread = &cases[0];
        let got = pods.tally(a, &format!("{}:80", spread.vip), 1200);
        let want: Vec<(&str, f64)> = spread
            .pods
            .iter()
            .map(|(n, _, _)| (n.as_str(), 1.0 / 12.0))
            .collect();
        shares(
            &format!("{who}: spread, no DestinationRule"),
            &got,
            1200,
            &want,
        );
        // distribute 50/50: 1/6 for each of zone-a's three, 1/2 for zone-b's one.
        let dist = &cases[1];
        let got = pods.tally(a, &format!("{}:80", dist.vip), 1200);
        let want: Vec<(&str, f64)> = dist
            .pods
            .iter()
            .map(|(n, _, node)| (n.as_str(), if *node == NODE_A { 1.0 / 6.0 } else { 0.5 }))
            .collect();
        shares(&format!("{who}: distribute 50/50"), &got, 1200, &want);
        // Failover, all healthy: zone-a only.
        let got = pods.tally(a, "10.96.7.1:80", 200);
        assert_eq!(
            zone_a_b(&got, "fo"),
            (200, 0, 0),
            "{who}: all healthy: {got:?}"
        );
    }

    // fo-a1 dies (RST): ejected on its third refused connect; priority 0 is then
    // half healthy: 70 % stay in zone-a (on fo-a2), 30 % go to zone-b.
    fo_servers[0] = None;
    for a in &agents {
        let got = pods.tally(a, "10.96.7.1:80", 1000);
        let (za, zb, refused) = zone_a_b(&got, "fo");
        assert_eq!(refused, 3, "{}: {got:?}", a.proxy());
        shares(
            &format!("{}: half of priority 0 ejected", a.proxy()),
            &BTreeMap::from([("zone-b".to_owned(), zb)]),
            za + zb,
            &[("zone-b", 0.3)],
        );
    }
    // fo-a2 dies too: 3 more refused, then everything on priority 1.
    fo_servers[1] = None;
    for a in &agents {
        let got = pods.tally(a, "10.96.7.1:80", 300);
        assert_eq!(
            zone_a_b(&got, "fo"),
            (0, 297, 3),
            "{}: zone-a dead: {got:?}",
            a.proxy()
        );
    }
    // Back: the pods serve again; when their ejections end (8 s), zone-a takes
    // everything again, by itself.
    fo_servers = (0..fo_a.len()).map(|i| Some(start_fo(i))).collect();
    for a in &agents {
        wait_until(
            &format!("{}: zone-a back after its ejections", a.proxy()),
            Duration::from_secs(40),
            || {
                let got = pods.tally(a, "10.96.7.1:80", 100);
                (zone_a_b(&got, "fo") == (100, 0, 0))
                    .then_some(())
                    .ok_or(format!("{got:?}"))
            },
        );
        a.assert_clean();
    }
    drop(fo_servers);
}
