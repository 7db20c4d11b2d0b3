//! `sockmesh agent` against a real ADS server (in this process), both protocols:
//! endpoints reach the kernel, a bad update is NACKed and changes nothing, a
//! control-plane outage keeps the last good table, a reconnect converges, and after
//! SIGTERM the datapath keeps redirecting.

use std::{
    collections::BTreeMap,
    process::Stdio,
    time::{Duration, Instant},
};

use sockmesh_proto::pb::google::protobuf::Any;
use sockmesh_tests::{
    Admin, Bpffs, Cgroup, NetNs, Proc, TempDir, agent_command,
    audit::{Audit, Expect},
    command_in,
    control_plane::ControlPlane,
    pod_network, run, serve, sockmesh_bin, wait_for_backends, wait_until,
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

/// Every response the server sent so far was answered: each nonce comes back in
/// at least one request, and the requests that carry one nonce agree on ACK or NACK.
fn all_answered(cp: &ControlPlane) -> Result<(), String> {
    let mut answers: BTreeMap<String, Vec<bool>> = BTreeMap::new();
    for s in cp.seen() {
        if !s.nonce.is_empty() {
            answers.entry(s.nonce).or_default().push(s.error.is_none());
        }
    }
    for (type_url, nonce) in cp.sent_nonces() {
        match answers.get(&nonce) {
            None => return Err(format!("{type_url} nonce {nonce} never answered")),
            Some(a) if a.iter().any(|x| *x != a[0]) => {
                return Err(format!(
                    "{type_url} nonce {nonce} both ACKed and NACKed: {a:?}"
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
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

    let tmp = TempDir::new("sockmesh-agent-");
    let admin = Admin::in_dir(&tmp.0);
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
        .args(admin.args())
        .stdout(Stdio::null())
        .stderr(admin.log())
        .spawn()
        .expect("start agent");
    let mut agent = Proc(agent);

    wait_for_backends(&bpffs, "initial sync", &["10.10.1.11"]);
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
    let took = wait_for_backends(&bpffs, "EDS update", &["10.10.1.12", "10.10.1.13"]);
    eprintln!(
        "{protocol}: EDS update visible in the pinned maps after {took:?} (includes polling)"
    );
    assert!(reach(60).iter().all(|n| n == "b2" || n == "b3"));

    // A bad update: NACKed with the field named, kernel unchanged. The NACK is the
    // agent's answer to exactly this update (no other update is invalid), and the
    // agent answers only after it has decided, so the kernel is final by then.
    cp.publish(&resources(&eds(&[4], 70000)), false);
    let nack = wait_until("the NACK of port 70000", Duration::from_secs(10), || {
        cp.nacks().first().cloned()
    });
    assert!(
        nack.contains("web.default") && nack.contains("port_value: 70000 is out of range"),
        "{nack}"
    );
    assert_eq!(
        sockmesh_tests::kernel_backends(&bpffs),
        ["10.10.1.12", "10.10.1.13"],
        "a NACKed update reached the kernel"
    );
    assert!(reach(20).iter().all(|n| n == "b2" || n == "b3"));
    wait_until(
        "an answer to every response",
        Duration::from_secs(10),
        || all_answered(&cp),
    );

    // One bad listener among good ones: the good ones are applied (a second VIP
    // for web appears in the kernel), the NACK names exactly the bad one.
    let second = |vip: &str, name: &str| {
        format!(
            "resources:\n- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: {name}\n  address: {{ socket_address: {{ address: {vip}, port_value: 80 }} }}\n  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: web }} }} ] }} ]\n"
        )
    };
    let mut listeners = resources(&second("10.96.0.11", "web2"));
    listeners.extend(resources(&second("not-an-ip", "bad")));
    cp.publish(&listeners, false);
    let nack = wait_until("the NACK of listener bad", Duration::from_secs(10), || {
        cp.nacks().get(1).cloned()
    });
    assert!(
        nack.starts_with("1 resource refused (the others are applied): Listener \"bad\": address.socket_address.address: \"not-an-ip\" is not an IP address"),
        "{nack}"
    );
    let vips = || {
        sockmesh::dataplane::read_table(&bpffs.0)
            .map(|t| {
                t.services
                    .keys()
                    .map(|s| s.vip.to_string())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    wait_until("web2 in the kernel", Duration::from_secs(10), || {
        vips() == ["10.96.0.10", "10.96.0.11"]
    });
    // Both withdrawn: no listener refused any more (the assignment of port 70000
    // stands refused: web.default keeps its last good version until a valid one
    // comes), web alone again.
    cp.remove(
        "type.googleapis.com/envoy.config.listener.v3.Listener",
        &["bad", "web2"],
    );
    wait_until("no listener refused", Duration::from_secs(10), || {
        let refused = admin.dump()["refused"].clone();
        (refused["lds"].is_null() && !refused["eds"]["web.default"].is_null())
            .then_some(())
            .ok_or(refused)
    });
    wait_until("web2 gone", Duration::from_secs(10), || {
        vips() == ["10.96.0.10"]
    });
    // Nothing of web2 or of the refusals is left; the refused assignment keeps
    // its last good version.
    let audit = Audit::agent(&bpffs.0, &admin);
    audit.assert(
        "the listeners withdrawn",
        &Expect::services(1, 2).xds(1, 1, 0, 1),
    );

    // Outage: the control plane goes away; the agent notices and keeps the table.
    let cut = Instant::now();
    cp.disconnect_all();
    drop(stop);
    wait_until(
        "readiness to report the outage",
        Duration::from_secs(10),
        || {
            let (status, body) = admin.get("/readyz");
            (status == 503 && body.contains("degraded: xDS disconnected"))
                .then_some(())
                .ok_or(body)
        },
    );
    assert_eq!(admin.metric("sockmesh_xds_connected"), Some(0.0));
    assert_eq!(
        admin.get("/healthz").0,
        200,
        "liveness must not follow the control plane"
    );
    assert_eq!(
        sockmesh_tests::kernel_backends(&bpffs),
        ["10.10.1.12", "10.10.1.13"],
        "table lost during the outage"
    );
    assert!(reach(10).iter().all(|n| n == "b2" || n == "b3"));

    // Back, on the same address, with a change made meanwhile: converges.
    let outage = cut.elapsed();
    cp.publish(&resources(&eds(&[4], 8080)), false);
    let (_addr2, _stop2) = rt.block_on(cp.serve(addr));
    let back = Instant::now();
    wait_for_backends(&bpffs, "after reconnect", &["10.10.1.14"]);
    eprintln!(
        "{protocol}: outage of {} ms with the table kept; server back → change in the kernel {} ms (reconnect backoff included)",
        outage.as_millis(),
        back.elapsed().as_millis()
    );
    assert_eq!(reach(10), ["b4"]);
    wait_until(
        "/readyz 200 after reconnect",
        Duration::from_secs(10),
        || admin.get("/readyz").0 == 200,
    );
    wait_until(
        "an answer to every response",
        Duration::from_secs(10),
        || all_answered(&cp),
    );
    assert_eq!(
        cp.nacks().len(),
        2,
        "only the bad updates are NACKed: {:?}",
        cp.nacks()
    );
    audit.assert("reconnected", &Expect::services(1, 1).xds(1, 1, 0, 1));

    // SIGTERM: the agent exits cleanly, the datapath stays, and holds the last
    // table and nothing else.
    let status = agent.terminate();
    assert!(status.success(), "agent exit {status}");
    assert_eq!(reach(10), ["b4"], "datapath gone with the agent");
    Audit::kernel(&bpffs.0).assert("the agent gone", &Expect::services(1, 1));
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
    let tmp = TempDir::new("sockmesh-agent-");
    let admin = Admin::in_dir(&tmp.0);
    let agent = agent_command(sockmesh_bin(), &cgroup, &bpffs)
        .args(["--xds", &format!("http://{addr}"), "--xds-refresh", "100ms"])
        .args(admin.args())
        .stdout(Stdio::null())
        .stderr(admin.log())
        .spawn()
        .expect("start agent");
    let _agent = Proc(agent);
    wait_for_backends(&bpffs, "REST initial sync", &["10.10.1.11"]);
    cp.publish(&resources(&eds(&[2, 3], 8080)), false);
    wait_for_backends(&bpffs, "REST EDS update", &["10.10.1.12", "10.10.1.13"]);
    let bad = cp.publish(&resources(&eds(&[4], 70000)), false).to_string();
    let error = wait_until(
        "the rejection of the bad EDS version",
        Duration::from_secs(10),
        || {
            let dump = admin.dump();
            let eds = &dump["xds"]["eds"];
            if eds["rejected_version"].as_str() == Some(bad.as_str()) {
                Ok(eds["last_error"].as_str().unwrap_or_default().to_owned())
            } else {
                Err(eds.clone())
            }
        },
    );
    assert!(
        error.contains("port_value: 70000 is out of range"),
        "{error}"
    );
    assert_eq!(
        sockmesh_tests::kernel_backends(&bpffs),
        ["10.10.1.12", "10.10.1.13"],
        "a rejected response reached the kernel"
    );
    // The poller sent its node and asked for the EDS name the cluster references.
    assert!(cp.seen().iter().any(|s| s.names == ["web.default"]));
    let audit = Audit::agent(&bpffs.0, &admin);
    audit.assert(
        "a bad assignment rejected",
        &Expect::services(1, 2).xds(1, 1, 0, 1),
    );
    cp.remove_all();
    audit.assert_empty("the control plane's mesh removed");
}
