//! The JSON admin API and `tidegate ctl`, driven against the real binary: the token and its
//! three sources, every refusal (status and `{"error": ...}` body), backends added, drained,
//! re-weighted and removed while sessions are pinned to them, reloads, and `ctl`'s output
//! and exit statuses.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::{
    Api, Launch, Process, TempDir, backend_entries, ctl, exited, free_addr, get, images, run,
    stderr, stdout,
};
use tidegate::demo::{Image, Tracking};

/// The most a change may take to show (a pin learned, a log line written).
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// The token the tests configure; no other string in this file contains it.
const TOKEN: &str = "tg-secret-4b1d9e7f0c";

/// A configuration file with both listeners on ports the kernel picks, the top-level `extra`
/// and a pool `app` over `backends`.
fn config_text(extra: &str, backends: &[&Image]) -> String {
    format!(
        "listen = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\n{extra}\n[[pool]]\nname = \"app\"\n{}",
        backend_entries(backends)
    )
}

/// `NAME=ADDR` for `--backend`.
fn named(image: &Image) -> String {
    format!("{}={}", image.name(), image.addr)
}

/// This file's views of the admin API, on the shared launcher's [`Process`].
impl Process {
    async fn read(&self, path: &str) -> Api {
        self.call(Method::GET, path, None, "").await
    }

    async fn change(&self, method: Method, path: &str, body: &str) -> Api {
        self.call(method, path, Some(TOKEN), body).await
    }

    /// `GET /api/pools`, checked for status and shape.
    async fn pools(&self) -> Value {
        let r = self.read("/api/pools").await;
        assert_eq!(r.status, StatusCode::OK, "GET /api/pools: {}", r.text);
        assert_eq!(r.content_type, "application/json", "{r:?}");
        check_pools_shape(&r.json);
        r.json
    }

    /// The backend `name` of `pool` as `GET /api/pools` shows it.
    async fn listed(&self, pool: &str, name: &str) -> Option<Value> {
        let pools = self.pools().await;
        pools["pools"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == pool)?["backends"]
            .as_array()?
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
    }

