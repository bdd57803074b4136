//! The launcher: the images tidegate starts on demand. A request for a backend whose process
//! is not running launches it (once, however many requests arrive meanwhile) and waits for
//! its port to accept; a launched process that dies is reaped and its backend marked down;
//! one idle for `idle_stop` is stopped; one found listening at start is adopted rather than
//! started twice. When is decided by `core::launch`; this is the I/O: child processes,
//! signals, ports and log files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::clock;
use crate::core::backend::Backend;
use crate::core::launch::{HoldRefusal, LaunchFailure, LaunchSpec, Process, ProcessState};
use crate::core::pool::Pool;
use crate::core::registry::Registry;
use crate::error::ProxyError;
use crate::farm::health::note;

/// Why a request could not be held until its backend's image ran.
pub enum NotReady {
    /// A 503 with `Retry-After`: the launch failed, a back-off after a failed one runs, or
    /// the launch already holds `queue_max` requests.
    Refused(ProxyError),
    /// The backend left the farm: the request is routed again.
    Left,
}

/// Waits until `backend`'s process runs, launching it if it is stopped (see [`NotReady`]
/// for when it does not).
pub async fn ready(
    pool: &Arc<Pool>,
    backend: &Arc<Backend>,
    process: &Arc<Process>,
) -> Result<(), NotReady> {
    let mut changes = process.watch();
    let mut held: Option<Hold<'_>> = None;
    let mut saw_launch = false;
    loop {
        let now = clock::unix_now();
        if process.retired() {
            return Err(NotReady::Left);
        }
        match process.state() {
            ProcessState::Running => return Ok(()),
            ProcessState::Stopped => {
                // The launch this request waited for failed: it is told so, not launched again.
                if saw_launch && process.last_failure().is_some() {
                    return Err(refused(backend, process, HoldRefusal::Failed, now));
                }
                if process.begin_launch(now) {
                    saw_launch = true;
                    backend.health.forget();
                    tokio::spawn(launch(pool.clone(), backend.clone(), process.clone()));
                } else if process.state() == ProcessState::Stopped {
                    // A back-off runs, or a timed-out launch's process is still ending.
                    return Err(refused(backend, process, HoldRefusal::Backoff, now));
                }
                continue;
            }
            ProcessState::Launching => saw_launch = true,
            ProcessState::Stopping => {}
        }
        if held.is_none() {
            held =
                Some(Hold::enter(process).ok_or_else(|| {
                    refused(backend, process, HoldRefusal::Full, clock::unix_now())
                })?);
            process.stats.held.fetch_add(1, Ordering::Relaxed);
            // Looked at again now that it is counted: the change may have come meanwhile.
            continue;
        }
        // The sender lives as long as the process: this ends only with a change.
        let _ = changes.changed().await;
    }
}

/// A request's place among those a launch holds, given back however the wait ends.
struct Hold<'a>(&'a Process);

impl<'a> Hold<'a> {
    fn enter(process: &'a Process) -> Option<Self> {
        let max = process.spec().hold_max;
        if process.holding.fetch_add(1, Ordering::Relaxed) >= max {
            process.holding.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Hold(process))
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.0.holding.fetch_sub(1, Ordering::Relaxed);
    }
}

fn refused(backend: &Backend, process: &Process, why: HoldRefusal, now: u32) -> NotReady {
    process.stats.refused(why);
    NotReady::Refused(ProxyError::NotLaunched {
        backend: backend.name.clone(),
        why,
        reason: match why {
            HoldRefusal::Full => None,
            _ => process.last_failure_kind(),
        },
        retry_after: match why {
            HoldRefusal::Full => process.spec().timeout.as_secs().max(1),
            _ => process.retry_after(now),
        },
    })
}

/// How often a launch looks at the port at most, once the first quick looks found it
/// closed.
const PORT_POLL_MAX: Duration = Duration::from_millis(200);

