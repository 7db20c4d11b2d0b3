//! Clusters → backends: where a cluster's endpoints come from (EDS, inline,
//! resolved host names, or the original destination), each endpoint with its EDS
//! health and its place in the assignment (priority, locality), Envoy's priority
//! and locality arithmetic over them (`lb::levels`), and weighted clusters
//! combined into one backend list.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use prost::Message as _;
use sockmesh_proto::pb::envoy::{
    config::{
        cluster::v3::{Cluster, cluster},
        core::v3::{HealthStatus, SocketAddress, address},
        endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
    },
    extensions::network::dns_resolver::cares::v3::CaresDnsResolverConfig,
};

use super::{
    resources::Resources,
    validate::{parse_host_port, parse_socket_address, socket_address_of},
};
use crate::{
    lb::levels::{LbSettings, plan},
    model::{Backend, BackendState, Health, LbPolicy, Placement, Service},
};

/// The c-ares resolver config (`typed_dns_resolver_config`), the only one Envoy
/// ships on Linux.
const CARES: &str =
    "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig";

/// Envoy's default `dns_refresh_rate`.
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);

/// Which address families a DNS cluster asks for (`dns_lookup_family`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DnsFamily {
    /// IPv6, falling back to IPv4 when a name has no IPv6 address (Envoy's AUTO).
    #[default]
    Auto,
    V4Only,
    V6Only,
    /// IPv4, falling back to IPv6.
    V4Preferred,
    /// Both.
    All,
}

/// What the agent resolves for a STRICT_DNS or LOGICAL_DNS cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsTarget {
    /// Host names of its endpoints (IP literals need no resolution).
    pub hosts: BTreeSet<String>,
    pub family: DnsFamily,
    /// `dns_refresh_rate` (default 5 s).
    pub refresh: Duration,
    /// `respect_dns_ttl`: refresh when the answer's TTL runs out instead.
    pub respect_ttl: bool,
    /// `dns_failure_refresh_rate`: after a failed resolution, retry after `base`,
    /// doubling up to `max` while failures go on (default: `refresh` and 10× it).
    pub failure_base: Duration,
    pub failure_max: Duration,
    /// Name servers from `typed_dns_resolver_config` (c-ares `resolvers`) or the
    /// deprecated `dns_resolvers`; empty: the node's `/etc/resolv.conf`.
    pub resolvers: Vec<SocketAddr>,
}

/// The last good answers for one cluster's host names.
pub type DnsAnswers = BTreeMap<String, Vec<IpAddr>>;

/// Where a cluster's endpoints come from.
#[derive(Debug)]
pub enum ClusterSource<'a> {
    /// EDS, under this service name.
    Eds(String),
    /// Inline (STATIC), if any.
    Static(Option<&'a ClusterLoadAssignment>),
    /// ORIGINAL_DST: a connection goes to the address the client asked for.
    OriginalDst,
    /// Host names the agent resolves; `logical` (LOGICAL_DNS) uses only the first
    /// address of its one host.
    Dns {
        target: DnsTarget,
        assignment: Option<&'a ClusterLoadAssignment>,
        logical: bool,
    },
}

/// A cluster's endpoints as they stand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterBackends {
    /// Not known yet: EDS not received, names not resolved yet.
    Warming,
    /// The original destination (ORIGINAL_DST).
    Passthrough,
    /// An EDS cluster's are its assignment's, shared with the store.
    Backends(Arc<[Backend]>),
}

/// Where a cluster's endpoints come from. Other discovery types (custom cluster
/// types) are not supported: the error says why.
pub fn cluster_source(c: &Cluster) -> Result<ClusterSource<'_>, String> {
    use cluster::DiscoveryType as T;
    let ty = match &c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => T::try_from(*t).ok(),
        Some(cluster::ClusterDiscoveryType::ClusterType(ct)) => {
            return Err(format!("custom cluster type {} is not supported", ct.name));
        }
        None => Some(T::Static),
    };
    match ty {
        Some(T::Eds) => {
            let name = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.as_str())
                .filter(|n| !n.is_empty())
                .unwrap_or(&c.name);
            Ok(ClusterSource::Eds(name.to_owned()))
        }
        Some(T::Static) => Ok(ClusterSource::Static(c.load_assignment.as_ref())),
        Some(T::OriginalDst) => Ok(ClusterSource::OriginalDst),
        Some(t @ (T::StrictDns | T::LogicalDns)) => Ok(ClusterSource::Dns {
            target: dns_target(c),
            assignment: c.load_assignment.as_ref(),
            logical: t == T::LogicalDns,
        }),
        None => Err("unknown discovery type".into()),
    }
}

