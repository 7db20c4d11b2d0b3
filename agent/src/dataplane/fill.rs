//! How full each map is (`sockmesh_map_fill_ratio`, `maps` in `/config_dump`),
//! and one warning per map that fills.
//!
//! Every map with a capacity is in [`SIZED`]; the others, and why they have no
//! fill ratio, are in [`UNSIZED`]. Entries are counted where it is cheap:
//! - maps the agent writes: its own bookkeeping (`MapWriter::entries`), kept
//!   current with every write, no syscall;
//! - maps the kernel programs fill (`SM_REVERSE`, `SM_REVERSE_UDP`,
//!   `SM_EP_HEALTH`, `SM_BACKEND_CONNS`): the kernel counts them in batches
//!   (`BPF_MAP_LOOKUP_BATCH`, a thousand entries a call) on the datapath task's
//!   tick, at most once a second and no more often than keeps the counting
//!   under 1 % of a CPU (a count that took 10 ms waits 1 s for the next). The
//!   programs keep no count of their own to read instead: they insert and delete
//!   without one (an atomic on every connect and close to save one syscall per
//!   thousand entries a second). `SM_EP_HEALTH` and `SM_BACKEND_CONNS`, which
//!   the programs fill only for some services, are neither counted nor walked
//!   by `/metrics` once known empty with no such service installed
//!   ([`Feeding`]): sized for every backend of the node, each walk visits a
//!   million buckets.
//!
//! A map is full when it holds its capacity, or when it refused an entry since
//! the last look: an agent write answered `E2BIG`, or the kernel programs'
//! `reverse_full` counter rose (`SM_REVERSE`). One warning names the map and
//! the flag that sizes it when it fills; it has room again once it holds less
//! than [`ROOM_AGAIN`] of its capacity with no refusal since, and the next time
//! it fills warns again.

use std::{collections::BTreeMap, os::fd::AsFd as _, time::Instant};

use aya::maps::{Map, MapData, PerCpuArray};
use sockmesh_common::{counter, map_names};
use tracing::{debug, info, warn};

use super::{
    DataplaneError, Limits, PinLayout,
    mirror::MapEntries,
    store::{MapName, Refusals},
    sys,
};

/// Who adds a map's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilledBy {
    /// The agent (`MapWriter`): counted by its bookkeeping.
    Agent,
    /// The kernel programs: counted by iterating the map.
    Kernel,
}

/// A map with a capacity.
#[derive(Clone, Copy, Debug)]
pub struct Sized {
    /// Its pin name.
    pub map: &'static str,
    /// Its `map` label in `sockmesh_map_fill_ratio`.
    pub label: &'static str,
    /// The flag that sizes it.
    pub flag: &'static str,
    pub filled_by: FilledBy,
    /// What an entry it refuses costs.
    pub refused: &'static str,
}

