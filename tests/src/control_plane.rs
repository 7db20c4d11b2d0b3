//! A small, real xDS control plane (ADS over gRPC, SotW and delta) for tests and
//! benchmarks. It holds resources per type, pushes changes to every connected
//! client, and records each request (so tests can see ACKs and NACKs).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Instant,
};

use sockmesh_proto::pb::{
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        Resource,
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
    },
    google::protobuf::Any,
};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// One request a client sent.
#[derive(Clone, Debug)]
pub struct Seen {
    pub type_url: String,
    pub version: String,
    pub nonce: String,
    pub names: Vec<String>,
    pub error: Option<String>,
    pub delta: bool,
    /// The request's `node` (sent on a stream's first request).
    pub node: Option<sockmesh_proto::pb::envoy::config::core::v3::Node>,
}

/// One stream a client opened: the gRPC metadata it authenticated with.
#[derive(Clone, Debug)]
pub struct Opened {
    pub authorization: Option<String>,
    pub cluster_id: Option<String>,
    /// Whether the stream was refused (its token was not the one required).
    pub refused: bool,
}

#[derive(Default)]
struct Store {
    version: u64,
    /// type_url → name → (version, body).
    resources: BTreeMap<String, BTreeMap<String, (u64, Any)>>,
    type_versions: BTreeMap<String, u64>,
    seen: Vec<Seen>,
    nonce: u64,
    /// Every nonce sent, with its response's type.
    sent_nonces: Vec<(String, String)>,
    /// When each version was published.
    published: BTreeMap<u64, Instant>,
    /// Names (type_url, name) each version touched.
    log: BTreeMap<u64, Vec<(String, String)>>,
    /// Every stream opened.
    opened: Vec<Opened>,
    /// The bearer token a stream must present (`None`: no authentication).
    token: Option<String>,
    /// When the first response of any stream was handed to gRPC.
    first_response: Option<Instant>,
}

impl Store {
    /// State of the world for `type_url`: every resource, or only `names` (for a
    /// type subscribed by name), at the type's current version.
    fn sotw_response(&self, type_url: &str, names: Option<&BTreeSet<String>>) -> DiscoveryResponse {
        let resources = self
            .resources
            .get(type_url)
            .map(|m| {
                m.iter()
                    .filter(|(n, _)| names.is_none_or(|ns| ns.contains(*n)))
                    .map(|(_, (_, a))| a.clone())
                    .collect()
            })
            .unwrap_or_default();
        DiscoveryResponse {
            version_info: self
                .type_versions
                .get(type_url)
                .copied()
                .unwrap_or(0)
                .to_string(),
            resources,
            type_url: type_url.to_owned(),
            ..Default::default()
        }
    }
}

