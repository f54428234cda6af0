#!/usr/bin/env python3
"""What the BPF flow tracker costs: the same load without and with it, one run.

    sudo .venv/bin/python bench/bench_tracker.py [--seconds 1.5] [--rounds 6] [--kinds churn rr net]
        [--modes tracker "every change" "not drained" "other port"] [--clients 2] [--bpf-stats] [--json]

Three loads. churn and rr run in one namespace (nfsr-<pid>-bench) with the
VIP on lo:
- churn: connect / accept / close on VIP:2049 as fast as one process can
  (every connection walks the server socket through ESTABLISHED, CLOSE_WAIT,
  LAST_ACK, CLOSE). The worst case: a connection costs ~17 us in all, so any
  per-connection cost of the tracker weighs the most here;
- rr: 1-byte ping-pong on one connection (every segment hits tcp_probe,
  which refreshes snd_nxt/rcv_nxt of a watched flow).
net is like the lab, an NFS server and its clients on different hosts: two
namespaces (nfsr-<pid>-bsrv with the VIP, nfsr-<pid>-bcli) joined by a veth
pair. A server process pinned to CPU 0 accepts on VIP:2049 and closes at
once; --clients processes pinned to CPU 1 connect, wait for the server's FIN
and close, in a loop. The server closes first because that is how an NFS
server ends idle connections, and because a client that closes first can
reuse a port whose server socket is still in LAST_ACK: its SYN then waits
for the 1 s retry, and the rate jumps about from run to run. The pinning is
there because the scheduler's placement of the three processes decided the
rate more than anything else: unpinned, the baseline alone spread
32k-43k connections/s between runs; pinned, 21k-26k/s. Both namespaces run
on this one kernel, so the tracker's programs also see (and drop at the
port filter) the client's sockets, which a real server does not.
All namespaces are removed at the end, also on failure.

The load runs in child processes; this process holds the tracker and drains
it with poll(timeout_ms=100), as the daemon does. Modes:
- tracker: FlowTracker as the daemon creates it (the figure that counts);
- every change: coalesce=False, every transition sent and decoded (what the
  folding saves);
- not drained: nobody reads, records past a full ring count as lost (the
  kernel side alone);
- other port: the tracker watches VIP:2050 (what every TCP state change of
  the host pays for the filter).
The tracker watches the namespace that holds the VIP (net: the server's).
Each run with a tracker is followed by a run without; its ratio is taken
against the mean of the baseline runs just before and after it, so drift and
other load on the machine (2 cores, shared) weigh on both sides. The order of
the modes changes from round to round. Reported: median ratio and its spread
(min-max) over the rounds, and the reader's CPU per operation (all, and user
time alone). --bpf-stats turns the kernel's BPF stats on for the run (held
by a descriptor: the sysctl is left alone) and adds a figure much less noisy
than the rate: the tracker programs' own run time per operation, from the kernel's
run_time_ns/run_cnt. The stats add ~30 ns of clock reads to every program
run, which is in that figure (and slightly in the ratios).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

VIP, PORT = "198.51.100.10", 2049
NET_CLIENT = "198.51.100.100"
MODES = {   # label: (ports watched, drained, FlowTracker keywords)
    "tracker": ([PORT], True, {}),
    "every change": ([PORT], True, {"coalesce": False}),
    "not drained": ([PORT], False, {}),
    "other port": ([PORT + 1], True, {}),
}
KINDS = ("churn", "rr", "net")
UNIT = {"churn": "connections/s", "rr": "round trips/s", "net": "connections/s"}
OP = {"churn": "connection", "rr": "round trip", "net": "connection"}
# The tracker's programs (bpf/flowtrack.c), as their names contain them.
PROGS = ("inet_sock_set_state", "tcp_probe")
BPF_ENABLE_STATS = 32          # bpf(2) command, Linux >= 5.8
# The net clients start together this long after they are launched (a Python
# start under `ip netns exec` takes ~50 ms, more on a loaded machine).
START_MARGIN_S = 0.3
DRIVE_SLACK_S = 30      # a load still running this long after its end is stuck


# -- the load (children) -----------------------------------------------------------
def worker(kind: str, seconds: float) -> None:
    """churn / rr: runs inside the bench namespace; prints how many operations it did."""
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


def net_server() -> None:
    """net: in the server namespace, until killed. Closes every connection
    at once, before the client does (see the module docstring)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((VIP, PORT))
    srv.listen(1024)
    print("ready", flush=True)
    accept = srv.accept
    while True:
        accept()[0].close()


