//! One update's resources into the store: state of the world, delta, and the file
//! source's whole document, each by its protocol's rules of what is removed, and
//! resource by resource (see `super::super::accept`).

use std::collections::HashSet;

use super::{Accepted, Nack, Update, XdsState};
use crate::xds::{
    accept::{
        Checked, Entry, Item, Refused, check_delta_names, decode_all, message, refuse_repeats,
    },
    decode::Kind,
    incremental::Dirty,
};

/// The smallest part an EDS delta is split into (see [`XdsState::prepare`]).
const MIN_PART: usize = 128;

/// An update put in the store, its translation committed part by part (see
/// [`XdsState::prepare`]).
pub struct Parts {
    parts: std::vec::IntoIter<Dirty>,
    kinds: Vec<super::Kind>,
    st: Staging,
}

impl Parts {
    /// Parts not committed yet.
    pub fn remaining(&self) -> usize {
        self.parts.len()
    }
}

/// What an update changes in the store before it is translated.
#[derive(Default)]
struct Staging {
    /// What the update changed in the store, to translate again.
    touched: Vec<(Kind, String)>,
    /// Names accepted or removed: no longer refused.
    cleared: Vec<(Kind, String)>,
    refused: Vec<Refused>,
}

fn name_of<'a>(item: &'a Item<'_>) -> (Kind, &'a str) {
    match item {
        Ok(c) => (c.kind, c.name.as_str()),
        Err(r) => (r.kind, r.name.as_str()),
    }
}

impl XdsState {
    /// Puts what of `update` is valid in the store; `Err` refuses it whole
    /// (nothing changed: every reason to refuse it whole is found before the
    /// store is touched). Its translation is committed by [`Self::next_part`],
    /// in one part, or for an EDS delta, in parts of at most `part` assignments:
    /// eighths of a smaller delta, of at least [`MIN_PART`].
    pub(super) fn prepare(&mut self, update: &Update, part: usize) -> Result<Parts, Nack> {
        let mut st = Staging::default();
        match update {
            Update::SotW {
                kind, resources, ..
            } => {
                let items = decode_all(resources.iter().enumerate().map(|(index, any)| Entry {
                    index,
                    kind: *kind,
                    name: "",
                    any,
                    at: None,
                }))?;
                self.state_of_the_world(*kind, items, &mut st);
            }
            Update::Delta {
                kind,
                added,
                removed,
            } => {
                let items =
                    decode_all(
                        added
                            .iter()
                            .enumerate()
                            .map(|(index, (name, _, any))| Entry {
                                index,
                                kind: *kind,
                                name,
                                any,
                                at: None,
                            }),
                    )?;
                self.delta(*kind, added, items, removed, &mut st)?;
            }
            Update::Full {
                resources,
                kept,
                positions,
                ..
            } => {
                // Types sockmesh does not consume (secrets, runtime, ...) are skipped
                // and counted, not an error.
                let known: Vec<Entry<'_>> = resources
                    .iter()
                    .enumerate()
                    .filter_map(|(index, any)| {
                        let kind = Kind::from_type_url(&any.type_url);
                        if kind.is_none() {
                            self.ignored_resources += 1;
                        }
                        Some(Entry {
                            index,
                            kind: kind?,
                            name: "",
                            any,
                            at: positions.get(index).copied().flatten(),
                        })
                    })
                    .collect();
                let items = decode_all(known.into_iter())?;
                self.whole_document(items, kept, &mut st)?;
            }
        }
        let mut dirty = Dirty::default();
        for (kind, name) in &st.touched {
            let set = match kind {
                Kind::Listener => &mut dirty.listeners,
                Kind::Route => &mut dirty.routes,
                Kind::Cluster => &mut dirty.clusters,
                Kind::Endpoint => &mut dirty.endpoints,
            };
            set.insert(name.clone());
        }
        // Only assignments are split: a part of them changes the services of
        // their clusters and nothing else, as a smaller response would, while a
        // part of the listeners or clusters would recompute every subscription.
        // A delta of fewer is split in eighths (of at least `MIN_PART`): a
        // batch's first eighth reaches the kernel while the rest is translated
        // (eighths against quarters and sixteenths: docs/benchmarks.md §18).
        let part = part.min((dirty.endpoints.len() / 8).max(MIN_PART));
        let parts = if matches!(update, Update::Delta { .. })
            && dirty.endpoints.len() > part
            && dirty.listeners.is_empty()
            && dirty.routes.is_empty()
            && dirty.clusters.is_empty()
        {
            let names: Vec<String> = std::mem::take(&mut dirty.endpoints).into_iter().collect();
            names
                .chunks(part.max(1))
                .map(|c| Dirty {
                    endpoints: c.iter().cloned().collect(),
                    ..Dirty::default()
                })
                .collect()
        } else {
            vec![dirty]
        };
        Ok(Parts {
            parts: parts.into_iter(),
            kinds: update.kinds(),
            st,
        })
    }

    /// The next part of a begun update translated and committed: what it
    /// changed; `None` once every part is.
    pub fn next_part(&mut self, parts: &mut Parts) -> Option<Accepted> {
        let dirty = parts.parts.next()?;
        Some(self.commit_dirty(&dirty, &parts.kinds))
    }

