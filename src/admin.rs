//! The admin listener, apart from traffic: `/metrics` (Prometheus), `/status` (a live page
//! for a second screen), `/status.json` (what the page polls), `/healthz`, and the JSON API
//! under `/api` that reads and changes the farm ([`api`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::core::history::Sample;
use crate::farm::Farm;
use crate::listener;
use crate::metrics;
use crate::proxy::Proxy;
use crate::shutdown::Signal;

pub mod api;

const STATUS_PAGE: &str = include_str!("admin/status.html");

/// What the admin endpoints read and change.
pub struct Admin {
    proxy: Arc<Proxy>,
    farm: Arc<Farm>,
    token: api::Token,
    registry: Registry,
    started: Instant,
}

impl Admin {
    /// The admin endpoints over a running balancer; `token` guards changes (none: changes
    /// are refused).
    pub fn new(
        proxy: Arc<Proxy>,
        farm: Arc<Farm>,
        token: Option<String>,
        started: Instant,
    ) -> Arc<Self> {
        Arc::new(Admin {
            registry: metrics::registry(proxy.clone(), farm.state.clone(), started),
            proxy,
            farm,
            token: api::Token::new(token),
            started,
        })
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    client_timeout: std::time::Duration,
    shutdown: Signal,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(listener::ADMIN_MAX_CONNECTIONS));
    listener::serve_side(listener, slots, client_timeout, shutdown, move |req| {
        let admin = admin.clone();
        async move { admin.answer(req).await }
    })
    .await;
}

impl Admin {
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path().starts_with("/api/") || req.uri().path() == "/api" {
            return api::answer(&self.farm, &self.token, req).await;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "tidegate admin: only GET (changes go through /api)\n".into(),
            );
        }
        match req.uri().path() {
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics::render(&self.registry),
            ),
            "/status" | "/" => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                STATUS_PAGE.to_string(),
            ),
            "/status.json" => reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_string(&self.status()).unwrap_or_else(|_| "{}".into()),
            ),
            "/healthz" => reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "tidegate admin: /metrics, /status, /status.json, /healthz, /api/pools\n".into(),
            ),
        }
    }

    fn status(&self) -> Status {
        let front = &self.proxy.front;
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            connections_open: front.connections_open.load(Ordering::Relaxed),
            store: self
                .proxy
                .store()
                .map(|s| if s.is_up() { "up" } else { "degraded" }),
            pools: self
                .proxy
                .registry()
                .topology()
                .pools
                .iter()
                .map(|p| {
                    let table = p.table();
                    PoolStatus {
                        name: p.name.to_string(),
                        affinity: if table.is_some() {
                            "session"
                        } else {
                            "client-ip"
                        },
                        policy: p.policy.as_str(),
                        pins: table.map(|t| t.len() as u64),
                        max_pins: table.map(|t| t.limits().max_pins as u64),
                        lookups_hit: p.stats.lookups_hit.load(Ordering::Relaxed),
                        lookups_miss: p.stats.lookups_miss.load(Ordering::Relaxed),
                        health_check: p.health.check.as_str(),
                        on_pinned_down: p.on_pinned_down.as_str(),
                        history: p
                            .stats
                            .history
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .samples()
                            .copied()
                            .collect(),
                        backends: p
                            .backends()
                            .all()
                            .iter()
                            .map(|b| BackendStatus {
                                name: b.name.to_string(),
                                address: b.address.to_string(),
                                state: b.admin().as_str(),
                                health: b.health.get().as_str(),
                                weight: b.weight(),
                                pins: table.map(|t| t.pins_of(b.id)),
                                in_flight: b.stats.in_flight.load(Ordering::Relaxed),
                                requests: b.stats.replies_total(),
                                errors: b.stats.replies[4].load(Ordering::Relaxed),
                                process: b.process.as_deref().map(api::ProcessView::of),
                            })
                            .collect(),
                    }
                })
                .collect(),
        }
    }
}

pub(crate) fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `/status.json`: cumulative counters; the page turns them into rates between polls.
#[derive(Serialize)]
struct Status {
    version: &'static str,
    uptime_seconds: u64,
    connections_open: i64,
    /// `up` or `degraded` when pins are shared through a store; absent otherwise.
    store: Option<&'static str>,
    pools: Vec<PoolStatus>,
}

#[derive(Serialize)]
struct PoolStatus {
    name: String,
    affinity: &'static str,
    policy: &'static str,
    pins: Option<u64>,
    max_pins: Option<u64>,
    lookups_hit: u64,
    lookups_miss: u64,
    /// `passive`, `tcp` or `http`.
    health_check: &'static str,
    /// `redispatch` or `fail`.
    on_pinned_down: &'static str,
    /// The last quarter hour, a sample every few seconds, oldest first.
    history: Vec<Sample>,
    backends: Vec<BackendStatus>,
}

#[derive(Serialize)]
struct BackendStatus {
    name: String,
    address: String,
    /// `active`, `draining`, `drained` or `disabled`.
    state: &'static str,
    /// `up`, `down` or `unknown`.
    health: &'static str,
    weight: u32,
    pins: Option<u64>,
    in_flight: i64,
    /// Replies of every status class.
    requests: u64,
    /// 5xx replies (the backend's and tidegate's 502/503/504 for it).
    errors: u64,
    /// Its process, when tidegate launches it on demand.
    process: Option<api::ProcessView>,
}
