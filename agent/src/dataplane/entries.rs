//! A service's backend entries as the kernel holds them (`SM_BACKENDS`, by
//! index), in the writer's mirror.
//!
//! Most services' entries are the backend list of the table last written, each
//! at the index the writer gave it: once a write of such a service has
//! completed, its entries are kept as that list (shared with the table, the
//! cluster view and the assignment) and the index of each position, 4 bytes a
//! backend instead of a B-tree entry of 28, or none where each backend is at its
//! position's index, as a service written anew is. An entry is derived from its backend
//! as the writer derives it ([`info_of`]), and the list is taken only after
//! checking that it derives to exactly the entries held. Any change goes back to
//! entries of their own first.

use std::{collections::BTreeMap, sync::Arc};

use sockmesh_common::{BackendInfo, backend_state};

use super::keys::{ip_to_words, port_to_map};
use crate::model::{Backend, BackendState};

/// The most backends a shared list holds. A change to shared entries rebuilds
/// all of them as a map, and the next share checks them all: for a large
/// service under churn that would outweigh the write itself, and such services
/// are few.
const SHARED_MAX: usize = 256;

/// What the kernel's entry for `b` holds, at priority level `level`.
pub(super) fn info_of(b: &Backend, level: u8) -> BackendInfo {
    BackendInfo {
        addr: ip_to_words(b.address),
        port: port_to_map(b.port),
        state: match b.state {
            BackendState::Active => backend_state::ACTIVE,
            BackendState::Draining => backend_state::DRAINING,
            BackendState::Degraded => backend_state::DEGRADED,
            BackendState::Unhealthy => backend_state::UNHEALTHY,
        },
        level,
        weight: b.weight,
    }
}

/// A service's backend entries, by index.
#[derive(Clone)]
pub(super) enum Entries {
    Own(BTreeMap<u32, BackendInfo>),
    /// `backends[pos]` at index `index`, for each `(index, pos)`, in index
    /// order; every entry at level 0. No indexes: `backends[i]` at index `i`,
    /// how the writer places a service written anew (so most services keep
    /// none).
    Shared {
        backends: Arc<[Backend]>,
        by_index: Box<[(u16, u16)]>,
    },
}

impl Default for Entries {
    fn default() -> Self {
        Entries::Own(BTreeMap::new())
    }
}

impl Entries {
    pub(super) fn len(&self) -> usize {
        match self {
            Entries::Own(m) => m.len(),
            Entries::Shared { backends, by_index } if by_index.is_empty() => backends.len(),
            Entries::Shared { by_index, .. } => by_index.len(),
        }
    }

    pub(super) fn get(&self, index: u32) -> Option<BackendInfo> {
        match self {
            Entries::Own(m) => m.get(&index).copied(),
            Entries::Shared { backends, by_index } if by_index.is_empty() => {
                backends.get(index as usize).map(|b| info_of(b, 0))
            }
            Entries::Shared { backends, by_index } => {
                let index = u16::try_from(index).ok()?;
                let at = by_index.binary_search_by_key(&index, |&(i, _)| i).ok()?;
                let pos = usize::from(by_index[at].1);
                backends.get(pos).map(|b| info_of(b, 0))
            }
        }
    }

    pub(super) fn contains_key(&self, index: u32) -> bool {
        match self {
            Entries::Own(m) => m.contains_key(&index),
            Entries::Shared { backends, by_index } if by_index.is_empty() => {
                (index as usize) < backends.len()
            }
            Entries::Shared { by_index, .. } => u16::try_from(index)
                .is_ok_and(|i| by_index.binary_search_by_key(&i, |&(i, _)| i).is_ok()),
        }
    }

    /// The entries in index order.
    pub(super) fn iter(&self) -> Iter<'_> {
        match self {
            Entries::Own(m) => Iter::Own(m.iter()),
            Entries::Shared { backends, by_index } if by_index.is_empty() => {
                Iter::Direct(backends.iter().enumerate())
            }
            Entries::Shared { backends, by_index } => Iter::Shared {
                backends,
                by_index: by_index.iter(),
            },
        }
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = u32> + '_ {
        self.iter().map(|(i, _)| i)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = BackendInfo> + '_ {
        self.iter().map(|(_, b)| b)
    }

    /// `f` on the entries as a map of their own.
    fn change<R>(&mut self, f: impl FnOnce(&mut BTreeMap<u32, BackendInfo>) -> R) -> R {
        let mut m = match std::mem::take(self) {
            Entries::Own(m) => m,
            shared => shared.iter().collect(),
        };
        let r = f(&mut m);
        *self = Entries::Own(m);
        r
    }

    pub(super) fn insert(&mut self, index: u32, info: BackendInfo) -> Option<BackendInfo> {
        self.change(|m| m.insert(index, info))
    }

    pub(super) fn remove(&mut self, index: u32) -> Option<BackendInfo> {
        self.change(|m| m.remove(&index))
    }

    /// Whether these are exactly `m`.
    pub(super) fn same_as(&self, m: &BTreeMap<u32, BackendInfo>) -> bool {
        self.len() == m.len() && self.iter().eq(m.iter().map(|(&i, &b)| (i, b)))
    }

    /// Keeps the entries as `backends`, `index_of[pos]` the index of
    /// `backends[pos]`, if that is exactly what they are (else as they are).
    pub(super) fn share(&mut self, backends: &Arc<[Backend]>, index_of: &[u32]) {
        if backends.len() != index_of.len() || backends.len() > SHARED_MAX {
            return;
        }
        let mut by_index = Vec::with_capacity(index_of.len());
        for (pos, &index) in index_of.iter().enumerate() {
            match (u16::try_from(index), u16::try_from(pos)) {
                (Ok(i), Ok(p)) => by_index.push((i, p)),
                _ => return,
            }
        }
        by_index.sort_unstable();
        if by_index.windows(2).any(|w| w[0].0 == w[1].0) {
            return;
        }
        if by_index.iter().all(|&(i, p)| i == p) {
            by_index.clear();
        }
        let shared = Entries::Shared {
            backends: backends.clone(),
            by_index: by_index.into_boxed_slice(),
        };
        if shared == *self {
            *self = shared;
        }
    }
}

