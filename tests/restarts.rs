//! Restarts lose nothing: a stop lets the requests in flight finish (up to
//! `shutdown_timeout`), refuses new connections and exits 0; the pins survive in the state
//! file, written at that stop and every `state_interval`, read back by the next tidegate.
//! Sessions here travel only in page links (Seaside 3), the kind a restart without it would
//! log out.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{Process, Session, TempDir, backend_entries, client, get, images};
use tidegate::demo::Tracking;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future<Output = ()>>(what: &str, body: F) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {TEST_LIMIT:?}"));
}

/// Opens `n` sessions on `base` (each a first page; the pin is learned from its links) and
/// clicks each once, before the restart.
async fn sessions(base: &str, n: usize) -> Vec<Session> {
    let c = client();
    let mut out = support::sessions(base, n).await;
    for s in &mut out {
        s.click(&c, base).await;
    }
    let images: std::collections::HashSet<_> = out.iter().map(|s| s.image.clone()).collect();
    assert!(images.len() > 1, "the sessions are spread over the images");
    out
}

/// Each session's next click on `base` reaches its image, which still holds it.
async fn all_kept(base: &str, sessions: &mut [Session]) {
    let c = client();
    for s in sessions {
        s.click(&c, base).await;
    }
}

fn body(state: &TempDir, images: &[tidegate::demo::Image], extra: &str) -> String {
    format!(
        "state_file = {:?}\n{extra}[[pool]]\nname = \"app\"\n{}",
        state.arg("pins"),
        backend_entries(images)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_learned_from_pages_survive_a_graceful_restart() {
    bounded("graceful restart", async {
        let imgs = images(3, Tracking::Links).await;
        let state = TempDir::new("state");
        let config = body(&state, &imgs, "");
        let mut p = Process::start(&config).await;
        let mut kept = sessions(&p.base(), 6).await;
        assert!(p.terminate().await.success(), "a graceful stop exits 0");
        let again = Process::start(&config).await;
        let log = again
            .log_shows("pins restored from the state file", 1, TEST_LIMIT)
            .await;
        assert!(log.contains("restored=6"), "{log}");
        all_kept(&again.base(), &mut kept).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_written_every_interval_survive_a_crash() {
    bounded("crash", async {
        let imgs = images(3, Tracking::Links).await;
        let state = TempDir::new("state-crash");
        let config = body(&state, &imgs, "state_interval = 1\n");
        let p = Process::start(&config).await;
        let mut kept = sessions(&p.base(), 6).await;
        // Two intervals, then SIGKILL: no chance to write at the end.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        drop(p);
        let again = Process::start(&config).await;
        again
            .log_shows("pins restored from the state file", 1, TEST_LIMIT)
            .await;
        all_kept(&again.base(), &mut kept).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_state_file_is_named_and_ignored() {
    bounded("damaged state file", async {
        let imgs = images(2, Tracking::Links).await;
        let state = TempDir::new("state-damaged");
        for (contents, said) in [
            (
                &b"TGSTATE\0\x01\0\0\0garbage that is not a snapshot"[..],
                "checksum mismatch",
            ),
            (&b"{\"pins\": []}"[..], "not a tidegate state file"),
        ] {
            std::fs::write(state.path("pins"), contents).unwrap();
            let mut p = Process::start(&body(&state, &imgs, "")).await;
            let log = p.log_shows("state file ignored", 1, TEST_LIMIT).await;
            assert!(log.contains(said), "{log}");
            let r = get(&client(), &format!("{}/app", p.base())).await;
            assert_eq!(r.status, StatusCode::OK);
            // Its next write replaces the damaged file with a good one.
            assert!(p.terminate().await.success());
            let bytes = std::fs::read(state.path("pins")).unwrap();
            assert!(tidegate::core::snapshot::decode(&bytes).is_ok());
        }
    })
    .await;
}

/// A backend that answers every request `delay` after its head arrived.
async fn slow_backend(delay: Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                tokio::time::sleep(delay).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_finishes_requests_in_flight_refuses_new_connections_and_exits_0() {
    bounded("graceful stop", async {
        let backend = slow_backend(Duration::from_millis(1500)).await;
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\n[[pool.backend]]\naddress = \"{backend}\"\n"
        ))
        .await;
        let (listen, url) = (p.listen, format!("{}/slow", p.base()));
        let in_flight = tokio::spawn(async move { get(&client(), &url).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = std::time::Instant::now();
        let stopping = tokio::spawn(async move {
            let mut p = p;
            p.terminate().await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            tokio::net::TcpStream::connect(listen).await.is_err(),
            "no new connection once the stop began"
        );
        let r = in_flight.await.unwrap();
        assert_eq!((r.status, r.text()), (StatusCode::OK, "slow".to_string()));
        assert!(stopping.await.unwrap().success(), "exit 0");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_waits_no_longer_than_shutdown_timeout() {
    bounded("shutdown_timeout", async {
        let backend = slow_backend(Duration::from_secs(30)).await;
        let mut p = Process::start(&format!(
            "shutdown_timeout = 1\n[[pool]]\nname = \"app\"\n[[pool.backend]]\naddress = \"{backend}\"\n"
        ))
        .await;
        // A raw request: its connection is cut by the stop.
        let mut stream = tokio::net::TcpStream::connect(p.listen).await.unwrap();
        stream
            .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = std::time::Instant::now();
        assert!(p.terminate().await.success());
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "{took:?}"
        );
        let log = p.log();
        assert!(log.contains("shutdown_timeout"), "{log}");
    })
    .await;
}
