//! The benchmark suite behind `cargo xtask bench` (root). Every scenario builds its
//! own namespaces (no default route), cgroup and bpffs directory, measures the
//! paths it compares side by side in one run (interleaved rounds), prints a table
//! and adds its figures to the JSON report given as the first argument.

use std::{
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::{Value, json};
use sockmesh::model::{Backend, Protocol, RoutingTable, ServiceAddr};
use sockmesh_tests::{
    Bpffs, Cgroup, NetNs, Proc, agent_command, command_in, install,
    load::{self, capacity_flags, endpoints_of, percentile, rss_kib, wait_loaded},
    run, veth,
};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let report_path = PathBuf::from(
        args.first()
            .map_or("target/bench/report.json", String::as_str),
    );
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let probe = bin_dir.join("smprobe");
    let mut report = serde_json::Map::new();
    report.insert("kernel".into(), json!(uname()));
    // One scenario, or several separated by commas (one run: comparable figures),
    // as the second argument or in SMBENCH_ONLY (`SMBENCH_ONLY=istiod cargo xtask
    // bench`).
    let only_env = std::env::var("SMBENCH_ONLY").ok();
    let only: Option<Vec<&str>> = args
        .get(1)
        .map(String::as_str)
        .or(only_env.as_deref())
        .map(|s| s.split(',').collect());
    let wants = |name: &str| only.as_ref().is_none_or(|o| o.contains(&name));
    if wants("propagation") {
        report.insert(
            "propagation".into(),
            propagation(
                &bin_dir,
                Prop {
                    services: env_or("SMBENCH_SERVICES", PROP_SERVICES),
                    endpoints: env_or("SMBENCH_ENDPOINTS", PROP_ENDPOINTS),
                    changes: env_or("SMBENCH_CHANGES", PROP_CHANGES),
                    maglev: env_or("SMBENCH_MAGLEV", PROP_MAGLEV),
                    churn_per_s: env_or("SMBENCH_CHURN", 0),
                    throughput: env_or("SMBENCH_THROUGHPUT", 0) == 1,
                },
            ),
        );
    }
    if wants("pipeline") {
        report.insert("pipeline".into(), pipeline(&bin_dir));
    }
    if wants("probes") {
        // /readyz and /metrics while the agent loads 100,000 services and takes
        // batches of changes (SMBENCH_SERVICES, SMBENCH_BATCHES, SMBENCH_POLL_MS).
        report.insert(
            "admin_under_load".into(),
            sockmesh_tests::probes::admin_under_load(
                &bin_dir,
                sockmesh_tests::probes::Load {
                    services: env_or("SMBENCH_SERVICES", 100_000),
                    endpoints: PROP_ENDPOINTS,
                    batches: throughput_batches_n(),
                    every: std::time::Duration::from_millis(env_or("SMBENCH_POLL_MS", 10)),
                },
                &say,
            ),
        );
    }
    if wants("file") {
        report.insert("file_source".into(), file_source(&bin_dir));
    }
    if wants("http") {
        report.insert("http".into(), http_rps());
    }
    if wants("churn") {
        report.insert("churn".into(), churn_bench(&bin_dir));
    }
    if wants("scale") {
        report.insert("scale".into(), scale(&bin_dir));
    }
    if only
        .as_ref()
        .is_some_and(|o| o.contains(&"kubeproxy-check"))
    {
        report.insert("kubeproxy_check".into(), kubeproxy_check());
    }
    if wants("connect") {
        report.insert("connect_cost".into(), connect_cost(&probe));
    }
    if wants("least_conn") {
        report.insert("least_conn".into(), least_conn_bench(&probe));
    }
    if wants("maglev") {
        report.insert("maglev".into(), maglev_bench(&probe));
    }
    if wants("outlier") {
        report.insert("outlier".into(), outlier_bench(&probe));
    }
    if wants("zones") {
        report.insert("zone_death".into(), zone_death_bench(&bin_dir, &probe));
    }
    if wants("soak") {
        report.insert("soak".into(), soak_bench(&bin_dir, &probe));
    }
    if wants("istiod") {
        // Kubernetes change → kernel through a live istiod, beside the
        // propagation scenario's control plane → kernel.
        report.insert(
            "istiod".into(),
            sockmesh_tests::istiod_bench::kubernetes_to_kernel(
                &bin_dir,
                &ISTIOD_SIZES,
                env_or("SMBENCH_ISTIOD_CHANGES", 50),
                &detail,
            ),
        );
    }
    let text = serde_json::to_string_pretty(&Value::Object(report)).unwrap_or_default();
    if let Some(dir) = report_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&report_path, text + "\n") {
        let _ = writeln!(std::io::stderr(), "writing {}: {e}", report_path.display());
        return std::process::ExitCode::FAILURE;
    }
    say(&format!("report: {}", report_path.display()));
    std::process::ExitCode::SUCCESS
}

/// Services in the live-istiod scenario's clusters (10 endpoints each).
const ISTIOD_SIZES: [u32; 2] = [1_000, 10_000];

/// The value of environment variable `name`, or `default` when unset or unparsable
/// (the propagation scenario's sizes: SMBENCH_SERVICES, SMBENCH_ENDPOINTS,
/// SMBENCH_CHANGES, SMBENCH_MAGLEV, SMBENCH_CHURN, SMBENCH_THROUGHPUT=1;
/// SMBENCH_POLL_US).
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn say(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Like [`say`], silenced while a scenario runs as part of another.
fn detail(line: &str) {
    if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        say(line);
    }
}

