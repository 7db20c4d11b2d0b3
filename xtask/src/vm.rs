//! Runs a command as root in a VM booted with a Debian kernel package (by default
//! Debian 12's newest 6.1), so that the namespace suite covers that kernel and a pure
//! cgroup v2 layout as well as the host's. The model is aya's `xtask/src/run.rs`.
//!
//! [`setup`] installs qemu, busybox and kmod, downloads the kernel .deb (it is not
//! installed on the host), extracts it under `target/vm/<package>/`, runs depmod
//! there and decompresses the kernel once: qemu boots that ELF `vmlinux` through its
//! PVH entry, which saves the ~4 s the bzImage spends decompressing itself under TCG.
//!
//! [`run`] writes an initramfs ([`guest`]) and boots it. The guest sees the host's `/`
//! read-only over virtio-9p under a tmpfs overlay, with its own /proc, /sys, /dev,
//! /run and /tmp, cgroup2 alone at /sys/fs/cgroup, no bpffs (the agent mounts it), and
//! no network device but lo. The command's stdout, stderr and exit status come back
//! over virtio-serial ports; the guest's console goes to a log, shown on failure.
//! `vm/init.sh` is the guest's side.

mod guest;

use std::{
    fs::{self, File},
    io::{self, BufRead as _, BufReader, Read as _, Write},
    os::unix::{
        net::{UnixListener, UnixStream},
        process::ExitStatusExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

/// Host packages: qemu; the guest's shell and tools (static busybox); depmod for the
/// extracted modules and modprobe for the guest's module autoloading; xz for the
/// kernel image; objcopy to strip what is copied in.
const APT_PACKAGES: [&str; 5] = [
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "xz-utils",
    "binutils",
];
/// Names another kernel package than Debian 12's newest `linux-image-6.1.0-N-amd64`.
const KERNEL_ENV: &str = "SOCKMESH_VM_KERNEL";
/// Forces `kvm` or `tcg` instead of detecting.
const ACCEL_ENV: &str = "SOCKMESH_VM_ACCEL";
/// Added to the kernel command line (`loglevel=7` shows the boot and init's steps in
/// the console log printed on failure).
const APPEND_ENV: &str = "SOCKMESH_VM_APPEND";
/// Guest memory. Copied-in binaries and the overlay's upper layer live in it.
const MEMORY_MIB: u32 = 2048;
/// The virtio-serial ports, each backed by a Unix socket qemu connects to.
const PORTS: [&str; 3] = ["out", "err", "status"];

/// What to run in the guest.
pub struct Job {
    /// Program and arguments, run as root in the host's current directory.
    pub cmd: Vec<String>,
    /// Added to a clean environment (PATH, HOME, LANG, `SOCKMESH_TEST_TIME_SCALE`,
    /// `SOCKMESH_TEST_KERNEL`), overriding it.
    pub env: Vec<(String, String)>,
    /// Host files copied into the guest's tmpfs at their own path before the command
    /// starts (ELF files without debug info): what the command runs or reads often
    /// should not cross 9p, ~95× slower to open under TCG.
    pub copy_in: Vec<PathBuf>,
    /// qemu is killed after this long.
    pub timeout: Duration,
}

/// Arguments of `cargo xtask vm`.
#[derive(clap::Args)]
pub struct Args {
    /// Copy this host file into the guest's tmpfs at the same path first (repeatable).
    /// The command's program is copied when it is given as a path.
    #[arg(long = "copy", value_name = "PATH")]
    copy: Vec<PathBuf>,
    /// Set this variable for the command (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Kill the VM after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String)> {
    let (k, v) = s.split_once('=').context("expected KEY=VALUE")?;
    Ok((k.to_owned(), v.to_owned()))
}

/// `cargo xtask vm [--copy PATH] [--env K=V] [--timeout S] -- CMD...`: prepares the
/// kernel if none is, and runs CMD in the VM.
pub fn main(args: Args) -> Result<()> {
    if Kernel::current().is_err() {
        setup()?;
    }
    let mut copy_in = args.copy;
    if let Some(program) = args.cmd.first().map(PathBuf::from)
        && program.components().count() > 1
        && program.is_file()
    {
        copy_in.push(program);
    }
    let status = run(&Job {
        cmd: args.cmd,
        env: args.env,
        copy_in,
        timeout: Duration::from_secs(args.timeout),
    })?;
    ensure!(status.success(), "the command failed in the VM: {status}");
    Ok(())
}

fn vm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/vm")
}

/// Installs the host packages, fetches and prepares the kernel package; idempotent,
/// and a matter of seconds once `target/vm/<package>/` is complete.
pub fn setup() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .into_iter()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        sh(Command::new("apt-get").args(["update", "-qq"]))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let package = match std::env::var(KERNEL_ENV) {
        Ok(package) => package,
        Err(_) => newest_6_1()?,
    };
    fs::create_dir_all(vm_dir()).context("creating target/vm")?;
    let dir = vm_dir().canonicalize()?.join(&package);
    if !dir.join("complete").exists() {
        prepare_kernel(&package, &dir)?;
    }
    fs::write(vm_dir().join("current"), &package).context("writing target/vm/current")?;
    eprintln!("vm: kernel package {package} ready");
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// The newest `linux-image-6.1.0-N-amd64` apt can install, after an `apt-get update`
/// if it knows none.
fn newest_6_1() -> Result<String> {
    for attempt in 0..2 {
        if attempt == 1 {
            sh(Command::new("apt-get").args(["update", "-qq"]))?;
        }
        let out = output(Command::new("apt-cache").args(["pkgnames", "linux-image-6.1.0-"]))?;
        let mut names: Vec<(u32, &str)> = out
            .lines()
            .filter_map(|name| {
                let abi = name
                    .strip_prefix("linux-image-6.1.0-")?
                    .strip_suffix("-amd64")?;
                Some((abi.parse().ok()?, name))
            })
            .collect();
        names.sort_unstable();
        if let Some((_, name)) = names.into_iter().rev().find(|(_, n)| has_candidate(n)) {
            return Ok(name.to_owned());
        }
    }
    bail!("apt knows no linux-image-6.1.0-*-amd64 package (is Debian 12 in the sources?)")
}

fn has_candidate(package: &str) -> bool {
    output(Command::new("apt-cache").args(["policy", package])).is_ok_and(|policy| {
        policy.lines().any(|l| {
            l.trim()
                .strip_prefix("Candidate:")
                .is_some_and(|c| c.trim() != "(none)")
        })
    })
}

/// Downloads and extracts the package into `dir/root`, runs depmod, decompresses the
/// kernel into `dir/vmlinux`; `dir/complete` marks the end.
fn prepare_kernel(package: &str, dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir)?;
    sh(Command::new("apt-get")
        // As root, apt would try (and warn that it fails) to drop to its _apt user.
        .args(["download", "-qq", "-o", "APT::Sandbox::User=root", package])
        .current_dir(dir))?;
    let deb = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let root = dir.join("root");
    sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    fs::remove_file(&deb)?;
    let version = Kernel::version_in(&root)?;
    sh(Command::new("depmod").arg("-b").arg(&root).arg(&version))?;
    let bzimage = root.join(format!("boot/vmlinuz-{version}"));
    extract_vmlinux(&bzimage, &dir.join("vmlinux"))?;
    fs::write(dir.join("complete"), "")?;
    Ok(())
}

