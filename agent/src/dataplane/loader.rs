//! Loading the kernel object, attaching it to a cgroup, pinning, and adopting pins.
//!
//! Pin layout under the user's bpffs directory:
//! ```text
//! <bpffs>/v<LAYOUT_VERSION>/maps/SM_SERVICES …   the maps (aya reuses them if present)
//! <bpffs>/v<LAYOUT_VERSION>/links/cg<ID>/<prog>   one bpf_link per program; ID is the
//!                                                 cgroup's id (its inode on cgroup2)
//! <bpffs>/conns-v<CONNS_VERSION>/SM_…             open-connection counts (least connections)
//! <bpffs>/health-v<HEALTH_VERSION>/SM_…           outlier detection, circuit breaking
//! ```
//! Pinned links keep the programs attached, and pinned maps keep the routing table,
//! when the agent exits or is killed. A new agent loads the same object, reuses the
//! pinned maps, and swaps its freshly loaded programs into the pinned links with
//! `BPF_LINK_UPDATE` — an atomic, in-place replacement with no detach window.
//!
//! Programs, their types and attach points come from the hook table and map names
//! from `sockmesh_common` (the kernel contract's single source); the `bpf(2)`
//! commands aya has no API for are in [`super::sys`].
//!
//! An agent whose map layout differs (another `v<N>` directory is pinned) migrates:
//! it creates and pins its own maps beside the old ones, leaves its programs
//! unattached while the agent fills the maps from the control plane, then attaches
//! its links and only then detaches and removes the other layout's pins
//! ([`retire`]). Until that moment the old datapath serves every connection with its
//! last table; a half-filled table is never live. cgroup links are multi-attach, so
//! for the instant both run, the old programs translate first and the new ones see
//! a backend address, which is not a service: no connection is translated twice.

use std::{
    fs, io,
    os::{
        fd::{AsFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SockOps,
        cgroup_sock_addr::CgroupSockAddrLink,
        links::{FdLink, PinnedLink},
    },
};
use sockmesh_common::{
    LAYOUT_VERSION,
    hooks::{HOOKS, PROGRAM_PREFIX, PROGRAMS, ProgramType},
    map_names,
};
use tracing::{debug, info};

use super::{DataplaneError, sys};

/// Magic numbers from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// The conventional bpffs mount point, mounted on demand.
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// The kernel object, built by `build.rs` from `ebpf/programs`.
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockmesh-ebpf"));

/// Paths of one datapath's pins.
#[derive(Clone, Debug)]
pub struct PinLayout {
    /// `<bpffs>/v<LAYOUT_VERSION>`
    pub root: PathBuf,
    pub maps: PathBuf,
    pub links: PathBuf,
    /// `<bpffs>/conns-v<CONNS_VERSION>`: the connection-tracking maps, shared by
    /// every layout (see `sockmesh_common::CONNS_VERSION`).
    pub conns: PathBuf,
    /// `<bpffs>/health-v<HEALTH_VERSION>`: outlier detection and circuit breaking
    /// state, shared by every layout (see `sockmesh_common::HEALTH_VERSION`).
    pub health: PathBuf,
}

impl PinLayout {
    /// This build's layout.
    pub fn new(bpffs: &Path) -> Self {
        Self::version(bpffs, LAYOUT_VERSION)
    }

    /// Layout `version`'s directories (of this or another build).
    pub fn version(bpffs: &Path, version: u32) -> Self {
        let root = bpffs.join(format!("v{version}"));
        Self {
            maps: root.join("maps"),
            links: root.join("links"),
            conns: conns_dir(bpffs),
            health: health_dir(bpffs),
            root,
        }
    }

    /// Link directory for the cgroup with `cgroup_id`.
    pub fn cgroup_links(&self, cgroup_id: u64) -> PathBuf {
        self.links.join(format!("cg{cgroup_id}"))
    }
}

/// Where the connection-tracking maps are pinned, apart from any layout.
pub fn conns_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(format!("conns-v{}", sockmesh_common::CONNS_VERSION))
}

