//! Map keys and values shared by the sockmesh kernel programs and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding fields (the verifier and the
//! kernel compare keys byte for byte, so no byte may be left uninitialised) and a
//! compile-time size check. Addresses and ports are stored exactly as the kernel
//! hands them to `cgroup/connect*` programs: network byte order. IPv4 addresses are
//! stored in their IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) so one map serves both
//! families, and a dual-stack IPv6 socket connecting to `::ffff:a.b.c.d` finds the
//! same entry as an IPv4 socket connecting to `a.b.c.d`.
//!
//! The maps themselves are defined, and documented, in `ebpf/programs/src/maps.rs`.
//!
//! This crate is the kernel contract's single source: the map names
//! ([`map_names`]), the hook table ([`hooks`]) and slot resolution ([`resolve`]) are
//! defined here and used by the kernel programs and the agent alike.

#![no_std]

pub mod hooks;
pub mod resolve;
pub mod tiers;

pub use tiers::{SlotRange, Tier, Tiers};

/// Map names: the ELF symbols of the maps and their pin file names under
/// `<bpffs>/v<LAYOUT_VERSION>/maps/`. `#[map(name = …)]` in `ebpf/programs` needs a
/// literal; it checks the literal against these at compile time.
pub mod map_names {
    /// Services ([`crate::ServiceKey`] → [`crate::ServiceValue`]).
    pub const SERVICES: &str = "SM_SERVICES";
    /// Per-service counters, an array (counter slot, [`crate::ServiceValue::stats`]
    /// → [`crate::ServiceStats`]).
    pub const SERVICE_STATS: &str = "SM_SERVICE_STATS";
    /// Selection slots ([`crate::SlotKey`] → backend index).
    pub const SLOTS: &str = "SM_SLOTS";
    /// Backends ([`crate::BackendKey`] → [`crate::BackendInfo`]).
    pub const BACKENDS: &str = "SM_BACKENDS";
    /// Reverse translation of connected sockets ([`crate::ReverseKey`] →
    /// [`crate::ReverseValue`]).
    pub const REVERSE: &str = "SM_REVERSE";
    /// Reverse translation of unconnected UDP sends (same key and value), an LRU
    /// apart from [`REVERSE`] so they never evict a connected socket's entry.
    pub const REVERSE_UDP: &str = "SM_REVERSE_UDP";
    /// Priority levels of a service's slot generation ([`crate::SlotKey`] with
    /// `slot` 0 → [`crate::Tiers`]).
    pub const TIERS: &str = "SM_TIERS";
    /// Events of the kernel programs for the agent (a ring buffer of
    /// [`crate::Event`]s): ejections, which move the loads of a service's levels.
    pub const EVENTS: &str = "SM_EVENTS";
    /// One scratch word per CPU, the kernel programs' own (see `opaque` in
    /// `ebpf/programs/src/maps.rs`).
    pub const SCRATCH: &str = "SM_SCRATCH";
    /// Node counters, per CPU (index in [`crate::counter`] → count).
    pub const COUNTERS: &str = "SM_COUNTERS";
    /// Open connections per backend endpoint ([`crate::ConnKey`] → `u64`), for
    /// least-connections services. Pinned apart from the layout's maps, under
    /// `<bpffs>/conns-v<CONNS_VERSION>/` (see [`crate::CONNS_VERSION`]).
    pub const BACKEND_CONNS: &str = "SM_BACKEND_CONNS";
    /// Socket storage: the endpoint a socket was counted on ([`crate::SockConn`]),
    /// pinned beside [`BACKEND_CONNS`].
    pub const SOCK_CONNS: &str = "SM_SOCK_CONNS";
    /// Socket storage: the peer a connected socket's [`REVERSE`] entry is keyed
    /// by ([`crate::SockReverse`]), so the entry is found at close whatever the
    /// socket's peer is by then.
    pub const SOCK_REVERSE: &str = "SM_SOCK_REVERSE";
    /// Maglev lookup tables of consistent-hash services, in chunks
    /// ([`crate::SlotKey`] with the chunk number as `slot` → [`crate::MaglevChunk`]).
    pub const MAGLEV: &str = "SM_MAGLEV";
    /// The maps pinned under the layout directory.
    pub const LAYOUT: [&str; 12] = [
        SERVICES,
        SERVICE_STATS,
        SLOTS,
        BACKENDS,
        REVERSE,
        REVERSE_UDP,
        SOCK_REVERSE,
        COUNTERS,
        MAGLEV,
        TIERS,
        EVENTS,
        SCRATCH,
    ];
    /// Outlier detection and circuit breaking settings of a service
    /// ([`crate::ServiceKey`] → [`crate::ServicePolicy`]), written by the agent.
    /// Pinned under `<bpffs>/health-v<HEALTH_VERSION>/` (see [`crate::HEALTH_VERSION`]).
    pub const SERVICE_POLICY: &str = "SM_SVC_POLICY";
    /// Health of each backend endpoint of a service ([`crate::EndpointKey`] →
    /// [`crate::EndpointHealth`]): consecutive failed connects, ejection.
    pub const ENDPOINT_HEALTH: &str = "SM_EP_HEALTH";
    /// Per-service kernel state ([`crate::ServiceKey`] → [`crate::ServiceHealth`]):
    /// open connections, overflows, active ejections.
    pub const SERVICE_HEALTH: &str = "SM_SVC_HEALTH";
    /// Socket storage: the service and endpoint a socket was placed on
    /// ([`crate::SockHealth`]).
    pub const SOCK_HEALTH: &str = "SM_SOCK_HEALTH";
    /// The maps pinned under the connection-tracking directory.
    pub const CONNS: [&str; 2] = [BACKEND_CONNS, SOCK_CONNS];
    /// The maps pinned under the health directory.
    pub const HEALTH: [&str; 4] = [SERVICE_POLICY, ENDPOINT_HEALTH, SERVICE_HEALTH, SOCK_HEALTH];
    /// Every map of the object: the layout's, the connection-tracking ones, then
    /// the health ones.
    pub const ALL: [&str; 18] = join(join::<12, 2, 14>(LAYOUT, CONNS), HEALTH);

