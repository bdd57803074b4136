//! The backend side of the wire: scripted backends that reply in every HTTP/1.1 framing,
//! close idle connections under the balancer, send interim replies or garbage; the client
//! must see whole replies, and refusals that say why. Also the timeouts and limits that
//! bound what either side can hold (slow uploads, stalled clients and backends, quiet
//! HTTP/2 connections, the connection limit), and what a reply may teach the table.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::{get, send};
use tidegate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The most any one test may take.
const TEST_LIMIT: Duration = Duration::from_secs(30);

async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .expect("test finished within its time limit");
}

/// What a scripted backend does with a request: the bytes to answer, or `None` to close
/// the connection without a word. It is told which connection (0, 1, …), which request on
/// that connection, and the request head.
type Script = dyn Fn(usize, usize, &str) -> Option<Vec<u8>> + Send + Sync;

/// A raw HTTP/1.1 backend that follows a script, counting connections and requests.
struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    async fn start(
        script: impl Fn(usize, usize, &str) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> Self {
        let heads = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let seen = heads.clone();
        let (addr, connections) = raw_backend(move |stream, conn| {
            serve_script(stream, conn, script.clone(), seen.clone())
        })
        .await;
        Scripted {
            addr,
            connections,
            heads,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve_script(
    mut stream: TcpStream,
    conn: usize,
    script: Arc<Script>,
    heads: Arc<Mutex<Vec<String>>>,
) {
    let mut buf = Vec::new();
    for request in 0.. {
        let Some((head, _)) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        heads.lock().unwrap().push(head.clone());
        let Some(reply) = script(conn, request, &head) else {
            return;
        };
        if stream.write_all(&reply).await.is_err() {
            return;
        }
        let text = String::from_utf8_lossy(&reply).to_ascii_lowercase();
        if text.contains("connection: close")
            || !text.contains("content-length")
                && !text.contains("chunked")
                && !text.starts_with("http/1.1 204")
                && !text.starts_with("http/1.1 304")
                && !head.starts_with("HEAD")
        {
            return;
        }
    }
}

/// A raw backend: each accepted connection is served by `serve` on a task of its own, told
/// its number (0, 1, …); also returns the count of connections accepted.
async fn raw_backend<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let conn = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream, conn));
        }
    });
    (addr, connections)
}

/// Reads one request (head and `Content-Length` body) off the front of `buf` and the
/// stream: its head, and its body length.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, usize)> {
    let end = read_head(stream, buf).await?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buf.len() < end + length {
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..end + length);
    Some((head, length))
}

/// Reads until a blank line; the offset just past it.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A balancer with one pool of the given backends.
async fn balancer(backends: &[SocketAddr]) -> tidegate::server::Running {
    balancer_with(backends, "").await
}

/// A balancer with one pool of the given backends; `settings` (top-level keys, then any
/// tables such as `[upstream]`) go before the pool.
async fn balancer_with(backends: &[SocketAddr], settings: &str) -> tidegate::server::Running {
    let mut text = format!(
        "listen = [\"127.0.0.1:0\"]\nadmin = \"off\"\n{settings}\n[[pool]]\nname = \"app\"\n"
    );
    for (i, addr) in backends.iter().enumerate() {
        text.push_str(&format!(
            "[[pool.backend]]\nname = \"image{i}\"\naddress = \"{addr}\"\n"
        ));
    }
    let config = Config::from_toml(&text, "test").expect("test config is valid");
    tidegate::server::start(&config)
        .await
        .expect("balancer starts")
}

