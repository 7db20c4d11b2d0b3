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
    core::{Core, SourceState, Written},
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

/// The most one REST exchange may take, request to the body's last byte: a body
/// that trickles must not hold the poller (and the node's configuration) forever.
pub const REST_TIMEOUT: Duration = Duration::from_secs(10);

/// What one REST exchange may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestLimits {
    /// The most bytes of a response body (`--xds-max-message-size`).
    pub body_bytes: usize,
    /// Request to the body's last byte.
    pub timeout: Duration,
}

impl Default for RestLimits {
    fn default() -> Self {
        Self {
            body_bytes: super::ads::DEFAULT_MAX_MESSAGE_BYTES,
            timeout: REST_TIMEOUT,
        }
    }
}

/// Polls `base` (`http://host:port`) until `shutdown`.
pub async fn run(
    base: String,
    node: Node,
    refresh: Duration,
    limits: RestLimits,
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
            if let Err(e) = poll(&client, &base, kind, &req, limits, &core).await {
                warn!(url = %base, kind = kind.short(), error = %crate::xds::core::chain(&e), "REST xDS poll failed; serving the last good state");
                ok = false;
                break;
            }
        }
        if let Ok(mut c) = core.lock() {
            c.set_source(if ok {
                SourceState::Connected
            } else {
                SourceState::Disconnected
            });
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
    #[error("no whole response within {0:?}")]
    Timeout(Duration),
    #[error("the response body exceeds {limit} bytes (--xds-max-message-size)")]
    TooLarge { limit: usize },
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

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// POSTs `body` to `url` and reads the response within `limits`: (status, body).
async fn exchange(
    client: &HttpClient,
    url: String,
    body: String,
    limits: RestLimits,
) -> Result<(StatusCode, Bytes), PollError> {
    let http = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let whole = async {
        let resp = client.request(http).await?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), limits.body_bytes)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => PollError::Body(*e),
                Err(_) => PollError::TooLarge {
                    limit: limits.body_bytes,
                },
            })?;
        Ok::<_, PollError>((status, body.to_bytes()))
    };
    tokio::time::timeout(limits.timeout, whole)
        .await
        .map_err(|_| PollError::Timeout(limits.timeout))?
}

async fn poll(
    client: &HttpClient,
    base: &str,
    kind: Kind,
    req: &DiscoveryRequest,
    limits: RestLimits,
    core: &Arc<Mutex<Core>>,
) -> Result<(), PollError> {
    let body = discovery_request_to_json(req).map_err(PollError::Request)?;
    let (status, bytes) = exchange(client, format!("{base}{}", path(kind)), body, limits).await?;
    if status == StatusCode::NOT_MODIFIED {
        debug!(kind = kind.short(), "not modified");
        return Ok(());
    }
    if !status.is_success() {
        return Err(PollError::Status {
            status,
            body: String::from_utf8_lossy(&bytes[..bytes.len().min(1_024)]).into_owned(),
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
    let written = crate::xds::core::locked(core, |c| -> Result<_, PollError> {
        let resp = c.document(parsed)?;
        if resp.version_info == c.state().version(kind) && !resp.version_info.is_empty() {
            return Ok(Written::none());
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
        Ok(handled.written)
    })
    .ok_or(PollError::Poisoned)??;
    // The next poll (which carries this version) follows the kernel write.
    written.wait().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use hyper_util::rt::TokioIo;

    use super::*;

    /// A server whose every response is `chunks` chunks of `size` bytes, one
    /// every `pause`; its address.
    async fn server(chunks: usize, size: usize, pause: Duration) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        let body = futures_body(chunks, size, pause);
                        Ok::<_, Infallible>(hyper::Response::new(body))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    }

    type Chunks =
        StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

    fn futures_body(chunks: usize, size: usize, pause: Duration) -> Chunks {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for _ in 0..chunks {
                if tx
                    .send(Ok(Frame::data(Bytes::from(vec![b' '; size]))))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(pause).await;
            }
        });
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    #[test]
    fn a_body_past_the_size_or_time_limit_ends_the_poll() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
            let limits = RestLimits {
                body_bytes: 64 << 10,
                timeout: Duration::from_millis(500),
            };
            let get = |addr: std::net::SocketAddr| {
                exchange(
                    &client,
                    format!("http://{addr}/v3/discovery:clusters"),
                    "{}".into(),
                    limits,
                )
            };
            // Within both limits.
            let (status, body) = get(server(4, 1 << 10, Duration::ZERO).await)
                .await
                .expect("small");
            assert_eq!((status, body.len()), (StatusCode::OK, 4 << 10));
            // 128 KiB against a 64 KiB limit.
            let big = get(server(128, 1 << 10, Duration::ZERO).await).await;
            assert!(
                matches!(big, Err(PollError::TooLarge { limit }) if limit == 64 << 10),
                "{big:?}"
            );
            // A body that trickles (a byte every 100 ms) past the time limit.
            let started = Instant::now();
            let slow = get(server(1_000, 1, Duration::from_millis(100)).await).await;
            assert!(matches!(slow, Err(PollError::Timeout(_))), "{slow:?}");
            assert!(started.elapsed() < Duration::from_secs(2));
        });
    }
}
