//! A launchable backend's process (an image tidegate starts on demand) as a state machine —
//! stopped → launching → running → stopping → stopped — with the command line it is started
//! with, the back-off after a failed launch, and the idle clock that stops it again. The
//! launcher (`farm::launch`) does the I/O; every decision about when is taken here, with the
//! time passed in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::core::stats::{Histogram, LAUNCH_BUCKETS};

/// Where a launchable backend's process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ProcessState {
    /// Not running: the next request routed to it launches it.
    Stopped = 0,
    /// Started, its port not open yet: requests wait for it.
    Launching = 1,
    /// Its port accepted (launched by tidegate, or found running and adopted).
    Running = 2,
    /// Told to stop (idle, removed, or tidegate exiting): requests wait, then launch it anew.
    Stopping = 3,
}

impl ProcessState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => ProcessState::Launching,
            2 => ProcessState::Running,
            3 => ProcessState::Stopping,
            _ => ProcessState::Stopped,
        }
    }

    /// A short stable label for the API, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessState::Stopped => "stopped",
            ProcessState::Launching => "launching",
            ProcessState::Running => "running",
            ProcessState::Stopping => "stopping",
        }
    }

    /// Every value, in label order.
    pub const ALL: [ProcessState; 4] = [
        ProcessState::Stopped,
        ProcessState::Launching,
        ProcessState::Running,
        ProcessState::Stopping,
    ];
}

/// How a launchable backend is started and stopped (`launch` and its keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchSpec {
    /// The command as an argv list, with `{port}`, `{host}` and `{name}` still in it.
    pub argv: Vec<String>,
    /// Its working directory (default: tidegate's).
    pub dir: Option<PathBuf>,
    /// Variables added to its environment.
    pub env: Vec<(String, String)>,
    /// The file its stdout and stderr are appended to (placeholders expanded).
    pub log: PathBuf,
    /// Time its port has to accept.
    pub timeout: Duration,
    /// Time with no pin and nothing in flight before it is stopped; `None`: never.
    pub idle_stop: Option<Duration>,
    /// Time between SIGTERM and SIGKILL.
    pub stop_timeout: Duration,
    /// Time after a failed launch before another is tried.
    pub backoff: Duration,
    /// Whether tidegate stops it when tidegate itself stops.
    pub stop_on_exit: bool,
    /// Requests one launch may hold (`queue_max`).
    pub hold_max: usize,
}

/// The placeholders a launch argument may hold.
pub const PLACEHOLDERS: [&str; 3] = ["{port}", "{host}", "{name}"];

impl LaunchSpec {
    /// The command line for the backend `name` at `address`.
    pub fn command_line(&self, name: &str, address: SocketAddr) -> Vec<String> {
        self.argv.iter().map(|a| expand(a, name, address)).collect()
    }
}

