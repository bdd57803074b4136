//! A pool: one application's backends, its affinity settings and table, and the routing
//! decision for one request — pinned, learned from an affinity cookie, new, or redispatched.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;

use crate::core::affinity::{AffinityTable, PinKey, TableLimits};
use crate::core::affinity_cookie::AffinityCookie;
use crate::core::backend::{Backend, BackendSet};
use crate::core::balance::{self, Policy};
use crate::core::session_id::{IdRules, IdSource, SessionNames};
use crate::core::stats::PoolStats;

/// How a pool keeps a client on its backend.
pub enum Affinity {
    /// Session ids, learned from replies and kept in the table.
    Session(Box<SessionAffinity>),
    /// A hash of the client address: no table, no parsing.
    ClientIp,
}

/// Everything session affinity needs: where ids travel, what they look like, and the table.
pub struct SessionAffinity {
    /// Query field, cookie names, path parameter.
    pub names: SessionNames,
    /// What a valid id looks like.
    pub rules: IdRules,
    /// The pins.
    pub table: AffinityTable,
    /// Most bytes of a form body read to find an id (0 = never).
    pub form_peek_bytes: usize,
    /// Most bytes of an HTML reply scanned for the id in its links (0 = never).
    pub page_scan_bytes: usize,
    /// `PARAM=`, the needle the page scanner looks for.
    pub needle: Box<[u8]>,
}

impl SessionAffinity {
    /// Session affinity with these names, rules and limits.
    pub fn new(
        names: SessionNames,
        rules: IdRules,
        limits: TableLimits,
        form_peek_bytes: usize,
        page_scan_bytes: usize,
    ) -> Self {
        let needle = format!("{}=", names.param).into_bytes().into_boxed_slice();
        SessionAffinity {
            names,
            rules,
            table: AffinityTable::new(limits),
            form_peek_bytes,
            page_scan_bytes,
            needle,
        }
    }
}

/// What the request said about its session, as the edges extracted it.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// The session id and where it was found.
    pub id: Option<(&'a str, IdSource)>,
    /// The value of the affinity cookie, if the request carried one.
    pub affinity_cookie: Option<&'a str>,
    /// The client's address.
    pub client: IpAddr,
}

/// Why a request went where it went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Its session (or affinity cookie) is pinned to a backend that serves it.
    Pinned,
    /// An unknown id with a valid affinity cookie: routed to the cookie's backend, whose reply
    /// pins the id when it names it.
    Learned,
    /// No known session: the pool's policy chose.
    New,
    /// Its pinned backend can no longer serve it: the policy chose another.
    Redispatched,
    /// Client-IP mode: the address hash chose.
    Hashed,
}

impl Decision {
    /// A short stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Pinned => "pinned",
            Decision::Learned => "learned",
            Decision::New => "new",
            Decision::Redispatched => "redispatched",
            Decision::Hashed => "hashed",
        }
    }
}

/// The outcome of routing one request within a pool.
pub struct Routing {
    /// Where the request goes.
    pub backend: Arc<Backend>,
    /// Why.
    pub decision: Decision,
    /// Whether to scan the reply page for a new session id (the request had no known id).
    pub scan_page: bool,
    /// Whether to insert the affinity cookie on the reply.
    pub insert_cookie: bool,
}

/// One pool of backends serving one application.
pub struct Pool {
    /// Operator-facing name.
    pub name: Box<str>,
    /// How new sessions are spread.
    pub policy: Policy,
    /// How sessions stay put.
    pub affinity: Affinity,
    /// The inserted affinity cookie, if enabled.
    pub cookie: Option<AffinityCookie>,
    /// Lookup and decision counters.
    pub stats: PoolStats,
    backends: ArcSwap<BackendSet>,
    cursor: AtomicUsize,
}

impl Pool {
    /// A pool over `backends` (their affinity cookie values are filled in here).
    pub fn new(
        name: &str,
        policy: Policy,
        affinity: Affinity,
        cookie: Option<AffinityCookie>,
        backends: Vec<Backend>,
    ) -> Self {
        let pool = Pool {
            name: name.into(),
            policy,
            affinity,
            cookie,
            stats: PoolStats::default(),
            backends: ArcSwap::from_pointee(BackendSet::default()),
            cursor: AtomicUsize::new(0),
        };
        pool.replace_backends(backends);
        pool
    }

