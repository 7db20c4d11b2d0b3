//! The routing table: what the datapath should do, in plain types.
//!
//! Everything upstream (xDS translation, static files) produces a [`RoutingTable`];
//! the datapath's `MapWriter` makes the kernel maps match it.

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};
use sockmesh_common::MAX_BACKENDS_PER_SERVICE;

mod capacity;
pub use capacity::{CapacityError, Limits, Usage, WriteStep, slot_count, write_order};

/// An endpoint of a service: where its sockets go (a change that removes one can
/// have its sockets closed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// Endpoints of `service` in `before` and absent (in any state) from `after`: what
/// a change removed outright (draining ones stay).
pub fn removed_endpoints(
    service: &ServiceAddr,
    before: &[Backend],
    after: Option<&Service>,
    out: &mut std::collections::BTreeSet<Endpoint>,
) {
    {
        for b in before {
            let kept = after
                .as_ref()
                .is_some_and(|a| a.iter().any(|x| x.address == b.address && x.port == b.port));
            if !kept {
                out.insert(Endpoint {
                    addr: b.address,
                    port: b.port,
                    protocol: service.protocol,
                });
            }
        }
    }
}

/// What an update changes in a table: per service, its new backends and policy
/// (`None`: the service is removed).
pub type Changes = BTreeMap<ServiceAddr, Option<Service>>;

/// How connect() places a service's connections on its backends (from the
/// cluster's `lb_policy`; see the translation table, docs/xds.md).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// A random slot (weight-proportional): Envoy's `RANDOM`, and the nearest
    /// honest behaviour for the policies a socket balancer cannot follow.
    #[default]
    Random,
    /// `choices` random slots, and of their backends the one with the fewest open
    /// connections (`LEAST_REQUEST`, `LEAST_CONN`; Envoy's `choice_count`).
    LeastConn { choices: u8 },
    /// Maglev consistent hashing of the client (`MAGLEV`, `RING_HASH`): a table of
    /// `table_size` entries (a prime) built from the backends' weights; connect()
    /// takes the entry of the client's hash, so a client keeps its backend across
    /// connections and only the clients of a removed backend move.
    Maglev { table_size: u32 },
}

impl LbPolicy {
    /// Envoy's default `choice_count`.
    pub const DEFAULT_CHOICES: u8 = 2;

    /// The kernel's encoding: (`ServiceValue::policy`, `ServiceValue::choices`).
    pub fn to_kernel(self) -> (u8, u8) {
        match self {
            LbPolicy::Random => (sockmesh_common::lb_policy::RANDOM, 0),
            LbPolicy::LeastConn { choices } => (sockmesh_common::lb_policy::LEAST_CONN, choices),
            LbPolicy::Maglev { .. } => (sockmesh_common::lb_policy::MAGLEV, 0),
        }
    }

    /// The policy a kernel service value encodes (an unknown one reads as random,
    /// which is what the programs do with it). A Maglev table's size is its slot
    /// count (0 for a service without active backends, whose next write rebuilds it).
    pub fn from_kernel(value: &sockmesh_common::ServiceValue) -> Self {
        match value.policy {
            sockmesh_common::lb_policy::LEAST_CONN => LbPolicy::LeastConn {
                choices: value.choices.clamp(1, sockmesh_common::MAX_CHOICES),
            },
            sockmesh_common::lb_policy::MAGLEV => LbPolicy::Maglev {
                table_size: value.slot_count,
            },
            _ => LbPolicy::Random,
        }
    }

    /// Whether the service's slots are a Maglev table (kept in `SM_MAGLEV`).
    pub fn is_maglev(self) -> bool {
        matches!(self, LbPolicy::Maglev { .. })
    }
}

/// Outlier detection of a service, from its cluster's `outlier_detection` as it
/// applies to connect failures (see the translation table, docs/xds.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    /// Failed connects in a row that eject a backend (≥ 1).
    pub consecutive: u32,
    /// Percent of detections that eject (0..=100).
    pub enforcing: u8,
    /// First ejection's length; the n-th in a row lasts n times as long.
    pub base_ejection_ms: u32,
    /// Longest ejection.
    pub max_ejection_ms: u32,
    /// Each interval a returned backend stays healthy takes one off its multiplier.
    pub interval_ms: u32,
    /// Most of the service's backends ejected at once, percent (one always may be).
    pub max_ejection_percent: u8,
    /// Below this healthy percentage ejections are ignored (Envoy's panic mode;
    /// 0 disables it).
    pub panic_percent: u8,
}

