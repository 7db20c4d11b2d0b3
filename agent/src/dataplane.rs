//! The kernel datapath: load, attach, pin, adopt, and write the routing table.
//!
//! [`Datapath::install`] is the one entry point for the agent: it leaves the
//! programs attached to the cgroup and the maps pinned, so the datapath keeps
//! working when the agent exits; run again, it adopts what is pinned instead of
//! wiping it. [`Datapath::apply`] makes the maps hold a routing table, writing only
//! what differs. [`read_table`], [`read_counters`] and [`uninstall`] work on the
//! pins alone, without an agent.

mod cgroups;
#[cfg(test)]
mod contract;
mod counters;
pub mod destroy;
mod entries;
pub mod events;
pub mod features;
pub mod fill;
mod kernel;
mod keys;
mod loader;
mod mirror;
pub mod published;
mod sink;
pub mod store;
mod sys;
pub mod task;
pub use counters::Counts as ServiceCounts;
mod writer;

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

pub use crate::model::Limits;
use aya::Ebpf;
pub use cgroups::{AttachScope, EnrollReport};
pub use keys::{service_key, words_to_ip};
pub use loader::{
    Attachment, PinLayout, attached_program_run_stats, attached_program_work, attached_programs,
    cgroup2_root, enable_run_stats,
};
pub use mirror::table_from_snapshot;
pub use sockmesh_common::hooks::HOOKS;
use sockmesh_common::map_names;
use tracing::info;
pub use writer::{ApplyReport, MapWriter, WriteError};

pub use self::kernel::{KernelMaps, WrittenMaps};
use crate::model::RoutingTable;

