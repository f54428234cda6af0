#!/usr/bin/env python3
"""Benchmark: nfsreset.kernel.sockdiag destroy(dump(...)) against `ss -K`, same run.

Run as root from the checkout:  .venv/bin/python bench/bench_sockdiag.py [-n 100 1000 10000] [-r 3]

Makes two namespaces of its own (nfsr-<pid>-bench-{srv,cli}, a veth pair,
documentation addresses only), opens N established connections from the
client to VIP:2049 on the server side (both ends held by this process), then
kills the server side of all of them, once with our code and once with
`ip netns exec srv ss -K`, each on an identical fresh set. Every kill is
verified (no VIP socket left in the dump). Prints times and ours/ss ratios.
The ss time includes starting `ip netns exec` + ss; the cost of starting
`ip netns exec ... true` is printed alongside so it can be judged.
Everything it made is removed on exit, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import errno
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nfsreset.kernel import netns, sockdiag  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from manyconns import accept_all, raise_nofile  # noqa: E402

VIP = "198.51.100.10"
SRV_IP, CLI_IP = "198.51.100.1", "198.51.100.100"
PORT = 2049


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class Lab:
    def __init__(self) -> None:
        base = f"nfsr-{os.getpid()}-bench"
        self.srv, self.cli = f"{base}-srv", f"{base}-cli"
        self.made: list[str] = []

    def __enter__(self) -> "Lab":
        try:
            for ns in (self.srv, self.cli):
                sh("ip", "netns", "add", ns)
                self.made.append(ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", self.srv, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", self.cli)
            sh("ip", "-n", self.srv, "addr", "add", f"{SRV_IP}/24", "dev", "eth0")
            sh("ip", "-n", self.srv, "addr", "add", f"{VIP}/24", "dev", "eth0")
            sh("ip", "-n", self.cli, "addr", "add", f"{CLI_IP}/24", "dev", "eth0")
            for ns in (self.srv, self.cli):
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
            # per-netns limits: a deep accept queue, and a wide ephemeral range
            # so 10,000 connections from one client address fit twice over.
            sh("ip", "netns", "exec", self.srv, "sysctl", "-qw", "net.core.somaxconn=65535",
               "net.ipv4.tcp_max_syn_backlog=65535")
            sh("ip", "netns", "exec", self.cli, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()

    def connections(self, n: int) -> tuple[socket.socket, list[socket.socket], "Clients"]:
        """n established connections client -> VIP:2049; returns (listener, server fds, clients).

        The client ends live in a forked child: one process may not hold
        2 x 10,000 descriptors under this sandbox's hard RLIMIT_NOFILE.
        """
        with netns.entered(self.srv):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((VIP, PORT))
            listener.listen(65535)
            listener.setblocking(False)
        held: list[socket.socket] = [listener]
        try:
            clients = Clients(self.cli, n)
            deadline = time.monotonic() + 120
            while len(held) - 1 < n:
                accept_all(listener, held)
                if clients.ready(0.01):
                    clients.wait_ready()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"accepted {len(held) - 1} of {n}")
            clients.wait_ready()
        except BaseException:
            close_all(held)
            raise
        return listener, held, clients

    def vip_sockets(self) -> int:
        with netns.entered(self.srv):
            return len(sockdiag.dump([VIP], [PORT]))


class Clients:
    """A forked child in the client netns holding n connections to VIP:2049.

    Protocol on two pipes: child writes "C" when all n connected; parent
    writes "Q"; child counts sockets whose SO_ERROR is ECONNRESET (or that
    read EOF), writes the count as text and exits.
    """

    def __init__(self, ns: str, n: int) -> None:
        self.n = n
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child
            code = 1
            try:
                os.close(self.to_child)
                os.close(self.from_child)
                code = _client_main(ns, n, to_child_r, from_child_w)
            finally:
                os._exit(code)
        os.close(to_child_r)
        os.close(from_child_w)
        self._ready = False

    def ready(self, timeout: float) -> bool:
        if self._ready:
            return True
        r, _, _ = select.select([self.from_child], [], [], timeout)
        return bool(r)

    def wait_ready(self) -> None:
        if self._ready:
            return
        if not self.ready(120) or os.read(self.from_child, 1) != b"C":
            raise RuntimeError("client child failed to connect")
        self._ready = True

    def finish(self) -> int:
        """Tell the child to stop; returns how many of its sockets were reset."""
        try:
            os.write(self.to_child, b"Q")
            r, _, _ = select.select([self.from_child], [], [], 60)
            out = os.read(self.from_child, 64) if r else b""
        finally:
            os.close(self.to_child)
            os.close(self.from_child)
            try:
                os.kill(self.pid, 9) if not out else None
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
        return int(out or b"-1")


def _client_main(ns: str, n: int, cmd_r: int, out_w: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 500), hard))
    netns.enter_for_good(ns)
    socks = []
    deadline = time.monotonic() + 120
    for _ in range(n):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.settimeout(5)
        c.connect((VIP, PORT))
        socks.append(c)
        if time.monotonic() > deadline:
            return 1
    os.write(out_w, b"C")
    os.read(cmd_r, 1)           # wait for the kill to be done
    reset = 0
    for c in socks:
        err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == errno.ECONNRESET:
            reset += 1
        else:
            c.setblocking(False)
            try:
                if c.recv(1) == b"":
                    reset += 1
            except ConnectionResetError:
                reset += 1
            except BlockingIOError:
                pass
        c.close()
    os.write(out_w, str(reset).encode())
    return 0


def close_all(held: list[socket.socket]) -> None:
    for s in held:
        s.close()


def time_ours(lab: Lab) -> tuple[float, float, int]:
    with netns.entered(lab.srv):
        t0 = time.perf_counter()
        found = sockdiag.dump([VIP], [PORT])
        t1 = time.perf_counter()
        res = sockdiag.destroy(sid for _, sid in found)
        t2 = time.perf_counter()
    if res.failed or res.gone:
        raise RuntimeError(f"ours: {res}")
    return t2 - t0, t1 - t0, len(res.destroyed)


def time_ss(lab: Lab) -> float:
    argv = ["ip", "netns", "exec", lab.srv, "ss", "-K", "-tn", f"src {VIP} and sport = :{PORT}"]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    return time.perf_counter() - t0


def spawn_cost(lab: Lab) -> float:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", lab.srv, "true"], check=True, timeout=30)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one_round(lab: Lab, n: int, tool: str) -> float:
    listener, held, clients = lab.connections(n)
    reset = None
    try:
        if tool == "ours":
            took, _dump, killed = time_ours(lab)
            if killed != n:
                raise RuntimeError(f"ours destroyed {killed} of {n}")
        else:
            took = time_ss(lab)
        left = lab.vip_sockets()
        if left:
            raise RuntimeError(f"{tool}: {left} VIP sockets left of {n}")
    finally:
        close_all(held)
        reset = clients.finish()
    if reset != n:
        raise RuntimeError(f"{tool}: only {reset} of {n} clients saw their connection die")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("-r", "--repeat", type=int, default=3, help="rounds per tool and N (median reported)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces)", file=sys.stderr)
        return 2
    need = max(args.n) + 500
    why = raise_nofile(need)
    if why:
        print(why, file=sys.stderr)
        return 2

    with Lab() as lab:
        spawn = spawn_cost(lab)
        print(f"kernel {os.uname().release}; `ip netns exec NS true` costs {spawn * 1000:.1f} ms (included in ss times)")
        print(f"{'N':>6} {'ours med':>9} {'ss med':>9} {'ratio':>6} {'ours min':>9} {'ss min':>9} {'ratio':>6}"
              f" {'med ours/(ss-spawn)':>20}   ({args.repeat} rounds each, alternating)")
        for n in args.n:
            ours, ss = [], []
            for _ in range(args.repeat):
                # alternate so neither tool always runs on a "warmer" kernel
                ours.append(one_round(lab, n, "ours"))
                ss.append(one_round(lab, n, "ss"))
            o, s = statistics.median(ours), statistics.median(ss)
            omin, smin = min(ours), min(ss)
            net = max(s - spawn, 1e-9)
            print(f"{n:>6} {o:>9.4f} {s:>9.4f} {o / s:>6.2f} {omin:>9.4f} {smin:>9.4f} {omin / smin:>6.2f}"
                  f" {o / net:>20.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
