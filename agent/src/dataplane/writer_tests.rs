use std::{
    cell::RefCell,
    collections::{BTreeSet, HashSet},
    net::IpAddr,
    rc::Rc,
};

use sockmesh_common::{BackendKey, ServiceValue, SlotKey};

use super::*;
use crate::{
    dataplane::{
        keys::{port_from_map, words_to_ip},
        store::{MemStore, Op},
        table_from_snapshot,
    },
    model::BackendState,
    model::{Backend, Protocol},
};

fn svc(vip: &str, port: u16) -> ServiceAddr {
    ServiceAddr {
        vip: vip.parse().expect("test address"),
        port,
        protocol: Protocol::Tcp,
    }
}

fn be(addr: &str, port: u16) -> Backend {
    Backend::new(addr.parse().expect("test address"), port)
}

fn table(services: &[(ServiceAddr, Vec<Backend>)]) -> RoutingTable {
    let mut t = RoutingTable::default();
    for (s, b) in services {
        t.insert(*s, b.clone());
    }
    t
}

/// Distinct (address, port) pairs a kernel program could pick for `s`.
fn reachable(store: &MemStore, s: &ServiceAddr) -> Option<BTreeSet<(IpAddr, u16)>> {
    store.resolve(&service_key(s)).map(|r| {
        r.expect("every published slot must resolve")
            .into_iter()
            .map(|(a, p)| (words_to_ip(a), port_from_map(p)))
            .collect()
    })
}

fn set(backends: &[Backend]) -> BTreeSet<(IpAddr, u16)> {
    backends
        .iter()
        .filter(|b| b.state == BackendState::Active)
        .map(|b| (b.address, b.port))
        .collect()
}

fn sorted(mut t: RoutingTable) -> RoutingTable {
    for b in t.services.values_mut() {
        b.backends_mut().sort();
    }
    t
}

#[test]
fn apply_then_reapply_writes_nothing() {
    let s = svc("10.96.0.1", 80);
    let t = table(&[(s, vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)])]);
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt empty");
    let r = w.apply(&t).expect("apply");
    assert_eq!((r.added, r.updated, r.removed), (1, 0, 0));
    assert_eq!(reachable(w.store(), &s), Some(set(&t.services[&s])));
    let r = w.apply(&t).expect("reapply");
    assert_eq!(
        r,
        ApplyReport {
            unchanged: 1,
            ..ApplyReport::default()
        }
    );
    assert_eq!(sorted(w.table()), sorted(t));
}

/// The core guarantee: after every single map write, a concurrent program sees the
/// old backend set or the new one, never a mix and never a dangling slot.
#[test]
fn every_intermediate_state_is_old_or_new() {
    let s = svc("10.96.0.1", 80);
    let steps = [
        vec![be("10.0.0.1", 80), be("10.0.0.2", 80), be("10.0.0.3", 80)],
        vec![be("10.0.0.2", 80), be("10.0.0.3", 80), be("10.0.0.4", 80)],
        vec![be("10.0.0.4", 80).weighted(3), be("10.0.0.5", 80)],
        vec![be("10.0.0.4", 80).draining(), be("10.0.0.5", 80)],
        vec![],
        vec![be("10.0.0.9", 80)],
    ];
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&table(&[(s, steps[0].clone())])).expect("first");
    for pair in steps.windows(2) {
        let (old, new) = (set(&pair[0]), set(&pair[1]));
        let seen = Rc::new(RefCell::new(0usize));
        let seen2 = Rc::clone(&seen);
        w.store_mut().after_write = Some(Box::new(move |st: &MemStore, op: &Op| {
            let now = reachable(st, &s).expect("service stays published");
            assert!(
                now == old || now == new,
                "after {op:?}: {now:?} is neither {old:?} nor {new:?}"
            );
            *seen2.borrow_mut() += 1;
        }));
        w.apply(&table(&[(s, pair[1].clone())])).expect("step");
        assert!(*seen.borrow() > 0, "the step must write something");
        assert_eq!(reachable(w.store(), &s), Some(set(&pair[1])));
        w.store_mut().after_write = None;
    }
}

#[test]
fn an_update_touches_only_its_service() {
    let a = svc("10.96.0.1", 80);
    let b = svc("10.96.0.2", 80);
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&table(&[
        (a, vec![be("10.0.0.1", 80)]),
        (b, vec![be("10.0.1.1", 80)]),
    ]))
    .expect("initial");
    let b_id = w.store().services[&service_key(&b)].id;
    w.store_mut().log.clear();
    let r = w
        .apply(&table(&[
            (a, vec![be("10.0.0.1", 80)]),
            (b, vec![be("10.0.1.2", 80)]),
        ]))
        .expect("update b");
    assert_eq!((r.updated, r.unchanged), (1, 1));
    for op in &w.store().log {
        let id = match op {
            Op::PutService(k)
            | Op::DelService(k)
            | Op::ClaimStats(_, k)
            | Op::PutPolicy(k)
            | Op::DelPolicy(k)
            | Op::CreateServiceHealth(k)
            | Op::DelServiceHealth(k) => {
                assert_eq!(*k, service_key(&b));
                b_id
            }
            Op::PutSlot(k)
            | Op::DelSlot(k)
            | Op::PutMaglev(k)
            | Op::DelMaglev(k)
            | Op::PutTiers(k)
            | Op::DelTiers(k) => k.service_id,
            Op::PutBackend(k) | Op::DelBackend(k) => k.service_id,
            Op::DelEndpointHealth(k) => {
                assert_eq!(k.service, service_key(&b));
                b_id
            }
            Op::ReleaseStats(slot) => panic!("an update released counter slot {slot}"),
        };
        assert_eq!(id, b_id, "{op:?} touched another service");
    }
    // One endpoint replaced by another in a direct service: its index is rewritten
    // in place, nothing else.
    assert_eq!(w.store().log.len(), 1);
}

#[test]
fn weight_change_rewrites_slots_draining_keeps_entry() {
    let s = svc("10.96.0.1", 80);
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&table(&[(s, vec![be("10.0.0.1", 80), be("10.0.0.2", 80)])]))
        .expect("a");
    w.apply(&table(&[(
        s,
        vec![be("10.0.0.1", 80), be("10.0.0.2", 80).weighted(3)],
    )]))
    .expect("b");
    let v = w.store().services[&service_key(&s)];
    assert_eq!(v.slot_count, 4);
    w.apply(&table(&[(
        s,
        vec![be("10.0.0.1", 80).draining(), be("10.0.0.2", 80)],
    )]))
    .expect("c");
    assert_eq!(reachable(w.store(), &s), Some(set(&[be("10.0.0.2", 80)])));
    let t = w.table();
    let listed = &t.services[&s];
    assert!(
        listed.contains(&be("10.0.0.1", 80).draining()),
        "{listed:?}"
    );
    assert_eq!(
        w.store().backends.len(),
        2,
        "draining backend keeps its entry"
    );
}

