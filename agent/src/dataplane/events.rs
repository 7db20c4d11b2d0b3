//! The kernel programs' events for the agent (`SM_EVENTS`, a ring buffer): each
//! ejection sock_ops makes. The datapath task rewrites the ejecting service's
//! levels' choice table on each (see `MapWriter::refresh_levels`), so a level
//! whose hosts are ejected spills to the next within the time of one map write.

use std::os::fd::AsFd as _;

use aya::maps::{MapData, RingBuf};
use sockmesh_common::{Event, ServiceKey, event};
use tracing::warn;

/// The ring buffer, read by its own thread.
pub struct Events(RingBuf<MapData>);

impl Events {
    pub fn new(ring: RingBuf<MapData>) -> Self {
        Self(ring)
    }

    /// Waits for events and hands each ejection's service to `ejected`, until it
    /// returns false (the datapath task is gone). Wakes at least once a second.
    pub fn run(mut self, mut ejected: impl FnMut(ServiceKey) -> bool) {
        loop {
            while let Some(item) = self.0.next() {
                if item.len() < std::mem::size_of::<Event>() {
                    continue;
                }
                // SAFETY: the item holds at least an `Event`'s bytes, written by
                // the kernel programs from an `Event`; every bit pattern is one
                // (plain integers), and the read is unaligned-safe.
                let e: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                if e.kind == event::EJECTED && !ejected(e.service) {
                    return;
                }
            }
            let fd = self.0.as_fd();
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    warn!(error = %e, "polling the kernel events failed; levels follow ejections once a second");
                    return;
                }
            }
        }
    }
}
