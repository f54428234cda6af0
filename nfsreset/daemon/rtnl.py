"""The daemon's rtnetlink event socket: address and route events, decoded with
pyroute2, local routes only (a socket filter drops the rest in the kernel)."""
from __future__ import annotations

import ctypes
import errno
import socket
import sys

from nfsreset.kernel import addrs as A


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