/// One launch, run as its own task so that no client leaving cancels it: adopts a process
/// already listening, else starts the command and waits for its port, an early exit, or
/// `launch_timeout`.
async fn launch(pool: Arc<Pool>, backend: Arc<Backend>, process: Arc<Process>) {
    let spec = process.spec();
    let address = backend.address;
    if process.retired() {
        // Its backend left the farm since this launch was asked for.
        process.abandon_launch(clock::unix_now());
        return;
    }
    if accepts(address).await {
        // Started by hand, or by a tidegate before this one.
        let pid = listener_of(address).await;
        process.launched(pid, true, clock::unix_now());
        adopted(&pool, &backend, pid);
        if process.retired() {
            stop(&pool.name, &backend, &process, LEFT_WHILE_LAUNCHED);
        }
        return;
    }
    process.stats.launches.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let argv = spec.command_line(&backend.name, address);
    let offset = std::fs::metadata(&spec.log).map_or(0, |m| m.len());
    let mut child = match spawn(&spec, &argv) {
        Ok(child) => child,
        Err(e) => {
            let detail = format!("cannot run {}: {e}", argv[0]);
            return failed(&pool, &backend, &process, LaunchFailure::Spawn, &detail, "");
        }
    };
    let pid = child.id();
    process.spawned(pid);
    tracing::info!(pool = %pool.name, backend = %backend.name, pid, command = ?argv, log = %spec.log.display(), "launching image");
    let deadline = tokio::time::Instant::now() + spec.timeout;
    let mut pause = Duration::from_millis(10);
    let outcome = loop {
        tokio::select! {
            status = child.wait() => break Err((LaunchFailure::Exited, exit_text(status))),
            _ = tokio::time::sleep_until(deadline) => break Err((
                LaunchFailure::Timeout,
                format!("its port did not accept within launch_timeout ({:?})", spec.timeout),
            )),
            _ = tokio::time::sleep(pause) => {
                if accepts(address).await {
                    break Ok(());
                }
                pause = (pause * 2).min(PORT_POLL_MAX);
            }
        }
    };
    match outcome {
        Ok(()) => {
            let took = started.elapsed();
            process.stats.launch_duration.observe(took);
            process.launched(pid, false, clock::unix_now());
            note(
                &pool,
                &backend,
                backend.health.launched(),
                "its process was launched and its port accepted",
            );
            tracing::info!(pool = %pool.name, backend = %backend.name, pid, seconds = format!("{:.2}", took.as_secs_f64()), "image launched: its port accepts");
            if process.retired() {
                stop(&pool.name, &backend, &process, LEFT_WHILE_LAUNCHED);
            }
            tokio::spawn(reap(pool, backend, process, child, offset));
        }
        Err((why, detail)) => {
            // Told to go, then made to: it must not hold its port (or the machine), and no
            // launch is tried (nor its port adopted) until it is gone.
            let timed_out = why == LaunchFailure::Timeout;
            if timed_out {
                process.set_dying(true);
                if let Some(pid) = pid {
                    terminate(pid, true);
                }
            }
            let output = tail(&spec.log, offset);
            failed(&pool, &backend, &process, why, &detail, &output);
            if timed_out {
                let gone = tokio::time::timeout(spec.stop_timeout, child.wait()).await;
                if gone.is_err() {
                    if let Some(pid) = pid {
                        terminate(pid, false);
                    }
                    let _ = tokio::time::timeout(KILL_WAIT, child.wait()).await;
                }
                process.set_dying(false);
            }
        }
    }
}

fn spawn(spec: &LaunchSpec, argv: &[String]) -> std::io::Result<Child> {
    let log = append_to(&spec.log)?;
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        // The admin token is tidegate's, not the image's.
        .env_remove("TIDEGATE_ADMIN_TOKEN")
        // systemd's notifications are tidegate's: an image that speaks sd_notify must not
        // take them for its own.
        .env_remove(crate::notify::NOTIFY_SOCKET)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for tidegate does not reach it, and a stop
        // reaches everything it started.
        .process_group(0)
        // It outlives tidegate unless told otherwise (it holds its users' sessions).
        .kill_on_drop(false);
    if let Some(dir) = &spec.dir {
        command.current_dir(dir);
    }
    command.spawn()
}

