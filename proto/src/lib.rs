//! Envoy xDS types and their descriptors.
//!
//! The Rust types come from `envoy-types` (prost). [`descriptor_pool`] holds the
//! protobuf descriptors of the same .proto files, which is what proto3 JSON/YAML
//! decoding (`@type` in `Any`, camelCase and snake_case names, durations as strings,
//! wrapper types) needs.

use std::sync::OnceLock;

pub use envoy_types::pb;
pub use prost_reflect;
use prost_reflect::DescriptorPool;

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

/// The descriptors of every message `envoy-types` generates (Envoy data-plane API,
/// xDS, googleapis well-known types, validate annotations). Decoded once.
pub fn descriptor_pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        // The set is a build input checked by the unit test below; failing to decode
        // it is a build defect, not a runtime condition.
        #[expect(clippy::expect_used, reason = "build-time constant input")]
        DescriptorPool::decode(DESCRIPTORS).expect("envoy-types descriptor set decodes")
    })
}

static MESSAGE_NAMES: &str = include_str!(concat!(env!("OUT_DIR"), "/message_names.txt"));

/// Whether [`descriptor_pool`] has a message of this full name, without decoding
/// the pool: decoded, it takes about 10 MiB of the agent's memory, which an agent on
/// ADS (protobuf throughout) never needs for anything else.
pub fn is_known_message(full_name: &str) -> bool {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES
        .get_or_init(|| MESSAGE_NAMES.lines().collect())
        .binary_search(&full_name)
        .is_ok()
}

/// A pool of its own, decoded anew (not a handle on [`descriptor_pool`]'s), for a
/// thread that decodes beside others: every message prost-reflect builds clones
/// its descriptor's handle on the pool, an atomic reference count, and threads
/// sharing one pool contend on that one count.
pub fn descriptor_pool_copy() -> DescriptorPool {
    #[expect(clippy::expect_used, reason = "build-time constant input")]
    DescriptorPool::decode(DESCRIPTORS).expect("envoy-types descriptor set decodes")
}

/// Type URLs of the resources sockmesh consumes.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name list is the pool's messages, every one of them and nothing else.
    #[test]
    fn the_message_names_are_the_pools() {
        let pool = descriptor_pool();
        let mut from_pool: Vec<String> = pool
            .all_messages()
            .map(|m| m.full_name().to_owned())
            .collect();
        from_pool.sort();
        let listed: Vec<&str> = MESSAGE_NAMES.lines().collect();
        assert_eq!(listed, from_pool);
        for name in &from_pool {
            assert!(is_known_message(name), "{name}");
        }
        for unknown in ["", "stats.PluginConfig", "envoy.config.listener.v3", "zzz"] {
            assert!(!is_known_message(unknown), "{unknown}");
        }
    }

    #[test]
    fn pool_knows_the_resource_types() {
        let pool = descriptor_pool();
        for url in [
            type_url::LISTENER,
            type_url::CLUSTER,
            type_url::ENDPOINT,
            type_url::ROUTE,
        ] {
            let name = url.trim_start_matches("type.googleapis.com/");
            assert!(pool.get_message_by_name(name).is_some(), "{name}");
        }
        assert!(
            pool.get_message_by_name("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy")
                .is_some()
        );
    }
}
