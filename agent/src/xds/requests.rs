//! The delta client's subscription requests, each within what a control plane
//! receives.
//!
//! istiod refuses a message above 4 MiB (its default `MaxRecvMsgSize`,
//! `ISTIO_GPRC_MAXRECVMSGSIZE` in `pilot/pkg/features/tuning.go`): the stream fails
//! with RESOURCE_EXHAUSTED and a client that sends the same request again fails
//! forever. 100,000 EDS names (`outbound|8080||svc-12345.ns.svc.cluster.local`)
//! take about 5 MB. So a subscription change is sent in requests of at most
//! [`MAX_REQUEST_BYTES`] (the delta protocol adds subscriptions request by
//! request), and a stream's first request carries `initial_resource_versions`
//! only for what the client wants now (Envoy's
//! `DeltaSubscriptionState::getNextRequestAckless` sends the versions of the
//! resources it requests, and for a wildcard type those it holds) and only as many
//! as fit: a version left out only means the server sends that resource again.

use std::collections::{BTreeMap, BTreeSet};

use sockmesh_proto::pb::envoy::{
    config::core::v3::Node, service::discovery::v3::DeltaDiscoveryRequest,
};

use super::decode::Kind;

/// The most bytes one request takes: istiod's 4 MiB receive limit less room for
/// the node (its metadata: a few KiB) and the framing.
pub const MAX_REQUEST_BYTES: usize = 3 << 20;

/// The bytes a string field (or a map entry's key and value) adds to a request:
/// its own and at most 4 of tag and length (more than enough below 2 MiB each).
fn field_cost(s: &str) -> usize {
    s.len() + 4
}

/// A stream's first requests of `kind`: subscribing to what is `wanted` (empty
/// for a wildcard type: the legacy wildcard every server knows), the versions of
/// what is `held` and still wanted (all held, for a wildcard type), `node` on the
/// first; within `budget` bytes each.
pub fn initial(
    kind: Kind,
    node: &Node,
    wanted: &BTreeSet<String>,
    held: BTreeMap<String, String>,
    budget: usize,
) -> Vec<DeltaDiscoveryRequest> {
    let subscribe: Vec<String> = wanted.iter().cloned().collect();
    let versions = held
        .into_iter()
        .filter(|(n, _)| kind.is_wildcard() || wanted.contains(n));
    let mut first = DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: kind.type_url().to_owned(),
        ..Default::default()
    };
    let mut used = {
        use prost::Message as _;
        first.encoded_len()
    };
    // Versions first, as many as fit in half the budget, so the names that
    // follow are never squeezed out by them.
    for (name, version) in versions {
        let cost = field_cost(&name) + field_cost(&version) + 4;
        if used + cost > budget / 2 {
            break;
        }
        used += cost;
        first.initial_resource_versions.insert(name, version);
    }
    let mut out = vec![first];
    chunk(kind, subscribe, Vec::new(), budget, used, &mut out);
    out
}

/// Requests of `kind` that subscribe to `subscribe` and unsubscribe from
/// `unsubscribe`, within `budget` bytes each.
pub fn changes(
    kind: Kind,
    subscribe: Vec<String>,
    unsubscribe: Vec<String>,
    budget: usize,
) -> Vec<DeltaDiscoveryRequest> {
    let mut out = Vec::new();
    chunk(kind, subscribe, unsubscribe, budget, budget, &mut out);
    out
}

