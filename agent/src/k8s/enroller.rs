//! The enroller: the one owner of the enrollment state. It follows the node's
//! pods and the namespaces ([`super::watch`]), decides per pod
//! ([`super::enroll::decide`]), and hands the datapath task the set of enrolled
//! pods' cgroups after every change, which attaches the new ones and (once the
//! first lists are complete) detaches the rest. A pod whose cgroup does not
//! exist yet (the kubelet creates it after the pod is bound) is tried again when
//! a cgroup appears under the QoS directories (inotify) and every second.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    pin::pin,
    time::{Duration, Instant},
};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tracing::{info, warn};

use super::{
    KubeConfig,
    dump::{EnrolledPodDump, EnrollmentDump, SidecarScopeDump},
    enroll::{CgroupDriver, Decision, ENROLL_LABEL, NamespaceFacts, PodFacts, QosClass, decide},
    watch::{Change, WatchError},
};
use crate::dataplane::{EnrollReport, task::EnrollHandle};

/// Buckets of the watch event → programs attached histogram (seconds).
pub const LATENCY_BUCKETS: [f64; 10] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.1, 1.0, 10.0,
];

/// A watched collection: the objects, and the ones of a list in progress (which
/// replace them when it completes: a relist after 410 Gone drops what went
/// unseen).
#[derive(Debug)]
struct Collection<T> {
    items: BTreeMap<String, T>,
    listing: Option<BTreeMap<String, T>>,
    /// A first list has completed.
    synced: bool,
}

impl<T> Default for Collection<T> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            listing: None,
            synced: false,
        }
    }
}

impl<T: PartialEq> Collection<T> {
    /// Applies a change; true if the objects changed (or a list completed).
    fn apply(&mut self, change: Change<T>) -> bool {
        match change {
            Change::Listing => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Change::Listed(k, v) => {
                self.listing.get_or_insert_default().insert(k, v);
                false
            }
            Change::ListDone => {
                self.items = self.listing.take().unwrap_or_default();
                self.synced = true;
                true
            }
            Change::Applied(k, v) => {
                let changed = self.items.get(&k) != Some(&v);
                self.items.insert(k, v);
                changed
            }
            Change::Deleted(k) => self.items.remove(&k).is_some(),
        }
    }
}

/// What happened to an enrolled pod's cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Attached(u64),
    Waiting,
    Pending,
    Failed(String),
}

/// The enrollment state (pure: no I/O; the run loop feeds it).
pub struct Enrollment {
    node: String,
    root: PathBuf,
    driver: CgroupDriver,
    pods: Collection<PodFacts>,
    namespaces: Collection<NamespaceFacts>,
    /// Enrolled pods, by uid: when the event that enrolled them arrived.
    since: BTreeMap<String, Instant>,
    /// Enrolled pods, by uid: what the datapath did, and the event → attached time.
    outcome: BTreeMap<String, (Outcome, Option<Duration>)>,
    watch_errors: BTreeMap<String, u64>,
    last_watch_error: Option<String>,
    istio: SidecarScopeDump,
    latency: Histogram,
    /// Pods no longer enrolled still hold processes (their release programs
    /// stay): the datapath is asked again every second until they are gone.
    draining: bool,
}

impl Enrollment {
    pub fn new(node: &str, root: &Path, driver: CgroupDriver, latency: Histogram) -> Self {
        Self {
            node: node.to_owned(),
            root: root.to_owned(),
            driver,
            pods: Collection::default(),
            namespaces: Collection::default(),
            since: BTreeMap::new(),
            outcome: BTreeMap::new(),
            watch_errors: BTreeMap::new(),
            last_watch_error: None,
            istio: SidecarScopeDump::default(),
            latency,
            draining: false,
        }
    }

    /// A change of the node's pods, received at `at`; true if the enrolled set
    /// may have changed.
    pub fn pods_change(&mut self, change: Change<PodFacts>, at: Instant) -> bool {
        let changed = self.pods.apply(change);
        if changed {
            self.refresh(at);
        }
        changed
    }

    /// A change of the namespaces, received at `at`.
    pub fn namespaces_change(&mut self, change: Change<NamespaceFacts>, at: Instant) -> bool {
        let changed = self.namespaces.apply(change);
        if changed {
            self.refresh(at);
        }
        changed
    }

    /// A failure of a watch (the watcher retries it).
    pub fn watch_error(&mut self, resource: &str, error: &WatchError) {
        let text = crate::dataplane::task::chain(error);
        warn!(resource, error = %text, "watching the Kubernetes API failed; retrying");
        *self.watch_errors.entry(resource.to_owned()).or_default() += 1;
        self.last_watch_error = Some(format!("{resource}: {text}"));
    }

