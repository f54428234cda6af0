#!/usr/bin/env python3
"""Soak: many back-to-back VIP moves with `nfsreset watch` and the hooks, faults injected.

Run as root from the checkout (a benchmark, not a CI test):
    .venv/bin/python bench/soak.py [--moves 1000] [--fault-every 25] [--checkpoint 100] [--json]

The lab (nfsreset.lab: namespaces `nfsr-<pid>-...`, documentation addresses only):
node1 and node2 run the lab server (nfsd-like: keeps every socket whatever
happens to its address) and `nfsreset watch` watching both VIPs; the client
namespace runs one lab client (Linux NFS client-like: reserved source port kept
across reconnects, one RPC every 20 ms) per VIP, all the time. Each VIP is a
resource with the hooks a cluster runs around IPaddr2 (`kill` post-stop on the
old owner, `kill --moment pre-start` plus `tickle --wait` on the new one): the
lab's "hooks" remedy, one per VIP, next to the daemons, as a cluster with both
would have them.

Move i moves one VIP to the other node: IPv4 (198.51.100.10) and IPv6
(2001:db8::10) in turn, so each goes node1 -> node2 -> node1 ... and the two
are often on different nodes. A move is the lab's "ip" mover: `ip addr del`,
the post-stop hook, a short gap (--gap), pre-start, `ip addr add`, announce
(send_arp in the background, send_ua 0.8 s in the foreground for IPv6, as
IPaddr2), post-start. IPv6 is added with `nodad` (IPaddr2's nodad=true) unless
--dad: DAD takes ~1.6 s per move in these namespaces, and "optimistic" DAD does
not help: the address stays flagged tentative until DAD ends, and both the
daemon and `tickle --wait` wait for that before they announce and tickle.

Checks after every move (each failure is one `FAIL move N ...` line on stderr,
with the fault that came before it; the soak goes on):
  reply     the VIP's client gets a reply within --move-timeout after the
            address is usable on the new owner (else its client is restarted,
            so later moves are measured afresh)
  stale     no session on VIP:2049 left on the old owner (sock_diag dump in
            that node; --grace to go)
  qpresent  the VIP is not in the new owner's nft quarantine set (whether
            such an element mutes the VIP shows in "reply")
  hooks     every hook exits 0 and prints no traceback (a state-file fault
            excuses a non-zero exit of that move's hooks: bad input is exit 2)
  daemon    both daemons still run, and neither logged a traceback or a
            "... failed" line (an action that raised)
Every --checkpoint moves and at the end, after --settle-checkpoint s, one line:
  move, elapsed, stale (sessions on each VIP on the node without it), qpresent
  (quarantine elements for VIPs present on that node: must be 0), qaway (VIPs
  quarantined where they are away / VIPs away: information), bpf (entries
  of the daemon's BPF flow table, `slots` array + `flows` hash read by map id,
  against the kernel sockets it should follow: more is a leak, fewer means
  sessions older than a restarted daemon), live (the daemon's
  /run/nfsreset/flows-*.json against the dump: must agree), daemon VmRSS and
  fds per node, faults survived, failback "first reply after usable"
  median/p90/max so far, failed checks so far.

Faults, one every --fault-every moves, in turn (--faults picks/orders them):
  kill-standby  SIGKILL the daemon on the node that does not hold the next VIP
                to move, start it again (waits for `ready`)
  nft-standby   `nft delete table inet nfsreset` on that node, behind its back
  truncate      the next VIP's clients file truncated to 0 bytes, right after
                the old owner's post-stop hook recorded it (the new owner's
                tickle and daemon read it next)
  kill-owner    SIGKILL + start on the node that holds the next VIP
  crash-plain-start
                SIGKILL the standby's daemon; the next move starts the VIP
                there with no start hooks (an IPaddr2 without nfsreset's hooks,
                an operator's `ip addr add`), and the daemon is started again
                right after the address is usable, as systemd's Restart= would
  garbage       the clients file overwritten with garbage, at the same moment
  nft-owner     the nft table deleted on the node that holds the next VIP
  term-standby  SIGTERM + start (a `systemctl restart`) on the standby node
A fault is survived when the checks of the next two moves (one per VIP) pass.

At the end: the distribution of failback (to node1) and failover (to node2)
"first reply after usable" (min/p50/p90/p99/max and how many over 0.05 s),
per family too, over the moves whose client was talking (a reply in the last
second before the move; a client restarted after a hang may sit in SYN
back-off: such moves are counted apart, "not-talking"); each daemon's RSS growth from move 100 (or --rss-warmup moves
after a restart) to its last sample; totals. Exit 0 only if every check passed
and the run completed; 1 otherwise; 2 for bad arguments; 130/143 when
interrupted (teardown still complete: no namespace, nft table, BPF program or
process of this run is left).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from nfsreset.kernel import netns, sockdiag  # noqa: E402
from nfsreset.lab.mover import Mover, MoveTimes, stop_process  # noqa: E402
from nfsreset.lab.remedies import LabContext  # noqa: E402
from nfsreset.lab.remedy_hooks import Hooks  # noqa: E402
from nfsreset.lab.remedy_watch import Watch  # noqa: E402
from nfsreset.lab.run import PORT, ClientLog, LabError, start_client, start_servers  # noqa: E402
from nfsreset.lab.topology import VIP4, VIP6, Topology, TopologyError  # noqa: E402

NODES = ("node1", "node2")
VIP_OF = {4: VIP4, 6: VIP6}
SOURCE_PORT = {4: 1023, 6: 1000}     # one reserved port range per client, far apart
FAULTS = ("kill-standby", "nft-standby", "truncate", "kill-owner", "crash-plain-start", "garbage", "nft-owner",
          "term-standby")
STATE_FAULTS = ("truncate", "garbage")
STEADY_S = 1.0                      # a client with a reply this recent is "talking"
SLOW_S = 0.05                       # the bound for "first reply after usable"
RUN_DIR = "/run/nfsreset"           # where `watch` writes flows-<netns inode>.json
# States the BPF tracker follows (flowtrack.c: no listeners, no SYN_RECV
# children, a socket leaves at CLOSE, before TIME_WAIT's timewait sock exists).
UNTRACKED_STATES = ("LISTEN", "SYN_RECV", "NEW_SYN_RECV", "TIME_WAIT", "CLOSE")
# A session for the stale check: anything but a listener or a socket already
# ended (CLOSE: destroyed, its descriptor not yet closed by the server).
NOT_SESSIONS = ("LISTEN", "CLOSE")


class Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_held():
    """SIGINT/SIGTERM wait while the lab is removed (they arrive afterwards)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of a sorted list."""
    if not values:
        return None
    return values[max(0, math.ceil(q * len(values)) - 1)]


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


# -- what the kernel holds, read from outside the daemons ---------------------------------------
def vip_flows(ns: str, vips: list[str]) -> list:
    """Non-listening TCP sockets on VIPs:2049 in namespace `ns` (sock_diag dump)."""
    with netns.entered(ns):
        return [f for f, _ in sockdiag.dump(local_ips=vips, local_ports=[PORT])]


def nft_elements(topo: Topology, node: str) -> tuple[bool, set[str], list[tuple]]:
    """(table present, quarantined VIPs, guard tuples (client, cport, vip, vport))
    of `inet nfsreset` in `node`, from `nft -j list table`."""
    res = topo.run(node, "nft", "-j", "list", "table", "inet", "nfsreset", check=False, timeout=10)
    if res.returncode != 0:
        return False, set(), []
    quarantined: set[str] = set()
    guarded: list[tuple] = []
    for obj in json.loads(res.stdout or '{"nftables": []}').get("nftables", []):
        s = obj.get("set")
        if not s or s.get("table") != "nfsreset":
            continue
        for elem in s.get("elem", []):
            val = elem["elem"].get("val") if isinstance(elem, dict) and "elem" in elem else elem
            if s["name"].startswith("quarantine"):
                if isinstance(val, dict) and "prefix" in val:
                    val = f"{val['prefix'].get('addr')}/{val['prefix'].get('len')}"
                quarantined.add(str(val))
            elif s["name"].startswith("stale") and isinstance(val, dict) and "concat" in val:
                guarded.append(tuple(val["concat"]))
    return True, quarantined, guarded


def proc_status(pid: int) -> tuple[int, int] | None:
    """(VmRSS kB, open fds) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None