    /// The current backend set: a lock-free snapshot.
    #[inline]
    pub fn backends(&self) -> arc_swap::Guard<Arc<BackendSet>> {
        self.backends.load()
    }

    /// Swaps in a new backend set whole; requests in flight keep the one they loaded.
    pub fn replace_backends(&self, backends: Vec<Backend>) {
        let backends = backends
            .into_iter()
            .map(|mut b| {
                b.affinity_cookie = self.cookie.as_ref().map(|c| c.for_backend(b.id));
                Arc::new(b)
            })
            .collect();
        self.backends.store(Arc::new(BackendSet::new(backends)));
    }

    /// The session table, in session-affinity mode.
    pub fn table(&self) -> Option<&AffinityTable> {
        match &self.affinity {
            Affinity::Session(s) => Some(&s.table),
            Affinity::ClientIp => None,
        }
    }

    /// Routes one request. `now` is unix seconds. Returns `None` when no backend can take it.
    /// The decision and the lookup outcome are counted in [`Pool::stats`].
    pub fn route(&self, set: &BackendSet, request: &RequestView<'_>, now: u32) -> Option<Routing> {
        let routed = self.decide(set, request, now);
        match &routed {
            Some(r) => self.stats.decide(r.decision),
            None => {
                self.stats.no_backend.fetch_add(1, Ordering::Relaxed);
            }
        }
        routed
    }

    fn decide(&self, set: &BackendSet, request: &RequestView<'_>, now: u32) -> Option<Routing> {
        let session = match &self.affinity {
            Affinity::ClientIp => {
                return balance::by_client_address(set, request.client).map(|b| Routing {
                    backend: b.clone(),
                    decision: Decision::Hashed,
                    scan_page: false,
                    insert_cookie: false,
                });
            }
            Affinity::Session(s) => s,
        };
        let key = request.id.map(|(id, _)| PinKey::of(id));
        let owner = key.and_then(|key| session.table.lookup(key, now));
        if key.is_some() {
            let outcome = if owner.is_some() {
                &self.stats.lookups_hit
            } else {
                &self.stats.lookups_miss
            };
            outcome.fetch_add(1, Ordering::Relaxed);
        }
        let mut redispatch = false;
        if let (Some(key), Some(owner)) = (key, owner) {
            match set.get(owner) {
                Some(b) if b.serves_pinned() => {
                    return Some(self.routing(b, Decision::Pinned, false, request));
                }
                Some(_) => redispatch = true,
                None => {
                    // The backend left the pool: its sessions went with it.
                    session.table.unpin(key);
                    redispatch = true;
                }
            }
        }
        if !redispatch
            && let Some(value) = request.affinity_cookie
            && let Some(b) = set.by_affinity_cookie(value)
            && b.serves_pinned()
        {
            // The cookie routes the request; the id itself is pinned only when the backend's
            // reply names it (links, Location, Set-Cookie), so even a client holding a genuine
            // cookie cannot make the table keep ids the backend never issued.
            let decision = if key.is_some() {
                Decision::Learned
            } else {
                Decision::Pinned
            };
            return Some(self.routing(b, decision, true, request));
        }
        let decision = if redispatch {
            Decision::Redispatched
        } else {
            Decision::New
        };
        self.pick_new(set, session)
            .map(|b| self.routing(b, decision, true, request))
    }