/// Outlier detection and circuit breaking of a service (both off by default).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<Outlier>,
    /// Open connections the service may have on this node (`None`: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl Health {
    pub fn is_off(&self) -> bool {
        *self == Health::default()
    }

    /// The kernel's encoding for a service of `protocol` with `backends` hosts
    /// (the whole of its ejected share) and the assignment's `overprovisioning`
    /// factor: its [`sockmesh_common::ServiceValue::flags`] and its
    /// `SM_SVC_POLICY` entry (`None` when both are off). Outlier detection watches
    /// TCP connects only: a UDP service gets no ejection.
    pub fn to_kernel(
        &self,
        protocol: Protocol,
        backends: usize,
        overprovisioning: u16,
    ) -> (u8, Option<sockmesh_common::ServicePolicy>) {
        use sockmesh_common::service_flags;
        let outlier = self.outlier.filter(|_| protocol == Protocol::Tcp);
        let mut flags = 0;
        if outlier.is_some() {
            flags |= service_flags::OUTLIER;
        }
        if self.max_connections.is_some() {
            flags |= service_flags::CIRCUIT;
        }
        if flags == 0 {
            return (0, None);
        }
        let o = outlier.unwrap_or(Outlier {
            consecutive: 0,
            enforcing: 0,
            base_ejection_ms: 0,
            max_ejection_ms: 0,
            interval_ms: 0,
            max_ejection_percent: 0,
            panic_percent: 0,
        });
        let policy = sockmesh_common::ServicePolicy {
            consecutive: o.consecutive,
            base_ejection_ms: o.base_ejection_ms,
            max_ejection_ms: o.max_ejection_ms,
            interval_ms: o.interval_ms,
            // The kernel's 0 is unlimited, so a limit of 0 is taken as 1.
            max_connections: self.max_connections.map_or(0, |m| m.max(1)),
            backends: u32::try_from(backends).unwrap_or(u32::MAX),
            max_ejection_percent: o.max_ejection_percent,
            panic_percent: o.panic_percent,
            enforcing: o.enforcing,
            pad: 0,
            overprovisioning: u32::from(overprovisioning),
        };
        (flags, Some(policy))
    }

    /// The settings a kernel entry encodes (the inverse of [`Health::to_kernel`]).
    pub fn from_kernel(flags: u8, policy: Option<&sockmesh_common::ServicePolicy>) -> Self {
        use sockmesh_common::service_flags;
        let Some(p) = policy else {
            return Health::default();
        };
        Health {
            outlier: (flags & service_flags::OUTLIER != 0).then_some(Outlier {
                consecutive: p.consecutive,
                enforcing: p.enforcing,
                base_ejection_ms: p.base_ejection_ms,
                max_ejection_ms: p.max_ejection_ms,
                interval_ms: p.interval_ms,
                max_ejection_percent: p.max_ejection_percent,
                panic_percent: p.panic_percent,
            }),
            max_connections: (flags & service_flags::CIRCUIT != 0).then_some(p.max_connections),
        }
    }
}

/// One service of the table: its backends and how connections are placed on them.
/// The backends are shared: a service of one cluster whose backends are the
/// cluster's as they are holds the cluster's own list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub backends: std::sync::Arc<[Backend]>,
    pub policy: LbPolicy,
    pub health: Health,
    /// Envoy's priority levels, for a service whose levels' loads the kernel
    /// computes at connect() (outlier detection can move them); `None`: one
    /// weighted set, the active backends (see `lb::levels`).
    pub levels: Option<Box<Levels>>,
}

/// A service's priority levels as the kernel serves them (`SM_TIERS`): for each
/// level, its hosts in three weighted ranges and its host counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Levels {
    /// The assignment's `overprovisioning_factor`, percent.
    pub overprovisioning: u32,
    /// The cluster's panic threshold, percent (0: none).
    pub panic_percent: u32,
    /// By priority, at most `sockmesh_common::MAX_TIERS`.
    pub levels: Vec<Level>,
}

