//! The previous release of the layout-migration test, built once per machine
//! from git.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

/// The last commit whose agent pins map layout v1 (before `SM_SERVICE_STATS`): the
/// "previous release" of the layout-migration test.
pub const LAYOUT_V1_COMMIT: &str = "5b0917009e2a78ce0bc9eeedcb793d04614a4b43";

/// `sockmesh` as built from [`LAYOUT_V1_COMMIT`], at `target/layout-v1/target/debug/sockmesh`
/// with the commit in `target/layout-v1/commit` (where the VM run finds both).
/// Built once per machine: the source is taken from git (`git archive`) and
/// built with its own target directory in the user's cache
/// (`~/.cache/sockmesh/layout-v1-<commit>`, or `$XDG_CACHE_HOME`), keyed by the
/// commit so never stale; a clean checkout copies the binary from there instead
/// of spending minutes on a build of the old tree.
pub fn layout_v1_bin() -> PathBuf {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned();
    let out = workspace.join("target/layout-v1");
    let out_bin = out.join("target/debug/sockmesh");
    let out_stamp = out.join("commit");
    if built(&out_bin, &out_stamp) {
        return out_bin;
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| out.clone());
    let dir = cache.join(format!("sockmesh/layout-v1-{LAYOUT_V1_COMMIT}"));
    let bin = build_layout_v1(&workspace, &dir);
    fs::create_dir_all(out_bin.parent().expect("bin dir")).expect("create target/layout-v1");
    fs::copy(&bin, &out_bin).expect("copy the layout-v1 agent");
    fs::write(&out_stamp, LAYOUT_V1_COMMIT).expect("stamp");
    out_bin
}

/// Whether `bin` is there and `stamp` says it is the layout-v1 commit's.
fn built(bin: &Path, stamp: &Path) -> bool {
    bin.exists() && fs::read_to_string(stamp).is_ok_and(|c| c == LAYOUT_V1_COMMIT)
}

/// Builds (once: a stamp says it is done) the layout-v1 agent in `dir`.
fn build_layout_v1(workspace: &Path, dir: &Path) -> PathBuf {
    let bin = dir.join("target/debug/sockmesh");
    let stamp = dir.join("commit");
    if built(&bin, &stamp) {
        return bin;
    }
    let src = dir.join("src");
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src).expect("create layout-v1 dir");
    let has_commit = Command::new("git")
        .args(["-C"])
        .arg(workspace)
        .args(["cat-file", "-e", &format!("{LAYOUT_V1_COMMIT}^{{commit}}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_commit,
        "commit {LAYOUT_V1_COMMIT} (the layout-v1 release) is not in this git checkout; \
         the migration test needs the repository's history (not a shallow clone)"
    );
    let tarball = dir.join("src.tar");
    let status = Command::new("git")
        .arg("-C")
        .arg(workspace)
        .args(["archive", "--format=tar", "-o"])
        .arg(&tarball)
        .arg(LAYOUT_V1_COMMIT)
        .status()
        .expect("git archive");
    assert!(status.success(), "git archive {LAYOUT_V1_COMMIT}");
    let status = Command::new("tar")
        .arg("-xf")
        .arg(&tarball)
        .arg("-C")
        .arg(&src)
        .status()
        .expect("tar");
    assert!(status.success(), "extracting {LAYOUT_V1_COMMIT}");
    let out = Command::new("cargo")
        .args(["build", "--locked", "-p", "sockmesh", "--bin", "sockmesh"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        // This test's own toolchain choice must not leak into the old tree's build
        // (it has its own rust-toolchain.toml).
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .output()
        .expect("cargo build of the layout-v1 agent");
    assert!(
        out.status.success(),
        "building the layout-v1 agent failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(&stamp, LAYOUT_V1_COMMIT).expect("stamp");
    bin
}
