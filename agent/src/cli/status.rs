//! `sockmesh status`: the agent (asked over its admin server), its xDS state and
//! the pinned datapath, in one view.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    net::SocketAddr,
    path::Path,
};

use anyhow::Result;
use serde::Serialize;

use super::{DEFAULT_ADMIN, PinArgs};
use crate::{
    admin_types::{ConfigDump, DatapathDump, TypeDump},
    dataplane,
    model::RoutingTable,
};

/// `sockmesh status` flags.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// The agent's admin address.
    #[arg(long, env = "SOCKMESH_ADMIN", default_value = DEFAULT_ADMIN)]
    pub admin: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What the agent's admin server answered.
struct AgentView {
    /// `/readyz`: (status, body); `None` if nothing answers.
    ready: Option<(u16, String)>,
    /// `/config_dump`, if it answered with a document this build understands.
    dump: Option<ConfigDump>,
}

impl AgentView {
    fn ask(admin: &str) -> Self {
        let addr: Option<SocketAddr> = admin.parse().ok();
        let get = |path| addr.and_then(|a| crate::admin::get(a, path));
        Self {
            ready: get("/readyz"),
            dump: get("/config_dump").and_then(|(_, body)| serde_json::from_str(&body).ok()),
        }
    }
}

/// What the pins hold.
struct PinView {
    table: Result<RoutingTable, dataplane::DataplaneError>,
    counters: Vec<(&'static str, u64)>,
}

impl PinView {
    fn read(bpffs: &Path) -> Self {
        Self {
            table: dataplane::read_table(bpffs),
            counters: dataplane::read_counters(bpffs).unwrap_or_default(),
        }
    }
}

/// `status --json`.
#[derive(Serialize)]
struct StatusJson<'a> {
    agent: AgentJson<'a>,
    xds: Option<&'a BTreeMap<String, TypeDump>>,
    /// The enrolled and skipped pods (`agent --kubernetes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    enrollment: Option<&'a crate::k8s::dump::EnrollmentDump>,
    datapath: PinsJson,
}

#[derive(Serialize)]
#[serde(untagged)]
enum AgentJson<'a> {
    Running {
        running: bool,
        ready: bool,
        readiness: &'a str,
        datapath: Option<&'a DatapathDump>,
    },
    Absent {
        running: bool,
    },
}

#[derive(Serialize)]
#[serde(untagged)]
enum PinsJson {
    Installed {
        installed: bool,
        services: usize,
        backends: usize,
        counters: BTreeMap<&'static str, u64>,
    },
    Missing {
        installed: bool,
        error: String,
    },
}

impl StatusArgs {
    /// Prints the three views, as JSON or as text.
    pub fn execute(self) -> Result<()> {
        let agent = AgentView::ask(&self.admin);
        let pins = PinView::read(&self.pins.bpffs);
        let mut out = io::stdout().lock();
        if self.json {
            // Through a `Value`, whose maps sort their keys, as this output always has.
            let json = serde_json::to_value(status_json(&agent, &pins))?;
            serde_json::to_writer_pretty(&mut out, &json)?;
            writeln!(out)?;
        } else {
            write_text(&mut out, &self.admin, &self.pins.bpffs, &agent, &pins)?;
        }
        Ok(())
    }
}

fn status_json<'a>(agent: &'a AgentView, pins: &PinView) -> StatusJson<'a> {
    StatusJson {
        agent: match &agent.ready {
            Some((code, body)) => AgentJson::Running {
                running: true,
                ready: *code == 200,
                readiness: body.trim(),
                datapath: agent.dump.as_ref().map(|d| &d.datapath),
            },
            None => AgentJson::Absent { running: false },
        },
        xds: agent.dump.as_ref().map(|d| &d.xds),
        enrollment: agent.dump.as_ref().and_then(|d| d.enrollment.as_ref()),
        datapath: match &pins.table {
            Ok(t) => PinsJson::Installed {
                installed: true,
                services: t.services.len(),
                backends: t.backend_count(),
                counters: pins.counters.iter().copied().collect(),
            },
            Err(e) => PinsJson::Missing {
                installed: false,
                error: e.to_string(),
            },
        },
    }
}

