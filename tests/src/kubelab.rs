//! A node for the enrollment tests: the test Kubernetes API server
//! ([`crate::kubeapi`]) with a CA and a token made here, a kubelet's pod cgroup
//! tree under the test's own cgroup (either driver's shape), pins of its own, and
//! `sockmesh agent --kubernetes` over a file source of one service. The cgroup
//! names below are written from the kubelet's naming, apart from the agent's
//! code that computes them.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{
    Admin, Bpffs, Cgroup, Proc, TempDir,
    kubeapi::{Kind, KubeApi},
    pki::TestCa,
    sockmesh_bin, wait_until,
};

/// The node the agent serves.
pub const NODE: &str = "node-a";
/// The service: 10.96.0.10:80/TCP → pods 10.10.1.11:8080 and 10.10.1.12:8080.
pub const VIP: &str = "10.96.0.10:80";

/// The kubelet's cgroup driver, which shapes the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice`
    Systemd,
    /// `kubepods/besteffort/pod<uid>`
    Cgroupfs,
}

/// The lab. Fields drop in order: the API server, then the pins, then the
/// cgroups from the QoS directory up (pod cgroups the test made must be dropped
/// before: declare them after the lab).
pub struct KubeLab {
    pub api: KubeApi,
    pub dir: TempDir,
    pub bpffs: Bpffs,
    pub driver: Driver,
    /// The BestEffort class's directory, where the pods' cgroups go.
    pub qos: Cgroup,
    /// `--cgroup`: kubepods.slice or kubepods.
    pub pods_root: Cgroup,
    pub root: Cgroup,
}

const TOKEN: &str = "sockmesh-test-kube-token";

/// The one service, as the file source reads it.
fn resources() -> String {
    let eps: String = ["10.10.1.11", "10.10.1.12"]
        .iter()
        .map(|a| format!("      - endpoint: {{ address: {{ socket_address: {{ address: {a}, port_value: 8080 }} }} }}\n"))
        .collect();
    format!(
        r#"version_info: "1"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: web
  address: {{ socket_address: {{ address: 10.96.0.10, port_value: 80 }} }}
  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: web, cluster: web }} }} ] }} ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  type: STATIC
  load_assignment:
    cluster_name: web
    endpoints:
    - lb_endpoints:
{eps}"#
    )
}

impl KubeLab {
    pub fn new(driver: Driver) -> Self {
        let root = Cgroup::new();
        let (pods, qos) = match driver {
            Driver::Systemd => ("kubepods.slice", "kubepods-besteffort.slice"),
            Driver::Cgroupfs => ("kubepods", "besteffort"),
        };
        let pods_root = root.child(pods);
        let qos = pods_root.child(qos);
        let dir = TempDir::new("sockmesh-kube-");
        let ca = TestCa::new("test kubernetes CA");
        fs::write(dir.0.join("ca.pem"), ca.pem()).expect("CA");
        fs::write(dir.0.join("token"), TOKEN).expect("token");
        fs::write(dir.0.join("resources.yaml"), resources()).expect("resources");
        let api = KubeApi::start(&ca, TOKEN);
        Self {
            api,
            dir,
            bpffs: Bpffs::new(),
            driver,
            qos,
            pods_root,
            root,
        }
    }

    /// The cgroup the kubelet makes for a BestEffort pod with `uid`.
    pub fn pod_cgroup(&self, uid: &str) -> Cgroup {
        self.qos.child(&self.pod_cgroup_name(uid))
    }

    pub fn pod_cgroup_name(&self, uid: &str) -> String {
        match self.driver {
            Driver::Systemd => format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")),
            Driver::Cgroupfs => format!("pod{uid}"),
        }
    }

    /// The leak audit of the lab's pins and the agent at `admin`.
    pub fn audit<'a>(&'a self, admin: &'a Admin) -> crate::audit::Audit<'a> {
        crate::audit::Audit::agent(&self.bpffs.0, admin)
    }

    /// Ends a scenario while the agent at `admin` runs: the maps hold the one
    /// service and the links of `link_cgroups` pods; once the agent's file is
    /// emptied, nothing but those links.
    pub fn finish(&self, admin: &Admin, link_cgroups: usize) {
        use crate::audit::Expect;
        let audit = self.audit(admin);
        audit.assert(
            "the end of the scenario",
            &Expect::services(1, 2)
                .xds(1, 1, 0, 0)
                .link_cgroups(link_cgroups),
        );
        let file = self.dir.0.join("resources.yaml");
        let tmp = file.with_extension("tmp");
        fs::write(&tmp, "resources: []\n").expect("write");
        fs::rename(&tmp, &file).expect("rename");
        audit.assert(
            "the end, with the configuration emptied",
            &Expect::empty().link_cgroups(link_cgroups),
        );
    }