#[test]
fn zero_backends_publishes_an_empty_service() {
    let s = svc("10.96.0.1", 80);
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&table(&[(s, vec![])])).expect("apply");
    let v = w.store().services[&service_key(&s)];
    assert_eq!(v.slot_count, 0);
    assert_eq!(reachable(w.store(), &s), Some(BTreeSet::new()));
}

#[test]
fn removal_deletes_everything_of_the_service() {
    let s = svc("10.96.0.1", 80);
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&table(&[(
        s,
        vec![be("10.0.0.1", 80), be("10.0.0.2", 80).draining()],
    )]))
    .expect("apply");
    let before = w.store().log.len();
    let r = w.apply(&RoutingTable::default()).expect("remove");
    assert_eq!(r.removed, 1);
    let st = w.store();
    assert!(st.services.is_empty() && st.slots.is_empty() && st.backends.is_empty());
    assert_eq!(
        st.log[before],
        Op::DelService(service_key(&s)),
        "unpublished first"
    );
}

#[test]
fn invalid_tables_write_nothing() {
    let s = svc("10.96.0.1", 80);
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&table(&[(s, vec![be("10.0.0.1", 80)])]))
        .expect("good");
    let before = w.store().log.len();
    let bad = table(&[(s, vec![be("10.0.0.2", 0)]), (svc("10.96.0.2", 80), vec![])]);
    let err = w.apply(&bad).expect_err("port 0");
    assert!(
        matches!(err, WriteError::Invalid(ModelError::BackendPortZero { .. })),
        "{err}"
    );
    assert_eq!(w.store().log.len(), before);
    assert_eq!(reachable(w.store(), &s), Some(set(&[be("10.0.0.1", 80)])));
}

#[test]
fn a_failed_write_keeps_the_service_on_a_consistent_set_and_recovers() {
    let s = svc("10.96.0.1", 80);
    let old = vec![be("10.0.0.1", 80), be("10.0.0.2", 80)];
    let new = vec![be("10.0.0.2", 80), be("10.0.0.3", 80), be("10.0.0.4", 80)];
    // How many writes the update makes when nothing fails.
    let writes = {
        let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
        w.apply(&table(&[(s, old.clone())])).expect("old");
        let base = w.store().log.len();
        w.apply(&table(&[(s, new.clone())])).expect("new");
        w.store().log.len() - base
    };
    assert!(writes >= 7, "the update makes {writes} writes");
    // Fail each write of the update in turn: every one of them fails the update.
    for fail in 0..writes {
        let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
        w.apply(&table(&[(s, old.clone())])).expect("old");
        let base = w.store().log.len();
        w.store_mut().fail_at = Some(base + fail);
        let result = w.apply(&table(&[(s, new.clone())]));
        assert!(
            result.is_err(),
            "fail at write {fail} of {writes} not reported"
        );
        let now = reachable(w.store(), &s).expect("still published");
        assert!(
            now == set(&old) || now == set(&new),
            "fail at {fail}: {now:?}"
        );
        // The mirror matches the maps: adopting them gives the writer's view, and a
        // retry converges.
        let snap = w.store().snapshot().expect("snapshot");
        assert_eq!(
            sorted(table_from_snapshot(&snap)),
            sorted(w.table()),
            "fail at {fail}"
        );
        w.apply(&table(&[(s, new.clone())])).expect("retry");
        assert_eq!(reachable(w.store(), &s), Some(set(&new)));
        let st = w.store();
        assert_eq!(st.backends.len(), 3, "fail at {fail}: no leftover backend");
        assert_eq!(st.slots.len(), 3, "fail at {fail}: no leftover slot");
    }
}

#[test]
fn adopt_takes_over_without_rewriting_and_collects_garbage() {
    let a = svc("10.96.0.1", 80);
    let b = ServiceAddr {
        vip: "fd00::10".parse().expect("addr"),
        port: 53,
        protocol: Protocol::Udp,
    };
    let t = table(&[
        (
            a,
            vec![
                be("10.0.0.1", 80).weighted(2),
                be("10.0.0.2", 80).draining(),
            ],
        ),
        (b, vec![be("fd00::1", 53), be("fd00::2", 53)]),
    ]);
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&t).expect("apply");
    let mut store = std::mem::take(w.store_mut());
    // An interrupted update left an unpublished slot and an orphan backend.
    let id = store.services[&service_key(&a)].id;
    let unpublished = 1 - store.services[&service_key(&a)].generation;
    store.slots.insert(
        SlotKey {
            service_id: id,
            generation: unpublished,
            pad: 0,
            slot: 0,
        },
        0,
    );
    store.backends.insert(
        BackendKey {
            service_id: 999,
            index: 0,
        },
        store.backends.values().copied().next().expect("one"),
    );
    store.log.clear();

    let mut w = MapWriter::adopt(store).expect("adopt again");
    assert_eq!(
        w.store().log.len(),
        2,
        "only the two garbage entries are deleted"
    );
    assert_eq!(sorted(w.table()), sorted(t.clone()));
    w.store_mut().log.clear();
    assert_eq!(w.apply(&t).expect("same").map_ops, 0);
    assert!(w.store().log.is_empty());
    // New services after adoption get fresh ids.
    let c = svc("10.96.0.3", 80);
    let mut t2 = t;
    t2.insert(c, vec![be("10.0.0.7", 80)]);
    w.apply(&t2).expect("add");
    let ids: HashSet<u32> = w
        .store()
        .services
        .values()
        .map(|v: &ServiceValue| v.id)
        .collect();
    assert_eq!(ids.len(), 3);
}

