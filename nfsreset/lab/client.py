"""A client that behaves like the Linux NFS client over TCP: `python -m nfsreset.lab.client`.

Modelled on net/sunrpc/xprtsock.c with the mount defaults timeo=600,retrans=2:

- a reserved source port (xs_bind walks DOWN from the chosen port on
  EADDRINUSE) that is KEPT across reconnects (SO_REUSEADDR), so a reconnect
  after a move comes back with the same 4-tuple: the one a stale server
  socket on the old owner still holds;
- TCP_USER_TIMEOUT = timeo * (retrans + 1) = 180 s, keepalive idle/interval
  60 s with 3 probes (xs_tcp_set_socket_timeouts), TCP_NODELAY;
- one request in flight, a new one every --interval (20 ms) once answered;
- on ECONNRESET, EPIPE, ETIMEDOUT or EOF: abortive close, then reconnect from
  the same port; the first reconnect after a connection that worked is
  immediate, later ones back off 3, 6, 12 ... s (XS_TCP_INIT_REEST_TO,
  doubled up to XS_TCP_MAX_REEST_TO = 300 s).

What it says on the connection is nfs_client.py's business (--vers): echo
records for the sim server (server.py), or real NFS to NFS-Ganesha: NFSv3
GETATTR after MOUNT, NFSv4.0/4.1 COMPOUND(PUTROOTFH, GETATTR). A "reply" event
is a reply whose xid matches the call in flight and whose status is NFS_OK;
NFS errors are "nfs_error" events, state set-up (MNT, EXCHANGE_ID,
CREATE_SESSION) are "setup" events.

Nothing here has an RPC-level timeout: like the real client on a TCP mount
whose segments are answered by bare ACKs, only the kernel's user timeout ends
a connection that went nowhere. That is the failback stall the lab shows.

Every event is one JSON line on stdout, line-buffered, stamped with
CLOCK_MONOTONIC (`t`), which all network namespaces of one machine share:

    {"t": 812.120331, "ev": "reply", "seq": 17}
    {"t": 813.502112, "ev": "error", "op": "recv", "errno": 104, "err": "ECONNRESET"}
    {"t": 813.502410, "ev": "reconnect", "attempt": 1, "delay": 0.0}
    {"t": 813.503104, "ev": "connected", "port": 1023}
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import select
import signal
import socket
import struct
import sys
import time

from nfsreset.lab import rpc
from nfsreset.lab.nfs_client import VERSIONS, ProtocolError, make

INIT_REEST_TO = 3.0     # XS_TCP_INIT_REEST_TO
MAX_REEST_TO = 300.0    # XS_TCP_MAX_REEST_TO
MIN_RESVPORT = 665      # sunrpc.min_resvport default


def emit(ev: str, **fields) -> None:
    print(json.dumps({"t": round(time.monotonic(), 6), "ev": ev, **fields}), flush=True)


def errname(num: int | None) -> str:
    return errno.errorcode.get(num or 0, str(num))


class Dead(Exception):
    """The connection is unusable; carries what the kernel said."""

    def __init__(self, op: str, num: int | None) -> None:
        super().__init__(op, num)
        self.op, self.num = op, num


class Client:
    def __init__(self, server: str, port: int, user_timeout: float, keepalive: float,
                 interval: float, source_port: int, proto) -> None:
        self.server, self.port = server, port
        self.family = socket.AF_INET6 if ":" in server else socket.AF_INET
        self.user_timeout, self.keepalive = user_timeout, keepalive
        self.interval, self.proto = interval, proto
        self.src_port = source_port
        self.seq = 0
        self.xid = int.from_bytes(os.urandom(4), "big")
        self.capture: str | None = None

    # -- socket life ----------------------------------------------------------------
    def _bind(self) -> socket.socket:
        """Bind a reserved port: the last one used if free, else walk down (xs_bind)."""
        any_addr = "::" if self.family == socket.AF_INET6 else "0.0.0.0"
        port = self.src_port
        for _ in range(self.src_port - MIN_RESVPORT + 1):
            sock = socket.socket(self.family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((any_addr, port))
            except OSError as e:
                sock.close()
                if e.errno != errno.EADDRINUSE:
                    raise
                port -= 1
                continue
            if port != self.src_port:
                emit("bind_walk", old=self.src_port, port=port)
            self.src_port = port
            return sock
        raise OSError(errno.EADDRINUSE, "no free reserved port")

    def _tune(self, sock: socket.socket) -> None:
        # xs_tcp_set_socket_timeouts(): keepidle = timeo, keepcnt = retrans + 1.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(self.keepalive)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(self.keepalive)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.user_timeout * 1000))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @staticmethod
    def _abort(sock: socket.socket) -> None:
        # SO_LINGER 0: close sends RST and frees the port at once (no TIME_WAIT
        # would block the rebind, and the kernel socket is gone for good).
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()

    def connect(self, deadline: float) -> socket.socket:
        sock = self._bind()
        self._tune(sock)
        sock.setblocking(False)
        emit("connecting", port=self.src_port)
        rc = sock.connect_ex((self.server, self.port))
        if rc not in (0, errno.EINPROGRESS):
            self._abort(sock)
            raise Dead("connect", rc)
        # The user timeout bounds SYN retries too; this poll is only a backstop.
        limit = min(deadline, time.monotonic() + self.user_timeout + 5)
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        while not poller.poll(_ms_until(limit)):
            if time.monotonic() >= limit:
                self._abort(sock)
                raise Dead("connect", errno.ETIMEDOUT)
        rc = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if rc:
            self._abort(sock)
            raise Dead("connect", rc)
        emit("connected", port=self.src_port)
        return sock

    # -- one RPC ------------------------------------------------------------------
    def call(self, sock: socket.socket, deadline: float) -> str:
        """One call, its reply awaited with nothing else in flight (xid matched);
        the protocol's verdict (nfs_client: reply, setup, state or retry)."""
        self.seq += 1
        self.xid = (self.xid + 1) & 0xFFFFFFFF
        body, kind = self.proto.next_call(self.xid)
        try:
            sock.sendall(rpc.frame(body))  # small; fits the send buffer of a live socket
        except BlockingIOError:
            raise Dead("send", errno.EAGAIN) from None
        except OSError as e:
            raise Dead("send", e.errno) from None
        while True:
            msg = self._recv_record(sock, deadline)
            try:
                xid = rpc.reply_xid(msg)
            except rpc.XdrError:
                raise Dead("decode", errno.EBADMSG) from None
            if xid == self.xid:
                break
            emit("stray_reply", xid=xid)  # a late answer to an older call: not ours now
        if self.capture:
            self._capture(kind, msg)
        try:
            verdict = self.proto.on_reply(kind, msg, emit)
        except (rpc.XdrError, rpc.RpcError, ProtocolError) as e:
            emit("bad_reply", op=kind, why=str(e)[:200])
            raise Dead("decode", errno.EBADMSG) from None
        if verdict == "reply":
            emit("reply", seq=self.seq)
        return verdict

    def _capture(self, kind: str, msg: bytes) -> None:
        """Keep the first reply of each kind and status (test data for the codec)."""
        status = msg[24:28].hex() if len(msg) >= 28 else "short"
        path = os.path.join(self.capture, f"v{self.proto.vers}-{kind}-{status}.bin")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(msg)

    def _recv_record(self, sock: socket.socket, deadline: float) -> bytes:
        out = bytearray()
        while True:
            try:
                length, last = rpc.fragment_header(self._recv_exact(sock, 4, deadline))
            except rpc.XdrError:
                raise Dead("decode", errno.EMSGSIZE) from None
            if len(out) + length > rpc.MAX_RECORD:
                raise Dead("decode", errno.EMSGSIZE)
            out += self._recv_exact(sock, length, deadline)
            if last:
                return bytes(out)

    @staticmethod
    def _recv_exact(sock: socket.socket, want: int, deadline: float) -> bytes:
        got = bytearray()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while len(got) < want:
            if time.monotonic() >= deadline:
                raise TimeoutError
            if not poller.poll(min(500, _ms_until(deadline))):
                continue
            try:
                chunk = sock.recv(want - len(got))
            except BlockingIOError:
                continue
            except OSError as e:
                raise Dead("recv", e.errno) from None
            if not chunk:
                raise Dead("recv", None)  # EOF: the server closed
            got += chunk
        return bytes(got)

    def prepare(self, deadline: float) -> None:
        """The protocol's out-of-band setup (NFSv3: MOUNT), as a reconnect step."""
        try:
            self.proto.prepare(self.server, deadline, emit)
        except (OSError, rpc.XdrError, rpc.RpcError) as e:
            num = getattr(e, "errno", None) or errno.EIO
            emit("error", op="mount", errno=num, err=errname(num), why=str(e)[:200])
            raise Dead("mount", num) from None

    def run(self, duration: float) -> int:
        deadline = time.monotonic() + duration
        delay, backoff, attempt = 0.0, INIT_REEST_TO, 0
        while time.monotonic() < deadline:
            if attempt:
                emit("reconnect", attempt=attempt, delay=delay)
                time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
            attempt += 1
            worked = False
            try:
                self.prepare(deadline)
                sock = self.connect(deadline)
            except Dead as d:
                if d.op != "mount":
                    emit("error", op=d.op, errno=d.num, err=errname(d.num))
                delay, backoff = backoff, min(backoff * 2, MAX_REEST_TO)
                continue
            try:
                while True:
                    started = time.monotonic()
                    self.prepare(deadline)  # NFSv3 after a stale handle: MOUNT again
                    verdict = self.call(sock, deadline)
                    worked = True
                    if verdict not in ("setup", "state"):  # state calls go at once, as the state manager's do
                        time.sleep(max(0.0, started + self.interval - time.monotonic()))
            except Dead as d:
                if d.op != "mount":  # prepare() said it already
                    emit("error", op=d.op, errno=d.num, err=errname(d.num) if d.num else "EOF")
            except TimeoutError:
                break
            finally:
                self._abort(sock)
            if worked:
                delay, backoff = 0.0, INIT_REEST_TO
            else:
                delay, backoff = backoff, min(backoff * 2, MAX_REEST_TO)
        emit("done")
        return 0