/// Why the datapath could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Kernel(#[from] features::FeatureError),
    #[error("{path} is not on a bpffs (mount one with `mount -t bpf bpf {path}`)", path = path.display())]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs at {}", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {} does not exist", path.display())]
    CgroupNotFound { path: PathBuf },
    #[error("{} is not a cgroup v2 directory", path.display())]
    NotCgroup2 { path: PathBuf },
    #[error(
        "{} is the root of the cgroup hierarchy: every process on the node would be redirected; pass --allow-root-cgroup if that is intended",
        path.display()
    )]
    RootCgroup { path: PathBuf },
    #[error(
        "the datapath pinned at {} is attached to another cgroup; uninstall it first (this cgroup's id is {cgroup_id})",
        pins.display()
    )]
    OtherCgroup { pins: PathBuf, cgroup_id: u64 },
    #[error("this datapath serves one cgroup (--cgroup); it does not enroll pods")]
    NotEnrolling,
    #[error("no sockmesh datapath is pinned at {} (is the agent installed with this --bpffs?)", path.display())]
    NotInstalled { path: PathBuf },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the kernel object")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("the kernel object has no map {name}")]
    MissingMap { name: &'static str },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("link of program {name}")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("replacing program {name} in its pinned link")]
    LinkUpdate {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("replacing program {name} in its pinned link")]
    LinkReplace {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning at {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// Where the datapath lives.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// A directory on bpffs; pins go under `<bpffs>/v<LAYOUT_VERSION>/`.
    pub bpffs: PathBuf,
    /// The cgroup v2 directory whose processes are load balanced
    /// ([`AttachScope::Cgroup`]), or below which the enrolled pods' cgroups are
    /// ([`AttachScope::EnrolledPods`]).
    pub cgroup: PathBuf,
    /// Attach at `cgroup`, or to each enrolled pod's cgroup below it.
    pub scope: AttachScope,
    /// Permit attaching to the root of the cgroup hierarchy (every process).
    pub allow_root_cgroup: bool,
    /// Map capacities for a fresh install (pinned maps keep theirs).
    pub limits: Limits,
    /// Least-connections candidates drawn with replacement, as Envoy does.
    pub envoy_draws: bool,
}

/// An installed datapath owned by this process.
pub struct Datapath {
    /// Keeps the loaded programs and map descriptors open while we run.
    ebpf: Ebpf,
    writer: MapWriter<KernelMaps>,
    layout: PinLayout,
    attachment: Attachment,
    /// Set while another layout's datapath serves the cgroup (see [`Self::activate`]).
    pending: Option<Pending>,
    /// Layout versions this datapath detached and removed.
    retired: Vec<u32>,
    /// The kernel programs' events, until the datapath task takes them.
    events: Option<events::Events>,
    /// The `--cgroup` directory.
    root: PathBuf,
    /// The enrolled pods' links ([`AttachScope::EnrolledPods`]; `None`: one cgroup).
    pods: Option<cgroups::PodLinks>,
    /// The maps' capacities, the kernel-filled maps' counts, which are full.
    fill: fill::FillState,
}

/// A datapath built beside another layout's, not attached yet.
struct Pending {
    cgroup: std::fs::File,
    cgroup_id: u64,
    /// The layouts to retire once this one is attached: (version, pins).
    others: Vec<(u32, PinLayout)>,
}

/// What [`Datapath::activate`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    /// Layout versions whose datapath was detached and whose pins were removed.
    pub retired: Vec<u32>,
    /// Pins removed.
    pub pins_removed: usize,
}

impl Datapath {
    /// Loads and attaches the datapath, or adopts the pinned one. If another
    /// layout's datapath serves the cgroup, the new one is built but left unattached
    /// ([`Attachment::Pending`]) until [`Self::activate`].
    pub fn install(cfg: &DatapathConfig) -> Result<Self, DataplaneError> {
        let features = features::probe()?;
        loader::ensure_bpffs(&cfg.bpffs)?;
        let (cgroup, cgroup_id) = loader::open_cgroup(&cfg.cgroup, cfg.allow_root_cgroup)?;
        let layout = PinLayout::new(&cfg.bpffs);
        let others = loader::other_layouts(&cfg.bpffs);
        let enrolling = cfg.scope == AttachScope::EnrolledPods;
        for (_, other) in &others {
            // Retiring a layout that serves another cgroup would take its datapath
            // away (an enrolling one serves many, below its root).
            if enrolling {
                cgroups::refuse_outside(other, &cfg.cgroup)?;
            } else {
                loader::refuse_other_cgroups(other, cgroup_id)?;
            }
        }
        let mut ebpf = loader::load(&layout, &cfg.limits, &features)?;
        loader::load_programs(&mut ebpf)?;
        // Our links already pinned means an earlier run of this layout filled the maps
        // and attached (perhaps stopping before it retired the others).
        let mut retired = Vec::new();
        let ours_pinned = if enrolling {
            !cgroups::pinned_cgroups(&layout).is_empty()
        } else {
            loader::links_pinned(&layout, cgroup_id)
        };
        let mut pods = None;
        let (attachment, pending) = if others.is_empty() || ours_pinned {
            let attachment = if enrolling {
                // Every enrolled cgroup's links get this build's programs now; the
                // pods to attach and to prune come from the caller's enrollment.
                let adopted = cgroups::adopt(&ebpf, &layout)?;
                let attachment = if adopted.is_empty() {
                    Attachment::Attached
                } else {
                    Attachment::Adopted
                };
                pods = Some(adopted);
                attachment
            } else {
                loader::refuse_other_cgroups(&layout, cgroup_id)?;
                loader::attach(&mut ebpf, &layout, cgroup.as_fd(), cgroup_id)?
            };
            if !others.is_empty() {
                let pins = retire(&others)?;
                retired = others.iter().map(|(v, _)| *v).collect();
                info!(?retired, pins, "removed the datapath of other pin layouts");
            }
            (attachment, None)
        } else {
            info!(
                other_layouts = ?others.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
                layout = sockmesh_common::LAYOUT_VERSION,
                "another pin layout serves this cgroup: building this layout beside it; it \
                 attaches once filled from the control plane"
            );
            if enrolling {
                pods = Some(cgroups::PodLinks::default());
            }
            let pending = Pending {
                cgroup,
                cgroup_id,
                others,
            };
            (Attachment::Pending, Some(pending))
        };
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DataplaneError::MissingMap { name })
        };
        let maps = KernelMaps::new(WrittenMaps {
            services: take(map_names::SERVICES)?,
            slots: take(map_names::SLOTS)?,
            backends: take(map_names::BACKENDS)?,
            maglev: take(map_names::MAGLEV)?,
            stats: take(map_names::SERVICE_STATS)?,
            policies: take(map_names::SERVICE_POLICY)?,
            endpoint_health: take(map_names::ENDPOINT_HEALTH)?,
            service_health: take(map_names::SERVICE_HEALTH)?,
            tiers: take(map_names::TIERS)?,
        })?;
        let events = take(map_names::EVENTS).and_then(|m| {
            aya::maps::RingBuf::try_from(m).map_err(|source| DataplaneError::Map {
                name: map_names::EVENTS,
                source,
            })
        })?;
        let limits = loader::pinned_limits(&layout)?;
        if limits != cfg.limits {
            tracing::warn!(
                requested = ?cfg.limits,
                pinned = ?limits,
                "the pinned maps keep the capacities they were created with; uninstall to resize"
            );
        }
        let writer = MapWriter::adopt(maps)?
            .with_limits(limits)
            .with_envoy_draws(cfg.envoy_draws);
        let fill = fill::FillState::open(&layout, &limits)?;
        let services = writer.table().services.len();
        info!(
            cgroup = %cfg.cgroup.display(),
            scope = ?cfg.scope,
            pins = %layout.root.display(),
            ?attachment,
            services,
            "datapath ready"
        );
        Ok(Self {
            ebpf,
            writer,
            layout,
            attachment,
            pending,
            retired,
            events: Some(events::Events::new(events)),
            root: cfg.cgroup.clone(),
            pods,
            fill,
        })
    }

    /// The other layout versions this datapath detached and removed.
    pub fn retired(&self) -> &[u32] {
        &self.retired
    }

    /// Whether this datapath waits to be attached (another layout serves meanwhile).
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Attaches a pending datapath, then detaches the other layouts' programs and
    /// removes their pins. Call it once the maps hold the control plane's table.
    /// `Ok(None)` if nothing was pending.
    pub fn activate(&mut self) -> Result<Option<Migration>, DataplaneError> {
        let Some(p) = self.pending.as_ref() else {
            return Ok(None);
        };
        if self.pods.is_some() {
            self.attach_enrolled()?;
        } else {
            loader::refuse_other_cgroups(&self.layout, p.cgroup_id)?;
            loader::attach(&mut self.ebpf, &self.layout, p.cgroup.as_fd(), p.cgroup_id)?;
        }
        let Some(p) = self.pending.as_ref() else {
            return Ok(None);
        };
        let pins_removed = retire(&p.others)?;
        let retired: Vec<u32> = p.others.iter().map(|(v, _)| *v).collect();
        self.retired.extend(&retired);
        self.pending = None;
        self.attachment = Attachment::Migrated;
        Ok(Some(Migration {
            retired,
            pins_removed,
        }))
    }

    /// Rewrites the levels' choice tables to the ejections running (see
    /// [`MapWriter::refresh_levels`]).
    pub fn refresh_levels(
        &mut self,
        only: Option<&[sockmesh_common::ServiceKey]>,
    ) -> Result<Option<u64>, WriteError> {
        self.writer.refresh_levels(only)
    }

    /// The levels of the services that have them, as written (see
    /// [`MapWriter::published_levels`]).
    pub fn published_levels(
        &self,
        only: Option<&std::collections::BTreeSet<crate::model::ServiceAddr>>,
        previous: &published::PublishedMap,
    ) -> published::PublishedMap {
        self.writer.published_levels(only, previous)
    }

    /// The kernel programs' events, once.
    pub fn take_events(&mut self) -> Option<events::Events> {
        self.events.take()
    }

    /// Draws least-connections candidates with replacement, as Envoy does
    /// (`--least-request-draws envoy`), from the next write on.
    pub fn set_envoy_draws(&mut self, envoy_draws: bool) {
        self.writer.set_envoy_draws(envoy_draws);
    }

    /// Makes the kernel maps hold `table`, writing only the difference.
    pub fn apply(&mut self, table: &RoutingTable) -> Result<ApplyReport, WriteError> {
        self.writer.apply(table)
    }

    /// Changes some services (`None`: remove), leaving the others untouched.
    pub fn apply_changes(
        &mut self,
        changes: &crate::model::Changes,
    ) -> Result<ApplyReport, WriteError> {
        self.writer.apply_changes(changes)
    }

    /// Aborts sockets that sockmesh redirected to `targets`, in every network
    /// namespace (see [`destroy`]).
    pub fn terminate(
        &self,
        targets: &std::collections::BTreeSet<crate::model::Endpoint>,
    ) -> Result<destroy::DestroyReport, destroy::DestroyError> {
        destroy::destroy_everywhere(&self.layout.maps, targets)
    }

    /// The table installed in the kernel.
    pub fn table(&self) -> RoutingTable {
        self.writer.table()
    }

    /// Deletes the open-connection counts at 0 of endpoints no service holds any
    /// more (pods gone), so `SM_BACKEND_CONNS` does not fill with them; returns
    /// how many. An entry with open connections stays until they close. (A connect
    /// racing the delete can lose one count of an endpoint no service holds; its
    /// release then finds no entry, and nothing goes below zero.)
    pub fn sweep_conns(&mut self) -> Result<usize, DataplaneError> {
        let name = sockmesh_common::map_names::BACKEND_CONNS;
        if !self.fill.may_hold(name) {
            return Ok(0);
        }
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap { name })?;
        let conv = |source| DataplaneError::Map { name, source };
        let mut conns: aya::maps::HashMap<&mut aya::maps::MapData, sockmesh_common::ConnKey, u64> =
            aya::maps::HashMap::try_from(map).map_err(conv)?;
        let idle: Vec<sockmesh_common::ConnKey> = conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, n)| *n == 0)
            .map(|(k, _)| k)
            .collect();
        if idle.is_empty() {
            return Ok(0);
        }
        // The endpoints of every service (a million at 100,000 services): only
        // when there are idle counts to look up.
        let live: std::collections::HashSet<sockmesh_common::ConnKey> = self
            .writer
            .table()
            .services
            .iter()
            .flat_map(|(s, b)| {
                b.iter().map(move |b| sockmesh_common::ConnKey {
                    addr: keys::ip_to_words(b.address),
                    port: keys::port_to_map(b.port),
                    proto: s.protocol.number(),
                    pad: 0,
                })
            })
            .collect();
        let mut removed = 0;
        for k in idle.into_iter().filter(|k| !live.contains(k)) {
            if conns.remove(&k).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Deletes the health entries the kernel made for endpoints their service
    /// no longer has (see [`MapWriter::sweep_endpoint_health`]); returns how
    /// many.
    pub fn sweep_endpoint_health(&mut self) -> Result<usize, WriteError> {
        if !self
            .fill
            .may_hold(sockmesh_common::map_names::ENDPOINT_HEALTH)
        {
            return Ok(0);
        }
        self.writer.sweep_endpoint_health()
    }

    /// What the kernel's maps hold (services, backends, slots).
    pub fn usage(&self) -> crate::model::Usage {
        self.writer.usage()
    }

    /// The maps' capacities.
    pub fn limits(&self) -> Limits {
        self.writer.limits()
    }

    /// How full each map is (see [`fill`]); with `recount`, the maps the kernel
    /// programs fill are counted again if their turn has come. Logs a warning
    /// when a map fills.
    pub fn map_fill(&mut self, recount: bool) -> Vec<fill::MapFill> {
        use store::MapStore as _;
        self.fill.observe(
            &self.writer.entries(),
            &self.writer.store().refusals(),
            recount,
            std::time::Instant::now(),
        )
    }

    /// Whether this process attached the programs or adopted pinned ones.
    pub fn attachment(&self) -> Attachment {
        self.attachment
    }

    /// The pin paths.
    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// The kernel's outlier detection and circuit breaking state (read at
    /// every tick: a map that holds no entries is not walked).
    pub fn health(&self) -> Result<HealthReport, DataplaneError> {
        health_report(
            &self.layout.health,
            self.fill
                .may_hold(sockmesh_common::map_names::ENDPOINT_HEALTH),
            self.writer.entries().service_health > 0,
        )
    }
}

