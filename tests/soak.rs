//! Fault soak: steady, browser-like load over a farm of image processes while the farm and
//! tidegate go through what production does to them, one event after another with quiet
//! periods between: an image killed with `SIGKILL` and started again on its port, a backend
//! added and one drained with `tidegate ctl`, the configuration re-read on `SIGHUP`, tidegate
//! restarted (`SIGTERM`, started again with its state file), and upgraded (`--upgrade`).
//!
//! Each user is a browser on a Seaside 3 application: no cookies, the session only in the
//! page's links (`/app?_s=…&_k=…`). It clicks a link or submits the form (a POST answered
//! with a redirect) after a think time, fetches a stylesheet now and then, and starts a new
//! session after 10 to 50 clicks. Most keep one keep-alive connection (re-sending, once
//! and on a new connection, a request whose reused connection closed before any reply, as
//! browsers do; counted as `retried`); every fourth opens a new connection per request.
//! Every reply is checked: the status, and for a session's page the session's own image
//! (`x-image`) with its counter one up (`x-counter`). A page from another image, or with
//! another count, is a broken session: the user carries on with the new session it shows.
//!
//! What is expected, and asserted:
//! - no broken session but the killed image's: `on_pinned_down` is `redispatch` (the
//!   default), so each of its sessions gets its next page from another image, a new session
//!   (counted apart, as `broken` under the killed image);
//! - no failed request but those in flight to the killed image (`lost` under the killed
//!   image: a 5xx of a request under way at the kill; the access logs must name the killed
//!   image for every 5xx);
//! - no refused connection but in the gap of the restart (a restart is not an upgrade:
//!   tidegate's listeners close until the next one has bound them again); during the
//!   upgrade none, and no request even sent again.
//!
//! `soak_small` runs in CI: two dozen users, each event once, two quiet seconds around each,
//! about 20 s. `soak_at_scale` (ignored) is the same scenario at the size `tests/soak.sh`
//! gives it through `SOAK_SESSIONS`, `SOAK_SECONDS` and `SOAK_THINK_MS`.

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use support::{ImageProcess, Launch, Process, Reply, TOKEN, TempDir, client, free_addr};

/// How big a soak is.
#[derive(Clone, Copy, Debug)]
struct Scale {
    /// Users browsing at once, each with one session at a time.
    users: usize,
    /// The quiet period before the first event and after each one.
    quiet: Duration,
    /// A user's think time between two requests, uniform in this range, in milliseconds.
    /// Below half of `shutdown_timeout` (the linger of an idle connection at an upgrade).
    think_ms: (u64, u64),
}

impl Scale {
    /// The CI soak: short, and light enough for a 2-core machine running a debug build.
    fn small() -> Scale {
        Scale {
            users: 24,
            quiet: Duration::from_secs(2),
            think_ms: (20, 300),
        }
    }

    /// The soak `tests/soak.sh` runs: `SOAK_SESSIONS` users (200), for about `SOAK_SECONDS`
    /// (240, spread over the eight quiet periods), thinking up to `SOAK_THINK_MS` (1000).
    fn from_env() -> Scale {
        let users = env_number("SOAK_SESSIONS", 200, 1, 2000);
        let seconds = env_number("SOAK_SECONDS", 240, 16, 3600);
        let think = env_number("SOAK_THINK_MS", 1000, 10, 4000);
        Scale {
            users: users as usize,
            quiet: Duration::from_secs(seconds) / 8,
            think_ms: (think / 10, think),
        }
    }

    /// The most the whole scenario may take: its quiet periods, and a margin for the
    /// starts, the waits for health and the restart.
    fn limit(&self) -> Duration {
        self.quiet * 8 + Duration::from_secs(120)
    }
}

