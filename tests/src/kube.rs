//! Kubernetes objects as YAML, for the live-istiod suite: what a cluster's API
//! server, EndpointSlice controller and kubelet would hold (nothing in
//! `sockmesh-istiod` generates them). Shapes as `tests/istiod/README.md`
//! describes them: Pods with `status.podIP`, `spec.nodeName` and a `Ready`
//! condition (istiod keeps only ready pods with an IP, and leaves out a slice
//! endpoint whose `targetRef` names a Pod it does not have), EndpointSlices
//! labelled `kubernetes.io/service-name`.

use std::fmt::Write as _;

/// `key: value` pairs as a YAML flow mapping (`{}` when empty).
fn flow(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {v:?}")).collect();
    format!("{{{}}}", inner.join(", "))
}

/// A Namespace with `labels`.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {}}}\n",
        flow(labels)
    )
}

/// A Node with its InternalIP and topology labels (region, zone): istiod reads a
/// workload's locality from its node.
pub fn node(name: &str, ip: &str, region: &str, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/hostname: {name}, topology.kubernetes.io/region: {region}, topology.kubernetes.io/zone: {zone}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {ip}}}]\n"
    )
}

/// One port of a Service: (name, port, target port, protocol).
#[derive(Clone, Copy, Debug)]
pub struct Port<'a> {
    pub name: &'a str,
    pub port: u16,
    pub target: u16,
    pub protocol: &'a str,
}

/// A TCP port named `name`.
pub fn tcp<'a>(name: &'a str, port: u16, target: u16) -> Port<'a> {
    Port {
        name,
        port,
        target,
        protocol: "TCP",
    }
}

/// A Service. `vip` `None` is a headless one (`clusterIP: None`); `selector` the
/// pods' `app` label (none: a Service whose slices are written by hand, like
/// `kubernetes`); `spec` more `spec` lines (e.g. `internalTrafficPolicy: Local`).
pub fn service(
    ns: &str,
    name: &str,
    vip: Option<&str>,
    app: Option<&str>,
    ports: &[Port<'_>],
    spec: &str,
) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n"
    );
    match vip {
        Some(ip) => {
            let _ = writeln!(s, "  clusterIP: {ip}\n  clusterIPs: [{ip}]");
        }
        None => s.push_str("  clusterIP: None\n"),
    }
    if let Some(app) = app {
        let _ = writeln!(s, "  selector: {{app: {app}}}");
    }
    s.push_str("  ports:\n");
    for p in ports {
        let _ = writeln!(
            s,
            "  - {{name: {}, port: {}, targetPort: {}, protocol: {}}}",
            p.name, p.port, p.target, p.protocol
        );
    }
    for line in spec.lines().filter(|l| !l.trim().is_empty()) {
        let _ = writeln!(s, "  {}", line.trim());
    }
    s
}

/// A Pod as the kubelet reports it once ready.
#[derive(Clone, Debug)]
pub struct Pod<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    pub ip: &'a str,
    pub node: &'a str,
    /// `app` and any other labels.
    pub labels: Vec<(&'a str, &'a str)>,
    pub annotations: Vec<(&'a str, &'a str)>,
    pub host_network: bool,
    pub service_account: &'a str,
}

impl<'a> Pod<'a> {
    /// A pod of app `app`.
    pub fn new(ns: &'a str, name: &'a str, ip: &'a str, node: &'a str, app: &'a str) -> Self {
        Self {
            ns,
            name,
            ip,
            node,
            labels: vec![("app", app)],
            annotations: Vec::new(),
            host_network: false,
            service_account: "default",
        }
    }

    pub fn label(mut self, k: &'a str, v: &'a str) -> Self {
        self.labels.push((k, v));
        self
    }

    pub fn annotation(mut self, k: &'a str, v: &'a str) -> Self {
        self.annotations.push((k, v));
        self
    }

    pub fn yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}, annotations: {ann}}}\n\
             spec:\n  nodeName: {node}\n  hostNetwork: {host}\n  serviceAccountName: {sa}\n  containers: [{{name: main, image: main}}]\n\
             status:\n  phase: Running\n  podIP: {ip}\n  podIPs: [{{ip: {ip}}}]\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
            name = self.name,
            ns = self.ns,
            labels = flow(&self.labels),
            ann = flow(&self.annotations),
            node = self.node,
            host = self.host_network,
            sa = self.service_account,
            ip = self.ip,
        )
    }
}

/// One endpoint of an EndpointSlice, as the EndpointSlice controller writes it.
#[derive(Clone, Debug)]
pub struct Endpoint<'a> {
    pub ip: &'a str,
    /// The Pod it is (`targetRef`); `None`: an endpoint without one (the API
    /// server's, a node address), which istiod takes as it is.
    pub pod: Option<&'a str>,
    pub node: &'a str,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl<'a> Endpoint<'a> {
    /// A ready endpoint of pod `pod`.
    pub fn pod(ip: &'a str, pod: &'a str, node: &'a str) -> Self {
        Self {
            ip,
            pod: Some(pod),
            node,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// A ready endpoint with no Pod behind it.
    pub fn address(ip: &'a str, node: &'a str) -> Self {
        Self {
            pod: None,
            ..Self::pod(ip, "", node)
        }
    }

    /// What the controller writes once the pod is being deleted: still serving
    /// during its grace period, no longer ready.
    pub fn terminating(mut self) -> Self {
        self.ready = false;
        self.terminating = true;
        self
    }
}

/// An EndpointSlice of Service `svc` in `ns`, with `ports` (name, port) of TCP.
pub fn endpoint_slice(
    ns: &str,
    svc: &str,
    slice: &str,
    endpoints: &[Endpoint<'_>],
    ports: &[(&str, u16)],
) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nendpoints:\n"
    );
    if endpoints.is_empty() {
        s.truncate(s.len() - "endpoints:\n".len());
        s.push_str("endpoints: []\n");
    }
    for e in endpoints {
        let _ = writeln!(
            s,
            "- addresses: [{}]\n  conditions: {{ready: {}, serving: {}, terminating: {}}}\n  nodeName: {}",
            e.ip, e.ready, e.serving, e.terminating, e.node
        );
        if let Some(pod) = e.pod {
            let _ = writeln!(
                s,
                "  targetRef: {{kind: Pod, name: {pod}, namespace: {ns}}}"
            );
        }
    }
    s.push_str("ports:\n");
    for (name, port) in ports {
        let _ = writeln!(s, "- {{name: {name}, port: {port}, protocol: TCP}}");
    }
    s
}

/// Documents joined into one multi-document YAML stream.
pub fn docs<S: AsRef<str>>(docs: impl IntoIterator<Item = S>) -> String {
    let parts: Vec<String> = docs.into_iter().map(|d| d.as_ref().to_owned()).collect();
    parts.join("---\n")
}
