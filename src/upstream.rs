//! The upstream side: keep-alive HTTP/1.1 connections to backends, each driven directly by
//! the request holding it (no connection task and no channel between them, so a request
//! costs no extra task wake-ups), parked per backend between requests; the request body
//! that streams to them (after an optional bounded peek); the reply body read back.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use dashmap::DashMap;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::clock::Inactivity;
use crate::config::UpstreamConfig;
use crate::core::backend::Backend;
use crate::error::UpstreamFailure;
use crate::proxy::connection_has;
use crate::tap::{Tap, Tapped};

/// The largest reply head a backend may send.
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields a reply head may carry.
const MAX_HEADERS: usize = 128;
/// How much is read from a backend at a time.
const READ_CHUNK: usize = 16 * 1024;
/// The end of a chunked body.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// The longest chunk-size or trailer line accepted in a chunked reply.
const MAX_LINE: usize = 4096;

/// Connections to backends: dialled on demand, parked idle per backend address between
/// requests (most recently used first, so a quiet farm lets its extra connections expire).
pub struct Upstream {
    idle: DashMap<SocketAddr, VecDeque<Idle>>,
    connect_timeout: Duration,
    response_timeout: Duration,
    client_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One connection to a backend and what has been read from it but not yet consumed.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// The request head being written, kept to reuse its allocation.
    out: Vec<u8>,
    addr: SocketAddr,
    /// Whether it served a request before: a failure before any reply byte may then be a
    /// close the pool had not yet seen, and a request without a body is sent again.
    reused: bool,
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum SendError {
    /// The backend could not be reached, broke off, or answered with something that is not
    /// HTTP.
    Upstream(UpstreamFailure),
    /// The client's request body failed while it was being forwarded.
    Body,
    /// The client stopped sending its request body part-way (nothing for the client
    /// timeout).
    BodyStalled,
}

/// How an exchange failed, as far as sending it again is concerned.
enum Failed {
    /// The request could not be written: on a reused connection, the backend closed it
    /// idle, and has not seen the request.
    Unsent,
    /// The request was written and nothing came back: the backend may have acted on it (a
    /// Seaside `_k` callback acts on GET) before it closed.
    Silent,
    /// Anything else.
    Final(SendError),
}

impl From<UpstreamFailure> for Failed {
    fn from(f: UpstreamFailure) -> Self {
        Failed::Final(SendError::Upstream(f))
    }
}

impl Upstream {
    /// Connections with the `[upstream]` settings; a client may stay silent for
    /// `client_timeout` in the middle of a request body.
    pub fn new(config: &UpstreamConfig, client_timeout: Duration) -> Self {
        Upstream {
            idle: DashMap::new(),
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            client_timeout,
            idle_timeout: config.idle_timeout,
            max_idle: config.max_idle_per_backend,
        }
    }

    /// A connection to the backend at `addr`: a parked one, or a new one. Failing here sends
    /// nothing, so the request can still go to another backend.
    pub async fn connection(&self, addr: SocketAddr) -> Result<Conn, UpstreamFailure> {
        match self.checkout(addr) {
            Some(conn) => Ok(conn),
            None => self.connect(addr).await,
        }
    }

    /// Closes the parked connections to every address `live` does not name: a connection
    /// that finished its request after its backend was removed is parked again, and would
    /// otherwise stay open for nobody.
    pub fn keep_only(&self, live: impl Fn(SocketAddr) -> bool) {
        self.idle.retain(|addr, _| live(*addr));
    }