/// The control plane. Clone it freely; all clones share the state.
#[derive(Clone)]
pub struct ControlPlane {
    store: Arc<Mutex<Store>>,
    changed: Arc<Notify>,
    /// Bumped by [`ControlPlane::disconnect_all`]; open streams end when it moves.
    cut: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for ControlPlane {
    fn default() -> Self {
        Self {
            store: Arc::default(),
            changed: Arc::default(),
            cut: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

const WILDCARD: [&str; 2] = [
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
];

impl ControlPlane {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets some resources (by name, inferred from the body) of their types; with
    /// `replace`, resources of those types not listed are removed. Returns the new
    /// version and notifies the clients.
    pub fn publish(&self, resources: &[(String, Any)], replace: bool) -> u64 {
        let mut s = self.store.lock().expect("store");
        s.version += 1;
        let v = s.version;
        let types: BTreeSet<String> = resources.iter().map(|(_, a)| a.type_url.clone()).collect();
        let mut touched = Vec::new();
        for t in &types {
            if replace {
                let old = std::mem::take(s.resources.entry(t.clone()).or_default());
                touched.extend(old.into_keys().map(|n| (t.clone(), n)));
            }
            s.type_versions.insert(t.clone(), v);
        }
        touched.extend(
            resources
                .iter()
                .map(|(n, a)| (a.type_url.clone(), n.clone())),
        );
        s.log.insert(v, touched);
        for (name, any) in resources {
            s.resources
                .entry(any.type_url.clone())
                .or_default()
                .insert(name.clone(), (v, any.clone()));
        }
        s.published.insert(v, Instant::now());
        drop(s);
        self.changed.notify_waiters();
        v
    }

    /// Removes resources of a type by name.
    pub fn remove(&self, type_url: &str, names: &[&str]) -> u64 {
        let mut s = self.store.lock().expect("store");
        s.version += 1;
        let v = s.version;
        if let Some(m) = s.resources.get_mut(type_url) {
            for n in names {
                m.remove(*n);
            }
        }
        let touched = names
            .iter()
            .map(|n| (type_url.to_owned(), (*n).to_owned()))
            .collect();
        s.log.insert(v, touched);
        s.type_versions.insert(type_url.to_owned(), v);
        s.published.insert(v, Instant::now());
        drop(s);
        self.changed.notify_waiters();
        v
    }

    /// Removes every resource of every type, as a control plane whose mesh is
    /// gone (every service deleted) answers: empty lists.
    pub fn remove_all(&self) -> u64 {
        let mut s = self.store.lock().expect("store");
        s.version += 1;
        let v = s.version;
        let types: Vec<String> = s.resources.keys().cloned().collect();
        let mut touched = Vec::new();
        for t in types {
            let old = std::mem::take(s.resources.entry(t.clone()).or_default());
            touched.extend(old.into_keys().map(|n| (t.clone(), n)));
            s.type_versions.insert(t, v);
        }
        s.log.insert(v, touched);
        s.published.insert(v, Instant::now());
        drop(s);
        self.changed.notify_waiters();
        v
    }

    /// Ends every open stream (the clients see the server go away).
    pub fn disconnect_all(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// When version `v` was published.
    pub fn published_at(&self, v: u64) -> Option<Instant> {
        self.store.lock().expect("store").published.get(&v).copied()
    }

    /// When the first response of any stream was handed to gRPC (the start of
    /// an agent's initial load, its process start and verifier aside).
    pub fn first_response_at(&self) -> Option<Instant> {
        self.store.lock().expect("store").first_response
    }

    fn note_response(&self) {
        let mut s = self.store.lock().expect("store");
        s.first_response.get_or_insert_with(Instant::now);
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.store.lock().expect("store").seen.clone()
    }

    /// Error details of NACKs seen so far.
    pub fn nacks(&self) -> Vec<String> {
        self.seen().into_iter().filter_map(|s| s.error).collect()
    }

    /// Serves on `addr` (e.g. 127.0.0.1:0) until the returned sender is dropped or
    /// fired; returns the bound address.
    pub async fn serve(&self, addr: SocketAddr) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind control plane");
        let local = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let svc = AggregatedDiscoveryServiceServer::new(self.clone())
            .max_decoding_message_size(256 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(no_delay(listener), async {
                    let _ = rx.await;
                })
                .await;
        });
        (local, tx)
    }

    /// From now on, a stream must present `Bearer <token>` (istiod's KubeJWT
    /// authentication on its secured port, with the token review reduced to a
    /// comparison), or is refused with UNAUTHENTICATED as istiod refuses it.
    pub fn require_token(&self, token: &str) {
        self.store.lock().expect("store").token = Some(token.to_owned());
    }

    /// Streams opened so far.
    pub fn opened(&self) -> Vec<Opened> {
        self.store.lock().expect("store").opened.clone()
    }

    fn authenticate(&self, md: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let text = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let authorization = text("authorization");
        let mut s = self.store.lock().expect("store");
        let refused = s
            .token
            .as_ref()
            .is_some_and(|t| authorization.as_deref() != Some(format!("Bearer {t}").as_str()));
        s.opened.push(Opened {
            authorization,
            cluster_id: text("clusterid"),
            refused,
        });
        if refused {
            return Err(Status::unauthenticated(
                "authentication failure: the token is not the one this test accepts",
            ));
        }
        Ok(())
    }

    /// Serves over TLS with `cert` and `key` (PEM) on `addr`, like [`Self::serve`].
    pub async fn serve_tls(
        &self,
        addr: SocketAddr,
        cert: &str,
        key: &str,
    ) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind control plane");
        let local = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let svc = AggregatedDiscoveryServiceServer::new(self.clone());
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key));
        let server = tonic::transport::Server::builder()
            .tls_config(tls)
            .expect("TLS configuration");
        tokio::spawn(async move {
            let _ = server
                .clone()
                .add_service(svc)
                .serve_with_incoming_shutdown(no_delay(listener), async {
                    let _ = rx.await;
                })
                .await;
        });
        (local, tx)
    }

    fn record(&self, seen: Seen) {
        self.store.lock().expect("store").seen.push(seen);
    }

    fn next_nonce(&self, type_url: &str) -> String {
        let mut s = self.store.lock().expect("store");
        s.nonce += 1;
        let nonce = s.nonce.to_string();
        s.sent_nonces.push((type_url.to_owned(), nonce.clone()));
        nonce
    }

