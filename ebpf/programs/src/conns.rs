//! Open-connection counts for least-connections services.
//!
//! connect() that places a socket of a least-connections service on a backend adds
//! one to the backend endpoint's count (`SM_BACKEND_CONNS`) and records the
//! endpoint in the socket's storage (`SM_SOCK_CONNS`); sock_release, when the
//! socket goes away, subtracts it. A socket connected again (UDP, or TCP after a
//! failed connect) releases its old count first, so each socket holds at most one.
//! A connect that fails keeps its count until the socket is closed, which is when
//! the application learns of the failure and closes it.
//!
//! Counts change with the BPF ISA's atomic add (`atomic`); a subtraction never
//! takes a count below 0, so a count an agent's garbage collection dropped cannot
//! wrap.

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::generated::bpf_sk_storage_get, programs::SockAddrContext,
};
use sockmesh_common::{ConnKey, SockConn};

use crate::{
    atomic,
    maps::{BACKEND_CONNS, SOCK_CONNS},
    xlate::Addr,
};

/// The count key of backend `a` for protocol `proto`.
#[inline(always)]
pub fn key(a: Addr, proto: u8) -> ConnKey {
    ConnKey {
        addr: a.ip,
        port: a.port,
        proto,
        pad: 0,
    }
}

/// Open connections counted on `endpoint`.
#[inline(always)]
pub fn load(endpoint: &ConnKey) -> u64 {
    // SAFETY: NO_PREALLOC hash map: the value stays valid for this RCU read
    // section; copied at once (a concurrent add only makes it stale).
    unsafe { BACKEND_CONNS.get(endpoint) }.copied().unwrap_or(0)
}

/// Counts the socket of `ctx` on `endpoint`, releasing an earlier count it holds.
#[inline(always)]
pub fn place(ctx: &SockAddrContext, endpoint: ConnKey) {
    let storage = SOCK_CONNS.get_or_insert_ptr_mut(ctx, None);
    if storage.is_null() {
        // No storage (out of memory): placed, not counted.
        return;
    }
    // SAFETY: the socket's own storage, valid while the program runs; connect()
    // holds the socket lock, so no other program of this socket runs meanwhile.
    unsafe {
        if (*storage).counted != 0 {
            sub(&(*storage).endpoint);
        }
        (*storage).endpoint = endpoint;
        (*storage).counted = u8::from(add(&endpoint));
    }
}

/// Releases the count the socket `sk` holds, if any (socket going away).
#[inline(always)]
pub fn release(sk: *mut aya_ebpf::bindings::bpf_sock) {
    // SAFETY: looks up (never creates) the storage of the context's socket; the
    // helper takes the map and the socket pointer the program was given.
    let storage = unsafe {
        bpf_sk_storage_get(
            (&raw const SOCK_CONNS).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockConn>();
    if storage.is_null() {
        return;
    }
    // SAFETY: the socket's own storage, valid while the program runs.
    unsafe {
        if (*storage).counted != 0 {
            (*storage).counted = 0;
            sub(&(*storage).endpoint);
        }
    }
}

/// Adds one to `endpoint`'s count, creating the entry at 1; false if the map had
/// no room.
#[inline(always)]
fn add(endpoint: &ConnKey) -> bool {
    if let Some(n) = BACKEND_CONNS.get_ptr_mut(endpoint) {
        increment(n);
        return true;
    }
    if BACKEND_CONNS
        .insert(endpoint, &1, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return true;
    }
    // Another CPU created it meanwhile (or the map is full).
    match BACKEND_CONNS.get_ptr_mut(endpoint) {
        Some(n) => {
            increment(n);
            true
        }
        None => false,
    }
}

#[inline(always)]
fn increment(n: *mut u64) {
    atomic::add(n, 1);
}

/// Subtracts one from `endpoint`'s count, unless it is 0 (or gone).
#[inline(always)]
fn sub(endpoint: &ConnKey) {
    if let Some(n) = BACKEND_CONNS.get_ptr_mut(endpoint) {
        atomic::decrement(n);
    }
}