    /// Sends a request on `conn` and reads the reply head; the reply body streams from the
    /// connection, which is parked again once the body has been read whole.
    pub async fn send(
        self: &Arc<Self>,
        mut conn: Conn,
        head: &http::request::Parts,
        mut body: ToBackend,
    ) -> Result<Response<UpBody>, SendError> {
        let bodyless = body.is_end_stream();
        let addr = conn.addr;
        loop {
            match conn.exchange(head, &mut body, bodyless, self.waits()).await {
                Ok((parts, state, keep_alive)) => {
                    let mut body = UpBody {
                        conn: Some(conn),
                        state,
                        keep_alive,
                        upstream: self.clone(),
                        stall: Inactivity::new(self.response_timeout),
                        slot: None,
                    };
                    if matches!(body.state, BodyState::Length(0)) {
                        // No body to read: the client side may never poll it.
                        body.finish();
                    }
                    return Ok(Response::from_parts(parts, body));
                }
                // Sent again only when the backend cannot have seen it: a reused connection
                // it had closed refused the write. Once written, even an idempotent GET is not
                // sent twice (a Seaside callback on GET would act twice).
                Err(Failed::Unsent) if conn.reused && bodyless && head.method.is_idempotent() => {
                    conn = self.connect(addr).await.map_err(SendError::Upstream)?;
                }
                Err(Failed::Unsent | Failed::Silent) => {
                    return Err(SendError::Upstream(UpstreamFailure::Reset));
                }
                Err(Failed::Final(e)) => return Err(e),
            }
        }
    }

    fn waits(&self) -> Waits {
        Waits {
            backend: self.response_timeout,
            client: self.client_timeout,
        }
    }

    /// The most recently parked connection to `addr` that is still open and quiet. The
    /// checks and the closing of stale ones happen outside the pool's lock.
    fn checkout(&self, addr: SocketAddr) -> Option<Conn> {
        loop {
            let Idle { mut conn, since } = self.idle.get_mut(&addr)?.pop_back()?;
            if since.elapsed() < self.idle_timeout && conn.is_quiet() {
                conn.reused = true;
                return Some(conn);
            }
        }
    }

    /// Parks a connection whose last reply was read whole.
    fn release(&self, conn: Conn) {
        if self.max_idle == 0 {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.entry(conn.addr).or_default();
        // At most one leaves per release (the oldest: expired, or over the bound), so a
        // socket is closed after the lock is let go without collecting a list.
        let leaving = if idle.len() >= self.max_idle
            || idle
                .front()
                .is_some_and(|i| now.duration_since(i.since) >= self.idle_timeout)
        {
            idle.pop_front()
        } else {
            None
        };
        idle.push_back(Idle { conn, since: now });
        drop(idle);
        drop(leaving);
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Conn, UpstreamFailure> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Err(_) => return Err(UpstreamFailure::ConnectTimeout),
                Ok(Err(e)) => {
                    return Err(match e.kind() {
                        io::ErrorKind::ConnectionRefused => UpstreamFailure::Refused,
                        io::ErrorKind::TimedOut => UpstreamFailure::ConnectTimeout,
                        _ => UpstreamFailure::Connect,
                    });
                }
                Ok(Ok(stream)) => stream,
            };
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(1024),
            addr,
            reused: false,
        })
    }
}

impl Conn {
    /// Whether it was parked after an earlier request (not just opened).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Whether a parked connection can take a request: nothing unread, and no sign that the
    /// backend closed it. The reactor's readiness answers without a system call; only when
    /// it is stale (the last read filled the buffer exactly) does a read confirm.
    fn is_quiet(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => matches!(
                self.stream.try_read_buf(&mut self.buf),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
        }
    }

    /// Writes the request, then reads the reply head (skipping interim 1xx replies).
    ///
    /// The backend has `waits.backend` for each write of the request to go through and,
    /// once the request is sent, for its reply head: an upload takes as long as the client
    /// takes, as long as neither side stalls.
    async fn exchange(
        &mut self,
        head: &http::request::Parts,
        body: &mut ToBackend,
        bodyless: bool,
        waits: Waits,
    ) -> Result<(http::response::Parts, BodyState, bool), Failed> {
        let wait = waits.backend;
        // The length the client declared, which the body must match exactly; none: chunked.
        let declared = head.headers.get(CONTENT_LENGTH).map(|v| {
            std::str::from_utf8(v.as_bytes())
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        });
        if declared == Some(None) {
            return Err(Failed::Final(SendError::Body));
        }
        let declared = declared.flatten();
        let chunked = !bodyless && declared.is_none();
        encode_head(&mut self.out, head, chunked);
        let to_head = head.method == Method::HEAD;
        if bodyless {
            // One deadline for the head's write and the reply.
            let exchange = async {
                if self.stream.write_all(&self.out).await.is_err() {
                    return Err(Failed::Unsent);
                }
                self.read_head(to_head).await
            };
            return within(wait, exchange).await;
        }
        if let Err(failed) = self.write_body(body, declared, waits).await {
            // A backend may refuse a body before reading all of it (413, 401) and close the
            // connection: its answer, if one came, is worth more than the broken write.
            let Failed::Final(SendError::Upstream(UpstreamFailure::Reset)) = failed else {
                return Err(failed);
            };
            return match within(wait, self.read_head(to_head)).await {
                Ok((parts, state, _)) => Ok((parts, state, false)),
                Err(_) => Err(failed),
            };
        }
        within(wait, self.read_head(to_head)).await
    }

