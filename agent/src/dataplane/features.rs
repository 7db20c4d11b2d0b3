//! What the datapath needs from the kernel, checked before anything is loaded: an
//! old kernel gets one line naming the feature and the version it needs, instead of
//! a verifier log or an EINVAL from deep inside the loader.
//!
//! The oldest kernel this project tests is 6.1 LTS (Debian 12's package, in the CI
//! VM); everything below is older than that.

use std::fmt;

/// A kernel release, `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Release(pub u32, pub u32);

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// Each kernel feature the datapath relies on, with the release that added it.
pub const REQUIRED: [(&str, Release); 6] = [
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

/// The first required feature `kernel` lacks.
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
