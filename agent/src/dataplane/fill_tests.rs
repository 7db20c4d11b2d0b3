use std::collections::{BTreeMap, BTreeSet};

use sockmesh_common::{MAGLEV_CHUNK, map_names};

use super::*;
use crate::{
    dataplane::{
        MapWriter,
        store::{MapStore as _, MemStore, Op},
    },
    model::{Backend, Health, LbPolicy, Outlier, Protocol, RoutingTable, Service, ServiceAddr},
};

#[test]
fn every_map_has_a_fill_ratio_or_a_reason_not_to() {
    let sized: BTreeSet<&str> = SIZED.iter().map(|m| m.map).collect();
    let unsized_: BTreeSet<&str> = UNSIZED.iter().map(|(m, _)| *m).collect();
    assert_eq!(sized.len(), SIZED.len(), "a map listed twice");
    assert!(sized.is_disjoint(&unsized_));
    let all: BTreeSet<&str> = map_names::ALL.into_iter().collect();
    assert_eq!(&sized | &unsized_, all);
    // Labels are distinct, and the four the metric always had keep their names.
    let labels: BTreeSet<&str> = SIZED.iter().map(|m| m.label).collect();
    assert_eq!(labels.len(), SIZED.len());
    for old in ["services", "backends", "slots", "maglev"] {
        assert!(labels.contains(old), "{old}");
    }
}

#[test]
fn a_map_warns_once_when_it_fills_and_again_only_after_it_had_room() {
    let mut w = FullWatch::default();
    // Refusals from before the first look are history.
    assert_eq!(w.observe("M", 5, 10, 3), None);
    // Filling up: full at capacity.
    assert_eq!(w.observe("M", 9, 10, 3), None);
    assert_eq!(w.observe("M", 10, 10, 3), Some(Change::Filled));
    // Staying full, refusing more, freeing one and taking it again: no news.
    assert_eq!(w.observe("M", 10, 10, 7), None);
    assert_eq!(w.observe("M", 9, 10, 7), None);
    assert_eq!(w.observe("M", 10, 10, 7), None);
    assert!(w.is_full("M"));
    // Room again only below 90 % with no refusal since.
    assert_eq!(w.observe("M", 8, 10, 8), None);
    assert_eq!(w.observe("M", 8, 10, 8), Some(Change::HasRoom));
    assert!(!w.is_full("M"));
    // A refusal below capacity (a kernel counter rose: entries freed meanwhile)
    // is full too.
    assert_eq!(w.observe("M", 3, 10, 9), Some(Change::Filled));
    assert_eq!(w.observe("M", 3, 10, 9), Some(Change::HasRoom));
    // Other maps are watched apart.
    assert_eq!(w.observe("N", 1, 1, 0), Some(Change::Filled));
    assert!(!w.is_full("M"));
    // A map without a capacity (not known yet) is never full by its count.
    assert_eq!(w.observe("Z", 0, 0, 0), None);
}

fn svc(last: u8) -> ServiceAddr {
    ServiceAddr {
        vip: std::net::IpAddr::from([10, 96, 0, last]),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn backends(n: u8, weight: u32) -> Vec<Backend> {
    (1..=n)
        .map(|i| Backend::new(std::net::IpAddr::from([10, 1, 0, i]), 8080).weighted(weight))
        .collect()
}

/// Services of every kind: weighted slots, direct slots, Maglev, outlier
/// detection with priority levels, a circuit breaker, least connections.
fn mixed() -> RoutingTable {
    let mut t = RoutingTable::default();
    t.insert(svc(1), backends(3, 1));
    t.insert(svc(2), Service::new(backends(2, 1), LbPolicy::Random));
    t.insert(
        svc(3),
        Service::new(
            [
                backends(1, 1),
                vec![Backend::new([10, 1, 1, 1].into(), 8080).weighted(3)],
            ]
            .concat(),
            LbPolicy::Random,
        ),
    );
    t.insert(
        svc(4),
        Service::new(backends(4, 1), LbPolicy::Maglev { table_size: 1021 }),
    );
    let outlier = Health {
        outlier: Some(Outlier {
            consecutive: 5,
            enforcing: 100,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            interval_ms: 10_000,
            max_ejection_percent: 100,
            panic_percent: 0,
        }),
        ..Health::default()
    };
    // Two priorities: the service is served by levels (`SM_TIERS`).
    let two_levels: Vec<Backend> = backends(3, 1)
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            b.placed(crate::model::Placement {
                priority: u8::from(i == 2),
                ..crate::model::Placement::default()
            })
        })
        .collect();
    let planned =
        crate::lb::levels::plan(&two_levels, crate::lb::levels::LbSettings::default(), true);
    let leveled = Service::new(planned.backends, LbPolicy::Random)
        .with_health(outlier)
        .with_levels(planned.levels);
    t.insert(svc(5), leveled);
    let breaker = Health {
        max_connections: Some(4),
        ..Health::default()
    };
    t.insert(
        svc(6),
        Service::new(backends(2, 1), LbPolicy::Random).with_health(breaker),
    );
    t.insert(
        svc(8),
        Service::new(backends(3, 1), LbPolicy::LeastConn { choices: 2 }),
    );
    t
}

