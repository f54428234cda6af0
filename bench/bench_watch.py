#!/usr/bin/env python3
"""Benchmark: the `nfsreset watch` daemon - reaction to a departing VIP, and its idle cost.

Run as root from the checkout:
    .venv/bin/python bench/bench_watch.py [--part latency idle] [--sizes 100 10000] [--repeat 3]
        [--family 4|6] [--idle-seconds 30] [--idle-sessions 0 1000] [--json]

Every round builds a fresh lab (nfsreset.lab.topology; namespaces `nfsr-<pid>-...`,
documentation addresses): the VIP on node1, a wildcard listener on node1
(like nfsd; held by this process), N established connections from a child
in the client namespace, spread over 4 client addresses.

latency - from `ip addr del` of the VIP on node1 to the moment node1's kernel
holds no socket on VIP:2049 any more, for three ways of ending them:
  watch   `nfsreset watch --vip VIP` running in node1 (started before the
          connections; the round waits until its state file lists all N, so
          its tracker has caught up, then 1 s idle);
  kill    `nfsreset kill --vip VIP --moment post-stop` as a fresh process
          started right after `ip addr del` returned (the hook the daemon
          replaces: same work - record, quarantine, destroy, verify);
  ss -K   `ss -K -tn src VIP` as a fresh process started right after it
          (the bare tool: dump + destroy, nothing else).
t0 is taken just before `ip -n NODE1 addr del` is spawned, for all three.
"Ended" is seen from the kernel: this process polls a sock_diag dump in
node1 (filtered on VIP:2049, all states but LISTEN) every ~1 ms and stops at
the first dump that returns nothing; each poll reads only the first reply
buffer (enough to know whether anything is left) and drops the rest.

idle - CPU time (time on CPU from /proc/PID/task/*/schedstat, in ns: utime and
stime of /proc/PID/stat tick at 10 ms, too coarse for ~1 ms/s; stime is shown
for the kernel's share), wakeups (voluntary context switches summed over
/proc/PID/task/*/status) and VmRSS
of the daemon over --idle-seconds, with 0 and with 1,000 established, silent
watched sessions, measured after the daemon has tracked them all and 2 s
more. Baseline in the same run: the same daemon with --no-bpf (its other
mode: a sock_diag dump every second instead of the BPF tracker). A bare
`python -c 'time.sleep()'` in node1 gives the floor (its RSS is what any
Python process costs).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from nfsreset.kernel import netlink, netns, sockdiag  # noqa: E402
from nfsreset.lab.topology import HOST_ADDRS, Topology  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from manyconns import (CLIENT, CLIENT_ADDRS, PORT, SERVER, SETUP_TIMEOUT_S, VIPS,  # noqa: E402
                       ClientChild, accept_all, raise_nofile)

VENV = os.path.join(os.path.abspath(ROOT), ".venv", "bin")
N_CLIENT_ADDRS = 4
READY_TIMEOUT_S = 60
END_TIMEOUT_S = 30
POLL_GAP_S = 0.001
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the lab ------------------------------------------------------------------------------
class Lab:
    """A fresh topology: VIP on node1, a wildcard listener there, clients on demand."""

    def __init__(self, family: int) -> None:
        self.family = family
        self.vip = VIPS[family]
        self.topo: Topology | None = None
        self.held: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.child: ClientChild | None = None
        self.state = tempfile.mkdtemp(prefix="nfsr-bench-watch-")

    def __enter__(self) -> "Lab":
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        self.topo = t = Topology.create(tag="bwatch")
        for ip in CLIENT_ADDRS[self.family][:N_CLIENT_ADDRS]:
            if ip not in HOST_ADDRS[CLIENT]:
                t.add_addr(CLIENT, ip, nodad=True)
        t.add_addr(SERVER, self.vip, nodad=True)
        t.run(SERVER, "sysctl", "-qw", "net.core.somaxconn=65535", "net.ipv4.tcp_max_syn_backlog=65535")
        t.run(CLIENT, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
        fam = socket.AF_INET6 if self.family == 6 else socket.AF_INET
        with netns.entered(t.ns(SERVER)):
            self.listener = socket.socket(fam, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            self.listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.listener.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", PORT))
        self.listener.listen(65535)
        self.listener.setblocking(False)

    def connect(self, n: int) -> None:
        """n established connections to VIP:2049 (held by a child in the client netns)."""
        if n == 0:
            return
        self.child = ClientChild(self.topo.ns(CLIENT), self.vip,
                                 CLIENT_ADDRS[self.family][:N_CLIENT_ADDRS], n)
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while len(self.held) < n:
            accept_all(self.listener, self.held)
            if time.monotonic() > deadline or self.child.failed():
                raise RuntimeError(f"accepted {len(self.held)} of {n}")
            select.select([self.listener], [], [], 0.05)
        self.child.wait_ready()

    def nfsreset_argv(self, *args: str) -> list[str]:
        return self.topo.exec_argv(SERVER, os.path.join(VENV, "nfsreset"), *args)

    def __exit__(self, *exc) -> None:
        if self.child is not None:
            self.child.finish()
            self.child = None
        for s in self.held + ([self.listener] if self.listener else []):
            s.close()
        self.held.clear()
        self.listener = None
        if self.topo is not None:
            self.topo.destroy()
            self.topo = None
        shutil.rmtree(self.state, ignore_errors=True)


# -- the daemon -----------------------------------------------------------------------------
class Daemon:
    """`nfsreset watch` in node1; its stderr read by a thread."""

    def __init__(self, lab: Lab, bpf: bool = True) -> None:
        argv = lab.nfsreset_argv("watch", "--vip", lab.vip, "--state-dir", lab.state,
                                 *([] if bpf else ["--no-bpf"]))
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(READY_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"watch not ready: {self.lines[-5:]}")
        # `ip netns exec` execs: the pid is the daemon's.
        self.pid = self.proc.pid

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            if " ready: " in line:
                self.ready.set()

    def wait_tracked(self, lab: Lab, n: int) -> None:
        """Until the daemon's client list (state dir) holds all n sessions."""
        path = os.path.join(lab.state, f"{lab.vip}.clients.json")
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with open(path) as f:
                    if len(json.load(f)["clients"]) == n:
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"watch did not list {n} clients: {self.lines[-5:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# -- kernel-side observation -----------------------------------------------------------------
def anything_left(family: int, bytecode: bytes) -> bool:
    """One sock_diag dump in the current thread's netns; True if it returns any socket.
    Only the first reply buffer is read; closing the socket ends the dump."""
    mask = sockdiag.states_mask(None)
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, sockdiag.NETLINK_SOCK_DIAG) as s:
        s.settimeout(5)
        s.sendto(sockdiag.encode_dump_request(fam, mask, bytecode, 1), (0, 0))
        buf = s.recv(1 << 16)
    for kind, _flags, _seq, start, _end in netlink.messages(buf):
        if kind == sockdiag.SOCK_DIAG_BY_FAMILY:
            return True
        if kind == netlink.NLMSG_DONE:
            return False
        if kind == netlink.NLMSG_ERROR:
            err, _ = netlink.error(buf, start)
            raise OSError(err, "sock_diag dump failed")
    raise RuntimeError("empty sock_diag reply")