impl PartialEq for Entries {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Entries {}

impl std::fmt::Debug for Entries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// [`Entries::iter`].
pub(super) enum Iter<'a> {
    Own(std::collections::btree_map::Iter<'a, u32, BackendInfo>),
    Shared {
        backends: &'a [Backend],
        by_index: std::slice::Iter<'a, (u16, u16)>,
    },
    Direct(std::iter::Enumerate<std::slice::Iter<'a, Backend>>),
}

impl Iterator for Iter<'_> {
    type Item = (u32, BackendInfo);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Own(it) => it.next().map(|(&i, &b)| (i, b)),
            Iter::Shared { backends, by_index } => {
                let &(index, pos) = by_index.next()?;
                let b = backends.get(usize::from(pos))?;
                Some((u32::from(index), info_of(b, 0)))
            }
            Iter::Direct(it) => {
                let (index, b) = it.next()?;
                Some((u32::try_from(index).ok()?, info_of(b, 0)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn backend(last: u8, weight: u32) -> Backend {
        Backend::new(IpAddr::from([10, 0, 0, last]), 80).weighted(weight)
    }

    /// `backends` at `index_of`, as the writer leaves them in the kernel.
    fn written(backends: &[Backend], index_of: &[u32]) -> Entries {
        Entries::Own(
            backends
                .iter()
                .zip(index_of)
                .map(|(b, &i)| (i, info_of(b, 0)))
                .collect(),
        )
    }

    #[test]
    fn a_list_is_shared_only_where_it_reads_as_the_entries() {
        let list: Arc<[Backend]> = vec![backend(1, 1), backend(2, 3), backend(3, 1)].into();
        let index_of = [2, 0, 1];
        let mut e = written(&list, &index_of);
        let before = e.clone();
        e.share(&list, &index_of);
        assert!(matches!(e, Entries::Shared { .. }));
        assert_eq!(e, before);
        assert_eq!(e.get(0), Some(info_of(&list[1], 0)));
        assert_eq!(e.get(3), None);
        assert_eq!(e.keys().collect::<Vec<_>>(), [0, 1, 2]);

        // Another weight, another index, a level, or a shorter list: kept as is.
        let other: Arc<[Backend]> = vec![backend(1, 1), backend(2, 4), backend(3, 1)].into();
        for (list, index_of, entries) in [
            (other.clone(), vec![2, 0, 1], written(&list, &index_of)),
            (list.clone(), vec![2, 0, 4], written(&list, &index_of)),
            (list.clone(), vec![2, 0], written(&list, &index_of)),
        ] {
            let mut e = entries.clone();
            e.share(&list, &index_of);
            assert!(matches!(e, Entries::Own(_)), "{index_of:?}");
        }
        let mut leveled = written(&list, &index_of);
        if let Entries::Own(m) = &mut leveled
            && let Some(b) = m.get_mut(&0)
        {
            b.level = 1;
        }
        leveled.share(&list, &index_of);
        assert!(matches!(leveled, Entries::Own(_)));

        // Each backend at its own position's index keeps no indexes, and reads
        // the same; one index short of that (a gap at the end) keeps them.
        for (index_of, direct) in [(vec![0, 1, 2], true), (vec![0, 1, 3], false)] {
            let mut e = written(&list, &index_of);
            let before = e.clone();
            e.share(&list, &index_of);
            assert!(
                matches!(&e, Entries::Shared { by_index, .. } if by_index.is_empty() == direct),
                "{index_of:?}"
            );
            assert_eq!(e, before);
            assert_eq!(e.len(), 3);
            for i in 0..5 {
                assert_eq!(e.get(i), before.get(i), "{index_of:?} {i}");
                assert_eq!(e.contains_key(i), before.contains_key(i));
            }
        }
    }

    #[test]
    fn a_change_to_shared_entries_makes_them_their_own() {
        let list: Arc<[Backend]> = vec![backend(1, 1), backend(2, 1)].into();
        let mut e = written(&list, &[0, 1]);
        e.share(&list, &[0, 1]);
        let mut expected = written(&list, &[0, 1]);
        let new = info_of(&backend(9, 1), 0);
        assert_eq!(e.insert(5, new), None);
        assert_eq!(expected.insert(5, new), None);
        assert_eq!(e.remove(0), Some(info_of(&list[0], 0)));
        expected.remove(0);
        assert!(matches!(e, Entries::Own(_)));
        assert_eq!(e, expected);
        // The list itself is the table's, untouched.
        assert_eq!(list.len(), 2);
    }
}
