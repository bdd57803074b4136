//! Hot-path micro benchmarks through the public library API: session id extraction, the
//! affinity table (lookup and pin at 1k, 1M and 10M pins, on 1 and 2 threads), the balancing
//! policies, and the reply page scanner. Also prints the memory a pin costs (process RSS before
//! and after filling a table, measured in a fresh child process so nothing freed earlier skews
//! it).
//!
//! ```sh
//! cargo bench --bench hot_path                     # everything (3-4 minutes, ~0.7 GiB peak)
//! cargo bench --bench hot_path -- affinity/lookup  # one group (criterion filter)
//! cargo bench --bench hot_path -- --test           # smoke mode: every case once, no 10M table
//! ```
//!
//! Environment: `TIDEGATE_BENCH_FULL=1` keeps the 10M cases in `--test` mode;
//! `TIDEGATE_BENCH_RSS=0` skips the bytes-per-pin measurement.
//! See docs/benchmarks.md for how to read the numbers.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use tidegate::core::affinity::{AffinityTable, PinKey, TableLimits};
use tidegate::core::backend::{Backend, BackendId, BackendSet};
use tidegate::core::balance;
use tidegate::core::learn::PageScanner;
use tidegate::core::session_id::{self, IdRules};

/// Unix seconds the pins are created at; lookups happen a little later, well within the
/// idle timeout, so no pin expires during a run.
const T0: u32 = 1_700_000_000;
/// How many pre-computed lookup keys a benchmark cycles through (a power of two). Drawn at
/// random over the whole table, so a large table is probed all over its memory.
const PROBES: usize = 1 << 16;

/// Env var that turns the bench binary into the child that measures bytes per pin.
const RSS_CHILD: &str = "TIDEGATE_BENCH_RSS_CHILD";

/// Writes the `i`-th 16-character Seaside-like id (`A-Za-z0-9_-`) into `buf`.
fn seaside_id(i: u64, buf: &mut [u8; 16]) -> &str {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
    // Spread consecutive numbers over all 16 characters (splitmix64), as real keys are.
    let mut x = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    // 10 characters from the mixed bits, 6 from `i` itself so ids stay distinct.
    for (k, b) in buf.iter_mut().enumerate().take(10) {
        *b = ALPHABET[((x >> (6 * k)) & 63) as usize];
    }
    for (k, b) in buf.iter_mut().enumerate().skip(10) {
        *b = ALPHABET[((i >> (6 * (k - 10))) & 63) as usize];
    }
    std::str::from_utf8(buf).expect("ASCII")
}

/// A small deterministic generator for probe positions (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

const BACKENDS: [BackendId; 3] = [BackendId(11), BackendId(22), BackendId(33)];

/// A table holding `n` pins of ids `0..n`, bounded 10 % above `n` so nothing is evicted.
fn filled_table(n: u64) -> AffinityTable {
    let table = AffinityTable::new(TableLimits {
        idle_timeout: 1800,
        max_lifetime: 28800,
        max_pins: (n + n / 10) as usize,
    });
    let mut buf = [0u8; 16];
    for i in 0..n {
        table.pin(
            PinKey::of(seaside_id(i, &mut buf)),
            BACKENDS[(i % 3) as usize],
            T0,
        );
    }
    assert_eq!(table.len() as u64, n, "every id is distinct");
    table
}

/// `PROBES` ids of pinned sessions, picked at random, as one 16-byte id each.
fn probe_ids(n: u64, seed: u64) -> Vec<[u8; 16]> {
    let mut rng = Rng(seed | 1);
    (0..PROBES)
        .map(|_| {
            let mut buf = [0u8; 16];
            seaside_id(rng.below(n), &mut buf);
            buf
        })
        .collect()
}

fn as_id(buf: &[u8; 16]) -> &str {
    std::str::from_utf8(buf).expect("ASCII")
}

/// Whether this run is criterion's smoke mode (`-- --test`), where each case runs once.
fn smoke_mode() -> bool {
    std::env::args().any(|a| a == "--test")
}

fn table_sizes() -> Vec<u64> {
    let full = std::env::var("TIDEGATE_BENCH_FULL").is_ok_and(|v| v == "1");
    if smoke_mode() && !full {
        vec![1_000, 1_000_000]
    } else {
        vec![1_000, 1_000_000, 10_000_000]
    }
}

