//! The admin server on loopback: /healthz, /readyz, /metrics and /config_dump
//! answer, and follow accepted and rejected updates.

use std::{process::Command, time::Duration};

use sockmesh_tests::{FileAgent, TwoPods, audit::Expect, hold, release, sockmesh_bin, wait_until};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

const CONFIG: &str = r#"resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: api
  address: { socket_address: { address: 10.96.0.20, port_value: 443 } }
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: api, cluster: api } } ] } ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: api
  type: STATIC
  load_assignment: { cluster_name: api, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.10.1.11, port_value: 8443 } } } } ] } ] }
"#;

#[test]
fn admin_endpoints_answer_on_loopback() {
    let agent = FileAgent::start("resources.yaml", CONFIG, &[]);
    let admin = &agent.admin;
    wait_until("/readyz 200", Duration::from_secs(10), || {
        admin.get("/readyz").0 == 200
    });
    assert_eq!(admin.get("/healthz"), (200, "ok\n".to_owned()));
    let (status, metrics) = admin.get("/metrics");
    assert_eq!(status, 200);
    for line in [
        "sockmesh_xds_connected 1",
        "sockmesh_services 1",
        "sockmesh_backends 1",
        "sockmesh_xds_updates_total{type=\"lds\",result=\"accepted\"} 1",
        "sockmesh_update_to_kernel_seconds_count 1",
        "sockmesh_datapath_events_total{event=\"redirects\"} 0",
        "sockmesh_service_redirects_total{service=\"10.96.0.20:443/tcp\"} 0",
        "sockmesh_service_no_backend_total{service=\"10.96.0.20:443/tcp\"} 0",
        "sockmesh_map_fill_ratio{map=\"services\"} 0.0000152587890625",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in:\n{metrics}"
        );
    }
    // Every map with a capacity has its fill ratio (the kernel-filled ones once
    // counted, on the agent's tick).
    for m in sockmesh::dataplane::fill::SIZED {
        let series = format!("sockmesh_map_fill_ratio{{map=\"{}\"}}", m.label);
        wait_until(&series, Duration::from_secs(10), || {
            admin.metric(&series).is_some()
        });
    }
    let (status, _) = admin.get("/config_dump");
    assert_eq!(status, 200);
    let dump = admin.dump();
    assert_eq!(dump["services"][0]["vip"], "10.96.0.20");
    assert_eq!(dump["services"][0]["port"], 443);

    // A refused resource shows up in the counters and the dump (by type and name,
    // with its error); it keeps its last good version, so the table stays.
    agent.replace(&format!(
        "version_info: bad-port\n{}",
        CONFIG.replace("port_value: 8443", "port_value: 0")
    ));
    let dump = wait_until(
        "the bad-port update's NACK",
        Duration::from_secs(10),
        || {
            let dump = admin.dump();
            (dump["xds"]["cds"]["rejected_version"] == "bad-port")
                .then_some(dump.clone())
                .ok_or(dump)
        },
    );
    let error = dump["xds"]["cds"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("port_value: 0 is out of range"), "{dump}");
    assert!(
        dump["refused"]["cds"]["api"]
            .as_str()
            .is_some_and(|e| e.contains("port_value: 0 is out of range")),
        "{dump}"
    );
    assert_eq!(
        dump["xds"]["lds"]["rejected"], 0,
        "the listener was valid: {dump}"
    );
    assert_eq!(
        dump["services"][0]["backends"][0]["address"], "10.10.1.11",
        "table lost: {dump}"
    );
    assert_eq!(
        admin.metric("sockmesh_xds_updates_total{type=\"cds\",result=\"rejected\"}"),
        Some(1.0)
    );
    assert_eq!(
        admin.metric("sockmesh_xds_refused_resources{type=\"cds\"}"),
        Some(1.0)
    );
    assert_eq!(admin.get("/nope").0, 404);

    // `sockmesh status --json` puts the three views together.
    let out = Command::new(sockmesh_bin())
        .arg("status")
        .arg("--bpffs")
        .arg(&agent.bpffs.0)
        .arg("--admin")
        .arg(admin.addr().to_string())
        .arg("--json")
        .output()
        .expect("status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["agent"]["running"], true, "{status}");
    assert_eq!(status["agent"]["ready"], true, "{status}");
    assert_eq!(
        status["agent"]["datapath"]["layout_version"],
        sockmesh_common::LAYOUT_VERSION,
        "{status}"
    );
    assert_eq!(status["agent"]["datapath"]["migrating"], false, "{status}");
    assert_eq!(status["datapath"]["services"], 1, "{status}");
    assert_eq!(status["xds"]["cds"]["rejected"], 1, "{status}");
    // The refused cluster holds its last good version: one of each resource.
    agent
        .audit()
        .assert("a refused cluster", &Expect::services(1, 1).xds(1, 1, 0, 0));
    agent.clear_and_audit();
}

