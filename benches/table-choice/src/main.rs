//! Bytes per pin and lookup speed: DashMap (tidegate's table) against scc::HashMap, with
//! tidegate's key and value layout (16-byte key, 12-byte value) and pass-through hashing.
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Key([u64; 2]);
impl Hash for Key {
    fn hash<H: Hasher>(&self, s: &mut H) {
        s.write_u64(self.0[0]);
    }
}
#[derive(Default)]
struct Pass(u64);
impl Hasher for Pass {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {}
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}
#[derive(Clone, Copy, Default)]
struct BuildPass;
impl BuildHasher for BuildPass {
    type Hasher = Pass;
    fn build_hasher(&self) -> Pass {
        Pass(0)
    }
}
struct Slot {
    backend: u32,
    created: u32,
    last_used: AtomicU32,
}

fn key(i: u64) -> Key {
    // splitmix64: uniform bits like xxh3's.
    let mut z = i.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    let a = z ^ (z >> 31);
    Key([a, a.rotate_left(17) ^ i])
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// What the comparison needs of a table.
trait Table {
    fn put(&self, key: Key, slot: Slot);
    /// Finds `key`, refreshes its last use, and returns something of it.
    fn touch(&self, key: &Key) -> Option<u64>;
}

impl Table for dashmap::DashMap<Key, Slot, BuildPass> {
    fn put(&self, key: Key, slot: Slot) {
        self.insert(key, slot);
    }
    fn touch(&self, key: &Key) -> Option<u64> {
        self.get(key).map(|s| refresh(&s))
    }
}

impl Table for scc::HashMap<Key, Slot, BuildPass> {
    fn put(&self, key: Key, slot: Slot) {
        let _ = self.insert(key, slot);
    }
    fn touch(&self, key: &Key) -> Option<u64> {
        self.read(key, |_, s| refresh(s))
    }
}

fn refresh(s: &Slot) -> u64 {
    s.last_used.store(2, Ordering::Relaxed);
    u64::from(s.backend & 1) + u64::from(s.created)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args
        .get(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    match args.get(1).map(String::as_str) {
        Some("dashmap") => {
            // tidegate's shard count for a table of this bound.
            let shards = ((n as usize) / 4096).next_power_of_two().clamp(64, 4096);
            let map =
                dashmap::DashMap::with_capacity_and_hasher_and_shard_amount(0, BuildPass, shards);
            measure("dashmap", n, &map);
        }
        Some("scc") => measure("scc", n, &scc::HashMap::with_hasher(BuildPass)),
        _ => eprintln!("usage: table-choice dashmap|scc [PINS]"),
    }
}

/// Fills `table` with `n` pins, then looks up a million of them; prints bytes per pin
/// (RSS growth of this process), insert and lookup times.
fn measure(which: &str, n: u64, table: &impl Table) {
    let probes: Vec<Key> = (0..1_000_000u64).map(|i| key((i * 7919) % n)).collect();
    let before = rss_kib();
    let t = Instant::now();
    for i in 0..n {
        let slot = Slot {
            backend: i as u32,
            created: 1,
            last_used: AtomicU32::new(1),
        };
        table.put(key(i), slot);
    }
    let fill = t.elapsed();
    let after = rss_kib();
    let t = Instant::now();
    let found: u64 = probes.iter().filter_map(|p| table.touch(p)).sum();
    let lookup_ns = t.elapsed().as_nanos() as f64 / probes.len() as f64;
    report(which, n, before, after, fill, lookup_ns, found);
}

fn report(
    which: &str,
    n: u64,
    before: u64,
    after: u64,
    fill: std::time::Duration,
    lookup_ns: f64,
    found: u64,
) {
    let bytes = (after - before) as f64 * 1024.0 / n as f64;
    println!(
        "{which}\t{n}\t{:.1} B/pin\tfill {:.0} ns/pin\tlookup {:.0} ns\t(check {found})",
        bytes,
        fill.as_nanos() as f64 / n as f64,
        lookup_ns
    );
}