/// Every map with a capacity.
pub const SIZED: [Sized; 12] = [
    Sized {
        map: map_names::SERVICES,
        label: "services",
        flag: "--max-services",
        filled_by: FilledBy::Agent,
        refused: "services past it are not programmed (limited: see /config_dump)",
    },
    Sized {
        map: map_names::SERVICE_STATS,
        label: "service_stats",
        flag: "--max-services",
        filled_by: FilledBy::Agent,
        refused: "a service without its entry is not counted per service",
    },
    Sized {
        map: map_names::SLOTS,
        label: "slots",
        flag: "--max-slots",
        filled_by: FilledBy::Agent,
        refused: "services whose slots do not fit are not programmed as asked (limited)",
    },
    Sized {
        map: map_names::MAGLEV,
        label: "maglev",
        flag: "--max-maglev-services",
        filled_by: FilledBy::Agent,
        refused: "consistent-hash services past it are not programmed (limited)",
    },
    Sized {
        map: map_names::TIERS,
        label: "tiers",
        flag: "--max-services",
        filled_by: FilledBy::Agent,
        refused: "a service with priority levels cannot be published",
    },
    Sized {
        map: map_names::BACKENDS,
        label: "backends",
        flag: "--max-backends",
        filled_by: FilledBy::Agent,
        refused: "services whose backends do not fit are not programmed as asked (limited)",
    },
    Sized {
        map: map_names::SERVICE_POLICY,
        label: "service_policy",
        flag: "--max-services",
        filled_by: FilledBy::Agent,
        refused: "a service with outlier detection or a circuit breaker cannot be published",
    },
    Sized {
        map: map_names::SERVICE_HEALTH,
        label: "service_health",
        flag: "--max-services",
        filled_by: FilledBy::Agent,
        refused: "a service with outlier detection or a circuit breaker cannot be published",
    },
    Sized {
        map: map_names::ENDPOINT_HEALTH,
        label: "endpoint_health",
        flag: "--max-backends",
        filled_by: FilledBy::Kernel,
        refused: "failed connects to an endpoint without an entry do not count toward its ejection",
    },
    Sized {
        map: map_names::BACKEND_CONNS,
        label: "backend_conns",
        flag: "--max-backends",
        filled_by: FilledBy::Kernel,
        refused: "connections to an endpoint without an entry are placed but not counted (least connections)",
    },
    Sized {
        map: map_names::REVERSE,
        label: "reverse",
        flag: "--max-reverse",
        filled_by: FilledBy::Kernel,
        refused: "sockets past it show the backend to getpeername(), and --terminate-removed-connections cannot find them",
    },
    Sized {
        map: map_names::REVERSE_UDP,
        label: "reverse_udp",
        flag: "--max-reverse-udp",
        filled_by: FilledBy::Kernel,
        refused: "the LRU evicts the oldest peers: a late reply from a DNS VIP's backend shows the backend",
    },
];

/// The maps without a fill ratio, and why.
pub const UNSIZED: [(&str, &str); 6] = [
    (
        map_names::COUNTERS,
        "a per-CPU array of a fixed set of counters, all there from creation: it holds counts, not entries",
    ),
    (
        map_names::SCRATCH,
        "a per-CPU array of one scratch word the programs write and read back",
    ),
    (
        map_names::EVENTS,
        "a ring buffer of bytes the agent drains as they come; an event that finds no room is dropped and the agent rereads every ejection once a second",
    ),
    (
        map_names::SOCK_CONNS,
        "socket storage: one value per socket, created and freed with the socket; no capacity",
    ),
    (
        map_names::SOCK_REVERSE,
        "socket storage: one value per socket, created and freed with the socket; no capacity",
    ),
    (
        map_names::SOCK_HEALTH,
        "socket storage: one value per socket, created and freed with the socket; no capacity",
    ),
];

/// Below this fraction of its capacity, with no refusal since, a full map has
/// room again (a map that hovers at its capacity warns once, not at every entry
/// freed and taken again).
pub const ROOM_AGAIN: f64 = 0.9;

/// One map's fill.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapFill {
    /// Its pin name.
    pub map: String,
    /// Its `map` label in `sockmesh_map_fill_ratio`.
    pub label: String,
    /// The flag that sizes it.
    pub flag: String,
    /// Entries it holds (for `SM_MAGLEV`, tables: `--max-maglev-services`
    /// counts those, and the map holds one more of the largest size).
    pub entries: u64,
    pub capacity: u64,
    /// Full since it last had room (see [`ROOM_AGAIN`]).
    pub full: bool,
    /// It may hold entries now, so a reader of its entries must walk it (see
    /// [`Feeding`]); an empty map sized for a million entries costs a walk of
    /// its million buckets all the same. Not in `/config_dump`.
    #[serde(skip)]
    pub may_hold: bool,
}

impl MapFill {
    /// Used fraction of its capacity.
    #[expect(
        clippy::cast_precision_loss,
        reason = "entries and capacities are below 2^32, exact in an f64"
    )]
    pub fn ratio(&self) -> f64 {
        self.entries as f64 / self.capacity.max(1) as f64
    }
}