/// The image's log file, opened for appending (created readable by its user and group),
/// in a directory no other user may write to (created private if it is missing).
fn append_to(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(dir)?;
        }
        check_log_directory(dir).map_err(std::io::Error::other)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
    options.open(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot open launch_log {}: {e}", path.display()),
        )
    })
}

/// Where images' logs go without `launch_log`: a directory of the user's own in the
/// temporary directory (`tidegate-UID`), created private (0700) at the first launch.
pub fn default_log_directory() -> PathBuf {
    #[cfg(unix)]
    let user = rustix::process::geteuid().as_raw();
    #[cfg(not(unix))]
    let user = 0;
    std::env::temp_dir().join(format!("tidegate-{user}"))
}

/// Refuses a log directory other users may write to: a link planted there would send an
/// image's output (and tidegate's appends) wherever its maker wants. A directory that does
/// not exist yet is accepted (the launch creates it, private).
pub fn check_log_directory(dir: &Path) -> Result<(), String> {
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if meta.mode() & 0o002 != 0 {
            return Err(format!(
                "{} may be written by any user (a link planted there could redirect the log): \
                 choose a directory of tidegate's own",
                dir.display()
            ));
        }
        // Its owner may write there: tidegate's user, or root (who may anyway).
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me && meta.uid() != 0 {
            return Err(format!(
                "{} belongs to another user: choose a directory of tidegate's own",
                dir.display()
            ));
        }
        if meta.uid() != me && meta.mode() & 0o020 != 0 {
            return Err(format!(
                "{} belongs to another user and its group may write to it: choose a directory \
                 of tidegate's own",
                dir.display()
            ));
        }
    }
    Ok(())
}

/// A failed launch: waiting requests answered, counted, logged with what the command wrote.
fn failed(
    pool: &Pool,
    backend: &Backend,
    process: &Process,
    why: LaunchFailure,
    detail: &str,
    output: &str,
) {
    let spec = process.spec();
    let precise = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let retry_at =
        u32::try_from((precise + spec.backoff).as_secs_f64().ceil() as u64).unwrap_or(u32::MAX);
    process.stats.failed(why);
    process.launch_failed(why, detail, retry_at, clock::unix_now());
    note(pool, backend, backend.health.force_down(), detail);
    tracing::error!(
        pool = %pool.name,
        backend = %backend.name,
        reason = why.as_str(),
        output,
        log = %spec.log.display(),
        "launch failed: {detail}; the requests that waited were answered 503; the next launch may be tried in {:?}",
        spec.backoff
    );
}

/// Waits for a launched process to end: a stop asked for, or a death, which marks its
/// backend down so its sessions follow `on_pinned_down`; the next request launches it again.
async fn reap(
    pool: Arc<Pool>,
    backend: Arc<Backend>,
    process: Arc<Process>,
    mut child: Child,
    offset: u64,
) {
    let pid = child.id();
    let status = exit_text(child.wait().await);
    if process.exited(clock::unix_now()) {
        process.stats.exits.fetch_add(1, Ordering::Relaxed);
        let output = tail(&process.spec().log, offset);
        tracing::error!(pool = %pool.name, backend = %backend.name, pid, output, "image exited unexpectedly ({status}); the next request for it launches it again");
        note(
            &pool,
            &backend,
            backend.health.force_down(),
            "its process exited",
        );
    } else {
        backend.health.forget();
        tracing::info!(pool = %pool.name, backend = %backend.name, pid, "image stopped ({status})");
    }
}

