//! The commands docs/operations.md shows for scaling out, draining and removing, health and
//! reload, run top to bottom against a real farm: every `curl` and `tidegate ctl` line of
//! those sections must do what the page says (succeed, or be refused where it says
//! `# refused`).

mod support;

use std::time::Duration;

use support::{Process, client, images};
use tidegate::demo::Tracking;

/// The sections whose commands run, in the page's order.
const SECTIONS: [&str; 4] = [
    "## Scale out",
    "## Drain and remove",
    "## Health",
    "## Reload",
];

/// The most one command may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(20);

/// The `curl` and `tidegate ctl` lines of the ```sh blocks of one section.
fn commands(page: &str, heading: &str) -> Vec<String> {
    let start = page
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("docs/operations.md has no section {heading:?}"));
    let section = &page[start + heading.len() + 2..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut out = Vec::new();
    let mut in_sh = false;
    for line in section.lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            l if in_sh && (l.starts_with("curl ") || l.starts_with("tidegate ctl ")) => {
                out.push(l.to_string())
            }
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_page_commands_do_what_it_says() {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .expect("docs/operations.md");
    let farm = images(3, Tracking::Links).await;
    let p = Process::start(&format!(
        "[[pool]]\nname = \"default\"\n\
         [[pool.backend]]\nname = \"img1\"\naddress = \"{}\"\n\
         [[pool.backend]]\nname = \"img2\"\naddress = \"{}\"\n",
        farm[0].addr, farm[1].addr
    ))
    .await;
    // Live sessions on both images, as the page assumes.
    let c = client();
    for _ in 0..6 {
        let r = support::get(&c, &format!("{}/app", p.base())).await;
        assert_eq!(r.status, 200);
    }
    let token_file = p.dir.arg("admin.token");
    let substitute = |line: &str| {
        let mut l = line
            .replace("127.0.0.1:9090", &p.admin.to_string())
            .replace("127.0.0.1:9001", &farm[0].addr.to_string())
            .replace("127.0.0.1:9002", &farm[1].addr.to_string())
            .replace("127.0.0.1:9003", &farm[2].addr.to_string())
            .replace("/etc/tidegate/admin.token", &token_file);
        if let Some(rest) = l.strip_prefix("tidegate ctl ") {
            let admin = if rest.contains("--admin ") {
                String::new()
            } else {
                format!("--admin {} ", p.admin)
            };
            l = format!("'{}' ctl {admin}{rest}", env!("CARGO_BIN_EXE_tidegate"));
        }
        l
    };
    let mut ran = 0;
    for heading in SECTIONS {
        let lines = commands(&page, heading);
        assert!(!lines.is_empty(), "{heading} shows no command");
        for line in lines {
            let refused = line.contains("# refused");
            let command = substitute(&line);
            let out = tokio::time::timeout(
                COMMAND_LIMIT,
                tokio::process::Command::new("bash")
                    .arg("-c")
                    .arg(&command)
                    .env_remove("TIDEGATE_ADMIN_TOKEN")
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .unwrap_or_else(|_| panic!("{line} did not finish within {COMMAND_LIMIT:?}"))
            .expect("bash runs");
            let said = format!(
                "{heading}: {line}\nexit {:?}\nstdout: {}\nstderr: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if refused {
                assert!(!out.status.success(), "should be refused: {said}");
            } else {
                assert!(out.status.success(), "should succeed: {said}");
            }
            ran += 1;
        }
    }
    assert!(ran >= 12, "only {ran} commands ran");
    // Where the page leaves the farm: img3 (added through the API, in no file) stays through
    // the reload; img2, removed with force but still in the file, is back as a new backend.
    assert_eq!(p.backend(&c, "default", "img3").await["state"], "active");
    let img2 = p.backend(&c, "default", "img2").await;
    assert_eq!(img2["state"], "active", "{img2}");
    assert_eq!(img2["pins"], 0, "{img2}");
}