def bpf_flow_entries(pid: int) -> int | None:
    """Flows in the BPF table the daemon `pid` holds: occupied entries of its
    `slots` array (mapped by map id) plus its `flows` hash map (bpftool dump).
    None when the daemon holds no such maps (no BPF)."""
    from bcc.libbcc import lib

    from nfsreset.flows.ring import map_slots, occupied_slots

    ids = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
                ids |= {int(ln.split()[1]) for ln in f if ln.startswith("map_id:")}
    except OSError:
        return None
    maps = json.loads(subprocess.run(["bpftool", "map", "show", "-j"], capture_output=True, text=True,
                                     timeout=30, check=True).stdout or "[]")
    found, count = set(), 0
    for m in maps:
        if m.get("id") not in ids or m.get("name") not in ("flows", "slots"):
            continue
        if m["name"] == "flows":
            out = subprocess.run(["bpftool", "map", "dump", "id", str(m["id"]), "-j"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
            count += len(json.loads(out or "[]"))
        else:
            fd = lib.bpf_map_get_fd_by_id(m["id"])
            if fd < 0:
                return None
            try:
                with map_slots(fd, m["max_entries"]) as table:
                    count += len(occupied_slots(table))
            finally:
                os.close(fd)
        found.add(m["name"])
    return count if found == {"flows", "slots"} else None


def live_rows(ino: int) -> set[tuple] | None:
    """The daemon's live table (what `nfsreset flows` reads): {(vip, client, cport)}."""
    try:
        with open(os.path.join(RUN_DIR, f"flows-{ino}.json")) as f:
            doc = json.load(f)
        return {(r["vip"], r["client"], r["cport"]) for r in doc["flows"]
                if r.get("state") not in UNTRACKED_STATES}
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- the soak ---------------------------------------------------------------------------------------
class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.vips = [VIP_OF[f] for f in args.families]
        self.topo: Topology | None = None
        self.workdir: str | None = None
        self.state_dir: str | None = None
        self.inodes: dict[str, int] = {}
        self.servers: list[subprocess.Popen] = []
        self.clients: dict[str, tuple[subprocess.Popen, ClientLog]] = {}
        self.movers: dict[str, Mover] = {}
        self.hooks: dict[str, Hooks] = {}
        self.labs: dict[str, LabContext] = {}
        self.watch = Watch()
        self.watch_lab: LabContext | None = None
        self.owner: dict[str, str] = {}
        self.logfile = open(args.log, "w") if args.log else None
        self.log_lock = threading.Lock()
        self.daemon_tail = {n: collections.deque(maxlen=300) for n in NODES}
        self.daemon_tracebacks = collections.Counter()
        self.daemon_errors: collections.deque[str] = collections.deque()
        self.hook_lines: dict[str, list[str]] = {}
        self.hook_exits = collections.Counter()        # (hook, rc) -> count
        self.failures: list[dict] = []
        self.faults: list[dict] = []
        self.moves: list[dict] = []
        self.checkpoints: list[dict] = []
        self.samples = {n: [] for n in NODES}          # (move, pid, rss kB, fds)
        self.pending_state_fault: dict[str, dict] = {}  # vip -> fault to apply after its post-stop
        self.plain_start: dict[str, dict] = {}          # vip -> crash-plain-start fault for its next move
        self.client_restarts = 0
        self.restarted_at: dict[str, int] = {}
        self.t0 = time.monotonic()
        self.done = 0
        self.complete = False
        self.stopped_by: str | None = None

    # -- logging ---------------------------------------------------------------------------------------
    def _write_log(self, line: str) -> None:
        if self.logfile:
            with self.log_lock:
                self.logfile.write(f"{time.monotonic() - self.t0:9.3f} {line}\n")

    def daemon_log(self, line: str) -> None:
        m = re.match(r"\[(node\d)\] ", line)
        if m:
            self.daemon_tail[m.group(1)].append(line)
            if "Traceback" in line:
                self.daemon_tracebacks[m.group(1)] += 1
            if "Traceback" in line or re.search(r"\bfailed\b", line):
                self.daemon_errors.append(line)     # reported by the move that is running
        self._write_log(line)

    def hook_log(self, vip: str):
        def log(line: str) -> None:
            self.hook_lines[vip].append(line)
            self._write_log(f"{vip} {line}")
        return log

    def say(self, line: str) -> None:
        """A checkpoint or summary line: stdout (stderr with --json)."""
        print(line, file=sys.stderr if self.a.json else sys.stdout, flush=True)

    def fail(self, move: int, check: str, detail: str, vip: str | None = None, node: str | None = None) -> None:
        fault = self.recent_fault(move)
        rec = {"move": move, "check": check, "vip": vip, "node": node, "detail": one_line(detail, 1500),
               "after_fault": f"{fault['kind']}@{fault['move']} on {fault['node']}" if fault else None}
        self.failures.append(rec)
        if fault is not None:
            fault["survived"] = False
        where = f" {vip}" if vip else ""
        where += f" on {node}" if node else ""
        after = f" [{move - fault['move']} move(s) after fault {fault['kind']}@{fault['move']} on " \
                f"{fault['node']}]" if fault else ""
        print(f"FAIL move {move} {check}{where}{after}: {rec['detail']}", file=sys.stderr, flush=True)
        self._write_log(f"FAIL move {move} {check}{where}: {rec['detail']}")

    def recent_fault(self, move: int) -> dict | None:
        """The fault whose window (injection to two moves later) holds `move`."""
        for f in reversed(self.faults):
            if f["move"] <= move <= f["move"] + len(self.vips):
                return f
        return None

    # -- building ------------------------------------------------------------------------------------------
    def build(self) -> None:
        a = self.a
        self.topo = Topology.create(tag="soak")
        self.inodes = {n: os.stat(f"/run/netns/{self.topo.ns(n)}").st_ino for n in NODES}
        self.workdir = tempfile.mkdtemp(prefix="nfsreset-soak-")
        self.state_dir = os.path.join(self.workdir, "state")
        os.mkdir(self.state_dir, 0o700)
        argv = [sys.executable, "-m", "nfsreset"]
        self.servers = start_servers(self.topo, self.workdir, duration=a.max_time + 120)
        self.watch_lab = LabContext(topo=self.topo, state_dir=self.state_dir, family=a.families[0],
                                    vip=self.vips[0], ports=[PORT], nfsreset_argv=argv,
                                    log=self.daemon_log, vips=tuple(self.vips))
        self.watch.setup(self.watch_lab)
        for vip in self.vips:
            fam = 6 if ":" in vip else 4
            self.hook_lines[vip] = []
            self.labs[vip] = LabContext(topo=self.topo, state_dir=self.state_dir, family=fam, vip=vip,
                                        ports=[PORT], nfsreset_argv=argv, log=self.hook_log(vip),
                                        vips=tuple(self.vips))
            self.hooks[vip] = Hooks()
            self.movers[vip] = Mover(self.topo, vip, gap=a.gap, workdir=self.workdir, nodad=not a.dad,
                                     log=lambda m: self._write_log(m))
        for vip in self.vips:           # the first start runs the start hooks, as a cluster's does
            times = MoveTimes(old=None, new="node1", t_start=time.monotonic())
            self.movers[vip].start("node1", times, self.hook("pre_start", vip, 0), self.hook("post_start", vip, 0))
            self.owner[vip] = "node1"
        for vip in self.vips:
            self.clients[vip] = self.start_client(vip, wait=True)

    def start_client(self, vip: str, wait: bool) -> tuple[subprocess.Popen, ClientLog]:
        fam = 6 if ":" in vip else 4
        return start_client(self.topo, vip, self.workdir, user_timeout=self.a.user_timeout,
                            duration=self.a.max_time + 120, name=f"client{fam}-{self.client_restarts}",
                            extra=("--source-port", str(SOURCE_PORT[fam])), wait_reply=wait)

    # -- hooks, as a cluster runs them, with their results checked -------------------------------------------
    def hook(self, which: str, vip: str, move: int):
        hooks, lab = self.hooks[vip], self.labs[vip]

        def call(node: str, _vip: str) -> None:
            start = len(self.hook_lines[vip])
            try:
                getattr(hooks, which)(lab, node, vip)
            except Exception as e:  # a hook that times out or cannot run is a finding
                self.fail(move, "hooks", f"{which} raised {type(e).__name__}: {e}", vip, node)
            new = self.hook_lines[vip][start:]
            # A corrupt state file is bad input: exit 2 is the right answer from the new owner's hooks.
            excused = which != "post_stop" and move in self.state_fault_moves
            for line in new:
                m = re.search(r"nfsreset (\w+) exited (-?\d+)", line)
                if m:
                    rc = int(m.group(2))
                    name = f"{m.group(1)} {which.replace('_', '-')}"
                    self.hook_exits[(name, rc)] += 1
                    if not excused:
                        self.fail(move, "hooks", f"{name} exited {rc}: "
                                  + " | ".join(ln for ln in new if "exited" not in ln)[-600:], vip, node)
                if "Traceback" in line:
                    self.fail(move, "hooks", f"{which} printed a traceback: " + " | ".join(new)[-800:], vip, node)
            if which == "post_stop" and vip in self.pending_state_fault:
                self.apply_state_fault(self.pending_state_fault.pop(vip), move)
        return call

    @property
    def state_fault_moves(self) -> set[int]:
        return {f["applied_at"] for f in self.faults if f["kind"] in STATE_FAULTS and f.get("applied_at")}

    # -- one move --------------------------------------------------------------------------------------------
    def move(self, i: int) -> None:
        a = self.a
        vip = self.vips[(i - 1) % len(self.vips)]
        old = self.owner[vip]
        new = "node2" if old == "node1" else "node1"
        if vip in self.pending_state_fault:
            self.pending_state_fault[vip]["applied_at"] = i   # the fault hits this move's hooks
        # Only a client that was talking right before the move measures the move;
        # one restarted after a hang may be in SYN back-off still.
        _, log = self.clients[vip]
        steady = log.first_reply_after(time.monotonic() - STEADY_S) is not None
        plain = self.plain_start.pop(vip, None)
        if plain is not None:
            plain["applied_at"] = i
        pre = None if plain else self.hook("pre_start", vip, i)
        post = self.restart_after(plain, i) if plain else self.hook("post_start", vip, i)
        try:
            times = self.movers[vip].move(old, new, self.hook("post_stop", vip, i), pre, post)
        except (TopologyError, subprocess.SubprocessError, OSError) as e:
            # `ip addr` failed or the address never became usable: say so, put
            # the VIP where the kernel says it is (or on `new`), go on.
            self.fail(i, "move", f"{old} -> {new}: {type(e).__name__}: {e}", vip)
            self.resync(vip, new)
            return
        self.owner[vip] = new
        proc, log = self.clients[vip]
        deadline = times.t_usable + a.move_timeout
        while log.first_reply_after(times.t_usable) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        first = log.first_reply_after(times.t_usable)
        took = None if first is None else first - times.t_usable
        rec = {"move": i, "vip": vip, "family": 6 if ":" in vip else 4, "old": old, "new": new,
               "direction": "failback" if new == "node1" else "failover",
               "del_to_usable": round(times.t_usable - times.t_del, 4),
               "usable_to_first_reply": None if took is None else round(took, 4), "steady": steady,
               "elapsed": round(time.monotonic() - self.t0, 2)}
        fault = self.recent_fault(i)
        if fault is not None:
            rec["after_fault"] = f"{fault['kind']}@{fault['move']}"
        self.moves.append(rec)
        if took is None:
            self.diagnose_hang(i, vip, old, new, times.t_del, steady)
            self.client_restart(vip)
        self.check_move(i, vip, old, new)
        self.check_daemons(i)
        while self.daemon_errors:
            line = self.daemon_errors.popleft()
            self.fail(i, "daemon", f"logged: {line}", node=line[1:6])
        for node in NODES:
            pid = self.watch.procs[node].pid
            st = proc_status(pid)
            if st:
                self.samples[node].append((i, pid, *st))
        if a.settle > 0:
            time.sleep(a.settle)

    def restart_after(self, f: dict, move: int):
        """crash-plain-start: instead of the start hooks, the dead daemon comes back."""
        def call(node: str, _vip: str) -> None:
            t = time.monotonic()
            try:
                self.watch.spawn(self.watch_lab, node)
                self.watch.wait_ready((node,))
                f["detail"] += f"; the VIP started there without hooks; daemon ready {time.monotonic() - t:.1f} s" \
                               f" after the VIP was usable"
            except Exception as e:
                self.fail(move, "daemon", f"start after {f['kind']}: {e}", node=node)
        return call

    def resync(self, vip: str, want: str) -> None:
        where = [n for n in NODES if self.topo.has_addr(n, vip, usable=False)]
        for extra in where[1:]:
            self.topo.del_addr(extra, vip)
        if not where:
            self.topo.add_addr(want, vip, nodad=not self.a.dad)
        self.owner[vip] = where[0] if where else want

    def diagnose_hang(self, i: int, vip: str, old: str, new: str, t_del: float, steady: bool) -> None:
        _, log = self.clients[vip]
        last = log.first_reply_after(0.0) and log.replies()[-1]
        talk = f"last reply {t_del - last:.2f} s before the delete" if last else "no reply ever"
        if not steady:
            talk += f" (not talking before the move: its client was restarted after move {self.restarted_at[vip]}'s hang)"
        _, quarantined, _ = nft_elements(self.topo, new)
        here = [f"{f.state} {f.key.client}:{f.key.cport}" for f in vip_flows(self.topo.ns(new), [vip])]
        events = [f"{ev['t'] - t_del:+.3f} {ev.get('ev')} {ev.get('err') or ev.get('port') or ''}".strip()
                  for ev in log.events() if ev["t"] >= t_del - 0.5][-6:]
        tail = [ln for ln in self.daemon_tail[new]][-4:]
        self.fail(i, "reply", f"no reply within {self.a.move_timeout:g} s after {vip} usable on {new}; "
                  f"{new} quarantines {vip}: {'YES' if vip in quarantined else 'no'}; sockets there: {here}; "
                  f"client: {talk}, since the delete {events}; {new} daemon: {tail}", vip, new)

    def client_restart(self, vip: str) -> None:
        """A fresh client (fresh back-off), so the next moves are measured afresh."""
        proc, _ = self.clients[vip]
        stop_process(proc)
        self.client_restarts += 1
        self.restarted_at[vip] = self.done + 1
        self.clients[vip] = self.start_client(vip, wait=False)

    def check_move(self, i: int, vip: str, old: str, new: str) -> None:
        grace = time.monotonic() + self.a.grace
        while True:
            left = [f for f in vip_flows(self.topo.ns(old), [vip]) if f.state not in NOT_SESSIONS]
            _, quarantined, _ = nft_elements(self.topo, new)
            muted = vip in quarantined and self.topo.has_addr(new, vip, usable=False)
            if (not left and not muted) or time.monotonic() >= grace:
                break
            time.sleep(0.05)
        if left:
            self.fail(i, "stale", f"{len(left)} session(s) left on {old} after {vip} moved to {new}: "
                      + ", ".join(f"{f.state} {f.key.client}:{f.key.cport}" for f in left[:5]), vip, old)
        if muted:
            self.fail(i, "qpresent", f"{vip} is configured on {new} and in its nft quarantine set "
                      f"{self.a.grace:g} s after the move", vip, new)

    def check_daemons(self, i: int) -> None:
        for node in NODES:
            proc = self.watch.procs[node]
            if proc.poll() is not None:
                tail = list(self.daemon_tail[node])[-5:]
                self.fail(i, "daemon", f"nfsreset watch exited {proc.returncode}: {tail}; starting it again",
                          node=node)
                try:
                    self.watch.spawn(self.watch_lab, node)
                    self.watch.wait_ready((node,))
                except Exception as e:
                    self.fail(i, "daemon", f"could not start it again: {e}", node=node)

    # -- faults ------------------------------------------------------------------------------------------------
    def inject(self, i: int, kind: str) -> None:
        nxt = self.vips[i % len(self.vips)]            # the VIP that moves next
        owner = self.owner[nxt]
        standby = "node2" if owner == "node1" else "node1"
        node = owner if kind.endswith("-owner") else standby
        f = {"move": i, "kind": kind, "vip": nxt, "node": node, "survived": True, "detail": ""}
        self.faults.append(f)
        if kind in ("kill-standby", "kill-owner", "term-standby"):
            sig = signal.SIGTERM if kind.startswith("term") else signal.SIGKILL
            t = time.monotonic()
            try:
                rc = self.watch.restart(self.watch_lab, node, sig)
                f["detail"] = f"old daemon exit {rc}; new one ready in {time.monotonic() - t:.1f} s"
            except Exception as e:
                self.fail(i, "daemon", f"restart after {kind}: {e}", node=node)
                f["detail"] = f"restart failed: {e}"
        elif kind == "crash-plain-start":
            proc = self.watch.procs[node]
            proc.kill()
            f["detail"] = f"daemon SIGKILLed (exit {proc.wait(timeout=10)})"
            self.plain_start[nxt] = f
        elif kind.startswith("nft-"):
            res = self.topo.run(node, "nft", "delete", "table", "inet", "nfsreset", check=False, timeout=10)
            f["detail"] = "table deleted" if res.returncode == 0 else f"no table to delete ({one_line(res.stderr)})"
        elif kind in STATE_FAULTS:
            f["node"] = "state dir"
            self.pending_state_fault[nxt] = f
        self._write_log(f"fault {kind} at move {i} on {f['node']} ({nxt} next): {f['detail']}")

    def apply_state_fault(self, f: dict, move: int) -> None:
        path = os.path.join(self.state_dir, f"{f['vip']}.clients.json")
        existed = os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            if f["kind"] == "garbage":
                os.write(fd, b'{"format": 1, "clients": [[2049, "\xff\xfe garbage\x00' + os.urandom(64))
        finally:
            os.close(fd)
        f["detail"] = f"{os.path.basename(path)} {'truncated' if f['kind'] == 'truncate' else 'overwritten'}" \
                      f"{'' if existed else ' (it did not exist)'} after move {move}'s post-stop"
        self._write_log(f"fault {f['kind']} applied in move {move}: {f['detail']}")

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def checkpoint(self, i: int) -> dict:
        time.sleep(self.a.settle_checkpoint)
        deadline = time.monotonic() + 3.0
        while True:
            cp = self.snapshot(i)
            settled = all(cp["bpf"][n][0] is not None and cp["bpf"][n][0] <= cp["bpf"][n][1]
                          and cp["live"][n] == "ok" for n in NODES) and cp["stale"] == 0 and cp["qpresent"] == 0
            if settled or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        for node in NODES:
            if cp["stale_detail"][node]:
                self.fail(i, "stale", f"checkpoint: {cp['stale_detail'][node]}", node=node)
            if cp["q_detail"][node]:
                self.fail(i, "qpresent", f"checkpoint: present and quarantined: {cp['q_detail'][node]}", node=node)
            mapped, kern = cp["bpf"][node]
            if mapped is None:
                self.fail(i, "bpf", "checkpoint: no BPF flow table held by the daemon", node=node)
            elif mapped > kern:
                self.fail(i, "bpf", f"checkpoint: BPF table holds {mapped} flow(s), the kernel {kern}", node=node)
            if cp["live"][node] != "ok":
                self.fail(i, "live", f"checkpoint: live table vs kernel: {cp['live'][node]}", node=node)
        cp["failed_so_far"] = len(self.failures)
        self.checkpoints.append(cp)
        self.say(self.line(cp))
        return cp

    def snapshot(self, i: int) -> dict:
        stale, qpresent, guard_present, qaway, away_n = 0, 0, 0, 0, 0
        stale_detail, q_detail, bpf, live, rss, fds = {}, {}, {}, {}, {}, {}
        for node in NODES:
            ns = self.topo.ns(node)
            here = {v for v in self.vips if self.topo.has_addr(node, v, usable=False)}
            flows = vip_flows(ns, self.vips)
            away = [f for f in flows if f.key.vip not in here and f.state not in NOT_SESSIONS]
            stale += len(away)
            stale_detail[node] = ", ".join(f"{f.key.vip} {f.state} {f.key.client}:{f.key.cport}" for f in away[:5])
            _, quarantined, guarded = nft_elements(self.topo, node)
            qp = sorted(quarantined & here)
            qpresent += len(qp)
            away_n += len(self.vips) - len(here)
            qaway += len(quarantined & (set(self.vips) - here))
            q_detail[node] = ", ".join(qp)
            guard_present += sum(1 for g in guarded if len(g) == 4 and g[2] in here)
            tracked = {(f.key.vip, f.key.client, f.key.cport) for f in flows if f.state not in UNTRACKED_STATES}
            pid = self.watch.procs[node].pid
            try:
                mapped = bpf_flow_entries(pid)
            except Exception as e:
                mapped = None
                self._write_log(f"bpf read of {node}: {e}")
            bpf[node] = (mapped, len(tracked))
            rows = live_rows(self.inodes[node])
            if rows is None:
                live[node] = "no live table"
            elif rows != tracked:
                live[node] = f"file {sorted(rows)[:3]} kernel {sorted(tracked)[:3]}"
            else:
                live[node] = "ok"
            st = proc_status(pid)
            rss[node], fds[node] = (st if st else (None, None))
        fb = sorted(m["usable_to_first_reply"] for m in self.moves
                    if m["direction"] == "failback" and m["steady"] and m["usable_to_first_reply"] is not None)
        return {"move": i, "elapsed": round(time.monotonic() - self.t0, 1), "stale": stale, "qpresent": qpresent,
                "qaway": [qaway, away_n],
                "guard_present": guard_present, "stale_detail": stale_detail, "q_detail": q_detail,
                "bpf": bpf, "live": live, "rss_kb": rss, "fds": fds,
                "faults": len(self.faults), "faults_survived": self.survived(i),
                "failback": {"n": len(fb), "p50": pct(fb, 0.5), "p90": pct(fb, 0.9), "max": fb[-1] if fb else None}}

    def survived(self, upto: int) -> int:
        """Faults whose window is over by move `upto` and that no failed check hit."""
        return sum(1 for f in self.faults if f["survived"] and f["move"] + len(self.vips) <= upto)

    def line(self, cp: dict) -> str:
        short = {"node1": "n1", "node2": "n2"}
        bpf = ",".join(f"{short[n]}:{'-' if m is None else m}/{k}" for n, (m, k) in cp["bpf"].items())
        live = "ok" if all(v == "ok" for v in cp["live"].values()) else \
            ",".join(f"{short[n]}:{'ok' if v == 'ok' else 'DIFF'}" for n, v in cp["live"].items())
        rss = ",".join(f"{short[n]}:{'-' if v is None else f'{v / 1024:.1f}'}" for n, v in cp["rss_kb"].items())
        fds = ",".join(f"{short[n]}:{'-' if v is None else v}" for n, v in cp["fds"].items())
        done = sum(1 for f in self.faults if f["move"] + len(self.vips) <= cp["move"])
        fb = cp["failback"]
        return (f"move {cp['move']}/{self.a.moves} t={cp['elapsed']:.0f}s stale={cp['stale']} "
                f"qpresent={cp['qpresent']} qaway={cp['qaway'][0]}/{cp['qaway'][1]} bpf={bpf} live={live} rssMB={rss} fds={fds} "
                f"faults={cp['faults_survived']}/{done} failback_ms p50/p90/max={ms(fb['p50'])}/{ms(fb['p90'])}/"
                f"{ms(fb['max'])} (n={fb['n']}) fails={cp['failed_so_far']}")

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.a
        self.build()
        self._write_log(f"lab ready; netns inodes {self.inodes}; moving")
        self.t0 = time.monotonic()
        kinds = a.faults
        for i in range(1, a.moves + 1):
            if time.monotonic() - self.t0 > a.max_time:
                self.stopped_by = f"time bound --max-time {a.max_time:g} s reached after {self.done} moves"
                break
            self.move(i)
            self.done = i
            if i % a.checkpoint == 0 and i != a.moves:
                self.checkpoint(i)
            if a.fault_every and i % a.fault_every == 0 and i < a.moves and kinds:
                self.inject(i, kinds[(i // a.fault_every - 1) % len(kinds)])
        else:
            self.complete = True
        if self.done:
            self.checkpoint(self.done)

    def teardown(self) -> list[str]:
        """Everything started here stopped and removed; returns what was left (should be [])."""
        left = []
        with signals_held():
            for vip, hooks in self.hooks.items():
                with contextlib.suppress(Exception):
                    hooks.teardown(self.labs[vip])
            if self.watch_lab is not None:
                with contextlib.suppress(Exception):
                    self.watch.teardown(self.watch_lab)
            for proc, _ in self.clients.values():
                with contextlib.suppress(Exception):
                    stop_process(proc)
            for proc in self.servers:
                with contextlib.suppress(Exception):
                    stop_process(proc)
            for m in self.movers.values():
                with contextlib.suppress(Exception):
                    m.close()
            pids = [p.pid for p in self.watch.__dict__.get("procs", {}).values()]
            if self.topo is not None:
                names = list(self.topo.created)
                self.topo.destroy()
                left += [n for n in names if os.path.exists(f"/run/netns/{n}")]
            # A SIGKILLed daemon leaves its live table file; these inodes were ours.
            for ino in self.inodes.values():
                path = os.path.join(RUN_DIR, f"flows-{ino}.json")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            left += [f"pid {p}" for p in pids if os.path.exists(f"/proc/{p}")]
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            if self.logfile:
                self.logfile.close()
        return left

    # -- the summary ------------------------------------------------------------------------------------------------
    def distribution(self, direction: str, family: int | None = None) -> dict:
        every = [m for m in self.moves if m["direction"] == direction and (family is None or m["family"] == family)]
        sel = [m for m in every if m["steady"]]
        vals = sorted(m["usable_to_first_reply"] for m in sel if m["usable_to_first_reply"] is not None)
        return {"direction": direction, "family": family, "moves": len(sel), "replied": len(vals),
                "no_reply": len(sel) - len(vals), "client_not_talking": len(every) - len(sel), "min": vals[0] if vals else None, "p50": pct(vals, 0.5),
                "p90": pct(vals, 0.9), "p99": pct(vals, 0.99), "max": vals[-1] if vals else None,
                "over_50ms": sum(1 for v in vals if v > SLOW_S)}

    def rss_growth(self) -> dict:
        """Per node and daemon (pid): VmRSS from its warm sample to its last one.

        Warm: move --rss-from for the first daemon, --rss-warmup moves after a restart."""
        out = {}
        for node, samples in self.samples.items():
            spans = []
            first_pid = samples[0][1] if samples else None
            by_pid: dict[int, list] = {}
            for s in samples:
                by_pid.setdefault(s[1], []).append(s)
            for pid, ss in by_pid.items():
                start = 0 if pid == first_pid else ss[0][0]
                warm_at = self.a.rss_from if pid == first_pid else start + self.a.rss_warmup
                warm = [s for s in ss if s[0] >= warm_at]
                if len(warm) < 2:
                    continue
                spans.append({"pid": pid, "from_move": warm[0][0], "to_move": warm[-1][0],
                              "rss_kb_from": warm[0][2], "rss_kb_to": warm[-1][2],
                              "growth_kb": warm[-1][2] - warm[0][2], "fds_from": warm[0][3], "fds_to": warm[-1][3]})
            out[node] = {"daemons": len(by_pid), "spans": spans}
        return out

    def summary(self, left: list[str]) -> dict:
        dists = [self.distribution(d, f) for d in ("failback", "failover") for f in (None, *self.a.families)]
        growth = self.rss_growth()
        limit_kb = self.a.rss_limit_mib * 1024
        for node, g in growth.items():
            for sp in g["spans"]:
                if sp["growth_kb"] > limit_kb:
                    self.fail(self.done, "rss", f"daemon pid {sp['pid']} grew {sp['growth_kb']} kB from move "
                              f"{sp['from_move']} to {sp['to_move']} (limit {limit_kb} kB)", node=node)
                if sp["fds_to"] - sp["fds_from"] > self.a.fd_slack:
                    self.fail(self.done, "fds", f"daemon pid {sp['pid']} fds {sp['fds_from']} -> {sp['fds_to']} "
                              f"from move {sp['from_move']} to {sp['to_move']}", node=node)
        if left:
            self.fail(self.done, "teardown", f"left behind: {left}")
        by_kind = collections.defaultdict(lambda: [0, 0])
        for f in self.faults:
            by_kind[f["kind"]][1] += 1
            by_kind[f["kind"]][0] += f["survived"]
        checks = collections.Counter(f["check"] for f in self.failures)
        return {"moves": self.done, "moves_asked": self.a.moves, "complete": self.complete,
                "stopped_by": self.stopped_by, "elapsed_s": round(time.monotonic() - self.t0, 1),
                "families": self.a.families, "gap_s": self.a.gap, "dad": self.a.dad,
                "distributions": dists, "rss": growth,
                "faults": {"injected": len(self.faults), "survived": sum(f["survived"] for f in self.faults),
                           "by_kind": {k: {"survived": v[0], "injected": v[1]} for k, v in by_kind.items()},
                           "list": self.faults},
                "failed_checks": dict(checks), "failures": self.failures,
                "hook_exits": {f"{h} rc={rc}": n for (h, rc), n in sorted(self.hook_exits.items())},
                "daemon_tracebacks": dict(self.daemon_tracebacks), "client_restarts": self.client_restarts,
                "checkpoints": self.checkpoints, "left_behind": left, "move_records": self.moves}

    def print_summary(self, s: dict) -> None:
        say = self.say
        rate = s["elapsed_s"] / s["moves"] if s["moves"] else 0
        say(f"done: {s['moves']}/{s['moves_asked']} moves in {s['elapsed_s']:.0f} s ({rate:.2f} s/move)"
            + ("" if s["complete"] else f"; INCOMPLETE: {s['stopped_by'] or 'interrupted'}"))
        say("first reply after usable, ms:  moves  min   p50   p90   p99   max  >50ms  no-reply  not-talking")
        for d in s["distributions"]:
            name = f"{d['direction']} {'all' if d['family'] is None else 'v' + str(d['family'])}"
            say(f"  {name:<28} {d['moves']:5d} {ms(d['min']):>4} {ms(d['p50']):>5} {ms(d['p90']):>5} "
                f"{ms(d['p99']):>5} {ms(d['max']):>5} {d['over_50ms']:6d} {d['no_reply']:9d} "
                f"{d['client_not_talking']:12d}")
        for node, g in s["rss"].items():
            spans = g["spans"]
            if not spans:
                say(f"rss {node}: {g['daemons']} daemon(s); none lived past its warm-up (move {self.a.rss_from}, "
                    f"or {self.a.rss_warmup} moves after a restart) long enough to measure growth")
                continue
            first = spans[0]
            say(f"rss {node}: {g['daemons']} daemon(s); "
                + "; ".join(f"pid {sp['pid']} moves {sp['from_move']}->{sp['to_move']}: "
                            f"{sp['rss_kb_from'] / 1024:.1f} -> {sp['rss_kb_to'] / 1024:.1f} MB "
                            f"({sp['growth_kb']:+d} kB), fds {sp['fds_from']}->{sp['fds_to']}"
                            for sp in ([first] + sorted(spans[1:], key=lambda x: -x['growth_kb'])[:2])))
        f = s["faults"]
        say(f"faults: {f['survived']}/{f['injected']} survived ("
            + ", ".join(f"{k} {v['survived']}/{v['injected']}" for k, v in f["by_kind"].items()) + ")")
        say(f"non-zero hook exits: {s['hook_exits'] or 'none'}; daemon tracebacks: {s['daemon_tracebacks'] or 0}; "
            f"clients restarted after a hang: {s['client_restarts']}")
        say(f"failed checks: {sum(s['failed_checks'].values())}{' ' + str(s['failed_checks']) if s['failed_checks'] else ''}; "
            f"left behind: {s['left_behind'] or 'nothing'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moves", type=int, default=1000, help="VIP moves in all (default 1000)")
    p.add_argument("--fault-every", type=int, default=25, help="a fault after every K moves; 0: none (default 25)")
    p.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS), metavar="KIND",
                   help=f"fault kinds, in turn (default: {' '.join(FAULTS)})")
    p.add_argument("--checkpoint", type=int, default=100, help="a checkpoint line every N moves (default 100)")
    p.add_argument("--families", type=int, nargs="+", choices=(4, 6), default=[4, 6],
                   help="VIPs moved in turn: 4 (198.51.100.10) and/or 6 (2001:db8::10)")
    p.add_argument("--gap", type=float, default=0.05, help="seconds from delete to add (default 0.05)")
    p.add_argument("--dad", action="store_true", help="add IPv6 VIPs with DAD (~1.6 s per move) instead of nodad")
    p.add_argument("--move-timeout", type=float, default=5.0,
                   help="a move fails when its client has no reply this long after usable (default 5)")
    p.add_argument("--grace", type=float, default=1.0,
                   help="seconds a stale session or a quarantined present VIP may take to go (default 1)")
    p.add_argument("--settle", type=float, default=0.02, help="pause after each move (default 0.02)")
    p.add_argument("--settle-checkpoint", type=float, default=0.6,
                   help="pause before a checkpoint: the daemons flush their tables every 0.5 s (default 0.6)")
    p.add_argument("--user-timeout", type=float, default=180.0, help="the lab clients' TCP_USER_TIMEOUT (s)")
    p.add_argument("--max-time", type=float, default=None,
                   help="stop after this many seconds of moving (default 120 + 3 s per move)")
    p.add_argument("--rss-from", type=int, default=100, help="RSS growth counted from this move (default 100)")
    p.add_argument("--rss-warmup", type=int, default=25,
                   help="after a restart, RSS growth counted from this many moves later (default 25)")
    p.add_argument("--rss-limit-mib", type=float, default=2.0, help="RSS growth that fails the run (default 2)")
    p.add_argument("--fd-slack", type=int, default=4, help="fd growth per daemon that fails the run (default 4)")
    p.add_argument("--log", help="write every daemon and hook line, and each fault, to this file")
    p.add_argument("--json", action="store_true", help="summary as one JSON object on stdout (lines to stderr)")
    a = p.parse_args(argv)
    if a.moves < 1 or a.checkpoint < 1 or a.fault_every < 0:
        p.error("--moves and --checkpoint must be >= 1, --fault-every >= 0")
    if a.gap < 0 or a.move_timeout <= 0 or a.grace < 0 or a.settle < 0 or a.settle_checkpoint < 0:
        p.error("times must be >= 0 (--move-timeout > 0)")
    a.families = sorted(set(a.families))
    if a.max_time is None:
        a.max_time = 120 + 3.0 * a.moves
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("soak.py: needs root (network namespaces, BPF, nftables)", file=sys.stderr)
        return 2

    def on_signal(signum, _frame):
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    soak = Soak(a)
    code = None
    try:
        soak.run()
    except Interrupted as e:
        soak.stopped_by = f"signal {signal.Signals(e.signum).name}"
        code = 128 + e.signum
    except (LabError, RuntimeError, OSError, subprocess.SubprocessError) as e:
        soak.stopped_by = f"{type(e).__name__}: {one_line(e)}"
        print(f"soak.py: stopped at move {soak.done}: {soak.stopped_by}", file=sys.stderr)
        code = 1
    finally:
        left = soak.teardown()
    s = soak.summary(left)
    soak.print_summary(s)
    if a.json:
        print(json.dumps(s, default=str))
    if code is None:
        code = 0 if s["complete"] and not soak.failures else 1
    return code


if __name__ == "__main__":
    sys.exit(main())
