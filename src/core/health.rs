//! A backend's health: a consecutive-success/failure counter fed by results (passive ones
//! from the request path, active ones from the prober) and the pool's rise/fall thresholds.
//! It decides nothing about the operator's intent (drain, disable): that is the backend's
//! admin state, kept apart so that a check writing "up" never undoes a drain.

use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::Duration;

/// What the checks say of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Nothing known yet: served as if up.
    Unknown = 0,
    /// Reachable.
    Up = 1,
    /// `fall` failures in a row: no new sessions, pinned ones follow `on_pinned_down`.
    Down = 2,
}

impl Health {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }

    /// A short stable label for the API, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }

    /// Every value, in label order.
    pub const ALL: [Health; 3] = [Health::Unknown, Health::Up, Health::Down];
}

/// How many results in a row change a backend's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Successes in a row that bring a down backend up.
    pub rise: u32,
    /// Failures in a row that take a backend down.
    pub fall: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { rise: 2, fall: 3 }
    }
}

/// A change of health, for the log and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Before.
    pub from: Health,
    /// After.
    pub to: Health,
}

/// The counter. Atomics, because the request path and the prober feed it at once.
///
/// Two kinds of result, counted apart so that neither hides the other: the request path's
/// (passive: a connection refused or not accepted in time is a failure, a new connection
/// accepted a success) and the checks' (active checks, and the probes of a down backend). A
/// busy backend that fails its HTTP check goes down all the same: its traffic resets only
/// the passive failures. Only checks bring a down backend back up (traffic does not reach
/// it). A passive success on a backend that is up with no failure pending costs two relaxed
/// loads.
#[derive(Debug, Default)]
pub struct HealthCounter {
    state: AtomicU8,
    passive_failures: AtomicU32,
    check_failures: AtomicU32,
    check_successes: AtomicU32,
}

impl HealthCounter {
    /// The current health.
    #[inline]
    pub fn get(&self) -> Health {
        Health::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// A connection was accepted: passive failures start over; an unknown backend is up.
    #[inline]
    pub fn connected(&self) -> Option<Transition> {
        if self.passive_failures.load(Ordering::Relaxed) != 0 {
            self.passive_failures.store(0, Ordering::Relaxed);
        }
        match self.get() {
            Health::Unknown => self.move_to(Health::Unknown, Health::Up),
            _ => None,
        }
    }

    /// A parked connection was taken again: it proves nothing about the backend now (the
    /// refusal streak stays), but one that nothing was known of has been reached.
    #[inline]
    pub fn reused(&self) -> Option<Transition> {
        match self.get() {
            Health::Unknown => self.move_to(Health::Unknown, Health::Up),
            _ => None,
        }
    }

    /// A connection was refused or not accepted in time; `fall` in a row take the backend
    /// down.
    pub fn refused(&self, t: Thresholds) -> Option<Transition> {
        let streak = self
            .passive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        self.fall_if(streak, t)
    }

    /// A check passed: an unknown backend is up at once, a down one after `rise` in a row.
    pub fn check_passed(&self, t: Thresholds) -> Option<Transition> {
        self.check_failures.store(0, Ordering::Relaxed);
        let streak = self
            .check_successes
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        match self.get() {
            Health::Up => None,
            Health::Unknown => self.move_to(Health::Unknown, Health::Up),
            Health::Down if streak >= t.rise.max(1) => {
                self.passive_failures.store(0, Ordering::Relaxed);
                self.move_to(Health::Down, Health::Up)
            }
            Health::Down => None,
        }
    }

    /// A check failed; `fall` in a row take the backend down.
    pub fn check_failed(&self, t: Thresholds) -> Option<Transition> {
        self.check_successes.store(0, Ordering::Relaxed);
        let streak = self
            .check_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        self.fall_if(streak, t)
    }

    /// Its process died: down at once, whatever the streaks.
    pub fn force_down(&self) -> Option<Transition> {
        self.clear_streaks();
        let now = self.get();
        (now != Health::Down).then(|| self.move_to(now, Health::Down))?
    }

    /// Its process was (re)launched and its port accepted: up at once, streaks cleared.
    pub fn launched(&self) -> Option<Transition> {
        self.clear_streaks();
        let now = self.get();
        (now != Health::Up).then(|| self.move_to(now, Health::Up))?
    }

    /// Its process was stopped as asked: nothing is known of it until it runs again.
    pub fn forget(&self) {
        self.clear_streaks();
        self.state.store(Health::Unknown as u8, Ordering::Relaxed);
    }

    fn clear_streaks(&self) {
        self.passive_failures.store(0, Ordering::Relaxed);
        self.check_failures.store(0, Ordering::Relaxed);
        self.check_successes.store(0, Ordering::Relaxed);
    }

    fn fall_if(&self, streak: u32, t: Thresholds) -> Option<Transition> {
        let now = self.get();
        if now != Health::Down && streak >= t.fall.max(1) {
            // Coming back takes `rise` passed checks from here.
            self.check_successes.store(0, Ordering::Relaxed);
            self.move_to(now, Health::Down)
        } else {
            None
        }
    }

    /// Only the caller whose exchange succeeds reports the transition, so it is logged and
    /// counted once however many results race.
    fn move_to(&self, from: Health, to: Health) -> Option<Transition> {
        self.state
            .compare_exchange(from as u8, to as u8, Ordering::Relaxed, Ordering::Relaxed)
            .ok()
            .map(|_| Transition { from, to })
    }
}

/// What an active check does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// No active check: results come from traffic alone, and a backend that traffic took
    /// down is probed with TCP connects until it rises again.
    Passive,
    /// A TCP connect.
    Tcp,
    /// `GET path`; the reply passes with `expect_status`, or with any 2xx or 3xx.
    Http {
        /// The path requested.
        path: Box<str>,
        /// The status that passes; `None`: any 2xx or 3xx.
        expect_status: Option<u16>,
    },
}