    /// Writes the encoded head with the body as it streams, each piece in one vectored write:
    /// the head goes out with the first piece of body, and a chunked body's last chunk with
    /// the piece the body ends on, so a form post is one write.
    ///
    /// A body that does not match its declared length fails the exchange (and so closes
    /// the connection) before a byte too many is written: whatever the client side let
    /// through, the backend never sees one request's bytes run into the next.
    ///
    /// The client has `waits.client` for each piece to arrive, the backend `waits.backend`
    /// for each write to go through.
    async fn write_body(
        &mut self,
        body: &mut ToBackend,
        declared: Option<u64>,
        waits: Waits,
    ) -> Result<(), Failed> {
        let broke = |_| Failed::from(UpstreamFailure::Reset);
        let stalled = |_| Failed::Final(SendError::BodyStalled);
        let timed_out = |_| Failed::from(UpstreamFailure::ResponseTimeout);
        let mismatch = || Failed::Final(SendError::Body);
        let chunked = declared.is_none();
        let Conn { stream, out, .. } = self;
        let mut head: &[u8] = out;
        let mut ended = false;
        let mut sent = 0u64;
        while !ended {
            let next = tokio::time::timeout(waits.client, body.frame())
                .await
                .map_err(stalled)?;
            let Some(frame) = next else {
                break;
            };
            let frame = frame.map_err(|_| Failed::Final(SendError::Body))?;
            let Ok(data) = frame.into_data() else {
                continue; // Trailers are not forwarded.
            };
            sent += data.len() as u64;
            if declared.is_some_and(|length| sent > length) {
                return Err(mismatch());
            }
            ended = body.is_end_stream();
            if data.is_empty() && !ended {
                continue;
            }
            let (size, size_len) = match (chunked, data.len()) {
                (true, 1..) => chunk_size_line(data.len()),
                _ => ([0; 18], 0),
            };
            let end: &[u8] = match (chunked, data.is_empty(), ended) {
                (false, _, _) => b"",
                (true, true, _) => LAST_CHUNK,
                (true, false, false) => b"\r\n",
                (true, false, true) => b"\r\n0\r\n\r\n",
            };
            let mut piece = Buf::chain(head, &size[..size_len])
                .chain(&data[..])
                .chain(end);
            tokio::time::timeout(waits.backend, stream.write_all_buf(&mut piece))
                .await
                .map_err(timed_out)?
                .map_err(broke)?;
            head = b"";
        }
        if declared.is_some_and(|length| sent != length) {
            return Err(mismatch());
        }
        let last: &[u8] = if chunked && !ended { LAST_CHUNK } else { b"" };
        let mut rest = Buf::chain(head, last);
        if rest.has_remaining() {
            tokio::time::timeout(waits.backend, stream.write_all_buf(&mut rest))
                .await
                .map_err(timed_out)?
                .map_err(broke)?;
        }
        Ok(())
    }

