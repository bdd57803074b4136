//! A pool: one application's backends, its affinity settings and table, and the routing
//! decision for one request — pinned, learned from an affinity cookie, new, or redispatched.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;

use crate::core::affinity::{AffinityTable, PinKey, TableLimits};
use crate::core::affinity_cookie::AffinityCookie;
use crate::core::backend::{AdminState, AffinityCookieValue, Backend, BackendId, BackendSet};
use crate::core::balance::{self, Policy};
use crate::core::health::HealthPolicy;
use crate::core::launch::ProcessState;
use crate::core::route::HostMatch;
use crate::core::session_id::{IdRules, IdSource, SessionNames};
use crate::core::stats::PoolStats;

/// What happens to a session whose backend is down or disabled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnPinnedDown {
    /// Re-pinned to a live backend (the user sees a new session rather than an error).
    #[default]
    Redispatch,
    /// Answered 503 with `Retry-After`; the pin is kept, so the session is back with its
    /// image.
    Fail,
}

impl OnPinnedDown {
    /// A short stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            OnPinnedDown::Redispatch => "redispatch",
            OnPinnedDown::Fail => "fail",
        }
    }
}

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
    /// The pins (shared with the pool this one replaced on a reload).
    pub table: Arc<AffinityTable>,
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
            table: Arc::new(AffinityTable::new(limits)),
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
    /// An unknown id with a valid affinity cookie: routed to the cookie's backend, whose
    /// `Set-Cookie` of the id pins it.
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
    /// The affinity cookie to insert on the reply, if the client does not hold it yet.
    pub insert_cookie: Option<Arc<AffinityCookieValue>>,
    /// For a redispatched session: the backend it was pinned to.
    pub moved_from: Option<BackendId>,
}

/// Why a request could not be routed.
#[derive(Debug)]
pub enum Refusal {
    /// No backend of the pool takes new sessions.
    NoBackend,
    /// The session's backend is down or disabled, and the pool fails such requests
    /// (`on_pinned_down = "fail"`); the pin is kept.
    PinnedDown(Arc<Backend>),
}

/// One pool of backends serving one application.
pub struct Pool {
    /// Operator-facing name.
    pub name: Box<str>,
    /// Host patterns routed here.
    pub hosts: Vec<HostMatch>,
    /// Path prefix routed here.
    pub path_prefix: Box<str>,
    /// How new sessions are spread.
    pub policy: Policy,
    /// How sessions stay put.
    pub affinity: Affinity,
    /// The inserted affinity cookie, if enabled.
    pub cookie: Option<AffinityCookie>,
    /// What happens to sessions of a backend that is down or disabled.
    pub on_pinned_down: OnPinnedDown,
    /// Health checks and thresholds.
    pub health: HealthPolicy,
    /// Lookup and decision counters (shared with the pool this one replaced on a reload).
    pub stats: Arc<PoolStats>,
    /// Shared with the pool this one replaced on a reload, so a request that began before
    /// it sees every change made since.
    backends: Arc<ArcSwap<BackendSet>>,
    cursor: Arc<AtomicUsize>,
}

impl Pool {
    /// A pool over `backends`, with default health settings.
    pub fn new(
        name: &str,
        policy: Policy,
        affinity: Affinity,
        cookie: Option<AffinityCookie>,
        backends: Vec<Backend>,
    ) -> Self {
        let pool = Pool {
            name: name.into(),
            hosts: vec![HostMatch::Any],
            path_prefix: "/".into(),
            policy,
            affinity,
            cookie,
            on_pinned_down: OnPinnedDown::default(),
            health: HealthPolicy::default(),
            stats: Arc::default(),
            backends: Arc::new(ArcSwap::from_pointee(BackendSet::default())),
            cursor: Arc::default(),
        };
        pool.set_backends(backends.into_iter().map(Arc::new).collect());
        pool
    }

    /// The same pool serving these hosts and path prefix.
    pub fn with_routes(self, hosts: Vec<HostMatch>, path_prefix: &str) -> Self {
        Pool {
            hosts,
            path_prefix: path_prefix.into(),
            ..self
        }
    }

