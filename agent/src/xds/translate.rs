//! Envoy resources → routing table. Pure: no I/O, unit-tested without root.
//!
//! What becomes a service (see docs in README "xDS translation"):
//! - a Listener on a specific IP whose filter chain ends in `tcp_proxy` (its cluster
//!   or weighted clusters), `http_connection_manager` (the catch-all route of the
//!   virtual host for that IP, or of `*`), or, for UDP, a `udp_proxy` listener filter;
//! - a Listener on 0.0.0.0/:: whose filter chains match destination prefix ranges
//!   (Istio's virtual outbound style): one service per /32 (/128) range;
//! - an HTTP listener's virtual hosts whose domains name an IP or IP:port.
//!
//! Per-request HTTP routing (paths, headers) is out of scope for a socket-level load
//! balancer: only the catch-all route (prefix `/`) of a virtual host is used.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use prost::Message as _;
use sockmesh_proto::pb::envoy::{
    config::{
        cluster::v3::{Cluster, cluster},
        core::v3::{Address, HealthStatus, SocketAddress, address, socket_address},
        endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
        listener::v3::{Filter, Listener, filter, listener_filter},
        route::v3::{RouteConfiguration, route, route_action, route_match},
    },
    extensions::filters::{
        network::{
            http_connection_manager::v3::{HttpConnectionManager, http_connection_manager},
            tcp_proxy::v3::{TcpProxy, tcp_proxy},
        },
        udp::udp_proxy::v3::{UdpProxyConfig, udp_proxy_config},
    },
};
use sockmesh_proto::pb::google::protobuf::Any;

pub use super::resources::{Encoded, Resources};
use crate::model::{Backend, BackendState, Protocol, RoutingTable, ServiceAddr};

const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const UDP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig";

/// A resource that cannot be accepted; the message names the resource and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {field}: {problem}")]
pub struct InvalidResource {
    pub kind: &'static str,
    pub name: String,
    pub field: String,
    pub problem: String,
}

impl InvalidResource {
    fn new(
        kind: &'static str,
        name: &str,
        field: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            name: name.to_owned(),
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// What one listener asks for: services and the clusters (with weights) behind each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub service: ServiceAddr,
    pub clusters: Vec<(String, u32)>,
}

/// The result of translating [`Resources`].
#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub table: RoutingTable,
    /// RouteConfiguration names referenced by listeners (RDS subscription).
    pub route_names: BTreeSet<String>,
    /// EDS service names referenced by clusters (EDS subscription).
    pub eds_names: BTreeSet<String>,
    /// Services whose clusters are not all known yet (warming); they keep their
    /// previous backends, or are left out if they had none.
    pub warming: Vec<ServiceAddr>,
    /// Things ignored on purpose (unsupported features), one line each.
    pub ignored: Vec<String>,
}

/// Checks a listener the way a NACK needs it: names resource and field.
pub fn validate_listener(l: &Listener) -> Result<(), InvalidResource> {
    let bad =
        |field: &str, problem: String| InvalidResource::new("Listener", &l.name, field, problem);
    if l.name.is_empty() {
        return Err(bad("name", "must not be empty".into()));
    }
    if let Some(sa) = socket_address_of(l.address.as_ref()) {
        parse_socket_address(sa)
            .map_err(|(f, p)| bad(&format!("address.socket_address.{f}"), p))?;
    }
    for (i, chain) in l.filter_chains.iter().enumerate() {
        if let Some(m) = &chain.filter_chain_match {
            if let Some(port) = &m.destination_port
                && (port.value == 0 || port.value > 65_535)
            {
                return Err(bad(
                    &format!("filter_chains[{i}].filter_chain_match.destination_port"),
                    format!("{} is out of range (1-65535)", port.value),
                ));
            }
            for (j, r) in m.prefix_ranges.iter().enumerate() {
                let ip: IpAddr = r.address_prefix.parse().map_err(|_| {
                    bad(
                        &format!("filter_chains[{i}].filter_chain_match.prefix_ranges[{j}].address_prefix"),
                        format!("{:?} is not an IP address", r.address_prefix),
                    )
                })?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                if r.prefix_len.as_ref().is_some_and(|p| p.value > max) {
                    return Err(bad(
                        &format!(
                            "filter_chains[{i}].filter_chain_match.prefix_ranges[{j}].prefix_len"
                        ),
                        format!("more than {max}"),
                    ));
                }
            }
        }
        for (j, f) in chain.filters.iter().enumerate() {
            decode_filter(f)
                .map_err(|p| bad(&format!("filter_chains[{i}].filters[{j}].typed_config"), p))?;
        }
    }
    Ok(())
}

