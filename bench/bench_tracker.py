#!/usr/bin/env python3
"""What the BPF flow tracker costs: the same load without and with it, one run.

    sudo .venv/bin/python bench/bench_tracker.py [--seconds 1.5] [--rounds 6] [--kinds churn rr]
        [--modes tracker "every change" "not drained" "other port"] [--json]

Two loads, each in a namespace of its own (nfsr-<pid>-bench, removed at the
end, also on failure), with the VIP on lo:
- churn: connect / accept / close on VIP:2049 as fast as one process can
  (every connection walks the server socket through ESTABLISHED, CLOSE_WAIT,
  LAST_ACK, CLOSE);
- rr: 1-byte ping-pong on one connection (every segment hits tcp_probe,
  which refreshes snd_nxt/rcv_nxt of a watched flow).
The load runs in a child process; this process holds the tracker and drains
it with poll(timeout_ms=100), as the daemon does. Modes:
- tracker: FlowTracker as the daemon creates it (the figure that counts);
- every change: coalesce=False, every transition sent and decoded (what the
  folding saves);
- not drained: nobody reads, records past a full ring count as lost (the
  kernel side alone);
- other port: the tracker watches VIP:2050 (what every TCP state change of
  the host pays for the filter).
Each run with a tracker is followed by a run without; its ratio is taken
against the mean of the baseline runs just before and after it, so drift and
other load on the machine (2 cores, shared) weigh on both sides. The order of
the modes changes from round to round. Reported: median ratio and its spread
(min-max) over the rounds, and the reader's CPU per operation.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

VIP, PORT = "198.51.100.10", 2049
MODES = {   # label: (ports watched, drained, FlowTracker keywords)
    "tracker": ([PORT], True, {}),
    "every change": ([PORT], True, {"coalesce": False}),
    "not drained": ([PORT], False, {}),
    "other port": ([PORT + 1], True, {}),
}


def worker(kind: str, seconds: float) -> None:
    """Runs inside the bench namespace; prints how many operations it did."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((VIP, PORT))
    srv.listen(128)
    count = 0
    deadline = time.monotonic() + seconds
    if kind == "churn":
        while time.monotonic() < deadline:
            for _ in range(100):
                c = socket.create_connection((VIP, PORT))
                s, _ = srv.accept()
                c.close()      # client first: the server socket passes CLOSE_WAIT
                s.close()      # and LAST_ACK, like an NFS server whose client went
            count += 100
    else:
        c = socket.create_connection((VIP, PORT))
        s, _ = srv.accept()
        for sock in (c, s):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while time.monotonic() < deadline:
            for _ in range(500):
                c.send(b"q")
                s.recv(1)
                s.send(b"r")
                c.recv(1)
            count += 500
        c.close()
        s.close()
    print(count)


def _cpu_seconds() -> float:
    """CPU time of this process (the reader), not of the load's children
    (os.times() counts in 10 ms ticks: too coarse for a reader at ~1%)."""
    return time.process_time()


class _NotDrained:
    """Stands in for the tracker's reader: the ring fills, records count as lost."""

    def poll(self, timeout_ms):
        time.sleep(timeout_ms / 1000)
        return []


