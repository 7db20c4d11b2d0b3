//! Node-local limits: what of the accepted configuration the kernel's maps take.
//!
//! A limit of this node (a service's endpoint count, a map's capacity) is not
//! invalid configuration: the control plane cannot change a node's map sizes, and
//! NACKing would freeze the service at its last version (which decays to dead pod
//! IPs during a rollout) and drop the unrelated resources of the same response. So
//! the configuration is accepted and the node programs what fits:
//!
//! - A service with more endpoints than `MAX_BACKENDS_PER_SERVICE` gets the subset
//!   [`subset`] keeps: its active endpoints first, ranked by rendezvous hashing
//!   with a per-node seed (see [`subset`] for why that choice is safe during a
//!   rollout).
//! - When the maps are full, the changes are taken in the map writer's own order
//!   (`model::write_order`: removals, then services by growth, smallest first,
//!   address order among equals), each if the maps hold it at that point of the
//!   write (a rewritten service's new entries coexist with its old ones). A service
//!   already in the kernel whose new version does not fit gets the largest subset
//!   of its new endpoints that does, or, if none does, keeps its previous version;
//!   a service not in the kernel waits outside it (no entry). A service in the
//!   kernel is never pushed out by another.
//! - Every limited service is listed (`/config_dump` `limited`, `/readyz`,
//!   `sockmesh_services_limited`), logged when it becomes limited and when it fits
//!   again, and retried whenever an update frees room, so it heals by itself.

use std::collections::BTreeMap;

use sockmesh_common::MAX_BACKENDS_PER_SERVICE;

use crate::model::{
    BackendState, Changes, Limits, RoutingTable, Service, ServiceAddr, Usage, write_order,
};

/// How a service is limited by the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Limit {
    /// More endpoints than one service may have: the [`subset`] of
    /// `MAX_BACKENDS_PER_SERVICE` is programmed.
    Endpoints,
    /// The maps had no room for all of its endpoints: a subset that fits is
    /// programmed.
    Room,
    /// The maps had no room for its new version: the previous one stays.
    Stale,
    /// The maps had no room for it: it has no entry (connections go where they
    /// were sent) until room returns.
    LeftOut,
}

impl Limit {
    /// The label of `sockmesh_services_limited` and `/config_dump`.
    pub fn label(&self) -> &'static str {
        match self {
            Limit::Endpoints => "endpoints_subset",
            Limit::Room => "capacity_subset",
            Limit::Stale => "capacity_stale",
            Limit::LeftOut => "capacity_left_out",
        }
    }
}

/// A service the node programs otherwise than the configuration asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limited {
    pub limit: Limit,
    /// The endpoints the configuration gives it.
    pub endpoints: usize,
    /// The endpoints programmed (0: none, or its previous version's).
    pub programmed: usize,
    /// The map whose capacity was reached, as the capacity check words it.
    pub why: String,
    /// What it should be once room returns (after the endpoint subset).
    desired: Service,
}

/// The rendezvous score of an endpoint for this node.
fn score(seed: u64, b: &crate::model::Backend) -> u64 {
    let mut key = [0u8; 18];
    let ip = match b.address {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    key[..16].copy_from_slice(&ip);
    key[16..].copy_from_slice(&b.port.to_be_bytes());
    xxhash_rust::xxh3::xxh3_64_with_seed(&key, seed)
}

/// `service` with at most `keep` of its endpoints: the active ones first, then
/// the draining ones, each by descending rendezvous score (`seed`: this node's),
/// in their original order.
///
/// Why this choice is safe, also during a rollout:
/// - only the endpoints the control plane lists now are candidates: one it
///   removed leaves the subset at once, so the subset never holds a dead pod the
///   control plane knows of;
/// - active endpoints come first: a draining or unhealthy one is kept only in
///   room the active ones leave (its established connections are translated back
///   while it stays);
/// - rendezvous hashing moves the least: an endpoint added or removed changes the
///   subset by that endpoint and at most one other; a rollout's new pods enter as
///   they become active and its old pods leave as they drain or go, and the
///   connections of the endpoints that stay are not reshuffled;
/// - the seed is this node's: each node keeps a different subset, so across the
///   mesh every endpoint is used (a fixed choice, the lowest addresses say, would
///   send every node's traffic to the same few and none to the rest);
/// - the same node and endpoints give the same subset, across restarts.
pub fn subset(service: &Service, keep: usize, seed: u64) -> Service {
    if service.backends.len() <= keep {
        return service.clone();
    }
    let mut ranked: Vec<(bool, u64, usize)> = service
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            (
                b.state != BackendState::Active,
                u64::MAX - score(seed, b),
                i,
            )
        })
        .collect();
    ranked.sort_unstable();
    let mut kept: Vec<usize> = ranked.into_iter().take(keep).map(|(_, _, i)| i).collect();
    kept.sort_unstable();
    let backends: Vec<crate::model::Backend> = kept.iter().map(|&i| service.backends[i]).collect();
    let levels = service
        .levels
        .as_deref()
        .map(|l| crate::lb::levels::retain(l, &kept, &backends));
    Service {
        backends: backends.into(),
        ..service.clone()
    }
    .with_levels(levels)
}

