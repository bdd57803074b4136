//! Backends and backend sets: stable ids, explicit state, and the read-mostly set a pool swaps whole.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use http::HeaderValue;

use crate::core::health::{Health, HealthCounter};
use crate::core::launch::{Process, ProcessState};
use crate::core::stats::BackendStats;

/// Seed for every hash that must agree across instances and restarts.
pub const FIXED_SEED: u64 = 0x7469_6465_6761_7465; // "tidegate"

/// A backend's stable identity: a fixed-seed hash of its name (or address when unnamed).
///
/// Pins store this id, never a list position, so adding or removing a backend never shifts
/// another's sessions, and every instance computes the same id for the same name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub u32);

impl BackendId {
    /// The id of the backend named `name`.
    pub fn from_name(name: &str) -> Self {
        BackendId(xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), FIXED_SEED) as u32)
    }
}

impl std::fmt::Display for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// What the operator wants of a backend (drain, disable), kept apart from what the health
/// checks say: a check that finds the backend up never undoes a drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminState {
    /// Serves pinned sessions and takes new ones.
    Active = 0,
    /// Serves its pinned sessions until they end, takes no new ones.
    Draining = 1,
    /// Was draining and has no pin left: takes no new sessions (a pin learned since is
    /// still served).
    Drained = 2,
    /// Takes nothing: its pinned sessions follow the pool's `on_pinned_down`.
    Disabled = 3,
}

impl AdminState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => AdminState::Active,
            1 => AdminState::Draining,
            2 => AdminState::Drained,
            _ => AdminState::Disabled,
        }
    }

    /// A short stable label for the API, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Draining => "draining",
            AdminState::Drained => "drained",
            AdminState::Disabled => "disabled",
        }
    }

    /// Every value, in label order.
    pub const ALL: [AdminState; 4] = [
        AdminState::Active,
        AdminState::Draining,
        AdminState::Drained,
        AdminState::Disabled,
    ];
}

/// One application server (a Seaside image). Its identity is its name; its weight, admin
/// state, health and counters change in place, so every change to the farm keeps them.
#[derive(Debug)]
pub struct Backend {
    /// Stable id, stored in pins.
    pub id: BackendId,
    /// Operator-facing name (configured, or the address).
    pub name: Box<str>,
    /// Where it listens.
    pub address: SocketAddr,
    /// Traffic counters, shared with the backend it replaced when it moved address.
    pub stats: Arc<BackendStats>,
    /// What the checks say.
    pub health: HealthCounter,
    weight: AtomicU32,
    admin: AtomicU8,
    /// Live pins above which it takes no new session; 0: no bound.
    max_sessions: AtomicU64,
    /// The bound on concurrent requests and its queue, if any (shared with the backend it
    /// replaced when it moved address).
    pub conns: Option<Arc<ConnLimit>>,
    /// Its process, when tidegate launches it on demand (`launch`).
    pub process: Option<Arc<Process>>,
}

/// What a backend may have besides its name, address, weight and state.
#[derive(Debug, Default)]
pub struct Extras {
    /// A bound on its concurrent requests (`max_conns`) and its queue.
    pub conns: Option<ConnLimit>,
    /// Its process, when tidegate launches it on demand.
    pub process: Option<Process>,
}

/// A backend's bound on concurrent requests (`max_conns`) and the queue in front of it:
/// requests above the bound wait, first come first served, for a slot of their own backend.
#[derive(Debug)]
pub struct ConnLimit {
    /// One permit per request the backend may serve at once.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// `max_conns`.
    pub max: u32,
    /// Requests that may wait at once; more are refused.
    pub queue_max: usize,
    /// How long a request may wait.
    pub queue_timeout: std::time::Duration,
    /// Requests waiting now.
    pub waiting: std::sync::atomic::AtomicUsize,
    /// Requests that had to wait.
    pub queued: AtomicU64,
    /// Requests refused: the queue was full.
    pub refused_full: AtomicU64,
    /// Requests refused: no slot within `queue_timeout`.
    pub refused_timeout: AtomicU64,
}

