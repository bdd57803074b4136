//! HTTP/2 cannot make tidegate hold more than its limits: a connection gets at most
//! `http2_max_streams` streams, all connections together at most `http2_max_requests`
//! requests in flight (more are answered 503 at once), and a stream that takes none of its
//! reply for `client_timeout` — while another stream trickles to keep the connection
//! looking busy — gets its connection closed, freeing the backend connections it held.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use support::{Process, client, h2c_client, metric, try_send};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future<Output = ()>>(what: &str, body: F) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {TEST_LIMIT:?}"));
}

/// A backend answering every request, `delay` after its head, with `size` bytes; it counts
/// the connections open to it.
async fn backend(delay: Duration, size: usize) -> (SocketAddr, std::sync::Arc<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = std::sync::Arc::new(());
    let counter = open.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let held = counter.clone();
            tokio::spawn(async move {
                let _held = held;
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                loop {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    head.drain(..end);
                    tokio::time::sleep(delay).await;
                    let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
                    if stream.write_all(reply.as_bytes()).await.is_err()
                        || stream.write_all(&vec![b'x'; size]).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, open)
}

fn config(backend: SocketAddr, extra: &str) -> String {
    format!(
        "{extra}[[pool]]\nname = \"app\"\naffinity = \"client-ip\"\n[[pool.backend]]\naddress = \"{backend}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_offered_http2_max_streams() {
    bounded("max streams", async {
        let (b, _) = backend(Duration::ZERO, 10).await;
        let p = Process::start(&config(b, "http2_max_streams = 7\n")).await;
        let tcp = TcpStream::connect(p.listen).await.unwrap();
        let (mut send, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        // The server's SETTINGS arrive with the first exchange.
        let req = Request::get(format!("http://{}/x", p.listen))
            .body(())
            .unwrap();
        send = send.ready().await.unwrap();
        let (reply, _) = send.send_request(req, true).unwrap();
        let reply = reply.await.unwrap();
        assert_eq!(reply.status(), StatusCode::OK);
        send = send.ready().await.unwrap();
        assert_eq!(send.current_max_send_streams(), 7);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_http2_max_requests_are_refused_at_once() {
    bounded("max requests", async {
        let (b, _) = backend(Duration::from_millis(1500), 10).await;
        let p = Process::start(&config(b, "http2_max_requests = 2\n")).await;
        let c = h2c_client();
        let url = format!("{}/slow", p.base());
        let mut calls = Vec::new();
        for _ in 0..3 {
            let (c, url) = (c.clone(), url.clone());
            calls.push(tokio::spawn(async move {
                let started = Instant::now();
                let r = try_send(&c, Method::GET, &url, &[], Bytes::new())
                    .await
                    .unwrap();
                (r, started.elapsed())
            }));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut statuses = Vec::new();
        for call in calls {
            let (r, took) = call.await.unwrap();
            if r.status == StatusCode::SERVICE_UNAVAILABLE {
                assert!(
                    took < Duration::from_millis(1000),
                    "refused at once: {took:?}"
                );
                assert_eq!(r.header("retry-after"), "1");
                assert!(
                    r.text().contains("too many requests in flight"),
                    "{}",
                    r.text()
                );
            }
            statuses.push(r.status);
        }
        statuses.sort();
        assert_eq!(
            statuses,
            [
                StatusCode::OK,
                StatusCode::OK,
                StatusCode::SERVICE_UNAVAILABLE
            ]
        );
        let m = p.metrics(&client()).await;
        assert_eq!(
            metric(
                &m,
                "tidegate_client_errors_total{kind=\"too-many-requests\"}"
            ),
            1.0,
            "{m}"
        );
        // Slots come back: the next request goes through.
        let r = try_send(&c, Method::GET, &url, &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_takes_none_of_its_reply_closes_its_connection() {
    bounded("stalled stream", async {
        // Replies far larger than a stream's window.
        let (b, open) = backend(Duration::ZERO, 8 * 1024 * 1024).await;
        let p = Process::start(&config(b, "client_timeout = 1\n")).await;
        let tcp = TcpStream::connect(p.listen).await.unwrap();
        // Default stream windows (64 KiB), a connection window that the stalled streams'
        // unread data never fills.
        let (send, connection) = h2::client::Builder::new()
            .initial_connection_window_size(64 * 1024 * 1024)
            .handshake::<_, Bytes>(tcp)
            .await
            .unwrap();
        let ended = tokio::spawn(async move {
            let _ = connection.await;
            Instant::now()
        });
        let url = format!("http://{}/big", p.listen);
        // Ten streams never read: each holds a backend connection.
        let mut stalled = Vec::new();
        let mut send = send;
        for _ in 0..10 {
            send = send.ready().await.unwrap();
            let (reply, _) = send
                .send_request(Request::get(&url).body(()).unwrap(), true)
                .unwrap();
            stalled.push(reply);
        }
        // One stream trickles: a chunk taken every 50 ms keeps the connection moving (its
        // reply is read from the backend and written out all the time).
        send = send.ready().await.unwrap();
        let (reply, _) = send
            .send_request(Request::get(&url).body(()).unwrap(), true)
            .unwrap();
        let started = Instant::now();
        let trickle = tokio::spawn(async move {
            let Ok(reply) = reply.await else { return };
            let mut body = reply.into_body();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            std::sync::Arc::strong_count(&open) > 10,
            "the stalled streams hold backend connections"
        );
        let closed_at = tokio::time::timeout(Duration::from_secs(10), ended)
            .await
            .expect("the connection is closed while its trickle goes on")
            .unwrap();
        // Found in one to two periods, then one more of grace after the GOAWAY.
        assert!(
            closed_at.duration_since(started) < Duration::from_secs(5),
            "{:?}",
            closed_at.duration_since(started)
        );
        trickle.abort();
        drop(stalled);
        // The backend connections go with it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::sync::Arc::strong_count(&open) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            std::sync::Arc::strong_count(&open) <= 3,
            "backend connections still held: {}",
            std::sync::Arc::strong_count(&open) - 1
        );
        let m = p.metrics(&client()).await;
        assert_eq!(
            metric(&m, "tidegate_client_errors_total{kind=\"stalled-stream\"}"),
            1.0,
            "{m}"
        );
    })
    .await;
}

/// Whether the HTTP/2 connection `connection` (after one request) is closed within `limit`.
async fn h2_idle_closed_within(addr: SocketAddr, path: &str, limit: Duration) -> bool {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let ended = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut send = send.ready().await.unwrap();
    let req = Request::get(format!("http://{addr}{path}"))
        .body(())
        .unwrap();
    let (reply, _) = send.send_request(req, true).unwrap();
    let _ = reply.await.unwrap();
    // Nothing more: the connection idles.
    let closed = tokio::time::timeout(limit, ended).await.is_ok();
    drop(send);
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_and_redirect_listeners_close_idle_connections_and_take_slots() {
    bounded("side listeners", async {
        let (b, _) = backend(Duration::ZERO, 10).await;
        let certs = concat!(env!("CARGO_MANIFEST_DIR"), "/certs");
        let (tls, redirect) = (support::free_addr(), support::free_addr());
        let p = Process::start(&format!(
            "client_timeout = 1\nmax_connections = 1\nlisten_tls = [\"{tls}\"]\n[tls]\n\
             redirect_http = [\"{redirect}\"]\n[[tls.certificate]]\ncert = \"{certs}/localhost.pem\"\n\
             key = \"{certs}/localhost.key\"\n{}",
            config(b, "")
        ))
        .await;
        // An idle h2c connection is closed within two periods and a bit (it was kept for
        // ever before).
        for (addr, path) in [(p.admin, "/healthz"), (redirect, "/x")] {
            assert!(
                h2_idle_closed_within(addr, path, Duration::from_secs(5)).await,
                "an idle HTTP/2 connection to {addr} stays open"
            );
        }
        // The redirect listener's connections take traffic's slots: with one taken, the
        // next connection waits in the accept queue until it frees.
        let held = TcpStream::connect(p.listen).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut waiting = TcpStream::connect(redirect).await.unwrap();
        waiting
            .write_all(b"GET /x HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut answer = vec![0u8; 1024];
        assert!(
            tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut answer))
                .await
                .is_err(),
            "answered while every connection slot was taken"
        );
        drop(held);
        let n = tokio::time::timeout(Duration::from_secs(5), waiting.read(&mut answer))
            .await
            .expect("answered once the slot freed")
            .unwrap();
        assert!(
            String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 308"),
            "{}",
            String::from_utf8_lossy(&answer[..n])
        );
    })
    .await;
}
