//! Outlier detection and circuit breaking on real sockets: a backend whose
//! connects fail is ejected by the kernel after `consecutive` failures in a row,
//! returns by itself when its time is up (and is ejected for longer the next
//! time), and a service's open connections stop at `max_connections`.

use std::{collections::BTreeMap, time::Duration};

use sockmesh::{
    dataplane::{EndpointHealthReport, read_health},
    model::{Health, LbPolicy, Outlier, RoutingTable, Service},
};
use sockmesh_tests::{PodLab, audit::Expect, hold, release, run, scaled, wait_until};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

/// Pods 10.10.1.11..13:8080 serve `b1`..`b3`; 10.10.1.14 has no server: its
/// connects are refused (RST), as a crashed pod's are.
fn lab() -> PodLab {
    PodLab::new(PROBE, 4, 3)
}

fn outlier(consecutive: u32, base_ejection_ms: u32) -> Outlier {
    Outlier {
        consecutive,
        enforcing: 100,
        base_ejection_ms,
        max_ejection_ms: 300_000,
        interval_ms: 10_000,
        max_ejection_percent: 100,
        panic_percent: 0,
    }
}

fn table(pods: &[u8], health: Health) -> RoutingTable {
    let mut t = RoutingTable::default();
    t.insert(
        PodLab::service(),
        Service::new(
            pods.iter().map(|&i| PodLab::pod(i)).collect(),
            LbPolicy::Random,
        )
        .with_health(health),
    );
    t
}

/// `count` sequential connects from the lab's client: outcome (backend name or
/// `E<errno>`) → how many.
fn connects(lab: &PodLab, count: u32) -> BTreeMap<String, u32> {
    let mut cmd = lab.client_command(PROBE);
    cmd.args([
        "connect",
        "10.96.0.10:80",
        &count.to_string(),
        &scaled(Duration::from_secs(60)).as_millis().to_string(),
    ]);
    let out = run(cmd);
    let mut seen = BTreeMap::new();
    for line in out.lines() {
        if let Some(what) = line.split_whitespace().nth(2) {
            *seen.entry(what.to_owned()).or_default() += 1;
        }
    }
    assert_eq!(
        seen.values().sum::<u32>(),
        count,
        "not every connect ran: {out}"
    );
    seen
}

fn pod4(lab: &PodLab) -> Option<EndpointHealthReport> {
    read_health(&lab.bpffs.0)
        .expect("read the health maps")
        .endpoints
        .into_iter()
        .find(|e| e.backend == "10.10.1.14:8080")
}

#[test]
fn a_failing_backend_is_ejected_after_consecutive_failures_and_returns_by_itself() {
    let mut lab = lab();
    let health = Health {
        outlier: Some(outlier(5, 5_000)),
        max_connections: None,
    };
    lab.dp()
        .apply(&table(&[1, 2, 3, 4], health))
        .expect("apply");

    // Sequential connects (none in flight when the fifth fails): each ejection
    // takes exactly 5 refused connects, and while ejected the dead pod gets none.
    // (A slow machine may see the 5-second ejection end during the run: then it
    // is ejected again, after 5 more.)
    let seen = connects(&lab, 200);
    let refused = seen.get("E111").copied().unwrap_or(0);
    let state = pod4(&lab).expect("pod 4 has a health entry");
    assert!(state.ejections >= 1, "{state:?}");
    assert_eq!(refused, 5 * state.ejections, "{seen:?} {state:?}");
    // Ejections in a row: each one longer than the last.
    assert_eq!(state.multiplier, state.ejections, "{state:?}");
    assert!(
        state
            .ejected_for_ms
            .is_none_or(|ms| ms <= 5_000 * u64::from(state.multiplier))
    );
    // The live pods are never ejected (their connects succeed).
    let report = read_health(&lab.bpffs.0).expect("read");
    assert!(
        report
            .endpoints
            .iter()
            .all(|e| e.backend == "10.10.1.14:8080"),
        "{report:?}"
    );

    // Its time up, it returns by itself: the next 5 failures eject it again.
    wait_until("pod 4 returns", scaled(Duration::from_secs(30)), || {
        pod4(&lab)
            .filter(|s| s.ejected_for_ms.is_none())
            .ok_or("still ejected")
    });
    let before = state.ejections;
    let seen = connects(&lab, 100);
    let state = pod4(&lab).expect("pod 4");
    let refused = seen.get("E111").copied().unwrap_or(0);
    assert!(state.ejections > before, "{state:?}");
    assert_eq!(
        refused,
        5 * (state.ejections - before),
        "{seen:?} {state:?}"
    );
    assert_eq!(state.multiplier, state.ejections, "{state:?}");

    // An EDS update that removes the backend forgets its state.
    lab.dp().apply(&table(&[1, 2, 3], health)).expect("apply");
    assert_eq!(pod4(&lab), None);
    lab.audit().assert("pod 4 removed", &Expect::services(1, 3));
    // Without outlier detection a failing backend keeps getting its share.
    lab.dp()
        .apply(&table(&[1, 2, 3, 4], Health::default()))
        .expect("apply");
    let seen = connects(&lab, 200);
    let refused = seen.get("E111").copied().unwrap_or(0);
    assert!(refused > 20, "{seen:?}");
    assert_eq!(pod4(&lab), None, "no state without outlier detection");
    eprintln!("outlier detection: 5 refused per ejection; without it {refused} of 200");
    lab.finish(&Expect::services(1, 4));
}

