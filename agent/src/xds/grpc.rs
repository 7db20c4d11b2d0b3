//! A bidirectional gRPC call on a tonic [`Channel`], its responses read message
//! by message into nothing larger than each message.
//!
//! tonic's `Streaming` gathers every message into one contiguous buffer that
//! grows to the largest message and never shrinks (a `BytesMut` reclaims its
//! room, it does not give it back). An ADS stream's largest message is the
//! initial EDS push: about 48 MiB at 100,000 services, kept for the life of the
//! stream. Here a message is decoded straight from the HTTP/2 frames that
//! carry it, and the frames are dropped once it is decoded.
//!
//! The framing is gRPC's ([PROTOCOL-HTTP2]): a byte of compression flag, a
//! four-byte big-endian length, the message. The agent asks for no compression,
//! so a compressed message is refused. The call's outcome is `grpc-status` in
//! the trailers (or in the headers of a trailers-only response), else the HTTP
//! status mapped as gRPC maps it.
//!
//! [PROTOCOL-HTTP2]: https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md

use std::{collections::VecDeque, marker::PhantomData};

use http_body_util::{BodyExt as _, StreamBody};
use hyper::{
    HeaderMap, Request, StatusCode,
    body::Frame,
    header::{CONTENT_TYPE, HeaderValue, TE},
};
use prost::bytes::{Buf, BufMut as _, Bytes, BytesMut};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Code, Status, body::Body, codegen::Service as _, metadata::MetadataMap};

/// The five bytes before each message.
const HEADER: usize = 5;

/// Opens the streaming call `path` on `channel`: `requests` are sent as they
/// come, with `metadata` as the call's headers; the responses are read from the
/// returned [`Responses`], each of at most `max_message` bytes.
pub async fn call<Req, Resp>(
    channel: &mut tonic::transport::Channel,
    path: &'static str,
    metadata: MetadataMap,
    requests: impl Stream<Item = Req> + Send + 'static,
    max_message: usize,
) -> Result<Responses<Resp>, Status>
where
    Req: prost::Message + 'static,
    Resp: prost::Message + Default,
{
    let frames = requests.map(|r| Ok::<_, Status>(Frame::data(encode(&r))));
    let mut request = Request::post(path)
        .body(Body::new(StreamBody::new(frames)))
        .map_err(|e| Status::internal(format!("the request of {path}: {e}")))?;
    let headers = request.headers_mut();
    headers.extend(metadata.into_headers());
    headers.insert(TE, HeaderValue::from_static("trailers"));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    // A trailers-only response: the call's outcome is in its headers.
    let trailers_only = status_of(response.headers());
    if let Some(status) = &trailers_only
        && status.code() != Code::Ok
    {
        return Err(status.clone());
    }
    let http = response.status();
    if http != StatusCode::OK {
        return Err(from_http(http));
    }
    Ok(Responses {
        body: response.into_body(),
        frames: Frames::default(),
        max_message,
        ended: trailers_only.is_some(),
        _message: PhantomData,
    })
}

/// A message as gRPC frames it, uncompressed.
fn encode(m: &impl prost::Message) -> Bytes {
    let len = m.encoded_len();
    let mut buf = BytesMut::with_capacity(HEADER + len);
    buf.put_u8(0);
    // A message past 4 GiB cannot be framed; prost cannot encode one either.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    m.encode_raw(&mut buf);
    buf.freeze()
}

/// The responses of a call.
pub struct Responses<M> {
    body: Body,
    frames: Frames,
    max_message: usize,
    ended: bool,
    _message: PhantomData<fn() -> M>,
}

