//! What the VM boots into: the initramfs (busybox, modules, `vm/init.sh`) and the job
//! file that init sources.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    fs::{self, File},
    io::{Read as _, Write as _},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{Accel, Job, Kernel, output, utf8};

/// Loaded by the initramfs, with their dependencies from modules.dep: the virtio
/// transport, the console ports and the 9p root, the overlay, and what every test's
/// namespaces use, and sock_diag's handlers for `--terminate-removed-connections`
/// (autoloading them through modprobe over 9p failed now and then, and the agent
/// then runs without the feature). Anything else (dummy, netfilter, ...) the guest
/// kernel autoloads.
const MODULES: [&str; 10] = [
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "overlay",
    "veth",
    "bridge",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
];
const INIT: &str = include_str!("../../vm/init.sh");
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The initramfs: busybox, the modules and their load order, init and the job.
pub(super) fn initramfs(kernel: &Kernel, job_script: &str) -> Result<Vec<u8>> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "modules"] {
        cpio.entry(dir, 0o040_755, (0, 0), &[])?;
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    cpio.entry("dev/console", 0o020_600, (5, 1), &[])?;
    cpio.file("bin/busybox", 0o755, &fs::read("/bin/busybox")?)?;
    cpio.file("init", 0o755, INIT.as_bytes())?;
    cpio.file("job", 0o644, job_script.as_bytes())?;
    let modules = kernel.modules();
    let mut order = String::new();
    for module in module_order(&modules)? {
        let file = module.rsplit('/').next().unwrap_or(&module);
        let file = format!("{}.ko", file.split(".ko").next().unwrap_or(file));
        let bytes = module_bytes(&modules.join(&module))?;
        cpio.file(&format!("modules/{file}"), 0o644, &bytes)?;
        writeln!(order, "{file}")?;
    }
    cpio.file("modules/order", 0o644, order.as_bytes())?;
    cpio.entry("TRAILER!!!", 0, (0, 0), &[])?;
    Ok(cpio.bytes)
}

/// The files of [`MODULES`] and their dependencies, relative to the modules
/// directory, each after what it needs.
fn module_order(modules: &Path) -> Result<Vec<String>> {
    fn visit<'a>(
        module: &'a str,
        deps: &HashMap<&str, Vec<&'a str>>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if order.iter().any(|m| m == module) {
            return Ok(());
        }
        let needs = deps
            .get(module)
            .with_context(|| format!("{module} is not in modules.dep"))?;
        for &dep in needs {
            visit(dep, deps, order)?;
        }
        order.push(module.to_owned());
        Ok(())
    }

    let read = |name: &str| {
        fs::read_to_string(modules.join(name))
            .with_context(|| format!("reading {}/{name}", modules.display()))
    };
    let name_of = |path: &str| -> String {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let dep_text = read("modules.dep")?;
    let mut deps: HashMap<&str, Vec<&str>> = HashMap::new();
    for line in dep_text.lines() {
        let (module, needs) = line.split_once(':').context("malformed modules.dep")?;
        deps.insert(module, needs.split_whitespace().collect());
    }
    let by_name: HashMap<String, &str> = deps.keys().map(|&p| (name_of(p), p)).collect();
    let builtin: HashSet<String> = read("modules.builtin")?.lines().map(name_of).collect();
    let mut order = Vec::new();
    for name in MODULES.into_iter().filter(|m| !builtin.contains(*m)) {
        let path = by_name
            .get(name)
            .with_context(|| format!("module {name} is neither built in nor in modules.dep"))?;
        visit(path, &deps, &mut order)?;
    }
    Ok(order)
}

/// A module's contents, decompressed: busybox insmod takes plain ELF.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = match name.rsplit_once(".ko") {
        Some((_, "")) => return fs::read(path).with_context(|| format!("reading {name}")),
        Some((_, ".xz")) => "xz",
        Some((_, ".zst")) => "zstd",
        Some((_, ".gz")) => "gzip",
        _ => bail!("unexpected module file {name}"),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("spawning {tool}"))?;
    ensure!(
        out.status.success(),
        "{tool} -dc {name} failed: {}",
        out.status
    );
    Ok(out.stdout)
}

