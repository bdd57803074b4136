//! Time on the request path: unix seconds, the unit pins are stamped in; and the timer of
//! a stream that must keep moving.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::{Instant, Sleep};

/// Seconds since the unix epoch, saturating into `u32` (good until 2106).
pub fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// How long a stream may go without moving (a backend sending a reply body, a client reading
/// one). The timer is allocated the first time the stream has to wait, so one that never
/// waits never has one, and it restarts from each bit of progress.
pub struct Inactivity {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// Progress since the timer was last armed.
    moved: bool,
}

impl Inactivity {
    /// A stream allowed `limit` without progress.
    pub fn new(limit: Duration) -> Self {
        Inactivity {
            limit,
            timer: None,
            moved: false,
        }
    }

    /// The stream moved.
    #[inline]
    pub fn moved(&mut self) {
        self.moved = true;
    }

    /// The stream has to wait: ready once it has not moved for the limit.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let limit = self.limit;
        let moved = std::mem::take(&mut self.moved);
        let timer = match &mut self.timer {
            Some(timer) => {
                if moved {
                    timer.as_mut().reset(Instant::now() + limit);
                }
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(limit))),
        };
        timer.as_mut().poll(cx)
    }
}