/// The routing table held by the maps pinned under `bpffs` (no agent needed).
pub fn read_table(bpffs: &Path) -> Result<RoutingTable, DataplaneError> {
    use store::MapStore as _;
    let layout = PinLayout::new(bpffs);
    let maps = KernelMaps::open_pinned(&layout)?;
    let snapshot = maps
        .snapshot()
        .map_err(|e| DataplaneError::Write(WriteError::Snapshot(e)))?;
    Ok(table_from_snapshot(&snapshot))
}

/// Opens the routing maps pinned under `bpffs` for reading single services
/// ([`KernelMaps::reachable`]).
pub fn open_pinned(bpffs: &Path) -> Result<KernelMaps, DataplaneError> {
    KernelMaps::open_pinned(&PinLayout::new(bpffs))
}

/// The datapath counters pinned under `bpffs`, summed over CPUs.
pub fn read_counters(bpffs: &Path) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
    kernel::read_counters(&PinLayout::new(bpffs).maps)
}

/// Per-service counters pinned under `bpffs`, by service.
pub fn read_service_counters(
    bpffs: &Path,
) -> Result<Vec<(crate::model::ServiceAddr, ServiceCounts)>, DataplaneError> {
    let mut out = kernel::read_service_stats_as(&PinLayout::new(bpffs).maps, |_, k, v| {
        Some((keys::service_addr(&k)?, v))
    })?;
    out.sort_unstable_by_key(|(s, _)| *s);
    Ok(out)
}

