//! The per-service counter array (`SM_SERVICE_STATS`) mapped into the agent's
//! memory: the writer claims and releases slots in it, a scrape reads it as one
//! block.
//!
//! A slot is a [`ServiceStats`] of 40 bytes: two counts the kernel programs add
//! to atomically, the service that holds the slot, and a sequence number. The
//! agent is the only writer of the last two, and writes them as a sequence lock
//! (see [`ServiceStats`]): a claim zeroes the counts and writes the service
//! while `seq` is even, then makes `seq` odd; a release moves `seq` on to even.
//! A reader keeps a slot only if `seq` was odd and the same before and after
//! it read the slot, so a slot claimed or released while it was read is left
//! out, never shown with another service's name.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering, fence},
};

use sockmesh_common::{ServiceKey, ServiceStats};

/// Bytes of one slot (the array's element size: the value's size rounded up
/// to 8, which it already is).
const SLOT: usize = std::mem::size_of::<ServiceStats>();
const _: () = assert!(SLOT.is_multiple_of(8));

// Offsets of the fields within a slot (the layout `ServiceStats` is `repr(C)`
// with).
const REDIRECTS: usize = std::mem::offset_of!(ServiceStats, redirects);
const NO_BACKEND: usize = std::mem::offset_of!(ServiceStats, no_backend);
const SERVICE: usize = std::mem::offset_of!(ServiceStats, service);
const SEQ: usize = std::mem::offset_of!(ServiceStats, seq);
/// The service key as 32-bit words (address, then port, protocol and pad).
const KEY_WORDS: usize = std::mem::size_of::<ServiceKey>() / 4;
const _: () =
    assert!(std::mem::size_of::<ServiceKey>().is_multiple_of(4) && SERVICE.is_multiple_of(4));
const _: () =
    assert!(SEQ.is_multiple_of(4) && REDIRECTS.is_multiple_of(8) && NO_BACKEND.is_multiple_of(8));

/// The atomic integers a slot's fields are read and written as.
trait Word {}
impl Word for AtomicU32 {}
impl Word for AtomicU64 {}

/// One slot's counts, as a reader found them whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub redirects: u64,
    pub no_backend: u64,
}

/// The memory the slots live in: the kernel's array mapped by `mmap`, or (for
/// tests of the protocol without a kernel) a heap block laid out the same.
enum Memory {
    Mapped {
        len: usize,
    },
    /// Owns the block `base` points into.
    #[cfg(test)]
    Heap {
        _words: Box<[AtomicU64]>,
    },
}

/// `slots` counter slots at `base`.
pub struct CounterArray {
    base: NonNull<u8>,
    slots: u32,
    memory: Memory,
}

// SAFETY: the memory is only accessed through atomics (see `word`/`word64`), so
// sharing or sending the handle between threads is sound; the mapping is
// released once, by the owner, in `Drop`.
unsafe impl Send for CounterArray {}
// SAFETY: as above.
unsafe impl Sync for CounterArray {}

impl CounterArray {
    /// Maps the array of `slots` elements behind `map` (a `BPF_F_MMAPABLE`
    /// array of [`ServiceStats`]), writable if `writable`.
    pub fn map(map: BorrowedFd<'_>, slots: u32, writable: bool) -> io::Result<Self> {
        let len = (slots as usize).saturating_mul(SLOT).max(1);
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of the map's descriptor, at an address the
        // kernel chooses; the kernel checks the length against the array (whose
        // values start at offset 0 of a mapping) and the protection against the
        // descriptor. Nothing else is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap: null"))?;
        Ok(Self {
            base,
            slots,
            memory: Memory::Mapped { len },
        })
    }

    /// `slots` zeroed slots in the heap (no kernel).
    #[cfg(test)]
    pub fn in_memory(slots: u32) -> Self {
        let words = (slots as usize * SLOT / 8).max(1);
        let heap: Box<[AtomicU64]> = (0..words).map(|_| AtomicU64::new(0)).collect();
        let base = NonNull::from(&heap[0]).cast::<u8>();
        Self {
            base,
            slots,
            memory: Memory::Heap { _words: heap },
        }
    }

