//! The node identity sent to the control plane, as istiod reads a proxy's
//! (`pkg/model/proxy.go` `NodeMetadata`, `pilot/pkg/model/context.go`
//! `ParseServiceNodeWithMetadata` and `ParseMetadata`).
//!
//! sockmesh connects as one `sidecar` node for the whole node: istiod then sends
//! every service VIP as a listener with its cluster and endpoints, which is the
//! view a socket-level balancer needs (a `router` node gets only Gateway
//! listeners). What istiod does with each field decides which endpoints every
//! pod on the node reaches:
//! - `CLUSTER_ID`: endpoints of cluster-local services (`kubernetes.default`,
//!   `*.kube-system`) are kept only when their cluster equals it; without it
//!   they come empty, and the API server and kube-dns would refuse every pod.
//! - `NODE_NAME`: a service with `internalTrafficPolicy: Local` keeps only the
//!   endpoints on this node, which is exactly the policy's meaning for every
//!   pod the agent serves; without it the service comes empty.
//! - `DISABLE_HBONE_SEND`: ambient and waypoint endpoints come as their pod
//!   address and target port (what sockmesh can connect to) instead of an
//!   `envoy_internal_address` of the HBONE tunnel, which a socket balancer
//!   cannot use. The destination's ztunnel sees a plaintext client, as from a
//!   pod outside the mesh.
//! - `NAMESPACE` and `SERVICE_ACCOUNT`: the config namespace (whose Sidecar scope
//!   and `exportTo` visibility the node gets) and the identity istiod compares
//!   with the token's on its secured port (both must match it).
//! - `ISTIO_VERSION`: without it istiod assumes the newest proxy and warns on
//!   every connection.
//! - `INSTANCE_IPS`: the node's addresses (both families on a dual-stack node,
//!   which makes istiod send the VIPs of both).
//!
//! Every value is a string, as istio-agent sends `ISTIO_META_*`: istiod refuses a
//! stream whose metadata has a field of another JSON type than its Go field
//! (a boolean `true` where it expects the string "true", say), so booleans go as
//! "true" and `LABELS` as a nested struct of strings.

use std::{collections::BTreeMap, net::IpAddr};

use sockmesh_proto::pb::{
    envoy::config::core::v3::{Locality, Node},
    google::protobuf::{Struct, Value, value::Kind as ValueKind},
};

/// The Istio release sockmesh is tested against (the live-istiod suite's
/// `istio.io/istio`), sent as `ISTIO_VERSION` unless told otherwise.
pub const DEFAULT_ISTIO_VERSION: &str = "1.31.0";
/// istiod's own default cluster id (`constants.DefaultClusterName`), which a
/// single-cluster install keeps.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// What the node says about itself. Built from flags and the downward API's
/// environment ([`NodeIdentity::from_env`] fills what the flags left unset).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The node id; unset: Istio's sidecar form from the fields below.
    pub id: Option<String>,
    /// `Node.cluster`.
    pub cluster: String,
    /// The agent pod's name and namespace (`POD_NAME`, `POD_NAMESPACE`).
    pub pod_name: Option<String>,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub cluster_id: String,
    /// The Kubernetes node's name (`spec.nodeName`).
    pub node_name: Option<String>,
    /// The node's addresses (`status.podIPs` of a host-network pod).
    pub instance_ips: Vec<IpAddr>,
    pub istio_version: String,
    /// `region/zone/subzone`; istiod prefers the locality of the agent pod's
    /// Kubernetes node where it finds the pod.
    pub locality: Option<NodeLocality>,
    pub labels: BTreeMap<String, String>,
    /// `--node-metadata KEY=VALUE`: added last, so it overrides a field above.
    pub extra: Vec<(String, String)>,
}

/// A locality, as Envoy's `core.v3.Locality`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeLocality {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

/// A node identity that istiod would refuse or misread.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("--node-locality {0:?}: expected REGION[/ZONE[/SUBZONE]] (e.g. us-east1/us-east1-b)")]
    Locality(String),
    #[error(
        "--istio-version {0:?}: istiod reads MAJOR.MINOR[.PATCH] (e.g. 1.31.0); anything else makes it assume the newest proxy"
    )]
    IstioVersion(String),
    #[error(
        "--instance-ips {0:?}: not an IP address (istiod ignores INSTANCE_IPS if one entry is not)"
    )]
    InstanceIp(String),
    #[error("--node-id {0:?}: istiod expects TYPE~IP~POD.NAMESPACE~DOMAIN with TYPE sidecar")]
    Id(String),
}

