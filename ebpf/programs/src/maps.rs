//! Every map of the sockmesh datapath, in one place.
//!
//! The agent pins each of them under `<bpffs>/v<LAYOUT_VERSION>/maps/<NAME>`, so they
//! outlive the agent process and a restarted agent adopts them.
//!
//! Update protocol (agent side, `agent/src/dataplane/writer.rs`), which makes every
//! connect() see either the old or the new backend set of a service, never a mix:
//! 1. write the backend entries that are new (`SM_BACKENDS`),
//! 2. write the slots of the *unpublished* generation (`SM_SLOTS`),
//! 3. publish by replacing the service value (`SM_SERVICES`): one atomic map update
//!    switches `generation` and `slot_count` together,
//! 4. delete the old generation's slots, then backends that no slot references.
//!
//! A program that read the old service value before step 3 and looks up a slot after
//! step 4 misses; it re-reads the service value once (`counter::SLOT_RETRY`).
//!
//! The userspace-written hash maps use `BPF_F_NO_PREALLOC`: a replaced or deleted
//! element is freed only after an RCU grace period, so a program holding a pointer
//! to an old value never sees it reused for another key.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use sockmesh_common::{
    BackendInfo, BackendKey, ConnKey, EVENTS_BYTES, EndpointHealth, EndpointKey,
    MAX_BACKENDS_TOTAL, MAX_MAGLEV_SERVICES, MAX_REVERSE_ENTRIES, MAX_REVERSE_UDP_ENTRIES,
    MAX_SERVICES, MAX_SLOTS_TOTAL, MaglevChunk, ReverseKey, ReverseValue, ServiceHealth,
    ServiceKey, ServicePolicy, ServiceStats, ServiceValue, SlotKey, SockConn, SockHealth,
    SockReverse, Tiers, counter, maglev_map_entries, map_names,
};

