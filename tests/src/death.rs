//! The abrupt-death scenario, shared by the CI test (bounded) and the benchmark:
//! three pods behind one service, a client opening new connections at a fixed
//! rate, and at a set time a pod dies with no EDS change — its server killed
//! (connects get a RST), or its address gone from the network (connects time
//! out) — or every pod dies. Each connect's start, end and outcome is recorded, so
//! what failed after the death, and after the ejection, can be counted.

use std::{net::IpAddr, path::Path, process::Stdio, time::Duration};

use sockmesh::model::{
    Backend, Health, LbPolicy, Outlier, Protocol, RoutingTable, Service, ServiceAddr,
};

use crate::{Bpffs, Cgroup, NetNs, Proc, add_addr, command_in, install, ip, monotonic_ns, serve};

/// How the pod dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Death {
    /// b3's server process is killed: connects to it get a RST (ECONNREFUSED).
    Killed,
    /// b3's address leaves the network: connects to it time out.
    Unreachable,
    /// Every pod's server is killed.
    AllKilled,
}

/// Outlier detection as the scenario sets it: `consecutive_5xx: 5`,
/// `base_ejection_time: 30s`, `max_ejection_percent: 100`, Envoy's other defaults.
pub fn scenario_outlier() -> Outlier {
    Outlier {
        consecutive: 5,
        enforcing: 100,
        base_ejection_ms: 30_000,
        max_ejection_ms: 300_000,
        interval_ms: 10_000,
        max_ejection_percent: 100,
        panic_percent: 50,
    }
}

/// Pods b1, b2 (one server) and b3 (its own server) at 10.10.1.11..13:8080.
pub struct Lab {
    pub client: NetNs,
    pub backend: NetNs,
    pub cgroup: Cgroup,
    pub bpffs: Bpffs,
    pub dp: sockmesh::dataplane::Datapath,
    probe: std::path::PathBuf,
    b12: Option<Proc>,
    b3: Option<Proc>,
}

/// One run.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// The service's VIP port (each run its own service: its own health state).
    pub port: u16,
    pub outlier: Option<Outlier>,
    pub death: Death,
    /// New connections per second.
    pub rate: u32,
    /// How long the client runs, and when the death happens, from its start.
    pub millis: u64,
    pub death_at_ms: u64,
    /// When the dead comes back (`None`: not during the run).
    pub revive_at_ms: Option<u64>,
    /// The client's connect timeout.
    pub timeout_ms: u64,
}

/// What the client saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Connects started from the death to the revival (or the end).
    pub connects_after_death: u64,
    /// Of them, those that failed.
    pub failed_after_death: u64,
    /// Of those failures, connections that were established and then reset
    /// (ECONNRESET): placed on the pod while it still listened, cut by its death.
    /// The kernel counts them as successful connects, as Envoy's outlier
    /// detection does for tcp_proxy, so they are not among the `consecutive`.
    pub reset_after_death: u64,
    /// Connects started after the `consecutive`-th failed connect had completed
    /// whose connect failed (outlier detection on: the kernel ejected the pod by
    /// then).
    pub failed_after_threshold: u64,
    /// Connects in flight (started, not ended) when the `consecutive`-th failure
    /// completed: the most that can still fail after it.
    pub in_flight_at_threshold: u64,
    /// Milliseconds from the death to the `consecutive`-th failure's end.
    pub threshold_after_ms: Option<u64>,
    /// Connects started after the revival, and of them failed.
    pub connects_after_revival: u64,
    pub failed_after_revival: u64,
    /// Connects b3 served after its revival, and when the first started
    /// (milliseconds after the revival).
    pub revived_served: u64,
    pub revived_first_after_ms: Option<u64>,
    /// Failures by errno (`E111`, `E0` for a timeout), over the whole run.
    pub errors: std::collections::BTreeMap<String, u64>,
}

