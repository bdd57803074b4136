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
//! | [`core::backend`] | backend ids, the operator's state (drain, disable), and the swappable backend set |
//! | [`core::health`] | health as a rise/fall counter fed results; check kinds and settings |
//! | [`core::registry`] | the live farm: pools and routes swapped whole, backend changes one at a time |
//! | [`core::history`] | each pool's last quarter hour, for the status page |
//! | [`core::balance`] | round-robin, least-sessions, client-address rendezvous hashing |
//! | [`core::learn`] | reading session ids out of reply headers and the links of page bodies; telling them from echoes of the request |
//! | [`core::pool`] | one pool's settings and the routing decision for a request (pinned, new, redispatched, refused) |
//! | [`core::route`] | Host / path prefix → pool |
//! | [`core::launch`] | a launchable backend's process as a state machine: command line, back-off, idle clock |
//! | [`core::snapshot`] | the state file's format: every pool's pins, versioned and checksummed |
//! | [`config`] | the TOML file and flags, validated into a `Config` |
//! | [`error`] | config errors; request failures → status and text in one place |
//! | [`proxy`] | the request path: route, identify, choose a backend that accepts the connection, forward, stream back; what a connection holds (its slot, its activity) |
//! | [`learn`] | learning pins from reply heads and streaming HTML bodies |
//! | [`upstream`] | pooled keep-alive client to backends; the peeked request body |
//! | [`listener`] | accepting connections within the limit, HTTP/1.1 and h2c, client timeouts, graceful shutdown |
//! | [`server`] | assembling a running balancer; SIGHUP; the open-files limit |
//! | [`notify`] | telling systemd (`sd_notify`): ready, stopping, the successor's pid after an upgrade |
//! | [`farm`] | what acts on backends: reload as a difference, the health prober, the launcher of images on demand ([`farm::launch`]), housekeeping (pins, drains, idle images, history) |
//! | [`store`] | the state file: pins written periodically and at shutdown, read back at start |
//! | [`tap`] | watching a body stream past (byte counts, the page learner) |
//! | [`shutdown`] | the signal that stops listeners, sweepers and demo images |
//! | [`demo`] | Seaside-like demo images (used by `tidegate demo` and the tests) |
//! | [`clock`] | unix seconds for pin timestamps; the inactivity timer of streams that must keep moving |
//! | [`log_output`] | log lines written out in batches by a thread of their own |
//! | [`core::stats`] | per-backend, per-pool and front counters the request path bumps |
//! | [`metrics`] | Prometheus exposition of those counters |
//! | [`admin`] | the admin listener: `/metrics`, `/status`, `/status.json`, `/healthz`, and the JSON API ([`admin::api`]) |
//! | [`ctl`] | `tidegate ctl`: the admin API for people |
//! | [`manual`] | the man page and shell completions, generated from the clap definition of the command line |
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
pub mod manual;
pub mod metrics;
pub mod notify;
pub mod proxy;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod tap;
pub mod tls;
pub mod upgrade;
pub mod upstream;

/// The git commit this program was built from (its short hash), or `unknown` when it was
/// built outside a git checkout (see `build.rs`).
pub const COMMIT: &str = env!("TIDEGATE_COMMIT");

/// The version and the commit, as `tidegate --version` prints them: `0.1.0 (abc1234)`, or
/// `0.1.0 (unknown commit)`.
pub const VERSION: &str = env!("TIDEGATE_VERSION");
