//! Traffic listeners: accept TCP connections (plain, or TLS with ALPN) and serve HTTP/1.1
//! (keep-alive, upgrades) and HTTP/2 (h2c by prior knowledge, or h2 over TLS), until
//! shutdown; and what the side listeners (admin, HTTP→HTTPS redirect) share with them:
//! connection slots and idle timeouts.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HOST, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::clock::Inactivity;
use crate::core::route::strip_port;
use crate::proxy::{Activity, ClientConn, Lease, Proxy};
use crate::shutdown::Signal;

/// How often an HTTP/2 connection is pinged, and how long the answer may take.
const H2_PING_INTERVAL: Duration = Duration::from_secs(60);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The protocol settings every HTTP connection shares (traffic, admin and redirect
/// listeners); as built here, hyper tells HTTP/1.1 from h2c itself.
pub(crate) fn connection_builder(client_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(client_timeout)
        .keep_alive(true);
    // Pings find peers that vanished without closing (HTTP/1.1 has the head timeout).
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(crate::config::DEFAULT_HTTP2_MAX_STREAMS)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    builder
}

/// The protocol settings of a traffic listener's connections: the same as
/// [`connection_builder`]'s, each protocol apart, so the listener picks one itself.
struct Protocols {
    /// A connection known to speak HTTP/1.1: hyper's own HTTP/1 server, no second look.
    http1: hyper::server::conn::http1::Builder,
    /// HTTP/2, or not known: hyper-util's, which tells them apart by the preface (from
    /// bytes already read, at no extra system call).
    any: auto::Builder<TokioExecutor>,
    client_timeout: Duration,
    /// How long an idle HTTP/1 connection is kept after a handover, for its client's next
    /// request (half the shutdown timeout).
    linger: Duration,
}

/// What a connection speaks, as far as the listener knows.
#[derive(Clone, Copy)]
enum Protocol {
    Http1,
    Http2,
    /// TLS without ALPN: hyper tells them apart by the HTTP/2 preface (from rustls' buffer,
    /// at no extra system call).
    Either,
}

impl Protocols {
    fn new(client_timeout: Duration, linger: Duration, max_streams: u32) -> Self {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(client_timeout)
            .keep_alive(true);
        let mut any = connection_builder(client_timeout);
        any.http2().max_concurrent_streams(max_streams);
        Protocols {
            http1,
            any,
            client_timeout,
            linger,
        }
    }

    /// Serves the requests of one connection through `proxy` until it closes (or, once
    /// shutdown begins, until its requests in flight are done). `watcher` is held until
    /// then, so shutdown can wait for the connection.
    ///
    /// An HTTP/1.1 connection that goes quiet is closed by hyper's head timeout. HTTP/2 has
    /// none, so a connection that may speak it (`Http2`, `Either`) on which nothing has moved
    /// for `client_timeout` while no request waits on its backend — idle, or its replies not
    /// taken — is shut down gracefully (a `GOAWAY`; a peer that still has not moved is
    /// dropped after another `client_timeout`).
    ///
    /// The HTTP/2 state is large and lives on the heap: a connection's task starts small,
    /// which matters where each request opens a connection (a task is copied when spawned).
    async fn serve<I>(
        &self,
        io: I,
        protocol: Protocol,
        conn: ClientConn,
        proxy: Arc<Proxy>,
        watcher: Watcher,
        stop: Signal,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = Arc::new(conn);
        match protocol {
            Protocol::Http1 => self.serve_http1(io, conn, proxy, watcher, stop).await,
            Protocol::Http2 | Protocol::Either => {
                Box::pin(self.serve_any(io, conn, proxy, watcher, stop)).await
            }
        }
    }

    /// [`Protocols::serve`] for a connection known to speak HTTP/1.1.
    async fn serve_http1<I>(
        &self,
        io: I,
        conn: Arc<ClientConn>,
        proxy: Arc<Proxy>,
        watcher: Watcher,
        mut stop: Signal,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(WriteBound::new(io, self.client_timeout, None));
        let handing_over = proxy.clone();
        let service = service_fn(move |req| proxy.clone().serve(req, conn.clone()));
        let connection = self.http1.serve_connection(io, service).with_upgrades();
        let _drain = watcher;
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            biased;
            ended = connection.as_mut() => return Ok(ended?),
            () = stop.wait() => {}
        }
        if handing_over.handing_over() {
            // The client's next request gets a reply that closes the connection (the
            // one after goes to the new tidegate); one that stays idle is closed after
            // the linger.
            let linger = tokio::time::sleep(self.linger);
            tokio::select! {
                biased;
                ended = connection.as_mut() => return Ok(ended?),
                () = linger => {}
            }
        }
        connection.as_mut().graceful_shutdown();
        Ok(connection.await?)
    }

    /// [`Protocols::serve`] for a connection that speaks HTTP/2, or may.
    async fn serve_any<I>(
        &self,
        io: I,
        conn: Arc<ClientConn>,
        proxy: Arc<Proxy>,
        watcher: Watcher,
        mut stop: Signal,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let _drain = watcher;
        let activity = Activity::new();
        // A backlog of reply the client drains counts as the connection moving.
        let io = WriteBound::new(io, self.client_timeout, Some(activity.clone()));
        let io = TokioIo::new(io);
        let touched = activity.clone();
        let (peer, stall_stats) = (conn.peer, proxy.clone());
        let service = service_fn(move |req| {
            // Over `http2_max_requests` in flight, a stream is refused at once (an HTTP/1
            // connection, one request at a time, is bounded by `max_connections`).
            let slot = match req.version() {
                http::Version::HTTP_2 => Some(proxy.http2_slots.clone().try_acquire_owned()),
                _ => None,
            };
            let (proxy, conn) = (proxy.clone(), conn.clone());
            let touched = touched.clone();
            async move {
                let slot = match slot {
                    Some(Ok(slot)) => Some(slot),
                    Some(Err(_)) => {
                        proxy.front.client_error("too-many-requests");
                        return Ok(crate::proxy::overloaded());
                    }
                    None => None,
                };
                let in_flight = touched.enter(slot);
                let mut reply = proxy.serve(req, conn).await?;
                reply.body_mut().hold(in_flight);
                Ok::<_, std::convert::Infallible>(reply)
            }
        });
        let connection = self.any.serve_connection_with_upgrades(io, service);
        let mut connection = std::pin::pin!(connection);
        let stopping = stop.wait();
        let mut stopping = std::pin::pin!(stopping);
        let quiet = tokio::time::sleep(self.client_timeout);
        let mut quiet = std::pin::pin!(quiet);
        let mut closing = false;
        // A stream that takes none of its reply for a whole period: GOAWAY; still so a
        // period later, the connection is dropped.
        let period = self.client_timeout;
        let mut watch = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut stalled = false;
        loop {
            tokio::select! {
                biased;
                ended = connection.as_mut() => return ended,
                () = stopping.as_mut(), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = watch.tick() => {
                    if activity.stalled() {
                        if stalled {
                            return Ok(());
                        }
                        stalled = true;
                        stall_stats.front.client_error("stalled-stream");
                        tracing::debug!(client = %peer, "a stream took none of its reply for client_timeout: closing the connection");
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
                () = quiet.as_mut() => {
                    let idle = activity.quiet_for();
                    if idle < self.client_timeout {
                        let rest = self.client_timeout - idle;
                        quiet.as_mut().reset(tokio::time::Instant::now() + rest);
                    } else if closing {
                        // It had its grace after the GOAWAY and is still quiet.
                        return Ok(());
                    } else {
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                        quiet.as_mut().reset(tokio::time::Instant::now() + self.client_timeout);
                    }
                }
            }
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4): a plain connection that opens with it
/// speaks h2c by prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How much the first read of a plain connection takes: a whole typical request head, so
/// telling HTTP/1.1 from h2c costs no read of its own.
const FIRST_READ: usize = 8 * 1024;

/// Reads the first bytes of a plain connection: enough to tell whether it opens with the
/// HTTP/2 preface. `None` when the client closes or stays silent first, or shutdown begins
/// (a connection that has sent nothing holds nobody up).
async fn first_bytes(
    stream: &mut TcpStream,
    client_timeout: Duration,
    mut shutdown: Signal,
) -> Option<(Bytes, Protocol)> {
    let mut first = BytesMut::with_capacity(FIRST_READ);
    let sniff = async {
        loop {
            if stream.read_buf(&mut first).await.ok()? == 0 {
                return None;
            }
            let n = first.len().min(H2_PREFACE.len());
            if first[..n] != H2_PREFACE[..n] {
                return Some(Protocol::Http1);
            }
            if n == H2_PREFACE.len() {
                return Some(Protocol::Http2);
            }
        }
    };
    let protocol = tokio::select! {
        sniffed = tokio::time::timeout(client_timeout, sniff) => sniffed.ok()??,
        _ = shutdown.wait() => return None,
    };
    Some((first.freeze(), protocol))
}

/// A connection whose first bytes were already read: it hands them out again, then reads on.
struct Replayed {
    first: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.first.is_empty() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let n = self.first.len().min(buf.remaining());
        buf.put_slice(&self.first[..n]);
        self.first.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A client connection whose writes must make progress: a write that has waited
/// `client_timeout` for the client to read fails, and the connection closes. A client that
/// stops reading its reply would otherwise hold its connection, and its slot, forever.
struct WriteBound<I> {
    io: I,
    stall: Inactivity,
    /// The connection's activity, if it is watched for going quiet: a write that goes
    /// through after waiting (the client drained some of its backlog) counts as moving.
    activity: Option<Arc<Activity>>,
    /// The last write had to wait.
    blocked: bool,
}

impl<I> WriteBound<I> {
    fn new(io: I, limit: Duration, activity: Option<Arc<Activity>>) -> Self {
        WriteBound {
            io,
            stall: Inactivity::new(limit),
            activity,
            blocked: false,
        }
    }

    /// After the inner write's `polled`: passes a result through, or, while it waits, fails
    /// it once the client has read nothing for the limit.
    fn bound<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stall.moved();
            if std::mem::take(&mut self.blocked)
                && let Some(activity) = &self.activity
            {
                activity.touch();
            }
            return polled;
        }
        self.blocked = true;
        match self.stall.poll_expired(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for the client timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteBound<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteBound<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.bound(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.bound(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.bound(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.bound(cx, polled)
    }
}

/// A TLS connection: its handshake (bounded by [`HANDSHAKE_TIMEOUT`]), then its requests.
/// `None` when the handshake failed or timed out (counted and logged here).
#[allow(clippy::too_many_arguments)]
async fn serve_tls(
    stream: TcpStream,
    tls: TlsFront,
    peer: SocketAddr,
    lease: Lease,
    protocols: &Protocols,
    proxy: Arc<Proxy>,
    watcher: Watcher,
    stop: Signal,
) -> Option<Result<(), Box<dyn std::error::Error + Send + Sync>>> {
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(stream)).await;
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            proxy.front.client_error("tls-handshake");
            tracing::debug!(client = %peer, "TLS handshake failed: {e}");
            return None;
        }
        Err(_) => {
            proxy.front.client_error("tls-handshake");
            tracing::debug!(client = %peer, "TLS handshake timed out");
            return None;
        }
    };
    let (_, session) = stream.get_ref();
    let version = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => 1,
        _ => 0,
    };
    let alpn = match session.alpn_protocol() {
        Some(b"h2") => 0,
        Some(_) => 1,
        None => 2,
    };
    let resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    proxy.front.handshake(version, alpn, resumed);
    let conn = ClientConn::new(peer, Some(tls.hsts), lease);
    let protocol = match alpn {
        0 => Protocol::Http2,
        1 => Protocol::Http1,
        _ => Protocol::Either,
    };
    Some(
        protocols
            .serve(stream, protocol, conn, proxy, watcher, stop)
            .await,
    )
}

/// The next connection, or `None` once `shutdown` fires. A failed accept (out of
/// descriptors and the like) is logged and retried after a pause rather than spun on.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &mut Signal,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => return Some(pair),
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.wait() => return None,
        }
    }
}