/// Checks a ClusterLoadAssignment: addresses are IPs, ports in 1-65535.
pub fn validate_endpoints(cla: &ClusterLoadAssignment) -> Result<(), InvalidResource> {
    let name = &cla.cluster_name;
    if name.is_empty() {
        return Err(InvalidResource::new(
            "ClusterLoadAssignment",
            name,
            "cluster_name",
            "must not be empty",
        ));
    }
    for (i, loc) in cla.endpoints.iter().enumerate() {
        for (j, lb) in loc.lb_endpoints.iter().enumerate() {
            let field = format!("endpoints[{i}].lb_endpoints[{j}]");
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                return Err(InvalidResource::new(
                    "ClusterLoadAssignment",
                    name,
                    format!("{field}.endpoint"),
                    "missing (named endpoints are not supported)",
                ));
            };
            let Some(sa) = socket_address_of(ep.address.as_ref()) else {
                return Err(InvalidResource::new(
                    "ClusterLoadAssignment",
                    name,
                    format!("{field}.endpoint.address.socket_address"),
                    "missing (pipe and internal addresses are not supported)",
                ));
            };
            parse_socket_address(sa).map_err(|(f, p)| {
                InvalidResource::new(
                    "ClusterLoadAssignment",
                    name,
                    format!("{field}.endpoint.address.socket_address.{f}"),
                    p,
                )
            })?;
            if lb
                .load_balancing_weight
                .as_ref()
                .is_some_and(|w| w.value == 0)
            {
                return Err(InvalidResource::new(
                    "ClusterLoadAssignment",
                    name,
                    format!("{field}.load_balancing_weight"),
                    "must be at least 1",
                ));
            }
        }
    }
    Ok(())
}

/// Checks a cluster (its inline load assignment, if any).
pub fn validate_cluster(c: &Cluster) -> Result<(), InvalidResource> {
    if c.name.is_empty() {
        return Err(InvalidResource::new(
            "Cluster",
            &c.name,
            "name",
            "must not be empty",
        ));
    }
    if let Some(cla) = &c.load_assignment {
        validate_endpoints(cla).map_err(|mut e| {
            e.kind = "Cluster";
            e.name = c.name.clone();
            e.field = format!("load_assignment.{}", e.field);
            e
        })?;
    }
    Ok(())
}

/// Checks a route configuration (decodable; no further constraints).
pub fn validate_route(r: &RouteConfiguration) -> Result<(), InvalidResource> {
    if r.name.is_empty() {
        return Err(InvalidResource::new(
            "RouteConfiguration",
            &r.name,
            "name",
            "must not be empty",
        ));
    }
    Ok(())
}

fn socket_address_of(a: Option<&Address>) -> Option<&SocketAddress> {
    match a?.address.as_ref()? {
        address::Address::SocketAddress(sa) => Some(sa),
        _ => None,
    }
}

/// (ip, port, protocol) of a socket address, or (field, problem).
fn parse_socket_address(
    sa: &SocketAddress,
) -> Result<(IpAddr, u16, Protocol), (&'static str, String)> {
    let ip: IpAddr = sa
        .address
        .parse()
        .map_err(|_| ("address", format!("{:?} is not an IP address", sa.address)))?;
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => p,
        Some(socket_address::PortSpecifier::NamedPort(ref n)) => {
            return Err((
                "named_port",
                format!("{n:?}: named ports are not supported"),
            ));
        }
        None => 0,
    };
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(("port_value", format!("{port} is out of range (1-65535)")))?;
    let protocol = if sa.protocol == socket_address::Protocol::Udp as i32 {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    Ok((ip, port, protocol))
}

/// A network filter's decoded config.
enum NetFilter {
    Tcp(Box<TcpProxy>),
    Http(Box<HttpConnectionManager>),
    Other(String),
}