/// What became of a map at one look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Filled,
    HasRoom,
}

#[derive(Clone, Copy, Debug, Default)]
struct Watch {
    full: bool,
    /// Refusals seen at the last look.
    refused: u64,
}

/// Which maps are full, from one look to the next.
#[derive(Debug, Default)]
pub struct FullWatch {
    maps: BTreeMap<String, Watch>,
}

impl FullWatch {
    /// Looks at `map` holding `entries` of `capacity`, having refused
    /// `refused` entries in all (a counter that only grows). Refusals before the
    /// first look are history: they do not make it full.
    pub fn observe(
        &mut self,
        map: &str,
        entries: u64,
        capacity: u64,
        refused: u64,
    ) -> Option<Change> {
        let first = !self.maps.contains_key(map);
        let w = self.maps.entry(map.to_owned()).or_default();
        let refused_now = !first && refused > w.refused;
        w.refused = refused;
        let at_capacity = capacity > 0 && entries >= capacity;
        #[expect(
            clippy::cast_precision_loss,
            reason = "entries and capacities are below 2^32, exact in an f64"
        )]
        let room = (entries as f64) < ROOM_AGAIN * capacity as f64;
        if !w.full && (at_capacity || refused_now) {
            w.full = true;
            return Some(Change::Filled);
        }
        if w.full && room && !refused_now {
            w.full = false;
            return Some(Change::HasRoom);
        }
        None
    }

    /// Whether `map` is full now.
    pub fn is_full(&self, map: &str) -> bool {
        self.maps.get(map).is_some_and(|w| w.full)
    }
}

/// The fill of every map in [`SIZED`]: the agent's maps from `entries`, the
/// kernel's from `counted`, capacities from `capacity` (`SM_MAGLEV`'s is
/// `--max-maglev-services`, in tables). Each map goes past `watch`, which logs a
/// warning when one fills; `refused` gives the refusals of each map so far.
pub fn fills(
    entries: &MapEntries,
    counted: &BTreeMap<&'static str, u64>,
    feeding: &BTreeMap<&'static str, Feeding>,
    capacity: &BTreeMap<&'static str, u64>,
    refused: &BTreeMap<&'static str, u64>,
    watch: &mut FullWatch,
) -> Vec<MapFill> {
    SIZED
        .iter()
        .map(|m| {
            let entries = match m.filled_by {
                FilledBy::Agent => agent_entries(entries, m.map),
                FilledBy::Kernel => counted.get(m.map).copied().unwrap_or(0),
            };
            let capacity = capacity.get(m.map).copied().unwrap_or(0);
            let refused = refused.get(m.map).copied().unwrap_or(0);
            match watch.observe(m.map, entries, capacity, refused) {
                Some(Change::Filled) => warn!(
                    map = m.map,
                    flag = m.flag,
                    entries,
                    capacity,
                    "map {} is full: {}; raise {} (at install: pinned maps keep their size)",
                    m.map,
                    m.refused,
                    m.flag
                ),
                Some(Change::HasRoom) => {
                    info!(map = m.map, entries, capacity, "map has room again")
                }
                None => {}
            }
            let may_hold = match m.filled_by {
                FilledBy::Agent => entries > 0,
                FilledBy::Kernel => feeding.get(m.map).is_none_or(Feeding::may_hold),
            };
            MapFill {
                map: m.map.to_owned(),
                label: m.label.to_owned(),
                flag: m.flag.to_owned(),
                entries,
                capacity,
                full: watch.is_full(m.map),
                may_hold,
            }
        })
        .collect()
}

