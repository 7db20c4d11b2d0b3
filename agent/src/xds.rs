//! The xDS side: decoding Envoy resources, translating them into the routing table,
//! and the sources that deliver them (ADS over gRPC, files, REST-JSON).

pub mod decode;
pub mod state;
pub mod translate;

#[cfg(test)]
mod tests;
