//! Backend selection on real sockets: equal weights spread evenly, weights are
//! honoured, and a service updated under a tight connect loop never fails a
//! connection nor sends one to a removed backend after the update returns.

use std::{collections::BTreeMap, process::Command};

use sockmesh::model::{Backend, RoutingTable, ServiceAddr};
use sockmesh_tests::{Lines, PodLab, audit::Expect, monotonic_ns, run, scaled};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

type Lab = PodLab;

/// One client namespace, one backend namespace serving `b1`..`b4` on
/// 10.10.1.11..14:8080, a datapath on a fresh cgroup.
fn lab() -> Lab {
    PodLab::new(PROBE, 4, 4)
}

fn service() -> ServiceAddr {
    PodLab::service()
}

fn backend(i: u8) -> Backend {
    PodLab::pod(i)
}

fn table(backends: Vec<Backend>) -> RoutingTable {
    let mut t = RoutingTable::default();
    t.insert(service(), backends);
    t
}

/// One line per connection: (start ns, end ns, backend name or `E<errno>`).
fn connect_loop(lab: &Lab, count: u32, millis: u32) -> Command {
    let mut cmd = lab.client_command(PROBE);
    cmd.args([
        "connect",
        "10.96.0.10:80",
        &count.to_string(),
        &millis.to_string(),
    ]);
    cmd
}

fn parse(out: &str) -> Vec<(u64, String)> {
    parse_timed(out)
        .into_iter()
        .map(|(start, _, name)| (start, name))
        .collect()
}

/// (start ns, end ns, backend name or `E<errno>`) per connection.
fn parse_timed(out: &str) -> Vec<(u64, u64, String)> {
    out.lines()
        .map(|l| {
            let mut f = l.split(' ');
            let start = f.next().and_then(|s| s.parse().ok()).expect("start ns");
            let end = f.next().and_then(|s| s.parse().ok()).expect("end ns");
            (start, end, f.next().unwrap_or("").to_owned())
        })
        .collect()
}

fn histogram(conns: &[(u64, String)]) -> BTreeMap<String, u64> {
    let mut h = BTreeMap::new();
    for (_, name) in conns {
        *h.entry(name.clone()).or_insert(0) += 1;
    }
    h
}

/// Pearson's chi-squared statistic of observed counts against expected shares.
fn chi_squared(hist: &BTreeMap<String, u64>, expected: &[(&str, f64)]) -> f64 {
    let total: u64 = hist.values().sum();
    expected
        .iter()
        .map(|(name, share)| {
            let e = share * total as f64;
            let o = *hist.get(*name).unwrap_or(&0) as f64;
            (o - e).powi(2) / e
        })
        .sum()
}

#[test]
fn equal_weights_spread_evenly_and_weights_are_honoured() {
    let mut lab = lab();
    lab.dp()
        .apply(&table(vec![backend(1), backend(2), backend(3)]))
        .expect("apply");
    let conns = parse(&run(connect_loop(&lab, 3000, 60_000)));
    let hist = histogram(&conns);
    assert_eq!(conns.len(), 3000);
    assert_eq!(
        hist.keys().collect::<Vec<_>>(),
        ["b1", "b2", "b3"],
        "{hist:?}"
    );
    // 2 degrees of freedom: P(chi2 > 32.24) = 1e-7 for a fair pick (the kernel's
    // random numbers cannot be seeded, so the bound is set for a false-failure rate
    // below 1e-6 per run). A pick 40/30/30 instead of even gives chi2 ≈ 60 here.
    let chi = chi_squared(
        &hist,
        &[("b1", 1.0 / 3.0), ("b2", 1.0 / 3.0), ("b3", 1.0 / 3.0)],
    );
    assert!(chi < 32.24, "uneven spread {hist:?}, chi2 {chi:.2}");

    lab.dp()
        .apply(&table(vec![backend(1).weighted(1), backend(2).weighted(3)]))
        .expect("apply weights");
    let conns = parse(&run(connect_loop(&lab, 2000, 60_000)));
    let hist = histogram(&conns);
    assert_eq!(hist.keys().collect::<Vec<_>>(), ["b1", "b2"], "{hist:?}");
    // 1 degree of freedom: P(chi2 > 28.37) = 1e-7 for a 1:3 pick; 1:2 instead
    // (33/67 %) gives chi2 ≈ 74.
    let chi = chi_squared(&hist, &[("b1", 0.25), ("b2", 0.75)]);
    assert!(
        chi < 28.37,
        "weights 1:3 not honoured {hist:?}, chi2 {chi:.2}"
    );
    lab.finish(&Expect::services(1, 2));
}

#[test]
fn updates_under_a_tight_connect_loop_lose_nothing() {
    let mut lab = lab();
    // Rotate a three-backend window over b1..b4: every step adds one backend and
    // removes another, while the client connects as fast as it can.
    let sets: [[u8; 3]; 4] = [[1, 2, 3], [2, 3, 4], [3, 4, 1], [4, 1, 2]];
    let names = |set: &[u8; 3]| set.map(|i| format!("b{i}"));
    lab.dp()
        .apply(&table(sets[0].iter().map(|&i| backend(i)).collect()))
        .expect("apply");
    // The client's window is long enough for every update on a slow (emulated) CPU.
    let window = scaled(std::time::Duration::from_millis(2_500));
    let mut client = connect_loop(
        &lab,
        1_000_000,
        u32::try_from(window.as_millis()).expect("ms"),
    );
    let mut client = client
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("client");
    let lines = Lines::of(&mut client);
    let mut out = vec![lines.next(
        "the client's first connection",
        std::time::Duration::from_secs(10),
    )];
    // (apply began, apply returned, the set it installed).
    let mut applied = Vec::new();
    for step in 1..=40 {
        let set = &sets[step % sets.len()];
        let began = monotonic_ns();
        lab.dp()
            .apply(&table(set.iter().map(|&i| backend(i)).collect()))
            .expect("apply");
        applied.push((began, monotonic_ns(), names(set)));
        // Each step leaves only its own set's entries (the client keeps going).
        lab.audit().assert(
            &format!("step {step}"),
            &Expect::services(1, 3).under_traffic(),
        );
        std::thread::sleep(std::time::Duration::from_millis(40));
    }
    out.extend(lines.rest());
    let _ = client.wait();
    let conns = parse_timed(&out.join("\n"));
    assert!(conns.len() > 1000, "only {} connections", conns.len());
    let failed: Vec<_> = conns
        .iter()
        .filter(|(_, _, n)| n.starts_with('E'))
        .collect();
    assert!(
        failed.is_empty(),
        "{} connections failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // The program picks the backend somewhere inside [start, end]: the set in force
    // then is the last update that had returned before `start`, or one whose apply
    // overlapped the connection. A backend in none of those was removed by an update
    // that had returned, and not added back meanwhile.
    let mut stale = Vec::new();
    let mut checked = 0;
    for (start, end, name) in &conns {
        let Some(before) = applied
            .iter()
            .rposition(|(_, returned, _)| returned < start)
        else {
            continue;
        };
        checked += 1;
        let in_force = applied[before..]
            .iter()
            .enumerate()
            .filter(|(i, (began, returned, _))| *i == 0 || (began < end && returned > start))
            .any(|(_, (_, _, set))| set.contains(name));
        if !in_force {
            stale.push((start, end, name));
        }
    }
    assert!(
        checked > 500,
        "only {checked} connections after the first update"
    );
    assert!(
        stale.is_empty(),
        "{} of {checked} connections reached a removed backend: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    lab.finish(&Expect::services(1, 3));
}
