//! A large configuration file, read resource by resource. The file source splits a
//! proto3 JSON `DiscoveryResponse` into the texts of its resources, recognises the
//! ones unchanged since the last accepted file by a hash of their text, and decodes
//! only the others, on every core. One edited service of a 76 MB file then costs a
//! scan of the file and the decode of that service, not a decode of the whole file.
//!
//! YAML, and any JSON document this split does not take apart (not an object, a
//! key given twice, two resources with one name), is decoded whole as before. So is
//! a document that fails to decode, so that its error names the file's own line and
//! column.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::Arc,
};

use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde_json::value::RawValue;
use sockmesh_proto::{
    descriptor_pool, descriptor_pool_copy,
    pb::{envoy::service::discovery::v3::DiscoveryResponse, google::protobuf::Any},
};

use super::{
    decode::{
        DecodeError, Kind, TextNotes, discovery_document, discovery_response_with_opaque,
        message_from_text_in,
    },
    json_wire,
    opaque::OpaqueTypes,
    position::Position,
};

/// Resources below this count are decoded on one thread (a thread costs more than
/// it saves).
const PARALLEL_FROM: usize = 2_000;

/// A text, by its 128-bit XXH3 hash and length: equal texts decode to equal
/// resources (a collision among the resources of one file, at 2⁻¹²⁸ per pair, is
/// not a practical concern; XXH3 hashes a 76 MB file in about 10 ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TextHash(u128, usize);

impl TextHash {
    pub fn of(text: &str) -> Self {
        TextHash(xxhash_rust::xxh3::xxh3_128(text.as_bytes()), text.len())
    }
}

/// A resource's kind and name, as the state keys it (names shared, not copied,
/// between [`Known`] and the updates built from it).
pub type Named = (Kind, Arc<str>);

/// The resources of the last accepted file: the hash of each one's text, and the
/// kind and name the agent's state holds it under.
#[derive(Debug, Default)]
pub struct Known(HashMap<TextHash, Named>);

impl Known {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Forgets the texts of `names` (resources the state refused: their text is
    /// not the one it holds).
    pub fn forget<'a>(&mut self, names: impl Iterator<Item = (Kind, &'a str)>) {
        let names: HashSet<(Kind, &str)> = names.collect();
        if !names.is_empty() {
            self.0
                .retain(|_, (kind, name)| !names.contains(&(*kind, &**name)));
        }
    }
}

/// A document read against what was accepted last.
#[derive(Debug)]
pub struct Read {
    pub version: String,
    /// Resources to decode into the state: new or changed since the last accepted
    /// file (all of them when the document was decoded whole).
    pub changed: Vec<Any>,
    /// Where each of `changed` is in the file (when it could be told).
    pub positions: Vec<Option<Position>>,
    /// Resources present with the text they were accepted with: the state keeps
    /// them as they are.
    pub kept: Vec<Named>,
    /// Nested `Any`s of types sockmesh does not know and fields it does not know,
    /// in what was decoded.
    pub notes: TextNotes,
    /// What [`Known`] becomes once this document is accepted.
    pub next: Known,
}

/// Reads `text` (proto3 JSON or YAML of a `DiscoveryResponse`) against the
/// resources of the last accepted file.
pub fn read(text: &str, known: &Known) -> Result<Read, DecodeError> {
    if !text.trim_start().starts_with('{') {
        return whole(text);
    }
    match split(text, known) {
        Some(Ok(read)) => Ok(read),
        // The whole document again: its error (or, should the two decoders ever
        // disagree, its result) is the reference one, with the file's positions.
        Some(Err(_)) | None => whole(text),
    }
}

fn whole(text: &str) -> Result<Read, DecodeError> {
    let (resp, notes) = discovery_document(text)?;
    let positions = match super::position::resources(text) {
        Some(p) if p.len() == resp.resources.len() => p.into_iter().map(Some).collect(),
        _ => vec![None; resp.resources.len()],
    };
    Ok(Read {
        version: resp.version_info,
        positions,
        changed: resp.resources,
        kept: Vec::new(),
        notes,
        next: Known::default(),
    })
}

/// Where each element of the top-level `resources` list of a JSON document
/// starts (byte offsets): `None` unless the document is one object with one
/// `resources` list.
pub fn resource_offsets(text: &str) -> Option<Vec<usize>> {
    let mut de = serde_json::Deserializer::from_str(text);
    let top = de.deserialize_map(TopLevel).ok()?;
    de.end().ok()?;
    let [resources] = &top.resources[..] else {
        return None;
    };
    Some(resources.iter().map(|r| offset(text, r)).collect())
}