def _ms_until(t: float) -> int:
    return max(0, int((t - time.monotonic()) * 1000) + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="server (VIP) address, v4 or v6")
    p.add_argument("--port", type=int, default=2049)
    p.add_argument("--user-timeout", type=float, default=180.0, help="TCP_USER_TIMEOUT, seconds")
    p.add_argument("--keepalive", type=float, default=60.0, help="keepalive idle and interval, seconds")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between requests")
    p.add_argument("--source-port", type=int, default=1023, help="first reserved port to try")
    p.add_argument("--payload", type=int, default=128, help="request size in bytes (echo only)")
    p.add_argument("--vers", choices=VERSIONS, default="echo",
                   help="echo: records echoed by the sim server; 3, 4.0, 4.1: real NFS (GETATTR)")
    p.add_argument("--export", default="/", help="NFSv3: the path to MOUNT")
    p.add_argument("--capture", metavar="DIR", help="save the first reply of each kind and status in DIR")
    p.add_argument("--duration", type=float, default=600.0, help="exit after this many seconds")
    args = p.parse_args(argv)
    if not MIN_RESVPORT <= args.source_port <= 65535:
        p.error(f"--source-port must be >= {MIN_RESVPORT}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    client = Client(args.server, args.port, args.user_timeout, args.keepalive,
                    args.interval, args.source_port, make(args.vers, args.export, args.payload))
    client.capture = args.capture
    try:
        return client.run(args.duration)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # our reader went away; nothing left to report to
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
