//! Learning pins as a reply passes: from its head (`Set-Cookie`, `Location`) before it is
//! forwarded, and from the first bytes of its HTML body while it streams.
//!
//! Two rules keep a client from steering the table through a backend that repeats what it
//! is sent (a search page, a redirect that keeps the query):
//! - an id the request itself named ([`Told::mentions`]) and not already pinned to this
//!   backend is never pinned from the reply's page or `Location`, only by a `Set-Cookie` of
//!   it, the backend's explicit word; on every routing path, the affinity cookie's included;
//! - a reply never moves a session pinned to another backend still in the pool
//!   ([`AffinityTable::learn`](crate::core::affinity::AffinityTable::learn)): only the
//!   routing does, when it redispatches a session its backend can no longer serve.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{LOCATION, SET_COOKIE};
use http::{HeaderMap, Uri};

use crate::core::affinity::PinKey;
use crate::core::backend::BackendId;
use crate::core::learn::{LearnSource, PageScanner, id_in_location, id_in_set_cookie, mentions};
use crate::core::pool::{Affinity, Pool, SessionAffinity};
use crate::core::session_id::IdRules;
use crate::tap::{Tap, Tapped};
use crate::upstream::UpBody;

/// Who is learning: the backend that answered, when, what the request told it, and the id a
/// request carried to it on the strength of an affinity cookie (a pin of that id is credited
/// to the cookie).
pub struct Learner {
    /// The backend whose reply this is.
    pub backend: BackendId,
    /// Unix seconds.
    pub now: u32,
    /// The unknown id an affinity cookie routed here, if any. The cookie only routes: the
    /// id is the client's word like any other it sends, so only the backend's `Set-Cookie`
    /// of it pins it (credited to the cookie, which brought it to its backend).
    pub cookie_routed: Option<PinKey>,
    /// What the request told the backend.
    pub told: Told,
}

/// What a request told its backend: its target and header fields as forwarded, and the
/// start of its form body when tidegate read it. An id found there that the reply repeats is
/// the client's word, not the backend's. The fields are the request's own, moved here (no
/// copy); the body beyond the peek is not seen.
pub struct Told {
    uri: Uri,
    headers: HeaderMap,
    form: Option<Bytes>,
}

impl Told {
    /// What a request with this target, these fields and this peeked body start said.
    pub fn new(uri: Uri, headers: HeaderMap, form: Option<Bytes>) -> Self {
        Told { uri, headers, form }
    }

    /// Whether the request named `id` anywhere: as a whole token of its target or of one of
    /// its header fields, or of the form body read, `%XX` escapes decoded.
    pub fn mentions(&self, id: &str, rules: &IdRules) -> bool {
        let id = id.as_bytes();
        self.uri
            .path_and_query()
            .is_some_and(|target| mentions(target.as_str().as_bytes(), id, rules))
            || self
                .headers
                .values()
                .any(|value| mentions(value.as_bytes(), id, rules))
            || self
                .form
                .as_ref()
                .is_some_and(|form| mentions(form, id, rules))
    }
}

impl Learner {
    /// Pins every session a reply head names; returns the last source that taught something.
    pub fn from_head(
        &self,
        pool: &Pool,
        headers: &HeaderMap,
        redirect: bool,
    ) -> Option<LearnSource> {
        let Affinity::Session(session) = &pool.affinity else {
            return None;
        };
        let mut learned = None;
        for value in headers.get_all(SET_COOKIE) {
            if let Ok(v) = value.to_str()
                && let Some(id) = id_in_set_cookie(
                    v,
                    &session.names.cookies,
                    &session.rules,
                    i64::from(self.now),
                )
            {
                learned = self
                    .pin(pool, session, id, LearnSource::SetCookie)
                    .or(learned);
            }
        }
        if redirect
            && let Some(v) = headers.get(LOCATION).and_then(|v| v.to_str().ok())
            && let Some(id) = id_in_location(v, &session.names.param, &session.rules)
        {
            learned = self
                .pin(pool, session, id, LearnSource::Location)
                .or(learned);
        }
        learned
    }

