//! What an operator watches, through real sockets: exact metric values after known traffic
//! (parsed by a real Prometheus text parser), the access log of the real binary in JSON, the
//! live status page rendered by a real browser (headless Chromium), and the admin endpoints.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use prometheus_parse::{Sample, Scrape, Value};
use support::{HttpClient, Reply, backend_entries, client, get, images, send};
use tidegate::config::Config;
use tidegate::demo::{Image, Tracking, random_key};
use tidegate::server::Running;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// The most one test may take, start to finish.
const TEST_LIMIT: Duration = Duration::from_secs(30);
/// The most counters may take to settle after the last reply was read (they are settled
/// when the proxy drops the reply body, a moment after the client has the last byte).
const SETTLE_LIMIT: Duration = Duration::from_secs(5);
/// The most one Chromium run may take before it is killed.
const BROWSER_LIMIT: Duration = Duration::from_secs(20);
/// The most the binary may take to accept connections.
const START_LIMIT: Duration = Duration::from_secs(15);

/// Runs a test body, failing it if it outlives [`TEST_LIMIT`].
async fn bounded<F: std::future::Future<Output = ()>>(what: &str, body: F) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .unwrap_or_else(|_| panic!("{what}: did not finish within {TEST_LIMIT:?}"));
}

/// A balancer from `config` (which must set `admin = "127.0.0.1:0"`).
async fn balancer(config: &str) -> Running {
    let config = Config::from_toml(config, "test").expect("test config is valid");
    let running = tidegate::server::start(&config)
        .await
        .expect("balancer starts");
    assert!(
        running.admin_addr().is_some(),
        "the admin listener runs when configured"
    );
    running
}

/// A port that was free a moment ago and has nothing listening on it now.
fn closed_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address")
}

