//! Configuration: the TOML file (or the quick-start flags) read into all-defaulted file
//! structs, then validated into the [`Config`] the rest of the code sees.
//!
//! Every error names the key (`pool[0].backend[1].address`) and, for a file, its line: serde
//! errors carry both through `serde_path_to_error` and toml's spans; checks that span several
//! keys (duplicate names, ranges) name their key and the line is found in the parsed document.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::core::affinity::TableLimits;
use crate::core::backend::{AdminState, BackendId};
use crate::core::balance::Policy;
use crate::core::health::{Check, HealthPolicy, Thresholds};
use crate::core::launch::{self, LaunchSpec};
use crate::core::pool::OnPinnedDown;
use crate::core::registry::{check_name, check_weight};
use crate::core::route::HostMatch;
use crate::core::session_id::{IdRules, SessionNames};
use crate::core::trust::{Network, TrustedProxies};
use crate::error::ConfigError;
use crate::tls::{CertFiles, MinVersion};

/// Requests that may wait for a backend's slot unless `queue_max` says otherwise.
pub const DEFAULT_QUEUE_MAX: usize = 1024;

/// Seconds a request may wait for a backend's slot unless `queue_timeout` says otherwise.
pub const DEFAULT_QUEUE_TIMEOUT: f64 = 10.0;

/// Seconds a stop lets requests in flight finish unless `shutdown_timeout` says otherwise.
pub const DEFAULT_SHUTDOWN_TIMEOUT: u64 = 10;

/// Seconds between writes of the state file unless `state_interval` says otherwise.
pub const DEFAULT_STATE_INTERVAL: u64 = 10;

/// The default traffic listener.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Client connections served at once unless `max_connections` says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Streams one HTTP/2 connection may have open at once unless `http2_max_streams` says
/// otherwise (HAProxy's default too; nginx's is 128).
pub const DEFAULT_HTTP2_MAX_STREAMS: u32 = 100;

/// The longest backend timeout accepted, in seconds: a day.
const MAX_TIMEOUT: u64 = 86_400;

/// Seconds a client has for a request head (and may stay silent within a body) unless
/// `client_timeout` says otherwise.
pub const DEFAULT_CLIENT_TIMEOUT: u64 = 30;

/// Seconds an upgraded (WebSocket) connection may carry nothing either way unless
/// `tunnel_timeout` says otherwise: an hour, as HAProxy's documentation suggests.
pub const DEFAULT_TUNNEL_TIMEOUT: u64 = 3600;

/// The whole file, as written. Every field has a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Plain HTTP listeners (HTTP/1.1 and h2c).
    pub listen: Vec<SocketAddr>,
    /// TLS listeners (HTTP/1.1 and HTTP/2 by ALPN); need `[tls]` certificates.
    pub listen_tls: Vec<SocketAddr>,
    /// TLS settings and certificates.
    pub tls: Option<TlsFile>,
    /// The admin listener (`/metrics`, `/status`, `/healthz`): an address, or `"off"`.
    /// Default `127.0.0.1:9090`; if that default is taken, tidegate runs without it.
    pub admin: Option<String>,
    /// Log line format: `"text"` or `"json"`.
    pub log_format: LogFormat,
    /// Worker threads serving traffic; 0 (the default) means one per available core.
    pub workers: usize,
    /// Client connections served at once over all traffic listeners (default
    /// [`DEFAULT_MAX_CONNECTIONS`]); more wait in the kernel's accept queue.
    pub max_connections: Option<usize>,
    /// Streams one HTTP/2 connection may have open at once (default
    /// [`DEFAULT_HTTP2_MAX_STREAMS`]).
    pub http2_max_streams: Option<u32>,
    /// HTTP/2 requests in flight at once over all connections (default: `max_connections`);
    /// more are answered 503 at once.
    pub http2_max_requests: Option<usize>,
    /// Seconds a client has to send a request head (and, for a form post without a session
    /// id in its head, the start of its body), and may stay silent in the middle of a
    /// request body (default [`DEFAULT_CLIENT_TIMEOUT`]).
    pub client_timeout: Option<u64>,
    /// Seconds an upgraded (WebSocket) connection may carry nothing in either direction
    /// before it is closed (default [`DEFAULT_TUNNEL_TIMEOUT`]).
    pub tunnel_timeout: Option<u64>,
    /// A file holding the admin API's bearer token (changes through the API need it).
    /// `--admin-token-file` or `TIDEGATE_ADMIN_TOKEN` give it too.
    pub admin_token_file: Option<PathBuf>,
    /// A file the pins are written to (every `state_interval` and at shutdown) and read back
    /// from at start, so that a restart keeps the sessions learned from pages.
    pub state_file: Option<PathBuf>,
    /// Seconds between writes of the state file (default [`DEFAULT_STATE_INTERVAL`]).
    pub state_interval: Option<u64>,
    /// The Unix socket a new tidegate started with `--upgrade` (or `tidegate upgrade`)
    /// reaches this one on, to take over its listeners and pins. Default: beside the state
    /// file (its name plus `.sock`); without either, upgrades are off.
    pub control_socket: Option<PathBuf>,
    /// Seconds a stopping tidegate lets requests in flight finish before it closes their
    /// connections (default [`DEFAULT_SHUTDOWN_TIMEOUT`]).
    pub shutdown_timeout: Option<u64>,
    /// Networks whose connections may speak for their clients (an L4 balancer, a CDN): their
    /// `X-Forwarded-For`, `Forwarded` and `X-Real-IP` are kept. Anybody else's are replaced.
    pub trusted_proxies: Vec<String>,
    /// How tidegate talks to backends.
    pub upstream: UpstreamFile,
    /// The shared store several instances keep their pins in (Redis or Valkey); absent
    /// means each instance keeps its own.
    pub store: Option<StoreFile>,
    /// The pools. A pool without `hosts` serves any host; the most specific route wins
    /// (exact host, then wildcard, then any; then the longest path prefix).
    #[serde(rename = "pool")]
    pub pools: Vec<PoolFile>,
}

/// `[upstream]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamFile {
    /// Seconds to wait for a backend connection before answering 502.
    pub connect_timeout: u64,
    /// Seconds to wait for a backend's reply head before answering 504 (raise it for
    /// long-polling pages).
    pub response_timeout: u64,
    /// Seconds an idle pooled backend connection is kept.
    pub idle_timeout: u64,
    /// Most idle connections kept per backend.
    pub max_idle_per_backend: usize,
}

impl Default for UpstreamFile {
    fn default() -> Self {
        UpstreamFile {
            connect_timeout: 3,
            response_timeout: 60,
            idle_timeout: 90,
            max_idle_per_backend: 64,
        }
    }
}

/// `[store]`: pins shared through Redis.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreFile {
    /// `redis://[user:password@]host:port/db` (`rediss://` for TLS). `REDIS_PASSWORD` gives
    /// the password when the URL has none.
    pub redis: Option<String>,
    /// The secret the store's keys are derived with (instances sharing pins share it);
    /// `TIDEGATE_STORE_SECRET` gives it too.
    pub secret: Option<String>,
    /// Milliseconds a lookup may wait for the store before the request goes on as a new
    /// session (default [`DEFAULT_STORE_TIMEOUT_MS`]).
    pub timeout_ms: Option<u64>,
    /// Prefix of every key and channel (default `"tidegate"`): farms sharing one Redis
    /// keep apart by it.
    pub prefix: Option<String>,
    /// Writes waiting for the store at most; more are dropped and counted (default
    /// [`DEFAULT_STORE_MAX_PENDING`]).
    pub max_pending: Option<usize>,
    /// PEM file of the CA that signed the store's certificate (`rediss://` only); default:
    /// the system's trusted roots.
    pub ca_file: Option<PathBuf>,
}

/// Milliseconds a lookup waits for the store unless `[store] timeout_ms` says otherwise.
pub const DEFAULT_STORE_TIMEOUT_MS: u64 = 20;

/// Writes that may wait for the store unless `[store] max_pending` says otherwise.
pub const DEFAULT_STORE_MAX_PENDING: usize = 65_536;

/// A validated `[store]`.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The Redis URL (with its password, if it has one).
    pub url: String,
    /// The key secret, if configured (else `TIDEGATE_STORE_SECRET`, else a built-in one).
    pub secret: Option<Vec<u8>>,
    /// How long a lookup waits.
    pub timeout: std::time::Duration,
    /// Key and channel prefix.
    pub prefix: String,
    /// Writes that may wait.
    pub max_pending: usize,
    /// The CA the store's certificate is checked against, if not the system's roots.
    pub ca_file: Option<PathBuf>,
}

/// Shows the URL without its password, and no secret.
impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &redacted_url(&self.url))
            .field("secret", &self.secret.as_ref().map(|_| "set"))
            .field("timeout", &self.timeout)
            .field("prefix", &self.prefix)
            .field("max_pending", &self.max_pending)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// `url` with any password replaced by `***`, for logs.
pub fn redacted_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(not a URL)".to_string(),
    }
}

impl StoreFile {
    /// Checks `[store]`; `None` when it names no Redis. A relative `ca_file` is taken from
    /// `base`.
    pub fn validate(self, base: &Path) -> Result<Option<StoreConfig>, Invalid> {
        let Some(url) = self.redis else {
            let set = self.secret.is_some()
                || self.timeout_ms.is_some()
                || self.prefix.is_some()
                || self.max_pending.is_some()
                || self.ca_file.is_some();
            return if set {
                Err(invalid("store.redis", "is required in [store]"))
            } else {
                Ok(None)
            };
        };
        let store = StoreConfig {
            url,
            secret: self.secret.map(String::into_bytes),
            timeout: std::time::Duration::from_millis(
                self.timeout_ms.unwrap_or(DEFAULT_STORE_TIMEOUT_MS),
            ),
            prefix: self.prefix.unwrap_or_else(|| "tidegate".to_string()),
            max_pending: self.max_pending.unwrap_or(DEFAULT_STORE_MAX_PENDING),
            ca_file: self.ca_file.map(|f| base.join(f)),
        };
        store.check()?;
        if store.ca_file.is_some() && !store.url.starts_with("rediss://") {
            return Err(invalid(
                "store.ca_file",
                "is only used with a rediss:// URL",
            ));
        }
        Ok(Some(store))
    }
}

