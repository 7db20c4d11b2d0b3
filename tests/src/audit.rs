//! The leak audit: what every map pinned under a test's bpffs directory holds
//! (read here with aya, not through the agent's readers), and what the agent
//! says of its own state (`/config_dump`), against what the scenario implies.
//!
//! A scenario says what it implies with an [`Expect`] (services, backends, open
//! sockets, cgroups with links, xDS resources); everything else follows from
//! the maps themselves: every entry must belong to a published service as the
//! kernel contract says (`ebpf/programs/src/maps.rs`), so an entry nothing
//! reaches is a leak whatever the scenario was. [`Audit::assert`] waits (a
//! socket's release and an agent's write are asynchronous) until the maps and
//! the agent agree with the expectation, and otherwise fails naming each map,
//! what it should hold and what it holds.
//!
//! Maps without entries to audit: `SM_COUNTERS` (counts that only grow),
//! `SM_SCRATCH` (a scratch word), `SM_EVENTS` (a ring buffer the agent drains),
//! `SM_REVERSE_UDP` (an LRU: its entries stay until evicted, by design), and the
//! socket storages `SM_SOCK_CONNS`, `SM_SOCK_HEALTH` and `SM_SOCK_REVERSE`
//! (freed with their sockets; what they hold is audited through what they
//! release: `SM_BACKEND_CONNS` and `SM_SVC_HEALTH`'s open connections, and
//! `SM_REVERSE` entries, go back to the sockets still open).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use sockmesh_common::{
    BackendInfo, BackendKey, ConnKey, EndpointHealth, EndpointKey, MAGLEV_CHUNK, MaglevChunk,
    ReverseKey, ReverseValue, ServiceHealth, ServiceKey, ServicePolicy, ServiceValue, SlotKey,
    Tiers, lb_policy, map_names, service_flags,
};

use crate::{Admin, wait_until};

/// What the maps hold.
#[derive(Clone, Debug, Default)]
pub struct Maps {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    /// Claimed counter slots and the service each names.
    pub stats: Vec<(u32, ServiceKey)>,
    pub slots: Vec<SlotKey>,
    pub maglev: Vec<SlotKey>,
    pub tiers: Vec<SlotKey>,
    pub backends: Vec<(BackendKey, BackendInfo)>,
    pub policies: Vec<ServiceKey>,
    pub service_health: Vec<(ServiceKey, ServiceHealth)>,
    pub endpoint_health: Vec<EndpointKey>,
    pub conns: Vec<(ConnKey, u64)>,
    /// `SM_REVERSE` entries.
    pub reverse: usize,
    /// `SM_REVERSE_UDP` entries (reported, not audited).
    pub reverse_udp: usize,
    /// Pins that belong to no map or link of this build's layout.
    pub stray_pins: Vec<String>,
    /// Cgroups with pinned links (their link directory) and how many links each.
    pub links: BTreeMap<String, usize>,
}

/// What a scenario implies at the point it is audited. `None` leaves a count to
/// the maps' own consistency (every entry belonging to a published service).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expect {
    pub services: Option<usize>,
    pub backends: Option<usize>,
    /// Redirected connected sockets still open (`SM_REVERSE` entries).
    pub reverse: usize,
    /// Connections of least-connections services still open (the sum of
    /// `SM_BACKEND_CONNS`).
    pub least_conn: u64,
    /// Connections of circuit-breaking services still open (the sum of
    /// `SM_SVC_HEALTH`'s `conns`).
    pub circuit: u64,
    /// Traffic is running: what open sockets hold changes from one moment to
    /// the next and is not checked (the entries of services still are).
    pub traffic: bool,
    /// Cgroups with the programs' links pinned (`None`: not checked).
    pub link_cgroups: Option<usize>,
    /// The xDS resources the agent holds (`None`: not checked).
    pub xds: Option<Xds>,
}

/// xDS resources the agent should hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Xds {
    pub listeners: usize,
    pub clusters: usize,
    pub routes: usize,
    pub endpoints: usize,
}

impl Expect {
    /// Nothing programmed, nothing open: every map empty, every state size 0.
    pub fn empty() -> Self {
        Self {
            services: Some(0),
            backends: Some(0),
            xds: Some(Xds::default()),
            ..Self::default()
        }
    }

