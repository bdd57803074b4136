//! The `tidegate` command as an operator runs it: `check` on good and bad files, the
//! quick-start flags serving a farm, and the refusals of a command line that cannot work.

mod support;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{
    BIN, Launch, START_LIMIT, TempDir, client, exited, get, images, run, stderr, stdout,
};
use tidegate::demo::Tracking;
use tokio::process::Command;

const GOOD: &str = r#"listen = ["127.0.0.1:8080", "127.0.0.1:8081"]

[[pool]]
name = "app"
hosts = ["shop.example"]

[pool.session]
cookies = ["_s", "counter"]

[[pool.backend]]
name = "image-1"
address = "127.0.0.1:9001"

[[pool.backend]]
name = "image-2"
address = "127.0.0.1:9002"
weight = 2
"#;

#[tokio::test]
async fn check_accepts_a_good_file_and_says_ok() {
    let dir = TempDir::new("good");
    dir.write("good.toml", GOOD);
    let file = dir.arg("good.toml");
    let out = run(&["check", "--config", &file]).await;
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        stderr(&out)
    );
    let said = stdout(&out);
    assert!(said.contains("ok"), "stdout: {said:?}");
    assert!(said.contains(&file), "stdout names the file: {said:?}");
    assert!(said.contains("2 backends"), "stdout: {said:?}");
}

