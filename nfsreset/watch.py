"""`nfsreset watch`: the daemon. Sees VIPs leave and arrive (rtnetlink events via
pyroute2), tracks their sessions (BPF flow tracker, or sock_diag dumps without
BPF) and acts as DESIGN §4 says, through the same engine as the one-shot hooks.

Threads: the main thread owns the pyroute2 socket (pyroute2 0.9 delivers events
only to the thread that created the IPRoute) and dispatches; a worker per VIP
runs the engine, so a 1.5 s tickle on one VIP never delays another VIP's
teardown; a BPF poller feeds the flow table. All threads share the namespace the
main thread entered before it started them (threads inherit it at creation).
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import queue
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

from nfsreset import plan as P
from nfsreset.addrs import IFA_F_DADFAILED, IFA_F_TENTATIVE
from nfsreset.model import Flow, FlowKey, norm_ip
from nfsreset.statedir import StateDir

RUN_DIR = "/run/nfsreset"
AWAY_CHECK_S = 2.0        # dump period for VIPs that are away (catch late stragglers)
STATE_FLUSH_S = 0.5       # client list written within this (issue: within 1 s)
DUMP_PERIOD_S = 1.0       # without BPF: how often the table is rebuilt from dumps
# Idle wakeups: the main loop wakes once per STATE_FLUSH_S and the BPF reader
# once per BPF_POLL_MS (events wake it at once); VIP workers sleep on their
# queue. Only shutdown waits for these timeouts.
BPF_POLL_MS = 500
# While a teardown runs, the BPF reader leaves the close events it causes in the
# ring buffer (at most this long): both are Python threads, and reading 10,000
# events during 10,000 destroys took half the GIL (destroy step 84 -> 55 ms).
TEARDOWN_HOLD_S = 1.0


@dataclasses.dataclass
class Config:
    vips: frozenset[str]
    ports: frozenset[int] = frozenset({2049})
    state_dir: str = "/var/lib/nfsreset"
    strategy: str = "auto"
    netns: str | None = None
    metrics: tuple[str, int] | None = None
    dry_run: bool = False
    bpf: bool = True


class ConfigError(Exception):
    pass


def load_config(path: str) -> dict:
    """TOML: vips, ports, state_dir, strategy, netns, metrics ("HOST:PORT")."""
    import tomllib
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path}: {e}") from None
    known = {"vips", "ports", "state_dir", "strategy", "netns", "metrics"}
    unknown = set(doc) - known
    if unknown:
        raise ConfigError(f"config {path}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(known))})")
    return doc


def parse_metrics(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--metrics wants HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


class Metrics:
    """Prometheus text exposition, kept by hand (no client library on Debian's python)."""
    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self):
        self.lock = threading.Lock()
        self.sessions: dict[str, int] = {}
        self.ended: dict[str, int] = {}
        self.tickles = 0
        self.guard_elements = 0
        self.events = 0
        self.hist = [0] * (len(self.BUCKETS) + 1)
        self.hist_sum = 0.0

    def observe(self, seconds: float) -> None:
        with self.lock:
            self.hist_sum += seconds
            for i, b in enumerate(self.BUCKETS):
                if seconds <= b:
                    self.hist[i] += 1
                    break
            else:
                self.hist[-1] += 1

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP nfsreset_sessions TCP sessions on the watched ports, per VIP.",
                     "# TYPE nfsreset_sessions gauge"]
            lines += [f'nfsreset_sessions{{vip="{v}"}} {n}' for v, n in sorted(self.sessions.items())]
            lines += ["# HELP nfsreset_sessions_ended_total Stale sessions ended, by strategy.",
                      "# TYPE nfsreset_sessions_ended_total counter"]
            lines += [f'nfsreset_sessions_ended_total{{strategy="{s}"}} {n}' for s, n in sorted(self.ended.items())]
            lines += ["# TYPE nfsreset_tickles_sent_total counter", f"nfsreset_tickles_sent_total {self.tickles}",
                      "# TYPE nfsreset_guard_elements gauge", f"nfsreset_guard_elements {self.guard_elements}",
                      "# TYPE nfsreset_address_events_total counter", f"nfsreset_address_events_total {self.events}",
                      "# HELP nfsreset_action_seconds From address event to the action done.",
                      "# TYPE nfsreset_action_seconds histogram"]
            acc = 0
            for b, n in zip(self.BUCKETS, self.hist):
                acc += n
                lines.append(f'nfsreset_action_seconds_bucket{{le="{b}"}} {acc}')
            acc += self.hist[-1]
            lines += [f'nfsreset_action_seconds_bucket{{le="+Inf"}} {acc}',
                      f"nfsreset_action_seconds_sum {self.hist_sum:.6f}", f"nfsreset_action_seconds_count {acc}"]
            return "\n".join(lines) + "\n"

    def count(self, outcome) -> None:
        from nfsreset.engine import Kind
        with self.lock:
            for st in outcome.steps:
                if st.kind is Kind.DESTROY:
                    self.ended["destroy"] = self.ended.get("destroy", 0) + (st.destroyed or 0)
                elif st.kind is Kind.RST:
                    self.ended["rst"] = self.ended.get("rst", 0) + (st.reset or 0)
                elif st.kind is Kind.GUARD:
                    self.ended["nft"] = self.ended.get("nft", 0) + (st.added or 0)
                    self.guard_elements += st.added or 0
                elif st.kind is Kind.TICKLE:
                    self.tickles += st.sent or 0


