//! Real kernel, real sockets: a client namespace with no default route reaches a
//! backend namespace only through the VIP the datapath redirects.

use std::net::IpAddr;

use sockmesh::model::{Backend, Protocol, RoutingTable, ServiceAddr};
use sockmesh_tests::{Bpffs, Cgroup, NetNs, install, python_in, veth};

const SERVER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8080)); s.listen(128)
while True:
    c, a = s.accept(); c.send(sys.argv[2].encode()); c.close()
"#;

#[test]
fn tcp_vip_redirects_reports_vip_refuses_empty_and_spares_outsiders() {
    let client = NetNs::new();
    let backend = NetNs::new();
    veth(&client, "10.10.1.1/24", &backend, "10.10.1.2/24");
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let mut server = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &backend.0,
            "python3",
            "-c",
            SERVER,
            "10.10.1.2",
            "b1",
        ])
        .spawn()
        .expect("server");
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
    std::thread::sleep(std::time::Duration::from_millis(300));

    let out = python_in(
        &client,
        Some(&cgroup),
        r#"
import socket, time
s = socket.create_connection(("10.96.0.1", 80), timeout=2)
print("reply", s.recv(16).decode(), "peer", s.getpeername()[0], s.getpeername()[1])
try:
    socket.create_connection(("10.96.0.2", 80), timeout=2); print("empty connected")
except OSError as e: print("empty errno", e.errno)
"#,
    );
    let outside = python_in(
        &client,
        None,
        r#"
import socket
try:
    socket.create_connection(("10.96.0.1", 80), timeout=2); print("outside connected")
except OSError as e: print("outside errno", e.errno)
"#,
    );
    let _ = server.kill();
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("reply b1 peer 10.96.0.1 80"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("empty errno 111"), "{stdout}");
    let outside = String::from_utf8_lossy(&outside.stdout);
    assert!(
        outside.contains("outside errno 101"),
        "not redirected outside the cgroup: {outside}"
    );
    assert_eq!(
        sockmesh::dataplane::read_table(&bpffs.0).expect("read pins"),
        table
    );
}