fn label(n: u64) -> String {
    match n {
        n if n >= 1_000_000 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Session id extraction

fn extraction(c: &mut Criterion) {
    let rules = IdRules::default();
    let cookie_names: Box<[Box<str>]> = Box::new(["_s".into()]);
    // What a Seaside 3 link carries: the continuation key first, then the session key.
    let query = "_k=aB3dE5fG&_s=Kd83jHs7aQ0pLm2x&3";
    // A browser's cookie list: analytics and preference cookies around the session cookie.
    let cookies = "_ga=GA1.1.1482931.1716200000; theme=dark; lang=en-GB; \
                   _s=Kd83jHs7aQ0pLm2x; consent=yes";
    // A Seaside 2.8 form post: the id is a hidden field among the form's fields.
    let form = b"username=alice&remember=on&_k=aB3dE5fG&_s=Kd83jHs7aQ0pLm2x&43=Log+in";

    let mut g = c.benchmark_group("extract");
    g.throughput(Throughput::Elements(1));
    g.bench_function("query", |b| {
        b.iter(|| session_id::from_query(black_box(query), "_s", &rules))
    });
    g.bench_function("cookie_header_5", |b| {
        b.iter(|| session_id::from_cookie_header(black_box(cookies), &cookie_names, &rules))
    });
    g.bench_function("urlencoded_form", |b| {
        b.iter(|| session_id::from_urlencoded(black_box(form), "_s", &rules))
    });
    g.bench_function("pin_key_of_16", |b| {
        b.iter(|| PinKey::of(black_box("Kd83jHs7aQ0pLm2x")))
    });
    g.finish();
    assert_eq!(
        session_id::from_cookie_header(cookies, &cookie_names, &rules),
        Some("Kd83jHs7aQ0pLm2x")
    );
    assert!(session_id::from_query(query, "_s", &rules).is_some());
    assert!(session_id::from_urlencoded(form, "_s", &rules).is_some());
}

// ---------------------------------------------------------------------------------------
// The affinity table

/// Runs `iters` lookups split over `threads` threads; returns the wall time.
fn lookups_on_threads(
    table: &AffinityTable,
    keys: &[PinKey],
    iters: u64,
    threads: u64,
    now: u32,
) -> Duration {
    let per_thread = iters.div_ceil(threads);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                // Each thread walks the probes from its own offset.
                let first = (t as usize) * (PROBES / 2);
                for j in 0..per_thread as usize {
                    black_box(table.lookup(keys[(first + j) & (PROBES - 1)], now));
                }
            });
        }
    });
    start.elapsed()
}

