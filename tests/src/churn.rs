//! The churn scenario, shared by the CI test and the benchmark: a client at a fixed
//! rate (a new connection per request) while the control plane performs rolling
//! updates (add new → old DRAINING → old removed) and scale steps on the service.
//! Every request must succeed, and none may reach an endpoint that was DRAINING or
//! removed in the state the kernel had when the request started.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use sockmesh::model::{Protocol, ServiceAddr};

use crate::{Cgroup, NetNs, command_in, control_plane::ControlPlane, mesh, monotonic_ns};

/// What the churn driver needs.
pub struct Churn<'a> {
    pub client: &'a NetNs,
    pub cgroup: &'a Cgroup,
    pub probe: &'a Path,
    pub bpffs: &'a Path,
    pub cp: &'a ControlPlane,
    /// Backend pods: (name, address); all listen on `port`.
    pub pods: Vec<(String, IpAddr)>,
    pub port: u16,
    pub rps: u32,
    pub rolling_steps: u32,
    pub scale_steps: u32,
    pub step_every: Duration,
    pub http: bool,
    /// Run the leak audit after every step (the CI test; the benchmark times
    /// its steps and does not).
    pub audit_steps: bool,
}

/// The outcome.
#[derive(Debug, Default, Clone)]
pub struct ChurnResult {
    pub requests: usize,
    pub failures: usize,
    pub first_failures: Vec<String>,
    /// Requests that reached an endpoint DRAINING or removed in the kernel state
    /// they started under.
    pub stale: usize,
    pub steps: u32,
    /// Publish → kernel map holds it, per step (µs), sorted.
    pub apply_us: Vec<f64>,
    pub duration: Duration,
}

const SERVICE: &str = "churn";

