"""Is an address here? Asked of the kernel with a few dozen lines of rtnetlink.

A few dozen lines instead of pyroute2: importing pyroute2 and opening an
IPRoute costs ~0.13 s here, and hooks must send their first packet within
0.1 s of exec. The daemon, which starts once, decodes its address and route
events with pyroute2 (nfsreset.daemon.rtnl.decode_rtnl) and asks presence here.

Two questions share one socket and one datagram: the address table (an
RTM_GETADDR dump) and, per VIP, a FIB lookup (RTM_GETROUTE, what `ip route
get` asks), which answers RTN_LOCAL for an address that is local through a
`local` route range (AnyIP, LVS-DR) as well. nfsreset.core.presence decides from
both (docs/internals.md, "Presence").
"""
from __future__ import annotations

import dataclasses
import errno
import os
import socket
import struct
from collections.abc import Iterable

from nfsreset.core import presence as _presence
from nfsreset.core.presence import Presence
from nfsreset.kernel import netlink as nl
from nfsreset.kernel.netlink import NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR

RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_CACHEINFO, IFA_FLAGS = 1, 2, 3, 6, 8
IFA_F_TENTATIVE, IFA_F_DADFAILED = 0x40, 0x08
RTA_DST = 1
RTN_LOCAL = 2
RECV_TIMEOUT_S = 1.0   # the kernel answers at once; a reply never seen must not hang a hook
DUMP_TRIES = 3         # an address dump interrupted by a change (NLM_F_DUMP_INTR) is asked again

_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")


@dataclasses.dataclass(frozen=True)
class Addr:
    ip: str
    prefixlen: int
    ifindex: int
    tentative: bool   # IPv6 still in DAD (or failed it): configured but not usable
    dadfailed: bool = False
    # IFA_CACHEINFO cstamp: when the address was added, in centiseconds since boot on
    # the jiffies clock, 32 bits (plan.vip_arrival turns it into CLOCK_MONOTONIC).
    # An `ip addr replace` of a present address keeps it. None if the kernel sent none.
    cstamp: int | None = None


class _Interrupted(Exception):
    pass


def _exchange(sock: socket.socket,
              requests: list[tuple[int, int, bytes]]) -> list[list[tuple[int, bytes]] | OSError]:
    """Send `requests` ((type, flags, body), numbered 1..n) in one datagram and read
    until each is answered: a dump by NLMSG_DONE, a plain request by its one reply.
    Per request: its reply messages as (type, body), or the OSError the kernel
    answered with. _Interrupted if a dump says the table changed under it."""
    wire = b""
    for seq, (mtype, flags, body) in enumerate(requests, 1):
        wire += nl.message(mtype, flags, seq, body)
    sock.send(wire)
    out: list = [[] for _ in requests]
    dumps = {seq for seq, (_, flags, _) in enumerate(requests, 1) if flags & NLM_F_DUMP == NLM_F_DUMP}
    waiting = set(range(1, len(requests) + 1))
    interrupted = False
    for _ in range(100000):   # bounded in count here, in time by the socket timeout
        if not waiting:
            break
        data = sock.recv(1 << 16)
        for mtype, flags, seq, start, end in nl.messages(data, "rtnetlink"):
            if seq not in waiting:
                continue
            body = data[start:end]
            interrupted |= bool(flags & NLM_F_DUMP_INTR)
            if mtype in (NLMSG_DONE, NLMSG_ERROR):
                (err,) = nl.ERR.unpack_from(body) if len(body) >= nl.ERR.size else (0,)
                if err:
                    out[seq - 1] = OSError(-err, os.strerror(-err))
                waiting.discard(seq)
            else:
                out[seq - 1].append((mtype, body))
                if seq not in dumps:
                    waiting.discard(seq)
    if waiting:
        raise OSError(errno.EPROTO, "rtnetlink: no end of reply")
    if interrupted:
        raise _Interrupted()
    return out


def _route_lookup(ip: str) -> tuple[int, int, bytes] | None:
    """An RTM_GETROUTE request for `ip` (None: not an address we can ask about)."""
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        raw = socket.inet_pton(fam, ip)
    except (OSError, ValueError):
        return None
    body = _RTMSG.pack(fam, len(raw) * 8, 0, 0, 0, 0, 0, 0, 0) + nl.attr(RTA_DST, raw)
    return RTM_GETROUTE, NLM_F_REQUEST, body


def query(vips: Iterable[str] = ()) -> tuple[list[Addr], frozenset[str]]:
    """(the address table, the VIPs a FIB lookup says are local), in one round
    trip on one socket of the calling thread's network namespace. A lookup the
    kernel refuses (no route: ENETUNREACH) is an answer: not local."""
    vips = sorted(set(vips))
    lookups = [(v, r) for v, r in ((v, _route_lookup(v)) for v in vips) if r is not None]
    requests = [(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))]
    requests += [r for _, r in lookups]
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        sock.settimeout(RECV_TIMEOUT_S)
        sock.bind((0, 0))
        for attempt in range(DUMP_TRIES):
            try:
                replies = _exchange(sock, requests)
                break
            except _Interrupted:
                if attempt == DUMP_TRIES - 1:
                    raise OSError(errno.EAGAIN, "the address table kept changing during the dump") from None
    finally:
        sock.close()
    table = replies[0]
    if isinstance(table, OSError):
        raise OSError(table.errno, f"RTM_GETADDR failed: {table.strerror}")
    rows = [a for mtype, body in table if mtype == RTM_NEWADDR for a in (_parse(body),) if a is not None]
    fib = frozenset(v for (v, _), rep in zip(lookups, replies[1:])
                    if not isinstance(rep, OSError)
                    and any(mtype == RTM_NEWROUTE and len(body) >= _RTMSG.size and body[7] == RTN_LOCAL
                            for mtype, body in rep))
    return rows, fib


def dump() -> list[Addr]:
    """The address table (every device, tentative addresses included)."""
    return query()[0]


def presence(vips: Iterable[str]) -> dict[str, Presence]:
    """Per VIP: local here (address table or FIB) and usable (out of DAD)."""
    vips = list(vips)
    rows, fib = query(vips)
    return _presence.presence(vips, rows, fib)


def _parse(msg: bytes) -> Addr | None:
    family, plen, flags, _, ifindex = _IFADDRMSG.unpack_from(msg)
    attrs = nl.attrs(msg, _IFADDRMSG.size)
    if IFA_FLAGS in attrs:
        (flags,) = struct.unpack("=I", attrs[IFA_FLAGS][:4])
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    # inet_ntop, not ipaddress: same RFC 5952 text, and hooks skip ~5 ms of import.
    ip = socket.inet_ntop(family, raw)
    ci = attrs.get(IFA_CACHEINFO)
    cstamp = struct.unpack_from("=I", ci, 8)[0] if ci is not None and len(ci) >= 16 else None
    return Addr(ip, plen, ifindex, bool(flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)),
                bool(flags & IFA_F_DADFAILED), cstamp)


def local_ips(usable_only: bool = False, vips: Iterable[str] = ()) -> frozenset[str]:
    """Addresses local here: the address table, plus those of `vips` that a FIB
    lookup says are local. A tentative IPv6 address counts as local (its
    sockets are live-to-be) unless usable_only."""
    vips = list(vips)
    rows, fib = query(vips)
    if not usable_only:
        return _presence.local_set(rows, fib)
    every = _presence.local_set(rows, fib)
    return frozenset(ip for ip, p in _presence.presence(every, rows, fib).items() if p.usable)