#[expect(
    deprecated,
    reason = "dns_refresh_rate, respect_dns_ttl and dns_resolvers are what istiod sends"
)]
fn dns_target(c: &Cluster) -> DnsTarget {
    use cluster::DnsLookupFamily as F;
    let mut hosts = BTreeSet::new();
    for ep in endpoints_of(c.load_assignment.as_ref()) {
        if let Some(sa) = socket_address_of(ep.address.as_ref())
            && sa.address.parse::<IpAddr>().is_err()
            && let Ok((host, _)) = parse_host_port(sa)
        {
            hosts.insert(host);
        }
    }
    let family = match F::try_from(c.dns_lookup_family) {
        Ok(F::V4Only) => DnsFamily::V4Only,
        Ok(F::V6Only) => DnsFamily::V6Only,
        Ok(F::V4Preferred) => DnsFamily::V4Preferred,
        Ok(F::All) => DnsFamily::All,
        Ok(F::Auto) | Err(_) => DnsFamily::Auto,
    };
    let refresh = duration(c.dns_refresh_rate.as_ref()).unwrap_or(DEFAULT_DNS_REFRESH);
    let failure = c.dns_failure_refresh_rate.as_ref();
    let failure_base = failure
        .and_then(|f| duration(f.base_interval.as_ref()))
        .unwrap_or(refresh);
    let failure_max = failure
        .and_then(|f| duration(f.max_interval.as_ref()))
        .filter(|m| *m >= failure_base)
        .unwrap_or(failure_base.saturating_mul(10));
    let socket = |a: &SocketAddress| -> Option<SocketAddr> {
        let ip: IpAddr = a.address.parse().ok()?;
        let port = match a.port_specifier {
            Some(sockmesh_proto::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => {
                u16::try_from(p).ok().filter(|p| *p != 0)?
            }
            _ => 53,
        };
        Some(SocketAddr::new(ip, port))
    };
    let mut resolvers: Vec<SocketAddr> = c
        .typed_dns_resolver_config
        .as_ref()
        .and_then(|t| t.typed_config.as_ref())
        .filter(|any| any.type_url == CARES)
        .and_then(|any| CaresDnsResolverConfig::decode(any.value.as_slice()).ok())
        .map(|cares| {
            cares
                .resolvers
                .iter()
                .filter_map(|a| match a.address.as_ref()? {
                    address::Address::SocketAddress(sa) => socket(sa),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if resolvers.is_empty() {
        resolvers = c
            .dns_resolvers
            .iter()
            .filter_map(|a| match a.address.as_ref()? {
                address::Address::SocketAddress(sa) => socket(sa),
                _ => None,
            })
            .collect();
    }
    DnsTarget {
        hosts,
        family,
        refresh,
        respect_ttl: c.respect_dns_ttl,
        failure_base,
        failure_max,
        resolvers,
    }
}

/// A positive protobuf duration (zero, negative or beyond the protobuf range of
/// 315,576,000,000 s: `None`).
fn duration(d: Option<&sockmesh_proto::pb::google::protobuf::Duration>) -> Option<Duration> {
    let d = d?;
    let secs = u64::try_from(d.seconds)
        .ok()
        .filter(|s| *s <= 315_576_000_000)?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(Duration::new(secs, nanos)).filter(|d| !d.is_zero())
}

fn endpoints_of(
    cla: Option<&ClusterLoadAssignment>,
) -> impl Iterator<Item = &sockmesh_proto::pb::envoy::config::endpoint::v3::Endpoint> {
    cla.into_iter()
        .flat_map(|c| &c.endpoints)
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|lb| match &lb.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => Some(ep),
            _ => None,
        })
}

/// A cluster's backends from the accepted resources (and, for a DNS cluster, the
/// last good answers in `res.dns`).
pub fn cluster_backends(
    name: &str,
    source: &ClusterSource<'_>,
    res: &Resources,
) -> ClusterBackends {
    match source {
        ClusterSource::Eds(eds) => res
            .endpoints
            .get(eds)
            .map_or(ClusterBackends::Warming, |e| {
                ClusterBackends::Backends(e.backends.clone())
            }),
        ClusterSource::Static(cla) => {
            ClusterBackends::Backends(cla.map(assignment_backends).unwrap_or_default().into())
        }
        ClusterSource::OriginalDst => ClusterBackends::Passthrough,
        ClusterSource::Dns {
            target,
            assignment,
            logical,
        } => {
            let answers = res.dns.get(name);
            if target
                .hosts
                .iter()
                .any(|h| answers.is_none_or(|a| !a.contains_key(h)))
            {
                return ClusterBackends::Warming;
            }
            let empty = DnsAnswers::new();
            let answers = answers.unwrap_or(&empty);
            let backends = assignment.map_or_else(Vec::new, |cla| {
                backends_with(cla, |sa| {
                    let (host, port) = parse_host_port(sa).ok()?;
                    let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
                        Ok(ip) => vec![ip],
                        Err(_) => answers.get(&host).cloned().unwrap_or_default(),
                    };
                    let take = if *logical { 1 } else { addrs.len() };
                    Some(addrs.into_iter().take(take).map(|ip| (ip, port)).collect())
                })
            });
            ClusterBackends::Backends(backends.into())
        }
    }
}

/// The endpoints of a load assignment, each with its EDS health class as its
/// state (HEALTHY/UNKNOWN active, DEGRADED, UNHEALTHY/TIMEOUT unhealthy,
/// DRAINING draining), its own `load_balancing_weight` and its placement;
/// `lb::levels::plan` applies Envoy's arithmetic to them with the cluster's
/// settings.
pub fn assignment_backends(cla: &ClusterLoadAssignment) -> Vec<Backend> {
    backends_with(cla, |sa| {
        parse_socket_address(sa)
            .ok()
            .map(|(ip, port, _)| vec![(ip, port)])
    })
}

/// Where an assignment places an endpoint: its priority and its locality,
/// `region/zone/sub_zone` (as `/config_dump` shows the node's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub priority: u32,
    pub locality: String,
}

/// The names (`region/zone/sub_zone`) of an assignment's localities, by the
/// index its backends' [`Placement::locality`] gives (see [`localities`]);
/// empty when none has a name.
pub fn locality_names(cla: &ClusterLoadAssignment) -> Box<[Box<str>]> {
    let localities = localities(cla);
    if localities
        .keys()
        .all(|(_, r, z, s)| r.is_empty() && z.is_empty() && s.is_empty())
    {
        return Box::default();
    }
    let mut names: Vec<(u16, Box<str>)> = localities
        .into_iter()
        .map(|((_, r, z, s), (i, _))| (i, format!("{r}/{z}/{s}").into()))
        .collect();
    names.sort_unstable_by_key(|(i, _)| *i);
    names.into_iter().map(|(_, n)| n).collect()
}

/// The place of each of an assignment's endpoints with an IP address, by
/// address and port (the first entry of an address, as Envoy keeps it):
/// `backends` as [`assignment_backends`] reads them, their localities named by
/// `names` ([`locality_names`]).
pub fn places(backends: &[Backend], names: &[Box<str>]) -> BTreeMap<(IpAddr, u16), Place> {
    let mut out = BTreeMap::new();
    for b in backends {
        out.entry((b.address, b.port)).or_insert_with(|| Place {
            priority: u32::from(b.placement.priority),
            locality: names
                .get(usize::from(b.placement.locality))
                .map_or_else(|| "//".to_owned(), |n| n.to_string()),
        });
    }
    out
}

/// [`places`] of an assignment read whole.
pub fn endpoint_places(cla: &ClusterLoadAssignment) -> BTreeMap<(IpAddr, u16), Place> {
    places(&assignment_backends(cla), &locality_names(cla))
}

/// An assignment's localities, each with its index (in the order first seen)
/// and its `load_balancing_weight` (0: unset). Entries of one priority with the
/// same locality are one locality (Envoy merges them; the last weight set wins).
fn localities(cla: &ClusterLoadAssignment) -> BTreeMap<(u32, String, String, String), (u16, u32)> {
    let mut localities: BTreeMap<(u32, String, String, String), (u16, u32)> = BTreeMap::new();
    for loc in &cla.endpoints {
        let l = loc.locality.clone().unwrap_or_default();
        let next = u16::try_from(localities.len()).unwrap_or(u16::MAX);
        let entry = localities
            .entry((loc.priority, l.region, l.zone, l.sub_zone))
            .or_insert((next, 0));
        if let Some(w) = &loc.load_balancing_weight {
            entry.1 = w.value;
        }
    }
    localities
}

/// [`assignment_backends`] with each endpoint's socket address turned into
/// addresses by `addresses` (one for an IP; the resolved ones for a host name).
fn backends_with(
    cla: &ClusterLoadAssignment,
    addresses: impl Fn(&SocketAddress) -> Option<Vec<(IpAddr, u16)>>,
) -> Vec<Backend> {
    let state = |s: i32| match HealthStatus::try_from(s) {
        Ok(HealthStatus::Unknown | HealthStatus::Healthy) | Err(_) => BackendState::Active,
        Ok(HealthStatus::Degraded) => BackendState::Degraded,
        Ok(HealthStatus::Draining) => BackendState::Draining,
        Ok(HealthStatus::Unhealthy | HealthStatus::Timeout) => BackendState::Unhealthy,
    };
    // Envoy's default overprovisioning factor is 140 (percent).
    let overprovisioning = cla
        .policy
        .as_ref()
        .and_then(|p| p.overprovisioning_factor.as_ref())
        .map_or(crate::model::DEFAULT_OVERPROVISIONING, |f| {
            u16::try_from(f.value).unwrap_or(u16::MAX)
        });
    let localities = localities(cla);
    let mut out = Vec::new();
    for loc in &cla.endpoints {
        let l = loc.locality.clone().unwrap_or_default();
        let (locality, locality_weight) = localities
            .get(&(loc.priority, l.region, l.zone, l.sub_zone))
            .copied()
            .unwrap_or_default();
        let placement = Placement {
            // Priorities are at most 128 (Envoy's validation); a larger one sorts last.
            priority: u8::try_from(loc.priority).unwrap_or(u8::MAX),
            locality,
            locality_weight,
            overprovisioning,
        };
        for lb in &loc.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                continue;
            };
            let Some(addrs) = socket_address_of(ep.address.as_ref()).and_then(&addresses) else {
                continue;
            };
            let weight = lb
                .load_balancing_weight
                .as_ref()
                .map_or(1, |w| w.value.max(1));
            for (ip, port) in addrs {
                out.push(
                    Backend::new(ip, port)
                        .weighted(weight)
                        .in_state(state(lb.health_status))
                        .placed(placement),
                );
            }
        }
    }
    out
}

