//! Slot resolution, the one lookup chain every reader of the routing maps follows:
//! service key → [`ServiceValue`] → [`SlotKey`] (id, published generation, slot) →
//! backend index → [`BackendKey`] → backend. A Maglev service's slots are its
//! table's entries, read from the table chunk that holds them
//! ([`crate::MaglevChunk`], keyed by the chunk number in [`SlotKey::slot`]). A
//! service published with [`service_flags::DIRECT`] skips the slot lookup: its
//! slot `i` is backend index `i`.
//!
//! The kernel programs (`ebpf/programs/src/xlate.rs`) resolve one slot per
//! connect(); the agent's in-memory fake (`MemStore`) and its reader of the pinned
//! maps (`KernelMaps::reachable`) resolve every published slot. All three implement
//! [`RoutingMaps`] over their maps and call the functions below, so the key layout
//! is written once.

use crate::{
    BackendKey, EJECTED_REDRAWS, EJECTED_WALK, MAGLEV_CHUNK, ServiceKey, ServiceValue, SlotKey,
    Tiers, lb_policy, service_flags, tiers,
};

/// The bit of [`service_flags::ENVOY_DRAWS`].
const ENVOY_DRAWS_SHIFT: u32 = service_flags::ENVOY_DRAWS.trailing_zeros();

/// Read access to the three routing maps. Absent keys are `Ok(None)`; `Error` is
/// whatever a lookup itself can fail with (`Infallible` in the kernel and in memory).
pub trait RoutingMaps {
    /// What a backend lookup yields (the kernel copies out only address and port).
    type Backend;
    type Error;
    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, Self::Error>;
    fn slot(&self, key: &SlotKey) -> Result<Option<u32>, Self::Error>;
    /// Entry `entry` (below [`MAGLEV_CHUNK`]) of the Maglev table chunk `key`.
    fn maglev(&self, key: &SlotKey, entry: usize) -> Result<Option<u32>, Self::Error>;
    fn backend(&self, key: &BackendKey) -> Result<Option<Self::Backend>, Self::Error>;
    /// `v`, as a value the reader knows nothing about. The kernel's verifier
    /// follows every value it can through a program, and checks the rest of the
    /// program once for each way a value was made (a range from a level's table,
    /// or all the slots) unless it cannot tell them apart: the kernel passes `v`
    /// through a map, whose contents it does not track. Elsewhere, `v`.
    fn opaque(&self, v: u64) -> u64 {
        v
    }
    /// `f` of the priority levels of a generation ([`tiers_key`]), if present
    /// (the kernel reads them in place: too large for its stack).
    fn with_tiers<R>(
        &self,
        key: &SlotKey,
        f: impl FnOnce(&Tiers) -> R,
    ) -> Result<Option<R>, Self::Error>;
}

/// The `SM_TIERS` key of `service`'s published generation.
#[inline(always)]
pub fn tiers_key(service: &ServiceValue) -> SlotKey {
    SlotKey {
        service_id: service.id,
        generation: service.generation,
        pad: 0,
        slot: 0,
    }
}

/// Slot `slot` of `service`'s published generation (for a Maglev service, the
/// table chunk that holds entry `slot`).
#[inline(always)]
pub fn slot_key(service: &ServiceValue, slot: u32) -> SlotKey {
    let slot = if service.policy == lb_policy::MAGLEV {
        slot / MAGLEV_CHUNK as u32
    } else {
        slot
    };
    SlotKey {
        service_id: service.id,
        generation: service.generation,
        pad: 0,
        // Within u16: slot counts are bounded by MAX_SLOTS_PER_SERVICE, chunk
        // numbers by MAX_MAGLEV_CHUNKS_PER_TABLE.
        slot: slot as u16,
    }
}

/// Backend `index` of `service`.
#[inline(always)]
pub fn backend_key(service: &ServiceValue, index: u32) -> BackendKey {
    BackendKey {
        service_id: service.id,
        index,
    }
}

/// What one slot resolves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot<B> {
    Backend(B),
    /// The slot, or the backend it names, is absent: an update replaced the service
    /// between the service lookup and this one (or, read from userspace, the maps are
    /// inconsistent). The key is the slot's.
    Missing(SlotKey),
}

/// Resolves slot `slot` of `service`'s published generation.
#[inline(always)]
pub fn resolve_slot<M: RoutingMaps>(
    maps: &M,
    service: &ServiceValue,
    slot: u32,
) -> Result<Slot<M::Backend>, M::Error> {
    let index = slot_index(maps, service, slot)?;
    let key = slot_key(service, slot);
    if index == NO_INDEX {
        return Ok(Slot::Missing(key));
    }
    Ok(match maps.backend(&backend_key(service, index))? {
        Some(backend) => Slot::Backend(backend),
        None => Slot::Missing(key),
    })
}