impl Check {
    /// A short stable label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Check::Passive => "passive",
            Check::Tcp => "tcp",
            Check::Http { .. } => "http",
        }
    }

    /// Whether a reply status passes an HTTP check.
    pub fn passes(&self, status: u16) -> bool {
        match self {
            Check::Http {
                expect_status: Some(s),
                ..
            } => status == *s,
            _ => (200..400).contains(&status),
        }
    }
}

/// A pool's health settings (`[pool.health]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    /// The active check.
    pub check: Check,
    /// Time between checks of one backend.
    pub interval: Duration,
    /// Time one check may take.
    pub timeout: Duration,
    /// Rise and fall.
    pub thresholds: Thresholds,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            check: Check::Passive,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            thresholds: Thresholds::default(),
        }
    }
}

impl HealthPolicy {
    /// Whether a backend in `health` is due for a check: every backend with an active check,
    /// only the down ones with traffic alone (nothing else would bring them back).
    pub fn probes(&self, health: Health) -> bool {
        !matches!(self.check, Check::Passive) || health == Health::Down
    }

    /// What a refused client is told to wait: about the time a recovery takes to be seen.
    pub fn retry_after(&self) -> u64 {
        (self.interval.as_secs() * u64::from(self.thresholds.rise.max(1))).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds { rise: 2, fall: 3 };
    const DOWN: Option<Transition> = Some(Transition {
        from: Health::Up,
        to: Health::Down,
    });

    #[test]
    fn unknown_rises_on_first_success_and_falls_after_fall_refusals() {
        let h = HealthCounter::default();
        assert_eq!(h.get(), Health::Unknown);
        assert_eq!(
            h.connected(),
            Some(Transition {
                from: Health::Unknown,
                to: Health::Up
            })
        );
        assert_eq!(h.refused(T), None);
        assert_eq!(h.refused(T), None);
        assert_eq!(h.refused(T), DOWN);
        assert_eq!(h.refused(T), None, "a transition is reported once");
        assert_eq!(h.get(), Health::Down);
    }

    #[test]
    fn a_connection_resets_the_refusal_streak() {
        let h = HealthCounter::default();
        h.connected();
        h.refused(T);
        h.refused(T);
        h.connected();
        h.refused(T);
        h.refused(T);
        assert_eq!(h.get(), Health::Up);
    }

    #[test]
    fn traffic_does_not_hide_failed_checks() {
        let h = HealthCounter::default();
        h.connected();
        assert_eq!(h.check_failed(T), None);
        h.connected();
        assert_eq!(h.check_failed(T), None);
        h.connected();
        assert_eq!(h.check_failed(T), DOWN);
    }

    #[test]
    fn only_rise_passed_checks_in_a_row_bring_a_down_backend_up() {
        let h = HealthCounter::default();
        for _ in 0..3 {
            h.refused(T);
        }
        assert_eq!(h.get(), Health::Down);
        assert_eq!(h.connected(), None, "traffic does not bring it back");
        assert_eq!(h.check_passed(T), None);
        h.check_failed(T);
        assert_eq!(h.check_passed(T), None);
        assert_eq!(
            h.check_passed(T),
            Some(Transition {
                from: Health::Down,
                to: Health::Up
            })
        );
        assert_eq!(
            h.refused(T),
            None,
            "the refusals before it went down are forgotten"
        );
    }

    #[test]
    fn http_checks_pass_by_status() {
        let any = Check::Http {
            path: "/".into(),
            expect_status: None,
        };
        assert!(any.passes(204) && any.passes(302) && !any.passes(500));
        let exact = Check::Http {
            path: "/".into(),
            expect_status: Some(418),
        };
        assert!(exact.passes(418) && !exact.passes(200));
    }

    #[test]
    fn passive_pools_probe_only_down_backends() {
        let p = HealthPolicy::default();
        assert!(p.probes(Health::Down) && !p.probes(Health::Up));
        let active = HealthPolicy {
            check: Check::Tcp,
            ..HealthPolicy::default()
        };
        assert!(active.probes(Health::Up));
        assert_eq!(p.retry_after(), 4);
    }
}
