//! Real istiod output: the Istio sidecar config dumps in `../shared/xds-corpus/`
//! (read from there, never copied into the project), and the project's own
//! hand-written dumps of shapes those lack (`tests/corpus/`: listeners whose
//! filter sockmesh leaves alone, multi-zone services as istiod writes them),
//! replayed to `sockmesh agent` through the file source and through ADS (delta
//! and SotW), and the kernel's table checked against what Envoy would do with the
//! same resources (`sockmesh_tests::corpus`, an oracle over the dump's JSON that
//! shares no code with sockmesh's translation): every service with its endpoints,
//! each endpoint's share of new connections as a connect() reads it from the
//! maps (priority levels' choice table, slots), the same shares in
//! `/config_dump`'s `load_balancing`, no entry for pass-through (ORIGINAL_DST)
//! services nor for services left alone, warming services and listeners left
//! alone reported as such, nothing refused.

use std::{collections::BTreeSet, net::IpAddr, process::Stdio, time::Duration};

use sockmesh_tests::{
    Admin, Bpffs, Cgroup, FileAgent, Proc, TempDir, agent_command,
    audit::{Audit, Expect},
    control_plane::ControlPlane,
    corpus::{Corpus, Expected, corpus_dir, corpus_files, fixture_files},
    shares::kernel_shares,
    sockmesh_bin, wait_until,
};

/// The project's dumps, and the shared corpus's where it is on this machine (said
/// when it is not).
fn corpora() -> Option<Vec<Corpus>> {
    let mut files = fixture_files();
    assert!(!files.is_empty(), "tests/corpus holds no dump");
    if corpus_dir().is_none() {
        eprintln!(
            "SKIPPED (in part): the xDS corpus (../shared/xds-corpus, or SOCKMESH_XDS_CORPUS) is not on this machine; the project's own dumps run"
        );
    } else {
        let shared = corpus_files();
        assert!(!shared.is_empty(), "the corpus folder holds no dump");
        files.extend(shared);
    }
    Some(files.iter().map(|f| Corpus::load(f)).collect())
}

/// How far a share read from the kernel may be from Envoy's: a slot range holds
/// its hosts' weights to within one of its (up to 4,096) slots.
const SHARE_TOLERANCE: f64 = 2e-3;

