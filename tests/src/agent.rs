//! An agent a test starts: its admin server (bound to port 0, its address read
//! from a file), a temporary directory, the file-source agent fixture.

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{Bpffs, Cgroup, Proc, audit, sockmesh_bin, unique, wait_until};

/// The admin server of an agent a test starts: the agent binds 127.0.0.1:0 and
/// writes the address it got to a file (`--admin-address-file`), so no port is ever
/// guessed.
pub struct Admin {
    file: PathBuf,
    addr: std::cell::OnceCell<std::net::SocketAddr>,
}

impl Admin {
    /// An admin server whose address will be written to `dir/admin.addr`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            file: dir.join(unique("admin-")),
            addr: std::cell::OnceCell::new(),
        }
    }

    /// The agent flags.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--admin".into(),
            "127.0.0.1:0".into(),
            "--admin-address-file".into(),
            self.file.clone().into(),
        ]
    }

    /// Where the agent's log goes: a file beside the address file (its tail is in
    /// the message when the admin server never comes up), or the test's own stderr
    /// with `SM_AGENT_STDERR=1`.
    pub fn log(&self) -> Stdio {
        if std::env::var_os("SM_AGENT_STDERR").is_some() {
            return Stdio::inherit();
        }
        fs::File::create(self.log_path()).map_or_else(|_| Stdio::null(), Stdio::from)
    }

    fn log_path(&self) -> PathBuf {
        self.file.with_extension("log")
    }

    /// Everything the agent logged so far (empty with `SM_AGENT_STDERR=1`).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last lines the agent logged (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The bound address, once the agent has written it.
    pub fn addr(&self) -> std::net::SocketAddr {
        *self.addr.get_or_init(|| {
            wait_until(
                "the admin server's address",
                // The agent writes it after the verifier has checked its programs:
                // under the CI's single-CPU TCG VM with traffic running that took
                // over 200 s (the migration test, 2026-12-02).
                Duration::from_secs(40),
                || {
                    fs::read_to_string(&self.file)
                        .map_err(|e| format!("{e}; the agent's log ends:\n{}", self.log_tail()))
                        .and_then(|t| {
                            t.trim()
                                .parse::<std::net::SocketAddr>()
                                .map_err(|e| e.to_string())
                        })
                },
            )
        })
    }

    /// `GET path`: (status, body); status 0 if nothing answered.
    pub fn get(&self, path: &str) -> (u16, String) {
        sockmesh::admin::get(self.addr(), path).unwrap_or((0, String::new()))
    }

    /// `/config_dump` as JSON (`Null` if the agent did not answer).
    pub fn dump(&self) -> serde_json::Value {
        let (_, body) = self.get("/config_dump");
        serde_json::from_str(&body).unwrap_or_default()
    }

    /// The value of one series of `/metrics`, by its exact name and labels, e.g.
    /// `sockmesh_services` or `sockmesh_xds_updates_total{type="eds",result="rejected"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics");
        body.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
    }
}

/// A temporary directory, removed with its contents on drop (also when a test
/// fails).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(unique(prefix));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `sockmesh agent --xds file://…` on a file of its own, with its own cgroup,
/// bpffs directory and admin server (port 0). Drop ends the agent first, then
/// removes the cgroup, the pins and the directory.
pub struct FileAgent {
    pub agent: Proc,
    pub admin: Admin,
    /// The configuration file the agent watches.
    pub file: PathBuf,
    pub cgroup: Cgroup,
    pub bpffs: Bpffs,
    pub dir: TempDir,
}

impl FileAgent {
    /// Writes `text` to `FILE_NAME` in a new directory and starts the agent on it,
    /// with `extra` flags.
    pub fn start(file_name: &str, text: &str, extra: &[&str]) -> Self {
        Self::start_with(&sockmesh_bin(), file_name, text, extra)
    }

    /// [`Self::start`] with the agent binary `bin` (a benchmark's release build).
    pub fn start_with(bin: &Path, file_name: &str, text: &str, extra: &[&str]) -> Self {
        let dir = TempDir::new("sockmesh-file-agent-");
        let file = dir.0.join(file_name);
        fs::write(&file, text).expect("write the configuration file");
        let cgroup = Cgroup::new();
        let bpffs = Bpffs::new();
        let admin = Admin::in_dir(&dir.0);
        let agent = agent_command(bin, &cgroup, &bpffs)
            .arg("--xds")
            .arg(format!("file://{}", file.display()))
            .args(admin.args())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(admin.log())
            .spawn()
            .expect("agent");
        Self {
            agent: Proc(agent),
            admin,
            file,
            cgroup,
            bpffs,
            dir,
        }
    }

    /// Replaces the file as an editor or a ConfigMap update does: a new file
    /// renamed over the old.
    pub fn replace(&self, text: &str) {
        let tmp = self.file.with_extension("tmp");
        fs::write(&tmp, text).expect("write");
        fs::rename(&tmp, &self.file).expect("rename");
    }

    /// The leak audit of this agent's pins and state.
    pub fn audit(&self) -> audit::Audit<'_> {
        audit::Audit::agent(&self.bpffs.0, &self.admin)
    }

    /// Ends a scenario: the configuration emptied (`resources: []`), then
    /// nothing may be left of it in the maps or the agent's state.
    pub fn clear_and_audit(&self) {
        self.replace("resources: []\n");
        self.audit()
            .assert_empty("the end, with the configuration emptied");
    }
}

/// `sockmesh agent --cgroup … --bpffs …` for `bin`; callers add the source and
/// whatever else they test. The test control planes listen on loopback without
/// TLS, which the agent refuses unless allowed: the environment variable allows
/// it (an older release, which has no such flag, ignores it); `xds_tls` tests the
/// secured connection and the refusal.
pub fn agent_command(bin: impl AsRef<OsStr>, cgroup: &Cgroup, bpffs: &Bpffs) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env("SOCKMESH_ALLOW_PLAINTEXT_XDS", "true");
    cmd.arg("agent")
        .arg("--cgroup")
        .arg(&cgroup.0)
        .arg("--bpffs")
        .arg(&bpffs.0);
    cmd
}
