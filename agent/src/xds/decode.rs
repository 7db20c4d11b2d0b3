//! Decoding xDS resources: protobuf `Any` from gRPC, and proto3 JSON/YAML (files and
//! REST) by reflection over the descriptors `envoy-types` ships, so every field of
//! the Envoy API is understood (camelCase or snake_case names, `@type`, durations as
//! strings, wrapper types), not a hand-picked subset.

use prost::Message as _;
use prost_reflect::{DeserializeOptions, DynamicMessage, SerializeOptions};
use sockmesh_proto::{
    descriptor_pool,
    pb::{
        envoy::{
            config::{
                cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
                route::v3::RouteConfiguration,
            },
            service::discovery::v3::{DiscoveryRequest, DiscoveryResponse},
        },
        google::protobuf::Any,
    },
    type_url,
};

use super::validate::{
    InvalidResource, validate_cluster, validate_endpoints, validate_listener, validate_route,
};
use super::{
    opaque::{self, OpaqueError, OpaqueTypes},
    unknown::UnknownFields,
};

/// The resource types sockmesh consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Cluster,
    Endpoint,
    Listener,
    Route,
}

impl Kind {
    /// Subscription order: clusters and their endpoints warm before listeners and
    /// routes, as Envoy does.
    pub const ALL: [Kind; 4] = [Kind::Cluster, Kind::Endpoint, Kind::Listener, Kind::Route];

    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Cluster => type_url::CLUSTER,
            Kind::Endpoint => type_url::ENDPOINT,
            Kind::Listener => type_url::LISTENER,
            Kind::Route => type_url::ROUTE,
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// Short name used in logs and metrics (`cds`, `eds`, `lds`, `rds`).
    pub fn short(self) -> &'static str {
        match self {
            Kind::Cluster => "cds",
            Kind::Endpoint => "eds",
            Kind::Listener => "lds",
            Kind::Route => "rds",
        }
    }

    /// Wildcard types (all resources) versus types subscribed by name.
    pub fn is_wildcard(self) -> bool {
        matches!(self, Kind::Cluster | Kind::Listener)
    }
}

/// One decoded, validated resource.
#[derive(Clone, Debug)]
pub enum Resource {
    Cluster(Box<Cluster>),
    Endpoint(Box<ClusterLoadAssignment>),
    Listener(Box<Listener>),
    Route(Box<RouteConfiguration>),
}

impl Resource {
    pub fn name(&self) -> &str {
        match self {
            Resource::Cluster(c) => &c.name,
            Resource::Endpoint(e) => &e.cluster_name,
            Resource::Listener(l) => &l.name,
            Resource::Route(r) => &r.name,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Resource::Cluster(_) => Kind::Cluster,
            Resource::Endpoint(_) => Kind::Endpoint,
            Resource::Listener(_) => Kind::Listener,
            Resource::Route(_) => Kind::Route,
        }
    }
}

/// Why a resource or document was rejected.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("resource type {type_url:?} is not the {} type {:?}", kind.short(), kind.type_url())]
    WrongType { type_url: String, kind: Kind },
    #[error("{type_url}: malformed protobuf: {source}")]
    Protobuf {
        type_url: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error(transparent)]
    Invalid(#[from] InvalidResource),
    #[error(transparent)]
    Opaque(#[from] OpaqueError),
    #[error("JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("YAML: {0}")]
    Yaml(#[source] serde_yaml_ng::Error),
    /// A YAML document that failed as the JSON tree it was read into.
    #[error("YAML: {0}")]
    YamlTree(#[source] serde_json::Error),
    /// A document with nothing in it: refused, never read as "remove everything"
    /// (Envoy refuses such a file: "Unable to convert YAML as JSON",
    /// `MessageUtil::loadFromYaml`).
    #[error(
        "the document is {0}: refused (a file truncated or emptied by mistake must not remove every service; `resources: []` removes them)"
    )]
    ContentFree(&'static str),
    /// A configuration file without a `resources` list.
    #[error(
        "the document has no `resources` list: refused (`resources: []` removes every service)"
    )]
    NoResources,
    #[error("the descriptor pool has no {0}")]
    NoDescriptor(String),
}

