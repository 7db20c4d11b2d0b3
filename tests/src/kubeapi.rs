//! A small Kubernetes API server for the enrollment tests: TLS with a certificate
//! from a CA made in the test, a bearer token, and the list/watch protocol of
//! `/api/v1/pods` and `/api/v1/namespaces` as the real one speaks it
//! (`kubernetes/apiserver`'s `watch` handler, and the API concepts page's
//! "Efficient detection of changes"):
//! - a list answers the collection (`PodList`, `NamespaceList`) with
//!   `metadata.resourceVersion`, the store's revision; `fieldSelector=
//!   spec.nodeName=N` keeps the pods of node N;
//! - `watch=true&resourceVersion=R` answers 200 with a chunked stream of
//!   newline-separated `{"type":"ADDED|MODIFIED|DELETED","object":…}`, every
//!   change after R first, then each as it happens; with
//!   `allowWatchBookmarks=true`, `BOOKMARK` events carry a newer revision and no
//!   object; the stream ends after `timeoutSeconds`;
//! - a watch from a revision older than the history kept gets an `ERROR` event
//!   whose object is a `Status` with code 410 (Gone, reason `Expired`), and the
//!   client must list again.
//!
//! Revisions are one counter over both collections, as etcd's. The test drives
//! changes and watches the requests the agent makes (lists, watch revisions).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Frame},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::pki::TestCa;

/// The collections served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Namespace,
}

impl Kind {
    fn list_kind(self) -> &'static str {
        match self {
            Kind::Pod => "PodList",
            Kind::Namespace => "NamespaceList",
        }
    }
}

/// One request the agent made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    pub kind: Kind,
    pub watch: bool,
    /// The `resourceVersion` parameter.
    pub resource_version: Option<String>,
    pub field_selector: Option<String>,
    pub bookmarks: bool,
}

#[derive(Default)]
struct Store {
    revision: u64,
    objects: BTreeMap<(Kind, String), Value>,
    /// (revision, kind, event type, object), oldest first.
    history: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches from a revision below this get 410 Gone.
    oldest: u64,
    /// Open watches end when this changes (an API server restarting, a load
    /// balancer dropping them).
    generation: u64,
    /// Bookmarks to send: the revision of each.
    bookmarks: Vec<u64>,
    /// Bookmarks written to a watch: (collection, revision).
    delivered: Vec<(Kind, u64)>,
    requests: Vec<Logged>,
    /// Sidecars by namespace; `None`: the Sidecar CRD is not installed (404).
    sidecars: Option<BTreeMap<String, Vec<Value>>>,
}

/// The server; stopped when dropped.
pub struct KubeApi {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    changed: Arc<Notify>,
    _runtime: tokio::runtime::Runtime,
}

