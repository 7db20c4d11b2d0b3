//! What the datapath needs from the kernel, probed before anything is loaded: a
//! kernel that lacks something gets one line naming the feature and the Linux
//! release that added it, instead of a verifier log or an EINVAL from deep inside
//! the loader.
//!
//! The probes ask the kernel itself, as libbpf's and aya's feature probes do
//! (distribution kernels backport features, so a release number decides
//! nothing): every hook's program type and attach type loads a two-instruction
//! program, `bpf_set_retval` is called from a cgroup sock_addr program, and each
//! link command is issued with a descriptor that cannot be open (a known command
//! says EBADF, an unknown one EINVAL). The release table says only what to ask
//! for when something is missing.
//!
//! The oldest kernel this project tests is 6.1 LTS (Debian 12's package, in the CI
//! VM); everything below is older than that.

use std::{fmt, io};

use aya::{programs::ProgramType, sys::BpfHelper};
use aya_obj::generated::bpf_cmd;
use sockmesh_common::hooks::{self, HOOKS};

use super::sys;

/// A kernel release, `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Release(pub u32, pub u32);

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// Each kernel feature the datapath relies on, with the release that added it.
pub const REQUIRED: [(&str, Release); 7] = [
    (
        "cgroup sock_addr programs attached through a bpf_link (BPF_LINK_CREATE)",
        Release(5, 7),
    ),
    (
        "BPF_LINK_UPDATE on cgroup links (a restarted agent swaps its programs in place)",
        Release(5, 7),
    ),
    ("the cgroup getpeername4/6 hooks", Release(5, 8)),
    (
        "BPF_LINK_DETACH (uninstall and layout upgrades detach at once)",
        Release(5, 9),
    ),
    ("the cgroup sock_release hook", Release(5, 9)),
    (
        "the BPF atomic fetch-add (outlier detection and circuit breaking cross a count once; not probed: the verifier refuses the programs without it)",
        Release(5, 12),
    ),
    (
        "bpf_set_retval in cgroup programs (ECONNREFUSED for a service without backends)",
        Release(5, 18),
    ),
];

/// The running kernel's release, from `uname`.
pub fn running() -> Option<Release> {
    parse(&nix::sys::utsname::uname().ok()?.release().to_string_lossy())
}

/// `6.1.0-57-amd64` → 6.1.
fn parse(release: &str) -> Option<Release> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some(Release(major, minor))
}

/// A feature the probes found missing, or a probe that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("this kernel{} lacks {feature}, which Linux {since} added", kernel.map(|k| format!(" ({k})")).unwrap_or_default())]
    Missing {
        kernel: Option<Release>,
        feature: String,
        since: Release,
    },
    #[error("probing the kernel for {feature} failed (the agent needs CAP_BPF, or root)")]
    Probe {
        feature: String,
        #[source]
        source: io::Error,
    },
}

/// The release that added an attach point of the datapath's programs.
fn attach_since(attach_type: u32) -> Release {
    use hooks::attach_type::*;
    match attach_type {
        CGROUP_INET4_CONNECT | CGROUP_INET6_CONNECT => Release(4, 17),
        CGROUP_UDP4_SENDMSG | CGROUP_UDP6_SENDMSG => Release(4, 18),
        CGROUP_UDP4_RECVMSG | CGROUP_UDP6_RECVMSG => Release(5, 2),
        CGROUP_INET4_GETPEERNAME | CGROUP_INET6_GETPEERNAME => Release(5, 8),
        CGROUP_INET_SOCK_RELEASE => Release(5, 9),
        CGROUP_SOCK_OPS => Release(4, 13),
        _ => Release(6, 1),
    }
}

/// What the datapath may use beyond what it requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// `bpf_set_retval` in cgroup programs (5.18): a call to a service without a
    /// backend fails with ECONNREFUSED; without it, with EPERM.
    pub set_retval: bool,
}

impl Default for Features {
    fn default() -> Self {
        Self { set_retval: true }
    }
}

/// `SOCKMESH_FEATURES_OFF=set_retval`: run as if the kernel lacked a feature that
/// degrades, to see (and test) the degraded datapath on a kernel that has it.
const FEATURES_OFF: &str = "SOCKMESH_FEATURES_OFF";

/// Probes everything in [`REQUIRED`] on the running kernel. The first required
/// feature missing is the error; one that degrades (`bpf_set_retval`) is
/// reported with a warning and left out of the returned [`Features`].
pub fn probe() -> Result<Features, FeatureError> {
    let kernel = running();
    let missing = |feature: String, since: Release| FeatureError::Missing {
        kernel,
        feature,
        since,
    };
    let failed = |feature: &str, source: io::Error| FeatureError::Probe {
        feature: feature.to_owned(),
        source,
    };
    for hook in HOOKS {
        let feature = format!("the cgroup {} hook (program {})", hook.attach, hook.program);
        let ok = sys::probe_prog_load(hook.program_type.number(), hook.attach_type)
            .map_err(|e| failed(&feature, e))?;
        if !ok {
            return Err(missing(feature, attach_since(hook.attach_type)));
        }
    }
    for (cmd, feature, since) in [
        (bpf_cmd::BPF_LINK_CREATE, REQUIRED[0].0, REQUIRED[0].1),
        (bpf_cmd::BPF_LINK_UPDATE, REQUIRED[1].0, REQUIRED[1].1),
        (bpf_cmd::BPF_LINK_DETACH, REQUIRED[3].0, REQUIRED[3].1),
    ] {
        if !sys::probe_link_command(cmd).map_err(|e| failed(feature, e))? {
            return Err(missing(feature.to_owned(), since));
        }
    }
    let (feature, since) = REQUIRED[6];
    let off = std::env::var(FEATURES_OFF).unwrap_or_default();
    let forced_off = off.split(',').any(|f| f.trim() == "set_retval");
    let retval = !forced_off
        && aya::sys::is_helper_supported(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_set_retval,
        )
        .map_err(|e| failed(feature, io::Error::other(e)))?;
    if !retval {
        let why = if forced_off {
            format!("{FEATURES_OFF}={off}")
        } else {
            missing(feature.to_owned(), since).to_string()
        };
        tracing::warn!(
            "{why}: calls to a service without a backend fail with EPERM instead of ECONNREFUSED"
        );
    }
    Ok(Features { set_retval: retval })
}

/// Whether this kernel loads a program of `prog_type` for `attach_type` (the
/// probe [`probe`] makes for each hook).
pub fn loads(prog_type: u32, attach_type: u32) -> io::Result<bool> {
    sys::probe_prog_load(prog_type, attach_type)
}

/// The first required feature `kernel` lacks, by release (for messages and
/// documentation; the agent decides by [`probe`]).
pub fn missing(kernel: Release) -> Option<(&'static str, Release)> {
    REQUIRED.into_iter().find(|(_, since)| kernel < *since)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_and_old_kernels_name_what_they_lack() {
        assert_eq!(parse("6.1.0-57-amd64"), Some(Release(6, 1)));
        assert_eq!(parse("6.18.44-fc-v1045"), Some(Release(6, 18)));
        assert_eq!(parse("5.10.0"), Some(Release(5, 10)));
        assert_eq!(parse("garbage"), None);
        assert_eq!(missing(Release(6, 1)), None);
        let (what, since) = missing(Release(5, 15)).expect("5.15 lacks bpf_set_retval");
        assert!(what.contains("bpf_set_retval"), "{what}");
        assert_eq!(since, Release(5, 18));
        assert_eq!(missing(Release(5, 4)).map(|(_, s)| s), Some(Release(5, 7)));
    }
}