/// Whether a kernel-filled map the programs fill only for some services may
/// hold entries, without walking it at every look: `SM_EP_HEALTH` (an entry at
/// an endpoint's first failed connect, for a service with an `SM_SVC_POLICY`
/// entry that detects outliers) and `SM_BACKEND_CONNS` (a count at each connect
/// of a least-connections service). It may while such a service is installed;
/// after the last one goes, until two counts in a row found it empty: an entry
/// made by a program that read the service's policy before it went is in the
/// map before the second count (a program runs for microseconds, the counts
/// are a second or more apart), and entries left with open connections or
/// awaiting the sweep keep it counted non-empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Feeding {
    /// Entries at the last count (`None`: not counted yet).
    counted: Option<u64>,
    /// Such a service was installed since the last count.
    fed_since: bool,
    /// Such a service was installed between the two last counts.
    fed_before: bool,
}

impl Feeding {
    /// A look at the agent's bookkeeping: `fed` if such a service is installed.
    pub fn looked(&mut self, fed: bool) {
        self.fed_since |= fed;
    }

    /// A count of the map found `entries`, with such a service installed now
    /// if `fed`.
    pub fn counted(&mut self, entries: u64, fed: bool) {
        self.fed_before = self.fed_since;
        self.fed_since = fed;
        self.counted = Some(entries);
    }

    /// Whether the map may hold entries.
    pub fn may_hold(&self) -> bool {
        self.counted.is_none_or(|n| n > 0) || self.fed_since || self.fed_before
    }
}

/// Whether map `name` may hold entries, by `maps` (a map not among them may).
pub fn may_hold(maps: &[MapFill], name: &str) -> bool {
    maps.iter()
        .find(|m| m.map == name)
        .is_none_or(|m| m.may_hold)
}

/// Whether the programs fill kernel-filled `map` now, for the maps they fill
/// only for some services (see [`Feeding`]).
fn fed(map: &str, entries: &MapEntries) -> Option<bool> {
    match map {
        map_names::ENDPOINT_HEALTH => Some(entries.policies > 0),
        map_names::BACKEND_CONNS => Some(entries.least_conn > 0),
        _ => None,
    }
}

/// The writer's count of an agent-written map's entries.
fn agent_entries(e: &MapEntries, map: &str) -> u64 {
    let n = match map {
        map_names::SERVICES => e.services,
        map_names::SERVICE_STATS => e.stats,
        map_names::SLOTS => e.slots,
        map_names::MAGLEV => e.maglev_tables,
        map_names::TIERS => e.tiers,
        map_names::BACKENDS => e.backends,
        map_names::SERVICE_POLICY => e.policies,
        map_names::SERVICE_HEALTH => e.service_health,
        _ => 0,
    };
    n as u64
}

/// The fill of the routing maps from what a table takes and the limits, for a
/// datapath without kernel maps (tests' sinks).
pub fn from_usage(usage: &crate::model::Usage, limits: &Limits) -> Vec<MapFill> {
    let row = |map: &str, label: &str, flag: &str, entries: usize, capacity: u32| MapFill {
        map: map.to_owned(),
        label: label.to_owned(),
        flag: flag.to_owned(),
        entries: entries as u64,
        capacity: u64::from(capacity),
        full: false,
        may_hold: entries > 0,
    };
    vec![
        row(
            map_names::SERVICES,
            "services",
            "--max-services",
            usage.services,
            limits.services,
        ),
        row(
            map_names::SLOTS,
            "slots",
            "--max-slots",
            usage.slots,
            limits.slots,
        ),
        row(
            map_names::MAGLEV,
            "maglev",
            "--max-maglev-services",
            usage.maglev,
            limits.maglev,
        ),
        row(
            map_names::BACKENDS,
            "backends",
            "--max-backends",
            usage.backends,
            limits.backends,
        ),
    ]
}

/// A kernel-filled map, open for counting.
struct Counted {
    map: &'static str,
    data: MapData,
    key_size: usize,
    value_size: usize,
}

/// The pinned maps' capacities and the kernel-filled maps' counts, kept by the
/// datapath.
pub struct FillState {
    capacity: BTreeMap<&'static str, u64>,
    kernel: Vec<Counted>,
    counted: BTreeMap<&'static str, u64>,
    feeding: BTreeMap<&'static str, Feeding>,
    counters: PerCpuArray<MapData, u64>,
    /// When the kernel-filled maps may be counted next.
    next_count: Option<Instant>,
    watch: FullWatch,
}

