//! Kubernetes: which of this node's pods sockmesh serves (enrollment).
//!
//! Flow: the API server's pods of this node and every namespace (list, then watch
//! from the list's resourceVersion, resumed from the last one seen, listed again
//! on 410 Gone; [`watch`]) → the decision per pod, pure ([`enroll`]) → the
//! desired set of pod cgroups ([`enroller`]) → the datapath task, which attaches
//! the programs to each and detaches the rest (`dataplane::cgroups`). Besides,
//! [`istio`] checks the Sidecar scope istiod gives the node.
//!
//! Only this module talks to the Kubernetes API.

mod cgwatch;
pub mod dump;
pub mod enroll;
pub mod enroller;
pub mod istio;
mod watch;

use std::path::PathBuf;

pub use enroll::CgroupDriver;

/// Where the service account's API token and the cluster's CA are when the pod
/// mounts them the standard way.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const DEFAULT_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// Istio's root namespace unless told otherwise (meshConfig.rootNamespace).
pub const DEFAULT_ISTIO_ROOT_NAMESPACE: &str = "istio-system";

/// Why the Kubernetes client could not start.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "--kube-api is not set and KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not in the environment (not in a pod?)"
    )]
    NoApiServer,
    #[error("--kube-api {url:?} is not a URL")]
    ApiUrl {
        url: String,
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    #[error("--kube-ca {}", path.display())]
    Ca {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--kube-ca {}: no PEM certificate in it", path.display())]
    CaEmpty { path: PathBuf },
    #[error(
        "--node-name (NODE_NAME) is needed with --kubernetes: the agent watches this node's pods"
    )]
    NoNodeName,
    #[error("the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// How to reach the API server, and what to watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeConfig {
    /// `https://HOST:PORT`; `None`: the in-cluster environment's
    /// (`KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT`).
    pub api: Option<String>,
    /// The CA bundle (PEM) that signed the API server's certificate.
    pub ca: PathBuf,
    /// The bearer token, re-read as the kubelet rotates it.
    pub token_file: PathBuf,
    /// This node's name: only its pods are watched.
    pub node_name: String,
    /// The agent's own namespace (its Sidecar scope is the node's).
    pub namespace: String,
    /// Istio's root namespace (mesh-wide Sidecar defaults live there).
    pub istio_root_namespace: String,
    /// The pods' cgroup root (`--cgroup`).
    pub cgroup_root: PathBuf,
    pub driver: CgroupDriver,
}

impl KubeConfig {
    /// The API server's URL.
    fn url(&self) -> Result<String, K8sError> {
        if let Some(url) = &self.api {
            return Ok(url.clone());
        }
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| K8sError::NoApiServer)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").map_err(|_| K8sError::NoApiServer)?;
        Ok(if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        })
    }

    /// A client for the API server, verified against the CA, with the token.
    pub fn client(&self) -> Result<kube::Client, K8sError> {
        use rustls::pki_types::{CertificateDer, pem::PemObject as _};
        let url = self.url()?;
        let uri: hyper::Uri = url
            .parse()
            .map_err(|source| K8sError::ApiUrl { url, source })?;
        let pem = std::fs::read(&self.ca).map_err(|source| K8sError::Ca {
            path: self.ca.clone(),
            source,
        })?;
        let roots: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&pem)
            .filter_map(Result::ok)
            .map(|c| c.as_ref().to_vec())
            .collect();
        if roots.is_empty() {
            return Err(K8sError::CaEmpty {
                path: self.ca.clone(),
            });
        }
        let mut config = kube::Config::new(uri);
        config.root_cert = Some(roots);
        // kube re-reads both: the CA as it rotates, the token as the kubelet
        // refreshes it.
        config.root_cert_file = Some(self.ca.clone());
        config.auth_info.token_file = Some(self.token_file.display().to_string());
        config.default_namespace.clone_from(&self.namespace);
        kube::Client::try_from(config).map_err(K8sError::Client)
    }
}
