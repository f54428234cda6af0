"""One lab run: a fresh topology, a failover node1 -> node2 and a failback.

    node1, node2: NFS server listening the whole time: the sim server (server.py,
                  keeps its sockets like nfsd) or NFS-Ganesha (ganesha.py)
    client:       lab client (Linux NFS client-like) talking to the VIP: record
                  echo to the sim server, NFSv3/v4.0/v4.1 GETATTR to Ganesha
    VIP:          up on node1, moved to node2 like IPaddr2, then moved back

The failback is where it hurts: node1 still holds the ESTABLISHED socket of
the client's first connection (nothing ever told it the address left), the
client comes back from the same source port, so its segments land on that
stale socket, which answers with bare ACKs. The client keeps retransmitting
until TCP_USER_TIMEOUT. Remedies hook in around the moves (remedies.py).

Every wait is bounded; everything started here is stopped in `finally`,
with SIGINT/SIGTERM held back while the namespaces are removed.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

from nfsreset.lab import ganesha, report
from nfsreset.lab.mover import MoveTimes, stop_process
from nfsreset.lab.movers import make_mover
from nfsreset.lab.remedies import LabContext, Remedy
from nfsreset.lab.topology import VIP4, VIP6, Topology, TopologyError

PORT = 2049
SERVERS = ("sim", "sim-nfsd", "ganesha")
# sim-nfsd: the sim server aborting the sockets of a deleted address, like kernel nfsd >= 4.5.
SIM_SERVERS = ("sim", "sim-nfsd")
# What the client speaks to each server: the sim servers only echo records.
VERSIONS = {"sim": ("echo",), "sim-nfsd": ("echo",), "ganesha": ("3", "4.0", "4.1")}
# Where the heads keep nfsreset's state (client list, pending kills): one dir
# each, as on two real machines, or one dir both see (the lab's old default).
STATES = ("per-head", "shared")
# Progress(stage, elapsed, limit): the command turns it into a status line.
Progress = Callable[[str, "float | None", "float | None"], None]


class LabError(Exception):
    pass


class ClientLog:
    """Reads the lab client's JSON lines in a thread; replies and events by time."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self._lock = threading.Lock()
        self._replies: list[float] = []
        self._events: list[dict] = []
        self._thread = threading.Thread(target=self._read, name="lab-client-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if ev.get("ev") == "reply":
                    self._replies.append(ev["t"])
                else:
                    self._events.append(ev)

    def replies(self) -> list[float]:
        with self._lock:
            return list(self._replies)

    def events(self) -> list[dict]:
        with self._lock:
            return list(self._events)

    def first_reply_after(self, t: float) -> float | None:
        with self._lock:
            # appended in CLOCK_MONOTONIC order, so the list is sorted
            i = bisect.bisect_right(self._replies, t)
            return self._replies[i] if i < len(self._replies) else None

    def port(self) -> int | None:
        for ev in self.events():
            if ev.get("ev") == "connected":
                return ev.get("port")
        return None


def vip_sockets(topo: Topology, node: str, vip: str) -> list[str]:
    """Non-listening TCP sockets on `node` whose local address is `vip`, as ss lines
    (state, queues, addresses) followed by the holding process (ganesha.nfsd,
    python3), when ss names one."""
    out = topo.run(node, "ss", "-tanpH", check=False, timeout=10).stdout
    lines = []
    for line in out.splitlines():
        parsed = report.parse_ss_line(line)
        if parsed and parsed[1] == vip and parsed[0] != "LISTEN":
            users = sorted(set(re.findall(r'\("([^"]+)",pid=', line)))
            lines.append(" ".join(line.split()[:5] + users))
    return lines


def _event_text(ev: dict, t0: float) -> str:
    kind = ev.get("ev")
    rel = f"{ev['t'] - t0:+.3f}"
    if kind == "error":
        return f"{rel} {ev.get('op')} {ev.get('err')}"
    if kind == "reconnect":
        return f"{rel} reconnect #{ev.get('attempt')} after {ev.get('delay'):g} s"
    if kind in ("connected", "connecting"):
        return f"{rel} {kind} from port {ev.get('port')}"
    return f"{rel} {kind}"


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM while tearing down; they arrive (and raise) afterwards."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def start_servers(topo: Topology, workdir: str, port: int = PORT, nodes: tuple[str, ...] = ("node1", "node2"),
                  duration: float = 3600.0, close_on_delete: bool = False) -> list[subprocess.Popen]:
    """The lab server (nfsd-like) on each of `nodes`, listening on `port` for at
    most `duration` s; logs in `workdir`. `close_on_delete`: it aborts the
    sockets of a deleted address, like kernel nfsd >= 4.5. Waits (bounded)
    until all listen; on failure stops what it started."""
    servers: list[subprocess.Popen] = []
    logs = []
    try:
        for node in nodes:
            path = os.path.join(workdir, f"server-{node}.log")
            logs.append(path)
            with open(path, "w") as out:
                servers.append(topo.popen(
                    node, sys.executable, "-m", "nfsreset.lab.server", "--port", str(port),
                    "--duration", f"{duration:g}", *(["--close-on-delete"] if close_on_delete else []),
                    stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if all('"listening"' in _read(p) for p in logs):
                return servers
            if any(s.poll() is not None for s in servers):
                break
            time.sleep(0.02)
        raise LabError("lab server did not start: " + " | ".join(_read(p).strip()[-300:] for p in logs))
    except BaseException:
        for proc in servers:
            with contextlib.suppress(Exception):
                stop_process(proc)
        raise


def start_client(topo: Topology, vip: str, workdir: str, port: int = PORT, user_timeout: float = 180.0,
                 duration: float = 600.0, extra: tuple[str, ...] = (), name: str = "client",
                 timeout: float = 10.0, wait_reply: bool = True) -> tuple[subprocess.Popen, ClientLog]:
    """The lab client (Linux NFS client-like) in the client namespace, talking to
    `vip`; returns once it got its first reply (bounded by `timeout`; at once
    without `wait_reply`). `duration` bounds its life even if nobody stops it;
    `extra` goes to its command line. On failure stops it and raises LabError."""
    with open(os.path.join(workdir, f"{name}.err"), "w") as err:
        proc = topo.popen(
            "client", sys.executable, "-m", "nfsreset.lab.client", "--server", vip,
            "--port", str(port), "--user-timeout", f"{user_timeout:g}", "--duration", f"{duration:g}",
            *extra, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
    try:
        log = ClientLog(proc)
        deadline = time.monotonic() + timeout
        while wait_reply and log.first_reply_after(0.0) is None:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise LabError(f"client got no reply from {vip}: {log.events()[-3:]}")
            time.sleep(0.02)
        return proc, log
    except BaseException:
        with contextlib.suppress(Exception):
            stop_process(proc)
        raise


class _Run:
    """State of one run_lab() call; split out so each step reads as a method."""

    def __init__(self, family: int, cap: float, remedy: Remedy, user_timeout: float, gap: float,
                 progress: Progress, strategy: str | None, log: Callable[[str], None],
                 steady: float, settle: float, mover: str = "ip", server: str = "sim",
                 vers: str = "echo", crash: bool = False, state: str = "shared",
                 stop_delay: float | None = None) -> None:
        self.family, self.cap, self.remedy, self.mover_name = family, cap, remedy, mover
        self.stop_delay = stop_delay
        self.state = state
        self.server, self.vers, self.crash = server, vers, crash
        self.user_timeout, self.gap, self.progress = user_timeout, gap, progress
        self.strategy, self.log = strategy, log
        self.steady, self.settle = steady, settle
        self.vip = VIP4 if family == 4 else VIP6
        self.result = report.FamilyResult(family=family, remedy=remedy.name, vip=self.vip, mover=mover,
                                          server=server, vers=vers, state=state)
        self.heads: list[ganesha.Head] = []
        self.export_dir: str | None = None
        self.topo: Topology | None = None
        self.workdir: str | None = None
        self.servers: list[subprocess.Popen] = []
        self.client: subprocess.Popen | None = None
        self.client_log: ClientLog | None = None
        self.mover = None     # mover.Mover or mover_ocf.AgentMover
        self.lab: LabContext | None = None
        self.phase = "setup"

    # -- hooks, timed ---------------------------------------------------------------
    def _timed(self, hook: str, node: str | None, call: Callable[[], None]) -> None:
        t = time.monotonic()
        error = None
        try:
            call()
        except Exception as e:  # a failing remedy is a result, not a crash of the lab
            error = " ".join(f"{type(e).__name__}: {e}".split())  # one line: it goes into a table
            self.log(f"{self.remedy.name}.{hook} on {node} failed: {error}")
        self.result.hook_timings.append(
            report.HookTiming(self.phase, hook, node, time.monotonic() - t, error))

    def _post_stop(self, node: str, vip: str) -> None:
        self._timed("post_stop", node, lambda: self.remedy.post_stop(self.lab, node, vip))

    def _pre_start(self, node: str, vip: str) -> None:
        self._timed("pre_start", node, lambda: self.remedy.pre_start(self.lab, node, vip))

    def _post_start(self, node: str, vip: str) -> None:
        self._timed("post_start", node, lambda: self.remedy.post_start(self.lab, node, vip))

    # -- steps ----------------------------------------------------------------------
    def begin(self) -> None:
        """Everything before the first move: lab, servers, the remedy's setup, the
        VIP started on node1, the client talking to it."""
        self.build()
        self.start_servers()
        self.phase = "setup"
        self._timed("setup", None, lambda: self.remedy.setup(self.lab))
        self.phase = "start"
        times = MoveTimes(old=None, new="node1", t_start=time.monotonic())
        self.mover.start("node1", times, self._pre_start, self._post_start)
        self.result.first_start_s = times.start_s
        self.start_client()

    def build(self) -> None:
        self.progress("building namespaces", None, None)
        self.topo = Topology.create(tag=f"lab{self.family}")
        self.workdir = tempfile.mkdtemp(prefix="nfsreset-lab-")
        state_dir = os.path.join(self.workdir, "state")
        os.mkdir(state_dir)
        state_dirs: dict[str, str] = {}
        if self.state == "per-head":
            for node in ("node1", "node2"):
                state_dirs[node] = os.path.join(self.workdir, f"state-{node}")
                os.mkdir(state_dirs[node])
        self.lab = LabContext(topo=self.topo, state_dir=state_dir, family=self.family, vip=self.vip,
                              ports=[PORT], nfsreset_argv=[sys.executable, "-m", "nfsreset"],
                              strategy=self.strategy, log=self.log, state_dirs=state_dirs)
        self.mover = make_mover(self.mover_name, self.topo, self.vip, self.gap, self.workdir,
                                state_dirs or state_dir, [PORT], self.strategy, self.log, crash=self.crash,
                                stop_delay=self.stop_delay)
        # Pacemaker movers: cold start, crash and rejoin figures, filled in as they happen.
        self.result.cluster = getattr(self.mover, "figures", None)
        # Pacemaker movers: daemons of a head run on the head's host, where attrd is.
        self.lab.host_argv = getattr(self.mover, "host_argv", None)

    def start_servers(self) -> None:
        if self.server == "ganesha":
            self.progress("starting NFS-Ganesha on node1 and node2", None, None)
            # the "shared disk": one directory both heads export
            self.export_dir = os.path.join(self.workdir, "export")
            os.mkdir(self.export_dir)
            t = time.monotonic()
            self.heads = ganesha.start_heads(self.topo, self.workdir, self.export_dir)
            self.result.server_start_s = time.monotonic() - t
            self.log(f"Ganesha listening on both heads after {self.result.server_start_s:.3f} s")
            return
        self.servers = start_servers(self.topo, self.workdir, close_on_delete=self.server == "sim-nfsd")

    def start_client(self) -> None:
        # --duration bounds the client even if we are killed without cleanup.
        duration = 60 + 3 * (self.cap + self.gap + (self.stop_delay or 0.0) + 10)
        self.client, self.client_log = start_client(
            self.topo, self.vip, self.workdir, user_timeout=self.user_timeout, duration=duration,
            extra=("--vers", self.vers, "--export", self.export_dir or "/"))
        self.result.client_port = self.client_log.port()
        self.progress("steady traffic", None, None)
        time.sleep(self.steady)

    def move(self, direction: str, old: str, new: str) -> report.DirectionResult:
        self.phase = direction
        self.progress(f"{direction}: moving the VIP {old} -> {new}", None, None)
        times: MoveTimes = self.mover.move(old, new, self._post_stop, self._pre_start, self._post_start)
        deadline = times.t_del + self.cap
        stage = f"{direction}: waiting for replies"
        while time.monotonic() < deadline:
            if self.client_log.first_reply_after(times.t_usable) is not None:
                break
            self.progress(stage, time.monotonic() - times.t_del, self.cap)
            time.sleep(0.1)
        # A little more, so the snapshot shows the sockets after the client settled.
        time.sleep(self.settle)
        stale = vip_sockets(self.topo, old, self.vip)
        recovered, stall, to_reply = report.measure(self.client_log.replies(), times.t_del,
                                                    times.t_usable, self.cap)
        events = [_event_text(ev, times.t_del) for ev in self.client_log.events()
                  if ev["t"] >= times.t_del - 0.5]
        self.log(f"{direction}: recovered={recovered} stall={stall} stale={stale}")
        return report.DirectionResult(
            direction=direction, old=old, new=new, cap=self.cap, recovered=recovered, stall=stall,
            usable_to_first_reply=to_reply, del_to_usable=times.t_usable - times.t_del,
            stale=stale, client_events=events[:20], stop_s=times.stop_s, start_s=times.start_s)

    def teardown(self) -> None:
        with _signals_held():
            if self.lab is not None:
                self.phase = "teardown"
                self._timed("teardown", None, lambda: self.remedy.teardown(self.lab))
            for proc in [self.client, *self.servers]:
                with contextlib.suppress(Exception):
                    stop_process(proc)
            for head in self.heads:
                with contextlib.suppress(Exception):
                    head.stop()
            if self.mover:
                with contextlib.suppress(Exception):
                    self.mover.close()
            if self.topo:
                self.topo.destroy()
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)


def run_lab(family: int, cap: float, remedy: Remedy, user_timeout: float = 180.0, gap: float = 1.0,
            progress: Progress | None = None, strategy: str | None = None,
            log: Callable[[str], None] | None = None, steady: float = 1.0,
            settle: float = 0.5, mover: str = "ip", server: str = "sim",
            vers: str | None = None, crash: bool = False, state: str = "shared",
            stop_delay: float | None = None) -> report.FamilyResult:
    """Run the lab once for `family` (4 or 6) with `remedy`, the VIP moved by
    `mover` (mover.MOVERS), the heads running `server` (SERVERS) and the client
    speaking `vers` (VERSIONS[server]; the first one by default); `crash`: the
    failover is a crash of node1 (Pacemaker movers only); `state` (STATES):
    one nfsreset state dir per head or one both see; `stop_delay` (Pacemaker
    movers): a Delay resource sleeps that long between the VIP's stop and its
    start elsewhere (the ip and agent movers take `gap`); everything removed
    afterwards.

    Raises LabError / TopologyError when the lab itself cannot be built or the
    client never talks to the VIP; a failing remedy hook is recorded instead.
    """
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    if server not in SERVERS:
        raise ValueError(f"server must be one of {SERVERS}, not {server!r}")
    vers = vers or VERSIONS[server][0]
    if vers not in VERSIONS[server]:
        raise ValueError(f"the {server} server speaks {', '.join(VERSIONS[server])}, not {vers!r}")
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, not {state!r}")
    run = _Run(family, cap, remedy, user_timeout, gap, progress or (lambda *_: None), strategy,
               log or (lambda _m: None), steady, settle, mover, server, vers, crash, state, stop_delay)
    try:
        run.begin()
        run.result.failover = run.move("failover", "node1", "node2")
        run.result.failback = run.move("failback", "node2", "node1")
        return run.result
    finally:
        run.teardown()


__all__ = ["run_lab", "SERVERS", "VERSIONS", "STATES", "vip_sockets", "start_servers", "start_client",
           "LabError", "TopologyError", "ClientLog"]