/// The per-service counters pinned under `bpffs` (`SM_SERVICE_STATS`), mapped
/// read-only, for a reader that walks them without a list (`/metrics`, which
/// reads 100,000 slots at every scrape).
pub struct ServiceCounters(counters::CounterArray);

impl ServiceCounters {
    pub fn open(bpffs: &Path) -> Result<Self, DataplaneError> {
        kernel::open_counter_array(&PinLayout::new(bpffs).maps).map(Self)
    }

    /// Every service with counters and its counts, in slot order.
    pub fn for_each(&self, f: &mut dyn FnMut(&crate::model::ServiceAddr, &ServiceCounts)) {
        self.0.for_each(|_, k, counts| {
            if let Some(service) = keys::service_addr(&k) {
                f(&service, &counts);
            }
        });
    }
}

/// The claimed counter slots pinned under `bpffs` (`SM_SERVICE_STATS`): each
/// slot, the service it names and its counts, in slot order.
#[cfg(any(test, feature = "testing"))]
pub fn read_counter_slots(
    bpffs: &Path,
) -> Result<Vec<(u32, sockmesh_common::ServiceKey, ServiceCounts)>, DataplaneError> {
    kernel::read_service_stats_as(&PinLayout::new(bpffs).maps, |s, k, v| Some((s, k, v)))
}

