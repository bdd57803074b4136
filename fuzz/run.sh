#!/usr/bin/env bash
# Runs every fuzz target for a bounded time, one after another (see docs/fuzzing.md), then
# merges what each run found into the committed corpus, fuzz/corpus/<target>/, keeping the
# seeds (seed-*) and only those other inputs that add coverage. tests/fuzz_corpus.rs replays
# that corpus in the ordinary test suite.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 seconds, every target)
#
# Needs a nightly toolchain (rustup toolchain install nightly); installs cargo-fuzz when it
# is missing. A crash stops the script and names the input that caused it.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-60}
if [ $# -gt 0 ]; then shift; fi
case $seconds in
  '' | *[!0-9]*) echo "usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2 ;;
esac

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 1
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz/run.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

# The longest input each target tries: enough for a request head and a form, a page's
# first links, a state file of a few dozen pins, a configuration of several pools.
max_len() {
  case $1 in
    affinity_cookie) echo 512 ;;
    session_id | state_file) echo 2048 ;;
    *) echo 4096 ;;
  esac
}

# No sanitizer: the crate forbids unsafe code, so what a fuzzer can find is a panic, a hang
# or an unbounded allocation, which libFuzzer reports by itself; this runs several times
# faster than under AddressSanitizer. Debug assertions and overflow checks stay on.
fuzz() { nice -n 10 cargo +nightly fuzz run --sanitizer none "$@"; }

for target in "${targets[@]}"; do
  corpus=corpus/$target
  # Everything the runs found, kept between runs (not committed): the next run starts there.
  found=target/corpus/$target
  merged=target/merged/$target
  rm -rf "$merged"
  mkdir -p "$found" "$merged" "artifacts/$target"
  echo "== $target: ${seconds}s"
  # New inputs go to the first directory; the committed corpus is only read.
  if ! fuzz "$target" "$found" "$corpus" -- \
    -max_total_time="$seconds" -max_len="$(max_len "$target")" -timeout=10 \
    -rss_limit_mb=2048 -artifact_prefix="artifacts/$target/" -print_final_stats=1; then
    echo "fuzz/run.sh: $target failed; the input is in fuzz/artifacts/$target/." >&2
    echo "Reproduce: (cd fuzz && cargo +nightly fuzz run --sanitizer none $target artifacts/$target/<file>)" >&2
    exit 1
  fi
  # The committed corpus: the seeds, whatever they add, and a small set of other inputs that
  # reach every edge reached (edges only, not hit counts: that keeps it small).
  cp "$corpus"/seed-* "$merged"/
  fuzz "$target" "$merged" "$corpus" "$found" -- -merge=1 -use_counters=0 -timeout=10 -rss_limit_mb=2048
  find "$corpus" -type f ! -name 'seed-*' -delete
  cp "$merged"/* "$corpus"/
  echo "== $target: $(find "$corpus" -type f | wc -l) inputs, $(du -sk --apparent-size "$corpus" | cut -f1) KB"
done
echo "== corpus: $(du -sk --apparent-size corpus | cut -f1) KB in all"
