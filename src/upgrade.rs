//! Upgrades without downtime: a new tidegate takes over the listening sockets and the pins of
//! the running one, as HAProxy's `-x` and Pingora's graceful upgrade do.
//!
//! The running process listens on its control socket (`control_socket`, a Unix socket only
//! its user may use). A new process started with `--upgrade` connects and asks for a
//! handover; the running one sends every listening socket (`SCM_RIGHTS`: the very sockets,
//! with their accept queues, so no connection is refused) and a snapshot of its pins. The
//! new one starts serving on them and says it is ready; only then does the old one stop
//! accepting and let its requests in flight finish (`shutdown_timeout`). Each pin it makes
//! from the snapshot on goes to the new one as it is made: a session begun at the old process
//! in those seconds (its first page answered there) clicks its next link at the new one. At
//! the end it sends all its pins once more, and exits. A new process that fails to start (a bad config, a
//! bad certificate) closes the connection instead: the old one never stopped serving.
//!
//! `tidegate upgrade` (what an administrator, or the package's postinst, runs) asks the running process to start
//! its own successor — the binary at the path it was started from, with its own arguments
//! and `--upgrade` — and answers with how that went.
//!
//! The wire: text lines, then the pins in the state file's form.
//!
//! ```text
//! new → old   UPGRADE <pid>
//! old → new   TIDEGATE-HANDOVER 1                      (the descriptors ride on this)
//!             LISTENER <kind> <local address> <configured address or path>   (one per socket)
//!             PINS <length>
//!             <length bytes>
//! new → old   READY
//! old → new   LEARNED <length>                         (any number: pins made since the
//!             <length bytes>                            first PINS, a moment after each)
//! old → new   PINS <length>                            (after its drain: all of them)
//!             <length bytes>
//! ```
//!
//! or `REFUSED <why>` instead of the handover. `SPAWN` asks for a successor and is answered
//! `OK <pid>` or `FAILED <why>`.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::sync::watch;

use crate::clock;
use crate::core::affinity::{Pin, PinKey};
use crate::core::launch::ProcessState;
use crate::core::registry::Registry;
use crate::core::snapshot;
use crate::farm::Farm;
use crate::farm::carry::BackendChange;
use crate::notify::Notifier;
use crate::shutdown::Signal;
use crate::store::state_file;

/// The first line of a handover.
const HANDOVER: &str = "TIDEGATE-HANDOVER 1";
/// The most descriptors one handover carries (Linux takes at most 253 in one message).
const MAX_SOCKETS: usize = 250;
/// The longest line either side sends.
const MAX_LINE: u64 = 8192;
/// The largest snapshot of pins accepted (a million pins take about 40 MB).
const MAX_PINS_BYTES: usize = 1 << 30;
/// How long a connection to the control socket may take to say what it wants.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the old process waits for the new one to be serving.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a new process keeps asking while the old one is busy (an image launching).
const BUSY_RETRY_FOR: Duration = Duration::from_secs(30);

/// What a handed-over socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A plain traffic listener.
    Http,
    /// A TLS traffic listener.
    Tls,
    /// An HTTP→HTTPS redirect listener.
    Redirect,
    /// The admin listener.
    Admin,
    /// The control socket itself.
    Control,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Tls => "tls",
            Kind::Redirect => "redirect",
            Kind::Admin => "admin",
            Kind::Control => "control",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "http" => Kind::Http,
            "tls" => Kind::Tls,
            "redirect" => Kind::Redirect,
            "admin" => Kind::Admin,
            "control" => Kind::Control,
            _ => return None,
        })
    }
}

/// A listening socket and what it is: kept by the running process to hand over, received by
/// the new one.
#[derive(Debug)]
struct Socket {
    kind: Kind,
    /// Its bound address (a path for the control socket), for the log.
    local: String,
    /// The address (or path) the configuration asked for: what a new process matches.
    configured: String,
    fd: OwnedFd,
}