/// Defines a map named `$name`. `#[map(name = …)]` takes only a string literal, so
/// the literal stays here and a compile-time assertion checks that it is the name
/// `sockmesh_common::map_names` gives the agent.
macro_rules! named_map {
    ($(#[$doc:meta])* $name:literal == $common:path; $vis:vis static $ident:ident: $ty:ty = $init:expr;) => {
        const _: () = assert!(
            sockmesh_common::str_eq($name, $common),
            concat!("map ", $name, " is not named as in sockmesh_common::map_names")
        );
        $(#[$doc])*
        #[map(name = $name)]
        $vis static $ident: $ty = $init;
    };
}

named_map! {
    /// Services.
    /// - key: [`ServiceKey`] (VIP as IPv6/IPv4-mapped, port, protocol; network order)
    /// - value: [`ServiceValue`] (service id, published generation and slot count)
    /// - writer: the agent (`MapWriter`), one whole-value update per publish
    /// - reader: every sock_addr program (forward translation)
    /// - capacity: `MAX_SERVICES` (65,536) by default; `--max-services` at install
    "SM_SERVICES" == map_names::SERVICES;
    pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
        HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);
}

named_map! {
    /// Per-service counters: an array of counter slots, one per service, shared by
    /// every CPU (atomic adds), mapped into the agent's memory (`BPF_F_MMAPABLE`)
    /// so a scrape reads it as one contiguous block.
    /// - key: a counter slot, [`sockmesh_common::ServiceValue::stats`]
    /// - value: [`ServiceStats`] (redirects, calls refused for want of a backend,
    ///   and the service that holds the slot, under a sequence number)
    /// - writer: the agent claims a slot (zeroed counts, the service's key) before it
    ///   publishes a service that names it and releases it after removing the
    ///   service; connect4/6 and sendmsg4/6 only add to the counts of the slot the
    ///   service value they read names
    /// - reader: `sockmesh stats`, the agent's `/metrics`
    /// - capacity: as `SM_SERVICES` (`--max-services`); allocated whole at load
    "SM_SERVICE_STATS" == map_names::SERVICE_STATS;
    pub static SERVICE_STATS: Array<ServiceStats> =
        Array::pinned(MAX_SERVICES, BPF_F_MMAPABLE);
}

named_map! {
    /// Selection slots: a backend owns as many slots as its weight's share.
    /// - key: [`SlotKey`] (service id, generation 0/1, slot index)
    /// - value: `u32` backend index within the service (key of `SM_BACKENDS`)
    /// - writer: the agent, only into the unpublished generation
    /// - reader: connect4/6, sendmsg4/6
    /// - capacity: `MAX_SLOTS_TOTAL` by default (`--max-slots`); two generations of a service coexist briefly
    "SM_SLOTS" == map_names::SLOTS;
    pub static SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(MAX_SLOTS_TOTAL, BPF_F_NO_PREALLOC);
}

named_map! {
    /// Maglev lookup tables of consistent-hash services (`lb_policy::MAGLEV`): the
    /// service's slots, 256 to a chunk, so a table of 16,381 entries is published
    /// with 64 map updates.
    /// - key: [`SlotKey`] (service id, generation 0/1, chunk number in `slot`)
    /// - value: [`MaglevChunk`] (backend index of each entry of the chunk)
    /// - writer: the agent, only into the unpublished generation, as `SM_SLOTS`
    /// - reader: connect4/6, sendmsg4/6 of Maglev services
    /// - capacity: room for `MAX_MAGLEV_SERVICES` (1,024) tables of the largest size
    ///   plus one being rewritten (`--max-maglev-services`); entries allocated on demand
    "SM_MAGLEV" == map_names::MAGLEV;
    pub static MAGLEV: HashMap<SlotKey, MaglevChunk> =
        HashMap::pinned(maglev_map_entries(MAX_MAGLEV_SERVICES), BPF_F_NO_PREALLOC);
}

named_map! {
    /// Priority levels of a service's slot generation (services published with
    /// `service_flags::TIERS`): each level's slot ranges (healthy, degraded, all
    /// hosts) and host counts, the overprovisioning factor and panic threshold.
    /// - key: [`SlotKey`] (service id, generation 0/1, slot 0)
    /// - value: [`Tiers`]
    /// - writer: the agent, only into the unpublished generation, with its slots;
    ///   deleted with the old generation
    /// - reader: connect4/6, sendmsg4/6 (which range to draw from, `tiers.rs`)
    /// - capacity: twice `SM_SERVICES` (`--max-services`): a service's two
    ///   generations coexist while it is rewritten; entries allocated on demand
    "SM_TIERS" == map_names::TIERS;
    pub static TIERS: HashMap<SlotKey, Tiers> =
        HashMap::pinned(2 * MAX_SERVICES, BPF_F_NO_PREALLOC);
}

named_map! {
    /// Backends of each service.
    /// - key: [`BackendKey`] (service id, backend index)
    /// - value: [`BackendInfo`] (address, port, state, level, weight)
    /// - writer: the agent; an index is stable while the backend stays in the service
    /// - reader: connect4/6, sendmsg4/6 (address, port); `sockmesh services` (all fields)
    /// - capacity: `MAX_BACKENDS_TOTAL` (524,288) by default; `--max-backends` at install
    "SM_BACKENDS" == map_names::BACKENDS;
    pub static BACKENDS: HashMap<BackendKey, BackendInfo> =
        HashMap::pinned(MAX_BACKENDS_TOTAL, BPF_F_NO_PREALLOC);
}

named_map! {
    /// Reverse translation of connected sockets: which VIP a socket asked for when
    /// connect() sent it to a backend.
    /// - key: [`ReverseKey`] (socket cookie, backend address, backend port)
    /// - value: [`ReverseValue`] (VIP address and port)
    /// - writer: connect4/6 insert (deleting the socket's entry for an earlier
    ///   peer first); sock_release deletes the socket's entry, found through its
    ///   `SM_SOCK_REVERSE` storage, so it holds exactly the open redirected
    ///   sockets and nothing is ever evicted (`--terminate-removed-connections`
    ///   finds every one, and deletes the entries of those it destroys)
    /// - reader: recvmsg4/6 (connected UDP reply source), getpeername4/6, the
    ///   agent's socket termination
    /// - capacity: `MAX_REVERSE_ENTRIES` by default (`--max-reverse`); entries
    ///   allocated on demand; a socket that finds no room is redirected all the
    ///   same and counted (`counter::REVERSE_FULL`)
    "SM_REVERSE" == map_names::REVERSE;
    pub static REVERSE: HashMap<ReverseKey, ReverseValue> =
        HashMap::pinned(MAX_REVERSE_ENTRIES, BPF_F_NO_PREALLOC);
}

const _: () = assert!(
    sockmesh_common::str_eq("SM_SOCK_REVERSE", map_names::SOCK_REVERSE),
    "map SM_SOCK_REVERSE is not named as in sockmesh_common::map_names"
);
/// Socket storage: the peer a connected socket's `SM_REVERSE` entry is keyed by.
/// - key: the socket (`BPF_MAP_TYPE_SK_STORAGE`); freed with the socket
/// - value: [`SockReverse`] (backend address and port; whether the entry exists)
/// - writer: connect4/6 (on every redirected connect); sock_release clears `held`
///   when it deletes the entry
/// - reader: sock_release and connect4/6: the socket's peer may be cleared by
///   then (a connect that failed at once, a UDP socket aborted or disconnected),
///   and a socket connected again has another
/// - pinned beside `SM_REVERSE`, whose entries it names
#[btf_map(name = "SM_SOCK_REVERSE")]
pub static SOCK_REVERSE: SkStorage<SockReverse> = SkStorage::new();

named_map! {
    /// Reverse translation of unconnected UDP sends (a resolver sending to a DNS
    /// VIP): the same key and value as `SM_REVERSE`, apart from it so these entries,
    /// which no close removes, never evict a connected socket's.
    /// - writer: sendmsg4/6 insert; the LRU evicts
    /// - reader: recvmsg4/6 (reply source)
    /// - capacity: `MAX_REVERSE_UDP_ENTRIES` by default (`--max-reverse-udp`)
    "SM_REVERSE_UDP" == map_names::REVERSE_UDP;
    pub static REVERSE_UDP: LruHashMap<ReverseKey, ReverseValue> =
        LruHashMap::pinned(MAX_REVERSE_UDP_ENTRIES, 0);
}

named_map! {
    /// Events for the agent: each ejection (sock_ops), which moves the loads of the
    /// service's priority levels; the agent rewrites the service's choice table
    /// (`SM_TIERS`) on reading it.
    /// - value: `sockmesh_common::Event`
    /// - writer: sock_ops; reader: the agent (its datapath task), by epoll
    /// - capacity: `EVENTS_BYTES`; an event that finds no room is dropped (the
    ///   agent also rereads every ejection once a second)
    "SM_EVENTS" == map_names::EVENTS;
    pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);
}

