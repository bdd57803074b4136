//! The edges that act on backends: pools built from the configuration, a reloaded
//! configuration applied as a difference, the health prober, and the housekeeping that
//! expires pins, settles drains and samples each pool's last quarter hour.

pub mod carry;
pub mod health;
pub mod launch;
pub mod reload;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::clock;
use crate::config::Config;
use crate::core::affinity::Removed;
use crate::core::backend::{AdminState, Backend};
use crate::core::registry::{ChangeError, Registry};
use crate::shutdown::Signal;
use crate::store::shared::SharedPins;
use crate::store::state_file::StateFile;
use crate::tls;
use crate::upstream::Upstream;

pub use reload::{Applied, build_pool, topology};

/// The farm and what changes it: the registry of pools and backends, the connections to
/// backends (a removed backend's are closed), the configuration file and what of it was
/// applied last, and the certificates a reload refreshes.
pub struct Farm {
    /// Pools, routes, backends.
    pub registry: Arc<Registry>,
    /// Connections to backends.
    pub upstream: Arc<Upstream>,
    config_path: Option<PathBuf>,
    applied: tokio::sync::Mutex<Config>,
    certificates: Option<Arc<tls::Reloader>>,
    /// The state file the pins are kept in, if any.
    pub state: Option<Arc<StateFile>>,
    /// The store pins are shared through, if any.
    store: Option<Arc<SharedPins>>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Started from flags: there is no file to read.
    #[error("tidegate was started without --config: there is no configuration file to re-read")]
    NoFile,
    /// The file is invalid (the error `tidegate check` prints).
    #[error("{0}")]
    Invalid(String),
}

impl Farm {
    /// A farm serving `config` (read from `config_path`, if from a file).
    pub fn new(
        registry: Arc<Registry>,
        upstream: Arc<Upstream>,
        config: Config,
        config_path: Option<PathBuf>,
        certificates: Option<Arc<tls::Reloader>>,
        state: Option<Arc<StateFile>>,
    ) -> Self {
        Farm {
            registry,
            upstream,
            config_path,
            applied: tokio::sync::Mutex::new(config),
            certificates,
            state,
            store: None,
        }
    }

    /// The same farm sharing the pins of the pools a reload adds through `store`.
    pub fn with_store(self, store: Option<Arc<SharedPins>>) -> Self {
        Farm { store, ..self }
    }

    /// What the admin API changed against the file applied last (blocking: for the
    /// handover's thread).
    pub fn api_changes(&self) -> Vec<carry::BackendChange> {
        carry::changes(&self.registry, &self.applied.blocking_lock())
    }

    /// Re-reads the configuration file and applies what changed in it, live; reloads the
    /// certificates. An invalid file changes nothing and is logged with the error `tidegate
    /// check` prints.
    pub async fn reload(&self, reason: &str) -> Result<Applied, ReloadError> {
        let certificates = async |files| match &self.certificates {
            Some(c) => Some(match c.reload(reason, files).await {
                Ok(()) => "reloaded".to_string(),
                Err(e) => format!("failed, the previous ones keep serving: {e}"),
            }),
            None => None,
        };
        let Some(path) = &self.config_path else {
            certificates(None).await;
            return Err(ReloadError::NoFile);
        };
        let mut applied = self.applied.lock().await;
        let config = match Config::from_file(path) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(
                    reason,
                    "configuration reload failed, the running configuration keeps serving: {e}"
                );
                drop(applied);
                // The certificates in use are still reloaded from their files.
                certificates(None).await;
                return Err(ReloadError::Invalid(e.to_string()));
            }
        };
        let files = config.tls.as_ref().map(|t| t.certificates.clone());
        let changes = {
            let registry = self.registry.clone();
            let upstream = self.upstream.clone();
            let old = applied.clone();
            let new = config.clone();
            tokio::task::spawn_blocking(move || reload::apply(&registry, &upstream, &old, &new))
                .await
                .map_err(|e| ReloadError::Invalid(format!("reload task failed: {e}")))?
        };
        // What applies live is now the new file's; what needs a restart stays as it runs, so
        // the next reload names it again until it is restarted or the file reverts it.
        *applied = reload::running_after(&applied, config);
        drop(applied);
        // Pools the reload added share their pins too.
        if let Some(store) = &self.store {
            store.attach(&self.registry);
        }
        let mut changes = changes;
        for (pool, backend) in std::mem::take(&mut changes.left) {
            if let Some(process) = &backend.process {
                launch::retire(&pool, &backend, process);
            }
        }
        changes.certificates = certificates(files).await;
        changes.log(reason);
        Ok(changes)
    }

    /// Removes a backend (see [`Registry::remove_backend`]) and closes its idle connections.
    pub async fn remove_backend(
        &self,
        pool: &str,
        name: &str,
        force: bool,
    ) -> Result<Arc<Backend>, ChangeError> {
        let registry = self.registry.clone();
        let (pool, name) = (pool.to_string(), name.to_string());
        let removal = tokio::task::spawn_blocking(move || {
            registry
                .remove_backend(&pool, &name, force)
                .map(|r| (pool, r))
        })
        .await
        .map_err(|e| ChangeError::Invalid {
            field: "backend",
            message: format!("removal failed: {e}"),
        })?;
        let (pool, removal) = removal?;
        reload::close_unused(&self.registry, &self.upstream);
        if let Some(process) = &removal.backend.process {
            launch::retire(&pool, &removal.backend, process);
        }
        tracing::info!(
            pool,
            backend = %removal.backend.name,
            address = %removal.backend.address,
            pins_dropped = removal.pins_dropped,
            "backend removed"
        );
        Ok(removal.backend)
    }
}

/// Keeps the farm tidy once a second until `stop` fires: expires and evicts pins (a full
/// sweep every 1/60 of the idle timeout, 1 to 30 s; a trim whenever a table nears its
/// bound), settles drains whose last pin is gone, samples each pool's history, and every
/// half minute closes parked connections to addresses no backend has any more.
pub async fn housekeeping(registry: Arc<Registry>, upstream: Arc<Upstream>, mut stop: Signal) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 1u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait() => return,
        }
        let pools = registry.topology().pools.clone();
        if n % 30 == 0 {
            reload::close_unused(&registry, &upstream);
            for pool in pools.iter() {
                if let Some(table) = pool.table() {
                    let set = pool.backends();
                    table.prune_counters(|id| set.get(id).is_some());
                }
            }
        }
        for pool in pools.iter() {
            if let Some(table) = pool.table() {
                let sweep_every = u64::from(table.limits().idle_timeout / 60).clamp(1, 30);
                let full = n % sweep_every == 0;
                if full || table.needs_trim() {
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
            launch::look_after(pool);
            for b in pool.backends().all() {
                if b.admin() == AdminState::Draining
                    && b.settle_drain(pool.table().map_or(0, |t| t.pins_of(b.id)))
                {
                    pool.stats.drains_finished.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(pool = %pool.name, backend = %b.name, "backend drained: no session is pinned to it any more; it can be removed");
                }
            }
            {
                let now = u64::from(clock::unix_now());
                let pins = pool.table().map_or(0, |t| t.len() as u64);
                let s = &pool.stats;
                s.history.lock().unwrap_or_else(|e| e.into_inner()).record(
                    now,
                    s.replies.load(Ordering::Relaxed),
                    s.errors.load(Ordering::Relaxed),
                    pins,
                );
            }
        }
    }
}