    /// `services` services with `backends` backends in all, nothing open.
    pub fn services(services: usize, backends: usize) -> Self {
        Self {
            services: Some(services),
            backends: Some(backends),
            ..Self::default()
        }
    }

    /// The services and backends of `table`, nothing open.
    pub fn table(table: &sockmesh::model::RoutingTable) -> Self {
        Self::services(
            table.services.len(),
            table.services.values().map(|s| s.len()).sum(),
        )
    }

    #[must_use]
    pub fn reverse(mut self, open: usize) -> Self {
        self.reverse = open;
        self
    }

    #[must_use]
    pub fn least_conn(mut self, open: u64) -> Self {
        self.least_conn = open;
        self
    }

    #[must_use]
    pub fn circuit(mut self, open: u64) -> Self {
        self.circuit = open;
        self
    }

    /// Traffic is running (see [`Expect::traffic`]).
    #[must_use]
    pub fn under_traffic(mut self) -> Self {
        self.traffic = true;
        self
    }

    #[must_use]
    pub fn link_cgroups(mut self, n: usize) -> Self {
        self.link_cgroups = Some(n);
        self
    }

    #[must_use]
    pub fn xds(
        mut self,
        listeners: usize,
        clusters: usize,
        routes: usize,
        endpoints: usize,
    ) -> Self {
        self.xds = Some(Xds {
            listeners,
            clusters,
            routes,
            endpoints,
        });
        self
    }
}

/// Reads every pin under `bpffs` (empty maps if nothing is pinned).
pub fn read(bpffs: &Path) -> Result<Maps, String> {
    let layout = sockmesh::dataplane::PinLayout::new(bpffs);
    let mut maps = Maps::default();
    if !layout.maps.exists() {
        maps.stray_pins = pins_under(bpffs);
        return Ok(maps);
    }
    let m = |name: &str| layout.maps.join(name);
    let h = |name: &str| layout.health.join(name);
    maps.services = entries(&m(map_names::SERVICES))?;
    maps.stats = sockmesh::dataplane::read_counter_slots(bpffs)
        .map_err(|e| format!("{}: {e:#}", map_names::SERVICE_STATS))?
        .into_iter()
        .map(|(slot, k, _)| (slot, k))
        .collect();
    maps.slots = keys::<SlotKey, u32>(&m(map_names::SLOTS))?;
    maps.maglev = keys::<SlotKey, MaglevChunk>(&m(map_names::MAGLEV))?;
    maps.tiers = keys::<SlotKey, Tiers>(&m(map_names::TIERS))?;
    maps.backends = entries(&m(map_names::BACKENDS))?;
    maps.reverse = keys::<ReverseKey, ReverseValue>(&m(map_names::REVERSE))?.len();
    maps.reverse_udp = keys::<ReverseKey, ReverseValue>(&m(map_names::REVERSE_UDP))?.len();
    maps.policies = keys::<ServiceKey, ServicePolicy>(&h(map_names::SERVICE_POLICY))?;
    maps.service_health = entries(&h(map_names::SERVICE_HEALTH))?;
    maps.endpoint_health = keys::<EndpointKey, EndpointHealth>(&h(map_names::ENDPOINT_HEALTH))?;
    maps.conns = entries(&layout.conns.join(map_names::BACKEND_CONNS))?;
    let known: BTreeSet<PathBuf> = map_names::LAYOUT
        .iter()
        .map(|n| layout.maps.join(n))
        .chain(map_names::CONNS.iter().map(|n| layout.conns.join(n)))
        .chain(map_names::HEALTH.iter().map(|n| layout.health.join(n)))
        .collect();
    for pin in pins_under(bpffs) {
        let path = PathBuf::from(&pin);
        if known.contains(&path) {
            continue;
        }
        match path.strip_prefix(&layout.links) {
            Ok(rest) if rest.components().count() == 2 => {
                let cgroup = rest
                    .components()
                    .next()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .unwrap_or_default();
                *maps.links.entry(cgroup).or_default() += 1;
            }
            _ => maps.stray_pins.push(pin),
        }
    }
    Ok(maps)
}

/// Every file (pin) below `dir`.
fn pins_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

