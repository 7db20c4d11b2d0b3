//! Forward (VIP → backend) and reverse (backend → VIP) translation, independent of
//! the hook's context type. Addresses are IPv6 or IPv4-mapped, network byte order.

use core::convert::Infallible;

use sockmesh_common::{
    BackendInfo, BackendKey, MAGLEV_CHUNK, ReverseKey, ReverseValue, ServiceKey, ServiceValue,
    SlotKey, SockReverse, Tiers, counter,
    resolve::{self, Draw, Picked, RoutingMaps, Seen},
};

use crate::{
    conns, health,
    maps::{BACKENDS, MAGLEV, REVERSE, REVERSE_UDP, SERVICES, SLOTS, TIERS, count},
};

/// A socket address in map form.
#[derive(Clone, Copy)]
pub struct Addr {
    pub ip: [u32; 4],
    /// Network byte order.
    pub port: u16,
}

/// A backend as a pick sees it: its entry in `SM_BACKENDS`, read in place (valid
/// for the program's RCU read section: the map is `BPF_F_NO_PREALLOC`, so a
/// replaced entry is freed only after it). One pointer, never null: the
/// `Option`s and enums that carry it through the pick are one register, with no
/// undefined bytes for the verifier to refuse.
#[derive(Clone, Copy)]
pub struct Target(&'static BackendInfo);

impl Target {
    /// Where to send.
    #[inline(always)]
    pub fn addr(self) -> Addr {
        Addr {
            ip: self.0.addr,
            port: self.0.port,
        }
    }

    /// Its state and level: which of its level's host counts an ejection of it
    /// takes one from.
    #[inline(always)]
    pub fn state(self) -> u8 {
        self.0.state
    }

    #[inline(always)]
    pub fn level(self) -> u8 {
        self.0.level
    }
}

/// The backend a forward lookup chose, copied out of its map entry: the rest of
/// the program carries numbers, not a pointer into the map (the verifier merges
/// states that differ in numbers, not those that carry different pointers, and
/// every draw of a pick looked its backend up anew).
#[derive(Clone, Copy)]
pub struct Chosen {
    pub addr: Addr,
    pub state: u8,
    pub level: u8,
}

impl Chosen {
    #[inline(always)]
    fn of(t: Target) -> Self {
        Self {
            addr: t.addr(),
            state: t.state(),
            level: t.level(),
        }
    }
}

/// What a forward lookup decided.
pub enum Forward {
    /// Not a service address: leave the call alone.
    Pass,
    /// A service with an active backend: send there; `counted`: a
    /// least-connections service, whose placements are counted (`conns`);
    /// `flags`: the service's [`sockmesh_common::service_flags`] (`health`);
    /// `stats`: its counter slot.
    Redirect {
        service: ServiceKey,
        backend: Chosen,
        counted: bool,
        flags: u8,
        stats: u32,
    },
    /// A service without an active backend (its counter slot): refuse the call.
    NoBackend(u32),
    /// A service whose updates raced both lookups: refuse the call (it has
    /// backends; a retry finds them).
    Raced,
}

/// How a backend is picked among the service's slots.
#[derive(Clone, Copy)]
pub enum Pick {
    /// A fresh random slot (one connect(), one choice).
    Random,
    /// A slot derived from this value (the socket cookie for unconnected UDP), so
    /// every datagram of one socket goes to the same backend while the service is
    /// unchanged.
    Hash(u64),
}

impl Pick {
    /// The value the slot is drawn from (`value % slot_count`).
    #[inline(always)]
    fn value(self) -> u32 {
        match self {
            // SAFETY: helper without arguments.
            Pick::Random => unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() },
            Pick::Hash(v) => hash(v),
        }
    }
}

/// A 64-bit value mixed down to 32 well-spread bits (the splitmix64 finalizer):
/// consecutive cookies and addresses land on unrelated slots.
#[inline(always)]
pub fn hash(v: u64) -> u32 {
    let mut x = v;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) as u32
}

/// Looks `dst` up as a service for `proto` and picks a backend. `client` gives the
/// connecting client's identity, asked for only by a Maglev service.
#[inline(always)]
pub fn forward(dst: Addr, proto: u8, pick: Pick, client: &impl Fn() -> u64) -> Forward {
    let key = ServiceKey {
        addr: dst.ip,
        port: dst.port,
        proto,
        pad: 0,
    };
    // Two attempts: the second only if an update deleted the slot we picked between
    // our service lookup and our slot lookup; by then the new generation is published.
    let verdict = match try_pick(&key, pick, client) {
        (Picked::Raced, _) => {
            count(counter::SLOT_RETRY);
            try_pick(&key, pick, client)
        }
        done => done,
    };
    match verdict {
        (Picked::NotService, _) => Forward::Pass,
        (Picked::Backend(backend), seen) => Forward::Redirect {
            service: key,
            backend: Chosen::of(backend),
            counted: false,
            flags: seen.flags,
            stats: seen.stats,
        },
        (Picked::Counted(backend), seen) => Forward::Redirect {
            service: key,
            backend: Chosen::of(backend),
            counted: true,
            flags: seen.flags,
            stats: seen.stats,
        },
        (Picked::NoBackend, seen) => Forward::NoBackend(seen.stats),
        (Picked::Raced, _) => Forward::Raced,
    }
}

#[inline(always)]
fn try_pick(key: &ServiceKey, pick: Pick, client: &impl Fn() -> u64) -> (Picked<Target>, Seen) {
    // A least-connections pick only for a fresh placement: an unconnected UDP
    // socket's datagrams follow its hash, and are not connections to count.
    let least = matches!(pick, Pick::Random);
    let proto = key.proto;
    // Read only by a service with outlier detection.
    let now = health::now();
    let draw = Draw {
        // A redraw away from an ejected backend is random even for a hashed pick.
        random: || pick.value(),
        client: || hash(client()),
        load: |b: &Target| conns::load(&conns::key(b.addr(), proto)),
        ejected: |b: &Target| health::ejected(&health::endpoint(key, b.addr()), now),
        panic: || health::panic(key, now),
    };
    match resolve::pick(&Maps, key, least, draw) {
        Ok(picked) => picked,
        Err(never) => match never {},
    }
}

