//! The API's objects, converted to the facts the decision reads, as a stream of
//! changes: kube-runtime's watcher lists, watches from the list's
//! resourceVersion, resumes a watch that ended from the last resourceVersion it
//! saw (bookmarks keep it recent when no event concerns this node), and lists
//! again when the API server answers 410 Gone.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio_stream::{Stream, StreamExt as _};

use super::enroll::{NamespaceFacts, PodFacts, QosClass, SIDECAR_STATUS_ANNOTATION};

/// One step of a watched collection, keyed (pods by uid, namespaces by name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<T> {
    /// A (re)list begins: the objects until [`Change::Listed`] replace the
    /// collection.
    Listing,
    Listed(String, T),
    /// The list is complete.
    ListDone,
    Applied(String, T),
    Deleted(String),
}

/// A failure of the watch (logged and counted; the watcher retries with backoff).
pub type WatchError = watcher::Error;

/// This node's pods, as changes.
pub fn pods(
    client: Client,
    node: &str,
) -> impl Stream<Item = Result<Change<PodFacts>, WatchError>> + Send + use<> {
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    watcher(Api::<Pod>::all(client), config)
        .default_backoff()
        .filter_map(|e| convert(e, pod_facts))
}

/// Every namespace, as changes.
pub fn namespaces(
    client: Client,
) -> impl Stream<Item = Result<Change<NamespaceFacts>, WatchError>> + Send + use<> {
    watcher(Api::<Namespace>::all(client), watcher::Config::default())
        .default_backoff()
        .filter_map(|e| convert(e, namespace_facts))
}

/// A watcher event as a change; `None` for an object without a key.
fn convert<K, T>(
    event: Result<watcher::Event<K>, WatchError>,
    facts: fn(&K) -> Option<(String, T)>,
) -> Option<Result<Change<T>, WatchError>> {
    let change = match event {
        Err(e) => return Some(Err(e)),
        Ok(watcher::Event::Init) => Change::Listing,
        Ok(watcher::Event::InitDone) => Change::ListDone,
        Ok(watcher::Event::InitApply(o)) => {
            let (k, f) = facts(&o)?;
            Change::Listed(k, f)
        }
        Ok(watcher::Event::Apply(o)) => {
            let (k, f) = facts(&o)?;
            Change::Applied(k, f)
        }
        Ok(watcher::Event::Delete(o)) => Change::Deleted(facts(&o)?.0),
    };
    Some(Ok(change))
}

fn labels(l: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
    l.cloned().unwrap_or_default()
}

/// The facts of a pod, by uid.
pub fn pod_facts(pod: &Pod) -> Option<(String, PodFacts)> {
    let meta = &pod.metadata;
    let uid = meta.uid.clone()?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let facts = PodFacts {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid: uid.clone(),
        labels: labels(meta.labels.as_ref()),
        sidecar: meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION)),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        qos: status
            .and_then(|s| s.qos_class.as_deref())
            .and_then(QosClass::parse),
        finished: status
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed"),
    };
    Some((uid, facts))
}

/// The facts of a namespace, by name.
pub fn namespace_facts(ns: &Namespace) -> Option<(String, NamespaceFacts)> {
    let name = ns.metadata.name.clone()?;
    Some((
        name,
        NamespaceFacts {
            labels: labels(ns.metadata.labels.as_ref()),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod as the API server serves it (`kubectl get pod -o json`, trimmed).
    const POD: &str = r#"{
      "apiVersion": "v1", "kind": "Pod",
      "metadata": {"name": "web-1", "namespace": "shop", "uid": "0d3b6a2e-1c2d-4e5f-8a9b-0123456789ab",
        "resourceVersion": "812", "labels": {"app": "web", "sockmesh.io/enrolled": "true"},
        "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"}},
      "spec": {"nodeName": "node-a", "hostNetwork": true,
        "containers": [{"name": "web", "image": "nginx"}]},
      "status": {"phase": "Running", "qosClass": "Burstable", "podIP": "10.244.1.7"}
    }"#;

    #[test]
    fn a_pods_facts_come_from_its_real_schema() {
        let pod: Pod = serde_json::from_str(POD).expect("a Pod");
        let (uid, f) = pod_facts(&pod).expect("has a uid");
        assert_eq!(uid, "0d3b6a2e-1c2d-4e5f-8a9b-0123456789ab");
        assert_eq!((f.namespace.as_str(), f.name.as_str()), ("shop", "web-1"));
        assert!(f.sidecar && f.host_network && !f.finished);
        assert_eq!(f.qos, Some(QosClass::Burstable));
        assert_eq!(f.labels.get("app").map(String::as_str), Some("web"));
        let bare: Pod = serde_json::from_str(
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x","uid":"u1"}}"#,
        )
        .expect("a Pod");
        let (_, f) = pod_facts(&bare).expect("has a uid");
        assert!(!f.sidecar && !f.host_network && f.qos.is_none());
        let done: Pod = serde_json::from_str(
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x","uid":"u1"},"status":{"phase":"Succeeded"}}"#,
        )
        .expect("a Pod");
        assert!(pod_facts(&done).expect("uid").1.finished);
    }

    #[test]
    fn a_namespaces_labels_are_its_facts() {
        let ns: Namespace = serde_json::from_str(
            r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"shop","labels":{"sockmesh.io/enrolled":"true"}},"status":{"phase":"Active"}}"#,
        )
        .expect("a Namespace");
        let (name, f) = namespace_facts(&ns).expect("named");
        assert_eq!(name, "shop");
        assert_eq!(
            f.labels.get("sockmesh.io/enrolled").map(String::as_str),
            Some("true")
        );
    }
}
