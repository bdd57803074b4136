//! Upgrades lose nothing: a new tidegate started with `--upgrade` (or by `tidegate upgrade`)
//! takes over the running one's listening sockets and pins over its control socket; the old
//! one finishes its requests, hands over the pins it learned meanwhile, and exits 0. No
//! connection is refused and no session moves. A new one that cannot start leaves the old
//! one serving. Sessions here travel only in page links (Seaside 3), the kind a restart
//! without the pins would log out.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use support::{
    HttpClient, Launch, Process, Reaped, Session, TempDir, backend_entries, client, exited, get,
    images, run, sessions, stderr, stdout, try_send,
};
use tidegate::demo::Tracking;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TEST_LIMIT: Duration = Duration::from_secs(90);

async fn bounded<F: std::future::Future<Output = ()>>(what: &str, body: F) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {TEST_LIMIT:?}"));
}

/// The configuration body: a state file (the control socket goes beside it) and one pool.
fn body(state: &TempDir, backends: &str) -> String {
    format!(
        "state_file = {:?}\nshutdown_timeout = 10\n[[pool]]\nname = \"app\"\n{backends}",
        state.arg("pins")
    )
}

/// `tidegate --config FILE --upgrade` for the process `old`, on its addresses.
async fn successor(old: &Process, label: &str) -> Process {
    let new = Launch::new(label)
        .arg("--config")
        .arg(old.dir.arg("tidegate.toml"))
        .arg("--upgrade")
        .listening_on(old.listen, old.admin)
        .start()
        .await;
    new.log_shows(
        "serving: the previous tidegate stops accepting",
        1,
        Duration::from_secs(20),
    )
    .await;
    new
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    failures: std::sync::Mutex<Vec<String>>,
}

