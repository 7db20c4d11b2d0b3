//! The `bpf(2)` commands the agent issues itself, because aya 0.16 has no public
//! API for them:
//!
//! - `BPF_LINK_DETACH` (detach a pinned link's program now, even while another
//!   process holds the link): aya has none at all; dropping or unpinning a link only
//!   closes a reference.
//! - `BPF_LINK_UPDATE` for a `cgroup_sock` link (swap a new program into a pinned
//!   link): aya has it only for `CgroupSockAddr` (`attach_to_link`, used for the
//!   eight sock_addr hooks); `CgroupSock` has no `attach_to_link` and its link type
//!   no conversion from an `FdLink`.
//! - `BPF_OBJ_GET`, only to get the descriptor the two commands above take: aya's
//!   `PinnedLink::from_pin` opens the pin but keeps its descriptor private.
//! - `BPF_PROG_QUERY` of a cgroup for a sock_addr or sock attach type: aya's
//!   queries are crate-private except for lirc, cgroup-device and TC programs, and
//!   `loaded_links()` does not say which cgroup a link is attached to.
//! - `BPF_OBJ_GET_INFO_BY_FD` for a program's run time and run count (benchmarks):
//!   aya's `ProgramInfo` has the rest of the record but not these.
//! - `BPF_MAP_UPDATE_BATCH` (write many entries of a map in one call): aya 0.16
//!   has no batch map operations. A bulk load writes hundreds of thousands of
//!   entries; one syscall each was most of its kernel time.
//! - `BPF_MAP_LOOKUP_BATCH` (read a hash map's entries, thousands per call):
//!   `/metrics` reads the health and connection maps and the fill ratio counts
//!   the maps the kernel programs fill; aya iterates key by key, two calls per
//!   entry (next key, then lookup).
//! - The feature probes of [`super::features`] that aya's `is_program_supported`
//!   cannot make: a program load for a given *attach type* (aya probes a type with
//!   one fixed attach type), and whether a command exists at all.
//!
//! Each command fills its member of aya-obj's generated `union bpf_attr` (the
//! kernel headers' layout) in an attribute zeroed as a whole, as aya does: the
//! kernel rejects a non-zero byte past the fields a command reads.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya_obj::generated::{bpf_attr, bpf_cmd};

/// An all-zero `union bpf_attr`.
fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a C union of integer fields (and unions and arrays of
    // them): the all-zero bit pattern is a valid value of every member.
    unsafe { std::mem::zeroed() }
}

/// A descriptor as the `__u32` fd fields of `bpf_attr` take it (always ≥ 0).
fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    fd.as_raw_fd().unsigned_abs()
}

