//! The affinity table: session id → owning backend, concurrent, bounded, expiring.
//!
//! Keys are a 128-bit fixed-seed hash of the id ([`PinKey`]), so a pin costs the same 32 bytes
//! whatever the id's length, a lookup never allocates, and every instance derives the same key
//! from the same id. Values are plain data ([`Pin`]) with the last-use time kept atomic, so a
//! lookup refreshes it under the shard's *read* lock: readers never block one another.
//!
//! Time comes in as an argument (`now`, unix seconds), which keeps the table free of clocks.
//! Expiry is lazy on lookup plus [`AffinityTable::sweep`], which an edge task runs off the
//! request path; the bound is kept by evicting the stalest pins.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use dashmap::DashMap;

use crate::core::backend::{BackendId, FIXED_SEED};

/// The table key of a session id: 128 bits of a fixed-seed hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinKey([u64; 2]);

impl PinKey {
    /// The key of `id`.
    #[inline]
    pub fn of(id: &str) -> Self {
        let h = xxhash_rust::xxh3::xxh3_128_with_seed(id.as_bytes(), FIXED_SEED);
        PinKey([h as u64, (h >> 64) as u64])
    }

    /// Its two halves, as the state file stores them.
    pub fn parts(self) -> [u64; 2] {
        self.0
    }

    /// The key stored as `parts`.
    pub fn from_parts(parts: [u64; 2]) -> Self {
        PinKey(parts)
    }
}

impl Hash for PinKey {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The key already is a uniform hash: hand the map 64 of its bits as they are.
        state.write_u64(self.0[0]);
    }
}

/// A hasher that passes a [`PinKey`]'s own bits through.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Only write_u64 is used by PinKey; fold anything else in for safety.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[derive(Clone, Copy, Default)]
struct BuildPassThrough;

impl BuildHasher for BuildPassThrough {
    type Hasher = PassThrough;
    #[inline]
    fn build_hasher(&self) -> PassThrough {
        PassThrough(0)
    }
}

/// One pin as plain data: who owns the session, and when it was created and last used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pin {
    /// The owning backend.
    pub backend: BackendId,
    /// Unix seconds at creation.
    pub created: u32,
    /// Unix seconds at last use.
    pub last_used: u32,
}

/// The stored form of a pin: last use is atomic so lookups refresh it under a read lock.
/// `shared` is when the shared store last heard of the pin (it fits in the padding the
/// 16-byte key leaves, so a pin still takes 32 bytes).
struct Slot {
    backend: BackendId,
    created: u32,
    last_used: AtomicU32,
    shared: AtomicU32,
}

impl Slot {
    fn new(backend: BackendId, created: u32, last_used: u32, shared: u32) -> Self {
        Slot {
            backend,
            created,
            last_used: AtomicU32::new(last_used),
            shared: AtomicU32::new(shared),
        }
    }
}

/// Told of every pin a table makes and of the pins a departed backend took with it: the
/// shared store writes them through to the other instances. Pins put in place *from* the
/// store ([`AffinityTable::adopt`], [`AffinityTable::follow`]) are not told back.
pub trait PinWatch: Send + Sync {
    /// `key` was pinned to `backend` at `now`: a new pin (`from` is `None`), or one moved
    /// off `from`. `ttl` is the table's idle timeout.
    fn made(&self, key: PinKey, backend: BackendId, now: u32, from: Option<BackendId>, ttl: u32);
    /// These pins went with their backend, which left the pool.
    fn dropped(&self, keys: &[PinKey]);
}

/// What [`AffinityTable::probe`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// No live pin: the shared store may know the session.
    Absent,
    /// A live pin the store heard of recently enough.
    Held,
    /// A live pin of this backend whose copy in the store is due for a refresh (marked
    /// refreshed now, so one request of many asks).
    Due(BackendId),
}

/// How long pins live and how many there may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableLimits {
    /// Seconds without use after which a pin expires (Seaside 3: 1800).
    pub idle_timeout: u32,
    /// Seconds after creation after which a pin expires however busy (Seaside 3: 28800).
    pub max_lifetime: u32,
    /// Most pins held; beyond it the stalest are evicted.
    pub max_pins: usize,
}

impl Default for TableLimits {
    fn default() -> Self {
        TableLimits {
            idle_timeout: 1800,
            max_lifetime: 28800,
            max_pins: 1_000_000,
        }
    }
}

impl TableLimits {
    fn expired(&self, created: u32, last_used: u32, now: u32) -> bool {
        now.saturating_sub(last_used) >= self.idle_timeout
            || now.saturating_sub(created) >= self.max_lifetime
    }
}

/// [`TableLimits`] a reload may change while requests read them.
#[derive(Debug)]
struct Limits {
    idle_timeout: AtomicU32,
    max_lifetime: AtomicU32,
    max_pins: AtomicUsize,
}

impl Limits {
    fn new(l: TableLimits) -> Self {
        Limits {
            idle_timeout: AtomicU32::new(l.idle_timeout),
            max_lifetime: AtomicU32::new(l.max_lifetime),
            max_pins: AtomicUsize::new(l.max_pins),
        }
    }

    #[inline]
    fn get(&self) -> TableLimits {
        TableLimits {
            idle_timeout: self.idle_timeout.load(Ordering::Relaxed),
            max_lifetime: self.max_lifetime.load(Ordering::Relaxed),
            max_pins: self.max_pins.load(Ordering::Relaxed),
        }
    }

    fn set(&self, l: TableLimits) {
        self.idle_timeout.store(l.idle_timeout, Ordering::Relaxed);
        self.max_lifetime.store(l.max_lifetime, Ordering::Relaxed);
        self.max_pins.store(l.max_pins, Ordering::Relaxed);
    }
}