fn decode_filter(f: &Filter) -> Result<NetFilter, String> {
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        return Ok(NetFilter::Other(f.name.clone()));
    };
    match any.type_url.as_str() {
        TCP_PROXY => TcpProxy::decode(any.value.as_slice())
            .map(|t| NetFilter::Tcp(Box::new(t)))
            .map_err(|e| format!("TcpProxy: {e}")),
        HCM => HttpConnectionManager::decode(any.value.as_slice())
            .map(|h| NetFilter::Http(Box::new(h)))
            .map_err(|e| format!("HttpConnectionManager: {e}")),
        other => Ok(NetFilter::Other(other.to_owned())),
    }
}

fn decode_udp_proxy(any: &Any) -> Option<UdpProxyConfig> {
    (any.type_url == UDP_PROXY)
        .then(|| UdpProxyConfig::decode(any.value.as_slice()).ok())
        .flatten()
}

fn tcp_proxy_clusters(t: &TcpProxy) -> Vec<(String, u32)> {
    match &t.cluster_specifier {
        Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => vec![(c.clone(), 1)],
        Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => w
            .clusters
            .iter()
            .filter(|c| c.weight > 0)
            .map(|c| (c.name.clone(), c.weight))
            .collect(),
        None => vec![],
    }
}

/// The clusters of a virtual host's catch-all route (prefix "/" or "").
fn catch_all_clusters(
    routes: &[sockmesh_proto::pb::envoy::config::route::v3::Route],
) -> Option<Vec<(String, u32)>> {
    let route = routes.iter().find(|r| {
        matches!(
            r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()),
            Some(route_match::PathSpecifier::Prefix(p)) if p.is_empty() || p == "/"
        ) || matches!(
            r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()),
            Some(route_match::PathSpecifier::PathSeparatedPrefix(p)) if p == "/"
        )
    })?;
    let Some(route::Action::Route(action)) = &route.action else {
        return None;
    };
    match &action.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => Some(vec![(c.clone(), 1)]),
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => Some(
            w.clusters
                .iter()
                .filter_map(|c| {
                    let weight = c.weight.as_ref().map_or(1, |w| w.value);
                    (weight > 0).then(|| (c.name.clone(), weight))
                })
                .collect(),
        ),
        _ => None,
    }
}

/// Parses a virtual host domain naming an IP (`10.0.0.1`, `10.0.0.1:80`, `[fd00::1]:80`).
fn domain_ip(domain: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Ok(ip) = domain.parse::<IpAddr>() {
        return Some((ip, None));
    }
    if let Ok(sa) = domain.parse::<std::net::SocketAddr>() {
        return Some((sa.ip(), Some(sa.port())));
    }
    domain
        .strip_prefix('[')
        .and_then(|d| d.strip_suffix(']'))
        .and_then(|d| d.parse().ok())
        .map(|ip| (ip, None))
}

/// Services named by an HTTP route configuration, for a listener on `vip` (None for
/// a wildcard listener) and `port`.
fn http_services(
    rc: &RouteConfiguration,
    vip: Option<IpAddr>,
    port: u16,
    out: &mut Vec<ServiceSpec>,
) {
    let mut by_ip: BTreeMap<IpAddr, Vec<(String, u32)>> = BTreeMap::new();
    let mut wildcard = None;
    for vh in &rc.virtual_hosts {
        let Some(clusters) = catch_all_clusters(&vh.routes) else {
            continue;
        };
        for d in &vh.domains {
            if d == "*" {
                wildcard.get_or_insert_with(|| clusters.clone());
            } else if let Some((ip, p)) = domain_ip(d)
                && p.is_none_or(|p| p == port)
                && vip.is_none_or(|v| v == ip)
            {
                by_ip.entry(ip).or_insert_with(|| clusters.clone());
            }
        }
    }
    if let (Some(vip), Some(clusters)) = (vip, wildcard) {
        by_ip.entry(vip).or_insert(clusters);
    }
    for (ip, clusters) in by_ip {
        out.push(ServiceSpec {
            service: ServiceAddr {
                vip: ip,
                port,
                protocol: Protocol::Tcp,
            },
            clusters,
        });
    }
}

