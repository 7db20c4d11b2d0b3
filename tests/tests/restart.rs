//! The datapath outlives its loader: `sockmesh apply --wait` is SIGKILLed, the
//! pinned programs keep redirecting, and a second `sockmesh apply` adopts the pinned
//! maps and links and updates them in place. `sockmesh uninstall` then removes it all.

use std::{fs, process::Command, time::Duration};

use sockmesh_tests::{
    Bpffs, Cgroup, NetNs, TwoPods,
    audit::{Audit, Expect},
    command_in, run, sockmesh_bin, unique, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

fn write_table(backend_last: u8) -> tempfile_path::TempFile {
    let path = std::env::temp_dir().join(unique("sockmesh-table-"));
    let json = format!(
        r#"[{{"vip":"10.96.0.20","port":80,"protocol":"tcp","backends":[{{"address":"10.10.1.{backend_last}","port":8080,"weight":1}}]}}]"#
    );
    fs::write(&path, json).expect("write table");
    tempfile_path::TempFile(path)
}

mod tempfile_path {
    /// A file removed on drop.
    pub struct TempFile(pub std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn sockmesh(cgroup: &Cgroup, bpffs: &Bpffs, table: &std::path::Path) -> Command {
    let mut cmd = Command::new(sockmesh_bin());
    cmd.arg("apply")
        .arg("--cgroup")
        .arg(&cgroup.0)
        .arg("--bpffs")
        .arg(&bpffs.0)
        .arg("--table")
        .arg(table);
    cmd
}

fn reached(client: &NetNs, cgroup: &Cgroup) -> String {
    let mut probe = command_in(client, Some(cgroup), PROBE);
    probe.args(["connect", "10.96.0.20:80", "20"]);
    let out = run(probe);
    let mut names: Vec<&str> = out.lines().filter_map(|l| l.split(' ').nth(2)).collect();
    names.dedup();
    names.join(",")
}

#[test]
fn datapath_survives_sigkill_of_the_loader_and_is_adopted() {
    let pods = TwoPods::serving(PROBE, ["b1", "b2"]);
    let client = &pods.client;
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();

    let first = write_table(11);
    let mut loader = sockmesh(&cgroup, &bpffs, &first.0);
    loader.arg("--wait").stderr(std::process::Stdio::null());
    let mut loader = loader.spawn().expect("start loader");
    wait_until(
        "the loader's table in the kernel",
        Duration::from_secs(10),
        || sockmesh::dataplane::read_table(&bpffs.0).is_ok_and(|t| !t.services.is_empty()),
    );
    assert_eq!(reached(client, &cgroup), "b1");
    let links_before = sockmesh::dataplane::pinned_links(&bpffs.0).expect("pinned links");
    assert_eq!(links_before.len(), sockmesh::dataplane::HOOKS.len());

    // `--wait` kept the loader running until now; it dies without any cleanup.
    assert!(
        loader.try_wait().expect("loader status").is_none(),
        "apply --wait exited on its own"
    );
    loader.kill().expect("SIGKILL loader");
    loader.wait().expect("reap loader");
    assert_eq!(
        reached(client, &cgroup),
        "b1",
        "redirect stopped with the loader"
    );

    let second = write_table(12);
    let out = sockmesh(&cgroup, &bpffs, &second.0)
        .output()
        .expect("second loader");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Adopted: the same kernel links, now running the second loader's programs.
    let links_after = sockmesh::dataplane::pinned_links(&bpffs.0).expect("pinned links");
    for (before, after) in links_before.iter().zip(&links_after) {
        assert_eq!(before.program, after.program);
        assert_eq!(
            before.link_id, after.link_id,
            "{} was re-attached, not adopted",
            after.program
        );
        assert_ne!(
            before.program_id, after.program_id,
            "{} still runs the first loader's program",
            after.program
        );
    }
    assert_eq!(reached(client, &cgroup), "b2");
    // The first loader's backend and the probes' sockets left nothing behind.
    let audit = Audit::kernel(&bpffs.0);
    audit.assert(
        "the second loader's table",
        &Expect::services(1, 1).link_cgroups(1),
    );

    // Naming another cgroup is refused, and nothing is removed.
    let other = Cgroup::new();
    let out = Command::new(sockmesh_bin())
        .arg("uninstall")
        .arg("--bpffs")
        .arg(&bpffs.0)
        .arg("--cgroup")
        .arg(&other.0)
        .output()
        .expect("uninstall");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("attached to another cgroup"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(reached(client, &cgroup), "b2");

    let out = Command::new(sockmesh_bin())
        .arg("uninstall")
        .arg("--bpffs")
        .arg(&bpffs.0)
        .arg("--cgroup")
        .arg(&cgroup.0)
        .output()
        .expect("uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<_> = walk(&bpffs.0);
    assert!(left.is_empty(), "pins left behind: {left:?}");
    audit.assert_empty("uninstalled");
    // Nothing stays attached to the cgroup either.
    let attached = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cgroup.0)
        .output()
        .expect("bpftool");
    let attached = String::from_utf8_lossy(&attached.stdout);
    assert!(!attached.contains("sm_"), "still attached: {attached}");
    // Detached: the VIP is no longer redirected (no default route: unreachable).
    let mut probe = command_in(client, Some(&cgroup), PROBE);
    probe.args(["connect", "10.96.0.20:80", "1"]);
    let out = run(probe);
    assert!(
        out.contains("E101"),
        "still redirected after uninstall: {out}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                let inner = walk(&path);
                if inner.is_empty() {
                    continue;
                }
                found.extend(inner);
            } else {
                found.push(path);
            }
        }
    }
    found
}