fn affinity(c: &mut Criterion) {
    for n in table_sizes() {
        let started = Instant::now();
        let table = filled_table(n);
        eprintln!(
            "affinity: filled {} pins in {:.2} s",
            label(n),
            started.elapsed().as_secs_f64()
        );
        let ids = probe_ids(n, 0x5eed ^ n);
        let keys: Vec<PinKey> = ids.iter().map(|id| PinKey::of(as_id(id))).collect();
        let now = T0 + 60;
        // Touch every probe once so the timed lookups do not pay the one-time refresh; keep
        // each owner so re-pinning it below is a refresh, not a move.
        let owners: Vec<BackendId> = keys
            .iter()
            .map(|&k| table.lookup(k, now).expect("a pinned id"))
            .collect();

        let mut g = c.benchmark_group("affinity");
        g.throughput(Throughput::Elements(1));
        if n >= 10_000_000 {
            g.sample_size(10)
                .warm_up_time(Duration::from_secs(1))
                .measurement_time(Duration::from_secs(3));
        } else {
            g.sample_size(30)
                .warm_up_time(Duration::from_secs(1))
                .measurement_time(Duration::from_secs(3));
        }
        let size = label(n);

        // The table alone: the key is already hashed.
        g.bench_function(BenchmarkId::new("lookup/1t", &size), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = i.wrapping_add(1);
                table.lookup(keys[i & (PROBES - 1)], now)
            })
        });
        // What a request pays: hash the borrowed id, then look it up.
        g.bench_function(BenchmarkId::new("hash+lookup/1t", &size), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = i.wrapping_add(1);
                table.lookup(PinKey::of(as_id(&ids[i & (PROBES - 1)])), now)
            })
        });
        // One lookup at a time: the next probe depends on the previous answer, so the CPU
        // cannot overlap their cache misses. Closer to a request, which does one lookup
        // among thousands of other instructions.
        g.bench_function(BenchmarkId::new("hash+lookup_dependent/1t", &size), |b| {
            let mut i = 0usize;
            b.iter(|| {
                let found = table.lookup(PinKey::of(as_id(&ids[i & (PROBES - 1)])), now);
                i = i.wrapping_add(1 + (found.map_or(0, |b| b.0 as usize) & 1));
                found
            })
        });
        // Aggregate throughput of two threads sharing the table (criterion's time per
        // element is wall time / total lookups, so elements/s is the sum over both).
        g.bench_function(BenchmarkId::new("lookup/2t", &size), |b| {
            b.iter_custom(|iters| lookups_on_threads(&table, &keys, iters, 2, now))
        });
        // Learning a pin the table already holds (a Set-Cookie on every reply).
        g.bench_function(BenchmarkId::new("pin_refresh/1t", &size), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = i.wrapping_add(1);
                let at = i & (PROBES - 1);
                table.pin(keys[at], owners[at], now)
            })
        });
        // A new session pinned and dropped again, so the table keeps its size.
        g.bench_function(BenchmarkId::new("pin_new+unpin/1t", &size), |b| {
            let mut buf = [0u8; 16];
            let mut i = n;
            b.iter(|| {
                i += 1;
                let k = PinKey::of(seaside_id(i, &mut buf));
                table.pin(k, BACKENDS[0], now);
                table.unpin(k)
            })
        });
        g.finish();
        let started = Instant::now();
        drop(table);
        if n >= 1_000_000 {
            eprintln!(
                "affinity: dropped {} pins in {:.2} s",
                size,
                started.elapsed().as_secs_f64()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Balancing policies

fn backend_set(n: usize) -> BackendSet {
    BackendSet::new(
        (0..n)
            .map(|i| {
                Arc::new(Backend::new(
                    &format!("image-{i}"),
                    format!("127.0.0.1:{}", 9000 + i).parse().expect("address"),
                    1,
                ))
            })
            .collect(),
        |_| None,
    )
}

fn balancing(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    g.throughput(Throughput::Elements(1));
    for n in [3usize, 16] {
        let set = backend_set(n);
        let cursor = AtomicUsize::new(0);
        // Least-sessions reads the per-backend pin counts of a real table, as the pool does.
        let table = AffinityTable::new(TableLimits::default());
        for (i, b) in set.all().iter().enumerate() {
            for j in 0..(10 + i as u64) {
                let mut buf = [0u8; 16];
                table.pin(
                    PinKey::of(seaside_id(j * 64 + i as u64, &mut buf)),
                    b.id,
                    T0,
                );
            }
        }
        g.bench_function(BenchmarkId::new("round_robin", n), |b| {
            b.iter(|| balance::round_robin(black_box(&set), &cursor, |_| true).map(|b| b.id))
        });
        g.bench_function(BenchmarkId::new("least_sessions", n), |b| {
            b.iter(|| {
                balance::least_sessions(black_box(&set), &cursor, |_| true, |id| table.pins_of(id))
                    .map(|b| b.id)
            })
        });
        g.bench_function(BenchmarkId::new("client_address", n), |b| {
            let mut ip = 0x0a00_0001u32;
            b.iter(|| {
                ip = ip.wrapping_add(7919);
                balance::by_client_address(black_box(&set), IpAddr::V4(Ipv4Addr::from(ip)), |_| {
                    true
                })
                .map(|b| b.id)
            })
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------
// The reply page scanner

/// `kib` KiB of a plausible application page: table rows with links, classes, a few
/// underscores (the needle's first byte) in names, and no `?_s=` field.
fn page(kib: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(kib * 1024 + 256);
    out.extend_from_slice(
        b"<!DOCTYPE html><html><head><title>Orders</title>\
<link rel=\"stylesheet\" href=\"/files/WAStyle/main.css\"></head><body><table class=\"order_list\">\n",
    );
    let mut row = 0;
    while out.len() < kib * 1024 {
        let line = format!(
            "<tr class=\"row_{}\"><td>Order {row}</td><td class=\"amount\">{}.{:02} EUR</td>\
<td><a href=\"/shop/orders?_k=aB3dE5fG&amp;{row}\">open</a></td><td data-user_id=\"{}\">alice</td></tr>\n",
            row % 2,
            row * 17 % 1000,
            row % 100,
            row * 31
        );
        out.extend_from_slice(line.as_bytes());
        row += 1;
    }
    out.truncate(kib * 1024);
    out
}

fn scanner(c: &mut Criterion) {
    let rules = IdRules::default();
    let needle = b"_s=";
    let mut g = c.benchmark_group("page_scan");
    for kib in [1usize, 16, 32] {
        let plain = page(kib);
        // The same size, with the session link as the last bytes of the page.
        let link = b"<a href=\"/app?_s=Kd83jHs7aQ0pLm2x&amp;_k=aB3dE5fG\">go</a>";
        // Cut at the end of a row (outside any tag), padded with spaces to the same size.
        let mut with_id = page(kib);
        let room = kib * 1024 - link.len();
        let row_end = with_id[..room]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        with_id.truncate(row_end);
        with_id.resize(room, b' ');
        with_id.extend_from_slice(link);
        let limit = kib * 1024;
        g.throughput(Throughput::Bytes((kib * 1024) as u64));

        let scan = |body: &[u8]| -> bool {
            // Fed in 8 KiB chunks, as hyper hands a streamed body over.
            let mut s = PageScanner::new(limit);
            for chunk in body.chunks(8 * 1024) {
                if s.feed(chunk, needle, &rules).is_some() {
                    return true;
                }
            }
            s.finish(&rules).is_some()
        };
        assert!(!scan(&plain), "the plain page has no session field");
        assert!(scan(&with_id), "the session link at the end is found");
        g.bench_function(BenchmarkId::new("no_id", format!("{kib}KiB")), |b| {
            b.iter(|| scan(black_box(&plain)))
        });
        g.bench_function(BenchmarkId::new("id_at_end", format!("{kib}KiB")), |b| {
            b.iter(|| scan(black_box(&with_id)))
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------
// Bytes per pin

fn vm_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// In the child process: fill a table of `n` pins and print the RSS it added.
fn rss_child(n: u64) {
    let before = vm_status("VmRSS:").unwrap_or(0);
    let started = Instant::now();
    let table = filled_table(n);
    let fill = started.elapsed();
    let after = vm_status("VmRSS:").unwrap_or(0);
    let peak = vm_status("VmHWM:").unwrap_or(0);
    let grown = after.saturating_sub(before);
    println!(
        "bytes_per_pin: {} pins: RSS {:.1} MiB -> {:.1} MiB (+{:.1} MiB, peak {:.1} MiB), \
         {:.1} bytes/pin, filled in {:.2} s ({:.0} ns/pin)",
        label(n),
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        grown as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        grown as f64 / n as f64,
        fill.as_secs_f64(),
        fill.as_nanos() as f64 / n as f64
    );
    black_box(&table);
}

/// Runs the bytes-per-pin measurement for each size in a fresh child process.
fn bytes_per_pin() {
    if std::env::var("TIDEGATE_BENCH_RSS").is_ok_and(|v| v == "0") {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    for n in table_sizes().into_iter().filter(|&n| n >= 1_000_000) {
        match std::process::Command::new(&exe)
            .env(RSS_CHILD, n.to_string())
            .output()
        {
            Ok(out) if out.status.success() => {
                eprint!("{}", String::from_utf8_lossy(&out.stdout));
            }
            Ok(out) => eprintln!(
                "bytes_per_pin: {} pins: child failed ({}): {}",
                label(n),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("bytes_per_pin: cannot run the child: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// State file: 1M pins encoded for a write, and decoded and restored at a start

fn state_file(c: &mut Criterion) {
    use tidegate::core::snapshot::{Encoder, decode};
    let n = 1_000_000;
    let table = filled_table(n);
    let encode = || {
        let mut e = Encoder::new(T0, table.len());
        e.pool("app", |visit| table.for_each_pin(visit));
        e.finish()
    };
    let bytes = encode();
    let mut g = c.benchmark_group("state_file");
    g.sample_size(10);
    g.bench_function("save 1M pins (encode)", |b| b.iter(|| black_box(encode())));
    g.bench_function("load 1M pins (decode and restore)", |b| {
        b.iter_batched(
            || {
                AffinityTable::new(TableLimits {
                    idle_timeout: 1800,
                    max_lifetime: 28800,
                    max_pins: 1_100_000,
                })
            },
            |fresh| {
                let snapshot = decode(&bytes).expect("a good snapshot");
                for (key, pin) in &snapshot.pools[0].pins {
                    fresh.restore(*key, *pin, T0);
                }
                assert_eq!(fresh.len() as u64, n);
                fresh
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn main() {
    if let Ok(n) = std::env::var(RSS_CHILD) {
        rss_child(n.parse().expect("a pin count"));
        return;
    }
    bytes_per_pin();
    // Short defaults keep a full run near three minutes; flags given to criterion override them.
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    extraction(&mut c);
    balancing(&mut c);
    scanner(&mut c);
    affinity(&mut c);
    state_file(&mut c);
    c.final_summary();
}