impl<M: prost::Message + Default> Responses<M> {
    /// The next message; `None` once the server ended the call with `OK`.
    pub async fn message(&mut self) -> Result<Option<M>, Status> {
        loop {
            if let Some(m) = self.next_buffered()? {
                return Ok(Some(m));
            }
            if self.ended {
                return Ok(None);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.frames.push(data),
                    Err(frame) => {
                        let trailers = frame.into_trailers().unwrap_or_default();
                        self.end(status_of(&trailers))?;
                    }
                },
                Some(Err(status)) => return Err(status),
                None => self.end(None)?,
            }
        }
    }

    /// The stream has ended with `status` (`None`: without trailers).
    fn end(&mut self, status: Option<Status>) -> Result<(), Status> {
        self.ended = true;
        match status {
            Some(s) if s.code() != Code::Ok => Err(s),
            Some(_) if self.frames.len > 0 => Err(Status::internal(format!(
                "the stream ended inside a message ({} bytes of it received)",
                self.frames.len
            ))),
            Some(_) => Ok(()),
            None => Err(Status::internal(
                "the stream ended without a grpc-status (a reset, or a proxy's timeout)",
            )),
        }
    }

    /// The next message already received whole, if any.
    fn next_buffered(&mut self) -> Result<Option<M>, Status> {
        let Some(header) = self.frames.peek::<HEADER>() else {
            return Ok(None);
        };
        if header[0] != 0 {
            return Err(Status::internal(
                "a compressed message, which the agent did not ask for",
            ));
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > self.max_message {
            return Err(Status::out_of_range(format!(
                "a message of {len} bytes, past the limit of {} (--xds-max-message-size)",
                self.max_message
            )));
        }
        if self.frames.len < HEADER + len {
            return Ok(None);
        }
        self.frames.advance(HEADER);
        let mut body = (&mut self.frames).take(len);
        let m = M::decode(&mut body).map_err(|e| Status::internal(format!("decoding: {e}")));
        // A message prost stopped short of (it cannot, on success) is skipped whole.
        let rest = body.remaining();
        self.frames.advance(rest);
        m.map(Some)
    }
}

/// The received frames not yet decoded, in order.
#[derive(Default)]
struct Frames {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Frames {
    fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.len += data.len();
            self.chunks.push_back(data);
        }
    }

    /// The first `N` bytes, if received.
    fn peek<const N: usize>(&self) -> Option<[u8; N]> {
        if self.len < N {
            return None;
        }
        let mut out = [0u8; N];
        let mut at = 0;
        for c in &self.chunks {
            let n = c.len().min(N - at);
            out[at..at + n].copy_from_slice(&c[..n]);
            at += n;
            if at == N {
                break;
            }
        }
        Some(out)
    }
}

impl Buf for Frames {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| c.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the frames received");
        self.len -= cnt;
        while cnt > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if cnt < front.len() {
                front.advance(cnt);
                break;
            }
            cnt -= front.len();
            self.chunks.pop_front();
        }
    }

    /// Within one frame, a view of it rather than a copy.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        match self.chunks.front_mut() {
            Some(front) if front.len() >= len => {
                let out = front.split_to(len);
                self.len -= len;
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                out
            }
            _ => {
                let mut out = BytesMut::with_capacity(len);
                out.put((&mut *self).take(len));
                out.freeze()
            }
        }
    }
}

/// The call's status in `headers`, if they carry one. A malformed
/// `grpc-status-details` (which tonic's parser would panic on) is left out.
fn status_of(headers: &HeaderMap) -> Option<Status> {
    let mut headers = headers.clone();
    headers.remove(Status::GRPC_STATUS_DETAILS);
    Status::from_header_map(&headers)
}