/// One priority level: (position in [`Service::backends`], slot weight) of its
/// healthy hosts (weighted by their locality's effective weight and their own),
/// its degraded hosts (likewise), and all its hosts (by their own weight, for a
/// panic), and its counts as Envoy counts them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Level {
    pub healthy: Vec<(usize, u32)>,
    pub degraded: Vec<(usize, u32)>,
    pub all: Vec<(usize, u32)>,
    /// Hosts, excluded (DRAINING) ones left out.
    pub hosts: u32,
    pub healthy_hosts: u32,
    pub degraded_hosts: u32,
    /// Every host.
    pub total: u32,
}

impl Service {
    pub fn new(backends: Vec<Backend>, policy: LbPolicy) -> Self {
        Self::shared(backends.into(), policy)
    }

    /// A service over a backend list held elsewhere too.
    pub fn shared(backends: std::sync::Arc<[Backend]>, policy: LbPolicy) -> Self {
        Self {
            backends,
            policy,
            health: Health::default(),
            levels: None,
        }
    }

    /// The same service served by priority levels.
    #[must_use]
    pub fn with_levels(mut self, levels: Option<Levels>) -> Self {
        self.levels = levels.map(Box::new);
        self
    }

    /// Its backends, to change in place (copied first if they are shared).
    pub fn backends_mut(&mut self) -> &mut [Backend] {
        std::sync::Arc::make_mut(&mut self.backends)
    }

    /// The same service with outlier detection and circuit breaking `health`.
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }
}

impl From<Vec<Backend>> for Service {
    /// Backends under the default policy (weighted random).
    fn from(backends: Vec<Backend>) -> Self {
        Self::new(backends, LbPolicy::Random)
    }
}

impl std::ops::Deref for Service {
    type Target = [Backend];
    fn deref(&self) -> &[Backend] {
        &self.backends
    }
}

impl<'a> IntoIterator for &'a Service {
    type Item = &'a Backend;
    type IntoIter = std::slice::Iter<'a, Backend>;
    fn into_iter(self) -> Self::IntoIter {
        self.backends.iter()
    }
}

/// A service compares equal to a list of backends when it holds them.
impl PartialEq<Vec<Backend>> for Service {
    fn eq(&self, other: &Vec<Backend>) -> bool {
        *self.backends == **other
    }
}

/// As above, for an array.
impl<const N: usize> PartialEq<[Backend; N]> for Service {
    fn eq(&self, other: &[Backend; N]) -> bool {
        *self.backends == *other
    }
}

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number used in the kernel maps.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => sockmesh_common::PROTO_TCP,
            Protocol::Udp => sockmesh_common::PROTO_UDP,
        }
    }

    /// The protocol for an IP protocol number, if sockmesh handles it.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            sockmesh_common::PROTO_TCP => Some(Protocol::Tcp),
            sockmesh_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(ModelError::UnknownProtocol(s.to_owned())),
        }
    }
}

/// A service address: what clients connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAddr {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.vip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// Whether a backend receives new connections, and (from its EDS health status)
/// how Envoy's priority arithmetic counts it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Receives new connections (EDS HEALTHY or UNKNOWN).
    #[default]
    Active,
    /// Receives no new connections; established ones continue (EDS DRAINING,
    /// or a host the control plane's arithmetic gives no load).
    Draining,
    /// EDS DEGRADED, in a service with priority levels: served by its level's
    /// degraded load.
    Degraded,
    /// EDS UNHEALTHY or TIMEOUT, in a service with priority levels: served only
    /// in its level's panic.
    Unhealthy,
}

/// Where an endpoint sits in its load assignment, as Envoy's load balancer reads
/// it: its priority, its locality (an index into the assignment's localities)
/// and that locality's `load_balancing_weight` (0: unset), and the assignment's
/// `overprovisioning_factor`. Read by `lb::levels`; not part of a service's JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Placement {
    pub priority: u8,
    pub locality: u16,
    pub locality_weight: u32,
    pub overprovisioning: u16,
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            priority: 0,
            locality: 0,
            locality_weight: 0,
            overprovisioning: DEFAULT_OVERPROVISIONING,
        }
    }
}

/// Envoy's default `policy.overprovisioning_factor` (percent).
pub const DEFAULT_OVERPROVISIONING: u16 = 140;

