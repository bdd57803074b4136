//! Pools built from the configuration, and a reloaded configuration applied as a
//! difference: what the file changed since it was last applied is done live (backends
//! added, removed, re-weighted, moved, drained or enabled; pools added, removed, or given
//! new settings), and nothing else. A weight or state set through the admin API since then
//! stays unless the file changed the same thing, and a backend the API added stays; the file
//! still says which backends exist, so one it lists that the farm lacks (removed through the
//! API) is added again.

use std::sync::Arc;

use serde::Serialize;

use crate::config::{BackendConfig, Config, PoolConfig};
use crate::core::affinity_cookie::AffinityCookie;
use crate::core::backend::{AdminState, Backend, ConnLimit, Extras};
use crate::core::launch::Process;
use crate::core::pool::{Affinity, Pool, SessionAffinity};
use crate::core::registry::{Change, ChangeError, Registry, Topology};
use crate::upstream::Upstream;

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
    let cookie = config.affinity_cookie.as_ref().map(|c| {
        // `/shop/` routes `/shop` too, so the cookie must cover `/shop`.
        let prefix = config.path_prefix.trim_end_matches('/');
        let path = if prefix.is_empty() { "/" } else { prefix };
        AffinityCookie::new(&c.name, &c.signing, path).also_verifying(&c.older)
    });
    let backends = config.backends.iter().map(new_backend).collect();
    Pool::new(&config.name, config.policy, affinity, cookie, backends)
        .with_routes(config.hosts.clone(), &config.path_prefix)
        .with_health(config.health.clone(), config.on_pinned_down)
}

fn new_backend(b: &BackendConfig) -> Backend {
    let backend = Backend::new(&b.name, b.address, b.weight).with_extras(extras(b));
    backend.set_admin(b.state);
    backend.set_max_sessions(b.max_sessions);
    backend
}

/// The bound and the process a backend of the file has.
fn extras(b: &BackendConfig) -> Extras {
    Extras {
        conns: b
            .max_conns
            .map(|(max, queue, timeout)| ConnLimit::new(max, queue, timeout)),
        process: b.launch.clone().map(Process::new),
    }
}

/// The pools of a configuration and their routes.
pub fn topology(config: &Config) -> Topology {
    Topology::new(
        config
            .pools
            .iter()
            .map(|p| Arc::new(build_pool(p)))
            .collect(),
    )
}

/// What a reload did.
#[derive(Debug, Default, Serialize)]
pub struct Applied {
    /// Pools new in the file.
    pub pools_added: Vec<String>,
    /// Pools gone from the file (their pins with them).
    pub pools_removed: Vec<String>,
    /// Pools whose settings (other than their backends) the file changed.
    pub pools_changed: Vec<String>,
    /// Backends added, as `pool/name`.
    pub backends_added: Vec<String>,
    /// Backends removed, as `pool/name`.
    pub backends_removed: Vec<String>,
    /// Backends changed, as `pool/name: what`.
    pub backends_changed: Vec<String>,
    /// Pins dropped with removed backends and pools.
    pub pins_dropped: usize,
    /// Changes that need a restart, named.
    pub not_applied: Vec<String>,
    /// Changes the registry refused (a name clash between a runtime addition and the file).
    pub refused: Vec<String>,
    /// `reloaded`, or why the certificates failed to load (the previous ones keep
    /// serving); absent without TLS.
    pub certificates: Option<String>,
    /// Launchable backends that left the farm, whose images are to be stopped.
    #[serde(skip)]
    pub left: Vec<(String, Arc<Backend>)>,
}

impl Applied {
    /// One log line for the reload, and one warning per change that could not apply.
    pub fn log(&self, reason: &str) {
        tracing::info!(
            reason,
            pools_added = ?self.pools_added,
            pools_removed = ?self.pools_removed,
            pools_changed = ?self.pools_changed,
            backends_added = ?self.backends_added,
            backends_removed = ?self.backends_removed,
            backends_changed = ?self.backends_changed,
            pins_dropped = self.pins_dropped,
            "configuration reloaded"
        );
        for what in &self.not_applied {
            tracing::warn!(reason, "not applied by a reload, needs a restart: {what}");
        }
        for what in &self.refused {
            tracing::warn!(reason, "reload could not apply: {what}");
        }
    }
}

