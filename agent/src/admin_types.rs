//! The `/config_dump` document, typed: the admin server serializes a [`ConfigDump`]
//! and `sockmesh status` decodes one, so both sides share one definition.
//!
//! [`ConfigDump::to_json`] renders it as the admin server serves it: pretty JSON
//! with every object's keys in sorted order (the document goes through
//! `serde_json::Value`, whose maps are sorted), then a newline.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::ServiceJson;

/// Everything `/config_dump` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDump {
    /// The configuration source's state, as `SourceState`'s `Debug` form
    /// (`Connected`, `Disconnected`, …).
    pub source: String,
    /// Documents the source could not read or parse.
    pub source_errors: u64,
    /// The last of them, if any.
    pub source_last_error: Option<String>,
    /// LDS and CDS have been received (the table is the control plane's).
    pub synced: bool,
    /// How the agent reaches its control plane and who it says it is. Absent
    /// from an older agent: empty.
    #[serde(default)]
    pub connection: ConnectionDump,
    pub push: PushDump,
    pub datapath: DatapathDump,
    /// Per xDS type, by short name (`lds`, `rds`, `cds`, `eds`).
    pub xds: BTreeMap<String, TypeDump>,
    /// Services waiting for their clusters or endpoints (`ServiceAddr` display form,
    /// `10.96.0.10:80/tcp`).
    pub warming: Vec<String>,
    /// Services sent to their original destination (`ORIGINAL_DST` clusters; no
    /// entry in the table), in display form. Absent from an agent older than this
    /// field: empty.
    #[serde(default)]
    pub passthrough: Vec<String>,
    /// Consistent-hash services whose route or tcp_proxy hash policy names what no
    /// byte at connect() shows (a header, cookie, query parameter, filter state),
    /// by display form: what it names. They hash the client instead. Absent from
    /// an older agent: empty.
    #[serde(default)]
    pub hash_on_client: BTreeMap<String, String>,
    /// Backends the kernel has ejected now (outlier detection), with the time
    /// left. Absent from an older agent: empty.
    #[serde(default)]
    pub outlier_ejected: Vec<crate::dataplane::EndpointHealthReport>,
    /// STRICT_DNS / LOGICAL_DNS clusters, by name: what their host names resolve
    /// to now and how resolution goes. Absent from an older agent: empty.
    #[serde(default)]
    pub dns: BTreeMap<String, DnsDump>,
    /// Which pods of the node are served (`--kubernetes`); absent when one
    /// cgroup is served, and from an older agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment: Option<crate::k8s::dump::EnrollmentDump>,
    /// Services this node programs otherwise than the configuration asks (a
    /// subset of their endpoints, their previous version, or no entry), and why.
    /// Absent from an older agent: empty.
    #[serde(default)]
    pub limited: Vec<LimitedDump>,
    /// Fields of text documents sockmesh does not know, ignored, by
    /// `Message.field`: how often. Absent from an older agent: empty.
    #[serde(default)]
    pub unknown_fields: BTreeMap<String, u64>,
    /// Resources refused and holding their last good version (if they had one),
    /// by type (`lds`, `cds`, …) and name: why. Absent from an older agent: empty.
    #[serde(default)]
    pub refused: BTreeMap<String, BTreeMap<String, String>>,
    /// Listeners whose traffic (some chain's, or all) sockmesh leaves alone: their
    /// terminal filter is not one it interprets. Absent from an older agent: empty.
    #[serde(default)]
    pub not_interpreted: Vec<NotInterpretedDump>,
    /// Services served by priority levels, by display form: each level's load
    /// and each endpoint's share as the kernel applies them now (the choice
    /// table as written, the ejections running). Absent from an older agent:
    /// empty.
    #[serde(default)]
    pub load_balancing: BTreeMap<String, crate::admin_levels::LevelsDump>,
    /// How many entries each of the agent's own collections holds (resources,
    /// versions, the translation's indexes, …), for leak audits: each follows
    /// the configuration held, not its history. Absent from an older agent.
    #[serde(default)]
    pub state: BTreeMap<String, usize>,
    /// The routing table, as `sockmesh services --json` prints it.
    pub services: Vec<ServiceJson>,
}

