//! The benchmark "Kubernetes change → kernel" with a live istiod
//! (`smbench istiod`, or `SMBENCH_ONLY=istiod cargo xtask bench`): a cluster of
//! N Services of 10 endpoints each in `sockmesh-istiod`, one agent following it
//! over delta ADS as the node's sidecar, and a series of EndpointSlice writes
//! (one endpoint of one Service replaced), each timed from the write to the
//! kernel map holding the new endpoint, and split at istiod's push (its
//! `/syncz` `sentTime`): write → push is istiod (its 100 ms debounce, the push
//! context, the EDS generation), push → kernel is gRPC and the agent.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use serde_json::{Value, json};
use sockmesh::model::{Protocol, ServiceAddr};

use crate::{
    istiod::{Istiod, Options},
    istiod_lab::{Agent, AgentSpec, NODE_A, base_objects},
    kube::{self, Endpoint},
};

const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Endpoints per Service.
pub const ENDPOINTS: u32 = 10;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i)
}

/// Endpoint `j` of Service `i` (generation `g`: a replaced endpoint gets a new
/// address). Addresses only: nothing connects to them.
fn endpoint_ip(i: u32, j: u32, g: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (g << 21) + i * 16 + j)
}

fn slice(i: u32, ips: &[Ipv4Addr]) -> String {
    let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
    let eps: Vec<Endpoint> = ips.iter().map(|ip| Endpoint::address(ip, NODE_A)).collect();
    kube::endpoint_slice(
        "bench",
        &format!("svc-{i}"),
        &format!("svc-{i}-1"),
        &eps,
        &[("tcp-main", 8080)],
    )
}

fn cluster(services: u32) -> String {
    let mut objs = base_objects(&[("sockmesh-bench", NODE_A)]);
    objs.push(kube::namespace("bench", &[]));
    for i in 0..services {
        objs.push(kube::service(
            "bench",
            &format!("svc-{i}"),
            Some(&vip(i).to_string()),
            None,
            &[kube::tcp("tcp-main", 80, 8080)],
            "",
        ));
        let ips: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|j| endpoint_ip(i, j, 0)).collect();
        objs.push(slice(i, &ips));
    }
    kube::docs(objs)
}

fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// One size: N services, `changes` timed EndpointSlice writes.
fn one(bin_dir: &Path, services: u32, changes: u32, say: &dyn Fn(&str)) -> Result<Value, String> {
    let started = Instant::now();
    let opts = Options {
        ready_timeout: Some(Duration::from_secs(600)),
        ..Options::default()
    };
    let istiod = Istiod::start(&cluster(services), "", &opts);
    let istiod_start = started.elapsed();
    let spec = AgentSpec {
        pod: "sockmesh-bench".into(),
        bin: Some(crate::sockmesh_bin_in(bin_dir)),
        ..AgentSpec::on_node_a("delta")
    };
    let started = Instant::now();
    let agent = Agent::start(&istiod, spec);
    let last = ServiceAddr {
        vip: IpAddr::V4(vip(services - 1)),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let reader = loop {
        if let Ok(r) = sockmesh::dataplane::open_pinned(&agent.bpffs.0)
            && r.reachable(&last)
                .ok()
                .flatten()
                .is_some_and(|b| b.len() == ENDPOINTS as usize)
            && sockmesh::dataplane::read_table(&agent.bpffs.0)
                .is_ok_and(|t| t.services.len() == services as usize)
        {
            break r;
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!("the kernel never held {services} services"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let initial = started.elapsed();
    say(&format!(
        "  {services} services × {ENDPOINTS}: istiod up in {:.1} s, agent start → all in the kernel {:.1} s; RSS istiod {} MiB, agent {} MiB",
        istiod_start.as_secs_f64(),
        initial.as_secs_f64(),
        istiod.pid().map_or(0, rss_mib),
        rss_mib(agent.proc.0.id()),
    ));
    let (mut e2e, mut istiod_part, mut agent_part) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..changes {
        // A service spread over the table, its first endpoint replaced.
        let i = (k * 7919 + 13) % services;
        let mut ips: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|j| endpoint_ip(i, j, 0)).collect();
        ips[0] = endpoint_ip(i, 0, k + 1);
        let mut want: Vec<(IpAddr, u16)> = ips.iter().map(|ip| (IpAddr::V4(*ip), 8080)).collect();
        want.sort_unstable();
        let target = ServiceAddr {
            vip: IpAddr::V4(vip(i)),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let written = istiod.apply_kube(&slice(i, &ips));
        let t0 = Instant::now();
        let applied = loop {
            if reader
                .reachable(&target)
                .ok()
                .flatten()
                .is_some_and(|b| b == want)
            {
                break SystemTime::now();
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(format!("change {k} (svc-{i}) never reached the kernel"));
            }
            std::thread::sleep(Duration::from_micros(50));
        };
        e2e.push(ms(written, applied));
        if let Some(pushed) = istiod.sent_time(&agent.proxy(), EDS) {
            istiod_part.push(ms(written, pushed));
            agent_part.push(ms(pushed, applied));
        }
        // Put it back (not timed), so every change starts from the same table.
        let original: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|j| endpoint_ip(i, j, 0)).collect();
        istiod.apply_kube(&slice(i, &original));
        let mut back: Vec<(IpAddr, u16)> =
            original.iter().map(|ip| (IpAddr::V4(*ip), 8080)).collect();
        back.sort_unstable();
        let t0 = Instant::now();
        while !reader
            .reachable(&target)
            .ok()
            .flatten()
            .is_some_and(|b| b == back)
        {
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(format!("svc-{i} never came back"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    for v in [&mut e2e, &mut istiod_part, &mut agent_part] {
        v.sort_by(f64::total_cmp);
    }
    say(&format!(
        "    EndpointSlice write → kernel: p50 {:.1} ms, p99 {:.1} ms ({} changes); write → istiod's push: p50 {:.1} ms, p99 {:.1} ms (its debounce: 100 ms); push → kernel: p50 {:.2} ms, p99 {:.2} ms",
        percentile(&e2e, 0.5),
        percentile(&e2e, 0.99),
        e2e.len(),
        percentile(&istiod_part, 0.5),
        percentile(&istiod_part, 0.99),
        percentile(&agent_part, 0.5),
        percentile(&agent_part, 0.99),
    ));
    Ok(json!({
        "services": services,
        "endpoints": ENDPOINTS,
        "debounce_ms": 100,
        "istiod_start_s": istiod_start.as_secs_f64(),
        "initial_load_s": initial.as_secs_f64(),
        "changes": e2e.len(),
        "write_to_kernel_ms": {"p50": percentile(&e2e, 0.5), "p99": percentile(&e2e, 0.99)},
        "write_to_push_ms": {"p50": percentile(&istiod_part, 0.5), "p99": percentile(&istiod_part, 0.99)},
        "push_to_kernel_ms": {"p50": percentile(&agent_part, 0.5), "p99": percentile(&agent_part, 0.99)},
    }))
}

/// The scenario at each size of `sizes`, `changes` changes each.
pub fn kubernetes_to_kernel(
    bin_dir: &Path,
    sizes: &[u32],
    changes: u32,
    say: &dyn Fn(&str),
) -> Value {
    say(
        "\nKubernetes change → kernel, live istiod (sockmesh-istiod, delta ADS, one agent as the node's sidecar):",
    );
    let runs: Vec<Value> = sizes
        .iter()
        .map(|&n| {
            one(bin_dir, n, changes, say).unwrap_or_else(|e| json!({"services": n, "error": e}))
        })
        .collect();
    json!({ "sizes": runs })
}
