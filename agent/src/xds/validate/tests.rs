//! Each rule of Envoy's this module enforces, on the value just inside and just
//! outside its bound (the bounds are the `validate` annotations and messages cited
//! in each submodule, read from Envoy's API, not from this code).

use sockmesh_proto::pb::envoy::config::{
    cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
    route::v3::RouteConfiguration,
};

use super::{validate_cluster, validate_endpoints, validate_listener, validate_route};
use crate::xds::decode::message_from_text;

fn parse<M: prost::Message + Default>(name: &str, yaml: &str) -> M {
    message_from_text::<M>(name, yaml)
        .map(|(m, _)| m)
        .unwrap_or_else(|e| panic!("{yaml}: {e}"))
}

fn cla(yaml: &str) -> Result<(), String> {
    let m: ClusterLoadAssignment = parse("envoy.config.endpoint.v3.ClusterLoadAssignment", yaml);
    validate_endpoints(&m).map_err(|e| e.to_string())
}

fn cluster(yaml: &str) -> Result<(), String> {
    let m: Cluster = parse("envoy.config.cluster.v3.Cluster", yaml);
    validate_cluster(&m).map_err(|e| e.to_string())
}

fn listener(yaml: &str) -> Result<(), String> {
    let m: Listener = parse("envoy.config.listener.v3.Listener", yaml);
    validate_listener(&m).map_err(|e| e.to_string())
}

fn route(yaml: &str) -> Result<(), String> {
    let m: RouteConfiguration = parse("envoy.config.route.v3.RouteConfiguration", yaml);
    validate_route(&m).map_err(|e| e.to_string())
}

fn ep(port: u32, weight: u32) -> String {
    format!(
        "{{ endpoint: {{ address: {{ socket_address: {{ address: 10.0.0.1, port_value: {port} }} }} }}, load_balancing_weight: {weight} }}"
    )
}

#[test]
fn endpoint_weights_sum_within_u32_per_locality_not_per_assignment() {
    let half = u32::MAX / 2 + 1; // two of them: 2^32, one past the bound
    let one_locality = format!(
        "cluster_name: c\nendpoints: [ {{ lb_endpoints: [ {}, {} ] }} ]",
        ep(80, half),
        ep(81, half - 1)
    );
    assert_eq!(cla(&one_locality), Ok(()), "2^32 - 1 is within the bound");
    let over = one_locality.replace(&format!("weight: {}", half - 1), &format!("weight: {half}"));
    let err = cla(&over).expect_err("2^32 is past it");
    assert!(
        err.contains("endpoints[0].lb_endpoints[1].load_balancing_weight")
            && err.contains("sum past 4294967295"),
        "{err}"
    );
    // The bound is per locality: two localities of 2^31 each are fine.
    let two = format!(
        "cluster_name: c\nendpoints: [ {{ lb_endpoints: [ {} ] }}, {{ locality: {{ zone: b }}, lb_endpoints: [ {} ] }} ]",
        ep(80, half),
        ep(81, half)
    );
    assert_eq!(cla(&two), Ok(()));
}

#[test]
fn locality_weights_sum_within_u32_per_priority() {
    let half = u32::MAX / 2 + 1;
    let doc = |p1: u32| {
        format!(
            "cluster_name: c\nendpoints: [ {{ load_balancing_weight: {half}, lb_endpoints: [ {} ] }}, {{ priority: {p1}, locality: {{ zone: b }}, load_balancing_weight: {half}, lb_endpoints: [ {} ] }} ]",
            ep(80, 1),
            ep(81, 1)
        )
    };
    assert_eq!(cla(&doc(1)), Ok(()), "different priorities: separate sums");
    let err = cla(&doc(0)).expect_err("one priority: 2^32");
    assert!(
        err.contains("endpoints[1].load_balancing_weight") && err.contains("priority 0"),
        "{err}"
    );
}