/// Where the health maps are pinned, apart from any layout.
pub fn health_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(format!("health-v{}", sockmesh_common::HEALTH_VERSION))
}

/// The health directories of other health versions under `bpffs` (an earlier
/// release's, which only its programs read).
pub fn other_health_dirs(bpffs: &Path) -> Vec<PathBuf> {
    let current = health_dir(bpffs);
    fs::read_dir(bpffs)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p != &current
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("health-v"))
        })
        .collect()
}

/// Removes `dir` and every pin in it; returns the pins removed.
pub fn remove_dir_pins(dir: &Path) -> Result<usize, DataplaneError> {
    remove_tree(dir)
}

/// How the programs came to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Newly attached and pinned.
    Attached,
    /// Pinned links were found; the new programs replaced the old ones in place.
    Adopted,
    /// Another layout's datapath serves the cgroup: this one is loaded and its maps
    /// pinned, but its programs wait for a complete table before they attach.
    Pending,
    /// Attached after filling, and the other layout's datapath removed.
    Migrated,
}

/// The other layouts pinned under `bpffs` (an older or newer agent's `v<N>`
/// directories), oldest first.
pub fn other_layouts(bpffs: &Path) -> Vec<(u32, PinLayout)> {
    let Ok(entries) = fs::read_dir(bpffs) else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PinLayout)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version: u32 = name.strip_prefix('v')?.parse().ok()?;
            let layout = PinLayout::version(bpffs, version);
            (version != LAYOUT_VERSION && (layout.maps.is_dir() || layout.links.is_dir()))
                .then_some((version, layout))
        })
        .collect();
    found.sort_by_key(|(v, _)| *v);
    found
}

/// Whether `layout` has links pinned for the cgroup `cgroup_id`.
pub fn links_pinned(layout: &PinLayout, cgroup_id: u64) -> bool {
    fs::read_dir(layout.cgroup_links(cgroup_id)).is_ok_and(|mut d| d.next().is_some())
}

