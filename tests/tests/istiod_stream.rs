//! The ADS stream's life against a live istiod, delta and SotW, under a
//! connection loop: istiod closing the stream at its `MaxConnectionAge` (GOAWAY,
//! then the connection cut after the grace period) and the agent reopening it,
//! and istiod itself killed (SIGKILL) and started again from its files. Nothing
//! fails meanwhile, the kernel keeps its table while istiod is away, and what the
//! agent asks for after reconnecting is what it wants now, not what it once did.

use std::{collections::BTreeMap, time::Duration};

use sockmesh_tests::{
    istiod::{Istiod, Options},
    istiod_lab::{
        Agent, AgentSpec, NODE_A, Pods, RequestLoop, Table, base_objects, pods_and_slice,
    },
    kube::{self, tcp},
    wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const WEB_VIP: &str = "10.96.1.10:80";

/// A service of the test: name, VIP, and its pods' indexes (pod `name-i` at
/// `10.10.S.i`, S the service's number).
#[derive(Clone, Debug)]
struct Svc {
    name: &'static str,
    number: u8,
    pods: Vec<u8>,
}

impl Svc {
    fn vip(&self) -> String {
        format!("10.96.1.{}", self.number * 10)
    }

    fn pod(&self, i: u8) -> (String, String) {
        (
            format!("{}-{i}", self.name),
            format!("10.10.{}.{i}", self.number),
        )
    }

    fn eds_name(&self) -> String {
        format!("outbound|80||{}.app.svc.cluster.local", self.name)
    }
}

fn objects(agents: &[(&str, &str)], services: &[Svc]) -> String {
    let mut objs = base_objects(agents);
    objs.push(kube::namespace("app", &[]));
    for s in services {
        objs.push(kube::service(
            "app",
            s.name,
            Some(&s.vip()),
            Some(s.name),
            &[tcp("tcp-main", 80, 8080)],
            "",
        ));
        let pods: Vec<(String, String)> = s.pods.iter().map(|&i| s.pod(i)).collect();
        let pods: Vec<(&str, &str, &str)> = pods
            .iter()
            .map(|(n, ip)| (n.as_str(), ip.as_str(), NODE_A))
            .collect();
        objs.extend(pods_and_slice(
            "app",
            s.name,
            s.name,
            &pods,
            &[("tcp-main", 8080)],
        ));
    }
    kube::docs(objs)
}

fn expected(services: &[Svc]) -> Table {
    services
        .iter()
        .map(|s| {
            let mut b: Vec<String> = s
                .pods
                .iter()
                .map(|&i| format!("{}:8080", s.pod(i).1))
                .collect();
            b.sort();
            (format!("{}:80/tcp", s.vip()), b)
        })
        .collect()
}

/// Every pod any step has: servers for all of them run throughout.
fn served() -> Vec<(String, u16, String)> {
    let mut out = Vec::new();
    for (name, number) in [("web", 1), ("api", 2), ("old", 3), ("fresh", 4)] {
        let s = Svc {
            name,
            number,
            pods: vec![],
        };
        for i in 1..=5 {
            let (n, ip) = s.pod(i);
            out.push((ip, 8080, n));
        }
    }
    out
}

fn start_pods() -> Pods {
    let served = served();
    let refs: Vec<(&str, u16, &str)> = served
        .iter()
        .map(|(ip, p, n)| (ip.as_str(), *p, n.as_str()))
        .collect();
    Pods::new(PROBE, &refs)
}

fn initial() -> Vec<Svc> {
    vec![
        Svc {
            name: "web",
            number: 1,
            pods: vec![1, 2, 3],
        },
        Svc {
            name: "api",
            number: 2,
            pods: vec![1, 2],
        },
        Svc {
            name: "old",
            number: 3,
            pods: vec![1],
        },
    ]
}

fn agents_of(istiod: &Istiod, specs: Vec<AgentSpec>) -> Vec<Agent> {
    specs.into_iter().map(|s| Agent::start(istiod, s)).collect()
}

fn specs() -> Vec<AgentSpec> {
    vec![AgentSpec::on_node_a("delta"), AgentSpec::on_node_a("sotw")]
}

/// The ids of the proxy's connections istiod holds (`/debug/adsz`).
fn connection_ids(istiod: &Istiod, proxy: &str) -> Vec<String> {
    let v = istiod.get_json("/debug/adsz");
    v["clients"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["connectionId"].as_str())
        .filter(|id| id.rsplit_once('-').is_some_and(|(p, _)| p == proxy))
        .map(str::to_owned)
        .collect()
}

/// Waits until the proxy is connected on a connection other than `old`.
fn wait_reconnected(istiod: &Istiod, agent: &Agent, old: &str) -> String {
    wait_until(
        &format!("{} to reconnect (after {old})", agent.proxy()),
        Duration::from_secs(20),
        || match connection_ids(istiod, &agent.proxy()).as_slice() {
            [id] if id != old => Ok(id.clone()),
            other => Err(format!("{other:?}")),
        },
    )
}

fn no_failures(agent: &Agent, requests: &[sockmesh_tests::istiod_lab::Request]) {
    let mut t: BTreeMap<&str, u32> = BTreeMap::new();
    for r in requests {
        *t.entry(r.answer.as_str()).or_default() += 1;
    }
    let failed: Vec<_> = requests
        .iter()
        .filter(|r| !r.answer.starts_with("web-"))
        .collect();
    eprintln!("{}: {} requests {t:?}", agent.proxy(), requests.len());
    assert!(failed.is_empty(), "{}: {failed:?}", agent.proxy());
}

#[test]
fn istiod_max_connection_age_reconnects_with_what_is_wanted_now() {
    let pods = start_pods();
    let specs = specs();
    let names: Vec<(&str, &str)> = specs.iter().map(|s| (s.pod.as_str(), s.node)).collect();
    let mut services = initial();
    let opts = Options {
        // grpc-go adds ±10 % of jitter, then GOAWAY; the stream may go on for the
        // grace period, then the connection is cut.
        max_connection_age: Some((Duration::from_secs(2), Duration::from_millis(500))),
        ..Options::default()
    };
    let istiod = Istiod::start(&objects(&names, &services), "", &opts);
    let agents = agents_of(&istiod, specs);
    for a in &agents {
        a.wait_table("the initial services", &expected(&services));
    }
    let mut loops: Vec<RequestLoop> = agents
        .iter()
        .map(|a| RequestLoop::start(&pods, a, WEB_VIP, 100))
        .collect();

    // The server closes the stream; the agent reopens it.
    let first: Vec<String> = agents
        .iter()
        .map(|a| {
            wait_until("a connection", Duration::from_secs(10), || {
                connection_ids(&istiod, &a.proxy()).pop()
            })
        })
        .collect();
    let pushes = |a: &Agent| a.admin.dump()["push"]["pushes"].as_u64().unwrap_or(0);
    let before: Vec<u64> = agents.iter().map(pushes).collect();
    let second: Vec<String> = agents
        .iter()
        .zip(&first)
        .map(|(a, old)| wait_reconnected(&istiod, a, old))
        .collect();
    // istiod sends everything again on the new stream; the kernel is not
    // rewritten for it (no kernel write at all: the table is the same).
    for (a, n) in agents.iter().zip(&before) {
        wait_until(
            "istiod to see every response ACKed",
            Duration::from_secs(10),
            || istiod.acked_all(&a.proxy()),
        );
        assert_eq!(
            pushes(a),
            *n,
            "{}: kernel writes after a reconnect",
            a.proxy()
        );
    }

    // A service goes while connected: the agents drop its endpoints'
    // subscription and its backends.
    let old = services.pop().expect("old");
    let gone = objects(&[], std::slice::from_ref(&old));
    let gone: Vec<&str> = gone
        .split("---\n")
        .filter(|d| d.contains("name: old"))
        .collect();
    istiod.delete_kube(&kube::docs(gone));
    for a in &agents {
        a.wait_table("the old service gone", &expected(&services));
    }
    // The next connection, opened after that, asks only for what is wanted now:
    // istiod's watches of the proxy name no endpoints of the old service.
    for (a, old_id) in agents.iter().zip(&second) {
        wait_reconnected(&istiod, a, old_id);
        let want: Vec<String> = {
            let mut v: Vec<String> = services.iter().map(Svc::eds_name).collect();
            v.sort();
            v
        };
        wait_until(
            &format!("{}: istiod's watches after the reconnect", a.proxy()),
            Duration::from_secs(10),
            || {
                let w = istiod.watches(&a.proxy());
                match w.as_slice() {
                    [w] if w.get(EDS) == Some(&want) => Ok(()),
                    _ => Err(format!("{w:?}")),
                }
            },
        );
        wait_until(
            "istiod to see every response ACKed",
            Duration::from_secs(10),
            || istiod.acked_all(&a.proxy()),
        );
        // Nor of any other type (a delta reconnect announces what it holds of
        // the wildcard types, which no longer includes the old cluster).
        let w = istiod.watches(&a.proxy());
        let stale: Vec<&String> = w[0]
            .values()
            .flatten()
            .filter(|n| n.contains("old.app"))
            .collect();
        assert!(stale.is_empty(), "{}: {stale:?}", a.proxy());
        assert_eq!(a.table(), expected(&services), "{}", a.proxy());
        a.assert_clean_under_traffic();
    }
    for l in &mut loops {
        l.wait_answers_since(sockmesh_tests::monotonic_ns(), 5);
    }
    for (a, l) in agents.iter().zip(loops) {
        no_failures(a, &l.stop());
        a.audit();
    }
}

#[test]
fn istiod_killed_and_restarted_the_table_is_kept_and_converges() {
    let pods = start_pods();
    let specs = specs();
    let names: Vec<(String, &str)> = specs.iter().map(|s| (s.pod.clone(), s.node)).collect();
    let names: Vec<(&str, &str)> = names.iter().map(|(p, n)| (p.as_str(), *n)).collect();
    let mut services = initial();
    let mut istiod = Istiod::start(&objects(&names, &services), "", &Options::default());
    let agents = agents_of(&istiod, specs);
    for a in &agents {
        a.wait_table("the initial services", &expected(&services));
    }
    let mut loops: Vec<RequestLoop> = agents
        .iter()
        .map(|a| RequestLoop::start(&pods, a, WEB_VIP, 100))
        .collect();

    // A change over the API, then istiod dies without a goodbye.
    services[0].pods = vec![1, 2, 3, 4];
    let changed = objects(&[], &services[..1]);
    let changed: Vec<&str> = changed
        .split("---\n")
        .filter(|d| d.contains("web"))
        .collect();
    istiod.apply_kube(&kube::docs(changed));
    for a in &agents {
        a.wait_table("web scaled to 4", &expected(&services));
    }
    istiod.kill();
    for a in &agents {
        wait_until(
            &format!("{} to notice", a.proxy()),
            Duration::from_secs(10),
            || a.metric("sockmesh_xds_connected") == 0.0,
        );
        assert_eq!(
            a.table(),
            expected(&services),
            "{}: the table while istiod is away",
            a.proxy()
        );
    }
    for l in &mut loops {
        l.wait_answers_since(sockmesh_tests::monotonic_ns(), 20);
    }

    // istiod comes back from its files, which hold what the cluster has now: web
    // rolled (web-1 gone, web-5 new), the old service deleted, a new one.
    services[0].pods = vec![2, 3, 4, 5];
    services.pop();
    services.push(Svc {
        name: "fresh",
        number: 4,
        pods: vec![1, 2],
    });
    istiod.write_kube_file("00-initial.yaml", &objects(&names, &services));
    istiod.restart();
    for a in &agents {
        a.wait_table("the restarted istiod's view", &expected(&services));
        wait_until(
            "istiod to see every response ACKed",
            Duration::from_secs(10),
            || istiod.acked_all(&a.proxy()),
        );
        a.assert_clean_under_traffic();
        assert_eq!(pods.reached(a, "10.96.1.40:80", 30), ["fresh-1", "fresh-2"]);
        // The old service's VIP is no longer the kernel's: a connection to it goes
        // where it was sent (nowhere, in this namespace).
        assert_eq!(pods.reached(a, "10.96.1.30:80", 1), ["E101"]);
    }
    for l in &mut loops {
        l.wait_answers_since(sockmesh_tests::monotonic_ns(), 20);
    }
    for (a, l) in agents.iter().zip(loops) {
        no_failures(a, &l.stop());
        a.audit();
    }
}