/// The services one listener asks for. `routes` resolves RDS names.
pub fn listener_services(
    l: &Listener,
    routes: &BTreeMap<String, Encoded<RouteConfiguration>>,
    route_names: &mut BTreeSet<String>,
    ignored: &mut Vec<String>,
) -> Vec<ServiceSpec> {
    let mut out = Vec::new();
    let Some(Ok((ip, port, protocol))) =
        socket_address_of(l.address.as_ref()).map(parse_socket_address)
    else {
        ignored.push(format!("Listener {:?}: no IP socket address", l.name));
        return out;
    };
    let wildcard = ip.is_unspecified();
    if protocol == Protocol::Udp || l.udp_listener_config.is_some() {
        let cluster = l
            .listener_filters
            .iter()
            .find_map(|f| match &f.config_type {
                Some(listener_filter::ConfigType::TypedConfig(any)) => decode_udp_proxy(any),
                _ => None,
            });
        // `cluster` is deprecated in favour of a matcher, but it is what a plain
        // UDP proxy to one cluster (and every control plane today) uses.
        #[expect(deprecated, reason = "the simple cluster form is still the common one")]
        match cluster.and_then(|c| c.route_specifier) {
            Some(udp_proxy_config::RouteSpecifier::Cluster(c)) if !wildcard => {
                out.push(ServiceSpec {
                    service: ServiceAddr {
                        vip: ip,
                        port,
                        protocol: Protocol::Udp,
                    },
                    clusters: vec![(c, 1)],
                })
            }
            _ => ignored.push(format!(
                "Listener {:?}: UDP listener without a udp_proxy cluster on a specific IP",
                l.name
            )),
        }
        return out;
    }
    for chain in &l.filter_chains {
        let m = chain.filter_chain_match.as_ref();
        let chain_port = m
            .and_then(|m| m.destination_port.as_ref())
            .and_then(|p| u16::try_from(p.value).ok())
            .unwrap_or(port);
        // The VIPs this chain serves.
        let mut vips = Vec::new();
        let ranges = m.map(|m| m.prefix_ranges.as_slice()).unwrap_or(&[]);
        if ranges.is_empty() {
            if wildcard {
                // A catch-all chain on a wildcard listener names no VIP (HTTP
                // virtual hosts may, below).
            } else {
                vips.push(ip);
            }
        }
        for r in ranges {
            let Ok(addr) = r.address_prefix.parse::<IpAddr>() else {
                continue;
            };
            let full = if addr.is_ipv4() { 32 } else { 128 };
            match r.prefix_len.as_ref().map_or(full, |p| p.value) {
                len if len == full => vips.push(addr),
                len => ignored.push(format!(
                    "Listener {:?}: prefix range {}/{len} is not a single VIP",
                    l.name, r.address_prefix
                )),
            }
        }
        let Some(terminal) = chain.filters.last() else {
            continue;
        };
        match decode_filter(terminal) {
            Ok(NetFilter::Tcp(t)) => {
                let clusters = tcp_proxy_clusters(&t);
                for vip in vips {
                    out.push(ServiceSpec {
                        service: ServiceAddr {
                            vip,
                            port: chain_port,
                            protocol: Protocol::Tcp,
                        },
                        clusters: clusters.clone(),
                    });
                }
            }
            Ok(NetFilter::Http(h)) => {
                let rc = match &h.route_specifier {
                    Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
                        route_names.insert(rds.route_config_name.clone());
                        routes
                            .get(&rds.route_config_name)
                            .map(|rc| std::borrow::Cow::Owned(rc.decode()))
                    }
                    Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
                        Some(std::borrow::Cow::Borrowed(rc))
                    }
                    _ => {
                        ignored.push(format!(
                            "Listener {:?}: HTTP filter without RDS or inline routes",
                            l.name
                        ));
                        None
                    }
                };
                if let Some(rc) = rc {
                    if vips.is_empty() {
                        http_services(&rc, None, chain_port, &mut out);
                    }
                    for vip in vips {
                        http_services(&rc, Some(vip), chain_port, &mut out);
                    }
                }
            }
            Ok(NetFilter::Other(name)) => {
                ignored.push(format!(
                    "Listener {:?}: terminal filter {name} is not supported",
                    l.name
                ));
            }
            Err(e) => ignored.push(format!("Listener {:?}: {e}", l.name)),
        }
    }
    out
}