/// What [`AffinityTable::pin`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinOutcome {
    /// A new pin was created.
    Created,
    /// The id was pinned elsewhere and now points at the new backend.
    Moved {
        /// Where the session was pinned before.
        from: BackendId,
    },
    /// The id was already pinned to this backend; its last use was refreshed.
    Refreshed,
}

/// Counts from one sweep or eviction pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Pins that had expired.
    pub expired: usize,
    /// Live pins dropped to keep the bound.
    pub evicted: usize,
}

/// What became of a pin read back from the state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restored {
    /// Put back.
    Yes,
    /// Expired by now (idle or too old).
    Expired,
    /// The table is at `max_pins`.
    Full,
    /// The session was pinned again since the start: that pin stays.
    Present,
}

/// The concurrent session → backend table of one pool.
pub struct AffinityTable {
    map: DashMap<PinKey, Slot, BuildPassThrough>,
    len: AtomicUsize,
    /// Changed by a reload; read per lookup as plain relaxed loads.
    limits: Limits,
    per_backend: RwLock<HashMap<BackendId, Arc<AtomicI64>>>,
    expired: AtomicU64,
    evicted: AtomicU64,
    /// Whether [`AffinityTable::record`] is on: one relaxed load per pin made otherwise.
    recording: AtomicBool,
    recorded: Mutex<Option<Recording>>,
    /// The shared store, when one is configured: told of every pin made.
    watch: OnceLock<Arc<dyn PinWatch>>,
}

/// The pins made while recording, and what to call after each.
type Recording = (Vec<(PinKey, Pin)>, Arc<dyn Fn() + Send + Sync>);

/// Age histogram resolution for eviction: the stalest share is found in two passes over the
/// table with this many counters, instead of sorting every pin.
const AGE_BUCKETS: usize = 1024;

impl AffinityTable {
    /// An empty table with these limits.
    pub fn new(limits: TableLimits) -> Self {
        // Enough shards that one shard holds a few thousand pins at the bound, so a sweep
        // holds any one shard's lock only briefly.
        let shards = (limits.max_pins / 4096).next_power_of_two().clamp(64, 4096);
        AffinityTable {
            map: DashMap::with_capacity_and_hasher_and_shard_amount(0, BuildPassThrough, shards),
            len: AtomicUsize::new(0),
            limits: Limits::new(limits),
            per_backend: RwLock::new(HashMap::new()),
            expired: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            recorded: Mutex::new(None),
            watch: OnceLock::new(),
        }
    }

    /// Tells `watch` of every pin made from now on (once: a table has one store for its
    /// life). Returns whether it was attached (false: one already was).
    pub fn watch(&self, watch: Arc<dyn PinWatch>) -> bool {
        self.watch.set(watch).is_ok()
    }

    /// Whether a store watches this table.
    pub fn watched(&self) -> bool {
        self.watch.get().is_some()
    }

    /// With `Some(made)`: from now on keeps every pin made (created, or moved to another
    /// backend) until [`AffinityTable::recorded`] takes it, and calls `made` after each. An
    /// upgrade hands them to the successor as they come. `None` stops, and drops what was
    /// kept.
    pub fn record(&self, made: Option<Arc<dyn Fn() + Send + Sync>>) {
        let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        self.recording.store(made.is_some(), Ordering::Relaxed);
        *recorded = made.map(|m| (Vec::new(), m));
    }

    /// The pins recorded since the last call (none when not recording).
    pub fn recorded(&self) -> Vec<(PinKey, Pin)> {
        self.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(|(pins, _)| std::mem::take(pins))
            .unwrap_or_default()
    }

    /// The limits this table keeps.
    pub fn limits(&self) -> TableLimits {
        self.limits.get()
    }

    /// New limits (a reload): pins are judged by them from the next lookup or sweep on.
    pub fn set_limits(&self, limits: TableLimits) {
        self.limits.set(limits);
    }

    /// Forgets the pin counters of backends that have no pin and are not `kept` (they left
    /// the pool), so backends coming and going do not grow the counters.
    pub fn prune_counters(&self, kept: impl Fn(BackendId) -> bool) {
        let idle: Vec<BackendId> = self
            .per_backend
            .read()
            .expect("pin counters lock")
            .iter()
            .filter(|(id, n)| !kept(**id) && n.load(Ordering::Relaxed) <= 0)
            .map(|(id, _)| *id)
            .collect();
        if idle.is_empty() {
            return;
        }
        let mut counters = self.per_backend.write().expect("pin counters lock");
        for id in idle {
            if counters
                .get(&id)
                .is_some_and(|n| n.load(Ordering::Relaxed) <= 0)
            {
                counters.remove(&id);
            }
        }
    }

    /// Backends with a pin counter (tests and diagnostics).
    pub fn counted_backends(&self) -> usize {
        self.per_backend.read().expect("pin counters lock").len()
    }

    /// Removes every pin of `backend` (it left the pool). Returns how many went.
    pub fn unpin_backend(&self, backend: BackendId) -> usize {
        let mut gone = 0;
        let watch = self.watch.get();
        let mut keys = Vec::new();
        self.map.retain(|key, slot| {
            let keep = slot.backend != backend;
            gone += usize::from(!keep);
            if !keep && watch.is_some() {
                keys.push(*key);
            }
            keep
        });
        if let Some(watch) = watch
            && !keys.is_empty()
        {
            watch.dropped(&keys);
        }
        self.len.fetch_sub(gone, Ordering::Relaxed);
        self.per_backend
            .write()
            .expect("pin counters lock")
            .remove(&backend);
        gone
    }

