//! redis-rs (ConnectionManager) against fred (Client) on the paths tidegate's shared pin store
//! would use: a lookup miss, a lookup hit, 64 concurrent lookups on one multiplexed connection,
//! and a pipelined batch of `SET key value EX 1800`. Each runs on a current-thread tokio runtime
//! (tidegate's workers are tokio) against a redis-server this program starts on loopback and
//! kills by pid at the end. Then each client sees its server SIGKILLed and restarted on the same
//! port, and the program prints what every GET returned meanwhile.
use std::future::Future;
use std::hint::black_box;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::{
    Builder, ClientLike, Config, Expiration, KeysInterface, Options, ReconnectPolicy,
};
use redis::AsyncCommands;

const RUNS: usize = 3;
const SEQ_OPS: usize = 20_000;
const WARMUP_OPS: usize = 1_000;
const TASKS: usize = 64;
const CONC_OPS: usize = 50_000;
const BATCH: usize = 256;
const BATCHES: usize = 200;
const PHASE_LIMIT: Duration = Duration::from_secs(60);
const HIT_VALUE: &str = "1764460000:img2";

// ---------------------------------------------------------------- redis-server

struct Server {
    port: u16,
    child: Option<Child>,
}

impl Server {
    fn start() -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut s = Server { port, child: None };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("/usr/bin/redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start /usr/bin/redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen within 5 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL by pid, then reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Child::kill sends SIGKILL to this child's pid.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- CPU time

/// User + system CPU time of this process (all its threads), in microseconds.
fn cpu_us() -> u64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct; RUSAGE_SELF is always valid.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

// ---------------------------------------------------------------- the two clients

#[derive(Clone, Copy, PartialEq)]
enum Which {
    Redis,
    Fred,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Redis => "redis",
            Which::Fred => "fred",
        }
    }
}

