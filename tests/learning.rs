//! Every way a request names its session (extraction) and every way a reply teaches the
//! balancer a new one (learning), each through real sockets.

mod support;

use bytes::Bytes;
use http::Method;
use support::{Browser, Farm, farm, farm_with, image, images, send};
use tidegate::core::affinity::PinKey;
use tidegate::core::backend::BackendId;
use tidegate::demo::{ImageOptions, Tracking};

/// The image a session key is pinned to, if any.
fn pinned_to(f: &Farm, key: &str) -> Option<BackendId> {
    f.balancer
        .pool("app")
        .unwrap()
        .table()
        .unwrap()
        .get(PinKey::of(key))
        .map(|p| p.backend)
}

/// Opens sessions until two live on different images; returns (key, image) pairs.
async fn two_sessions_on_different_images(f: &Farm) -> [(String, String); 2] {
    let client = support::client();
    let first = support::get(&client, &format!("{}/app", f.base)).await;
    loop {
        let other = support::get(&client, &format!("{}/app", f.base)).await;
        if other.image() != first.image() {
            return [
                (first.key().unwrap(), first.image()),
                (other.key().unwrap(), other.image()),
            ];
        }
    }
}

/// `/echo` through the balancer with these headers and body; returns the answering image.
async fn echo_image(f: &Farm, path: &str, headers: &[(&str, &str)], body: &[u8]) -> String {
    let client = support::client();
    let method = if body.is_empty() {
        Method::GET
    } else {
        Method::POST
    };
    let reply = send(
        &client,
        method,
        &format!("{}{path}", f.base),
        headers,
        Bytes::copy_from_slice(body),
    )
    .await;
    assert_eq!(reply.status, 200);
    if !body.is_empty() {
        assert!(
            reply.body.ends_with(body),
            "the body reached the backend unchanged"
        );
    }
    reply.image()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_carrier_reaches_the_pinned_image() {
    let f = farm_with(
        images(3, Tracking::Links).await,
        "[pool.session]\ncookies = [\"counter\", \"_s\"]\n",
    )
    .await;
    let [(key, image), _] = two_sessions_on_different_images(&f).await;
    let cookie_named_after_app = format!("theme=dark; counter={key}");
    let cookie_default = format!("_s={key}");
    let form = format!("comment=hi&_s={key}&_k=abc");
    let multipart_ct = "multipart/form-data; boundary=XyZzy";
    let multipart = format!(
        "--XyZzy\r\nContent-Disposition: form-data; name=\"comment\"\r\n\r\nhello\r\n\
--XyZzy\r\nContent-Disposition: form-data; name=\"_s\"\r\n\r\n{key}\r\n--XyZzy--\r\n"
    );
    for _ in 0..6 {
        assert_eq!(
            echo_image(&f, &format!("/echo?_k=1&_s={key}"), &[], b"").await,
            image,
            "query"
        );
        assert_eq!(
            echo_image(&f, &format!("/echo;jsessionid={key}?_k=1"), &[], b"").await,
            image,
            "path parameter"
        );
        assert_eq!(
            echo_image(&f, "/echo", &[("cookie", &cookie_named_after_app)], b"").await,
            image,
            "Seaside 2.8 cookie named after the application"
        );
        assert_eq!(
            echo_image(&f, "/echo", &[("cookie", &cookie_default)], b"").await,
            image,
            "cookie"
        );
        assert_eq!(
            echo_image(
                &f,
                "/echo",
                &[("content-type", "application/x-www-form-urlencoded")],
                form.as_bytes()
            )
            .await,
            image,
            "urlencoded body"
        );
        assert_eq!(
            echo_image(
                &f,
                "/echo",
                &[("content-type", multipart_ct)],
                multipart.as_bytes()
            )
            .await,
            image,
            "multipart body"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wins_over_cookie_and_an_invalid_id_counts_as_absent() {
    let f = farm(3, Tracking::Links).await;
    let [(k1, image1), (k2, image2)] = two_sessions_on_different_images(&f).await;
    let cookie = format!("_s={k2}");
    for _ in 0..5 {
        assert_eq!(
            echo_image(&f, &format!("/echo?_s={k1}"), &[("cookie", &cookie)], b"").await,
            image1,
            "the query field wins"
        );
        assert_eq!(
            echo_image(&f, "/echo?_s=not*valid", &[("cookie", &cookie)], b"").await,
            image2,
            "an invalid query id is absent, so the cookie decides"
        );
        let too_long = "A".repeat(65);
        assert_eq!(
            echo_image(
                &f,
                &format!("/echo?_s={too_long}"),
                &[("cookie", &cookie)],
                b""
            )
            .await,
            image2
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_field_beyond_the_peek_bound_is_not_read_and_the_body_is_intact() {
    let f = farm(3, Tracking::Links).await;
    let [(key, _), _] = two_sessions_on_different_images(&f).await;
    // 70 KiB of fields before `_s`: the 64 KiB peek must not find it, and must not cut it.
    let filler = "x=".to_string() + &"y".repeat(70 * 1024);
    let body = format!("{filler}&_s={key}");
    let client = support::client();
    let reply = send(
        &client,
        Method::POST,
        &format!("{}/echo", f.base),
        &[("content-type", "application/x-www-form-urlencoded")],
        body.clone(),
    )
    .await;
    assert!(reply.body.ends_with(body.as_bytes()));
    assert_eq!(f.pins(), 2, "nothing learned from a request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_body_learning_finds_a_key_split_across_chunks() {
    for chunk in [1, 7, 100] {
        let mut imgs = Vec::new();
        for i in 1..=2 {
            let mut o = ImageOptions::new(&format!("image-{i}"));
            o.chunk = chunk;
            imgs.push(image(o).await);
        }
        let f = farm_with(imgs, "").await;
        let mut b = Browser::new(&f.base, false);
        let page = b.open("/app").await;
        let key = page.key().unwrap();
        assert_eq!(
            pinned_to(&f, &key),
            Some(BackendId::from_name(&page.image())),
            "chunks of {chunk} bytes"
        );
        for n in 2..=10 {
            let r = b.click().await;
            assert_eq!((r.image(), r.counter()), (page.image(), n));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_cookie_of_a_session_cookie_is_learned() {
    // The page scan is off, so only the cookie can teach the pin.
    let f = farm_with(
        images(3, Tracking::Cookie).await,
        "[pool.session]\npage_scan_bytes = 0\n",
    )
    .await;
    let mut b = Browser::new(&f.base, true);
    let first = b.open("/app").await;
    let key = b.cookies.as_ref().unwrap()["_s"].clone();
    assert_eq!(
        pinned_to(&f, &key),
        Some(BackendId::from_name(&first.image()))
    );
    // Cookie only: a fresh request with nothing but the cookie stays on the image.
    let cookie = format!("_s={key}");
    for n in 2..=10 {
        let r = send(
            &support::client(),
            Method::GET,
            &format!("{}/app", f.base),
            &[("cookie", &cookie)],
            Bytes::new(),
        )
        .await;
        assert_eq!((r.image(), r.counter()), (first.image(), n));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn location_of_a_redirect_is_learned() {
    // Seaside 2.8 answers a new session with 302; the cookie is under a name the pool does not
    // know, so only Location can teach the pin.
    let tracking = Tracking::Seaside28 {
        cookie: "counter".into(),
    };
    let f = farm_with(
        images(3, tracking).await,
        "[pool.session]\ncookies = [\"other\"]\n",
    )
    .await;
    let client = support::client();
    let reply = support::get(&client, &format!("{}/app", f.base)).await;
    assert_eq!(reply.status, 302);
    let location = reply.header("location");
    let key = location.split("_s=").nth(1).unwrap().to_string();
    assert_eq!(
        pinned_to(&f, &key),
        Some(BackendId::from_name(&reply.image()))
    );
    for n in 2..=6 {
        let r = support::get(&client, &format!("{}{location}", f.base)).await;
        assert_eq!((r.image(), r.counter()), (reply.image(), n));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_id_is_routed_as_new_and_the_new_key_is_learned() {
    let f = farm(3, Tracking::Links).await;
    let client = support::client();
    let reply = support::get(&client, &format!("{}/app?_s=EXPIREDKEY123456", f.base)).await;
    assert_eq!(reply.counter(), 1, "the image started a new session");
    let fresh = reply.key().unwrap();
    assert_ne!(fresh, "EXPIREDKEY123456");
    assert_eq!(pinned_to(&f, "EXPIREDKEY123456"), None);
    assert_eq!(
        pinned_to(&f, &fresh),
        Some(BackendId::from_name(&reply.image()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_beyond_the_scan_window_are_not_learned() {
    let mut imgs = Vec::new();
    for i in 1..=3 {
        let mut o = ImageOptions::new(&format!("image-{i}"));
        o.padding = 40 * 1024;
        imgs.push(image(o).await);
    }
    let f = farm_with(imgs, "").await;
    let page = support::get(&support::client(), &format!("{}/app", f.base)).await;
    assert!(page.key().is_some());
    assert_eq!(f.pins(), 0, "the key lay past the default 32 KiB window");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_cookie_keeps_a_session_the_scan_missed_on_its_image() {
    let f = farm_with(
        padded_images(3).await,
        "[pool.affinity_cookie]\nname = \"tg\"\nsecret = \"0123456789abcdef0123\"\n",
    )
    .await;
    let mut b = Browser::new(&f.base, true);
    let first = b.open("/app").await;
    let key = first.key().unwrap();
    assert_eq!(pinned_to(&f, &key), None);
    let cookie = b.cookies.as_ref().unwrap()["tg"].clone();
    assert!(!cookie.contains("127.0.0.1"), "the cookie is opaque");
    // Every click carries the key and the cookie: the cookie routes it to its image. The
    // replies (light pages whose links name the key) only repeat the id the request named,
    // which is the client's word: the key stays unpinned, and the cookie keeps routing it.
    for n in 2..=6 {
        let r = b.click().await;
        assert_eq!((r.image(), r.counter()), (first.image(), n));
    }
    assert_eq!(pinned_to(&f, &key), None);
    assert_eq!(f.pins(), 0);
    // Without the cookie the key is unknown: a new session, as for any unknown key.
    let client = support::client();
    let r = support::get(&client, &format!("{}/app?_s={key}&_k=x", f.base)).await;
    assert_eq!(r.counter(), 1);
    assert_eq!(pinned_to(&f, &key), None);
    // A forged cookie is ignored: new session, and a genuine cookie is set in reply.
    let r = send(
        &client,
        Method::GET,
        &format!("{}/app", f.base),
        &[("cookie", "tg=0000abcd.00112233445566778899aabb")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.counter(), 1);
    assert!(r.header("set-cookie").starts_with("tg="));
}

/// Images whose first pages link their session only past the 32 KiB scan window.
async fn padded_images(n: usize) -> Vec<tidegate::demo::Image> {
    let mut imgs = Vec::new();
    for i in 1..=n {
        let mut o = ImageOptions::new(&format!("image-{i}"));
        o.padding = 40 * 1024;
        imgs.push(image(o).await);
    }
    imgs
}

/// `/search` through the balancer (a GET, or a POST of `body`), a page that shows what it
/// was asked for; returns the image that answered.
async fn search(f: &Farm, query: &str, headers: &[(&str, &str)], body: &str) -> String {
    let (method, headers) = if body.is_empty() {
        (Method::GET, headers.to_vec())
    } else {
        let mut h = headers.to_vec();
        h.push(("content-type", "application/x-www-form-urlencoded"));
        (Method::POST, h)
    };
    let reply = send(
        &support::client(),
        method,
        &format!("{}/search{query}", f.base),
        &headers,
        body.to_string(),
    )
    .await;
    assert_eq!(reply.status, 200);
    reply.image()
}

/// Client X knows client Y's session key. A search page shows it whatever X asks it to,
/// in its title, its text, an input and a link: no way of asking moves Y's pin to the image
/// that answered, and none pins the key, or an id X made up, to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_showing_what_a_client_sent_moves_no_pin_and_creates_none() {
    let f = farm(3, Tracking::Links).await;
    let mut y = Browser::new(&f.base, false);
    let page = y.open("/app").await;
    let key = page.key().unwrap();
    let home = BackendId::from_name(&page.image());
    assert_eq!(pinned_to(&f, &key), Some(home));
    let made_up = "MadeUpByX0123456";
    let mut answered = std::collections::HashSet::new();
    for _ in 0..2 {
        for id in [key.as_str(), made_up] {
            // Round robin sends these to every image, Y's and the others.
            let asked = [
                (format!("?q=?_s={id}"), String::new()),
                (format!("?q=%3F_s%3D{id}&_k=x"), String::new()),
                (format!("?q=x%26_s%3D{id}"), String::new()),
                (
                    format!("?q=?_s=%{:02X}{}", id.as_bytes()[0], &id[1..]),
                    String::new(),
                ),
                (String::new(), format!("q=?_s={id}")),
            ];
            for (query, body) in asked {
                let image = search(&f, &query, &[], &body).await;
                assert_eq!(
                    pinned_to(&f, &key),
                    Some(home),
                    "{image} took Y's pin: {query}{body}"
                );
                assert_eq!(f.pins(), 1, "{image} pinned an id: {query}{body}");
                answered.insert(image);
            }
        }
    }
    assert_eq!(
        answered.len(),
        3,
        "every image showed the ids: {answered:?}"
    );
    // Past the 64 KiB form peek, the request's own words are not seen: an image that shows
    // Y's key from there still cannot move Y's pin, which lives on another image.
    let filler = format!("filler={}", "f".repeat(70 * 1024));
    for _ in 0..3 {
        let image = search(&f, "", &[], &format!("{filler}&q=?_s={key}")).await;
        assert_eq!(pinned_to(&f, &key), Some(home), "{image} took Y's pin");
    }
    for n in 2..=4 {
        let r = y.click().await;
        assert_eq!(
            (r.image(), r.counter()),
            (page.image(), n),
            "Y stays on its image"
        );
    }
}

/// Client Y's session lies past the scan window: only the affinity cookie keeps it on its
/// image. Client X knows Y's key and holds a genuine cookie of another image: sending Y's key
/// there (whose page shows it back) must not pin it there, which would take Y's session away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_affinity_cookie_does_not_let_a_shown_id_be_pinned() {
    let f = farm_with(
        padded_images(3).await,
        "[pool.affinity_cookie]\nname = \"tg\"\nsecret = \"0123456789abcdef0123\"\n",
    )
    .await;
    let mut y = Browser::new(&f.base, true);
    let page = y.open("/app").await;
    let key = page.key().unwrap();
    assert_eq!(pinned_to(&f, &key), None);
    // X opens sessions of its own until it holds the cookie of another image.
    let mut x = Browser::new(&f.base, true);
    let other_cookie = loop {
        let mine = x.open("/app").await;
        if mine.image() != page.image() {
            break x.cookies.as_ref().unwrap()["tg"].clone();
        }
        x = Browser::new(&f.base, true);
    };
    let cookie = format!("tg={other_cookie}");
    for query in [format!("?_s={key}&q=?_s={key}"), format!("?q=?_s={key}")] {
        let answered = search(&f, &query, &[("cookie", &cookie)], "").await;
        assert_ne!(answered, page.image(), "the cookie routed X's request");
    }
    assert_eq!(
        pinned_to(&f, &key),
        None,
        "Y's key was pinned where X sent it"
    );
    let r = y.click().await;
    assert_eq!(
        (r.image(), r.counter()),
        (page.image(), 2),
        "Y stays on its image"
    );
}