/// One endpoint of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Backend {
    pub address: IpAddr,
    pub port: u16,
    /// Relative weight, at least 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing)]
    pub state: BackendState,
    #[serde(skip)]
    pub placement: Placement,
}

fn default_weight() -> u32 {
    1
}

impl Backend {
    /// An active backend of weight 1.
    pub fn new(address: IpAddr, port: u16) -> Self {
        Self {
            address,
            port,
            weight: 1,
            state: BackendState::Active,
            placement: Placement::default(),
        }
    }

    /// This backend with `weight`.
    #[must_use]
    pub fn weighted(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// This backend, draining.
    #[must_use]
    pub fn draining(mut self) -> Self {
        self.state = BackendState::Draining;
        self
    }

    /// This backend in `state`.
    #[must_use]
    pub fn in_state(mut self, state: BackendState) -> Self {
        self.state = state;
        self
    }

    /// This backend at `placement`.
    #[must_use]
    pub fn placed(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }
}

/// The desired (or installed) routing table: service address → backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingTable {
    pub services: BTreeMap<ServiceAddr, Service>,
}

/// A routing table that breaks a datapath rule.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("service {service}: port 0 is not a valid service port")]
    ServicePortZero { service: ServiceAddr },
    #[error("service {service}: backend[{index}] {address} port 0 is out of range")]
    BackendPortZero {
        service: ServiceAddr,
        index: usize,
        address: IpAddr,
    },
    #[error(
        "service {service}: backend[{index}] {address}:{port} has weight 0 (must be at least 1)"
    )]
    ZeroWeight {
        service: ServiceAddr,
        index: usize,
        address: IpAddr,
        port: u16,
    },
    #[error(
        "service {service}: backend[{index}] {address} is not of the service's address family (IPv4 and IPv6 cannot be mixed in one service)"
    )]
    FamilyMismatch {
        service: ServiceAddr,
        index: usize,
        address: IpAddr,
    },
    #[error("service {service}: backend {address}:{port} is listed twice")]
    DuplicateBackend {
        service: ServiceAddr,
        address: IpAddr,
        port: u16,
    },
    #[error("service {service}: {count} backends exceed the limit of {limit} per service")]
    TooManyBackends {
        service: ServiceAddr,
        count: usize,
        limit: u32,
    },
    #[error("service {service}: Maglev table size {problem}")]
    MaglevTableSize {
        service: ServiceAddr,
        problem: String,
    },
    #[error("unknown protocol {0:?} (expected tcp or udp)")]
    UnknownProtocol(String),
}

impl RoutingTable {
    /// Adds (or replaces) a service (weighted random unless `backends` is a
    /// [`Service`] with another policy).
    pub fn insert(&mut self, service: ServiceAddr, backends: impl Into<Service>) {
        self.services.insert(service, backends.into());
    }

    /// Checks every rule the datapath relies on; the first broken one is returned.
    /// (Capacities are the maps' own: see [`Limits::check`].)
    pub fn validate(&self) -> Result<(), ModelError> {
        for (service, backends) in &self.services {
            validate_service(service, backends)?;
        }
        Ok(())
    }

    /// Total number of backends over all services.
    pub fn backend_count(&self) -> usize {
        self.services.values().map(|s| s.backends.len()).sum()
    }
}

/// Checks one service against the datapath's rules.
pub fn validate_service(service: &ServiceAddr, backends: &Service) -> Result<(), ModelError> {
    let service = *service;
    if service.port == 0 {
        return Err(ModelError::ServicePortZero { service });
    }
    if let LbPolicy::Maglev { table_size } = backends.policy
        && let Some(problem) = crate::lb::table_size_problem(u64::from(table_size))
    {
        return Err(ModelError::MaglevTableSize { service, problem });
    }
    if backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
        return Err(ModelError::TooManyBackends {
            service,
            count: backends.len(),
            limit: MAX_BACKENDS_PER_SERVICE,
        });
    }
    let mut seen: foldhash::HashSet<_> = foldhash::HashSetExt::with_capacity(backends.len());
    for (index, b) in backends.iter().enumerate() {
        if b.port == 0 {
            return Err(ModelError::BackendPortZero {
                service,
                index,
                address: b.address,
            });
        }
        if b.weight == 0 {
            return Err(ModelError::ZeroWeight {
                service,
                index,
                address: b.address,
                port: b.port,
            });
        }
        if b.address.is_ipv4() != service.vip.is_ipv4() {
            return Err(ModelError::FamilyMismatch {
                service,
                index,
                address: b.address,
            });
        }
        if !seen.insert((b.address, b.port)) {
            return Err(ModelError::DuplicateBackend {
                service,
                address: b.address,
                port: b.port,
            });
        }
    }
    Ok(())
}