named_map! {
    /// One word per CPU that a program writes and reads back: a value read from a
    /// map is unknown to the verifier (see `opaque`).
    /// - key: `u32` 0
    /// - value: `u64`
    /// - writer and reader: connect4/6, sendmsg4/6; nobody else
    "SM_SCRATCH" == map_names::SCRATCH;
    pub static SCRATCH: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);
}

/// `v`, passed through this CPU's `SM_SCRATCH` word: the verifier tracks what a
/// program computes but not what it reads from a map, so the rest of the program
/// is checked once for all the values `v` could have come out as, not once per
/// way it was made. Returns `v` (a program does not migrate CPUs while it runs,
/// and no other program touches the word). The lookup of entry 0 of a one-entry
/// array cannot fail; if it did, 0 (returning `v` there would hand the verifier
/// every way of making `v` again).
#[inline(always)]
pub fn opaque(v: u64) -> u64 {
    let Some(slot) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's value of a per-CPU array, valid while the program runs.
    unsafe {
        core::ptr::write_volatile(slot, v);
        core::ptr::read_volatile(slot)
    }
}

named_map! {
    /// Datapath counters, per CPU (no atomics on the hot path).
    /// - key: `u32` index, one of `sockmesh_common::counter`
    /// - value: `u64` count on this CPU
    /// - writer: every program
    /// - reader: `sockmesh stats`, the agent's metrics (summed over CPUs)
    "SM_COUNTERS" == map_names::COUNTERS;
    pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);
}