def serve_metrics(metrics: Metrics, host: str, port: int) -> None:
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = metrics.render().encode()
            self.send_response(200 if self.path in ("/metrics", "/") else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=srv.serve_forever, name="metrics", daemon=True).start()


class DaemonState(StateDir):
    """The state dir as the daemon and its engines share it: a client list is not
    written again while the file on disk is still the one this process wrote
    with the same clients (same inode and mtime: the peer's write or a removal
    changes them). The daemon keeps the list current while it owns a VIP, so
    the post-stop Record usually finds it there already; writing it anyway
    (sort, JSON, fsync) cost 60 ms of a 10,000-session teardown, before
    the first destroy."""

    def __init__(self, path: str):
        super().__init__(path)
        self.written: dict[str, tuple[frozenset[FlowKey], int, int]] = {}

    def _stamp(self, vip: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self._file(vip, "clients"))
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def write_clients(self, vip: str, keys) -> int:
        keys = frozenset(keys)
        last = self.written.get(vip)
        if keys and last is not None and last[0] == keys and last[1:] == self._stamp(vip):
            return min(len(keys), self.max_entries)
        n = super().write_clients(vip, keys)
        stamp = self._stamp(vip) if n else None
        if stamp is not None:
            self.written[vip] = (keys, *stamp)
        return n