/// `GET base+path` with a `Host` header.
async fn get_host(c: &HttpClient, base: &str, path: &str, host: &str) -> Reply {
    send(
        c,
        Method::GET,
        &format!("{base}{path}"),
        &[("host", host)],
        Bytes::new(),
    )
    .await
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

/// One scrape of `/metrics`: the raw text and what prometheus-parse made of it.
struct Metrics {
    text: String,
    scrape: Scrape,
}

impl Metrics {
    async fn fetch(c: &HttpClient, admin: SocketAddr) -> Metrics {
        let reply = get(c, &format!("http://{admin}/metrics")).await;
        assert_eq!(reply.status, 200, "/metrics: {}", reply.text());
        let ct = reply.header("content-type");
        assert!(
            ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
            "/metrics is the Prometheus 0.0.4 text format, not {ct:?}"
        );
        let text = reply.text();
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("prometheus-parse reads /metrics");
        assert!(!scrape.samples.is_empty(), "/metrics has samples:\n{text}");
        Metrics { text, scrape }
    }

    /// The samples of `metric` whose labels include every pair of `labels`.
    fn samples<'a>(
        &'a self,
        metric: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.scrape.samples.iter().filter(move |s| {
            s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
    }

    /// The sum of the plain (counter, gauge, untyped) samples of `metric` matching `labels`;
    /// fails when none matches, so a renamed metric or label cannot pass as zero.
    fn sum(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let mut found = false;
        let total = self
            .samples(metric, labels)
            .map(|s| {
                found = true;
                scalar(s)
            })
            .sum();
        assert!(
            found,
            "no sample {metric}{labels:?} in /metrics:\n{}",
            self.text
        );
        total
    }

    /// The one sample of `metric` matching `labels`.
    fn one(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<_> = self.samples(metric, labels).collect();
        assert_eq!(
            matching.len(),
            1,
            "exactly one sample {metric}{labels:?} in /metrics:\n{}",
            self.text
        );
        scalar(matching[0])
    }

    /// The label values of `label` over the samples of `metric`.
    fn label_values(&self, metric: &str, label: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .samples(metric, &[])
            .filter_map(|s| s.labels.get(label).map(str::to_string))
            .collect();
        values.sort();
        values.dedup();
        values
    }
}

fn scalar(s: &Sample) -> f64 {
    match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{} is not a plain sample: {other:?}", s.metric),
    }
}

/// Scrapes until nothing is in flight and `total` replies are counted (or the settle limit
/// passes, leaving the assertions to say what is wrong).
async fn settled(c: &HttpClient, admin: SocketAddr, total: u64) -> Metrics {
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        let m = Metrics::fetch(c, admin).await;
        let in_flight = m.sum("tidegate_in_flight", &[]);
        let replies = m.sum("tidegate_requests_total", &[]);
        if (in_flight == 0.0 && replies == total as f64) || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const NEW_SESSIONS: usize = 4;
/// Requests in known sessions: GETs, and one POST of [`POST_BYTES`].
const PINNED: usize = 9;
const POST_BYTES: usize = 1234;
const FORGED: usize = 5;
const TO_DEAD: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_known_traffic_exactly() {
    bounded("metrics_count_known_traffic_exactly", async {
        let farm = images(3, Tracking::Links).await;
        let dead = closed_addr();
        let running = balancer(&format!(
            "admin = \"127.0.0.1:0\"\nlisten = [\"127.0.0.1:0\"]\n\
             [[pool]]\nname = \"app\"\nhosts = [\"app.example\"]\n{}\
             [[pool]]\nname = \"dead\"\nhosts = [\"dead.example\"]\n\
             [pool.health]\ncheck = \"passive\"\nfall = 100\n\
             [[pool.backend]]\nname = \"gone\"\naddress = \"{dead}\"\n",
            backend_entries(&farm)
        ))
        .await;
        let base = format!("http://{}", running.addrs()[0]);
        let admin = running.admin_addr().unwrap();
        let c = client();

        // K new sessions: the key travels only in the page's links (Seaside 3).
        let mut sessions: Vec<(String, String)> = Vec::new();
        // Reply body bytes the client received from the app pool, and from the dead one.
        let mut app_bytes = 0;
        let mut dead_bytes = 0;
        for _ in 0..NEW_SESSIONS {
            let r = get_host(&c, &base, "/app", "app.example").await;
            assert_eq!(r.status, 200, "{}", r.text());
            sessions.push((r.key().expect("the page names its session"), r.image()));
            app_bytes += r.body.len();
        }
        // N requests in those sessions.
        for i in 0..PINNED - 1 {
            let (key, image) = &sessions[i % NEW_SESSIONS];
            let r = get_host(&c, &base, &format!("/app?_s={key}&_k=k{i}"), "app.example").await;
            assert_eq!(r.status, 200);
            app_bytes += r.body.len();
            assert_eq!(&r.image(), image, "a pinned session stays on its image");
        }
        // One more, a POST with a body the backend echoes.
        let posted = vec![b'x'; POST_BYTES];
        let (key, image) = &sessions[0];
        let r = send(
            &c,
            Method::POST,
            &format!("{base}/echo?_s={key}"),
            &[("host", "app.example")],
            posted,
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(&r.image(), image);
        app_bytes += r.body.len();
        // M forged ids: well-formed, never issued.
        let forged: Vec<String> = (0..FORGED)
            .map(|_| format!("FORGED{}", random_key(10)))
            .collect();
        for id in &forged {
            let r = get_host(&c, &base, &format!("/static/x.css?_s={id}"), "app.example").await;
            assert_eq!(r.status, 200);
            app_bytes += r.body.len();
        }
        // A Host no pool serves.
        let r = get_host(&c, &base, "/app", "nowhere.example").await;
        assert_eq!(r.status, 404, "{}", r.text());
        // A pool whose only backend's port is closed.
        for _ in 0..TO_DEAD {
            let r = get_host(&c, &base, "/app", "dead.example").await;
            assert_eq!(r.status, 502, "{}", r.text());
            dead_bytes += r.body.len();
        }

        let served = (NEW_SESSIONS + PINNED + FORGED) as f64;
        let m = settled(&c, admin, (NEW_SESSIONS + PINNED + FORGED + TO_DEAD) as u64).await;
        let app = ("pool", "app");

        // Replies, by class.
        assert_eq!(
            m.sum("tidegate_requests_total", &[app, ("class", "2xx")]),
            served
        );
        for class in ["1xx", "3xx", "4xx", "5xx"] {
            assert_eq!(
                m.sum("tidegate_requests_total", &[app, ("class", class)]),
                0.0,
                "{class}"
            );
        }
        let dead_backend = [("pool", "dead"), ("backend", "gone")];
        assert_eq!(
            m.one(
                "tidegate_requests_total",
                &[dead_backend[0], dead_backend[1], ("class", "5xx")]
            ),
            TO_DEAD as f64,
            "tidegate's own 502s are counted for the backend"
        );

        // The affinity table.
        assert_eq!(m.one("tidegate_pins", &[app]), NEW_SESSIONS as f64);
        assert_eq!(m.sum("tidegate_backend_pins", &[app]), NEW_SESSIONS as f64);
        assert_eq!(m.one("tidegate_pins", &[("pool", "dead")]), 0.0);
        assert!(m.one("tidegate_pins_max", &[app]) >= NEW_SESSIONS as f64);
        assert_eq!(
            m.one(
                "tidegate_pins_learned_total",
                &[app, ("source", "page-body")]
            ),
            NEW_SESSIONS as f64
        );
        for source in ["set-cookie", "location", "affinity-cookie"] {
            assert_eq!(
                m.one("tidegate_pins_learned_total", &[app, ("source", source)]),
                0.0,
                "{source}"
            );
        }
        assert_eq!(
            m.one("tidegate_affinity_lookups_total", &[app, ("result", "hit")]),
            PINNED as f64
        );
        assert_eq!(
            m.one(
                "tidegate_affinity_lookups_total",
                &[app, ("result", "miss")]
            ),
            FORGED as f64,
            "every forged id is a miss"
        );
        assert_eq!(m.one("tidegate_pins_expired_total", &[app]), 0.0);
        assert_eq!(m.one("tidegate_pins_evicted_total", &[app]), 0.0);

        // Decisions.
        assert_eq!(
            m.one("tidegate_decisions_total", &[app, ("decision", "pinned")]),
            PINNED as f64
        );
        assert_eq!(
            m.one("tidegate_decisions_total", &[app, ("decision", "new")]),
            (NEW_SESSIONS + FORGED) as f64,
            "a forged id is routed as a new session"
        );
        for d in ["learned", "redispatched", "hashed"] {
            assert_eq!(
                m.one("tidegate_decisions_total", &[app, ("decision", d)]),
                0.0,
                "{d}"
            );
        }
        assert_eq!(
            m.one(
                "tidegate_decisions_total",
                &[("pool", "dead"), ("decision", "new")]
            ),
            TO_DEAD as f64
        );
        assert_eq!(
            m.label_values("tidegate_decisions_total", "policy"),
            ["round-robin"]
        );
        assert_eq!(m.sum("tidegate_no_backend_total", &[]), 0.0);

        // Per backend: in flight, durations, bytes, state.
        assert_eq!(m.sum("tidegate_in_flight", &[]), 0.0, "nothing in flight");
        let mut backends = farm.iter().map(|i| ("app", i.name())).collect::<Vec<_>>();
        backends.push(("dead", "gone"));
        let mut durations = 0.0;
        for (pool, backend) in &backends {
            let labels = [("pool", *pool), ("backend", *backend)];
            let replies = m.sum("tidegate_requests_total", &labels);
            let count = m.one("tidegate_request_duration_seconds_count", &labels);
            assert_eq!(count, replies, "{pool}/{backend}: one duration per reply");
            durations += count;
            assert!(m.one("tidegate_request_duration_seconds_sum", &labels) >= 0.0);
            let histogram: Vec<_> = m
                .samples("tidegate_request_duration_seconds", &labels)
                .collect();
            assert_eq!(histogram.len(), 1, "{pool}/{backend}: one histogram");
            let Value::Histogram(buckets) = &histogram[0].value else {
                panic!("{pool}/{backend}: not a histogram: {:?}", histogram[0]);
            };
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count),
                "{pool}/{backend}: buckets rise with their bounds: {buckets:?}"
            );
            let last = buckets.last().expect("buckets");
            assert!(
                last.less_than.is_infinite() && last.count == count,
                "{pool}/{backend}: the +Inf bucket holds every observation: {buckets:?}"
            );
            assert_eq!(m.one("tidegate_in_flight", &labels), 0.0);
            assert_eq!(
                m.one(
                    "tidegate_backend_state",
                    &[labels[0], labels[1], ("state", "active")]
                ),
                1.0,
                "{pool}/{backend} is active"
            );
            assert_eq!(
                m.sum("tidegate_backend_state", &labels),
                1.0,
                "{pool}/{backend} is in one state"
            );
        }
        assert_eq!(durations, served + TO_DEAD as f64);
        for image in &farm {
            let labels = [app, ("backend", image.name())];
            if m.sum("tidegate_requests_total", &labels) > 0.0 {
                assert!(
                    m.one("tidegate_response_bytes_total", &labels) > 0.0,
                    "{}: reply bytes counted",
                    image.name()
                );
            }
            let sent_here = if image.name() == sessions[0].1 {
                POST_BYTES
            } else {
                0
            };
            assert_eq!(
                m.one("tidegate_request_bytes_total", &labels),
                sent_here as f64,
                "{}: request body bytes",
                image.name()
            );
        }
        assert_eq!(
            m.sum("tidegate_response_bytes_total", &[app]),
            app_bytes as f64,
            "every reply byte the client received, and no other"
        );
        assert_eq!(
            m.one("tidegate_response_bytes_total", &dead_backend),
            dead_bytes as f64,
            "tidegate's own 502 text counts for the backend it stands for"
        );
        assert_eq!(m.one("tidegate_request_bytes_total", &dead_backend), 0.0);

        // Upstream failures: the closed port, and nothing else.
        assert_eq!(
            m.one(
                "tidegate_upstream_errors_total",
                &[
                    dead_backend[0],
                    dead_backend[1],
                    ("kind", "connect-refused")
                ]
            ),
            TO_DEAD as f64
        );
        assert_eq!(
            m.sum("tidegate_upstream_errors_total", &[]),
            TO_DEAD as f64,
            "no other upstream failure"
        );

        // The front.
        assert_eq!(
            m.one("tidegate_client_errors_total", &[("kind", "no-route")]),
            1.0
        );
        assert_eq!(m.sum("tidegate_client_errors_total", &[]), 1.0);
        assert_eq!(m.sum("tidegate_tls_handshakes_total", &[]), 0.0);
        assert_eq!(m.one("tidegate_tls_handshake_failures_total", &[]), 0.0);
        assert!(m.one("tidegate_connections_total", &[]) >= 1.0);
        assert!(m.one("tidegate_connections_open", &[]) >= 0.0);
        assert!(m.one("tidegate_uptime_seconds", &[]) >= 0.0);
        assert_eq!(
            m.one(
                "tidegate_build_info",
                &[
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("commit", tidegate::COMMIT)
                ]
            ),
            1.0
        );

        // Labels are bounded: never an id, a path, an address or a Host.
        let mut forbidden: Vec<String> = sessions.iter().map(|(k, _)| k.clone()).collect();
        forbidden.extend(forged.iter().cloned());
        forbidden.extend(
            [
                "/app",
                "/static",
                "x.css",
                "127.0.0.1",
                "app.example",
                "dead.example",
                "nowhere.example",
            ]
            .map(String::from),
        );
        for bad in &forbidden {
            assert!(
                !m.text.contains(bad.as_str()),
                "/metrics carries {bad:?} somewhere:\n{}",
                m.text
            );
        }
        // Ports too, in label values (the numbers of the text may hold any digits).
        forbidden.extend(farm.iter().map(|i| i.addr.port().to_string()));
        forbidden.push(dead.port().to_string());
        forbidden.push(running.addrs()[0].port().to_string());
        for s in &m.scrape.samples {
            for (label, value) in s.labels.iter() {
                for bad in &forbidden {
                    assert!(
                        !value.contains(bad.as_str()),
                        "{}{{{label}={value:?}}} carries {bad:?}",
                        s.metric
                    );
                }
            }
        }
        running.shutdown().await;
    })
    .await;
}

/// The `tidegate_…` metric names written in `text`.
fn metric_names_in(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .match_indices("tidegate_")
        .filter(|(at, _)| {
            !text[..*at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_and_dashboard_name_only_exported_metrics() {
    bounded("docs_and_dashboard_name_only_exported_metrics", async {
        let farm = images(1, Tracking::Links).await;
        let running = balancer(&format!(
            "admin = \"127.0.0.1:0\"\nlisten = [\"127.0.0.1:0\"]\n[[pool]]\nname = \"app\"\n{}",
            backend_entries(&farm)
        ))
        .await;
        let m = Metrics::fetch(&client(), running.admin_addr().unwrap()).await;
        running.shutdown().await;
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        let doc = std::fs::read_to_string(docs.join("observability.md"))
            .expect("docs/observability.md exists");
        let dashboard = std::fs::read_to_string(docs.join("grafana-dashboard.json"))
            .expect("docs/grafana-dashboard.json exists");

        // Every family /metrics exports is described.
        let families: Vec<(&str, &str)> = m
            .text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .collect();
        assert!(families.len() > 20, "{families:?}");
        for (family, _) in &families {
            assert!(
                doc.contains(&format!("`{family}`")) || doc.contains(&format!("`{family}{{")),
                "{family} is not described in docs/observability.md"
            );
        }
        // Every name the doc and the dashboard use is exported (a series or a family).
        let mut exported: Vec<String> = m.scrape.samples.iter().map(|s| s.metric.clone()).collect();
        for (family, kind) in &families {
            exported.push(family.to_string());
            if *kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.push(format!("{family}{suffix}"));
                }
            }
        }
        for name in metric_names_in(&doc) {
            assert!(
                exported.contains(&name),
                "docs/observability.md names {name}, which /metrics does not export"
            );
        }

        // The dashboard: valid JSON, importable, every query on exported series.
        let d: serde_json::Value =
            serde_json::from_str(&dashboard).expect("the dashboard is valid JSON");
        assert!(d["schemaVersion"].as_u64().unwrap() >= 36, "schemaVersion");
        assert!(
            d["__inputs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
            "a DS_PROMETHEUS data source input"
        );
        let panels = d["panels"].as_array().unwrap();
        let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), panels.len(), "panel ids are unique");
        let mut titles = Vec::new();
        for p in panels.iter().filter(|p| p["type"] != "row") {
            let title = p["title"].as_str().unwrap();
            titles.push(title.to_lowercase());
            assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            let g = &p["gridPos"];
            assert!(
                g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
                "{title} fits the grid"
            );
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{title} has a query");
            for t in targets {
                assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
                let expr = t["expr"].as_str().unwrap();
                let names = metric_names_in(expr);
                assert!(!names.is_empty(), "{title}: {expr}");
                for name in names {
                    assert!(
                        exported.contains(&name),
                        "dashboard panel {title:?} queries {name}, which /metrics does not export"
                    );
                }
            }
        }
        for wanted in [
            "requests/s by backend",
            "5xx ratio",
            "p50 / p99",
            "pins per backend",
            "table fill",
            "lookups hit rate",
            "pins learned by source",
            "decisions by kind",
            "upstream errors by kind",
            "in flight",
            "tls handshakes",
        ] {
            assert!(
                titles.iter().any(|t| t.contains(wanted)),
                "a panel for {wanted:?} in {titles:?}"
            );
        }
        for v in d["templating"]["list"].as_array().unwrap() {
            for name in metric_names_in(v["query"]["query"].as_str().unwrap()) {
                assert!(exported.contains(&name), "variable queries {name}");
            }
        }
    })
    .await;
}

/// A backend that accepts connections, reads the requests and never answers; it holds
/// every connection open until the test ends.
async fn silent_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// Polls `/metrics` until `tidegate_in_flight{labels}` is `want`; returns what it last saw.
async fn wait_in_flight(
    c: &HttpClient,
    admin: SocketAddr,
    labels: &[(&str, &str)],
    want: f64,
    limit: Duration,
) -> f64 {
    let deadline = Instant::now() + limit;
    loop {
        let now = Metrics::fetch(c, admin)
            .await
            .sum("tidegate_in_flight", labels);
        if now == want || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_returns_to_zero_when_the_client_gives_up() {
    bounded(
        "in_flight_returns_to_zero_when_the_client_gives_up",
        async {
            let silent = silent_backend().await;
            let running = balancer(&format!(
                "admin = \"127.0.0.1:0\"\nlisten = [\"127.0.0.1:0\"]\n\
             [[pool]]\nname = \"app\"\n\
             [[pool.backend]]\nname = \"silent\"\naddress = \"{silent}\"\n"
            ))
            .await;
            let addr = running.addrs()[0];
            let admin = running.admin_addr().unwrap();
            let c = client();
            let labels = [("pool", "app"), ("backend", "silent")];

            // HTTP/1.1: the client closes its connection while tidegate waits for the reply head.
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(
                &mut stream,
                b"GET /app HTTP/1.1\r\nhost: app.example\r\n\r\n",
            )
            .await
            .unwrap();
            let seen = wait_in_flight(&c, admin, &labels, 1.0, SETTLE_LIMIT).await;
            assert_eq!(
                seen, 1.0,
                "the request is in flight while the backend is silent"
            );
            drop(stream);
            let left = wait_in_flight(&c, admin, &labels, 0.0, SETTLE_LIMIT).await;
            assert_eq!(
                left, 0.0,
                "an HTTP/1.1 client that closed its connection leaves nothing in flight"
            );

            // HTTP/2: the client resets its stream (RST_STREAM) while tidegate waits.
            let h2 = support::h2c_client();
            let url = format!("http://{addr}/app");
            let gave_up = tokio::time::timeout(Duration::from_millis(300), async {
                let req = http::Request::get(&url)
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap();
                h2.request(req).await
            })
            .await;
            assert!(gave_up.is_err(), "the silent backend never answers");
            let left = wait_in_flight(&c, admin, &labels, 0.0, SETTLE_LIMIT).await;
            assert_eq!(
                left, 0.0,
                "an HTTP/2 client that reset its stream leaves nothing in flight"
            );
            // Both are counted and timed, as 499 "client closed request".
            let m = Metrics::fetch(&c, admin).await;
            assert_eq!(
                m.one(
                    "tidegate_requests_total",
                    &[labels[0], labels[1], ("class", "4xx")]
                ),
                2.0,
                "abandoned requests count as 4xx (499)"
            );
            assert_eq!(m.sum("tidegate_requests_total", &labels), 2.0);
            assert_eq!(
                m.one("tidegate_request_duration_seconds_count", &labels),
                2.0
            );
            assert_eq!(m.sum("tidegate_upstream_errors_total", &labels), 0.0);
            running.shutdown().await;
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// The access log of the real binary
// ---------------------------------------------------------------------------------------

/// The real binary serving `farm` with JSON logs and `RUST_LOG=info`, its stderr collected
/// line by line; killed when dropped.
struct LoggedBalancer {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
    listen: SocketAddr,
}

impl LoggedBalancer {
    async fn start(farm: &[Image], extra: &[&str]) -> LoggedBalancer {
        let listen = closed_addr();
        let mut command = Command::new(env!("CARGO_BIN_EXE_tidegate"));
        command
            .args(["--log-format", "json", "--admin", "off", "--listen"])
            .arg(listen.to_string())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for image in farm {
            command
                .arg("--backend")
                .arg(format!("{}={}", image.name(), image.addr));
        }
        let mut child = command.spawn().expect("the binary starts");
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let reader = {
            let lines = lines.clone();
            let stderr = child.stderr.take().expect("stderr piped");
            tokio::spawn(async move {
                let mut stderr = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = stderr.next_line().await {
                    lines.lock().unwrap().push(line);
                }
            })
        };
        let mut served = LoggedBalancer {
            child,
            lines,
            reader,
            listen,
        };
        let deadline = Instant::now() + START_LIMIT;
        while tokio::net::TcpStream::connect(listen).await.is_err() {
            if let Some(status) = served.child.try_wait().expect("child status") {
                panic!("tidegate exited with {status}:\n{}", served.text());
            }
            assert!(
                Instant::now() < deadline,
                "tidegate did not listen on {listen} within {START_LIMIT:?}:\n{}",
                served.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        served
    }

    fn base(&self) -> String {
        format!("http://{}", self.listen)
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (bounded) for `n` access-log lines, stops the process, and returns every line
    /// it wrote and the access lines parsed. Every line must be JSON.
    async fn stop_after(mut self, n: usize) -> (String, Vec<serde_json::Value>) {
        let count = |lines: &Mutex<Vec<String>>| {
            lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("tidegate::access"))
                .count()
        };
        let deadline = Instant::now() + SETTLE_LIMIT;
        while count(&self.lines) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.child.start_kill().expect("kill the child");
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.reader).await;
        let all = self.lines.lock().unwrap().clone();
        let mut access = Vec::new();
        for line in all.iter().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if v["target"] == "tidegate::access" {
                access.push(v);
            }
        }
        let text = all.join("\n");
        assert_eq!(access.len(), n, "one access line per request:\n{text}");
        (text, access)
    }
}

/// A field of a JSON log line as text (strings as they are, numbers printed).
fn field(v: &serde_json::Value, name: &str) -> String {
    match &v[name] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => panic!("access line without {name}: {v}"),
        other => other.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_follows_a_session_by_its_hash_never_its_id() {
    bounded(
        "access_log_follows_a_session_by_its_hash_never_its_id",
        async {
            let farm = images(3, Tracking::Links).await;
            let served = LoggedBalancer::start(&farm, &[]).await;
            let listen = served.listen;
            let base = served.base();
            let c = client();
            let first = get(&c, &format!("{base}/app")).await;
            assert_eq!(first.status, 200);
            let key = first.key().expect("the page names its session");
            let image = first.image();
            for k in 0..3 {
                let r = get(&c, &format!("{base}/app?_s={key}&_k=x{k}")).await;
                assert_eq!(r.status, 200);
                assert_eq!(r.image(), image, "pinned");
            }
            let (text, access) = served.stop_after(4).await;

            assert!(
                !text.contains(&key),
                "the session id {key} appears in the log:\n{text}"
            );
            for (i, v) in access.iter().enumerate() {
                assert_eq!(v["level"], "INFO", "{v}");
                assert_eq!(field(v, "method"), "GET", "{v}");
                assert_eq!(field(v, "host"), listen.to_string(), "{v}");
                assert_eq!(field(v, "path"), "/app", "the path, without the query: {v}");
                assert_eq!(v["status"], 200, "{v}");
                assert_eq!(field(v, "pool"), "default", "{v}");
                assert_eq!(field(v, "backend"), image, "{v}");
                let ms: f64 = field(v, "ms").parse().expect("ms is a number");
                assert!((0.0..10_000.0).contains(&ms), "{v}");
                let (decision, learned) = if i == 0 {
                    ("new", "page-body")
                } else {
                    ("pinned", "-")
                };
                assert_eq!(field(v, "decision"), decision, "{v}");
                assert_eq!(field(v, "learned"), learned, "{v}");
            }
            assert_eq!(
                field(&access[0], "session"),
                "-",
                "the first request named no session"
            );
            let hashes: Vec<String> = access[1..].iter().map(|v| field(v, "session")).collect();
            assert!(
                hashes.iter().all(|h| *h == hashes[0]),
                "one session, one hash: {hashes:?}"
            );
            let hash = &hashes[0];
            assert!(
                hash.len() == 8 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
                "a short hex hash: {hash:?}"
            );
            assert!(
                !key.contains(hash.as_str()),
                "the hash is not part of the id"
            );
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_never_holds_an_id_carried_as_a_path_parameter() {
    bounded(
        "access_log_never_holds_an_id_carried_as_a_path_parameter",
        async {
            // WAEnterpriseAuberginesStrategy: cookie `JSESSIONID` and `/app;jsessionid=KEY`
            // (SEASIDE.md); the pool reads `jsessionid` path parameters by default and learns
            // the new session from the cookie.
            let farm = images(2, Tracking::Aubergines).await;
            let served = LoggedBalancer::start(&farm, &["--session-cookie", "JSESSIONID"]).await;
            let base = served.base();
            let c = client();
            let first = get(&c, &format!("{base}/app")).await;
            assert_eq!(first.status, 200);
            let key = first.key().expect("the page names its session");
            let link = first.link().expect("a session link");
            assert!(link.contains(";jsessionid="), "{link}");
            for _ in 0..2 {
                let r = get(&c, &format!("{base}{link}")).await;
                assert_eq!(r.status, 200);
                assert_eq!(r.image(), first.image(), "pinned by the path parameter");
            }
            let (text, access) = served.stop_after(3).await;
            for v in &access[1..] {
                assert_eq!(field(v, "decision"), "pinned", "{v}");
                assert_eq!(field(v, "session"), field(&access[1], "session"), "{v}");
            }
            assert!(
                !text.contains(&key),
                "the session id {key}, carried as a path parameter, appears in the log:\n{text}"
            );
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// The status page in a real browser
// ---------------------------------------------------------------------------------------

/// The Chromium binary; the test fails (never skips) without one.
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "Chromium is not installed: the status page test needs it. Run tests/run.sh, which \
         installs it (or `apt-get install -y chromium`)."
    );
}

/// Runs headless Chromium on `url` with `extra` flags and returns its stdout; killed (its
/// whole process group) if it outlives [`BROWSER_LIMIT`].
async fn browse(url: &str, extra: &[String]) -> String {
    let profile = support::TempDir::new("chromium-profile");
    let mut command = Command::new(chromium());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.dir().display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn().expect("chromium starts");
    let pid = child.id();
    match tokio::time::timeout(BROWSER_LIMIT, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.expect("chromium runs");
            assert!(
                out.status.success(),
                "chromium {extra:?} {url} failed with {}:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
        Err(_) => {
            // Its renderer and helpers are in the same group: end them all, by that id.
            if let Some(pid) = pid {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
            }
            panic!("chromium {extra:?} {url} did not finish within {BROWSER_LIMIT:?}");
        }
    }
}

/// One backend's row as the browser rendered it.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    /// What the operator asked: `active`, `draining`, `drained`, `disabled`.
    state: String,
    /// What the checks say: `up`, `down`, `unknown`.
    health: String,
    /// Its pins; `None` where the page shows `–` (a client-ip pool).
    pins: Option<u64>,
    /// Replies since start.
    total: u64,
}

/// The text right after the start tag that begins with `open`, up to the next tag.
fn text_after<'a>(html: &'a str, open: &str) -> Option<&'a str> {
    let rest = &html[html.find(open)? + open.len()..];
    let rest = &rest[rest.find('>')? + 1..];
    Some(&rest[..rest.find('<')?])
}

/// The rendered page's pool panels: `(pool, its HTML)`, in page order.
fn sections(dom: &str) -> Vec<(String, &str)> {
    dom.split("<section class=\"pool\" data-pool=\"")
        .skip(1)
        .map(|s| {
            let pool = s[..s.find('"').unwrap()].to_string();
            (pool, &s[..s.find("</section>").unwrap_or(s.len())])
        })
        .collect()
}

/// The rendered page: `(pool, backend) → row`, read from its rows; a backend with two rows
/// fails.
fn rows(dom: &str) -> HashMap<(String, String), Row> {
    let mut out = HashMap::new();
    for (pool, section) in sections(dom) {
        for row in section.split("<tr data-backend=\"").skip(1) {
            let backend = row[..row.find('"').unwrap()].to_string();
            let row = &row[..row.find("</tr>").unwrap_or(row.len())];
            let cell = |open: &str| -> String {
                text_after(row, open)
                    .unwrap_or_else(|| panic!("{open} in row {row}"))
                    .trim()
                    .to_string()
            };
            let number = |text: String| -> u64 {
                text.replace(',', "")
                    .parse()
                    .unwrap_or_else(|_| panic!("a number, not {text:?}, in {row}"))
            };
            let pins = cell("<td class=\"pins\"");
            let shown = Row {
                state: cell("<span class=\"state"),
                health: cell("<span class=\"health"),
                pins: (pins != "–").then(|| number(pins)),
                total: number(cell("<td class=\"total\"")),
            };
            let again = out.insert((pool.clone(), backend.clone()), shown);
            assert!(again.is_none(), "{pool}/{backend} has two rows:\n{dom}");
        }
    }
    out
}

/// One sparkline of a pool's chart as the browser rendered it.
#[derive(Debug)]
struct Spark {
    /// Its `data-series`: the `history` field it draws.
    series: String,
    /// Its caption (`req/s`, `pins`, `5xx/s`).
    caption: String,
    /// The latest value, as labelled (`–` without samples).
    latest: String,
    /// The `d` of its line.
    line: String,
}

/// The charts of the rendered page: pool → the sparklines inside its `data-chart` element.
fn charts(dom: &str) -> HashMap<String, Vec<Spark>> {
    let mut out = HashMap::new();
    for (pool, section) in sections(dom) {
        let open = format!("data-chart=\"{pool}\"");
        let Some(at) = section.find(&open) else {
            continue;
        };
        let chart = &section[at..];
        let chart = &chart[..chart.find("<table").unwrap_or(chart.len())];
        let sparks = chart
            .split("<figure class=\"spark")
            .skip(1)
            .map(|f| {
                let f = &f[..f.find("</figure>").unwrap_or(f.len())];
                let attr = |name: &str| -> String {
                    let open = format!("{name}=\"");
                    let at = f.find(&open).unwrap_or_else(|| panic!("{name} in {f}")) + open.len();
                    f[at..at + f[at..].find('"').unwrap()].to_string()
                };
                assert!(f.contains("<svg"), "the sparkline is an SVG: {f}");
                let line = &f[f
                    .find("class=\"line\"")
                    .unwrap_or_else(|| panic!("a line in {f}"))..];
                let line = &line[..line.find('>').unwrap()];
                let d = line
                    .find("d=\"")
                    .map(|at| &line[at + 3..at + 3 + line[at + 3..].find('"').unwrap()])
                    .unwrap_or("");
                Spark {
                    series: attr("data-series"),
                    caption: text_after(f, "<span class=\"what\"")
                        .unwrap_or("")
                        .to_string(),
                    latest: text_after(f, "<b").unwrap_or("").to_string(),
                    line: d.to_string(),
                }
            })
            .collect();
        out.insert(pool, sparks);
    }
    out
}

/// Checks every pool of `pools` has its chart of the three series, each labelled; where
/// `/status.json` already had samples (`sampled`), the latest value is a number and the line
/// is drawn.
fn assert_charts(dom: &str, pools: &[&str], sampled: &[&str]) {
    let charts = charts(dom);
    for pool in pools {
        let sparks = charts
            .get(*pool)
            .unwrap_or_else(|| panic!("pool {pool} has a data-chart element:\n{dom}"));
        let series: Vec<_> = sparks.iter().map(|s| s.series.as_str()).collect();
        assert_eq!(
            series,
            ["requests_per_second", "pins", "errors_per_second"],
            "{pool}: three sparklines:\n{dom}"
        );
        let captions: Vec<_> = sparks.iter().map(|s| s.caption.as_str()).collect();
        assert_eq!(captions, ["req/s", "pins", "5xx/s"], "{pool}: text labels");
        if sampled.contains(pool) {
            for s in sparks {
                if s.series == "pins" && *pool == "legacy" {
                    assert_eq!(s.latest, "–", "a client-ip pool has no pins to chart");
                    continue;
                }
                assert!(
                    s.latest.replace(',', "").parse::<f64>().is_ok(),
                    "{pool} {}: the latest value is labelled, not {:?}",
                    s.series,
                    s.latest
                );
                assert!(
                    s.line.starts_with('M'),
                    "{pool} {}: the line is drawn: {s:?}",
                    s.series
                );
            }
        }
    }
}

/// A relay in front of the admin listener for one page load that must see the farm change
/// while it stays open: it forwards every request, and holds the page's `hold_at`th poll of
/// `/status.json` until the test has made its change ([`Relay::held`]).
struct Relay {
    /// The status page through the relay.
    url: String,
    polls: tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(admin: SocketAddr, hold_at: usize) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the relay binds");
        let url = format!("http://{}/status", listener.local_addr().unwrap());
        let (held, polls) = tokio::sync::mpsc::channel(1);
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            let c = client();
            while let Ok((stream, _)) = listener.accept().await {
                let (c, held, count) = (c.clone(), held.clone(), count.clone());
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (c, held, count) = (c.clone(), held.clone(), count.clone());
                        async move {
                            if req.uri().path() == "/status.json"
                                && count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
                                    == hold_at
                            {
                                let (release, released) = tokio::sync::oneshot::channel();
                                if held.send(release).await.is_ok() {
                                    let _ = released.await;
                                }
                            }
                            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                            let r = get(&c, &format!("http://{admin}{path}")).await;
                            let mut reply = http::Response::new(http_body_util::Full::new(r.body));
                            *reply.status_mut() = r.status;
                            for name in [http::header::CONTENT_TYPE, http::header::CACHE_CONTROL] {
                                if let Some(v) = r.headers.get(&name) {
                                    reply.headers_mut().insert(name, v.clone());
                                }
                            }
                            Ok::<_, std::convert::Infallible>(reply)
                        }
                    });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Relay { url, polls, task }
    }

    /// Waits, bounded, for the held poll: the page has rendered the farm as it was. The poll
    /// goes on (and the page renders the farm as it is then) when the returned sender sends
    /// or drops.
    async fn held(&mut self) -> tokio::sync::oneshot::Sender<()> {
        tokio::time::timeout(BROWSER_LIMIT, self.polls.recv())
            .await
            .unwrap_or_else(|_| panic!("the open page did not poll /status.json again"))
            .expect("the relay runs")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An admin API request, with `token` as bearer when given: the reply and its JSON.
async fn admin_api(
    c: &HttpClient,
    admin: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (Reply, serde_json::Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(b) = &bearer {
        headers.push(("authorization", b.as_str()));
    }
    let url = format!("http://{admin}{path}");
    let reply = send(c, method, &url, &headers, body.to_string()).await;
    let json = serde_json::from_slice(&reply.body).unwrap_or(serde_json::Value::Null);
    (reply, json)
}

/// `/status.json` now.
async fn status_json(c: &HttpClient, admin: SocketAddr) -> serde_json::Value {
    let r = get(c, &format!("http://{admin}/status.json")).await;
    serde_json::from_slice(&r.body).expect("status.json")
}

/// Waits until `/status.json` counts `total` replies over every backend.
async fn status_counts(c: &HttpClient, admin: SocketAddr, total: u64) {
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        let r = get(c, &format!("http://{admin}/status.json")).await;
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("status.json");
        let counted: u64 = v["pools"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["backends"].as_array().unwrap().iter())
            .map(|b| b["requests"].as_u64().unwrap())
            .sum();
        if counted == total {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "status.json counts {counted} replies, expected {total}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens `sessions` sessions on `app` and clicks `clicks` times in each.
async fn browse_sessions(c: &HttpClient, base: &str, sessions: usize, clicks: usize) -> u64 {
    let mut sent = 0;
    for _ in 0..sessions {
        let r = get(c, &format!("{base}/app")).await;
        assert_eq!(r.status, 200);
        sent += 1;
        let key = r.key().expect("session key");
        for k in 0..clicks {
            let r = get(c, &format!("{base}/app?_s={key}&_k={k}")).await;
            assert_eq!(r.status, 200);
            sent += 1;
        }
    }
    sent
}

fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(
        png.len() > 24 && png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR",
        "not a PNG ({} bytes)",
        png.len()
    );
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&png[16..20]), be(&png[20..24]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_pools_backends_and_growing_totals_in_a_browser() {
    let browser = chromium();
    assert!(browser.is_file());
    bounded(
        "status_page_shows_pools_backends_and_growing_totals_in_a_browser",
        async {
            let farm: Vec<Image> = images(3, Tracking::Links).await;
            let legacy = &farm[0];
            let secrets = support::TempDir::new("admin-token");
            secrets.write("admin.token", &format!("{}\n", support::TOKEN));
            let running = balancer(&format!(
                "admin_token_file = \"{}\"\n\
                 admin = \"127.0.0.1:0\"\nlisten = [\"127.0.0.1:0\"]\n\
                 [[pool]]\nname = \"app\"\n{}\
                 [[pool]]\nname = \"legacy\"\nhosts = [\"legacy.example\"]\naffinity = \"client-ip\"\n\
                 [[pool.backend]]\nname = \"legacy-1\"\naddress = \"{}\"\n",
                secrets.arg("admin.token"),
                backend_entries(&farm),
                legacy.addr
            ))
            .await;
            let base = format!("http://{}", running.addrs()[0]);
            let admin = running.admin_addr().unwrap();
            let c = client();
            let total = |rows: &HashMap<(String, String), Row>| {
                rows.values().map(|r| r.total).sum::<u64>()
            };
            let key = |pool: &str, backend: &str| (pool.to_string(), backend.to_string());

            let mut sent = browse_sessions(&c, &base, 3, 2).await;
            for _ in 0..2 {
                let r = get_host(&c, &base, "/app", "legacy.example").await;
                assert_eq!(r.status, 200);
                sent += 1;
            }
            status_counts(&c, admin, sent).await;

            let url = format!("http://{admin}/status");
            let dump = ["--dump-dom".to_string()];
            let dom = browse(&url, &dump).await;
            assert!(dom.contains("tidegate"), "{dom}");
            assert!(
                dom.contains(&format!("v{}", env!("CARGO_PKG_VERSION"))),
                "the page shows the version:\n{dom}"
            );
            let before = rows(&dom);
            let mut expected: Vec<(String, String)> = farm
                .iter()
                .map(|i| key("app", i.name()))
                .collect();
            expected.push(key("legacy", "legacy-1"));
            let mut shown: Vec<_> = before.keys().cloned().collect();
            shown.sort();
            expected.sort();
            assert_eq!(
                shown, expected,
                "every pool and backend has a row:\n{dom}"
            );
            for (row, r) in &before {
                assert_eq!(r.state, "active", "{row:?} is active:\n{dom}");
                // Passive checks: a backend that answered is up.
                assert_eq!(r.health, "up", "{row:?} answered, so it is up:\n{dom}");
                assert_eq!(r.pins.is_some(), row.0 == "app", "{row:?}: pins only in session pools");
            }
            for name in ["app", "legacy"] {
                assert!(
                    dom.contains(&format!("<h2>{name}</h2>")),
                    "pool {name} is named:\n{dom}"
                );
            }
            assert_charts(&dom, &["app", "legacy"], &[]);
            assert_eq!(total(&before), sent, "the totals count every reply");
            assert_eq!(before[&key("legacy", "legacy-1")].total, 2);
            let pins: u64 = before.values().filter_map(|r| r.pins).sum();
            assert_eq!(pins, 3, "three sessions, three pins:\n{dom}");

            let more = browse_sessions(&c, &base, 3, 3).await;
            sent += more;
            status_counts(&c, admin, sent).await;

            // The page stays open while a backend joins and another drains: the rows follow
            // without a reload.
            let added = support::image(tidegate::demo::ImageOptions::new("image-9")).await;
            let draining = farm[1].name().to_string();
            let mut relay = Relay::start(admin, 2).await;
            let live = relay.url.clone();
            let (dom, ()) = tokio::join!(browse(&live, &dump), async {
                let release = relay.held().await;
                let path = "/api/pools/app/backends";
                let body = format!(
                    "{{\"name\":\"image-9\",\"address\":\"{}\",\"weight\":2}}",
                    added.addr
                );
                let (r, v) = admin_api(&c, admin, Method::POST, path, None, &body).await;
                assert_eq!(r.status, 401, "a change without the token is refused: {v}");
                let (r, v) =
                    admin_api(&c, admin, Method::POST, path, Some(support::TOKEN), &body).await;
                assert_eq!(r.status, 201, "image-9 is added: {v}");
                assert_eq!(v["state"], "active", "{v}");
                let path = format!("/api/pools/app/backends/{draining}/drain");
                let (r, v) =
                    admin_api(&c, admin, Method::POST, &path, Some(support::TOKEN), "").await;
                assert_eq!(r.status, 200, "{draining} drains: {v}");
                assert_eq!(v["state"], "draining", "{draining} holds pins: {v}");
                // New sessions go to the active backends, the new one among them.
                let mut landed = Vec::new();
                for _ in 0..4 {
                    let r = get(&c, &format!("{base}/app")).await;
                    assert_eq!(r.status, 200);
                    sent += 1;
                    landed.push(r.image());
                }
                assert!(
                    landed.iter().any(|i| i == "image-9"),
                    "image-9 takes sessions: {landed:?}"
                );
                assert!(!landed.contains(&draining), "{draining} takes none: {landed:?}");
                status_counts(&c, admin, sent).await;
                release.send(()).expect("the page waits for its poll");
            });
            let after = rows(&dom);
            let mut shown: Vec<_> = after.keys().cloned().collect();
            shown.sort();
            expected.push(key("app", "image-9"));
            expected.sort();
            assert_eq!(shown, expected, "the added backend has a row, once:\n{dom}");
            let nine = &after[&key("app", "image-9")];
            assert_eq!(nine.state, "active", "image-9 is shown active:\n{dom}");
            assert_eq!(nine.health, "up", "image-9 answered, so it is up:\n{dom}");
            assert!(
                nine.pins >= Some(1) && nine.total >= 1,
                "image-9 shows its sessions: {nine:?}"
            );
            let drained = &after[&key("app", &draining)];
            assert!(
                ["draining", "drained"].contains(&drained.state.as_str()),
                "{draining} is shown draining or drained, not {:?}:\n{dom}",
                drained.state
            );
            assert_eq!(total(&after), sent, "the render counts the new replies");
            for (row, r) in &before {
                assert!(after[row].total >= r.total, "{row:?}: totals never fall");
            }
            assert!(
                farm.iter().any(|i| {
                    let row = key("app", i.name());
                    after[&row].total > before[&row].total
                }),
                "some backend's total grew"
            );
            drop(relay);

            // Open again while image-9 is removed (pins and all): its row goes.
            let mut relay = Relay::start(admin, 2).await;
            let live = relay.url.clone();
            let (dom, ()) = tokio::join!(browse(&live, &dump), async {
                let release = relay.held().await;
                let path = "/api/pools/app/backends/image-9";
                let (r, v) =
                    admin_api(&c, admin, Method::DELETE, path, Some(support::TOKEN), "").await;
                assert_eq!(r.status, 409, "image-9 holds pins: {v}");
                let path = format!("{path}?force=true");
                let (r, v) =
                    admin_api(&c, admin, Method::DELETE, &path, Some(support::TOKEN), "").await;
                assert_eq!(r.status, 200, "image-9 is removed: {v}");
                let v = status_json(&c, admin).await;
                assert!(!v.to_string().contains("image-9"), "status.json forgot image-9: {v}");
                release.send(()).expect("the page waits for its poll");
            });
            drop(relay);
            let gone = rows(&dom);
            let mut shown: Vec<_> = gone.keys().cloned().collect();
            shown.sort();
            expected.retain(|k| k.1 != "image-9");
            assert_eq!(shown, expected, "the removed backend's row is gone:\n{dom}");
            assert!(
                ["draining", "drained"].contains(&gone[&key("app", &draining)].state.as_str()),
                "{draining} still drains:\n{dom}"
            );

            // Once the pools have a sample, the charts draw it and label the latest value.
            let deadline = Instant::now() + Duration::from_secs(8);
            loop {
                let v = status_json(&c, admin).await;
                let pools = v["pools"].as_array().unwrap();
                if pools.iter().all(|p| !p["history"].as_array().unwrap().is_empty()) {
                    break;
                }
                assert!(Instant::now() < deadline, "no history sample within 8 s: {v}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let dom = browse(&url, &dump).await;
            assert_charts(&dom, &["app", "legacy"], &["app", "legacy"]);

            let shots = support::TempDir::new("screenshot");
            let shot = shots.path("status.png");
            browse(
                &url,
                &[
                    format!("--screenshot={}", shot.display()),
                    "--window-size=1280,720".to_string(),
                ],
            )
            .await;
            let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
            assert_eq!(png_size(&png), (1280, 720));
            // An empty or "loading…" page compresses to about 6 KB; the rendered tables do not.
            assert!(
                png.len() > 20_000,
                "the screenshot looks empty ({} bytes)",
                png.len()
            );
            running.shutdown().await;
            drop(added);
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Admin endpoints
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_answers_healthz_and_refuses_unknown_paths() {
    bounded("admin_answers_healthz_and_refuses_unknown_paths", async {
        let farm = images(2, Tracking::Links).await;
        let running = balancer(&format!(
            "admin = \"127.0.0.1:0\"\nlisten = [\"127.0.0.1:0\"]\n[[pool]]\nname = \"app\"\n{}",
            backend_entries(&farm)
        ))
        .await;
        let admin = running.admin_addr().unwrap();
        assert_ne!(admin.port(), 0);
        assert_ne!(admin, running.addrs()[0], "the admin listener is its own");
        let c = client();

        let r = get(&c, &format!("http://{admin}/healthz")).await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok\n"));

        for path in ["/nope", "/metrics/extra", "/status.json/x", "/app"] {
            let r = get(&c, &format!("http://{admin}{path}")).await;
            assert_eq!(r.status, 404, "{path}: {}", r.text());
            assert!(
                r.text().contains("/metrics"),
                "{path}: the 404 lists the endpoints: {}",
                r.text()
            );
        }
        let r = send(
            &c,
            Method::POST,
            &format!("http://{admin}/metrics"),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 405, "admin endpoints are read-only");

        let r = get(&c, &format!("http://{admin}/status")).await;
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").starts_with("text/html"));
        assert!(r.text().contains("/status.json"));

        let r = get(&c, &format!("http://{admin}/status.json")).await;
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").starts_with("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        let pools = v["pools"].as_array().unwrap();
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0]["name"], "app");
        assert_eq!(pools[0]["affinity"], "session");
        let names: Vec<&str> = pools[0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                assert_eq!(b["state"], "active");
                b["name"].as_str().unwrap()
            })
            .collect();
        assert_eq!(names, ["image-1", "image-2"]);
        running.shutdown().await;
    })
    .await;
}