/// The byte offset of `raw`, a slice of `text`.
fn offset(text: &str, raw: &RawValue) -> usize {
    (raw.get().as_ptr() as usize).saturating_sub(text.as_ptr() as usize)
}

/// `None`: a document this split does not take apart (decode it whole).
fn split(text: &str, known: &Known) -> Option<Result<Read, DecodeError>> {
    // One pass over the text: the resources' texts, and the other fields' texts.
    let mut de = serde_json::Deserializer::from_str(text);
    let top = de.deserialize_map(TopLevel).ok()?;
    de.end().ok()?;
    let mut keys = HashSet::new();
    // No `resources` key, or two: the whole decode says what is wrong.
    if !top.others.iter().all(|(k, _)| keys.insert(k.as_str())) || top.resources.len() != 1 {
        return None;
    }
    let resources = top.resources.into_iter().next().unwrap_or_default();
    let mut rest = String::from("{");
    for (key, value) in &top.others {
        if rest.len() > 1 {
            rest.push(',');
        }
        rest.push_str(&serde_json::to_string(key).ok()?);
        rest.push(':');
        rest.push_str(value.get());
    }
    rest.push('}');
    // Everything but the resources, by the reference decoder (types, unknown
    // fields): small.
    let (version, mut notes) = match discovery_response_with_opaque(&rest) {
        Ok((resp, notes)) => (resp.version_info, notes),
        Err(e) => return Some(Err(e)),
    };

    let mut kept = Vec::new();
    let mut next = HashMap::with_capacity(resources.len());
    let mut to_decode: Vec<&RawValue> = Vec::new();
    // Names seen, by hash (a collision only costs a whole decode).
    let mut names = HashSet::with_capacity(resources.len());
    let name_hash =
        |(kind, name): &Named| xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), *kind as u64);
    for raw in &resources {
        let hash = TextHash::of(raw.get());
        if let Some(entry) = known.0.get(&hash) {
            if !names.insert(name_hash(entry)) {
                return None;
            }
            kept.push(entry.clone());
            next.insert(hash, entry.clone());
            continue;
        }
        // New or changed: its name, to recognise it next time. A resource whose
        // head does not read (no `@type`, a type sockmesh ignores) is decoded each
        // time, and the decoder says what is wrong with it.
        if let Some(entry) = head(raw.get()) {
            if !names.insert(name_hash(&entry)) {
                return None;
            }
            next.insert(hash, entry);
        }
        to_decode.push(raw);
    }

    let decoded = match decode_parallel(&to_decode) {
        Ok(d) => d,
        Err(e) => return Some(Err(e)),
    };
    notes.add(decoded.1);
    let positions =
        super::position::at_each(text.as_bytes(), to_decode.iter().map(|r| offset(text, r)))
            .into_iter()
            .map(Some)
            .collect();
    Some(Ok(Read {
        version,
        positions,
        changed: decoded.0,
        kept,
        notes,
        next: Known(next),
    }))
}

/// Decodes resource texts as the `resources` of a `DiscoveryResponse`, in up to one
/// chunk per core: each by the fast decoder ([`json_wire`]) where it can, the rest
/// by the reference decoder (unknown nested types included), which also reports
/// what is wrong with a text.
fn decode_parallel(texts: &[&RawValue]) -> Result<(Vec<Any>, TextNotes), DecodeError> {
    if texts.is_empty() {
        return Ok((Vec::new(), TextNotes::default()));
    }
    let parallel = texts.len() >= PARALLEL_FROM;
    let results = super::in_chunks(texts, PARALLEL_FROM, |part| -> Result<_, DecodeError> {
        let mut schema = json_wire::Schema::new(descriptor_pool());
        let mut opaque = OpaqueTypes::new();
        let mut fast: Vec<Option<Any>> = part
            .iter()
            .map(|r| json_wire::any(&mut schema, r.get(), &mut opaque))
            .collect();
        let fast_notes = TextNotes {
            opaque,
            ..TextNotes::default()
        };
        let rest: Vec<&RawValue> = part
            .iter()
            .zip(&fast)
            .filter_map(|(r, f)| f.is_none().then_some(*r))
            .collect();
        if rest.is_empty() {
            return Ok((fast.into_iter().flatten().collect::<Vec<_>>(), fast_notes));
        }
        // One descriptor pool per thread; one thread uses the shared one.
        let (decoded, mut notes) = if parallel {
            reference_chunk(&rest, &descriptor_pool_copy())?
        } else {
            reference_chunk(&rest, descriptor_pool())?
        };
        let mut decoded = decoded.into_iter();
        for slot in fast.iter_mut().filter(|f| f.is_none()) {
            *slot = decoded.next();
        }
        notes.add(fast_notes);
        Ok((fast.into_iter().flatten().collect(), notes))
    });
    let mut resources = Vec::with_capacity(texts.len());
    let mut notes = TextNotes::default();
    for r in results {
        let (part, found) = r?;
        resources.extend(part);
        notes.add(found);
    }
    Ok((resources, notes))
}

