//! Error types, and the one place where a request-path failure becomes an HTTP status,
//! a short text body for the client, and a metrics label.

use http::StatusCode;

/// A configuration that cannot be used, naming the file, line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read the configuration: {source}")]
    Read {
        /// The path.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// A key has a bad value, or the file is not valid TOML.
    #[error("{file}{}: {}{message}", line.map(|l| format!(", line {l}")).unwrap_or_default(), if key.is_empty() { String::new() } else { format!("key `{key}`: ") })]
    Invalid {
        /// The file (or `command line`).
        file: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// Dotted key path; empty for syntax errors.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Why an upstream exchange failed, as far as a client and the metrics need to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The backend refused the connection.
    Refused,
    /// Connecting timed out.
    ConnectTimeout,
    /// Any other failure to connect.
    Connect,
    /// The connection broke before a complete reply head arrived.
    Reset,
    /// No reply head within the response timeout.
    ResponseTimeout,
    /// The reply was not valid HTTP/1.1.
    Invalid,
}

impl UpstreamFailure {
    /// A short label for logs and metrics (an `UPSTREAM_ERROR_KINDS` entry).
    pub fn kind(self) -> &'static str {
        match self {
            UpstreamFailure::Refused => "connect-refused",
            UpstreamFailure::ConnectTimeout => "connect-timeout",
            UpstreamFailure::Connect => "connect-error",
            UpstreamFailure::Reset => "reset",
            UpstreamFailure::ResponseTimeout => "response-timeout",
            UpstreamFailure::Invalid => "bad-reply",
        }
    }

    /// Whether no connection was made (refused, timed out, or failed otherwise): a passive
    /// health failure of the backend.
    pub fn is_connect(self) -> bool {
        matches!(
            self,
            UpstreamFailure::Refused | UpstreamFailure::ConnectTimeout | UpstreamFailure::Connect
        )
    }

    /// What happened, in a few words (logs).
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Refused => "connection refused",
            UpstreamFailure::ConnectTimeout => "connect timed out",
            UpstreamFailure::Connect => "cannot connect",
            UpstreamFailure::Reset => "connection closed before a complete reply",
            UpstreamFailure::ResponseTimeout => "no reply within the response timeout",
            UpstreamFailure::Invalid => "the reply is not valid HTTP/1.1",
        }
    }
}

/// Request-path failures a client sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// No pool serves this host and path.
    NoRoute,
    /// `CONNECT`: tidegate is a reverse proxy and opens no tunnels.
    Connect,
    /// The pool has no backend able to take the request.
    NoBackend {
        /// The pool.
        pool: Box<str>,
    },
    /// The session's backend is down or disabled and the pool fails such requests
    /// (`on_pinned_down = "fail"`): a 503 with `Retry-After`; the pin is kept.
    PinnedDown {
        /// Backend name.
        backend: Box<str>,
        /// Seconds the client is asked to wait.
        retry_after: u64,
    },
    /// The backend's queue (`max_conns`) could not take the request: full, or no slot came
    /// within `queue_timeout`. A 503 with `Retry-After`.
    Busy {
        /// Backend name.
        backend: Box<str>,
        /// Whether the wait timed out (else the queue was full).
        timed_out: bool,
        /// Seconds the client is asked to wait.
        retry_after: u64,
    },
    /// The backend's image could not be had: its launch failed, a back-off after a failed
    /// launch is running, or the launch already holds `queue_max` requests. A 503 with
    /// `Retry-After`.
    NotLaunched {
        /// Backend name.
        backend: Box<str>,
        /// Why.
        why: crate::core::launch::HoldRefusal,
        /// How the launch failed, when it did (the details stay in the log).
        reason: Option<crate::core::launch::LaunchFailure>,
        /// Seconds the client is asked to wait.
        retry_after: u64,
    },
    /// The chosen backend could not be reached or broke off.
    Upstream {
        /// Backend name.
        backend: Box<str>,
        /// Backend address.
        address: std::net::SocketAddr,
        /// What went wrong.
        failure: UpstreamFailure,
    },
    /// The request body failed while it was being read.
    BadRequestBody,
    /// An HTTP/1.1 request without a `Host` field, or any request with more than one
    /// (RFC 9112 §3.2: a 400).
    BadHost,
    /// The client stopped sending its request body part-way.
    RequestTimeout,
    /// An HTTP/2 request beyond `http2_max_requests` in flight. A 503 with `Retry-After`.
    Overloaded {
        /// Seconds the client is asked to wait.
        retry_after: u64,
    },
}