/// Applies what changed between the configuration applied last (`old`) and `new`. Walks
/// pin tables when backends or pools leave: call it off the async threads.
pub fn apply(registry: &Registry, upstream: &Upstream, old: &Config, new: &Config) -> Applied {
    let mut out = Applied::default();
    {
        // Pools are rebuilt with their new settings in one swap, each taking over its
        // predecessor's pins, counters and backends (the same `Arc`s).
        let changing = registry.begin();
        let current = registry.topology();
        let mut pools = Vec::with_capacity(new.pools.len());
        for config in &new.pools {
            let built = build_pool(config);
            match current.pool(&config.name) {
                Some(previous) => {
                    let settings = |p: &PoolConfig| PoolConfig {
                        backends: Vec::new(),
                        ..p.clone()
                    };
                    let before = old.pools.iter().find(|p| p.name == config.name);
                    if before.is_none_or(|b| settings(b) != settings(config)) {
                        out.pools_changed.push(config.name.clone());
                    }
                    pools.push(Arc::new(built.succeeding(previous)));
                }
                None => {
                    out.pools_added.push(config.name.clone());
                    pools.push(Arc::new(built));
                }
            }
        }
        for gone in current.pools.iter() {
            if new.pools.iter().all(|p| p.name != *gone.name) {
                out.pools_removed.push(gone.name.to_string());
                out.pins_dropped += gone.table().map_or(0, |t| t.len());
                for b in gone.backends().all() {
                    if b.process.is_some() {
                        out.left.push((gone.name.to_string(), b.clone()));
                    }
                }
            }
        }
        registry.replace(&changing, Topology::new(pools));
        registry.count(Change::Reload);
    }
    for config in &new.pools {
        if out.pools_added.contains(&config.name) {
            continue;
        }
        let before = old.pools.iter().find(|p| p.name == config.name);
        for b in &config.backends {
            let was = before.and_then(|p| p.backends.iter().find(|o| o.name == b.name));
            apply_backend(registry, &config.name, was, b, &mut out);
        }
        for gone in before.iter().flat_map(|p| &p.backends) {
            if config.backends.iter().any(|b| b.name == gone.name) {
                continue;
            }
            if let Ok(removal) = registry.remove_backend(&config.name, &gone.name, true) {
                out.pins_dropped += removal.pins_dropped;
                out.backends_removed
                    .push(format!("{}/{}", config.name, gone.name));
                if removal.backend.process.is_some() {
                    out.left.push((config.name.clone(), removal.backend));
                }
            }
        }
    }
    close_unused(registry, upstream);
    out.not_applied.extend(needs_restart(old, new));
    out
}

/// Closes parked connections to addresses no backend of the farm has any more (by address:
/// another pool's backend at the same address keeps them).
pub fn close_unused(registry: &Registry, upstream: &Upstream) {
    let topology = registry.topology();
    upstream.keep_only(|addr| {
        topology
            .pools
            .iter()
            .any(|p| p.backends().all().iter().any(|b| b.address == addr))
    });
}

/// The configuration running after a reload of `new`: its pools and certificates (what a
/// reload applies), and `running`'s settings that need a restart.
pub fn running_after(running: &Config, new: Config) -> Config {
    let tls = match (&running.tls, new.tls) {
        (Some(r), Some(n)) => Some(crate::config::TlsConfig {
            certificates: n.certificates,
            ..r.clone()
        }),
        (r, _) => r.clone(),
    };
    Config {
        pools: new.pools,
        tls,
        ..running.clone()
    }
}

