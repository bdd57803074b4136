#!/usr/bin/env python3
"""Instructions per request, counted by callgrind: an A/B that the machine's noise cannot move.

    benches/e2e/instructions.py OLD_BINARY NEW_BINARY [--requests N] [--ids K]
    benches/e2e/instructions.py BINARY BINARY --store new      # one binary, store off vs on
    benches/e2e/instructions.py OLD_BINARY NEW_BINARY --store both

Each binary serves the e2e benchmark's pool (three nginx backends from backends.conf.in, one
worker thread, no access log) under `valgrind --tool=callgrind`. The pins are taught first (K
session ids, as the e2e warm-up does), then N requests are sent per variant over keep-alive
(`http-cookie`: the id in a cookie; `http-query`: in `_s`) and over a new connection each
(`http-close`). A run with the warm-up alone is subtracted, so what is left is what N requests
cost. Instruction counts repeat to a fraction of a percent for the same binary and inputs,
whatever else the machine does; they weigh every instruction alike (a cache miss costs no
more than an add), so read them beside the CPU-time A/B of ab.sh, not instead of it.

`--store new` (or `both`) runs the new binary (or both) with a shared pin store: a
`redis-server` the script starts on a free 127.0.0.1 port (`--save '' --appendonly no`, no
persistence; stopped by its pid at the end, emptied with FLUSHALL before each tidegate run), and
a `[store]` section naming it (with a secret; `timeout_ms` stays at its default). Given the same
binary twice, `--store new` measures what the store costs that binary: the "old" column is the
binary with the store off, the "new" one the same binary with it on. With `--store`, both sides
run with the admin listener on (idle but for two scrapes per run, the same number in every run,
so the subtraction cancels them): after the warm-up the script checks that the store is up
(`tidegate_store_up 1`) and that the taught pins have reached Redis
(`tidegate_store_writes_total{kind="pin"}` >= K, and Redis's DBSIZE), and it reports what the
store did during the measured requests (lookups by outcome, writes by kind), Redis's DBSIZE at
the end and its used_memory growth since the FLUSHALL per key (bytes per pin written by
tidegate, the cross-check of store-memory.py). With the store on, tidegate also PINGs Redis
once a second (its health probe); a measured run lasts longer than the warm-up alone, so those
PINGs are not wholly subtracted: a few instructions per request at 20 000 requests.

`--log new` (or `both`) runs the new binary (or both) with its access log on (`RUST_LOG=info`,
standard error to a file): given the same binary twice, what the access log costs, on the
request path and on the thread that writes the log out (callgrind counts every thread).

`--keep DIR` keeps each run's callgrind output in DIR, named by binary, store side and variant,
for `callgrind_annotate` (where the instructions went; the warm-up-alone run is there too).

Variants: `http-cookie`, `http-query` and `http-close` name one of the K taught ids, so with
the store on they are local hits (the store is not asked). `http-miss` (not in the default
list) sends, over keep-alive, a fresh well-formed id never seen before with `X-Warm: 1` in
every request: the local table misses, the store (when on) is asked with one GET and says it
holds nothing, the backend answers `Set-Cookie`, and the pin learned from that reply is written
through (SET EX, batched by tidegate's writer task). Callgrind counts tidegate's instructions
only: Redis's work for the GET and the SET is not in the figures (benches/e2e/store-ab.sh
measures redis-server's CPU time).
"""

import argparse
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=60.0, proc=None):
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"{proc.args[-3] if len(proc.args) > 2 else proc.args[0]} exited ({proc.returncode}) before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {port} after {limit} s")


def render(template, out, values):
    text = open(template).read()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    open(out, "w").write(text)