fn exit_text(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            _ => format!("ended: {s}"),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

/// At most this much of an image's log is read back for a failure report.
const TAIL_BYTES: u64 = 4096;
/// Lines of it shown.
const TAIL_LINES: usize = 12;

/// The last lines `path` gained past `offset` (what this launch wrote), on one line.
fn tail(path: &Path, offset: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let from = offset.max(len.saturating_sub(TAIL_BYTES));
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(from)).is_err()
        || file.take(TAIL_BYTES).read_to_end(&mut bytes).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join(" | ")
}

/// Whether something accepts connections at `address` now.
async fn accepts(address: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(address)).await,
        Ok(Ok(_))
    )
}

/// Asks a process to stop: SIGTERM (`gently`) or SIGKILL, to its process group when it
/// leads one (as every image tidegate starts does), else to it alone.
/// Never init, nor tidegate itself or its own group (an address of tidegate's own would
/// find it listening).
fn terminate(pid: u32, gently: bool) {
    use rustix::process::{Pid, Signal, getpgid, getpid, kill_process, kill_process_group};
    let Some(p) = Pid::from_raw(pid as i32).filter(|p| p.as_raw_pid() > 1 && *p != getpid()) else {
        return;
    };
    let signal = if gently { Signal::TERM } else { Signal::KILL };
    let _ = match getpgid(Some(p)) {
        Ok(group) if group == p && getpgid(None).ok() != Some(group) => {
            kill_process_group(p, signal)
        }
        _ => kill_process(p, signal),
    };
}