/// What [`slot_index`] returns for a slot that is absent (backend indexes stay
/// below twice `MAX_BACKENDS_PER_SERVICE`).
pub const NO_INDEX: u32 = u32::MAX;

/// The backend index slot `slot` of `service`'s published generation names: the
/// slot itself for direct slots, else the slot's entry (or Maglev table entry), or
/// [`NO_INDEX`].
///
/// Out of line (a BPF subprogram in the kernel programs): the direct and the
/// looked-up paths differ in what they leave on the stack, and inlined, every
/// draw of a pick carried both states on into the rest of the program
/// (connect6 verified 307,365 instructions on 6.1). Returned from a
/// subprogram, whose frame is gone, both are one unknown scalar: 187,044 on 6.1,
/// 86,792 on 6.18.
#[inline(never)]
pub fn slot_index<M: RoutingMaps>(
    maps: &M,
    service: &ServiceValue,
    slot: u32,
) -> Result<u32, M::Error> {
    if service.flags & service_flags::DIRECT != 0 {
        return Ok(slot);
    }
    let key = slot_key(service, slot);
    let index = if service.policy == lb_policy::MAGLEV {
        maps.maglev(&key, slot as usize % MAGLEV_CHUNK)?
    } else {
        maps.slot(&key)?
    };
    Ok(index.unwrap_or(NO_INDEX))
}

/// The slot indexes of `service`'s published generation. The agent keeps
/// `slot_count` within `MAX_SLOTS_PER_SERVICE` (a Maglev table within
/// `MAX_MAGLEV_TABLE_SIZE`); a larger count (written by something else) is cut
/// there.
pub fn published_slots(service: &ServiceValue) -> core::ops::Range<u32> {
    let cap = if service.policy == lb_policy::MAGLEV {
        crate::MAX_MAGLEV_TABLE_SIZE
    } else {
        u32::from(u16::MAX) + 1
    };
    0..service.slot_count.min(cap)
}

/// Whole-table reads, for userspace readers of the maps (the kernel programs
/// resolve one slot at a time and never copy a chunk).
pub trait TableMaps: RoutingMaps {
    /// The Maglev table chunk `key`.
    fn maglev_chunk(&self, key: &SlotKey) -> Result<Option<crate::MaglevChunk>, Self::Error>;
}

/// Calls `f` with the backend index of every published slot of `service`, in
/// slot order, reading a Maglev table a chunk at a time (one lookup per 256
/// entries, not per entry). `Ok(Err(key))`: slot or chunk `key` is absent.
pub fn published_indices<M: TableMaps>(
    maps: &M,
    service: &ServiceValue,
    mut f: impl FnMut(u32),
) -> Result<Result<(), SlotKey>, M::Error> {
    let count = published_slots(service).len();
    if service.policy == lb_policy::MAGLEV {
        for first in (0..count).step_by(MAGLEV_CHUNK) {
            let key = slot_key(service, first as u32);
            let Some(chunk) = maps.maglev_chunk(&key)? else {
                return Ok(Err(key));
            };
            let n = (count - first).min(MAGLEV_CHUNK);
            chunk.entries[..n].iter().for_each(|&i| f(u32::from(i)));
        }
    } else if service.flags & service_flags::DIRECT != 0 {
        published_slots(service).for_each(&mut f);
    } else {
        for slot in published_slots(service) {
            let key = slot_key(service, slot);
            let Some(index) = maps.slot(&key)? else {
                return Ok(Err(key));
            };
            f(index);
        }
    }
    Ok(Ok(()))
}

/// What a forward lookup of one service address found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Picked<B> {
    /// Not a service address.
    NotService,
    /// A service with no active backend (`slot_count` 0).
    NoBackend,
    Backend(B),
    /// A backend of a least-connections service: the caller counts the connection
    /// on it.
    Counted(B),
    /// The chosen slot did not resolve (see [`Slot::Missing`]); a retry reads the
    /// newly published service value.
    Raced,
}

/// What [`pick`] read of the service besides the pick: its
/// [`ServiceValue::flags`] and its counter slot ([`ServiceValue::stats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub flags: u8,
    pub stats: u32,
}

impl Seen {
    /// What an address that is not a service shows.
    pub const NONE: Seen = Seen {
        flags: 0,
        stats: crate::NO_STATS,
    };
}

/// How [`pick`] draws: `random` for a fresh random slot, `client` for the hash of
/// the connecting client (a Maglev service's key), `load` for a backend's open
/// connections; for a service with outlier detection, `ejected` tells whether a
/// backend is ejected and `panic` whether the service's healthy share is below
/// its panic threshold (a service without levels: a level says so itself).
/// Each is called only when the service's policy needs it.
pub struct Draw<R, C, L, E, P> {
    pub random: R,
    pub client: C,
    pub load: L,
    pub ejected: E,
    pub panic: P,
}