/// What the maps hold, and what bounds them.
pub struct Maps<'a> {
    pub table: &'a RoutingTable,
    pub usage: Usage,
    pub limits: Limits,
    /// This node's rendezvous seed.
    pub seed: u64,
}

/// What [`fit`] decided.
pub struct Fitted {
    /// What to write: services with their programmed version, `None` removed.
    pub changes: Changes,
    /// What the table takes of the maps once written.
    pub usage: Usage,
}

/// Whether `cur` plus a service's new version `new`, written beside its old one
/// `old`, fits: the writer's peak at that step (services and Maglev tables take no
/// transient: a service value is rewritten in place, and the Maglev map has room
/// for one table more than its limit).
fn fits(cur: &Usage, new: &Usage, old: Option<&Usage>, limits: &Limits) -> bool {
    let old = old.copied().unwrap_or_default();
    (cur.services + new.services).saturating_sub(old.services) <= limits.services as usize
        && cur.backends + new.backends <= limits.backends as usize
        && cur.slots + new.slots <= limits.slots as usize
        && (cur.maglev + new.maglev).saturating_sub(old.maglev) <= limits.maglev as usize
}

/// Decides what of `wanted` (each changed service's configured version, `None`
/// removed) the maps take, and updates `limited`. With `heal`, the services
/// limited by room are tried again too.
pub fn fit(
    maps: &Maps<'_>,
    wanted: Changes,
    limited: &mut BTreeMap<ServiceAddr, Limited>,
    heal: bool,
) -> Fitted {
    let max = MAX_BACKENDS_PER_SERVICE as usize;
    // Each changed service's programmable version, and its endpoint count.
    let mut candidates: Changes = Changes::new();
    let mut endpoints: BTreeMap<ServiceAddr, usize> = BTreeMap::new();
    for (s, c) in wanted {
        limited.remove(&s);
        if let Some(svc) = &c {
            endpoints.insert(s, svc.len());
        }
        candidates.insert(s, c.map(|svc| subset(&svc, max, maps.seed)));
    }
    if heal {
        for (s, l) in limited.iter() {
            if l.limit != Limit::Endpoints && !candidates.contains_key(s) {
                endpoints.insert(*s, l.endpoints);
                candidates.insert(*s, Some(l.desired.clone()));
            }
        }
        limited.retain(|_, l| l.limit == Limit::Endpoints);
    }
    // What the endpoint limit alone leaves.
    for (s, c) in &candidates {
        if let Some(svc) = c
            && endpoints.get(s).is_some_and(|n| *n > svc.len())
        {
            limited.insert(
                *s,
                limited_as(Limit::Endpoints, svc, endpoints[s], svc.len(), ""),
            );
        }
    }
    candidates.retain(|s, c| maps.table.services.get(s) != c.as_ref());
    let before = |s: &ServiceAddr| maps.table.services.get(s).map(Usage::of_service);
    let (after, transient) = maps.usage.after(&candidates, before);
    if maps.limits.check(&after, &transient).is_ok() {
        return Fitted {
            changes: candidates,
            usage: after,
        };
    }
    let mut admitted = Changes::new();
    let mut cur = maps.usage;
    for step in write_order(&candidates, before) {
        let s = *step.service;
        let (Some(service), Some(new)) = (step.backends, step.new) else {
            // A removal frees room.
            if let Some(old) = step.old {
                cur = cur.minus(&old);
            }
            admitted.insert(s, None);
            continue;
        };
        let n = endpoints.get(&s).copied().unwrap_or(service.len());
        if fits(&cur, &new, step.old.as_ref(), &maps.limits) {
            cur = cur.plus(&new).minus(&step.old.unwrap_or_default());
            admitted.insert(s, Some(service.clone()));
            continue;
        }
        let why = full_map(&cur, &new, step.old.as_ref(), &maps.limits);
        let Some(old) = step.old else {
            limited.insert(s, limited_as(Limit::LeftOut, service, n, 0, &why));
            continue;
        };
        match largest_fitting(service, &cur, &old, maps) {
            Some(sub) => {
                let used = Usage::of_service(&sub);
                cur = cur.plus(&used).minus(&old);
                let mut l = limited_as(Limit::Room, service, n, sub.len(), &why);
                l.desired = service.clone();
                limited.insert(s, l);
                admitted.insert(s, Some(sub));
            }
            None => {
                let programmed = maps.table.services.get(&s).map_or(0, |p| p.len());
                limited.insert(s, limited_as(Limit::Stale, service, n, programmed, &why));
            }
        }
    }
    // The writer's own check over what was admitted: it holds by construction;
    // were it ever not to, the growing changes wait, last first.
    loop {
        let (after, transient) = maps.usage.after(&admitted, before);
        if maps.limits.check(&after, &transient).is_ok() {
            return Fitted {
                changes: admitted,
                usage: after,
            };
        }
        let last = write_order(&admitted, before)
            .last()
            .filter(|step| step.new.is_some())
            .map(|step| *step.service);
        let Some(s) = last else {
            // Removals alone always fit.
            return Fitted {
                changes: admitted,
                usage: after,
            };
        };
        tracing::error!(service = %s, "capacity fit overshot the writer's check; the service waits");
        if let Some(Some(service)) = admitted.remove(&s) {
            let limit = if maps.table.services.contains_key(&s) {
                Limit::Stale
            } else {
                Limit::LeftOut
            };
            let n = endpoints.get(&s).copied().unwrap_or(service.len());
            limited.insert(s, limited_as(limit, &service, n, 0, "the maps' capacity"));
        }
    }
}

