//! RouteConfiguration (RDS, and an HTTP connection manager's inline
//! `route_config`), by the rules of `envoy/config/route/v3/route_components.proto`
//! and Envoy's when it builds the route table (`source/common/router/config_impl.cc`):
//! - `VirtualHost.name`: `min_len: 1`; `domains`: `min_items: 1`, no control
//!   characters (`well_known_regex: HTTP_HEADER_VALUE strict: false`), each domain
//!   once across the route's virtual hosts and `*` in one only ("Only unique values
//!   for domains are permitted. Duplicate entry of domain {} in route {}");
//! - `Route.match` required, with a `path_specifier`; an `action` required;
//! - `RouteAction.cluster_specifier` required, `cluster` `min_len: 1`;
//!   `weighted_clusters.clusters` `min_items: 1`, whose weights sum above 0 ("Sum of
//!   weights in the weighted_cluster must be greater than 0.") and within
//!   4294967295 ("The sum of weights of all weighted clusters of route {} exceeds
//!   {}").

use std::collections::BTreeSet;

use sockmesh_proto::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};

use super::{Broken, InvalidResource, WEIGHT_SUM_MAX};

/// Checks a route configuration sent by RDS.
pub fn validate_route(r: &RouteConfiguration) -> Result<(), InvalidResource> {
    let bad = |field: String, problem: String| {
        InvalidResource::new("RouteConfiguration", &r.name, field, problem)
    };
    if r.name.is_empty() {
        return Err(bad("name".into(), "must not be empty".into()));
    }
    check_virtual_hosts(r).map_err(|(f, p)| bad(f, p))
}

/// The virtual hosts' rules: (field, problem).
pub(super) fn check_virtual_hosts(r: &RouteConfiguration) -> Result<(), Broken> {
    let mut domains: BTreeSet<String> = BTreeSet::new();
    for (i, vh) in r.virtual_hosts.iter().enumerate() {
        let at = |f: &str| format!("virtual_hosts[{i}].{f}");
        if vh.name.is_empty() {
            return Err((at("name"), "must not be empty".into()));
        }
        if vh.domains.is_empty() {
            return Err((at("domains"), "must have at least 1 item".into()));
        }
        for (j, d) in vh.domains.iter().enumerate() {
            if d.contains(['\0', '\r', '\n']) {
                return Err((
                    at(&format!("domains[{j}]")),
                    format!("{d:?} holds a control character"),
                ));
            }
            if !domains.insert(d.to_ascii_lowercase()) {
                let problem = if d == "*" {
                    format!(
                        "only a single wildcard domain is permitted in route {:?}",
                        r.name
                    )
                } else {
                    format!(
                        "only unique values for domains are permitted: {d:?} is a duplicate in route {:?}",
                        r.name
                    )
                };
                return Err((at(&format!("domains[{j}]")), problem));
            }
        }
        for (j, rt) in vh.routes.iter().enumerate() {
            let at = |f: &str| at(&format!("routes[{j}].{f}"));
            if rt
                .r#match
                .as_ref()
                .is_none_or(|m| m.path_specifier.is_none())
            {
                return Err((at("match"), "a path specifier is required".into()));
            }
            match &rt.action {
                None => return Err((at("action"), "is required".into())),
                Some(route::Action::Route(ra)) => {
                    route_action(ra).map_err(|(f, p)| (at(&format!("route.{f}")), p))?;
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

fn route_action(
    ra: &sockmesh_proto::pb::envoy::config::route::v3::RouteAction,
) -> Result<(), Broken> {
    match &ra.cluster_specifier {
        None => Err(("cluster_specifier".into(), "is required".into())),
        Some(route_action::ClusterSpecifier::Cluster(c)) if c.is_empty() => {
            Err(("cluster".into(), "must not be empty".into()))
        }
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
            if w.clusters.is_empty() {
                return Err((
                    "weighted_clusters.clusters".into(),
                    "must have at least 1 item".into(),
                ));
            }
            // A cluster without a weight counts as 0 (`ClusterWeight.weight`'s
            // wrapper unset), as Envoy's `clusterWeight()` reads it.
            let sum: u64 = w
                .clusters
                .iter()
                .map(|c| u64::from(c.weight.as_ref().map_or(0, |w| w.value)))
                .sum();
            if sum == 0 {
                return Err((
                    "weighted_clusters".into(),
                    "the sum of the clusters' weights must be greater than 0".into(),
                ));
            }
            if sum > WEIGHT_SUM_MAX {
                return Err((
                    "weighted_clusters".into(),
                    format!("the sum of the clusters' weights exceeds {WEIGHT_SUM_MAX}"),
                ));
            }
            Ok(())
        }
        Some(_) => Ok(()),
    }
}
