#!/usr/bin/env bash
# What the shared pin store costs in CPU time: the same tidegate binary on the e2e harness
# (run.sh, tidegate alone) with the store off and on (run.sh --store: a redis-server on the
# load CPU), alternating in the same minutes (off, on, then on, off, ...). Reports the medians
# of tidegate's CPU seconds per 100k requests per variant, every pair, and redis-server's CPU
# seconds per 100k requests in the cells with the store on.
#
#   benches/e2e/store-ab.sh                         # 3 pairs, 6 s cells, http-cookie http-query http-miss
#   benches/e2e/store-ab.sh --pairs 5 --duration 8 --variants "http-cookie http-miss"
#   benches/e2e/store-ab.sh --no-build              # the binary already in target/release
#
# http-cookie and http-query name one of the 10,000 taught ids (local hits: the store is not
# asked); http-miss sends a fresh id with X-Warm in every request (one GET, and the learned
# pin written through). Every cell's numbers are kept in target/store-ab/RESULTS.tsv.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PAIRS=3
DURATION=6
VARIANTS="http-cookie http-query http-miss"
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --pairs) PAIRS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --variants) VARIANTS=$2; shift ;;
        --no-build) BUILD=0 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "store-ab.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

log() { printf '[store-ab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# shellcheck source=pairs.sh
. "$HERE/pairs.sh"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$BUILD" = 1 ]; then
    log "building tidegate --release"
    (cd "$ROOT" && cargo build --release --quiet --bin tidegate)
fi
REV="$(cd "$ROOT" && git rev-parse --short HEAD)"
(cd "$ROOT" && git diff --quiet HEAD -- src) || REV+="+changes"

OUT=$TARGET/store-ab
mkdir -p "$OUT"
RESULTS=$OUT/RESULTS.tsv
: >"$RESULTS"
cell() { # side pair -> runs one pass, appends "variant side pair tidegate-cpu redis-cpu" lines
    local side=$1 pair=$2 out=$OUT/$1-$2.md store=()
    [ "$side" = on ] && store=(--store)
    CARGO_TARGET_DIR=$TARGET TIDEGATE_REV=$REV "$HERE/run.sh" --no-build --proxies tidegate \
        --variants "$VARIANTS" --duration "$DURATION" "${store[@]}" --out "$out" >/dev/null
    awk -F'\t' -v s="$side" -v p="$pair" '$3 == "tidegate" { printf "%s\t%s\t%s\t%s\t%s\n", $2, s, p, $5, $12 }' \
        "${out%.md}.cells.tsv" | tee -a "$RESULTS" >&2
}
START=$(date +%H:%M)
alternate "$PAIRS" off on

echo "### The shared store's cost: tidegate $REV, store off and on, CPU-s per 100k requests (median of $PAIRS alternating pairs, $DURATION s cells, $START–$(date +%H:%M))"
echo
echo "| variant | off | on | on ÷ off | pairs (off/on) | redis-server (on) | pairs (redis-server) |"
echo "| --- | ---: | ---: | ---: | --- | ---: | --- |"
for v in $VARIANTS; do
    o=$(side_median "$RESULTS" "$v" off)
    n=$(side_median "$RESULTS" "$v" on)
    r=$(side_median "$RESULTS" "$v" on 5)
    pairs=$(pair_list "$RESULTS" "$v" off on)
    rpairs=$(awk -F'\t' -v v="$v" '$1 == v && $2 == "on" { printf "%s%s", (n++ ? ", " : ""), $5 }' "$RESULTS")
    awk -v v="$v" -v o="$o" -v n="$n" -v r="$r" -v pairs="$pairs" -v rpairs="$rpairs" \
        'BEGIN { printf "| %s | %.3f | %.3f | %.3f | %s | %.3f | %s |\n", v, o, n, (o > 0 ? n / o : 0), pairs, r, rpairs }'
done
