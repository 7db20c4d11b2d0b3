//! `http://` source: Envoy's REST-JSON xDS. Every `--xds-refresh` the agent POSTs a
//! `DiscoveryRequest` (proto3 JSON) to `/v3/discovery:clusters`, `:endpoints`,
//! `:listeners` and `:routes` in warming order, with the last accepted version, and
//! applies each `DiscoveryResponse` as state of the world. REST has no NACK channel:
//! a rejected response is logged, and the version is not advanced so the next poll
//! asks again.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, StatusCode, body::Bytes};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use sockmesh_proto::pb::{
    envoy::config::core::v3::Node, envoy::service::discovery::v3::DiscoveryRequest,
};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{
    core::{Core, SourceState},
    decode::{Kind, discovery_request_to_json, discovery_response_with_opaque},
    state::Update,
};

fn path(kind: Kind) -> &'static str {
    match kind {
        Kind::Cluster => "/v3/discovery:clusters",
        Kind::Endpoint => "/v3/discovery:endpoints",
        Kind::Listener => "/v3/discovery:listeners",
        Kind::Route => "/v3/discovery:routes",
    }
}

/// Polls `base` (`http://host:port`) until `shutdown`.
pub async fn run(
    base: String,
    node: Node,
    refresh: Duration,
    core: Arc<Mutex<Core>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let base = base.trim_end_matches('/').to_owned();
    loop {
        let mut ok = true;
        for kind in Kind::ALL {
            let (names, version) = match core.lock() {
                Ok(c) => (c.state().wanted(kind), c.state().version(kind)),
                Err(_) => return,
            };
            if !kind.is_wildcard() && names.is_empty() {
                continue;
            }
            let req = DiscoveryRequest {
                version_info: version,
                node: Some(node.clone()),
                resource_names: names,
                type_url: kind.type_url().to_owned(),
                ..Default::default()
            };
            if let Err(e) = poll(&client, &base, kind, &req, &core).await {
                warn!(url = %base, kind = kind.short(), error = %crate::xds::core::chain(&e), "REST xDS poll failed; serving the last good state");
                ok = false;
                break;
            }
        }
        if let Ok(mut c) = core.lock() {
            c.source = if ok {
                SourceState::Connected
            } else {
                SourceState::Disconnected
            };
        }
        tokio::select! {
            () = tokio::time::sleep(refresh) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Why one REST poll failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("encoding the request: {0}")]
    Request(#[source] super::decode::DecodeError),
    #[error("building the request: {0}")]
    Http(#[from] hyper::http::Error),
    #[error("timed out")]
    Timeout,
    #[error(transparent)]
    Client(#[from] hyper_util::client::legacy::Error),
    #[error("reading the body: {0}")]
    Body(#[from] hyper::Error),
    #[error("HTTP {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("{kind} response: {source}")]
    Utf8 {
        kind: &'static str,
        source: super::position::NotUtf8,
    },
    #[error("{kind} response: {source}")]
    Parse {
        kind: &'static str,
        source: super::decode::DecodeError,
    },
    #[error("agent state poisoned")]
    Poisoned,
}

async fn poll(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    base: &str,
    kind: Kind,
    req: &DiscoveryRequest,
    core: &Arc<Mutex<Core>>,
) -> Result<(), PollError> {
    let body = discovery_request_to_json(req).map_err(PollError::Request)?;
    let http = Request::post(format!("{base}{}", path(kind)))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(http))
        .await
        .map_err(|_| PollError::Timeout)??;
    let status = resp.status();
    if status == StatusCode::NOT_MODIFIED {
        debug!(kind = kind.short(), "not modified");
        return Ok(());
    }
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(PollError::Status {
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        });
    }
    let received = Instant::now();
    let kind_name = kind.short();
    let parsed = super::position::utf8(&bytes)
        .map_err(|source| PollError::Utf8 {
            kind: kind_name,
            source,
        })
        .and_then(|text| {
            discovery_response_with_opaque(text).map_err(|source| PollError::Parse {
                kind: kind_name,
                source,
            })
        });
    let written = {
        let mut c = core.lock().map_err(|_| PollError::Poisoned)?;
        let resp = c.document(parsed)?;
        if resp.version_info == c.state().version(kind) && !resp.version_info.is_empty() {
            return Ok(());
        }
        let handled = c.handle(
            Update::SotW {
                kind,
                version: resp.version_info,
                resources: resp.resources,
            },
            received,
        );
        if let Some(nack) = &handled.nack {
            warn!(kind = kind.short(), error = %nack, "REST response refused in part or whole; the valid resources are applied");
        }
        handled.written
    };
    // The next poll (which carries this version) follows the kernel write.
    written.wait().await;
    Ok(())
}
