//! `kill -9` of the agent under continuous traffic: no connection fails while it is
//! gone (the pinned datapath keeps working), and the restarted agent adopts the
//! pinned maps and resyncs from the control plane without rewriting unchanged
//! entries (its first kernel write makes 0 map operations).

use std::{
    fs,
    process::Stdio,
    time::{Duration, Instant},
};

use sockmesh_tests::{
    Bpffs, Cgroup, NetNs, Proc, TempDir, agent_command, command_in, control_plane::ControlPlane,
    mesh, pod_network, serve, sockmesh_bin,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

#[test]
fn sigkill_and_restart_under_traffic_lose_nothing() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = NetNs::new();
    let backend = NetNs::new();
    pod_network(&client, &backend, 2);
    let _server = serve(
        &backend,
        PROBE,
        ["10.10.1.11:8080=b1".into(), "10.10.1.12:8080=b2".into()],
    );
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let cp = ControlPlane::new();
    let (addr, _stop) = rt.block_on(cp.serve("127.0.0.1:0".parse().expect("addr")));
    let vip = std::net::IpAddr::from([10, 96, 0, 10]);
    cp.publish(
        &[
            mesh::tcp_listener("web", vip, 80, "web"),
            mesh::eds_cluster("web"),
            mesh::assignment(
                "web",
                &[
                    (std::net::IpAddr::from([10, 10, 1, 11]), 8080),
                    (std::net::IpAddr::from([10, 10, 1, 12]), 8080),
                ],
            ),
        ],
        true,
    );
    let tmp = TempDir::new("sockmesh-restart-");
    let dir = &tmp.0;
    let start_agent = |log: &str| {
        agent_command(sockmesh_bin(), &cgroup, &bpffs)
            .args(["--xds", &format!("grpc://{addr}"), "--admin", "off"])
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join(log)).expect("log"))
            .spawn()
            .expect("agent")
    };
    let mut first = start_agent("first.log");
    let started = Instant::now();
    while sockmesh::dataplane::read_table(&bpffs.0).map_or(true, |t| t.backend_count() != 2) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "first agent never synced"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // 300 connections/s for 3 s; the agent is killed at 0.5 s and restarted at 1.5 s.
    let mut traffic = command_in(&client, Some(&cgroup), PROBE);
    traffic
        .args(["rate", "10.96.0.10:80", "300", "3000"])
        .stdout(Stdio::piped());
    let traffic = traffic.spawn().expect("traffic");
    std::thread::sleep(Duration::from_millis(500));
    first.kill().expect("SIGKILL");
    let _ = first.wait();
    std::thread::sleep(Duration::from_millis(1000));
    let second = Proc(start_agent("second.log"));
    let out = traffic.wait_with_output().expect("traffic output");
    let text = String::from_utf8_lossy(&out.stdout);
    let total = text.lines().count();
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| !(l.ends_with(" b1") || l.ends_with(" b2")))
        .collect();
    assert!(total >= 850, "only {total} requests");
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );

    // The restarted agent adopted the pins and found nothing to rewrite.
    let started = Instant::now();
    let log = loop {
        let log = fs::read_to_string(dir.join("second.log")).unwrap_or_default();
        if log.contains("routing table applied") {
            break log;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "second agent never synced:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(log.contains("attachment=Adopted"), "{log}");
    assert!(log.contains("services=1"), "{log}");
    let applied = log
        .lines()
        .find(|l| l.contains("routing table applied") && l.contains("xds::core"))
        .unwrap_or_default();
    assert!(
        applied.contains("map_ops=0"),
        "unchanged entries rewritten: {applied}"
    );
    eprintln!(
        "{total} requests, 0 failed across kill -9 and restart; the restarted agent's first write: map_ops{}",
        applied.split_once("map_ops").map_or("", |(_, r)| r)
    );
    drop(second);
}