/// The reference decoder over resource texts, as the `resources` of one
/// `DiscoveryResponse`.
fn reference_chunk(
    part: &[&RawValue],
    pool: &prost_reflect::DescriptorPool,
) -> Result<(Vec<Any>, TextNotes), DecodeError> {
    let mut doc = String::with_capacity(part.iter().map(|r| r.get().len() + 1).sum::<usize>() + 16);
    doc.push_str("{\"resources\":[");
    for (i, r) in part.iter().enumerate() {
        if i > 0 {
            doc.push(',');
        }
        doc.push_str(r.get());
    }
    doc.push_str("]}");
    message_from_text_in::<DiscoveryResponse>(
        pool,
        "envoy.service.discovery.v3.DiscoveryResponse",
        &doc,
    )
    .map(|(resp, opaque)| (resp.resources, opaque))
}

/// The kind and name of one resource's text, as the state keys it; `None` when the
/// text does not read as a resource sockmesh consumes.
fn head(text: &str) -> Option<Named> {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(rename = "@type")]
        type_url: String,
        #[serde(default)]
        name: String,
        #[serde(default, rename = "clusterName", alias = "cluster_name")]
        cluster_name: String,
    }
    let h: Head = serde_json::from_str(text).ok()?;
    let kind = Kind::from_type_url(&h.type_url)?;
    let name = match kind {
        Kind::Endpoint => h.cluster_name,
        Kind::Cluster | Kind::Listener | Kind::Route => h.name,
    };
    Some((kind, name.into()))
}

/// The top-level object: the texts of the resources, and every other key with its
/// value's text, in order, repeats kept.
struct TopLevel;

#[derive(Default)]
struct Fields<'de> {
    /// One entry per `resources` key (more than one: the reference decoder's call).
    resources: Vec<Vec<&'de RawValue>>,
    others: Vec<(String, &'de RawValue)>,
}

