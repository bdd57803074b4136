//! The proxy on the wire: forwarded and hop-by-hop headers, bodies streamed byte for byte
//! (through the form peek too, chunked or after `Expect: 100-continue`), h2c, upgrades pinned
//! to their session's image, refusals with their statuses and texts, routing by Host and path,
//! malformed requests and CONNECT, client-IP mode.

mod support;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::{Reply, farm, get, images, send};
use tidegate::config::Config;
use tidegate::core::backend::AdminState;
use tidegate::demo::{ImageOptions, Tracking};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The most any one test may take.
const TEST_LIMIT: Duration = Duration::from_secs(30);
/// The most one raw socket operation may take.
const IO_LIMIT: Duration = Duration::from_secs(10);

/// Runs a test body, failing it if it outlives [`TEST_LIMIT`].
async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .expect("test finished within its time limit");
}

/// A balancer started from TOML text.
async fn balancer(text: &str) -> tidegate::server::Running {
    let config = Config::from_toml(text, "test").expect("test config is valid");
    tidegate::server::start(&config)
        .await
        .expect("balancer starts")
}

/// What `/echo` saw: the request line, the header lines, and the body.
struct Echoed {
    request_line: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Echoed {
    fn of(body: &Bytes) -> Echoed {
        let end = body
            .windows(2)
            .position(|w| w == b"\n\n")
            .expect("echo has a blank line after the head");
        let head = String::from_utf8_lossy(&body[..end]).into_owned();
        let mut lines = head.lines();
        let request_line = lines.next().unwrap_or_default().to_string();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(": ").unwrap_or((l, ""));
                (k.to_string(), v.to_string())
            })
            .collect();
        Echoed {
            request_line,
            headers,
            body: body.slice(end + 2..),
        }
    }

    /// Every value of header `name` the backend received.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The single value of header `name`.
    fn one(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(
            all.len() <= 1,
            "header {name} arrived {} times: {:?}",
            all.len(),
            self.headers
        );
        all.first().copied()
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The chunked encoding of `body`, in chunks of `size` bytes.
fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / size * 8 + 16);
    for chunk in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A reply read off a raw socket.
#[derive(Debug)]
struct RawReply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawReply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads more bytes into `buf`; `false` at end of stream.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    let n = tokio::time::timeout(IO_LIMIT, stream.read(&mut chunk))
        .await
        .expect("socket read within the I/O limit")
        .expect("socket read succeeds");
    buf.extend_from_slice(&chunk[..n]);
    n > 0
}

/// Reads until `buf` holds `needle`; returns the offset just past it.
async fn read_through(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    needle: &[u8],
    from: usize,
) -> usize {
    loop {
        if let Some(i) = buf[from..].windows(needle.len()).position(|w| w == needle) {
            return from + i + needle.len();
        }
        assert!(
            read_more(stream, buf).await,
            "stream ended before {:?}: {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(buf)
        );
    }
}

/// Parses `HTTP/1.1 200 OK\r\nname: value\r\n…` (without the final blank line).
fn parse_head(head: &[u8]) -> (u16, Vec<(String, String)>) {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap_or((l, ""));
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    (status, headers)
}

/// Reads one HTTP/1.1 reply (Content-Length, chunked, or to end of stream), leaving the
/// connection usable when the reply is delimited.
async fn read_reply(stream: &mut TcpStream) -> RawReply {
    let mut buf = Vec::new();
    let head_end = read_through(stream, &mut buf, b"\r\n\r\n", 0).await;
    let (status, headers) = parse_head(&buf[..head_end - 4]);
    let mut reply = RawReply {
        status,
        headers,
        body: Vec::new(),
    };
    let rest = buf.split_off(head_end);
    if let Some(len) = reply.header("content-length") {
        let len: usize = len.parse().expect("numeric content-length");
        let mut body = rest;
        while body.len() < len {
            assert!(read_more(stream, &mut body).await, "body cut short");
        }
        body.truncate(len);
        reply.body = body;
    } else if reply
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        let mut raw = rest;
        let mut at = 0;
        loop {
            let line_end = read_through(stream, &mut raw, b"\r\n", at).await;
            let size_text = String::from_utf8_lossy(&raw[at..line_end - 2]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .expect("chunk size is hex");
            if size == 0 {
                // No trailers expected: just the final CRLF.
                read_through(stream, &mut raw, b"\r\n", line_end).await;
                break;
            }
            while raw.len() < line_end + size + 2 {
                assert!(read_more(stream, &mut raw).await, "chunk cut short");
            }
            reply
                .body
                .extend_from_slice(&raw[line_end..line_end + size]);
            at = line_end + size + 2;
        }
    } else {
        let mut body = rest;
        while read_more(stream, &mut body).await {}
        reply.body = body;
    }
    reply
}

