//! The admin API: JSON in and out, small named operations on one backend, each answering
//! with the backend as it is now (as HAProxy's runtime API and Caddy's admin API do). Reads
//! need nothing; changes need `Authorization: Bearer TOKEN`. Every error is
//! `{"error": "..."}` with its status.
//!
//! Each path segment is percent-decoded, so a backend named `a/b` is `.../backends/a%2Fb`. A
//! method a path never takes is a 405 before the token is looked at.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /api/pools` | every pool and its backends |
//! | `GET /api/pools/{pool}` | one pool |
//! | `POST /api/pools/{pool}/backends` `{"name","address","weight"}` | 201, the backend |
//! | `GET /api/pools/{pool}/backends/{name}` | the backend |
//! | `POST .../backends/{name}/drain` · `/enable` · `/disable` | 200, the backend |
//! | `PATCH .../backends/{name}` `{"weight"}` | 200, the backend |
//! | `DELETE .../backends/{name}[?force=true]` | 200, or 409 while it has pins |
//! | `POST /api/reload` | 200 with what changed, or 400 with the error |

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use crate::core::backend::{AdminState, Backend, Extras};
use crate::core::pool::Pool;
use crate::core::registry::ChangeError;
use crate::farm::{Farm, ReloadError};

/// The largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

/// The bearer token changes need, kept as its SHA-256 digest: comparing digests takes the
/// same time whatever the token sent, its length included.
pub struct Token(Option<[u8; 32]>);

impl Token {
    /// A token, or none (changes refused).
    pub fn new(token: Option<String>) -> Self {
        Token(token.map(|t| digest(t.as_bytes())))
    }

    /// `None` when the `Authorization` header carries the token; else the refusal.
    fn refuses(&self, header: Option<&HeaderValue>) -> Option<Reply> {
        let Some(expected) = &self.0 else {
            return Some(error(
                StatusCode::FORBIDDEN,
                "changes through the admin API need a token: set admin_token_file in the \
                 configuration, start with --admin-token-file FILE, or set TIDEGATE_ADMIN_TOKEN",
            ));
        };
        let offered = header
            .and_then(|h| h.to_str().ok())
            .and_then(|h| {
                // The scheme is case-insensitive (RFC 9110 §11.1).
                let (scheme, token) = h.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)
            })
            .map(|t| digest(t.trim().as_bytes()));
        match offered {
            Some(d) if aws_lc_rs::constant_time::verify_slices_are_equal(&d, expected).is_ok() => {
                None
            }
            _ => {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "a change needs the header Authorization: Bearer TOKEN with the admin token",
                );
                r.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Some(r)
            }
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

type Reply = Response<Full<Bytes>>;

/// A backend as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BackendView {
    /// Its stable name.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// Share of new sessions.
    pub weight: u32,
    /// `active`, `draining`, `drained` or `disabled`.
    pub state: String,
    /// `up`, `down` or `unknown`.
    pub health: String,
    /// Sessions pinned to it.
    pub pins: u64,
    /// Requests it is serving now.
    pub in_flight: i64,
    /// Its process, when tidegate launches it on demand (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessView>,
}

/// A launchable backend's process as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ProcessView {
    /// `stopped`, `launching`, `running` or `stopping`.
    pub state: String,
    /// Its process id, when known.
    pub pid: Option<u32>,
    /// Seconds since its port accepted (running only).
    pub uptime_seconds: Option<u64>,
    /// Whether it was found running rather than launched by this tidegate.
    pub adopted: bool,
    /// Launches started by this tidegate.
    pub launches: u64,
    /// Requests waiting for it to run now.
    pub waiting: usize,
    /// Why its last launch failed, until one succeeds.
    pub last_failure: Option<String>,
}

impl ProcessView {
    pub(crate) fn of(p: &crate::core::launch::Process) -> Self {
        use crate::core::launch::ProcessState;
        let state = p.state();
        ProcessView {
            state: state.as_str().into(),
            pid: p.pid(),
            uptime_seconds: (state == ProcessState::Running)
                .then(|| u64::from(crate::clock::unix_now().saturating_sub(p.since()))),
            adopted: p.adopted(),
            launches: p.stats.launches.load(std::sync::atomic::Ordering::Relaxed),
            waiting: p.holding.load(std::sync::atomic::Ordering::Relaxed),
            last_failure: p.last_failure().map(|f| f.to_string()),
        }
    }

    /// A few words for a table cell: `running (pid 42, 180 s)`, `stopped`.
    pub fn summary(&self) -> String {
        match (self.pid, self.uptime_seconds) {
            (Some(pid), Some(up)) => format!("{} (pid {pid}, {up} s)", self.state),
            (Some(pid), None) => format!("{} (pid {pid})", self.state),
            _ => self.state.clone(),
        }
    }
}

