#!/usr/bin/env bash
# End-to-end benchmark: tidegate against HAProxy and nginx as session-affinity proxies.
#
#   benches/e2e/run.sh                 # every variant, 10 s per cell, one run
#   benches/e2e/run.sh --quick         # 3 s per cell
#   benches/e2e/run.sh --runs 3        # three interleaved runs, medians reported
#   benches/e2e/run.sh --scale         # also tidegate's cost at 1k, 100k, 1M and 10M live pins
#   benches/e2e/run.sh --scale-only --scale-sizes "1000 1000000"
#   benches/e2e/run.sh --check         # short tidegate-only pass showing the pins are used
#   benches/e2e/run.sh --floor         # adds floor.c, a relay doing nothing but the system
#                                      # calls, as a yardstick in the plain-HTTP variants
#   benches/e2e/run.sh --log           # every proxy with its request log on, to a file
#   benches/e2e/run.sh --proxies "tidegate tidegate+log" --variants http-cookie
#                                      # a proxy name ending in +log: that proxy, log on
#   benches/e2e/run.sh --store --proxies tidegate --variants "http-cookie http-miss"
#                                      # tidegate with the shared pin store on (a redis-server
#                                      # started here); benches/e2e/store-ab.sh pairs it with off
#
# Everything runs on 127.0.0.1. Each proxy is pinned to one CPU (--proxy-cpu, default 0) and
# has exactly one worker; wrk and the three backends share another (--load-cpu, default 1).
# Per cell it records the proxy's CPU seconds per 100k requests (utime+stime of the proxy's
# processes from /proc, before/after the measured run), requests/s, p50/p99 latency and peak
# RSS, and writes a Markdown table to stdout and to a results file (--out FILE).
# It stops only the processes it started. See docs/benchmarks.md for how to read the table.
set -euo pipefail
# ${text//pattern/replacement} must not treat "&" in a replacement as the match (bash 5.2).
shopt -u patsub_replacement 2>/dev/null || true

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

DURATION=10
WARMUP=2
RUNS=1
CONNS=50
# h2-cookie: this many HTTP/2 connections (one h2load each, its own session id in the
# cookie, as a browser tab's), sharing $CONNS streams in flight.
H2_CLIENTS=5
IDS=10000
PORT_BASE=${TG_PORT_BASE:-27100}
PROXY_CPU=0
LOAD_CPU=1
CERT_TYPE=ec
BODY_BYTES=512
PROXIES="tidegate haproxy nginx"
VARIANTS="http-cookie http-query http-close https-cookie https-resume https-full h2-cookie"
SCALE=0
MATRIX=1
CHECK=0
SCALE_SIZES="1000 100000 1000000 10000000"
OUT=""
BUILD=1
PERF=0
FLOOR=0
FLOOR_URING=0
STORE=0
LOGS=0