    async fn read_head(
        &mut self,
        to_head: bool,
    ) -> Result<(http::response::Parts, BodyState, bool), Failed> {
        let mut received = false;
        loop {
            if !self.buf.is_empty() {
                received = true;
                match self.parse_head(to_head)? {
                    Head::Final(parsed) => return Ok(parsed),
                    Head::Interim => continue,
                    Head::Partial => {}
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(UpstreamFailure::Invalid.into());
                }
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) if !received => return Err(Failed::Silent),
                Ok(0) | Err(_) => return Err(UpstreamFailure::Reset.into()),
                Ok(_) => {}
            }
        }
    }

    /// The reply head at the start of the buffer, taken out of it when complete.
    fn parse_head(&mut self, to_head: bool) -> Result<Head, Failed> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut reply = httparse::Response::new(&mut fields);
        let len = match reply.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(Head::Partial),
            Err(_) => return Err(UpstreamFailure::Invalid.into()),
        };
        let code = reply.code.unwrap_or(0);
        let version = if reply.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Where each name and value lies in the head, to share them out of it uncopied.
        let base = self.buf.as_ptr() as usize;
        let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
        let count = reply.headers.len();
        for (span, field) in spans.iter_mut().zip(reply.headers.iter()) {
            *span = (
                field.name.as_ptr() as usize - base,
                field.name.len(),
                field.value.as_ptr() as usize - base,
                field.value.len(),
            );
        }
        let status = StatusCode::from_u16(code).map_err(|_| UpstreamFailure::Invalid)?;
        let head = self.buf.split_to(len).freeze();
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Head::Interim);
        }
        let mut headers = HeaderMap::with_capacity(count);
        for &(name, name_len, value, value_len) in &spans[..count] {
            let name = HeaderName::from_bytes(&head[name..name + name_len])
                .map_err(|_| UpstreamFailure::Invalid)?;
            let value = HeaderValue::from_maybe_shared(head.slice(value..value + value_len))
                .map_err(|_| UpstreamFailure::Invalid)?;
            headers.append(name, value);
        }
        let keep_alive = match version {
            Version::HTTP_11 => !connection_has(&headers, "close"),
            _ => connection_has(&headers, "keep-alive"),
        };
        let state = body_framing(status, to_head, &headers)?;
        if headers.contains_key(TRANSFER_ENCODING) {
            // The coding decides the length; a length beside it must not reach the client
            // (RFC 9112 §6.3: a mismatch is how responses get smuggled).
            headers.remove(CONTENT_LENGTH);
        }
        let keep_alive = keep_alive && !matches!(state, BodyState::Close);
        let mut parts = Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        Ok(Head::Final((parts, state, keep_alive)))
    }
}

/// How long each side of an exchange may keep the other waiting.
#[derive(Clone, Copy)]
struct Waits {
    /// For a write to the backend to go through, and for its reply head.
    backend: Duration,
    /// For the next piece of the client's body.
    client: Duration,
}

/// `step`, or a response timeout once `wait` has passed.
async fn within<T>(
    wait: Duration,
    step: impl Future<Output = Result<T, Failed>>,
) -> Result<T, Failed> {
    tokio::time::timeout(wait, step)
        .await
        .unwrap_or(Err(UpstreamFailure::ResponseTimeout.into()))
}

/// What the start of the read buffer holds.
enum Head {
    /// Not yet a whole head.
    Partial,
    /// An interim (1xx) head, now dropped.
    Interim,
    /// The final head, the body's framing, and whether the connection stays open.
    Final((http::response::Parts, BodyState, bool)),
}

/// How the reply body is delimited (RFC 9112 §6.3).
fn body_framing(
    status: StatusCode,
    to_head: bool,
    headers: &HeaderMap,
) -> Result<BodyState, UpstreamFailure> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(BodyState::Tunnel);
    }
    if to_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(BodyState::Length(0));
    }
    if let Some(te) = headers.get_all(TRANSFER_ENCODING).iter().next_back() {
        let last = te.as_bytes().rsplit(|&b| b == b',').next().unwrap_or(b"");
        return Ok(if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            BodyState::Chunked(Chunk::Size)
        } else {
            BodyState::Close
        });
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let n = std::str::from_utf8(item.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(UpstreamFailure::Invalid)?;
            if length.is_some_and(|l| l != n) {
                return Err(UpstreamFailure::Invalid);
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(BodyState::Close, BodyState::Length))
}

