//! What the benchmarks share to load a mesh into an agent and change it: the
//! capacity flags a large mesh needs, waiting for the kernel to hold it, the
//! agent's resident memory, and batches of endpoint changes.

use std::{net::IpAddr, time::Duration};

use sockmesh::model::{Protocol, ServiceAddr};

use crate::{Bpffs, control_plane::ControlPlane, mesh};

/// `--max-services`, `--max-backends`, `--max-slots` raised past their defaults
/// (65,536 services, 524,288 backends and slots) to need × 1.25 where `services` ×
/// `endpoints` needs it, as an operator of a larger mesh would set them.
pub fn capacity_flags(services: u32, endpoints: u16) -> Vec<String> {
    let entries = services * u32::from(endpoints);
    [
        ("--max-services", services, sockmesh_common::MAX_SERVICES),
        (
            "--max-backends",
            entries,
            sockmesh_common::MAX_BACKENDS_TOTAL,
        ),
        ("--max-slots", entries, sockmesh_common::MAX_SLOTS_TOTAL),
    ]
    .into_iter()
    .filter(|&(_, need, default)| need > default)
    .flat_map(|(flag, need, _)| [flag.to_owned(), (need + need / 4).to_string()])
    .collect()
}

/// Polls the pins in `bpffs` until the last of `services` ([`mesh::service_vip`])
/// has its `endpoints` backends, for at most 120 s from `started`.
pub fn wait_loaded(
    bpffs: &Bpffs,
    services: u32,
    endpoints: u16,
    started: std::time::Instant,
) -> Result<sockmesh::dataplane::KernelMaps, String> {
    let last = ServiceAddr {
        vip: mesh::service_vip(services - 1),
        port: 80,
        protocol: Protocol::Tcp,
    };
    loop {
        if let Ok(r) = sockmesh::dataplane::open_pinned(&bpffs.0)
            && r.reachable(&last)
                .ok()
                .flatten()
                .is_some_and(|b| b.len() == usize::from(endpoints))
        {
            return Ok(r);
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "{services} services not all in the kernel after 120 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Resident memory of process `pid` (VmRSS), KiB; 0 when unreadable.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Of [`rss_kib`], the anonymous memory (heap, stacks) and the file pages (the
/// binary's text), KiB.
pub fn rss_parts_kib(pid: u32) -> (u64, u64) {
    (status_kib(pid, "RssAnon:"), status_kib(pid, "RssFile:"))
}

/// A `/proc/PID/status` field in KiB; 0 when unreadable.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
}

/// The value at quantile `p` (0..=1) of `sorted` (nearest rank; 0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "index"
    )]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Service `i`'s endpoints as [`mesh::services`] made them, with the first one's
/// port moved by `turn` (one endpoint changes per turn).
pub fn endpoints_of(i: u32, endpoints: u16, turn: u16) -> Vec<(IpAddr, u16)> {
    let [_, high, hi, lo] = i.to_be_bytes();
    (0..endpoints)
        .map(|p| {
            let port = 8080 + p + if p == 0 { 1000 * (turn % 2) } else { 0 };
            (IpAddr::from([10, 30 + high, hi, lo]), port)
        })
        .collect()
}

/// Endpoint changes per batch of [`batches`].
pub const BATCH: u32 = 1_000;

/// `count` batches of [`BATCH`] endpoint changes, one per service (services 2..,
/// a different set each batch), each batch published at once: µs from publish
/// until the kernel holds the batch's last change.
pub fn batches(
    cp: &ControlPlane,
    reader: &sockmesh::dataplane::KernelMaps,
    services: u32,
    endpoints: u16,
    count: u32,
) -> Result<Vec<f64>, String> {
    let mut out = Vec::new();
    let others = services.saturating_sub(2);
    if others < BATCH {
        return Err(format!("throughput needs more than {BATCH} services"));
    }
    for b in 0..count {
        let span = others - BATCH + 1;
        let first = 2 + (b * BATCH) % span;
        // Each pass over the services moves their first endpoint's port between
        // two values the background churn never sets (it moves it by 0 or
        // 1,000), so a batch's last change is a real one however many batches and
        // changes of churn ran before.
        let pass = u16::try_from(b * BATCH / span).unwrap_or(u16::MAX);
        let moved = |i: u32| {
            let mut eps = endpoints_of(i, endpoints, 0);
            if let Some(first) = eps.first_mut() {
                first.1 += 2_000 + 1_000 * (pass % 2);
            }
            eps
        };
        let batch: Vec<_> = (first..first + BATCH)
            .map(|i| mesh::assignment(&format!("svc-{i}"), &moved(i)))
            .collect();
        let last = first + BATCH - 1;
        let mut want = moved(last);
        want.sort();
        let target = ServiceAddr {
            vip: mesh::service_vip(last),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let t0 = std::time::Instant::now();
        cp.publish(&batch, false);
        loop {
            if reader
                .reachable(&target)
                .ok()
                .flatten()
                .is_some_and(|got| got == want)
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(format!("throughput batch {b} not in the kernel after 30 s"));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        out.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}