fn uname() -> String {
    Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Filler services so the service map is as full as a busy node's.
const FILLER_SERVICES: u32 = 10_000;
const ROUNDS: usize = 25;

/// `FILLER_SERVICES` services 10.200.x.y:80, all to `target`.
fn filler_table(target: Backend) -> RoutingTable {
    let mut table = RoutingTable::default();
    for i in 0..FILLER_SERVICES {
        let [_, _, hi, lo] = i.to_be_bytes();
        table.insert(
            ServiceAddr {
                vip: IpAddr::from([10, 200, hi, lo]),
                port: 80,
                protocol: Protocol::Tcp,
            },
            vec![target],
        );
    }
    table
}
const CONNECTS_PER_ROUND: u32 = 3_000;

/// Backend port offsets of the two-priority service's other hosts: priority 0's
/// second zone (unhealthy, never reached), priority 1's two zones.
const LEVEL_P0B: u16 = 10_000;
const LEVEL_P1A: u16 = 20_000;
const LEVEL_P1B: u16 = 30_000;

/// connect()+close() latency to one backend: directly from a process outside the
/// datapath's cgroup (no program runs), directly from inside it (the program runs
/// and misses), and through a VIP (the program runs and rewrites).
/// The paths [`connect_cost`] compares.
const PATHS: usize = 8;

fn connect_cost(probe: &Path) -> Value {
    let client = NetNs::new();
    let backend = NetNs::new();
    veth(&client, "10.10.1.1/24", &backend, "10.10.1.11/24");
    // Every (round, path) run gets its own backend port, so no 4-tuple is reused
    // while an earlier connection to it is in TIME_WAIT.
    let runs = (ROUNDS + 1) * PATHS;
    let port = |run: usize| 9000 + u16::try_from(run).unwrap_or(0);
    let mut serve = command_in(&backend, None, probe);
    serve.arg("serve");
    serve.args((0..runs).map(|r| format!("10.10.1.11:{}=b1", port(r))));
    // The priority-1 hosts of the two-priority service (see below).
    serve.args((0..runs).flat_map(|r| {
        [LEVEL_P1A, LEVEL_P1B].map(|extra| format!("10.10.1.11:{}=b1", port(r) + extra))
    }));
    let _server = Proc::server(serve);
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let mut dp = install(&cgroup, &bpffs);
    let target = Backend::new(IpAddr::from([10, 10, 1, 11]), 9000);
    let mut table = filler_table(target);
    use sockmesh::model::{Health, LbPolicy, Service};
    // One one-backend service per run and policy: weighted random (10.96.0.1, port
    // +1000); least connections, Istio's default (10.96.0.3, +2000: two draws, the
    // socket's storage and the count's atomic add on every connect, the release at
    // close); Maglev (10.96.0.4, +3000: the netns cookie, its hash, one chunk).
    // Outlier detection (10.96.0.5, +4000: weighted random, plus the socket's
    // storage at connect, the sock_ops state callbacks until established, and the
    // ejection lookup).
    let outlier = Health {
        outlier: Some(sockmesh_tests::death::scenario_outlier()),
        max_connections: None,
    };
    let policies = [
        (1, 1000, LbPolicy::Random, Health::default()),
        (
            3,
            2000,
            LbPolicy::LeastConn {
                choices: LbPolicy::DEFAULT_CHOICES,
            },
            Health::default(),
        ),
        (
            4,
            3000,
            LbPolicy::Maglev {
                table_size: sockmesh_common::DEFAULT_MAGLEV_TABLE_SIZE,
            },
            Health::default(),
        ),
        (5, 4000, LbPolicy::Random, outlier),
    ];
    for r in 0..runs {
        // Two priorities of two localities each, as istiod writes a multi-zone
        // cluster with locality failover (outlier detection on): priority 0's
        // zone-b host unhealthy, so priority 0 takes 70 % (1.4 × 50 %) and
        // priority 1 the rest; connect() reads the level table every time.
        let host = |port, priority, locality, state| Backend {
            state,
            placement: sockmesh::model::Placement {
                priority,
                locality,
                locality_weight: 1,
                overprovisioning: 140,
            },
            ..Backend::new(IpAddr::from([10, 10, 1, 11]), port)
        };
        let active = sockmesh::model::BackendState::Active;
        let hosts = [
            host(port(r), 0, 0, active),
            host(
                port(r) + LEVEL_P0B,
                0,
                1,
                sockmesh::model::BackendState::Unhealthy,
            ),
            host(port(r) + LEVEL_P1A, 1, 0, active),
            host(port(r) + LEVEL_P1B, 1, 1, active),
        ];
        let planned = sockmesh::lb::levels::plan(
            &hosts,
            sockmesh::lb::levels::LbSettings {
                locality_weighted: true,
                panic_percent: 50,
            },
            true,
        );
        table.insert(
            ServiceAddr {
                vip: IpAddr::from([10, 96, 0, 6]),
                port: port(r) + 5000,
                protocol: Protocol::Tcp,
            },
            Service::new(planned.backends, LbPolicy::Random)
                .with_health(outlier)
                .with_levels(planned.levels),
        );
        for (vip, offset, policy, health) in policies {
            table.insert(
                ServiceAddr {
                    vip: IpAddr::from([10, 96, 0, vip]),
                    port: port(r) + offset,
                    protocol: Protocol::Tcp,
                },
                Service::new(
                    vec![Backend::new(IpAddr::from([10, 10, 1, 11]), port(r))],
                    policy,
                )
                .with_health(health),
            );
        }
    }
    if let Err(e) = dp.apply(&table) {
        say(&format!("connect_cost: apply failed: {e}"));
        return json!({"error": e.to_string()});
    }

    // kube-proxy's iptables layout in the client namespace: 10,000 services and the
    // real VIP 10.96.0.2 (any port, DNAT to the backend keeping the port).
    let rules = sockmesh_tests::kubeproxy::iptables_ruleset_with(
        FILLER_SERVICES,
        10,
        Some(("10.96.0.2", "10.10.1.11")),
    );
    // kube-proxy's rules live in their own client namespace: loaded into the
    // sockmesh client's, every new connection there (direct ones too) would walk
    // the nat OUTPUT chain.
    let ipt_client = match sockmesh_tests::iptables_client(&backend, &rules) {
        Ok(ns) => ns,
        Err(e) => {
            say(&format!(
                "connect_cost: loading the iptables rules failed: {e}"
            ));
            return json!({"error": e});
        }
    };
    // (name, in the cgroup, address, port offset of its services)
    let paths: [(&str, bool, &str, u16); PATHS] = [
        ("direct, no program", false, "10.10.1.11", 0),
        ("direct, program (miss)", true, "10.10.1.11", 0),
        ("VIP, sockmesh (rewrite)", true, "10.96.0.1", 1000),
        ("VIP, iptables DNAT", false, "10.96.0.2", 0),
        ("VIP, sockmesh least conn", true, "10.96.0.3", 2000),
        ("VIP, sockmesh maglev", true, "10.96.0.4", 3000),
        ("VIP, sockmesh outlier det.", true, "10.96.0.5", 4000),
        ("VIP, 2 priorities x 2 zones", true, "10.96.0.6", 5000),
    ];
    let mut means = vec![Vec::new(); paths.len()];
    let mut p50s = vec![Vec::new(); paths.len()];
    let mut p99s = vec![Vec::new(); paths.len()];
    // The programs' own time per connect, as the kernel accounts it (run_time_ns
    // of every sockmesh program on the cgroup: connect, sock_ops, sock_release):
    // what sockmesh adds, without the noise of the connect()+close() around it.
    let stats = sockmesh::dataplane::enable_run_stats();
    if let Err(e) = &stats {
        say(&format!(
            "connect_cost: no program run-time statistics: {e}"
        ));
    }
    let program_stats = || -> Option<Vec<(String, u64, u64)>> {
        stats.as_ref().ok()?;
        sockmesh::dataplane::attached_program_run_stats(&cgroup.0).ok()
    };
    let mut prog_ns = vec![Vec::new(); paths.len()];
    // Per path and program, over every measured round: (ns, runs).
    let mut by_program = vec![std::collections::BTreeMap::<String, (u64, u64)>::new(); paths.len()];
    let mut failures = 0u64;
    // Round 0 warms up caches and is discarded; the paths alternate within a round,
    // in a rotating order, so that machine noise hits them alike.
    for round in 0..=ROUNDS {
        // Rotate the order each round so no path always runs first.
        for k in 0..paths.len() {
            let i = (round + k) % paths.len();
            let (_, in_cgroup, addr, offset) = &paths[i];
            let run_port = port(round * paths.len() + i) + offset;
            // (the iptables path keeps the port: 10.96.0.2:P → 10.10.1.11:P)
            let ns = if i == 3 { &ipt_client } else { &client };
            let mut cmd = command_in(ns, in_cgroup.then_some(&cgroup), probe);
            cmd.args([
                "cc",
                &format!("{addr}:{run_port}"),
                &CONNECTS_PER_ROUND.to_string(),
            ]);
            let before = in_cgroup.then(program_stats).flatten();
            let out = run(cmd);
            let spent = before.and_then(|b| {
                let after = program_stats()?;
                let deltas: Vec<(String, u64, u64)> = after
                    .into_iter()
                    .map(|(name, ns, runs)| {
                        let (ns0, runs0) = b
                            .iter()
                            .find(|(n, _, _)| *n == name)
                            .map_or((0, 0), |(_, ns, runs)| (*ns, *runs));
                        (name, ns.saturating_sub(ns0), runs.saturating_sub(runs0))
                    })
                    .collect();
                Some(deltas)
            });
            let f: Vec<u64> = out
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            let [_, failed, mean, p50, p99] = f[..] else {
                say(&format!("connect_cost: bad probe output {out:?}"));
                return json!({"error": "bad probe output"});
            };
            if round > 0 {
                failures += failed;
                means[i].push(mean as f64);
                p50s[i].push(p50 as f64);
                p99s[i].push(p99 as f64);
                if let Some(deltas) = spent {
                    let ns: u64 = deltas.iter().map(|(_, ns, _)| ns).sum();
                    prog_ns[i].push(ns as f64 / f64::from(CONNECTS_PER_ROUND));
                    for (name, ns, runs) in deltas {
                        let e = by_program[i].entry(name).or_default();
                        e.0 += ns;
                        e.1 += runs;
                    }
                }
            }
        }
    }
    let base = median(means[0].clone());
    let base_p50 = median(p50s[0].clone());
    say(&format!(
        "\nconnect()+close(), {ROUNDS} interleaved rounds x {CONNECTS_PER_ROUND}, {FILLER_SERVICES} services loaded in sockmesh and in iptables (median of round means)"
    ));
    say(&format!(
        "{:<26} {:>10} {:>10} {:>10} {:>11} {:>10} {:>11} {:>12}",
        "path",
        "mean µs",
        "p50 µs",
        "p99 µs",
        "mean ratio",
        "p50 ratio",
        "program ns",
        "direct+prog"
    ));
    let mut rows = Vec::new();
    for (i, (name, _, addr, _)) in paths.iter().enumerate() {
        let mean = median(means[i].clone());
        let p50 = median(p50s[i].clone());
        let p99 = median(p99s[i].clone());
        let ratio = mean / base;
        let ratio_p50 = p50 / base_p50;
        // Direct's connect()+close() plus this path's program time, over direct.
        let prog = (!prog_ns[i].is_empty()).then(|| median(prog_ns[i].clone()));
        let with_prog = prog.map(|ns| (base + ns) / base);
        say(&format!(
            "{name:<26} {:>10.2} {:>10.2} {:>10.2} {:>11.3} {:>10.3} {:>11} {:>12}",
            mean / 1e3,
            p50 / 1e3,
            p99 / 1e3,
            ratio,
            ratio_p50,
            prog.map_or_else(|| "-".to_owned(), |ns| format!("{ns:.0}")),
            with_prog.map_or_else(|| "-".to_owned(), |r| format!("{r:.4}")),
        ));
        rows.push(json!({
            "path": name, "address": addr, "mean_ns": mean, "p50_ns": p50,
            "p99_ns": p99, "mean_ratio_to_direct": ratio, "p50_ratio_to_direct": ratio_p50,
            "program_ns_per_connect": prog, "direct_plus_program_ratio": with_prog,
            "programs": by_program[i].iter().filter(|(_, (_, runs))| *runs > 0).map(|(name, (ns, runs))| {
                let connects = (CONNECTS_PER_ROUND as usize * ROUNDS) as f64;
                json!({"program": name, "runs_per_connect": *runs as f64 / connects,
                       "ns_per_run": *ns as f64 / (*runs).max(1) as f64})
            }).collect::<Vec<_>>(),
        }));
    }
    say(&format!("failed connects: {failures}"));
    // The datapath's own counters over the whole scenario (redirects, retries of a
    // raced slot, misses, reverse lookups).
    let counters: serde_json::Map<String, Value> = sockmesh::dataplane::read_counters(&bpffs.0)
        .map(|c| {
            c.into_iter()
                .map(|(k, v)| (k.to_owned(), json!(v)))
                .collect()
        })
        .unwrap_or_default();
    detail(&format!(
        "  kernel counters: {}",
        Value::Object(counters.clone())
    ));
    json!({
        "kernel_counters": counters,
        "rounds": ROUNDS, "connects_per_round": CONNECTS_PER_ROUND,
        "services_loaded": FILLER_SERVICES + 1, "failures": failures, "paths": rows,
    })
}

const PROP_SERVICES: u32 = 10_000;
const PROP_ENDPOINTS: u16 = 10;
const PROP_CHANGES: u32 = 1_000;
/// Services of the propagation scenario that are MAGLEV clusters (each with a
/// Maglev table), as issue 13 measures the update path.
const PROP_MAGLEV: u32 = 1_000;

/// Control plane writes a ClusterLoadAssignment → the kernel map holds it, with
/// 10,000 services × 10 endpoints loaded, over ADS delta, 1,000 changes.
/// Endpoint changes through the agent, from the control plane's publish to the
/// kernel map: on `svc-0` (weighted random), and, when `maglev` services
/// (`svc-1`..) are consistent-hash clusters with a Maglev table each, on `svc-1`
/// too.
/// What one propagation run loads and measures.
#[derive(Clone, Copy)]
struct Prop {
    services: u32,
    endpoints: u16,
    /// Endpoint changes of service 0 measured one at a time (and of service 1, a
    /// Maglev service, when `maglev` > 0).
    changes: u32,
    /// Services 1..=maglev get MAGLEV clusters.
    maglev: u32,
    /// Background churn while the changes are measured: one endpoint of another
    /// service changes this many times a second (0: none).
    churn_per_s: u32,
    /// Afterwards, batches of `THROUGHPUT_BATCH` changes, each published at once:
    /// publish → the last of them in the kernel.
    throughput: bool,
}

/// Changes per throughput batch, and batches (SMBENCH_BATCHES: more, to profile).
const THROUGHPUT_BATCH: u32 = sockmesh_tests::load::BATCH;
fn throughput_batches_n() -> u32 {
    env_or("SMBENCH_BATCHES", 10)
}

fn propagation(bin_dir: &Path, run: Prop) -> Value {
    let Prop {
        services,
        endpoints,
        changes,
        maglev,
        churn_per_s,
        throughput,
    } = run;
    use sockmesh_tests::{control_plane::ControlPlane, mesh, sockmesh_bin_in, unique};
    let Ok(rt) = tokio::runtime::Runtime::new() else {
        return json!({"error": "no tokio runtime"});
    };
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let cp = ControlPlane::new();
    let (addr, _stop) = rt.block_on(cp.serve("127.0.0.1:0".parse().expect("addr")));
    let built = std::time::Instant::now();
    let mut resources = mesh::services(services, endpoints);
    for (name, any) in &mut resources {
        let i: Option<u32> = name.strip_prefix("svc-").and_then(|i| i.parse().ok());
        if i.is_some_and(|i| (1..=maglev).contains(&i))
            && any.type_url == sockmesh_proto::type_url::CLUSTER
        {
            *any = mesh::maglev_cluster(name, None).1;
        }
    }
    cp.publish(&resources, true);
    detail(&format!(
        "\npropagation: {services} services x {endpoints} endpoints ({maglev} of them MAGLEV clusters) published by the in-process ADS server ({:.1} s to build)",
        built.elapsed().as_secs_f64()
    ));
    let log_path = std::env::temp_dir().join(unique("sockmesh-bench-agent-"));
    let Ok(log) = std::fs::File::create(&log_path) else {
        return json!({"error": "log file"});
    };
    let admin_dir = sockmesh_tests::agent::TempDir::new("sockmesh-bench-admin-");
    let admin = sockmesh_tests::agent::Admin::in_dir(&admin_dir.0);
    let started = std::time::Instant::now();
    let agent = agent_command(sockmesh_bin_in(bin_dir), &cgroup, &bpffs)
        .args([
            "--xds",
            &format!("grpc://{addr}"),
            "--xds-protocol",
            "delta",
        ])
        .args(capacity_flags(services, endpoints))
        .args(admin.args())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn();
    let Ok(agent) = agent else {
        return json!({"error": "agent did not start"});
    };
    let agent = Proc(agent);
    let reader = match wait_loaded(&bpffs, services, endpoints, started) {
        Ok(r) => r,
        Err(e) => return json!({ "error": e }),
    };
    let initial_load = started.elapsed();
    // The load as issue 30 counts it: the first response sent → all in the
    // kernel (the agent's start and its programs' verification apart).
    let from_first_response = cp
        .first_response_at()
        .map(|t| started + initial_load - t.max(started));
    let rss_kib = rss_kib(agent.0.id());
    // Issue 30's target reads the resident memory 2 s after the load, once the
    // write's buffers are freed and handed back.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let rss_2s_kib = load::rss_kib(agent.0.id());
    let (anon, file) = load::rss_parts_kib(agent.0.id());
    // What of the anonymous memory is live objects, and what the allocator keeps.
    let mib = |series: &str| admin.metric(series).map_or(f64::NAN, |b| b / 1048576.0);
    let heap = mib("sockmesh_heap_allocated_bytes");
    let heap_resident = mib("sockmesh_heap_resident_bytes");
    detail(&format!(
        "  initial load (agent start -> all {services} services in the kernel): {:.2} s, {:.2} s of it from the first response sent; agent RSS {} MiB, 2 s later {} MiB ({} MiB anonymous, {} MiB file; heap {heap:.0} MiB live, {heap_resident:.0} MiB resident)",
        initial_load.as_secs_f64(),
        from_first_response.map_or(f64::NAN, |d| d.as_secs_f64()),
        rss_kib / 1024,
        rss_2s_kib / 1024,
        anon / 1024,
        file / 1024
    ));
    // A 1 ns timer slack makes the 10 µs polling sleeps precise.
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects this thread only.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1);
    }
    let log_before = std::fs::read_to_string(&log_path)
        .map(|t| t.len())
        .unwrap_or(0);
    let poll = std::time::Duration::from_micros(env_or("SMBENCH_POLL_US", 50));
    // `changes` endpoint changes of service `n`: publish → the kernel holds it.
    let measure = |n: u32| -> Result<Vec<f64>, String> {
        let target = ServiceAddr {
            vip: mesh::service_vip(n),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let mut e2e = Vec::new();
        for i in 0..changes {
            let [_, _, hi, lo] = i.to_be_bytes();
            let ep = (IpAddr::from([10, 40, hi, lo]), 9000);
            let t0 = std::time::Instant::now();
            cp.publish(&[mesh::assignment(&format!("svc-{n}"), &[ep])], false);
            loop {
                if reader
                    .reachable(&target)
                    .ok()
                    .flatten()
                    .is_some_and(|b| b == [ep])
                {
                    break;
                }
                if t0.elapsed() > std::time::Duration::from_secs(10) {
                    return Err(format!(
                        "change {i} of svc-{n} not in the kernel after 10 s"
                    ));
                }
                // Poll without starving the agent and the control plane of the
                // machine's two cores (SMBENCH_POLL_US, default 50 µs; at 10 µs the
                // poller itself pushed p99 from ~0.45 ms to ~2.5 ms here).
                std::thread::sleep(poll);
            }
            e2e.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        Ok(e2e)
    };
    let churn = Churn::start(&cp, services, endpoints, churn_per_s);
    let measured = measure(0).and_then(|e2e| {
        let maglev = if maglev > 0 { measure(1)? } else { Vec::new() };
        Ok((e2e, maglev))
    });
    let churned = churn.map(Churn::stop);
    let (mut e2e, mut e2e_maglev) = match measured {
        Ok(v) => v,
        Err(e) => return json!({ "error": e }),
    };
    if let Some((published, secs)) = churned {
        detail(&format!(
            "  background churn: {published} endpoint changes of other services in {secs:.1} s ({:.0}/s)",
            published as f64 / secs.max(1e-9)
        ));
    }
    let batches = if throughput {
        match sockmesh_tests::load::batches(
            &cp,
            &reader,
            services,
            endpoints,
            throughput_batches_n(),
        ) {
            Ok(v) => Some(v),
            Err(e) => return json!({ "error": e }),
        }
    } else {
        None
    };
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut agent_side: Vec<f64> = log
        .get(log_before..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains("routing table applied"))
        .filter_map(|l| {
            l.split("latency_us=")
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .collect();
    drop(agent);
    // SMBENCH_KEEP_LOG=1 keeps the agent's log for a look at its timeline.
    if std::env::var("SMBENCH_KEEP_LOG").is_ok_and(|v| v == "1") {
        detail(&format!("  agent log kept: {}", log_path.display()));
    } else {
        let _ = std::fs::remove_file(&log_path);
    }
    e2e.sort_by(f64::total_cmp);
    e2e_maglev.sort_by(f64::total_cmp);
    agent_side.sort_by(f64::total_cmp);
    let row = |name: &str, v: &[f64]| {
        detail(&format!(
            "  {name:<44} p50 {:>8.1} µs  p99 {:>8.1} µs  max {:>8.1} µs  (n={})",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v.last().copied().unwrap_or(0.0),
            v.len()
        ));
        json!({"p50_us": percentile(v, 0.5), "p99_us": percentile(v, 0.99), "max_us": v.last().copied().unwrap_or(0.0), "n": v.len()})
    };
    let e2e_json = row("control plane publish -> kernel map holds it", &e2e);
    let maglev_json = (maglev > 0).then(|| {
        row(
            "the same, a Maglev service (16,381-entry table)",
            &e2e_maglev,
        )
    });
    let agent_json = row("agent: response received -> maps written", &agent_side);
    let throughput_json = batches.map(|mut b| {
        b.sort_by(f64::total_cmp);
        let p50 = percentile(&b, 0.5);
        detail(&format!(
            "  throughput: {} batches of {THROUGHPUT_BATCH} endpoint changes (one service each), publish -> the last in the kernel: p50 {:.1} ms, max {:.1} ms; {:.0} changes/s at the median",
            b.len(),
            p50 / 1e3,
            b.last().copied().unwrap_or(0.0) / 1e3,
            f64::from(THROUGHPUT_BATCH) / (p50 / 1e6).max(1e-9)
        ));
        json!({"batch": THROUGHPUT_BATCH, "batches": b.len(), "p50_us": p50, "max_us": b.last().copied().unwrap_or(0.0),
               "changes_per_s": f64::from(THROUGHPUT_BATCH) / (p50 / 1e6).max(1e-9)})
    });
    json!({
        "churn_per_s": churn_per_s, "throughput": throughput_json,
        "services": services, "endpoints_per_service": endpoints, "changes": changes,
        "maglev_services": maglev,
        "initial_load_s": initial_load.as_secs_f64(),
        "initial_load_from_first_response_s": from_first_response.map(|d| d.as_secs_f64()),
        "agent_rss_kib": rss_kib,
        "agent_rss_2s_kib": rss_2s_kib,
        "heap_allocated_mib": heap, "heap_resident_mib": heap_resident,
        "publish_to_map": e2e_json, "publish_to_map_maglev": maglev_json,
        "agent_receive_to_map": agent_json,
    })
}

/// Quick self-check of the kube-proxy layouts (`smbench x kubeproxy-check`).
fn kubeproxy_check() -> Value {
    use sockmesh_tests::kubeproxy::*;
    let ns = NetNs::new();
    let mut out = serde_json::Map::new();
    for (tool, load, change) in [
        (
            "iptables",
            iptables_ruleset(1000, 10),
            iptables_change(5, 10, 0, 1, "10.40.0.1:9000"),
        ),
        (
            "nft",
            nft_ruleset(1000, 10),
            nft_change(5, 10, 0, 1, "10.40.0.1:9000"),
        ),
    ] {
        let (prog, args): (&str, &[&str]) = if tool == "iptables" {
            ("iptables-legacy-restore", &[])
        } else {
            ("nft", &["-f", "-"])
        };
        let l = run_in(&ns, prog, args, &load);
        let (prog, args): (&str, &[&str]) = if tool == "iptables" {
            ("iptables-legacy-restore", &["--noflush"])
        } else {
            ("nft", &["-f", "-"])
        };
        let c = run_in(&ns, prog, args, &change);
        detail(&format!("{tool}: load {l:?} change {c:?}"));
        out.insert(tool.into(), json!(format!("{l:?} {c:?}")));
    }
    Value::Object(out)
}

/// One datapath change (one service moves to a new endpoint) as the table grows:
/// sockmesh (control plane publish → kernel map), kube-proxy's iptables layout
/// (`iptables-restore --noflush`) and its nftables layout (one `nft -f`
/// transaction), each with N services × 10 endpoints loaded. A tool is skipped at
/// the next size once loading took over `LOAD_BUDGET`.
fn scale(bin_dir: &Path) -> Value {
    use sockmesh_tests::kubeproxy::{
        iptables_change, iptables_ruleset, nft_change, nft_ruleset, run_in,
    };
    const SIZES: [u32; 5] = [1_000, 5_000, 10_000, 20_000, 50_000];
    const PER: u16 = 10;
    const LOAD_BUDGET: std::time::Duration = std::time::Duration::from_secs(90);
    let mut rows = Vec::new();
    // SMBENCH_SKIP_KUBEPROXY=1 measures sockmesh alone (the kube-proxy side takes
    // most of this scenario's 15 minutes and does not depend on sockmesh).
    let skip = std::env::var("SMBENCH_SKIP_KUBEPROXY").is_ok_and(|v| v == "1");
    let mut skip_iptables = skip;
    let mut skip_nft = skip;
    say(
        "\nscale: one change (a service moves to a new endpoint) vs table size, 10 endpoints per service",
    );
    say(&format!(
        "{:>8} {:>14} {:>14} {:>14} {:>14} {:>12} {:>12}",
        "services",
        "sockmesh p50",
        "sockmesh p99",
        "iptables p50",
        "nftables p50",
        "ipt load s",
        "nft load s"
    ));
    for n in SIZES {
        let sm = propagation_quiet(bin_dir, n, PER, 200);
        let kp = |tool: &str, skip: &mut bool| -> (Option<f64>, Option<f64>) {
            if *skip {
                return (None, None);
            }
            let ns = NetNs::new();
            let (prog, load_args, change_args, load): (&str, &[&str], &[&str], String) =
                if tool == "iptables" {
                    (
                        "iptables-legacy-restore",
                        &[],
                        &["--noflush"],
                        iptables_ruleset(n, PER),
                    )
                } else {
                    ("nft", &["-f", "-"], &["-f", "-"], nft_ruleset(n, PER))
                };
            let loaded = match run_in(&ns, prog, load_args, &load) {
                Ok(t) => t,
                Err(e) => {
                    say(&format!("  {tool} load failed: {e}"));
                    *skip = true;
                    return (None, None);
                }
            };
            if loaded > LOAD_BUDGET {
                *skip = true;
            }
            let mut times = Vec::new();
            let started = std::time::Instant::now();
            for g in 1..=20u32 {
                let svc = n / 2;
                let old = if g == 1 { 0 } else { g - 1 };
                let per_old = if g == 1 { PER } else { 1 };
                let ep = format!("10.40.{}.{}:9000", g / 256, g % 256);
                let change = if tool == "iptables" {
                    iptables_change(svc, per_old, old, g, &ep)
                } else {
                    nft_change(svc, per_old, old, g, &ep)
                };
                match run_in(&ns, prog, change_args, &change) {
                    Ok(t) => times.push(t.as_secs_f64() * 1e6),
                    Err(e) => {
                        say(&format!("  {tool} change failed: {e}"));
                        break;
                    }
                }
                // At most ~60 s of changes per size.
                if started.elapsed() > std::time::Duration::from_secs(60) && times.len() >= 3 {
                    break;
                }
            }
            times.sort_by(f64::total_cmp);
            (Some(percentile(&times, 0.5)), Some(loaded.as_secs_f64()))
        };
        let (ipt, ipt_load) = kp("iptables", &mut skip_iptables);
        let (nft, nft_load) = kp("nft", &mut skip_nft);
        let sm_p50 = sm["publish_to_map"]["p50_us"].as_f64();
        let sm_p99 = sm["publish_to_map"]["p99_us"].as_f64();
        let us = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0} µs"));
        let secs = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        say(&format!(
            "{n:>8} {:>14} {:>14} {:>14} {:>14} {:>12} {:>12}",
            us(sm_p50),
            us(sm_p99),
            us(ipt),
            us(nft),
            secs(ipt_load),
            secs(nft_load)
        ));
        rows.push(json!({
            "services": n, "endpoints_per_service": PER,
            "sockmesh_p50_us": sm_p50, "sockmesh_p99_us": sm_p99,
            "sockmesh_agent_p50_us": sm["agent_receive_to_map"]["p50_us"].as_f64(),
            "sockmesh_initial_load_s": sm["initial_load_s"].as_f64(),
            "sockmesh_agent_rss_kib": sm["agent_rss_kib"].as_u64(),
            "iptables_p50_us": ipt, "iptables_load_s": ipt_load,
            "nftables_p50_us": nft, "nftables_load_s": nft_load,
            "iptables_over_sockmesh": ipt.zip(sm_p50).map(|(a, b)| a / b),
            "nftables_over_sockmesh": nft.zip(sm_p50).map(|(a, b)| a / b),
        }));
    }
    Value::Array(rows)
}

/// A background of endpoint changes: a thread changes one endpoint of service
/// 2, 3, … (never 0 or 1, the measured ones) `per_s` times a second, open loop.
struct Churn {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, f64)>,
}

impl Churn {
    fn start(
        cp: &sockmesh_tests::control_plane::ControlPlane,
        services: u32,
        endpoints: u16,
        per_s: u32,
    ) -> Option<Self> {
        if per_s == 0 || services < 3 {
            return None;
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cp, flag) = (cp.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let period = std::time::Duration::from_secs(1) / per_s;
            let start = std::time::Instant::now();
            let mut n: u64 = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(wait) =
                    (start + period * n as u32).checked_duration_since(std::time::Instant::now())
                {
                    std::thread::sleep(wait);
                }
                let others = u64::from(services - 2);
                let i = 2 + (n % others) as u32;
                let turn = (n / others) as u16 + 1;
                let eps = endpoints_of(i, endpoints, turn);
                cp.publish(
                    &[sockmesh_tests::mesh::assignment(&format!("svc-{i}"), &eps)],
                    false,
                );
                n += 1;
            }
            (n, start.elapsed().as_secs_f64())
        });
        Some(Self { stop, thread })
    }

    /// Stops the thread: (changes published, seconds).
    fn stop(self) -> (u64, f64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or((0, 0.0))
    }
}

