#!/usr/bin/env python3
"""Connection churn on port 2049 with the BPF flow tracker attached vs not, phase by phase.

    sudo .venv/bin/python bench/bench_churn.py [--loads lo net] [--pairs 40] [--phase 0.5]
        [--clients 2] [--json]

bench_tracker.py starts a fresh load for every run and compares runs a few
seconds apart; on this VM single runs of the same load spread by 5-10%, so a
ratio needs dozens of runs to settle to 1%. Here ONE load runs for the whole
measurement and the tracker, loaded once, is switched phase after phase
(`FlowTracker.set_attached`: detach/attach of the two programs, maps and
reader kept):

    D W D O D W D O ...     (the order of W and O alternates at random)

- D: detached, the kernel runs no program (the baseline);
- W: attached, watching 2049 (the tracker as the daemon runs it; its reader
  drains the ring as the daemon does, poll(100) and wakeups);
- O: attached, watching 2050 only: what the filter costs every TCP state
  change of the host, the floor under W.

Each W or O phase is divided by the mean of the D phases either side of it;
reported are the median and the quartiles of those ratios. Connections are
counted by the kernel: PassiveOpens of the load's namespace
(/proc/<pid>/net/snmp of a process in it), so the load itself reports
nothing while it runs. A phase starts SETTLE_S after the switch (a detach
waits for an RCU grace period; the first connections of a phase would
straddle it).

Loads (bench_tracker.py has their details): lo = one process connects to the
VIP on lo, accepts, closes both ends, in a loop (the worst case: a
connection costs ~17 us in all); net = a server namespace (server pinned to
CPU 0, closes first) and a client namespace (clients pinned to CPU 1) joined
by a veth pair, like the lab.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_tracker as BT  # noqa: E402  (the loads and their workers)

SETTLE_S = 0.05
OTHER_PORT = BT.PORT + 1
LOAD_SLACK_S = 20       # the load runs this much longer than the phases need


class PassiveOpens:
    """Connections accepted in the namespace of process `pid`, read from its
    /proc/<pid>/net/snmp (which shows that process's namespace)."""

    def __init__(self, pid: int):
        self._f = open(f"/proc/{pid}/net/snmp")
        self._col = None

    def read(self) -> int:
        self._f.seek(0)
        rows = [ln.split() for ln in self._f if ln.startswith("Tcp:")]
        if self._col is None:
            self._col = rows[0].index("PassiveOpens")
        return int(rows[1][self._col])

    def close(self) -> None:
        self._f.close()


class Phases:
    """Switches the tracker between D, W and O; one switch per phase."""

    def __init__(self, tracker):
        self.tr = tracker
        self.ports = tracker._bpf[b"ports"]   # O is W with the watched port moved

    def set(self, phase: str) -> None:
        import ctypes
        if phase == "D":
            self.tr.set_attached(False)
            return
        watched, other = (1, 0) if phase == "W" else (0, 1)
        self.ports[ctypes.c_int(BT.PORT)] = ctypes.c_uint8(watched)
        self.ports[ctypes.c_int(OTHER_PORT)] = ctypes.c_uint8(other)
        self.tr.set_attached(True)


def start_load(load, seconds: float) -> tuple[list[subprocess.Popen], int]:
    """The load's processes, started to run `seconds`, and the pid to count in."""
    if isinstance(load, BT.NetLoad):
        server = load.start_server()
        try:
            clients = load.start_clients(seconds, stdout=subprocess.DEVNULL)
        except BaseException:
            stop_load([server])
            raise
        time.sleep(BT.START_MARGIN_S + 0.2)
        # clients first: stop_load kills in this order, and a client whose
        # server died first prints a connection error
        return [*clients, server], server.pid
    proc = load.start(seconds, stdout=subprocess.DEVNULL)
    time.sleep(0.3)                     # listening and connecting by then
    return [proc], proc.pid


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def measure(load, inode: int, pairs: int, phase_s: float, say) -> dict:
    from nfsreset.flows.tracker import FlowTracker

    order = []
    rng = random.Random(2049)
    for _ in range(pairs):
        first, second = rng.sample(["W", "O"], 2)
        order += ["D", first, "D", second]
    order.append("D")
    total = len(order) * (phase_s + SETTLE_S + 0.02) + LOAD_SLACK_S
    tracker = FlowTracker([BT.PORT], [BT.VIP], [inode])
    procs = []
    try:
        phases = Phases(tracker)
        phases.set("D")
        procs, pid = start_load(load, total)
        counter = PassiveOpens(pid)
        rates, reader = [], {"W": 0.0, "O": 0.0, "D": 0.0}
        t_start = time.monotonic()
        for label in order:
            phases.set(label)
            end = time.monotonic() + SETTLE_S
            while (left := end - time.monotonic()) > 0:
                tracker.poll(int(left * 1000) + 1)
            c0, t0, cpu0 = counter.read(), time.monotonic(), time.process_time()
            end = t0 + phase_s
            while (left := end - time.monotonic()) > 0:
                tracker.poll(min(100, int(left * 1000) + 1))
            c1, t1 = counter.read(), time.monotonic()
            reader[label] += time.process_time() - cpu0
            rates.append((label, (c1 - c0) / (t1 - t0), c1 - c0))
            if any(p.poll() is not None for p in procs):
                raise SystemExit(f"the {load.kind} load ended during the measurement")
        elapsed = time.monotonic() - t_start
        lost = tracker.lost
        counter.close()
    finally:
        stop_load(procs)
        tracker.close()
    ratios = {"W": [], "O": []}
    for i, (label, rate, _n) in enumerate(rates):
        if label in ratios:
            ratios[label].append(rate / ((rates[i - 1][1] + rates[i + 1][1]) / 2))
    conns = {lab: sum(n for l2, _r, n in rates if l2 == lab) for lab in "DWO"}
    out = {"baseline_rate_median": statistics.median(r for lab, r, _n in rates if lab == "D"),
           "phases": len(rates), "elapsed_s": elapsed, "lost": lost, "modes": {}}
    for label, name in (("W", "tracker"), ("O", "other port")):
        rs = sorted(ratios[label])
        q = statistics.quantiles(rs, n=4)
        out["modes"][name] = {"ratio_median": statistics.median(rs), "q1": q[0], "q3": q[2],
                              "min": rs[0], "max": rs[-1], "phases": len(rs),
                              "reader_us_per_conn": reader[label] / max(conns[label], 1) * 1e6}
        say(f"{load.kind}: {name}: median {statistics.median(rs):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f}, "
            f"{len(rs)} phases)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", nargs="+", choices=("lo", "net"), default=["lo", "net"])
    ap.add_argument("--pairs", type=int, default=40, help="D-W-D-O cycles per load (default 40)")
    ap.add_argument("--phase", type=float, default=0.5, help="seconds counted per phase (default 0.5)")
    ap.add_argument("--clients", type=int, default=2, help="net: client processes (default 2)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (namespaces, BPF)")
    if args.pairs < 2 or args.phase <= 0 or args.clients < 1:
        raise SystemExit("--pairs must be >= 2, --phase > 0, --clients >= 1")

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    result = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "loadavg": os.getloadavg()},
              "pairs": args.pairs, "phase_s": args.phase, "loads": {}}
    for kind in args.loads:
        load = BT.NetLoad(args.clients) if kind == "net" else BT.LoLoad("churn")
        try:
            inode = load.setup()
            result["loads"][kind] = measure(load, inode, args.pairs, args.phase, say)
        finally:
            load.teardown()
    result["machine"]["loadavg_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"\nload average {result['machine']['loadavg'][0]:.2f} before, "
          f"{result['machine']['loadavg_after'][0]:.2f} after; {args.pairs} cycles of {args.phase} s phases")
    for kind, r in result["loads"].items():
        print(f"\n{kind}: detached {r['baseline_rate_median']:,.0f} connections/s (median phase), "
              f"{r['phases']} phases in {r['elapsed_s']:.0f} s, {r['lost']} lost")
        print(f"{'attached':<12} {'ratio':>6} {'quartiles':>13} {'min-max':>13} {'reader us/conn':>15}")
        for name, m in r["modes"].items():
            print(f"{name:<12} {m['ratio_median']:>6.3f} {m['q1']:>6.3f}-{m['q3']:<6.3f} "
                  f"{m['min']:>6.3f}-{m['max']:<6.3f} {m['reader_us_per_conn']:>15.2f}")
            print(f"RATIO {kind} {name}: {m['ratio_median']:.3f}")


if __name__ == "__main__":
    main()
