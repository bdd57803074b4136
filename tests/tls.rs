//! TLS termination end to end: real clients (curl, `openssl s_client`, a rustls client)
//! against a balancer serving certificates made at test time by a small test CA.
//!
//! The CA issues two leaves: `ab` for `a.test` and `*.b.test`, and `c` for `c.test`. Every
//! external command is bounded and killed when it overruns; every wait has a deadline.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use support::Reply;
use support::pki::{Leaf, Pki};
use tidegate::config::Config;
use tidegate::core::affinity::PinKey;
use tidegate::demo::{Image, Tracking};
use tidegate::server::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const BIN: &str = env!("CARGO_BIN_EXE_tidegate");
/// The most one external command (curl, openssl, `tidegate check`) may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(15);
/// The most one in-process TLS exchange may take.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);
/// The most a reload may take to show.
const RELOAD_LIMIT: Duration = Duration::from_secs(6);

/// A raw `/echo` request, as typed into `s_client`.
const ECHO_REQUEST: &[u8] = b"GET /echo HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";

// ---------------------------------------------------------------------------------------
// Certificates

/// The base64 body of the first PEM certificate in `text`, whitespace removed: what two
/// prints of the same certificate share.
fn first_pem(text: &str) -> Option<String> {
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let end = text[start..].find("-----END CERTIFICATE-----")? + start;
    Some(
        text[start + "-----BEGIN CERTIFICATE-----".len()..end]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect(),
    )
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("a PEM certificate")
        .to_vec()
}

// ---------------------------------------------------------------------------------------
// The balancer

/// A balancer with TLS in front of demo images, and its files.
struct Farm {
    running: Running,
    dir: support::TempDir,
    pki: Pki,
    ab: Leaf,
    c: Leaf,
    _images: Vec<Image>,
}

/// `[tls]` lines, `[[pool]]` lines, and the certificate order of a farm.
struct Setup<'a> {
    tls: &'a str,
    pool: &'a str,
    /// `true`: `[[tls.certificate]]` c first, then ab.
    c_first: bool,
    images: usize,
    /// An admin listener on a free port (its metrics), else none.
    admin: bool,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            tls: "",
            pool: "",
            c_first: false,
            images: 2,
            admin: false,
        }
    }
}

/// The config text: a plain and a TLS listener on 127.0.0.1 (free ports), the admin listener
/// `admin` (`off`, or an address), certificate paths relative to the config file.
fn config_text(
    admin: &str,
    tls: &str,
    certs: &[(&str, &str)],
    pool: &str,
    backends: &str,
) -> String {
    let certs: String = certs
        .iter()
        .map(|(c, k)| format!("[[tls.certificate]]\ncert = \"{c}\"\nkey = \"{k}\"\n"))
        .collect();
    format!(
        "admin = \"{admin}\"\nlisten = [\"127.0.0.1:0\"]\nlisten_tls = [\"127.0.0.1:0\"]\n[tls]\n{tls}\n{certs}\
         [[pool]]\nname = \"app\"\n{pool}\n{backends}"
    )
}

async fn farm(label: &str, setup: Setup<'_>) -> Farm {
    let dir = support::TempDir::new(label);
    let pki = Pki::new();
    let ab = pki.leaf(&["a.test", "*.b.test"], 2020, 2090);
    let c = pki.leaf(&["c.test"], 2020, 2091);
    dir.write("ca.pem", &pki.pem);
    dir.write("ab.pem", &ab.cert);
    dir.write("ab.key", &ab.key);
    dir.write("c.pem", &c.cert);
    dir.write("c.key", &c.key);
    // As if written a minute ago: a replacement right after start then has another
    // modification time, even where file times are coarse (a few milliseconds).
    let minute_ago = std::time::SystemTime::now() - Duration::from_secs(60);
    for name in ["ab.pem", "ab.key", "c.pem", "c.key"] {
        std::fs::File::options()
            .write(true)
            .open(dir.path(name))
            .and_then(|file| file.set_modified(minute_ago))
            .expect("file time set");
    }
    let images = support::images(setup.images, Tracking::Links).await;
    let certs = if setup.c_first {
        [("c.pem", "c.key"), ("ab.pem", "ab.key")]
    } else {
        [("ab.pem", "ab.key"), ("c.pem", "c.key")]
    };
    let text = config_text(
        if setup.admin { "127.0.0.1:0" } else { "off" },
        setup.tls,
        &certs,
        setup.pool,
        &support::backend_entries(&images),
    );
    let config = Config::from_toml(&text, &dir.arg("tidegate.toml"))
        .unwrap_or_else(|e| panic!("test config is valid: {e}\n{text}"));
    let running = tidegate::server::start(&config)
        .await
        .expect("balancer starts");
    Farm {
        running,
        dir,
        pki,
        ab,
        c,
        _images: images,
    }
}

impl Farm {
    fn tls_port(&self) -> u16 {
        self.running.tls_addrs()[0].port()
    }

    fn plain(&self) -> SocketAddr {
        self.running.addrs()[0]
    }

    fn ca(&self) -> String {
        self.dir.arg("ca.pem")
    }