    /// The same pool with other health settings.
    pub fn with_health(self, health: HealthPolicy, on_pinned_down: OnPinnedDown) -> Self {
        Pool {
            health,
            on_pinned_down,
            ..self
        }
    }

    /// This pool (new settings from a reload) taking over from `old`: its counters, its
    /// backends (the same `Arc`s, so their state and counters stay) and, when both use
    /// session affinity, its pins under the new limits.
    pub fn succeeding(mut self, old: &Pool) -> Self {
        self.stats = old.stats.clone();
        self.cursor = old.cursor.clone();
        self.backends = old.backends.clone();
        if let (Affinity::Session(new), Affinity::Session(old)) =
            (&mut self.affinity, &old.affinity)
        {
            old.table.set_limits(new.table.limits());
            new.table = old.table.clone();
        }
        self.set_backends(old.backends().all().to_vec());
        self
    }

    /// The current backend set: a lock-free snapshot.
    #[inline]
    pub fn backends(&self) -> arc_swap::Guard<Arc<BackendSet>> {
        self.backends.load()
    }

    /// The handle the backend set is swapped through (shared with the pools this one
    /// succeeds and is succeeded by): the shared store names a pin's backend through it.
    pub fn backend_handle(&self) -> Arc<ArcSwap<BackendSet>> {
        self.backends.clone()
    }

    /// Swaps in a new set of these backends whole (their affinity cookies and the
    /// round-robin schedule rebuilt); requests in flight keep the set they loaded. Changes
    /// go through the registry, which makes them one at a time.
    pub(crate) fn set_backends(&self, backends: Vec<Arc<Backend>>) {
        let set = BackendSet::new(backends, |id| {
            self.cookie.as_ref().map(|c| c.for_backend(id))
        });
        self.backends.store(Arc::new(set));
    }

    /// The session table, in session-affinity mode.
    pub fn table(&self) -> Option<&AffinityTable> {
        match &self.affinity {
            Affinity::Session(s) => Some(&s.table),
            Affinity::ClientIp => None,
        }
    }

    /// Routes one request. `now` is unix seconds; `tried` are backends that refused this
    /// request's connection already (a session pinned to one of them is redispatched, or
    /// refused with `on_pinned_down = "fail"`). The decision and the lookup outcome are
    /// counted in [`Pool::stats`].
    pub fn route(
        &self,
        set: &BackendSet,
        request: &RequestView<'_>,
        now: u32,
        tried: &[BackendId],
    ) -> Result<Routing, Refusal> {
        let routed = self.decide(set, request, now, tried);
        match &routed {
            Ok(r) => self.stats.decide(r.decision),
            // With backends tried, the client gets the last one's failure, not a 503.
            Err(Refusal::NoBackend) if !tried.is_empty() => {}
            Err(Refusal::NoBackend) => {
                self.stats.no_backend.fetch_add(1, Ordering::Relaxed);
            }
            Err(Refusal::PinnedDown(_)) => {
                self.stats.pinned_down.fetch_add(1, Ordering::Relaxed);
            }
        }
        routed
    }