    /// The refusals of an update whose parts are all committed.
    pub(super) fn settle(&mut self, parts: Parts) -> Vec<Refused> {
        let Parts { st, .. } = parts;
        self.note_refused(
            st.cleared.iter().map(|(k, n)| (*k, n.as_str())),
            &st.refused,
        );
        st.refused
    }

    /// [`Self::put`] of every accepted item (state of the world: no version);
    /// refused ones collected.
    fn put_items(&mut self, items: Vec<Item<'_>>, st: &mut Staging) {
        for item in items {
            match item {
                Ok(r) => self.put(r, None, st),
                Err(r) => st.refused.push(r),
            }
        }
    }

    /// Stores `r` with its delta `version`, recording what changed.
    fn put(&mut self, r: Checked<'_>, version: Option<&str>, st: &mut Staging) {
        st.cleared.push((r.kind, r.name.clone()));
        // A resource sent again unchanged is not translated again.
        if self.resources.put(r.kind, &r.name, r.content, version) {
            st.touched.push((r.kind, r.name));
        }
    }

    fn remove(&mut self, kind: Kind, name: &str, st: &mut Staging) {
        self.resources.remove(kind, name);
        st.cleared.push((kind, name.to_owned()));
        st.touched.push((kind, name.to_owned()));
    }

    /// State of the world for one type: for LDS and CDS the complete set, so what
    /// the update does not name is removed (a refused resource is named: it keeps
    /// its last good version); for RDS and EDS the named resources sent.
    fn state_of_the_world(&mut self, kind: Kind, mut items: Vec<Item<'_>>, st: &mut Staging) {
        refuse_repeats(&mut items);
        if kind.is_wildcard() {
            let named: HashSet<&str> = items.iter().map(|i| name_of(i).1).collect();
            let gone: Vec<String> = self
                .resources
                .names(kind)
                .filter(|n| !named.contains(n))
                .map(str::to_owned)
                .collect();
            // Refused names no longer sent are forgotten too.
            let forgotten: Vec<String> = self
                .refused
                .get(&kind)
                .into_iter()
                .flat_map(|m| m.keys())
                .filter(|n| !named.contains(n.as_str()))
                .cloned()
                .collect();
            for name in gone {
                self.remove(kind, &name, st);
            }
            st.cleared.extend(forgotten.into_iter().map(|n| (kind, n)));
        }
        self.put_items(items, st);
    }

    /// Delta: resources added or changed, names removed. Names appear once among
    /// the added, and not both added and removed, or the update is refused.
    fn delta(
        &mut self,
        kind: Kind,
        added: &[(String, String, sockmesh_proto::pb::google::protobuf::Any)],
        items: Vec<Item<'_>>,
        removed: &[String],
        st: &mut Staging,
    ) -> Result<(), Nack> {
        // The name a resource goes by: the one sent beside it, else its own.
        let names: Vec<&str> = added
            .iter()
            .zip(&items)
            .map(|((sent, _, _), item)| {
                if sent.is_empty() {
                    name_of(item).1
                } else {
                    sent.as_str()
                }
            })
            .collect();
        check_delta_names(names.iter().copied(), removed)?;
        for ((sent, version, _), item) in added.iter().zip(items) {
            match item {
                Ok(r) if !sent.is_empty() && *sent != r.name => st.refused.push(Refused {
                    kind,
                    error: format!(
                        "{} {sent:?}: the resource sent under this name carries the name {:?}",
                        message(kind),
                        r.name
                    ),
                    name: sent.clone(),
                }),
                Ok(r) => self.put(r, Some(version), st),
                Err(mut r) => {
                    if !sent.is_empty() {
                        r.name.clone_from(sent);
                    }
                    st.refused.push(r);
                }
            }
        }
        for name in removed {
            self.remove(kind, name, st);
        }
        Ok(())
    }

    /// The file source's document: every type at once, as a state of the world for
    /// each. `kept` names resources the document holds exactly as last accepted,
    /// which stay as they are without being sent again.
    fn whole_document(
        &mut self,
        mut items: Vec<Item<'_>>,
        kept: &[(Kind, std::sync::Arc<str>)],
        st: &mut Staging,
    ) -> Result<(), Nack> {
        refuse_repeats(&mut items);
        // One pass over what the state holds: what is kept must be held (else
        // nothing changes), what is neither kept nor sent goes.
        let kept: HashSet<(Kind, &str)> = kept.iter().map(|(k, n)| (*k, &**n)).collect();
        let sent: HashSet<(Kind, &str)> = items.iter().map(name_of).collect();
        let mut held = 0;
        let mut gone = Vec::new();
        for kind in Kind::ALL {
            for name in self.resources.names(kind) {
                if kept.contains(&(kind, name)) {
                    held += 1;
                } else if !sent.contains(&(kind, name)) {
                    gone.push((kind, name.to_owned()));
                }
            }
        }
        if held != kept.len() {
            return Err(Nack(format!(
                "{} of the {} resources to be kept are not held (resend the whole document)",
                kept.len() - held,
                kept.len()
            )));
        }
        let forgotten: Vec<(Kind, String)> = self
            .refused
            .iter()
            .flat_map(|(k, m)| m.keys().map(move |n| (*k, n)))
            .filter(|(k, n)| !sent.contains(&(*k, n.as_str())))
            .map(|(k, n)| (k, n.clone()))
            .collect();
        for (kind, name) in gone {
            self.remove(kind, &name, st);
        }
        st.cleared.extend(forgotten);
        self.put_items(items, st);
        Ok(())
    }
}
