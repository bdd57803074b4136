//! Test helpers: a farm of Seaside-like images, a balancer in front of it on real sockets,
//! and a small browser that keeps cookies and follows the session links it is given; and the
//! real `tidegate` binary: launched and waited for ([`Launch`], [`Process`]), run to
//! completion ([`run`], [`ctl`]), and its admin API called ([`Process::call`], [`Api`]).
#![allow(dead_code)] // each test binary uses its own subset

pub mod pki;

use std::borrow::Borrow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tidegate::config::Config;
use tidegate::demo::{Image, ImageOptions, Tracking};
use tidegate::server::Running;

/// Images and the balancer in front of them.
pub struct Farm {
    pub images: Vec<Image>,
    pub balancer: Running,
    pub base: String,
}

/// `n` images named image-1.. with the given tracking.
pub async fn images(n: usize, tracking: Tracking) -> Vec<Image> {
    let mut out = Vec::new();
    for i in 1..=n {
        let mut options = ImageOptions::new(&format!("image-{i}"));
        options.tracking = tracking.clone();
        out.push(image(options).await);
    }
    out
}

pub async fn image(options: ImageOptions) -> Image {
    Image::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .expect("image starts")
}

/// The `[[pool.backend]]` entries for these images, each named after itself.
pub fn backend_entries<I: Borrow<Image>>(images: &[I]) -> String {
    images
        .iter()
        .map(|i| {
            let i = i.borrow();
            format!(
                "[[pool.backend]]\nname = \"{}\"\naddress = \"{}\"\n",
                i.name(),
                i.addr
            )
        })
        .collect()
}

/// A balancer on 127.0.0.1:0 with one pool `app` over `images`; `pool_extra` is TOML put in
/// the `[[pool]]` table (before the backends).
pub async fn farm_with(images: Vec<Image>, pool_extra: &str) -> Farm {
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\n[[pool]]\nname = \"app\"\n{pool_extra}\n{}",
        backend_entries(&images)
    );
    let config = Config::from_toml(&text, "test").expect("test config is valid");
    let balancer = tidegate::server::start(&config)
        .await
        .expect("balancer starts");
    let base = format!("http://{}", balancer.addrs()[0]);
    Farm {
        images,
        balancer,
        base,
    }
}

pub async fn farm(n: usize, tracking: Tracking) -> Farm {
    farm_with(images(n, tracking).await, "").await
}

impl Farm {
    pub fn pins(&self) -> usize {
        self.balancer.pool("app").unwrap().table().unwrap().len()
    }

    pub fn addr(&self) -> SocketAddr {
        self.balancer.addrs()[0]
    }
}

