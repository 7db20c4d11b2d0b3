//! `sockmesh agent`: install (or adopt) the datapath, follow an xDS source, apply
//! every accepted update to the kernel, until SIGTERM/SIGINT. The datapath stays
//! pinned when the agent exits.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use tokio::sync::watch;
use tracing::info;

use crate::{
    dataplane::{Datapath, DatapathConfig},
    xds::{
        ads::{self, AdsConfig, TlsFiles, XdsProtocol},
        auth::Credentials,
        core::{Core, DatapathHandle},
        file,
        node::NodeIdentity,
        rest,
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

    /// A network source without TLS.
    pub fn is_plaintext(&self) -> bool {
        match self {
            Source::Grpc(url) => url.starts_with("grpc://"),
            Source::Rest(_) => true,
            Source::File(_) => false,
        }
    }

    /// What `/config_dump` shows as the connection's transport.
    fn transport(&self) -> &'static str {
        match self {
            Source::File(_) => "file",
            s if s.is_plaintext() => "plaintext",
            _ => "tls",
        }
    }

    fn url(&self) -> String {
        match self {
            Source::Grpc(u) | Source::Rest(u) => u.clone(),
            Source::File(p) => format!("file://{}", p.display()),
        }
    }
}

/// Everything `sockmesh agent` needs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub datapath: DatapathConfig,
    pub source: Source,
    pub protocol: XdsProtocol,
    pub node: NodeIdentity,
    pub credentials: Credentials,
    pub tls: TlsFiles,
    pub refresh: Duration,
    /// The largest xDS response accepted (ADS message, REST body).
    pub max_message_size: usize,
    /// Abort sockets still connected to endpoints removed from a service.
    pub terminate_removed: bool,
    /// Admin HTTP address (`None`: no admin server).
    pub admin: Option<std::net::SocketAddr>,
    /// Where to write the admin server's bound address (Envoy's
    /// `--admin-address-path`), useful with port 0.
    pub admin_address_file: Option<PathBuf>,
    /// Serve only the enrolled pods, followed through the Kubernetes API
    /// (`--kubernetes`); `None`: every process of `datapath.cgroup`.
    pub kubernetes: Option<crate::k8s::KubeConfig>,
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    // The API client first: a wrong CA or URL stops the agent before it touches
    // the kernel.
    let kube_client = cfg
        .kubernetes
        .as_ref()
        .map(crate::k8s::KubeConfig::client)
        .transpose()?;
    // A file's first read and decode run beside the datapath's load.
    let ahead = match &cfg.source {
        Source::File(path) => file::ReadAhead::start(path),
        _ => None,
    };
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
    let enroll_handle = kernel.enroller();
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
    let enrollment = match (cfg.kubernetes.clone(), kube_client) {
        (Some(k8s), Some(client)) => {
            let (view_tx, view) = watch::channel(crate::k8s::dump::EnrollmentDump::default());
            let latency = prometheus_client::metrics::histogram::Histogram::new(
                crate::k8s::enroller::LATENCY_BUCKETS,
            );
            tokio::spawn(crate::k8s::enroller::run(
                k8s,
                client,
                enroll_handle,
                view_tx,
                latency.clone(),
                stop_rx.clone(),
            ));
            Some(crate::admin::EnrollmentView {
                dump: view,
                latency,
            })
        }
        _ => None,
    };
    if let Some(addr) = cfg.admin {
        let admin = crate::admin::Admin {
            viewer: core
                .lock()
                .map_err(|_| anyhow::anyhow!("agent state poisoned"))?
                .viewer(),
            bpffs: cfg.datapath.bpffs.clone(),
            enrollment,
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
    if let Ok(mut c) = core.lock() {
        c.set_node_id(&node.id);
        c.set_connection(crate::admin_types::ConnectionDump {
            url: cfg.source.url(),
            transport: cfg.source.transport().to_owned(),
            ca: cfg.tls.ca.as_ref().map(|p| p.display().to_string()),
            token_file: cfg
                .credentials
                .token_file
                .as_ref()
                .map(|p| p.display().to_string()),
            server_name: cfg.tls.server_name.clone(),
            node: cfg.node.dump(),
            ..Default::default()
        });
    }
    if cfg.source.is_plaintext() {
        tracing::warn!(
            url = %cfg.source.url(),
            "the control plane is reached without TLS (--allow-plaintext-xds): whoever answers there reprograms every pod's connections"
        );
    }
    info!(
        node_id = %node.id,
        source = ?cfg.source,
        metadata = %cfg.node.dump()["metadata"],
        "agent starting"
    );
    let task = match cfg.source.clone() {
        Source::Grpc(url) => {
            let ads_cfg = AdsConfig {
                url,
                protocol: cfg.protocol,
                node,
                tls: cfg.tls.clone(),
                credentials: cfg.credentials.clone(),
                backoff_base: Duration::from_millis(250),
                backoff_max: Duration::from_secs(30),
                max_message_size: cfg.max_message_size,
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
                file::run(path, core, stop_rx, ahead)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        Source::Rest(base) => {
            let core = core.clone();
            let refresh = cfg.refresh;
            let limits = rest::RestLimits {
                body_bytes: cfg.max_message_size,
                ..rest::RestLimits::default()
            };
            tokio::spawn(async move {
                rest::run(base, node, refresh, limits, core, stop_rx).await;
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
