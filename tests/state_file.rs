//! Pins survive a restart: the state file, written at a graceful stop and every
//! `state_interval`, read back by the next tidegate. Sessions here travel only in page links
//! (Seaside 3), the kind a restart without it would log out.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{Process, TempDir, backend_entries, client, get, images};
use tidegate::demo::Tracking;

const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future<Output = ()>>(what: &str, body: F) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {TEST_LIMIT:?}"));
}

/// A session: the link of its last page, its image and its counter there.
struct Session {
    link: String,
    image: String,
    counter: u64,
}

/// Opens `n` sessions on `base` (each a first page; the pin is learned from its links) and
/// clicks each once.
async fn sessions(base: &str, n: usize) -> Vec<Session> {
    let c = client();
    let mut out = Vec::new();
    for _ in 0..n {
        let first = get(&c, &format!("{base}/app")).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.text());
        let r = get(&c, &format!("{base}{}", first.link().expect("a link"))).await;
        assert_eq!(r.image(), first.image(), "pinned before the restart");
        out.push(Session {
            link: r.link().expect("a link"),
            image: r.image(),
            counter: r.counter(),
        });
    }
    let images: std::collections::HashSet<_> = out.iter().map(|s| s.image.clone()).collect();
    assert!(images.len() > 1, "the sessions are spread over the images");
    out
}

/// Each session's next click on `base` reaches its image, which still holds it.
async fn all_kept(base: &str, sessions: &[Session]) {
    let c = client();
    for s in sessions {
        let r = get(&c, &format!("{base}{}", s.link)).await;
        assert_eq!(
            (r.image(), r.counter()),
            (s.image.clone(), s.counter + 1),
            "{}: the session went to another image after the restart",
            s.link
        );
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
        let p = Process::start(&config).await;
        let kept = sessions(&p.base(), 6).await;
        assert!(p.terminate().await.success(), "a graceful stop exits 0");
        let again = Process::start(&config).await;
        let log = again
            .log_shows("pins restored from the state file", 1, TEST_LIMIT)
            .await;
        assert!(log.contains("restored=6"), "{log}");
        all_kept(&again.base(), &kept).await;
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
        let kept = sessions(&p.base(), 6).await;
        // Two intervals, then SIGKILL: no chance to write at the end.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        drop(p);
        let again = Process::start(&config).await;
        again
            .log_shows("pins restored from the state file", 1, TEST_LIMIT)
            .await;
        all_kept(&again.base(), &kept).await;
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
            let p = Process::start(&body(&state, &imgs, "")).await;
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
