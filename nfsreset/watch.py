"""`nfsreset watch`: the daemon. Sees VIPs leave and arrive (rtnetlink events say
when to ask the kernel again: nfsreset.presence), tracks their sessions (BPF flow
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
import errno
import json
import os
import queue
import re
import select
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from nfsreset import plan as P
from nfsreset import presence as PR
from nfsreset import addrs as A
from nfsreset.model import Flow, FlowKey, format_endpoint, norm_ip
from nfsreset.movereport import MOVE_REPORT_BOUND_S as _BOUND
from nfsreset.statedir import StateDir, StateError

RUN_DIR = "/run/nfsreset"


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
ATTRD_READ_REUSE_S = 2.0  # one attrd read serves an arrival (IPv6 DAD takes ~1 s)
ATTRD_FRESH_S = 0.1       # a copy older than this is read again after the arrival's tickle
PREFETCH_S = 1.0          # peers' lists of an away VIP are read this often (off the path)
ATTRD_TIMEOUT_JOIN_S = 6.0   # attrd_updater is bounded at 5 s (store.ATTRD_TIMEOUT_S)
PREFETCH_PER_S = 4.0      # at most this many attrd_updater reads a second for it
PUBLISH_RETRY_S = 2.0     # a list attrd did not take (not up, no peer online) is offered again
DUMP_PERIOD_S = 1.0       # without BPF: how often the table is rebuilt from dumps
# Idle wakeups: the main loop wakes once per STATE_FLUSH_S and the BPF reader
# once per BPF_POLL_MS (events wake it at once); VIP workers sleep on their
# queue. Only shutdown waits for these timeouts.
BPF_POLL_MS = 500
# Without BPF, while a move report is open, new connections are seen by dumps
# this often (the report's times are then this coarse); with BPF they carry the
# kernel's time of the socket's birth.
MOVE_DUMP_PERIOD_S = 0.05
# The move report's bound (nfsreset.movereport.MOVE_REPORT_BOUND_S); NFSRESET_MOVE_REPORT_BOUND_S
# is for tests, which keep a client stuck for a few seconds only; not a setting.
MOVE_REPORT_BOUND_S = _test_seconds("NFSRESET_MOVE_REPORT_BOUND_S", _BOUND, lo=0.5, hi=600.0)
# New connections remembered for a report opened just after them: reading a list
# of 65,536 clients takes ~0.5 s, while the tickle brings back ~25,000 a second.
RECENT_OPENS = 65536
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
    log_level: str = "info"     # --quiet: notice (warnings, errors, start, stop), --verbose: debug
    store: str = "auto"


class ConfigError(Exception):
    pass


CONFIG_KEYS = ("vips", "ports", "state_dir", "strategy", "netns", "metrics", "store")
CONFIG_MAX_BYTES = 1 << 20


def load_config(path: str) -> dict:
    """TOML: vips, ports, state_dir, strategy, netns, metrics ("HOST:PORT").

    Every value is checked for its type and meaning here, before anything is
    made: a config is input, and `ports = "12"` must not run on ports 1 and 2.
    Returns the keys present, with canonical values (vips normalised)."""
    import stat
    import tomllib
    if not path:
        raise ConfigError("--config: '' is not a file (an empty path)")
    try:
        # O_NONBLOCK: a FIFO given as the config must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"config {path} not found") from None
    except OSError as e:
        raise ConfigError(f"config {path}: cannot open it: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"config {path} is not a regular file"
                              + (" (a directory)" if stat.S_ISDIR(os.fstat(fd).st_mode) else ""))
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(CONFIG_MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read it: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > CONFIG_MAX_BYTES:
        raise ConfigError(f"config {path} is larger than {CONFIG_MAX_BYTES} bytes; not a config")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: {_one_line(str(e))}") from None
    unknown = set(doc) - set(CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"config {path}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(CONFIG_KEYS))})")
    try:
        return check_config(doc)
    except ValueError as e:
        raise ConfigError(f"config {path}: {e}") from None


def check_config(doc: dict) -> dict:
    """The values of a parsed config, checked strictly (bool is not int), or
    ValueError naming the key, the value and the type expected."""
    from nfsreset import netns as N
    from nfsreset.model import vip_address
    out: dict = {}
    if "vips" in doc:
        vips = _list_of(doc, "vips", str, "a list of addresses, e.g. vips = [\"198.51.100.10\"]")
        try:
            out["vips"] = [vip_address(v) for v in vips]
        except ValueError as e:
            raise ValueError(f"vips = {_toml(vips)}: {e}") from None
    if "ports" in doc:
        ports = _list_of(doc, "ports", int, "a list of TCP ports (integers 1-65535), e.g. ports = [2049]")
        bad = [p for p in ports if not 0 < p < 65536]
        if bad:
            raise ValueError(f"ports = {_toml(ports)}: {bad[0]} is not a TCP port; expected integers 1-65535")
        out["ports"] = ports
    if "state_dir" in doc:
        out["state_dir"] = _text(doc, "state_dir", "a directory path")
    if "store" in doc:
        from nfsreset.store import BACKENDS
        store = _text(doc, "store", f"one of {'|'.join(BACKENDS)}")
        if store not in BACKENDS:
            raise ValueError(f"store = {_toml(store)}: expected one of {'|'.join(BACKENDS)}")
        out["store"] = store
    if "strategy" in doc:
        strategy = _text(doc, "strategy", f"one of {'|'.join(P.STRATEGIES)}")
        if strategy not in P.STRATEGIES:
            raise ValueError(f"strategy = {_toml(strategy)}: expected one of {'|'.join(P.STRATEGIES)}")
        out["strategy"] = strategy
    if "netns" in doc:
        name = _text(doc, "netns", "a name from `ip netns list`", empty_ok=True)
        try:
            out["netns"] = N.check_name(name)
        except N.NetnsError as e:
            raise ValueError(f"netns = {_toml(name)}: {e}") from None
    if "metrics" in doc:
        text = _text(doc, "metrics", "HOST:PORT, e.g. metrics = \"127.0.0.1:9449\"")
        try:
            parse_metrics(text)
        except ConfigError as e:
            raise ValueError(f"metrics = {_toml(text)}: expected HOST:PORT with a port 1-65535, "
                             f"e.g. \"127.0.0.1:9449\"") from None
        out["metrics"] = text
    return out


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
               dict: "a table"}


def _type_name(v) -> str:
    return _TYPE_NAMES.get(type(v), f"a {type(v).__name__}")


def _toml(v) -> str:
    """A value as it would be written in the config (true, "x", [1, 2])."""
    return json.dumps(v, default=str)


def _list_of(doc: dict, key: str, kind: type, expected: str) -> list:
    v = doc[key]
    if not isinstance(v, list):
        raise ValueError(f"{key} = {_toml(v)} is {_type_name(v)}; expected {expected}")
    if not v:
        raise ValueError(f"{key} = [] is empty; expected {expected} (or leave {key} out)")
    for item in v:
        # type() and not isinstance(): a TOML true is a bool, which isinstance() takes for an int.
        if type(item) is not kind:
            raise ValueError(f"{key} = {_toml(v)}: {_toml(item)} is {_type_name(item)}; expected {expected}")
    return v


def _text(doc: dict, key: str, expected: str, empty_ok: bool = False) -> str:
    v = doc[key]
    if type(v) is not str:
        raise ValueError(f"{key} = {_toml(v)} is {_type_name(v)}; expected a string: {expected}")
    if not v and not empty_ok:
        raise ValueError(f"{key} = \"\" is empty; expected {expected}")
    return v


def _one_line(text: str) -> str:
    return " ".join(text.split())


def parse_metrics(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"--metrics wants HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


# -- the daemon's log ----------------------------------------------------------------------------
# syslog priorities: what journald reads from a "<N>" prefix (sd-daemon(3)).
# notice: start and stop (`ready` is the contract a starter waits for), shown by --quiet too.
LEVELS = {"error": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}
# How the engine and the state dir word what failed, was skipped or refused:
# their lines come without a level (they are shared with the one-shot hooks).
_WARNING_WORDS = (" failed: ", " failed (", " skipped: ", " survived: ", " not honoured: ", "cannot ",
                  "could not ", " lost ", " unavailable ")
_ERROR_WORDS = ("Traceback", "internal error")


def level_of(line: str) -> str:
    if any(w in line for w in _ERROR_WORDS):
        return "error"
    if any(w in line for w in _WARNING_WORDS) or line.startswith(("refused ", "ignored ", "kept ")):
        return "warning"
    return "info"


def journal_stream(fd: int) -> bool:
    """stderr is journald's stream: $JOURNAL_STREAM ("DEV:INODE", set by systemd
    for a unit whose stderr is the journal) names this very descriptor. A child
    whose stderr was redirected inherits the variable but not the stream."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(fd)
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError):
        return False


