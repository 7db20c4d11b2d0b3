//! The live-istiod suite's cluster: the Kubernetes node's pods as network
//! namespaces, and sockmesh agents connected to `sockmesh-istiod` as istiod's
//! sidecar node, each with its own cgroup, bpffs directory and admin server.
//!
//! Addresses: every pod, node and API-server address of the fake cluster is an
//! address of one backend namespace (`10.10.0.0/16`), where `smprobe serve`
//! answers on each (address, port) with the pod's name; the client namespace
//! (`10.10.255.1/16`, no other route) holds the node's client pods, whose
//! processes join an agent's cgroup. Service VIPs (`10.96.0.0/16`,
//! `240.240.0.0/16` for ServiceEntries) are routed nowhere: a connection reaches
//! a pod only if the kernel rewrote it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use crate::{
    Admin, Bpffs, Cgroup, NetNs, Proc, TempDir, add_addr, agent_command, command_in,
    istiod::Istiod, kube, run, sockmesh_bin, veth, wait_until,
};

/// The Kubernetes node the agents run on, and another one.
pub const NODE_A: &str = "node-a";
pub const NODE_A_IP: &str = "10.10.0.1";
pub const NODE_B: &str = "node-b";
pub const NODE_B_IP: &str = "10.10.0.2";
/// The agent's namespace and service account, as `deploy/kubernetes/sockmesh.yaml`.
pub const AGENT_NS: &str = "sockmesh-system";
pub const AGENT_SA: &str = "sockmesh";
/// istiod's default cluster id (`constants.DefaultClusterName`).
pub const CLUSTER_ID: &str = "Kubernetes";
/// The Istio release `tests/istiod/go.mod` pins.
pub const ISTIO_VERSION: &str = "1.31.0";

/// The objects every cluster has: the namespaces, two nodes in two zones of one
/// region, and a host-network agent Pod per (name, node) in `agents`, with its
/// node's address, which istiod looks up by the node id's `NAME.NAMESPACE`.
pub fn base_objects(agents: &[(&str, &str)]) -> Vec<String> {
    let mut out = vec![
        kube::namespace("istio-system", &[]),
        kube::namespace("kube-system", &[]),
        kube::namespace("default", &[]),
        kube::namespace(AGENT_NS, &[]),
        kube::node(NODE_A, NODE_A_IP, "region-1", "zone-a"),
        kube::node(NODE_B, NODE_B_IP, "region-1", "zone-b"),
    ];
    for (name, node) in agents {
        let ip = if *node == NODE_A {
            NODE_A_IP
        } else {
            NODE_B_IP
        };
        let mut pod = kube::Pod::new(AGENT_NS, name, ip, node, "sockmesh");
        pod.host_network = true;
        pod.service_account = AGENT_SA;
        out.push(pod.yaml());
    }
    out
}

/// The node's pods: a client namespace and a backend namespace holding every
/// address of the fake cluster, with `smprobe serve` on each (address, port).
pub struct Pods {
    /// Ended first (fields drop in order), then the namespaces go.
    pub server: Proc,
    pub client: NetNs,
    pub backend: NetNs,
    pub probe: PathBuf,
}

impl Pods {
    /// `serving`: (address, port, name); every address gets added once.
    pub fn new(probe: &str, serving: &[(&str, u16, &str)]) -> Self {
        let client = NetNs::new();
        let backend = NetNs::new();
        veth(&client, "10.10.255.1/16", &backend, "10.10.255.254/16");
        let addrs: BTreeSet<&str> = serving.iter().map(|(ip, _, _)| *ip).collect();
        for a in addrs {
            add_addr(&backend, "sm1", &format!("{a}/16"));
        }
        let server = crate::serve(
            &backend,
            probe,
            serving
                .iter()
                .map(|(ip, port, name)| format!("{ip}:{port}={name}")),
        );
        Self {
            server,
            client,
            backend,
            probe: PathBuf::from(probe),
        }
    }

    /// `count` TCP connects to `to` from the client namespace in `agent`'s cgroup,
    /// one after the other: what answered each (a pod's name, or `E<errno>`).
    pub fn connect(&self, agent: &Agent, to: &str, count: u32) -> Vec<String> {
        let mut probe = command_in(&self.client, Some(&agent.cgroup), &self.probe);
        probe.args(["connect", to, &count.to_string()]);
        run(probe)
            .lines()
            .filter_map(|l| l.split(' ').nth(2).map(str::to_owned))
            .collect()
    }

    /// The distinct answers of `count` connects to `to`, sorted.
    pub fn reached(&self, agent: &Agent, to: &str, count: u32) -> Vec<String> {
        let set: BTreeSet<String> = self.connect(agent, to, count).into_iter().collect();
        set.into_iter().collect()
    }