#[tokio::test]
async fn the_example_configuration_passes_check() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");
    let out = run(&["check", "--config", file]).await;
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test]
async fn check_refuses_bad_files_naming_the_key_and_line() {
    let cases = [
        (
            "unknown-key.toml",
            "listen = [\"127.0.0.1:8080\"]\n[[pool]]\nname = \"app\"\nbogus = 1\n\
[[pool.backend]]\naddress = \"127.0.0.1:9001\"\n",
            "pool[0].bogus",
            4,
        ),
        (
            "bad-address.toml",
            "[[pool]]\nname = \"app\"\n\n[[pool.backend]]\nname = \"image-1\"\naddress = \"nowhere:80\"\n",
            "pool[0].backend[0].address",
            6,
        ),
        (
            "duplicate-name.toml",
            "[[pool]]\nname = \"app\"\n[[pool.backend]]\nname = \"image-1\"\naddress = \"127.0.0.1:9001\"\n\
[[pool.backend]]\nname = \"image-1\"\naddress = \"127.0.0.1:9002\"\n",
            "pool[0].backend[1].name",
            7,
        ),
        (
            "missing-program.toml",
            "[[pool]]\nname = \"app\"\n[[pool.backend]]\nname = \"image-1\"\naddress = \"127.0.0.1:9001\"\n\
launch = [\"/opt/pharo/no-such-pharo\", \"--headless\", \"app.image\", \"{port}\"]\n",
            "pool[0].backend[0].launch[0]",
            6,
        ),
    ];
    let dir = TempDir::new("bad");
    for (label, text, key, line) in cases {
        dir.write(label, text);
        let file = dir.arg(label);
        let out = run(&["check", "--config", &file]).await;
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{label}: exit {:?}, stderr {err:?}",
            out.status
        );
        assert!(err.contains(key), "{label}: stderr names {key}: {err:?}");
        assert!(
            err.contains(&format!("line {line}")),
            "{label}: stderr names line {line}: {err:?}"
        );
        assert!(
            err.contains(&file),
            "{label}: stderr names the file: {err:?}"
        );
        assert!(!stdout(&out).contains("ok"), "{label}: stdout says ok");
    }
    // A file that is not there is refused the same way.
    let out = run(&["check", "--config", &dir.arg("missing.toml")]).await;
    assert_eq!(out.status.code(), Some(2), "missing file: {}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_start_flags_serve_sticky_sessions() {
    let imgs = images(2, Tracking::Links).await;
    let (a, b) = (imgs[0].addr.to_string(), imgs[1].addr.to_string());
    let served = Launch::flags("quick-start", &[a, b]).start().await;
    let client = client();
    let mut seen = HashSet::new();
    for _ in 0..2 {
        let page = get(&client, &format!("{}/app", served.base())).await;
        assert_eq!(page.status, 200, "{}", served.log());
        let key = page.key().expect("the first page links its session");
        let image = page.image();
        seen.insert(image.clone());
        for i in 0..20u64 {
            let reply = get(&client, &format!("{}/app?_s={key}&_k=k{i}", served.base())).await;
            assert_eq!(reply.image(), image, "request {i}: the session moved");
            assert_eq!(
                reply.counter(),
                i + 2,
                "request {i}: the session state was lost"
            );
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "new sessions spread over both backends: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_start_client_ip_affinity_keeps_a_client_on_one_image() {
    let imgs = images(2, Tracking::Links).await;
    let (a, b) = (imgs[0].addr.to_string(), imgs[1].addr.to_string());
    let served = Launch::flags("client-ip", &[a, b])
        .args(&["--affinity", "client-ip"])
        .start()
        .await;
    let client = client();
    let mut seen = HashSet::new();
    for i in 0..20 {
        // New sessions every time: only the client address keeps the image.
        let reply = get(&client, &format!("{}/app?n={i}", served.base())).await;
        assert_eq!(reply.status, 200, "{}", served.log());
        assert!(
            reply.headers.get("set-cookie").is_none(),
            "client-ip mode sets no cookie"
        );
        seen.insert(reply.image());
    }
    assert_eq!(seen.len(), 1, "one client, one image: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_start_session_param_names_the_field_that_pins() {
    // Cookie-tracking images: the balancer learns each new key from `Set-Cookie: _s=KEY`, then
    // requests naming the key only as `?sid=KEY` must reach its image.
    let imgs = images(2, Tracking::Cookie).await;
    let (a, b) = (imgs[0].addr.to_string(), imgs[1].addr.to_string());
    let served = Launch::flags("session-param", &[a, b])
        .args(&["--session-param", "sid"])
        .start()
        .await;
    let client = client();
    for _ in 0..2 {
        let page = get(&client, &format!("{}/app", served.base())).await;
        assert_eq!(page.status, 200, "{}", served.log());
        let image = page.image();
        let cookie = page.header("set-cookie");
        let key = cookie
            .strip_prefix("_s=")
            .and_then(|rest| rest.split(';').next())
            .unwrap_or_else(|| panic!("a cookie-tracking image sets _s: {cookie:?}"))
            .to_string();
        for i in 0..20 {
            let reply = get(&client, &format!("{}/app?sid={key}", served.base())).await;
            assert_eq!(reply.status, 200);
            assert_eq!(
                reply.image(),
                image,
                "request {i}: ?sid= did not keep the session's image"
            );
        }
    }
}

#[tokio::test]
async fn no_arguments_exit_2_with_a_helpful_message() {
    let out = run(&[]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err:?}");
    assert!(
        err.contains("--config") && err.contains("--backend"),
        "stderr: {err:?}"
    );
}

#[tokio::test]
async fn a_store_flag_that_is_no_redis_url_exits_2_naming_it() {
    let out = run(&[
        "--backend",
        "127.0.0.1:9001",
        "--store",
        "http://:pw@cache:6379",
    ])
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err:?}");
    assert!(
        err.contains("--store") && err.contains("is not a redis:// or rediss:// URL"),
        "stderr: {err:?}"
    );
    assert!(!err.contains("pw"), "the password is not shown: {err:?}");
}

#[tokio::test]
async fn config_together_with_backend_is_refused() {
    let dir = TempDir::new("conflict");
    dir.write("conflict.toml", GOOD);
    let file = dir.arg("conflict.toml");
    let out = run(&["--config", &file, "--backend", "127.0.0.1:9001"]).await;
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "the conflicting flags were accepted: {err:?}"
    );
    assert!(
        err.contains("--config") && err.contains("--backend"),
        "stderr names both flags: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_files_limit_is_raised_to_the_hard_one_and_a_short_one_is_named() {
    let dir = TempDir::new("rlimit");
    let out = std::fs::File::create(dir.path("rlimit.log")).expect("log file");
    // A soft limit of 256 under a hard one of 3000: raised to 3000, which is still short
    // of the default max_connections (10,000).
    let script = r#"ulimit -Sn 256 && { ulimit -Hn 3000 2>/dev/null || true; }
echo "hard limit $(ulimit -Hn)"
exec "$0" --listen 127.0.0.1:0 --backend 127.0.0.1:9 --admin off"#;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(BIN)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log handle"))
        .stderr(out)
        .env("RUST_LOG", "info")
        .kill_on_drop(true)
        .spawn()
        .expect("sh runs");
    let read = || dir.read("rlimit.log");
    let deadline = Instant::now() + START_LIMIT;
    while !read().contains("listening") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    let text = read();
    let hard: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("hard limit "))
        .and_then(|h| h.trim().parse().ok())
        .unwrap_or_else(|| panic!("the shell reports a numeric hard limit:\n{text}"));
    assert!(
        text.contains(&format!("open files limit raised from 256 to {hard}")),
        "{text}"
    );
    // At the defaults: 10,000 client connections, 20,000 backend connections of requests in
    // flight (HTTP/1 and HTTP/2), 64 idle ones (one backend) and 64 more.
    if hard < 30_000 {
        assert!(
            text.contains("is short of the") && text.contains("10000 client connections"),
            "{text}"
        );
    }
}