    /// Backend name → pins, for `pool`.
    async fn pins(&self, pool: &str) -> BTreeMap<String, u64> {
        let pools = self.pools().await;
        pools["pools"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == pool))
            .and_then(|p| p["backends"].as_array())
            .map(|bs| {
                bs.iter()
                    .map(|b| {
                        (
                            b["name"].as_str().unwrap().to_string(),
                            b["pins"].as_u64().unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits (bounded) until `pool`'s pins are `want`.
    async fn await_pins(&self, pool: &str, want: &BTreeMap<String, u64>) {
        let deadline = Instant::now() + SETTLE_LIMIT;
        loop {
            let now = self.pins(pool).await;
            if &now == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pins of pool {pool}: {now:?}, expected {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) until the log has a line containing `needle`; the log.
    async fn await_log(&self, needle: &str) -> String {
        self.log_shows(needle, 1, SETTLE_LIMIT).await
    }

    /// `n` new sessions through the balancer: key → the image that serves it.
    async fn new_sessions(&self, n: usize) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for i in 0..n {
            let page = get(&self.client, &format!("{}/app", self.base())).await;
            assert_eq!(page.status, 200, "new session {i}: {}", self.log());
            let key = page.key().expect("the first page links its session");
            out.push((key, page.image()));
        }
        out
    }

    /// The image serving the session `key` now.
    async fn image_of(&self, key: &str) -> String {
        let reply = get(
            &self.client,
            &format!("{}/app?_s={key}&_k=next", self.base()),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", self.log());
        reply.image()
    }
}

const STATES: [&str; 4] = ["active", "draining", "drained", "disabled"];
const HEALTHS: [&str; 3] = ["up", "down", "unknown"];

/// A backend object: exactly the seven fields, each of its type, state and health from
/// their vocabularies.
fn check_backend_shape(b: &Value) {
    let o = b
        .as_object()
        .unwrap_or_else(|| panic!("a backend is an object: {b}"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "address",
            "health",
            "in_flight",
            "name",
            "pins",
            "state",
            "weight"
        ],
        "{b}"
    );
    assert!(b["name"].is_string(), "{b}");
    assert!(
        b["address"]
            .as_str()
            .is_some_and(|a| a.parse::<SocketAddr>().is_ok()),
        "{b}"
    );
    assert!(
        b["weight"].as_u64().is_some_and(|w| (1..=256).contains(&w)),
        "{b}"
    );
    assert!(
        b["state"].as_str().is_some_and(|s| STATES.contains(&s)),
        "{b}"
    );
    assert!(
        b["health"].as_str().is_some_and(|h| HEALTHS.contains(&h)),
        "{b}"
    );
    assert!(b["pins"].is_u64(), "{b}");
    assert!(b["in_flight"].as_i64().is_some_and(|n| n >= 0), "{b}");
}

fn check_pools_shape(v: &Value) {
    let o = v.as_object().unwrap_or_else(|| panic!("an object: {v}"));
    assert_eq!(o.keys().collect::<Vec<_>>(), ["pools"], "{v}");
    for p in v["pools"]
        .as_array()
        .unwrap_or_else(|| panic!("pools is a list: {v}"))
    {
        let mut keys: Vec<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["backends", "name"], "{p}");
        assert!(p["name"].is_string(), "{p}");
        for b in p["backends"].as_array().unwrap() {
            check_backend_shape(b);
        }
    }
}

/// A refusal: `status`, `content-type: application/json`, a body that is exactly
/// `{"error": "..."}` (plus `extra` keys) whose message contains each of `mentions`.
fn check_error(r: &Api, status: StatusCode, extra: &[&str], mentions: &[&str], what: &str) {
    assert_eq!(r.status, status, "{what}: {r:?}");
    assert_eq!(r.content_type, "application/json", "{what}: {r:?}");
    let o = r
        .json
        .as_object()
        .unwrap_or_else(|| panic!("{what}: the body is a JSON object: {r:?}"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want: Vec<&str> = extra.iter().copied().chain(["error"]).collect();
    want.sort_unstable();
    assert_eq!(keys, want, "{what}: {r:?}");
    let message = r.json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: error is a string: {r:?}"));
    assert!(!message.is_empty(), "{what}: {r:?}");
    for m in mentions {
        assert!(
            message.contains(m),
            "{what}: the error mentions {m:?}: {message:?}"
        );
    }
}

/// The token and the other secrets never reach the log.
fn assert_not_logged(t: &Process, secrets: &[&str]) {
    let log = t.log();
    for s in secrets {
        assert!(!log.contains(s), "the log shows the secret {s:?}:\n{log}");
    }
}

// --- reads ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_lists_the_quick_start_pool_named_default_with_backends_named_by_address() {
    let imgs = images(2, Tracking::Links).await;
    let (a, b) = (imgs[0].addr.to_string(), imgs[1].addr.to_string());
    let t = Launch::flags("read", &[a.clone(), b.clone()]).start().await;
    let pools = t.pools().await;
    let list = pools["pools"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{pools}");
    assert_eq!(list[0]["name"], "default", "{pools}");
    let backends = list[0]["backends"].as_array().unwrap();
    let names: Vec<&str> = backends
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [a.as_str(), b.as_str()], "{pools}");
    for (backend, addr) in backends.iter().zip([&a, &b]) {
        assert_eq!(backend["address"], addr.as_str(), "{backend}");
        assert_eq!(backend["weight"], 1, "{backend}");
        assert_eq!(backend["state"], "active", "{backend}");
        assert_eq!(backend["pins"], 0, "{backend}");
    }
    // One pool, and one backend, by name; reads need no token.
    let one = t.read("/api/pools/default").await;
    assert_eq!(one.status, StatusCode::OK, "{one:?}");
    assert_eq!(one.json, list[0]);
    let backend = t.read(&format!("/api/pools/default/backends/{a}")).await;
    assert_eq!(backend.status, StatusCode::OK, "{backend:?}");
    assert_eq!(backend.content_type, "application/json");
    check_backend_shape(&backend.json);
    assert_eq!(backend.json["address"], a.as_str());
    // A trailing slash names the same resource.
    let slash = t.read("/api/pools/").await;
    assert_eq!(slash.status, StatusCode::OK, "{slash:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_api_path_is_a_404_json_error_whatever_the_method_or_token() {
    let imgs = images(1, Tracking::Links).await;
    let t = Launch::flags("unknown-path", &[named(&imgs[0])])
        .start()
        .await;
    for path in [
        "/api",
        "/api/",
        "/api/nope",
        "/api/pool",
        "/api/pools/default/backend",
        "/api/pools/default/backends/image-1/explode",
        "/api/pools/default/backends/image-1/drain/now",
        "/api/reload/now",
    ] {
        for (method, token) in [
            (Method::GET, None),
            (Method::POST, None),
            (Method::POST, Some(TOKEN)),
            (Method::DELETE, Some("wrong")),
        ] {
            let r = t.call(method.clone(), path, token, "").await;
            check_error(
                &r,
                StatusCode::NOT_FOUND,
                &[],
                &["/api/pools"],
                &format!("{method} {path}"),
            );
        }
    }
    // Unknown pools and backends are 404 too, as JSON.
    let r = t.read("/api/pools/nope").await;
    check_error(
        &r,
        StatusCode::NOT_FOUND,
        &[],
        &["nope"],
        "GET unknown pool",
    );
    let r = t.read("/api/pools/nope/backends").await;
    check_error(
        &r,
        StatusCode::NOT_FOUND,
        &[],
        &["nope"],
        "GET unknown pool's backends",
    );
    let r = t.read("/api/pools/default/backends/ghost").await;
    check_error(
        &r,
        StatusCode::NOT_FOUND,
        &[],
        &["ghost"],
        "GET unknown backend",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_is_a_405_json_error_naming_the_allowed_ones_whatever_the_token() {
    let imgs = images(1, Tracking::Links).await;
    let t = Launch::flags("wrong-method", &[named(&imgs[0])])
        .with_token_flag(TOKEN)
        .start()
        .await;
    let cases = [
        (Method::POST, "/api/pools", "GET"),
        (Method::DELETE, "/api/pools", "GET"),
        (Method::PUT, "/api/pools/default", "GET"),
        (Method::DELETE, "/api/pools/default/backends", "GET, POST"),
        (
            Method::POST,
            "/api/pools/default/backends/image-1",
            "GET, PATCH, DELETE",
        ),
        (
            Method::PUT,
            "/api/pools/default/backends/image-1",
            "GET, PATCH, DELETE",
        ),
        (
            Method::GET,
            "/api/pools/default/backends/image-1/drain",
            "POST",
        ),
        (
            Method::DELETE,
            "/api/pools/default/backends/image-1/enable",
            "POST",
        ),
        (Method::GET, "/api/reload", "POST"),
        (Method::PUT, "/api/reload", "POST"),
    ];
    for (method, path, allow) in cases {
        for token in [Some(TOKEN), None, Some("wrong")] {
            let what = format!("{method} {path} with token {token:?}");
            let r = t.call(method.clone(), path, token, "").await;
            check_error(&r, StatusCode::METHOD_NOT_ALLOWED, &[], &[allow], &what);
            assert_eq!(r.allow, allow, "{what}: {r:?}");
        }
    }
    // Nothing changed.
    assert_eq!(
        t.listed("default", "image-1").await.unwrap()["state"],
        "active"
    );
}

// --- the token ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_without_a_configured_token_are_a_403_saying_how_to_set_one() {
    let imgs = images(1, Tracking::Links).await;
    let t = Launch::flags("no-token", &[named(&imgs[0])]).start().await;
    assert!(
        t.log().contains("read-only: no admin token configured"),
        "{}",
        t.log()
    );
    let changes = [
        (
            Method::POST,
            "/api/pools/default/backends",
            r#"{"name":"x","address":"127.0.0.1:9"}"#,
        ),
        (
            Method::POST,
            "/api/pools/default/backends/image-1/drain",
            "",
        ),
        (
            Method::POST,
            "/api/pools/default/backends/image-1/disable",
            "",
        ),
        (
            Method::POST,
            "/api/pools/default/backends/image-1/enable",
            "",
        ),
        (
            Method::PATCH,
            "/api/pools/default/backends/image-1",
            r#"{"weight":3}"#,
        ),
        (
            Method::DELETE,
            "/api/pools/default/backends/image-1?force=true",
            "",
        ),
        (Method::POST, "/api/reload", ""),
    ];
    for (method, path, body) in changes {
        for token in [None, Some(TOKEN)] {
            let r = t.call(method.clone(), path, token, body).await;
            check_error(
                &r,
                StatusCode::FORBIDDEN,
                &[],
                &[
                    "admin_token_file",
                    "--admin-token-file",
                    "TIDEGATE_ADMIN_TOKEN",
                ],
                &format!("{method} {path} with {token:?}"),
            );
        }
    }
    // Reads still work, and nothing changed.
    let b = t
        .listed("default", "image-1")
        .await
        .expect("image-1 is still there");
    assert_eq!((&b["state"], &b["weight"]), (&json!("active"), &json!(1)));
    assert!(t.listed("default", "x").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_token_is_a_401_and_changes_nothing() {
    let imgs = images(1, Tracking::Links).await;
    let launch = Launch::flags("wrong-token", &[named(&imgs[0])]);
    let token_file = launch.file("token", &format!("{TOKEN}\n"));
    let t = launch
        .arg("--admin-token-file")
        .arg(&token_file)
        .start()
        .await;
    let drain = "/api/pools/default/backends/image-1/drain";
    let wrong_secret = "tg-wrong-9a8b7c6d5e";
    let auth = |v: String| vec![("authorization".to_string(), v)];
    let cases: Vec<(&str, Vec<(String, String)>)> = vec![
        ("no header", vec![]),
        ("empty bearer", auth("Bearer ".into())),
        ("wrong token", auth(format!("Bearer {wrong_secret}"))),
        ("a prefix of it", auth(format!("Bearer {}", &TOKEN[..8]))),
        ("it and more", auth(format!("Bearer {TOKEN}x"))),
        ("another scheme", auth(format!("Basic {TOKEN}"))),
        ("no scheme", auth(TOKEN.into())),
        (
            "in another header",
            vec![("x-token".into(), format!("Bearer {TOKEN}"))],
        ),
    ];
    for (what, headers) in cases {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let r = t.call_with(Method::POST, drain, &headers, "").await;
        check_error(
            &r,
            StatusCode::UNAUTHORIZED,
            &[],
            &["Authorization: Bearer"],
            what,
        );
        assert_eq!(r.www_authenticate, "Bearer", "{what}: {r:?}");
    }
    assert_eq!(
        t.listed("default", "image-1").await.unwrap()["state"],
        "active",
        "a refused change changed nothing"
    );
    // The right token (the file's trailing newline is not part of it) is admitted.
    let r = t.change(Method::POST, drain, "").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    t.await_log("admin API: backend drain").await;
    assert_not_logged(&t, &[TOKEN, wrong_secret]);
}

/// Whether `token` may make a change on `t` (a re-weight of `backend` to its own weight).
async fn admitted(t: &Process, pool: &str, backend: &str, token: &str) -> bool {
    let r = t
        .call(
            Method::PATCH,
            &format!("/api/pools/{pool}/backends/{backend}"),
            Some(token),
            r#"{"weight": 1}"#,
        )
        .await;
    match r.status {
        StatusCode::OK => true,
        StatusCode::UNAUTHORIZED => false,
        _ => panic!("token {token:?}: {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_files_admin_token_file_key_sets_the_token_relative_to_the_file() {
    let imgs = images(1, Tracking::Links).await;
    let launch = Launch::config(
        "token-key",
        &config_text("admin_token_file = \"secrets/token\"", &[&imgs[0]]),
    );
    std::fs::create_dir_all(launch.dir.path("secrets")).unwrap();
    std::fs::write(launch.dir.path("secrets/token"), format!("  {TOKEN}\n")).unwrap();
    let t = launch.start().await;
    assert!(
        t.log().contains("changes need the bearer token"),
        "{}",
        t.log()
    );
    assert!(admitted(&t, "app", "image-1", TOKEN).await);
    assert!(!admitted(&t, "app", "image-1", "tg-other").await);
    t.await_log("admin API: backend re-weighted").await;
    assert_not_logged(&t, &[TOKEN]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_env_variable_sets_the_token() {
    let imgs = images(1, Tracking::Links).await;
    let t = Launch::flags("token-env", &[named(&imgs[0])])
        .env("TIDEGATE_ADMIN_TOKEN", TOKEN)
        .start()
        .await;
    assert!(admitted(&t, "default", "image-1", TOKEN).await);
    assert!(!admitted(&t, "default", "image-1", "tg-other").await);
    t.await_log("admin API: backend re-weighted").await;
    assert_not_logged(&t, &[TOKEN]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_file_flag_wins_over_the_file_key_and_the_env_variable() {
    let imgs = images(1, Tracking::Links).await;
    let (from_key, from_flag, from_env) = ("tg-key-1111", "tg-flag-2222", "tg-env-3333");
    let launch = Launch::config(
        "token-flag",
        &config_text("admin_token_file = \"key-token\"", &[&imgs[0]]),
    );
    launch.file("key-token", from_key);
    let flag_file = launch.file("flag-token", from_flag);
    let t = launch
        .arg("--admin-token-file")
        .arg(&flag_file)
        .env("TIDEGATE_ADMIN_TOKEN", from_env)
        .start()
        .await;
    assert!(admitted(&t, "app", "image-1", from_flag).await);
    assert!(!admitted(&t, "app", "image-1", from_key).await);
    assert!(!admitted(&t, "app", "image-1", from_env).await);
    t.await_log("admin API: backend re-weighted").await;
    assert_not_logged(&t, &[from_key, from_flag, from_env]);

    // And the file key wins over the variable.
    let launch = Launch::config(
        "token-key-env",
        &config_text("admin_token_file = \"key-token\"", &[&imgs[0]]),
    );
    launch.file("key-token", from_key);
    let t = launch.env("TIDEGATE_ADMIN_TOKEN", from_env).start().await;
    assert!(admitted(&t, "app", "image-1", from_key).await);
    assert!(!admitted(&t, "app", "image-1", from_env).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_or_empty_token_file_stops_the_start_naming_it() {
    for (label, contents) in [("missing", None), ("empty", Some(" \n"))] {
        let dir = TempDir::new(label);
        if let Some(c) = contents {
            dir.write("token", c);
        }
        let out = run(&[
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:9",
            "--admin-token-file",
            &dir.arg("token"),
        ])
        .await;
        assert!(!out.status.success(), "{label}: {out:?}");
        let err = stderr(&out);
        assert!(err.contains(&dir.arg("token")), "{label}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_reaches_the_log_even_at_debug_level() {
    let imgs = images(2, Tracking::Links).await;
    let launch = Launch::flags("token-log", &[named(&imgs[0])]).env("RUST_LOG", "debug");
    let token_file = launch.file("token", TOKEN);
    let t = launch
        .arg("--admin-token-file")
        .arg(&token_file)
        .start()
        .await;
    let wrong = "tg-guess-0f0f0f0f";
    let add = json!({"name": "image-2", "address": imgs[1].addr.to_string()}).to_string();
    let r = t
        .call(
            Method::POST,
            "/api/pools/default/backends",
            Some(wrong),
            &add,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
    let r = t
        .change(Method::POST, "/api/pools/default/backends", &add)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let r = t
        .change(
            Method::POST,
            "/api/pools/default/backends/image-2/disable",
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let r = t
        .change(Method::DELETE, "/api/pools/default/backends/image-2", "")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    t.await_log("backend removed").await;
    assert_not_logged(&t, &[TOKEN, wrong]);
}

// --- adding ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_backend_is_a_201_with_the_backend_and_takes_new_sessions() {
    let imgs = images(2, Tracking::Links).await;
    let t = Launch::flags("add", &[named(&imgs[0])])
        .with_token_flag(TOKEN)
        .start()
        .await;
    // Before: every new session goes to image-1.
    for (_, image) in t.new_sessions(3).await {
        assert_eq!(image, "image-1");
    }
    let addr = imgs[1].addr.to_string();
    let r = t
        .change(
            Method::POST,
            "/api/pools/default/backends",
            &json!({"name": "image-2", "address": addr, "weight": 1}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.content_type, "application/json");
    check_backend_shape(&r.json);
    assert_eq!(r.json["name"], "image-2");
    assert_eq!(r.json["address"], addr.as_str());
    assert_eq!(r.json["weight"], 1);
    assert_eq!(r.json["state"], "active");
    assert_eq!(r.json["pins"], 0);
    let listed = t
        .listed("default", "image-2")
        .await
        .expect("listed after the add");
    assert_eq!(listed["address"], addr.as_str());

    // New sessions now reach it, and stay there.
    let sessions = t.new_sessions(6).await;
    let on_new: Vec<&String> = sessions
        .iter()
        .filter(|(_, i)| i == "image-2")
        .map(|(k, _)| k)
        .collect();
    assert!(
        on_new.len() >= 2,
        "round robin over two backends sends new sessions to the added one: {sessions:?}"
    );
    for key in &on_new {
        assert_eq!(t.image_of(key).await, "image-2", "session {key} moved");
    }
    // The added backend's pins are counted.
    let want = BTreeMap::from([
        ("image-1".to_string(), 3 + 6 - on_new.len() as u64),
        ("image-2".to_string(), on_new.len() as u64),
    ]);
    t.await_pins("default", &want).await;
    // The weight defaults to 1 when not given.
    let imgs3 = images(1, Tracking::Links).await;
    let r = t
        .change(
            Method::POST,
            "/api/pools/default/backends",
            &json!({"name": "image-3", "address": imgs3[0].addr.to_string()}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.json["weight"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_backend_name_is_a_409_naming_it() {
    let imgs = images(2, Tracking::Links).await;
    let t = Launch::flags("duplicate", &[named(&imgs[0])])
        .with_token_flag(TOKEN)
        .start()
        .await;
    // Same name, another address: still a clash.
    let body = json!({"name": "image-1", "address": imgs[1].addr.to_string(), "weight": 2});
    let r = t
        .change(
            Method::POST,
            "/api/pools/default/backends",
            &body.to_string(),
        )
        .await;
    check_error(&r, StatusCode::CONFLICT, &[], &["image-1"], "duplicate add");
    // A backend added through the API clashes as well.
    let body = json!({"name": "img3", "address": "127.0.0.1:9003", "weight": 1}).to_string();
    let r = t
        .change(Method::POST, "/api/pools/default/backends", &body)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let r = t
        .change(Method::POST, "/api/pools/default/backends", &body)
        .await;
    check_error(
        &r,
        StatusCode::CONFLICT,
        &[],
        &["img3"],
        "second add of img3",
    );
    let pools = t.pools().await;
    let names: Vec<&str> = pools["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["image-1", "img3"], "{pools}");
    assert_eq!(
        t.listed("default", "image-1").await.unwrap()["address"],
        imgs[0].addr.to_string(),
        "the clash left the first image-1 alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_new_backend_is_a_400_naming_the_field() {
    let imgs = images(1, Tracking::Links).await;
    let t = Launch::flags("bad-add", &[named(&imgs[0])])
        .with_token_flag(TOKEN)
        .start()
        .await;
    let cases = [
        (
            "bad address",
            r#"{"name": "img3", "address": "nowhere:80", "weight": 1}"#,
            "address",
        ),
        (
            "address without a port",
            r#"{"name": "img3", "address": "127.0.0.1", "weight": 1}"#,
            "address",
        ),
        (
            "weight 0",
            r#"{"name": "img3", "address": "127.0.0.1:9003", "weight": 0}"#,
            "weight",
        ),
        (
            "weight 300",
            r#"{"name": "img3", "address": "127.0.0.1:9003", "weight": 300}"#,
            "weight",
        ),
        (
            "weight as a string",
            r#"{"name": "img3", "address": "127.0.0.1:9003", "weight": "3"}"#,
            "weight",
        ),
        (
            "negative weight",
            r#"{"name": "img3", "address": "127.0.0.1:9003", "weight": -1}"#,
            "weight",
        ),
        (
            "missing name",
            r#"{"address": "127.0.0.1:9003", "weight": 1}"#,
            "name",
        ),
        (
            "name with a space",
            r#"{"name": "img 3", "address": "127.0.0.1:9003"}"#,
            "name",
        ),
        (
            "empty name",
            r#"{"name": "", "address": "127.0.0.1:9003"}"#,
            "name",
        ),
        ("missing address", r#"{"name": "img3"}"#, "address"),
        (
            "unknown field",
            r#"{"name": "img3", "address": "127.0.0.1:9003", "colour": "red"}"#,
            "colour",
        ),
        ("not JSON", "name=img3&address=127.0.0.1:9003", "body"),
        ("truncated JSON", r#"{"name": "img3", "#, "body"),
        (
            "something after the object",
            r#"{"name": "img3", "address": "127.0.0.1:9003"} x"#,
            "body",
        ),
        (
            "two objects",
            r#"{"name": "img3", "address": "127.0.0.1:9003"}{"name": "img4", "address": "127.0.0.1:9004"}"#,
            "body",
        ),
        ("empty body", "", "body"),
        (
            "a list",
            r#"[{"name": "img3", "address": "127.0.0.1:9003"}]"#,
            "body",
        ),
    ];
    for (what, body, field) in cases {
        let r = t
            .change(Method::POST, "/api/pools/default/backends", body)
            .await;
        check_error(&r, StatusCode::BAD_REQUEST, &[], &[field], what);
    }
    let names = t.pins("default").await;
    assert_eq!(
        names.keys().collect::<Vec<_>>(),
        ["image-1"],
        "no bad backend was added"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_to_an_unknown_pool_is_a_404_naming_it() {
    let imgs = images(1, Tracking::Links).await;
    let t = Launch::flags("add-unknown-pool", &[named(&imgs[0])])
        .with_token_flag(TOKEN)
        .start()
        .await;
    let body = r#"{"name": "img3", "address": "127.0.0.1:9003", "weight": 1}"#;
    let r = t
        .change(Method::POST, "/api/pools/nope/backends", body)
        .await;
    check_error(
        &r,
        StatusCode::NOT_FOUND,
        &[],
        &["nope"],
        "add to pool nope",
    );
}

// --- changing -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_enable_and_disable_answer_200_with_the_backend_in_its_new_state() {
    let imgs = images(2, Tracking::Links).await;
    let t = Launch::flags("states", &[named(&imgs[0]), named(&imgs[1])])
        .with_token_flag(TOKEN)
        .start()
        .await;
    let base = "/api/pools/default/backends/image-2";
    let steps = [
        ("drain", &["draining", "drained"][..]),
        ("enable", &["active"][..]),
        ("disable", &["disabled"][..]),
        ("enable", &["active"][..]),
    ];
    for (action, states) in steps {
        let r = t
            .change(Method::POST, &format!("{base}/{action}"), "")
            .await;
        assert_eq!(r.status, StatusCode::OK, "{action}: {r:?}");
        assert_eq!(r.content_type, "application/json");
        check_backend_shape(&r.json);
        assert_eq!(r.json["name"], "image-2");
        let state = r.json["state"].as_str().unwrap();
        assert!(states.contains(&state), "{action}: {}", r.json);
        let listed = t.listed("default", "image-2").await.unwrap();
        assert!(
            states.contains(&listed["state"].as_str().unwrap()),
            "{action}: listed as {listed}"
        );
    }
    // While image-2 is disabled, new sessions go to image-1 only.
    let r = t.change(Method::POST, &format!("{base}/disable"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    for (key, image) in t.new_sessions(4).await {
        assert_eq!(image, "image-1", "session {key} reached a disabled backend");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_on_an_unknown_backend_or_pool_is_a_404_naming_it() {
    let imgs = images(1, Tracking::Links).await;
    let t = Launch::flags("unknown-backend", &[named(&imgs[0])])
        .with_token_flag(TOKEN)
        .start()
        .await;
    for (pool, name, missing) in [("default", "ghost", "ghost"), ("nope", "image-1", "nope")] {
        let b = format!("/api/pools/{pool}/backends/{name}");
        let cases = [
            (Method::POST, format!("{b}/drain"), ""),
            (Method::POST, format!("{b}/enable"), ""),
            (Method::POST, format!("{b}/disable"), ""),
            (Method::PATCH, b.clone(), r#"{"weight": 3}"#),
            (Method::DELETE, b.clone(), ""),
            (Method::DELETE, format!("{b}?force=true"), ""),
        ];
        for (method, path, body) in cases {
            let r = t.change(method.clone(), &path, body).await;
            check_error(
                &r,
                StatusCode::NOT_FOUND,
                &[],
                &[missing],
                &format!("{method} {path}"),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_sets_the_weight_and_a_bad_weight_is_a_400_naming_it() {
    let imgs = images(1, Tracking::Links).await;
    let t = Launch::flags("weight", &[named(&imgs[0])])
        .with_token_flag(TOKEN)
        .start()
        .await;
    let path = "/api/pools/default/backends/image-1";
    let r = t.change(Method::PATCH, path, r#"{"weight": 3}"#).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.content_type, "application/json");
    check_backend_shape(&r.json);
    assert_eq!(
        (&r.json["name"], &r.json["weight"]),
        (&json!("image-1"), &json!(3))
    );
    assert_eq!(t.listed("default", "image-1").await.unwrap()["weight"], 3);
    for (what, body, field) in [
        ("weight 0", r#"{"weight": 0}"#, "weight"),
        ("weight 300", r#"{"weight": 300}"#, "weight"),
        ("weight as a string", r#"{"weight": "5"}"#, "weight"),
        ("no weight", r#"{}"#, "weight"),
        (
            "unknown field",
            r#"{"weight": 5, "state": "active"}"#,
            "state",
        ),
        ("not JSON", "weight=5", "body"),
        ("truncated JSON", r#"{"weight": 5"#, "body"),
        (
            "something after the object",
            r#"{"weight": 5} {"weight": 6}"#,
            "body",
        ),
        ("a list", "[5]", "body"),
    ] {
        let r = t.change(Method::PATCH, path, body).await;
        check_error(&r, StatusCode::BAD_REQUEST, &[], &[field], what);
    }
    assert_eq!(
        t.listed("default", "image-1").await.unwrap()["weight"],
        3,
        "a refused re-weight changed nothing"
    );
}

// --- removing -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_backend_with_pins_is_a_409_counting_them_until_forced() {
    let imgs = images(2, Tracking::Links).await;
    let t = Launch::flags("remove", &[named(&imgs[0]), named(&imgs[1])])
        .with_token_flag(TOKEN)
        .start()
        .await;
    let sessions = t.new_sessions(7).await;
    let mut per_image: HashMap<String, u64> = HashMap::new();
    for (_, image) in &sessions {
        *per_image.entry(image.clone()).or_default() += 1;
    }
    let want: BTreeMap<String, u64> = ["image-1", "image-2"]
        .iter()
        .map(|n| (n.to_string(), per_image.get(*n).copied().unwrap_or(0)))
        .collect();
    assert!(
        want.values().all(|&n| n > 0),
        "sessions on both: {sessions:?}"
    );
    t.await_pins("default", &want).await;

    let path = "/api/pools/default/backends/image-1";
    let r = t.change(Method::DELETE, path, "").await;
    check_error(
        &r,
        StatusCode::CONFLICT,
        &["pins"],
        &["image-1", "force"],
        "DELETE with pins",
    );
    assert_eq!(r.json["pins"], want["image-1"], "{r:?}");
    // Draining does not make it removable while the sessions last.
    let drained = t.change(Method::POST, &format!("{path}/drain"), "").await;
    assert_eq!(drained.status, StatusCode::OK, "{drained:?}");
    let r = t.change(Method::DELETE, path, "").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    assert_eq!(r.json["pins"], want["image-1"], "{r:?}");
    assert!(
        t.listed("default", "image-1").await.is_some(),
        "still there"
    );
    // Sessions pinned to it still reach it.
    let on_one: Vec<&String> = sessions
        .iter()
        .filter(|(_, i)| i == "image-1")
        .map(|(k, _)| k)
        .collect();
    assert_eq!(t.image_of(on_one[0]).await, "image-1");

    // Forced: gone, answered with the backend as it was.
    let r = t
        .change(Method::DELETE, &format!("{path}?force=true"), "")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.content_type, "application/json");
    check_backend_shape(&r.json);
    assert_eq!(r.json["name"], "image-1");
    assert!(t.listed("default", "image-1").await.is_none(), "removed");
    assert_eq!(
        t.pins("default").await,
        BTreeMap::from([("image-2".to_string(), want["image-2"])]),
        "image-2's pins stay"
    );
    // Its sessions now go elsewhere; a second delete is a 404.
    assert_eq!(t.image_of(on_one[0]).await, "image-2");
    let r = t
        .change(Method::DELETE, &format!("{path}?force=true"), "")
        .await;
    check_error(
        &r,
        StatusCode::NOT_FOUND,
        &[],
        &["image-1"],
        "second DELETE",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_backend_without_pins_needs_no_force() {
    let imgs = images(1, Tracking::Links).await;
    let t = Launch::flags("remove-free", &[named(&imgs[0])])
        .with_token_flag(TOKEN)
        .start()
        .await;
    let body = r#"{"name": "img3", "address": "127.0.0.1:9003", "weight": 2}"#;
    let r = t
        .change(Method::POST, "/api/pools/default/backends", body)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let r = t
        .change(Method::DELETE, "/api/pools/default/backends/img3", "")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(
        (&r.json["name"], &r.json["weight"]),
        (&json!("img3"), &json!(2))
    );
    assert!(t.listed("default", "img3").await.is_none());
}

// --- reload ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rereads_the_file_and_an_invalid_file_is_a_400_that_changes_nothing() {
    let imgs = images(2, Tracking::Links).await;
    let extra = "admin_token_file = \"token\"";
    let launch = Launch::config("reload", &config_text(extra, &[&imgs[0]]));
    launch.file("token", TOKEN);
    let t = launch.start().await;
    assert!(t.listed("app", "image-2").await.is_none());

    // A valid change: applied, and said.
    t.dir
        .write("tidegate.toml", &config_text(extra, &[&imgs[0], &imgs[1]]));
    let r = t.change(Method::POST, "/api/reload", "").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.content_type, "application/json");
    assert_eq!(r.json["backends_added"], json!(["app/image-2"]), "{r:?}");
    assert_eq!(
        t.listed("app", "image-2")
            .await
            .expect("added by the reload")["address"],
        imgs[1].addr.to_string()
    );

    // An invalid file: a 400 naming the problem, and the farm as it was.
    let bad = config_text(extra, &[&imgs[0], &imgs[1]]).replace(
        &format!("address = \"{}\"", imgs[1].addr),
        &format!("address = \"{}\"\nweight = 0", imgs[1].addr),
    );
    t.dir.write("tidegate.toml", &bad);
    let r = t.change(Method::POST, "/api/reload", "").await;
    check_error(
        &r,
        StatusCode::BAD_REQUEST,
        &[],
        &["weight", &t.dir.arg("tidegate.toml")],
        "reload of an invalid file",
    );
    t.dir.write("tidegate.toml", "this is [[ not toml");
    let r = t.change(Method::POST, "/api/reload", "").await;
    check_error(
        &r,
        StatusCode::BAD_REQUEST,
        &[],
        &["tidegate.toml"],
        "not TOML",
    );
    let pools = t.pins("app").await;
    assert_eq!(pools.keys().collect::<Vec<_>>(), ["image-1", "image-2"]);

    // Fixed again: the next reload applies it (image-2 leaves).
    t.dir
        .write("tidegate.toml", &config_text(extra, &[&imgs[0]]));
    let r = t.change(Method::POST, "/api/reload", "").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.json["backends_removed"], json!(["app/image-2"]), "{r:?}");
    assert!(t.listed("app", "image-2").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_when_started_from_flags_is_a_400_saying_there_is_no_file() {
    let imgs = images(1, Tracking::Links).await;
    let t = Launch::flags("reload-flags", &[named(&imgs[0])])
        .env("TIDEGATE_ADMIN_TOKEN", TOKEN)
        .start()
        .await;
    let r = t.change(Method::POST, "/api/reload", "").await;
    check_error(
        &r,
        StatusCode::BAD_REQUEST,
        &[],
        &["--config"],
        "reload from flags",
    );
}

// --- tidegate ctl ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_pools_prints_a_table_with_a_row_per_backend() {
    let imgs = images(2, Tracking::Links).await;
    let t = Launch::flags("ctl-pools", &[named(&imgs[0]), imgs[1].addr.to_string()])
        .start()
        .await;
    let out = exited(&t.ctl(&["pools"], None).await, 0, "ctl pools");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "POOL",
            "BACKEND",
            "ADDRESS",
            "WEIGHT",
            "STATE",
            "HEALTH",
            "PINS",
            "IN-FLIGHT"
        ],
        "{out}"
    );
    assert_eq!(rows.len(), 3, "a header and a row per backend:\n{out}");
    let (a, b) = (imgs[0].addr.to_string(), imgs[1].addr.to_string());
    for (row, (name, addr)) in rows[1..].iter().zip([("image-1", &a), (b.as_str(), &b)]) {
        assert_eq!(row.len(), 8, "{out}");
        assert_eq!(
            &row[..5],
            ["default", name, addr.as_str(), "1", "active"],
            "{out}"
        );
        assert!(HEALTHS.contains(&row[5]), "{out}");
        assert_eq!(&row[6..], ["0", "0"], "{out}");
    }
    // Columns line up: every row's ADDRESS starts where the header's does.
    let lines: Vec<&str> = out.lines().collect();
    let col = lines[0].find("ADDRESS").unwrap();
    for l in &lines[1..] {
        assert!(l[col..].starts_with("127.0.0.1:"), "misaligned:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_changes_print_the_backend_and_exit_0_with_the_token_file_or_env() {
    let imgs = images(2, Tracking::Links).await;
    let launch = Launch::config(
        "ctl-changes",
        &config_text("admin_token_file = \"token\"", &[&imgs[0]]),
    );
    let token_file = launch.file("token", TOKEN);
    let t = launch.start().await;
    let file = ["--token-file", token_file.as_str()];
    let addr = imgs[1].addr.to_string();
    let with_file =
        |rest: &[&str]| -> Vec<String> { file.iter().chain(rest).map(|s| s.to_string()).collect() };
    let run = async |args: Vec<String>, env: Option<&str>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = t.ctl(&args, env).await;
        exited(&o, 0, &format!("ctl {args:?}"))
    };

    let out = run(
        with_file(&["add", "app", "image-2", &addr, "--weight", "2"]),
        None,
    )
    .await;
    assert!(out.starts_with("image-2 added: "), "{out}");
    assert!(
        out.contains(&addr) && out.contains("weight 2") && out.contains("active"),
        "{out}"
    );
    assert_eq!(t.listed("app", "image-2").await.unwrap()["weight"], 2);

    // The same through TIDEGATE_ADMIN_TOKEN.
    let out = run(
        vec!["drain".into(), "app".into(), "image-2".into()],
        Some(TOKEN),
    )
    .await;
    assert!(out.starts_with("image-2 now: "), "{out}");
    assert!(out.contains("draining") || out.contains("drained"), "{out}");

    let out = run(with_file(&["enable", "app", "image-2"]), None).await;
    assert!(out.contains("image-2") && out.contains(" active "), "{out}");
    let out = run(with_file(&["disable", "app", "image-2"]), None).await;
    assert!(
        out.contains("image-2") && out.contains(" disabled "),
        "{out}"
    );
    assert_eq!(
        t.listed("app", "image-2").await.unwrap()["state"],
        "disabled"
    );

    let out = run(with_file(&["weight", "app", "image-2", "5"]), None).await;
    assert!(
        out.starts_with("image-2 re-weighted: ") && out.contains("weight 5"),
        "{out}"
    );
    assert_eq!(t.listed("app", "image-2").await.unwrap()["weight"], 5);

    let out = run(with_file(&["remove", "app", "image-2"]), None).await;
    assert!(out.starts_with("image-2 removed: "), "{out}");
    assert!(t.listed("app", "image-2").await.is_none());

    // Reload: the file now has image-2; ctl says what changed.
    t.dir.write(
        "tidegate.toml",
        &config_text("admin_token_file = \"token\"", &[&imgs[0], &imgs[1]]),
    );
    let out = run(with_file(&["reload"]), None).await;
    assert!(out.starts_with("configuration reloaded"), "{out}");
    assert!(out.contains("backends added: app/image-2"), "{out}");
    assert!(t.listed("app", "image-2").await.is_some());

    t.await_log("configuration reloaded").await;
    assert_not_logged(&t, &[TOKEN]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exits_1_when_the_api_refuses_and_says_why() {
    let imgs = images(2, Tracking::Links).await;
    let t = Launch::flags("ctl-refused", &[named(&imgs[0]), named(&imgs[1])])
        .with_token_flag(TOKEN)
        .start()
        .await;
    let token_file = t.dir.arg("token");
    let sessions = t.new_sessions(4).await;
    let on_one = sessions.iter().filter(|(_, i)| i == "image-1").count() as u64;
    assert!(on_one > 0, "{sessions:?}");
    let want = BTreeMap::from([
        ("image-1".to_string(), on_one),
        ("image-2".to_string(), sessions.len() as u64 - on_one),
    ]);
    t.await_pins("default", &want).await;

    let wrong = wrong_token_file(&t);
    let f = ["--token-file", token_file.as_str()];
    let cases: Vec<(Vec<&str>, Option<&str>, Vec<String>)> = vec![
        // No token: 401.
        (
            vec!["drain", "default", "image-1"],
            None,
            vec!["401".into()],
        ),
        // A wrong one, from the env or a file.
        (
            vec!["drain", "default", "image-1"],
            Some("tg-nope"),
            vec!["401".into()],
        ),
        (
            vec![
                "--token-file",
                wrong.as_str(),
                "drain",
                "default",
                "image-1",
            ],
            None,
            vec!["401".into()],
        ),
        // The file wins over the env.
        (
            vec![
                "--token-file",
                wrong.as_str(),
                "drain",
                "default",
                "image-1",
            ],
            Some(TOKEN),
            vec!["401".into()],
        ),
        // Unknown backend and pool: 404.
        (
            [&f[..], &["drain", "default", "ghost"]].concat(),
            None,
            vec!["404".into(), "ghost".into()],
        ),
        (
            [&f[..], &["enable", "nope", "image-1"]].concat(),
            None,
            vec!["404".into(), "nope".into()],
        ),
        // A duplicate: 409.
        (
            [&f[..], &["add", "default", "image-2", "127.0.0.1:9003"]].concat(),
            None,
            vec!["409".into(), "image-2".into()],
        ),
        // Bad values: 400.
        (
            [&f[..], &["add", "default", "img3", "nowhere:80"]].concat(),
            None,
            vec!["400".into(), "address".into()],
        ),
        (
            [&f[..], &["weight", "default", "image-1", "0"]].concat(),
            None,
            vec!["400".into(), "weight".into()],
        ),
        // Pins: 409 with their number.
        (
            [&f[..], &["remove", "default", "image-1"]].concat(),
            None,
            vec!["409".into(), format!("{on_one} pinned")],
        ),
        // No file to reload.
        (
            [&f[..], &["reload"]].concat(),
            None,
            vec!["400".into(), "--config".into()],
        ),
    ];
    for (args, env, mentions) in cases {
        let o = t.ctl(&args, env).await;
        exited(&o, 1, &format!("ctl {args:?}"));
        let err = stderr(&o);
        assert!(err.contains("refused"), "ctl {args:?}: {err}");
        assert!(!err.contains(TOKEN), "ctl {args:?} shows the token: {err}");
        for m in &mentions {
            assert!(
                err.contains(m.as_str()),
                "ctl {args:?}: stderr names {m:?}: {err}"
            );
        }
        assert!(stdout(&o).is_empty(), "ctl {args:?}: {}", stdout(&o));
    }
    // None of it changed anything; --force then removes despite the pins.
    t.await_pins("default", &want).await;
    assert_eq!(
        t.listed("default", "image-1").await.unwrap()["state"],
        "active"
    );
    let o = t
        .ctl(
            &[&f[..], &["remove", "default", "image-1", "--force"]].concat(),
            None,
        )
        .await;
    let out = exited(&o, 0, "ctl remove --force");
    assert!(out.starts_with("image-1 removed: "), "{out}");
    assert!(out.contains(&format!("pins {on_one}")), "{out}");
    assert!(t.listed("default", "image-1").await.is_none());
}

/// A token file holding a wrong token, in `t`'s directory.
fn wrong_token_file(t: &Process) -> String {
    t.dir.write("wrong-token", "tg-wrong-token\n");
    t.dir.arg("wrong-token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_without_a_configured_token_exits_1_saying_how_to_set_one() {
    let imgs = images(1, Tracking::Links).await;
    let t = Launch::flags("ctl-403", &[named(&imgs[0])]).start().await;
    let o = t.ctl(&["drain", "default", "image-1"], Some(TOKEN)).await;
    exited(&o, 1, "ctl drain on a read-only admin API");
    let err = stderr(&o);
    assert!(
        err.contains("403") && err.contains("TIDEGATE_ADMIN_TOKEN"),
        "{err}"
    );
    // Reads need nothing.
    exited(&t.ctl(&["pools"], None).await, 0, "ctl pools");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exits_2_when_the_admin_listener_is_unreachable_or_the_token_file_unreadable() {
    // A port free a moment ago: nothing listens there.
    let closed = free_addr();
    for args in [
        &["pools"][..],
        &["drain", "default", "image-1"],
        &["reload"],
    ] {
        let o = ctl(closed, args, Some(TOKEN)).await;
        exited(&o, 2, &format!("ctl {args:?} against nothing"));
        let err = stderr(&o);
        assert!(
            err.contains("cannot reach") && err.contains(&closed.to_string()),
            "ctl {args:?}: {err}"
        );
    }
    let dir = TempDir::new("ctl-no-token-file");
    let o = ctl(
        closed,
        &[
            "--token-file",
            &dir.arg("missing"),
            "drain",
            "default",
            "image-1",
        ],
        None,
    )
    .await;
    exited(&o, 2, "ctl with a missing token file");
    assert!(stderr(&o).contains(&dir.arg("missing")), "{}", stderr(&o));
    // Something that is not a tidegate admin listener answering: 2 as well.
    let imgs = images(1, Tracking::Links).await;
    let o = ctl(imgs[0].addr, &["pools"], None).await;
    exited(&o, 2, "ctl against a non-tidegate server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_reserved_characters_are_reachable_percent_encoded_and_through_ctl() {
    // A name is any printable ASCII: `/`, `?`, `#` and `%` included, and `[::1]:9` is what
    // `--backend [::1]:9` is called.
    let t = Launch::flags("odd-names", &["[::1]:9".to_string()])
        .with_token_flag(TOKEN)
        .start()
        .await;
    let token_file = t.dir.arg("token");
    let odd = [
        ("a/b", "a%2Fb"),
        ("q?z", "q%3Fz"),
        ("h#1", "h%231"),
        ("x%41", "x%2541"),
    ];
    for (i, (name, _)) in odd.iter().enumerate() {
        let body = json!({"name": name, "address": format!("127.0.0.1:{}", 9100 + i)});
        let r = t
            .change(
                Method::POST,
                "/api/pools/default/backends",
                &body.to_string(),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{name}: {r:?}");
    }
    for (name, encoded) in odd {
        let path = format!("/api/pools/default/backends/{encoded}");
        let r = t.read(&path).await;
        assert_eq!(r.status, StatusCode::OK, "GET {path}: {r:?}");
        assert_eq!(r.json["name"], name, "GET {path}");
        let r = t.change(Method::POST, &format!("{path}/drain"), "").await;
        assert_eq!(r.status, StatusCode::OK, "drain {path}: {r:?}");
        assert_eq!(r.json["name"], name);
    }
    // ctl takes the names as they are.
    let f = ["--token-file", token_file.as_str()];
    for (name, _) in odd.iter().chain([&("[::1]:9", "")]) {
        let o = t
            .ctl(&[&f[..], &["disable", "default", name]].concat(), None)
            .await;
        let out = exited(&o, 0, &format!("ctl disable {name}"));
        assert!(out.starts_with(&format!("{name} now: ")), "{out}");
        assert_eq!(
            t.listed("default", name).await.unwrap()["state"],
            "disabled"
        );
        let o = t
            .ctl(&[&f[..], &["weight", "default", name, "4"]].concat(), None)
            .await;
        exited(&o, 0, &format!("ctl weight {name}"));
        let o = t
            .ctl(&[&f[..], &["remove", "default", name]].concat(), None)
            .await;
        exited(&o, 0, &format!("ctl remove {name}"));
        assert!(t.listed("default", name).await.is_none(), "{name} removed");
    }
}