/// What came back.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn image(&self) -> String {
        self.header("x-image")
    }

    pub fn counter(&self) -> u64 {
        self.header("x-counter").parse().unwrap_or(0)
    }

    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    /// The first session link of a page: `/app?_s=…&_k=…` with entities decoded.
    pub fn link(&self) -> Option<String> {
        let text = self.text();
        let start = text.find("href=\"")? + 6;
        let end = text[start..].find('"')? + start;
        Some(text[start..end].replace("&amp;", "&"))
    }

    /// The session key named in the page's first link.
    pub fn key(&self) -> Option<String> {
        let link = self.link()?;
        let at = link
            .find("_s=")
            .map(|i| i + 3)
            .or_else(|| link.find("jsessionid=").map(|i| i + 11))?;
        Some(
            link[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                .collect(),
        )
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http()
}

pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends one request; panics if it fails.
pub async fn send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    try_send(client, method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Sends one request; what went wrong, if it did (no reply within 20 s, a connection
/// refused or broken, a body cut short).
pub async fn try_send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Reply, String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .map_err(|_| "no reply within 20 s".to_string())?
        .map_err(|e| format!("request failed: {e:?}"))?;
    let (parts, body) = reply.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

pub async fn get(client: &HttpClient, url: &str) -> Reply {
    send(client, Method::GET, url, &[], Bytes::new()).await
}

/// A browser: keeps cookies (or not) and follows the links and forms it is shown.
pub struct Browser {
    pub client: HttpClient,
    pub base: String,
    pub cookies: Option<HashMap<String, String>>,
    pub current: Option<Reply>,
}

impl Browser {
    pub fn new(base: &str, keep_cookies: bool) -> Self {
        Browser {
            client: client(),
            base: base.to_string(),
            cookies: keep_cookies.then(HashMap::new),
            current: None,
        }
    }

    fn cookie_header(&self) -> Option<String> {
        let jar = self.cookies.as_ref()?;
        if jar.is_empty() {
            return None;
        }
        Some(
            jar.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }

    fn remember(&mut self, reply: &Reply) {
        if let Some(jar) = self.cookies.as_mut() {
            for v in reply.headers.get_all("set-cookie") {
                let v = v.to_str().unwrap();
                let pair = v.split(';').next().unwrap();
                if let Some((k, val)) = pair.split_once('=') {
                    jar.insert(k.trim().to_string(), val.trim().to_string());
                }
            }
        }
    }

    /// Requests `path` (following one redirect, as a browser does after a POST).
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Reply {
        let url = format!("{}{}", self.base, path);
        let cookie = self.cookie_header();
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(c) = &cookie {
            headers.push(("cookie", c));
        }
        if let Some(ct) = content_type {
            headers.push(("content-type", ct));
        }
        let reply = send(&self.client, method, &url, &headers, body).await;
        self.remember(&reply);
        let reply = if reply.status.is_redirection() {
            let location = reply.header("location");
            Box::pin(self.request(Method::GET, &location, None, Vec::new())).await
        } else {
            reply
        };
        self.current = Some(reply.clone());
        reply
    }

    pub async fn open(&mut self, path: &str) -> Reply {
        self.request(Method::GET, path, None, Vec::new()).await
    }

    /// Follows the first link of the current page.
    pub async fn click(&mut self) -> Reply {
        let link = self
            .current
            .as_ref()
            .and_then(Reply::link)
            .expect("page has a link");
        self.open(&link).await
    }

    /// Submits the page's form as `application/x-www-form-urlencoded`.
    pub async fn submit_urlencoded(&mut self) -> Reply {
        let (action, fields) = self.form();
        let body = fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(["comment=hello+world".to_string()])
            .collect::<Vec<_>>()
            .join("&");
        self.request(
            Method::POST,
            &action,
            Some("application/x-www-form-urlencoded"),
            body.into_bytes(),
        )
        .await
    }

    /// Submits the page's form as `multipart/form-data`.
    pub async fn submit_multipart(&mut self) -> Reply {
        let (action, fields) = self.form();
        let boundary = "----tidegateTestBoundary7MA4YWxk";
        let mut body = Vec::new();
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"upload\"; filename=\"a.txt\"\r\n\
Content-Type: text/plain\r\n\r\nsome file content\r\n"
            )
            .as_bytes(),
        );
        for (k, v) in fields {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                )
                .as_bytes(),
            );
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        let ct = format!("multipart/form-data; boundary={boundary}");
        self.request(Method::POST, &action, Some(&ct), body).await
    }

    /// The current page's form: its action and hidden fields.
    fn form(&self) -> (String, Vec<(String, String)>) {
        let text = self.current.as_ref().expect("a page is open").text();
        let form_at = text.find("<form").expect("page has a form");
        let form = &text[form_at..];
        let action_at = form.find("action=\"").unwrap() + 8;
        let action =
            form[action_at..action_at + form[action_at..].find('"').unwrap()].replace("&amp;", "&");
        let mut fields = Vec::new();
        let mut rest = form;
        while let Some(i) = rest.find("<input type=\"hidden\" name=\"") {
            let tail = &rest[i + 27..];
            let name_end = tail.find('"').unwrap();
            let name = tail[..name_end].to_string();
            let value_at = tail.find("value=\"").unwrap() + 7;
            let value_end = tail[value_at..].find('"').unwrap() + value_at;
            fields.push((name, tail[value_at..value_end].to_string()));
            rest = &tail[value_end..];
        }
        (action, fields)
    }
}

/// A body sent one byte a frame (as one-byte HTTP/1 chunks or HTTP/2 DATA frames arrive),
/// or in frames of another size, then optional trailers; its length is unknown, as a chunked
/// body's is. Slicing the data allocates nothing, so what a reader of it holds is its own
/// doing.
pub struct Trickle {
    data: Bytes,
    at: usize,
    frame_len: usize,
    trailers: Option<HeaderMap>,
}

impl Trickle {
    pub fn new(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Trickle {
            data,
            at: 0,
            frame_len: 1,
            trailers,
        }
    }

    /// The same body in frames of `len` bytes.
    pub fn in_frames_of(self, len: usize) -> Self {
        Trickle {
            frame_len: len.max(1),
            ..self
        }
    }
}

impl http_body::Body for Trickle {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let frame = if self.at < self.data.len() {
            let from = self.at;
            self.at = self.data.len().min(from + self.frame_len);
            Some(http_body::Frame::data(self.data.slice(from..self.at)))
        } else {
            self.trailers.take().map(http_body::Frame::trailers)
        };
        std::task::Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.at == self.data.len() && self.trailers.is_none()
    }
}