/// `bpf(BPF_OBJ_GET)`: open a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = c_path.as_ptr() as u64;
    // SAFETY: the BPF_OBJ_GET member is filled in, the rest is zero; `c_path`
    // outlives the call.
    let rc = unsafe { sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr) }?;
    let fd = i32::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `bpf(BPF_LINK_UPDATE)`: atomically replace the program behind a link.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = zeroed_attr();
    attr.link_update.link_fd = fd_u32(link);
    attr.link_update.__bindgen_anon_1.new_prog_fd = fd_u32(prog);
    // SAFETY: the BPF_LINK_UPDATE member is filled in (no flags, no expected old
    // program), the rest is zero.
    unsafe { sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// `bpf(BPF_OBJ_GET_INFO_BY_FD)` of a program: `(run_time_ns, run_cnt)`, the
/// kernel's own accounting of the time spent in it while run-time statistics are
/// enabled. aya 0.16's `ProgramInfo` keeps these two fields private.
pub fn prog_run_stats(prog: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    use aya_obj::generated::bpf_prog_info;
    // SAFETY: bpf_prog_info is a C struct of integers (pointers travel as u64):
    // the all-zero bit pattern is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = fd_u32(prog);
    attr.info.info_len = u32::try_from(std::mem::size_of::<bpf_prog_info>())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    // SAFETY: the BPF_OBJ_GET_INFO_BY_FD member is filled in; it points at `info`,
    // which outlives the call, with its true length, and the kernel writes at most
    // that many bytes.
    unsafe { sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok((info.run_time_ns, info.run_cnt))
}

/// `bpf(BPF_OBJ_GET_INFO_BY_FD)` of a cgroup link: the id of the cgroup it is
/// attached to, 0 once that cgroup was removed (the kernel detached the link)
/// or the link was detached. aya 0.16's `LinkInfo` keeps the field private.
pub fn link_cgroup_id(link: BorrowedFd<'_>) -> io::Result<u64> {
    use aya_obj::generated::bpf_link_info;
    // SAFETY: bpf_link_info is a C struct of integers and unions of them: the
    // all-zero bit pattern is a valid value.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = fd_u32(link);
    attr.info.info_len = u32::try_from(std::mem::size_of::<bpf_link_info>())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    // SAFETY: as in `prog_run_stats`: `info` outlives the call and its true length
    // bounds what the kernel writes.
    unsafe { sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    // SAFETY: reading the cgroup member of the union, plain integers; for any
    // other link type it reads other integers, which the caller does not ask for.
    Ok(unsafe { info.__bindgen_anon_1.cgroup.cgroup_id })
}

/// `bpf(BPF_LINK_DETACH)`: detach a link's program now; the link object stays
/// (defunct) until its last reference goes.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = zeroed_attr();
    attr.link_detach.link_fd = fd_u32(link);
    // SAFETY: the BPF_LINK_DETACH member is filled in, the rest is zero.
    unsafe { sys_bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// `bpf(BPF_PROG_QUERY)`: ids of the programs attached to `target` at
/// `attach_type` (an `enum bpf_attach_type` value), at most 64.
pub fn prog_query(target: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = zeroed_attr();
    attr.query.__bindgen_anon_1.target_fd = fd_u32(target);
    attr.query.attach_type = attach_type;
    attr.query.prog_ids = ids.as_mut_ptr() as u64;
    attr.query.__bindgen_anon_2.prog_cnt = ids.len() as u32;
    // SAFETY: the BPF_PROG_QUERY member is filled in, the rest is zero; prog_ids
    // points at `ids`, which has room for prog_cnt entries and outlives the call.
    unsafe { sys_bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr) }?;
    // SAFETY: reading back the member the kernel answered in (plain integers).
    let n = unsafe { attr.query.__bindgen_anon_2.prog_cnt } as usize;
    Ok(ids[..n.min(ids.len())].to_vec())
}

/// A batch write that stopped: the entries before `written` are in the map, the
/// one at `written` failed with `error`, the rest were not tried.
#[derive(Debug)]
pub struct BatchFailure {
    pub written: usize,
    pub error: io::Error,
}

/// `bpf(BPF_MAP_UPDATE_BATCH)`: writes `keys[i]` → `values[i]` into `map` with
/// `elem_flags` (`BPF_ANY`, `BPF_NOEXIST`, `BPF_EXIST`), in order.
///
/// `K` and `V` must be the map's key and value types (their sizes the map's), as
/// the typed aya map the descriptor comes from guarantees.
pub fn map_update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    elem_flags: u64,
) -> Result<(), BatchFailure> {
    let fail = |written, error| Err(BatchFailure { written, error });
    if keys.len() != values.len() {
        return fail(0, io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut done = 0;
    // One call per chunk: the kernel loops over the entries (rescheduling between
    // them) and says how many it wrote.
    for (k, v) in keys.chunks(BATCH_CHUNK).zip(values.chunks(BATCH_CHUNK)) {
        let mut attr = zeroed_attr();
        attr.batch.map_fd = fd_u32(map);
        attr.batch.keys = k.as_ptr() as u64;
        attr.batch.values = v.as_ptr() as u64;
        attr.batch.count = k.len() as u32; // ≤ BATCH_CHUNK
        attr.batch.elem_flags = elem_flags;
        // SAFETY: the batch member is filled in (no in/out batch cursor, no flags),
        // the rest is zero; `keys` and `values` point at `count` entries of the
        // map's key and value size each (the caller's contract) and outlive the call.
        let rc = unsafe { sys_bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr) };
        if let Err(error) = rc {
            // SAFETY: reading back the member the kernel answered in (plain integers).
            let count = unsafe { attr.batch.count } as usize;
            // The kernel writes the count back once it has started on the entries;
            // a call refused before that leaves the count asked for.
            let written = if count < k.len() { count } else { 0 };
            return fail(done + written, error);
        }
        done += k.len();
    }
    Ok(())
}

/// [`map_update_batch`] with the second half of the entries written by another
/// thread at the same time, from [`SPLIT_FROM`] entries: a hash map's update
/// takes only its bucket's lock, so two cores write it in about half the time
/// (an initial load's backend entries are its write's largest part). On failure
/// the entries before `written` are in the map, as with [`map_update_batch`], but
/// some after it may be too: only for entries nothing reaches until a later
/// write publishes them.
pub fn map_update_batch_split<K: aya::Pod + Sync, V: aya::Pod + Sync>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    elem_flags: u64,
) -> Result<(), BatchFailure> {
    if keys.len() < SPLIT_FROM || keys.len() != values.len() {
        return map_update_batch(map, keys, values, elem_flags);
    }
    let half = keys.len() / 2;
    let ((k1, k2), (v1, v2)) = (keys.split_at(half), values.split_at(half));
    let (first, second) = std::thread::scope(|s| {
        let second = s.spawn(|| map_update_batch(map, k2, v2, elem_flags));
        (map_update_batch(map, k1, v1, elem_flags), second.join())
    });
    match (first, second) {
        (Err(e), _) => Err(e),
        (Ok(()), Ok(Ok(()))) => Ok(()),
        (Ok(()), Ok(Err(e))) => Err(BatchFailure {
            written: half + e.written,
            error: e.error,
        }),
        (Ok(()), Err(_)) => Err(BatchFailure {
            written: half,
            error: io::Error::other("the thread writing the second half panicked"),
        }),
    }
}

/// Entries from which [`map_update_batch_split`] writes on two threads (below,
/// starting a thread costs more than it saves).
const SPLIT_FROM: usize = 4096;

/// `bpf(BPF_MAP_LOOKUP_BATCH)` over a hash map: every entry, handed to `each`
/// one call's batch at a time as `(keys, values, count)`, `count` entries of
/// `key_size` and `value_size` bytes laid end to end (the map's sizes, from its
/// `MapInfo` or its typed aya map). `chunk` entries are asked for per call,
/// more where one bucket holds more (up to [`MAX_LOOKUP_CHUNK`]). Entries added
/// or deleted meanwhile may be seen or not, as with any walk of a map that
/// changes. A kernel without batch lookups for the map (before 5.6, or a map
/// type that has none) answers the first call with `EINVAL` or [`ENOTSUPP`],
/// returned as is, `each` never called.
pub fn map_lookup_batch(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    chunk: usize,
    mut each: impl FnMut(&[u8], &[u8], usize),
) -> io::Result<()> {
    let mut chunk = chunk.clamp(1, MAX_LOOKUP_CHUNK);
    let mut keys = vec![0u8; chunk * key_size];
    let mut values = vec![0u8; chunk * value_size];
    // The kernel's cursor for a hash map is a bucket number (a `u32`); room for
    // a larger one costs nothing.
    let mut cursor = [0u64; 2];
    let mut next = [0u64; 2];
    let mut first = true;
    loop {
        let mut attr = zeroed_attr();
        attr.batch.map_fd = fd_u32(map);
        attr.batch.in_batch = if first { 0 } else { cursor.as_ptr() as u64 };
        attr.batch.out_batch = next.as_mut_ptr() as u64;
        attr.batch.keys = keys.as_mut_ptr() as u64;
        attr.batch.values = values.as_mut_ptr() as u64;
        attr.batch.count = chunk as u32; // ≤ MAX_LOOKUP_CHUNK
        // SAFETY: the batch member is filled in (no flags), the rest is zero;
        // `keys` and `values` have room for `count` entries of the map's key and
        // value size (the caller's contract), the cursors for the kernel's, and
        // all outlive the call.
        let rc = unsafe { sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr) };
        // SAFETY: reading back the member the kernel answered in (plain integers).
        let count = (unsafe { attr.batch.count } as usize).min(chunk);
        match rc {
            Ok(_) => {}
            // The last batch: what it found, and nothing after.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                each(
                    &keys[..count * key_size],
                    &values[..count * value_size],
                    count,
                );
                return Ok(());
            }
            // One bucket holds more entries than a call has room for (the kernel
            // says so only when it returned none).
            Err(e)
                if e.raw_os_error() == Some(libc::ENOSPC)
                    && count == 0
                    && chunk < MAX_LOOKUP_CHUNK =>
            {
                chunk = (chunk * 2).min(MAX_LOOKUP_CHUNK);
                keys.resize(chunk * key_size, 0);
                values.resize(chunk * value_size, 0);
                continue;
            }
            Err(e) => return Err(e),
        }
        each(
            &keys[..count * key_size],
            &values[..count * value_size],
            count,
        );
        cursor = next;
        first = false;
    }
}

