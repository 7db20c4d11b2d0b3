//! One backend list per assignment: the store, the cluster's view and the
//! table's service hold the same allocation where translation leaves it as it
//! is, and a service whose plan changes it holds its own.

use std::sync::Arc;

use super::{TCP_EDS, full, svc};

/// [`TCP_EDS`] with one locality of two active endpoints, or with `more`
/// localities after it.
fn one_level(more: &str) -> String {
    let head = &TCP_EDS[..TCP_EDS.find("  endpoints:").expect("endpoints")];
    format!(
        "{head}  endpoints:
  - lb_endpoints:
    - endpoint: {{ address: {{ socket_address: {{ address: 10.1.0.1, port_value: 8080 }} }} }}
    - endpoint: {{ address: {{ socket_address: {{ address: 10.1.0.2, port_value: 8080 }} }} }}
{more}"
    )
}
use crate::{model::Protocol, xds::state::XdsState};

/// The backends the store holds for the assignment of `reviews.default.svc`.
fn stored_backends(st: &XdsState) -> &Arc<[crate::model::Backend]> {
    &st.resources()
        .endpoints
        .get("reviews.default.svc")
        .expect("stored")
        .backends
}

#[test]
fn a_service_of_one_cluster_holds_its_assignments_backend_list() {
    let mut st = XdsState::new();
    st.apply(full(&one_level(""))).result().expect("accepted");
    let stored = stored_backends(&st);
    let service = &st.table().services[&svc("10.96.0.10", 9080, Protocol::Tcp)];
    assert!(!stored.is_empty());
    assert!(
        Arc::ptr_eq(stored, &service.backends),
        "the table's service holds a copy of the assignment's backends"
    );
}

#[test]
fn a_service_whose_plan_changes_the_list_holds_its_own() {
    // Two priorities: the plan leaves priority 1's host out of the active
    // set, unlike the assignment's list.
    let yaml = one_level(
        "  - priority: 1
    lb_endpoints:
    - endpoint: { address: { socket_address: { address: 10.1.9.9, port_value: 8080 } } }
",
    );
    let mut st = XdsState::new();
    st.apply(full(&yaml)).result().expect("accepted");
    let stored = stored_backends(&st);
    let service = &st.table().services[&svc("10.96.0.10", 9080, Protocol::Tcp)];
    assert_eq!(stored.len(), service.backends.len(), "{service:?}");
    assert!(!Arc::ptr_eq(stored, &service.backends));
    assert_ne!(**stored, *service.backends);
}