#[test]
fn adopt_marks_inconsistent_services_dirty() {
    // A slot missing (weighted: slots in the map), and a backend missing (equal
    // weights: direct slots, none in the map).
    let weighted = svc("10.96.0.1", 80);
    let equal = svc("10.96.0.2", 80);
    let t = table(&[
        (
            weighted,
            vec![be("10.0.0.1", 80), be("10.0.0.2", 80).weighted(2)],
        ),
        (equal, vec![be("10.0.1.1", 80), be("10.0.1.2", 80)]),
    ]);
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&t).expect("apply");
    let mut store = std::mem::take(w.store_mut());
    let ids: HashMap<ServiceKey, u32> = store.services.iter().map(|(k, v)| (*k, v.id)).collect();
    assert!(
        store
            .slots
            .keys()
            .all(|k| k.service_id == ids[&service_key(&weighted)]),
        "equal weights publish direct slots"
    );
    let first = *store.slots.keys().next().expect("a slot");
    store.slots.remove(&first);
    let backend = *store
        .backends
        .keys()
        .find(|k| k.service_id == ids[&service_key(&equal)])
        .expect("a backend");
    store.backends.remove(&backend);
    let mut w = MapWriter::adopt(store).expect("adopt");
    let r = w.apply(&t).expect("repair");
    assert_eq!(r.updated, 2);
    assert_eq!(reachable(w.store(), &weighted).map(|s| s.len()), Some(2));
    assert_eq!(reachable(w.store(), &equal).map(|s| s.len()), Some(2));
}

#[test]
fn direct_slots_come_and_go_with_the_identity() {
    let s = svc("10.96.0.1", 80);
    let key = service_key(&s);
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    let check = |w: &mut MapWriter<MemStore>, backends: Vec<Backend>, direct: bool| {
        w.apply(&table(&[(s, backends.clone())])).expect("apply");
        let st = w.store();
        let value = st.services[&key];
        assert_eq!(
            value.flags & service_flags::DIRECT != 0,
            direct,
            "{backends:?}"
        );
        // Only the published generation's slots exist, and none when direct.
        let expected = if direct { 0 } else { value.slot_count as usize };
        assert_eq!(st.slots.len(), expected, "{backends:?}");
        assert_eq!(reachable(st, &s), Some(set(&backends)));
        assert_eq!(
            table_from_snapshot(&st.snapshot().expect("snapshot")),
            table(&[(s, backends)])
        );
    };
    // Written in one go: slot i is backend i.
    check(&mut w, vec![be("10.0.0.1", 80), be("10.0.0.2", 80)], true);
    // The first backend goes: the second keeps index 1 in slot 0.
    check(&mut w, vec![be("10.0.0.2", 80)], false);
    // A newcomer takes index 0: slots [0, 1] again.
    check(&mut w, vec![be("10.0.0.3", 80), be("10.0.0.2", 80)], true);
    // Weights make slots that are not the identity.
    check(
        &mut w,
        vec![be("10.0.0.3", 80).weighted(2), be("10.0.0.2", 80)],
        false,
    );
    // A restarted agent adopts a direct service as it is: no rewrite.
    check(&mut w, vec![be("10.0.0.3", 80), be("10.0.0.2", 80)], true);
    let store = std::mem::take(w.store_mut());
    let mut w = MapWriter::adopt(store).expect("adopt");
    let r = w
        .apply(&table(&[(s, vec![be("10.0.0.3", 80), be("10.0.0.2", 80)])]))
        .expect("same");
    assert_eq!((r.unchanged, r.map_ops), (1, 0));
}

fn services(n: u32) -> RoutingTable {
    let mut t = RoutingTable::default();
    for i in 0..n {
        let ip = IpAddr::from([10, 96, (i >> 8) as u8, i as u8]);
        let port = 1 + (i >> 16) as u16;
        t.insert(
            ServiceAddr {
                vip: ip,
                port,
                protocol: Protocol::Tcp,
            },
            vec![],
        );
    }
    t
}

#[test]
fn services_over_the_limit_are_refused_before_writing() {
    let t = services(sockmesh_common::MAX_SERVICES + 1);
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    let err = w.apply(&t).expect_err("too many");
    assert!(
        matches!(
            err,
            WriteError::Capacity(CapacityError::Services { count, limit: sockmesh_common::MAX_SERVICES })
                if count == sockmesh_common::MAX_SERVICES as usize + 1
        ),
        "{err}"
    );
    assert!(w.store().log.is_empty());
}

#[test]
fn more_services_than_the_default_fit_when_the_maps_are_larger() {
    let n = sockmesh_common::MAX_SERVICES + 10;
    let limits = crate::model::Limits {
        services: n,
        ..crate::model::Limits::default()
    };
    let mut w = MapWriter::adopt(MemStore::default())
        .expect("adopt")
        .with_limits(limits);
    let report = w.apply(&services(n)).expect("fits the raised limit");
    assert_eq!(report.added, n as usize);
}

#[test]
fn apply_changes_touches_only_the_changed_services_and_checks_limits() {
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    let a = svc("10.96.0.1", 80);
    let b = svc("10.96.0.2", 80);
    let c = svc("10.96.0.3", 80);
    w.apply(&table(&[
        (a, vec![be("10.1.0.1", 80)]),
        (b, vec![be("10.1.0.2", 80)]),
    ]))
    .expect("apply");
    let log_before = w.store().log.len();
    let mut changes = BTreeMap::new();
    changes.insert(a, Some(vec![be("10.1.0.9", 80), be("10.1.0.8", 80)].into()));
    changes.insert(b, None);
    changes.insert(c, Some(vec![be("10.1.0.3", 80)].into()));
    let report = w.apply_changes(&changes).expect("changes");
    assert_eq!((report.added, report.updated, report.removed), (1, 1, 1));
    assert_eq!(
        sorted(w.table()),
        sorted(table(&[
            (a, vec![be("10.1.0.8", 80), be("10.1.0.9", 80)]),
            (c, vec![be("10.1.0.3", 80)])
        ]))
    );
    assert_eq!(reachable(w.store(), &b), None);
    assert!(w.store().log.len() > log_before);
    let before = w.usage;
    w.recount();
    assert_eq!(before, w.usage, "running totals drifted");

    // A change breaking a rule is refused before any write.
    let log_before = w.store().log.len();
    let mut bad = BTreeMap::new();
    bad.insert(c, Some(vec![be("10.1.0.3", 0)].into()));
    assert!(w.apply_changes(&bad).is_err());
    assert_eq!(w.store().log.len(), log_before);
}

/// The counter slot a service's value names, and the service the slot names.
fn counter_slot(st: &MemStore, s: &ServiceAddr) -> (u32, Option<sockmesh_common::ServiceKey>) {
    let slot = st.services[&service_key(s)].stats;
    (slot, st.stats.get(&slot).copied())
}