/// Every entry of a hash map whose key and value types are `K` and `V`, handed
/// to `f` as it is read, with [`map_lookup_batch`], `chunk` per call.
///
/// `K` and `V` must be the map's key and value types (their sizes the map's), as
/// the typed aya map the descriptor comes from guarantees.
pub fn map_for_each<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    chunk: usize,
    mut f: impl FnMut(K, V),
) -> io::Result<()> {
    let (key_size, value_size) = (size_of::<K>(), size_of::<V>());
    map_lookup_batch(map, key_size, value_size, chunk, |keys, values, _| {
        for (k, v) in keys
            .chunks_exact(key_size)
            .zip(values.chunks_exact(value_size))
        {
            // SAFETY: each chunk is `size_of::<K>()` (`size_of::<V>()`) bytes the
            // kernel copied from the map, and a `Pod` type is valid for any bit
            // pattern; the reads are unaligned ones.
            let (k, v) = unsafe {
                (
                    k.as_ptr().cast::<K>().read_unaligned(),
                    v.as_ptr().cast::<V>().read_unaligned(),
                )
            };
            f(k, v);
        }
    })
}

/// The entries of a hash map, counted with [`map_lookup_batch`] (about one call
/// per thousand entries); where the kernel has no batch lookup for the map, key
/// by key (`BPF_MAP_GET_NEXT_KEY`). `key_size` and `value_size` are the map's
/// (from its `MapInfo`). Entries added or deleted meanwhile may be counted or
/// not.
pub fn map_count(map: BorrowedFd<'_>, key_size: usize, value_size: usize) -> io::Result<u64> {
    let mut total = 0u64;
    let mut batches = 0u32;
    let walk = map_lookup_batch(map, key_size, value_size, COUNT_CHUNK, |_, _, count| {
        batches += 1;
        total += count as u64;
    });
    match walk {
        Ok(()) => Ok(total),
        Err(e) if batches == 0 && matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {
            map_count_keys(map, key_size)
        }
        Err(e) => Err(e),
    }
}

