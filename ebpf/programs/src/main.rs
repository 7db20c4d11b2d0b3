//! sockmesh kernel programs: socket-level service load balancing.
//!
//! One ELF object. `sock_addr` holds the cgroup sock_addr hooks (connect, sendmsg,
//! recvmsg, getpeername for IPv4 and IPv6) and the sock_release cleanup hook, all
//! thin wrappers over `xlate`; `maps` defines and documents every map.

#![no_std]
#![no_main]
// BPF inline assembly (`atomic`): nightly-only on this target.
#![feature(asm_experimental_arch)]

mod atomic;
mod conns;
mod health;
mod maps;
mod sock_addr;
mod xlate;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// bpf_get_socket_cookie and friends are fine under any licence, but the kernel
/// programs are GPL-2.0 so every helper stays available.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
