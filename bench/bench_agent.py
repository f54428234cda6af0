#!/usr/bin/env python3
"""Benchmark: what ocf:nfsreset:IPaddr2nfs adds to IPaddr2's stop and start under a real Pacemaker.

Run as root from the checkout (corosync + pacemaker + resource-agents installed):
    .venv/bin/python bench/bench_agent.py [--moves 6] [--rounds 1] [--family 4|6] [--json]

Each round builds the lab's two-node Corosync + Pacemaker cluster twice, side
by side in two labs, the same way `nfsreset lab --mover pacemaker,pacemaker-ocf`
does (sim server on both heads, the lab client talking to the VIP, one state
dir per head):
    pacemaker      the VIP as plain ocf:heartbeat:IPaddr2: the baseline
    pacemaker-ocf  the VIP as ocf:nfsreset:IPaddr2nfs (cli/ocf/nfsreset)
and moves the VIP back and forth --moves times with `crm_resource --move`
(node1 -> node2, back, ...). Per move it takes pacemaker-execd's execution
time of the stop and of the start ("exited with status 0 (execution time
75ms)"), and the client's first reply after the VIP was usable. The moves
alternate between the two clusters (baseline, agent, baseline ...), --pause
seconds apart (the previous move's background work, IPaddr2's send_arp and
the agent's tickle, is over by then), so a change of the machine's load
hits both; --rounds N repeats it with fresh clusters.

Printed: median (and range) of stop and start per agent, the agent's median
minus IPaddr2's median, the first failover's usable-to-first-reply of each
(IPaddr2: the client's own retransmission; the agent: tickled from the list
its stop published), and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nfsreset.lab import mover_pacemaker  # noqa: E402
from nfsreset.lab.remedies import Remedy  # noqa: E402
from nfsreset.lab.run import _Run  # noqa: E402

MOVERS = ("pacemaker", "pacemaker-ocf")
OLD = "pacemaker-ocf-old"     # --old-agent: another copy of the agent, e.g. main's


def interleaved(family: int, moves: int, cap: float, pause: float, log, old_agent: str | None) -> list[dict]:
    """Both clusters up at once; their moves alternate (baseline, agent, baseline
    ...), `pause` s apart, so both see the same load. Per move stop_s,
    start_s, usable_to_first_reply."""
    labels = [*MOVERS, OLD] if old_agent else list(MOVERS)
    runs = {m: _Run(family, cap, Remedy(), 180.0, 1.0, lambda *_: None, None, log, 1.0, 0.2,
                    mover=m if m != OLD else "pacemaker-ocf", server="sim", vers="echo", crash=False,
                    state="per-head") for m in labels}
    out = {m: [] for m in labels}
    repo_agent = mover_pacemaker.REPO_AGENT
    try:
        for label, run in runs.items():
            # the cluster binds mover_pacemaker.REPO_AGENT into its nodes when it is built
            mover_pacemaker.REPO_AGENT = old_agent if label == OLD else repo_agent
            try:
                run.begin()
            finally:
                mover_pacemaker.REPO_AGENT = repo_agent
        here, there = "node1", "node2"
        for i in range(moves):
            for mover, run in runs.items():
                time.sleep(pause)    # the previous move's background work (send_arp, the tickle) is done
                d = run.move("failover" if i == 0 else f"move{i + 1}", here, there)
                out[mover].append({"stop_s": d.stop_s, "start_s": d.start_s,
                                   "usable_to_first_reply": d.usable_to_first_reply, "recovered": d.recovered})
            here, there = there, here
    finally:
        for run in runs.values():
            run.teardown()
    return [{"mover": m, "moves": out[m]} for m in labels]


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--moves", type=int, default=6, help="moves per cluster (default 6)")
    ap.add_argument("--rounds", type=int, default=1, help="baseline/agent cluster pairs (default 1)")
    ap.add_argument("--family", type=int, choices=(4, 6), default=4)
    ap.add_argument("--cap", type=float, default=3.0, help="longest wait for the client per move (s)")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between two moves (default 2)")
    ap.add_argument("--old-agent", metavar="PATH",
                    help="a third cluster with this copy of the agent (e.g. `git show main:cli/ocf/nfsreset`)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    if not 1 <= a.moves <= 40 or not 1 <= a.rounds <= 10:
        print("bench_agent: --moves 1-40 and --rounds 1-10", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench_agent: needs root (network namespaces, a cluster)", file=sys.stderr)
        return 2
    log = (lambda m: print(m, file=sys.stderr)) if a.verbose else (lambda _m: None)
    load0 = os.getloadavg()
    runs = []
    for r in range(a.rounds):
        t = time.monotonic()
        runs += interleaved(a.family, a.moves, a.cap, a.pause, log, a.old_agent)
        if not a.json:
            print(f"round {r + 1}: {a.moves} moves per agent in {time.monotonic() - t:.0f} s", file=sys.stderr)
    load1 = os.getloadavg()
    summary = {}
    labels = [*MOVERS, OLD] if a.old_agent else list(MOVERS)
    for mover in labels:
        moves = [m for run in runs if run["mover"] == mover for m in run["moves"]]
        firsts = [run["moves"][0]["usable_to_first_reply"] for run in runs if run["mover"] == mover]
        summary[mover] = {
            "stop_s": [m["stop_s"] for m in moves], "start_s": [m["start_s"] for m in moves],
            "stop_median": _med(m["stop_s"] for m in moves), "start_median": _med(m["start_s"] for m in moves),
            "first_failover_usable_to_first_reply": firsts,
            "usable_to_first_reply_median": _med(m["usable_to_first_reply"] for m in moves),
            "not_recovered": sum(not m["recovered"] for m in moves),
        }
    base, agent = summary["pacemaker"], summary["pacemaker-ocf"]
    over = {k: (agent[k] - base[k]) if None not in (agent[k], base[k]) else None
            for k in ("stop_median", "start_median")}
    if a.old_agent:
        over["old"] = {k: summary[OLD][k] - base[k] for k in ("stop_median", "start_median")}
    doc = {"family": a.family, "moves": a.moves, "rounds": a.rounds, "load_before": load0, "load_after": load1,
           "summary": summary, "agent_over_ipaddr2": over, "runs": runs}
    if a.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"IPv{a.family}, {a.rounds} x {a.moves} moves per agent, pacemaker-execd execution times; "
          f"load {load0[0]:.2f} -> {load1[0]:.2f}")
    print(f"{'':24s}{'stop median (range)':>28s}{'start median (range)':>28s}")
    names = [("pacemaker", "IPaddr2"), ("pacemaker-ocf", "IPaddr2nfs")] + ([(OLD, "IPaddr2nfs (old)")]
                                                                          if a.old_agent else [])
    for mover, label in names:
        s = summary[mover]
        rng = lambda xs: f"{min(x for x in xs if x is not None):.3f}-{max(x for x in xs if x is not None):.3f}"  # noqa: E731
        print(f"{label:24s}{s['stop_median']:>10.3f} s ({rng(s['stop_s'])}){s['start_median']:>10.3f} s "
              f"({rng(s['start_s'])})")
    print(f"{'agent over IPaddr2':24s}{over['stop_median']:>+10.3f} s{'':15s}{over['start_median']:>+10.3f} s")
    if a.old_agent:
        print(f"{'old agent over IPaddr2':24s}{over['old']['stop_median']:>+10.3f} s{'':15s}"
              f"{over['old']['start_median']:>+10.3f} s")
    for mover, label in names:
        s = summary[mover]
        firsts = " ".join("-" if x is None else f"{x:.3f}" for x in s["first_failover_usable_to_first_reply"])
        med = s["usable_to_first_reply_median"]
        print(f"{label}: first failover usable -> 1st reply {firsts} s; all moves median "
              f"{'-' if med is None else f'{med:.3f} s'}; no reply within the cap: {s['not_recovered']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
