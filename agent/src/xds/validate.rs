//! Validation of Envoy resources, done when they arrive: what a NACK reports
//! names the resource and the field (`ClusterLoadAssignment "web":
//! endpoints[0].lb_endpoints[3].endpoint.address.socket_address.port_value: 70000
//! is out of range (1-65535)`). Also the small decoders the translation shares:
//! socket addresses and network filters.

use prost::Message as _;
use sockmesh_proto::pb::{
    envoy::{
        config::{
            cluster::v3::{Cluster, cluster},
            core::v3::{Address, SocketAddress, address, socket_address},
            endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
            listener::v3::{Filter, FilterChain, Listener, filter},
            route::v3::RouteConfiguration,
        },
        extensions::filters::{
            network::{
                http_connection_manager::v3::HttpConnectionManager, tcp_proxy::v3::TcpProxy,
            },
            udp::udp_proxy::v3::UdpProxyConfig,
        },
    },
    google::protobuf::Any,
};

use crate::model::Protocol;
use std::net::IpAddr;

pub(crate) const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
pub(crate) const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub(crate) const UDP_PROXY: &str =
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
        validate_chain(chain).map_err(|(field, problem)| bad(&format!("{at}.{field}"), problem))?;
    }
    Ok(())
}

/// One filter chain's match and filters: (field below the chain, problem).
fn validate_chain(chain: &FilterChain) -> Result<(), (String, String)> {
    if let Some(m) = &chain.filter_chain_match {
        if let Some(port) = &m.destination_port
            && (port.value == 0 || port.value > 65_535)
        {
            return Err((
                "filter_chain_match.destination_port".into(),
                format!("{} is out of range (1-65535)", port.value),
            ));
        }
        for (j, r) in m.prefix_ranges.iter().enumerate() {
            let field = format!("filter_chain_match.prefix_ranges[{j}]");
            let ip: IpAddr = r.address_prefix.parse().map_err(|_| {
                (
                    format!("{field}.address_prefix"),
                    format!("{:?} is not an IP address", r.address_prefix),
                )
            })?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if r.prefix_len.as_ref().is_some_and(|p| p.value > max) {
                return Err((format!("{field}.prefix_len"), format!("more than {max}")));
            }
        }
    }
    let last = chain.filters.len().saturating_sub(1);
    for (j, f) in chain.filters.iter().enumerate() {
        let field = format!("filters[{j}].typed_config");
        decode_filter(f).map_err(|p| (field.clone(), p))?;
        // The terminal filter decides where the connection goes: sockmesh must be
        // able to read it. Filters before it (stats, metadata exchange, RBAC, …) may
        // be of any type; they are carried without being read.
        if j == last
            && let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type
            && !type_is_known(&any.type_url)
        {
            return Err((
                field,
                format!(
                    "type {} of the terminal filter {:?} is not known to sockmesh (it decides the cluster)",
                    any.type_url, f.name
                ),
            ));
        }
    }
    Ok(())
}

/// Whether the descriptor pool has the message a type URL names.
pub(crate) fn type_is_known(type_url: &str) -> bool {
    let name = type_url.rsplit_once('/').map_or(type_url, |(_, n)| n);
    sockmesh_proto::is_known_message(name)
}

/// Checks a ClusterLoadAssignment: addresses are IPs, ports in 1-65535.
pub fn validate_endpoints(cla: &ClusterLoadAssignment) -> Result<(), InvalidResource> {
    check_endpoints(cla, Addresses::Ips)
}

/// What an endpoint's `socket_address.address` may hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Addresses {
    Ips,
    /// A DNS cluster's: a host name (or an IP).
    Hostnames,
}

fn check_endpoints(cla: &ClusterLoadAssignment, names: Addresses) -> Result<(), InvalidResource> {
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
            // Named only when something is wrong (formatting it for every endpoint
            // took a tenth of a large EDS update).
            let field = || format!("endpoints[{i}].lb_endpoints[{j}]");
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                return Err(InvalidResource::new(
                    "ClusterLoadAssignment",
                    name,
                    format!("{}.endpoint", field()),
                    "missing (named endpoints are not supported)",
                ));
            };
            let Some(sa) = socket_address_of(ep.address.as_ref()) else {
                return Err(InvalidResource::new(
                    "ClusterLoadAssignment",
                    name,
                    format!("{}.endpoint.address.socket_address", field()),
                    "missing (pipe and internal addresses are not supported)",
                ));
            };
            let parsed = match names {
                Addresses::Ips => parse_socket_address(sa).map(drop),
                Addresses::Hostnames => parse_host_port(sa).map(drop),
            };
            parsed.map_err(|(f, p)| {
                InvalidResource::new(
                    "ClusterLoadAssignment",
                    name,
                    format!("{}.endpoint.address.socket_address.{f}", field()),
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
                    format!("{}.load_balancing_weight", field()),
                    "must be at least 1",
                ));
            }
        }
    }
    Ok(())
}

