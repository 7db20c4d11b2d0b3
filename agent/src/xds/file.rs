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
use tracing::{error, info, warn};

use super::{
    core::{Core, SourceState, Written},
    filedoc::{self, Known, TextHash},
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
    NotUtf8 {
        path: PathBuf,
        source: super::position::NotUtf8,
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

/// What the source remembers of the last file it read: a hash of its text (the
/// same text again is not re-applied) and the resources of the last accepted one
/// (their texts, to decode only what changed).
#[derive(Default)]
struct Last {
    text: Option<TextHash>,
    /// The file's identity and times when last read (the 5 s safety net reads
    /// the file only when they changed).
    stamp: Option<Stamp>,
    known: Known,
    /// The read error last reported (reported once, not every 5 s).
    unreadable: Option<String>,
}

/// Device, inode, size, modification and change times (of the file a symlink
/// leads to).
type Stamp = (u64, u64, u64, i64, i64, i64, i64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// Reads, decodes (outside the agent's lock) and applies `text`; returns the
/// kernel write it handed to the datapath task.
fn load(
    path: &Path,
    text: &str,
    known: &mut Known,
    core: &Arc<Mutex<Core>>,
) -> Result<Written, LoadError> {
    let received = Instant::now();
    let parsed = filedoc::read(text, known);
    commit(path, parsed, received, received.elapsed(), known, core)
}

/// Applies a decoded document (`received` when its decode started, `decoded`
/// its time); returns the kernel write it handed to the datapath task.
fn commit(
    path: &Path,
    parsed: Result<filedoc::Read, super::decode::DecodeError>,
    received: Instant,
    decoded: Duration,
    known: &mut Known,
    core: &Arc<Mutex<Core>>,
) -> Result<Written, LoadError> {
    let parsed = parsed.map_err(|source| LoadError::Parse {
        path: path.to_owned(),
        source,
    });
    let committing = Instant::now();
    let (changed, kept, next, handled) = crate::xds::core::locked(core, |c| {
        let read = match parsed {
            Ok(read) => read,
            Err(e) => {
                c.source_error(e.to_string());
                return Err(e);
            }
        };
        c.note_text(read.notes);
        c.set_source(SourceState::Connected);
        let (changed, kept) = (read.changed.len(), read.kept.len());
        let handled = c.handle(
            Update::Full {
                version: read.version,
                resources: read.changed,
                kept: read.kept,
                positions: read.positions,
            },
            received,
        );
        Ok((changed, kept, read.next, handled))
    })
    .ok_or(LoadError::Poisoned)??;
    if handled.nack.is_some() && handled.refused.is_empty() {
        let source = handled.nack.unwrap_or_else(|| Nack(String::new()));
        return Err(LoadError::Rejected {
            path: path.to_owned(),
            source,
        });
    }
    // A refused resource's text is not remembered as accepted: the next read
    // decodes it again (and refuses it again, or applies its fix).
    let mut next = next;
    next.forget(handled.refused.iter().map(|r| (r.kind, r.name.as_str())));
    *known = next;
    if let Some(nack) = &handled.nack {
        warn!(
            file = %path.display(),
            refused = handled.refused.len(),
            error = %nack,
            "configuration file applied but for the refused resources, which keep their last good version"
        );
    }
    info!(
        file = %path.display(),
        decoded = changed,
        kept,
        decode_ms = decoded.as_millis() as u64,
        state_ms = committing.elapsed().as_millis() as u64,
        "configuration file accepted"
    );
    Ok(handled.written)
}

/// A document of at least this many bytes leaves megabytes freed but held by the
/// allocator once decoded (a 20 MB file tripled the agent's resident memory for
/// good): they are handed back (see `release_freed_memory`).
const LARGE_DOCUMENT: usize = 1 << 20;

/// Records and logs, once per distinct message, why the file was not read.
fn unreadable(e: &LoadError, last: &mut Last, core: &Arc<Mutex<Core>>) {
    let message = e.to_string();
    if last.unreadable.as_ref() != Some(&message) {
        error!(error = %crate::xds::core::chain(e), "configuration file unreadable, keeping the previous state");
        if let Ok(mut c) = core.lock() {
            c.source_error(message.clone());
        }
        last.unreadable = Some(message);
    }
    last.text = None;
}

/// Applies the file unless its text is the last one read, and waits for the
/// kernel write.
async fn apply(path: &Path, last: &mut Last, core: &Arc<Mutex<Core>>) {
    last.stamp = stamp(path);
    let bytes = match std::fs::read(path) {
        Ok(t) => t,
        Err(source) => {
            let e = LoadError::Read {
                path: path.to_owned(),
                source,
            };
            unreadable(&e, last, core);
            return;
        }
    };
    let large = bytes.len() >= LARGE_DOCUMENT;
    let text = match super::position::utf8(&bytes) {
        Ok(t) => t,
        Err(source) => {
            let e = LoadError::NotUtf8 {
                path: path.to_owned(),
                source,
            };
            unreadable(&e, last, core);
            return;
        }
    };
    last.unreadable = None;
    let hash = TextHash::of(text);
    if last.text == Some(hash) {
        return;
    }
    last.text = Some(hash);
    let result = load(path, text, &mut last.known, core);
    drop(bytes);
    if large {
        crate::dataplane::task::release_freed_memory();
    }
    finish(path, result).await;
}

/// Waits for an applied file's kernel write, or reports why it was not applied.
async fn finish(path: &Path, result: Result<Written, LoadError>) {
    match result {
        Ok(written) => {
            let started = Instant::now();
            written.wait().await;
            info!(
                file = %path.display(),
                kernel_ms = started.elapsed().as_millis() as u64,
                "configuration file applied"
            );
        }
        Err(e) => error!(
            error = %crate::xds::core::chain(&e),
            "configuration file rejected, keeping the previous state"
        ),
    }
}

/// The file's first read and decode, on a thread started beside the agent's own
/// start (the datapath's load and the verifier take about a third of a second, the
/// decode of a 76 MB file about as long). [`run`] applies it if the file has not
/// changed since, and reads the file itself otherwise.
pub struct ReadAhead(std::thread::JoinHandle<Option<Early>>);

struct Early {
    stamp: Stamp,
    hash: TextHash,
    large: bool,
    decoded: Duration,
    parsed: Result<filedoc::Read, super::decode::DecodeError>,
}

impl ReadAhead {
    /// Starts reading `path`; `None` if no thread could start (the source then
    /// reads the file itself).
    pub fn start(path: &Path) -> Option<Self> {
        let path = path.to_owned();
        let early = move || {
            // A file that cannot be read or is not UTF-8 is the source's to
            // report, as it reports any later one.
            let stamp = stamp(&path)?;
            let received = Instant::now();
            let bytes = std::fs::read(&path).ok()?;
            let text = super::position::utf8(&bytes).ok()?;
            let parsed = filedoc::read(text, &Known::default());
            Some(Early {
                stamp,
                hash: TextHash::of(text),
                large: bytes.len() >= LARGE_DOCUMENT,
                decoded: received.elapsed(),
                parsed,
            })
        };
        std::thread::Builder::new()
            .name("file-ahead".into())
            .spawn(early)
            .ok()
            .map(ReadAhead)
    }
}

/// Applies the first read if the file is still what it read (its stamp, taken
/// before it read and after the watch was set, is unchanged); `false` if not.
async fn apply_ahead(
    path: &Path,
    ahead: ReadAhead,
    last: &mut Last,
    core: &Arc<Mutex<Core>>,
) -> bool {
    let joined = tokio::task::spawn_blocking(move || ahead.0.join()).await;
    let Ok(Ok(Some(early))) = joined else {
        return false;
    };
    if stamp(path) != Some(early.stamp) {
        return false;
    }
    last.stamp = Some(early.stamp);
    last.unreadable = None;
    last.text = Some(early.hash);
    // The update's latency (received → in the kernel) counts the decode, as a
    // later read's does, not the start-up the decode ran beside.
    let received = Instant::now()
        .checked_sub(early.decoded)
        .unwrap_or_else(Instant::now);
    let result = commit(
        path,
        early.parsed,
        received,
        early.decoded,
        &mut last.known,
        core,
    );
    if early.large {
        crate::dataplane::task::release_freed_memory();
    }
    finish(path, result).await;
    true
}

/// Applies the file now (its first read from `ahead`, when given and still
/// current) and on every change until `shutdown`.
pub async fn run(
    path: PathBuf,
    core: Arc<Mutex<Core>>,
    mut shutdown: watch::Receiver<bool>,
    ahead: Option<ReadAhead>,
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
    let file_name = path.file_name().map(std::ffi::OsStr::to_os_string);
    let mut last = Last::default();
    let applied = match ahead {
        Some(ahead) => apply_ahead(&path, ahead, &mut last, &core).await,
        None => false,
    };
    if !applied {
        apply(&path, &mut last, &core).await;
    }
    loop {
        tokio::select! {
            ready = fd.readable() => {
                let Ok(mut guard) = ready else { continue };
                let events = guard.get_inner().0.read_events().unwrap_or_default();
                guard.clear_ready();
                // Events for the file itself, or for Kubernetes' `..data` swap (a
                // ConfigMap's files are symlinks through it); an editor's or a
                // writer's temporary file beside it is not read.
                if events.iter().any(|e| e.name.as_deref().is_none_or(|n| {
                    Some(n) == file_name.as_deref() || n.to_string_lossy().starts_with("..")
                })) {
                    apply(&path, &mut last, &core).await;
                }
            }
            // A slow safety net for filesystems without inotify events (NFS, FUSE):
            // the file is read again only when its inode, size or times changed.
            () = tokio::time::sleep(Duration::from_secs(5)) => {
                if last.stamp.is_none() || stamp(&path) != last.stamp {
                    apply(&path, &mut last, &core).await;
                }
            }
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
