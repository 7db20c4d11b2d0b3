//! Aggregated Discovery Service client (gRPC, tonic), state-of-the-world and
//! incremental (delta) protocols, as Envoy speaks them:
//! - CDS and LDS wildcard, then EDS and RDS for the names they reference;
//! - every response ACKed (version + nonce) or NACKed (`error_detail`), the previous
//!   state kept on NACK;
//! - reconnect with exponential backoff and full jitter; while disconnected the
//!   kernel keeps the last good table; on reconnect the known versions (SotW) or
//!   resource versions (delta) are sent so the server can skip what we have;
//! - on `grpcs://`, the CA bundle and the bearer token are read again for every
//!   connection (see [`super::auth`]), so a rotated token or root is used on the
//!   next one, and a failed authentication is named, counted and retried.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rand::Rng as _;
use sockmesh_proto::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        },
    },
    google::rpc::Status,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::{info, warn};

use super::{
    auth::{AuthFailure, AuthReason, Credentials, Token},
    core::{Core, SourceState, locked},
    decode::Kind,
    state::Update,
};

/// The largest xDS message accepted by default (`--xds-max-message-size`): a
/// real istiod's responses fit (a full push of 100,000 services, the largest the
/// project measures, fits; istiod itself puts no bound on what it sends), and a
/// message beyond it ends the stream rather than the agent's memory.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Which xDS protocol variant to speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdsProtocol {
    Sotw,
    Delta,
}

/// TLS for `grpcs://`.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// CA bundle to verify the control plane (system roots are not used).
    pub ca: Option<PathBuf>,
    /// Client certificate and key (mutual TLS), both PEM.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Server name to verify, if not the host of the URL.
    pub server_name: Option<String>,
}