    /// Pins `id` to the backend: the one place a reply teaches the table. `None` when the
    /// reply taught nothing: its backend left the pool, it only repeated an id the request
    /// named, or the id lives on another backend.
    fn pin(
        &self,
        pool: &Pool,
        session: &SessionAffinity,
        id: &str,
        source: LearnSource,
    ) -> Option<LearnSource> {
        let key = PinKey::of(id);
        let set = pool.backends();
        if set.get(self.backend).is_none() {
            // Its backend left the pool while the reply was on its way: the session went
            // with it, and a pin would outlive it.
            tracing::debug!(backend = %self.backend, "reply of a removed backend: not pinned");
            return None;
        }
        let here = session
            .table
            .get(key)
            .is_some_and(|pin| pin.backend == self.backend);
        if !here && source != LearnSource::SetCookie && self.told.mentions(id, &session.rules) {
            tracing::debug!(backend = %self.backend, source = source.as_str(), "reply repeats an id the request named: not pinned");
            return None;
        }
        let outcome = match session.table.learn(key, self.backend, self.now, |owner| {
            set.get(owner).is_some()
        }) {
            Ok(outcome) => outcome,
            Err(owner) => {
                tracing::debug!(backend = %self.backend, %owner, source = source.as_str(), "reply names a session pinned to another backend: not moved");
                return None;
            }
        };
        let source = if self.cookie_routed == Some(key) {
            LearnSource::AffinityCookie
        } else {
            source
        };
        pool.stats.learn(source);
        tracing::debug!(backend = %self.backend, source = source.as_str(), ?outcome, "pin learned");
        Some(source)
    }
}

/// An HTML reply body that pins the first session id found in its links, as it streams.
/// Chunks pass through untouched and without delay.
pub type PageLearner = Tapped<UpBody, PageTap>;

/// Scans the chunks of a page for the session id in its links and pins the first one.
pub struct PageTap {
    scanner: PageScanner,
    pool: Arc<Pool>,
    /// Until the scanner is done (the request's head and form are not kept longer).
    learner: Option<Learner>,
    learned: Option<LearnSource>,
}

impl PageTap {
    /// A tap that scans at most `limit` bytes.
    pub fn new(pool: Arc<Pool>, learner: Learner, limit: usize) -> Self {
        PageTap {
            scanner: PageScanner::new(limit),
            pool,
            learner: Some(learner),
            learned: None,
        }
    }

    /// What the page taught, once it did.
    pub fn learned(&self) -> Option<LearnSource> {
        self.learned
    }
}

impl Tap for PageTap {
    fn data(&mut self, chunk: &Bytes) {
        let (Some(learner), Affinity::Session(session)) = (&self.learner, &self.pool.affinity)
        else {
            return;
        };
        if let Some(id) = self.scanner.feed(chunk, &session.needle, &session.rules) {
            self.learned = learner.pin(&self.pool, session, id, LearnSource::PageBody);
        }
        if self.scanner.is_done() {
            self.learner = None;
        }
    }

    fn end(&mut self) {
        let (Some(learner), Affinity::Session(session)) = (&self.learner, &self.pool.affinity)
        else {
            return;
        };
        if let Some(id) = self.scanner.finish(&session.rules) {
            self.learned = learner.pin(&self.pool, session, id, LearnSource::PageBody);
        }
        self.learner = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::affinity::TableLimits;
    use crate::core::backend::Backend;
    use crate::core::balance::Policy;
    use crate::core::session_id::SessionNames;
    use http::header::COOKIE;
    use http::{HeaderName, HeaderValue};

    /// A session pool over backends `a` and `b`.
    fn pool() -> (Pool, BackendId, BackendId) {
        let session = SessionAffinity::new(
            SessionNames::default(),
            IdRules::default(),
            TableLimits::default(),
            0,
            0,
        );
        let a = Backend::new("a", "127.0.0.1:9001".parse().unwrap(), 1);
        let b = Backend::new("b", "127.0.0.1:9002".parse().unwrap(), 1);
        let ids = (a.id, b.id);
        let pool = Pool::new(
            "app",
            Policy::RoundRobin,
            Affinity::Session(Box::new(session)),
            None,
            vec![a, b],
        );
        (pool, ids.0, ids.1)
    }

    /// A learner for `backend`'s reply to a request for `target` with a `Cookie` header.
    fn learner(backend: BackendId, target: &'static str, cookie: &'static str) -> Learner {
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, HeaderValue::from_static(cookie));
        Learner {
            backend,
            now: 1,
            cookie_routed: None,
            told: Told::new(Uri::from_static(target), headers, None),
        }
    }

