//! What of an update is accepted, resource by resource, as Envoy decides it:
//! - a resource that cannot be decoded at all (malformed protobuf, an `Any` of
//!   another type) refuses the whole update, nothing of it applied (Envoy decodes
//!   every resource before it applies any: `GrpcMuxImpl::onDiscoveryResponse`,
//!   `DeltaSubscriptionState::handleGoodResponse`);
//! - a decoded resource that breaks a rule (`super::validate`) is refused alone:
//!   the others are applied and the refused one keeps its last good version
//!   (`CdsApiHelper::onConfigUpdate`, `LdsApiImpl::onConfigUpdate` collect one
//!   message per failing resource);
//! - a name sent twice in one state-of-the-world update: the first is the one
//!   considered, each later one refused ("duplicate cluster {} found",
//!   "duplicate listener {} found"); in a delta update the whole update is refused
//!   ("duplicate name {} found among added/updated resources", "… in the union of
//!   added+removed resources", `DeltaSubscriptionState::handleGoodResponse`).
//!
//! The NACK lists the refused resources, capped (see [`nack_of`]).

use std::collections::HashSet;

use sockmesh_proto::pb::google::protobuf::Any;

use super::{
    decode::{DecodeError, Kind, Resource, decode_any},
    position::Position,
    resources::Incoming,
    state::Nack,
};

/// A resource that decoded and passed validation, as the store takes it: the
/// bytes received (decoding them gives what was checked), or for a
/// ClusterLoadAssignment their digest and its backends, read while it was
/// decoded for validation.
pub(super) struct Checked<'a> {
    pub(super) kind: Kind,
    pub(super) name: String,
    pub(super) content: Incoming<'a>,
}

/// A resource refused on its own: the rest of its update is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub kind: Kind,
    /// Its name (empty when the resource has none, which is itself the error).
    pub name: String,
    /// What is wrong, naming the resource and the field.
    pub error: String,
}

/// One resource of an update, decoded: accepted or refused alone.
pub(super) type Item<'a> = Result<Checked<'a>, Refused>;

/// Updates of at least this many resources are decoded on every core (protobuf
/// decode and validation share nothing between resources).
const PARALLEL_DECODE_FROM: usize = 2_000;

/// Decodes and validates every resource, in order. `Err` when one cannot be
/// decoded at all (the whole update is refused); each resource that decodes but
/// breaks a rule is an `Err` item of its own.
///
/// Each resource is kept only in its encoding once checked: decoding a whole update
/// first would hold every decoded message at once (about 230 MiB for an initial
/// push of 10,000 services), and the allocator keeps such a peak as resident memory.
pub(super) fn decode_all<'a>(
    items: impl Iterator<Item = Entry<'a>>,
) -> Result<Vec<Item<'a>>, Nack> {
    let items: Vec<Entry<'a>> = items.collect();
    let parts = super::in_chunks(&items, PARALLEL_DECODE_FROM, decode_part);
    let mut out = Vec::with_capacity(items.len());
    let mut undecodable: Vec<String> = Vec::new();
    for (decoded, errors) in parts {
        out.extend(decoded);
        undecodable.extend(errors);
    }
    if undecodable.is_empty() {
        Ok(out)
    } else {
        let total = undecodable.len();
        Err(capped(
            "the update is refused whole (a resource that does not decode refuses every other)",
            &undecodable,
            total,
        ))
    }
}

/// One resource of an update, as sent.
#[derive(Clone, Copy)]
pub(super) struct Entry<'a> {
    /// Its place in the update's list.
    pub(super) index: usize,
    pub(super) kind: Kind,
    /// The name sent beside it (delta), or empty.
    pub(super) name: &'a str,
    pub(super) any: &'a Any,
    /// Where it is in its file (file source).
    pub(super) at: Option<Position>,
}

