"""Prometheus metrics of the daemon, and the bounded HTTP server that serves them."""
from __future__ import annotations

import errno
import selectors
import socket
import threading
import time
from collections.abc import Callable

from nfsreset.daemon.config import ConfigError


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
    from nfsreset.kernel import netns
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
