//! `sockmesh agent --xds file://...`: edits reach the kernel in milliseconds; a
//! malformed or invalid file is reported (line / field) and changes nothing.

use std::{
    fs,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use sockmesh_tests::{Bpffs, Cgroup, Proc, TempDir, agent_command, sockmesh_bin};

fn config(backends: &[&str], port: u32) -> String {
    let eps: String = backends
        .iter()
        .map(|a| format!("      - endpoint: {{ address: {{ socket_address: {{ address: {a}, port_value: {port} }} }} }}\n"))
        .collect();
    format!(
        r#"version_info: "x"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: api
  address: {{ socket_address: {{ address: 10.96.0.20, port_value: 443 }} }}
  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: api, cluster: api }} }} ] }} ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: api
  type: STATIC
  load_assignment:
    cluster_name: api
    endpoints:
    - lb_endpoints:
{eps}"#
    )
}

/// Writes like an editor or a ConfigMap update: a new file renamed over the old.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).expect("write");
    fs::rename(&tmp, path).expect("rename");
}

fn backends(bpffs: &Bpffs) -> Vec<String> {
    sockmesh::dataplane::read_table(&bpffs.0)
        .map(|t| {
            t.services
                .values()
                .flatten()
                .map(|b| b.address.to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(bpffs: &Bpffs, want: &[&str]) -> Duration {
    let started = Instant::now();
    while backends(bpffs) != want {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "kernel has {:?}, want {want:?}",
            backends(bpffs)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    started.elapsed()
}

#[test]
fn file_edits_apply_and_bad_files_change_nothing() {
    let tmp = TempDir::new("sockmesh-file-");
    let dir = &tmp.0;
    let file = dir.join("resources.yaml");
    fs::write(&file, config(&["10.10.1.11"], 8080)).expect("write");
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let log_path = dir.join("agent.log");
    let agent = agent_command(sockmesh_bin(), &cgroup, &bpffs)
        .arg("--xds")
        .arg(format!("file://{}", file.display()))
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("agent");
    let _agent = Proc(agent);
    let log = || fs::read_to_string(&log_path).unwrap_or_default();

    wait_for(&bpffs, &["10.10.1.11"]);
    replace(&file, &config(&["10.10.1.12", "10.10.1.13"], 8080));
    let took = wait_for(&bpffs, &["10.10.1.12", "10.10.1.13"]);
    eprintln!("file edit visible in the pinned maps after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    replace(&file, "resources: [\n  { name: \n");
    std::thread::sleep(Duration::from_millis(300));
    assert!(log().contains("line"), "no line number in: {}", log());
    assert_eq!(backends(&bpffs), ["10.10.1.12", "10.10.1.13"]);

    replace(&file, &config(&["10.10.1.14"], 0));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        log().contains("port_value: 0 is out of range"),
        "field not named in: {}",
        log()
    );
    assert_eq!(backends(&bpffs), ["10.10.1.12", "10.10.1.13"]);

    replace(&file, &config(&["10.10.1.14"], 8080));
    wait_for(&bpffs, &["10.10.1.14"]);
}
