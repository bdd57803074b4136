#!/usr/bin/env bash
# The fault soak at a larger scale: the scenario of tests/soak.rs (whose `soak_small` runs in
# CI with tests/run.sh) with more users and longer quiet periods, on a release build. It runs
# on loopback only, and is bounded in time (the test gives up after its quiet periods plus two
# minutes) and in requests (a user stops after as many as its shortest think time allows in
# that time). Every process it starts (the images, each tidegate) is ended by its process id
# when the test ends, a failed one included.
#
#   SOAK_SESSIONS  users browsing at once, one session each at a time (default 200, 1-2000)
#   SOAK_SECONDS   about how long it runs: its eight quiet periods together (default 240,
#                  16-3600)
#   SOAK_THINK_MS  the most a user thinks between two requests (default 1000, 10-4000; the
#                  least is a tenth of it)
#
# It prints a table of each event's requests, failed requests, refused connections, requests
# sent again, broken sessions, and what the killed image lost; it exits non-zero when a target
# is missed. See "Fault soak" in docs/operations.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_SESSIONS="${SOAK_SESSIONS:-200}"
export SOAK_SECONDS="${SOAK_SECONDS:-240}"
export SOAK_THINK_MS="${SOAK_THINK_MS:-1000}"
# A connection per user in this process, and one or two each in tidegate (which raises its
# own limit): more users than the usual soft limit of 1024 open files need the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec cargo test --release --locked --test soak -- --ignored --nocapture --exact soak_at_scale
