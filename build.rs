//! Records the git commit the program is built from, for `tidegate --version` and the
//! `tidegate_build_info` metric: `TIDEGATE_COMMIT` is the short hash of `HEAD`, or `unknown`
//! outside a git checkout of this crate (a crate tarball, a package build without `.git`,
//! no `git` on the machine), and `TIDEGATE_VERSION` the version with it, `0.1.0 (abc1234)`
//! or `0.1.0 (unknown commit)`. A packager who knows the commit may set `TIDEGATE_COMMIT` in
//! the build's environment; it wins.
//!
//! The script runs again only when `HEAD` moves (its file, the branch's ref, `packed-refs`
//! and `HEAD`'s reflog), never on every build: every path it watches exists.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TIDEGATE_COMMIT");
    let given = std::env::var("TIDEGATE_COMMIT")
        .ok()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty());
    let commit = given.or_else(commit_of_checkout);
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let (commit, version) = match commit {
        Some(c) => (c.clone(), format!("{version} ({c})")),
        None => ("unknown".to_string(), format!("{version} (unknown commit)")),
    };
    println!("cargo:rustc-env=TIDEGATE_COMMIT={commit}");
    println!("cargo:rustc-env=TIDEGATE_VERSION={version}");
}

/// The short hash of `HEAD`, when this crate's directory is the top of a git work tree.
fn commit_of_checkout() -> Option<String> {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    // A crate unpacked inside some other repository (a distribution's packaging tree) is not
    // built from that repository's commit.
    let top = git(&manifest_dir, &["rev-parse", "--show-toplevel"])?;
    if !same_dir(Path::new(&top), &manifest_dir) {
        return None;
    }
    // Watched before the hash is read, so that a commit made meanwhile runs this again.
    for file in ["HEAD", "logs/HEAD", "packed-refs"] {
        watch(&manifest_dir, file);
    }
    if let Some(branch) = git(&manifest_dir, &["symbolic-ref", "-q", "HEAD"]) {
        watch(&manifest_dir, &branch);
    }
    git(&manifest_dir, &["rev-parse", "--short", "HEAD"])
}

/// Asks cargo to run this script again when a file of the git directory changes, if it
/// exists: a missing path would make cargo run it, and rebuild tidegate, on every build.
fn watch(dir: &Path, name: &str) {
    if let Some(path) = git(
        dir,
        &["rev-parse", "--path-format=absolute", "--git-path", name],
    ) && Path::new(&path).is_file()
    {
        println!("cargo:rerun-if-changed={path}");
    }
}

/// One line of git's output, or `None` when git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let line = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!line.is_empty()).then_some(line)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