/// Applies one backend of the new file: added if the farm lacks it; otherwise what the file
/// changed since `was` (or, for a backend the API added that the file now names, whatever
/// differs from the file).
fn apply_backend(
    registry: &Registry,
    pool: &str,
    was: Option<&BackendConfig>,
    b: &BackendConfig,
    out: &mut Applied,
) {
    let label = format!("{pool}/{}", b.name);
    let mut refused = |e: ChangeError| out.refused.push(format!("{label}: {e}"));
    let live = match registry.backend(pool, &b.name) {
        Ok((_, live)) => live,
        Err(_) => {
            match registry.add_backend(pool, &b.name, b.address, b.weight, b.state, extras(b)) {
                Ok(added) => {
                    added.set_max_sessions(b.max_sessions);
                    out.backends_added.push(label)
                }
                Err(e) => refused(e),
            }
            return;
        }
    };
    let mut changed = Vec::new();
    let (address_now, weight_now, state_now) = (live.address, live.weight(), live.admin());
    let address_changed = was.map_or(address_now != b.address, |w| w.address != b.address);
    let launchable = live.process.is_some() || b.launch.is_some();
    if launchable && address_now != b.address {
        // Its image listens on the old port: named at every reload until it is replaced.
        out.not_applied.push(format!(
            "{label}: address of a launchable backend (its image listens on {address_now}: remove and add the backend, or restart)"
        ));
    } else if address_changed && address_now != b.address {
        match registry.move_backend(pool, &b.name, b.address) {
            Ok(_) => changed.push(format!("address {address_now} → {}", b.address)),
            Err(e) => refused(e),
        }
    }
    let weight_changed = was.map_or(weight_now != b.weight, |w| w.weight != b.weight);
    if weight_changed && weight_now != b.weight {
        match registry.set_weight(pool, &b.name, b.weight) {
            Ok(_) => changed.push(format!("weight {weight_now} → {}", b.weight)),
            Err(e) => refused(e),
        }
    }
    let limit_now = live
        .conns
        .as_ref()
        .map(|c| (c.max, c.queue_max, c.queue_timeout));
    // Compared with the running backend, not the last file: named at every reload until the
    // backend is replaced or the process restarted.
    if limit_now != b.max_conns {
        out.not_applied.push(format!(
            "{label}: max_conns, queue_max, queue_timeout (drain, remove and add the backend, or restart)"
        ));
    }
    match (&live.process, &b.launch) {
        (Some(process), Some(spec)) => {
            if *process.spec() != *spec {
                process.set_spec(spec.clone());
                changed.push(
                    "launch settings (the command from its next launch, the rest at once)"
                        .to_string(),
                );
            }
        }
        (None, None) => {}
        _ => out.not_applied.push(format!(
            "{label}: launch added or removed (drain, remove and add the backend, or restart)"
        )),
    }
    let max_now = live.max_sessions();
    let max_changed = was.map_or(max_now != b.max_sessions, |w| {
        w.max_sessions != b.max_sessions
    });
    if max_changed
        && max_now != b.max_sessions
        // The backend as it is now: a move above made another `Arc` of it.
        && let Ok((_, current)) = registry.backend(pool, &b.name)
    {
        current.set_max_sessions(b.max_sessions);
        let show = |m: Option<u64>| m.map_or_else(|| "none".to_string(), |m| m.to_string());
        changed.push(format!(
            "max_sessions {} → {}",
            show(max_now),
            show(b.max_sessions)
        ));
    }
    let same_state = |a: AdminState, b: AdminState| {
        let drain = |s| matches!(s, AdminState::Draining | AdminState::Drained);
        a == b || (drain(a) && drain(b))
    };
    let state_changed = was.map_or(!same_state(state_now, b.state), |w| w.state != b.state);
    if state_changed && !same_state(state_now, b.state) {
        match registry.set_admin(pool, &b.name, b.state) {
            Ok(_) => changed.push(format!(
                "state {} → {}",
                state_now.as_str(),
                b.state.as_str()
            )),
            Err(e) => refused(e),
        }
    }
    if !changed.is_empty() {
        out.backends_changed
            .push(format!("{label}: {}", changed.join(", ")));
    }
}

