//! The proxy service: one request's straight path from route to reply.
//!
//! route (Host/path → pool) → session id (query, path parameter, cookie; a bounded peek of a
//! form body only when those are silent) → pool decision → header rewrite → upstream →
//! learn from the reply head → stream the reply back (through the page learner when the
//! request named no known session).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{
    CONNECTION, CONTENT_TYPE, COOKIE, HOST, HeaderName, HeaderValue, SET_COOKIE, UPGRADE,
};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::clock;
use crate::core::affinity::PinKey;
use crate::core::backend::Backend;
use crate::core::backend::{BackendId, BackendSet, ConnLimit};
use crate::core::launch::HoldRefusal;
use crate::core::learn::LearnSource;
use crate::core::pool::{Affinity, Decision, Pool, Refusal, RequestView, Routing, SessionAffinity};
use crate::core::registry::Registry;
use crate::core::session_id::{self, IdSource};
use crate::core::stats::FrontStats;
use crate::core::trust::TrustedProxies;
use crate::error::{ProxyError, UpstreamFailure};
use crate::farm::health;
use crate::farm::launch::{self, NotReady};
use crate::learn::{Learner, PageLearner, PageTap, Told};
use crate::log_output::{self, AccessEntry};
use crate::store::shared::SharedPins;
use crate::upstream::{
    self, CountBytesIn, PeekError, RequestBody, SendError, ToBackend, Tunnel, UpBody, Upstream,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop fields (RFC 9110 §7.6.1) that never cross the proxy, besides those a
/// `Connection` header lists.
fn hop_by_hop() -> [&'static HeaderName; 7] {
    [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &http::header::TE,
        &http::header::TRAILER,
        &http::header::TRANSFER_ENCODING,
        &UPGRADE,
    ]
}

/// Per-connection facts, computed once when the connection is accepted.
#[derive(Debug)]
pub struct ClientConn {
    /// The client's address.
    pub peer: SocketAddr,
    /// The client's IP as an `X-Forwarded-For` value, formatted once.
    pub forwarded_for: HeaderValue,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The HSTS header to add to replies (TLS only, when enabled).
    pub hsts: Option<HeaderValue>,
    /// Whether the peer is a trusted proxy, whose forwarding fields are kept.
    pub trusted: bool,
    /// Held while anything of the connection lives, an upgraded tunnel included.
    _lease: Lease,
}

impl ClientConn {
    /// Facts of a connection from `peer`; `tls` carries the HSTS setting of a TLS listener.
    pub fn new(peer: SocketAddr, tls: Option<Option<HeaderValue>>, lease: Lease) -> Self {
        ClientConn {
            peer,
            forwarded_for: HeaderValue::try_from(peer.ip().to_string())
                .expect("an IP address is a valid header value"),
            tls: tls.is_some(),
            hsts: tls.flatten(),
            trusted: lease.proxy.trusted_proxies.trust(peer.ip()),
            _lease: lease,
        }
    }

    fn proto(&self) -> HeaderValue {
        HeaderValue::from_static(if self.tls { "https" } else { "http" })
    }
}

/// What an accepted client connection holds for as long as any of it lives (its HTTP
/// connection, or a WebSocket tunnel that outlives it): a `max_connections` slot, and its
/// place in the open-connections gauge.
pub struct Lease {
    proxy: Arc<Proxy>,
    _slot: OwnedSemaphorePermit,
}

impl Lease {
    /// Counts a newly accepted connection, holding `slot`.
    pub fn new(proxy: Arc<Proxy>, slot: OwnedSemaphorePermit) -> Self {
        proxy
            .front
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        proxy.front.connections_open.fetch_add(1, Ordering::Relaxed);
        Lease { proxy, _slot: slot }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.proxy
            .front
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The shared state of the request path.
pub struct Proxy {
    registry: Arc<Registry>,
    upstream: Arc<Upstream>,
    /// One permit per client connection served, over all traffic listeners.
    pub connection_slots: Arc<Semaphore>,
    /// How many permits there are (`max_connections`).
    pub max_connections: usize,
    /// Time a client has for a request head, and may stay silent within a body.
    pub client_timeout: Duration,
    /// Time an upgraded connection may carry nothing either way.
    tunnel_timeout: Duration,
    /// Peers whose forwarding fields are kept (`trusted_proxies`).
    trusted_proxies: TrustedProxies,
    /// Connection, TLS and client-error counters.
    pub front: FrontStats,
    /// Handing over to a new tidegate: every HTTP/1 reply closes its connection, so that
    /// the client's next request opens one to the new process (closing an idle connection
    /// instead could cross a request the client is sending on it).
    handing_over: AtomicBool,
    /// One permit per HTTP/2 request in flight, over all connections
    /// (`http2_max_requests`); HTTP/1 connections carry one request each, bounded by
    /// `max_connections`.
    pub http2_slots: Arc<Semaphore>,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_streams: u32,
    /// The pins shared with other instances, if a store is configured.
    store: Option<Arc<SharedPins>>,
}

/// The answer to an HTTP/2 request beyond `http2_max_requests`.
pub fn overloaded() -> Response<ReplyBody> {
    refusal(&ProxyError::Overloaded { retry_after: 1 })
}

/// What the client receives: the backend's reply streamed (optionally through the page
/// learner), or tidegate's own short text; it carries the request's `Trace`, which is
/// settled (counters, access log) when the reply is done or abandoned.
pub struct ReplyBody {
    kind: ReplyKind,
    trace: Option<Trace>,
    in_flight: Option<InFlight>,
}

/// A connection's requests, for telling a quiet connection from a busy one: when anything
/// last moved (a request started or ended, a reply sent a piece), and how many requests are
/// waiting on their backend (for the reply head, or for more of the body while the client
/// is taking it). A connection whose requests all wait on the client — replies it does not
/// take, as an HTTP/2 peer that never opens its flow-control window — is quiet.
///
/// It also finds a stream that takes none of its reply while others move (a peer that
/// keeps one stream trickling and the rest at a zero window would otherwise hold their
/// backend connections for ever): the connection's watch advances an epoch every
/// `client_timeout`, and each reply waiting on the client is counted under the epoch it
/// last moved in. A count left under the epoch before the current one is a stream that
/// has not moved for a whole period.
pub struct Activity {
    since: Instant,
    /// Milliseconds after `since`.
    last: AtomicU64,
    waiting: AtomicUsize,
    epoch: AtomicU32,
    /// Replies waiting on the client, by the parity of the epoch they last moved in.
    on_client: [AtomicUsize; 2],
}

impl Activity {
    /// A connection with no request yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            since: Instant::now(),
            last: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            epoch: AtomicU32::new(0),
            on_client: [AtomicUsize::new(0), AtomicUsize::new(0)],
        })
    }

    /// A request starts, waiting on its backend for the reply head; `slot` is its share of
    /// `http2_max_requests`, held until the reply is done.
    pub fn enter(self: &Arc<Self>, slot: Option<OwnedSemaphorePermit>) -> InFlight {
        self.touch();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        InFlight {
            activity: self.clone(),
            waiting: true,
            epoch: 0,
            _slot: slot,
        }
    }

    /// Called once per period by the connection's watch: whether a reply waiting on the
    /// client has not moved for a whole period (else a new period begins).
    pub fn stalled(&self) -> bool {
        let now = self.epoch.load(Ordering::Relaxed);
        if self.on_client[(now.wrapping_sub(1) & 1) as usize].load(Ordering::Relaxed) > 0 {
            return true;
        }
        self.epoch.store(now.wrapping_add(1), Ordering::Relaxed);
        false
    }

    /// Something moved on the connection.
    pub fn touch(&self) {
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// How long nothing has moved (zero while a request waits on its backend: the backend
    /// timeouts bound that).
    pub fn quiet_for(&self) -> Duration {
        // Acquire: pairs with the releases below, so the stamp before them is seen.
        if self.waiting.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }
}

/// A request in flight on its connection, until its reply body is done (or dropped).
pub struct InFlight {
    activity: Arc<Activity>,
    /// Counted among the requests waiting on their backend (else among the replies waiting
    /// on the client, under `epoch`).
    waiting: bool,
    /// The epoch it last moved in, while it waits on the client.
    epoch: u32,
    _slot: Option<OwnedSemaphorePermit>,
}

impl InFlight {
    /// The request now waits on its backend (`true`), or moved and waits on the client
    /// (`false`).
    #[inline]
    fn wait_on_backend(&mut self, waiting: bool) {
        let a = &self.activity;
        if waiting {
            if !self.waiting {
                self.waiting = true;
                a.on_client[(self.epoch & 1) as usize].fetch_sub(1, Ordering::Relaxed);
                a.waiting.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        a.touch();
        let now = a.epoch.load(Ordering::Relaxed);
        if self.waiting {
            self.waiting = false;
            a.on_client[(now & 1) as usize].fetch_add(1, Ordering::Relaxed);
            a.waiting.fetch_sub(1, Ordering::Release);
        } else if now != self.epoch {
            a.on_client[(self.epoch & 1) as usize].fetch_sub(1, Ordering::Relaxed);
            a.on_client[(now & 1) as usize].fetch_add(1, Ordering::Relaxed);
        }
        self.epoch = now;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.activity;
        a.touch();
        if self.waiting {
            a.waiting.fetch_sub(1, Ordering::Release);
        } else {
            a.on_client[(self.epoch & 1) as usize].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

enum ReplyKind {
    /// The backend's body, untouched.
    Upstream(UpBody),
    /// The backend's body, scanned for a new session id as it passes.
    Learning(Box<PageLearner>),
    /// A message from tidegate itself.
    Text(Option<Bytes>),
}

impl ReplyBody {
    fn new(kind: ReplyKind) -> Self {
        ReplyBody {
            kind,
            trace: None,
            in_flight: None,
        }
    }

    /// Keeps the request counted in flight until this body is done; with its head here, it
    /// waits on the client until the body waits on the backend.
    pub fn hold(&mut self, mut in_flight: InFlight) {
        in_flight.wait_on_backend(false);
        self.in_flight = Some(in_flight);
    }

    fn text(message: String) -> Self {
        ReplyBody::new(ReplyKind::Text(Some(Bytes::from(message))))
    }
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            ReplyKind::Upstream(b) => Pin::new(b).poll_frame(cx),
            ReplyKind::Learning(b) => Pin::new(b.as_mut()).poll_frame(cx),
            ReplyKind::Text(t) => Poll::Ready(t.take().map(|b| Ok(Frame::data(b)))),
        };
        if let Some(in_flight) = &mut this.in_flight {
            in_flight.wait_on_backend(polled.is_pending());
        }
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Some(backend) = this.trace.as_ref().and_then(|t| t.backend.as_ref())
        {
            backend
                .stats
                .bytes_out
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ReplyKind::Upstream(b) => b.is_end_stream(),
            ReplyKind::Learning(b) => b.is_end_stream(),
            ReplyKind::Text(t) => t.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ReplyKind::Upstream(b) => b.size_hint(),
            ReplyKind::Learning(b) => b.size_hint(),
            ReplyKind::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

impl Drop for ReplyBody {
    fn drop(&mut self) {
        let Some(mut trace) = self.trace.take() else {
            return;
        };
        if let ReplyKind::Learning(page) = &self.kind
            && let Some(source) = page.tap().learned()
        {
            trace.learned = Some(source);
        }
        // Dropping the trace settles it.
    }
}

/// What one request did, gathered on its way through and settled when it is dropped: when
/// its reply ends, or when the client leaves before one (counted as status 499, "client
/// closed request", as nginx does): the backend's counters, and one access-log line.
struct Trace {
    started: Instant,
    status: u16,
    pool: Option<Arc<Pool>>,
    backend: Option<Arc<Backend>>,
    /// The backend's slot (`max_conns`), held until the reply is done.
    slot: Option<OwnedSemaphorePermit>,
    decision: Option<Decision>,
    learned: Option<LearnSource>,
    access: Option<Access>,
}

/// The access-log fields of a request, kept only when the access log is enabled. Cloning
/// them shares the request's buffers; nothing is copied.
struct Access {
    method: http::Method,
    host: Option<HeaderValue>,
    path: http::uri::PathAndQuery,
    session: Option<u32>,
}

/// A session as the access log shows it: its keyed hash in hex, or `-`.
struct LoggedSession(Option<u32>);

impl std::fmt::Display for LoggedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(hash) => write!(f, "{hash:08x}"),
            None => f.write_str("-"),
        }
    }
}

/// The tracing target of the access log (`RUST_LOG=tidegate::access=off` silences it).
pub const ACCESS_LOG: &str = "tidegate::access";

/// A per-process key for the session hashes in the access log: an operator can follow one
/// session through the log, but the log never holds an id.
fn session_log_key() -> u64 {
    static KEY: OnceLock<u64> = OnceLock::new();
    *KEY.get_or_init(rand::random)
}

/// A session id as logs show it: its keyed hash.
fn session_hash(id: &str) -> u32 {
    xxhash_rust::xxh3::xxh3_64_with_seed(id.as_bytes(), session_log_key()) as u32
}

impl Trace {
    fn begin(req: &Request<Incoming>) -> Self {
        let access = (log_output::access_log().is_some()
            && tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO))
        .then(|| Access {
            method: req.method().clone(),
            host: req.headers().get(HOST).cloned().or_else(|| {
                req.uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            }),
            path: req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            session: None,
        });
        Trace {
            started: Instant::now(),
            status: CLIENT_CLOSED,
            pool: None,
            backend: None,
            slot: None,
            decision: None,
            learned: None,
            access,
        }
    }

    /// The request goes to `routing`'s backend: it is in flight there from now on (so a
    /// drain does not settle under a request still connecting).
    fn routed(&mut self, routing: &Routing, id: Option<&str>) {
        self.charge(&routing.backend);
        self.decision = Some(routing.decision);
        if let (Some(access), Some(id)) = (self.access.as_mut(), id) {
            access.session = Some(session_hash(id));
        }
    }

    /// The request's reply is counted for `backend` (tidegate's own refusals for it too).
    fn charge(&mut self, backend: &Arc<Backend>) {
        backend.stats.begin();
        self.backend = Some(backend.clone());
    }

    /// The backend refused the connection: the request is no longer in flight there.
    fn unroute(&mut self) {
        if let Some(b) = self.backend.take() {
            b.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        self.decision = None;
    }
}

/// The status recorded for a request whose client left before the reply head.
const CLIENT_CLOSED: u16 = 499;

impl Drop for Trace {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        if let Some(b) = &self.backend {
            b.stats.end(self.status, took);
        }
        if let Some(p) = &self.pool {
            p.stats.replied(self.status);
        }
        let (Some(a), Some(log)) = (&self.access, log_output::access_log()) else {
            return;
        };
        // Handed over unformatted: the log's own thread writes the line.
        log.log(&AccessEntry {
            at: SystemTime::now(),
            method: a.method.as_str(),
            host: a.host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("-"),
            path: a.path.path(),
            status: self.status,
            micros: took.as_micros() as u64,
            pool: self.pool.as_ref().map_or("-", |p| &*p.name),
            backend: self.backend.as_ref().map_or("-", |b| &*b.name),
            decision: self.decision.map_or("-", Decision::as_str),
            learned: self.learned.map_or("-", LearnSource::as_str),
            session: a.session,
        });
    }
}

impl Proxy {
    /// The request path over the farm in `registry`.
    pub fn new(
        registry: Arc<Registry>,
        upstream: Arc<Upstream>,
        max_connections: usize,
        client_timeout: Duration,
        tunnel_timeout: Duration,
    ) -> Self {
        Proxy {
            registry,
            upstream,
            connection_slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            client_timeout,
            tunnel_timeout,
            trusted_proxies: TrustedProxies::default(),
            front: FrontStats::default(),
            handing_over: AtomicBool::new(false),
            http2_slots: Arc::new(Semaphore::new(crate::config::DEFAULT_MAX_CONNECTIONS)),
            http2_max_streams: crate::config::DEFAULT_HTTP2_MAX_STREAMS,
            store: None,
        }
    }

    /// The same proxy consulting `store` on a local miss.
    pub fn with_store(self, store: Option<Arc<SharedPins>>) -> Self {
        Proxy { store, ..self }
    }

    /// The shared store, if one is configured.
    pub fn store(&self) -> Option<&Arc<SharedPins>> {
        self.store.as_ref()
    }

    /// The same proxy with at most `max_streams` streams per HTTP/2 connection and
    /// `max_requests` HTTP/2 requests in flight at once.
    pub fn with_http2_limits(self, max_streams: u32, max_requests: usize) -> Self {
        Proxy {
            http2_slots: Arc::new(Semaphore::new(max_requests)),
            http2_max_streams: max_streams,
            ..self
        }
    }

    /// From now on every HTTP/1 reply closes its connection (a new tidegate took over).
    pub fn hand_over(&self) {
        self.handing_over.store(true, Ordering::Relaxed);
    }

    /// Whether a new tidegate took over.
    pub fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Relaxed)
    }

    /// The same proxy keeping the forwarding fields of connections from these networks.
    pub fn with_trusted_proxies(self, trusted_proxies: TrustedProxies) -> Self {
        Proxy {
            trusted_proxies,
            ..self
        }
    }

    /// The farm: pools, routes and backends as they are now.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The connections to backends.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// Serves one request; every failure becomes a short text reply.
    pub async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<ClientConn>,
    ) -> Result<Response<ReplyBody>, std::convert::Infallible> {
        let mut trace = Trace::begin(&req);
        let http1 = req.version() < http::Version::HTTP_2;
        let mut reply = match self.forward(req, &conn, &mut trace).await {
            Ok(reply) => reply,
            Err(e) => {
                match &e {
                    ProxyError::Upstream { .. }
                    | ProxyError::NoBackend { .. }
                    | ProxyError::PinnedDown { .. }
                    | ProxyError::Busy { .. }
                    | ProxyError::NotLaunched { .. } => {
                        tracing::warn!(client = %conn.peer, kind = e.kind(), "{e}")
                    }
                    _ => tracing::debug!(client = %conn.peer, kind = e.kind(), "{e}"),
                }
                match (&e, &trace.backend) {
                    (ProxyError::Upstream { .. }, Some(b)) => b.stats.upstream_error(e.kind()),
                    _ => self.front.client_error(e.kind()),
                }
                refusal(&e)
            }
        };
        if let Some(hsts) = &conn.hsts {
            reply
                .headers_mut()
                .insert(http::header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        if http1 && self.handing_over() && reply.status() != StatusCode::SWITCHING_PROTOCOLS {
            reply
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        trace.status = reply.status().as_u16();
        reply.body_mut().trace = Some(trace);
        Ok(reply)
    }

    /// route → choose a backend that accepts the connection → send → reply.
    async fn forward(
        &self,
        req: Request<Incoming>,
        conn: &Arc<ClientConn>,
        trace: &mut Trace,
    ) -> Result<Response<ReplyBody>, ProxyError> {
        if req.method() == http::Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        let now = clock::unix_now();
        let (mut parts, body) = req.into_parts();
        let pool = {
            let host = request_host(&parts.headers, &parts.uri, parts.version)?;
            self.registry
                .topology()
                .router
                .select(host, parts.uri.path())
                .cloned()
                .ok_or(ProxyError::NoRoute)?
        };
        trace.pool = Some(pool.clone());
        let chosen = self.choose(&pool, &parts, body, conn, now, trace).await?;
        let Chosen {
            routing,
            connection,
            body,
            form,
            cookie_routed,
        } = chosen;

        let client_upgrade = if is_upgrade(&parts.headers) {
            parts.extensions.remove::<OnUpgrade>()
        } else {
            None
        };
        let scan_limit = match &pool.affinity {
            Affinity::Session(s) => s.page_scan_bytes,
            Affinity::ClientIp => 0,
        };
        let scan_page = routing.scan_page && scan_limit > 0;
        rewrite_request_head(
            &mut parts,
            routing.backend.address,
            conn,
            client_upgrade.is_some(),
            scan_page,
        );
        let backend = &routing.backend;
        let body = ToBackend::new(body, CountBytesIn(backend.clone()));
        let failed = |failure| ProxyError::Upstream {
            backend: backend.name.clone(),
            address: backend.address,
            failure,
        };
        let reply = self
            .upstream
            .send(connection, &parts, body)
            .await
            .map_err(|e| match e {
                SendError::Upstream(failure) => {
                    if failure.is_connect() {
                        // A parked connection was found closed and the new one refused.
                        let transition = backend.health.refused(pool.health.thresholds);
                        health::note(&pool, backend, transition, failure.as_str());
                    }
                    failed(failure)
                }
                SendError::Body => ProxyError::BadRequestBody,
                SendError::BodyStalled => ProxyError::RequestTimeout,
            })?;

        let mut reply = reply;
        if reply.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The backend's slot is free once its reply is read whole, however slowly the
            // client takes it.
            reply.body_mut().hold(trace.slot.take());
        }
        if reply.status() == StatusCode::SWITCHING_PROTOCOLS {
            let (mut head, body) = reply.into_parts();
            let (Some(client_upgrade), Some(backend)) = (client_upgrade, body.into_tunnel()) else {
                return Err(failed(UpstreamFailure::Invalid));
            };
            // The tunnel keeps the connection's lease: it is still the client's connection.
            tokio::spawn(tunnel(
                client_upgrade,
                backend,
                self.tunnel_timeout,
                (
                    conn.clone(),
                    trace.slot.take(),
                    OpenTunnel::new(routing.backend.clone()),
                ),
            ));
            strip_hop_by_hop(&mut head.headers, true);
            return Ok(Response::from_parts(
                head,
                ReplyBody::new(ReplyKind::Text(None)),
            ));
        }
        let scan = scan_page.then_some(scan_limit);
        let learner = Learner {
            backend: routing.backend.id,
            now,
            cookie_routed,
            // What the backend was told, to tell its own words from an echo of the request's.
            told: Told::new(parts.uri, parts.headers, form),
        };
        Ok(reply_to_client(
            &pool, &routing, learner, reply, scan, conn, trace,
        ))
    }

    /// Identifies the request's session (head, then a bounded peek of a form body), routes
    /// it, and connects to the backend chosen. A backend that refuses the connection (or
    /// does not accept it in time) counts a passive health failure and is left out: a new
    /// session goes to another backend, and so does a pinned one whose pool redispatches;
    /// only when none is left does the client see the failure.
    async fn choose(
        &self,
        pool: &Arc<Pool>,
        parts: &http::request::Parts,
        body: Incoming,
        conn: &ClientConn,
        now: u32,
        trace: &mut Trace,
    ) -> Result<Chosen, ProxyError> {
        let session = match &pool.affinity {
            Affinity::Session(s) => Some(&**s),
            Affinity::ClientIp => None,
        };
        let mut id = session.and_then(|s| id_in_head(s, &parts.uri, &parts.headers));
        // Only when the head names no session: read the start of a form body.
        let peekable = session
            .filter(|_| id.is_none())
            .and_then(|s| form_kind(&parts.headers, s).map(|kind| (s, kind)));
        let (body, peeked) = match peekable {
            Some((s, kind)) => {
                let peek = upstream::peek(body, s.form_peek_bytes, self.client_timeout)
                    .await
                    .map_err(|e| match e {
                        PeekError::Stalled => ProxyError::RequestTimeout,
                        PeekError::Body => ProxyError::BadRequestBody,
                    })?;
                (
                    RequestBody::Peeked(Box::new(peek.body)),
                    Some((s, kind, peek.head, peek.complete)),
                )
            }
            None => (RequestBody::Streaming(body), None),
        };
        if let Some((s, kind, head, complete)) = &peeked {
            id = id_in_form(s, *kind, head, *complete).map(|id| (id, IdSource::FormBody));
        }
        let view = RequestView {
            id,
            affinity_cookie: session
                .and(pool.cookie.as_ref())
                .and_then(|c| cookie_in(&parts.headers, c.name())),
            client: conn.peer.ip(),
        };
        // Shared with other instances: a session this one does not know may be theirs.
        if let (Some(store), Some(s), Some((id, _))) = (&self.store, session, view.id) {
            store.consult(pool, &s.table, PinKey::of(id), now).await;
        }
        let thresholds = pool.health.thresholds;
        // Backends that refused this request; empty (no allocation) unless one does.
        let mut tried: Vec<BackendId> = Vec::new();
        let mut last_refusal: Option<(Routing, Refused)> = None;
        loop {
            // The set is loaded for the decision only, never held across the connect.
            let routed = pool.route(&pool.backends(), &view, now, &tried);
            if let Some((failed, refused)) = &last_refusal
                && !matches!(routed, Err(Refusal::NoBackend))
            {
                // Another outcome replaces the refused attempt: its decision is taken back
                // (each request counts one), and a failure to connect counted for its
                // backend.
                pool.stats.undecide(failed.decision);
                if let Refused::Connect(failure) = refused {
                    failed.backend.stats.upstream_error(failure.kind());
                }
            }
            let routing = match routed {
                Ok(routing) => routing,
                Err(Refusal::NoBackend) => {
                    if let Some((routing, refused)) = last_refusal {
                        // Nothing else to try: the client sees the last backend's refusal.
                        trace.routed(&routing, view.id.map(|(id, _)| id));
                        return Err(match refused {
                            Refused::Connect(failure) => refused_by(&routing.backend, failure),
                            Refused::Launch(e) => e,
                        });
                    }
                    return Err(ProxyError::NoBackend {
                        pool: pool.name.clone(),
                    });
                }
                Err(Refusal::PinnedDown(b)) => {
                    trace.charge(&b);
                    return Err(ProxyError::PinnedDown {
                        backend: b.name.clone(),
                        retry_after: pool.health.retry_after(),
                    });
                }
            };
            trace.routed(&routing, view.id.map(|(id, _)| id));
            let backend = &routing.backend;
            // An image started on demand: launched if stopped, waited for while launching.
            if let Some(process) = &backend.process
                && !process.is_running()
            {
                match launch::ready(pool, backend, process).await {
                    Ok(()) => {}
                    Err(NotReady::Left) => {
                        // Its backend left the farm while the request waited: routed again.
                        trace.unroute();
                        pool.stats.undecide(routing.decision);
                        tried.push(backend.id);
                        continue;
                    }
                    // A new session (or a client-IP one) whose image backs off after a failed
                    // launch goes to another backend if one can take it.
                    Err(NotReady::Refused(
                        e @ ProxyError::NotLaunched {
                            why: HoldRefusal::Backoff,
                            ..
                        },
                    )) if matches!(
                        routing.decision,
                        Decision::New | Decision::Hashed | Decision::Redispatched
                    ) =>
                    {
                        trace.unroute();
                        tried.push(backend.id);
                        last_refusal = Some((routing, Refused::Launch(e)));
                        continue;
                    }
                    Err(NotReady::Refused(e)) => return Err(e),
                }
            }
            let slot = match &backend.conns {
                None => None,
                Some(limit) => Some(wait_for_slot(limit, backend).await?),
            };
            match self.upstream.connection(backend.address).await {
                Ok(connection) => {
                    trace.slot = slot;
                    let transition = if connection.reused() {
                        backend.health.reused()
                    } else {
                        backend.health.connected()
                    };
                    health::note(pool, backend, transition, "a connection was accepted");
                    if let Some(from) = routing.moved_from {
                        redispatched(pool, &pool.backends(), from, &routing, view.id);
                    }
                    let cookie_routed = view
                        .id
                        .filter(|_| routing.decision == Decision::Learned)
                        .map(|(id, _)| PinKey::of(id));
                    return Ok(Chosen {
                        routing,
                        connection,
                        body,
                        form: peeked.as_ref().map(|(_, _, head, _)| head.clone()),
                        cookie_routed,
                    });
                }
                Err(failure) => {
                    trace.unroute();
                    let transition = backend.health.refused(thresholds);
                    health::note(pool, backend, transition, failure.as_str());
                    tried.push(backend.id);
                    last_refusal = Some((routing, Refused::Connect(failure)));
                }
            }
        }
    }
}

/// Why a backend could not take a request, kept while another is tried.
enum Refused {
    /// It refused the connection (or did not accept it in time).
    Connect(UpstreamFailure),
    /// Its image backs off after a failed launch.
    Launch(ProxyError),
}

/// A slot of `backend` (`max_conns`): at once if one is free, else in its queue, first come
/// first served, for at most `queue_timeout`; refused when the queue is full.
async fn wait_for_slot(
    limit: &ConnLimit,
    backend: &Backend,
) -> Result<OwnedSemaphorePermit, ProxyError> {
    if let Ok(slot) = limit.slots.clone().try_acquire_owned() {
        return Ok(slot);
    }
    let busy = |timed_out| ProxyError::Busy {
        backend: backend.name.clone(),
        timed_out,
        retry_after: limit.queue_timeout.as_secs().max(1),
    };
    /// One place in the queue, given back however the wait ends (the client may leave).
    struct Place<'a>(&'a AtomicUsize);
    impl Drop for Place<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    if limit.waiting.fetch_add(1, Ordering::Relaxed) >= limit.queue_max {
        limit.waiting.fetch_sub(1, Ordering::Relaxed);
        limit.refused_full.fetch_add(1, Ordering::Relaxed);
        return Err(busy(false));
    }
    let _place = Place(&limit.waiting);
    limit.queued.fetch_add(1, Ordering::Relaxed);
    match tokio::time::timeout(limit.queue_timeout, limit.slots.clone().acquire_owned()).await {
        Ok(Ok(slot)) => Ok(slot),
        Ok(Err(_)) | Err(_) => {
            limit.refused_timeout.fetch_add(1, Ordering::Relaxed);
            Err(busy(true))
        }
    }
}

/// The failure a client sees when `backend` could not be reached.
fn refused_by(backend: &Backend, failure: UpstreamFailure) -> ProxyError {
    ProxyError::Upstream {
        backend: backend.name.clone(),
        address: backend.address,
        failure,
    }
}

/// A request's backend, chosen and connected, and what its reply may teach.
struct Chosen {
    routing: Routing,
    connection: upstream::Conn,
    body: RequestBody,
    /// The start of the form body read to find the id, if it was.
    form: Option<Bytes>,
    /// The unknown id an affinity cookie routed to the backend, if any.
    cookie_routed: Option<PinKey>,
}

/// Logs a session moved off its backend, by the hash the access log shows for it.
fn redispatched(
    pool: &Pool,
    set: &BackendSet,
    from: BackendId,
    routing: &Routing,
    id: Option<(&str, IdSource)>,
) {
    let session = id.map(|(id, _)| session_hash(id));
    let from_name = set
        .get(from)
        .map_or_else(|| from.to_string(), |b| b.name.to_string());
    tracing::info!(
        pool = %pool.name,
        from = %from_name,
        to = %routing.backend.name,
        session = %LoggedSession(session),
        "session redispatched: its backend is down, disabled or gone"
    );
}

/// The reply head on its way to the client: pins learned from it, hop-by-hop fields
/// removed, the affinity cookie inserted, and the body wrapped in the page learner when the
/// request named no known session (`scan`: the most bytes of the page to scan).
fn reply_to_client(
    pool: &Arc<Pool>,
    routing: &Routing,
    learner: Learner,
    reply: Response<UpBody>,
    scan: Option<usize>,
    conn: &ClientConn,
    trace: &mut Trace,
) -> Response<ReplyBody> {
    let (mut head, body) = reply.into_parts();
    trace.learned = learner.from_head(pool, &head.headers, head.status.is_redirection());
    let scan = scan
        .filter(|_| trace.learned.is_none() && head.status.is_success() && is_html(&head.headers));
    strip_hop_by_hop(&mut head.headers, false);
    if let Some(cookie) = &routing.insert_cookie {
        let value = if conn.tls {
            &cookie.set_cookie_secure
        } else {
            &cookie.set_cookie
        };
        head.headers.append(SET_COOKIE, value.clone());
    }
    let body = if let Some(scan_limit) = scan {
        ReplyKind::Learning(Box::new(PageLearner::new(
            body,
            PageTap::new(pool.clone(), learner, scan_limit),
        )))
    } else {
        ReplyKind::Upstream(body)
    };
    Response::from_parts(head, ReplyBody::new(body))
}

/// The short text reply for a failure.
fn refusal(e: &ProxyError) -> Response<ReplyBody> {
    let mut reply = Response::new(ReplyBody::text(format!("tidegate: {}\n", e.public())));
    *reply.status_mut() = e.status();
    reply.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let ProxyError::PinnedDown { retry_after, .. }
    | ProxyError::Busy { retry_after, .. }
    | ProxyError::NotLaunched { retry_after, .. }
    | ProxyError::Overloaded { retry_after } = e
    {
        reply
            .headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(*retry_after));
    }
    reply
}

