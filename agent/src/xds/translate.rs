//! Listeners → the services they ask for. Pure: no I/O, unit-tested without root.
//!
//! What becomes a service (docs/xds.md, "xDS: what becomes a service"):
//! - a Listener on a specific IP whose filter chain ends in `tcp_proxy` (its cluster
//!   or weighted clusters), `http_connection_manager` (the catch-all route of the
//!   virtual host for that IP, or of `*`), or, for UDP, a `udp_proxy` listener
//!   filter; its `default_filter_chain` for a VIP no other chain serves;
//! - a Listener on 0.0.0.0/:: whose filter chains match destination prefix ranges
//!   (Istio's virtual outbound style): one service per /32 (/128) range;
//! - an HTTP listener's virtual hosts whose domains name an IP or IP:port.
//!
//! Where several listeners name one service, the one Envoy's original-destination
//! matching would pick wins: a listener bound to the VIP, then a wildcard listener's
//! chain matching the VIP's prefix, then a wildcard listener's virtual host.
//! INBOUND listeners (traffic to the workload itself) and internal listeners (no
//! socket address) are left out.
//!
//! A chain whose terminal filter sockmesh does not interpret (a Dubbo, Thrift,
//! Redis, Kafka or Mongo proxy, an EnvoyFilter's custom filter, a TypedStruct) is
//! valid configuration whose traffic sockmesh leaves alone: its VIPs get no entry,
//! so connections go where the application sent them, as for pass-through. It
//! still claims its VIPs at its precedence, as Envoy's listener does, so a weaker
//! claim (a wildcard listener's virtual host) does not take them over. Each such
//! listener is noted (`Notes::left_alone`) for logs and `/config_dump`.
//!
//! Per-request HTTP routing (paths, headers) is out of scope for a socket-level load
//! balancer: only the catch-all route (prefix `/`) of a virtual host is used. A
//! chain that needs a route configuration not received yet makes its service
//! warm (it keeps its previous backends), as Envoy warms such a listener.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use sockmesh_proto::pb::envoy::{
    config::{
        core::v3::TrafficDirection,
        listener::v3::{FilterChain, Listener, listener_filter},
        route::v3::{RouteConfiguration, route, route_action, route_match},
    },
    extensions::filters::{
        network::{
            http_connection_manager::v3::http_connection_manager,
            tcp_proxy::v3::{TcpProxy, tcp_proxy},
        },
        udp::udp_proxy::v3::udp_proxy_config,
    },
};

pub use super::resources::{Encoded, Resources};
use super::validate::{
    NetFilter, decode_filter, decode_udp_proxy, parse_socket_address, socket_address_of,
};
use crate::model::{Protocol, ServiceAddr};

/// Which listener wins a service several listeners name: lower is stronger.
pub mod precedence {
    /// The listener is bound to the VIP itself.
    pub const BOUND: u8 = 0;
    /// A wildcard listener's filter chain matches the VIP's prefix range.
    pub const PREFIX_RANGE: u8 = 1;
    /// A wildcard listener's HTTP virtual host names the VIP.
    pub const VIRTUAL_HOST: u8 = 2;
}

/// What the translation of one listener noticed: features it ignores, and chains
/// it leaves alone (why, one line each).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Notes {
    pub ignored: Vec<String>,
    pub left_alone: Vec<String>,
}

impl Notes {
    pub fn is_empty(&self) -> bool {
        self.ignored.is_empty() && self.left_alone.is_empty()
    }
}

/// A TypedStruct (`udpa.type.v1.TypedStruct`, `xds.type.v3.TypedStruct`): a
/// config of the type it names, as a Struct. Only its type is read.
#[derive(Clone, PartialEq, prost::Message)]
struct TypedStruct {
    #[prost(string, tag = "1")]
    type_url: String,
}

/// A terminal filter's kind as a note names it: its type, and for a TypedStruct
/// the type it wraps.
fn filter_kind(f: &sockmesh_proto::pb::envoy::config::listener::v3::Filter) -> String {
    use prost::Message as _;
    use sockmesh_proto::pb::envoy::config::listener::v3::filter::ConfigType;
    let Some(ConfigType::TypedConfig(any)) = &f.config_type else {
        return format!("{:?} (no typed_config)", f.name);
    };
    let wrapped = any
        .type_url
        .ends_with(".TypedStruct")
        .then(|| TypedStruct::decode(any.value.as_slice()).ok())
        .flatten()
        .filter(|t| !t.type_url.is_empty());
    match wrapped {
        Some(t) => format!("{:?} ({} wrapping {})", f.name, any.type_url, t.type_url),
        None => format!("{:?} ({})", f.name, any.type_url),
    }
}