impl NodeLocality {
    /// `region/zone/subzone` (trailing parts optional), as istiod's
    /// `istio-locality` label and `--node-locality` write it.
    pub fn parse(s: &str) -> Result<Self, NodeError> {
        let mut parts = s.split('/');
        let region = parts.next().unwrap_or_default();
        let zone = parts.next().unwrap_or_default();
        let sub_zone = parts.next().unwrap_or_default();
        if region.is_empty() || parts.next().is_some() {
            return Err(NodeError::Locality(s.to_owned()));
        }
        Ok(Self {
            region: region.into(),
            zone: zone.into(),
            sub_zone: sub_zone.into(),
        })
    }
}

impl std::fmt::Display for NodeLocality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.region, self.zone, self.sub_zone)
    }
}

/// Whether istiod's `ParseIstioVersion` reads `v` as a version
/// (`^([1-9]+)\.([0-9]+)(\.([0-9]+))?`, after an optional `release-`).
fn is_istio_version(v: &str) -> bool {
    let v = v.strip_prefix("release-").unwrap_or(v).as_bytes();
    let major = v.iter().take_while(|b| (b'1'..=b'9').contains(b)).count();
    let minor = v.get(major + 1..).map_or(0, |rest| {
        rest.iter().take_while(|b| b.is_ascii_digit()).count()
    });
    major > 0 && v.get(major) == Some(&b'.') && minor > 0
}

fn string(v: impl Into<String>) -> Value {
    Value {
        kind: Some(ValueKind::StringValue(v.into())),
    }
}

impl NodeIdentity {
    /// Fills what the flags and their environment variables left unset from
    /// the fallbacks: the host name for the pod's name, `INSTANCE_IP` or `POD_IP`
    /// for the node's addresses.
    #[must_use]
    pub fn from_env(mut self, env: &BTreeMap<String, String>) -> Self {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        self.pod_name = self.pod_name.or_else(|| get("HOSTNAME"));
        if self.instance_ips.is_empty() {
            let ips = get("INSTANCE_IP")
                .or_else(|| get("POD_IP"))
                .unwrap_or_default();
            self.instance_ips = ips
                .split(',')
                .filter_map(|s| s.trim().parse().ok())
                .collect();
        }
        self
    }

    /// Checks what istiod would refuse or misread.
    pub fn validate(&self) -> Result<(), NodeError> {
        if !is_istio_version(&self.istio_version) {
            return Err(NodeError::IstioVersion(self.istio_version.clone()));
        }
        if let Some(id) = &self.id {
            let parts: Vec<&str> = id.split('~').collect();
            if parts.len() != 4 || parts[0] != "sidecar" || parts[1].parse::<IpAddr>().is_err() {
                return Err(NodeError::Id(id.clone()));
            }
        }
        Ok(())
    }

