#!/usr/bin/env python3
"""Benchmark: FlowKey on its hot paths, this checkout against another, same run.

Run from the checkout (no root, no network):
    .venv/bin/python bench/bench_flowkey.py [--ref main | --tree old=PATH] [-n 10000] [--rounds 7]

Each tree's own nfsreset is imported in a child process (that tree first on
sys.path) and times, on N keys of one VIP: building them, a set of them,
sorting them the way that tree's plan does, a dict lookup of each, and
sockdiag.decode_diag_msg over N synthetic inet_diag messages (the dump's decode,
where keys are made). Rounds alternate between the trees; the median per tree
and the ratio old/new are printed. --ref exports a git ref of this repository
into a temporary directory (git archive), removed on exit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import json, socket, struct, sys, time
sys.path.insert(0, sys.argv[1])
n = int(sys.argv[2])
from nfsreset.core import model, plan
from nfsreset.kernel import sockdiag
FlowKey = model.FlowKey
vip = "198.51.100.10"
args = [(vip, 2049, f"203.0.113.{1 + i % 200}", 1024 + i // 200) for i in range(n)]
order = getattr(model, "key_order", None)          # the dataclass tree sorted with it
def best(fn, reps=5):
    out = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return min(out) * 1000
keys = [FlowKey(*a) for a in args]
import random
rev = keys[:]; random.Random(1).shuffle(rev)
table = dict.fromkeys(keys)
probe = [FlowKey(*a) for a in args]
def msg(i):
    src, dst = socket.inet_pton(2, vip), socket.inet_pton(2, f"203.0.113.{1 + i % 200}")
    return (bytes([2, 1, 0, 0]) + struct.pack(">HH", 2049, 1024 + i // 200) + src.ljust(16, b"\0")
            + dst.ljust(16, b"\0") + struct.pack("=IIIIIIII", 0, i, 0, 0, 0, 0, 0, i))
buf = b"".join(msg(i) for i in range(n))
starts = range(0, len(buf), 72)
res = {
    "build": best(lambda: [FlowKey(*a) for a in args]),
    "set": best(lambda: set(keys)),
    "sort": best(lambda: sorted(rev, key=order) if order else sorted(rev)),
    "lookup": best(lambda: [k in table for k in probe]),
    "decode": best(lambda: [sockdiag.decode_diag_msg(buf, s, 1) for s in starts]),
}
print(json.dumps(res))
'''


def run(tree: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, tree, str(n)], capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--ref", default="main", help="git ref to compare against (default main)")
    ap.add_argument("--tree", help="NAME=PATH of another checkout instead of --ref")
    ap.add_argument("-n", type=int, default=10000, help="keys (default 10000)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds per tree (default 7)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tmp = None
    try:
        if a.tree:
            name, path = a.tree.split("=", 1)
        else:
            tmp = tempfile.mkdtemp(prefix="nfsr-bench-flowkey-")
            arch = subprocess.run(["git", "-C", ROOT, "archive", a.ref, "nfsreset"], capture_output=True,
                                  check=True, timeout=60).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=arch, check=True, timeout=60)
            name, path = a.ref, tmp
        trees = [(name, path), ("this", ROOT)]
        rounds: dict[str, list[dict]] = {t: [] for t, _ in trees}
        for _ in range(max(1, min(a.rounds, 50))):
            for t, p in trees:
                rounds[t].append(run(p, a.n))
        ops = list(rounds["this"][0])
        med = {t: {op: statistics.median(r[op] for r in rs) for op in ops} for t, rs in rounds.items()}
        if a.json:
            print(json.dumps({"n": a.n, "rounds": a.rounds, "median_ms": med,
                              "ratio_old_new": {op: med[name][op] / med["this"][op] for op in ops}}))
            return 0
        print(f"N = {a.n:,}, best of 5 per round, median of {a.rounds} rounds (ms), load {os.getloadavg()[0]:.2f}")
        print(f"{'op':8}{name:>12}{'this':>12}{'old/new':>10}")
        for op in ops:
            print(f"{op:8}{med[name][op]:12.2f}{med['this'][op]:12.2f}{med[name][op] / med['this'][op]:10.2f}")
        return 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
