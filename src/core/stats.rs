//! Counters the request path bumps as it goes: plain relaxed atomics owned by the backend or
//! pool they describe, so no metric is looked up per request and a backend's counters leave
//! with it. The metrics endpoint and the status page read them at scrape time.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use std::sync::Mutex;

use crate::core::history::History;
use crate::core::learn::LearnSource;
use crate::core::pool::Decision;

/// Upper bounds (seconds) of the request duration histogram buckets.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Upstream failure kinds counted per backend, in [`UPSTREAM_ERROR_KINDS`] order.
pub const UPSTREAM_ERROR_KINDS: [&str; 6] = [
    "connect-refused",
    "connect-timeout",
    "connect-error",
    "reset",
    "response-timeout",
    "bad-reply",
];

/// Upper bounds (seconds) of the launch duration histogram buckets: an image takes from a
/// fraction of a second to minutes to open its port.
pub const LAUNCH_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// A cumulative histogram of durations with fixed buckets (request durations by default).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64; 12],
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::with_bounds(&DURATION_BUCKETS)
    }
}

impl Histogram {
    /// A histogram with these bucket bounds.
    pub fn with_bounds(bounds: &'static [f64; 12]) -> Self {
        Histogram {
            bounds,
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// `(sum in seconds, count, (upper bound, count) per bucket)`; the counts are per bucket
    /// (not cumulative), as prometheus-client's encoder expects, and observations above the
    /// last bound appear only in `count`.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(&bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, count, buckets)
    }
}

/// Traffic counters of one backend.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Replies by status class: index 0 is 1xx … 4 is 5xx.
    pub replies: [AtomicU64; 5],
    /// Upstream failures by kind, in [`UPSTREAM_ERROR_KINDS`] order.
    pub upstream_errors: [AtomicU64; UPSTREAM_ERROR_KINDS.len()],
    /// Requests being served right now.
    pub in_flight: AtomicI64,
    /// Upgraded connections (WebSocket) open to it now.
    pub tunnels: AtomicI64,
    /// Request body bytes sent to the backend.
    pub bytes_in: AtomicU64,
    /// Reply body bytes sent to clients.
    pub bytes_out: AtomicU64,
    /// Time from the request's arrival to the end of its reply.
    pub duration: Histogram,
    /// Active health checks run.
    pub checks: AtomicU64,
    /// Active health checks failed.
    pub check_failures: AtomicU64,
    /// Times the backend went down.
    pub went_down: AtomicU64,
    /// Times the backend came (back) up.
    pub came_up: AtomicU64,
}

