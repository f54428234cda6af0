"""Addresses configured in this thread's network namespace, by one RTM_GETADDR dump.

A few dozen lines of rtnetlink instead of pyroute2: importing pyroute2 and
opening an IPRoute costs ~0.13 s here, and hooks must send their first packet
within 0.1 s of exec. The daemon uses pyroute2 for address *events*.
"""
from __future__ import annotations

import dataclasses
import socket
import struct

RTM_NEWADDR, RTM_GETADDR = 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_CACHEINFO, IFA_FLAGS = 1, 2, 3, 6, 8
IFA_F_TENTATIVE, IFA_F_DADFAILED = 0x40, 0x08

_NLMSG = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTA = struct.Struct("=HH")


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


def dump() -> list[Addr]:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
        req = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.send(_NLMSG.pack(_NLMSG.size + len(req), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
        out: list[Addr] = []
        for _ in range(10000):   # bounded: a dump ends with NLMSG_DONE
            data = sock.recv(1 << 16)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, mtype, _, _, _ = _NLMSG.unpack_from(data, off)
                if length < _NLMSG.size:
                    return out
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + _NLMSG.size)
                    if err:
                        raise OSError(-err, "RTM_GETADDR failed")
                elif mtype == RTM_NEWADDR:
                    a = _parse(data[off + _NLMSG.size: off + length])
                    if a is not None:
                        out.append(a)
                off += (length + 3) & ~3
        return out
    finally:
        sock.close()


def _parse(msg: bytes) -> Addr | None:
    family, plen, flags, _, ifindex = _IFADDRMSG.unpack_from(msg)
    attrs: dict[int, bytes] = {}
    off = _IFADDRMSG.size
    while off + _RTA.size <= len(msg):
        alen, atype = _RTA.unpack_from(msg, off)
        if alen < _RTA.size:
            break
        attrs[atype] = msg[off + _RTA.size: off + alen]
        off += (alen + 3) & ~3
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


def local_ips(usable_only: bool = False) -> frozenset[str]:
    """Addresses configured here. A tentative IPv6 address counts as configured
    (its sockets are live-to-be) unless usable_only."""
    return frozenset(a.ip for a in dump() if not (usable_only and a.tentative))