usage() {
    # The header comment, up to the first line that is not one.
    awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'
    cat <<EOF

Options:
  --quick               3 s per cell (default $DURATION s), 1 s pre-run
  --duration S          seconds per measured cell
  --runs N              repeat the matrix N times (interleaved) and report medians
  --connections N       wrk connections (default $CONNS)
  --proxies "LIST"      subset of: $PROXIES
  --floor               also run floor.c (plain-HTTP variants only): the cost of the system
                        calls alone, with no proxy work, on this machine
  --floor-uring         also run floor_uring.c ("floor-uring", plain HTTP only): the same
                        relay on io_uring (liburing-dev, installed if missing)
  --store               tidegate with the shared pin store on (--store redis://...): a
                        redis-server started here on the load CPU (port base + 20, no
                        persistence), emptied before each cell; tidegate's admin listener
                        on; the cell waits (10 s at most) until the warm-up's pins are in
                        Redis (a warning with the store's counters if some never arrive), and
                        redis-server's CPU per request is recorded too. Variant http-miss (not in the default list): every
                        request a fresh id never seen, with X-Warm, over keep-alive, so the
                        store is asked each time and the reply's pin written through
  --variants "LIST"     subset of: $VARIANTS
                        (the older names https and https-handshake mean https-cookie and
                        https-full)
  --log                 every proxy with its request log on, written to a file: tidegate's
                        access log (RUST_LOG=info), HAProxy \`log stdout\` with \`option
                        httplog\`, nginx \`access_log ... buffer=64k\`; a proxy name ending in
                        "+log" in --proxies turns it on for that proxy alone (so one run can
                        interleave tidegate with and without it)
  --scale               add the scale curve (tidegate only) after the matrix
  --scale-only          only the scale curve
  --scale-sizes "LIST"  live pin counts for the scale curve (default: $SCALE_SIZES)
  --check               tidegate only, admin listener on: shows pins and decisions per variant
  --cert ec|rsa         certificate key type (default ec: ECDSA P-256; rsa: RSA-2048)
  --body BYTES          size of the backends' HTML reply (default $BODY_BYTES)
  --proxy-cpu N --load-cpu N   CPUs for the proxy and for wrk + backends (default 0 and 1)
  --port-base N         first of the 127.0.0.1 ports used (default $PORT_BASE, env TG_PORT_BASE)
  --no-build            use the tidegate binary already built
  --perf                record a perf profile (cpu-clock) of the proxy in each measured cell
                        and write its top symbols next to the results (skews the CPU numbers)
  --out FILE            results file (default target/e2e/results-DATE.md)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --quick) DURATION=3; WARMUP=1 ;;
        --duration) DURATION=$2; shift ;;
        --runs) RUNS=$2; shift ;;
        --connections) CONNS=$2; shift ;;
        --proxies) PROXIES=$2; shift ;;
        --variants) VARIANTS=$2; shift ;;
        --scale) SCALE=1 ;;
        --scale-only) SCALE=1; MATRIX=0 ;;
        --scale-sizes) SCALE_SIZES=$2; shift ;;
        --check) CHECK=1; MATRIX=0 ;;
        --cert) CERT_TYPE=$2; shift ;;
        --body) BODY_BYTES=$2; shift ;;
        --proxy-cpu) PROXY_CPU=$2; shift ;;
        --load-cpu) LOAD_CPU=$2; shift ;;
        --port-base) PORT_BASE=$2; shift ;;
        --no-build) BUILD=0 ;;
        --perf) PERF=1 ;;
        --floor) FLOOR=1 ;;
        --floor-uring) FLOOR_URING=1 ;;
        --store) STORE=1 ;;
        --log) LOGS=1 ;;
        --out) OUT=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

log() { printf '[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The older variant names still work.
normalised=""
for v in $VARIANTS; do
    case "$v" in
        https) v=https-cookie ;;
        https-handshake) v=https-full ;;
    esac
    normalised+="${normalised:+ }$v"
done
VARIANTS=$normalised
if [ "$LOGS" = 1 ]; then
    logged=""
    for p in $PROXIES; do
        case "$p" in *+log|floor*) ;; *) p+=+log ;; esac
        logged+="${logged:+ }$p"
    done
    PROXIES=$logged
fi
# The suffix of the proxies the comparison tables read: "+log" with --log.
SUFFIX=""
[ "$LOGS" = 1 ] && SUFFIX=+log

# ------------------------------------------------------------------------------------------
# Tools

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
missing=()
[ "$PERF" = 1 ] && ! command -v perf >/dev/null && missing+=(linux-perf)
[ "$STORE" = 1 ] && ! command -v redis-server >/dev/null && missing+=(redis-server)
[[ " $VARIANTS " == *" h2-cookie "* ]] && ! command -v h2load >/dev/null && missing+=(nghttp2-client)
[ "$FLOOR_URING" = 1 ] && [ ! -e /usr/include/liburing.h ] && missing+=(liburing-dev)
for tool in haproxy:haproxy nginx:nginx wrk:wrk openssl:openssl cc:gcc taskset:util-linux \
    pgrep:procps curl:curl; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (apt-get)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
HAPROXY=$(command -v haproxy)
NGINX=$(command -v nginx)
WRK=$(command -v wrk)

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$BUILD" = 1 ]; then
    log "building tidegate --release"
    (cd "$ROOT" && cargo build --release --quiet --bin tidegate)
fi
TIDEGATE=$TARGET/release/tidegate
# Needed only when tidegate is measured (the floors alone run without it).
if [[ " $PROXIES " == *" tidegate"* ]] || [ "$SCALE" = 1 ] || [ "$CHECK" = 1 ]; then
    [ -x "$TIDEGATE" ] || die "no tidegate binary at $TIDEGATE"
fi

NCPU=$(nproc)
if [ "$NCPU" -lt 2 ] || [ "$PROXY_CPU" -ge "$NCPU" ] || [ "$LOAD_CPU" -ge "$NCPU" ]; then
    log "warning: $NCPU CPU(s): proxy and load share CPUs; numbers will be noisy"
    [ "$PROXY_CPU" -ge "$NCPU" ] && PROXY_CPU=0
    [ "$LOAD_CPU" -ge "$NCPU" ] && LOAD_CPU=$((NCPU - 1))
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

HTTP_PORT=$PORT_BASE
HTTPS_PORT=$((PORT_BASE + 1))
ADMIN_PORT=$((PORT_BASE + 2))
B1=$((PORT_BASE + 11))
B2=$((PORT_BASE + 12))
B3=$((PORT_BASE + 13))
REDIS_PORT=$((PORT_BASE + 20))

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $HTTP_PORT $HTTPS_PORT $ADMIN_PORT $B1 $B2 $B3 $REDIS_PORT; do
    port_open "$p" && die "port $p on 127.0.0.1 is in use (choose --port-base)"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tidegate-e2e.XXXXXX")
mkdir -p "$WORK/tmp"
STAMP=$(date +%Y%m%d-%H%M%S)
[ -n "$OUT" ] || OUT=$TARGET/e2e/results-$STAMP.md
mkdir -p "$(dirname "$OUT")"
RAW=$WORK/cells.tsv
: >"$RAW"

# ------------------------------------------------------------------------------------------
# Processes: every one this script starts is recorded, and only those are stopped.

STARTED=()
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do stop_pid "$pid"; done
    STARTED=()
    if [ -n "${KEEP_WORK:-}" ]; then log "work files kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() {
    local keep=() p
    for p in "${STARTED[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    STARTED=("${keep[@]}")
}

wait_port() {
    local port=$1
    for _ in $(seq 1 100); do
        port_open "$port" && return 0
        sleep 0.1
    done
    return 1
}

render() { # template output: replaces @NAME@ with the shell variable NAME
    local template=$1 out=$2 text name
    text=$(cat "$template")
    for name in WORK B1 B2 B3 HTTP_PORT HTTPS_PORT ADMIN_PORT CERT KEY COMBINED BODY \
        STICK_SIZE MAX_PINS HAPROXY_LOG_GLOBAL HAPROXY_LOG_DEFAULTS NGINX_ACCESS_LOG; do
        text=${text//@$name@/${!name:-}}
    done
    printf '%s\n' "$text" >"$out"
}

# ------------------------------------------------------------------------------------------
# Setup: certificate, wrk shim, backends

CERT=$WORK/cert.pem
KEY=$WORK/key.pem
COMBINED=$WORK/combined.pem
if [ "$CERT_TYPE" = rsa ]; then
    keyopts=(-newkey rsa:2048)
else
    keyopts=(-newkey ec -pkeyopt ec_paramgen_curve:P-256)
fi
openssl req -x509 "${keyopts[@]}" -nodes -keyout "$KEY" -out "$CERT" -days 7 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
cat "$CERT" "$KEY" >"$COMBINED"

# wrk keeps the last TLS session when it reconnects; this shim drops it (full handshakes).
cc -shared -fPIC -O2 -o "$WORK/noresume.so" "$HERE/noresume.c" -ldl
if [ "$FLOOR" = 1 ]; then
    cc -O2 -o "$WORK/floor" "$HERE/floor.c"
    case " $PROXIES " in *" floor "*) ;; *) PROXIES="$PROXIES floor" ;; esac
fi
if [ "$FLOOR_URING" = 1 ]; then
    cc -O2 -o "$WORK/floor-uring" "$HERE/floor_uring.c" -luring
    case " $PROXIES " in *" floor-uring "*) ;; *) PROXIES="$PROXIES floor-uring" ;; esac
fi

BODY="<!DOCTYPE html><html><head><title>Seaside</title></head><body>"
while [ ${#BODY} -lt $((BODY_BYTES - 15)) ]; do BODY+="<p>lorem ipsum dolor sit amet</p>"; done
BODY=${BODY:0:$((BODY_BYTES - 15))}"</body></html>\n"
# Used by render() through ${!name}.
# shellcheck disable=SC2034
STICK_SIZE=1m
MAX_PINS=1000000

render "$HERE/backends.conf.in" "$WORK/backends.conf"
taskset -c "$LOAD_CPU" "$NGINX" -e "$WORK/backends.err" -p "$WORK" -c "$WORK/backends.conf" \
    >"$WORK/backends.log" 2>&1 &
STARTED+=($!)
if ! wait_port "$B1" || ! wait_port "$B3"; then
    die "backends did not start: $(cat "$WORK/backends.err")"
fi
curl -s -D - -o /dev/null -H 'X-Warm: 1' "http://127.0.0.1:$B1/app?_s=CHECK0123456789a" |
    grep -qi '^set-cookie: _s=CHECK0123456789a' || die "the backends do not answer as expected"

REDIS_PID=""
redis() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
if [ "$STORE" = 1 ]; then
    taskset -c "$LOAD_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
        --appendonly no --dir "$WORK" --daemonize no >"$WORK/redis.log" 2>&1 &
    REDIS_PID=$!
    STARTED+=("$REDIS_PID")
    wait_port "$REDIS_PORT" || die "redis-server did not start: $(tail -5 "$WORK/redis.log")"
    export TIDEGATE_STORE_SECRET="e2e benchmark store secret"
fi

# ------------------------------------------------------------------------------------------
# Measuring

# "utime+stime stime" (clock ticks) of a process and its direct children (nginx's worker).
tree_pids() { echo "$1"; pgrep -P "$1" 2>/dev/null || true; }
proc_ticks() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0 0; return; }
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $(( ${12} + ${13} )) "${13}"
}
tree_ticks() {
    local total=0 sys=0 p t k
    for p in $(tree_pids "$1"); do
        read -r t k < <(proc_ticks "$p")
        total=$((total + t))
        sys=$((sys + k))
    done
    echo "$total $sys"
}
proc_status_kib() { # field pid
    awk -v f="$1:" '$1 == f { print $2 }' "/proc/$2/status" 2>/dev/null || echo 0
}
tree_status_kib() {
    local total=0 p v
    for p in $(tree_pids "$2"); do
        v=$(proc_status_kib "$1" "$p"); total=$((total + ${v:-0}))
    done
    echo "$total"
}
HZ=$(getconf CLK_TCK)

to_ms() { # wrk latency ("812.00us", "1.23ms", "1.01s") -> ms
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.3f", v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else printf "%s", v }'
}

pins_now() { # live pins in tidegate, from its admin listener
    curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null |
        awk '/^tidegate_pins[{ ]/ { s += $NF } END { printf "%d", s }'
}

PROXY_PID=""
# The request log of the proxy last started, if it has one on (counted after each cell).
ACCESS_FILE=""
start_proxy() { # name[+log] [scale]
    local name=${1%+log} log=$WORK/${1%+log}.log level=warn
    # Used by render() through ${!name}.
    # shellcheck disable=SC2034
    HAPROXY_LOG_GLOBAL="" HAPROXY_LOG_DEFAULTS="" NGINX_ACCESS_LOG="access_log off;"
    ACCESS_FILE=""
    if [ "$1" != "$name" ]; then
        # The request log on, each proxy writing it to a file as it would in production:
        # tidegate and HAProxy to their standard output or error, redirected to a file
        # (HAProxy writes a line per request; tidegate batches them), nginx to its own
        # file through a 64 KiB buffer.
        case "$name" in
            tidegate) level=info; ACCESS_FILE=$log ;;
            haproxy)
                # shellcheck disable=SC2034
                HAPROXY_LOG_GLOBAL="log stdout format raw local0 info"
                # shellcheck disable=SC2034
                HAPROXY_LOG_DEFAULTS=$'log global\n    option httplog'
                ACCESS_FILE=$log ;;
            nginx)
                # shellcheck disable=SC2034
                NGINX_ACCESS_LOG="access_log $WORK/nginx-access.log combined buffer=64k flush=1s;"
                ACCESS_FILE=$WORK/nginx-access.log ;;
            *) die "$name has no request log" ;;
        esac
        rm -f "$ACCESS_FILE"
    fi
    case "$name" in
        tidegate)
            if [ "${2:-}" = scale ]; then
                render "$HERE/tidegate.toml.in" "$WORK/tidegate.toml"
                RUST_LOG=warn taskset -c "$PROXY_CPU" "$TIDEGATE" --config "$WORK/tidegate.toml" \
                    >"$log" 2>&1 &
            else
                local admin=off
                [ "$CHECK" = 1 ] || [ -n "$REDIS_PID" ] && admin=127.0.0.1:$ADMIN_PORT
                RUST_LOG=$level taskset -c "$PROXY_CPU" "$TIDEGATE" \
                    --listen "127.0.0.1:$HTTP_PORT" --listen-tls "127.0.0.1:$HTTPS_PORT" \
                    --tls-cert "$CERT" --tls-key "$KEY" \
                    --backend "b1=127.0.0.1:$B1" --backend "b2=127.0.0.1:$B2" \
                    --backend "b3=127.0.0.1:$B3" --session-cookie _s --session-param _s \
                    --threads 1 --admin "$admin" \
                    ${REDIS_PID:+--store "redis://127.0.0.1:$REDIS_PORT/0"} >"$log" 2>&1 &
            fi
            ;;
        haproxy)
            render "$HERE/haproxy.cfg.in" "$WORK/haproxy.cfg"
            taskset -c "$PROXY_CPU" "$HAPROXY" -db -f "$WORK/haproxy.cfg" >"$log" 2>&1 &
            ;;
        nginx)
            render "$HERE/nginx-proxy.conf.in" "$WORK/nginx-proxy.conf"
            taskset -c "$PROXY_CPU" "$NGINX" -e "$WORK/nginx-proxy.err" -p "$WORK" \
                -c "$WORK/nginx-proxy.conf" >"$log" 2>&1 &
            ;;
        floor|floor-uring)
            taskset -c "$PROXY_CPU" "$WORK/$name" "$HTTP_PORT" "$B1" "$B2" "$B3" >"$log" 2>&1 &
            ;;
        *) die "unknown proxy $name" ;;
    esac
    PROXY_PID=$!
    STARTED+=("$PROXY_PID")
    wait_port "$HTTP_PORT" || die "$name did not start: $(tail -5 "$log")"
    if [ "$name" = tidegate ] && [ "${2:-}" = scale ]; then
        wait_port "$ADMIN_PORT" || die "tidegate's admin listener did not start: $(tail -5 "$log")"
    elif [[ "$name" != floor* ]]; then
        wait_port "$HTTPS_PORT" || die "$name TLS did not start: $(tail -5 "$log")"
    fi
}

stop_proxy() {
    [ -n "$PROXY_PID" ] || return 0
    stop_pid "$PROXY_PID"
    forget_pid "$PROXY_PID"
    PROXY_PID=""
    for _ in $(seq 1 50); do port_open "$HTTP_PORT" || return 0; sleep 0.1; done
}

# The warm-up pass: every id once with X-Warm (backends answer Set-Cookie: _s=ID).
# Pipelined over plain HTTP keep-alive. It ends when wrk has seen every id answered, or,
# with `admin` (the scale curve, ids sent without a per-reply Lua callback), when tidegate's
# admin listener reports that many pins.
warm_up() { # ids [admin] -> prints seconds taken
    local n=$1 by_admin=${2:-} depth=16 conns=32 done_file=$WORK/warm.done start end limit
    rm -f "$done_file"
    limit=$((n / 2000 + 60))
    start=$(date +%s.%N)
    local -a env=(TG_WARM=1 "TG_IDS=$n" "TG_PIPELINE=$depth")
    [ -n "$by_admin" ] || env+=("TG_EXTRA=$((conns * depth + depth))" "TG_DONE_FILE=$done_file")
    env "${env[@]}" taskset -c "$LOAD_CPU" "$WRK" -t1 -c"$conns" -d"${limit}s" \
        --timeout 10s -s "$HERE/load.lua" "http://127.0.0.1:$HTTP_PORT/" \
        >"$WORK/warm.out" 2>&1 &
    local wrk_pid=$! pins=0
    STARTED+=("$wrk_pid")
    while kill -0 "$wrk_pid" 2>/dev/null; do
        if [ -n "$by_admin" ]; then
            pins=$(pins_now)
            [ "${pins:-0}" -ge "$n" ] && { : >"$done_file"; break; }
            sleep 0.5
        else
            [ -e "$done_file" ] && break
            sleep 0.05
        fi
    done
    kill -INT "$wrk_pid" 2>/dev/null || true
    wait "$wrk_pid" 2>/dev/null || true
    forget_pid "$wrk_pid"
    end=$(date +%s.%N)
    [ -e "$done_file" ] || log "warning: warm-up of $n ids did not finish: $(tail -3 "$WORK/warm.out")"
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }'
}

# One wrk pass of a variant. Sets WRK_OUT.
WRK_OUT=""
drive() { # variant seconds ids [tag]
    local variant=$1 seconds=$2 n=$3 url mode=cookie close=0 preload="" fresh=0
    url=http://127.0.0.1:$HTTP_PORT/
    case "$variant" in
        http-cookie) ;;
        http-miss) fresh=1 ;;
        http-query) mode=query ;;
        http-close) close=1 ;;
        https-cookie) url=https://127.0.0.1:$HTTPS_PORT/ ;;
        # wrk offers the previous connection's session when it reconnects (SSL_clear keeps
        # it): a returning visitor's resumed handshake.
        https-resume) url=https://127.0.0.1:$HTTPS_PORT/; close=1 ;;
        https-full) url=https://127.0.0.1:$HTTPS_PORT/; close=1; preload=$WORK/noresume.so ;;
        h2-cookie) drive_h2 "$seconds" "${4:-run}"; return ;;
        *) die "unknown variant $variant" ;;
    esac
    WRK_OUT=$WORK/wrk-${4:-run}.out
    TG_MODE=$mode TG_IDS=$n TG_CLOSE=$close TG_FRESH=$fresh LD_PRELOAD=$preload \
        taskset -c "$LOAD_CPU" "$WRK" -t1 -c"$CONNS" -d"${seconds}s" --timeout 5s --latency \
        -s "$HERE/load.lua" "$url" >"$WRK_OUT" 2>&1 &
    local wrk_pid=$!
    STARTED+=("$wrk_pid")
    wait "$wrk_pid" || true
    forget_pid "$wrk_pid"
}

# HTTP/2 over TLS: $H2_CLIENTS h2load processes of one connection each, the $CONNS streams
# shared among them, each connection with its own session id in the cookie (as a browser
# tab's: ids the warm-up taught), the same headers as load.lua's. Their summaries and
# per-request latencies are written to $WRK_OUT in wrk's words, for parse_wrk.
drive_h2() { # seconds tag
    local seconds=$1 tag=$2 i pids=() streams=$(( (CONNS + H2_CLIENTS - 1) / H2_CLIENTS ))
    WRK_OUT=$WORK/wrk-$tag.out
    for i in $(seq 0 $((H2_CLIENTS - 1))); do
        taskset -c "$LOAD_CPU" h2load -t1 -c1 -m"$streams" -D "$seconds" \
            --log-file="$WORK/h2-$tag-$i.tsv" \
            -H "user-agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0" \
            -H "accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8" \
            -H "accept-language: en-GB,en;q=0.5" -H "accept-encoding: gzip, deflate" \
            -H "cookie: _ga=GA1.1.1482931.1716200000; theme=dark; lang=en-GB; _s=$(printf 'Kd83%012d' "$i")" \
            "https://127.0.0.1:$HTTPS_PORT/app?_k=aB3dE5fG" >"$WORK/h2-$tag-$i.out" 2>&1 &
        pids+=($!)
        STARTED+=("$!")
    done
    for i in "${pids[@]}"; do wait "$i" || true; forget_pid "$i"; done
    {
        cat "$WORK"/h2-"$tag"-*.out | awk -v d="$seconds" '
            /^requests:/ { done += $6; failed += $10 + $12 + $14 }
            /^status codes:/ { bad += $5 + $7 + $9 }
            END { printf "  %d requests in %ss\nRequests/sec: %.2f\n", done, d, done / d
                  if (failed + bad > 0) printf "  Non-2xx or Socket errors: %d\n", failed + bad }'
        cat "$WORK"/h2-"$tag"-*.tsv | cut -f3 | sort -n | awk '{ v[NR] = $1 } END {
            if (NR == 0) exit
            printf "     50%%    %.3fms\n     99%%    %.3fms\n", v[int(NR * 0.50) + 1] / 1000, v[int(NR * 0.99) + 1] / 1000 }'
    } >"$WRK_OUT"
    rm -f "$WORK"/h2-"$tag"-*.tsv
}

# Parses $WRK_OUT: "requests rps p50_ms p99_ms errors"
parse_wrk() {
    local reqs rps p50 p99 non2xx sockerr
    reqs=$(awk '/requests in/ { print $1 }' "$WRK_OUT")
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$WRK_OUT")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$WRK_OUT")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$WRK_OUT")")
    non2xx=$(awk '/Non-2xx/ { print $NF }' "$WRK_OUT")
    sockerr=$(awk '/Socket errors/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$WRK_OUT")
    echo "${reqs:-0} ${rps:-0} ${p50:-0} ${p99:-0} $(( ${non2xx:-0} + ${sockerr:-0} ))"
}

# One cell: fresh proxy, warm-up, pre-run, measured run. Appends a line to $RAW.
run_cell() { # run proxy variant
    local run=$1 proxy=$2 variant=$3 t0 t1 reqs rps p50 p99 errs hwm cpu100k util r0=0 r1=0
    local redis100k=nan
    [ -n "$REDIS_PID" ] && [ "$proxy" = tidegate ] && { redis FLUSHALL >/dev/null || die "redis FLUSHALL failed"; }
    start_proxy "$proxy"
    warm_up "$IDS" >/dev/null
    if [ -n "$REDIS_PID" ] && [ "$proxy" = tidegate ]; then
        # The taught pins are in Redis before anything is measured (the writer batches them).
        local keys=0
        for _ in $(seq 1 100); do
            keys=$(redis DBSIZE)
            [ "${keys:-0}" -ge "$IDS" ] && break
            sleep 0.1
        done
        if [ "${keys:-0}" -lt "$IDS" ]; then
            # Measured all the same (the pins are in the local table, which hits use), but
            # said, with what the store counted.
            log "warning: only ${keys:-0} of the $IDS taught pins reached Redis: $(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" |
                grep -E '^tidegate_store_(up|lookups|writes|degraded)' | grep -v ' 0$' | paste -sd' ')"
        fi
    fi
    drive "$variant" "$WARMUP" "$IDS" pre
    local perf_pid="" stat_pid=""
    if [ "$PERF" = 1 ]; then
        perf record -q -g -e cpu-clock -F 4999 -p "$(tree_pids "$PROXY_PID" | paste -sd,)" \
            -o "$WORK/perf-$run-$proxy-$variant.data" -- sleep "$DURATION" >/dev/null 2>&1 &
        perf_pid=$!
        STARTED+=("$perf_pid")
        perf stat -e raw_syscalls:sys_enter -x, -o "$WORK/perf-stat.txt" \
            -p "$(tree_pids "$PROXY_PID" | paste -sd,)" -- sleep "$DURATION" >/dev/null 2>&1 &
        stat_pid=$!
        STARTED+=("$stat_pid")
    fi
    [ -n "$REDIS_PID" ] && read -r r0 _ < <(proc_ticks "$REDIS_PID")
    local lines0=0 lines1=0 per_req=""
    # nginx's buffered lines trail by up to a second: both counts are taken a second later.
    [ -n "$ACCESS_FILE" ] && { sleep 1.1; lines0=$(wc -l <"$ACCESS_FILE" 2>/dev/null || echo 0); }
    read -r t0 k0 < <(tree_ticks "$PROXY_PID")
    drive "$variant" "$DURATION" "$IDS" "$run-$proxy-$variant"
    read -r t1 k1 < <(tree_ticks "$PROXY_PID")
    [ -n "$REDIS_PID" ] && read -r r1 _ < <(proc_ticks "$REDIS_PID")
    [ -n "$ACCESS_FILE" ] && { sleep 1.1; lines1=$(wc -l <"$ACCESS_FILE" 2>/dev/null || echo 0); }
    hwm=$(tree_status_kib VmHWM "$PROXY_PID")
    if [ -n "$perf_pid" ]; then
        wait "$perf_pid" 2>/dev/null || true
        forget_pid "$perf_pid"
        wait "$stat_pid" 2>/dev/null || true
        forget_pid "$stat_pid"
        local syscalls
        syscalls=$(awk -F, '/raw_syscalls:sys_enter/ { print $1 }' "$WORK/perf-stat.txt")
        mkdir -p "${OUT%.md}.perf"
        local data=$WORK/perf-$run-$proxy-$variant.data
        {
            echo "# $proxy, $variant, run $run: share of the proxy's CPU samples"
            read -r reqs _ < <(parse_wrk)
            awk -v s="${syscalls:-0}" -v r="${reqs:-0}" 'BEGIN { if (r > 0) printf "syscalls per request: %.2f (%d syscalls, %d requests)\n", s / r, s, r }'
            echo "## by object"
            perf report -i "$data" --stdio --no-children -g none --sort dso 2>/dev/null |
                grep -v '^#' | grep -v '^$' | sed 's/ *$//' | head -12
            echo "## by symbol"
            perf report -i "$data" --stdio --no-children -g none --sort dso,symbol 2>/dev/null |
                grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' | head -50
        } >"${OUT%.md}.perf/$run-$proxy-$variant.txt" || true
    fi
    stop_proxy
    read -r reqs rps p50 p99 errs < <(parse_wrk)
    if [ -n "$ACCESS_FILE" ]; then
        # Proof the request log was on: about one line per measured request.
        per_req=$(awk -v l=$((lines1 - lines0)) -v r="${reqs:-0}" 'BEGIN { if (r > 0) printf "%.2f", l / r }')
        rm -f "$ACCESS_FILE"
    fi
    if [ "${reqs:-0}" -gt 0 ]; then
        cpu100k=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v r="$reqs" 'BEGIN { printf "%.3f", t / hz / r * 100000 }')
        [ -n "$REDIS_PID" ] && [ "$proxy" = tidegate ] &&
            redis100k=$(awk -v t=$((r1 - r0)) -v hz="$HZ" -v r="$reqs" 'BEGIN { printf "%.3f", t / hz / r * 100000 }')
    else
        cpu100k=nan
    fi
    util=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v d="$DURATION" 'BEGIN { printf "%.0f", t / hz / d * 100 }')
    kernel=$(awk -v t=$((t1 - t0)) -v k=$((k1 - k0)) 'BEGIN { if (t > 0) printf "%.0f", k / t * 100; else print "nan" }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run" "$variant" "$proxy" "$rps" "$cpu100k" \
        "$util" "$p50" "$p99" "$((hwm / 1024))" "$errs" "$kernel" "$redis100k" >>"$RAW"
    log "run $run $variant $proxy: $rps req/s, $cpu100k CPU-s/100k, CPU $util%, p50 ${p50} ms, p99 ${p99} ms, peak RSS $((hwm / 1024)) MiB, errors $errs${REDIS_PID:+, redis-server $redis100k CPU-s/100k}${per_req:+, log lines per request $per_req}"
}

median() { # numbers on stdin -> median
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) { print v[(NR + 1) / 2]; exit }
        m = sprintf("%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2); sub(/\.?0+$/, "", m); print m }'
}
cell() { # variant proxy column -> median over runs
    awk -F'\t' -v v="$1" -v p="$2" -v c="$3" '$2 == v && $3 == p { print $c }' "$RAW" | median
}

machine() {
    local model
    model=$(lscpu 2>/dev/null | awk -F: '/Model name/ { gsub(/^ +/, "", $2); print $2; exit }')
    echo "- CPU: ${model:-unknown}, $(nproc) CPUs; kernel $(uname -r)"
    echo "- $("$HAPROXY" -v | head -1 | cut -d' ' -f1-3); $("$NGINX" -v 2>&1 | cut -d' ' -f3); $("$WRK" -v 2>&1 | head -1 | cut -d' ' -f1-2); $(rustc --version 2>/dev/null || echo rustc unknown)"
    local rev=${TIDEGATE_REV:-}
    if [ -z "$rev" ]; then
        rev=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')
        (cd "$ROOT" && git diff --quiet HEAD -- src 2>/dev/null) || rev+=" (with local changes)"
    fi
    echo "- tidegate $rev"
    [ -z "$REDIS_PID" ] || echo "- shared store on: $(redis-server --version | cut -d' ' -f1-3) on CPU $LOAD_CPU, no persistence"
}

# ------------------------------------------------------------------------------------------
# The matrix

report_matrix() {
    local v p label
    echo "### Cells (median of $RUNS run(s); $DURATION s each, $CONNS connections, $IDS session ids)"
    echo
    echo "| variant | proxy | req/s | CPU-s per 100k req | kernel % | proxy CPU % | p50 ms | p99 ms | peak RSS MiB | errors |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for v in $VARIANTS; do
        for p in $PROXIES; do
            [[ "$p" == floor* ]] && [[ "$v" != http-* ]] && continue
            printf '| %s | %s | %.0f | %s | %s | %s | %s | %s | %s | %s |\n' "$v" "$p" "$(cell "$v" "$p" 4)" \
                "$(cell "$v" "$p" 5)" "$(cell "$v" "$p" 11)" "$(cell "$v" "$p" 6)" "$(cell "$v" "$p" 7)" \
                "$(cell "$v" "$p" 8)" "$(cell "$v" "$p" 9)" "$(cell "$v" "$p" 10)"
        done
    done
    if [ -n "$REDIS_PID" ]; then
        echo
        echo "### redis-server (the shared store of tidegate's cells), CPU-s per 100k requests"
        echo
        echo "| variant | redis-server CPU-s per 100k req |"
        echo "| --- | ---: |"
        for v in $VARIANTS; do
            printf '| %s | %s |\n' "$v" "$(cell "$v" tidegate 12)"
        done
    fi
    local TG=tidegate$SUFFIX HP=haproxy$SUFFIX NG=nginx$SUFFIX
    if [[ " $PROXIES " == *" tidegate "* ]] && [[ " $PROXIES " == *" tidegate+log "* ]]; then
        echo
        echo "### The access log: tidegate with it on ÷ off (CPU per request)"
        echo
        echo "| variant | off CPU-s/100k | on CPU-s/100k | on ÷ off | run by run |"
        echo "| --- | ---: | ---: | ---: | --- |"
        for v in $VARIANTS; do
            local byrun
            byrun=$(awk -F'\t' -v v="$v" '$2 == v && $3 == "tidegate" { off[$1] = $5 }
                $2 == v && $3 == "tidegate+log" { on[$1] = $5; if ($1 > m) m = $1 }
                END { for (r = 1; r <= m; r++) if (off[r] > 0) printf "%s%.2f", (r > 1 ? " / " : ""), on[r] / off[r] }' "$RAW")
            awk -v v="$v" -v off="$(cell "$v" tidegate 5)" -v on="$(cell "$v" tidegate+log 5)" -v b="$byrun" \
                'BEGIN { printf "| %s | %s | %s | %s | %s |\n", v, off, on, (off + 0 > 0 ? sprintf("%.2f", on / off) : "n/a"), b }'
        done
    fi
    if [[ " $PROXIES " == *" floor "* && " $PROXIES " == *" floor-uring "* ]]; then
        echo
        echo "### floor-uring ÷ floor (CPU-s per 100k requests; run by run in brackets)"
        echo
        echo "| variant | floor | floor-uring | floor-uring ÷ floor |"
        echo "| --- | ---: | ---: | ---: |"
        for v in $VARIANTS; do
            [[ "$v" != http-* ]] && continue
            awk -F'\t' -v v="$v" -v fl="$(cell "$v" floor 5)" -v fu="$(cell "$v" floor-uring 5)" '
                $2 == v && $3 == "floor" { a[$1] = $5 } $2 == v && $3 == "floor-uring" { b[$1] = $5 }
                END { runs = ""; for (r = 1; r in a || r in b; r++)
                        runs = runs sprintf("%s%.2f", r > 1 ? " " : "", (a[r] + 0 > 0) ? b[r] / a[r] : 0)
                      printf "| %s | %s | %s | %.2f (%s) |\n", v, fl, fu, (fl + 0 > 0) ? fu / fl : 0, runs }' "$RAW"
        done
    fi
    case " $PROXIES " in *" $TG "*) ;; *) return 0 ;; esac
    echo
    echo "### tidegate ÷ the better peer (CPU per request: lower is better)${SUFFIX:+, request logs on}"
    echo
    echo "Targets (issue 15): ≤ 0.80 on keep-alive (http-cookie, http-query, https-cookie, h2-cookie), ≤ 0.90 on http-close and https-resume, ≤ 0.50 × nginx on https-full; p99 ≤ 1.00."
    echo
    echo "| variant | tidegate CPU-s/100k | HAProxy | nginx | tidegate ÷ better peer | target | p99 tidegate ÷ better peer | req/s tidegate ÷ better peer |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for v in $VARIANTS; do
        local tg hp ng tg99 hp99 ng99 tgr hpr ngr
        tg=$(cell "$v" "$TG" 5); hp=$(cell "$v" "$HP" 5); ng=$(cell "$v" "$NG" 5)
        tg99=$(cell "$v" "$TG" 8); hp99=$(cell "$v" "$HP" 8); ng99=$(cell "$v" "$NG" 8)
        tgr=$(cell "$v" "$TG" 4); hpr=$(cell "$v" "$HP" 4); ngr=$(cell "$v" "$NG" 4)
        awk -v v="$v" -v tg="$tg" -v hp="$hp" -v ng="$ng" -v t99="$tg99" -v h99="$hp99" \
            -v n99="$ng99" -v tr="$tgr" -v hr="$hpr" -v nr="$ngr" 'BEGIN {
            best = (hp != "nan" && (ng == "nan" || hp + 0 <= ng + 0)) ? hp : ng
            b99 = (h99 != "nan" && (n99 == "nan" || h99 + 0 <= n99 + 0)) ? h99 : n99
            br = (hr != "nan" && (nr == "nan" || hr + 0 >= nr + 0)) ? hr : nr
            target = "0.80"
            if (v == "http-close" || v == "https-resume") target = "0.90"
            if (v == "https-full") { target = "0.50 × nginx"; if (ng != "nan") best = ng }
            if (v == "http-miss") target = "—"
            r = (best + 0 > 0) ? sprintf("%.2f", tg / best) : "n/a"
            r99 = (b99 + 0 > 0) ? sprintf("%.2f", t99 / b99) : "n/a"
            rr = (br + 0 > 0) ? sprintf("%.2f", tr / br) : "n/a"
            printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", v, tg, hp, ng, r, target, r99, rr }'
    done
    if [ "$RUNS" -gt 1 ]; then
        echo
        echo "tidegate ÷ better peer (https-full: ÷ nginx), run by run:"
        awk -F'\t' -v tg="$TG" -v hp="$HP" -v ng="$NG" '{ c[$1 "\t" $2 "\t" $3] = $5; if (!($2 in seen)) { seen[$2] = 1; order[++n] = $2 }
                       if ($1 > runs) runs = $1 }
            END { for (i = 1; i <= n; i++) { v = order[i]; line = "- " v ":"
                    for (r = 1; r <= runs; r++) {
                        t = c[r "\t" v "\t" tg]; h = c[r "\t" v "\t" hp]; g = c[r "\t" v "\t" ng]
                        b = (h != "" && (g == "" || h + 0 <= g + 0)) ? h : g
                        if (v == "https-full" && g != "") b = g
                        line = line ((t != "" && b + 0 > 0) ? sprintf(" %.2f", t / b) : " n/a") }
                    print line } }' "$RAW"
    fi
    if [[ " $PROXIES " == *" floor"* ]]; then
        echo
        echo "### The floor: system calls alone (floor.c; floor_uring.c: on io_uring) against the proxies"
        echo
        echo "| variant | floor CPU-s/100k | floor kernel % | floor ÷ better peer | tidegate ÷ floor | 0.8 × better peer ÷ floor |"
        echo "| --- | ---: | ---: | ---: | ---: | ---: |"
        for v in $VARIANTS; do
            for f in floor floor-uring; do
                [[ "$v" != http-* ]] || [[ " $PROXIES " != *" $f "* ]] && continue
                label=$v
                [ "$f" = floor ] || label="$v ($f)"
                awk -v v="$label" -v fl="$(cell "$v" $f 5)" -v fk="$(cell "$v" $f 11)" \
                    -v tg="$(cell "$v" "$TG" 5)" -v hp="$(cell "$v" "$HP" 5)" \
                    -v ng="$(cell "$v" "$NG" 5)" 'BEGIN {
                    best = (hp != "nan" && (ng == "nan" || hp + 0 <= ng + 0)) ? hp : ng
                    if (fl + 0 <= 0 || best + 0 <= 0) { printf "| %s | %s | %s | n/a | n/a | n/a |\n", v, fl, fk; exit }
                    printf "| %s | %s | %s | %.2f | %.2f | %.2f |\n", v, fl, fk, fl / best, tg / fl, 0.8 * best / fl }'
            done
        done
    fi
    if [[ " $VARIANTS " == *" https-full "* ]] && [[ " $VARIANTS " == *" https-resume "* ]]; then
        echo
        echo "Resumed ÷ full handshake, CPU per request: $(for p in "$TG" "$HP" "$NG"; do
            awk -v p="${p%+log}" -v r="$(cell https-resume "$p" 5)" -v f="$(cell https-full "$p" 5)" \
                'BEGIN { if (f + 0 > 0) printf "%s %.2f; ", p, r / f }'; done)"
    fi
}

# ------------------------------------------------------------------------------------------
# The scale curve: tidegate alone, at growing numbers of live pins.

SCALE_RAW=$WORK/scale.tsv
: >"$SCALE_RAW"
HOT_IDS=1000
scale_pass() { # ids-in-table ids-drawn run tag -> appends a line to $SCALE_RAW
    local n=$1 drawn=$2 run=$3 tag=$4 t0 t1 reqs rps p50 p99 errs rss hwm cpu100k
    read -r t0 _ < <(tree_ticks "$PROXY_PID")
    drive http-cookie "$DURATION" "$drawn" "scale-$n-$tag-$run"
    read -r t1 _ < <(tree_ticks "$PROXY_PID")
    rss=$(proc_status_kib VmRSS "$PROXY_PID")
    hwm=$(proc_status_kib VmHWM "$PROXY_PID")
    read -r reqs rps p50 p99 errs < <(parse_wrk)
    cpu100k=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v r="$reqs" 'BEGIN { if (r > 0) printf "%.3f", t / hz / r * 100000; else print "nan" }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$SCALE_PINS" "$SCALE_SECS" \
        "$rps" "$cpu100k" "$p50" "$p99" "$SCALE_RSS0" "$rss" "$hwm" "$run" "$tag" >>"$SCALE_RAW"
    log "scale $n run $run ($tag ids): $rps req/s, $cpu100k CPU-s/100k, p99 $p99 ms, RSS $((rss / 1024)) MiB"
}
SCALE_PINS=0
SCALE_SECS=0
SCALE_RSS0=0
run_scale() {
    local n run
    for n in $SCALE_SIZES; do
        # shellcheck disable=SC2034 # read by render()
        MAX_PINS=$((n + n / 5 + 1000))
        start_proxy tidegate scale
        SCALE_RSS0=$(proc_status_kib VmRSS "$PROXY_PID")
        log "scale: warming $n pins"
        SCALE_SECS=$(warm_up "$n" admin)
        SCALE_PINS=$(pins_now)
        log "scale: $n ids warmed in $SCALE_SECS s; the table holds ${SCALE_PINS:-?} pins"
        drive http-cookie "$WARMUP" "$n" pre
        # Each run measures requests spread over all n ids ("all"), then requests drawn from
        # the first $HOT_IDS ids only ("hot", cache-resident) in the same process: their
        # ratio is the cost of the table's size, free of drift between processes.
        for run in $(seq 1 "$RUNS"); do
            scale_pass "$n" "$n" "$run" all
            if [ "$n" -gt "$HOT_IDS" ]; then scale_pass "$n" "$HOT_IDS" "$run" hot; fi
        done
        stop_proxy
    done
}
report_scale() {
    local n first="" base="" rss_base="" c hot rss
    echo "### Scale: tidegate with live pins (HTTP keep-alive, id in a cookie; median of $RUNS pass(es) of $DURATION s)"
    echo
    echo "\"all\": each request names a random one of the live pins. \"hot\": the same process, requests drawn from $HOT_IDS of them."
    echo
    echo "| live pins | warm-up s | req/s | CPU-s per 100k req | vs smallest table | hot CPU-s per 100k | all ÷ hot | p50 ms | p99 ms | RSS MiB | RSS growth per pin |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for n in $SCALE_SIZES; do
        sc() { awk -F'\t' -v n="$n" -v c="$1" -v t="${2:-all}" '$1 == n && $12 == t { print $c }' "$SCALE_RAW" | median; }
        c=$(sc 5)
        hot=$(sc 5 hot)
        rss=$(sc 9)
        if [ -z "$first" ]; then first=$n; base=$c; rss_base=$rss; fi
        awk -v n="$n" -v pins="$(sc 2)" -v secs="$(sc 3)" -v rps="$(sc 4)" -v c="$c" -v base="$base" \
            -v hot="$hot" -v p50="$(sc 6)" -v p99="$(sc 7)" -v rss="$rss" -v first="$first" \
            -v rss0="$rss_base" 'BEGIN {
            growth = (n > first) ? sprintf("%.0f B", (rss - rss0) * 1024 / (n - first)) : "—"
            ratio = (hot != "nan" && hot + 0 > 0) ? sprintf("%.2f", c / hot) : "—"
            if (hot == "nan") hot = "—"
            printf "| %s | %s | %.0f | %s | %.2f | %s | %s | %s | %s | %.0f | %s |\n", pins, secs, rps, c, c / base, hot, ratio, p50, p99, rss / 1024, growth }'
    done
}

# ------------------------------------------------------------------------------------------
# The check pass: are the pins used?

run_check() {
    local v
    for v in $VARIANTS; do
        start_proxy tidegate
        warm_up "$IDS" >/dev/null
        drive "$v" 2 "$IDS" "check-$v"
        read -r reqs rps p50 p99 errs < <(parse_wrk)
        echo "== $v: $reqs requests, $rps req/s, errors $errs"
        curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" |
            grep -E '^tidegate_(pins|decisions|tls_handshakes)' | grep -v ' 0$' | sed 's/^/   /'
        stop_proxy
    done
}

# ------------------------------------------------------------------------------------------

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "work dir $WORK; proxy on CPU $PROXY_CPU, wrk + backends on CPU $LOAD_CPU; load average $LOAD_BEFORE"

if [ "$CHECK" = 1 ]; then
    run_check
    exit 0
fi

if [ "$MATRIX" = 1 ]; then
    read -r -a proxies <<<"$PROXIES"
    for run in $(seq 1 "$RUNS"); do
        # Rotate the proxy order each run, so drift in the machine's load spreads evenly.
        shift_by=$(( (run - 1) % ${#proxies[@]} ))
        order=("${proxies[@]:$shift_by}" "${proxies[@]:0:$shift_by}")
        for v in $VARIANTS; do
            for p in "${order[@]}"; do
                # The floor relay speaks plain HTTP only.
                [[ "$p" == floor* ]] && [[ "$v" != http-* ]] && continue
                run_cell "$run" "$p" "$v"
            done
        done
    done
fi
if [ "$SCALE" = 1 ]; then
    run_scale
fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

{
    echo "## tidegate e2e benchmark, $(date '+%Y-%m-%d %H:%M')"
    echo
    machine
    echo "- proxy pinned to CPU $PROXY_CPU with one worker; wrk (1 thread) and 3 nginx backends on CPU $LOAD_CPU; certificate $CERT_TYPE; reply body $BODY_BYTES bytes"
    echo "- load average (1/5/15 min) before: $LOAD_BEFORE; after: $LOAD_AFTER"
    echo
    if [ "$MATRIX" = 1 ]; then report_matrix; echo; fi
    if [ "$SCALE" = 1 ]; then report_scale; echo; fi
} | tee "$OUT"
cp "$RAW" "${OUT%.md}.cells.tsv" 2>/dev/null || true
if [ "$SCALE" = 1 ]; then cp "$SCALE_RAW" "${OUT%.md}.scale.tsv" 2>/dev/null || true; fi
log "results written to $OUT"