/// Per-service counters exist exactly while the service is published: a slot
/// claimed in its name before the first value that names it is published,
/// released once it is unpublished.
#[test]
fn counters_exist_exactly_while_the_service_is_published() {
    let (a, b, c) = (
        svc("10.96.0.1", 80),
        svc("10.96.0.2", 80),
        svc("10.96.0.3", 80),
    );
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.store_mut().after_write = Some(Box::new(|st: &MemStore, op: &Op| {
        for (key, value) in &st.services {
            assert_eq!(
                st.stats.get(&value.stats),
                Some(key),
                "after {op:?}: the counter slot {key:?}'s value names is not its own"
            );
        }
    }));
    w.apply(&table(&[
        (a, vec![be("10.1.0.1", 80)]),
        (b, vec![be("10.1.0.2", 80)]),
    ]))
    .expect("apply");
    let (slot_b, _) = counter_slot(w.store(), &b);
    let mut changes = BTreeMap::new();
    changes.insert(b, None);
    changes.insert(c, Some(vec![be("10.1.0.3", 80)].into()));
    w.apply_changes(&changes).expect("changes");
    let st = w.store();
    let named: Vec<_> = st.stats.values().copied().collect();
    assert_eq!(named, [service_key(&a), service_key(&c)]);
    let (slot_c, _) = counter_slot(st, &c);
    assert_ne!(
        slot_c, slot_b,
        "a slot released in this apply is not handed out in it"
    );
    let at = |op: Op| st.log.iter().position(|o| *o == op).expect("logged");
    assert!(at(Op::ClaimStats(slot_c, service_key(&c))) < at(Op::PutService(service_key(&c))));
    assert!(at(Op::DelService(service_key(&b))) < at(Op::ReleaseStats(slot_b)));
    // From the next apply on, the lowest free slot is handed out again.
    let d = svc("10.96.0.4", 80);
    let mut changes = BTreeMap::new();
    changes.insert(d, Some(vec![be("10.1.0.4", 80)].into()));
    w.apply_changes(&changes).expect("d");
    assert_eq!(counter_slot(w.store(), &d), (slot_b, Some(service_key(&d))));
    w.apply(&RoutingTable::default()).expect("remove all");
    assert!(w.store().stats.is_empty());
}

#[test]
fn a_slot_stays_with_its_service_and_counter_failures_do_not_fail_the_table() {
    let (a, c) = (svc("10.96.0.1", 80), svc("10.96.0.3", 80));
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&table(&[(a, vec![be("10.1.0.1", 80)])]))
        .expect("apply");
    let before = counter_slot(w.store(), &a);
    w.store_mut().log.clear();
    w.apply(&table(&[(a, vec![be("10.1.0.2", 80)])]))
        .expect("update");
    assert_eq!(counter_slot(w.store(), &a), before, "the counts stay");
    assert!(
        !w.store()
            .log
            .iter()
            .any(|o| matches!(o, Op::ClaimStats(..) | Op::ReleaseStats(_))),
        "{:?}",
        w.store().log
    );
    // The first write of a new service is its counter slot's claim: fail it.
    let base = w.store().log.len();
    w.store_mut().fail_at = Some(base);
    let t = table(&[(a, vec![be("10.1.0.2", 80)]), (c, vec![be("10.1.0.3", 80)])]);
    let r = w
        .apply(&t)
        .expect("a counter failure does not fail the apply");
    assert_eq!((r.added, r.unchanged), (1, 1));
    assert_eq!(reachable(w.store(), &c), Some(set(&[be("10.1.0.3", 80)])));
    assert_eq!(counter_slot(w.store(), &c), (NO_STATS, None));
    // The next apply claims a slot and publishes the service again, naming it.
    let r = w.apply(&t).expect("again");
    assert_eq!((r.updated, r.unchanged), (1, 1));
    let (slot, named) = counter_slot(w.store(), &c);
    assert_ne!(slot, NO_STATS);
    assert_eq!(named, Some(service_key(&c)));
    assert_eq!(reachable(w.store(), &c), Some(set(&[be("10.1.0.3", 80)])));

    // A failed release is retried by the next apply.
    let mut changes = BTreeMap::new();
    changes.insert(c, None);
    w.store_mut().fail_op = Some(Op::ReleaseStats(slot));
    w.apply_changes(&changes).expect("removed anyway");
    assert_eq!(reachable(w.store(), &c), None);
    assert!(w.store().stats.contains_key(&slot), "release failed");
    w.store_mut().fail_op = None;
    w.apply_changes(&BTreeMap::new())
        .expect("nothing to change");
    assert!(!w.store().stats.contains_key(&slot), "retried");
}

#[test]
fn adopt_releases_slots_no_service_holds_and_claims_missing_ones() {
    let (a, b, c) = (
        svc("10.96.0.1", 80),
        svc("10.96.0.2", 80),
        svc("10.96.0.3", 80),
    );
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&table(&[
        (a, vec![be("10.1.0.1", 80)]),
        (b, vec![]),
        (c, vec![be("10.1.0.3", 80)]),
    ]))
    .expect("apply");
    let mut store = std::mem::take(w.store_mut());
    let slot = |s: &ServiceAddr| store.services[&service_key(s)].stats;
    let (slot_a, slot_b, slot_c) = (slot(&a), slot(&b), slot(&c));
    // An agent stopped between claiming a slot and publishing its service;
    // another service's slot was lost; a third's is named after another service.
    let orphan = service_key(&svc("10.96.0.9", 80));
    store.stats.insert(999, orphan);
    store.stats.remove(&slot_b);
    store.stats.insert(slot_c, orphan);
    store.log.clear();
    let mut w = MapWriter::adopt(store).expect("adopt again");
    let log = &w.store().log;
    let released: BTreeSet<u32> = log
        .iter()
        .filter_map(|o| match o {
            Op::ReleaseStats(s) => Some(*s),
            _ => None,
        })
        .collect();
    assert_eq!(released, BTreeSet::from([slot_c, 999]));
    let claimed: Vec<(u32, sockmesh_common::ServiceKey)> = log
        .iter()
        .filter_map(|o| match o {
            Op::ClaimStats(s, k) => Some((*s, *k)),
            _ => None,
        })
        .collect();
    // b and c claim a slot each (in the mirror's order); a slot released on
    // adoption is not handed out in the same apply, nor is a held one.
    let named: BTreeSet<_> = claimed.iter().map(|(_, k)| *k).collect();
    assert_eq!(named, BTreeSet::from([service_key(&b), service_key(&c)]));
    assert_ne!(claimed[0].0, claimed[1].0, "{log:?}");
    for (slot, _) in &claimed {
        assert!(![slot_a, slot_c, 999].contains(slot), "{log:?}");
    }
    // The services whose slot changed hands are published again naming it.
    w.apply(&table(&[
        (a, vec![be("10.1.0.1", 80)]),
        (b, vec![]),
        (c, vec![be("10.1.0.3", 80)]),
    ]))
    .expect("apply");
    // A service added afterwards gets a slot of its own.
    let d = svc("10.96.0.4", 80);
    w.apply(&table(&[
        (a, vec![be("10.1.0.1", 80)]),
        (b, vec![]),
        (c, vec![be("10.1.0.3", 80)]),
        (d, vec![be("10.1.0.4", 80)]),
    ]))
    .expect("apply with d");
    let mut slots = BTreeSet::new();
    for s in [a, b, c, d] {
        let (slot, named) = counter_slot(w.store(), &s);
        assert_eq!(named, Some(service_key(&s)), "{s}: slot {slot}");
        assert!(
            slots.insert(slot),
            "{s}: slot {slot} is another service's too"
        );
    }
    assert_eq!(counter_slot(w.store(), &a).0, slot_a);
}