/// Writes the ELF kernel a bzImage carries (Documentation/arch/x86/boot.rst: the
/// payload is `payload_length` bytes at `payload_offset` past the setup sectors, and
/// ends with its uncompressed size, 4 bytes little-endian).
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<()> {
    let image = fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    let u32_at = |at: usize| -> Result<usize> {
        let bytes = image.get(at..at + 4).context("bzImage header truncated")?;
        Ok(usize::try_from(u32::from_le_bytes(bytes.try_into()?))?)
    };
    ensure!(
        image.get(0x202..0x206) == Some(b"HdrS"),
        "{} is no bzImage",
        bzimage.display()
    );
    let setup_sects = match image.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => usize::from(n),
        None => bail!("bzImage header truncated"),
    };
    let (start, len) = ((setup_sects + 1) * 512 + u32_at(0x248)?, u32_at(0x24c)?);
    let payload = image
        .get(start..start + len)
        .context("bzImage payload out of bounds")?;
    let (compressed, size) = payload.split_at(len.checked_sub(4).context("empty payload")?);
    let tool = match compressed {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => "xz",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        [0x1f, 0x8b, ..] => "gzip",
        _ => bail!("{}: unsupported kernel compression", bzimage.display()),
    };
    let packed = out.with_extension("packed");
    fs::write(&packed, compressed)?;
    let unpacked = out.with_extension("tmp");
    sh(Command::new(tool)
        .arg("-dc")
        .stdin(File::open(&packed)?)
        .stdout(File::create(&unpacked)?))?;
    fs::remove_file(&packed)?;
    ensure!(
        u64::from(u32::from_le_bytes(size.try_into()?)) == fs::metadata(&unpacked)?.len(),
        "the decompressed kernel has the wrong size"
    );
    fs::rename(&unpacked, out)?;
    Ok(())
}