#[test]
fn the_circuit_breaker_refuses_connects_over_max_connections() {
    let mut lab = lab();
    let health = Health {
        outlier: None,
        max_connections: Some(50),
    };
    lab.dp().apply(&table(&[1, 2, 3], health)).expect("apply");
    let (reached, holder) = hold(PROBE, &lab.client, &lab.cgroup, "10.96.0.10:80", 80);
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for (what, n) in reached {
        let what = if what.starts_with('b') {
            "served".to_owned()
        } else {
            what
        };
        *seen.entry(what).or_default() += n;
    }
    assert_eq!(
        seen,
        BTreeMap::from([("E111".to_owned(), 30), ("served".to_owned(), 50)])
    );
    let service = |lab: &PodLab| {
        read_health(&lab.bpffs.0)
            .expect("read")
            .services
            .into_iter()
            .find(|s| s.service == PodLab::service())
            .map(|s| (s.connections, s.overflows))
    };
    assert_eq!(service(&lab), Some((50, 30)));
    lab.audit().assert(
        "50 connections held, 30 refused",
        &Expect::services(1, 3).circuit(50).reverse(50),
    );
    // Closing them gives every connection back.
    release(holder);
    wait_until(
        "every connection given back",
        scaled(Duration::from_secs(5)),
        || {
            let s = service(&lab);
            (s == Some((0, 30))).then_some(()).ok_or(s)
        },
    );
    lab.finish(&Expect::services(1, 3));
}

/// The abrupt-death scenario of the benchmark, bounded: a pod dies with no EDS
/// change while a client opens connections at a fixed rate. With outlier
/// detection, failures stop at the threshold (plus what was in flight); without,
/// about a third fail until the end.
#[test]
fn an_abrupt_death_costs_the_threshold_and_what_was_in_flight() {
    use sockmesh_tests::death::{Death, Lab, Run, scenario_outlier};
    let mut lab = Lab::new(std::path::Path::new(PROBE));
    // A slow kernel (the VM) runs a slower client.
    let rate = (200.0 / sockmesh_tests::time_scale()).max(20.0) as u32;
    let run = |port: u16, death: Death, on: bool| Run {
        port,
        outlier: on.then(scenario_outlier),
        death,
        rate,
        millis: 5_000,
        death_at_ms: 1_000,
        revive_at_ms: None,
        timeout_ms: scaled(Duration::from_secs(1)).as_millis() as u64,
    };
    for (port, death) in [(8100, Death::Killed), (8101, Death::Unreachable)] {
        let o = lab.run(&run(port, death, true)).expect("run");
        assert_eq!(o.failed_after_threshold, 0, "{death:?}: {o:?}");
        // The failed connects: the threshold's five and what was in flight. A
        // connection the dying pod had accepted and then reset (ECONNRESET) was a
        // successful connect, in the kernel's count as in Envoy's.
        let failed_connects = o.failed_after_death - o.reset_after_death;
        assert!(
            (5..=5 + o.in_flight_at_threshold).contains(&failed_connects),
            "{death:?}: {o:?}"
        );
        // The run's service alone: the last run's went with its endpoints' health.
        lab.audit()
            .assert(&format!("the {death:?} run"), &Expect::services(1, 3));
        eprintln!(
            "{death:?}, outlier detection: {} of {} failed ({} reset after connecting, {} in flight at the fifth)",
            o.failed_after_death,
            o.connects_after_death,
            o.reset_after_death,
            o.in_flight_at_threshold
        );
    }
    let o = lab.run(&run(8102, Death::Killed, false)).expect("run");
    assert!(
        o.failed_after_death * 5 >= o.connects_after_death,
        "without outlier detection about a third fail: {o:?}"
    );
    eprintln!(
        "Killed, no outlier detection: {} of {} failed",
        o.failed_after_death, o.connects_after_death
    );
    lab.finish(&Expect::services(1, 3));
}