named_map! {
    /// Open connections per backend endpoint, for least-connections services.
    /// - key: [`ConnKey`] (endpoint address, port, protocol), across services
    /// - value: `u64` connections placed on it by connect() and not yet released
    /// - writer: connect4/6 add one (inserting the entry on first use) when they
    ///   place a socket of a least-connections service; sock_release subtracts it
    ///   (see `conns.rs`); the agent deletes entries at 0 of endpoints no service
    ///   holds any more
    /// - reader: connect4/6 (the least-loaded of the drawn backends); `/metrics`
    /// - pinned under `<bpffs>/conns-v1/`, apart from the layout, so the counts
    ///   survive a layout migration
    /// - capacity: as `SM_BACKENDS` (`--max-backends`); a connection whose endpoint
    ///   finds no room is placed but not counted
    "SM_BACKEND_CONNS" == map_names::BACKEND_CONNS;
    pub static BACKEND_CONNS: HashMap<ConnKey, u64> =
        HashMap::pinned(MAX_BACKENDS_TOTAL, BPF_F_NO_PREALLOC);
}

const _: () = assert!(
    sockmesh_common::str_eq("SM_SOCK_CONNS", map_names::SOCK_CONNS),
    "map SM_SOCK_CONNS is not named as in sockmesh_common::map_names"
);
/// Socket storage: the endpoint a socket was counted on in `SM_BACKEND_CONNS`.
/// - key: the socket (`BPF_MAP_TYPE_SK_STORAGE`); the kernel frees the value with
///   the socket
/// - value: [`SockConn`] (endpoint, whether it holds a count)
/// - writer: connect4/6 (created on a least-connections placement); sock_release
///   clears `counted` when it releases the count, so a socket releases once
/// - pinned beside `SM_BACKEND_CONNS`: after an agent restart or a migration the
///   new programs still find the storage of sockets placed before
#[btf_map(name = "SM_SOCK_CONNS")]
pub static SOCK_CONNS: SkStorage<SockConn> = SkStorage::new();

named_map! {
    /// Outlier detection and circuit breaking settings of each service that has them.
    /// - key: [`ServiceKey`]
    /// - value: [`ServicePolicy`] (ejection threshold and times, ejection cap,
    ///   panic threshold, enforcing percent, open-connection limit, backend count)
    /// - writer: the agent, before it publishes a service value whose `flags` name
    ///   it; deleted after the service (or its flags) goes
    /// - reader: connect4/6 (circuit breaking, panic), sock_ops (ejection)
    /// - pinned under `<bpffs>/health-v2/`
    /// - capacity: as `SM_SERVICES` (`--max-services`); entries allocated on demand
    "SM_SVC_POLICY" == map_names::SERVICE_POLICY;
    pub static SERVICE_POLICY: HashMap<ServiceKey, ServicePolicy> =
        HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);
}

