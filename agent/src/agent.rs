//! `sockmesh agent`: install (or adopt) the datapath, follow an xDS source, apply
//! every accepted update to the kernel, until SIGTERM/SIGINT. The datapath stays
//! pinned when the agent exits.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use sockmesh_proto::pb::{
    envoy::config::core::v3::Node,
    google::protobuf::{Struct, Value, value::Kind as ValueKind},
};
use tokio::sync::watch;
use tracing::info;

use crate::{
    dataplane::{Datapath, DatapathConfig},
    xds::{
        ads::{self, AdsConfig, TlsFiles, XdsProtocol},
        core::{Core, DatapathHandle},
        file, rest,
    },
};

/// Where the configuration comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Grpc(String),
    File(PathBuf),
    Rest(String),
}

impl Source {
    pub fn parse(url: &str) -> Result<Self> {
        if url.starts_with("grpc://") || url.starts_with("grpcs://") {
            Ok(Source::Grpc(url.to_owned()))
        } else if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                bail!(
                    "--xds {url:?}: file:// needs a path, e.g. file:///etc/sockmesh/resources.yaml"
                );
            }
            Ok(Source::File(PathBuf::from(path)))
        } else if url.starts_with("http://") {
            Ok(Source::Rest(url.to_owned()))
        } else {
            bail!("--xds {url:?}: expected grpc://, grpcs://, http:// or file://")
        }
    }
}

/// The node identity sent to the control plane.
#[derive(Clone, Debug, Default)]
pub struct NodeArgs {
    pub id: Option<String>,
    pub cluster: String,
    pub metadata: Vec<(String, String)>,
}

/// Istio's sidecar form, `sidecar~<POD_IP>~<POD_NAME>.<NAMESPACE>~<NAMESPACE>.svc.cluster.local`,
/// from `INSTANCE_IP`/`POD_IP`, `POD_NAME` (or the host name) and `POD_NAMESPACE`.
pub fn default_node_id(env: &HashMap<String, String>) -> String {
    let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
    let ip = get("INSTANCE_IP")
        .or_else(|| get("POD_IP"))
        .unwrap_or_else(|| "127.0.0.1".into());
    let name = get("POD_NAME")
        .or_else(|| get("HOSTNAME"))
        .unwrap_or_else(|| "sockmesh".into());
    let ns = get("POD_NAMESPACE").unwrap_or_else(|| "default".into());
    format!("sidecar~{ip}~{name}.{ns}~{ns}.svc.cluster.local")
}

impl NodeArgs {
    pub fn node(&self) -> Node {
        let env: HashMap<String, String> = std::env::vars().collect();
        let fields = self
            .metadata
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Value {
                        kind: Some(ValueKind::StringValue(v.clone())),
                    },
                )
            })
            .collect();
        Node {
            id: self.id.clone().unwrap_or_else(|| default_node_id(&env)),
            cluster: self.cluster.clone(),
            metadata: (!self.metadata.is_empty()).then_some(Struct { fields }),
            user_agent_name: "sockmesh".into(),
            ..Default::default()
        }
    }
}

