//! Envoy resources built in code, for tests and benchmarks at scale.

use std::net::IpAddr;

use sockmesh_proto::pb::{
    envoy::{
        config::{
            cluster::v3::{Cluster, cluster},
            core::v3::{
                Address, AggregatedConfigSource, ConfigSource, SocketAddress, address,
                config_source, socket_address,
            },
            endpoint::v3::{
                ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
            },
            listener::v3::{Filter, FilterChain, Listener, filter},
        },
        extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy},
    },
    google::protobuf::Any,
};

fn any<M: prost::Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: m.encode_to_vec(),
    }
}

fn socket(ip: IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// A listener on `vip:port` whose tcp_proxy sends to `cluster`.
pub fn tcp_listener(name: &str, vip: IpAddr, port: u16, cluster: &str) -> (String, Any) {
    let proxy = TcpProxy {
        stat_prefix: name.to_owned(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_owned())),
        ..Default::default()
    };
    let l = Listener {
        name: name.to_owned(),
        address: Some(socket(vip, port)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(
                    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    &proxy,
                ))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    (name.to_owned(), any(sockmesh_proto::type_url::LISTENER, &l))
}

/// An EDS cluster over ADS.
pub fn eds_cluster(name: &str) -> (String, Any) {
    (
        name.to_owned(),
        any(sockmesh_proto::type_url::CLUSTER, &eds(name)),
    )
}

fn eds(name: &str) -> Cluster {
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ConfigSource {
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                ..Default::default()
            }),
            service_name: String::new(),
        }),
        ..Default::default()
    }
}

/// An EDS cluster over ADS with outlier detection (`consecutive_5xx`, 30 s
/// ejections, `max_ejection_percent` 100) and a circuit breaker
/// (`max_connections`), as a DestinationRule's `outlierDetection` and
/// `connectionPool` make it.
pub fn guarded_cluster(name: &str, consecutive: u32, max_connections: u32) -> (String, Any) {
    use sockmesh_proto::pb::{
        envoy::config::{
            cluster::v3::{CircuitBreakers, OutlierDetection, circuit_breakers},
            core::v3::RoutingPriority,
        },
        google::protobuf::{Duration, UInt32Value},
    };
    let mut c = eds(name);
    c.outlier_detection = Some(OutlierDetection {
        consecutive_5xx: Some(UInt32Value { value: consecutive }),
        base_ejection_time: Some(Duration {
            seconds: 30,
            nanos: 0,
        }),
        max_ejection_percent: Some(UInt32Value { value: 100 }),
        ..Default::default()
    });
    c.circuit_breakers = Some(CircuitBreakers {
        thresholds: vec![circuit_breakers::Thresholds {
            priority: RoutingPriority::Default as i32,
            max_connections: Some(UInt32Value {
                value: max_connections,
            }),
            ..Default::default()
        }],
        ..Default::default()
    });
    (name.to_owned(), any(sockmesh_proto::type_url::CLUSTER, &c))
}

/// An EDS cluster over ADS with a DestinationRule-style consistent hash:
/// `lb_policy: MAGLEV`, with `maglev_lb_config.table_size` if given (else the
/// size is the consumer's default).
pub fn maglev_cluster(name: &str, table_size: Option<u64>) -> (String, Any) {
    let mut c = eds(name);
    c.lb_policy = cluster::LbPolicy::Maglev as i32;
    c.lb_config = table_size.map(|t| {
        cluster::LbConfig::MaglevLbConfig(cluster::MaglevLbConfig {
            table_size: Some(sockmesh_proto::pb::google::protobuf::UInt64Value { value: t }),
        })
    });
    (name.to_owned(), any(sockmesh_proto::type_url::CLUSTER, &c))
}

/// A load assignment for `name` with healthy endpoints.
pub fn assignment(name: &str, endpoints: &[(IpAddr, u16)]) -> (String, Any) {
    let cla = ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: endpoints
                .iter()
                .map(|(ip, port)| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(*ip, *port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    (
        name.to_owned(),
        any(sockmesh_proto::type_url::ENDPOINT, &cla),
    )
}

/// A load assignment with endpoints HEALTHY (`true`) or DRAINING (`false`).
pub fn assignment_with_health(name: &str, endpoints: &[(IpAddr, u16, bool)]) -> (String, Any) {
    use sockmesh_proto::pb::envoy::config::core::v3::HealthStatus;
    let cla = ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: endpoints
                .iter()
                .map(|(ip, port, healthy)| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(*ip, *port)),
                        ..Default::default()
                    })),
                    health_status: if *healthy {
                        HealthStatus::Healthy as i32
                    } else {
                        HealthStatus::Draining as i32
                    },
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    (
        name.to_owned(),
        any(sockmesh_proto::type_url::ENDPOINT, &cla),
    )
}

/// The VIP of service `i` of [`services`]: 10.200.x.y for the first 65,536, then
/// 10.201.x.y, and so on.
pub fn service_vip(i: u32) -> IpAddr {
    let [_, high, hi, lo] = i.to_be_bytes();
    IpAddr::from([10, 200u8.saturating_add(high), hi, lo])
}

/// `n` services ([`service_vip`]`(i)`:80), each an EDS cluster `svc-i` with `per`
/// endpoints `10.30.x.y:8080`.. (10.31.x.y past 65,536; listeners, clusters, load
/// assignments).
pub fn services(n: u32, per: u16) -> Vec<(String, Any)> {
    let mut out = Vec::with_capacity(n as usize * 3);
    for i in 0..n {
        let vip = service_vip(i);
        let name = format!("svc-{i}");
        out.push(tcp_listener(&name, vip, 80, &name));
        out.push(eds_cluster(&name));
        let [_, high, hi, lo] = i.to_be_bytes();
        let eps: Vec<(IpAddr, u16)> = (0..per)
            .map(|p| (IpAddr::from([10, 30 + high, hi, lo]), 8080 + p))
            .collect();
        out.push(assignment(&name, &eps));
    }
    out
}