/// `name` from the environment, within `min..=max`; `default` when unset.
fn env_number(name: &str, default: u64, min: u64, max: u64) -> u64 {
    let Ok(text) = std::env::var(name) else {
        return default;
    };
    let n: u64 = text
        .parse()
        .unwrap_or_else(|_| panic!("{name}={text:?} is not a number"));
    assert!(
        (min..=max).contains(&n),
        "{name}={n} is not within {min}..={max}"
    );
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_small() {
    soak(Scale::small()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the larger soak: tests/soak.sh runs it"]
async fn soak_at_scale() {
    soak(Scale::from_env()).await;
}

/// The events, in order; each one's window runs from its start to the next one's.
const EVENTS: [&str; 7] = [
    "steady",
    "kill -9 image-1, restart",
    "add image-5 (ctl)",
    "drain image-2 (ctl)",
    "reload (SIGHUP)",
    "restart (SIGTERM)",
    "upgrade (--upgrade)",
];
const KILL: usize = 1;
const ADD: usize = 2;
const DRAIN: usize = 3;
const RELOAD: usize = 4;
const RESTART: usize = 5;
const UPGRADE: usize = 6;
/// The image killed and started again.
const KILLED: &str = "image-1";
/// How long after the kill a 5xx still counts as a request in flight to the killed image
/// (tidegate meets the closed connections of the dead image within it).
const IN_FLIGHT: Duration = Duration::from_secs(1);
/// The most one request may take.
const REPLY_LIMIT: Duration = Duration::from_secs(20);
/// The most a state change may take to be seen.
const SEEN_LIMIT: Duration = Duration::from_secs(15);

/// What the users read: the event under way, when the image was killed, whether to stop.
#[derive(Default)]
struct Shared {
    event: AtomicUsize,
    killed_at: OnceLock<Instant>,
    stop: AtomicBool,
}

/// What the users saw during one event.
#[derive(Default, Clone, Debug)]
struct Tally {
    requests: usize,
    /// Failed requests (an unexpected status, a connection that broke) not in flight to
    /// the killed image.
    failed: usize,
    /// Connections refused, or new ones closed without a reply.
    refused: usize,
    /// Requests sent again because their reused connection closed before any reply.
    retried: usize,
    /// Sessions broken, not the killed image's.
    broken: usize,
    /// Requests in flight to the killed image that failed.
    lost_killed: usize,
    /// The killed image's sessions broken.
    broken_killed: usize,
    /// New sessions by the image that took them.
    new_sessions: BTreeMap<String, usize>,
    /// The first few failures, for the report.
    samples: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.failed += other.failed;
        self.refused += other.refused;
        self.retried += other.retried;
        self.broken += other.broken;
        self.lost_killed += other.lost_killed;
        self.broken_killed += other.broken_killed;
        for (image, n) in &other.new_sessions {
            *self.new_sessions.entry(image.clone()).or_default() += n;
        }
        for s in &other.samples {
            if self.samples.len() < 10 {
                self.samples.push(s.clone());
            }
        }
    }

    fn sample(&mut self, what: String) {
        if self.samples.len() < 10 {
            self.samples.push(what);
        }
    }
}

/// A session as its user knows it: the link of its last page, its image and its count.
struct Session {
    link: String,
    image: String,
    counter: u64,
    /// When its first page arrived.
    born: Instant,
    clicks_left: u32,
}

/// What one request came to.
enum Fetched {
    Reply(Reply),
    /// The connection was refused, or a new one closed without a reply.
    Refused(String),
    Failed(String),
}

/// A client connection, closed when dropped.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(addr: SocketAddr) -> Result<Conn, Fetched> {
    let stream = match tokio::time::timeout(REPLY_LIMIT, tokio::net::TcpStream::connect(addr)).await
    {
        Err(_) => return Err(Fetched::Failed("connect timed out".into())),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(Fetched::Refused(format!("connect: {e}")));
        }
        Ok(Err(e)) => return Err(Fetched::Failed(format!("connect: {e}"))),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Fetched::Failed(format!("handshake: {e}")))?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Conn { sender, task })
}

/// One browser.
struct User {
    listen: SocketAddr,
    /// A new connection for every request (else one kept alive).
    fresh: bool,
    rng: u64,
    think_ms: (u64, u64),
    conn: Option<Conn>,
    session: Option<Session>,
    shared: Arc<Shared>,
    /// By event.
    tally: Vec<Tally>,
}