fn open<K: aya::Pod, V: aya::Pod>(path: &Path) -> Result<HashMap<MapData, K, V>, String> {
    let data = MapData::from_pin(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let map = Map::from_map_data(data).map_err(|e| format!("{}: {e}", path.display()))?;
    HashMap::try_from(map).map_err(|e| format!("{}: {e}", path.display()))
}

fn keys<K: aya::Pod, V: aya::Pod>(path: &Path) -> Result<Vec<K>, String> {
    open::<K, V>(path)?
        .keys()
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn entries<K: aya::Pod, V: aya::Pod>(path: &Path) -> Result<Vec<(K, V)>, String> {
    open::<K, V>(path)?
        .iter()
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The maps of an in-memory store (the writer's unit-test fake): the routing
/// and health maps the agent writes.
pub fn of_store(st: &sockmesh::dataplane::store::MemStore) -> Maps {
    Maps {
        services: st.services.iter().map(|(k, v)| (*k, *v)).collect(),
        stats: st.stats.iter().map(|(s, k)| (*s, *k)).collect(),
        slots: st.slots.keys().copied().collect(),
        maglev: st.maglev.keys().copied().collect(),
        tiers: st.tiers.keys().copied().collect(),
        backends: st.backends.iter().map(|(k, v)| (*k, *v)).collect(),
        policies: st.policies.keys().copied().collect(),
        service_health: st
            .service_health
            .iter()
            .map(|(k, epoch)| {
                (
                    *k,
                    ServiceHealth {
                        epoch: *epoch,
                        ..ServiceHealth::ZERO
                    },
                )
            })
            .collect(),
        endpoint_health: st.endpoint_health.iter().copied().collect(),
        ..Maps::default()
    }
}

/// `vip:port/proto` of a service key.
pub fn service_name(k: &ServiceKey) -> String {
    let ip = sockmesh::dataplane::words_to_ip(k.addr);
    let proto = match k.proto {
        sockmesh_common::PROTO_TCP => "tcp".to_owned(),
        sockmesh_common::PROTO_UDP => "udp".to_owned(),
        p => format!("proto{p}"),
    };
    format!(
        "{}/{proto}",
        std::net::SocketAddr::new(ip, u16::from_be(k.port))
    )
}

fn endpoint_name(addr: [u32; 4], port: u16) -> String {
    let ip: IpAddr = sockmesh::dataplane::words_to_ip(addr);
    std::net::SocketAddr::new(ip, u16::from_be(port)).to_string()
}

/// One map's count against what it should be, and the entries that belong to
/// nothing.
fn count(out: &mut Vec<String>, map: &str, what: &str, want: usize, got: usize, stray: &[String]) {
    if want != got || !stray.is_empty() {
        let mut line = format!("{map}: expected {want} entries ({what}), found {got}");
        if !stray.is_empty() {
            let shown: Vec<&str> = stray.iter().take(5).map(String::as_str).collect();
            let _ = write!(
                line,
                "; {} belong to nothing: {}{}",
                stray.len(),
                shown.join(", "),
                if stray.len() > 5 { ", …" } else { "" }
            );
        }
        out.push(line);
    }
}

/// Where a published service keeps its slots, as connect() reads them: none
/// (direct slots), `SM_MAGLEV` chunks, or `SM_SLOTS` entries.
fn slot_entries(v: &ServiceValue) -> (usize, usize) {
    let n = v.slot_count as usize;
    if v.flags & service_flags::DIRECT != 0 {
        (0, 0)
    } else if v.policy == lb_policy::MAGLEV {
        (0, n.div_ceil(MAGLEV_CHUNK))
    } else {
        (n, 0)
    }
}

/// What is wrong with `maps` against `expect`: one line per map, naming what it
/// should hold and what it holds (empty: nothing).
pub fn check(maps: &Maps, expect: &Expect) -> Vec<String> {
    let mut out = Vec::new();
    let by_id: BTreeMap<u32, (&ServiceKey, &ServiceValue)> =
        maps.services.iter().map(|(k, v)| (v.id, (k, v))).collect();
    if let Some(want) = expect.services {
        count(
            &mut out,
            map_names::SERVICES,
            "services",
            want,
            maps.services.len(),
            &[],
        );
    }
    // Per-service counters: one claimed slot per service, the one its value names.
    let named: BTreeMap<&ServiceKey, u32> =
        maps.services.iter().map(|(k, v)| (k, v.stats)).collect();
    let stray: Vec<String> = maps
        .stats
        .iter()
        .filter(|(slot, k)| named.get(k) != Some(slot))
        .map(|(_, k)| service_name(k))
        .collect();
    count(
        &mut out,
        map_names::SERVICE_STATS,
        "one per service",
        maps.services.len(),
        maps.stats.len(),
        &stray,
    );
    // Slots, Maglev chunks and levels: those of each service's published generation.
    let published = |k: &SlotKey| {
        by_id
            .get(&k.service_id)
            .map(|(_, v)| *v)
            .filter(|v| v.generation == k.generation)
    };
    let (want_slots, want_chunks) = maps
        .services
        .iter()
        .map(|(_, v)| slot_entries(v))
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    let stray: Vec<String> = maps
        .slots
        .iter()
        .filter(|k| !published(k).is_some_and(|v| usize::from(k.slot) < slot_entries(v).0))
        .map(|k| format!("{k:?}"))
        .collect();
    count(
        &mut out,
        map_names::SLOTS,
        "the published slots",
        want_slots,
        maps.slots.len(),
        &stray,
    );
    let stray: Vec<String> = maps
        .maglev
        .iter()
        .filter(|k| !published(k).is_some_and(|v| usize::from(k.slot) < slot_entries(v).1))
        .map(|k| format!("{k:?}"))
        .collect();
    count(
        &mut out,
        map_names::MAGLEV,
        "the published Maglev tables' chunks",
        want_chunks,
        maps.maglev.len(),
        &stray,
    );
    let leveled = maps
        .services
        .iter()
        .filter(|(_, v)| v.flags & service_flags::TIERS != 0)
        .count();
    let stray: Vec<String> = maps
        .tiers
        .iter()
        .filter(|k| {
            !published(k).is_some_and(|v| v.flags & service_flags::TIERS != 0 && k.slot == 0)
        })
        .map(|k| format!("{k:?}"))
        .collect();
    count(
        &mut out,
        map_names::TIERS,
        "one per service with levels",
        leveled,
        maps.tiers.len(),
        &stray,
    );
    // Backends: of published services only.
    let stray: Vec<String> = maps
        .backends
        .iter()
        .filter(|(k, _)| !by_id.contains_key(&k.service_id))
        .map(|(k, b)| {
            format!(
                "{} of service id {}",
                endpoint_name(b.addr, b.port),
                k.service_id
            )
        })
        .collect();
    let want = expect.backends.unwrap_or(maps.backends.len() - stray.len());
    count(
        &mut out,
        map_names::BACKENDS,
        "the services' backends",
        want,
        maps.backends.len(),
        &stray,
    );
    // Health settings and state: of services whose value names them.
    let health: BTreeSet<ServiceKey> = maps
        .services
        .iter()
        .filter(|(_, v)| v.flags & service_flags::HEALTH != 0)
        .map(|(k, _)| *k)
        .collect();
    let stray: Vec<String> = maps
        .policies
        .iter()
        .filter(|k| !health.contains(k))
        .map(service_name)
        .collect();
    count(
        &mut out,
        map_names::SERVICE_POLICY,
        "one per service with outlier detection or a circuit breaker",
        health.len(),
        maps.policies.len(),
        &stray,
    );
    let stray: Vec<String> = maps
        .service_health
        .iter()
        .filter(|(k, _)| !health.contains(k))
        .map(|(k, _)| service_name(k))
        .collect();
    count(
        &mut out,
        map_names::SERVICE_HEALTH,
        "one per service with outlier detection or a circuit breaker",
        health.len(),
        maps.service_health.len(),
        &stray,
    );
    // Endpoint health: of a backend of an outlier-detecting service.
    let endpoints: BTreeSet<(ServiceKey, [u32; 4], u16)> = maps
        .backends
        .iter()
        .filter_map(|(k, b)| {
            let (sk, v) = by_id.get(&k.service_id)?;
            (v.flags & service_flags::OUTLIER != 0).then_some((**sk, b.addr, b.port))
        })
        .collect();
    let stray: Vec<String> = maps
        .endpoint_health
        .iter()
        .filter(|k| !endpoints.contains(&(k.service, k.addr, k.port)))
        .map(|k| {
            format!(
                "{} of {}",
                endpoint_name(k.addr, k.port),
                service_name(&k.service)
            )
        })
        .collect();
    count(
        &mut out,
        map_names::ENDPOINT_HEALTH,
        "endpoints of outlier-detecting services with a failure or an ejection",
        maps.endpoint_health.len() - stray.len(),
        maps.endpoint_health.len(),
        &stray,
    );
    // What open sockets hold.
    let open: u64 = maps.conns.iter().map(|(_, n)| n).sum();
    if open != expect.least_conn && !expect.traffic {
        let held: Vec<String> = maps
            .conns
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{} {n}", endpoint_name(k.addr, k.port)))
            .collect();
        out.push(format!(
            "{}: expected {} open connections in all, found {open} ({})",
            map_names::BACKEND_CONNS,
            expect.least_conn,
            held.join(", ")
        ));
    }
    let open: u64 = maps.service_health.iter().map(|(_, h)| h.conns).sum();
    if open != expect.circuit && !expect.traffic {
        let held: Vec<String> = maps
            .service_health
            .iter()
            .filter(|(_, h)| h.conns > 0)
            .map(|(k, h)| format!("{} {}", service_name(k), h.conns))
            .collect();
        out.push(format!(
            "{}: expected {} open connections in all, found {open} ({})",
            map_names::SERVICE_HEALTH,
            expect.circuit,
            held.join(", ")
        ));
    }
    if !expect.traffic {
        count(
            &mut out,
            map_names::REVERSE,
            "one per redirected socket still open",
            expect.reverse,
            maps.reverse,
            &[],
        );
    }
    if !maps.stray_pins.is_empty() {
        out.push(format!(
            "pins: expected none outside this layout, found {:?}",
            maps.stray_pins
        ));
    }
    let hooks = sockmesh::dataplane::HOOKS.len();
    for (cgroup, n) in &maps.links {
        if *n != hooks {
            out.push(format!("links of {cgroup}: expected {hooks}, found {n}"));
        }
    }
    if let Some(want) = expect.link_cgroups {
        count(
            &mut out,
            "links",
            "cgroups with the programs attached",
            want,
            maps.links.len(),
            &[],
        );
    }
    out
}

/// State sizes that count what happened rather than what is held (types and
/// fields seen): not audited.
const HISTORY: [&str; 2] = ["opaque_types", "unknown_fields"];

/// What is wrong with the agent's own account (its `/config_dump`) against the
/// maps it wrote and `expect`.
pub fn check_agent(dump: &serde_json::Value, maps: &Maps, expect: &Expect) -> Vec<String> {
    let mut out = Vec::new();
    let state: BTreeMap<String, usize> = dump["state"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), usize::try_from(v.as_u64()?).ok()?)))
                .collect()
        })
        .unwrap_or_default();
    if state.is_empty() {
        out.push("the agent's /config_dump has no state sizes".to_owned());
        return out;
    }
    let size = |name: &str| state.get(name).copied().unwrap_or(0);
    let synced = dump["synced"] == serde_json::json!(true);
    let behind = dump["datapath"]["migrating"] == serde_json::json!(true);
    // The agent's count of each map it writes is what the map holds.
    let maglev_tables: BTreeSet<u32> = maps.maglev.iter().map(|k| k.service_id).collect();
    let held: BTreeMap<&str, usize> = [
        (map_names::SERVICES, maps.services.len()),
        (map_names::SERVICE_STATS, maps.stats.len()),
        (map_names::SLOTS, maps.slots.len()),
        (map_names::MAGLEV, maglev_tables.len()),
        (map_names::TIERS, maps.tiers.len()),
        (map_names::BACKENDS, maps.backends.len()),
        (map_names::SERVICE_POLICY, maps.policies.len()),
        (map_names::SERVICE_HEALTH, maps.service_health.len()),
    ]
    .into();
    for m in dump["datapath"]["maps"].as_array().into_iter().flatten() {
        let (Some(name), Some(entries)) = (m["map"].as_str(), m["entries"].as_u64()) else {
            continue;
        };
        if let Some(&want) = held.get(name)
            && usize::try_from(entries).ok() != Some(want)
        {
            out.push(format!(
                "{name}: the agent counts {entries} entries (sockmesh_map_fill_ratio), the map holds {want}"
            ));
        }
    }
    // The accepted table is what the kernel holds.
    if synced && !behind {
        if size("services") != maps.services.len() {
            out.push(format!(
                "agent state services: expected {} (the kernel's), found {}",
                maps.services.len(),
                size("services")
            ));
        }
        if size("backends") != maps.backends.len() {
            out.push(format!(
                "agent state backends: expected {} (the kernel's), found {}",
                maps.backends.len(),
                size("backends")
            ));
        }
    }
    if synced && size("seed_services") != 0 {
        out.push(format!(
            "agent state seed_services: expected 0 once synced, found {}",
            size("seed_services")
        ));
    }
    let Some(x) = expect.xds else {
        return out;
    };
    for (name, want) in [
        ("listeners", x.listeners),
        ("clusters", x.clusters),
        ("routes", x.routes),
        ("endpoints", x.endpoints),
    ] {
        if size(name) != want {
            out.push(format!(
                "agent state {name}: expected {want}, found {}",
                size(name)
            ));
        }
    }
    // Each index is bounded by what it indexes.
    let resources = x.listeners + x.clusters + x.routes + x.endpoints;
    for (name, bound, of) in [
        ("listener_specs", x.listeners, "listeners"),
        ("listener_routes", x.listeners, "listeners"),
        ("listener_notes", x.listeners, "listeners"),
        ("cluster_views", x.clusters, "clusters"),
        ("eds_users", x.clusters, "clusters"),
        ("cluster_users", x.clusters, "clusters"),
        ("dns_answers", x.clusters, "clusters"),
        ("dns_status", x.clusters, "clusters"),
        ("refused", resources, "resources"),
        ("notes_seen", resources, "resources"),
    ] {
        if size(name) > bound {
            out.push(format!(
                "agent state {name}: expected at most {bound} (the {of}), found {}",
                size(name)
            ));
        }
    }
    if resources == 0 {
        for (name, n) in &state {
            if *n != 0 && !HISTORY.contains(&name.as_str()) {
                out.push(format!(
                    "agent state {name}: expected 0 (nothing configured), found {n}"
                ));
            }
        }
    }
    out
}

