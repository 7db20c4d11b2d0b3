//! The BPF ISA's 64-bit atomics, as inline assembly: `core::sync::atomic` lowers
//! to compare-and-swap loops the `bpfel` target does not emit.

/// `*n += v`, atomically (BPF_ATOMIC BPF_ADD, no fetch; every kernel).
#[inline(always)]
pub fn add(n: *mut u64, v: u64) {
    // SAFETY: callers pass a map value they looked up (u64-aligned, valid for the
    // program's RCU read section); the instruction only adds to it.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({n} + 0) += {v}",
            n = in(reg) n,
            v = in(reg) v,
            options(nostack),
        );
    }
}

/// `*n += v`, atomically, returning the value before (BPF_ATOMIC BPF_ADD |
/// BPF_FETCH, kernel 5.12+): exactly one caller sees each value, which is how a
/// threshold is crossed once however many CPUs count at the same time.
#[inline(always)]
pub fn fetch_add(n: *mut u64, v: u64) -> u64 {
    let mut old = v;
    // SAFETY: as in `add`.
    unsafe {
        core::arch::asm!(
            "{old} = atomic_fetch_add((u64 *)({n} + 0), {old})",
            n = in(reg) n,
            old = inout(reg) old,
            options(nostack),
        );
    }
    old
}

/// Subtracts one from `*n` unless it is 0 (a count is never taken below 0).
#[inline(always)]
pub fn decrement(n: *mut u64) {
    // SAFETY: as in `add`; read first so a count a garbage collection dropped
    // cannot wrap.
    if unsafe { core::ptr::read_volatile(n) } > 0 {
        add(n, u64::MAX);
    }
}