/// Open connections counted per backend endpoint (least-connections services),
/// by endpoint; an endpoint at 0 may be listed.
pub fn read_conns(bpffs: &Path) -> Result<Vec<(crate::model::Endpoint, u64)>, DataplaneError> {
    conns_report(bpffs, true)
}

/// [`read_conns`], empty without a walk where `maps` says `SM_BACKEND_CONNS`
/// holds no entries (as [`read_health_in`]).
pub fn read_conns_in(
    bpffs: &Path,
    maps: &[fill::MapFill],
) -> Result<Vec<(crate::model::Endpoint, u64)>, DataplaneError> {
    conns_report(
        bpffs,
        fill::may_hold(maps, sockmesh_common::map_names::BACKEND_CONNS),
    )
}

fn conns_report(
    bpffs: &Path,
    walk: bool,
) -> Result<Vec<(crate::model::Endpoint, u64)>, DataplaneError> {
    if !walk {
        return Ok(Vec::new());
    }
    let entries = kernel::read_conns(&loader::conns_dir(bpffs))?;
    let mut out: Vec<_> = entries
        .into_iter()
        .filter_map(|(k, n)| {
            Some((
                crate::model::Endpoint {
                    addr: keys::words_to_ip(k.addr),
                    port: keys::port_from_map(k.port),
                    protocol: crate::model::Protocol::from_number(k.proto)?,
                },
                n,
            ))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// One backend endpoint's outlier state, as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndpointHealthReport {
    /// The service, in display form (`10.96.0.10:80/tcp`).
    pub service: String,
    /// The backend, `address:port` (`[address]:port` for IPv6).
    pub backend: String,
    /// Connects that failed in a row.
    pub failures: u64,
    /// Times it was ejected since the kernel began tracking it.
    pub ejections: u32,
    /// Its ejection multiplier: the next ejection lasts this many times (plus
    /// one) the base ejection time.
    #[serde(default)]
    pub multiplier: u32,
    /// Milliseconds of ejection left (`None`: not ejected).
    pub ejected_for_ms: Option<u64>,
}

/// A circuit-breaking or outlier-detecting service's kernel state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealthReport {
    pub service: crate::model::ServiceAddr,
    /// Open connections counted against `max_connections`.
    pub connections: u64,
    /// Connects refused at `max_connections`.
    pub overflows: u64,
}

/// The outlier detection and circuit breaking state pinned under `bpffs`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthReport {
    pub endpoints: Vec<EndpointHealthReport>,
    pub services: Vec<ServiceHealthReport>,
}