/// The JSON form of one service, used by `sockmesh services --json` and by static
/// table files (`sockmesh apply --table`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceJson {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Backends that receive new connections.
    pub backends: Vec<BackendJson>,
    /// Backends that are known but receive no new connections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<BackendJson>,
    /// A service with priority levels: its degraded and unhealthy backends, and
    /// the levels as the kernel serves them (omitted: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<BackendJson>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unhealthy: Vec<BackendJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub levels: Option<LevelsJson>,
    /// How connect() picks among the backends (omitted: weighted random).
    #[serde(default, skip_serializing_if = "is_random")]
    pub lb_policy: LbPolicy,
    /// Outlier detection and circuit breaking (omitted: off).
    #[serde(default, skip_serializing_if = "Health::is_off")]
    pub health: Health,
}

fn is_random(p: &LbPolicy) -> bool {
    *p == LbPolicy::Random
}

/// A service's priority levels in JSON: each level's share of new connections
/// with no host ejected (the kernel's follow the ejections: `/config_dump`'s
/// `load_balancing` shows them as they are now), and each backend's share within
/// the service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelsJson {
    pub overprovisioning: u32,
    pub panic_percent: u32,
    pub levels: Vec<LevelJson>,
}

impl Eq for LevelsJson {}

/// One level in JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelJson {
    pub hosts: u32,
    pub healthy_hosts: u32,
    pub degraded_hosts: u32,
    /// Percent of new connections to its healthy and degraded hosts.
    pub healthy_load: u32,
    pub degraded_load: u32,
    /// Whether it serves all its hosts (panic).
    pub panic: bool,
    /// Each of its hosts' share of the service's new connections, percent.
    pub shares: BTreeMap<String, f64>,
}

/// The JSON form of one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendJson {
    pub address: IpAddr,
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

impl RoutingTable {
    /// The table as JSON services, sorted by VIP, port and protocol.
    pub fn to_json(&self) -> Vec<ServiceJson> {
        self.services
            .iter()
            .map(|(s, backends)| {
                let pick = |state| {
                    let mut v: Vec<BackendJson> = backends
                        .iter()
                        .filter(|b| b.state == state)
                        .map(|b| BackendJson {
                            address: b.address,
                            port: b.port,
                            weight: b.weight,
                        })
                        .collect();
                    v.sort_by_key(|b| (b.address, b.port));
                    v
                };
                ServiceJson {
                    vip: s.vip,
                    port: s.port,
                    protocol: s.protocol,
                    backends: pick(BackendState::Active),
                    draining: pick(BackendState::Draining),
                    degraded: pick(BackendState::Degraded),
                    unhealthy: pick(BackendState::Unhealthy),
                    levels: backends.levels.as_deref().map(|l| {
                        crate::lb::levels::to_json(
                            backends,
                            l,
                            &sockmesh_common::tiers::Ejected::NONE,
                        )
                    }),
                    lb_policy: backends.policy,
                    health: backends.health,
                }
            })
            .collect()
    }