/// Clicks through `sessions` until `stop` (at most 4000 requests): each click must reach
/// the session's image with its counter one up. `fresh` opens a new connection for every
/// request; otherwise connections are kept alive.
async fn click_until(
    base: String,
    mut sessions: Vec<Session>,
    fresh: bool,
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
) {
    let kept: HttpClient = client();
    for _ in 0..4000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        for s in &mut sessions {
            let c = if fresh { client() } else { kept.clone() };
            let url = format!("{base}{}", s.link);
            seen.requests.fetch_add(1, Ordering::Relaxed);
            let failure = match try_send(&c, Method::GET, &url, &[], "").await {
                Err(e) => Some(e),
                Ok(r) if r.status != StatusCode::OK => Some(format!("{}: {}", r.status, r.text())),
                Ok(r) if (r.image(), r.counter()) != (s.image.clone(), s.counter + 1) => {
                    Some(format!(
                        "{}: the session moved or lost its state: {} counter {} (was {} counter {})",
                        s.link,
                        r.image(),
                        r.counter(),
                        s.image,
                        s.counter
                    ))
                }
                Ok(r) => {
                    s.link = r.link().expect("a link");
                    s.counter += 1;
                    None
                }
            };
            if let Some(f) = failure {
                seen.failures.lock().unwrap().push(f);
                return;
            }
            // Think time.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_load_refuses_no_connection_and_moves_no_session() {
    bounded("upgrade under load", async {
        let imgs = images(3, Tracking::Links).await;
        let state = TempDir::new("upgrade-load");
        let mut old = Process::start(&body(&state, &backend_entries(&imgs))).await;
        let base = old.base();
        let all = sessions(&base, 12).await;
        let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Seen::default()));
        let mut clients = Vec::new();
        for (i, group) in all.chunks(3).enumerate() {
            clients.push(tokio::spawn(click_until(
                base.clone(),
                group.to_vec(),
                i % 2 == 0,
                stop.clone(),
                seen.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        let before = seen.requests.load(Ordering::Relaxed);
        let new = successor(&old, "upgrade-load-new").await;
        assert!(
            old.exited_within(Duration::from_secs(20)).await.success(),
            "the old tidegate exits 0 once its requests are done"
        );
        let handed_over = seen.requests.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.await.unwrap();
        }
        let failures = seen.failures.lock().unwrap().clone();
        assert!(failures.is_empty(), "failed requests: {failures:#?}");
        let total = seen.requests.load(Ordering::Relaxed);
        assert!(
            before > 50 && total > handed_over + 50,
            "load ran before ({before}) and after ({handed_over} → {total}) the upgrade"
        );
        let log = new.log();
        assert!(
            log.contains("pins taken over from the running tidegate restored=12"),
            "{log}"
        );
        assert!(
            log.contains("decision=\"pinned\""),
            "the new tidegate serves the sessions: {log}"
        );
    })
    .await;
}

/// A backend whose first pages (no `_s`) take `delay` and name a session of their own in a
/// link; later requests answer at once, with `x-image: slow`.
async fn slow_first_page(delay: Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                loop {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let first_page = !String::from_utf8_lossy(&head[..end]).contains("_s=");
                    head.drain(..end);
                    if first_page {
                        tokio::time::sleep(delay).await;
                    }
                    let page = "<a href=\"/app?_s=SlowSession0001&amp;_k=a\">go</a>";
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\nx-image: slow\r\ncontent-length: {}\r\n\r\n{page}",
                        page.len()
                    );
                    if stream.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An upgrade while the old process answers a first page that takes `delay` (a new
/// session on the `slow` backend, whose pin it learns while it finishes): the old process,
/// the request in flight, the new process, and the state directory they share.
async fn upgraded_during_a_slow_request(
    delay: Duration,
    label: &str,
) -> (
    Process,
    tokio::task::JoinHandle<support::Reply>,
    Process,
    TempDir,
) {
    let imgs = images(1, Tracking::Links).await;
    let slow = slow_first_page(delay).await;
    let state = TempDir::new(label);
    let backends = format!(
        "[[pool.backend]]\nname = \"slow\"\naddress = \"{slow}\"\n{}",
        backend_entries(&imgs)
    );
    let old = Process::start(&body(&state, &backends)).await;
    // Round robin: the first new session goes to the first backend, `slow`.
    let url = format!("{}/app", old.base());
    let in_flight = tokio::spawn(async move { get(&client(), &url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new = successor(&old, &format!("{label}-new")).await;
    (old, in_flight, new, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_the_old_process_learns_while_it_finishes_reach_the_new_one() {
    bounded("pins learned while finishing", async {
        let (mut old, in_flight, new, _state) =
            upgraded_during_a_slow_request(Duration::from_millis(1500), "upgrade-late").await;
        let first = in_flight.await.unwrap();
        assert_eq!(first.image(), "slow", "answered by the old tidegate");
        assert!(old.exited_within(Duration::from_secs(20)).await.success());
        new.log_shows(
            "pins the previous tidegate learned while it finished restored=1",
            1,
            Duration::from_secs(5),
        )
        .await;
        let c = client();
        for _ in 0..4 {
            let r = get(&c, &format!("{}/app?_s=SlowSession0001&_k=b", new.base())).await;
            assert_eq!(
                r.image(),
                "slow",
                "the session learned by the old one stays"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_right_after_an_upgrade_waits_for_the_old_process_to_finish_its_requests() {
    bounded("stop while the old one finishes", async {
        let (mut old, in_flight, mut new, _state) =
            upgraded_during_a_slow_request(Duration::from_millis(2000), "upgrade-stop").await;
        // Stopped at once, as `systemctl stop` stops the main process: it waits for the old
        // one, which systemd would kill with the rest of the service once the new one exits.
        assert!(new.terminate().await.success());
        assert!(
            old.exited_within(Duration::from_millis(200))
                .await
                .success(),
            "the old process had finished when the new one exited"
        );
        let first = in_flight.await.unwrap();
        assert_eq!(
            (first.status, first.image()),
            (StatusCode::OK, "slow".into())
        );
        let log = new.log();
        assert!(
            log.contains("waiting for the tidegate this one took over from")
                && log.contains("pins the previous tidegate learned while it finished restored=1"),
            "{log}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_begun_at_the_old_process_after_the_handover_stays_on_its_image_at_its_next_click()
 {
    bounded("session begun while the old one finishes", async {
        let imgs = images(3, Tracking::Links).await;
        let state = TempDir::new("upgrade-begun");
        let mut old = Process::start(&body(&state, &backend_entries(&imgs))).await;
        let base = old.base();
        // Browsers with a keep-alive connection to the old process each: their next request
        // goes there even after the handover (and its reply closes the connection).
        let browsers: Vec<HttpClient> = (0..7).map(|_| client()).collect();
        for b in &browsers {
            let r = get(b, &format!("{base}/static/site.css")).await;
            assert_eq!(r.status, StatusCode::OK);
        }
        let new = successor(&old, "upgrade-begun-new").await;
        // Six of them start a session now, at the old process. The seventh stays idle, so
        // the old process lingers (half of shutdown_timeout) before it is done.
        let mut begun = Vec::new();
        for b in &browsers[..6] {
            let first = get(b, &format!("{base}/app")).await;
            assert_eq!(first.status, StatusCode::OK, "{}", first.text());
            assert_eq!(
                first.header("connection"),
                "close",
                "answered by the old process"
            );
            begun.push(Session::of(&first));
        }
        // A browser's think time later (far less than the linger), each clicks its link: on
        // a new connection, so at the new process, which must know the session already.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let c = client();
        for s in &begun {
            let r = get(&c, &format!("{base}{}", s.link)).await;
            assert_eq!(
                (r.image(), r.counter()),
                (s.image.clone(), s.counter + 1),
                "{}: the session begun at the old process moved at its first click:\n{}",
                s.link,
                new.log()
            );
        }
        assert!(old.exited_within(Duration::from_secs(20)).await.success());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_cannot_start_leaves_the_old_one_serving() {
    bounded("failed upgrade", async {
        let imgs = images(2, Tracking::Links).await;
        let state = TempDir::new("upgrade-fail");
        let mut old = Process::start(&body(&state, &backend_entries(&imgs))).await;
        let kept = sessions(&old.base(), 4).await;
        // The same farm, with a certificate file that holds none.
        let bad = old.dir.path("bad.pem");
        std::fs::write(&bad, "not a certificate\n").unwrap();
        let config = std::fs::read_to_string(old.dir.path("tidegate.toml")).unwrap();
        let tls_listen = support::free_addr();
        let broken = config.replacen(
            "[[pool]]",
            &format!(
                "listen_tls = [\"{tls_listen}\"]\n[tls]\n[[tls.certificate]]\ncert = {bad:?}\nkey = {bad:?}\n[[pool]]"
            ),
            1,
        );
        old.dir.write("broken.toml", &broken);
        let out = run(&["--config", &old.dir.arg("broken.toml"), "--upgrade"]).await;
        assert!(!out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("bad.pem"),
            "the new process says why it did not start: {}",
            stderr(&out)
        );
        old.log_shows("upgrade abandoned, still serving", 1, Duration::from_secs(5))
            .await;
        // The old one never stopped: the sessions go on there, and a good upgrade follows.
        let c = client();
        for s in &kept {
            let r = get(&c, &format!("{}{}", old.base(), s.link)).await;
            assert_eq!((r.image(), r.counter()), (s.image.clone(), s.counter + 1));
        }
        let new = successor(&old, "upgrade-fail-new").await;
        assert!(old.exited_within(Duration::from_secs(20)).await.success());
        for s in &kept {
            let r = get(&c, &format!("{}{}", new.base(), s.link)).await;
            assert_eq!(r.image(), s.image, "pins survive the failed attempt and the upgrade");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_with_nothing_to_take_over_says_so() {
    bounded("nothing to upgrade", async {
        let imgs = images(1, Tracking::Links).await;
        let state = TempDir::new("upgrade-none");
        let launch = Launch::new("upgrade-none");
        let config = launch.file(
            "tidegate.toml",
            &format!(
                "listen = [\"{}\"]\nadmin = \"off\"\n{}",
                support::free_addr(),
                body(&state, &backend_entries(&imgs))
            ),
        );
        let out = run(&["--config", &config, "--upgrade"]).await;
        exited(&out, 1, "--upgrade with no tidegate running");
        let said = stderr(&out);
        assert!(said.contains("no tidegate answers on"), "{said}");
        // Without a state file or control_socket there is no control socket at all.
        let plain = launch.file(
            "plain.toml",
            &format!(
                "listen = [\"{}\"]\nadmin = \"off\"\n[[pool]]\nname = \"app\"\n{}",
                support::free_addr(),
                backend_entries(&imgs)
            ),
        );
        let out = run(&["--config", &plain, "--upgrade"]).await;
        exited(&out, 1, "--upgrade without a control socket");
        let said = stderr(&out);
        assert!(said.contains("no control socket"), "{said}");
        let out = run(&["upgrade", "--config", &plain]).await;
        exited(&out, 2, "tidegate upgrade without a control socket");
        let said = stderr(&out);
        assert!(said.contains("no control socket"), "{said}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidegate_upgrade_starts_the_successor_and_waits_until_it_serves() {
    bounded("tidegate upgrade", async {
        let imgs = images(2, Tracking::Links).await;
        let state = TempDir::new("upgrade-command");
        let mut old = Process::start(&body(&state, &backend_entries(&imgs))).await;
        let kept = sessions(&old.base(), 4).await;
        let out = run(&["upgrade", "--config", &old.dir.arg("tidegate.toml")]).await;
        let said = stdout(&out);
        assert!(out.status.success(), "{said}{}", stderr(&out));
        let pid: u32 = said
            .split("(pid ")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the new pid in {said:?}"));
        let _successor = Reaped(pid);
        assert_ne!(pid, old.pid());
        assert!(old.exited_within(Duration::from_secs(20)).await.success());
        // The successor logs where the old process logged (the service's journal): here, its
        // log file; and the old one said it started it.
        let log = old
            .log_shows("listening (HTTP/1.1, h2c)", 2, Duration::from_secs(5))
            .await;
        assert!(log.contains("upgrade: successor started"), "{log}");
        let c = client();
        for s in &kept {
            let r = get(&c, &format!("{}{}", old.base(), s.link)).await;
            assert_eq!(
                (r.image(), r.counter()),
                (s.image.clone(), s.counter + 1),
                "served by the successor with the pins"
            );
        }
        // The successor takes upgrades in its turn.
        let out = run(&["upgrade", "--config", &old.dir.arg("tidegate.toml")]).await;
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        if let Some(next) = stdout(&out)
            .split("(pid ")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .and_then(|p| p.parse().ok())
        {
            let _next = Reaped(next);
            let r = get(&c, &format!("{}{}", old.base(), kept[0].link)).await;
            assert_eq!(r.status, StatusCode::OK);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_through_the_admin_api_survive_an_upgrade() {
    bounded("API changes across an upgrade", async {
        let imgs = images(2, Tracking::Links).await;
        let newcomer = support::image(tidegate::demo::ImageOptions::new("image-3")).await;
        let state = TempDir::new("upgrade-api");
        let mut old = Process::start(&body(&state, &backend_entries(&imgs))).await;
        let c = client();
        let (r, _) = old
            .api(
                &c,
                Method::POST,
                "/api/pools/app/backends",
                &format!(
                    "{{\"name\": \"image-3\", \"address\": \"{}\", \"weight\": 2}}",
                    newcomer.addr
                ),
                true,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        let on_newcomer: Vec<Session> = sessions(&old.base(), 8)
            .await
            .into_iter()
            .filter(|s| s.image == "image-3")
            .collect();
        assert!(!on_newcomer.is_empty(), "sessions reach the added backend");
        let (r, _) = old
            .api(
                &c,
                Method::POST,
                "/api/pools/app/backends/image-2/drain",
                "",
                true,
            )
            .await;
        assert!(r.status.is_success(), "{}", r.text());
        let new = successor(&old, "upgrade-api-new").await;
        assert!(old.exited_within(Duration::from_secs(20)).await.success());
        let (_, pool) = new.api(&c, Method::GET, "/api/pools/app", "", false).await;
        let backends = pool["backends"].as_array().expect("backends").clone();
        let find = |name: &str| {
            backends
                .iter()
                .find(|b| b["name"] == name)
                .unwrap_or_else(|| panic!("{name} in {pool}"))
                .clone()
        };
        assert_eq!(find("image-3")["weight"], 2, "{pool}");
        assert!(
            ["draining", "drained"].contains(&find("image-2")["state"].as_str().unwrap()),
            "{pool}"
        );
        // The added backend's sessions go on there; no new session reaches image-2.
        for s in &on_newcomer {
            let r = get(&c, &format!("{}{}", new.base(), s.link)).await;
            assert_eq!((r.image(), r.counter()), ("image-3".into(), s.counter + 1));
        }
        for s in sessions(&new.base(), 6).await {
            assert_ne!(s.image, "image-2", "a drained backend took a new session");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_the_old_process_found_down_is_down_in_the_new_one() {
    bounded("health across an upgrade", async {
        let mut imgs = images(2, Tracking::Links).await;
        let state = TempDir::new("upgrade-health");
        // Passive health: nothing probes a backend of unknown health, so only what the old
        // process learned can make image-2 down in the new one before traffic reaches it.
        let body = body(&state, &backend_entries(&imgs)).replace(
            "name = \"app\"\n",
            "name = \"app\"\n[pool.health]\ncheck = \"passive\"\nfall = 1\n",
        );
        let mut old = Process::start(&body).await;
        let c = client();
        drop(imgs.pop()); // image-2 stops listening.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // New sessions: the one routed to image-2 finds it refusing and moves on; image-2 is down.
        for _ in 0..4 {
            let r = get(&c, &format!("{}/app", old.base())).await;
            assert_eq!(r.image(), "image-1");
        }
        let health = |v: &serde_json::Value| {
            v["backends"]
                .as_array()
                .and_then(|b| b.iter().find(|b| b["name"] == "image-2"))
                .map(|b| b["health"].clone())
        };
        let (_, pool) = old.api(&c, Method::GET, "/api/pools/app", "", false).await;
        assert_eq!(health(&pool), Some("down".into()), "{pool}");
        let new = successor(&old, "upgrade-health-new").await;
        assert!(old.exited_within(Duration::from_secs(20)).await.success());
        let (_, pool) = new.api(&c, Method::GET, "/api/pools/app", "", false).await;
        assert_eq!(health(&pool), Some("down".into()), "{pool}");
        assert!(
            new.log().contains("the previous tidegate found it down"),
            "{}",
            new.log()
        );
    })
    .await;
}