impl ProxyError {
    /// The status a client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::Connect => StatusCode::NOT_IMPLEMENTED,
            ProxyError::NoBackend { .. }
            | ProxyError::PinnedDown { .. }
            | ProxyError::Busy { .. }
            | ProxyError::NotLaunched { .. }
            | ProxyError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream {
                failure: UpstreamFailure::ResponseTimeout,
                ..
            } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::BadRequestBody | ProxyError::BadHost => StatusCode::BAD_REQUEST,
            ProxyError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no-route",
            ProxyError::Connect => "connect-method",
            ProxyError::NoBackend { .. } => "no-backend",
            ProxyError::PinnedDown { .. } => "pinned-down",
            ProxyError::Busy {
                timed_out: false, ..
            } => "queue-full",
            ProxyError::Busy {
                timed_out: true, ..
            } => "queue-timeout",
            ProxyError::NotLaunched { why, .. } => match why {
                crate::core::launch::HoldRefusal::Full => "launch-queue-full",
                crate::core::launch::HoldRefusal::Backoff => "launch-backoff",
                crate::core::launch::HoldRefusal::Failed => "launch-failed",
            },
            ProxyError::Upstream { failure, .. } => failure.kind(),
            ProxyError::BadRequestBody => "bad-request-body",
            ProxyError::BadHost => "bad-host",
            ProxyError::RequestTimeout => "request-timeout",
            ProxyError::Overloaded { .. } => "too-many-requests",
        }
    }
}

impl ProxyError {
    /// What the client is told: the log's text, but with every backend named only as "the
    /// application server": its name and address stay in the log.
    pub fn public(&self) -> String {
        Told {
            error: self,
            public: true,
        }
        .to_string()
    }
}

impl std::fmt::Display for ProxyError {
    /// The log's text, naming the backend and, for a failed exchange, its address.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Told {
            error: self,
            public: false,
        }
        .fmt(f)
    }
}

/// A [`ProxyError`] as told to the log or, `public`, to the client.
struct Told<'a> {
    error: &'a ProxyError,
    public: bool,
}

impl Told<'_> {
    /// `backend NAME` for the log, `the application server` for the client.
    fn backend(&self, f: &mut std::fmt::Formatter<'_>, name: &str) -> std::fmt::Result {
        if self.public {
            write!(f, "the application server")
        } else {
            write!(f, "backend {name}")
        }
    }
}