/// A prepared kernel under `target/vm/<package>/`.
struct Kernel {
    dir: PathBuf,
    version: String,
}

impl Kernel {
    /// The one the last [`setup`] prepared.
    fn current() -> Result<Self> {
        let package = fs::read_to_string(vm_dir().join("current"))
            .context("no VM kernel prepared: run `cargo xtask setup` first")?;
        let dir = vm_dir().canonicalize()?.join(package.trim());
        ensure!(
            dir.join("complete").exists(),
            "{} is incomplete",
            dir.display()
        );
        let version = Self::version_in(&dir.join("root"))?;
        Ok(Kernel { dir, version })
    }

    fn version_in(root: &Path) -> Result<String> {
        let mut versions = fs::read_dir(root.join("lib/modules"))
            .context("the kernel package has no lib/modules")?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok());
        match (versions.next(), versions.next()) {
            (Some(version), None) => Ok(version),
            _ => bail!("expected one directory in {}/lib/modules", root.display()),
        }
    }

    fn modules(&self) -> PathBuf {
        self.dir.join("root/lib/modules").join(&self.version)
    }
}

#[derive(Clone, Copy, Debug)]
enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM where it is the real thing (kvm_intel or kvm_amd); TCG otherwise, also
    /// under kvm_pvm, which runs only PVM-aware guests (a stock kernel hangs at boot).
    fn detect() -> Result<Self> {
        match std::env::var(ACCEL_ENV).as_deref() {
            Ok("kvm") => return Ok(Accel::Kvm),
            Ok("tcg") => return Ok(Accel::Tcg),
            Ok(other) => bail!("{ACCEL_ENV}={other}: expected kvm or tcg"),
            Err(_) => {}
        }
        let module = |m: &str| Path::new("/sys/module").join(m).exists();
        let usable = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let real = !module("kvm_pvm") && (module("kvm_intel") || module("kvm_amd"));
        Ok(if usable && real {
            Accel::Kvm
        } else {
            Accel::Tcg
        })
    }

    fn qemu_args(self) -> [&'static str; 6] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host", "-smp", "2"],
            Accel::Tcg => ["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"],
        }
    }

    /// `SOCKMESH_TEST_TIME_SCALE`: what the suite multiplies its deadlines by. TCG runs
    /// CPU work ~7.5× slower than the host.
    fn time_scale(self) -> &'static str {
        match self {
            Accel::Kvm => "2",
            Accel::Tcg => "10",
        }
    }
}

/// The run's directory (sockets, initramfs, staged files, logs), deleted when dropped.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Kills qemu (SIGKILL to its PID) if it is still running when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// What the guest's init reported on the status port.
#[derive(Default)]
struct Report {
    /// When the command started, since qemu did.
    started: Option<Duration>,
    exit: Option<i32>,
    error: Option<String>,
}

