//! [`Users`]: the set type of the incremental translation's reverse indexes.

use std::{borrow::Borrow, collections::BTreeSet};

/// An ordered set that holds a single element inline. Nearly every entry of the
/// reverse indexes has one user: one cluster per EDS name, one listener per
/// service, one service per cluster. A one-element `BTreeSet` allocates a whole
/// B-tree leaf for it (about 290 bytes for a `String`), which at 10,000 services
/// was 8 MiB of the agent's memory for 30,000 such sets.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Users<T> {
    #[default]
    Empty,
    One(T),
    /// Two or more; boxed, so a set of one is no larger than its element
    /// (at 100,000 services the indexes' tables hold 300,000 sets).
    Many(Box<BTreeSet<T>>),
}

const _: () = assert!(std::mem::size_of::<Users<String>>() == 24);
const _: () = assert!(std::mem::size_of::<Users<crate::model::ServiceAddr>>() <= 24);

impl<T: Ord> Users<T> {
    /// Adds `v`; whether it was absent.
    pub fn insert(&mut self, v: T) -> bool {
        match std::mem::take(self) {
            Users::Empty => {
                *self = Users::One(v);
                true
            }
            Users::One(old) if old == v => {
                *self = Users::One(old);
                false
            }
            Users::One(old) => {
                *self = Users::Many(Box::new(BTreeSet::from([old, v])));
                true
            }
            Users::Many(mut set) => {
                let added = set.insert(v);
                *self = Users::Many(set);
                added
            }
        }
    }

    /// Removes `v`; whether it was present. Two elements down to one go back
    /// inline, so equal sets are always held alike.
    pub fn remove<Q>(&mut self, v: &Q) -> bool
    where
        T: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        match std::mem::take(self) {
            Users::Empty => false,
            Users::One(old) if old.borrow() == v => true,
            Users::One(old) => {
                *self = Users::One(old);
                false
            }
            Users::Many(mut set) => {
                let removed = set.remove(v);
                *self = if set.len() == 1 {
                    set.pop_first().map_or(Users::Empty, Users::One)
                } else {
                    Users::Many(set)
                };
                removed
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Users::Empty)
    }

    /// The elements in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        let (one, many) = match self {
            Users::Empty => (None, None),
            Users::One(v) => (Some(v), None),
            Users::Many(set) => (None, Some(set.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

impl<T: std::fmt::Debug + Ord> std::fmt::Debug for Users<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a `BTreeSet` over a seeded sequence of inserts and removes: the same
    /// answers, the same elements in the same order, and one element always inline.
    #[test]
    fn users_behave_as_an_ordered_set() {
        use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(3);
        let mut users: Users<String> = Users::default();
        let mut model: BTreeSet<String> = BTreeSet::new();
        for _ in 0..5_000 {
            let v = format!("l{}", rng.random_range(0..5));
            if rng.random_range(0..2) == 0 {
                assert_eq!(users.insert(v.clone()), model.insert(v));
            } else {
                assert_eq!(users.remove(v.as_str()), model.remove(&v));
            }
            assert!(users.iter().eq(model.iter()));
            assert_eq!(users.is_empty(), model.is_empty());
            assert_eq!(matches!(users, Users::One(_)), model.len() == 1);
            assert_eq!(format!("{users:?}"), format!("{model:?}"));
        }
    }
}