/// Map sizes are configurable; a configuration beyond them is not refused (a node
/// limit is no fault of the control plane's): what does not fit waits outside the
/// kernel, or gets a subset, listed with the limit named; the services already
/// installed keep working; room returning heals it.
#[test]
fn capacity_limits_leave_what_does_not_fit_out_listed_and_heal() {
    let svc = |i: u32, backends: &[u8]| {
        let eps: Vec<String> = backends
            .iter()
            .map(|b| format!("{{ endpoint: {{ address: {{ socket_address: {{ address: 10.10.1.{b}, port_value: 8080 }} }} }} }}"))
            .collect();
        format!(
            r#"- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: s{i}
  address: {{ socket_address: {{ address: 10.96.0.{i}, port_value: 80 }} }}
  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: c{i} }} }} ] }} ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: c{i}
  type: STATIC
  load_assignment: {{ cluster_name: c{i}, endpoints: [ {{ lb_endpoints: [ {} ] }} ] }}
"#,
            eps.join(", ")
        )
    };
    let document = |version: &str, services: &[String]| {
        format!("version_info: {version}\nresources:\n{}", services.concat())
    };
    let agent = FileAgent::start(
        "resources.yaml",
        &document("good", &[svc(1, &[11, 12]), svc(2, &[13])]),
        &["--max-services", "2", "--max-backends", "5"],
    );
    let (admin, bpffs) = (&agent.admin, &agent.bpffs);
    let write = |version: &str, services: &[String]| agent.replace(&document(version, services));
    let services = || {
        sockmesh::dataplane::read_table(&bpffs.0)
            .map(|t| {
                t.services
                    .keys()
                    .map(|s| s.vip.to_string())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    wait_until("2 services in the kernel", Duration::from_secs(10), || {
        services().len() == 2
    });
    // Each file carries its own version: what the test waits for is that
    // version accepted, then the listing.
    let accepted = |version: &str| {
        wait_until(
            &format!("{version} accepted"),
            Duration::from_secs(10),
            || {
                let dump = admin.dump();
                (dump["xds"]["lds"]["version"] == version)
                    .then_some(dump.clone())
                    .ok_or(dump)
            },
        )
    };
    write(
        "three-services",
        &[svc(1, &[11]), svc(2, &[13]), svc(3, &[14])],
    );
    let dump = accepted("three-services");
    assert_eq!(
        dump["xds"]["lds"]["rejected"], 0,
        "a node limit is no NACK: {dump}"
    );
    assert_eq!(dump["limited"][0]["service"], "10.96.0.3:80/tcp", "{dump}");
    assert_eq!(dump["limited"][0]["reason"], "capacity_left_out", "{dump}");
    assert!(
        dump["limited"][0]["why"]
            .as_str()
            .is_some_and(|w| w.contains("3 services exceed the limit of 2 (--max-services)")),
        "{dump}"
    );
    assert_eq!(
        services(),
        ["10.96.0.1", "10.96.0.2"],
        "existing services kept"
    );
    let (status, body) = admin.get("/readyz");
    assert_eq!(status, 200);
    assert!(
        body.starts_with("ready, degraded: 1 service limited"),
        "{body}"
    );
    assert_eq!(
        admin.metric("sockmesh_services_limited{reason=\"capacity_left_out\"}"),
        Some(1.0)
    );
    // Service 1 goes: room returns and service 3 takes it, by itself.
    write("room", &[svc(2, &[13]), svc(3, &[14])]);
    wait_until("service 3 programmed", Duration::from_secs(10), || {
        services() == ["10.96.0.2", "10.96.0.3"]
    });
    let dump = accepted("room");
    assert_eq!(dump["limited"], serde_json::json!([]), "{dump}");
    assert_eq!(admin.get("/readyz"), (200, "ready\n".to_owned()));
    // More backends than the map holds: service 2 keeps the subset that fits
    // beside its old entries (5 - 2 held = 3 of its 4 new ones).
    write("six-backends", &[svc(2, &[15, 16, 17, 18]), svc(3, &[14])]);
    let dump = accepted("six-backends");
    assert_eq!(dump["limited"][0]["reason"], "capacity_subset", "{dump}");
    assert_eq!(dump["limited"][0]["programmed"], 3, "{dump}");
    wait_until(
        "3 of service 2's backends and 1 of service 3's in the kernel",
        Duration::from_secs(10),
        || {
            sockmesh::dataplane::read_table(&bpffs.0)
                .map(|t| t.backend_count())
                .ok()
                .filter(|n| *n == 4)
        },
    );
    // Fill ratios are against the maps' real (configured) capacity.
    assert_eq!(
        admin.metric("sockmesh_map_fill_ratio{map=\"services\"}"),
        Some(1.0)
    );
    // The service map has been full since the first file: one warning, naming
    // the flag, however many updates found it full since.
    let warned: Vec<String> = admin
        .log_text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("map SM_SERVICES is full"))
        .map(str::to_owned)
        .collect();
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(warned[0].contains("raise --max-services"), "{warned:?}");
    agent.audit().assert(
        "service 2 limited to a subset",
        &Expect::services(2, 4).xds(2, 2, 0, 0),
    );
    agent.clear_and_audit();
}

/// A map filled to its limit: its fill ratio says 1, the agent warns once,
/// naming the map and the flag that sizes it, and again only once the map had
/// room and filled again. `SM_REVERSE` at `--max-reverse 4`: six connections
/// through a VIP, four remembered, two counted as `reverse_full`.
#[test]
fn a_full_map_shows_in_its_fill_ratio_and_warns_once_each_time_it_fills() {
    const ONE: &str = r#"resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: api
  address: { socket_address: { address: 10.96.0.20, port_value: 80 } }
  filter_chains: [ { filters: [ { name: tcp, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: api, cluster: api } } ] } ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: api
  type: STATIC
  load_assignment: { cluster_name: api, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 10.10.1.11, port_value: 8080 } } } } ] } ] }