/// A newc cpio archive, the initramfs format
/// (Documentation/driver-api/early-userspace/buffer-format.rst), built in memory.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> Result<()> {
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            u32::try_from(data.len())?,
            0, // device major
            0, // device minor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1)?,
            0, // checksum (unused by newc)
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            write!(self.bytes, "{field:08x}")?;
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.entry(name, 0o100_000 | mode, (0, 0), data)
    }

    fn pad(&mut self) {
        self.bytes.resize(self.bytes.len().next_multiple_of(4), 0);
    }
}

/// Quotes for the guest's shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The job file `vm/init.sh` sources. The files to copy in are staged in `stage`
/// first, ELF files without their debug info (a tenth of a debug build's size;
/// backtraces keep function names, panics their locations).
pub(super) fn job_script(kernel: &Kernel, job: &Job, accel: Accel, stage: &Path) -> Result<String> {
    let cwd = std::env::current_dir()?;
    fs::create_dir_all(stage)?;
    let mut copy_in = Vec::new();
    for (i, path) in job.copy_in.iter().enumerate() {
        let path = cwd.join(path);
        let mut magic = [0; 4];
        File::open(&path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .with_context(|| format!("reading {}", path.display()))?;
        let staged = stage.join(i.to_string());
        if magic == *b"\x7fELF" {
            output(
                Command::new("objcopy")
                    .arg("--strip-debug")
                    .arg(&path)
                    .arg(&staged),
            )?;
        } else {
            fs::copy(&path, &staged)?;
        }
        let path = utf8(&path)?.to_owned();
        ensure!(!path.contains('\n'), "{path:?} contains a newline");
        copy_in.push(path);
    }
    let defaults = [
        ("PATH", PATH),
        ("HOME", "/root"),
        ("LANG", "C.UTF-8"),
        ("SOCKMESH_TEST_TIME_SCALE", accel.time_scale()),
        ("SOCKMESH_TEST_KERNEL", &kernel.version),
    ];
    let env = defaults
        .into_iter()
        .chain(job.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut command = String::from("exec /run/vm/busybox env -i");
    for (key, value) in env {
        let mut chars = key.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
            && chars.all(|c| c == '_' || c.is_ascii_alphanumeric());
        ensure!(valid, "invalid variable name {key:?}");
        write!(command, " {}", quote(&format!("{key}={value}")))?;
    }
    ensure!(!job.cmd.is_empty(), "no command to run");
    for arg in &job.cmd {
        write!(command, " {}", quote(arg))?;
    }
    Ok(format!(
        "VM_MODULES={}\nVM_CWD={}\nVM_STAGE={}\nVM_COPY_IN={}\nvm_command() {{\n    {command}\n}}\n",
        quote(utf8(&kernel.modules())?),
        quote(utf8(&cwd)?),
        quote(utf8(stage)?),
        quote(&copy_in.join("\n")),
    ))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::{Cpio, quote};

    #[test]
    fn quoted_arguments_reach_the_command_unchanged() {
        let arg = "it's a \"test\" $HOME `x` \\ \n end";
        let out = Command::new("/bin/sh")
            .args(["-c", &format!("printf %s {}", quote(arg))])
            .output()
            .expect("sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), arg);
    }

    #[test]
    fn cpio_entries_are_aligned_to_four_bytes() {
        let mut cpio = Cpio::default();
        cpio.file("abc", 0o644, b"12345").expect("entry");
        // 110-byte header, "abc\0" padded to 116, then 5 data bytes padded to 124.
        assert_eq!(cpio.bytes.len(), 124);
        assert_eq!(&cpio.bytes[..6], b"070701");
        assert_eq!(&cpio.bytes[110..114], b"abc\0");
        assert_eq!(&cpio.bytes[116..121], b"12345");
    }
}
