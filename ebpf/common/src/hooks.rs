//! The hook table: every program of the kernel object, its program type and where
//! it attaches.
//!
//! The kernel programs (`ebpf/programs/src/sock_addr.rs`) are declared through a
//! macro that checks at compile time that each function's name and attach point are
//! the ones listed here; the agent loads, attaches, pins and queries programs only
//! through [`HOOKS`] and [`OPTED_OUT`], and a unit test (`agent/src/dataplane/contract.rs`) checks the
//! built object against this table and the numbers below against the kernel headers'
//! `enum bpf_prog_type` / `enum bpf_attach_type` (aya-obj's generated bindings).

/// Prefix of every sockmesh program name (of this and earlier layouts): `sockmesh
/// uninstall --cgroup` checks that no program named so is left attached.
pub const PROGRAM_PREFIX: &str = "sm_";

/// Longest program name the kernel keeps (`BPF_OBJ_NAME_LEN` is 16, NUL included):
/// a longer name would be truncated in `bpftool` and `BPF_PROG_GET_INFO`.
pub const MAX_PROGRAM_NAME: usize = 15;

/// The program types sockmesh uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramType {
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`: connect, sendmsg, recvmsg, getpeername.
    CgroupSockAddr,
    /// `BPF_PROG_TYPE_CGROUP_SOCK`: sock_release.
    CgroupSock,
    /// `BPF_PROG_TYPE_SOCK_OPS`: TCP connect outcomes (outlier detection).
    SockOps,
}

impl ProgramType {
    /// The `enum bpf_prog_type` value.
    pub const fn number(self) -> u32 {
        match self {
            ProgramType::CgroupSock => 9,
            ProgramType::CgroupSockAddr => 18,
            ProgramType::SockOps => 13,
        }
    }
}

/// `enum bpf_attach_type` values of the attach points sockmesh uses (linux/bpf.h).
pub mod attach_type {
    pub const CGROUP_INET4_CONNECT: u32 = 10;
    pub const CGROUP_INET6_CONNECT: u32 = 11;
    pub const CGROUP_UDP4_SENDMSG: u32 = 14;
    pub const CGROUP_UDP6_SENDMSG: u32 = 15;
    pub const CGROUP_UDP4_RECVMSG: u32 = 19;
    pub const CGROUP_UDP6_RECVMSG: u32 = 20;
    pub const CGROUP_INET4_GETPEERNAME: u32 = 29;
    pub const CGROUP_INET6_GETPEERNAME: u32 = 30;
    pub const CGROUP_INET_SOCK_RELEASE: u32 = 34;
    pub const CGROUP_SOCK_OPS: u32 = 3;
}

/// One program of the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    /// The program's (function's) name: its ELF symbol, its name in the kernel, and
    /// the file name of its pinned link.
    pub program: &'static str,
    pub program_type: ProgramType,
    /// The attach point as the aya-ebpf macros spell it (`#[cgroup_sock_addr(connect4)]`);
    /// the ELF section is `cgroup/<attach>`.
    pub attach: &'static str,
    /// The `enum bpf_attach_type` value (see [`attach_type`]).
    pub attach_type: u32,
}

const fn hook(
    program: &'static str,
    program_type: ProgramType,
    attach: &'static str,
    attach_type: u32,
) -> Hook {
    Hook {
        program,
        program_type,
        attach,
        attach_type,
    }
}

use ProgramType::{CgroupSock, CgroupSockAddr, SockOps};

pub const CONNECT4: Hook = hook(
    "sm_connect4",
    CgroupSockAddr,
    "connect4",
    attach_type::CGROUP_INET4_CONNECT,
);
pub const CONNECT6: Hook = hook(
    "sm_connect6",
    CgroupSockAddr,
    "connect6",
    attach_type::CGROUP_INET6_CONNECT,
);
pub const SENDMSG4: Hook = hook(
    "sm_sendmsg4",
    CgroupSockAddr,
    "sendmsg4",
    attach_type::CGROUP_UDP4_SENDMSG,
);
pub const SENDMSG6: Hook = hook(
    "sm_sendmsg6",
    CgroupSockAddr,
    "sendmsg6",
    attach_type::CGROUP_UDP6_SENDMSG,
);
pub const RECVMSG4: Hook = hook(
    "sm_recvmsg4",
    CgroupSockAddr,
    "recvmsg4",
    attach_type::CGROUP_UDP4_RECVMSG,
);
pub const RECVMSG6: Hook = hook(
    "sm_recvmsg6",
    CgroupSockAddr,
    "recvmsg6",
    attach_type::CGROUP_UDP6_RECVMSG,
);
pub const GETPEERNAME4: Hook = hook(
    "sm_getpeername4",
    CgroupSockAddr,
    "getpeername4",
    attach_type::CGROUP_INET4_GETPEERNAME,
);
pub const GETPEERNAME6: Hook = hook(
    "sm_getpeername6",
    CgroupSockAddr,
    "getpeername6",
    attach_type::CGROUP_INET6_GETPEERNAME,
);
pub const SOCK_RELEASE: Hook = hook(
    "sm_sock_release",
    CgroupSock,
    "sock_release",
    attach_type::CGROUP_INET_SOCK_RELEASE,
);

