//! Real Istio config dumps (`../shared/xds-corpus/`, third-party, never copied into
//! the project) as xDS input, and what Envoy would do with them.
//!
//! [`Corpus::expected`] is an oracle written from Envoy's documented behaviour and
//! the dump itself, over the JSON, sharing no code with sockmesh's translation:
//! - the listener a connection to `VIP:port` reaches is the one bound to exactly
//!   that address, else the wildcard (`0.0.0.0`) listener on the port
//!   (original-destination matching); in a wildcard listener a filter chain whose
//!   `prefix_ranges` hold the VIP beats one without;
//! - a chain ending in `tcp_proxy` sends to its `cluster` or `weighted_clusters`;
//!   one ending in `http_connection_manager` to the catch-all route (`prefix: /`)
//!   of the virtual host whose `domains` name the VIP (or `VIP:port`), else of
//!   `*`; a socket-level balancer cannot see whether the application speaks HTTP,
//!   so the HTTP chain is taken before the `default_filter_chain` (a raw TCP
//!   client would get the latter: in Istio both name the same cluster);
//! - a chain ending in any other filter (Dubbo, Thrift, Redis proxies, an
//!   EnvoyFilter's own) handles its VIPs itself: a socket-level balancer has no
//!   cluster to pick for them and leaves them alone (no entry), and, as Envoy
//!   matches the listener bound to a VIP first, a wildcard listener's virtual
//!   host naming such a VIP does not take it;
//! - INBOUND listeners describe traffic to this pod, not from it; listeners
//!   without a socket address are internal listeners;
//! - an `ORIGINAL_DST` cluster forwards to the address the client asked for: the
//!   service gets no entry; an EDS cluster's endpoints are its load assignment's,
//!   a STATIC cluster's come inline (BlackHoleCluster has none: connections are
//!   refused);
//! - each endpoint's share of its cluster's new connections is Envoy's load
//!   balancer's over priorities and localities ([`crate::envoy_lb`], written from
//!   Envoy's documentation and source): the assignment's localities merged per
//!   priority and locality as Envoy merges them (the last locality weight set
//!   counts), `health_status` classified as Envoy classifies it (HEALTHY, UNKNOWN
//!   or unset healthy; DEGRADED; UNHEALTHY and TIMEOUT unhealthy; DRAINING
//!   excluded), the endpoint's `load_balancing_weight` (default 1), the
//!   assignment's `policy.overprovisioning_factor` (default 140) and
//!   `weighted_priority_health`, the cluster's
//!   `common_lb_config.locality_weighted_lb_config` and `healthy_panic_threshold`
//!   (default 50 %); among weighted clusters, a cluster's share times the
//!   endpoint's share of it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde_json::Value;

/// Where the corpus is: `SOCKMESH_XDS_CORPUS`, else `../shared/xds-corpus` beside
/// the project. `None` (the tests then skip, saying so) if it is not there.
pub fn corpus_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("SOCKMESH_XDS_CORPUS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/xds-corpus"),
        PathBuf::from,
    );
    dir.is_dir().then_some(dir)
}

/// The config dumps in the corpus, by file name.
pub fn corpus_files() -> Vec<PathBuf> {
    corpus_dir().map(|d| dumps_in(&d)).unwrap_or_default()
}