    /// How many of `count` connects to `to` each answer got.
    pub fn tally(&self, agent: &Agent, to: &str, count: u32) -> BTreeMap<String, u32> {
        let mut t = BTreeMap::new();
        for name in self.connect(agent, to, count) {
            *t.entry(name).or_default() += 1;
        }
        t
    }

    /// What `getpeername()` says of a connection to `to`, and who answered:
    /// `ADDRESS:PORT NAME`.
    pub fn peer(&self, agent: &Agent, to: &str) -> String {
        let mut probe = command_in(&self.client, Some(&agent.cgroup), &self.probe);
        probe.args(["peer", to]);
        run(probe).trim().to_owned()
    }
}

/// How an agent connects to istiod.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// `delta` or `sotw`.
    pub protocol: &'static str,
    /// The agent's Pod (in [`AGENT_NS`]).
    pub pod: String,
    pub node: &'static str,
    pub cluster_id: &'static str,
    /// More flags.
    pub extra: Vec<String>,
    /// The `sockmesh` binary (unset: the debug build beside the tests).
    pub bin: Option<PathBuf>,
}

impl AgentSpec {
    /// The agent of node `NODE_A` speaking `protocol`, as the DaemonSet's pod
    /// `sockmesh-<protocol>`.
    pub fn on_node_a(protocol: &'static str) -> Self {
        Self {
            protocol,
            pod: format!("sockmesh-{protocol}"),
            node: NODE_A,
            cluster_id: CLUSTER_ID,
            extra: Vec::new(),
            bin: None,
        }
    }
}

/// `sockmesh agent` following istiod's ADS as its sidecar node.
pub struct Agent {
    pub proc: Proc,
    pub admin: Admin,
    pub bpffs: Bpffs,
    pub cgroup: Cgroup,
    pub dir: TempDir,
    pub spec: AgentSpec,
}

/// The kernel's table as a user reads it back: `vip:port/proto` → the active
/// backends' `address:port`, sorted.
pub type Table = BTreeMap<String, Vec<String>>;

impl Agent {
    /// Starts the agent against `istiod` and waits for its admin server.
    pub fn start(istiod: &Istiod, spec: AgentSpec) -> Self {
        Self::start_with(istiod, spec, |_| {})
    }

    /// As [`Agent::start`], with `adjust` applied to the command last (e.g. a
    /// resolver of the test's own).
    pub fn start_with(
        istiod: &Istiod,
        spec: AgentSpec,
        adjust: impl FnOnce(&mut std::process::Command),
    ) -> Self {
        let dir = TempDir::new("sockmesh-istiod-agent-");
        let cgroup = Cgroup::new();
        let bpffs = Bpffs::new();
        let admin = Admin::in_dir(&dir.0);
        let ip = if spec.node == NODE_A {
            NODE_A_IP
        } else {
            NODE_B_IP
        };
        let bin = spec.bin.clone().unwrap_or_else(sockmesh_bin);
        let mut cmd = agent_command(bin, &cgroup, &bpffs);
        cmd.args(["--xds", &format!("grpc://{}", istiod.ads)])
            .args(["--xds-protocol", spec.protocol])
            .args(["--pod-name", &spec.pod, "--pod-namespace", AGENT_NS])
            .args(["--service-account", AGENT_SA, "--node-name", spec.node])
            .args(["--cluster-id", spec.cluster_id, "--instance-ips", ip])
            .args(["--istio-version", ISTIO_VERSION])
            .args(&spec.extra)
            .args(admin.args())
            // Nothing from the test's own environment (POD_NAME, NODE_NAME, …).
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("NODE_NAME")
            .env_remove("INSTANCE_IPS")
            .env_remove("SERVICE_ACCOUNT")
            .stdout(Stdio::null())
            .stderr(admin.log());
        adjust(&mut cmd);
        let proc = Proc(cmd.spawn().expect("start the agent"));
        let agent = Self {
            proc,
            admin,
            bpffs,
            cgroup,
            dir,
            spec,
        };
        agent.admin.addr();
        agent
    }

    /// The proxy id istiod knows this agent by (`NAME.NAMESPACE`).
    pub fn proxy(&self) -> String {
        format!("{}.{AGENT_NS}", self.spec.pod)
    }

    /// The kernel's table, read from the pinned maps (empty before the first write).
    pub fn table(&self) -> Table {
        let Ok(t) = sockmesh::dataplane::read_table(&self.bpffs.0) else {
            return Table::new();
        };
        t.services
            .iter()
            .map(|(s, svc)| {
                let mut b: Vec<String> = svc
                    .iter()
                    .filter(|b| b.state == sockmesh::model::BackendState::Active)
                    .map(|b| match b.address {
                        IpAddr::V4(a) => format!("{a}:{}", b.port),
                        IpAddr::V6(a) => format!("[{a}]:{}", b.port),
                    })
                    .collect();
                b.sort();
                (s.to_string(), b)
            })
            .collect()
    }