/// Why an upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// No control socket is configured.
    #[error(
        "no control socket: set `control_socket` (or `state_file`, beside which it goes by default) or --control-socket"
    )]
    NoControlSocket,
    /// Nothing answers on the control socket.
    #[error(
        "no tidegate answers on {}: {source} (is it running with this control socket? start without --upgrade otherwise)",
        path.display()
    )]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The running process said no.
    #[error("the running tidegate refused: {0}")]
    Refused(String),
    /// The conversation broke off or made no sense.
    #[error("handover from the running tidegate failed: {0}")]
    Protocol(String),
    /// The control socket cannot be set up.
    #[error("control socket {}: {reason}", path.display())]
    Control {
        /// The socket.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn protocol(e: impl std::fmt::Display) -> UpgradeError {
    UpgradeError::Protocol(e.to_string())
}

/// The sockets a new process received, taken one by one as it binds its listeners; what
/// its configuration no longer has is closed when this is dropped.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Mutex<Vec<Socket>>,
}

impl Inherited {
    fn take(&self, kind: Kind, configured: &str) -> Option<OwnedFd> {
        let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        let at = sockets
            .iter()
            .position(|s| s.kind == kind && s.configured == configured)?;
        let socket = sockets.swap_remove(at);
        tracing::info!(kind = kind.as_str(), address = %socket.local, "listening socket taken over");
        Some(socket.fd)
    }

    /// The TCP listener of `kind` the old process had for the configured `address`.
    pub fn tcp(&self, kind: Kind, address: SocketAddr) -> Option<std::net::TcpListener> {
        let listener = std::net::TcpListener::from(self.take(kind, &address.to_string())?);
        match listener.set_nonblocking(true) {
            Ok(()) => Some(listener),
            Err(e) => {
                tracing::warn!(%address, "a socket handed over cannot be used, binding anew: {e}");
                None
            }
        }
    }

    fn control(&self, path: &Path) -> Option<UnixListener> {
        let listener = UnixListener::from(self.take(Kind::Control, &path.to_string_lossy())?);
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    }

    /// Logs the sockets nobody took (listeners the new configuration dropped).
    pub fn log_unused(&self) {
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            tracing::info!(kind = s.kind.as_str(), address = %s.local, "listener not in the new configuration: closed");
        }
    }
}

/// What a new process got from the old one.
pub struct Takeover {
    /// The listening sockets.
    pub inherited: Arc<Inherited>,
    /// The pins, in the state file's form.
    pub pins: Vec<u8>,
    /// What the admin API changed in the running farm.
    pub farm: Vec<BackendChange>,
    conversation: BufReader<UnixStream>,
    path: PathBuf,
}

impl std::fmt::Debug for Takeover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Takeover")
            .field("inherited", &self.inherited)
            .field("pins", &self.pins.len())
            .field("farm", &self.farm.len())
            .field("path", &self.path)
            .finish()
    }
}

/// Asks the tidegate on `path` for its sockets and pins (blocking). While it is busy (an
/// image launching, another upgrade), asks again for a while.
pub fn take_over(path: &Path) -> Result<Takeover, UpgradeError> {
    let started = Instant::now();
    loop {
        match ask(path) {
            Err(UpgradeError::Refused(why))
                if why.starts_with("busy") && started.elapsed() < BUSY_RETRY_FOR =>
            {
                tracing::info!("the running tidegate is {why}; asking again");
                std::thread::sleep(Duration::from_millis(500));
            }
            outcome => return outcome,
        }
    }
}

