//! `sockmesh agent`: follow an xDS source until SIGTERM/SIGINT.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};

use super::{DEFAULT_ADMIN, DatapathArgs};
use crate::{
    agent::{AgentConfig, Source},
    xds::{
        ads::{TlsFiles, XdsProtocol},
        auth::Credentials,
        node::{DEFAULT_CLUSTER_ID, DEFAULT_ISTIO_VERSION, NodeIdentity, NodeLocality},
    },
};

/// Who the node says it is (see `xds::node` for what istiod does with each).
/// The DaemonSet fills the pod's fields from the downward API.
#[derive(Debug, clap::Args)]
pub struct NodeFlags {
    /// Node id; default: Istio's sidecar form,
    /// sidecar~IP~POD_NAME.NAMESPACE~NAMESPACE.svc.cluster.local.
    #[arg(long, env = "SOCKMESH_NODE_ID")]
    pub node_id: Option<String>,
    /// Node cluster (`Node.cluster`).
    #[arg(long, default_value = "sockmesh", env = "SOCKMESH_NODE_CLUSTER")]
    pub node_cluster: String,
    /// The agent pod's name (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// The agent pod's namespace: istiod's config namespace for the node (whose
    /// Sidecar scope and exportTo visibility it gets), checked against the token.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// The agent's service account, checked against the token.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// The Kubernetes node's name: istiod keeps only this node's endpoints of an
    /// internalTrafficPolicy: Local service.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The node's addresses, comma-separated (default: INSTANCE_IP or POD_IP).
    #[arg(long, env = "INSTANCE_IPS", value_delimiter = ',')]
    pub instance_ips: Vec<std::net::IpAddr>,
    /// The cluster id istiod knows this cluster by (its CLUSTER_ID): endpoints of
    /// cluster-local services (kubernetes.default, *.kube-system) come only for it.
    #[arg(long, default_value = DEFAULT_CLUSTER_ID, env = "SOCKMESH_CLUSTER_ID")]
    pub cluster_id: String,
    /// The Istio version sent as ISTIO_VERSION (istiod's own, ideally).
    #[arg(long, default_value = DEFAULT_ISTIO_VERSION, env = "SOCKMESH_ISTIO_VERSION")]
    pub istio_version: String,
    /// The node's locality, region/zone/subzone (`Node.locality`); istiod prefers
    /// the zone of the Kubernetes node it finds the agent's pod on.
    #[arg(long, env = "SOCKMESH_NODE_LOCALITY")]
    pub node_locality: Option<String>,
    /// A label of the node (LABELS), KEY=VALUE, repeatable.
    #[arg(long = "node-label", value_parser = parse_key_value)]
    pub node_labels: Vec<(String, String)>,
    /// Node metadata, KEY=VALUE, repeatable; overrides the fields above (values
    /// are sent as strings).
    #[arg(long = "node-metadata", value_parser = parse_key_value)]
    pub node_metadata: Vec<(String, String)>,
}

impl NodeFlags {
    /// The identity, with the environment's fallbacks filled in and checked.
    pub fn identity(self) -> Result<NodeIdentity> {
        let env = std::env::vars().collect();
        let node = NodeIdentity {
            id: self.node_id,
            cluster: self.node_cluster,
            pod_name: self.pod_name,
            namespace: self.pod_namespace,
            service_account: self.service_account,
            cluster_id: self.cluster_id,
            node_name: self.node_name,
            instance_ips: self.instance_ips,
            istio_version: self.istio_version,
            locality: self
                .node_locality
                .as_deref()
                .map(NodeLocality::parse)
                .transpose()?,
            labels: self.node_labels.into_iter().collect(),
            extra: self.node_metadata,
        }
        .from_env(&env);
        node.validate()?;
        Ok(node)
    }
}

