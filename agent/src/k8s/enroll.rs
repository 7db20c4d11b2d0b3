//! Which pods sockmesh serves, and where their cgroups are: pure functions over
//! plain facts taken from the pod and its namespace (converted from the API's
//! objects in [`super::watch`]).
//!
//! Left alone whatever their labels: host-network pods (their sockets are the
//! node's), pods with an Istio sidecar (the proxy must see the service address
//! to apply mTLS and L7 policy), Istio's waypoints (proxies), and ambient pods
//! (ztunnel must see it too). Enrolled: pods labelled [`ENROLL_LABEL`]`=true`, or
//! in a namespace so labelled; a pod's own label overrides its namespace's, so
//! `false` on a pod opts it out.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// The label that enrolls a namespace or a pod: `true` enrolls, `false` (on a
/// pod) opts out of its namespace's enrollment.
pub const ENROLL_LABEL: &str = "sockmesh.io/enrolled";
/// Set by Istio's sidecar injector on every pod it injected.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Istio's data-plane mode, on a namespace or a pod: `ambient` hands the pod's
/// traffic to ztunnel; `none` on a pod opts it out of its namespace's ambient mode.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Set on the waypoint proxies istiod deploys (Kmesh skips them too).
pub const WAYPOINT_LABEL: (&str, &str) = ("gateway.istio.io/managed", "istio.io-mesh-controller");

/// Why a pod is left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    HostNetwork,
    Sidecar,
    Ambient,
    Waypoint,
    /// Neither the pod nor its namespace carries the label.
    NotEnrolled,
    /// The pod's label is `false`.
    OptedOut,
    /// The label has a value other than `true` or `false`.
    InvalidLabel,
    /// The pod has finished (`Succeeded`, `Failed`): nothing of it runs.
    Finished,
}

impl SkipReason {
    /// Every reason, for metrics that list each one.
    pub const ALL: [SkipReason; 8] = [
        Self::HostNetwork,
        Self::Sidecar,
        Self::Ambient,
        Self::Waypoint,
        Self::NotEnrolled,
        Self::OptedOut,
        Self::InvalidLabel,
        Self::Finished,
    ];

    /// The name in `/metrics` and `/config_dump`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HostNetwork => "host_network",
            Self::Sidecar => "sidecar",
            Self::Ambient => "ambient",
            Self::Waypoint => "waypoint",
            Self::NotEnrolled => "not_enrolled",
            Self::OptedOut => "opted_out",
            Self::InvalidLabel => "invalid_label",
            Self::Finished => "finished",
        }
    }
}

/// A pod's Kubernetes QoS class (`status.qosClass`), which places its cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    #[default]
    BestEffort,
}

impl QosClass {
    /// From `status.qosClass`; `None` for an unknown or absent class.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Guaranteed" => Some(Self::Guaranteed),
            "Burstable" => Some(Self::Burstable),
            "BestEffort" => Some(Self::BestEffort),
            _ => None,
        }
    }
}

/// What the decision reads of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// The pod carries [`SIDECAR_STATUS_ANNOTATION`].
    pub sidecar: bool,
    pub host_network: bool,
    /// `None` until the API server has set `status.qosClass`.
    pub qos: Option<QosClass>,
    /// `status.phase` is `Succeeded` or `Failed`.
    pub finished: bool,
}

/// What the decision reads of a namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceFacts {
    pub labels: BTreeMap<String, String>,
}

/// Whether sockmesh serves a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Enrolled,
    Skipped(SkipReason),
}

/// Decides for `pod` in namespace `ns` (`None`: its namespace is not known yet,
/// read as unlabelled).
pub fn decide(pod: &PodFacts, ns: Option<&NamespaceFacts>) -> Decision {
    let ns_label = |key: &str| ns.and_then(|n| n.labels.get(key)).map(String::as_str);
    let pod_label = |key: &str| pod.labels.get(key).map(String::as_str);
    if pod.host_network {
        return Decision::Skipped(SkipReason::HostNetwork);
    }
    if pod.sidecar {
        return Decision::Skipped(SkipReason::Sidecar);
    }
    if pod_label(WAYPOINT_LABEL.0) == Some(WAYPOINT_LABEL.1) {
        return Decision::Skipped(SkipReason::Waypoint);
    }
    // Istio's rule: the pod's mode wins; `none` opts it out of its namespace's.
    let ambient = match pod_label(DATAPLANE_MODE_LABEL) {
        Some("ambient") => true,
        Some("none") => false,
        _ => ns_label(DATAPLANE_MODE_LABEL) == Some("ambient"),
    };
    if ambient {
        return Decision::Skipped(SkipReason::Ambient);
    }
    if pod.finished {
        return Decision::Skipped(SkipReason::Finished);
    }
    match pod_label(ENROLL_LABEL).or_else(|| ns_label(ENROLL_LABEL)) {
        Some("true") => Decision::Enrolled,
        Some("false") if pod_label(ENROLL_LABEL).is_some() => {
            Decision::Skipped(SkipReason::OptedOut)
        }
        Some("false") | None => Decision::Skipped(SkipReason::NotEnrolled),
        Some(_) => Decision::Skipped(SkipReason::InvalidLabel),
    }
}

