//! Every endpoint's share of new connections, as the kernel's maps hold it,
//! against Envoy's arithmetic over priorities and localities (`envoy_lb`, an
//! oracle written from Envoy's documentation and source, apart from the agent's
//! `lb::levels`), over random assignments: priorities with gaps, localities of
//! different sizes and weights, every EDS health status, with and without
//! `locality_weighted_lb_config`, panic thresholds and overprovisioning factors.
//! Both ways the kernel serves a service: one weighted set (health cannot change
//! between updates), and priority levels with a choice table (outlier detection).
//! No root: the maps are the in-memory store the writer's unit tests use.

use std::{collections::BTreeMap, net::IpAddr};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use sockmesh::{
    dataplane::{MapWriter, store::MemStore},
    lb::levels::{LbSettings, plan},
    model::{Health, LbPolicy, Outlier, Protocol, RoutingTable, Service, ServiceAddr},
};
use sockmesh_proto::pb::{
    envoy::config::{
        core::v3::{Address, HealthStatus, Locality, SocketAddress, address, socket_address},
        endpoint::v3::{
            ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
            cluster_load_assignment, lb_endpoint,
        },
    },
    google::protobuf::UInt32Value,
};
use sockmesh_tests::{
    audit::{Expect, assert_store},
    envoy_lb,
};

/// A random assignment, as the oracle and as EDS see it.
struct Case {
    oracle: envoy_lb::Cluster,
    cla: ClusterLoadAssignment,
    /// The address of endpoint `j` of locality `i`.
    addrs: Vec<Vec<IpAddr>>,
}

fn health(h: envoy_lb::Health, rng: &mut StdRng) -> HealthStatus {
    match h {
        envoy_lb::Health::Healthy => {
            if rng.random_bool(0.5) {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unknown
            }
        }
        envoy_lb::Health::Degraded => HealthStatus::Degraded,
        envoy_lb::Health::Unhealthy => {
            if rng.random_bool(0.5) {
                HealthStatus::Unhealthy
            } else {
                HealthStatus::Timeout
            }
        }
        envoy_lb::Health::Draining => HealthStatus::Draining,
    }
}