/// The backends of a load assignment, by Envoy's rules: the lowest priority with a
/// healthy (HEALTHY/UNKNOWN) endpoint wins; DEGRADED endpoints only when no priority
/// has a healthy one; DRAINING/UNHEALTHY/TIMEOUT get no new connections (they are
/// kept as draining so established connections continue). Weights are locality
/// weight × endpoint weight.
pub fn assignment_backends(cla: &ClusterLoadAssignment) -> Vec<Backend> {
    let healthy = |s: i32| s == HealthStatus::Unknown as i32 || s == HealthStatus::Healthy as i32;
    let degraded = |s: i32| s == HealthStatus::Degraded as i32;
    let mut entries = Vec::new(); // (priority, status, backend)
    for loc in &cla.endpoints {
        let loc_weight = loc
            .load_balancing_weight
            .as_ref()
            .map_or(1, |w| w.value.max(1));
        for lb in &loc.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                continue;
            };
            let Some(Ok((ip, port, _))) =
                socket_address_of(ep.address.as_ref()).map(parse_socket_address)
            else {
                continue;
            };
            let weight = lb
                .load_balancing_weight
                .as_ref()
                .map_or(1, |w| w.value.max(1));
            let b = Backend::new(ip, port).weighted(loc_weight.saturating_mul(weight));
            entries.push((loc.priority, lb.health_status, b));
        }
    }
    let chosen = entries
        .iter()
        .filter(|(_, s, _)| healthy(*s))
        .map(|(p, _, _)| *p)
        .min();
    let use_degraded = chosen.is_none();
    let degraded_priority = entries
        .iter()
        .filter(|(_, s, _)| degraded(*s))
        .map(|(p, _, _)| *p)
        .min();
    let mut out: Vec<Backend> = Vec::new();
    for (p, s, b) in &entries {
        let active = match chosen {
            Some(c) => *p == c && healthy(*s),
            None => use_degraded && Some(*p) == degraded_priority && degraded(*s),
        };
        if active {
            out.push(*b);
        } else if !healthy(*s) && !degraded(*s) {
            out.push(b.draining());
        }
    }
    merge(out)
}

/// Merges duplicates (same address and port): active wins, weights add.
fn merge(backends: Vec<Backend>) -> Vec<Backend> {
    let mut by: BTreeMap<(IpAddr, u16), Backend> = BTreeMap::new();
    for b in backends {
        by.entry((b.address, b.port))
            .and_modify(|e| match (e.state, b.state) {
                (BackendState::Active, BackendState::Active) => {
                    e.weight = e.weight.saturating_add(b.weight)
                }
                (BackendState::Draining, BackendState::Active) => *e = b,
                _ => {}
            })
            .or_insert(b);
    }
    by.into_values().collect()
}

/// Where a cluster's endpoints come from: the EDS name it subscribes to, or its
/// inline load assignment (STATIC). Other discovery types are not supported.
pub fn cluster_source(
    c: &Cluster,
) -> Result<(Option<String>, Option<&ClusterLoadAssignment>), String> {
    let ty = match &c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => *t,
        Some(cluster::ClusterDiscoveryType::ClusterType(ct)) => {
            return Err(format!("custom cluster type {}", ct.name));
        }
        None => cluster::DiscoveryType::Static as i32,
    };
    if ty == cluster::DiscoveryType::Eds as i32 {
        let name = c
            .eds_cluster_config
            .as_ref()
            .map(|e| e.service_name.as_str())
            .filter(|n| !n.is_empty())
            .unwrap_or(&c.name);
        Ok((Some(name.to_owned()), None))
    } else if ty == cluster::DiscoveryType::Static as i32 {
        Ok((None, c.load_assignment.as_ref()))
    } else {
        Err(format!(
            "discovery type {} is not supported (EDS and STATIC are)",
            cluster::DiscoveryType::try_from(ty)
                .map_or_else(|_| ty.to_string(), |t| t.as_str_name().to_owned())
        ))
    }
}

/// A cluster's backends (`None` while its EDS resource has not arrived).
fn backends_of_cluster(
    c: &Cluster,
    res: &Resources,
    eds_names: &mut BTreeSet<String>,
) -> Result<Option<Vec<Backend>>, String> {
    match cluster_source(c)? {
        (Some(eds), _) => {
            let backends = res
                .endpoints
                .get(&eds)
                .map(|e| assignment_backends(&e.decode()));
            eds_names.insert(eds);
            Ok(backends)
        }
        (None, inline) => Ok(Some(inline.map(assignment_backends).unwrap_or_default())),
    }
}

