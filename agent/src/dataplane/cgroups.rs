//! Enrollment: the programs attached to each enrolled pod's own cgroup.
//!
//! A datapath in [`AttachScope::EnrolledPods`] never attaches at the `--cgroup`
//! root. It attaches the same loaded programs, one `bpf_link` each, to every
//! cgroup it is given ([`Datapath::enroll`]), pins them under
//! `<bpffs>/v<N>/links/cg<ID>/` (the layout [`super::loader`] names), and detaches
//! and unpins the links of cgroups no longer given. A process outside every
//! enrolled cgroup has no program on its path: its `connect()` is untouched.
//!
//! A pod that opts out while its processes run has the programs that place
//! sockets (connect and sendmsg) swapped at once for stand-ins that let every
//! call proceed ([`OPTED_OUT`], one `BPF_LINK_UPDATE` each); the others stay
//! until the cgroup holds no process any more (`populated 0` in
//! `cgroup.events`): its sockets placed while it was enrolled keep their VIP in
//! `getpeername()` and in UDP replies, and their close still deletes their
//! `SM_REVERSE` entry and their connection counts, which nothing else would.
//! Opting back in swaps the placing programs back. Neither attaches nor
//! detaches a program: the kernel keeps one static key per attach type, on
//! while any cgroup has a program there, and flipping it patches kernel text on
//! every CPU (under qemu's TCG, a vCPU running `connect()` through the patched
//! site once spun there until the watchdog fired).
//!
//! A restarted agent swaps its programs into every cgroup's pinned links at once
//! ([`adopt`]), so pods enrolled before keep being served, then prunes what its
//! first complete view of the node no longer enrolls. The kernel detaches a link
//! by itself when its cgroup is removed (the kubelet removes a deleted pod's);
//! its pins go when the pod does.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::{
        fd::{AsFd as _, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::Ebpf;
use sockmesh_common::hooks::{HOOKS, OPTED_OUT, OPTED_OUT_PREFIX};
use tracing::{debug, info, warn};

use super::{Attachment, Datapath, DataplaneError, PinLayout, loader, sys};

/// Which processes the datapath serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachScope {
    /// Every process in the `--cgroup` directory and below: one set of links there.
    #[default]
    Cgroup,
    /// Only the cgroups [`Datapath::enroll`] is given, each strictly below the
    /// `--cgroup` directory: one set of links per enrolled pod.
    EnrolledPods,
}

/// What [`Datapath::enroll`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnrollReport {
    /// The enrolled cgroups whose programs are attached, by path: the cgroup's id.
    pub attached: BTreeMap<PathBuf, u64>,
    /// Those this call attached (the others already were).
    pub newly_attached: Vec<PathBuf>,
    /// Enrolled cgroups that do not exist: not yet (the kubelet creates a pod's
    /// cgroup after the pod is bound to the node) or not any more.
    pub missing: Vec<PathBuf>,
    /// Enrolled cgroups that could not be attached, with why.
    pub failed: Vec<(PathBuf, String)>,
    /// cgroups whose links this call detached and unpinned, by id.
    pub detached: Vec<u64>,
    /// cgroups no longer enrolled that still hold processes, by id: their
    /// placing programs are swapped for the [`OPTED_OUT`] stand-ins, the rest
    /// stay until the processes are gone (the caller calls again to find out).
    pub draining: Vec<u64>,
    /// Nothing is attached while the datapath waits to go live (a layout
    /// migration): it attaches the last cgroups it was given then.
    pub pending: bool,
}

/// The enrolled cgroups' links this datapath holds.
#[derive(Debug, Default)]
pub(super) struct PodLinks {
    /// cgroups with links pinned, by id: the path they were enrolled by (`None`:
    /// adopted from the pins at start, not matched to a path yet).
    attached: BTreeMap<u64, Option<PathBuf>>,
    /// The last cgroups asked for (a pending datapath attaches them on activation).
    desired: BTreeSet<PathBuf>,
    /// cgroups no longer enrolled whose placing links run the [`OPTED_OUT`]
    /// stand-ins and whose other links stay while processes run in them, by id:
    /// their path (`None` until found).
    draining: BTreeMap<u64, Option<PathBuf>>,
}

/// The cgroup ids that have links pinned under `layout`, with how many.
pub(super) fn pinned_cgroups(layout: &PinLayout) -> BTreeMap<u64, usize> {
    let Ok(entries) = fs::read_dir(&layout.links) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let id: u64 = name.to_str()?.strip_prefix("cg")?.parse().ok()?;
            let pins = fs::read_dir(e.path()).ok()?.count();
            Some((id, pins))
        })
        .collect()
}