impl KubeApi {
    /// Serves on 127.0.0.1 (port 0) with a certificate of `ca` for that address,
    /// expecting `Authorization: Bearer <token>`.
    pub fn start(ca: &TestCa, token: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (cert, key) = ca.server("127.0.0.1");
        let tls = tls_config(&cert, &key);
        let store = Arc::new(Mutex::new(Store::default()));
        let changed = Arc::new(Notify::new());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let ctx = Ctx {
            store: store.clone(),
            changed: changed.clone(),
            token: format!("Bearer {token}"),
        };
        runtime.spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let ctx = ctx.clone();
                        async move { Ok::<_, Infallible>(ctx.handle(&req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            store,
            changed,
            _runtime: runtime,
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn change(&self, f: impl FnOnce(&mut Store)) {
        f(&mut self.store.lock().expect("store"));
        self.changed.notify_waiters();
    }

    /// Creates or replaces an object (ADDED or MODIFIED); returns its revision.
    pub fn put(&self, kind: Kind, mut object: Value) -> u64 {
        let mut revision = 0;
        self.change(|s| {
            s.revision += 1;
            revision = s.revision;
            object["metadata"]["resourceVersion"] = json!(revision.to_string());
            let key = key(kind, &object);
            let event = if s.objects.contains_key(&(kind, key.clone())) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            s.history.push((revision, kind, event, object.clone()));
            s.objects.insert((kind, key), object);
        });
        revision
    }

    /// Deletes an object (DELETED, with its last state); returns the revision.
    pub fn delete(&self, kind: Kind, key: &str) -> u64 {
        let mut revision = 0;
        self.change(|s| {
            let Some(mut object) = s.objects.remove(&(kind, key.to_owned())) else {
                return;
            };
            s.revision += 1;
            revision = s.revision;
            object["metadata"]["resourceVersion"] = json!(revision.to_string());
            s.history.push((revision, kind, "DELETED", object));
        });
        revision
    }

    /// Deletes an object while every watch is down and its history compacted
    /// away: the agent cannot see the deletion as an event; its watch resumes
    /// from a revision too old (410 Gone), and only a new list shows it.
    pub fn delete_unseen(&self, kind: Kind, key: &str) {
        self.change(|s| {
            if s.objects.remove(&(kind, key.to_owned())).is_some() {
                s.revision += 1;
            }
            s.history.clear();
            s.oldest = s.revision + 1;
            s.generation += 1;
        });
    }

    /// Ends every open watch (the agent resumes from its last revision).
    pub fn disconnect(&self) {
        self.change(|s| s.generation += 1);
    }

    /// Sends a BOOKMARK at the current revision on every watch that asked for
    /// bookmarks; returns the revision.
    pub fn bookmark(&self) -> u64 {
        let mut revision = 0;
        self.change(|s| {
            revision = s.revision;
            s.bookmarks.push(revision);
        });
        revision
    }

    /// Makes `sidecars.networking.istio.io` served, with these objects.
    pub fn set_sidecars(&self, namespace: &str, sidecars: Vec<Value>) {
        self.change(|s| {
            s.sidecars
                .get_or_insert_default()
                .insert(namespace.to_owned(), sidecars);
        });
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.store.lock().expect("store").revision
    }

    /// The bookmarks written to watches of `kind` so far, by revision.
    pub fn bookmarks_delivered(&self, kind: Kind) -> Vec<u64> {
        let s = self.store.lock().expect("store");
        s.delivered
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, r)| *r)
            .collect()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.store.lock().expect("store").requests.clone()
    }
}

/// The key of an object: a pod's uid, a namespace's name.
fn key(kind: Kind, object: &Value) -> String {
    let field = match kind {
        Kind::Pod => "uid",
        Kind::Namespace => "name",
    };
    object["metadata"][field]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn tls_config(cert: &str, key: &str) -> rustls::ServerConfig {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key PEM");
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate")
}

type Body = BoxBody<Bytes, Infallible>;

#[derive(Clone)]
struct Ctx {
    store: Arc<Mutex<Store>>,
    changed: Arc<Notify>,
    token: String,
}

/// A `Status` object, as the API server answers errors.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn json_reply(code: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// `%XX` decoding of a query value (`+` is not a space in Kubernetes' selectors).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `object` passes `spec.nodeName=N` (the only field selector served).
fn selected(selector: Option<&str>, object: &Value) -> bool {
    selector
        .and_then(|s| s.strip_prefix("spec.nodeName="))
        .is_none_or(|node| object["spec"]["nodeName"].as_str() == Some(node))
}

impl Ctx {
    fn handle(&self, req: &Request<hyper::body::Incoming>) -> Response<Body> {
        let authorized = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == self.token.as_bytes());
        if !authorized {
            return json_reply(
                StatusCode::UNAUTHORIZED,
                &status(401, "Unauthorized", "Unauthorized"),
            );
        }
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), unescape(v)))
            .collect();
        let path = req.uri().path();
        let kind = match path {
            "/api/v1/pods" => Kind::Pod,
            "/api/v1/namespaces" => Kind::Namespace,
            _ => return self.sidecars(path),
        };
        let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        let selector = query.get("fieldSelector").cloned();
        let logged = Logged {
            kind,
            watch,
            resource_version: query.get("resourceVersion").cloned(),
            field_selector: selector.clone(),
            bookmarks: query
                .get("allowWatchBookmarks")
                .is_some_and(|b| b == "true"),
        };
        let mut store = self.store.lock().expect("store");
        store.requests.push(logged.clone());
        if !watch {
            let items: Vec<Value> = store
                .objects
                .iter()
                .filter(|((k, _), o)| *k == kind && selected(selector.as_deref(), o))
                .map(|(_, o)| o.clone())
                .collect();
            return json_reply(
                StatusCode::OK,
                &json!({"kind": kind.list_kind(), "apiVersion": "v1",
                        "metadata": {"resourceVersion": store.revision.to_string()},
                        "items": items}),
            );
        }
        let from: u64 = logged
            .resource_version
            .as_deref()
            .and_then(|r| r.parse().ok())
            .unwrap_or(store.revision);
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(Duration::from_secs(290), Duration::from_secs);
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
        let watch = Watch {
            kind,
            selector,
            bookmarks: logged.bookmarks,
            sent: from,
            bookmarks_seen: store.bookmarks.len(),
            generation: store.generation,
            gone: from < store.oldest,
        };
        drop(store);
        tokio::spawn(watch.run(self.store.clone(), self.changed.clone(), tx, timeout));
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut r = Response::new(body.boxed());
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    }

    /// `/apis/networking.istio.io/<v>/namespaces/<ns>/sidecars`: 404 unless the
    /// test installed the CRD.
    fn sidecars(&self, path: &str) -> Response<Body> {
        let store = self.store.lock().expect("store");
        let ns = path
            .strip_prefix("/apis/networking.istio.io/")
            .and_then(|p| p.split_once("/namespaces/"))
            .and_then(|(_, rest)| rest.strip_suffix("/sidecars"));
        match (ns, &store.sidecars) {
            (Some(ns), Some(all)) => json_reply(
                StatusCode::OK,
                &json!({"kind": "SidecarList", "apiVersion": "networking.istio.io/v1",
                        "metadata": {"resourceVersion": store.revision.to_string()},
                        "items": all.get(ns).cloned().unwrap_or_default()}),
            ),
            _ => json_reply(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            ),
        }
    }
}