impl BackendStats {
    /// A request was routed here.
    #[inline]
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request routed here ended with `status` after `took`.
    #[inline]
    pub fn end(&self, status: u16, took: Duration) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.replies[class].fetch_add(1, Ordering::Relaxed);
        self.duration.observe(took);
    }

    /// Counts an upstream failure of `kind` (an [`UPSTREAM_ERROR_KINDS`] entry).
    pub fn upstream_error(&self, kind: &str) {
        if let Some(i) = UPSTREAM_ERROR_KINDS.iter().position(|k| *k == kind) {
            self.upstream_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// All replies so far.
    pub fn replies_total(&self) -> u64 {
        self.replies.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// All upstream failures so far.
    pub fn upstream_errors_total(&self) -> u64 {
        self.upstream_errors
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// Affinity and decision counters of one pool.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Requests whose id was found in the table.
    pub lookups_hit: AtomicU64,
    /// Requests whose id was not (unknown or expired ids).
    pub lookups_miss: AtomicU64,
    /// Pins learned, by [`LearnSource`] (see [`PoolStats::learned`]).
    learned: [AtomicU64; 4],
    /// Routing decisions, by [`Decision`] (see [`PoolStats::decided`]).
    decisions: [AtomicU64; 5],
    /// Requests refused because no backend could take them.
    pub no_backend: AtomicU64,
    /// Requests refused because their backend is down (`on_pinned_down = "fail"`).
    pub pinned_down: AtomicU64,
    /// Replies sent for the pool (tidegate's own refusals included).
    pub replies: AtomicU64,
    /// 5xx replies among them.
    pub errors: AtomicU64,
    /// Pins dropped because their backend was removed.
    pub pins_dropped: AtomicU64,
    /// Backends whose drain finished.
    pub drains_finished: AtomicU64,
    /// The last quarter hour, for the status page.
    pub history: Mutex<History>,
}

impl PoolStats {
    /// Counts a pin learned from `source`.
    #[inline]
    pub fn learn(&self, source: LearnSource) {
        self.learned[source as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Pins learned from `source` so far.
    pub fn learned(&self, source: LearnSource) -> u64 {
        self.learned[source as usize].load(Ordering::Relaxed)
    }

    /// Counts a routing decision.
    #[inline]
    pub fn decide(&self, decision: Decision) {
        self.decisions[decision as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes back a decision counted for an attempt that another replaced (a backend
    /// refused the connection and the request went on).
    pub fn undecide(&self, decision: Decision) {
        self.decisions[decision as usize].fetch_sub(1, Ordering::Relaxed);
    }

    /// Decisions of this kind so far.
    pub fn decided(&self, decision: Decision) -> u64 {
        self.decisions[decision as usize].load(Ordering::Relaxed)
    }

    /// Counts a reply sent for the pool.
    #[inline]
    pub fn replied(&self, status: u16) {
        self.replies.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Client-side failure kinds counted by the front, in [`CLIENT_ERROR_KINDS`] order.
pub const CLIENT_ERROR_KINDS: [&str; 8] = [
    "no-route",
    "bad-request-body",
    "bad-host",
    "request-timeout",
    "connect-method",
    "tls-handshake",
    // An HTTP/2 stream refused: `http2_max_requests` were in flight.
    "too-many-requests",
    // An HTTP/2 connection closed: one of its streams took none of its reply for
    // `client_timeout`.
    "stalled-stream",
];

/// TLS versions counted, in index order.
pub const TLS_VERSIONS: [&str; 2] = ["TLSv1.2", "TLSv1.3"];
/// ALPN outcomes counted, in index order.
pub const TLS_ALPN: [&str; 3] = ["h2", "http/1.1", "none"];

/// Counters of the front door: connections, TLS handshakes, client errors.
#[derive(Debug, Default)]
pub struct FrontStats {
    /// Client connections open now.
    pub connections_open: AtomicI64,
    /// Client connections accepted since start.
    pub connections_total: AtomicU64,
    /// Completed TLS handshakes by version and ALPN (`version * 3 + alpn`).
    tls_handshakes: [AtomicU64; 6],
    /// Of those, the handshakes that resumed an earlier session (ticket or session id).
    tls_resumed: AtomicU64,
    /// Client errors by kind, in [`CLIENT_ERROR_KINDS`] order.
    client_errors: [AtomicU64; CLIENT_ERROR_KINDS.len()],
}

impl FrontStats {
    /// Counts a completed handshake; `version` indexes [`TLS_VERSIONS`], `alpn` [`TLS_ALPN`].
    /// `resumed` when the client resumed an earlier session.
    pub fn handshake(&self, version: usize, alpn: usize, resumed: bool) {
        self.tls_handshakes[version.min(1) * 3 + alpn.min(2)].fetch_add(1, Ordering::Relaxed);
        if resumed {
            self.tls_resumed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Handshakes that resumed an earlier session so far.
    pub fn resumed_handshakes(&self) -> u64 {
        self.tls_resumed.load(Ordering::Relaxed)
    }

    /// Handshakes of this version and ALPN so far.
    pub fn handshakes(&self, version: usize, alpn: usize) -> u64 {
        self.tls_handshakes[version * 3 + alpn].load(Ordering::Relaxed)
    }

    /// Counts a client error of `kind` (a [`CLIENT_ERROR_KINDS`] entry; others are ignored).
    pub fn client_error(&self, kind: &str) {
        if let Some(i) = CLIENT_ERROR_KINDS.iter().position(|k| *k == kind) {
            self.client_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Client errors of the kind at `index` so far.
    pub fn client_errors(&self, index: usize) -> u64 {
        self.client_errors[index].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_per_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(20));
        h.observe(Duration::from_secs(30));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 30.0205).abs() < 1e-9);
        assert_eq!(buckets[0], (0.001, 1));
        assert_eq!(buckets[4], (0.025, 1));
        assert_eq!(
            buckets.iter().map(|b| b.1).sum::<u64>(),
            2,
            "30 s is only in +Inf"
        );
    }

    #[test]
    fn replies_count_by_class() {
        let s = BackendStats::default();
        s.begin();
        s.end(204, Duration::ZERO);
        s.begin();
        s.end(503, Duration::ZERO);
        assert_eq!(s.replies[1].load(Ordering::Relaxed), 1);
        assert_eq!(s.replies[4].load(Ordering::Relaxed), 1);
        assert_eq!(s.in_flight.load(Ordering::Relaxed), 0);
    }
}
