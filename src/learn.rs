//! Learning pins as a reply passes: from its head (`Set-Cookie`, `Location`) before it is
//! forwarded, and from the first bytes of its HTML body while it streams.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http::header::{LOCATION, SET_COOKIE};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::core::affinity::PinKey;
use crate::core::backend::BackendId;
use crate::core::learn::{LearnSource, PageScanner, id_in_location, id_in_set_cookie};
use crate::core::pool::{Affinity, Pool, SessionAffinity};

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
pub struct PageLearner {
    inner: Incoming,
    scanner: PageScanner,
    pool: Arc<Pool>,
    learner: Learner,
    learned: Option<LearnSource>,
}

impl PageLearner {
    /// Wraps `inner`; scans at most `limit` bytes.
    pub fn new(inner: Incoming, pool: Arc<Pool>, learner: Learner, limit: usize) -> Self {
        PageLearner {
            inner,
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

impl Body for PageLearner {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if this.scanner.is_done() {
            return polled;
        }
        let Some(session) = (match &this.pool.affinity {
            Affinity::Session(s) => Some(s),
            Affinity::ClientIp => None,
        }) else {
            return polled;
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Some(id) = this.scanner.feed(data, &session.needle, &session.rules)
                {
                    this.learned =
                        Some(
                            this.learner
                                .pin(&this.pool, session, id, LearnSource::PageBody),
                        );
                }
            }
            Poll::Ready(None) => {
                if let Some(id) = this.scanner.finish(&session.rules) {
                    this.learned =
                        Some(
                            this.learner
                                .pin(&this.pool, session, id, LearnSource::PageBody),
                        );
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