#[test]
fn priority_at_most_128_and_weights_at_least_1() {
    let doc = |priority: u32, lw: u32, w: u32| {
        format!(
            "cluster_name: c\nendpoints: [ {{ priority: {priority}, load_balancing_weight: {lw}, lb_endpoints: [ {} ] }} ]",
            ep(80, w)
        )
    };
    assert_eq!(cla(&doc(128, 1, 1)), Ok(()));
    assert!(
        cla(&doc(129, 1, 1)).is_err_and(|e| e.contains("endpoints[0].priority: 129 exceeds 128"))
    );
    assert!(
        cla(&doc(0, 0, 1))
            .is_err_and(|e| e.contains("endpoints[0].load_balancing_weight: must be at least 1"))
    );
    assert!(cla(&doc(0, 1, 0)).is_err_and(|e| e.contains("lb_endpoints[0].load_balancing_weight: must be at least 1")));
    assert!(
        cla(&doc(0, 1, 1).replace("port_value: 80", "port_value: 65536"))
            .is_err_and(|e| e.contains("65536 is out of range"))
    );
    assert!(
        cla("cluster_name: c\npolicy: { overprovisioning_factor: 0 }")
            .is_err_and(|e| e.contains("overprovisioning_factor"))
    );
    assert_eq!(
        cla("cluster_name: c\npolicy: { overprovisioning_factor: 140 }"),
        Ok(())
    );
}

#[test]
fn dns_refresh_rate_above_one_millisecond() {
    let doc = |rate: &str| format!("name: d\ntype: STRICT_DNS\ndns_refresh_rate: {rate}");
    assert_eq!(cluster(&doc("0.001000001s")), Ok(()));
    for rate in ["0.001s", "0.000000001s", "0s"] {
        let err = cluster(&doc(rate)).expect_err(rate);
        assert!(
            err.contains("dns_refresh_rate") && err.contains("greater than 1ms"),
            "{err}"
        );
    }
    let failure = |base: &str, max: &str| {
        format!(
            "name: d\ntype: STRICT_DNS\ndns_failure_refresh_rate: {{ base_interval: {base}, max_interval: {max} }}"
        )
    };
    assert_eq!(cluster(&failure("1s", "10s")), Ok(()));
    assert!(cluster(&failure("0.001s", "10s")).is_err_and(|e| e.contains("base_interval")));
    assert!(
        cluster(&failure("2s", "1s"))
            .is_err_and(|e| e.contains("max_interval: 1s is below base_interval 2s"))
    );
    assert!(
        cluster("name: d\ndns_failure_refresh_rate: { max_interval: 1s }")
            .is_err_and(|e| e.contains("base_interval: is required"))
    );
}

#[test]
fn choice_count_at_least_two_in_either_form() {
    let old = |n: u32| {
        format!(
            "name: c\nlb_policy: LEAST_REQUEST\nleast_request_lb_config: {{ choice_count: {n} }}"
        )
    };
    assert_eq!(cluster(&old(2)), Ok(()));
    assert!(
        cluster(&old(1))
            .is_err_and(|e| e.contains("least_request_lb_config.choice_count: 1 is below 2"))
    );
    let typed = |n: u32| {
        format!(
            "name: c\nload_balancing_policy: {{ policies: [ {{ typed_extension_config: {{ name: lr, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest, choice_count: {n} }} }} }} ] }}"
        )
    };
    assert_eq!(cluster(&typed(2)), Ok(()));
    assert!(cluster(&typed(1)).is_err_and(|e| {
        e.contains("policies[0].typed_extension_config.typed_config.choice_count")
    }));
}