/// Makes sure `dir` is a directory on bpffs, mounting bpffs at `/sys/fs/bpf` if
/// `dir` lies under it and nothing is mounted there yet.
pub fn ensure_bpffs(dir: &Path) -> Result<(), DataplaneError> {
    let mut existing = dir;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    if fs_magic(existing)? != BPF_FS_MAGIC {
        let default = Path::new(DEFAULT_BPFFS);
        if dir.starts_with(default) && default.is_dir() && fs_magic(default)? != BPF_FS_MAGIC {
            info!(path = DEFAULT_BPFFS, "mounting bpffs");
            nix::mount::mount(
                Some("bpf"),
                default,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| DataplaneError::Mount {
                path: default.to_owned(),
                source: io::Error::from(e),
            })?;
        } else {
            return Err(DataplaneError::NotBpffs {
                path: dir.to_owned(),
            });
        }
    }
    fs::create_dir_all(dir).map_err(|source| DataplaneError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`:
/// `/sys/fs/cgroup` on a pure-v2 node, `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_root() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_root_in(&text)
}

/// The first cgroup2 mount of the whole hierarchy (its root is `/`) in a mountinfo
/// text. Fields: id, parent, dev, root, mount point, options…, `-`, fstype, source.
fn cgroup2_root_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split(' ').next() != Some("cgroup2") {
            return None;
        }
        let mut fields = mount.split(' ');
        let root = fields.nth(3)?;
        let point = fields.next()?;
        (root == "/").then(|| PathBuf::from(unescape_mountinfo(point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks that `cgroup` is a cgroup v2 directory and returns it opened, with its id.
pub fn open_cgroup(cgroup: &Path, allow_root: bool) -> Result<(fs::File, u64), DataplaneError> {
    let meta = fs::metadata(cgroup).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => DataplaneError::CgroupNotFound {
            path: cgroup.to_owned(),
        },
        _ => DataplaneError::Io {
            path: cgroup.to_owned(),
            source,
        },
    })?;
    if !meta.is_dir() || fs_magic(cgroup)? != CGROUP2_SUPER_MAGIC {
        return Err(DataplaneError::NotCgroup2 {
            path: cgroup.to_owned(),
        });
    }
    // The root of a cgroup2 hierarchy has no cgroup.type file; every child has one.
    if !allow_root && !cgroup.join("cgroup.type").exists() {
        return Err(DataplaneError::RootCgroup {
            path: cgroup.to_owned(),
        });
    }
    let file = fs::File::open(cgroup).map_err(|source| DataplaneError::Io {
        path: cgroup.to_owned(),
        source,
    })?;
    Ok((file, meta.ino()))
}

fn fs_magic(path: &Path) -> Result<i64, DataplaneError> {
    let st = nix::sys::statfs::statfs(path).map_err(|e| DataplaneError::Io {
        path: path.to_owned(),
        source: io::Error::from(e),
    })?;
    Ok(st.filesystem_type().0 as i64)
}

/// Loads the object, reusing pinned maps or creating and pinning them.
pub fn load(
    layout: &PinLayout,
    limits: &super::Limits,
    features: &super::features::Features,
) -> Result<Ebpf, DataplaneError> {
    for dir in [&layout.maps, &layout.links, &layout.conns, &layout.health] {
        fs::create_dir_all(dir).map_err(|source| DataplaneError::Io {
            path: dir.clone(),
            source,
        })?;
    }
    let apart: Vec<(&str, PathBuf)> = map_names::CONNS
        .iter()
        .map(|name| (*name, layout.conns.join(name)))
        .chain(
            map_names::HEALTH
                .iter()
                .map(|name| (*name, layout.health.join(name))),
        )
        .collect();
    let sock_reverse = layout.maps.join(map_names::SOCK_REVERSE);
    let mut loader = EbpfLoader::new();
    // The verifier's whole output in a refused program's error (it can be
    // megabytes, so only when asked).
    if std::env::var_os("SOCKMESH_VERIFIER_LOG").is_some() {
        loader.verifier_log_level(aya::VerifierLogLevel::DEBUG | aya::VerifierLogLevel::STATS);
    }
    loader.default_map_pin_directory(&layout.maps);
    // Pinned apart from the layout: they outlive a migration (reused when
    // present, as every pinned map is).
    for (name, pin) in &apart {
        loader.map_pin_path(name, pin.as_path());
    }
    // A socket storage map has no pinning of its own: pinned, so a restarted
    // agent's programs find the storage of sockets connected before.
    loader.map_pin_path(map_names::SOCK_REVERSE, sock_reverse.as_path());
    loader
        .map_max_entries(map_names::BACKEND_CONNS, limits.backends)
        .map_max_entries(map_names::ENDPOINT_HEALTH, limits.backends)
        .map_max_entries(map_names::SERVICE_POLICY, limits.services)
        .map_max_entries(map_names::SERVICE_HEALTH, limits.services)
        .map_max_entries(map_names::SERVICES, limits.services)
        .map_max_entries(map_names::SERVICE_STATS, limits.services)
        .map_max_entries(map_names::BACKENDS, limits.backends)
        .map_max_entries(map_names::SLOTS, limits.slots)
        .map_max_entries(map_names::TIERS, limits.services.saturating_mul(2))
        .map_max_entries(map_names::REVERSE, limits.reverse)
        .map_max_entries(map_names::REVERSE_UDP, limits.reverse_udp)
        .map_max_entries(
            map_names::MAGLEV,
            sockmesh_common::maglev_map_entries(limits.maglev),
        )
        .override_global(
            sockmesh_common::globals::SET_RETVAL,
            &u8::from(features.set_retval),
            true,
        )
        .load(OBJECT)
        .map_err(DataplaneError::Load)
}

/// Loads every program into the kernel (the verifier runs here), unattached: the
/// hooks and the opted-out stand-ins.
pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    for hook in PROGRAMS {
        let name = hook.program;
        let prog = ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram { name })?;
        let perr = |source: ProgramError| DataplaneError::Program { name, source };
        let started = std::time::Instant::now();
        match hook.program_type {
            ProgramType::CgroupSockAddr => {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(perr)?;
                p.load().map_err(perr)?;
            }
            ProgramType::CgroupSock => {
                let p: &mut CgroupSock = prog.try_into().map_err(perr)?;
                p.load().map_err(perr)?;
            }
            ProgramType::SockOps => {
                let p: &mut SockOps = prog.try_into().map_err(perr)?;
                p.load().map_err(perr)?;
            }
        }
        let verified_ms = started.elapsed().as_millis();
        // What the verifier walked (kernels of 5.16 and later say).
        let instructions = prog
            .info()
            .ok()
            .and_then(|i| i.verified_instruction_count());
        tracing::debug!(program = name, verified_ms, instructions, "program loaded");
    }
    Ok(())
}