/// Enrollment: which pods are served, followed through the Kubernetes API.
#[derive(Debug, clap::Args)]
pub struct KubeFlags {
    /// Serve only this node's enrolled pods (label sockmesh.io/enrolled=true on
    /// the namespace or the pod; pods with an Istio sidecar, ambient pods and
    /// host-network pods are left alone), watched through the Kubernetes API:
    /// the programs attach to each enrolled pod's own cgroup below --cgroup,
    /// never to --cgroup itself. Needs --node-name.
    #[arg(long, env = "SOCKMESH_KUBERNETES")]
    pub kubernetes: bool,
    /// The API server, https://HOST:PORT (default: the in-cluster
    /// KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT).
    #[arg(long, env = "SOCKMESH_KUBE_API")]
    pub kube_api: Option<String>,
    /// The CA bundle (PEM) of the API server's certificate.
    #[arg(long, env = "SOCKMESH_KUBE_CA", default_value = crate::k8s::DEFAULT_CA_FILE)]
    pub kube_ca: PathBuf,
    /// The API token (a projected ServiceAccount token), re-read as it rotates.
    #[arg(long, env = "SOCKMESH_KUBE_TOKEN_FILE", default_value = crate::k8s::DEFAULT_TOKEN_FILE)]
    pub kube_token_file: PathBuf,
    /// The kubelet's cgroup driver, which names pod cgroups (default: systemd if
    /// --cgroup ends in .slice, else cgroupfs).
    #[arg(long, value_enum, env = "SOCKMESH_CGROUP_DRIVER")]
    pub cgroup_driver: Option<crate::k8s::CgroupDriver>,
    /// Istio's root namespace, whose Sidecar without workloadSelector applies to
    /// the agent's namespace when that has none of its own.
    #[arg(long, env = "SOCKMESH_ISTIO_ROOT_NAMESPACE", default_value = crate::k8s::DEFAULT_ISTIO_ROOT_NAMESPACE)]
    pub istio_root_namespace: String,
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
    /// Allow a control plane without TLS (grpc://, http://): whoever answers on
    /// that address reprograms every pod's connections. Logged as a warning at
    /// start and shown in /config_dump.
    #[arg(long, env = "SOCKMESH_ALLOW_PLAINTEXT_XDS")]
    pub allow_plaintext_xds: bool,
    #[command(flatten)]
    pub node: NodeFlags,
    #[command(flatten)]
    pub kube: KubeFlags,
    /// CA bundle (PEM) to verify a grpcs:// control plane: istiod's mesh root, the
    /// istio-ca-root-cert ConfigMap's root-cert.pem. Read at every connection.
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
    /// Bearer token sent as `authorization: Bearer` on every ADS stream: a
    /// projected ServiceAccount token, read again at every connection (the kubelet
    /// rotates it).
    #[arg(long, env = "SOCKMESH_XDS_TOKEN_FILE")]
    pub xds_token_file: Option<PathBuf>,
    /// The audience the token must carry (istiod's TOKEN_AUDIENCES).
    #[arg(long, default_value = "istio-ca", env = "SOCKMESH_XDS_TOKEN_AUDIENCE")]
    pub xds_token_audience: String,
    /// Close sockets still connected to an endpoint removed from a service (not one
    /// that is draining), in every network namespace, with inet_diag SOCK_DESTROY.
    #[arg(long, env = "SOCKMESH_TERMINATE_REMOVED_CONNECTIONS")]
    pub terminate_removed_connections: bool,
    /// Admin HTTP server (/healthz, /readyz, /metrics, /config_dump). Loopback by
    /// default; "off" disables it.
    #[arg(long, default_value = DEFAULT_ADMIN, env = "SOCKMESH_ADMIN")]
    pub admin: String,
    /// Write the admin server's bound address (IP:PORT) to this file once it listens
    /// (as Envoy's --admin-address-path; useful with --admin 127.0.0.1:0).
    #[arg(long, env = "SOCKMESH_ADMIN_ADDRESS_FILE")]
    pub admin_address_file: Option<PathBuf>,
    /// Poll interval of the REST (http://) source, e.g. 1s, 500ms.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub xds_refresh: Duration,
    /// The largest xDS response accepted, in bytes: an ADS message, or a REST
    /// body. A larger one ends the stream (or the poll) and is retried.
    #[arg(long, default_value_t = crate::xds::ads::DEFAULT_MAX_MESSAGE_BYTES, env = "SOCKMESH_XDS_MAX_MESSAGE_SIZE")]
    pub xds_max_message_size: usize,
}

impl AgentArgs {
    /// Runs the agent on a two-worker runtime until SIGTERM/SIGINT.
    pub fn execute(self) -> Result<()> {
        let cfg = self.config()?;
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(crate::agent::run(cfg))
    }