impl StoreConfig {
    /// The settings of `--store URL`.
    pub fn from_url(url: &str) -> Result<StoreConfig, Invalid> {
        let store = StoreConfig {
            url: url.to_string(),
            secret: None,
            timeout: std::time::Duration::from_millis(DEFAULT_STORE_TIMEOUT_MS),
            prefix: "tidegate".to_string(),
            max_pending: DEFAULT_STORE_MAX_PENDING,
            ca_file: None,
        };
        store.check()?;
        Ok(store)
    }

    fn check(&self) -> Result<(), Invalid> {
        let scheme = self.url.split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("redis" | "rediss" | "valkey" | "valkeys")) {
            return Err(invalid(
                "store.redis",
                format!(
                    "{:?} is not a redis:// or rediss:// URL",
                    redacted_url(&self.url)
                ),
            ));
        }
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(self.url.as_str()) {
            return Err(invalid(
                "store.redis",
                format!(
                    "{}: {}",
                    redacted_url(&self.url),
                    e.detail().unwrap_or("invalid")
                ),
            ));
        }
        if self.secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err(invalid("store.secret", "must be at least 16 bytes"));
        }
        let ms = self.timeout.as_millis();
        if !(1..=1000).contains(&ms) {
            return Err(invalid(
                "store.timeout_ms",
                "must be between 1 and 1000 milliseconds",
            ));
        }
        if self.prefix.is_empty()
            || self.prefix.len() > 64
            || !self.prefix.bytes().all(|c| c.is_ascii_graphic())
        {
            return Err(invalid(
                "store.prefix",
                "must be 1 to 64 printable ASCII characters without spaces",
            ));
        }
        if !(1..=10_000_000).contains(&self.max_pending) {
            return Err(invalid(
                "store.max_pending",
                "must be between 1 and 10000000",
            ));
        }
        Ok(())
    }
}

/// `log_format = "text" | "json"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the admin listener goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminListen {
    /// No admin listener.
    Off,
    /// The default address: if it is taken, tidegate warns and runs without it.
    Default(SocketAddr),
    /// An address the operator chose: failing to bind it is an error.
    Configured(SocketAddr),
}

/// The default admin address.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9090";

/// `[tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFile {
    /// Lowest TLS version accepted: `"1.2"` or `"1.3"`.
    pub min_version: MinVersion,
    /// `Strict-Transport-Security` max-age in seconds on TLS replies; 0 sends none.
    pub hsts_max_age: u64,
    /// Adds `includeSubDomains` to the HSTS header.
    pub hsts_include_subdomains: bool,
    /// Plain listeners that answer every request with a redirect to HTTPS.
    pub redirect_http: Vec<SocketAddr>,
    /// Seconds between checks of the certificate files for changes; 0 reloads on SIGHUP only.
    pub reload_check_interval: u64,
    /// Certificates; the first is the default for clients without (or with unknown) SNI.
    #[serde(rename = "certificate")]
    pub certificates: Vec<CertFile>,
}

impl Default for TlsFile {
    fn default() -> Self {
        TlsFile {
            min_version: MinVersion::Tls12,
            hsts_max_age: 0,
            hsts_include_subdomains: false,
            redirect_http: Vec::new(),
            reload_check_interval: 5,
            certificates: Vec::new(),
        }
    }
}

/// `[[tls.certificate]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFile {
    /// PEM certificate chain, leaf first (relative paths: to the config file's directory).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `[[pool]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolFile {
    /// Pool name, unique.
    pub name: String,
    /// Host patterns (`example.com`, `*.example.com`); empty matches any host.
    pub hosts: Vec<String>,
    /// Path prefix, matched at a segment boundary.
    pub path_prefix: String,
    /// `session` or `client-ip`.
    pub affinity: AffinityMode,
    /// `round-robin` or `least-sessions`.
    pub policy: PolicyName,
    /// Session id names, rules and table limits (session affinity only).
    pub session: Option<SessionFile>,
    /// The inserted affinity cookie; absent means off.
    pub affinity_cookie: Option<AffinityCookieFile>,
    /// Active health checks; absent means passive only.
    pub health: Option<HealthFile>,
    /// `redispatch` or `fail`: what happens to a session whose backend is down or disabled.
    pub on_pinned_down: OnPinnedDownName,
    /// The backends.
    #[serde(rename = "backend")]
    pub backends: Vec<BackendFile>,
}

/// `on_pinned_down = "redispatch" | "fail"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnPinnedDownName {
    /// Re-pin to a live backend.
    #[default]
    Redispatch,
    /// 503 with Retry-After; the pin is kept.
    Fail,
}

/// `[pool.health]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthFile {
    /// `tcp` (the default), `http`, or `passive`.
    pub check: CheckName,
    /// The path an HTTP check requests (default `/`; only with `check = "http"`).
    pub path: Option<String>,
    /// The status an HTTP check expects; absent: any 2xx or 3xx (only with `check = "http"`).
    pub expect_status: Option<u16>,
    /// Seconds between checks of one backend.
    pub interval: u64,
    /// Seconds one check may take (fractions allowed).
    pub timeout: f64,
    /// Successes in a row that bring a backend up.
    pub rise: u32,
    /// Failures in a row (checks or refused connections) that take a backend down.
    pub fall: u32,
}

impl Default for HealthFile {
    fn default() -> Self {
        let d = HealthPolicy::default();
        HealthFile {
            check: CheckName::Tcp,
            path: None,
            expect_status: None,
            interval: d.interval.as_secs(),
            timeout: d.timeout.as_secs_f64(),
            rise: d.thresholds.rise,
            fall: d.thresholds.fall,
        }
    }
}

/// `check = "passive" | "tcp" | "http"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckName {
    /// No active check: traffic alone (with `rise`, `fall` and `interval` for the probes
    /// that bring a down backend back).
    Passive,
    /// A TCP connect.
    Tcp,
    /// An HTTP GET.
    Http,
}

impl Default for PoolFile {
    fn default() -> Self {
        PoolFile {
            name: "default".into(),
            hosts: Vec::new(),
            path_prefix: "/".into(),
            affinity: AffinityMode::Session,
            policy: PolicyName::RoundRobin,
            session: None,
            affinity_cookie: None,
            health: None,
            on_pinned_down: OnPinnedDownName::Redispatch,
            backends: Vec::new(),
        }
    }
}

/// `affinity = "session" | "client-ip"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AffinityMode {
    /// Pin session ids through the affinity table.
    Session,
    /// Hash the client address; no table, no parsing.
    ClientIp,
}

/// `policy = "round-robin" | "least-sessions"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    /// Weighted round-robin.
    RoundRobin,
    /// Fewest live pins per weight.
    LeastSessions,
}

/// `[pool.session]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionFile {
    /// Query and form field carrying the id.
    pub param: String,
    /// Cookie names carrying the id.
    pub cookies: Vec<String>,
    /// Path parameter carrying the id (`""` disables).
    pub path_param: String,
    /// Shortest valid id.
    pub id_min_length: usize,
    /// Longest valid id.
    pub id_max_length: usize,
    /// Characters of a valid id, as ranges.
    pub id_chars: String,
    /// Bytes of a form POST body read to find the id (0 disables).
    pub form_peek_bytes: usize,
    /// Bytes of an HTML reply scanned for the id in links (0 disables).
    pub page_scan_bytes: usize,
    /// Seconds without use before a pin expires.
    pub idle_timeout: u32,
    /// Seconds after creation before a pin expires.
    pub max_lifetime: u32,
    /// Most pins held.
    pub max_pins: usize,
}

impl Default for SessionFile {
    fn default() -> Self {
        let limits = TableLimits::default();
        SessionFile {
            param: "_s".into(),
            cookies: vec!["_s".into()],
            path_param: "jsessionid".into(),
            id_min_length: 1,
            id_max_length: 64,
            id_chars: "A-Za-z0-9_-".into(),
            form_peek_bytes: 64 * 1024,
            page_scan_bytes: 32 * 1024,
            idle_timeout: limits.idle_timeout,
            max_lifetime: limits.max_lifetime,
            max_pins: limits.max_pins,
        }
    }
}

/// `[pool.affinity_cookie]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffinityCookieFile {
    /// Cookie name.
    #[serde(default = "default_cookie_name")]
    pub name: String,
    /// HMAC secret, at least 16 bytes: the same as `secrets = [secret]`.
    pub secret: Option<String>,
    /// HMAC secrets, each at least 16 bytes: the first signs, every one verifies.
    pub secrets: Option<Vec<String>>,
}

/// Most secrets `[pool.affinity_cookie]` may list: a cookie a request carries is compared
/// with each backend's value under each of them.
pub const MAX_COOKIE_SECRETS: usize = 8;

impl AffinityCookieFile {
    fn validate(self, key: &str) -> Result<AffinityCookieConfig, Invalid> {
        if self.name.is_empty() || !self.name.bytes().all(is_token_byte) {
            return Err(invalid(
                format!("{key}.name"),
                "must be a cookie name (an HTTP token)",
            ));
        }
        let short = "must be at least 16 bytes";
        let mut secrets = match (self.secret, self.secrets) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    format!("{key}.secrets"),
                    "give `secret` or `secrets`, not both (`secret = \"S\"` is `secrets = [\"S\"]`)",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    key,
                    "needs `secret`, or `secrets` to rotate secrets (the first signs, all verify)",
                ));
            }
            (Some(secret), None) => {
                if secret.len() < 16 {
                    return Err(invalid(format!("{key}.secret"), short));
                }
                vec![secret]
            }
            (None, Some(secrets)) => {
                let skey = format!("{key}.secrets");
                if secrets.is_empty() {
                    return Err(invalid(skey, "must list at least one secret"));
                }
                if secrets.len() > MAX_COOKIE_SECRETS {
                    return Err(invalid(
                        skey,
                        format!(
                            "at most {MAX_COOKIE_SECRETS} secrets: drop the old ones no cookie \
                             still needs"
                        ),
                    ));
                }
                for (i, secret) in secrets.iter().enumerate() {
                    if secret.len() < 16 {
                        return Err(invalid(format!("{skey}[{i}]"), short));
                    }
                    if let Some(j) = secrets[..i].iter().position(|s| s == secret) {
                        return Err(invalid(
                            format!("{skey}[{i}]"),
                            format!("is the same secret as secrets[{j}]"),
                        ));
                    }
                }
                secrets
            }
        };
        let older = secrets.split_off(1).into_iter().map(String::into_bytes);
        Ok(AffinityCookieConfig {
            name: self.name,
            // The one left: the first.
            signing: secrets.concat().into_bytes(),
            older: older.collect(),
        })
    }
}