/// Attaches every (loaded) program to the cgroup, or adopts the links pinned for it.
/// (A datapath for one cgroup checks [`refuse_other_cgroups`] first; an enrolling
/// one attaches to many, see `super::cgroups`.)
pub fn attach(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    cgroup: BorrowedFd<'_>,
    cgroup_id: u64,
) -> Result<Attachment, DataplaneError> {
    let dir = layout.cgroup_links(cgroup_id);
    fs::create_dir_all(&dir).map_err(|source| DataplaneError::Io {
        path: dir.clone(),
        source,
    })?;
    let mut adopted = 0;
    for hook in HOOKS {
        let name = hook.program;
        let pin = dir.join(name);
        let prog = ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram { name })?;
        let perr = |source: ProgramError| DataplaneError::Program { name, source };
        let lerr = |source| DataplaneError::Link { name, source };
        // The program types share the attach steps but no trait; the macros keep
        // one copy.
        macro_rules! attach_new {
            ($p:expr) => {{
                let id = $p.attach(cgroup, CgroupAttachMode::Single).map_err(perr)?;
                let link: FdLink = $p.take_link(id).map_err(perr)?.try_into().map_err(lerr)?;
                pin_link(link, &pin)?;
            }};
        }
        // Adopts the pinned link with a raw BPF_LINK_UPDATE (aya has it only for
        // sock_addr links), or attaches anew.
        macro_rules! replace_or_attach {
            ($ty:ty) => {{
                let p: &mut $ty = prog.try_into().map_err(perr)?;
                if pin.exists() {
                    replace_in_link(&pin, p.fd().map_err(perr)?.as_fd(), name)?;
                    adopted += 1;
                } else {
                    attach_new!(p);
                }
            }};
        }
        match hook.program_type {
            ProgramType::CgroupSockAddr => {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(perr)?;
                if pin.exists() {
                    // aya's BPF_LINK_UPDATE; the program keeps the link open (the pin
                    // keeps it attached).
                    let link = CgroupSockAddrLink::try_from(FdLink::from(
                        PinnedLink::from_pin(&pin).map_err(lerr)?,
                    ))
                    .map_err(lerr)?;
                    p.attach_to_link(link)
                        .map_err(|source| DataplaneError::LinkReplace { name, source })?;
                    adopted += 1;
                } else {
                    attach_new!(p);
                }
            }
            ProgramType::CgroupSock => replace_or_attach!(CgroupSock),
            ProgramType::SockOps => replace_or_attach!(SockOps),
        }
        debug!(program = name, pin = %pin.display(), "attached");
    }
    Ok(match adopted {
        0 => Attachment::Attached,
        _ => Attachment::Adopted,
    })
}