#[test]
fn the_maps_never_go_above_the_peak_the_capacity_check_simulated() {
    // a and b grow 1 → 5, c shrinks 9 → 1 (the order matters: written in address
    // order the maps would hold 20 backends at once).
    let (a, b, c) = (
        svc("10.96.0.1", 80),
        svc("10.96.0.2", 80),
        svc("10.96.0.3", 80),
    );
    let n = |first: u8, count: u8| -> Vec<Backend> {
        (first..first + count)
            .map(|i| be(&format!("10.1.0.{i}"), 80))
            .collect()
    };
    let before = table(&[(a, n(1, 1)), (b, n(2, 1)), (c, n(10, 9))]);
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&before).expect("apply");
    let changes: Changes = [
        (a, Some(n(30, 5).into())),
        (b, Some(n(40, 5).into())),
        (c, Some(n(50, 1).into())),
    ]
    .into();
    let (after, transient) =
        Usage::of_table(&before).after(&changes, |s| before.services.get(s).map(Usage::of_service));
    let seen = std::rc::Rc::new(std::cell::Cell::new((0, 0)));
    let record = seen.clone();
    w.store_mut().after_write = Some(Box::new(move |st: &MemStore, _: &Op| {
        let (b, s) = record.get();
        record.set((b.max(st.backends.len()), s.max(st.slots.len())));
    }));
    w.apply_changes(&changes).expect("changes");
    let (peak_backends, peak_slots) = seen.get();
    assert!(
        peak_backends <= after.backends + transient.backends,
        "{peak_backends} backends in the maps at once, the check allowed for {}",
        after.backends + transient.backends
    );
    assert!(
        peak_slots <= after.slots + transient.slots,
        "{peak_slots} slots in the maps at once, the check allowed for {}",
        after.slots + transient.slots
    );
    assert_eq!(after.backends + transient.backends, 12);
    // A writer whose limit is that peak writes the whole update.
    let mut tight = MapWriter::adopt(MemStore::default())
        .expect("adopt")
        .with_limits(crate::model::Limits {
            backends: 12,
            slots: 12,
            ..crate::model::Limits::default()
        });
    tight.apply(&before).expect("apply");
    tight.apply_changes(&changes).expect("fits at its peak");
}

#[test]
fn the_policy_is_published_with_the_service_and_a_policy_change_republishes() {
    use crate::model::{LbPolicy, Service};
    let a = svc("10.96.0.1", 80);
    let backends = vec![be("10.1.0.1", 80), be("10.1.0.2", 80)];
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    let mut t = RoutingTable::default();
    t.insert(
        a,
        Service::new(backends.clone(), LbPolicy::LeastConn { choices: 3 }),
    );
    w.apply(&t).expect("apply");
    let v = w.store().services[&service_key(&a)];
    assert_eq!(
        (v.policy, v.choices),
        (sockmesh_common::lb_policy::LEAST_CONN, 3)
    );
    assert_eq!(
        table_from_snapshot(&w.store().snapshot().expect("snapshot")),
        t
    );
    // The same backends under another policy: one publish, the new value.
    let mut t2 = RoutingTable::default();
    t2.insert(a, Service::new(backends, LbPolicy::Random));
    let r = w.apply(&t2).expect("policy change");
    assert_eq!(r.updated, 1);
    let v2 = w.store().services[&service_key(&a)];
    assert_eq!(v2.policy, sockmesh_common::lb_policy::RANDOM);
    assert_ne!(v2.generation, v.generation, "published as a new generation");
    assert_eq!(w.apply(&t2).expect("again").map_ops, 0, "then unchanged");
}

#[test]
fn least_connections_draws_are_marked_per_service_and_follow_the_setting() {
    use sockmesh_common::service_flags::ENVOY_DRAWS;

    use crate::model::{LbPolicy, Service};
    let least = svc("10.96.0.1", 80);
    let random = svc("10.96.0.2", 80);
    let backends = vec![be("10.1.0.1", 80), be("10.1.0.2", 80)];
    let mut t = RoutingTable::default();
    t.insert(
        least,
        Service::new(backends.clone(), LbPolicy::LeastConn { choices: 2 }),
    );
    t.insert(random, Service::new(backends, LbPolicy::Random));
    let flags = |w: &MapWriter<MemStore>, s| w.store().services[&service_key(&s)].flags;
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&t).expect("apply");
    assert_eq!(flags(&w, least) & ENVOY_DRAWS, 0, "distinct by default");
    // An agent restarted with `--least-request-draws envoy` rewrites the
    // least-connections service alone, once.
    let mut w = MapWriter::adopt(w.into_store())
        .expect("adopt")
        .with_envoy_draws(true);
    assert_eq!(w.apply(&t).expect("apply").updated, 1);
    assert_eq!(flags(&w, least) & ENVOY_DRAWS, ENVOY_DRAWS);
    assert_eq!(flags(&w, random) & ENVOY_DRAWS, 0);
    assert_eq!(w.apply(&t).expect("again").map_ops, 0, "then unchanged");
    assert_eq!(
        table_from_snapshot(&w.store().snapshot().expect("snapshot")),
        t
    );
}

fn maglev_table_of(backends: Vec<Backend>, table_size: u32) -> RoutingTable {
    use crate::model::{LbPolicy, Service};
    let mut t = RoutingTable::default();
    t.insert(
        svc("10.96.0.7", 80),
        Service::new(backends, LbPolicy::Maglev { table_size }),
    );
    t
}

/// Every entry of the published Maglev table, resolved (the order matters: the
/// entry a client hashes to is its backend).
fn maglev_entries(store: &MemStore) -> Vec<(IpAddr, u16)> {
    store
        .resolve(&service_key(&svc("10.96.0.7", 80)))
        .expect("published")
        .expect("every entry resolves")
        .into_iter()
        .map(|(a, p)| (words_to_ip(a), port_from_map(p)))
        .collect()
}

