//! Command-line interface.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tracing::info;

use crate::{
    agent::{AgentConfig, NodeArgs, Source},
    dataplane::{self, Datapath, DatapathConfig},
    model::{RoutingTable, ServiceJson},
    xds::ads::{TlsFiles, XdsProtocol},
};

/// sockmesh: eBPF socket-level service load balancing for a service mesh.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SOCKMESH_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Commands,
}

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the datapath is pinned and which cgroup it serves.
#[derive(Debug, clap::Args)]
pub struct DatapathArgs {
    /// cgroup v2 directory whose processes get socket-level load balancing.
    #[arg(long, env = "SOCKMESH_CGROUP")]
    pub cgroup: PathBuf,
    /// Directory on bpffs for the pinned maps and links (created; bpffs is mounted
    /// at /sys/fs/bpf if needed).
    #[arg(long, env = "SOCKMESH_BPFFS", default_value = "/sys/fs/bpf/sockmesh")]
    pub bpffs: PathBuf,
    /// Allow attaching to the root of the cgroup hierarchy (every process on the node).
    #[arg(long, env = "SOCKMESH_ALLOW_ROOT_CGROUP")]
    pub allow_root_cgroup: bool,
    /// Capacity of the service map (at install; pinned maps keep theirs).
    #[arg(long, env = "SOCKMESH_MAX_SERVICES", default_value_t = sockmesh_common::MAX_SERVICES)]
    pub max_services: u32,
    /// Capacity of the backend map, all services together.
    #[arg(long, env = "SOCKMESH_MAX_BACKENDS", default_value_t = sockmesh_common::MAX_BACKENDS_TOTAL)]
    pub max_backends: u32,
    /// Capacity of the slot map, all services together.
    #[arg(long, env = "SOCKMESH_MAX_SLOTS", default_value_t = sockmesh_common::MAX_SLOTS_TOTAL)]
    pub max_slots: u32,
}

