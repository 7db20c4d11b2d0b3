//! Validation of Envoy resources, done when they arrive, by Envoy's own rules: the
//! `validate` annotations (protoc-gen-validate) of the fields sockmesh reads, and
//! the rules Envoy applies when it builds a listener, cluster or route from them
//! (each cited where it is checked). What a NACK reports names the resource and the
//! field (`ClusterLoadAssignment "web": endpoints[0].lb_endpoints[3].endpoint.
//! address.socket_address.port_value: 70000 is out of range (1-65535)`).
//!
//! Also the small decoders the translation shares: socket addresses and network
//! filters.

mod cluster;
mod endpoints;
mod listener;
mod route;

use std::net::IpAddr;

use prost::Message as _;
use sockmesh_proto::pb::{
    envoy::{
        config::{
            core::v3::{Address, SocketAddress, address, socket_address},
            listener::v3::{Filter, filter},
        },
        extensions::filters::{
            network::{
                http_connection_manager::v3::HttpConnectionManager, tcp_proxy::v3::TcpProxy,
            },
            udp::udp_proxy::v3::UdpProxyConfig,
        },
    },
    google::protobuf::{Any, Duration},
};

pub use self::{
    cluster::validate_cluster, endpoints::validate_endpoints, listener::validate_listener,
    route::validate_route,
};
use crate::model::Protocol;

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

/// A rule broken below some message: (field path from that message, problem). The
/// caller prefixes the path and names the resource.
type Broken = (String, String);

/// `u32::MAX`, the bound Envoy puts on sums of weights (4294967295).
const WEIGHT_SUM_MAX: u64 = u32::MAX as u64;

/// Whether the descriptor pool has the message a type URL names.
pub(crate) fn type_is_known(type_url: &str) -> bool {
    sockmesh_proto::is_known_message(message_name(type_url))
}

/// The message name of a type URL (`type.googleapis.com/a.b.C` → `a.b.C`).
pub(crate) fn message_name(type_url: &str) -> &str {
    type_url.rsplit_once('/').map_or(type_url, |(_, n)| n)
}

/// A protobuf duration in nanoseconds (seconds and nanos as sent, so a negative or
/// malformed one compares as what it says).
fn nanos(d: &Duration) -> i128 {
    i128::from(d.seconds) * 1_000_000_000 + i128::from(d.nanos)
}

/// A duration as Envoy prints it in proto3 JSON (`0.000001s`).
fn show(d: &Duration) -> String {
    let n = nanos(d);
    let sign = if n < 0 { "-" } else { "" };
    let n = n.unsigned_abs();
    let (s, frac) = (n / 1_000_000_000, n % 1_000_000_000);
    if frac == 0 {
        format!("{sign}{s}s")
    } else {
        let digits = format!("{frac:09}");
        format!("{sign}{s}.{}s", digits.trim_end_matches('0'))
    }
}

/// `(validate.rules).duration = {gt {nanos: 1000000}}`: more than one millisecond.
fn above_one_ms(d: &Duration) -> Result<(), String> {
    if nanos(d) > 1_000_000 {
        Ok(())
    } else {
        Err(format!("{} must be greater than 1ms", show(d)))
    }
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
    let protocol = protocol_of(sa)?;
    Ok((ip, port, protocol))
}

/// `SocketAddress.protocol`, `(validate.rules).enum = {defined_only: true}`.
fn protocol_of(sa: &SocketAddress) -> Result<Protocol, (&'static str, String)> {
    match socket_address::Protocol::try_from(sa.protocol) {
        Ok(socket_address::Protocol::Udp) => Ok(Protocol::Udp),
        Ok(socket_address::Protocol::Tcp) => Ok(Protocol::Tcp),
        Err(_) => Err((
            "protocol",
            format!("{} is not a defined SocketAddress.Protocol", sa.protocol),
        )),
    }
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
        .ok_or_else(|| ("port_value", format!("{port} is out of range (1-65535)")))
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
    protocol_of(sa)?;
    Ok((host.to_owned(), port))
}

/// A network filter's decoded config.
pub(crate) enum NetFilter {
    Tcp(Box<TcpProxy>),
    Http(Box<HttpConnectionManager>),
    /// A filter sockmesh does not interpret.
    Other,
}

pub(crate) fn decode_filter(f: &Filter) -> Result<NetFilter, String> {
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        return Ok(NetFilter::Other);
    };
    match any.type_url.as_str() {
        TCP_PROXY => TcpProxy::decode(any.value.as_slice())
            .map(|t| NetFilter::Tcp(Box::new(t)))
            .map_err(|e| format!("TcpProxy: {e}")),
        HCM => HttpConnectionManager::decode(any.value.as_slice())
            .map(|h| NetFilter::Http(Box::new(h)))
            .map_err(|e| format!("HttpConnectionManager: {e}")),
        _ => Ok(NetFilter::Other),
    }
}

pub(crate) fn decode_udp_proxy(any: &Any) -> Option<UdpProxyConfig> {
    (any.type_url == UDP_PROXY)
        .then(|| UdpProxyConfig::decode(any.value.as_slice()).ok())
        .flatten()
}

#[cfg(test)]
mod tests;