/// A balancer in front of `backends`, a client, and the balancer's base URL.
async fn front(
    backends: &[SocketAddr],
) -> (tidegate::server::Running, support::HttpClient, String) {
    let running = balancer(backends).await;
    let base = format!("http://{}", running.addrs()[0]);
    (running, support::client(), base)
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connections_are_kept_alive_and_reused() {
    bounded(async {
        let backend = Scripted::start(|_, n, head| {
            Some(if head.starts_with("GET /empty") {
                b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()
            } else if head.starts_with("HEAD") {
                b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n".to_vec()
            } else {
                ok(&format!("reply {n}"))
            })
        })
        .await;
        let (_running, client, base) = front(&[backend.addr]).await;
        for i in 0..50 {
            let reply = get(&client, &format!("{base}/x")).await;
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(reply.text(), format!("reply {}", 3 * i));
            let head = send(
                &client,
                Method::HEAD,
                &format!("{base}/x"),
                &[],
                Bytes::new(),
            )
            .await;
            assert_eq!(head.status, StatusCode::OK);
            assert_eq!(
                get(&client, &format!("{base}/empty")).await.status,
                StatusCode::NO_CONTENT
            );
        }
        assert_eq!(backend.connections(), 1, "one connection served all 150");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_the_backend_read_and_dropped_unanswered_is_not_sent_twice() {
    bounded(async {
        // Each connection answers one request, then reads the next one and closes without a
        // word: it may have acted on it (a Seaside `_k` callback acts on GET), so the
        // request is not sent again; the client gets a 502.
        let backend = Scripted::start(|_, n, _| (n == 0).then(|| ok("fresh"))).await;
        let (_running, client, base) = front(&[backend.addr]).await;
        let first = get(&client, &format!("{base}/x")).await;
        assert_eq!(
            (first.status, first.text()),
            (StatusCode::OK, "fresh".into())
        );
        let second = get(&client, &format!("{base}/app?_k=delete")).await;
        assert_eq!(second.status, StatusCode::BAD_GATEWAY, "{}", second.text());
        let heads = backend.heads.lock().unwrap().clone();
        assert_eq!(
            heads.iter().filter(|h| h.contains("_k=delete")).count(),
            1,
            "the callback reached the backend once: {heads:?}"
        );
        // The next request gets a fresh connection.
        assert_eq!(
            get(&client, &format!("{base}/x")).await.status,
            StatusCode::OK
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_or_not_idempotent_is_never_sent_twice() {
    bounded(async {
        let backend = Scripted::start(|_, n, _| (n == 0).then(|| ok("fresh"))).await;
        let (_running, client, base) = front(&[backend.addr]).await;
        for (method, body) in [
            (Method::POST, Bytes::from_static(b"payload")),
            (Method::POST, Bytes::new()),
            (Method::PATCH, Bytes::new()),
        ] {
            // A fresh connection answers, is parked, then fails the next request.
            assert_eq!(
                get(&client, &format!("{base}/x")).await.status,
                StatusCode::OK
            );
            let reply = send(
                &client,
                method.clone(),
                &format!("{base}/form"),
                &[("content-type", "application/octet-stream")],
                body,
            )
            .await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_GATEWAY,
                "{method}: {}",
                reply.text()
            );
            assert!(!reply.text().contains("image0"), "{}", reply.text());
        }
        let heads = backend.heads.lock().unwrap().clone();
        let sent = |m: &str| heads.iter().filter(|h| h.starts_with(m)).count();
        assert_eq!(sent("POST"), 2, "each POST reached the backend once");
        assert_eq!(sent("PATCH"), 1, "the PATCH reached the backend once");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_backend_closed_while_parked_is_not_used() {
    bounded(async {
        // Answers one request per connection, keeps it "alive", and closes it 30 ms later.
        let (addr, connections) = raw_backend(|mut stream, _| async move {
            let mut buf = Vec::new();
            if let Some((_, length)) = read_request(&mut stream, &mut buf).await {
                let _ = stream.write_all(&ok(&format!("got {length}"))).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
        .await;
        let (_running, client, base) = front(&[addr]).await;
        for i in 0..5 {
            assert_eq!(get(&client, &format!("{base}/x")).await.text(), "got 0");
            tokio::time::sleep(Duration::from_millis(150)).await;
            // Not sent again if it failed: only noticing the close saves it.
            let post = send(
                &client,
                Method::POST,
                &format!("{base}/form"),
                &[("content-type", "application/octet-stream")],
                Bytes::from_static(b"payload"),
            )
            .await;
            assert_eq!(post.status, StatusCode::OK, "round {i}: {}", post.text());
            assert_eq!(post.text(), "got 7");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert_eq!(connections.load(Ordering::SeqCst), 10);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_bytes_beyond_its_reply_is_not_reused() {
    bounded(async {
        let backend = Scripted::start(|_, _, head| {
            Some(if head.starts_with("GET /extra") {
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nJUNK!".to_vec()
            } else {
                ok("clean")
            })
        })
        .await;
        let (_running, client, base) = front(&[backend.addr]).await;
        assert_eq!(get(&client, &format!("{base}/extra")).await.text(), "hello");
        assert_eq!(get(&client, &format!("{base}/next")).await.text(), "clean");
        assert_eq!(get(&client, &format!("{base}/next")).await.text(), "clean");
        assert_eq!(backend.connections(), 2, "the connection with extra bytes was closed");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_no_host_reaches_the_backend_with_one() {
    bounded(async {
        let backend = Scripted::start(|_, _, _| Some(ok("hi"))).await;
        let running = balancer(&[backend.addr]).await;
        let mut stream = connect_sending(running.addrs()[0], b"GET /old HTTP/1.0\r\n\r\n").await;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.unwrap();
        assert!(
            reply.ends_with(b"hi"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        let heads = backend.heads.lock().unwrap().clone();
        let host = heads[0]
            .lines()
            .find_map(|l| l.strip_prefix("host: "))
            .unwrap_or_else(|| panic!("no host: {heads:?}"));
        assert_eq!(host, backend.addr.to_string());
        assert!(
            !heads[0].contains("x-forwarded-host"),
            "no forwarded host for a request that named none: {heads:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_in_every_framing_arrive_whole() {
    bounded(async {
        let big: String = (0..5000).map(|i| format!("{i},")).collect();
        let chunked_body = big.clone();
        let backend = Scripted::start(move |_, _, head| {
            let path = head.split(' ').nth(1).unwrap_or("");
            Some(match path {
                "/chunked" => {
                    let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                    for (i, piece) in chunked_body.as_bytes().chunks(777).enumerate() {
                        out.extend_from_slice(format!("{:X};ext={i}\r\n", piece.len()).as_bytes());
                        out.extend_from_slice(piece);
                        out.extend_from_slice(b"\r\n");
                    }
                    out.extend_from_slice(b"0\r\nx-trailer: 1\r\n\r\n");
                    out
                }
                "/chunked-and-length" => {
                    let mut out =
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"
                            .to_vec();
                    out.extend_from_slice(format!("{:x}\r\n", chunked_body.len()).as_bytes());
                    out.extend_from_slice(chunked_body.as_bytes());
                    out.extend_from_slice(b"\r\n0\r\n\r\n");
                    out
                }
                "/until-close" => {
                    format!("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{chunked_body}")
                        .into_bytes()
                }
                "/http10" => format!("HTTP/1.0 200 OK\r\n\r\n{chunked_body}").into_bytes(),
                "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 12345\r\n\r\n".to_vec(),
                _ => ok("plain"),
            })
        })
        .await;
        let (_running, client, base) = front(&[backend.addr]).await;
        for round in 0..2 {
            for path in ["/chunked", "/chunked-and-length", "/until-close", "/http10"] {
                let reply = get(&client, &format!("{base}{path}")).await;
                assert_eq!(reply.status, StatusCode::OK, "{path} round {round}");
                assert_eq!(reply.text(), big, "{path} round {round}");
            }
            let empty = get(&client, &format!("{base}/empty")).await;
            assert_eq!(empty.status, StatusCode::NO_CONTENT);
            assert!(empty.body.is_empty());
            let head = send(
                &client,
                Method::HEAD,
                &format!("{base}/head"),
                &[],
                Bytes::new(),
            )
            .await;
            assert_eq!(head.status, StatusCode::OK);
            assert_eq!(head.header("content-length"), "12345");
            assert_eq!(get(&client, &format!("{base}/plain")).await.text(), "plain");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_replies_are_passed_over_for_the_final_one() {
    bounded(async {
        let backend = Scripted::start(|_, _, _| {
            let mut out =
                b"HTTP/1.1 103 Early Hints\r\nlink: </app.css>; rel=preload\r\n\r\n".to_vec();
            out.extend_from_slice(&ok("final"));
            Some(out)
        })
        .await;
        let running = balancer(&[backend.addr]).await;
        let client = support::client();
        let reply = get(&client, &format!("http://{}/x", running.addrs()[0])).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "final");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_is_not_http_is_a_502_that_says_so() {
    bounded(async {
        let backend = Scripted::start(|_, _, head| {
            Some(if head.starts_with("GET /garbage") {
                b"HELLO FROM A TELNET SERVER\r\n\r\n".to_vec()
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!".to_vec()
            })
        })
        .await;
        let (running, client, base) = front(&[backend.addr]).await;
        for path in ["/garbage", "/two-lengths"] {
            let reply = get(&client, &format!("{base}{path}")).await;
            assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{path}");
            let text = reply.text();
            assert!(!text.contains("image0"), "{path}: {text}");
            assert!(text.contains("not valid HTTP/1.1"), "{path}: {text}");
        }
        let set = running.pool("app").expect("pool app").backends();
        let stats = &set.all()[0].stats;
        assert_eq!(stats.upstream_errors_total(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_refusing_a_body_early_is_heard() {
    bounded(async {
        // Reads the head of an upload, answers 413 at once and closes, the body unread.
        let (addr, _) = raw_backend(|mut stream, _| async move {
            let mut buf = Vec::new();
            if read_head(&mut stream, &mut buf).await.is_some() {
                let refusal = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large";
                let _ = stream.write_all(refusal).await;
            }
        })
        .await;
        let running = balancer(&[addr]).await;
        // A raw client: curl-like, it reads the answer while its upload is still going.
        let stream = TcpStream::connect(running.addrs()[0]).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        tokio::spawn(async move {
            let head = b"POST /upload HTTP/1.1\r\nhost: app\r\ncontent-length: 16777216\r\n\r\n";
            if writer.write_all(head).await.is_err() {
                return;
            }
            let piece = vec![b'x'; 64 * 1024];
            for _ in 0..256 {
                if writer.write_all(&piece).await.is_err() {
                    return;
                }
            }
        });
        let mut reply = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&chunk[..n]),
            }
            if reply.ends_with(b"too large") {
                break;
            }
        }
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
        assert!(reply.ends_with("too large"), "{reply}");
    })
    .await;
}

/// A backend's side of an upgrade: `101` to the `echo` protocol with `greeting` in the same
/// write, then every byte echoed until the client closes.
async fn switch_and_echo(stream: &mut TcpStream, greeting: &[u8]) {
    let mut hello =
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n"
            .to_vec();
    hello.extend_from_slice(greeting);
    if stream.write_all(&hello).await.is_err() {
        return;
    }
    let mut chunk = [0u8; 1024];
    while let Ok(n) = stream.read(&mut chunk).await {
        if n == 0 || stream.write_all(&chunk[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_a_backend_sends_right_after_its_101_reach_the_client() {
    bounded(async {
        // Switches protocols and speaks first, in the same write as its 101; then echoes.
        let (addr, _) = raw_backend(|mut stream, _| async move {
            let mut buf = Vec::new();
            if read_head(&mut stream, &mut buf).await.is_none() {
                return;
            }
            switch_and_echo(&mut stream, b"WELCOME;").await;
        })
        .await;
        let running = balancer(&[addr]).await;
        let mut stream = connect_sending(
            running.addrs()[0],
            b"GET /chat HTTP/1.1\r\nhost: app\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await;
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        while !got.ends_with(b"WELCOME;") {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        stream.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
    })
    .await;
}

/// Reads from `stream` until a whole reply head has come, or the stream ends.
async fn reply_head(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    match read_head(stream, &mut buf).await {
        Some(end) => String::from_utf8_lossy(&buf[..end]).into_owned(),
        None => String::from_utf8_lossy(&buf).into_owned(),
    }
}

/// A new connection to `addr` with `request` written on it.
async fn connect_sending(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    stream
}

/// Sends `request` and expects a reply starting with `status` within 5 s (the timeouts under
/// test are 1 s).
async fn refused_soon(addr: SocketAddr, request: &[u8], status: &str) {
    let started = std::time::Instant::now();
    let mut stream = connect_sending(addr, request).await;
    let head = reply_head(&mut stream).await;
    assert!(head.starts_with(status), "{head}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Sends `request` on a new connection and reads until tidegate closes it: what came, and
/// how long it took.
async fn until_closed(addr: SocketAddr, request: &[u8]) -> (Vec<u8>, Duration) {
    let started = std::time::Instant::now();
    let mut stream = connect_sending(addr, request).await;
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    (got, started.elapsed())
}

/// That `waited` is one 1 s timeout (and its grace), not none and not forever.
fn assert_one_timeout(waited: Duration) {
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
}

/// Sends `head`, then a body of `pieces` pieces of 100 bytes, 400 ms apart; the reply head.
async fn send_slowly(addr: SocketAddr, head: &[u8], pieces: usize) -> String {
    let mut stream = connect_sending(addr, head).await;
    for _ in 0..pieces {
        tokio::time::sleep(Duration::from_millis(400)).await;
        stream.write_all(&[b'a'; 100]).await.unwrap();
    }
    reply_head(&mut stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_may_outlast_the_response_timeout() {
    bounded(async {
        let backend = Scripted::start(|_, _, _| Some(ok("stored"))).await;
        let running = balancer_with(
            &[backend.addr],
            "client_timeout = 5\n[upstream]\nresponse_timeout = 1\n",
        )
        .await;
        // 1.6 s of upload against a 1 s response timeout: the timeout starts once it is sent.
        let head = b"PUT /upload HTTP/1.1\r\nhost: app\r\ncontent-length: 400\r\n\r\n";
        let reply = send_slowly(running.addrs()[0], head, 4).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_silent_after_the_request_gets_a_504() {
    bounded(async {
        let (addr, _) = raw_backend(|mut stream, _| async move {
            let mut buf = Vec::new();
            let _ = read_request(&mut stream, &mut buf).await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        })
        .await;
        let running = balancer_with(&[addr], "[upstream]\nresponse_timeout = 1\n").await;
        let request = b"GET /slow HTTP/1.1\r\nhost: app\r\n\r\n";
        refused_soon(running.addrs()[0], request, "HTTP/1.1 504").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_sending_its_body_gets_a_408() {
    bounded(async {
        let backend = Scripted::start(|_, _, _| Some(ok("stored"))).await;
        let running = balancer_with(&[backend.addr], "client_timeout = 1\n").await;
        // A plain upload, streamed to the backend; and a form post without a session id,
        // whose start tidegate reads to look for one.
        let requests: [&[u8]; 2] = [
            b"PUT /upload HTTP/1.1\r\nhost: app\r\ncontent-length: 1000\r\n\r\n0123456789",
            b"POST /app HTTP/1.1\r\nhost: app\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 1000\r\n\r\nname=abc&",
        ];
        for request in requests {
            refused_soon(running.addrs()[0], request, "HTTP/1.1 408").await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_wait_for_a_slot() {
    bounded(async {
        let backend = Scripted::start(|_, _, _| Some(ok("hi"))).await;
        let running = balancer_with(&[backend.addr], "max_connections = 1\n").await;
        let request = b"GET / HTTP/1.1\r\nhost: app\r\n\r\n";
        let mut first = connect_sending(running.addrs()[0], request).await;
        assert!(reply_head(&mut first).await.starts_with("HTTP/1.1 200"));
        // The kernel takes the second connection; tidegate does not serve it yet.
        let mut second = connect_sending(running.addrs()[0], request).await;
        let early = tokio::time::timeout(Duration::from_millis(500), reply_head(&mut second)).await;
        assert!(early.is_err(), "served beyond the limit: {early:?}");
        drop(first);
        let head = tokio::time::timeout(Duration::from_secs(5), reply_head(&mut second))
            .await
            .expect("served once a slot is free");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    })
    .await;
}

/// The `_s` value in a request head's target, if any.
fn id_in_target(head: &str) -> Option<String> {
    let target = head.split(' ').nth(1)?;
    let id = target.split_once("_s=")?.1;
    Some(id.split('&').next().unwrap_or(id).to_string())
}

fn pinned(running: &tidegate::server::Running, id: &str) -> bool {
    let pool = running.pool("app").unwrap();
    let table = pool.table().unwrap();
    table
        .get(tidegate::core::affinity::PinKey::of(id))
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_repeating_the_requests_unknown_id_does_not_pin_it() {
    bounded(async {
        // A backend that hands the id it was given back in a redirect, in the links of a
        // page, or in a cookie; and gives a request without one a fresh id in a page.
        let backend = Scripted::start(|_, _, head| {
            let path = head.split(' ').nth(1).unwrap_or("/");
            let id = id_in_target(head).unwrap_or_else(|| "FRESHKEY00000001".to_string());
            let html = |id: &str| {
                let body = format!("<a href=\"/app?_s={id}&_k=1\">on</a>");
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            };
            let reply = if path.starts_with("/redirect") {
                format!("HTTP/1.1 302 Found\r\nlocation: /app/?_s={id}\r\ncontent-length: 0\r\n\r\n")
            } else if path.starts_with("/cookie") {
                format!("HTTP/1.1 200 OK\r\nset-cookie: _s={id}; Path=/\r\ncontent-length: 0\r\n\r\n")
            } else {
                html(&id)
            };
            Some(reply.into_bytes())
        })
        .await;
        let (running, client, base) = front(&[backend.addr]).await;
        for path in ["/redirect?_s=FORGEDREDIRECT01", "/page?_s=FORGEDPAGE000001"] {
            get(&client, &format!("{base}{path}")).await;
        }
        assert!(!pinned(&running, "FORGEDREDIRECT01"), "a repeated Location id was pinned");
        assert!(!pinned(&running, "FORGEDPAGE000001"), "a repeated page id was pinned");
        // The backend's explicit word, and a fresh id it hands out, still pin.
        get(&client, &format!("{base}/cookie?_s=COOKIEKEY0000001")).await;
        assert!(pinned(&running, "COOKIEKEY0000001"), "a Set-Cookie of the id pins it");
        get(&client, &format!("{base}/page")).await;
        assert!(pinned(&running, "FRESHKEY00000001"), "a fresh id in a page pins it");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_ending_in_an_id_is_learned_whatever_its_framing() {
    bounded(async {
        // The id runs up to the last byte of the page, in a Content-Length reply and in a
        // chunked one: only the end of the body shows it is whole.
        let backend = Scripted::start(|_, _, head| {
            let body = if head.contains("/chunked") {
                "<a href=\"/app?_s=ENDKEYCHUNKED001".to_string()
            } else {
                "<a href=\"/app?_s=ENDKEYLENGTH0001".to_string()
            };
            let reply = if head.contains("/chunked") {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                    body.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            };
            Some(reply.into_bytes())
        })
        .await;
        let (running, client, base) = front(&[backend.addr]).await;
        get(&client, &format!("{base}/length")).await;
        get(&client, &format!("{base}/chunked")).await;
        assert!(pinned(&running, "ENDKEYLENGTH0001"));
        assert!(pinned(&running, "ENDKEYCHUNKED001"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_http2_connection_is_closed_with_a_goaway() {
    bounded(async {
        let backend = Scripted::start(|_, _, _| Some(ok("hi"))).await;
        let running = balancer_with(&[backend.addr], "client_timeout = 1\n").await;
        // The h2c preface and an empty SETTINGS frame, then nothing.
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
        let (got, waited) = until_closed(running.addrs()[0], preface).await;
        // Walk the frames: 9-byte headers, the type in the fourth byte.
        let mut types = Vec::new();
        let mut at = 0;
        while at + 9 <= got.len() {
            let len = usize::from(got[at]) << 16
                | usize::from(got[at + 1]) << 8
                | usize::from(got[at + 2]);
            types.push(got[at + 3]);
            at += 9 + len;
        }
        assert!(
            types.contains(&0x7),
            "a GOAWAY frame before the close: {types:?}"
        );
        assert_one_timeout(waited);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_request_in_flight_keeps_its_connection_past_the_quiet_limit() {
    bounded(async {
        // The backend takes 2.5 s, the quiet limit is 1 s: a connection cut at its quiet
        // limit (or its grace after a GOAWAY, 2 s) would lose the reply.
        let (addr, _) = raw_backend(|mut stream, _| async move {
            let mut buf = Vec::new();
            while read_request(&mut stream, &mut buf).await.is_some() {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                if stream.write_all(&ok("late")).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let running = balancer_with(&[addr], "client_timeout = 1\n").await;
        let client = support::h2c_client();
        let base = format!("http://{}", running.addrs()[0]);
        let reply = get(&client, &format!("{base}/slow")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "late");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stalls_mid_body_is_cut_off_after_the_response_timeout() {
    bounded(async {
        // 10 of 100 promised bytes, then silence with the connection open.
        let (addr, _) = raw_backend(|mut stream, _| async move {
            let mut buf = Vec::new();
            if read_request(&mut stream, &mut buf).await.is_none() {
                return;
            }
            let part = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789";
            if stream.write_all(part).await.is_ok() {
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
        })
        .await;
        let running = balancer_with(&[addr], "[upstream]\nresponse_timeout = 1\n").await;
        let request = b"GET /stuck HTTP/1.1\r\nhost: app\r\n\r\n";
        let (got, waited) = until_closed(running.addrs()[0], request).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("0123456789"), "the part that came: {text}");
        assert_one_timeout(waited);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_reply_loses_its_connection_and_slot() {
    bounded(async {
        let big = vec![b'x'; 32 * 1024 * 1024];
        let backend = Scripted::start(move |_, _, head| {
            let body: &[u8] = if head.contains("/big") {
                &big
            } else {
                b"small"
            };
            let mut reply =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
            reply.extend_from_slice(body);
            Some(reply)
        })
        .await;
        let running =
            balancer_with(&[backend.addr], "max_connections = 1\nclient_timeout = 1\n").await;
        // The one slot: a client that asks for 32 MiB and reads none of it.
        let greedy = connect_sending(
            running.addrs()[0],
            b"GET /big HTTP/1.1\r\nhost: app\r\n\r\n",
        )
        .await;
        // The next client waits for the slot, which frees once the first has read nothing
        // for the client timeout.
        let started = std::time::Instant::now();
        let mut next = connect_sending(
            running.addrs()[0],
            b"GET /small HTTP/1.1\r\nhost: app\r\n\r\n",
        )
        .await;
        let head = tokio::time::timeout(Duration::from_secs(10), reply_head(&mut next))
            .await
            .expect("served once the stalled client was cut off");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(started.elapsed() >= Duration::from_millis(900));
        drop(greedy);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_tunnel_keeps_its_connection_slot() {
    bounded(async {
        // Upgrades `/chat` and echoes; answers anything else with a plain reply.
        let (addr, _) = raw_backend(|mut stream, _| async move {
            let mut buf = Vec::new();
            let Some((head, _)) = read_request(&mut stream, &mut buf).await else {
                return;
            };
            if !head.contains("/chat") {
                let _ = stream.write_all(&ok("plain")).await;
                return;
            }
            switch_and_echo(&mut stream, b"").await;
        })
        .await;
        let running = balancer_with(&[addr], "max_connections = 1\n").await;
        let mut tunnel = connect_sending(
            running.addrs()[0],
            b"GET /chat HTTP/1.1\r\nhost: app\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await;
        assert!(reply_head(&mut tunnel).await.starts_with("HTTP/1.1 101"));
        tunnel.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        tunnel.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        // The tunnel is the one connection allowed: the next waits while it lives.
        let mut next =
            connect_sending(running.addrs()[0], b"GET / HTTP/1.1\r\nhost: app\r\n\r\n").await;
        let early = tokio::time::timeout(Duration::from_millis(500), reply_head(&mut next)).await;
        assert!(early.is_err(), "served beside a live tunnel: {early:?}");
        drop(tunnel);
        let head = tokio::time::timeout(Duration::from_secs(5), reply_head(&mut next))
            .await
            .expect("served once the tunnel closed");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_form_post_is_read_for_its_id_and_forwarded() {
    bounded(async {
        let backend = Scripted::start(|_, _, _| Some(ok("posted"))).await;
        let running = balancer_with(&[backend.addr], "client_timeout = 1\n").await;
        // No id in the head: tidegate reads the form's start for one, which takes 2 s
        // against a 1 s client timeout — but no pause is longer than 0.4 s.
        let head = b"POST /app HTTP/1.1\r\nhost: app\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 500\r\n\r\n";
        let reply = send_slowly(running.addrs()[0], head, 5).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_never_opens_its_window_loses_the_connection() {
    bounded(async {
        let big = vec![b'x'; 1024 * 1024];
        let backend = Scripted::start(move |_, _, _| {
            let mut reply =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", big.len()).into_bytes();
            reply.extend_from_slice(&big);
            Some(reply)
        })
        .await;
        let running = balancer_with(&[backend.addr], "client_timeout = 1\n").await;
        // h2c: the preface, empty SETTINGS, then GET /big on stream 1 (HPACK: :method GET,
        // :scheme http, :path "/big" and :authority "app" as literals) — and never a
        // WINDOW_UPDATE, so the reply stops at the first 64 KiB.
        let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
        let block = b"\x82\x86\x04\x04/big\x01\x03app";
        request.extend_from_slice(&[0, 0, block.len() as u8, 0x01, 0x05, 0, 0, 0, 1]);
        request.extend_from_slice(block);
        let (got, waited) = until_closed(running.addrs()[0], &request).await;
        assert!(
            got.len() < 1024 * 1024,
            "the whole reply came: {} bytes",
            got.len()
        );
        assert_one_timeout(waited);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_on_http2_gets_its_whole_reply() {
    bounded(async {
        const SIZE: usize = 300 * 1024;
        let backend = Scripted::start(|_, _, _| {
            let mut reply =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {SIZE}\r\n\r\n").into_bytes();
            reply.resize(reply.len() + SIZE, b'x');
            Some(reply)
        })
        .await;
        let running = balancer_with(&[backend.addr], "client_timeout = 1\n").await;
        // The backend hands the whole reply over at once (it fits hyper's HTTP/2 send
        // buffer, so the reply body ends at once); the client takes it over several seconds
        // through a small receive buffer, so tidegate's writes keep waiting and going
        // through. The connection is moving all along and must not be cut.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(running.addrs()[0]).await.unwrap();
        // Windows as large as a browser's: flow control never holds the reply back.
        let (mut sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .initial_stream_window_size(8 << 20)
                .initial_connection_window_size(16 << 20)
                .handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get("http://app/big")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let reply = sender.send_request(request).await.unwrap();
        assert_eq!(reply.status(), StatusCode::OK);
        let mut body = reply.into_body();
        let mut got = 0;
        let started = std::time::Instant::now();
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            let frame = frame.expect("the reply is not cut off");
            let len = frame.data_ref().map_or(0, |d| d.len());
            got += len;
            // About 80 KiB/s.
            tokio::time::sleep(Duration::from_micros(12 * len as u64)).await;
        }
        assert_eq!(got, SIZE);
        assert!(
            started.elapsed() > Duration::from_secs(3),
            "the read was slow enough"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_is_closed_after_tunnel_timeout_of_silence_but_not_while_it_moves() {
    bounded(async {
        let (addr, _) = raw_backend(|mut stream, _| async move {
            let mut buf = Vec::new();
            if read_head(&mut stream, &mut buf).await.is_some() {
                switch_and_echo(&mut stream, b"").await;
            }
        })
        .await;
        let running = balancer_with(&[addr], "tunnel_timeout = 1\n").await;
        let upgrade =
            b"GET /chat HTTP/1.1\r\nhost: app\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n";
        let mut tunnel = connect_sending(running.addrs()[0], upgrade).await;
        assert!(reply_head(&mut tunnel).await.starts_with("HTTP/1.1 101"));
        // Moving every 0.4 s for 2 s: twice the timeout, and still open.
        let mut echo = [0u8; 4];
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            tunnel.write_all(b"ping").await.unwrap();
            tunnel.read_exact(&mut echo).await.unwrap();
            assert_eq!(&echo, b"ping");
        }
        // Then silence: closed after about a second.
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let _ = tunnel.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "{rest:?}");
        assert_one_timeout(started.elapsed());
    })
    .await;
}