/// The request head as the backend receives it: origin-form target, HTTP/1.1, the fields as
/// the proxy left them, and chunked framing when a body of unknown length follows.
fn encode_head(out: &mut Vec<u8>, head: &http::request::Parts, chunked: bool) {
    out.clear();
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &head.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Where a reply body stands.
#[derive(Debug)]
enum BodyState {
    /// This many bytes still to come.
    Length(u64),
    /// Chunked transfer coding.
    Chunked(Chunk),
    /// Until the backend closes.
    Close,
    /// The connection switched protocols; it carries no HTTP body.
    Tunnel,
    /// Read whole.
    Done,
}

/// Where a chunked body stands.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// Expecting the CRLF that ends a chunk.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// A backend's reply body, read from its connection as the client takes it; the
/// connection is parked again the moment the body is complete.
pub struct UpBody {
    conn: Option<Conn>,
    state: BodyState,
    keep_alive: bool,
    upstream: Arc<Upstream>,
    /// The backend must send more within the response timeout whenever the body waits.
    stall: Inactivity,
    /// The backend's slot (`max_conns`), given back when the body has been read whole.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// A connection that switched protocols, with the bytes the backend already sent past the
/// reply head.
pub struct Tunnel {
    /// The backend connection.
    pub stream: TcpStream,
    /// What the backend sent after its `101` head.
    pub early: Bytes,
}

impl UpBody {
    /// The connection of a `101 Switching Protocols` reply.
    pub fn into_tunnel(mut self) -> Option<Tunnel> {
        if !matches!(self.state, BodyState::Tunnel) {
            return None;
        }
        let conn = self.conn.take()?;
        Some(Tunnel {
            stream: conn.stream,
            early: conn.buf.freeze(),
        })
    }

    /// The body is complete: park the connection if it can serve another request.
    /// Holds the backend's slot until the body has been read whole (or at once gives it
    /// back, if it has).
    pub fn hold(&mut self, slot: Option<tokio::sync::OwnedSemaphorePermit>) {
        if !matches!(self.state, BodyState::Done) {
            self.slot = slot;
        }
    }

    fn finish(&mut self) {
        self.slot = None;
        self.state = BodyState::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.upstream.release(conn);
        }
    }

    /// The next piece of body already in the buffer, or `None` when more must be read.
    fn take_buffered(&mut self) -> Result<Option<Bytes>, io::Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let buf = &mut conn.buf;
        loop {
            match &mut self.state {
                BodyState::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    return Ok(Some(buf.split_to(n).freeze()));
                }
                BodyState::Close => {
                    return Ok((!buf.is_empty()).then(|| buf.split().freeze()));
                }
                BodyState::Tunnel | BodyState::Done => return Ok(None),
                BodyState::Chunked(chunk) => match *chunk {
                    Chunk::Size => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(None);
                        };
                        let size = chunk_size(&line)?;
                        *chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return Ok(None);
                        }
                        let n = left.min(buf.len() as u64) as usize;
                        *chunk = if n as u64 == left {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left - n as u64)
                        };
                        return Ok(Some(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(None);
                        };
                        if !line.is_empty() {
                            return Err(invalid("chunk data longer than its size"));
                        }
                        *chunk = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(None);
                        };
                        if line.is_empty() {
                            self.state = BodyState::Length(0);
                        }
                    }
                },
            }
        }
    }
}

/// One line (without its CRLF or LF) off the front of `buf`, once it is all there.
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, io::Error> {
    match memchr::memchr(b'\n', buf) {
        Some(end) => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line.freeze()))
        }
        None if buf.len() > MAX_LINE => Err(invalid("chunk line too long")),
        None => Ok(None),
    }
}

/// The size on a chunk-size line (extensions ignored).
fn chunk_size(line: &[u8]) -> Result<u64, io::Error> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or(b"")
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(invalid("bad chunk size"));
    }
    digits.iter().try_fold(0u64, |size, &b| {
        let digit = (b as char)
            .to_digit(16)
            .ok_or_else(|| invalid("bad chunk size"))?;
        Ok(size * 16 + u64::from(digit))
    })
}

