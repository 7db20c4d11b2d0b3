//! The whole translation at once: every listener and cluster, from scratch. Too
//! slow for the agent (about 100 ms at 10,000 services per update); it is the
//! oracle the incremental translation is tested against.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    clusters::{
        ClusterBackends, ClusterSource, ServiceBackends, cluster_backends, cluster_policy,
        cluster_source, service_backends,
    },
    translate::{Resources, listener_services},
};
use crate::lb::levels::LbSettings;
use crate::model::{Health, LbPolicy, RoutingTable, ServiceAddr};

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
    /// Services sent to their original destination (no entry).
    pub passthrough: Vec<ServiceAddr>,
    /// Things ignored on purpose (unsupported features), one line each.
    pub ignored: Vec<String>,
}

/// Translates everything. `previous` (first match wins) supplies the backends of
/// services that are warming, so a service never flaps to empty while its
/// endpoints are on the way.
pub fn translate(res: &Resources, previous: &[&RoutingTable]) -> Translation {
    let mut t = Translation::default();
    let mut specs = Vec::new();
    for (name, l) in res.listeners.iter() {
        let mut notes = super::translate::Notes::default();
        for spec in listener_services(&l.decode(), &res.routes, &mut t.route_names, &mut notes) {
            specs.push((spec.precedence, name, spec));
        }
        t.ignored.extend(notes.ignored);
    }
    // Envoy's original-destination matching decides between listeners that name
    // the same service; among equals the first listener by name wins.
    specs.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut clusters: BTreeMap<String, (ClusterBackends, LbPolicy, Health, LbSettings)> =
        BTreeMap::new();
    for (name, c) in res.clusters.iter() {
        let c = c.decode();
        match cluster_source(&c) {
            Ok(source) => {
                // EDS names of clusters no listener uses are subscribed too (Envoy
                // warms every cluster it knows).
                if let ClusterSource::Eds(eds) = &source {
                    t.eds_names.insert(eds.clone());
                }
                clusters.insert(
                    name.to_owned(),
                    (
                        cluster_backends(name, &source, res),
                        cluster_policy(&c).policy,
                        cluster_policy(&c).health,
                        cluster_policy(&c).settings,
                    ),
                );
            }
            Err(why) => {
                t.ignored.push(format!("Cluster {name:?}: {why}"));
                clusters.insert(
                    name.to_owned(),
                    (
                        ClusterBackends::Backends(std::sync::Arc::default()),
                        cluster_policy(&c).policy,
                        cluster_policy(&c).health,
                        cluster_policy(&c).settings,
                    ),
                );
            }
        }
    }
    let mut defined = BTreeSet::new();
    for (_, _, spec) in specs {
        if !defined.insert(spec.service) || spec.left_alone {
            continue;
        }
        match service_backends(&spec, |name| {
            clusters.get(name).map(|(b, p, h, l)| (b, *p, *h, *l))
        }) {
            ServiceBackends::Warming => {
                t.warming.push(spec.service);
                if let Some(old) = previous.iter().find_map(|t| t.services.get(&spec.service)) {
                    t.table.insert(spec.service, old.clone());
                }
            }
            ServiceBackends::Passthrough => t.passthrough.push(spec.service),
            ServiceBackends::Backends(b) => t.table.insert(spec.service, b),
        }
    }
    t
}