impl Outcome {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "connects_after_death": self.connects_after_death,
            "failed_after_death": self.failed_after_death,
            "reset_after_death": self.reset_after_death,
            "failed_after_threshold": self.failed_after_threshold,
            "in_flight_at_threshold": self.in_flight_at_threshold,
            "threshold_after_ms": self.threshold_after_ms,
            "connects_after_revival": self.connects_after_revival,
            "failed_after_revival": self.failed_after_revival,
            "revived_served": self.revived_served,
            "revived_first_after_ms": self.revived_first_after_ms,
            "errors": self.errors,
        })
    }
}

fn pod(i: u8) -> IpAddr {
    IpAddr::from([10, 10, 1, 10 + i])
}

impl Lab {
    pub fn new(probe: &Path) -> Self {
        let client = NetNs::new();
        let backend = NetNs::new();
        crate::pod_network(&client, &backend, 3);
        let cgroup = Cgroup::new();
        let bpffs = Bpffs::new();
        let dp = install(&cgroup, &bpffs);
        let mut lab = Self {
            client,
            backend,
            cgroup,
            bpffs,
            dp,
            probe: probe.to_owned(),
            b12: None,
            b3: None,
        };
        lab.revive(Death::AllKilled);
        lab
    }

    fn kill(&mut self, death: Death) {
        match death {
            Death::Killed => drop(self.b3.take()),
            Death::AllKilled => {
                drop(self.b3.take());
                drop(self.b12.take());
            }
            Death::Unreachable => ip(&[
                "-n",
                &self.backend.0,
                "addr",
                "del",
                &format!("{}/24", pod(3)),
                "dev",
                "sm1",
            ]),
        }
    }

    fn revive(&mut self, death: Death) {
        if death == Death::Unreachable {
            add_addr(&self.backend, "sm1", &format!("{}/24", pod(3)));
            return;
        }
        if self.b12.is_none() {
            self.b12 = Some(serve(
                &self.backend,
                &self.probe,
                [1u8, 2].map(|i| format!("{}:8080=b{i}", pod(i))),
            ));
        }
        if self.b3.is_none() {
            self.b3 = Some(serve(
                &self.backend,
                &self.probe,
                [format!("{}:8080=b3", pod(3))],
            ));
        }
    }

    /// The leak audit of the lab's pins.
    pub fn audit(&self) -> crate::audit::Audit<'_> {
        crate::audit::Audit::kernel(&self.bpffs.0)
    }

    /// Ends a scenario: the maps hold what `expect` says, and once every service
    /// is removed, nothing.
    pub fn finish(&mut self, expect: &crate::audit::Expect) {
        self.audit().assert("the end of the scenario", expect);
        self.dp
            .apply(&RoutingTable::default())
            .expect("remove every service");
        self.audit().assert_empty("every service removed");
    }

    /// Runs `r`: installs its service, starts the client, kills (and revives)
    /// at the set times, and returns what the client saw. The lab is whole again
    /// afterwards.
    pub fn run(&mut self, r: &Run) -> Result<Outcome, String> {
        let service = ServiceAddr {
            vip: IpAddr::from([10, 96, 0, 60]),
            port: r.port,
            protocol: Protocol::Tcp,
        };
        let mut table = RoutingTable::default();
        table.insert(
            service,
            Service::new(
                (1..=3).map(|i| Backend::new(pod(i), 8080)).collect(),
                LbPolicy::Random,
            )
            .with_health(Health {
                outlier: r.outlier,
                max_connections: None,
            }),
        );
        self.dp.apply(&table).map_err(|e| e.to_string())?;
        let mut cmd = command_in(&self.client, Some(&self.cgroup), &self.probe);
        cmd.args([
            "timeline",
            &format!("10.96.0.60:{}", r.port),
            &r.rate.to_string(),
            &r.millis.to_string(),
            &r.timeout_ms.to_string(),
        ])
        .stdout(Stdio::piped());
        let started = monotonic_ns();
        let client = cmd.spawn().map_err(|e| format!("spawn the client: {e}"))?;
        // The scenario's clock: a benchmark's schedule, not a wait for an event.
        let at = |ms: u64| {
            let due = started + ms * 1_000_000;
            let now = monotonic_ns();
            if due > now {
                std::thread::sleep(Duration::from_nanos(due - now));
            }
            monotonic_ns()
        };
        let death = at(r.death_at_ms);
        self.kill(r.death);
        let revival = r.revive_at_ms.map(|ms| {
            let t = at(ms);
            self.revive(r.death);
            t
        });
        let out = client
            .wait_with_output()
            .map_err(|e| format!("the client: {e}"))?;
        self.revive(r.death);
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<(u64, u64, &str)> = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?, f.next()?))
            })
            .collect();
        if lines.is_empty() {
            return Err(format!("the client printed nothing: {out:?}"));
        }
        let consecutive = r.outlier.map_or(5, |o| o.consecutive) as usize;
        Ok(outcome(&lines, death, revival, consecutive))
    }
}

