//! Fixtures for the privileged tests: each one uniquely named and removed in `Drop`,
//! also when a test fails.

use std::{
    fs,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} failed");
}

/// A network namespace, deleted on drop.
pub struct NetNs(pub String);

impl NetNs {
    #[expect(
        clippy::new_without_default,
        reason = "creating a fixture has side effects"
    )]
    pub fn new() -> Self {
        let name = unique("smt");
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        NetNs(name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Connects `a` (address `a_ip`) and `b` (address `b_ip`) with a veth pair; no
/// default route anywhere.
pub fn veth(a: &NetNs, a_ip: &str, b: &NetNs, b_ip: &str) {
    ip(&[
        "link", "add", "sm0", "netns", &a.0, "type", "veth", "peer", "name", "sm1", "netns", &b.0,
    ]);
    ip(&["-n", &a.0, "addr", "add", a_ip, "dev", "sm0"]);
    ip(&["-n", &b.0, "addr", "add", b_ip, "dev", "sm1"]);
    ip(&["-n", &a.0, "link", "set", "sm0", "up"]);
    ip(&["-n", &b.0, "link", "set", "sm1", "up"]);
}

/// A child cgroup v2 directory, removed on drop.
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    #[expect(
        clippy::new_without_default,
        reason = "creating a fixture has side effects"
    )]
    pub fn new() -> Self {
        let path = PathBuf::from("/sys/fs/cgroup/unified").join(unique("sockmesh-test-"));
        fs::create_dir(&path).expect("create cgroup");
        Cgroup(path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

/// A bpffs directory for one test's pins, uninstalled and removed on drop.
pub struct Bpffs(pub PathBuf);

impl Bpffs {
    #[expect(
        clippy::new_without_default,
        reason = "creating a fixture has side effects"
    )]
    pub fn new() -> Self {
        Bpffs(PathBuf::from("/sys/fs/bpf").join(unique("sockmesh-test-")))
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = sockmesh::dataplane::uninstall(&self.0);
        let _ = fs::remove_dir(&self.0);
    }
}

/// Runs a python3 snippet inside `netns`, optionally inside `cgroup` (joined before
/// entering the namespace, since `ip netns exec` hides the cgroup tree).
pub fn python_in(netns: &NetNs, cgroup: Option<&Cgroup>, code: &str) -> std::process::Output {
    let join = cgroup
        .map(|c| format!("echo $$ > {}/cgroup.procs; ", c.0.display()))
        .unwrap_or_default();
    Command::new("timeout")
        .args([
            "20",
            "sh",
            "-c",
            &format!("{join}exec ip netns exec {} python3 -c \"$0\"", netns.0),
            code,
        ])
        .output()
        .expect("run python3")
}

/// Installs a datapath for `cgroup`, pinned under `bpffs`.
pub fn install(cgroup: &Cgroup, bpffs: &Bpffs) -> sockmesh::dataplane::Datapath {
    sockmesh::dataplane::Datapath::install(&sockmesh::dataplane::DatapathConfig {
        bpffs: bpffs.0.clone(),
        cgroup: cgroup.0.clone(),
        allow_root_cgroup: false,
    })
    .expect("install datapath")
}