    /// A reply head with these fields.
    fn head(fields: &[(HeaderName, &'static str)]) -> HeaderMap {
        fields
            .iter()
            .map(|(name, value)| (name.clone(), HeaderValue::from_static(value)))
            .collect()
    }

    #[test]
    fn a_reply_of_a_removed_backend_pins_nothing() {
        let (pool, a, _) = pool();
        let headers = head(&[(SET_COOKIE, "_s=SESSION1; path=/")]);
        let gone = BackendId::from_name("gone");
        assert_eq!(
            learner(gone, "/app", "").from_head(&pool, &headers, false),
            None
        );
        assert!(pool.table().unwrap().is_empty());
        assert_eq!(pool.table().unwrap().counted_backends(), 0);
        assert_eq!(
            learner(a, "/app", "").from_head(&pool, &headers, false),
            Some(LearnSource::SetCookie)
        );
        assert_eq!(pool.table().unwrap().pins_of(a), 1);
    }

    #[test]
    fn an_id_the_request_named_is_pinned_only_by_a_set_cookie() {
        let (pool, a, _) = pool();
        let table = pool.table().unwrap();
        let location = head(&[(LOCATION, "/app?_s=ECHOED1&_k=x")]);
        // Named in the query, in another field of it (escaped), or in a cookie.
        for (target, cookie) in [
            ("/app?_s=ECHOED1", ""),
            ("/search?q=%3F_s%3DECHOED1", ""),
            ("/app", "theme=dark; _s=ECHOED1"),
        ] {
            let l = learner(a, target, cookie);
            assert_eq!(
                l.from_head(&pool, &location, true),
                None,
                "{target} {cookie}"
            );
            // An affinity cookie that routed it changes nothing.
            let routed = Learner {
                cookie_routed: Some(PinKey::of("ECHOED1")),
                ..learner(a, target, cookie)
            };
            assert_eq!(routed.from_head(&pool, &location, true), None);
        }
        assert!(table.is_empty());
        // Named in the peeked form.
        let l = Learner {
            told: Told::new(
                Uri::from_static("/app"),
                HeaderMap::new(),
                Some(Bytes::from_static(b"a=1&_s=ECHOED1")),
            ),
            ..learner(a, "/app", "")
        };
        assert_eq!(l.from_head(&pool, &location, true), None);
        assert!(table.is_empty());
        // A new id the backend issued is its own word.
        let fresh = head(&[(LOCATION, "/app?_s=FRESH1&_k=x")]);
        assert_eq!(
            learner(a, "/app?_s=ECHOED1", "").from_head(&pool, &fresh, true),
            Some(LearnSource::Location)
        );
        // The backend's Set-Cookie of the named id pins it, credited to the affinity cookie
        // when the cookie routed it.
        let set = head(&[(SET_COOKIE, "_s=ECHOED1; path=/")]);
        let routed = Learner {
            cookie_routed: Some(PinKey::of("ECHOED1")),
            ..learner(a, "/app?_s=ECHOED1", "")
        };
        assert_eq!(
            routed.from_head(&pool, &set, false),
            Some(LearnSource::AffinityCookie)
        );
        assert_eq!(table.get(PinKey::of("ECHOED1")).map(|p| p.backend), Some(a));
        // Pinned here, the named id is refreshed (a redirect after a POST of the session).
        assert_eq!(
            learner(a, "/app?_s=ECHOED1", "").from_head(&pool, &location, true),
            Some(LearnSource::Location)
        );
    }

    #[test]
    fn a_reply_never_moves_a_session_of_another_backend_in_the_pool() {
        let (pool, a, b) = pool();
        let table = pool.table().unwrap();
        let key = PinKey::of("LIVESONA");
        table.pin(key, a, 1);
        for fields in [
            vec![(SET_COOKIE, "_s=LIVESONA")],
            vec![(LOCATION, "/app?_s=LIVESONA")],
        ] {
            let l = learner(b, "/app", "");
            assert_eq!(l.from_head(&pool, &head(&fields), true), None, "{fields:?}");
            assert_eq!(table.get(key).map(|p| p.backend), Some(a), "{fields:?}");
        }
        // Once its backend left the pool, the session is anybody's to name.
        pool.set_backends(pool.backends().all()[1..].to_vec());
        assert!(pool.backends().get(a).is_none());
        let l = learner(b, "/app", "");
        assert_eq!(
            l.from_head(&pool, &head(&[(SET_COOKIE, "_s=LIVESONA")]), false),
            Some(LearnSource::SetCookie)
        );
        assert_eq!(table.get(key).map(|p| p.backend), Some(b));
    }
}
