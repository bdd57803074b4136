#!/usr/bin/env bash
# Builds the Debian package, <target dir>/debian/tidegate_<version>-1_<arch>.deb
# (docs/install.md): the release binary; the docs, and the man page and shell completions that
# binary writes (`tidegate man`, `tidegate completions SHELL`; skipped, with a message, by a
# tidegate that has not got them), staged for Cargo.toml's assets; then cargo-deb without a
# build of its own, from [package.metadata.deb] of Cargo.toml and packaging/ (conffile, unit,
# maintainer scripts).
# Needs cargo-deb: cargo install cargo-deb --version 3.8.0 --locked (tests/package.sh does it).
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}
cargo build --release --locked
bin=$target/release/tidegate

# Staged for the asset target/release/packaging/share/**/* (to /usr/share) of Cargo.toml;
# cargo-deb reads target/release/… from the real target directory.
staged=$target/release/packaging/share
rm -rf "$target/release/packaging"
doc=$staged/doc/tidegate
mkdir -p "$doc" "$staged/man/man1" "$staged/bash-completion/completions" \
    "$staged/zsh/vendor-completions" "$staged/fish/vendor_completions.d"
cp README.md docs/*.md docs/grafana-dashboard.json docs/status.png config/example.toml "$doc/"

# Writes the output of `tidegate ARGS` to FILE, or says why not and leaves no file.
generate() {
    local file=$1
    shift
    if "$bin" "$@" >"$file.tmp" 2>"$file.err" && [ -s "$file.tmp" ]; then
        mv "$file.tmp" "$file"
        rm -f "$file.err"
    else
        echo "build-deb: skipped $(basename "$file"): 'tidegate $*' failed: $(head -n 1 "$file.err")" >&2
        rm -f "$file.tmp" "$file.err"
        return 1
    fi
}

if generate "$staged/man/man1/tidegate.1" man; then
    gzip -9n "$staged/man/man1/tidegate.1"
fi
generate "$staged/bash-completion/completions/tidegate" completions bash || true
generate "$staged/zsh/vendor-completions/_tidegate" completions zsh || true
generate "$staged/fish/vendor_completions.d/tidegate.fish" completions fish || true

cargo deb --no-build --locked
echo "build-deb: $(ls -t "$target"/debian/tidegate_*.deb | head -n 1)"
