//! `--terminate-removed-connections`: a connected UDP client of an endpoint that is
//! removed from its service gets its socket aborted right after the
//! update, while a socket that reached the same endpoint directly (not through
//! sockmesh) is left alone.

use std::{fs, process::Stdio, time::Duration};

use sockmesh_tests::{
    Admin, Bpffs, Cgroup, Lines, NetNs, Proc, TempDir, agent_command,
    audit::{Audit, Expect},
    command_in, pod_network, scaled, serve, sockmesh_bin, wait_until,
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
    let admin = Admin::in_dir(dir);
    // The agent's log (with the sweep's debug lines) goes into failure messages.
    let log = dir.join("agent.log");
    let agent_log = || fs::read_to_string(&log).unwrap_or_default();
    let agent = agent_command(sockmesh_bin(), &cgroup, &bpffs)
        .arg("--xds")
        .arg(format!("file://{}", file.display()))
        .arg("--terminate-removed-connections")
        .args(admin.args())
        .env("RUST_LOG", "info,sockmesh::dataplane::destroy=debug")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("agent log"))
        .spawn()
        .expect("agent");
    let _agent = Proc(agent);
    wait_until("the agent's table", Duration::from_secs(10), || {
        sockmesh::dataplane::read_table(&bpffs.0).is_ok_and(|t| !t.services.is_empty())
    });
    let hold = |inside: bool, to: &str| {
        let mut cmd = command_in(&client, inside.then_some(&cgroup), PROBE);
        let window = scaled(Duration::from_millis(2500)).as_millis().to_string();
        cmd.args(["udp-hold", to, &window]).stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("client");
        let lines = Lines::of(&mut child);
        // The socket is connected and answered before the endpoint is removed.
        let first = lines.next("the first UDP reply", Duration::from_secs(10));
        (Proc(child), first, lines)
    };
    let (_vip_proc, vip_first, vip_lines) = hold(true, "10.96.0.53:53");
    let (_direct_proc, direct_first, direct_lines) = hold(false, "10.10.1.11:5353");
    assert_eq!(vip_first, "u1");
    assert_eq!(direct_first, "u1");
    let tmp = dir.join("resources.tmp");
    fs::write(&tmp, config("10.10.1.12")).expect("write");
    fs::rename(&tmp, &file).expect("rename");

    let vip_out = vip_lines.rest();
    let direct_out = direct_lines.rest();
    // The kernel aborts the socket and disconnects it: a pending recv() sees
    // ECONNABORTED (103), the next send() on the now unconnected socket
    // EDESTADDRREQ (89).
    assert!(
        matches!(vip_out.last().map(String::as_str), Some("E103" | "E89")),
        "not aborted: {vip_out:?}\nagent log:\n{}",
        agent_log()
    );
    // Exactly the redirected socket was closed, and the agent counted it.
    wait_until(
        "the termination to be counted",
        Duration::from_secs(10),
        || admin.metric("sockmesh_terminated_sockets_total") == Some(1.0),
    );
    assert!(
        direct_out.iter().all(|l| l == "u1") && direct_out.len() > 30,
        "a socket sockmesh did not redirect was touched: {direct_out:?}\nagent log:\n{}",
        agent_log()
    );
    // The aborted socket's reverse entry went with it.
    let audit = Audit::agent(&bpffs.0, &admin);
    audit.assert(
        "the endpoint replaced",
        &Expect::services(1, 1).xds(1, 1, 0, 0),
    );
    let tmp = dir.join("resources.tmp");
    fs::write(&tmp, "resources: []\n").expect("write");
    fs::rename(&tmp, &file).expect("rename");
    audit.assert_empty("the configuration emptied");
}
