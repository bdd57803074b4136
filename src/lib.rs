//! tidegate: a session-affinity layer-7 load balancer for Seaside farms (and any stateful
//! HTTP application).
//!
//! Module map — the pure core decides, the edges do I/O:
//!
//! | module | owns |
//! | --- | --- |
//! | [`core::session_id`] | where a request names its session; id validation |
//! | [`core::affinity`] | the concurrent, bounded, expiring session → backend table |
//! | [`core::affinity_cookie`] | the signed cookie naming a backend |
//! | [`core::backend`] | backend ids, states, and the swappable backend set |
//! | [`core::balance`] | round-robin, least-sessions, client-address rendezvous hashing |
//! | [`core::learn`] | reading session ids out of reply headers and page bodies |
//! | [`core::pool`] | one pool's settings and the routing decision for a request |
//! | [`core::route`] | Host / path prefix → pool |
//! | [`config`] | the TOML file and flags, validated into a `Config` |
//! | [`error`] | config errors; request failures → status and text in one place |
//! | [`proxy`] | the request path: route, extract, decide, forward, stream back; what a connection holds (its slot, its activity) |
//! | [`learn`] | learning pins from reply heads and streaming HTML bodies |
//! | [`upstream`] | pooled keep-alive client to backends; the peeked request body |
//! | [`listener`] | accepting connections within the limit, HTTP/1.1 and h2c, client timeouts, graceful shutdown |
//! | [`server`] | assembling a running balancer; the pin sweeper; the open-files limit |
//! | [`tap`] | watching a body stream past (byte counts, the page learner) |
//! | [`shutdown`] | the signal that stops listeners, sweepers and demo images |
//! | [`demo`] | Seaside-like demo images (used by `tidegate demo` and the tests) |
//! | [`clock`] | unix seconds for pin timestamps; the inactivity timer of streams that must keep moving |
//! | [`log_output`] | log lines written out in batches by a thread of their own |
//! | [`core::stats`] | per-backend, per-pool and front counters the request path bumps |
//! | [`metrics`] | Prometheus exposition of those counters |
//! | [`admin`] | the admin listener: `/metrics`, `/status`, `/status.json`, `/healthz` |
//! | [`tls`] | rustls: certificates, SNI choice, reload |
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod clock;
pub mod config;
pub mod core;
pub mod ctl;
pub mod demo;
pub mod error;
pub mod farm;
pub mod learn;
pub mod listener;
pub mod log_output;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod shutdown;
pub mod tap;
pub mod tls;
pub mod upstream;