/// Looks `key` up and picks a backend; returns the pick and what it [`Seen`] of
/// the service ([`Seen::NONE`] for an address that is not a service). The draws
/// are made only for a service with active backends.
///
/// First the slot range: all the service's slots, or, for a service with
/// priority levels ([`service_flags::TIERS`]), the range its generation's
/// [`Tiers::choice`] names for a random percent (the agent keeps that table to
/// the levels' loads with the hosts ejected now). Then,
/// within the range, the service's policy: a weighted-random service takes a
/// random slot; a least-connections one, when `least` allows it, draws
/// [`ServiceValue::choices`] random slots and takes the backend with the smallest
/// `load` (open connections; the first drawn among equals); a Maglev service
/// (never with levels) takes table entry `client() % slot_count`. Slots are
/// weight-proportional (so are a Maglev table's entries), so a heavier backend is
/// drawn more often: weights hold under every policy.
///
/// A service with outlier detection ([`service_flags::OUTLIER`]) whose pick is
/// ejected draws up to [`EJECTED_REDRAWS`] random slots of the range, then walks
/// up to [`EJECTED_WALK`] consecutive ones, for a backend that is not, unless the
/// range is served in panic (too few healthy hosts: then, as Envoy does,
/// ejections are ignored and the first pick stands).
#[inline(always)]
pub fn pick<M: RoutingMaps>(
    maps: &M,
    key: &ServiceKey,
    least: bool,
    draw_with: Draw<
        impl FnMut() -> u32,
        impl FnOnce() -> u32,
        impl FnMut(&M::Backend) -> u64,
        impl FnMut(&M::Backend) -> bool,
        impl FnOnce() -> bool,
    >,
) -> Result<(Picked<M::Backend>, Seen), M::Error>
where
    M::Backend: Copy,
{
    let Draw {
        mut random,
        client,
        load,
        mut ejected,
        panic,
    } = draw_with;
    let Some(service) = maps.service(key)? else {
        return Ok((Picked::NotService, Seen::NONE));
    };
    let flags = service.flags;
    let seen = Seen {
        flags,
        stats: service.stats,
    };
    if service.slot_count == 0 {
        return Ok((Picked::NoBackend, seen));
    }
    // The range, packed in one value whichever way it was found, and made
    // opaque: the rest of the pick is then checked once by the verifier.
    let choice = if flags & service_flags::TIERS != 0 {
        match range_choice(maps, &service, random() % 100)? {
            Some(c) => c,
            // Published together with the generation: a missing entry is a race.
            None => return Ok((Picked::Raced, seen)),
        }
    } else {
        u64::from(service.slot_count)
    };
    let choice = maps.opaque(choice);
    let range = Span {
        start: (choice >> 32) as u32 & 0xffff,
        len: choice as u32,
    };
    if range.len == 0 {
        return Ok((Picked::NoBackend, seen));
    }
    let picked = pick_by_policy(maps, &service, range, least, &mut random, client, load)?;
    let (Picked::Backend(b) | Picked::Counted(b)) = picked else {
        return Ok((picked, seen));
    };
    if flags & service_flags::OUTLIER == 0 || !ejected(&b) {
        return Ok((picked, seen));
    }
    // A level in panic serves all its hosts; a service without levels asks.
    let in_panic = if choice & LEVEL != 0 {
        choice & LEVEL_PANIC != 0
    } else {
        panic()
    };
    if in_panic {
        return Ok((picked, seen));
    }
    let moved = |other| match picked {
        Picked::Counted(_) => Picked::Counted(other),
        _ => Picked::Backend(other),
    };
    Ok(
        match avoid_ejected(maps, &service, range, &mut random, &mut ejected)? {
            WALK_NONE => (picked, seen),
            WALK_RACED => (Picked::Raced, seen),
            // The slot, resolved again (a lookup more, on this rare path only).
            slot => match draw(maps, &service, whole(&service), slot)? {
                Some(other) => (moved(other), seen),
                None => (Picked::Raced, seen),
            },
        },
    )
}

/// Bit of a packed range: it is a level's.
const LEVEL: u64 = 1 << 48;
/// Bit of a packed range: the level is in panic.
const LEVEL_PANIC: u64 = 1 << 49;

/// The range of `service`'s levels a draw `r` (in `0..100`) takes, packed:
/// length in bits 0..32 (0: nothing can serve), start in 32..48, [`LEVEL`], and
/// [`LEVEL_PANIC`] for a level in panic. `None`: the generation's levels are
/// missing (an update raced this lookup).
#[inline(always)]
fn range_choice<M: RoutingMaps>(
    maps: &M,
    service: &ServiceValue,
    r: u32,
) -> Result<Option<u64>, M::Error> {
    // Read back through memory: the compiler then cannot drop the mask, which is
    // the bound the kernel's verifier needs (it sees none in `% 100`).
    // SAFETY: a read of a local.
    let r = unsafe { core::ptr::read_volatile(&raw const r) } as usize & (tiers::CHOICES - 1);
    maps.with_tiers(&tiers_key(service), |t| {
        match tiers::range_of(t, t.choice[r]) {
            Some((range, panic)) => {
                u64::from(range.len)
                    | (u64::from(range.start) << 32)
                    | LEVEL
                    | if panic { LEVEL_PANIC } else { 0 }
            }
            None => LEVEL,
        }
    })
}

