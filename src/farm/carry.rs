//! What the running farm knows beyond its file, carried over an upgrade: the new process
//! builds its farm from the configuration file, and then takes the running one's admin API
//! changes on the rule a reload keeps them by — a backend's weight or state set through the
//! API stays unless the file changed that same value; a backend the API added stays unless
//! the file now names one of that name (a backend the API removed while the file still lists
//! it comes back, as at a reload) — and the backends it found down, which stay down until
//! their checks pass (else the new process would send new sessions to them until they failed
//! `fall` times).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::core::backend::AdminState;
use crate::core::health::Health;
use crate::core::registry::Registry;

/// The API's changes to one backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendChange {
    /// Its pool.
    pub pool: String,
    /// Its name.
    pub name: String,
    /// Where it is.
    pub address: SocketAddr,
    /// Its weight now, and what the file said (none: the API added it).
    pub weight: (u32, Option<u32>),
    /// Its state now, and what the file said.
    pub state: (String, Option<String>),
    /// Its `max_sessions`, for a backend the API added.
    pub max_sessions: Option<u64>,
    /// Whether the running process found it down.
    #[serde(default)]
    pub down: bool,
}

/// The backends whose weight or state differ from the file applied last (`applied`), those
/// the API added, and those found down.
pub fn changes(registry: &Registry, applied: &Config) -> Vec<BackendChange> {
    let mut out = Vec::new();
    for pool in registry.topology().pools.iter() {
        let file = applied.pools.iter().find(|p| *p.name == *pool.name);
        for b in pool.backends().all() {
            let said = file.and_then(|p| p.backends.iter().find(|f| *f.name == *b.name));
            let state = file_state(b.admin());
            let change = BackendChange {
                pool: pool.name.to_string(),
                name: b.name.to_string(),
                address: b.address,
                weight: (b.weight(), said.map(|f| f.weight)),
                state: (
                    state.as_str().to_string(),
                    said.map(|f| file_state(f.state).as_str().to_string()),
                ),
                max_sessions: b.max_sessions(),
                down: b.health.get() == Health::Down,
            };
            let changed = change.down
                || match said {
                    None => b.process.is_none(),
                    Some(f) => f.weight != b.weight() || file_state(f.state) != state,
                };
            if changed {
                out.push(change);
            }
        }
    }
    out
}

/// A drained backend is a draining one that finished: what the file and the API set is
/// "drain".
fn file_state(state: AdminState) -> AdminState {
    match state {
        AdminState::Drained => AdminState::Draining,
        s => s,
    }
}

fn parse_state(s: &str) -> Option<AdminState> {
    AdminState::ALL.into_iter().find(|a| a.as_str() == s)
}

