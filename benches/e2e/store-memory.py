#!/usr/bin/env python3
"""Bytes per pin in Redis, for sizing the shared store (issue 13).

    benches/e2e/store-memory.py                      # N = 100 000 and 1 000 000
    benches/e2e/store-memory.py --pins 100000 --pins 1000000 --pins 5000000

Starts its own redis-server on a free 127.0.0.1 port (`--save '' --appendonly no`; stopped by
its pid at the end) and, for each N, from an empty database: reads `INFO memory` used_memory,
writes N pins of the shape tidegate writes (key `tidegate:pin:app:` and 32 lowercase hex
digits, value `<unix seconds>:img<k>` such as `1795994196:img2`, `SET key value EX 1800`)
pipelined over one connection in batches of 10 000, reads used_memory again and prints the
difference divided by N. A pin's keys are the AES-128 of its table key in hex, so random hex
digits have their shape and their spread. used_memory counts what the allocator gives Redis
(the key and value objects, the entries and buckets of the main and expiry dictionaries) and
not the allocator's own fragmentation (see used_memory_rss, printed too).
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

BATCH = 10_000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.file = self.sock.makefile("rb")

    def send(self, *commands):
        out = []
        for args in commands:
            out.append(f"*{len(args)}\r\n")
            for a in args:
                a = str(a)
                out.append(f"${len(a)}\r\n{a}\r\n")
        self.sock.sendall("".join(out).encode())

    def reply(self):
        line = self.file.readline().decode().rstrip("\r\n")
        kind, rest = line[:1], line[1:]
        if kind == "+":
            return rest
        if kind == "-":
            sys.exit(f"redis: {line}")
        if kind == ":":
            return int(rest)
        if kind == "$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2].decode()
        sys.exit(f"redis: unexpected reply {line!r}")

    def call(self, *args):
        self.send(args)
        return self.reply()


def memory(r):
    info = r.call("INFO", "memory")
    get = lambda k: int(re.search(rf"^{k}:(\d+)", info, re.M).group(1))  # noqa: E731
    return get("used_memory"), get("used_memory_rss")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pins", type=int, action="append", help="N (repeatable; default 100000 and 1000000)")
    a = ap.parse_args()
    sizes = a.pins or [100_000, 1_000_000]
    if not shutil.which("redis-server"):
        sys.exit("redis-server is needed (apt-get install redis-server)")
    work = tempfile.mkdtemp(prefix="tidegate-store-memory.")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", work, "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                r = Redis(port)
                r.call("PING")
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit("redis-server did not start")
                time.sleep(0.1)
        version = re.search(r"redis_version:(\S+)", r.call("INFO", "server")).group(1)
        allocator = re.search(r"mem_allocator:(\S+)", r.call("INFO", "memory")).group(1)
        print(f"### Bytes per pin in Redis {version} ({allocator}; SET tidegate:pin:app:<32 hex> <unix s>:img<k> EX 1800)\n")
        print("| pins | used_memory before | after | bytes per pin | used_memory_rss growth per pin | DBSIZE | load s |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        now = int(time.time())
        for n in sizes:
            r.call("FLUSHALL")
            time.sleep(1.5)
            before, rss_before = memory(r)
            started = time.time()
            sent = 0
            while sent < n:
                k = min(BATCH, n - sent)
                r.send(
                    *(
                        ("SET", f"tidegate:pin:app:{os.urandom(16).hex()}", f"{now - (i % 1800)}:img{i % 4 + 1}", "EX", 1800)
                        for i in range(sent, sent + k)
                    )
                )
                for _ in range(k):
                    if r.reply() != "OK":
                        sys.exit("a SET was refused")
                sent += k
            took = time.time() - started
            # used_memory_rss is sampled by Redis's cron, and idle client buffers shrink in it.
            time.sleep(1.5)
            after, rss_after = memory(r)
            keys = r.call("DBSIZE")
            print(
                f"| {n:,} | {before:,} | {after:,} | {(after - before) / n:.1f} | "
                f"{(rss_after - rss_before) / n:.1f} | {keys:,} | {took:.1f} |".replace(",", " "),
                flush=True,
            )
        r.call("FLUSHALL")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