/// A service limited by the node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitedDump {
    /// `10.96.0.10:80/tcp`.
    pub service: String,
    /// `endpoints_subset`, `capacity_subset`, `capacity_stale`,
    /// `capacity_left_out`.
    pub reason: String,
    /// Endpoints the configuration gives it.
    pub endpoints: usize,
    /// Endpoints programmed.
    pub programmed: usize,
    /// The map whose capacity was reached (empty for an endpoint subset).
    pub why: String,
}

/// A listener sockmesh leaves alone, and why (one line per chain).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotInterpretedDump {
    pub listener: String,
    pub why: Vec<String>,
}

/// The control-plane connection: where, how it is secured, the node identity
/// sent, and authentication failures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionDump {
    /// The `--xds` URL.
    pub url: String,
    /// `tls`, `plaintext` (only with `--allow-plaintext-xds`) or `file`.
    pub transport: String,
    /// CA bundle, bearer-token file and TLS server name in use, if any.
    pub ca: Option<String>,
    pub token_file: Option<String>,
    pub server_name: Option<String>,
    /// The xDS `Node`: id, cluster, locality, metadata.
    pub node: serde_json::Value,
    /// Failed authentications by reason (`token_expired`, `unknown_ca`, …).
    pub auth_failures: BTreeMap<String, u64>,
    /// The last of them, as logged.
    pub auth_last_error: Option<String>,
}

/// The last write of the table into the kernel, and write-side counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushDump {
    /// Writes of the table into the kernel maps.
    pub pushes: u64,
    /// Map operations of the last one.
    pub last_map_ops: usize,
    /// Update received → kernel maps written, for the last one (µs, saturating).
    pub last_latency_us: u64,
    pub kernel_write_failures: u64,
    /// Sockets of removed endpoints closed (`--terminate-removed-connections`).
    pub terminated_sockets: u64,
    /// Accepted updates handed to the datapath task and not written yet.
    #[serde(default)]
    pub writes_in_flight: u64,
}

/// The agent's datapath.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathDump {
    /// This build's pin layout (`LAYOUT_VERSION`).
    pub layout_version: u32,
    /// How the programs came to be attached (`Attachment`'s `Debug` form:
    /// `Attached`, `Adopted`, `Pending`, `Migrated`), if the agent has a datapath.
    pub attachment: Option<String>,
    /// Layout versions this agent detached and removed.
    pub retired_layouts: Vec<u32>,
    /// Another layout's datapath serves until this one is filled and attached.
    pub migrating: bool,
    pub limits: LimitsDump,
    /// How full each map is: entries (the agent's own count of the maps it
    /// writes, the kernel's of the others), capacity, the flag that sizes it.
    /// Absent from an older agent: empty.
    #[serde(default)]
    pub maps: Vec<crate::dataplane::fill::MapFill>,
}

/// The maps' capacities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsDump {
    pub services: u32,
    pub backends: u32,
    pub slots: u32,
    /// Services that may have a Maglev table (`--max-maglev-services`).
    #[serde(default)]
    pub maglev_services: u32,
}

impl From<crate::dataplane::Limits> for LimitsDump {
    fn from(l: crate::dataplane::Limits) -> Self {
        Self {
            services: l.services,
            backends: l.backends,
            slots: l.slots,
            maglev_services: l.maglev,
        }
    }
}

/// One DNS cluster's resolution.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsDump {
    /// Host name → the addresses in use (the last good ones while resolution
    /// fails; empty: no address, or not resolved yet).
    pub hosts: BTreeMap<String, Vec<std::net::IpAddr>>,
    /// Rounds of resolution (all host names of the cluster).
    pub resolutions: u64,
    /// Host-name resolutions that failed (timeouts, SERVFAIL, REFUSED, ...).
    pub failures: u64,
    /// Answers refused because the table would break the datapath's limits.
    pub refused: u64,
    pub last_error: Option<String>,
}

/// One xDS type's bookkeeping.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeDump {
    /// The accepted `version_info`.
    pub version: String,
    pub received: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Why the last rejected update was rejected.
    pub last_error: Option<String>,
    /// `version_info` of the last rejected update.
    pub rejected_version: Option<String>,
}

