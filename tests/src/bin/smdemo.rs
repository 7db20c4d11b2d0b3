//! The tour behind `cargo xtask demo` (root): backend "pods" in a namespace, a
//! client namespace with no default route, `sockmesh agent` following a watched
//! Envoy resources file, and the file edited to scale a service up, roll it, and
//! scale it down. Each step prints how long the change took to reach the kernel
//! and which backend each request reached. Everything it creates is removed at the
//! end, also on failure.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sockmesh_tests::{
    Bpffs, Cgroup, NetNs, Proc, add_addr, agent_command, command_in, run, unique, veth,
};

fn say(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

const VIP: &str = "10.96.0.10:80";

/// The Envoy resources for `web` with endpoints `(pod, health)`.
fn resources(version: u32, pods: &[(u8, &str)]) -> String {
    let eps: String = pods
        .iter()
        .map(|(i, health)| {
            format!(
                "    - endpoint: {{ address: {{ socket_address: {{ address: 10.10.1.{}, port_value: 8080 }} }} }}\n      health_status: {health}\n",
                10 + i
            )
        })
        .collect();
    format!(
        r#"version_info: "{version}"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: web
  address: {{ socket_address: {{ address: 10.96.0.10, port_value: 80 }} }}
  filter_chains:
  - filters:
    - name: envoy.filters.network.tcp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: web
        cluster: web
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  type: EDS
  eds_cluster_config: {{ eds_config: {{ ads: {{}} }} }}
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: web
  endpoints:
  - lb_endpoints:
{eps}"#
    )
}

fn active(bpffs: &Path) -> Vec<String> {
    sockmesh::dataplane::read_table(bpffs)
        .map(|t| {
            t.services
                .values()
                .flatten()
                .filter(|b| b.state == sockmesh::model::BackendState::Active)
                .map(|b| b.address.to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn last_latency(log: &Path) -> Option<String> {
    let text = fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("routing table applied"))?;
    let us = line.split("latency_us").nth(1)?;
    let digits: String = us
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    Some(digits)
}

fn main() -> std::process::ExitCode {
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let probe = bin_dir.join("smprobe");
    let sockmesh = bin_dir.join("sockmesh");
    let work = std::env::temp_dir().join(unique("sockmesh-demo-"));
    if let Err(e) = fs::create_dir_all(&work) {
        say(&format!("creating {}: {e}", work.display()));
        return std::process::ExitCode::FAILURE;
    }
    let ok = demo(&probe, &sockmesh, &work);
    let _ = fs::remove_dir_all(&work);
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

fn demo(probe: &Path, sockmesh: &Path, work: &Path) -> bool {
    say("sockmesh demo: 4 backend pods 10.10.1.11-14:8080 (b1..b4) in their own namespace,");
    say("a client namespace without a default route, service web = 10.96.0.10:80.\n");
    let client = NetNs::new();
    let pods = NetNs::new();
    veth(&client, "10.10.1.1/24", &pods, "10.10.1.11/24");
    for last in 12..=14 {
        add_addr(&pods, "sm1", &format!("10.10.1.{last}/24"));
    }
    let mut serve = command_in(&pods, None, probe);
    serve.arg("serve");
    for i in 1..=4 {
        serve.arg(format!("10.10.1.{}:8080=b{i}", 10 + i));
    }
    let _servers = Proc::server(serve);
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let file = work.join("resources.yaml");
    let log = work.join("agent.log");
    let write = |text: &str| {
        let tmp = file.with_extension("tmp");
        fs::write(&tmp, text).and_then(|()| fs::rename(&tmp, &file))
    };
    if let Err(e) = write(&resources(1, &[(1, "HEALTHY")])) {
        say(&format!("writing {}: {e}", file.display()));
        return false;
    }
    let Ok(log_file) = fs::File::create(&log) else {
        return false;
    };
    let agent = agent_command(sockmesh, &cgroup, &bpffs)
        .arg("--xds")
        .arg(format!("file://{}", file.display()))
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn();
    let Ok(agent) = agent else {
        say("could not start sockmesh agent");
        return false;
    };
    let _agent = Proc(agent);
    say(&format!(
        "$ sockmesh agent --cgroup {} --bpffs {} --xds file://{}\n",
        cgroup.0.display(),
        bpffs.0.display(),
        file.display()
    ));

    let steps: [(&str, Vec<(u8, &str)>); 6] = [
        ("start with one pod", vec![(1, "HEALTHY")]),
        ("scale up to 2", vec![(1, "HEALTHY"), (2, "HEALTHY")]),
        (
            "scale up to 4",
            vec![
                (1, "HEALTHY"),
                (2, "HEALTHY"),
                (3, "HEALTHY"),
                (4, "HEALTHY"),
            ],
        ),
        (
            "roll: b1, b2 draining",
            vec![
                (1, "DRAINING"),
                (2, "DRAINING"),
                (3, "HEALTHY"),
                (4, "HEALTHY"),
            ],
        ),
        ("roll: b1, b2 removed", vec![(3, "HEALTHY"), (4, "HEALTHY")]),
        ("scale down to 1", vec![(4, "HEALTHY")]),
    ];
    let mut all_ok = true;
    for (n, (what, pods)) in steps.iter().enumerate() {
        let want: Vec<String> = pods
            .iter()
            .filter(|(_, h)| *h == "HEALTHY")
            .map(|(i, _)| format!("10.10.1.{}", 10 + i))
            .collect();
        let started = Instant::now();
        if n > 0 && write(&resources(u32::try_from(n + 1).unwrap_or(0), pods)).is_err() {
            return false;
        }
        while active(&bpffs.0) != want {
            if started.elapsed() > Duration::from_secs(10) {
                say(&format!(
                    "step {}: the kernel never showed {want:?}; agent log: {}",
                    n + 1,
                    log.display()
                ));
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let visible = started.elapsed();
        let mut cmd = command_in(&client, Some(&cgroup), probe);
        cmd.args(["connect", VIP, "12"]);
        let out = run(cmd);
        let mut hits: BTreeMap<String, u32> = BTreeMap::new();
        for line in out.lines() {
            if let Some(name) = line.split(' ').nth(2) {
                *hits.entry(name.to_owned()).or_default() += 1;
            }
        }
        let wanted: Vec<String> = pods
            .iter()
            .filter(|(_, h)| *h == "HEALTHY")
            .map(|(i, _)| format!("b{i}"))
            .collect();
        let stray = hits.keys().any(|k| !wanted.contains(k));
        all_ok &= !stray;
        let dist: Vec<String> = hits.iter().map(|(k, v)| format!("{k}×{v}")).collect();
        say(&format!(
            "step {}: {what:<24} agent: file event → maps written {:>6} µs; visible to a reader after {:>6.2} ms",
            n + 1,
            last_latency(&log).unwrap_or_else(|| "?".into()),
            visible.as_secs_f64() * 1e3
        ));
        say(&format!(
            "        12 connects to {VIP} → {}{}",
            dist.join(" "),
            if stray { "  (UNEXPECTED)" } else { "" }
        ));
    }
    for command in ["services", "stats"] {
        say(&format!("\n$ sockmesh {command}"));
        if let Ok(out) = Command::new(sockmesh)
            .arg(command)
            .arg("--bpffs")
            .arg(&bpffs.0)
            .output()
        {
            say(String::from_utf8_lossy(&out.stdout).trim_end());
        }
    }
    say("\nCleaning up: agent stopped, datapath uninstalled, namespaces and cgroup removed.");
    all_ok
}
