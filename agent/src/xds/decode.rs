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

use super::opaque::{self, OpaqueError, OpaqueTypes};
use super::validate::{
    InvalidResource, validate_cluster, validate_endpoints, validate_listener, validate_route,
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
    #[error("resource of type {type_url} is not supported (expected {kind:?})")]
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
    #[error("{0}")]
    Document(String),
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

/// A `DiscoveryResponse` from proto3 JSON (text starting with `{`) or YAML, as in
/// Envoy's filesystem subscriptions and REST-JSON xDS. Errors carry the line and
/// column (JSON/YAML syntax) or the field path (unknown field, wrong type).
pub fn discovery_response_from_text(text: &str) -> Result<DiscoveryResponse, DecodeError> {
    discovery_response_with_opaque(text).map(|(r, _)| r)
}

/// [`discovery_response_from_text`], also returning the nested `Any`s of types
/// sockmesh does not know, which were carried opaquely (see [`super::opaque`]).
pub fn discovery_response_with_opaque(
    text: &str,
) -> Result<(DiscoveryResponse, OpaqueTypes), DecodeError> {
    message_from_text("envoy.service.discovery.v3.DiscoveryResponse", text)
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
/// A document whose every `@type` the descriptor pool knows is decoded as a stream
/// (errors keep their line and column). One that names other types is read into a
/// tree first, its unknown nested `Any`s are made opaque, and it is decoded against
/// the pool plus placeholders for those types.
pub fn message_from_text<M: prost::Message + Default>(
    full_name: &str,
    text: &str,
) -> Result<(M, OpaqueTypes), DecodeError> {
    message_from_text_in(descriptor_pool(), full_name, text)
}

/// [`message_from_text`] against `base`, a pool of the same descriptors (see
/// [`sockmesh_proto::descriptor_pool_copy`]).
pub fn message_from_text_in<M: prost::Message + Default>(
    base: &prost_reflect::DescriptorPool,
    full_name: &str,
    text: &str,
) -> Result<(M, OpaqueTypes), DecodeError> {
    let unknown = opaque::unknown_types_in_text(text, base);
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let json = text.trim_start().starts_with('{');
    let descriptor = |pool: &prost_reflect::DescriptorPool| {
        pool.get_message_by_name(full_name)
            .ok_or_else(|| DecodeError::Document(format!("no descriptor for {full_name}")))
    };
    let (dynamic, found) = if unknown.is_empty() {
        let desc = descriptor(base)?;
        let m = if json {
            let mut de = serde_json::Deserializer::from_str(text);
            let m = DynamicMessage::deserialize_with_options(desc, &mut de, &options)
                .map_err(|e| DecodeError::Document(format!("JSON: {e}")))?;
            de.end()
                .map_err(|e| DecodeError::Document(format!("JSON: {e}")))?;
            m
        } else {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            DynamicMessage::deserialize_with_options(desc, de, &options)
                .map_err(|e| DecodeError::Document(format!("YAML: {e}")))?
        };
        (m, OpaqueTypes::new())
    } else {
        let format = if json { "JSON" } else { "YAML" };
        let mut tree: serde_json::Value = if json {
            serde_json::from_str(text).map_err(|e| DecodeError::Document(format!("JSON: {e}")))?
        } else {
            serde_yaml_ng::from_str(text)
                .map_err(|e| DecodeError::Document(format!("YAML: {e}")))?
        };
        let found = opaque::scrub_document(&mut tree, base)?;
        let types = found.keys().cloned().collect();
        let pool = opaque::pool_with_placeholders(base, &types)?;
        let m = DynamicMessage::deserialize_with_options(descriptor(&pool)?, tree, &options)
            .map_err(|e| DecodeError::Document(format!("{format}: {e}")))?;
        (m, found)
    };
    let message =
        M::decode(dynamic.encode_to_vec().as_slice()).map_err(|source| DecodeError::Protobuf {
            type_url: full_name.to_owned(),
            source,
        })?;
    Ok((message, found))
}

/// Encodes `msg` (of the message type `full_name`) as proto3 JSON.
pub fn message_to_json<M: prost::Message>(full_name: &str, msg: &M) -> Result<String, DecodeError> {
    let desc = descriptor_pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| DecodeError::Document(format!("no descriptor for {full_name}")))?;
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
        .map_err(|e| DecodeError::Document(e.to_string()))?;
    String::from_utf8(out).map_err(|e| DecodeError::Document(e.to_string()))
}