/// Translates everything. `previous` (first match wins) supplies the backends of services whose
/// clusters are still warming, so a service never flaps to empty while its
/// endpoints are on the way.
pub fn translate(res: &Resources, previous: &[&RoutingTable]) -> Translation {
    let mut t = Translation::default();
    let mut specs = Vec::new();
    for l in res.listeners.values() {
        specs.extend(listener_services(
            &l.decode(),
            &res.routes,
            &mut t.route_names,
            &mut t.ignored,
        ));
    }
    // Backends per cluster (None: not known yet).
    let mut cluster_backends: BTreeMap<String, Option<Vec<Backend>>> = BTreeMap::new();
    for spec in &specs {
        for (name, _) in &spec.clusters {
            if cluster_backends.contains_key(name.as_str()) {
                continue;
            }
            let backends = match res.clusters.get(name) {
                None => None,
                Some(c) => match backends_of_cluster(&c.decode(), res, &mut t.eds_names) {
                    Ok(backends) => backends,
                    Err(why) => {
                        t.ignored.push(format!("Cluster {name:?}: {why}"));
                        Some(Vec::new())
                    }
                },
            };
            cluster_backends.insert(name.clone(), backends);
        }
    }
    // EDS names of clusters no listener uses are still subscribed (Envoy warms every
    // cluster it knows).
    for c in res.clusters.values() {
        if let Ok((Some(eds), _)) = cluster_source(&c.decode()) {
            t.eds_names.insert(eds);
        }
    }
    let mut defined = BTreeSet::new();
    for spec in specs {
        // The first definition (by listener name) wins, even while it warms.
        if !defined.insert(spec.service) {
            t.ignored.push(format!(
                "service {} is defined twice; the first definition wins",
                spec.service
            ));
            continue;
        }
        let parts: Option<Vec<(u32, &Vec<Backend>)>> = spec
            .clusters
            .iter()
            .map(|(name, w)| {
                cluster_backends
                    .get(name.as_str())
                    .and_then(|b| b.as_ref())
                    .map(|b| (*w, b))
            })
            .collect();
        let Some(parts) = parts else {
            t.warming.push(spec.service);
            if let Some(old) = previous.iter().find_map(|t| t.services.get(&spec.service)) {
                t.table.insert(spec.service, old.clone());
            }
            continue;
        };
        let family_v4 = spec.service.vip.is_ipv4();
        let backends = combine(&parts, family_v4);
        t.table.insert(spec.service, backends);
    }
    t
}

/// Combines weighted clusters into one backend list: a backend's weight is its
/// cluster's share times its share within the cluster, scaled to integers. Backends
/// of the other address family are left out.
pub fn combine(parts: &[(u32, &Vec<Backend>)], v4: bool) -> Vec<Backend> {
    let same_family = |b: &&Backend| b.address.is_ipv4() == v4;
    if let [(_, only)] = parts {
        return merge(only.iter().filter(same_family).copied().collect());
    }
    let active_parts: Vec<(f64, f64, &Vec<Backend>)> = parts
        .iter()
        .map(|(w, bs)| {
            let sum: u64 = bs
                .iter()
                .filter(same_family)
                .filter(|b| b.state == BackendState::Active)
                .map(|b| u64::from(b.weight))
                .sum();
            (f64::from(*w), sum as f64, *bs)
        })
        .collect();
    let total_cluster_weight: f64 = active_parts
        .iter()
        .filter(|(_, s, _)| *s > 0.0)
        .map(|(w, _, _)| w)
        .sum();
    const SCALE: f64 = 1_000_000.0;
    let mut out = Vec::new();
    for (w, sum, bs) in active_parts {
        for b in bs.iter().filter(same_family) {
            if b.state == BackendState::Active && sum > 0.0 {
                let share = w / total_cluster_weight * f64::from(b.weight) / sum;
                // Truncation to an integer weight is the intent; at least 1.
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "bounded by SCALE"
                )]
                let weight = ((share * SCALE).round() as u32).max(1);
                out.push(b.weighted(weight));
            } else if b.state == BackendState::Draining {
                out.push(*b);
            }
        }
    }
    merge(out)
}