/// Merges duplicates across weighted clusters (same address and port): active
/// wins, weights add.
fn merge(backends: Vec<Backend>) -> Vec<Backend> {
    let mut by: BTreeMap<(IpAddr, u16), Backend> = BTreeMap::new();
    for b in backends {
        by.entry((b.address, b.port))
            .and_modify(|e| match (e.state, b.state) {
                (BackendState::Active, BackendState::Active) => {
                    e.weight = e.weight.saturating_add(b.weight)
                }
                (_, BackendState::Active) => *e = b,
                _ => {}
            })
            .or_insert(b);
    }
    by.into_values().collect()
}

/// Combines weighted clusters into one backend list: a backend's weight is its
/// cluster's share times its share within the cluster, scaled to integers. Backends
/// of the other address family are left out.
pub fn combine(parts: &[(u32, &[Backend])], v4: bool) -> Vec<Backend> {
    let same_family = |b: &&Backend| b.address.is_ipv4() == v4;
    let active_parts: Vec<(f64, f64, &[Backend])> = parts
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
            } else if b.state != BackendState::Active {
                out.push(b.draining());
            }
        }
    }
    merge(out)
}

/// What a service resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceBackends {
    /// A route, cluster or load assignment it needs has not arrived: it keeps its
    /// previous backends.
    Warming,
    /// Every cluster forwards to the original destination: no entry, connections
    /// go where the application sent them.
    Passthrough,
    Backends(Service),
}