fn ask(path: &Path) -> Result<Takeover, UpgradeError> {
    let mut stream = UnixStream::connect(path).map_err(|source| UpgradeError::Unreachable {
        path: path.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(READY_TIMEOUT))
        .map_err(protocol)?;
    writeln!(stream, "UPGRADE {}", std::process::id()).map_err(protocol)?;
    // The descriptors come with the first bytes of the answer.
    let mut first = vec![0u8; 64 * 1024];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut first)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(protocol)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    first.truncate(got.bytes);
    let reader = std::io::Cursor::new(first).chain(stream.try_clone().map_err(protocol)?);
    let mut reader = BufReader::new(reader);
    let greeting = read_line(&mut reader)?;
    if let Some(why) = greeting.strip_prefix("REFUSED ") {
        return Err(UpgradeError::Refused(why.to_string()));
    }
    if greeting != HANDOVER {
        return Err(protocol(format!("unexpected answer {greeting:?}")));
    }
    let mut fds = fds.into_iter();
    let mut sockets = Vec::new();
    let mut farm = Vec::new();
    let pins = loop {
        let line = read_line(&mut reader)?;
        if let Some(rest) = line.strip_prefix("LISTENER ") {
            let mut parts = rest.splitn(3, ' ');
            let (Some(kind), Some(local), Some(configured)) = (
                parts.next().and_then(Kind::parse),
                parts.next(),
                parts.next(),
            ) else {
                return Err(protocol(format!("bad listener line {line:?}")));
            };
            let fd = fds
                .next()
                .ok_or_else(|| protocol("fewer sockets than listeners"))?;
            sockets.push(Socket {
                kind,
                local: local.to_string(),
                configured: configured.to_string(),
                fd,
            });
        } else if let Some(length) = line.strip_prefix("FARM ") {
            let bytes = read_pins(&mut reader, length)?;
            farm = serde_json::from_slice(&bytes)
                .map_err(|e| protocol(format!("the farm's changes: {e}")))?;
        } else if let Some(length) = line.strip_prefix("PINS ") {
            break read_pins(&mut reader, length)?;
        } else {
            return Err(protocol(format!("unexpected line {line:?}")));
        }
    };
    // The reader's buffer may hold bytes past the pins: there are none until READY is sent.
    Ok(Takeover {
        inherited: Arc::new(Inherited {
            sockets: Mutex::new(sockets),
        }),
        pins,
        farm,
        conversation: BufReader::new(stream),
        path: path.to_path_buf(),
    })
}

fn read_line(reader: &mut impl BufRead) -> Result<String, UpgradeError> {
    let mut line = String::new();
    reader
        .take(MAX_LINE)
        .read_line(&mut line)
        .map_err(protocol)?;
    if !line.ends_with('\n') {
        return Err(protocol("the other side hung up"));
    }
    line.pop();
    Ok(line)
}

fn read_pins(reader: &mut impl Read, length: &str) -> Result<Vec<u8>, UpgradeError> {
    let length: usize = length
        .parse()
        .ok()
        .filter(|&n| n <= MAX_PINS_BYTES)
        .ok_or_else(|| protocol(format!("bad pins length {length:?}")))?;
    let mut pins = vec![0; length];
    reader.read_exact(&mut pins).map_err(protocol)?;
    Ok(pins)
}

/// Puts pins (in the state file's form) in their pools and logs what came of it.
pub fn merge(registry: &Registry, bytes: &[u8], what: &str) {
    if let Some(counts) = put_back(registry, bytes, what) {
        log_put_back(counts, what);
    }
}

/// Puts pins (in the state file's form) in their pools; what came of it, or `None` (and a
/// warning) when they cannot be read.
fn put_back(registry: &Registry, bytes: &[u8], what: &str) -> Option<state_file::PutBack> {
    match snapshot::decode(bytes) {
        Ok(snapshot) => Some(state_file::put_back(&snapshot, registry, clock::unix_now())),
        Err(e) => {
            tracing::warn!("{what}: unreadable, ignored: {e}");
            None
        }
    }
}

fn log_put_back(counts: state_file::PutBack, what: &str) {
    tracing::info!(
        restored = counts.restored,
        expired = counts.dropped[0],
        of_backends_gone = counts.dropped[1],
        of_pools_gone = counts.dropped[2],
        over_max_pins = counts.dropped[3],
        "{what}"
    );
}

