//! Outlier detection and circuit breaking, in the kernel.
//!
//! connect() of a service with either setting records where it placed the socket
//! in the socket's storage (`SM_SOCK_HEALTH`):
//! - **circuit breaking**: it takes one of the service's open connections
//!   (`ServiceHealth::conns`, a fetch-add, so exactly `max_connections` sockets
//!   hold one) or refuses the connect; sock_release gives it back;
//! - **outlier detection**: it marks the socket watched; the sock_ops program asks
//!   for TCP state callbacks on it at `TCP_CONNECT_CB` and sees the outcome:
//!   SYN_SENT → ESTABLISHED resets the endpoint's failures, SYN_SENT → CLOSE (RST,
//!   ICMP error, SYN timeout, or the application giving up) counts one. The
//!   failure that makes `consecutive` in a row ejects the endpoint until a time
//!   (`base_ejection` × multiplier, capped), which connect() reads: the next
//!   connect avoids it, with no round trip to userspace. It returns by itself when
//!   its time is up.
//!
//! A service's `SM_SVC_HEALTH` entry is the agent's to create and delete (with a
//! new epoch each time); the programs only count in it. A socket gives its
//! connection back only to the entry, the epoch, it took it from: a service
//! removed and created again starts its count at 0, and the old sockets closing
//! later do not take the new count down. An ejection is claimed under the
//! entry's lock (compare-and-swap), so endpoints failing on several CPUs at once
//! never pass `max_ejection_percent` together nor share a slot.

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
        BPF_TCP_ESTABLISHED, BPF_TCP_SYN_SENT, bpf_sock,
    },
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, generated::bpf_sk_storage_get},
    maps::HashMap,
    programs::{SockAddrContext, SockOpsContext},
};
use sockmesh_common::{
    EndpointHealth, EndpointKey, Event, MAX_EJECTED, PROTO_TCP, ServiceHealth, ServiceKey,
    ServicePolicy, SockHealth, event, service_flags,
};

use crate::{
    atomic,
    maps::{ENDPOINT_HEALTH, SERVICE_HEALTH, SERVICE_POLICY, SOCK_HEALTH},
    xlate::{Addr, Chosen},
};

const NS_PER_MS: u64 = 1_000_000;

/// `CLOCK_MONOTONIC`, nanoseconds: the clock of every ejection time.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The health key of `backend` of `service`.
#[inline(always)]
pub fn endpoint(service: &ServiceKey, backend: Addr) -> EndpointKey {
    EndpointKey {
        service: *service,
        addr: backend.ip,
        port: backend.port,
        pad: 0,
    }
}

/// Whether `endpoint` is ejected at `now`.
#[inline(always)]
pub fn ejected(endpoint: &EndpointKey, now: u64) -> bool {
    // SAFETY: NO_PREALLOC hash map: the value stays valid for this RCU read
    // section; one field is copied at once.
    unsafe { ENDPOINT_HEALTH.get(endpoint) }.is_some_and(|h| h.ejected_until_ns > now)
}

/// Whether `service` (one level, all hosts healthy as configured) is in panic at
/// `now`, as Envoy judges a priority level: its normalized total is below 100
/// (`overprovisioning × healthy < 100 × backends`) and fewer than its panic
/// percentage of its backends are not ejected. Then connect() ignores ejections.
#[inline(always)]
pub fn panic(service: &ServiceKey, now: u64) -> bool {
    // SAFETY: as in `ejected`; the fields are copied at once.
    let Some((percent, backends, overprovisioning)) =
        (unsafe { SERVICE_POLICY.get(service) }).map(|p| {
            (
                u64::from(p.panic_percent),
                u64::from(p.backends),
                u64::from(p.overprovisioning),
            )
        })
    else {
        return false;
    };
    if percent == 0 {
        return false;
    }
    let Some(h) = SERVICE_HEALTH.get_ptr_mut(service) else {
        return false;
    };
    // SAFETY: a map value looked up above.
    let (active, _) = unsafe { scan(h, service, now) };
    let healthy = backends.saturating_sub(active);
    overprovisioning * healthy < 100 * backends && healthy * 100 < percent * backends
}

