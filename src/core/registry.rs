//! The live farm: every pool with its routes at one moment (a [`Topology`], swapped whole
//! so the request path reads it without a lock), and the changes an operator makes to it —
//! add, drain, enable, disable, re-weight, remove — made one at a time, so two changes at
//! once are never lost. A change keeps every backend that stays the same `Arc`: its
//! identity, counters, admin state and health, and so its pins.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;

use crate::core::backend::{AdminState, Backend, BackendId, Extras};
use crate::core::pool::Pool;
use crate::core::route::{Route, Router};

/// The pools and the router that leads to them, always swapped together.
pub struct Topology {
    /// Host / path prefix → pool.
    pub router: Router<Arc<Pool>>,
    /// The pools, in configuration order.
    pub pools: Box<[Arc<Pool>]>,
}

impl Topology {
    /// The routes of these pools (each pool's hosts and path prefix).
    pub fn new(pools: Vec<Arc<Pool>>) -> Self {
        let routes = pools
            .iter()
            .flat_map(|p| {
                p.hosts.iter().map(move |h| Route {
                    host: h.clone(),
                    path_prefix: p.path_prefix.clone(),
                    pool: p.clone(),
                })
            })
            .collect();
        Topology {
            router: Router::new(routes),
            pools: pools.into_boxed_slice(),
        }
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| &*p.name == name)
    }
}

/// The kinds of change, as counted and labelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A backend added.
    Add,
    /// A backend removed.
    Remove,
    /// A backend set draining.
    Drain,
    /// A backend set active.
    Enable,
    /// A backend disabled.
    Disable,
    /// A backend re-weighted.
    Weight,
    /// A backend moved to another address.
    Address,
    /// The configuration re-read.
    Reload,
}

impl Change {
    /// Every kind, in label order.
    pub const ALL: [Change; 8] = [
        Change::Add,
        Change::Remove,
        Change::Drain,
        Change::Enable,
        Change::Disable,
        Change::Weight,
        Change::Address,
        Change::Reload,
    ];

    /// A short stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Add => "add",
            Change::Remove => "remove",
            Change::Drain => "drain",
            Change::Enable => "enable",
            Change::Disable => "disable",
            Change::Weight => "weight",
            Change::Address => "address",
            Change::Reload => "reload",
        }
    }
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// No pool has this name.
    #[error("no pool named {0:?}")]
    UnknownPool(String),
    /// The pool has no backend of this name.
    #[error("pool {pool:?} has no backend named {name:?}")]
    UnknownBackend {
        /// The pool.
        pool: String,
        /// The backend.
        name: String,
    },
    /// A backend of this name is in the pool already.
    #[error("pool {pool:?} already has a backend named {name:?}")]
    Exists {
        /// The pool.
        pool: String,
        /// The name.
        name: String,
    },
    /// Another name whose id (a hash of the name, which pins store) is the same.
    #[error(
        "backend name {name:?} has the same id as backend {other:?} of pool {pool:?}: choose another name"
    )]
    IdClash {
        /// The pool.
        pool: String,
        /// The name asked for.
        name: String,
        /// The backend whose id it shares.
        other: String,
    },
    /// A field has a bad value.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Removing the backend would drop live sessions.
    #[error(
        "backend {name:?} of pool {pool:?} still has {pins} pinned sessions: drain it and wait \
         until it is drained, or remove it with force"
    )]
    HasPins {
        /// The pool.
        pool: String,
        /// The backend.
        name: String,
        /// Its pins.
        pins: u64,
    },
}

/// What a removal did.
pub struct Removal {
    /// The backend that left.
    pub backend: Arc<Backend>,
    /// Its pins, dropped.
    pub pins_dropped: usize,
}

/// Checks a backend name: what the configuration accepts.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 || !name.bytes().all(|c| c.is_ascii_graphic()) {
        Err("must be 1 to 128 printable ASCII characters without spaces".into())
    } else {
        Ok(())
    }
}