fn default_cookie_name() -> String {
    "tidegate".into()
}

/// `[[pool.backend]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    /// `host:port` (an IP address and port).
    pub address: SocketAddr,
    /// Stable name; defaults to the address.
    pub name: Option<String>,
    /// Share of new sessions, 1–256.
    #[serde(default = "one")]
    pub weight: u32,
    /// `active`, `drain` or `disabled`.
    #[serde(default)]
    pub state: StateName,
    /// Live pins above which it takes no new session (pinned ones are always served).
    pub max_sessions: Option<u64>,
    /// Requests served at once; more wait in the backend's queue.
    pub max_conns: Option<u32>,
    /// Requests that may wait for a slot at once (with `max_conns`; default 1024).
    pub queue_max: Option<usize>,
    /// Seconds a request may wait for a slot (with `max_conns`; default 10, fractions allowed).
    pub queue_timeout: Option<f64>,
    /// The command that starts the backend when its port is closed: an argv list, with
    /// `{port}`, `{host}` and `{name}` replaced.
    pub launch: Option<Vec<String>>,
    /// Seconds its port has to accept after a launch (default 60).
    pub launch_timeout: Option<f64>,
    /// Its working directory (relative to the configuration file).
    pub launch_dir: Option<PathBuf>,
    /// Variables added to its environment.
    pub launch_env: Option<std::collections::BTreeMap<String, String>>,
    /// The file its stdout and stderr are appended to.
    pub launch_log: Option<String>,
    /// Seconds after a failed launch before another is tried (default 5).
    pub launch_backoff: Option<f64>,
    /// Seconds with no pin and nothing in flight before it is stopped (default: never).
    pub idle_stop: Option<f64>,
    /// Seconds between SIGTERM and SIGKILL when it is stopped (default 10).
    pub stop_timeout: Option<f64>,
    /// Whether it is stopped when tidegate stops (default false: it keeps its sessions and
    /// the next tidegate adopts it).
    pub stop_on_exit: Option<bool>,
}

impl BackendFile {
    /// An active backend at `address` of weight 1 with nothing else set.
    pub fn at(address: SocketAddr, name: Option<String>) -> Self {
        BackendFile {
            address,
            name,
            weight: 1,
            state: StateName::default(),
            max_sessions: None,
            max_conns: None,
            queue_max: None,
            queue_timeout: None,
            launch: None,
            launch_timeout: None,
            launch_dir: None,
            launch_env: None,
            launch_log: None,
            launch_backoff: None,
            idle_stop: None,
            stop_timeout: None,
            stop_on_exit: None,
        }
    }

    /// The launch settings, checked: the program exists and may be run, paths are resolved
    /// against `base` (the configuration file's directory).
    fn launch_spec(
        &self,
        key: &str,
        pool: &str,
        name: &str,
        hold_max: usize,
        base: &Path,
    ) -> Result<Option<LaunchSpec>, Invalid> {
        let Some(argv) = &self.launch else {
            let given = [
                ("launch_timeout", self.launch_timeout.is_some()),
                ("launch_dir", self.launch_dir.is_some()),
                ("launch_env", self.launch_env.is_some()),
                ("launch_log", self.launch_log.is_some()),
                ("launch_backoff", self.launch_backoff.is_some()),
                ("idle_stop", self.idle_stop.is_some()),
                ("stop_timeout", self.stop_timeout.is_some()),
                ("stop_on_exit", self.stop_on_exit.is_some()),
            ];
            if let Some((k, _)) = given.iter().find(|(_, given)| *given) {
                return Err(invalid(format!("{key}.{k}"), "is only used with launch"));
            }
            return Ok(None);
        };
        if argv.is_empty() || argv[0].is_empty() {
            return Err(invalid(
                format!("{key}.launch"),
                "must name a program: [\"/path/to/program\", \"arg\", …]",
            ));
        }
        for (i, arg) in argv.iter().enumerate() {
            launch::check_placeholders(arg)
                .map_err(|m| invalid(format!("{key}.launch[{i}]"), m))?;
        }
        // Absolute, so that the program, its directory and its log mean the same whatever
        // directory tidegate (or the image, in `launch_dir`) runs in.
        let resolve = |p: &Path| {
            let joined = if p.is_relative() {
                base.join(p)
            } else {
                p.to_path_buf()
            };
            std::path::absolute(&joined).unwrap_or(joined)
        };
        let dir = self.launch_dir.as_deref().map(resolve);
        if let Some(dir) = &dir
            && !dir.is_dir()
        {
            return Err(invalid(
                format!("{key}.launch_dir"),
                format!("{} is not a directory", dir.display()),
            ));
        }
        let mut argv = argv.clone();
        let program = launch::expand(&argv[0], name, self.address);
        argv[0] = find_program(
            &program,
            &dir.clone().unwrap_or_else(|| resolve(Path::new(""))),
        )
        .map_err(|m| invalid(format!("{key}.launch[0]"), m))?
        // Expanded again at each launch: braces in the path stay braces.
        .replace('{', "{{")
        .replace('}', "}}");
        let mut env = Vec::new();
        for (k, v) in self.launch_env.iter().flatten() {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return Err(invalid(
                    format!("{key}.launch_env"),
                    format!("{k:?} is not an environment variable name (or its value holds NUL)"),
                ));
            }
            env.push((k.clone(), v.clone()));
        }
        let log = match &self.launch_log {
            Some(l) => {
                let log_key = format!("{key}.launch_log");
                launch::check_placeholders(l).map_err(|m| invalid(&log_key, m))?;
                let log = resolve(Path::new(&launch::expand(l, name, self.address)));
                if let Some(parent) = log.parent() {
                    crate::farm::launch::check_log_directory(parent)
                        .map_err(|m| invalid(&log_key, m))?;
                }
                log
            }
            None => {
                let safe = |s: &str| -> String {
                    s.chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                                c
                            } else {
                                '_'
                            }
                        })
                        .collect()
                };
                crate::farm::launch::default_log_directory().join(format!(
                    "{}-{}.log",
                    safe(pool),
                    safe(name)
                ))
            }
        };
        let seconds = |k: &str, value: Option<f64>, default: f64, min: f64, max: f64| {
            fractional_seconds(&format!("{key}.{k}"), value.unwrap_or(default), min, max)
        };
        Ok(Some(LaunchSpec {
            argv,
            dir,
            env,
            log,
            timeout: seconds("launch_timeout", self.launch_timeout, 60.0, 0.1, 3600.0)?,
            idle_stop: match self.idle_stop {
                None => None,
                Some(v) => Some(seconds("idle_stop", Some(v), 0.0, 1.0, 30.0 * 86_400.0)?),
            },
            stop_timeout: seconds("stop_timeout", self.stop_timeout, 10.0, 0.1, 3600.0)?,
            backoff: seconds("launch_backoff", self.launch_backoff, 5.0, 0.0, 3600.0)?,
            stop_on_exit: self.stop_on_exit.unwrap_or(false),
            hold_max,
        }))
    }
}

/// The program a launch runs: a path (relative ones taken from `dir`) that must be an
/// executable file, or a bare name found in `PATH`. Returns what to run.
fn find_program(program: &str, dir: &Path) -> Result<String, String> {
    let runnable = |p: &Path| {
        let meta = std::fs::metadata(p).ok().filter(|m| m.is_file());
        #[cfg(unix)]
        let meta =
            meta.filter(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0);
        meta.is_some()
    };
    if program.contains('/') {
        let path = Path::new(program);
        let path = if path.is_relative() {
            dir.join(path)
        } else {
            path.to_path_buf()
        };
        return if runnable(&path) {
            Ok(path.display().to_string())
        } else if path.exists() {
            Err(format!("{} is not an executable file", path.display()))
        } else {
            Err(format!("{} does not exist", path.display()))
        };
    }
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .any(|d| runnable(&d.join(program)));
    if found {
        Ok(program.to_string())
    } else {
        Err(format!("{program:?} is not an executable found in PATH"))
    }
}

/// `state = "active" | "drain" | "disabled"` of a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateName {
    /// Takes new sessions.
    #[default]
    Active,
    /// Keeps its sessions, takes no new ones.
    Drain,
    /// Takes nothing.
    Disabled,
}

impl StateName {
    /// The admin state it asks for.
    pub fn admin(self) -> AdminState {
        match self {
            StateName::Active => AdminState::Active,
            StateName::Drain => AdminState::Draining,
            StateName::Disabled => AdminState::Disabled,
        }
    }
}

fn one() -> u32 {
    1
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Plain HTTP listeners.
    pub listen: Vec<SocketAddr>,
    /// TLS listeners and their settings, if any.
    pub tls: Option<TlsConfig>,
    /// The admin listener.
    pub admin: AdminListen,
    /// Log line format.
    pub log_format: LogFormat,
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Client connections served at once.
    pub max_connections: usize,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_streams: u32,
    /// HTTP/2 requests in flight at once over all connections.
    pub http2_max_requests: usize,
    /// Time a client has for a request head, and may stay silent within a body.
    pub client_timeout: std::time::Duration,
    /// Time an upgraded connection may carry nothing either way.
    pub tunnel_timeout: std::time::Duration,
    /// Upstream settings.
    pub upstream: UpstreamConfig,
    /// Pools, in file order.
    pub pools: Vec<PoolConfig>,
    /// The admin API token file, if configured.
    pub admin_token_file: Option<PathBuf>,
    /// The state file and the time between its writes, if configured.
    pub state: Option<(PathBuf, std::time::Duration)>,
    /// The control socket upgrades go through, if configured (see [`Config::control_socket`]
    /// for the default).
    pub control_socket: Option<PathBuf>,
    /// How long a stop lets requests in flight finish.
    pub shutdown_timeout: std::time::Duration,
    /// Peers whose forwarding fields are kept.
    pub trusted_proxies: TrustedProxies,
    /// The shared store, if pins are shared with other instances.
    pub store: Option<StoreConfig>,
}

