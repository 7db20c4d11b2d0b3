//! Fixtures for the privileged tests: each one uniquely named and removed in `Drop`,
//! also when a test fails.

use std::{
    ffi::OsStr,
    fmt::Debug,
    fs,
    io::{BufRead as _, BufReader, Read},
    os::{fd::AsFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub mod agent;
pub mod audit;
pub mod churn;
pub mod control_plane;
pub mod corpus;
pub mod death;
pub mod dns;
pub mod envoy_lb;
pub mod istiod;
pub mod istiod_bench;
pub mod istiod_build;
pub mod istiod_lab;
pub mod kube;
pub mod kubeapi;
pub mod kubelab;
pub mod kubeproxy;
mod layout_v1;
pub mod load;
pub mod mesh;
pub mod pki;
pub mod probes;
pub mod shares;
pub mod soak;
pub mod zone_death;

pub use agent::{Admin, FileAgent, TempDir, agent_command};
pub use layout_v1::{LAYOUT_V1_COMMIT, layout_v1_bin};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The factor every deadline of the suite is multiplied by: `SOCKMESH_TEST_TIME_SCALE`,
/// which the VM runner sets (an emulated CPU is several times slower), else 1.
/// Deadlines only bound how long a test waits for an event; nothing asserted depends
/// on them.
pub fn time_scale() -> f64 {
    std::env::var("SOCKMESH_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f >= 1.0)
        .unwrap_or(1.0)
}

/// `d` scaled by [`time_scale`].
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(time_scale())
}

/// What a [`wait_until`] condition returns: done (with a value) or not yet (with what
/// it saw, for the failure message).
pub trait Outcome {
    type Value;
    fn into_result(self) -> Result<Self::Value, String>;
}

impl Outcome for bool {
    type Value = ();
    fn into_result(self) -> Result<(), String> {
        if self { Ok(()) } else { Err("false".into()) }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn into_result(self) -> Result<T, String> {
        self.ok_or_else(|| "None".into())
    }
}

/// `Ok` is done, whatever it holds: a condition that reads something fallibly
/// and then decides says so with an `Option` (`.ok().filter(…)`). `Ok(false)`
/// would end the wait at once, so a `Result<bool, _>` condition panics on its
/// first poll instead of passing without waiting.
impl<T, E: Debug> Outcome for Result<T, E> {
    type Value = T;
    fn into_result(self) -> Result<T, String> {
        assert!(
            std::any::type_name::<T>() != "bool",
            "wait_until on Result<bool, _> ends at Ok(false): decide with .ok().filter(…) or `?`"
        );
        self.map_err(|e| format!("{e:?}"))
    }
}

/// Polls `condition` until it is done and returns its value; panics naming `what`
/// and the last thing the condition saw if that takes longer than `timeout` (scaled
/// by [`time_scale`]). The one way this suite waits: for the event a step caused (a
/// version, a counter, a backend in the kernel map), never for a fixed time.
pub fn wait_until<O: Outcome>(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> O,
) -> O::Value {
    let deadline = scaled(timeout);
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match condition().into_result() {
            Ok(v) => return v,
            Err(last) => assert!(
                started.elapsed() < deadline,
                "timed out after {deadline:?} waiting for {what}; last seen: {last}"
            ),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The lines a child writes on stdout, read on a thread as they come: a test can
/// wait for one line (the event it needs) and collect the rest at the end.
pub struct Lines {
    rx: mpsc::Receiver<String>,
    reader: Option<JoinHandle<()>>,
}

impl Lines {
    /// Reads `child`'s piped stdout.
    pub fn of(child: &mut Child) -> Self {
        let stdout = child.stdout.take().expect("stdout piped");
        Self::from_reader(stdout)
    }

    fn from_reader(r: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            reader: Some(reader),
        }
    }

    /// The next line; panics naming `what` if none comes within `timeout` (scaled).
    pub fn next(&self, what: &str, timeout: Duration) -> String {
        let deadline = scaled(timeout);
        self.rx
            .recv_timeout(deadline)
            .unwrap_or_else(|e| panic!("no {what} within {deadline:?}: {e}"))
    }

    /// Every line not taken yet, once the child closed its stdout.
    pub fn rest(mut self) -> Vec<String> {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.rx.try_iter().collect()
    }
}

pub fn ip(args: &[&str]) {
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
    veth_named(a, "sm0", a_ip, b, "sm1", b_ip);
}

/// [`veth`] with chosen device names (for a second link between namespaces).
pub fn veth_named(a: &NetNs, a_if: &str, a_ip: &str, b: &NetNs, b_if: &str, b_ip: &str) {
    ip(&[
        "link", "add", a_if, "netns", &a.0, "type", "veth", "peer", "name", b_if, "netns", &b.0,
    ]);
    ip(&["-n", &a.0, "addr", "add", a_ip, "dev", a_if]);
    ip(&["-n", &b.0, "addr", "add", b_ip, "dev", b_if]);
    ip(&["-n", &a.0, "link", "set", a_if, "up"]);
    ip(&["-n", &b.0, "link", "set", b_if, "up"]);
}

/// A second client namespace for kube-proxy's iptables datapath, linked to `backend`
/// (10.10.2.1 ↔ 10.10.2.11), with the rules `rules` (iptables-restore input)
/// loaded. The VIP range 10.96.0.0/16 and the backends' 10.10.1.0/24 are routed
/// onto the link: the route lookup at connect() happens before the OUTPUT DNAT.
pub fn iptables_client(backend: &NetNs, rules: &str) -> Result<NetNs, String> {
    let ns = NetNs::new();
    veth_named(&ns, "sm2", "10.10.2.1/24", backend, "sm3", "10.10.2.11/24");
    ip(&["-n", &ns.0, "route", "add", "10.96.0.0/16", "dev", "sm2"]);
    ip(&["-n", &ns.0, "route", "add", "10.10.1.0/24", "dev", "sm2"]);
    kubeproxy::run_in(&ns, "iptables-legacy-restore", &[], rules)?;
    Ok(ns)
}

/// A child cgroup v2 directory, removed on drop.
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    #[expect(
        clippy::new_without_default,
        reason = "creating a fixture has side effects"
    )]
    pub fn new() -> Self {
        let root = sockmesh::dataplane::cgroup2_root()
            .expect("no cgroup v2 mount in /proc/self/mountinfo");
        let path = root.join(unique("sockmesh-test-"));
        fs::create_dir(&path).expect("create cgroup");
        Cgroup(path)
    }
}

impl Cgroup {
    /// A child cgroup `name` of this one (removed on drop, before this one must
    /// be: drop it first).
    pub fn child(&self, name: &str) -> Cgroup {
        let path = self.0.join(name);
        fs::create_dir(&path).expect("create child cgroup");
        Cgroup(path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Whatever a failed test left running in its own cgroup (an agent, a traffic
        // generator) is ended first: `cgroup.kill` signals exactly this cgroup's
        // processes. Then the now-empty cgroup is removed.
        let _ = fs::write(self.0.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
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
        let _ = sockmesh::dataplane::uninstall(&self.0, None);
        let _ = fs::remove_dir(&self.0);
    }
}

/// Installs a datapath for `cgroup`, pinned under `bpffs`.
pub fn install(cgroup: &Cgroup, bpffs: &Bpffs) -> sockmesh::dataplane::Datapath {
    sockmesh::dataplane::Datapath::install(&sockmesh::dataplane::DatapathConfig {
        bpffs: bpffs.0.clone(),
        cgroup: cgroup.0.clone(),
        scope: sockmesh::dataplane::AttachScope::Cgroup,
        allow_root_cgroup: false,
        limits: sockmesh::dataplane::Limits::default(),
        envoy_draws: false,
    })
    .expect("install datapath")
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process and namespace on
/// the machine, so the probe's timestamps compare with the test's.
pub fn monotonic_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// A command that runs `program` inside `netns` and, if given, inside `cgroup`. The
/// child joins the cgroup and then the namespace with `setns`, which (unlike `ip
/// netns exec`) does not remount /sys.
pub fn command_in(netns: &NetNs, cgroup: Option<&Cgroup>, program: impl AsRef<OsStr>) -> Command {
    let ns = fs::File::open(format!("/run/netns/{}", netns.0)).expect("open netns");
    let procs = cgroup.map(|c| {
        fs::OpenOptions::new()
            .write(true)
            .open(c.0.join("cgroup.procs"))
            .expect("open cgroup.procs")
    });
    let mut cmd = Command::new(program);
    // SAFETY: the closure only makes the write(2) and setns(2) system calls, which
    // are async-signal-safe, on descriptors opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                nix::unistd::write(procs.as_fd(), b"0")?;
            }
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(())
        });
    }
    cmd
}

/// A child process killed and reaped on drop.
pub struct Proc(pub Child);

impl Proc {
    /// Starts a long-running server and waits (bounded) for its first stdout line,
    /// `ready`; the rest of its output is drained until it exits.
    pub fn server(mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn server");
        let lines = Lines::of(&mut child);
        let proc = Proc(child);
        let first = lines.next("server readiness (\"ready\")", Duration::from_secs(10));
        assert_eq!(first.trim(), "ready", "server did not start");
        // The reader thread keeps draining (so the server never blocks on a full
        // pipe) and ends with the server.
        drop(lines);
        proc
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).expect("pid fits"))
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        self.0.wait().expect("reap")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a command to completion (bounded by `timeout`) and returns its stdout;
/// panics with its stderr if it fails.
pub fn run(mut cmd: Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `sockmesh` binary built next to the test binaries (`cargo xtask test` builds
/// it; by hand: `cargo build -p sockmesh`).
pub fn sockmesh_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("sockmesh");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p sockmesh` first (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// The `sockmesh` binary in `dir` (benchmarks and the demo use the release build).
pub fn sockmesh_bin_in(dir: &std::path::Path) -> PathBuf {
    dir.join("sockmesh")
}

/// Adds an address to a device inside a namespace.
pub fn add_addr(netns: &NetNs, dev: &str, cidr: &str) {
    let mut args = vec!["-n", &netns.0, "addr", "add", cidr, "dev", dev];
    if cidr.contains(':') {
        args.push("nodad");
    }
    ip(&args);
}

/// Starts nginx (Debian's) inside `netns`, one `server` per (address, port, body),
/// answering every request with 200 and `body`. Single process (`master_process
/// off`), so killing it by PID stops everything. Files live in `dir`.
pub fn nginx(
    netns: &NetNs,
    dir: &std::path::Path,
    servers: &[(std::net::IpAddr, u16, String)],
) -> Proc {
    use std::fmt::Write as _;
    let mut conf = format!(
        "daemon off;\nmaster_process off;\nworker_rlimit_nofile 65536;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  keepalive_timeout 0;\n",
        d = dir.display()
    );
    for (ip, port, body) in servers {
        let listen = match ip {
            std::net::IpAddr::V4(v4) => format!("{v4}:{port}"),
            std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        };
        let _ = writeln!(
            conf,
            "  server {{ listen {listen} backlog=4096; location / {{ return 200 \"{body}\"; }} }}"
        );
    }
    conf.push_str("}\n");
    let path = dir.join("nginx.conf");
    fs::write(&path, conf).expect("write nginx.conf");
    let mut cmd = command_in(netns, None, "nginx");
    cmd.arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("error.log"));
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx (apt-get install nginx-light)");
    let proc = Proc(child);
    let ports: Vec<u16> = servers.iter().map(|(_, port, _)| *port).collect();
    wait_until("nginx to listen", Duration::from_secs(10), || {
        let listening = listening_ports(proc.0.id());
        if ports.iter().all(|p| listening.contains(p)) {
            Ok(())
        } else {
            Err(format!("listening on {listening:?}, want {ports:?}"))
        }
    });
    proc
}

/// TCP ports in LISTEN state in the network namespace of process `pid` (its
/// `/proc/PID/net/tcp` and `tcp6` show that namespace's sockets).
pub fn listening_ports(pid: u32) -> Vec<u16> {
    const TCP_LISTEN: &str = "0A";
    let mut ports = Vec::new();
    for file in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let mut f = line.split_whitespace();
            let local = f.nth(1);
            let state = f.nth(1);
            if state == Some(TCP_LISTEN)
                && let Some(port) = local
                    .and_then(|l| l.rsplit_once(':'))
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Links `client` (10.10.1.1) to `backend` over veth and gives `backend` the pod
/// addresses 10.10.1.11, .12, … (`pods` of them); returns those addresses.
pub fn pod_network(client: &NetNs, backend: &NetNs, pods: u8) -> Vec<std::net::IpAddr> {
    veth(client, "10.10.1.1/24", backend, "10.10.1.11/24");
    let addrs: Vec<std::net::IpAddr> = (1..=pods)
        .map(|i| std::net::IpAddr::from([10, 10, 1, 10 + i]))
        .collect();
    for a in addrs.iter().skip(1) {
        add_addr(backend, "sm1", &format!("{a}/24"));
    }
    addrs
}

/// Client pod `i`: a namespace of its own linked to `backend` (10.12.`i`.1 ↔
/// 10.12.`i`.2, devices `smc<i>` / `smb<i>`), with the pods' subnet of
/// [`pod_network`] (10.10.1.0/24) routed over the link and no other route.
pub fn client_pod(backend: &NetNs, i: u8) -> NetNs {
    let ns = NetNs::new();
    let dev = format!("smc{i}");
    veth_named(
        &ns,
        &dev,
        &format!("10.12.{i}.1/24"),
        backend,
        &format!("smb{i}"),
        &format!("10.12.{i}.2/24"),
    );
    ip(&["-n", &ns.0, "route", "add", "10.10.1.0/24", "dev", &dev]);
    ns
}

/// Two pods behind one client: namespaces linked by [`pod_network`] (client
/// 10.10.1.1; pods 10.10.1.11 and .12), each pod serving TCP port 8080 with
/// `smprobe serve`, answering its name (`names`).
pub struct TwoPods {
    /// Ended first (fields drop in order), then the namespaces go.
    pub server: Proc,
    pub client: NetNs,
    pub backend: NetNs,
}

impl TwoPods {
    pub fn serving(probe: impl AsRef<OsStr>, names: [&str; 2]) -> Self {
        let client = NetNs::new();
        let backend = NetNs::new();
        pod_network(&client, &backend, 2);
        let server = serve(
            &backend,
            probe,
            [
                format!("10.10.1.11:8080={}", names[0]),
                format!("10.10.1.12:8080={}", names[1]),
            ],
        );
        Self {
            server,
            client,
            backend,
        }
    }
}

/// A client namespace and a backend namespace linked by [`pod_network`] (`pods`
/// addresses 10.10.1.11, .12, …), the first `served` of them serving TCP 8080
/// with `smprobe serve` (names `b1`, `b2`, …; the others refuse connections),
/// and a datapath installed on a fresh cgroup and bpffs directory. Fields drop in
/// order: datapath, pins, server, cgroup, namespaces.
pub struct PodLab {
    /// `None` only while a test restarts it.
    pub dp: Option<sockmesh::dataplane::Datapath>,
    pub bpffs: Bpffs,
    pub server: Proc,
    pub cgroup: Cgroup,
    pub client: NetNs,
    pub backend: NetNs,
}

impl PodLab {
    pub fn new(probe: impl AsRef<OsStr>, pods: u8, served: usize) -> Self {
        let client = NetNs::new();
        let backend = NetNs::new();
        let addrs = pod_network(&client, &backend, pods);
        let server = serve(
            &backend,
            probe,
            addrs
                .iter()
                .take(served)
                .zip(1..)
                .map(|(ip, i)| format!("{ip}:8080=b{i}")),
        );
        let cgroup = Cgroup::new();
        let bpffs = Bpffs::new();
        let dp = install(&cgroup, &bpffs);
        Self {
            dp: Some(dp),
            bpffs,
            server,
            cgroup,
            client,
            backend,
        }
    }

    /// The datapath.
    pub fn dp(&mut self) -> &mut sockmesh::dataplane::Datapath {
        self.dp.as_mut().expect("datapath installed")
    }

    /// The leak audit of the lab's pins.
    pub fn audit(&self) -> audit::Audit<'_> {
        audit::Audit::kernel(&self.bpffs.0)
    }

    /// Ends a scenario: the maps hold what `expect` says, and once every service
    /// is removed, nothing.
    pub fn finish(&mut self, expect: &audit::Expect) {
        self.audit().assert("the end of the scenario", expect);
        self.dp()
            .apply(&sockmesh::model::RoutingTable::default())
            .expect("remove every service");
        self.audit().assert_empty("every service removed");
    }

    /// `program` in the client namespace and the cgroup.
    pub fn client_command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(&self.client, Some(&self.cgroup), program)
    }

    /// The service address the lab's tests balance: 10.96.0.10:80/TCP.
    pub fn service() -> sockmesh::model::ServiceAddr {
        sockmesh::model::ServiceAddr {
            vip: std::net::IpAddr::from([10, 96, 0, 10]),
            port: 80,
            protocol: sockmesh::model::Protocol::Tcp,
        }
    }

    /// Pod `i`'s backend (1-based): 10.10.1.(10 + i):8080.
    pub fn pod(i: u8) -> sockmesh::model::Backend {
        sockmesh::model::Backend::new(std::net::IpAddr::from([10, 10, 1, 10 + i]), 8080)
    }
}

/// Runs `probe serve SPEC…` (see smprobe) inside `netns` until dropped, once it
/// listens.
pub fn serve(
    netns: &NetNs,
    probe: impl AsRef<OsStr>,
    specs: impl IntoIterator<Item = String>,
) -> Proc {
    let mut cmd = command_in(netns, None, probe);
    cmd.arg("serve").args(specs);
    Proc::server(cmd)
}

/// The addresses of every backend (active or draining) of every service in the
/// maps pinned under `bpffs`, as the kernel holds them (empty if nothing is pinned).
pub fn kernel_backends(bpffs: &Bpffs) -> Vec<String> {
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

/// Waits until the pinned maps hold exactly the backends `want` (see
/// [`kernel_backends`]); returns how long that took.
pub fn wait_for_backends(bpffs: &Bpffs, what: &str, want: &[&str]) -> Duration {
    let started = Instant::now();
    wait_until(what, Duration::from_secs(15), || {
        let got = kernel_backends(bpffs);
        if got == want {
            Ok(())
        } else {
            Err(format!("kernel has {got:?}, want {want:?}"))
        }
    });
    started.elapsed()
}

/// A holder of `count` connections to `vip` from `client` in `cgroup`: their
/// backends' names, and the process (closing its stdin makes it close them and
/// exit).
pub fn hold(
    probe: impl AsRef<OsStr>,
    client: &NetNs,
    cgroup: &Cgroup,
    vip: &str,
    count: u32,
) -> (std::collections::BTreeMap<String, u64>, std::process::Child) {
    let mut cmd = command_in(client, Some(cgroup), probe);
    cmd.args(["hold", vip, &count.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn holder");
    let lines = Lines::of(&mut child);
    let mut reached: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    loop {
        let line = lines.next("a held connection", scaled(Duration::from_secs(20)));
        let line = line.trim();
        if line == "held" {
            break;
        }
        *reached.entry(line.to_owned()).or_default() += 1;
    }
    (reached, child)
}

pub fn release(mut holder: std::process::Child) {
    if let Some(mut stdin) = holder.stdin.take() {
        let _ = std::io::Write::write_all(&mut stdin, b"\n");
    }
    let status = holder.wait().expect("holder exits");
    assert!(status.success(), "holder failed: {status}");
}