/// The update pipeline at 10k, 50k and 100k services × 10 endpoints (capacities
/// raised past the defaults at 100k): initial load, agent RSS, one endpoint
/// change's publish → kernel latency under a background churn of 1,000 endpoint
/// changes/s, and batch throughput.
fn pipeline(bin_dir: &Path) -> Value {
    say("\npipeline: the update path at 10k / 50k / 100k services x 10 endpoints, churn 1,000/s");
    // SMBENCH_PIPELINE_SIZES=10000,100000 runs some sizes only.
    let sizes: Vec<u32> = std::env::var("SMBENCH_PIPELINE_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<u32>| !v.is_empty())
        .unwrap_or_else(|| vec![10_000, 50_000, 100_000]);
    let rows: Vec<Value> = sizes
        .into_iter()
        .map(|services| {
            propagation(
                bin_dir,
                Prop {
                    services,
                    endpoints: 10,
                    changes: 1_000,
                    maglev: 0,
                    churn_per_s: 1_000,
                    throughput: true,
                },
            )
        })
        .collect();
    json!(rows)
}

/// Sizes of the file-source scenario (services × [`PROP_ENDPOINTS`]), and the
/// edits measured at each.
const FILE_SIZES: [u32; 2] = [10_000, 50_000];
const FILE_EDITS: u8 = 5;

/// `sockmesh agent --xds file://…` on one proto3-JSON `DiscoveryResponse` holding
/// every Listener, Cluster and ClusterLoadAssignment of N services: agent start →
/// all in the kernel, then [`FILE_EDITS`] edits of one service's endpoints (the
/// whole file rewritten and renamed over the old, as an editor or a ConfigMap does)
/// → the kernel holds the new endpoint; RSS after each phase. SMBENCH_SERVICES
/// picks one size.
fn file_source(bin_dir: &Path) -> Value {
    let sizes: Vec<u32> = match std::env::var("SMBENCH_SERVICES") {
        Ok(_) => vec![env_or("SMBENCH_SERVICES", FILE_SIZES[0])],
        Err(_) => FILE_SIZES.to_vec(),
    };
    say(&format!(
        "\nfile source: {sizes:?} services x {PROP_ENDPOINTS} endpoints in one JSON file"
    ));
    json!(
        sizes
            .into_iter()
            .map(|n| file_source_run(bin_dir, n, PROP_ENDPOINTS)
                .unwrap_or_else(|e| json!({"services": n, "error": e})))
            .collect::<Vec<_>>()
    )
}

/// The agent's log: appended to the file SMBENCH_AGENT_LOG names (to see where an
/// agent's time went), else discarded.
fn agent_log() -> std::process::Stdio {
    std::env::var_os("SMBENCH_AGENT_LOG")
        .and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        })
        .map_or_else(std::process::Stdio::null, std::process::Stdio::from)
}