/// The writer's count of least-connections services, and the table's.
fn least_conn(w: &MapWriter<MemStore>) -> (usize, usize) {
    let installed = w
        .table()
        .services
        .values()
        .filter(|s| matches!(s.policy, LbPolicy::LeastConn { .. }))
        .count();
    (w.entries().least_conn, installed)
}

/// What the in-memory maps really hold, by map.
fn held(st: &MemStore) -> BTreeMap<&'static str, u64> {
    let tables: BTreeSet<u32> = st.maglev.keys().map(|k| k.service_id).collect();
    [
        (map_names::SERVICES, st.services.len()),
        (map_names::SERVICE_STATS, st.stats.len()),
        (map_names::SLOTS, st.slots.len()),
        (map_names::MAGLEV, tables.len()),
        (map_names::TIERS, st.tiers.len()),
        (map_names::BACKENDS, st.backends.len()),
        (map_names::SERVICE_POLICY, st.policies.len()),
        (map_names::SERVICE_HEALTH, st.service_health.len()),
    ]
    .into_iter()
    .map(|(m, n)| (m, n as u64))
    .collect()
}

/// The writer's count of the maps it writes, as [`fills`] reports it.
fn reported(w: &MapWriter<MemStore>) -> BTreeMap<&'static str, u64> {
    let capacity: BTreeMap<&'static str, u64> = SIZED.iter().map(|m| (m.map, 1 << 30)).collect();
    fills(
        &w.entries(),
        &BTreeMap::new(),
        &BTreeMap::new(),
        &capacity,
        &BTreeMap::new(),
        &mut FullWatch::default(),
    )
    .into_iter()
    .filter(|f| {
        SIZED
            .iter()
            .any(|m| m.map == f.map && m.filled_by == FilledBy::Agent)
    })
    .map(|f| {
        (
            SIZED.iter().find(|m| m.map == f.map).map_or("", |m| m.map),
            f.entries,
        )
    })
    .collect()
}

#[test]
fn the_writers_count_is_what_the_maps_hold_through_adds_updates_and_removals() {
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    let mut t = mixed();
    w.apply(&t).expect("apply");
    assert_eq!(reported(&w), held(w.store()));
    // The shape is there: a Maglev table in chunks, levels, health entries.
    assert_eq!(
        w.store().maglev.len(),
        1021usize.div_ceil(MAGLEV_CHUNK),
        "{:?}",
        w.store().maglev.keys()
    );
    assert_eq!(held(w.store())[map_names::TIERS], 1);
    assert_eq!(held(w.store())[map_names::SERVICE_HEALTH], 2);
    assert_eq!(least_conn(&w), (1, 1));
    // One service at a time: grow, switch policy, drop health, remove.
    let mut changes = crate::model::Changes::new();
    changes.insert(svc(1), Some(backends(6, 2).into()));
    changes.insert(svc(4), Some(backends(2, 1).into()));
    changes.insert(svc(6), Some(backends(2, 1).into()));
    changes.insert(svc(2), None);
    changes.insert(
        svc(9),
        Some(Service::new(
            backends(2, 1),
            LbPolicy::LeastConn { choices: 3 },
        )),
    );
    w.apply_changes(&changes).expect("changes");
    assert_eq!(reported(&w), held(w.store()));
    assert_eq!(least_conn(&w), (2, 2));
    let mut changes = crate::model::Changes::new();
    changes.insert(svc(8), Some(backends(3, 1).into()));
    w.apply_changes(&changes).expect("changes");
    assert_eq!(least_conn(&w), (1, 1));
    t.services.remove(&svc(5));
    t.services.remove(&svc(3));
    w.apply(&t).expect("apply");
    assert_eq!(reported(&w), held(w.store()));
    assert_eq!(least_conn(&w), (1, 1));
    w.apply(&RoutingTable::default()).expect("empty");
    assert_eq!(reported(&w), held(w.store()));
    assert_eq!(least_conn(&w), (0, 0));
    assert!(reported(&w).values().all(|&n| n == 0), "{:?}", reported(&w));
}

