//! `--terminate-removed-connections`: a connected UDP client of an endpoint that is
//! removed from its service gets its socket aborted right after the
//! update, while a socket that reached the same endpoint directly (not through
//! sockmesh) is left alone.

use std::{fs, process::Stdio, time::Duration};

use sockmesh_tests::{
    Bpffs, Cgroup, NetNs, Proc, TempDir, agent_command, command_in, pod_network, serve,
    sockmesh_bin,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

fn config(backend: &str) -> String {
    format!(
        r#"resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: dns
  address: {{ socket_address: {{ address: 10.96.0.53, port_value: 53, protocol: UDP }} }}
  udp_listener_config: {{}}
  listener_filters:
  - name: envoy.filters.udp_listener.udp_proxy
    typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig, stat_prefix: dns, cluster: dns }}
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: dns
  type: STATIC
  load_assignment:
    cluster_name: dns
    endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: {backend}, port_value: 5353 }} }} }} }} ] }} ]
"#
    )
}

#[test]
fn removed_endpoint_sockets_are_aborted_and_others_kept() {
    let client = NetNs::new();
    let backend = NetNs::new();
    pod_network(&client, &backend, 2);
    let _server = serve(
        &backend,
        PROBE,
        [
            "udp:10.10.1.11:5353=u1".into(),
            "udp:10.10.1.12:5353=u2".into(),
        ],
    );
    let tmp = TempDir::new("sockmesh-term-");
    let dir = &tmp.0;
    let file = dir.join("resources.yaml");
    fs::write(&file, config("10.10.1.11")).expect("write");
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let log_path = dir.join("agent.log");
    let agent = agent_command(sockmesh_bin(), &cgroup, &bpffs)
        .arg("--xds")
        .arg(format!("file://{}", file.display()))
        .arg("--terminate-removed-connections")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("agent");
    let _agent = Proc(agent);
    let started = std::time::Instant::now();
    while sockmesh::dataplane::read_table(&bpffs.0).map_or(true, |t| t.services.is_empty()) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "agent never applied"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let hold = |inside: bool, to: &str| {
        let mut cmd = command_in(&client, inside.then_some(&cgroup), PROBE);
        cmd.args(["udp-hold", to, "2500"]).stdout(Stdio::piped());
        cmd.spawn().expect("client")
    };
    let through_vip = hold(true, "10.96.0.53:53");
    let direct = hold(false, "10.10.1.11:5353");
    std::thread::sleep(Duration::from_millis(700));
    let tmp = dir.join("resources.tmp");
    fs::write(&tmp, config("10.10.1.12")).expect("write");
    fs::rename(&tmp, &file).expect("rename");

    let vip_out = String::from_utf8_lossy(&through_vip.wait_with_output().expect("client").stdout)
        .into_owned();
    let direct_out =
        String::from_utf8_lossy(&direct.wait_with_output().expect("client").stdout).into_owned();
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    let lines: Vec<&str> = vip_out.lines().collect();
    assert!(lines.first() == Some(&"u1"), "{vip_out}");
    // The kernel aborts the socket and disconnects it: a pending recv() sees
    // ECONNABORTED (103), the next send() on the now unconnected socket
    // EDESTADDRREQ (89).
    assert!(
        matches!(lines.last(), Some(&"E103" | &"E89")),
        "not aborted: {vip_out}\n{log}"
    );
    assert!(
        lines.len() < 30,
        "aborted only after {} requests: {vip_out}",
        lines.len()
    );
    assert!(log.contains("closed sockets of removed endpoints"), "{log}");
    assert!(
        direct_out.lines().all(|l| l == "u1") && direct_out.lines().count() > 30,
        "a socket sockmesh did not redirect was touched: {direct_out}"
    );
}