    /// Waits until the kernel's table is exactly `want` (every service, no other).
    pub fn wait_table(&self, what: &str, want: &Table) {
        wait_until(
            &format!("{} ({}): {what}", self.spec.pod, self.spec.protocol),
            Duration::from_secs(30),
            || {
                let got = self.table();
                if &got == want {
                    Ok(())
                } else {
                    Err(diff(&got, want))
                }
            },
        );
    }

    /// One series of the agent's `/metrics` (0 when absent).
    pub fn metric(&self, series: &str) -> f64 {
        self.admin.metric(series).unwrap_or(0.0)
    }

    /// The leak audit ([`crate::audit`]): every pinned map's entries belong to a
    /// service the kernel publishes, the agent's count of each map it writes is
    /// what the map holds, its accepted table is the kernel's, and (no client
    /// running) nothing open holds a reverse entry or a count.
    pub fn audit(&self) {
        crate::audit::Audit::agent(&self.bpffs.0, &self.admin)
            .assert(&self.proxy(), &crate::audit::Expect::default());
    }

    /// Responses of every type the agent rejected (NACKed).
    pub fn rejected(&self) -> f64 {
        ["lds", "cds", "eds", "rds"]
            .iter()
            .map(|t| {
                self.metric(&format!(
                    "sockmesh_xds_updates_total{{type=\"{t}\",result=\"rejected\"}}"
                ))
            })
            .sum()
    }

    /// [`Agent::assert_clean`] while request loops run: what open sockets hold
    /// is not checked.
    pub fn assert_clean_under_traffic(&self) {
        self.assert_synced();
        crate::audit::Audit::agent(&self.bpffs.0, &self.admin).assert(
            &self.proxy(),
            &crate::audit::Expect::default().under_traffic(),
        );
    }

    /// Checks what istiod's output should leave: nothing NACKed, nothing
    /// warming, everything synced; and the maps hold nothing more than the
    /// table ([`Agent::audit`]). Call it when the table has settled.
    pub fn assert_clean(&self) {
        self.assert_synced();
        self.audit();
    }

    fn assert_synced(&self) {
        let dump = self.admin.dump();
        assert_eq!(self.rejected(), 0.0, "NACKs: {}", dump["xds"]);
        assert_eq!(
            dump["warming"],
            serde_json::json!([]),
            "services left warming"
        );
        assert_eq!(dump["synced"], serde_json::json!(true), "{}", dump["xds"]);
    }
}

/// What differs between two tables, for failure messages.
pub fn diff(got: &Table, want: &Table) -> String {
    let mut out = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            None => out.push(format!("missing {k} {v:?}")),
            Some(g) if g != v => out.push(format!("{k}: got {g:?}, want {v:?}")),
            Some(_) => {}
        }
    }
    for (k, v) in got {
        if !want.contains_key(k) {
            out.push(format!("unexpected {k} {v:?}"));
        }
    }
    out.join("; ")
}

/// A [`Table`] from `(vip:port/proto, [address:port])` pairs.
pub fn table(entries: &[(&str, &[&str])]) -> Table {
    entries
        .iter()
        .map(|(k, v)| {
            let mut b: Vec<String> = v.iter().map(|s| (*s).to_owned()).collect();
            b.sort();
            ((*k).to_owned(), b)
        })
        .collect()
}

/// The node's resolver, as the test's own: a DNS server on port 53 of a
/// loopback address of this process's own (`resolv.conf` names no port), and a
/// `resolv.conf` naming it, which an agent sees at `/etc/resolv.conf` in a
/// mount namespace of its own ([`Resolver::for_agent`]), as a pod sees the one
/// the kubelet writes for it. DNS clusters without resolvers of their own
/// (istiod's, for a ServiceEntry with `resolution: DNS`) use the node's.
pub struct Resolver {
    pub dns: crate::dns::DnsServer,
    conf: PathBuf,
    _dir: TempDir,
}

impl Resolver {
    pub fn start(ttl: u32) -> Self {
        let pid = std::process::id();
        let ip = std::net::Ipv4Addr::new(127, 53, (pid >> 8) as u8, pid as u8);
        let dns = crate::dns::DnsServer::start_on(std::net::SocketAddr::from((ip, 53)), ttl);
        let dir = TempDir::new("sockmesh-resolv-");
        let conf = dir.0.join("resolv.conf");
        std::fs::write(
            &conf,
            format!("nameserver {ip}\noptions timeout:1 attempts:2\n"),
        )
        .expect("write resolv.conf");
        Self {
            dns,
            conf,
            _dir: dir,
        }
    }

