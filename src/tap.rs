//! Watching a body stream past without holding it: a [`Tap`] sees each data chunk (and the
//! end) as the wrapped body yields it; the chunks themselves pass through untouched.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// What watches a body go by.
pub trait Tap {
    /// A data chunk is passing.
    fn data(&mut self, chunk: &Bytes);

    /// The body ended (cleanly): called once, after the last chunk (bodies that know their
    /// length end without a last empty poll, so this does not wait for one).
    fn end(&mut self) {}
}

/// A body with a [`Tap`] on it.
pub struct Tapped<B, T> {
    body: B,
    tap: T,
    ended: bool,
}

impl<B, T> Tapped<B, T> {
    /// Taps `body` with `tap`.
    pub fn new(body: B, tap: T) -> Self {
        Tapped {
            body,
            tap,
            ended: false,
        }
    }

    /// The tap, to read what it saw.
    pub fn tap(&self) -> &T {
        &self.tap
    }

    fn end(&mut self)
    where
        T: Tap,
    {
        if !self.ended {
            self.ended = true;
            self.tap.end();
        }
    }
}

impl<B, T> Body for Tapped<B, T>
where
    B: Body<Data = Bytes> + Unpin,
    T: Tap + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(chunk) = frame.data_ref() {
                    this.tap.data(chunk);
                }
                // hyper stops polling a body once it says it has ended.
                if this.body.is_end_stream() {
                    this.end();
                }
            }
            Poll::Ready(None) => this.end(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