    /// A table from JSON services (the inverse of [`RoutingTable::to_json`]).
    pub fn from_json(services: &[ServiceJson]) -> Self {
        let mut table = RoutingTable::default();
        for s in services {
            let key = ServiceAddr {
                vip: s.vip,
                port: s.port,
                protocol: s.protocol,
            };
            let active = s
                .backends
                .iter()
                .map(|b| Backend::new(b.address, b.port).weighted(b.weight));
            let draining = s.draining.iter().map(|b| {
                Backend::new(b.address, b.port)
                    .weighted(b.weight)
                    .draining()
            });
            // A static table has no levels: its degraded and unhealthy backends
            // receive no new connections.
            let draining = draining.chain(s.degraded.iter().chain(&s.unhealthy).map(|b| {
                Backend::new(b.address, b.port)
                    .weighted(b.weight)
                    .draining()
            }));
            table.insert(
                key,
                Service::new(active.chain(draining).collect(), s.lb_policy).with_health(s.health),
            );
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(vip: &str, port: u16) -> ServiceAddr {
        ServiceAddr {
            vip: vip.parse().expect("test address"),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn be(addr: &str, port: u16) -> Backend {
        Backend::new(addr.parse().expect("test address"), port)
    }

    #[test]
    fn validation_names_service_and_field() {
        let mut t = RoutingTable::default();
        t.insert(
            svc("10.96.0.1", 80),
            vec![be("10.0.0.1", 8080), be("10.0.0.2", 0)],
        );
        let err = t.validate().expect_err("port 0 must be rejected");
        assert_eq!(
            err.to_string(),
            "service 10.96.0.1:80/tcp: backend[1] 10.0.0.2 port 0 is out of range"
        );
    }

    #[test]
    fn a_maglev_table_size_must_be_a_prime_the_kernel_holds() {
        let table = |table_size| {
            let mut t = RoutingTable::default();
            t.insert(
                svc("10.96.0.1", 80),
                Service::new(vec![be("10.0.0.1", 8080)], LbPolicy::Maglev { table_size }),
            );
            t.validate().map_err(|e| e.to_string())
        };
        assert_eq!(table(251), Ok(()));
        assert_eq!(
            table(1000),
            Err("service 10.96.0.1:80/tcp: Maglev table size 1000 is not a prime (Maglev needs a prime table size)".into())
        );
        assert!(table(131_071).is_err_and(|e| e.contains("exceeds the largest")));
    }

    #[test]
    fn validation_rejects_mixed_families_duplicates_and_zero_weight() {
        let mut t = RoutingTable::default();
        t.insert(svc("10.96.0.1", 80), vec![be("fd00::1", 80)]);
        assert!(matches!(
            t.validate(),
            Err(ModelError::FamilyMismatch { .. })
        ));

        let mut t = RoutingTable::default();
        t.insert(
            svc("10.96.0.1", 80),
            vec![be("10.0.0.1", 80), be("10.0.0.1", 80)],
        );
        assert!(matches!(
            t.validate(),
            Err(ModelError::DuplicateBackend { .. })
        ));

        let mut t = RoutingTable::default();
        t.insert(svc("10.96.0.1", 80), vec![be("10.0.0.1", 80).weighted(0)]);
        assert!(matches!(t.validate(), Err(ModelError::ZeroWeight { .. })));
    }

    #[test]
    fn validation_enforces_backend_limit() {
        let mut t = RoutingTable::default();
        let many = (0..=MAX_BACKENDS_PER_SERVICE)
            .map(|i| be("10.0.0.1", u16::try_from(i + 1).expect("fits")))
            .collect::<Vec<_>>();
        t.insert(svc("10.96.0.1", 80), many);
        assert!(matches!(
            t.validate(),
            Err(ModelError::TooManyBackends { count, .. })
                if count == MAX_BACKENDS_PER_SERVICE as usize + 1
        ));
    }

    #[test]
    fn json_round_trip_sorts_and_splits_draining() {
        let mut t = RoutingTable::default();
        t.insert(
            svc("10.96.0.2", 53),
            vec![
                be("10.0.0.9", 53),
                be("10.0.0.1", 53).weighted(3),
                be("10.0.0.5", 53).draining(),
            ],
        );
        t.insert(svc("10.96.0.1", 80), vec![]);
        let json = serde_json::to_value(t.to_json()).expect("serialise");
        assert_eq!(json[0]["vip"], "10.96.0.1");
        assert_eq!(json[1]["backends"][0]["address"], "10.0.0.1");
        assert_eq!(json[1]["backends"][0]["weight"], 3);
        assert_eq!(json[1]["draining"][0]["address"], "10.0.0.5");
        assert_eq!(json[1]["protocol"], "tcp");
        let back: Vec<ServiceJson> = serde_json::from_value(json).expect("parse");
        let mut again = RoutingTable::from_json(&back);
        for b in again.services.values_mut() {
            b.backends_mut().sort();
        }
        let mut orig = t;
        for b in orig.services.values_mut() {
            b.backends_mut().sort();
        }
        assert_eq!(again, orig);
    }
}
