//! Unknown fields in proto3 JSON/YAML documents (file and REST sources).
//!
//! Envoy ignores a field it does not know in dynamic configuration, with a
//! warning and a count (`server.dynamic_unknown_fields`), unless started with
//! `--reject-unknown-dynamic-fields` (`ProtobufMessage::ValidationVisitor`,
//! `source/server/options_impl.cc`): a newer control plane may send fields an
//! older proxy does not have. sockmesh does the same: each key of a document that
//! names no field of its message is removed before decoding, counted under
//! `Message.key`, and logged once (by the core).
//!
//! Over gRPC a field sockmesh does not know is a tag prost skips.

use std::collections::BTreeMap;

use prost_reflect::{DescriptorPool, Kind, MessageDescriptor};
use serde_json::Value;

/// Occurrences of each unknown field (`envoy.config.cluster.v3.Cluster.foo`) in
/// one document.
pub type UnknownFields = BTreeMap<String, u64>;

/// Well-known types whose JSON is not an object of their fields (anything inside
/// is theirs to read).
const OPAQUE_JSON: &[&str] = &[
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Duration",
    "google.protobuf.Timestamp",
    "google.protobuf.FieldMask",
    "google.protobuf.Empty",
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.BoolValue",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
];

/// Removes every key of `value` (the JSON of a `desc` message) that names no
/// field, at any depth, counting each in `found`. `pool` resolves `Any` types
/// (an unknown one was made opaque before: see `super::opaque`).
pub fn strip(
    value: &mut Value,
    desc: &MessageDescriptor,
    pool: &DescriptorPool,
    found: &mut UnknownFields,
) {
    let name = desc.full_name();
    if OPAQUE_JSON.contains(&name) {
        return;
    }
    let Value::Object(object) = value else {
        return;
    };
    if name == "google.protobuf.Any" {
        let inner = object
            .get("@type")
            .and_then(Value::as_str)
            .and_then(|t| pool.get_message_by_name(super::validate::message_name(t)));
        let Some(inner) = inner else { return };
        if OPAQUE_JSON.contains(&inner.full_name()) {
            return;
        }
        strip_fields(object, &inner, pool, found, &["@type"]);
        return;
    }
    strip_fields(object, desc, pool, found, &[]);
}

fn strip_fields(
    object: &mut serde_json::Map<String, Value>,
    desc: &MessageDescriptor,
    pool: &DescriptorPool,
    found: &mut UnknownFields,
    keep: &[&str],
) {
    let mut unknown = Vec::new();
    for (key, v) in object.iter_mut() {
        if keep.contains(&key.as_str()) {
            continue;
        }
        let field = desc
            .get_field_by_json_name(key)
            .or_else(|| desc.get_field_by_name(key));
        let Some(field) = field else {
            unknown.push(key.clone());
            continue;
        };
        let Kind::Message(m) = field.kind() else {
            continue;
        };
        if field.is_map() {
            let value_field = m.map_entry_value_field();
            if let (Kind::Message(vm), Value::Object(entries)) = (value_field.kind(), v) {
                for entry in entries.values_mut() {
                    strip(entry, &vm, pool, found);
                }
            }
        } else if field.is_list() {
            if let Value::Array(items) = v {
                for item in items {
                    strip(item, &m, pool, found);
                }
            }
        } else {
            strip(v, &m, pool, found);
        }
    }
    for key in unknown {
        object.remove(&key);
        *found
            .entry(format!("{}.{key}", desc.full_name()))
            .or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_removed_and_counted_at_any_depth_known_ones_kept() {
        let pool = sockmesh_proto::descriptor_pool();
        let desc = pool
            .get_message_by_name("envoy.service.discovery.v3.DiscoveryResponse")
            .expect("descriptor");
        let mut doc = serde_json::json!({
            "versionInfo": "1",
            "future_top": 1,
            "resources": [{
                "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                "name": "c",
                "connectTimeout": "1s",
                "newKnob": {"x": 1},
                "loadAssignment": {"clusterName": "c", "endpoints": [
                    {"lbEndpoints": [{"endpoint": {"address": {"socketAddress": {
                        "address": "10.0.0.1", "portValue": 80, "zone": "z"}}}}]}
                ]},
                "metadata": {"filterMetadata": {"istio": {"anything": "goes"}}},
                "typedExtensionProtocolOptions": {"x": {
                    "@type": "type.googleapis.com/google.protobuf.Struct",
                    "value": {"free": "form"}
                }}
            }]
        });
        let mut found = UnknownFields::new();
        strip(&mut doc, &desc, pool, &mut found);
        assert_eq!(
            found,
            UnknownFields::from([
                ("envoy.config.cluster.v3.Cluster.newKnob".to_owned(), 1),
                ("envoy.config.core.v3.SocketAddress.zone".to_owned(), 1),
                (
                    "envoy.service.discovery.v3.DiscoveryResponse.future_top".to_owned(),
                    1
                ),
            ])
        );
        let c = &doc["resources"][0];
        assert!(c.get("newKnob").is_none() && c["connectTimeout"] == "1s");
        assert_eq!(
            c["metadata"]["filterMetadata"]["istio"]["anything"], "goes",
            "a Struct's contents are its own"
        );
        assert_eq!(
            c["typedExtensionProtocolOptions"]["x"]["value"]["free"],
            "form"
        );
    }
}
