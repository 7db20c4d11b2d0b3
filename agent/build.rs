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