/// [`avoid_ejected`] found no backend that is not ejected.
const WALK_NONE: u32 = u32::MAX;
/// [`avoid_ejected`] met a slot that did not resolve (an update raced it).
const WALK_RACED: u32 = u32::MAX - 1;

/// A slot (of all the service's) whose backend is not ejected: the first of
/// [`EJECTED_REDRAWS`] random ones of `range`, else the first of up to
/// [`EJECTED_WALK`] consecutive slots from a random one of it; or [`WALK_NONE`]
/// / [`WALK_RACED`].
///
/// Not inlined: in the kernel this is a BPF subprogram. Its caller then sees one
/// return whatever the draw that found the slot, so the verifier checks the rest
/// of the program once, not once per draw (inlined, the walk made
/// connect4's verification 15 times longer: 410k instructions of the 1M limit).
/// Slot numbers stay below `MAX_SLOTS_PER_SERVICE`, far from the markers.
#[inline(never)]
fn avoid_ejected<M: RoutingMaps>(
    maps: &M,
    service: &ServiceValue,
    range: Span,
    random: &mut impl FnMut() -> u32,
    ejected: &mut impl FnMut(&M::Backend) -> bool,
) -> Result<u32, M::Error> {
    let len = range.len;
    // Checked by the caller too; here it tells the compiler that no `%` below
    // divides by zero (a panic path is no BPF program's end).
    if len == 0 {
        return Ok(WALK_NONE);
    }
    for _ in 0..EJECTED_REDRAWS {
        let slot = range.start + random() % len;
        let Some(other) = draw(maps, service, whole(service), slot)? else {
            return Ok(WALK_RACED);
        };
        if !ejected(&other) {
            return Ok(slot);
        }
    }
    // The random draws found none (few healthy left): walk the range; for a
    // level's range, then on across the service's other slots, which hold the
    // other levels' hosts: every host of the level ejected gives it no load,
    // which the agent's choice table says a map write later (until then the
    // walk finds the next level's hosts).
    let span = if range.len == service.slot_count {
        len
    } else {
        service.slot_count
    };
    let start = random() % len;
    for k in 0..EJECTED_WALK {
        if k >= span {
            break;
        }
        // Below 2 × slot_count: no overflow; `draw` takes it modulo the slots.
        let slot = range.start + start + k;
        let Some(other) = draw(maps, service, whole(service), slot)? else {
            return Ok(WALK_RACED);
        };
        if !ejected(&other) {
            return Ok(slot);
        }
    }
    Ok(WALK_NONE)
}

/// All of `service`'s slots.
#[inline(always)]
fn whole(service: &ServiceValue) -> Span {
    Span {
        start: 0,
        len: service.slot_count,
    }
}

/// The pick of `service`'s own policy within `range` (see [`pick`]).
#[inline(always)]
fn pick_by_policy<M: RoutingMaps>(
    maps: &M,
    service: &ServiceValue,
    range: Span,
    least: bool,
    random: &mut impl FnMut() -> u32,
    client: impl FnOnce() -> u32,
    mut load: impl FnMut(&M::Backend) -> u64,
) -> Result<Picked<M::Backend>, M::Error>
where
    M::Backend: Copy,
{
    if service.policy == lb_policy::MAGLEV {
        return Ok(match draw(maps, service, range, client())? {
            Some(b) => Picked::Backend(b),
            None => Picked::Raced,
        });
    }
    if !least || service.policy != lb_policy::LEAST_CONN {
        return Ok(match draw(maps, service, range, random())? {
            Some(b) => Picked::Backend(b),
            None => Picked::Raced,
        });
    }
    let choices = service.choices.clamp(1, crate::MAX_CHOICES);
    // 1 for distinct candidates, 0 for Envoy's draw, as a number: the draw
    // below is then one computation for both, not two ways the verifier follows.
    let distinct = u32::from(!service.flags) >> ENVOY_DRAWS_SHIFT & 1;
    // The best candidate is kept as its slot, not its backend, and resolved
    // again at the end (one lookup more): in the kernel a backend is a pointer
    // into a map, and the verifier keeps apart the states of a loop that carry
    // different pointers, where it merges those that carry different numbers.
    // Both start defined: a value left undefined until the first draw is one it
    // refuses to see spilled.
    let mut best = 0u32;
    let mut least = u64::MAX;
    for i in 0..crate::MAX_CHOICES {
        if i >= choices {
            break;
        }
        let r = random();
        // After the first, a distinct candidate is one of the slots other than
        // the best one's so far (it cannot win against itself; Envoy's draw,
        // with replacement, compares it): `best + 1 + r % (len - 1)`, wrapped.
        let slot = if i == 0 {
            r
        } else {
            let others = range.len.saturating_sub(distinct).max(1);
            (best * distinct + distinct).wrapping_add(r.checked_rem(others).unwrap_or(0))
        };
        let Some(slot) = slot.checked_rem(range.len) else {
            return Ok(Picked::Raced);
        };
        let Some(b) = draw(maps, service, range, slot)? else {
            return Ok(Picked::Raced);
        };
        let l = load(&b);
        if i == 0 || l < least {
            best = slot;
            least = l;
        }
    }
    Ok(match draw(maps, service, range, best)? {
        Some(b) => Picked::Counted(b),
        None => Picked::Raced,
    })
}

