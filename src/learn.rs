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

/// Pins every session a reply head names to `backend`; returns the last source that taught
/// something.
pub fn from_head(
    session: &SessionAffinity,
    headers: &HeaderMap,
    redirect: bool,
    backend: BackendId,
    now: u32,
) -> Option<LearnSource> {
    let mut learned = None;
    for value in headers.get_all(SET_COOKIE) {
        if let Ok(v) = value.to_str()
            && let Some(id) = id_in_set_cookie(v, &session.names.cookies, &session.rules, i64::from(now))
        {
            pin(session, id, backend, now, LearnSource::SetCookie);
            learned = Some(LearnSource::SetCookie);
        }
    }
    if redirect
        && let Some(v) = headers.get(LOCATION).and_then(|v| v.to_str().ok())
        && let Some(id) = id_in_location(v, &session.names.param, &session.rules)
    {
        pin(session, id, backend, now, LearnSource::Location);
        learned = Some(LearnSource::Location);
    }
    learned
}

/// Pins `id` to `backend`: the one place a reply teaches the table.
fn pin(session: &SessionAffinity, id: &str, backend: BackendId, now: u32, source: LearnSource) {
    let outcome = session.table.pin(PinKey::of(id), backend, now);
    tracing::debug!(%backend, source = source.as_str(), ?outcome, "pin learned");
}

/// An HTML reply body that pins the first session id found in its links, as it streams.
/// Chunks pass through untouched and without delay.
pub struct PageLearner {
    inner: Incoming,
    scanner: PageScanner,
    pool: Arc<Pool>,
    backend: BackendId,
    now: u32,
}

impl PageLearner {
    /// Wraps `inner`; scans at most `limit` bytes.
    pub fn new(inner: Incoming, pool: Arc<Pool>, backend: BackendId, limit: usize, now: u32) -> Self {
        PageLearner {
            inner,
            scanner: PageScanner::new(limit),
            pool,
            backend,
            now,
        }
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
                    pin(session, id, this.backend, this.now, LearnSource::PageBody);
                }
            }
            Poll::Ready(None) => {
                if let Some(id) = this.scanner.finish(&session.rules) {
                    pin(session, id, this.backend, this.now, LearnSource::PageBody);
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
