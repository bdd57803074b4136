//! Backends on demand, driven through the real binary: the images are `tidegate image`
//! processes that tidegate launches itself. One launch however many first requests arrive;
//! a launch that exits or never opens its port answered 503 with `Retry-After`, logged with
//! what the command wrote, and backed off; an idle image stopped and launched again; new
//! sessions filling the running images before the next is launched (`max_sessions`); one
//! session's requests queued for its own image (`max_conns`); images left running adopted by
//! the next tidegate; an image that dies reaped and launched again; and `tidegate demo
//! --on-demand`, whose images are its children, launched as sessions arrive and stopped with it.
//!
//! Every command is launched through `sh`, which writes its process id to a file of the test
//! before it `exec`s the image: an [`Images`] guard, declared before the [`Process`] (so
//! dropped after it, even on a panic), kills every process named there that is still one of
//! its own. No test leaves a process behind.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use support::{BIN, HttpClient, Process, TOKEN, TempDir, client, free_addr, get, metric};

/// The most any one test may take.
const TEST_LIMIT: Duration = Duration::from_secs(45);
/// The most a change (a launch, a stop, a log line) may take to be seen.
const SEEN_LIMIT: Duration = Duration::from_secs(15);
/// How often a bounded wait looks again.
const POLL: Duration = Duration::from_millis(20);

async fn bounded<F: std::future::Future<Output = ()>>(what: &str, body: F) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {TEST_LIMIT:?}"));
}

/// The variable every launched command gets (its value the test's directory), so that the
/// guard kills only processes of its own test, never one that reused a recorded id.
const MARK: &str = "TIDEGATE_LAUNCH_TEST";

/// The processes one test launches: the file their ids are written to, their logs, and the
/// guard that kills whatever of them is left when it is dropped.
struct Images {
    dir: TempDir,
}

impl Images {
    fn new(label: &str) -> Images {
        Images {
            dir: TempDir::new(label),
        }
    }

    /// The file each launched command appends its process id to.
    fn pid_file(&self) -> String {
        self.dir.arg("pids")
    }

    /// The ids recorded so far, in launch order.
    fn pids(&self) -> Vec<i32> {
        self.dir
            .read("pids")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// A `sh -c` command line that records its id, then runs `script`.
    fn wrapped(&self, script: &str) -> String {
        format!(
            "launch = [\"/bin/sh\", \"-c\", {:?}]\n",
            format!("echo $$ >> {}; {script}", self.pid_file())
        )
    }

    /// The command that runs a demo image on the backend's address, under its name.
    fn image_command(&self) -> String {
        self.wrapped(&format!(
            "exec {BIN} image --listen {{host}}:{{port}} --name {{name}}"
        ))
    }

    /// A `[[pool.backend]]` named `name` at `address`, launched with `launch` (a line from
    /// [`Images::wrapped`]), with `extra` keys; its output goes to `NAME.log` here.
    fn backend(&self, name: &str, address: SocketAddr, launch: &str, extra: &str) -> String {
        format!(
            "[[pool.backend]]\nname = \"{name}\"\naddress = \"{address}\"\n{launch}\
             launch_log = {:?}\nlaunch_env = {{ {MARK} = {:?} }}\n{extra}\n",
            self.dir.arg("{name}.log"),
            self.dir.arg("")
        )
    }

    /// What the command launched for `name` wrote.
    fn output(&self, name: &str) -> String {
        self.dir.read(&format!("{name}.log"))
    }

    /// Whether `pid` is one of this test's processes (its environment holds the mark).
    fn ours(&self, pid: i32) -> bool {
        let wanted = format!("{MARK}={}", self.dir.arg(""));
        std::fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == wanted.as_bytes()))
    }
}

impl Drop for Images {
    /// SIGKILLs every process recorded in the pid file that is still this test's, then any
    /// other process carrying the mark (a command caught before it wrote its id), until a
    /// look finds none.
    fn drop(&mut self) {
        let kill = |pid: i32| {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        };
        for pid in self.pids() {
            if self.ours(pid) {
                kill(pid);
            }
        }
        for _ in 0..5 {
            let marked: Vec<i32> = std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|&pid| self.ours(pid))
                .collect();
            if marked.is_empty() {
                break;
            }
            marked.into_iter().for_each(kill);
            std::thread::sleep(POLL);
        }
    }
}