    pub fn set_istio(&mut self, scope: SidecarScopeDump) {
        self.istio = scope;
    }

    /// Both first lists are in: what is not enrolled now may be detached.
    pub fn synced(&self) -> bool {
        self.pods.synced && self.namespaces.synced
    }

    /// Some enrolled pod is not attached (its cgroup missing, or an attach failed).
    pub fn incomplete(&self) -> bool {
        self.draining
            || self
                .outcome
                .values()
                .any(|(o, _)| matches!(o, Outcome::Waiting | Outcome::Failed(_) | Outcome::Pending))
    }

    fn decision(&self, pod: &PodFacts) -> Decision {
        decide(pod, self.namespaces.items.get(&pod.namespace))
    }

    /// Notes when pods became enrolled (for the latency), and forgets the others.
    fn refresh(&mut self, at: Instant) {
        let enrolled: BTreeSet<String> = self
            .pods
            .items
            .iter()
            .filter(|(_, p)| self.decision(p) == Decision::Enrolled)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in &enrolled {
            self.since.entry(uid.clone()).or_insert(at);
        }
        self.since.retain(|uid, _| enrolled.contains(uid));
        for uid in self.outcome.keys().filter(|u| !enrolled.contains(*u)) {
            let why = self
                .pods
                .items
                .get(uid)
                .map_or("deleted", |p| match self.decision(p) {
                    Decision::Skipped(r) => r.as_str(),
                    Decision::Enrolled => "enrolled",
                });
            info!(uid = %uid, reason = why, "pod no longer enrolled: its programs are detached");
        }
        self.outcome.retain(|uid, _| enrolled.contains(uid));
    }

    /// Where an enrolled pod's cgroup is. Without a QoS class yet, the one of the
    /// three places that exists (BestEffort's if none does).
    fn cgroup(&self, pod: &PodFacts) -> Option<PathBuf> {
        let at = |q| self.driver.pod_cgroup(&self.root, q, &pod.uid);
        match pod.qos {
            Some(q) => at(q),
            None => [
                QosClass::Guaranteed,
                QosClass::Burstable,
                QosClass::BestEffort,
            ]
            .into_iter()
            .filter_map(at)
            .find(|p| p.exists())
            .or_else(|| at(QosClass::BestEffort)),
        }
    }

    /// The enrolled pods' cgroups, and whether the rest may be detached.
    pub fn desired(&self) -> (BTreeSet<PathBuf>, bool) {
        let paths = self
            .pods
            .items
            .values()
            .filter(|p| self.decision(p) == Decision::Enrolled)
            .filter_map(|p| self.cgroup(p))
            .collect();
        (paths, self.synced())
    }

    /// Takes in what the datapath did, at `now`.
    pub fn apply_report(&mut self, report: &EnrollReport, now: Instant) {
        let enrolled: Vec<(String, PodFacts)> = self
            .pods
            .items
            .iter()
            .filter(|(_, p)| self.decision(p) == Decision::Enrolled)
            .map(|(u, p)| (u.clone(), p.clone()))
            .collect();
        for (uid, pod) in enrolled {
            let Some(path) = self.cgroup(&pod) else {
                self.outcome.insert(
                    uid,
                    (
                        Outcome::Failed(format!("uid {:?} is not a UUID", pod.uid)),
                        None,
                    ),
                );
                continue;
            };
            let previous = self.outcome.get(&uid).cloned();
            let outcome = if let Some(id) = report.attached.get(&path) {
                Outcome::Attached(*id)
            } else if let Some((_, why)) = report.failed.iter().find(|(p, _)| *p == path) {
                Outcome::Failed(why.clone())
            } else if report.pending {
                Outcome::Pending
            } else {
                Outcome::Waiting
            };
            let mut after = previous.as_ref().and_then(|(_, d)| *d);
            if matches!(outcome, Outcome::Attached(_))
                && !matches!(previous, Some((Outcome::Attached(_), _)))
            {
                let took = self
                    .since
                    .get(&uid)
                    .map(|t| now.saturating_duration_since(*t));
                if let Some(d) = took {
                    self.latency.observe(d.as_secs_f64());
                }
                after = took;
                info!(
                    namespace = %pod.namespace,
                    pod = %pod.name,
                    cgroup = %path.display(),
                    latency_us = took.map(|d| d.as_micros()),
                    "pod enrolled: its connections are load balanced by sockmesh"
                );
            }
            if let Outcome::Failed(why) = &outcome
                && !matches!(&previous, Some((Outcome::Failed(w), _)) if w == why)
            {
                warn!(namespace = %pod.namespace, pod = %pod.name, error = %why, "enrolling the pod failed; retrying");
            }
            self.outcome.insert(uid, (outcome, after));
        }
        self.draining = !report.draining.is_empty();
        for id in &report.detached {
            info!(
                cgroup_id = id,
                "detached and unpinned the links of a cgroup no longer enrolled"
            );
        }
    }