#[test]
fn a_failed_counter_release_is_still_counted_until_it_is_retried() {
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&mixed()).expect("apply");
    let key = crate::dataplane::service_key(&svc(1));
    let slot = w.store().services[&key].stats;
    w.store_mut().fail_op = Some(Op::ReleaseStats(slot));
    let mut changes = crate::model::Changes::new();
    changes.insert(svc(1), None);
    w.apply_changes(&changes)
        .expect("the routing maps are written regardless");
    assert_eq!(reported(&w), held(w.store()));
    assert_eq!(held(w.store())[map_names::SERVICE_STATS], 7);
    w.store_mut().fail_op = None;
    w.apply_changes(&crate::model::Changes::new())
        .expect("the retry");
    assert_eq!(reported(&w), held(w.store()));
    assert_eq!(held(w.store())[map_names::SERVICE_STATS], 6);
}

#[test]
fn a_write_refused_for_want_of_room_fills_its_map_once() {
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    let mut t = mixed();
    w.apply(&t).expect("apply");
    // The health map refuses the next service's entry, as a full kernel map does.
    let new = svc(7);
    t.insert(
        new,
        Service::new(backends(1, 1), LbPolicy::Random).with_health(Health {
            max_connections: Some(1),
            ..Health::default()
        }),
    );
    w.store_mut().fail_full = true;
    w.store_mut().fail_op = Some(Op::CreateServiceHealth(crate::dataplane::service_key(&new)));
    let capacity: BTreeMap<&'static str, u64> = SIZED.iter().map(|m| (m.map, 100)).collect();
    let mut watch = FullWatch::default();
    let look = |w: &MapWriter<MemStore>, watch: &mut FullWatch| {
        let refused: BTreeMap<&'static str, u64> = MapName::ALL
            .iter()
            .map(|m| (m.as_str(), w.store().refusals().of(*m)))
            .collect();
        fills(
            &w.entries(),
            &BTreeMap::new(),
            &BTreeMap::new(),
            &capacity,
            &refused,
            watch,
        )
        .into_iter()
        .filter(|f| f.full)
        .map(|f| f.map)
        .collect::<Vec<_>>()
    };
    assert!(look(&w, &mut watch).is_empty());
    let e = w.apply(&t).expect_err("the health entry is refused");
    assert!(
        matches!(&e, crate::dataplane::WriteError::Store { source, .. } if source.is_full()),
        "{e:?}"
    );
    assert_eq!(look(&w, &mut watch), [map_names::SERVICE_HEALTH]);
    // Retried every second, refused every time: still the one full map.
    for _ in 0..3 {
        let _ = w.apply(&t);
        assert_eq!(look(&w, &mut watch), [map_names::SERVICE_HEALTH]);
    }
    assert_eq!(
        w.store().refusals().of(MapName::ServiceHealth),
        4,
        "every refusal is counted"
    );
    // Room again (the service gone): not full at the next look.
    w.store_mut().fail_op = None;
    t.services.remove(&new);
    w.apply(&t).expect("apply");
    assert!(look(&w, &mut watch).is_empty());
}

#[test]
fn without_kernel_maps_the_routing_maps_fill_from_the_tables_usage() {
    let usage = crate::model::Usage {
        services: 2,
        backends: 5,
        slots: 8,
        maglev: 1,
    };
    let limits = Limits {
        services: 4,
        backends: 10,
        slots: 16,
        maglev: 2,
        ..Limits::default()
    };
    let ratios: BTreeMap<String, f64> = from_usage(&usage, &limits)
        .into_iter()
        .map(|f| (f.label.clone(), f.ratio()))
        .collect();
    assert_eq!(
        ratios,
        [
            ("backends".to_owned(), 0.5),
            ("maglev".to_owned(), 0.5),
            ("services".to_owned(), 0.5),
            ("slots".to_owned(), 0.5)
        ]
        .into()
    );
}

#[test]
fn a_map_the_programs_fill_for_some_services_is_walked_until_two_counts_find_it_empty() {
    let mut f = Feeding::default();
    // Never counted: it may hold anything (pins adopted from an earlier agent).
    assert!(f.may_hold());
    f.looked(false);
    assert!(f.may_hold());
    // Counted empty with no service that fills it: not walked.
    f.counted(0, false);
    assert!(!f.may_hold());
    // A service that fills it is installed: walked at once, before any count.
    f.looked(true);
    assert!(f.may_hold());
    // It goes again before the next count, which finds it empty: a program that
    // read the service's policy before it went may add an entry after that
    // count, so the map is walked until the count after.
    f.looked(false);
    f.counted(0, false);
    assert!(f.may_hold());
    f.looked(false);
    assert!(f.may_hold());
    f.counted(0, false);
    assert!(!f.may_hold());
    // Entries left behind (open connections, awaiting the sweep) keep it walked
    // with no service filling it, until a count finds them gone.
    f.counted(3, false);
    assert!(f.may_hold());
    f.counted(3, false);
    assert!(f.may_hold());
    f.counted(0, false);
    assert!(!f.may_hold());
    // A service filling it at the count keeps it walked, even counted empty.
    f.counted(0, true);
    f.counted(0, true);
    assert!(f.may_hold());
}