    /// `a` followed by `b` (`C` = `A + B`, checked at compile time).
    const fn join<const A: usize, const B: usize, const C: usize>(
        a: [&'static str; A],
        b: [&'static str; B],
    ) -> [&'static str; C] {
        assert!(A + B == C);
        let mut out = [""; C];
        let mut i = 0;
        while i < C {
            out[i] = if i < A { a[i] } else { b[i - A] };
            i += 1;
        }
        out
    }
}

/// Read-only globals the agent sets at load (`EbpfLoader::override_global`).
pub mod globals {
    /// `u8`: 1 if the kernel has `bpf_set_retval` in cgroup programs (5.18+), so a
    /// refused call fails with ECONNREFUSED; 0 on older kernels, where the call is
    /// skipped (the verifier knows the value and never sees the helper) and the
    /// call fails with the cgroup hooks' default, EPERM.
    pub const SET_RETVAL: &str = "SM_SET_RETVAL";
}

/// `a == b`, usable in constants (the kernel programs' compile-time checks).
pub const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Pin-directory layout version. Bump it whenever a map is added or removed or a
/// key or value below changes shape; the agent pins under
/// `<bpffs>/v<LAYOUT_VERSION>/` so an agent with a different layout never
/// reinterprets another layout's bytes, and migrates by building its own layout
/// beside the old one (see `agent/src/dataplane/loader.rs`).
///
/// - 1: services, slots, backends, reverse translation, per-CPU node counters.
/// - 2: adds `SM_SERVICE_STATS`, per-service counters.
/// - 3: adds `SM_MAGLEV`, the Maglev tables of consistent-hash services.
/// - 4: [`service_flags::DIRECT`]: a service whose slot `i` is backend index `i`
///   has no `SM_SLOTS` entries (a program of layout 3 would miss every slot);
///   `SM_SERVICE_STATS` is one entry per service with atomic adds, no longer per
///   CPU.
/// - 5: `SM_TIERS`, priority levels ([`service_flags::TIERS`]); reverse translation
///   split in `SM_REVERSE` (connected sockets, deleted at close, never evicted)
///   and `SM_REVERSE_UDP` (unconnected sends, LRU), both sized at install;
///   [`BackendInfo::level`]; node counters for overflows, publish races and a
///   full reverse map.
/// - 6: `SM_SERVICE_STATS` is an array (`BPF_F_MMAPABLE`) of counter slots, one
///   claimed per service and named in [`ServiceValue::stats`], each naming its
///   service ([`ServiceStats::service`]): a reader copies one contiguous array
///   instead of walking a hash table.
pub const LAYOUT_VERSION: u32 = 6;

/// Version of the connection-tracking maps ([`map_names::CONNS`]). They are pinned
/// under `<bpffs>/conns-v<CONNS_VERSION>/`, apart from the layout's directory,
/// because the counts describe sockets, not the routing table: they must outlive a
/// layout migration (the new layout's programs keep counting and releasing the
/// same sockets). Bump it when [`ConnKey`] or [`SockConn`] changes shape.
pub const CONNS_VERSION: u32 = 1;

/// Version of the health maps ([`map_names::HEALTH`]), pinned under
/// `<bpffs>/health-v<HEALTH_VERSION>/` apart from the layout: ejections, open
/// connections per service and the sockets' placements outlive an agent restart
/// and a layout migration, as the connection counts do. Bump it when
/// [`ServicePolicy`], [`EndpointKey`], [`EndpointHealth`], [`ServiceHealth`] or
/// [`SockHealth`] changes shape.
///
/// - 2: the agent creates and deletes a service's [`ServiceHealth`] (its
///   `epoch` tells one life of the service from the next, so a socket of a
///   removed service never gives its connection back to a new one); ejections
///   are claimed under [`ServiceHealth::lock`] and record the host's level;
///   [`ServicePolicy::overprovisioning`].
pub const HEALTH_VERSION: u32 = 2;

/// Most priority levels of one service the kernel chooses among ([`Tiers`]).
/// Istio's locality failover makes at most five (same subzone, zone, region,
/// elsewhere, a failover target); levels past this get no load.
pub const MAX_TIERS: usize = 8;

/// Most backends of one service ejected at once (the active ejections
/// [`ServiceHealth`] keeps to count a service's ejected share): a failure beyond
/// them does not eject.
pub const MAX_EJECTED: usize = 16;

/// Random draws a connect() makes, after landing on an ejected backend, to find a
/// backend that is not (when the healthy share is above the panic threshold):
/// they spread the ejected backend's share over the others.
pub const EJECTED_REDRAWS: u32 = 4;

/// Then consecutive slots it walks, from a random one, for a backend that is not
/// ejected: every slot of a smaller table, and in a larger one, at most
/// [`MAX_EJECTED`] of these slots are ejected where each backend has one slot
/// (equal weights), so the walk finds a backend that is not, however few are
/// left. Each slot walked costs the verifier about 4,000 instructions.
pub const EJECTED_WALK: u32 = 2 * MAX_EJECTED as u32;

/// Most services (VIP, port, protocol) the service map holds. Sized for a large
/// cluster (Kubernetes' default service CIDR /12 is far larger, but 64 Ki ports on
/// VIPs covers the biggest real meshes) while keeping the map at a few MiB.
pub const MAX_SERVICES: u32 = 65_536;

/// Most backends one service may have: Kubernetes services of several thousand
/// pods exist. Bounded by the `u16` backend index a slot and a Maglev chunk entry
/// hold (an update holds a service's old and new backends at once: twice this,
/// asserted below) and by one slot each (`MAX_SLOTS_PER_SERVICE`). A service with
/// more is programmed with a subset of this many (the agent's `xds::fit`).
pub const MAX_BACKENDS_PER_SERVICE: u32 = 16_384;

/// Most selection slots one service may use. Weighted random selection picks a
/// uniformly random slot; a backend holds slots in proportion to its weight, and
/// at least one. 16 Ki slots resolve the weights of up to 1,024 backends to at
/// least 16 slots each (about 1/16,384 of the total); a service of more backends
/// has fewer per backend, down to one each (equal shares) at
/// `MAX_BACKENDS_PER_SERVICE`. Within the `u16` slot index.
pub const MAX_SLOTS_PER_SERVICE: u32 = 16_384;

/// Capacity of the backend map, all services together (entries are allocated on
/// demand, so an emptier table costs only its hash buckets): 50,000 services with 10
/// endpoints each fit.
pub const MAX_BACKENDS_TOTAL: u32 = 524_288;

/// Capacity of the slot map, all services together. An update writes the new
/// generation's slots before deleting the old one's, so a service transiently needs
/// twice its slots; the default leaves room for that across 10 k+ services.
pub const MAX_SLOTS_TOTAL: u32 = 1_048_576;

/// Entries of one [`MaglevChunk`]: a Maglev table of `M` entries is stored as
/// `ceil(M / MAGLEV_CHUNK)` chunks, so publishing a table costs a few dozen map
/// updates instead of one per entry.
pub const MAGLEV_CHUNK: usize = 256;

/// Largest Maglev table (entries; a prime): Envoy's default `table_size`, 65,537.
/// A table takes `ceil(M / 256)` chunks of 512 bytes (257 chunks, about 130 KiB of
/// kernel memory, at this size).
pub const MAX_MAGLEV_TABLE_SIZE: u32 = 65_537;

/// Maglev table size when the cluster does not set one (a prime): Cilium's default.
/// Envoy's own default, 65,537, balances no better for the hundreds of backends a
/// service has and costs four times the memory and write time; a cluster that sets
/// `maglev_lb_config.table_size` gets its size.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16_381;

/// Services that may have a Maglev table at once, by default (`--max-maglev-services`).
pub const MAX_MAGLEV_SERVICES: u32 = 1_024;

/// Chunks of the largest table.
pub const MAX_MAGLEV_CHUNKS_PER_TABLE: u32 = MAX_MAGLEV_TABLE_SIZE.div_ceil(MAGLEV_CHUNK as u32);

/// Capacity of the Maglev map for `services` tables: every table at the largest
/// size, plus one more, which an update writes (its new generation) before it
/// deletes the old one.
pub const fn maglev_map_entries(services: u32) -> u32 {
    services
        .saturating_add(1)
        .saturating_mul(MAX_MAGLEV_CHUNKS_PER_TABLE)
}

/// Capacity of `SM_REVERSE` by default (`--max-reverse`): one entry per open client
/// socket connected to a VIP, allocated on demand.
pub const MAX_REVERSE_ENTRIES: u32 = 1_048_576;

/// Capacity of `SM_REVERSE_UDP` by default (`--max-reverse-udp`): one entry per
/// (unconnected UDP socket, backend) pair recently used; an LRU, preallocated.
pub const MAX_REVERSE_UDP_ENTRIES: u32 = 65_536;

/// `IPPROTO_TCP`, as in the service key's `proto` field.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`, as in the service key's `proto` field.
pub const PROTO_UDP: u8 = 17;

/// The third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), as stored
/// in memory (bytes `00 00 ff ff`).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Backend state values in [`BackendInfo::state`].
pub mod backend_state {
    /// Healthy (EDS HEALTHY or UNKNOWN): holds slots.
    pub const ACTIVE: u8 = 0;
    /// Receives no new connections outside a panic: EDS DRAINING (excluded from
    /// Envoy's counts); established connections keep working.
    pub const DRAINING: u8 = 1;
    /// EDS DEGRADED: served as Envoy serves degraded hosts (a level's degraded
    /// load).
    pub const DEGRADED: u8 = 2;
    /// EDS UNHEALTHY or TIMEOUT: served only in a level's panic.
    pub const UNHEALTHY: u8 = 3;
}

/// Load-balancing policies in [`ServiceValue::policy`]: how connect() picks among
/// the service's slots.
pub mod lb_policy {
    /// One random slot (slots are weight-proportional): weighted random.
    pub const RANDOM: u8 = 0;
    /// [`crate::ServiceValue::choices`] candidates, and of them the backend with
    /// the fewest open connections (power of N choices, as Envoy's
    /// `LEAST_REQUEST`); placed connections are counted per backend endpoint.
    /// Each candidate after the first is drawn from the slots other than the best
    /// one's so far, so a backend of one slot (equal weights) is never compared
    /// with itself; with [`crate::service_flags::ENVOY_DRAWS`], every candidate
    /// is drawn from all the slots, with replacement, as Envoy does.
    pub const LEAST_CONN: u8 = 1;
    /// Maglev consistent hashing: the slots are the service's Maglev table (in
    /// `SM_MAGLEV`, [`crate::ServiceValue::slot_count`] entries), and connect()
    /// takes entry `hash(client) % slot_count`, where the client is the socket's
    /// bound source address, or else its network namespace (one pod, one netns):
    /// one client, one backend, while the backends stay.
    pub const MAGLEV: u8 = 2;
}

/// Bits of [`ServiceValue::flags`].
pub mod service_flags {
    /// Outlier detection: connect() avoids ejected backends, sock_ops watches
    /// each TCP connect's outcome.
    pub const OUTLIER: u8 = 1;
    /// Circuit breaking: connect() counts the service's open connections against
    /// [`crate::ServicePolicy::max_connections`].
    pub const CIRCUIT: u8 = 2;
    /// Direct slots: slot `i` of the service is backend index `i`, and the
    /// service has no entries in `SM_SLOTS`. The agent publishes it when the slot
    /// table is the identity, which is what equal weights give a service written
    /// in one go (every initial load): 11 map entries instead of 21 for a
    /// 10-endpoint service. Never set on a Maglev service.
    pub const DIRECT: u8 = 4;
    /// The flags whose connects are placed in the socket's health storage
    /// (`SM_SOCK_HEALTH`). Not "any flag": a service with direct slots and
    /// neither of these has nothing to record per socket.
    pub const HEALTH: u8 = OUTLIER | CIRCUIT;
    /// Priority levels: the service's `SM_TIERS` entry of its published
    /// generation says which slot range a connect() draws from (Envoy's priority
    /// and degraded loads, moved by ejections).
    pub const TIERS: u8 = 8;
    /// A least-connections service draws its `choices` candidates as Envoy does,
    /// with replacement, so a backend can be compared with itself
    /// (`--least-request-draws envoy`).
    pub const ENVOY_DRAWS: u8 = 16;
}

/// Most candidates a least-connections pick compares.
pub const MAX_CHOICES: u8 = 8;

/// Indexes into the per-CPU counter array.
pub mod counter {
    /// A connect/sendmsg to a service address was rewritten to a backend.
    pub const REDIRECT: u32 = 0;
    /// A service was found but had no active backend; the call was refused.
    pub const NO_BACKEND: u32 = 1;
    /// recvmsg/getpeername found no reverse entry for the peer, so the caller saw the
    /// peer as it is. Every peer that is not a backend reached through a VIP counts
    /// here too; read it next to `REVERSE_HIT` (a rise with flat hits means evictions
    /// from the reverse map).
    pub const REVERSE_MISS: u32 = 2;
    /// A selected slot was missing (update raced the lookup) and the lookup was retried.
    pub const SLOT_RETRY: u32 = 3;
    /// Reverse translations performed (recvmsg/getpeername rewrote to the VIP).
    pub const REVERSE_HIT: u32 = 4;
    /// Connects refused at a circuit breaker's `max_connections`.
    pub const OVERFLOW: u32 = 5;
    /// Calls refused because two updates of the service raced one lookup (the
    /// service has backends; the caller may retry).
    pub const RACED: u32 = 6;
    /// Redirected sockets with no room in `SM_REVERSE` (`--max-reverse`): their
    /// `getpeername()` shows the backend, and `--terminate-removed-connections`
    /// cannot find them.
    pub const REVERSE_FULL: u32 = 7;
    /// Number of counters.
    pub const COUNT: u32 = 8;
    /// Human names, indexed like the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "redirects",
        "no_backend",
        "reverse_miss",
        "slot_retry",
        "reverse_hits",
        "overflow",
        "raced",
        "reverse_full",
    ];
}

/// Key of the service map: one (VIP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// IPv6 address or IPv4-mapped IPv6 address, network byte order.
    pub addr: [u32; 4],
    /// Port, network byte order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Always 0.
    pub pad: u8,
}