/// `arg` with `{port}`, `{host}` and `{name}` replaced, and `{{` and `}}` written as `{`
/// and `}` (a Smalltalk brace array in an argument).
pub fn expand(arg: &str, name: &str, address: SocketAddr) -> String {
    if !arg.contains(['{', '}']) {
        return arg.to_string();
    }
    let mut out = String::with_capacity(arg.len() + 16);
    let mut rest = arg;
    while let Some(at) = rest.find(['{', '}']) {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let (text, len) = if after.starts_with("{{") || after.starts_with("}}") {
            (after[..1].to_string(), 2)
        } else if after.starts_with("{port}") {
            (address.port().to_string(), 6)
        } else if after.starts_with("{host}") {
            (address.ip().to_string(), 6)
        } else if after.starts_with("{name}") {
            (name.to_string(), 6)
        } else {
            // A lone `}`, or a `{` that `check_placeholders` refuses: kept as written.
            (after[..1].to_string(), 1)
        };
        out.push_str(&text);
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Refuses a `{…}` in `arg` that is not a known placeholder (a typo would reach the image
/// as it is); `{{` stands for a `{`.
pub fn check_placeholders(arg: &str) -> Result<(), String> {
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let after = &rest[open..];
        if let Some(skip) = after.strip_prefix("{{") {
            rest = skip;
            continue;
        }
        match PLACEHOLDERS.iter().find(|p| after.starts_with(**p)) {
            Some(p) => rest = &after[p.len()..],
            None => {
                let shown: String = after.chars().take_while(|&c| c != '}').collect();
                return Err(format!(
                    "unknown placeholder {shown}}} in {arg:?}; known: {} (write {{{{ and }}}} for {{ and }})",
                    PLACEHOLDERS.join(" ")
                ));
            }
        }
    }
    Ok(())
}

/// Why a launch failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchFailure {
    /// The program could not be started at all.
    Spawn,
    /// It exited before its port accepted.
    Exited,
    /// Its port did not accept within `launch_timeout`.
    Timeout,
}

impl LaunchFailure {
    /// A short stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LaunchFailure::Spawn => "spawn",
            LaunchFailure::Exited => "exited",
            LaunchFailure::Timeout => "timeout",
        }
    }

    /// What a client refused for it is told: no path, status or output of the farm.
    pub fn told(self) -> &'static str {
        match self {
            LaunchFailure::Spawn => "its program could not be run",
            LaunchFailure::Exited => "it exited before its port opened",
            LaunchFailure::Timeout => "its port did not open in time",
        }
    }

    /// Every value, in label order.
    pub const ALL: [LaunchFailure; 3] = [
        LaunchFailure::Spawn,
        LaunchFailure::Exited,
        LaunchFailure::Timeout,
    ];
}

/// Why a request for a launchable backend was not held until it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldRefusal {
    /// The launch already holds `queue_max` requests.
    Full,
    /// The last launch failed and the back-off has not passed.
    Backoff,
    /// The launch this request waited for failed.
    Failed,
}

impl HoldRefusal {
    /// A short stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldRefusal::Full => "full",
            HoldRefusal::Backoff => "backoff",
            HoldRefusal::Failed => "failed",
        }
    }

    /// Every value, in label order.
    pub const ALL: [HoldRefusal; 3] =
        [HoldRefusal::Full, HoldRefusal::Backoff, HoldRefusal::Failed];
}

/// Counters of one launchable backend's process.
#[derive(Debug)]
pub struct ProcessStats {
    /// Launches started.
    pub launches: AtomicU64,
    /// Launches failed, in [`LaunchFailure::ALL`] order.
    pub failures: [AtomicU64; 3],
    /// Time from a launch's start to its port accepting.
    pub launch_duration: Histogram,
    /// Stops because it was idle for `idle_stop`.
    pub idle_stops: AtomicU64,
    /// Exits tidegate did not ask for.
    pub exits: AtomicU64,
    /// Requests that waited for a launch.
    pub held: AtomicU64,
    /// Requests refused instead of held, in [`HoldRefusal::ALL`] order.
    pub refused: [AtomicU64; 3],
}

impl Default for ProcessStats {
    fn default() -> Self {
        ProcessStats {
            launches: AtomicU64::new(0),
            failures: Default::default(),
            launch_duration: Histogram::with_bounds(&LAUNCH_BUCKETS),
            idle_stops: AtomicU64::new(0),
            exits: AtomicU64::new(0),
            held: AtomicU64::new(0),
            refused: Default::default(),
        }
    }
}