fn file_source_run(bin_dir: &Path, services: u32, endpoints: u16) -> Result<Value, String> {
    use sockmesh::xds::decode::discovery_response_to_json;
    use sockmesh_proto::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use sockmesh_tests::{TempDir, mesh, sockmesh_bin_in};
    let mut resources = mesh::services(services, endpoints);
    let text = |version: String,
                resources: &[(String, sockmesh_proto::pb::google::protobuf::Any)]| {
        let resp = DiscoveryResponse {
            version_info: version,
            resources: resources.iter().map(|(_, any)| any.clone()).collect(),
            ..Default::default()
        };
        discovery_response_to_json(&resp).map_err(|e| e.to_string())
    };
    let dir = TempDir::new("sockmesh-bench-file-");
    let file = dir.0.join("mesh.json");
    let first = text("1".into(), &resources)?;
    let file_bytes = first.len();
    std::fs::write(&file, first).map_err(|e| format!("{}: {e}", file.display()))?;
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let started = std::time::Instant::now();
    let agent = agent_command(sockmesh_bin_in(bin_dir), &cgroup, &bpffs)
        .arg("--xds")
        .arg(format!("file://{}", file.display()))
        .args(capacity_flags(services, endpoints))
        .stdout(std::process::Stdio::null())
        .stderr(agent_log())
        .spawn()
        .map_err(|e| format!("agent: {e}"))?;
    let agent = Proc(agent);
    let reader = wait_loaded(&bpffs, services, endpoints, started)?;
    let load = started.elapsed();
    let rss_load = rss_kib(agent.0.id());
    detail(&format!(
        "  {services} services ({:.0} MB of JSON): agent start -> all in the kernel {:.2} s; RSS {} MiB",
        file_bytes as f64 / 1e6,
        load.as_secs_f64(),
        rss_load / 1024
    ));
    // svc-0's ClusterLoadAssignment is the third resource (listener, cluster,
    // assignment per service).
    let svc0 = ServiceAddr {
        vip: mesh::service_vip(0),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let mut edits = Vec::new();
    for e in 0..FILE_EDITS {
        let ep = (IpAddr::from([10, 40, 0, e + 1]), 9000);
        resources[2] = mesh::assignment("svc-0", &[ep]);
        let edited = text(format!("{}", u32::from(e) + 2), &resources)?;
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, edited).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let t0 = std::time::Instant::now();
        std::fs::rename(&tmp, &file).map_err(|e| format!("{}: {e}", file.display()))?;
        while !reader
            .reachable(&svc0)
            .ok()
            .flatten()
            .is_some_and(|b| b == [ep])
        {
            if t0.elapsed() > std::time::Duration::from_secs(60) {
                return Err(format!("edit {e} not in the kernel after 60 s"));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        edits.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let rss_edits = rss_kib(agent.0.id());
    edits.sort_by(f64::total_cmp);
    let median = percentile(&edits, 0.5);
    detail(&format!(
        "  one edited service -> kernel: median {median:.0} ms, max {:.0} ms (n={}); RSS after the edits {} MiB",
        edits.last().copied().unwrap_or(0.0),
        edits.len(),
        rss_edits / 1024
    ));
    Ok(json!({
        "services": services, "endpoints_per_service": endpoints, "file_bytes": file_bytes,
        "load_s": load.as_secs_f64(), "rss_kib_after_load": rss_load,
        "edit_ms": {"median": median, "max": edits.last().copied().unwrap_or(0.0), "n": edits.len()},
        "rss_kib_after_edits": rss_edits,
    }))
}

fn propagation_quiet(bin_dir: &Path, services: u32, endpoints: u16, changes: u32) -> Value {
    QUIET.store(true, std::sync::atomic::Ordering::Relaxed);
    let v = propagation(
        bin_dir,
        Prop {
            services,
            endpoints,
            changes,
            maglev: 0,
            churn_per_s: 0,
            throughput: false,
        },
    );
    QUIET.store(false, std::sync::atomic::Ordering::Relaxed);
    v
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// HTTP requests per second (`wrk`, `Connection: close`, so one connection per
/// request) against nginx: directly, through the sockmesh VIP, and through the
/// kube-proxy iptables VIP (10,000 services loaded in each), interleaved rounds.
fn http_rps() -> Value {
    let client = NetNs::new();
    let backend = NetNs::new();
    veth(&client, "10.10.1.1/24", &backend, "10.10.1.11/24");
    let dir = std::env::temp_dir().join(sockmesh_tests::unique("sockmesh-bench-nginx-"));
    let _ = std::fs::create_dir_all(&dir);
    let _nginx = sockmesh_tests::nginx(
        &backend,
        &dir,
        &[(IpAddr::from([10, 10, 1, 11]), 8080, "b1".into())],
    );
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let mut dp = install(&cgroup, &bpffs);
    let target = Backend::new(IpAddr::from([10, 10, 1, 11]), 8080);
    let mut table = filler_table(target);
    table.insert(
        ServiceAddr {
            vip: IpAddr::from([10, 96, 0, 1]),
            port: 8080,
            protocol: Protocol::Tcp,
        },
        vec![target],
    );
    if let Err(e) = dp.apply(&table) {
        return json!({"error": e.to_string()});
    }
    let rules = sockmesh_tests::kubeproxy::iptables_ruleset_with(
        FILLER_SERVICES,
        10,
        Some(("10.96.0.2", "10.10.1.11")),
    );
    // kube-proxy's rules live in their own client namespace: loaded into the
    // sockmesh client's, every new connection there (direct ones too) would walk
    // the nat OUTPUT chain.
    let ipt_client = match sockmesh_tests::iptables_client(&backend, &rules) {
        Ok(ns) => ns,
        Err(e) => return json!({"error": e}),
    };
    // Every request is a new connection: without this, tens of thousands of
    // TIME_WAIT entries per run on nginx's side collide with reused client ports
    // (SYNs answered by challenge ACKs, 1 s retransmissions) and the numbers measure
    // that, not the datapath. Namespace-local settings, on our namespaces only.
    for ns in [&client, &ipt_client, &backend] {
        sysctl_in(ns, "net.ipv4.tcp_max_tw_buckets", "0");
        sysctl_in(ns, "net.ipv4.ip_local_port_range", "1024 65535");
    }
    let paths: [(&str, bool, &str); 3] = [
        ("direct", false, "http://10.10.1.11:8080/"),
        ("VIP, sockmesh", true, "http://10.96.0.1:8080/"),
        ("VIP, iptables DNAT", false, "http://10.96.0.2:8080/"),
    ];
    const ROUNDS_HTTP: usize = 3;
    let mut rps = vec![Vec::new(); paths.len()];
    let mut errors = vec![0u64; paths.len()];
    for round in 0..ROUNDS_HTTP {
        for k in 0..paths.len() {
            let i = (round + k) % paths.len();
            let (_, inside, url) = paths[i];
            let ns = if i == 2 { &ipt_client } else { &client };
            let mut cmd = command_in(ns, inside.then_some(&cgroup), "wrk");
            cmd.args(["-t2", "-c32", "-d5s", "-H", "Connection: close", url]);
            let out = match cmd.output() {
                Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
                Err(e) => return json!({"error": format!("wrk: {e}")}),
            };
            let value = |key: &str| {
                out.lines()
                    .find(|l| l.trim_start().starts_with(key))
                    .and_then(|l| l.split(':').nth(1))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<f64>().ok())
            };
            rps[i].push(value("Requests/sec").unwrap_or(0.0));
            // "Socket errors: connect 0, read 0, write 0, timeout 0" and non-2xx lines.
            for line in out
                .lines()
                .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
            {
                errors[i] += line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum::<u64>();
            }
        }
    }
    let base = median(rps[0].clone());
    say(
        "\nHTTP (wrk -t2 -c32 -d5s, Connection: close, nginx backend; median of 3 interleaved rounds)",
    );
    say(&format!(
        "{:<22} {:>12} {:>8} {:>8}",
        "path", "requests/s", "ratio", "errors"
    ));
    let mut rows = Vec::new();
    for (i, (name, _, url)) in paths.iter().enumerate() {
        let m = median(rps[i].clone());
        say(&format!(
            "{name:<22} {m:>12.0} {:>8.3} {:>8}",
            m / base,
            errors[i]
        ));
        rows.push(json!({"path": name, "url": url, "requests_per_s": m, "ratio_to_direct": m / base, "errors": errors[i], "rounds": rps[i]}));
    }
    let _ = std::fs::remove_dir_all(&dir);
    json!({"services_loaded": FILLER_SERVICES + 1, "paths": rows})
}

/// Churn with a real HTTP client and nginx pods: 1,000 requests/s, a new connection
/// each, while the control plane does 100 rolling-update steps and 100 scale steps.
/// New connections per second of the least-connections scenario, for how long,
/// and how long the fast backends hold each connection (the slow one 10×).
const LC_RATE: u32 = 300;
const LC_MILLIS: u32 = 8_000;
const LC_HOLD_MS: u32 = 20;

/// Least connections under long-lived connections: 3 backends, one of which holds
/// its connections 10× longer, the same open-loop load under weighted random and
/// under least connections (`choice_count` 2, Envoy's default, and 3), with
/// distinct candidates and with Envoy's draw, one after the other on one
/// datapath. Reports each backend's share of new connections and its
/// peak of open connections, and the peak spread (most / fewest).
fn least_conn_bench(probe: &Path) -> Value {
    use sockmesh::model::{LbPolicy, Service};
    let client = NetNs::new();
    let backend = NetNs::new();
    let pods = sockmesh_tests::pod_network(&client, &backend, 3);
    let hold = |i: usize| if i == 0 { LC_HOLD_MS * 10 } else { LC_HOLD_MS };
    let _server = sockmesh_tests::serve(
        &backend,
        probe,
        pods.iter()
            .enumerate()
            .map(|(i, ip)| format!("{ip}:8080=b{}@{}", i + 1, hold(i))),
    );
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let mut dp = install(&cgroup, &bpffs);
    let vip = ServiceAddr {
        vip: IpAddr::from([10, 96, 0, 50]),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let mut rows = serde_json::Map::new();
    say(&format!(
        "least_conn: {LC_RATE} new connections/s for {LC_MILLIS} ms; b1 holds each {} ms, b2 and b3 {LC_HOLD_MS} ms",
        LC_HOLD_MS * 10
    ));
    say(
        "| policy | b1 (slow) share / peak open | b2 share / peak | b3 share / peak | peak spread (most ÷ fewest) | most ÷ even | failed |",
    );
    say("|---|---|---|---|---|---|---|");
    let two = LbPolicy::LeastConn {
        choices: LbPolicy::DEFAULT_CHOICES,
    };
    let three = LbPolicy::LeastConn { choices: 3 };
    // Distinct candidates (the default) beside Envoy's draw, with replacement
    // (`--least-request-draws envoy`), in the same run.
    for (label, policy, envoy_draws) in [
        ("random", LbPolicy::Random, false),
        ("least_conn", two, false),
        ("least_conn_envoy_draws", two, true),
        ("least_conn_3", three, false),
        ("least_conn_3_envoy_draws", three, true),
    ] {
        dp.set_envoy_draws(envoy_draws);
        let mut t = RoutingTable::default();
        t.insert(
            vip,
            Service::new(
                pods.iter().map(|ip| Backend::new(*ip, 8080)).collect(),
                policy,
            ),
        );
        if let Err(e) = dp.apply(&t) {
            return json!({"error": e.to_string()});
        }
        let mut cmd = command_in(&client, Some(&cgroup), probe);
        cmd.args([
            "load",
            "10.96.0.50:80",
            &LC_RATE.to_string(),
            &LC_MILLIS.to_string(),
        ]);
        let out = run(cmd);
        let mut backends = serde_json::Map::new();
        let mut failed = 0u64;
        let (mut total, mut peaks) = (0u64, Vec::new());
        for line in out.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["failed", n] => failed = n.parse().unwrap_or(0),
                [name, opened, peak] => {
                    let (opened, peak): (u64, u64) =
                        (opened.parse().unwrap_or(0), peak.parse().unwrap_or(0));
                    total += opened;
                    peaks.push(peak);
                    backends.insert(
                        (*name).to_owned(),
                        json!({"new": opened, "peak_open": peak}),
                    );
                }
                _ => {}
            }
        }
        let spread = match (peaks.iter().max(), peaks.iter().min()) {
            (Some(&most), Some(&fewest)) if fewest > 0 => most as f64 / fewest as f64,
            _ => f64::INFINITY,
        };
        // The busiest backend's peak against an even split of all the peaks.
        let even = peaks.iter().sum::<u64>() as f64 / peaks.len().max(1) as f64;
        let of_even = peaks
            .iter()
            .max()
            .map_or(0.0, |&m| m as f64 / even.max(1.0));
        let cell = |name: &str| {
            let b = &backends[name];
            let new = b["new"].as_u64().unwrap_or(0);
            format!(
                "{:.0} % / {}",
                100.0 * new as f64 / total.max(1) as f64,
                b["peak_open"]
            )
        };
        if backends.len() == 3 {
            say(&format!(
                "| {label} | {} | {} | {} | ×{spread:.1} | ×{of_even:.2} | {failed} |",
                cell("b1"),
                cell("b2"),
                cell("b3")
            ));
        } else {
            say(&format!(
                "| {label} | backends reached: {backends:?} | | | | | {failed} |"
            ));
        }
        rows.insert(
            label.to_owned(),
            json!({"backends": backends, "peak_spread": spread, "peak_of_even": of_even, "failed": failed, "total": total}),
        );
    }
    json!({
        "rate_per_s": LC_RATE,
        "millis": LC_MILLIS,
        "hold_ms": {"b1": LC_HOLD_MS * 10, "b2": LC_HOLD_MS, "b3": LC_HOLD_MS},
        "policies": rows,
    })
}

/// A whole zone dies with no EDS change (`sockmesh_tests::zone_death`: priority 0
/// b1, b2 and priority 1 b3, b4; 100 new connections/s; `consecutive_5xx: 3`,
/// 3 s ejections; zone a's servers killed at 1 s and back at 2.5 s): the failed
/// connects, how long until the last of them and until zone b served, and how
/// long after the ejections' end zone a served again.
/// The churn soak of `tests/tests/soak.rs` at node scale: 200,000 services with
/// outlier detection and a circuit breaker in ten waves of 20,000 through maps
/// that hold 32,768 (`SMBENCH_SOAK_WAVES`, `SMBENCH_SOAK_PER_WAVE`).
fn soak_bench(bin_dir: &Path, probe: &Path) -> Value {
    let size = sockmesh_tests::soak::Soak {
        waves: env_or("SMBENCH_SOAK_WAVES", 10),
        per_wave: env_or("SMBENCH_SOAK_PER_WAVE", 20_000),
        max_services: 32_768,
    };
    let started = std::time::Instant::now();
    let out = sockmesh_tests::soak::run(&bin_dir.join("sockmesh"), probe, size);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let rss: Vec<f64> = out.waves.iter().map(|w| mib(w.rss_kib)).collect();
    let heap: Vec<f64> = out
        .waves
        .iter()
        .map(|w| w.heap_allocated / 1024.0 / 1024.0)
        .collect();
    let applied: Vec<f64> = out
        .waves
        .iter()
        .map(|w| w.applied.as_secs_f64() * 1e3)
        .collect();
    let reached: u64 = out.waves.iter().map(|w| w.reached).sum();
    let failed: u64 = out.waves.iter().map(|w| w.failed).sum();
    say(&format!(
        "soak: {} services in {} waves of {} through {} slots in {:.0} s: {reached} connects reached, {failed} failed; leak audit clean after every wave; RSS per wave (MiB) {}; heap allocated per wave (MiB) {}; publish → kernel per wave (ms) {}; after: breaker refused {} of 3, dead endpoint ejected after {} refusals",
        size.waves * size.per_wave,
        size.waves,
        size.per_wave,
        size.max_services,
        started.elapsed().as_secs_f64(),
        rss.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" "),
        heap.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" "),
        applied
            .iter()
            .map(|a| format!("{a:.0}"))
            .collect::<Vec<_>>()
            .join(" "),
        out.breaker_refused,
        out.refused_before_ejection,
    ));
    json!({
        "services": size.waves * size.per_wave,
        "waves": size.waves,
        "per_wave": size.per_wave,
        "max_services": size.max_services,
        "reached": reached,
        "failed": failed,
        "rss_mib": rss,
        "heap_allocated_mib": heap,
        "applied_ms": applied,
        "breaker_refused": out.breaker_refused,
        "refused_before_ejection": out.refused_before_ejection,
    })
}

