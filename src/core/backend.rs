//! Backends and backend sets: stable ids, explicit state, and the read-mostly set a pool swaps whole.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use http::HeaderValue;

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

/// Where a backend stands, as the routing step sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BackendState {
    /// Serves pinned sessions and takes new ones.
    Up = 0,
    /// Unreachable: pinned sessions are redispatched, no new ones.
    Down = 1,
    /// Serves its pinned sessions until they end, takes no new ones.
    Draining = 2,
    /// Being started on demand (reserved for launching, which is not built yet: nothing
    /// sets this state outside tests). Serves its pinned sessions, takes no new ones.
    Launching = 3,
}

impl BackendState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => BackendState::Up,
            1 => BackendState::Down,
            2 => BackendState::Draining,
            _ => BackendState::Launching,
        }
    }

    /// A short stable label for logs, metrics and the status page.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
            BackendState::Launching => "launching",
        }
    }
}

/// One application server (a Seaside image).
#[derive(Debug)]
pub struct Backend {
    /// Stable id, stored in pins.
    pub id: BackendId,
    /// Operator-facing name (configured, or the address).
    pub name: Box<str>,
    /// Where it listens.
    pub address: SocketAddr,
    /// Relative share of new sessions (1 or more).
    pub weight: u32,
    /// The signed affinity cookie naming this backend, built once (`Set-Cookie` value).
    pub affinity_cookie: Option<AffinityCookieValue>,
    /// Traffic counters.
    pub stats: BackendStats,
    state: AtomicU8,
}

/// A backend's affinity cookie: the bare value requests carry back, and the full header.
#[derive(Debug, Clone)]
pub struct AffinityCookieValue {
    /// What a request's `Cookie` header carries for this backend.
    pub value: Box<str>,
    /// The `Set-Cookie` header value inserted on plain-HTTP replies.
    pub set_cookie: HeaderValue,
    /// The same with `Secure`, for replies over TLS.
    pub set_cookie_secure: HeaderValue,
}

impl Backend {
    /// A backend in state `Up`.
    pub fn new(name: &str, address: SocketAddr, weight: u32) -> Self {
        Backend {
            id: BackendId::from_name(name),
            name: name.into(),
            address,
            weight: weight.max(1),
            affinity_cookie: None,
            stats: BackendStats::default(),
            state: AtomicU8::new(BackendState::Up as u8),
        }
    }

    /// The current state.
    #[inline]
    pub fn state(&self) -> BackendState {
        BackendState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Moves the backend to `state`.
    pub fn set_state(&self, state: BackendState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Whether new sessions may be sent here.
    #[inline]
    pub fn takes_new_sessions(&self) -> bool {
        self.state() == BackendState::Up
    }

    /// Whether sessions already pinned here may still be served here.
    #[inline]
    pub fn serves_pinned(&self) -> bool {
        matches!(
            self.state(),
            BackendState::Up | BackendState::Draining | BackendState::Launching
        )
    }
}

/// The backends of one pool at one moment. Immutable: a change builds a new set and the pool
/// swaps it in whole, so the request path reads it without a lock.
#[derive(Debug, Default)]
pub struct BackendSet {
    backends: Box<[Arc<Backend>]>,
    ids: Box<[BackendId]>,
    /// Round-robin order: backend positions repeated by weight, interleaved smoothly.
    schedule: Box<[u32]>,
}

impl BackendSet {
    /// Builds a set; ids must be unique (the config checks this and names the clash).
    pub fn new(backends: Vec<Arc<Backend>>) -> Self {
        let ids = backends.iter().map(|b| b.id).collect();
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        let schedule = smooth_weighted_schedule(&weights);
        BackendSet {
            backends: backends.into_boxed_slice(),
            ids,
            schedule,
        }
    }

    /// All backends, in configuration order.
    pub fn all(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The backend with this id, if it is in the set.
    #[inline]
    pub fn get(&self, id: BackendId) -> Option<&Arc<Backend>> {
        let pos = self.ids.iter().position(|&i| i == id)?;
        Some(&self.backends[pos])
    }

    /// The backend whose affinity cookie value is `value`.
    pub fn by_affinity_cookie(&self, value: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| {
            b.affinity_cookie
                .as_ref()
                .is_some_and(|c| &*c.value == value)
        })
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
        b.set_state(BackendState::Draining);
        assert!(!b.takes_new_sessions() && b.serves_pinned());
        b.set_state(BackendState::Down);
        assert!(!b.takes_new_sessions() && !b.serves_pinned());
    }
}