impl DatapathArgs {
    fn config(&self) -> DatapathConfig {
        DatapathConfig {
            bpffs: self.bpffs.clone(),
            cgroup: self.cgroup.clone(),
            allow_root_cgroup: self.allow_root_cgroup,
            limits: crate::dataplane::Limits {
                services: self.max_services,
                backends: self.max_backends,
                slots: self.max_slots,
            },
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run the agent: follow an xDS source and keep the kernel maps in sync with it
    /// until SIGTERM/SIGINT (the datapath stays pinned after exit).
    Agent(Box<AgentArgs>),
    /// Install (or adopt) the datapath and apply a static routing table from a JSON
    /// file (the format `sockmesh services --json` prints).
    Apply {
        #[command(flatten)]
        datapath: DatapathArgs,
        /// JSON file: an array of {"vip","port","protocol","backends":[{"address","port","weight"}]}.
        #[arg(long)]
        table: PathBuf,
        /// Stay running until SIGINT/SIGTERM (the datapath stays pinned either way).
        #[arg(long)]
        wait: bool,
    },
    /// Print the routing table read back from the pinned maps (no agent needed).
    Services {
        /// Directory on bpffs the datapath is pinned under.
        #[arg(long, env = "SOCKMESH_BPFFS", default_value = "/sys/fs/bpf/sockmesh")]
        bpffs: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the kernel datapath counters (summed over CPUs).
    Stats {
        /// Directory on bpffs the datapath is pinned under.
        #[arg(long, env = "SOCKMESH_BPFFS", default_value = "/sys/fs/bpf/sockmesh")]
        bpffs: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Agent, xDS and datapath summary: asks the agent's admin server and reads the
    /// pins (works without an agent too).
    Status {
        /// Directory on bpffs the datapath is pinned under.
        #[arg(long, env = "SOCKMESH_BPFFS", default_value = "/sys/fs/bpf/sockmesh")]
        bpffs: PathBuf,
        /// The agent's admin address.
        #[arg(long, env = "SOCKMESH_ADMIN", default_value = "127.0.0.1:15200")]
        admin: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Detach the programs and remove every pin of the datapath (every layout
    /// version pinned under --bpffs).
    Uninstall {
        /// Directory on bpffs the datapath is pinned under.
        #[arg(long, env = "SOCKMESH_BPFFS", default_value = "/sys/fs/bpf/sockmesh")]
        bpffs: PathBuf,
        /// The cgroup the datapath was attached to: refuse if the pins under --bpffs
        /// serve another cgroup, and check afterwards that no sockmesh program is
        /// left attached to this one.
        #[arg(long, env = "SOCKMESH_CGROUP")]
        cgroup: Option<PathBuf>,
    },
}

/// `sockmesh agent` flags.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub datapath: DatapathArgs,
    /// Configuration source: grpc://HOST:PORT, grpcs://HOST:PORT (ADS), http://HOST:PORT
    /// (REST-JSON xDS) or file:///path/resources.yaml (watched).
    #[arg(long, env = "SOCKMESH_XDS")]
    pub xds: String,
    /// xDS protocol variant for grpc(s)://.
    #[arg(long, value_enum, default_value_t = XdsProtocol::Delta, env = "SOCKMESH_XDS_PROTOCOL")]
    pub xds_protocol: XdsProtocol,
    /// Node id; default is Istio's sidecar form from INSTANCE_IP/POD_IP, POD_NAME, POD_NAMESPACE.
    #[arg(long, env = "SOCKMESH_NODE_ID")]
    pub node_id: Option<String>,
    /// Node cluster.
    #[arg(long, default_value = "sockmesh", env = "SOCKMESH_NODE_CLUSTER")]
    pub node_cluster: String,
    /// Node metadata, KEY=VALUE, repeatable.
    #[arg(long = "node-metadata", value_parser = parse_key_value)]
    pub node_metadata: Vec<(String, String)>,
    /// CA bundle (PEM) to verify a grpcs:// control plane.
    #[arg(long, env = "SOCKMESH_XDS_CA")]
    pub xds_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "SOCKMESH_XDS_CERT")]
    pub xds_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, env = "SOCKMESH_XDS_KEY")]
    pub xds_key: Option<PathBuf>,
    /// TLS server name to verify, if not the URL's host (e.g. istiod.istio-system.svc).
    #[arg(long, env = "SOCKMESH_XDS_SERVER_NAME")]
    pub xds_server_name: Option<String>,
    /// Close sockets still connected to an endpoint removed from a service (not one
    /// that is draining), in every network namespace, with inet_diag SOCK_DESTROY.
    #[arg(long, env = "SOCKMESH_TERMINATE_REMOVED_CONNECTIONS")]
    pub terminate_removed_connections: bool,
    /// Admin HTTP server (/healthz, /readyz, /metrics, /config_dump). Loopback by
    /// default; "off" disables it.
    #[arg(long, default_value = "127.0.0.1:15200", env = "SOCKMESH_ADMIN")]
    pub admin: String,
    /// Write the admin server's bound address (IP:PORT) to this file once it listens
    /// (as Envoy's --admin-address-path; useful with --admin 127.0.0.1:0).
    #[arg(long, env = "SOCKMESH_ADMIN_ADDRESS_FILE")]
    pub admin_address_file: Option<PathBuf>,
    /// Poll interval of the REST (http://) source, e.g. 1s, 500ms.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub xds_refresh: std::time::Duration,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 500ms or 2s"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

fn agent(args: AgentArgs) -> Result<()> {
    let cfg = AgentConfig {
        datapath: args.datapath.config(),
        source: Source::parse(&args.xds)?,
        protocol: args.xds_protocol,
        node: NodeArgs {
            id: args.node_id,
            cluster: args.node_cluster,
            metadata: args.node_metadata,
        },
        tls: TlsFiles {
            ca: args.xds_ca,
            cert: args.xds_cert,
            key: args.xds_key,
            server_name: args.xds_server_name,
        },
        refresh: args.xds_refresh,
        terminate_removed: args.terminate_removed_connections,
        admin: match args.admin.as_str() {
            "off" | "" => None,
            a => Some(
                a.parse()
                    .with_context(|| format!("--admin {a:?}: expected IP:PORT or off"))?,
            ),
        },
        admin_address_file: args.admin_address_file,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(crate::agent::run(cfg))
}

impl Commands {
    /// Runs the command.
    pub fn execute(self) -> Result<()> {
        match self {
            Commands::Agent(args) => agent(*args),
            Commands::Apply {
                datapath,
                table,
                wait,
            } => apply(&datapath, &table, wait),
            Commands::Services { bpffs, json } => services(&bpffs, json),
            Commands::Stats { bpffs, json } => stats(&bpffs, json),
            Commands::Status { bpffs, admin, json } => status(&bpffs, &admin, json),
            Commands::Uninstall { bpffs, cgroup } => {
                let removed = dataplane::uninstall(&bpffs, cgroup.as_deref())?;
                if let Some(cgroup) = &cgroup {
                    let left = dataplane::attached_programs(cgroup)?;
                    if !left.is_empty() {
                        anyhow::bail!(
                            "sockmesh programs are still attached to {}: {left:?}",
                            cgroup.display()
                        );
                    }
                }
                info!(bpffs = %bpffs.display(), removed, "datapath uninstalled");
                Ok(())
            }
        }
    }
}

/// Reads a JSON routing table file.
pub fn read_table_file(path: &Path) -> Result<RoutingTable> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let services: Vec<ServiceJson> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(RoutingTable::from_json(&services))
}

fn apply(args: &DatapathArgs, table: &Path, wait: bool) -> Result<()> {
    let table = read_table_file(table)?;
    table.validate().context("refusing the table")?;
    let mut datapath = Datapath::install(&args.config())?;
    let report = datapath.apply(&table)?;
    info!(?report, "routing table applied");
    // The table is complete: a datapath built beside another layout's goes live now.
    if let Some(migration) = datapath.activate()? {
        info!(?migration, "attached; the other pin layouts removed");
    }
    if wait {
        wait_for_termination()?;
        info!("exiting; the datapath stays pinned");
    }
    Ok(())
}

fn wait_for_termination() -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking signals")?;
    let sig = set.wait().context("waiting for a signal")?;
    info!(signal = ?sig, "signal received");
    Ok(())
}

fn services(bpffs: &Path, json: bool) -> Result<()> {
    let table = dataplane::read_table(bpffs)?;
    let services = table.to_json();
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &services)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "{:<40} {:<5} BACKENDS", "SERVICE", "PROTO")?;
    for s in services {
        let vip = match s.vip {
            std::net::IpAddr::V4(ip) => format!("{ip}:{}", s.port),
            std::net::IpAddr::V6(ip) => format!("[{ip}]:{}", s.port),
        };
        let mut backends: Vec<String> = s
            .backends
            .iter()
            .map(|b| format!("{}:{} (w{})", b.address, b.port, b.weight))
            .collect();
        backends.extend(
            s.draining
                .iter()
                .map(|b| format!("{}:{} (draining)", b.address, b.port)),
        );
        let list = if backends.is_empty() {
            "(none: connections refused)".to_owned()
        } else {
            backends.join(", ")
        };
        writeln!(out, "{vip:<40} {:<5} {list}", s.protocol.to_string())?;
    }
    Ok(())
}

