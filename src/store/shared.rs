//! Pins shared through Redis (or Valkey), so that several tidegate instances are one front
//! door: a session learned through one is routed by the others.
//!
//! The local table stays the first place a lookup goes and the only one a request with a
//! known session touches. The store is the shared truth behind it:
//! - every pin a table makes is written through ([`PinWatch`]), with the pool's idle timeout
//!   as its TTL, in batches by one writer task (bounded: a store that is down loses writes,
//!   never memory);
//! - a local miss for a well-formed id asks the store for at most `timeout` before the
//!   request goes on as a new session ([`SharedPins::consult`]);
//! - a pin in use is refreshed at most once per quarter of the idle timeout, and the refresh
//!   also checks the store still agrees (a move this instance missed is followed);
//! - moves and removals are published on a channel every instance follows, for the pins it
//!   holds;
//! - while the store is down, lookups skip it and a probe task watches for its return; from
//!   then every pin used is written again (`SET NX`), which refills a restarted Redis.
//!
//! Keys never hold a session id: a pin's key is its 128-bit table key encrypted with
//! AES-128 under a key derived from the store secret, a keyed one-way function of the id to
//! anyone without the secret, which the instances can turn back into the table key when
//! another announces a move. Backends are named by their configured name.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aes::Aes128;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{Semaphore, mpsc};

use crate::clock;
use crate::config::{StoreConfig, redacted_url};
use crate::core::affinity::{AffinityTable, PinKey, PinWatch, Probe};
use crate::core::backend::BackendId;
use crate::core::pool::Pool;
use crate::core::registry::Registry;
use crate::shutdown::Signal;

/// The key secret used when none is configured: keys still never hold an id, but anyone who
/// knows an id and reads the store can find its pin. A warning says so at start.
const BUILT_IN_SECRET: &[u8] = b"tidegate: no [store] secret configured";

/// Lookups that may wait for the store at once; more go on as misses at once (a flood of
/// forged ids costs the store no more than this many requests in flight).
const LOOKUPS_IN_FLIGHT: usize = 1024;

/// Writes sent to the store in one round trip at most.
const BATCH: usize = 512;

/// How long a batch of writes, a probe or a subscription may take.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(1);

/// Time between probes of the store.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How the store answered one lookup, as the metrics label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// It held a pin of a known backend: adopted.
    Found,
    /// It held none.
    Missing,
    /// It held a pin of a backend this instance does not have.
    UnknownBackend,
    /// No answer within `timeout`.
    Timeout,
    /// It answered with an error, or something that is not a pin.
    Error,
    /// Not asked: the store is down, or too many lookups wait already.
    Skipped,
}

impl Lookup {
    /// Every outcome, in label order.
    pub const ALL: [Lookup; 6] = [
        Lookup::Found,
        Lookup::Missing,
        Lookup::UnknownBackend,
        Lookup::Timeout,
        Lookup::Error,
        Lookup::Skipped,
    ];

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Found => "found",
            Lookup::Missing => "missing",
            Lookup::UnknownBackend => "unknown-backend",
            Lookup::Timeout => "timeout",
            Lookup::Error => "error",
            Lookup::Skipped => "skipped",
        }
    }
}

/// What the store was told, as the metrics label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// A new pin.
    Pin,
    /// A pin moved to another backend (published).
    Move,
    /// A pin dropped with its backend (published).
    Drop,
    /// A pin in use: its TTL renewed, its backend checked.
    Refresh,
    /// A pin in use the store had lost (restarted, or expired meanwhile), written again.
    Refill,
}

impl WriteKind {
    /// Every kind, in label order.
    pub const ALL: [WriteKind; 5] = [
        WriteKind::Pin,
        WriteKind::Move,
        WriteKind::Drop,
        WriteKind::Refresh,
        WriteKind::Refill,
    ];

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::Pin => "pin",
            WriteKind::Move => "move",
            WriteKind::Drop => "drop",
            WriteKind::Refresh => "refresh",
            WriteKind::Refill => "refill",
        }
    }
}