    fn decide(
        &self,
        set: &BackendSet,
        request: &RequestView<'_>,
        now: u32,
        tried: &[BackendId],
    ) -> Result<Routing, Refusal> {
        let session = match &self.affinity {
            Affinity::ClientIp => {
                return balance::by_client_address(set, request.client, |b| !tried.contains(&b.id))
                    .map(|b| self.routing(set, b, Decision::Hashed, false, request))
                    .ok_or(Refusal::NoBackend);
            }
            Affinity::Session(s) => s,
        };
        let key = request.id.map(|(id, _)| PinKey::of(id));
        let owner = key.and_then(|key| session.table.lookup(key, now));
        // A retry (a backend refused) looks the id up again; the request counts once.
        if key.is_some() && tried.is_empty() {
            let outcome = if owner.is_some() {
                &self.stats.lookups_hit
            } else {
                &self.stats.lookups_miss
            };
            outcome.fetch_add(1, Ordering::Relaxed);
        }
        let usable = |b: &Backend| b.serves_pinned() && !tried.contains(&b.id);
        let mut moved_from = None;
        if let (Some(key), Some(owner)) = (key, owner) {
            match set.get(owner) {
                Some(b) if usable(b) => {
                    return Ok(self.routing(set, b, Decision::Pinned, false, request));
                }
                // Its image died: with `fail` the session waits for that image, so the
                // request launches it again (the session is gone from its memory, but the
                // image says so itself and starts a new one there).
                Some(b) if self.on_pinned_down == OnPinnedDown::Fail => {
                    if b.may_launch(now) && !tried.contains(&b.id) {
                        return Ok(self.routing(set, b, Decision::Pinned, false, request));
                    }
                    return Err(Refusal::PinnedDown(b.clone()));
                }
                Some(_) => moved_from = Some(owner),
                None => {
                    // The backend left the pool: its sessions went with it.
                    session.table.unpin(key);
                    moved_from = Some(owner);
                }
            }
        }
        // The cookie says where a session lives; it never starts one where no new session
        // may start. A request naming no session starts one, and so may one naming a session
        // the table does not know (expired, or never issued: the image answers it with a new
        // session). A backend that takes no new sessions gets neither on the cookie's word,
        // even from a browser holding it: with no id, none that is draining, drained, down,
        // at max_sessions or has every slot busy; with an unknown id, none that is draining or
        // drained (one that cannot serve at all is handled below, as `on_pinned_down` says).
        // Sessions pinned there were routed above.
        let cookie_may_route = |b: &Backend| {
            if key.is_some() {
                b.takes_new_sessions() || !b.serves_pinned()
            } else {
                b.takes_new_sessions()
                    && b.is_running()
                    && b.has_room(|| session.table.pins_of(b.id))
                    && b.has_free_slot()
            }
        };
        if moved_from.is_none()
            && let Some(value) = request.affinity_cookie
            && let Some(b) = set.by_affinity_cookie(value)
            && cookie_may_route(b)
        {
            if usable(b) {
                // The cookie routes the request; the id itself is the client's word, pinned
                // only by the backend's `Set-Cookie` of it (links or a `Location` repeating
                // it teach nothing: see `learn`), so a client holding a genuine cookie cannot
                // pin an id of its choosing to that backend.
                let decision = if key.is_some() {
                    Decision::Learned
                } else {
                    Decision::Pinned
                };
                return Ok(self.routing(set, b, decision, true, request));
            }
            if self.on_pinned_down == OnPinnedDown::Fail {
                return Err(Refusal::PinnedDown(b.clone()));
            }
            moved_from = Some(b.id);
        }
        let b = self
            .pick_new(set, session, tried, now)
            .ok_or(Refusal::NoBackend)?;
        let decision = match moved_from {
            None => Decision::New,
            // Its own image again (launched anew after it died): no move.
            Some(from) if from == b.id => {
                moved_from = None;
                Decision::Pinned
            }
            Some(_) => {
                // The session stays together on its new backend until the reply names the
                // new one: its old id is pinned there (it was pinned before, so this never
                // adds an id a client invented).
                if let Some(key) = key.filter(|_| owner.is_some()) {
                    session.table.pin(key, b.id, now);
                }
                Decision::Redispatched
            }
        };
        let mut routing = self.routing(set, b, decision, true, request);
        routing.moved_from = moved_from;
        Ok(routing)
    }