class Log:
    """The daemon's log lines on stderr, one write each (two threads' lines
    never run together). Under journald each line starts with "<N>", its
    priority; elsewhere with an ISO 8601 time (ms, UTC offset) and a level.
    Lines above `threshold` (--quiet: notice, --verbose: debug) are dropped.
    Called with one argument (as the engine does), a line's level is read from
    its wording (level_of)."""

    def __init__(self, threshold: str = "info", stream=None, journal: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.max = LEVELS[threshold]
        if journal is None:
            try:
                journal = journal_stream(self.stream.fileno())
            except (AttributeError, OSError, ValueError):
                journal = False
        self.journal = journal

    def __call__(self, line: str, level: str | None = None) -> None:
        level = level or level_of(line)
        prio = LEVELS[level]
        if prio > self.max:
            return
        line = " ".join(line.splitlines())
        if self.journal:
            text = f"<{prio}>nfsreset watch: {line}\n"
        else:
            import datetime
            stamp = datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")
            text = f"{stamp} {level.upper()} nfsreset watch: {line}\n"
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):   # stderr gone (journald restarted): nothing to tell it
            pass


# A line said again with only its timing changed is the same news.
_TIMING = re.compile(r" in [0-9.]+ ms\b")


def _histogram(name: str, buckets, counts, total: float) -> list[str]:
    """Prometheus histogram lines: cumulative buckets (the last count is past the
    last bound, i.e. only in +Inf), then _sum and _count."""
    out, acc = [], 0
    for b, n in zip(buckets, counts):
        acc += n
        out.append(f'{name}_bucket{{le="{b}"}} {acc}')
    acc += counts[-1]
    return out + [f'{name}_bucket{{le="+Inf"}} {acc}', f"{name}_sum {total:.6f}", f"{name}_count {acc}"]


