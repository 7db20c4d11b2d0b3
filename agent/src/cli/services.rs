//! `sockmesh services`: the routing table read back from the pins.

use std::io::{self, Write as _};

use anyhow::Result;

use super::PinArgs;
use crate::{dataplane, model::ServiceJson};

/// `sockmesh services` flags.
#[derive(Debug, clap::Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ServicesArgs {
    /// Prints the pinned table, as JSON (the `apply --table` format) or as text.
    pub fn execute(self) -> Result<()> {
        let services = dataplane::read_table(&self.pins.bpffs)?.to_json();
        let mut out = io::stdout().lock();
        if self.json {
            serde_json::to_writer_pretty(&mut out, &services)?;
            writeln!(out)?;
            return Ok(());
        }
        write_text(&mut out, &services)?;
        Ok(())
    }
}

fn write_text(out: &mut impl io::Write, services: &[ServiceJson]) -> io::Result<()> {
    writeln!(
        out,
        "{:<40} {:<5} {:<14} BACKENDS",
        "SERVICE", "PROTO", "POLICY"
    )?;
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
        let policy = match s.lb_policy {
            crate::model::LbPolicy::Random => "random".to_owned(),
            crate::model::LbPolicy::LeastConn { choices } => format!("least_conn/{choices}"),
            crate::model::LbPolicy::Maglev { table_size } => format!("maglev/{table_size}"),
        };
        writeln!(
            out,
            "{vip:<40} {:<5} {policy:<14} {list}",
            s.protocol.to_string()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lists_backends_draining_and_empty_services() {
        let services: Vec<ServiceJson> = serde_json::from_str(
            r#"[{"vip":"10.96.0.1","port":80,"protocol":"tcp",
                 "backends":[{"address":"10.1.0.2","port":8080,"weight":2}],
                 "draining":[{"address":"10.1.0.3","port":8080}]},
                {"vip":"fd00::1","port":53,"protocol":"udp","backends":[],
                 "lb_policy":{"least_conn":{"choices":2}}}]"#,
        )
        .expect("table");
        let mut out = Vec::new();
        write_text(&mut out, &services).expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                format!("{:<40} {:<5} {:<14} BACKENDS", "SERVICE", "PROTO", "POLICY"),
                format!(
                    "{:<40} {:<5} {:<14} 10.1.0.2:8080 (w2), 10.1.0.3:8080 (draining)",
                    "10.96.0.1:80", "tcp", "random"
                ),
                format!(
                    "{:<40} {:<5} {:<14} (none: connections refused)",
                    "[fd00::1]:53", "udp", "least_conn/2"
                ),
            ]
        );
    }
}
