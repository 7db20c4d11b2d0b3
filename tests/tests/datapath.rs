//! Real kernel, real sockets: a client namespace with no default route reaches a
//! backend namespace only through the VIP the datapath redirects.

use std::net::IpAddr;

use sockmesh::model::{Backend, Protocol, RoutingTable, ServiceAddr};
use sockmesh_tests::{
    Bpffs, Cgroup, NetNs, Proc,
    audit::{Audit, Expect},
    command_in, install, run, veth,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

/// A client namespace linked to a backend namespace whose pod 10.10.1.2:8080
/// answers "b1"; a cgroup and bpffs directory for the datapath.
fn one_pod() -> (NetNs, NetNs, Proc, Cgroup, Bpffs) {
    let client = NetNs::new();
    let backend = NetNs::new();
    veth(&client, "10.10.1.1/24", &backend, "10.10.1.2/24");
    let mut serve = command_in(&backend, None, PROBE);
    serve.args(["serve", "10.10.1.2:8080=b1"]);
    let server = Proc::server(serve);
    (client, backend, server, Cgroup::new(), Bpffs::new())
}

#[test]
fn tcp_vip_redirects_reports_vip_refuses_empty_and_spares_outsiders() {
    let (client, _backend, _server, cgroup, bpffs) = one_pod();
    let mut dp = install(&cgroup, &bpffs);
    let vip = |last: u8| ServiceAddr {
        vip: IpAddr::from([10, 96, 0, last]),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let mut table = RoutingTable::default();
    table.insert(
        vip(1),
        vec![Backend::new("10.10.1.2".parse().expect("ip"), 8080)],
    );
    table.insert(vip(2), vec![]);
    dp.apply(&table).expect("apply");

    let probe = |inside: bool, args: &[&str]| {
        let mut cmd = command_in(&client, inside.then_some(&cgroup), PROBE);
        cmd.args(args);
        run(cmd)
    };
    // Reaches the backend; getpeername() reports the VIP.
    assert_eq!(
        probe(true, &["peer", "10.96.0.1:80"]).trim(),
        "10.96.0.1:80 b1"
    );
    // An AF_INET6 socket with an IPv4-mapped VIP is balanced too.
    assert_eq!(
        probe(true, &["peer", "[::ffff:10.96.0.1]:80"]).trim(),
        "[::ffff:10.96.0.1]:80 b1"
    );
    // No backends: refused by the program (ECONNREFUSED), not left to time out (the
    // VIP has no route, which would give ENETUNREACH).
    assert_eq!(probe(true, &["peer", "10.96.0.2:80"]).trim(), "- E111");
    // Outside the cgroup nothing is rewritten: no default route, ENETUNREACH.
    assert_eq!(probe(false, &["peer", "10.96.0.1:80"]).trim(), "- E101");

    let counters: std::collections::BTreeMap<_, _> = sockmesh::dataplane::read_counters(&bpffs.0)
        .expect("counters")
        .into_iter()
        .collect();
    assert_eq!(counters.get("redirects"), Some(&2), "{counters:?}");
    assert_eq!(counters.get("no_backend"), Some(&1), "{counters:?}");
    // The same events per service, from SM_SERVICE_STATS.
    let per_service: Vec<(String, u64, u64)> = sockmesh::dataplane::read_service_counters(&bpffs.0)
        .expect("service counters")
        .into_iter()
        .map(|(s, c)| (s.to_string(), c.redirects, c.no_backend))
        .collect();
    assert_eq!(
        per_service,
        [
            ("10.96.0.1:80/tcp".to_owned(), 2, 0),
            ("10.96.0.2:80/tcp".to_owned(), 0, 1)
        ]
    );
    assert_eq!(
        sockmesh::dataplane::read_table(&bpffs.0).expect("read pins"),
        table
    );
    let audit = Audit::kernel(&bpffs.0);
    audit.assert("both services", &Expect::table(&table));
    // A backend the client cannot route to: redirected, and the connect fails
    // at once (ENETUNREACH), which leaves the socket without a peer.
    let mut unroutable = table.clone();
    unroutable.insert(
        vip(3),
        vec![Backend::new("10.20.0.1".parse().expect("ip"), 8080)],
    );
    dp.apply(&unroutable).expect("apply");
    assert_eq!(probe(true, &["peer", "10.96.0.3:80"]).trim(), "- E101");
    audit.assert("a failed connect closed", &Expect::table(&unroutable));
    dp.apply(&table).expect("apply");
    // Removing a service removes its counters.
    table.services.remove(&vip(2));
    dp.apply(&table).expect("apply");
    let left = sockmesh::dataplane::read_service_counters(&bpffs.0).expect("service counters");
    assert_eq!(left.len(), 1, "{left:?}");
    audit.assert("one service removed", &Expect::services(1, 1));
    dp.apply(&RoutingTable::default()).expect("remove all");
    audit.assert_empty("every service removed");
}

/// An initial load's many new services go through the kernel's batch writes
/// (`BPF_MAP_UPDATE_BATCH`): every service lands whole, of every kind, with its
/// counters, and the one with a live backend is reachable and counted.
#[test]
fn many_new_services_are_written_in_batches_and_each_lands_whole() {
    use sockmesh::model::{LbPolicy, Service};
    let (client, _backend, _server, cgroup, bpffs) = one_pod();
    let mut dp = install(&cgroup, &bpffs);
    let vip = |i: u32| ServiceAddr {
        vip: IpAddr::from([10, 96, (i >> 8) as u8, i as u8]),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let live = Backend::new("10.10.1.2".parse().expect("ip"), 8080);
    let mut table = RoutingTable::default();
    for i in 0..300u32 {
        let others = (1..=(i % 4) + 1)
            .map(|j| Backend::new(IpAddr::from([10, 20, (i % 200) as u8, j as u8]), 8080));
        let service = match i % 4 {
            // The first service, and every fourth: direct slots, the live pod first.
            0 => Service::new([live].into_iter().chain(others).collect(), LbPolicy::Random),
            1 => Service::new(
                others.map(|b| b.weighted(3)).chain([live]).collect(),
                LbPolicy::Random,
            ),
            2 => Service::new(others.collect(), LbPolicy::Maglev { table_size: 1021 }),
            _ => Service::new(others.collect(), LbPolicy::LeastConn { choices: 2 }),
        };
        table.insert(vip(i), service);
    }
    let report = dp.apply(&table).expect("apply");
    assert_eq!(report.added, 300);
    assert_eq!(
        sockmesh::dataplane::read_table(&bpffs.0).expect("read pins"),
        table
    );
    // Service 0 has one live backend among unreachable ones: connect until it
    // is picked (each try is refused or reaches b1; no route hangs: the other
    // backends' subnet is not routed, so connect() fails at once).
    let only_live = {
        let mut t = RoutingTable::default();
        t.insert(vip(0), vec![live]);
        t.services.into_iter().next().expect("one")
    };
    let only_live_again = only_live.clone();
    let mut changes = sockmesh::model::Changes::new();
    changes.insert(only_live.0, Some(only_live.1));
    dp.apply_changes(&changes)
        .expect("narrow service 0 to the live pod");
    let mut cmd = command_in(&client, Some(&cgroup), PROBE);
    cmd.args(["peer", "10.96.0.0:80"]);
    assert_eq!(run(cmd).trim(), "10.96.0.0:80 b1");
    let redirects = |bpffs: &Bpffs| {
        sockmesh::dataplane::read_service_counters(&bpffs.0)
            .expect("service counters")
            .into_iter()
            .find(|(s, _)| *s == vip(0))
            .map(|(_, c)| c.redirects)
    };
    assert_eq!(redirects(&bpffs), Some(1));
    assert_eq!(
        sockmesh::dataplane::read_service_counters(&bpffs.0)
            .expect("service counters")
            .len(),
        300
    );
    // Each claimed counter slot names a service of its own.
    let mut slots = sockmesh::dataplane::read_counter_slots(&bpffs.0).expect("counter slots");
    let read = slots.len();
    slots.sort_by_key(|(_, k, _)| *k);
    slots.dedup_by_key(|(_, k, _)| *k);
    assert_eq!((read, slots.len()), (300, 300));
    assert_eq!(slots.iter().filter(|(_, _, c)| c.redirects == 1).count(), 1);
    let audit = Audit::kernel(&bpffs.0);
    table.insert(only_live_again.0, only_live_again.1);
    audit.assert("300 services written in bulk", &Expect::table(&table));
    // Removed in bulk too: nothing of any kind of service stays.
    dp.apply(&RoutingTable::default()).expect("remove all");
    audit.assert_empty("every service removed");
}