    /// Starts `sockmesh agent --kubernetes` for this node.
    pub fn agent(&self) -> (Proc, Admin) {
        let admin = Admin::in_dir(&self.dir.0);
        let child = Command::new(sockmesh_bin())
            .arg("agent")
            .arg("--cgroup")
            .arg(&self.pods_root.0)
            .arg("--bpffs")
            .arg(&self.bpffs.0)
            .arg("--xds")
            .arg(format!(
                "file://{}",
                self.dir.0.join("resources.yaml").display()
            ))
            .args(["--kubernetes", "--kube-api", &self.api.url()])
            .arg("--kube-ca")
            .arg(self.dir.0.join("ca.pem"))
            .arg("--kube-token-file")
            .arg(self.dir.0.join("token"))
            .args(["--node-name", NODE, "--pod-namespace", "sockmesh-system"])
            .args(admin.args())
            .stdout(Stdio::null())
            .stderr(admin.log())
            .spawn()
            .expect("agent");
        (Proc(child), admin)
    }

    /// The cgroup ids with links pinned (the agent's `links/cg<ID>` directories).
    pub fn pinned_cgroups(&self) -> Vec<u64> {
        let links = self
            .bpffs
            .0
            .join(format!("v{}/links", sockmesh_common::LAYOUT_VERSION));
        let mut ids: Vec<u64> = fs::read_dir(links)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.strip_prefix("cg")?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    /// Every cgroup of the lab (root, pods root, QoS) and `pods`, with the sockmesh
    /// programs the kernel has attached to each.
    pub fn attached(&self, pods: &[&Cgroup]) -> Vec<(PathBuf, Vec<String>)> {
        [&self.root, &self.pods_root, &self.qos]
            .into_iter()
            .chain(pods.iter().copied())
            .map(|c| {
                let progs = sockmesh::dataplane::attached_programs(&c.0).expect("query");
                (c.0.clone(), progs)
            })
            .collect()
    }
}

/// A cgroup's id (its inode on cgroup2).
pub fn cgroup_id(c: &Cgroup) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&fs::metadata(&c.0).expect("stat cgroup"))
}

/// `/config_dump`'s enrollment section.
pub fn enrollment(admin: &Admin) -> Value {
    admin.dump()["enrollment"].clone()
}

/// Waits until the agent at `admin` is ready: its file's table is in the kernel.
pub fn wait_ready(admin: &Admin) {
    wait_until(
        "the agent ready (/readyz 200)",
        Duration::from_secs(20),
        || {
            let (code, body) = admin.get("/readyz");
            if code == 200 {
                Ok(())
            } else {
                Err(format!("{code} {body}"))
            }
        },
    )
}

/// Waits until pod `ns/name` is enrolled with its programs attached; returns its
/// entry.
pub fn wait_attached(admin: &Admin, pod: &str) -> Value {
    wait_until(
        &format!("pod {pod} enrolled and attached"),
        Duration::from_secs(20),
        || {
            let e = enrollment(admin);
            let p = e["enrolled"][pod].clone();
            if p["state"] == "attached" {
                Ok(p)
            } else {
                Err(format!("enrollment: {e}"))
            }
        },
    )
}

/// Waits until pod `ns/name` is skipped for `reason`.
pub fn wait_skipped(admin: &Admin, pod: &str, reason: &str) {
    wait_until(
        &format!("pod {pod} skipped ({reason})"),
        Duration::from_secs(20),
        || {
            let e = enrollment(admin);
            if e["skipped"][pod] == reason && e["enrolled"].get(pod).is_none() {
                Ok(())
            } else {
                Err(format!("enrollment: {e}"))
            }
        },
    )
}

/// Puts a pod of this node (BestEffort, Running) in namespace `ns`.
pub fn put_pod(
    api: &KubeApi,
    ns: &str,
    name: &str,
    uid: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
) -> u64 {
    api.put(
        Kind::Pod,
        crate::kubeapi::pod(ns, name, uid, NODE, labels, annotations, false),
    )
}
