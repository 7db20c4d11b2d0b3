//! Enrollment (`sockmesh agent --kubernetes`): pods are served only when their
//! namespace or they carry `sockmesh.io/enrolled=true`, each through links on its
//! own cgroup; sidecar, ambient and host-network pods are left alone. Against the
//! test API server of `tests/src/kubeapi.rs` (TLS, token, list/watch, bookmarks,
//! 410 Gone); "pods" are network namespaces plus cgroups in the kubelet's shape
//! under the test's own cgroup.

use std::{collections::BTreeMap, time::Duration};

use sockmesh_tests::{
    Cgroup, Lines, NetNs, Proc, add_addr, client_pod, command_in, hold, ip,
    kubeapi::{Kind, namespace},
    kubelab::{
        Driver, KubeLab, VIP, cgroup_id, enrollment, put_pod, wait_attached, wait_ready,
        wait_skipped,
    },
    kubeproxy, pod_network, release, run, serve, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");
const ENROLLED: (&str, &str) = ("sockmesh.io/enrolled", "true");
const SIDECAR: (&str, &str) = (
    "sidecar.istio.io/status",
    r#"{"initContainers":["istio-init"],"containers":["istio-proxy"]}"#,
);
const UID_A: &str = "5f0c7a1e-0000-4000-8000-00000000000a";
const UID_B: &str = "5f0c7a1e-0000-4000-8000-00000000000b";
const UID_H: &str = "5f0c7a1e-0000-4000-8000-00000000000c";
const UID_OTHER: &str = "5f0c7a1e-0000-4000-8000-00000000000d";

/// `smprobe connect VIP n` from a pod: the answers (backend names, `proxy`, or
/// `E<errno>`).
fn connect(ns: &NetNs, cgroup: &Cgroup, n: u32) -> Vec<String> {
    let mut cmd = command_in(ns, Some(cgroup), PROBE);
    cmd.args(["connect", VIP, &n.to_string()]);
    run(cmd)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .collect()
}

/// A sidecar's capture: iptables in `ns` (only there) redirects outbound TCP to
/// the service range to 127.0.0.1:15001, where `smprobe capture` records each
/// connection's original destination (`SO_ORIGINAL_DST`) and answers `proxy`.
fn sidecar_capture(ns: &NetNs) -> (Proc, Lines) {
    kubeproxy::run_in(
        ns,
        "iptables-legacy-restore",
        &[],
        "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -d 10.96.0.0/16 -j REDIRECT --to-ports 15001\nCOMMIT\n",
    )
    .expect("iptables REDIRECT in the sidecar pod");
    let mut child = command_in(ns, None, PROBE)
        .args(["capture", "127.0.0.1:15001", "proxy"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("capture proxy");
    let lines = Lines::of(&mut child);
    let proc = Proc(child);
    assert_eq!(
        lines.next("the capture proxy's readiness", Duration::from_secs(10)),
        "ready"
    );
    (proc, lines)
}

/// The same connections answered, counted by answer.
fn tally(answers: &[String]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for a in answers {
        *t.entry(a.clone()).or_default() += 1;
    }
    t
}

#[test]
fn sidecar_ambient_and_enrolled_pods_side_by_side() {
    let lab = KubeLab::new(Driver::Systemd);
    let api = &lab.api;
    api.put(Kind::Namespace, namespace("shop", &[ENROLLED]));
    api.put(Kind::Namespace, namespace("sockmesh-system", &[]));
    // Pod A: a sidecar pod in the enrolled namespace. Pod B: a plain pod there.
    // H: a host-network pod. OTHER: a pod of another node, never listed.
    put_pod(api, "shop", "a", UID_A, &[], &[SIDECAR]);
    put_pod(api, "shop", "b", UID_B, &[], &[]);
    api.put(
        Kind::Pod,
        sockmesh_tests::kubeapi::pod("shop", "h", UID_H, "node-a", &[ENROLLED], &[], true),
    );
    api.put(
        Kind::Pod,
        sockmesh_tests::kubeapi::pod("shop", "x", UID_OTHER, "node-b", &[ENROLLED], &[], false),
    );
    let cg_a = lab.pod_cgroup(UID_A);
    let cg_b = lab.pod_cgroup(UID_B);

    let backend = NetNs::new();
    let pod_a = NetNs::new();
    pod_network(&pod_a, &backend, 2);
    ip(&["-n", &pod_a.0, "route", "add", "10.96.0.0/16", "dev", "sm0"]);
    let _server = serve(
        &backend,
        PROBE,
        [
            "10.10.1.11:8080=b1".to_owned(),
            "10.10.1.12:8080=b2".to_owned(),
        ],
    );
    let (_proxy, captured) = sidecar_capture(&pod_a);

    let (mut agent, admin) = lab.agent();
    // The connections below count on the file's table being in the kernel.
    wait_ready(&admin);
    let b = wait_attached(&admin, "shop/b");
    assert_eq!(b["cgroup_id"], cgroup_id(&cg_b), "{b}");
    wait_skipped(&admin, "shop/a", "sidecar");
    wait_skipped(&admin, "shop/h", "host_network");
    let e = enrollment(&admin);
    assert_eq!(e["synced"], true);
    assert!(
        e["skipped"].get("shop/x").is_none(),
        "another node's pod listed: {e}"
    );
    assert_eq!(e["istio_sidecar"]["state"], "no_istio", "{e}");
    assert_eq!(admin.metric("sockmesh_enrolled_pods"), Some(1.0));
    let mut cmd = std::process::Command::new(sockmesh_tests::sockmesh_bin());
    cmd.arg("status")
        .arg("--admin")
        .arg(admin.addr().to_string());
    cmd.arg("--bpffs").arg(&lab.bpffs.0);
    let status = run(cmd);
    eprintln!("sockmesh status:\n{status}");
    assert!(status.contains("enrolled: shop/b attached"), "{status}");
    assert!(
        status.contains("2 skipped: host_network 1, sidecar 1"),
        "{status}"
    );
    assert_eq!(
        admin.metric("sockmesh_skipped_pods{reason=\"sidecar\"}"),
        Some(1.0)
    );
    assert_eq!(
        admin.metric("sockmesh_skipped_pods{reason=\"host_network\"}"),
        Some(1.0)
    );
    // The programs are on B's cgroup only: never on the pods root or above.
    let attached: BTreeMap<_, _> = lab.attached(&[&cg_a, &cg_b]).into_iter().collect();
    assert_eq!(
        attached[&cg_b.0].len(),
        sockmesh::dataplane::HOOKS.len(),
        "{attached:?}"
    );
    for c in [&lab.root.0, &lab.pods_root.0, &lab.qos.0, &cg_a.0] {
        assert!(
            attached[c].is_empty(),
            "{} has {:?}",
            c.display(),
            attached[c]
        );
    }

    // The sidecar pod: its proxy sees the service address.
    let answers = connect(&pod_a, &cg_a, 5);
    assert_eq!(tally(&answers), BTreeMap::from([("proxy".to_owned(), 5)]));
    for _ in 0..5 {
        assert_eq!(
            captured.next("a captured connection", Duration::from_secs(5)),
            VIP
        );
    }

    // The same pod without its sidecar, enrolled by its namespace: connect()
    // reaches a backend directly, the redirect of the service range never sees it.
    put_pod(api, "shop", "a", UID_A, &[], &[]);
    let a = wait_attached(&admin, "shop/a");
    eprintln!(
        "pod shop/a: watch event → programs attached in {} µs",
        a["enrolled_after_us"]
    );
    let answers = connect(&pod_a, &cg_a, 20);
    let t = tally(&answers);
    assert_eq!(t.values().sum::<usize>(), 20, "{t:?}");
    assert!(t.keys().all(|k| k == "b1" || k == "b2"), "{t:?}");

    // Its namespace turned ambient: left alone again (ztunnel's capture, here the
    // same redirect, sees the service address); the next capture is this
    // connection's, so none of the enrolled ones reached the proxy.
    api.put(
        Kind::Namespace,
        namespace("shop", &[ENROLLED, ("istio.io/dataplane-mode", "ambient")]),
    );
    wait_skipped(&admin, "shop/a", "ambient");
    wait_skipped(&admin, "shop/b", "ambient");
    eprintln!("ambient namespace: {}", enrollment(&admin)["skipped"]);
    assert_eq!(connect(&pod_a, &cg_a, 1), ["proxy"]);
    assert_eq!(
        captured.next("the ambient pod's connection", Duration::from_secs(5)),
        VIP
    );
    let attached = lab.attached(&[&cg_a, &cg_b]);
    assert!(attached.iter().all(|(_, p)| p.is_empty()), "{attached:?}");
    assert!(
        lab.pinned_cgroups().is_empty(),
        "{:?}",
        lab.pinned_cgroups()
    );
    api.put(Kind::Namespace, namespace("shop", &[ENROLLED]));
    wait_attached(&admin, "shop/b");

    // The pods deleted: A's cgroup removed by the kubelet first, B's after its
    // DELETE. Their links go, and nothing stays attached anywhere.
    drop(cg_a);
    api.delete(Kind::Pod, UID_A);
    api.delete(Kind::Pod, UID_B);
    wait_until(
        "the deleted pods' links unpinned",
        Duration::from_secs(20),
        || {
            let pinned = lab.pinned_cgroups();
            pinned.is_empty().then_some(()).ok_or(format!("{pinned:?}"))
        },
    );
    let attached = lab.attached(&[&cg_b]);
    assert!(attached.iter().all(|(_, p)| p.is_empty()), "{attached:?}");
    assert_eq!(admin.metric("sockmesh_enrolled_pods"), Some(0.0));
    lab.finish(&admin, 0);
    assert!(agent.terminate().success());
}

#[test]
fn enrolling_and_unenrolling_under_a_connection_loop_fails_nothing() {
    let lab = KubeLab::new(Driver::Systemd);
    let api = &lab.api;
    api.put(Kind::Namespace, namespace("shop", &[]));
    put_pod(api, "shop", "b", UID_B, &[ENROLLED], &[]);
    let cg_b = lab.pod_cgroup(UID_B);
    let backend = NetNs::new();
    let pod_b = client_pod(&backend, 2);
    for a in ["10.10.1.11/32", "10.10.1.12/32"] {
        add_addr(&backend, "lo", a);
    }
    let _server = serve(
        &backend,
        PROBE,
        [
            "10.10.1.11:8080=b1".to_owned(),
            "10.10.1.12:8080=b2".to_owned(),
        ],
    );
    // The node's kube-proxy, for the pod when it is not enrolled: a DNAT of the
    // service to b1, in the pod's namespace only.
    let dev = "smc2";
    ip(&["-n", &pod_b.0, "route", "add", "10.96.0.0/16", "dev", dev]);
    kubeproxy::run_in(
        &pod_b,
        "iptables-legacy-restore",
        &[],
        "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -d 10.96.0.10/32 --dport 80 -j DNAT --to-destination 10.10.1.11:8080\nCOMMIT\n",
    )
    .expect("kube-proxy stand-in");
    let (mut agent, admin) = lab.agent();
    wait_attached(&admin, "shop/b");

    // 200 connections/s; every 60 answers, B's label flips (false opts it out).
    let mut cmd = command_in(&pod_b, Some(&cg_b), PROBE);
    cmd.args(["rate", VIP, "200", "7000"])
        .stdout(std::process::Stdio::piped());
    let mut load = cmd.spawn().expect("rate");
    let lines = Lines::of(&mut load);
    let mut answers = Vec::new();
    let mut flips = 0;
    let mut enrolled = true;
    for i in 1..=1400 {
        let line = lines.next("a connection's answer", Duration::from_secs(10));
        answers.push(line.split_whitespace().nth(2).unwrap_or("?").to_owned());
        if i % 100 == 0 && i < 1400 {
            enrolled = !enrolled;
            flips += 1;
            let value = if enrolled { "true" } else { "false" };
            put_pod(
                api,
                "shop",
                "b",
                UID_B,
                &[("sockmesh.io/enrolled", value)],
                &[],
            );
        }
    }
    assert!(load.wait().expect("rate exits").success());
    let t = tally(&answers);
    eprintln!(
        "{} connections while the pod's enrollment flipped {flips} times: {t:?}",
        answers.len()
    );
    assert_eq!(answers.len(), 1400, "{t:?}");
    assert!(
        t.keys().all(|k| k == "b1" || k == "b2"),
        "failed connections: {t:?}"
    );
    assert!(
        t.get("b2").is_some_and(|n| *n > 50),
        "sockmesh served while enrolled: {t:?}"
    );
    assert!(flips >= 10, "{flips}");
    // The last flip's state holds in the kernel.
    if enrolled {
        wait_attached(&admin, "shop/b");
    } else {
        wait_skipped(&admin, "shop/b", "opted_out");
        wait_until("B's links detached", Duration::from_secs(10), || {
            lab.pinned_cgroups().is_empty()
        });
        put_pod(api, "shop", "b", UID_B, &[ENROLLED], &[]);
        wait_attached(&admin, "shop/b");
    }
    // A connection placed while B is enrolled and closed after B opts out: the
    // placing programs stand aside at once (a new connect meets kube-proxy's DNAT), the
    // release program stays while B's processes run, so the close deletes the
    // connection's reverse entry; B's links go once its last process has.
    let reverse = || {
        sockmesh_tests::audit::read(&lab.bpffs.0)
            .map(|m| m.reverse)
            .unwrap_or(usize::MAX)
    };
    let (held, holder) = hold(PROBE, &pod_b, &cg_b, VIP, 1);
    assert!(
        held.contains_key("b2") || held.contains_key("b1"),
        "{held:?}"
    );
    assert_eq!(reverse(), 1, "the held connection's reverse entry");
    put_pod(
        api,
        "shop",
        "b",
        UID_B,
        &[("sockmesh.io/enrolled", "false")],
        &[],
    );
    wait_skipped(&admin, "shop/b", "opted_out");
    let mut cmd = command_in(&pod_b, Some(&cg_b), PROBE);
    cmd.args(["connect", VIP, "20"]);
    let after = run(cmd);
    assert!(
        after.lines().all(|l| l.ends_with(" b1")),
        "an opted-out pod's connects are kube-proxy's: {after}"
    );
    // The placing programs are swapped for stand-ins in the same links, not
    // detached (a detach can flip the kernel's per-attach-type static key); the
    // release programs stay.
    let programs = &lab.attached(&[&cg_b])[3].1;
    for (placing, off) in sockmesh_common::hooks::OPTED_OUT {
        assert!(
            programs.iter().any(|p| p == off.program)
                && !programs.iter().any(|p| p == placing.program),
            "{programs:?}"
        );
    }
    assert!(
        programs.iter().any(|p| p == "sm_sock_release"),
        "B's release links stay: {programs:?}"
    );
    release(holder);
    wait_until(
        "the held connection's reverse entry deleted at its close",
        Duration::from_secs(10),
        || (reverse() == 0).then_some(()).ok_or(reverse()),
    );
    wait_until("B's links detached", Duration::from_secs(10), || {
        lab.pinned_cgroups().is_empty()
    });
    let (sum, count) = (
        admin
            .metric("sockmesh_enrollment_seconds_sum")
            .unwrap_or_default(),
        admin
            .metric("sockmesh_enrollment_seconds_count")
            .unwrap_or_default(),
    );
    eprintln!(
        "watch event → programs attached: {count} enrollments, mean {:.0} µs",
        sum / count.max(1.0) * 1e6
    );
    assert!(count >= 7.0, "every enrolling flip measured: {count}");
    api.delete(Kind::Pod, UID_B);
    wait_until("B's links unpinned", Duration::from_secs(10), || {
        lab.pinned_cgroups().is_empty()
    });
    let attached = lab.attached(&[&cg_b]);
    assert!(attached.iter().all(|(_, p)| p.is_empty()), "{attached:?}");
    lab.finish(&admin, 0);
    assert!(agent.terminate().success());
}

const UID_1: &str = "7a1e0c5f-0000-4000-8000-000000000001";
const UID_2: &str = "7a1e0c5f-0000-4000-8000-000000000002";
const UID_3: &str = "7a1e0c5f-0000-4000-8000-000000000003";
const UID_4: &str = "7a1e0c5f-0000-4000-8000-000000000004";

/// The pods watch requests the agent made so far: (lists, watches' revisions).
fn pod_requests(api: &sockmesh_tests::kubeapi::KubeApi) -> (usize, Vec<Option<String>>) {
    let reqs: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.kind == Kind::Pod)
        .collect();
    for r in &reqs {
        assert_eq!(
            r.field_selector.as_deref(),
            Some("spec.nodeName=node-a"),
            "{r:?}"
        );
    }
    (
        reqs.iter().filter(|r| !r.watch).count(),
        reqs.iter()
            .filter(|r| r.watch)
            .map(|r| r.resource_version.clone())
            .collect(),
    )
}

/// The links pinned for the cgroup `id`: (program, link id, program id).
fn links_of(lab: &KubeLab, id: u64) -> Vec<(String, u32, u32)> {
    sockmesh::dataplane::pinned_links(&lab.bpffs.0)
        .expect("pinned links")
        .into_iter()
        .filter(|l| l.cgroup_id == id)
        .map(|l| (l.program, l.link_id, l.program_id))
        .collect()
}

#[test]
fn the_watch_resumes_relists_after_410_and_a_restarted_agent_adopts_and_prunes() {
    let lab = KubeLab::new(Driver::Cgroupfs);
    let api = &lab.api;
    api.put(Kind::Namespace, namespace("shop", &[ENROLLED]));
    // Istio installed, with a mesh-wide default narrowed to the own namespace.
    api.set_sidecars("sockmesh-system", Vec::new());
    api.set_sidecars(
        "istio-system",
        vec![serde_json::json!({
            "apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
            "metadata": {"name": "default", "namespace": "istio-system",
                         "creationTimestamp": "2026-12-01T00:00:00Z"},
            "spec": {"egress": [{"hosts": ["./*", "istio-system/*"]}]}})],
    );
    for (name, uid) in [("p1", UID_1), ("p2", UID_2), ("p3", UID_3)] {
        put_pod(api, "shop", name, uid, &[], &[]);
    }
    let cg1 = lab.pod_cgroup(UID_1);
    let cg2 = lab.pod_cgroup(UID_2);
    let (mut agent, admin) = lab.agent();
    wait_attached(&admin, "shop/p1");
    wait_attached(&admin, "shop/p2");
    let e = enrollment(&admin);
    assert_eq!(e["cgroup_driver"], "cgroupfs");
    assert_eq!(
        e["enrolled"]["shop/p3"]["state"], "waiting",
        "no cgroup yet: {e}"
    );
    assert_eq!(admin.metric("sockmesh_enrollment_waiting_pods"), Some(1.0));
    wait_until("the Sidecar scope checked", Duration::from_secs(10), || {
        let s = enrollment(&admin)["istio_sidecar"].clone();
        (s["effective"] == "istio-system/default")
            .then_some(())
            .ok_or(s)
    });
    assert_eq!(
        enrollment(&admin)["istio_sidecar"]["narrowing_hosts"],
        serde_json::json!(["./*", "istio-system/*"])
    );
    assert_eq!(admin.metric("sockmesh_istio_sidecar_narrowing"), Some(1.0));

    // The kubelet makes p3's cgroup: it is enrolled as soon as it appears.
    let made = std::time::Instant::now();
    let cg3 = lab.pod_cgroup(UID_3);
    wait_attached(&admin, "shop/p3");
    eprintln!(
        "pod p3's cgroup made → attached (seen through /config_dump) in {:?}",
        made.elapsed()
    );
    assert_eq!(lab.pinned_cgroups().len(), 3);

    // A watch that ends resumes from the last revision seen: the bookmark's, newer
    // than any event of this node's pods (a pod of another node moved it on).
    let (lists, watches) = pod_requests(api);
    assert_eq!(lists, 1, "{watches:?}");
    api.put(
        Kind::Pod,
        sockmesh_tests::kubeapi::pod("shop", "x", UID_4, "node-b", &[], &[], false),
    );
    let mark = api.bookmark();
    wait_until("the bookmark delivered", Duration::from_secs(10), || {
        api.bookmarks_delivered(Kind::Pod).contains(&mark)
    });
    api.disconnect();
    let resumed = wait_until("the pods watch resumed", Duration::from_secs(20), || {
        let (_, w) = pod_requests(api);
        (w.len() > watches.len())
            .then(|| w.last().cloned().flatten())
            .ok_or(w)
    });
    assert_eq!(resumed, Some(mark.to_string()), "resumed from the bookmark");
    assert_eq!(pod_requests(api).0, 1, "resumed without a new list");

    // p2 deleted while the watch is down and its history compacted: the resume is
    // answered 410 Gone, the agent lists again, and p2's links go (its cgroup is
    // still there: only the new list can tell the agent).
    let id2 = cgroup_id(&cg2);
    api.delete_unseen(Kind::Pod, UID_2);
    wait_until(
        "p2's links pruned after the relist",
        Duration::from_secs(20),
        || {
            let pinned = lab.pinned_cgroups();
            (!pinned.contains(&id2)).then_some(()).ok_or(pinned)
        },
    );
    assert_eq!(pod_requests(api).0, 2, "listed again after 410");
    assert!(
        admin
            .metric("sockmesh_kube_watch_errors_total{resource=\"pods\"}")
            .is_some_and(|n| n >= 1.0)
    );
    assert!(enrollment(&admin)["enrolled"].get("shop/p2").is_none());
    assert!(
        sockmesh::dataplane::attached_programs(&cg2.0)
            .expect("query")
            .is_empty()
    );
    drop(cg2);

    // A restarted agent: p3 stays enrolled (its links adopted, this agent's
    // programs swapped in), p1 opted out meanwhile (pruned once the lists are
    // in), p4 new.
    let id1 = cgroup_id(&cg1);
    let id3 = cgroup_id(&cg3);
    let before = links_of(&lab, id3);
    assert_eq!(before.len(), sockmesh::dataplane::HOOKS.len());
    assert!(agent.terminate().success());
    put_pod(
        api,
        "shop",
        "p1",
        UID_1,
        &[("sockmesh.io/enrolled", "false")],
        &[],
    );
    put_pod(api, "shop", "p4", UID_4, &[], &[]);
    let cg4 = lab.pod_cgroup(UID_4);
    let (mut agent, admin) = lab.agent();
    wait_attached(&admin, "shop/p4");
    wait_skipped(&admin, "shop/p1", "opted_out");
    wait_until("p1's links pruned", Duration::from_secs(20), || {
        let pinned = lab.pinned_cgroups();
        (!pinned.contains(&id1)).then_some(()).ok_or(pinned)
    });
    assert_eq!(lab.pinned_cgroups(), {
        let mut ids = vec![id3, cgroup_id(&cg4)];
        ids.sort_unstable();
        ids
    });
    let after = links_of(&lab, id3);
    for ((prog, link, old_prog), (prog2, link2, new_prog)) in before.iter().zip(&after) {
        assert_eq!(
            (prog, link),
            (prog2, link2),
            "the link is adopted, not replaced"
        );
        assert_ne!(old_prog, new_prog, "{prog}: the new agent's program runs");
    }
    let attached: BTreeMap<_, _> = lab.attached(&[&cg1, &cg3, &cg4]).into_iter().collect();
    assert!(attached[&cg1.0].is_empty(), "{attached:?}");
    assert_eq!(
        attached[&cg3.0].len(),
        sockmesh::dataplane::HOOKS.len(),
        "{attached:?}"
    );

    lab.finish(&admin, 2);
    // Removed with sockmesh: uninstall --cgroup ROOT takes the pods' links too.
    assert!(agent.terminate().success());
    let mut cmd = std::process::Command::new(sockmesh_tests::sockmesh_bin());
    cmd.arg("uninstall")
        .arg("--bpffs")
        .arg(&lab.bpffs.0)
        .arg("--cgroup")
        .arg(&lab.pods_root.0);
    run(cmd);
    assert!(lab.pinned_cgroups().is_empty());
    let attached = lab.attached(&[&cg1, &cg3, &cg4]);
    assert!(attached.iter().all(|(_, p)| p.is_empty()), "{attached:?}");
    sockmesh_tests::audit::Audit::kernel(&lab.bpffs.0).assert_empty("uninstalled");
}

#[test]
fn an_agent_upgraded_from_serving_the_whole_pods_cgroup_hands_over_to_enrollment() {
    let lab = KubeLab::new(Driver::Systemd);
    let api = &lab.api;
    api.put(Kind::Namespace, namespace("shop", &[]));
    put_pod(api, "shop", "p1", UID_1, &[ENROLLED], &[]);
    put_pod(api, "shop", "p2", UID_2, &[], &[]);
    let cg1 = lab.pod_cgroup(UID_1);
    let cg2 = lab.pod_cgroup(UID_2);
    // The datapath as a release without enrollment left it: attached to the
    // pods cgroup itself, serving every pod.
    let table = lab.dir.0.join("table.json");
    std::fs::write(
        &table,
        r#"[{"vip":"10.96.0.10","port":80,"protocol":"tcp","backends":[{"address":"10.10.1.11","port":8080,"weight":1}]}]"#,
    )
    .expect("table");
    let mut cmd = std::process::Command::new(sockmesh_tests::sockmesh_bin());
    cmd.arg("apply").arg("--cgroup").arg(&lab.pods_root.0);
    cmd.arg("--bpffs")
        .arg(&lab.bpffs.0)
        .arg("--table")
        .arg(&table);
    run(cmd);
    let root_id = cgroup_id(&lab.pods_root);
    assert_eq!(lab.pinned_cgroups(), [root_id]);
    let (mut agent, admin) = lab.agent();
    wait_attached(&admin, "shop/p1");
    wait_until(
        "the pods cgroup's own links removed",
        Duration::from_secs(20),
        || {
            let pinned = lab.pinned_cgroups();
            (pinned == [cgroup_id(&cg1)]).then_some(()).ok_or(pinned)
        },
    );
    let attached: BTreeMap<_, _> = lab.attached(&[&cg1, &cg2]).into_iter().collect();
    assert!(attached[&lab.pods_root.0].is_empty(), "{attached:?}");
    assert!(attached[&cg2.0].is_empty(), "{attached:?}");
    assert_eq!(attached[&cg1.0].len(), sockmesh::dataplane::HOOKS.len());
    // The maps were adopted: the agent's table replaces the old one in them.
    sockmesh_tests::wait_for_backends(
        &lab.bpffs,
        "the agent's table",
        &["10.10.1.11", "10.10.1.12"],
    );
    lab.finish(&admin, 1);
    assert!(agent.terminate().success());
}
