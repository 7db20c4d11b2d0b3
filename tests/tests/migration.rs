//! Upgrade across a map-layout change under continuous traffic: the previous release
//! (pin layout v1, built from git) serves; it is stopped and this build (the
//! current layout, `LAYOUT_VERSION`, "new" below) starts while the control plane
//! is down. The new agent builds its maps beside the
//! old ones but must not attach a half-filled table: the v1 datapath keeps serving
//! alone. Once the control plane is back, the new agent fills its maps, attaches
//! them, and detaches and removes every v1 pin. No connection fails throughout.

use std::{
    net::IpAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sockmesh_tests::{
    Admin, Bpffs, Cgroup, Lines, NetNs, Proc, TempDir, agent_command,
    audit::{Audit, Expect},
    command_in,
    control_plane::ControlPlane,
    layout_v1_bin, mesh, pod_network, run, scaled, serve, sockmesh_bin, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

#[test]
fn layout_upgrade_builds_beside_the_old_datapath_and_swaps_without_loss() {
    let old_bin = layout_v1_bin();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = NetNs::new();
    let backend = NetNs::new();
    let pods = pod_network(&client, &backend, 3);
    let _server = serve(
        &backend,
        PROBE,
        [
            "10.10.1.11:8080=b1".into(),
            "10.10.1.12:8080=b2".into(),
            "10.10.1.13:8080=b3".into(),
        ],
    );
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let cp = ControlPlane::new();
    let (addr, stop_cp) = rt.block_on(cp.serve("127.0.0.1:0".parse().expect("addr")));
    let vip = IpAddr::from([10, 96, 0, 10]);
    let publish = |eps: &[IpAddr]| {
        let eps: Vec<(IpAddr, u16)> = eps.iter().map(|ip| (*ip, 8080)).collect();
        cp.publish(
            &[
                mesh::tcp_listener("web", vip, 80, "web"),
                mesh::eds_cluster("web"),
                mesh::assignment("web", &eps),
            ],
            true,
        )
    };
    publish(&pods[..2]);
    let tmp = TempDir::new("sockmesh-migration-");
    let dir = &tmp.0;
    let v1 = bpffs.0.join("v1");
    let current = bpffs
        .0
        .join(format!("v{}", sockmesh_common::LAYOUT_VERSION));

    // The previous release installs layout v1 and syncs.
    // In a guard: a failing assertion must not leave it running in the cgroup.
    let mut old = Proc(
        agent_command(&old_bin, &cgroup, &bpffs)
            .args(["--xds", &format!("grpc://{addr}"), "--admin", "off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("v1 agent"),
    );
    wait_until("the v1 agent's table", Duration::from_secs(10), || {
        let out = Command::new(&old_bin)
            .args(["services", "--json", "--bpffs"])
            .arg(&bpffs.0)
            .output()
            .expect("v1 services");
        String::from_utf8_lossy(&out.stdout).contains("10.10.1.12")
    });
    assert!(v1.join("maps/SM_SERVICES").exists());

    // 250 connections/s across the whole upgrade: the load runs until the test has
    // seen the swap and stops it (the window is only a bound).
    let window = scaled(Duration::from_secs(120)).as_millis().to_string();
    let mut traffic = command_in(&client, Some(&cgroup), PROBE);
    traffic
        .args(["rate", "10.96.0.10:80", "250", &window])
        .stdout(Stdio::piped());
    let mut traffic = traffic.spawn().expect("traffic");
    let lines = Lines::of(&mut traffic);
    let mut seen = vec![lines.next("the first response", Duration::from_secs(10))];

    // The rolling update stops the old agent; the control plane is down meanwhile.
    assert!(old.terminate().success(), "v1 agent exit");
    drop(stop_cp);
    let admin = Admin::in_dir(dir);
    let new = Proc(
        agent_command(sockmesh_bin(), &cgroup, &bpffs)
            .args(["--xds", &format!("grpc://{addr}")])
            .args(admin.args())
            // Each program's verification time in the log (and so in a failure
            // message): start-up is what this test waits longest for in the VM.
            .env("RUST_LOG", "info,sockmesh::dataplane::loader=debug")
            .stdout(Stdio::null())
            .stderr(admin.log())
            .spawn()
            .expect("new agent"),
    );
    // The admin server starts after the datapath is installed, so once it answers
    // the new agent has built (and decided not to attach) its datapath. Without a
    // control plane nothing can make it attach.
    let dump = wait_until(
        "the new agent's admin server",
        Duration::from_secs(20),
        || {
            let dump = admin.dump();
            (!dump.is_null()).then_some(dump)
        },
    );
    assert_eq!(dump["datapath"]["migrating"], true, "{dump}");
    assert_eq!(dump["datapath"]["attachment"], "Pending", "{dump}");
    assert_eq!(
        dump["datapath"]["layout_version"],
        sockmesh_common::LAYOUT_VERSION,
        "{dump}"
    );
    // Built, not live: only v1's nine programs run, v1's pins are intact.
    assert!(current.join("maps/SM_SERVICE_STATS").exists());
    let attached = sockmesh::dataplane::attached_programs(&cgroup.0).expect("query");
    assert_eq!(attached.len(), 9, "{attached:?}");
    assert!(v1.join("maps/SM_SERVICES").exists());
    assert!(
        !current
            .join("links")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "new attached before it had a table"
    );
    let (code, body) = admin.get("/readyz");
    assert_eq!(code, 503);
    assert!(body.contains("migrating"), "{body}");

    // The control plane returns, with the service rolled to b2, b3 meanwhile.
    publish(&pods[1..]);
    let (_, _stop_cp) = rt.block_on(cp.serve(addr));
    let swapped = Instant::now();
    wait_until("v1's pins to be removed", Duration::from_secs(10), || {
        !v1.exists()
    });
    let swap_ms = swapped.elapsed().as_millis();
    assert!(
        traffic.try_wait().expect("traffic status").is_none(),
        "the swap happened after the traffic had ended"
    );
    let attached = sockmesh::dataplane::attached_programs(&cgroup.0).expect("query");
    // Exactly this build's programs: none of v1's is left.
    assert_eq!(
        attached.len(),
        sockmesh_common::hooks::HOOKS.len(),
        "old programs left attached: {attached:?}"
    );
    // The datapath task publishes its status once the swap's command is done,
    // just after it removed v1's pins.
    let dump = wait_until("the dump to say Migrated", Duration::from_secs(10), || {
        let dump = admin.dump();
        (dump["datapath"]["attachment"] == "Migrated")
            .then_some(dump.clone())
            .ok_or(dump)
    });
    assert_eq!(
        dump["datapath"]["retired_layouts"],
        serde_json::json!([1]),
        "{dump}"
    );
    wait_until("/readyz 200", Duration::from_secs(10), || {
        admin.get("/readyz").0 == 200
    });

    // 50 more requests started after the swap (the lines buffered meanwhile were
    // started before it), then the load stops.
    let swapped_at = sockmesh_tests::monotonic_ns();
    let mut after_swap = 0;
    while after_swap < 50 {
        let line = lines.next("a response after the swap", Duration::from_secs(10));
        let started_ns = line.split(' ').next().and_then(|t| t.parse::<u64>().ok());
        after_swap += usize::from(started_ns.is_some_and(|t| t >= swapped_at));
        seen.push(line);
    }
    let _ = traffic.kill();
    seen.extend(lines.rest());
    let _ = traffic.wait();
    let failed: Vec<&String> = seen
        .iter()
        .filter(|l| !(l.ends_with(" b1") || l.ends_with(" b2") || l.ends_with(" b3")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        seen.len(),
        &failed[..failed.len().min(5)]
    );
    // After the swap the new table (b2, b3) is the one in force.
    let mut probe = command_in(&client, Some(&cgroup), PROBE);
    probe.args(["connect", "10.96.0.10:80", "50"]);
    let after = run(probe);
    assert!(
        after
            .lines()
            .all(|l| l.ends_with(" b2") || l.ends_with(" b3")),
        "{after}"
    );
    assert!(after.lines().any(|l| l.ends_with(" b3")), "{after}");
    // And the new layout's per-service counters count them.
    let counted = sockmesh::dataplane::read_service_counters(&bpffs.0).expect("stats");
    assert!(counted[0].1.redirects > 0, "{counted:?}");
    eprintln!(
        "{} requests, 0 failed; new live and v1 removed {swap_ms} ms after the control plane returned",
        seen.len()
    );
    // Nothing of v1 is pinned, and the new layout holds the table alone.
    let audit = Audit::agent(&bpffs.0, &admin);
    audit.assert(
        "the upgrade done",
        &Expect::services(1, 2).xds(1, 1, 0, 1).link_cgroups(1),
    );
    cp.remove_all();
    audit.assert_empty("the control plane's mesh removed");
    drop(new);
}
