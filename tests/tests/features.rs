//! The kernel feature probes the agent runs at start (`dataplane::features`),
//! on the kernel this suite runs on (the host's, and 6.1 in the VM run): all of
//! them find what the datapath needs, and a probe tells a missing attach point
//! from a present one, so a kernel without it would be refused by name.

use sockmesh::dataplane::features;
use sockmesh_common::hooks::{self, HOOKS, ProgramType};

#[test]
fn every_probe_passes_here_and_an_unknown_attach_point_is_missing() {
    features::probe().expect("this kernel has everything the datapath needs");
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