    /// curl over HTTPS to `https://HOST:PORT{path}` with the test CA.
    async fn curl_https(&self, host: &str, path: &str, extra: &[&str]) -> Result<Http, String> {
        let port = self.tls_port();
        let mut args = vec![
            "--resolve".to_string(),
            format!("{host}:{port}:127.0.0.1"),
            "--cacert".to_string(),
            self.ca(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(format!("https://{host}:{port}{path}"));
        curl(&args).await
    }

    /// curl over plain HTTP to the plain listener.
    async fn curl_plain(&self, path: &str) -> Http {
        let addr = self.plain();
        let args = vec![
            "--resolve".to_string(),
            format!("a.test:{}:{}", addr.port(), addr.ip()),
            format!("http://a.test:{}{path}", addr.port()),
        ];
        curl(&args).await.expect("plain curl succeeds")
    }

    fn client(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        client_config(&self.pki.pem, alpn)
    }
}

// ---------------------------------------------------------------------------------------
// External clients

/// Runs `program` with `stdin` fed and closed; killed if it outlives [`COMMAND_LIMIT`].
async fn run(program: &str, args: &[String], stdin: &[u8]) -> Output {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("{program} runs (tests/run.sh installs it): {e}"));
    let mut input = child.stdin.take().expect("stdin piped");
    let data = stdin.to_vec();
    let feed = async move {
        let _ = input.write_all(&data).await;
        drop(input);
    };
    let exchange = async { tokio::join!(feed, child.wait_with_output()).1 };
    tokio::time::timeout(COMMAND_LIMIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within {COMMAND_LIMIT:?}"))
        .expect("the command runs")
}

fn text_of(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A reply as curl saw it.
#[derive(Debug)]
struct Http {
    status: u16,
    version: String,
    head: String,
    body: String,
}

impl Http {
    /// Every value of header `name` (case-insensitive).
    fn headers(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers(name).into_iter().next()
    }
}

/// curl with the head dumped before the body and the status and HTTP version after it.
async fn curl(args: &[String]) -> Result<Http, String> {
    let mut all = vec![
        "-sS".to_string(),
        "--max-time".to_string(),
        "10".to_string(),
        "-D".to_string(),
        "-".to_string(),
        "-w".to_string(),
        "\n@@%{http_code} %{http_version}".to_string(),
    ];
    all.extend_from_slice(args);
    let out = run("curl", &all, b"").await;
    if !out.status.success() {
        return Err(format!("curl {args:?}: {}: {}", out.status, text_of(&out)));
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (reply, meta) = stdout
        .rsplit_once("\n@@")
        .unwrap_or_else(|| panic!("curl wrote its -w line: {stdout:?}"));
    let (status, version) = meta.trim().split_once(' ').expect("status and version");
    // With -L every reply's head is dumped: keep the last one.
    let (mut head, mut body) = reply.split_once("\r\n\r\n").unwrap_or((reply, ""));
    while body.starts_with("HTTP/") {
        (head, body) = body.split_once("\r\n\r\n").unwrap_or((body, ""));
    }
    Ok(Http {
        status: status.parse().expect("numeric status"),
        version: version.to_string(),
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// `openssl s_client -connect 127.0.0.1:PORT ARGS` with `stdin`; whether it succeeded and
/// everything it printed.
async fn s_client(port: u16, args: &[&str], stdin: &[u8]) -> (bool, String) {
    let mut all = vec![
        "s_client".to_string(),
        "-connect".to_string(),
        format!("127.0.0.1:{port}"),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    let out = run("openssl", &all, stdin).await;
    (out.status.success(), text_of(&out))
}

/// The leaf certificate `s_client` received with server name `sni` (`None`: no SNI), as
/// whitespace-free base64, and `openssl x509 -subject -ext subjectAltName` of it.
async fn served_leaf(port: u16, sni: Option<&str>) -> (String, String) {
    let mut args = vec!["-showcerts"];
    match sni {
        Some(name) => args.extend(["-servername", name]),
        None => args.push("-noservername"),
    }
    let (ok, out) = s_client(port, &args, b"").await;
    assert!(ok, "s_client {sni:?} handshakes:\n{out}");
    let start = out
        .find("-----BEGIN CERTIFICATE-----")
        .unwrap_or_else(|| panic!("s_client printed a certificate:\n{out}"));
    let end = out[start..]
        .find("-----END CERTIFICATE-----")
        .expect("PEM end")
        + start;
    let pem = format!("{}-----END CERTIFICATE-----\n", &out[start..end]);
    let x509 = run(
        "openssl",
        &[
            "x509".to_string(),
            "-noout".to_string(),
            "-subject".to_string(),
            "-ext".to_string(),
            "subjectAltName".to_string(),
        ],
        pem.as_bytes(),
    )
    .await;
    assert!(x509.status.success(), "openssl x509: {}", text_of(&x509));
    (first_pem(&pem).expect("PEM body"), text_of(&x509))
}

// ---------------------------------------------------------------------------------------
// The rustls client

fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(der_of(ca_pem)))
        .expect("test CA is a valid root");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every connection a full handshake: the certificate it reports is the one served now.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// A verified TLS connection to 127.0.0.1:`port` for `name`.
async fn tls_connect(
    port: u16,
    name: &str,
    config: &Arc<ClientConfig>,
) -> Result<TlsStream<TcpStream>, String> {
    let connect = async {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        TlsConnector::from(config.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))
    };
    tokio::time::timeout(EXCHANGE_LIMIT, connect)
        .await
        .map_err(|_| "handshake timed out".to_string())?
}

/// The DER of the leaf the server presented.
fn peer_leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default()
}

type Sender1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type Sender2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn http1_over(stream: TlsStream<TcpStream>) -> Result<Sender1, String> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
    });
    Ok(sender)
}

async fn http2_over(stream: TlsStream<TcpStream>) -> Result<Sender2, String> {
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
    });
    Ok(sender)
}

