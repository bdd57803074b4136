//! Traffic listeners: accept TCP connections (plain, or TLS with ALPN) and serve HTTP/1.1
//! (keep-alive, upgrades) and HTTP/2 (h2c by prior knowledge, or h2 over TLS), until
//! shutdown; and the HTTP→HTTPS redirect listener.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::core::route::strip_port;
use crate::proxy::{ClientConn, Proxy};
use crate::shutdown::Signal;

/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection protocol settings shared by every connection of a listener (the admin
/// listener's too).
pub(crate) fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    builder
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
) {
    let builder = connection_builder();
    let graceful = GracefulShutdown::new();
    loop {
        let Some((stream, peer)) = accept(&listener, &mut shutdown).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _open = OpenConnection::count(proxy.clone());
            let ended = match tls {
                None => {
                    let conn = Arc::new(ClientConn::new(peer, None));
                    let service = service_fn(move |req| proxy.clone().serve(req, conn.clone()));
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(connection.into_owned()).await
                }
                Some(tls) => {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(stream)).await;
                    let stream = match handshake {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            proxy.front.client_error("tls-handshake");
                            tracing::debug!(client = %peer, "TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            proxy.front.client_error("tls-handshake");
                            tracing::debug!(client = %peer, "TLS handshake timed out");
                            return;
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
                    proxy.front.handshake(version, alpn);
                    let conn = Arc::new(ClientConn::new(peer, Some(tls.hsts)));
                    let service = service_fn(move |req| proxy.clone().serve(req, conn.clone()));
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(connection.into_owned()).await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(client = %peer, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown: connections still open after {DRAIN_TIMEOUT:?}, closing them");
    }
}

/// Counts a connection open for as long as it lives, however its task ends.
struct OpenConnection(Arc<Proxy>);

impl OpenConnection {
    fn count(proxy: Arc<Proxy>) -> Self {
        proxy
            .front
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        proxy.front.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(proxy)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0
            .front
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Answers every request on a plain listener with a permanent redirect to the same URL over
/// HTTPS (`https_port` is added unless it is 443).
pub async fn redirect_to_https(listener: TcpListener, https_port: u16, mut shutdown: Signal) {
    let builder = connection_builder();
    loop {
        let Some((stream, _)) = accept(&listener, &mut shutdown).await else {
            break;
        };
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| async move {
                Ok::<_, std::convert::Infallible>(https_redirect(&req, https_port))
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
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