/// What one listener asks for: a service and the clusters (with weights) behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub service: ServiceAddr,
    pub clusters: Vec<(String, u32)>,
    /// See [`precedence`].
    pub precedence: u8,
    /// The chain's route configuration has not arrived: the service warms.
    pub route_pending: bool,
    /// What the route's or tcp_proxy's `hash_policy` hashes on when a socket
    /// balancer cannot see it (a header, cookie, query parameter or filter state):
    /// a consistent-hash service hashes the client instead, and says so once.
    pub unhashable: Option<&'static str>,
    /// The chain's terminal filter is not one sockmesh interprets: the service is
    /// left alone (no entry), whatever weaker claims name it.
    pub left_alone: bool,
}

impl ServiceSpec {
    fn new(service: ServiceAddr, clusters: Vec<(String, u32)>, precedence: u8) -> Self {
        Self {
            service,
            clusters,
            precedence,
            route_pending: false,
            unhashable: None,
            left_alone: false,
        }
    }

    /// A service the listener claims and sockmesh leaves alone.
    fn left_alone(service: ServiceAddr, precedence: u8) -> Self {
        Self {
            left_alone: true,
            ..Self::new(service, Vec::new(), precedence)
        }
    }

    fn hashing(mut self, unhashable: Option<&'static str>) -> Self {
        self.unhashable = unhashable;
        self
    }
}

/// The first request-level key of a route's hash policies, which no byte at
/// connect() can give (`connection_properties.source_ip` is the client, which
/// sockmesh hashes).
fn route_unhashable(
    policies: &[sockmesh_proto::pb::envoy::config::route::v3::route_action::HashPolicy],
) -> Option<&'static str> {
    use sockmesh_proto::pb::envoy::config::route::v3::route_action::hash_policy::PolicySpecifier as P;
    policies
        .iter()
        .find_map(|p| match p.policy_specifier.as_ref()? {
            P::Header(_) => Some("a header"),
            P::Cookie(_) => Some("a cookie"),
            P::QueryParameter(_) => Some("a query parameter"),
            P::FilterState(_) => Some("filter state"),
            P::ConnectionProperties(_) => None,
        })
}

/// As [`route_unhashable`], for tcp_proxy's hash policies (`source_ip` is honoured).
fn tcp_unhashable(t: &TcpProxy) -> Option<&'static str> {
    use sockmesh_proto::pb::envoy::r#type::v3::hash_policy::PolicySpecifier as P;
    t.hash_policy
        .iter()
        .find_map(|p| match p.policy_specifier.as_ref()? {
            P::FilterState(_) => Some("filter state"),
            P::SourceIp(_) => None,
        })
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

