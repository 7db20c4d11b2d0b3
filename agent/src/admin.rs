//! The admin HTTP server (`--admin`, default 127.0.0.1:15200, loopback unless an
//! operator asks otherwise): `/healthz` (liveness: the process serves), `/readyz`
//! (200 once the control plane's state is in the kernel; 503 "degraded: xDS
//! disconnected" while the last good state is served without a control plane),
//! `/metrics` (Prometheus text) and `/config_dump` (routing table and xDS versions
//! as JSON).

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    task::{Context, Poll},
};

use http_body_util::{Either, Full};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Frame},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tracing::{info, warn};

mod per_service;

use crate::{
    model::RoutingTable,
    xds::{
        core::SourceState,
        view::{Places, View, Viewer},
    },
};

/// What the handlers read: the views the core and the datapath task publish
/// (never the lock the configuration sources hold while they work), the pins,
/// and the enrollment's view.
#[derive(Clone)]
pub struct Admin {
    pub viewer: Viewer,
    /// Where the maps are pinned (kernel counters are read from there).
    pub bpffs: PathBuf,
    /// The pods' enrollment (`--kubernetes`; `None`: one cgroup is served).
    pub enrollment: Option<EnrollmentView>,
}

/// The enroller's published state, read without a lock.
#[derive(Clone)]
pub struct EnrollmentView {
    pub dump: watch::Receiver<crate::k8s::dump::EnrollmentDump>,
    /// Watch event → the pod's programs attached.
    pub latency: prometheus_client::metrics::histogram::Histogram,
}

/// `GET path` from an admin server (`sockmesh status`, tests): (status, body), or
/// `None` if nothing answers within 2 s.
pub fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let timeout = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: sockmesh\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let code = reply.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Some((code, body))
}

/// The body of a chunked transfer coding (`/metrics` is streamed); `None` if
/// it is cut short.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::with_capacity(rest.len());
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        // A chunk extension (`;name=value`) may follow the size.
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// Serves until `shutdown`. With `address_file`, the bound address is written there
/// (atomically: a reader sees the whole address or no file) once the server listens.
pub async fn serve(
    addr: SocketAddr,
    address_file: Option<PathBuf>,
    admin: Admin,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        warn!(
            %addr,
            "the admin server listens beyond loopback: /config_dump shows the node's whole routing table and its pods to whoever reaches it; bind it to 127.0.0.1 unless something must scrape it from outside"
        );
    }
    if let Some(path) = address_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())?;
        std::fs::rename(&tmp, &path)?;
    }
    info!(%addr, "admin server listening");
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => a?,
            _ = shutdown.changed() => return Ok(()),
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req.uri().path()).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                warn!(error = %e, "admin connection");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// A response's body: one buffer, or the chunks a rendering thread sends
/// (`/metrics`).
pub type Body = Either<Full<Bytes>, Chunks>;

