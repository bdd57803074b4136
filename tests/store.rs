//! Several tidegate instances as one front door, sharing their pins through a real
//! `redis-server` (started by each test on a port of its own, stopped by its pid). Sessions
//! here travel only in page links (Seaside 3), the kind no session cookie carries from one
//! instance to the other; the last test shows the stateless alternative, the affinity cookie,
//! carrying a cookie-keeping client across instances without a store.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use support::{
    Browser, HttpClient, Launch, Process, Session, TempDir, backend_entries, client, free_addr,
    get, images, metric,
};
use tidegate::demo::{Image, Tracking};

const TEST_LIMIT: Duration = Duration::from_secs(90);

async fn bounded<F: std::future::Future<Output = ()>>(what: &str, body: F) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {TEST_LIMIT:?}"));
}

/// A `redis-server` of the test's own, on a loopback port, without persistence.
struct Redis {
    child: Option<Child>,
    addr: SocketAddr,
    dir: TempDir,
    /// Arguments beyond the port and persistence (TLS, a password).
    extra: Vec<String>,
}

impl Redis {
    fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// With these arguments too; with `--tls-port` the port given is the TLS one.
    fn start_with(extra: &[&str]) -> Redis {
        let mut redis = Redis {
            child: None,
            addr: free_addr(),
            dir: TempDir::new("redis"),
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        redis.restart();
        redis
    }

    /// Starts it (again, empty) on its port and waits, bounded, until it answers PING (or,
    /// over TLS, accepts connections).
    fn restart(&mut self) {
        let port = self.addr.port().to_string();
        let tls = self.extra.iter().any(|a| a.starts_with("--tls"));
        let ports = if tls {
            ["--port", "0", "--tls-port", &port]
        } else {
            ["--port", &port, "--tls-port", "0"]
        };
        let child = Command::new("redis-server")
            .args(ports)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.arg("")])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (tests/run.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let ready = || match tls {
            true => TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok(),
            false => self.command("PING").as_deref() == Some("+PONG"),
        };
        while !ready() {
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and waits for it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`true`) or SIGCONT: a store that hangs.
    fn pause(&self, paused: bool) {
        let Some(child) = &self.child else {
            return;
        };
        let pid = child.id();
        let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
        let signal = if paused {
            rustix::process::Signal::STOP
        } else {
            rustix::process::Signal::CONT
        };
        rustix::process::kill_process(pid, signal).expect("signal sent");
    }

    fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// One inline command; the answer's lines (a small answer: read once).
    fn lines(&self, command: &str) -> Option<Vec<String>> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{command}\r\n").as_bytes()).ok()?;
        let mut buf = vec![0u8; 64 * 1024];
        let n = s.read(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]);
        Some(text.lines().map(str::to_string).collect())
    }

    /// The first line of the answer to an inline command.
    fn command(&self, command: &str) -> Option<String> {
        self.lines(command)?.into_iter().next()
    }

    /// Keys held.
    fn keys(&self) -> u64 {
        let answer = self.command("DBSIZE").expect("DBSIZE answered");
        answer.trim_start_matches(':').parse().expect("a count")
    }

    /// The names of the keys held (a few: the answer is read in one go).
    fn key_names(&self) -> Vec<String> {
        let lines = self.lines("KEYS *").expect("KEYS answered");
        lines
            .into_iter()
            .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.pause(false);
        self.kill();
    }
}

/// The configuration of an instance over `images`, sharing pins through `redis`.
fn body(redis: &Redis, images: &[&Image], extra: &str) -> String {
    format!(
        "[store]\nredis = \"{}\"\nsecret = \"a secret both instances share\"\n{extra}\
         [[pool]]\nname = \"app\"\n{}",
        redis.url(),
        backend_entries(images)
    )
}

/// Two instances over the same images, sharing through `redis`.
async fn pair(redis: &Redis, images: &[Image], extra: &str) -> (Process, Process) {
    let all: Vec<&Image> = images.iter().collect();
    let a = Process::start(&body(redis, &all, extra)).await;
    let b = Process::start(&body(redis, &all, extra)).await;
    (a, b)
}