    fn pick_new<'s>(
        &self,
        set: &'s BackendSet,
        session: &SessionAffinity,
        tried: &[BackendId],
        now: u32,
    ) -> Option<&'s Arc<Backend>> {
        // Not tried already for this request, and room under `max_sessions` (the requests
        // waiting for an image to run count as sessions to come: their pins are not learned
        // until it answers).
        let open = |b: &Backend| {
            !tried.contains(&b.id)
                && b.has_room(|| {
                    session.table.pins_of(b.id)
                        + b.process
                            .as_ref()
                            .map_or(0, |p| p.holding.load(Ordering::Relaxed) as u64)
                })
        };
        // One step of the shared cursor per decision: both passes start at the same place, so
        // a busy farm still spreads its new sessions in turn.
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let pick = |open: &dyn Fn(&Backend) -> bool| {
            let cursor = AtomicUsize::new(start);
            match self.policy {
                Policy::RoundRobin => balance::round_robin(set, &cursor, open),
                Policy::LeastSessions => {
                    balance::least_sessions(set, &cursor, open, |id| session.table.pins_of(id))
                }
            }
        };
        // A running backend with a free slot (under `max_conns`) first; when every one is
        // busy, the policy's choice, where the request waits its turn; then an image being
        // launched (the request waits for it with the others); and only when none of those
        // has room, the next stopped image is launched, in the order the pool lists them, so
        // a pool of images bounded by `max_sessions` runs as few as its sessions need.
        pick(&|b| open(b) && b.is_running() && b.has_free_slot())
            .or_else(|| pick(&|b| open(b) && b.is_running()))
            .or_else(|| pick(&|b| open(b) && b.is_launching()))
            .or_else(|| {
                let image = |b: &Backend, state| {
                    b.admin() == AdminState::Active
                        && b.process.as_ref().is_some_and(|p| p.state() == state)
                        && open(b)
                };
                let first = |test: &dyn Fn(&Backend) -> bool| set.all().iter().find(|b| test(b));
                // One that may be launched now; else one being stopped (the request waits
                // and launches it again); else one whose back-off after a failed launch runs,
                // so that the client is told when to come back (503, Retry-After).
                first(&|b| image(b, ProcessState::Stopped) && b.may_launch(now))
                    .or_else(|| first(&|b| image(b, ProcessState::Stopping)))
                    .or_else(|| first(&|b| image(b, ProcessState::Stopped)))
            })
    }

    fn routing(
        &self,
        set: &BackendSet,
        backend: &Arc<Backend>,
        decision: Decision,
        scan_page: bool,
        request: &RequestView<'_>,
    ) -> Routing {
        // Inserted unless the client holds this backend's cookie under the signing secret
        // (one signed with an older secret is replaced, so browsers move to the new one).
        let insert_cookie = set
            .cookie_of(backend.id)
            .filter(|c| !request.affinity_cookie.is_some_and(|v| c.is_current(v)))
            .cloned();
        Routing {
            backend: backend.clone(),
            decision,
            scan_page,
            insert_cookie,
            moved_from: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let r = p.route(&set, &view(Some("forged"), None), 0, &[]).unwrap();
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
            let r = p.route(&set, &view(Some("S1"), None), 1, &[]).unwrap();
            assert_eq!(
                (r.backend.id, r.decision, r.scan_page),
                (web2.id, Decision::Pinned, false)
            );
        }
        web2.set_admin(AdminState::Draining);
        assert_eq!(
            p.route(&set, &view(Some("S1"), None), 1, &[])
                .unwrap()
                .backend
                .id,
            web2.id
        );
        web2.set_admin(AdminState::Disabled);
        let r = p.route(&set, &view(Some("S1"), None), 1, &[]).unwrap();
        assert_eq!(r.decision, Decision::Redispatched);
        assert_eq!(r.moved_from, Some(web2.id));
        assert_ne!(r.backend.id, web2.id);
        let again = p.route(&set, &view(Some("S1"), None), 1, &[]).unwrap();
        assert_eq!(
            (again.decision, again.backend.id),
            (Decision::Pinned, r.backend.id),
            "a redispatched session is re-pinned where it went"
        );
    }

    #[test]
    fn a_draining_backends_cookie_brings_it_no_new_session() {
        let p = pool(true);
        let set = p.backends();
        let web3 = set.all()[2].clone();
        let value = set.cookie_of(web3.id).unwrap().value.clone();
        web3.set_admin(AdminState::Draining);
        for _ in 0..6 {
            let r = p.route(&set, &view(None, Some(&value)), 0, &[]).unwrap();
            assert_eq!(r.decision, Decision::New);
            assert_ne!(r.backend.id, web3.id);
        }
        // Nor does a request naming a session the table does not know: the image would start
        // a new session for it, unless it was one of its own.
        for state in [AdminState::Draining, AdminState::Drained] {
            web3.set_admin(state);
            for _ in 0..6 {
                let r = p
                    .route(&set, &view(Some("UNKNOWN"), Some(&value)), 0, &[])
                    .unwrap();
                assert_eq!(r.decision, Decision::New, "{state:?}");
                assert_ne!(r.backend.id, web3.id, "{state:?}");
                assert!(r.insert_cookie.is_some(), "the new backend's cookie is set");
            }
        }
        // A session pinned there keeps reaching it, cookie or not.
        p.table().unwrap().pin(PinKey::of("PINNED"), web3.id, 0);
        for cookie in [None, Some(&*value)] {
            let r = p
                .route(&set, &view(Some("PINNED"), cookie), 0, &[])
                .unwrap();
            assert_eq!((r.backend.id, r.decision), (web3.id, Decision::Pinned));
        }
    }

    #[test]
    fn a_disabled_backends_cookie_brings_it_nothing() {
        for on_pinned_down in [OnPinnedDown::Redispatch, OnPinnedDown::Fail] {
            let p = pool(true).with_health(HealthPolicy::default(), on_pinned_down);
            let set = p.backends();
            let web3 = set.all()[2].clone();
            let value = set.cookie_of(web3.id).unwrap().value.clone();
            web3.set_admin(AdminState::Disabled);
            for id in [None, Some("UNKNOWN")] {
                match p.route(&set, &view(id, Some(&value)), 0, &[]) {
                    Ok(r) => assert_ne!(r.backend.id, web3.id, "{on_pinned_down:?} {id:?}"),
                    // `fail` holds a session the cookie vouches for until its image is back.
                    Err(Refusal::PinnedDown(b)) => {
                        assert_eq!(
                            (b.id, on_pinned_down, id),
                            (web3.id, OnPinnedDown::Fail, Some("UNKNOWN"))
                        );
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
        }
    }

    #[test]
    fn a_backend_at_max_sessions_takes_no_new_one_but_keeps_its_own() {
        let p = pool(false);
        let set = p.backends();
        let (web1, web2, web3) = (&set.all()[0], &set.all()[1], &set.all()[2]);
        web1.set_max_sessions(Some(2));
        let table = p.table().unwrap();
        table.pin(PinKey::of("A"), web1.id, 0);
        table.pin(PinKey::of("B"), web1.id, 0);
        for _ in 0..9 {
            let r = p.route(&set, &view(None, None), 1, &[]).unwrap();
            assert_ne!(r.backend.id, web1.id, "web1 is full");
        }
        let r = p.route(&set, &view(Some("A"), None), 1, &[]).unwrap();
        assert_eq!((r.backend.id, r.decision), (web1.id, Decision::Pinned));
        table.unpin(PinKey::of("B"));
        assert!(
            (0..3).any(|_| p.route(&set, &view(None, None), 1, &[]).unwrap().backend.id == web1.id),
            "room again once a session ends"
        );
        for b in [web2, web3] {
            b.set_max_sessions(Some(1));
            table.pin(PinKey::of(&b.name), b.id, 0);
        }
        table.pin(PinKey::of("C"), web1.id, 0);
        assert!(matches!(
            p.route(&set, &view(None, None), 1, &[]),
            Err(Refusal::NoBackend)
        ));
    }

    #[test]
    fn new_sessions_prefer_a_backend_with_a_free_slot_and_take_turns_when_all_are_busy() {
        let limited = |name: &str, port: u16| {
            Backend::new(name, format!("127.0.0.1:{port}").parse().unwrap(), 1).with_extras(
                crate::core::backend::Extras {
                    conns: Some(crate::core::backend::ConnLimit::new(
                        1,
                        8,
                        std::time::Duration::from_secs(1),
                    )),
                    process: None,
                },
            )
        };
        let session = SessionAffinity::new(
            SessionNames::default(),
            IdRules::default(),
            TableLimits::default(),
            0,
            0,
        );
        let p = Pool::new(
            "app",
            Policy::RoundRobin,
            Affinity::Session(Box::new(session)),
            None,
            vec![limited("a", 9001), limited("b", 9002)],
        );
        let set = p.backends();
        let a = &set.all()[0];
        let busy = a
            .conns
            .as_ref()
            .unwrap()
            .slots
            .clone()
            .try_acquire_owned()
            .unwrap();
        for _ in 0..4 {
            let r = p.route(&set, &view(None, None), 0, &[]).unwrap();
            assert_eq!(&*r.backend.name, "b", "a has no free slot");
        }
        let _also = set.all()[1]
            .conns
            .as_ref()
            .unwrap()
            .slots
            .clone()
            .try_acquire_owned()
            .unwrap();
        let names: Vec<_> = (0..4)
            .map(|_| {
                p.route(&set, &view(None, None), 0, &[])
                    .unwrap()
                    .backend
                    .name
                    .clone()
            })
            .collect();
        assert_eq!(
            names.iter().filter(|n| &***n == "a").count(),
            2,
            "{names:?}"
        );
        drop(busy);
    }

    #[test]
    fn fail_mode_refuses_and_keeps_the_pin() {
        let p = pool(false).with_health(HealthPolicy::default(), OnPinnedDown::Fail);
        let set = p.backends();
        let web1 = set.all()[0].clone();
        p.table().unwrap().pin(PinKey::of("S1"), web1.id, 0);
        let refused = p.route(&set, &view(Some("S1"), None), 1, &[web1.id]);
        assert!(matches!(refused, Err(Refusal::PinnedDown(b)) if b.id == web1.id));
        assert_eq!(
            p.table().unwrap().get(PinKey::of("S1")).unwrap().backend,
            web1.id
        );
        let new = p.route(&set, &view(None, None), 1, &[web1.id]).unwrap();
        assert_ne!(
            new.backend.id, web1.id,
            "a new session skips a backend tried"
        );
    }

    #[test]
    fn a_pinned_session_whose_backend_refused_is_redispatched_at_once() {
        let p = pool(false);
        let set = p.backends();
        let web1 = set.all()[0].clone();
        p.table().unwrap().pin(PinKey::of("S1"), web1.id, 0);
        let r = p
            .route(&set, &view(Some("S1"), None), 1, &[web1.id])
            .unwrap();
        assert_eq!(r.decision, Decision::Redispatched);
        assert_ne!(r.backend.id, web1.id);
    }

    #[test]
    fn valid_affinity_cookie_routes_an_unknown_id_to_its_backend() {
        let p = pool(true);
        let set = p.backends();
        let web3 = set.all()[2].clone();
        let value = set.cookie_of(web3.id).unwrap().value.clone();
        for _ in 0..3 {
            let r = p
                .route(&set, &view(Some("NEWID"), Some(&value)), 0, &[])
                .unwrap();
            assert_eq!(
                (
                    r.backend.id,
                    r.decision,
                    r.insert_cookie.is_some(),
                    r.scan_page
                ),
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
        let _ = p.route(&set, &view(Some("S1"), None), 1, &[]);
        let _ = p.route(&set, &view(Some("nope"), None), 1, &[]);
        let _ = p.route(&set, &view(None, None), 1, &[]);
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
            .route(
                &set,
                &view(Some("NEWID"), Some("00000001.deadbeef")),
                0,
                &[],
            )
            .unwrap();
        assert_eq!(r.decision, Decision::New);
        assert!(r.insert_cookie.is_some());
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
        let first = p.route(&set, &view(Some("ignored"), None), 0, &[]).unwrap();
        assert_eq!(first.decision, Decision::Hashed);
        for _ in 0..5 {
            assert_eq!(
                p.route(&set, &view(None, None), 0, &[]).unwrap().backend.id,
                first.backend.id
            );
        }
        assert!(p.table().is_none());
    }

    fn images(n: usize, on_pinned_down: OnPinnedDown) -> Pool {
        use crate::core::backend::Extras;
        use crate::core::launch::{LaunchSpec, Process};
        let spec = LaunchSpec {
            argv: vec!["/bin/img".into(), "{port}".into()],
            dir: None,
            env: Vec::new(),
            log: "/tmp/img.log".into(),
            timeout: std::time::Duration::from_secs(60),
            idle_stop: None,
            stop_timeout: std::time::Duration::from_secs(10),
            backoff: std::time::Duration::from_secs(5),
            stop_on_exit: false,
            hold_max: 1024,
        };
        let backends = (1..=n)
            .map(|i| {
                let b = Backend::new(
                    &format!("img{i}"),
                    format!("127.0.0.1:900{i}").parse().unwrap(),
                    1,
                )
                .with_extras(Extras {
                    conns: None,
                    process: Some(Process::new(spec.clone())),
                });
                b.set_max_sessions(Some(1));
                b
            })
            .collect();
        let session = SessionAffinity::new(
            SessionNames::default(),
            IdRules::default(),
            TableLimits::default(),
            65536,
            32768,
        );
        Pool::new(
            "farm",
            Policy::RoundRobin,
            Affinity::Session(Box::new(session)),
            None,
            backends,
        )
        .with_health(HealthPolicy::default(), on_pinned_down)
    }

    #[test]
    fn running_images_with_room_come_first_then_the_one_launching_then_the_next_stopped() {
        let p = images(3, OnPinnedDown::Redispatch);
        let set = p.backends();
        let [img1, img2, img3] = [0, 1, 2].map(|i| set.all()[i].clone());
        let process = |b: &Backend| b.process.clone().unwrap();
        let new = |now| {
            p.route(&set, &view(None, None), now, &[])
                .unwrap()
                .backend
                .id
        };
        // Nothing runs: the first stopped image, in the pool's order.
        assert_eq!(new(10), img1.id);
        assert!(process(&img1).begin_launch(10));
        // While it launches, new sessions join it rather than launch another.
        assert_eq!(new(10), img1.id);
        process(&img1).launched(Some(1), false, 11);
        assert_eq!(new(11), img1.id, "running with room");
        p.table().unwrap().pin(PinKey::of("S1"), img1.id, 11);
        // img1 is full (max_sessions = 1): the next stopped one, not img3.
        assert_eq!(new(12), img2.id);
        // A failed launch backs off: img3 is launched meanwhile.
        assert!(process(&img2).begin_launch(12));
        process(&img2).launch_failed(
            crate::core::launch::LaunchFailure::Exited,
            "exited with status 3",
            17,
            12,
        );
        assert_eq!(new(13), img3.id);
        assert!(process(&img3).begin_launch(13));
        process(&img3).launched(None, false, 14);
        p.table().unwrap().pin(PinKey::of("S3"), img3.id, 14);
        assert_eq!(
            new(15),
            img2.id,
            "every running one full, the last one backing off: it refuses with Retry-After"
        );
        assert!(!img2.may_launch(15));
        assert_eq!(new(17), img2.id, "tried again after the back-off");
        // Pinned sessions are never refused by max_sessions.
        let pinned = p.route(&set, &view(Some("S1"), None), 18, &[]).unwrap();
        assert_eq!(
            (pinned.backend.id, pinned.decision),
            (img1.id, Decision::Pinned)
        );
    }

    #[test]
    fn a_dead_images_sessions_relaunch_it_with_fail_and_move_with_redispatch() {
        for mode in [OnPinnedDown::Fail, OnPinnedDown::Redispatch] {
            let p = images(2, mode);
            let set = p.backends();
            let img1 = set.all()[0].clone();
            let process = img1.process.clone().unwrap();
            assert!(process.begin_launch(0));
            process.launched(Some(1), false, 0);
            p.table().unwrap().pin(PinKey::of("S1"), img1.id, 0);
            // It dies.
            assert!(process.exited(1));
            img1.health.force_down();
            let r = p.route(&set, &view(Some("S1"), None), 2, &[]).unwrap();
            match mode {
                OnPinnedDown::Fail => {
                    assert_eq!((r.backend.id, r.decision), (img1.id, Decision::Pinned))
                }
                OnPinnedDown::Redispatch => {
                    assert_eq!(r.decision, Decision::Redispatched);
                    assert_ne!(r.backend.id, img1.id, "the stopped img2 is launched for it");
                }
            }
        }
    }
}
