//! The Sidecar scope istiod gives the node. istiod builds the node's
//! configuration from the `Sidecar` without a workloadSelector in the agent's
//! namespace, else the one in the root namespace (`docs/istio.md`): egress hosts
//! narrower than `*/*` there narrow which services every enrolled pod is load
//! balanced to. Listed at start and every ten minutes; a narrowing scope is
//! logged once (each time it changes) and shown in `/config_dump`. Without
//! Istio (the Sidecar resource is not served) there is nothing to check.

use std::time::Duration;

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams},
};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::dump::SidecarScopeDump;

/// How often the Sidecar resources are listed again.
const RECHECK: Duration = Duration::from_secs(600);
/// The versions of `networking.istio.io` to ask, newest first (v1 since Istio
/// 1.22; v1beta1 is served by every release since 1.5).
const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// Checks now and every [`RECHECK`], sending each result to the enroller.
pub async fn run(
    client: Client,
    namespace: String,
    root_namespace: String,
    results: mpsc::Sender<SidecarScopeDump>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = SidecarScopeDump::default();
    loop {
        let dump = check(&client, &namespace, &root_namespace).await;
        if dump != last {
            if !dump.narrowing_hosts.is_empty() {
                warn!(
                    sidecar = dump.effective.as_deref().unwrap_or_default(),
                    hosts = ?dump.narrowing_hosts,
                    namespace = %namespace,
                    "an Istio Sidecar without workloadSelector narrows the node's view: istiod sends the node only these egress hosts, so enrolled pods are load balanced only to them (deploy/kubernetes/istio/sidecar.yaml gives the agent's namespace */*)"
                );
            }
            if let Some(e) = &dump.error {
                warn!(error = %e, "listing Istio Sidecar resources failed; retrying later");
            }
            debug!(?dump, "Sidecar scope checked");
            last = dump.clone();
            if results.send(dump).await.is_err() {
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RECHECK) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Lists the Sidecars of the agent's and the root namespace and finds the scope.
async fn check(client: &Client, namespace: &str, root: &str) -> SidecarScopeDump {
    let mut lists = Vec::new();
    for ns in [namespace, root] {
        match list(client, ns).await {
            Ok(Some(items)) => lists.push(items),
            Ok(None) => {
                return SidecarScopeDump {
                    state: "no_istio".into(),
                    ..SidecarScopeDump::default()
                };
            }
            Err(e) => {
                return SidecarScopeDump {
                    state: "error".into(),
                    error: Some(crate::dataplane::task::chain(&e)),
                    ..SidecarScopeDump::default()
                };
            }
        }
    }
    let own = lists.first().map(Vec::as_slice).unwrap_or_default();
    let root_items = lists.get(1).map(Vec::as_slice).unwrap_or_default();
    let (effective, narrowing_hosts) = effective_scope(own, root_items);
    SidecarScopeDump {
        state: "checked".into(),
        effective,
        narrowing_hosts,
        error: None,
    }
}

/// The Sidecars in `namespace` as JSON; `None` if no version of the resource is
/// served (no Istio).
async fn list(client: &Client, namespace: &str) -> Result<Option<Vec<Value>>, kube::Error> {
    for version in VERSIONS {
        let resource = ApiResource {
            group: "networking.istio.io".into(),
            version: version.into(),
            api_version: format!("networking.istio.io/{version}"),
            kind: "Sidecar".into(),
            plural: "sidecars".into(),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
        match api.list(&ListParams::default()).await {
            Ok(list) => {
                return Ok(Some(
                    list.items
                        .into_iter()
                        .map(|o| serde_json::to_value(o).unwrap_or_default())
                        .collect(),
                ));
            }
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// The Sidecar that applies to the agent's namespace (`own`'s first without a
/// workloadSelector, else `root`'s, oldest first as istiod picks), by
/// `namespace/name`, and its egress hosts if they narrow the view (empty: every
/// egress listener has `*/*`, or it has no egress and inherits the whole mesh).
pub fn effective_scope(own: &[Value], root: &[Value]) -> (Option<String>, Vec<String>) {
    fn applies(items: &[Value]) -> Option<&Value> {
        let mut global: Vec<&Value> = items
            .iter()
            .filter(|s| s["spec"].get("workloadSelector").is_none_or(Value::is_null))
            .collect();
        global.sort_by_key(|s| {
            (
                s["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                s["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        });
        global.first().copied()
    }
    let Some(sidecar) = applies(own).or_else(|| applies(root)) else {
        return (None, Vec::new());
    };
    let name = format!(
        "{}/{}",
        sidecar["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default(),
        sidecar["metadata"]["name"].as_str().unwrap_or_default()
    );
    let egress = sidecar["spec"]["egress"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let narrowing = egress.iter().any(|listener| {
        !listener["hosts"]
            .as_array()
            .is_some_and(|h| h.iter().any(|h| h.as_str() == Some("*/*")))
    });
    let hosts = if narrowing {
        let mut hosts: Vec<String> = egress
            .iter()
            .filter_map(|l| l["hosts"].as_array())
            .flatten()
            .filter_map(|h| h.as_str().map(str::to_owned))
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    } else {
        Vec::new()
    };
    (Some(name), hosts)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sidecar(ns: &str, name: &str, created: &str, spec: &Value) -> Value {
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "Sidecar",
            "metadata": {"namespace": ns, "name": name, "creationTimestamp": created},
            "spec": spec,
        })
    }

    /// Istio's documented example of a mesh-wide default in the root namespace:
    /// egress only to the own namespace and istio-system.
    fn narrow_default() -> Value {
        sidecar(
            "istio-system",
            "default",
            "2026-01-01T00:00:00Z",
            &json!({"egress": [{"hosts": ["./*", "istio-system/*"]}]}),
        )
    }

    #[test]
    fn the_root_default_applies_unless_the_agents_namespace_has_its_own() {
        let (eff, hosts) = effective_scope(&[], &[narrow_default()]);
        assert_eq!(eff.as_deref(), Some("istio-system/default"));
        assert_eq!(hosts, ["./*", "istio-system/*"]);
        let whole = sidecar(
            "sockmesh-system",
            "sockmesh",
            "2026-02-01T00:00:00Z",
            &json!({"egress": [{"hosts": ["*/*"]}]}),
        );
        let (eff, hosts) = effective_scope(&[whole], &[narrow_default()]);
        assert_eq!(eff.as_deref(), Some("sockmesh-system/sockmesh"));
        assert!(hosts.is_empty());
    }

    #[test]
    fn sidecars_with_a_workload_selector_do_not_apply_to_the_node() {
        let selected = sidecar(
            "sockmesh-system",
            "only-web",
            "2026-01-01T00:00:00Z",
            &json!({"workloadSelector": {"labels": {"app": "web"}}, "egress": [{"hosts": ["./*"]}]}),
        );
        let (eff, hosts) = effective_scope(std::slice::from_ref(&selected), &[]);
        assert_eq!((eff, hosts), (None, Vec::new()));
        let (eff, _) = effective_scope(&[selected], &[narrow_default()]);
        assert_eq!(eff.as_deref(), Some("istio-system/default"));
    }

    #[test]
    fn no_egress_inherits_the_mesh_and_a_port_listener_without_star_narrows() {
        let none = sidecar(
            "istio-system",
            "default",
            "t",
            &json!({"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}}),
        );
        assert!(effective_scope(&[], &[none]).1.is_empty());
        let mixed = sidecar(
            "istio-system",
            "default",
            "t",
            &json!({"egress": [
                {"port": {"number": 9080, "protocol": "HTTP"}, "hosts": ["prod/*"]},
                {"hosts": ["*/*"]},
            ]}),
        );
        assert_eq!(effective_scope(&[], &[mixed]).1, ["*/*", "prod/*"]);
    }

    #[test]
    fn the_oldest_of_several_applies() {
        let newer = sidecar(
            "sockmesh-system",
            "b",
            "2026-03-01T00:00:00Z",
            &json!({"egress": [{"hosts": ["*/*"]}]}),
        );
        let older = sidecar(
            "sockmesh-system",
            "a",
            "2026-01-01T00:00:00Z",
            &json!({"egress": [{"hosts": ["./*"]}]}),
        );
        let (eff, hosts) = effective_scope(&[newer, older], &[]);
        assert_eq!(eff.as_deref(), Some("sockmesh-system/a"));
        assert_eq!(hosts, ["./*"]);
    }
}