fn zone_death_bench(bin_dir: &Path, probe: &Path) -> Value {
    let z = sockmesh_tests::zone_death::run(&bin_dir.join("sockmesh"), probe);
    let ms = |ns: u64| ns as f64 / 1e6;
    let failures = z.failures();
    let Some(&last) = failures.last() else {
        say("zone_death: no connect failed after the death (the scenario did not run as planned)");
        return json!({"error": "no failure", "connects": z.connects.len()});
    };
    let in_flight = failures.get(5).map_or(0, |&sixth| z.in_flight(sixth));
    // Zone b's first connect after the death that started after a failure.
    let first_b = z
        .connects
        .iter()
        .filter(|(t0, _, w)| *t0 > failures[0] && (w == "b3" || w == "b4"))
        .map(|(t0, _, _)| *t0)
        .min();
    // The first pod's ejection ends 3 s after its third failure (the third
    // failure of all is at the latest that one).
    let ejection_end = failures.get(2).map(|t| t + 3_000_000_000);
    let back = ejection_end.and_then(|e| z.zone_a_back_after(e).map(|t| t.saturating_sub(e)));
    let after_last: Vec<&str> = z.outcomes(last, u64::MAX);
    let failed_after = after_last
        .iter()
        .filter(|w| sockmesh_tests::zone_death::failed(w))
        .count();
    say(&format!(
        "zone death: {} connects; {} failed after the death (bound 2 × 3 + {in_flight} in flight), the last {:.0} ms after it; zone b served from {}; zone a back {} after its first ejection ended; {failed_after} failed after the last failure",
        z.connects.len(),
        failures.len(),
        ms(last.saturating_sub(z.death)),
        first_b.map_or_else(
            || "never".to_owned(),
            |t| format!("{:.0} ms after the death", ms(t.saturating_sub(z.death)))
        ),
        back.map_or_else(|| "never".to_owned(), |t| format!("{:.0} ms", ms(t))),
    ));
    json!({
        "connects": z.connects.len(),
        "failed_after_death": failures.len(),
        "in_flight_at_sixth": in_flight,
        "last_failure_ms_after_death": ms(last.saturating_sub(z.death)),
        "zone_b_first_ms_after_death": first_b.map(|t| ms(t.saturating_sub(z.death))),
        "zone_a_back_ms_after_ejection_end": back.map(ms),
        "failed_after_last_failure": failed_after,
    })
}