/// Connects to `to`, from `from` when given.
async fn connect(to: SocketAddr, from: Option<&str>) -> TcpStream {
    let connecting = async {
        match from {
            None => TcpStream::connect(to).await,
            Some(source) => {
                let socket = TcpSocket::new_v4()?;
                socket.bind(source.parse().expect("source address"))?;
                socket.connect(to).await
            }
        }
    };
    tokio::time::timeout(IO_LIMIT, connecting)
        .await
        .expect("connect within the I/O limit")
        .expect("connect succeeds")
}

async fn write(stream: &mut TcpStream, bytes: &[u8]) {
    tokio::time::timeout(IO_LIMIT, stream.write_all(bytes))
        .await
        .expect("write within the I/O limit")
        .expect("write succeeds");
}

/// Sends raw request bytes on a new connection and reads the reply.
async fn raw_exchange(to: SocketAddr, from: Option<&str>, request: &[u8]) -> RawReply {
    let mut stream = connect(to, from).await;
    write(&mut stream, request).await;
    read_reply(&mut stream).await
}

/// Opens a new session with `GET /app` and returns its key and image.
async fn open_session(client: &support::HttpClient, base: &str) -> (String, String) {
    let page = get(client, &format!("{base}/app")).await;
    assert_eq!(page.status, StatusCode::OK);
    let key = page.key().expect("the first page links its session");
    (key, page.image())
}

