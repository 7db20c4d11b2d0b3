//! The churn soak, shared by the CI test (a few thousand services) and the
//! benchmark (200,000): services with outlier detection and a circuit breaker
//! created and deleted in waves through the control plane, each wave replacing
//! the last, so that over time far more services pass through the node than
//! `--max-services` holds, never more at once. Every service of a wave is
//! connected to once. After each wave the leak audit checks the maps and the
//! agent's state against the wave alone, and the agent's RSS is recorded; at the
//! end, with the last wave gone, a new service's circuit breaker refuses past
//! its limit and its outlier detection ejects a dead endpoint after exactly its
//! threshold: what a leak of `SM_SVC_HEALTH` entries would silently turn off.

use std::{
    ffi::OsStr,
    io::Write as _,
    net::IpAddr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use crate::{
    Admin, Bpffs, Cgroup, NetNs, Proc, TempDir, agent_command,
    audit::{Audit, Expect},
    command_in,
    control_plane::ControlPlane,
    hold, mesh, pod_network, release, serve, wait_until,
};

/// The soak's size.
#[derive(Clone, Copy, Debug)]
pub struct Soak {
    pub waves: u32,
    pub per_wave: u32,
    /// `--max-services`: at least `per_wave` plus the final service.
    pub max_services: u32,
}

/// One wave, as measured.
#[derive(Clone, Debug)]
pub struct Wave {
    /// Control plane publish → every service of the wave in the kernel.
    pub applied: Duration,
    /// Connects to the wave's services that reached a pod, and that failed.
    pub reached: u64,
    pub failed: u64,
    /// The agent's resident memory once the wave was audited, KiB.
    pub rss_kib: u64,
    /// What its allocator had allocated to live objects then, bytes
    /// (`sockmesh_heap_allocated_bytes`).
    pub heap_allocated: f64,
}

/// The soak's outcome (every check that must hold has been asserted).
#[derive(Clone, Debug)]
pub struct Outcome {
    pub waves: Vec<Wave>,
    /// The final service: connects refused past `max_connections: 2` with two
    /// held, and the refusals before its dead endpoint was ejected.
    pub breaker_refused: u32,
    pub refused_before_ejection: u32,
}

/// Two pods: each serves port 8080 (the name, then close) and 8081 (the name,
/// then held 30 s: the circuit breaker's held connections).
const POD_PORT: u16 = 8080;
const HELD_PORT: u16 = 8081;

/// Runs the soak with agent `bin` and probe `probe`. Panics naming the first
/// check that fails.
pub fn run(bin: &Path, probe: &Path, size: Soak) -> Outcome {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = NetNs::new();
    let backend = NetNs::new();
    let pods = pod_network(&client, &backend, 2);
    let _servers = serve(
        &backend,
        probe,
        pods.iter().zip(1..).flat_map(|(ip, i)| {
            [
                format!("{ip}:{POD_PORT}=b{i}"),
                format!("{ip}:{HELD_PORT}=h{i}@30000"),
            ]
        }),
    );
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let cp = ControlPlane::new();
    let (addr, _stop) = rt.block_on(cp.serve("127.0.0.1:0".parse().expect("addr")));
    let tmp = TempDir::new("sockmesh-soak-");
    let admin = Admin::in_dir(&tmp.0);
    let agent = Proc(
        agent_command(bin, &cgroup, &bpffs)
            .args(["--xds", &format!("grpc://{addr}")])
            .args(["--max-services", &size.max_services.to_string()])
            .args(admin.args())
            .stdout(Stdio::null())
            .stderr(admin.log())
            .spawn()
            .expect("agent"),
    );
    let audit = Audit::agent(&bpffs.0, &admin);
    let endpoints: Vec<(IpAddr, u16)> = pods.iter().map(|ip| (*ip, POD_PORT)).collect();

    let mut waves = Vec::new();
    for w in 0..size.waves {
        let first = w * size.per_wave;
        let ids = first..first + size.per_wave;
        let mut resources = Vec::with_capacity(3 * size.per_wave as usize);
        for i in ids.clone() {
            let name = format!("soak-{i}");
            resources.push(mesh::tcp_listener(&name, mesh::service_vip(i), 80, &name));
            resources.push(mesh::guarded_cluster(&name, 3, 100));
            resources.push(mesh::assignment(&name, &endpoints));
        }
        let started = Instant::now();
        // The wave replaces the last: its services are deleted as these appear.
        cp.publish(&resources, true);
        let last = ids.end - 1;
        let wanted = |t: &sockmesh::model::RoutingTable| {
            t.services.len() == size.per_wave as usize
                && [first, last]
                    .iter()
                    .all(|&i| t.services.keys().any(|s| s.vip == mesh::service_vip(i)))
        };
        wait_until(
            &format!("wave {w}: its {} services in the kernel", size.per_wave),
            Duration::from_secs(120),
            || sockmesh::dataplane::read_table(&bpffs.0).is_ok_and(|t| wanted(&t)),
        );
        let applied = started.elapsed();
        let (reached, failed, first_failure) = each(
            probe,
            &client,
            &cgroup,
            ids.map(|i| format!("{}:80", mesh::service_vip(i))),
        );
        assert_eq!(
            failed, 0,
            "wave {w}: every service reaches a pod ({first_failure:?})"
        );
        let n = size.per_wave as usize;
        audit.assert(
            &format!("wave {w}"),
            &Expect::services(n, 2 * n).xds(n, n, 0, n),
        );
        waves.push(Wave {
            applied,
            reached,
            failed,
            rss_kib: rss_kib(agent.pid()),
            heap_allocated: admin
                .metric("sockmesh_heap_allocated_bytes")
                .unwrap_or_default(),
        });
    }

    // The last wave deleted: nothing of any wave is left.
    cp.remove_all();
    audit.assert_empty("every wave deleted");

    // A new service still gets its circuit breaker and its outlier detection:
    // two held connections fill `max_connections: 2`, the third is refused.
    let vip = IpAddr::from([10, 96, 0, 99]);
    let held: Vec<(IpAddr, u16)> = pods.iter().map(|ip| (*ip, HELD_PORT)).collect();
    cp.publish(
        &[
            mesh::tcp_listener("after", vip, 80, "after"),
            mesh::guarded_cluster("after", 3, 2),
            mesh::assignment("after", &held),
        ],
        true,
    );
    crate::wait_for_backends(
        &bpffs,
        "the service after the soak",
        &[&pods[0].to_string(), &pods[1].to_string()],
    );
    let (reached, holder) = hold(probe, &client, &cgroup, &format!("{vip}:80"), 3);
    let breaker_refused = u32::try_from(reached.get("E111").copied().unwrap_or(0)).unwrap_or(0);
    assert_eq!(
        (reached.values().sum::<u64>(), breaker_refused),
        (3, 1),
        "max_connections 2 with three connects held: two served, one refused: {reached:?}"
    );
    release(holder);
    // One endpoint without a server (a RST at every connect): outlier detection
    // ejects it after exactly `consecutive_5xx: 3` refusals.
    cp.publish(
        &[
            mesh::tcp_listener("after", vip, 80, "after"),
            mesh::guarded_cluster("after", 3, 100),
            mesh::assignment("after", &[(pods[0], POD_PORT), (pods[1], 9)]),
        ],
        true,
    );
    crate::wait_for_backends(
        &bpffs,
        "the service with a dead endpoint",
        &[&pods[0].to_string(), &pods[1].to_string()],
    );
    let mut cmd = command_in(&client, Some(&cgroup), probe);
    cmd.args(["connect", &format!("{vip}:80"), "60"]);
    let refused_before_ejection = u32::try_from(
        crate::run(cmd)
            .lines()
            .filter(|l| l.ends_with(" E111"))
            .count(),
    )
    .unwrap_or(u32::MAX);
    assert_eq!(
        refused_before_ejection, 3,
        "the dead endpoint is ejected after exactly 3 refused connects"
    );
    cp.remove_all();
    audit.assert_empty("the service after the soak deleted");
    drop(agent);
    Outcome {
        waves,
        breaker_refused,
        refused_before_ejection,
    }
}

/// One connect to each address from `client`: (reached, failed, the first
/// failure).
fn each(
    probe: &Path,
    client: &NetNs,
    cgroup: &Cgroup,
    addrs: impl Iterator<Item = String>,
) -> (u64, u64, Option<String>) {
    let mut cmd = command_in(client, Some(cgroup), probe);
    cmd.arg(OsStr::new("each"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("probe");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for a in addrs {
            writeln!(stdin, "{a}").expect("write an address");
        }
    }
    let out = child.wait_with_output().expect("probe");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let counts: Vec<u64> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [reached, failed] = counts[..] else {
        panic!("probe each: {text:?}");
    };
    (reached, failed, lines.next().map(str::to_owned))
}

/// VmRSS of `pid`, KiB (0 if unreadable).
pub fn rss_kib(pid: nix::unistd::Pid) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