/// `Ok` if the kernel's table is what Envoy would do: the same services, and each
/// endpoint's share of its service's new connections read from the maps as a
/// connect() resolves it (choice table, slots) within [`SHARE_TOLERANCE`] of
/// Envoy's; else what differs.
fn compare(bpffs: &Bpffs, expected: &Expected) -> Result<(), String> {
    let table = sockmesh::dataplane::read_table(&bpffs.0).map_err(|e| e.to_string())?;
    let maps = sockmesh::dataplane::open_pinned(&bpffs.0).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    let got: BTreeSet<String> = table.services.keys().map(ToString::to_string).collect();
    let want: BTreeSet<String> = expected.services.keys().cloned().collect();
    for s in got.difference(&want) {
        let why = if expected.passthrough.contains(s) {
            " (Envoy passes it through to the original destination)"
        } else {
            ""
        };
        problems.push(format!("unexpected service {s}{why}"));
    }
    for s in want.difference(&got) {
        problems.push(format!("missing service {s}"));
    }
    for service in table.services.keys() {
        let Some(want) = expected.services.get(&service.to_string()) else {
            continue;
        };
        let shares = kernel_shares(&maps, service)?.unwrap_or_default();
        let got: BTreeSet<(IpAddr, u16)> = shares.keys().copied().collect();
        let keys: BTreeSet<(IpAddr, u16)> = want.keys().copied().collect();
        if got != keys {
            problems.push(format!("{service}: backends {got:?}, Envoy: {keys:?}"));
            continue;
        }
        for ((ip, port), share) in shares {
            let envoy = want[&(ip, port)];
            if (share - envoy).abs() > SHARE_TOLERANCE {
                problems.push(format!(
                    "{service}: {ip}:{port} gets {share:.4} of new connections, Envoy {envoy:.4}"
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{} differences: {problems:#?}", problems.len()))
    }
}

/// `Ok` if `/config_dump`'s `load_balancing` (what the kernel applies, as the agent
/// reports it) gives each endpoint Envoy's share; how many services it lists.
fn compare_dump(dump: &serde_json::Value, expected: &Expected) -> Result<usize, String> {
    let listed = dump["load_balancing"]
        .as_object()
        .ok_or_else(|| format!("no load_balancing in {dump}"))?;
    for (service, lb) in listed {
        let want = expected
            .services
            .get(service)
            .ok_or_else(|| format!("load_balancing lists {service}, which Envoy has not"))?;
        let endpoints = lb["endpoints"].as_object().cloned().unwrap_or_default();
        for (endpoint, e) in &endpoints {
            let addr: std::net::SocketAddr = endpoint
                .parse()
                .map_err(|_| format!("{service}: endpoint {endpoint}"))?;
            let envoy = want.get(&(addr.ip(), addr.port())).copied().unwrap_or(0.0);
            let share = e["share"].as_f64().unwrap_or(-1.0) / 100.0;
            if (share - envoy).abs() > SHARE_TOLERANCE {
                return Err(format!(
                    "{service}: /config_dump gives {endpoint} {share:.4}, Envoy {envoy:.4}: {lb}"
                ));
            }
        }
    }
    Ok(listed.len())
}

/// Waits for the agent to hold `expected` in the kernel, then checks what it
/// reports about the rest.
fn check(corpus: &Corpus, expected: &Expected, bpffs: &Bpffs, admin: &Admin) {
    let listed = |dump: &serde_json::Value, key: &str| -> BTreeSet<String> {
        dump[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let mut levels_listed = 0;
    wait_until(
        &format!("{}: the agent to route as Envoy would", corpus.name),
        Duration::from_secs(30),
        || {
            compare(bpffs, expected)?;
            let dump = admin.dump();
            levels_listed = compare_dump(&dump, expected)?;
            let (passthrough, warming) = (listed(&dump, "passthrough"), listed(&dump, "warming"));
            if passthrough != expected.passthrough {
                return Err(format!(
                    "passthrough {passthrough:?}, Envoy {:?}",
                    expected.passthrough
                ));
            }
            if warming != expected.warming {
                return Err(format!("warming {warming:?}, Envoy {:?}", expected.warming));
            }
            let left: BTreeSet<String> = dump["not_interpreted"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l["listener"].as_str().map(str::to_owned))
                .collect();
            if left != expected.not_interpreted {
                return Err(format!(
                    "left alone {left:?}, Envoy's listeners with filters a socket balancer cannot interpret {:?}",
                    expected.not_interpreted
                ));
            }
            if dump["refused"] != serde_json::json!({}) {
                return Err(format!("refused {}", dump["refused"]));
            }
            Ok(())
        },
    );
    eprintln!(
        "{}: {} services as Envoy would route them ({} with no endpoint, {} served by priority levels), {} passed through, {} warming, {} left alone ({} listeners)",
        corpus.name,
        expected.services.len(),
        expected.services.values().filter(|b| b.is_empty()).count(),
        levels_listed,
        expected.passthrough.len(),
        expected.warming.len(),
        expected.left_alone.len(),
        expected.not_interpreted.len(),
    );
}

#[test]
fn istio_dumps_through_the_file_source_route_as_envoy_would() {
    let Some(corpora) = corpora() else { return };
    for corpus in corpora {
        let agent = FileAgent::start("resources.json", &corpus.discovery_response(), &[]);
        let (admin, bpffs) = (&agent.admin, &agent.bpffs);
        let version = format!("corpus-{}", corpus.name);
        wait_until("the dump to be accepted", Duration::from_secs(30), || {
            let dump = admin.dump();
            (dump["xds"]["lds"]["version"] == version.as_str())
                .then_some(())
                .ok_or(dump)
        });
        let expected = corpus.expected();
        check(&corpus, &expected, bpffs, admin);
        let dump = admin.dump();
        assert_eq!(dump["xds"]["lds"]["rejected"], 0, "{}: {dump}", corpus.name);
        assert_eq!(dump["source_errors"], 0, "{}: {dump}", corpus.name);
        // istiod's own extension types are carried, not rejected, and counted.
        if corpus.discovery_response().contains("stats.PluginConfig") {
            let counted = admin.metric(
                "sockmesh_xds_opaque_configs_total{type_url=\"type.googleapis.com/stats.PluginConfig\"}",
            );
            assert!(
                counted.is_some_and(|n| n > 0.0),
                "{}: {counted:?}",
                corpus.name
            );
        }
        // Every entry of the mesh's services belongs to one, and all of it goes
        // with the mesh.
        agent
            .audit()
            .assert(&format!("{} routed", corpus.name), &Expect::default());
        agent.clear_and_audit();
    }
}

/// The resources of a dump as the control plane serves them: (name, Any).
fn ads_resources(corpus: &Corpus) -> Vec<(String, sockmesh_proto::pb::google::protobuf::Any)> {
    let resp = sockmesh::xds::decode::discovery_response_from_text(&corpus.discovery_response())
        .expect("the dump decodes");
    let names = corpus
        .clusters
        .iter()
        .map(|c| &c["name"])
        .chain(corpus.endpoints.iter().map(|e| &e["cluster_name"]))
        .chain(corpus.listeners.iter().map(|l| &l["name"]))
        .chain(corpus.routes.iter().map(|r| &r["name"]))
        .map(|n| n.as_str().unwrap_or_default().to_owned());
    names.zip(resp.resources).collect()
}

fn through_ads(protocol: &str) {
    let Some(corpora) = corpora() else { return };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for corpus in corpora {
        if corpus.listeners.is_empty() || corpus.clusters.is_empty() {
            // Nothing a client would subscribe to by name; the file replay covers it.
            eprintln!(
                "{}: no listeners or clusters to serve over ADS",
                corpus.name
            );
            continue;
        }
        let cp = ControlPlane::new();
        let (addr, _stop) = rt.block_on(cp.serve("127.0.0.1:0".parse().expect("addr")));
        cp.publish(&ads_resources(&corpus), true);
        let tmp = TempDir::new("sockmesh-corpus-");
        let cgroup = Cgroup::new();
        let bpffs = Bpffs::new();
        let admin = Admin::in_dir(&tmp.0);
        let _agent = Proc(
            agent_command(sockmesh_bin(), &cgroup, &bpffs)
                .args([
                    "--xds",
                    &format!("grpc://{addr}"),
                    "--xds-protocol",
                    protocol,
                ])
                .args(admin.args())
                .stdout(Stdio::null())
                .stderr(admin.log())
                .spawn()
                .expect("agent"),
        );
        check(&corpus, &corpus.expected(), &bpffs, &admin);
        assert!(
            cp.nacks().is_empty(),
            "{}: NACKed {:?}",
            corpus.name,
            cp.nacks()
        );
        let audit = Audit::agent(&bpffs.0, &admin);
        audit.assert(&format!("{} routed", corpus.name), &Expect::default());
        cp.remove_all();
        audit.assert_empty(&format!(
            "{}: the control plane's mesh removed",
            corpus.name
        ));
    }
}

#[test]
fn istio_dumps_over_ads_delta_route_as_envoy_would() {
    through_ads("delta");
}

#[test]
fn istio_dumps_over_ads_sotw_route_as_envoy_would() {
    through_ads("sotw");
}

/// The file source's fast JSON decoder (`sockmesh::xds::json_wire`) on istiod's
/// own output: every dynamic resource of every dump, as its JSON text, decodes as
/// the reference decoder decodes it wherever the fast one takes it, and the fast
/// one takes every resource the reference accepts with nothing to note (the rest
/// hold Istio's own filter types, which the descriptor pool lacks and the
/// reference carries opaquely). Needs the shared corpus: its shapes are the point.
#[test]
fn real_resources_decode_as_the_reference_decodes_them() {
    use sockmesh::xds::json_wire::{Taken, check_against_reference};
    assert!(
        corpus_dir().is_some(),
        "the xDS corpus (../shared/xds-corpus, or SOCKMESH_XDS_CORPUS) is required"
    );
    let mut files = corpus_files();
    files.extend(fixture_files());
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut left = Vec::new();
    for corpus in files.iter().map(|f| Corpus::load(f)) {
        let resources = corpus
            .clusters
            .iter()
            .chain(&corpus.endpoints)
            .chain(&corpus.listeners)
            .chain(&corpus.routes);
        for resource in resources {
            let text = resource.to_string();
            let taken = check_against_reference(&text)
                .unwrap_or_else(|e| panic!("{}: {e}\n{text}", corpus.name));
            *counts.entry(format!("{taken:?}")).or_default() += 1;
            if taken == Taken::ReferenceClean {
                left.push(format!("{}: {text}", corpus.name));
            }
        }
    }
    eprintln!("decoded by: {counts:?}");
    assert!(counts.contains_key("Here"), "the fast decoder took nothing");
    assert!(
        left.is_empty(),
        "left to the reference, which accepts them cleanly:\n{}",
        left.join("\n")
    );
}