/// The service's ejections running at `now`, and the first slot free for a new
/// one (`MAX_EJECTED`: none). An ejection runs while its time is in the future
/// and its endpoint still holds that time (an EDS update that removed the
/// endpoint deleted its entry, and the slot is free again).
///
/// # Safety
/// `h` is a live value of `SM_SVC_HEALTH`.
#[inline(always)]
unsafe fn scan(h: *const ServiceHealth, service: &ServiceKey, now: u64) -> (u64, usize) {
    let mut active = 0;
    let mut free = MAX_EJECTED;
    // One key, rewritten for each slot (the stack is 512 bytes).
    let mut key = EndpointKey {
        service: *service,
        ..EndpointKey::default()
    };
    // Downwards, so `free` ends at the lowest free slot with no comparison inside
    // the loop: a comparison with a constant would make the verifier track every
    // path's `free` exactly, and walk the loop once per combination.
    for i in (0..MAX_EJECTED).rev() {
        // SAFETY: the caller's contract; `i` is in bounds; fields copied at once.
        let running = unsafe {
            let e = &raw const (*h).ejections[i];
            let until = core::ptr::read_volatile(&raw const (*e).until_ns);
            until > now && {
                key.addr = core::ptr::read_volatile(&raw const (*e).addr);
                key.port = core::ptr::read_volatile(&raw const (*e).port);
                // NO_PREALLOC hash map: valid for this RCU read section.
                ENDPOINT_HEALTH
                    .get(&key)
                    .is_some_and(|ep| ep.ejected_until_ns == until)
            }
        };
        if running {
            active += 1;
        } else {
            free = i;
        }
    }
    (active, free)
}

/// `key`'s value in `map`, created as a copy of `new` on first use; `None` if
/// the map has no room. `new` is a static: the kernel copies it from the
/// object's data, not from the 512-byte stack.
#[inline(always)]
fn get_or_create<K, V>(map: &HashMap<K, V>, key: &K, new: &'static V) -> Option<*mut V> {
    if let Some(v) = map.get_ptr_mut(key) {
        return Some(v);
    }
    let _ = map.insert(key, new, u64::from(BPF_NOEXIST));
    // Ours, or the one another CPU created meanwhile.
    map.get_ptr_mut(key)
}

static NEW_ENDPOINT_HEALTH: EndpointHealth = EndpointHealth::ZERO;

/// The service's kernel state, which the agent created before it published the
/// service's flags (`None`: the map had no room, which the agent reports).
#[inline(always)]
fn service_health(service: &ServiceKey) -> Option<*mut ServiceHealth> {
    SERVICE_HEALTH.get_ptr_mut(service)
}

/// A connect refused by the service's circuit breaker (`max_connections`).
pub struct Overflow;

/// Records where connect() placed the socket of `ctx` (service `flags` name
/// outlier detection or circuit breaking, or both), releasing the connection an
/// earlier connect of the same socket held. With circuit breaking, takes one of
/// the service's open connections, or fails with [`Overflow`] when none is left.
#[inline(always)]
pub fn place(
    ctx: &SockAddrContext,
    flags: u8,
    proto: u8,
    service: &ServiceKey,
    target: Chosen,
) -> Result<(), Overflow> {
    let storage = SOCK_HEALTH.get_or_insert_ptr_mut(ctx, None);
    if storage.is_null() {
        // No storage (out of memory): placed, neither watched nor counted.
        return Ok(());
    }
    // SAFETY: the socket's own storage, valid while the program runs; connect()
    // holds the socket lock, so no other program of this socket runs meanwhile.
    unsafe {
        give_back_held(storage);
        (*storage).watch = 0;
        if flags & service_flags::CIRCUIT != 0 {
            match take(service) {
                Taken::Overflow => return Err(Overflow),
                Taken::Unlimited => {}
                Taken::One(epoch) => {
                    (*storage).counted = 1;
                    (*storage).epoch = epoch;
                }
            }
        }
        (*storage).endpoint = endpoint(service, target.addr);
        (*storage).state = target.state;
        (*storage).level = target.level;
        (*storage).watch = u8::from(flags & service_flags::OUTLIER != 0 && proto == PROTO_TCP);
    }
    Ok(())
}