/// Value of the service map. Replaced as a whole by one map update, which is what
/// publishes a new backend set atomically.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Service id, unique while the service exists; keys its slots and backends.
    pub id: u32,
    /// Number of slots in the published generation (for a Maglev service, its
    /// table's size); 0 means no active backend (connections are refused with
    /// `ECONNREFUSED`).
    pub slot_count: u32,
    /// Published slot generation, 0 or 1.
    pub generation: u8,
    /// One of [`lb_policy`] (0, weighted random, is what an agent that predates
    /// policies wrote in this byte).
    pub policy: u8,
    /// Random choices of a least-connections pick, 1..=[`MAX_CHOICES`] (0: 1).
    pub choices: u8,
    /// [`service_flags`]: which of the service's settings in `SM_SVC_POLICY`
    /// connect() applies (0, none, is what an agent that predates them wrote in
    /// this byte, which was padding).
    pub flags: u8,
    /// Monotonic revision, bumped by every update of this service (diagnostics).
    pub revision: u32,
    /// The service's counter slot: its index in `SM_SERVICE_STATS`
    /// ([`NO_STATS`]: none, nothing is counted).
    pub stats: u32,
}

/// [`ServiceValue::stats`] of a service without a counter slot (past any
/// array's end: the programs' lookup finds nothing).
pub const NO_STATS: u32 = u32::MAX;

