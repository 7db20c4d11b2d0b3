//! The admin HTTP server (`--admin`, default 127.0.0.1:15200, loopback unless an
//! operator asks otherwise): `/healthz` (liveness: the process serves), `/readyz`
//! (200 once the control plane's state is in the kernel; 503 "degraded: xDS
//! disconnected" while the last good state is served without a control plane),
//! `/metrics` (Prometheus text) and `/config_dump` (routing table and xDS versions
//! as JSON).

use std::{
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::xds::core::{Core, SourceState};

/// What the handlers read.
#[derive(Clone)]
pub struct Admin {
    pub core: Arc<Mutex<Core>>,
    /// Where the maps are pinned (kernel counters are read from there).
    pub bpffs: PathBuf,
}

/// Serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    admin: Admin,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
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
                async move { Ok::<_, Infallible>(route(&admin, req.uri().path())) }
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

/// Answers one request (pure apart from reading the shared state and the pins).
pub fn route(admin: &Admin, path: &str) -> Response<Full<Bytes>> {
    let Ok(core) = admin.core.lock() else {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "state poisoned\n".into(),
        );
    };
    match path {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let (status, text) = readiness(&core);
            reply(status, "text/plain", format!("{text}\n"))
        }
        "/metrics" => {
            let counters = crate::dataplane::read_counters(&admin.bpffs).unwrap_or_default();
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics(&core, &counters),
            )
        }
        "/config_dump" => reply(StatusCode::OK, "application/json", config_dump(&core)),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /healthz /readyz /metrics /config_dump\n".into(),
        ),
    }
}

/// Ready once the control plane's LDS and CDS are in the kernel and the source is
/// connected; a disconnected source after that is "degraded".
pub fn readiness(core: &Core) -> (StatusCode, &'static str) {
    match (core.synced(), core.source) {
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

/// Prometheus text exposition.
pub fn metrics(core: &Core, kernel: &[(&str, u64)]) -> String {
    let mut out = String::new();
    fn header(out: &mut String, name: &str, kind: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    header(
        &mut out,
        "sockmesh_xds_connected",
        "gauge",
        "1 while the configuration source is connected.",
    );
    let _ = writeln!(
        out,
        "sockmesh_xds_connected {}",
        u8::from(core.source == SourceState::Connected)
    );
    header(
        &mut out,
        "sockmesh_xds_updates_total",
        "counter",
        "xDS updates by type and result.",
    );
    for (kind, s) in core.state().stats() {
        for (result, n) in [
            ("received", s.received),
            ("accepted", s.accepted),
            ("rejected", s.rejected),
        ] {
            let _ = writeln!(
                out,
                "sockmesh_xds_updates_total{{type=\"{}\",result=\"{result}\"}} {n}",
                kind.short()
            );
        }
    }
    header(
        &mut out,
        "sockmesh_xds_ignored_responses_total",
        "counter",
        "Responses of types sockmesh does not consume.",
    );
    let _ = writeln!(
        out,
        "sockmesh_xds_ignored_responses_total {}",
        core.ignored_types
    );
    header(
        &mut out,
        "sockmesh_update_to_kernel_seconds",
        "histogram",
        "Time from an xDS update's arrival to the kernel maps holding it.",
    );
    let h = &core.latency;
    let mut cumulative = 0;
    for (bound, count) in h.buckets() {
        cumulative += count;
        let _ = writeln!(
            out,
            "sockmesh_update_to_kernel_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "sockmesh_update_to_kernel_seconds_bucket{{le=\"+Inf\"}} {}",
        h.count()
    );
    let _ = writeln!(out, "sockmesh_update_to_kernel_seconds_sum {}", h.sum());
    let _ = writeln!(out, "sockmesh_update_to_kernel_seconds_count {}", h.count());
    let table = core.state().table();
    let backends = table.backend_count();
    header(
        &mut out,
        "sockmesh_services",
        "gauge",
        "Services in the kernel maps.",
    );
    let _ = writeln!(out, "sockmesh_services {}", table.services.len());
    header(
        &mut out,
        "sockmesh_backends",
        "gauge",
        "Backends in the kernel maps.",
    );
    let _ = writeln!(out, "sockmesh_backends {backends}");
    header(
        &mut out,
        "sockmesh_map_fill_ratio",
        "gauge",
        "Used fraction of each map's capacity.",
    );
    let _ = writeln!(
        out,
        "sockmesh_map_fill_ratio{{map=\"services\"}} {}",
        table.services.len() as f64 / f64::from(sockmesh_common::MAX_SERVICES)
    );
    let _ = writeln!(
        out,
        "sockmesh_map_fill_ratio{{map=\"backends\"}} {}",
        backends as f64 / f64::from(sockmesh_common::MAX_BACKENDS_TOTAL)
    );
    header(
        &mut out,
        "sockmesh_terminated_sockets_total",
        "counter",
        "Sockets of removed endpoints closed.",
    );
    let _ = writeln!(out, "sockmesh_terminated_sockets_total {}", core.terminated);
    header(
        &mut out,
        "sockmesh_datapath_events_total",
        "counter",
        "Kernel datapath counters, summed over CPUs.",
    );
    for (name, value) in kernel {
        let _ = writeln!(
            out,
            "sockmesh_datapath_events_total{{event=\"{name}\"}} {value}"
        );
    }
    out
}

/// The routing table and per-type xDS state as JSON.
pub fn config_dump(core: &Core) -> String {
    let types: serde_json::Map<String, serde_json::Value> = core
        .state()
        .stats()
        .iter()
        .map(|(k, s)| {
            (
                k.short().to_owned(),
                serde_json::json!({
                    "version": s.version, "received": s.received, "accepted": s.accepted,
                    "rejected": s.rejected, "last_error": s.last_error,
                }),
            )
        })
        .collect();
    let dump = serde_json::json!({
        "source": format!("{:?}", core.source),
        "synced": core.synced(),
        "xds": types,
        "warming": core.state().warming().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "services": core.state().table().to_json(),
    });
    serde_json::to_string_pretty(&dump).unwrap_or_default() + "\n"
}
