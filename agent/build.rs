//! Builds the kernel programs (`ebpf/programs`) for `bpfel-unknown-none` with the
//! toolchain pinned in `rust-toolchain.toml`; the object lands in `OUT_DIR` and is
//! embedded in the agent with `include_bytes_aligned!`.

use std::{fs, path::Path};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.join("..");
    let toolchain_file = root.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", toolchain_file.display());
    println!(
        "cargo::rerun-if-changed={}",
        root.join("ebpf/common/src").display()
    );
    let toolchain = pinned_channel(&toolchain_file)?;

    // `-Z build-std=core` is needed for bpfel-unknown-none; aya-build passes it only
    // when RUSTC_BOOTSTRAP is exactly "1". Set here, it reaches only the nested cargo.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };

    share_kernel_build_dir()?;

    let programs = root.join("ebpf/programs");
    let programs = programs
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", programs.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "sockmesh-ebpf",
            root_dir: programs,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .context(
        "building the eBPF programs (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )
}

/// aya-build builds the kernel crate in `OUT_DIR/aya-build/target/sockmesh-ebpf`,
/// and `OUT_DIR` differs between `cargo clippy`, `cargo build` and `cargo test`
/// (and with the `testing` feature): each of them rebuilt the kernel object and
/// `core` from scratch, about 2 minutes apiece on a fresh checkout. One directory
/// per profile of the target dir (`<target>/<profile>/ebpf-build`), linked into
/// each `OUT_DIR`, serves them all (cargo's lock on it serializes concurrent
/// builds).
fn share_kernel_build_dir() -> anyhow::Result<()> {
    let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
    let link = Path::new(&out_dir).join("aya-build/target/sockmesh-ebpf");
    // OUT_DIR is <target dir>/<profile>/build/<package>-<hash>/out: absolute, and
    // cargo's real target dir whatever set it (--target-dir, CARGO_TARGET_DIR,
    // build.target-dir).
    let shared = Path::new(&out_dir)
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "build"))
        .and_then(Path::parent)
        .ok_or_else(|| {
            anyhow!(
                "OUT_DIR {} is not under a build/ dir",
                Path::new(&out_dir).display()
            )
        })?
        .join("ebpf-build");
    fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
    match fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() => {
            if fs::read_link(&link).is_ok_and(|to| to == shared) {
                return Ok(());
            }
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        // A private build dir of an earlier build: replaced by the shared one.
        Ok(_) => {
            fs::remove_dir_all(&link).with_context(|| format!("removing {}", link.display()))?
        }
        Err(_) => {}
    }
    let parent = link
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", link.display()))?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    std::os::unix::fs::symlink(&shared, &link)
        .with_context(|| format!("linking {} to {}", link.display(), shared.display()))
}

/// The `channel = "…"` of rust-toolchain.toml.
fn pinned_channel(path: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .next()
        .ok_or_else(|| anyhow!("no channel in {}", path.display()))
}