/// A directory no other test or run shares, removed on drop.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "tidegate-test-{}-{}-{label}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir created");
        TempDir(path)
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.0
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }

    pub fn arg(&self, name: &str) -> String {
        self.path(name)
            .to_str()
            .expect("UTF-8 temp path")
            .to_string()
    }

    /// Replaces `name` whole: written under a temporary name, then renamed over it.
    pub fn write(&self, name: &str, contents: &str) {
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).expect("temp file written");
        std::fs::rename(&tmp, self.path(name)).expect("temp file renamed");
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port free a moment ago on 127.0.0.1.
pub fn free_addr() -> SocketAddr {
    // The kernel may hand the same free port out again once it is let go: a port given out
    // once in this test binary is never given out again (a listener and an admin listener,
    // or a backend launched later and tidegate itself, would collide).
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
}

// --- the real binary ------------------------------------------------------------------------

/// The `tidegate` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tidegate");
/// The most a launched `tidegate` may take to serve on both its listeners.
pub const START_LIMIT: Duration = Duration::from_secs(15);
/// The most a short command (`check`, `ctl`, a refusal to start) may take.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(15);
/// How often a bounded wait looks again.
const POLL: Duration = Duration::from_millis(20);
/// The log of a launched `tidegate`, in its directory.
const LOG: &str = "tidegate.log";
/// The log lines that name the bound addresses (`address=…`).
const LISTEN_LINE: &str = "listening (HTTP/1.1, h2c)";
const ADMIN_LINE: &str = "admin: /metrics";

/// Runs `tidegate <args>` to completion, killed if it outlives [`COMMAND_LIMIT`];
/// `TIDEGATE_ADMIN_TOKEN` and `RUST_LOG` are unset.
pub async fn run(args: &[&str]) -> Output {
    run_with(args, &[]).await
}

/// [`run`] with the variables `env` set.
pub async fn run_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(args)
        .stdin(Stdio::null())
        .env_remove("TIDEGATE_ADMIN_TOKEN")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .kill_on_drop(true);
    tokio::time::timeout(COMMAND_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("tidegate {args:?} did not finish within {COMMAND_LIMIT:?}"))
        .expect("the binary runs")
}