class Metrics:
    """Prometheus text exposition, kept by hand (no client library on Debian's python)."""
    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
    RETURN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self):
        self.lock = threading.Lock()
        self.sessions: dict[str, int] = {}
        self.ended: dict[str, int] = {}
        self.tickles = 0
        self.guard_elements = 0
        self.events = 0
        self.hist = [0] * (len(self.BUCKETS) + 1)
        self.hist_sum = 0.0
        self.returns = [0] * (len(self.RETURN_BUCKETS) + 1)
        self.returns_sum = 0.0
        self.not_back = 0

    def observe_move(self, report) -> None:
        """A closed move report: each client's time to return, and those not back."""
        with self.lock:
            for seconds in report.back.values():
                self.returns_sum += seconds
                self.returns[next((i for i, b in enumerate(self.RETURN_BUCKETS) if seconds <= b), -1)] += 1
            self.not_back += len(report.missing)

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
            lines += _histogram("nfsreset_action_seconds", self.BUCKETS, self.hist, self.hist_sum)
            lines += ["# HELP nfsreset_client_return_seconds From a VIP usable here to each known client's "
                      "first new connection (move report).",
                      "# TYPE nfsreset_client_return_seconds histogram"]
            lines += _histogram("nfsreset_client_return_seconds", self.RETURN_BUCKETS, self.returns,
                                self.returns_sum)
            lines += ["# HELP nfsreset_clients_not_back_total Known clients not back within the move report's bound.",
                      "# TYPE nfsreset_clients_not_back_total counter",
                      f"nfsreset_clients_not_back_total {self.not_back}"]
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