/// The kubelet's cgroup driver, which names pod cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`,
    /// the uid's `-` written `_` (systemd's escaping).
    Systemd,
    /// `kubepods/burstable/pod<uid>`.
    Cgroupfs,
}

impl CgroupDriver {
    /// The driver whose layout `root` (the `--cgroup` directory, the kubelet's
    /// pods cgroup) has: a systemd slice's name ends in `.slice`.
    pub fn detect(root: &Path) -> Self {
        if root
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".slice"))
        {
            Self::Systemd
        } else {
            Self::Cgroupfs
        }
    }

    /// The directories below `root` that hold pod cgroups: `root` itself
    /// (Guaranteed pods) and one per other QoS class.
    pub fn qos_dirs(self, root: &Path) -> [PathBuf; 3] {
        [
            root.to_owned(),
            root.join(self.qos_dir(root, QosClass::Burstable)),
            root.join(self.qos_dir(root, QosClass::BestEffort)),
        ]
    }

    /// The QoS class's directory name below `root` (empty for Guaranteed).
    fn qos_dir(self, root: &Path, qos: QosClass) -> String {
        let class = match qos {
            QosClass::Guaranteed => return String::new(),
            QosClass::Burstable => "burstable",
            QosClass::BestEffort => "besteffort",
        };
        match self {
            Self::Systemd => format!("{}-{class}.slice", slice_prefix(root)),
            Self::Cgroupfs => class.to_owned(),
        }
    }

    /// The pod's cgroup: where the kubelet puts a pod of class `qos` with `uid`
    /// under `root`. `None` for a uid that is not a plain UUID (it becomes a
    /// path component: nothing else may pass).
    pub fn pod_cgroup(self, root: &Path, qos: QosClass, uid: &str) -> Option<PathBuf> {
        if uid.is_empty() || !uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return None;
        }
        let parent = root.join(self.qos_dir(root, qos));
        Some(match self {
            Self::Systemd => {
                let leaf = match qos {
                    QosClass::Guaranteed => slice_prefix(root).to_owned(),
                    // `kubepods-burstable.slice` → `kubepods-burstable`.
                    _ => self
                        .qos_dir(root, qos)
                        .trim_end_matches(".slice")
                        .to_owned(),
                };
                parent.join(format!("{leaf}-pod{}.slice", uid.replace('-', "_")))
            }
            Self::Cgroupfs => parent.join(format!("pod{uid}")),
        })
    }
}