/// Value of the Maglev map: entries `chunk * MAGLEV_CHUNK ..` of a service's Maglev
/// table, each the index of a backend (key of the backend map). Entries past the
/// table's end are 0 and never read.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevChunk {
    pub entries: [u16; MAGLEV_CHUNK],
}

/// Value of the per-service counter array `SM_SERVICE_STATS`, one slot per
/// service ([`ServiceValue::stats`]). The programs only add to the counts,
/// atomically (every CPU counts into the same slot). The agent alone writes the
/// rest, into the array mapped in its memory, as a sequence lock: `seq` is odd
/// while the slot belongs to `service`, and each claim or release of the slot
/// moves it on. A claim zeroes the counts and writes `service` before `seq`
/// turns odd; a reader that finds the same odd `seq` before and after reading
/// the slot has read one service's slot whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Connects and unconnected-UDP sends rewritten to one of the service's backends.
    pub redirects: u64,
    /// Calls refused because the service had no active backend.
    pub no_backend: u64,
    /// The service counted here, while `seq` is odd.
    pub service: ServiceKey,
    /// Odd while the slot is claimed; moved on by every claim and release.
    pub seq: u32,
}

/// Key of the slot map: slot `slot` of generation `generation` of service `service_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub generation: u8,
    /// Always 0.
    pub pad: u8,
    pub slot: u16,
}

