//! ClusterLoadAssignment (EDS, and a cluster's inline `load_assignment`), by the
//! rules of `envoy/config/endpoint/v3/endpoint.proto` and
//! `endpoint_components.proto`:
//! - `cluster_name`: `min_len: 1`;
//! - `LbEndpoint.load_balancing_weight` and `LocalityLbEndpoints.load_balancing_weight`:
//!   `gte: 1`;
//! - `LocalityLbEndpoints.priority`: `lte: 128`;
//! - the sum of the endpoints' weights in one locality, and the sum of the
//!   localities' weights at one priority, "must not exceed uint32_t maximal value
//!   (4294967295)" (the fields' documentation; Envoy throws "The sum of weights of
//!   all upstream hosts in a locality exceeds 4294967295" and "The sum of weights of
//!   all localities at the same priority exceeds 4294967295" in
//!   `source/common/upstream/thread_aware_lb_impl.cc`);
//! - `policy.overprovisioning_factor`: `gt: 0`;
//! - a socket address: an IP (a host name for DNS clusters), a port in 1-65535
//!   (port 0 and named ports name no endpoint a socket can reach), a defined
//!   protocol.

use std::collections::BTreeMap;

use sockmesh_proto::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};

use super::{InvalidResource, WEIGHT_SUM_MAX, parse_host_port, parse_socket_address};

/// Checks a ClusterLoadAssignment sent by EDS: addresses are IPs.
pub fn validate_endpoints(cla: &ClusterLoadAssignment) -> Result<(), InvalidResource> {
    check_endpoints(cla, Addresses::Ips)
}

/// What an endpoint's `socket_address.address` may hold.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Addresses {
    Ips,
    /// A DNS cluster's: a host name (or an IP).
    Hostnames,
}

pub(super) fn check_endpoints(
    cla: &ClusterLoadAssignment,
    names: Addresses,
) -> Result<(), InvalidResource> {
    let name = &cla.cluster_name;
    let bad = |field: String, problem: String| {
        InvalidResource::new("ClusterLoadAssignment", name, field, problem)
    };
    if name.is_empty() {
        return Err(bad("cluster_name".into(), "must not be empty".into()));
    }
    if let Some(f) = cla
        .policy
        .as_ref()
        .and_then(|p| p.overprovisioning_factor.as_ref())
        && f.value == 0
    {
        return Err(bad(
            "policy.overprovisioning_factor".into(),
            "must be greater than 0".into(),
        ));
    }
    // Locality weights summed per priority.
    let mut by_priority: BTreeMap<u32, u64> = BTreeMap::new();
    for (i, loc) in cla.endpoints.iter().enumerate() {
        if loc.priority > 128 {
            return Err(bad(
                format!("endpoints[{i}].priority"),
                format!("{} exceeds 128", loc.priority),
            ));
        }
        if let Some(w) = &loc.load_balancing_weight {
            if w.value == 0 {
                return Err(bad(
                    format!("endpoints[{i}].load_balancing_weight"),
                    "must be at least 1".into(),
                ));
            }
            let sum = by_priority.entry(loc.priority).or_default();
            *sum += u64::from(w.value);
            if *sum > WEIGHT_SUM_MAX {
                return Err(bad(
                    format!("endpoints[{i}].load_balancing_weight"),
                    format!(
                        "the localities' weights at priority {} sum past {WEIGHT_SUM_MAX}",
                        loc.priority
                    ),
                ));
            }
        }
        let mut hosts: u64 = 0;
        for (j, lb) in loc.lb_endpoints.iter().enumerate() {
            // Named only when something is wrong (formatting it for every endpoint
            // took a tenth of a large EDS update).
            let field = || format!("endpoints[{i}].lb_endpoints[{j}]");
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                return Err(bad(
                    format!("{}.endpoint", field()),
                    "missing (named endpoints are not supported)".into(),
                ));
            };
            let Some(sa) = super::socket_address_of(ep.address.as_ref()) else {
                return Err(bad(
                    format!("{}.endpoint.address.socket_address", field()),
                    "missing (pipe and internal addresses are not supported)".into(),
                ));
            };
            let parsed = match names {
                Addresses::Ips => parse_socket_address(sa).map(drop),
                Addresses::Hostnames => parse_host_port(sa).map(drop),
            };
            parsed.map_err(|(f, p)| {
                bad(
                    format!("{}.endpoint.address.socket_address.{f}", field()),
                    p,
                )
            })?;
            let weight = lb.load_balancing_weight.as_ref().map_or(1, |w| w.value);
            if weight == 0 {
                return Err(bad(
                    format!("{}.load_balancing_weight", field()),
                    "must be at least 1".into(),
                ));
            }
            hosts += u64::from(weight);
            if hosts > WEIGHT_SUM_MAX {
                return Err(bad(
                    format!("{}.load_balancing_weight", field()),
                    format!("the weights of the locality's endpoints sum past {WEIGHT_SUM_MAX}"),
                ));
            }
        }
    }
    Ok(())
}