/// Waits, bounded, until `series` in the metrics of `p` reaches `at_least`.
async fn metric_reaches(p: &Process, c: &HttpClient, series: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let value = metric(&p.metrics(c).await, series);
        if value >= at_least {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {value}, below {at_least}:\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The store's state as the status page shows it.
async fn store_status(p: &Process, c: &HttpClient) -> String {
    let text = get(c, &format!("http://{}/status.json", p.admin))
        .await
        .text();
    let status: serde_json::Value = serde_json::from_str(&text).expect("status.json");
    status["store"].as_str().unwrap_or("absent").to_string()
}

/// The writes an instance queued have reached the store.
async fn written(p: &Process, c: &HttpClient, pins: f64) {
    metric_reaches(p, c, "tidegate_store_writes_total{kind=\"pin\"}", pins).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_learned_through_one_instance_is_routed_by_the_other() {
    bounded("shared sessions", async {
        let redis = Redis::start();
        let imgs = images(3, Tracking::Links).await;
        let (a, b) = pair(&redis, &imgs, "").await;
        let c = client();
        let mut sessions = Vec::new();
        for _ in 0..6 {
            sessions.push(Session::open(&c, &a.base()).await);
        }
        written(&a, &c, 6.0).await;
        assert_eq!(redis.keys(), 6, "one key per pin, nothing else");
        assert_eq!(store_status(&b, &c).await, "up", "on the status page");
        // Every next click at B reaches the image that holds the session, and back at A.
        for s in &mut sessions {
            s.click(&c, &b.base()).await;
            s.click(&c, &a.base()).await;
            s.click(&c, &b.base()).await;
        }
        let m = b.metrics(&c).await;
        assert_eq!(
            metric(&m, "tidegate_store_lookups_total{outcome=\"found\"}"),
            6.0,
            "B asked the store once per session, then knew it"
        );
        // The store holds no id: its keys name the pool and a 32-digit keyed hash.
        let keys = redis.key_names();
        assert_eq!(keys.len(), 6);
        for key in &keys {
            let hash = key.strip_prefix("tidegate:pin:app:").expect(key);
            assert!(hash.len() == 32 && hash.bytes().all(|c| c.is_ascii_hexdigit()));
            let value = redis.lines(&format!("GET {key}")).unwrap();
            assert!(
                imgs.iter()
                    .any(|i| value[1].ends_with(&format!(":{}", i.name())))
            );
        }
        for s in &sessions {
            let id = s
                .link
                .split("_s=")
                .nth(1)
                .unwrap()
                .split('&')
                .next()
                .unwrap();
            assert!(keys.iter().all(|k| !k.contains(id)), "an id in the clear");
        }
        // Forged ids (well-formed, never issued) cost a lookup each and keep nothing.
        for i in 0..40 {
            let r = get(&c, &format!("{}/app?_s=forged{i:010}", b.base())).await;
            assert_eq!(r.status, StatusCode::OK);
        }
        let m = b.metrics(&c).await;
        assert_eq!(
            metric(&m, "tidegate_store_lookups_total{outcome=\"missing\"}"),
            40.0
        );
        // Their new sessions are pinned (and shared) as any new session: 40 more, not 80.
        written(&b, &c, 40.0).await;
        assert_eq!(redis.keys(), 46);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moved_on_one_instance_is_followed_by_the_other() {
    bounded("moves", async {
        let redis = Redis::start();
        let imgs = images(2, Tracking::Links).await;
        let (a, b) = pair(&redis, &imgs, "").await;
        let c = client();
        let mut s = Session::open(&c, &a.base()).await;
        written(&a, &c, 1.0).await;
        // B learns it from the store and holds it from now on.
        s.click(&c, &b.base()).await;
        let old = s.image.clone();
        // A's operator disables its image: A moves the session to the other image.
        let api = a
            .call(
                Method::POST,
                &format!("/api/pools/app/backends/{old}/disable"),
                Some(support::TOKEN),
                "",
            )
            .await;
        assert_eq!(api.status, StatusCode::OK, "{}", api.text);
        let moved = get(&c, &format!("{}{}", a.base(), s.link)).await;
        assert_eq!(moved.status, StatusCode::OK);
        assert_ne!(moved.image(), old, "redispatched");
        metric_reaches(&b, &c, "tidegate_store_moves_followed_total", 1.0).await;
        // At B, where the old image is still enabled, the old link goes where A sent it.
        let at_b = get(&c, &format!("{}{}", b.base(), s.link)).await;
        assert_eq!(at_b.image(), moved.image(), "B followed A's move");
        // Removing a backend at B drops its pins there, in the store and at A.
        let api = a
            .call(
                Method::POST,
                &format!("/api/pools/app/backends/{old}/enable"),
                Some(support::TOKEN),
                "",
            )
            .await;
        assert_eq!(api.status, StatusCode::OK, "{}", api.text);
        let mut other = Session::open(&c, &b.base()).await;
        while other.image != old {
            other = Session::open(&c, &b.base()).await;
        }
        other.click(&c, &a.base()).await;
        let keys = redis.keys();
        let api = b
            .call(
                Method::DELETE,
                &format!("/api/pools/app/backends/{old}?force=true"),
                Some(support::TOKEN),
                "",
            )
            .await;
        assert!(api.status.is_success(), "{}", api.text);
        metric_reaches(&b, &c, "tidegate_store_writes_total{kind=\"drop\"}", 1.0).await;
        metric_reaches(&a, &c, "tidegate_store_moves_followed_total", 1.0).await;
        assert_eq!(redis.keys(), keys - 1, "its pin left the store");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_fails_no_request() {
    bounded("redis killed", async {
        let mut redis = Redis::start();
        let imgs = images(3, Tracking::Links).await;
        let (a, b) = pair(&redis, &imgs, "").await;
        let c = client();
        let mut sessions = Vec::new();
        for i in 0..8 {
            let at = if i % 2 == 0 { &a } else { &b };
            sessions.push(Session::open(&c, &at.base()).await);
        }
        // Shared once the instance that learned it has written it (a moment later).
        written(&a, &c, 4.0).await;
        written(&b, &c, 4.0).await;
        for s in &mut sessions {
            s.click(&c, &a.base()).await;
            s.click(&c, &b.base()).await;
        }
        let bases = [a.base(), b.base()];
        let load = tokio::spawn({
            let bases = bases.clone();
            async move {
                let c = client();
                let (mut clicks, mut fresh) = (0, 0);
                let deadline = Instant::now() + Duration::from_secs(4);
                let mut turn = 0usize;
                while Instant::now() < deadline && clicks < 5000 {
                    for s in &mut sessions {
                        s.click(&c, &bases[turn % 2]).await;
                        clicks += 1;
                        turn += 1;
                    }
                    // New sessions keep starting too, and ids no instance knows (expired,
                    // or forged) keep asking the store while it goes away.
                    let r = get(&c, &format!("{}/app", bases[fresh % 2])).await;
                    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                    let unknown = format!("{}/app?_s=gone{fresh:012}", bases[(fresh + 1) % 2]);
                    let r = get(&c, &unknown).await;
                    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                    fresh += 1;
                }
                (clicks, fresh)
            }
        });
        tokio::time::sleep(Duration::from_millis(1200)).await;
        redis.kill();
        let (clicks, fresh) = load.await.expect("every request answered, on its image");
        assert!(
            clicks > 50 && fresh > 5,
            "{clicks} clicks, {fresh} new sessions"
        );
        for p in [&a, &b] {
            let m = p.metrics(&c).await;
            assert_eq!(metric(&m, "tidegate_store_up"), 0.0);
            assert!(
                metric(&m, "tidegate_store_lookups_total{outcome=\"missing\"}") > 0.0
                    && metric(&m, "tidegate_store_lookups_total{outcome=\"skipped\"}") > 0.0,
                "lookups before and during the outage:\n{m}"
            );
            p.log_shows("shared store degraded", 1, Duration::from_secs(5))
                .await;
            assert_eq!(store_status(p, &c).await, "degraded");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_is_refilled_and_shares_again() {
    bounded("redis restarted", async {
        let mut redis = Redis::start();
        let imgs = images(3, Tracking::Links).await;
        let (a, b) = pair(&redis, &imgs, "").await;
        let c = client();
        // Known to A only, then the store loses everything.
        let mut before = Session::open(&c, &a.base()).await;
        written(&a, &c, 1.0).await;
        redis.kill();
        redis.restart();
        assert_eq!(redis.keys(), 0);
        for p in [&a, &b] {
            metric_reaches(p, &c, "tidegate_store_up", 1.0).await;
            p.log_shows("shared store recovered", 1, Duration::from_secs(5))
                .await;
        }
        // Used at A after the store came back: written again, so B finds it.
        before.click(&c, &a.base()).await;
        metric_reaches(&a, &c, "tidegate_store_writes_total{kind=\"refill\"}", 1.0).await;
        before.click(&c, &b.base()).await;
        // A session begun after the restart is shared as before.
        let mut after = Session::open(&c, &b.base()).await;
        written(&b, &c, 1.0).await;
        after.click(&c, &a.base()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_store_delays_a_new_session_by_its_timeout_at_most() {
    bounded("hung store", async {
        let redis = Redis::start();
        let imgs = images(2, Tracking::Links).await;
        let (a, _b) = pair(&redis, &imgs, "").await;
        let c = client();
        let mut s = Session::open(&c, &a.base()).await;
        written(&a, &c, 1.0).await;
        redis.pause(true);
        // A session A holds never waits for the store.
        let started = Instant::now();
        s.click(&c, &a.base()).await;
        assert!(started.elapsed() < Duration::from_millis(500));
        // An id A does not know waits for the store's timeout (20 ms), then starts anew.
        let started = Instant::now();
        let r = get(&c, &format!("{}/app?_s=unknownXXXXXXXX", a.base())).await;
        let waited = started.elapsed();
        assert_eq!(r.status, StatusCode::OK);
        assert!(waited < Duration::from_millis(500), "{waited:?}");
        let m = a.metrics(&c).await;
        assert_eq!(
            metric(&m, "tidegate_store_lookups_total{outcome=\"timeout\"}"),
            1.0,
            "{m}"
        );
        // The probe finds it hung: lookups skip it until it answers again.
        metric_reaches(&a, &c, "tidegate_store_degraded_total", 1.0).await;
        let r = get(&c, &format!("{}/app?_s=unknownYYYYYYYY", a.base())).await;
        assert_eq!(r.status, StatusCode::OK);
        let m = a.metrics(&c).await;
        assert_eq!(
            metric(&m, "tidegate_store_lookups_total{outcome=\"skipped\"}"),
            1.0
        );
        redis.pause(false);
        metric_reaches(&a, &c, "tidegate_store_up", 1.0).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_for_a_backend_this_instance_lacks_is_a_counted_miss() {
    bounded("unknown backend", async {
        let redis = Redis::start();
        let imgs = images(2, Tracking::Links).await;
        // The pool the quick-start flags make is `default`: the same name at A.
        let at_a = body(&redis, &[&imgs[0], &imgs[1]], "").replace("\"app\"", "\"default\"");
        let a = Process::start(&at_a).await;
        // B lacks the second image; it runs from the quick-start flags, with `--store` and
        // the secret in the environment.
        let b = Launch::flags("b", &[format!("{}={}", imgs[0].name(), imgs[0].addr)])
            .args(&["--store", &redis.url()])
            .env("TIDEGATE_STORE_SECRET", "a secret both instances share")
            .start()
            .await;
        let c = client();
        let mut s = Session::open(&c, &a.base()).await;
        while s.image != imgs[1].name() {
            s = Session::open(&c, &a.base()).await;
        }
        written(&a, &c, 1.0).await;
        let r = get(&c, &format!("{}{}", b.base(), s.link)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.image(),
            imgs[0].name(),
            "a new session at the image B has"
        );
        let m = b.metrics(&c).await;
        assert_eq!(
            metric(
                &m,
                "tidegate_store_lookups_total{outcome=\"unknown-backend\"}"
            ),
            1.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_down_at_start_is_used_once_it_answers() {
    bounded("store down at start", async {
        let mut redis = Redis::start();
        redis.kill();
        let imgs = images(2, Tracking::Links).await;
        let (a, b) = pair(&redis, &imgs, "").await;
        let c = client();
        a.log_shows(
            "shared store not reachable at start",
            1,
            Duration::from_secs(5),
        )
        .await;
        // Serving all the same, from the local table.
        let mut s = Session::open(&c, &a.base()).await;
        s.click(&c, &a.base()).await;
        redis.restart();
        for p in [&a, &b] {
            metric_reaches(p, &c, "tidegate_store_up", 1.0).await;
        }
        let mut shared = Session::open(&c, &a.base()).await;
        written(&a, &c, 1.0).await;
        shared.click(&c, &b.base()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_are_shared_over_tls_with_the_password_from_the_environment() {
    bounded("rediss", async {
        let pki = support::pki::Pki::new();
        let leaf = pki.leaf(&["127.0.0.1"], 2020, 2100);
        let certs = TempDir::new("redis-tls");
        for (name, pem) in [("ca.pem", &pki.pem), ("cert.pem", &leaf.cert), ("key.pem", &leaf.key)] {
            certs.write(name, pem);
        }
        let redis = Redis::start_with(&[
            "--tls-cert-file",
            &certs.arg("cert.pem"),
            "--tls-key-file",
            &certs.arg("key.pem"),
            "--tls-ca-cert-file",
            &certs.arg("ca.pem"),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "a-redis-password",
        ]);
        let imgs = images(2, Tracking::Links).await;
        let text = || {
            format!(
                "listen = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\n\
                 [store]\nredis = \"rediss://{}/0\"\nca_file = {:?}\nsecret = \"a secret both instances share\"\n\
                 [[pool]]\nname = \"app\"\n{}",
                redis.addr,
                certs.arg("ca.pem"),
                backend_entries(&imgs),
            )
        };
        let instance = |label: &str, password: Option<&str>| {
            let launch = Launch::config(label, &text());
            match password {
                Some(p) => launch.env("REDIS_PASSWORD", p),
                None => launch.env_remove("REDIS_PASSWORD"),
            }
        };
        let a = instance("a", Some("a-redis-password")).start().await;
        let b = instance("b", Some("a-redis-password")).start().await;
        let c = client();
        let mut s = Session::open(&c, &a.base()).await;
        written(&a, &c, 1.0).await;
        s.click(&c, &b.base()).await;
        // Without the password the store refuses it, and it says why.
        let refused = instance("c", None).start().await;
        let log = refused
            .log_shows("shared store not reachable at start", 1, Duration::from_secs(5))
            .await;
        assert!(log.to_lowercase().contains("auth"), "{log}");
        let r = get(&c, &format!("{}/app", refused.base())).await;
        assert_eq!(r.status, StatusCode::OK, "serving all the same");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_the_affinity_cookie_carries_a_cookie_keeping_client_across_instances() {
    bounded("affinity cookie across instances", async {
        let imgs = images(3, Tracking::Links).await;
        let body = format!(
            "[[pool]]\nname = \"app\"\n[pool.affinity_cookie]\nname = \"tg\"\n\
             secret = \"a cookie secret both instances share\"\n{}",
            backend_entries(&imgs)
        );
        let (a, b) = (Process::start(&body).await, Process::start(&body).await);
        let mut spread = std::collections::HashSet::new();
        for _ in 0..6 {
            let mut browser = Browser::new(&a.base(), true);
            let first = browser.open("/app").await;
            spread.insert(first.image());
            // The next clicks at the other instance, which never saw the session.
            browser.base = b.base();
            let next = browser.click().await;
            assert_eq!(
                (next.image(), next.counter()),
                (first.image(), first.counter() + 1)
            );
            browser.base = a.base();
            assert_eq!(browser.click().await.image(), first.image());
        }
        assert!(spread.len() > 1, "new sessions spread: {spread:?}");
    })
    .await;
}