def send(port, n, ids, variant, warm=False):
    """n requests; ids cycle (http-miss: each a new one). Keep-alive unless http-close."""
    conn = None
    for i in range(n):
        sid = f"S{i % ids:015d}"
        if variant == "http-miss":
            # Never taught, never sent before (the taught ids start with S): a local miss.
            sid = f"M{i:015d}"
            warm = True
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Host": "bench"}
        path = "/"
        if variant == "http-query":
            path = f"/app?_s={sid}&_k=k"
        else:
            headers["Cookie"] = f"_s={sid}"
        if warm:
            headers["X-Warm"] = "1"
        if variant == "http-close":
            headers["Connection"] = "close"
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            sys.exit(f"{variant}: status {r.status}")
        if variant == "http-close":
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def redis_command(port, *args):
    """One command to the redis-server on `port`; its reply, decoded (RESP 2, simple cases)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        msg = f"*{len(args)}\r\n" + "".join(f"${len(str(a))}\r\n{a}\r\n" for a in args)
        s.sendall(msg.encode())
        f = s.makefile("rb")
        line = f.readline().decode().rstrip("\r\n")
        if line[0] in "+-":
            if line[0] == "-":
                sys.exit(f"redis: {line}")
            return line[1:]
        if line[0] == ":":
            return int(line[1:])
        if line[0] == "$":
            n = int(line[1:])
            return None if n < 0 else f.read(n + 2)[:-2].decode()
        sys.exit(f"redis: unexpected reply {line!r}")


def used_memory(port):
    """Redis's used_memory (INFO memory), bytes."""
    return int(re.search(r"^used_memory:(\d+)", redis_command(port, "INFO", "memory"), re.M).group(1))


def metrics(port):
    """The admin listener's /metrics as {name{labels}: value}."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def store_counts(m):
    """The store's lookups and writes, by label, from a metrics scrape."""
    return {k: v for k, v in m.items() if k.startswith(("tidegate_store_lookups_total", "tidegate_store_writes_total"))}


def run(binary, work, backends, variant, requests, ids, admin_on=False, store=None, keep=None, log=False):
    """Total instructions of one process: warm-up, then `requests` requests of `variant`.
    With `store` (a redis-server port) the store is on, and what it did is returned too."""
    port = free_port()
    admin = free_port() if admin_on or store else None
    config = os.path.join(work, "tidegate.toml")
    b1, b2, b3 = backends
    with open(config, "w") as f:
        admin_line = f'"127.0.0.1:{admin}"' if admin else '"off"'
        f.write(
            f'listen = ["127.0.0.1:{port}"]\nadmin = {admin_line}\nworkers = 1\n[[pool]]\nname = "bench"\n'
            f'[[pool.backend]]\nname = "b1"\naddress = "127.0.0.1:{b1}"\n'
            f'[[pool.backend]]\nname = "b2"\naddress = "127.0.0.1:{b2}"\n'
            f'[[pool.backend]]\nname = "b3"\naddress = "127.0.0.1:{b3}"\n'
        )
        if store:
            f.write(f'[store]\nredis = "redis://127.0.0.1:{store}/0"\nsecret = "instructions.py bench secret"\n')
    if store:
        redis_command(store, "FLUSHALL")
        empty = used_memory(store)
    out = os.path.join(work, f"callgrind.{os.getpid()}.{port}")
    env = dict(os.environ, RUST_LOG="info" if log else "warn")
    log_file = open(os.path.join(work, "tidegate.log"), "wb")
    p = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary, "--config", config],
        stdout=subprocess.DEVNULL,
        stderr=log_file,
        env=env,
    )
    log_file.close()
    did = {}
    try:
        wait_port(port, proc=p)
        if admin:
            wait_port(admin, proc=p)
        send(port, ids, ids, "http-cookie", warm=True)
        before = None
        if admin:
            # One scrape per run if the writer has caught up (it sends within milliseconds of
            # the last reply; valgrind slows it): the same count in every run.
            for _ in range(60):
                time.sleep(1.0)
                before = metrics(admin)
                if not store or before.get('tidegate_store_writes_total{kind="pin"}', 0) >= ids:
                    break
            if store:
                if before.get("tidegate_store_up") != 1:
                    sys.exit("the store is not up after the warm-up")
                written = before.get('tidegate_store_writes_total{kind="pin"}', 0)
                dbsize = redis_command(store, "DBSIZE")
                if written < ids or dbsize < ids:
                    sys.exit(f"the taught pins did not reach Redis: {written:.0f} written, DBSIZE {dbsize}")
        if requests:
            send(port, requests, ids, variant)
        if admin:
            after = metrics(admin)
            if store:
                b = store_counts(before)
                did = {k: v - b.get(k, 0) for k, v in store_counts(after).items() if v - b.get(k, 0)}
                did["DBSIZE"] = redis_command(store, "DBSIZE")
                # Redis's memory for the pins tidegate wrote in this run (the cross-check of
                # store-memory.py's bytes per pin).
                did["used_memory delta per key"] = (used_memory(store) - empty) / max(did["DBSIZE"], 1)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    text = open(out).read()
    if keep:
        # For callgrind_annotate: named by side and variant (0 requests: the warm-up alone).
        shutil.move(out, os.path.join(keep, f"callgrind.{keep_name(binary, store, variant if requests else 'warm-up', log)}"))
    else:
        os.remove(out)
    m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    return int(m.group(1)), did