/// The host a request is for: its `Host` header, or the URI authority (HTTP/2, or an
/// HTTP/1.0 request in absolute form). A request with two `Host` fields, or an HTTP/1.1
/// request with none, is refused (RFC 9112 §3.2): a backend could read another host than
/// the one tidegate routed by.
fn request_host<'a>(
    headers: &'a HeaderMap,
    uri: &'a Uri,
    version: Version,
) -> Result<Option<&'a str>, ProxyError> {
    let mut fields = headers.get_all(HOST).iter();
    match (fields.next(), fields.next()) {
        (Some(_), Some(_)) => Err(ProxyError::BadHost),
        (Some(host), None) => Ok(host.to_str().ok()),
        (None, _) if version == Version::HTTP_11 => Err(ProxyError::BadHost),
        (None, _) => Ok(uri.authority().map(|a| a.as_str())),
    }
}

/// The session id named in the request head: query field, then path parameter, then
/// cookies (the query wins, as in Seaside).
fn id_in_head<'a>(
    session: &SessionAffinity,
    uri: &'a Uri,
    headers: &'a HeaderMap,
) -> Option<(&'a str, IdSource)> {
    if let Some(q) = uri.query()
        && let Some(id) = session_id::from_query(q, &session.names.param, &session.rules)
    {
        return Some((id, IdSource::Query));
    }
    if let Some(name) = &session.names.path_param
        && let Some(id) = session_id::from_path_param(uri.path(), name, &session.rules)
    {
        return Some((id, IdSource::PathParam));
    }
    // HTTP/2 may split cookies over several headers.
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| session_id::from_cookie_header(v, &session.names.cookies, &session.rules))
        .map(|id| (id, IdSource::Cookie))
}

