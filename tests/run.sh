#!/usr/bin/env bash
# The whole test suite, as README.md documents it and CI runs it: installs what the tests
# need when it is missing, then checks formatting, lints, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# tests/observability.rs renders the status page in headless Chromium.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# tests/store.rs shares pins through a real Redis (each test starts its own on a free port).
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${need[*]}"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