def time_until_none_left(lab: Lab, start, t0_box: list) -> tuple[float, int]:
    """Run start() (which sets t0_box[0]), then poll node1 until no VIP socket is left.
    Returns (seconds from t0, polls)."""
    bytecode = sockdiag.encode_bytecode([lab.vip], [PORT])
    with netns.entered(lab.topo.ns(SERVER)):
        if not anything_left(lab.family, bytecode):
            raise RuntimeError("no session on the VIP before the delete")
        start()
        polls = 0
        deadline = t0_box[0] + END_TIMEOUT_S
        while True:
            polls += 1
            if not anything_left(lab.family, bytecode):
                return time.monotonic() - t0_box[0], polls
            if time.monotonic() > deadline:
                raise RuntimeError(f"sessions still there {END_TIMEOUT_S} s after the delete")
            time.sleep(POLL_GAP_S)


def del_vip(lab: Lab, t0_box: list) -> float:
    """`ip addr del` of the VIP on node1; stamps t0 before the spawn, returns its duration."""
    t0_box[0] = time.monotonic()
    lab.topo.del_addr(SERVER, lab.vip)
    return time.monotonic() - t0_box[0]


# -- latency ---------------------------------------------------------------------------------
def latency_round(family: int, n: int, method: str) -> dict:
    with Lab(family) as lab:
        daemon = Daemon(lab) if method == "watch" else None
        tool: list[subprocess.Popen] = []
        out: dict = {"method": method, "n": n}
        try:
            lab.connect(n)
            if daemon:
                daemon.wait_tracked(lab, n)
                time.sleep(1.0)
            t0 = [0.0]

            def start():
                out["del_s"] = del_vip(lab, t0)
                if method == "kill":
                    tool.append(subprocess.Popen(lab.nfsreset_argv(
                        "kill", "--vip", lab.vip, "--state-dir", lab.state, "--moment", "post-stop"),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
                elif method == "ss":
                    target = f"[{lab.vip}]" if family == 6 else lab.vip
                    tool.append(subprocess.Popen(lab.topo.exec_argv(SERVER, "ss", "-K", "-tn", "src", target),
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))

            out["ended_s"], out["polls"] = time_until_none_left(lab, start, t0)
            if tool:
                _, err = tool[0].communicate(timeout=60)
                out["exit"] = tool[0].returncode
                out["exited_s"] = time.monotonic() - t0[0]
                out["stderr"] = err.strip().splitlines()[-2:]
            if daemon:
                # the daemon's own view: "...post-stop: done X ms after the event"
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not any("post-stop: done" in ln for ln in daemon.lines):
                    time.sleep(0.01)
                for ln in daemon.lines:
                    m = re.search(r"post-stop: done ([\d.]+) ms", ln)
                    if m:
                        out["daemon_done_s"] = float(m.group(1)) / 1000
                    m = re.search(r"destroyed (\d+) of (\d+) session\(s\) .* in ([\d.]+) ms", ln)
                    if m:
                        out["destroyed"] = int(m.group(1))
                        out["destroy_s"] = float(m.group(3)) / 1000
        finally:
            for p in tool:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            if daemon:
                out["exit"] = daemon.stop()
                out["log"] = [ln for ln in daemon.lines if "post-stop" in ln or "destroyed" in ln
                              or "Traceback" in ln or "failed" in ln][-6:]
    return out


# -- idle ----------------------------------------------------------------------------------
def proc_sample(pid: int) -> dict:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    stime = int(fields[12]) / CLK_TCK
    wakeups, on_cpu_ns = 0, 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                wakeups += sum(int(ln.split()[1]) for ln in f if ln.startswith("voluntary_ctxt_switches"))
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                on_cpu_ns += int(f.read().split()[0])
        except OSError:
            pass
    with open(f"/proc/{pid}/status") as f:
        st = dict(ln.split(":", 1) for ln in f if ":" in ln)
    kb = {k: int(st[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")}
    return {"cpu_s": on_cpu_ns / 1e9, "sys_s": stime, "wakeups": wakeups, **kb}


def idle_round(family: int, n: int, mode: str, seconds: float) -> dict:
    with Lab(family) as lab:
        if mode == "sleep":
            proc = subprocess.Popen(lab.topo.exec_argv(SERVER, os.path.join(VENV, "python"), "-c",
                                                       f"import time; time.sleep({seconds + 30})"))
            try:
                time.sleep(1.0)
                return _idle_measure(proc.pid, seconds) | {"mode": mode, "n": n}
            finally:
                proc.kill()
                proc.wait()
        daemon = Daemon(lab, bpf=(mode == "bpf"))
        try:
            lab.connect(n)
            if n:
                daemon.wait_tracked(lab, n)
            time.sleep(2.0)
            out = _idle_measure(daemon.pid, seconds) | {"mode": mode, "n": n}
        finally:
            out_rc = daemon.stop()
        out["exit"] = out_rc
        return out


def _idle_measure(pid: int, seconds: float) -> dict:
    a = proc_sample(pid)
    t = time.monotonic()
    time.sleep(seconds)
    b = proc_sample(pid)
    dt = time.monotonic() - t
    return {"seconds": dt, "cpu_ms_per_s": (b["cpu_s"] - a["cpu_s"]) * 1000 / dt,
            "sys_ms_per_s": (b["sys_s"] - a["sys_s"]) * 1000 / dt,
            "wakeups_per_s": (b["wakeups"] - a["wakeups"]) / dt,
            "rss_mb": b["VmRSS"] / 1024, "rss_anon_mb": b["RssAnon"] / 1024, "rss_file_mb": b["RssFile"] / 1024}


# -- main -----------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", nargs="+", choices=("latency", "idle"), default=["latency", "idle"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 10000])
    ap.add_argument("--repeat", type=int, default=3, help="rounds per method and N (median reported)")
    ap.add_argument("--family", type=int, choices=(4, 6), default=4)
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--idle-sessions", type=int, nargs="+", default=[0, 1000])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces)", file=sys.stderr)
        return 2
    if not 1 <= args.repeat <= 20 or any(not 1 <= n <= 15000 for n in args.sizes) \
            or any(not 0 <= n <= 15000 for n in args.idle_sessions) or not 1 <= args.idle_seconds <= 600:
        print("--repeat 1-20, --sizes 1-15000, --idle-sessions 0-15000, --idle-seconds 1-600", file=sys.stderr)
        return 2
    need = max(args.sizes + args.idle_sessions) + 500
    why = raise_nofile(need)
    if why:
        print(why, file=sys.stderr)
        return 2
    say = (lambda *_a, **_k: None) if args.json else print
    report: dict = {"kernel": os.uname().release, "cpus": os.cpu_count(), "family": args.family,
                    "loadavg_start": os.getloadavg()[0]}
    say(f"kernel {report['kernel']}, {report['cpus']} cpus, IPv{args.family}, load {report['loadavg_start']:.2f}")
    ok = True

    if "latency" in args.part:
        report["latency"] = []
        say("\nlatency: ip addr del -> no session left on VIP:2049 in node1's kernel (median of "
            f"{args.repeat}, ms)")
        say(f"{'N':>6} {'watch':>8} {'kill':>8} {'ss -K':>8} {'watch/kill':>10} {'watch/ss':>9} "
            f"{'ip del':>7} {'daemon done':>11} {'destroy':>8}")
        for n in args.sizes:
            rounds: dict[str, list[dict]] = {"watch": [], "kill": [], "ss": []}
            for _ in range(args.repeat):
                for method in rounds:     # interleaved: no method always runs on a warmer machine
                    rounds[method].append(latency_round(args.family, n, method))
            med = {m: statistics.median(r["ended_s"] for r in rs) for m, rs in rounds.items()}
            w = rounds["watch"]
            row = {"n": n, "watch_s": med["watch"], "kill_s": med["kill"], "ss_s": med["ss"],
                   "watch_over_kill": med["watch"] / med["kill"], "watch_over_ss": med["watch"] / med["ss"],
                   "ip_del_s": statistics.median(r["del_s"] for rs in rounds.values() for r in rs),
                   "daemon_done_s": statistics.median(r.get("daemon_done_s", float("nan")) for r in w),
                   "daemon_destroy_s": statistics.median(r.get("destroy_s", float("nan")) for r in w),
                   "exits": sorted({r.get("exit") for rs in rounds.values() for r in rs}, key=str),
                   "rounds": rounds}
            report["latency"].append(row)
            ok &= row["exits"] == [0]
            say(f"{n:>6} {row['watch_s'] * 1000:>8.1f} {row['kill_s'] * 1000:>8.1f} {row['ss_s'] * 1000:>8.1f} "
                f"{row['watch_over_kill']:>10.2f} {row['watch_over_ss']:>9.2f} {row['ip_del_s'] * 1000:>7.1f} "
                f"{row['daemon_done_s'] * 1000:>11.1f} {row['daemon_destroy_s'] * 1000:>8.1f}", flush=True)
            if row["exits"] != [0]:
                say(f"       ! exit codes {row['exits']}")

    if "idle" in args.part:
        report["idle"] = []
        say(f"\nidle: the daemon over {args.idle_seconds:g} s with N established silent sessions; "
            "baseline: the same daemon with --no-bpf")
        say(f"{'N':>6} {'mode':<7} {'CPU ms/s':>8} {'(sys)':>6} {'ratio':>6} {'wakeups/s':>9} {'VmRSS MB':>8} "
            f"{'anon':>6} {'file':>6}")
        floor = idle_round(args.family, 0, "sleep", min(args.idle_seconds, 5.0))
        report["idle_floor"] = floor
        say(f"{'-':>6} {'sleep':<7} {floor['cpu_ms_per_s']:>8.2f} {floor['sys_ms_per_s']:>6.2f} {'':>6} "
            f"{floor['wakeups_per_s']:>9.1f} "
            f"{floor['rss_mb']:>8.1f} {floor['rss_anon_mb']:>6.1f} {floor['rss_file_mb']:>6.1f}", flush=True)
        for n in args.idle_sessions:
            pair = {mode: idle_round(args.family, n, mode, args.idle_seconds) for mode in ("no-bpf", "bpf")}
            base = pair["no-bpf"]["cpu_ms_per_s"]
            for mode in ("no-bpf", "bpf"):
                r = pair[mode]
                r["cpu_ratio_to_no_bpf"] = r["cpu_ms_per_s"] / base if base else None
                report["idle"].append(r)
                ok &= r["exit"] == 0
                ratio = f"{r['cpu_ratio_to_no_bpf']:.2f}" if r["cpu_ratio_to_no_bpf"] is not None else "-"
                say(f"{n:>6} {mode:<7} {r['cpu_ms_per_s']:>8.2f} {r['sys_ms_per_s']:>6.2f} {ratio:>6} "
                    f"{r['wakeups_per_s']:>9.1f} "
                    f"{r['rss_mb']:>8.1f} {r['rss_anon_mb']:>6.1f} {r['rss_file_mb']:>6.1f}", flush=True)
    report["loadavg_end"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(report))
    return 0 if ok else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt    # run the finally blocks: namespaces, children, daemons, temp dirs


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    sys.exit(main())
