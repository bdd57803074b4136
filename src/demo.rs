//! Seaside-like demo images: small HTTP servers that keep sessions in their own memory and
//! carry the session key exactly as Seaside does (see SEASIDE.md). `tidegate demo` runs three
//! behind the balancer; the integration tests use them as the farm.
//!
//! A request reaching the wrong image finds its key unknown and starts a new session, so a
//! broken pin shows at once: another image name and a counter back at 1. Besides the
//! application, an image serves `/echo` (the request as it arrived), `/static/…`, `/ws` (an
//! echoing upgrade) and `…/search`, a page that shows what it was asked for, as search
//! pages do (what a balancer learning from pages must not be fooled by).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::RngExt;
use tokio::net::TcpListener;

use crate::core::session_id::{self, IdRules};
use crate::shutdown::{self, Signal, Trigger};

/// How an image tracks its sessions on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tracking {
    /// Seaside 3 default: the key only in links and form actions (`?_s=KEY&_k=…`).
    Links,
    /// Seaside 3 with a cookie strategy: the first page also sets `_s=KEY`.
    Cookie,
    /// Seaside 2.8 with cookies: a new session answers 302 with a cookie named after the
    /// application and `_s` in `Location`; forms carry `_s` only as a hidden field.
    Seaside28 {
        /// The application's cookie name (e.g. `counter`).
        cookie: String,
    },
    /// `WAEnterpriseAuberginesStrategy`: cookie `JSESSIONID` and `/app;jsessionid=KEY`.
    Aubergines,
}

/// What an image is and how it answers.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    /// Name shown on pages and in the `x-image` header.
    pub name: String,
    /// Session tracking style.
    pub tracking: Tracking,
    /// Filler bytes before the first link of a session's first page (a heavy entry page).
    pub padding: usize,
    /// Send page bodies in chunks of this many bytes (0 = one chunk).
    pub chunk: usize,
}

impl ImageOptions {
    /// A Seaside 3 image with default tracking.
    pub fn new(name: &str) -> Self {
        ImageOptions {
            name: name.into(),
            tracking: Tracking::Links,
            padding: 0,
            chunk: 0,
        }
    }
}

/// Seaside's default cap on sessions per image.
const MAX_SESSIONS: usize = 10_000;

/// The most of a request body a demo image reads (a demo form is a few hundred bytes).
const DEMO_FORM_LIMIT: usize = 1024 * 1024;

type Reply = Response<http_body_util::Either<Full<Bytes>, chunked::Chunks>>;

/// A running image.
pub struct Image {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<ImageState>,
    stop: Trigger,
}

struct ImageState {
    options: ImageOptions,
    sessions: Mutex<HashMap<String, u64>>,
}

impl Image {
    /// Starts an image on `addr` (port 0 picks a free one).
    pub async fn start(addr: SocketAddr, options: ImageOptions) -> std::io::Result<Image> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ImageState {
            options,
            sessions: Mutex::new(HashMap::new()),
        });
        let (stop, mut stopped): (Trigger, Signal) = shutdown::channel();
        let serving = state.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = stopped.wait() => return,
                };
                let _ = stream.set_nodelay(true);
                let state = serving.clone();
                let mut stopped = stopped.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.answer(req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        _ = stopped.wait() => {}
                    }
                });
            }
        });
        Ok(Image { addr, state, stop })
    }

    /// The image's name.
    pub fn name(&self) -> &str {
        &self.state.options.name
    }

    /// How many sessions live in this image.
    pub fn session_count(&self) -> usize {
        self.state.sessions.lock().expect("sessions lock").len()
    }

    /// Closes the port and every connection, as a crashed image would.
    pub fn stop(&self) {
        self.stop.fire();
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        self.stop();
    }
}

impl ImageState {
    async fn answer(&self, req: Request<Incoming>) -> Reply {
        // Path parameters (`;jsessionid=…`) are not part of the resource name.
        let path = req
            .uri()
            .path()
            .split(';')
            .next()
            .unwrap_or("/")
            .to_string();
        if path.starts_with("/static/") {
            return text(StatusCode::OK, "text/css", "body { color: #123; }\n".into());
        }
        if path == "/echo" {
            let mut r = echo(req).await;
            self.stamp(&mut r, 0);
            return r;
        }
        if path == "/ws" {
            return self.upgrade(req);
        }
        if path.ends_with("/search") {
            let mut r = search(req).await;
            self.stamp(&mut r, 0);
            return r;
        }
        let (key, post) = self.key_of(req).await;
        let known = key.as_ref().and_then(|k| {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            sessions.get_mut(k).map(|c| {
                *c += 1;
                (k.clone(), *c)
            })
        });
        let Some((key, counter)) = known else {
            if path.ends_with("/ajax") {
                return text(
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    "session expired\n".into(),
                );
            }
            return self.new_session(&path);
        };
        if post {
            // Redirect after POST, naming the session in Location as Seaside does.
            let mut r = text(StatusCode::FOUND, "text/plain", String::new());
            r.headers_mut()
                .insert(LOCATION, self.link(&key).parse().expect("link"));
            self.stamp(&mut r, counter);
            return r;
        }
        self.page(&key, counter, false)
    }