named_map! {
    /// Health of backend endpoints of outlier-detecting services.
    /// - key: [`EndpointKey`] (service, endpoint address and port)
    /// - value: [`EndpointHealth`] (failed connects in a row, ejected-until time,
    ///   multiplier, ejections)
    /// - writer: sock_ops creates an entry at an endpoint's first failed connect,
    ///   counts failures (atomic fetch-add), resets them on a success and ejects;
    ///   the agent deletes the entries of endpoints its service no longer has (an
    ///   EDS removal resets the endpoint's state), and sweeps the ones a connect
    ///   placed before the removal made when it failed after it
    /// - reader: connect4/6 (is the pick ejected), the agent (`/config_dump`,
    ///   `/metrics`, `sockmesh services`)
    /// - pinned under `<bpffs>/health-v2/`
    /// - capacity: as `SM_BACKENDS` (`--max-backends`); a failure that finds no
    ///   room is not counted
    "SM_EP_HEALTH" == map_names::ENDPOINT_HEALTH;
    pub static ENDPOINT_HEALTH: HashMap<EndpointKey, EndpointHealth> =
        HashMap::pinned(MAX_BACKENDS_TOTAL, BPF_F_NO_PREALLOC);
}

named_map! {
    /// Per-service kernel state of services with outlier detection or circuit
    /// breaking.
    /// - key: [`ServiceKey`]
    /// - value: [`ServiceHealth`] (open connections, overflows, the entry's epoch,
    ///   the ejection lock, active ejections)
    /// - writer: the agent creates it (zeroed, with a new epoch) before it
    ///   publishes a service value whose `flags` name outlier detection or a
    ///   circuit breaker, and deletes it after the service or its flags go;
    ///   connect4/6 count open connections and overflows in it; sock_release gives
    ///   a socket's connection back (to the epoch it took it from); sock_ops claims
    ///   ejection slots under its lock. No program creates it.
    /// - reader: connect4/6, sock_ops, the agent (`/metrics`)
    /// - pinned under `<bpffs>/health-v2/`
    /// - capacity: as `SM_SERVICES` (`--max-services`), which bounds the services
    ///   the agent publishes
    "SM_SVC_HEALTH" == map_names::SERVICE_HEALTH;
    pub static SERVICE_HEALTH: HashMap<ServiceKey, ServiceHealth> =
        HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);
}

const _: () = assert!(
    sockmesh_common::str_eq("SM_SOCK_HEALTH", map_names::SOCK_HEALTH),
    "map SM_SOCK_HEALTH is not named as in sockmesh_common::map_names"
);
/// Socket storage: where connect() placed a socket of a service with outlier
/// detection or circuit breaking.
/// - key: the socket (`BPF_MAP_TYPE_SK_STORAGE`); freed with the socket
/// - value: [`SockHealth`] (service and endpoint; watching the connect's outcome;
///   holding one of the service's open connections)
/// - writer: connect4/6 create it; sock_ops clears `watch` at the outcome;
///   sock_release clears `counted` when it releases the connection
/// - pinned under `<bpffs>/health-v2/`
#[btf_map(name = "SM_SOCK_HEALTH")]
pub static SOCK_HEALTH: SkStorage<SockHealth> = SkStorage::new();

/// Adds one to counter `index` on this CPU.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU value, programs do not migrate CPUs while running.
        unsafe { *slot += 1 };
    }
}

/// Adds one to the redirect (`redirected`) or no-backend count of counter slot
/// `slot` (a service's [`sockmesh_common::ServiceValue::stats`]; past the
/// array's end, as `NO_STATS` is, nothing is counted).
#[inline(always)]
pub fn count_service(slot: u32, redirected: bool) {
    if let Some(stats) = SERVICE_STATS.get_ptr_mut(slot) {
        // SAFETY: an array element, valid for the map's life. Only field addresses
        // are taken here; the add is atomic (other CPUs, and the agent when it
        // claims the slot, write the same element).
        let counter = unsafe {
            if redirected {
                core::ptr::addr_of_mut!((*stats).redirects)
            } else {
                core::ptr::addr_of_mut!((*stats).no_backend)
            }
        };
        crate::atomic::add(counter, 1);
    }
}
