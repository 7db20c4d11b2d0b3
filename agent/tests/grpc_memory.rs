//! The ADS stream gives back the memory of a large response once it is decoded.
//!
//! Measured with jemalloc's per-thread counters (the agent's allocator): the
//! client runs on this test's thread (a current-thread runtime, so the HTTP/2
//! connection's tasks run here too), the server on threads of its own.

use std::{pin::Pin, time::Duration};

use sockmesh::xds::grpc;
use sockmesh_proto::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
};
use tokio_stream::Stream;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// A server whose delta stream sends a response of `.0` bytes, then a small one,
/// then stays open.
#[derive(Clone)]
struct LargeThenSmall(usize);

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for LargeThenSmall {
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
        _: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let response = |n: usize| {
            Ok(DeltaDiscoveryResponse {
                system_version_info: "x".repeat(n),
                ..Default::default()
            })
        };
        let sent = tokio_stream::iter([response(self.0), response(10)]);
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::StreamExt::chain(sent, tokio_stream::pending()),
        )))
    }
}

/// Bytes this thread holds: allocated here and not yet freed.
fn held_by_this_thread() -> i64 {
    let allocated = tikv_jemalloc_ctl::thread::allocatedp::read()
        .expect("thread.allocatedp")
        .get();
    let freed = tikv_jemalloc_ctl::thread::deallocatedp::read()
        .expect("thread.deallocatedp")
        .get();
    allocated as i64 - freed as i64
}

#[test]
fn a_large_response_is_not_held_once_decoded() {
    const LARGE: usize = 24 << 20;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("server runtime");
    server.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let svc = AggregatedDiscoveryServiceServer::new(LargeThenSmall(LARGE))
            .max_encoding_message_size(usize::MAX);
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let (held_before, held_after, sizes) = client.block_on(async {
        let before = held_by_this_thread();
        let mut channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect");
        let mut responses = grpc::call::<_, DeltaDiscoveryResponse>(
            &mut channel,
            DELTA,
            Default::default(),
            tokio_stream::iter([DeltaDiscoveryRequest::default()]),
            64 << 20,
        )
        .await
        .expect("call");
        let mut sizes = Vec::new();
        for _ in 0..2 {
            let m = responses.message().await.expect("message").expect("open");
            sizes.push(m.system_version_info.len());
        }
        // The stream and its connection stay open: what they hold is measured.
        let after = held_by_this_thread();
        drop(responses);
        (before, after, sizes)
    });
    assert_eq!(sizes, [LARGE, 10]);
    let held = held_after - held_before;
    assert!(
        held < 1 << 20,
        "the open stream holds {held} bytes after a response of {LARGE}"
    );
    server.shutdown_background();
}
