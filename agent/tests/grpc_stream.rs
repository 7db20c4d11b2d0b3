//! The ADS call's reader against a tonic server: the configured size limit, and
//! the memory of a large response given back once it is decoded.
//!
//! Memory is measured with jemalloc's per-thread counters (the agent's
//! allocator): the client runs on this test's thread (a current-thread runtime,
//! so the HTTP/2 connection's tasks run here too), the server on threads of its
//! own.

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

/// A server whose delta stream sends responses of about these sizes, then stays
/// open.
#[derive(Clone)]
struct Sends(Vec<usize>);

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Sends {
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
        let sent = tokio_stream::iter(self.0.clone().into_iter().map(|n| {
            Ok(DeltaDiscoveryResponse {
                system_version_info: "x".repeat(n),
                ..Default::default()
            })
        }));
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::StreamExt::chain(sent, tokio_stream::pending()),
        )))
    }
}

/// `server` on 127.0.0.1, on a runtime of its own: the runtime and the address.
fn serve(server: Sends) -> (tokio::runtime::Runtime, std::net::SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("server runtime");
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let svc =
            AggregatedDiscoveryServiceServer::new(server).max_encoding_message_size(usize::MAX);
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    (rt, addr)
}

/// The agent's delta call to `addr`, accepting messages up to `limit` bytes.
async fn open(
    addr: std::net::SocketAddr,
    limit: usize,
) -> Result<grpc::Responses<DeltaDiscoveryResponse>, tonic::Status> {
    let mut channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect");
    grpc::call(
        &mut channel,
        DELTA,
        Default::default(),
        tokio_stream::iter([DeltaDiscoveryRequest::default()]),
        limit,
    )
    .await
}

/// The first response's size under a limit of `limit`, or the stream's error.
fn first_size(server: Sends, limit: usize) -> Result<usize, tonic::Code> {
    let (server, addr) = serve(server);
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let size = client.block_on(async {
        let mut responses = open(addr, limit).await.map_err(|s| s.code())?;
        match responses.message().await {
            Ok(m) => Ok(m.map_or(0, |m| m.system_version_info.len())),
            Err(s) => Err(s.code()),
        }
    });
    server.shutdown_background();
    size
}

#[test]
fn a_response_beyond_the_configured_size_ends_the_stream() {
    assert_eq!(first_size(Sends(vec![2 << 20]), 4 << 20), Ok(2 << 20));
    assert_eq!(
        first_size(Sends(vec![2 << 20]), 1 << 20),
        Err(tonic::Code::OutOfRange)
    );
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
    let (server, addr) = serve(Sends(vec![LARGE, 10]));
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let (held_before, held_after, sizes) = client.block_on(async {
        let before = held_by_this_thread();
        let mut responses = open(addr, 64 << 20).await.expect("call");
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