/// The project's own hand-written dumps (`tests/corpus/`), always present.
pub fn fixture_files() -> Vec<PathBuf> {
    dumps_in(&Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"))
}

fn dumps_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json" || e == "yaml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The dynamic resources of one dump, each a JSON object with its `@type`.
pub struct Corpus {
    pub name: String,
    pub listeners: Vec<Value>,
    pub clusters: Vec<Value>,
    pub endpoints: Vec<Value>,
    pub routes: Vec<Value>,
}

/// Clusters with their weights.
type Clusters = Vec<(String, f64)>;

/// What a listener's chain does with a VIP: send it to clusters, or handle it
/// with a filter a socket balancer does not interpret (`None`).
type Target = Option<Clusters>;

/// One expected service: its backends (address, port) and each one's share of
/// new connections.
pub type Backends = BTreeMap<(IpAddr, u16), f64>;

/// What Envoy would do with a dump's services.
#[derive(Debug, Default)]
pub struct Expected {
    /// Services with their backends (an empty map: connections refused).
    pub services: BTreeMap<String, Backends>,
    /// Services whose traffic Envoy sends to the original destination.
    pub passthrough: BTreeSet<String>,
    /// Services whose clusters or endpoints the dump does not hold.
    pub warming: BTreeSet<String>,
    /// Services whose listener's filter a socket balancer does not interpret: no
    /// entry, connections go where they were sent.
    pub left_alone: BTreeSet<String>,
    /// The listeners with such a chain.
    pub not_interpreted: BTreeSet<String>,
}

impl Corpus {
    /// Reads a dump (every file is JSON, whatever its extension). Only the dynamic
    /// resources are taken, active listeners only, and load assignments only of EDS
    /// clusters (the dump lists those of STATIC and ORIGINAL_DST clusters too); a dump
    /// without clusters keeps all its load assignments.
    pub fn load(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let dump: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        let mut c = Corpus {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            listeners: Vec::new(),
            clusters: Vec::new(),
            endpoints: Vec::new(),
            routes: Vec::new(),
        };
        let configs = dump["configs"].as_array().cloned().unwrap_or_default();
        let of = |suffix: &str| {
            configs.iter().find(|cfg| {
                cfg["@type"]
                    .as_str()
                    .is_some_and(|t| t.rsplit('.').next() == Some(suffix))
            })
        };
        let list = |v: Option<&Value>, key: &str| -> Vec<Value> {
            v.and_then(|v| v[key].as_array().cloned())
                .unwrap_or_default()
        };
        for l in list(of("ListenersConfigDump"), "dynamic_listeners") {
            if !l["active_state"]["listener"].is_null() {
                c.listeners.push(l["active_state"]["listener"].clone());
            }
        }
        for cl in list(of("ClustersConfigDump"), "dynamic_active_clusters") {
            c.clusters.push(cl["cluster"].clone());
        }
        for r in list(of("RoutesConfigDump"), "dynamic_route_configs") {
            c.routes.push(r["route_config"].clone());
        }
        let eds: BTreeSet<String> = c
            .clusters
            .iter()
            .filter(|cl| cl["type"] == "EDS")
            .map(eds_name)
            .collect();
        for e in list(of("EndpointsConfigDump"), "dynamic_endpoint_configs") {
            let cla = e["endpoint_config"].clone();
            let name = cla["cluster_name"].as_str().unwrap_or_default().to_owned();
            if c.clusters.is_empty() || eds.contains(&name) {
                c.endpoints.push(cla);
            }
        }
        c
    }

    /// Every resource, as a `DiscoveryResponse` (proto3 JSON) the file source reads.
    pub fn discovery_response(&self) -> String {
        let resources: Vec<&Value> = self
            .clusters
            .iter()
            .chain(&self.endpoints)
            .chain(&self.listeners)
            .chain(&self.routes)
            .collect();
        serde_json::json!({"version_info": format!("corpus-{}", self.name), "resources": resources})
            .to_string()
    }

    /// What Envoy would do (see the module documentation).
    pub fn expected(&self) -> Expected {
        let mut out = Expected::default();
        let mut chosen: BTreeMap<String, (u8, String, Target)> = BTreeMap::new();
        for l in &self.listeners {
            let lname = l["name"].as_str().unwrap_or_default().to_owned();
            if l["traffic_direction"] != "INBOUND" && leaves_a_chain_alone(l) {
                out.not_interpreted.insert(lname.clone());
            }
            for (service, precedence, clusters) in listener_candidates(l, &self.routes) {
                let better = chosen
                    .get(&service)
                    .is_none_or(|(p, n, _)| (precedence, &lname) < (*p, n));
                if better {
                    chosen.insert(service, (precedence, lname.clone(), clusters));
                }
            }
        }
        for (service, (_, _, target)) in chosen {
            let Some(clusters) = target else {
                out.left_alone.insert(service);
                continue;
            };
            match self.backends_of(&clusters) {
                Resolution::Warming => {
                    out.warming.insert(service);
                }
                Resolution::Passthrough => {
                    out.passthrough.insert(service);
                }
                Resolution::Backends(b) => {
                    out.services.insert(service, b);
                }
            }
        }
        out
    }

    fn backends_of(&self, clusters: &[(String, f64)]) -> Resolution {
        let total: f64 = clusters.iter().map(|(_, w)| w).sum();
        let mut out = Backends::new();
        let mut all_passthrough = true;
        for (name, weight) in clusters {
            let Some(cluster) = self.clusters.iter().find(|c| c["name"] == name.as_str()) else {
                return Resolution::Warming;
            };
            let cla = match cluster["type"].as_str() {
                Some("ORIGINAL_DST") => continue,
                Some("EDS") => {
                    let eds = eds_name(cluster);
                    match self
                        .endpoints
                        .iter()
                        .find(|e| e["cluster_name"] == eds.as_str())
                    {
                        Some(cla) => cla.clone(),
                        None => return Resolution::Warming,
                    }
                }
                Some("STATIC") | None => cluster["load_assignment"].clone(),
                Some(other) => panic!("the oracle does not resolve {other} clusters ({name})"),
            };
            all_passthrough = false;
            for (addr, share) in envoy_shares(cluster, &cla) {
                if share > 0.0 {
                    *out.entry(addr).or_default() += weight / total * share;
                }
            }
        }
        if all_passthrough {
            Resolution::Passthrough
        } else {
            Resolution::Backends(out)
        }
    }
}

enum Resolution {
    Warming,
    Passthrough,
    Backends(Backends),
}

fn eds_name(cluster: &Value) -> String {
    cluster["eds_cluster_config"]["service_name"]
        .as_str()
        .filter(|s| !s.is_empty())
        .or_else(|| cluster["name"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// The IP and port of a `socket_address` object.
fn ip_port(sa: &Value) -> Option<(IpAddr, u16)> {
    let ip = sa["address"].as_str()?.parse().ok()?;
    Some((ip, port_of(&sa["port_value"])?))
}

fn port_of(v: &Value) -> Option<u16> {
    v.as_u64().and_then(|p| u16::try_from(p).ok())
}

/// Each endpoint of `cla` (the assignment of `cluster`) with its share of the
/// cluster's new connections, by Envoy's arithmetic (see the module
/// documentation).
fn envoy_shares(cluster: &Value, cla: &Value) -> BTreeMap<(IpAddr, u16), f64> {
    use crate::envoy_lb::{Cluster, Endpoint, Health, Locality};
    let health = |e: &Value| match e["health_status"].as_str() {
        None | Some("HEALTHY" | "UNKNOWN") => Health::Healthy,
        Some("DEGRADED") => Health::Degraded,
        Some("UNHEALTHY" | "TIMEOUT") => Health::Unhealthy,
        Some("DRAINING") => Health::Draining,
        Some(other) => panic!("the oracle does not know health_status {other}"),
    };
    let weight = |v: &Value| v.as_u64().and_then(|w| u32::try_from(w).ok());
    // Envoy's host sets: one per (priority, locality), in order of appearance,
    // with their endpoints' addresses.
    type Place = (u64, [String; 3]);
    type Group = (Place, Locality, Vec<(IpAddr, u16)>);
    let mut groups: Vec<Group> = Vec::new();
    let mut seen = BTreeSet::new();
    for loc in cla["endpoints"].as_array().into_iter().flatten() {
        let priority = loc["priority"].as_u64().unwrap_or(0);
        let part = |k: &str| loc["locality"][k].as_str().unwrap_or_default().to_owned();
        let place = (priority, [part("region"), part("zone"), part("sub_zone")]);
        let at = match groups.iter().position(|g| g.0 == place) {
            Some(i) => i,
            None => {
                let l = Locality {
                    priority: u32::try_from(priority).expect("priority"),
                    weight: None,
                    endpoints: Vec::new(),
                };
                groups.push((place, l, Vec::new()));
                groups.len() - 1
            }
        };
        let group = &mut groups[at];
        if let Some(w) = weight(&loc["load_balancing_weight"]) {
            group.1.weight = Some(w);
        }
        for e in loc["lb_endpoints"].as_array().into_iter().flatten() {
            let Some(addr) = ip_port(&e["endpoint"]["address"]["socket_address"]) else {
                continue;
            };
            assert!(
                seen.insert(addr),
                "the oracle does not model an address listed twice in one assignment: {addr:?}"
            );
            group.1.endpoints.push(Endpoint {
                weight: weight(&e["load_balancing_weight"]).unwrap_or(1),
                health: health(e),
            });
            group.2.push(addr);
        }
    }
    let common = &cluster["common_lb_config"];
    let mut c = Cluster::new(groups.iter().map(|g| g.1.clone()).collect());
    c.locality_weighted = !common["locality_weighted_lb_config"].is_null();
    if let Some(t) = common["healthy_panic_threshold"]["value"].as_f64() {
        c.panic_threshold_percent = t;
    }
    if let Some(f) = weight(&cla["policy"]["overprovisioning_factor"]) {
        c.overprovisioning_factor = f;
    }
    c.weighted_priority_health = cla["policy"]["weighted_priority_health"] == true;
    let mut out = BTreeMap::new();
    for (g, shares) in groups.iter().zip(crate::envoy_lb::shares(&c)) {
        for (addr, share) in g.2.iter().zip(shares) {
            out.insert(*addr, share);
        }
    }
    out
}

/// The type of a chain's terminal filter.
fn terminal_type(chain: &Value) -> Option<&str> {
    let terminal = chain["filters"].as_array().and_then(|f| f.last())?;
    Some(
        terminal["typed_config"]["@type"]
            .as_str()
            .unwrap_or_default(),
    )
}

/// Whether some chain of a listener ends in a filter other than tcp_proxy and
/// http_connection_manager.
fn leaves_a_chain_alone(l: &Value) -> bool {
    if l["address"]["socket_address"].is_null() {
        return false;
    }
    let chains = l["filter_chains"].as_array().cloned().unwrap_or_default();
    chains
        .iter()
        .chain(Some(&l["default_filter_chain"]).filter(|c| !c.is_null()))
        .filter_map(terminal_type)
        .any(|ty| !ty.ends_with(".TcpProxy") && !ty.ends_with(".HttpConnectionManager"))
}

/// (service, precedence, what handles it) that one listener asks for.
/// Precedence: 0 the listener is bound to the VIP; 1 a wildcard listener's chain
/// matching the VIP's prefix; 2 a wildcard listener's HTTP virtual host naming it.
fn listener_candidates(l: &Value, routes: &[Value]) -> Vec<(String, u8, Target)> {
    let mut out = Vec::new();
    if l["traffic_direction"] == "INBOUND" {
        return out;
    }
    let sa = &l["address"]["socket_address"];
    let Some((ip, port)) = ip_port(sa) else {
        return out; // an internal listener
    };
    assert!(
        sa["protocol"] != "UDP",
        "the oracle does not cover UDP listeners"
    );
    let wildcard = ip.is_unspecified();
    let mut seen = BTreeSet::new();
    let chains = l["filter_chains"].as_array().cloned().unwrap_or_default();
    let default_chain =
        (!l["default_filter_chain"].is_null()).then(|| l["default_filter_chain"].clone());
    for chain in chains.iter().chain(default_chain.as_ref()) {
        let m = &chain["filter_chain_match"];
        let dport = port_of(&m["destination_port"]).unwrap_or(port);
        let mut vips: Vec<IpAddr> = Vec::new();
        let ranges = m["prefix_ranges"].as_array().cloned().unwrap_or_default();
        for r in &ranges {
            let Some(a) = r["address_prefix"]
                .as_str()
                .and_then(|a| a.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let full = if a.is_ipv4() { 32 } else { 128 };
            if r["prefix_len"].as_u64().unwrap_or(full) == full {
                vips.push(a);
            }
        }
        if ranges.is_empty() && !wildcard {
            vips.push(ip);
        }
        let precedence = u8::from(wildcard);
        let Some(terminal) = chain["filters"].as_array().and_then(|f| f.last()) else {
            continue;
        };
        let config = &terminal["typed_config"];
        let ty = config["@type"].as_str().unwrap_or_default();
        let mut add = |vip: IpAddr, precedence: u8, target: Target| {
            let service = match vip {
                IpAddr::V4(v) => format!("{v}:{dport}/tcp"),
                IpAddr::V6(v) => format!("[{v}]:{dport}/tcp"),
            };
            if seen.insert(service.clone()) && target.as_ref().is_none_or(|c| !c.is_empty()) {
                out.push((service, precedence, target));
            }
        };
        if ty.ends_with(".TcpProxy") {
            let clusters = tcp_proxy_clusters(config);
            for vip in vips {
                add(vip, precedence, Some(clusters.clone()));
            }
        } else if !ty.ends_with(".HttpConnectionManager") {
            for vip in vips {
                add(vip, precedence, None);
            }
        } else {
            let rc = match config["rds"]["route_config_name"].as_str() {
                Some(name) => routes.iter().find(|r| r["name"] == name).cloned(),
                None => Some(config["route_config"].clone()),
            };
            let Some(rc) = rc else { continue };
            let vhosts = rc["virtual_hosts"].as_array().cloned().unwrap_or_default();
            let names = |vh: &Value, vip: IpAddr| {
                vh["domains"].as_array().into_iter().flatten().any(|d| {
                    let d = d.as_str().unwrap_or_default();
                    d == vip.to_string()
                        || d == format!("{vip}:{dport}")
                        || d == format!("[{vip}]:{dport}")
                })
            };
            for vip in vips {
                let vh = vhosts.iter().find(|vh| names(vh, vip)).or_else(|| {
                    vhosts.iter().find(|vh| {
                        vh["domains"]
                            .as_array()
                            .is_some_and(|d| d.iter().any(|d| d == "*"))
                    })
                });
                if let Some(clusters) = vh.and_then(catch_all) {
                    add(vip, precedence, Some(clusters));
                }
            }
            if wildcard && ranges.is_empty() {
                for vh in &vhosts {
                    for d in vh["domains"].as_array().into_iter().flatten() {
                        let d = d.as_str().unwrap_or_default();
                        let ip = d.parse::<IpAddr>().ok().or_else(|| {
                            d.parse::<std::net::SocketAddr>()
                                .ok()
                                .filter(|sa| sa.port() == dport)
                                .map(|sa| sa.ip())
                        });
                        if let (Some(ip), Some(clusters)) = (ip, catch_all(vh)) {
                            add(ip, 2, Some(clusters));
                        }
                    }
                }
            }
        }
    }
    out
}

fn tcp_proxy_clusters(config: &Value) -> Vec<(String, f64)> {
    if let Some(c) = config["cluster"].as_str() {
        return vec![(c.to_owned(), 1.0)];
    }
    config["weighted_clusters"]["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c["name"].as_str()?.to_owned(), c["weight"].as_f64()?)))
        .filter(|(_, w)| *w > 0.0)
        .collect()
}

/// The clusters of a virtual host's catch-all route (`prefix: /`).
fn catch_all(vh: &Value) -> Option<Vec<(String, f64)>> {
    let route = vh["routes"].as_array()?.iter().find(|r| {
        matches!(r["match"]["prefix"].as_str(), Some("/" | ""))
            || r["match"]["path_separated_prefix"] == "/"
    })?;
    let action = &route["route"];
    if let Some(c) = action["cluster"].as_str() {
        return Some(vec![(c.to_owned(), 1.0)]);
    }
    let weighted: Vec<(String, f64)> = action["weighted_clusters"]["clusters"]
        .as_array()?
        .iter()
        .filter_map(|c| {
            Some((
                c["name"].as_str()?.to_owned(),
                // Unset is 0 (`PROTOBUF_GET_WRAPPED_REQUIRED` in Envoy's
                // config_impl.cc): never picked.
                c["weight"].as_f64().unwrap_or(0.0),
            ))
        })
        .filter(|(_, w)| *w > 0.0)
        .collect();
    (!weighted.is_empty()).then_some(weighted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected() -> Expected {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/istiod-multi-zone-config-dump.json");
        Corpus::load(&path).expected()
    }

    /// The shares of `service`'s endpoints, in the order of their last octet.
    fn shares(e: &Expected, service: &str) -> Vec<f64> {
        let b = &e.services[service];
        let mut v: Vec<(IpAddr, f64)> = b.iter().map(|((ip, _), s)| (*ip, *s)).collect();
        v.sort_by_key(|(ip, _)| *ip);
        v.into_iter()
            .map(|(_, s)| (s * 1e4).round() / 1e4)
            .collect()
    }

    /// The istiod-shaped multi-zone fixtures, by Envoy's arithmetic (each
    /// endpoint with a share above 0; the shares sum to 1).
    #[test]
    fn multi_zone_fixtures_get_envoys_shares() {
        let e = expected();
        assert_eq!(e.services.len(), 8, "{e:?}");
        for (s, b) in &e.services {
            let sum: f64 = b.values().sum();
            assert!((sum - 1.0).abs() < 1e-9, "{s}: {sum}");
        }
        // Zone weights 10 and 2 over 10 and 2 pods: 1/12 each, not 10/104 and 2/104.
        assert_eq!(shares(&e, "10.96.20.1:9080/tcp"), vec![0.0833; 12]);
        // Priority 0 half healthy: 70 % to its healthy pod, 30 % over priority 1's
        // three, nothing to priority 2.
        assert_eq!(shares(&e, "10.96.20.2:9080/tcp"), [0.7, 0.1, 0.1, 0.1]);
        // distribute 80/20 over 3 + 1 pods.
        assert_eq!(
            shares(&e, "10.96.20.3:9080/tcp"),
            [0.2667, 0.2667, 0.2667, 0.2]
        );
        // Both priorities 1 of 4 healthy: all in panic, loads by host count 50/50
        // over all 8 hosts.
        assert_eq!(shares(&e, "10.96.20.4:9080/tcp"), vec![0.125; 8]);
        // A DRAINING pod is excluded: priority 0's 3 others are all its hosts.
        assert_eq!(shares(&e, "10.96.20.5:27017/tcp"), [0.3333, 0.3333, 0.3333]);
        // Endpoint weights 3 and 1, zone b with 2 of 3 unhealthy: by endpoint
        // weight without locality weighting (3:1), by effective locality weight
        // with it (3 : 3 × 1.4 / 3).
        assert_eq!(shares(&e, "10.96.20.6:5432/tcp"), [0.75, 0.25]);
        assert_eq!(shares(&e, "10.96.20.7:5432/tcp"), [0.6818, 0.3182]);
        // Priority 0 1 of 4 healthy (health 35), priority 1 1 of 3 (46): the
        // normalized total is 81. At the default threshold of 50 both would be in
        // panic (58 / 42 over all 7 hosts); at 20 neither is: 35 × 100 / 81 = 43
        // and 46 × 100 / 81 = 56, the rounding's 1 to priority 0.
        assert_eq!(shares(&e, "10.96.20.8:8080/tcp"), [0.44, 0.56]);
    }
}