/// The value of cookie `name`, in any `Cookie` header.
fn cookie_in<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| session_id::cookie_value(v, name))
}

/// A form body that may carry the id.
#[derive(Clone, Copy)]
enum FormKind<'a> {
    UrlEncoded,
    Multipart { boundary: &'a str },
}

fn form_kind<'a>(headers: &'a HeaderMap, session: &SessionAffinity) -> Option<FormKind<'a>> {
    if session.form_peek_bytes == 0 {
        return None;
    }
    let ct = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Some(FormKind::UrlEncoded)
    } else {
        session_id::multipart_boundary(ct).map(|boundary| FormKind::Multipart { boundary })
    }
}

fn id_in_form<'a>(
    session: &SessionAffinity,
    form: FormKind<'_>,
    head: &'a [u8],
    complete: bool,
) -> Option<&'a str> {
    match form {
        FormKind::UrlEncoded => {
            // Without the whole body, the last field may be cut: read only whole ones.
            let whole = if complete {
                head
            } else {
                &head[..memchr::memrchr(b'&', head).unwrap_or(0)]
            };
            session_id::from_urlencoded(whole, &session.names.param, &session.rules)
        }
        FormKind::Multipart { boundary } => {
            session_id::from_multipart(head, boundary, &session.names.param, &session.rules)
        }
    }
}