/// One cluster of a service: its weight, backends, shared list (`None` for the
/// original destination) and settings.
type Part<'b> = (u32, &'b [Backend], Option<&'b Arc<[Backend]>>, LbSettings);

/// The backends of `spec`, given each cluster's backends and policy (`None`: the
/// cluster is unknown). A pass-through cluster among weighted ones contributes
/// the original destination, the service address itself, with its cluster's
/// weight. The service takes its clusters' policy; clusters of one route that
/// disagree get weighted random (one backend list cannot follow two policies).
pub fn service_backends<'a>(
    spec: &super::translate::ServiceSpec,
    cluster: impl Fn(&str) -> Option<(&'a ClusterBackends, LbPolicy, Health, LbSettings)>,
) -> ServiceBackends {
    if spec.route_pending {
        return ServiceBackends::Warming;
    }
    let original = [Backend::new(spec.service.vip, spec.service.port)];
    let mut parts: Vec<Part<'_>> = Vec::with_capacity(spec.clusters.len());
    let mut passthrough = 0;
    let mut policies = BTreeSet::new();
    let mut healths = BTreeSet::new();
    for (name, weight) in &spec.clusters {
        match cluster(name) {
            None | Some((ClusterBackends::Warming, ..)) => return ServiceBackends::Warming,
            Some((ClusterBackends::Passthrough, ..)) => {
                passthrough += 1;
                parts.push((*weight, &original, None, LbSettings::default()));
            }
            Some((ClusterBackends::Backends(b), policy, health, settings)) => {
                policies.insert(policy);
                healths.insert(health);
                parts.push((*weight, b, Some(b), settings));
            }
        }
    }
    if passthrough > 0 && passthrough == parts.len() {
        return ServiceBackends::Passthrough;
    }
    let policy = match (policies.len(), policies.first()) {
        (1, Some(p)) => *p,
        _ => LbPolicy::Random,
    };
    // Clusters that disagree on outlier detection or circuit breaking get neither
    // (one service's backends have one set of ejection rules and one limit).
    let health = match (healths.len(), healths.first()) {
        (1, Some(h)) => *h,
        _ => Health::default(),
    };
    let v4 = spec.service.vip.is_ipv4();
    let same_family = |b: &&Backend| b.address.is_ipv4() == v4;
    if let [(_, only, shared, settings)] = parts.as_slice() {
        // One cluster: Envoy's arithmetic over its assignment. The kernel keeps its
        // levels where health moves between updates (outlier detection watches TCP
        // connects; a Maglev table is one set).
        let dynamic = health.outlier.is_some()
            && spec.service.protocol == crate::model::Protocol::Tcp
            && !policy.is_maglev();
        // The usual case (one family, one level of active hosts in one
        // locality): the plan leaves the list as it is, and the service holds
        // the cluster's own list, neither copied nor planned.
        if let Some(list) = shared
            && only.iter().all(|h| same_family(&h))
            && crate::lb::levels::as_they_are(only, *settings)
        {
            return ServiceBackends::Backends(
                Service::shared(Arc::clone(list), policy).with_health(health),
            );
        }
        let family: Vec<Backend> = only.iter().filter(same_family).copied().collect();
        let planned = plan(&family, *settings, dynamic);
        // Where the plan still leaves the cluster's list as it is, the service
        // holds the cluster's own list instead of a copy.
        let backends = match shared {
            Some(list) if ***list == *planned.backends => Arc::clone(list),
            _ => planned.backends.into(),
        };
        return ServiceBackends::Backends(
            Service::shared(backends, policy)
                .with_health(health)
                .with_levels(planned.levels),
        );
    }
    // Weighted clusters: each cluster's static shares, then their weights (one
    // backend list cannot follow two clusters' levels).
    let planned: Vec<(u32, Vec<Backend>)> = parts
        .iter()
        .map(|(w, b, _, settings)| {
            let family: Vec<Backend> = b.iter().filter(same_family).copied().collect();
            (*w, plan(&family, *settings, false).backends)
        })
        .collect();
    let refs: Vec<(u32, &[Backend])> = planned.iter().map(|(w, b)| (*w, b.as_slice())).collect();
    ServiceBackends::Backends(Service::new(combine(&refs, v4), policy).with_health(health))
}