/// The chunk-size line announcing `len` bytes (`1F4\r\n`), in a stack buffer.
fn chunk_size_line(len: usize) -> ([u8; 18], usize) {
    let mut line = [0u8; 18];
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, slot) in line[..digits].iter_mut().enumerate() {
        let shift = 4 * (digits - 1 - i);
        *slot = b"0123456789ABCDEF"[(len >> shift) & 0xF];
    }
    line[digits..digits + 2].copy_from_slice(b"\r\n");
    (line, digits + 2)
}

fn invalid(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if matches!(this.state, BodyState::Length(0)) {
                this.finish();
            }
            let data = this.take_buffered()?;
            if matches!(this.state, BodyState::Length(0)) {
                this.finish();
            }
            if let Some(data) = data {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if matches!(this.state, BodyState::Tunnel) {
                return Poll::Ready(None);
            }
            if conn.buf.capacity() - conn.buf.len() < READ_CHUNK / 4 {
                conn.buf.reserve(READ_CHUNK);
            }
            let polled =
                tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf);
            let Poll::Ready(read) = polled else {
                ready!(this.stall.poll_expired(cx));
                // The backend sent nothing more for the whole response timeout.
                this.conn = None;
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the backend sent nothing more within the response timeout",
                ))));
            };
            this.stall.moved();
            let read = read?;
            if read == 0 {
                if matches!(this.state, BodyState::Close) {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                this.conn = None;
                return Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into())));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done | BodyState::Length(0))
            || (self.conn.is_none() && !matches!(self.state, BodyState::Tunnel))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(left) => SizeHint::with_exact(left),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// The body sent to a backend: the client's body as it streams, possibly preceded by what
/// was already read of it to find a session id in a form.
pub enum RequestBody {
    /// Untouched.
    Streaming(Incoming),
    /// The peeked start replayed first, then the rest.
    Peeked(Box<Peeked>),
}

/// A peeked body, replayed in order: the bytes read, in one piece; the rest of the last
/// frame read, when it went past the limit; the trailers, when the body ended with them
/// during the peek; then whatever the client has not sent yet.
pub struct Peeked<B = Incoming> {
    head: Bytes,
    overflow: Bytes,
    trailers: Option<HeaderMap>,
    rest: Option<B>,
}

/// The start of a request body, read to look for a session id.
pub struct Peek<B = Incoming> {
    /// The body to forward: exactly the bytes the client sent.
    pub body: Peeked<B>,
    /// The first bytes of the body, contiguous: at most the limit, however the client
    /// framed them.
    pub head: Bytes,
    /// Whether `head` is the whole body.
    pub complete: bool,
}

/// Why a peek failed.
#[derive(Debug)]
pub enum PeekError {
    /// The body broke off.
    Body,
    /// Nothing came for the client timeout.
    Stalled,
}

/// The data of a peek, gathered into one piece: the first frame as it came (no copy), or,
/// from the second frame on, one buffer that grows to at most the limit. However small the
/// frames the client sends (one-byte chunks, one-byte HTTP/2 DATA frames), the peek holds
/// one buffer, never a frame each.
enum Gathered {
    Empty,
    One(Bytes),
    Joined(Vec<u8>),
}

impl Gathered {
    fn len(&self) -> usize {
        match self {
            Gathered::Empty => 0,
            Gathered::One(b) => b.len(),
            Gathered::Joined(v) => v.len(),
        }
    }