fn limited_as(
    limit: Limit,
    desired: &Service,
    endpoints: usize,
    programmed: usize,
    why: &str,
) -> Limited {
    Limited {
        limit,
        endpoints,
        programmed,
        why: why.to_owned(),
        desired: desired.clone(),
    }
}

/// Which map `new` (beside `old`) does not fit in, as the capacity check words
/// it.
fn full_map(cur: &Usage, new: &Usage, old: Option<&Usage>, limits: &Limits) -> String {
    let old = old.copied().unwrap_or_default();
    let after = cur.plus(new).minus(&old);
    // The old version's entries are still there while the new one is written.
    let transient = Usage {
        backends: old.backends,
        slots: old.slots,
        ..Usage::default()
    };
    limits
        .check(&after, &transient)
        .err()
        .map_or_else(|| "the maps' capacity".to_owned(), |e| e.to_string())
}

/// The largest subset of `service` (by [`subset`]'s order, bisected) that fits
/// beside its `old` version, if any subset of at least one endpoint does.
fn largest_fitting(
    service: &Service,
    cur: &Usage,
    old: &Usage,
    maps: &Maps<'_>,
) -> Option<Service> {
    let fits_k = |k: usize| {
        let sub = subset(service, k, maps.seed);
        fits(cur, &Usage::of_service(&sub), Some(old), &maps.limits).then_some(sub)
    };
    let (mut lo, mut hi) = (1usize, service.len().saturating_sub(1));
    let mut best = None;
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        match fits_k(mid) {
            Some(sub) => {
                best = Some(sub);
                lo = mid + 1;
            }
            None => hi = mid - 1,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::Backend;

    fn service(n: u32, draining: &[u32]) -> Service {
        let backends: Vec<Backend> = (0..n)
            .map(|i| {
                let b = Backend::new(
                    std::net::IpAddr::from([10, 2, (i / 250) as u8, (i % 250) as u8 + 1]),
                    8080,
                );
                if draining.contains(&i) {
                    b.draining()
                } else {
                    b
                }
            })
            .collect();
        Service::from(backends)
    }

    fn set(s: &Service) -> BTreeSet<(std::net::IpAddr, u16)> {
        s.iter().map(|b| (b.address, b.port)).collect()
    }

    /// The properties that make the subset safe during a rollout, checked on the
    /// sets themselves (not on the hash): its size, active endpoints first, the
    /// least change when one endpoint comes or goes, another subset on another
    /// node, the same one again on the same node.
    #[test]
    fn the_subset_keeps_active_endpoints_moves_the_least_and_differs_per_node() {
        let all = service(150, &[3, 4, 5]);
        let kept = subset(&all, 100, 7);
        assert_eq!(kept.len(), 100);
        assert!(
            kept.iter().all(|b| b.state == BackendState::Active),
            "active first"
        );
        assert_eq!(subset(&all, 100, 7), kept, "deterministic");
        let other = subset(&all, 100, 8);
        assert_ne!(set(&other), set(&kept), "another node keeps another subset");
        // A kept endpoint removed: exactly one other takes its place.
        let gone = *kept.iter().next().expect("one");
        let mut without = all.clone();
        without.backends = all.iter().filter(|b| **b != gone).copied().collect();
        let after = subset(&without, 100, 7);
        let before = set(&kept);
        assert_eq!(before.difference(&set(&after)).count(), 1);
        assert_eq!(set(&after).difference(&before).count(), 1);
        // An endpoint added: in by at most one, out by at most one.
        let mut with = all.clone();
        with.backends = all
            .iter()
            .copied()
            .chain([Backend::new([10, 9, 9, 9].into(), 8080)])
            .collect();
        let after = subset(&with, 100, 7);
        assert!(set(&after).difference(&before).count() <= 1);
        assert!(before.difference(&set(&after)).count() <= 1);
        // Draining endpoints fill room the active ones leave.
        let few = service(10, &[0, 1]);
        let kept = subset(&few, 9, 7);
        assert_eq!(
            kept.iter()
                .filter(|b| b.state == BackendState::Draining)
                .count(),
            1
        );
        // Across 100 nodes every active endpoint is in some subset (a fixed choice
        // would leave 47 out on every node); the 3 draining ones in none.
        let used: BTreeSet<_> = (0..100u64)
            .flat_map(|seed| set(&subset(&all, 100, seed)))
            .collect();
        assert_eq!(used.len(), 147);
    }
}