/// Applies the running process's changes to a farm just built from `config`; logs each.
pub fn apply(registry: &Registry, config: &Config, changes: &[BackendChange]) {
    for c in changes {
        let file = config
            .pools
            .iter()
            .find(|p| p.name == c.pool)
            .and_then(|p| p.backends.iter().find(|b| b.name == c.name));
        // Whether a change of the API was kept, or why it could not be.
        let kept: Result<bool, String> = match (file, c.weight.1) {
            // Added through the API, and the file names no such backend: added again.
            (None, None) => {
                let Some(state) = parse_state(&c.state.0) else {
                    continue;
                };
                registry
                    .add_backend(
                        &c.pool,
                        &c.name,
                        c.address,
                        c.weight.0,
                        state,
                        Default::default(),
                    )
                    .map(|b| b.set_max_sessions(c.max_sessions))
                    .map(|()| true)
                    .map_err(|e| e.to_string())
            }
            // Removed from the file since: gone.
            (None, Some(_)) => continue,
            // Added through the API, and the file now names a backend of that name: the
            // file's values apply, as at a reload.
            (Some(_), None) => Ok(false),
            // A value the file changed since is the file's.
            (Some(f), Some(was_weight)) => (|| {
                let mut kept = false;
                if was_weight == f.weight && c.weight.0 != f.weight {
                    registry
                        .set_weight(&c.pool, &c.name, c.weight.0)
                        .map_err(|e| e.to_string())?;
                    kept = true;
                }
                let was = c.state.1.as_deref().and_then(parse_state);
                if let Some(state) = parse_state(&c.state.0)
                    && was.is_none_or(|was| was == file_state(f.state))
                    && state != file_state(f.state)
                {
                    registry
                        .set_admin(&c.pool, &c.name, state)
                        .map_err(|e| e.to_string())?;
                    kept = true;
                }
                Ok(kept)
            })(),
        };
        if c.down
            && let Ok((pool, b)) = registry.backend(&c.pool, &c.name)
        {
            crate::farm::health::note(
                &pool,
                &b,
                b.health.force_down(),
                "the previous tidegate found it down",
            );
        }
        match kept {
            Ok(false) => {}
            Ok(true) => tracing::info!(
                pool = %c.pool,
                backend = %c.name,
                weight = c.weight.0,
                state = %c.state.0,
                "kept the admin API's change from the previous tidegate"
            ),
            Err(e) => tracing::warn!(
                pool = %c.pool,
                backend = %c.name,
                "the admin API's change from the previous tidegate could not be kept: {e}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "[[pool]]\nname = \"app\"\n\
        [[pool.backend]]\nname = \"a\"\naddress = \"127.0.0.1:9001\"\n\
        [[pool.backend]]\nname = \"b\"\naddress = \"127.0.0.1:9002\"\nweight = 3\n";

    fn farm(text: &str) -> (Config, Registry) {
        let config = Config::from_toml(text, "t.toml").unwrap();
        let registry = Registry::new(crate::farm::topology(&config));
        (config, registry)
    }

    fn backend(r: &Registry, name: &str) -> (u32, AdminState) {
        let (_, b) = r.backend("app", name).unwrap();
        (b.weight(), b.admin())
    }

    #[test]
    fn api_changes_survive_unless_the_file_changed_the_same_thing() {
        let (old_file, old) = farm(FILE);
        old.set_admin("app", "a", AdminState::Draining).unwrap();
        old.set_weight("app", "b", 5).unwrap();
        old.add_backend(
            "app",
            "c",
            "127.0.0.1:9003".parse().unwrap(),
            2,
            AdminState::Active,
            Default::default(),
        )
        .unwrap();
        let carried = changes(&old, &old_file);
        assert_eq!(carried.len(), 3, "{carried:?}");
        // Through JSON, as the handover sends them.
        let carried: Vec<BackendChange> =
            serde_json::from_str(&serde_json::to_string(&carried).unwrap()).unwrap();

        // The same file: every change stays.
        let (file, new) = farm(FILE);
        apply(&new, &file, &carried);
        assert_eq!(backend(&new, "a"), (1, AdminState::Draining));
        assert_eq!(backend(&new, "b"), (5, AdminState::Active));
        assert_eq!(backend(&new, "c"), (2, AdminState::Active));

        // A file that changed b's weight and names a c of its own wins for those.
        let edited = FILE.replace("weight = 3", "weight = 4")
            + "[[pool.backend]]\nname = \"c\"\naddress = \"127.0.0.1:9004\"\n";
        let (file, new) = farm(&edited);
        apply(&new, &file, &carried);
        assert_eq!(backend(&new, "a"), (1, AdminState::Draining));
        assert_eq!(backend(&new, "b"), (4, AdminState::Active));
        let (_, c) = new.backend("app", "c").unwrap();
        assert_eq!(c.address, "127.0.0.1:9004".parse().unwrap());
        assert_eq!(
            backend(&new, "c"),
            (1, AdminState::Active),
            "the file's c, whole"
        );

        // A file without b: gone, not added back.
        let (file, new) = farm(&FILE.replace(
            "[[pool.backend]]\nname = \"b\"\naddress = \"127.0.0.1:9002\"\nweight = 3\n",
            "",
        ));
        apply(&new, &file, &carried);
        assert!(new.backend("app", "b").is_err());
    }

    #[test]
    fn a_backend_found_down_stays_down() {
        let (file, old) = farm(FILE);
        let (_, b) = old.backend("app", "b").unwrap();
        b.health.force_down();
        let carried = changes(&old, &file);
        assert_eq!(carried.len(), 1, "{carried:?}");
        assert!(carried[0].down);
        let (file, new) = farm(FILE);
        apply(&new, &file, &carried);
        let (_, b) = new.backend("app", "b").unwrap();
        assert_eq!(b.health.get(), Health::Down);
        assert_eq!(
            backend(&new, "b"),
            (3, AdminState::Active),
            "nothing else changed"
        );
    }

    #[test]
    fn an_unchanged_farm_carries_nothing() {
        let (file, registry) = farm(FILE);
        assert!(changes(&registry, &file).is_empty());
    }
}