/// How a cluster asks connections to be placed, as the kernel can honour it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterPolicy {
    pub policy: LbPolicy,
    /// What Envoy's priority and locality arithmetic reads of the cluster.
    pub settings: LbSettings,
    /// Outlier detection and circuit breaking (validated before: a cluster out of
    /// range is NACKed, so here it reads as off).
    pub health: Health,
    /// Why the kernel does something else than the cluster asks (logged once per
    /// cluster; the translation table, docs/xds.md lists each case).
    pub fallback: Option<&'static str>,
}

const LEAST_REQUEST_EXT: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest";
const RANDOM_EXT: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.random.v3.Random";
const ROUND_ROBIN_EXT: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin";
const MAGLEV_EXT: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev";
const RING_HASH_EXT: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash";

const MAGLEV_TABLE_CAPPED: &str = "maglev table_size exceeds the largest table the kernel holds (65,537 entries, MAX_MAGLEV_TABLE_SIZE): a table of 65,537 entries is used";

const RING_HASH_AS_MAGLEV: &str = "RING_HASH is served by a Maglev table (the same consistent hashing of the client, with minimal disruption; the ring's sizes do not apply)";

fn least_conn(choice_count: Option<u32>) -> ClusterPolicy {
    let n = choice_count.unwrap_or(u32::from(LbPolicy::DEFAULT_CHOICES));
    ClusterPolicy {
        settings: LbSettings::default(),
        health: Health::default(),
        policy: LbPolicy::LeastConn {
            // Envoy requires at least 2; more than MAX_CHOICES draws cost more
            // than they balance, and are cut there.
            choices: n.clamp(2, u32::from(sockmesh_common::MAX_CHOICES)) as u8,
        },
        fallback: None,
    }
}