/// Client pods and backends of the Maglev scenario, and connections per client.
const MG_CLIENTS: u8 = 100;
const MG_BACKENDS: u8 = 10;
const MG_PER: u32 = 50;

/// Consistent hashing: 100 client pods (a network namespace each, unbound
/// sockets, so the client is its namespace) make 50 connections each to a service
/// of 10 backends; then one backend is removed, then added back. Under Maglev and,
/// for contrast, weighted random: the share of clients whose connections all
/// reached one backend (affinity), and the share whose backend changed at each
/// step (for random, the backend of a client's first connection).
fn maglev_bench(probe: &Path) -> Value {
    use sockmesh::model::{LbPolicy, Service};
    let mut lab = sockmesh_tests::PodLab::new(probe, MG_BACKENDS, usize::from(MG_BACKENDS));
    let clients: Vec<NetNs> = (0..MG_CLIENTS)
        .map(|i| sockmesh_tests::client_pod(&lab.backend, i))
        .collect();
    let vip = ServiceAddr {
        vip: IpAddr::from([10, 96, 0, 60]),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let table = |pods: &[u8], policy: LbPolicy| {
        let mut t = RoutingTable::default();
        t.insert(
            vip,
            Service::new(
                pods.iter()
                    .map(|&i| Backend::new(IpAddr::from([10, 10, 1, 10 + i]), 8080))
                    .collect(),
                policy,
            ),
        );
        t
    };
    // Per client, the backends its connections reached.
    let round = |lab: &sockmesh_tests::PodLab| -> Vec<Vec<String>> {
        clients
            .iter()
            .map(|ns| {
                let mut cmd = command_in(ns, Some(&lab.cgroup), probe);
                cmd.args(["clients", "10.96.0.60:80", &MG_PER.to_string(), "-"]);
                run(cmd)
                    .split_whitespace()
                    .skip(1)
                    .map(str::to_owned)
                    .collect()
            })
            .collect()
    };
    let all: Vec<u8> = (1..=MG_BACKENDS).collect();
    let less: Vec<u8> = all.iter().copied().filter(|&i| i != 5).collect();
    say(&format!(
        "\nmaglev: {MG_CLIENTS} client pods x {MG_PER} connections, {MG_BACKENDS} backends; remove b5, add it back"
    ));
    say(
        "| policy | clients on one backend | moved when b5 left (b5 held) | moved when b5 came back | failed |",
    );
    say("|---|---|---|---|---|");
    let mut rows = serde_json::Map::new();
    let maglev = LbPolicy::Maglev {
        table_size: sockmesh_common::DEFAULT_MAGLEV_TABLE_SIZE,
    };
    for (label, policy) in [("maglev", maglev), ("random", LbPolicy::Random)] {
        let mut rounds = Vec::new();
        for pods in [&all, &less, &all] {
            if let Err(e) = lab.dp().apply(&table(pods, policy)) {
                return json!({"error": e.to_string()});
            }
            rounds.push(round(&lab));
        }
        let failed: usize = rounds
            .iter()
            .flatten()
            .flatten()
            .filter(|b| !b.starts_with('b'))
            .count();
        let sticky = rounds[0]
            .iter()
            .filter(|r| !r.is_empty() && r.iter().all(|b| b == &r[0]))
            .count();
        let first = |r: &Vec<Vec<String>>| -> Vec<Option<String>> {
            r.iter().map(|c| c.first().cloned()).collect()
        };
        let (a, b, c) = (first(&rounds[0]), first(&rounds[1]), first(&rounds[2]));
        let moved = |x: &[Option<String>], y: &[Option<String>]| {
            x.iter().zip(y).filter(|(p, q)| p != q).count()
        };
        let held_b5 = a.iter().filter(|x| x.as_deref() == Some("b5")).count();
        let pct = |n: usize| 100.0 * n as f64 / f64::from(MG_CLIENTS);
        let (left, back) = (moved(&a, &b), moved(&b, &c));
        say(&format!(
            "| {label} | {:.0} % | {:.0} % ({:.0} %) | {:.0} % | {failed} |",
            pct(sticky),
            pct(left),
            pct(held_b5),
            pct(back)
        ));
        rows.insert(
            label.to_owned(),
            json!({
                "clients_on_one_backend_pct": pct(sticky),
                "moved_on_removal_pct": pct(left),
                "held_by_removed_pct": pct(held_b5),
                "moved_on_return_pct": pct(back),
                "failed": failed,
            }),
        );
    }
    say(&format!(
        "(bound: at most 1/N + 2 % = {:.0} % of clients move)",
        100.0 / f64::from(MG_BACKENDS) + 2.0
    ));
    json!({
        "clients": MG_CLIENTS, "backends": MG_BACKENDS, "connections_per_client": MG_PER,
        "policies": rows,
    })
}

fn churn_bench(bin_dir: &Path) -> Value {
    use sockmesh_tests::{churn, control_plane::ControlPlane, sockmesh_bin_in};
    let Ok(rt) = tokio::runtime::Runtime::new() else {
        return json!({"error": "no tokio runtime"});
    };
    let client = NetNs::new();
    let backend = NetNs::new();
    veth(&client, "10.10.1.1/24", &backend, "10.10.1.11/24");
    let pods: Vec<(String, IpAddr)> = (1..=8u8)
        .map(|i| (format!("p{i}"), IpAddr::from([10, 10, 1, 10 + i])))
        .collect();
    for (_, ip) in pods.iter().skip(1) {
        sockmesh_tests::add_addr(&backend, "sm1", &format!("{ip}/24"));
    }
    let dir = std::env::temp_dir().join(sockmesh_tests::unique("sockmesh-bench-churn-"));
    let _ = std::fs::create_dir_all(&dir);
    let servers: Vec<(IpAddr, u16, String)> =
        pods.iter().map(|(n, ip)| (*ip, 8080, n.clone())).collect();
    let _nginx = sockmesh_tests::nginx(&backend, &dir, &servers);
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let cp = ControlPlane::new();
    let (addr, _stop) = rt.block_on(cp.serve("127.0.0.1:0".parse().expect("addr")));
    cp.publish(&churn::resources(), true);
    let agent = agent_command(sockmesh_bin_in(bin_dir), &cgroup, &bpffs)
        .args(["--xds", &format!("grpc://{addr}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(agent) = agent else {
        return json!({"error": "agent did not start"});
    };
    let _agent = Proc(agent);
    let started = std::time::Instant::now();
    while sockmesh::dataplane::open_pinned(&bpffs.0).is_err() {
        if started.elapsed() > std::time::Duration::from_secs(10) {
            return json!({"error": "agent never installed"});
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let probe = bin_dir.join("smprobe");
    let result = churn::run(&churn::Churn {
        client: &client,
        cgroup: &cgroup,
        probe: &probe,
        bpffs: &bpffs.0,
        cp: &cp,
        pods,
        port: 8080,
        rps: 1000,
        rolling_steps: 100,
        scale_steps: 100,
        step_every: std::time::Duration::from_millis(100),
        http: true,
        audit_steps: false,
    });
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(r) => {
            let rate = r.requests as f64 / r.duration.as_secs_f64();
            say(&format!(
                "\nchurn (HTTP via nginx, new connection per request): {} requests in {:.1} s ({rate:.0}/s), {} steps (100 rolling + 100 scale): {} failed, {} reached a DRAINING/removed endpoint; step publish -> kernel p50 {:.0} µs p99 {:.0} µs",
                r.requests,
                r.duration.as_secs_f64(),
                r.steps,
                r.failures,
                r.stale,
                percentile(&r.apply_us, 0.5),
                percentile(&r.apply_us, 0.99)
            ));
            if !r.first_failures.is_empty() {
                say(&format!("  first failures: {:?}", r.first_failures));
            }
            json!({
                "requests": r.requests, "duration_s": r.duration.as_secs_f64(), "rate_per_s": rate,
                "steps": r.steps, "failures": r.failures, "stale": r.stale,
                "apply_p50_us": percentile(&r.apply_us, 0.5), "apply_p99_us": percentile(&r.apply_us, 0.99),
            })
        }
        Err(e) => {
            say(&format!("churn failed: {e}"));
            json!({"error": e})
        }
    }
}

/// `sysctl -w key=value` inside `ns` (network sysctls are per namespace).
fn sysctl_in(ns: &NetNs, key: &str, value: &str) {
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ])
        .status();
}

/// New connections per second of the abrupt-death scenario (issue 14).
const OD_RATE: u32 = 500;

/// Abrupt death with no EDS change, outlier detection on and off, side by side:
/// b3's server killed (RST) or its address gone (connects time out) at t = 2 s,
/// failures counted for 10 s; the killed pod's return at t = 12 s (it is used
/// again once its 30 s ejection is over); every pod dying (panic); and the
/// circuit breaker (`max_connections: 50` against 80 held connections).
fn outlier_bench(probe: &Path) -> Value {
    use sockmesh_tests::death::{Death, Lab, Run, scenario_outlier};
    let mut lab = Lab::new(probe);
    say(&format!(
        "\noutlier detection: 3 pods, {OD_RATE} new connections/s, one pod dies at t = 2 s with no EDS change; consecutive_5xx 5, base_ejection_time 30 s, max_ejection_percent 100; client connect timeout 1 s"
    ));
    say(
        "| death | outlier detection | connects t = 2–12 s | failed | failed after the 5th failure | in flight at the 5th | 5th failure after |",
    );
    say("|---|---|---|---|---|---|---|");
    let runs = [
        ("killed (RST)", Death::Killed, true, 36_000, Some(12_000)),
        ("killed (RST)", Death::Killed, false, 12_000, None),
        (
            "unreachable (timeout)",
            Death::Unreachable,
            true,
            12_000,
            None,
        ),
        (
            "unreachable (timeout)",
            Death::Unreachable,
            false,
            12_000,
            None,
        ),
        ("every pod killed", Death::AllKilled, true, 6_000, None),
    ];
    let mut rows = Vec::new();
    for (n, (label, death, on, millis, revive)) in runs.into_iter().enumerate() {
        let run = Run {
            port: 8000 + u16::try_from(n).unwrap_or(0),
            outlier: on.then(scenario_outlier),
            death,
            rate: OD_RATE,
            millis,
            death_at_ms: 2_000,
            revive_at_ms: revive,
            timeout_ms: 1_000,
        };
        let o = match lab.run(&run) {
            Ok(o) => o,
            Err(e) => {
                say(&format!("outlier: {label}: {e}"));
                return json!({"error": e});
            }
        };
        let pct = |a: u64, b: u64| {
            if b == 0 {
                0.0
            } else {
                100.0 * a as f64 / b as f64
            }
        };
        say(&format!(
            "| {label} | {} | {} | {} ({:.1} %) | {} | {} | {} |",
            if on { "on" } else { "off" },
            o.connects_after_death,
            o.failed_after_death,
            pct(o.failed_after_death, o.connects_after_death),
            o.failed_after_threshold,
            o.in_flight_at_threshold,
            o.threshold_after_ms
                .map_or("—".to_owned(), |ms| format!("{ms} ms")),
        ));
        if revive.is_some() {
            say(&format!(
                "  return at t = 12 s: {} connects after it, {} failed; b3 served {} of them, the first {} after its return (its 30 s ejection ends then)",
                o.connects_after_revival,
                o.failed_after_revival,
                o.revived_served,
                o.revived_first_after_ms
                    .map_or("never".to_owned(), |ms| format!("{:.1} s", ms as f64 / 1e3)),
            ));
        }
        if death == Death::AllKilled {
            say(&format!(
                "  every pod dead: the client sees {:?} (panic: with under 50 % healthy, connect() ignores ejections and spreads over all pods, as Envoy does)",
                o.errors
            ));
        }
        let mut row = o.to_json();
        if let Some(obj) = row.as_object_mut() {
            obj.insert("death".into(), json!(label));
            obj.insert("outlier_detection".into(), json!(on));
        }
        rows.push(row);
    }

    // The circuit breaker: 80 connections held against max_connections 50.
    let vip = ServiceAddr {
        vip: IpAddr::from([10, 96, 0, 61]),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let mut t = RoutingTable::default();
    t.insert(
        vip,
        sockmesh::model::Service::new(
            (1..=3u8)
                .map(|i| Backend::new(IpAddr::from([10, 10, 1, 10 + i]), 8080))
                .collect(),
            sockmesh::model::LbPolicy::Random,
        )
        .with_health(sockmesh::model::Health {
            outlier: None,
            max_connections: Some(50),
        }),
    );
    if let Err(e) = lab.dp.apply(&t) {
        return json!({"error": e.to_string()});
    }
    let (held, holder) = sockmesh_tests::hold(probe, &lab.client, &lab.cgroup, "10.96.0.61:80", 80);
    let refused = held.get("E111").copied().unwrap_or(0);
    let served: u64 = held
        .iter()
        .filter(|(k, _)| k.starts_with('b'))
        .map(|(_, n)| *n)
        .sum();
    let counted = sockmesh::dataplane::read_health(&lab.bpffs.0)
        .ok()
        .and_then(|h| h.services.into_iter().find(|s| s.service == vip))
        .map(|s| (s.connections, s.overflows));
    sockmesh_tests::release(holder);
    say(&format!(
        "circuit breaker, max_connections 50, 80 connections held: {served} served, {refused} refused (ECONNREFUSED); the kernel counted (open, overflows) = {counted:?}"
    ));
    let throughput = established_throughput(probe, &mut lab);
    json!({
        "rate": OD_RATE, "runs": rows, "established_throughput": throughput,
        "circuit_breaker": {"max_connections": 50, "held": 80, "served": served,
            "refused": refused, "kernel_open_overflows": counted},
    })
}

/// Rounds of the established-connection throughput comparison.
const TP_ROUNDS: usize = 5;

/// One established connection's throughput (a `blast` server sending zeros, read
/// for 2 s), directly from outside the cgroup and through a VIP with outlier
/// detection, in interleaved rounds: no sockmesh program runs per packet, so the
/// two should match.
fn established_throughput(probe: &Path, lab: &mut sockmesh_tests::death::Lab) -> Value {
    use sockmesh::model::{Health, LbPolicy, Service};
    let blast = {
        let mut cmd = command_in(&lab.backend, None, probe);
        cmd.args(["serve", "blast:10.10.1.13:9100"]);
        Proc::server(cmd)
    };
    let mut t = RoutingTable::default();
    t.insert(
        ServiceAddr {
            vip: IpAddr::from([10, 96, 0, 62]),
            port: 80,
            protocol: Protocol::Tcp,
        },
        Service::new(
            vec![Backend::new(IpAddr::from([10, 10, 1, 13]), 9100)],
            LbPolicy::Random,
        )
        .with_health(Health {
            outlier: Some(sockmesh_tests::death::scenario_outlier()),
            max_connections: None,
        }),
    );
    if let Err(e) = lab.dp.apply(&t) {
        return json!({"error": e.to_string()});
    }
    let paths = [
        ("direct, no program", false, "10.10.1.13:9100"),
        ("VIP, outlier detection", true, "10.96.0.62:80"),
    ];
    let mut rates = vec![Vec::new(); paths.len()];
    for round in 0..TP_ROUNDS {
        for k in 0..paths.len() {
            let i = (round + k) % paths.len();
            let (_, in_cgroup, to) = paths[i];
            let mut cmd = command_in(&lab.client, in_cgroup.then_some(&lab.cgroup), probe);
            cmd.args(["drain", to, "2000"]);
            let out = run(cmd);
            if let Some(mbit) = out
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
            {
                rates[i].push(mbit);
            }
        }
    }
    drop(blast);
    let base = median(rates[0].clone());
    let mut rows = Vec::new();
    for (i, (name, _, _)) in paths.iter().enumerate() {
        let m = median(rates[i].clone());
        say(&format!(
            "established throughput, {name}: {m:.0} Mbit/s (median of {TP_ROUNDS} rounds x 2 s), x{:.3} of direct",
            m / base
        ));
        rows.push(json!({"path": name, "mbit_per_s": m, "ratio_to_direct": m / base}));
    }
    json!(rows)
}
