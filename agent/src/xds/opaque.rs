//! Nested `Any`s of types sockmesh's descriptor pool does not know, in proto3
//! JSON/YAML documents (file and REST sources).
//!
//! istiod puts its own extension types inside `typed_config` (`stats.PluginConfig`,
//! `envoy.tcp.metadataexchange.config.MetadataExchange`,
//! `istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig`, Wasm
//! configurations, …). sockmesh never reads them, but proto3 JSON can only be turned
//! into protobuf with the descriptor of every `@type` it names. Such an `Any` is
//! carried opaquely instead: its type URL is kept, its contents dropped (an empty
//! value), and it is counted. Over gRPC nothing of the kind is needed: a nested
//! `Any` is bytes that are never decoded.
//!
//! The top-level resources of a `DiscoveryResponse` are not nested: an unknown type
//! there is an error that names it.
//!
//! A TypedStruct (`udpa.type.v1.TypedStruct`, `xds.type.v3.TypedStruct`: a config
//! of another type, as a Struct) keeps its `type_url`, so what it wraps can be
//! named (see `translate`'s notes on listeners left alone).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
};

use prost_reflect::DescriptorPool;
use prost_types::{
    DescriptorProto, FieldDescriptorProto, FileDescriptorProto, field_descriptor_proto,
};

/// Occurrences of each opaque type URL in one document.
pub type OpaqueTypes = BTreeMap<String, u64>;

/// Why a document with unknown types cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum OpaqueError {
    #[error("resources[{index}]: resource type {type_url} is not known to sockmesh")]
    UnknownResource { index: usize, type_url: String },
    #[error("{type_url}: not a type URL (expected …/package.Message)")]
    BadTypeUrl { type_url: String },
    #[error("registering a placeholder for {type_url}")]
    Placeholder {
        type_url: String,
        #[source]
        source: prost_reflect::DescriptorError,
    },
}

/// Whether a message name is a TypedStruct's (udpa's or xds's).
fn is_typed_struct(name: &str) -> bool {
    matches!(name, "udpa.type.v1.TypedStruct" | "xds.type.v3.TypedStruct")
}

/// The message name of a type URL (`type.googleapis.com/a.b.C` → `a.b.C`).
fn message_name(type_url: &str) -> &str {
    type_url.rsplit_once('/').map_or(type_url, |(_, name)| name)
}

/// The `@type` values written in a JSON or YAML document, found by a scan of the
/// text (cheap, and a superset is harmless: every candidate is checked against the
/// pool). Types the pool knows are left out.
pub fn unknown_types_in_text(text: &str, pool: &DescriptorPool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("@type") {
        rest = &rest[at + "@type".len()..];
        let value = rest.trim_start_matches(['"', '\'', ' ', '\t', ':']);
        let end = value
            .find(['"', '\'', ',', '}', ']', ' ', '\t', '\r', '\n'])
            .unwrap_or(value.len());
        let url = &value[..end];
        if !url.is_empty() && pool.get_message_by_name(message_name(url)).is_none() {
            out.insert(url.to_owned());
        }
    }
    out
}

/// Replaces every nested `Any` of a type the pool does not know with one that
/// names only its type, and counts it. `document` is the whole document; its
/// `resources` (the top-level Anys) must be of known types.
pub fn scrub_document(
    document: &mut serde_json::Value,
    pool: &DescriptorPool,
) -> Result<OpaqueTypes, OpaqueError> {
    let mut found = OpaqueTypes::new();
    let Some(fields) = document.as_object_mut() else {
        return Ok(found);
    };
    for (key, value) in fields.iter_mut() {
        if key != "resources" {
            scrub(value, pool, &mut found);
            continue;
        }
        let Some(resources) = value.as_array_mut() else {
            continue;
        };
        for (index, resource) in resources.iter_mut().enumerate() {
            let Some(object) = resource.as_object_mut() else {
                continue;
            };
            if let Some(url) = object.get("@type").and_then(|t| t.as_str())
                && pool.get_message_by_name(message_name(url)).is_none()
            {
                return Err(OpaqueError::UnknownResource {
                    index,
                    type_url: url.to_owned(),
                });
            }
            for child in object.values_mut() {
                scrub(child, pool, &mut found);
            }
        }
    }
    Ok(found)
}