impl Takeover {
    /// Tells the old process this one serves: it stops accepting and finishes its requests.
    /// The pins it makes meanwhile arrive as it makes them, and all of them once more when it
    /// is done; each is added to `registry` (a pin made here since wins).
    pub fn serving(self, registry: Arc<Registry>) -> Result<Predecessor, UpgradeError> {
        self.inherited.log_unused();
        let mut conversation = self.conversation;
        conversation
            .get_mut()
            .write_all(b"READY\n")
            .map_err(protocol)?;
        tracing::info!(control = %self.path.display(), "serving: the previous tidegate stops accepting and finishes its requests");
        // Dropped when the thread ends: the previous tidegate sent its last pins (it exits
        // then) or hung up.
        let (finished, finishing) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("upgrade-pins".into())
            .spawn(move || {
                let _finished = finished;
                // No bound: the old process takes up to its shutdown_timeout.
                let _ = conversation.get_ref().set_read_timeout(None);
                let what = "pins the previous tidegate learned while it finished";
                let mut counts = state_file::PutBack::default();
                let outcome = loop {
                    let line = match read_line(&mut conversation) {
                        Ok(line) => line,
                        Err(e) => break Err(e),
                    };
                    let (length, last) = if let Some(length) = line.strip_prefix("LEARNED ") {
                        (length, false)
                    } else if let Some(length) = line.strip_prefix("PINS ") {
                        (length, true)
                    } else {
                        break Err(protocol(format!("unexpected line {line:?}")));
                    };
                    match read_pins(&mut conversation, length) {
                        Ok(pins) => {
                            if let Some(more) = put_back(&registry, &pins, what) {
                                counts += more;
                            }
                        }
                        Err(e) => break Err(e),
                    }
                    if last {
                        break Ok(());
                    }
                };
                if outcome.is_ok() {
                    // It exits after its last pins: its end of the connection closes then (a
                    // service manager stopping this process kills what is left of the
                    // service once this one exits, so this one outlives it).
                    let _ = conversation
                        .get_ref()
                        .set_read_timeout(Some(Duration::from_secs(2)));
                    let mut rest = [0u8; 64];
                    while matches!(conversation.read(&mut rest), Ok(n) if n > 0) {}
                }
                match outcome {
                    Ok(()) => log_put_back(counts, what),
                    Err(e) => tracing::warn!(
                        restored = counts.restored,
                        "the previous tidegate ended without its last pins (those it made while it finished and did not send at once are lost): {e}"
                    ),
                }
            })
            .map_err(protocol)?;
        Ok(Predecessor(finishing))
    }
}

/// The tidegate this one took over from, while it finishes its requests.
#[derive(Debug)]
pub struct Predecessor(tokio::sync::oneshot::Receiver<()>);

impl Predecessor {
    /// Whether it is done: its last pins came (it exits then), or it hung up.
    pub fn done(&mut self) -> bool {
        !matches!(
            self.0.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        )
    }

    /// Resolves once it is done.
    pub async fn finished(self) {
        let _ = self.0.await;
    }
}

/// The running process's side: the sockets it can hand over, and the successor once one
/// took over.
pub struct Handoff {
    path: PathBuf,
    registry: Arc<Registry>,
    sockets: Mutex<Vec<Socket>>,
    busy: AtomicBool,
    successor: Mutex<Option<(u32, UnixStream)>>,
    /// Sends the successor the pins made since the handover's snapshot, as they are made.
    relay: Mutex<Option<Relay>>,
    /// Who asked for a successor (`SPAWN`), to be told once it serves.
    spawner: Mutex<Option<UnixStream>>,
    handed_over: watch::Sender<bool>,
    /// The program and arguments a successor is started with (`SPAWN`).
    successor_command: Option<(PathBuf, Vec<OsString>)>,
    /// The farm, once built: what its admin API changed goes to the successor.
    farm: std::sync::OnceLock<Arc<Farm>>,
    /// The service manager, told the successor's pid (`MAINPID=`) once it serves.
    notifier: Option<Arc<Notifier>>,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff").field("path", &self.path).finish()
    }
}