    fn pick_new<'s>(
        &self,
        set: &'s BackendSet,
        session: &SessionAffinity,
    ) -> Option<&'s Arc<Backend>> {
        match self.policy {
            Policy::RoundRobin => balance::round_robin(set, &self.cursor),
            Policy::LeastSessions => {
                balance::least_sessions(set, &self.cursor, |id| session.table.pins_of(id))
            }
        }
    }

    fn routing(
        &self,
        backend: &Arc<Backend>,
        decision: Decision,
        scan_page: bool,
        request: &RequestView<'_>,
    ) -> Routing {
        let insert_cookie = backend
            .affinity_cookie
            .as_ref()
            .is_some_and(|c| request.affinity_cookie != Some(&*c.value));
        Routing {
            backend: backend.clone(),
            decision,
            scan_page,
            insert_cookie,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::backend::BackendState;
    use std::net::Ipv4Addr;

    fn backends() -> Vec<Backend> {
        (1..=3)
            .map(|i| {
                Backend::new(
                    &format!("web{i}"),
                    format!("127.0.0.1:900{i}").parse().unwrap(),
                    1,
                )
            })
            .collect()
    }

    fn pool(cookie: bool) -> Pool {
        let session = SessionAffinity::new(
            SessionNames::default(),
            IdRules::default(),
            TableLimits::default(),
            65536,
            32768,
        );
        Pool::new(
            "app",
            Policy::RoundRobin,
            Affinity::Session(Box::new(session)),
            cookie.then(|| AffinityCookie::new("tg", b"secret", "/")),
            backends(),
        )
    }

    fn view<'a>(id: Option<&'a str>, cookie: Option<&'a str>) -> RequestView<'a> {
        RequestView {
            id: id.map(|i| (i, IdSource::Query)),
            affinity_cookie: cookie,
            client: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    #[test]
    fn unknown_id_is_routed_as_new_and_creates_no_pin() {
        let p = pool(false);
        let set = p.backends();
        let r = p.route(&set, &view(Some("forged"), None), 0).unwrap();
        assert_eq!(r.decision, Decision::New);
        assert!(r.scan_page);
        assert_eq!(p.table().unwrap().len(), 0);
    }

    #[test]
    fn pinned_id_goes_to_its_backend_until_it_goes_down() {
        let p = pool(false);
        let set = p.backends();
        let web2 = set.all()[1].clone();
        p.table().unwrap().pin(PinKey::of("S1"), web2.id, 0);
        for _ in 0..10 {
            let r = p.route(&set, &view(Some("S1"), None), 1).unwrap();
            assert_eq!(
                (r.backend.id, r.decision, r.scan_page),
                (web2.id, Decision::Pinned, false)
            );
        }
        web2.set_state(BackendState::Draining);
        assert_eq!(
            p.route(&set, &view(Some("S1"), None), 1)
                .unwrap()
                .backend
                .id,
            web2.id
        );
        web2.set_state(BackendState::Down);
        let r = p.route(&set, &view(Some("S1"), None), 1).unwrap();
        assert_eq!(r.decision, Decision::Redispatched);
        assert_ne!(r.backend.id, web2.id);
    }

    #[test]
    fn valid_affinity_cookie_routes_an_unknown_id_to_its_backend() {
        let p = pool(true);
        let set = p.backends();
        let web3 = set.all()[2].clone();
        let value = web3.affinity_cookie.as_ref().unwrap().value.clone();
        for _ in 0..3 {
            let r = p
                .route(&set, &view(Some("NEWID"), Some(&value)), 0)
                .unwrap();
            assert_eq!(
                (r.backend.id, r.decision, r.insert_cookie, r.scan_page),
                (web3.id, Decision::Learned, false, true)
            );
        }
        assert!(
            p.table().unwrap().is_empty(),
            "the reply, not the request, creates the pin"
        );
    }

    #[test]
    fn lookups_and_decisions_are_counted() {
        let p = pool(false);
        let set = p.backends();
        p.table().unwrap().pin(PinKey::of("S1"), set.all()[0].id, 0);
        p.route(&set, &view(Some("S1"), None), 1);
        p.route(&set, &view(Some("nope"), None), 1);
        p.route(&set, &view(None, None), 1);
        assert_eq!(p.stats.lookups_hit.load(Ordering::Relaxed), 1);
        assert_eq!(p.stats.lookups_miss.load(Ordering::Relaxed), 1);
        assert_eq!(p.stats.decided(Decision::Pinned), 1);
        assert_eq!(p.stats.decided(Decision::New), 2);
    }

    #[test]
    fn forged_affinity_cookie_is_ignored() {
        let p = pool(true);
        let set = p.backends();
        let r = p
            .route(&set, &view(Some("NEWID"), Some("00000001.deadbeef")), 0)
            .unwrap();
        assert_eq!(r.decision, Decision::New);
        assert!(r.insert_cookie);
        assert!(p.table().unwrap().is_empty());
    }

    #[test]
    fn client_ip_mode_needs_no_table() {
        let p = Pool::new(
            "ip",
            Policy::RoundRobin,
            Affinity::ClientIp,
            None,
            backends(),
        );
        let set = p.backends();
        let first = p.route(&set, &view(Some("ignored"), None), 0).unwrap();
        assert_eq!(first.decision, Decision::Hashed);
        for _ in 0..5 {
            assert_eq!(
                p.route(&set, &view(None, None), 0).unwrap().backend.id,
                first.backend.id
            );
        }
        assert!(p.table().is_none());
    }
}