    /// The session key as this image's tracking reads it, and whether the request is a POST.
    async fn key_of(&self, req: Request<Incoming>) -> (Option<String>, bool) {
        let rules = IdRules::default();
        let post = req.method() == Method::POST;
        let uri = req.uri().clone();
        if let Some(k) = uri
            .query()
            .and_then(|q| session_id::from_query(q, "_s", &rules))
        {
            return (Some(k.to_string()), post);
        }
        if let Some(k) = session_id::from_path_param(uri.path(), "jsessionid", &rules) {
            return (Some(k.to_string()), post);
        }
        let cookie_name = match &self.options.tracking {
            Tracking::Links => None,
            Tracking::Cookie => Some("_s"),
            Tracking::Seaside28 { cookie } => Some(cookie.as_str()),
            Tracking::Aubergines => Some("JSESSIONID"),
        };
        let cookie_key = cookie_name.and_then(|name| {
            req.headers()
                .get_all(COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|v| session_id::cookie_value(v, name))
                .filter(|v| rules.is_valid(v.as_bytes()))
                .map(str::to_string)
        });
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        // A demo image reads forms up to this size; a larger body is not read for a key.
        let body = http_body_util::Limited::new(req.into_body(), DEMO_FORM_LIMIT)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body_key = if content_type.starts_with("application/x-www-form-urlencoded") {
            session_id::from_urlencoded(&body, "_s", &rules)
        } else {
            session_id::multipart_boundary(&content_type)
                .and_then(|b| session_id::from_multipart(&body, b, "_s", &rules))
        };
        (body_key.map(str::to_string).or(cookie_key), post)
    }

    fn new_session(&self, path: &str) -> Reply {
        let key = random_key(16);
        {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            if sessions.len() >= MAX_SESSIONS
                && let Some(old) = sessions.keys().next().cloned()
            {
                sessions.remove(&old);
            }
            sessions.insert(key.clone(), 1);
        }
        match &self.options.tracking {
            Tracking::Seaside28 { cookie } => {
                let mut r = text(StatusCode::FOUND, "text/plain", String::new());
                let location = format!("{}?_s={key}", app_path(path));
                r.headers_mut()
                    .insert(LOCATION, location.parse().expect("location"));
                r.headers_mut().insert(
                    SET_COOKIE,
                    format!("{cookie}={key}; path=/").parse().expect("cookie"),
                );
                self.stamp(&mut r, 1);
                r
            }
            Tracking::Cookie => {
                let mut r = self.page(&key, 1, true);
                r.headers_mut().insert(
                    SET_COOKIE,
                    format!("_s={key}; path=/; HttpOnly; SameSite=Strict")
                        .parse()
                        .expect("cookie"),
                );
                r
            }
            Tracking::Aubergines => {
                let mut r = self.page(&key, 1, true);
                r.headers_mut().insert(
                    SET_COOKIE,
                    format!("JSESSIONID={key}; path=/").parse().expect("cookie"),
                );
                r
            }
            Tracking::Links => self.page(&key, 1, true),
        }
    }

    fn link(&self, key: &str) -> String {
        let k = random_key(8);
        match &self.options.tracking {
            Tracking::Aubergines => format!("/app;jsessionid={key}?_k={k}"),
            _ => format!("/app?_s={key}&_k={k}"),
        }
    }

