#!/usr/bin/env python3
"""Benchmark: the `nfsreset kill` hook against `ss -K`, as whole processes, same run.

Run as root from the checkout:
    .venv/bin/python bench/bench_kill.py [--sizes 100 1000 10000] [--repeat 3] [--family 4|6] [--json]

For each N it builds a fresh lab (nfsreset.lab.topology: node1 = server,
client; namespaces `nfsr-<pid>-...`, documentation addresses), opens N
established connections from several client addresses to VIP:2049 (a
wildcard listener on node1, like nfsd), deletes the VIP on node1 - the real
post-stop situation: the sockets stay, the address is gone - and then times,
as a fresh process each:

    ip netns exec NODE1 .venv/bin/nfsreset kill --vip VIP --state-dir TMP --moment post-stop --json
    ip netns exec NODE1 ss -K -tn src VIP            (v6: src [VIP])

each on an identical fresh lab (the quarantine that `kill` leaves must not
touch the next set). After each, `ss -tan state all` in node1 must show no
socket on VIP:2049 (TIME_WAIT is counted apart: aborted sockets never enter
it, so any there would be a finding).

Reported: median wall time of `--repeat` rounds per tool, the ratio
nfsreset/ss (goal <= 1.0 at 10,000), and from nfsreset's --json the
engine's own elapsed_s and the destroy step's ms, so the fixed start-up cost
(interpreter, imports, `ip netns exec`) is visible. The floors printed in
the header are `ip netns exec NS true` and `ip netns exec NS python -c pass`.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import select
import signal
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from nfsreset.kernel import netns  # noqa: E402
from nfsreset.lab.topology import HOST_ADDRS, IFACE, Topology  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from manyconns import (CLIENT, CLIENT_ADDRS, PORT, SERVER, SETUP_TIMEOUT_S, VIPS,  # noqa: E402
                       ClientChild, accept_all, raise_nofile)

VENV = os.path.join(os.path.abspath(ROOT), ".venv", "bin")
TOOL_TIMEOUT_S = 120


# -- the lab ----------------------------------------------------------------------------
class KillLab:
    """One fresh topology with N established, then stale, connections to VIP:2049."""

    def __init__(self, family: int, n: int, n_addrs: int) -> None:
        self.family, self.n = family, n
        self.vip = VIPS[family]
        self.addrs = CLIENT_ADDRS[family][:n_addrs]
        self.topo: Topology | None = None
        self.held: list[socket.socket] = []
        self.child: ClientChild | None = None

    def __enter__(self) -> "KillLab":
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        self.topo = Topology.create(tag="bkill")
        t = self.topo
        for ip in self.addrs:
            if ip not in HOST_ADDRS[CLIENT]:
                t.add_addr(CLIENT, ip, nodad=True)
        t.add_addr(SERVER, self.vip, nodad=True)
        t.run(SERVER, "sysctl", "-qw", "net.core.somaxconn=65535", "net.ipv4.tcp_max_syn_backlog=65535")
        t.run(CLIENT, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
        fam = socket.AF_INET if self.family == 4 else socket.AF_INET6
        with netns.entered(t.ns(SERVER)):
            listener = socket.socket(fam, socket.SOCK_STREAM)
        self.held.append(listener)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", PORT))   # wildcard, like nfsd
        listener.listen(65535)
        listener.setblocking(False)
        self.child = ClientChild(t.ns(CLIENT), self.vip, self.addrs, self.n)
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while len(self.held) - 1 < self.n:
            accept_all(listener, self.held)
            if time.monotonic() > deadline:
                raise RuntimeError(f"accepted {len(self.held) - 1} of {self.n} in {SETUP_TIMEOUT_S} s")
            if self.child.failed():
                raise RuntimeError("client child failed to connect")
            select.select([listener], [], [], 0.05)
        self.child.wait_ready()
        # The post-stop situation: the address is gone, the sockets stay.
        t.del_addr(SERVER, self.vip)
        before = self.vip_sockets()
        if before.get("ESTAB", 0) != self.n:
            raise RuntimeError(f"expected {self.n} ESTAB on {self.vip} after deleting it, saw {dict(before)}")

    def vip_sockets(self) -> collections.Counter:
        """States of node1's sockets whose local side is VIP:2049, as `ss -tan state all` shows them."""
        out = self.topo.run(SERVER, "ss", "-Htan", "state", "all", timeout=60).stdout
        want = {f"{self.vip}:{PORT}", f"[{self.vip}]:{PORT}", f"[::ffff:{self.vip}]:{PORT}"}
        counts: collections.Counter = collections.Counter()
        for line in out.splitlines():
            f = line.split()
            if len(f) >= 5 and f[3] in want and f[0] != "LISTEN":
                counts[f[0]] += 1
        return counts

    def __exit__(self, *exc) -> None:
        if self.child is not None:
            self.child.finish()
            self.child = None
        for s in self.held:
            s.close()
        self.held.clear()
        if self.topo is not None:
            self.topo.destroy()
            self.topo = None