/// What a TLS listener adds to a plain one.
#[derive(Clone)]
pub struct TlsFront {
    /// Handshakes with the shared rustls configuration.
    pub acceptor: TlsAcceptor,
    /// The `Strict-Transport-Security` value to send, if enabled.
    pub hsts: Option<HeaderValue>,
}

/// How often, at most, a full connection limit is logged.
const FULL_WARNING_PERIOD: Duration = Duration::from_secs(10);

/// How long a client may take to complete a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `listener` until `shutdown` fires, then lets the requests in
/// flight finish (up to a bound). With `tls`, each connection first completes a handshake
/// (on its own task, so a slow client never holds up the accept loop).
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    mut shutdown: Signal,
    tls: Option<TlsFront>,
    drain: Duration,
) {
    let protocols = Arc::new(Protocols::new(
        proxy.client_timeout,
        drain / 2,
        proxy.http2_max_streams,
    ));
    let graceful = GracefulShutdown::new();
    let mut warned: Option<Instant> = None;
    loop {
        let Some((mut stream, peer)) = accept(&listener, &mut shutdown).await else {
            break;
        };
        // At the limit the listener holds this connection and accepts no more until a slot
        // frees: the ones after it wait in the kernel's accept queue.
        let slot = match proxy.connection_slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if warned.is_none_or(|at| at.elapsed() >= FULL_WARNING_PERIOD) {
                    warned = Some(Instant::now());
                    tracing::warn!(
                        "{} client connections open, the most allowed (max_connections): \
                         new connections wait until some close",
                        proxy.max_connections
                    );
                }
                tokio::select! {
                    slot = proxy.connection_slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    _ = shutdown.wait() => break,
                }
            }
        };
        // Linux connections inherit it from the listener.
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let watcher = graceful.watcher();
        let protocols = protocols.clone();
        let tls = tls.clone();
        let stop = shutdown.clone();
        let task = async move {
            let lease = Lease::new(proxy.clone(), slot);
            let ended = match tls {
                None => {
                    let Some((first, protocol)) =
                        first_bytes(&mut stream, proxy.client_timeout, stop.clone()).await
                    else {
                        return;
                    };
                    let io = Replayed { first, stream };
                    let conn = ClientConn::new(peer, None, lease);
                    protocols
                        .serve(io, protocol, conn, proxy, watcher, stop)
                        .await
                }
                // Boxed: the TLS state is large, and a plain connection's task need not
                // carry room for it (a task is copied when it is spawned).
                Some(tls) => {
                    let Some(ended) = Box::pin(serve_tls(
                        stream, tls, peer, lease, &protocols, proxy, watcher, stop,
                    ))
                    .await
                    else {
                        return;
                    };
                    ended
                }
            };
            if let Err(e) = ended {
                tracing::debug!(client = %peer, "connection ended: {e}");
            }
        };
        tokio::spawn(task);
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown: requests still in flight after shutdown_timeout ({drain:?}): their connections are closed"
        );
    }
}