/// Swaps the loaded programs into the links pinned for every cgroup under
/// `layout` (`BPF_LINK_UPDATE`, atomic, no detach window). A cgroup the kernel
/// already detached (removed while no agent ran) has its pins removed instead.
/// Returns how the programs came to be attached, and what it adopted.
pub(super) fn adopt(ebpf: &Ebpf, layout: &PinLayout) -> Result<PodLinks, DataplaneError> {
    let mut links = PodLinks::default();
    let stand_ins = loaded_stand_ins();
    for (id, _) in pinned_cgroups(layout) {
        let dir = layout.cgroup_links(id);
        if !cgroup_alive(&dir)? {
            let pins = detach_cgroup(layout, id)?;
            info!(
                cgroup_id = id,
                pins, "removed the links of a cgroup that is gone"
            );
            continue;
        }
        // A pod opted out before the restart: its placing links run stand-ins,
        // and get this agent's stand-ins.
        let opted_out = OPTED_OUT.iter().any(|(placing, _)| {
            link_program_id(&dir.join(placing.program)).is_some_and(|p| stand_ins.contains(&p))
        });
        for hook in HOOKS {
            let pin = dir.join(hook.program);
            if !pin.exists() {
                // Attached in part (an agent stopped while attaching): the next
                // enrollment of its cgroup attaches the rest.
                continue;
            }
            let name = match OPTED_OUT.iter().find(|(placing, _)| *placing == hook) {
                Some((_, off)) if opted_out => off.program,
                _ => hook.program,
            };
            loader::replace_in_link(&pin, program_fd(ebpf, name)?, name)?;
        }
        if opted_out {
            debug!(
                cgroup_id = id,
                "adopted the pinned links of a cgroup that opted out"
            );
            links.draining.insert(id, None);
        } else {
            debug!(cgroup_id = id, "adopted the cgroup's pinned links");
            links.attached.insert(id, None);
        }
    }
    Ok(links)
}

/// The loaded program `name`'s descriptor.
fn program_fd<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<BorrowedFd<'a>, DataplaneError> {
    let prog = ebpf
        .program(name)
        .ok_or(DataplaneError::MissingProgram { name })?;
    prog.fd()
        .map(|fd| fd.as_fd())
        .map_err(|source| DataplaneError::Program { name, source })
}

/// The ids of every loaded [`OPTED_OUT`] stand-in (this agent's and a previous
/// one's).
fn loaded_stand_ins() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| {
            p.name_as_str()
                .is_some_and(|n| n.starts_with(OPTED_OUT_PREFIX))
        })
        .map(|p| p.id())
        .collect()
}

/// The id of the program the link pinned at `pin` runs (`None`: no such pin).
fn link_program_id(pin: &Path) -> Option<u32> {
    let link = aya::programs::links::PinnedLink::from_pin(pin).ok()?;
    aya::programs::links::FdLink::from(link)
        .info()
        .ok()
        .map(|i| i.program_id())
}

/// Whether the links pinned in `dir` are still attached to a live cgroup (the
/// kernel reports cgroup id 0 for a link whose cgroup was removed). A directory
/// without a readable pin counts as alive, so nothing is removed on a guess.
fn cgroup_alive(dir: &Path) -> Result<bool, DataplaneError> {
    let Some(pin) = fs::read_dir(dir)
        .ok()
        .and_then(|mut d| d.find_map(|e| e.ok().map(|e| e.path())))
    else {
        return Ok(true);
    };
    let io = |source| DataplaneError::Io {
        path: pin.clone(),
        source,
    };
    let link = sys::obj_get(&pin).map_err(io)?;
    Ok(sys::link_cgroup_id(link.as_fd()).map_err(io)? != 0)
}

/// Detaches the links pinned for the cgroup `id` (at once, even if another process
/// holds one) and removes their pins; returns how many pins.
pub(super) fn detach_cgroup(layout: &PinLayout, id: u64) -> Result<usize, DataplaneError> {
    let dir = layout.cgroup_links(id);
    if !dir.exists() {
        return Ok(0);
    }
    loader::detach_tree(&dir)?;
    loader::remove_tree(&dir)
}

/// Swaps the [`OPTED_OUT`] stand-ins into the placing links of the cgroup `id`
/// (those pinned): its connects and sends proceed untouched from now on.
fn opt_out(ebpf: &Ebpf, layout: &PinLayout, id: u64) -> Result<(), DataplaneError> {
    let dir = layout.cgroup_links(id);
    for (placing, off) in OPTED_OUT {
        let pin = dir.join(placing.program);
        if !pin.exists() {
            continue;
        }
        loader::replace_in_link(&pin, program_fd(ebpf, off.program)?, off.program)?;
    }
    Ok(())
}