    fn config(self) -> Result<AgentConfig> {
        let source = Source::parse(&self.xds)?;
        if source.is_plaintext() && !self.allow_plaintext_xds {
            anyhow::bail!(
                "--xds {:?}: a control plane without TLS is refused (whoever answers there reprograms every pod's connections); use grpcs:// (istiod's secured port 15012) or pass --allow-plaintext-xds",
                self.xds
            );
        }
        let node = self.node.identity()?;
        let credentials = Credentials {
            token_file: self.xds_token_file,
            audience: self.xds_token_audience,
            cluster_id: Some(node.cluster_id.clone()),
            namespace: Some(node.config_namespace().to_owned()),
            service_account: node.service_account.clone(),
        };
        let mut datapath = self.datapath.config();
        let kubernetes = if self.kube.kubernetes {
            let node_name = node
                .node_name
                .clone()
                .ok_or(crate::k8s::K8sError::NoNodeName)?;
            datapath.scope = crate::dataplane::AttachScope::EnrolledPods;
            Some(crate::k8s::KubeConfig {
                api: self.kube.kube_api,
                ca: self.kube.kube_ca,
                token_file: self.kube.kube_token_file,
                node_name,
                namespace: node.config_namespace().to_owned(),
                istio_root_namespace: self.kube.istio_root_namespace,
                driver: self
                    .kube
                    .cgroup_driver
                    .unwrap_or_else(|| crate::k8s::CgroupDriver::detect(&datapath.cgroup)),
                cgroup_root: datapath.cgroup.clone(),
            })
        } else {
            None
        };
        Ok(AgentConfig {
            datapath,
            kubernetes,
            source,
            protocol: self.xds_protocol,
            node,
            credentials,
            tls: TlsFiles {
                ca: self.xds_ca,
                cert: self.xds_cert,
                key: self.xds_key,
                server_name: self.xds_server_name,
            },
            refresh: self.xds_refresh,
            max_message_size: self.xds_max_message_size,
            terminate_removed: self.terminate_removed_connections,
            admin: match self.admin.as_str() {
                "off" | "" => None,
                a => Some(
                    a.parse()
                        .with_context(|| format!("--admin {a:?}: expected IP:PORT or off"))?,
                ),
            },
            admin_address_file: self.admin_address_file,
        })
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 500ms or 2s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn agent(args: &[&str]) -> Result<AgentConfig> {
        let cli = crate::cli::Cli::try_parse_from(
            ["sockmesh", "agent", "--cgroup", "/c"].iter().chain(args),
        )?;
        match cli.command {
            crate::cli::Commands::Agent(a) => a.config(),
            _ => anyhow::bail!("not the agent"),
        }
    }

    #[test]
    fn a_plaintext_control_plane_needs_the_flag() {
        let e = agent(&["--xds", "grpc://istiod:15010"]).expect_err("refused");
        assert!(e.to_string().contains("--allow-plaintext-xds"), "{e}");
        assert!(agent(&["--xds", "http://cp:8080"]).is_err());
        let cfg =
            agent(&["--xds", "grpc://istiod:15010", "--allow-plaintext-xds"]).expect("allowed");
        assert!(cfg.source.is_plaintext());
        let cfg = agent(&["--xds", "grpcs://istiod:15012"]).expect("TLS");
        assert!(!cfg.source.is_plaintext());
        assert!(agent(&["--xds", "file:///etc/x.yaml"]).is_ok());
    }

    #[test]
    fn the_node_identity_is_checked_at_start() {
        let e = agent(&["--xds", "grpcs://i:1", "--istio-version", "latest"]).expect_err("bad");
        assert!(e.to_string().contains("--istio-version"), "{e}");
        let e = agent(&["--xds", "grpcs://i:1", "--node-locality", "a/b/c/d"]).expect_err("bad");
        assert!(e.to_string().contains("--node-locality"), "{e}");
        let cfg = agent(&[
            "--xds",
            "grpcs://i:1",
            "--cluster-id",
            "east",
            "--node-name",
            "n1",
        ])
        .expect("ok");
        assert_eq!(cfg.credentials.cluster_id.as_deref(), Some("east"));
        assert!(cfg.node.metadata().contains_key("NODE_NAME"));
    }

    #[test]
    fn kubernetes_mode_enrolls_pods_below_the_cgroup_and_needs_the_node() {
        let cfg = agent(&["--xds", "grpcs://i:1"]).expect("ok");
        assert_eq!(cfg.datapath.scope, crate::dataplane::AttachScope::Cgroup);
        assert!(cfg.kubernetes.is_none());
        let e = agent(&["--xds", "grpcs://i:1", "--kubernetes"]).expect_err("no node");
        assert!(e.to_string().contains("--node-name"), "{e}");
        let cfg =
            agent(&["--xds", "grpcs://i:1", "--kubernetes", "--node-name", "n1"]).expect("ok");
        assert_eq!(
            cfg.datapath.scope,
            crate::dataplane::AttachScope::EnrolledPods
        );
        let k = cfg.kubernetes.expect("kubernetes");
        assert_eq!(k.node_name, "n1");
        assert_eq!(
            k.driver,
            crate::k8s::CgroupDriver::Cgroupfs,
            "/c is no slice"
        );
        assert_eq!(k.istio_root_namespace, "istio-system");
    }

    #[test]
    fn durations_and_metadata_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3m"), Ok(Duration::from_secs(180)));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("ms").is_err());
        assert_eq!(
            parse_key_value("a=b=c"),
            Ok(("a".to_owned(), "b=c".to_owned()))
        );
        assert!(parse_key_value("nokey").is_err());
    }
}