impl ProcessStats {
    /// Counts a launch failure.
    pub fn failed(&self, why: LaunchFailure) {
        self.failures[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused request.
    pub fn refused(&self, why: HoldRefusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// A launchable backend's process: its state, what is known of it, and the notice its
/// waiting requests get when a launch or a stop ends. Shared by the backend (routing reads
/// the state) and the launcher (which changes it).
#[derive(Debug)]
pub struct Process {
    spec: ArcSwap<LaunchSpec>,
    state: AtomicU8,
    /// The process id, 0 when unknown (stopped, or adopted without finding it).
    pid: AtomicU32,
    adopted: AtomicBool,
    /// Its backend left the farm: never launched again, stopped once it runs.
    retired: AtomicBool,
    /// A launch that timed out is still ending its process: no launch until it is gone.
    dying: AtomicBool,
    /// Unix seconds of the last change of state.
    since: AtomicU32,
    /// Unix seconds before which no launch is tried (after a failed one).
    retry_at: AtomicU32,
    /// Unix seconds since which it has had no pin and no request; 0: busy.
    idle_since: AtomicU32,
    /// The backend's reply count when last looked at, to see requests that came and went.
    replies_seen: AtomicU64,
    /// Requests waiting for it now.
    pub holding: AtomicUsize,
    /// Why the last launch failed, for the requests that waited for it.
    last_failure: Mutex<Option<(LaunchFailure, Arc<str>)>>,
    changed: tokio::sync::watch::Sender<u64>,
    /// Counters.
    pub stats: ProcessStats,
}

impl Process {
    /// A stopped process started with `spec`.
    pub fn new(spec: LaunchSpec) -> Self {
        Process {
            spec: ArcSwap::from_pointee(spec),
            state: AtomicU8::new(ProcessState::Stopped as u8),
            pid: AtomicU32::new(0),
            adopted: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            dying: AtomicBool::new(false),
            since: AtomicU32::new(0),
            retry_at: AtomicU32::new(0),
            idle_since: AtomicU32::new(0),
            replies_seen: AtomicU64::new(0),
            holding: AtomicUsize::new(0),
            last_failure: Mutex::new(None),
            changed: tokio::sync::watch::Sender::new(0),
            stats: ProcessStats::default(),
        }
    }

    /// How it is launched now.
    pub fn spec(&self) -> Arc<LaunchSpec> {
        self.spec.load_full()
    }

    /// Changes how it is launched from the next launch on (a reload).
    pub fn set_spec(&self, spec: LaunchSpec) {
        self.spec.store(Arc::new(spec));
    }

    /// Where it is.
    #[inline]
    pub fn state(&self) -> ProcessState {
        ProcessState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Whether its port accepts requests (as far as tidegate knows).
    #[inline]
    pub fn is_running(&self) -> bool {
        self.state() == ProcessState::Running
    }

    /// The process id, if known.
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Relaxed)).filter(|&p| p != 0)
    }

    /// Whether it was found running rather than launched by this tidegate.
    pub fn adopted(&self) -> bool {
        self.adopted.load(Ordering::Relaxed)
    }

    /// Unix seconds of its last change of state.
    pub fn since(&self) -> u32 {
        self.since.load(Ordering::Relaxed)
    }

    /// Whether a launch may start at `now`: it is stopped, no back-off runs, no timed-out
    /// launch's process is still ending, and its backend is still in the farm.
    #[inline]
    pub fn may_launch(&self, now: u32) -> bool {
        self.state() == ProcessState::Stopped
            && now >= self.retry_at.load(Ordering::Relaxed)
            && !self.dying.load(Ordering::Relaxed)
            && !self.retired()
    }

    /// A timed-out launch's process is being ended (`true`), or is gone (`false`).
    pub fn set_dying(&self, dying: bool) {
        self.dying.store(dying, Ordering::Relaxed);
    }

    /// Seconds until the back-off lets a launch be tried again (at least 1).
    pub fn retry_after(&self, now: u32) -> u64 {
        u64::from(self.retry_at.load(Ordering::Relaxed).saturating_sub(now)).max(1)
    }

    /// Why the last launch failed, in full (exit status, timeout, spawn error).
    pub fn last_failure(&self) -> Option<Arc<str>> {
        self.failure().map(|(_, detail)| detail)
    }

    /// What kind of failure the last launch had.
    pub fn last_failure_kind(&self) -> Option<LaunchFailure> {
        self.failure().map(|(kind, _)| kind)
    }

    fn failure(&self) -> Option<(LaunchFailure, Arc<str>)> {
        self.last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A receiver that sees every change of state made after this call.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn move_to(&self, from: ProcessState, to: ProcessState, now: u32) -> bool {
        let moved = self
            .state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if moved {
            self.since.store(now, Ordering::Relaxed);
            self.changed.send_modify(|n| *n += 1);
        }
        moved
    }

    /// Stopped → launching, for exactly one caller, when no back-off runs.
    pub fn begin_launch(&self, now: u32) -> bool {
        self.may_launch(now) && self.move_to(ProcessState::Stopped, ProcessState::Launching, now)
    }

    /// The launched process was started as `pid` (its port not open yet).
    pub fn spawned(&self, pid: Option<u32>) {
        self.pid.store(pid.unwrap_or(0), Ordering::Relaxed);
    }

    /// Launching → running: its port accepted (`pid` of the process started, or found).
    pub fn launched(&self, pid: Option<u32>, adopted: bool, now: u32) {
        self.pid.store(pid.unwrap_or(0), Ordering::Relaxed);
        self.adopted.store(adopted, Ordering::Relaxed);
        self.idle_since.store(0, Ordering::Relaxed);
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.move_to(ProcessState::Launching, ProcessState::Running, now);
    }

    /// Stopped → running: found running at start (its port accepted).
    pub fn adopt(&self, pid: Option<u32>, now: u32) -> bool {
        if self.state() != ProcessState::Stopped {
            return false;
        }
        self.pid.store(pid.unwrap_or(0), Ordering::Relaxed);
        self.adopted.store(true, Ordering::Relaxed);
        self.move_to(ProcessState::Stopped, ProcessState::Running, now)
    }

    /// Launching → stopped without a launch: its backend left the farm before its command
    /// was started.
    pub fn abandon_launch(&self, now: u32) {
        self.move_to(ProcessState::Launching, ProcessState::Stopped, now);
    }

    /// Launching → stopped: the launch failed (`why`, said in full in `detail`); none is
    /// tried again until `retry_at` (unix seconds). The waiting requests are told.
    pub fn launch_failed(&self, why: LaunchFailure, detail: &str, retry_at: u32, now: u32) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some((why, detail.into()));
        self.retry_at.store(retry_at, Ordering::Relaxed);
        self.pid.store(0, Ordering::Relaxed);
        self.move_to(ProcessState::Launching, ProcessState::Stopped, now);
    }

    /// Its backend left the farm: it is never launched again, and stopped as soon as it
    /// runs. Requests waiting for it are woken (they go elsewhere).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Whether it was retired (see [`Process::retire`]).
    pub fn retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Running → stopping, for exactly one caller.
    pub fn begin_stop(&self, now: u32) -> bool {
        self.move_to(ProcessState::Running, ProcessState::Stopping, now)
    }

    /// Running or stopping → stopped: the process is gone. `true` when tidegate had not
    /// asked it to stop (it died).
    pub fn exited(&self, now: u32) -> bool {
        self.pid.store(0, Ordering::Relaxed);
        self.adopted.store(false, Ordering::Relaxed);
        if self.move_to(ProcessState::Stopping, ProcessState::Stopped, now) {
            return false;
        }
        self.move_to(ProcessState::Running, ProcessState::Stopped, now)
    }

    /// Looks at a running process once (each second): `true` when it has had no pin and no
    /// request for `idle_stop` and should be stopped. `replies` is the backend's reply count
    /// (a change means requests came and went since the last look).
    pub fn idle_expired(&self, pins: u64, in_flight: i64, replies: u64, now: u32) -> bool {
        let Some(idle_stop) = self.spec.load().idle_stop else {
            return false;
        };
        let quiet = self.replies_seen.swap(replies, Ordering::Relaxed) == replies;
        if !self.is_running() || pins > 0 || in_flight > 0 || !quiet {
            self.idle_since.store(0, Ordering::Relaxed);
            return false;
        }
        let since = match self.idle_since.load(Ordering::Relaxed) {
            0 => {
                self.idle_since.store(now, Ordering::Relaxed);
                now
            }
            s => s,
        };
        f64::from(now.saturating_sub(since)) >= idle_stop.as_secs_f64().ceil().max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            argv: vec!["/bin/img".into(), "--port".into(), "{port}".into()],
            dir: None,
            env: Vec::new(),
            log: "/tmp/img.log".into(),
            timeout: Duration::from_secs(60),
            idle_stop: Some(Duration::from_secs(10)),
            stop_timeout: Duration::from_secs(10),
            backoff: Duration::from_secs(5),
            stop_on_exit: false,
            hold_max: 1024,
        }
    }

    #[test]
    fn the_command_line_fills_in_the_placeholders() {
        let mut s = spec();
        s.argv.push("--name={name}@{host}".into());
        assert_eq!(
            s.command_line("img3", "127.0.0.1:8083".parse().unwrap()),
            ["/bin/img", "--port", "8083", "--name=img3@127.0.0.1"]
        );
        assert!(check_placeholders("--port={port}{name}").is_ok());
        assert_eq!(
            expand(
                "Server startOn: {port}. {{1. 2}}",
                "x",
                "127.0.0.1:80".parse().unwrap()
            ),
            "Server startOn: 80. {1. 2}"
        );
        assert!(check_placeholders("{{1. 2}}").is_ok());
        let err = check_placeholders("--port={prot}").unwrap_err();
        assert!(err.contains("{prot}"), "{err}");
        assert!(check_placeholders("{").is_err());
    }

    #[test]
    fn one_caller_launches_and_a_failure_backs_off() {
        let p = Process::new(spec());
        assert!(p.begin_launch(100));
        assert!(!p.begin_launch(100), "exactly one launch");
        assert_eq!(p.state(), ProcessState::Launching);
        p.launch_failed(LaunchFailure::Exited, "exited with status 3", 105, 101);
        assert_eq!(p.last_failure_kind(), Some(LaunchFailure::Exited));
        assert_eq!(p.state(), ProcessState::Stopped);
        assert_eq!(p.last_failure().as_deref(), Some("exited with status 3"));
        assert!(!p.may_launch(104) && !p.begin_launch(104));
        assert_eq!(p.retry_after(103), 2);
        assert!(p.begin_launch(105));
        p.launched(Some(42), false, 106);
        assert!(p.is_running() && p.pid() == Some(42) && p.last_failure().is_none());
    }

    #[test]
    fn a_stop_asked_for_is_not_a_death() {
        let p = Process::new(spec());
        assert!(p.adopt(Some(7), 1) && p.adopted());
        assert!(!p.adopt(Some(8), 1), "adopted once");
        assert!(p.begin_stop(2) && !p.begin_stop(2));
        assert!(!p.exited(3), "asked to stop");
        assert!(p.begin_launch(3));
        p.launched(None, false, 4);
        assert!(p.exited(5), "not asked: it died");
        assert_eq!(p.state(), ProcessState::Stopped);
    }

    #[test]
    fn idle_means_no_pin_no_request_for_idle_stop() {
        let p = Process::new(spec());
        assert!(p.begin_launch(0));
        p.launched(None, false, 0);
        assert!(
            !p.idle_expired(0, 0, 5, 100),
            "replies changed since the start"
        );
        assert!(!p.idle_expired(0, 0, 5, 101), "idle from 101");
        assert!(!p.idle_expired(0, 0, 5, 110));
        assert!(p.idle_expired(0, 0, 5, 111));
        assert!(!p.idle_expired(1, 0, 5, 112), "a pin makes it busy");
        assert!(!p.idle_expired(0, 0, 5, 113));
        assert!(!p.idle_expired(0, 1, 5, 130), "a request in flight");
        assert!(!p.idle_expired(0, 0, 6, 131), "a request came and went");
        assert!(!p.idle_expired(0, 0, 6, 132));
        assert!(p.idle_expired(0, 0, 6, 142));
    }

    #[test]
    fn waiters_see_every_change() {
        let p = Process::new(spec());
        let mut rx = p.watch();
        assert!(!rx.has_changed().unwrap());
        assert!(p.begin_launch(0));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        p.launched(None, false, 1);
        assert!(rx.has_changed().unwrap());
    }
}
