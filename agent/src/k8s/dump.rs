//! The enrollment as `/config_dump` shows it and `sockmesh status` reads it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which pods of the node sockmesh serves, and why the others are left alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentDump {
    /// The node whose pods are watched.
    pub node: String,
    /// The pods' cgroup root (`--cgroup`) and the kubelet's cgroup driver.
    pub cgroup_root: String,
    pub cgroup_driver: String,
    /// The label that enrolls a namespace or a pod.
    pub label: String,
    /// The first complete list of the node's pods and of the namespaces is in:
    /// until then nothing is detached.
    pub synced: bool,
    /// The enrolled pods, by `namespace/name`.
    pub enrolled: BTreeMap<String, EnrolledPodDump>,
    /// The pods left alone, by `namespace/name`: why (`sidecar`, `ambient`,
    /// `host_network`, `not_enrolled`, …).
    pub skipped: BTreeMap<String, String>,
    /// Failures of the watches, by resource (`pods`, `namespaces`): the watcher
    /// retries with backoff, and lists again after 410 Gone.
    pub watch_errors: BTreeMap<String, u64>,
    pub last_watch_error: Option<String>,
    /// The Sidecar scope istiod gives the node (see `docs/istio.md`).
    pub istio_sidecar: SidecarScopeDump,
}

/// One enrolled pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledPodDump {
    pub uid: String,
    /// Its cgroup, where the kubelet puts it.
    pub cgroup: String,
    /// `attached` (the programs run for it), `waiting` (its cgroup does not exist
    /// yet), `pending` (a layout migration: attached once the table is filled)
    /// or `failed`.
    pub state: String,
    pub cgroup_id: Option<u64>,
    /// From the watch event that enrolled it to its programs attached, µs.
    pub enrolled_after_us: Option<u64>,
    pub error: Option<String>,
}

/// What the check of Istio's `Sidecar` resources found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarScopeDump {
    /// `checked`, `no_istio` (the Sidecar CRD is not served: nothing to check),
    /// `error`, or empty before the first check.
    pub state: String,
    /// The Sidecar without a workloadSelector that applies to the agent's
    /// namespace (its own, else the root namespace's), `namespace/name`.
    pub effective: Option<String>,
    /// Its egress hosts, when they narrow the node's view (not `*/*`): the node
    /// sees only these services, so pods are load balanced only to them.
    pub narrowing_hosts: Vec<String>,
    pub error: Option<String>,
}

/// The enrollment's series in `/metrics`.
pub fn register_metrics(
    r: &mut prometheus_client::registry::Registry,
    dump: &EnrollmentDump,
    latency: prometheus_client::metrics::histogram::Histogram,
) {
    use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
    type Labels = Vec<(String, String)>;
    let gauge = |n: usize| {
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(n).unwrap_or(i64::MAX));
        g
    };
    let attached = dump
        .enrolled
        .values()
        .filter(|p| p.state == "attached")
        .count();
    r.register(
        "sockmesh_enrolled_pods",
        "Pods of this node served by sockmesh: enrolled, with the programs attached to their cgroup",
        gauge(attached),
    );
    r.register(
        "sockmesh_enrollment_waiting_pods",
        "Enrolled pods not served yet: their cgroup does not exist yet, a layout migration is pending, or attaching failed (retried)",
        gauge(dump.enrolled.len() - attached),
    );
    let skipped: Family<Labels, Gauge> = Family::default();
    for reason in super::enroll::SkipReason::ALL {
        let n = dump
            .skipped
            .values()
            .filter(|r| r.as_str() == reason.as_str())
            .count();
        skipped
            .get_or_create(&vec![("reason".to_owned(), reason.as_str().to_owned())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    r.register(
        "sockmesh_skipped_pods",
        "Pods of this node left alone, by reason (sidecar, ambient, waypoint, host_network, not_enrolled, opted_out, invalid_label, finished)",
        skipped,
    );
    r.register(
        "sockmesh_enrollment_seconds",
        "From the watch event that enrolled a pod to its programs attached",
        latency,
    );
    let errors: Family<Labels, Counter> = Family::default();
    for (resource, n) in &dump.watch_errors {
        errors
            .get_or_create(&vec![("resource".to_owned(), resource.clone())])
            .inc_by(*n);
    }
    r.register(
        "sockmesh_kube_watch_errors",
        "Failures watching the Kubernetes API, by resource (pods, namespaces); the watcher retries with backoff",
        errors,
    );
    r.register(
        "sockmesh_istio_sidecar_narrowing",
        "1 while an Istio Sidecar without workloadSelector narrows the egress hosts istiod sends the node",
        gauge(usize::from(!dump.istio_sidecar.narrowing_hosts.is_empty())),
    );
}