impl HealthReport {
    /// The endpoints ejected now.
    pub fn ejected(&self) -> impl Iterator<Item = &EndpointHealthReport> {
        self.endpoints.iter().filter(|e| e.ejected_for_ms.is_some())
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the kernel's ejection times.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

/// A backend endpoint in display form.
pub fn backend_display(addr: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

/// Reads the health maps pinned under `bpffs` (outlier ejections, open
/// connections of circuit-breaking services), sorted by service and backend.
pub fn read_health(bpffs: &Path) -> Result<HealthReport, DataplaneError> {
    health_report(&loader::health_dir(bpffs), true, true)
}

/// [`read_health`], walking only the maps that `maps` (the datapath's last
/// [`fill::MapFill`]s) says may hold entries: the rest read as empty. Each map
/// is sized for every backend or service of the node, and a walk of an empty
/// one still visits all its buckets (milliseconds at 100,000 services).
pub fn read_health_in(
    bpffs: &Path,
    maps: &[fill::MapFill],
) -> Result<HealthReport, DataplaneError> {
    health_report(
        &loader::health_dir(bpffs),
        fill::may_hold(maps, sockmesh_common::map_names::ENDPOINT_HEALTH),
        fill::may_hold(maps, sockmesh_common::map_names::SERVICE_HEALTH),
    )
}

fn health_report(
    health_dir: &Path,
    endpoints: bool,
    services: bool,
) -> Result<HealthReport, DataplaneError> {
    let (endpoints, services) = kernel::read_health(health_dir, endpoints, services)?;
    let now = monotonic_ns();
    let mut report = HealthReport {
        endpoints: endpoints
            .into_iter()
            .filter_map(|(k, h)| {
                let service = keys::service_addr(&k.service)?;
                Some(EndpointHealthReport {
                    service: service.to_string(),
                    backend: backend_display(
                        keys::words_to_ip(k.addr),
                        keys::port_from_map(k.port),
                    ),
                    failures: h.failures,
                    ejections: h.ejections,
                    multiplier: h.multiplier,
                    ejected_for_ms: (h.ejected_until_ns > now)
                        .then(|| (h.ejected_until_ns - now).div_ceil(1_000_000)),
                })
            })
            .collect(),
        services: services
            .into_iter()
            .filter_map(|(k, h)| {
                Some(ServiceHealthReport {
                    service: keys::service_addr(&k)?,
                    connections: h.conns,
                    overflows: h.overflows,
                })
            })
            .collect(),
    };
    report
        .endpoints
        .sort_by(|a, b| (&a.service, &a.backend).cmp(&(&b.service, &b.backend)));
    report.services.sort_by_key(|s| s.service);
    Ok(report)
}

/// One running or past ejection in a service's `SM_SVC_HEALTH` slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EjectionSlot {
    pub backend: std::net::SocketAddr,
    /// `CLOCK_MONOTONIC` ns when it ends.
    pub until_ns: u64,
}

/// A service's ejection slots (those ever written) and its slot lock, as the
/// kernel holds them: what a reader checks for torn writes and for
/// `max_ejection_percent`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEjections {
    pub service: crate::model::ServiceAddr,
    pub lock: u64,
    pub slots: Vec<EjectionSlot>,
}

/// Every service's ejection slots pinned under `bpffs`.
pub fn read_ejection_slots(bpffs: &Path) -> Result<Vec<ServiceEjections>, DataplaneError> {
    let (_, services) = kernel::read_health(&loader::health_dir(bpffs), false, true)?;
    Ok(services
        .into_iter()
        .filter_map(|(k, h)| {
            Some(ServiceEjections {
                service: keys::service_addr(&k)?,
                lock: h.lock,
                slots: h
                    .ejections
                    .iter()
                    .filter(|e| e.until_ns != 0)
                    .map(|e| EjectionSlot {
                        backend: std::net::SocketAddr::new(
                            keys::words_to_ip(e.addr),
                            keys::port_from_map(e.port),
                        ),
                        until_ns: e.until_ns,
                    })
                    .collect(),
            })
        })
        .collect())
}

/// One program's pinned link, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedLinkInfo {
    /// The pin's file name: the program's name (`sm_connect4`, …).
    pub program: String,
    /// The id of the cgroup the link was made for (its pin directory's).
    pub cgroup_id: u64,
    /// The kernel's id of the link: it stays while the link is adopted.
    pub link_id: u32,
    /// The id of the program the link runs now: it changes when an agent swaps its
    /// own program in (`BPF_LINK_UPDATE`).
    pub program_id: u32,
}