/// Whether a process runs in the cgroup at `path` or below (`populated 1` in its
/// `cgroup.events`). An unreadable file counts as populated: the links stay
/// rather than leave sockets without their release program.
fn populated(path: &Path) -> bool {
    fs::read_to_string(path.join("cgroup.events")).map_or(true, |e| {
        e.lines()
            .find_map(|l| l.strip_prefix("populated "))
            .is_none_or(|v| v.trim() != "0")
    })
}

/// The path of the cgroup `id` at or below `root`, if it exists.
fn find_cgroup(root: &Path, id: u64) -> Option<PathBuf> {
    cgroups_under(root).find_map(|(path, ino)| (ino == id).then_some(path))
}

/// The ids of `root` and every cgroup below it (a cgroup's id is its inode).
pub(super) fn ids_under(root: &Path) -> BTreeSet<u64> {
    cgroups_under(root).map(|(_, id)| id).collect()
}

/// `root` and every cgroup below it, each with its id, depth first.
fn cgroups_under(root: &Path) -> impl Iterator<Item = (PathBuf, u64)> {
    let mut dirs = vec![root.to_owned()];
    std::iter::from_fn(move || {
        while let Some(dir) = dirs.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            if let Ok(entries) = fs::read_dir(&dir) {
                dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            return Some((dir, meta.ino()));
        }
        None
    })
}

/// Refuses when links under `layout` serve a live cgroup outside `root` (another
/// installation's), for `uninstall --cgroup ROOT`: the root itself, the pods
/// below it and cgroups already removed are this installation's.
pub(super) fn refuse_outside(layout: &PinLayout, root: &Path) -> Result<(), DataplaneError> {
    let pinned = pinned_cgroups(layout);
    if pinned.is_empty() {
        return Ok(());
    }
    let mine = ids_under(root);
    for (id, _) in pinned {
        let dir = layout.cgroup_links(id);
        if !mine.contains(&id) && cgroup_alive(&dir)? {
            let (_, root_id) = loader::open_cgroup(root, true)?;
            return Err(DataplaneError::OtherCgroup {
                pins: dir,
                cgroup_id: root_id,
            });
        }
    }
    Ok(())
}

impl PodLinks {
    /// Whether no cgroup's links were adopted (enrolled or opted out).
    pub(super) fn is_empty(&self) -> bool {
        self.attached.is_empty() && self.draining.is_empty()
    }
}

impl Datapath {
    /// Makes the enrolled cgroups exactly `cgroups` (each strictly below the
    /// `--cgroup` root): attaches the programs to those that have none, and with
    /// `prune`, detaches and unpins every other cgroup's links. Without `prune`
    /// nothing is detached: the caller does not know the whole set yet (an agent
    /// starting, before its first complete list of the node's pods).
    pub fn enroll(
        &mut self,
        cgroups: &BTreeSet<PathBuf>,
        prune: bool,
    ) -> Result<EnrollReport, DataplaneError> {
        let Some(pods) = self.pods.as_mut() else {
            return Err(DataplaneError::NotEnrolling);
        };
        pods.desired.clone_from(cgroups);
        let mut report = EnrollReport {
            pending: self.pending.is_some(),
            ..EnrollReport::default()
        };
        if report.pending {
            return Ok(report);
        }
        let mut keep = BTreeSet::new();
        for path in cgroups {
            if !path.starts_with(&self.root) || path == &self.root {
                report.failed.push((
                    path.clone(),
                    format!("not below the --cgroup root {}", self.root.display()),
                ));
                continue;
            }
            // What the path is now: an inode number that changed is another cgroup.
            let Ok(meta) = fs::metadata(path) else {
                report.missing.push(path.clone());
                continue;
            };
            let id = meta.ino();
            if pods.attached.get(&id).is_some_and(Option::is_some) {
                keep.insert(id);
                report.attached.insert(path.clone(), id);
                continue;
            }
            match attach_one(
                &mut self.ebpf,
                &self.layout,
                path,
                pods.attached.contains_key(&id),
            ) {
                Ok(id) => {
                    keep.insert(id);
                    pods.attached.insert(id, Some(path.clone()));
                    report.attached.insert(path.clone(), id);
                    report.newly_attached.push(path.clone());
                }
                Err(DataplaneError::CgroupNotFound { .. }) => report.missing.push(path.clone()),
                Err(e) => {
                    // Kept: whatever it had attached stays until it is no longer
                    // enrolled; the next enrollment tries again.
                    keep.insert(id);
                    report.failed.push((path.clone(), super::task::chain(&e)));
                }
            }
        }
        for id in &keep {
            pods.draining.remove(id);
        }
        if prune {
            let stale: BTreeSet<u64> = pods
                .attached
                .keys()
                .chain(pods.draining.keys())
                .copied()
                .chain(pinned_cgroups(&self.layout).into_keys())
                .filter(|id| !keep.contains(id))
                .collect();
            for id in stale {
                let path = pods
                    .attached
                    .get(&id)
                    .cloned()
                    .flatten()
                    .or_else(|| pods.draining.get(&id).cloned().flatten())
                    .filter(|p| fs::metadata(p).is_ok_and(|m| m.ino() == id))
                    .or_else(|| find_cgroup(&self.root, id));
                let was_draining = pods.draining.contains_key(&id);
                let result = match path {
                    Some(p) if populated(&p) => {
                        if was_draining {
                            Ok(())
                        } else {
                            opt_out(&self.ebpf, &self.layout, id).map(|()| {
                                debug!(cgroup_id = id, "swapped stand-ins into the placing links of a cgroup no longer enrolled; the rest stay while its processes run");
                            })
                        }
                        .map(|()| {
                            pods.attached.remove(&id);
                            pods.draining.insert(id, Some(p));
                            report.draining.push(id);
                        })
                    }
                    _ => detach_cgroup(&self.layout, id).map(|_| {
                        pods.attached.remove(&id);
                        pods.draining.remove(&id);
                        if !was_draining {
                            report.detached.push(id);
                        }
                    }),
                };
                if let Err(e) = result {
                    warn!(
                        cgroup_id = id,
                        error = %super::task::chain(&e),
                        "detaching the links of a cgroup no longer enrolled failed; retrying"
                    );
                }
            }
        }
        Ok(report)
    }

