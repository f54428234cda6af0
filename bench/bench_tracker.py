#!/usr/bin/env python3
"""What the BPF flow tracker costs: the same load without and with it, one run.

    sudo .venv/bin/python bench/bench_tracker.py [--seconds 5] [--rounds 1]

Two loads, each in a namespace of its own (nfsr-<pid>-bench, removed at the
end, also on failure), with the VIP on lo:
- churn: connect / accept / close on VIP:2049 as fast as one process can
  (every connection walks the server socket through ESTABLISHED, CLOSE_WAIT,
  LAST_ACK, CLOSE: an open, two state and a close event per connection);
- rr: 1-byte ping-pong on one connection (every segment hits tcp_probe,
  which refreshes snd_nxt/rcv_nxt of a watched flow).
The load runs in a child process; this process holds the tracker and drains
its ring buffer, as the daemon will. Ratio = rate with / rate without.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

VIP, PORT = "198.51.100.10", 2049


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
    """CPU time of this process (the reader), not of the load's children."""
    t = os.times()
    return t.user + t.system


class _NotDrained:
    """Stands in for the tracker's reader: the ring fills, events count as lost."""

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.5, help="per mode and round (default 2.5)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="interleaved rounds, to average out other load on the machine (default 2)")
    ap.add_argument("--worker", choices=("churn", "rr"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.seconds)
    if os.geteuid() != 0:
        raise SystemExit("needs root (namespaces, BPF)")

    from nfsreset import netns
    from nfsreset.lab.topology import kill_netns, sh
    from nfsreset.tracker import FlowTracker

    ns = f"nfsr-{os.getpid()}-bench"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{VIP}/32", "dev", "lo")
        # Client ports would run out in TIME_WAIT long before 5 s of churn;
        # this namespace keeps none (the server's state walk is unchanged).
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=0")

        t0 = time.monotonic()
        tracker = FlowTracker([PORT], [VIP], [netns.inode_of(ns)])
        load_s = time.monotonic() - t0
        tracker.close()
        print(f"tracker BTF parse + compile + load + attach (first in this process): {load_s:.2f} s")

        inode = netns.inode_of(ns)
        # (label, tracker filters, drain events): the first with-tracker mode is
        # the real one; the others split its cost into kernel and reader.
        modes = [
            ("with tracker, events drained", [PORT], True),
            ("with tracker, not drained (kernel side only)", [PORT], False),
            ("with tracker watching another port", [PORT + 1], True),
        ]
        for kind, unit in (("churn", "connections/s"), ("rr", "round trips/s")):
            totals = [0.0] * (1 + len(modes))
            for r in range(args.rounds):
                rate, _ = run_load(ns, kind, args.seconds)
                totals[0] += rate
                print(f"{kind} round {r + 1}: without tracker: {rate:,.0f} {unit}")
                for i, (label, ports, drain) in enumerate(modes, 1):
                    tracker = FlowTracker(ports, [VIP], [inode])
                    try:
                        cpu0 = _cpu_seconds()
                        rate, events = run_load(ns, kind, args.seconds, tracker if drain else _NotDrained())
                        reader_cpu = _cpu_seconds() - cpu0
                        lost, left = tracker.lost, len(tracker.flows())
                    finally:
                        tracker.close()
                    totals[i] += rate
                    per_event = f" at {reader_cpu / events * 1e6:.1f} us reader CPU each" if events > 1000 else ""
                    print(f"{kind} round {r + 1}: {label}: {rate:,.0f} {unit} "
                          f"({events:,} events read{per_event}, {lost:,} lost, {left} flows left)")
            for i, (label, _p, _d) in enumerate(modes, 1):
                print(f"RATIO {kind} {label}: {totals[i] / totals[0]:.3f}")
    finally:
        kill_netns(ns)


if __name__ == "__main__":
    main()