impl ConnLimit {
    /// At most `max` requests at once, `queue_max` waiting up to `queue_timeout`.
    pub fn new(max: u32, queue_max: usize, queue_timeout: std::time::Duration) -> Self {
        ConnLimit {
            slots: Arc::new(tokio::sync::Semaphore::new(max as usize)),
            max,
            queue_max,
            queue_timeout,
            waiting: Default::default(),
            queued: AtomicU64::new(0),
            refused_full: AtomicU64::new(0),
            refused_timeout: AtomicU64::new(0),
        }
    }
}

/// A backend's affinity cookie: the bare values requests carry back, and the full header.
#[derive(Debug, Clone)]
pub struct AffinityCookieValue {
    /// What a request's `Cookie` header carries for this backend, under the signing secret.
    pub value: Box<str>,
    /// The values under the older secrets, which still verify.
    pub older: Box<[Box<str>]>,
    /// The `Set-Cookie` header value inserted on plain-HTTP replies.
    pub set_cookie: HeaderValue,
    /// The same with `Secure`, for replies over TLS.
    pub set_cookie_secure: HeaderValue,
}

impl AffinityCookieValue {
    /// Whether `value` is this backend's cookie under any secret. Every candidate is compared
    /// whole, whatever an earlier one gave: the time taken tells a client nothing about how
    /// close a forged value came, nor under which secret it matched.
    pub fn accepts(&self, value: &str) -> bool {
        self.older
            .iter()
            .fold(self.is_current(value), |found, older| {
                found | same_bytes(older.as_bytes(), value.as_bytes())
            })
    }

    /// Whether `value` is this backend's cookie under the signing secret (a client holding
    /// an older one is sent the current one).
    pub fn is_current(&self, value: &str) -> bool {
        same_bytes(self.value.as_bytes(), value.as_bytes())
    }
}

impl Backend {
    /// An active backend of unknown health.
    pub fn new(name: &str, address: SocketAddr, weight: u32) -> Self {
        Backend {
            id: BackendId::from_name(name),
            name: name.into(),
            address,
            stats: Arc::default(),
            health: HealthCounter::default(),
            weight: AtomicU32::new(weight.max(1)),
            admin: AtomicU8::new(AdminState::Active as u8),
            max_sessions: AtomicU64::new(0),
            conns: None,
            process: None,
        }
    }

    /// The same backend with a bound on its requests or a process launched on demand.
    pub fn with_extras(self, extras: Extras) -> Self {
        Backend {
            conns: extras.conns.map(Arc::new),
            process: extras.process.map(Arc::new),
            ..self
        }
    }

    /// The same backend (name, counters, weight, admin state) at another address; its health
    /// is unknown there.
    pub fn moved_to(&self, address: SocketAddr) -> Self {
        Backend {
            id: self.id,
            name: self.name.clone(),
            address,
            stats: self.stats.clone(),
            health: HealthCounter::default(),
            weight: AtomicU32::new(self.weight()),
            admin: AtomicU8::new(self.admin() as u8),
            max_sessions: AtomicU64::new(self.max_sessions().unwrap_or(0)),
            conns: self.conns.clone(),
            process: self.process.clone(),
        }
    }