fn write_text(
    out: &mut impl io::Write,
    admin: &str,
    bpffs: &Path,
    agent: &AgentView,
    pins: &PinView,
) -> io::Result<()> {
    match &agent.ready {
        Some((_, body)) => writeln!(out, "agent:    running at {admin}: {}", body.trim())?,
        None => writeln!(
            out,
            "agent:    not answering at {admin} (the pinned datapath works without it)"
        )?,
    }
    if let Some(dump) = &agent.dump {
        let c = &dump.connection;
        if !c.url.is_empty() {
            writeln!(
                out,
                "xds:      {} ({}) as {}{}",
                c.url,
                c.transport,
                c.node["id"].as_str().unwrap_or("?"),
                c.auth_last_error
                    .as_ref()
                    .map(|e| format!(
                        "; {} failed authentications, last: {e}",
                        c.auth_failures.values().sum::<u64>()
                    ))
                    .unwrap_or_default()
            )?;
        }
        let d = &dump.datapath;
        writeln!(
            out,
            "layout:   v{}{}; capacity {} services, {} backends",
            d.layout_version,
            if d.migrating {
                " (migrating: the previous layout serves until this one is filled)"
            } else {
                ""
            },
            d.limits.services,
            d.limits.backends,
        )?;
        for (kind, s) in &dump.xds {
            writeln!(
                out,
                "xds {kind}:  version {:?}, accepted {}, rejected {}{}",
                s.version,
                s.accepted,
                s.rejected,
                s.last_error
                    .as_ref()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            )?;
        }
        for (cluster, d) in &dump.dns {
            let addresses: usize = d.hosts.values().map(Vec::len).sum();
            writeln!(
                out,
                "dns:      {cluster}: {} host names, {addresses} addresses, {} resolutions, {} failed{}",
                d.hosts.len(),
                d.resolutions,
                d.failures,
                d.last_error
                    .as_ref()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            )?;
        }
        if let Some(e) = &dump.enrollment {
            write_enrollment(out, e)?;
        }
    }
    match &pins.table {
        Ok(t) => writeln!(
            out,
            "datapath: {} services, {} backends pinned under {}; {}",
            t.services.len(),
            t.backend_count(),
            bpffs.display(),
            pins.counters
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        )?,
        Err(e) => writeln!(out, "datapath: not installed ({e})")?,
    }
    Ok(())
}