/// One open watch.
struct Watch {
    kind: Kind,
    selector: Option<String>,
    bookmarks: bool,
    /// The revision sent last.
    sent: u64,
    bookmarks_seen: usize,
    generation: u64,
    gone: bool,
}

impl Watch {
    async fn run(
        mut self,
        store: Arc<Mutex<Store>>,
        changed: Arc<Notify>,
        tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
        timeout: Duration,
    ) {
        let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
        if self.gone {
            let e = status(
                410,
                "Expired",
                &format!("too old resource version: {}", self.sent),
            );
            let _ = tx.send(line(json!({"type": "ERROR", "object": e}))).await;
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (events, open) = self.pending(&store);
            for e in events {
                let bookmark = (e["type"] == "BOOKMARK").then(|| {
                    e["object"]["metadata"]["resourceVersion"]
                        .as_str()
                        .and_then(|r| r.parse::<u64>().ok())
                        .unwrap_or_default()
                });
                if tx.send(line(e)).await.is_err() {
                    return;
                }
                if let Some(rev) = bookmark {
                    store
                        .lock()
                        .expect("store")
                        .delivered
                        .push((self.kind, rev));
                }
            }
            if !open {
                return;
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// The events to send now, and whether the watch stays open.
    fn pending(&mut self, store: &Mutex<Store>) -> (Vec<Value>, bool) {
        let s = store.lock().expect("store");
        if s.generation != self.generation {
            return (Vec::new(), false);
        }
        let mut out: Vec<Value> = s
            .history
            .iter()
            .filter(|(rev, kind, _, o)| {
                *rev > self.sent && *kind == self.kind && selected(self.selector.as_deref(), o)
            })
            .map(|(_, _, t, o)| json!({"type": t, "object": o}))
            .collect();
        self.sent = self.sent.max(s.history.last().map_or(0, |h| h.0));
        let new_bookmarks = &s.bookmarks[self.bookmarks_seen.min(s.bookmarks.len())..];
        if self.bookmarks {
            let api_kind = match self.kind {
                Kind::Pod => "Pod",
                Kind::Namespace => "Namespace",
            };
            for rev in new_bookmarks {
                out.push(
                    json!({"type": "BOOKMARK", "object": {"kind": api_kind, "apiVersion": "v1",
                    "metadata": {"resourceVersion": rev.to_string()}}}),
                );
            }
        }
        self.bookmarks_seen = s.bookmarks.len();
        (out, true)
    }
}

/// A pod as the API server serves it: `spec.nodeName`, `status.qosClass`,
/// phase Running; `labels` and `annotations` as given.
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
    host_network: bool,
) -> Value {
    let map = |kv: &[(&str, &str)]| -> serde_json::Map<String, Value> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect()
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid,
            "creationTimestamp": "2026-12-01T00:00:00Z",
            "labels": map(labels), "annotations": map(annotations)},
        "spec": {"nodeName": node, "hostNetwork": host_network, "restartPolicy": "Always",
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
        "status": {"phase": "Running", "qosClass": "BestEffort"}
    })
}

/// A namespace with `labels`.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": crate::unique("ns-"), "labels": labels,
            "creationTimestamp": "2026-12-01T00:00:00Z"},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    })
}