impl std::fmt::Display for Told<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.error {
            ProxyError::NoRoute => write!(f, "no pool serves this host and path"),
            ProxyError::Connect => write!(f, "CONNECT is not supported: this is a reverse proxy"),
            ProxyError::NoBackend { pool } => {
                write!(
                    f,
                    "no backend of pool {pool} takes new sessions: all down, draining, \
                     disabled or at max_sessions"
                )
            }
            ProxyError::Busy {
                backend,
                timed_out,
                retry_after,
            } => {
                self.backend(f, backend)?;
                write!(
                    f,
                    " is busy ({}); try again in {retry_after} s",
                    if *timed_out {
                        "no turn came within its queue timeout"
                    } else {
                        "its queue is full"
                    }
                )
            }
            ProxyError::PinnedDown {
                backend,
                retry_after,
            } => {
                if self.public {
                    write!(f, "the application server that holds this session")?;
                } else {
                    write!(f, "backend {backend}, which holds this session,")?;
                }
                write!(f, " is unavailable; try again in {retry_after} s")
            }
            ProxyError::NotLaunched {
                backend,
                why,
                reason,
                retry_after,
            } => {
                use crate::core::launch::HoldRefusal;
                let what = match why {
                    HoldRefusal::Full => "is starting and holds as many requests as it may",
                    HoldRefusal::Backoff => "could not be started a moment ago",
                    HoldRefusal::Failed => "could not be started",
                };
                self.backend(f, backend)?;
                write!(f, " {what}")?;
                if let Some(reason) = reason {
                    write!(f, ": {}", reason.told())?;
                }
                write!(f, "; try again in {retry_after} s")
            }
            ProxyError::Upstream {
                backend,
                address,
                failure,
            } => {
                let why = failure.as_str();
                let failed = matches!(
                    failure,
                    UpstreamFailure::Reset
                        | UpstreamFailure::ResponseTimeout
                        | UpstreamFailure::Invalid
                );
                match (self.public, failed) {
                    (true, true) => write!(f, "the application server failed: {why}"),
                    (true, false) => {
                        write!(f, "the application server could not be reached: {why}")
                    }
                    (false, true) => write!(f, "backend {backend} ({address}) failed: {why}"),
                    (false, false) => {
                        write!(f, "backend {backend} ({address}) unreachable: {why}")
                    }
                }
            }
            ProxyError::BadRequestBody => write!(f, "the request body could not be read"),
            ProxyError::BadHost => write!(f, "an HTTP/1.1 request needs exactly one Host field"),
            ProxyError::RequestTimeout => write!(f, "the request body stopped arriving"),
            ProxyError::Overloaded { .. } => write!(f, "too many requests in flight; try again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::launch::{HoldRefusal, LaunchFailure};

    /// Every refusal that concerns one backend: the log names it (and its address), the
    /// client hears of "the application server" only.
    #[test]
    fn public_texts_name_no_backend_and_no_address() {
        let backend: Box<str> = "img-secret-name".into();
        let address: std::net::SocketAddr = "10.9.8.7:6543".parse().unwrap();
        let mut errors = vec![
            ProxyError::PinnedDown {
                backend: backend.clone(),
                retry_after: 4,
            },
            ProxyError::Busy {
                backend: backend.clone(),
                timed_out: false,
                retry_after: 5,
            },
            ProxyError::Busy {
                backend: backend.clone(),
                timed_out: true,
                retry_after: 5,
            },
        ];
        for why in [HoldRefusal::Full, HoldRefusal::Backoff, HoldRefusal::Failed] {
            for reason in [None, Some(LaunchFailure::Exited)] {
                errors.push(ProxyError::NotLaunched {
                    backend: backend.clone(),
                    why,
                    reason,
                    retry_after: 3,
                });
            }
        }
        for failure in [
            UpstreamFailure::Refused,
            UpstreamFailure::ConnectTimeout,
            UpstreamFailure::Connect,
            UpstreamFailure::Reset,
            UpstreamFailure::ResponseTimeout,
            UpstreamFailure::Invalid,
        ] {
            errors.push(ProxyError::Upstream {
                backend: backend.clone(),
                address,
                failure,
            });
        }
        for e in &errors {
            let (logged, told) = (e.to_string(), e.public());
            assert!(
                logged.contains("img-secret-name"),
                "the log names it: {logged}"
            );
            for secret in ["img-secret-name", "10.9.8.7", "6543"] {
                assert!(
                    !told.contains(secret),
                    "{secret} told to the client: {told}"
                );
            }
            assert!(told.contains("the application server"), "{told}");
            // The rest of the reason is the same.
            let tail = |t: &str| t.rsplit_once("; ").map(|(_, r)| r.to_string());
            assert_eq!(tail(&logged), tail(&told), "{logged} / {told}");
        }
        assert_eq!(
            errors[0].public(),
            "the application server that holds this session is unavailable; try again in 4 s"
        );
    }
}
