use std::net::IpAddr;

use sockmesh::{
    dataplane::{MapWriter, service_key, store::MemStore},
    model::{Backend, Health, LbPolicy, Outlier, Protocol, RoutingTable, Service, ServiceAddr},
};
use sockmesh_common::{EndpointKey, ServiceHealth, SlotKey, map_names};

use super::*;

fn svc(last: u8) -> ServiceAddr {
    ServiceAddr {
        vip: IpAddr::from([10, 96, 0, last]),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn backends(n: u8) -> Vec<Backend> {
    (1..=n)
        .map(|i| Backend::new(IpAddr::from([10, 1, 0, i]), 8080))
        .collect()
}

fn outlier() -> Health {
    Health {
        outlier: Some(Outlier {
            consecutive: 3,
            enforcing: 100,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            interval_ms: 10_000,
            max_ejection_percent: 100,
            panic_percent: 0,
        }),
        max_connections: Some(10),
    }
}

/// Weighted slots, a Maglev table, outlier detection with a circuit breaker.
fn table() -> RoutingTable {
    let mut t = RoutingTable::default();
    t.insert(
        svc(1),
        [
            backends(2),
            vec![Backend::new([10, 1, 1, 1].into(), 80).weighted(2)],
        ]
        .concat(),
    );
    t.insert(
        svc(2),
        Service::new(backends(3), LbPolicy::Maglev { table_size: 1021 }),
    );
    t.insert(
        svc(3),
        Service::new(backends(2), LbPolicy::Random).with_health(outlier()),
    );
    t
}

fn written() -> MapWriter<MemStore> {
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&table()).expect("apply");
    w
}

#[test]
fn what_the_writer_leaves_passes_and_an_empty_store_is_empty() {
    let mut w = written();
    assert_eq!(
        check(&of_store(w.store()), &Expect::table(&table())),
        Vec::<String>::new()
    );
    // A service's counts are the table's, whatever the writer made of them.
    let failures = check(&of_store(w.store()), &Expect::services(3, 9));
    assert_eq!(
        failures,
        ["SM_BACKENDS: expected 9 entries (the services' backends), found 8"]
    );
    w.apply(&RoutingTable::default()).expect("remove all");
    assert_store("empty", w.store(), &Expect::empty());
}

#[test]
fn an_entry_no_published_service_reaches_is_named_with_its_map() {
    let w = written();
    let st = w.store();
    let live = st.services[&service_key(&svc(1))];
    let mut maps = of_store(st);
    // A slot of the unpublished generation, a counter and a health entry of a
    // service gone, a backend of an id no service has, an endpoint's health of a
    // backend the service does not have.
    maps.slots.push(SlotKey {
        service_id: live.id,
        generation: 1 - live.generation,
        pad: 0,
        slot: 0,
    });
    let gone = service_key(&svc(9));
    maps.stats.push((999, gone));
    maps.service_health.push((gone, ServiceHealth::ZERO));
    maps.backends.push((
        sockmesh_common::BackendKey {
            service_id: 4242,
            index: 0,
        },
        maps.backends[0].1,
    ));
    maps.endpoint_health.push(EndpointKey {
        service: service_key(&svc(3)),
        addr: maps.backends[0].1.addr,
        port: 99u16.to_be(),
        pad: 0,
    });
    let failures = check(&maps, &Expect::default());
    let named: Vec<&str> = failures
        .iter()
        .filter_map(|f| f.split(':').next())
        .collect();
    assert_eq!(
        named,
        [
            map_names::SERVICE_STATS,
            map_names::SLOTS,
            map_names::BACKENDS,
            map_names::SERVICE_HEALTH,
            map_names::ENDPOINT_HEALTH,
        ],
        "{failures:#?}"
    );
    assert!(
        failures[0].starts_with(
            "SM_SERVICE_STATS: expected 3 entries (one per service), found 4; 1 belong to nothing: 10.96.0.9:80/tcp"
        ),
        "{}",
        failures[0]
    );
    assert!(
        failures[4].contains("10.1.0.1:99 of 10.96.0.3:80/tcp"),
        "{}",
        failures[4]
    );
}

#[test]
fn open_sockets_must_be_the_ones_the_scenario_holds() {
    let w = written();
    let mut maps = of_store(w.store());
    maps.reverse = 2;
    for (k, h) in &mut maps.service_health {
        if *k == service_key(&svc(3)) {
            h.conns = 1;
        }
    }
    let failures = check(&maps, &Expect::default());
    assert_eq!(
        failures,
        [
            "SM_SVC_HEALTH: expected 0 open connections in all, found 1 (10.96.0.3:80/tcp 1)",
            "SM_REVERSE: expected 0 entries (one per redirected socket still open), found 2",
        ]
    );
    assert!(check(&maps, &Expect::default().reverse(2).circuit(1)).is_empty());
}

#[test]
fn a_maglev_table_left_behind_and_stray_pins_fail() {
    let mut w = written();
    let mut t = table();
    t.services.remove(&svc(2));
    // The Maglev service's chunk deletes fail (a broken writer).
    let id = w.store().services[&service_key(&svc(2))].id;
    let chunks: Vec<SlotKey> = w
        .store()
        .maglev
        .keys()
        .filter(|k| k.service_id == id)
        .copied()
        .collect();
    w.apply(&t).expect("apply");
    let mut maps = of_store(w.store());
    maps.maglev.extend(chunks);
    maps.stray_pins
        .push("/sys/fs/bpf/x/v4/maps/SM_SERVICES".into());
    let failures = check(&maps, &Expect::table(&t));
    assert_eq!(failures.len(), 2, "{failures:#?}");
    assert!(
        failures[0].starts_with("SM_MAGLEV: expected 0 entries (the published Maglev tables' chunks), found 4; 4 belong to nothing"),
        "{}",
        failures[0]
    );
    assert!(failures[1].starts_with("pins: "), "{}", failures[1]);
}

#[test]
fn the_agents_account_must_match_the_maps_and_the_configuration() {
    let w = written();
    let maps = of_store(w.store());
    let dump = |services: usize, eds_users: usize, slots: usize| {
        serde_json::json!({
            "synced": true,
            "datapath": {
                "migrating": false,
                "maps": [
                    { "map": "SM_SERVICES", "entries": services },
                    { "map": "SM_SLOTS", "entries": slots },
                ],
            },
            "state": {
                "listeners": 3, "clusters": 3, "routes": 0, "endpoints": 3,
                "services": services, "backends": 8, "eds_users": eds_users,
                "seed_services": 0, "unknown_fields": 4,
            },
        })
    };
    let slots = maps.slots.len();
    let expect = Expect::default().xds(3, 3, 0, 3);
    assert_eq!(
        check_agent(&dump(3, 3, slots), &maps, &expect),
        Vec::<String>::new()
    );
    assert_eq!(
        check_agent(&dump(3, 5, slots + 1), &maps, &expect),
        [
            format!(
                "SM_SLOTS: the agent counts {} entries (sockmesh_map_fill_ratio), the map holds {slots}",
                slots + 1
            ),
            "agent state eds_users: expected at most 3 (the clusters), found 5".to_owned(),
        ]
    );
    // Nothing configured: every size but the history of types and fields is 0.
    let empty = of_store(&MemStore::default());
    let failures = check_agent(&dump(0, 0, 0), &empty, &Expect::empty());
    assert_eq!(
        failures,
        [
            "agent state backends: expected 0 (the kernel's), found 8",
            "agent state listeners: expected 0, found 3",
            "agent state clusters: expected 0, found 3",
            "agent state endpoints: expected 0, found 3",
            "agent state backends: expected 0 (nothing configured), found 8",
            "agent state clusters: expected 0 (nothing configured), found 3",
            "agent state endpoints: expected 0 (nothing configured), found 3",
            "agent state listeners: expected 0 (nothing configured), found 3",
        ]
    );
}