/// Slots `start..start + len` of a generation: all of them, or a level's range.
#[derive(Clone, Copy)]
struct Span {
    start: u32,
    len: u32,
}

/// The backend of slot `range.start + r % range.len` (`None`: the slot did not
/// resolve, or the range is empty). A range the agent wrote lies within the
/// published slots; one that does not misses, as a race does.
#[inline(always)]
fn draw<M: RoutingMaps>(
    maps: &M,
    service: &ServiceValue,
    range: Span,
    r: u32,
) -> Result<Option<M::Backend>, M::Error> {
    if range.len == 0 {
        return Ok(None);
    }
    let slot = range.start + r % range.len;
    Ok(match resolve_slot(maps, service, slot)? {
        Slot::Backend(b) => Some(b),
        Slot::Missing(_) => None,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::convert::Infallible;
    use std::{collections::BTreeMap, vec::Vec};

    use super::*;

    #[derive(Default)]
    struct Maps {
        services: BTreeMap<ServiceKey, ServiceValue>,
        slots: BTreeMap<SlotKey, u32>,
        backends: BTreeMap<BackendKey, u16>,
        maglev: BTreeMap<SlotKey, crate::MaglevChunk>,
        tiers: BTreeMap<SlotKey, Tiers>,
    }

    impl RoutingMaps for Maps {
        type Backend = u16;
        type Error = Infallible;
        fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, Infallible> {
            Ok(self.services.get(key).copied())
        }
        fn slot(&self, key: &SlotKey) -> Result<Option<u32>, Infallible> {
            Ok(self.slots.get(key).copied())
        }
        fn maglev(&self, key: &SlotKey, entry: usize) -> Result<Option<u32>, Infallible> {
            Ok(self.maglev.get(key).map(|c| u32::from(c.entries[entry])))
        }
        fn backend(&self, key: &BackendKey) -> Result<Option<u16>, Infallible> {
            Ok(self.backends.get(key).copied())
        }
        fn with_tiers<R>(
            &self,
            key: &SlotKey,
            f: impl FnOnce(&Tiers) -> R,
        ) -> Result<Option<R>, Infallible> {
            Ok(self.tiers.get(key).map(f))
        }
    }

    const KEY: ServiceKey = ServiceKey {
        addr: [0, 0, crate::V4_MAPPED_WORD, 0x0100_000a],
        port: 80u16.to_be(),
        proto: crate::PROTO_TCP,
        pad: 0,
    };

    /// Service 7, generation 1, slots 0..3 → backends 5, 6, 5 (ports 500, 600).
    fn maps() -> Maps {
        let value = ServiceValue {
            id: 7,
            slot_count: 3,
            generation: 1,
            policy: crate::lb_policy::RANDOM,
            choices: 0,
            flags: 0,
            revision: 1,
            stats: 4,
        };
        let mut m = Maps::default();
        m.services.insert(KEY, value);
        for (slot, index) in [(0, 5), (1, 6), (2, 5)] {
            m.slots.insert(slot_key(&value, slot), index);
        }
        m.backends.insert(backend_key(&value, 5), 500);
        m.backends.insert(backend_key(&value, 6), 600);
        // The other generation's slot 0 must not be read.
        m.slots.insert(
            SlotKey {
                generation: 0,
                ..slot_key(&value, 0)
            },
            99,
        );
        m
    }

    /// A pick of a service that is not Maglev (the client hash is never asked for).
    fn pick_random(
        m: &Maps,
        key: &ServiceKey,
        least: bool,
        random: impl FnMut() -> u32,
        load: impl FnMut(&u16) -> u64,
    ) -> Result<Picked<u16>, Infallible> {
        let client = || panic!("no client hash outside Maglev");
        pick(
            m,
            key,
            least,
            Draw {
                random,
                client,
                load,
                ejected: |_: &u16| false,
                panic: || false,
            },
        )
        .map(|(p, _)| p)
    }

    fn picked(m: &Maps, r: u32) -> Picked<u16> {
        match pick_random(m, &KEY, true, || r, |_| 0) {
            Ok(p) => p,
            Err(never) => match never {},
        }
    }

    /// What a pick of `key` saw of the service.
    fn seen(m: &Maps, key: &ServiceKey) -> Seen {
        let draw = Draw {
            random: || 0,
            client: || 0,
            load: |_: &u16| 0,
            ejected: |_: &u16| false,
            panic: || false,
        };
        match pick(m, key, false, draw) {
            Ok((_, seen)) => seen,
            Err(never) => match never {},
        }
    }

    #[test]
    fn a_pick_shows_the_services_counter_slot_and_flags() {
        let m = maps();
        assert_eq!(seen(&m, &KEY), Seen { flags: 0, stats: 4 });
        assert_eq!(seen(&m, &ServiceKey { port: 81, ..KEY }), Seen::NONE);
    }

    #[test]
    fn pick_follows_service_slot_backend() {
        let m = maps();
        assert_eq!(picked(&m, 0), Picked::Backend(500));
        assert_eq!(picked(&m, 4), Picked::Backend(600));
        assert_eq!(picked(&m, u32::MAX), Picked::Backend(500));
        let other = ServiceKey { port: 81, ..KEY };
        assert_eq!(
            pick_random(&m, &other, true, || 0, |_| 0),
            Ok(Picked::NotService)
        );
    }

    #[test]
    fn empty_service_is_no_backend_without_drawing() {
        let mut m = maps();
        if let Some(v) = m.services.get_mut(&KEY) {
            v.slot_count = 0;
        }
        let r = pick_random(
            &m,
            &KEY,
            true,
            || panic!("no draw for an empty service"),
            |_| 0,
        );
        assert_eq!(r, Ok(Picked::NoBackend));
    }

    #[test]
    fn a_missing_slot_or_backend_is_a_race() {
        let mut m = maps();
        let value = m.services[&KEY];
        m.slots.remove(&slot_key(&value, 1));
        assert_eq!(picked(&m, 1), Picked::Raced);
        m.backends.remove(&backend_key(&value, 5));
        let all: Vec<_> = published_slots(&value)
            .map(|s| resolve_slot(&m, &value, s))
            .collect();
        assert_eq!(
            all,
            [
                Ok(Slot::Missing(slot_key(&value, 0))),
                Ok(Slot::Missing(slot_key(&value, 1))),
                Ok(Slot::Missing(slot_key(&value, 2))),
            ]
        );
    }

    #[test]
    fn least_connections_draws_choices_and_takes_the_least_loaded() {
        let mut m = maps();
        let with_flags = |m: &mut Maps, flags: u8, choices: u8| {
            if let Some(v) = m.services.get_mut(&KEY) {
                v.policy = crate::lb_policy::LEAST_CONN;
                v.flags = flags;
                v.choices = choices;
            }
        };
        // Slots 0, 1, 2: backends 500 (3 open), 600 (1 open), 500.
        let load = |b: &u16| if *b == 500 { 3 } else { 1 };
        let pick_with = |m: &Maps, draws: &[u32], load: &dyn Fn(&u16) -> u64| {
            let mut draws = draws.iter().copied();
            pick_random(m, &KEY, true, || draws.next().unwrap_or(0), load)
        };
        // Envoy's draw: slots 0 and 1.
        with_flags(&mut m, service_flags::ENVOY_DRAWS, 2);
        assert_eq!(pick_with(&m, &[0, 1], &load), Ok(Picked::Counted(600)));
        // Equal loads: the first drawn.
        assert_eq!(pick_with(&m, &[2, 1], &|_| 7), Ok(Picked::Counted(500)));
        // Distinct: the second draw is among the slots other than the first's,
        // its value modulo their count (here 0 → the slot after slot 0).
        with_flags(&mut m, 0, 2);
        assert_eq!(pick_with(&m, &[0, 0], &load), Ok(Picked::Counted(600)));
        assert_eq!(pick_with(&m, &[2, 1], &|_| 7), Ok(Picked::Counted(500)));
        // An unconnected UDP pick (`least` false) stays one hashed draw, uncounted.
        let r = pick_random(&m, &KEY, false, || 1, |_| panic!("no load read"));
        assert_eq!(r, Ok(Picked::Backend(600)));
    }

    #[test]
    fn distinct_candidates_never_compare_a_backend_with_itself() {
        // Three backends of one slot each (equal weights: direct slots).
        let value = ServiceValue {
            id: 9,
            slot_count: 3,
            generation: 0,
            policy: crate::lb_policy::LEAST_CONN,
            choices: 2,
            flags: service_flags::DIRECT,
            revision: 1,
            stats: crate::NO_STATS,
        };
        let mut m = Maps::default();
        m.services.insert(KEY, value);
        for (index, port) in [(0, 100), (1, 200), (2, 300)] {
            m.backends.insert(backend_key(&value, index), port);
        }
        let compared = |m: &Maps, r1: u32, r2: u32| {
            let mut draws = [r1, r2].into_iter();
            let mut seen = std::vec::Vec::new();
            let _ = pick_random(
                m,
                &KEY,
                true,
                || draws.next().unwrap_or(0),
                |b| {
                    seen.push(*b);
                    0
                },
            );
            seen
        };
        let mut selves = 0;
        for r1 in 0..3 {
            for r2 in 0..12 {
                let seen = compared(&m, r1, r2);
                assert_eq!(seen.len(), 2);
                assert_ne!(seen[0], seen[1], "draws {r1}, {r2}");
            }
        }
        // Envoy's draw compares a backend with itself a third of the time.
        if let Some(v) = m.services.get_mut(&KEY) {
            v.flags |= service_flags::ENVOY_DRAWS;
        }
        for r1 in 0..3 {
            for r2 in 0..12 {
                let seen = compared(&m, r1, r2);
                selves += usize::from(seen[0] == seen[1]);
            }
        }
        assert_eq!(selves, 12);
    }

    #[test]
    fn least_connections_draws_are_bounded() {
        let mut m = maps();
        let mut draws = |flags: u8, choices: u8| {
            if let Some(v) = m.services.get_mut(&KEY) {
                v.policy = crate::lb_policy::LEAST_CONN;
                v.flags = flags;
                v.choices = choices;
            }
            let mut n = 0u32;
            let count = || {
                n += 1;
                0
            };
            let _ = pick_random(&m, &KEY, true, count, |_| 0);
            n
        };
        // choices 0 means 1; more than MAX_CHOICES is cut at it.
        for flags in [0, service_flags::ENVOY_DRAWS] {
            assert_eq!(draws(flags, 0), 1);
            assert_eq!(draws(flags, u8::MAX), u32::from(crate::MAX_CHOICES));
        }
    }

    #[test]
    fn maglev_takes_the_client_hash_entry_of_the_published_table() {
        let mut m = maps();
        let Some(v) = m.services.get_mut(&KEY) else {
            panic!("service")
        };
        v.policy = crate::lb_policy::MAGLEV;
        // A 300-entry table: chunk 0 holds entries 0..256, chunk 1 entries 256..300.
        v.slot_count = 300;
        let value = *v;
        let mut chunks = [crate::MaglevChunk {
            entries: [5; MAGLEV_CHUNK],
        }; 2];
        chunks[1].entries[299 - MAGLEV_CHUNK] = 6;
        for (n, c) in chunks.iter().enumerate() {
            m.maglev
                .insert(slot_key(&value, (n * MAGLEV_CHUNK) as u32), *c);
        }
        assert_eq!(slot_key(&value, 299).slot, 1);
        let hashed = |m: &Maps, h: u32| {
            let random = || panic!("no random draw for Maglev");
            let load = |_: &u16| panic!("no load read for Maglev");
            let client = || h;
            pick(
                m,
                &KEY,
                true,
                Draw {
                    random,
                    client,
                    load,
                    ejected: |_: &u16| panic!("no ejection read without outlier detection"),
                    panic: || false,
                },
            )
            .map(|(p, _)| p)
        };
        assert_eq!(hashed(&m, 299), Ok(Picked::Backend(600)));
        assert_eq!(hashed(&m, 599), Ok(Picked::Backend(600)));
        assert_eq!(hashed(&m, 298), Ok(Picked::Backend(500)));
        assert_eq!(hashed(&m, 0), Ok(Picked::Backend(500)));
        // Entries come from the table, never from the slot map.
        assert_eq!(published_slots(&value).count(), 300);
        m.maglev.remove(&slot_key(&value, 0));
        assert_eq!(hashed(&m, 3), Ok(Picked::Raced));
        assert_eq!(hashed(&m, 299), Ok(Picked::Backend(600)));
    }

    #[test]
    fn an_ejected_pick_draws_again_unless_the_service_is_in_panic() {
        let mut m = maps();
        let with_ejected = |m: &Maps, draws: &[u32], panic: bool, out: &[u16]| {
            let mut draws = draws.iter().copied();
            pick(
                m,
                &KEY,
                true,
                Draw {
                    random: || draws.next().unwrap_or(0),
                    client: || 0,
                    load: |_: &u16| 0,
                    ejected: |b: &u16| out.contains(b),
                    panic: || panic,
                },
            )
            .map(|(p, _)| p)
        };
        // Backend 500 (slots 0 and 2) is ejected.
        let with = |m: &Maps, draws: &[u32], panic: bool| with_ejected(m, draws, panic, &[500]);
        // Without outlier detection the ejection is never read.
        assert_eq!(with(&m, &[0, 1], false), Ok(Picked::Backend(500)));
        if let Some(v) = m.services.get_mut(&KEY) {
            v.flags = service_flags::OUTLIER;
        }
        // Slot 0 (500, ejected), then slot 2 (500 again), then slot 1 (600).
        assert_eq!(with(&m, &[0, 2, 1], false), Ok(Picked::Backend(600)));
        // In panic the first pick stands.
        assert_eq!(with(&m, &[0, 1], true), Ok(Picked::Backend(500)));
        // Every random redraw lands on 500: the walk of the table finds 600.
        let zeros = [0u32; 2 + EJECTED_REDRAWS as usize];
        assert_eq!(with(&m, &zeros, false), Ok(Picked::Backend(600)));
        // Every backend ejected: the first pick stands (bounded work: the
        // random draws, then one walk of the 3 slots).
        assert_eq!(
            with_ejected(&m, &zeros, false, &[500, 600]),
            Ok(Picked::Backend(500))
        );
        // A least-connections pick stays counted when it moves.
        if let Some(v) = m.services.get_mut(&KEY) {
            v.policy = crate::lb_policy::LEAST_CONN;
            v.choices = 1;
        }
        assert_eq!(with(&m, &[0, 1], false), Ok(Picked::Counted(600)));
    }

    /// Two levels: slots 0..2 (backends 500, 600) are level 0, slots 2..4
    /// (backends 700, 800) level 1. The generation's choice table says which
    /// range a draw's percent takes (the agent rewrites it as ejections move the
    /// loads), and the draw stays in that range.
    #[test]
    fn a_service_with_levels_draws_in_the_range_its_choice_table_names() {
        use crate::{
            SlotRange, Tier,
            tiers::{Ejected, choice_table, loads},
        };
        let mut m = maps();
        let v = {
            let Some(v) = m.services.get_mut(&KEY) else {
                panic!("service")
            };
            v.slot_count = 4;
            v.flags = service_flags::TIERS | service_flags::OUTLIER;
            *v
        };
        for (slot, index) in [(0, 5), (1, 6), (2, 7), (3, 8)] {
            m.slots.insert(slot_key(&v, slot), index);
        }
        m.backends.insert(backend_key(&v, 7), 700);
        m.backends.insert(backend_key(&v, 8), 800);
        let level = |start| Tier {
            healthy_slots: SlotRange { start, len: 2 },
            all_slots: SlotRange { start, len: 2 },
            hosts: 2,
            healthy: 2,
            total: 2,
            ..Tier::default()
        };
        let mut t = Tiers {
            count: 2,
            overprovisioning: 140,
            panic_percent: 50,
            ..Tiers::default()
        };
        t.tiers[0] = level(0);
        t.tiers[1] = level(2);
        // One of two level-0 hosts ejected: level 0 takes 70 %, level 1 30 %.
        let mut ejected = Ejected::NONE;
        ejected.add(0, false);
        t.choice = choice_table(&t, &loads(&t, &ejected));
        m.tiers.insert(tiers_key(&v), t);
        let with = |m: &Maps, draws: &[u32], out: &[u16]| {
            let mut draws = draws.iter().copied();
            pick(
                m,
                &KEY,
                true,
                Draw {
                    random: || draws.next().unwrap_or(0),
                    client: || 0,
                    load: |_: &u16| 0,
                    ejected: |b: &u16| out.contains(b),
                    panic: || panic!("a service with levels panics by level"),
                },
            )
            .map(|(p, _)| p)
        };
        assert_eq!(with(&m, &[69, 1], &[500]), Ok(Picked::Backend(600)));
        assert_eq!(with(&m, &[70, 0], &[500]), Ok(Picked::Backend(700)));
        // The ejected host drawn in level 0: redrawn within level 0.
        assert_eq!(with(&m, &[10, 0, 1], &[500]), Ok(Picked::Backend(600)));
        // Both ejected before the table is rewritten: the walk goes on past the
        // level's range and finds level 1's hosts.
        assert_eq!(with(&m, &[10, 0], &[500, 600]), Ok(Picked::Backend(700)));
        // The table rewritten: everything to level 1.
        ejected.add(0, false);
        if let Some(t) = m.tiers.get_mut(&tiers_key(&v)) {
            t.choice = choice_table(t, &loads(t, &ejected));
        }
        assert_eq!(with(&m, &[0, 1], &[500, 600]), Ok(Picked::Backend(800)));
        // The generation's levels missing: a race, as a missing slot is.
        m.tiers.clear();
        assert_eq!(with(&m, &[0, 0], &[]), Ok(Picked::Raced));
    }

    #[test]
    fn published_slots_stay_in_the_index_range() {
        let mut v = maps().services[&KEY];
        assert_eq!(published_slots(&v).collect::<Vec<_>>(), [0, 1, 2]);
        v.slot_count = u32::MAX;
        assert_eq!(published_slots(&v).count(), 65_536);
    }
}
