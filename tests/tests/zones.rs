//! Multi-zone services with real connections, against Envoy's arithmetic over
//! priorities and localities: two zones of different sizes with
//! `locality_weighted_lb_config` give every pod one twelfth; a priority 0 with
//! half its endpoints unhealthy keeps 70 % and spills 30 % to priority 1; a whole
//! zone killed under load with outlier detection and no EDS change fails over to
//! priority 1 after its pods' thresholds, and its traffic comes back when the
//! ejections end.
//!
//! Bounds are set for a false-failure rate below 1e-6: each count is binomial,
//! and the band is 5.5 standard deviations.

use std::{collections::BTreeMap, path::Path, time::Duration};

use sockmesh_tests::{
    FileAgent, NetNs,
    audit::Expect,
    command_in, pod_network, run, serve, wait_for_backends,
    zone_death::{self, VIP, config},
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

/// `n` sequential connects from `client` (in the agent's cgroup): how many each
/// pod answered.
fn spread(agent: &FileAgent, client: &NetNs, n: u32) -> BTreeMap<String, u32> {
    let mut probe = command_in(client, Some(&agent.cgroup), PROBE);
    probe.args(["connect", VIP, &n.to_string()]);
    let mut counts = BTreeMap::new();
    for name in run(probe).lines().filter_map(|l| l.split(' ').nth(2)) {
        *counts.entry(name.to_owned()).or_insert(0) += 1;
    }
    counts
}

/// Asserts `count` of `n` is within 5.5 standard deviations of the share `p`.
fn within(what: &str, count: u32, n: u32, p: f64, all: &BTreeMap<String, u32>) {
    let mean = f64::from(n) * p;
    let band = 5.5 * (f64::from(n) * p * (1.0 - p)).sqrt();
    assert!(
        (f64::from(count) - mean).abs() <= band,
        "{what}: {count} of {n}, Envoy's share {p:.4} gives {mean:.0} ± {band:.0}: {all:?}"
    );
}

/// Zone a: 10 pods (locality weight 10), zone b: 2 pods (weight 2), with
/// `locality_weighted_lb_config`. Envoy picks a zone by its weight (10/12, 2/12),
/// then a pod in it: every pod 1/12. Weights multiplied into the endpoints
/// would give each zone-b pod 2/104 (about 69 of 3,600).
#[test]
fn two_zones_give_every_pod_one_twelfth() {
    let client = NetNs::new();
    let backend = NetNs::new();
    let pods = pod_network(&client, &backend, 12);
    let _servers = serve(
        &backend,
        PROBE,
        pods.iter()
            .zip(1..)
            .map(|(ip, i)| format!("{ip}:8080=b{i}")),
    );
    let zone_a: Vec<(u8, &str)> = (1..=10).map(|i| (i, "HEALTHY")).collect();
    let zone_b: Vec<(u8, &str)> = vec![(11, "HEALTHY"), (12, "HEALTHY")];
    let text = config(
        &[(0, 10, &zone_a), (0, 2, &zone_b)],
        "  common_lb_config: { locality_weighted_lb_config: {} }\n",
    );
    let agent = FileAgent::start("zones.yaml", &text, &[]);
    let all: Vec<String> = (11..=22).map(|i| format!("10.10.1.{i}")).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    wait_for_backends(&agent.bpffs, "two zones", &all);
    let n = 3_600;
    let counts = spread(&agent, &client, n);
    for i in 1..=12 {
        let name = format!("b{i}");
        within(
            &name,
            counts.get(&name).copied().unwrap_or(0),
            n,
            1.0 / 12.0,
            &counts,
        );
    }
    agent
        .audit()
        .assert("two zones", &Expect::services(1, 12).xds(1, 1, 0, 0));
    agent.clear_and_audit();
}

/// Priority 0: 2 healthy and 2 unhealthy endpoints; priority 1: 2 healthy. Envoy:
/// priority 0's health is min(100, 140 × 2 / 4) = 70, priority 1's 100, so 70 %
/// and 30 %, each split between two pods: 35 % and 15 %.
#[test]
fn a_half_unhealthy_priority_spills_thirty_percent_to_the_next() {
    let client = NetNs::new();
    let backend = NetNs::new();
    let pods = pod_network(&client, &backend, 6);
    let _servers = serve(
        &backend,
        PROBE,
        pods.iter()
            .zip(1..)
            .map(|(ip, i)| format!("{ip}:8080=b{i}")),
    );
    let p0: Vec<(u8, &str)> = vec![
        (1, "HEALTHY"),
        (2, "HEALTHY"),
        (3, "UNHEALTHY"),
        (4, "UNHEALTHY"),
    ];
    let p1: Vec<(u8, &str)> = vec![(5, "HEALTHY"), (6, "HEALTHY")];
    let agent = FileAgent::start("zones.yaml", &config(&[(0, 1, &p0), (1, 1, &p1)], ""), &[]);
    // (The unhealthy endpoints are in the maps, kept for their connections.)
    wait_for_backends(
        &agent.bpffs,
        "two priorities",
        &[
            "10.10.1.11",
            "10.10.1.12",
            "10.10.1.13",
            "10.10.1.14",
            "10.10.1.15",
            "10.10.1.16",
        ],
    );
    let n = 4_000;
    let counts = spread(&agent, &client, n);
    for (name, p) in [("b1", 0.35), ("b2", 0.35), ("b5", 0.15), ("b6", 0.15)] {
        within(name, counts.get(name).copied().unwrap_or(0), n, p, &counts);
    }
    for name in ["b3", "b4"] {
        assert_eq!(counts.get(name), None, "{name} is unhealthy: {counts:?}");
    }
    agent
        .audit()
        .assert("two priorities", &Expect::services(1, 6).xds(1, 1, 0, 0));
    agent.clear_and_audit();
}

/// Priority 0 (zone a: b1, b2) and priority 1 (zone b: b3, b4), outlier
/// detection `consecutive_5xx: 3`, ejections of 3 s. Zone a's server is killed
/// (its connects get a RST) under 100 new connections/s with no EDS change: at
/// most 2 × 3 connects fail, plus those in flight at the sixth failure; none after
/// it, and the traffic goes to zone b (Envoy: priority 0's health 0, priority 1
/// takes it all). Zone a's server is back 1.5 s later; when its ejections end,
/// connects reach it again.
#[test]
fn a_dead_zone_fails_over_after_its_thresholds_and_comes_back() {
    let z = zone_death::run(&sockmesh_tests::sockmesh_bin(), Path::new(PROBE));
    let lines = &z.connects;
    let failed = zone_death::failed;
    let revival = z.revival;
    assert!(
        lines.len() > 600,
        "the client ran: {} connects",
        lines.len()
    );
    let failures = z.failures();
    let sixth = *failures
        .get(5)
        .unwrap_or_else(|| panic!("fewer than 6 failed connects: {failures:?}"));
    let in_flight = z.in_flight(sixth);
    assert!(
        failures.len() <= 6 + in_flight,
        "{} connects failed after the death; at most 2 × 3 + {in_flight} in flight",
        failures.len()
    );
    let after = z.outcomes(sixth, u64::MAX);
    assert!(
        after.iter().all(|w| !failed(w)),
        "a connect failed after the sixth failure: {after:?}"
    );
    // Until the ejections end (3 s after each pod's third failure), zone b.
    let ejections_end = sixth + 3_000_000_000;
    let before_end = z.outcomes(sixth, ejections_end.min(revival + 500_000_000));
    assert!(
        !before_end.is_empty() && before_end.iter().all(|w| *w == "b3" || *w == "b4"),
        "zone a ejected: zone b serves: {before_end:?}"
    );
    // When the ejections end (the first of them 3 s after its third failure,
    // which came before the sixth), zone a serves again.
    let back = z.outcomes(ejections_end + 200_000_000, u64::MAX);
    let zone_a_served = back.iter().filter(|w| zone_death::in_zone_a(w)).count();
    assert!(
        back.len() > 50 && zone_a_served * 10 > back.len() * 8,
        "after the ejections, priority 0 serves again: {zone_a_served} of {} ({back:?})",
        back.len()
    );
}

/// Priority 0 (b1, b2), priority 1 (b3, b4), outlier detection `consecutive_5xx:
/// 3` with 30 s ejections; b1 dies and is ejected. Envoy: priority 0 has 1 of 2
/// hosts healthy, health min(100, 140 × 1 / 2) = 70: b2 takes 70 %, zone b 30 %
/// (a redraw within priority 0 alone would give b2 everything). `/config_dump`
/// shows the loads the kernel applies before (100 / 0) and after (70 / 30, b1 at
/// 0), and the node's locality.
#[test]
fn one_ejected_host_moves_its_levels_load_as_envoys_health_does() {
    let client = NetNs::new();
    let backend = NetNs::new();
    let pods = pod_network(&client, &backend, 4);
    let b1 = serve(&backend, PROBE, [format!("{}:8080=b1", pods[0])]);
    let _rest = serve(
        &backend,
        PROBE,
        (2..=4).map(|i| format!("{}:8080=b{i}", pods[i - 1])),
    );
    let p0: Vec<(u8, &str)> = vec![(1, "HEALTHY"), (2, "HEALTHY")];
    let p1: Vec<(u8, &str)> = vec![(3, "HEALTHY"), (4, "HEALTHY")];
    let outlier = "  outlier_detection: { consecutive_5xx: 3, base_ejection_time: 30s, max_ejection_percent: 100, interval: 10s }\n";
    let agent = FileAgent::start(
        "zones.yaml",
        &config(&[(0, 1, &p0), (1, 1, &p1)], outlier),
        &["--node-locality", "r/z0"],
    );
    wait_for_backends(
        &agent.bpffs,
        "two zones",
        &["10.10.1.11", "10.10.1.12", "10.10.1.13", "10.10.1.14"],
    );
    let dump = agent.admin.dump();
    assert_eq!(dump["connection"]["node"]["locality"], "r/z0/", "{dump}");
    let lb = &dump["load_balancing"]["10.96.0.70:80/tcp"];
    let loads = |lb: &serde_json::Value| {
        let load = |i: usize| lb["levels"][i]["healthy_load"].as_u64();
        (load(0), load(1))
    };
    assert_eq!(loads(lb), (Some(100), Some(0)), "{lb}");
    assert_eq!(lb["endpoints"]["10.10.1.11:8080"]["share"], 50.0, "{lb}");
    assert_eq!(
        lb["endpoints"]["10.10.1.13:8080"]["locality"], "r/z1/",
        "{lb}"
    );
    drop(b1);
    // Connects until the kernel has ejected b1 (its third failed connect).
    sockmesh_tests::wait_until("b1 ejected", Duration::from_secs(20), || {
        let _ = spread(&agent, &client, 10);
        let dump = agent.admin.dump();
        let ejected = dump["outlier_ejected"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["backend"] == "10.10.1.11:8080"));
        ejected.then_some(()).ok_or(dump["outlier_ejected"].clone())
    });
    // What the kernel applies now, as /config_dump reports it: the choice table
    // the agent rewrote when the kernel reported the ejection.
    let lb = sockmesh_tests::wait_until(
        "/config_dump to show b1's ejection in the loads",
        Duration::from_secs(10),
        || {
            let dump = agent.admin.dump();
            let lb = dump["load_balancing"]["10.96.0.70:80/tcp"].clone();
            (loads(&lb) == (Some(70), Some(30)))
                .then_some(lb.clone())
                .ok_or(lb)
        },
    );
    assert_eq!(lb["levels"][0]["ejected_healthy"], 1, "{lb}");
    assert_eq!(lb["endpoints"]["10.10.1.11:8080"]["ejected"], true, "{lb}");
    assert_eq!(lb["endpoints"]["10.10.1.11:8080"]["share"], 0.0, "{lb}");
    assert_eq!(lb["endpoints"]["10.10.1.12:8080"]["share"], 70.0, "{lb}");
    assert_eq!(lb["endpoints"]["10.10.1.14:8080"]["share"], 15.0, "{lb}");
    let n = 2_000;
    let counts = spread(&agent, &client, n);
    let b2 = counts.get("b2").copied().unwrap_or(0);
    within("b2", b2, n, 0.70, &counts);
    let zone_b = counts.get("b3").copied().unwrap_or(0) + counts.get("b4").copied().unwrap_or(0);
    within("zone b", zone_b, n, 0.30, &counts);
    assert_eq!(counts.get("b1"), None, "b1 is ejected: {counts:?}");
    agent
        .audit()
        .assert("b1 ejected", &Expect::services(1, 4).xds(1, 1, 0, 0));
    agent.clear_and_audit();
}
