//! sockmesh: socket-level service load balancing in the kernel, driven by a routing
//! table (and, through the xDS client, by any Envoy control plane).
//!
//! Flow: source → [`model::RoutingTable`] → [`dataplane::Datapath`] (`MapWriter`) →
//! kernel maps → kernel programs (`ebpf/programs`).

pub mod admin;
pub mod admin_levels;
pub mod admin_types;
pub mod agent;
pub mod cli;
pub mod dataplane;
pub mod k8s;
pub mod lb;
pub mod model;
pub mod xds;