/// A pinned datapath serves one cgroup; attaching the same maps to a second one
/// would be surprising, so it is refused.
pub fn refuse_other_cgroups(layout: &PinLayout, cgroup_id: u64) -> Result<(), DataplaneError> {
    let Ok(entries) = fs::read_dir(&layout.links) else {
        return Ok(());
    };
    let mine = format!("cg{cgroup_id}");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != mine && fs::read_dir(entry.path()).is_ok_and(|mut d| d.next().is_some()) {
            return Err(DataplaneError::OtherCgroup {
                pins: entry.path(),
                cgroup_id,
            });
        }
    }
    Ok(())
}

fn pin_link(link: FdLink, pin: &Path) -> Result<(), DataplaneError> {
    link.pin(pin)
        .map(drop)
        .map_err(|source| DataplaneError::Pin {
            path: pin.to_owned(),
            source,
        })
}

/// Swaps `prog` into the link pinned at `pin` (`BPF_LINK_UPDATE`, raw: aya has it
/// only for sock_addr links; see [`super::sys`]).
pub(super) fn replace_in_link(
    pin: &Path,
    prog: BorrowedFd<'_>,
    name: &'static str,
) -> Result<(), DataplaneError> {
    let link = sys::obj_get(pin).map_err(|source| DataplaneError::Io {
        path: pin.to_owned(),
        source,
    })?;
    sys::link_update(link.as_fd(), prog)
        .map_err(|source| DataplaneError::LinkUpdate { name, source })
}

/// Detaches the programs of every link pinned under `layout` (at once, even if
/// another process still holds a link), then removes every pin under it. Returns
/// the number of pins removed.
pub fn remove_pins(layout: &PinLayout) -> Result<usize, DataplaneError> {
    let mut removed = 0;
    if !layout.root.exists() {
        return Ok(0);
    }
    // Links first, so the programs stop running before their maps go away.
    detach_tree(&layout.links)?;
    for dir in [&layout.links, &layout.maps] {
        removed += remove_tree(dir)?;
    }
    let _ = fs::remove_dir(&layout.root);
    Ok(removed)
}

/// `BPF_LINK_DETACH` on every link pinned under `dir`.
pub(super) fn detach_tree(dir: &Path) -> Result<(), DataplaneError> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            detach_tree(&path)?;
            continue;
        }
        detach_pin(&path)?;
    }
    Ok(())
}

/// Detaches the link pinned at `pin` (at once, even if another process holds
/// it); the pin stays.
pub(super) fn detach_pin(pin: &Path) -> Result<(), DataplaneError> {
    let io = |source| DataplaneError::Io {
        path: pin.to_owned(),
        source,
    };
    let link = sys::obj_get(pin).map_err(io)?;
    match sys::link_detach(link.as_fd()) {
        // Already detached (its cgroup was removed): nothing to do.
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => Ok(()),
        r => r.map_err(io),
    }
}

pub(super) fn remove_tree(dir: &Path) -> Result<usize, DataplaneError> {
    let io_err = |source| DataplaneError::Io {
        path: dir.to_owned(),
        source,
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry.map_err(io_err)?.path();
        if path.is_dir() {
            removed += remove_tree(&path)?;
        } else {
            fs::remove_file(&path).map_err(|source| DataplaneError::Io {
                path: path.clone(),
                source,
            })?;
            removed += 1;
        }
    }
    fs::remove_dir(dir).map_err(io_err)?;
    Ok(removed)
}

/// The capacities the pinned maps really have (a map adopted from an earlier
/// install keeps the size it was created with).
pub fn pinned_limits(layout: &PinLayout) -> Result<super::Limits, DataplaneError> {
    let size = |name: &'static str| -> Result<u32, DataplaneError> {
        let path = layout.maps.join(name);
        aya::maps::MapInfo::from_pin(&path)
            .map(|i| i.max_entries())
            .map_err(|source| DataplaneError::Map { name, source })
    };
    Ok(super::Limits {
        services: size(map_names::SERVICES)?,
        backends: size(map_names::BACKENDS)?,
        slots: size(map_names::SLOTS)?,
        // The map holds one table more than the limit (see maglev_map_entries).
        maglev: (size(map_names::MAGLEV)? / sockmesh_common::MAX_MAGLEV_CHUNKS_PER_TABLE)
            .saturating_sub(1),
        reverse: size(map_names::REVERSE)?,
        reverse_udp: size(map_names::REVERSE_UDP)?,
    })
}