    /// Relative share of new sessions (1 or more).
    #[inline]
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Sets the weight; the pool's schedule must be rebuilt to follow it.
    pub(crate) fn set_weight(&self, weight: u32) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
    }

    /// The live pins above which it takes no new session, if bounded.
    #[inline]
    pub fn max_sessions(&self) -> Option<u64> {
        Some(self.max_sessions.load(Ordering::Relaxed)).filter(|&n| n > 0)
    }

    /// Bounds (or, with `None`, unbounds) its sessions.
    pub fn set_max_sessions(&self, max: Option<u64>) {
        self.max_sessions.store(max.unwrap_or(0), Ordering::Relaxed);
    }

    /// Whether it has room for one more session, given its live pins (asked only when it is
    /// bounded). Pinned sessions are never refused by the bound.
    #[inline]
    pub fn has_room(&self, pins: impl FnOnce() -> u64) -> bool {
        self.max_sessions().is_none_or(|max| pins() < max)
    }

    /// Whether a request sent now would get a slot without waiting.
    #[inline]
    pub fn has_free_slot(&self) -> bool {
        self.conns
            .as_ref()
            .is_none_or(|c| c.slots.available_permits() > 0)
    }

    /// The operator's intent.
    #[inline]
    pub fn admin(&self) -> AdminState {
        AdminState::from_u8(self.admin.load(Ordering::Relaxed))
    }

    /// Sets the operator's intent.
    pub fn set_admin(&self, state: AdminState) {
        self.admin.store(state as u8, Ordering::Relaxed);
    }

    /// Starts a drain; a drained backend stays drained (one atomic step, so a drain that
    /// settles at the same moment is not started again).
    pub fn drain(&self) {
        let _ = self
            .admin
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                (s != AdminState::Drained as u8).then_some(AdminState::Draining as u8)
            });
    }

    /// A draining backend with no pin, nothing in flight and no upgraded connection open
    /// becomes drained; `true` once,
    /// for the caller that made the change.
    pub fn settle_drain(&self, pins: u64) -> bool {
        pins == 0
            && self.stats.in_flight.load(Ordering::Relaxed) <= 0
            && self.stats.tunnels.load(Ordering::Relaxed) <= 0
            && self
                .admin
                .compare_exchange(
                    AdminState::Draining as u8,
                    AdminState::Drained as u8,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Whether new sessions may be sent here: it is active and not down, or down only
    /// because its process died and is stopped (a request launches it again).
    #[inline]
    pub fn takes_new_sessions(&self) -> bool {
        self.admin() == AdminState::Active
            && (self.health.get() != Health::Down
                || self
                    .process
                    .as_ref()
                    .is_some_and(|p| p.state() == ProcessState::Stopped))
    }

    /// Whether its port may be expected to accept: always, unless it is launched on demand
    /// and its process is not running.
    #[inline]
    pub fn is_running(&self) -> bool {
        self.process.as_ref().is_none_or(|p| p.is_running())
    }

    /// Whether its process is being launched now.
    #[inline]
    pub fn is_launching(&self) -> bool {
        self.process
            .as_ref()
            .is_some_and(|p| p.state() == ProcessState::Launching)
    }

    /// Whether a request may launch its process at `now`: launched on demand, stopped, past
    /// any back-off, and not disabled.
    #[inline]
    pub fn may_launch(&self, now: u32) -> bool {
        self.admin() != AdminState::Disabled
            && self.process.as_ref().is_some_and(|p| p.may_launch(now))
    }

    /// Whether sessions already pinned here may still be served here.
    #[inline]
    pub fn serves_pinned(&self) -> bool {
        self.admin() != AdminState::Disabled && self.health.get() != Health::Down
    }
}

/// The backends of one pool at one moment. Immutable: a change builds a new set (of the same
/// `Arc<Backend>`s) and the pool swaps it in whole, so the request path reads it without a
/// lock.
#[derive(Debug, Default)]
pub struct BackendSet {
    backends: Box<[Arc<Backend>]>,
    ids: Box<[BackendId]>,
    /// The affinity cookie of each backend (the pool's secret), by position.
    cookies: Box<[Option<Arc<AffinityCookieValue>>]>,
    /// Round-robin order: backend positions repeated by weight, interleaved smoothly.
    schedule: Box<[u32]>,
}

impl BackendSet {
    /// Builds a set; ids must be unique (the config and the registry check this).
    /// `cookie_of` gives each backend's affinity cookie when the pool inserts one.
    pub fn new(
        backends: Vec<Arc<Backend>>,
        cookie_of: impl Fn(BackendId) -> Option<AffinityCookieValue>,
    ) -> Self {
        let ids = backends.iter().map(|b| b.id).collect();
        let cookies = backends
            .iter()
            .map(|b| cookie_of(b.id).map(Arc::new))
            .collect();
        let weights: Vec<u32> = backends.iter().map(|b| b.weight()).collect();
        let schedule = smooth_weighted_schedule(&weights);
        BackendSet {
            backends: backends.into_boxed_slice(),
            ids,
            cookies,
            schedule,
        }
    }

    /// All backends, in the order they were configured or added.
    pub fn all(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The backend with this id, if it is in the set.
    #[inline]
    pub fn get(&self, id: BackendId) -> Option<&Arc<Backend>> {
        let pos = self.ids.iter().position(|&i| i == id)?;
        Some(&self.backends[pos])
    }

    /// The backend named `name`.
    pub fn named(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| &*b.name == name)
    }

    /// The affinity cookie of the backend with this id.
    #[inline]
    pub fn cookie_of(&self, id: BackendId) -> Option<&Arc<AffinityCookieValue>> {
        let pos = self.ids.iter().position(|&i| i == id)?;
        self.cookies[pos].as_ref()
    }

    /// The backend whose affinity cookie value (under any of the pool's secrets) is `value`.
    ///
    /// Every value is compared, each in time that does not depend on where it differs: how
    /// long the answer takes tells a client nothing about how close a forged cookie came.
    pub fn by_affinity_cookie(&self, value: &str) -> Option<&Arc<Backend>> {
        let mut found = None;
        for (pos, cookie) in self.cookies.iter().enumerate() {
            if let Some(c) = cookie
                && c.accepts(value)
            {
                found = found.or(Some(pos));
            }
        }
        found.map(|pos| &self.backends[pos])
    }

    /// The weighted round-robin order, as positions into [`BackendSet::all`].
    pub fn schedule(&self) -> &[u32] {
        &self.schedule
    }

    /// Number of backends.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Whether the set has no backend.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }
}

/// Whether `a` and `b` are equal, looking at every byte whatever the first difference (the
/// lengths of affinity cookie values are public: they are all the same).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

/// nginx's smooth weighted round-robin, unrolled once into a fixed order: weights 5,1,1 give
/// `a a b a c a a` rather than `a a a a a b c`. Weights are scaled down by their common divisor.
fn smooth_weighted_schedule(weights: &[u32]) -> Box<[u32]> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w / divisor)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|&(i, c)| (*c, std::cmp::Reverse(i)))
            .expect("total > 0 implies a backend");
        current[best] -= total;
        order.push(best as u32);
    }
    order.into_boxed_slice()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(BackendId::from_name("web1"), BackendId::from_name("web1"));
        assert_ne!(BackendId::from_name("web1"), BackendId::from_name("web2"));
        // Pinned value: ids must never change between releases, or persisted pins break.
        assert_eq!(BackendId::from_name("web1").to_string().len(), 8);
    }

    #[test]
    fn cookie_values_compare_whole() {
        assert!(same_bytes(b"abc", b"abc"));
        assert!(!same_bytes(b"abc", b"abd") && !same_bytes(b"xbc", b"abc"));
        assert!(!same_bytes(b"abc", b"abcd"));
    }

    #[test]
    fn schedule_interleaves_by_weight() {
        assert_eq!(&*smooth_weighted_schedule(&[1, 1, 1]), &[0, 1, 2]);
        assert_eq!(
            &*smooth_weighted_schedule(&[5, 1, 1]),
            &[0, 0, 1, 0, 2, 0, 0]
        );
        assert_eq!(&*smooth_weighted_schedule(&[200, 100]), &[0, 1, 0]);
        assert!(smooth_weighted_schedule(&[]).is_empty());
    }

    #[test]
    fn state_gates_new_and_pinned_traffic() {
        let b = Backend::new("a", "127.0.0.1:1".parse().unwrap(), 1);
        assert!(b.takes_new_sessions() && b.serves_pinned());
        b.set_admin(AdminState::Draining);
        assert!(!b.takes_new_sessions() && b.serves_pinned());
        b.set_admin(AdminState::Disabled);
        assert!(!b.takes_new_sessions() && !b.serves_pinned());
        b.set_admin(AdminState::Active);
        for _ in 0..3 {
            b.health.refused(crate::core::health::Thresholds::default());
        }
        assert!(!b.takes_new_sessions() && !b.serves_pinned());
    }

    #[test]
    fn a_drain_settles_once_when_no_pin_is_left() {
        let b = Backend::new("a", "127.0.0.1:1".parse().unwrap(), 1);
        assert!(!b.settle_drain(0), "only a draining backend settles");
        b.set_admin(AdminState::Draining);
        assert!(!b.settle_drain(2));
        assert!(b.settle_drain(0));
        assert!(!b.settle_drain(0));
        assert_eq!(b.admin(), AdminState::Drained);
    }
}