#[test]
fn a_maglev_table_is_written_in_chunks_and_published_whole() {
    let ten: Vec<Backend> = (1..=10).map(|i| be(&format!("10.2.0.{i}"), 80)).collect();
    let nine: Vec<Backend> = ten
        .iter()
        .filter(|b| b.port != 80 || b.address != "10.2.0.5".parse::<IpAddr>().expect("ip"))
        .cloned()
        .collect();
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&maglev_table_of(ten.clone(), 1021)).expect("ten");
    // 1,021 entries in 4 chunks; no slot-map entry.
    assert_eq!((w.store().maglev.len(), w.store().slots.len()), (4, 0));
    let v = w.store().services[&service_key(&svc("10.96.0.7", 80))];
    assert_eq!(
        (v.policy, v.slot_count),
        (sockmesh_common::lb_policy::MAGLEV, 1021)
    );
    let before = maglev_entries(w.store());
    assert_eq!(before.len(), 1021);
    // After every write of the update the published table is the old one or the
    // new one, entry for entry.
    let after = {
        let mut probe = MapWriter::adopt(MemStore::default()).expect("adopt");
        probe
            .apply(&maglev_table_of(nine.clone(), 1021))
            .expect("nine");
        maglev_entries(probe.store())
    };
    let (old, new) = (before.clone(), after.clone());
    w.store_mut().after_write = Some(Box::new(move |st: &MemStore, op: &Op| {
        let now = maglev_entries(st);
        assert!(now == old || now == new, "after {op:?}: a mixed table");
    }));
    w.apply(&maglev_table_of(nine.clone(), 1021)).expect("nine");
    w.store_mut().after_write = None;
    assert_eq!(maglev_entries(w.store()), after);
    assert_eq!(w.store().maglev.len(), 4, "the old generation is deleted");
    // Mostly the removed backend's entries moved (Maglev's minimal disruption; at
    // 100 entries per backend a few others move too: `lb::maglev` measures it at
    // real table sizes).
    let removed: (IpAddr, u16) = ("10.2.0.5".parse().expect("ip"), 80);
    let others_moved = before
        .iter()
        .zip(&after)
        .filter(|(a, b)| a != b && **a != removed)
        .count();
    assert!(
        others_moved * 20 < before.len(),
        "{others_moved} entries of kept backends moved"
    );
    // A restarted writer adopts the table as it is and writes nothing.
    let store = std::mem::take(w.store_mut());
    let mut again = MapWriter::adopt(store).expect("adopt");
    assert_eq!(
        again
            .apply(&maglev_table_of(nine, 1021))
            .expect("same")
            .map_ops,
        0
    );
}

#[test]
fn switching_to_and_from_maglev_leaves_nothing_behind() {
    use crate::model::{LbPolicy, Service};
    let s = svc("10.96.0.7", 80);
    let backends = vec![be("10.2.0.1", 80), be("10.2.0.2", 80)];
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    let policies = [
        LbPolicy::Random,
        LbPolicy::Maglev { table_size: 257 },
        LbPolicy::Maglev { table_size: 509 },
        LbPolicy::LeastConn { choices: 2 },
        LbPolicy::Maglev { table_size: 251 },
    ];
    for p in policies {
        let mut t = RoutingTable::default();
        t.insert(s, Service::new(backends.clone(), p));
        w.apply(&t).expect("apply");
        let st = w.store();
        let (slots, chunks) = (st.slots.len(), st.maglev.len());
        match p {
            LbPolicy::Maglev { table_size } => {
                assert_eq!(
                    (slots, chunks),
                    (0, (table_size as usize).div_ceil(256)),
                    "{p:?}"
                );
            }
            // Two equal weights: direct slots, none in the map.
            _ => assert_eq!((slots, chunks), (0, 0), "{p:?}"),
        }
        assert_eq!(reachable(st, &s), Some(set(&backends)), "{p:?}");
        assert_eq!(w.usage().maglev, usize::from(p.is_maglev()));
        assert_eq!(
            table_from_snapshot(&w.store().snapshot().expect("snapshot")),
            t
        );
    }
    w.apply(&RoutingTable::default()).expect("remove");
    let st = w.store();
    assert!(st.slots.is_empty() && st.maglev.is_empty() && st.backends.is_empty());
}

#[test]
fn a_failed_maglev_write_keeps_a_whole_table_and_recovers() {
    let old: Vec<Backend> = (1..=3).map(|i| be(&format!("10.2.0.{i}"), 80)).collect();
    let new: Vec<Backend> = (2..=5).map(|i| be(&format!("10.2.0.{i}"), 80)).collect();
    let tables = |b: &[Backend]| {
        let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
        w.apply(&maglev_table_of(b.to_vec(), 509)).expect("apply");
        maglev_entries(w.store())
    };
    let (want_old, want_new) = (tables(&old), tables(&new));
    let writes = {
        let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
        w.apply(&maglev_table_of(old.clone(), 509)).expect("old");
        let base = w.store().log.len();
        w.apply(&maglev_table_of(new.clone(), 509)).expect("new");
        w.store().log.len() - base
    };
    for fail in 0..writes {
        let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
        w.apply(&maglev_table_of(old.clone(), 509)).expect("old");
        let base = w.store().log.len();
        w.store_mut().fail_at = Some(base + fail);
        assert!(
            w.apply(&maglev_table_of(new.clone(), 509)).is_err(),
            "fail at {fail}"
        );
        let now = maglev_entries(w.store());
        assert!(
            now == want_old || now == want_new,
            "fail at {fail}: a mixed table"
        );
        w.apply(&maglev_table_of(new.clone(), 509)).expect("retry");
        assert_eq!(maglev_entries(w.store()), want_new, "fail at {fail}");
        assert_eq!(
            w.store().maglev.len(),
            2,
            "fail at {fail}: no leftover chunk"
        );
    }
}