/// The commands `tidegate [COMMAND] --help` lists (without `help`), so that a new command is
/// checked without this test being told.
async fn commands_of(args: &[&str]) -> Vec<String> {
    let mut help = args.to_vec();
    help.push("--help");
    let text = exited(&run(&help).await, 0, &format!("{help:?}"));
    text.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn version_names_the_version_and_the_commit() {
    let out = exited(&run(&["--version"]).await, 0, "--version");
    let line = out.trim();
    let commit = line
        .strip_prefix(&format!("tidegate {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("`tidegate VERSION (COMMIT)`: {line:?}"));
    assert!(
        commit == "unknown commit"
            || (commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "a short commit hash or `unknown commit`: {line:?}"
    );
    // Built from a git checkout of this crate (as here and in CI): the commit checked out.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let top = git(&["rev-parse", "--show-toplevel"])
        .and_then(|t| std::path::Path::new(&t).canonicalize().ok());
    if top.is_some() && top == dir.canonicalize().ok() {
        let head = git(&["rev-parse", "--short", "HEAD"]).expect("git names HEAD");
        assert_eq!(commit, head, "the commit checked out: {line:?}");
    }
}

#[tokio::test]
async fn man_prints_one_roff_page_with_every_command_and_option() {
    let page = exited(&run(&["man"]).await, 0, "man");
    assert!(
        page.lines().any(|l| l.starts_with(".TH TIDEGATE 1 ")),
        "a roff page titled TIDEGATE(1): {}",
        &page[..page.len().min(300)]
    );
    for section in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "COMMANDS",
        "EXIT STATUS",
        "ENVIRONMENT",
    ] {
        assert!(
            page.lines()
                .any(|l| l == format!(".SH {section}") || l == format!(".SH \"{section}\"")),
            "no section {section}"
        );
    }
    assert!(
        page.contains(env!("CARGO_PKG_VERSION")),
        "the page names its version"
    );
    let top = commands_of(&[]).await;
    for expected in ["check", "ctl", "upgrade", "man", "completions"] {
        assert!(
            top.iter().any(|c| c == expected),
            "--help lists {expected}: {top:?}"
        );
    }
    let ctl = commands_of(&["ctl"]).await;
    assert!(
        ctl.iter().any(|c| c == "drain"),
        "ctl --help lists drain: {ctl:?}"
    );
    let every = top
        .iter()
        .map(|c| vec![c.as_str()])
        .chain(ctl.iter().map(|c| vec!["ctl", c.as_str()]));
    for words in every {
        let heading = format!(".SS \"tidegate {}\"", words.join(" "));
        assert!(page.contains(&heading), "no {heading} in the page");
        // Its help works, and every option it lists is in the page (roff writes `-` as `\-`).
        let mut args = words.clone();
        args.push("--help");
        let help = exited(&run(&args).await, 0, &format!("{args:?}"));
        for option in help
            .split_whitespace()
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(|w| w.trim_end_matches([',', '.', ')', ';']))
            .filter(|w| !["--help", "--version"].contains(w))
        {
            let option = option.split(['=', '[', '<']).next().unwrap_or(option);
            assert!(
                page.contains(&option.replace('-', "\\-")),
                "`tidegate {}` help names {option}, the page does not",
                words.join(" ")
            );
        }
    }
}

#[tokio::test]
async fn completions_load_in_bash_and_exist_for_zsh_and_fish() {
    let script = exited(&run(&["completions", "bash"]).await, 0, "completions bash");
    assert!(
        script.contains("_tidegate()"),
        "a completion function: {script:.200}"
    );
    // bash itself takes it: sourced, `tidegate` completes with the function.
    let loaded = std::process::Command::new("bash")
        .arg("-c")
        .arg("source <(\"$0\" completions bash) && complete -p tidegate")
        .arg(BIN)
        .output()
        .expect("bash runs");
    let said = String::from_utf8_lossy(&loaded.stdout);
    assert!(
        loaded.status.success() && said.contains("-F _tidegate tidegate"),
        "bash: exit {:?}, {said:?}, {}",
        loaded.status,
        String::from_utf8_lossy(&loaded.stderr)
    );
    let zsh = exited(&run(&["completions", "zsh"]).await, 0, "completions zsh");
    assert!(zsh.starts_with("#compdef tidegate"), "{zsh:.200}");
    let fish = exited(&run(&["completions", "fish"]).await, 0, "completions fish");
    assert!(fish.contains("complete -c tidegate"), "{fish:.200}");
}

#[tokio::test]
async fn completions_for_an_unknown_shell_exit_2_naming_the_known_ones() {
    let out = run(&["completions", "tcsh"]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err:?}");
    assert!(
        err.contains("tcsh") && err.contains("bash, zsh, fish"),
        "stderr: {err:?}"
    );
    assert!(stdout(&out).is_empty(), "nothing on stdout");
}
