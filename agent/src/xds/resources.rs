//! The store of accepted xDS resources: by type and name, each kept as its protobuf
//! encoding and decoded only when a change needs it.

use std::collections::BTreeMap;

use sockmesh_proto::pb::envoy::config::{
    cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
    route::v3::RouteConfiguration,
};

/// The xDS resources currently accepted, by name, each kept in its protobuf
/// encoding (see [`Encoded`]).
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub listeners: BTreeMap<String, Encoded<Listener>>,
    pub routes: BTreeMap<String, Encoded<RouteConfiguration>>,
    pub clusters: BTreeMap<String, Encoded<Cluster>>,
    /// ClusterLoadAssignments by `cluster_name` (the EDS service name).
    pub endpoints: BTreeMap<String, Encoded<ClusterLoadAssignment>>,
    /// The last good DNS answers of each STRICT_DNS/LOGICAL_DNS cluster, by
    /// cluster name (the agent resolves them; see `xds::dns`).
    pub dns: BTreeMap<String, super::clusters::DnsAnswers>,
}

/// One accepted resource, held as its protobuf encoding and decoded when a change
/// needs it. The decoded prost structs are about 50 times larger than their
/// encoding (`Cluster` alone is 3.4 KB before any field is set; 10,000 services
/// took 226 MiB decoded, 4 MiB encoded), and only the resources a change touches
/// are ever read again.
#[derive(Clone, PartialEq, Eq)]
pub struct Encoded<T> {
    bytes: Box<[u8]>,
    kind: std::marker::PhantomData<fn() -> T>,
}

impl<T: prost::Message + Default> Encoded<T> {
    pub fn new(message: &T) -> Self {
        Self::from_bytes(message.encode_to_vec().into_boxed_slice())
    }

    /// Wraps bytes that [`Encoded::new`] produced (an undo log handing them back).
    pub fn from_bytes(bytes: Box<[u8]>) -> Self {
        Self {
            bytes,
            kind: std::marker::PhantomData,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Box<[u8]> {
        self.bytes
    }

    /// The message. The bytes are prost's own encoding of a message, so they
    /// decode; were that ever to fail, the failure is logged and the message reads
    /// as empty rather than taking the agent down.
    pub fn decode(&self) -> T {
        T::decode(&*self.bytes).unwrap_or_else(|e| {
            tracing::error!(error = %e, "re-decoding a stored resource failed");
            T::default()
        })
    }
}

impl<T> std::fmt::Debug for Encoded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoded({} bytes)", self.bytes.len())
    }
}
