//! The kernel feature probes the agent runs at start (`dataplane::features`),
//! on the kernel this suite runs on (the host's, and 6.1 in the VM run): all of
//! them find what the datapath needs, and a probe tells a missing attach point
//! from a present one, so a kernel without it would be refused by name. The one
//! feature that degrades, `bpf_set_retval` (5.18), is turned off as on an older
//! kernel: the datapath loads without it and refuses with EPERM.

use std::{fs, process::Command};

use sockmesh::dataplane::features;
use sockmesh_common::hooks::{self, HOOKS, ProgramType};
use sockmesh_tests::{
    Bpffs, Cgroup, TempDir, TwoPods,
    audit::{Audit, Expect},
    command_in, run, sockmesh_bin,
};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

#[test]
fn every_probe_passes_here_and_an_unknown_attach_point_is_missing() {
    let found = features::probe().expect("this kernel has everything the datapath needs");
    assert!(found.set_retval, "both kernels CI runs have bpf_set_retval");
    for hook in HOOKS {
        assert_eq!(
            features::loads(hook.program_type.number(), hook.attach_type).ok(),
            Some(true),
            "{}",
            hook.program
        );
    }
    // A sock_addr program for an attach point no kernel has.
    assert_eq!(
        features::loads(ProgramType::CgroupSockAddr.number(), 4096).ok(),
        Some(false)
    );
    // connect4 is not a sock (socket-lifetime) attach point.
    assert_eq!(
        features::loads(
            ProgramType::CgroupSock.number(),
            hooks::attach_type::CGROUP_INET4_CONNECT
        )
        .ok(),
        Some(false)
    );
}

#[test]
fn without_bpf_set_retval_an_empty_service_refuses_with_eperm() {
    let pods = TwoPods::serving(PROBE, ["b1", "b2"]);
    let tmp = TempDir::new("sockmesh-features-");
    let table = tmp.0.join("table.json");
    fs::write(
        &table,
        r#"[{"vip":"10.96.0.30","port":80,"protocol":"tcp","backends":[{"address":"10.10.1.11","port":8080,"weight":1}]},
            {"vip":"10.96.0.31","port":80,"protocol":"tcp","backends":[]}]"#,
    )
    .expect("write table");
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    // `sockmesh apply` of the table file, the helper turned off.
    let apply = || {
        let out = Command::new(sockmesh_bin())
            .env("SOCKMESH_FEATURES_OFF", "set_retval")
            .arg("apply")
            .arg("--cgroup")
            .arg(&cgroup.0)
            .arg("--bpffs")
            .arg(&bpffs.0)
            .arg("--table")
            .arg(&table)
            .output()
            .expect("sockmesh apply");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    apply();
    let peer = |vip: &str| {
        let mut cmd = command_in(&pods.client, Some(&cgroup), PROBE);
        cmd.args(["peer", vip]);
        run(cmd).trim().to_owned()
    };
    // The datapath works without the helper ...
    assert_eq!(peer("10.96.0.30:80"), "10.96.0.30:80 b1");
    // ... and a service without a backend is still refused by the program, with
    // the cgroup hooks' own errno (EPERM) instead of ECONNREFUSED.
    assert_eq!(peer("10.96.0.31:80"), "- E1");
    let audit = Audit::kernel(&bpffs.0);
    audit.assert(
        "two services applied",
        &Expect::services(2, 1).link_cgroups(1),
    );
    // An empty table applied: nothing of either stays.
    fs::write(&table, "[]").expect("write table");
    apply();
    audit.assert("an empty table applied", &Expect::empty().link_cgroups(1));
}

/// The kernel verifies each program within this many processed instructions, a
/// quarter of its limit (1,000,000): room for the programs to grow, and a check
/// that none explodes. Before the ejected-backend search became a subprogram,
/// connect4 took 412,684 on 6.18 (and 1.1 s of start-up for sock_ops alone).
const VERIFIER_BUDGET: u32 = 250_000;

#[test]
fn every_program_verifies_well_within_the_kernel_limit() {
    let cgroup = Cgroup::new();
    let bpffs = Bpffs::new();
    let _dp = sockmesh_tests::install(&cgroup, &bpffs);
    // A fresh install holds nothing but its links.
    Audit::kernel(&bpffs.0).assert("installed", &Expect::empty().link_cgroups(1));
    let work = sockmesh::dataplane::attached_program_work(&cgroup.0).expect("query");
    assert_eq!(work.len(), HOOKS.len(), "{work:?}");
    for (name, instructions) in &work {
        // Both kernels CI runs report it (5.16 and later).
        let instructions = instructions.unwrap_or_else(|| panic!("{name}: no verifier count"));
        assert!(
            instructions < VERIFIER_BUDGET,
            "{name}: the verifier processed {instructions} instructions (budget {VERIFIER_BUDGET}): {work:?}"
        );
    }
    eprintln!("verifier work: {work:?}");
}
