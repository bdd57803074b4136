//! Wall-clock time for the request path: unix seconds, the unit pins are stamped in.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the unix epoch, saturating into `u32` (good until 2106).
pub fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}