/// Key of the backend map: backend `index` of service `service_id`. A backend keeps
/// its index for as long as it belongs to the service, so slots written for a new
/// generation can point at it without rewriting its entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service_id: u32,
    pub index: u32,
}

/// Value of the backend map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// IPv6 or IPv4-mapped address, network byte order.
    pub addr: [u32; 4],
    /// Port, network byte order.
    pub port: u16,
    /// One of [`backend_state`].
    pub state: u8,
    /// Its priority level (index in [`Tiers::tiers`]; 0 without levels).
    pub level: u8,
    /// Configured weight (1..=u32::MAX). Only userspace reads it; the kernel selects
    /// by slots.
    pub weight: u32,
}

/// Key of the reverse-translation map: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReverseKey {
    /// `bpf_get_socket_cookie()` of the client socket.
    pub cookie: u64,
    /// Backend address (IPv6 or IPv4-mapped), network byte order.
    pub addr: [u32; 4],
    /// Backend port, network byte order.
    pub port: u16,
    /// Always 0.
    pub pad: [u8; 6],
}

/// Value of the reverse-translation map: the service address the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseValue {
    pub addr: [u32; 4],
    pub port: u16,
    pub pad: [u8; 2],
}

/// Key of the open-connection counts: a backend endpoint (counted across every
/// service it serves, as the pod's load is).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// IPv6 or IPv4-mapped address, network byte order.
    pub addr: [u32; 4],
    /// Port, network byte order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Always 0.
    pub pad: u8,
}