/// Whether the process `pid` still exists.
fn alive(pid: u32) -> bool {
    rustix::process::Pid::from_raw(pid as i32)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// How long a stop waits for a process after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Why an image is stopped by the launch that started it.
const LEFT_WHILE_LAUNCHED: &str = "its backend left the farm while it was launched";

/// Stops a running image (idle, removed, or tidegate exiting): the requests in flight there
/// are given up to `stop_timeout` to end, then SIGTERM, then SIGKILL after `stop_timeout`.
/// Requests that come meanwhile wait and launch it anew (unless it was retired). `None`
/// when it is not running, or was adopted without its process id being found (nothing to
/// signal).
pub fn stop(
    pool: &str,
    backend: &Arc<Backend>,
    process: &Arc<Process>,
    why: &'static str,
) -> Option<tokio::task::JoinHandle<()>> {
    if process.state() != ProcessState::Running {
        return None;
    }
    let Some(pid) = process.pid() else {
        tracing::warn!(pool = %pool, backend = %backend.name, why, "image adopted without finding its process id: tidegate cannot stop it; stop it by hand");
        return None;
    };
    if !process.begin_stop(clock::unix_now()) {
        return None;
    }
    let spec = process.spec();
    tracing::info!(pool = %pool, backend = %backend.name, pid, why, "stopping image");
    let (pool, backend, process) = (pool.to_string(), backend.clone(), process.clone());
    Some(tokio::spawn(async move {
        // Requests routed here before the stop began end first (those waiting for the
        // image to run again are not counted: they wait for this stop).
        let busy = || {
            backend.stats.in_flight.load(Ordering::Relaxed)
                + backend.stats.tunnels.load(Ordering::Relaxed)
                - process.holding.load(Ordering::Relaxed) as i64
                > 0
        };
        let deadline = Instant::now() + spec.stop_timeout;
        while busy() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A child of this tidegate is reaped (and its state changed) by its reaper; an
        // adopted one is watched here.
        let gone = || process.state() != ProcessState::Stopping || !alive(pid);
        terminate(pid, true);
        let deadline = Instant::now() + spec.stop_timeout;
        while !gone() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !gone() {
            tracing::warn!(pool = %pool, backend = %backend.name, pid, "image did not stop within stop_timeout ({:?}): killed", spec.stop_timeout);
            terminate(pid, false);
            // SIGKILL cannot be refused, but a process stuck in the kernel dies late.
            let deadline = Instant::now() + KILL_WAIT;
            while !gone() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if process.adopted() && process.state() == ProcessState::Stopping {
            process.exited(clock::unix_now());
            backend.health.forget();
            tracing::info!(pool = %pool, backend = %backend.name, pid, "image stopped");
        }
    }))
}

/// A backend left the farm (removed through the API, or gone from the file at a reload):
/// its image is never launched again, is stopped if it runs, and is stopped by its launch
/// if it is being launched. Requests waiting for it are routed again.
pub fn retire(pool: &str, backend: &Arc<Backend>, process: &Arc<Process>) {
    process.retire();
    stop(pool, backend, process, "its backend left the farm");
}

/// At start: every launchable backend whose port already accepts is adopted as running
/// (started by a tidegate before this one, which left it running with its sessions).
pub async fn adopt_running(registry: &Registry) {
    let mut probes = tokio::task::JoinSet::new();
    for pool in registry.topology().pools.iter() {
        for backend in pool.backends().all() {
            let Some(process) = backend.process.clone() else {
                continue;
            };
            let (pool, backend) = (pool.clone(), backend.clone());
            probes.spawn(async move {
                if !accepts(backend.address).await {
                    return;
                }
                let pid = listener_of(backend.address).await;
                if process.adopt(pid, clock::unix_now()) {
                    adopted(&pool, &backend, pid);
                }
            });
        }
    }
    while probes.join_next().await.is_some() {}
}

/// The process listening on `address` (see [`listener_pid`]), looked up off the async
/// threads.
async fn listener_of(address: SocketAddr) -> Option<u32> {
    tokio::task::spawn_blocking(move || listener_pid(address))
        .await
        .ok()
        .flatten()
}

/// An image found listening was taken as running: its backend is up, and it is logged; one
/// whose process id was not found cannot be stopped by tidegate, which is said once, here.
fn adopted(pool: &Pool, backend: &Backend, pid: Option<u32>) {
    note(
        pool,
        backend,
        backend.health.launched(),
        "its port was found open",
    );
    let (pool, backend) = (&*pool.name, &*backend.name);
    match pid {
        Some(pid) => {
            tracing::info!(
                pool,
                backend,
                pid,
                "image already running on its port: adopted"
            )
        }
        None => tracing::warn!(
            pool,
            backend,
            "image already running on its port: adopted, but its process was not found \
             (another user's, or no /proc): idle_stop, removal and stop_on_exit cannot stop it"
        ),
    }
}

/// Once a second: stops the images idle for their `idle_stop`, and notices the death of
/// adopted ones (not children of this tidegate, so not reaped by it).
pub fn look_after(pool: &Arc<Pool>) {
    let now = clock::unix_now();
    for backend in pool.backends().all() {
        let Some(process) = &backend.process else {
            continue;
        };
        if !process.is_running() {
            continue;
        }
        if process.adopted() {
            let dead = match process.pid() {
                Some(pid) => !alive(pid),
                // Not found at adoption: it is gone when the checks say so.
                None => backend.health.get() == crate::core::health::Health::Down,
            };
            if dead && process.exited(now) {
                process.stats.exits.fetch_add(1, Ordering::Relaxed);
                tracing::error!(pool = %pool.name, backend = %backend.name, "adopted image is gone; the next request for it launches it again");
                note(
                    pool,
                    backend,
                    backend.health.force_down(),
                    "its process exited",
                );
                continue;
            }
        }
        let pins = pool.table().map_or(0, |t| t.pins_of(backend.id));
        // An open WebSocket keeps its image busy like a request in flight.
        let in_flight = backend.stats.in_flight.load(Ordering::Relaxed)
            + backend.stats.tunnels.load(Ordering::Relaxed);
        let replies = backend.stats.replies_total();
        // One adopted without its process id cannot be stopped (said at its adoption).
        if process.pid().is_some()
            && process.idle_expired(pins, in_flight, replies, now)
            && stop(
                &pool.name,
                backend,
                process,
                "idle: no session and no request for idle_stop",
            )
            .is_some()
        {
            process.stats.idle_stops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// When tidegate stops: the images with `stop_on_exit` are stopped (and waited for); the
/// others keep running with their sessions, for the next tidegate to adopt.
pub async fn on_exit(registry: &Registry) {
    let mut stopping = Vec::new();
    let mut left = 0;
    for pool in registry.topology().pools.iter() {
        for backend in pool.backends().all() {
            let Some(process) = &backend.process else {
                continue;
            };
            let state = process.state();
            if state == ProcessState::Stopped {
                continue;
            }
            if !process.spec().stop_on_exit {
                left += 1;
                continue;
            }
            if state == ProcessState::Running {
                stopping.extend(stop(
                    &pool.name,
                    backend,
                    process,
                    "tidegate is stopping (stop_on_exit)",
                ));
            } else if let Some(pid) = process.pid() {
                // Being launched, or already being stopped: its own task may not get to
                // finish, so it is ended here.
                let spec = process.spec();
                stopping.push(tokio::spawn(async move {
                    terminate(pid, true);
                    let deadline = Instant::now() + spec.stop_timeout;
                    while alive(pid) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if alive(pid) {
                        terminate(pid, false);
                    }
                }));
            }
        }
    }
    if left > 0 {
        tracing::info!(
            "leaving {left} image(s) running with their sessions (stop_on_exit = false): the next tidegate adopts them"
        );
    }
    for handle in stopping {
        let _ = handle.await;
    }
}

/// The process listening on `address`'s port (on its address or on every address), found
/// through `/proc`: the socket's inode in `/proc/net/tcp*`, then the process holding it.
#[cfg(target_os = "linux")]
fn listener_pid(address: SocketAddr) -> Option<u32> {
    listener_pid_any(address).filter(|&pid| pid != std::process::id())
}

#[cfg(target_os = "linux")]
fn listener_pid_any(address: SocketAddr) -> Option<u32> {
    let inode = listening_inode(address)?;
    let wanted = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

#[cfg(not(target_os = "linux"))]
fn listener_pid(_address: SocketAddr) -> Option<u32> {
    None
}

/// The inode of the listening socket for `address` in `/proc/net/tcp` and `tcp6`.
#[cfg(target_os = "linux")]
fn listening_inode(address: SocketAddr) -> Option<u64> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    const LISTEN: &str = "0A";
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != LISTEN {
                continue;
            }
            let Some((ip, port)) = fields[1].split_once(':') else {
                continue;
            };
            if u16::from_str_radix(port, 16).ok() != Some(address.port()) {
                continue;
            }
            // The kernel prints each 32-bit word of the address as a number in its own byte
            // order.
            let words: Option<Vec<u32>> = (0..ip.len() / 8)
                .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok())
                .collect();
            let bytes: Vec<u8> = words?.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let listening: IpAddr = match bytes.len() {
                4 => Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into(),
                16 => {
                    let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
                    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
                }
                _ => continue,
            };
            if listening == address.ip() || listening.is_unspecified() {
                return fields[9].parse().ok();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_is_what_this_launch_wrote() {
        let path = std::env::temp_dir().join(format!("tidegate-tail-{}.log", std::process::id()));
        std::fs::write(&path, "old run\nboom\n").unwrap();
        let offset = "old run\n".len() as u64;
        assert_eq!(tail(&path, offset), "boom");
        let many: String = (0..40).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &many).unwrap();
        let t = tail(&path, 0);
        assert!(t.starts_with("line 28 | ") && t.ends_with("line 39"), "{t}");
        let _ = std::fs::remove_file(&path);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_listener_of_a_port_is_found() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let found = tokio::task::spawn_blocking(move || listener_pid_any(address))
            .await
            .unwrap();
        assert_eq!(found, Some(std::process::id()));
        assert_eq!(listener_pid(address), None, "never tidegate itself");
    }
}