/// A systemd slice's unit prefix: `kubepods` for `kubepods.slice`. Child slices
/// repeat their parents' names (`kubepods-burstable.slice`).
fn slice_prefix(root: &Path) -> &str {
    root.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".slice"))
        .unwrap_or("kubepods")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(labels: &[(&str, &str)]) -> PodFacts {
        PodFacts {
            namespace: "shop".into(),
            name: "web-1".into(),
            uid: "0d3b6a2e-1c2d-4e5f-8a9b-0123456789ab".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            qos: Some(QosClass::BestEffort),
            ..PodFacts::default()
        }
    }

    fn ns(labels: &[(&str, &str)]) -> NamespaceFacts {
        NamespaceFacts {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    use Decision::{Enrolled, Skipped};

    #[test]
    fn a_label_on_the_namespace_or_the_pod_enrolls_and_the_pods_wins() {
        let on = ns(&[(ENROLL_LABEL, "true")]);
        assert_eq!(decide(&pod(&[]), None), Skipped(SkipReason::NotEnrolled));
        assert_eq!(
            decide(&pod(&[]), Some(&ns(&[]))),
            Skipped(SkipReason::NotEnrolled)
        );
        assert_eq!(decide(&pod(&[]), Some(&on)), Enrolled);
        assert_eq!(decide(&pod(&[(ENROLL_LABEL, "true")]), None), Enrolled);
        assert_eq!(
            decide(&pod(&[(ENROLL_LABEL, "false")]), Some(&on)),
            Skipped(SkipReason::OptedOut)
        );
        assert_eq!(
            decide(
                &pod(&[(ENROLL_LABEL, "true")]),
                Some(&ns(&[(ENROLL_LABEL, "false")]))
            ),
            Enrolled
        );
        assert_eq!(
            decide(&pod(&[]), Some(&ns(&[(ENROLL_LABEL, "false")]))),
            Skipped(SkipReason::NotEnrolled)
        );
        assert_eq!(
            decide(&pod(&[(ENROLL_LABEL, "yes")]), Some(&on)),
            Skipped(SkipReason::InvalidLabel)
        );
    }

    #[test]
    fn sidecar_ambient_waypoint_and_host_network_pods_are_left_alone_even_when_labelled() {
        let on = ns(&[(ENROLL_LABEL, "true")]);
        let labelled = pod(&[(ENROLL_LABEL, "true")]);
        let sidecar = PodFacts {
            sidecar: true,
            ..labelled.clone()
        };
        assert_eq!(decide(&sidecar, Some(&on)), Skipped(SkipReason::Sidecar));
        let host = PodFacts {
            host_network: true,
            ..labelled.clone()
        };
        assert_eq!(decide(&host, Some(&on)), Skipped(SkipReason::HostNetwork));
        let waypoint = pod(&[(ENROLL_LABEL, "true"), WAYPOINT_LABEL]);
        assert_eq!(decide(&waypoint, Some(&on)), Skipped(SkipReason::Waypoint));
        // Ambient: the pod's own mode, else its namespace's; `none` opts out.
        let ambient_ns = ns(&[(ENROLL_LABEL, "true"), (DATAPLANE_MODE_LABEL, "ambient")]);
        assert_eq!(
            decide(&labelled, Some(&ambient_ns)),
            Skipped(SkipReason::Ambient)
        );
        let ambient_pod = pod(&[(ENROLL_LABEL, "true"), (DATAPLANE_MODE_LABEL, "ambient")]);
        assert_eq!(
            decide(&ambient_pod, Some(&on)),
            Skipped(SkipReason::Ambient)
        );
        let out_of_ambient = pod(&[(ENROLL_LABEL, "true"), (DATAPLANE_MODE_LABEL, "none")]);
        assert_eq!(decide(&out_of_ambient, Some(&ambient_ns)), Enrolled);
        let finished = PodFacts {
            finished: true,
            ..labelled
        };
        assert_eq!(decide(&finished, Some(&on)), Skipped(SkipReason::Finished));
    }

    /// The kubelet's own names, as `systemd-cgls` and `ls /sys/fs/cgroup` show
    /// them on nodes of each driver (kubelet's `pkg/kubelet/cm` naming: the
    /// `pod` prefix, systemd's `-` → `_` escaping of the uid, Guaranteed pods
    /// directly under the pods cgroup).
    #[test]
    fn pod_cgroups_are_where_the_kubelet_puts_them_for_both_drivers() {
        let uid = "0d3b6a2e-1c2d-4e5f-8a9b-0123456789ab";
        let escaped = "0d3b6a2e_1c2d_4e5f_8a9b_0123456789ab";
        let sd = Path::new("/sys/fs/cgroup/kubepods.slice");
        let path = |d: CgroupDriver, root: &Path, q| {
            d.pod_cgroup(root, q, uid)
                .expect("a uuid")
                .display()
                .to_string()
        };
        assert_eq!(CgroupDriver::detect(sd), CgroupDriver::Systemd);
        assert_eq!(
            path(CgroupDriver::Systemd, sd, QosClass::BestEffort),
            format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{escaped}.slice"
            )
        );
        assert_eq!(
            path(CgroupDriver::Systemd, sd, QosClass::Burstable),
            format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{escaped}.slice"
            )
        );
        assert_eq!(
            path(CgroupDriver::Systemd, sd, QosClass::Guaranteed),
            format!("/sys/fs/cgroup/kubepods.slice/kubepods-pod{escaped}.slice")
        );
        let fs = Path::new("/sys/fs/cgroup/kubepods");
        assert_eq!(CgroupDriver::detect(fs), CgroupDriver::Cgroupfs);
        assert_eq!(
            path(CgroupDriver::Cgroupfs, fs, QosClass::BestEffort),
            format!("/sys/fs/cgroup/kubepods/besteffort/pod{uid}")
        );
        assert_eq!(
            path(CgroupDriver::Cgroupfs, fs, QosClass::Burstable),
            format!("/sys/fs/cgroup/kubepods/burstable/pod{uid}")
        );
        assert_eq!(
            path(CgroupDriver::Cgroupfs, fs, QosClass::Guaranteed),
            format!("/sys/fs/cgroup/kubepods/pod{uid}")
        );
        assert_eq!(
            CgroupDriver::Systemd
                .qos_dirs(sd)
                .map(|p| p.display().to_string()),
            [
                "/sys/fs/cgroup/kubepods.slice",
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice",
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice",
            ]
        );
    }

    #[test]
    fn a_uid_that_is_not_a_uuid_never_becomes_a_path() {
        let root = Path::new("/sys/fs/cgroup/kubepods");
        for bad in ["", "../../x", "a/b", "abc def", "pod.slice"] {
            assert_eq!(
                CgroupDriver::Cgroupfs.pod_cgroup(root, QosClass::BestEffort, bad),
                None,
                "{bad:?}"
            );
        }
    }
}
