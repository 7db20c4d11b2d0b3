//! The built kernel object against the contract in `sockmesh_common`: every map
//! the agent names is in the object (and nothing else), every hook's program is
//! there with the program type and attach point the table gives, and the table's
//! numbers are the kernel headers' (aya-obj's generated bindings). The kernel crate
//! checks its own literals at compile time; this checks what it produced.

use std::collections::BTreeSet;

use aya_obj::{
    Object, ProgramSection,
    generated::{bpf_attach_type, bpf_prog_type},
};
use sockmesh_common::{
    hooks::{PROGRAMS, ProgramType, attach_type},
    map_names,
};

fn object() -> Object {
    Object::parse(super::loader::OBJECT).expect("the embedded kernel object parses")
}

#[test]
fn the_object_has_exactly_the_maps_of_map_names() {
    let object = object();
    // Data sections (.rodata, .bss) show up as maps too; they are not pinned.
    let found: BTreeSet<&str> = object
        .maps
        .keys()
        .map(String::as_str)
        .filter(|name| !name.starts_with('.'))
        .collect();
    let named: BTreeSet<&str> = map_names::ALL.into_iter().collect();
    assert_eq!(found, named);
}

#[test]
fn the_object_has_exactly_the_programs_of_the_hook_table() {
    let object = object();
    let found: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
    let listed: BTreeSet<&str> = PROGRAMS.iter().map(|h| h.program).collect();
    assert_eq!(found, listed);
    for hook in PROGRAMS {
        let section = &object.programs[hook.program].section;
        let (program_type, attach) = match section {
            ProgramSection::CgroupSockAddr { attach_type } => (
                ProgramType::CgroupSockAddr,
                bpf_attach_type::from(*attach_type),
            ),
            ProgramSection::CgroupSock { attach_type } => {
                (ProgramType::CgroupSock, bpf_attach_type::from(*attach_type))
            }
            ProgramSection::SockOps => (ProgramType::SockOps, bpf_attach_type::BPF_CGROUP_SOCK_OPS),
            other => panic!("{}: unexpected section {other:?}", hook.program),
        };
        assert_eq!(program_type, hook.program_type, "{}", hook.program);
        assert_eq!(attach as u32, hook.attach_type, "{}", hook.program);
    }
}

#[test]
fn the_table_numbers_are_the_kernel_headers() {
    use bpf_attach_type as at;
    assert_eq!(
        ProgramType::CgroupSockAddr.number(),
        bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR as u32
    );
    assert_eq!(
        ProgramType::CgroupSock.number(),
        bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK as u32
    );
    assert_eq!(
        ProgramType::SockOps.number(),
        bpf_prog_type::BPF_PROG_TYPE_SOCK_OPS as u32
    );
    for (ours, kernel) in [
        (
            attach_type::CGROUP_INET4_CONNECT,
            at::BPF_CGROUP_INET4_CONNECT,
        ),
        (
            attach_type::CGROUP_INET6_CONNECT,
            at::BPF_CGROUP_INET6_CONNECT,
        ),
        (
            attach_type::CGROUP_UDP4_SENDMSG,
            at::BPF_CGROUP_UDP4_SENDMSG,
        ),
        (
            attach_type::CGROUP_UDP6_SENDMSG,
            at::BPF_CGROUP_UDP6_SENDMSG,
        ),
        (
            attach_type::CGROUP_UDP4_RECVMSG,
            at::BPF_CGROUP_UDP4_RECVMSG,
        ),
        (
            attach_type::CGROUP_UDP6_RECVMSG,
            at::BPF_CGROUP_UDP6_RECVMSG,
        ),
        (
            attach_type::CGROUP_INET4_GETPEERNAME,
            at::BPF_CGROUP_INET4_GETPEERNAME,
        ),
        (
            attach_type::CGROUP_INET6_GETPEERNAME,
            at::BPF_CGROUP_INET6_GETPEERNAME,
        ),
        (
            attach_type::CGROUP_INET_SOCK_RELEASE,
            at::BPF_CGROUP_INET_SOCK_RELEASE,
        ),
        (attach_type::CGROUP_SOCK_OPS, at::BPF_CGROUP_SOCK_OPS),
    ] {
        assert_eq!(ours, kernel as u32, "{kernel:?}");
    }
}

#[test]
fn no_program_can_reach_a_panic() {
    // A bounds check or unwrap the compiler could not prove away leaves a call to
    // core's panic functions, which the verifier rejects at load ("last insn is
    // not an exit or jmp") on every kernel: name the cause here instead.
    let object = object();
    let panics: Vec<&str> = object
        .functions
        .values()
        .map(|f| f.name.as_str())
        .filter(|name| name.contains("panicking"))
        .collect();
    assert!(
        panics.is_empty(),
        "panic paths in the kernel object: {panics:?}"
    );
}
