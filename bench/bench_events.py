#!/usr/bin/env python3
"""Benchmark: the watch daemon's address-event path - `ip addr del` to "VIP left"
logged, and what the daemon costs idle - for two checkouts side by side.

Run as root from the checkout:
    .venv/bin/python bench/bench_events.py [--tree before=/path/to/other/checkout] [--rounds 20]
        [--idle-seconds 20] [--json]

Each tree (this checkout is "this"; --tree adds others, e.g. an export of main)
gets its own namespace `nfsr-<pid>-<n>` with lo only and four documentation
VIPs on it as /32, and runs `nfsreset watch --no-bpf --dry-run` there with the
venv's python and that tree first on sys.path. Rounds alternate between the
trees, so load on the machine falls on both alike.

latency - a `ip -batch -` kept running in the namespace gets the delete(s) on
its stdin (no process start inside the measure); t0 is taken just before the
write, t1 when the daemon's "VIP left" line reaches this process. "one": one
VIP deleted; "four": four VIPs deleted in one write (t1: the last "left").
The VIPs are added back and their "arrived" awaited between rounds.
start - exec to "ready" (includes every import the daemon does before it).
idle - on-CPU time of all its threads (schedstat) and VmRSS over --idle-seconds,
after the rounds and 2 s of quiet.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
PY = os.path.join(ROOT, ".venv", "bin", "python")
VIPS = ("198.51.100.10", "198.51.100.11", "198.51.100.12", "198.51.100.13")
READY_TIMEOUT_S = 30.0
EVENT_TIMEOUT_S = 5.0
LAUNCH = "import sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'nfsreset'; " \
         "from nfsreset.cli.main import main; main()"


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class Node:
    """One namespace, one daemon from `tree`, one `ip -batch -` writer."""

    def __init__(self, name: str, tree: str, ns: str):
        self.name, self.tree, self.ns = name, tree, ns
        self.state = tempfile.mkdtemp(prefix="nfsr-bench-events-")
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.daemon = self.batch = None
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        for v in VIPS:
            run("ip", "-n", ns, "addr", "add", f"{v}/32", "dev", "lo")
        args = ["watch", "--no-bpf", "--dry-run", "--state-dir", self.state]
        for v in VIPS:
            args += ["--vip", v]
        t = time.monotonic()
        self.daemon = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", LAUNCH, tree, *args],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.start_s = self.wait(r" ready: ", t, READY_TIMEOUT_S) - t
        self.batch = subprocess.Popen(["ip", "-n", ns, "-batch", "-"], stdin=subprocess.PIPE, text=True,
                                      stdout=subprocess.DEVNULL)

    def _read(self) -> None:
        for line in self.daemon.stderr:
            with self.cond:
                self.lines.append((time.monotonic(), line.rstrip()))
                self.cond.notify_all()

    def wait(self, pattern: str, since: float, timeout: float) -> float:
        """Time of the first line matching `pattern` that arrived after `since`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, line in self.lines:
                    if t >= since and rx.search(line):
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{self.name}: no {pattern!r} in {timeout} s: "
                                       f"{[(round(t - since, 3), ln) for t, ln in self.lines[-14:]]}")
                self.cond.wait(left)

    def ip(self, cmds: list[str]) -> float:
        t0 = time.monotonic()
        self.batch.stdin.write("".join(c + "\n" for c in cmds))
        self.batch.stdin.flush()
        return t0

    def round(self, vips) -> float:
        t0 = self.ip([f"addr del {v}/32 dev lo" for v in vips])
        t1 = max(self.wait(rf"\b{re.escape(v)} left", t0, EVENT_TIMEOUT_S) for v in vips)
        t2 = self.ip([f"addr add {v}/32 dev lo" for v in vips])
        for v in vips:
            self.wait(rf"\b{re.escape(v)} arrived", t2, EVENT_TIMEOUT_S)
        return t1 - t0

    def idle(self, seconds: float) -> dict:
        pid = self.daemon.pid   # `ip netns exec` execs: the daemon's own pid
        a, t = cpu_ns(pid), time.monotonic()
        time.sleep(seconds)
        b, dt = cpu_ns(pid), time.monotonic() - t
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        return {"cpu_ms_per_s": (b - a) / 1e6 / dt, "rss_mb": rss / 1024}

    def close(self) -> None:
        for p in (self.batch, self.daemon):
            if p is not None and p.poll() is None:
                if p is self.batch:
                    p.stdin.close()
                else:
                    p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)
        subprocess.run(["rm", "-rf", self.state], timeout=30)


def cpu_ns(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], help="NAME=PATH of another checkout")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    trees = [tuple(t.split("=", 1)) for t in a.tree] + [("this", ROOT)]
    nodes: list[Node] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    out: dict = {}
    try:
        for i, (name, path) in enumerate(trees):
            nodes.append(Node(name, os.path.abspath(path), f"nfsr-{os.getpid()}-{i}"))
        res = {n.name: {"one": [], "four": []} for n in nodes}
        for r in range(a.rounds):
            for n in nodes:
                res[n.name]["one"].append(n.round(VIPS[:1]))
                res[n.name]["four"].append(n.round(VIPS))
        time.sleep(2.0)
        for n in nodes:
            out[n.name] = {"start_s": n.start_s, **n.idle(a.idle_seconds),
                           **{f"{k}_ms_median": statistics.median(v) * 1000 for k, v in res[n.name].items()},
                           **{f"{k}_ms_max": max(v) * 1000 for k, v in res[n.name].items()}}
    finally:
        for n in nodes:
            n.close()
    if a.json:
        print(json.dumps(out))
    else:
        cols = ("start_s", "one_ms_median", "one_ms_max", "four_ms_median", "four_ms_max", "cpu_ms_per_s", "rss_mb")
        print(f"{'tree':8}" + "".join(f"{c:>16}" for c in cols))
        for name, row in out.items():
            print(f"{name:8}" + "".join(f"{row[c]:16.3f}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