/// A route's clusters and weights, and what its hash policy asks for that no
/// socket balancer can see.
type RouteTarget = (Vec<(String, u32)>, Option<&'static str>);

/// The clusters of a virtual host's catch-all route (prefix "/" or "").
fn catch_all_clusters(
    routes: &[sockmesh_proto::pb::envoy::config::route::v3::Route],
) -> Option<RouteTarget> {
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
    let clusters = match &action.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => vec![(c.clone(), 1)],
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
            .clusters
            .iter()
            .filter_map(|c| {
                // Unset is 0, as Envoy reads it (`PROTOBUF_GET_WRAPPED_REQUIRED`
                // in `source/common/router/config_impl.cc`): never picked.
                let weight = c.weight.as_ref().map_or(0, |w| w.value);
                (weight > 0).then(|| (c.name.clone(), weight))
            })
            .collect(),
        _ => return None,
    };
    Some((clusters, route_unhashable(&action.hash_policy)))
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
/// a wildcard listener without prefix ranges) and `port`.
fn http_services(
    rc: &RouteConfiguration,
    vip: Option<IpAddr>,
    port: u16,
    precedence: u8,
    out: &mut Vec<ServiceSpec>,
) {
    let mut by_ip: BTreeMap<IpAddr, RouteTarget> = BTreeMap::new();
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
    for (ip, (clusters, unhashable)) in by_ip {
        let service = ServiceAddr {
            vip: ip,
            port,
            protocol: Protocol::Tcp,
        };
        let precedence = if vip.is_some() {
            precedence
        } else {
            self::precedence::VIRTUAL_HOST
        };
        out.push(ServiceSpec::new(service, clusters, precedence).hashing(unhashable));
    }
}

/// The services one listener asks for. `routes` resolves RDS names; the names used
/// are added to `route_names`, unsupported features and chains left alone to
/// `notes`.
pub fn listener_services(
    l: &Listener,
    routes: &super::resources::Store<super::resources::Encoding<RouteConfiguration>>,
    route_names: &mut BTreeSet<String>,
    notes: &mut Notes,
) -> Vec<ServiceSpec> {
    let ignored = &mut notes.ignored;
    let mut out = Vec::new();
    if l.traffic_direction == TrafficDirection::Inbound as i32 {
        // Traffic to this workload, not from it: nothing to balance.
        return out;
    }
    let Some(sa) = socket_address_of(l.address.as_ref()) else {
        if l.address.is_some() {
            ignored.push(format!("Listener {:?}: not an IP socket address", l.name));
        }
        // No address at all: an internal listener (Envoy-to-Envoy plumbing).
        return out;
    };
    let Ok((ip, port, protocol)) = parse_socket_address(sa) else {
        ignored.push(format!("Listener {:?}: no IP socket address", l.name));
        return out;
    };
    let wildcard = ip.is_unspecified();
    if protocol == Protocol::Udp || l.udp_listener_config.is_some() {
        udp_service(l, ip, port, wildcard, notes, &mut out);
        return out;
    }
    let chains = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("filter_chains[{i}]"), c))
        .chain(
            l.default_filter_chain
                .iter()
                .map(|c| ("default_filter_chain".to_owned(), c)),
        );
    for (at, chain) in chains {
        let before = out.len();
        let listener = Chain {
            l,
            at: &at,
            ip,
            port,
        };
        chain_services(&listener, chain, routes, route_names, notes, &mut out);
        // A VIP an earlier chain of this listener serves keeps that chain (the
        // default chain comes last: it serves what no other chain matches).
        let earlier: BTreeSet<ServiceAddr> = out[..before].iter().map(|s| s.service).collect();
        let mut i = before;
        while i < out.len() {
            if earlier.contains(&out[i].service) {
                out.remove(i);
            } else {
                i += 1;
            }
        }
    }
    out
}

/// A UDP listener's service: its `udp_proxy` cluster on its IP. A UDP listener
/// whose filters sockmesh does not interpret (a DNS filter, a custom one, a
/// matcher-routed proxy) is left alone.
fn udp_service(
    l: &Listener,
    ip: IpAddr,
    port: u16,
    wildcard: bool,
    notes: &mut Notes,
    out: &mut Vec<ServiceSpec>,
) {
    if wildcard {
        notes.ignored.push(format!(
            "Listener {:?}: a UDP listener on a wildcard address names no VIP",
            l.name
        ));
        return;
    }
    let service = ServiceAddr {
        vip: ip,
        port,
        protocol: Protocol::Udp,
    };
    let proxy = l
        .listener_filters
        .iter()
        .find_map(|f| match &f.config_type {
            Some(listener_filter::ConfigType::TypedConfig(any)) => decode_udp_proxy(any),
            _ => None,
        });
    // `cluster` is deprecated in favour of a matcher, but it is what a plain UDP
    // proxy to one cluster (and every control plane today) uses.
    #[expect(deprecated, reason = "the simple cluster form is still the common one")]
    match proxy.and_then(|c| c.route_specifier) {
        Some(udp_proxy_config::RouteSpecifier::Cluster(c)) => {
            out.push(ServiceSpec::new(service, vec![(c, 1)], precedence::BOUND));
        }
        route => {
            let why = match route {
                Some(_) => "its udp_proxy routes by a matcher".to_owned(),
                None => {
                    let kinds: Vec<String> = l
                        .listener_filters
                        .iter()
                        .map(|f| match &f.config_type {
                            Some(listener_filter::ConfigType::TypedConfig(any)) => {
                                format!("{:?} ({})", f.name, any.type_url)
                            }
                            _ => format!("{:?}", f.name),
                        })
                        .collect();
                    format!("no udp_proxy among its filters [{}]", kinds.join(", "))
                }
            };
            notes.left_alone.push(format!(
                "Listener {:?}: UDP listener left alone: {why}",
                l.name
            ));
            out.push(ServiceSpec::left_alone(service, precedence::BOUND));
        }
    }
}

/// A chain's listener: the listener, where the chain is in it, its IP and port.
struct Chain<'a> {
    l: &'a Listener,
    at: &'a str,
    ip: IpAddr,
    port: u16,
}

