//! Under systemd (`Type=notify`): the real binary, given `NOTIFY_SOCKET`, says `READY=1` once
//! its listeners serve, `STOPPING=1` at `SIGTERM`, and after `tidegate upgrade` the old
//! process names its successor (`MAINPID=`), which says nothing of its own until it is the
//! main process. Each datagram's sender is read from its credentials, as systemd reads them
//! to apply `NotifyAccess=main`.

mod support;

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use support::{
    Launch, TOKEN, TempDir, backend_entries, client, free_addr, get, images, run, stderr, stdout,
};
use tidegate::demo::Tracking;

const TEST_LIMIT: Duration = Duration::from_secs(90);

/// The service manager's end: a datagram socket that learns who sent each message.
struct Manager {
    socket: UnixDatagram,
    _dir: TempDir,
    path: String,
}

impl Manager {
    fn new(label: &str) -> Manager {
        let dir = TempDir::new(label);
        let path = dir.arg("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        rustix::net::sockopt::set_socket_passcred(&socket, true).expect("SO_PASSCRED");
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Manager {
            socket,
            _dir: dir,
            path,
        }
    }

    /// The next message and the pid that sent it (blocking, bounded).
    fn next(&self) -> (String, u32) {
        let mut buf = [0u8; 4096];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &self.socket,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::empty(),
        )
        .expect("a notification within 20 s");
        let mut sender = 0;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmCredentials(c) = message {
                sender = c.pid.as_raw_nonzero().get() as u32;
            }
        }
        (
            String::from_utf8_lossy(&buf[..got.bytes]).into_owned(),
            sender,
        )
    }
}

/// The configuration: fixed addresses, a state file (the control socket goes beside it).
fn config(dir: &TempDir, listen: SocketAddr, admin: SocketAddr, backends: &str) -> String {
    format!(
        "listen = [\"{listen}\"]\nadmin = \"{admin}\"\nstate_file = {:?}\nshutdown_timeout = 5\n\
         [[pool]]\nname = \"app\"\n{backends}",
        dir.arg("pins")
    )
}

/// Whether `listen` accepts a connection and serves a page through it.
fn serves(listen: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&listen, Duration::from_secs(2))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET / HTTP/1.1\r\nHost: {listen}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_once_serving_stopping_at_sigterm_and_the_successor_named_after_an_upgrade() {
    tokio::time::timeout(TEST_LIMIT, async {
        let imgs = images(2, Tracking::Links).await;
        let manager = Manager::new("notify");
        let (listen, admin) = (free_addr(), free_addr());
        let launch = Launch::new("notify-old");
        launch.file("admin.token", TOKEN);
        let file = launch.file(
            "tidegate.toml",
            &config(&launch.dir, listen, admin, &backend_entries(&imgs)),
        );
        // The first message is awaited beside the start: whatever the launcher sees, the
        // listener must serve the moment READY=1 arrives.
        let notify_socket = manager.path.clone();
        let waiting = std::thread::spawn(move || {
            let (said, from) = manager.next();
            let served = serves(listen);
            (manager, said, from, served)
        });
        let mut old = launch
            .arg("--config")
            .arg(&file)
            .env("NOTIFY_SOCKET", &notify_socket)
            .listening_on(listen, admin)
            .start()
            .await;
        let (manager, said, from, served) = waiting.join().expect("the receiver");
        assert!(said.starts_with("READY=1\n"), "{said:?}");
        assert!(said.contains("STATUS=serving on 1 listeners"), "{said:?}");
        assert_eq!(from, old.pid(), "READY=1 comes from the process started");
        assert!(served, "the listener serves once READY=1 is sent");

        // An upgrade: the old process, still the main one, names the successor once it
        // serves; the successor says nothing until then.
        let out = run(&["upgrade", "--config", &file]).await;
        let told = stdout(&out);
        assert!(out.status.success(), "{told}{}", stderr(&out));
        let new: u32 = told
            .split("(pid ")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the new pid in {told:?}"));
        let _successor = support::Reaped(new);
        let (said, from) = manager.next();
        assert!(said.starts_with(&format!("MAINPID={new}\n")), "{said:?}");
        assert_eq!(from, old.pid(), "MAINPID= comes from the main process");
        // Not the old process's child: the service manager (PID 1, or whoever reaps orphans)
        // is its parent, so it can wait for it, stop it and see it die.
        let stat = std::fs::read_to_string(format!("/proc/{new}/stat")).expect("its /proc");
        let parent: u32 = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1))
            .and_then(|p| p.parse().ok())
            .expect("a parent pid");
        assert_ne!(
            parent,
            old.pid(),
            "the successor is the old process's child"
        );
        assert!(
            old.exited_within(Duration::from_secs(20)).await.success(),
            "the old process exits 0"
        );
        let r = get(&client(), &format!("http://{listen}/")).await;
        assert_eq!(r.status, http::StatusCode::OK, "the successor serves");

        // The successor is the main process now: it, and nobody else, says STOPPING=1.
        let pid = rustix::process::Pid::from_raw(new as i32).expect("a pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let (said, from) = manager.next();
        assert!(said.starts_with("STOPPING=1\n"), "{said:?}");
        assert_eq!(from, new, "STOPPING=1 comes from the successor");
    })
    .await
    .expect("the test finishes in time");
}