    /// The namespace the node claims: istiod's config namespace.
    pub fn config_namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }

    /// Istio's sidecar form, `sidecar~<IP>~<POD>.<NAMESPACE>~<NAMESPACE>.svc.cluster.local`:
    /// istiod finds the agent's own pod by `<POD>.<NAMESPACE>` (and from it the
    /// Kubernetes node's locality).
    pub fn node_id(&self) -> String {
        if let Some(id) = &self.id {
            return id.clone();
        }
        let ip = self
            .instance_ips
            .first()
            .map_or_else(|| "127.0.0.1".to_owned(), ToString::to_string);
        let name = self.pod_name.as_deref().unwrap_or("sockmesh");
        let ns = self.config_namespace();
        format!("sidecar~{ip}~{name}.{ns}~{ns}.svc.cluster.local")
    }

    /// The metadata fields, as istiod's `NodeMetadata` JSON names them.
    pub fn metadata(&self) -> BTreeMap<String, Value> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_owned(), v);
        };
        put("NAMESPACE", string(self.config_namespace()));
        if let Some(sa) = &self.service_account {
            put("SERVICE_ACCOUNT", string(sa));
        }
        put("CLUSTER_ID", string(&self.cluster_id));
        if let Some(n) = &self.node_name {
            put("NODE_NAME", string(n));
        }
        if !self.instance_ips.is_empty() {
            let ips: Vec<String> = self.instance_ips.iter().map(ToString::to_string).collect();
            put("INSTANCE_IPS", string(ips.join(",")));
        }
        put("ISTIO_VERSION", string(&self.istio_version));
        // sockmesh speaks no HBONE: ambient endpoints as pod addresses.
        put("DISABLE_HBONE_SEND", string("true"));
        if !self.labels.is_empty() {
            let fields = self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), string(v)))
                .collect();
            put(
                "LABELS",
                Value {
                    kind: Some(ValueKind::StructValue(Struct { fields })),
                },
            );
        }
        for (k, v) in &self.extra {
            put(k, string(v));
        }
        m
    }

    /// The xDS `Node`.
    pub fn node(&self) -> Node {
        Node {
            id: self.node_id(),
            cluster: self.cluster.clone(),
            metadata: Some(Struct {
                fields: self.metadata().into_iter().collect(),
            }),
            locality: self.locality.as_ref().map(|l| Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                sub_zone: l.sub_zone.clone(),
            }),
            user_agent_name: "sockmesh".into(),
            user_agent_version_type: Some(
                sockmesh_proto::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                    env!("CARGO_PKG_VERSION").into(),
                ),
            ),
            ..Default::default()
        }
    }

    /// The node as `/config_dump` shows it: id, cluster, locality and metadata (all
    /// strings but `LABELS`).
    pub fn dump(&self) -> serde_json::Value {
        let metadata: serde_json::Map<String, serde_json::Value> = self
            .metadata()
            .into_iter()
            .map(|(k, v)| {
                let json = match v.kind {
                    Some(ValueKind::StringValue(s)) => serde_json::Value::String(s),
                    Some(ValueKind::StructValue(s)) => s
                        .fields
                        .into_iter()
                        .filter_map(|(k, v)| match v.kind {
                            Some(ValueKind::StringValue(s)) => {
                                Some((k, serde_json::Value::String(s)))
                            }
                            _ => None,
                        })
                        .collect::<serde_json::Map<_, _>>()
                        .into(),
                    _ => serde_json::Value::Null,
                };
                (k, json)
            })
            .collect();
        serde_json::json!({
            "id": self.node_id(),
            "cluster": self.cluster,
            "locality": self.locality.as_ref().map(ToString::to_string),
            "metadata": metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// The DaemonSet's downward API, as `deploy/kubernetes/sockmesh.yaml` sets it
    /// (the flags' environment variables), the pod's name from the host name.
    fn daemonset() -> NodeIdentity {
        NodeIdentity {
            cluster: "sockmesh".into(),
            namespace: Some("sockmesh-system".into()),
            service_account: Some("sockmesh".into()),
            node_name: Some("node-a".into()),
            cluster_id: DEFAULT_CLUSTER_ID.into(),
            istio_version: DEFAULT_ISTIO_VERSION.into(),
            ..Default::default()
        }
        .from_env(&env(&[
            ("HOSTNAME", "sockmesh-x7k2p"),
            ("INSTANCE_IP", "10.0.0.5"),
        ]))
    }

    fn text(m: &BTreeMap<String, Value>, k: &str) -> Option<String> {
        match &m.get(k)?.kind {
            Some(ValueKind::StringValue(s)) => Some(s.clone()),
            other => panic!("{k} is not a string: {other:?}"),
        }
    }

    /// The node id istiod parses (`ParseServiceNodeWithMetadata`): four parts, the
    /// type `sidecar`, one IP, `<pod>.<namespace>` (how it finds the pod), and the
    /// DNS domain whose first label is the config namespace.
    #[test]
    fn node_id_is_istios_sidecar_form() {
        let n = daemonset();
        assert_eq!(
            n.node_id(),
            "sidecar~10.0.0.5~sockmesh-x7k2p.sockmesh-system~sockmesh-system.svc.cluster.local"
        );
        n.validate().expect("valid");
    }

    /// The metadata istiod reads, by its JSON names in `NodeMetadata`, each a
    /// string (istiod's `StringBool` rejects a JSON boolean, `StringList` a list).
    #[test]
    fn metadata_carries_what_istiod_filters_endpoints_by() {
        let m = daemonset().metadata();
        assert_eq!(text(&m, "CLUSTER_ID").as_deref(), Some("Kubernetes"));
        assert_eq!(text(&m, "NODE_NAME").as_deref(), Some("node-a"));
        assert_eq!(text(&m, "NAMESPACE").as_deref(), Some("sockmesh-system"));
        assert_eq!(text(&m, "SERVICE_ACCOUNT").as_deref(), Some("sockmesh"));
        assert_eq!(text(&m, "INSTANCE_IPS").as_deref(), Some("10.0.0.5"));
        assert_eq!(text(&m, "ISTIO_VERSION").as_deref(), Some("1.31.0"));
        assert_eq!(text(&m, "DISABLE_HBONE_SEND").as_deref(), Some("true"));
        // Never sent: they would change what istiod generates (GENERATOR=grpc is
        // the proxyless generator; the others turn on WorkloadEntry registration).
        for k in [
            "GENERATOR",
            "AUTO_REGISTER_GROUP",
            "WORKLOAD_ENTRY",
            "INTERCEPTION_MODE",
        ] {
            assert!(!m.contains_key(k), "{k}");
        }
    }

    #[test]
    fn flags_win_over_the_fallbacks_and_extra_metadata_over_both() {
        let n = NodeIdentity {
            pod_name: Some("agent-1".into()),
            instance_ips: vec![
                "10.0.0.6".parse().expect("ip"),
                "fd00::6".parse().expect("ip"),
            ],
            labels: [("app".to_owned(), "sockmesh".to_owned())].into(),
            extra: vec![
                ("CLUSTER_ID".into(), "east".into()),
                ("DISABLE_HBONE_SEND".into(), "false".into()),
            ],
            ..Default::default()
        }
        .from_env(&env(&[("HOSTNAME", "h"), ("INSTANCE_IP", "10.0.0.5")]));
        assert_eq!(
            n.node_id(),
            "sidecar~10.0.0.6~agent-1.default~default.svc.cluster.local"
        );
        let m = n.metadata();
        assert_eq!(
            text(&m, "INSTANCE_IPS").as_deref(),
            Some("10.0.0.6,fd00::6")
        );
        assert_eq!(text(&m, "CLUSTER_ID").as_deref(), Some("east"));
        assert_eq!(text(&m, "DISABLE_HBONE_SEND").as_deref(), Some("false"));
        match &m["LABELS"].kind {
            Some(ValueKind::StructValue(s)) => {
                assert!(
                    matches!(&s.fields["app"].kind, Some(ValueKind::StringValue(v)) if v == "sockmesh")
                );
            }
            other => panic!("LABELS: {other:?}"),
        }
    }

    #[test]
    fn locality_and_version_are_checked_as_istiod_reads_them() {
        assert_eq!(
            NodeLocality::parse("us-east1/us-east1-b")
                .expect("parses")
                .to_string(),
            "us-east1/us-east1-b/"
        );
        assert!(NodeLocality::parse("").is_err());
        assert!(NodeLocality::parse("a/b/c/d").is_err());
        for ok in [
            "1.31",
            "1.31.0",
            "release-1.28",
            "1.29.2-distroless",
            "1.31-dev",
        ] {
            assert!(is_istio_version(ok), "{ok}");
        }
        for bad in ["", "v1.31.0", "0.8", "1", "1.x", "latest"] {
            assert!(!is_istio_version(bad), "{bad}");
        }
        let n = NodeIdentity {
            id: Some("sockmesh".into()),
            ..daemonset()
        };
        assert_eq!(n.validate(), Err(NodeError::Id("sockmesh".into())));
    }

    #[test]
    fn the_node_sends_its_locality() {
        let n = NodeIdentity {
            locality: Some(NodeLocality::parse("r/z/s").expect("parses")),
            ..daemonset()
        };
        let loc = n.node().locality.expect("locality");
        assert_eq!(
            (
                loc.region.as_str(),
                loc.zone.as_str(),
                loc.sub_zone.as_str()
            ),
            ("r", "z", "s")
        );
        assert_eq!(n.dump()["locality"], "r/z/s");
        assert_eq!(n.dump()["metadata"]["NODE_NAME"], "node-a");
    }
}