def net_client(seconds: float, start_at: float) -> None:
    """net: in the client namespace; connects, waits for the server's FIN,
    closes, from start_at (CLOCK_MONOTONIC, the same in every namespace) for
    `seconds`, so that all clients count over one window. Prints the count."""
    late = time.monotonic() - start_at
    if late < 0:
        time.sleep(-late)
    elif late > 0.02:
        print(f"net client started {late * 1000:.0f} ms late", file=sys.stderr)
    deadline = start_at + seconds
    count = 0
    # Plain blocking sockets: a timeout would add a poll() per call. The
    # parent kills a client that hangs.
    while time.monotonic() < deadline:
        for _ in range(50):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.connect((VIP, PORT))
            c.recv(1)          # b"": the server's FIN
            c.close()
        count += 50
    print(count)


def _child_argv(ns: str, cpu: int | None, *args: str) -> list[str]:
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return ["ip", "netns", "exec", ns, *pin, sys.executable, os.path.abspath(__file__), *args]


class _NotDrained:
    """Stands in for the tracker's reader: the ring fills, records count as lost."""

    def poll(self, timeout_ms):
        time.sleep(timeout_ms / 1000)
        return []


def _drive(procs: list[subprocess.Popen], seconds: float, tracker, what: str) -> tuple[list[int], int]:
    """Drains the tracker (if any) until the load's processes exit:
    (the count each printed, events the tracker delivered meanwhile)."""
    events = 0
    deadline = time.monotonic() + seconds + DRIVE_SLACK_S
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise SystemExit(f"{what}: still running {DRIVE_SLACK_S} s after its end")
            if tracker is not None:
                events += len(tracker.poll(100))
            else:
                time.sleep(0.05)
        if tracker is not None:
            events += len(tracker.poll(0))
        outs = [p.communicate(timeout=10)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs if p.returncode]
    if codes:
        raise SystemExit(f"{what} failed with exit code(s) {codes}")
    return [int(o) for o in outs], events


class LoLoad:
    """churn or rr: one worker, client and server in one namespace, the VIP on lo."""

    def __init__(self, kind: str):
        self.kind = kind
        self.ns = f"nfsr-{os.getpid()}-bench"

    def setup(self) -> int:
        """Builds the namespace; returns the inode the tracker is to watch."""
        from nfsreset.kernel import netns
        from nfsreset.lab.topology import sh

        sh("ip", "netns", "add", self.ns)
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{VIP}/32", "dev", "lo")
        # Client ports would run out in TIME_WAIT long before the churn ends;
        # this namespace keeps none (the server's state walk is unchanged).
        sh("ip", "netns", "exec", self.ns, "sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=0")
        return netns.inode_of(self.ns)

    def start(self, seconds: float, stdout=subprocess.PIPE) -> subprocess.Popen:
        """The worker, running `seconds`; it prints its count on stdout."""
        return subprocess.Popen(_child_argv(self.ns, None, "--worker", self.kind, "--seconds", str(seconds)),
                                stdout=stdout, text=True)

    def run(self, seconds: float, tracker) -> tuple[int, int]:
        """(operations, tracker events) of one run."""
        counts, events = _drive([self.start(seconds)], seconds, tracker, f"{self.kind} worker")
        return counts[0], events

    def teardown(self) -> None:
        from nfsreset.lab.topology import kill_netns
        kill_netns(self.ns)