#[test]
fn maglev_table_size_prime_and_within_pgv_bound_a_kernel_limit_is_not_an_error() {
    let doc =
        |n: u64| format!("name: c\nlb_policy: MAGLEV\nmaglev_lb_config: {{ table_size: {n} }}");
    assert_eq!(cluster(&doc(251)), Ok(()));
    assert!(cluster(&doc(1000)).is_err_and(|e| e.contains("not a prime")));
    // 5,000,011 is prime and PGV's bound; 131,071 is prime and beyond the
    // kernel's largest table: valid configuration either way.
    assert_eq!(cluster(&doc(5_000_011)), Ok(()));
    assert_eq!(cluster(&doc(131_071)), Ok(()));
    assert!(cluster(&doc(5_000_077)).is_err_and(|e| e.contains("exceeds 5000011")));
}

#[test]
fn defined_enums_and_a_positive_connect_timeout() {
    assert!(
        cluster("name: c\nlb_policy: 42")
            .is_err_and(|e| e.contains("lb_policy: 42 is not a defined"))
    );
    assert!(cluster("name: c\ntype: 17").is_err_and(|e| e.contains("type: 17 is not a defined")));
    assert!(
        cluster("name: c\ndns_lookup_family: 9").is_err_and(|e| e.contains("dns_lookup_family"))
    );
    assert!(
        cluster("name: c\nconnect_timeout: 0s")
            .is_err_and(|e| e.contains("connect_timeout: 0s must be greater than 0"))
    );
    assert_eq!(cluster("name: c\nconnect_timeout: 0.25s"), Ok(()));
}

const TCP: &str =
    "\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

fn tcp_listener(config: &str) -> String {
    format!(
        "name: l\naddress: {{ socket_address: {{ address: 10.96.0.1, port_value: 80 }} }}\nfilter_chains: [ {{ filters: [ {{ name: tcp, typed_config: {{ {TCP}, {config} }} }} ] }} ]"
    )
}

#[test]
fn tcp_proxy_rules() {
    assert_eq!(
        listener(&tcp_listener("stat_prefix: s, cluster: a")),
        Ok(())
    );
    assert!(
        listener(&tcp_listener("cluster: a"))
            .is_err_and(|e| e.contains("typed_config.stat_prefix: must not be empty"))
    );
    assert!(
        listener(&tcp_listener("stat_prefix: s"))
            .is_err_and(|e| e.contains("cluster_specifier: is required"))
    );
    let weighted = |w: u32| {
        tcp_listener(&format!(
            "stat_prefix: s, weighted_clusters: {{ clusters: [ {{ name: a, weight: 1 }}, {{ name: b, weight: {w} }} ] }}"
        ))
    };
    assert_eq!(listener(&weighted(1)), Ok(()));
    assert!(
        listener(&weighted(0))
            .is_err_and(|e| e.contains("weighted_clusters.clusters[1].weight: must be at least 1"))
    );
    assert!(
        listener(&tcp_listener(
            "stat_prefix: s, weighted_clusters: { clusters: [] }"
        ))
        .is_err_and(|e| e.contains("at least 1 item"))
    );
    let nameless = format!(
        "name: l\naddress: {{ socket_address: {{ address: 10.96.0.1, port_value: 80 }} }}\nfilter_chains: [ {{ filters: [ {{ typed_config: {{ {TCP}, stat_prefix: s, cluster: a }} }} ] }} ]"
    );
    assert!(listener(&nameless).is_err_and(|e| e.contains("filters[0].name: must not be empty")));
}

#[test]
fn an_unknown_terminal_filter_is_valid_configuration() {
    let dubbo = "name: l\naddress: { socket_address: { address: 240.240.0.3, port_value: 20880 } }\nfilter_chains: [ { filters: [ { name: envoy.filters.network.meta_protocol_proxy, typed_config: { \"@type\": type.googleapis.com/udpa.type.v1.TypedStruct, type_url: type.googleapis.com/aeraki.meta_protocol_proxy.v1alpha.MetaProtocolProxy } } ] } ]";
    assert_eq!(listener(dubbo), Ok(()));
}

fn udp_listener(filter: &str) -> String {
    format!(
        "name: u\naddress: {{ socket_address: {{ address: 10.96.0.10, port_value: 53, protocol: UDP }} }}\nlistener_filters: [ {filter} ]"
    )
}