def keep_name(binary, store, variant, log):
    """A file name for one run's callgrind output."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.relpath(binary))
    return f"{name}.{'store-on' if store else 'store-off'}.{'log-on' if log else 'log-off'}.{variant}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--ids", type=int, default=100)
    ap.add_argument("--variants", default="http-cookie http-query http-close")
    ap.add_argument(
        "--store",
        choices=("off", "new", "both"),
        default="off",
        help="which side runs with a [store] pointing at a redis-server started here (default off)",
    )
    ap.add_argument(
        "--log",
        choices=("off", "new", "both"),
        default="off",
        help="which side runs with its access log on (RUST_LOG=info, to a file; default off)",
    )
    ap.add_argument("--keep", metavar="DIR", help="keep each run's callgrind output in DIR (for callgrind_annotate)")
    a = ap.parse_args()
    # valgrind looks a name without a slash up in PATH.
    a.old, a.new = os.path.abspath(a.old), os.path.abspath(a.new)
    if a.keep:
        os.makedirs(a.keep, exist_ok=True)
    tools = ["valgrind", "nginx"] + (["redis-server"] if a.store != "off" else [])
    for tool in tools:
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (apt-get install {tool})")
    work = tempfile.mkdtemp(prefix="tidegate-instructions.")
    ports = [free_port() for _ in range(3)]
    os.makedirs(os.path.join(work, "tmp"))
    render(
        os.path.join(HERE, "backends.conf.in"),
        os.path.join(work, "backends.conf"),
        {"WORK": work, "B1": ports[0], "B2": ports[1], "B3": ports[2], "BODY": "<html><body>" + "x" * 480 + "</body></html>"},
    )
    started = []
    nginx = subprocess.Popen(
        ["nginx", "-e", os.path.join(work, "nginx.err"), "-p", work, "-c", os.path.join(work, "backends.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started.append(nginx)
    redis_port = None
    try:
        for p in ports:
            wait_port(p)
        if a.store != "off":
            redis_port = free_port()
            started.append(
                subprocess.Popen(
                    ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", work, "--daemonize", "no"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            wait_port(redis_port)
            version = re.search(r"redis_version:(\S+)", redis_command(redis_port, "INFO", "server")).group(1)
        # (binary, store port or None) for each side.
        sides = {
            "old": (a.old, redis_port if a.store == "both" else None),
            "new": (a.new, redis_port if a.store != "off" else None),
        }
        logged = {"old": a.log == "both", "new": a.log != "off"}
        label = {
            s: ((" (store on)" if port else " (store off)") if a.store != "off" else "")
            + ((" (log on)" if logged[s] else " (log off)") if a.log != "off" else "")
            for s, (_, port) in sides.items()
        }
        admin_on = a.store != "off"
        what = f"; store: redis-server {version} on 127.0.0.1" if redis_port else ""
        print(f"### Instructions per request (callgrind; {a.requests} requests after {a.ids} pins taught; warm-up alone subtracted{what})\n")
        print(f"- old: {a.old}{label['old']}\n- new: {a.new}{label['new']}\n")
        print(f"| variant | old{label['old']} | new{label['new']} | new ÷ old |")
        print("| --- | ---: | ---: | ---: |")
        base = {
            s: run(b, work, ports, "http-cookie", 0, a.ids, admin_on, st, a.keep, logged[s])[0]
            for s, (b, st) in sides.items()
        }
        notes = []
        for v in a.variants.split():
            per = {}
            for s, (b, st) in sides.items():
                total, did = run(b, work, ports, v, a.requests, a.ids, admin_on, st, a.keep, logged[s])
                per[s] = (total - base[s]) / a.requests
                if st:
                    counts = ", ".join(f"{k.replace('tidegate_store_', '').replace('_total', '')} {n:.0f}" for k, n in sorted(did.items()))
                    notes.append(f"- {v}, {s} side: during the measured requests the store did {counts}")
            print(f"| {v} | {per['old']:.0f} | {per['new']:.0f} | {per['new'] / per['old']:.3f} |", flush=True)
        if notes:
            print()
            print("\n".join(notes))
    finally:
        for p in reversed(started):
            p.terminate()
            p.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