/// Decodes and validates one `Any` of the expected kind.
pub fn decode_any(any: &Any, kind: Kind) -> Result<Resource, DecodeError> {
    if any.type_url != kind.type_url() {
        return Err(DecodeError::WrongType {
            type_url: any.type_url.clone(),
            kind,
        });
    }
    let bytes = any.value.as_slice();
    let protobuf = |source| DecodeError::Protobuf {
        type_url: any.type_url.clone(),
        source,
    };
    let r = match kind {
        Kind::Cluster => {
            let c = Cluster::decode(bytes).map_err(protobuf)?;
            validate_cluster(&c)?;
            Resource::Cluster(Box::new(c))
        }
        Kind::Endpoint => {
            let e = ClusterLoadAssignment::decode(bytes).map_err(protobuf)?;
            validate_endpoints(&e)?;
            Resource::Endpoint(Box::new(e))
        }
        Kind::Listener => {
            let l = Listener::decode(bytes).map_err(protobuf)?;
            validate_listener(&l)?;
            Resource::Listener(Box::new(l))
        }
        Kind::Route => {
            let r = RouteConfiguration::decode(bytes).map_err(protobuf)?;
            validate_route(&r)?;
            Resource::Route(Box::new(r))
        }
    };
    Ok(r)
}

/// What a text document held that is not in its decoded message: nested configs
/// of types sockmesh does not know (carried opaquely, see [`super::opaque`]) and
/// fields it does not know (ignored, see [`super::unknown`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextNotes {
    pub opaque: OpaqueTypes,
    pub unknown_fields: UnknownFields,
}

impl TextNotes {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: TextNotes) {
        for (t, n) in other.opaque {
            *self.opaque.entry(t).or_default() += n;
        }
        for (f, n) in other.unknown_fields {
            *self.unknown_fields.entry(f).or_default() += n;
        }
    }
}

/// A `DiscoveryResponse` from proto3 JSON (text starting with `{`) or YAML, as in
/// Envoy's filesystem subscriptions and REST-JSON xDS. Errors carry the line and
/// column (JSON/YAML syntax, a value of the wrong type).
pub fn discovery_response_from_text(text: &str) -> Result<DiscoveryResponse, DecodeError> {
    discovery_response_with_opaque(text).map(|(r, _)| r)
}

/// [`discovery_response_from_text`], also returning what the text held that was
/// not decoded (see [`TextNotes`]).
pub fn discovery_response_with_opaque(
    text: &str,
) -> Result<(DiscoveryResponse, TextNotes), DecodeError> {
    message_from_text("envoy.service.discovery.v3.DiscoveryResponse", text)
}

/// A configuration file's `DiscoveryResponse`: as [`discovery_response_with_opaque`],
/// and with a `resources` list, empty only if written so (`resources: []`).
/// (A REST response omits an empty list, as the proto3 JSON mapping does.)
pub fn discovery_document(text: &str) -> Result<(DiscoveryResponse, TextNotes), DecodeError> {
    let (resp, notes) = discovery_response_with_opaque(text)?;
    if resp.resources.is_empty() && !has_resources_key(text) {
        return Err(DecodeError::NoResources);
    }
    Ok((resp, notes))
}

/// Whether the document's top level holds a `resources` key (JSON is YAML).
fn has_resources_key(text: &str) -> bool {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    serde_yaml_ng::from_str::<serde_yaml_ng::Mapping>(text)
        .is_ok_and(|m| m.contains_key("resources"))
}

/// A `DiscoveryRequest` from proto3 JSON or YAML (the REST-JSON request body).
pub fn discovery_request_from_text(text: &str) -> Result<DiscoveryRequest, DecodeError> {
    message_from_text("envoy.service.discovery.v3.DiscoveryRequest", text).map(|(m, _)| m)
}

/// The proto3 JSON of a `DiscoveryRequest` (REST-JSON xDS).
pub fn discovery_request_to_json(req: &DiscoveryRequest) -> Result<String, DecodeError> {
    message_to_json("envoy.service.discovery.v3.DiscoveryRequest", req)
}

/// The proto3 JSON of a `DiscoveryResponse` (REST-JSON xDS, `config_dump`).
pub fn discovery_response_to_json(resp: &DiscoveryResponse) -> Result<String, DecodeError> {
    message_to_json("envoy.service.discovery.v3.DiscoveryResponse", resp)
}

/// Decodes proto3 JSON or YAML of the message `full_name` into `M`.
///
/// A document whose every `@type` the descriptor pool knows and whose every key
/// is a field is decoded as a stream. Any other is read into a tree: its unknown
/// nested `Any`s are made opaque, its unknown fields removed and counted, and it
/// is decoded against the pool plus placeholders for those types. An error is the
/// text's own, with its line and column. A UTF-8 byte order mark is skipped; a
/// document with nothing in it is refused.
pub fn message_from_text<M: prost::Message + Default>(
    full_name: &str,
    text: &str,
) -> Result<(M, TextNotes), DecodeError> {
    message_from_text_in(descriptor_pool(), full_name, text)
}