/// A body of the chunks a renderer sends, ending when it drops its sender.
pub struct Chunks(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// Answers one request. `/healthz` and `/readyz` read the published views;
/// `/metrics` and `/config_dump` also read the pins and render (at 100,000
/// services, megabytes), on a blocking thread, so neither holds up the other
/// requests.
pub async fn route(admin: &Admin, path: &str) -> Response<Body> {
    if path == "/metrics" {
        return metrics_response(admin);
    }
    route_whole(admin, path).await.map(Either::Left)
}

/// `/metrics`: the page streamed as a blocking thread renders it (the
/// per-service series as it walks the counter array, in chunks).
fn metrics_response(admin: &Admin) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let admin = admin.clone();
    tokio::task::spawn_blocking(move || render_metrics(&admin, &tx));
    let mut r = Response::new(Either::Right(Chunks(rx)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(OPENMETRICS),
    );
    r
}

/// The content type of `/metrics`.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders `/metrics` into `tx`, until the page ends or the reader goes.
fn render_metrics(admin: &Admin, tx: &tokio::sync::mpsc::Sender<Bytes>) {
    let view = admin.viewer.now();
    let bpffs = &admin.bpffs;
    let counters = crate::dataplane::read_counters(bpffs).unwrap_or_default();
    let maps = &view.kernel.maps;
    let conns = crate::dataplane::read_conns_in(bpffs, maps).unwrap_or_default();
    let health = crate::dataplane::read_health_in(bpffs, maps).unwrap_or_default();
    let enrollment = admin.enrollment.as_ref().map(|e| e.dump.borrow().clone());
    let head = metrics_head(
        &view,
        &KernelReads {
            kernel: &counters,
            services: &[],
            conns: &conns,
            health: &health,
        },
        admin
            .enrollment
            .as_ref()
            .zip(enrollment.as_ref())
            .map(|(v, d)| (d, &v.latency)),
    );
    if tx.blocking_send(Bytes::from(head)).is_err() {
        return;
    }
    if let Ok(services) = crate::dataplane::ServiceCounters::open(bpffs) {
        let mut gone = false;
        per_service::stream(|f| services.for_each(f), &mut |chunk| {
            gone = tx.blocking_send(chunk).is_err();
            !gone
        });
        if gone {
            return;
        }
    }
    let _ = tx.blocking_send(Bytes::from_static(EOF.as_bytes()));
}

async fn route_whole(admin: &Admin, path: &str) -> Response<Full<Bytes>> {
    match path {
        // Liveness needs nothing from the agent's state.
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let enrollment = admin.enrollment.as_ref().map(|e| e.dump.borrow().clone());
            let (status, text) = match &enrollment {
                Some(e) if !e.synced => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: waiting for the first list of this node's pods and of the namespaces"
                        .into(),
                ),
                _ => readiness(&admin.viewer.now()),
            };
            reply(status, "text/plain", format!("{text}\n"))
        }
        "/config_dump" => {
            let mut viewer = admin.viewer.clone();
            let Some((view, table)) = viewer.with_table().await else {
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "the agent is stopping\n".into(),
                );
            };
            let admin = admin.clone();
            blocking(move || {
                let health = crate::dataplane::read_health_in(&admin.bpffs, &view.kernel.maps)
                    .unwrap_or_default();
                let enrollment = admin.enrollment.as_ref().map(|e| e.dump.borrow().clone());
                reply(
                    StatusCode::OK,
                    "application/json",
                    config_dump_with(&view, &table, &health, enrollment),
                )
            })
            .await
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /healthz /readyz /metrics /config_dump\n".into(),
        ),
    }
}

/// `f` on the runtime's blocking threads (it reads the pins and renders a large
/// page).
async fn blocking(
    f: impl FnOnce() -> Response<Full<Bytes>> + Send + 'static,
) -> Response<Full<Bytes>> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        )
    })
}

/// Ready once the control plane's LDS and CDS are in the kernel and the source is
/// connected; a disconnected source after that, or kernel maps that lag the
/// accepted configuration, is "degraded" (503). Services this node limits (more
/// endpoints than a service may have, maps at capacity) are reported as
/// "degraded" with 200: the node serves the control plane's configuration as far
/// as its maps allow, and a node limit is the same on the next node and does not
/// pass by waiting, so it must not stall a rolling update that gates on
/// readiness; `sockmesh_services_limited` and `/config_dump` (`limited`) say which.
pub fn readiness(view: &View) -> (StatusCode, std::borrow::Cow<'static, str>) {
    let (status, text) = readiness_state(view);
    let limited = view.core.limited.len();
    if status == StatusCode::OK && limited > 0 {
        return (
            status,
            format!(
                "ready, degraded: {limited} service{} limited by this node's maps (see /config_dump, limited)",
                if limited == 1 { "" } else { "s" }
            )
            .into(),
        );
    }
    (status, text.into())
}

fn readiness_state(view: &View) -> (StatusCode, &'static str) {
    let kernel = &view.kernel;
    let core = &view.core;
    if kernel.migrating {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: migrating from another pin layout (the old datapath serves until this one is filled)",
        );
    }
    if core.synced && kernel.behind {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "degraded: the kernel maps lag the accepted configuration (a write failed; retrying every second)",
        );
    }
    match (core.synced, core.source) {
        (true, SourceState::Connected) if kernel.handled < core.synced_write => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first accepted state is being written to the kernel",
        ),
        (true, SourceState::Connected) => (StatusCode::OK, "ready"),
        (true, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "degraded: xDS disconnected (serving the last good state)",
        ),
        (false, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first xDS state",
        ),
    }
}

/// Prometheus (OpenMetrics text) exposition, built with `prometheus-client` from the
/// agent's state at scrape time; the latency histogram is the one the agent fills.
pub fn metrics(
    view: &View,
    kernel: &[(&str, u64)],
    services: &[(crate::model::ServiceAddr, crate::dataplane::ServiceCounts)],
    conns: &[(crate::model::Endpoint, u64)],
    health: &crate::dataplane::HealthReport,
) -> String {
    metrics_with(
        view,
        &KernelReads {
            kernel,
            services,
            conns,
            health,
        },
        None,
    )
}

