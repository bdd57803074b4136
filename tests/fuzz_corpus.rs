//! The fuzzers' corpus replayed as ordinary tests: every file under `fuzz/corpus/<target>/`
//! goes through the same checks the fuzz target runs (`fuzz/checks.rs`), so what a fuzzing
//! run found (and the seeds) stays checked in CI without a fuzzer or a nightly compiler.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

/// Runs `check` on every file of `fuzz/corpus/<target>`; names each input that fails.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no input", dir.display());
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs fail: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn session_id_corpus_replays() {
    replay("session_id", checks::session_id);
}

#[test]
fn reply_learning_corpus_replays() {
    replay("reply_learning", checks::reply_learning);
}

#[test]
fn affinity_cookie_corpus_replays() {
    replay("affinity_cookie", checks::affinity_cookie);
}

#[test]
fn state_file_corpus_replays() {
    replay("state_file", checks::state_file);
}

#[test]
fn config_corpus_replays() {
    replay("config", checks::config);
}