impl Handoff {
    /// Binds the control socket at `path` (or takes over the old process's), only for this
    /// user; a stale socket file nobody answers on is replaced. `command` is the program and
    /// arguments a `SPAWN` starts (with `--upgrade` added); `notifier` is told a successor's
    /// pid once it serves.
    pub fn bind(
        path: &Path,
        registry: Arc<Registry>,
        inherited: &Inherited,
        command: Option<(PathBuf, Vec<OsString>)>,
        upgrading: bool,
        notifier: Option<Arc<Notifier>>,
    ) -> Result<(Arc<Handoff>, tokio::net::UnixListener), UpgradeError> {
        let fail = |reason: String| UpgradeError::Control {
            path: path.to_path_buf(),
            reason,
        };
        crate::config::check_control_socket(path).map_err(&fail)?;
        let listener = match inherited.control(path) {
            Some(l) => l,
            None => {
                if path.exists() {
                    if UnixStream::connect(path).is_ok() {
                        return Err(fail(
                            "another tidegate answers on it: stop it, or start this one with --upgrade to take over".into(),
                        ));
                    }
                    std::fs::remove_file(path)
                        .map_err(|e| fail(format!("a stale socket cannot be removed: {e}")))?;
                }
                let listener = UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
                // Whoever connects gets the listening sockets: this user only.
                std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .map_err(|e| fail(e.to_string()))?;
                listener
                    .set_nonblocking(true)
                    .map_err(|e| fail(e.to_string()))?;
                listener
            }
        };
        let fd = listener
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| fail(e.to_string()))?;
        let listener =
            tokio::net::UnixListener::from_std(listener).map_err(|e| fail(e.to_string()))?;
        let handoff = Arc::new(Handoff {
            path: path.to_path_buf(),
            registry,
            sockets: Mutex::new(Vec::new()),
            // A process taking over hands nothing on before it serves.
            busy: AtomicBool::new(upgrading),
            successor: Mutex::new(None),
            relay: Mutex::new(None),
            spawner: Mutex::new(None),
            handed_over: watch::channel(false).0,
            successor_command: command,
            farm: std::sync::OnceLock::new(),
            notifier,
        });
        handoff.keep(
            Kind::Control,
            &path.to_string_lossy(),
            &path.to_string_lossy(),
            fd,
        );
        Ok((handoff, listener))
    }

    /// The farm whose admin API changes a successor takes over.
    pub fn serve_farm(&self, farm: Arc<Farm>) {
        let _ = self.farm.set(farm);
    }

    /// Where the control socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remembers a listening socket to hand over (its own descriptor of the same socket).
    pub fn keep(&self, kind: Kind, configured: &str, local: &str, fd: OwnedFd) {
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Socket {
                kind,
                local: local.to_string(),
                configured: configured.to_string(),
                fd,
            });
    }

    /// Takes upgrades from now on (a process that took over, once it serves).
    pub fn open(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// Resolves once a successor serves.
    pub async fn handed_over(&self) {
        let mut rx = self.handed_over.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// After the drain: sends the successor the pins (those learned while finishing
    /// included). True when there was a successor: the state file and the images are its
    /// business now.
    pub fn finish(&self) -> bool {
        if let Some(relay) = self.relay.lock().unwrap_or_else(|e| e.into_inner()).take() {
            relay.bell.stop();
            let _ = relay.thread.join();
        }
        record_pins(&self.registry, None);
        let Some((pid, mut stream)) = self
            .successor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return false;
        };
        let (pins, count) = state_file::encode(&self.registry);
        let sent = writeln!(stream, "PINS {}", pins.len()).and_then(|()| stream.write_all(&pins));
        match sent {
            Ok(()) => tracing::info!(
                successor = pid,
                pins = count,
                "upgrade done: pins handed over, exiting"
            ),
            Err(e) => tracing::warn!(
                successor = pid,
                "upgrade done, but the last pins could not be handed over: {e}"
            ),
        }
        // Left open until this process ends: the successor waits for it to close before it
        // exits, if it is being stopped, so that this process's last words (its log lines,
        // flushed at the very end) are out before a service manager kills what is left.
        std::mem::forget(stream);
        true
    }

    /// What holds an upgrade up now, if anything: another upgrade, or an image launching (its
    /// process would be lost between the two tidegates).
    fn busy_with(&self) -> Option<String> {
        for pool in self.registry.topology().pools.iter() {
            for b in pool.backends().all() {
                if b.process
                    .as_ref()
                    .is_some_and(|p| p.state() == ProcessState::Launching)
                {
                    return Some(format!(
                        "busy: image {} of pool {} is launching",
                        b.name, pool.name
                    ));
                }
            }
        }
        None
    }
}

/// Serves the control socket until `stop` fires.
pub async fn serve(listener: tokio::net::UnixListener, handoff: Arc<Handoff>, mut stop: Signal) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.wait() => return,
        };
        let handoff = handoff.clone();
        tokio::spawn(async move {
            let stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("control socket: {e}");
                    return;
                }
            };
            let request = {
                let (stream, handoff) = (stream, handoff.clone());
                tokio::task::spawn_blocking(move || request(&handoff, stream)).await
            };
            if let Ok(Some(spawn)) = request {
                spawn_successor(&handoff, spawn).await;
            }
        });
    }
}

/// A `SPAWN` request: the connection to answer on.
struct Spawn(UnixStream);

