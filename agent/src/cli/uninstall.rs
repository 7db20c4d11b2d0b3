//! `sockmesh uninstall`: detach every link and remove every pin.

use std::path::PathBuf;

use anyhow::Result;
use tracing::info;

use super::PinArgs;
use crate::dataplane;

/// `sockmesh uninstall` flags.
#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// The cgroup the datapath was attached to: refuse if the pins under --bpffs
    /// serve another cgroup, and check afterwards that no sockmesh program is
    /// left attached to this one.
    #[arg(long, env = "SOCKMESH_CGROUP")]
    pub cgroup: Option<PathBuf>,
}

impl UninstallArgs {
    /// Detaches and removes every layout pinned under `--bpffs`; with `--cgroup`,
    /// asks the kernel afterwards that no sockmesh program is left attached.
    pub fn execute(self) -> Result<()> {
        let bpffs = &self.pins.bpffs;
        let removed = dataplane::uninstall(bpffs, self.cgroup.as_deref())?;
        if let Some(cgroup) = &self.cgroup {
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
