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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args[1].as_str();
    let n: u64 = args[2].parse().unwrap();
    let probes: Vec<Key> = (0..1_000_000u64).map(|i| key((i * 7919) % n)).collect();
    let before = rss_kib();
    let t = Instant::now();
    let mut found = 0u64;
    let lookup_ns;
    match which {
        "dashmap" => {
            let shards = ((n as usize) / 4096).next_power_of_two().clamp(64, 4096);
            let m: dashmap::DashMap<Key, Slot, BuildPass> =
                dashmap::DashMap::with_capacity_and_hasher_and_shard_amount(0, BuildPass, shards);
            for i in 0..n {
                m.insert(
                    key(i),
                    Slot {
                        backend: i as u32,
                        created: 1,
                        last_used: AtomicU32::new(1),
                    },
                );
            }
            let fill = t.elapsed();
            let after = rss_kib();
            let t = Instant::now();
            for p in &probes {
                if let Some(s) = m.get(p) {
                    s.last_used.store(2, Ordering::Relaxed);
                    found += u64::from(s.backend & 1) + u64::from(s.created);
                }
            }
            lookup_ns = t.elapsed().as_nanos() as f64 / probes.len() as f64;
            report(which, n, before, after, fill, lookup_ns, found);
        }
        "scc" => {
            let m: scc::HashMap<Key, Slot, BuildPass> = scc::HashMap::with_hasher(BuildPass);
            for i in 0..n {
                let _ = m.insert(
                    key(i),
                    Slot {
                        backend: i as u32,
                        created: 1,
                        last_used: AtomicU32::new(1),
                    },
                );
            }
            let fill = t.elapsed();
            let after = rss_kib();
            let t = Instant::now();
            for p in &probes {
                if let Some(v) = m.read(p, |_, s| {
                    s.last_used.store(2, Ordering::Relaxed);
                    u64::from(s.backend & 1) + u64::from(s.created)
                }) {
                    found += v;
                }
            }
            lookup_ns = t.elapsed().as_nanos() as f64 / probes.len() as f64;
            report(which, n, before, after, fill, lookup_ns, found);
        }
        _ => panic!("dashmap | scc"),
    }
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
