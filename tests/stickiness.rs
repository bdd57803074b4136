//! Sessions stay on the image that created them, under concurrency, with and without cookies,
//! through GET links and POST forms; new sessions spread evenly; forged ids create nothing.

mod support;

use std::collections::HashMap;

use bytes::Bytes;
use http::Method;
use support::{Browser, farm, farm_with, images, send};
use tidegate::demo::Tracking;

/// One browser session: open the app, then act `steps` times; every reply must come from
/// the first image, whose counter counts every request of the session (a form POST and the
/// GET of its redirect count two).
async fn browse(base: String, keep_cookies: bool, steps: usize, seed: usize) -> String {
    let mut b = Browser::new(&base, keep_cookies);
    let first = b.open("/app").await;
    assert_eq!(first.counter(), 1, "a new session starts at 1");
    let image = first.image();
    let mut expected = 1;
    for step in 0..steps {
        let reply = match (seed + step) % 3 {
            0 => {
                expected += 1;
                b.click().await
            }
            1 => {
                expected += 2;
                b.submit_urlencoded().await
            }
            _ => {
                expected += 2;
                b.submit_multipart().await
            }
        };
        assert_eq!(reply.image(), image, "step {step}: session moved");
        assert_eq!(reply.counter(), expected, "step {step}: session state lost");
    }
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seaside3_sessions_without_cookies_stay_pinned_under_concurrency() {
    let f = farm(3, Tracking::Links).await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        tasks.push(tokio::spawn(browse(f.base.clone(), false, 40, i)));
    }
    let mut per_image: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        *per_image.entry(t.await.unwrap()).or_default() += 1;
    }
    assert_eq!(
        per_image.len(),
        3,
        "sessions spread over every image: {per_image:?}"
    );
    assert_eq!(
        f.pins(),
        30,
        "one pin per session, learned from the first page"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_sessions_stay_pinned_under_concurrency() {
    let f = farm(3, Tracking::Cookie).await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        tasks.push(tokio::spawn(browse(f.base.clone(), true, 40, i)));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(f.pins(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seaside28_form_sessions_stay_pinned_with_the_key_only_in_the_body() {
    let tracking = Tracking::Seaside28 {
        cookie: "counter".into(),
    };
    // Cookies off: after the first redirect, the key travels only in the forms' hidden field.
    let f = farm_with(
        images(3, tracking).await,
        "[pool.session]\ncookies = [\"counter\"]\n",
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..12u64 {
        let base = f.base.clone();
        tasks.push(tokio::spawn(async move {
            let mut b = Browser::new(&base, false);
            // The new session answers 302 + Set-Cookie; the redirect's GET is request 2.
            let first = b.open("/app").await;
            assert_eq!(first.counter(), 2);
            let image = first.image();
            for step in 0..30u64 {
                let reply = if (i + step) % 2 == 0 {
                    b.submit_urlencoded().await
                } else {
                    b.submit_multipart().await
                };
                assert_eq!(reply.image(), image);
                assert_eq!(reply.counter(), 2 * step + 4);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_spread_round_robin_within_five_percent() {
    let f = farm(3, Tracking::Links).await;
    let client = support::client();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let total = 3000;
    let mut tasks = Vec::new();
    for chunk in 0..10 {
        let client = client.clone();
        let url = format!("{}/app", f.base);
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..total / 10 {
                seen.push(support::get(&client, &url).await.image());
            }
            let _ = chunk;
            seen
        }));
    }
    for t in tasks {
        for image in t.await.unwrap() {
            *counts.entry(image).or_default() += 1;
        }
    }
    let expected = total / 3;
    for (image, n) in &counts {
        let off = (*n as f64 - expected as f64).abs() / expected as f64;
        assert!(off <= 0.05, "{image} got {n} of {total}: {counts:?}");
    }
    assert_eq!(counts.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_weights() {
    let imgs = images(2, Tracking::Links).await;
    let text = format!(
        "[[pool.backend]]\nname = \"{}\"\naddress = \"{}\"\nweight = 3\n\
         [[pool.backend]]\nname = \"{}\"\naddress = \"{}\"\nweight = 1\n",
        imgs[0].name(),
        imgs[0].addr,
        imgs[1].name(),
        imgs[1].addr
    );
    let config = tidegate::config::Config::from_toml(
        &format!("listen = [\"127.0.0.1:0\"]\n[[pool]]\nname = \"app\"\n{text}"),
        "t",
    )
    .unwrap();
    let running = tidegate::server::start(&config).await.unwrap();
    let client = support::client();
    let url = format!("http://{}/app", running.addrs()[0]);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        *counts
            .entry(support::get(&client, &url).await.image())
            .or_default() += 1;
    }
    assert_eq!(counts["image-1"], 300);
    assert_eq!(counts["image-2"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_ids_leave_the_table_unchanged() {
    let secret = "a-secret-of-at-least-16-bytes";
    let f = farm_with(
        images(3, Tracking::Links).await,
        &format!("[pool.affinity_cookie]\nsecret = \"{secret}\"\n"),
    )
    .await;
    // Ten real sessions, pinned from their first pages.
    let mut real = Vec::new();
    for _ in 0..10 {
        let mut b = Browser::new(&f.base, true);
        let page = b.open("/app").await;
        real.push((b, page.image()));
    }
    assert_eq!(f.pins(), 10);
    // A genuine affinity cookie, as an attacker would hold one.
    let genuine = real[0].0.cookies.as_ref().unwrap()["tidegate"].clone();

    let total = 100_000;
    let workers = 16;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = support::client();
        let base = f.base.clone();
        let genuine = genuine.clone();
        tasks.push(tokio::spawn(async move {
            let mut statuses: HashMap<u16, usize> = HashMap::new();
            for i in 0..total / workers {
                let id = tidegate::demo::random_key(16);
                // Rotate through every carrier, on paths where no image starts a session:
                // a static file and an Ajax call (403 for an unknown session, as Seaside).
                let path = if i % 2 == 0 {
                    "/static/app.css"
                } else {
                    "/app/ajax"
                };
                let cookie_hdr = format!("_s={id}; tidegate={genuine}");
                let forged_cookie = format!("tidegate=00000000.{id}");
                let form = format!("_s={id}&x=1");
                let (method, url, headers, body): (Method, String, Vec<(&str, &str)>, Bytes) =
                    match (i + w) % 5 {
                        0 => (
                            Method::GET,
                            format!("{base}{path}?_s={id}"),
                            vec![],
                            Bytes::new(),
                        ),
                        1 => (
                            Method::GET,
                            format!("{base}{path}"),
                            vec![("cookie", &cookie_hdr)],
                            Bytes::new(),
                        ),
                        2 => (
                            Method::GET,
                            format!("{base}{path};jsessionid={id}"),
                            vec![("cookie", &forged_cookie)],
                            Bytes::new(),
                        ),
                        3 => (
                            Method::POST,
                            format!("{base}{path}"),
                            vec![("content-type", "application/x-www-form-urlencoded")],
                            Bytes::from(form),
                        ),
                        _ => (
                            Method::GET,
                            format!("{base}{path}?_s={id}"),
                            vec![("cookie", &cookie_hdr)],
                            Bytes::new(),
                        ),
                    };
                let reply = send(&client, method, &url, &headers, body).await;
                *statuses.entry(reply.status.as_u16()).or_default() += 1;
            }
            statuses
        }));
    }
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for t in tasks {
        for (s, n) in t.await.unwrap() {
            *statuses.entry(s).or_default() += n;
        }
    }
    assert_eq!(statuses.values().sum::<usize>(), total);
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 403),
        "{statuses:?}"
    );
    assert_eq!(f.pins(), 10, "forged ids created pins");
    // The real sessions are still pinned where they were.
    for (mut b, image) in real {
        let reply = b.click().await;
        assert_eq!(reply.image(), image);
        assert_eq!(reply.counter(), 2);
    }
}