/// Adds the names to the last request of `out` while it has room (it has used
/// `used` bytes), then to new ones.
fn chunk(
    kind: Kind,
    subscribe: Vec<String>,
    unsubscribe: Vec<String>,
    budget: usize,
    mut used: usize,
    out: &mut Vec<DeltaDiscoveryRequest>,
) {
    let empty = || DeltaDiscoveryRequest {
        type_url: kind.type_url().to_owned(),
        ..Default::default()
    };
    let base = field_cost(kind.type_url());
    let names = subscribe
        .into_iter()
        .map(|n| (true, n))
        .chain(unsubscribe.into_iter().map(|n| (false, n)));
    for (sub, name) in names {
        let cost = field_cost(&name);
        if used + cost > budget || out.is_empty() {
            out.push(empty());
            used = base;
        }
        used += cost;
        let Some(last) = out.last_mut() else { continue };
        if sub {
            last.resource_names_subscribe.push(name);
        } else {
            last.resource_names_unsubscribe.push(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{pin::Pin, sync::Arc};

    use prost::Message as _;
    use sockmesh_proto::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
    };
    use tokio_stream::{Stream, StreamExt as _};

    use super::*;

    /// istiod's default receive limit.
    const ISTIOD_MAX_RECV: usize = 4 << 20;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                format!(
                    "outbound|8080||svc-{i:06}.namespace-{:03}.svc.cluster.local",
                    i % 500
                )
            })
            .collect()
    }

    fn node() -> Node {
        Node {
            id: "sidecar~10.0.0.5~sockmesh-abcde.kube-system~kube-system.svc.cluster.local".into(),
            ..Default::default()
        }
    }

    /// A reconnect with 100,000 EDS names wanted and held: every name subscribed
    /// once, versions only of names wanted, each request within the budget.
    #[test]
    fn a_reconnect_at_100k_names_is_split_within_the_budget() {
        let wanted: BTreeSet<String> = names(100_000).into_iter().collect();
        // Held: the wanted ones and 20,000 the client no longer wants (named to
        // sort first).
        let held: BTreeMap<String, String> = names(100_000)
            .into_iter()
            .chain((0..20_000).map(|i| format!("outbound|1||gone-{i:05}.svc.cluster.local")))
            .map(|n| (n, "2026-12-01T10:00:00Z/17".to_owned()))
            .collect();
        let requests = initial(Kind::Endpoint, &node(), &wanted, held, MAX_REQUEST_BYTES);
        assert!(
            requests.len() >= 2,
            "5 MB of names need more than one request"
        );
        let mut subscribed = BTreeSet::new();
        for r in &requests {
            assert!(
                r.encoded_len() <= MAX_REQUEST_BYTES,
                "{} bytes",
                r.encoded_len()
            );
            for n in &r.resource_names_subscribe {
                assert!(subscribed.insert(n.clone()), "{n} twice");
            }
            assert!(
                r.initial_resource_versions
                    .keys()
                    .all(|n| wanted.contains(n)),
                "a version of a name no longer wanted"
            );
        }
        assert_eq!(subscribed, wanted);
        assert!(requests[0].node.is_some() && requests[1..].iter().all(|r| r.node.is_none()));
        assert!(!requests[0].initial_resource_versions.is_empty());
        assert!(
            requests[1..]
                .iter()
                .all(|r| r.initial_resource_versions.is_empty())
        );
        let changes = changes(
            Kind::Endpoint,
            names(100_000),
            names(120_000).split_off(100_000),
            MAX_REQUEST_BYTES,
        );
        assert!(changes.iter().all(|r| r.encoded_len() <= MAX_REQUEST_BYTES));
        let total: usize = changes
            .iter()
            .map(|r| r.resource_names_subscribe.len() + r.resource_names_unsubscribe.len())
            .sum();
        assert_eq!(total, 120_000);
    }

    /// What a server limited as istiod is received of one stream: names
    /// subscribed, or the stream's error.
    #[derive(Clone, Default)]
    struct Limited(Arc<std::sync::Mutex<(usize, Option<tonic::Code>)>>);

    type Out<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl AggregatedDiscoveryService for Limited {
        type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
        type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

        async fn stream_aggregated_resources(
            &self,
            _: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
        ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("delta only"))
        }

        async fn delta_aggregated_resources(
            &self,
            request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
            let mut input = request.into_inner();
            while let Some(req) = input.next().await {
                let mut seen = self.0.lock().map_err(|_| tonic::Status::internal("lock"))?;
                match req {
                    Ok(r) => seen.0 += r.resource_names_subscribe.len(),
                    Err(e) => {
                        seen.1 = Some(e.code());
                        break;
                    }
                }
            }
            Ok(tonic::Response::new(Box::pin(tokio_stream::empty())))
        }
    }

    /// Sends `requests` on one delta stream to a server that, as istiod, refuses a
    /// message above 4 MiB; what it received.
    async fn send(requests: Vec<DeltaDiscoveryRequest>) -> (usize, Option<tonic::Code>) {
        let server = Limited::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let svc = AggregatedDiscoveryServiceServer::new(server.clone())
            .max_decoding_message_size(ISTIOD_MAX_RECV);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect")
            .max_encoding_message_size(64 << 20);
        let _ = client
            .delta_aggregated_resources(tokio_stream::iter(requests))
            .await
            .map(|r| r.into_inner());
        // The server reads until the client's stream ends.
        for _ in 0..200 {
            let got = *server.0.lock().expect("lock");
            if got.0 > 0 || got.1.is_some() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                return *server.0.lock().expect("lock");
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        *server.0.lock().expect("lock")
    }

    #[test]
    fn a_server_that_receives_4_mib_takes_the_split_reconnect_and_refuses_one_request() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let wanted: BTreeSet<String> = names(100_000).into_iter().collect();
        let split = initial(
            Kind::Endpoint,
            &node(),
            &wanted,
            BTreeMap::new(),
            MAX_REQUEST_BYTES,
        );
        let (received, error) = rt.block_on(send(split));
        assert_eq!((received, error), (100_000, None));
        // One request of every name, as before: refused as istiod refuses it.
        let whole = initial(
            Kind::Endpoint,
            &node(),
            &wanted,
            BTreeMap::new(),
            usize::MAX,
        );
        assert_eq!(whole.len(), 1);
        assert!(whole[0].encoded_len() > ISTIOD_MAX_RECV);
        let (received, error) = rt.block_on(send(whole));
        assert_eq!(received, 0);
        assert_eq!(error, Some(tonic::Code::OutOfRange), "{error:?}");
    }
}