fn assert_text_refusal(reply: &Reply, status: StatusCode) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert!(
        reply.header("content-type").starts_with("text/plain"),
        "refusal content-type: {:?}",
        reply.header("content-type")
    );
    assert!(!reply.body.is_empty(), "a refusal says why");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_name_the_client_host_and_proto_and_only_trusted_proxies_add_hops() {
    bounded(async {
        let f = farm(1, Tracking::Links).await;
        let client = support::client();
        let url = format!("{}/echo?x=1", f.base);

        let reply = send(
            &client,
            Method::GET,
            &url,
            &[("host", "shop.example")],
            Bytes::new(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        let echoed = Echoed::of(&reply.body);
        assert_eq!(echoed.request_line, "GET /echo?x=1");
        assert_eq!(echoed.one("host"), Some("shop.example"));
        assert_eq!(echoed.one("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(echoed.one("x-forwarded-proto"), Some("http"));
        assert_eq!(echoed.one("x-forwarded-host"), Some("shop.example"));

        // A client's own claims of who it is are replaced with what tidegate saw.
        let claims = [
            ("host", "shop.example"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("forwarded", "for=10.0.0.3"),
            ("x-real-ip", "10.0.0.4"),
        ];
        let reply = send(&client, Method::GET, &url, &claims, Bytes::new()).await;
        let echoed = Echoed::of(&reply.body);
        assert_eq!(echoed.one("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(echoed.one("forwarded"), None);
        assert_eq!(echoed.one("x-real-ip"), None);
        assert_eq!(echoed.one("host"), Some("shop.example"));

        // Through a trusted proxy (here: loopback), every hop is kept, in order, over however
        // many lines, and this one appended.
        let trusted = balancer(&format!(
            "trusted_proxies = [\"127.0.0.0/8\"]\nlisten = [\"127.0.0.1:0\"]\n[[pool]]\nname = \"app\"\n{}",
            support::backend_entries(&f.images)
        ))
        .await;
        let url = format!("http://{}/echo?x=1", trusted.addrs()[0]);
        let reply = send(&client, Method::GET, &url, &claims, Bytes::new()).await;
        let echoed = Echoed::of(&reply.body);
        assert_eq!(
            echoed.one("x-forwarded-for"),
            Some("10.0.0.1, 10.0.0.2, 127.0.0.1")
        );
        assert_eq!(echoed.one("forwarded"), Some("for=10.0.0.3"));
        assert_eq!(echoed.one("x-real-ip"), Some("10.0.0.4"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stop_at_the_proxy_and_end_to_end_ones_pass() {
    bounded(async {
        let f = farm(1, Tracking::Links).await;
        let mut stream = connect(f.addr(), None).await;
        // Twice on one connection: the client connection stays usable afterwards.
        for round in 0..2 {
            write(
                &mut stream,
                b"GET /echo HTTP/1.1\r\nHost: shop.example\r\nConnection: x-secret\r\nX-Secret: 1\r\n\
Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nX-End-To-End: kept\r\n\r\n",
            )
            .await;
            let reply = read_reply(&mut stream).await;
            assert_eq!(reply.status, 200, "round {round}");
            let echoed = Echoed::of(&Bytes::from(reply.body));
            for name in ["x-secret", "keep-alive", "te", "proxy-connection"] {
                assert!(
                    echoed.all(name).is_empty(),
                    "round {round}: {name} reached the backend: {:?}",
                    echoed.headers
                );
            }
            // Whatever Connection the upstream client writes itself, the client's never arrives.
            assert!(
                echoed.all("connection").iter().all(|v| !v.contains("x-secret")),
                "round {round}: the client's Connection header reached the backend: {:?}",
                echoed.headers
            );
            assert_eq!(echoed.one("x-end-to-end"), Some("kept"), "round {round}");
            assert_eq!(echoed.one("host"), Some("shop.example"));
        }
    })
    .await;
}

/// RFC 9110 §7.6.1: a proxy MUST remove every field its `Connection` header names, however
/// many it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_header_naming_many_fields_removes_every_one() {
    bounded(async {
        let f = farm(1, Tracking::Links).await;
        let names: Vec<String> = (1..=12).map(|i| format!("x-private-{i}")).collect();
        let mut request = format!(
            "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close, {}\r\n",
            names.join(", ")
        );
        for name in &names {
            request.push_str(&format!("{name}: secret\r\n"));
        }
        request.push_str("X-End-To-End: kept\r\n\r\n");
        let reply = raw_exchange(f.addr(), None, request.as_bytes()).await;
        assert_eq!(reply.status, 200);
        let echoed = Echoed::of(&Bytes::from(reply.body));
        let leaked: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| !echoed.all(n).is_empty())
            .collect();
        assert!(
            leaked.is_empty(),
            "fields named by Connection reached the backend: {leaked:?}"
        );
        assert_eq!(echoed.one("x-end-to-end"), Some("kept"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_octet_stream_body_streams_back_byte_for_byte() {
    bounded(async {
        let f = farm(2, Tracking::Links).await;
        let client = support::client();
        let body = noise(8 << 20, 0x71de_6a7e);
        let reply = send(
            &client,
            Method::POST,
            &format!("{}/echo", f.base),
            &[("content-type", "application/octet-stream")],
            body.clone(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        let echoed = Echoed::of(&reply.body);
        assert_eq!(echoed.request_line, "POST /echo");
        assert_eq!(echoed.body.len(), body.len(), "body length changed");
        assert!(echoed.body == body, "body bytes changed on the way");
    })
    .await;
}

/// POSTs `body` to `/echo`; the reply must come from `image` (the body's `_s` routed it) and
/// echo the body byte for byte, with its length.
async fn post_through_echo(
    client: &support::HttpClient,
    base: &str,
    content_type: &str,
    body: &[u8],
    image: &str,
    what: &str,
) {
    let reply = send(
        client,
        Method::POST,
        &format!("{base}/echo"),
        &[("content-type", content_type)],
        body.to_vec(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.image(),
        image,
        "the {what} _s did not route to its session"
    );
    let echoed = Echoed::of(&reply.body);
    assert_eq!(echoed.body.len(), body.len(), "{what} body length changed");
    assert!(
        echoed.body == body,
        "{what} body bytes changed after the peek"
    );
    if let Some(len) = echoed.one("content-length") {
        assert_eq!(
            len,
            body.len().to_string(),
            "{what} content-length forwarded wrong"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peeked_form_bodies_route_by_their_session_and_arrive_byte_for_byte() {
    bounded(async {
        let f = farm(3, Tracking::Links).await;
        let client = support::client();
        let mut images_seen = HashSet::new();
        for seed in 0..3u64 {
            let (key, image) = open_session(&client, &f.base).await;
            images_seen.insert(image.clone());

            // Urlencoded, ~200 KiB: well past the 64 KiB peek, `_s` first.
            let filler: String = noise(200 * 1024, seed + 1)
                .iter()
                .map(|b| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789+%"[*b as usize % 38]))
                .collect();
            let form = format!("_s={key}&comment={filler}&tail=end").into_bytes();
            post_through_echo(
                &client,
                &f.base,
                "application/x-www-form-urlencoded",
                &form,
                &image,
                "urlencoded",
            )
            .await;

            // Multipart: the `_s` part first, then a binary file part of ~200 KiB.
            let boundary = "----tidegateProxyTestBoundaryQ3x9";
            let mut multipart = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"_s\"\r\n\r\n{key}\r\n\
--{boundary}\r\nContent-Disposition: form-data; name=\"upload\"; filename=\"blob.bin\"\r\n\
Content-Type: application/octet-stream\r\n\r\n"
            )
            .into_bytes();
            multipart.extend_from_slice(&noise(200 * 1024 + 7, seed + 100));
            multipart.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
            let content_type = format!("multipart/form-data; boundary={boundary}");
            post_through_echo(
                &client,
                &f.base,
                &content_type,
                &multipart,
                &image,
                "multipart",
            )
            .await;
        }
        assert_eq!(
            images_seen.len(),
            3,
            "sessions on every image: {images_seen:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_serves_and_keeps_sessions_pinned() {
    bounded(async {
        let f = farm(3, Tracking::Links).await;
        let h2 = support::h2c_client();
        for _ in 0..3 {
            let page = get(&h2, &format!("{}/app", f.base)).await;
            assert_eq!(page.status, StatusCode::OK);
            assert!(!page.image().is_empty(), "the page names its image");
            let key = page.key().expect("the first page links its session");
            let image = page.image();
            for i in 0..20u64 {
                let reply = get(&h2, &format!("{}/app?_s={key}&_k=x{i}", f.base)).await;
                assert_eq!(reply.status, StatusCode::OK);
                assert_eq!(reply.image(), image, "request {i}: the h2c session moved");
                assert_eq!(
                    reply.counter(),
                    i + 2,
                    "request {i}: the session state was lost"
                );
            }
        }
        assert_eq!(f.pins(), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_is_told_apart_when_the_first_bytes_arrive_in_pieces() {
    bounded(async {
        let f = farm(1, Tracking::Links).await;
        // The h2c preface in two writes: the balancer answers with its SETTINGS frame.
        let mut h2 = connect(f.addr(), None).await;
        write(&mut h2, b"PRI * HTTP/2.0\r\n").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        write(&mut h2, b"\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await;
        let mut frame = Vec::new();
        while frame.len() < 9 {
            assert!(
                read_more(&mut h2, &mut frame).await,
                "h2c connection closed"
            );
        }
        assert_eq!(frame[3], 0x4, "the first frame is SETTINGS: {frame:?}");
        // An HTTP/1.1 request whose first byte is also the preface's.
        let mut h1 = connect(f.addr(), None).await;
        write(&mut h1, b"P").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        write(
            &mut h1,
            b"OST /app HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let reply = read_reply(&mut h1).await;
        assert_eq!(reply.status, 200);
        assert!(String::from_utf8_lossy(&reply.body).contains("_s="));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through_pinned_to_its_session() {
    bounded(async {
        let f = farm(3, Tracking::Links).await;
        let client = support::client();
        let mut sessions = Vec::new();
        for _ in 0..3 {
            sessions.push(open_session(&client, &f.base).await);
        }
        let distinct: HashSet<_> = sessions.iter().map(|(_, image)| image.clone()).collect();
        assert_eq!(distinct.len(), 3, "one session per image: {sessions:?}");

        for round in 0..3 {
            for (key, image) in &sessions {
                let mut stream = connect(f.addr(), None).await;
                let request = format!(
                    "GET /ws?_s={key} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                );
                write(&mut stream, request.as_bytes()).await;
                let mut buf = Vec::new();
                let head_end = read_through(&mut stream, &mut buf, b"\r\n\r\n", 0).await;
                let (status, headers) = parse_head(&buf[..head_end - 4]);
                assert_eq!(status, 101, "round {round}: {:?}", String::from_utf8_lossy(&buf));
                let header = |name: &str| {
                    headers
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                assert_eq!(&header("x-image"), image, "round {round}: the upgrade left its session's image");
                assert!(header("upgrade").eq_ignore_ascii_case("websocket"));
                assert_eq!(buf.len(), head_end, "no bytes before the client spoke");

                // Small then large, written and read concurrently.
                for payload in [format!("hello {key} {round}").into_bytes(), noise(256 * 1024, round + 9)] {
                    let (mut rd, mut wr) = stream.split();
                    let writing = async {
                        wr.write_all(&payload).await.expect("tunnel write");
                    };
                    let reading = async {
                        let mut back = vec![0u8; payload.len()];
                        rd.read_exact(&mut back).await.expect("tunnel read");
                        back
                    };
                    let ((), back) = tokio::time::timeout(IO_LIMIT, async { tokio::join!(writing, reading) })
                        .await
                        .expect("echo through the tunnel within the I/O limit");
                    assert!(back == payload, "round {round}: the tunnel changed the bytes");
                }
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backend_gets_502_saying_why_without_naming_it() {
    bounded(async {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let running = balancer(&format!(
            "listen = [\"127.0.0.1:0\"]\n[[pool]]\nname = \"app\"\n\
[[pool.backend]]\nname = \"ghost-image\"\naddress = \"127.0.0.1:{port}\"\n"
        ))
        .await;
        let client = support::client();
        let reply = get(&client, &format!("http://{}/app", running.addrs()[0])).await;
        assert_text_refusal(&reply, StatusCode::BAD_GATEWAY);
        let text = reply.text();
        // Its name and address stay in the log, off the wire.
        assert!(
            !text.contains("ghost-image") && !text.contains(&port.to_string()),
            "the body names the backend: {text:?}"
        );
        assert!(
            text.contains("connection refused"),
            "the body says why: {text:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_with_every_backend_disabled_gets_503_naming_the_pool() {
    bounded(async {
        let f = farm(2, Tracking::Links).await;
        let client = support::client();
        // A pinned session first: even it has nowhere to go once every backend is disabled.
        let (key, _) = open_session(&client, &f.base).await;
        let pool = f.balancer.pool("app").unwrap();
        for backend in pool.backends().all() {
            backend.set_admin(AdminState::Disabled);
        }
        for path in [
            "/app".to_string(),
            format!("/app?_s={key}"),
            "/echo".to_string(),
        ] {
            let reply = get(&client, &format!("{}{path}", f.base)).await;
            assert_text_refusal(&reply, StatusCode::SERVICE_UNAVAILABLE);
            let text = reply.text();
            assert!(
                text.contains("pool app"),
                "{path}: the body names the pool: {text:?}"
            );
        }
        // Back up: served again.
        for backend in pool.backends().all() {
            backend.set_admin(AdminState::Active);
        }
        assert_eq!(
            get(&client, &format!("{}/app", f.base)).await.status,
            StatusCode::OK
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_route_by_host_and_path_prefix() {
    bounded(async {
        let shop = support::image(ImageOptions::new("shop-image")).await;
        let blog = support::image(ImageOptions::new("blog-image")).await;
        let admin = support::image(ImageOptions::new("admin-image")).await;
        let running = balancer(&format!(
            "listen = [\"127.0.0.1:0\"]\n\
[[pool]]\nname = \"shop\"\nhosts = [\"shop.test\"]\n\
[[pool.backend]]\nname = \"shop-image\"\naddress = \"{}\"\n\
[[pool]]\nname = \"blog\"\nhosts = [\"*.blog.test\"]\n\
[[pool.backend]]\nname = \"blog-image\"\naddress = \"{}\"\n\
[[pool]]\nname = \"admin\"\nhosts = [\"shop.test\"]\npath_prefix = \"/admin\"\n\
[[pool.backend]]\nname = \"admin-image\"\naddress = \"{}\"\n",
            shop.addr, blog.addr, admin.addr
        ))
        .await;
        let base = format!("http://{}", running.addrs()[0]);
        let client = support::client();
        let cases = [
            ("shop.test", "/echo", "shop-image"),
            ("shop.test", "/app", "shop-image"),
            ("SHOP.test:8080", "/echo", "shop-image"),
            ("shop.test", "/administrator", "shop-image"),
            ("shop.test", "/admin", "admin-image"),
            ("shop.test", "/admin/app", "admin-image"),
            ("shop.test", "/admin?x=1", "admin-image"),
            ("www.blog.test", "/echo", "blog-image"),
            ("a.b.blog.test", "/app", "blog-image"),
            ("www.blog.test", "/admin", "blog-image"),
        ];
        for (host, path, image) in cases {
            let reply = send(
                &client,
                Method::GET,
                &format!("{base}{path}"),
                &[("host", host)],
                Bytes::new(),
            )
            .await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "{host}{path}: {}",
                reply.text()
            );
            assert_eq!(reply.image(), image, "{host}{path} went to the wrong pool");
        }
        // No catch-all pool: anything else is refused with a short text.
        for (host, path) in [
            ("unknown.test", "/app"),
            ("blog.test", "/echo"),
            ("shop.test.evil", "/admin"),
        ] {
            let reply = send(
                &client,
                Method::GET,
                &format!("{base}{path}"),
                &[("host", host)],
                Bytes::new(),
            )
            .await;
            assert_text_refusal(&reply, StatusCode::NOT_FOUND);
            assert!(reply.image().is_empty(), "{host}{path} reached an image");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_4xx_and_the_balancer_keeps_serving() {
    bounded(async {
        let f = farm(1, Tracking::Links).await;
        let mut oversized = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Huge: ".to_vec();
        oversized.extend(std::iter::repeat_n(b'a', 1 << 20));
        oversized.extend_from_slice(b"\r\n\r\n");
        let requests: [(&str, Vec<u8>); 6] = [
            ("garbage", b"GARBAGE\r\n\r\n".to_vec()),
            (
                "HTTP/1.1 without Host",
                b"GET /echo HTTP/1.1\r\n\r\n".to_vec(),
            ),
            (
                "two Host fields",
                b"GET /echo HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n".to_vec(),
            ),
            (
                "header line without a colon",
                b"GET /echo HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n".to_vec(),
            ),
            (
                "control byte in a header name",
                b"GET /echo HTTP/1.1\r\nHost: x\r\nX-B\x01d: 1\r\n\r\n".to_vec(),
            ),
            ("over-long header line", oversized),
        ];
        for (what, request) in requests {
            let mut stream = connect(f.addr(), None).await;
            let (mut rd, mut wr) = stream.split();
            // The balancer may answer and close before it has read everything: write and read
            // at once, and ignore a write cut short.
            let writing = async {
                let _ = wr.write_all(&request).await;
            };
            let reading = async {
                let mut got = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match rd.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                    }
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                got
            };
            let ((), got) =
                tokio::time::timeout(IO_LIMIT, async { tokio::join!(writing, reading) })
                    .await
                    .unwrap_or_else(|_| panic!("{what}: no answer within the I/O limit"));
            let text = String::from_utf8_lossy(&got);
            assert!(
                text.starts_with("HTTP/1.1 4"),
                "{what}: expected a 4xx, got {text:?}"
            );
        }
        let client = support::client();
        let reply = get(&client, &format!("{}/echo", f.base)).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "still serving after malformed requests"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_mode_keeps_each_source_address_on_one_image() {
    bounded(async {
        let imgs = images(3, Tracking::Links).await;
        let running = balancer(&format!(
            "listen = [\"127.0.0.1:0\"]\n[[pool]]\nname = \"app\"\naffinity = \"client-ip\"\n{}",
            support::backend_entries(&imgs)
        ))
        .await;
        let to = running.addrs()[0];
        assert!(running.pool("app").unwrap().table().is_none(), "client-ip mode keeps no pin table");

        let mut tasks = Vec::new();
        for n in 2..=21 {
            tasks.push(tokio::spawn(async move {
                let source = format!("127.0.0.{n}");
                let mut seen = HashSet::new();
                for i in 0..10 {
                    // Cookies and ids must not matter in this mode.
                    let request = format!(
                        "GET /echo?_s=ignored{i} HTTP/1.1\r\nHost: x\r\nCookie: _s=other{i}\r\nConnection: close\r\n\r\n"
                    );
                    let reply = raw_exchange(to, Some(&format!("{source}:0")), request.as_bytes()).await;
                    assert_eq!(reply.status, 200, "{source}: {:?}", String::from_utf8_lossy(&reply.body));
                    assert!(reply.header("set-cookie").is_none(), "{source}: the balancer set a cookie");
                    let echoed = Echoed::of(&Bytes::from(reply.body.clone()));
                    assert_eq!(echoed.one("x-forwarded-for"), Some(source.as_str()));
                    seen.insert(reply.header("x-image").unwrap_or_default().to_string());
                }
                assert_eq!(seen.len(), 1, "{source} moved between images: {seen:?}");
                (source, seen.into_iter().next().unwrap())
            }));
        }
        let mut per_image: HashMap<String, usize> = HashMap::new();
        for t in tasks {
            let (_, image) = t.await.unwrap();
            *per_image.entry(image).or_default() += 1;
        }
        assert!(per_image.len() > 1, "every source hashed to one image: {per_image:?}");
        assert!(running.pool("app").unwrap().table().is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_uploads_arrive_byte_for_byte_peeked_or_not() {
    bounded(async {
        let f = farm(3, Tracking::Links).await;
        let client = support::client();
        for round in 0..3u64 {
            let (key, image) = open_session(&client, &f.base).await;
            // Odd chunk sizes, so `_s=KEY` straddles chunk boundaries.
            let size = [13usize, 1000, 16 * 1024][round as usize];
            let octets = noise(300 * 1024 + 5, round + 40);
            let filler: String = noise(150 * 1024, round + 50).iter().map(|b| char::from(b'a' + b % 26)).collect();
            let form = format!("_s={key}&comment={filler}").into_bytes();
            for (content_type, body) in [("application/octet-stream", octets), ("application/x-www-form-urlencoded", form)] {
                let mut request = format!(
                    "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                )
                .into_bytes();
                request.extend_from_slice(&chunked(&body, size));
                let reply = raw_exchange(f.addr(), None, &request).await;
                assert_eq!(reply.status, 200, "{content_type}, chunks of {size}");
                let echoed = Echoed::of(&Bytes::from(reply.body.clone()));
                assert_eq!(echoed.body.len(), body.len(), "{content_type}, chunks of {size}: length changed");
                assert!(echoed.body == body, "{content_type}, chunks of {size}: bytes changed");
                if content_type.ends_with("urlencoded") {
                    assert_eq!(
                        reply.header("x-image"),
                        Some(image.as_str()),
                        "chunks of {size}: the chunked form's _s did not route to its session"
                    );
                }
            }
        }
    })
    .await;
}

/// A form sent one byte a frame, ending with trailers, over HTTP/1.1 (one-byte chunks) and
/// HTTP/2 (one-byte DATA frames): the peek finds its session, and the image receives exactly
/// the bytes sent (trailers end the body; they are not forwarded). HTTP/2 itself closes a
/// connection with more than about a hundred tiny DATA frames waiting, so there the long form
/// comes in frames just above its threshold (256 bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_frames_with_trailers_arrive_byte_for_byte_through_the_peek() {
    bounded(async {
        let f = farm(3, Tracking::Links).await;
        let client = support::client();
        let (key, image) = open_session(&client, &f.base).await;
        // The session field first, so the peek finds it; filler past the 64 KiB peek bound.
        let filler: String = noise(70 * 1024, 91).iter().map(|b| char::from(b'a' + b % 26)).collect();
        for form in [format!("_s={key}&comment=short"), format!("_s={key}&comment={filler}")] {
            let form = form.into_bytes();
            let mut request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
Transfer-Encoding: chunked\r\nTrailer: x-checksum\r\nConnection: close\r\n\r\n"
                .to_vec();
            let mut body = chunked(&form, 1);
            body.truncate(body.len() - 2); // the last chunk's CRLF, so a trailer field can follow
            body.extend_from_slice(b"x-checksum: 1234\r\n\r\n");
            request.extend_from_slice(&body);
            let reply = raw_exchange(f.addr(), None, &request).await;
            assert_eq!(reply.status, 200, "HTTP/1.1, {} bytes", form.len());
            assert_eq!(reply.header("x-image"), Some(image.as_str()), "HTTP/1.1: the peek found the session");
            let echoed = Echoed::of(&Bytes::from(reply.body.clone()));
            assert!(echoed.body == form, "HTTP/1.1, {} bytes: the body changed", form.len());

            let h2_frame = if form.len() < 100 { 1 } else { 257 };
            let stream = connect(f.addr(), None).await;
            let (mut sender, connection) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .expect("h2c handshake");
            tokio::spawn(connection);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("x-checksum", http::HeaderValue::from_static("1234"));
            let request = http::Request::post(format!("{}/echo", f.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(support::Trickle::new(Bytes::from(form.clone()), Some(trailers)).in_frames_of(h2_frame))
                .unwrap();
            let reply = tokio::time::timeout(IO_LIMIT, sender.send_request(request))
                .await
                .expect("h2 reply within the I/O limit")
                .expect("h2 request succeeds");
            assert_eq!(reply.status(), 200, "HTTP/2, {} bytes", form.len());
            assert_eq!(reply.headers()["x-image"], image.as_str(), "HTTP/2: the peek found the session");
            let echoed = http_body_util::BodyExt::collect(reply.into_body()).await.unwrap().to_bytes();
            let echoed = Echoed::of(&echoed);
            assert!(echoed.body == form, "HTTP/2, {} bytes: the body changed", form.len());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_uploads_get_100_and_arrive_intact() {
    bounded(async {
        let f = farm(3, Tracking::Links).await;
        let client = support::client();
        let (key, image) = open_session(&client, &f.base).await;
        let form = format!("_s={key}&data={}", "z".repeat(100 * 1024)).into_bytes();
        let octets = noise(2 << 20, 77);
        for (content_type, body) in [("application/x-www-form-urlencoded", form), ("application/octet-stream", octets)] {
            let mut stream = connect(f.addr(), None).await;
            let head = format!(
                "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
                body.len()
            );
            write(&mut stream, head.as_bytes()).await;
            // As curl does: wait for the go-ahead before sending the body.
            let mut buf = Vec::new();
            let end = read_through(&mut stream, &mut buf, b"\r\n\r\n", 0).await;
            let (status, _) = parse_head(&buf[..end - 4]);
            assert_eq!(status, 100, "{content_type}: {:?}", String::from_utf8_lossy(&buf));
            assert_eq!(buf.len(), end, "{content_type}: nothing after 100 Continue");
            write(&mut stream, &body).await;
            let reply = read_reply(&mut stream).await;
            assert_eq!(reply.status, 200, "{content_type}");
            let echoed = Echoed::of(&Bytes::from(reply.body.clone()));
            assert!(echoed.body == body, "{content_type}: body changed");
            if content_type.ends_with("urlencoded") {
                assert_eq!(reply.header("x-image"), Some(image.as_str()), "the form's _s did not route");
            }
        }
    })
    .await;
}

/// A reverse proxy opens no tunnels: `CONNECT` is refused, never answered 2xx (which tells the
/// client a tunnel is open when none is) and never passed on to an image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_method_is_refused_not_tunnelled() {
    bounded(async {
        let f = farm(1, Tracking::Links).await;
        let mut stream = connect(f.addr(), None).await;
        write(
            &mut stream,
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        )
        .await;
        let mut buf = Vec::new();
        let end = read_through(&mut stream, &mut buf, b"\r\n\r\n", 0).await;
        let (status, _) = parse_head(&buf[..end - 4]);
        assert!(
            (400..600).contains(&status),
            "CONNECT was answered {status}: {:?}",
            String::from_utf8_lossy(&buf[..end])
        );
        assert_eq!(
            f.images[0].session_count(),
            0,
            "the CONNECT reached the image"
        );
    })
    .await;
}