#[test]
fn a_replaced_endpoint_of_a_direct_service_is_rewritten_in_place() {
    let s = svc("10.96.0.1", 80);
    let key = service_key(&s);
    let outlier = crate::model::Outlier {
        consecutive: 5,
        enforcing: 100,
        base_ejection_ms: 30_000,
        max_ejection_ms: 300_000,
        interval_ms: 10_000,
        max_ejection_percent: 100,
        panic_percent: 0,
    };
    let health = crate::model::Health {
        outlier: Some(outlier),
        max_connections: None,
    };
    let service = |backends: Vec<Backend>| {
        let mut t = RoutingTable::default();
        t.insert(
            s,
            Service::new(backends, LbPolicy::Random).with_health(health),
        );
        t
    };
    let old = vec![be("10.0.0.1", 80), be("10.0.0.2", 80), be("10.0.0.3", 80)];
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&service(old)).expect("apply");
    let value = w.store().services[&key];
    assert_ne!(value.flags & service_flags::DIRECT, 0);
    // The kernel has seen the endpoint that goes (it keeps health state for it).
    let gone = be("10.0.0.2", 80);
    let gone_key = EndpointKey {
        service: key,
        addr: crate::dataplane::keys::ip_to_words(gone.address),
        port: crate::dataplane::keys::port_to_map(gone.port),
        pad: 0,
    };
    w.store_mut().endpoint_health.insert(gone_key);
    let base = w.store().log.len();
    let new = vec![be("10.0.0.1", 80), be("10.0.0.4", 80), be("10.0.0.3", 80)];
    w.apply(&service(new.clone())).expect("replace one");
    let st = w.store();
    // One write for the endpoint, one delete for the health of the one it replaced;
    // no slot, no service value.
    assert_eq!(
        st.log[base..],
        [
            Op::PutBackend(BackendKey {
                service_id: value.id,
                index: 1
            }),
            Op::DelEndpointHealth(gone_key),
        ]
    );
    assert_eq!(st.services[&key], value, "the published value stays");
    assert!(st.slots.is_empty());
    assert_eq!(reachable(st, &s), Some(set(&new)));
    assert_eq!(
        table_from_snapshot(&st.snapshot().expect("snapshot")),
        service(new)
    );
    // A replacement that changes the count is not in place: it publishes slots.
    let base = st.log.len();
    let fewer = vec![be("10.0.0.1", 80), be("10.0.0.5", 80)];
    w.apply(&service(fewer.clone()))
        .expect("replace two by one");
    let st = w.store();
    assert!(st.log[base..].contains(&Op::PutService(key)));
    assert_eq!(reachable(st, &s), Some(set(&fewer)));
}