/// A placement on a service with neither outlier detection nor a circuit breaker:
/// no storage is created (that cost about 0.9 µs per connect for every service
/// with direct slots, whose flag the caller once took for a health flag). A socket
/// placed before (connect() again after a failed one) gives back the connection
/// its earlier placement holds and is no longer watched.
#[inline(always)]
pub fn unplace(ctx: &SockAddrContext) {
    let storage = SOCK_HEALTH.get_ptr_mut(ctx);
    if storage.is_null() {
        return;
    }
    // SAFETY: as in `place`.
    unsafe {
        give_back_held(storage);
        (*storage).watch = 0;
    }
}

/// Gives back the open connection the placement recorded in `storage` holds, if
/// any, and records that it holds none.
///
/// # Safety
/// `storage` is a socket's own storage (not null), valid while the program runs.
#[inline(always)]
unsafe fn give_back_held(storage: *mut SockHealth) {
    // SAFETY: the caller's contract.
    unsafe {
        if (*storage).counted != 0 {
            (*storage).counted = 0;
            give_back(&(*storage).endpoint.service, (*storage).epoch);
        }
    }
}

/// What [`take`] did.
enum Taken {
    /// One of the service's connections, from the entry of this epoch.
    One(u64),
    /// The service has no limit (or no entry to count in).
    Unlimited,
    /// The service is at `max_connections` (counted as an overflow).
    Overflow,
}

/// Takes one of `service`'s open connections.
#[inline(always)]
fn take(service: &ServiceKey) -> Taken {
    // SAFETY: as in `ejected`.
    let max = match unsafe { SERVICE_POLICY.get(service) } {
        Some(p) if p.max_connections != 0 => u64::from(p.max_connections),
        _ => return Taken::Unlimited,
    };
    let Some(h) = service_health(service) else {
        return Taken::Unlimited;
    };
    // SAFETY: a map value looked up above; its fields are u64-aligned.
    unsafe {
        if atomic::fetch_add(&raw mut (*h).conns, 1) >= max {
            atomic::decrement(&raw mut (*h).conns);
            atomic::add(&raw mut (*h).overflows, 1);
            return Taken::Overflow;
        }
        Taken::One(core::ptr::read_volatile(&raw const (*h).epoch))
    }
}

/// Gives back one of `service`'s open connections, to the entry of `epoch` only
/// (a newer entry of a service created again never counted it).
#[inline(always)]
fn give_back(service: &ServiceKey, epoch: u64) {
    if let Some(h) = SERVICE_HEALTH.get_ptr_mut(service) {
        // SAFETY: as in `take`.
        unsafe {
            if core::ptr::read_volatile(&raw const (*h).epoch) == epoch {
                atomic::decrement(&raw mut (*h).conns);
            }
        }
    }
}

