"""A server that keeps its sockets the way nfsd does: `python -m nfsreset.lab.server`.

It listens on [::]:PORT (IPV6_V6ONLY=1) and 0.0.0.0:PORT, like nfsd's two
listeners, and answers every request record with a reply record (RPC record
marking: 4-byte big-endian marker, top bit = last fragment, then the payload,
which is echoed back).

What matters for the lab is what it does NOT do: it never looks at addresses,
so deleting the VIP leaves every accepted socket open and ESTABLISHED. That is
a userspace server such as NFS-Ganesha, or a kernel nfsd older than 4.5 (newer
nfsd aborts sockets whose local address goes away, see docs/design.md §1). A socket is
closed only when the peer closes it or the kernel reports it dead.

One JSON line per event on stdout (listening, accept, close), line-buffered.
"""
from __future__ import annotations

import argparse
import errno
import json
import selectors
import signal
import socket
import struct
import sys
import time

LAST_FRAGMENT = 0x80000000
MAX_RECORD = 1 << 20


def emit(ev: str, **fields) -> None:
    print(json.dumps({"t": round(time.monotonic(), 6), "ev": ev, **fields}), flush=True)


def listeners(port: int) -> list[socket.socket]:
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    # Two separate listeners as nfsd has; with V6ONLY the v4 clients land on
    # the AF_INET socket and ss shows them with plain v4 addresses.
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    socks = []
    for sock, addr in ((v6, ("::", port)), (v4, ("0.0.0.0", port))):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
        socks.append(sock)
    return socks


class Conn:
    def __init__(self, sock: socket.socket, peer) -> None:
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()

    def take_records(self) -> list[bytes]:
        records = []
        while len(self.inbuf) >= 4:
            (marker,) = struct.unpack_from(">I", self.inbuf)
            length = marker & ~LAST_FRAGMENT
            if length > MAX_RECORD:
                raise OSError(errno.EMSGSIZE, "record too large")
            if len(self.inbuf) < 4 + length:
                break
            records.append(bytes(self.inbuf[4:4 + length]))
            del self.inbuf[:4 + length]
        return records


def serve(port: int, duration: float) -> int:
    sel = selectors.DefaultSelector()
    for ls in listeners(port):
        sel.register(ls, selectors.EVENT_READ, None)
    emit("listening", port=port)
    deadline = time.monotonic() + duration

    def close(conn: Conn, why: str) -> None:
        sel.unregister(conn.sock)
        conn.sock.close()
        emit("close", peer=list(conn.peer[:2]), why=why)

    while time.monotonic() < deadline:
        for key, mask in sel.select(timeout=1.0):
            if key.data is None:
                try:
                    sock, peer = key.fileobj.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    continue
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(sock, selectors.EVENT_READ, Conn(sock, peer))
                emit("accept", peer=list(peer[:2]), local=list(sock.getsockname()[:2]))
                continue
            conn: Conn = key.data
            try:
                if mask & selectors.EVENT_READ:
                    data = conn.sock.recv(65536)
                    if not data:
                        close(conn, "eof")
                        continue
                    conn.inbuf += data
                    for rec in conn.take_records():
                        conn.outbuf += struct.pack(">I", LAST_FRAGMENT | len(rec)) + rec
                if conn.outbuf:
                    sent = conn.sock.send(conn.outbuf)
                    del conn.outbuf[:sent]
            except BlockingIOError:
                pass
            except OSError as e:
                close(conn, errno.errorcode.get(e.errno, str(e.errno)))
                continue
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
            if key.events != want:
                sel.modify(conn.sock, want, conn)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=2049)
    p.add_argument("--duration", type=float, default=3600.0,
                   help="exit after this many seconds (a bound, in case nobody stops us)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return serve(args.port, args.duration)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