#[test]
fn a_udp_listener_filter_of_another_kind_fails_the_listener() {
    let proxy = |config: &str| {
        udp_listener(&format!(
            "{{ name: envoy.filters.udp_listener.udp_proxy, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig, {config} }} }}"
        ))
    };
    assert_eq!(listener(&proxy("stat_prefix: s, cluster: dns")), Ok(()));
    assert!(
        listener(&proxy("cluster: dns"))
            .is_err_and(|e| e.contains("listener_filters[0].typed_config.stat_prefix"))
    );
    assert!(
        listener(&proxy("stat_prefix: s"))
            .is_err_and(|e| e.contains("route_specifier: is required"))
    );
    let tcp = udp_listener(&format!(
        "{{ name: envoy.filters.udp_listener.udp_proxy, typed_config: {{ {TCP}, stat_prefix: s, cluster: dns }} }}"
    ));
    assert!(
        listener(&tcp).is_err_and(|e| e.contains("is not a UDP listener filter")),
        "{:?}",
        listener(&tcp)
    );
    // Another UDP filter (Envoy's DNS filter) is valid, and not read.
    let dns = udp_listener(
        "{ name: envoy.filters.udp.dns_filter, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig, stat_prefix: d } }",
    );
    assert_eq!(listener(&dns), Ok(()));
}

fn vhost(name: &str, domains: &str, action: &str) -> String {
    format!(
        "{{ name: {name}, domains: [ {domains} ], routes: [ {{ match: {{ prefix: / }}, {action} }} ] }}"
    )
}

#[test]
fn route_rules() {
    let rc = |hosts: &[String]| format!("name: r\nvirtual_hosts: [ {} ]", hosts.join(", "));
    let to = |c: &str| format!("route: {{ cluster: {c} }}");
    assert_eq!(
        route(&rc(&[
            vhost("a", "a.example, \"10.0.0.1\"", &to("x")),
            vhost("b", "\"*\"", &to("y"))
        ])),
        Ok(())
    );
    let dup = route(&rc(&[
        vhost("a", "a.example", &to("x")),
        vhost("b", "A.example", &to("y")),
    ]));
    assert!(
        dup.as_ref()
            .is_err_and(|e| e.contains("virtual_hosts[1].domains[0]")
                && e.contains("only unique values for domains")),
        "{dup:?}"
    );
    let two_stars = route(&rc(&[
        vhost("a", "\"*\"", &to("x")),
        vhost("b", "\"*\"", &to("y")),
    ]));
    assert!(two_stars.is_err_and(|e| e.contains("only a single wildcard domain")));
    assert!(
        route(&rc(&[vhost("a", "", &to("x"))]))
            .is_err_and(|e| e.contains("domains: must have at least 1 item"))
    );
    assert!(
        route(&rc(&[vhost("", "a", &to("x"))])).is_err_and(|e| e.contains("virtual_hosts[0].name"))
    );
    let weighted = |a: u32, b: u32| {
        vhost(
            "a",
            "a",
            &format!(
                "route: {{ weighted_clusters: {{ clusters: [ {{ name: x, weight: {a} }}, {{ name: y, weight: {b} }} ] }} }}"
            ),
        )
    };
    assert_eq!(
        route(&rc(&[weighted(0, 1)])),
        Ok(()),
        "one weight of 0 is a valid drain"
    );
    assert!(route(&rc(&[weighted(0, 0)])).is_err_and(|e| e.contains("must be greater than 0")));
    assert!(route(&rc(&[weighted(u32::MAX, 1)])).is_err_and(|e| e.contains("exceeds 4294967295")));
    let no_action = "name: r\nvirtual_hosts: [ { name: a, domains: [ a ], routes: [ { match: { prefix: / } } ] } ]";
    assert!(route(no_action).is_err_and(|e| e.contains("routes[0].action: is required")));
}