#[derive(Clone, Debug)]
pub struct AdsConfig {
    /// `grpc://host:port` or `grpcs://host:port`.
    pub url: String,
    pub protocol: XdsProtocol,
    pub node: Node,
    pub tls: TlsFiles,
    /// The bearer token and `clusterid` sent on every stream.
    pub credentials: Credentials,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// The largest response accepted (`--xds-max-message-size`).
    pub max_message_size: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AdsError {
    #[error("xDS URL {0:?}: expected grpc://HOST:PORT or grpcs://HOST:PORT")]
    Url(String),
    #[error("reading {path}: {source}", path = path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(String),
}

impl AdsError {
    /// A file the endpoint needs could not be read (now: it may appear later,
    /// as a mounted ConfigMap does), as opposed to a configuration mistake.
    fn is_unreadable_file(&self) -> bool {
        matches!(self, AdsError::Read { .. })
    }
}

fn endpoint(cfg: &AdsConfig) -> Result<Endpoint, AdsError> {
    let (tls, rest) = if let Some(rest) = cfg.url.strip_prefix("grpcs://") {
        (true, rest)
    } else if let Some(rest) = cfg.url.strip_prefix("grpc://") {
        (false, rest)
    } else {
        return Err(AdsError::Url(cfg.url.clone()));
    };
    let scheme = if tls { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{rest}"))
        .map_err(|_| AdsError::Url(cfg.url.clone()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if tls {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| AdsError::Read {
                path: p.clone(),
                source,
            })
        };
        let mut t = ClientTlsConfig::new();
        if let Some(ca) = &cfg.tls.ca {
            t = t.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&cfg.tls.cert, &cfg.tls.key) {
            (Some(c), Some(k)) => t = t.identity(Identity::from_pem(read(c)?, read(k)?)),
            (None, None) => {}
            _ => return Err(AdsError::Tls("--xds-cert and --xds-key go together".into())),
        }
        if let Some(name) = &cfg.tls.server_name {
            t = t.domain_name(name.clone());
        }
        ep = ep.tls_config(t).map_err(|e| AdsError::Tls(e.to_string()))?;
    }
    Ok(ep)
}

/// Runs the ADS client until `shutdown` flips to true. Only configuration errors
/// return early; connection failures are retried with backoff.
pub async fn run(
    cfg: AdsConfig,
    core: Arc<Mutex<Core>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AdsError> {
    // A configuration mistake (a bad URL, a certificate without its key) stops
    // the agent at start; a file that cannot be read yet is retried below.
    if let Err(e) = endpoint(&cfg)
        && !e.is_unreadable_file()
    {
        return Err(e);
    }
    let mut attempt: u32 = 0;
    loop {
        let started = Instant::now();
        // The CA bundle and the token are read for every connection: a rotated
        // root or token is picked up without a restart.
        let token = cfg.credentials.token(std::time::SystemTime::now());
        let result = match (endpoint(&cfg), token) {
            (Err(e), _) => Err(SessionError::Setup(AuthFailure {
                reason: AuthReason::CaUnreadable,
                detail: format!("xDS TLS: {e}"),
            })),
            (_, Err(f)) => Err(SessionError::Setup(f)),
            (Ok(ep), Ok(token)) => {
                let r = tokio::select! {
                    r = session(&cfg, &ep, token.as_ref(), &core) => r,
                    _ = shutdown.changed() => return Ok(()),
                };
                r.map_err(|e| match super::auth::classify(&e, token.as_ref()) {
                    Some(f) => SessionError::Setup(f),
                    None => e,
                })
            }
        };
        set_source(&core, SourceState::Disconnected);
        // A session that lasted a while resets the backoff.
        if started.elapsed() > Duration::from_secs(10) {
            attempt = 0;
        }
        let ceiling = cfg
            .backoff_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(cfg.backoff_max);
        let delay = ceiling.mul_f64(rand::rng().random_range(0.5..=1.0));
        attempt = attempt.saturating_add(1);
        match &result {
            Err(SessionError::Setup(f)) => {
                if let Ok(mut c) = core.lock() {
                    c.auth_failure(f);
                }
                warn!(
                    url = %cfg.url,
                    reason = f.reason.label(),
                    retry_in_ms = delay.as_millis(),
                    "xDS authentication failed: {}; serving the last good state",
                    f.detail
                );
            }
            other => {
                let error = match other {
                    Err(e) => crate::xds::core::chain(e),
                    Ok(()) => "stream closed by the server".to_owned(),
                };
                warn!(
                    url = %cfg.url,
                    error,
                    retry_in_ms = delay.as_millis(),
                    "xDS disconnected; serving the last good state"
                );
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

fn set_source(core: &Arc<Mutex<Core>>, s: SourceState) {
    if let Ok(mut c) = core.lock() {
        c.set_source(s);
    }
}

/// Why an ADS session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connect")]
    Connect(#[source] tonic::transport::Error),
    #[error("{call}")]
    Call {
        call: &'static str,
        #[source]
        source: tonic::Status,
    },
    #[error("stream")]
    Stream(#[from] tonic::Status),
    #[error("the request stream closed")]
    RequestsClosed,
    /// The connection could not be secured or authenticated.
    #[error("{0}")]
    Setup(AuthFailure),
    #[error("agent state poisoned")]
    Poisoned,
}

impl<T> From<mpsc::error::SendError<T>> for SessionError {
    fn from(_: mpsc::error::SendError<T>) -> Self {
        Self::RequestsClosed
    }
}

impl<T> From<mpsc::error::TrySendError<T>> for SessionError {
    fn from(_: mpsc::error::TrySendError<T>) -> Self {
        Self::RequestsClosed
    }
}

fn lock(core: &Arc<Mutex<Core>>) -> Result<std::sync::MutexGuard<'_, Core>, SessionError> {
    core.lock().map_err(|_| SessionError::Poisoned)
}

/// [`locked`] for a session: `f` on the core, the runtime's other tasks going
/// on meanwhile.
fn with_core<R>(core: &Mutex<Core>, f: impl FnOnce(&mut Core) -> R) -> Result<R, SessionError> {
    locked(core, f).ok_or(SessionError::Poisoned)
}

/// One connection: returns when the stream ends (Ok(None)) or fails.
async fn session(
    cfg: &AdsConfig,
    ep: &Endpoint,
    token: Option<&Token>,
    core: &Arc<Mutex<Core>>,
) -> Result<(), SessionError> {
    let mut channel: Channel = ep.connect().await.map_err(SessionError::Connect)?;
    info!(url = %cfg.url, protocol = ?cfg.protocol, "xDS connected");
    let call = Call {
        credentials: &cfg.credentials,
        token,
    };
    match cfg.protocol {
        XdsProtocol::Sotw => sotw(cfg, &mut channel, call, core).await,
        XdsProtocol::Delta => delta(cfg, &mut channel, call, core).await,
    }
}

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// What every stream's request carries besides its messages.
#[derive(Clone, Copy)]
struct Call<'a> {
    credentials: &'a Credentials,
    token: Option<&'a Token>,
}

impl Call<'_> {
    /// Opens the call `path`, with the bearer token and `clusterid` metadata;
    /// responses up to `--xds-max-message-size` (a larger one ends the stream
    /// with OUT_OF_RANGE, and is retried).
    async fn open<Req, Resp>(
        self,
        cfg: &AdsConfig,
        channel: &mut Channel,
        path: &'static str,
        requests: mpsc::Receiver<Req>,
    ) -> Result<super::grpc::Responses<Resp>, SessionError>
    where
        Req: prost::Message + 'static,
        Resp: prost::Message + Default,
    {
        let mut metadata = tonic::metadata::MetadataMap::new();
        self.credentials
            .apply(self.token, &mut metadata)
            .map_err(SessionError::Setup)?;
        super::grpc::call(
            channel,
            path,
            metadata,
            ReceiverStream::new(requests),
            cfg.max_message_size,
        )
        .await
        .map_err(|source| SessionError::Call {
            call: path.rsplit('/').next().unwrap_or(path),
            source,
        })
    }
}

/// The kind of a response, or `None` (logged and counted) for a type sockmesh does
/// not consume.
fn consumed_kind(core: &Arc<Mutex<Core>>, type_url: &str) -> Result<Option<Kind>, SessionError> {
    let kind = Kind::from_type_url(type_url);
    if kind.is_none() {
        warn!(
            type_url,
            "ignoring a response of a type sockmesh does not consume"
        );
        lock(core)?.ignored_type();
    }
    Ok(kind)
}

fn nack_status(message: String) -> Status {
    Status {
        code: tonic::Code::InvalidArgument as i32,
        message,
        details: vec![],
    }
}

async fn sotw(
    cfg: &AdsConfig,
    channel: &mut Channel,
    call: Call<'_>,
    core: &Arc<Mutex<Core>>,
) -> Result<(), SessionError> {
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(64);
    // Names last requested and last nonce, per type.
    let mut sent: BTreeMap<Kind, Vec<String>> = BTreeMap::new();
    let mut nonces: BTreeMap<Kind, String> = BTreeMap::new();
    let request =
        |kind: Kind, names: Vec<String>, version: String, nonce: String, error: Option<Status>| {
            DiscoveryRequest {
                version_info: version,
                node: Some(cfg.node.clone()),
                resource_names: names,
                type_url: kind.type_url().to_owned(),
                response_nonce: nonce,
                error_detail: error,
                ..Default::default()
            }
        };
    {
        let c = lock(core)?;
        for kind in Kind::ALL {
            let names = c.state().wanted(kind);
            if !kind.is_wildcard() && names.is_empty() {
                continue;
            }
            sent.insert(kind, names.clone());
            let r = request(kind, names, c.state().version(kind), String::new(), None);
            warn_if_large(&r);
            tx.try_send(r)?;
        }
    }
    let mut stream = call
        .open::<_, DiscoveryResponse>(cfg, channel, SOTW_PATH, rx)
        .await?;
    set_source(core, SourceState::Connected);
    while let Some(resp) = stream.message().await? {
        let received = Instant::now();
        let Some(kind) = consumed_kind(core, &resp.type_url)? else {
            continue;
        };
        nonces.insert(kind, resp.nonce.clone());
        let mut follow_ups = Vec::new();
        let written = with_core(core, |c| {
            let handled = c.handle(
                Update::SotW {
                    kind,
                    version: resp.version_info.clone(),
                    resources: resp.resources,
                },
                received,
            );
            let names = sent.get(&kind).cloned().unwrap_or_default();
            let version = c.state().version(kind);
            let error = handled.nack.as_ref().map(|n| nack_status(n.0.clone()));
            follow_ups.push(request(kind, names, version, resp.nonce, error));
            // New RDS/EDS names: (re)subscribe.
            let resubscribe = handled.subscriptions_changed;
            for k in [Kind::Endpoint, Kind::Route]
                .into_iter()
                .filter(|_| resubscribe)
            {
                let wanted = c.state().wanted(k);
                if sent.get(&k).map_or(!wanted.is_empty(), |s| *s != wanted) {
                    sent.insert(k, wanted.clone());
                    let nonce = nonces.get(&k).cloned().unwrap_or_default();
                    follow_ups.push(request(k, wanted, c.state().version(k), nonce, None));
                }
            }
            handled.written
        })?;
        // The ACK (or NACK) follows the kernel write, as Envoy's follows applying.
        written.wait().await;
        for r in follow_ups {
            warn_if_large(&r);
            tx.send(r).await?;
        }
    }
    Ok(())
}

/// A state-of-the-world request names every resource wanted at once, which the
/// protocol cannot split: past what istiod receives (4 MiB) it is refused. Said
/// once per request, with what to do.
fn warn_if_large(r: &DiscoveryRequest) {
    use prost::Message as _;
    let bytes = r.encoded_len();
    if bytes > super::requests::MAX_REQUEST_BYTES {
        warn!(
            type_url = %r.type_url,
            names = r.resource_names.len(),
            bytes,
            "this state-of-the-world request may exceed the control plane's receive limit (istiod's is 4 MiB by default): use the delta protocol (--xds-protocol delta), which splits subscriptions, or raise the limit (ISTIO_GPRC_MAXRECVMSGSIZE)"
        );
    }
}

async fn delta(
    cfg: &AdsConfig,
    channel: &mut Channel,
    call: Call<'_>,
    core: &Arc<Mutex<Core>>,
) -> Result<(), SessionError> {
    let mut subscribed: BTreeMap<Kind, BTreeSet<String>> = BTreeMap::new();
    // The stream's first requests: what is wanted now, and the versions held of
    // it, split to stay within what the server receives (see `super::requests`).
    let mut first = Vec::new();
    {
        let c = lock(core)?;
        for kind in Kind::ALL {
            let names: BTreeSet<String> = c.state().wanted(kind).into_iter().collect();
            if !kind.is_wildcard() && names.is_empty() {
                continue;
            }
            first.extend(super::requests::initial(
                kind,
                &cfg.node,
                &names,
                c.state().resource_versions(kind),
                super::requests::MAX_REQUEST_BYTES,
            ));
            subscribed.insert(kind, names);
        }
    }
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(first.len().max(64));
    for r in first {
        tx.try_send(r)?;
    }
    let mut stream = call
        .open::<_, DeltaDiscoveryResponse>(cfg, channel, DELTA_PATH, rx)
        .await?;
    set_source(core, SourceState::Connected);
    while let Some(resp) = stream.message().await? {
        let received = Instant::now();
        let Some(kind) = consumed_kind(core, &resp.type_url)? else {
            continue;
        };
        let mut follow_ups = Vec::new();
        let written = with_core(core, |c| {
            let mut removed = resp.removed_resources;
            removed.extend(resp.removed_resource_names.into_iter().map(|n| n.name));
            let added = resp
                .resources
                .into_iter()
                .filter_map(|r| r.resource.map(|any| (r.name, r.version, any)))
                .collect();
            let handled = c.handle(
                Update::Delta {
                    kind,
                    added,
                    removed,
                },
                received,
            );
            follow_ups.push(DeltaDiscoveryRequest {
                type_url: kind.type_url().to_owned(),
                response_nonce: resp.nonce,
                error_detail: handled.nack.as_ref().map(|n| nack_status(n.0.clone())),
                ..Default::default()
            });
            let resubscribe = handled.subscriptions_changed;
            for k in [Kind::Endpoint, Kind::Route]
                .into_iter()
                .filter(|_| resubscribe)
            {
                let wanted: BTreeSet<String> = c.state().wanted(k).into_iter().collect();
                let had = subscribed.entry(k).or_default();
                if *had != wanted {
                    follow_ups.extend(super::requests::changes(
                        k,
                        wanted.difference(had).cloned().collect(),
                        had.difference(&wanted).cloned().collect(),
                        super::requests::MAX_REQUEST_BYTES,
                    ));
                    *had = wanted;
                }
            }
            handled.written
        })?;
        // The ACK (or NACK) follows the kernel write, as Envoy's follows applying.
        written.wait().await;
        for r in follow_ups {
            tx.send(r).await?;
        }
    }
    Ok(())
}