impl User {
    /// A number in `0..n` (xorshift: each user's choices are the same from run to run).
    fn roll(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n
    }

    fn think(&mut self) -> Duration {
        let (lo, hi) = self.think_ms;
        Duration::from_millis(lo + self.roll(hi - lo + 1))
    }

    /// Browses until told to stop, or `max_requests` went out.
    async fn browse(mut self, max_requests: usize) -> Vec<Tally> {
        let first = self.think();
        tokio::time::sleep(first).await;
        while !self.shared.stop.load(Ordering::Relaxed)
            && self.tally.iter().map(|t| t.requests).sum::<usize>() < max_requests
        {
            self.step().await;
            let pause = self.think();
            tokio::time::sleep(pause).await;
        }
        self.tally
    }

    /// One page: a new session's first page, or a click or a form in the current one;
    /// sometimes its stylesheet too.
    async fn step(&mut self) {
        if self.session.as_ref().is_none_or(|s| s.clicks_left == 0) {
            self.open().await;
        } else if self.roll(5) == 0 {
            self.submit().await;
        } else {
            let link = self.session.as_ref().map(|s| s.link.clone());
            if let Some(link) = link {
                self.page(&link).await;
            }
        }
        if self.roll(4) == 0 {
            let (event, started, fetched) = self.fetch(Method::GET, "/static/site.css").await;
            match fetched {
                Fetched::Reply(r) if r.status == StatusCode::OK => {}
                other => self.failure(event, started, other, "stylesheet"),
            }
        }
    }

    /// A new session: the application's entry page.
    async fn open(&mut self) {
        self.session = None;
        let (event, started, fetched) = self.fetch(Method::GET, "/app").await;
        match fetched {
            Fetched::Reply(r)
                if r.status == StatusCode::OK
                    && r.counter() == 1
                    && r.link().is_some()
                    && !r.image().is_empty() =>
            {
                *self.tally[event].new_sessions.entry(r.image()).or_default() += 1;
                self.adopt(&r);
            }
            other => self.failure(event, started, other, "new session"),
        }
    }

    /// Takes the session a page shows as the user's own.
    fn adopt(&mut self, r: &Reply) {
        let clicks_left = 10 + self.roll(40) as u32;
        self.session = r.link().map(|link| Session {
            link,
            image: r.image(),
            counter: r.counter(),
            born: Instant::now(),
            clicks_left,
        });
    }

    /// Submits the page's form: a POST to its action (the page's link), answered with a
    /// redirect to the next page, which the browser then gets.
    async fn submit(&mut self) {
        let Some(link) = self.session.as_ref().map(|s| s.link.clone()) else {
            return;
        };
        let (event, started, fetched) = self.fetch(Method::POST, &link).await;
        let r = match fetched {
            Fetched::Reply(r) if r.status == StatusCode::FOUND => r,
            // The image did not know the session: a new one's first page.
            Fetched::Reply(r) if r.status == StatusCode::OK => {
                return self.judge(event, r);
            }
            other => return self.failure(event, started, other, "form"),
        };
        let location = r.header("location");
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if (r.image(), r.counter()) != (s.image.clone(), s.counter + 1) || location.is_empty() {
            // Another image never redirects a session it does not know: count it, and
            // start over.
            let what = format!(
                "{}: POST answered by {} counter {} (was {} counter {}), location {location:?}",
                s.link,
                r.image(),
                r.counter(),
                s.image,
                s.counter
            );
            self.broke(event, what);
            self.session = None;
            return;
        }
        s.counter += 1;
        self.page(&location).await;
    }

    /// Gets one page of the session and judges it.
    async fn page(&mut self, path: &str) {
        let (event, started, fetched) = self.fetch(Method::GET, path).await;
        match fetched {
            Fetched::Reply(r) if r.status == StatusCode::OK => self.judge(event, r),
            other => self.failure(event, started, other, "page"),
        }
    }

