//! `sockmesh agent --xds file://...`: edits reach the kernel in milliseconds; a
//! malformed or content-free file is reported (line / what) and changes nothing;
//! an invalid resource is refused alone (field named), keeping its last good
//! version while the valid ones apply; an unknown field is ignored and counted.

use std::time::Duration;

use sockmesh_tests::{FileAgent, audit::Expect, wait_for_backends, wait_until};

fn config(version: &str, backends: &[&str], port: u32) -> String {
    let eps: String = backends
        .iter()
        .map(|a| format!("      - endpoint: {{ address: {{ socket_address: {{ address: {a}, port_value: {port} }} }} }}\n"))
        .collect();
    format!(
        r#"version_info: "{version}"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: api
  address: {{ socket_address: {{ address: 10.96.0.20, port_value: 443 }} }}
  filter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: api, cluster: api }} }} ] }} ]
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: api
  type: STATIC
  load_assignment:
    cluster_name: api
    endpoints:
    - lb_endpoints:
{eps}"#
    )
}

/// Waits until `/config_dump` counts `n` source errors; returns the last one.
fn source_error(admin: &sockmesh_tests::Admin, n: u64, what: &str) -> String {
    wait_until(
        &format!("{what} to be reported"),
        Duration::from_secs(10),
        || {
            let dump = admin.dump();
            if dump["source_errors"] == n {
                Ok(dump["source_last_error"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned())
            } else {
                Err(dump["source_errors"].clone())
            }
        },
    )
}

#[test]
fn file_edits_apply_and_bad_files_change_nothing() {
    let agent = FileAgent::start("resources.yaml", &config("1", &["10.10.1.11"], 8080), &[]);
    let (admin, bpffs) = (&agent.admin, &agent.bpffs);

    wait_for_backends(bpffs, "the first file", &["10.10.1.11"]);
    agent.replace(&config("2", &["10.10.1.12", "10.10.1.13"], 8080));
    let took = wait_for_backends(bpffs, "the edited file", &["10.10.1.12", "10.10.1.13"]);
    eprintln!("file edit visible in the pinned maps after {took:?} (includes polling)");

    // A syntax error: counted as a source error whose message has the line, and
    // nothing changes.
    agent.replace("resources: [\n  { name: \n");
    let error = source_error(admin, 1, "the syntax error");
    // The flow sequence opened on line 1 is never closed: the YAML parser stops at
    // the end of the document, line 3.
    assert!(
        error.contains("at line 3 column 1"),
        "no line number in: {error}"
    );
    assert_eq!(
        sockmesh_tests::kernel_backends(bpffs),
        ["10.10.1.12", "10.10.1.13"]
    );

    // Files with nothing in them (emptied, truncated to a comment): refused, as
    // Envoy refuses them, never read as "remove every service".
    agent.replace("");
    let error = source_error(admin, 2, "the empty file");
    assert!(error.contains("the document is empty: refused"), "{error}");
    agent.replace("# resources: []\n---\n");
    let error = source_error(admin, 3, "the comment-only file");
    assert!(error.contains("only YAML comments"), "{error}");
    assert_eq!(
        sockmesh_tests::kernel_backends(bpffs),
        ["10.10.1.12", "10.10.1.13"]
    );

    // An invalid port: the cluster is refused with the field named and keeps its
    // last good version; the listener is applied.
    agent.replace(&config("bad-port", &["10.10.1.14"], 0));
    let error = wait_until(
        "the NACK of version bad-port",
        Duration::from_secs(10),
        || {
            let dump = admin.dump();
            let cds = &dump["xds"]["cds"];
            if cds["rejected_version"] == "bad-port" {
                Ok(dump["refused"]["cds"]["api"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned())
            } else {
                Err(cds.clone())
            }
        },
    );
    assert!(
        error.contains("load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value: 0 is out of range")
            && error.contains("(resources[1] at line 7 column 1)"),
        "field or place not named in: {error}"
    );
    assert_eq!(
        sockmesh_tests::kernel_backends(bpffs),
        ["10.10.1.12", "10.10.1.13"]
    );

    agent.replace(&config("4", &["10.10.1.14"], 8080));
    wait_for_backends(bpffs, "the fixed file", &["10.10.1.14"]);
    // The refusal is over: nothing of it, nor of the backends before, stays.
    agent
        .audit()
        .assert("the fixed file", &Expect::services(1, 1).xds(1, 1, 0, 0));
    agent.clear_and_audit();
}

/// One listener and one STATIC cluster per service, in proto3 JSON (the form large
/// generated files take), one resource per line.
fn json_config(version: &str, services: &[(&str, &str, &[&str])]) -> String {
    let mut resources = Vec::new();
    for (name, vip, backends) in services {
        resources.push(format!(
            r#"{{"@type":"type.googleapis.com/envoy.config.listener.v3.Listener","name":"{name}","address":{{"socketAddress":{{"address":"{vip}","portValue":443}}}},"filterChains":[{{"filters":[{{"name":"tcp","typedConfig":{{"@type":"type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy","statPrefix":"{name}","cluster":"{name}"}}}}]}}]}}"#
        ));
        let eps: Vec<String> = backends
            .iter()
            .map(|a| format!(r#"{{"endpoint":{{"address":{{"socketAddress":{{"address":"{a}","portValue":8080}}}}}}}}"#))
            .collect();
        resources.push(format!(
            r#"{{"@type":"type.googleapis.com/envoy.config.cluster.v3.Cluster","name":"{name}","type":"STATIC","loadAssignment":{{"clusterName":"{name}","endpoints":[{{"lbEndpoints":[{}]}}]}}}}"#,
            eps.join(",")
        ));
    }
    format!(
        "{{\"versionInfo\":\"{version}\",\"resources\":[\n{}\n]}}\n",
        resources.join(",\n")
    )
}

/// A JSON file is read resource by resource (only what changed is decoded): an
/// edit of one service leaves the other as it was, a service dropped from the file
/// goes, and a broken resource is reported with the file's own line.
#[test]
fn json_file_edits_touch_what_changed_and_errors_name_the_line() {
    let api: &[&str] = &["10.10.2.11"];
    let web: &[&str] = &["10.10.2.21"];
    let agent = FileAgent::start(
        "resources.json",
        &json_config(
            "1",
            &[("api", "10.96.0.30", api), ("web", "10.96.0.31", web)],
        ),
        &[],
    );
    let (admin, bpffs) = (&agent.admin, &agent.bpffs);
    wait_for_backends(bpffs, "the first file", &["10.10.2.11", "10.10.2.21"]);

    let api2: &[&str] = &["10.10.2.12", "10.10.2.13"];
    agent.replace(&json_config(
        "2",
        &[("api", "10.96.0.30", api2), ("web", "10.96.0.31", web)],
    ));
    wait_for_backends(
        bpffs,
        "api edited, web kept",
        &["10.10.2.12", "10.10.2.13", "10.10.2.21"],
    );

    // Line 5 (web's cluster) carries a port that is not a number: the error
    // names that line, and nothing changes.
    let broken = json_config(
        "3",
        &[("api", "10.96.0.30", api), ("web", "10.96.0.31", web)],
    )
    .replace(
        "\"10.10.2.21\",\"portValue\":8080",
        "\"10.10.2.21\",\"portValue\":\"http\"",
    );
    agent.replace(&broken);
    let error = source_error(admin, 1, "the JSON error");
    assert!(error.contains("line 5"), "line not named in: {error}");
    assert_eq!(
        sockmesh_tests::kernel_backends(bpffs),
        ["10.10.2.12", "10.10.2.13", "10.10.2.21"]
    );

    // A field sockmesh does not know (a newer control plane's): ignored and
    // counted, as Envoy ignores it in dynamic configuration; the file applies.
    let newer = json_config(
        "3b",
        &[("api", "10.96.0.30", api), ("web", "10.96.0.31", web)],
    )
    .replace(
        "\"type\":\"STATIC\"",
        "\"type\":\"STATIC\",\"futureKnob\":{\"x\":1}",
    );
    agent.replace(&newer);
    wait_for_backends(bpffs, "the newer file", &["10.10.2.11", "10.10.2.21"]);
    assert_eq!(
        admin.metric(
            "sockmesh_xds_unknown_fields_total{field=\"envoy.config.cluster.v3.Cluster.futureKnob\"}"
        ),
        Some(2.0)
    );

    // web dropped from the file: its service goes, api stays as it was.
    agent.replace(&json_config("4", &[("api", "10.96.0.30", api2)]));
    wait_for_backends(bpffs, "web removed", &["10.10.2.12", "10.10.2.13"]);

    // One bad listener among good ones: the good ones apply (db is new, api
    // moves), the bad one is refused alone and named with its line.
    let db: &[&str] = &["10.10.2.31"];
    let mixed = json_config(
        "5",
        &[
            ("api", "10.96.0.30", api),
            ("bad", "10.96.0.32", web),
            ("db", "10.96.0.33", db),
        ],
    )
    .replace("\"address\":\"10.96.0.32\"", "\"address\":\"not-an-ip\"");
    agent.replace(&mixed);
    wait_for_backends(bpffs, "the good listeners", &["10.10.2.11", "10.10.2.31"]);
    let dump = wait_until("bad refused", Duration::from_secs(10), || {
        let dump = admin.dump();
        (dump["xds"]["lds"]["rejected_version"] == "5")
            .then_some(dump.clone())
            .ok_or(dump)
    });
    let refused = dump["refused"]["lds"]
        .as_object()
        .map(|m| m.keys().cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    assert_eq!(refused, ["bad"], "{dump}");
    assert!(
        dump["refused"]["lds"]["bad"].as_str().is_some_and(|e| e
            .contains("\"not-an-ip\" is not an IP address")
            && e.contains("line 4")),
        "{dump}"
    );
    // api and db: two listeners held (bad's is refused, with no version to
    // keep), three clusters; web's service and backends gone.
    agent.audit().assert(
        "a bad listener refused",
        &Expect::services(2, 2).xds(2, 3, 0, 0),
    );
    agent.clear_and_audit();
}