/// What the store needs of a client. Lookups return the value's length (0: absent).
trait Store: Clone + Send + 'static {
    fn get(&mut self, key: &str) -> impl Future<Output = Result<usize, String>> + Send;
    fn set_batch(
        &mut self,
        keys: &[String],
        value: &str,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

#[derive(Clone)]
struct RedisStore(redis::aio::ConnectionManager);

impl Store for RedisStore {
    async fn get(&mut self, key: &str) -> Result<usize, String> {
        let v: Option<Vec<u8>> = self.0.get(key).await.map_err(|e| e.to_string())?;
        Ok(v.map_or(0, |v| v.len()))
    }

    async fn set_batch(&mut self, keys: &[String], value: &str) -> Result<(), String> {
        let mut p = redis::pipe();
        for k in keys {
            p.cmd("SET").arg(k).arg(value).arg("EX").arg(1800).ignore();
        }
        p.query_async::<()>(&mut self.0)
            .await
            .map_err(|e| e.to_string())
    }
}

#[derive(Clone)]
struct FredStore {
    client: fred::prelude::Client,
    /// Send GETs with `Options { fail_fast: true }` (error at once while disconnected).
    fail_fast: bool,
}

impl Store for FredStore {
    async fn get(&mut self, key: &str) -> Result<usize, String> {
        let v: Option<fred::bytes::Bytes> = if self.fail_fast {
            let o = Options {
                fail_fast: true,
                ..Options::default()
            };
            self.client.with_options(&o).get(key).await
        } else {
            self.client.get(key).await
        }
        .map_err(|e| e.to_string())?;
        Ok(v.map_or(0, |v| v.len()))
    }

    async fn set_batch(&mut self, keys: &[String], value: &str) -> Result<(), String> {
        let p = self.client.pipeline();
        for k in keys {
            let () = p
                .set(k.as_str(), value, Some(Expiration::EX(1800)), None, false)
                .await
                .map_err(|e| e.to_string())?;
        }
        p.all::<()>().await.map_err(|e| e.to_string())
    }
}

/// How a client is configured. The benchmarks use `Default` (the setting does not touch the
/// connected path); the outage runs show each.
#[derive(Clone, Copy, PartialEq)]
enum Tuning {
    /// The crate's defaults.
    Default,
    /// redis-rs: 1 reconnect retry, 100 ms min delay, 250 ms connect timeout.
    /// fred: reconnect policy exponential 100 ms..2 s, unbounded; 500 ms command timeout.
    Reconnect,
    /// fred only: `Reconnect`, and each GET sent with `Options { fail_fast: true }`.
    ReconnectFailFast,
}

async fn redis_connect(url: &str, tuning: Tuning) -> RedisStore {
    let client = redis::Client::open(url).expect("redis url");
    let mut config = redis::aio::ConnectionManagerConfig::new();
    if tuning != Tuning::Default {
        config = config
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_connection_timeout(Some(Duration::from_millis(250)));
    }
    RedisStore(
        client
            .get_connection_manager_with_config(config)
            .await
            .expect("redis-rs connect"),
    )
}

async fn fred_connect(url: &str, tuning: Tuning) -> FredStore {
    let config = Config::from_url(url).expect("fred url");
    let mut b = Builder::from_config(config);
    if tuning != Tuning::Default {
        b.set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
        b.with_performance_config(|p| p.default_command_timeout = Duration::from_millis(500));
        b.with_connection_config(|c| c.connection_timeout = Duration::from_secs(1));
    }
    let client = b.build().expect("fred build");
    client.init().await.expect("fred connect");
    FredStore {
        client,
        fail_fast: tuning == Tuning::ReconnectFailFast,
    }
}

// ---------------------------------------------------------------- measurements

#[derive(Clone, Copy, Default)]
struct Sample {
    median_us: f64,
    p99_us: f64,
    cpu_us_per_op: f64,
    ops_per_s: f64,
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    // Session-id-shaped keys: a prefix and 32 hex digits.
    (0..n as u64)
        .map(|i| {
            let z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xBF58_476D_1CE4_E5B9;
            format!("{prefix}{:016x}{:016x}", z, z.rotate_left(29) ^ i)
        })
        .collect()
}

/// Sequential GETs of `keys` (cycled): latency quantiles and CPU per op.
async fn sequential<S: Store>(mut s: S, keys: &[String], want_hit: bool) -> Sample {
    for k in keys.iter().cycle().take(WARMUP_OPS) {
        s.get(k).await.expect("warm-up GET");
    }
    let mut lat = Vec::with_capacity(SEQ_OPS);
    let cpu0 = cpu_us();
    let t0 = Instant::now();
    for k in keys.iter().cycle().take(SEQ_OPS) {
        let t = Instant::now();
        let n = s.get(k).await.expect("GET");
        lat.push(t.elapsed().as_nanos() as u64);
        assert_eq!(n > 0, want_hit, "GET {k}: unexpected hit/miss");
        black_box(n);
    }
    let wall = t0.elapsed();
    let cpu = cpu_us() - cpu0;
    lat.sort_unstable();
    Sample {
        median_us: lat[lat.len() / 2] as f64 / 1e3,
        p99_us: lat[lat.len() * 99 / 100] as f64 / 1e3,
        cpu_us_per_op: cpu as f64 / SEQ_OPS as f64,
        ops_per_s: SEQ_OPS as f64 / wall.as_secs_f64(),
    }
}

/// TASKS tasks, each with a clone of one client (one multiplexed connection), CONC_OPS GETs
/// in all: throughput and CPU per op.
async fn concurrent<S: Store>(s: S, keys: Arc<Vec<String>>) -> Sample {
    let run = |ops_total: usize| {
        let s = s.clone();
        let keys = keys.clone();
        async move {
            let mut set = tokio::task::JoinSet::new();
            for t in 0..TASKS {
                let mut s = s.clone();
                let keys = keys.clone();
                let ops = ops_total / TASKS + usize::from(t < ops_total % TASKS);
                set.spawn(async move {
                    for k in keys.iter().cycle().skip(t * 7).take(ops) {
                        black_box(s.get(k).await.expect("GET"));
                    }
                });
            }
            while let Some(r) = set.join_next().await {
                r.expect("task");
            }
        }
    };
    run(WARMUP_OPS * 4).await;
    let cpu0 = cpu_us();
    let t0 = Instant::now();
    run(CONC_OPS).await;
    let wall = t0.elapsed();
    let cpu = cpu_us() - cpu0;
    Sample {
        ops_per_s: CONC_OPS as f64 / wall.as_secs_f64(),
        cpu_us_per_op: cpu as f64 / CONC_OPS as f64,
        ..Sample::default()
    }
}

/// BATCHES pipelines of BATCH `SET k v EX 1800`: CPU per SET, and SETs per second.
async fn pipelined<S: Store>(mut s: S, keys: &[String]) -> Sample {
    s.set_batch(&keys[..BATCH], HIT_VALUE)
        .await
        .expect("warm-up batch");
    let mut lat = Vec::with_capacity(BATCHES);
    let cpu0 = cpu_us();
    let t0 = Instant::now();
    for chunk in keys.chunks(BATCH).take(BATCHES) {
        let t = Instant::now();
        s.set_batch(chunk, HIT_VALUE).await.expect("pipeline");
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let wall = t0.elapsed();
    let cpu = cpu_us() - cpu0;
    lat.sort_unstable();
    let sets = (BATCH * BATCHES) as f64;
    Sample {
        median_us: lat[lat.len() / 2] as f64 / 1e3,
        p99_us: lat[lat.len() * 99 / 100] as f64 / 1e3,
        cpu_us_per_op: cpu as f64 / sets,
        ops_per_s: sets / wall.as_secs_f64(),
    }
}

#[derive(Clone, Copy)]
enum Scenario {
    Miss,
    Hit,
    Concurrent,
    Pipeline,
}

struct Keys {
    absent: Vec<String>,
    present: Arc<Vec<String>>,
    batch: Vec<String>,
}

async fn measure_one(which: Which, url: &str, sc: Scenario, k: &Keys) -> Sample {
    macro_rules! with_store {
        ($s:expr) => {{
            let s = $s;
            match sc {
                Scenario::Miss => sequential(s, &k.absent, false).await,
                Scenario::Hit => sequential(s, &k.present, true).await,
                Scenario::Concurrent => concurrent(s, k.present.clone()).await,
                Scenario::Pipeline => pipelined(s, &k.batch).await,
            }
        }};
    }
    match which {
        Which::Redis => with_store!(redis_connect(url, Tuning::Default).await),
        Which::Fred => with_store!(fred_connect(url, Tuning::Default).await),
    }
}

fn median_range(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let prec = if s[s.len() - 1] >= 1000.0 { 0 } else { 2 };
    format!(
        "{:.p$} ({:.p$}–{:.p$})",
        s[s.len() / 2],
        s[0],
        s[s.len() - 1],
        p = prec
    )
}

async fn bench(clients: &[Which], server: &Server) {
    let url = server.url();
    let k = Keys {
        absent: keys("tg:absent:", 1024),
        present: Arc::new(keys("tg:pin:", 1024)),
        batch: keys("tg:batch:", BATCH * BATCHES),
    };
    // The present keys, written once (by redis-rs) for both clients' hit runs.
    {
        let mut s = redis_connect(&url, Tuning::Default).await;
        for chunk in k.present.chunks(BATCH) {
            let chunk: Vec<String> = chunk.to_vec();
            s.set_batch(&chunk, HIT_VALUE).await.expect("seed");
        }
    }
    let scenarios = [
        (Scenario::Miss, "GET miss, sequential", SEQ_OPS),
        (Scenario::Hit, "GET hit, sequential", SEQ_OPS),
        (Scenario::Concurrent, "GET hit, 64 tasks", CONC_OPS),
        (
            Scenario::Pipeline,
            "pipelined SET EX, 256/batch",
            BATCH * BATCHES,
        ),
    ];
    println!(
        "runs: {RUNS}, interleaved; figures: median (min–max) of the runs; CPU = getrusage(RUSAGE_SELF) user+sys of this process"
    );
    for (sc, title, ops) in scenarios {
        let mut got: Vec<Vec<Sample>> = vec![Vec::new(); clients.len()];
        for _ in 0..RUNS {
            for (i, &c) in clients.iter().enumerate() {
                let s = tokio::time::timeout(PHASE_LIMIT, measure_one(c, &url, sc, &k))
                    .await
                    .unwrap_or_else(|_| panic!("{title} with {} over {PHASE_LIMIT:?}", c.name()));
                got[i].push(s);
            }
        }
        println!("\n## {title} ({ops} ops per run)");
        for (i, &c) in clients.iter().enumerate() {
            let col =
                |f: fn(&Sample) -> f64| median_range(&got[i].iter().map(f).collect::<Vec<_>>());
            match sc {
                Scenario::Miss | Scenario::Hit => println!(
                    "{:>5}: median {} µs | p99 {} µs | CPU {} µs/op | {} ops/s",
                    c.name(),
                    col(|s| s.median_us),
                    col(|s| s.p99_us),
                    col(|s| s.cpu_us_per_op),
                    col(|s| s.ops_per_s)
                ),
                Scenario::Concurrent => println!(
                    "{:>5}: {} ops/s | CPU {} µs/op",
                    c.name(),
                    col(|s| s.ops_per_s),
                    col(|s| s.cpu_us_per_op)
                ),
                Scenario::Pipeline => println!(
                    "{:>5}: CPU {} µs/SET | {} SET/s | batch median {} µs, p99 {} µs",
                    c.name(),
                    col(|s| s.cpu_us_per_op),
                    col(|s| s.ops_per_s),
                    col(|s| s.median_us),
                    col(|s| s.p99_us)
                ),
            }
        }
    }
}

// ---------------------------------------------------------------- outage

const PACE: Duration = Duration::from_millis(20);
const KILL_AT: Duration = Duration::from_millis(500);
const RESTART_AT: Duration = Duration::from_millis(2_500);
const OUTAGE_END: Duration = Duration::from_secs(7);
const OP_LIMIT: Duration = Duration::from_secs(3);

/// GETs every PACE while another thread SIGKILLs the server at KILL_AT and restarts it on the
/// same port at RESTART_AT; prints each run of like outcomes (time span, count, longest GET).
async fn outage<S: Store>(mut s: S, mut server: Server) -> Server {
    let t0 = Instant::now();
    let ctl = std::thread::spawn(move || {
        std::thread::sleep(KILL_AT);
        server.kill();
        let killed = t0.elapsed();
        std::thread::sleep(RESTART_AT.saturating_sub(t0.elapsed()));
        server.spawn();
        (server, killed, t0.elapsed())
    });
    // (first start, last end, outcome, count, longest GET)
    let mut spans: Vec<(Duration, Duration, String, usize, Duration)> = Vec::new();
    while t0.elapsed() < OUTAGE_END {
        let start = t0.elapsed();
        let t = Instant::now();
        let out = match tokio::time::timeout(OP_LIMIT, s.get("tg:outage")).await {
            Ok(Ok(_)) => "ok".to_string(),
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => format!("no answer within {OP_LIMIT:?} (outer timeout)"),
        };
        let took = t.elapsed();
        let end = t0.elapsed();
        match spans.last_mut() {
            Some(last) if last.2 == out => {
                last.1 = end;
                last.3 += 1;
                last.4 = last.4.max(took);
            }
            _ => spans.push((start, end, out, 1, took)),
        }
        tokio::time::sleep(PACE.saturating_sub(took)).await;
    }
    let (server, killed, restarted) = ctl.join().expect("server control thread");
    println!(
        "    SIGKILL at {:.3}s, listening again at {:.3}s",
        killed.as_secs_f64(),
        restarted.as_secs_f64()
    );
    for (a, b, out, n, max) in spans {
        println!(
            "    {:>6.3}s–{:>6.3}s  {n:>4} GET  longest {:>8.1} ms  {out}",
            a.as_secs_f64(),
            b.as_secs_f64(),
            max.as_secs_f64() * 1e3
        );
    }
    server
}

async fn outages(clients: &[Which], mut server: Server) -> Server {
    println!(
        "\n## outage: SIGKILL at {KILL_AT:?}, restart at {RESTART_AT:?}, a GET every {PACE:?}"
    );
    let url = server.url();
    for &c in clients {
        match c {
            Which::Redis => {
                println!("  redis: ConnectionManager, default config (6 retries from 100 ms, x2)");
                server = outage(redis_connect(&url, Tuning::Default).await, server).await;
                println!(
                    "  redis: ConnectionManager, 1 retry, min delay 100 ms, connect timeout 250 ms"
                );
                server = outage(redis_connect(&url, Tuning::Reconnect).await, server).await;
            }
            Which::Fred => {
                println!(
                    "  fred: Client, default config (no reconnect policy, no command timeout)"
                );
                server = outage(fred_connect(&url, Tuning::Default).await, server).await;
                println!(
                    "  fred: Client, reconnect policy exp 100 ms..2 s, command timeout 500 ms"
                );
                server = outage(fred_connect(&url, Tuning::Reconnect).await, server).await;
                println!("  fred: as above, and each GET with Options {{ fail_fast: true }}");
                server = outage(fred_connect(&url, Tuning::ReconnectFailFast).await, server).await;
            }
        }
    }
    server
}

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "both".into());
    let clients: Vec<Which> = match arg.as_str() {
        "redis" => vec![Which::Redis],
        "fred" => vec![Which::Fred],
        "both" => vec![Which::Redis, Which::Fred],
        _ => {
            eprintln!("usage: store-client [redis|fred|both]");
            std::process::exit(2);
        }
    };
    let server = Server::start();
    println!(
        "redis-server pid {} on 127.0.0.1:{}",
        server.child.as_ref().map_or(0, |c| c.id()),
        server.port
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut server = rt.block_on(async {
        bench(&clients, &server).await;
        outages(&clients, server).await
    });
    drop(rt);
    server.kill();
}
