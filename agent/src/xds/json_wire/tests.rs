//! The oracle is the reference decoder itself (prost-reflect, through
//! `message_from_text_in`, as the file source uses it), in
//! [`check_against_reference`]: wherever the fast decoder returns a resource, the
//! reference accepts the same text, notes nothing, and gives the same message.

use proptest::prelude::*;
use serde_json::{Value, json};
use sockmesh_proto::descriptor_pool;

use super::*;

fn fast(text: &str) -> Option<Any> {
    super::any(
        &mut Schema::new(descriptor_pool()),
        text,
        &mut OpaqueTypes::new(),
    )
}

/// Resources of every kind sockmesh reads, in both spellings of field names,
/// with the well-known types a configuration uses.
fn seeds() -> Vec<Value> {
    vec![
        json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": "outbound|80||reviews.default.svc.cluster.local",
            "type": "EDS",
            "edsClusterConfig": {"edsConfig": {"ads": {}, "initialFetchTimeout": "0s", "resourceApiVersion": "V3"}, "serviceName": "outbound|80||reviews"},
            "connectTimeout": "10.250s",
            "lbPolicy": "LEAST_REQUEST",
            "circuitBreakers": {"thresholds": [{"maxConnections": 4294967295u32, "maxPendingRequests": "1024", "maxRetries": 3, "trackRemaining": true}]},
            "commonLbConfig": {"healthyPanicThreshold": {"value": 25.5}, "localityWeightedLbConfig": {}},
            "outlierDetection": {"consecutive5xx": 7, "interval": "-0.000000001s", "baseEjectionTime": "30s", "maxEjectionPercent": 100},
            "metadata": {"filterMetadata": {"istio": {"services": [{"host": "reviews", "name": "reviews", "namespace": "default"}], "default_original_port": 80, "ok": true, "none": null}}},
            "typedExtensionProtocolOptions": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "useDownstreamProtocolConfig": {"http2ProtocolOptions": {"maxConcurrentStreams": 1000}},
                "commonHttpProtocolOptions": {"idleTimeout": "3600s", "maxRequestsPerConnection": 1}}},
            "dnsLookupFamily": 1,
            "perConnectionBufferLimitBytes": 32768,
            "ignoreHealthOnHostRemoval": false
        }),
        json!({
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": "outbound|9080||details.default.svc.cluster.local",
            "endpoints": [
                {"locality": {"region": "us-east1", "zone": "us-east1-b", "sub_zone": ""},
                 "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "10.40.0.9", "port_value": 9080}}, "health_check_config": {}},
                     "health_status": "HEALTHY", "load_balancing_weight": 3,
                     "metadata": {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}}},
                    {"endpoint": {"address": {"socket_address": {"address": "fd00::1", "port_value": "9080", "protocol": "TCP"}}},
                     "health_status": 5}],
                 "load_balancing_weight": 2, "priority": 1},
                {"lb_endpoints": []}],
            "policy": {"overprovisioning_factor": 140, "weighted_priority_health": true}
        }),
        json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "10.96.0.1_80",
            "address": {"socketAddress": {"address": "10.96.0.1", "portValue": 80}},
            "filterChains": [{
                "filterChainMatch": {"prefixRanges": [{"addressPrefix": "10.96.0.0", "prefixLen": 16}], "destinationPort": 80},
                "filters": [{"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "statPrefix": "s", "weightedClusters": {"clusters": [{"name": "a", "weight": 3}, {"name": "b", "weight": 1}]},
                    "idleTimeout": "1.5s"}}]},
              {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "statPrefix": "h", "rds": {"routeConfigName": "80", "configSource": {"ads": {}, "resourceApiVersion": "V3"}},
                    "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    "useRemoteAddress": false, "normalizePath": true}}]}],
            "trafficDirection": "OUTBOUND",
            "bindToPort": false,
            "defaultFilterChain": {"filters": [
                {"name": "istio.stats", "typedConfig": {"@type": "type.googleapis.com/stats.PluginConfig", "disableHostHeaderFallback": true, "nested": {"@type": "x/y"}}},
                {"name": "istio.metadata_exchange", "typedConfig": {"@type": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange", "protocol": "istio-peer-exchange"}},
                {"name": "istio_authn", "typedConfig": {"@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "type_url": "type.googleapis.com/io.istio.network.authn.Config", "value": {"shared": true}}}]},
            "listenerFilters": [{"name": "envoy.filters.listener.original_dst", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}]
        }),
        json!({
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "name": "80",
            "virtualHosts": [{"name": "reviews:80", "domains": ["reviews", "reviews.default.svc.cluster.local", "10.96.0.9:80"],
                "routes": [{"match": {"prefix": "/", "caseSensitive": true},
                    "route": {"weightedClusters": {"clusters": [{"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}]},
                              "timeout": "0s", "maxGrpcTimeout": "0s",
                              "retryPolicy": {"retryOn": "connect-failure", "numRetries": 2, "retriableStatusCodes": [503, 504]}},
                    "typedPerFilterConfig": {"envoy.filters.http.fault": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault", "maxActiveFaults": 3}},
                    "decorator": {"operation": "reviews:80/*"}}]}],
            "validateClusters": false,
            "requestHeadersToAdd": [{"header": {"key": "x-a", "value": "é\u{1F600}\"\\"}, "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD"}]
        }),
    ]
}

/// A resource whose messages are longer than one- and two-byte lengths.
fn long() -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "n".repeat(300),
        "metadata": {"filterMetadata": {"big": {"s": "x".repeat(20_000), "l": (0..200).collect::<Vec<u32>>()}}}
    })
}

fn assert_agrees(text: &str) {
    if let Err(e) = check_against_reference(text) {
        panic!("{e}\n{text}");
    }
}

#[test]
fn the_usual_resources_take_the_fast_path_and_decode_as_the_reference_does() {
    for v in seeds().into_iter().chain([long()]) {
        let text = v.to_string();
        assert_eq!(
            check_against_reference(&text),
            Ok(Taken::Here),
            "left to the reference:\n{text}"
        );
    }
}

#[test]
fn what_the_reference_refuses_or_takes_leniently_is_left_to_it() {
    let cla = r#""@type":"type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment""#;
    let cases = [
        // A key twice (the reference keeps the last; the wire would merge).
        format!(r#"{{{cla},"clusterName":"a","cluster_name":"b"}}"#),
        // Two members of one oneof.
        format!(
            r#"{{{cla},"endpoints":[{{"lbEndpoints":[{{"endpoint":{{}},"endpointName":"e"}}]}}]}}"#
        ),
        // A field the type does not have; an enum name it does not have.
        format!(r#"{{{cla},"clusterNam":"a"}}"#),
        format!(r#"{{{cla},"endpoints":[{{"lbEndpoints":[{{"healthStatus":"FINE"}}]}}]}}"#),
        // null, an integer as a fraction, bytes, a Timestamp-free but unknown @type.
        format!(r#"{{{cla},"policy":null}}"#),
        format!(r#"{{{cla},"endpoints":[{{"priority":1.0}}]}}"#),
        r#"{"@type":"type.googleapis.com/envoy.config.core.v3.DataSource","inlineBytes":"AA=="}"#
            .to_owned(),
        r#"{"@type":"type.googleapis.com/istio.envoy.config.filter.network.Unknown","a":1}"#
            .to_owned(),
        // An `@type` inside a Struct (the reference scrubs it when the pool lacks it).
        format!(r#"{{{cla},"endpoints":[{{"lbEndpoints":[{{"metadata":{{"filterMetadata":{{"a":{{"@type":"x/y"}}}}}}}}]}}]}}"#),
        // `@type` not first.
        r#"{"clusterName":"a","@type":"type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"}"#
            .to_owned(),
        // A well-known type inside an Any.
        r#"{"@type":"type.googleapis.com/google.protobuf.Duration","value":"1s"}"#.to_owned(),
    ];
    for text in cases {
        assert!(fast(&text).is_none(), "taken by the fast decoder:\n{text}");
    }
}

/// Every node of a JSON tree, in preorder, as a path of keys and indexes.
fn paths(v: &Value, at: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                at.push(Step::Key(k.clone()));
                paths(child, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                at.push(Step::Index(i));
                paths(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

fn at<'a>(v: &'a mut Value, path: &[Step]) -> &'a mut Value {
    path.iter().fold(v, |v, s| match s {
        Step::Key(k) => &mut v[k.as_str()],
        Step::Index(i) => &mut v[*i],
    })
}

/// Values a mutation puts anywhere: each is right somewhere and wrong elsewhere.
fn palette() -> Vec<Value> {
    vec![
        json!(null),
        json!(true),
        json!(0),
        json!(-1),
        json!(1.5),
        json!(2.0),
        json!(4_294_967_296u64),
        json!(-2_147_483_649i64),
        json!(18_446_744_073_709_551_615u64),
        json!(1e300),
        json!("1"),
        json!("-7"),
        json!("+2"),
        json!(" 3"),
        json!("1.5"),
        json!("Infinity"),
        json!("NaN"),
        json!("EDS"),
        json!("HEALTHY"),
        json!("1s"),
        json!("1.000000001s"),
        json!("-1.5s"),
        json!("315576000001s"),
        json!("1m"),
        json!(""),
        json!({}),
        json!([]),
        json!([1, "a"]),
        json!([null]),
        json!({"a": 1}),
        json!({"value": 1}),
        json!({"@type": "type.googleapis.com/envoy.config.core.v3.Locality", "zone": "z"}),
        json!({"@type": "type.googleapis.com/stats.PluginConfig", "a": [1]}),
        json!({"@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "type_url": "a/b", "value": {}}),
        json!({"@type": "stats.PluginConfig"}),
        json!({"@type": "type.googleapis.com/envoy.config"}),
        json!({"@type": "type.googleapis.com/a-b.C"}),
    ]
}

/// Writes `v` as JSON, with the first entry of the `dup`-th object (in preorder)
/// written twice.
fn write(v: &Value, dup: usize, seen: &mut usize, out: &mut String) {
    match v {
        Value::Object(m) => {
            let me = *seen;
            *seen += 1;
            out.push('{');
            let mut first = true;
            let mut entry = |k: &String, child: &Value, out: &mut String, seen: &mut usize| {
                if !first {
                    out.push(',');
                }
                first = false;
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write(child, dup, seen, out);
            };
            for (i, (k, child)) in m.iter().enumerate() {
                entry(k, child, out, seen);
                if i == 0 && me == dup {
                    let mut ignore = usize::MAX / 2;
                    entry(k, child, out, &mut ignore);
                }
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, child) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(child, dup, seen, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn camel_or_snake(key: &str) -> String {
    if key.contains('_') {
        let mut out = String::new();
        let mut upper = false;
        for c in key.chars() {
            if c == '_' {
                upper = true;
            } else if upper {
                out.extend(c.to_uppercase());
                upper = false;
            } else {
                out.push(c);
            }
        }
        out
    } else {
        key.chars()
            .flat_map(|c| {
                if c.is_ascii_uppercase() {
                    vec!['_', c.to_ascii_lowercase()]
                } else {
                    vec![c]
                }
            })
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Mutated resources (a value replaced, a key renamed, added, removed or
    /// written twice): wherever the fast decoder returns a resource, the reference
    /// gives the same one.
    #[test]
    fn wherever_the_fast_decoder_answers_the_reference_agrees(
        seed in 0usize..5,
        mutations in proptest::collection::vec((0usize..10_000, 0usize..6, 0usize..64), 1..4),
        dup in proptest::option::of(0usize..200),
    ) {
        let mut v = seeds().into_iter().chain([long()]).nth(seed).unwrap_or(Value::Null);
        let palette = palette();
        for (node, op, pick) in mutations {
            let mut all = Vec::new();
            paths(&v, &mut Vec::new(), &mut all);
            let path = &all[node % all.len()];
            let target = at(&mut v, path);
            match (op, target) {
                (0..=2, target) => *target = palette[pick % palette.len()].clone(),
                (3, Value::Object(m)) => {
                    m.insert("zz_unknown".into(), json!(1));
                }
                (4, Value::Object(m)) if !m.is_empty() => {
                    let k = m.keys().nth(pick % m.len()).cloned().unwrap_or_default();
                    if k != "@type" {
                        m.remove(&k);
                    }
                }
                (5, Value::Object(m)) if !m.is_empty() => {
                    let k = m.keys().nth(pick % m.len()).cloned().unwrap_or_default();
                    if let Some(child) = m.remove(&k) {
                        m.insert(camel_or_snake(&k), child);
                    }
                }
                _ => {}
            }
        }
        let mut text = String::new();
        write(&v, dup.unwrap_or(usize::MAX), &mut 0, &mut text);
        assert_agrees(&text);
    }
}