    /// Runs `cmd` in a mount namespace of its own where `/etc/resolv.conf` is
    /// this resolver's (bind-mounted; the host's mounts are not changed).
    pub fn for_agent(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt as _;
        let c = |s: &std::path::Path| {
            std::ffi::CString::new(s.as_os_str().as_encoded_bytes()).expect("path without NUL")
        };
        let (root, source, target) = (
            c("/".as_ref()),
            c(&self.conf),
            c("/etc/resolv.conf".as_ref()),
        );
        // SAFETY: the closure makes only the unshare(2) and mount(2) system calls,
        // which are async-signal-safe, on strings allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let check = |rc: libc::c_int| {
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))
            });
        }
    }
}

/// A service as the kernel holds it (read back from the pins): `vip:port/proto` →
/// the service, with its policy and health rules.
pub fn kernel_service(agent: &Agent, service: &str) -> Option<sockmesh::model::Service> {
    let t = sockmesh::dataplane::read_table(&agent.bpffs.0).ok()?;
    t.services
        .into_iter()
        .find(|(s, _)| s.to_string() == service)
        .map(|(_, svc)| svc)
}

/// A pod per `(name, address, node)` of `app` in `ns`, and one EndpointSlice of
/// Service `svc` with all of them on `ports` (name, target port).
pub fn pods_and_slice(
    ns: &str,
    svc: &str,
    app: &str,
    pods: &[(&str, &str, &str)],
    ports: &[(&str, u16)],
) -> Vec<String> {
    let mut out: Vec<String> = pods
        .iter()
        .map(|(n, ip, node)| kube::Pod::new(ns, n, ip, node, app).yaml())
        .collect();
    let eps: Vec<kube::Endpoint> = pods
        .iter()
        .map(|(n, ip, node)| kube::Endpoint::pod(ip, n, node))
        .collect();
    out.push(kube::endpoint_slice(
        ns,
        svc,
        &format!("{svc}-1"),
        &eps,
        ports,
    ));
    out
}

/// One request of a [`RequestLoop`]: when it started and ended
/// (`CLOCK_MONOTONIC` ns, as [`crate::monotonic_ns`]) and what answered (a pod's
/// name, or `E<errno>`).
#[derive(Clone, Debug)]
pub struct Request {
    pub start_ns: u64,
    pub end_ns: u64,
    pub answer: String,
}

/// `smprobe rate`: a fixed rate of requests to one address from the client
/// namespace in an agent's cgroup, each on a new connection, until stopped
/// (at most 5 minutes).
pub struct RequestLoop {
    proc: Proc,
    lines: crate::Lines,
    /// Requests read so far.
    seen: Vec<Request>,
}

impl RequestLoop {
    /// Starts the loop and waits for its first answer.
    pub fn start(pods: &Pods, agent: &Agent, to: &str, rps: u32) -> Self {
        let mut cmd = command_in(&pods.client, Some(&agent.cgroup), &pods.probe);
        cmd.args(["rate", to, &rps.to_string(), "300000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("start the request loop");
        let lines = crate::Lines::of(&mut child);
        let proc = Proc(child);
        let first = parse_request(&lines.next("the loop's first request", Duration::from_secs(10)));
        Self {
            proc,
            lines,
            seen: vec![first],
        }
    }

    /// Waits until `count` requests that began at or after `since_ns`
    /// (`CLOCK_MONOTONIC`) have been answered: the loop has run under a state.
    pub fn wait_answers_since(&mut self, since_ns: u64, count: usize) {
        while self.seen.iter().filter(|r| r.start_ns >= since_ns).count() < count {
            let line = self
                .lines
                .next("the loop's next answer", Duration::from_secs(10));
            self.seen.push(parse_request(&line));
        }
    }

    /// Stops the loop (SIGKILL: a request in flight is not reported) and returns
    /// every request it made.
    pub fn stop(self) -> Vec<Request> {
        let Self {
            proc,
            lines,
            mut seen,
        } = self;
        drop(proc);
        seen.extend(lines.rest().iter().map(|l| parse_request(l)));
        seen
    }
}

fn parse_request(line: &str) -> Request {
    let mut f = line.split(' ');
    let mut n = || f.next().unwrap_or_default().to_owned();
    let (start, end, answer) = (n(), n(), n());
    Request {
        start_ns: start.parse().unwrap_or(0),
        end_ns: end.parse().unwrap_or(0),
        answer,
    }
}
