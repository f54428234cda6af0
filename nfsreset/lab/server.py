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

With --close-on-delete it behaves like kernel nfsd >= 4.5 instead: it listens
for RTM_DELADDR on rtnetlink and aborts every accepted socket whose local
address was deleted, the way nfsd does it. nfsd's inetaddr/inet6addr notifier
(nfsd_inetaddr_event, NETDEV_DOWN) calls svc_age_temp_xprts_now(), which marks
those transports XPT_CLOSE|XPT_KILL_TEMP; an nfsd thread then sets SO_LINGER 0
(svc_tcp_kill_temp_xprt), shuts the socket down (svc_tcp_sock_detach:
SHUT_RDWR) and releases it: a FIN, then an RST (close with linger 0 after the
FIN). Here: SO_LINGER {1, 0}, shutdown(SHUT_RDWR), close(). From a deleted
IPv4 address neither leaves the host; IPv6 still sends them (docs/design.md).

One JSON line per event on stdout (listening, accept, close), line-buffered.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import selectors
import signal
import socket
import struct
import sys
import time

LAST_FRAGMENT = 0x80000000
MAX_RECORD = 1 << 20

# rtnetlink (linux/rtnetlink.h, linux/if_addr.h)
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100
RTM_DELADDR = 21
IFA_ADDRESS, IFA_LOCAL = 1, 2
NLMSG_HDR = struct.Struct("=IHHII")     # len, type, flags, seq, pid
IFADDRMSG = struct.Struct("=BBBBI")     # family, prefixlen, flags, scope, index
RTATTR = struct.Struct("=HH")           # len, type


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


def addr_listener() -> socket.socket:
    """A NETLINK_ROUTE socket subscribed to IPv4 and IPv6 address events."""
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
    nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    nl.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
    return nl


def deleted_addrs(data: bytes) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Addresses named by the RTM_DELADDR messages in one netlink datagram
    (IFA_LOCAL for IPv4, which is the address itself on point-to-point links
    too; IFA_ADDRESS for IPv6). Every length is checked against the buffer."""
    out = []
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            break
        if kind == RTM_DELADDR and length >= NLMSG_HDR.size + IFADDRMSG.size:
            family = data[off + NLMSG_HDR.size]
            attrs: dict[int, bytes] = {}
            a = off + NLMSG_HDR.size + IFADDRMSG.size
            while a + RTATTR.size <= off + length:
                alen, atype = RTATTR.unpack_from(data, a)
                if alen < RTATTR.size or a + alen > off + length:
                    break
                attrs[atype] = data[a + RTATTR.size:a + alen]
                a += (alen + 3) & ~3
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if family == socket.AF_INET and raw and len(raw) == 4:
                out.append(ipaddress.IPv4Address(raw))
            elif family == socket.AF_INET6 and raw and len(raw) == 16:
                out.append(ipaddress.IPv6Address(raw))
        off += (length + 3) & ~3
    return out


def abort(sock: socket.socket) -> None:
    """Close `sock` as nfsd closes a transport whose address was deleted:
    linger 0, shutdown both ways (FIN), close (RST)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass      # already reset by the peer: close() still releases it
    sock.close()


class Conn:
    def __init__(self, sock: socket.socket, peer) -> None:
        self.sock = sock
        self.peer = peer
        # The local address as accepted (the VIP the client dialled).
        self.local = ipaddress.ip_address(sock.getsockname()[0].split("%")[0])
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


def serve(port: int, duration: float, close_on_delete: bool = False) -> int:
    sel = selectors.DefaultSelector()
    for ls in listeners(port):
        sel.register(ls, selectors.EVENT_READ, None)
    conns: dict[int, Conn] = {}
    if close_on_delete:
        # Subscribed before "listening": no delete after that line is missed.
        sel.register(addr_listener(), selectors.EVENT_READ, "netlink")
    emit("listening", port=port, close_on_delete=close_on_delete)
    deadline = time.monotonic() + duration

    def close(conn: Conn, why: str) -> None:
        sel.unregister(conn.sock)
        conns.pop(conn.sock.fileno(), None)
        if why == "address-deleted":
            abort(conn.sock)
        else:
            conn.sock.close()
        emit("close", peer=list(conn.peer[:2]), local=str(conn.local), why=why)

    def on_netlink(nl: socket.socket) -> None:
        for _ in range(64):       # bounded: at most 64 datagrams per wake-up
            try:
                data = nl.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:  # ENOBUFS: events lost; say so, keep serving
                emit("error", op="netlink", err=errno.errorcode.get(e.errno, str(e.errno)))
                return
            for addr in deleted_addrs(data):
                gone = [c for c in list(conns.values()) if c.local == addr]
                for conn in gone:
                    close(conn, "address-deleted")
                emit("address-deleted", addr=str(addr), closed=len(gone))

    while time.monotonic() < deadline:
        for key, mask in sel.select(timeout=1.0):
            if key.data == "netlink":
                on_netlink(key.fileobj)
                continue
            if key.data is None:
                try:
                    sock, peer = key.fileobj.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    continue
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = Conn(sock, peer)
                conns[sock.fileno()] = conn
                sel.register(sock, selectors.EVENT_READ, conn)
                emit("accept", peer=list(peer[:2]), local=list(sock.getsockname()[:2]))
                continue
            conn: Conn = key.data
            if conn.sock.fileno() < 0:
                continue          # closed earlier in this round (its address was deleted)
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
    p.add_argument("--close-on-delete", action="store_true",
                   help="abort the sockets whose local address is deleted, like kernel nfsd >= 4.5")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return serve(args.port, args.duration, args.close_on_delete)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