/// Validated TLS settings.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// TLS listeners.
    pub listen: Vec<SocketAddr>,
    /// Certificates, paths resolved.
    pub certificates: Vec<CertFiles>,
    /// Lowest version.
    pub min_version: MinVersion,
    /// The HSTS header value, when enabled.
    pub hsts: Option<String>,
    /// HTTP→HTTPS redirect listeners.
    pub redirect_http: Vec<SocketAddr>,
    /// Certificate file check period; `None` for SIGHUP only.
    pub reload_check_interval: Option<std::time::Duration>,
}

/// Validated `[upstream]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Connect timeout.
    pub connect_timeout: std::time::Duration,
    /// Time allowed for a reply head.
    pub response_timeout: std::time::Duration,
    /// Idle pooled connection lifetime.
    pub idle_timeout: std::time::Duration,
    /// Idle connections kept per backend.
    pub max_idle_per_backend: usize,
}

/// A validated pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Name.
    pub name: String,
    /// Host patterns (`Any` when none were given).
    pub hosts: Vec<HostMatch>,
    /// Path prefix.
    pub path_prefix: String,
    /// Session affinity settings, or `None` for client-IP mode.
    pub session: Option<SessionConfig>,
    /// New-session policy.
    pub policy: Policy,
    /// The affinity cookie, if the pool inserts one.
    pub affinity_cookie: Option<AffinityCookieConfig>,
    /// Health checks and thresholds.
    pub health: HealthPolicy,
    /// What happens to sessions of a backend that is down or disabled.
    pub on_pinned_down: OnPinnedDown,
    /// Backends.
    pub backends: Vec<BackendConfig>,
}

/// Validated session settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    /// Where ids travel.
    pub names: SessionNames,
    /// What ids look like.
    pub rules: IdRules,
    /// Table limits.
    pub limits: TableLimits,
    /// Form peek bound.
    pub form_peek_bytes: usize,
    /// Page scan bound.
    pub page_scan_bytes: usize,
}

/// A validated backend.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// Stable name.
    pub name: String,
    /// Address.
    pub address: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// The admin state the file asks for.
    pub state: AdminState,
    /// Live pins above which it takes no new session.
    pub max_sessions: Option<u64>,
    /// `max_conns`, the queue's bound and its timeout.
    pub max_conns: Option<(u32, usize, std::time::Duration)>,
    /// How it is launched on demand, if it is.
    pub launch: Option<LaunchSpec>,
}

/// A validated `[pool.affinity_cookie]`.
#[derive(Clone, PartialEq, Eq)]
pub struct AffinityCookieConfig {
    /// Cookie name.
    pub name: String,
    /// The secret that signs: `secret`, or the first of `secrets`.
    pub signing: Vec<u8>,
    /// The rest of `secrets`, which still verify.
    pub older: Vec<Vec<u8>>,
}

/// Names the secrets by number only: a configuration printed for debugging shows none.
impl std::fmt::Debug for AffinityCookieConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AffinityCookieConfig")
            .field("name", &self.name)
            .field("secrets", &(1 + self.older.len()))
            .finish()
    }
}

/// A validation failure: the key it concerns and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Dotted key path, e.g. `pool[0].backend[1].weight`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// `value` seconds, refused unless between 1 and `max`; `max_said` follows `max` in the
/// message (`" (a day)"`).
fn seconds(
    key: &str,
    value: u64,
    max: u64,
    max_said: &str,
) -> Result<std::time::Duration, Invalid> {
    if (1..=max).contains(&value) {
        Ok(std::time::Duration::from_secs(value))
    } else {
        Err(invalid(
            key,
            format!("must be between 1 and {max} seconds{max_said}"),
        ))
    }
}

/// `value` seconds (fractions allowed), refused unless between `min` and `max`.
fn fractional_seconds(
    key: &str,
    value: f64,
    min: f64,
    max: f64,
) -> Result<std::time::Duration, Invalid> {
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(std::time::Duration::from_secs_f64(value))
    } else {
        Err(invalid(
            key,
            format!("must be between {min} and {max} seconds"),
        ))
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The longest path a Unix socket address holds (`sun_path` less its terminating zero).
const UNIX_PATH_MAX: usize = 107;

/// Whether a control socket path fits a socket address and is not a directory (what the
/// configuration can tell; its directory may be made later, as systemd's
/// `RuntimeDirectory=` does).
pub fn check_control_socket_path(path: &Path) -> Result<(), String> {
    if path.as_os_str().len() > UNIX_PATH_MAX {
        return Err(format!(
            "{} is longer than the {UNIX_PATH_MAX} bytes a socket address holds: choose a shorter path",
            path.display()
        ));
    }
    if path.is_dir() {
        return Err(format!("{} is a directory", path.display()));
    }
    Ok(())
}

/// Whether a control socket can be made at `path` now: [`check_control_socket_path`], and
/// its directory exists.
pub fn check_control_socket(path: &Path) -> Result<(), String> {
    check_control_socket_path(path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            Err(format!("the directory {} does not exist", dir.display()))
        }
        _ => Ok(()),
    }
}

impl Config {
    /// The control socket an upgrade goes through: `control_socket`, else the state file's
    /// path plus `.sock` (`state` beside `state.sock`), else none.
    pub fn control_socket(&self, state_file: Option<&Path>) -> Option<PathBuf> {
        if let Some(path) = &self.control_socket {
            return Some(path.clone());
        }
        let state = state_file.or(self.state.as_ref().map(|(p, _)| p.as_path()))?;
        let mut name = state.as_os_str().to_owned();
        name.push(".sock");
        Some(PathBuf::from(name))
    }

    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `file` names it in errors.
    pub fn from_toml(text: &str, file: &str) -> Result<Config, ConfigError> {
        let at = |key: String, message: String, span: Option<std::ops::Range<usize>>| {
            ConfigError::Invalid {
                file: file.to_string(),
                line: span.map(|s| line_of(text, s.start)),
                key,
                message,
            }
        };
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| at(String::new(), e.message().to_string(), e.span()))?;
        let parsed: FileConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let key = if key == "." { String::new() } else { key };
            at(key, inner.message().to_string(), inner.span())
        })?;
        let base = Path::new(file).parent().unwrap_or(Path::new(""));
        parsed.validate(base).map_err(|inv| {
            let span = span_of(text, &inv.key);
            at(inv.key, inv.message, span)
        })
    }
}

