//! `sockmesh agent` against a real ADS server (in this process), both protocols:
//! endpoints reach the kernel, a bad update is NACKed and changes nothing, a
//! control-plane outage keeps the last good table, a reconnect converges, and after
//! SIGTERM the datapath keeps redirecting.

use std::{
    fs,
    process::Stdio,
    time::{Duration, Instant},
};

use sockmesh::model::{Backend, RoutingTable};
use sockmesh_proto::pb::google::protobuf::Any;
use sockmesh_tests::{
    Bpffs, Cgroup, NetNs, Proc, TempDir, agent_command, command_in, control_plane::ControlPlane,
    pod_network, run, serve, sockmesh_bin,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

/// Resources by name, named without validation (invalid ones are the point of
/// some steps).
fn resources(yaml: &str) -> Vec<(String, Any)> {
    use prost::Message as _;
    use sockmesh_proto::pb::envoy::config::{
        cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
    };
    sockmesh::xds::decode::discovery_response_from_text(yaml)
        .expect("test YAML decodes")
        .resources
        .into_iter()
        .map(|a| {
            let v = a.value.as_slice();
            let name = match a.type_url.rsplit('.').next() {
                Some("Listener") => Listener::decode(v).map(|l| l.name),
                Some("Cluster") => Cluster::decode(v).map(|c| c.name),
                _ => ClusterLoadAssignment::decode(v).map(|c| c.cluster_name),
            }
            .expect("protobuf");
            (name, a)
        })
        .collect()
}

const LDS_CDS: &str = r#"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: web
  address: { socket_address: { address: 10.96.0.10, port_value: 80 } }
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: web, cluster: web } } ] } ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  type: EDS
  eds_cluster_config: { service_name: web.default, eds_config: { ads: {} } }
"#;

fn eds(backends: &[u8], port: u32) -> String {
    let eps: String = backends
        .iter()
        .map(|i| format!("    - endpoint: {{ address: {{ socket_address: {{ address: 10.10.1.{}, port_value: {port} }} }} }}\n", 10 + i))
        .collect();
    format!(
        "resources:\n- \"@type\": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment\n  cluster_name: web.default\n  endpoints:\n  - lb_endpoints:\n{eps}"
    )
}

fn backends_of(table: &RoutingTable) -> Vec<String> {
    table
        .services
        .values()
        .flatten()
        .map(|b: &Backend| b.address.to_string())
        .collect()
}