/// Socket storage of a socket connect() placed on a least-connections service:
/// the endpoint it was counted on, released (once) when the socket goes away.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConn {
    pub endpoint: ConnKey,
    /// 1 while the socket holds one count of `endpoint`.
    pub counted: u8,
    /// Always 0.
    pub pad: [u8; 3],
}

/// Socket storage `SM_SOCK_REVERSE` of a connected socket connect() redirected:
/// the backend its `SM_REVERSE` entry is keyed by. A socket's peer does not
/// stay what connect() set: a connect that fails at once (no route), a UDP
/// socket aborted or disconnected, clear it; sock_release, and a later connect
/// of the same socket, delete the entry this names instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockReverse {
    /// The backend's address (IPv6 or IPv4-mapped) and port, network order.
    pub addr: [u32; 4],
    pub port: u16,
    /// 1 while the socket's `SM_REVERSE` entry for `addr`/`port` exists.
    pub held: u8,
    /// Always 0.
    pub pad: u8,
}

/// Value of `SM_SVC_POLICY`: a service's outlier detection and circuit breaking
/// settings, from its cluster (`outlier_detection`, `circuit_breakers`,
/// `common_lb_config.healthy_panic_threshold`). Written by the agent before it
/// publishes a service value whose [`ServiceValue::flags`] name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServicePolicy {
    /// Failed connects in a row that eject a backend (0: no ejection).
    pub consecutive: u32,
    /// Ejection time of a first ejection, milliseconds; the n-th ejection in a row
    /// lasts n times as long.
    pub base_ejection_ms: u32,
    /// Longest ejection, milliseconds.
    pub max_ejection_ms: u32,
    /// Outlier detection interval, milliseconds: each interval a returned backend
    /// stays healthy takes one off its ejection multiplier.
    pub interval_ms: u32,
    /// Open connections the service may have (0: unlimited).
    pub max_connections: u32,
    /// Active backends of the service (the whole of the ejected share).
    pub backends: u32,
    /// Most backends ejected at once, percent of `backends` (one is always allowed).
    pub max_ejection_percent: u8,
    /// Below this healthy (not ejected) percentage connect() ignores ejections
    /// (Envoy's panic mode); 0 disables it.
    pub panic_percent: u8,
    /// Percent of detections that eject (Envoy's `enforcing_*`).
    pub enforcing: u8,
    /// Always 0.
    pub pad: u8,
    /// The assignment's `overprovisioning_factor`, percent: a service without
    /// levels is in panic only while `overprovisioning × healthy < 100 × backends`
    /// too (Envoy's normalized total below 100).
    pub overprovisioning: u32,
}