/// Maglev with the cluster's table size (validated: a prime within
/// `MAX_MAGLEV_TABLE_SIZE`), or the default.
fn maglev(table_size: Option<u64>, fallback: Option<&'static str>) -> ClusterPolicy {
    // A prime beyond the kernel's largest table is valid configuration (validated:
    // a prime within Envoy's bound): the node gives it the largest table it holds.
    let max = sockmesh_common::MAX_MAGLEV_TABLE_SIZE;
    let (table_size, fallback) = match table_size {
        Some(t) if t > u64::from(max) => (max, Some(MAGLEV_TABLE_CAPPED)),
        _ => (
            table_size
                .and_then(|t| u32::try_from(t).ok())
                .filter(|&t| crate::lb::table_size_problem(u64::from(t)).is_none())
                .unwrap_or(sockmesh_common::DEFAULT_MAGLEV_TABLE_SIZE),
            fallback,
        ),
    };
    ClusterPolicy {
        settings: LbSettings::default(),
        health: Health::default(),
        policy: LbPolicy::Maglev { table_size },
        fallback,
    }
}

/// The table size a cluster's Maglev config asks for, from `maglev_lb_config` or
/// the typed `load_balancing_policy` extension (the first the kernel knows).
pub fn maglev_table_size(c: &Cluster) -> Option<u64> {
    use sockmesh_proto::pb::envoy::extensions::load_balancing_policies::maglev::v3::Maglev;
    if let Some(cluster::LbConfig::MaglevLbConfig(m)) = &c.lb_config {
        return m.table_size.map(|v| v.value);
    }
    typed_configs(c)
        .find(|any| any.type_url == MAGLEV_EXT)
        .and_then(|any| Maglev::decode(any.value.as_slice()).ok())
        .and_then(|m| m.table_size)
        .map(|v| v.value)
}

fn typed_configs(c: &Cluster) -> impl Iterator<Item = &sockmesh_proto::pb::google::protobuf::Any> {
    c.load_balancing_policy
        .iter()
        .flat_map(|p| &p.policies)
        .filter_map(|p| p.typed_extension_config.as_ref())
        .filter_map(|t| t.typed_config.as_ref())
}