fn vip() -> ServiceAddr {
    ServiceAddr {
        vip: IpAddr::from([10, 96, 7, 7]),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

/// Publishes the service with `active` pods (HEALTHY) and `draining` ones.
fn publish(c: &Churn<'_>, active: &BTreeSet<usize>, draining: &BTreeSet<usize>) {
    let mut eps: Vec<(IpAddr, u16, bool)> = active
        .iter()
        .map(|&i| (c.pods[i].1, c.port, true))
        .collect();
    eps.extend(draining.iter().map(|&i| (c.pods[i].1, c.port, false)));
    c.cp.publish(&[mesh::assignment_with_health(SERVICE, &eps)], false);
}

/// The setup resources: listener + EDS cluster for the churn service.
pub fn resources() -> Vec<(String, sockmesh_proto::pb::google::protobuf::Any)> {
    vec![
        mesh::tcp_listener(SERVICE, vip().vip, vip().port, SERVICE),
        mesh::eds_cluster(SERVICE),
    ]
}

/// Runs the scenario; the agent must already follow `cp`.
pub fn run(c: &Churn<'_>) -> Result<ChurnResult, String> {
    let reader = sockmesh::dataplane::open_pinned(c.bpffs).map_err(|e| e.to_string())?;
    let addr_of = |i: usize| (c.pods[i].1, c.port);
    let wait_applied = |active: &BTreeSet<usize>| -> Result<u64, String> {
        let want: Vec<(IpAddr, u16)> = {
            let mut v: Vec<_> = active.iter().map(|&i| addr_of(i)).collect();
            v.sort_unstable();
            v
        };
        let t0 = Instant::now();
        loop {
            if reader
                .reachable(&vip())
                .ok()
                .flatten()
                .is_some_and(|b| b == want)
            {
                return Ok(monotonic_ns());
            }
            // A tight poll, not `wait_until`: the benchmark times this wait.
            if t0.elapsed() > crate::scaled(Duration::from_secs(10)) {
                return Err(format!("kernel never showed {want:?}"));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    };
    // Start with pods 0, 1, 2.
    let mut active: BTreeSet<usize> = (0..3).collect();
    let mut draining: BTreeSet<usize> = BTreeSet::new();
    publish(c, &active, &draining);
    wait_applied(&active)?;

    let steps = c.rolling_steps + c.scale_steps;
    let millis = u64::try_from((c.step_every * (steps + 2)).as_millis()).unwrap_or(u64::MAX);
    let mut client = command_in(c.client, Some(c.cgroup), c.probe);
    client
        .args([
            "rate",
            &format!("{}:{}", vip().vip, vip().port),
            &c.rps.to_string(),
            &millis.to_string(),
        ])
        .args(c.http.then_some("http"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let client = client.spawn().map_err(|e| e.to_string())?;
    let started = Instant::now();
    std::thread::sleep(c.step_every);

    // (applied at, active set, draining set); the state the kernel had from then on.
    let mut history: Vec<(u64, BTreeSet<usize>)> = vec![(0, active.clone())];
    let mut apply_us = Vec::new();
    let mut next_pod = 3usize;
    let n = c.pods.len();
    let mut step = |active: &mut BTreeSet<usize>,
                    draining: &mut BTreeSet<usize>|
     -> Result<(), String> {
        let t0 = Instant::now();
        publish(c, active, draining);
        let at = wait_applied(active)?;
        apply_us.push(t0.elapsed().as_secs_f64() * 1e6);
        history.push((at, active.clone()));
        if c.audit_steps {
            // The service holds its active and draining pods, nothing more.
            crate::audit::Audit::kernel(c.bpffs).assert(
                &format!("churn step {}", history.len() - 1),
                &crate::audit::Expect::services(1, active.len() + draining.len()).under_traffic(),
            );
        }
        Ok(())
    };
    for k in 0..steps {
        let tick = Instant::now();
        if k < c.rolling_steps {
            // Rolling update in three phases over consecutive steps.
            match k % 3 {
                0 => {
                    // Surge: a new pod joins.
                    while active.contains(&(next_pod % n)) || draining.contains(&(next_pod % n)) {
                        next_pod += 1;
                    }
                    active.insert(next_pod % n);
                    next_pod += 1;
                }
                1 => {
                    // The oldest active pod starts draining.
                    if let Some(&old) = active.iter().find(|&&p| p != (next_pod + n - 1) % n) {
                        active.remove(&old);
                        draining.insert(old);
                    }
                }
                _ => draining.clear(), // drained pods are removed
            }
        } else if (k - c.rolling_steps).is_multiple_of(2) {
            // Scale up by one (any free pod).
            if let Some(p) = (0..n).find(|p| !active.contains(p) && !draining.contains(p)) {
                active.insert(p);
            }
        } else if active.len() > 1 {
            // Scale down by one: removed outright.
            if let Some(&p) = active.iter().next() {
                active.remove(&p);
            }
        }
        step(&mut active, &mut draining)?;
        if let Some(rest) = c.step_every.checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let out = client.wait_with_output().map_err(|e| e.to_string())?;
    let duration = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    let names: BTreeMap<&str, usize> = c
        .pods
        .iter()
        .enumerate()
        .map(|(i, (n, _))| (n.as_str(), i))
        .collect();
    let mut r = ChurnResult {
        steps,
        duration,
        ..ChurnResult::default()
    };
    for line in text.lines() {
        let mut f = line.split(' ');
        let start: u64 = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let _end = f.next();
        let what = f.next().unwrap_or("");
        r.requests += 1;
        let Some(&pod) = names.get(what) else {
            r.failures += 1;
            if r.first_failures.len() < 5 {
                r.first_failures.push(line.to_owned());
            }
            continue;
        };
        // The state applied last before the request started, and the next one
        // (which may have become visible while it connected).
        let idx = history
            .partition_point(|(at, _)| *at <= start)
            .saturating_sub(1);
        let allowed = history[idx].1.iter().chain(
            history
                .get(idx + 1)
                .map(|h| h.1.iter())
                .into_iter()
                .flatten(),
        );
        if !allowed.clone().any(|&p| p == pod) {
            r.stale += 1;
        }
    }
    apply_us.sort_by(f64::total_cmp);
    r.apply_us = apply_us;
    Ok(r)
}