    /// A session's page: its own image with its count one up, or the session broke.
    fn judge(&mut self, event: usize, r: Reply) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let Some(link) = r.link() else {
            let what = format!("{}: a page without a link: {}", s.link, r.text());
            self.tally[event].failed += 1;
            self.tally[event].sample(what);
            return;
        };
        if r.image() == s.image && r.counter() == s.counter + 1 {
            s.link = link;
            s.counter += 1;
            s.clicks_left = s.clicks_left.saturating_sub(1);
            return;
        }
        let what = format!(
            "{}: the session moved or lost its state: {} counter {} (was {} counter {})",
            s.link,
            r.image(),
            r.counter(),
            s.image,
            s.counter
        );
        self.broke(event, what);
        self.adopt(&r);
    }

    /// The current session broke: the killed image's, or another (a failure).
    fn broke(&mut self, event: usize, what: String) {
        let killed = self.shared.killed_at.get().copied();
        let victim = self
            .session
            .as_ref()
            .zip(killed)
            .is_some_and(|(s, at)| s.image == KILLED && s.born < at);
        if victim {
            // The kill's doing, whenever the session clicked next.
            self.tally[KILL].broken_killed += 1;
        } else {
            self.tally[event].broken += 1;
            self.tally[event].sample(what);
        }
    }

    /// A request that got no answer it could use. A 5xx of a request under way at the kill
    /// is the killed image's (counted under the kill, even if it began before); the user
    /// clicks again after a think time.
    fn failure(&mut self, event: usize, started: Instant, fetched: Fetched, what: &str) {
        let in_flight_at_kill = self
            .shared
            .killed_at
            .get()
            .is_some_and(|&at| started <= at + IN_FLIGHT);
        let t = &mut self.tally[event];
        match fetched {
            Fetched::Reply(r) if r.status.is_server_error() && in_flight_at_kill => {
                let t = &mut self.tally[KILL];
                t.lost_killed += 1;
                t.sample(format!(
                    "{what}: in flight to the killed image: {} {}",
                    r.status,
                    r.text().trim()
                ));
            }
            Fetched::Reply(r) => {
                t.failed += 1;
                t.sample(format!("{what}: {} {}", r.status, r.text().trim()));
            }
            Fetched::Refused(e) => {
                t.refused += 1;
                t.sample(format!("{what}: refused: {e}"));
            }
            Fetched::Failed(e) => {
                t.failed += 1;
                t.sample(format!("{what}: {e}"));
            }
        }
    }

    /// Sends one request; the event it counts under and when it started, and what it came
    /// to. A request whose reused connection closed before any reply is sent once more on a
    /// new connection, as browsers do.
    async fn fetch(&mut self, method: Method, path: &str) -> (usize, Instant, Fetched) {
        let event = self.shared.event.load(Ordering::Relaxed);
        let started = Instant::now();
        self.tally[event].requests += 1;
        let mut resent = false;
        loop {
            let reused = match self.conn.as_mut() {
                Some(c) => c.sender.ready().await.is_ok(),
                None => false,
            };
            if !reused {
                self.conn = None;
                match connect(self.listen).await {
                    Ok(c) => self.conn = Some(c),
                    Err(f) => return (event, started, f),
                }
            }
            let conn = self.conn.as_mut().expect("a connection, kept or just made");
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(HOST, self.listen.to_string());
            let body = if method == Method::POST {
                req = req.header(CONTENT_TYPE, "application/x-www-form-urlencoded");
                Bytes::from_static(b"comment=hello+world")
            } else {
                Bytes::new()
            };
            let req = req.body(Full::new(body)).expect("a valid request");
            let head = match tokio::time::timeout(REPLY_LIMIT, conn.sender.send_request(req)).await
            {
                Err(_) => {
                    self.conn = None;
                    return (
                        event,
                        started,
                        Fetched::Failed("no reply within 20 s".into()),
                    );
                }
                Ok(Err(e)) => {
                    self.conn = None;
                    if reused && !resent {
                        resent = true;
                        self.tally[event].retried += 1;
                        self.tally[event].sample(format!("{path}: sent again: {e}"));
                        continue;
                    }
                    let f = if reused {
                        Fetched::Failed(format!("no reply: {e}"))
                    } else {
                        Fetched::Refused(format!("a new connection closed without a reply: {e}"))
                    };
                    return (event, started, f);
                }
                Ok(Ok(head)) => head,
            };
            let (parts, body) = head.into_parts();
            let body = match tokio::time::timeout(REPLY_LIMIT, body.collect()).await {
                Ok(Ok(b)) => b.to_bytes(),
                Ok(Err(e)) => {
                    self.conn = None;
                    return (event, started, Fetched::Failed(format!("body: {e}")));
                }
                Err(_) => {
                    self.conn = None;
                    return (event, started, Fetched::Failed("body: stalled".into()));
                }
            };
            let closes = parts
                .headers
                .get(CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            if self.fresh || closes {
                self.conn = None;
            }
            let reply = Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            };
            return (event, started, Fetched::Reply(reply));
        }
    }
}