/// The store's counters, read by the metrics.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Lookups by [`Lookup`] outcome.
    pub lookups: [AtomicU64; 6],
    /// Writes done, by [`WriteKind`].
    pub writes: [AtomicU64; 5],
    /// Writes lost: the queue was full (`max_pending`) or the store failed them.
    pub writes_dropped_full: AtomicU64,
    /// Writes lost because the store failed or timed out.
    pub writes_dropped_failed: AtomicU64,
    /// Moves and removals of other instances followed here.
    pub followed: AtomicU64,
    /// Pins named by the store (moves, refresh checks) for a backend this instance does not
    /// have: dropped here, as misses.
    pub unknown_backend: AtomicU64,
    /// Times the store went from up to down.
    pub degraded: AtomicU64,
    /// Lookup wait, in microseconds, summed; with `lookups` it gives the mean.
    pub lookup_micros: AtomicU64,
}

impl StoreStats {
    fn lookup(&self, outcome: Lookup, waited: Duration) {
        self.lookups[outcome as usize].fetch_add(1, Ordering::Relaxed);
        self.lookup_micros
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
    }

    fn wrote(&self, kind: WriteKind, n: u64) {
        self.writes[kind as usize].fetch_add(n, Ordering::Relaxed);
    }
}

/// One write for the store, queued by the request path and sent by the writer task.
enum Write {
    /// `key` is pinned to `backend` (`moved`: it was pinned elsewhere before).
    Pin {
        pool: Arc<str>,
        key: PinKey,
        backend: Box<str>,
        created: u32,
        ttl: u32,
        moved: bool,
    },
    /// `key` went with its backend.
    Drop { pool: Arc<str>, key: PinKey },
    /// `key`, pinned here to `backend`, is in use.
    Refresh {
        pool: Arc<str>,
        key: PinKey,
        backend: Box<str>,
        ttl: u32,
    },
}

/// The key cipher: a table key in, the store's key out, and back.
struct KeyCipher(Aes128);