    /// The 32-bit word at byte `offset` of slot `slot`.
    fn word(&self, slot: u32, offset: usize) -> &AtomicU32 {
        self.field(slot, offset)
    }

    /// The 64-bit count at byte `offset` of slot `slot`.
    fn word64(&self, slot: u32, offset: usize) -> &AtomicU64 {
        self.field(slot, offset)
    }

    /// The atomic field at byte `offset` of slot `slot`.
    fn field<W: Word>(&self, slot: u32, offset: usize) -> &W {
        let size = std::mem::size_of::<W>();
        debug_assert!(slot < self.slots && offset.is_multiple_of(size) && offset + size <= SLOT);
        // SAFETY: `slot < self.slots` (callers check it) and `offset` is a
        // field's offset within the 40-byte slot, aligned to the field's size
        // (the offsets are checked at compile time above), so the address lies
        // in the mapping, which lives as long as `self`, and is aligned for `W`
        // (the mapping is page-aligned, the heap block 8-aligned, and a slot is
        // a multiple of 8 bytes). `W` is an atomic integer, valid for any bit
        // pattern; the memory is shared with the kernel and other threads, so it
        // is only ever accessed atomically.
        unsafe {
            &*self
                .base
                .as_ptr()
                .add(slot as usize * SLOT + offset)
                .cast::<W>()
        }
    }

    /// Gives slot `slot` to `service`, counts zeroed; false if `slot` is past the
    /// end. A slot still claimed is released first.
    pub fn claim(&self, slot: u32, service: &ServiceKey) -> bool {
        if slot >= self.slots {
            return false;
        }
        let seq = self.word(slot, SEQ);
        let mut s = seq.load(Ordering::Relaxed);
        if s & 1 == 1 {
            s = s.wrapping_add(1);
            seq.store(s, Ordering::Release);
        }
        self.word64(slot, REDIRECTS).store(0, Ordering::Relaxed);
        self.word64(slot, NO_BACKEND).store(0, Ordering::Relaxed);
        for (i, w) in key_words(service).into_iter().enumerate() {
            self.word(slot, SERVICE + 4 * i).store(w, Ordering::Relaxed);
        }
        // The counts and the name are visible before the slot reads as claimed.
        seq.store(s.wrapping_add(1), Ordering::Release);
        true
    }

    /// Gives slot `slot` back (its counts stay until the next claim).
    pub fn release(&self, slot: u32) {
        if slot >= self.slots {
            return;
        }
        let seq = self.word(slot, SEQ);
        let s = seq.load(Ordering::Relaxed);
        if s & 1 == 1 {
            seq.store(s.wrapping_add(1), Ordering::Release);
        }
    }

    /// Slot `slot`'s service and counts, if it is claimed and was not claimed or
    /// released while being read.
    pub fn read(&self, slot: u32) -> Option<(ServiceKey, Counts)> {
        if slot >= self.slots {
            return None;
        }
        let seq = self.word(slot, SEQ);
        let before = seq.load(Ordering::Acquire);
        if before & 1 == 0 {
            return None;
        }
        let mut words = [0u32; KEY_WORDS];
        for (i, w) in words.iter_mut().enumerate() {
            *w = self.word(slot, SERVICE + 4 * i).load(Ordering::Relaxed);
        }
        let counts = Counts {
            redirects: self.word64(slot, REDIRECTS).load(Ordering::Relaxed),
            no_backend: self.word64(slot, NO_BACKEND).load(Ordering::Relaxed),
        };
        // The reads above happen before the second look at `seq`.
        fence(Ordering::Acquire);
        (seq.load(Ordering::Relaxed) == before).then(|| (key_of(words), counts))
    }

    /// Every claimed slot read whole, in slot order: `f(slot, service, counts)`.
    pub fn for_each(&self, mut f: impl FnMut(u32, ServiceKey, Counts)) {
        for slot in 0..self.slots {
            if let Some((key, counts)) = self.read(slot) {
                f(slot, key, counts);
            }
        }
    }

