//! `STRICT_DNS` clusters (Istio ServiceEntry `resolution: DNS`): the agent
//! resolves the cluster's host names with the cluster's own resolver (here a DNS
//! server the test controls, on loopback), programs the addresses as backends,
//! follows the answers as they change, and keeps the last good addresses while
//! resolution fails.

use std::time::Duration;

use sockmesh_tests::{
    Cgroup, FileAgent, NetNs, TwoPods,
    audit::Expect,
    command_in,
    dns::{DnsServer, Mode},
    kernel_backends, run, wait_for_backends, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");
const CLUSTER: &str = "outbound|80||web.sockmesh.test";

fn config(resolver: std::net::SocketAddr) -> String {
    format!(
        r#"resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: web
  address: {{ socket_address: {{ address: 10.96.0.80, port_value: 80 }} }}
  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: web, cluster: "{CLUSTER}" }} }} ] }} ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: "{CLUSTER}"
  type: STRICT_DNS
  dns_lookup_family: V4_ONLY
  dns_refresh_rate: 0.2s
  typed_dns_resolver_config:
    name: envoy.network.dns_resolver.cares
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig
      resolvers: [ {{ socket_address: {{ address: {ip}, port_value: {port} }} }} ]
  load_assignment:
    cluster_name: "{CLUSTER}"
    endpoints:
    - lb_endpoints:
      - endpoint: {{ address: {{ socket_address: {{ address: web-a.sockmesh.test, port_value: 8080 }} }} }}
      - endpoint: {{ address: {{ socket_address: {{ address: web-b.sockmesh.test, port_value: 8080 }} }} }}
"#,
        ip = resolver.ip(),
        port = resolver.port()
    )
}

/// The distinct backends 30 connections through the VIP reached.
fn reached(client: &NetNs, cgroup: &Cgroup) -> Vec<String> {
    let mut probe = command_in(client, Some(cgroup), PROBE);
    probe.args(["connect", "10.96.0.80:80", "30"]);
    let mut names: Vec<String> = run(probe)
        .lines()
        .filter_map(|l| l.split(' ').nth(2).map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn strict_dns_cluster_follows_its_names_and_keeps_the_last_good_addresses() {
    let dns = DnsServer::start(30);
    dns.set("web-a.sockmesh.test", &["10.10.1.11"]);
    // V4_ONLY: the IPv6 address is never asked for.
    dns.set("web-b.sockmesh.test", &["10.10.1.12", "fd00::12"]);
    let pods = TwoPods::serving(PROBE, ["a", "b"]);
    let client = &pods.client;
    let agent = FileAgent::start("resources.yaml", &config(dns.addr), &[]);
    let (admin, bpffs, cgroup) = (&agent.admin, &agent.bpffs, &agent.cgroup);

    wait_for_backends(bpffs, "both names resolved", &["10.10.1.11", "10.10.1.12"]);
    assert_eq!(reached(client, cgroup), ["a", "b"]);

    // A name that no longer exists is an answer (Envoy's
    // dns_nodata_noname_is_success): its address goes.
    dns.remove("web-a.sockmesh.test");
    wait_for_backends(bpffs, "web-a gone", &["10.10.1.12"]);
    assert_eq!(reached(client, cgroup), ["b"]);

    // The resolver fails: the failures are counted and the last good address stays,
    // although the zone (unreachable now) has changed.
    let failures = format!("sockmesh_dns_failures_total{{cluster=\"{CLUSTER}\"}}");
    let before = admin.metric(&failures).unwrap_or(0.0);
    dns.mode(Mode::ServFail);
    dns.set("web-a.sockmesh.test", &["10.10.1.11"]);
    wait_until(
        "two rounds of failed resolutions",
        Duration::from_secs(15),
        || {
            let now = admin.metric(&failures).unwrap_or(0.0);
            // Two host names per round.
            (now >= before + 4.0).then_some(()).ok_or(now)
        },
    );
    assert_eq!(kernel_backends(bpffs), ["10.10.1.12"]);
    let dump = admin.dump();
    let status = &dump["dns"][CLUSTER];
    assert_eq!(
        status["hosts"]["web-b.sockmesh.test"],
        serde_json::json!(["10.10.1.12"]),
        "{status}"
    );
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("sockmesh.test")),
        "the error names the host: {status}"
    );
    assert_eq!(reached(client, cgroup), ["b"]);

    // It answers again: the cluster follows.
    dns.mode(Mode::Answer);
    wait_for_backends(
        bpffs,
        "web-a back after the outage",
        &["10.10.1.11", "10.10.1.12"],
    );
    assert!(dns.queries() > 0);
    // The cluster's answers and resolution status are the agent's only DNS
    // state, and go with the cluster.
    agent.audit().assert(
        "both names resolved again",
        &Expect::services(1, 2).xds(1, 1, 0, 0),
    );
    agent.clear_and_audit();
}