# -- the two tools ------------------------------------------------------------------------
def run_nfsreset(lab: KillLab) -> dict:
    state = tempfile.mkdtemp(prefix="nfsr-bench-state-")
    try:
        argv = lab.topo.exec_argv(SERVER, os.path.join(VENV, "nfsreset"), "kill", "--vip", lab.vip,
                                  "--state-dir", state, "--moment", "post-stop", "--json")
        t0 = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(state, ignore_errors=True)
    try:
        doc = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"nfsreset kill exit {res.returncode}, no JSON: {res.stderr.strip()[-500:]}") from None
    destroy = [s for s in doc["steps"] if s.get("action") == "destroy"]
    return {"wall_s": wall, "exit": res.returncode, "engine_s": doc.get("elapsed_s"),
            "destroy_ms": sum(s.get("ms", 0) for s in destroy),
            "destroyed": sum(s.get("destroyed", 0) for s in destroy),
            "steps": [s.get("action") for s in doc["steps"]],
            "stderr": res.stderr.strip().splitlines()[-3:]}


def run_ss(lab: KillLab) -> dict:
    target = f"[{lab.vip}]" if lab.family == 6 else lab.vip
    argv = lab.topo.exec_argv(SERVER, "ss", "-K", "-tn", "src", target)
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "exit": res.returncode, "stderr": res.stderr.strip().splitlines()[-3:]}


def one_round(family: int, n: int, n_addrs: int, tool: str) -> dict:
    with KillLab(family, n, n_addrs) as lab:
        out = run_nfsreset(lab) if tool == "nfsreset" else run_ss(lab)
        left = lab.vip_sockets()
    out["left"] = sum(v for k, v in left.items() if k != "TIME-WAIT")
    out["left_time_wait"] = left.get("TIME-WAIT", 0)
    out["left_states"] = dict(left)
    return out