/// Whether the request asks to switch protocols (WebSocket).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && connection_has(headers, "upgrade")
}

/// Whether a `Connection` header lists `token`.
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop fields, including those the `Connection` header names. For an
/// upgrade, `Connection: upgrade` and `Upgrade` are kept.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let upgrade_to = if upgrade {
        headers.get(UPGRADE).cloned()
    } else {
        None
    };
    if headers.contains_key(CONNECTION) {
        let listed = |headers: &HeaderMap| {
            headers
                .get_all(CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
                .collect::<ListedNames>()
        };
        listed(headers).remove_from(headers);
    }
    for name in hop_by_hop() {
        headers.remove(name);
    }
    if let Some(protocol) = upgrade_to {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, protocol);
    }
}

/// The fields a `Connection` header names: held inline for the usual handful, on the heap
/// only for a longer list, so every one of them is removed without a common-case allocation.
// Lives on the stack for one call: boxing the inline list would bring back the allocation
// it exists to avoid.
#[allow(clippy::large_enum_variant)]
enum ListedNames {
    Inline([Option<HeaderName>; 8]),
    Heap(Vec<HeaderName>),
}

impl FromIterator<HeaderName> for ListedNames {
    fn from_iter<I: IntoIterator<Item = HeaderName>>(iter: I) -> Self {
        let mut iter = iter.into_iter();
        let mut inline: [Option<HeaderName>; 8] = Default::default();
        for slot in inline.iter_mut() {
            match iter.next() {
                Some(name) => *slot = Some(name),
                None => return ListedNames::Inline(inline),
            }
        }
        match iter.next() {
            None => ListedNames::Inline(inline),
            Some(more) => {
                let mut all: Vec<HeaderName> = inline.into_iter().flatten().collect();
                all.push(more);
                all.extend(iter);
                ListedNames::Heap(all)
            }
        }
    }
}