async fn collect(
    reply: Result<http::Response<hyper::body::Incoming>, hyper::Error>,
) -> Result<Reply, String> {
    let (parts, body) = reply.map_err(|e| e.to_string())?.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// GET `path` with `Host: a.test` on an HTTP/1.1 connection.
async fn get1(sender: &mut Sender1, path: &str) -> Result<Reply, String> {
    let req = Request::get(path)
        .header("host", "a.test")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let exchange = async {
        sender.ready().await.map_err(|e| e.to_string())?;
        collect(sender.send_request(req).await).await
    };
    tokio::time::timeout(EXCHANGE_LIMIT, exchange)
        .await
        .map_err(|_| format!("GET {path} timed out"))?
}

/// GET `https://a.test{path}` on an HTTP/2 connection.
async fn get2(sender: &mut Sender2, path: &str) -> Result<Reply, String> {
    let req = Request::get(format!("https://a.test{path}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let exchange = async {
        sender.ready().await.map_err(|e| e.to_string())?;
        collect(sender.send_request(req).await).await
    };
    tokio::time::timeout(EXCHANGE_LIMIT, exchange)
        .await
        .map_err(|_| format!("GET {path} timed out"))?
}

/// One GET on a fresh TLS connection (a full handshake each time): the reply and the leaf
/// the server presented.
async fn get_on_new_connection(
    port: u16,
    config: &Arc<ClientConfig>,
    path: &str,
) -> Result<(Reply, Vec<u8>), String> {
    let stream = tls_connect(port, "a.test", config).await?;
    let leaf = peer_leaf(&stream);
    let mut sender = http1_over(stream).await?;
    let reply = get1(&mut sender, path).await?;
    Ok((reply, leaf))
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
async fn eventually(limit: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_http1_and_http2_over_tls_and_backends_see_forwarded_proto_https() {
    let f = farm("curl", Setup::default()).await;
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let reply = f
            .curl_https("a.test", "/echo", &[flag])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reply.status, 200, "{flag}: {reply:?}");
        assert_eq!(reply.version, version, "{flag} negotiated by ALPN");
        assert!(
            reply
                .body
                .lines()
                .any(|l| l.eq_ignore_ascii_case("x-forwarded-proto: https")),
            "{flag}: the backend sees x-forwarded-proto: https:\n{}",
            reply.body
        );
        assert!(!reply.header("x-image").unwrap_or_default().is_empty());
    }
    // The plain listener of the same balancer says http.
    let plain = f.curl_plain("/echo").await;
    assert!(
        plain.body.contains("x-forwarded-proto: http\n"),
        "{}",
        plain.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_handshakes_with_tls12_and_tls13_and_min_version_13_refuses_tls12() {
    let f = farm("versions", Setup::default()).await;
    let ca = f.ca();
    for (flag, protocol) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (ok, out) = s_client(
            f.tls_port(),
            &[flag, "-servername", "a.test", "-CAfile", &ca],
            b"",
        )
        .await;
        assert!(ok, "{flag} handshakes:\n{out}");
        assert!(
            out.contains(&format!("New, {protocol}, Cipher is")),
            "{flag} negotiates {protocol}:\n{out}"
        );
        assert!(
            out.contains("Verify return code: 0 (ok)"),
            "chain verifies:\n{out}"
        );
    }

    let strict = farm(
        "versions13",
        Setup {
            tls: "min_version = \"1.3\"",
            ..Setup::default()
        },
    )
    .await;
    let (ok, out) = s_client(
        strict.tls_port(),
        &["-tls1_2", "-servername", "a.test"],
        b"",
    )
    .await;
    assert!(!ok, "TLS 1.2 is refused with min_version = 1.3:\n{out}");
    assert!(!out.contains("New, TLSv1.2"), "{out}");
    let (ok, out) = s_client(
        strict.tls_port(),
        &["-tls1_3", "-servername", "a.test"],
        b"",
    )
    .await;
    assert!(
        ok && out.contains("New, TLSv1.3"),
        "TLS 1.3 still works:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_chooses_the_exact_name_then_the_wildcard_then_the_first_certificate() {
    let f = farm("sni", Setup::default()).await;
    let ab = first_pem(&f.ab.cert).unwrap();
    let c = first_pem(&f.c.cert).unwrap();
    let cases: [(Option<&str>, &str, &str); 7] = [
        (Some("a.test"), &ab, "a.test"),
        (Some("c.test"), &c, "c.test"),
        (Some("C.Test"), &c, "c.test (case-insensitive)"),
        (Some("x.b.test"), &ab, "the wildcard *.b.test"),
        (
            Some("unknown.test"),
            &ab,
            "the default (first) for an unknown name",
        ),
        (None, &ab, "the default (first) without SNI"),
        (
            Some("b.test"),
            &ab,
            "the default: *.b.test does not cover b.test",
        ),
    ];
    for (sni, want, why) in cases {
        let (leaf, x509) = served_leaf(f.tls_port(), sni).await;
        assert_eq!(leaf, want, "SNI {sni:?} gets {why}; x509 says:\n{x509}");
    }
    let (_, x509) = served_leaf(f.tls_port(), Some("c.test")).await;
    assert!(
        x509.contains("CN = c.test") && x509.contains("DNS:c.test"),
        "{x509}"
    );
    let (_, x509) = served_leaf(f.tls_port(), Some("x.b.test")).await;
    assert!(
        x509.contains("CN = a.test") && x509.contains("DNS:*.b.test"),
        "{x509}"
    );

    // With c first, the default changes, the wildcard does not.
    let g = farm(
        "sni-c-first",
        Setup {
            c_first: true,
            ..Setup::default()
        },
    )
    .await;
    let ab = first_pem(&g.ab.cert).unwrap();
    let c = first_pem(&g.c.cert).unwrap();
    let cases: [(Option<&str>, &str, &str); 6] = [
        (
            Some("x.b.test"),
            &ab,
            "the wildcard *.b.test, not the default",
        ),
        (Some("a.test"), &ab, "a.test"),
        (Some("c.test"), &c, "c.test"),
        (None, &c, "the first (c) without SNI"),
        (
            Some("unknown.test"),
            &c,
            "the first (c) for an unknown name",
        ),
        (
            Some("y.x.b.test"),
            &c,
            "the first: a wildcard covers one label only",
        ),
    ];
    for (sni, want, why) in cases {
        let (leaf, x509) = served_leaf(g.tls_port(), sni).await;
        assert_eq!(leaf, want, "SNI {sni:?} gets {why}; x509 says:\n{x509}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_with_tls12_and_tls13() {
    let f = farm(
        "resume",
        Setup {
            admin: true,
            ..Setup::default()
        },
    )
    .await;
    for (flag, protocol) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let session = f.dir.arg(&format!("session{flag}.pem"));
        let common = [flag, "-servername", "a.test", "-ign_eof"];
        let (ok, first) = s_client(
            f.tls_port(),
            &[&common[..], &["-sess_out", &session]].concat(),
            ECHO_REQUEST,
        )
        .await;
        assert!(ok, "{flag} first connection:\n{first}");
        assert!(
            first.contains(&format!("New, {protocol}")),
            "{flag} first connection is a full handshake:\n{first}"
        );
        assert!(
            first.contains("HTTP/1.1 200"),
            "the request was answered:\n{first}"
        );
        assert!(
            Path::new(&session).exists(),
            "{flag}: s_client saved a session"
        );
        let (ok, second) = s_client(
            f.tls_port(),
            &[&common[..], &["-sess_in", &session]].concat(),
            ECHO_REQUEST,
        )
        .await;
        assert!(ok, "{flag} second connection:\n{second}");
        assert!(
            second.contains(&format!("Reused, {protocol}")),
            "{flag}: the second connection resumes the session:\n{second}"
        );
        assert!(second.contains("HTTP/1.1 200"), "{second}");
    }
    // The metrics tell resumed handshakes from full ones: 2 handshakes per version (s_client
    // offers no ALPN), 2 of the 4 resumed.
    let admin = f.running.admin_addr().expect("admin listener");
    let metrics = curl(&[format!("http://{admin}/metrics")])
        .await
        .expect("metrics answered")
        .body;
    for version in ["TLSv1.2", "TLSv1.3"] {
        let series =
            format!("tidegate_tls_handshakes_total{{version=\"{version}\",alpn=\"none\"}}");
        assert_eq!(
            support::metric(&metrics, &series),
            2.0,
            "{series}:\n{metrics}"
        );
    }
    assert_eq!(
        support::metric(&metrics, "tidegate_tls_resumed_handshakes_total"),
        2.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_stay_pinned_over_tls_with_http2_and_http1() {
    let f = farm(
        "pinned",
        Setup {
            images: 3,
            ..Setup::default()
        },
    )
    .await;
    let pool = f.running.pool("app").unwrap();
    let table = pool.table().unwrap();

    // HTTP/2: one connection, the session learned from the first page.
    let h2 = f.client(&[b"h2"]);
    let stream = tls_connect(f.tls_port(), "a.test", &h2).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut sender = http2_over(stream).await.unwrap();
    let first = get2(&mut sender, "/app").await.unwrap();
    assert_eq!(first.status, StatusCode::OK);
    let key = first.key().expect("the page names its session");
    assert!(
        table.get(PinKey::of(&key)).is_some(),
        "pin learned from the page"
    );
    for n in 2..=21 {
        let r = get2(&mut sender, &format!("/app?_s={key}&_k=k{n}"))
            .await
            .unwrap();
        assert_eq!(
            (r.image(), r.counter()),
            (first.image(), n),
            "h2 request {n}"
        );
    }

    // HTTP/1.1: every request on a new TLS connection, so only the pin keeps them together.
    let h1 = f.client(&[b"http/1.1"]);
    let (first, _) = get_on_new_connection(f.tls_port(), &h1, "/app")
        .await
        .unwrap();
    let key = first.key().expect("the page names its session");
    assert!(table.get(PinKey::of(&key)).is_some());
    for n in 2..=21 {
        let (r, _) = get_on_new_connection(f.tls_port(), &h1, &format!("/app?_s={key}&_k=k{n}"))
            .await
            .unwrap();
        assert_eq!(
            (r.image(), r.counter()),
            (first.image(), n),
            "h1 request {n}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_without_alpn_may_speak_http2_or_http1() {
    let f = farm("no-alpn", Setup::default()).await;
    let none = f.client(&[]);
    let stream = tls_connect(f.tls_port(), "a.test", &none).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
    let mut h2 = http2_over(stream).await.unwrap();
    assert_eq!(get2(&mut h2, "/app").await.unwrap().status, StatusCode::OK);
    let stream = tls_connect(f.tls_port(), "a.test", &none).await.unwrap();
    let mut h1 = http1_over(stream).await.unwrap();
    assert_eq!(get1(&mut h1, "/app").await.unwrap().status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_chose_http1_by_alpn_is_served_http1_only() {
    // HTTP/2 after choosing `http/1.1` is refused: such a connection is served by the
    // HTTP/1.1 server alone, whose timeouts are HTTP/1.1's.
    let f = farm("alpn-h1", Setup::default()).await;
    let h1 = f.client(&[b"http/1.1"]);
    let stream = tls_connect(f.tls_port(), "a.test", &h1).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let h2 = http2_over(stream).await;
    let refused = match h2 {
        Err(_) => true,
        Ok(mut sender) => get2(&mut sender, "/app").await.is_err(),
    };
    assert!(
        refused,
        "HTTP/2 was served on a connection that chose http/1.1"
    );
    let stream = tls_connect(f.tls_port(), "a.test", &h1).await.unwrap();
    let mut sender = http1_over(stream).await.unwrap();
    assert_eq!(
        get1(&mut sender, "/app").await.unwrap().status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_cookie_set_over_tls_is_secure_and_over_plain_http_is_not() {
    let f = farm(
        "cookie",
        Setup {
            pool: "[pool.affinity_cookie]\nsecret = \"0123456789abcdef-tls-test\"\n",
            ..Setup::default()
        },
    )
    .await;
    let cookie_of = |r: &Http| {
        r.headers("set-cookie")
            .into_iter()
            .find(|c| c.starts_with("tidegate="))
            .unwrap_or_else(|| panic!("an affinity cookie is set: {}", r.head))
    };
    for flag in ["--http1.1", "--http2"] {
        let tls = f.curl_https("a.test", "/app", &[flag]).await.unwrap();
        assert_eq!(tls.status, 200);
        let cookie = cookie_of(&tls);
        assert!(
            cookie.split(';').any(|a| a.trim() == "Secure"),
            "{flag}: {cookie}"
        );
    }
    let plain = f.curl_plain("/app").await;
    assert_eq!(plain.status, 200);
    let cookie = cookie_of(&plain);
    assert!(
        !cookie
            .split(';')
            .any(|a| a.trim().eq_ignore_ascii_case("secure")),
        "{cookie}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificate_reload_under_load_loses_no_request_and_a_broken_file_keeps_the_old_one() {
    let f = farm(
        "reload",
        Setup {
            tls: "reload_check_interval = 1",
            ..Setup::default()
        },
    )
    .await;
    let config = f.client(&[b"http/1.1"]);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let leaves = Arc::new(Mutex::new(HashSet::<Vec<u8>>::new()));
    let mut load = tokio::task::JoinSet::new();
    for task in 0..4 {
        let (port, config) = (f.tls_port(), config.clone());
        let (stop, failures, leaves) = (stop.clone(), failures.clone(), leaves.clone());
        load.spawn(async move {
            let mut done = 0usize;
            while done < 75 || !stop.load(Ordering::Relaxed) {
                done += 1;
                match get_on_new_connection(port, &config, "/echo").await {
                    Ok((r, leaf)) if r.status == StatusCode::OK => {
                        leaves.lock().unwrap().insert(leaf);
                    }
                    Ok((r, _)) => failures
                        .lock()
                        .unwrap()
                        .push(format!("task {task} request {done}: status {}", r.status)),
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("task {task} request {done}: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            done
        });
    }

    // The load is underway before the first replacement.
    let underway = eventually(Duration::from_secs(10), async || {
        leaves.lock().unwrap().len() + failures.lock().unwrap().len() > 0
    })
    .await;
    assert!(underway, "the load starts");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let served = || f.running.certificates().expect("TLS is on").certs()[0].not_after;
    assert_eq!(served(), f.ab.not_after);
    let mut current = der_of(&f.ab.cert);
    for generation in 1..=3 {
        if generation == 3 {
            // A broken certificate file: the reload fails, the previous certificate serves.
            let before = served();
            f.dir.write("ab.pem", "this is not a certificate\n");
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert_eq!(
                served(),
                before,
                "a garbage file does not replace the certificate"
            );
            let (reply, leaf) = get_on_new_connection(f.tls_port(), &config, "/echo")
                .await
                .expect("still serving after a garbage file");
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(leaf, current, "the previous certificate keeps serving");
        }
        let next = f.pki.leaf(&["a.test", "*.b.test"], 2020, 2090 + generation);
        f.dir.write("ab.key", &next.key);
        f.dir.write("ab.pem", &next.cert);
        let shown = eventually(RELOAD_LIMIT, async || served() == next.not_after).await;
        assert!(
            shown,
            "generation {generation}: certificates() shows the new certificate within \
             {RELOAD_LIMIT:?} (still not_after {})",
            served()
        );
        let store = f.running.certificates().unwrap();
        assert_eq!(store.certs()[0].names, ["a.test", "*.b.test"]);
        assert_eq!(
            store.certs()[1].not_after,
            f.c.not_after,
            "the other certificate is reloaded unchanged"
        );
        current = der_of(&next.cert);
        let (_, leaf) = get_on_new_connection(f.tls_port(), &config, "/echo")
            .await
            .expect("serving after a reload");
        assert_eq!(leaf, current, "generation {generation} is served");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let joined = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(done) = load.join_next().await {
            total += done.expect("load task");
        }
    })
    .await;
    assert!(joined.is_ok(), "the load tasks finish");
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(total >= 300, "{total} requests");
    let seen = leaves.lock().unwrap().len();
    assert!(
        seen >= 3,
        "handshakes during the run saw {seen} different certificates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_makes_the_binary_reload_its_certificates() {
    let dir = support::TempDir::new("sighup");
    let pki = Pki::new();
    let first = pki.leaf(&["a.test", "*.b.test"], 2020, 2090);
    dir.write("ab.pem", &first.cert);
    dir.write("ab.key", &first.key);
    let image = support::image(tidegate::demo::ImageOptions::new("image-1")).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let text = format!(
        "admin = \"off\"\nlisten_tls = [\"127.0.0.1:{port}\"]\n[tls]\nreload_check_interval = 0\n\
         [[tls.certificate]]\ncert = \"ab.pem\"\nkey = \"ab.key\"\n\
         [[pool]]\nname = \"app\"\n[[pool.backend]]\naddress = \"{}\"\n",
        image.addr
    );
    dir.write("tidegate.toml", &text);
    let log = std::fs::File::create(dir.path("tidegate.log")).expect("log file");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(dir.path("tidegate.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let pid = child.id().expect("a pid").to_string();
    let up = eventually(Duration::from_secs(15), async || {
        TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    assert!(up, "the binary listens:\n{}", dir.read("tidegate.log"));
    assert_eq!(
        served_leaf(port, Some("a.test")).await.0,
        first_pem(&first.cert).unwrap()
    );
    // A client naming an IP address in SNI (wrk, some health checkers) is served the first
    // certificate, and logs nothing at the default level (checked at the end).
    assert_eq!(
        served_leaf(port, Some("127.0.0.1")).await.0,
        first_pem(&first.cert).unwrap()
    );

    let hup = async || {
        let out = run("kill", &["-HUP".to_string(), pid.clone()], b"").await;
        assert!(out.status.success(), "kill -HUP: {}", text_of(&out));
    };

    let second = pki.leaf(&["a.test", "*.b.test"], 2020, 2095);
    dir.write("ab.key", &second.key);
    dir.write("ab.pem", &second.cert);
    hup().await;
    let want = first_pem(&second.cert).unwrap();
    let mut last = String::new();
    let reloaded = eventually(RELOAD_LIMIT, async || {
        last = served_leaf(port, Some("a.test")).await.0;
        last == want
    })
    .await;
    assert!(
        reloaded,
        "the new certificate is served after SIGHUP:\n{}",
        dir.read("tidegate.log")
    );
    // Log lines are written in batches (every 50 ms): the line may trail the reload.
    let logged = eventually(RELOAD_LIMIT, async || {
        dir.read("tidegate.log")
            .lines()
            .any(|l| l.contains("certificates reloaded") && l.contains("SIGHUP"))
    })
    .await;
    assert!(logged, "{}", dir.read("tidegate.log"));

    // A broken file on SIGHUP: an error naming it, and the certificate in use keeps serving.
    dir.write("ab.pem", "-----BEGIN CERTIFICATE-----\nbroken\n");
    hup().await;
    let logged = eventually(RELOAD_LIMIT, async || {
        dir.read("tidegate.log")
            .contains("certificate reload failed")
    })
    .await;
    let log = dir.read("tidegate.log");
    assert!(logged, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("certificate reload failed") && l.contains(&dir.arg("ab.pem"))),
        "the error names the file:\n{log}"
    );
    assert_eq!(served_leaf(port, Some("a.test")).await.0, want);
    assert!(
        child.try_wait().expect("child status").is_none(),
        "still running"
    );

    // SIGHUP re-reads the configuration file: a certificate added to its list is served.
    let third = pki.leaf(&["c.test"], 2020, 2090);
    dir.write("ab.pem", &second.cert);
    dir.write("c.pem", &third.cert);
    dir.write("c.key", &third.key);
    dir.write(
        "tidegate.toml",
        &text.replace(
            "[[pool]]",
            "[[tls.certificate]]\ncert = \"c.pem\"\nkey = \"c.key\"\n[[pool]]",
        ),
    );
    hup().await;
    let want_c = first_pem(&third.cert).unwrap();
    let added = eventually(RELOAD_LIMIT, async || {
        served_leaf(port, Some("c.test")).await.0 == want_c
    })
    .await;
    assert!(
        added,
        "the certificate the file now lists is served:\n{}",
        dir.read("tidegate.log")
    );
    assert_eq!(served_leaf(port, Some("a.test")).await.0, want);
    let log = dir.read("tidegate.log");
    assert!(
        !log.contains("rustls"),
        "no line per handshake from rustls (an IP address in SNI):\n{log}"
    );
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_bad_certificate_files_naming_the_file_and_the_reason() {
    let dir = support::TempDir::new("check");
    let pki = Pki::new();
    let ab = pki.leaf(&["a.test"], 2020, 2090);
    let other = pki.leaf(&["c.test"], 2020, 2090);
    dir.write("ab.pem", &ab.cert);
    dir.write("ab.key", &ab.key);
    dir.write("other.key", &other.key);
    dir.write("garbage.txt", "hello, I am not PEM at all\n");
    dir.write(
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\n!!! not base64 !!!\n-----END CERTIFICATE-----\n",
    );
    dir.write(
        "notder.pem",
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    );
    let cases = [
        // (label, cert, key, file named, reason)
        (
            "missing",
            "missing.pem",
            "ab.key",
            "missing.pem",
            "cannot read",
        ),
        (
            "mismatch",
            "ab.pem",
            "other.key",
            "other.key",
            "does not match the certificate",
        ),
        (
            "garbage-cert",
            "garbage.txt",
            "ab.key",
            "garbage.txt",
            "no CERTIFICATE block found",
        ),
        (
            "broken-cert",
            "broken.pem",
            "ab.key",
            "broken.pem",
            "not a valid PEM certificate chain",
        ),
        (
            "not-der-cert",
            "notder.pem",
            "ab.key",
            "notder.pem",
            "cannot be parsed",
        ),
        (
            "garbage-key",
            "ab.pem",
            "garbage.txt",
            "garbage.txt",
            "no usable private key",
        ),
        (
            "cert-as-key",
            "ab.pem",
            "ab.pem",
            "ab.pem",
            "no usable private key",
        ),
    ];
    for (label, cert, key, named, reason) in cases {
        let file = format!("{label}.toml");
        dir.write(
            &file,
            &config_text(
                "off",
                "",
                &[(cert, key)],
                "",
                "[[pool.backend]]\naddress = \"127.0.0.1:9\"\n",
            ),
        );
        let out = run(
            BIN,
            &["check".to_string(), "--config".to_string(), dir.arg(&file)],
            b"",
        )
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{label}: {stderr}");
        assert!(
            stderr.contains(&dir.arg(named)) && stderr.contains(reason),
            "{label}: stderr names {named} and says {reason:?}: {stderr}"
        );
        if label == "mismatch" {
            assert!(stderr.contains(&dir.arg("ab.pem")), "{stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_key_other_users_may_read_is_a_warning_at_check() {
    use std::os::unix::fs::PermissionsExt;
    let dir = support::TempDir::new("key-mode");
    let pki = Pki::new();
    let leaf = pki.leaf(&["a.test"], 2020, 2090);
    dir.write("a.pem", &leaf.cert);
    dir.write("a.key", &leaf.key);
    dir.write(
        "tidegate.toml",
        &config_text(
            "off",
            "",
            &[("a.pem", "a.key")],
            "",
            "[[pool.backend]]\naddress = \"127.0.0.1:9\"\n",
        ),
    );
    let check = async || {
        let out = run(
            BIN,
            &[
                "check".to_string(),
                "--config".to_string(),
                dir.arg("tidegate.toml"),
            ],
            b"",
        )
        .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for (mode, warned) in [(0o644, true), (0o640, false), (0o600, false)] {
        std::fs::set_permissions(dir.path("a.key"), std::fs::Permissions::from_mode(mode)).unwrap();
        let stderr = check().await;
        assert_eq!(
            stderr.contains("readable by other users") && stderr.contains(&dir.arg("a.key")),
            warned,
            "mode {mode:o}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_is_a_warning_at_check_and_still_served() {
    let dir = support::TempDir::new("expired");
    let pki = Pki::new();
    let old = pki.leaf(&["a.test"], 2000, 2001);
    dir.write("ca.pem", &pki.pem);
    dir.write("old.pem", &old.cert);
    dir.write("old.key", &old.key);
    let image = support::image(tidegate::demo::ImageOptions::new("image-1")).await;
    let text = config_text(
        "off",
        "",
        &[("old.pem", "old.key")],
        "",
        &support::backend_entries(std::slice::from_ref(&image)),
    );
    dir.write("tidegate.toml", &text);
    let out = run(
        BIN,
        &[
            "check".to_string(),
            "--config".to_string(),
            dir.arg("tidegate.toml"),
        ],
        b"",
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check accepts it: {stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains("expired"),
        "a warning: {stderr}"
    );
    assert!(
        stderr.contains("Jan  1 00:00:00 2001"),
        "the warning gives the expiry date: {stderr}"
    );
    assert!(
        stderr.contains(&dir.arg("old.pem")),
        "and the file: {stderr}"
    );

    let config = Config::from_toml(&text, &dir.arg("tidegate.toml")).unwrap();
    let running = tidegate::server::start(&config)
        .await
        .expect("an expired certificate does not stop the start");
    let store = running.certificates().unwrap();
    assert!(store.certs()[0].expired(i64::from(tidegate::clock::unix_now())));
    let port = running.tls_addrs()[0].port();
    let base = [
        "--resolve".to_string(),
        format!("a.test:{port}:127.0.0.1"),
        "--cacert".to_string(),
        dir.arg("ca.pem"),
    ];
    let url = format!("https://a.test:{port}/echo");
    let insecure = curl(&[&base[..], &["-k".to_string(), url.clone()]].concat())
        .await
        .expect("curl -k accepts the expired certificate");
    assert_eq!(insecure.status, 200);
    let verified = curl(&[&base[..], &[url]].concat()).await;
    let err = verified.expect_err("a verifying client refuses an expired certificate");
    assert!(err.contains("expired") || err.contains("(60)"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_redirect_listener_gets_308_to_https() {
    let f = farm(
        "redirect",
        Setup {
            tls: "redirect_http = [\"127.0.0.1:0\"]",
            ..Setup::default()
        },
    )
    .await;
    let redirect = f.running.redirect_addrs()[0];
    let rport = redirect.port();
    let tport = f.tls_port();
    let resolve = format!("a.test:{rport}:{}", redirect.ip());
    let reply = curl(&[
        "--resolve".to_string(),
        resolve.clone(),
        format!("http://a.test:{rport}/app?x=1"),
    ])
    .await
    .unwrap();
    assert_eq!(reply.status, 308, "{reply:?}");
    assert_eq!(
        reply.header("location").as_deref(),
        Some(format!("https://a.test:{tport}/app?x=1").as_str()),
        "{reply:?}"
    );

    // A client following it arrives over HTTPS.
    let followed = curl(&[
        "-L".to_string(),
        "--resolve".to_string(),
        resolve,
        "--resolve".to_string(),
        format!("a.test:{tport}:127.0.0.1"),
        "--cacert".to_string(),
        f.ca(),
        format!("http://a.test:{rport}/echo?x=1"),
    ])
    .await
    .unwrap();
    assert_eq!(followed.status, 200);
    assert!(
        followed.body.starts_with("GET /echo?x=1"),
        "{}",
        followed.body
    );
    assert!(followed.body.contains("x-forwarded-proto: https"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_is_sent_over_tls_only_when_configured() {
    let off = farm("hsts-off", Setup::default()).await;
    let r = off.curl_https("a.test", "/app", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("strict-transport-security"), None, "{}", r.head);

    let on = farm(
        "hsts-on",
        Setup {
            tls: "hsts_max_age = 600",
            ..Setup::default()
        },
    )
    .await;
    for flag in ["--http1.1", "--http2"] {
        let r = on.curl_https("a.test", "/app", &[flag]).await.unwrap();
        assert_eq!(
            r.header("strict-transport-security").as_deref(),
            Some("max-age=600"),
            "{flag}: {}",
            r.head
        );
    }
    let plain = on.curl_plain("/app").await;
    assert_eq!(
        plain.header("strict-transport-security"),
        None,
        "not over plain HTTP"
    );

    let sub = farm(
        "hsts-sub",
        Setup {
            tls: "hsts_max_age = 600\nhsts_include_subdomains = true",
            ..Setup::default()
        },
    )
    .await;
    let r = sub.curl_https("a.test", "/app", &[]).await.unwrap();
    assert_eq!(
        r.header("strict-transport-security").as_deref(),
        Some("max-age=600; includeSubDomains")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_aborted_handshakes_do_not_disturb_the_tls_listener() {
    let f = farm("garbage", Setup::default()).await;
    let port = f.tls_port();
    // A silent client holds a connection open in the handshake the whole time.
    let _silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // Not TLS at all: the server refuses the handshake and closes at once.
    let refused: [&[u8]; 2] = [
        b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        &[0xde, 0xad, 0xbe, 0xef, 0x00, 0xff, 0x13, 0x37],
    ];
    // The client goes away mid-handshake: the start of a ClientHello, or nothing.
    let aborted: [&[u8]; 2] = [
        &[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ],
        b"",
    ];
    for round in 0..5 {
        for payload in refused {
            let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            tcp.write_all(payload).await.unwrap();
            let mut buf = [0u8; 1024];
            let closed = tokio::time::timeout(Duration::from_secs(5), async {
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
            assert!(closed.is_ok(), "the server closes a non-TLS connection");
        }
        for payload in aborted {
            let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            tcp.write_all(payload).await.unwrap();
            drop(tcp);
        }
        let reply = f
            .curl_https("a.test", "/echo", &[])
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(reply.status, 200, "round {round}");
    }
    // And the rustls client on a new connection.
    let (reply, _) = get_on_new_connection(port, &f.client(&[b"http/1.1"]), "/echo")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
}

#[test]
fn tls_and_plain_listeners_on_port_zero_do_not_count_as_overlapping() {
    // Port 0 asks the kernel for a free port, so two such binds never collide.
    let dir = support::TempDir::new("port0");
    let text = "listen = [\"127.0.0.1:0\"]\nlisten_tls = [\"127.0.0.1:0\"]\n[tls]\n\
                redirect_http = [\"127.0.0.1:0\"]\n[[tls.certificate]]\ncert = \"a.pem\"\n\
                key = \"a.key\"\n[[pool]]\nname = \"app\"\n[[pool.backend]]\naddress = \"127.0.0.1:9\"\n";
    let config = Config::from_toml(text, &dir.arg("tidegate.toml"));
    assert!(
        config.is_ok(),
        "three listeners on 127.0.0.1:0 are valid: {}",
        config.err().map(|e| e.to_string()).unwrap_or_default()
    );
}

/// A certificate replaced right after `start` returns (before the reload task first runs:
/// this runtime has one thread, so it runs at the test's first await) is still picked up by
/// the file check: the baseline the check compares against must be the files that were
/// loaded, not the files as they are when the task first looks.
#[tokio::test(flavor = "current_thread")]
async fn a_certificate_replaced_just_after_start_is_picked_up_by_the_file_check() {
    let f = farm(
        "replaced-at-start",
        Setup {
            tls: "reload_check_interval = 1",
            ..Setup::default()
        },
    )
    .await;
    let next = f.pki.leaf(&["a.test", "*.b.test"], 2020, 2099);
    f.dir.write("ab.key", &next.key);
    f.dir.write("ab.pem", &next.cert);
    let served = || f.running.certificates().expect("TLS is on").certs()[0].not_after;
    let shown = eventually(RELOAD_LIMIT, async || served() == next.not_after).await;
    assert!(
        shown,
        "files replaced just after start are loaded within {RELOAD_LIMIT:?} \
         (still serving not_after {}, the certificate loaded at start)",
        served()
    );
}

// ---------------------------------------------------------------------------------------
// The development CA in certs/

/// A file of the repository's `certs/`.
fn repository_cert_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("certs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What anyone holding `certs/ca.key` (it is in the repository) can do: sign a leaf for any
/// names, as the development CA (same issuer name, same key identifier).
fn sign_with_the_development_ca(names: &[&str]) -> String {
    let ca_der = der_of(&repository_cert_file("ca.pem"));
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).expect("certs/ca.pem parses");
    let key_id = ca
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                Some(id.0.to_vec())
            }
            _ => None,
        })
        .expect("the development CA has a subject key identifier");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "tidegate development CA");
    params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(key_id);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::from_pem(&repository_cert_file("ca.key")).expect("certs/ca.key");
    let issuer = Issuer::new(params, ca_key);
    let key = KeyPair::generate().expect("leaf key");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut leaf = CertificateParams::new(names.clone()).expect("leaf params");
    leaf.distinguished_name = DistinguishedName::new();
    // A CN only for a DNS name: OpenSSL checks a CN that looks like a host name against the
    // DNS constraints when the leaf lists no DNS name (an address is not under localhost).
    if names[0].parse::<std::net::IpAddr>().is_err() {
        leaf.distinguished_name
            .push(DnType::CommonName, names[0].as_str());
    }
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.signed_by(&key, &issuer).expect("leaf signed").pem()
}

/// The development CA's key is public, so the CA must only ever vouch for loopback names:
/// rustls' verifier and `openssl verify` (what curl uses) accept the shipped leaf and any
/// leaf for localhost, 127.0.0.1 and ::1, and refuse a leaf naming anything else, even next
/// to localhost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_development_ca_vouches_for_loopback_names_only() {
    use rustls::client::danger::ServerCertVerifier;
    let ca_pem = repository_cert_file("ca.pem");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(der_of(&ca_pem)))
        .expect("certs/ca.pem is a valid root");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("verifier");
    let verify = |leaf_pem: &str, name: &str| {
        let name = ServerName::try_from(name.to_string()).expect("server name");
        verifier
            .verify_server_cert(
                &CertificateDer::from(der_of(leaf_pem)),
                &[],
                &name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    };
    let dir = support::TempDir::new("development-ca");
    dir.write("ca.pem", &ca_pem);
    let openssl_verify = async |leaf_pem: &str| {
        dir.write("leaf.pem", leaf_pem);
        let args = [
            "verify",
            "-CAfile",
            &dir.arg("ca.pem"),
            &dir.arg("leaf.pem"),
        ];
        let out = run(
            "openssl",
            &args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            b"",
        )
        .await;
        (out.status.success(), text_of(&out))
    };

    let shipped = repository_cert_file("localhost.pem");
    for name in ["localhost", "127.0.0.1", "::1"] {
        verify(&shipped, name)
            .unwrap_or_else(|e| panic!("certs/localhost.pem is valid for {name}: {e}"));
    }
    let (ok, out) = openssl_verify(&shipped).await;
    assert!(ok, "openssl verifies certs/localhost.pem: {out}");

    for names in [
        &["localhost"][..],
        &["127.0.0.1"],
        &["::1"],
        &["app.localhost"],
    ] {
        let leaf = sign_with_the_development_ca(names);
        verify(&leaf, names[0]).unwrap_or_else(|e| panic!("a leaf for {names:?}: {e}"));
        let (ok, out) = openssl_verify(&leaf).await;
        assert!(ok, "openssl verifies a leaf for {names:?}: {out}");
    }

    for (names, asked) in [
        (&["example.com"][..], "example.com"),
        (&["*.example.com"], "www.example.com"),
        (&["localhost", "example.com"], "localhost"),
        (&["localhost.example.com"], "localhost.example.com"),
        (&["10.0.0.1"], "10.0.0.1"),
        (&["127.0.0.2"], "127.0.0.2"),
        (&["::2"], "::2"),
    ] {
        let leaf = sign_with_the_development_ca(names);
        let err = verify(&leaf, asked)
            .expect_err(&format!("a leaf for {names:?} is refused for {asked}"));
        assert!(
            err.contains("NameConstraintViolation"),
            "refused for its names (not for another reason): {names:?}: {err}"
        );
        let (ok, out) = openssl_verify(&leaf).await;
        assert!(
            !ok && out.contains("subtree violation"),
            "openssl refuses a leaf for {names:?} for its names: {out}"
        );
    }
}

/// The demo's certificate (certs/localhost.pem and .key) served by tidegate: a client that
/// trusts certs/ca.pem gets through by name (localhost) and by address (127.0.0.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_development_certificate_is_served_and_trusted_for_localhost() {
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    let dir = support::TempDir::new("development-certificate");
    let image = support::image(tidegate::demo::ImageOptions::new("image-1")).await;
    let text = config_text(
        "off",
        "",
        &[(
            &certs.join("localhost.pem").display().to_string(),
            &certs.join("localhost.key").display().to_string(),
        )],
        "",
        &support::backend_entries(std::slice::from_ref(&image)),
    );
    let config = Config::from_toml(&text, &dir.arg("tidegate.toml"))
        .unwrap_or_else(|e| panic!("test config is valid: {e}\n{text}"));
    let running = tidegate::server::start(&config)
        .await
        .expect("balancer starts");
    let port = running.tls_addrs()[0].port();
    let client = client_config(&repository_cert_file("ca.pem"), &[b"http/1.1"]);
    for name in ["localhost", "127.0.0.1"] {
        let stream = tls_connect(port, name, &client)
            .await
            .unwrap_or_else(|e| panic!("a verified handshake for {name}: {e}"));
        let mut sender = http1_over(stream).await.unwrap();
        let reply = get1(&mut sender, "/app").await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{name}");
        assert_eq!(reply.image(), "image-1", "{name}");
    }
    let ca = certs.join("ca.pem").display().to_string();
    let reply = curl(&[
        "--resolve".to_string(),
        format!("localhost:{port}:127.0.0.1"),
        "--cacert".to_string(),
        ca,
        format!("https://localhost:{port}/app"),
    ])
    .await
    .expect("curl --cacert certs/ca.pem trusts the demo certificate");
    assert_eq!(reply.status, 200);
}
