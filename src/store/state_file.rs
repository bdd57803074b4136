//! The state file: every pool's pins, written every `state_interval` and at shutdown, read
//! back at start, so that a restart keeps the sessions learned from pages (Seaside 3's
//! sessions travel in URLs: without it, a restart logs out every user). Writes are atomic: a
//! temporary file beside it, fsync, rename, fsync of the directory; a crash mid-write leaves
//! the previous file whole. A missing file is normal; a corrupt, truncated or foreign one is
//! logged and ignored.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::clock;
use crate::core::affinity::Restored;
use crate::core::registry::Registry;
use crate::core::snapshot::{self, Encoder, Snapshot};
use crate::shutdown::Signal;

/// Why pins read back were dropped, in [`DROP_REASONS`] order.
pub const DROP_REASONS: [&str; 4] = ["expired", "unknown-backend", "unknown-pool", "full"];

/// Counters of the state file, for the metrics.
#[derive(Debug, Default)]
pub struct StateStats {
    /// Writes that succeeded.
    pub saves_ok: AtomicU64,
    /// Writes that failed.
    pub saves_failed: AtomicU64,
    /// Pins in the last successful write.
    pub pins_saved: AtomicU64,
    /// Unix seconds of the last successful write.
    pub last_save: AtomicU64,
    /// Pins put back at start.
    pub restored: AtomicU64,
    /// Pins read at start and dropped, in [`DROP_REASONS`] order.
    pub dropped: [AtomicU64; 4],
}

/// The state file of a running tidegate.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    interval: Duration,
    /// Counters.
    pub stats: StateStats,
    failing: AtomicBool,
}

impl StateFile {
    /// The file at `path`, written every `interval`.
    pub fn new(path: PathBuf, interval: Duration) -> Self {
        StateFile {
            path,
            interval,
            stats: StateStats::default(),
            failing: AtomicBool::new(false),
        }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file and puts its pins back into the pools of the same name (blocking:
    /// call it off the async threads). Pins that expired meanwhile, of backends or pools no
    /// longer configured, or beyond a table's bound are dropped and counted.
    pub fn restore(&self, registry: &Registry) {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(file = %self.path.display(), "no state file yet: starting with no pins");
                return;
            }
            Err(e) => {
                tracing::warn!(file = %self.path.display(), "state file cannot be read, starting with no pins: {e}");
                return;
            }
        };
        self.restore_from(&bytes, registry, clock::unix_now());
    }

    /// [`StateFile::restore`] of bytes already read, at `now` (unix seconds): the reader
    /// without the file, which the fuzzer and the corpus tests drive.
    pub fn restore_from(&self, bytes: &[u8], registry: &Registry, now: u32) {
        let snapshot = match snapshot::decode(bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(file = %self.path.display(), "state file ignored, starting with no pins: {e}");
                return;
            }
        };
        let counts = put_back(&snapshot, registry, now);
        self.stats
            .restored
            .store(counts.restored, Ordering::Relaxed);
        for (counter, n) in self.stats.dropped.iter().zip(counts.dropped) {
            counter.store(n, Ordering::Relaxed);
        }
        tracing::info!(
            file = %self.path.display(),
            written_seconds_ago = now.saturating_sub(snapshot.written_at),
            restored = counts.restored,
            expired = counts.dropped[0],
            of_backends_gone = counts.dropped[1],
            of_pools_gone = counts.dropped[2],
            over_max_pins = counts.dropped[3],
            "pins restored from the state file"
        );
    }

    /// Writes every pool's pins (blocking: call it off the async threads). The number of
    /// pins written.
    pub fn save(&self, registry: &Registry) -> std::io::Result<usize> {
        let (bytes, pins) = encode(registry);
        write_atomically(&self.path, &bytes)?;
        Ok(pins)
    }

    /// [`StateFile::save`] with its outcome counted and logged: a failure once when it
    /// starts failing, and once when it writes again.
    pub fn save_logged(&self, registry: &Registry, reason: &str) {
        let started = Instant::now();
        match self.save(registry) {
            Ok(pins) => {
                self.stats.saves_ok.fetch_add(1, Ordering::Relaxed);
                self.stats.pins_saved.store(pins as u64, Ordering::Relaxed);
                self.stats
                    .last_save
                    .store(u64::from(clock::unix_now()), Ordering::Relaxed);
                let took = format!("{:.3}", started.elapsed().as_secs_f64());
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(file = %self.path.display(), pins, seconds = took, "state file written again");
                } else {
                    tracing::debug!(file = %self.path.display(), pins, seconds = took, reason, "state file written");
                }
            }
            Err(e) => {
                self.stats.saves_failed.fetch_add(1, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(file = %self.path.display(), reason, "state file cannot be written (the previous one stays): {e}");
                }
            }
        }
    }

    /// Writes the file every `interval` until `stop` fires.
    pub async fn keep(self: Arc<Self>, registry: Arc<Registry>, mut stop: Signal) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait() => return,
            }
            let (state, registry) = (self.clone(), registry.clone());
            let _ =
                tokio::task::spawn_blocking(move || state.save_logged(&registry, "interval")).await;
        }
    }
}

/// What putting pins back did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PutBack {
    /// Pins now in their tables.
    pub restored: u64,
    /// Pins dropped, in [`DROP_REASONS`] order.
    pub dropped: [u64; 4],
}