/// Key of `SM_EP_HEALTH`: one backend endpoint of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub service: ServiceKey,
    /// IPv6 or IPv4-mapped address, network byte order.
    pub addr: [u32; 4],
    /// Port, network byte order.
    pub port: u16,
    /// Always 0.
    pub pad: u16,
}

/// Value of `SM_EP_HEALTH`, written by the kernel programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointHealth {
    /// Connects that failed in a row (reset by a success and by an ejection).
    pub failures: u64,
    /// Ejected until this `CLOCK_MONOTONIC` time, nanoseconds (0: never ejected).
    pub ejected_until_ns: u64,
    /// Ejection multiplier: ejections in a row, less one per healthy interval.
    pub multiplier: u32,
    /// Ejections since the entry was created.
    pub ejections: u32,
}

impl EndpointHealth {
    pub const ZERO: Self = Self {
        failures: 0,
        ejected_until_ns: 0,
        multiplier: 0,
        ejections: 0,
    };
}

/// An event of the kernel programs for the agent, in `SM_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// One of [`event`].
    pub kind: u32,
    /// Always 0.
    pub pad: u32,
    /// The service it concerns.
    pub service: ServiceKey,
    /// Always 0.
    pub pad2: u32,
    /// For an ejection: until when (`CLOCK_MONOTONIC` ns).
    pub until_ns: u64,
}

/// Kinds of [`Event`].
pub mod event {
    /// sock_ops ejected an endpoint of the service.
    pub const EJECTED: u32 = 1;
}

/// Capacity of `SM_EVENTS`, bytes (a power of two and of the page size): 8,192
/// events of 48 bytes (with their headers) between two reads of the agent.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// One ejection a service counts toward its ejected share.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ejection {
    /// End time (`CLOCK_MONOTONIC` ns).
    pub until_ns: u64,
    /// The ejected endpoint (IPv6 or IPv4-mapped address, port; network order).
    pub addr: [u32; 4],
    pub port: u16,
    /// The host's [`backend_state`] and level when it was ejected: which of its
    /// level's counts the ejection takes one from.
    pub state: u8,
    pub level: u8,
    /// Always 0.
    pub pad: [u8; 4],
}

impl Ejection {
    pub const ZERO: Self = Self {
        until_ns: 0,
        addr: [0; 4],
        port: 0,
        state: 0,
        level: 0,
        pad: [0; 4],
    };
}

/// Value of `SM_SVC_HEALTH`, written by the kernel programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceHealth {
    /// Open connections placed on the service (circuit-breaking services).
    pub conns: u64,
    /// Connects refused because `conns` was at `max_connections`.
    pub overflows: u64,
    /// Which life of the service this entry belongs to (the agent writes a new
    /// one each time it creates the entry): a socket gives its connection back
    /// only to the entry it took it from.
    pub epoch: u64,
    /// 0, or 1 while a CPU claims an ejection slot (compare-and-swap): two
    /// endpoints failing at once on two CPUs never both pass
    /// `max_ejection_percent` nor share a slot.
    pub lock: u64,
    /// The service's ejections. One is active while its time is in the future
    /// and its endpoint's `SM_EP_HEALTH` entry still holds that time (an EDS
    /// update that removed the endpoint deleted the entry: it no longer counts).
    pub ejections: [Ejection; MAX_EJECTED],
}

