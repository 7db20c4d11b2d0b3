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
        // Outlier ejections (none where the health maps are not pinned).
        let ejected: Ejected = dataplane::read_health(&self.pins.bpffs)
            .map(|h| {
                h.ejected()
                    .filter_map(|e| {
                        Some(((e.service.clone(), e.backend.clone()), e.ejected_for_ms?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        write_text(&mut out, &services, &ejected)?;
        Ok(())
    }
}

/// Ejected backends by (service, backend) display form: milliseconds left.
type Ejected = std::collections::BTreeMap<(String, String), u64>;

fn write_text(
    out: &mut impl io::Write,
    services: &[ServiceJson],
    ejected: &Ejected,
) -> io::Result<()> {
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
        let service = format!("{vip}/{}", s.protocol);
        let mut backends: Vec<String> = s
            .backends
            .iter()
            .map(|b| {
                let key = (
                    service.clone(),
                    dataplane::backend_display(b.address, b.port),
                );
                match ejected.get(&key) {
                    Some(ms) => format!(
                        "{}:{} (w{}, ejected {}s)",
                        b.address,
                        b.port,
                        b.weight,
                        ms.div_ceil(1000)
                    ),
                    None => format!("{}:{} (w{})", b.address, b.port, b.weight),
                }
            })
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
        let ejected = Ejected::from([(
            ("10.96.0.1:80/tcp".to_owned(), "10.1.0.2:8080".to_owned()),
            29_500,
        )]);
        write_text(&mut out, &services, &ejected).expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                format!("{:<40} {:<5} {:<14} BACKENDS", "SERVICE", "PROTO", "POLICY"),
                format!(
                    "{:<40} {:<5} {:<14} 10.1.0.2:8080 (w2, ejected 30s), 10.1.0.3:8080 (draining)",
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
