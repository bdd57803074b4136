//! The farm changes while it serves, driven through the real binary: backends added under
//! load, drained, killed and brought back, removed; the configuration re-read on SIGHUP
//! under load; an invalid file on SIGHUP. No session whose backend stays ever moves, and no
//! request is lost.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::{
    HttpClient, Process, Reply, backend_entries, client, get, image, images, metric, send,
};
use tidegate::demo::{Image, ImageOptions, Tracking};

/// The most any one test may take.
const TEST_LIMIT: Duration = Duration::from_secs(60);
/// The most a state change may take to be seen.
const SEEN_LIMIT: Duration = Duration::from_secs(15);

async fn bounded<F: std::future::Future<Output = ()>>(what: &str, body: F) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {TEST_LIMIT:?}"));
}

/// A session: its key and the image that owns it.
#[derive(Clone, Debug)]
struct Session {
    key: String,
    image: String,
}

/// Opens a new session (Seaside 3: the key travels only in the page's links).
async fn open(c: &HttpClient, base: &str) -> Session {
    let r = get(c, &format!("{base}/app")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    Session {
        key: r.key().expect("the page names its session"),
        image: r.image(),
    }
}

/// One click in a session: the status and the image that answered.
async fn click(c: &HttpClient, base: &str, s: &Session, n: usize) -> (StatusCode, String) {
    let r = get(c, &format!("{base}/app?_s={}&_k=k{n}", s.key)).await;
    (r.status, r.image())
}

/// Sessions clicking in a loop until stopped (bounded in count too); every reply must be a
/// 200 from the session's own image, or the failure is recorded.
struct Load {
    stop: Arc<AtomicBool>,
    clicks: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(base: &str, sessions: &[Session]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clicks = Arc::new(AtomicUsize::new(0));
        let tasks = sessions
            .iter()
            .cloned()
            .map(|s| {
                let (stop, clicks, base) = (stop.clone(), clicks.clone(), base.to_string());
                tokio::spawn(async move {
                    let c = client();
                    let mut failures = Vec::new();
                    for n in 0..2_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let (status, image) = click(&c, &base, &s, n).await;
                        if status != StatusCode::OK || image != s.image {
                            failures.push(format!(
                                "session on {} got {status} from {image:?}",
                                s.image
                            ));
                        }
                        clicks.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    failures
                })
            })
            .collect();
        Load {
            stop,
            clicks,
            tasks,
        }
    }

    /// Waits until `n` more clicks went through.
    async fn clicks_past(&self, n: usize) {
        let target = self.clicks.load(Ordering::Relaxed) + n;
        while self.clicks.load(Ordering::Relaxed) < target {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops and returns every failure seen, and the clicks made.
    async fn finish(self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for t in self.tasks {
            failures.extend(t.await.expect("load task"));
        }
        (failures, self.clicks.load(Ordering::Relaxed))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_added_under_load_gets_new_sessions_and_no_session_breaks() {
    bounded("add under load", async {
        let farm = images(2, Tracking::Links).await;
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\n{}",
            backend_entries(&farm)
        ))
        .await;
        let c = client();
        let mut sessions = Vec::new();
        for _ in 0..16 {
            sessions.push(open(&c, &p.base()).await);
        }
        let load = Load::start(&p.base(), &sessions);
        load.clicks_past(50).await;

        let newcomer = image(ImageOptions::new("image-3")).await;
        let (r, v) = p
            .api(
                &c,
                Method::POST,
                "/api/pools/app/backends",
                &format!(
                    "{{\"name\": \"image-3\", \"address\": \"{}\", \"weight\": 1}}",
                    newcomer.addr
                ),
                true,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        assert_eq!(v["state"], "active");
        load.clicks_past(50).await;

        // New sessions reach the newcomer, in its round-robin share.
        let mut on_newcomer = 0;
        for _ in 0..12 {
            let s = open(&c, &p.base()).await;
            on_newcomer += usize::from(s.image == "image-3");
        }
        assert!(
            on_newcomer >= 3,
            "image-3 got {on_newcomer} of 12 new sessions"
        );
        load.clicks_past(50).await;
        let (failures, clicks) = load.finish().await;
        assert!(failures.is_empty(), "{failures:#?}");
        assert!(clicks >= 150, "the load ran ({clicks} clicks)");
        assert_eq!(newcomer.session_count(), on_newcomer);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_backend_keeps_its_sessions_gets_none_new_and_reaches_drained() {
    bounded("drain", async {
        let farm = images(2, Tracking::Links).await;
        // Pins expire after 3 s without use, so the drain can finish within the test.
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\n[pool.session]\nidle_timeout = 3\nmax_lifetime = 3600\n{}",
            backend_entries(&farm)
        ))
        .await;
        let c = client();
        let mut on_two = Vec::new();
        while on_two.len() < 3 {
            let s = open(&c, &p.base()).await;
            if s.image == "image-2" {
                on_two.push(s);
            }
        }
        let (r, v) = p
            .api(
                &c,
                Method::POST,
                "/api/pools/app/backends/image-2/drain",
                "",
                true,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(v["state"], "draining");
        assert_eq!(v["pins"], 3);

        // Removal is refused while sessions are pinned, with their number.
        let (r, v) = p
            .api(
                &c,
                Method::DELETE,
                "/api/pools/app/backends/image-2",
                "",
                true,
            )
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text());
        assert_eq!(v["pins"], 3);

        // Its sessions keep reaching it; no new session does.
        for round in 0..3 {
            for s in &on_two {
                assert_eq!(
                    click(&c, &p.base(), s, round).await,
                    (StatusCode::OK, "image-2".to_string())
                );
            }
        }
        for _ in 0..10 {
            assert_eq!(open(&c, &p.base()).await.image, "image-1");
        }
        // Left alone, its pins expire and it becomes drained, once.
        p.backend_becomes(&c, "app", "image-2", "state", "drained", SEEN_LIMIT)
            .await;
        assert_eq!(p.backend(&c, "app", "image-2").await["pins"], 0);
        let log = p.log_shows("backend drained", 1, SEEN_LIMIT).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(p.log().matches("backend drained").count(), 1, "{log}");
        let m = p.metrics(&c).await;
        assert_eq!(
            metric(&m, "tidegate_drains_finished_total{pool=\"app\"}"),
            1.0
        );
        assert_eq!(
            metric(
                &m,
                "tidegate_backend_state{pool=\"app\",backend=\"image-2\",state=\"drained\"}"
            ),
            1.0
        );
        // Now it goes without a fight, and its idle connections with it.
        let (r, _) = p
            .api(
                &c,
                Method::DELETE,
                "/api/pools/app/backends/image-2",
                "",
                true,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(
            p.backend(&c, "app", "image-2").await,
            serde_json::Value::Null
        );
        let m = p.metrics(&c).await;
        assert!(
            !m.contains("backend=\"image-2\""),
            "a removed backend's series disappear"
        );
    })
    .await;
}

/// The affinity cookie value a reply sets (`tidegate=VALUE; …`), or `""`.
fn cookie_set(r: &Reply) -> String {
    r.header("set-cookie")
        .strip_prefix("tidegate=")
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_default()
        .to_string()
}

/// GET `path` carrying the affinity cookie `value`.
async fn get_with_cookie(c: &HttpClient, base: &str, path: &str, value: &str) -> Reply {
    let cookie = format!("tidegate={value}");
    send(
        c,
        Method::GET,
        &format!("{base}{path}"),
        &[("cookie", &cookie)],
        Bytes::new(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_or_disabled_backends_affinity_cookie_starts_no_session_there() {
    bounded("cookie of a draining backend", async {
        let farm = images(2, Tracking::Links).await;
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\n[pool.affinity_cookie]\nsecret = \"0123456789abcdef-drain\"\n{}",
            backend_entries(&farm)
        ))
        .await;
        let c = client();
        // A browser with a session on image-2 (pinned from its first page) and its cookie.
        let (session, cookie) = loop {
            let r = get(&c, &format!("{}/app", p.base())).await;
            if r.image() == "image-2" {
                break (r.key().expect("the page names its session"), cookie_set(&r));
            }
        };
        assert!(!cookie.is_empty(), "the first reply sets the cookie");
        let (r, _) = p
            .api(
                &c,
                Method::POST,
                "/api/pools/app/backends/image-2/drain",
                "",
                true,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());

        // Its session keeps reaching it.
        let click = format!("/app?_s={session}&_k=k1");
        let r = get_with_cookie(&c, &p.base(), &click, &cookie).await;
        assert_eq!((r.image(), r.counter()), ("image-2".to_string(), 2));
        // A session key tidegate does not know (expired, or made up) with image-2's cookie,
        // or no key at all: a new session, on image-1, which sets its own cookie.
        for n in 0..4 {
            let path = if n % 2 == 0 {
                format!("/app?_s={}&_k=x", tidegate::demo::random_key(16))
            } else {
                "/app".to_string()
            };
            let r = get_with_cookie(&c, &p.base(), &path, &cookie).await;
            assert_eq!(
                (r.status, r.image(), r.counter()),
                (StatusCode::OK, "image-1".to_string(), 1),
                "{path}"
            );
            assert!(!cookie_set(&r).is_empty() && cookie_set(&r) != cookie);
        }
        assert_eq!(
            p.backend(&c, "app", "image-2").await["pins"],
            1,
            "no session started on the draining image"
        );

        // Disabled: nothing reaches it on its cookie's word (its sessions are redispatched).
        let (r, _) = p
            .api(
                &c,
                Method::POST,
                "/api/pools/app/backends/image-2/disable",
                "",
                true,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        for path in [
            format!("/app?_s={}&_k=x", tidegate::demo::random_key(16)),
            "/app".to_string(),
        ] {
            let r = get_with_cookie(&c, &p.base(), &path, &cookie).await;
            assert_eq!((r.status, r.image()), (StatusCode::OK, "image-1".to_string()));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_cookie_secrets_rotate_on_reload_without_moving_a_browser() {
    bounded("secret rotation", async {
        let farm = images(2, Tracking::Links).await;
        let body = |secrets: &str| {
            format!(
                "[[pool]]\nname = \"app\"\n[pool.affinity_cookie]\n{secrets}\n{}",
                backend_entries(&farm)
            )
        };
        let (old, new) = ("old-secret-0123456789", "new-secret-0123456789");
        let p = Process::start(&body(&format!("secret = \"{old}\""))).await;
        let c = client();
        let reload = async |secrets: String| {
            p.configure(&body(&secrets));
            let (r, v) = p.api(&c, Method::POST, "/api/reload", "", true).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            assert_eq!(v["pools_changed"], serde_json::json!(["app"]), "{v}");
        };
        let first = get(&c, &format!("{}/app", p.base())).await;
        let (image, signed_old) = (first.image(), cookie_set(&first));
        assert!(!signed_old.is_empty());

        // The new secret signs, the old one still verifies: a browser holding the old cookie
        // stays on its image (a request naming no session follows a valid cookie), and gets
        // the new cookie in reply.
        reload(format!("secrets = [\"{new}\", \"{old}\"]")).await;
        let mut signed_new = String::new();
        for _ in 0..4 {
            let r = get_with_cookie(&c, &p.base(), "/app", &signed_old).await;
            assert_eq!(r.image(), image, "the old cookie still routes");
            signed_new = cookie_set(&r);
            assert!(
                !signed_new.is_empty() && signed_new != signed_old,
                "the reply carries the cookie under the new secret: {:?}",
                r.header("set-cookie")
            );
        }
        for _ in 0..4 {
            let r = get_with_cookie(&c, &p.base(), "/app", &signed_new).await;
            assert_eq!(r.image(), image, "the new cookie routes");
            assert_eq!(cookie_set(&r), "", "a current cookie is not set again");
        }

        // The old secret dropped: its cookie is ignored (new sessions go round), the new one
        // still routes.
        reload(format!("secrets = [\"{new}\"]")).await;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            let r = get_with_cookie(&c, &p.base(), "/app", &signed_old).await;
            assert_eq!(r.status, StatusCode::OK);
            seen.insert(r.image());
        }
        assert_eq!(seen.len(), 2, "an old cookie no longer routes: {seen:?}");
        for _ in 0..4 {
            let r = get_with_cookie(&c, &p.base(), "/app", &signed_new).await;
            assert_eq!(r.image(), image);
        }
    })
    .await;
}

/// A pool of three images with `extra` pool settings, and one session pinned to each.
async fn three_with_sessions(extra: &str) -> (Vec<Image>, Process, Vec<Session>) {
    let farm = images(3, Tracking::Links).await;
    let p = Process::start(&format!(
        "[[pool]]\nname = \"app\"\n{extra}\n{}",
        backend_entries(&farm)
    ))
    .await;
    let c = client();
    let mut sessions: Vec<Session> = Vec::new();
    while sessions.len() < 6 {
        sessions.push(open(&c, &p.base()).await);
    }
    (farm, p, sessions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_is_down_within_fall_attempts_and_its_sessions_are_redispatched() {
    bounded("kill, redispatch", async {
        let (farm, p, sessions) =
            three_with_sessions("[pool.health]\ncheck = \"passive\"\nfall = 2\ninterval = 60\n")
                .await;
        let c = client();
        farm[1].stop();
        // Its closed connections reach tidegate before the next request: a request that
        // still met a parked one in that instant would get the one 502 of a stale
        // connection (a written request is never sent twice).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let victims: Vec<&Session> = sessions.iter().filter(|s| s.image == "image-2").collect();
        let others: Vec<&Session> = sessions.iter().filter(|s| s.image != "image-2").collect();
        assert!(!victims.is_empty() && !others.is_empty());
        // Every request of a session on the dead image is answered by a live one at once:
        // its user sees a new session, never a 502.
        for (n, s) in victims.iter().enumerate() {
            let (status, image) = click(&c, &p.base(), s, n).await;
            assert_eq!(status, StatusCode::OK);
            assert_ne!(image, "image-2");
            // Re-pinned where it went: it stays there.
            assert_eq!(click(&c, &p.base(), s, 100 + n).await, (status, image));
        }
        // New sessions too, until the image is marked down: then they do not try it.
        for _ in 0..6 {
            let s = open(&c, &p.base()).await;
            assert_ne!(s.image, "image-2");
        }
        let b = p.backend(&c, "app", "image-2").await;
        assert_eq!(b["health"], "down", "down within fall = 2 refusals: {b}");
        assert_eq!(
            b["state"], "active",
            "health never rewrites the operator's state"
        );
        for (n, s) in others.iter().enumerate() {
            assert_eq!(
                click(&c, &p.base(), s, n).await,
                (StatusCode::OK, s.image.clone()),
                "no other session moves"
            );
        }
        let log = p.log_shows("backend down", 1, SEEN_LIMIT).await;
        assert!(log.contains("session redispatched"), "{log}");
        let m = p.metrics(&c).await;
        assert!(metric(&m, "tidegate_redispatches_total{pool=\"app\"}") >= victims.len() as f64);
        assert_eq!(
            metric(
                &m,
                "tidegate_backend_health{pool=\"app\",backend=\"image-2\",health=\"down\"}"
            ),
            1.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_pinned_down_fail_a_dead_backends_sessions_get_503_and_come_back_with_it() {
    bounded("kill, fail, recover", async {
        let (farm, p, sessions) = three_with_sessions(
            "on_pinned_down = \"fail\"\n[pool.health]\ncheck = \"tcp\"\ninterval = 1\ntimeout = 0.5\nrise = 1\nfall = 1\n",
        )
        .await;
        let c = client();
        let address = farm[1].addr;
        farm[1].stop();
        // Its closed connections reach tidegate before the next request: a request that
        // still met a parked one in that instant would get the one 502 of a stale
        // connection (a written request is never sent twice).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let victim = sessions
            .iter()
            .find(|s| s.image == "image-2")
            .expect("a session on image-2");
        let r = get(&c, &format!("{}/app?_s={}&_k=x", p.base(), victim.key)).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert!(r.header("retry-after").parse::<u64>().is_ok_and(|s| s >= 1));
        // The body names neither the backend nor its address; the log line does.
        assert!(
            !r.text().contains("image-2") && !r.text().contains(&address.port().to_string()),
            "{}",
            r.text()
        );
        p.log_shows("backend image-2, which holds this session", 1, SEEN_LIMIT)
            .await;
        for s in sessions.iter().filter(|s| s.image != "image-2") {
            assert_eq!(click(&c, &p.base(), s, 1).await, (StatusCode::OK, s.image.clone()));
        }
        // The active check finds it down too; new sessions avoid it.
        p.backend_becomes(&c, "app", "image-2", "health", "down", SEEN_LIMIT)
            .await;
        let failures = "tidegate_health_check_failures_total{pool=\"app\",backend=\"image-2\"}";
        let deadline = Instant::now() + SEEN_LIMIT;
        while metric(&p.metrics(&c).await, failures) < 1.0 {
            assert!(Instant::now() < deadline, "no failed check counted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for _ in 0..6 {
            assert_ne!(open(&c, &p.base()).await.image, "image-2");
        }
        // The image comes back on its port: the pin was kept, so the session goes home.
        let _back = Image::start(address, ImageOptions::new("image-2"))
            .await
            .expect("the port is free again");
        p.backend_becomes(&c, "app", "image-2", "health", "up", SEEN_LIMIT)
            .await;
        let (status, image) = click(&c, &p.base(), victim, 2).await;
        assert_eq!((status, image.as_str()), (StatusCode::OK, "image-2"));
        let m = p.metrics(&c).await;
        assert!(metric(&m, "tidegate_pinned_down_total{pool=\"app\"}") >= 1.0);
        assert!(
            metric(
                &m,
                "tidegate_backend_up_transitions_total{pool=\"app\",backend=\"image-2\"}"
            ) >= 1.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_check_takes_a_backend_out_by_its_status() {
    bounded("http check", async {
        let farm = images(2, Tracking::Links).await;
        // Both images answer 200 on /static/…; the second pool expects 418, so its image
        // fails every check.
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\n[pool.health]\ncheck = \"http\"\npath = \"/static/health\"\ninterval = 1\nrise = 1\nfall = 1\n{}\
             [[pool]]\nname = \"teapot\"\npath_prefix = \"/tea\"\n[pool.health]\ncheck = \"http\"\npath = \"/static/health\"\nexpect_status = 418\ninterval = 1\nfall = 2\n{}",
            backend_entries(&[&farm[0]]),
            backend_entries(&[&farm[1]])
        ))
        .await;
        let c = client();
        p.backend_becomes(&c, "app", "image-1", "health", "up", SEEN_LIMIT)
            .await;
        // Traffic to the failing image does not hide its failed checks: it goes down while
        // it is busy.
        let started = Instant::now();
        let mut served = 0;
        while p.backend(&c, "teapot", "image-2").await["health"] != "down" {
            assert!(
                started.elapsed() < SEEN_LIMIT,
                "image-2 failed its checks under traffic but stayed up:\n{}",
                p.log()
            );
            let r = get(&c, &format!("{}/tea/static/x.css", p.base())).await;
            served += usize::from(r.status == StatusCode::OK);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served > 10, "the image was busy ({served} replies) while its checks failed");
        let r = get(&c, &format!("{}/tea", p.base())).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert!(r.text().contains("teapot"), "{}", r.text());
        let log = p.log_shows("expected 418", 1, SEEN_LIMIT).await;
        assert!(log.contains("backend down"), "{log}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_under_load_adds_one_backend_and_removes_another_losing_no_request() {
    bounded("reload under load", async {
        let farm = images(4, Tracking::Links).await;
        let (one, two, three, four) = (&farm[0], &farm[1], &farm[2], &farm[3]);
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\n{}",
            backend_entries(&[one, two, three])
        ))
        .await;
        let c = client();
        let mut kept = Vec::new();
        let mut on_three = Vec::new();
        while kept.len() < 8 || on_three.len() < 2 {
            let s = open(&c, &p.base()).await;
            if s.image == "image-3" {
                on_three.push(s);
            } else {
                kept.push(s);
            }
        }
        let load = Load::start(&p.base(), &kept);
        // New sessions and the sessions of the backend that leaves: every request is
        // answered 200 while the file changes under them.
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let (stop, base, on_three) = (stop.clone(), p.base(), on_three.clone());
            tokio::spawn(async move {
                let c = client();
                let mut answered = Vec::new();
                for n in 0..2_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = get(&c, &format!("{base}/app")).await;
                    answered.push((r.status, r.image()));
                    for s in &on_three {
                        answered.push(click(&c, &base, s, n).await);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                answered
            })
        };
        load.clicks_past(40).await;
        p.configure(&format!(
            "[[pool]]\nname = \"app\"\n{}",
            backend_entries(&[one, two, four])
        ));
        p.hangup();
        p.log_shows("configuration reloaded", 1, SEEN_LIMIT).await;
        load.clicks_past(60).await;
        stop.store(true, Ordering::Relaxed);
        let answered = churn.await.expect("churn task");
        let (failures, _) = load.finish().await;
        assert!(failures.is_empty(), "{failures:#?}");
        assert!(
            answered.iter().all(|(status, _)| *status == StatusCode::OK),
            "a request failed during the reload: {:?}",
            answered
                .iter()
                .filter(|(s, _)| *s != StatusCode::OK)
                .collect::<Vec<_>>()
        );
        let log = p.log();
        assert!(
            log.contains("backends_added=[\"app/image-4\"]")
                && log.contains("backends_removed=[\"app/image-3\"]"),
            "{log}"
        );
        assert_eq!(
            p.backend(&c, "app", "image-3").await,
            serde_json::Value::Null
        );
        assert_eq!(p.backend(&c, "app", "image-4").await["state"], "active");
        // The newcomer gets new sessions; the sessions of the one that left were
        // redispatched and stay where they went.
        let mut on_four = 0;
        for _ in 0..9 {
            on_four += usize::from(open(&c, &p.base()).await.image == "image-4");
        }
        assert!(on_four >= 2, "image-4 got {on_four} of 9 new sessions");
        for s in &on_three {
            let (status, image) = click(&c, &p.base(), s, 5000).await;
            assert_eq!(status, StatusCode::OK);
            assert_ne!(image, "image-3");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_file_on_sighup_changes_nothing_and_says_why() {
    bounded("invalid reload", async {
        let farm = images(2, Tracking::Links).await;
        let body = format!(
            "[[pool]]\nname = \"app\"\n{}",
            backend_entries(&farm)
        );
        let p = Process::start(&body).await;
        let c = client();
        let s = open(&c, &p.base()).await;
        let before = p.backend(&c, "app", "image-1").await;
        // A weight out of range on line 8 of the file (after the three lines on top).
        p.configure(&format!(
            "[[pool]]\nname = \"app\"\n[[pool.backend]]\nname = \"image-1\"\naddress = \"{}\"\nweight = 0\n",
            farm[0].addr
        ));
        p.hangup();
        let log = p
            .log_shows("configuration reload failed", 1, SEEN_LIMIT)
            .await;
        assert!(
            log.contains("line 9") && log.contains("pool[0].backend[0].weight"),
            "the error names the line and the key, as `tidegate check` does: {log}"
        );
        assert_eq!(p.backend(&c, "app", "image-1").await, before);
        assert_eq!(p.backend(&c, "app", "image-2").await["state"], "active");
        assert_eq!(
            click(&c, &p.base(), &s, 1).await,
            (StatusCode::OK, s.image.clone())
        );
        // The API's reload says the same, with a 400.
        let (r, v) = p.api(&c, Method::POST, "/api/reload", "", true).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("pool[0].backend[0].weight")),
            "{v}"
        );
        // Fixed, it applies; the same file twice changes nothing the second time.
        p.configure(&body);
        let (r, v) = p.api(&c, Method::POST, "/api/reload", "", true).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(v["backends_added"], serde_json::json!([]));
        assert_eq!(v["backends_removed"], serde_json::json!([]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_runtime_changes_the_file_did_not_touch() {
    bounded("reload keeps API changes", async {
        let farm = images(3, Tracking::Links).await;
        let body = format!(
            "[[pool]]\nname = \"app\"\n{}",
            backend_entries(&[&farm[0], &farm[1]])
        );
        let p = Process::start(&body).await;
        let c = client();
        let (r, _) = p
            .api(
                &c,
                Method::POST,
                "/api/pools/app/backends",
                &format!(
                    "{{\"name\": \"image-3\", \"address\": \"{}\"}}",
                    farm[2].addr
                ),
                true,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        let (r, _) = p
            .api(
                &c,
                Method::POST,
                "/api/pools/app/backends/image-1/drain",
                "",
                true,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        // The file changes image-2's weight and nothing else.
        p.configure(&body.replacen(
            &format!("address = \"{}\"\n", farm[1].addr),
            &format!("address = \"{}\"\nweight = 3\n", farm[1].addr),
            1,
        ));
        let started = Instant::now();
        let (r, v) = p.api(&c, Method::POST, "/api/reload", "", true).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            v["backends_changed"],
            serde_json::json!(["app/image-2: weight 1 → 3"])
        );
        assert_eq!(p.backend(&c, "app", "image-2").await["weight"], 3);
        let one = p.backend(&c, "app", "image-1").await;
        assert!(
            one["state"] == "draining" || one["state"] == "drained",
            "{one}"
        );
        assert_eq!(p.backend(&c, "app", "image-3").await["state"], "active");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_sends_new_sessions_elsewhere_and_never_refuses_a_pinned_one() {
    bounded("max_sessions", async {
        let farm = images(2, Tracking::Links).await;
        let body = |two: &str| {
            format!(
                "[[pool]]\nname = \"app\"\n\
                 [[pool.backend]]\nname = \"image-1\"\naddress = \"{}\"\nmax_sessions = 2\n\
                 [[pool.backend]]\nname = \"image-2\"\naddress = \"{}\"\n{two}",
                farm[0].addr, farm[1].addr
            )
        };
        let p = Process::start(&body("")).await;
        let c = client();
        let mut sessions = Vec::new();
        for _ in 0..8 {
            sessions.push(open(&c, &p.base()).await);
        }
        let on_one: Vec<&Session> = sessions.iter().filter(|s| s.image == "image-1").collect();
        assert_eq!(on_one.len(), 2, "image-1 took its two sessions and no more");
        for (n, s) in sessions.iter().enumerate() {
            assert_eq!(
                click(&c, &p.base(), s, n).await,
                (StatusCode::OK, s.image.clone()),
                "a pinned session is served whatever the bound"
            );
        }
        // Bound image-2 too (by a reload): with both full, a new session is refused.
        p.configure(&body("max_sessions = 6\n"));
        let (r, v) = p.api(&c, Method::POST, "/api/reload", "", true).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(
            v["backends_changed"],
            serde_json::json!(["app/image-2: max_sessions none → 6"])
        );
        let r = get(&c, &format!("{}/app", p.base())).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert_eq!(
            click(&c, &p.base(), on_one[0], 99).await,
            (StatusCode::OK, "image-1".to_string())
        );
    })
    .await;
}

/// A backend that answers every request `200` after `delay`, one request per connection,
/// counting the requests it is serving at once (the most it saw is returned by `peak`).
struct SlowBackend {
    addr: std::net::SocketAddr,
    peak: Arc<AtomicUsize>,
}

impl SlowBackend {
    async fn start(delay: Duration) -> SlowBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let seen = peak.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (now, peak) = (now.clone(), seen.clone());
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 8192];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let serving = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(serving, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        });
        SlowBackend { addr, peak }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conns_queues_a_sessions_requests_for_its_own_backend_and_answers_them_all() {
    bounded("max_conns", async {
        let farm = images(2, Tracking::Links).await;
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\n\
             [[pool.backend]]\nname = \"image-1\"\naddress = \"{}\"\nmax_conns = 1\n\
             [[pool.backend]]\nname = \"image-2\"\naddress = \"{}\"\nmax_conns = 1\n",
            farm[0].addr, farm[1].addr
        ))
        .await;
        let c = client();
        let s = open(&c, &p.base()).await;
        let clicks: Vec<_> = (0..20)
            .map(|n| {
                let (base, s) = (p.base(), s.clone());
                tokio::spawn(async move {
                    let r = get(&client(), &format!("{base}/app?_s={}&_k=p{n}", s.key)).await;
                    (r.status, r.image(), r.counter())
                })
            })
            .collect();
        let mut counters = Vec::new();
        for click in clicks {
            let (status, image, counter) = click.await.unwrap();
            assert_eq!((status, image.as_str()), (StatusCode::OK, s.image.as_str()));
            counters.push(counter);
        }
        counters.sort();
        assert_eq!(
            counters,
            (2..=21).collect::<Vec<u64>>(),
            "each click counted once, on its own image"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_slow_queue_answers_503_with_retry_after_and_the_slot_bound_holds() {
    bounded("queue refusals", async {
        let slow = SlowBackend::start(Duration::from_millis(1000)).await;
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\naffinity = \"client-ip\"\n\
             [[pool.backend]]\nname = \"slow\"\naddress = \"{}\"\nmax_conns = 1\nqueue_max = 1\nqueue_timeout = 5\n\
             [[pool]]\nname = \"impatient\"\npath_prefix = \"/impatient\"\naffinity = \"client-ip\"\n\
             [[pool.backend]]\nname = \"slow-too\"\naddress = \"{}\"\nmax_conns = 1\nqueue_timeout = 0.2\n",
            slow.addr, slow.addr
        ))
        .await;
        let send = |path: &'static str, after: u64| {
            let base = p.base();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(after)).await;
                let r = get(&client(), &format!("{base}{path}")).await;
                (r.status, r.header("retry-after"), r.text())
            })
        };
        // One served, one waits its turn, the third finds the queue full.
        let replies = [send("/x", 0), send("/x", 250), send("/x", 500)];
        let mut out = Vec::new();
        for r in replies {
            out.push(r.await.unwrap());
        }
        assert_eq!(out[0].0, StatusCode::OK);
        assert_eq!(out[1].0, StatusCode::OK, "the queued request is served after the first");
        assert_eq!(out[2].0, StatusCode::SERVICE_UNAVAILABLE, "{}", out[2].2);
        assert!(out[2].2.contains("queue is full") && out[2].1 == "5", "{:?}", out[2]);
        assert!(
            !out[2].2.contains("slow") && !out[2].2.contains(&slow.addr.port().to_string()),
            "the body names no backend: {:?}",
            out[2]
        );
        p.log_shows("backend slow is busy (its queue is full)", 1, SEEN_LIMIT)
            .await;
        // A queue whose timeout passes before a slot frees.
        let replies = [send("/impatient", 0), send("/impatient", 250)];
        let first = replies.into_iter().map(|r| async { r.await.unwrap() });
        let mut got = Vec::new();
        for r in first {
            got.push(r.await);
        }
        assert_eq!(got[0].0, StatusCode::OK);
        assert_eq!(got[1].0, StatusCode::SERVICE_UNAVAILABLE, "{}", got[1].2);
        assert!(got[1].2.contains("queue timeout") && got[1].1 == "1", "{:?}", got[1]);
        assert!(!got[1].2.contains("slow"), "{:?}", got[1]);
        assert_eq!(slow.peak.load(Ordering::SeqCst), 1, "never two at once");
        let m = p.metrics(&client()).await;
        assert_eq!(
            metric(&m, "tidegate_queue_refused_total{pool=\"app\",backend=\"slow\",reason=\"full\"}"),
            1.0
        );
        assert_eq!(
            metric(
                &m,
                "tidegate_queue_refused_total{pool=\"impatient\",backend=\"slow-too\",reason=\"timeout\"}"
            ),
            1.0
        );
        assert_eq!(metric(&m, "tidegate_queued_total{pool=\"app\",backend=\"slow\"}"), 1.0);
    })
    .await;
}