    fn page(&self, key: &str, counter: u64, new: bool) -> Reply {
        let name = &self.options.name;
        let link = self.link(key).replace('&', "&amp;");
        let form = match &self.options.tracking {
            // Seaside 2.8: the form action is bare, the key rides in a hidden field.
            Tracking::Seaside28 { .. } => format!(
                "<form method=\"post\" action=\"/app\"><input type=\"hidden\" name=\"_s\" value=\"{key}\">\
<button>increment (POST)</button></form>"
            ),
            _ => format!(
                "<form method=\"post\" action=\"{link}\"><button>increment (POST)</button></form>"
            ),
        };
        let pad = if new { self.options.padding } else { 0 };
        let padding = "<!-- padding -->".repeat(pad / 16 + 1);
        let padding = &padding[..pad];
        let html = format!(
            "<!DOCTYPE html>\n<html><head><title>{name}</title>\
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:36em;margin:3em auto;color:#1d2733}}\
.image{{font-size:2.4em;font-weight:700;color:#0b6e4f}}.counter{{font-size:1.6em}}\
a,button{{font:inherit;margin-right:1em}}</style></head><body>{padding}\
<p>This page was rendered by image</p><p class=\"image\">{name}</p>\
<p class=\"counter\">counter: <b>{counter}</b>{}</p>\
<p><a href=\"{link}\">increment</a></p>{form}\
<p><small>The session key travels only in the links, as in Seaside 3: tidegate learned it from \
this page and keeps every click on {name}.</small></p></body></html>\n",
            if new { " (new session)" } else { "" }
        );
        let mut r = if self.options.chunk > 0 {
            let chunks: Vec<Bytes> = html
                .into_bytes()
                .chunks(self.options.chunk)
                .map(Bytes::copy_from_slice)
                .collect();
            let mut r = Response::new(http_body_util::Either::Right(chunked::Chunks::new(chunks)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        } else {
            text(StatusCode::OK, "text/html; charset=utf-8", html)
        };
        self.stamp(&mut r, counter);
        r
    }

    fn stamp(&self, r: &mut Reply, counter: u64) {
        r.headers_mut().insert(
            "x-image",
            HeaderValue::from_str(&self.options.name).expect("image name"),
        );
        r.headers_mut()
            .insert("x-counter", HeaderValue::from(counter));
    }

    /// Answers `Upgrade` with 101 and echoes raw bytes on the upgraded connection.
    fn upgrade(&self, mut req: Request<Incoming>) -> Reply {
        let protocol = req.headers().get(http::header::UPGRADE).cloned();
        let Some(protocol) = protocol else {
            return text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "upgrade required\n".into(),
            );
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = text(StatusCode::SWITCHING_PROTOCOLS, "text/plain", String::new());
        r.headers_mut().remove(CONTENT_TYPE);
        r.headers_mut().insert(http::header::UPGRADE, protocol);
        r.headers_mut().insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        self.stamp(&mut r, 0);
        r
    }
}

/// Replies with the request line and head as text (`name: value` lines), a blank line, then
/// the body exactly as received.
async fn echo(req: Request<Incoming>) -> Reply {
    let (parts, body) = req.into_parts();
    let mut out = format!("{} {}\n", parts.method, parts.uri).into_bytes();
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    out.extend_from_slice(&body);
    let mut r = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(out))));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

/// A page that shows what it was asked for, as a search page does: the `q` field of the
/// query (or of an urlencoded POST body) in its title, its text, an input's value and the
/// link to its next page, HTML-escaped but otherwise as given. It belongs to no session.
async fn search(req: Request<Incoming>) -> Reply {
    let (parts, body) = req.into_parts();
    let body = http_body_util::Limited::new(body, DEMO_FORM_LIMIT)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let field = |fields: &str| {
        let value = session_id::field(fields, "q")?.replace('+', " ");
        let value: Vec<u8> = session_id::percent_decoded(value.as_bytes()).collect();
        Some(String::from_utf8_lossy(&value).into_owned())
    };
    let q = parts
        .uri
        .query()
        .and_then(field)
        .or_else(|| field(&String::from_utf8_lossy(&body)))
        .unwrap_or_default();
    let q = html_escaped(&q);
    let html = format!(
        "<!DOCTYPE html>\n<html><head><title>Search: {q}</title></head><body>\
<form action=\"/search\"><input name=\"q\" value=\"{q}\"><button>search</button></form>\
<p>You searched for {q}. Nothing was found.</p>\
<p><a href=\"/search?q={q}&amp;page=2\">next page</a></p></body></html>\n"
    );
    text(StatusCode::OK, "text/html; charset=utf-8", html)
}

/// `text` safe to put in HTML text and quoted attribute values.
fn html_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut r = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The application's entry path: `/app` for `/app/anything`.
fn app_path(path: &str) -> &str {
    let end = path[1..].find('/').map_or(path.len(), |i| i + 1);
    let base = &path[..end];
    if base.is_empty() { "/" } else { base }
}

/// A random key of `A-Za-z0-9`, as Seaside makes them.
pub fn random_key(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A body of prepared chunks, one frame per poll with a yield between them, so they leave
/// as separate writes (and a session key can straddle two of them).
mod chunked {
    use super::*;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct Chunks {
        chunks: VecDeque<Bytes>,
        yielded: bool,
    }

    impl Chunks {
        pub fn new(chunks: Vec<Bytes>) -> Self {
            Chunks {
                chunks: chunks.into(),
                yielded: false,
            }
        }
    }

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if !self.yielded && !self.chunks.is_empty() {
                self.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.yielded = false;
            Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
        }

        fn is_end_stream(&self) -> bool {
            self.chunks.is_empty()
        }
    }
}
