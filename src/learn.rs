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

/// Who is learning: the backend that answered, when, and the id a request carried to it on
/// the strength of an affinity cookie (a pin of that id is credited to the cookie).
#[derive(Clone, Copy, Debug)]
pub struct Learner {
    /// The backend whose reply this is.
    pub backend: BackendId,
    /// Unix seconds.
    pub now: u32,
    /// The unknown id an affinity cookie routed here, if any.
    pub cookie_routed: Option<PinKey>,
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
                learned = Some(self.pin(pool, session, id, LearnSource::SetCookie));
            }
        }
        if redirect
            && let Some(v) = headers.get(LOCATION).and_then(|v| v.to_str().ok())
            && let Some(id) = id_in_location(v, &session.names.param, &session.rules)
        {
            learned = Some(self.pin(pool, session, id, LearnSource::Location));
        }
        learned
    }

    /// Pins `id` to the backend: the one place a reply teaches the table.
    fn pin(
        &self,
        pool: &Pool,
        session: &SessionAffinity,
        id: &str,
        source: LearnSource,
    ) -> LearnSource {
        let key = PinKey::of(id);
        let source = if self.cookie_routed == Some(key) {
            LearnSource::AffinityCookie
        } else {
            source
        };
        let outcome = session.table.pin(key, self.backend, self.now);
        pool.stats.learn(source);
        tracing::debug!(backend = %self.backend, source = source.as_str(), ?outcome, "pin learned");
        source
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
            self.learned = Some(
                self.learner
                    .pin(&self.pool, session, id, LearnSource::PageBody),
            );
        }
    }

    fn end(&mut self) {
        let Affinity::Session(session) = &self.pool.affinity else {
            return;
        };
        if let Some(id) = self.scanner.finish(&session.rules) {
            self.learned = Some(
                self.learner
                    .pin(&self.pool, session, id, LearnSource::PageBody),
            );
        }
    }
}
