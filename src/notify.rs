//! Telling the service manager how the process is doing: systemd's `sd_notify` protocol, a
//! few `KEY=value` lines in one datagram to the Unix socket named by `NOTIFY_SOCKET` (a path,
//! or `@name` in the abstract namespace). Under a `Type=notify` unit, `READY=1` is what
//! `systemctl start` waits for; without the variable nothing is sent.
//!
//! What tidegate says, and when:
//!
//! | when | lines |
//! | --- | --- |
//! | every listener is bound and serves (a start without `--upgrade`) | `READY=1`, `STATUS=serving on …` |
//! | a signal stops it | `STOPPING=1`, `STATUS=stopping: finishing the requests in flight` |
//! | a successor started with `--upgrade` serves | `MAINPID=<its pid>`, `STATUS=…` (sent by the old process) |
//!
//! A process started with `--upgrade` sends no `READY=1`: it is not the service's main
//! process (systemd, with `NotifyAccess=main`, would refuse its message), and the service is
//! ready already. The old process, still the main one, names it with `MAINPID=` once it
//! serves; from then on the new one is the main process and says `STOPPING=1` when stopped,
//! or names its own successor in turn. The old one says nothing more.

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

/// The environment variable systemd sets for a `Type=notify` service (and for `NotifyAccess=`).
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where the notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A socket file.
    Path(PathBuf),
    /// A name in Linux's abstract namespace (`@name` in the variable).
    Abstract(Vec<u8>),
}

impl Target {
    /// What a `NOTIFY_SOCKET` value names, or why it cannot be used.
    fn parse(value: &str) -> Result<Target, String> {
        if let Some(name) = value.strip_prefix('@') {
            if name.is_empty() {
                return Err("an abstract socket name is empty".into());
            }
            return Ok(Target::Abstract(name.as_bytes().to_vec()));
        }
        if value.starts_with('/') {
            return Ok(Target::Path(PathBuf::from(value)));
        }
        // systemd also knows vsock addresses (`vsock:CID:PORT`), for virtual machines: not
        // where a gateway's service manager is.
        Err(format!("{value:?} is neither an absolute path nor @name"))
    }
}

/// The service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    target: Target,
    socket: UnixDatagram,
}

impl Notifier {
    /// The socket `NOTIFY_SOCKET` names, or `None` without the variable (not run by a service
    /// manager that listens) or with one that cannot be used (a warning says why).
    pub fn from_env() -> Option<Notifier> {
        let value = std::env::var_os(NOTIFY_SOCKET)?;
        if value.is_empty() {
            return None;
        }
        let Some(value) = value.to_str() else {
            tracing::warn!("{NOTIFY_SOCKET} is not UTF-8: no notifications to the service manager");
            return None;
        };
        match Notifier::to(value) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!("{NOTIFY_SOCKET}: {e}: no notifications to the service manager");
                None
            }
        }
    }

    /// A notifier sending to `value` (a `NOTIFY_SOCKET` value).
    pub fn to(value: &str) -> Result<Notifier, String> {
        let target = Target::parse(value)?;
        let socket = UnixDatagram::unbound().map_err(|e| e.to_string())?;
        // A service manager that does not read its socket must not hold tidegate up.
        socket.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok(Notifier { target, socket })
    }

    /// Sends `lines` (`KEY=value` lines) in one datagram; a failure is logged, never fatal.
    pub fn send(&self, lines: &str) {
        let sent = match &self.target {
            Target::Path(path) => self.socket.send_to(lines.as_bytes(), path),
            Target::Abstract(name) => self.send_abstract(name, lines.as_bytes()),
        };
        match sent {
            Ok(_) => tracing::debug!(
                "told the service manager: {}",
                lines.trim_end().replace('\n', ", ")
            ),
            Err(e) if e.kind() == ErrorKind::WouldBlock => tracing::warn!(
                "the service manager's socket is full, not told: {}",
                lines.trim_end().replace('\n', ", ")
            ),
            Err(e) => tracing::warn!("cannot notify the service manager ({NOTIFY_SOCKET}): {e}"),
        }
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn send_abstract(&self, name: &[u8], data: &[u8]) -> std::io::Result<usize> {
        #[cfg(target_os = "android")]
        use std::os::android::net::SocketAddrExt;
        #[cfg(target_os = "linux")]
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        self.socket.send_to_addr(data, &addr)
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn send_abstract(&self, _name: &[u8], _data: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            ErrorKind::Unsupported,
            "abstract socket names exist on Linux only",
        ))
    }

    /// Every listener serves: `READY=1`.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\n"));
    }

    /// A signal stops the process: `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping: finishing the requests in flight\n");
    }

    /// The successor `pid` serves: it is the service's main process now.
    pub fn successor(&self, pid: u32) {
        self.send(&format!(
            "MAINPID={pid}\nSTATUS=serving (upgraded from process {})\n",
            std::process::id()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_and_an_abstract_name_are_understood() {
        assert_eq!(
            Target::parse("/run/systemd/notify"),
            Ok(Target::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            Target::parse("@/org/freedesktop/systemd1/notify/123"),
            Ok(Target::Abstract(
                b"/org/freedesktop/systemd1/notify/123".to_vec()
            ))
        );
    }

    #[test]
    fn what_cannot_be_a_notify_socket_is_refused() {
        for bad in ["@", "relative/path", "vsock:2:1234", ""] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn lines_reach_a_socket_file_in_one_datagram() {
        let dir = std::env::temp_dir().join(format!("tidegate-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier::to(path.to_str().expect("utf-8")).expect("notifier");
        notifier.ready("serving");
        assert_eq!(receive(&socket), "READY=1\nSTATUS=serving\n");
        notifier.successor(4242);
        assert_eq!(
            receive(&socket),
            format!(
                "MAINPID=4242\nSTATUS=serving (upgraded from process {})\n",
                std::process::id()
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn lines_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tidegate-notify-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind");
        Notifier::to(&format!("@{name}"))
            .expect("notifier")
            .stopping();
        assert!(receive(&socket).starts_with("STOPPING=1\n"));
    }
}