    /// The backend owning `key`, refreshing the pin's last use. An expired pin is removed
    /// and reported as absent.
    #[inline]
    pub fn lookup(&self, key: PinKey, now: u32) -> Option<BackendId> {
        let limits = self.limits();
        let expired = {
            let slot = self.map.get(&key)?;
            let last = slot.last_used.load(Ordering::Relaxed);
            if !limits.expired(slot.created, last, now) {
                if last != now {
                    slot.last_used.store(now, Ordering::Relaxed);
                }
                return Some(slot.backend);
            }
            true
        };
        if expired
            && let Some((_, slot)) = self.map.remove_if(&key, |_, s| {
                limits.expired(s.created, s.last_used.load(Ordering::Relaxed), now)
            })
        {
            self.dropped(slot.backend);
            self.expired.fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    /// Whether `key` has a live pin, and whether the shared store's copy of it is due for a
    /// refresh: last told `every` seconds ago or more, or before `since` (the store came
    /// back empty or missed news). Refreshes nothing but that mark.
    #[inline]
    pub fn probe(&self, key: PinKey, now: u32, every: u32, since: u32) -> Probe {
        let limits = self.limits();
        let Some(slot) = self.map.get(&key) else {
            return Probe::Absent;
        };
        if limits.expired(slot.created, slot.last_used.load(Ordering::Relaxed), now) {
            return Probe::Absent;
        }
        let shared = slot.shared.load(Ordering::Relaxed);
        if (now.saturating_sub(shared) >= every || shared < since)
            && slot
                .shared
                .compare_exchange(shared, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Probe::Due(slot.backend);
        }
        Probe::Held
    }

    /// Puts in a pin the shared store holds (another instance learned it), unless the key
    /// has a live pin here already or the table is full. `created` is clamped to `now`.
    /// Returns whether it was put in. The store is not told.
    pub fn adopt(&self, key: PinKey, backend: BackendId, created: u32, now: u32) -> bool {
        let limits = self.limits();
        if self.len.load(Ordering::Relaxed) >= limits.max_pins {
            return false;
        }
        let created = created.min(now);
        if limits.expired(created, now, now) {
            return false;
        }
        let mut added = false;
        let mut moved = None;
        self.map
            .entry(key)
            .and_modify(|slot| {
                // An expired pin not swept yet gives way.
                if limits.expired(slot.created, slot.last_used.load(Ordering::Relaxed), now) {
                    moved = Some(slot.backend);
                    *slot = Slot::new(backend, created, now, now);
                }
            })
            .or_insert_with(|| {
                added = true;
                Slot::new(backend, created, now, now)
            });
        if let Some(from) = moved {
            self.forget(from, 1);
            self.counter(backend).fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if added {
            self.len.fetch_add(1, Ordering::Relaxed);
            self.counter(backend).fetch_add(1, Ordering::Relaxed);
        }
        added
    }

    /// Follows a move another instance made: a pin held here of `key` goes to `backend`
    /// (`None`: it is dropped, its backend left). Keys not held here are left alone, so
    /// news of other instances' sessions takes no memory. Returns whether a pin changed.
    /// The store is not told.
    pub fn follow(&self, key: PinKey, backend: Option<BackendId>, now: u32) -> bool {
        match backend {
            None => self.unpin(key).is_some(),
            Some(backend) => {
                let mut from = None;
                if let Some(mut slot) = self.map.get_mut(&key)
                    && slot.backend != backend
                {
                    from = Some(slot.backend);
                    let last_used = slot.last_used.load(Ordering::Relaxed);
                    *slot = Slot::new(backend, now, last_used, now);
                }
                let Some(from) = from else {
                    return false;
                };
                self.forget(from, 1);
                self.counter(backend).fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }

    /// The pin of `key` without refreshing it.
    pub fn get(&self, key: PinKey) -> Option<Pin> {
        self.map.get(&key).map(|s| Pin {
            backend: s.backend,
            created: s.created,
            last_used: s.last_used.load(Ordering::Relaxed),
        })
    }

    /// Pins `key` to `backend`, wherever it was pinned before: the routing's word (a session
    /// redispatched off a backend that can no longer serve it). Only what a backend said, or
    /// a session tidegate already held, may reach here, never an id a client sent on its own.
    pub fn pin(&self, key: PinKey, backend: BackendId, now: u32) -> PinOutcome {
        let Ok(outcome) = self.pin_unless(key, backend, now, |_| Ok::<(), Infallible>(()));
        outcome
    }

    /// Pins `key` to `backend` as a reply taught it, unless it is pinned (and not expired)
    /// to another backend that `holds` says still holds its sessions: a reply never moves a
    /// session off the backend it lives on. `Err` names that backend. The check and the pin
    /// are one step under the shard's lock, so no concurrent pin slips between them.
    pub fn learn(
        &self,
        key: PinKey,
        backend: BackendId,
        now: u32,
        holds: impl Fn(BackendId) -> bool,
    ) -> Result<PinOutcome, BackendId> {
        self.pin_unless(key, backend, now, |owner| {
            if holds(owner) { Err(owner) } else { Ok(()) }
        })
    }

    /// Pins `key` to `backend` unless `keep` refuses to move it off the live pin of another
    /// backend.
    fn pin_unless<E>(
        &self,
        key: PinKey,
        backend: BackendId,
        now: u32,
        keep: impl Fn(BackendId) -> Result<(), E>,
    ) -> Result<PinOutcome, E> {
        let max_pins = self.limits().max_pins;
        if self.len.load(Ordering::Relaxed) >= max_pins && self.map.get(&key).is_none() {
            // The sweeper normally keeps the table below its bound; this is the backstop.
            // Below 20 pins the low-water mark is the bound itself: room is made all the same.
            self.evict_stalest(self.low_watermark().min(max_pins.saturating_sub(1)), now);
        }
        let limits = self.limits();
        let fresh = || Slot::new(backend, now, now, now);
        let mut outcome = Ok(PinOutcome::Created);
        self.map
            .entry(key)
            .and_modify(|slot| {
                if slot.backend == backend {
                    slot.last_used.store(now, Ordering::Relaxed);
                    outcome = Ok(PinOutcome::Refreshed);
                } else if let Some(Err(kept)) =
                    (!limits.expired(slot.created, slot.last_used.load(Ordering::Relaxed), now))
                        .then(|| keep(slot.backend))
                {
                    outcome = Err(kept);
                } else {
                    outcome = Ok(PinOutcome::Moved { from: slot.backend });
                    *slot = fresh();
                }
            })
            .or_insert_with(fresh);
        match outcome {
            Ok(PinOutcome::Created) => {
                self.len.fetch_add(1, Ordering::Relaxed);
                self.counter(backend).fetch_add(1, Ordering::Relaxed);
            }
            Ok(PinOutcome::Moved { from }) => {
                self.forget(from, 1);
                self.counter(backend).fetch_add(1, Ordering::Relaxed);
            }
            Ok(PinOutcome::Refreshed) | Err(_) => return outcome,
        }
        if let Some(watch) = self.watch.get() {
            let from = match outcome {
                Ok(PinOutcome::Moved { from }) => Some(from),
                _ => None,
            };
            watch.made(key, backend, now, from, limits.idle_timeout);
        }
        if self.recording.load(Ordering::Relaxed)
            && let Some((pins, made)) = self
                .recorded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
        {
            let pin = Pin {
                backend,
                created: now,
                last_used: now,
            };
            pins.push((key, pin));
            made();
        }
        outcome
    }

    /// Visits every pin (a shard at a time: requests wait at most for one shard).
    pub fn for_each_pin(&self, mut visit: impl FnMut(PinKey, Pin)) {
        for entry in self.map.iter() {
            let slot = entry.value();
            visit(
                *entry.key(),
                Pin {
                    backend: slot.backend,
                    created: slot.created,
                    last_used: slot.last_used.load(Ordering::Relaxed),
                },
            );
        }
    }

    /// Puts back a pin read from the state file, with its times, unless it has expired by
    /// now, the table is full, or the key is pinned already (a pin learned since the start
    /// wins).
    pub fn restore(&self, key: PinKey, pin: Pin, now: u32) -> Restored {
        let limits = self.limits();
        if limits.expired(pin.created, pin.last_used, now) {
            return Restored::Expired;
        }
        if self.len.load(Ordering::Relaxed) >= limits.max_pins {
            return Restored::Full;
        }
        let mut added = false;
        // Times from a clock that ran ahead (or a file edited) are taken as now: a pin from
        // the future would outlive its idle timeout and lifetime.
        let (created, last_used) = (pin.created.min(now), pin.last_used.min(now));
        self.map.entry(key).or_insert_with(|| {
            added = true;
            Slot::new(pin.backend, created, last_used, last_used)
        });
        if !added {
            return Restored::Present;
        }
        self.len.fetch_add(1, Ordering::Relaxed);
        self.counter(pin.backend).fetch_add(1, Ordering::Relaxed);
        Restored::Yes
    }

    /// Removes the pin of `key`, if any.
    pub fn unpin(&self, key: PinKey) -> Option<Pin> {
        let (_, slot) = self.map.remove(&key)?;
        self.dropped(slot.backend);
        Some(Pin {
            backend: slot.backend,
            created: slot.created,
            last_used: slot.last_used.into_inner(),
        })
    }

    /// Number of pins held (expired ones count until swept).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether the table holds no pin.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pins held for `backend`.
    pub fn pins_of(&self, backend: BackendId) -> u64 {
        self.per_backend
            .read()
            .expect("pin counters lock")
            .get(&backend)
            .map_or(0, |c| c.load(Ordering::Relaxed).max(0) as u64)
    }

    /// Removes expired pins, then evicts the stalest if the table is above its high-water
    /// mark. Walks one shard at a time, so a request waits at most for one shard.
    pub fn sweep(&self, now: u32) -> Removed {
        let mut removed = Removed::default();
        let mut gone: HashMap<BackendId, i64> = HashMap::new();
        let limits = self.limits();
        self.map.retain(|_, slot| {
            let keep = !limits.expired(slot.created, slot.last_used.load(Ordering::Relaxed), now);
            if !keep {
                *gone.entry(slot.backend).or_default() += 1;
                removed.expired += 1;
            }
            keep
        });
        self.settle(&gone, removed.expired);
        self.expired
            .fetch_add(removed.expired as u64, Ordering::Relaxed);
        removed.evicted = self.trim(now);
        removed
    }

    /// Whether the table is above its high-water mark (98 % of the bound) and should be
    /// trimmed; an O(1) check.
    pub fn needs_trim(&self) -> bool {
        self.len() > self.high_watermark()
    }

    /// Evicts the stalest pins down to the low-water mark (95 % of the bound) if the table is
    /// above its high-water mark. Returns how many were evicted.
    pub fn trim(&self, now: u32) -> usize {
        if self.needs_trim() {
            self.evict_stalest(self.low_watermark(), now)
        } else {
            0
        }
    }

    /// Evicts the least recently used pins until at most `target` remain (ages are compared
    /// at 1/1024 of the idle timeout). Returns how many were evicted.
    pub fn evict_stalest(&self, target: usize, now: u32) -> usize {
        let len = self.len();
        if len <= target {
            return 0;
        }
        // Pass 1: histogram of ages since last use.
        let span = self.limits().idle_timeout.max(1) as u64;
        let bucket_of = |last_used: u32| -> usize {
            let age = u64::from(now.saturating_sub(last_used)).min(span);
            ((age * (AGE_BUCKETS as u64 - 1)) / span) as usize
        };
        let mut histogram = vec![0usize; AGE_BUCKETS];
        for slot in self.map.iter() {
            histogram[bucket_of(slot.last_used.load(Ordering::Relaxed))] += 1;
        }
        // The youngest buckets that fit in `target` stay, older buckets go, and the bucket
        // straddling the cut-off gives up just enough pins to reach the target.
        let mut kept = 0;
        let mut cutoff = AGE_BUCKETS;
        let mut cutoff_quota = 0;
        for (bucket, &count) in histogram.iter().enumerate() {
            if kept + count > target {
                cutoff = bucket;
                cutoff_quota = kept + count - target;
                break;
            }
            kept += count;
        }
        // Pass 2: drop every pin older than the cut-off bucket, and the quota of that bucket.
        let mut gone: HashMap<BackendId, i64> = HashMap::new();
        let mut evicted = 0;
        self.map.retain(|_, slot| {
            let bucket = bucket_of(slot.last_used.load(Ordering::Relaxed));
            let keep = bucket < cutoff
                || (bucket == cutoff && {
                    let spare = cutoff_quota == 0;
                    cutoff_quota = cutoff_quota.saturating_sub(1);
                    spare
                });
            if !keep {
                *gone.entry(slot.backend).or_default() += 1;
                evicted += 1;
            }
            keep
        });
        self.settle(&gone, evicted);
        self.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
        evicted
    }

    /// Pins expired since start (by lookups and sweeps).
    pub fn expired_total(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }

    /// Pins evicted to keep the bound since start.
    pub fn evicted_total(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Above this many pins the sweeper evicts.
    fn high_watermark(&self) -> usize {
        let max = self.limits().max_pins;
        max - max / 50
    }

    /// Eviction brings the table down to this many pins.
    fn low_watermark(&self) -> usize {
        let max = self.limits().max_pins;
        max - max / 20
    }

    fn counter(&self, backend: BackendId) -> Arc<AtomicI64> {
        if let Some(c) = self
            .per_backend
            .read()
            .expect("pin counters lock")
            .get(&backend)
        {
            return c.clone();
        }
        self.per_backend
            .write()
            .expect("pin counters lock")
            .entry(backend)
            .or_default()
            .clone()
    }

    fn forget(&self, backend: BackendId, n: i64) {
        if let Some(c) = self
            .per_backend
            .read()
            .expect("pin counters lock")
            .get(&backend)
        {
            c.fetch_sub(n, Ordering::Relaxed);
        }
    }

    fn dropped(&self, backend: BackendId) {
        self.forget(backend, 1);
        self.len.fetch_sub(1, Ordering::Relaxed);
    }

    fn settle(&self, gone: &HashMap<BackendId, i64>, total: usize) {
        for (&backend, &n) in gone {
            self.forget(backend, n);
        }
        self.len.fetch_sub(total, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: BackendId = BackendId(1);
    const B: BackendId = BackendId(2);

    fn table(max_pins: usize) -> AffinityTable {
        AffinityTable::new(TableLimits {
            idle_timeout: 100,
            max_lifetime: 1000,
            max_pins,
        })
    }

    #[test]
    fn pinned_id_is_found_and_unknown_is_not() {
        let t = table(10);
        assert_eq!(t.pin(PinKey::of("s1"), A, 0), PinOutcome::Created);
        assert_eq!(t.lookup(PinKey::of("s1"), 1), Some(A));
        assert_eq!(t.lookup(PinKey::of("s2"), 1), None);
        assert_eq!(t.len(), 1);
        assert_eq!(t.pins_of(A), 1);
    }

    /// What a watch was told.
    #[derive(Default)]
    struct Told(Mutex<Vec<String>>);

    impl PinWatch for Told {
        fn made(
            &self,
            key: PinKey,
            backend: BackendId,
            now: u32,
            from: Option<BackendId>,
            ttl: u32,
        ) {
            let key = if key == PinKey::of("s1") {
                "s1"
            } else {
                "other"
            };
            self.0.lock().unwrap().push(format!(
                "{key}->{} at {now} from {:?} ttl {ttl}",
                backend.0,
                from.map(|b| b.0)
            ));
        }
        fn dropped(&self, keys: &[PinKey]) {
            self.0
                .lock()
                .unwrap()
                .push(format!("dropped {}", keys.len()));
        }
    }

    #[test]
    fn a_watch_is_told_of_pins_made_and_dropped_and_not_of_the_stores_own() {
        let t = table(10);
        let told = Arc::new(Told::default());
        assert!(t.watch(told.clone()));
        assert!(!t.watch(told.clone()), "one store for the table's life");
        t.pin(PinKey::of("s1"), A, 1);
        t.pin(PinKey::of("s1"), A, 2); // a use: nothing to tell
        t.pin(PinKey::of("s1"), B, 3);
        assert_eq!(
            t.learn(PinKey::of("s1"), A, 4, |_| true),
            Err(B),
            "refused: nothing to tell"
        );
        // What the store itself brought is not told back to it.
        assert!(t.adopt(PinKey::of("s2"), A, 0, 5));
        assert!(t.follow(PinKey::of("s1"), Some(A), 6));
        t.unpin_backend(A);
        assert_eq!(
            *told.0.lock().unwrap(),
            [
                "s1->1 at 1 from None ttl 100",
                "s1->2 at 3 from Some(1) ttl 100",
                "dropped 2",
            ]
        );
    }

    #[test]
    fn a_probe_finds_live_pins_and_says_when_the_store_is_due_once() {
        let t = table(10);
        let key = PinKey::of("s1");
        assert_eq!(t.probe(key, 0, 25, 0), Probe::Absent);
        t.pin(key, A, 10);
        assert_eq!(t.probe(key, 20, 25, 0), Probe::Held);
        assert_eq!(
            t.probe(key, 35, 25, 0),
            Probe::Due(A),
            "25 s after it was told"
        );
        assert_eq!(
            t.probe(key, 36, 25, 0),
            Probe::Held,
            "one request of many asks"
        );
        // The store came back at 40: every pin told before is due at its next use.
        assert_eq!(t.probe(key, 41, 25, 40), Probe::Due(A));
        assert_eq!(t.probe(key, 42, 25, 40), Probe::Held);
        // An expired pin is absent, whatever the store says.
        assert_eq!(t.probe(key, 41 + 100, 25, 0), Probe::Absent);
    }

    #[test]
    fn an_adopted_pin_never_displaces_a_live_one_and_respects_the_bound() {
        let t = table(2);
        let key = PinKey::of("s1");
        assert!(t.adopt(key, A, 5, 10));
        assert_eq!(t.get(key).map(|p| (p.backend, p.created)), Some((A, 5)));
        assert!(!t.adopt(key, B, 5, 11), "the live pin stays");
        assert_eq!(t.lookup(key, 11), Some(A));
        // Created in the future: taken as now. Past its lifetime: not adopted.
        assert!(t.adopt(PinKey::of("s2"), B, 99, 12));
        assert_eq!(t.get(PinKey::of("s2")).unwrap().created, 12);
        assert!(!t.adopt(PinKey::of("s3"), B, 12, 2000), "table full");
        t.unpin(PinKey::of("s2"));
        assert!(!t.adopt(PinKey::of("s3"), B, 0, 1000), "past max_lifetime");
        // An expired pin not swept yet gives way.
        assert!(t.adopt(key, B, 200, 200));
        assert_eq!((t.pins_of(A), t.pins_of(B), t.len()), (0, 1, 1));
    }

    #[test]
    fn following_moves_only_pins_held_here() {
        let t = table(10);
        let key = PinKey::of("s1");
        assert!(
            !t.follow(key, Some(B), 1),
            "not held: news of others takes no memory"
        );
        assert!(t.is_empty());
        t.pin(key, A, 1);
        assert!(!t.follow(key, Some(A), 2), "already there");
        assert!(t.follow(key, Some(B), 3));
        assert_eq!(
            (t.lookup(key, 4), t.pins_of(A), t.pins_of(B)),
            (Some(B), 0, 1)
        );
        assert!(t.follow(key, None, 5));
        assert!(t.is_empty());
    }

    #[test]
    fn a_restored_pin_from_the_future_is_taken_as_made_now() {
        let t = table(10);
        let key = PinKey::of("ahead");
        let pin = Pin {
            backend: A,
            created: 5_000,
            last_used: 5_000,
        };
        assert_eq!(t.restore(key, pin, 1_000), Restored::Yes);
        let got = t.get(key).unwrap();
        assert_eq!((got.created, got.last_used), (1_000, 1_000));
        // It idles out on time (idle timeout 100), not 4000 s later.
        assert_eq!(t.lookup(key, 1_101), None);
    }

    #[test]
    fn repinning_moves_and_counts_follow() {
        let t = table(10);
        t.pin(PinKey::of("s1"), A, 0);
        assert_eq!(t.pin(PinKey::of("s1"), A, 5), PinOutcome::Refreshed);
        assert_eq!(t.pin(PinKey::of("s1"), B, 6), PinOutcome::Moved { from: A });
        assert_eq!((t.pins_of(A), t.pins_of(B), t.len()), (0, 1, 1));
        assert_eq!(t.unpin(PinKey::of("s1")).map(|p| p.backend), Some(B));
        assert_eq!((t.pins_of(B), t.len()), (0, 0));
    }

    #[test]
    fn a_recording_keeps_the_pins_made_until_taken_and_rings_for_each() {
        let t = table(10);
        t.pin(PinKey::of("before"), A, 0);
        assert!(
            t.recorded().is_empty(),
            "nothing is kept while not recording"
        );
        let rung = Arc::new(AtomicUsize::new(0));
        let bell = rung.clone();
        t.record(Some(Arc::new(move || {
            bell.fetch_add(1, Ordering::Relaxed);
        })));
        t.pin(PinKey::of("new"), A, 3);
        t.pin(PinKey::of("new"), A, 4); // a use: the successor has it already
        t.pin(PinKey::of("before"), B, 5); // moved
        let pin = |backend, at| Pin {
            backend,
            created: at,
            last_used: at,
        };
        assert_eq!(
            t.recorded(),
            vec![
                (PinKey::of("new"), pin(A, 3)),
                (PinKey::of("before"), pin(B, 5))
            ]
        );
        assert_eq!(rung.load(Ordering::Relaxed), 2);
        assert!(t.recorded().is_empty(), "taken once");
        t.pin(PinKey::of("later"), A, 6);
        t.record(None);
        assert!(t.recorded().is_empty(), "stopping drops what was kept");
        t.pin(PinKey::of("after"), A, 7);
        assert!(t.recorded().is_empty());
        assert_eq!(rung.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_reply_moves_no_live_pin_of_a_backend_that_holds_it() {
        let t = table(10);
        let k = PinKey::of("s1");
        assert_eq!(t.learn(k, A, 0, |_| true), Ok(PinOutcome::Created));
        assert_eq!(t.learn(k, A, 1, |_| true), Ok(PinOutcome::Refreshed));
        assert_eq!(t.learn(k, B, 2, |_| true), Err(A), "A holds its session");
        assert_eq!(t.get(k).map(|p| p.backend), Some(A));
        assert_eq!((t.pins_of(A), t.pins_of(B), t.len()), (1, 0, 1));
        // A backend that no longer holds it (it left the pool) lets it go.
        assert_eq!(
            t.learn(k, B, 3, |owner| owner != A),
            Ok(PinOutcome::Moved { from: A })
        );
        assert_eq!((t.pins_of(A), t.pins_of(B), t.len()), (0, 1, 1));
        // An expired pin holds nothing.
        assert_eq!(
            t.learn(k, A, 10_000, |_| true),
            Ok(PinOutcome::Moved { from: B })
        );
        // The routing's own move (a redispatch) is not refused.
        assert_eq!(t.pin(k, B, 10_001), PinOutcome::Moved { from: A });
    }

    #[test]
    fn idle_pin_expires_and_use_keeps_it_alive() {
        let t = table(10);
        t.pin(PinKey::of("busy"), A, 0);
        t.pin(PinKey::of("idle"), A, 0);
        for now in (50..=450).step_by(50) {
            assert_eq!(t.lookup(PinKey::of("busy"), now), Some(A), "at {now}");
        }
        assert_eq!(t.lookup(PinKey::of("idle"), 450), None);
        assert_eq!(t.len(), 1, "the lazy lookup removed the expired pin");
        assert_eq!(t.pins_of(A), 1);
    }

    #[test]
    fn absolute_lifetime_ends_even_a_busy_pin() {
        let t = table(10);
        t.pin(PinKey::of("s"), A, 0);
        for now in (50..1000).step_by(50) {
            assert_eq!(t.lookup(PinKey::of("s"), now), Some(A));
        }
        assert_eq!(t.lookup(PinKey::of("s"), 1000), None);
    }

    #[test]
    fn sweep_removes_only_expired_pins() {
        let t = table(100);
        for i in 0..10 {
            t.pin(PinKey::of(&format!("old{i}")), A, 0);
            t.pin(PinKey::of(&format!("new{i}")), B, 60);
        }
        let removed = t.sweep(120);
        assert_eq!(
            removed,
            Removed {
                expired: 10,
                evicted: 0
            }
        );
        assert_eq!((t.len(), t.pins_of(A), t.pins_of(B)), (10, 0, 10));
    }

    #[test]
    fn table_never_exceeds_its_bound_and_evicts_the_stalest() {
        let t = table(1000);
        for i in 0..1000u32 {
            t.pin(PinKey::of(&format!("s{i}")), A, i / 20);
        }
        assert_eq!(t.len(), 1000);
        // The newest pins (used at second 50) must survive the eviction that the next
        // insert triggers; the oldest must go.
        t.pin(PinKey::of("newest"), B, 50);
        assert!(t.len() <= 1000);
        assert!(t.len() >= 900, "eviction removed far too much: {}", t.len());
        assert_eq!(t.lookup(PinKey::of("newest"), 50), Some(B));
        assert_eq!(t.lookup(PinKey::of("s999"), 50), Some(A));
        assert_eq!(t.get(PinKey::of("s0")), None);
        assert_eq!(t.pins_of(A) + t.pins_of(B), t.len() as u64);
    }

    #[test]
    fn a_table_of_fewer_than_twenty_pins_keeps_its_bound() {
        // Found by the property test below: the low-water mark of a small table is its
        // bound, so the backstop evicted nothing and the new pin made one too many.
        for max_pins in [1, 2, 19] {
            let t = table(max_pins);
            for i in 0..=max_pins as u32 {
                t.pin(PinKey::of(&format!("s{i}")), A, i);
            }
            assert_eq!(t.len(), max_pins, "bound {max_pins}");
            let newest = format!("s{max_pins}");
            assert_eq!(t.lookup(PinKey::of(&newest), max_pins as u32), Some(A));
            assert_eq!(t.get(PinKey::of("s0")), None, "the stalest went");
        }
    }

    #[test]
    fn eviction_of_pins_all_the_same_age_stops_at_the_target() {
        let t = table(1000);
        for i in 0..1000u32 {
            t.pin(PinKey::of(&format!("s{i}")), A, 7);
        }
        assert_eq!(t.evict_stalest(950, 7), 50);
        assert_eq!((t.len(), t.pins_of(A)), (950, 950));
    }

    #[test]
    fn sweep_evicts_above_the_high_water_mark() {
        let t = table(100);
        for i in 0..99u32 {
            t.pin(PinKey::of(&format!("s{i}")), A, i);
        }
        let removed = t.sweep(99);
        assert_eq!(removed.expired, 0);
        assert!(removed.evicted >= 4);
        assert!(t.len() <= 95);
        assert!(t.get(PinKey::of("s98")).is_some());
    }

    /// One step of a table's life, for the property tests.
    #[derive(Clone, Debug)]
    enum Op {
        Pin { key: u8, backend: u8 },
        Lookup { key: u8 },
        Unpin { key: u8 },
        Sweep,
    }

    fn op() -> impl Strategy<Value = (Op, u32)> {
        let op = prop_oneof![
            4 => (0u8..48, 0u8..3).prop_map(|(key, backend)| Op::Pin { key, backend }),
            4 => (0u8..48).prop_map(|key| Op::Lookup { key }),
            1 => (0u8..48).prop_map(|key| Op::Unpin { key }),
            1 => Just(Op::Sweep),
        ];
        // Time steps of up to half the idle timeout, so pins both live and expire.
        (op, 0u32..50)
    }

    fn key(k: u8) -> PinKey {
        PinKey::of(&format!("session-{k}"))
    }

    /// Pins and per-backend counts as the table holds them, walked one by one.
    fn walked(t: &AffinityTable) -> (usize, HashMap<BackendId, u64>) {
        let mut n = 0;
        let mut per: HashMap<BackendId, u64> = HashMap::new();
        t.for_each_pin(|_, pin| {
            n += 1;
            *per.entry(pin.backend).or_default() += 1;
        });
        (n, per)
    }

    proptest! {
        /// Whatever happens, the table holds at most `max_pins`, and its count and every
        /// backend's count agree with the pins it holds.
        #[test]
        fn the_bound_holds_and_counts_agree(
            max_pins in 1usize..40,
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let t = table(max_pins);
            let mut now = 0;
            for (op, step) in ops {
                now += step;
                match op {
                    Op::Pin { key: k, backend } => {
                        t.pin(key(k), BackendId(u32::from(backend)), now);
                    }
                    Op::Lookup { key: k } => {
                        t.lookup(key(k), now);
                    }
                    Op::Unpin { key: k } => {
                        t.unpin(key(k));
                    }
                    Op::Sweep => {
                        t.sweep(now);
                    }
                }
                let (n, per) = walked(&t);
                prop_assert!(t.len() <= max_pins, "{} pins held, bound {max_pins}", t.len());
                prop_assert_eq!(t.len(), n);
                for b in 0..3 {
                    let b = BackendId(b);
                    prop_assert_eq!(t.pins_of(b), per.get(&b).copied().unwrap_or(0));
                }
            }
        }

        /// Against a model of pins with their times: a lookup finds exactly the pins neither
        /// idle nor too old, refreshing them; a pin is created, moved (a new life) or
        /// refreshed as the model says; a sweep leaves exactly the live pins.
        #[test]
        fn expiry_follows_idle_time_and_lifetime(
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let t = table(10_000);
            let limits = t.limits();
            // key → (backend, created, last used)
            let mut model: HashMap<u8, (BackendId, u32, u32)> = HashMap::new();
            let mut now = 0;
            for (op, step) in ops {
                now += step;
                let live = |&(_, created, last): &(BackendId, u32, u32)| {
                    now - last < limits.idle_timeout && now - created < limits.max_lifetime
                };
                match op {
                    Op::Pin { key: k, backend } => {
                        let backend = BackendId(u32::from(backend));
                        let expected = match model.get(&k) {
                            None => PinOutcome::Created,
                            Some(&(b, _, _)) if b == backend => PinOutcome::Refreshed,
                            Some(&(from, _, _)) => PinOutcome::Moved { from },
                        };
                        prop_assert_eq!(t.pin(key(k), backend, now), expected);
                        let entry = model.entry(k).or_insert((backend, now, now));
                        if expected == PinOutcome::Refreshed {
                            entry.2 = now;
                        } else {
                            *entry = (backend, now, now);
                        }
                    }
                    Op::Lookup { key: k } => {
                        let expected = model.get(&k).filter(|p| live(p)).map(|p| p.0);
                        prop_assert_eq!(t.lookup(key(k), now), expected, "key {} at {}", k, now);
                        match expected {
                            Some(_) => model.get_mut(&k).expect("in the model").2 = now,
                            None => {
                                model.remove(&k);
                            }
                        }
                    }
                    Op::Unpin { key: k } => {
                        let expected = model.remove(&k).map(|p| p.0);
                        prop_assert_eq!(t.unpin(key(k)).map(|p| p.backend), expected);
                    }
                    Op::Sweep => {
                        let before = model.len();
                        model.retain(|_, p| live(p));
                        let removed = t.sweep(now);
                        prop_assert_eq!(removed.expired, before - model.len());
                        prop_assert_eq!(removed.evicted, 0);
                    }
                }
                prop_assert_eq!(t.len(), model.len());
            }
        }

        /// Eviction drops the least recently used pins first, down to exactly its target.
        /// (With an idle timeout of 1023 s, the age buckets are whole seconds, so the order
        /// is exact.)
        #[test]
        fn eviction_drops_the_least_recently_used_first(
            ages in proptest::collection::vec(0u32..1023, 1..300),
            target_share in 0.0f64..1.0,
        ) {
            let now = 5_000;
            let t = AffinityTable::new(TableLimits {
                idle_timeout: 1023,
                max_lifetime: 100_000,
                max_pins: 1000,
            });
            for (i, age) in ages.iter().enumerate() {
                let used = now - age;
                let pin = Pin { backend: BackendId(i as u32 % 3), created: used, last_used: used };
                prop_assert_eq!(t.restore(PinKey::from_parts([i as u64, 0]), pin, now), Restored::Yes);
            }
            let target = (ages.len() as f64 * target_share) as usize;
            let evicted = t.evict_stalest(target, now);
            prop_assert_eq!(evicted, ages.len() - target);
            prop_assert_eq!(t.len(), target);
            prop_assert_eq!(t.evicted_total(), evicted as u64);
            let mut kept = vec![false; ages.len()];
            t.for_each_pin(|key, _| kept[key.parts()[0] as usize] = true);
            let oldest_kept = ages.iter().zip(&kept).filter(|(_, k)| **k).map(|(a, _)| *a).max();
            let youngest_gone = ages.iter().zip(&kept).filter(|(_, k)| !**k).map(|(a, _)| *a).min();
            if let (Some(kept), Some(gone)) = (oldest_kept, youngest_gone) {
                prop_assert!(kept <= gone, "a pin used {gone} s ago went, one used {kept} s ago stayed");
            }
            let (n, per) = walked(&t);
            prop_assert_eq!(n, target);
            for b in 0..3 {
                let b = BackendId(b);
                prop_assert_eq!(t.pins_of(b), per.get(&b).copied().unwrap_or(0));
            }
        }

        #[test]
        fn lookups_of_unknown_ids_never_change_the_table(ids in proptest::collection::vec("[A-Za-z0-9]{1,40}", 1..200)) {
            let t = table(1000);
            t.pin(PinKey::of("known"), A, 0);
            for id in &ids {
                if id != "known" {
                    prop_assert_eq!(t.lookup(PinKey::of(id), 1), None);
                }
            }
            prop_assert_eq!(t.len(), 1);
        }
    }
}
