//! Developer tasks: `cargo xtask setup | build | test | bench`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[path = "../../tests/src/istiod_build.rs"]
mod istiod_build;
mod vm;

/// Packages bpf-linker needs to build against Debian's LLVM 22, plus runtime tools.
const APT_PACKAGES: [&str; 8] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "bpftool",
    // The enroll test's sidecar capture (REDIRECT) and kube-proxy stand-in (DNAT),
    // inside its own namespaces.
    "iptables",
    // The manifest checks' and the plots' Python tools go into a venv of the
    // project's (`python`): Debian's own Python refuses `pip install` (PEP 668).
    "python3-venv",
];
/// What the benchmarks compare against and drive: kube-proxy's iptables and
/// nftables datapaths, nginx backends, the wrk HTTP client.
const BENCH_APT_PACKAGES: [&str; 4] = ["iptables", "nftables", "nginx-light", "wrk"];
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (apt packages, rust-src, bpf-linker); idempotent.
    Setup,
    /// Build the kernel object and the agent.
    Build,
    /// Setup, then unit tests, clippy and fmt checks, then the privileged tests.
    Test,
    /// The tour (root): pods in namespaces, the agent on a watched file, scaling.
    Demo,
    /// Benchmarks (root, bounded in time): prints tables, writes target/bench/report.json.
    Bench,
    /// Run a command as root in a VM booted with Debian 12's 6.1 kernel: `vm -- CMD...`.
    Vm(vm::Args),
    /// Only the last step of `test`: the namespace suite in the 6.1 VM.
    VmTest,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => {
            setup()?;
            vm::setup()
        }
        Task::Build => {
            setup()?;
            cargo(&["build", "-p", "sockmesh"])
        }
        Task::Test => test(),
        Task::Bench => bench(),
        Task::Demo => demo(),
        Task::Vm(args) => vm::main(args),
        Task::VmTest => vm_tests(),
    }
}