    /// The enrollment as `/config_dump` shows it.
    pub fn dump(&self) -> EnrollmentDump {
        let mut dump = EnrollmentDump {
            node: self.node.clone(),
            cgroup_root: self.root.display().to_string(),
            cgroup_driver: format!("{:?}", self.driver).to_lowercase(),
            label: ENROLL_LABEL.to_owned(),
            synced: self.synced(),
            watch_errors: self.watch_errors.clone(),
            last_watch_error: self.last_watch_error.clone(),
            istio_sidecar: self.istio.clone(),
            ..EnrollmentDump::default()
        };
        for (uid, pod) in &self.pods.items {
            let key = format!("{}/{}", pod.namespace, pod.name);
            match self.decision(pod) {
                Decision::Skipped(reason) => {
                    dump.skipped.insert(key, reason.as_str().to_owned());
                }
                Decision::Enrolled => {
                    let (outcome, after) = self
                        .outcome
                        .get(uid)
                        .cloned()
                        .unwrap_or((Outcome::Waiting, None));
                    let (state, cgroup_id, error) = match outcome {
                        Outcome::Attached(id) => ("attached", Some(id), None),
                        Outcome::Waiting => ("waiting", None, None),
                        Outcome::Pending => ("pending", None, None),
                        Outcome::Failed(why) => ("failed", None, Some(why)),
                    };
                    dump.enrolled.insert(
                        key,
                        EnrolledPodDump {
                            uid: uid.clone(),
                            cgroup: self
                                .cgroup(pod)
                                .map(|p| p.display().to_string())
                                .unwrap_or_default(),
                            state: state.to_owned(),
                            cgroup_id,
                            enrolled_after_us: after.map(crate::admin_types::micros),
                            error,
                        },
                    );
                }
            }
        }
        dump
    }
}