impl FileConfig {
    /// Checks every value and builds the [`Config`]; relative certificate paths are taken
    /// from `base`.
    pub fn validate(self, base: &Path) -> Result<Config, Invalid> {
        if self.pools.is_empty() {
            return Err(invalid(
                "pool",
                "at least one [[pool]] with a backend is required",
            ));
        }
        let u = &self.upstream;
        let a_day = |key, value| seconds(key, value, MAX_TIMEOUT, " (a day)");
        let upstream = UpstreamConfig {
            connect_timeout: a_day("upstream.connect_timeout", u.connect_timeout)?,
            response_timeout: a_day("upstream.response_timeout", u.response_timeout)?,
            idle_timeout: std::time::Duration::from_secs(u.idle_timeout),
            max_idle_per_backend: u.max_idle_per_backend,
        };
        let mut pools: Vec<PoolConfig> = Vec::with_capacity(self.pools.len());
        for (i, pool) in self.pools.into_iter().enumerate() {
            let key = format!("pool[{i}]");
            let pool = pool.validate(&key, base)?;
            if let Some(first) = pools.iter().position(|p| p.name == pool.name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("pool name {:?} is already used by pool[{first}]", pool.name),
                ));
            }
            let prefix = normalized_prefix(&pool.path_prefix);
            for (j, host) in pool.hosts.iter().enumerate() {
                if let Some(first) = pools.iter().position(|p| {
                    normalized_prefix(&p.path_prefix) == prefix && p.hosts.contains(host)
                }) {
                    let key = if pool.hosts == [HostMatch::Any] {
                        format!("{key}.path_prefix")
                    } else {
                        format!("{key}.hosts[{j}]")
                    };
                    return Err(invalid(
                        key,
                        format!(
                            "pool[{first}] already serves this host with path prefix {:?}: \
                             one of them would never be used",
                            pool.path_prefix
                        ),
                    ));
                }
            }
            pools.push(pool);
        }
        let tls = match (self.tls, self.listen_tls.is_empty()) {
            (None, true) => None,
            (None, false) => {
                return Err(invalid(
                    "listen_tls",
                    "TLS listeners need [[tls.certificate]] entries",
                ));
            }
            (Some(t), no_tls_listener) => {
                Some(t.validate(self.listen_tls, no_tls_listener, base)?)
            }
        };
        let listen = if self.listen.is_empty() && tls.is_none() {
            vec![DEFAULT_LISTEN.parse().expect("default listen address")]
        } else {
            self.listen
        };
        let admin = match self.admin.as_deref() {
            None => AdminListen::Default(DEFAULT_ADMIN.parse().expect("default admin address")),
            Some("off") => AdminListen::Off,
            Some(a) => AdminListen::Configured(a.parse().map_err(|_| {
                invalid(
                    "admin",
                    format!("{a:?} is not an address (IP:port) or \"off\""),
                )
            })?),
        };
        let plain = listen
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("listen[{i}]"), *a));
        let tls_lists = tls.iter().flat_map(|t| {
            let l = t
                .listen
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("listen_tls[{i}]"), *a));
            let r = t
                .redirect_http
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("tls.redirect_http[{i}]"), *a));
            l.chain(r)
        });
        let admin_bind = match admin {
            AdminListen::Configured(a) => Some(("admin".to_string(), a)),
            _ => None,
        };
        let mut bound: Vec<(String, SocketAddr)> = Vec::new();
        for (key, a) in plain.chain(tls_lists).chain(admin_bind) {
            if let Some((other, b)) = bound.iter().find(|(_, b)| binds_overlap(a, *b)) {
                return Err(invalid(
                    key,
                    format!("{a} overlaps {other} ({b}): the second bind would fail"),
                ));
            }
            bound.push((key, a));
        }
        if let AdminListen::Default(a) = admin {
            bound.push(("admin (default)".to_string(), a));
        }
        check_backend_addresses(&pools, &bound)?;
        if self.workers > 1024 {
            return Err(invalid(
                "workers",
                "must be at most 1024 (0 = one per core)",
            ));
        }
        let workers = if self.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.workers
        };
        let client_timeout = self.client_timeout.unwrap_or(DEFAULT_CLIENT_TIMEOUT);
        let client_timeout = seconds("client_timeout", client_timeout, 3600, "")?;
        let tunnel_timeout = self.tunnel_timeout.unwrap_or(DEFAULT_TUNNEL_TIMEOUT);
        let tunnel_timeout = seconds(
            "tunnel_timeout",
            tunnel_timeout,
            7 * MAX_TIMEOUT,
            " (a week)",
        )?;
        let state = match (self.state_file, self.state_interval) {
            (None, Some(_)) => {
                return Err(invalid("state_interval", "is only used with state_file"));
            }
            (None, None) => None,
            (Some(file), interval) => {
                let interval = seconds(
                    "state_interval",
                    interval.unwrap_or(DEFAULT_STATE_INTERVAL),
                    3600,
                    " (an hour)",
                )?;
                let file = std::path::absolute(base.join(&file)).unwrap_or(file);
                if file.is_dir() {
                    return Err(invalid(
                        "state_file",
                        format!("{} is a directory", file.display()),
                    ));
                }
                // The control socket goes beside it unless `control_socket` says where.
                if self.control_socket.is_none() {
                    let mut socket = file.as_os_str().to_owned();
                    socket.push(".sock");
                    if let Err(why) = check_control_socket_path(Path::new(&socket)) {
                        return Err(invalid(
                            "state_file",
                            format!("the control socket beside it: {why} (or set control_socket)"),
                        ));
                    }
                }
                Some((file, interval))
            }
        };
        let control_socket = match self.control_socket {
            None => None,
            Some(path) => {
                let path = std::path::absolute(base.join(&path)).unwrap_or(path);
                if let Err(why) = check_control_socket_path(&path) {
                    return Err(invalid("control_socket", why));
                }
                Some(path)
            }
        };
        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if !(1..=1_000_000).contains(&max_connections) {
            return Err(invalid("max_connections", "must be between 1 and 1000000"));
        }
        let http2_max_streams = self.http2_max_streams.unwrap_or(DEFAULT_HTTP2_MAX_STREAMS);
        if !(1..=1000).contains(&http2_max_streams) {
            return Err(invalid("http2_max_streams", "must be between 1 and 1000"));
        }
        let http2_max_requests = self.http2_max_requests.unwrap_or(max_connections);
        if !(1..=10_000_000).contains(&http2_max_requests) {
            return Err(invalid(
                "http2_max_requests",
                "must be between 1 and 10000000",
            ));
        }
        Ok(Config {
            listen,
            tls,
            admin,
            log_format: self.log_format,
            workers,
            max_connections,
            http2_max_streams,
            http2_max_requests,
            client_timeout,
            tunnel_timeout,
            upstream,
            pools,
            admin_token_file: self
                .admin_token_file
                .map(|p| if p.is_relative() { base.join(p) } else { p }),
            state,
            control_socket,
            shutdown_timeout: seconds(
                "shutdown_timeout",
                self.shutdown_timeout.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
                3600,
                " (an hour)",
            )?,
            trusted_proxies: TrustedProxies(
                self.trusted_proxies
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        Network::parse(n).map_err(|m| invalid(format!("trusted_proxies[{i}]"), m))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            store: match self.store {
                Some(store) => store.validate(base)?,
                None => None,
            },
        })
    }
}

impl TlsFile {
    fn validate(
        self,
        listen: Vec<SocketAddr>,
        no_listener: bool,
        base: &Path,
    ) -> Result<TlsConfig, Invalid> {
        if self.certificates.is_empty() {
            return Err(invalid(
                "tls.certificate",
                "at least one [[tls.certificate]] is required",
            ));
        }
        if no_listener {
            return Err(invalid(
                "tls",
                "[tls] needs listen_tls addresses to serve on",
            ));
        }
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let certificates = self
            .certificates
            .into_iter()
            .map(|c| CertFiles {
                cert: resolve(c.cert),
                key: resolve(c.key),
            })
            .collect();
        let hsts = (self.hsts_max_age > 0).then(|| {
            let sub = if self.hsts_include_subdomains {
                "; includeSubDomains"
            } else {
                ""
            };
            format!("max-age={}{sub}", self.hsts_max_age)
        });
        Ok(TlsConfig {
            listen,
            certificates,
            min_version: self.min_version,
            hsts,
            redirect_http: self.redirect_http,
            reload_check_interval: (self.reload_check_interval > 0)
                .then(|| std::time::Duration::from_secs(self.reload_check_interval)),
        })
    }
}

impl PoolFile {
    fn validate(self, key: &str, base: &Path) -> Result<PoolConfig, Invalid> {
        if self.name.is_empty() || !self.name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                format!("{key}.name"),
                "must be non-empty printable ASCII without spaces",
            ));
        }
        if !self.path_prefix.starts_with('/')
            || !self
                .path_prefix
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b";?#%,".contains(&b))
        {
            return Err(invalid(
                format!("{key}.path_prefix"),
                "must start with '/' and hold only printable ASCII without ; ? # % ,",
            ));
        }
        let mut hosts = Vec::with_capacity(self.hosts.len());
        for (j, h) in self.hosts.iter().enumerate() {
            let wildcard_ok = match h.strip_prefix("*.") {
                _ if h == "*" || !h.contains('*') => true,
                Some(domain) => {
                    !domain.is_empty()
                        && !domain.contains('*')
                        && !domain.starts_with('.')
                        && !domain.ends_with('.')
                }
                None => false,
            };
            if h.is_empty() || h.contains(['/', ' ', ':']) || !wildcard_ok {
                return Err(invalid(
                    format!("{key}.hosts[{j}]"),
                    format!("{h:?} is not a host name, a *.domain pattern or *"),
                ));
            }
            hosts.push(HostMatch::parse(h));
        }
        if hosts.is_empty() {
            hosts.push(HostMatch::Any);
        }
        if self.backends.is_empty() {
            return Err(invalid(
                format!("{key}.backend"),
                "a pool needs at least one [[pool.backend]]",
            ));
        }
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(self.backends.len());
        for (j, b) in self.backends.into_iter().enumerate() {
            let bkey = format!("{key}.backend[{j}]");
            check_weight(b.weight).map_err(|m| invalid(format!("{bkey}.weight"), m))?;
            let name = b.name.clone().unwrap_or_else(|| b.address.to_string());
            check_name(&name).map_err(|m| invalid(format!("{bkey}.name"), m))?;
            let id = BackendId::from_name(&name);
            if let Some(k) = backends.iter().position(|o| o.name == name) {
                return Err(invalid(
                    format!("{bkey}.name"),
                    format!("backend name {name:?} is already used by {key}.backend[{k}]"),
                ));
            }
            if let Some(k) = backends
                .iter()
                .position(|o| BackendId::from_name(&o.name) == id)
            {
                return Err(invalid(
                    format!("{bkey}.name"),
                    format!(
                        "backend name {name:?} hashes to the same id as {key}.backend[{k}]; rename one"
                    ),
                ));
            }
            if let Some(max) = b.max_sessions {
                if !(1..=10_000_000).contains(&max) {
                    return Err(invalid(
                        format!("{bkey}.max_sessions"),
                        "must be between 1 and 10000000",
                    ));
                }
                if self.affinity == AffinityMode::ClientIp {
                    return Err(invalid(
                        format!("{bkey}.max_sessions"),
                        "counts pinned sessions: it needs affinity = \"session\"",
                    ));
                }
            }
            let queue_max = b.queue_max.unwrap_or(DEFAULT_QUEUE_MAX);
            if b.max_conns.is_none() && b.launch.is_none() && b.queue_max.is_some() {
                return Err(invalid(
                    format!("{bkey}.queue_max"),
                    "is only used with max_conns or launch",
                ));
            }
            if !(1..=1_000_000).contains(&queue_max) {
                return Err(invalid(
                    format!("{bkey}.queue_max"),
                    "must be between 1 and 1000000",
                ));
            }
            let max_conns = match b.max_conns {
                None => {
                    if b.queue_timeout.is_some() {
                        return Err(invalid(
                            format!("{bkey}.queue_timeout"),
                            "is only used with max_conns",
                        ));
                    }
                    None
                }
                Some(max) => {
                    if !(1..=100_000).contains(&max) {
                        return Err(invalid(
                            format!("{bkey}.max_conns"),
                            "must be between 1 and 100000",
                        ));
                    }
                    let timeout = fractional_seconds(
                        &format!("{bkey}.queue_timeout"),
                        b.queue_timeout.unwrap_or(DEFAULT_QUEUE_TIMEOUT),
                        0.001,
                        3600.0,
                    )?;
                    Some((max, queue_max, timeout))
                }
            };
            let launch = b.launch_spec(&bkey, &self.name, &name, queue_max, base)?;
            backends.push(BackendConfig {
                name,
                address: b.address,
                weight: b.weight,
                state: b.state.admin(),
                max_sessions: b.max_sessions,
                max_conns,
                launch,
            });
        }
        let session = match (self.affinity, self.session) {
            (AffinityMode::ClientIp, None) => None,
            (AffinityMode::ClientIp, Some(_)) => {
                return Err(invalid(
                    format!("{key}.session"),
                    "session settings need affinity = \"session\"; client-ip mode reads no session ids",
                ));
            }
            (AffinityMode::Session, session) => Some(
                session
                    .unwrap_or_default()
                    .validate(&format!("{key}.session"))?,
            ),
        };
        let affinity_cookie = match self.affinity_cookie {
            None => None,
            Some(c) => {
                let ckey = format!("{key}.affinity_cookie");
                let cookie = c.validate(&ckey)?;
                if session.is_none() {
                    return Err(invalid(ckey, "needs affinity = \"session\""));
                }
                Some(cookie)
            }
        };
        let health = match self.health {
            None => HealthPolicy::default(),
            Some(h) => h.validate(&format!("{key}.health"))?,
        };
        Ok(PoolConfig {
            name: self.name,
            hosts,
            path_prefix: self.path_prefix,
            health,
            on_pinned_down: match self.on_pinned_down {
                OnPinnedDownName::Redispatch => OnPinnedDown::Redispatch,
                OnPinnedDownName::Fail => OnPinnedDown::Fail,
            },
            session,
            policy: match self.policy {
                PolicyName::RoundRobin => Policy::RoundRobin,
                PolicyName::LeastSessions => Policy::LeastSessions,
            },
            affinity_cookie,
            backends,
        })
    }
}