/// The storage of socket `sk`, if connect() created one.
#[inline(always)]
fn storage_of(sk: *mut bpf_sock) -> *mut SockHealth {
    // SAFETY: looks up (never creates) the storage of a socket the program was
    // given; the helper takes the map and the socket pointer.
    unsafe {
        bpf_sk_storage_get(
            (&raw const SOCK_HEALTH).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockHealth>()
}

/// Socket going away: gives back the open connection it holds, if any.
#[inline(always)]
pub fn release(sk: *mut bpf_sock) {
    let storage = storage_of(sk);
    if storage.is_null() {
        return;
    }
    // SAFETY: the socket's own storage, valid while the program runs.
    unsafe { give_back_held(storage) }
}

/// The sock_ops program: asks for state callbacks on watched active opens, and
/// turns the SYN_SENT → ESTABLISHED / CLOSE transition into a success or failure.
#[inline(always)]
pub fn sock_ops(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: reading the context's socket pointer (verifier-checked).
        let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
        if sk.is_null() {
            return;
        }
        let storage = storage_of(sk);
        // SAFETY: the socket's own storage, valid while the program runs.
        if !storage.is_null() && unsafe { (*storage).watch } != 0 {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        return;
    }
    if op != aya_ebpf::bindings::BPF_SOCK_OPS_STATE_CB || ctx.arg(0) != BPF_TCP_SYN_SENT {
        return;
    }
    let new_state = ctx.arg(1);
    // SAFETY: as above.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    let storage = storage_of(sk);
    // SAFETY: the socket's own storage, valid while the program runs; the state
    // callback runs under the socket's lock.
    unsafe {
        if storage.is_null() || (*storage).watch == 0 {
            return;
        }
        (*storage).watch = 0;
        let endpoint = (*storage).endpoint;
        if new_state == BPF_TCP_ESTABLISHED {
            succeeded(&endpoint);
            let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        } else if new_state == BPF_TCP_CLOSE {
            let host = Host {
                state: (*storage).state,
                level: (*storage).level,
            };
            failed(&endpoint, host, now());
        }
    }
}

/// A connect to `endpoint` succeeded: its failures in a row start again from 0.
#[inline(always)]
fn succeeded(endpoint: &EndpointKey) {
    if let Some(h) = ENDPOINT_HEALTH.get_ptr_mut(endpoint) {
        // SAFETY: a map value looked up above; a racing failure's count is lost
        // either way (the success came after it).
        unsafe {
            if core::ptr::read_volatile(&raw const (*h).failures) != 0 {
                core::ptr::write_volatile(&raw mut (*h).failures, 0);
            }
        }
    }
}

/// The state and level of a host as connect() placed a socket on it.
#[derive(Clone, Copy)]
struct Host {
    state: u8,
    level: u8,
}

/// A connect to `endpoint` failed at `now`: counts it, and ejects the endpoint at
/// the service's threshold (once: the fetch-add gives the threshold to one CPU).
#[inline(always)]
fn failed(endpoint: &EndpointKey, host: Host, now: u64) {
    // SAFETY: as in `ejected`; copied at once.
    let Some(policy) = (unsafe { SERVICE_POLICY.get(&endpoint.service) }).copied() else {
        return;
    };
    if policy.consecutive == 0 {
        return;
    }
    let Some(h) = endpoint_health(endpoint) else {
        return;
    };
    // SAFETY: a map value looked up above; its fields are u64-aligned.
    unsafe {
        if core::ptr::read_volatile(&raw const (*h).ejected_until_ns) > now {
            // Already ejected: connects in flight when it was ejected do not count.
            return;
        }
        let failures = atomic::fetch_add(&raw mut (*h).failures, 1) + 1;
        if failures != u64::from(policy.consecutive) {
            return;
        }
        // This failure is the detection; counting starts again whatever follows.
        core::ptr::write_volatile(&raw mut (*h).failures, 0);
        // SAFETY (helper): no arguments.
        if bpf_get_prandom_u32() % 100 >= u32::from(policy.enforcing) {
            return;
        }
        if !eject(h, endpoint, host, &policy, now) {
            // Another CPU held the service's ejection lock throughout: the next
            // failure detects again.
            core::ptr::write_volatile(&raw mut (*h).failures, u64::from(policy.consecutive) - 1);
        }
    }
}

/// Attempts at the service's ejection lock: another CPU holds it for one scan
/// of [`MAX_EJECTED`] slots.
const LOCK_TRIES: u32 = 16;

/// The endpoint's health entry, created at its first failure.
#[inline(always)]
fn endpoint_health(endpoint: &EndpointKey) -> Option<*mut EndpointHealth> {
    get_or_create(&ENDPOINT_HEALTH, endpoint, &NEW_ENDPOINT_HEALTH)
}

/// Ejects the endpoint of `h` from `service` at `now`, unless the service's
/// ejected share would pass `max_ejection_percent` (one ejection is always
/// allowed, as in Envoy) or it has [`MAX_EJECTED`] running. The scan and the
/// claim of a slot happen under the service's lock; false when the lock stayed
/// taken (nothing was done).
///
/// # Safety
/// `h` is a live value of `SM_EP_HEALTH`.
#[inline(always)]
unsafe fn eject(
    h: *mut EndpointHealth,
    endpoint: &EndpointKey,
    host: Host,
    policy: &ServicePolicy,
    now: u64,
) -> bool {
    let service = &endpoint.service;
    let Some(s) = service_health(service) else {
        return true;
    };
    // SAFETY: a map value looked up above; u64-aligned.
    let lock = unsafe { &raw mut (*s).lock };
    let mut locked = false;
    for _ in 0..LOCK_TRIES {
        if atomic::cmpxchg(lock, 0, 1) == 0 {
            locked = true;
            break;
        }
    }
    if !locked {
        return false;
    }
    // SAFETY: `s` as above, `h` by the caller's contract; the lock is ours.
    unsafe { eject_locked(s, h, endpoint, host, policy, now) };
    // Released with a full barrier: the slot's writes are visible first.
    atomic::xchg(lock, 0);
    true
}

/// [`eject`]'s work, under the service's lock.
///
/// # Safety
/// `s` is a live value of `SM_SVC_HEALTH` whose lock the caller holds; `h` a
/// live value of `SM_EP_HEALTH`.
#[inline(always)]
unsafe fn eject_locked(
    s: *mut ServiceHealth,
    h: *mut EndpointHealth,
    endpoint: &EndpointKey,
    host: Host,
    policy: &ServicePolicy,
    now: u64,
) {
    let service = &endpoint.service;
    // SAFETY: the caller's contract.
    let (active, free) = unsafe { scan(s, service, now) };
    let backends = u64::from(policy.backends);
    // One more ejected must stay within max_ejection_percent, except the first,
    // which is always allowed ((0 + 1) × 100 is within the floor of 100; any later
    // one is at least 200). No comparison of `active` with a constant: see `scan`.
    let within = u64::from(policy.max_ejection_percent) * backends;
    if free == MAX_EJECTED || (active + 1) * 100 > within.max(100) {
        return;
    }
    // SAFETY: the caller's contract for `h`.
    let (multiplier, last_until) = unsafe {
        (
            u64::from((*h).multiplier),
            core::ptr::read_volatile(&raw const (*h).ejected_until_ns),
        )
    };
    // Each interval it stayed healthy since its last ejection takes one off.
    let interval = u64::from(policy.interval_ms) * NS_PER_MS;
    let healthy_intervals = match (last_until, interval) {
        (0, _) | (_, 0) => 0,
        (until, interval) => now.saturating_sub(until) / interval,
    };
    let multiplier = multiplier.saturating_sub(healthy_intervals) + 1;
    let base = u64::from(policy.base_ejection_ms) * NS_PER_MS;
    let cap = u64::from(policy.max_ejection_ms) * NS_PER_MS;
    let until = now + (base * multiplier).min(cap.max(base));
    // SAFETY: `s` and `h` by the caller's contract, `free` in bounds. Field by
    // field (a volatile write of the whole struct becomes a memcpy call, which
    // the verifier rejects); the end time last, with a barrier, so a reader that
    // sees it running sees the endpoint it names.
    unsafe {
        // The mask keeps the index provably in bounds (MAX_EJECTED is a power of
        // two; `free` is below it here): no panic path for the verifier to reject.
        let e = &raw mut (*s).ejections[free & (MAX_EJECTED - 1)];
        for (w, a) in endpoint.addr.iter().enumerate() {
            core::ptr::write_volatile(&raw mut (*e).addr[w], *a);
        }
        core::ptr::write_volatile(&raw mut (*e).port, endpoint.port);
        core::ptr::write_volatile(&raw mut (*e).state, host.state);
        core::ptr::write_volatile(&raw mut (*e).level, host.level);
        atomic::xchg(&raw mut (*e).until_ns, until);
        core::ptr::write_volatile(&raw mut (*h).ejected_until_ns, until);
        (*h).multiplier = multiplier as u32;
        (*h).ejections = (*h).ejections.wrapping_add(1);
    }
    // The agent rewrites the loads of the service's levels (a dropped event is
    // caught by its once-a-second reread).
    let _ = crate::maps::EVENTS.output(
        &Event {
            kind: event::EJECTED,
            pad: 0,
            service: *service,
            pad2: 0,
            until_ns: until,
        },
        0,
    );
}
