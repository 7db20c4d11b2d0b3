//! `sockmesh apply`: install or adopt the datapath and apply a static table.

use std::{fs, path::Path, path::PathBuf};

use anyhow::{Context as _, Result};
use tracing::info;

use super::DatapathArgs;
use crate::{
    dataplane::Datapath,
    model::{RoutingTable, ServiceJson},
};

/// `sockmesh apply` flags.
#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub datapath: DatapathArgs,
    /// JSON file: an array of {"vip","port","protocol","backends":[{"address","port","weight"}]}.
    #[arg(long)]
    pub table: PathBuf,
    /// Stay running until SIGINT/SIGTERM (the datapath stays pinned either way).
    #[arg(long)]
    pub wait: bool,
}

impl ApplyArgs {
    /// Validates the table, installs or adopts the datapath, writes the table, and
    /// attaches a datapath that was built beside another layout's.
    pub fn execute(self) -> Result<()> {
        let table = read_table_file(&self.table)?;
        table.validate().context("refusing the table")?;
        let mut datapath = Datapath::install(&self.datapath.config())?;
        let report = datapath.apply(&table)?;
        info!(?report, "routing table applied");
        // The table is complete: a datapath built beside another layout's goes live now.
        if let Some(migration) = datapath.activate()? {
            info!(?migration, "attached; the other pin layouts removed");
        }
        if self.wait {
            wait_for_termination()?;
            info!("exiting; the datapath stays pinned");
        }
        Ok(())
    }
}

/// Reads a JSON routing table file.
pub fn read_table_file(path: &Path) -> Result<RoutingTable> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let services: Vec<ServiceJson> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(RoutingTable::from_json(&services))
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
