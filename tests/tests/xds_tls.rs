//! The agent against a control plane secured as istiod's port 15012 is: TLS with a
//! certificate of a CA made here, and a bearer token on every stream. It syncs with
//! the node identity istiod reads; a token the server refuses, an expired token, an
//! unknown CA and a certificate for another name are each counted under their
//! reason while the kernel keeps serving; a token rotated in its file is used on
//! the next connection without a restart; a plaintext control plane is refused
//! unless allowed.

use std::{
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sockmesh_proto::pb::google::protobuf::{Any, value::Kind};
use sockmesh_tests::{
    Admin, Bpffs, Cgroup, NetNs, Proc, TempDir, agent_command,
    audit::{Audit, Expect},
    command_in,
    control_plane::ControlPlane,
    mesh,
    pki::{TestCa, service_account_jwt},
    pod_network, run, serve, sockmesh_bin, wait_for_backends, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");
const ISTIOD: &str = "istiod.istio-system.svc";

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("IP")
}

fn eds(pod: u8) -> Vec<(String, Any)> {
    vec![mesh::assignment(
        "web",
        &[(ip(&format!("10.10.1.{}", 10 + pod)), 8080)],
    )]
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A token for the agent's identity, valid for an hour.
fn token() -> String {
    service_account_jwt("istio-ca", now() + 3600, "sockmesh-system", "sockmesh")
}

/// Writes `text` as the kubelet updates a projected volume: a new file renamed over.
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// `sockmesh agent` over grpcs:// with the DaemonSet's identity; plaintext not
/// allowed.
fn secured_agent(
    cgroup: &Cgroup,
    bpffs: &Bpffs,
    admin: &Admin,
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    server_name: &str,
    token: &std::path::Path,
) -> Proc {
    let mut cmd = agent_command(sockmesh_bin(), cgroup, bpffs);
    cmd.env_remove("SOCKMESH_ALLOW_PLAINTEXT_XDS")
        .args(["--xds", &format!("grpcs://{addr}")])
        .arg("--xds-ca")
        .arg(ca)
        .args(["--xds-server-name", server_name])
        .arg("--xds-token-file")
        .arg(token)
        .args([
            "--pod-name",
            "sockmesh-x7k2p",
            "--pod-namespace",
            "sockmesh-system",
        ])
        .args(["--service-account", "sockmesh", "--node-name", "node-a"])
        .args(["--instance-ips", "10.10.1.1"])
        .args(admin.args())
        .stdout(Stdio::null())
        .stderr(admin.log());
    Proc(cmd.spawn().expect("start agent"))
}

fn failures(admin: &Admin, reason: &str) -> f64 {
    admin
        .metric(&format!(
            "sockmesh_xds_auth_failures_total{{reason=\"{reason}\"}}"
        ))
        .unwrap_or(0.0)
}

#[test]
fn agent_syncs_over_tls_with_a_rotating_token_and_names_each_refusal() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = NetNs::new();
    let backend = NetNs::new();
    let pods = pod_network(&client, &backend, 2);
    let _server = serve(
        &backend,
        PROBE,
        pods.iter()
            .zip(1..)
            .map(|(ip, i)| format!("{ip}:8080=b{i}")),
    );
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let tmp = TempDir::new("sockmesh-tls-");

    let ca = TestCa::new("mesh root");
    let (cert, key) = ca.server(ISTIOD);
    let ca_file = tmp.0.join("root-cert.pem");
    std::fs::write(&ca_file, ca.pem()).expect("CA file");
    let token_file = tmp.0.join("istio-token");
    let first = token();
    write_atomically(&token_file, &first);

    let cp = ControlPlane::new();
    cp.require_token(&first);
    let (addr, _stop) =
        rt.block_on(cp.serve_tls("127.0.0.1:0".parse().expect("addr"), &cert, &key));
    let mut initial = vec![
        mesh::tcp_listener("web", ip("10.96.0.10"), 80, "web"),
        mesh::eds_cluster("web"),
    ];
    initial.extend(eds(1));
    cp.publish(&initial, true);

    let admin = Admin::in_dir(&tmp.0);
    let mut agent = secured_agent(&cgroup, &bpffs, &admin, addr, &ca_file, ISTIOD, &token_file);
    wait_for_backends(&bpffs, "the initial sync over TLS", &["10.10.1.11"]);
    let reach = || {
        let mut probe = command_in(&client, Some(&cgroup), PROBE);
        probe.args(["connect", "10.96.0.10:80", "5"]);
        let out = run(probe);
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| l.split(' ').nth(2))
            .map(str::to_owned)
            .collect();
        names.dedup();
        names
    };
    assert_eq!(reach(), ["b1"]);

    // What the server saw: the token and cluster id on the stream, and the node
    // metadata istiod filters endpoints by.
    let opened = cp.opened();
    assert_eq!(
        opened[0].authorization.as_deref(),
        Some(format!("Bearer {first}").as_str())
    );
    assert_eq!(opened[0].cluster_id.as_deref(), Some("Kubernetes"));
    let node = cp
        .seen()
        .into_iter()
        .find_map(|s| s.node)
        .expect("a request with the node");
    assert_eq!(
        node.id,
        "sidecar~10.10.1.1~sockmesh-x7k2p.sockmesh-system~sockmesh-system.svc.cluster.local"
    );
    let meta = node.metadata.expect("metadata").fields;
    let text = |k: &str| match meta.get(k).and_then(|v| v.kind.clone()) {
        Some(Kind::StringValue(s)) => s,
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(text("CLUSTER_ID"), "Kubernetes");
    assert_eq!(text("NODE_NAME"), "node-a");
    assert_eq!(text("NAMESPACE"), "sockmesh-system");
    assert_eq!(text("SERVICE_ACCOUNT"), "sockmesh");
    assert_eq!(text("DISABLE_HBONE_SEND"), "true");
    let dump = admin.dump();
    assert_eq!(dump["connection"]["transport"], "tls", "{dump:#}");
    assert_eq!(dump["connection"]["node"]["id"], node.id.as_str());

    // The server stops accepting the token (istiod: a token review that fails):
    // refused, counted, and the kernel keeps the table.
    let second = token();
    cp.require_token(&second);
    cp.disconnect_all();
    wait_until("a counted refusal", Duration::from_secs(20), || {
        (failures(&admin, "unauthenticated") >= 1.0).then_some(())
    });
    let last = admin.dump()["connection"]["auth_last_error"].clone();
    assert!(
        last.as_str()
            .is_some_and(|e| e.contains("the token is not the one this test accepts")),
        "{last}"
    );
    assert_eq!(
        reach(),
        ["b1"],
        "the table must outlive a refused connection"
    );

    // The kubelet rotates the token: the next connection presents it, the agent
    // syncs a change made meanwhile, and it is the same process.
    cp.publish(&eds(2), false);
    write_atomically(&token_file, &second);
    wait_for_backends(&bpffs, "the sync with the rotated token", &["10.10.1.12"]);
    assert!(
        cp.opened()
            .iter()
            .any(|o| !o.refused && o.authorization.as_deref() == Some(&format!("Bearer {second}"))),
        "the rotated token was not presented"
    );
    assert_eq!(
        agent.0.try_wait().expect("wait"),
        None,
        "the agent restarted"
    );
    assert_eq!(reach(), ["b2"]);

    // An expired token: the refusal is explained by the token's own claims.
    let expired = service_account_jwt("istio-ca", now() - 60, "sockmesh-system", "sockmesh");
    write_atomically(&token_file, &expired);
    cp.disconnect_all();
    wait_until(
        "a refusal of the expired token",
        Duration::from_secs(40),
        || (failures(&admin, "token_expired") >= 1.0).then_some(()),
    );
    assert_eq!(reach(), ["b2"]);
    Audit::agent(&bpffs.0, &admin).assert(
        "refused with the table kept",
        &Expect::services(1, 1).xds(1, 1, 0, 1),
    );
    assert!(agent.terminate().success());

    // A root that did not sign the server's certificate, and a certificate for
    // another name: each refused under its reason, before any stream.
    for (ca_pem, name, reason) in [
        (TestCa::new("another root").pem(), ISTIOD, "unknown_ca"),
        (ca.pem(), "istiod.other-namespace.svc", "name_mismatch"),
    ] {
        let other = tmp.0.join(format!("{reason}.pem"));
        std::fs::write(&other, ca_pem).expect("CA file");
        write_atomically(&token_file, &second);
        let admin = Admin::in_dir(&tmp.0);
        let opened = cp.opened().len();
        let mut agent = secured_agent(&cgroup, &bpffs, &admin, addr, &other, name, &token_file);
        wait_until(reason, Duration::from_secs(20), || {
            (failures(&admin, reason) >= 1.0).then_some(())
        });
        assert_eq!(cp.opened().len(), opened, "{reason}: a stream was opened");
        assert_eq!(
            reach(),
            ["b2"],
            "{reason}: the pinned table must keep serving"
        );
        assert!(agent.terminate().success());
    }

    // Without --allow-plaintext-xds, grpc:// is refused at start.
    let out = agent_command(sockmesh_bin(), &cgroup, &bpffs)
        .env_remove("SOCKMESH_ALLOW_PLAINTEXT_XDS")
        .args(["--xds", &format!("grpc://{addr}"), "--admin", "off"])
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--allow-plaintext-xds"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Agents that never synced leave the last table as it was, and nothing else.
    Audit::kernel(&bpffs.0).assert("every agent gone", &Expect::services(1, 1));
}
