//! Assembles a running balancer from a [`Config`]: pools, router, upstream client, the
//! listeners, and the sweeper that expires pins off the request path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::clock;
use crate::config::{Config, PoolConfig};
use crate::core::affinity::Removed;
use crate::core::affinity_cookie::AffinityCookie;
use crate::core::backend::Backend;
use crate::core::pool::{Affinity, Pool, SessionAffinity};
use crate::core::route::{Route, Router};
use crate::listener;
use crate::proxy::Proxy;
use crate::shutdown::{self, Signal, Trigger};
use crate::upstream;

/// A balancer that is serving.
pub struct Running {
    addrs: Vec<SocketAddr>,
    proxy: Arc<Proxy>,
    shutdown: Trigger,
    tasks: JoinSet<()>,
}

/// Why the balancer could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {source}")]
pub struct StartError {
    address: SocketAddr,
    source: std::io::Error,
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
    let cookie = config
        .affinity_cookie
        .as_ref()
        .map(|(name, secret)| AffinityCookie::new(name, secret, &config.path_prefix, false));
    let backends = config
        .backends
        .iter()
        .map(|b| Backend::new(&b.name, b.address, b.weight))
        .collect();
    Pool::new(&config.name, config.policy, affinity, cookie, backends)
}

/// Binds every listener and starts serving.
pub async fn start(config: &Config) -> Result<Running, StartError> {
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
        upstream::client(&config.upstream),
        config.upstream.response_timeout,
    ));
    let (shutdown, stop) = shutdown::channel();
    let mut tasks = JoinSet::new();
    let mut addrs = Vec::with_capacity(config.listen.len());
    for &address in &config.listen {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| StartError { address, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| StartError { address, source })?;
        tracing::info!(address = %local, "listening (HTTP/1.1, h2c)");
        addrs.push(local);
        tasks.spawn(listener::serve(listener, proxy.clone(), stop.clone()));
    }
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

impl Running {
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