/// Connections the admin listener serves at once (a scraper, a few status pages, `ctl`);
/// more wait in the kernel's accept queue.
pub(crate) const ADMIN_MAX_CONNECTIONS: usize = 256;

/// Serves a side listener (admin, redirect) until `shutdown` fires: each connection takes
/// one of `slots` (the next ones wait in the accept queue), and `answer` answers each request.
/// Idle connections are closed as on traffic listeners: HTTP/1.1 by the head timeout, and any
/// connection without a request for `client_timeout` gets a graceful close (`GOAWAY` for
/// HTTP/2), then is dropped if still idle after as long again.
pub(crate) async fn serve_side<F, Fut>(
    listener: TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
    client_timeout: Duration,
    mut shutdown: Signal,
    answer: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let builder = connection_builder(client_timeout);
    let answer = Arc::new(answer);
    loop {
        let Some((stream, _)) = accept(&listener, &mut shutdown).await else {
            return;
        };
        // At the limit this connection waits for a slot, and the next ones in the kernel's
        // accept queue.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            _ = shutdown.wait() => return,
        };
        let (builder, answer) = (builder.clone(), answer.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let activity = Activity::new();
            let touched = activity.clone();
            let service = service_fn(move |req| {
                let in_flight = touched.enter(None);
                let answer = answer.clone();
                async move {
                    let reply = answer(req).await;
                    drop(in_flight);
                    Ok::<_, std::convert::Infallible>(reply)
                }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let quiet = tokio::time::sleep(client_timeout);
            let mut quiet = std::pin::pin!(quiet);
            let mut closing = false;
            loop {
                tokio::select! {
                    _ = connection.as_mut() => return,
                    () = quiet.as_mut() => {
                        let idle = activity.quiet_for();
                        if idle < client_timeout {
                            quiet.as_mut().reset(tokio::time::Instant::now() + (client_timeout - idle));
                        } else if closing {
                            return;
                        } else {
                            connection.as_mut().graceful_shutdown();
                            closing = true;
                            quiet.as_mut().reset(tokio::time::Instant::now() + client_timeout);
                        }
                    }
                }
            }
        });
    }
}

/// Answers every request on a plain listener with a permanent redirect to the same URL over
/// HTTPS (`https_port` is added unless it is 443). Its connections take traffic's
/// connection slots (`max_connections`): they are the same clients.
pub async fn redirect_to_https(
    listener: TcpListener,
    https_port: u16,
    slots: Arc<tokio::sync::Semaphore>,
    client_timeout: Duration,
    shutdown: Signal,
) {
    serve_side(
        listener,
        slots,
        client_timeout,
        shutdown,
        move |req| async move { https_redirect(&req, https_port) },
    )
    .await;
}

fn https_redirect(req: &Request<Incoming>, https_port: u16) -> Response<Full<Bytes>> {
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .map(strip_port);
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        let mut r = Response::new(Full::new(Bytes::from_static(
            b"tidegate: this address serves HTTPS only, and the request names no host\n",
        )));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let target = format!("https://{host}{port}{path}");
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::try_from(target) {
        r.headers_mut().insert(LOCATION, v);
    }
    r
}