/// Counting the kernel-filled maps takes at most this share of a CPU.
const COUNT_SHARE: u32 = 100;

impl FillState {
    /// Opens the maps pinned for `layout`, whose Maglev limit is `limits.maglev`.
    pub fn open(layout: &PinLayout, limits: &Limits) -> Result<Self, DataplaneError> {
        let open = |name: &'static str| {
            let dir = if map_names::CONNS.contains(&name) {
                &layout.conns
            } else if map_names::HEALTH.contains(&name) {
                &layout.health
            } else {
                &layout.maps
            };
            MapData::from_pin(dir.join(name)).map_err(|source| DataplaneError::Map { name, source })
        };
        let mut capacity = BTreeMap::new();
        let mut kernel = Vec::new();
        for m in &SIZED {
            let data = open(m.map)?;
            let info = data.info().map_err(|source| DataplaneError::Map {
                name: m.map,
                source,
            })?;
            let max = if m.map == map_names::MAGLEV {
                u64::from(limits.maglev)
            } else {
                u64::from(info.max_entries())
            };
            capacity.insert(m.map, max);
            if m.filled_by == FilledBy::Kernel {
                kernel.push(Counted {
                    map: m.map,
                    data,
                    key_size: info.key_size() as usize,
                    value_size: info.value_size() as usize,
                });
            }
        }
        let counters = PerCpuArray::try_from(Map::PerCpuArray(open(map_names::COUNTERS)?))
            .map_err(|source| DataplaneError::Map {
                name: map_names::COUNTERS,
                source,
            })?;
        Ok(Self {
            capacity,
            kernel,
            counted: BTreeMap::new(),
            feeding: BTreeMap::new(),
            counters,
            next_count: None,
            watch: FullWatch::default(),
        })
    }

    /// Whether kernel-filled map `map` may hold entries (see [`Feeding`]).
    pub fn may_hold(&self, map: &str) -> bool {
        self.feeding.get(map).is_none_or(Feeding::may_hold)
    }

    /// Every map's fill, with the agent's maps' entries and refusals given;
    /// with `recount`, the kernel-filled maps are counted again if their turn
    /// has come (see the module's doc).
    pub fn observe(
        &mut self,
        entries: &MapEntries,
        refusals: &Refusals,
        recount: bool,
        now: Instant,
    ) -> Vec<MapFill> {
        for m in &self.kernel {
            if let Some(fed) = fed(m.map, entries) {
                self.feeding.entry(m.map).or_default().looked(fed);
            }
        }
        if recount && self.next_count.is_none_or(|t| now >= t) {
            let started = Instant::now();
            for m in &self.kernel {
                // Known empty, and nothing fills it: its count stays 0.
                if !self.feeding.get(m.map).is_none_or(Feeding::may_hold) {
                    continue;
                }
                match sys::map_count(m.data.fd().as_fd(), m.key_size, m.value_size) {
                    Ok(n) => {
                        self.counted.insert(m.map, n);
                        if let Some(fed) = fed(m.map, entries) {
                            self.feeding.entry(m.map).or_default().counted(n, fed);
                        }
                    }
                    Err(e) => debug!(map = m.map, error = %e, "counting the map's entries failed"),
                }
            }
            let took = started.elapsed();
            self.next_count = Some(now + took.saturating_mul(COUNT_SHARE));
        }
        let mut refused: BTreeMap<&'static str, u64> = MapName::ALL
            .iter()
            .map(|m| (m.as_str(), refusals.of(*m)))
            .collect();
        let reverse_full = self
            .counters
            .get(&counter::REVERSE_FULL, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0);
        refused.insert(map_names::REVERSE, reverse_full);
        fills(
            entries,
            &self.counted,
            &self.feeding,
            &self.capacity,
            &refused,
            &mut self.watch,
        )
    }
}

#[cfg(test)]
#[path = "fill_tests.rs"]
mod tests;