/// Entries per `BPF_MAP_LOOKUP_BATCH` call of [`map_count`].
const COUNT_CHUNK: usize = 1024;

/// The most entries a [`map_lookup_batch`] call asks for, however large a
/// bucket.
const MAX_LOOKUP_CHUNK: usize = 1 << 20;

/// The kernel's answer to a command a map type does not have (`ENOTSUPP`).
const ENOTSUPP: i32 = 524;

/// [`map_count`] key by key, with `BPF_MAP_GET_NEXT_KEY`.
fn map_count_keys(map: BorrowedFd<'_>, key_size: usize) -> io::Result<u64> {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut total = 0u64;
    let mut first = true;
    loop {
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_2.map_fd = fd_u32(map);
        // No key: the first one.
        attr.__bindgen_anon_2.key = if first { 0 } else { key.as_ptr() as u64 };
        attr.__bindgen_anon_2.__bindgen_anon_1.next_key = next.as_mut_ptr() as u64;
        // SAFETY: the element member is filled in, the rest is zero; `key` and
        // `next` are `key_size` bytes, the map's, and outlive the call.
        match unsafe { sys_bpf(bpf_cmd::BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => total += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(total),
            Err(e) => return Err(e),
        }
        std::mem::swap(&mut key, &mut next);
        first = false;
    }
}

/// Entries per `BPF_MAP_UPDATE_BATCH` call (the kernel holds no lock across a
/// batch; this only bounds one call's duration).
const BATCH_CHUNK: usize = 8192;

/// `bpf(BPF_PROG_LOAD)` of the smallest valid program (`r0 = 1; exit`) as
/// `prog_type` (`enum bpf_prog_type`) for `attach_type` (`enum bpf_attach_type`):
/// `Ok(false)` if the kernel does not know the pair (EINVAL, E2BIG), the error of
/// any other failure (EPERM without CAP_BPF, ...). The program is closed at once.
pub fn probe_prog_load(prog_type: u32, attach_type: u32) -> io::Result<bool> {
    // BPF_ALU64|BPF_MOV|BPF_K into r0 with imm 1, then BPF_JMP|BPF_EXIT, as
    // `struct bpf_insn` lays them out (code, regs, off, imm; little endian).
    let insns: [u64; 2] = [0xb7 | (1 << 32), 0x95];
    let license = c"GPL";
    let mut attr = zeroed_attr();
    // SAFETY: taking the BPF_PROG_LOAD member of an all-zero union: every field is
    // an integer, valid as zero.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = prog_type;
    load.expected_attach_type = attach_type;
    load.insn_cnt = insns.len() as u32;
    load.insns = insns.as_ptr() as u64;
    load.license = license.as_ptr() as u64;
    // SAFETY: the BPF_PROG_LOAD member is filled in (no log buffer), the rest is
    // zero; `insns` and `license` outlive the call.
    match unsafe { sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr) } {
        Ok(fd) => {
            let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
            // SAFETY: the kernel returned a new descriptor that nothing else owns.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            Ok(true)
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::E2BIG)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the kernel knows the link command `cmd` (`BPF_LINK_CREATE`,
/// `BPF_LINK_UPDATE`, `BPF_LINK_DETACH`): given a descriptor that cannot be
/// open, a known command fails with EBADF, an unknown one with EINVAL.
pub fn probe_link_command(cmd: bpf_cmd) -> io::Result<bool> {
    let bad = u32::MAX; // -1 as the kernel reads it: never an open descriptor
    let mut attr = zeroed_attr();
    match cmd {
        bpf_cmd::BPF_LINK_CREATE => attr.link_create.__bindgen_anon_1.prog_fd = bad,
        bpf_cmd::BPF_LINK_UPDATE => attr.link_update.link_fd = bad,
        bpf_cmd::BPF_LINK_DETACH => attr.link_detach.link_fd = bad,
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
    // SAFETY: the command's member holds one descriptor field, the rest is zero;
    // no pointers. The call cannot succeed (the descriptor is not open).
    match unsafe { sys_bpf(cmd, &mut attr) } {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
        Ok(_) => Ok(true),
    }
}

/// `bpf(cmd, attr, sizeof attr)`; the kernel's non-negative result, or errno.
///
/// # Safety
/// `attr`'s member for `cmd` must be filled in, every other byte zero, and every
/// pointer in it valid (and, where the kernel writes through it, writable) for the
/// call.
unsafe fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for attr's contents and pointers; the size is the
    // whole union, as aya passes it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
