//! Building `sockmesh-istiod` (`tests/istiod`, Go) once per machine.
//!
//! Standard library only: `xtask` includes this file too (`#[path]`), so `./x
//! test` builds the harness before it takes the privileged lock, and a test run
//! by hand (`cargo test --test istiod_sync`) finds or builds it the same way.
//!
//! The binary is kept in the user's cache, `~/.cache/sockmesh/istiod-<key>/`
//! (or `$XDG_CACHE_HOME`), where `<key>` is a hash of the harness's sources
//! (`go.mod`, `go.sum`, `*.go`): a checkout with the same sources reuses it, an
//! edited one builds its own, never a stale one. Go's own build cache
//! (`~/.cache/go-build`, Go's default) makes a rebuild after an edit take
//! seconds; from an empty one the build compiles most of Istio and client-go:
//! 4.5–6 minutes on 2 cores (6 min 08 s wall measured with other work running).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

/// Where the harness's sources live, relative to the workspace root.
pub const SOURCE_DIR: &str = "tests/istiod";
/// The binary's name.
pub const BINARY: &str = "sockmesh-istiod";
/// Where Go is looked for when `go` is not on `PATH` (the official tarball's place).
pub const GO_FALLBACK: &str = "/usr/local/go/bin/go";

/// The harness's sources, sorted: `go.mod`, `go.sum` and every `*.go` file.
fn sources(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| n == "go.mod" || n == "go.sum" || n.ends_with(".go"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no Go sources in {}", dir.display()));
    }
    Ok(files)
}

/// FNV-1a, 64 bits, over each source's name, length and bytes: a cache key that
/// is the same on every machine and Rust release (std's hasher promises neither).
fn source_key(dir: &Path) -> Result<String, String> {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    };
    for file in sources(dir)? {
        let text = fs::read(&file).map_err(|e| format!("reading {}: {e}", file.display()))?;
        eat(file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .as_bytes());
        eat(&u64::try_from(text.len()).unwrap_or(u64::MAX).to_le_bytes());
        eat(&text);
    }
    Ok(format!("{h:016x}"))
}

/// The user's cache directory for sockmesh.
fn cache_dir() -> Result<PathBuf, String> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("sockmesh"))
        .ok_or_else(|| "neither XDG_CACHE_HOME nor HOME is set: no cache directory".to_owned())
}

/// The `go` command: on `PATH`, else [`GO_FALLBACK`].
fn go() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("go"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from(GO_FALLBACK))
}

/// What [`harness`] found or did.
pub struct Harness {
    pub binary: PathBuf,
    /// How long the build took; `None` when the cached binary was current.
    pub built_in: Option<std::time::Duration>,
}

/// The `sockmesh-istiod` binary for the sources under `workspace`, built if the
/// cache does not hold one for them. Fails (never skips) with the exact command
/// and error when Go is missing or the build fails.
pub fn harness(workspace: &Path) -> Result<Harness, String> {
    let src = workspace.join(SOURCE_DIR);
    let key = source_key(&src)?;
    let dir = cache_dir()?.join(format!("istiod-{key}"));
    let binary = dir.join(BINARY);
    if binary.is_file() {
        return Ok(Harness {
            binary,
            built_in: None,
        });
    }
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    // Written beside the final name and renamed: a concurrent build (another
    // checkout) or an interrupted one never leaves a half-written binary there.
    let tmp = dir.join(format!("{BINARY}.tmp{}", std::process::id()));
    let go = go();
    let mut cmd = Command::new(&go);
    cmd.args(["build", "-o"])
        .arg(&tmp)
        .arg(".")
        .current_dir(&src)
        // The sources are inside a git checkout (perhaps a worktree): Go must not
        // ask git to stamp the binary.
        .env(
            "GOFLAGS",
            format!(
                "{} -buildvcs=false",
                std::env::var("GOFLAGS").unwrap_or_default()
            )
            .trim(),
        );
    let shown = format!(
        "cd {} && GOFLAGS=-buildvcs=false {} build -o {} .",
        src.display(),
        go.display(),
        tmp.display()
    );
    let started = Instant::now();
    let out = cmd.output().map_err(|e| {
        format!(
            "the live-istiod suite needs Go (1.26, https://go.dev/dl/) to build {BINARY}: `{shown}` \
             could not start: {e} (looked for `go` on PATH and at {GO_FALLBACK})"
        )
    })?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(format!(
            "building {BINARY} failed ({}): `{shown}`:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    fs::rename(&tmp, &binary).map_err(|e| format!("renaming to {}: {e}", binary.display()))?;
    Ok(Harness {
        binary,
        built_in: Some(started.elapsed()),
    })
}
