//! Churn under load (CI size): 200 requests/s, each on a new connection, while the
//! control plane rolls and scales the service 40 times over ADS. Zero failures, and
//! zero requests to an endpoint already DRAINING or removed in the kernel.

use std::{net::IpAddr, process::Stdio, time::Duration};

use sockmesh_tests::{
    Admin, Bpffs, Cgroup, NetNs, Proc, TempDir, agent_command,
    audit::{Audit, Expect},
    churn,
    control_plane::ControlPlane,
    pod_network, serve, sockmesh_bin,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

#[test]
fn rolling_and_scaling_under_load_lose_nothing() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = NetNs::new();
    let backend = NetNs::new();
    let pods: Vec<(String, IpAddr)> = pod_network(&client, &backend, 6)
        .into_iter()
        .zip(1..)
        .map(|(ip, i)| (format!("p{i}"), ip))
        .collect();
    let _server = serve(
        &backend,
        PROBE,
        pods.iter().map(|(n, ip)| format!("{ip}:8080={n}")),
    );
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let cp = ControlPlane::new();
    let (addr, _stop) = rt.block_on(cp.serve("127.0.0.1:0".parse().expect("addr")));
    cp.publish(&churn::resources(), true);
    let tmp = TempDir::new("sockmesh-churn-");
    let admin = Admin::in_dir(&tmp.0);
    let agent = agent_command(sockmesh_bin(), &cgroup, &bpffs)
        .args(["--xds", &format!("grpc://{addr}")])
        .args(admin.args())
        .stdout(Stdio::null())
        .stderr(admin.log())
        .spawn()
        .expect("agent");
    let _agent = Proc(agent);
    sockmesh_tests::wait_until("the agent's datapath", Duration::from_secs(10), || {
        sockmesh::dataplane::open_pinned(&bpffs.0).map(drop)
    });
    let result = churn::run(&churn::Churn {
        client: &client,
        cgroup: &cgroup,
        probe: std::path::Path::new(PROBE),
        bpffs: &bpffs.0,
        cp: &cp,
        pods,
        port: 8080,
        rps: 200,
        rolling_steps: 21,
        scale_steps: 20,
        step_every: Duration::from_millis(240),
        http: false,
        audit_steps: true,
    })
    .expect("churn ran");
    eprintln!(
        "churn: {} requests in {:?}, {} steps, {} failures, {} stale; apply p50 {:.0} µs",
        result.requests,
        result.duration,
        result.steps,
        result.failures,
        result.stale,
        result
            .apply_us
            .get(result.apply_us.len() / 2)
            .copied()
            .unwrap_or(0.0)
    );
    assert!(result.requests >= 1_900, "{result:?}");
    assert_eq!(result.failures, 0, "{:?}", result.first_failures);
    assert_eq!(
        result.stale, 0,
        "requests reached DRAINING/removed endpoints"
    );
    // The client is gone: one service, its last pods, one listener, cluster and
    // assignment; then the mesh removed, nothing.
    let audit = Audit::agent(&bpffs.0, &admin);
    let backends = sockmesh_tests::kernel_backends(&bpffs).len();
    audit.assert(
        "the churn done",
        &Expect::services(1, backends).xds(1, 1, 0, 1),
    );
    cp.remove_all();
    audit.assert_empty("the control plane's mesh removed");
}