impl ServiceHealth {
    /// A new entry (the kernel inserts it from a static: at 528 bytes it does not
    /// fit the BPF stack).
    pub const ZERO: Self = Self {
        conns: 0,
        overflows: 0,
        epoch: 0,
        lock: 0,
        ejections: [Ejection::ZERO; MAX_EJECTED],
    };
}

/// Socket storage `SM_SOCK_HEALTH`: where connect() placed a socket of a service
/// with outlier detection or circuit breaking.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockHealth {
    pub endpoint: EndpointKey,
    /// 1 until sock_ops sees the TCP connect's outcome.
    pub watch: u8,
    /// 1 while the socket holds one of its service's open connections.
    pub counted: u8,
    /// The endpoint's [`backend_state`] and level at placement (recorded with an
    /// ejection).
    pub state: u8,
    pub level: u8,
    /// Always 0.
    pub pad: [u8; 4],
    /// The [`ServiceHealth::epoch`] of the entry the connection was taken from.
    pub epoch: u64,
}

const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<ConnKey>() == 20);
    assert!(core::mem::size_of::<SockConn>() == 24);
    assert!(core::mem::size_of::<SockReverse>() == 20);
    assert!(core::mem::size_of::<ServicePolicy>() == 32);
    assert!(core::mem::size_of::<EndpointKey>() == 40);
    assert!(core::mem::size_of::<EndpointHealth>() == 24);
    assert!(core::mem::size_of::<Ejection>() == 32);
    assert!(MAX_EJECTED.is_power_of_two());
    assert!(core::mem::size_of::<ServiceHealth>() == 32 + 32 * MAX_EJECTED);
    assert!(core::mem::size_of::<SockHealth>() == 56);
    assert!(core::mem::size_of::<Event>() == 40);
    assert!(core::mem::size_of::<Tier>() == 32);
    assert!(core::mem::size_of::<Tiers>() == 16 + 32 * MAX_TIERS + tiers::CHOICES);
    assert!(MAX_TIERS.is_power_of_two());
    assert!(MAX_TIERS <= u8::MAX as usize);
    assert!(MAX_CHOICES >= 1);
    assert!(core::mem::size_of::<ServiceValue>() == 20);
    assert!(core::mem::size_of::<SlotKey>() == 8);
    assert!(core::mem::size_of::<ServiceStats>() == 40);
    assert!(core::mem::size_of::<BackendKey>() == 8);
    assert!(core::mem::size_of::<BackendInfo>() == 24);
    assert!(core::mem::size_of::<ReverseKey>() == 32);
    assert!(core::mem::size_of::<ReverseValue>() == 20);
    assert!(core::mem::size_of::<MaglevChunk>() == 512);
    // Backend indexes stay below twice the per-service maximum (an update holds
    // the old and new backends at once), which a chunk entry's u16 holds.
    assert!(2 * MAX_BACKENDS_PER_SERVICE <= u16::MAX as u32);
    assert!(MAX_MAGLEV_CHUNKS_PER_TABLE <= u16::MAX as u32);
    assert!(MAX_SLOTS_PER_SERVICE <= u16::MAX as u32 + 1);
    assert!(MAX_BACKENDS_PER_SERVICE <= MAX_SLOTS_PER_SERVICE);
};

#[cfg(feature = "user")]
mod pod {
    use super::{
        BackendInfo, BackendKey, ConnKey, EndpointHealth, EndpointKey, MaglevChunk, ReverseKey,
        ReverseValue, ServiceHealth, ServiceKey, ServicePolicy, ServiceStats, ServiceValue,
        SlotKey, SockConn, SockHealth, SockReverse,
    };

    // SAFETY: all types are #[repr(C)], made only of integers, with every padding
    // byte an explicit field: any bit pattern is a valid value.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ReverseKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ReverseValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockConn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockReverse {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MaglevChunk {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServicePolicy {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EndpointKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EndpointHealth {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceHealth {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockHealth {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Tiers {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn str_eq_compares_bytes() {
        assert!(str_eq("SM_SLOTS", map_names::SLOTS));
        assert!(!str_eq("SM_SLOT", map_names::SLOTS));
        assert!(!str_eq("SM_SLOTZ", map_names::SLOTS));
        assert!(str_eq("", ""));
    }

    #[test]
    fn map_names_are_distinct() {
        for (i, a) in map_names::ALL.iter().enumerate() {
            for b in &map_names::ALL[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
