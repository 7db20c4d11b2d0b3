//! Kubernetes scaling and a rolling update through a live istiod, under a
//! connection loop on each of two agents (delta and SotW): pods are added,
//! marked `terminating` by the EndpointSlice controller and removed, as a
//! Deployment does it, and every request succeeds, none reaching a pod the
//! kernel had already taken out of rotation. Each EndpointSlice write is timed to
//! the kernel: write → istiod's push (its `/syncz` `sentTime`: the debounce,
//! 100 ms as in production, and the push) and push → kernel (the agent).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use sockmesh::model::{Protocol, ServiceAddr};
use sockmesh_tests::{
    istiod::{Istiod, Options},
    istiod_lab::{Agent, AgentSpec, NODE_A, Pods, Request, RequestLoop, base_objects},
    kube::{self, Endpoint, Pod, tcp},
    monotonic_ns, scaled,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const VIP: &str = "10.96.1.10:80";
/// Requests per second per agent.
const RPS: u32 = 200;

fn pod_ip(i: u8) -> String {
    format!("10.10.1.{i}")
}

fn pod_name(i: u8) -> String {
    format!("web-{i}")
}

fn pod(i: u8) -> String {
    Pod::new("app", &pod_name(i), &pod_ip(i), NODE_A, "web").yaml()
}

/// The Deployment's pods as the EndpointSlice controller sees them.
#[derive(Clone, Debug, Default)]
struct Deployment {
    ready: BTreeSet<u8>,
    terminating: BTreeSet<u8>,
}

impl Deployment {
    fn slice(&self) -> String {
        let (names, ips): (BTreeMap<u8, String>, BTreeMap<u8, String>) = self
            .ready
            .iter()
            .map(|&i| ((i, pod_name(i)), (i, pod_ip(i))))
            .unzip();
        let eps: Vec<Endpoint> = names
            .iter()
            .map(|(i, n)| {
                let e = Endpoint::pod(&ips[i], n, NODE_A);
                if self.terminating.contains(i) {
                    e.terminating()
                } else {
                    e
                }
            })
            .collect();
        kube::endpoint_slice("app", "web", "web-abc12", &eps, &[("http", 8080)])
    }

    /// The backends Envoy would send new connections to: the ready ones (istiod
    /// sends no terminating endpoint, and Envoy would not use one).
    fn active(&self) -> Vec<(IpAddr, u16)> {
        let mut v: Vec<(IpAddr, u16)> = self
            .ready
            .iter()
            .map(|&i| (pod_ip(i).parse().expect("ip"), 8080))
            .collect();
        v.sort_unstable();
        v
    }
}

/// One EndpointSlice write and when each agent's kernel showed it.
struct Step {
    /// Whether it changed the pods that take new connections (a terminating
    /// endpoint's removal does not: it took none already).
    changed: bool,
    what: String,
    written: SystemTime,
    pushed: Vec<Option<SystemTime>>,
    /// Per agent: (monotonic ns, wall clock) when its kernel held the new set.
    applied: Vec<(u64, SystemTime)>,
    active: BTreeSet<String>,
    active_addrs: Vec<(IpAddr, u16)>,
}

fn service() -> ServiceAddr {
    ServiceAddr {
        vip: IpAddr::from([10, 96, 1, 10]),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

/// Writes the Deployment's slice and waits (a tight poll: it is timed) until every
/// agent's kernel has exactly its ready pods.
/// Then the loops run under the new set until each has answered 5 requests begun
/// after its kernel changed.
fn write(
    istiod: &Istiod,
    agents: &[Agent],
    loops: &mut [RequestLoop],
    d: &Deployment,
    before: &[(IpAddr, u16)],
    what: &str,
) -> Step {
    let readers: Vec<_> = agents
        .iter()
        .map(|a| sockmesh::dataplane::open_pinned(&a.bpffs.0).expect("pinned maps"))
        .collect();
    let want = d.active();
    let written = istiod.apply_kube(&d.slice());
    let mut applied: Vec<Option<(u64, SystemTime)>> = vec![None; agents.len()];
    let started = Instant::now();
    while applied.iter().any(Option::is_none) {
        for (i, r) in readers.iter().enumerate() {
            if applied[i].is_none()
                && r.reachable(&service())
                    .ok()
                    .flatten()
                    .is_some_and(|b| b == want)
            {
                applied[i] = Some((monotonic_ns(), SystemTime::now()));
            }
        }
        assert!(
            started.elapsed() < scaled(Duration::from_secs(15)),
            "{what}: the kernels never held {want:?} ({applied:?})"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
    let pushed = agents
        .iter()
        .map(|a| istiod.sent_time(&a.proxy(), EDS))
        .collect();
    let applied: Vec<(u64, SystemTime)> = applied.into_iter().flatten().collect();
    for (l, (at, _)) in loops.iter_mut().zip(&applied) {
        l.wait_answers_since(*at, 5);
    }
    // Each step leaves the maps holding the new set and nothing of the old.
    for a in agents {
        a.assert_clean_under_traffic();
    }
    Step {
        changed: before != want.as_slice(),
        what: what.to_owned(),
        written,
        pushed,
        applied,
        active: d.ready.iter().map(|&i| pod_name(i)).collect(),
        active_addrs: want,
    }
}

/// Applies a new Pod (before its endpoint appears), or deletes one (after).
fn pod_exists(istiod: &Istiod, i: u8, exists: bool) {
    if exists {
        istiod.apply_kube(&pod(i));
    } else {
        istiod.delete_kube(&pod(i));
    }
}

/// Changes the Deployment as Kubernetes does, step by step, under the loops.
struct Driver<'a> {
    istiod: &'a Istiod,
    agents: &'a [Agent],
    loops: Vec<RequestLoop>,
    d: Deployment,
    steps: Vec<Step>,
}

impl Driver<'_> {
    fn step(&mut self, what: String) {
        let before = self
            .steps
            .last()
            .map(|s| s.active_addrs.clone())
            .unwrap_or_default();
        let step = write(
            self.istiod,
            self.agents,
            &mut self.loops,
            &self.d,
            &before,
            &what,
        );
        self.steps.push(step);
    }

    /// A new pod becomes ready.
    fn add(&mut self, i: u8) {
        pod_exists(self.istiod, i, true);
        self.d.ready.insert(i);
        self.step(format!("web-{i} ready"));
    }

    /// The pod is being deleted: its endpoint is terminating (still serving its
    /// grace period), then gone with the pod.
    fn remove(&mut self, i: u8) {
        self.d.ready.remove(&i);
        self.d.terminating.insert(i);
        self.step(format!("web-{i} terminating"));
        self.d.terminating.remove(&i);
        self.step(format!("web-{i} removed"));
        pod_exists(self.istiod, i, false);
    }

    /// Scale up, scale down and a rolling update, as a Deployment does them.
    fn run(&mut self) {
        // Scale 3 → 5 → 4.
        self.add(4);
        self.add(5);
        self.remove(1);
        // A rolling update (maxSurge 1, maxUnavailable 0): each new pod ready
        // before an old one goes.
        for (old, new) in [(2, 6), (3, 7), (4, 8), (5, 1)] {
            self.add(new);
            self.remove(old);
        }
        // Scale 4 → 2 → 3.
        self.remove(6);
        self.remove(7);
        self.add(2);
    }
}

/// Requests that failed, and those that reached a pod the kernel no longer had
/// for new connections when the request began (the set then, or the next one,
/// which may have come while it connected, allowed).
fn check(
    agent: usize,
    requests: &[Request],
    initial: &BTreeSet<String>,
    steps: &[Step],
) -> (Vec<String>, Vec<String>) {
    let mut history: Vec<(u64, &BTreeSet<String>)> = vec![(0, initial)];
    history.extend(steps.iter().map(|s| (s.applied[agent].0, &s.active)));
    let mut failed = Vec::new();
    let mut stale = Vec::new();
    for r in requests {
        if r.answer.starts_with('E') || r.answer.is_empty() {
            failed.push(format!("{r:?}"));
            continue;
        }
        let i = history
            .partition_point(|(at, _)| *at <= r.start_ns)
            .saturating_sub(1);
        let allowed = history[i].1.contains(&r.answer)
            || history
                .get(i + 1)
                .is_some_and(|(_, s)| s.contains(&r.answer));
        if !allowed {
            stale.push(format!("{r:?} under {:?}", history[i].1));
        }
    }
    (failed, stale)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

fn ms(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from)
        .map_or(-1.0, |d| d.as_secs_f64() * 1e3)
}

#[test]
fn istiod_scale_and_rolling_update_lose_nothing() {
    let served: Vec<(String, String)> = (1..=8).map(|i| (pod_ip(i), pod_name(i))).collect();
    let served: Vec<(&str, u16, &str)> = served
        .iter()
        .map(|(ip, n)| (ip.as_str(), 8080, n.as_str()))
        .collect();
    let pods = Pods::new(PROBE, &served);
    let specs = [AgentSpec::on_node_a("delta"), AgentSpec::on_node_a("sotw")];
    let names: Vec<(&str, &str)> = specs.iter().map(|s| (s.pod.as_str(), s.node)).collect();
    let d = Deployment {
        ready: (1..=3).collect(),
        ..Deployment::default()
    };
    let mut objs = base_objects(&names);
    objs.push(kube::namespace("app", &[]));
    objs.push(kube::service(
        "app",
        "web",
        Some("10.96.1.10"),
        Some("web"),
        &[tcp("http", 80, 8080)],
        "",
    ));
    objs.extend(d.ready.iter().map(|&i| pod(i)));
    objs.push(d.slice());
    let istiod = Istiod::start(&kube::docs(objs), "", &Options::default());
    let agents: Vec<Agent> = specs
        .into_iter()
        .map(|s| Agent::start(&istiod, s))
        .collect();
    let initial: BTreeSet<String> = d.ready.iter().map(|&i| pod_name(i)).collect();
    let want: Vec<String> = d
        .active()
        .iter()
        .map(|(ip, p)| format!("{ip}:{p}"))
        .collect();
    for a in &agents {
        a.wait_table(
            "web's first three pods",
            &[("10.96.1.10:80/tcp".to_owned(), want.clone())].into(),
        );
    }
    let to_kernel = "sockmesh_update_to_kernel_seconds";
    let before: Vec<(f64, f64)> = agents
        .iter()
        .map(|a| {
            (
                a.metric(&format!("{to_kernel}_sum")),
                a.metric(&format!("{to_kernel}_count")),
            )
        })
        .collect();

    let loops: Vec<RequestLoop> = agents
        .iter()
        .map(|a| RequestLoop::start(&pods, a, VIP, RPS))
        .collect();
    let mut driver = Driver {
        istiod: &istiod,
        agents: &agents,
        loops,
        steps: vec![],
        d: d.clone(),
    };
    // What the kernels held before the first step.
    driver.steps.push(Step {
        changed: false,
        what: "initial".into(),
        written: SystemTime::now(),
        pushed: vec![],
        applied: vec![(0, SystemTime::now()); agents.len()],
        active: initial.clone(),
        active_addrs: d.active(),
    });
    driver.run();
    let Driver {
        loops, mut steps, ..
    } = driver;
    steps.remove(0);
    let requests: Vec<Vec<Request>> = loops.into_iter().map(RequestLoop::stop).collect();

    let mut e2e = Vec::new();
    let mut istiod_part = Vec::new();
    let mut agent_part = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        let (failed, stale) = check(i, &requests[i], &initial, &steps);
        let n = requests[i].len();
        eprintln!(
            "{}: {n} requests over {} steps, {} failed, {} stale",
            agent.proxy(),
            steps.len(),
            failed.len(),
            stale.len()
        );
        assert!(n >= 5 * steps.len(), "{n} requests");
        assert!(failed.is_empty(), "{}: failed {failed:?}", agent.proxy());
        assert!(
            stale.is_empty(),
            "{}: reached pods out of rotation: {stale:?}",
            agent.proxy()
        );
        for s in steps.iter().filter(|s| s.changed) {
            e2e.push(ms(s.written, s.applied[i].1));
            if let Some(p) = s.pushed[i] {
                istiod_part.push(ms(s.written, p));
                agent_part.push(ms(p, s.applied[i].1));
            }
        }
        let (sum, count) = (
            agent.metric(&format!("{to_kernel}_sum")) - before[i].0,
            agent.metric(&format!("{to_kernel}_count")) - before[i].1,
        );
        eprintln!(
            "{}: the agent's own part (update received → kernel written): {:.2} ms mean over {count} updates",
            agent.proxy(),
            sum / count.max(1.0) * 1e3
        );
        agent.assert_clean();
    }
    e2e.sort_by(f64::total_cmp);
    istiod_part.sort_by(f64::total_cmp);
    agent_part.sort_by(f64::total_cmp);
    eprintln!(
        "EndpointSlice write → kernel, {} samples: p50 {:.1} ms, p99 {:.1} ms; write → istiod's push (its 100 ms debounce included): p50 {:.1} ms, p99 {:.1} ms; push → kernel: p50 {:.2} ms, p99 {:.2} ms",
        e2e.len(),
        percentile(&e2e, 0.5),
        percentile(&e2e, 0.99),
        percentile(&istiod_part, 0.5),
        percentile(&istiod_part, 0.99),
        percentile(&agent_part, 0.5),
        percentile(&agent_part, 0.99),
    );
    for s in &steps {
        eprintln!(
            "  {:<20} {:?}",
            s.what,
            s.applied
                .iter()
                .map(|(_, w)| ms(s.written, *w))
                .collect::<Vec<_>>()
        );
    }
}
