//! `kill -9` of the agent under continuous traffic: no connection fails while it is
//! gone (the pinned datapath keeps working), and the restarted agent adopts the
//! pinned maps and resyncs from the control plane without rewriting unchanged
//! entries (its first kernel write makes 0 map operations).

use std::{process::Stdio, time::Duration};

use sockmesh_tests::{
    Admin, Bpffs, Cgroup, Lines, Proc, TempDir, TwoPods, agent_command,
    audit::{Audit, Expect},
    command_in,
    control_plane::ControlPlane,
    mesh, sockmesh_bin, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

#[test]
fn sigkill_and_restart_under_traffic_lose_nothing() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pods = TwoPods::serving(PROBE, ["b1", "b2"]);
    let client = &pods.client;
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
    let start_agent = |admin: &Admin| {
        agent_command(sockmesh_bin(), &cgroup, &bpffs)
            .args(["--xds", &format!("grpc://{addr}")])
            .args(admin.args())
            .stdout(Stdio::null())
            .stderr(admin.log())
            .spawn()
            .expect("agent")
    };
    let mut first = Proc(start_agent(&Admin::in_dir(&tmp.0)));
    wait_until("the first agent's table", Duration::from_secs(10), || {
        sockmesh::dataplane::read_table(&bpffs.0).is_ok_and(|t| t.backend_count() == 2)
    });

    // 300 connections/s for 3 s; the agent is killed once traffic flows and
    // restarted 1 s later.
    let mut traffic = command_in(client, Some(&cgroup), PROBE);
    traffic
        .args(["rate", "10.96.0.10:80", "300", "3000"])
        .stdout(Stdio::piped());
    let mut traffic = traffic.spawn().expect("traffic");
    let lines = Lines::of(&mut traffic);
    let mut seen = vec![lines.next("the first response", Duration::from_secs(10))];
    first.0.kill().expect("SIGKILL");
    let _ = first.0.wait();
    // The outage itself: traffic keeps flowing against the pinned datapath alone.
    std::thread::sleep(Duration::from_millis(1000));
    let admin = Admin::in_dir(&tmp.0);
    let second = Proc(start_agent(&admin));
    seen.extend(lines.rest());
    let _ = traffic.wait();
    let total = seen.len();
    let failed: Vec<&String> = seen
        .iter()
        .filter(|l| !(l.ends_with(" b1") || l.ends_with(" b2")))
        .collect();
    assert!(total >= 850, "only {total} requests");
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );

    // The restarted agent adopted the pins and found nothing to rewrite: its first
    // kernel write, once LDS and CDS are back, makes no map operation.
    let dump = wait_until(
        "the second agent's first kernel write",
        Duration::from_secs(10),
        || {
            let dump = admin.dump();
            if dump["push"]["pushes"].as_u64() >= Some(1) {
                Ok(dump)
            } else {
                Err(dump["push"].clone())
            }
        },
    );
    assert_eq!(dump["datapath"]["attachment"], "Adopted", "{dump}");
    assert_eq!(dump["services"].as_array().map(Vec::len), Some(1), "{dump}");
    assert_eq!(
        dump["push"]["last_map_ops"], 0,
        "unchanged entries rewritten: {dump}"
    );
    eprintln!(
        "{total} requests, 0 failed across kill -9 and restart; the restarted agent's first write: {} map operations, {} µs",
        dump["push"]["last_map_ops"], dump["push"]["last_latency_us"]
    );
    // Nothing the first agent or the traffic left behind, and nothing after the
    // mesh is gone.
    let audit = Audit::agent(&bpffs.0, &admin);
    audit.assert(
        "the restarted agent's table",
        &Expect::services(1, 2).xds(1, 1, 0, 1).link_cgroups(1),
    );
    cp.remove_all();
    audit.assert_empty("the control plane's mesh removed");
    drop(second);
}