/// The links of this build's layout pinned under `bpffs`, sorted by program name.
pub fn pinned_links(bpffs: &Path) -> Result<Vec<PinnedLinkInfo>, DataplaneError> {
    let links = PinLayout::new(bpffs).links;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DataplaneError::Io { path, source }
    };
    let mut out = Vec::new();
    for cgroup in fs::read_dir(&links).map_err(io(&links))?.flatten() {
        let dir = cgroup.path();
        let cgroup_id = cgroup
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("cg"))
            .and_then(|id| id.parse().ok())
            .unwrap_or(0);
        for pin in fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            let path = pin.path();
            let program = pin.file_name().to_string_lossy().into_owned();
            let link = aya::programs::links::PinnedLink::from_pin(&path).map_err(|source| {
                DataplaneError::Link {
                    name: "pinned link",
                    source,
                }
            })?;
            let info = aya::programs::links::FdLink::from(link)
                .info()
                .map_err(|source| DataplaneError::Link {
                    name: "pinned link",
                    source,
                })?;
            out.push(PinnedLinkInfo {
                program,
                cgroup_id,
                link_id: info.id(),
                program_id: info.program_id(),
            });
        }
    }
    out.sort_by(|a, b| a.program.cmp(&b.program));
    Ok(out)
}

/// Detaches the programs and removes the pins of every layout under `bpffs`. With
/// `cgroup`, refuses if the pinned datapath serves another cgroup. Returns the
/// number of pins removed (0 if nothing was installed).
pub fn uninstall(bpffs: &Path, cgroup: Option<&Path>) -> Result<usize, DataplaneError> {
    let mut layouts: Vec<PinLayout> = loader::other_layouts(bpffs)
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    layouts.push(PinLayout::new(bpffs));
    if let Some(cgroup) = cgroup {
        loader::open_cgroup(cgroup, true)?;
        // The cgroup itself, or the enrolled pods' cgroups below it.
        for layout in &layouts {
            cgroups::refuse_outside(layout, cgroup)?;
        }
    }
    let mut removed = 0;
    for layout in &layouts {
        removed += loader::remove_pins(layout)?;
    }
    for dir in loader::other_health_dirs(bpffs) {
        removed += loader::remove_dir_pins(&dir)?;
    }
    // The connection counts and health state, shared by the layouts, go with the
    // last of them.
    let shared = [
        (
            loader::conns_dir(bpffs),
            &sockmesh_common::map_names::CONNS[..],
        ),
        (
            loader::health_dir(bpffs),
            &sockmesh_common::map_names::HEALTH[..],
        ),
    ];
    for (dir, names) in shared {
        if !dir.exists() {
            continue;
        }
        for name in names {
            let pin = dir.join(name);
            if pin.exists() {
                std::fs::remove_file(&pin).map_err(|source| DataplaneError::Io {
                    path: pin.clone(),
                    source,
                })?;
                removed += 1;
            }
        }
        std::fs::remove_dir(&dir).map_err(|source| DataplaneError::Io {
            path: dir.clone(),
            source,
        })?;
    }
    Ok(removed)
}

/// Detaches and removes the pins of `layouts`, then the health state of other
/// health versions (only those layouts' programs read it); returns the pins
/// removed.
fn retire(layouts: &[(u32, PinLayout)]) -> Result<usize, DataplaneError> {
    let mut removed = 0;
    let mut bpffs = None;
    for (_, layout) in layouts {
        removed += loader::remove_pins(layout)?;
        bpffs = layout.root.parent().map(Path::to_path_buf);
    }
    if let Some(bpffs) = bpffs {
        for dir in loader::other_health_dirs(&bpffs) {
            removed += loader::remove_dir_pins(&dir)?;
        }
    }
    Ok(removed)
}
