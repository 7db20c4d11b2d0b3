//! `file://` source: Envoy's filesystem subscription form, a `DiscoveryResponse` in
//! YAML or JSON (`resources:` with `@type`), holding any mix of Listeners, Routes,
//! Clusters and ClusterLoadAssignments. Watched with inotify on its directory (so an
//! editor's rename or a Kubernetes ConfigMap's `..data` swap is seen too); every
//! change is applied as one update. A malformed file is reported with its line or
//! field and changes nothing.

use std::{
    os::fd::{AsFd as _, AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{error, info};

use super::{
    core::{Core, SourceState, Written},
    decode::discovery_response_with_opaque,
    state::{Nack, Update},
};

#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("watching {path}: {source}", path = path.display())]
    Watch { path: PathBuf, source: nix::Error },
}

/// Why a configuration file was not applied.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}", path = path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}", path = path.display())]
    Parse {
        path: PathBuf,
        source: super::decode::DecodeError,
    },
    #[error("{path}: {source}", path = path.display())]
    Rejected { path: PathBuf, source: Nack },
    #[error("agent state poisoned")]
    Poisoned,
}

/// Reads, decodes and applies the file once; returns the kernel write it handed
/// to the datapath task.
pub fn load_once(path: &Path, core: &Arc<Mutex<Core>>) -> Result<Written, LoadError> {
    let received = Instant::now();
    let parsed = std::fs::read_to_string(path)
        .map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })
        .and_then(|text| {
            discovery_response_with_opaque(&text).map_err(|source| LoadError::Parse {
                path: path.to_owned(),
                source,
            })
        });
    let mut c = core.lock().map_err(|_| LoadError::Poisoned)?;
    let resp = c.document(parsed)?;
    c.source = SourceState::Connected;
    c.handle(
        Update::Full {
            version: resp.version_info,
            resources: resp.resources,
        },
        received,
    )
    .map(|h| h.written)
    .map_err(|source| LoadError::Rejected {
        path: path.to_owned(),
        source,
    })
}

/// Applies the file unless its text is `last`'s, and waits for the kernel write.
async fn apply(path: &Path, last: &mut Option<String>, core: &Arc<Mutex<Core>>) {
    let text = std::fs::read_to_string(path).ok();
    if text.is_some() && text == *last {
        return;
    }
    last.clone_from(&text);
    match load_once(path, core) {
        Ok(written) => {
            written.wait().await;
            info!(file = %path.display(), "configuration file applied");
        }
        Err(e) => error!(
            error = %crate::xds::core::chain(&e),
            "configuration file rejected, keeping the previous state"
        ),
    }
}

/// Applies the file now and on every change until `shutdown`.
pub async fn run(
    path: PathBuf,
    core: Arc<Mutex<Core>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), FileSourceError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let watch_err = |source| FileSourceError::Watch {
        path: dir.clone(),
        source,
    };
    let inotify =
        Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(watch_err)?;
    inotify
        .add_watch(
            &dir,
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_DELETE,
        )
        .map_err(watch_err)?;
    // SAFETY: `Watcher` owns the inotify descriptor and always returns that same
    // open descriptor from `as_raw_fd` for as long as the AsyncFd holds it.
    let fd = unsafe { AsyncFd::register(Watcher(inotify)) }.map_err(|e| {
        watch_err(nix::Error::from_raw(
            std::io::Error::from(e).raw_os_error().unwrap_or(0),
        ))
    })?;
    let mut last: Option<String> = None;
    apply(&path, &mut last, &core).await;
    loop {
        tokio::select! {
            ready = fd.readable() => {
                let Ok(mut guard) = ready else { continue };
                // Drain the events; which file changed does not matter, the content does.
                let _ = guard.get_inner().0.read_events();
                guard.clear_ready();
                apply(&path, &mut last, &core).await;
            }
            // A slow safety net for filesystems without inotify events (NFS, FUSE).
            () = tokio::time::sleep(Duration::from_secs(5)) => apply(&path, &mut last, &core).await,
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// The inotify instance, as a raw descriptor for tokio's reactor.
struct Watcher(Inotify);

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}
