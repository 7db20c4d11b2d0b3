//! cgroup sock_addr hooks (IPv4 and IPv6) and the sock_release cleanup hook.
//!
//! Each hook is a one-line wrapper: it reads the address out of its context, asks
//! `xlate` what to do, and turns the answer into the hook's return value.

use aya_ebpf::{
    EbpfContext, Global,
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval, generated::bpf_sk_storage_get,
    },
    macros::{cgroup_sock, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use sockmesh_common::{
    PROTO_TCP, PROTO_UDP, SockReverse, V4_MAPPED_WORD, counter,
    hooks::{self, ProgramType},
    service_flags,
};

use crate::{
    conns, health,
    maps::{SOCK_REVERSE, count, count_service},
    xlate::{self, Addr, Forward, Pick},
};

/// Whether to set ECONNREFUSED with `bpf_set_retval` (see
/// `sockmesh_common::globals::SET_RETVAL`; set by the agent at load).
#[unsafe(no_mangle)]
static SM_SET_RETVAL: Global<u8> = Global::new(1);
const _: () = assert!(sockmesh_common::str_eq(
    "SM_SET_RETVAL",
    sockmesh_common::globals::SET_RETVAL
));

/// Let the call proceed (the only value recvmsg/getpeername may return).
const PROCEED: i32 = 1;
/// Reject the call; the errno is whatever `bpf_set_retval` set (EPERM without it).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// What a forward hook decided.
enum Verdict {
    Proceed,
    /// Service without an active backend, or at its circuit breaker's
    /// `max_connections`: fail with ECONNREFUSED.
    Refuse,
}

/// Defines hook `$hook` of the hook table (`sockmesh_common::hooks`). The aya-ebpf
/// macros take the program's name and attach point as identifiers, so they stay
/// here and a compile-time assertion checks them, and the program type, against
/// the table the agent loads and attaches by.
macro_rules! hook {
    (sock_addr $hook:path, $attach:ident, $(#[$doc:meta])* fn $name:ident($ctx:ident) $body:block) => {
        hook!(@check $hook, CgroupSockAddr, $name, $attach);
        $(#[$doc])*
        #[cgroup_sock_addr($attach)]
        pub fn $name($ctx: SockAddrContext) -> i32 $body
    };
    (sock $hook:path, $attach:ident, $(#[$doc:meta])* fn $name:ident($ctx:ident) $body:block) => {
        hook!(@check $hook, CgroupSock, $name, $attach);
        $(#[$doc])*
        #[cgroup_sock($attach)]
        pub fn $name($ctx: SockContext) -> i32 $body
    };
    (sock_ops $hook:path, $(#[$doc:meta])* fn $name:ident($ctx:ident) $body:block) => {
        hook!(@check $hook, SockOps, $name, sockops);
        $(#[$doc])*
        #[sock_ops]
        pub fn $name($ctx: SockOpsContext) -> u32 $body
    };
    (@check $hook:path, $type:ident, $name:ident, $attach:ident) => {
        const _: () = assert!(
            hooks::matches(&$hook, stringify!($name), stringify!($attach))
                && matches!($hook.program_type, ProgramType::$type),
            concat!(
                "hook ",
                stringify!($name),
                " differs from sockmesh_common::hooks"
            )
        );
    };
}

/// The IPv4 and IPv6 fields `$ip4`, `$ip6` of `struct bpf_sock` `$sk`, as
/// `(u32, [u32; 4])`. Every field is read unconditionally, for the caller to
/// select by family: loads inside the family branches get merged by LLVM into one
/// load at ctx + variable offset, which the verifier rejects. Use inside `unsafe`
/// with a socket pointer the verifier knows is valid.
macro_rules! sock_ip {
    ($sk:expr, $ip4:ident, $ip6:ident) => {{
        let sk = $sk;
        (
            core::ptr::read_volatile(&raw const (*sk).$ip4),
            [
                core::ptr::read_volatile(&raw const (*sk).$ip6[0]),
                core::ptr::read_volatile(&raw const (*sk).$ip6[1]),
                core::ptr::read_volatile(&raw const (*sk).$ip6[2]),
                core::ptr::read_volatile(&raw const (*sk).$ip6[3]),
            ],
        )
    }};
}

hook!(sock_addr hooks::CONNECT4, connect4, fn sm_connect4(ctx) {
    verdict(forward(&ctx, Family::V4, false))
});

hook!(sock_addr hooks::CONNECT6, connect6, fn sm_connect6(ctx) {
    verdict(forward(&ctx, Family::V6, false))
});

hook!(sock_addr hooks::SENDMSG4, sendmsg4, fn sm_sendmsg4(ctx) {
    verdict(forward(&ctx, Family::V4, true))
});

hook!(sock_addr hooks::SENDMSG6, sendmsg6, fn sm_sendmsg6(ctx) {
    verdict(forward(&ctx, Family::V6, true))
});

hook!(sock_addr hooks::OFF_CONNECT4, connect4, /// Stands in for `sm_connect4` in an opted-out pod's link: the call proceeds.
fn sm_off_connect4(_ctx) {
    PROCEED
});

hook!(sock_addr hooks::OFF_CONNECT6, connect6, /// Stands in for `sm_connect6` in an opted-out pod's link: the call proceeds.
fn sm_off_connect6(_ctx) {
    PROCEED
});

hook!(sock_addr hooks::OFF_SENDMSG4, sendmsg4, /// Stands in for `sm_sendmsg4` in an opted-out pod's link: the call proceeds.
fn sm_off_sendmsg4(_ctx) {
    PROCEED
});

hook!(sock_addr hooks::OFF_SENDMSG6, sendmsg6, /// Stands in for `sm_sendmsg6` in an opted-out pod's link: the call proceeds.
fn sm_off_sendmsg6(_ctx) {
    PROCEED
});

hook!(sock_addr hooks::RECVMSG4, recvmsg4, fn sm_recvmsg4(ctx) {
    restore_vip(&ctx, Family::V4)
});

hook!(sock_addr hooks::RECVMSG6, recvmsg6, fn sm_recvmsg6(ctx) {
    restore_vip(&ctx, Family::V6)
});

hook!(sock_addr hooks::GETPEERNAME4, getpeername4, fn sm_getpeername4(ctx) {
    restore_vip(&ctx, Family::V4)
});

hook!(sock_addr hooks::GETPEERNAME6, getpeername6, fn sm_getpeername6(ctx) {
    restore_vip(&ctx, Family::V6)
});

hook!(sock_ops hooks::SOCK_OPS,
/// Watches the outcome of TCP connects placed on outlier-detecting services
/// (`health`).
fn sm_sock_ops(ctx) {
    health::sock_ops(&ctx);
    PROCEED as u32
});

hook!(sock hooks::SOCK_RELEASE, sock_release,
/// Releases the closing socket's open-connection count (least-connections
/// services), and drops its reverse entry for its connected peer, so the reverse
/// map holds only live sockets (unconnected UDP peers are left to the LRU).
fn sm_sock_release(ctx) {
    // First, whatever the socket's state: a failed connect may have cleared its
    // peer, not its counts, nor the reverse entry its storage names.
    conns::release(ctx.sock);
    health::release(ctx.sock);
    // SAFETY: looks up (never creates) the storage of the context's socket; the
    // helper takes the map and the socket pointer the program was given.
    let held = unsafe {
        bpf_sk_storage_get(
            (&raw const SOCK_REVERSE).cast_mut().cast(),
            ctx.sock.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockReverse>();
    if !held.is_null() {
        xlate::forget_held(held, cookie(&ctx));
        return PROCEED;
    }
    // A socket redirected before its storage existed (programs of an earlier
    // build): its entry by its peer, if it still has one.
    // SAFETY: ctx.sock is the program's context; the verifier checks each field read.
    let (family, proto, port) = unsafe {
        let sk = &*ctx.sock;
        (sk.family, sk.protocol, sk.dst_port)
    };
    if (proto != u32::from(PROTO_TCP) && proto != u32::from(PROTO_UDP)) || port == 0 {
        return PROCEED;
    }
    let sk = ctx.sock;
    // SAFETY: as above (see `sock_ip!` on why both families are read).
    let (v4, v6) = unsafe { sock_ip!(sk, dst_ip4, dst_ip6) };
    let ip = match family {
        AF_INET => mapped(v4),
        AF_INET6 => v6,
        _ => return PROCEED,
    };
    xlate::forget(cookie(&ctx), Addr { ip, port });
    PROCEED
});

fn verdict(v: Verdict) -> i32 {
    match v {
        Verdict::Proceed => PROCEED,
        Verdict::Refuse => {
            if SM_SET_RETVAL.load() != 0 {
                // SAFETY: helper call; cgroup hooks may set their return value (5.18+).
                unsafe { bpf_set_retval(-ECONNREFUSED) };
            }
            REJECT
        }
    }
}

/// connect (`per_socket == false`: a fresh random pick) and unconnected UDP sendmsg
/// (`per_socket == true`: the pick follows the socket cookie, so all datagrams of a
/// socket reach one backend).
#[inline(always)]
fn forward(ctx: &SockAddrContext, family: Family, per_socket: bool) -> Verdict {
    let sa = SockAddr(ctx);
    let proto = sa.protocol();
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Verdict::Proceed;
    }
    let vip = sa.dst(family);
    let cookie = cookie(ctx);
    let pick = if per_socket {
        Pick::Hash(cookie)
    } else {
        Pick::Random
    };
    let client = || client_identity(ctx, family);
    match xlate::forward(vip, proto, pick, &client) {
        Forward::Pass => Verdict::Proceed,
        Forward::NoBackend(stats) => {
            count_service(stats, false);
            count(counter::NO_BACKEND);
            Verdict::Refuse
        }
        Forward::Raced => {
            count(counter::RACED);
            Verdict::Refuse
        }
        Forward::Redirect {
            service,
            backend,
            counted,
            flags,
            stats,
        } => {
            // An IPv4 socket can only be sent to an IPv4 backend (the agent never
            // mixes families in one service; this guards the invariant).
            if !sa.set_dst(family, backend.addr) {
                count_service(stats, false);
                count(counter::NO_BACKEND);
                return Verdict::Refuse;
            }
            // Placements only: an unconnected UDP datagram is no connection.
            if !per_socket {
                if flags & service_flags::HEALTH == 0 {
                    health::unplace(ctx);
                } else if health::place(ctx, flags, proto, &service, backend).is_err() {
                    // Counted in the service's `ServiceHealth::overflows` too.
                    count(counter::OVERFLOW);
                    return Verdict::Refuse;
                }
            }
            if counted {
                conns::place(ctx, conns::key(backend.addr, proto));
            }
            if per_socket {
                xlate::remember_unconnected(cookie, backend.addr, vip);
            } else {
                // No storage (out of memory): the entry is deleted by the
                // socket's peer at close, if it still has one.
                let held = SOCK_REVERSE.get_or_insert_ptr_mut(ctx, None);
                xlate::remember_connected(held, cookie, backend.addr, vip);
            }
            count_service(stats, true);
            count(counter::REDIRECT);
            Verdict::Proceed
        }
    }
}

/// recvmsg (reply source) and getpeername (peer): show the VIP the socket asked for.
#[inline(always)]
fn restore_vip(ctx: &SockAddrContext, family: Family) -> i32 {
    let sa = SockAddr(ctx);
    match xlate::reverse(cookie(ctx), sa.dst(family)) {
        Some(vip) => {
            if sa.set_dst(family, vip) {
                count(counter::REVERSE_HIT);
            }
        }
        None => count(counter::REVERSE_MISS),
    }
    PROCEED
}

/// The connecting client, as a Maglev service hashes it: the socket's bound source
/// address if it has one, else its network namespace's cookie (one pod, one netns;
/// what Cilium's socket LB uses for affinity).
#[inline(always)]
fn client_identity(ctx: &SockAddrContext, family: Family) -> u64 {
    // SAFETY: `sk` of a sock_addr context is a socket pointer the verifier knows
    // is valid (PTR_TO_SOCKET); each field is read unconditionally, then selected
    // (see `sock_ip!`).
    let (v4, v6) = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        sock_ip!(sk, src_ip4, src_ip6)
    };
    let bound = match family {
        Family::V4 => u64::from(v4),
        Family::V6 => (u64::from(v6[0] ^ v6[1]) << 32) | u64::from(v6[2] ^ v6[3]),
    };
    if bound != 0 {
        return bound;
    }
    // SAFETY: helper taking the program context (sock_addr programs, 5.7+).
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: helper taking the program context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// Field access to `struct bpf_sock_addr`, one 32-bit load or store per field as
/// the verifier requires for the writable fields.
struct SockAddr<'a>(&'a SockAddrContext);

impl SockAddr<'_> {
    #[inline(always)]
    fn protocol(&self) -> u8 {
        // SAFETY: context field read at a constant offset.
        unsafe { (*self.0.sock_addr).protocol as u8 }
    }

    /// The user-supplied address (connect/sendmsg destination; recvmsg source;
    /// getpeername peer), IPv4 as IPv4-mapped.
    #[inline(always)]
    fn dst(&self, family: Family) -> Addr {
        let p = self.0.sock_addr;
        // SAFETY: context field reads at constant offsets, one 32-bit load each.
        unsafe {
            let port = core::ptr::read_volatile(&raw const (*p).user_port) as u16;
            let ip = match family {
                Family::V4 => mapped(core::ptr::read_volatile(&raw const (*p).user_ip4)),
                Family::V6 => [
                    core::ptr::read_volatile(&raw const (*p).user_ip6[0]),
                    core::ptr::read_volatile(&raw const (*p).user_ip6[1]),
                    core::ptr::read_volatile(&raw const (*p).user_ip6[2]),
                    core::ptr::read_volatile(&raw const (*p).user_ip6[3]),
                ],
            };
            Addr { ip, port }
        }
    }

    /// Rewrites the user-supplied address. Returns false (and writes nothing) when
    /// an IPv4 hook is given an address that is not IPv4-mapped.
    #[inline(always)]
    fn set_dst(&self, family: Family, a: Addr) -> bool {
        let p = self.0.sock_addr;
        if family == Family::V4 && (a.ip[0] != 0 || a.ip[1] != 0 || a.ip[2] != V4_MAPPED_WORD) {
            return false;
        }
        // SAFETY: context field writes at constant offsets, one 32-bit store each
        // (the only store size the verifier accepts for these fields).
        unsafe {
            match family {
                Family::V4 => core::ptr::write_volatile(&raw mut (*p).user_ip4, a.ip[3]),
                Family::V6 => {
                    core::ptr::write_volatile(&raw mut (*p).user_ip6[0], a.ip[0]);
                    core::ptr::write_volatile(&raw mut (*p).user_ip6[1], a.ip[1]);
                    core::ptr::write_volatile(&raw mut (*p).user_ip6[2], a.ip[2]);
                    core::ptr::write_volatile(&raw mut (*p).user_ip6[3], a.ip[3]);
                }
            }
            core::ptr::write_volatile(&raw mut (*p).user_port, u32::from(a.port));
        }
        true
    }
}