/// Reads and serves one request (blocking). A `SPAWN` is handed back to be served on the
/// runtime.
fn request(handoff: &Handoff, stream: UnixStream) -> Option<Spawn> {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(REQUEST_TIMEOUT)).is_err()
    {
        return None;
    }
    // The socket file is this user's only; a process of another user that reached it anyway
    // (root excepted) is refused.
    let me = rustix::process::geteuid();
    match rustix::net::sockopt::socket_peercred(&stream) {
        Ok(peer) if peer.uid == me || peer.uid.is_root() => {}
        _ => {
            tracing::warn!("control socket: a process of another user was refused");
            return None;
        }
    }
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let line = read_line(&mut reader).ok()?;
    if let Some(pid) = line.strip_prefix("UPGRADE ") {
        let pid: u32 = pid.parse().unwrap_or(0);
        hand_over(handoff, stream, reader, pid);
        None
    } else if line == "SPAWN" {
        Some(Spawn(stream))
    } else {
        let _ = (&stream).write_all(b"REFUSED unknown request\n");
        None
    }
}

/// Sends the sockets and pins to a new process and waits for it to serve.
fn hand_over(
    handoff: &Handoff,
    mut stream: UnixStream,
    mut reader: BufReader<UnixStream>,
    pid: u32,
) {
    if handoff.busy.swap(true, Ordering::AcqRel) {
        let _ = stream.write_all(b"REFUSED busy: another upgrade is under way\n");
        return;
    }
    if let Some(why) = handoff.busy_with() {
        let _ = writeln!(stream, "REFUSED {why}");
        handoff.busy.store(false, Ordering::Release);
        return;
    }
    tracing::info!(
        successor = pid,
        "upgrade: handing the listening sockets and pins over"
    );
    // Every pin made from the snapshot on is kept for the successor (one made as the
    // snapshot is taken may go twice: the successor keeps the first).
    let bell = Arc::new(Bell::default());
    let ring = bell.clone();
    record_pins(&handoff.registry, Some(Arc::new(move || ring.ring())));
    let outcome = send_sockets(handoff, &mut stream).and_then(|()| {
        stream
            .set_read_timeout(Some(READY_TIMEOUT))
            .map_err(protocol)?;
        let line = read_line(&mut reader)?;
        if line == "READY" {
            Ok(())
        } else {
            Err(protocol(format!("unexpected line {line:?}")))
        }
    });
    match outcome {
        Ok(()) => {
            tracing::info!(
                successor = pid,
                "upgrade: the new tidegate serves; no longer accepting, finishing the requests in flight"
            );
            *handoff.relay.lock().unwrap_or_else(|e| e.into_inner()) =
                Relay::start(handoff.registry.clone(), &stream, bell);
            *handoff.successor.lock().unwrap_or_else(|e| e.into_inner()) = Some((pid, stream));
            // The service manager follows the successor from now on (before `tidegate
            // upgrade` hears of it: what it reports is then true of the service too).
            if let Some(notifier) = handoff.notifier.as_ref().filter(|_| pid != 0) {
                notifier.successor(pid);
            }
            // Told before the shutdown begins: the process may end soon after.
            if let Some(spawner) = handoff
                .spawner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                let _ = (&spawner).write_all(format!("OK {pid}\n").as_bytes());
            }
            handoff.handed_over.send_replace(true);
        }
        Err(e) => {
            record_pins(&handoff.registry, None);
            tracing::warn!(
                successor = pid,
                "upgrade abandoned, still serving: the new tidegate did not start ({e}); its own log says why"
            );
            handoff.busy.store(false, Ordering::Release);
        }
    }
}

/// Starts (`Some(made)`, called after each pin) or stops keeping the pins every pool makes.
fn record_pins(registry: &Registry, made: Option<Arc<dyn Fn() + Send + Sync>>) {
    for pool in registry.topology().pools.iter() {
        if let Some(table) = pool.table() {
            table.record(made.clone());
        }
    }
}

/// The pins kept since the last call, in the state file's form, and how many there are.
fn recorded_pins(registry: &Registry) -> (Vec<u8>, usize) {
    let topology = registry.topology();
    let taken: Vec<(&str, Vec<(PinKey, Pin)>)> = topology
        .pools
        .iter()
        .filter_map(|p| Some((&*p.name, p.table()?.recorded())))
        .filter(|(_, pins)| !pins.is_empty())
        .collect();
    let count = taken.iter().map(|(_, pins)| pins.len()).sum();
    if count == 0 {
        return (Vec::new(), 0);
    }
    let mut encoder = snapshot::Encoder::new(clock::unix_now(), count);
    for (pool, pins) in &taken {
        encoder.pool(pool, |visit| {
            for &(key, pin) in pins {
                visit(key, pin);
            }
        });
    }
    (encoder.finish(), count)
}