/// Checks a cluster (its inline load assignment, if any). STRICT_DNS and
/// LOGICAL_DNS clusters name their endpoints by host name; a LOGICAL_DNS cluster
/// has exactly one, as Envoy requires.
pub fn validate_cluster(c: &Cluster) -> Result<(), InvalidResource> {
    let bad =
        |field: &str, problem: String| InvalidResource::new("Cluster", &c.name, field, problem);
    if c.name.is_empty() {
        return Err(bad("name", "must not be empty".into()));
    }
    let dns = match &c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => {
            let t = *t;
            if t == cluster::DiscoveryType::LogicalDns as i32 {
                Some(true)
            } else if t == cluster::DiscoveryType::StrictDns as i32 {
                Some(false)
            } else {
                None
            }
        }
        _ => None,
    };
    if super::clusters::cluster_policy(c).policy.is_maglev()
        && let Some(size) = super::clusters::maglev_table_size(c)
        && let Some(problem) = crate::lb::table_size_problem(size)
    {
        let field = if matches!(c.lb_config, Some(cluster::LbConfig::MaglevLbConfig(_))) {
            "maglev_lb_config.table_size"
        } else {
            "load_balancing_policy (Maglev).table_size"
        };
        return Err(bad(field, problem));
    }
    if let Err((field, problem)) = super::outlier::cluster_health(c) {
        return Err(bad(field, problem));
    }
    if let Some(cla) = &c.load_assignment {
        let names = if dns.is_some() {
            Addresses::Hostnames
        } else {
            Addresses::Ips
        };
        check_endpoints(cla, names).map_err(|mut e| {
            e.kind = "Cluster";
            e.name = c.name.clone();
            e.field = format!("load_assignment.{}", e.field);
            e
        })?;
        let hosts: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
        if dns == Some(true) && hosts != 1 {
            return Err(bad(
                "load_assignment",
                format!("a LOGICAL_DNS cluster has exactly one endpoint, not {hosts}"),
            ));
        }
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

pub(crate) fn socket_address_of(a: Option<&Address>) -> Option<&SocketAddress> {
    match a?.address.as_ref()? {
        address::Address::SocketAddress(sa) => Some(sa),
        _ => None,
    }
}

/// (ip, port, protocol) of a socket address, or (field, problem).
pub(crate) fn parse_socket_address(
    sa: &SocketAddress,
) -> Result<(IpAddr, u16, Protocol), (&'static str, String)> {
    let ip: IpAddr = sa
        .address
        .parse()
        .map_err(|_| ("address", format!("{:?} is not an IP address", sa.address)))?;
    let port = port_of(sa)?;
    let protocol = if sa.protocol == socket_address::Protocol::Udp as i32 {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    Ok((ip, port, protocol))
}

/// The port of a socket address (1-65535; named ports are not supported), or
/// (field, problem).
fn port_of(sa: &SocketAddress) -> Result<u16, (&'static str, String)> {
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
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(("port_value", format!("{port} is out of range (1-65535)")))
}

/// (host name, port) of a DNS cluster's endpoint, or (field, problem). The name is
/// checked for DNS syntax (RFC 1123 labels); an IP address is accepted too.
pub(crate) fn parse_host_port(sa: &SocketAddress) -> Result<(String, u16), (&'static str, String)> {
    let host = sa.address.trim_end_matches('.');
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.parse::<IpAddr>().is_err() && (host.len() > 253 || !host.split('.').all(label_ok)) {
        return Err(("address", format!("{:?} is not a host name", sa.address)));
    }
    let port = port_of(sa)?;
    Ok((host.to_owned(), port))
}

/// A network filter's decoded config.
pub(crate) enum NetFilter {
    Tcp(Box<TcpProxy>),
    Http(Box<HttpConnectionManager>),
    Other(String),
}

pub(crate) fn decode_filter(f: &Filter) -> Result<NetFilter, String> {
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

pub(crate) fn decode_udp_proxy(any: &Any) -> Option<UdpProxyConfig> {
    (any.type_url == UDP_PROXY)
        .then(|| UdpProxyConfig::decode(any.value.as_slice()).ok())
        .flatten()
}
