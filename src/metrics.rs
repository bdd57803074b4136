//! Prometheus exposition: a collector that reads the counters the request path keeps on each
//! pool and backend (see [`crate::core::stats`]) at scrape time. Labels are bounded: pool
//! and backend names from the configuration and small fixed sets; never an id, an address, a
//! path or a Host.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::core::affinity::AffinityTable;
use crate::core::backend::{AdminState, Backend};
use crate::core::health::Health;
use crate::core::launch::{HoldRefusal, LaunchFailure, ProcessState, ProcessStats};
use crate::core::learn::LearnSource;
use crate::core::pool::{Decision, Pool};
use crate::core::registry::Change;
use crate::core::stats::{
    BackendStats, CLIENT_ERROR_KINDS, TLS_ALPN, TLS_VERSIONS, UPSTREAM_ERROR_KINDS,
};
use crate::proxy::Proxy;
use crate::store::shared::{Lookup, StoreStats, WriteKind};
use crate::store::state_file::{DROP_REASONS, StateFile, StateStats};

/// The status classes, as labels.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const SOURCES: [LearnSource; 4] = [
    LearnSource::SetCookie,
    LearnSource::Location,
    LearnSource::PageBody,
    LearnSource::AffinityCookie,
];
const DECISIONS: [Decision; 5] = [
    Decision::Pinned,
    Decision::Learned,
    Decision::New,
    Decision::Redispatched,
    Decision::Hashed,
];

/// Reads a running balancer's counters for Prometheus.
pub struct Exposition {
    proxy: Arc<Proxy>,
    state: Option<Arc<StateFile>>,
    started: Instant,
}

impl std::fmt::Debug for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exposition").finish_non_exhaustive()
    }
}

/// A registry holding the collector for `proxy` (and the state file, if one is kept).
pub fn registry(proxy: Arc<Proxy>, state: Option<Arc<StateFile>>, started: Instant) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposition {
        proxy,
        state,
        started,
    }));
    registry
}

/// The registry in the Prometheus text format (0.0.4).
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    if prometheus_client::encoding::prometheus_text::encode(&mut out, registry).is_err() {
        out.clear();
        let _ = writeln!(out, "# encoding failed");
    }
    out
}

/// Reads one counter of a backend's stats.
type StatsField = fn(&BackendStats) -> &AtomicU64;
/// Reads one figure of the state file.
type StateField = fn(&StateStats) -> &AtomicU64;
/// Reads one counter of the shared store.
type StoreField = fn(&StoreStats) -> &AtomicU64;
/// Reads one counter of a launchable backend's process.
type ProcessField = fn(&ProcessStats) -> &AtomicU64;
/// Reads one running total of a pool.
type PoolField = fn(&crate::core::stats::PoolStats) -> u64;
/// Reads one running total of a pool's table.
type TableTotal = fn(&AffinityTable) -> u64;