/// Checks a weight.
pub fn check_weight(weight: u32) -> Result<(), String> {
    if (1..=256).contains(&weight) {
        Ok(())
    } else {
        Err("must be between 1 and 256".into())
    }
}

/// The farm as it is now, and the one door through which it changes.
pub struct Registry {
    topology: ArcSwap<Topology>,
    changing: Mutex<()>,
    changes: [AtomicU64; Change::ALL.len()],
}

/// Held while a change is made: changes are made one at a time.
pub struct Changing<'a> {
    _held: MutexGuard<'a, ()>,
}

impl Registry {
    /// A registry starting from `topology`.
    pub fn new(topology: Topology) -> Self {
        Registry {
            topology: ArcSwap::from_pointee(topology),
            changing: Mutex::new(()),
            changes: Default::default(),
        }
    }

    /// The farm now: a lock-free snapshot.
    #[inline]
    pub fn topology(&self) -> arc_swap::Guard<Arc<Topology>> {
        self.topology.load()
    }

    /// Changes of `kind` made so far.
    pub fn changes(&self, kind: Change) -> u64 {
        self.changes[kind as usize].load(Ordering::Relaxed)
    }

    /// Counts a change made.
    pub fn count(&self, kind: Change) {
        self.changes[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Starts a change; others wait until it is dropped. A poisoned lock (a panic in the
    /// middle of a change) still serializes: the farm itself is never half-swapped.
    pub fn begin(&self) -> Changing<'_> {
        Changing {
            _held: self.changing.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Swaps in a new topology (a reload that adds, removes or rebuilds pools).
    pub fn replace(&self, _: &Changing<'_>, topology: Topology) {
        self.topology.store(Arc::new(topology));
    }

    /// The pool named `pool`.
    pub fn pool(&self, pool: &str) -> Result<Arc<Pool>, ChangeError> {
        self.topology()
            .pool(pool)
            .cloned()
            .ok_or_else(|| ChangeError::UnknownPool(pool.into()))
    }

    /// The backend `name` of `pool`.
    pub fn backend(
        &self,
        pool: &str,
        name: &str,
    ) -> Result<(Arc<Pool>, Arc<Backend>), ChangeError> {
        let p = self.pool(pool)?;
        let b = p.backends().named(name).cloned();
        match b {
            Some(b) => Ok((p, b)),
            None => Err(ChangeError::UnknownBackend {
                pool: pool.into(),
                name: name.into(),
            }),
        }
    }

    /// Adds a backend of unknown health, in `state`, to `pool`, bounded by `limit`.
    pub fn add_backend(
        &self,
        pool: &str,
        name: &str,
        address: SocketAddr,
        weight: u32,
        state: AdminState,
        extras: Extras,
    ) -> Result<Arc<Backend>, ChangeError> {
        check_name(name).map_err(|message| ChangeError::Invalid {
            field: "name",
            message,
        })?;
        check_weight(weight).map_err(|message| ChangeError::Invalid {
            field: "weight",
            message,
        })?;
        let guard = self.begin();
        let p = self.pool(pool)?;
        let set = p.backends();
        let id = BackendId::from_name(name);
        if let Some(other) = set.all().iter().find(|b| b.id == id) {
            return Err(if &*other.name == name {
                ChangeError::Exists {
                    pool: pool.into(),
                    name: name.into(),
                }
            } else {
                ChangeError::IdClash {
                    pool: pool.into(),
                    name: name.into(),
                    other: other.name.to_string(),
                }
            });
        }
        let backend = Arc::new(Backend::new(name, address, weight).with_extras(extras));
        backend.set_admin(state);
        let mut all = set.all().to_vec();
        all.push(backend.clone());
        p.set_backends(all);
        drop(guard);
        self.count(Change::Add);
        Ok(backend)
    }

    /// Sets what the operator wants of a backend. Draining a drained backend leaves it
    /// drained.
    pub fn set_admin(
        &self,
        pool: &str,
        name: &str,
        state: AdminState,
    ) -> Result<Arc<Backend>, ChangeError> {
        let _guard = self.begin();
        let (_, b) = self.backend(pool, name)?;
        let kind = match state {
            AdminState::Draining | AdminState::Drained => {
                b.drain();
                Change::Drain
            }
            AdminState::Active => {
                b.set_admin(AdminState::Active);
                Change::Enable
            }
            AdminState::Disabled => {
                b.set_admin(AdminState::Disabled);
                Change::Disable
            }
        };
        self.count(kind);
        Ok(b)
    }

    /// Re-weights a backend (the pool's round-robin schedule follows).
    pub fn set_weight(
        &self,
        pool: &str,
        name: &str,
        weight: u32,
    ) -> Result<Arc<Backend>, ChangeError> {
        check_weight(weight).map_err(|message| ChangeError::Invalid {
            field: "weight",
            message,
        })?;
        let _guard = self.begin();
        let (p, b) = self.backend(pool, name)?;
        b.set_weight(weight);
        p.set_backends(p.backends().all().to_vec());
        self.count(Change::Weight);
        Ok(b)
    }

    /// Moves a backend to another address, keeping its name, counters, admin state and pins.
    pub fn move_backend(
        &self,
        pool: &str,
        name: &str,
        address: SocketAddr,
    ) -> Result<Arc<Backend>, ChangeError> {
        let _guard = self.begin();
        let (p, old) = self.backend(pool, name)?;
        let moved = Arc::new(old.moved_to(address));
        let all = p
            .backends()
            .all()
            .iter()
            .map(|b| {
                if b.id == old.id {
                    moved.clone()
                } else {
                    b.clone()
                }
            })
            .collect();
        p.set_backends(all);
        self.count(Change::Address);
        Ok(moved)
    }

    /// Removes a backend. While it has pins, only with `force`; its pins are then dropped
    /// (a walk over the pool's table: call it off the async threads).
    pub fn remove_backend(
        &self,
        pool: &str,
        name: &str,
        force: bool,
    ) -> Result<Removal, ChangeError> {
        let _guard = self.begin();
        let (p, b) = self.backend(pool, name)?;
        let pins = p.table().map_or(0, |t| t.pins_of(b.id));
        if pins > 0 && !force {
            return Err(ChangeError::HasPins {
                pool: pool.into(),
                name: name.into(),
                pins,
            });
        }
        let all = p
            .backends()
            .all()
            .iter()
            .filter(|o| o.id != b.id)
            .cloned()
            .collect();
        p.set_backends(all);
        let pins_dropped = p.table().map_or(0, |t| t.unpin_backend(b.id));
        p.stats
            .pins_dropped
            .fetch_add(pins_dropped as u64, Ordering::Relaxed);
        self.count(Change::Remove);
        Ok(Removal {
            backend: b,
            pins_dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::affinity::PinKey;
    use crate::core::balance::Policy;
    use crate::core::pool::Affinity;

    fn registry() -> Registry {
        let session = crate::core::pool::SessionAffinity::new(
            Default::default(),
            Default::default(),
            Default::default(),
            0,
            0,
        );
        let backends = (1..=2)
            .map(|i| {
                Backend::new(
                    &format!("img{i}"),
                    format!("127.0.0.1:900{i}").parse().unwrap(),
                    1,
                )
            })
            .collect();
        let pool = Pool::new(
            "app",
            Policy::RoundRobin,
            Affinity::Session(Box::new(session)),
            None,
            backends,
        );
        Registry::new(Topology::new(vec![Arc::new(pool)]))
    }

    #[test]
    fn a_backend_keeps_its_counters_and_state_across_changes() {
        let r = registry();
        let (_, img1) = r.backend("app", "img1").unwrap();
        img1.stats.bytes_out.fetch_add(7, Ordering::Relaxed);
        r.set_admin("app", "img1", AdminState::Draining).unwrap();
        r.add_backend(
            "app",
            "img3",
            "127.0.0.1:9003".parse().unwrap(),
            2,
            AdminState::Active,
            Extras::default(),
        )
        .unwrap();
        r.set_weight("app", "img2", 5).unwrap();
        let (_, again) = r.backend("app", "img1").unwrap();
        assert!(Arc::ptr_eq(&img1, &again));
        assert_eq!(again.admin(), AdminState::Draining);
        assert_eq!(again.stats.bytes_out.load(Ordering::Relaxed), 7);
        assert_eq!(r.changes(Change::Add), 1);
        let moved = r
            .move_backend("app", "img1", "127.0.0.1:9100".parse().unwrap())
            .unwrap();
        assert_eq!(moved.stats.bytes_out.load(Ordering::Relaxed), 7);
        assert_eq!(moved.admin(), AdminState::Draining);
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let r = registry();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            r.add_backend("nope", "x", addr, 1, AdminState::Active, Extras::default())
                .unwrap_err(),
            ChangeError::UnknownPool("nope".into())
        );
        assert!(matches!(
            r.add_backend(
                "app",
                "img1",
                addr,
                1,
                AdminState::Active,
                Extras::default()
            ),
            Err(ChangeError::Exists { .. })
        ));
        assert!(matches!(
            r.add_backend(
                "app",
                "with space",
                addr,
                1,
                AdminState::Active,
                Extras::default()
            ),
            Err(ChangeError::Invalid { field: "name", .. })
        ));
        assert!(matches!(
            r.add_backend("app", "x", addr, 0, AdminState::Active, Extras::default()),
            Err(ChangeError::Invalid {
                field: "weight",
                ..
            })
        ));
        assert!(matches!(
            r.set_admin("app", "ghost", AdminState::Draining),
            Err(ChangeError::UnknownBackend { .. })
        ));
    }

    #[test]
    fn removal_with_pins_needs_force_and_drops_them() {
        let r = registry();
        let (p, img1) = r.backend("app", "img1").unwrap();
        let (_, img2) = r.backend("app", "img2").unwrap();
        let table = p.table().unwrap();
        table.pin(PinKey::of("A"), img1.id, 0);
        table.pin(PinKey::of("B"), img1.id, 0);
        table.pin(PinKey::of("C"), img2.id, 0);
        assert!(matches!(
            r.remove_backend("app", "img1", false),
            Err(ChangeError::HasPins { pins: 2, .. })
        ));
        let removed = r.remove_backend("app", "img1", true).unwrap();
        assert_eq!(removed.pins_dropped, 2);
        assert_eq!(table.len(), 1);
        assert_eq!(table.pins_of(img1.id), 0);
        assert_eq!(table.get(PinKey::of("C")).unwrap().backend, img2.id);
        assert_eq!(p.backends().len(), 1);
    }

    #[test]
    fn concurrent_changes_are_never_lost() {
        let r = Arc::new(registry());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let addr = format!("127.0.0.1:{}", 10_000 + t * 100 + i)
                            .parse()
                            .unwrap();
                        r.add_backend(
                            "app",
                            &format!("t{t}-{i}"),
                            addr,
                            1,
                            AdminState::Active,
                            Extras::default(),
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(r.pool("app").unwrap().backends().len(), 2 + 8 * 25);
    }

    #[test]
    fn draining_a_drained_backend_keeps_it_drained() {
        let r = registry();
        let b = r.set_admin("app", "img1", AdminState::Draining).unwrap();
        assert!(b.settle_drain(0));
        r.set_admin("app", "img1", AdminState::Draining).unwrap();
        assert_eq!(b.admin(), AdminState::Drained);
        r.set_admin("app", "img1", AdminState::Active).unwrap();
        assert_eq!(b.admin(), AdminState::Active);
    }
}