/// Everything `sockmesh agent` needs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub datapath: DatapathConfig,
    pub source: Source,
    pub protocol: XdsProtocol,
    pub node: NodeArgs,
    pub tls: TlsFiles,
    pub refresh: Duration,
    /// Abort sockets still connected to endpoints removed from a service.
    pub terminate_removed: bool,
    /// Admin HTTP address (`None`: no admin server).
    pub admin: Option<std::net::SocketAddr>,
    /// Where to write the admin server's bound address (Envoy's
    /// `--admin-address-path`), useful with port 0.
    pub admin_address_file: Option<PathBuf>,
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    let datapath = Datapath::install(&cfg.datapath)?;
    // A file or REST source reads proto3 JSON/YAML, which needs the protobuf
    // descriptors: decode them now, beside start-up, not inside the first update's
    // latency (a decode that needs them waits for this one; if the thread cannot
    // start, the first decode builds the pool instead). ADS is protobuf throughout
    // and never loads them (about 10 MiB).
    if !matches!(cfg.source, Source::Grpc(_)) {
        let _ = std::thread::Builder::new()
            .name("descriptors".into())
            .spawn(|| {
                let _ = sockmesh_proto::descriptor_pool();
            });
    }
    let terminate_removed = cfg.terminate_removed
        && match crate::dataplane::destroy::probe() {
            Ok(()) => {
                info!("--terminate-removed-connections: inet_diag SOCK_DESTROY available");
                true
            }
            Err(e) => {
                tracing::error!(
                    "--terminate-removed-connections is not available, sockets of removed endpoints will stay open: {e}"
                );
                false
            }
        };
    // The one owner of the kernel maps, on its own thread.
    let kernel = DatapathHandle::spawn(Box::new(datapath), terminate_removed);
    let core = Core::new(kernel);
    let dns_targets = core.dns_targets();
    let core = Arc::new(Mutex::new(core));
    let (stop_tx, stop_rx) = watch::channel(false);
    // STRICT_DNS / LOGICAL_DNS clusters: resolved beside xDS handling, never in it.
    tokio::spawn(crate::xds::dns::run(
        core.clone(),
        dns_targets,
        stop_rx.clone(),
    ));
    if let Some(addr) = cfg.admin {
        let admin = crate::admin::Admin {
            core: core.clone(),
            bpffs: cfg.datapath.bpffs.clone(),
        };
        // The admin server failing (say, its port is taken) must not take the
        // datapath's control loop down with it: it is logged and the agent goes on.
        let stop = stop_rx.clone();
        let address_file = cfg.admin_address_file.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve(addr, address_file, admin, stop).await {
                tracing::error!(error = %e, "admin server stopped");
            }
        });
    }
    let node = cfg.node.node();
    info!(node_id = %node.id, source = ?cfg.source, "agent starting");
    let task = match cfg.source.clone() {
        Source::Grpc(url) => {
            let ads_cfg = AdsConfig {
                url,
                protocol: cfg.protocol,
                node,
                tls: cfg.tls.clone(),
                backoff_base: Duration::from_millis(250),
                backoff_max: Duration::from_secs(30),
            };
            let core = core.clone();
            tokio::spawn(async move {
                ads::run(ads_cfg, core, stop_rx)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        Source::File(path) => {
            let core = core.clone();
            tokio::spawn(async move {
                file::run(path, core, stop_rx)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        Source::Rest(base) => {
            let core = core.clone();
            let refresh = cfg.refresh;
            tokio::spawn(async move {
                rest::run(base, node, refresh, core, stop_rx).await;
                Ok(())
            })
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let abort = task.abort_handle();
    tokio::pin!(task);
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                info!("SIGINT received");
                break;
            }
            _ = term.recv() => {
                info!("SIGTERM received");
                break;
            }
            r = &mut task => {
                r.context("source task")??;
                bail!("the configuration source stopped");
            }
            _ = ticks.tick() => {
                if let Ok(mut core) = core.lock() {
                    core.tick(std::time::Instant::now());
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    abort.abort();
    // The write in progress finishes; the maps are never left half written by us.
    if let Ok(mut core) = core.lock() {
        core.stop_datapath();
    }
    info!("exiting; the datapath stays pinned");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_in_istio_sidecar_form() {
        let env: HashMap<String, String> = [
            ("INSTANCE_IP", "10.1.2.3"),
            ("POD_NAME", "sockmesh-abcde"),
            ("POD_NAMESPACE", "kube-system"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(
            default_node_id(&env),
            "sidecar~10.1.2.3~sockmesh-abcde.kube-system~kube-system.svc.cluster.local"
        );
    }

    #[test]
    fn sources_by_scheme() {
        assert_eq!(
            Source::parse("file:///etc/x.yaml").expect("file"),
            Source::File("/etc/x.yaml".into())
        );
        assert!(matches!(
            Source::parse("grpcs://istiod:15012"),
            Ok(Source::Grpc(_))
        ));
        assert!(matches!(
            Source::parse("http://cp:8080"),
            Ok(Source::Rest(_))
        ));
        assert!(Source::parse("ftp://x").is_err());
        assert!(Source::parse("file://").is_err());
    }
}