/// The configuration file: the admin token, the state file (the upgrade's control socket
/// goes beside it), TCP health checks every second, and the pool's `backends`.
fn config(dir: &TempDir, listen: SocketAddr, admin: SocketAddr, backends: &str) -> String {
    format!(
        "listen = [\"{listen}\"]\nadmin = \"{admin}\"\nadmin_token_file = {:?}\n\
         state_file = {:?}\nshutdown_timeout = 10\n\
         [[pool]]\nname = \"app\"\n[pool.health]\ncheck = \"tcp\"\ninterval = 1\ntimeout = 0.5\n\
         {backends}",
        dir.arg("admin.token"),
        dir.arg("pins"),
    )
}

/// `tidegate --config FILE` (with `--upgrade` when `upgrade`) on the soak's addresses.
async fn tidegate(
    dir: &TempDir,
    label: &str,
    (listen, admin): (SocketAddr, SocketAddr),
    upgrade: bool,
) -> Process {
    let mut launch = Launch::new(label)
        .arg("--config")
        .arg(dir.arg("tidegate.toml"));
    if upgrade {
        launch = launch.arg("--upgrade");
    }
    launch.listening_on(listen, admin).start().await
}

/// `tidegate ctl <args>` with the admin token; panics unless it made the change.
async fn ctl(admin: SocketAddr, args: &[&str]) {
    let out = support::ctl(admin, args, Some(TOKEN)).await;
    assert!(
        out.status.success(),
        "tidegate ctl {args:?}: {}{}",
        support::stdout(&out),
        support::stderr(&out)
    );
}

async fn soak(scale: Scale) {
    let limit = scale.limit();
    tokio::time::timeout(limit, scenario(scale))
        .await
        .unwrap_or_else(|_| panic!("the soak did not finish within {limit:?}"));
}