impl ListedNames {
    fn remove_from(self, headers: &mut HeaderMap) {
        match self {
            ListedNames::Inline(names) => names.into_iter().flatten().for_each(|n| {
                headers.remove(n);
            }),
            ListedNames::Heap(names) => names.into_iter().for_each(|n| {
                headers.remove(n);
            }),
        }
    }
}

/// Prepares the request head for the backend: hop-by-hop fields removed, the client's Host
/// kept (or taken from an HTTP/2 request's authority, or the backend's address when the
/// request names no host), and the X-Forwarded-* fields set.
fn rewrite_request_head(
    parts: &mut http::request::Parts,
    backend: std::net::SocketAddr,
    conn: &ClientConn,
    upgrade: bool,
    scan_page: bool,
) {
    let client_authority = parts.uri.authority();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let headers = &mut parts.headers;
    if scan_page {
        // The page that may name a new session must arrive uncompressed for the scanner to
        // read its links; only requests without a known session are affected.
        headers.remove(http::header::ACCEPT_ENCODING);
    }
    let mut named_host = headers.contains_key(HOST);
    if !named_host {
        // HTTP/2 names the host in the authority; a request that names none (HTTP/1.0)
        // still owes the backend a Host (RFC 9112 §3.2): its address.
        let host = match client_authority {
            Some(authority) => {
                named_host = true;
                HeaderValue::from_str(authority.as_str()).ok()
            }
            None => HeaderValue::try_from(backend.to_string()).ok(),
        };
        if let Some(host) = host {
            headers.insert(HOST, host);
        }
    }
    // Only a trusted proxy's word on who the client is reaches the backend; anybody else
    // could claim any address.
    if !conn.trusted {
        headers.remove(&FORWARDED);
        headers.remove(&X_REAL_IP);
    }
    let forwarded_for = if conn.trusted && headers.contains_key(&X_FORWARDED_FOR) {
        // Every prior hop, over however many lines the client sent, then this client.
        let mut joined = Vec::new();
        for prior in headers.get_all(&X_FORWARDED_FOR) {
            joined.extend_from_slice(prior.as_bytes());
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(conn.forwarded_for.as_bytes());
        HeaderValue::from_bytes(&joined).unwrap_or_else(|_| conn.forwarded_for.clone())
    } else {
        conn.forwarded_for.clone()
    };

    headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
    headers.insert(X_FORWARDED_PROTO.clone(), conn.proto());
    // The host the client asked for; none when it named none (not the backend's address).
    match headers.get(HOST).cloned().filter(|_| named_host) {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

fn is_html(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let mime = ct.split(';').next().unwrap_or("").trim();
            mime.eq_ignore_ascii_case("text/html")
                || mime.eq_ignore_ascii_case("application/xhtml+xml")
        })
}

/// Copies bytes both ways between an upgraded client and backend until either closes,
/// starting with what the backend sent right after its `101` head.
/// The tunnel holds what the connection held: the client's connection slot, and the
/// backend's slot (`max_conns`), as the backend connection stays in use.
type Held = (Arc<ClientConn>, Option<OwnedSemaphorePermit>, OpenTunnel);

/// An upgraded connection counted open at its backend while it lasts (a drain does not
/// finish, and an idle image is not stopped, under it).
struct OpenTunnel(Arc<Backend>);

impl OpenTunnel {
    fn new(backend: Arc<Backend>) -> Self {
        backend.stats.tunnels.fetch_add(1, Ordering::Relaxed);
        OpenTunnel(backend)
    }
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.stats.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn tunnel(client: OnUpgrade, backend: Tunnel, idle: Duration, _held: Held) {
    let Tunnel { stream, early } = backend;
    let client = match client.await {
        Ok(client) => client,
        Err(e) => {
            tracing::debug!("upgrade failed: {e}");
            return;
        }
    };
    // Bytes read on either side count as the tunnel moving.
    let activity = Activity::new();
    let mut client = Moving {
        io: TokioIo::new(client),
        activity: activity.clone(),
    };
    let mut backend = Moving {
        io: stream,
        activity: activity.clone(),
    };
    let copying = async {
        client.write_all(&early).await?;
        tokio::io::copy_bidirectional(&mut client, &mut backend).await
    };
    let quiet = async {
        loop {
            let quiet = activity.quiet_for();
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        ended = copying => {
            if let Err(e) = ended {
                tracing::debug!("upgraded connection ended: {e}");
            }
        }
        () = quiet => tracing::debug!("upgraded connection closed: nothing either way for {idle:?}"),
    }
}

/// One side of a tunnel: what is read from it counts as the tunnel moving.
struct Moving<S> {
    io: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Moving<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Moving<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn upgrade_keeps_its_protocol() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(CONNECTION).unwrap(), "upgrade");
    }
}