class NetLoad:
    """net: a server namespace with the VIP and a client namespace, one veth
    between them; a fresh server process per run."""

    kind = "net"
    SRV_CPU, CLI_CPU = 0, 1

    def __init__(self, clients: int):
        self.clients = clients
        self.srv, self.cli = f"nfsr-{os.getpid()}-bsrv", f"nfsr-{os.getpid()}-bcli"

    def setup(self) -> int:
        from nfsreset.kernel import netns
        from nfsreset.lab.topology import sh

        if not {self.SRV_CPU, self.CLI_CPU} <= os.sched_getaffinity(0):
            raise SystemExit(f"net pins its server to CPU {self.SRV_CPU} and its clients to CPU {self.CLI_CPU}; "
                             f"this process may run on {sorted(os.sched_getaffinity(0))}")
        for ns in (self.srv, self.cli):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # The server closes first, so its side of every connection would
            # sit in TIME_WAIT for 60 s: at ~20k connections/s the client's
            # 28k ephemeral ports come round within 2 s, and every SYN would
            # meet (and have to recycle) a TIME_WAIT socket of the same
            # tuple, besides the table overflowing. None are kept here; the
            # tracker sees the same transitions (the full socket is closed
            # either way, tcp_done). The client closes second and keeps none
            # anyway; set alike so that no run leaves ports behind.
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=0")
        # Both ends made inside their namespaces: nothing appears on the host.
        sh("ip", "link", "add", "srv0", "netns", self.srv, "type", "veth", "peer", "name", "cli0", "netns", self.cli)
        for ns, dev, addr in ((self.srv, "srv0", VIP), (self.cli, "cli0", NET_CLIENT)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        return netns.inode_of(self.srv)

    def start_server(self) -> subprocess.Popen:
        server = subprocess.Popen(_child_argv(self.srv, self.SRV_CPU, "--worker", "net-server"),
                                  stdout=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([server.stdout], [], [], 10)
            line = server.stdout.readline().strip() if ready else ""
            if line != "ready":
                raise SystemExit(f"net server did not get ready within 10 s (said {line!r}, "
                                 f"exit code {server.poll()})")
        except BaseException:
            server.kill()
            server.wait()
            raise
        return server

    def start_clients(self, seconds: float, stdout=subprocess.PIPE) -> list[subprocess.Popen]:
        """The client processes, counting together from START_MARGIN_S on for
        `seconds` (each prints its count on stdout); none is left running if
        one cannot be started."""
        start_at = time.monotonic() + START_MARGIN_S
        clients = []
        try:
            for _ in range(self.clients):
                clients.append(subprocess.Popen(
                    _child_argv(self.cli, self.CLI_CPU, "--worker", "net-client", "--seconds", str(seconds),
                                "--start-at", repr(start_at)), stdout=stdout, text=True))
        except BaseException:
            for c in clients:
                c.kill()
                c.wait()
            raise
        return clients

    def run(self, seconds: float, tracker) -> tuple[int, int]:
        server = self.start_server()
        try:
            clients = self.start_clients(seconds)
            counts, events = _drive(clients, START_MARGIN_S + seconds, tracker, "net clients")
            if server.poll() is not None:
                raise SystemExit(f"net server ended during the run (exit code {server.returncode})")
        finally:
            if server.poll() is None:
                server.kill()
            server.wait()
        return sum(counts), events

    def teardown(self) -> None:
        from nfsreset.lab.topology import kill_netns
        kill_netns(self.cli)
        kill_netns(self.srv)


def run_load(load, seconds: float, tracker=None) -> tuple[float, int]:
    """(operations per second, events the tracker delivered meanwhile)."""
    ops, events = load.run(seconds, tracker)
    return ops / seconds, events


# -- what the reader and the programs cost -----------------------------------------
def _cpu_seconds() -> float:
    """CPU time of this process (the reader), not of the load's children
    (os.times() counts in 10 ms ticks: too coarse for a reader at ~1%)."""
    return time.process_time()


def _user_seconds() -> float:
    """User CPU time of this process. Under the net load, the veth's softirq
    work (the load's packets, and the tracker programs they run) is often done
    on irq exit while this process happens to be current, and is then charged
    to it as system time: process_time() overstates the reader there. User
    time is the reader's own (Python) work; the kernel splits user and system
    by tick samples, so it is coarse over a short run."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def _bpftool_progs() -> list[dict]:
    from nfsreset.lab.topology import sh
    return json.loads(sh("bpftool", "-j", "prog", "show").stdout or "[]")


def _tracker_progs(tracker, ids_before: set[int]) -> dict[str, int]:
    """{program (PROGS): BPF program id} of this tracker's programs.

    The ids come from the program fds that the tracker's bcc object holds
    (their /proc/self/fdinfo); failing that (a tracker.py without them), from
    raw_tracepoint programs of those names that appeared since ids_before,
    which another tracker loaded meanwhile on this machine could confuse."""
    out = {}
    for fname, fn in getattr(getattr(tracker, "_bpf", None), "funcs", {}).items():
        name = fname.decode() if isinstance(fname, bytes) else str(fname)
        prog = next((p for p in PROGS if p in name), None)
        if prog is None:
            continue
        with open(f"/proc/self/fdinfo/{fn.fd}") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        if "prog_id" in info:
            out[prog] = int(info["prog_id"])
    if len(out) < len(PROGS):
        new = {}
        for p in _bpftool_progs():
            prog = next((x for x in PROGS if x in p.get("name", "")), None)
            if prog and prog not in out and p.get("type") == "raw_tracepoint" and p["id"] not in ids_before:
                new.setdefault(prog, []).append(p["id"])
        for prog, ids in new.items():
            if len(ids) > 1:
                raise SystemExit(f"{prog}: programs {ids} appeared with the tracker; which is its own is unclear")
            out[prog] = ids[0]
    missing = [p for p in PROGS if p not in out]
    if missing:
        raise SystemExit(f"tracker programs not found: {', '.join(missing)}")
    return out


def _prog_stats(progs: dict[str, int]) -> dict[str, tuple[int, int]]:
    """{program: (run_time_ns, run_cnt)} now (bpftool leaves out zeros)."""
    if not progs:
        return {}
    by_id = {p["id"]: p for p in _bpftool_progs()}
    out = {}
    for prog, pid in progs.items():
        p = by_id.get(pid)
        if p is None:
            raise SystemExit(f"BPF program {pid} ({prog}) is gone")
        out[prog] = (int(p.get("run_time_ns", 0)), int(p.get("run_cnt", 0)))
    return out


class _BpfStatsOn:
    """The kernel's BPF run-time stats on within the block, through
    BPF_ENABLE_STATS: they stay on while its descriptor is open, so a run
    that is killed, or two that overlap, leave the host-wide sysctl
    kernel.bpf_stats_enabled as it was (writing the sysctl and putting the
    old value back did neither)."""

    def __enter__(self):
        import ctypes

        from nfsreset.kernel.netns import libc
        from nfsreset.flows.clock import _SYS_BPF

        attr = ctypes.create_string_buffer(8)       # enable_stats.type = BPF_STATS_RUN_TIME (0)
        self.fd = libc.syscall(_SYS_BPF, BPF_ENABLE_STATS, attr, len(attr)) if _SYS_BPF else -1
        if self.fd < 0:
            raise SystemExit(f"bench_tracker: --bpf-stats: BPF_ENABLE_STATS failed: "
                             f"{os.strerror(ctypes.get_errno()) if _SYS_BPF else 'unknown machine'}")
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


# -- the measurement ------------------------------------------------------------------
def measure(load, inode: int, seconds: float, rounds: int, modes: list[str], say,
            bpf_stats: bool = False) -> dict:
    from nfsreset.flows.tracker import FlowTracker

    kind = load.kind
    rng = random.Random(2049)
    runs = {label: [] for label in modes}
    base = [run_load(load, seconds)[0]]
    for r in range(rounds):
        labels = list(modes)
        rng.shuffle(labels)
        for label in labels:
            ports, drain, kw = MODES[label]
            ids_before = {p["id"] for p in _bpftool_progs()} if bpf_stats else set()
            tracker = FlowTracker(ports, [VIP], [inode], **kw)
            try:
                progs = _tracker_progs(tracker, ids_before) if bpf_stats else {}
                stats0 = _prog_stats(progs)
                cpu0, user0 = _cpu_seconds(), _user_seconds()
                rate, events = run_load(load, seconds, tracker if drain else _NotDrained())
                reader_cpu, reader_user = _cpu_seconds() - cpu0, _user_seconds() - user0
                stats1 = _prog_stats(progs)
                lost, left = tracker.lost, len(tracker.flows())
            finally:
                tracker.close()
            base.append(run_load(load, seconds)[0])
            ratio = rate / ((base[-2] + base[-1]) / 2)
            ops = max(rate * seconds, 1)
            run = {"rate": rate, "ratio": ratio, "events": events, "lost": lost, "left": left,
                   "reader_us_per_op": reader_cpu / ops * 1e6, "reader_user_us_per_op": reader_user / ops * 1e6}
            line = (f"{kind} round {r + 1}: {label}: {rate:,.0f}/s, ratio {ratio:.3f} ({events:,} events, "
                    f"{lost:,} lost, reader {run['reader_us_per_op']:.2f} us/op, "
                    f"user {run['reader_user_us_per_op']:.2f} us/op, {left} flows left)")
            if progs:
                run["bpf"] = {p: {"ns_per_op": (stats1[p][0] - stats0[p][0]) / ops,
                                  "runs_per_op": (stats1[p][1] - stats0[p][1]) / ops} for p in progs}
                run["bpf_ns_per_op"] = sum(x["ns_per_op"] for x in run["bpf"].values())
                line += f", BPF {run['bpf_ns_per_op']:.0f} ns/op (" + ", ".join(
                    f"{p} {x['ns_per_op']:.0f} ns in {x['runs_per_op']:.2f} runs" for p, x in run["bpf"].items()) + ")"
            runs[label].append(run)
            say(line)
    out = {"unit": UNIT[kind], "op": OP[kind],
           "baseline": {"median": statistics.median(base), "min": min(base), "max": max(base), "runs": len(base)},
           "modes": {}}
    for label, rs in runs.items():
        ratios = [x["ratio"] for x in rs]
        m = out["modes"][label] = {
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rate_median": statistics.median(x["rate"] for x in rs),
            "reader_us_per_op": statistics.median(x["reader_us_per_op"] for x in rs),
            "reader_user_us_per_op": statistics.median(x["reader_user_us_per_op"] for x in rs),
            "events": sum(x["events"] for x in rs), "lost": sum(x["lost"] for x in rs),
            "flows_left": max(x["left"] for x in rs)}
        if bpf_stats:
            m["bpf_ns_per_op"] = statistics.median(x["bpf_ns_per_op"] for x in rs)
            m["bpf"] = {p: {f: statistics.median(x["bpf"][p][f] for x in rs) for f in ("ns_per_op", "runs_per_op")}
                        for p in PROGS}
    return out


def print_table(result: dict, kinds: list[str]) -> None:
    m0 = result["machine"]
    print(f"\nload average {m0['loadavg'][0]:.2f} before, {m0['loadavg_after'][0]:.2f} after; "
          f"{result['rounds']} rounds of {result['seconds']} s")
    for kind in kinds:
        res = result[kind]
        b = res["baseline"]
        print(f"\n{kind}: without tracker {b['median']:,.0f} {res['unit']} (median of {b['runs']}, "
              f"{b['min']:,.0f}-{b['max']:,.0f})")
        print(f"{'mode':<14} {'ratio':>6} {'min-max':>12} {'reader us/op':>13} {'user us/op':>11} "
              f"{'events':>10} {'lost':>8}")
        for label, m in res["modes"].items():
            print(f"{label:<14} {m['ratio_median']:>6.3f} {m['ratio_min']:>5.3f}-{m['ratio_max']:<6.3f} "
                  f"{m['reader_us_per_op']:>13.2f} {m['reader_user_us_per_op']:>11.2f} "
                  f"{m['events']:>10,} {m['lost']:>8,}")
            print(f"RATIO {kind} {label}: {m['ratio_median']:.3f}")
        if result.get("bpf_stats"):
            print(f"BPF program run time per {res['op']} (medians; includes ~30 ns of stats clock reads per run)")
            print(f"{'mode':<14} {'ns/op':>7}" + "".join(f" {p + ' ns/op':>25} {'runs/op':>7}" for p in PROGS))
            for label, m in res["modes"].items():
                print(f"{label:<14} {m['bpf_ns_per_op']:>7.0f}" + "".join(
                    f" {m['bpf'][p]['ns_per_op']:>25.0f} {m['bpf'][p]['runs_per_op']:>7.2f}" for p in PROGS))
                print(f"BPFNS {kind} {label}: {m['bpf_ns_per_op']:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="per run (default 1.5)")
    ap.add_argument("--rounds", type=int, default=6, help="runs per mode and load (default 6)")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES),
                    help="tracker modes (an older tracker.py takes no keywords: tracker, 'not drained', 'other port')")
    ap.add_argument("--clients", type=int, default=2, help="client processes of the net load (default 2)")
    ap.add_argument("--bpf-stats", action="store_true",
                    help="turn the kernel's BPF stats on meanwhile (BPF_ENABLE_STATS, not the sysctl) and "
                         "report the tracker programs' run time per operation")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    ap.add_argument("--worker", choices=("churn", "rr", "net-server", "net-client"), help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "net-server":
        return net_server()
    if args.worker == "net-client":
        return net_client(args.seconds, args.start_at)
    if args.worker:
        return worker(args.worker, args.seconds)
    if os.geteuid() != 0:
        raise SystemExit("needs root (namespaces, BPF)")
    if args.clients < 1:
        raise SystemExit("--clients must be at least 1")
    # A plain kill must also remove the namespaces (the BPF stats descriptor
    # closes with the process).
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))

    from nfsreset.flows.tracker import FlowTracker

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    t0 = time.monotonic()
    FlowTracker([PORT], [VIP]).close()
    load_s = time.monotonic() - t0
    say(f"tracker BTF parse + compile + load + attach (first in this process): {load_s:.2f} s")

    result = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "loadavg": os.getloadavg()},
              "seconds": args.seconds, "rounds": args.rounds, "load_s": load_s,
              "clients": args.clients, "bpf_stats": args.bpf_stats}
    with _BpfStatsOn() if args.bpf_stats else contextlib.nullcontext():
        for kind in args.kinds:
            load = NetLoad(args.clients) if kind == "net" else LoLoad(kind)
            try:
                inode = load.setup()
                result[kind] = measure(load, inode, args.seconds, args.rounds, args.modes, say, args.bpf_stats)
            finally:
                load.teardown()
    result["machine"]["loadavg_after"] = os.getloadavg()

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result, args.kinds)


if __name__ == "__main__":
    main()
