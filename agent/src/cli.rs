//! Command-line interface: one module per verb, each with its flags (clap derive)
//! and an `execute()`; the flags several verbs share are defined once here.

mod agent;
mod apply;
mod services;
mod stats;
mod status;
mod uninstall;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

pub use self::{
    agent::AgentArgs, apply::ApplyArgs, apply::read_table_file, services::ServicesArgs,
    stats::StatsArgs, status::StatusArgs, uninstall::UninstallArgs,
};
use crate::dataplane::{DatapathConfig, Limits};

/// Where `--bpffs` points unless told otherwise.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/sockmesh";
/// Where the agent's admin server listens (`agent --admin`) and where `status`
/// asks it, unless told otherwise.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15200";

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

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run the agent: follow an xDS source and keep the kernel maps in sync with it
    /// until SIGTERM/SIGINT (the datapath stays pinned after exit).
    Agent(Box<AgentArgs>),
    /// Install (or adopt) the datapath and apply a static routing table from a JSON
    /// file (the format `sockmesh services --json` prints).
    Apply(ApplyArgs),
    /// Print the routing table read back from the pinned maps (no agent needed).
    Services(ServicesArgs),
    /// Print the kernel datapath counters (summed over CPUs).
    Stats(StatsArgs),
    /// Agent, xDS and datapath summary: asks the agent's admin server and reads the
    /// pins (works without an agent too).
    Status(StatusArgs),
    /// Detach the programs and remove every pin of the datapath (every layout
    /// version pinned under --bpffs).
    Uninstall(UninstallArgs),
}

impl Commands {
    /// Runs the command.
    pub fn execute(self) -> Result<()> {
        match self {
            Commands::Agent(args) => args.execute(),
            Commands::Apply(args) => args.execute(),
            Commands::Services(args) => args.execute(),
            Commands::Stats(args) => args.execute(),
            Commands::Status(args) => args.execute(),
            Commands::Uninstall(args) => args.execute(),
        }
    }
}

/// Where the datapath is pinned (every verb).
#[derive(Debug, clap::Args)]
pub struct PinArgs {
    /// Directory on bpffs the datapath is pinned under (agent and apply create
    /// it, mounting bpffs at /sys/fs/bpf if needed).
    #[arg(long, env = "SOCKMESH_BPFFS", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// Where the datapath is pinned, which cgroup it serves and how large its maps
/// are (the verbs that install it: `agent`, `apply`).
#[derive(Debug, clap::Args)]
pub struct DatapathArgs {
    /// cgroup v2 directory whose processes get socket-level load balancing.
    #[arg(long, env = "SOCKMESH_CGROUP")]
    pub cgroup: PathBuf,
    #[command(flatten)]
    pub pins: PinArgs,
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
    /// Services that may have a Maglev table (MAGLEV and RING_HASH clusters).
    #[arg(long, env = "SOCKMESH_MAX_MAGLEV_SERVICES", default_value_t = sockmesh_common::MAX_MAGLEV_SERVICES)]
    pub max_maglev_services: u32,
    /// Open client sockets redirected from a VIP the reverse map remembers
    /// (getpeername() shows the VIP; --terminate-removed-connections finds them).
    #[arg(long, env = "SOCKMESH_MAX_REVERSE", default_value_t = sockmesh_common::MAX_REVERSE_ENTRIES)]
    pub max_reverse: u32,
    /// Unconnected UDP sockets' peers the reverse LRU remembers (replies from a
    /// DNS VIP's backend show the VIP).
    #[arg(long, env = "SOCKMESH_MAX_REVERSE_UDP", default_value_t = sockmesh_common::MAX_REVERSE_UDP_ENTRIES)]
    pub max_reverse_udp: u32,
    /// How a least-connections service (LEAST_REQUEST) draws its `choice_count`
    /// candidates: `distinct` backends (weights honoured), or `envoy`, with
    /// replacement as Envoy does, which can compare a backend with itself.
    #[arg(long, env = "SOCKMESH_LEAST_REQUEST_DRAWS", value_enum, default_value_t = LeastRequestDraws::Distinct)]
    pub least_request_draws: LeastRequestDraws,
}

/// `--least-request-draws`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LeastRequestDraws {
    Distinct,
    Envoy,
}

impl DatapathArgs {
    /// The datapath these flags describe.
    pub fn config(&self) -> DatapathConfig {
        DatapathConfig {
            bpffs: self.pins.bpffs.clone(),
            cgroup: self.cgroup.clone(),
            scope: crate::dataplane::AttachScope::Cgroup,
            allow_root_cgroup: self.allow_root_cgroup,
            limits: Limits {
                services: self.max_services,
                backends: self.max_backends,
                slots: self.max_slots,
                maglev: self.max_maglev_services,
                reverse: self.max_reverse,
                reverse_udp: self.max_reverse_udp,
            },
            envoy_draws: self.least_request_draws == LeastRequestDraws::Envoy,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_verb_defaults_bpffs_alike() {
        for verb in [
            &["services"][..],
            &["stats"],
            &["status"],
            &["uninstall"],
            &["apply", "--cgroup", "/c", "--table", "t.json"],
        ] {
            let cli = Cli::try_parse_from(std::iter::once("sockmesh").chain(verb.iter().copied()))
                .expect("parses");
            let bpffs = match cli.command {
                Commands::Services(a) => a.pins.bpffs,
                Commands::Stats(a) => a.pins.bpffs,
                Commands::Status(a) => a.pins.bpffs,
                Commands::Uninstall(a) => a.pins.bpffs,
                Commands::Apply(a) => a.datapath.pins.bpffs,
                Commands::Agent(a) => a.datapath.pins.bpffs,
            };
            assert_eq!(bpffs, PathBuf::from(DEFAULT_BPFFS), "{verb:?}");
        }
    }
}