impl KeyCipher {
    fn new(secret: &[u8]) -> Self {
        let digest = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &[b"tidegate store key v1\0".as_slice(), secret].concat(),
        );
        let key: [u8; 16] = digest.as_ref()[..16].try_into().expect("16 of 32 bytes");
        KeyCipher(Aes128::new(&key.into()))
    }

    /// The 32 hex digits naming `key` in the store.
    fn seal(&self, key: PinKey) -> [u8; 32] {
        let [a, b] = key.parts();
        let mut block = [0u8; 16];
        block[..8].copy_from_slice(&a.to_le_bytes());
        block[8..].copy_from_slice(&b.to_le_bytes());
        let mut block = block.into();
        self.0.encrypt_block(&mut block);
        let mut hex = [0u8; 32];
        for (i, byte) in block.iter().enumerate() {
            hex[2 * i] = HEX[usize::from(byte >> 4)];
            hex[2 * i + 1] = HEX[usize::from(byte & 15)];
        }
        hex
    }

    /// The table key named by 32 hex digits, if they are.
    fn open(&self, hex: &[u8]) -> Option<PinKey> {
        if hex.len() != 32 {
            return None;
        }
        let mut block = [0u8; 16];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
            block[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        let mut block = block.into();
        self.0.decrypt_block(&mut block);
        let a = u64::from_le_bytes(block[..8].try_into().ok()?);
        let b = u64::from_le_bytes(block[8..].try_into().ok()?);
        Some(PinKey::from_parts([a, b]))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A pin as the store holds it: `created:backend`.
fn pin_value(created: u32, backend: &str) -> String {
    format!("{created}:{backend}")
}

/// The creation time and backend name of a stored pin, if it is one.
fn parse_value(value: &[u8]) -> Option<(u32, &str)> {
    let text = std::str::from_utf8(value).ok()?;
    let (created, backend) = text.split_once(':')?;
    let created = created.parse().ok()?;
    (!backend.is_empty()).then_some((created, backend))
}

/// The shared store of one tidegate process.
pub struct SharedPins {
    client: redis::Client,
    conn: ConnectionManager,
    cipher: KeyCipher,
    prefix: Box<str>,
    channel: String,
    timeout: Duration,
    /// This process (random hex), the first line of the messages it publishes: it skips
    /// its own.
    instance: Box<str>,
    writes: mpsc::Sender<Write>,
    asking: Semaphore,
    up: AtomicBool,
    /// Unix seconds since which every pin's copy in the store is suspect (the store came
    /// back, or news of moves may have been missed): refreshed at its next use.
    since: AtomicU32,
    /// Since when and why it is down.
    down_since: std::sync::Mutex<Option<(Instant, String)>>,
    /// Whether it answered once (the first answer is "connected", later ones "recovered").
    answered: AtomicBool,
    /// The queue's receiving end, until [`SharedPins::run`] takes it.
    queued: std::sync::Mutex<Option<Writes>>,
    /// Counters for the metrics.
    pub stats: StoreStats,
}

/// Why the store could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("[store] redis = {url}: {reason}")]
pub struct StoreError {
    url: String,
    reason: String,
}

/// The queue of writes, as the writer task reads it.
type Writes = mpsc::Receiver<Write>;

impl SharedPins {
    /// Connects to the store (waiting at most a second: a store that is down does not stop
    /// the start, it is degraded until it answers). [`SharedPins::run`] then keeps it.
    pub async fn connect(config: &StoreConfig) -> Result<Arc<SharedPins>, StoreError> {
        let failed = |reason: String| StoreError {
            url: redacted_url(&config.url),
            reason,
        };
        let mut info = redis::IntoConnectionInfo::into_connection_info(config.url.as_str())
            .map_err(|e| failed(e.to_string()))?;
        if info.redis_settings().password().is_none()
            && let Ok(password) = std::env::var("REDIS_PASSWORD")
            && !password.is_empty()
        {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = match &config.ca_file {
            None => redis::Client::open(info),
            Some(file) => {
                let root = std::fs::read(file)
                    .map_err(|e| failed(format!("ca_file {}: {e}", file.display())))?;
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root),
                };
                redis::Client::build_with_tls(info, certificates)
            }
        }
        .map_err(|e| failed(e.to_string()))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OPERATION_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager)
            .map_err(|e| failed(e.to_string()))?;
        let secret = config.secret.clone().or_else(|| {
            std::env::var("TIDEGATE_STORE_SECRET")
                .ok()
                .filter(|s| !s.is_empty())
                .map(String::into_bytes)
        });
        if secret.is_none() {
            tracing::warn!(
                "[store] has no secret (nor TIDEGATE_STORE_SECRET): its keys are derived with a built-in one, so anyone who reads the store and knows a session id can find its pin; set the same secret on every instance"
            );
        }
        let (writes, queued) = mpsc::channel(config.max_pending);
        let shared = Arc::new(SharedPins {
            client,
            conn,
            cipher: KeyCipher::new(secret.as_deref().unwrap_or(BUILT_IN_SECRET)),
            prefix: config.prefix.clone().into(),
            channel: format!("{}:moves", config.prefix),
            timeout: config.timeout,
            instance: format!("{:x}", rand::random::<u64>()).into(),
            writes,
            asking: Semaphore::new(LOOKUPS_IN_FLIGHT),
            up: AtomicBool::new(false),
            since: AtomicU32::new(0),
            down_since: std::sync::Mutex::new(Some((Instant::now(), String::new()))),
            answered: AtomicBool::new(false),
            queued: std::sync::Mutex::new(Some(queued)),
            stats: StoreStats::default(),
        });
        shared.probe().await;
        if !shared.is_up() {
            let why = shared
                .down_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|(_, why)| why.clone())
                .unwrap_or_default();
            tracing::warn!(
                store = %redacted_url(&config.url),
                "shared store not reachable at start ({why}): serving from the local table, pins are shared once it answers"
            );
        }
        Ok(shared)
    }

    /// Keeps the store until `stop`: the writer, the follower of other instances' news, and
    /// the probe that notices the store going and coming back.
    pub async fn run(self: Arc<Self>, registry: Arc<Registry>, stop: Signal) {
        let Some(queued) = self.queued.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        tokio::join!(
            self.clone().write(queued, registry.clone(), stop.clone()),
            self.clone().follow(registry, stop.clone()),
            self.watch_health(stop),
        );
    }

    /// Whether the store answers.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Watches every pool's table that has no watch yet (at start, and after a reload
    /// added pools).
    pub fn attach(self: &Arc<Self>, registry: &Registry) {
        for pool in registry.topology().pools.iter() {
            if let Some(table) = pool.table()
                && !table.watched()
            {
                table.watch(Arc::new(PoolWatch {
                    shared: self.clone(),
                    pool: Arc::from(&*pool.name),
                    backends: pool.backend_handle(),
                }));
            }
        }
    }

    /// Before a request of `pool` naming `key` is routed: a local miss asks the store (for at
    /// most `timeout`) and adopts what it holds; a local pin whose store copy is due is
    /// refreshed (queued, the request does not wait).
    pub async fn consult(&self, pool: &Pool, table: &AffinityTable, key: PinKey, now: u32) {
        let ttl = table.limits().idle_timeout;
        let every = (ttl / 4).max(1);
        match table.probe(key, now, every, self.since.load(Ordering::Relaxed)) {
            Probe::Held => {}
            Probe::Due(backend) => {
                if let Some(b) = pool.backends().get(backend) {
                    self.queue(Write::Refresh {
                        pool: Arc::from(&*pool.name),
                        key,
                        backend: b.name.clone(),
                        ttl,
                    });
                }
            }
            Probe::Absent => {
                let started = Instant::now();
                let outcome = self.adopt(pool, table, key, now).await;
                self.stats.lookup(outcome, started.elapsed());
            }
        }
    }

    async fn adopt(&self, pool: &Pool, table: &AffinityTable, key: PinKey, now: u32) -> Lookup {
        if !self.is_up() {
            return Lookup::Skipped;
        }
        let Ok(_asking) = self.asking.try_acquire() else {
            return Lookup::Skipped;
        };
        let mut conn = self.conn.clone();
        let mut get = redis::cmd("GET");
        get.arg(self.key_of(&pool.name, key));
        let get = get.query_async::<Option<Vec<u8>>>(&mut conn);
        let value = match tokio::time::timeout(self.timeout, get).await {
            Err(_) => return Lookup::Timeout,
            Ok(Err(e)) => {
                self.failed(&e);
                return Lookup::Error;
            }
            Ok(Ok(None)) => return Lookup::Missing,
            Ok(Ok(Some(value))) => value,
        };
        let Some((created, name)) = parse_value(&value) else {
            return Lookup::Error;
        };
        let set = pool.backends();
        let Some(backend) = set.named(name) else {
            tracing::debug!(pool = %pool.name, backend = name, "the shared store pins a session to a backend this instance does not have: a miss");
            return Lookup::UnknownBackend;
        };
        table.adopt(key, backend.id, created, now);
        Lookup::Found
    }

    fn key_of(&self, pool: &str, key: PinKey) -> Vec<u8> {
        let sealed = self.cipher.seal(key);
        let mut out = Vec::with_capacity(self.prefix.len() + pool.len() + 38);
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(b":pin:");
        out.extend_from_slice(pool.as_bytes());
        out.push(b':');
        out.extend_from_slice(&sealed);
        out
    }

    fn queue(&self, write: Write) {
        if self.writes.try_send(write).is_err() {
            self.stats
                .writes_dropped_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Notes a failed operation: errors of the connection mark the store down.
    fn failed(&self, e: &redis::RedisError) {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
        {
            self.down(e.to_string());
        } else {
            tracing::debug!("shared store: {e}");
        }
    }

    fn down(&self, reason: String) {
        let mut down = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        if self.up.swap(false, Ordering::Relaxed) {
            self.stats.degraded.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "shared store degraded ({reason}): lookups skip it and pins stay local until it answers again"
            );
            *down = Some((Instant::now(), reason));
        } else if let Some((_, why)) = down.as_mut()
            && why.is_empty()
        {
            // Not reached yet: the first reason is the one the start reports.
            *why = reason;
        }
    }

    fn recovered(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            // Every pin used from now on is checked against the store and written again if
            // it lost it (a restarted Redis is refilled by the sessions in use).
            self.since.store(clock::unix_now(), Ordering::Relaxed);
            let down = self
                .down_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if self.answered.swap(true, Ordering::Relaxed) {
                let down_for = down.map_or(0.0, |(at, _)| at.elapsed().as_secs_f64());
                tracing::info!(
                    down_for = format!("{down_for:.1}s"),
                    "shared store recovered: pins in use are written again as they are used"
                );
            } else {
                tracing::info!("shared store connected");
            }
        }
    }

    /// One PING: marks the store up or down.
    async fn probe(&self) {
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        let ping = ping.query_async::<String>(&mut conn);
        match tokio::time::timeout(OPERATION_TIMEOUT, ping).await {
            Ok(Ok(_)) => self.recovered(),
            Ok(Err(e)) => self.down(e.to_string()),
            Err(_) => self.down("no answer to PING within 1s".into()),
        }
    }

    async fn watch_health(self: Arc<Self>, mut stop: Signal) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PROBE_EVERY) => self.probe().await,
                _ = stop.wait() => return,
            }
        }
    }

    /// The writer: sends what was queued in batches, one round trip each.
    async fn write(self: Arc<Self>, mut queued: Writes, registry: Arc<Registry>, mut stop: Signal) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                n = queued.recv_many(&mut batch, BATCH) => if n == 0 { return },
                _ = stop.wait() => {
                    // What is queued at the stop is sent, once, if the store answers.
                    while let Ok(w) = queued.try_recv() {
                        batch.push(w);
                        if batch.len() == BATCH { break; }
                    }
                    if !batch.is_empty() && self.is_up() {
                        self.send(&batch, &registry).await;
                    }
                    return;
                }
            }
            if self.is_up() {
                self.send(&batch, &registry).await;
            } else {
                // Down: nothing queues up behind it. The pins in use are written again when
                // it is back.
                self.stats
                    .writes_dropped_failed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            batch.clear();
        }
    }

    async fn send(&self, batch: &[Write], registry: &Registry) {
        let mut pipe = redis::pipe();
        let mut news = format!("{}\n", self.instance);
        let header = news.len();
        let mut checks: Vec<(Arc<str>, PinKey, Box<str>, u32)> = Vec::new();
        let mut kinds = [0u64; 5];
        for w in batch.iter() {
            match w {
                Write::Pin {
                    pool,
                    key,
                    backend,
                    created,
                    ttl,
                    moved,
                } => {
                    pipe.cmd("SET")
                        .arg(self.key_of(pool, *key))
                        .arg(pin_value(*created, backend))
                        .arg("EX")
                        .arg(*ttl)
                        .ignore();
                    if *moved {
                        news_line(&mut news, pool, &self.cipher.seal(*key), backend);
                        kinds[WriteKind::Move as usize] += 1;
                    } else {
                        kinds[WriteKind::Pin as usize] += 1;
                    }
                }
                Write::Drop { pool, key } => {
                    pipe.cmd("DEL").arg(self.key_of(pool, *key)).ignore();
                    news_line(&mut news, pool, &self.cipher.seal(*key), "-");
                    kinds[WriteKind::Drop as usize] += 1;
                }
                Write::Refresh {
                    pool,
                    key,
                    backend,
                    ttl,
                } => {
                    let k = self.key_of(pool, *key);
                    pipe.cmd("GET")
                        .arg(&k)
                        .cmd("EXPIRE")
                        .arg(&k)
                        .arg(*ttl)
                        .ignore();
                    checks.push((pool.clone(), *key, backend.clone(), *ttl));
                    kinds[WriteKind::Refresh as usize] += 1;
                }
            }
        }
        if news.len() > header {
            pipe.cmd("PUBLISH").arg(&self.channel).arg(&news).ignore();
        }
        let mut conn = self.conn.clone();
        let sent = tokio::time::timeout(
            OPERATION_TIMEOUT,
            pipe.query_async::<Vec<Option<Vec<u8>>>>(&mut conn),
        )
        .await;
        let values = match sent {
            Ok(Ok(values)) => values,
            Ok(Err(e)) => {
                self.failed(&e);
                self.stats
                    .writes_dropped_failed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                return;
            }
            Err(_) => {
                self.down("a batch of writes took over 1s".into());
                self.stats
                    .writes_dropped_failed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                return;
            }
        };
        for kind in WriteKind::ALL {
            self.stats.wrote(kind, kinds[kind as usize]);
        }
        // The refresh checks: the store's word wins (another instance moved the session);
        // a pin it lost is written again, unless another instance wrote one meanwhile.
        let now = clock::unix_now();
        let mut refill = redis::pipe();
        let mut refills = 0;
        for ((pool, key, backend, ttl), value) in checks.into_iter().zip(values) {
            match value.as_deref().and_then(parse_value) {
                Some((_, theirs)) if theirs == &*backend => {}
                Some((_, theirs)) => self.apply(registry, &pool, key, Some(theirs), now),
                None => {
                    refill
                        .cmd("SET")
                        .arg(self.key_of(&pool, key))
                        .arg(pin_value(now, &backend))
                        .arg("EX")
                        .arg(ttl)
                        .arg("NX")
                        .ignore();
                    refills += 1;
                }
            }
        }
        if refills > 0 {
            let sent =
                tokio::time::timeout(OPERATION_TIMEOUT, refill.query_async::<()>(&mut conn)).await;
            match sent {
                Ok(Ok(())) => self.stats.wrote(WriteKind::Refill, refills),
                Ok(Err(e)) => self.failed(&e),
                Err(_) => self.down("a batch of writes took over 1s".into()),
            }
        }
    }

    /// Follows another instance's move (`Some(backend)`) or removal (`None`) of a pin this
    /// instance holds.
    fn apply(&self, registry: &Registry, pool: &str, key: PinKey, backend: Option<&str>, now: u32) {
        let topology = registry.topology();
        let Some(pool) = topology.pool(pool) else {
            return;
        };
        let Some(table) = pool.table() else {
            return;
        };
        let target = match backend {
            None => None,
            Some(name) => match pool.backends().named(name) {
                Some(b) => Some(b.id),
                None => {
                    // Not a backend of this instance: its pin here is stale all the same.
                    if table.follow(key, None, now) {
                        self.stats.unknown_backend.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            },
        };
        if table.follow(key, target, now) {
            self.stats.followed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The follower: subscribes to the other instances' news and applies it, reconnecting
    /// with back-off. News may be missed while it is not subscribed: each new subscription
    /// makes the pins in use checked again.
    async fn follow(self: Arc<Self>, registry: Arc<Registry>, mut stop: Signal) {
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        // Said once per spell of failures, while the store otherwise answers (a store that
        // is down says so itself).
        let mut said = false;
        loop {
            let subscribed = tokio::time::timeout(OPERATION_TIMEOUT, async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            match subscribed {
                Ok(Ok(pubsub)) => {
                    if !first {
                        self.since.store(clock::unix_now(), Ordering::Relaxed);
                    }
                    if said {
                        tracing::info!("shared store: following other instances' moves again");
                    }
                    (first, said) = (false, false);
                    backoff = Duration::from_millis(100);
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            message = messages.next() => match message {
                                Some(m) => self.read_news(&registry, m.get_payload_bytes()),
                                None => break,
                            },
                            _ = stop.wait() => return,
                        }
                    }
                }
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "no answer to SUBSCRIBE within 1s".to_string(),
                    };
                    if self.is_up() && !said {
                        said = true;
                        tracing::warn!(
                            channel = %self.channel,
                            "shared store: cannot follow other instances' moves ({why}); sessions they move reach this one's old backend until its pin is next refreshed"
                        );
                    } else {
                        tracing::debug!("shared store: cannot subscribe: {why}");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Applies one message of news: a line naming its instance, then `pool key backend`
    /// lines (`-` for a pin dropped). Anything else is skipped.
    fn read_news(&self, registry: &Registry, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        let mut lines = text.lines();
        if lines.next().is_none_or(|sender| sender == &*self.instance) {
            return;
        }
        let now = clock::unix_now();
        for line in lines {
            let mut fields = line.split(' ');
            let (Some(pool), Some(hex), Some(backend), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let Some(key) = self.cipher.open(hex.as_bytes()) else {
                continue;
            };
            let backend = (backend != "-").then_some(backend);
            self.apply(registry, pool, key, backend, now);
        }
    }
}

fn news_line(news: &mut String, pool: &str, sealed: &[u8; 32], backend: &str) {
    use std::fmt::Write as _;
    let hex = std::str::from_utf8(sealed).unwrap_or_default();
    let _ = writeln!(news, "{pool} {hex} {backend}");
}

/// Tells the store of the pins one pool's table makes.
struct PoolWatch {
    shared: Arc<SharedPins>,
    pool: Arc<str>,
    backends: Arc<arc_swap::ArcSwap<crate::core::backend::BackendSet>>,
}

impl PinWatch for PoolWatch {
    fn made(&self, key: PinKey, backend: BackendId, now: u32, from: Option<BackendId>, ttl: u32) {
        let Some(name) = self.backends.load().get(backend).map(|b| b.name.clone()) else {
            return;
        };
        self.shared.queue(Write::Pin {
            pool: self.pool.clone(),
            key,
            backend: name,
            created: now,
            ttl,
            moved: from.is_some(),
        });
    }

    fn dropped(&self, keys: &[PinKey]) {
        for &key in keys {
            self.shared.queue(Write::Drop {
                pool: self.pool.clone(),
                key,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_names_no_id_and_opens_to_the_table_key() {
        let cipher = KeyCipher::new(b"a secret of sixteen+ bytes");
        let key = PinKey::of("4Qx_session");
        let sealed = cipher.seal(key);
        assert!(sealed.iter().all(u8::is_ascii_hexdigit));
        assert_eq!(cipher.open(&sealed), Some(key));
        // Another secret, another key: the store's keys depend on the secret.
        assert_ne!(
            KeyCipher::new(b"another secret, 16+ bytes").seal(key),
            sealed
        );
        assert_eq!(cipher.open(b"not hex"), None);
        assert_eq!(cipher.open(&[b'g'; 32]), None);
    }

    #[test]
    fn stored_pins_read_back_and_junk_does_not() {
        assert_eq!(parse_value(b"1764460000:img2"), Some((1764460000, "img2")));
        assert_eq!(parse_value(b"1:a:b"), Some((1, "a:b")));
        for junk in [&b""[..], b"img2", b"x:img2", b"12:", b"\xff:img"] {
            assert_eq!(parse_value(junk), None, "{junk:?}");
        }
    }
}