/// `n` services of every kind the writer publishes, in turn: direct slots (equal
/// weights), a slot table (weighted), a Maglev table, least connections with
/// health settings, and no backends.
fn mixed(n: u32) -> RoutingTable {
    let health = crate::model::Health {
        outlier: None,
        max_connections: Some(50),
    };
    let mut t = RoutingTable::default();
    for i in 0..n {
        let s = ServiceAddr {
            vip: IpAddr::from([10, 97, (i >> 8) as u8, i as u8]),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let backends: Vec<Backend> = (0..=(i % 3))
            .map(|j| be(&format!("10.3.{}.{}", i % 250, j + 1), 8080))
            .collect();
        let service = match i % 5 {
            0 => Service::new(backends, LbPolicy::Random),
            1 => Service::new(
                backends
                    .into_iter()
                    .map(|b| b.weighted(2))
                    .chain([be("10.4.0.1", 80)])
                    .collect(),
                LbPolicy::Random,
            ),
            2 => Service::new(backends, LbPolicy::Maglev { table_size: 251 }),
            3 => Service::new(backends, LbPolicy::LeastConn { choices: 2 }).with_health(health),
            _ => Service::new(vec![], LbPolicy::Random),
        };
        t.insert(s, service);
    }
    t
}

/// After every write: each published service resolves whole and has counters.
fn check_published_whole(w: &mut MapWriter<MemStore>) {
    w.store_mut().after_write = Some(Box::new(|st: &MemStore, op: &Op| {
        for key in st.services.keys() {
            let resolved = st.resolve(key).expect("published");
            assert!(
                resolved.is_ok(),
                "after {op:?}: {key:?} is published half-written"
            );
        }
    }));
}

/// Entries per map: (services, backends, slots, Maglev chunks, health settings).
fn entry_counts(st: &MemStore) -> [usize; 5] {
    [
        st.services.len(),
        st.backends.len(),
        st.slots.len(),
        st.maglev.len(),
        st.policies.len(),
    ]
}

#[test]
fn many_new_services_are_written_map_by_map_and_each_is_published_whole() {
    let t = mixed(100);
    let mut bulk = MapWriter::adopt(MemStore::default()).expect("adopt");
    check_published_whole(&mut bulk);
    let r = bulk.apply(&t).expect("bulk");
    assert_eq!((r.added, r.updated), (100, 0));
    // The same services one at a time (runs too short for the bulk path).
    let mut single = MapWriter::adopt(MemStore::default()).expect("adopt");
    for (s, b) in &t.services {
        let mut changes = Changes::new();
        changes.insert(*s, Some(b.clone()));
        single.apply_changes(&changes).expect("one");
    }
    let (a, b) = (bulk.store(), single.store());
    assert_eq!(
        sorted(table_from_snapshot(&a.snapshot().expect("snapshot"))),
        sorted(t.clone())
    );
    assert_eq!(entry_counts(a), entry_counts(b));
    assert_eq!(a.stats.len(), 100);
    assert_eq!(
        r.map_ops,
        b.log
            .iter()
            .filter(|o| !matches!(o, Op::ClaimStats(..)))
            .count()
    );
    // It was the bulk path: no service value before the last backend entry.
    let first_value = a.log.iter().position(|o| matches!(o, Op::PutService(_)));
    let last_backend = a.log.iter().rposition(|o| matches!(o, Op::PutBackend(_)));
    assert!(
        first_value > last_backend,
        "{first_value:?} {last_backend:?}"
    );
    assert_eq!(bulk.usage(), single.usage());
    assert_eq!(bulk.apply(&t).expect("again").map_ops, 0);
}

#[test]
fn a_failed_bulk_write_is_undone_and_the_services_go_one_by_one() {
    let t = mixed(40);
    let (log, counts) = {
        let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
        w.apply(&t).expect("apply");
        (w.store().log.clone(), entry_counts(w.store()))
    };
    // Fail the first and last write of every map's batch, and every 9th write.
    let kind = |o: &Op| std::mem::discriminant(o);
    let fails: Vec<usize> = (0..log.len())
        .filter(|&i| {
            i % 9 == 0
                || i + 1 == log.len()
                || kind(&log[i]) != kind(&log[i + 1])
                || (i > 0 && kind(&log[i]) != kind(&log[i - 1]))
        })
        .collect();
    assert!(fails.len() >= 12, "{fails:?}");
    for fail in fails {
        let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
        check_published_whole(&mut w);
        w.store_mut().fail_at = Some(fail);
        // The store fails once: the one-by-one path after the undo succeeds.
        w.apply(&t)
            .unwrap_or_else(|e| panic!("fail at {fail}: {e}"));
        let st = w.store();
        assert!(
            st.fail_at.is_none(),
            "fail at {fail}: the failure was not hit"
        );
        assert_eq!(
            sorted(table_from_snapshot(&st.snapshot().expect("snapshot"))),
            sorted(t.clone()),
            "fail at {fail}"
        );
        assert_eq!(
            entry_counts(st),
            counts,
            "fail at {fail}: nothing left behind"
        );
        assert_eq!(
            sorted(w.table()),
            sorted(t.clone()),
            "fail at {fail}: the mirror"
        );
        // A counter slot whose claim failed is claimed by the next apply.
        w.apply(&t).expect("again");
        assert_eq!(w.store().stats.len(), 40, "fail at {fail}");
    }
}

#[test]
fn a_bulk_failure_that_persists_is_reported_for_its_service() {
    let t = mixed(40);
    let target = *t.services.keys().nth(12).expect("40 services");
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    check_published_whole(&mut w);
    // Every write of the 13th service's value fails, in the batch and one by one.
    w.store_mut().fail_op = Some(Op::PutService(service_key(&target)));
    let err = w
        .apply(&t)
        .expect_err("the 13th service cannot be published");
    assert!(
        matches!(err, WriteError::Store { service, .. } if service == target),
        "{err}"
    );
    // The mirror matches the maps; the services before the target are installed,
    // the target and those after it left nothing behind.
    let st = w.store();
    let installed = table_from_snapshot(&st.snapshot().expect("snapshot"));
    assert_eq!(sorted(installed.clone()), sorted(w.table()));
    assert!(!installed.services.contains_key(&target));
    let installed_ids: HashSet<u32> = st.services.values().map(|v| v.id).collect();
    assert!(
        st.backends
            .keys()
            .all(|k| installed_ids.contains(&k.service_id))
    );
    assert!(
        st.slots
            .keys()
            .all(|k| installed_ids.contains(&k.service_id))
    );
    assert!(
        st.maglev
            .keys()
            .all(|k| installed_ids.contains(&k.service_id))
    );
    assert_eq!(
        st.policies.len(),
        installed
            .services
            .values()
            .filter(|s| !s.health.is_off())
            .count()
    );
    // Once the failure stops, the next apply installs everything.
    w.store_mut().fail_op = None;
    w.apply(&t).expect("recovered");
    assert_eq!(sorted(w.table()), sorted(t));
}

/// A wave of services replacing another holds both while it is written; once the
/// old wave is gone the mirror gives back the room it took (a hash map keeps its
/// largest capacity otherwise), and holds what a fresh writer of the new wave does.
#[test]
fn a_replaced_wave_leaves_no_spare_capacity_behind() {
    let wave = |w: u32| -> Changes {
        (0..3_000_u32)
            .map(|i| {
                let n = w * 3_000 + i;
                let vip = std::net::Ipv4Addr::from(0x0a60_0000 + n);
                (
                    svc(&vip.to_string(), 80),
                    Some(crate::model::Service::from(vec![be("10.0.0.1", 8080)])),
                )
            })
            .collect()
    };
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt empty");
    w.apply_changes(&wave(0)).expect("first wave");
    let mut fresh = MapWriter::adopt(MemStore::default()).expect("adopt empty");
    fresh
        .apply_changes(&wave(1))
        .expect("the second wave alone");
    // Both at once, then the first removed.
    w.apply_changes(&wave(1)).expect("second wave");
    let gone: Changes = wave(0).into_keys().map(|s| (s, None)).collect();
    w.apply_changes(&gone).expect("first wave removed");
    assert_eq!(w.mirror.services.len(), 3_000);
    assert!(
        w.mirror.services.capacity() <= 2 * 3_000,
        "{} for 3,000",
        w.mirror.services.capacity()
    );
    assert_eq!(
        w.mirror.services.capacity(),
        fresh.mirror.services.capacity()
    );
    assert!(w.ids.capacity() <= 2 * 3_000, "{}", w.ids.capacity());
}

/// What the mirror holds of `s`'s entries: the table's own list, or entries of
/// their own.
fn shared_list(w: &MapWriter<MemStore>, s: &ServiceAddr) -> Option<Arc<[Backend]>> {
    match &w.mirror.services.get(&service_key(s))?.backends {
        crate::dataplane::entries::Entries::Shared { backends, .. } => Some(backends.clone()),
        crate::dataplane::entries::Entries::Own(_) => None,
    }
}

#[test]
fn the_mirror_keeps_a_written_service_as_the_tables_own_list() {
    let (a, b) = (svc("10.96.0.1", 80), svc("10.96.0.2", 80));
    let leveled: Vec<Backend> = [("10.0.1.1", 0), ("10.0.1.2", 1)]
        .into_iter()
        .map(|(addr, priority)| {
            be(addr, 80).placed(crate::model::Placement {
                priority,
                ..crate::model::Placement::default()
            })
        })
        .collect();
    let planned = crate::lb::levels::plan(&leveled, crate::lb::levels::LbSettings::default(), true);
    let mut t = table(&[(a, vec![be("10.0.0.1", 80), be("10.0.0.2", 80)])]);
    t.insert(
        b,
        Service::new(planned.backends, LbPolicy::Random).with_levels(planned.levels),
    );
    let mut w = MapWriter::adopt(MemStore::default()).expect("adopt");
    w.apply(&t).expect("apply");
    let list = shared_list(&w, &a).expect("a's entries are the table's list");
    assert!(Arc::ptr_eq(&list, &t.services[&a].backends));
    // Levels are entries of their own (each names its level).
    assert!(t.services[&b].levels.is_some());
    assert!(shared_list(&w, &b).is_none());

    // A change: the entries are rewritten, then kept as the new list.
    let t2 = table(&[(a, vec![be("10.0.0.2", 80).weighted(3), be("10.0.0.3", 80)])]);
    w.apply(&t2).expect("change");
    let list = shared_list(&w, &a).expect("shared again");
    assert!(Arc::ptr_eq(&list, &t2.services[&a].backends));
    assert_eq!(sorted(w.table()), sorted(t2.clone()));
    // What the kernel holds is what the mirror reads as.
    let id = w.mirror.services[&service_key(&a)].id;
    let held: BTreeSet<(u32, [u32; 4], u16, u32)> = w
        .store()
        .backends
        .iter()
        .filter(|(k, _)| k.service_id == id)
        .map(|(k, v)| (k.index, v.addr, v.port, v.weight))
        .collect();
    let mirrored: BTreeSet<(u32, [u32; 4], u16, u32)> = w.mirror.services[&service_key(&a)]
        .backends
        .iter()
        .map(|(i, v)| (i, v.addr, v.port, v.weight))
        .collect();
    assert_eq!(held, mirrored);
}