impl HealthFile {
    fn validate(self, key: &str) -> Result<HealthPolicy, Invalid> {
        let interval = seconds(
            &format!("{key}.interval"),
            self.interval,
            3600,
            " (an hour)",
        )?;
        let timeout = fractional_seconds(&format!("{key}.timeout"), self.timeout, 0.001, 60.0)?;
        for (name, value) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&value) {
                return Err(invalid(
                    format!("{key}.{name}"),
                    "must be between 1 and 100",
                ));
            }
        }
        if self.check != CheckName::Http {
            let given = [
                ("path", self.path.is_some()),
                ("expect_status", self.expect_status.is_some()),
            ];
            if let Some((name, _)) = given.iter().find(|(_, given)| *given) {
                return Err(invalid(
                    format!("{key}.{name}"),
                    "is only used with check = \"http\"",
                ));
            }
        }
        let check = match self.check {
            CheckName::Passive => Check::Passive,
            CheckName::Tcp => Check::Tcp,
            CheckName::Http => {
                let path = self.path.unwrap_or_else(|| "/".into());
                if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(invalid(
                        format!("{key}.path"),
                        "must start with '/' and hold only printable ASCII without spaces",
                    ));
                }
                if let Some(s) = self.expect_status
                    && !(100..=599).contains(&s)
                {
                    return Err(invalid(
                        format!("{key}.expect_status"),
                        "must be an HTTP status (100 to 599)",
                    ));
                }
                Check::Http {
                    path: path.into(),
                    expect_status: self.expect_status,
                }
            }
        };
        Ok(HealthPolicy {
            check,
            interval,
            timeout,
            thresholds: Thresholds {
                rise: self.rise,
                fall: self.fall,
            },
        })
    }
}

impl SessionFile {
    fn validate(self, key: &str) -> Result<SessionConfig, Invalid> {
        let name_ok = |n: &str| !n.is_empty() && n.bytes().all(is_token_byte);
        // A query or form field name: a token, less the token bytes that split a query
        // (`&`), end a URL (`#`) or start an escape (`%`): the readers could never match it.
        if !name_ok(&self.param) || self.param.bytes().any(|b| matches!(b, b'&' | b'#' | b'%')) {
            return Err(invalid(
                format!("{key}.param"),
                "must be a non-empty field name: letters, digits and !$'*+-.^_`|~",
            ));
        }
        for (i, c) in self.cookies.iter().enumerate() {
            if !name_ok(c) {
                return Err(invalid(
                    format!("{key}.cookies[{i}]"),
                    "must be a cookie name",
                ));
            }
        }
        if !self.path_param.is_empty() && !name_ok(&self.path_param) {
            return Err(invalid(
                format!("{key}.path_param"),
                "must be a parameter name or \"\"",
            ));
        }
        let rules =
            IdRules::new(self.id_min_length, self.id_max_length, &self.id_chars).map_err(|m| {
                let which = if m.contains("class") {
                    "id_chars"
                } else if self.id_min_length == 0 || self.id_min_length > self.id_max_length {
                    "id_min_length"
                } else {
                    "id_max_length"
                };
                invalid(format!("{key}.{which}"), m)
            })?;
        if self.form_peek_bytes > 1 << 20 {
            return Err(invalid(
                format!("{key}.form_peek_bytes"),
                "must be at most 1048576",
            ));
        }
        if self.page_scan_bytes > 1 << 20 {
            return Err(invalid(
                format!("{key}.page_scan_bytes"),
                "must be at most 1048576",
            ));
        }
        if self.idle_timeout == 0 {
            return Err(invalid(
                format!("{key}.idle_timeout"),
                "must be at least 1 second",
            ));
        }
        if self.max_lifetime < self.idle_timeout {
            return Err(invalid(
                format!("{key}.max_lifetime"),
                "must be at least idle_timeout",
            ));
        }
        if self.max_pins == 0 {
            return Err(invalid(format!("{key}.max_pins"), "must be at least 1"));
        }
        Ok(SessionConfig {
            names: SessionNames {
                param: self.param.into(),
                cookies: self.cookies.into_iter().map(Into::into).collect(),
                path_param: (!self.path_param.is_empty()).then(|| self.path_param.into()),
            },
            rules,
            limits: TableLimits {
                idle_timeout: self.idle_timeout,
                max_lifetime: self.max_lifetime,
                max_pins: self.max_pins,
            },
            form_peek_bytes: self.form_peek_bytes,
            page_scan_bytes: self.page_scan_bytes,
        })
    }
}

/// Refuses a backend at one of tidegate's own listeners (its requests would come back to
/// tidegate), and an image launched on demand whose address another backend shares (two
/// launchers would start, adopt and stop the same image).
fn check_backend_addresses(
    pools: &[PoolConfig],
    bound: &[(String, SocketAddr)],
) -> Result<(), Invalid> {
    let all: Vec<(String, &BackendConfig)> = pools
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            p.backends
                .iter()
                .enumerate()
                .map(move |(j, b)| (format!("pool[{i}].backend[{j}]"), b))
        })
        .collect();
    for (n, (key, b)) in all.iter().enumerate() {
        // The listener's own address, or a loopback one on the port of a wildcard listener (a
        // wildcard listener does not make another machine's address tidegate's).
        let own = |l: &SocketAddr| {
            b.address.port() == l.port()
                && (b.address.ip() == l.ip()
                    || (l.ip().is_unspecified() && b.address.ip().is_loopback()))
        };
        if let Some((listener, _)) = bound.iter().find(|(_, l)| own(l)) {
            return Err(invalid(
                format!("{key}.address"),
                format!(
                    "{} is tidegate's own listener ({listener}): its requests would come back here",
                    b.address
                ),
            ));
        }
        if let Some((other, _)) = all.iter().enumerate().find_map(|(m, (other, o))| {
            (m < n
                && binds_overlap(o.address, b.address)
                && (b.launch.is_some() || o.launch.is_some()))
            .then_some((other, o))
        }) {
            return Err(invalid(
                format!("{key}.address"),
                format!(
                    "{} is also {other}'s address: an image launched on demand needs its port to \
                     itself (two backends would start, adopt and stop the same image)",
                    b.address
                ),
            ));
        }
    }
    Ok(())
}

/// Whether binding `a` after `b` fails: the same port, and the same address, or a wildcard
/// address of the same family, or `[::]` (which on Linux takes IPv4 too). Port 0 asks for a
/// free port and never clashes.
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let wildcard_covers = |w: SocketAddr, o: SocketAddr| {
        w.ip().is_unspecified() && (w.is_ipv6() || w.is_ipv4() == o.is_ipv4())
    };
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || wildcard_covers(a, b) || wildcard_covers(b, a))
}

/// A path prefix as routing compares it: `/app/` and `/app` are the same prefix.
fn normalized_prefix(prefix: &str) -> &str {
    match prefix.strip_suffix('/') {
        Some("") | None => prefix,
        Some(p) => p,
    }
}