/// The settings a reload cannot change, where the file changed them.
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut differs = |what: &str, changed: bool| {
        if changed {
            out.push(what.to_string());
        }
    };
    differs("listen", old.listen != new.listen);
    let tls_listeners = |c: &Config| {
        c.tls.as_ref().map(|t| {
            (
                t.listen.clone(),
                t.redirect_http.clone(),
                t.min_version,
                t.hsts.clone(),
            )
        })
    };
    differs(
        "listen_tls / [tls] listeners, min_version, HSTS",
        tls_listeners(old) != tls_listeners(new),
    );
    differs("admin", old.admin != new.admin);
    differs("workers", old.workers != new.workers);
    differs("log_format", old.log_format != new.log_format);
    differs(
        "max_connections",
        old.max_connections != new.max_connections,
    );
    differs("client_timeout", old.client_timeout != new.client_timeout);
    differs("tunnel_timeout", old.tunnel_timeout != new.tunnel_timeout);
    differs("[upstream]", old.upstream != new.upstream);
    differs(
        "admin_token_file",
        old.admin_token_file != new.admin_token_file,
    );
    differs("state_file, state_interval", old.state != new.state);
    differs(
        "control_socket",
        old.control_socket(None) != new.control_socket(None),
    );
    differs(
        "http2_max_streams, http2_max_requests",
        (old.http2_max_streams, old.http2_max_requests)
            != (new.http2_max_streams, new.http2_max_requests),
    );
    differs(
        "shutdown_timeout",
        old.shutdown_timeout != new.shutdown_timeout,
    );
    differs(
        "trusted_proxies",
        old.trusted_proxies != new.trusted_proxies,
    );
    differs("[store]", old.store != new.store);
    differs(
        "tls.reload_check_interval",
        old.tls.as_ref().map(|t| t.reload_check_interval)
            != new.tls.as_ref().map(|t| t.reload_check_interval),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listen: &str, backends: &[(&str, u16, u32)]) -> Config {
        let entries: String = backends
            .iter()
            .map(|(name, port, weight)| {
                format!(
                    "[[pool.backend]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\nweight = {weight}\n"
                )
            })
            .collect();
        Config::from_toml(
            &format!("listen = [\"{listen}\"]\n[[pool]]\nname = \"app\"\n{entries}"),
            "t.toml",
        )
        .unwrap()
    }

    #[test]
    fn a_reload_applies_the_difference_and_keeps_naming_what_needs_a_restart() {
        let old = config("127.0.0.1:8080", &[("a", 9001, 1), ("b", 9002, 1)]);
        let registry = Registry::new(topology(&old));
        let upstream = Upstream::new(&old.upstream, old.client_timeout);
        let (_, a_before) = registry.backend("app", "a").unwrap();
        let new = config("127.0.0.1:8081", &[("a", 9001, 1), ("c", 9003, 2)]);
        let applied = apply(&registry, &upstream, &old, &new);
        assert_eq!(applied.backends_added, ["app/c"]);
        assert_eq!(applied.backends_removed, ["app/b"]);
        assert!(applied.backends_changed.is_empty());
        assert_eq!(applied.not_applied, ["listen"]);
        let (_, a_after) = registry.backend("app", "a").unwrap();
        assert!(Arc::ptr_eq(&a_before, &a_after), "a stays the same backend");
        assert_eq!(registry.backend("app", "c").unwrap().1.weight(), 2);
        // The listener did not move: the next reload of the same file says so again.
        let running = running_after(&old, new.clone());
        assert_eq!(running.listen, old.listen);
        let again = apply(&registry, &upstream, &running, &new);
        assert_eq!(again.not_applied, ["listen"]);
        assert!(again.backends_added.is_empty() && again.backends_removed.is_empty());
        // A bound on a backend that stays needs it replaced: said at every reload.
        let mut bounded = new.clone();
        bounded.pools[0].backends[0].max_conns = Some((2, 8, std::time::Duration::from_secs(1)));
        for _ in 0..2 {
            let said = apply(
                &registry,
                &upstream,
                &running_after(&running, new.clone()),
                &bounded,
            );
            assert!(
                said.not_applied
                    .iter()
                    .any(|s| s.starts_with("app/a: max_conns")),
                "{:?}",
                said.not_applied
            );
        }
    }
}