class Daemon:
    def __init__(self, cfg: Config, log: Callable[[str], None]):
        self.cfg = cfg
        self.log = log
        self.metrics = Metrics()
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
        self.pending_dad: set[str] = set()
        # Bumped (under table_lock) whenever the table changes; the state dir and
        # the live table file are written only when it moved since the last flush.
        self.version = 0
        self.flushed_version = -1
        self.guard = None          # one nft context for the daemon's life (see run())
        self.teardowns = 0         # POST_STOP/AWAY runs in progress (under table_lock)
        self.quiet = threading.Event()   # set while teardowns == 0
        self.quiet.set()

    # -- engine glue -------------------------------------------------------------------------------
    def engine(self, vip: str, announce: bool = True):
        from nfsreset.engine import Engine
        opts = P.Options(vips=frozenset({vip}), ports=self.cfg.ports, strategy=self.cfg.strategy,
                         announce=announce)
        # One libnftables context for the daemon's life, not one per action
        # (a netlink socket and a listing of /proc/self/fd each; FD_SETSIZE abort).
        eng = Engine(opts, state=self.state, dry_run=self.cfg.dry_run, log=self.log, guard=self.guard)
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
        eng = self.engine(vip, announce=usable)
        known: list[FlowKey] = []
        if moment is P.Moment.POST_START and self.state is not None:
            try:
                known = self.state.read_clients(vip)
            except Exception as e:   # a bad file must not stop the teardown
                self.log(f"cannot read client list of {vip}: {e}")
        teardown = moment is not P.Moment.POST_START
        if teardown:
            with self.table_lock:
                self.teardowns += 1
                self.quiet.clear()
        try:
            out = eng.run(moment, vip, known_clients=known, vip_since=self.since,
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
            self.log(f"{vip} {moment.value}: done {took * 1000:.1f} ms after the event"
                     + (f"; exit {out.code}: {out.reason}" if out.code else ""))

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
                self.log(f"{vip} {moment.value} failed: {type(e).__name__}: {e}")

    # -- address events -------------------------------------------------------------------------------
    def on_addr(self, vip: str, present: bool, tentative: bool, now: float) -> None:
        was = self.present.get(vip, False)
        if present and not was:
            self.present[vip] = True
            self.since[vip] = now
            # The list on disk is the last owner's now: write ours at the next flush.
            with self.table_lock:
                self.dirty.add(vip)
            # Every socket on the VIP right now predates the address: remember them,
            # the post-start run ends them (the daemon's pre-start moment).
            self.old_cookies[vip] = frozenset(f.cookie for f in self.engine(vip).dump(vip)
                                              if f.cookie is not None)
            self.log(f"{vip} arrived" + (" (tentative: waiting for DAD)" if tentative else ""))
            # While IPv6 DAD runs: end the old sockets and lift the quarantine at
            # once (IPaddr2 announces from the VIP right after DAD); announce and
            # tickle only once the address is usable.
            self.queues[vip].put((P.Moment.POST_START, now, not tentative))
            if tentative:
                self.pending_dad.add(vip)
        elif present and was and not tentative and vip in self.pending_dad:
            self.pending_dad.discard(vip)
            self.log(f"{vip} usable (DAD done)")
            self.queues[vip].put((P.Moment.POST_START, now, True))
        elif not present and was:
            self.present[vip] = False
            self.pending_dad.discard(vip)
            self.log(f"{vip} left")
            self.queues[vip].put((P.Moment.POST_STOP, now, True))

    def handle_rtnl(self, ipr) -> None:
        now = time.monotonic()
        for msg in ipr.get():
            ev = msg.get("event")
            if ev not in ("RTM_NEWADDR", "RTM_DELADDR"):
                continue
            ip = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if ip is None:
                continue
            ip = norm_ip(ip)
            if ip not in self.cfg.vips:
                continue
            self.metrics.events += 1
            flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
            self.on_addr(ip, ev == "RTM_NEWADDR", bool(flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)), now)

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
        from nfsreset import sockdiag
        pairs = sockdiag.dump(local_ips=sorted(self.cfg.vips), local_ports=sorted(self.cfg.ports))
        with self.table_lock:
            old = self.table
            self.table = {}
            for f, _ in pairs:
                k = (self.netns_ino, f.key)
                prev = old.get(k)
                self.table[k] = prev if prev is not None and prev.state == f.state else \
                    dataclasses.replace(f, netns=self.netns_ino, first_seen=prev.first_seen if prev else None)
            # Without BPF this runs every second: only a real change counts.
            if self.table.keys() != old.keys() or any(old[k] is not f for k, f in self.table.items()):
                self.version += 1
                self.dirty |= {v for v, p in self.present.items() if p}

    def flush_state(self) -> None:
        """Keep each local VIP's client list current (the peer tickles them), and
        the live table file for `nfsreset flows`; both only when the table changed."""
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
        # Unsorted: `nfsreset flows` looks rows up by tuple (sorting 10,000 FlowKeys
        # through the dataclass __lt__ costs ~40 ms).
        return [{"vip": k.vip, "vport": k.vport, "client": k.client, "cport": k.cport, "state": f.state,
                 "first_seen": f.first_seen, "last_change": f.last_change,
                 "snd_nxt": f.snd_nxt, "rcv_nxt": f.rcv_nxt} for (_, k), f in self.table.items()]

    def write_live_table(self, rows: list[dict]) -> None:
        """/run/nfsreset/flows-<netns>.json: what `nfsreset flows` shows while we run.

        Written when the table changes, never as a heartbeat: readers tell a live
        writer by its pid and that pid's start time (read_live_table)."""
        doc = {"pid": os.getpid(), "started": _start_ticks(os.getpid()), "netns": self.netns_ino,
               "bpf": self.tracker is not None, "flows": rows}
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        path = live_table_path(self.netns_ino)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)

    # -- life cycle -----------------------------------------------------------------------------------
    def run(self, on_ready: Callable[[], None]) -> int:
        from nfsreset import addrs, netns
        if self.cfg.netns:
            netns.enter_for_good(self.cfg.netns)
        self.netns_ino = netns.current_inode()
        self.state = DaemonState(self.cfg.state_dir)
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR
        ipr = IPRoute()
        ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)   # before the dump: no event falls between
        if self.cfg.bpf:
            try:
                # Raw tracepoints: no tracefs needed, so this works under `ip netns exec` as is.
                from nfsreset.tracker import FlowTracker
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
                from nfsreset.guard import Guard
                self.guard = Guard()   # now, while we hold few descriptors
            except Exception as e:
                self.log(f"nftables unavailable ({type(e).__name__}: {e}); each action will try again")
        self.reconcile()
        local = addrs.dump()
        for vip in self.cfg.vips:
            a = next((a for a in local if a.ip == vip), None)
            self.present[vip] = a is not None
            if a is not None and a.tentative:
                self.pending_dad.add(vip)
        threads = [threading.Thread(target=self.worker, args=(v,), name=f"vip-{v}", daemon=True)
                   for v in self.cfg.vips]
        if self.tracker is not None:
            threads.append(threading.Thread(target=self.poll_bpf, name="bpf", daemon=True))
        for t in threads:
            t.start()
        if self.cfg.metrics:
            serve_metrics(self.metrics, *self.cfg.metrics)
        # A restart while a VIP is away: end what its last stay left (no record:
        # the list the owner keeps must not be overwritten from here).
        for vip, here in sorted(self.present.items()):
            self.log(f"{vip} is {'configured here' if here else 'away'}")
            if not here:
                self.queues[vip].put((P.Moment.AWAY, time.monotonic(), True))
        with self.table_lock:
            self.dirty |= {v for v, p in self.present.items() if p}
        self.flush_state()
        on_ready()
        next_flush = next_away = next_dump = time.monotonic()
        try:
            while not self.stop.is_set():
                # Sleep until the next timer is due (a flush within STATE_FLUSH_S of
                # a change), at most STATE_FLUSH_S: SIGTERM is seen at that pace.
                due = min(next_flush, next_away, next_dump if self.tracker is None else next_flush)
                wait = min(max(due - time.monotonic(), 0.0), STATE_FLUSH_S)
                r, _, _ = select.select([ipr], [], [], wait)
                if r:
                    self.handle_rtnl(ipr)
                now = time.monotonic()
                if self.tracker is None and now >= next_dump:
                    self.reconcile()
                    next_dump = now + DUMP_PERIOD_S
                if now >= next_flush:
                    self.flush_state()
                    next_flush = now + STATE_FLUSH_S
                if now >= next_away:
                    away = {vip for vip, here in self.present.items() if not here}
                    if away:
                        with self.table_lock:
                            seen = {k.vip for (_, k) in self.table} & away
                        for vip in seen:
                            self.queues[vip].put((P.Moment.AWAY, now, True))
                    next_away = now + AWAY_CHECK_S
        finally:
            self.shutdown(ipr, threads)
        return 0

    def shutdown(self, ipr, threads) -> None:
        self.stop.set()
        for q in self.queues.values():
            q.put(None)
        for t in threads:
            t.join(timeout=3)
        if self.tracker is not None:
            self.tracker.close()
        if not self.cfg.dry_run:
            try:
                from nfsreset.guard import Guard
                (self.guard or Guard()).remove_all()
            except Exception as e:
                self.log(f"could not remove nft table: {e}")
        try:
            os.unlink(live_table_path(self.netns_ino))
        except OSError:
            pass
        ipr.close()
        self.log("stopped; BPF detached, nft table removed")


