//! `sockmesh agent`: follow an xDS source until SIGTERM/SIGINT.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};

use super::{DEFAULT_ADMIN, DatapathArgs};
use crate::{
    agent::{AgentConfig, NodeArgs, Source},
    xds::ads::{TlsFiles, XdsProtocol},
};

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
    /// Node id; default is Istio's sidecar form from INSTANCE_IP/POD_IP, POD_NAME, POD_NAMESPACE.
    #[arg(long, env = "SOCKMESH_NODE_ID")]
    pub node_id: Option<String>,
    /// Node cluster.
    #[arg(long, default_value = "sockmesh", env = "SOCKMESH_NODE_CLUSTER")]
    pub node_cluster: String,
    /// Node metadata, KEY=VALUE, repeatable.
    #[arg(long = "node-metadata", value_parser = parse_key_value)]
    pub node_metadata: Vec<(String, String)>,
    /// CA bundle (PEM) to verify a grpcs:// control plane.
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
        Ok(AgentConfig {
            datapath: self.datapath.config(),
            source: Source::parse(&self.xds)?,
            protocol: self.xds_protocol,
            node: NodeArgs {
                id: self.node_id,
                cluster: self.node_cluster,
                metadata: self.node_metadata,
            },
            tls: TlsFiles {
                ca: self.xds_ca,
                cert: self.xds_cert,
                key: self.xds_key,
                server_name: self.xds_server_name,
            },
            refresh: self.xds_refresh,
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
    use super::*;

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