/// The routing maps, as slot resolution (`sockmesh_common::resolve`) reads them.
struct Maps;

impl RoutingMaps for Maps {
    type Backend = Target;
    type Error = Infallible;

    #[inline(always)]
    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, Infallible> {
        // SAFETY: the map is BPF_F_NO_PREALLOC, so the value stays valid for this
        // program's RCU read section even if the agent replaces it; we copy it at once.
        Ok(unsafe { SERVICES.get(key) }.copied())
    }

    #[inline(always)]
    fn slot(&self, key: &SlotKey) -> Result<Option<u32>, Infallible> {
        // SAFETY: as above.
        Ok(unsafe { SLOTS.get(key) }.copied())
    }

    #[inline(always)]
    fn maglev(&self, key: &SlotKey, entry: usize) -> Result<Option<u32>, Infallible> {
        // SAFETY: as above; one entry is copied out. The mask keeps the index
        // within the chunk for the verifier (resolve passes it below MAGLEV_CHUNK).
        Ok(unsafe { MAGLEV.get(key) }.map(|c| u32::from(c.entries[entry & (MAGLEV_CHUNK - 1)])))
    }

    #[inline(always)]
    fn backend(&self, key: &BackendKey) -> Result<Option<Target>, Infallible> {
        // SAFETY: as above: the value stays valid, and unchanged (the agent
        // replaces entries, never writes into them), for this RCU read section.
        Ok(unsafe { BACKENDS.get(key) }.map(Target))
    }

    #[inline(always)]
    fn opaque(&self, v: u64) -> u64 {
        crate::maps::opaque(v)
    }

    #[inline(always)]
    fn with_tiers<R>(
        &self,
        key: &SlotKey,
        f: impl FnOnce(&Tiers) -> R,
    ) -> Result<Option<R>, Infallible> {
        // SAFETY: as above; the value is read in place (too large to copy to the
        // stack) for this RCU read section, and published before the service
        // value that names its generation.
        Ok(unsafe { TIERS.get(key) }.map(f))
    }
}

/// Remembers that the unconnected UDP socket `cookie` asked for `vip` and was
/// sent to `backend`, in the LRU `SM_REVERSE_UDP` (nothing would delete it).
#[inline(always)]
pub fn remember_unconnected(cookie: u64, backend: Addr, vip: Addr) {
    // An LRU insert makes room by evicting: it does not fail for want of it.
    let _ = REVERSE_UDP.insert(&reverse_key(cookie, backend), &reverse_value(vip), 0);
}

/// Remembers that the connecting socket `cookie` asked for `vip` and was sent to
/// `backend`, in `SM_REVERSE`, and in its storage `held` (null: none could be
/// made) which entry that is: the socket's entry for an earlier peer is deleted
/// first, and sock_release finds this one whatever the socket's peer is then.
#[inline(always)]
pub fn remember_connected(held: *mut SockReverse, cookie: u64, backend: Addr, vip: Addr) {
    if !held.is_null() {
        forget_held(held, cookie);
    }
    // A full map costs this socket its reverse translation (and its termination
    // by `--terminate-removed-connections`); the connection itself proceeds.
    if REVERSE
        .insert(&reverse_key(cookie, backend), &reverse_value(vip), 0)
        .is_err()
    {
        count(counter::REVERSE_FULL);
        return;
    }
    if !held.is_null() {
        // SAFETY: the socket's own storage, valid while the program runs; the
        // socket is locked by connect(), so no other program of it runs meanwhile.
        unsafe {
            (*held).addr = backend.ip;
            (*held).port = backend.port;
            (*held).held = 1;
        }
    }
}

/// Deletes the `SM_REVERSE` entry of socket `cookie` its storage `held` names,
/// if it holds one.
#[inline(always)]
pub fn forget_held(held: *mut SockReverse, cookie: u64) {
    // SAFETY: as in `remember_connected`; sock_release runs once the socket is
    // no longer used.
    let peer = unsafe {
        if (*held).held == 0 {
            return;
        }
        (*held).held = 0;
        Addr {
            ip: (*held).addr,
            port: (*held).port,
        }
    };
    forget(cookie, peer);
}

#[inline(always)]
fn reverse_value(vip: Addr) -> ReverseValue {
    ReverseValue {
        addr: vip.ip,
        port: vip.port,
        pad: [0; 2],
    }
}

/// The VIP that socket `cookie` asked for when it reached `peer`, if any.
#[inline(always)]
pub fn reverse(cookie: u64, peer: Addr) -> Option<Addr> {
    let key = reverse_key(cookie, peer);
    // SAFETY: values copied at once; an LRU reuse would at worst give a stale VIP.
    let v = unsafe { REVERSE.get(&key) }.or_else(|| unsafe { REVERSE_UDP.get(&key) })?;
    Some(Addr {
        ip: v.addr,
        port: v.port,
    })
}

/// Forgets socket `cookie`'s `SM_REVERSE` entry for `peer`.
#[inline(always)]
pub fn forget(cookie: u64, peer: Addr) {
    let _ = REVERSE.remove(&reverse_key(cookie, peer));
}

#[inline(always)]
fn reverse_key(cookie: u64, a: Addr) -> ReverseKey {
    ReverseKey {
        cookie,
        addr: a.ip,
        port: a.port,
        pad: [0; 6],
    }
}