/// Whether the process `pid` exists (`kill -0`).
fn alive(pid: i32) -> bool {
    rustix::process::Pid::from_raw(pid)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// Waits, bounded, until the process `pid` is gone.
async fn gone(pid: i32, limit: Duration) {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} still exists after {limit:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// `{pool="app",backend="NAME"}`, and a third label if any.
fn labels(backend: &str, extra: Option<(&str, &str)>) -> String {
    match extra {
        None => format!("{{pool=\"app\",backend=\"{backend}\"}}"),
        Some((k, v)) => format!("{{pool=\"app\",backend=\"{backend}\",{k}=\"{v}\"}}"),
    }
}

/// Launches started for `backend` as `/metrics` counts them.
async fn launches(p: &Process, c: &HttpClient, backend: &str) -> f64 {
    let m = p.metrics(c).await;
    metric(
        &m,
        &format!("tidegate_launches_total{}", labels(backend, None)),
    )
}

/// The `process` object of a backend of pool `app` in `GET /api/pools`.
async fn process(p: &Process, c: &HttpClient, name: &str) -> Value {
    let b = p.backend(c, "app", name).await;
    assert!(b["process"].is_object(), "{name} has no process: {b}");
    b["process"].clone()
}

/// Waits, bounded, until the process of `name` is in `state`; its `process` object.
async fn process_becomes(p: &Process, c: &HttpClient, name: &str, state: &str) -> Value {
    let deadline = Instant::now() + SEEN_LIMIT;
    loop {
        let v = process(p, c, name).await;
        if v["state"] == state {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: process did not become {state:?} within {SEEN_LIMIT:?}: {v}\n{}",
            p.log()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The pid the API shows for a running process.
fn pid_of(v: &Value) -> i32 {
    v["pid"].as_i64().unwrap_or_else(|| panic!("no pid in {v}")) as i32
}

/// A new session: a first page, asked for by a client of its own. Its key and the image
/// that answered.
async fn open(base: &str) -> (String, String) {
    let r = get(&client(), &format!("{base}/app")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    (r.key().expect("the page names its session"), r.image())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_first_requests_launch_the_image_once_and_are_all_answered_by_it() {
    bounded("coalesced launch", async {
        let images = Images::new("coalesced");
        let addr = free_addr();
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\n{}",
            images.backend(
                "img1",
                addr,
                &images.image_command(),
                "launch_timeout = 20\nstop_timeout = 1"
            )
        ))
        .await;
        let c = client();
        assert_eq!(process(&p, &c, "img1").await["state"], "stopped");
        let base = p.base();
        let requests: Vec<_> = (0..100)
            .map(|_| {
                let base = base.clone();
                tokio::spawn(async move {
                    let r = get(&client(), &format!("{base}/app")).await;
                    (r.status, r.image(), r.text())
                })
            })
            .collect();
        for r in requests {
            let (status, image, text) = r.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{text}\n{}", p.log());
            assert_eq!(image, "img1");
        }
        assert_eq!(images.pids().len(), 1, "one start: {:?}", images.pids());
        assert_eq!(launches(&p, &c, "img1").await, 1.0);
        let v = process(&p, &c, "img1").await;
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["pid"], images.pids()[0], "{v}");
        assert_eq!(v["launches"], 1, "{v}");
        assert_eq!(v["adopted"], false, "{v}");
        assert_eq!(v["waiting"], 0, "{v}");
        assert_eq!(p.log().matches("launching image").count(), 1);
        let m = p.metrics(&c).await;
        let waited = metric(
            &m,
            &format!("tidegate_launch_waited_total{}", labels("img1", None)),
        );
        assert!((1.0..=100.0).contains(&waited), "waited {waited}");
        assert_eq!(
            metric(
                &m,
                &format!("tidegate_launch_waiting{}", labels("img1", None))
            ),
            0.0
        );
        assert_eq!(
            metric(
                &m,
                &format!(
                    "tidegate_backend_process{}",
                    labels("img1", Some(("state", "running")))
                )
            ),
            1.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_exits_at_once_is_answered_503_logged_with_its_output_and_backed_off() {
    bounded("early exit", async {
        let images = Images::new("exits");
        let addr = free_addr();
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\n{}",
            images.backend(
                "img1",
                addr,
                &images.wrapped("echo boom-on-stderr >&2; exit 3"),
                "launch_timeout = 20\nlaunch_backoff = 1\nstop_timeout = 1"
            )
        ))
        .await;
        let c = client();
        let url = format!("{}/app", p.base());
        let started = Instant::now();
        let r = get(&c, &url).await;
        let took = started.elapsed();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert!(took < Duration::from_secs(1), "answered after {took:?}");
        assert!(
            r.header("retry-after").parse::<u64>().is_ok_and(|s| s >= 1),
            "Retry-After: {:?}",
            r.header("retry-after")
        );
        // The client is told what kind of failure, not the farm's details (they are logged):
        // neither the backend's name nor its address.
        assert!(
            r.text()
                .starts_with("tidegate: the application server could not be started"),
            "{}",
            r.text()
        );
        assert!(
            r.text().contains("it exited before its port opened")
                && !r.text().contains("status 3")
                && !r.text().contains("img1")
                && !r.text().contains(&addr.port().to_string()),
            "{}",
            r.text()
        );
        p.log_shows("backend img1 could not be started", 1, SEEN_LIMIT)
            .await;
        let log = p.log_shows("launch failed", 1, SEEN_LIMIT).await;
        let line = log
            .lines()
            .find(|l| l.contains("launch failed"))
            .expect("a failure line");
        assert!(
            line.contains("ERROR") && line.contains("tidegate::farm::launch"),
            "{line}"
        );
        assert!(line.contains("exited with status 3"), "{line}");
        assert!(
            line.contains("output=") && line.contains("boom-on-stderr"),
            "{line}"
        );
        assert!(images.output("img1").contains("boom-on-stderr"));
        let m = p.metrics(&c).await;
        assert_eq!(
            metric(
                &m,
                &format!(
                    "tidegate_launch_failures_total{}",
                    labels("img1", Some(("reason", "exited")))
                )
            ),
            1.0
        );
        let refused = |m: &str, why: &str| {
            metric(
                m,
                &format!(
                    "tidegate_launch_refused_total{}",
                    labels("img1", Some(("reason", why)))
                ),
            )
        };
        // Told by the launch it started and waited for.
        assert_eq!(refused(&m, "failed"), 1.0, "{m}");
        assert_eq!(launches(&p, &c, "img1").await, 1.0);
        let v = process(&p, &c, "img1").await;
        assert_eq!(v["state"], "stopped", "{v}");
        assert_eq!(v["pid"], Value::Null, "{v}");
        assert_eq!(v["last_failure"], "exited with status 3", "{v}");
        // Inside the back-off: refused too, told when to come back, and nothing launched.
        let r = get(&c, &url).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert!(
            r.text()
                .starts_with("tidegate: the application server could not be started a moment ago"),
            "{}",
            r.text()
        );
        // The back-off (1 s) rounded up to whole seconds of the clock.
        let retry: u64 = r.header("retry-after").parse().unwrap_or(0);
        assert!((1..=2).contains(&retry), "{:?}", r.headers);
        assert_eq!(refused(&p.metrics(&c).await, "backoff"), 1.0);
        assert_eq!(
            launches(&p, &c, "img1").await,
            1.0,
            "no launch in the back-off"
        );
        assert_eq!(images.pids().len(), 1);
        // After it: tried again (and failing the same way).
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let r = get(&c, &url).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert!(
            r.text()
                .starts_with("tidegate: the application server could not be started"),
            "{}",
            r.text()
        );
        assert_eq!(launches(&p, &c, "img1").await, 2.0);
        assert_eq!(images.pids().len(), 2);
        p.log_shows("launch failed", 2, SEEN_LIMIT).await;
        let m = p.metrics(&c).await;
        assert_eq!(
            metric(
                &m,
                &format!(
                    "tidegate_launch_failures_total{}",
                    labels("img1", Some(("reason", "exited")))
                )
            ),
            2.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_never_opens_its_port_times_out_and_is_killed() {
    bounded("launch timeout", async {
        let images = Images::new("timeout");
        let addr = free_addr();
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\n{}",
            images.backend(
                "img1",
                addr,
                &images.wrapped("exec sleep 30"),
                "launch_timeout = 1\nlaunch_backoff = 5\nstop_timeout = 0.5"
            )
        ))
        .await;
        let c = client();
        let started = Instant::now();
        let r = get(&c, &format!("{}/app", p.base())).await;
        let took = started.elapsed();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert!(
            took >= Duration::from_millis(800) && took < Duration::from_secs(5),
            "answered after {took:?}"
        );
        assert!(!r.header("retry-after").is_empty(), "{:?}", r.headers);
        assert!(
            r.text()
                .starts_with("tidegate: the application server could not be started"),
            "{}",
            r.text()
        );
        assert!(
            r.text().contains("its port did not open in time"),
            "{}",
            r.text()
        );
        let pids = images.pids();
        assert_eq!(pids.len(), 1, "{pids:?}");
        // SIGTERM at once, SIGKILL after stop_timeout: gone well within a few seconds.
        gone(pids[0], Duration::from_secs(3)).await;
        let log = p.log_shows("launch failed", 1, SEEN_LIMIT).await;
        assert!(log.contains("reason=\"timeout\""), "{log}");
        let m = p.metrics(&c).await;
        assert_eq!(
            metric(
                &m,
                &format!(
                    "tidegate_launch_failures_total{}",
                    labels("img1", Some(("reason", "timeout")))
                )
            ),
            1.0
        );
        let v = process(&p, &c, "img1").await;
        assert_eq!(v["state"], "stopped", "{v}");
        assert!(
            v["last_failure"]
                .as_str()
                .is_some_and(|f| f.contains("launch_timeout")),
            "{v}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_image_is_stopped_and_the_next_request_launches_it_again() {
    bounded("idle stop", async {
        let images = Images::new("idle");
        let addr = free_addr();
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\n[pool.session]\nidle_timeout = 1\n{}",
            images.backend(
                "img1",
                addr,
                &images.image_command(),
                "launch_timeout = 20\nidle_stop = 1\nstop_timeout = 2"
            )
        ))
        .await;
        let c = client();
        let (_, image) = open(&p.base()).await;
        assert_eq!(image, "img1");
        let v = process(&p, &c, "img1").await;
        assert_eq!(v["state"], "running", "{v}");
        let first = pid_of(&v);
        assert_eq!(images.pids(), [first]);
        // The pin expires after a second, the image is idle a second later: stopped.
        process_becomes(&p, &c, "img1", "stopped").await;
        gone(first, Duration::from_secs(3)).await;
        let log = p.log_shows("image stopped", 1, SEEN_LIMIT).await;
        assert!(log.contains("stopping image"), "{log}");
        let v = process(&p, &c, "img1").await;
        assert_eq!(v["pid"], Value::Null, "{v}");
        let m = p.metrics(&c).await;
        assert_eq!(
            metric(
                &m,
                &format!("tidegate_idle_stops_total{}", labels("img1", None))
            ),
            1.0
        );
        assert_eq!(
            metric(
                &m,
                &format!("tidegate_process_exits_total{}", labels("img1", None))
            ),
            0.0,
            "a stop asked for is no unexpected exit"
        );
        // Launched again by the next request.
        let (_, image) = open(&p.base()).await;
        assert_eq!(image, "img1");
        assert_eq!(launches(&p, &c, "img1").await, 2.0);
        let v = process(&p, &c, "img1").await;
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["launches"], 2, "{v}");
        let pids = images.pids();
        assert_eq!(pids.len(), 2, "{pids:?}");
        assert_eq!(v["pid"], pids[1], "{v}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_fill_the_running_images_before_the_next_is_launched() {
    bounded("max_sessions", async {
        let images = Images::new("fill");
        let names = ["img1", "img2", "img3", "img4"];
        let backends: String = names
            .iter()
            .map(|n| {
                images.backend(
                    n,
                    free_addr(),
                    &images.image_command(),
                    "max_sessions = 2\nlaunch_timeout = 20\nstop_timeout = 1",
                )
            })
            .collect();
        let p = Process::start(&format!("[[pool]]\nname = \"app\"\n{backends}")).await;
        let c = client();
        let mut got = Vec::new();
        for _ in 0..6 {
            let (_, image) = open(&p.base()).await;
            got.push(image);
        }
        assert_eq!(
            got,
            ["img1", "img1", "img2", "img2", "img3", "img3"],
            "\n{}",
            p.log()
        );
        for n in &names[..3] {
            let b = p.backend(&c, "app", n).await;
            assert_eq!(b["pins"], 2, "{b}");
            assert_eq!(b["process"]["state"], "running", "{b}");
            assert_eq!(b["process"]["launches"], 1, "{b}");
        }
        let v = process(&p, &c, "img4").await;
        assert_eq!(v["state"], "stopped", "{v}");
        assert_eq!(v["launches"], 0, "{v}");
        assert_eq!(launches(&p, &c, "img4").await, 0.0);
        assert_eq!(images.pids().len(), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conns_serves_one_sessions_parallel_requests_one_at_a_time_on_its_image() {
    bounded("max_conns on demand", async {
        let images = Images::new("conns");
        let backends: String = ["img1", "img2"]
            .iter()
            .map(|n| {
                images.backend(
                    n,
                    free_addr(),
                    &images.image_command(),
                    "max_conns = 1\nlaunch_timeout = 20\nstop_timeout = 1",
                )
            })
            .collect();
        let p = Process::start(&format!("[[pool]]\nname = \"app\"\n{backends}")).await;
        let c = client();
        let (key, image) = open(&p.base()).await;
        assert_eq!(image, "img1");
        let clicks: Vec<_> = (0..20u64)
            .map(|n| {
                let (base, key) = (p.base(), key.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(3 * n)).await;
                    let r = get(&client(), &format!("{base}/app?_s={key}&_k=p{n}")).await;
                    (r.status, r.image(), r.counter())
                })
            })
            .collect();
        let mut counters = Vec::new();
        for click in clicks {
            let (status, image, counter) = click.await.unwrap();
            assert_eq!((status, image.as_str()), (StatusCode::OK, "img1"));
            counters.push(counter);
        }
        counters.sort();
        assert_eq!(
            counters,
            (2..=21).collect::<Vec<u64>>(),
            "each request counted once, on the session's image"
        );
        let v = process(&p, &c, "img2").await;
        assert_eq!(v["state"], "stopped", "{v}");
        assert_eq!(v["launches"], 0, "{v}");
        assert_eq!(images.pids().len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_left_running_are_adopted_by_the_next_tidegate() {
    bounded("adoption", async {
        let images = Images::new("adopt");
        let backends: String = ["img1", "img2"]
            .iter()
            .map(|n| {
                images.backend(
                    n,
                    free_addr(),
                    &images.image_command(),
                    "max_sessions = 1\nlaunch_timeout = 20\nstop_timeout = 1\nstop_on_exit = false",
                )
            })
            .collect();
        let body = format!("[[pool]]\nname = \"app\"\n{backends}");
        let c = client();
        let first = Process::start(&body).await;
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(open(&first.base()).await.1);
        }
        assert_eq!(got, ["img1", "img2"]);
        let mut pids = Vec::new();
        for n in ["img1", "img2"] {
            pids.push(pid_of(&process(&first, &c, n).await));
        }
        assert_eq!(images.pids(), pids);
        drop(first); // SIGKILL: nothing is stopped
        let p = Process::start(&body).await;
        for (n, pid) in ["img1", "img2"].iter().zip(&pids) {
            assert!(alive(*pid), "{n} survived its tidegate");
            let v = process(&p, &c, n).await;
            assert_eq!(v["state"], "running", "{n}: {v}\n{}", p.log());
            assert_eq!(v["adopted"], true, "{n}: {v}");
            assert_eq!(v["pid"], *pid, "{n}: {v}");
            assert_eq!(v["launches"], 0, "{n}: {v}");
        }
        let log = p
            .log_shows("image already running on its port: adopted", 2, SEEN_LIMIT)
            .await;
        assert!(!log.contains("launching image"), "{log}");
        // One new session each (max_sessions = 1), served by the adopted images.
        let mut served = BTreeSet::new();
        for _ in 0..2 {
            served.insert(open(&p.base()).await.1);
        }
        assert_eq!(
            served,
            BTreeSet::from(["img1".to_string(), "img2".to_string()])
        );
        for n in ["img1", "img2"] {
            assert_eq!(launches(&p, &c, n).await, 0.0, "{n}");
        }
        assert_eq!(images.pids(), pids, "no new start");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_dies_is_reaped_and_launched_again_by_the_next_request() {
    bounded("death", async {
        let images = Images::new("death");
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\n{}",
            images.backend(
                "img1",
                free_addr(),
                &images.image_command(),
                "launch_timeout = 20\nstop_timeout = 1"
            )
        ))
        .await;
        let c = client();
        let (_, image) = open(&p.base()).await;
        assert_eq!(image, "img1");
        let first = pid_of(&process(&p, &c, "img1").await);
        assert_eq!(images.pids(), [first]);
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(first).unwrap(),
            rustix::process::Signal::KILL,
        )
        .expect("SIGKILL sent");
        let v = process_becomes(&p, &c, "img1", "stopped").await;
        assert_eq!(v["pid"], Value::Null, "{v}");
        let log = p
            .log_shows("image exited unexpectedly", 1, SEEN_LIMIT)
            .await;
        assert!(log.contains("killed by signal 9"), "{log}");
        gone(first, Duration::from_secs(3)).await;
        let m = p.metrics(&c).await;
        assert_eq!(
            metric(
                &m,
                &format!("tidegate_process_exits_total{}", labels("img1", None))
            ),
            1.0
        );
        let (_, image) = open(&p.base()).await;
        assert_eq!(image, "img1");
        let v = process(&p, &c, "img1").await;
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["launches"], 2, "{v}");
        let pids = images.pids();
        assert_eq!(pids.len(), 2, "{pids:?}");
        assert_eq!(v["pid"], pids[1], "{v}");
        assert_ne!(pids[0], pids[1]);
    })
    .await;
}

/// The processes whose parent is `pid` (from `/proc/*/stat`).
fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                // `pid (comm) state ppid …`: the command name may hold spaces.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// `tidegate demo --on-demand`, killed with its images when dropped.
struct Demo {
    child: std::process::Child,
    dir: TempDir,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        for image in children_of(pid) {
            if let Some(p) = rustix::process::Pid::from_raw(image) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_on_demand_demo_launches_its_images_as_sessions_arrive_and_stops_them_on_exit() {
    bounded("demo --on-demand", async {
        let listen = free_addr();
        let dir = TempDir::new("demo");
        // Run outside the repository: no development certificate, no HTTPS listener.
        let mut demo = Demo {
            child: std::process::Command::new(BIN)
                .args(["demo", "--on-demand", "--listen", &listen.to_string()])
                .current_dir(dir.dir())
                .env("RUST_LOG", "info")
                .stdout(std::fs::File::create(dir.path("stdout")).unwrap())
                .stderr(std::fs::File::create(dir.path("stderr")).unwrap())
                .spawn()
                .expect("the demo starts"),
            dir,
        };
        let pid = demo.child.id() as i32;
        let deadline = Instant::now() + SEEN_LIMIT;
        while std::net::TcpStream::connect(listen).is_err() {
            assert!(
                Instant::now() < deadline,
                "the demo does not listen: {}",
                demo.dir.read("stderr")
            );
            tokio::time::sleep(POLL).await;
        }
        assert!(children_of(pid).is_empty(), "every image starts stopped");
        let base = format!("http://{listen}");
        let mut served = Vec::new();
        for _ in 0..3 {
            served.push(open(&base).await.1);
        }
        // Two sessions an image: the third launches the second image.
        assert_eq!(served, ["image-1", "image-1", "image-2"]);
        let images = children_of(pid);
        assert_eq!(images.len(), 2, "{images:?}");
        for image in &images {
            let cmdline = std::fs::read_to_string(format!("/proc/{image}/cmdline")).unwrap();
            assert!(cmdline.contains("image\0--listen"), "{cmdline:?}");
        }
        assert!(
            demo.dir.read("stdout").contains("on demand"),
            "{}",
            demo.dir.read("stdout")
        );
        // SIGTERM: the demo's images have stop_on_exit.
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let deadline = Instant::now() + SEEN_LIMIT;
        while demo.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the demo did not stop");
            tokio::time::sleep(POLL).await;
        }
        for image in images {
            gone(image, Duration::from_secs(3)).await;
        }
        let log = demo.dir.read("stderr");
        assert_eq!(log.matches("launching image").count(), 2, "{log}");
        assert_eq!(log.matches("image stopped").count(), 2, "{log}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_removed_while_its_image_launches_has_it_stopped_and_its_request_goes_elsewhere()
{
    bounded("removed while launching", async {
        let images = Images::new("retired");
        let (a1, a2) = (free_addr(), free_addr());
        // img1 takes a second to open its port; img2 opens it at once.
        let slow = images.wrapped(&format!(
            "sleep 1; exec {BIN} image --listen {{host}}:{{port}} --name {{name}}"
        ));
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\n{}{}",
            images.backend("img1", a1, &slow, "max_sessions = 1\nstop_timeout = 1"),
            images.backend("img2", a2, &images.image_command(), "stop_timeout = 1"),
        ))
        .await;
        let c = client();
        let waiting = tokio::spawn({
            let url = format!("{}/app", p.base());
            let c = c.clone();
            async move { get(&c, &url).await }
        });
        process_becomes(&p, &c, "img1", "launching").await;
        let removed = p
            .call(
                http::Method::DELETE,
                "/api/pools/app/backends/img1?force=true",
                Some(TOKEN),
                "",
            )
            .await;
        assert_eq!(removed.status, StatusCode::OK, "{:?}", removed.text);
        // The request that waited for img1 is routed again: img2 is launched for it.
        let r = waiting.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.image(), "img2");
        // img1's image, once it runs, is stopped, and never launched again.
        p.log_shows(
            "its backend left the farm while it was launched",
            1,
            SEEN_LIMIT,
        )
        .await;
        let first = images.pids()[0];
        gone(first, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(images.pids().len(), 2, "img1 once, img2 once");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_clients_of_an_image_that_cannot_start_go_to_another() {
    bounded("client-ip back-off", async {
        let images = Images::new("ip-backoff");
        let (a1, a2) = (free_addr(), free_addr());
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\naffinity = \"client-ip\"\n{}{}",
            images.backend("img1", a1, &images.wrapped("exit 3"), "launch_backoff = 30"),
            images.backend("img2", a2, &images.image_command(), ""),
        ))
        .await;
        let c = client();
        // Every client address is 127.0.0.1 here: its image is either. The first request to
        // img1 waits for its launch and is told it failed (503); after that, img1 backs off
        // and the same client is served by img2.
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let r = get(&c, &format!("{}/app", p.base())).await;
            statuses.push((r.status.as_u16(), r.image()));
        }
        // 127.0.0.1 hashes to img1 (names chosen so): its failed launch is its first answer.
        assert_eq!(statuses[0].0, 503, "{statuses:?}");
        assert_eq!(statuses[1..], [(200, "img2".into()), (200, "img2".into())]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_keeps_its_image_from_an_idle_stop() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bounded("websocket and idle_stop", async {
        let images = Images::new("tunnel-idle");
        let addr = free_addr();
        // Client-IP: no pins, so only the open tunnel keeps the image busy.
        let p = Process::start(&format!(
            "[[pool]]\nname = \"app\"\naffinity = \"client-ip\"\n{}",
            images.backend("img1", addr, &images.image_command(), "idle_stop = 1"),
        ))
        .await;
        let c = client();
        let mut stream = tokio::net::TcpStream::connect(p.base().trim_start_matches("http://"))
            .await
            .unwrap();
        stream
            .write_all(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            )
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "{head:?}");
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        // Four idle_stops with nothing but the tunnel, which carries a message now and then.
        for round in 0..8u8 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            stream.write_all(&[round; 4]).await.unwrap();
            let mut back = [0u8; 4];
            stream.read_exact(&mut back).await.unwrap();
            assert_eq!(back, [round; 4]);
        }
        assert_eq!(process(&p, &c, "img1").await["state"], "running");
        // Closed: idle from then on, and stopped.
        drop(stream);
        process_becomes(&p, &c, "img1", "stopped").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launched_image_does_not_inherit_the_admin_token() {
    bounded("no token in the image's environment", async {
        let images = Images::new("token-env");
        let env_file = images.dir.arg("env");
        let launch = images.wrapped(&format!(
            "env > {env_file}; exec {BIN} image --listen {{host}}:{{port}} --name {{name}}"
        ));
        let p = support::Launch::config(
            "token-env",
            &format!(
                "listen = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\n[[pool]]\nname = \"app\"\n{}",
                images.backend("img1", free_addr(), &launch, "stop_timeout = 1")
            ),
        )
        .env("TIDEGATE_ADMIN_TOKEN", "token-for-tidegate-only-0123456789")
        .start()
        .await;
        let r = get(&client(), &format!("{}/app", p.base())).await;
        assert_eq!(r.image(), "img1");
        let env = images.dir.read("env");
        assert!(
            env.contains(MARK),
            "the image's own launch_env is set: {env}"
        );
        assert!(
            !env.contains("TIDEGATE_ADMIN_TOKEN"),
            "the admin token reached the image: {env}"
        );
    })
    .await;
}