impl<'de> Visitor<'de> for TopLevel {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a DiscoveryResponse object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Fields::default();
        while let Some(key) = map.next_key::<String>()? {
            if key == "resources" {
                out.resources.push(map.next_value()?);
            } else {
                out.others.push((key, map.next_value()?));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cla(name: &str, port: u16) -> String {
        format!(
            r#"{{"@type":"type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment","clusterName":"{name}","endpoints":[{{"lbEndpoints":[{{"endpoint":{{"address":{{"socketAddress":{{"address":"10.1.0.1","portValue":{port}}}}}}}}}]}}]}}"#
        )
    }

    fn cluster(name: &str) -> String {
        format!(
            r#"{{"@type":"type.googleapis.com/envoy.config.cluster.v3.Cluster","name":"{name}","type":"EDS","edsClusterConfig":{{"edsConfig":{{"ads":{{}}}}}}}}"#
        )
    }

    fn doc(version: &str, resources: &[String]) -> String {
        format!(
            r#"{{"versionInfo":"{version}","resources":[{}]}}"#,
            resources.join(",\n")
        )
    }

    #[test]
    fn an_unchanged_resource_is_kept_and_only_the_edited_one_is_decoded() {
        let first = doc("1", &[cluster("a"), cla("a", 80), cla("b", 80)]);
        let r1 = read(&first, &Known::default()).expect("first read");
        assert_eq!(r1.version, "1");
        assert_eq!(r1.changed.len(), 3);
        assert!(r1.kept.is_empty());
        assert_eq!(r1.next.len(), 3);

        let second = doc("2", &[cluster("a"), cla("a", 81), cla("b", 80)]);
        let r2 = read(&second, &r1.next).expect("second read");
        assert_eq!(r2.version, "2");
        assert_eq!(r2.changed.len(), 1, "only the edited CLA is decoded");
        assert_eq!(
            r2.kept,
            vec![(Kind::Cluster, "a".into()), (Kind::Endpoint, "b".into())]
        );
        assert_eq!(r2.next.len(), 3);
        // The decoded resource is the reference decoder's: the same bytes as a
        // whole-document decode gives.
        let reference = whole(&second).expect("whole");
        assert_eq!(r2.changed[0], reference.changed[1]);
    }

    /// Nested `Any`s of types the pool lacks are counted as the whole-document
    /// decode counts them, whichever decoder takes the resource (the second
    /// listener's unknown field leaves it to the reference).
    #[test]
    fn opaque_types_are_counted_as_the_whole_document_counts_them() {
        let listener = |name: &str, extra: &str| {
            format!(
                r#"{{"@type":"type.googleapis.com/envoy.config.listener.v3.Listener","name":"{name}"{extra},"filterChains":[{{"filters":[{{"name":"istio.stats","typedConfig":{{"@type":"type.googleapis.com/stats.PluginConfig","a":1}}}}]}}]}}"#
            )
        };
        let text = doc(
            "1",
            &[listener("a", ""), listener("b", r#","unknownField":1"#)],
        );
        let split = read(&text, &Known::default()).expect("split");
        let reference = whole(&text).expect("whole");
        assert_eq!(
            split
                .notes
                .opaque
                .get("type.googleapis.com/stats.PluginConfig"),
            Some(&2)
        );
        assert_eq!(split.notes, reference.notes);
        assert_eq!(split.changed, reference.changed);
    }

    #[test]
    fn the_split_decodes_what_the_whole_document_decodes() {
        let text = doc("7", &[cluster("a"), cla("a", 80)]);
        let split = read(&text, &Known::default()).expect("split");
        let reference = whole(&text).expect("whole");
        assert_eq!(split.changed, reference.changed);
        assert_eq!(split.version, reference.version);
    }

    #[test]
    fn a_bad_resource_fails_with_the_files_own_line() {
        let good = doc("1", &[cluster("a"), cla("a", 80)]);
        let known = read(&good, &Known::default()).expect("good").next;
        let bad = doc(
            "2",
            &[
                cluster("a"),
                cla("a", 80).replace("\"portValue\":80", "\"portValue\":\"eighty\""),
            ],
        );
        let err = read(&bad, &known).expect_err("not a number").to_string();
        let reference = whole(&bad).expect_err("whole fails too").to_string();
        assert_eq!(err, reference);
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_top_level_fields_and_repeated_keys_are_the_reference_decoders_call() {
        let unknown = r#"{"versionInfo":"1","resourcez":[]}"#;
        assert!(read(unknown, &Known::default()).is_err());
        let twice = format!(
            r#"{{"versionInfo":"1","resources":[{}],"resources":[]}}"#,
            cluster("a")
        );
        assert_eq!(
            read(&twice, &Known::default()).ok().map(|r| r.changed),
            whole(&twice).ok().map(|r| r.changed)
        );
    }

    #[test]
    fn two_resources_with_one_name_are_decoded_in_order_not_kept() {
        let first = doc("1", &[cla("a", 80)]);
        let known = read(&first, &Known::default()).expect("first").next;
        // The accepted text first, a new one with the same name after it: the
        // later one wins, as in a whole decode, so nothing may be kept.
        let second = doc("2", &[cla("a", 80), cla("a", 81)]);
        let r = read(&second, &known).expect("second");
        assert!(r.kept.is_empty());
        assert_eq!(r.changed.len(), 2);
    }

    #[test]
    fn yaml_is_decoded_whole() {
        let yaml = "version_info: \"3\"\nresources: []\n";
        let r = read(yaml, &Known::default()).expect("yaml");
        assert_eq!(r.version, "3");
        assert!(r.next.is_empty());
    }

    #[test]
    fn many_resources_decode_in_parallel_in_order() {
        let resources: Vec<String> = (0..PARALLEL_FROM as u16 + 10)
            .map(|i| cla(&format!("svc-{i}"), 1000 + i))
            .collect();
        let text = doc("1", &resources);
        let split = read(&text, &Known::default()).expect("split");
        let reference = whole(&text).expect("whole");
        assert_eq!(split.changed, reference.changed);
    }
}