    /// Adds `data`, which fits within `limit`; a body of known length (`exact`) is joined in
    /// a buffer of its size (at most the limit), one of unknown length in one that doubles,
    /// up to the limit.
    fn push(&mut self, data: Bytes, limit: usize, exact: Option<u64>) {
        if data.is_empty() {
            return;
        }
        match self {
            Gathered::Empty => *self = Gathered::One(data),
            Gathered::One(first) => {
                let need = first.len() + data.len();
                let capacity = match exact {
                    Some(length) => usize::try_from(length).unwrap_or(usize::MAX),
                    None => need.max(2 * first.len()),
                }
                .clamp(need, limit);
                let mut joined = Vec::with_capacity(capacity);
                joined.extend_from_slice(first);
                joined.extend_from_slice(&data);
                *self = Gathered::Joined(joined);
            }
            Gathered::Joined(joined) => {
                let need = joined.len() + data.len();
                if need > joined.capacity() {
                    let grown = need.max(2 * joined.capacity()).min(limit);
                    joined.reserve_exact(grown - joined.len());
                }
                joined.extend_from_slice(&data);
            }
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Gathered::Empty => Bytes::new(),
            Gathered::One(b) => b,
            Gathered::Joined(v) => Bytes::from(v),
        }
    }
}

/// Reads the body until `limit` bytes are held or it ends; each frame must come within
/// `wait` of the one before. What was read is held as one piece of at most `limit` bytes
/// (the part of the last frame beyond it is kept as it came, a slice of that frame).
pub async fn peek<B>(mut body: B, limit: usize, wait: Duration) -> Result<Peek<B>, PeekError>
where
    B: Body<Data = Bytes> + Unpin,
{
    let exact = body.size_hint().exact();
    let mut gathered = Gathered::Empty;
    let mut overflow = Bytes::new();
    let mut trailers = None;
    let mut ended = false;
    while gathered.len() < limit {
        let next = tokio::time::timeout(wait, body.frame())
            .await
            .map_err(|_| PeekError::Stalled)?;
        let Some(frame) = next else {
            ended = true;
            break;
        };
        match frame.map_err(|_| PeekError::Body)?.into_data() {
            Ok(mut data) => {
                let room = limit - gathered.len();
                if data.len() > room {
                    overflow = data.split_off(room);
                }
                gathered.push(data, limit, exact);
            }
            Err(frame) => {
                // Trailers end a body.
                trailers = frame.into_trailers().ok();
                ended = true;
                break;
            }
        }
    }
    let ended = ended || body.is_end_stream();
    let head = gathered.into_bytes();
    Ok(Peek {
        complete: ended && overflow.is_empty(),
        head: head.clone(),
        body: Peeked {
            head,
            overflow,
            trailers,
            rest: (!ended).then_some(body),
        },
    })
}

impl<B> Peeked<B> {
    /// The bytes held until they are replayed.
    fn buffered(&self) -> u64 {
        (self.head.len() + self.overflow.len()) as u64
    }
}

impl<B> Body for Peeked<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        for held in [&mut this.head, &mut this.overflow] {
            if !held.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(std::mem::take(held)))));
            }
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match &mut this.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered() == 0
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let buffered = self.buffered();
        match &self.rest {
            None => SizeHint::with_exact(buffered),
            Some(rest) => {
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + buffered);
                if let Some(upper) = r.upper() {
                    hint.set_upper(upper + buffered);
                }
                hint
            }
        }
    }
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
            RequestBody::Peeked(p) => Pin::new(p.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming(inner) => inner.is_end_stream(),
            RequestBody::Peeked(p) => p.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming(inner) => inner.size_hint(),
            RequestBody::Peeked(p) => p.size_hint(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines_are_hex_with_crlf() {
        for (len, text) in [
            (1, "1\r\n"),
            (15, "F\r\n"),
            (16, "10\r\n"),
            (500, "1F4\r\n"),
            (65536, "10000\r\n"),
        ] {
            let (line, n) = chunk_size_line(len);
            assert_eq!(&line[..n], text.as_bytes(), "{len}");
        }
        let (line, n) = chunk_size_line(usize::MAX);
        assert_eq!(&line[..n], b"FFFFFFFFFFFFFFFF\r\n");
    }

    #[test]
    fn chunk_sizes_parse_with_extensions_and_refuse_junk() {
        assert_eq!(chunk_size(b"1F4").unwrap(), 500);
        assert_eq!(chunk_size(b"a;name=value").unwrap(), 10);
        assert_eq!(chunk_size(b" 10 ").unwrap(), 16);
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b"xyz").is_err());
        assert!(chunk_size(b"1234567890abcdef0").is_err());
    }
}
