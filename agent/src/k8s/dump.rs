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
