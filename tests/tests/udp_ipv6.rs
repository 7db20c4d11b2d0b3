//! UDP request/response through a VIP (reply seen from the VIP) and an IPv6 VIP.

use std::net::IpAddr;

use sockmesh::model::{Backend, Protocol, RoutingTable, ServiceAddr};
use sockmesh_tests::{Bpffs, Cgroup, NetNs, install, python_in, veth};

const SERVERS: &str = r#"
import socket, threading
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("10.10.1.2", 5353))
    while True:
        d, a = u.recvfrom(100); u.sendto(b"udp-b1", a)
def tcp6():
    t = socket.socket(socket.AF_INET6); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("fd00:10::2", 8080)); t.listen(16)
    while True:
        c, a = t.accept(); c.send(b"v6-b1"); c.close()
threading.Thread(target=udp, daemon=True).start(); tcp6()
"#;

#[test]
fn udp_reply_comes_from_vip_and_ipv6_vip_works() {
    let client = NetNs::new();
    let backend = NetNs::new();
    veth(&client, "10.10.1.1/24", &backend, "10.10.1.2/24");
    for (ns, dev, addr) in [
        (&client, "sm0", "fd00:10::1/64"),
        (&backend, "sm1", "fd00:10::2/64"),
    ] {
        let st = std::process::Command::new("ip")
            .args(["-n", &ns.0, "addr", "add", addr, "dev", dev, "nodad"])
            .status()
            .expect("ip");
        assert!(st.success());
    }
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", &backend.0, "python3", "-c", SERVERS])
        .spawn()
        .expect("server");
    let mut dp = install(&cgroup, &bpffs);
    let mut table = RoutingTable::default();
    table.insert(
        ServiceAddr {
            vip: IpAddr::from([10, 96, 0, 53]),
            port: 53,
            protocol: Protocol::Udp,
        },
        vec![Backend::new("10.10.1.2".parse().expect("ip"), 5353)],
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
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = python_in(
        &client,
        Some(&cgroup),
        r#"
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
u.sendto(b"q", ("10.96.0.53", 53)); d, a = u.recvfrom(100)
print("udp", d.decode(), a[0], a[1])
s = socket.create_connection(("fd00:96::1", 80), timeout=2)
print("v6", s.recv(16).decode(), s.getpeername()[0], s.getpeername()[1])
"#,
    );
    let _ = server.kill();
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("udp udp-b1 10.96.0.53 53"),
        "{stdout} {stderr}"
    );
    assert!(
        stdout.contains("v6 v6-b1 fd00:96::1 80"),
        "{stdout} {stderr}"
    );
}