/// Runs `tidegate ctl --admin ADDR <args>` to completion (bounded), with
/// `TIDEGATE_ADMIN_TOKEN` set to `env_token` (or unset).
pub async fn ctl(admin: SocketAddr, args: &[&str], env_token: Option<&str>) -> Output {
    let admin = admin.to_string();
    let args: Vec<&str> = ["ctl", "--admin", admin.as_str()]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    let env: Vec<(&str, &str)> = env_token
        .map(|t| ("TIDEGATE_ADMIN_TOKEN", t))
        .into_iter()
        .collect();
    run_with(&args, &env).await
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts `o` exited with `code`; its stdout.
pub fn exited(o: &Output, code: i32, what: &str) -> String {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// How a [`Process`] is started: the command line, the environment, and a directory of its
/// own for the files it reads (configuration, tokens) and the log it writes (`tidegate.log`).
/// By default `RUST_LOG=info` and `TIDEGATE_ADMIN_TOKEN` is unset.
///
/// The process must open a listener and an admin listener. Their addresses are read from its
/// log unless given up front with [`Launch::listening_on`] (ports fixed in the command line
/// or the file).
pub struct Launch {
    pub dir: TempDir,
    args: Vec<String>,
    /// Applied in order: `Some` sets the variable, `None` unsets it.
    env: Vec<(String, Option<String>)>,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

impl Launch {
    /// No arguments yet.
    pub fn new(label: &str) -> Launch {
        Launch {
            dir: TempDir::new(label),
            args: Vec::new(),
            env: vec![
                ("TIDEGATE_ADMIN_TOKEN".into(), None),
                ("RUST_LOG".into(), Some("info".into())),
            ],
            listen: None,
            admin: None,
        }
    }

    /// The quick-start flags over `backends` (`ADDR` or `NAME=ADDR`), both listeners on
    /// ports the kernel picks.
    pub fn flags(label: &str, backends: &[String]) -> Launch {
        let mut launch =
            Launch::new(label).args(&["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
        for b in backends {
            launch = launch.arg("--backend").arg(b);
        }
        launch
    }

    /// `--config tidegate.toml`, the file holding `text` (whose `listen` and `admin` are
    /// best on port 0, or named with [`Launch::listening_on`]).
    pub fn config(label: &str, text: &str) -> Launch {
        let launch = Launch::new(label);
        let file = launch.file("tidegate.toml", text);
        launch.arg("--config").arg(file)
    }

    pub fn arg(mut self, a: impl Into<String>) -> Launch {
        self.args.push(a.into());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Launch {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Sets `key` (over the defaults).
    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    /// Unsets `key`.
    pub fn env_remove(mut self, key: &str) -> Launch {
        self.env.push((key.into(), None));
        self
    }

    /// Writes `name` in the launch's directory; its path.
    pub fn file(&self, name: &str, contents: &str) -> String {
        self.dir.write(name, contents);
        self.dir.arg(name)
    }

    /// Writes `token` to the file `token` and starts with `--admin-token-file` naming it.
    pub fn with_token_flag(self, token: &str) -> Launch {
        let file = self.file("token", token);
        self.arg("--admin-token-file").arg(file)
    }

    /// The addresses the process will listen on, known before it starts.
    pub fn listening_on(mut self, listen: SocketAddr, admin: SocketAddr) -> Launch {
        self.listen = Some(listen);
        self.admin = Some(admin);
        self
    }

    /// Starts it and waits, bounded by [`START_LIMIT`], until both its listeners are known
    /// and accept connections; panics with the log if it exits or does not get there.
    pub async fn start(self) -> Process {
        let log = std::fs::File::create(self.dir.path(LOG)).expect("log file");
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log)
            .kill_on_drop(true);
        for (key, value) in &self.env {
            match value {
                Some(v) => command.env(key, v),
                None => command.env_remove(key),
            };
        }
        let mut child = command.spawn().expect("the binary starts");
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let text = self.dir.read(LOG);
            let listen = self.listen.or_else(|| logged_address(&text, LISTEN_LINE));
            let admin = self.admin.or_else(|| logged_address(&text, ADMIN_LINE));
            if let (Some(listen), Some(admin)) = (listen, admin)
                && accepts(listen).await
                && accepts(admin).await
            {
                return Process {
                    child,
                    dir: self.dir,
                    listen,
                    admin,
                    client: client(),
                };
            }
            if let Some(status) = child.try_wait().expect("child status") {
                panic!(
                    "tidegate {:?} exited with {status} before serving:\n{}",
                    self.args,
                    self.dir.read(LOG)
                );
            }
            assert!(
                Instant::now() < deadline,
                "tidegate {:?} was not serving within {START_LIMIT:?} (listen {listen:?}, \
                 admin {admin:?}):\n{}",
                self.args,
                self.dir.read(LOG)
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The `address=` of the first log line containing `marker`.
fn logged_address(log: &str, marker: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains(marker))?;
    let at = line.find("address=")? + "address=".len();
    line[at..].split_whitespace().next()?.parse().ok()
}

/// Whether `addr` accepts a connection (within a second).
async fn accepts(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// A demo image run as a process of its own (`tidegate image --listen ADDR --name NAME`),
/// so that it can die as a crashed Smalltalk VM does: [`ImageProcess::kill`] sends it
/// `SIGKILL`. Killed (by its process id) when dropped.
pub struct ImageProcess {
    child: tokio::process::Child,
    pub name: String,
    pub addr: SocketAddr,
}

impl ImageProcess {
    /// Starts the image on `addr` (a fixed port, so that it can be started again there)
    /// and waits, bounded by [`START_LIMIT`], until the port accepts.
    pub async fn start(name: &str, addr: SocketAddr) -> ImageProcess {
        let mut child = tokio::process::Command::new(BIN)
            .args(["image", "--listen", &addr.to_string(), "--name", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        let deadline = Instant::now() + START_LIMIT;
        while !accepts(addr).await {
            if let Some(status) = child.try_wait().expect("child status") {
                panic!("image {name} on {addr} exited with {status} before serving");
            }
            assert!(
                Instant::now() < deadline,
                "image {name} on {addr} was not serving within {START_LIMIT:?}"
            );
            tokio::time::sleep(POLL).await;
        }
        ImageProcess {
            child,
            name: name.to_string(),
            addr,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the image runs")
    }

    /// Sends `SIGKILL` and waits (bounded) until it is gone: its sessions die with it.
    pub async fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL sent");
        tokio::time::timeout(START_LIMIT, self.child.wait())
            .await
            .expect("a killed image is gone at once")
            .expect("its status");
    }

    /// The `[[pool.backend]]` entry naming it (`extra`: more keys of the entry).
    pub fn entry(&self, extra: &str) -> String {
        format!(
            "[[pool.backend]]\nname = \"{}\"\naddress = \"{}\"\n{extra}",
            self.name, self.addr
        )
    }
}

/// The admin token [`Process::start`] configures.
pub const TOKEN: &str = "test-admin-token-0123456789";

/// The real `tidegate` binary, serving, with its log in `dir/tidegate.log`; killed when
/// dropped. Started by a [`Launch`], or by [`Process::start`] for a configuration file.
pub struct Process {
    child: tokio::process::Child,
    pub dir: TempDir,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// A client for [`Process::call`] and the tests' own requests.
    pub client: HttpClient,
}

/// The whole configuration file of a [`Process::start`] for `body`: three lines on top of it.
fn process_config(dir: &TempDir, listen: SocketAddr, admin: SocketAddr, body: &str) -> String {
    format!(
        "listen = [\"{listen}\"]\nadmin = \"{admin}\"\nadmin_token_file = \"{}\"\n{body}",
        dir.arg("admin.token")
    )
}

/// An admin API answer.
#[derive(Debug)]
pub struct Api {
    pub status: StatusCode,
    pub content_type: String,
    pub allow: String,
    pub www_authenticate: String,
    pub text: String,
    pub json: serde_json::Value,
}

impl From<Reply> for Api {
    fn from(reply: Reply) -> Api {
        let text = reply.text();
        Api {
            status: reply.status,
            content_type: reply.header("content-type"),
            allow: reply.header("allow"),
            www_authenticate: reply.header("www-authenticate"),
            json: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
            text,
        }
    }
}

/// One JSON request to the admin listener at `admin`; `token` goes in `Authorization: Bearer`.
pub async fn admin_send(
    client: &HttpClient,
    admin: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    let url = format!("http://{admin}{path}");
    send(client, method, &url, &headers, body.to_string()).await
}

impl Process {
    /// Starts `tidegate --config FILE` with `body` (pools and the rest) under `listen`,
    /// `admin` and `admin_token_file` ([`TOKEN`]) lines, and waits (bounded) until both
    /// listeners answer. A test rewrites the body with [`Process::configure`].
    pub async fn start(body: &str) -> Process {
        let launch = Launch::new("process");
        let (listen, admin) = (free_addr(), free_addr());
        launch.file("admin.token", &format!("{TOKEN}\n"));
        let file = launch.file(
            "tidegate.toml",
            &process_config(&launch.dir, listen, admin, body),
        );
        launch
            .arg("--config")
            .arg(file)
            .listening_on(listen, admin)
            .start()
            .await
    }

    /// Replaces the configuration file of a [`Process::start`] (re-read on SIGHUP).
    pub fn configure(&self, body: &str) {
        self.dir.write(
            "tidegate.toml",
            &process_config(&self.dir, self.listen, self.admin, body),
        );
    }

    /// Sends SIGHUP.
    pub fn hangup(&self) {
        self.signal(rustix::process::Signal::HUP);
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = self.child.id().expect("the process runs");
        let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
        rustix::process::kill_process(pid, signal).expect("signal sent");
    }

    /// Sends SIGTERM and waits (bounded by [`START_LIMIT`]) for the process to exit; its
    /// status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        tokio::time::timeout(START_LIMIT, self.child.wait())
            .await
            .expect("the process exits after SIGTERM")
            .expect("its status")
    }

    /// Waits (bounded by `limit`) for the process to exit on its own; its status.
    pub async fn exited_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!("the process did not exit within {limit:?}:\n{}", self.log())
            })
            .expect("its status")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process runs")
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        self.dir.read(LOG)
    }

    /// Waits, bounded, until the log holds `needle` `times` times; returns the log.
    pub async fn log_shows(&self, needle: &str, times: usize, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= times {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "the log did not show {needle:?} {times} times within {limit:?}:\n{log}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// `http://LISTEN`.
    pub fn base(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// An admin API request, with [`TOKEN`] when `authorized`; the reply and its JSON.
    pub async fn api(
        &self,
        client: &HttpClient,
        method: Method,
        path: &str,
        body: &str,
        authorized: bool,
    ) -> (Reply, serde_json::Value) {
        let token = authorized.then_some(TOKEN);
        let reply = admin_send(client, self.admin, method, path, token, body).await;
        let json = serde_json::from_slice(&reply.body).unwrap_or(serde_json::Value::Null);
        (reply, json)
    }

    /// An admin API request with `token` (if any) in `Authorization: Bearer`.
    pub async fn call(&self, method: Method, path: &str, token: Option<&str>, body: &str) -> Api {
        admin_send(&self.client, self.admin, method, path, token, body)
            .await
            .into()
    }

    /// An admin API request with exactly these headers.
    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Api {
        let url = format!("http://{}{path}", self.admin);
        send(&self.client, method, &url, headers, body.to_string())
            .await
            .into()
    }

    /// One backend of `pool` as `GET /api/pools` shows it (`Null` when absent).
    pub async fn backend(&self, client: &HttpClient, pool: &str, name: &str) -> serde_json::Value {
        let (_, v) = self.api(client, Method::GET, "/api/pools", "", false).await;
        v["pools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"] == pool)
            .flat_map(|p| p["backends"].as_array().cloned().unwrap_or_default())
            .find(|b| b["name"] == name)
            .unwrap_or(serde_json::Value::Null)
    }

    /// Waits, bounded, until `field` of a backend is `want`.
    pub async fn backend_becomes(
        &self,
        client: &HttpClient,
        pool: &str,
        name: &str,
        field: &str,
        want: &str,
        limit: Duration,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            let b = self.backend(client, pool, name).await;
            if b[field] == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{pool}/{name}: {field} did not become {want:?} within {limit:?}: {b}\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The process's `/metrics` text.
    pub async fn metrics(&self, client: &HttpClient) -> String {
        get(client, &format!("http://{}/metrics", self.admin))
            .await
            .text()
    }

    /// `tidegate ctl --admin ADMIN <args>` to completion, TIDEGATE_ADMIN_TOKEN set to
    /// `env_token` (or unset).
    pub async fn ctl(&self, args: &[&str], env_token: Option<&str>) -> Output {
        ctl(self.admin, args, env_token).await
    }
}

/// The value of a metric series in a `/metrics` text (`name{labels}` as printed), or 0.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `n` new sessions at `base` ([`Session::open`]).
pub async fn sessions(base: &str, n: usize) -> Vec<Session> {
    let c = client();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Session::open(&c, base).await);
    }
    out
}

/// A session as a Seaside 3 user holds it, in the links of its last page: that link, the
/// image that served the page and the image's counter there.
#[derive(Clone, Debug)]
pub struct Session {
    pub link: String,
    pub image: String,
    pub counter: u64,
}

impl Session {
    /// The session a page shows.
    pub fn of(page: &Reply) -> Session {
        Session {
            link: page.link().expect("a link"),
            image: page.image(),
            counter: page.counter(),
        }
    }

    /// A new session at `base`: its first page (the pin is learned from the page's links).
    pub async fn open(client: &HttpClient, base: &str) -> Session {
        let first = get(client, &format!("{base}/app")).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.text());
        Session::of(&first)
    }

    /// Its next click, at `base`: the reply, after checking it reached the session's image,
    /// which still held it.
    pub async fn click(&mut self, client: &HttpClient, base: &str) -> Reply {
        let r = get(client, &format!("{base}{}", self.link)).await;
        assert_eq!(
            (r.status, r.image(), r.counter()),
            (StatusCode::OK, self.image.clone(), self.counter + 1),
            "{}{}: the session did not reach its image",
            base,
            self.link
        );
        self.counter += 1;
        self.link = r.link().expect("a link");
        r
    }
}

/// Ends the process `pid` when dropped, also when the test fails first: a successor
/// `tidegate upgrade` started, which is no child of the test (nor of anyone it could wait for).
pub struct Reaped(pub u32);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
}