/// Audits the pins under one bpffs directory, and the agent serving them.
pub struct Audit<'a> {
    bpffs: &'a Path,
    admin: Option<&'a Admin>,
}

impl<'a> Audit<'a> {
    /// The maps pinned under `bpffs` (a datapath without an agent).
    pub fn kernel(bpffs: &'a Path) -> Self {
        Self { bpffs, admin: None }
    }

    /// The maps pinned under `bpffs` and the agent whose admin server is `admin`.
    pub fn agent(bpffs: &'a Path, admin: &'a Admin) -> Self {
        Self {
            bpffs,
            admin: Some(admin),
        }
    }

    /// What is wrong now (empty: nothing).
    pub fn failures(&self, expect: &Expect) -> Vec<String> {
        let maps = match read(self.bpffs) {
            Ok(m) => m,
            Err(e) => return vec![format!("reading the pins: {e}")],
        };
        let mut out = check(&maps, expect);
        if let Some(admin) = self.admin {
            out.extend(check_agent(&admin.dump(), &maps, expect));
        }
        out
    }

    /// Waits until the maps (and the agent) hold what `expect` says, failing the
    /// test with every difference if they do not within 15 s. `what` names the
    /// point of the scenario.
    pub fn assert(&self, what: &str, expect: &Expect) {
        wait_until(
            &format!("leak audit at {what}"),
            Duration::from_secs(15),
            || {
                let failures = self.failures(expect);
                if failures.is_empty() {
                    Ok(())
                } else {
                    Err(format!("\n  {}", failures.join("\n  ")))
                }
            },
        );
    }

    /// Nothing programmed and nothing open: see [`Expect::empty`].
    pub fn assert_empty(&self, what: &str) {
        self.assert(what, &Expect::empty());
    }
}

/// Audits an in-memory store (no root): fails naming each map that holds what
/// `expect` does not imply.
pub fn assert_store(what: &str, st: &sockmesh::dataplane::store::MemStore, expect: &Expect) {
    let failures = check(&of_store(st), expect);
    assert!(
        failures.is_empty(),
        "leak audit at {what}:\n  {}",
        failures.join("\n  ")
    );
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;