/// RFC 9110 token characters (cookie and field names).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The span of the value at a key path such as `pool[0].backend[1].name` (or of its closest
/// ancestor present in the file, when the key itself was defaulted).
fn span_of(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut span = None;
    let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
    for segment in key.split('.') {
        let (name, index) = match segment.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let Some(value) = table.and_then(|t| t.get(name)) else {
            break;
        };
        span = Some(value.span());
        let mut current = value.get_ref();
        if let (Some(i), DeValue::Array(items)) = (index, current) {
            let Some(item) = items.get(i) else { break };
            span = Some(item.span());
            current = item.get_ref();
        }
        table = match current {
            DeValue::Table(t) => Some(t),
            _ => None,
        };
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, String> {
        Config::from_toml(text, "t.toml").map_err(|e| e.to_string())
    }

    const MINIMAL: &str = r#"
[[pool]]
name = "app"
[[pool.backend]]
address = "127.0.0.1:9001"
"#;

    #[test]
    fn minimal_file_gets_seaside_defaults() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(
            c.listen,
            vec![DEFAULT_LISTEN.parse::<SocketAddr>().unwrap()]
        );
        let s = c.pools[0].session.as_ref().unwrap();
        assert_eq!(&*s.names.param, "_s");
        assert_eq!(s.limits, TableLimits::default());
        assert_eq!(c.pools[0].backends[0].name, "127.0.0.1:9001");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err =
            load("listen = [\"127.0.0.1:1\"]\n[[pool]]\nname = \"a\"\nbogus = 1\n").unwrap_err();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn bad_value_is_named_with_key_and_line() {
        let text = "[[pool]]\nname = \"a\"\n[[pool.backend]]\naddress = \"nowhere\"\n";
        let err = load(text).unwrap_err();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("pool[0].backend[0].address"), "{err}");
    }

    #[test]
    fn cross_key_errors_find_their_line() {
        let text = "[[pool]]\nname = \"a\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\nname = \"x\"\n\
[[pool.backend]]\naddress = \"127.0.0.1:2\"\nname = \"x\"\n";
        let err = load(text).unwrap_err();
        assert!(err.contains("line 8"), "{err}");
        assert!(err.contains("pool[0].backend[1].name"), "{err}");
        let text = "[[pool]]\nname = \"a\"\n[pool.session]\nidle_timeout = 0\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n";
        let err = load(text).unwrap_err();
        assert!(
            err.contains("line 4") && err.contains("idle_timeout"),
            "{err}"
        );
        let text =
            "[[pool]]\nname = \"a\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\nweight = 0\n";
        let err = load(text).unwrap_err();
        assert!(err.contains("line 5") && err.contains("weight"), "{err}");
    }

    #[test]
    fn shadowed_routes_and_bad_wildcards_are_refused() {
        let pool = |name: &str, hosts: &str, prefix: &str| {
            format!(
                "[[pool]]\nname = \"{name}\"\nhosts = [{hosts}]\npath_prefix = \"{prefix}\"\n\
                 [[pool.backend]]\naddress = \"127.0.0.1:1\"\n"
            )
        };
        let text = pool("a", "\"a.test\", \"b.test\"", "/app") + &pool("b", "\"b.test\"", "/app/");
        let err = load(&text).unwrap_err();
        assert!(
            err.contains("pool[1].hosts[0]") && err.contains("line 9"),
            "{err}"
        );
        for bad in ["*example.com", "*.", "*.*.a.test", "a.*.test"] {
            let err = load(&pool("a", &format!("\"{bad}\""), "/")).unwrap_err();
            assert!(err.contains("pool[0].hosts[0]"), "{bad}: {err}");
        }
        let both = pool("a", "\"*.example.com\"", "/") + &pool("b", "\"example.com\"", "/");
        assert!(load(&both).is_ok());
    }

    #[test]
    fn tls_needs_certificates_and_listeners_and_resolves_paths() {
        let err = load(&format!("listen_tls = [\"127.0.0.1:8443\"]\n{MINIMAL}")).unwrap_err();
        assert!(
            err.contains("listen_tls") && err.contains("line 1"),
            "{err}"
        );
        let text = format!(
            "listen_tls = [\"127.0.0.1:8443\"]\n[tls]\nmin_version = \"1.3\"\nhsts_max_age = 60\n\
             [[tls.certificate]]\ncert = \"a.pem\"\nkey = \"/abs/a.key\"\n{MINIMAL}"
        );
        let c = Config::from_toml(&text, "/etc/tidegate/t.toml").unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(
            tls.certificates[0].cert,
            PathBuf::from("/etc/tidegate/a.pem")
        );
        assert_eq!(tls.certificates[0].key, PathBuf::from("/abs/a.key"));
        assert_eq!(tls.min_version, MinVersion::Tls13);
        assert_eq!(tls.hsts.as_deref(), Some("max-age=60"));
        assert!(
            c.listen.is_empty(),
            "no plain listener when only TLS is configured"
        );
        let err = load(&text.replace("\"1.3\"", "\"1.1\"")).unwrap_err();
        assert!(
            err.contains("tls.min_version") && err.contains("line 3"),
            "{err}"
        );
    }

    #[test]
    fn overlapping_listeners_are_refused() {
        let text = format!("listen = [\"0.0.0.0:8080\", \"127.0.0.1:8080\"]\n{MINIMAL}");
        let err = load(&text).unwrap_err();
        assert!(err.contains("listen[1]") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn bind_overlaps_follow_address_families() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(binds_overlap(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(binds_overlap(a("[::]:80"), a("127.0.0.1:80")));
        assert!(!binds_overlap(a("0.0.0.0:80"), a("[::1]:80")));
        assert!(!binds_overlap(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(!binds_overlap(a("127.0.0.1:0"), a("127.0.0.1:0")));
        let err = load(&format!("admin = \"127.0.0.1:8080\"\n{MINIMAL}")).unwrap_err();
        assert!(
            err.contains("key `admin`") && err.contains("listen[0]"),
            "{err}"
        );
    }

    #[test]
    fn session_settings_in_client_ip_mode_are_refused() {
        let text = "[[pool]]\nname = \"a\"\naffinity = \"client-ip\"\n[pool.session]\nparam = \"x\"\n\
[[pool.backend]]\naddress = \"127.0.0.1:1\"\n";
        let err = load(text).unwrap_err();
        assert!(
            err.contains("pool[0].session") && err.contains("line 4"),
            "{err}"
        );
    }

    #[test]
    fn id_length_errors_name_the_right_key() {
        let text = format!("{MINIMAL}[pool.session]\nid_min_length = 0\n");
        let err = load(&text).unwrap_err();
        assert!(
            err.contains("id_min_length") && err.contains("line 7"),
            "{err}"
        );
    }

    #[test]
    fn broken_toml_is_reported_with_its_line() {
        let err = load("[[pool]\nname = 1").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn health_settings_are_checked_and_named() {
        let with = |health: &str| load(&format!("{MINIMAL}[pool.health]\n{health}"));
        let ok = with("check = \"http\"\npath = \"/up\"\nexpect_status = 204\ntimeout = 0.25\n")
            .unwrap();
        assert_eq!(
            ok.pools[0].health.check,
            Check::Http {
                path: "/up".into(),
                expect_status: Some(204)
            }
        );
        assert_eq!(
            ok.pools[0].health.timeout,
            std::time::Duration::from_millis(250)
        );
        assert_eq!(with("").unwrap().pools[0].health.check, Check::Tcp);
        for (bad, key) in [
            ("expect_status = 700\ncheck = \"http\"", "expect_status"),
            ("expect_status = 200", "expect_status"),
            ("path = \"/x\"\ncheck = \"passive\"", "path"),
            ("check = \"http\"\npath = \"no-slash\"", "path"),
            ("timeout = 0", "timeout"),
            ("interval = 0", "interval"),
            ("fall = 0", "fall"),
            ("rise = 101", "rise"),
            ("check = \"udp\"", "check"),
        ] {
            let err = with(bad).unwrap_err();
            let line = 7 + bad.lines().position(|l| l.starts_with(key)).unwrap();
            assert!(
                err.contains(&format!("pool[0].health.{key}"))
                    && err.contains(&format!("line {line}")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn max_sessions_is_bounded_and_needs_session_affinity() {
        let c = load(&format!("{MINIMAL}max_sessions = 200\n")).unwrap();
        assert_eq!(c.pools[0].backends[0].max_sessions, Some(200));
        let err = load(&format!("{MINIMAL}max_sessions = 0\n")).unwrap_err();
        assert!(
            err.contains("backend[0].max_sessions") && err.contains("line 6"),
            "{err}"
        );
        let ip = MINIMAL.replace("name = \"app\"", "name = \"app\"\naffinity = \"client-ip\"");
        let err = load(&format!("{ip}max_sessions = 5\n")).unwrap_err();
        assert!(
            err.contains("max_sessions") && err.contains("session"),
            "{err}"
        );
    }

    #[test]
    fn max_conns_and_its_queue_are_checked() {
        let c = load(&format!("{MINIMAL}max_conns = 4\nqueue_timeout = 0.5\n")).unwrap();
        assert_eq!(
            c.pools[0].backends[0].max_conns,
            Some((4, DEFAULT_QUEUE_MAX, std::time::Duration::from_millis(500)))
        );
        for (bad, key) in [
            ("max_conns = 0", "max_conns"),
            ("queue_max = 5", "queue_max"),
            ("max_conns = 1\nqueue_max = 0", "queue_max"),
            ("max_conns = 1\nqueue_timeout = 0.0000001", "queue_timeout"),
        ] {
            let err = load(&format!("{MINIMAL}{bad}\n")).unwrap_err();
            assert!(err.contains(&format!("backend[0].{key}")), "{bad}: {err}");
        }
    }

    #[test]
    fn a_store_is_a_redis_url_with_checked_settings() {
        let with = |table: &str| load(&format!("[store]\n{table}\n{MINIMAL}"));
        let c =
            with("redis = \"redis://:pw@10.0.0.5:6379/2\"\nsecret = \"0123456789abcdef\"").unwrap();
        let store = c.store.unwrap();
        assert_eq!(
            (
                store.timeout.as_millis(),
                store.prefix.as_str(),
                store.max_pending
            ),
            (20, "tidegate", DEFAULT_STORE_MAX_PENDING)
        );
        let shown = format!("{store:?}");
        assert!(
            !shown.contains("pw@") && !shown.contains("0123456789abcdef"),
            "{shown}"
        );
        assert!(with("redis = \"valkeys://cache:6380\"").is_ok());
        assert!(load(MINIMAL).unwrap().store.is_none());
        for (table, said) in [
            (
                "timeout_ms = 5",
                "key `store.redis`: is required in [store]",
            ),
            (
                "redis = \"http://x:1\"",
                "key `store.redis`: \"http://x:1/\" is not a redis://",
            ),
            ("redis = \"redis://:pw@x:notaport\"", "key `store.redis`"),
            (
                "redis = \"redis://x\"\nsecret = \"short\"",
                "key `store.secret`: must be at least 16 bytes",
            ),
            (
                "redis = \"redis://x\"\ntimeout_ms = 0",
                "key `store.timeout_ms`",
            ),
            (
                "redis = \"redis://x\"\nprefix = \"a b\"",
                "key `store.prefix`",
            ),
            (
                "redis = \"redis://x\"\nmax_pending = 0",
                "key `store.max_pending`",
            ),
            (
                "redis = \"redis://x\"\nca_file = \"ca.pem\"",
                "key `store.ca_file`: is only used with a rediss:// URL",
            ),
            (
                "redis = \"redis://x\"\nsecrets = \"x\"",
                "unknown field `secrets`",
            ),
        ] {
            let err = with(table).unwrap_err();
            assert!(err.contains(said), "{table}: {err}");
            assert!(err.contains("t.toml, line "), "the line is named: {err}");
            assert!(!err.contains("pw"), "{err}");
        }
    }

    #[test]
    fn trusted_proxies_are_networks() {
        let c = load(&format!(
            "trusted_proxies = [\"10.0.0.0/8\", \"2001:db8::1\"]\n{MINIMAL}"
        ))
        .unwrap();
        assert!(c.trusted_proxies.trust("10.1.1.1".parse().unwrap()));
        assert!(!c.trusted_proxies.trust("11.1.1.1".parse().unwrap()));
        let err = load(&format!("trusted_proxies = [\"10.0.0.0/40\"]\n{MINIMAL}")).unwrap_err();
        assert!(
            err.contains("trusted_proxies[0]") && err.contains("line 1"),
            "{err}"
        );
    }

    #[test]
    fn launch_settings_are_read_with_their_defaults() {
        let c = load(&format!(
            "{MINIMAL}name = \"img1\"\nlaunch = [\"sh\", \"-c\", \"exec img --port {{port}} --name {{name}}\"]\n\
             idle_stop = 30\nlaunch_env = {{ LANG = \"C\" }}\n"
        ))
        .unwrap();
        let spec = c.pools[0].backends[0].launch.clone().unwrap();
        assert_eq!(spec.argv[0], "sh", "a bare name is run through PATH");
        assert_eq!(
            spec.command_line("img1", "127.0.0.1:9001".parse().unwrap())[2],
            "exec img --port 9001 --name img1"
        );
        assert_eq!(spec.env, [("LANG".to_string(), "C".to_string())]);
        assert_eq!(spec.timeout, std::time::Duration::from_secs(60));
        assert_eq!(spec.idle_stop, Some(std::time::Duration::from_secs(30)));
        assert_eq!(spec.stop_timeout, std::time::Duration::from_secs(10));
        assert_eq!(spec.backoff, std::time::Duration::from_secs(5));
        assert_eq!(spec.hold_max, DEFAULT_QUEUE_MAX);
        assert!(!spec.stop_on_exit);
        assert_eq!(
            spec.log,
            crate::farm::launch::default_log_directory().join("app-img1.log")
        );
        // A log directory any user may write to is refused.
        let err = load(&format!(
            "{MINIMAL}launch = [\"sh\"]\nlaunch_log = \"/tmp/{{name}}.log\"\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("backend[0].launch_log") && err.contains("any user"),
            "{err}"
        );
    }

    #[test]
    fn a_launch_that_cannot_run_is_refused_naming_its_key_and_line() {
        for (bad, key) in [
            ("launch = []", "launch"),
            ("launch = [\"/nonexistent/pharo\"]", "launch[0]"),
            ("launch = [\"/etc/passwd\"]", "launch[0]"),
            ("launch = [\"no-such-program-on-path\"]", "launch[0]"),
            ("launch = [\"sh\", \"--port={prot}\"]", "launch[1]"),
            (
                "launch = [\"sh\"]\nlaunch_dir = \"/nonexistent\"",
                "launch_dir",
            ),
            ("launch = [\"sh\"]\nlaunch_timeout = 0", "launch_timeout"),
            ("launch = [\"sh\"]\nidle_stop = 0.5", "idle_stop"),
            ("idle_stop = 10", "idle_stop"),
            ("stop_on_exit = true", "stop_on_exit"),
            ("launch_log = \"/tmp/x.log\"", "launch_log"),
        ] {
            let err = load(&format!("{MINIMAL}{bad}\n")).unwrap_err();
            let name = key.split('[').next().unwrap();
            let line = 6 + bad.lines().position(|l| l.starts_with(name)).unwrap();
            assert!(
                err.contains(&format!("backend[0].{key}`"))
                    && err.contains(&format!("line {line}")),
                "{bad}: {err}"
            );
        }
        // An image's port is its own; a backend is never tidegate itself.
        let shared = format!(
            "{MINIMAL}launch = [\"sh\"]\n[[pool]]\nname = \"b\"\nhosts = [\"b.example\"]\n\
             [[pool.backend]]\naddress = \"127.0.0.1:9001\"\n"
        );
        let err = load(&shared).unwrap_err();
        assert!(
            err.contains("pool[1].backend[0].address")
                && err.contains("pool[0].backend[0]")
                && err.contains("line 11"),
            "{err}"
        );
        let own = "listen = [\"127.0.0.1:9001\"]\n[[pool]]\nname = \"app\"\n[[pool.backend]]\naddress = \"127.0.0.1:9001\"\n";
        let err = load(own).unwrap_err();
        assert!(
            err.contains("pool[0].backend[0].address") && err.contains("own listener"),
            "{err}"
        );
        // A wildcard listener makes loopback its own, not another machine's address.
        let wildcard = |backend: &str| {
            format!(
                "listen = [\"0.0.0.0:9001\"]\n[[pool]]\nname = \"app\"\n[[pool.backend]]\naddress = \"{backend}\"\n"
            )
        };
        assert!(load(&wildcard("127.0.0.1:9001")).is_err());
        assert!(load(&wildcard("10.0.0.11:9001")).is_ok());
        // queue_max bounds what a launch holds, without max_conns.
        let c = load(&format!("{MINIMAL}launch = [\"sh\"]\nqueue_max = 8\n")).unwrap();
        assert_eq!(c.pools[0].backends[0].launch.as_ref().unwrap().hold_max, 8);
    }

    #[test]
    fn backend_state_and_on_pinned_down_are_read() {
        let text = "[[pool]]\nname = \"a\"\non_pinned_down = \"fail\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\nstate = \"drain\"\n";
        let c = load(text).unwrap();
        assert_eq!(c.pools[0].on_pinned_down, OnPinnedDown::Fail);
        assert_eq!(c.pools[0].backends[0].state, AdminState::Draining);
        let err = load(&text.replace("\"drain\"", "\"draining\"")).unwrap_err();
        assert!(err.contains("state") && err.contains("line 6"), "{err}");
    }

    #[test]
    fn control_socket_paths_must_fit_a_socket_address() {
        let long = format!("/tmp/{}", "d".repeat(110));
        let text = format!("control_socket = \"{long}\"\n{MINIMAL}");
        let err = Config::from_toml(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("control_socket") && err.contains("line 1") && err.contains("107 bytes"),
            "{err}"
        );
        // The default beside a long state file path is named by the state file.
        let text = format!("state_file = \"{}\"\n{MINIMAL}", &long[..104]);
        let err = Config::from_toml(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("state_file") && err.contains("control socket beside it"),
            "{err}"
        );
        // A directory that does not exist yet is fine in the file (made before the start).
        let c = Config::from_toml(
            &format!("control_socket = \"/run/tidegate-nowhere/control.sock\"\n{MINIMAL}"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(
            c.control_socket(None),
            Some(PathBuf::from("/run/tidegate-nowhere/control.sock"))
        );
        let c =
            Config::from_toml(&format!("state_file = \"/srv/pins\"\n{MINIMAL}"), "t.toml").unwrap();
        assert_eq!(
            c.control_socket(None),
            Some(PathBuf::from("/srv/pins.sock"))
        );
    }

    #[test]
    fn a_session_param_the_readers_could_never_match_is_refused() {
        for bad in ["a&b", "s#", "%73", ""] {
            let text = format!("{MINIMAL}[pool.session]\nparam = \"{bad}\"\n");
            let err = Config::from_toml(&text, "t.toml").unwrap_err().to_string();
            assert!(err.contains("session.param"), "{bad}: {err}");
        }
    }

    #[test]
    fn short_cookie_secret_is_refused() {
        let text = format!("{MINIMAL}[pool.affinity_cookie]\nsecret = \"short\"\n");
        let err = load(&text).unwrap_err();
        assert!(
            err.contains("affinity_cookie.secret") && err.contains("line 7"),
            "{err}"
        );
    }

    #[test]
    fn cookie_secrets_rotate_the_first_signing() {
        let cookie = |table: &str| {
            load(&format!("{MINIMAL}[pool.affinity_cookie]\n{table}"))
                .map(|c| c.pools[0].affinity_cookie.clone().unwrap())
        };
        let one = cookie("secret = \"0123456789abcdef\"\n").unwrap();
        assert_eq!(
            one,
            cookie("secrets = [\"0123456789abcdef\"]\n").unwrap(),
            "`secret = S` is `secrets = [S]`"
        );
        assert!(one.older.is_empty());
        let two = cookie("secrets = [\"new-secret-16-bytes\", \"old-secret-16-bytes\"]\n").unwrap();
        assert_eq!(two.signing, b"new-secret-16-bytes");
        assert_eq!(two.older, vec![b"old-secret-16-bytes".to_vec()]);
        assert!(
            !format!("{two:?}").contains("secret-16"),
            "Debug shows no secret: {two:?}"
        );
    }

    #[test]
    fn cookie_secrets_are_refused_naming_the_key_the_index_and_the_line() {
        let refused =
            |table: &str| load(&format!("{MINIMAL}[pool.affinity_cookie]\n{table}")).unwrap_err();
        let err = refused("secret = \"0123456789abcdef\"\nsecrets = [\"0123456789abcdef\"]\n");
        assert!(
            err.contains("pool[0].affinity_cookie.secrets")
                && err.contains("line 8")
                && err.contains("not both"),
            "{err}"
        );
        let err = refused("secrets = [\n  \"0123456789abcdef\",\n  \"short\",\n]\n");
        assert!(
            err.contains("pool[0].affinity_cookie.secrets[1]")
                && err.contains("line 9")
                && err.contains("16 bytes"),
            "{err}"
        );
        let err = refused("secrets = [\"0123456789abcdef\", \"0123456789abcdef\"]\n");
        assert!(
            err.contains("secrets[1]") && err.contains("same secret as secrets[0]"),
            "{err}"
        );
        let err = refused("secrets = []\n");
        assert!(
            err.contains("secrets") && err.contains("at least one"),
            "{err}"
        );
        let nine: Vec<String> = (0..9)
            .map(|i| format!("\"secret-number-{i:03}\""))
            .collect();
        let err = refused(&format!("secrets = [{}]\n", nine.join(", ")));
        assert!(err.contains("at most 8"), "{err}");
        let err = refused("name = \"tg\"\n");
        assert!(
            err.contains("pool[0].affinity_cookie") && err.contains("needs `secret`"),
            "{err}"
        );
    }
}