/// The gRPC code of a call answered without a `grpc-status`, by its HTTP status,
/// as gRPC maps them (doc/http-grpc-status-mapping.md).
fn from_http(http: StatusCode) -> Status {
    let code = match http {
        StatusCode::BAD_REQUEST => Code::Internal,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(code, format!("HTTP status {http} without a grpc-status"))
}

#[cfg(test)]
mod tests {
    use sockmesh_proto::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse as Response;

    use super::*;

    fn response(version: &str) -> Response {
        Response {
            system_version_info: version.to_owned(),
            ..Default::default()
        }
    }

    fn trailers(pairs: &[(&'static str, &str)]) -> Frame<Bytes> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("header value"));
        }
        Frame::trailers(h)
    }

    /// What a body of `frames` reads as: each message's version, then how the
    /// stream ended.
    fn read(frames: Vec<Frame<Bytes>>, max: usize) -> (Vec<String>, Result<(), Code>) {
        let body = StreamBody::new(tokio_stream::iter(frames.into_iter().map(Ok::<_, Status>)));
        let mut r = Responses::<Response> {
            body: Body::new(body),
            frames: Frames::default(),
            max_message: max,
            ended: false,
            _message: PhantomData,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut seen = Vec::new();
        let end = rt.block_on(async {
            loop {
                match r.message().await {
                    Ok(Some(m)) => seen.push(m.system_version_info),
                    Ok(None) => return Ok(()),
                    Err(s) => return Err(s.code()),
                }
            }
        });
        (seen, end)
    }

    /// `bytes` cut at `cuts`, as frames.
    fn cut(bytes: &[u8], cuts: &[usize]) -> Vec<Frame<Bytes>> {
        let mut out = Vec::new();
        let mut from = 0;
        for &c in cuts.iter().chain([&bytes.len()]) {
            out.push(Frame::data(Bytes::copy_from_slice(&bytes[from..c])));
            from = c;
        }
        out
    }

    #[test]
    fn messages_are_read_across_any_frame_boundaries() {
        let mut wire = encode(&response("one")).to_vec();
        wire.extend_from_slice(&encode(&response(&"2".repeat(300))));
        let first = encode(&response("one")).len();
        let ok = || trailers(&[("grpc-status", "0")]);
        // In one frame; a frame a byte each around the header; cut inside the
        // second header and inside a field of the second message.
        for cuts in [vec![], vec![1, 2, 3, 4, 5], vec![first + 2, first + 40]] {
            let mut frames = cut(&wire, &cuts);
            frames.push(ok());
            let (seen, end) = read(frames, 1 << 20);
            assert_eq!(seen, ["one".to_owned(), "2".repeat(300)], "cuts {cuts:?}");
            assert_eq!(end, Ok(()));
        }
    }

    #[test]
    fn the_calls_status_ends_the_stream_after_what_came_before_it() {
        let frames = vec![
            Frame::data(encode(&response("one"))),
            trailers(&[("grpc-status", "7"), ("grpc-message", "no")]),
        ];
        assert_eq!(
            read(frames, 1 << 20),
            (vec!["one".to_owned()], Err(Code::PermissionDenied))
        );
        // A malformed status detail does not hide the code.
        let frames = vec![trailers(&[
            ("grpc-status", "16"),
            ("grpc-status-details-bin", "%%%"),
        ])];
        assert_eq!(read(frames, 1 << 20), (vec![], Err(Code::Unauthenticated)));
    }

    #[test]
    fn a_stream_cut_short_is_an_error() {
        let wire = encode(&response("one"));
        // No trailers at all.
        let frames = vec![Frame::data(wire.clone())];
        assert_eq!(
            read(frames, 1 << 20),
            (vec!["one".to_owned()], Err(Code::Internal))
        );
        // OK, but inside a message.
        let frames = vec![
            Frame::data(wire.slice(..wire.len() - 1)),
            trailers(&[("grpc-status", "0")]),
        ];
        assert_eq!(read(frames, 1 << 20), (vec![], Err(Code::Internal)));
    }

    #[test]
    fn a_message_past_the_limit_or_compressed_is_refused() {
        let wire = encode(&response(&"x".repeat(100)));
        let (seen, end) = read(vec![Frame::data(wire.clone())], 99);
        assert_eq!((seen.len(), end), (0, Err(Code::OutOfRange)));
        let mut compressed = wire.to_vec();
        compressed[0] = 1;
        let (seen, end) = read(vec![Frame::data(compressed.into())], 1 << 20);
        assert_eq!((seen.len(), end), (0, Err(Code::Internal)));
    }
}
