//! The admin server while the agent works: `/readyz` and `/metrics` polled every
//! few milliseconds (as a kubelet probes and Prometheus scrapes, only more often)
//! during a large initial load over ADS and during batches of endpoint changes,
//! each request timed from connect to the last byte of its answer.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    Bpffs, Cgroup, Proc, TempDir, agent_command,
    control_plane::ControlPlane,
    load::{self, percentile},
    mesh, sockmesh_bin_in,
};

/// How long one request may take before it counts as unanswered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One answered (or unanswered) request.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub path: &'static str,
    /// Connect → the last byte of the answer (or → the failure).
    pub latency: Duration,
    /// The HTTP status; 0 when nothing answered.
    pub status: u16,
}

/// `GET path` on `addr`, timed: the status (0 if nothing answered in
/// [`REQUEST_TIMEOUT`]) and the time to the answer's last byte.
pub fn timed_get(addr: SocketAddr, path: &'static str) -> Sample {
    let started = Instant::now();
    let status = (|| {
        let mut s = std::net::TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).ok()?;
        s.set_read_timeout(Some(REQUEST_TIMEOUT)).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: sockmesh\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).ok()?;
        let head = reply.get(..reply.len().min(32))?;
        std::str::from_utf8(head)
            .ok()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    })()
    .unwrap_or(0);
    Sample {
        path,
        latency: started.elapsed(),
        status,
    }
}

/// Threads that each poll one path, one request at a time, `every` apart.
pub struct Poller {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Poller {
    pub fn start(addr: SocketAddr, paths: &[&'static str], every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let threads = paths
            .iter()
            .map(|&path| {
                let (stop, samples) = (stop.clone(), samples.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let s = timed_get(addr, path);
                        if let Ok(mut v) = samples.lock() {
                            v.push(s);
                        }
                        std::thread::sleep(every);
                    }
                })
            })
            .collect();
        Self {
            stop,
            samples,
            threads,
        }
    }

    /// The samples taken since the last call.
    pub fn take(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// Stops the threads (each after its request in flight) and returns the
    /// samples taken since the last [`Self::take`].
    pub fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        self.take()
    }
}

/// p50, p99 and max (ms) of one path's samples, how many there were, and how many
/// went unanswered.
pub fn summary(samples: &[Sample], path: &str) -> Value {
    let mut ms: Vec<f64> = samples
        .iter()
        .filter(|s| s.path == path)
        .map(|s| s.latency.as_secs_f64() * 1e3)
        .collect();
    ms.sort_by(f64::total_cmp);
    let unanswered = samples
        .iter()
        .filter(|s| s.path == path && s.status == 0)
        .count();
    json!({
        "p50_ms": percentile(&ms, 0.5),
        "p99_ms": percentile(&ms, 0.99),
        "max_ms": ms.last().copied().unwrap_or(0.0),
        "n": ms.len(),
        "unanswered": unanswered,
    })
}

/// What [`admin_under_load`] loads and changes.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub services: u32,
    pub endpoints: u16,
    /// Batches of [`load::BATCH`] endpoint changes after the load.
    pub batches: u32,
    /// The pause between one path's requests.
    pub every: Duration,
}

/// The paths polled.
pub const PATHS: [&str; 2] = ["/readyz", "/metrics"];

/// `/readyz` and `/metrics` latency during an initial load of `load.services` ×
/// `load.endpoints` over ADS delta (agent start → all in the kernel) and during
/// `load.batches` batches of 1,000 endpoint changes. `say` prints a line.
pub fn admin_under_load(bin_dir: &Path, load: Load, say: &dyn Fn(&str)) -> Value {
    match run(bin_dir, load, say) {
        Ok(v) => v,
        Err(e) => json!({ "error": e }),
    }
}

fn run(bin_dir: &Path, l: Load, say: &dyn Fn(&str)) -> Result<Value, String> {
    let rt = tokio::runtime::Runtime::new().map_err(|e| format!("tokio runtime: {e}"))?;
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let cp = ControlPlane::new();
    let (addr, _stop) = rt.block_on(cp.serve("127.0.0.1:0".parse().map_err(|_| "addr")?));
    cp.publish(&mesh::services(l.services, l.endpoints), true);
    let scratch = TempDir::new("sockmesh-bench-admin-");
    let address_file = scratch.0.join("admin.addr");
    let log = std::fs::File::create(scratch.0.join("agent.log")).map_err(|e| e.to_string())?;
    say(&format!(
        "\nadmin under load: /readyz and /metrics, each polled {} ms apart, during the load of {} services x {} endpoints and {} batches of {} endpoint changes",
        l.every.as_millis(),
        l.services,
        l.endpoints,
        l.batches,
        load::BATCH
    ));
    let started = Instant::now();
    let agent = agent_command(sockmesh_bin_in(bin_dir), &cgroup, &bpffs)
        .args([
            "--xds",
            &format!("grpc://{addr}"),
            "--xds-protocol",
            "delta",
        ])
        .args(load::capacity_flags(l.services, l.endpoints))
        .args(["--admin", "127.0.0.1:0", "--admin-address-file"])
        .arg(&address_file)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("agent did not start: {e}"))?;
    let agent = Proc(agent);
    let admin = admin_address(&address_file, started)?;
    let poller = Poller::start(admin, &PATHS, l.every);
    let reader = load::wait_loaded(&bpffs, l.services, l.endpoints, started);
    let initial_load = started.elapsed();
    let during_load = poller.take();
    let batches = reader.and_then(|r| load::batches(&cp, &r, l.services, l.endpoints, l.batches));
    let during_batches = poller.stop();
    let rss_kib = load::rss_kib(agent.0.id());
    drop(agent);
    let mut batches = batches?;
    batches.sort_by(f64::total_cmp);
    let mut out = serde_json::Map::new();
    out.insert("services".into(), json!(l.services));
    out.insert("endpoints_per_service".into(), json!(l.endpoints));
    out.insert("poll_ms".into(), json!(l.every.as_millis()));
    out.insert("initial_load_s".into(), json!(initial_load.as_secs_f64()));
    out.insert("agent_rss_kib".into(), json!(rss_kib));
    out.insert("batch_p50_us".into(), json!(percentile(&batches, 0.5)));
    say(&format!(
        "  initial load {:.2} s; {} batches, p50 {:.1} ms",
        initial_load.as_secs_f64(),
        batches.len(),
        percentile(&batches, 0.5) / 1e3
    ));
    for (phase, samples) in [("load", &during_load), ("batches", &during_batches)] {
        let mut by_path = serde_json::Map::new();
        for path in PATHS {
            let s = summary(samples, path);
            say(&format!(
                "  during the {phase:<7} {path:<9} p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  (n={}, unanswered {})",
                s["p50_ms"].as_f64().unwrap_or(0.0),
                s["p99_ms"].as_f64().unwrap_or(0.0),
                s["max_ms"].as_f64().unwrap_or(0.0),
                s["n"],
                s["unanswered"]
            ));
            by_path.insert(path.into(), s);
        }
        out.insert(phase.into(), Value::Object(by_path));
    }
    Ok(Value::Object(out))
}

/// The admin server's address once the agent has written it (at most 60 s from
/// `started`: the verifier runs first).
fn admin_address(file: &Path, started: Instant) -> Result<SocketAddr, String> {
    loop {
        if let Some(a) = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return Ok(a);
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!("no admin address in {} after 60 s", file.display()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