fn wait_for(bpffs: &Bpffs, what: &str, want: &[&str]) -> Duration {
    let started = Instant::now();
    loop {
        let got = sockmesh::dataplane::read_table(&bpffs.0)
            .map(|t| backends_of(&t))
            .unwrap_or_default();
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{what}: kernel has {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn scenario(protocol: &str) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = NetNs::new();
    let backend = NetNs::new();
    let pods = pod_network(&client, &backend, 4);
    let _server = serve(
        &backend,
        PROBE,
        pods.iter()
            .zip(1..)
            .map(|(ip, i)| format!("{ip}:8080=b{i}")),
    );
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();

    let cp = ControlPlane::new();
    let (addr, stop) = rt.block_on(cp.serve("127.0.0.1:0".parse().expect("addr")));
    let mut initial = resources(LDS_CDS);
    initial.extend(resources(&eds(&[1], 8080)));
    cp.publish(&initial, true);

    let tmp = TempDir::new("sockmesh-agent-log-");
    let log_path = tmp.0.join("agent.log");
    let log = fs::File::create(&log_path).expect("log file");
    let admin = sockmesh_tests::free_port();
    let agent = agent_command(sockmesh_bin(), &cgroup, &bpffs)
        .args([
            "--xds",
            &format!("grpc://{addr}"),
            "--xds-protocol",
            protocol,
        ])
        .args([
            "--node-id",
            "sidecar~10.10.1.1~test.default~default.svc.cluster.local",
        ])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .env("RUST_LOG", "sockmesh=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start agent");
    let mut agent = Proc(agent);
    let agent_log = || fs::read_to_string(&log_path).unwrap_or_default();

    wait_for(&bpffs, "initial sync", &["10.10.1.11"]);
    let reach = |n: u32| {
        let mut probe = command_in(&client, Some(&cgroup), PROBE);
        probe.args(["connect", "10.96.0.10:80", &n.to_string()]);
        let out = run(probe);
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| l.split(' ').nth(2))
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        names
    };
    assert_eq!(reach(10), ["b1"]);

    // Scale: endpoints move to b2, b3.
    cp.publish(&resources(&eds(&[2, 3], 8080)), false);
    let took = wait_for(&bpffs, "EDS update", &["10.10.1.12", "10.10.1.13"]);
    eprintln!(
        "{protocol}: EDS update visible in the pinned maps after {took:?} (includes polling)"
    );
    assert!(reach(60).iter().all(|n| n == "b2" || n == "b3"));

    // A bad update: NACKed with the field named, kernel unchanged.
    cp.publish(&resources(&eds(&[4], 70000)), false);
    let started = Instant::now();
    while cp.nacks().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no NACK; agent log:\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let nack = cp.nacks().remove(0);
    assert!(
        nack.contains("web.default") && nack.contains("port_value: 70000 is out of range"),
        "{nack}"
    );
    std::thread::sleep(Duration::from_millis(200));
    wait_for(&bpffs, "after NACK", &["10.10.1.12", "10.10.1.13"]);
    assert!(reach(20).iter().all(|n| n == "b2" || n == "b3"));

    // Outage: the control plane goes away; the table stays.
    let cut = Instant::now();
    cp.disconnect_all();
    drop(stop);
    std::thread::sleep(Duration::from_millis(100));
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(300)).await });
    for _ in 0..10 {
        wait_for(&bpffs, "during the outage", &["10.10.1.12", "10.10.1.13"]);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(reach(10).iter().all(|n| n == "b2" || n == "b3"));
    // Liveness stays ok; readiness says why it is degraded.
    assert_eq!(
        sockmesh_tests::http_get(admin, "/healthz").0,
        200,
        "{}",
        agent_log()
    );
    let (status, body) = sockmesh_tests::http_get(admin, "/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("degraded: xDS disconnected"), "{body}");

    // Back, on the same address, with a change made meanwhile: converges.
    let outage = cut.elapsed();
    cp.publish(&resources(&eds(&[4], 8080)), false);
    let (_addr2, _stop2) = rt.block_on(cp.serve(addr));
    let back = Instant::now();
    wait_for(&bpffs, "after reconnect", &["10.10.1.14"]);
    eprintln!(
        "{protocol}: outage of {} ms with the table kept; server back → change in the kernel {} ms (reconnect backoff included)",
        outage.as_millis(),
        back.elapsed().as_millis()
    );
    assert_eq!(reach(10), ["b4"]);
    assert_eq!(sockmesh_tests::http_get(admin, "/readyz").0, 200);

    // SIGTERM: the agent exits cleanly, the datapath stays.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent.0.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = agent.0.wait().expect("agent exit");
    assert!(status.success(), "agent exit {status}: {}", agent_log());
    assert_eq!(reach(10), ["b4"], "datapath gone with the agent");
    let log = agent_log();
    assert!(log.contains("xDS disconnected"), "{log}");
    // Every response was answered: as many ACK/NACKs as the server saw nonces for.
    assert!(
        cp.seen()
            .iter()
            .any(|s| !s.nonce.is_empty() && s.error.is_none())
    );
}

#[test]
fn agent_follows_ads_delta() {
    scenario("delta");
}

#[test]
fn agent_follows_ads_sotw() {
    scenario("sotw");
}

#[test]
fn agent_follows_rest_json() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let cp = ControlPlane::new();
    let (addr, _stop) = rt.block_on(cp.serve_rest("127.0.0.1:0".parse().expect("addr")));
    let mut initial = resources(LDS_CDS);
    initial.extend(resources(&eds(&[1], 8080)));
    cp.publish(&initial, true);
    let tmp = TempDir::new("sockmesh-agent-log-");
    let log_path = tmp.0.join("agent.log");
    let agent = agent_command(sockmesh_bin(), &cgroup, &bpffs)
        .args(["--xds", &format!("http://{addr}"), "--xds-refresh", "100ms"])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("start agent");
    let _agent = Proc(agent);
    let agent_log = || fs::read_to_string(&log_path).unwrap_or_default();
    wait_for(&bpffs, "REST initial sync", &["10.10.1.11"]);
    cp.publish(&resources(&eds(&[2, 3], 8080)), false);
    wait_for(&bpffs, "REST EDS update", &["10.10.1.12", "10.10.1.13"]);
    cp.publish(&resources(&eds(&[4], 70000)), false);
    let started = Instant::now();
    while !agent_log().contains("port_value: 70000 is out of range") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for(
        &bpffs,
        "after a rejected response",
        &["10.10.1.12", "10.10.1.13"],
    );
    // The poller sent its node and asked for the EDS name the cluster references.
    assert!(cp.seen().iter().any(|s| s.names == ["web.default"]));
}
