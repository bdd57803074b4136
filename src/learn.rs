//! Learning pins as a reply passes: from its head (`Set-Cookie`, `Location`) before it is
//! forwarded, and from the first bytes of its HTML body while it streams.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use http::header::{LOCATION, SET_COOKIE};

use crate::core::affinity::PinKey;
use crate::core::backend::BackendId;
use crate::core::learn::{LearnSource, PageScanner, id_in_location, id_in_set_cookie};
use crate::core::pool::{Affinity, Pool, SessionAffinity};
use crate::tap::{Tap, Tapped};
use crate::upstream::UpBody;

/// Who is learning: the backend that answered, when, the id a request carried to it on
/// the strength of an affinity cookie (a pin of that id is credited to the cookie), and an
/// unknown id the request carried on no one's word (which only a `Set-Cookie` pins).
#[derive(Clone, Copy, Debug)]
pub struct Learner {
    /// The backend whose reply this is.
    pub backend: BackendId,
    /// Unix seconds.
    pub now: u32,
    /// The unknown id an affinity cookie routed here, if any.
    pub cookie_routed: Option<PinKey>,
    /// The unknown id the request named without an affinity cookie, if any. A backend that
    /// merely repeats it — a redirect that keeps the query, links that carry it along —
    /// does not make it a session: Seaside answers an unknown id with a new one. Only a
    /// `Set-Cookie` of it, the backend's explicit word, pins it. Otherwise any client could
    /// fill the table with ids of its own through such a backend. (An id that comes with a
    /// genuine affinity cookie is the cookie's to vouch for, and is pinned when the reply
    /// names it.)
    pub carried_unknown: Option<PinKey>,
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
    /// reply only repeated the request's own unknown id.
    fn pin(
        &self,
        pool: &Pool,
        session: &SessionAffinity,
        id: &str,
        source: LearnSource,
    ) -> Option<LearnSource> {
        let key = PinKey::of(id);
        if source != LearnSource::SetCookie && self.carried_unknown == Some(key) {
            tracing::debug!(backend = %self.backend, source = source.as_str(), "reply repeats the request's unknown id: not pinned");
            return None;
        }
        if pool.backends().get(self.backend).is_none() {
            // Its backend left the pool while the reply was on its way: the session went
            // with it, and a pin would outlive it.
            tracing::debug!(backend = %self.backend, "reply of a removed backend: not pinned");
            return None;
        }
        let source = if self.cookie_routed == Some(key) {
            LearnSource::AffinityCookie
        } else {
            source
        };
        let outcome = session.table.pin(key, self.backend, self.now);
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
    learner: Learner,
    learned: Option<LearnSource>,
}

impl PageTap {
    /// A tap that scans at most `limit` bytes.
    pub fn new(pool: Arc<Pool>, learner: Learner, limit: usize) -> Self {
        PageTap {
            scanner: PageScanner::new(limit),
            pool,
            learner,
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
        if self.scanner.is_done() {
            return;
        }
        let Affinity::Session(session) = &self.pool.affinity else {
            return;
        };
        if let Some(id) = self.scanner.feed(chunk, &session.needle, &session.rules) {
            self.learned = self
                .learner
                .pin(&self.pool, session, id, LearnSource::PageBody);
        }
    }

    fn end(&mut self) {
        let Affinity::Session(session) = &self.pool.affinity else {
            return;
        };
        if let Some(id) = self.scanner.finish(&session.rules) {
            self.learned = self
                .learner
                .pin(&self.pool, session, id, LearnSource::PageBody);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::affinity::TableLimits;
    use crate::core::backend::Backend;
    use crate::core::balance::Policy;
    use crate::core::session_id::{IdRules, SessionNames};
    use http::HeaderValue;

    #[test]
    fn a_reply_of_a_removed_backend_pins_nothing() {
        let session = SessionAffinity::new(
            SessionNames::default(),
            IdRules::default(),
            TableLimits::default(),
            0,
            0,
        );
        let backend = Backend::new("here", "127.0.0.1:9001".parse().unwrap(), 1);
        let here = backend.id;
        let pool = Pool::new(
            "app",
            Policy::RoundRobin,
            Affinity::Session(Box::new(session)),
            None,
            vec![backend],
        );
        let mut headers = HeaderMap::new();
        headers.insert(SET_COOKIE, HeaderValue::from_static("_s=SESSION1; path=/"));
        let learner = |backend| Learner {
            backend,
            now: 1,
            cookie_routed: None,
            carried_unknown: None,
        };
        let gone = crate::core::backend::BackendId::from_name("gone");
        assert_eq!(learner(gone).from_head(&pool, &headers, false), None);
        assert!(pool.table().unwrap().is_empty());
        assert_eq!(pool.table().unwrap().counted_backends(), 0);
        assert_eq!(
            learner(here).from_head(&pool, &headers, false),
            Some(LearnSource::SetCookie)
        );
        assert_eq!(pool.table().unwrap().pins_of(here), 1);
    }
}
