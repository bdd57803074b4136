//! `tidegate ctl`: the admin API for people. One request per command over a plain
//! HTTP/1.1 connection to the admin listener; answers printed as a table or a line, and a
//! non-zero exit status when the API refuses.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::admin::api::{BackendView, Pools};

/// One `ctl` command (its doc comments are its `--help`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// List pools and backends: state, health, pins, requests in flight.
    Pools,
    /// Add a backend to a pool; it takes new sessions at once.
    Add {
        /// The pool.
        pool: String,
        /// The backend's name, its stable identity.
        name: String,
        /// Where it listens (IP:port).
        #[arg(value_name = "ADDR")]
        address: String,
        /// Its share of new sessions (1-256).
        #[arg(long, value_name = "N", default_value_t = 1)]
        weight: u32,
    },
    /// Drain a backend: no new sessions, its pinned sessions stay until they end.
    Drain {
        /// The pool.
        pool: String,
        /// The backend.
        name: String,
    },
    /// Make a backend active again.
    Enable {
        /// The pool.
        pool: String,
        /// The backend.
        name: String,
    },
    /// Disable a backend: nothing reaches it; its sessions follow on_pinned_down.
    Disable {
        /// The pool.
        pool: String,
        /// The backend.
        name: String,
    },
    /// Remove a backend (refused while sessions are pinned to it, unless --force).
    Remove {
        /// The pool.
        pool: String,
        /// The backend.
        name: String,
        /// Remove it anyway, dropping its pins.
        #[arg(long)]
        force: bool,
    },
    /// Change a backend's weight.
    Weight {
        /// The pool.
        pool: String,
        /// The backend.
        name: String,
        /// The new weight (1-256).
        #[arg(value_name = "N")]
        weight: u32,
    },
    /// Re-read the configuration file and apply what changed (as SIGHUP does).
    Reload,
}

/// What went wrong, and the exit status it deserves.
#[derive(Debug)]
pub struct Failure {
    /// The message for stderr.
    pub message: String,
    /// 1: the API refused; 2: no answer, or not one this client understands.
    pub status: u8,
}

/// The token for changes: `--token-file`, else `TIDEGATE_ADMIN_TOKEN`.
pub fn token(file: Option<&Path>) -> Result<Option<String>, Failure> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| Failure {
                message: format!("{}: cannot read the token: {e}", path.display()),
                status: 2,
            })?,
        None => std::env::var("TIDEGATE_ADMIN_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()),
    };
    // It goes into a header line as it is: a line break would start another header.
    if token
        .as_deref()
        .is_some_and(|t| t.bytes().any(|b| b.is_ascii_control()))
    {
        return Err(Failure {
            message: "the token holds a control character (a line break?): one line only".into(),
            status: 2,
        });
    }
    Ok(token)
}

/// Runs `command` against the admin listener at `admin`; returns what to print.
pub fn run(admin: SocketAddr, token: Option<&str>, command: &Command) -> Result<String, Failure> {
    let backend_path =
        |pool: &str, name: &str| format!("/api/pools/{}/backends/{}", segment(pool), segment(name));
    let (method, path, body) = match command {
        Command::Pools => ("GET", "/api/pools".to_string(), None),
        Command::Add {
            pool,
            name,
            address,
            weight,
        } => (
            "POST",
            format!("/api/pools/{}/backends", segment(pool)),
            Some(serde_json::json!({ "name": name, "address": address, "weight": weight })),
        ),
        Command::Drain { pool, name } => ("POST", backend_path(pool, name) + "/drain", None),
        Command::Enable { pool, name } => ("POST", backend_path(pool, name) + "/enable", None),
        Command::Disable { pool, name } => ("POST", backend_path(pool, name) + "/disable", None),
        Command::Remove { pool, name, force } => (
            "DELETE",
            backend_path(pool, name) + if *force { "?force=true" } else { "" },
            None,
        ),
        Command::Weight { pool, name, weight } => (
            "PATCH",
            backend_path(pool, name),
            Some(serde_json::json!({ "weight": weight })),
        ),
        Command::Reload => ("POST", "/api/reload".to_string(), None),
    };
    let (status, text) = exchange(admin, method, &path, token, body.as_ref())?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|_| Failure {
        message: format!("{admin} answered {status} with something that is not JSON: {text}"),
        status: 2,
    })?;
    if !(200..300).contains(&status) {
        let error = value["error"].as_str().unwrap_or("(no error message)");
        return Err(Failure {
            message: format!("refused ({status}): {error}"),
            status: 1,
        });
    }
    Ok(match command {
        Command::Pools => {
            let pools: Pools = serde_json::from_value(value).map_err(|e| Failure {
                message: format!("unexpected answer: {e}"),
                status: 2,
            })?;
            pools_table(&pools)
        }
        Command::Reload => reload_summary(&value),
        _ => {
            let b: BackendView = serde_json::from_value(value).map_err(|e| Failure {
                message: format!("unexpected answer: {e}"),
                status: 2,
            })?;
            let done = match command {
                Command::Add { .. } => "added",
                Command::Remove { .. } => "removed",
                Command::Weight { .. } => "re-weighted",
                _ => "now",
            };
            let process = b
                .process
                .as_ref()
                .map_or_else(String::new, |p| format!(" process {}", p.summary()));
            format!(
                "{} {done}: {} weight {} {} health {} pins {} in flight {}{process}\n",
                b.name, b.address, b.weight, b.state, b.health, b.pins, b.in_flight
            )
        }
    })
}

