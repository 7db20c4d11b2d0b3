//! The xDS side: decoding Envoy resources, translating them into the routing table,
//! and the sources that deliver them (ADS over gRPC, files, REST-JSON).

pub mod ads;
pub mod clusters;
pub mod core;
pub mod decode;
pub mod dns;
pub mod file;
pub mod filedoc;
pub mod incremental;
pub mod opaque;
pub mod outlier;
pub mod resources;
pub mod rest;
pub mod state;
pub mod translate;
pub mod validate;

#[cfg(test)]
mod full;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz;