/// What a document holds when it holds nothing: `None` for a document with
/// content, else what it is (empty, whitespace, only YAML comments and document
/// markers).
pub fn content_free(text: &str) -> Option<&'static str> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.is_empty() {
        return Some("empty");
    }
    if text.trim().is_empty() {
        return Some("only whitespace");
    }
    let nothing = |line: &str| {
        let t = line.trim();
        let t = t
            .strip_prefix("---")
            .or_else(|| t.strip_prefix("..."))
            .map_or(t, str::trim_start);
        t.is_empty() || t.starts_with('#')
    };
    text.lines()
        .all(nothing)
        .then_some("only YAML comments and document markers")
}

/// [`message_from_text`] against `base`, a pool of the same descriptors (see
/// [`sockmesh_proto::descriptor_pool_copy`]).
pub fn message_from_text_in<M: prost::Message + Default>(
    base: &prost_reflect::DescriptorPool,
    full_name: &str,
    text: &str,
) -> Result<(M, TextNotes), DecodeError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if let Some(what) = content_free(text) {
        return Err(DecodeError::ContentFree(what));
    }
    let json = text.trim_start().starts_with('{');
    let descriptor = |pool: &prost_reflect::DescriptorPool| {
        pool.get_message_by_name(full_name)
            .ok_or_else(|| DecodeError::NoDescriptor(full_name.to_owned()))
    };
    let known_types = opaque::unknown_types_in_text(text, base).is_empty();
    if known_types && let Ok(m) = decode_stream(descriptor(base)?, text, json, true) {
        return Ok((to_message(&m, full_name)?, TextNotes::default()));
    }
    let tree: Result<serde_json::Value, DecodeError> = if json {
        serde_json::from_str(text).map_err(DecodeError::Json)
    } else {
        serde_yaml_ng::from_str(text).map_err(DecodeError::Yaml)
    };
    let mut tree = match tree {
        Ok(t) => t,
        // The first error in the text's order, as the stream meets it (lenient on
        // unknown fields, which are not errors).
        Err(e) if known_types => {
            return Err(decode_stream(descriptor(base)?, text, json, false)
                .err()
                .unwrap_or(e));
        }
        Err(e) => return Err(e),
    };
    let opaque = opaque::scrub_document(&mut tree, base)?;
    let types = opaque.keys().cloned().collect();
    let pool = opaque::pool_with_placeholders(base, &types)?;
    let desc = descriptor(&pool)?;
    let mut unknown_fields = UnknownFields::new();
    super::unknown::strip(&mut tree, &desc, &pool, &mut unknown_fields);
    let strict = DeserializeOptions::new().deny_unknown_fields(true);
    match DynamicMessage::deserialize_with_options(desc.clone(), tree, &strict) {
        Ok(m) => Ok((
            to_message(&m, full_name)?,
            TextNotes {
                opaque,
                unknown_fields,
            },
        )),
        // The same decode of the text itself, lenient on what the tree lost,
        // gives the error its line and column.
        Err(e) => Err(decode_stream(desc, text, json, false)
            .err()
            .unwrap_or(if json {
                DecodeError::Json(e)
            } else {
                DecodeError::YamlTree(e)
            })),
    }
}

/// A streaming decode of `text` as `desc`, denying unknown fields or not.
fn decode_stream(
    desc: prost_reflect::MessageDescriptor,
    text: &str,
    json: bool,
    deny_unknown: bool,
) -> Result<DynamicMessage, DecodeError> {
    let options = DeserializeOptions::new().deny_unknown_fields(deny_unknown);
    if json {
        let mut de = serde_json::Deserializer::from_str(text);
        let m = DynamicMessage::deserialize_with_options(desc, &mut de, &options)
            .map_err(DecodeError::Json)?;
        de.end().map_err(DecodeError::Json)?;
        Ok(m)
    } else {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        DynamicMessage::deserialize_with_options(desc, de, &options).map_err(DecodeError::Yaml)
    }
}

fn to_message<M: prost::Message + Default>(
    dynamic: &DynamicMessage,
    full_name: &str,
) -> Result<M, DecodeError> {
    M::decode(dynamic.encode_to_vec().as_slice()).map_err(|source| DecodeError::Protobuf {
        type_url: full_name.to_owned(),
        source,
    })
}

/// Encodes `msg` (of the message type `full_name`) as proto3 JSON.
pub fn message_to_json<M: prost::Message>(full_name: &str, msg: &M) -> Result<String, DecodeError> {
    let desc = descriptor_pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| DecodeError::NoDescriptor(full_name.to_owned()))?;
    let dynamic =
        DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()).map_err(|source| {
            DecodeError::Protobuf {
                type_url: full_name.to_owned(),
                source,
            }
        })?;
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    dynamic
        .serialize_with_options(&mut ser, &SerializeOptions::new())
        .map_err(DecodeError::Json)?;
    // serde_json writes UTF-8.
    Ok(String::from_utf8_lossy(&out).into_owned())
}
