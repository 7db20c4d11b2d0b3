//! Maglev consistent hashing on real sockets: every client keeps one backend
//! across connections, only the clients of a removed backend move (and only they
//! move back when it returns), and a client is its bound source address or, for
//! an unbound socket, its network namespace.

use std::collections::BTreeMap;

use sockmesh::model::{LbPolicy, RoutingTable, Service};
use sockmesh_tests::{Cgroup, NetNs, PodLab, add_addr, audit::Expect, client_pod, command_in, run};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");
const VIP: &str = "10.96.0.10:80";
/// Backends b1..b10 (10.10.1.11..20).
const PODS: u8 = 10;
/// Client source addresses 10.10.1.101..200, on the client's link.
const CLIENTS: u8 = 100;
/// Connections per client and round.
const PER: u32 = 5;

fn table(pods: impl IntoIterator<Item = u8>, policy: LbPolicy) -> RoutingTable {
    let mut t = RoutingTable::default();
    t.insert(
        PodLab::service(),
        Service::new(pods.into_iter().map(PodLab::pod).collect(), policy),
    );
    t
}

fn maglev() -> LbPolicy {
    LbPolicy::Maglev {
        table_size: sockmesh_common::DEFAULT_MAGLEV_TABLE_SIZE,
    }
}

/// `smprobe clients` output: per client, the backends its connections reached.
fn parse(out: &str) -> BTreeMap<String, Vec<String>> {
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace().map(str::to_owned);
            Some((words.next()?, words.collect()))
        })
        .collect()
}

/// Each client's connections, from the client namespace, one source address per
/// client.
fn round(lab: &PodLab) -> BTreeMap<String, Vec<String>> {
    let mut cmd = lab.client_command(PROBE);
    cmd.args(["clients", VIP, &PER.to_string()])
        .args((1..=CLIENTS).map(|i| format!("10.10.1.{}", 100 + u32::from(i))));
    parse(&run(cmd))
}

/// The one backend of each client; panics (naming it) if a client reached two.
fn sticky(r: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, String> {
    r.iter()
        .map(|(client, reached)| {
            assert_eq!(reached.len(), PER as usize, "{client}: {reached:?}");
            assert!(
                reached
                    .iter()
                    .all(|b| b == &reached[0] && b.starts_with('b')),
                "client {client} reached {reached:?}"
            );
            (client.clone(), reached[0].clone())
        })
        .collect()
}

fn moved(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    a.iter()
        .filter(|(c, backend)| b.get(*c) != Some(backend))
        .map(|(c, _)| c.clone())
        .collect()
}

#[test]
fn maglev_keeps_each_client_on_one_backend_and_moves_only_the_removed_ones() {
    let mut lab = PodLab::new(PROBE, PODS, usize::from(PODS));
    for i in 1..=CLIENTS {
        add_addr(
            &lab.client,
            "sm0",
            &format!("10.10.1.{}/24", 100 + u32::from(i)),
        );
    }
    lab.dp()
        .apply(&table(1..=PODS, maglev()))
        .expect("apply maglev");

    // Affinity: every client's connections land on one backend, and the clients
    // spread over the backends (a backend that 100 hashed clients all miss has
    // odds 0.9^100 ≈ 3e-5; four of ten missed is beyond chance).
    let before = sticky(&round(&lab));
    assert_eq!(before.len(), usize::from(CLIENTS));
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for b in before.values() {
        *per_backend.entry(b).or_default() += 1;
    }
    assert!(
        per_backend.len() >= 7,
        "clients per backend: {per_backend:?}"
    );
    eprintln!("maglev: clients per backend: {per_backend:?}");

    // Remove b5: its clients move, and almost nobody else (the bound of the
    // issue: at most 1/N + 2 % of all clients move).
    let bound = usize::from(CLIENTS) / usize::from(PODS) + usize::from(CLIENTS) / 50;
    lab.dp()
        .apply(&table((1..=PODS).filter(|&i| i != 5), maglev()))
        .expect("remove b5");
    let without = sticky(&round(&lab));
    let gone = moved(&before, &without);
    for (client, backend) in &before {
        if backend == "b5" {
            assert!(gone.contains(client), "{client} stayed on the removed b5");
        }
    }
    assert!(
        gone.len() <= bound,
        "{} clients moved (bound {bound}): {gone:?}",
        gone.len()
    );
    assert!(without.values().all(|b| b != "b5"));
    // The old table's chunks and b5's entry are gone.
    lab.audit()
        .assert("b5 removed", &Expect::services(1, usize::from(PODS) - 1));
    let on_b5 = before.values().filter(|b| *b == "b5").count();
    eprintln!(
        "maglev: b5 removed: {} of {CLIENTS} clients moved ({on_b5} were on b5)",
        gone.len()
    );

    // b5 back: the same bound, and its old clients mostly return.
    lab.dp().apply(&table(1..=PODS, maglev())).expect("b5 back");
    let back = sticky(&round(&lab));
    let moved_back = moved(&without, &back);
    assert!(
        moved_back.len() <= bound,
        "{} clients moved (bound {bound}): {moved_back:?}",
        moved_back.len()
    );
    assert_eq!(back, before, "the same backends give the same table");
    lab.audit()
        .assert("b5 back", &Expect::services(1, usize::from(PODS)));
    eprintln!(
        "maglev: b5 back: {} of {CLIENTS} clients moved",
        moved_back.len()
    );

    // Weighted random, for contrast, has no affinity: some client reaches two
    // backends (5 connections over 10 backends all alike: 1e-4 per client, so
    // all 100 alike is beyond chance).
    lab.dp()
        .apply(&table(1..=PODS, LbPolicy::Random))
        .expect("random");
    let random = round(&lab);
    assert!(
        random.values().any(|r| r.iter().any(|b| b != &r[0])),
        "random placement showed affinity: {random:?}"
    );
    // Maglev to random: no chunk of the table is left.
    lab.finish(&Expect::services(1, usize::from(PODS)));
}

#[test]
fn unbound_sockets_hash_by_network_namespace() {
    let mut lab = PodLab::new(PROBE, PODS, usize::from(PODS));
    lab.dp()
        .apply(&table(1..=PODS, maglev()))
        .expect("apply maglev");
    // Eight pods, each asking twice from separate processes: one backend per pod
    // (the namespace is the client, not the process or the source port), and the
    // pods spread (all eight on one backend: odds 1e-7).
    let pods: Vec<NetNs> = (0..8).map(|i| client_pod(&lab.backend, i)).collect();
    let ask = |ns: &NetNs, cgroup: &Cgroup| {
        let mut cmd = command_in(ns, Some(cgroup), PROBE);
        cmd.args(["clients", VIP, &PER.to_string(), "-"]);
        sticky(&parse(&run(cmd)))["-"].clone()
    };
    let mut seen = Vec::new();
    for ns in &pods {
        let first = ask(ns, &lab.cgroup);
        assert_eq!(
            ask(ns, &lab.cgroup),
            first,
            "pod {}: a second process",
            ns.0
        );
        seen.push(first);
    }
    assert!(
        seen.iter().any(|b| b != &seen[0]),
        "every pod on one backend: {seen:?}"
    );
    lab.finish(&Expect::services(1, usize::from(PODS)));
}