impl BackendView {
    fn of(pool: &Pool, b: &Backend) -> Self {
        BackendView {
            name: b.name.to_string(),
            address: b.address.to_string(),
            weight: b.weight(),
            state: b.admin().as_str().into(),
            health: b.health.get().as_str().into(),
            pins: pool.table().map_or(0, |t| t.pins_of(b.id)),
            in_flight: b
                .stats
                .in_flight
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(0),
            process: b.process.as_deref().map(ProcessView::of),
        }
    }
}

/// A pool as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// Its name.
    pub name: String,
    /// Its backends, in the order they were configured or added.
    pub backends: Vec<BackendView>,
}

impl PoolView {
    fn of(pool: &Pool) -> Self {
        PoolView {
            name: pool.name.to_string(),
            backends: pool
                .backends()
                .all()
                .iter()
                .map(|b| BackendView::of(pool, b))
                .collect(),
        }
    }
}

/// `GET /api/pools`.
#[derive(Serialize, Deserialize, Debug)]
pub struct Pools {
    /// Every pool.
    pub pools: Vec<PoolView>,
}

/// `POST /api/pools/{pool}/backends`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBackend {
    name: String,
    address: String,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

/// `PATCH /api/pools/{pool}/backends/{name}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    weight: u32,
}

/// Answers one `/api` request.
pub async fn answer(farm: &Arc<Farm>, token: &Token, req: Request<Incoming>) -> Reply {
    let (parts, body) = req.into_parts();
    // Each segment percent-decoded after the split: a name may hold `/`, `?`, `#` or `%`.
    let decoded: Vec<String> = parts
        .uri
        .path()
        .trim_end_matches('/')
        .split('/')
        .skip(2)
        .map(percent_decoded)
        .collect();
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let force = parts
        .uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "force=true" || kv == "force=1"));
    let method = parts.method.clone();
    let reading = method == Method::GET || method == Method::HEAD;
    let known = matches!(
        segments.as_slice(),
        ["pools"]
            | ["pools", _]
            | ["pools", _, "backends"]
            | ["pools", _, "backends", _]
            | ["pools", _, "backends", _, "drain" | "enable" | "disable"]
            | ["reload"]
    );
    if !known {
        return error(
            StatusCode::NOT_FOUND,
            "no such API path: see /api/pools, /api/pools/{pool}/backends/{name}, /api/reload",
        );
    }
    // A method the path never takes is a 405 whoever asks: no token makes it right.
    let allow = allowed(&segments);
    let takes = |m: &str| allow.split(", ").any(|a| a == m);
    if !(takes(method.as_str()) || method == Method::HEAD && takes("GET")) {
        return not_allowed(&method, allow);
    }
    if !reading && let Some(refused) = token.refuses(parts.headers.get(AUTHORIZATION)) {
        return refused;
    }
    let registry = &farm.registry;
    let backend_reply = |status, pool: &Pool, b: &Backend| json(status, &BackendView::of(pool, b));
    let changed = |r: Result<Arc<Backend>, ChangeError>, pool: &str| match r {
        Ok(b) => match registry.pool(pool) {
            Ok(p) => backend_reply(StatusCode::OK, &p, &b),
            Err(e) => change_error(e),
        },
        Err(e) => change_error(e),
    };
    match (&method, segments.as_slice()) {
        (&Method::GET | &Method::HEAD, ["pools"]) => {
            let topology = registry.topology();
            json(
                StatusCode::OK,
                &Pools {
                    pools: topology.pools.iter().map(|p| PoolView::of(p)).collect(),
                },
            )
        }
        (&Method::GET | &Method::HEAD, ["pools", pool]) => match registry.pool(pool) {
            Ok(p) => json(StatusCode::OK, &PoolView::of(&p)),
            Err(e) => change_error(e),
        },
        (&Method::GET | &Method::HEAD, ["pools", pool, "backends"]) => match registry.pool(pool) {
            Ok(p) => json(StatusCode::OK, &PoolView::of(&p).backends),
            Err(e) => change_error(e),
        },
        (&Method::GET | &Method::HEAD, ["pools", pool, "backends", name]) => {
            match registry.backend(pool, name) {
                Ok((p, b)) => backend_reply(StatusCode::OK, &p, &b),
                Err(e) => change_error(e),
            }
        }
        (&Method::POST, ["pools", pool, "backends"]) => {
            if let Err(e) = registry.pool(pool) {
                return change_error(e);
            }
            let new: NewBackend = match read_json(body).await {
                Ok(new) => new,
                Err(refused) => return refused,
            };
            let address = match new.address.parse::<SocketAddr>() {
                Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => a,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!(
                            "address: {:?} is not an IP:port address a backend can listen on",
                            new.address
                        ),
                    );
                }
            };
            match registry.add_backend(
                pool,
                &new.name,
                address,
                new.weight,
                AdminState::Active,
                Extras::default(),
            ) {
                Ok(b) => {
                    tracing::info!(pool, backend = %b.name, address = %b.address, weight = b.weight(), "admin API: backend added");
                    match registry.pool(pool) {
                        Ok(p) => backend_reply(StatusCode::CREATED, &p, &b),
                        Err(e) => change_error(e),
                    }
                }
                Err(e) => change_error(e),
            }
        }
        (&Method::POST, ["pools", pool, "backends", name, action]) => {
            let state = match *action {
                "drain" => AdminState::Draining,
                "enable" => AdminState::Active,
                _ => AdminState::Disabled,
            };
            let r = registry.set_admin(pool, name, state);
            if let Ok(b) = &r {
                tracing::info!(pool, backend = %b.name, state = b.admin().as_str(), "admin API: backend {action}");
            }
            changed(r, pool)
        }
        (&Method::PATCH, ["pools", pool, "backends", name]) => {
            let patch: Patch = match read_json(body).await {
                Ok(p) => p,
                Err(refused) => return refused,
            };
            let r = registry.set_weight(pool, name, patch.weight);
            if let Ok(b) = &r {
                tracing::info!(pool, backend = %b.name, weight = b.weight(), "admin API: backend re-weighted");
            }
            changed(r, pool)
        }
        (&Method::DELETE, ["pools", pool, "backends", name]) => {
            let view = match registry.backend(pool, name) {
                Ok((p, b)) => BackendView::of(&p, &b),
                Err(e) => return change_error(e),
            };
            // A task of its own: a client that leaves does not cut the removal short.
            let (farm, pool, name) = (farm.clone(), pool.to_string(), name.to_string());
            let removal =
                tokio::spawn(async move { farm.remove_backend(&pool, &name, force).await }).await;
            match removal {
                Ok(Ok(_)) => json(StatusCode::OK, &view),
                Ok(Err(e)) => change_error(e),
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("the removal failed: {e}"),
                ),
            }
        }
        (&Method::POST, ["reload"]) => {
            // A task of its own: a client that leaves does not cut the reload short.
            let farm = farm.clone();
            match tokio::spawn(async move { farm.reload("admin API").await }).await {
                Ok(Ok(applied)) => json(StatusCode::OK, &applied),
                Ok(Err(e @ (ReloadError::NoFile | ReloadError::Invalid(_)))) => {
                    error(StatusCode::BAD_REQUEST, &e.to_string())
                }
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("the reload failed: {e}"),
                ),
            }
        }
        (_, path) => not_allowed(&method, allowed(path)),
    }
}

