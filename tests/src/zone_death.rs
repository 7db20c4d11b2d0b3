//! The dead-zone scenario, shared by the CI test (bounded) and the benchmark:
//! priority 0 (zone a: b1, b2) and priority 1 (zone b: b3, b4) behind one VIP
//! served by a file-source agent with outlier detection (`consecutive_5xx: 3`,
//! 3 s ejections); a client opens 100 new connections/s for 8 s; at 1 s zone a's
//! servers die (connects get a RST) with no EDS change, at 2.5 s they are back.
//! Each connect's start, end and outcome is recorded.

use std::{path::Path, process::Stdio, time::Duration};

use crate::{FileAgent, NetNs, command_in, monotonic_ns, pod_network, serve, wait_for_backends};

/// The scenario's VIP.
pub const VIP: &str = "10.96.0.70:80";

/// A locality of an assignment: priority, locality weight, endpoints as (pod
/// number, health status).
pub type Locality<'a> = (u32, u32, &'a [(u8, &'a str)]);

/// A listener on the VIP and a STATIC cluster whose assignment has `localities`,
/// with `cluster_extra` lines added to the cluster.
pub fn config(localities: &[Locality], cluster_extra: &str) -> String {
    let mut locs = String::new();
    for (i, (priority, weight, eps)) in localities.iter().enumerate() {
        locs.push_str(&format!(
            "    - priority: {priority}\n      locality: {{ region: r, zone: z{i} }}\n      load_balancing_weight: {weight}\n      lb_endpoints:\n"
        ));
        for (pod, health) in *eps {
            locs.push_str(&format!(
                "      - endpoint: {{ address: {{ socket_address: {{ address: 10.10.1.{}, port_value: 8080 }} }} }}\n        health_status: {health}\n",
                10 + pod
            ));
        }
    }
    format!(
        r#"version_info: "1"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: zones
  address: {{ socket_address: {{ address: 10.96.0.70, port_value: 80 }} }}
  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: zones, cluster: zones }} }} ] }} ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: zones
  type: STATIC
{cluster_extra}  load_assignment:
    cluster_name: zones
    endpoints:
{locs}"#
    )
}

/// One run's record.
pub struct ZoneDeath {
    /// (start ns, end ns, outcome: a pod's name or an errno as `E111`).
    pub connects: Vec<(u64, u64, String)>,
    /// When zone a's servers were killed, and when they were back.
    pub death: u64,
    pub revival: u64,
}

/// Runs the scenario with the agent `bin` and the probe `probe`.
pub fn run(bin: &Path, probe: &Path) -> ZoneDeath {
    let client = NetNs::new();
    let backend = NetNs::new();
    let pods = pod_network(&client, &backend, 4);
    let zone = |ids: [u8; 2]| {
        serve(
            &backend,
            probe,
            ids.map(|i| format!("{}:8080=b{i}", pods[usize::from(i) - 1])),
        )
    };
    let mut zone_a = Some(zone([1, 2]));
    let _zone_b = zone([3, 4]);
    let p0: Vec<(u8, &str)> = vec![(1, "HEALTHY"), (2, "HEALTHY")];
    let p1: Vec<(u8, &str)> = vec![(3, "HEALTHY"), (4, "HEALTHY")];
    let outlier = "  outlier_detection: { consecutive_5xx: 3, base_ejection_time: 3s, max_ejection_percent: 100, interval: 10s }\n";
    let agent = FileAgent::start_with(
        bin,
        "zones.yaml",
        &config(&[(0, 1, &p0), (1, 1, &p1)], outlier),
        &[],
    );
    wait_for_backends(
        &agent.bpffs,
        "two zones",
        &["10.10.1.11", "10.10.1.12", "10.10.1.13", "10.10.1.14"],
    );
    let mut cmd = command_in(&client, Some(&agent.cgroup), probe);
    cmd.args(["timeline", VIP, "100", "8000", "1000"])
        .stdout(Stdio::piped());
    let started = monotonic_ns();
    let timeline = cmd.spawn().expect("client");
    // The scenario's clock: a schedule, not a wait for an event.
    let at = |ms: u64| {
        let due = started + ms * 1_000_000;
        let now = monotonic_ns();
        if due > now {
            std::thread::sleep(Duration::from_nanos(due - now));
        }
        monotonic_ns()
    };
    let death = at(1_000);
    drop(zone_a.take());
    let revival = at(2_500);
    zone_a = Some(zone([1, 2]));
    let out = timeline.wait_with_output().expect("client");
    drop(zone_a);
    // The ejected pods' health entries belong to the service; they go with it.
    agent.audit().assert(
        "zone a back",
        &crate::audit::Expect::services(1, 4).xds(1, 1, 0, 0),
    );
    agent.clear_and_audit();
    let connects = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.to_owned(),
            ))
        })
        .collect();
    ZoneDeath {
        connects,
        death,
        revival,
    }
}

/// A connect that failed (a RST: ECONNREFUSED), not one established and then
/// reset by the death (ECONNRESET), which outlier detection counts as a success.
pub fn failed(outcome: &str) -> bool {
    outcome.starts_with('E') && outcome != "E104"
}

/// Zone a's pods.
pub fn in_zone_a(outcome: &str) -> bool {
    outcome == "b1" || outcome == "b2"
}

impl ZoneDeath {
    /// End times of the connects started after the death that failed, sorted.
    pub fn failures(&self) -> Vec<u64> {
        let mut f: Vec<u64> = self
            .connects
            .iter()
            .filter(|(t0, _, w)| *t0 >= self.death && failed(w))
            .map(|(_, t1, _)| *t1)
            .collect();
        f.sort_unstable();
        f
    }

    /// Connects in flight at `t` (started before, ended after).
    pub fn in_flight(&self, t: u64) -> usize {
        self.connects
            .iter()
            .filter(|(t0, t1, _)| *t0 < t && *t1 > t)
            .count()
    }

    /// Outcomes of the connects started in `from..to`.
    pub fn outcomes(&self, from: u64, to: u64) -> Vec<&str> {
        self.connects
            .iter()
            .filter(|(t0, _, _)| *t0 > from && *t0 < to)
            .map(|(_, _, w)| w.as_str())
            .collect()
    }

    /// The first connect started after `t` that zone a served: its start.
    pub fn zone_a_back_after(&self, t: u64) -> Option<u64> {
        self.connects
            .iter()
            .filter(|(t0, _, w)| *t0 > t && in_zone_a(w))
            .map(|(t0, _, _)| *t0)
            .min()
    }
}
