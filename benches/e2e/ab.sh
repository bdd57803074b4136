#!/usr/bin/env bash
# A/B of two builds of tidegate on the e2e harness (run.sh): both binaries alternate in the
# same minutes (old, new, then new, old, ...), tidegate alone, and the medians of CPU seconds
# per 100k requests are compared per variant.
#
#   benches/e2e/ab.sh A                  # commit A against the working tree: 3 pairs, 6 s cells
#   benches/e2e/ab.sh A B                # commit A against commit B
#   benches/e2e/ab.sh A --pairs 5 --duration 8 --variants "http-cookie https-cookie"
#   benches/e2e/ab.sh A --log            # both with the access log on (run.sh --log)
#
# A commit is built in a git worktree under target/ab/ (kept for the next run). Every cell's
# numbers are printed as they come and kept in target/ab/RESULTS.tsv.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
[ $# -ge 1 ] || { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
OLD_REV=$1; shift
NEW_REV=""
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then NEW_REV=$1; shift; fi
PAIRS=3
DURATION=6
VARIANTS="http-cookie http-query http-close https-cookie"
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --pairs) PAIRS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --variants) VARIANTS=$2; shift ;;
        --log) EXTRA+=(--log) ;;
        *) echo "ab.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

log() { printf '[ab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# shellcheck source=pairs.sh
. "$HERE/pairs.sh"

AB=$ROOT/target/ab
mkdir -p "$AB"
build_rev() { # commit -> its binary's target dir under target/ab (built once)
    local rev=$1 tree=$AB/tree-$1
    if [ ! -x "$AB/target-$rev/release/tidegate" ]; then
        log "building $rev in $tree"
        [ -d "$tree" ] || (cd "$ROOT" && git worktree add --detach "$tree" "$rev" >/dev/null)
        (cd "$tree" && CARGO_TARGET_DIR="$AB/target-$rev" cargo build --release --quiet --bin tidegate)
    fi
}
OLD=$(cd "$ROOT" && git rev-parse --short "$OLD_REV")
build_rev "$OLD"
OLD_TARGET=$AB/target-$OLD
if [ -n "$NEW_REV" ]; then
    NEW=$(cd "$ROOT" && git rev-parse --short "$NEW_REV")
    build_rev "$NEW"
    NEW_TARGET=$AB/target-$NEW
else
    NEW="$(cd "$ROOT" && git rev-parse --short HEAD)"
    (cd "$ROOT" && git diff --quiet HEAD -- src) || NEW+="+changes"
    log "building the working tree ($NEW)"
    (cd "$ROOT" && cargo build --release --quiet --bin tidegate)
    NEW_TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
fi

RESULTS=$AB/RESULTS.tsv
: >"$RESULTS"
cell() { # side pair -> runs one pass, appends "variant side pair cpu" lines
    local side=$1 pair=$2 target rev out
    if [ "$side" = old ]; then target=$OLD_TARGET; rev=$OLD; else target=$NEW_TARGET; rev=$NEW; fi
    out=$AB/$side-$pair.md
    CARGO_TARGET_DIR=$target TIDEGATE_REV=$rev "$HERE/run.sh" --no-build --proxies tidegate \
        --variants "$VARIANTS" --duration "$DURATION" "${EXTRA[@]}" --out "$out" >/dev/null
    awk -F'\t' -v s="$side" -v p="$pair" '$3 ~ /^tidegate/ { printf "%s\t%s\t%s\t%s\n", $2, s, p, $5 }' \
        "${out%.md}.cells.tsv" | tee -a "$RESULTS" >&2
}
alternate "$PAIRS" old new

echo "### A/B: tidegate $NEW against $OLD, CPU-s per 100k requests (median of $PAIRS alternating pairs, $DURATION s cells${EXTRA[*]:+, ${EXTRA[*]}})"
echo
echo "| variant | $OLD | $NEW | new ÷ old | pairs (old/new) |"
echo "| --- | ---: | ---: | ---: | --- |"
for v in $VARIANTS; do
    o=$(side_median "$RESULTS" "$v" old)
    n=$(side_median "$RESULTS" "$v" new)
    pairs=$(pair_list "$RESULTS" "$v" old new)
    awk -v v="$v" -v o="$o" -v n="$n" -v pairs="$pairs" \
        'BEGIN { printf "| %s | %.3f | %.3f | %.3f | %s |\n", v, o, n, (o > 0 ? n / o : 0), pairs }'
done