fn case(rng: &mut StdRng) -> Case {
    let priorities = rng.random_range(1..=4u32);
    let mut localities = Vec::new();
    let mut proto = Vec::new();
    let mut addrs = Vec::new();
    let mut n = 0u32;
    for p in 0..priorities {
        // A gap now and then (an empty priority between two).
        if p > 0 && rng.random_bool(0.15) {
            continue;
        }
        for zone in 0..rng.random_range(1..=3u32) {
            let weight = rng.random_bool(0.8).then(|| rng.random_range(1..=10u32));
            let mut endpoints = Vec::new();
            let mut lb = Vec::new();
            let mut la = Vec::new();
            for _ in 0..rng.random_range(1..=5u32) {
                n += 1;
                let h = match rng.random_range(0..10u32) {
                    0..=5 => envoy_lb::Health::Healthy,
                    6 => envoy_lb::Health::Degraded,
                    7 | 8 => envoy_lb::Health::Unhealthy,
                    _ => envoy_lb::Health::Draining,
                };
                let w = rng.random_range(1..=5u32);
                endpoints.push(envoy_lb::Endpoint {
                    weight: w,
                    health: h,
                });
                let ip: IpAddr = [10, 20, (n >> 8) as u8, n as u8].into();
                la.push(ip);
                lb.push(LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: ip.to_string(),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(80)),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    health_status: health(h, rng) as i32,
                    load_balancing_weight: Some(UInt32Value { value: w }),
                    ..Default::default()
                });
            }
            localities.push(envoy_lb::Locality {
                priority: p,
                weight,
                endpoints,
            });
            proto.push(LocalityLbEndpoints {
                locality: Some(Locality {
                    region: "r".into(),
                    zone: format!("z{zone}"),
                    sub_zone: String::new(),
                }),
                lb_endpoints: lb,
                load_balancing_weight: weight.map(|value| UInt32Value { value }),
                priority: p,
                ..Default::default()
            });
            addrs.push(la);
        }
    }
    let overprovisioning = [100u32, 140, 200][rng.random_range(0..3usize)];
    let panic = [0u32, 50, 80][rng.random_range(0..3usize)];
    let mut oracle = envoy_lb::Cluster::new(localities);
    oracle.overprovisioning_factor = overprovisioning;
    oracle.locality_weighted = rng.random_bool(0.5);
    oracle.panic_threshold_percent = f64::from(panic);
    let cla = ClusterLoadAssignment {
        cluster_name: "c".into(),
        endpoints: proto,
        policy: Some(cluster_load_assignment::Policy {
            overprovisioning_factor: Some(UInt32Value {
                value: overprovisioning,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Case { oracle, cla, addrs }
}

fn svc() -> ServiceAddr {
    ServiceAddr {
        vip: [10, 96, 0, 1].into(),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

/// The kernel's shares of `store`'s service, read from the maps as a connect()
/// resolves them, by backend address.
fn kernel_shares(store: &MemStore) -> BTreeMap<IpAddr, f64> {
    sockmesh_tests::shares::kernel_shares(store, &svc())
        .expect("resolves")
        .expect("service published")
        .into_iter()
        .map(|((ip, _), share)| (ip, share))
        .collect()
}

/// The oracle's shares, by address.
fn oracle_shares(c: &Case) -> BTreeMap<IpAddr, f64> {
    let mut out = BTreeMap::new();
    for (loc, shares) in c.addrs.iter().zip(envoy_lb::shares(&c.oracle)) {
        for (ip, s) in loc.iter().zip(shares) {
            if s > 0.0 {
                out.insert(*ip, s);
            }
        }
    }
    out
}

fn check(c: &Case, outlier: bool, what: &str) {
    let backends = sockmesh::xds::clusters::assignment_backends(&c.cla);
    let settings = LbSettings {
        locality_weighted: c.oracle.locality_weighted,
        // Integer thresholds here: Envoy's truncation is `outlier::panic_percent`'s.
        panic_percent: c.oracle.panic_threshold_percent as u8,
    };
    let planned = plan(&backends, settings, outlier);
    let health = Health {
        outlier: outlier.then_some(Outlier {
            consecutive: 5,
            enforcing: 100,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            interval_ms: 10_000,
            max_ejection_percent: 10,
            panic_percent: settings.panic_percent,
        }),
        max_connections: None,
    };
    let service = Service::new(planned.backends, LbPolicy::Random)
        .with_health(health)
        .with_levels(planned.levels);
    let mut table = RoutingTable::default();
    table.insert(svc(), service);
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&table).expect("written");
    let got = kernel_shares(w.store());
    let want = oracle_shares(c);
    let keys: std::collections::BTreeSet<&IpAddr> = got.keys().chain(want.keys()).collect();
    for ip in keys {
        let (g, e) = (
            got.get(ip).copied().unwrap_or(0.0),
            want.get(ip).copied().unwrap_or(0.0),
        );
        // Slot quantisation: a range's slots hold its hosts' weights to within one
        // of its (up to 4,096) slots; shares are rounded to 1/2^20.
        assert!(
            (g - e).abs() < 2e-3,
            "{what}: {ip} gets {g:.6} in the kernel, Envoy gives {e:.6}\nkernel {got:?}\nEnvoy {want:?}\n{:?}",
            c.oracle
        );
    }
    // The maps hold the service's entries and no others, and none once it goes.
    assert_store(what, w.store(), &Expect::table(&table));
    w.apply(&RoutingTable::default()).expect("removed");
    assert_store(&format!("{what}, removed"), w.store(), &Expect::empty());
}

#[test]
fn every_endpoints_share_is_envoys_over_random_assignments() {
    let mut rng = StdRng::seed_from_u64(0x5eed_2025);
    for i in 0..200 {
        let c = case(&mut rng);
        check(&c, false, &format!("case {i}, one weighted set"));
        check(&c, true, &format!("case {i}, levels in the kernel"));
    }
}

/// The issue's two zones: zone a with 10 endpoints (locality weight 10), zone b
/// with 2 (weight 2), `locality_weighted_lb_config`: every pod 1/12, where the
/// weights multiplied gave a zone-b pod 2/104.
#[test]
fn two_zones_give_every_pod_one_twelfth() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut c = case(&mut rng);
    let zone = |n: usize, w: u32| envoy_lb::Locality {
        priority: 0,
        weight: Some(w),
        endpoints: (0..n)
            .map(|_| envoy_lb::Endpoint {
                weight: 1,
                health: envoy_lb::Health::Healthy,
            })
            .collect(),
    };
    c.oracle = envoy_lb::Cluster::new(vec![zone(10, 10), zone(2, 2)]);
    c.oracle.locality_weighted = true;
    let mut proto = Vec::new();
    c.addrs.clear();
    for (z, (n, w)) in [(10u8, 10u32), (2, 2)].into_iter().enumerate() {
        let ips: Vec<IpAddr> = (0..n).map(|i| [10, 30, z as u8, i].into()).collect();
        proto.push(LocalityLbEndpoints {
            locality: Some(Locality {
                zone: format!("z{z}"),
                ..Default::default()
            }),
            load_balancing_weight: Some(UInt32Value { value: w }),
            lb_endpoints: ips
                .iter()
                .map(|ip| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: ip.to_string(),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(80)),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        c.addrs.push(ips);
    }
    c.cla = ClusterLoadAssignment {
        cluster_name: "c".into(),
        endpoints: proto,
        ..Default::default()
    };
    for share in oracle_shares(&c).values() {
        assert!((share - 1.0 / 12.0).abs() < 1e-9);
    }
    check(&c, false, "two zones");
    check(&c, true, "two zones, outlier detection");
}