/// The enrolled pods, one line each, and the skipped ones counted by reason.
fn write_enrollment(
    out: &mut impl io::Write,
    e: &crate::k8s::dump::EnrollmentDump,
) -> io::Result<()> {
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for reason in e.skipped.values() {
        *reasons.entry(reason.as_str()).or_default() += 1;
    }
    writeln!(
        out,
        "pods:     {} enrolled on node {} ({}; label {}=true), {} skipped{}{}",
        e.enrolled.len(),
        e.node,
        e.cgroup_driver,
        e.label,
        e.skipped.len(),
        if reasons.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                reasons
                    .iter()
                    .map(|(r, n)| format!("{r} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        if e.synced { "" } else { " (not synced yet)" }
    )?;
    for (pod, p) in &e.enrolled {
        writeln!(
            out,
            "enrolled: {pod} {}{}",
            p.state,
            p.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )?;
    }
    if !e.istio_sidecar.narrowing_hosts.is_empty() {
        writeln!(
            out,
            "warning:  Istio Sidecar {} narrows the node's view to {}",
            e.istio_sidecar.effective.as_deref().unwrap_or("?"),
            e.istio_sidecar.narrowing_hosts.join(", ")
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::admin_types::{LimitsDump, PushDump};

    fn dump() -> ConfigDump {
        ConfigDump {
            source: "Connected".into(),
            source_errors: 0,
            source_last_error: None,
            connection: crate::admin_types::ConnectionDump::default(),
            outlier_ejected: Vec::new(),
            limited: Vec::new(),
            unknown_fields: BTreeMap::new(),
            refused: BTreeMap::new(),
            not_interpreted: Vec::new(),
            load_balancing: BTreeMap::new(),
            state: BTreeMap::new(),
            synced: true,
            push: PushDump::default(),
            datapath: DatapathDump {
                layout_version: 2,
                attachment: Some("Attached".into()),
                retired_layouts: vec![],
                migrating: true,
                limits: LimitsDump {
                    services: 8,
                    backends: 16,
                    slots: 32,
                    maglev_services: 4,
                },
                maps: Vec::new(),
            },
            xds: BTreeMap::from([(
                "eds".to_owned(),
                TypeDump {
                    version: "v\"2".into(),
                    received: 2,
                    accepted: 1,
                    rejected: 1,
                    last_error: Some("port 0".into()),
                    rejected_version: None,
                },
            )]),
            warming: vec![],
            passthrough: vec![],
            hash_on_client: BTreeMap::new(),
            dns: BTreeMap::from([(
                "outbound|443||api.example.com".to_owned(),
                crate::admin_types::DnsDump {
                    hosts: BTreeMap::from([(
                        "api.example.com".to_owned(),
                        vec!["192.0.2.7".parse().expect("ip")],
                    )]),
                    resolutions: 3,
                    failures: 1,
                    refused: 0,
                    last_error: Some("timed out".into()),
                },
            )]),
            enrollment: Some(crate::k8s::dump::EnrollmentDump {
                node: "node-a".into(),
                cgroup_driver: "systemd".into(),
                label: "sockmesh.io/enrolled".into(),
                synced: true,
                enrolled: BTreeMap::from([(
                    "shop/web-1".to_owned(),
                    crate::k8s::dump::EnrolledPodDump {
                        state: "attached".into(),
                        ..Default::default()
                    },
                )]),
                skipped: BTreeMap::from([
                    ("shop/cart-1".to_owned(), "sidecar".to_owned()),
                    ("shop/cart-2".to_owned(), "sidecar".to_owned()),
                    ("mesh/api-1".to_owned(), "ambient".to_owned()),
                ]),
                ..Default::default()
            }),
            services: vec![],
        }
    }

    fn not_installed() -> PinView {
        PinView {
            table: Err(dataplane::DataplaneError::NotInstalled {
                path: PathBuf::from("/pins/v2/maps/SM_SERVICES"),
            }),
            counters: vec![],
        }
    }

    #[test]
    fn text_shows_agent_layout_xds_and_pins() {
        let agent = AgentView {
            ready: Some((503, "not ready: migrating\n".into())),
            dump: Some(dump()),
        };
        let mut out = Vec::new();
        write_text(
            &mut out,
            "127.0.0.1:9",
            Path::new("/pins"),
            &agent,
            &not_installed(),
        )
        .expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "agent:    running at 127.0.0.1:9: not ready: migrating",
                "layout:   v2 (migrating: the previous layout serves until this one is filled); capacity 8 services, 16 backends",
                r#"xds eds:  version "v\"2", accepted 1, rejected 1, last error: port 0"#,
                "dns:      outbound|443||api.example.com: 1 host names, 1 addresses, 3 resolutions, 1 failed, last error: timed out",
                "pods:     1 enrolled on node node-a (systemd; label sockmesh.io/enrolled=true), 3 skipped: ambient 1, sidecar 2",
                "enrolled: shop/web-1 attached",
                "datapath: not installed (no sockmesh datapath is pinned at /pins/v2/maps/SM_SERVICES (is the agent installed with this --bpffs?))",
            ]
        );
    }

    #[test]
    fn json_has_the_three_views() {
        let agent = AgentView {
            ready: Some((200, "ready\n".into())),
            dump: Some(dump()),
        };
        let json = serde_json::to_value(status_json(&agent, &not_installed())).expect("json");
        assert_eq!(json["agent"]["running"], true);
        assert_eq!(json["agent"]["ready"], true);
        assert_eq!(json["agent"]["readiness"], "ready");
        assert_eq!(json["agent"]["datapath"]["layout_version"], 2);
        assert_eq!(json["xds"]["eds"]["rejected"], 1);
        assert_eq!(json["datapath"]["installed"], false);
        assert_eq!(
            json["enrollment"]["enrolled"]["shop/web-1"]["state"],
            "attached"
        );
        assert_eq!(json["enrollment"]["skipped"]["mesh/api-1"], "ambient");
        let absent = AgentView {
            ready: None,
            dump: None,
        };
        let json = serde_json::to_value(status_json(&absent, &not_installed())).expect("json");
        assert_eq!(json["agent"], serde_json::json!({"running": false}));
        assert_eq!(json["xds"], serde_json::Value::Null);
    }
}