/// The services one filter chain serves.
fn chain_services(
    c: &Chain<'_>,
    chain: &FilterChain,
    routes: &super::resources::Store<super::resources::Encoding<RouteConfiguration>>,
    route_names: &mut BTreeSet<String>,
    notes: &mut Notes,
    out: &mut Vec<ServiceSpec>,
) {
    let (l, ip, port) = (c.l, c.ip, c.port);
    let ignored = &mut notes.ignored;
    let wildcard = ip.is_unspecified();
    let m = chain.filter_chain_match.as_ref();
    let chain_port = m
        .and_then(|m| m.destination_port.as_ref())
        .and_then(|p| u16::try_from(p.value).ok())
        .unwrap_or(port);
    // The VIPs this chain serves.
    let mut vips = Vec::new();
    let ranges = m.map(|m| m.prefix_ranges.as_slice()).unwrap_or(&[]);
    if ranges.is_empty() && !wildcard {
        vips.push(ip);
    }
    // A catch-all chain on a wildcard listener names no VIP (HTTP virtual hosts
    // may, below).
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
    let precedence = if wildcard {
        precedence::PREFIX_RANGE
    } else {
        precedence::BOUND
    };
    let tcp = |vip| ServiceAddr {
        vip,
        port: chain_port,
        protocol: Protocol::Tcp,
    };
    let Some(terminal) = chain.filters.last() else {
        return;
    };
    match decode_filter(terminal) {
        Ok(NetFilter::Tcp(t)) => {
            let clusters = tcp_proxy_clusters(&t);
            let unhashable = tcp_unhashable(&t);
            for vip in vips {
                out.push(
                    ServiceSpec::new(tcp(vip), clusters.clone(), precedence).hashing(unhashable),
                );
            }
        }
        Ok(NetFilter::Http(h)) => {
            let rc = match &h.route_specifier {
                Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
                    route_names.insert(rds.route_config_name.clone());
                    match routes.get(&rds.route_config_name) {
                        Some(rc) => Some(std::borrow::Cow::Owned(rc.decode())),
                        None => {
                            for vip in vips {
                                let mut spec = ServiceSpec::new(tcp(vip), Vec::new(), precedence);
                                spec.route_pending = true;
                                out.push(spec);
                            }
                            return;
                        }
                    }
                }
                Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
                    Some(std::borrow::Cow::Borrowed(rc))
                }
                _ => {
                    notes.left_alone.push(format!(
                        "Listener {:?}: {}: left alone: its http_connection_manager routes by scoped routes, which sockmesh does not interpret",
                        l.name, c.at
                    ));
                    for vip in &vips {
                        out.push(ServiceSpec::left_alone(tcp(*vip), precedence));
                    }
                    None
                }
            };
            if let Some(rc) = rc {
                if vips.is_empty() {
                    http_services(&rc, None, chain_port, precedence, out);
                }
                for vip in vips {
                    http_services(&rc, Some(vip), chain_port, precedence, out);
                }
            }
        }
        Ok(NetFilter::Other) | Err(_) => {
            notes.left_alone.push(format!(
                "Listener {:?}: {}: left alone: its terminal filter {} is not one sockmesh interprets (tcp_proxy, http_connection_manager); its connections go where the application sent them",
                l.name,
                c.at,
                filter_kind(terminal)
            ));
            for vip in vips {
                out.push(ServiceSpec::left_alone(tcp(vip), precedence));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use sockmesh_proto::pb::envoy::config::route::v3::route_action::{
        HashPolicy,
        hash_policy::{ConnectionProperties, Cookie, Header, PolicySpecifier},
    };

    use super::*;

    fn policy(p: PolicySpecifier) -> HashPolicy {
        HashPolicy {
            policy_specifier: Some(p),
            ..Default::default()
        }
    }

    #[test]
    fn request_level_hash_keys_are_named_and_the_source_ip_is_honoured() {
        let source_ip = policy(PolicySpecifier::ConnectionProperties(
            ConnectionProperties { source_ip: true },
        ));
        let header = policy(PolicySpecifier::Header(Header {
            header_name: "x-user".into(),
            ..Default::default()
        }));
        let cookie = policy(PolicySpecifier::Cookie(Cookie {
            name: "session".into(),
            ..Default::default()
        }));
        assert_eq!(route_unhashable(&[]), None);
        assert_eq!(route_unhashable(std::slice::from_ref(&source_ip)), None);
        assert_eq!(
            route_unhashable(&[source_ip.clone(), header.clone()]),
            Some("a header")
        );
        assert_eq!(route_unhashable(&[cookie, header]), Some("a cookie"));
    }
}
