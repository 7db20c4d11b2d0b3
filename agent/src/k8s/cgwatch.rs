//! New pod cgroups, as inotify reports them: the kubelet creates a pod's cgroup
//! (a directory under its QoS class's) after the pod is bound to the node, so an
//! enrolled pod may wait for it. A directory made with mkdir(2), as the kubelet
//! and systemd make cgroups, is an `IN_CREATE` in its parent.

use std::{
    os::fd::{AsFd as _, AsRawFd, RawFd},
    path::PathBuf,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tracing::debug;

/// The inotify instance, as a raw descriptor for tokio's reactor.
struct Watcher(Inotify);

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Watches the QoS directories for new cgroups.
pub struct CgroupWatch {
    fd: Option<AsyncFd<Watcher>>,
    /// Directories not watched yet (not there at start): tried again on
    /// [`Self::watch_missing`].
    missing: Vec<PathBuf>,
}

impl CgroupWatch {
    /// Watches `dirs` (those that exist). Without inotify it never reports, and
    /// the enroller's one-second retry finds new cgroups instead.
    pub fn new(dirs: &[PathBuf]) -> Self {
        let fd = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .ok()
            // SAFETY: `Watcher` owns the inotify descriptor and always returns
            // that same open descriptor for as long as the AsyncFd holds it.
            .and_then(|i| unsafe { AsyncFd::register(Watcher(i)) }.ok());
        let mut watch = Self {
            fd,
            missing: dirs.to_vec(),
        };
        watch.watch_missing();
        watch
    }

    /// Adds the watches of directories that exist now.
    pub fn watch_missing(&mut self) {
        let Some(fd) = &self.fd else {
            return;
        };
        self.missing.retain(|dir| {
            let added = fd
                .get_ref()
                .0
                .add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ONLYDIR);
            debug!(dir = %dir.display(), watched = added.is_ok(), "watching for new cgroups");
            added.is_err()
        });
    }

    /// Returns when a directory was created in a watched one (never, without
    /// inotify).
    pub async fn created(&mut self) {
        let Some(fd) = &self.fd else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return std::future::pending().await;
            };
            let events = guard.get_inner().0.read_events().unwrap_or_default();
            guard.clear_ready();
            if events
                .iter()
                .any(|e| e.mask.contains(AddWatchFlags::IN_CREATE))
            {
                return;
            }
        }
    }
}