/// Rung for every pin made while a successor takes over; wakes the relay.
#[derive(Default)]
struct Bell {
    /// Rung since the relay last looked; told to stop.
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl Bell {
    fn ring(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
        self.changed.notify_one();
    }

    fn stop(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.changed.notify_one();
    }

    /// Waits until it is rung or told to stop; whether told to stop.
    fn wait(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut state = self
            .changed
            .wait_while(state, |(rung, stop)| !*rung && !*stop)
            .unwrap_or_else(|e| e.into_inner());
        state.0 = false;
        state.1
    }
}

/// A thread that sends the successor each pin a moment after it is made (`LEARNED`), until
/// the drain is over. Its first page's links pinned a new session at the old process; the
/// browser's next click, on a new connection, reaches the new one long before the drain
/// ends.
struct Relay {
    bell: Arc<Bell>,
    thread: std::thread::JoinHandle<()>,
}

impl Relay {
    fn start(registry: Arc<Registry>, stream: &UnixStream, bell: Arc<Bell>) -> Option<Relay> {
        let started = stream.try_clone().and_then(|mut out| {
            // A successor that stops reading must not hold this process's exit forever.
            out.set_write_timeout(Some(READY_TIMEOUT))?;
            let rung = bell.clone();
            std::thread::Builder::new()
                .name("upgrade-relay".into())
                .spawn(move || relay(&registry, &mut out, &rung))
        });
        match started {
            Ok(thread) => Some(Relay { bell, thread }),
            Err(e) => {
                tracing::warn!(
                    "upgrade: pins made while finishing go to the new tidegate only at the end: {e}"
                );
                None
            }
        }
    }
}

fn relay(registry: &Registry, out: &mut UnixStream, bell: &Bell) {
    loop {
        let stopping = bell.wait();
        let (pins, count) = recorded_pins(registry);
        if count > 0 {
            let sent = writeln!(out, "LEARNED {}", pins.len()).and_then(|()| out.write_all(&pins));
            if let Err(e) = sent {
                tracing::warn!(
                    "upgrade: pins made while finishing cannot reach the new tidegate now, they go at the end: {e}"
                );
                return;
            }
            tracing::debug!(pins = count, "upgrade: pins made while finishing sent");
        }
        if stopping {
            return;
        }
    }
}

fn send_sockets(handoff: &Handoff, stream: &mut UnixStream) -> Result<(), UpgradeError> {
    let sockets = handoff.sockets.lock().unwrap_or_else(|e| e.into_inner());
    let mut head = format!("{HANDOVER}\n");
    for s in sockets.iter().take(MAX_SOCKETS) {
        head.push_str(&format!(
            "LISTENER {} {} {}\n",
            s.kind.as_str(),
            s.local,
            s.configured
        ));
    }
    let farm = handoff
        .farm
        .get()
        .map(|f| f.api_changes())
        .unwrap_or_default();
    let farm = serde_json::to_vec(&farm).map_err(protocol)?;
    let (pins, count) = state_file::encode(&handoff.registry);
    head.push_str(&format!("FARM {}\n", farm.len()));
    let head_len = head.len();
    head.push_str(&format!("PINS {}\n", pins.len()));
    let fds: Vec<BorrowedFd<'_>> = sockets
        .iter()
        .take(MAX_SOCKETS)
        .map(|s| s.fd.as_fd())
        .collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(protocol("too many sockets for one message"));
    }
    // The descriptors ride on the head up to its FARM line; the farm's changes follow it,
    // then the PINS line and the pins.
    let head = head.as_bytes();
    let sent = rustix::net::sendmsg(
        &*stream,
        &[IoSlice::new(&head[..head_len])],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(protocol)?;
    for part in [&head[sent..head_len], &farm[..], &head[head_len..]] {
        stream.write_all(part).map_err(protocol)?;
    }
    stream.write_all(&pins).map_err(protocol)?;
    tracing::info!(
        sockets = fds.len(),
        pins = count,
        "upgrade: sockets and pins sent"
    );
    Ok(())
}

/// Starts the successor (`SPAWN`). The requester is answered `OK <pid>` by the handover
/// once the successor serves, or `FAILED <why>` here if it exits first or takes too long.
async fn spawn_successor(handoff: &Arc<Handoff>, Spawn(stream): Spawn) {
    let answer = |stream: UnixStream, why: String| {
        let _ = (&stream).write_all(format!("FAILED {why}\n").as_bytes());
    };
    if handoff.busy.load(Ordering::Acquire) {
        answer(stream, "busy: an upgrade is under way".into());
        return;
    }
    let Some((program, args)) = &handoff.successor_command else {
        answer(
            stream,
            "this tidegate cannot start its successor: start the new one with --upgrade".into(),
        );
        return;
    };
    // Started in the background of a shell that exits at once, so that the successor is not
    // this process's child: it is handed to the init process (under systemd, PID 1), which
    // reaps it. As this process's child, systemd (told its pid with `MAINPID=`) could not
    // wait for it: a stop killed it outright, and a death while this process finished its
    // requests went unseen. Its output goes where this process's log goes.
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(r#""$0" "$@" </dev/null >&2 & echo $!"#)
        .arg(program)
        .args(args.iter().filter(|a| a.as_os_str() != "--upgrade"))
        .arg("--upgrade")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    // Kept before the start: the successor may take over before the shell is even reaped,
    // and the handover answers the requester.
    *handoff.spawner.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
    let failed = |why: String| {
        if let Some(stream) = handoff
            .spawner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            answer(stream, why);
        }
    };
    // Not `output()`, which would pipe standard error too: the successor would log into a
    // pipe nobody reads, and the shell's output would end only when the successor does.
    let shell = command.spawn();
    let started = match shell {
        Ok(shell) => match shell.wait_with_output().await {
            Ok(out) if out.status.success() => {
                String::from_utf8_lossy(&out.stdout).trim().parse().ok()
            }
            _ => None,
        },
        Err(e) => {
            failed(format!(
                "cannot start {} through /bin/sh: {e}",
                program.display()
            ));
            return;
        }
    };
    let Some(pid) = started else {
        failed(format!("cannot start {}", program.display()));
        return;
    };
    tracing::info!(successor = pid, program = %program.display(), "upgrade: successor started");
    let failure = tokio::select! {
        () = exited(pid) => format!("the new tidegate (pid {pid}) exited before it served; its log says why"),
        () = handoff.handed_over() => return,
        () = tokio::time::sleep(READY_TIMEOUT + REQUEST_TIMEOUT) => {
            format!("the new tidegate (pid {pid}) did not take over in time")
        }
    };
    tracing::warn!(successor = pid, "upgrade failed, still serving: {failure}");
    failed(failure);
}

/// Resolves once process `pid`, which is not a child of this one, has exited: it is gone
/// from `/proc`, or a zombie there (its parent has not reaped it yet). Looked at every 100 ms
/// (without `/proc`, whether a signal could reach it).
async fn exited(pid: u32) {
    let Some(target) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let proc = std::path::Path::new("/proc/self").exists();
    loop {
        let alive = if proc {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // `pid (comm) S ...`: the state follows the last `)`.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z'))
            })
        } else {
            rustix::process::test_kill_process(target).is_ok()
        };
        if !alive {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `tidegate upgrade`: asks the tidegate on `path` to start its successor; its answer.
pub fn request_successor(path: &Path) -> Result<u32, UpgradeError> {
    let mut stream = UnixStream::connect(path).map_err(|source| UpgradeError::Unreachable {
        path: path.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(READY_TIMEOUT + REQUEST_TIMEOUT * 2))
        .map_err(protocol)?;
    stream.write_all(b"SPAWN\n").map_err(protocol)?;
    let line = read_line(&mut BufReader::new(stream))?;
    if let Some(pid) = line.strip_prefix("OK ") {
        return Ok(pid.parse().unwrap_or(0));
    }
    Err(UpgradeError::Refused(
        line.strip_prefix("FAILED ")
            .or(line.strip_prefix("REFUSED "))
            .unwrap_or(&line)
            .to_string(),
    ))
}