    /// Attaches a pending enrolling datapath to the cgroups it was last given. A
    /// cgroup that fails is logged and left to the enroller's next try; the
    /// others go live.
    pub(super) fn attach_enrolled(&mut self) -> Result<(), DataplaneError> {
        let desired = self
            .pods
            .as_ref()
            .map(|p| p.desired.clone())
            .unwrap_or_default();
        let pending = self.pending.take();
        let result = self.enroll(&desired, false);
        self.pending = pending;
        for (path, why) in &result?.failed {
            warn!(cgroup = %path.display(), error = %why, "attaching an enrolled pod's cgroup failed; retrying");
        }
        Ok(())
    }

    /// The enrolled cgroups with links, by id (an enrolling datapath).
    pub fn enrolled_cgroups(&self) -> Vec<u64> {
        self.pods
            .as_ref()
            .map(|p| p.attached.keys().copied().collect())
            .unwrap_or_default()
    }
}

/// Attaches the programs to the cgroup at `path` (`adopted`: its pins were
/// updated at start; attaching again fills in any program missing); returns
/// its id.
fn attach_one(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    path: &Path,
    adopted: bool,
) -> Result<u64, DataplaneError> {
    let (cgroup, id) = loader::open_cgroup(path, false)?;
    if adopted && pinned_cgroups(layout).get(&id) == Some(&HOOKS.len()) {
        return Ok(id);
    }
    let attachment = loader::attach(ebpf, layout, cgroup.as_fd(), id)?;
    debug!(cgroup = %path.display(), cgroup_id = id, adopted = attachment == Attachment::Adopted, "enrolled");
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_cgroups_are_read_from_the_link_directories() {
        let dir = std::env::temp_dir().join(format!("sm-cgroups-{}", std::process::id()));
        let layout = PinLayout::new(&dir);
        for (id, pins) in [(7_u64, 2), (12, 0)] {
            let d = layout.cgroup_links(id);
            fs::create_dir_all(&d).expect("dir");
            for p in 0..pins {
                fs::write(d.join(format!("p{p}")), "").expect("pin");
            }
        }
        fs::create_dir_all(layout.links.join("not-a-cgroup")).expect("dir");
        let found = pinned_cgroups(&layout);
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(found, BTreeMap::from([(7, 2), (12, 0)]));
    }

    #[test]
    fn ids_under_walks_the_whole_subtree() {
        let dir = std::env::temp_dir().join(format!("sm-ids-{}", std::process::id()));
        fs::create_dir_all(dir.join("a/b")).expect("dirs");
        fs::create_dir_all(dir.join("c")).expect("dirs");
        let ino = |p: &Path| fs::metadata(p).expect("stat").ino();
        let want: BTreeSet<u64> = [
            ino(&dir),
            ino(&dir.join("a")),
            ino(&dir.join("a/b")),
            ino(&dir.join("c")),
        ]
        .into();
        let got = ids_under(&dir);
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(got, want);
    }
}