/// The sock_ops program (`#[sock_ops]` has no attach argument; its ELF section
/// is `sockops`).
pub const SOCK_OPS: Hook = hook(
    "sm_sock_ops",
    SockOps,
    "sockops",
    attach_type::CGROUP_SOCK_OPS,
);

/// Every program of the object, in attach order: sock_ops and sock_release
/// before the hooks that place sockets, so every socket placed is watched and
/// released.
pub const HOOKS: [Hook; 10] = [
    SOCK_RELEASE,
    SOCK_OPS,
    CONNECT4,
    CONNECT6,
    SENDMSG4,
    SENDMSG6,
    RECVMSG4,
    RECVMSG6,
    GETPEERNAME4,
    GETPEERNAME6,
];

/// The programs that stand in for the placing hooks (connect, sendmsg) of a pod
/// that opted out while its processes run: each lets the call proceed untouched.
/// The agent swaps one into the placing hook's link (`BPF_LINK_UPDATE`, which
/// keeps the attach type) instead of detaching it, so opting out and back in
/// never attaches or detaches a program: the kernel's per-attach-type static
/// keys, whose flip patches kernel text on every CPU, stay as they are.
/// Each pair: the placing hook, its stand-in.
pub const OPTED_OUT: [(Hook, Hook); 4] = [
    (CONNECT4, OFF_CONNECT4),
    (CONNECT6, OFF_CONNECT6),
    (SENDMSG4, OFF_SENDMSG4),
    (SENDMSG6, OFF_SENDMSG6),
];

/// [`CONNECT4`]'s stand-in in an opted-out pod's link (see [`OPTED_OUT`]).
pub const OFF_CONNECT4: Hook = hook(
    "sm_off_connect4",
    CgroupSockAddr,
    "connect4",
    attach_type::CGROUP_INET4_CONNECT,
);
/// [`CONNECT6`]'s stand-in in an opted-out pod's link (see [`OPTED_OUT`]).
pub const OFF_CONNECT6: Hook = hook(
    "sm_off_connect6",
    CgroupSockAddr,
    "connect6",
    attach_type::CGROUP_INET6_CONNECT,
);
/// [`SENDMSG4`]'s stand-in in an opted-out pod's link (see [`OPTED_OUT`]).
pub const OFF_SENDMSG4: Hook = hook(
    "sm_off_sendmsg4",
    CgroupSockAddr,
    "sendmsg4",
    attach_type::CGROUP_UDP4_SENDMSG,
);
/// [`SENDMSG6`]'s stand-in in an opted-out pod's link (see [`OPTED_OUT`]).
pub const OFF_SENDMSG6: Hook = hook(
    "sm_off_sendmsg6",
    CgroupSockAddr,
    "sendmsg6",
    attach_type::CGROUP_UDP6_SENDMSG,
);

/// Prefix of the [`OPTED_OUT`] stand-ins' names.
pub const OPTED_OUT_PREFIX: &str = "sm_off_";

/// Every program of the object: [`HOOKS`], then the [`OPTED_OUT`] stand-ins.
pub const PROGRAMS: [Hook; 14] = [
    HOOKS[0],
    HOOKS[1],
    HOOKS[2],
    HOOKS[3],
    HOOKS[4],
    HOOKS[5],
    HOOKS[6],
    HOOKS[7],
    HOOKS[8],
    HOOKS[9],
    OPTED_OUT[0].1,
    OPTED_OUT[1].1,
    OPTED_OUT[2].1,
    OPTED_OUT[3].1,
];

/// Whether `hook` is the one named `program` attaching at `attach` (the kernel
/// programs' compile-time check).
pub const fn matches(hook: &Hook, program: &str, attach: &str) -> bool {
    crate::str_eq(hook.program, program) && crate::str_eq(hook.attach, attach)
}

const _: () = {
    let mut i = 0;
    while i < OPTED_OUT.len() {
        let (placing, off) = (&OPTED_OUT[i].0, &OPTED_OUT[i].1);
        assert!(placing.attach_type == off.attach_type);
        assert!(crate::str_eq(placing.attach, off.attach));
        assert!(matches!(off.program_type, ProgramType::CgroupSockAddr));
        let (name, prefix) = (off.program.as_bytes(), OPTED_OUT_PREFIX.as_bytes());
        let mut j = 0;
        while j < prefix.len() {
            assert!(name[j] == prefix[j]);
            j += 1;
        }
        i += 1;
    }
    let mut i = 0;
    while i < PROGRAMS.len() {
        let name = PROGRAMS[i].program.as_bytes();
        assert!(name.len() <= MAX_PROGRAM_NAME);
        let prefix = PROGRAM_PREFIX.as_bytes();
        let mut j = 0;
        while j < prefix.len() {
            assert!(name[j] == prefix[j]);
            j += 1;
        }
        i += 1;
    }
};