/// Counts `lines` (start, end, outcome) against the death and revival times.
fn outcome(
    lines: &[(u64, u64, &str)],
    death: u64,
    revival: Option<u64>,
    consecutive: usize,
) -> Outcome {
    let failed = |w: &str| w.starts_with('E');
    // ECONNRESET comes after an established connect: what outlier detection
    // counts is the connect's outcome.
    let reset = |w: &str| w == "E104";
    let connect_failed = |w: &str| failed(w) && !reset(w);
    let until = revival.unwrap_or(u64::MAX);
    let mut o = Outcome::default();
    let mut failures: Vec<u64> = Vec::new();
    for &(t0, t1, what) in lines {
        if failed(what) {
            *o.errors.entry(what.to_owned()).or_default() += 1;
        }
        if t0 >= death && t0 < until {
            o.connects_after_death += 1;
            if failed(what) {
                o.failed_after_death += 1;
            }
            if reset(what) {
                o.reset_after_death += 1;
            }
            if connect_failed(what) {
                failures.push(t1);
            }
        }
        if revival.is_some_and(|r| t0 >= r) {
            o.connects_after_revival += 1;
            if failed(what) {
                o.failed_after_revival += 1;
            }
            if what == "b3" {
                o.revived_served += 1;
                let after = (t0 - until) / 1_000_000;
                o.revived_first_after_ms =
                    Some(o.revived_first_after_ms.map_or(after, |a| a.min(after)));
            }
        }
    }
    failures.sort_unstable();
    if let Some(&threshold) = failures.get(consecutive.saturating_sub(1)) {
        o.threshold_after_ms = Some((threshold - death) / 1_000_000);
        for &(t0, t1, what) in lines {
            if t0 < threshold && t1 > threshold {
                o.in_flight_at_threshold += 1;
            }
            if t0 > threshold && t0 < until && connect_failed(what) {
                o.failed_after_threshold += 1;
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_counted_against_the_death_and_the_threshold() {
        let ms = 1_000_000;
        let lines = [
            (0, ms, "b1"),
            // Death at 10 ms; two failures, the second the threshold (2).
            (10 * ms, 11 * ms, "E111"),
            // Established while the pod still listened, reset by its death: a
            // failure the client sees, not a failed connect.
            (10 * ms, 12 * ms, "E104"),
            (12 * ms, 30 * ms, "b2"),
            (13 * ms, 14 * ms, "E111"),
            (15 * ms, 16 * ms, "b1"),
            (20 * ms, 21 * ms, "E111"),
            // Revival at 40 ms.
            (41 * ms, 42 * ms, "b3"),
        ];
        let o = outcome(&lines, 10 * ms, Some(40 * ms), 2);
        assert_eq!(o.connects_after_death, 6);
        assert_eq!(o.failed_after_death, 4);
        assert_eq!(o.reset_after_death, 1);
        assert_eq!(o.threshold_after_ms, Some(4));
        assert_eq!(o.in_flight_at_threshold, 1);
        assert_eq!(o.failed_after_threshold, 1);
        assert_eq!((o.connects_after_revival, o.failed_after_revival), (1, 0));
        assert_eq!((o.revived_served, o.revived_first_after_ms), (1, Some(1)));
        assert_eq!(o.errors["E111"], 3);
    }
}
