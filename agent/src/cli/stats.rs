//! `sockmesh stats`: the kernel counters, node-wide and per service.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
};

use crate::dataplane::ServiceCounts;
use anyhow::Result;
use serde::Serialize;

use super::PinArgs;
use crate::{dataplane, model::ServiceAddr};

/// `sockmesh stats` flags.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `stats --json`.
#[derive(Serialize)]
struct StatsJson {
    /// Node counters by name.
    counters: BTreeMap<&'static str, u64>,
    services: Vec<ServiceStatsJson>,
}

#[derive(Serialize)]
struct ServiceStatsJson {
    service: String,
    redirects: u64,
    no_backend: u64,
}

impl StatsArgs {
    /// Prints the node counters (summed over CPUs) and each service's.
    pub fn execute(self) -> Result<()> {
        let counters = dataplane::read_counters(&self.pins.bpffs)?;
        let services = dataplane::read_service_counters(&self.pins.bpffs)?;
        let mut out = io::stdout().lock();
        if self.json {
            let json = StatsJson {
                counters: counters.iter().copied().collect(),
                services: services
                    .iter()
                    .map(|(s, c)| ServiceStatsJson {
                        service: s.to_string(),
                        redirects: c.redirects,
                        no_backend: c.no_backend,
                    })
                    .collect(),
            };
            // Through a `Value`, whose maps sort their keys, as this output always has.
            serde_json::to_writer_pretty(&mut out, &serde_json::to_value(&json)?)?;
            writeln!(out)?;
        } else {
            write_text(&mut out, &counters, &services)?;
        }
        Ok(())
    }
}

fn write_text(
    out: &mut impl io::Write,
    counters: &[(&str, u64)],
    services: &[(ServiceAddr, ServiceCounts)],
) -> io::Result<()> {
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
    Ok(())
}
