#!/usr/bin/env python3
"""Instructions per request, counted by callgrind: an A/B that the machine's noise cannot move.

    benches/e2e/instructions.py OLD_BINARY NEW_BINARY [--requests N] [--ids K]

Each binary serves the e2e benchmark's pool (three nginx backends from backends.conf.in, one
worker thread, no access log) under `valgrind --tool=callgrind`. The pins are taught first (K
session ids, as the e2e warm-up does), then N requests are sent per variant over keep-alive
(`http-cookie`: the id in a cookie; `http-query`: in `_s`) and over a new connection each
(`http-close`). A run with the warm-up alone is subtracted, so what is left is what N requests
cost. Instruction counts repeat to a fraction of a percent for the same binary and inputs,
whatever else the machine does; they weigh every instruction alike (a cache miss costs no
more than an add), so read them beside the CPU-time A/B of ab.sh, not instead of it.
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


def wait_port(port, limit=60.0):
    deadline = time.time() + limit
    while time.time() < deadline:
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
    """n requests; ids cycle. Keep-alive unless http-close."""
    conn = None
    for i in range(n):
        sid = f"S{i % ids:015d}"
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


def run(binary, work, backends, variant, requests, ids):
    """Total instructions of one process: warm-up, then `requests` requests of `variant`."""
    port = free_port()
    config = os.path.join(work, "tidegate.toml")
    b1, b2, b3 = backends
    with open(config, "w") as f:
        f.write(
            f'listen = ["127.0.0.1:{port}"]\nadmin = "off"\nworkers = 1\n[[pool]]\nname = "bench"\n'
            f'[[pool.backend]]\nname = "b1"\naddress = "127.0.0.1:{b1}"\n'
            f'[[pool.backend]]\nname = "b2"\naddress = "127.0.0.1:{b2}"\n'
            f'[[pool.backend]]\nname = "b3"\naddress = "127.0.0.1:{b3}"\n'
        )
    out = os.path.join(work, f"callgrind.{os.getpid()}.{port}")
    env = dict(os.environ, RUST_LOG="warn")
    p = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary, "--config", config],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_port(port)
        send(port, ids, ids, "http-cookie", warm=True)
        if requests:
            send(port, requests, ids, variant)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    text = open(out).read()
    os.remove(out)
    m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    return int(m.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--ids", type=int, default=100)
    ap.add_argument("--variants", default="http-cookie http-query http-close")
    a = ap.parse_args()
    for tool in ("valgrind", "nginx"):
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
    nginx = subprocess.Popen(
        ["nginx", "-e", os.path.join(work, "nginx.err"), "-p", work, "-c", os.path.join(work, "backends.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for p in ports:
            wait_port(p)
        print(f"### Instructions per request (callgrind; {a.requests} requests after {a.ids} pins taught; warm-up alone subtracted)\n")
        print("| variant | old | new | new ÷ old |")
        print("| --- | ---: | ---: | ---: |")
        base = {b: run(b, work, ports, "http-cookie", 0, a.ids) for b in (a.old, a.new)}
        for v in a.variants.split():
            per = {}
            for b in (a.old, a.new):
                total = run(b, work, ports, v, a.requests, a.ids)
                per[b] = (total - base[b]) / a.requests
            print(f"| {v} | {per[a.old]:.0f} | {per[a.new]:.0f} | {per[a.new] / per[a.old]:.3f} |", flush=True)
    finally:
        nginx.terminate()
        nginx.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