/// Follows the API server and keeps the datapath's enrolled cgroups in step, until
/// `stop`. `view` gets the enrollment after every change.
pub async fn run(
    cfg: KubeConfig,
    client: kube::Client,
    datapath: EnrollHandle,
    view: watch::Sender<EnrollmentDump>,
    latency: Histogram,
    mut stop: watch::Receiver<bool>,
) {
    let mut pods = pin!(super::watch::pods(client.clone(), &cfg.node_name));
    let mut namespaces = pin!(super::watch::namespaces(client.clone()));
    let (istio_tx, mut istio_rx) = mpsc::channel(1);
    tokio::spawn(super::istio::run(
        client,
        cfg.namespace.clone(),
        cfg.istio_root_namespace.clone(),
        istio_tx,
        stop.clone(),
    ));
    let mut cgroups = super::cgwatch::CgroupWatch::new(&cfg.driver.qos_dirs(&cfg.cgroup_root));
    let mut state = Enrollment::new(&cfg.node_name, &cfg.cgroup_root, cfg.driver, latency);
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    info!(
        node = %cfg.node_name,
        cgroup_root = %cfg.cgroup_root.display(),
        driver = ?cfg.driver,
        label = ENROLL_LABEL,
        "enrollment: watching this node's pods and the namespaces"
    );
    loop {
        let reconcile = tokio::select! {
            Some(c) = pods.next() => match c {
                Ok(c) => state.pods_change(c, Instant::now()),
                Err(e) => { state.watch_error("pods", &e); false }
            },
            Some(c) = namespaces.next() => match c {
                Ok(c) => state.namespaces_change(c, Instant::now()),
                Err(e) => { state.watch_error("namespaces", &e); false }
            },
            () = cgroups.created() => state.incomplete(),
            _ = retry.tick() => {
                cgroups.watch_missing();
                state.incomplete()
            }
            Some(scope) = istio_rx.recv() => {
                state.set_istio(scope);
                false
            }
            _ = stop.changed() => return,
        };
        if reconcile {
            let (paths, prune) = state.desired();
            match datapath.enroll(paths, prune).await {
                Ok(report) => state.apply_report(&report, Instant::now()),
                Err(e) => {
                    warn!(error = %crate::dataplane::task::chain(&e), "enrollment: the datapath could not attach")
                }
            }
        }
        view.send_replace(state.dump());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID_A: &str = "0d3b6a2e-1c2d-4e5f-8a9b-00000000000a";
    const UID_B: &str = "0d3b6a2e-1c2d-4e5f-8a9b-00000000000b";

    fn pod(uid: &str, ns: &str, labels: &[(&str, &str)]) -> PodFacts {
        PodFacts {
            namespace: ns.into(),
            name: format!("p-{}", &uid[uid.len() - 1..]),
            uid: uid.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            qos: Some(QosClass::Burstable),
            ..PodFacts::default()
        }
    }

    fn labelled_ns() -> NamespaceFacts {
        NamespaceFacts {
            labels: [(ENROLL_LABEL.to_owned(), "true".to_owned())].into(),
        }
    }

    fn state() -> Enrollment {
        Enrollment::new(
            "node-a",
            Path::new("/cg/kubepods"),
            CgroupDriver::Cgroupfs,
            Histogram::new(LATENCY_BUCKETS),
        )
    }

    fn cgroup(uid: &str) -> PathBuf {
        PathBuf::from(format!("/cg/kubepods/burstable/pod{uid}"))
    }

    #[test]
    fn nothing_is_pruned_until_both_first_lists_are_in() {
        let mut s = state();
        let t = Instant::now();
        s.pods_change(Change::Listing, t);
        s.pods_change(
            Change::Listed(UID_A.into(), pod(UID_A, "shop", &[(ENROLL_LABEL, "true")])),
            t,
        );
        assert_eq!(
            s.desired(),
            (BTreeSet::new(), false),
            "a list in progress is not applied"
        );
        assert!(s.pods_change(Change::ListDone, t));
        assert_eq!(
            s.desired(),
            ([cgroup(UID_A)].into(), false),
            "namespaces not listed yet"
        );
        s.namespaces_change(Change::Listing, t);
        assert!(s.namespaces_change(Change::ListDone, t));
        assert_eq!(s.desired(), ([cgroup(UID_A)].into(), true));
    }

    #[test]
    fn a_relist_drops_what_went_unseen_and_a_namespace_label_enrolls_its_pods() {
        let mut s = state();
        let t = Instant::now();
        for c in [
            Change::Listing,
            Change::Listed(UID_A.into(), pod(UID_A, "shop", &[])),
            Change::Listed(UID_B.into(), pod(UID_B, "shop", &[])),
            Change::ListDone,
        ] {
            s.pods_change(c, t);
        }
        s.namespaces_change(Change::ListDone, t);
        assert_eq!(s.desired().0, BTreeSet::new());
        assert!(s.namespaces_change(Change::Applied("shop".into(), labelled_ns()), t));
        assert_eq!(s.desired().0, [cgroup(UID_A), cgroup(UID_B)].into());
        // 410 Gone: the relist has only A; B was deleted while the watch was down.
        s.pods_change(Change::Listing, t);
        s.pods_change(Change::Listed(UID_A.into(), pod(UID_A, "shop", &[])), t);
        assert_eq!(
            s.desired().0.len(),
            2,
            "the old view holds until the list completes"
        );
        s.pods_change(Change::ListDone, t);
        assert_eq!(s.desired().0, [cgroup(UID_A)].into());
        // The same object again changes nothing.
        assert!(!s.pods_change(Change::Applied(UID_A.into(), pod(UID_A, "shop", &[])), t));
        assert!(s.pods_change(Change::Deleted(UID_A.into()), t));
        assert!(s.desired().0.is_empty());
    }

    #[test]
    fn the_report_gives_each_enrolled_pod_its_state_and_latency() {
        let mut s = state();
        let t0 = Instant::now();
        s.namespaces_change(Change::ListDone, t0);
        s.pods_change(Change::ListDone, t0);
        s.pods_change(
            Change::Applied(UID_A.into(), pod(UID_A, "shop", &[(ENROLL_LABEL, "true")])),
            t0,
        );
        s.pods_change(
            Change::Applied(UID_B.into(), pod(UID_B, "shop", &[(ENROLL_LABEL, "true")])),
            t0,
        );
        let report = EnrollReport {
            attached: [(cgroup(UID_A), 42)].into(),
            newly_attached: vec![cgroup(UID_A)],
            missing: vec![cgroup(UID_B)],
            ..EnrollReport::default()
        };
        s.apply_report(&report, t0 + Duration::from_micros(700));
        let dump = s.dump();
        let a = &dump.enrolled["shop/p-a"];
        assert_eq!(
            (a.state.as_str(), a.cgroup_id, a.enrolled_after_us),
            ("attached", Some(42), Some(700))
        );
        assert_eq!(dump.enrolled["shop/p-b"].state, "waiting");
        assert!(s.incomplete());
        // Unenrolled by its label: it leaves the enrolled list for the skipped one.
        s.pods_change(
            Change::Applied(UID_A.into(), pod(UID_A, "shop", &[(ENROLL_LABEL, "false")])),
            t0,
        );
        let dump = s.dump();
        assert_eq!(dump.skipped["shop/p-a"], "opted_out");
        assert!(!dump.enrolled.contains_key("shop/p-a"));
    }
}
