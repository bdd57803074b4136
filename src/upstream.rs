//! The upstream side: a pooled keep-alive HTTP/1.1 client to backends, the request body
//! that streams to them (after an optional bounded peek), and failure classification.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;
use crate::core::backend::Backend;
use crate::error::UpstreamFailure;
use crate::tap::{Tap, Tapped};

/// The shared client: one keep-alive pool keyed by backend address.
pub type UpstreamClient = Client<HttpConnector, ToBackend>;

/// Builds the client from the `[upstream]` settings.
pub fn client(config: &UpstreamConfig) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(config.idle_timeout)
        .pool_max_idle_per_host(config.max_idle_per_backend)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// Classifies a client error by walking its source chain to the I/O error.
pub fn classify(err: &hyper_util::client::legacy::Error) -> UpstreamFailure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => UpstreamFailure::Refused,
                std::io::ErrorKind::TimedOut => UpstreamFailure::ConnectTimeout,
                _ if err.is_connect() => UpstreamFailure::Connect,
                _ => UpstreamFailure::Reset,
            };
        }
        source = e.source();
    }
    if err.is_connect() {
        UpstreamFailure::Connect
    } else {
        UpstreamFailure::Reset
    }
}

/// The body sent to a backend: the client's body as it streams, possibly preceded by the
/// frames already read to find a session id in a form.
pub enum RequestBody {
    /// Untouched.
    Streaming(Incoming),
    /// Frames read during the peek, replayed first, then the rest.
    Peeked(Box<Peeked>),
}

/// The frames of a peeked body and what is left of it.
pub struct Peeked {
    frames: VecDeque<Frame<Bytes>>,
    rest: Option<Incoming>,
    buffered: u64,
}

/// The start of a request body, read to look for a session id.
pub struct Peek {
    /// The body to forward: exactly the bytes the client sent.
    pub body: RequestBody,
    /// The bytes read, contiguous (at most the limit plus one frame).
    pub head: Bytes,
    /// Whether `head` is the whole body.
    pub complete: bool,
}

/// Reads frames until `limit` bytes are held or the body ends.
pub async fn peek(mut body: Incoming, limit: usize) -> Result<Peek, hyper::Error> {
    let mut frames = VecDeque::new();
    let mut held = 0usize;
    let mut complete = false;
    while held < limit {
        match body.frame().await {
            None => {
                complete = true;
                break;
            }
            Some(frame) => {
                let frame = frame?;
                if let Some(data) = frame.data_ref() {
                    held += data.len();
                }
                let trailers = frame.is_trailers();
                frames.push_back(frame);
                if trailers {
                    complete = true;
                    break;
                }
            }
        }
    }
    let mut data = frames.iter().filter_map(Frame::data_ref);
    let head = if frames.len() == 1 {
        data.next().cloned().unwrap_or_default()
    } else {
        let mut joined = Vec::with_capacity(held);
        data.for_each(|d| joined.extend_from_slice(d));
        Bytes::from(joined)
    };
    let complete = complete || body.is_end_stream();
    let peeked = Peeked {
        frames,
        rest: (!complete).then_some(body),
        buffered: held as u64,
    };
    Ok(Peek {
        body: RequestBody::Peeked(Box::new(peeked)),
        head,
        complete,
    })
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streaming(inner) => Pin::new(inner).poll_frame(cx),
            RequestBody::Peeked(p) => {
                if let Some(frame) = p.frames.pop_front() {
                    if let Some(d) = frame.data_ref() {
                        p.buffered -= d.len() as u64;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                match &mut p.rest {
                    Some(rest) => Pin::new(rest).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming(inner) => inner.is_end_stream(),
            RequestBody::Peeked(p) => {
                p.frames.is_empty() && p.rest.as_ref().is_none_or(Body::is_end_stream)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming(inner) => inner.size_hint(),
            RequestBody::Peeked(p) => match &p.rest {
                None => SizeHint::with_exact(p.buffered),
                Some(rest) => {
                    let r = rest.size_hint();
                    let mut hint = SizeHint::new();
                    hint.set_lower(r.lower() + p.buffered);
                    if let Some(upper) = r.upper() {
                        hint.set_upper(upper + p.buffered);
                    }
                    hint
                }
            },
        }
    }
}

/// A request body on its way to a backend, counted into the backend's `bytes_in`.
pub type ToBackend = Tapped<RequestBody, CountBytesIn>;

/// Counts request body bytes into a backend's `bytes_in`.
pub struct CountBytesIn(pub Arc<Backend>);

impl Tap for CountBytesIn {
    fn data(&mut self, chunk: &Bytes) {
        self.0
            .stats
            .bytes_in
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
}