/// Envoy's panic mode: with fewer healthy backends than the panic threshold,
/// connect() ignores ejections and spreads over every backend; without a
/// threshold it keeps to the healthy ones.
#[test]
fn below_the_panic_threshold_ejections_are_ignored() {
    // Only pod 1 serves; pods 2..4 refuse every connect.
    let mut lab = PodLab::new(PROBE, 4, 1);
    let run = |lab: &mut PodLab, panic_percent: u8| {
        let health = Health {
            outlier: Some(Outlier {
                panic_percent,
                ..outlier(3, 600_000)
            }),
            max_connections: None,
        };
        // Each run starts afresh: an EDS update that removes the pods resets them.
        lab.dp().apply(&table(&[1], health)).expect("apply");
        lab.dp()
            .apply(&table(&[1, 2, 3, 4], health))
            .expect("apply");
        let seen = connects(lab, 300);
        let ejected = read_health(&lab.bpffs.0).expect("read").ejected().count();
        lab.audit().assert(
            &format!("the run with panic threshold {panic_percent}"),
            &Expect::services(1, 4),
        );
        (seen.get("E111").copied().unwrap_or(0), ejected)
    };
    // No panic threshold: 3 failures eject each dead pod, then only b1 serves.
    assert_eq!(run(&mut lab, 0), (9, 3));
    // Threshold 50 %: the third ejection leaves 25 % healthy, and connect()
    // goes back to all four pods (three quarters of connects refused).
    let (refused, ejected) = run(&mut lab, 50);
    assert_eq!(ejected, 3);
    assert!(refused > 100, "{refused} of 300 refused in panic");
    eprintln!("panic: {refused} of 300 refused; without a threshold 9");
    lab.finish(&Expect::services(1, 4));
}

/// A connect in flight to an endpoint its service then drops: the connect fails
/// after the removal (its address answers nobody, and the client gives up), and
/// sock_ops counts the failure for an endpoint the service
/// no longer has. That entry is nobody's: the agent's sweep deletes it, and
/// nothing of the service's own health goes with it.
#[test]
fn a_failure_after_its_endpoint_left_the_service_leaves_no_entry() {
    let mut lab = lab();
    let health = Health {
        outlier: Some(outlier(5, 5_000)),
        max_connections: None,
    };
    let nobody = sockmesh::model::Backend::new(std::net::IpAddr::from([10, 10, 1, 30]), 8080);
    let only = |b: sockmesh::model::Backend| {
        let mut t = RoutingTable::default();
        t.insert(
            PodLab::service(),
            Service::new(vec![b], LbPolicy::Random).with_health(health),
        );
        t
    };
    lab.dp().apply(&only(nobody)).expect("apply");
    let mut client = lab.client_command(PROBE);
    client
        .args(["connect", "10.96.0.10:80", "1", "20000"])
        .stdout(std::process::Stdio::piped());
    let client = client.spawn().expect("client");
    // The connect is placed (its reverse entry exists), then its endpoint goes.
    wait_until("the connect in flight", Duration::from_secs(10), || {
        sockmesh_tests::audit::read(&lab.bpffs.0)
            .ok()
            .filter(|m| m.reverse == 1)
    });
    lab.dp().apply(&only(PodLab::pod(1))).expect("apply");
    let out = client.wait_with_output().expect("client");
    let out = String::from_utf8_lossy(&out.stdout);
    // Abandoned (the probe's connect timeout) or refused by the neighbour
    // lookup: a failure either way.
    assert!(
        out.split_whitespace()
            .nth(2)
            .is_some_and(|w| w.starts_with('E')),
        "{out}"
    );
    wait_until("the late failure's entry", Duration::from_secs(10), || {
        read_health(&lab.bpffs.0)
            .expect("read")
            .endpoints
            .iter()
            .any(|e| e.backend == "10.10.1.30:8080")
    });
    // Pod 4 (refusing) joins: its failures are the service's own.
    lab.dp().apply(&table(&[1, 4], health)).expect("apply");
    wait_until("a failure of pod 4", Duration::from_secs(10), || {
        let _ = connects(&lab, 4);
        pod4(&lab).is_some()
    });
    let failures = lab.audit().failures(&Expect::services(1, 2));
    assert!(
        failures.len() == 1 && failures[0].contains("10.10.1.30:8080 of 10.96.0.10:80/tcp"),
        "{failures:?}"
    );
    assert_eq!(lab.dp().sweep_endpoint_health().expect("sweep"), 1);
    assert!(pod4(&lab).is_some(), "the service's own entry stays");
    lab.finish(&Expect::services(1, 2));
}
