//! UDP request/response through a VIP (replies seen from the VIP, each socket
//! sticking to one backend) and an IPv6 VIP.

use std::{collections::BTreeSet, net::IpAddr};

use sockmesh::model::{Backend, Protocol, RoutingTable, ServiceAddr};
use sockmesh_tests::{
    Bpffs, Cgroup, NetNs, Proc, add_addr,
    audit::{Audit, Expect},
    command_in, install, run, veth,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

#[test]
fn udp_reply_comes_from_vip_and_ipv6_vip_works() {
    let client = NetNs::new();
    let backend = NetNs::new();
    veth(&client, "10.10.1.1/24", &backend, "10.10.1.2/24");
    add_addr(&backend, "sm1", "10.10.1.3/24");
    add_addr(&client, "sm0", "fd00:10::1/64");
    add_addr(&backend, "sm1", "fd00:10::2/64");
    let mut serve = command_in(&backend, None, PROBE);
    serve.args([
        "serve",
        "udp:10.10.1.2:5353=u1",
        "udp:10.10.1.3:5353=u2",
        "[fd00:10::2]:8080=v6-b1",
    ]);
    let _server = Proc::server(serve);
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let mut dp = install(&cgroup, &bpffs);
    let mut table = RoutingTable::default();
    table.insert(
        ServiceAddr {
            vip: IpAddr::from([10, 96, 0, 53]),
            port: 53,
            protocol: Protocol::Udp,
        },
        vec![
            Backend::new(IpAddr::from([10, 10, 1, 2]), 5353),
            Backend::new(IpAddr::from([10, 10, 1, 3]), 5353),
        ],
    );
    table.insert(
        ServiceAddr {
            vip: "fd00:96::1".parse().expect("ip"),
            port: 80,
            protocol: Protocol::Tcp,
        },
        vec![Backend::new("fd00:10::2".parse().expect("ip"), 8080)],
    );
    dp.apply(&table).expect("apply");

    let probe = |args: &[&str]| {
        let mut cmd = command_in(&client, Some(&cgroup), PROBE);
        cmd.args(args);
        run(cmd)
    };
    // 40 fresh sockets, each sending 3 datagrams: every reply comes from the VIP,
    // each socket stays on one backend, and both backends are used.
    let out = probe(&["udp", "10.96.0.53:53", "40", "3"]);
    let mut used = BTreeSet::new();
    for line in out.lines() {
        let (from, names) = line.split_once(' ').expect("FROM NAMES");
        assert_eq!(from, "10.96.0.53:53", "reply not from the VIP: {out}");
        let names: BTreeSet<&str> = names.split(',').collect();
        assert_eq!(names.len(), 1, "socket moved between backends: {line}");
        used.extend(names);
    }
    assert_eq!(out.lines().count(), 40);
    assert_eq!(used, BTreeSet::from(["u1", "u2"]), "{out}");

    assert_eq!(
        probe(&["peer", "[fd00:96::1]:80"]).trim(),
        "[fd00:96::1]:80 v6-b1"
    );
    // One UDP socket connected to a VIP, then to another: each connect keeps
    // one reverse entry, the socket's latest (the first goes with the second
    // connect, the second with the socket).
    let mut two = table.clone();
    for (last, backend) in [(54, 2), (55, 3)] {
        two.insert(
            ServiceAddr {
                vip: IpAddr::from([10, 96, 0, last]),
                port: 53,
                protocol: Protocol::Udp,
            },
            vec![Backend::new(IpAddr::from([10, 10, 1, backend]), 5353)],
        );
    }
    dp.apply(&two).expect("apply");
    let answers = probe(&["udp-reconnect", "10.96.0.54:53", "10.96.0.55:53"]);
    assert_eq!(answers.trim(), "u1 u2");
    Audit::kernel(&bpffs.0).assert("a UDP socket connected twice, closed", &Expect::table(&two));
    dp.apply(&table).expect("apply");
    // The clients are gone: no socket holds a reverse entry (the unconnected
    // sends' LRU keeps its peers by design).
    let audit = Audit::kernel(&bpffs.0);
    audit.assert("both services, clients gone", &Expect::table(&table));
    dp.apply(&RoutingTable::default()).expect("remove all");
    audit.assert_empty("every service removed");
}