fn random() -> ClusterPolicy {
    ClusterPolicy {
        settings: LbSettings::default(),
        health: Health::default(),
        policy: LbPolicy::Random,
        fallback: None,
    }
}

/// The cluster's `lb_policy` (or `load_balancing_policy`, its typed form) as the
/// kernel places connections at connect():
/// - `LEAST_REQUEST`: least connections over `choice_count` random choices;
/// - `ROUND_ROBIN` (the default) and `RANDOM`: weighted random (a per-connection
///   rotation would need a shared counter on every connect; weighted random gives
///   the same long-run shares);
/// - `MAGLEV`: a Maglev table of the cluster's `table_size` (default
///   `DEFAULT_MAGLEV_TABLE_SIZE`), keyed by the client at connect();
/// - `RING_HASH`: the same Maglev table (noted once: the ring's sizes do not apply);
/// - `CLUSTER_PROVIDED`: the cluster's own choice (ORIGINAL_DST passes through).
///
/// With the cluster's outlier detection and circuit breaking (`outlier`).
pub fn cluster_policy(c: &Cluster) -> ClusterPolicy {
    ClusterPolicy {
        health: super::outlier::cluster_health(c).unwrap_or_default(),
        settings: lb_settings(c),
        ..lb_policy(c)
    }
}

/// `common_lb_config.locality_weighted_lb_config` and `healthy_panic_threshold`
/// (validated before: an out-of-range threshold is NACKed, so here it reads as
/// the default).
pub fn lb_settings(c: &Cluster) -> LbSettings {
    use sockmesh_proto::pb::envoy::config::cluster::v3::cluster::common_lb_config::LocalityConfigSpecifier;
    let locality_weighted = c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.locality_config_specifier.as_ref())
        .is_some_and(|s| matches!(s, LocalityConfigSpecifier::LocalityWeightedLbConfig(_)));
    LbSettings {
        locality_weighted,
        panic_percent: super::outlier::panic_percent(c)
            .unwrap_or(LbSettings::default().panic_percent),
    }
}

fn lb_policy(c: &Cluster) -> ClusterPolicy {
    use cluster::LbPolicy as P;
    // Set, the typed form takes precedence over `lb_policy` (as in Envoy).
    if c.load_balancing_policy
        .as_ref()
        .is_some_and(|p| !p.policies.is_empty())
    {
        return typed_policy(c);
    }
    let choice_count = match &c.lb_config {
        Some(cluster::LbConfig::LeastRequestLbConfig(l)) => l.choice_count.map(|v| v.value),
        _ => None,
    };
    match P::try_from(c.lb_policy).unwrap_or(P::RoundRobin) {
        P::LeastRequest => least_conn(choice_count),
        P::Maglev => maglev(maglev_table_size(c), None),
        P::RingHash => maglev(None, Some(RING_HASH_AS_MAGLEV)),
        P::LoadBalancingPolicyConfig => typed_policy(c),
        P::RoundRobin | P::Random | P::ClusterProvided => random(),
    }
}

/// `load_balancing_policy`: the first policy of the list the kernel knows, as
/// Envoy takes the first it supports.
fn typed_policy(c: &Cluster) -> ClusterPolicy {
    use sockmesh_proto::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
    for any in typed_configs(c) {
        match any.type_url.as_str() {
            LEAST_REQUEST_EXT => {
                let choices = LeastRequest::decode(any.value.as_slice())
                    .ok()
                    .and_then(|l| l.choice_count)
                    .map(|v| v.value);
                return least_conn(choices);
            }
            RANDOM_EXT | ROUND_ROBIN_EXT => return random(),
            MAGLEV_EXT => return maglev(maglev_table_size(c), None),
            RING_HASH_EXT => return maglev(None, Some(RING_HASH_AS_MAGLEV)),
            _ => {}
        }
    }
    ClusterPolicy {
        health: Health::default(),
        settings: LbSettings::default(),
        policy: LbPolicy::Random,
        fallback: Some(
            "no load_balancing_policy the kernel knows: connections are placed by weighted random",
        ),
    }
}