/// Names of the sockmesh programs (`sm_*`) attached to `cgroup` now, asked of the
/// kernel (`BPF_PROG_QUERY` at each hook's attach type), not read from pins.
pub fn attached_programs(cgroup: &Path) -> Result<Vec<String>, DataplaneError> {
    Ok(attached_program_work(cgroup)?
        .into_iter()
        .map(|(name, _)| name)
        .collect())
}

/// The sockmesh programs attached to `cgroup`, by name, each with the number of
/// instructions the verifier processed to accept it (kernels of 5.16 and later
/// report it; the limit is 1,000,000 per program).
pub fn attached_program_work(cgroup: &Path) -> Result<Vec<(String, Option<u32>)>, DataplaneError> {
    let mut programs: Vec<_> = attached_infos(cgroup)?
        .into_iter()
        .map(|(name, info)| (name, info.verified_instruction_count()))
        .collect();
    programs.sort();
    Ok(programs)
}

/// The kernel's accounting of the sockmesh programs attached to `cgroup`: by name,
/// the nanoseconds spent in the program and its runs. The kernel counts only while
/// run-time statistics are enabled ([`enable_run_stats`]). For benchmarks: what
/// the programs themselves cost, apart from the noise of the calls around them.
pub fn attached_program_run_stats(
    cgroup: &Path,
) -> Result<Vec<(String, u64, u64)>, DataplaneError> {
    let io = |source| DataplaneError::Io {
        path: cgroup.to_owned(),
        source,
    };
    let mut programs = Vec::new();
    for (name, info) in attached_infos(cgroup)? {
        let fd = info.fd().map_err(|e| io(std::io::Error::other(e)))?;
        let (ns, runs) = sys::prog_run_stats(fd.as_fd()).map_err(io)?;
        programs.push((name, ns, runs));
    }
    programs.sort();
    Ok(programs)
}

/// Turns the kernel's run-time statistics of BPF programs on until the returned
/// descriptor is closed (`BPF_ENABLE_STATS`; they cost two clock reads per run).
pub fn enable_run_stats() -> Result<std::os::fd::OwnedFd, DataplaneError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| DataplaneError::Io {
        path: PathBuf::from("BPF_ENABLE_STATS"),
        source: std::io::Error::other(e),
    })
}

/// The sockmesh programs attached to `cgroup`, by name.
fn attached_infos(
    cgroup: &Path,
) -> Result<Vec<(String, aya::programs::ProgramInfo)>, DataplaneError> {
    let (dir, _) = open_cgroup(cgroup, true)?;
    let io = |source| DataplaneError::Io {
        path: cgroup.to_owned(),
        source,
    };
    let mut ids = Vec::new();
    for hook in HOOKS {
        ids.extend(sys::prog_query(dir.as_fd(), hook.attach_type).map_err(io)?);
    }
    let mut programs = Vec::new();
    for info in aya::programs::loaded_programs().flatten() {
        if ids.contains(&info.id())
            && let Some(name) = info.name_as_str().filter(|n| n.starts_with(PROGRAM_PREFIX))
        {
            programs.push((name.to_owned(), info));
        }
    }
    Ok(programs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_mount_found_in_hybrid_and_pure_layouts() {
        let hybrid = "25 30 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_root_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_root_in(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        // A bind mount of a sub-tree (a container's view) is not the hierarchy root.
        let sub = "40 23 0:26 /kubepods /mnt/x rw - cgroup2 cgroup2 rw\n\
                   41 23 0:26 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_root_in(sub), Some(PathBuf::from("/mnt/cg two")));
        assert_eq!(cgroup2_root_in("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }
}