/// `segment` with each `%XX` turned back into its byte (a `%` not followed by two hex
/// digits stays as it is).
fn percent_decoded(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The methods a known API path takes, as the `Allow` header lists them.
fn allowed(path: &[&str]) -> &'static str {
    match path {
        ["pools"] | ["pools", _] => "GET",
        ["pools", _, "backends"] => "GET, POST",
        ["pools", _, "backends", _] => "GET, PATCH, DELETE",
        _ => "POST",
    }
}

fn not_allowed(method: &Method, allow: &'static str) -> Reply {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("{method} is not allowed here; allowed: {allow}"),
    );
    r.headers_mut()
        .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// Reads a JSON body into `T`; a bad body is a 400 naming the field.
async fn read_json<T: for<'de> Deserialize<'de>>(body: Incoming) -> Result<T, Reply> {
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                &format!("the body could not be read, or is over {MAX_BODY} bytes"),
            ));
        }
    };
    // A JSON object, nothing else: serde would also take a struct as a list of its fields.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "body: must be a JSON object (Content-Type: application/json)",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let refused = |e: serde_path_to_error::Error<serde_json::Error>| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        // `?`: no field is known (the body ended, or stopped being JSON, before one).
        let message = if field.is_empty() || field == "." || field == "?" {
            format!("body: {inner}")
        } else {
            format!("{field}: {inner}")
        };
        error(StatusCode::BAD_REQUEST, &message)
    };
    let value = serde_path_to_error::deserialize(&mut de).map_err(refused)?;
    // Nothing may follow the object: `{...} x` is not JSON.
    de.end()
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("body: {e}")))?;
    Ok(value)
}

fn change_error(e: ChangeError) -> Reply {
    let status = match &e {
        ChangeError::UnknownPool(_) | ChangeError::UnknownBackend { .. } => StatusCode::NOT_FOUND,
        ChangeError::Exists { .. } | ChangeError::IdClash { .. } | ChangeError::HasPins { .. } => {
            StatusCode::CONFLICT
        }
        ChangeError::Invalid { .. } => StatusCode::BAD_REQUEST,
    };
    if let ChangeError::HasPins { pins, .. } = &e {
        return json(
            status,
            &serde_json::json!({ "error": e.to_string(), "pins": pins }),
        );
    }
    error(status, &e.to_string())
}

fn error(status: StatusCode, message: &str) -> Reply {
    json(status, &serde_json::json!({ "error": message }))
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Reply {
    let mut body = serde_json::to_string(value).unwrap_or_else(|_| "{}".into());
    body.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}
