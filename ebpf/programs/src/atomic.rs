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

/// If `*n` is `expected`, stores `new`; returns the value `*n` held before,
/// atomically (BPF_ATOMIC BPF_CMPXCHG, kernel 5.12+, a full barrier).
#[inline(always)]
pub fn cmpxchg(n: *mut u64, expected: u64, new: u64) -> u64 {
    let mut old = expected;
    // SAFETY: as in `add`; the instruction compares r0 with `*n`, stores `new`
    // on equality, and leaves the old value in r0.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({n} + 0, r0, {new})",
            n = in(reg) n,
            new = in(reg) new,
            inout("r0") old,
            options(nostack),
        );
    }
    old
}

/// Stores `v` into `*n` and returns the value before, atomically (BPF_ATOMIC
/// BPF_XCHG, kernel 5.12+, a full barrier: every store before it is visible
/// before this one).
#[inline(always)]
pub fn xchg(n: *mut u64, v: u64) -> u64 {
    let mut old = v;
    // SAFETY: as in `add`.
    unsafe {
        core::arch::asm!(
            "{old} = xchg_64({n} + 0, {old})",
            n = in(reg) n,
            old = inout(reg) old,
            options(nostack),
        );
    }
    old
}

/// Most compare-and-swap attempts of one [`decrement`]: each failed one means
/// another CPU changed the count between the read and the swap.
const DECREMENT_TRIES: u32 = 8;

/// Subtracts one from `*n` unless it is 0, atomically: a compare-and-swap of the
/// value read, so two releases racing on a count of 1 take it to 0, never below
/// (a plain read-then-add would let both subtract). Gives up after
/// [`DECREMENT_TRIES`] lost races, leaving the count one high (never wrapped).
#[inline(always)]
pub fn decrement(n: *mut u64) {
    for _ in 0..DECREMENT_TRIES {
        // SAFETY: as in `add`.
        let seen = unsafe { core::ptr::read_volatile(n) };
        if seen == 0 || cmpxchg(n, seen, seen - 1) == seen {
            return;
        }
    }
}
