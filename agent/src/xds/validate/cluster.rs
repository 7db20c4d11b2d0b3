//! Cluster, by the rules of `envoy/config/cluster/v3/cluster.proto` on the fields
//! sockmesh reads, and Envoy's own when it builds the cluster:
//! - `name`: `min_len: 1`; `type`, `lb_policy`, `dns_lookup_family`:
//!   `defined_only`; `connect_timeout`: `gt: 0`;
//! - `dns_refresh_rate`: `gt {nanos: 1000000}` (more than 1 ms: a resolver asked to
//!   refresh every nanosecond would spin); `dns_failure_refresh_rate.base_interval`:
//!   required, more than 1 ms; `max_interval`: more than 1 ms, and not below
//!   `base_interval` (its documentation);
//! - `least_request_lb_config.choice_count` and the `LeastRequest` policy's:
//!   `gte: 2`;
//! - a Maglev `table_size`: `lte: 5000011`, and a prime ("The table size of maglev
//!   must be prime number", `source/extensions/load_balancing_policies/maglev/
//!   maglev_lb.cc`). A prime above the largest table the kernel holds is valid
//!   configuration: the service gets the largest table (see `clusters::maglev`);
//! - a LOGICAL_DNS cluster has exactly one endpoint (`logical_dns_cluster.cc`);
//! - outlier detection (`super::super::outlier`) and the inline load assignment
//!   (`super::endpoints`).

use prost::Message as _;
use sockmesh_proto::pb::envoy::{
    config::cluster::v3::{Cluster, cluster},
    extensions::load_balancing_policies::{least_request::v3::LeastRequest, maglev::v3::Maglev},
};

use super::{
    InvalidResource, above_one_ms,
    endpoints::{Addresses, check_endpoints},
    nanos, show,
};

/// PGV's bound on a Maglev `table_size`.
const MAGLEV_TABLE_SIZE_MAX: u64 = 5_000_011;

/// Checks a cluster (its inline load assignment, if any). STRICT_DNS and
/// LOGICAL_DNS clusters name their endpoints by host name.
pub fn validate_cluster(c: &Cluster) -> Result<(), InvalidResource> {
    let bad =
        |field: &str, problem: String| InvalidResource::new("Cluster", &c.name, field, problem);
    if c.name.is_empty() {
        return Err(bad("name", "must not be empty".into()));
    }
    let dns = match &c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => {
            match cluster::DiscoveryType::try_from(*t) {
                Ok(cluster::DiscoveryType::LogicalDns) => Some(true),
                Ok(cluster::DiscoveryType::StrictDns) => Some(false),
                Ok(_) => None,
                Err(_) => {
                    return Err(bad("type", format!("{t} is not a defined DiscoveryType")));
                }
            }
        }
        _ => None,
    };
    if cluster::LbPolicy::try_from(c.lb_policy).is_err() {
        return Err(bad(
            "lb_policy",
            format!("{} is not a defined LbPolicy", c.lb_policy),
        ));
    }
    if cluster::DnsLookupFamily::try_from(c.dns_lookup_family).is_err() {
        return Err(bad(
            "dns_lookup_family",
            format!("{} is not a defined DnsLookupFamily", c.dns_lookup_family),
        ));
    }
    if let Some(t) = &c.connect_timeout
        && nanos(t) <= 0
    {
        return Err(bad(
            "connect_timeout",
            format!("{} must be greater than 0", show(t)),
        ));
    }
    dns_rates(c).map_err(|(f, p)| bad(&f, p))?;
    lb_config(c).map_err(|(f, p)| bad(&f, p))?;
    if let Err((field, problem)) = crate::xds::outlier::cluster_health(c) {
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
            e.name.clone_from(&c.name);
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

#[expect(
    deprecated,
    reason = "dns_refresh_rate is what istiod sends; its bound is Envoy's"
)]
fn dns_rates(c: &Cluster) -> Result<(), super::Broken> {
    if let Some(rate) = &c.dns_refresh_rate {
        above_one_ms(rate).map_err(|p| ("dns_refresh_rate".to_owned(), p))?;
    }
    if let Some(f) = &c.dns_failure_refresh_rate {
        let Some(base) = &f.base_interval else {
            return Err((
                "dns_failure_refresh_rate.base_interval".into(),
                "is required".into(),
            ));
        };
        above_one_ms(base).map_err(|p| ("dns_failure_refresh_rate.base_interval".to_owned(), p))?;
        if let Some(max) = &f.max_interval {
            above_one_ms(max)
                .map_err(|p| ("dns_failure_refresh_rate.max_interval".to_owned(), p))?;
            if nanos(max) < nanos(base) {
                return Err((
                    "dns_failure_refresh_rate.max_interval".into(),
                    format!("{} is below base_interval {}", show(max), show(base)),
                ));
            }
        }
    }
    Ok(())
}

/// The load-balancing settings sockmesh follows: `choice_count` and a Maglev
/// `table_size`, in `lb_config` or the typed `load_balancing_policy`.
fn lb_config(c: &Cluster) -> Result<(), super::Broken> {
    const LEAST_REQUEST: &str =
        "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest";
    const MAGLEV: &str = "envoy.extensions.load_balancing_policies.maglev.v3.Maglev";
    let choices = |n: u32, field: String| {
        if n < 2 {
            Err((field, format!("{n} is below 2")))
        } else {
            Ok(())
        }
    };
    match &c.lb_config {
        Some(cluster::LbConfig::LeastRequestLbConfig(l)) => {
            if let Some(n) = &l.choice_count {
                choices(n.value, "least_request_lb_config.choice_count".into())?;
            }
        }
        Some(cluster::LbConfig::MaglevLbConfig(m)) => {
            if let Some(size) = &m.table_size {
                table_size(size.value, "maglev_lb_config.table_size".into())?;
            }
        }
        _ => {}
    }
    let policies = c.load_balancing_policy.iter().flat_map(|p| &p.policies);
    for (i, p) in policies.enumerate() {
        let Some(any) = p
            .typed_extension_config
            .as_ref()
            .and_then(|t| t.typed_config.as_ref())
        else {
            continue;
        };
        let at = |f: &str| {
            format!("load_balancing_policy.policies[{i}].typed_extension_config.typed_config.{f}")
        };
        match super::message_name(&any.type_url) {
            LEAST_REQUEST => {
                let l = LeastRequest::decode(any.value.as_slice()).map_err(|e| {
                    (
                        at("").trim_end_matches('.').to_owned(),
                        format!("LeastRequest: {e}"),
                    )
                })?;
                if let Some(n) = &l.choice_count {
                    choices(n.value, at("choice_count"))?;
                }
            }
            MAGLEV => {
                let m = Maglev::decode(any.value.as_slice()).map_err(|e| {
                    (
                        at("").trim_end_matches('.').to_owned(),
                        format!("Maglev: {e}"),
                    )
                })?;
                if let Some(size) = &m.table_size {
                    table_size(size.value, at("table_size"))?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn table_size(size: u64, field: String) -> Result<(), super::Broken> {
    if size > MAGLEV_TABLE_SIZE_MAX {
        return Err((field, format!("{size} exceeds {MAGLEV_TABLE_SIZE_MAX}")));
    }
    if !crate::lb::is_prime(size) {
        return Err((
            field,
            format!("{size} is not a prime (Maglev needs a prime table size)"),
        ));
    }
    Ok(())
}
