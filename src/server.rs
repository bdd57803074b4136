//! Assembles a running balancer from a [`Config`]: pools, router, the
//! [`Upstream`](crate::upstream::Upstream) connections, the listeners, and the sweeper that
//! expires pins off the request path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinSet;

use crate::admin;
use crate::clock;
use crate::config::{AdminListen, Config, PoolConfig, TlsConfig};
use crate::core::affinity::Removed;
use crate::core::affinity_cookie::AffinityCookie;
use crate::core::backend::Backend;
use crate::core::pool::{Affinity, Pool, SessionAffinity};
use crate::core::route::{Route, Router};
use crate::listener;
use crate::listener::TlsFront;
use crate::proxy::Proxy;
use crate::shutdown::{self, Signal, Trigger};
use crate::tls::{self, CertError, CertFiles, CertResolver, CertStore};
use crate::upstream;
use http::HeaderValue;
use tokio_rustls::TlsAcceptor;

/// A balancer that is serving.
pub struct Running {
    addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    redirect_addrs: Vec<SocketAddr>,
    certificates: Option<Arc<CertResolver>>,
    proxy: Arc<Proxy>,
    shutdown: Trigger,
    tasks: JoinSet<()>,
}

/// Why the balancer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate could not be loaded.
    #[error("TLS certificate: {0}")]
    Certificate(#[from] CertError),
    /// rustls refused the TLS settings.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

async fn bind(address: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let fail = |source| StartError::Listen { address, source };
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    // Linux hands TCP_NODELAY down to every accepted connection: one system call here
    // instead of one per connection (elsewhere the listener sets it per connection).
    socket.set_nodelay(true).map_err(fail)?;
    socket.bind(address).map_err(fail)?;
    let listener = socket.listen(LISTEN_BACKLOG).map_err(fail)?;
    let local = listener.local_addr().map_err(fail)?;
    Ok((listener, local))
}

/// Pending connections the kernel may queue per listener (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// Loads and checks the certificates of a TLS configuration (what `tidegate check` and
/// start-up both do): every bad file is an error naming it, an expired one a warning.
pub fn load_certificates(tls: &TlsConfig) -> Result<CertStore, CertError> {
    let store = CertStore::load(&tls.certificates, &tls::provider())?;
    tls::warn_expired(&store);
    Ok(store)
}

/// Builds the pool a [`PoolConfig`] describes.
pub fn build_pool(config: &PoolConfig) -> Pool {
    let affinity = match &config.session {
        None => Affinity::ClientIp,
        Some(s) => Affinity::Session(Box::new(SessionAffinity::new(
            s.names.clone(),
            s.rules.clone(),
            s.limits,
            s.form_peek_bytes,
            s.page_scan_bytes,
        ))),
    };
    let cookie = config.affinity_cookie.as_ref().map(|(name, secret)| {
        // `/shop/` routes `/shop` too, so the cookie must cover `/shop`.
        let prefix = config.path_prefix.trim_end_matches('/');
        AffinityCookie::new(name, secret, if prefix.is_empty() { "/" } else { prefix })
    });
    let backends = config
        .backends
        .iter()
        .map(|b| Backend::new(&b.name, b.address, b.weight))
        .collect();
    Pool::new(&config.name, config.policy, affinity, cookie, backends)
}

/// Binds every listener and starts serving.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    let started = Instant::now();
    // Taken over first, so a SIGHUP from here on never kills the process.
    let mut hangup = watch_hangup();
    let pools: Vec<Arc<Pool>> = config
        .pools
        .iter()
        .map(|p| Arc::new(build_pool(p)))
        .collect();
    let routes = config
        .pools
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            p.hosts.iter().map(move |h| Route {
                host: h.clone(),
                path_prefix: p.path_prefix.as_str().into(),
                pool: i,
            })
        })
        .collect();
    let proxy = Arc::new(Proxy::new(
        Router::new(routes),
        pools,
        upstream::Upstream::new(&config.upstream, config.client_timeout),
        config.max_connections,
        config.client_timeout,
        config.tunnel_timeout,
    ));
    let (shutdown, stop) = shutdown::channel();
    let mut tasks = JoinSet::new();
    let mut addrs = Vec::with_capacity(config.listen.len());
    for &address in &config.listen {
        let (listener, local) = bind(address).await?;
        tracing::info!(address = %local, "listening (HTTP/1.1, h2c)");
        addrs.push(local);
        tasks.spawn(listener::serve(listener, proxy.clone(), stop.clone(), None));
    }
    let mut tls_addrs = Vec::new();
    let mut redirect_addrs = Vec::new();
    let mut certificates = None;
    if let Some(tls) = &config.tls {
        // The files' times before they are read: a change from here on is seen by the check.
        let stamps = tls::stamps(&tls.certificates);
        let resolver = Arc::new(CertResolver::new(load_certificates(tls)?));
        let front = TlsFront {
            acceptor: TlsAcceptor::from(tls::server_config(resolver.clone(), tls.min_version)?),
            hsts: tls
                .hsts
                .as_ref()
                .and_then(|h| HeaderValue::try_from(h.as_str()).ok()),
        };
        for &address in &tls.listen {
            let (listener, local) = bind(address).await?;
            tracing::info!(address = %local, "listening (TLS: HTTP/1.1, h2)");
            tls_addrs.push(local);
            tasks.spawn(listener::serve(
                listener,
                proxy.clone(),
                stop.clone(),
                Some(front.clone()),
            ));
        }
        let https_port = tls_addrs[0].port();
        for &address in &tls.redirect_http {
            let (listener, local) = bind(address).await?;
            tracing::info!(address = %local, "redirecting HTTP to HTTPS");
            redirect_addrs.push(local);
            tasks.spawn(listener::redirect_to_https(
                listener,
                https_port,
                stop.clone(),
            ));
        }
        tasks.spawn(reload_certificates(
            resolver.clone(),
            tls.certificates.clone(),
            stamps,
            tls.reload_check_interval,
            hangup.take(),
            stop.clone(),
        ));
        certificates = Some(resolver);
    }
    if let Some(hangup) = hangup {
        tasks.spawn(nothing_to_reload(hangup, stop.clone()));
    }
    let admin_addr = match config.admin {
        AdminListen::Off => None,
        AdminListen::Configured(address) => Some(bind(address).await?),
        AdminListen::Default(address) => match bind(address).await {
            Ok(bound) => Some(bound),
            Err(e) => {
                tracing::warn!("{e}; running without the admin listener (set `admin` to choose another address)");
                None
            }
        },
    }
    .map(|(listener, local)| {
        tracing::info!(address = %local, "admin: /metrics /status /healthz");
        tasks.spawn(admin::serve(listener, proxy.clone(), started, stop.clone()));
        local
    });
    for pool in proxy.pools() {
        if pool.table().is_some() {
            tasks.spawn(sweep(pool.clone(), stop.clone()));
        }
        for b in pool.backends().all() {
            tracing::info!(pool = %pool.name, backend = %b.name, address = %b.address, id = %b.id, "backend");
        }
    }
    Ok(Running {
        addrs,
        admin_addr,
        tls_addrs,
        redirect_addrs,
        certificates,
        proxy,
        shutdown,
        tasks,
    })
}