"#;
    let pods = TwoPods::serving(PROBE, ["b1", "b2"]);
    let agent = FileAgent::start("resources.yaml", ONE, &["--max-reverse", "4"]);
    let admin = &agent.admin;
    wait_until("the service in the kernel", Duration::from_secs(10), || {
        sockmesh_tests::kernel_backends(&agent.bpffs) == ["10.10.1.11"]
    });
    let fill = || admin.metric("sockmesh_map_fill_ratio{map=\"reverse\"}");
    assert_eq!(fill(), Some(0.0));
    let warnings = || {
        admin
            .log_text()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("map SM_REVERSE is full"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    for round in 1..=2 {
        let (reached, holder) = hold(PROBE, &pods.client, &agent.cgroup, "10.96.0.20:80", 6);
        assert_eq!(reached.get("b1"), Some(&6), "{reached:?}");
        wait_until("SM_REVERSE full", Duration::from_secs(10), || {
            fill() == Some(1.0)
        });
        assert_eq!(
            admin.metric("sockmesh_datapath_events_total{event=\"reverse_full\"}"),
            Some(f64::from(2 * round))
        );
        let dump = admin.dump();
        let reverse = dump["datapath"]["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["map"] == "SM_REVERSE")
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            (
                &reverse["entries"],
                &reverse["capacity"],
                &reverse["flag"],
                &reverse["full"]
            ),
            (
                &serde_json::json!(4),
                &serde_json::json!(4),
                &serde_json::json!("--max-reverse"),
                &serde_json::json!(true)
            ),
            "{reverse}"
        );
        let warned = wait_until("the warning", Duration::from_secs(10), || {
            let w = warnings();
            (w.len() == round as usize).then_some(w.clone()).ok_or(w)
        });
        let last = warned.last().map(String::as_str).unwrap_or_default();
        assert!(last.contains("--max-reverse"), "{last}");
        // Open sockets hold their entries: the audit expects the four.
        agent.audit().assert(
            "four sockets remembered",
            &Expect::services(1, 1).reverse(4),
        );
        release(holder);
        wait_until("SM_REVERSE empty again", Duration::from_secs(10), || {
            fill() == Some(0.0)
        });
        wait_until("the map has room again", Duration::from_secs(10), || {
            admin
                .log_text()
                .lines()
                .filter(|l| l.contains("map has room again") && l.contains("SM_REVERSE"))
                .count()
                == round as usize
        });
    }
    // Two fillings, two warnings: none per refused entry.
    assert_eq!(warnings().len(), 2, "{:?}", warnings());
    agent.clear_and_audit();
}