impl Entry<'_> {
    /// Where an error about it says it is: in a file, its line and column.
    fn whereabouts(&self) -> String {
        match self.at {
            Some(at) => format!(" (resources[{}] at {at})", self.index),
            None => String::new(),
        }
    }
}

fn decode_part<'a>(items: &[Entry<'a>]) -> (Vec<Item<'a>>, Vec<String>) {
    let mut out = Vec::with_capacity(items.len());
    let mut undecodable: Vec<String> = Vec::new();
    for e in items {
        let (index, kind, sent, any) = (e.index, e.kind, e.name, e.any);
        match decode_any(any, kind) {
            Ok(r) => out.push(Ok(Checked {
                kind: r.kind(),
                name: r.name().to_owned(),
                content: match &r {
                    Resource::Endpoint(e) => Incoming::Assignment {
                        digest: super::resources::digest(&any.value),
                        backends: super::clusters::assignment_backends(e).into(),
                        localities: super::clusters::locality_names(e),
                    },
                    // The bytes received: decoding them gives what was checked
                    // (re-encoding the decoded message cost a tenth of a large
                    // update).
                    _ => Incoming::Encoded(&any.value),
                },
            })),
            Err(DecodeError::Invalid(invalid)) => out.push(Err(Refused {
                kind,
                name: invalid.name.clone(),
                error: format!("{invalid}{}", e.whereabouts()),
            })),
            Err(error) if sent.is_empty() => undecodable.push(format!(
                "{} resources[{index}]{}: {error}",
                message(kind),
                e.at.map(|at| format!(" at {at}")).unwrap_or_default()
            )),
            Err(error) => undecodable.push(format!(
                "{} {sent:?} (resources[{index}]): {error}",
                message(kind)
            )),
        }
    }
    (out, undecodable)
}

/// The protobuf message name of a kind, as messages name a resource.
pub(super) fn message(kind: Kind) -> &'static str {
    match kind {
        Kind::Cluster => "Cluster",
        Kind::Endpoint => "ClusterLoadAssignment",
        Kind::Listener => "Listener",
        Kind::Route => "RouteConfiguration",
    }
}

/// State of the world (and the file source's whole document): per kind, the first
/// resource of a name is the one considered; each later one is refused.
pub(super) fn refuse_repeats(items: &mut [Item]) {
    let mut seen: HashSet<(Kind, String)> = HashSet::with_capacity(items.len());
    for item in items.iter_mut() {
        let (kind, name) = match item {
            Ok(c) => (c.kind, c.name.clone()),
            Err(r) => (r.kind, r.name.clone()),
        };
        if !seen.insert((kind, name.clone())) {
            *item = Err(Refused {
                kind,
                error: format!(
                    "{} {name:?}: duplicate {} {name} found (the first one sent is applied)",
                    message(kind),
                    message(kind).to_ascii_lowercase()
                ),
                name,
            });
        }
    }
}

/// A delta update's names: each at most once among the added, and not both added
/// and removed, or the whole update is refused.
pub(super) fn check_delta_names<'a>(
    added: impl Iterator<Item = &'a str>,
    removed: &[String],
) -> Result<(), Nack> {
    let mut names: HashSet<&str> = HashSet::new();
    for name in added {
        if !names.insert(name) {
            return Err(Nack(format!(
                "duplicate name {name} found among added/updated resources"
            )));
        }
    }
    for name in removed {
        if !names.insert(name) {
            return Err(Nack(format!(
                "duplicate name {name} found in the union of added+removed resources"
            )));
        }
    }
    Ok(())
}

/// Refused resources listed in a NACK before the rest are only counted.
pub const NACK_ERRORS: usize = 20;

/// The most bytes of a NACK's `error_detail` message: Envoy's own cap
/// (`kProtobufErrMsgLen`, `Config::Utility::truncateGrpcStatusMessage`), which
/// keeps the request far under any control plane's receive limit (istiod's is
/// 4 MiB) however many resources are refused.
pub const NACK_BYTES: usize = 4_096;