def floors(family: int) -> dict:
    """Start-up floors, in a throwaway lab: `ip netns exec NS true` and `... python -c pass`."""
    topo = Topology.create(tag="bkfl")
    try:
        res = {}
        for name, argv in (("ip_netns_exec_true_s", ["true"]),
                           ("ip_netns_exec_python_pass_s", [os.path.join(VENV, "python"), "-c", "pass"])):
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                subprocess.run(topo.exec_argv(SERVER, *argv), check=True, timeout=30)
                times.append(time.perf_counter() - t0)
            res[name] = statistics.median(times)
        return res
    finally:
        topo.destroy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--repeat", type=int, default=3, help="rounds per tool and N (median reported)")
    ap.add_argument("--family", type=int, choices=(4, 6), default=4)
    ap.add_argument("--client-addrs", type=int, default=4, choices=range(1, 9), metavar="1-8",
                    help="client source addresses the connections are spread over")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces)", file=sys.stderr)
        return 2
    if not os.access(os.path.join(VENV, "nfsreset"), os.X_OK):
        print(f"{VENV}/nfsreset not found: run setup.sh", file=sys.stderr)
        return 2
    need = max(args.sizes) + 500
    why = raise_nofile(need)
    if why:
        print(why, file=sys.stderr)
        return 2
    if args.repeat < 1 or args.repeat > 20 or any(not 1 <= n <= 15000 for n in args.sizes):
        print("--repeat 1-20, --sizes 1-15000", file=sys.stderr)
        return 2

    report = {"kernel": os.uname().release, "cpus": os.cpu_count(), "family": args.family,
              "client_addrs": args.client_addrs, "repeat": args.repeat, "floors": floors(args.family),
              "sizes": []}
    fl = report["floors"]
    if not args.json:
        print(f"kernel {report['kernel']}, {report['cpus']} cpus, IPv{args.family}, "
              f"{args.client_addrs} client addresses; floors: `ip netns exec NS true` "
              f"{fl['ip_netns_exec_true_s'] * 1000:.1f} ms, `ip netns exec NS python -c pass` "
              f"{fl['ip_netns_exec_python_pass_s'] * 1000:.1f} ms")
        print(f"{'N':>6} {'nfsreset':>9} {'ss -K':>9} {'ratio':>6} {'engine':>8} {'destroy':>8} "
              f"{'left n/s':>9}   (median of {args.repeat}, seconds; engine = --json elapsed_s, "
              f"destroy = its destroy step)")
    for n in args.sizes:
        rounds = {"nfsreset": [], "ss": []}
        for _ in range(args.repeat):
            # alternate so neither tool always follows the other
            for tool in ("nfsreset", "ss"):
                rounds[tool].append(one_round(args.family, n, args.client_addrs, tool))
        ours, ss = rounds["nfsreset"], rounds["ss"]
        row = {
            "n": n,
            "nfsreset_s": statistics.median(r["wall_s"] for r in ours),
            "ss_s": statistics.median(r["wall_s"] for r in ss),
            "engine_s": statistics.median(r["engine_s"] for r in ours),
            "destroy_ms": statistics.median(r["destroy_ms"] for r in ours),
            "nfsreset_left": max(r["left"] for r in ours),
            "ss_left": max(r["left"] for r in ss),
            "left_time_wait": max(r["left_time_wait"] for r in ours + ss),
            "nfsreset_exit": sorted({r["exit"] for r in ours}),
            "ss_exit": sorted({r["exit"] for r in ss}),
            "nfsreset_destroyed": sorted({r["destroyed"] for r in ours}),
            "rounds": rounds,
        }
        row["ratio"] = row["nfsreset_s"] / row["ss_s"]
        report["sizes"].append(row)
        if not args.json:
            print(f"{n:>6} {row['nfsreset_s']:>9.4f} {row['ss_s']:>9.4f} {row['ratio']:>6.2f} "
                  f"{row['engine_s']:>8.4f} {row['destroy_ms'] / 1000:>8.4f} "
                  f"{row['nfsreset_left']:>4}/{row['ss_left']:<4}", flush=True)
            problems = [f"nfsreset exit {row['nfsreset_exit']}" if row["nfsreset_exit"] != [0] else "",
                        f"ss exit {row['ss_exit']}" if row["ss_exit"] != [0] else "",
                        f"nfsreset destroyed {row['nfsreset_destroyed']} of {n}"
                        if row["nfsreset_destroyed"] != [n] else "",
                        f"{row['left_time_wait']} TIME-WAIT left" if row["left_time_wait"] else ""]
            for p in filter(None, problems):
                print(f"       ! {p}", flush=True)
    if args.json:
        print(json.dumps(report))
    return 0 if all(r["nfsreset_left"] == 0 and r["ss_left"] == 0 for r in report["sizes"]) else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt    # run the finally blocks: namespaces, children, temp dirs


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    sys.exit(main())