/// What `/metrics` read from the pins.
pub struct KernelReads<'a> {
    pub kernel: &'a [(&'a str, u64)],
    pub services: &'a [(crate::model::ServiceAddr, crate::dataplane::ServiceCounts)],
    pub conns: &'a [(crate::model::Endpoint, u64)],
    pub health: &'a crate::dataplane::HealthReport,
}

/// The pods' enrollment and its latency histogram, when pods are enrolled.
pub type Enrolled<'a> = Option<(
    &'a crate::k8s::dump::EnrollmentDump,
    &'a prometheus_client::metrics::histogram::Histogram,
)>;

/// [`metrics`], with the enrollment's series when pods are enrolled.
pub fn metrics_with(view: &View, reads: &KernelReads<'_>, enrollment: Enrolled<'_>) -> String {
    let mut out = metrics_head(view, reads, enrollment);
    // One series per service and counter (200,000 at 100,000 services), written
    // directly: through the registry's families they took most of a scrape.
    per_service::write_counters(&mut out, reads.services);
    out.push_str(EOF);
    out
}

/// Every family but the per-service ones, without the `# EOF` line.
fn metrics_head(view: &View, reads: &KernelReads<'_>, enrollment: Enrolled<'_>) -> String {
    let KernelReads {
        kernel,
        services: _,
        conns,
        health,
    } = *reads;
    let core = &view.core;
    use prometheus_client::{
        encoding::text::encode,
        metrics::{counter::Counter, family::Family, gauge::Gauge},
        registry::Registry,
    };
    type Labels = Vec<(String, String)>;
    let mut r = Registry::default();
    let gauge = |r: &mut Registry, name: &str, help: &str, v: usize| {
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        r.register(name, help, g);
    };
    let counter = |r: &mut Registry, name: &str, help: &str, v: u64| {
        let c: Counter = Counter::default();
        c.inc_by(v);
        r.register(name, help, c);
    };
    gauge(
        &mut r,
        "sockmesh_xds_connected",
        "1 while the configuration source is connected",
        usize::from(core.source == SourceState::Connected),
    );
    let updates: Family<Labels, Counter> = Family::default();
    for (kind, s) in &core.stats {
        for (result, n) in [
            ("received", s.received),
            ("accepted", s.accepted),
            ("rejected", s.rejected),
        ] {
            updates
                .get_or_create(&vec![
                    ("type".to_owned(), kind.short().to_owned()),
                    ("result".to_owned(), result.to_owned()),
                ])
                .inc_by(n);
        }
    }
    r.register(
        "sockmesh_xds_updates",
        "xDS updates by type and result",
        updates,
    );
    let refused: Family<Labels, Gauge> = Family::default();
    for kind in crate::xds::decode::Kind::ALL {
        let n = core
            .refused
            .get(&kind)
            .map_or(0, std::collections::BTreeMap::len);
        refused
            .get_or_create(&vec![("type".to_owned(), kind.short().to_owned())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    r.register(
        "sockmesh_xds_refused_resources",
        "Resources refused (NACKed) that stand refused now, each keeping its last good version (listed in /config_dump)",
        refused,
    );
    gauge(
        &mut r,
        "sockmesh_xds_not_interpreted_listeners",
        "Listeners whose traffic sockmesh leaves alone because their terminal filter is not one it interprets (listed in /config_dump)",
        core.left_alone.len(),
    );
    counter(
        &mut r,
        "sockmesh_xds_ignored_responses",
        "Responses of types sockmesh does not consume",
        core.ignored_types,
    );
    let opaque: Family<Labels, Counter> = Family::default();
    for (type_url, n) in &core.opaque_types {
        opaque
            .get_or_create(&vec![("type_url".to_owned(), type_url.clone())])
            .inc_by(*n);
    }
    r.register(
        "sockmesh_xds_opaque_configs",
        "Nested typed configs of types sockmesh does not know, carried opaquely by the file and REST sources (never read)",
        opaque,
    );
    let unknown: Family<Labels, Counter> = Family::default();
    for (field, n) in &core.unknown_fields {
        unknown
            .get_or_create(&vec![("field".to_owned(), field.clone())])
            .inc_by(*n);
    }
    r.register(
        "sockmesh_xds_unknown_fields",
        "Fields of JSON/YAML documents sockmesh does not know, ignored as Envoy ignores them in dynamic configuration, by Message.field",
        unknown,
    );
    counter(
        &mut r,
        "sockmesh_xds_source_errors",
        "Documents the source could not read or parse (file syntax errors, REST bodies that are not proto3 JSON)",
        core.source_errors,
    );
    let auth: Family<Labels, Counter> = Family::default();
    for (reason, n) in &core.connection.auth_failures {
        auth.get_or_create(&vec![("reason".to_owned(), reason.clone())])
            .inc_by(*n);
    }
    r.register(
        "sockmesh_xds_auth_failures",
        "Failed authentications to the control plane, by reason (token_expired, token_audience, token_identity, token_unreadable, unauthenticated, permission_denied, unknown_ca, name_mismatch, certificate_time, ca_unreadable, tls)",
        auth,
    );
    let resolutions: Family<Labels, Counter> = Family::default();
    let failures: Family<Labels, Counter> = Family::default();
    for (cluster, status) in &core.dns_status {
        let labels = vec![("cluster".to_owned(), cluster.clone())];
        resolutions
            .get_or_create(&labels)
            .inc_by(status.resolutions);
        failures.get_or_create(&labels).inc_by(status.failures);
    }
    r.register(
        "sockmesh_dns_resolutions",
        "Rounds of resolution of a STRICT_DNS/LOGICAL_DNS cluster's host names",
        resolutions,
    );
    r.register(
        "sockmesh_dns_failures",
        "Host-name resolutions that failed (the cluster keeps the last good addresses)",
        failures,
    );
    r.register(
        "sockmesh_update_to_kernel_seconds",
        "Time from an xDS update's arrival to the kernel maps holding it",
        view.latency.clone(),
    );
    // What the kernel holds, not what the state accepted (they differ while a
    // kernel write lags).
    let status = &view.kernel;
    let held = status.usage;
    gauge(
        &mut r,
        "sockmesh_services",
        "Services in the kernel maps",
        held.services,
    );
    gauge(
        &mut r,
        "sockmesh_backends",
        "Backends in the kernel maps",
        held.backends,
    );
    gauge(
        &mut r,
        "sockmesh_kernel_behind",
        "1 while the kernel maps lag the accepted configuration (a write failed; retried every second)",
        usize::from(status.behind),
    );
    if let Some((allocated, resident)) = crate::dataplane::task::heap_bytes() {
        gauge(
            &mut r,
            "sockmesh_heap_allocated_bytes",
            "Bytes the agent's allocator (jemalloc) has allocated to live objects",
            allocated,
        );
        gauge(
            &mut r,
            "sockmesh_heap_resident_bytes",
            "Bytes of the allocator's pages resident in memory (live objects, free space in their pages, metadata)",
            resident,
        );
    }
    let fill: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
    for m in &status.maps {
        fill.get_or_create(&vec![("map".to_owned(), m.label.clone())])
            .set(m.ratio());
    }
    r.register(
        "sockmesh_map_fill_ratio",
        "Used fraction of each map's capacity (maglev: tables of --max-maglev-services); a map that fills is logged once, naming the flag that sizes it",
        fill,
    );
    let limited: Family<Labels, Gauge> = Family::default();
    for reason in [
        crate::xds::fit::Limit::Endpoints,
        crate::xds::fit::Limit::Room,
        crate::xds::fit::Limit::Stale,
        crate::xds::fit::Limit::LeftOut,
    ] {
        let n = core
            .limited
            .iter()
            .filter(|l| l.reason == reason.label())
            .count();
        limited
            .get_or_create(&vec![("reason".to_owned(), reason.label().to_owned())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    r.register(
        "sockmesh_services_limited",
        "Services this node programs otherwise than the configuration asks, by why: endpoints_subset (more endpoints than one service may have), capacity_subset, capacity_stale, capacity_left_out (the maps' capacity)",
        limited,
    );
    counter(
        &mut r,
        "sockmesh_kernel_write_failures",
        "Kernel map writes that failed (the agent retries the whole table every second)",
        status.write_failures,
    );
    counter(
        &mut r,
        "sockmesh_terminated_sockets",
        "Sockets of removed endpoints closed",
        status.terminated,
    );
    let events: Family<Labels, Counter> = Family::default();
    for (name, value) in kernel {
        events
            .get_or_create(&vec![("event".to_owned(), (*name).to_owned())])
            .inc_by(*value);
    }
    r.register(
        "sockmesh_datapath_events",
        "Kernel datapath counters, summed over CPUs",
        events,
    );
    let open: Family<Labels, Gauge> = Family::default();
    for (e, n) in conns.iter().filter(|(_, n)| *n > 0) {
        let backend = match e.addr {
            std::net::IpAddr::V4(ip) => format!("{ip}:{}/{}", e.port, e.protocol),
            std::net::IpAddr::V6(ip) => format!("[{ip}]:{}/{}", e.port, e.protocol),
        };
        open.get_or_create(&vec![("backend".to_owned(), backend)])
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    r.register(
        "sockmesh_backend_connections",
        "Open connections the kernel placed on the backend for least-connections services (counted at connect, released when the socket closes)",
        open,
    );
    let ejections: Family<Labels, Counter> = Family::default();
    let ejected: Family<Labels, Gauge> = Family::default();
    for e in &health.endpoints {
        let labels = vec![
            ("service".to_owned(), e.service.clone()),
            ("backend".to_owned(), e.backend.clone()),
        ];
        ejections
            .get_or_create(&labels)
            .inc_by(u64::from(e.ejections));
        ejected
            .get_or_create(&labels)
            .set(i64::from(e.ejected_for_ms.is_some()));
    }
    r.register(
        "sockmesh_outlier_ejections",
        "Times the kernel ejected the backend from the service after consecutive failed connects (outlier detection)",
        ejections,
    );
    r.register(
        "sockmesh_outlier_ejected",
        "1 while the backend is ejected from the service",
        ejected,
    );
    let overflow: Family<Labels, Counter> = Family::default();
    let service_conns: Family<Labels, Gauge> = Family::default();
    for s in &health.services {
        let labels = vec![("service".to_owned(), s.service.to_string())];
        overflow.get_or_create(&labels).inc_by(s.overflows);
        service_conns
            .get_or_create(&labels)
            .set(i64::try_from(s.connections).unwrap_or(i64::MAX));
    }
    r.register(
        "sockmesh_service_overflow",
        "Connects refused (ECONNREFUSED) because the service had its circuit breaker's max_connections open",
        overflow,
    );
    r.register(
        "sockmesh_service_connections",
        "Open connections of a circuit-breaking service, as the kernel counts them against max_connections",
        service_conns,
    );
    if let Some((dump, latency)) = enrollment {
        crate::k8s::dump::register_metrics(&mut r, dump, latency.clone());
    }
    let mut out = String::new();
    let _ = encode(&mut out, &r);
    let body = out.strip_suffix(EOF).map_or(out.len(), str::len);
    out.truncate(body);
    out
}

/// The line that ends an OpenMetrics exposition.
const EOF: &str = "# EOF\n";

/// The routing table and per-type xDS state as JSON: `view`, with `table`, the
/// table it was published with.
pub fn config_dump(
    view: &View,
    table: &RoutingTable,
    health: &crate::dataplane::HealthReport,
) -> String {
    config_dump_with(view, table, health, None)
}

/// [`config_dump`], with the pods' enrollment.
pub fn config_dump_with(
    view: &View,
    table: &RoutingTable,
    health: &crate::dataplane::HealthReport,
    enrollment: Option<crate::k8s::dump::EnrollmentDump>,
) -> String {
    use crate::admin_types::{ConfigDump, DatapathDump, PushDump, TypeDump, micros};
    let (core, kernel) = (&view.core, &view.kernel);
    ConfigDump {
        enrollment,
        source: format!("{:?}", core.source),
        source_errors: core.source_errors,
        source_last_error: core.source_last_error.clone(),
        synced: core.synced,
        connection: core.connection.clone(),
        push: PushDump {
            pushes: kernel.push.pushes,
            last_map_ops: kernel.push.last_map_ops,
            last_latency_us: micros(kernel.push.last_latency),
            kernel_write_failures: kernel.write_failures,
            terminated_sockets: kernel.terminated,
            writes_in_flight: view.writes_in_flight(),
        },
        datapath: DatapathDump {
            layout_version: sockmesh_common::LAYOUT_VERSION,
            attachment: kernel.attachment.map(|a| format!("{a:?}")),
            retired_layouts: kernel.retired.clone(),
            migrating: kernel.migrating,
            limits: core.limits.into(),
            maps: kernel.maps.clone(),
        },
        xds: core
            .stats
            .iter()
            .map(|(k, s)| {
                let dump = TypeDump {
                    version: s.version.clone(),
                    received: s.received,
                    accepted: s.accepted,
                    rejected: s.rejected,
                    last_error: s.last_error.clone(),
                    rejected_version: s.rejected_version.clone(),
                };
                (k.short().to_owned(), dump)
            })
            .collect(),
        warming: core.warming.iter().map(ToString::to_string).collect(),
        passthrough: core.passthrough.iter().map(ToString::to_string).collect(),
        outlier_ejected: health.ejected().cloned().collect(),
        hash_on_client: core
            .unhashable
            .iter()
            .map(|(s, what)| (s.to_string(), format!("hash policy on {what}")))
            .collect(),
        dns: core
            .dns_answers
            .iter()
            .map(|(cluster, answers)| {
                let status = core.dns_status.get(cluster).cloned().unwrap_or_default();
                let dump = crate::admin_types::DnsDump {
                    hosts: answers.clone().unwrap_or_default(),
                    resolutions: status.resolutions,
                    failures: status.failures,
                    refused: status.refused,
                    last_error: status.last_error,
                };
                (cluster.clone(), dump)
            })
            .collect(),
        unknown_fields: core.unknown_fields.clone(),
        limited: core.limited.clone(),
        refused: core
            .refused
            .iter()
            .map(|(k, m)| (k.short().to_owned(), m.clone()))
            .collect(),
        not_interpreted: core
            .left_alone
            .iter()
            .map(|(listener, why)| crate::admin_types::NotInterpretedDump {
                listener: listener.clone(),
                why: why.clone(),
            })
            .collect(),
        load_balancing: load_balancing(&core.places, &kernel.levels, health),
        services: table.to_json(),
        // The table's backends are counted here, where the table is read: the
        // core publishes its sizes after every update, and a walk of every
        // service there cost each update O(services).
        state: core
            .state_sizes
            .iter()
            .map(|(k, n)| ((*k).to_owned(), *n))
            .chain([(
                "backends".to_owned(),
                table.services.values().map(|s| s.len()).sum(),
            )])
            .collect(),
    }
    .to_json()
}

/// The services with priority levels as the kernel applies them: the levels the
/// datapath task published, the endpoints the kernel has ejected now, each
/// endpoint labelled with its place in the service's assignment (as the core
/// published it).
fn load_balancing(
    places: &std::collections::BTreeMap<crate::model::ServiceAddr, std::sync::Arc<Places>>,
    levels: &crate::dataplane::published::PublishedMap,
    health: &crate::dataplane::HealthReport,
) -> std::collections::BTreeMap<String, crate::admin_levels::LevelsDump> {
    levels
        .iter()
        .map(|(service, published)| {
            let name = service.to_string();
            let ejected = health
                .ejected()
                .filter(|e| e.service == name)
                .filter_map(|e| e.backend.parse::<SocketAddr>().ok())
                .map(|a| (a.ip(), a.port()))
                .collect();
            let places = places.get(service).map(|p| &**p);
            let dump = crate::admin_levels::dump(published, &ejected, places);
            (name, dump)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prometheus_client::metrics::histogram::Histogram;

    use super::*;
    use crate::{
        dataplane::task::{KernelStatus, LATENCY_BUCKETS},
        xds::view::CoreView,
    };

    fn view(synced_write: u64, handled: u64) -> View {
        View {
            core: Arc::new(CoreView {
                synced: true,
                source: SourceState::Connected,
                sent: synced_write,
                synced_write,
                ..CoreView::default()
            }),
            kernel: KernelStatus {
                handled,
                ..KernelStatus::default()
            },
            latency: Histogram::new(LATENCY_BUCKETS),
        }
    }

    #[test]
    fn ready_once_the_kernel_holds_the_first_accepted_state() {
        // Synced and connected, the write that carries the table still in the
        // datapath task: not ready; handled: ready.
        assert_eq!(
            readiness_state(&view(2, 1)).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(readiness_state(&view(2, 2)).0, StatusCode::OK);
        // Later writes in flight do not take readiness away.
        let mut later = view(2, 2);
        Arc::make_mut(&mut later.core).sent = 5;
        assert_eq!(readiness_state(&later).0, StatusCode::OK);
    }

    #[test]
    fn a_chunked_body_reads_as_its_chunks_joined() {
        let body = "5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        assert_eq!(super::dechunk(body).as_deref(), Some("hello, world"));
        // Cut short: no body rather than part of one.
        assert_eq!(super::dechunk("5\r\nhel"), None);
        assert_eq!(super::dechunk("5\r\nhello\r\n"), None);
    }
}