async fn scenario(scale: Scale) {
    let dir = TempDir::new("soak");
    dir.write("admin.token", &format!("{TOKEN}\n"));
    let addrs = (free_addr(), free_addr());
    let mut images = Vec::new();
    for i in 1..=4 {
        images.push(ImageProcess::start(&format!("image-{i}"), free_addr()).await);
    }
    let entries = |extra: &dyn Fn(&str) -> &'static str, images: &[ImageProcess]| {
        images
            .iter()
            .map(|i| i.entry(extra(&i.name)))
            .collect::<String>()
    };
    dir.write(
        "tidegate.toml",
        &config(&dir, addrs.0, addrs.1, &entries(&|_| "", &images)),
    );
    let mut generations = vec![tidegate(&dir, "soak-1", addrs, false).await];
    let api = client();

    let shared = Arc::new(Shared::default());
    let max_requests = (scale.limit().as_millis() as u64 / scale.think_ms.0.max(1)) as usize;
    let users: Vec<_> = (0..scale.users)
        .map(|n| {
            let user = User {
                listen: addrs.0,
                fresh: n % 4 == 3,
                rng: 0x9E37_79B9_7F4A_7C15 ^ (n as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D),
                think_ms: scale.think_ms,
                conn: None,
                session: None,
                shared: shared.clone(),
                tally: vec![Tally::default(); EVENTS.len()],
            };
            tokio::spawn(user.browse(max_requests))
        })
        .collect();
    let mut starts = vec![Instant::now()];
    let begin = |event: usize, starts: &mut Vec<Instant>| {
        shared.event.store(event, Ordering::Relaxed);
        starts.push(Instant::now());
    };
    tokio::time::sleep(scale.quiet).await;

    // An image dies as a crashed VM does, and is started again on its port (empty).
    begin(KILL, &mut starts);
    let _ = shared.killed_at.set(Instant::now());
    images[0].kill().await;
    let p = &generations[0];
    p.backend_becomes(&api, "app", KILLED, "health", "down", SEEN_LIMIT)
        .await;
    tokio::time::sleep(scale.quiet).await;
    images[0] = ImageProcess::start(KILLED, images[0].addr).await;
    p.backend_becomes(&api, "app", KILLED, "health", "up", SEEN_LIMIT)
        .await;
    tokio::time::sleep(scale.quiet).await;

    // Scale out: a fifth image, added through the API.
    begin(ADD, &mut starts);
    images.push(ImageProcess::start("image-5", free_addr()).await);
    let added = images[4].addr.to_string();
    ctl(addrs.1, &["add", "app", "image-5", &added]).await;
    tokio::time::sleep(scale.quiet).await;

    // Drain: image-2 takes no new session; its sessions stay.
    begin(DRAIN, &mut starts);
    ctl(addrs.1, &["drain", "app", "image-2"]).await;
    tokio::time::sleep(scale.quiet).await;

    // Reload: the file now names image-5 and the drain (so a restart keeps both), and
    // gives image-3 weight 2.
    begin(RELOAD, &mut starts);
    let changed = |name: &str| match name {
        "image-2" => "state = \"drain\"\n",
        "image-3" => "weight = 2\n",
        _ => "",
    };
    dir.write(
        "tidegate.toml",
        &config(&dir, addrs.0, addrs.1, &entries(&changed, &images)),
    );
    p.hangup();
    let log = p.log_shows("configuration reloaded", 1, SEEN_LIMIT).await;
    assert!(log.contains("app/image-3: weight 1 → 2"), "{log}");
    tokio::time::sleep(scale.quiet).await;

    // Restart: SIGTERM, then a new tidegate on the same file and state file.
    begin(RESTART, &mut starts);
    let stopping = Instant::now();
    assert!(generations[0].terminate().await.success(), "exit 0");
    let next = tidegate(&dir, "soak-2", addrs, false).await;
    let gap = stopping.elapsed();
    next.log_shows("pins restored from the state file", 1, SEEN_LIMIT)
        .await;
    generations.push(next);
    tokio::time::sleep(scale.quiet).await;

    // Upgrade: a new tidegate takes the listening sockets and the pins over.
    begin(UPGRADE, &mut starts);
    let next = tidegate(&dir, "soak-3", addrs, true).await;
    next.log_shows(
        "serving: the previous tidegate stops accepting",
        1,
        SEEN_LIMIT,
    )
    .await;
    assert!(
        generations[1].exited_within(SEEN_LIMIT).await.success(),
        "the old tidegate exits 0 after the upgrade"
    );
    let handed_over = starts[UPGRADE].elapsed();
    generations.push(next);
    tokio::time::sleep(scale.quiet).await;
    starts.push(Instant::now());

    shared.stop.store(true, Ordering::Relaxed);
    let mut tally = vec![Tally::default(); EVENTS.len()];
    for u in users {
        let seen = u.await.expect("a user's task");
        for (all, one) in tally.iter_mut().zip(&seen) {
            all.add(one);
        }
    }
    let logs: String = generations.iter().map(Process::log).collect();
    report(scale, &tally, &starts, gap, handed_over);
    check(&tally, &logs);
}