/// Expires and evicts pins of one pool on a blocking thread, one shard at a time, so the
/// request path never waits for a whole-table pass. Every second it checks (in O(1)) whether
/// the table nears its bound and trims it; a full expiry sweep runs every 1/60 of the idle
/// timeout (1 to 30 s).
async fn sweep(pool: Arc<Pool>, mut stop: Signal) {
    let Some(table) = pool.table() else { return };
    let sweep_every = u64::from(table.limits().idle_timeout / 60).clamp(1, 30);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 1u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait() => return,
        }
        let full = n % sweep_every == 0;
        if !full && !pool.table().is_some_and(|t| t.needs_trim()) {
            continue;
        }
        let swept = pool.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let table = swept.table().expect("session pool");
            let now = clock::unix_now();
            if full {
                table.sweep(now)
            } else {
                Removed {
                    expired: 0,
                    evicted: table.trim(now),
                }
            }
        })
        .await
        .unwrap_or_default();
        if removed.expired + removed.evicted > 0 {
            tracing::debug!(pool = %pool.name, expired = removed.expired, evicted = removed.evicted, "pins swept");
        }
    }
}

/// The SIGHUP stream, if the platform gives one.
type HangupSignal = tokio::signal::unix::Signal;

fn watch_hangup() -> Option<HangupSignal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot watch SIGHUP: {e}");
            None
        }
    }
}