/// Every backend that has `part` (a bound, a process), with its pool's name and its own.
fn backends_with<T>(
    pools: &[Arc<Pool>],
    part: impl Fn(&Backend) -> Option<Arc<T>>,
) -> Vec<(Box<str>, Box<str>, Arc<T>)> {
    pools
        .iter()
        .flat_map(|p| {
            let set = p.backends();
            set.all()
                .iter()
                .filter_map(|b| Some((p.name.clone(), b.name.clone(), part(b)?)))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// One counter value with no exemplar.
fn counter(
    encoder: &mut prometheus_client::encoding::MetricEncoder<'_>,
    labels: &[(&str, &str)],
    value: u64,
) -> std::fmt::Result {
    encoder
        .encode_family(&labels)?
        .encode_counter::<NoLabelSet, u64, f64>(&value, None)
}

fn gauge(
    encoder: &mut prometheus_client::encoding::MetricEncoder<'_>,
    labels: &[(&str, &str)],
    value: i64,
) -> std::fmt::Result {
    encoder.encode_family(&labels)?.encode_gauge(&value)
}

impl Collector for Exposition {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let topology = self.proxy.registry().topology();
        let pools = &topology.pools;
        let front = &self.proxy.front;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

        let mut m = e.encode_descriptor(
            "tidegate_requests",
            "Replies by pool, backend and status class (tidegate's own 502/504 for the backend included; 499: client left first)",
            None,
            MetricType::Counter,
        )?;
        for p in pools {
            for b in p.backends().all() {
                for (class, n) in CLASSES.iter().zip(&b.stats.replies) {
                    counter(
                        &mut m,
                        &[("pool", &p.name), ("backend", &b.name), ("class", class)],
                        load(n),
                    )?;
                }
            }
        }

        let mut m = e.encode_descriptor(
            "tidegate_request_duration_seconds",
            "Time from the request's arrival to the end of its reply",
            None,
            MetricType::Histogram,
        )?;
        for p in pools {
            for b in p.backends().all() {
                let (sum, count, buckets) = b.stats.duration.snapshot();
                m.encode_family(&[("pool", &*p.name), ("backend", &*b.name)])?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }

        let bytes: [(&str, &str, StatsField); 2] = [
            (
                "tidegate_request_bytes",
                "Request body bytes sent to backends",
                |s| &s.bytes_in,
            ),
            (
                "tidegate_response_bytes",
                "Reply body bytes sent to clients",
                |s| &s.bytes_out,
            ),
        ];
        for (name, help, field) in bytes {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in pools {
                for b in p.backends().all() {
                    let labels = [("pool", &*p.name), ("backend", &*b.name)];
                    counter(&mut m, &labels, load(field(&b.stats)))?;
                }
            }
        }

        let mut m = e.encode_descriptor(
            "tidegate_in_flight",
            "Requests being served by a backend now",
            None,
            MetricType::Gauge,
        )?;
        for p in pools {
            for b in p.backends().all() {
                let n = b.stats.in_flight.load(Ordering::Relaxed);
                gauge(&mut m, &[("pool", &p.name), ("backend", &b.name)], n)?;
            }
        }

        let limited = || backends_with(pools, |b| b.conns.clone());
        let mut m = e.encode_descriptor(
            "tidegate_queue_waiting",
            "Requests waiting in a backend's queue now (backends with max_conns)",
            None,
            MetricType::Gauge,
        )?;
        for (pool, backend, c) in limited() {
            let n = c.waiting.load(Ordering::Relaxed) as i64;
            gauge(&mut m, &[("pool", &pool), ("backend", &backend)], n)?;
        }
        let mut m = e.encode_descriptor(
            "tidegate_queued",
            "Requests that waited in a backend's queue for a slot (max_conns)",
            None,
            MetricType::Counter,
        )?;
        for (pool, backend, c) in limited() {
            counter(
                &mut m,
                &[("pool", &pool), ("backend", &backend)],
                load(&c.queued),
            )?;
        }
        let mut m = e.encode_descriptor(
            "tidegate_queue_refused",
            "Requests refused with 503 by a backend's queue: full, or no slot within queue_timeout",
            None,
            MetricType::Counter,
        )?;
        for (pool, backend, c) in limited() {
            for (reason, n) in [("full", &c.refused_full), ("timeout", &c.refused_timeout)] {
                counter(
                    &mut m,
                    &[("pool", &pool), ("backend", &backend), ("reason", reason)],
                    load(n),
                )?;
            }
        }

        let launchable = || backends_with(pools, |b| b.process.clone());
        let mut m = e.encode_descriptor(
            "tidegate_backend_process",
            "1 for the state each launchable backend's process is in: stopped, launching, running, stopping",
            None,
            MetricType::Gauge,
        )?;
        for (pool, backend, p) in launchable() {
            let current = p.state();
            for state in ProcessState::ALL {
                gauge(
                    &mut m,
                    &[
                        ("pool", &pool),
                        ("backend", &backend),
                        ("state", state.as_str()),
                    ],
                    i64::from(state == current),
                )?;
            }
        }
        let process_counters: [(&str, &str, ProcessField); 3] = [
            (
                "tidegate_launches",
                "Launches of a backend's process started by tidegate",
                |s| &s.launches,
            ),
            (
                "tidegate_idle_stops",
                "Processes stopped after idle_stop with no session and no request",
                |s| &s.idle_stops,
            ),
            (
                "tidegate_process_exits",
                "Processes that exited without tidegate asking (their backend marked down)",
                |s| &s.exits,
            ),
        ];
        for (name, help, field) in process_counters {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (pool, backend, p) in launchable() {
                counter(
                    &mut m,
                    &[("pool", &pool), ("backend", &backend)],
                    load(field(&p.stats)),
                )?;
            }
        }
        let mut m = e.encode_descriptor(
            "tidegate_launch_failures",
            "Launches that failed: spawn (could not run), exited (before its port accepted), timeout (launch_timeout)",
            None,
            MetricType::Counter,
        )?;
        for (pool, backend, p) in launchable() {
            for (why, n) in LaunchFailure::ALL.iter().zip(&p.stats.failures) {
                counter(
                    &mut m,
                    &[
                        ("pool", &pool),
                        ("backend", &backend),
                        ("reason", why.as_str()),
                    ],
                    load(n),
                )?;
            }
        }
        let mut m = e.encode_descriptor(
            "tidegate_launch_duration_seconds",
            "Time from a launch's start to its port accepting",
            None,
            MetricType::Histogram,
        )?;
        for (pool, backend, p) in launchable() {
            let (sum, count, buckets) = p.stats.launch_duration.snapshot();
            m.encode_family(&[("pool", &*pool), ("backend", &*backend)])?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        let mut m = e.encode_descriptor(
            "tidegate_launch_waiting",
            "Requests waiting now for a backend's process to run",
            None,
            MetricType::Gauge,
        )?;
        for (pool, backend, p) in launchable() {
            let n = p.holding.load(Ordering::Relaxed) as i64;
            gauge(&mut m, &[("pool", &pool), ("backend", &backend)], n)?;
        }
        let mut m = e.encode_descriptor(
            "tidegate_launch_waited",
            "Requests that waited for a backend's process to be launched",
            None,
            MetricType::Counter,
        )?;
        for (pool, backend, p) in launchable() {
            counter(
                &mut m,
                &[("pool", &pool), ("backend", &backend)],
                load(&p.stats.held),
            )?;
        }
        let mut m = e.encode_descriptor(
            "tidegate_launch_refused",
            "Requests answered 503 instead of waiting for a launch: full (queue_max held already), backoff (after a failed launch), failed (the launch they waited for)",
            None,
            MetricType::Counter,
        )?;
        for (pool, backend, p) in launchable() {
            for (why, n) in HoldRefusal::ALL.iter().zip(&p.stats.refused) {
                counter(
                    &mut m,
                    &[
                        ("pool", &pool),
                        ("backend", &backend),
                        ("reason", why.as_str()),
                    ],
                    load(n),
                )?;
            }
        }

        let mut m = e.encode_descriptor(
            "tidegate_upstream_errors",
            "Failed exchanges with backends, by kind",
            None,
            MetricType::Counter,
        )?;
        for p in pools {
            for b in p.backends().all() {
                for (kind, n) in UPSTREAM_ERROR_KINDS.iter().zip(&b.stats.upstream_errors) {
                    counter(
                        &mut m,
                        &[("pool", &p.name), ("backend", &b.name), ("kind", kind)],
                        load(n),
                    )?;
                }
            }
        }

        let mut m = e.encode_descriptor(
            "tidegate_backend_state",
            "1 for the operator's state each backend is in: active, draining, drained, disabled",
            None,
            MetricType::Gauge,
        )?;
        for p in pools {
            for b in p.backends().all() {
                let current = b.admin();
                for state in AdminState::ALL {
                    gauge(
                        &mut m,
                        &[
                            ("pool", &p.name),
                            ("backend", &b.name),
                            ("state", state.as_str()),
                        ],
                        i64::from(state == current),
                    )?;
                }
            }
        }
        let mut m = e.encode_descriptor(
            "tidegate_backend_health",
            "1 for what the health checks say of each backend: up, down, unknown",
            None,
            MetricType::Gauge,
        )?;
        for p in pools {
            for b in p.backends().all() {
                let current = b.health.get();
                for health in Health::ALL {
                    gauge(
                        &mut m,
                        &[
                            ("pool", &p.name),
                            ("backend", &b.name),
                            ("health", health.as_str()),
                        ],
                        i64::from(health == current),
                    )?;
                }
            }
        }
        let health_counters: [(&str, &str, StatsField); 4] = [
            (
                "tidegate_health_checks",
                "Health checks run (active checks, and probes of down backends)",
                |s| &s.checks,
            ),
            (
                "tidegate_health_check_failures",
                "Health checks that failed",
                |s| &s.check_failures,
            ),
            (
                "tidegate_backend_down_transitions",
                "Times a backend went down (checks, or refused connections in a row)",
                |s| &s.went_down,
            ),
            (
                "tidegate_backend_up_transitions",
                "Times a backend came back up after being down",
                |s| &s.came_up,
            ),
        ];
        for (name, help, field) in health_counters {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in pools {
                for b in p.backends().all() {
                    let labels = [("pool", &*p.name), ("backend", &*b.name)];
                    counter(&mut m, &labels, load(field(&b.stats)))?;
                }
            }
        }

        let mut m = e.encode_descriptor(
            "tidegate_pins",
            "Live pins in the affinity table",
            None,
            MetricType::Gauge,
        )?;
        for p in pools {
            if let Some(t) = p.table() {
                gauge(&mut m, &[("pool", &p.name)], t.len() as i64)?;
            }
        }
        let mut m = e.encode_descriptor(
            "tidegate_pins_max",
            "The affinity table's bound",
            None,
            MetricType::Gauge,
        )?;
        for p in pools {
            if let Some(t) = p.table() {
                gauge(&mut m, &[("pool", &p.name)], t.limits().max_pins as i64)?;
            }
        }
        let mut m = e.encode_descriptor(
            "tidegate_backend_pins",
            "Live pins per backend",
            None,
            MetricType::Gauge,
        )?;
        for p in pools {
            if let Some(t) = p.table() {
                for b in p.backends().all() {
                    gauge(
                        &mut m,
                        &[("pool", &p.name), ("backend", &b.name)],
                        t.pins_of(b.id) as i64,
                    )?;
                }
            }
        }

        let mut m = e.encode_descriptor(
            "tidegate_affinity_lookups",
            "Session ids looked up: hit, or miss (an unknown, forged or expired id)",
            None,
            MetricType::Counter,
        )?;
        for p in pools.iter().filter(|p| p.table().is_some()) {
            counter(
                &mut m,
                &[("pool", &p.name), ("result", "hit")],
                load(&p.stats.lookups_hit),
            )?;
            counter(
                &mut m,
                &[("pool", &p.name), ("result", "miss")],
                load(&p.stats.lookups_miss),
            )?;
        }

        let mut m = e.encode_descriptor(
            "tidegate_pins_learned",
            "Pins learned from backend replies, by source",
            None,
            MetricType::Counter,
        )?;
        for p in pools.iter().filter(|p| p.table().is_some()) {
            for source in SOURCES {
                counter(
                    &mut m,
                    &[("pool", &p.name), ("source", source.as_str())],
                    p.stats.learned(source),
                )?;
            }
        }

        let removed: [(&str, &str, TableTotal); 2] = [
            (
                "tidegate_pins_expired",
                "Pins expired (idle or lifetime)",
                AffinityTable::expired_total,
            ),
            (
                "tidegate_pins_evicted",
                "Live pins evicted to keep the bound",
                AffinityTable::evicted_total,
            ),
        ];
        for (name, help, total) in removed {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in pools {
                if let Some(t) = p.table() {
                    counter(&mut m, &[("pool", &p.name)], total(t))?;
                }
            }
        }

        let mut m = e.encode_descriptor(
            "tidegate_decisions",
            "Routing decisions: pinned, learned (affinity cookie), new (by policy), redispatched, hashed (client-ip)",
            None,
            MetricType::Counter,
        )?;
        for p in pools {
            for d in DECISIONS {
                counter(
                    &mut m,
                    &[
                        ("pool", &p.name),
                        ("decision", d.as_str()),
                        ("policy", p.policy.as_str()),
                    ],
                    p.stats.decided(d),
                )?;
            }
        }

        let mut m = e.encode_descriptor(
            "tidegate_no_backend",
            "Requests refused with 503: no backend of the pool could take them",
            None,
            MetricType::Counter,
        )?;
        for p in pools {
            counter(&mut m, &[("pool", &p.name)], load(&p.stats.no_backend))?;
        }
        let pool_counters: [(&str, &str, PoolField); 4] = [
            (
                "tidegate_redispatches",
                "Sessions moved off a backend that was down, disabled, refusing or removed",
                |s| s.decided(Decision::Redispatched),
            ),
            (
                "tidegate_pinned_down",
                "Requests refused with 503 because their session's backend is down (on_pinned_down = fail)",
                |s| s.pinned_down.load(Ordering::Relaxed),
            ),
            (
                "tidegate_pins_dropped",
                "Pins dropped because their backend was removed",
                |s| s.pins_dropped.load(Ordering::Relaxed),
            ),
            (
                "tidegate_drains_finished",
                "Backends whose drain finished (no pin left)",
                |s| s.drains_finished.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, field) in pool_counters {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in pools {
                counter(&mut m, &[("pool", &p.name)], field(&p.stats))?;
            }
        }
        let registry = self.proxy.registry();
        let mut m = e.encode_descriptor(
            "tidegate_admin_changes",
            "Changes made to the farm (admin API and reloads), by kind",
            None,
            MetricType::Counter,
        )?;
        for kind in Change::ALL {
            counter(&mut m, &[("kind", kind.as_str())], registry.changes(kind))?;
        }

        let mut m = e.encode_descriptor(
            "tidegate_client_errors",
            "Requests refused for the client's fault, by kind",
            None,
            MetricType::Counter,
        )?;
        for (i, kind) in CLIENT_ERROR_KINDS.iter().enumerate() {
            if *kind != "tls-handshake" {
                counter(&mut m, &[("kind", kind)], front.client_errors(i))?;
            }
        }

        let mut m = e.encode_descriptor(
            "tidegate_tls_handshakes",
            "Completed TLS handshakes by version and ALPN",
            None,
            MetricType::Counter,
        )?;
        for (v, version) in TLS_VERSIONS.iter().enumerate() {
            for (a, alpn) in TLS_ALPN.iter().enumerate() {
                counter(
                    &mut m,
                    &[("version", version), ("alpn", alpn)],
                    front.handshakes(v, a),
                )?;
            }
        }
        let mut m = e.encode_descriptor(
            "tidegate_tls_resumed_handshakes",
            "Completed TLS handshakes that resumed an earlier session (ticket or session id)",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, &[], front.resumed_handshakes())?;
        let failures = CLIENT_ERROR_KINDS
            .iter()
            .position(|k| *k == "tls-handshake")
            .map_or(0, |i| front.client_errors(i));
        let mut m = e.encode_descriptor(
            "tidegate_tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, &[], failures)?;

        // The state file: families always described, series only when one is kept.
        let state = self.state.as_deref();
        let mut m = e.encode_descriptor(
            "tidegate_state_saves",
            "Writes of the state file, by outcome (ok, failed)",
            None,
            MetricType::Counter,
        )?;
        if let Some(s) = state {
            counter(&mut m, &[("outcome", "ok")], load(&s.stats.saves_ok))?;
            counter(
                &mut m,
                &[("outcome", "failed")],
                load(&s.stats.saves_failed),
            )?;
        }
        let state_gauges: [(&str, &str, StateField); 3] = [
            (
                "tidegate_state_pins_saved",
                "Pins in the last write of the state file",
                |s| &s.pins_saved,
            ),
            (
                "tidegate_state_last_save_timestamp_seconds",
                "Unix time of the last write of the state file",
                |s| &s.last_save,
            ),
            (
                "tidegate_state_pins_restored",
                "Pins read back from the state file at start",
                |s| &s.restored,
            ),
        ];
        for (name, help, field) in state_gauges {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            if let Some(s) = state {
                gauge(&mut m, &[], load(field(&s.stats)) as i64)?;
            }
        }
        let mut m = e.encode_descriptor(
            "tidegate_state_pins_dropped",
            "Pins read back from the state file at start and dropped: expired, unknown-backend, unknown-pool, full",
            None,
            MetricType::Gauge,
        )?;
        if let Some(s) = state {
            for (reason, n) in DROP_REASONS.iter().zip(&s.stats.dropped) {
                gauge(&mut m, &[("reason", reason)], load(n) as i64)?;
            }
        }

        // The shared store: families always described, series only when one is kept.
        let store = self.proxy.store();
        let mut m = e.encode_descriptor(
            "tidegate_store_up",
            "1 while the shared store answers; 0 while it is degraded (lookups skip it)",
            None,
            MetricType::Gauge,
        )?;
        if let Some(s) = store {
            gauge(&mut m, &[], i64::from(s.is_up()))?;
        }
        let mut m = e.encode_descriptor(
            "tidegate_store_lookups",
            "Local misses asked of the shared store, by outcome: found, missing, unknown-backend, timeout, error, skipped",
            None,
            MetricType::Counter,
        )?;
        if let Some(s) = store {
            for (outcome, n) in Lookup::ALL.iter().zip(&s.stats.lookups) {
                counter(&mut m, &[("outcome", outcome.as_str())], load(n))?;
            }
        }
        let mut m = e.encode_descriptor(
            "tidegate_store_lookup_wait_seconds",
            "Time requests waited for the shared store, summed (divided by the lookups: the mean)",
            None,
            MetricType::Counter,
        )?;
        if let Some(s) = store {
            let none: &[(&str, &str)] = &[];
            m.encode_family(&none)?
                .encode_counter::<NoLabelSet, f64, f64>(
                    &(load(&s.stats.lookup_micros) as f64 / 1e6),
                    None,
                )?;
        }
        let mut m = e.encode_descriptor(
            "tidegate_store_writes",
            "Writes the shared store took, by kind: pin, move, drop, refresh, refill",
            None,
            MetricType::Counter,
        )?;
        if let Some(s) = store {
            for (kind, n) in WriteKind::ALL.iter().zip(&s.stats.writes) {
                counter(&mut m, &[("kind", kind.as_str())], load(n))?;
            }
        }
        let mut m = e.encode_descriptor(
            "tidegate_store_writes_dropped",
            "Writes lost, by reason: full (max_pending writes waited already), failed (the store was down or failed them)",
            None,
            MetricType::Counter,
        )?;
        if let Some(s) = store {
            counter(
                &mut m,
                &[("reason", "full")],
                load(&s.stats.writes_dropped_full),
            )?;
            counter(
                &mut m,
                &[("reason", "failed")],
                load(&s.stats.writes_dropped_failed),
            )?;
        }
        let store_counters: [(&str, &str, StoreField); 3] = [
            (
                "tidegate_store_moves_followed",
                "Pins held here that another instance moved or dropped, followed",
                |s| &s.followed,
            ),
            (
                "tidegate_store_unknown_backend",
                "Pins the store named for a backend this instance does not have (moves and refresh checks; lookups count in tidegate_store_lookups)",
                |s| &s.unknown_backend,
            ),
            (
                "tidegate_store_degraded",
                "Times the shared store stopped answering",
                |s| &s.degraded,
            ),
        ];
        for (name, help, field) in store_counters {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            if let Some(s) = store {
                counter(&mut m, &[], load(field(&s.stats)))?;
            }
        }

        let mut m = e.encode_descriptor(
            "tidegate_connections_open",
            "Client connections open now",
            None,
            MetricType::Gauge,
        )?;
        gauge(&mut m, &[], front.connections_open.load(Ordering::Relaxed))?;
        let mut m = e.encode_descriptor(
            "tidegate_connections",
            "Client connections accepted",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, &[], load(&front.connections_total))?;

        let mut m = e.encode_descriptor(
            "tidegate_uptime_seconds",
            "Seconds since start",
            None,
            MetricType::Gauge,
        )?;
        gauge(&mut m, &[], self.started.elapsed().as_secs() as i64)?;
        let mut m = e.encode_descriptor(
            "tidegate_build_info",
            "Build information; always 1",
            None,
            MetricType::Gauge,
        )?;
        gauge(
            &mut m,
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", crate::COMMIT),
            ],
            1,
        )?;
        Ok(())
    }
}
