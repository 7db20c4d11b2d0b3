//! Real kernel, real sockets: a client namespace with no default route reaches a
//! backend namespace only through the VIP the datapath redirects.

use std::net::IpAddr;

use sockmesh::model::{Backend, Protocol, RoutingTable, ServiceAddr};
use sockmesh_tests::{Bpffs, Cgroup, NetNs, Proc, command_in, install, run, veth};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

#[test]
fn tcp_vip_redirects_reports_vip_refuses_empty_and_spares_outsiders() {
    let client = NetNs::new();
    let backend = NetNs::new();
    veth(&client, "10.10.1.1/24", &backend, "10.10.1.2/24");
    let mut serve = command_in(&backend, None, PROBE);
    serve.args(["serve", "10.10.1.2:8080=b1"]);
    let _server = Proc::server(serve);
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
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
    // Removing a service removes its counters.
    table.services.remove(&vip(2));
    dp.apply(&table).expect("apply");
    let left = sockmesh::dataplane::read_service_counters(&bpffs.0).expect("service counters");
    assert_eq!(left.len(), 1, "{left:?}");
}