/// The NACK for `refused` resources (in the order sent): the first
/// [`NACK_ERRORS`] errors and how many more, within [`NACK_BYTES`].
pub fn nack_of(refused: &[Refused]) -> Nack {
    let errors: Vec<String> = refused
        .iter()
        .take(NACK_ERRORS)
        .map(|r| r.error.clone())
        .collect();
    capped(
        &format!(
            "{} resource{} refused (the others are applied)",
            refused.len(),
            if refused.len() == 1 { "" } else { "s" }
        ),
        &errors,
        refused.len(),
    )
}

/// `head: e1; e2; … (and N more)`, at most [`NACK_ERRORS`] of `errors` listed
/// and the whole within [`NACK_BYTES`] (cut on a character boundary, marked as
/// Envoy marks it).
fn capped(head: &str, errors: &[String], total: usize) -> Nack {
    let listed = errors.len().min(NACK_ERRORS);
    let mut text = format!("{head}: {}", errors[..listed].join("; "));
    if total > listed {
        text.push_str(&format!(" (and {} more)", total - listed));
    }
    Nack(truncate(text))
}

/// `text` within [`NACK_BYTES`], `...(truncated)` after a cut.
pub fn truncate(text: String) -> String {
    if text.len() <= NACK_BYTES {
        return text;
    }
    truncate_to(&text, NACK_BYTES)
}

/// `text` within `max` bytes (at least the mark's), `...(truncated)` after a cut
/// made on a character boundary.
pub fn truncate_to(text: &str, max: usize) -> String {
    const MARK: &str = "...(truncated)";
    if text.len() <= max {
        return text.to_owned();
    }
    let mut at = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    format!("{}{MARK}", &text[..at])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(i: usize, len: usize) -> Refused {
        Refused {
            kind: Kind::Endpoint,
            name: format!("svc-{i}"),
            error: format!("ClusterLoadAssignment \"svc-{i}\": {}", "x".repeat(len)),
        }
    }

    #[test]
    fn a_nack_lists_the_first_errors_counts_the_rest_and_stays_within_envoys_cap() {
        let few: Vec<Refused> = (0..3).map(|i| refused(i, 10)).collect();
        let nack = nack_of(&few);
        assert!(
            nack.0
                .starts_with("3 resources refused (the others are applied): ")
        );
        assert!(
            nack.0.contains("\"svc-2\"") && !nack.0.contains("more"),
            "{nack}"
        );
        // 100,000 refused resources (as many services with a bad port): the
        // message names the first 20 and counts the other 99,980.
        let many: Vec<Refused> = (0..100_000).map(|i| refused(i, 10)).collect();
        let nack = nack_of(&many);
        assert!(nack.0.contains("\"svc-19\"") && !nack.0.contains("\"svc-20\""));
        assert!(nack.0.ends_with("(and 99980 more)"), "{nack}");
        assert!(nack.0.len() <= NACK_BYTES);
        // Long errors are cut at the byte cap, on a character boundary.
        let long: Vec<Refused> = (0..20).map(|i| refused(i, 1_000)).collect();
        let nack = nack_of(&long);
        assert_eq!(nack.0.len(), NACK_BYTES);
        assert!(nack.0.ends_with("...(truncated)"));
        let wide = truncate("é".repeat(NACK_BYTES));
        assert!(wide.len() <= NACK_BYTES && wide.ends_with("...(truncated)"));
    }

    #[test]
    fn delta_names_twice_refuse_the_update() {
        assert!(check_delta_names(["a", "b"].into_iter(), &["c".into()]).is_ok());
        let twice = check_delta_names(["a", "a"].into_iter(), &[]).expect_err("twice");
        assert_eq!(
            twice.0,
            "duplicate name a found among added/updated resources"
        );
        let both = check_delta_names(["a"].into_iter(), &["a".into()]).expect_err("both");
        assert_eq!(
            both.0,
            "duplicate name a found in the union of added+removed resources"
        );
    }
}