/// Without TLS, a SIGHUP has nothing to reload: say so rather than die of it.
async fn nothing_to_reload(mut hangup: HangupSignal, mut stop: Signal) {
    loop {
        tokio::select! {
            _ = hangup.recv() => tracing::info!(
                "SIGHUP: nothing to reload (it reloads TLS certificates; configuration changes need a restart)"
            ),
            _ = stop.wait() => return,
        }
    }
}

/// Reloads the certificates on SIGHUP and when their files change (compared with `stamps`,
/// taken before the certificates in use were read). A file that fails to
/// load is logged with its path and reason, and the certificates in use keep serving.
async fn reload_certificates(
    resolver: Arc<CertResolver>,
    files: Vec<CertFiles>,
    mut stamps: Vec<Option<std::time::SystemTime>>,
    check_every: Option<Duration>,
    mut hangup: Option<HangupSignal>,
    mut stop: Signal,
) {
    loop {
        let check = async {
            match check_every {
                Some(every) => tokio::time::sleep(every).await,
                None => std::future::pending().await,
            }
        };
        let hup = async {
            match hangup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let reason = tokio::select! {
            _ = hup => "SIGHUP",
            _ = check => {
                let now = tls::stamps(&files);
                if now == stamps {
                    continue;
                }
                stamps = now;
                "a certificate file changed"
            }
            _ = stop.wait() => return,
        };
        let loaded = {
            let files = files.clone();
            tokio::task::spawn_blocking(move || CertStore::load(&files, &tls::provider())).await
        };
        match loaded {
            Ok(Ok(store)) => {
                tls::warn_expired(&store);
                resolver.replace(store);
                tracing::info!(reason, "certificates reloaded");
            }
            Ok(Err(e)) => tracing::error!(
                reason,
                "certificate reload failed, the previous certificates keep serving: {e}"
            ),
            Err(e) => tracing::error!("certificate reload task failed: {e}"),
        }
    }
}

impl Running {
    /// The bound admin listener address, if it runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The bound TLS listener addresses.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    /// The bound HTTP→HTTPS redirect listener addresses.
    pub fn redirect_addrs(&self) -> &[SocketAddr] {
        &self.redirect_addrs
    }

    /// The certificates in use, when TLS is configured.
    pub fn certificates(&self) -> Option<Arc<CertStore>> {
        self.certificates.as_ref().map(|r| r.store())
    }

    /// The bound listener addresses, in configuration order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.proxy.pools().iter().find(|p| &*p.name == name)
    }

    /// Runs until `signal` resolves, then shuts down gracefully.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }

    /// Stops accepting, lets requests in flight finish, and stops the sweepers.
    pub async fn shutdown(mut self) {
        self.shutdown.fire();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Descriptors tidegate needs beyond its connections: listeners, log, certificates, epoll.
const SPARE_FILES: u64 = 64;

/// Raises the soft limit on open files to the hard one, as Go's runtime does at start: a
/// client connection and its backend connection take a descriptor each, and the soft default
/// of many systems (1024) would stop tidegate at a few hundred clients. Says what it did,
/// and warns when even the hard limit is short of `max_connections`.
#[cfg(unix)]
pub fn raise_open_files_limit(max_connections: usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let Some(soft) = limit.current else {
        return; // Unlimited.
    };
    let mut usable = soft;
    // An unlimited hard limit still has a kernel ceiling (Linux: fs.nr_open, 1 << 20 by
    // default); macOS refuses more than OPEN_MAX whatever the hard limit says, as Go found.
    let target = if cfg!(target_os = "macos") {
        limit.maximum.unwrap_or(u64::MAX).min(10_240)
    } else {
        limit.maximum.unwrap_or(1 << 20)
    };
    if target > soft {
        let raised = rustix::process::Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                usable = target;
                tracing::info!("open files limit raised from {soft} to {target}");
            }
            Err(e) => tracing::warn!("cannot raise the open files limit from {soft}: {e}"),
        }
    }
    // Each client connection takes one descriptor, and one more while it has a backend
    // connection: short of one per connection, max_connections cannot be reached at all.
    if usable < max_connections as u64 + SPARE_FILES {
        tracing::warn!(
            "open files limit {usable} is short of max_connections = {max_connections} \
             (each connection takes one descriptor, two while a request is at its backend): \
             raise it (LimitNOFILE=, ulimit -n) or lower max_connections; connections beyond \
             about {} may not be accepted",
            usable.saturating_sub(SPARE_FILES) / 2
        );
    }
}