# The metrics endpoint must never cost the daemon its descriptors or threads: one
# thread, one selector, a bounded number of connections, each with a deadline.
METRICS_MAX_CONNS = 16        # held at once; more are accepted and closed at once
METRICS_TIMEOUT_S = 2.0       # to send the request line and headers, then to take the reply
METRICS_MAX_REQUEST = 8192    # bytes of request head read at most
METRICS_ACCEPT_BACKOFF_S = 0.1   # after EMFILE & co.: the listener stays readable, do not spin


class MetricsError(ConfigError):
    pass


def bind_metrics(host: str, port: int, netns_name: str | None = None):
    """The listening socket for --metrics, in netns_name: made before anything else
    exists (state dir, nft table, BPF), so a port in use changes nothing.
    MetricsError (one line) if it cannot be had."""
    from nfsreset import netns
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    except (socket.gaierror, UnicodeError) as e:
        raise MetricsError(f"--metrics {shown}: cannot resolve {host!r}: {e}") from None
    fam, _, _, _, addr = infos[0]
    with netns.entered(netns_name):
        sock = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        why = "address in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e)).lower()
        raise MetricsError(f"--metrics {shown}: {why}") from None
    return sock


class MetricsServer:
    """HTTP/1.0-style GET /metrics on one selector thread. A connection gets
    METRICS_TIMEOUT_S to send its request and again to take the reply, then is
    closed; beyond METRICS_MAX_CONNS a connection is accepted and closed at once;
    accept errors (EMFILE, ENFILE, ENOBUFS...) are logged and survived."""

    def __init__(self, metrics: Metrics, sock, log: Callable[[str], None] = lambda line: None):
        self.metrics, self.sock, self.log = metrics, sock, log
        self.sel = selectors.DefaultSelector()     # epoll: no FD_SETSIZE limit
        self.conns: dict[int, dict] = {}           # fd -> {sock, deadline, inbuf, outbuf}
        self.stop = threading.Event()
        self.refused = 0
        self.accept_errors = 0
        self._paused_until = 0.0
        self.sel.register(sock, selectors.EVENT_READ, None)
        self.thread = threading.Thread(target=self._loop, name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2)
        for fd in list(self.conns):
            self._drop(fd)
        try:
            self.sel.close()
        finally:
            self.sock.close()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self._once()
            except Exception as e:   # never let the endpoint die silently, nor spin
                self.log(f"metrics endpoint: {type(e).__name__}: {e}")
                time.sleep(METRICS_ACCEPT_BACKOFF_S)

    def _once(self) -> None:
        now = time.monotonic()
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self.sel.register(self.sock, selectors.EVENT_READ, None)
        timeout = 0.5
        if self.conns:
            timeout = min(timeout, max(0.0, min(c["deadline"] for c in self.conns.values()) - now))
        if self._paused_until:
            timeout = min(timeout, max(0.0, self._paused_until - now))
        for key, events in self.sel.select(timeout):
            if key.data is None:
                self._accept()
            elif key.fd in self.conns:
                self._serve(key.fd, events)
        now = time.monotonic()
        for fd in [fd for fd, c in self.conns.items() if c["deadline"] <= now]:
            self._drop(fd)

    def _accept(self) -> None:
        for _ in range(256):   # bounded per wakeup; the selector brings us back
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                # EMFILE/ENFILE/ENOBUFS/ENOMEM: the pending connection stays queued
                # and the listener readable; look again a little later.
                self.accept_errors += 1
                if self.accept_errors == 1 or self.accept_errors % 1000 == 0:
                    self.log(f"metrics endpoint: accept failed ({e.strerror}); "
                             f"{self.accept_errors} time(s) so far, backing off")
                self.sel.unregister(self.sock)
                self._paused_until = time.monotonic() + METRICS_ACCEPT_BACKOFF_S
                return
            if len(self.conns) >= METRICS_MAX_CONNS:
                self.refused += 1
                conn.close()
                continue
            conn.setblocking(False)
            self.conns[conn.fileno()] = {"sock": conn, "deadline": time.monotonic() + METRICS_TIMEOUT_S,
                                         "inbuf": b"", "outbuf": None}
            self.sel.register(conn, selectors.EVENT_READ, "conn")

    def _drop(self, fd: int) -> None:
        c = self.conns.pop(fd, None)
        if c is None:
            return
        try:
            self.sel.unregister(c["sock"])
        except (KeyError, ValueError):
            pass
        c["sock"].close()

    def _serve(self, fd: int, events: int) -> None:
        c = self.conns[fd]
        s = c["sock"]
        try:
            if c["outbuf"] is None:
                data = s.recv(4096)
                if not data:
                    self._drop(fd)
                    return
                c["inbuf"] += data
                head_end = c["inbuf"].find(b"\r\n\r\n")
                if head_end < 0:
                    head_end = c["inbuf"].find(b"\n\n")
                if head_end < 0:
                    if len(c["inbuf"]) > METRICS_MAX_REQUEST:
                        self._drop(fd)
                    return
                c["outbuf"] = self._reply(c["inbuf"])
                c["deadline"] = time.monotonic() + METRICS_TIMEOUT_S
                self.sel.modify(s, selectors.EVENT_WRITE, "conn")
            n = s.send(c["outbuf"])
            c["outbuf"] = c["outbuf"][n:]
            if not c["outbuf"]:
                self._drop(fd)
        except BlockingIOError:
            return
        except OSError:
            self._drop(fd)

    def _reply(self, head: bytes) -> bytes:
        parts = head.split(b"\n", 1)[0].split()
        method = parts[0] if parts else b""
        path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
        if method not in (b"GET", b"HEAD"):
            status, body = "405 Method Not Allowed", b"GET only\n"
        elif path in (b"/metrics", b"/"):
            status, body = "200 OK", self.metrics.render().encode()
        else:
            status, body = "404 Not Found", b"see /metrics\n"
        hdr = (f"HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        return hdr + (b"" if method == b"HEAD" else body)


class _Later:
    """A read started now in a thread, its result (minus `known`) taken later."""

    def __init__(self, read: Callable[[], list[FlowKey]]):
        self._out: list[FlowKey] = []
        self._thread = threading.Thread(target=self._run, args=(read,), name="attrd-read", daemon=True)
        self._thread.start()

    def _run(self, read) -> None:
        try:
            self._out = read()
        except Exception:   # the arrival's first read already reported a bad list
            pass

    def result(self, known: set[FlowKey]) -> list[FlowKey]:
        self._thread.join(ATTRD_TIMEOUT_JOIN_S)
        return [k for k in self._out if k not in known]


class DaemonState(StateDir):
    """The state dir as the daemon and its engines share it: a client list is not
    written again while the file on disk is still the one this process wrote
    with the same clients (same inode and mtime: the peer's write or a removal
    changes them). The daemon keeps the list current while it owns a VIP, so
    the post-stop Record usually finds it there already; writing it anyway
    (sort, JSON, fsync) cost 60 ms of a 10,000-session teardown, before
    the first destroy."""

    def __init__(self, path: str, dry_run: bool = False, log: Callable[[str], None] | None = None,
                 store: str = "dir"):
        super().__init__(path, dry_run=dry_run, log=log)
        self.written: dict[str, tuple[frozenset[FlowKey], int, int]] = {}
        # attrd: each changed list is also published through Pacemaker's attrd, by
        # a thread of its own (an attrd_updater exec per peer, ~20 ms each, must
        # not hold up the loop that reacts to a VIP leaving); only the newest list
        # of a VIP is published, and one that did not change is not published again.
        # `auto` is decided at each publish and read, not once: the daemon
        # usually starts before Pacemaker (network-online.target), and a cluster
        # stack restarted under it comes back.
        from nfsreset import store as S
        self.store = store
        self.backend = S.choose(store)
        self.attrd = S.Attrd(log=self.log) if store != "dir" else None
        self._attrd_seen = self.backend == "attrd"
        self._to_publish: dict[str, frozenset[FlowKey]] = {}
        self._published: dict[str, frozenset[FlowKey]] = {}
        # Lists attrd did not take (not up yet, no peer online): offered again
        # every PUBLISH_RETRY_S until it does or the list changes.
        self._unpublished: dict[str, frozenset[FlowKey]] = {}
        self._retry_at = 0.0
        self._read_cache: dict[str, tuple[float, list[FlowKey]]] = {}
        self._read_lock = threading.Lock()
        self._read_locks: dict[str, threading.Lock] = {}
        self._used = threading.local()       # .age: of the attrd copy this thread's last read used
        self._prefetch_at = 0.0
        self._prefetching = False
        self._publish_cv = threading.Condition()
        self._publisher: threading.Thread | None = None
        self._stop_publisher = False

    def _publish_loop(self) -> None:
        while True:
            with self._publish_cv:
                while not self._to_publish and not self._stop_publisher:
                    self._publish_cv.wait()
                if self._stop_publisher and not self._to_publish:
                    return
                vip, keys = self._to_publish.popitem()
            try:
                self.attrd.publish(vip, keys)
                self._published[vip] = keys
                self._unpublished.pop(vip, None)
            except Exception as e:   # attrd down or refusing: the dir still has the list
                if self._unpublished.get(vip) != keys:    # one line per list, not per retry
                    self.log(f"publishing the clients of {vip} to attrd failed: {e}; "
                             f"trying again every {PUBLISH_RETRY_S:g} s")
                self._unpublished[vip] = keys

    def attrd_now(self):
        """The Attrd to use now (None: the dir alone). `auto` follows attrd coming and going."""
        if self.attrd is None:
            return None
        if self.store == "auto":
            from nfsreset.store import attrd_present
            up = attrd_present()
            if up != self._attrd_seen:
                self._attrd_seen = up
                self.log("client lists: Pacemaker's attrd is " + ("reachable now; lists go through it too"
                                                                  if up else "gone; the state dir only"))
            if not up:
                return None
        return self.attrd

    def retry_publish(self, now: float, here) -> None:
        """Offer lists attrd did not take again (from the flush, at most every
        PUBLISH_RETRY_S), for the VIPs still `here` only: once a VIP left, its
        slots belong to the next owner's lists."""
        if not self._unpublished or now < self._retry_at:
            return
        self._retry_at = now + PUBLISH_RETRY_S
        for vip, keys in list(self._unpublished.items()):
            if vip in here:
                self.publish(vip, keys)
            else:
                self._unpublished.pop(vip, None)

    def publish(self, vip: str, keys: frozenset[FlowKey]) -> None:
        if not keys or self._published.get(vip) == keys:
            return
        if self.attrd_now() is None:
            if self.attrd is not None:
                self._unpublished[vip] = keys     # published once attrd is up
            return
        with self._publish_cv:
            self._to_publish[vip] = keys
            if self._publisher is None:
                self._publisher = threading.Thread(target=self._publish_loop, name="attrd-publish", daemon=True)
                self._publisher.start()
            self._publish_cv.notify()

    def close_publisher(self, timeout: float = 5.0) -> None:
        with self._publish_cv:
            self._stop_publisher = True
            self._publish_cv.notify()
        if self._publisher is not None:
            self._publisher.join(timeout)

    def read_clients(self, vip: str, max_age: float = ATTRD_READ_REUSE_S) -> list[FlowKey]:
        """The dir's list, plus every node's list in attrd (attrd backend; a copy
        read at most `max_age` s ago is used as is)."""
        self._used.age = 0.0
        out: dict[FlowKey, None] = {}
        try:
            out.update(dict.fromkeys(super().read_clients(vip)))
        except StateError as e:
            if self.attrd_now() is None:
                raise
            self.log(str(e))
        attrd = self.attrd_now()
        if attrd is not None:
            try:
                out.update(dict.fromkeys(self._attrd_read(attrd, vip, max_age)))
            except StateError as e:
                self.log(str(e))
        return list(out)[: self.max_entries]

    def _attrd_read(self, attrd, vip: str, max_age: float) -> list[FlowKey]:
        """attrd's lists of `vip`. An attrd_updater exec is 20-40 ms here, so a
        copy at most `max_age` s old is used instead: the one prefetched while
        the VIP was away, the move report's and the post-start's read of the
        same arrival, IPv6's tentative read at usable."""
        with self._read_lock:
            lock = self._read_locks.setdefault(vip, threading.Lock())
        with lock:
            hit = self._read_cache.get(vip)
            if hit is not None and time.monotonic() - hit[0] < max_age:
                self._used.age = time.monotonic() - hit[0]
                return hit[1]
            keys = attrd.read(vip, self.max_entries)
            self._read_cache[vip] = (time.monotonic(), keys)
            return keys

    def used_copy(self) -> bool:
        """Did this thread's last read_clients() use an attrd copy older than ATTRD_FRESH_S?"""
        return getattr(self._used, "age", 0.0) > ATTRD_FRESH_S

    def prefetch(self, away, now: float) -> None:
        """Keep a copy of the peers' lists of the VIPs away from here, read by a
        thread at most every PREFETCH_S (slower with many VIPs: at most
        PREFETCH_PER_S execs a second): the VIP's arrival then tickles without
        waiting for attrd_updater, and reads it afresh in parallel (Daemon.act)."""
        away = sorted(away)
        if not away or now < self._prefetch_at or self._prefetching or self.attrd_now() is None:
            return
        self._prefetch_at = now + max(PREFETCH_S, len(away) / PREFETCH_PER_S)
        self._prefetching = True

        def run() -> None:
            try:
                for vip in away:
                    try:
                        self._attrd_read(self.attrd, vip, 0.0)
                    except Exception:   # the arrival's own read reports what is wrong
                        self._read_cache.pop(vip, None)
            finally:
                self._prefetching = False
        threading.Thread(target=run, name="attrd-prefetch", daemon=True).start()

    def _stamp(self, vip: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self._file(vip, "clients"))
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def write_clients(self, vip: str, keys) -> int:
        keys = frozenset(keys)
        self._read_cache.pop(vip, None)     # owner of the VIP now, or it left: read afresh next time
        self.publish(vip, keys)
        last = self.written.get(vip)
        if keys and last is not None and last[0] == keys and last[1:] == self._stamp(vip):
            return min(len(keys), self.max_entries)
        n = super().write_clients(vip, keys)
        stamp = self._stamp(vip) if n else None
        if stamp is not None:
            self.written[vip] = (keys, *stamp)
        return n


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
        # Move reports (nfsreset.movereport): the open one per VIP, the last closed
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
        from nfsreset import addrs
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
        reads it) from usable_at until each is back (nfsreset.movereport)."""
        from nfsreset.movereport import Move, Tuple
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
        from nfsreset import addrs, netns
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
                from nfsreset.guard import Guard
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


SO_ATTACH_FILTER, SO_RCVBUFFORCE = 26, 33
RTNL_RCVBUF = 1 << 20
# RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
RTNL_GROUPS = 0x10 | 0x40 | 0x100 | 0x400
RTNL_READS_PER_WAKEUP = 256   # datagrams; more are read at the next (immediate) select


_EVENT_CLASSES: dict | None = None
_NLMSG_HEADER = None   # pyroute2.netlink.nlmsg: the header alone


def _event_classes() -> dict:
    """{message type: pyroute2 class} of the events subscribed to. Imported on
    first use, not with this module: `nfsreset flows` imports it, and hooks
    must not pay pyroute2's import (addrs.py)."""
    global _EVENT_CLASSES, _NLMSG_HEADER
    if _EVENT_CLASSES is None:
        from pyroute2.netlink import nlmsg
        from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
        from pyroute2.netlink.rtnl.rtmsg import rtmsg
        _EVENT_CLASSES = {A.RTM_NEWADDR: ifaddrmsg, A.RTM_DELADDR: ifaddrmsg,
                          A.RTM_NEWROUTE: rtmsg, A.RTM_DELROUTE: rtmsg}
        _NLMSG_HEADER = nlmsg
    return _EVENT_CLASSES