/// Boots the guest, runs the job, streams its output to this process's stdout and
/// stderr, and returns its exit status once the guest has powered off.
pub fn run(job: &Job) -> Result<ExitStatus> {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let kernel = Kernel::current()?;
    let accel = Accel::detect()?;
    let name = format!(
        "sockmesh-vm.{}.{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    );
    let dir = RunDir(std::env::temp_dir().join(name));
    let _ = fs::remove_dir_all(&dir.0);
    fs::create_dir_all(&dir.0)?;
    let job_script = guest::job_script(&kernel, job, accel, &dir.0.join("stage"))?;
    fs::write(
        dir.0.join("initrd"),
        guest::initramfs(&kernel, &job_script)?,
    )?;
    let (console, qemu_log) = (dir.0.join("console.log"), dir.0.join("qemu.log"));
    let listeners = PORTS
        .iter()
        .map(|port| {
            let listener = UnixListener::bind(dir.0.join(port))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .collect::<io::Result<Vec<_>>>()?;

    let started = Instant::now();
    eprintln!("vm: booting {} ({accel:?})", kernel.version);
    let mut qemu = Qemu(
        qemu_command(&kernel, accel, &dir.0)?
            .spawn()
            .context("spawning qemu-system-x86_64")?,
    );
    let streams = accept_ports(&listeners, &mut qemu, &qemu_log)?;
    let [out, err, status] = <[UnixStream; 3]>::try_from(streams)
        .map_err(|_| anyhow!("expected {} ports", PORTS.len()))?;
    let pumps = [pump(out, io::stdout), pump(err, io::stderr)];
    let reporter = thread::spawn(move || read_report(status, started));

    let exited = loop {
        if let Some(status) = qemu.0.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > job.timeout {
            qemu.0.kill().context("killing qemu")?;
            qemu.0.wait()?;
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    for pump in pumps {
        pump.join()
            .map_err(|_| anyhow!("an output thread panicked"))?
            .context("copying the guest's output")?;
    }
    let report = reporter
        .join()
        .map_err(|_| anyhow!("the status thread panicked"))?;
    let Some(qemu_status) = exited else {
        bail!(
            "vm: timed out after {:?}, qemu killed{}",
            job.timeout,
            tail("guest console", &console)
        );
    };
    if let Some(error) = report.error {
        bail!(
            "vm: guest init failed: {error}{}",
            tail("guest console", &console)
        );
    }
    let Some(code) = report.exit else {
        bail!(
            "vm: the guest stopped ({qemu_status}) without an exit status{}{}",
            tail("guest console", &console),
            tail("qemu", &qemu_log)
        );
    };
    if code != 0 {
        eprint!("{}", tail("guest console", &console));
    }
    eprintln!(
        "vm: exit status {code}; booted in {:.1} s, {:.1} s in all",
        report.started.unwrap_or_default().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitStatus::from_raw((code & 0xff) << 8))
}

fn qemu_command(kernel: &Kernel, accel: Accel, dir: &Path) -> Result<Command> {
    let dir_str = utf8(dir)?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-nodefaults", "-no-user-config", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none", "-nic", "none"])
        .args(accel.qemu_args())
        .args(["-m", &MEMORY_MIB.to_string()])
        .arg("-kernel")
        .arg(kernel.dir.join("vmlinux"))
        .args(["-initrd", &format!("{dir_str}/initrd")])
        .arg("-append")
        // A soft lockup panics (and so stops the guest at once, its stack in the
        // console log: `loglevel=5` prints warnings) instead of hanging the run
        // until its timeout.
        .arg(format!(
            "console=ttyS0 quiet loglevel=5 softlockup_panic=1 panic=-1 rdinit=/init {}",
            std::env::var(APPEND_ENV).unwrap_or_default()
        ))
        .args(["-serial", &format!("file:{dir_str}/console.log")])
        .args([
            "-fsdev",
            "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
        ])
        .args(["-device", "virtio-9p-pci,fsdev=root,mount_tag=hostroot"])
        .args(["-device", "virtio-serial-pci"]);
    for port in PORTS {
        qemu.args([
            "-chardev",
            &format!("socket,id={port},path={dir_str}/{port}"),
        ])
        .args([
            "-device",
            &format!("virtserialport,chardev={port},name={port}"),
        ]);
    }
    let log = File::create(dir.join("qemu.log"))?;
    qemu.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(qemu)
}

/// The ports' connections, in [`PORTS`] order; qemu makes them as it starts.
fn accept_ports(
    listeners: &[UnixListener],
    qemu: &mut Qemu,
    qemu_log: &Path,
) -> Result<Vec<UnixStream>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut streams = Vec::new();
    for listener in listeners {
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    streams.push(stream);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("accepting qemu's port connection"),
            }
            if let Some(status) = qemu.0.try_wait()? {
                bail!("qemu exited ({status}) at start{}", tail("qemu", qemu_log));
            }
            ensure!(Instant::now() < deadline, "qemu did not connect its ports");
            thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(streams)
}

/// Copies a port to one of this process's outputs as it arrives.
fn pump<W: Write + 'static>(mut from: UnixStream, to: fn() -> W) -> JoinHandle<io::Result<()>> {
    thread::spawn(move || {
        let mut buf = [0; 16 * 1024];
        loop {
            let n = from.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            let mut to = to();
            to.write_all(&buf[..n])?;
            to.flush()?;
        }
    })
}

/// Reads `started <uptime>`, `exit <status>` or `error <message>` lines until qemu
/// exits.
fn read_report(status: UnixStream, started: Instant) -> Report {
    let mut report = Report::default();
    for line in BufReader::new(status).lines() {
        let Ok(line) = line else { break };
        if let Some(uptime) = line.strip_prefix("started ") {
            let boot = started.elapsed();
            eprintln!(
                "vm: command started {:.1} s after qemu (guest uptime {uptime} s)",
                boot.as_secs_f64()
            );
            report.started = Some(boot);
        } else if let Some(code) = line.strip_prefix("exit ") {
            report.exit = code.trim().parse().ok();
        } else if let Some(error) = line.strip_prefix("error ") {
            report.error = Some(error.to_owned());
        }
    }
    report
}

/// The last lines of a log under a heading, or nothing if it is empty.
fn tail(what: &str, path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let last = &lines[lines.len().saturating_sub(80)..];
    format!("\n--- {what}:\n{}\n", last.join("\n"))
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

fn sh(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