impl std::ops::AddAssign for PutBack {
    fn add_assign(&mut self, other: PutBack) {
        self.restored += other.restored;
        for (mine, theirs) in self.dropped.iter_mut().zip(other.dropped) {
            *mine += theirs;
        }
    }
}

/// Every pool's pins in the state file's form, and how many there are: what the state file
/// holds and what an upgrade hands to the next process.
pub fn encode(registry: &Registry) -> (Vec<u8>, usize) {
    let topology = registry.topology();
    let total: usize = topology
        .pools
        .iter()
        .filter_map(|p| p.table())
        .map(|t| t.len())
        .sum();
    let mut encoder = Encoder::new(clock::unix_now(), total);
    for pool in topology.pools.iter() {
        if let Some(table) = pool.table() {
            encoder.pool(&pool.name, |visit| table.for_each_pin(visit));
        }
    }
    let pins = encoder.pins() as usize;
    (encoder.finish(), pins)
}

/// Puts a snapshot's pins into the pools of the same name. Pins that expired, of backends
/// or pools no longer configured, or beyond a table's bound are dropped and counted; a pin
/// the table already holds stays as it is (the table's is the newer word).
pub fn put_back(snapshot: &Snapshot, registry: &Registry, now: u32) -> PutBack {
    let topology = registry.topology();
    let mut counts = PutBack::default();
    for pool_pins in &snapshot.pools {
        let pool = topology.pool(&pool_pins.pool);
        let (Some(pool), Some(table)) = (pool, pool.and_then(|p| p.table())) else {
            counts.dropped[2] += pool_pins.pins.len() as u64;
            continue;
        };
        let set = pool.backends();
        for &(key, pin) in &pool_pins.pins {
            if set.get(pin.backend).is_none() {
                counts.dropped[1] += 1;
                continue;
            }
            match table.restore(key, pin, now) {
                Restored::Yes => counts.restored += 1,
                Restored::Expired => counts.dropped[0] += 1,
                Restored::Full => counts.dropped[3] += 1,
                Restored::Present => {}
            }
        }
    }
    counts
}

/// Replaces `path` with `bytes` so that a reader (or a crash) sees the old file or the new
/// one, never a part: a temporary file in the same directory, written and synced, renamed
/// over it, and the directory synced.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        // The rename itself is durable once the directory is.
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::affinity::PinKey;

    fn registry() -> Registry {
        let config = crate::config::Config::from_toml(
            "[[pool]]\nname = \"app\"\n[[pool.backend]]\nname = \"a\"\naddress = \"127.0.0.1:9001\"\n\
             [[pool.backend]]\nname = \"b\"\naddress = \"127.0.0.1:9002\"\n",
            "t.toml",
        )
        .unwrap();
        Registry::new(crate::farm::topology(&config))
    }

    fn dir() -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "tidegate-state-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn pins_come_back_after_a_restart_and_strangers_are_dropped() {
        let d = dir();
        let file = StateFile::new(d.join("state"), Duration::from_secs(10));
        let before = registry();
        let pool = before.pool("app").unwrap();
        let table = pool.table().unwrap();
        let (a, b) = (
            crate::core::backend::BackendId::from_name("a"),
            crate::core::backend::BackendId::from_name("b"),
        );
        let now = clock::unix_now();
        table.pin(PinKey::of("S1"), a, now);
        table.pin(PinKey::of("S2"), b, now);
        // A stranger: a backend the next configuration does not have.
        table.pin(
            PinKey::of("S3"),
            crate::core::backend::BackendId::from_name("gone"),
            now,
        );
        assert_eq!(file.save(&before).unwrap(), 3);
        let after = registry();
        file.restore(&after);
        let table = after.pool("app").unwrap();
        let table = table.table().unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(table.get(PinKey::of("S1")).unwrap().backend, a);
        assert_eq!(table.pins_of(b), 1);
        assert_eq!(file.stats.restored.load(Ordering::Relaxed), 2);
        assert_eq!(file.stats.dropped[1].load(Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_missing_or_damaged_file_starts_empty() {
        let d = dir();
        let file = StateFile::new(d.join("state"), Duration::from_secs(10));
        let r = registry();
        file.restore(&r);
        std::fs::write(d.join("state"), b"TGSTATE\0garbage").unwrap();
        file.restore(&r);
        assert!(r.pool("app").unwrap().table().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_million_pins_are_saved_and_restored_whole() {
        let d = dir();
        let file = StateFile::new(d.join("state"), Duration::from_secs(10));
        let before = registry();
        let pool = before.pool("app").unwrap();
        let table = pool.table().unwrap();
        let a = crate::core::backend::BackendId::from_name("a");
        let now = clock::unix_now();
        for i in 0..1_000_000u32 {
            table.restore(
                PinKey::from_parts([u64::from(i), u64::from(i) << 7]),
                crate::core::affinity::Pin {
                    backend: a,
                    created: now,
                    last_used: now,
                },
                now,
            );
        }
        // Timed in benches/hot_path.rs (`state_file`); here only the outcome is asserted.
        assert_eq!(file.save(&before).unwrap(), 1_000_000);
        let after = registry();
        file.restore(&after);
        assert_eq!(after.pool("app").unwrap().table().unwrap().len(), 1_000_000);
        let _ = std::fs::remove_dir_all(d);
    }
}