fn scrub(value: &mut serde_json::Value, pool: &DescriptorPool, found: &mut OpaqueTypes) {
    match value {
        serde_json::Value::Object(object) => {
            let unknown = object
                .get("@type")
                .and_then(|t| t.as_str())
                .filter(|url| pool.get_message_by_name(message_name(url)).is_none())
                .map(str::to_owned);
            match unknown {
                Some(url) => {
                    let typed_struct = is_typed_struct(message_name(&url));
                    object.retain(|k, v| {
                        k == "@type" || (typed_struct && k == "type_url" && v.is_string())
                    });
                    *found.entry(url).or_default() += 1;
                }
                None => object.values_mut().for_each(|v| scrub(v, pool, found)),
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| scrub(v, pool, found)),
        _ => {}
    }
}

/// `base` plus an empty message for each of `types`, so that an `Any` naming one
/// of them (with no contents, see [`scrub_document`]) decodes. Built pools are
/// cached: a control plane sends the same few types again and again.
pub fn pool_with_placeholders(
    base: &DescriptorPool,
    types: &BTreeSet<String>,
) -> Result<DescriptorPool, OpaqueError> {
    static CACHE: Mutex<Option<(BTreeSet<String>, DescriptorPool)>> = Mutex::new(None);
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((known, pool)) = cache.as_ref()
        && types.is_subset(known)
    {
        return Ok(pool.clone());
    }
    let mut all: BTreeSet<String> = cache.as_ref().map(|(k, _)| k.clone()).unwrap_or_default();
    all.extend(types.iter().cloned());
    let mut pool = base.clone();
    for (i, url) in all.iter().enumerate() {
        let name = message_name(url);
        let (package, message) = name.rsplit_once('.').unwrap_or(("", name));
        if message.is_empty()
            || !message
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(OpaqueError::BadTypeUrl {
                type_url: url.clone(),
            });
        }
        pool.add_file_descriptor_proto(FileDescriptorProto {
            name: Some(format!("sockmesh/opaque/{i}.proto")),
            package: (!package.is_empty()).then(|| package.to_owned()),
            message_type: vec![DescriptorProto {
                name: Some(message.to_owned()),
                field: if is_typed_struct(name) {
                    vec![FieldDescriptorProto {
                        name: Some("type_url".into()),
                        number: Some(1),
                        label: Some(field_descriptor_proto::Label::Optional as i32),
                        r#type: Some(field_descriptor_proto::Type::String as i32),
                        json_name: Some("typeUrl".into()),
                        ..Default::default()
                    }]
                } else {
                    Vec::new()
                },
                ..Default::default()
            }],
            syntax: Some("proto3".into()),
            ..Default::default()
        })
        .map_err(|source| OpaqueError::Placeholder {
            type_url: url.clone(),
            source,
        })?;
    }
    *cache = Some((all, pool.clone()));
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_unknown_types_in_json_and_yaml() {
        let pool = sockmesh_proto::descriptor_pool();
        let json = r#"{"a": {"@type": "type.googleapis.com/stats.PluginConfig"}, "b": {"@type":"type.googleapis.com/envoy.config.listener.v3.Listener"}}"#;
        assert_eq!(
            unknown_types_in_text(json, pool),
            BTreeSet::from(["type.googleapis.com/stats.PluginConfig".to_owned()])
        );
        let yaml = "x:\n  \"@type\": type.googleapis.com/istio.x.v1.Foo\n  y: { '@type': 'type.googleapis.com/a.B', z: 1 }\n";
        assert_eq!(
            unknown_types_in_text(yaml, pool),
            BTreeSet::from([
                "type.googleapis.com/a.B".to_owned(),
                "type.googleapis.com/istio.x.v1.Foo".to_owned()
            ])
        );
    }

    #[test]
    fn nested_unknown_anys_are_emptied_and_counted_top_level_ones_refused() {
        let pool = sockmesh_proto::descriptor_pool();
        let mut doc = serde_json::json!({
            "resources": [{
                "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
                "filter_chains": [{"filters": [
                    {"typed_config": {"@type": "type.googleapis.com/stats.PluginConfig", "x": 1}},
                    {"typed_config": {"@type": "type.googleapis.com/stats.PluginConfig"}},
                ]}]
            }]
        });
        let found = scrub_document(&mut doc, pool).expect("scrubbed");
        assert_eq!(found["type.googleapis.com/stats.PluginConfig"], 2);
        assert_eq!(
            doc["resources"][0]["filter_chains"][0]["filters"][0]["typed_config"],
            serde_json::json!({"@type": "type.googleapis.com/stats.PluginConfig"})
        );
        let mut doc = serde_json::json!({"resources": [{"@type": "type.googleapis.com/no.Such"}]});
        let err = scrub_document(&mut doc, pool).expect_err("top level");
        assert_eq!(
            err.to_string(),
            "resources[0]: resource type type.googleapis.com/no.Such is not known to sockmesh"
        );
    }
}