    /// (type URL, nonce) of every response sent so far.
    pub fn sent_nonces(&self) -> Vec<(String, String)> {
        self.store.lock().expect("store").sent_nonces.clone()
    }
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for ControlPlane {
    type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.authenticate(request.metadata())?;
        let mut input = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let cp = self.clone();
        let mut cut = self.cut.subscribe();
        tokio::spawn(async move {
            // type_url → (subscribed names (None: wildcard), version sent (None: send))
            let mut subs: BTreeMap<String, (Option<BTreeSet<String>>, Option<u64>)> =
                BTreeMap::new();
            loop {
                let notified = cp.changed.notified();
                // Push whatever changed for the subscribed types.
                let responses: Vec<DiscoveryResponse> = {
                    let s = cp.store.lock().expect("store");
                    let mut out = Vec::new();
                    for (t, (names, sent)) in subs.iter_mut() {
                        let tv = s.type_versions.get(t).copied().unwrap_or(0);
                        if *sent == Some(tv) {
                            continue;
                        }
                        *sent = Some(tv);
                        out.push(s.sotw_response(t, names.as_ref()));
                    }
                    out
                };
                for mut r in responses {
                    r.nonce = cp.next_nonce(&r.type_url);
                    cp.note_response();
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = cut.changed() => return,
                    () = notified => {}
                    msg = input.next() => {
                        let Some(Ok(req)) = msg else { return };
                        cp.record(Seen {
                            type_url: req.type_url.clone(),
                            version: req.version_info.clone(),
                            nonce: req.response_nonce.clone(),
                            names: req.resource_names.clone(),
                            error: req.error_detail.as_ref().map(|e| e.message.clone()),
                            delta: false,
                            node: req.node.clone(),
                        });
                        let names = if WILDCARD.contains(&req.type_url.as_str()) {
                            None
                        } else {
                            Some(req.resource_names.iter().cloned().collect::<BTreeSet<_>>())
                        };
                        match subs.get_mut(&req.type_url) {
                            // An ACK or NACK of what was sent: nothing new to send.
                            Some(entry) if entry.0 == names => {}
                            // New or changed subscription: send the current state.
                            _ => {
                                subs.insert(req.type_url.clone(), (names, None));
                            }
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.authenticate(request.metadata())?;
        let mut input = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let cp = self.clone();
        let mut cut = self.cut.subscribe();
        tokio::spawn(async move {
            // type_url → (subscribed names (None: wildcard), name → version the client has)
            let mut subs: BTreeMap<String, (Option<BTreeSet<String>>, BTreeMap<String, u64>)> =
                BTreeMap::new();
            let mut seen: u64 = 0;
            let mut rescan: BTreeSet<String> = BTreeSet::new();
            loop {
                let notified = cp.changed.notified();
                let responses: Vec<DeltaDiscoveryResponse> = {
                    let s = cp.store.lock().expect("store");
                    // Names touched since the last pass (from the change log), or
                    // everything of a type whose subscription just changed.
                    let mut touched: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
                    for (_, names) in s.log.range(seen + 1..) {
                        for (t, n) in names {
                            touched.entry(t.as_str()).or_default().insert(n.as_str());
                        }
                    }
                    let mut out = Vec::new();
                    for (t, (names, has)) in subs.iter_mut() {
                        let empty = BTreeMap::new();
                        let current = s.resources.get(t).unwrap_or(&empty);
                        let candidates: BTreeSet<String> = if rescan.contains(t) {
                            current.keys().chain(has.keys()).cloned().collect()
                        } else {
                            touched
                                .get(t.as_str())
                                .map(|n| n.iter().map(|x| (*x).to_owned()).collect())
                                .unwrap_or_default()
                        };
                        let mut added = Vec::new();
                        let mut gone = Vec::new();
                        for n in &candidates {
                            let n = n.as_str();
                            let wanted = names.as_ref().is_none_or(|ns| ns.contains(n));
                            match current.get(n) {
                                Some((v, a)) if wanted => {
                                    if has.get(n) != Some(v) {
                                        has.insert(n.to_owned(), *v);
                                        added.push(Resource {
                                            name: n.to_owned(),
                                            version: v.to_string(),
                                            resource: Some(a.clone()),
                                            ..Default::default()
                                        });
                                    }
                                }
                                _ => {
                                    if has.remove(n).is_some() {
                                        gone.push(n.to_owned());
                                    }
                                }
                            }
                        }
                        if !added.is_empty() || !gone.is_empty() {
                            out.push(DeltaDiscoveryResponse {
                                system_version_info: s.version.to_string(),
                                resources: added,
                                type_url: t.clone(),
                                removed_resources: gone,
                                ..Default::default()
                            });
                        }
                    }
                    seen = s.version;
                    rescan.clear();
                    out
                };
                for mut r in responses {
                    r.nonce = cp.next_nonce(&r.type_url);
                    cp.note_response();
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = cut.changed() => return,
                    () = notified => {}
                    msg = input.next() => {
                        let Some(Ok(req)) = msg else { return };
                        cp.record(Seen {
                            type_url: req.type_url.clone(),
                            version: String::new(),
                            nonce: req.response_nonce.clone(),
                            names: req.resource_names_subscribe.clone(),
                            error: req.error_detail.as_ref().map(|e| e.message.clone()),
                            delta: true,
                            node: req.node.clone(),
                        });
                        let first = !subs.contains_key(&req.type_url);
                        let entry = subs.entry(req.type_url.clone()).or_insert_with(|| {
                            let wildcard = WILDCARD.contains(&req.type_url.as_str())
                                && (req.resource_names_subscribe.is_empty()
                                    || req.resource_names_subscribe.iter().any(|n| n == "*"));
                            (if wildcard { None } else { Some(BTreeSet::new()) }, BTreeMap::new())
                        });
                        if first {
                            for (n, v) in &req.initial_resource_versions {
                                if let Ok(v) = v.parse() {
                                    entry.1.insert(n.clone(), v);
                                }
                            }
                        }
                        if let Some(ns) = entry.0.as_mut() {
                            ns.extend(req.resource_names_subscribe.iter().cloned());
                            for n in &req.resource_names_unsubscribe {
                                ns.remove(n);
                            }
                        }
                        if first
                            || !req.resource_names_subscribe.is_empty()
                            || !req.resource_names_unsubscribe.is_empty()
                        {
                            rescan.insert(req.type_url.clone());
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl ControlPlane {
    /// Serves Envoy's REST-JSON xDS (`POST /v3/discovery:{clusters,endpoints,listeners,routes}`)
    /// on `addr` until the returned sender fires or is dropped.
    pub async fn serve_rest(&self, addr: SocketAddr) -> (SocketAddr, oneshot::Sender<()>) {
        use hyper::{Response as HttpResponse, body::Bytes, service::service_fn};
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind REST");
        let local = listener.local_addr().expect("local addr");
        let (tx, mut rx) = oneshot::channel::<()>();
        let cp = self.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut rx => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                };
                let cp = cp.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let cp = cp.clone();
                        async move {
                            use http_body_util::BodyExt as _;
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let (status, text) = cp.rest_answer(&String::from_utf8_lossy(&body));
                            Ok::<_, std::convert::Infallible>(
                                HttpResponse::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(Bytes::from(text)))
                                    .unwrap_or_else(|_| {
                                        HttpResponse::new(http_body_util::Full::new(Bytes::new()))
                                    }),
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (local, tx)
    }

    fn rest_answer(&self, body: &str) -> (hyper::StatusCode, String) {
        let req = match sockmesh::xds::decode::discovery_request_from_text(body) {
            Ok(r) => r,
            Err(e) => return (hyper::StatusCode::BAD_REQUEST, e.to_string()),
        };
        self.record(Seen {
            type_url: req.type_url.clone(),
            version: req.version_info.clone(),
            nonce: String::new(),
            names: req.resource_names.clone(),
            error: None,
            delta: false,
            node: req.node.clone(),
        });
        let s = self.store.lock().expect("store");
        let tv = s.type_versions.get(&req.type_url).copied().unwrap_or(0);
        if req.version_info == tv.to_string() {
            return (hyper::StatusCode::NOT_MODIFIED, String::new());
        }
        let names: Option<BTreeSet<String>> = (!WILDCARD.contains(&req.type_url.as_str()))
            .then(|| req.resource_names.iter().cloned().collect());
        let resp = s.sotw_response(&req.type_url, names.as_ref());
        match sockmesh::xds::decode::discovery_response_to_json(&resp) {
            Ok(text) => (hyper::StatusCode::OK, text),
            Err(e) => (hyper::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

/// The accepted connections of `listener`, each with `TCP_NODELAY` as a real
/// control plane sets it (Go's net package does by default, so istiod's sockets
/// have it). tonic sets it only on listeners it binds itself: with Nagle on, a
/// large response's last segment waited for the agent's delayed ACK, and one
/// batch of 1,000 endpoint changes in two took 40 ms longer.
fn no_delay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.and_then(|s| {
            s.set_nodelay(true)?;
            Ok(s)
        })
    })
}