/// The table of what each event saw.
fn report(scale: Scale, tally: &[Tally], starts: &[Instant], gap: Duration, upgrade: Duration) {
    let mut out = format!(
        "\nfault soak: {} users, think {}-{} ms, quiet periods of {:?}\n\
         {:<26} {:>6} {:>8} {:>6} {:>7} {:>7} {:>6} | {:>10} {:>12} | new sessions\n",
        scale.users,
        scale.think_ms.0,
        scale.think_ms.1,
        scale.quiet,
        "event",
        "secs",
        "requests",
        "failed",
        "refused",
        "retried",
        "broken",
        "lost@killed",
        "broken@killed",
    );
    let mut total = Tally::default();
    for (i, t) in tally.iter().enumerate() {
        total.add(t);
        let secs = starts[i + 1].duration_since(starts[i]).as_secs_f64();
        let sessions: Vec<String> = t
            .new_sessions
            .iter()
            .map(|(image, n)| format!("{}:{n}", image.trim_start_matches("image-")))
            .collect();
        let _ = writeln!(
            out,
            "{:<26} {secs:>6.1} {:>8} {:>6} {:>7} {:>7} {:>6} | {:>10} {:>12} | {}",
            EVENTS[i],
            t.requests,
            t.failed,
            t.refused,
            t.retried,
            t.broken,
            t.lost_killed,
            t.broken_killed,
            sessions.join(" ")
        );
    }
    let secs = starts[starts.len() - 1]
        .duration_since(starts[0])
        .as_secs_f64();
    let _ = writeln!(
        out,
        "{:<26} {secs:>6.1} {:>8} {:>6} {:>7} {:>7} {:>6} | {:>10} {:>12} |\n\
         restart: SIGTERM to serving again in {gap:?}; upgrade: handed over and the old \
         tidegate gone in {upgrade:?}",
        "total",
        total.requests,
        total.failed,
        total.refused,
        total.retried,
        total.broken,
        total.lost_killed,
        total.broken_killed,
    );
    for (i, t) in tally.iter().enumerate() {
        for s in &t.samples {
            let _ = writeln!(out, "  {}: {s}", EVENTS[i]);
        }
    }
    eprintln!("{out}");
}

/// The targets, and that each event did what it is for.
fn check(tally: &[Tally], logs: &str) {
    for (i, t) in tally.iter().enumerate() {
        let event = EVENTS[i];
        assert!(t.requests > 0, "{event}: no load");
        assert_eq!(t.failed, 0, "{event}: failed requests: {:#?}", t.samples);
        assert_eq!(t.broken, 0, "{event}: sessions broken: {:#?}", t.samples);
        if i != RESTART {
            assert_eq!(
                t.refused, 0,
                "{event}: connections refused: {:#?}",
                t.samples
            );
        }
        if i == UPGRADE {
            // Not even a browser's quiet retry: the old process closes no connection a
            // request may be on its way over.
            assert_eq!(
                t.retried, 0,
                "{event}: requests sent again: {:#?}",
                t.samples
            );
        }
        if i != KILL {
            assert_eq!(
                (t.lost_killed, t.broken_killed),
                (0, 0),
                "{event}: nothing is lost but at the kill"
            );
        }
    }
    assert!(
        tally[KILL].broken_killed > 0,
        "the killed image held sessions, and they noticed"
    );
    let after = |from: usize, image: &str| -> usize {
        tally[from..]
            .iter()
            .filter_map(|t| t.new_sessions.get(image))
            .sum()
    };
    assert!(
        after(ADD, "image-5") > 0,
        "the added image takes new sessions"
    );
    assert_eq!(
        after(RELOAD, "image-2"),
        0,
        "the drained image takes no new session"
    );
    // Every 5xx tidegate answered was a request in flight to the killed image.
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("tidegate::access") && l.contains(" status=5"))
        .collect();
    assert!(
        errors
            .iter()
            .all(|l| l.contains(&format!(" backend=\"{KILLED}\" "))),
        "5xx not from the killed image: {errors:#?}"
    );
    assert_eq!(
        errors.len(),
        tally[KILL].lost_killed,
        "the 5xx logged are those the users saw: {errors:#?}"
    );
}