/// The project's Python (a venv under `target/py`, made on first use) with
/// `modules` installed (`packages`, pinned where it matters, if any is missing).
fn python(modules: &[&str], packages: &[&str]) -> Result<PathBuf> {
    let venv = root().join("target/py");
    let python = venv.join("bin/python");
    let has_pip = |python: &Path| {
        Command::new(python)
            .args(["-m", "pip", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has_pip(&python) {
        // Missing, or left half-made by a failed run (no pip): made afresh.
        run(Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv))?;
    }
    let have = |module: &str| {
        Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !modules.iter().all(|m| have(m)) {
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q"])
            .args(packages))?;
    }
    Ok(python)
}

/// Lints the YAML and validates the Kubernetes manifests against the Kubernetes
/// schemas offline (kubernetes-validate bundles them).
fn check_deploy() -> Result<()> {
    let python = python(
        &["kubernetes_validate", "yamllint"],
        &["kubernetes-validate==1.37.0", "yamllint"],
    )?;
    run(Command::new(&python)
        .args(["-m", "yamllint", "--strict"])
        .arg(root().join("deploy"))
        .arg(root().join("examples")))?;
    let manifests: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .context("reading deploy/kubernetes")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    run(Command::new(&python)
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .args(&manifests))
}

fn demo() -> Result<()> {
    setup()?;
    require_root("the demo")?;
    release_bins()?;
    with_bpffs(|| run(&mut Command::new(root().join("target/release/smdemo"))))
}

fn release_bins() -> Result<()> {
    cargo(&[
        "build",
        "--release",
        "-p",
        "sockmesh",
        "-p",
        "sockmesh-tests",
        "--bins",
    ])
}

/// Runs `f`; unmounts /sys/fs/bpf afterwards if it was not mounted before.
fn with_bpffs(f: impl FnOnce() -> Result<()>) -> Result<()> {
    let mounted_before = bpffs_mounted();
    let result = f();
    if !mounted_before && bpffs_mounted() {
        run(Command::new("umount").arg(BPFFS))?;
    }
    result
}

fn bench() -> Result<()> {
    setup_with(&BENCH_APT_PACKAGES)?;
    let python = python(&["matplotlib"], &["matplotlib"])?;
    require_root("the benchmarks")?;
    release_bins()?;
    istiod_harness()?;
    let report = root().join("target/bench/report.json");
    with_bpffs(|| run(Command::new(root().join("target/release/smbench")).arg(&report)))?;
    // The plot is of the scale scenario's rows: a run of other scenarios alone
    // (`SMBENCH_ONLY`) has none.
    if std::env::var("SMBENCH_ONLY").is_ok_and(|only| !only.split(',').any(|s| s == "scale")) {
        return Ok(());
    }
    run(Command::new(&python)
        .arg(root().join("docs/plot_bench.py"))
        .arg(&report)
        .arg(root().join("target/bench/change-latency.png")))
}

/// Builds the live-istiod suite's `sockmesh-istiod` (Go) unless the user's cache
/// holds one for these sources (see `tests/src/istiod_build.rs`), before the
/// privileged lock is taken: a cold build takes minutes.
fn istiod_harness() -> Result<()> {
    eprintln!(
        "sockmesh-istiod: building {} unless cached (from an empty Go build cache: 4.5-6 min on 2 cores)",
        istiod_build::SOURCE_DIR
    );
    let h = istiod_build::harness(&root()).map_err(anyhow::Error::msg)?;
    match h.built_in {
        Some(t) => eprintln!(
            "sockmesh-istiod: built in {:.0} s: {}",
            t.as_secs_f64(),
            h.binary.display()
        ),
        None => eprintln!("sockmesh-istiod: cached: {}", h.binary.display()),
    }
    Ok(())
}

/// Held while the namespace suite runs on the host (`flock(2)`; `flock(1)` on
/// the same file from a shell takes the same lock).
const PRIVILEGED_LOCK: &str = "/tmp/sockmesh-privileged.lock";

/// Waits for and holds [`PRIVILEGED_LOCK`] until the file is dropped.
fn privileged_lock() -> Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(PRIVILEGED_LOCK)
        .with_context(|| format!("opening {PRIVILEGED_LOCK}"))?;
    // SAFETY: flock(2) on a descriptor this function owns; LOCK_EX (2) blocks.
    if unsafe { libc_flock(file.as_raw_fd(), 2) } != 0 {
        bail!(
            "locking {PRIVILEGED_LOCK}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(file)
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("{what} need root (network namespaces, cgroups, bpf)");
    }
    Ok(())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new("cargo").args(args).current_dir(root()))
}

fn toolchain() -> Result<String> {
    let text = std::fs::read_to_string(root().join("rust-toolchain.toml"))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|r| r.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .next()
        .context("no channel in rust-toolchain.toml")
}

fn setup() -> Result<()> {
    setup_with(&[])
}

fn setup_with(extra: &[&str]) -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .chain(extra)
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let tc = toolchain()?;
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        &tc,
        "--profile",
        "minimal",
        "--component",
        "rust-src,clippy,rustfmt",
    ]))?;
    let have_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !have_linker {
        run(Command::new("cargo")
            .args([
                &format!("+{tc}"),
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                "llvm-22",
                "--locked",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    eprintln!("setup: everything present");
    Ok(())
}

fn test() -> Result<()> {
    setup()?;
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    check_deploy()?;
    cargo(&[
        "test",
        "-p",
        "sockmesh",
        "-p",
        "sockmesh-common",
        "-p",
        "sockmesh-proto",
    ])?;
    require_root("the privileged integration tests")?;
    // The tests run the real `sockmesh` binary; everything is built before the
    // lock is taken.
    cargo(&["build", "-p", "sockmesh"])?;
    cargo(&["test", "-p", "sockmesh-tests", "--tests", "--no-run"])?;
    istiod_harness()?;
    // One privileged suite at a time on a machine: a second run (another
    // checkout, a developer's own test) waits here instead of competing, and the
    // bpffs mount bookkeeping below happens under the same lock.
    eprintln!("waiting for {PRIVILEGED_LOCK} (one privileged suite at a time)");
    let lock = privileged_lock()?;
    // The datapath mounts bpffs at /sys/fs/bpf when it is missing; leave the machine
    // as found: unmount it again if this run mounted it (and nothing else is pinned).
    let mounted_before = bpffs_mounted();
    let host = cargo(&[
        "test",
        "-p",
        "sockmesh-tests",
        "--tests",
        "--",
        "--test-threads=1",
    ]);
    if !mounted_before && bpffs_mounted() {
        run(Command::new("umount").arg(BPFFS))?;
    }
    drop(lock);
    host?;
    vm_tests()
}

/// The namespace suite again, in a VM booted with Debian 12's 6.1 kernel and a pure
/// cgroup v2 layout (see `vm.rs`): the same test binaries, copied into the guest.
fn vm_tests() -> Result<()> {
    vm::setup()?;
    let mut tests = test_executables()?;
    // Tests whose subject is the agent's userspace run on the host only, and this
    // says so on every run.
    tests.retain(|t| {
        let host_only = HOST_ONLY.iter().find(|(name, _)| {
            Path::new(t)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(&format!("{name}-")))
        });
        if let Some((_, why)) = host_only {
            eprintln!("VM run: {t} runs on the host only ({why})");
        }
        host_only.is_none()
    });
    let mut copy_in: Vec<PathBuf> = tests.iter().map(PathBuf::from).collect();
    let debug = root().join("target/debug");
    copy_in.extend([debug.join("smprobe"), debug.join("sockmesh")]);
    // The migration test's previous release, built by the host run.
    // (and its stamp, which says the binary is current: the guest's /tmp is its own,
    // so a checkout under /tmp is not visible there).
    let v1 = root().join("target/layout-v1");
    for f in [v1.join("target/debug/sockmesh"), v1.join("commit")] {
        if f.exists() {
            copy_in.push(f);
        }
    }
    let mut cmd: Vec<String> = [
        "/bin/sh",
        "-c",
        r#"rc=0; for t; do echo "== $t" >&2; "$t" --test-threads=1 || rc=1; done; exit $rc"#,
        "sh",
    ]
    .map(String::from)
    .into();
    cmd.extend(tests);
    let started = std::time::Instant::now();
    let status = vm::run(&vm::Job {
        cmd,
        env: vec![("RUST_BACKTRACE".into(), "1".into())],
        copy_in,
        timeout: std::time::Duration::from_secs(30 * 60),
    })?;
    eprintln!(
        "VM namespace suite: {status} after {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("the namespace tests failed on the VM's kernel: {status}");
    }
    Ok(())
}

/// Namespace tests left out of the VM run: each exercises the agent's userspace
/// (xDS protocols, sources, admin server, control-plane churn), whose kernel side
/// (map writes, pins, redirects) the VM run's other tests cover on 6.1 too. Under TCG
/// every test costs about 10× its host time, and these add 15 minutes to a CI run
/// that must stay under 45. A new test file runs in the VM unless it is listed here.
const HOST_ONLY: [(&str, &str); 14] = [
    (
        "admin",
        "admin server; its kernel reads are the datapath test's",
    ),
    (
        "agent_restart",
        "resync logic; pinned maps and links surviving their loader are the restart test's",
    ),
    (
        "churn",
        "control-plane churn; updates under a connect loop are the balance test's",
    ),
    (
        "conformance",
        "xDS translation of the Istio corpus; no kernel feature of its own",
    ),
    ("dns", "STRICT_DNS resolution in the agent"),
    // The live-istiod suite: istiod_sync runs in the VM too (istiod → agent →
    // the 6.1 kernel, about 100 s under TCG); the others exercise what istiod
    // generates through the agent's userspace, whose kernel side (least
    // connections, Maglev, ejection, circuit breaking, priorities) the VM run's
    // own tests cover, and would add about 15 minutes of TCG.
    (
        "istiod_churn",
        "live istiod: scaling and rolling updates through the agent; the balance and churn tests' kernel side",
    ),
    (
        "istiod_cluster",
        "live istiod: the node identity's effect on what istiod sends",
    ),
    (
        "istiod_locality",
        "live istiod: its locality output through the agent; the priority and locality arithmetic's kernel side is the zones test's",
    ),
    (
        "istiod_policy",
        "live istiod: DestinationRules through the agent; the least_conn, maglev and outlier tests' kernel side",
    ),
    (
        "istiod_stream",
        "live istiod: the ADS stream's reconnects and istiod's restart",
    ),
    ("file_source", "the file source"),
    (
        "lb_shares",
        "Envoy's priority and locality arithmetic against the writer's maps, in memory",
    ),
    ("xds", "ADS delta, SotW and REST protocols"),
    (
        "xds_tls",
        "TLS and token authentication to the control plane",
    ),
];

/// The namespace test binaries (`cargo test --no-run`), built if needed.
fn test_executables() -> Result<Vec<String>> {
    let out = Command::new("cargo")
        .args([
            "test",
            "-p",
            "sockmesh-tests",
            "--tests",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the namespace tests failed");
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe)) = (is_test, msg["executable"].as_str()) {
            tests.push(exe.to_owned());
        }
    }
    if tests.is_empty() {
        bail!("no namespace test binaries found");
    }
    tests.sort();
    Ok(tests)
}

const BPFFS: &str = "/sys/fs/bpf";

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(BPFFS)))
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
    #[link_name = "flock"]
    fn libc_flock(fd: i32, operation: i32) -> i32;
}