def decode_rtnl(data: bytes) -> list:
    """The address and route messages of one datagram, decoded by pyroute2
    (fields and NLAs by name: msg["family"], msg.get_attr("IFA_LOCAL")). Other
    types are skipped. ValueError if the framing is broken."""
    classes = _event_classes()
    out = []
    off = 0
    while off + 16 <= len(data):   # sizeof(struct nlmsghdr)
        head = _NLMSG_HEADER(data, offset=off)
        head.decode()
        length, mtype = head["header"]["length"], head["header"]["type"]
        if length < 16 or off + length > len(data):
            raise ValueError(f"netlink message of {length} bytes at offset {off} of {len(data)}")
        cls = classes.get(mtype)
        if cls is not None:
            msg = cls(data, offset=off)
            msg.decode()
            out.append(msg)
        off += (length + 3) & ~3
    return out


def read_rtnl(sock: socket.socket) -> tuple[list, str | None]:
    """Everything the event socket holds now (up to RTNL_READS_PER_WAKEUP
    datagrams), decoded (decode_rtnl), and why events were lost, if they were:
    ENOBUFS (said once, then the socket goes on) or a datagram that would not
    decode. Either way the caller re-reads every VIP from the kernel."""
    out: list = []
    lost = None
    for _ in range(RTNL_READS_PER_WAKEUP):
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            lost = "receive buffer full"
            continue
        try:
            out += decode_rtnl(data)
        except Exception as e:   # the kernel's framing, or pyroute2's decoding: re-ask the kernel
            lost = f"undecodable datagram of {len(data)} bytes: {type(e).__name__}: {e}"
    return out, lost


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _only_local_routes(sock) -> None:
    """Classic BPF on the event socket: drop route notifications other than
    RTN_LOCAL in the kernel. A routing daemon's churn would otherwise wake us
    per route and overflow the receive buffer: 5,100 routes loaded at once gave
    ENOBUFS with a 2 MiB buffer. Each notification is one message per skb."""
    ld_b, jeq, ret = 0x30, 0x15, 0x06      # BPF_LD|BPF_B|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    type_lo = 4 if sys.byteorder == "little" else 5   # nlmsg_type's low byte (rtnetlink types < 256)
    prog = [(ld_b, 0, 0, type_lo),
            (jeq, 1, 0, 24),                # RTM_NEWROUTE
            (jeq, 0, 2, 25),                # RTM_DELROUTE; anything else: pass
            (ld_b, 0, 0, 16 + 7),           # rtmsg.rtm_type
            (jeq, 0, 1, A.RTN_LOCAL),
            (ret, 0, 0, 0xFFFFFFFF),        # pass
            (ret, 0, 0, 0)]                 # drop
    insns = (_SockFilter * len(prog))(*prog)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(_SockFprog(len(prog), insns)))


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