    /// Adds to slot `slot`'s counts as a kernel program does (tests).
    #[cfg(test)]
    pub(crate) fn count(&self, slot: u32, redirected: bool) {
        let offset = if redirected { REDIRECTS } else { NO_BACKEND };
        self.word64(slot, offset).fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for CounterArray {
    fn drop(&mut self) {
        #[cfg_attr(not(test), allow(irrefutable_let_patterns))]
        if let Memory::Mapped { len } = self.memory {
            // SAFETY: the mapping made in `map`, of `len` bytes, unmapped once; no
            // reference into it outlives `self`.
            unsafe { libc::munmap(self.base.as_ptr().cast(), len) };
        }
    }
}

impl std::fmt::Debug for CounterArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CounterArray")
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

/// The key's bytes as native 32-bit words, as they lie in the slot.
fn key_words(key: &ServiceKey) -> [u32; KEY_WORDS] {
    let [a, b, c, d] = key.addr;
    let tail = u32::from_ne_bytes({
        let p = key.port.to_ne_bytes();
        [p[0], p[1], key.proto, key.pad]
    });
    [a, b, c, d, tail]
}

fn key_of(words: [u32; KEY_WORDS]) -> ServiceKey {
    let [a, b, c, d, tail] = words;
    let t = tail.to_ne_bytes();
    ServiceKey {
        addr: [a, b, c, d],
        port: u16::from_ne_bytes([t[0], t[1]]),
        proto: t[2],
        pad: t[3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> ServiceKey {
        ServiceKey {
            addr: [0, 0, 0xffff_u32.to_be(), n],
            port: 8080u16.to_be(),
            proto: 6,
            pad: 0,
        }
    }

    #[test]
    fn a_claimed_slot_names_its_service_with_zeroed_counts_and_a_released_one_is_not_read() {
        let a = CounterArray::in_memory(4);
        assert!(a.claim(2, &key(7)));
        a.count(2, true);
        a.count(2, true);
        a.count(2, false);
        assert_eq!(
            a.read(2),
            Some((
                key(7),
                Counts {
                    redirects: 2,
                    no_backend: 1
                }
            ))
        );
        assert_eq!(a.read(1), None, "a slot never claimed");
        a.release(2);
        assert_eq!(a.read(2), None);
        // Claimed again, by another service: its counts start at zero.
        assert!(a.claim(2, &key(8)));
        assert_eq!(a.read(2), Some((key(8), Counts::default())));
        assert!(!a.claim(4, &key(9)), "past the end");
        let mut seen = Vec::new();
        a.for_each(|slot, k, _| seen.push((slot, k)));
        assert_eq!(seen, vec![(2, key(8))]);
    }

    #[test]
    fn the_key_is_laid_out_as_the_kernels_value_holds_it() {
        let a = CounterArray::in_memory(2);
        let k = ServiceKey {
            addr: [1, 2, 3, 4],
            port: 0x1234,
            proto: 17,
            pad: 0,
        };
        a.claim(1, &k);
        a.count(1, true);
        // SAFETY: the heap block holds two `ServiceStats`, 8-aligned, and no
        // thread writes it now.
        let value = unsafe { *a.base.as_ptr().add(SLOT).cast::<ServiceStats>() };
        assert_eq!(
            value,
            ServiceStats {
                redirects: 1,
                no_backend: 0,
                service: k,
                seq: 1,
            }
        );
    }

    #[test]
    fn a_reader_never_sees_a_slot_with_another_services_name() {
        // One thread claims and releases slot 0 for two services in turn, with
        // counts only one of them gets; readers must see each service only with
        // counts it could have.
        let a = std::sync::Arc::new(CounterArray::in_memory(1));
        let writer = {
            let a = a.clone();
            std::thread::spawn(move || {
                for i in 0..20_000u32 {
                    let odd = i % 2 == 1;
                    a.claim(0, &key(u32::from(odd)));
                    if odd {
                        a.count(0, true);
                    }
                    a.release(0);
                }
            })
        };
        let mut seen = [0usize; 2];
        while !writer.is_finished() {
            if let Some((k, counts)) = a.read(0) {
                let n = k.addr[3] as usize;
                assert!(n < 2, "a name never written: {k:?}");
                assert!(n == 1 || counts.redirects == 0, "service 0 with 1's counts");
                seen[n] += 1;
            }
        }
        writer.join().expect("writer");
    }
}