def run_load(ns: str, kind: str, seconds: float, tracker=None) -> tuple[float, int]:
    """(operations per second, events the tracker delivered meanwhile)."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--worker", kind,
         "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True)
    events = 0
    try:
        while proc.poll() is None:
            if tracker is not None:
                events += len(tracker.poll(100))
            else:
                time.sleep(0.05)
        if tracker is not None:
            events += len(tracker.poll(0))
        out, _ = proc.communicate(timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed with exit code {proc.returncode}")
    return int(out) / seconds, events


def measure(ns: str, inode: int, kind: str, seconds: float, rounds: int, modes: list[str], say) -> dict:
    from nfsreset.tracker import FlowTracker

    rng = random.Random(2049)
    runs = {label: [] for label in modes}
    base = [run_load(ns, kind, seconds)[0]]
    for r in range(rounds):
        labels = list(modes)
        rng.shuffle(labels)
        for label in labels:
            ports, drain, kw = MODES[label]
            tracker = FlowTracker(ports, [VIP], [inode], **kw)
            try:
                cpu0 = _cpu_seconds()
                rate, events = run_load(ns, kind, seconds, tracker if drain else _NotDrained())
                reader_cpu = _cpu_seconds() - cpu0
                lost, left = tracker.lost, len(tracker.flows())
            finally:
                tracker.close()
            base.append(run_load(ns, kind, seconds)[0])
            ratio = rate / ((base[-2] + base[-1]) / 2)
            runs[label].append({"rate": rate, "ratio": ratio, "events": events, "lost": lost, "left": left,
                                "reader_us_per_op": reader_cpu / (rate * seconds) * 1e6})
            say(f"{kind} round {r + 1}: {label}: {rate:,.0f}/s, ratio {ratio:.3f} ({events:,} events, "
                f"{lost:,} lost, reader {runs[label][-1]['reader_us_per_op']:.2f} us/op, {left} flows left)")
    out = {"baseline": {"median": statistics.median(base), "min": min(base), "max": max(base), "runs": len(base)},
           "modes": {}}
    for label, rs in runs.items():
        ratios = [x["ratio"] for x in rs]
        out["modes"][label] = {
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rate_median": statistics.median(x["rate"] for x in rs),
            "reader_us_per_op": statistics.median(x["reader_us_per_op"] for x in rs),
            "events": sum(x["events"] for x in rs), "lost": sum(x["lost"] for x in rs),
            "flows_left": max(x["left"] for x in rs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="per run (default 1.5)")
    ap.add_argument("--rounds", type=int, default=6, help="runs per mode and load (default 6)")
    ap.add_argument("--kinds", nargs="+", choices=("churn", "rr"), default=["churn", "rr"])
    ap.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES),
                    help="tracker modes (an older tracker.py takes no keywords: tracker, 'not drained', 'other port')")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    ap.add_argument("--worker", choices=("churn", "rr"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.seconds)
    if os.geteuid() != 0:
        raise SystemExit("needs root (namespaces, BPF)")

    from nfsreset import netns
    from nfsreset.lab.topology import kill_netns, sh
    from nfsreset.tracker import FlowTracker

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    ns = f"nfsr-{os.getpid()}-bench"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{VIP}/32", "dev", "lo")
        # Client ports would run out in TIME_WAIT long before the churn ends;
        # this namespace keeps none (the server's state walk is unchanged).
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=0")
        inode = netns.inode_of(ns)

        t0 = time.monotonic()
        FlowTracker([PORT], [VIP], [inode]).close()
        load_s = time.monotonic() - t0
        say(f"tracker BTF parse + compile + load + attach (first in this process): {load_s:.2f} s")

        result = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                              "loadavg": os.getloadavg()},
                  "seconds": args.seconds, "rounds": args.rounds, "load_s": load_s}
        for kind in args.kinds:
            result[kind] = measure(ns, inode, kind, args.seconds, args.rounds, args.modes, say)
        result["machine"]["loadavg_after"] = os.getloadavg()
    finally:
        kill_netns(ns)

    if args.json:
        print(json.dumps(result, indent=2))
        return
    unit = {"churn": "connections/s", "rr": "round trips/s"}
    print(f"\nload average {result['machine']['loadavg'][0]:.2f} before, "
          f"{result['machine']['loadavg_after'][0]:.2f} after; {args.rounds} rounds of {args.seconds} s")
    for kind in args.kinds:
        b = result[kind]["baseline"]
        print(f"\n{kind}: without tracker {b['median']:,.0f} {unit[kind]} (median of {b['runs']}, "
              f"{b['min']:,.0f}-{b['max']:,.0f})")
        print(f"{'mode':<14} {'ratio':>6} {'min-max':>12} {'reader us/op':>13} {'events':>10} {'lost':>8}")
        for label, m in result[kind]["modes"].items():
            print(f"{label:<14} {m['ratio_median']:>6.3f} {m['ratio_min']:>5.3f}-{m['ratio_max']:<6.3f} "
                  f"{m['reader_us_per_op']:>13.2f} {m['events']:>10,} {m['lost']:>8,}")
            print(f"RATIO {kind} {label}: {m['ratio_median']:.3f}")


if __name__ == "__main__":
    main()