def live_table_path(netns_ino: int | None) -> str:
    return os.path.join(RUN_DIR, f"flows-{netns_ino}.json")


def read_live_table(netns_ino: int) -> dict | None:
    """The running daemon's table for this namespace, or None (no daemon, or a
    file its writer left behind). The file is rewritten only on change, so its
    age says nothing; the writer's pid and that pid's start time (clock ticks
    since boot, /proc/PID/stat) identify the very process that wrote it: a
    crashed daemon's file is refused even if its pid was reused since."""
    try:
        with open(live_table_path(netns_ino)) as f:
            doc = json.load(f)
        if _start_ticks(int(doc["pid"])) != int(doc["started"]):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return doc


def _start_ticks(pid: int) -> int:
    """Field 22 (starttime) of /proc/PID/stat; OSError if there is no such process."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        # comm (field 2) may hold spaces and parentheses: split after its last ')'
        return int(f.read().rsplit(b")", 1)[1].split()[19])


def _trim_heap() -> None:
    """Hand back to the kernel the heap that LLVM freed after compiling the BPF
    program (glibc keeps it: measured ~30 MB of RSS). No-op without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_daemon(cfg: Config) -> int:
    def log(line: str) -> None:
        print(f"nfsreset watch: {line}", file=sys.stderr, flush=True)

    d = Daemon(cfg, log)

    def on_signal(signum, _frame):
        log(f"signal {signal.Signals(signum).name}: shutting down")
        d.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def ready():
        log(f"ready: watching {', '.join(sorted(cfg.vips))} port(s) {','.join(map(str, sorted(cfg.ports)))}"
            f" with {'BPF' if d.tracker else 'sock_diag dumps'}"
            + (" (dry run)" if cfg.dry_run else ""))

    return d.run(ready)
