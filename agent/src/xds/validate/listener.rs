//! Listener, by the rules of `envoy/config/listener/v3/*.proto` and of the filters
//! sockmesh reads (`tcp_proxy.proto`, `http_connection_manager.proto`,
//! `udp_proxy.proto`):
//! - a name (LDS keys listeners by it); an IP socket address;
//! - `Filter.name`, `ListenerFilter.name`: `min_len: 1`;
//! - `FilterChainMatch.destination_port`: 1-65535; `prefix_ranges`: an IP and a
//!   `prefix_len` within its family;
//! - TcpProxy: `stat_prefix` `min_len: 1`; `cluster_specifier` required;
//!   `weighted_clusters.clusters` `min_items: 1`, each `name` `min_len: 1` and
//!   `weight` `gte: 1`; `hash_policy` `max_items: 1`;
//! - HttpConnectionManager: `stat_prefix` `min_len: 1`; `route_specifier`
//!   required; an inline `route_config` by the route rules (`super::route`);
//! - a UDP listener's filters are UDP listener filters: Envoy looks a filter's
//!   factory up by its `typed_config` type (`Config::Utility::getAndCheckFactory`),
//!   so a type of another kind (a TcpProxy, say) fails the listener ("Didn't find a
//!   registered implementation"); a UdpProxyConfig: `stat_prefix` `min_len: 1`,
//!   `route_specifier` required, `cluster` `min_len: 1`.
//!
//! A terminal filter sockmesh does not interpret (Dubbo, Thrift, Redis, Kafka,
//! Mongo proxies, an EnvoyFilter's custom filter, a TypedStruct) is valid
//! configuration: the translation leaves its traffic alone (see `translate`).

use std::net::IpAddr;

use prost::Message as _;
use sockmesh_proto::pb::envoy::{
    config::listener::v3::{FilterChain, Listener, listener_filter},
    extensions::filters::network::{
        http_connection_manager::v3::{HttpConnectionManager, http_connection_manager},
        tcp_proxy::v3::{TcpProxy, tcp_proxy},
    },
    extensions::filters::udp::udp_proxy::v3::{UdpProxyConfig, udp_proxy_config},
};

use super::{
    Broken, InvalidResource, NetFilter, UDP_PROXY, decode_filter, parse_socket_address,
    socket_address_of,
};

/// The package of Envoy's UDP listener filters.
const UDP_FILTERS: &str = "envoy.extensions.filters.udp.";

/// Checks a listener the way a NACK needs it: names resource and field.
pub fn validate_listener(l: &Listener) -> Result<(), InvalidResource> {
    let bad =
        |field: &str, problem: String| InvalidResource::new("Listener", &l.name, field, problem);
    if l.name.is_empty() {
        return Err(bad("name", "must not be empty".into()));
    }
    let mut udp = l.udp_listener_config.is_some();
    if let Some(sa) = socket_address_of(l.address.as_ref()) {
        let (_, _, protocol) = parse_socket_address(sa)
            .map_err(|(f, p)| bad(&format!("address.socket_address.{f}"), p))?;
        udp |= protocol == crate::model::Protocol::Udp;
    }
    for (i, f) in l.listener_filters.iter().enumerate() {
        let at = format!("listener_filters[{i}]");
        if f.name.is_empty() {
            return Err(bad(&format!("{at}.name"), "must not be empty".into()));
        }
        if udp && let Some(listener_filter::ConfigType::TypedConfig(any)) = &f.config_type {
            udp_filter(any).map_err(|(field, p)| bad(&format!("{at}.typed_config{field}"), p))?;
        }
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

/// A UDP listener filter's typed config: a UdpProxyConfig by its rules; another
/// UDP filter (a DNS filter, say) is valid and not read; a known type of another
/// kind is not a UDP listener filter. (field below `typed_config`, problem).
fn udp_filter(any: &sockmesh_proto::pb::google::protobuf::Any) -> Result<(), Broken> {
    if any.type_url == UDP_PROXY {
        let u = UdpProxyConfig::decode(any.value.as_slice())
            .map_err(|e| (String::new(), format!("UdpProxyConfig: {e}")))?;
        if u.stat_prefix.is_empty() {
            return Err((".stat_prefix".into(), "must not be empty".into()));
        }
        #[expect(deprecated, reason = "the simple cluster form is the common one")]
        match &u.route_specifier {
            None => return Err((".route_specifier".into(), "is required".into())),
            Some(udp_proxy_config::RouteSpecifier::Cluster(c)) if c.is_empty() => {
                return Err((".cluster".into(), "must not be empty".into()));
            }
            Some(_) => {}
        }
        return Ok(());
    }
    let name = super::message_name(&any.type_url);
    if super::type_is_known(&any.type_url) && !name.starts_with(UDP_FILTERS) {
        return Err((
            String::new(),
            format!("type {} is not a UDP listener filter", any.type_url),
        ));
    }
    Ok(())
}

/// One filter chain's match and filters: (field below the chain, problem).
fn validate_chain(chain: &FilterChain) -> Result<(), Broken> {
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
    for (j, f) in chain.filters.iter().enumerate() {
        if f.name.is_empty() {
            return Err((format!("filters[{j}].name"), "must not be empty".into()));
        }
        let field = format!("filters[{j}].typed_config");
        match decode_filter(f).map_err(|p| (field.clone(), p))? {
            NetFilter::Tcp(t) => tcp_proxy(&t).map_err(|(f, p)| (format!("{field}.{f}"), p))?,
            NetFilter::Http(h) => hcm(&h).map_err(|(f, p)| (format!("{field}.{f}"), p))?,
            NetFilter::Other => {}
        }
    }
    Ok(())
}

fn tcp_proxy(t: &TcpProxy) -> Result<(), Broken> {
    if t.stat_prefix.is_empty() {
        return Err(("stat_prefix".into(), "must not be empty".into()));
    }
    match &t.cluster_specifier {
        None => return Err(("cluster_specifier".into(), "is required".into())),
        Some(tcp_proxy::ClusterSpecifier::Cluster(_)) => {}
        Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
            if w.clusters.is_empty() {
                return Err((
                    "weighted_clusters.clusters".into(),
                    "must have at least 1 item".into(),
                ));
            }
            for (i, c) in w.clusters.iter().enumerate() {
                if c.name.is_empty() {
                    return Err((
                        format!("weighted_clusters.clusters[{i}].name"),
                        "must not be empty".into(),
                    ));
                }
                if c.weight == 0 {
                    return Err((
                        format!("weighted_clusters.clusters[{i}].weight"),
                        "must be at least 1".into(),
                    ));
                }
            }
        }
    }
    if t.hash_policy.len() > 1 {
        return Err((
            "hash_policy".into(),
            format!("{} items: at most 1", t.hash_policy.len()),
        ));
    }
    Ok(())
}

fn hcm(h: &HttpConnectionManager) -> Result<(), Broken> {
    if h.stat_prefix.is_empty() {
        return Err(("stat_prefix".into(), "must not be empty".into()));
    }
    match &h.route_specifier {
        None => Err(("route_specifier".into(), "is required".into())),
        Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
            super::route::check_virtual_hosts(rc).map_err(|(f, p)| (format!("route_config.{f}"), p))
        }
        Some(_) => Ok(()),
    }
}
