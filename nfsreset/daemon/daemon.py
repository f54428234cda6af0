"""`nfsreset watch`: the daemon. Sees VIPs leave and arrive (rtnetlink events say
when to ask the kernel again: nfsreset.core.presence), tracks their sessions (BPF flow
tracker, or sock_diag dumps without BPF) and acts as docs/design.md §4 says, through the
same engine as the one-shot hooks.

Threads: the main thread owns the rtnetlink event socket and dispatches; a worker per VIP
runs the engine, so a 1.5 s tickle on one VIP never delays another VIP's
teardown; a BPF poller feeds the flow table. All threads share the namespace the
main thread entered before it started them (threads inherit it at creation).
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import json
import os
import queue
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Callable

from nfsreset.core import plan as P
from nfsreset.core import presence as PR
from nfsreset.core.model import Flow, FlowKey, format_endpoint, norm_ip
from nfsreset.core.movereport import MOVE_REPORT_BOUND_S as _BOUND
from nfsreset.daemon.clientlists import ATTRD_READ_REUSE_S, DaemonState, _Later
from nfsreset.daemon.config import Config
from nfsreset.daemon.livetable import RUN_DIR, _start_ticks, live_table_path
from nfsreset.daemon.log import Log
from nfsreset.daemon.metrics import Metrics, MetricsServer, bind_metrics
from nfsreset.daemon.rtnl import RTNL_GROUPS, RTNL_RCVBUF, SO_RCVBUFFORCE, _event_classes, _only_local_routes, read_rtnl
from nfsreset.kernel import addrs as A


def _test_seconds(name: str, default: float, lo: float = 0.05, hi: float = 60.0) -> float:
    """A period shortened by tests only (read once, at import): anything but a
    number in [lo, hi] leaves the default."""
    try:
        v = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return v if lo <= v <= hi else default


# Dump period for VIPs that are away (catch late stragglers). NFSRESET_AWAY_CHECK_S
# is for tests, which need several passes in a few seconds; not a setting.
AWAY_CHECK_S = _test_seconds("NFSRESET_AWAY_CHECK_S", 2.0)
STATE_FLUSH_S = 0.5       # client list written within this (issue: within 1 s)
DUMP_PERIOD_S = 1.0       # without BPF: how often the table is rebuilt from dumps
# Idle wakeups: the main loop wakes once per STATE_FLUSH_S and the BPF reader
# once per BPF_POLL_MS (events wake it at once); VIP workers sleep on their
# queue. Only shutdown waits for these timeouts.
BPF_POLL_MS = 500
# Without BPF, while a move report is open, new connections are seen by dumps
# this often (the report's times are then this coarse); with BPF they carry the
# kernel's time of the socket's birth.
MOVE_DUMP_PERIOD_S = 0.05
# The move report's bound (nfsreset.core.movereport.MOVE_REPORT_BOUND_S); NFSRESET_MOVE_REPORT_BOUND_S
# is for tests, which keep a client stuck for a few seconds only; not a setting.
MOVE_REPORT_BOUND_S = _test_seconds("NFSRESET_MOVE_REPORT_BOUND_S", _BOUND, lo=0.5, hi=600.0)
# New connections remembered for a report opened just after them: reading a list
# of 65,536 clients takes ~0.5 s, while the tickle brings back ~25,000 a second.
RECENT_OPENS = 65536
# While a teardown runs, the BPF reader leaves the close events it causes in the
# ring buffer (at most this long): both are Python threads, and reading 10,000
# events during 10,000 destroys took half the GIL (destroy step 84 -> 55 ms).
TEARDOWN_HOLD_S = 1.0

# A line said again with only its timing changed is the same news.
_TIMING = re.compile(r" in [0-9.]+ ms\b")

class Daemon:
    def __init__(self, cfg: Config, log: Callable[[str], None], metrics_sock=None):
        self.cfg = cfg
        self.log = log
        self.metrics = Metrics()
        self.metrics_sock = metrics_sock   # bound by the caller before anything was created
        self.metrics_server: MetricsServer | None = None
        self.stop = threading.Event()
        self.tracker = None
        self.table: dict[tuple[int | None, FlowKey], Flow] = {}   # (netns, key) -> flow
        self.table_lock = threading.Lock()
        self.present: dict[str, bool] = {}        # VIP -> configured here
        self.since: dict[str, float] = {}         # VIP -> monotonic time it (re)appeared
        self.old_cookies: dict[str, frozenset[int]] = {}
        self.dirty: set[str] = set()
        self.queues: dict[str, queue.Queue] = {v: queue.Queue() for v in cfg.vips}
        self.netns_ino = None
        self.state: DaemonState | None = None
        # VIP -> the kernel's last answer (address table + FIB local), re-read on
        # every event that concerns the VIP; only a change of it is acted on.
        self.presence: dict[str, PR.Presence] = {}
        # Bumped (under table_lock) whenever the table changes; the state dir and
        # the live table file are written only when it moved since the last flush.
        self.version = 0
        self.flushed_version = -1
        self.guard = None          # one nft context for the daemon's life (see run())
        self.teardowns = 0         # POST_STOP/AWAY runs in progress (under table_lock)
        self.quiet = threading.Event()   # set while teardowns == 0
        self.quiet.set()
        # VIP -> what its teardown runs said since it left (timings cut): an AWAY
        # pass that only does again what was said (re-quarantine, the same guard)
        # is a per-pass detail (debug), not news. Cleared when it leaves or arrives.
        self.said: dict[str, set[str]] = {}
        self._leveled = isinstance(log, Log)
        # Move reports (nfsreset.core.movereport): the open one per VIP, the last closed
        # one (for `nfsreset flows --json`), and recent new connections (a report
        # opened just after one still counts it). Under moves_lock.
        self.moves: dict = {}
        self.last_move: dict[str, dict] = {}
        self.recent_opens: collections.deque = collections.deque(maxlen=RECENT_OPENS)
        self.moves_lock = threading.Lock()

    def say(self, line: str, level: str | None = None) -> None:
        """A line of the daemon's own, at `level`; a plain one-argument log (tests,
        benches) gets every line but debug ones."""
        if self._leveled:
            self.log(line, level)
        elif level != "debug":
            self.log(line)

    def _once_log(self, vip: str, fresh: bool) -> tuple[Callable[[str], None], list[str]]:
        """The engine's log for a teardown run of `vip`: a line already said since
        the VIP left goes out as debug. fresh: this run starts the away period.
        Also returns the list of lines that went out as news."""
        if fresh:
            self.said[vip] = set()
        said = self.said.setdefault(vip, set())
        news: list[str] = []

        def log(line: str) -> None:
            key = _TIMING.sub("", line)
            if key in said:
                self.say(line, "debug")
            else:
                said.add(key)
                news.append(line)
                self.log(line)
        return log, news

    # -- engine glue -------------------------------------------------------------------------------
    def engine(self, vip: str, announce: bool = True, log: Callable[[str], None] | None = None):
        from nfsreset.engine import Engine
        opts = P.Options(vips=frozenset({vip}), ports=self.cfg.ports, strategy=self.cfg.strategy,
                         announce=announce)
        # One libnftables context for the daemon's life, not one per action
        # (a netlink socket and a listing of /proc/self/fd each; FD_SETSIZE abort).
        eng = Engine(opts, state=self.state, dry_run=self.cfg.dry_run, log=log or self.log, guard=self.guard)
        eng.enrich = self.enrich
        return eng

    def enrich(self, flows: list[Flow]) -> list[Flow]:
        """Dumped flows + first-seen/seq from the BPF table (same netns and tuple).

        Only while the VIP is here: first-seen decides staleness only for a
        configured VIP (one that is away makes every socket on it stale), and
        a dataclass copy per flow is ~2 us, 20 ms of a 10,000-session teardown."""
        if self.tracker is None or not flows or not self.present.get(flows[0].key.vip):
            return flows
        with self.table_lock:
            out = []
            for f in flows:
                t = self.table.get((self.netns_ino, f.key))
                out.append(dataclasses.replace(f, first_seen=t.first_seen, last_change=t.last_change,
                                               snd_nxt=t.snd_nxt, rcv_nxt=t.rcv_nxt) if t else f)
            return out

    def act(self, vip: str, moment: P.Moment, t_event: float, usable: bool = True) -> None:
        news = None
        log = None
        if moment is P.Moment.POST_START:
            self.said.pop(vip, None)
        else:
            log, news = self._once_log(vip, fresh=moment is P.Moment.POST_STOP)
        eng = self.engine(vip, announce=usable, log=log)
        known: list[FlowKey] = []
        fresh = None
        if moment is P.Moment.POST_START and self.state is not None:
            try:
                # tentative (IPv6 DAD): time to read attrd afresh; usable: the copy
                known = self.state.read_clients(vip, ATTRD_READ_REUSE_S if usable else 0.0)
            except Exception as e:   # a bad file must not stop the teardown
                self.log(f"cannot read client list of {vip}: {e}")
            if usable and self.state.used_copy():
                fresh = _Later(lambda: self.state.read_clients(vip, 0.0))
        teardown = moment is not P.Moment.POST_START
        if teardown:
            with self.table_lock:
                self.teardowns += 1
                self.quiet.clear()
        try:
            out = eng.run(moment, vip, known_clients=known, vip_since=self.since,
                          old_cookies=self.old_cookies.get(vip, frozenset()))
            late = fresh.result(set(known)) if fresh is not None else []
            if late and not out.code:
                # published after the copy the first tickle used (a client new in the last second)
                self.say(f"{len(late)} client tuple(s) of {vip} newer than the copy of attrd's lists "
                         "tickled first: tickling them too", "info")
                out = eng.run(moment, vip, known_clients=late, vip_since=self.since,
                              old_cookies=self.old_cookies.get(vip, frozenset()))
        finally:
            if teardown:
                with self.table_lock:
                    self.teardowns -= 1
                    if not self.teardowns:
                        self.quiet.set()
        took = time.monotonic() - t_event
        self.metrics.observe(took)
        self.metrics.count(out)
        if out.steps or out.code:
            line = (f"{vip} {moment.value}: done {took * 1000:.1f} ms after the event"
                    + (f"; exit {out.code}: {out.reason}" if out.code else ""))
            # An AWAY pass that said nothing new is a per-pass detail.
            quiet = moment is P.Moment.AWAY and not news and not out.code
            self.say(line, "debug" if quiet else ("warning" if out.code else "info"))

    def worker(self, vip: str) -> None:
        q = self.queues[vip]
        while True:
            item = q.get()          # shutdown() puts None
            if item is None or self.stop.is_set():
                return
            moment, t_event, usable = item
            try:
                self.act(vip, moment, t_event, usable)
            except Exception as e:
                self.say(f"{vip} {moment.value} failed: {type(e).__name__}: {e}", "error")

    # -- presence ------------------------------------------------------------------------------------
    def refresh(self, vips, now: float) -> None:
        """Ask the kernel whether `vips` are here and act on what changed. An event
        only says when to ask: the address may be on another device too, or
        local through a route, and the event may be one of several (or lost)."""
        from nfsreset.kernel import addrs
        try:
            seen = addrs.presence(sorted(vips))
        except OSError as e:   # nothing is acted on without the kernel's answer
            self.log(f"cannot read presence of {', '.join(sorted(vips))} from the kernel: {e}")
            return
        for vip, p in seen.items():
            self.on_presence(vip, p, now)

    def on_presence(self, vip: str, now_p: PR.Presence, now: float) -> None:
        was = self.presence.get(vip, PR.AWAY)
        self.presence[vip] = now_p
        change = PR.change(was, now_p)
        if change == PR.ARRIVED:
            self.present[vip] = True
            self.since[vip] = now
            # The list on disk is the last owner's now: write ours at the next flush.
            with self.table_lock:
                self.dirty.add(vip)
            # Every socket on the VIP right now predates the address: remember them,
            # the post-start run ends them (the daemon's pre-start moment).
            try:
                self.old_cookies[vip] = frozenset(f.cookie for f in self.engine(vip).dump(vip)
                                                  if f.cookie is not None)
            except Exception as e:   # the arrival still counts: unknown age is live
                self.old_cookies[vip] = frozenset()
                self.log(f"{vip}: cannot list its sockets at arrival ({type(e).__name__}: {e})")
            self.log(f"{vip} arrived" + ("" if now_p.usable else " (tentative: waiting for DAD)"))
            # While IPv6 DAD runs: end the old sockets and lift the quarantine at
            # once (IPaddr2 announces from the VIP right after DAD); announce and
            # tickle only once the address is usable.
            self.queues[vip].put((P.Moment.POST_START, now, now_p.usable))
            # After the worker has its order (the report's reading of the list must
            # not delay the tickle); connections meanwhile are replayed from recent_opens.
            if now_p.usable:
                self.open_move(vip, now)
        elif change == PR.USABLE:
            self.log(f"{vip} usable (DAD done)")
            self.queues[vip].put((P.Moment.POST_START, now, True))
            self.open_move(vip, now)
        elif change == PR.LEFT:
            self.present[vip] = False
            self.log(f"{vip} left")
            self.close_move(vip, now, cut="it left before the report was due")
            self.queues[vip].put((P.Moment.POST_STOP, now, True))

    def handle_rtnl(self, msgs) -> None:
        """Address events of a watched VIP, and `local` route events covering one,
        make those VIPs' presence be read again (once per batch). msgs: pyroute2
        ifaddrmsg/rtmsg, decoded (read_rtnl)."""
        now = time.monotonic()
        concerned: set[str] = set()
        for msg in msgs:
            mtype = msg["header"]["type"]
            if msg["family"] not in (socket.AF_INET, socket.AF_INET6):
                continue
            if mtype in (A.RTM_NEWADDR, A.RTM_DELADDR):
                ip = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if ip is None:
                    continue
                hit = {norm_ip(ip)} & self.cfg.vips
            elif mtype in (A.RTM_NEWROUTE, A.RTM_DELROUTE):
                # The socket filter passes only RTN_LOCAL ones. A VIP's own local
                # route goes after its RTM_DELADDR: the read for that may still see it.
                if msg["type"] != A.RTN_LOCAL:
                    continue
                fam = 6 if msg["family"] == socket.AF_INET6 else 4
                hit = PR.covered(self.cfg.vips, fam, msg.get_attr("RTA_DST"), msg["dst_len"])
            else:
                continue
            if hit:
                self.metrics.events += 1
                concerned |= hit
        if concerned:
            self.refresh(concerned, now)

    # -- flow table ----------------------------------------------------------------------------------
    def on_flow_event(self, ev) -> None:
        f = ev.flow
        k = (f.netns, f.key)
        here = self.present.get(f.key.vip)
        with self.table_lock:
            if ev.kind == "close":
                self.table.pop(k, None)
            else:
                self.table[k] = f
            self.version += 1
            if here:
                self.dirty.add(f.key.vip)
        if ev.kind == "open" and f.first_seen is not None:
            self.new_connection(f.key, f.first_seen)
        if not here and ev.kind != "close" and f.key.vip in self.cfg.vips:
            # A session on a VIP that is away: a straggler. End it now.
            self.queues[f.key.vip].put((P.Moment.AWAY, time.monotonic(), True))

    def poll_bpf(self) -> None:
        while not self.stop.is_set():
            for ev in self.tracker.poll(timeout_ms=BPF_POLL_MS):
                self.on_flow_event(ev)
            # A ring that overflows meanwhile is counted as lost: reconciled below.
            self.quiet.wait(TEARDOWN_HOLD_S)
            if self.tracker.lost:
                self.log(f"BPF ring buffer lost {self.tracker.lost} event(s); reconciling with a dump")
                self.tracker.lost = 0
                self.reconcile()

    def reconcile(self) -> None:
        """Rebuild the table from a sock_diag dump, keeping BPF's first-seen and seqs."""
        from nfsreset.kernel import sockdiag
        pairs = sockdiag.dump(local_ips=sorted(self.cfg.vips), local_ports=sorted(self.cfg.ports))
        with self.table_lock:
            old = self.table
            self.table = {}
            for f, _ in pairs:
                k = (self.netns_ino, f.key)
                prev = old.get(k)
                self.table[k] = prev if prev is not None and prev.state == f.state else \
                    dataclasses.replace(f, netns=self.netns_ino, first_seen=prev.first_seen if prev else None)
            new: list[FlowKey] = []
            if self.tracker is None and self.moves:   # the fallback's new connections (move reports)
                for (ns, k), f in self.table.items():
                    prev = old.get((ns, k))
                    if f.state == "ESTABLISHED" and (prev is None or prev.cookie != f.cookie):
                        new.append(k)
            # Without BPF this runs every second: only a real change counts.
            if self.table.keys() != old.keys() or any(old[k] is not f for k, f in self.table.items()):
                self.version += 1
                self.dirty |= {v for v, p in self.present.items() if p}
        now = time.monotonic()
        for k in new:   # without BPF, a connection's birth is known to within a dump period
            self.new_connection(k, now)

    # -- move reports --------------------------------------------------------------------------------
    def open_move(self, vip: str, usable_at: float) -> None:
        """Follow the VIP's known clients (the state dir's list, as the tickle
        reads it) from usable_at until each is back (nfsreset.core.movereport)."""
        from nfsreset.core.movereport import Move, Tuple
        keys: list[FlowKey] = []
        if self.state is not None:
            try:
                keys = self.state.read_clients(vip)
            except Exception as e:   # no report then; the tickle says what is wrong with the file
                self.say(f"no move report for {vip}: cannot read its client list ({e})", "warning")
                return
        move = Move(vip, usable_at, {Tuple(k.client, k.cport, k.vport) for k in keys}, bound_s=MOVE_REPORT_BOUND_S)
        since = self.since.get(vip, usable_at)   # connections since the address arrived are new
        with self.moves_lock:
            self.moves[vip] = move
            for k, at in self.recent_opens:
                if k.vip == vip and at >= since:
                    move.seen(k.client, k.cport, k.vport, max(at, usable_at))
        self.say(f"move report of {vip}: following {move.expected} known client tuple(s)", "debug")

    def new_connection(self, key: FlowKey, at: float) -> None:
        if key.vip not in self.cfg.vips:
            return
        with self.moves_lock:
            self.recent_opens.append((key, at))
            move = self.moves.get(key.vip)
            back = move.seen(key.client, key.cport, key.vport, at) if move is not None else None
        if back is not None:
            self.say(f"{format_endpoint(back.client, back.cport)} back on {key.vip} "
                     f"{at - move.usable_at:.3f} s after usable", "debug")

    def finish_moves(self, now: float) -> None:
        with self.moves_lock:
            due = [v for v, m in self.moves.items() if m.due(now)]
        for vip in due:
            self.close_move(vip, now)

    def close_move(self, vip: str, now: float, cut: str | None = None) -> None:
        """Write the report: one line, the histogram, the live table's `moves`.
        cut: why it is written before it was due (the VIP left, we stop)."""
        with self.moves_lock:
            move = self.moves.pop(vip, None)
        if move is None:
            return
        old = self.old_cookies.get(vip, frozenset())
        with self.table_lock:
            stale = sum(1 for (_, k), f in self.table.items()
                        if k.vip == vip and f.cookie in old and f.state not in ("TIME_WAIT", "CLOSE"))
        report = move.report(now, stale_left=stale)
        self.metrics.observe_move(report)
        line = report.line() + (f" ({cut})" if cut else "")
        self.say(line, "info" if report.complete and not stale else "warning")
        with self.table_lock:
            self.last_move[vip] = report.as_json() | {"cut": cut is not None}
            self.version += 1

    def flush_state(self) -> None:
        """Keep each local VIP's client list current (the peer tickles them), and
        the live table file for `nfsreset flows`; both only when the table changed."""
        if self.state is not None and not self.cfg.dry_run:
            self.state.retry_publish(time.monotonic(), {v for v in self.cfg.vips if self.present.get(v)})
            self.state.prefetch([v for v in self.cfg.vips if self.present.get(v) is False], time.monotonic())
        with self.table_lock:
            dirty, self.dirty = self.dirty, set()
            version = self.version
            if version == self.flushed_version and not dirty:
                return
            per_vip: dict[str, set[FlowKey]] = {}
            for (_, key), f in self.table.items():
                if f.state not in ("LISTEN", "TIME_WAIT", "CLOSE"):
                    per_vip.setdefault(key.vip, set()).add(key)
            rows = None if version == self.flushed_version else self._live_rows()
        for vip in self.cfg.vips:
            self.metrics.sessions[vip] = len(per_vip.get(vip, ()))
        if self.state is not None and not self.cfg.dry_run:
            for vip in dirty:
                if per_vip.get(vip):
                    self.state.write_clients(vip, per_vip[vip])
        if rows is not None:
            self.write_live_table(rows)
            self.flushed_version = version

    def _live_rows(self) -> list[dict]:
        # Unsorted: `nfsreset flows` looks rows up by tuple and sorts what it shows.
        return [{"vip": k.vip, "vport": k.vport, "client": k.client, "cport": k.cport, "state": f.state,
                 "first_seen": f.first_seen, "last_change": f.last_change,
                 "snd_nxt": f.snd_nxt, "rcv_nxt": f.rcv_nxt} for (_, k), f in self.table.items()]

    def write_live_table(self, rows: list[dict]) -> None:
        """/run/nfsreset/flows-<netns>.json: what `nfsreset flows` shows while we run.

        Written when the table changes, never as a heartbeat: readers tell a live
        writer by its pid and that pid's start time (read_live_table)."""
        doc = {"pid": os.getpid(), "started": _start_ticks(os.getpid()), "netns": self.netns_ino,
               "bpf": self.tracker is not None, "flows": rows, "moves": dict(self.last_move)}
        # 0600: the rows hold the exact snd_nxt/rcv_nxt of live sessions, all a local
        # user would need to inject into them. `nfsreset flows` reads it as root.
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        path = live_table_path(self.netns_ino)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp)     # one a killed run of this pid left
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)    # whatever the umask
            json.dump(doc, f)
        os.replace(tmp, path)

    def open_rtnl(self) -> socket.socket:
        """Non-blocking rtnetlink socket for address events and `local` route
        events, bound before presence is first read (no event falls between).
        Ours, read to the end at each wakeup; pyroute2 decodes what it holds
        (read_rtnl). Not pyroute2's IPRoute: its get() hands out one batch of
        what it read ahead, and select() on it missed the rest (docs/internals.md)."""
        _event_classes()   # pyroute2 imported now, not at the first event
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                             socket.NETLINK_ROUTE)
        try:
            try:   # as root past net.core.rmem_max; the kernel doubles it
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RTNL_RCVBUF)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RTNL_RCVBUF)
            try:
                _only_local_routes(sock)
            except OSError as e:
                self.log(f"cannot filter route events in the kernel ({e}); every route change will wake us")
            sock.bind((0, RTNL_GROUPS))
        except BaseException:
            sock.close()
            raise
        return sock

    # -- life cycle -----------------------------------------------------------------------------------
    def run(self, on_ready: Callable[[], None]) -> int:
        from nfsreset.kernel import addrs, netns
        if self.cfg.netns:
            netns.enter_for_good(self.cfg.netns)
        self.netns_ino = netns.current_inode()
        self.state = DaemonState(self.cfg.state_dir, dry_run=self.cfg.dry_run, log=self.log, store=self.cfg.store)
        self.log(f"client lists: {self.state.backend} backend"
                 + (" (Pacemaker's attrd, and the state dir)" if self.state.backend == "attrd" else
                    " for now (store auto: attrd as soon as Pacemaker's is reachable)" if self.cfg.store == "auto"
                    else ""))
        ipr = self.open_rtnl()   # before the first read of presence: no event falls between
        if self.cfg.bpf:
            try:
                # Raw tracepoints: no tracefs needed, so this works under `ip netns exec` as is.
                from nfsreset.flows.tracker import FlowTracker
                self.tracker = FlowTracker(ports=self.cfg.ports, vips=self.cfg.vips,
                                           netns_inodes=[self.netns_ino])
            except Exception as e:
                self.log(f"BPF flow tracker unavailable ({type(e).__name__}: {e}); running on sock_diag dumps")
                self.tracker = None
        else:
            self.log("BPF disabled (--no-bpf): running on sock_diag dumps")
        if self.tracker is not None:
            _trim_heap()
        if not self.cfg.dry_run:
            try:
                from nfsreset.kernel.guard import Guard
                self.guard = Guard()   # now, while we hold few descriptors
            except Exception as e:
                self.log(f"nftables unavailable ({type(e).__name__}: {e}); each action will try again")
        self.reconcile()
        self.presence = addrs.presence(sorted(self.cfg.vips))
        for vip, p in self.presence.items():
            self.present[vip] = p.local
        threads = [threading.Thread(target=self.worker, args=(v,), name=f"vip-{v}", daemon=True)
                   for v in self.cfg.vips]
        if self.tracker is not None:
            threads.append(threading.Thread(target=self.poll_bpf, name="bpf", daemon=True))
        for t in threads:
            t.start()
        if self.cfg.metrics:
            if self.metrics_sock is None:
                self.metrics_sock = bind_metrics(*self.cfg.metrics)
            self.metrics_server = MetricsServer(self.metrics, self.metrics_sock, self.log)
            self.metrics_server.start()
        # A restart while a VIP is away: end what its last stay left (no record:
        # the list the owner keeps must not be overwritten from here); the AWAY run
        # quarantines it again. A VIP that is here loses any quarantine element a
        # killed daemon or a hook left (fib already lets it send; this is the record).
        for vip, here in sorted(self.present.items()):
            self.log(f"{vip} is {'configured here' if here else 'away'}")
            if not here:
                self.queues[vip].put((P.Moment.AWAY, time.monotonic(), True))
            else:
                self.lift_left_quarantine(vip)
        with self.table_lock:
            self.dirty |= {v for v, p in self.present.items() if p}
        self.flush_state()
        on_ready()
        next_flush = next_away = last_dump = time.monotonic()
        try:
            while not self.stop.is_set():
                # Sleep until the next timer is due (a flush within STATE_FLUSH_S of
                # a change), at most STATE_FLUSH_S: SIGTERM is seen at that pace.
                # Without BPF: dumps every DUMP_PERIOD_S, or MOVE_DUMP_PERIOD_S from the
                # moment a move report opens (not from the next slow dump on).
                next_dump = last_dump + (MOVE_DUMP_PERIOD_S if self.moves else DUMP_PERIOD_S)
                due = min(next_flush, next_away, next_dump if self.tracker is None else next_flush)
                # An open move report closes within MOVE_DUMP_PERIOD_S of its last client back.
                wait = min(max(due - time.monotonic(), 0.0), MOVE_DUMP_PERIOD_S if self.moves else STATE_FLUSH_S)
                r, _, _ = select.select([ipr], [], [], wait)
                if r:
                    msgs, lost = read_rtnl(ipr)
                    if msgs:
                        self.handle_rtnl(msgs)
                    if lost:   # ENOBUFS: the kernel dropped events; it still knows the answer
                        self.log(f"address events lost ({lost}); reading presence again")
                        self.refresh(self.cfg.vips, time.monotonic())
                now = time.monotonic()
                if self.tracker is None and now >= last_dump + (MOVE_DUMP_PERIOD_S if self.moves else DUMP_PERIOD_S):
                    self.reconcile()
                    last_dump = now
                if self.moves:
                    self.finish_moves(now)
                if now >= next_flush:
                    self.flush_state()
                    next_flush = now + STATE_FLUSH_S
                if now >= next_away:
                    # Catches what no event announced (an `ip rule` change, a lost event).
                    self.refresh(self.cfg.vips, now)
                    away = {vip for vip, here in self.present.items() if not here}
                    if away:
                        with self.table_lock:
                            seen = {k.vip for (_, k) in self.table} & away
                        self.say(f"away check: {', '.join(sorted(away))} away; sessions left on "
                                 f"{', '.join(sorted(seen)) or 'none'}", "debug")
                        for vip in seen:
                            self.queues[vip].put((P.Moment.AWAY, now, True))
                    next_away = now + AWAY_CHECK_S
        finally:
            self.shutdown(ipr, threads)
        return 0

    def lift_left_quarantine(self, vip: str) -> None:
        if self.cfg.dry_run or self.guard is None:
            return
        try:
            if vip in self.guard.quarantined():
                self.guard.lift_quarantine(vip)
                self.log(f"lifted the quarantine of {vip} left from before (it is configured here)")
        except Exception as e:   # fib keeps it harmless; say so and go on
            self.log(f"could not lift the quarantine of {vip}: {e}")

    def shutdown(self, ipr, threads) -> None:
        self.stop.set()
        for vip in sorted(self.moves):   # what was seen so far is still worth a line
            self.close_move(vip, time.monotonic(), cut="stopped before the report was due")
        for q in self.queues.values():
            q.put(None)
        for t in threads:
            t.join(timeout=3)
        if self.state is not None:
            self.state.close_publisher()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.tracker is not None:
            self.tracker.close()
        done = ["BPF detached"] if self.tracker is not None else []
        if not self.cfg.dry_run:
            # Only what this daemon owns: its VIPs' quarantine and stale-tuple
            # elements. A hook's quarantine of another VIP stays; the table goes
            # only once nothing is left in it.
            try:
                from nfsreset.kernel.guard import Guard
                stale, quarantined = (self.guard or Guard()).release(self.cfg.vips)
                done.append(f"released {stale} stale tuple(s) and {quarantined} quarantine(s) of its VIPs")
            except Exception as e:
                self.log(f"could not release its nft elements: {e}")
        try:
            os.unlink(live_table_path(self.netns_ino))
        except OSError:
            pass
        ipr.close()
        self.say("stopped" + "".join(f"; {d}" for d in done), "notice")

def _trim_heap() -> None:
    """Hand back to the kernel the heap that LLVM freed after compiling the BPF
    program (glibc keeps it: measured ~30 MB of RSS). No-op without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_daemon(cfg: Config, metrics_sock=None) -> int:
    log = Log(cfg.log_level)

    d = Daemon(cfg, log, metrics_sock)

    def on_signal(signum, _frame):
        log(f"signal {signal.Signals(signum).name}: shutting down", "notice")
        d.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def ready():
        log(f"ready: watching {', '.join(sorted(cfg.vips))} port(s) {','.join(map(str, sorted(cfg.ports)))}"
            f" with {'BPF' if d.tracker else 'sock_diag dumps'}"
            + (" (dry run)" if cfg.dry_run else ""), "notice")

    return d.run(ready)
