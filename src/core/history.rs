//! The last quarter hour of a pool, for the status page's charts: a fixed ring of samples
//! (requests per second, pins, 5xx per second) taken from running totals. No allocation
//! after the first fill, no extra service.

use std::collections::VecDeque;

/// Seconds between samples.
pub const STEP: u64 = 5;
/// Samples kept: 15 minutes.
pub const SAMPLES: usize = (15 * 60 / STEP) as usize;

/// One point of a chart.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Unix seconds.
    pub at: u64,
    /// Requests per second since the previous sample.
    pub requests_per_second: f64,
    /// Pins held.
    pub pins: u64,
    /// 5xx replies per second since the previous sample.
    pub errors_per_second: f64,
}

/// The ring.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    last: Option<(u64, u64, u64)>,
}

impl History {
    /// Records the running totals at `now`, if a step has passed since the last sample
    /// (the first call only sets the baseline). Totals that went down (they never should)
    /// count as no traffic.
    pub fn record(&mut self, now: u64, requests: u64, errors: u64, pins: u64) {
        if let Some((at, r, e)) = self.last {
            if now < at + STEP {
                return;
            }
            let secs = (now - at) as f64;
            if self.samples.len() == SAMPLES {
                self.samples.pop_front();
            }
            self.samples.push_back(Sample {
                at: now,
                requests_per_second: requests.saturating_sub(r) as f64 / secs,
                pins,
                errors_per_second: errors.saturating_sub(e) as f64 / secs,
            });
        }
        self.last = Some((now, requests, errors));
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_differences_and_the_ring_is_bounded() {
        let mut h = History::default();
        h.record(100, 0, 0, 0);
        h.record(103, 40, 0, 0);
        h.record(105, 50, 5, 3);
        let s: Vec<_> = h.samples().copied().collect();
        assert_eq!(
            s,
            [Sample {
                at: 105,
                requests_per_second: 10.0,
                pins: 3,
                errors_per_second: 1.0
            }]
        );
        for i in 0..1000 {
            h.record(110 + i * STEP, 50 + i, 5, 3);
        }
        assert_eq!(h.samples().count(), SAMPLES);
        assert_eq!(h.samples().last().unwrap().requests_per_second, 0.2);
    }
}