fn stats(bpffs: &Path, json: bool) -> Result<()> {
    let counters = dataplane::read_counters(bpffs)?;
    let services = dataplane::read_service_counters(bpffs)?;
    let mut out = io::stdout().lock();
    if json {
        let map: serde_json::Map<String, serde_json::Value> = counters
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect();
        let services: Vec<serde_json::Value> = services
            .iter()
            .map(|(s, c)| {
                serde_json::json!({
                    "service": s.to_string(), "redirects": c.redirects, "no_backend": c.no_backend,
                })
            })
            .collect();
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({"counters": map, "services": services}),
        )?;
        writeln!(out)?;
    } else {
        for (name, value) in counters {
            writeln!(out, "{name:<16} {value}")?;
        }
        writeln!(
            out,
            "\n{:<48} {:>12} {:>12}",
            "SERVICE", "REDIRECTS", "NO_BACKEND"
        )?;
        for (s, c) in services {
            writeln!(
                out,
                "{:<48} {:>12} {:>12}",
                s.to_string(),
                c.redirects,
                c.no_backend
            )?;
        }
    }
    Ok(())
}

fn status(bpffs: &Path, admin: &str, json: bool) -> Result<()> {
    let addr: Option<std::net::SocketAddr> = admin.parse().ok();
    let get = |path| addr.and_then(|a| crate::admin::get(a, path));
    let ready = get("/readyz");
    let dump: Option<serde_json::Value> =
        get("/config_dump").and_then(|(_, b)| serde_json::from_str(&b).ok());
    let table = dataplane::read_table(bpffs);
    let counters = dataplane::read_counters(bpffs).unwrap_or_default();
    let datapath = match &table {
        Ok(t) => serde_json::json!({
            "installed": true, "services": t.services.len(), "backends": t.backend_count(),
            "counters": counters.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>(),
        }),
        Err(e) => serde_json::json!({"installed": false, "error": e.to_string()}),
    };
    let agent = match &ready {
        Some((code, body)) => serde_json::json!({
            "running": true, "ready": *code == 200, "readiness": body.trim(),
            "datapath": dump.as_ref().map(|d| d["datapath"].clone()),
        }),
        None => serde_json::json!({"running": false}),
    };
    let xds = dump
        .as_ref()
        .map(|d| d["xds"].clone())
        .unwrap_or(serde_json::Value::Null);
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({"agent": agent, "xds": xds, "datapath": datapath}),
        )?;
        writeln!(out)?;
        return Ok(());
    }
    match &ready {
        Some((_, body)) => writeln!(out, "agent:    running at {admin}: {}", body.trim())?,
        None => writeln!(
            out,
            "agent:    not answering at {admin} (the pinned datapath works without it)"
        )?,
    }
    if let Some(d) = dump.as_ref().map(|d| &d["datapath"]) {
        writeln!(
            out,
            "layout:   v{}{}; capacity {} services, {} backends",
            d["layout_version"],
            if d["migrating"] == true {
                " (migrating: the previous layout serves until this one is filled)"
            } else {
                ""
            },
            d["limits"]["services"],
            d["limits"]["backends"],
        )?;
    }
    if let Some(types) = xds.as_object() {
        for (kind, s) in types {
            writeln!(
                out,
                "xds {kind}:  version {:?}, accepted {}, rejected {}{}",
                s["version"].as_str().unwrap_or(""),
                s["accepted"],
                s["rejected"],
                s["last_error"]
                    .as_str()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            )?;
        }
    }
    match &table {
        Ok(t) => writeln!(
            out,
            "datapath: {} services, {} backends pinned under {}; {}",
            t.services.len(),
            t.backend_count(),
            bpffs.display(),
            counters
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        )?,
        Err(e) => writeln!(out, "datapath: not installed ({e})")?,
    }
    Ok(())
}