/// `text` as one path segment: percent-encoded but for unreserved characters and `:` (a
/// backend name may hold `/`, `?`, `#` or `%`; the API decodes each segment).
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Pools and backends as a table, one backend a line.
pub fn pools_table(pools: &Pools) -> String {
    let header = [
        "POOL",
        "BACKEND",
        "ADDRESS",
        "WEIGHT",
        "STATE",
        "HEALTH",
        "PINS",
        "IN-FLIGHT",
        "PROCESS",
    ];
    let mut rows: Vec<[String; 9]> = vec![header.map(String::from)];
    for p in &pools.pools {
        for b in &p.backends {
            rows.push([
                p.name.clone(),
                b.name.clone(),
                b.address.clone(),
                b.weight.to_string(),
                b.state.clone(),
                b.health.clone(),
                b.pins.to_string(),
                b.in_flight.to_string(),
                b.process
                    .as_ref()
                    .map_or_else(|| "-".into(), |p| p.summary()),
            ]);
        }
    }
    let widths: Vec<usize> = (0..9)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    // The process column only for a farm that launches images.
    let columns = if pools
        .pools
        .iter()
        .any(|p| p.backends.iter().any(|b| b.process.is_some()))
    {
        9
    } else {
        8
    };
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row[..columns]
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn reload_summary(v: &serde_json::Value) -> String {
    let mut out = String::from("configuration reloaded\n");
    for (key, label) in [
        ("pools_added", "pools added"),
        ("pools_removed", "pools removed"),
        ("pools_changed", "pool settings changed"),
        ("backends_added", "backends added"),
        ("backends_removed", "backends removed"),
        ("backends_changed", "backends changed"),
        ("not_applied", "needs a restart"),
        ("refused", "not applied"),
    ] {
        let items: Vec<&str> = v[key]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        if !items.is_empty() {
            out.push_str(&format!("  {label}: {}\n", items.join("; ")));
        }
    }
    if let Some(n) = v["pins_dropped"].as_u64().filter(|n| *n > 0) {
        out.push_str(&format!("  pins dropped: {n}\n"));
    }
    if let Some(c) = v["certificates"].as_str() {
        out.push_str(&format!("  certificates: {c}\n"));
    }
    out
}

/// One request, `Connection: close`; the status and the body.
fn exchange(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Result<(u16, String), Failure> {
    let unreachable = |e: std::io::Error| Failure {
        message: format!("cannot reach the admin listener at {admin}: {e}"),
        status: 2,
    };
    let mut stream =
        TcpStream::connect_timeout(&admin, Duration::from_secs(5)).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(unreachable)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nUser-Agent: tidegate-ctl\r\n\
         Connection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = token {
        request.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    stream.write_all(request.as_bytes()).map_err(unreachable)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).map_err(unreachable)?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| Failure {
        message: format!("{admin} sent no complete HTTP reply"),
        status: 2,
    })?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Failure {
            message: format!("{admin} sent no HTTP status line"),
            status: 2,
        })?;
    Ok((status, body.to_string()))
}