impl ConfigDump {
    /// The document as `/config_dump` serves it (see the module docs).
    pub fn to_json(&self) -> String {
        serde_json::to_value(self)
            .and_then(|v| serde_json::to_string_pretty(&v))
            .unwrap_or_default()
            + "\n"
    }
}

/// Saturating microseconds of a duration, as [`PushDump::last_latency_us`] holds.
pub fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ConfigDump {
        let services: Vec<ServiceJson> = serde_json::from_str(
            r#"[{"vip":"10.96.0.20","port":443,"protocol":"tcp",
                 "backends":[{"address":"10.10.1.11","port":8443,"weight":2}],
                 "draining":[{"address":"10.10.1.12","port":8443,"weight":1}]}]"#,
        )
        .expect("services");
        ConfigDump {
            enrollment: None,
            source: "Connected".into(),
            source_errors: 1,
            source_last_error: Some("line 3: bad".into()),
            connection: ConnectionDump {
                url: "grpcs://istiod.istio-system.svc:15012".into(),
                transport: "tls".into(),
                token_file: Some("/var/run/secrets/tokens/istio-token".into()),
                node: serde_json::json!({"id": "sidecar~10.0.0.5~a.b~b.svc.cluster.local"}),
                auth_failures: [("token_expired".to_owned(), 2)].into(),
                ..Default::default()
            },
            outlier_ejected: vec![crate::dataplane::EndpointHealthReport {
                service: "10.96.0.20:443/tcp".into(),
                backend: "10.10.1.11:8443".into(),
                failures: 0,
                ejections: 2,
                multiplier: 2,
                ejected_for_ms: Some(59_000),
            }],
            synced: true,
            push: PushDump {
                pushes: 4,
                last_map_ops: 7,
                last_latency_us: micros(std::time::Duration::from_micros(250)),
                kernel_write_failures: 0,
                terminated_sockets: 2,
                writes_in_flight: 0,
            },
            datapath: DatapathDump {
                layout_version: 2,
                attachment: Some("Attached".into()),
                retired_layouts: vec![1],
                migrating: false,
                limits: crate::dataplane::Limits::default().into(),
                maps: Vec::new(),
            },
            xds: BTreeMap::from([
                (
                    "eds".to_owned(),
                    TypeDump {
                        version: "3".into(),
                        received: 3,
                        accepted: 2,
                        rejected: 1,
                        last_error: Some("port 0".into()),
                        rejected_version: Some("bad-port".into()),
                    },
                ),
                ("lds".to_owned(), TypeDump::default()),
            ]),
            warming: vec!["10.96.0.30:80/tcp".into()],
            passthrough: vec!["10.96.0.40:443/tcp".into()],
            hash_on_client: BTreeMap::from([(
                "10.96.0.50:80/tcp".to_owned(),
                "hash policy on a header".to_owned(),
            )]),
            dns: BTreeMap::from([(
                "outbound|443||api.example.com".to_owned(),
                DnsDump {
                    hosts: BTreeMap::from([(
                        "api.example.com".to_owned(),
                        vec!["192.0.2.7".parse().expect("ip")],
                    )]),
                    resolutions: 5,
                    failures: 1,
                    refused: 0,
                    last_error: Some("resolving \"api.example.com\": timed out".into()),
                },
            )]),
            limited: vec![LimitedDump {
                service: "10.96.0.60:80/tcp".into(),
                reason: "endpoints_subset".into(),
                endpoints: 20_000,
                programmed: 16_384,
                why: String::new(),
            }],
            unknown_fields: BTreeMap::from([(
                "envoy.config.cluster.v3.Cluster.new_knob".to_owned(),
                3,
            )]),
            refused: BTreeMap::from([(
                "lds".to_owned(),
                BTreeMap::from([("b".to_owned(), "Listener \"b\": name: bad".to_owned())]),
            )]),
            not_interpreted: vec![NotInterpretedDump {
                listener: "240.240.0.3_20880".into(),
                why: vec!["filter_chains[0]: a Dubbo proxy".into()],
            }],
            load_balancing: BTreeMap::from([(
                "10.96.0.20:443/tcp".to_owned(),
                crate::admin_levels::LevelsDump {
                    overprovisioning_factor: 140,
                    panic_threshold: 50,
                    levels: vec![crate::admin_levels::LevelDump {
                        priority: Some(0),
                        hosts: 1,
                        healthy: 1,
                        total: 1,
                        healthy_load: 100,
                        ..Default::default()
                    }],
                    endpoints: BTreeMap::from([(
                        "10.10.1.11:8443".to_owned(),
                        crate::admin_levels::EndpointDump {
                            health: "healthy".into(),
                            share: 100.0,
                            locality: Some("r/z/".into()),
                            ..Default::default()
                        },
                    )]),
                    ..Default::default()
                },
            )]),
            state: BTreeMap::from([("listeners".to_owned(), 1)]),
            services,
        }
    }

    /// The document the admin server built with `serde_json::json!` before it was
    /// typed, for the same state: the typed one must render byte for byte the same.
    fn untyped(d: &ConfigDump) -> String {
        let types: serde_json::Map<String, serde_json::Value> = d
            .xds
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    serde_json::json!({
                        "version": s.version, "received": s.received, "accepted": s.accepted,
                        "rejected": s.rejected, "last_error": s.last_error,
                        "rejected_version": s.rejected_version,
                    }),
                )
            })
            .collect();
        let dump = serde_json::json!({
            "source": d.source,
            "source_errors": d.source_errors,
            "source_last_error": d.source_last_error,
            "synced": d.synced,
            "push": {
                "pushes": d.push.pushes,
                "last_map_ops": d.push.last_map_ops,
                "last_latency_us": d.push.last_latency_us,
                "kernel_write_failures": d.push.kernel_write_failures,
                "terminated_sockets": d.push.terminated_sockets,
                // Added with the datapath task.
                "writes_in_flight": d.push.writes_in_flight,
            },
            "datapath": {
                "layout_version": d.datapath.layout_version,
                "attachment": d.datapath.attachment,
                "retired_layouts": d.datapath.retired_layouts,
                "migrating": d.datapath.migrating,
                "limits": {
                    "services": d.datapath.limits.services,
                    "backends": d.datapath.limits.backends,
                    "slots": d.datapath.limits.slots,
                    "maglev_services": d.datapath.limits.maglev_services,
                },
                // Added with the maps' fill.
                "maps": d.datapath.maps,
            },
            "xds": types,
            // Added with the secured control plane.
            "connection": {
                "url": d.connection.url,
                "transport": d.connection.transport,
                "ca": d.connection.ca,
                "token_file": d.connection.token_file,
                "server_name": d.connection.server_name,
                "node": d.connection.node,
                "auth_failures": d.connection.auth_failures,
                "auth_last_error": d.connection.auth_last_error,
            },
            "warming": d.warming,
            "passthrough": d.passthrough,
            "hash_on_client": d.hash_on_client,
            // Added with outlier detection.
            "outlier_ejected": d.outlier_ejected,
            "dns": d.dns,
            // Added with per-resource acceptance.
            "limited": d.limited,
            "unknown_fields": d.unknown_fields,
            "refused": d.refused,
            "not_interpreted": d.not_interpreted,
            // Added with multi-zone services.
            "load_balancing": d.load_balancing,
            // Added with the leak audit.
            "state": d.state,
            "services": d.services,
        });
        serde_json::to_string_pretty(&dump).unwrap_or_default() + "\n"
    }

    #[test]
    fn renders_as_the_untyped_document_did_and_round_trips() {
        let d = sample();
        let text = d.to_json();
        assert_eq!(text, untyped(&d));
        let back: ConfigDump = serde_json::from_str(&text).expect("decodes");
        assert_eq!(back, d);
        let none = ConfigDump {
            source_last_error: None,
            datapath: DatapathDump {
                attachment: None,
                ..d.datapath.clone()
            },
            ..d
        };
        assert_eq!(none.to_json(), untyped(&none));
    }

    #[test]
    fn unknown_fields_of_a_newer_agent_are_ignored() {
        let mut v = serde_json::to_value(sample()).expect("value");
        v["future"] = serde_json::json!({"x": 1});
        v["push"]["future"] = serde_json::json!(1);
        let d: ConfigDump = serde_json::from_value(v).expect("decodes");
        assert_eq!(d, sample());
    }
}
