"""Netlink framing, shared by rtnetlink (addrs) and sock_diag (sockdiag): the
message and attribute headers, one datagram's walk, an error's payload.

struct only, no pyroute2: hooks import this, and pyroute2 costs ~0.13 s to
import and open (addrs). include/uapi/linux/netlink.h.
"""
from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP_INTR = 0x1, 0x4, 0x10
NLM_F_DUMP = 0x300

NLMSGHDR = struct.Struct("=IHHII")      # len type flags seq pid
NLATTR = struct.Struct("=HH")           # len type
ERR = struct.Struct("=i")               # nlmsgerr.error (then the header of the request it answers)


def message(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    """One message: its header, then `body` padded to 4 bytes."""
    body += b"\0" * (-len(body) % 4)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), mtype, flags, seq, 0) + body


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute (nlattr/rtattr: the same header), padded to 4 bytes."""
    return NLATTR.pack(NLATTR.size + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def messages(buf: bytes, what: str = "netlink", error: type[OSError] = OSError) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, payload offset, payload end) for each message in one
    datagram; error(EBADMSG) at a header that does not fit."""
    off, size = 0, len(buf)
    while off + NLMSGHDR.size <= size:
        length, kind, flags, seq, _pid = NLMSGHDR.unpack_from(buf, off)
        if length < NLMSGHDR.size or off + length > size:
            raise error(errno.EBADMSG, f"truncated {what} message at {off} (len {length})")
        yield kind, flags, seq, off + NLMSGHDR.size, off + length
        off += (length + 3) & ~3


def attrs(buf: bytes, start: int, end: int | None = None) -> dict[int, bytes]:
    """{type: payload} of the attributes in buf[start:end]; a short header ends them."""
    end = len(buf) if end is None else end
    out: dict[int, bytes] = {}
    off = start
    while off + NLATTR.size <= end:
        alen, atype = NLATTR.unpack_from(buf, off)
        if alen < NLATTR.size:
            break
        out[atype] = buf[off + NLATTR.size: off + alen]
        off += (alen + 3) & ~3
    return out


def error(buf: bytes, start: int) -> tuple[int, int]:
    """NLMSG_ERROR payload at `start` -> (positive errno or 0, seq of the request it answers)."""
    (err,) = ERR.unpack_from(buf, start)
    return -err, NLMSGHDR.unpack_from(buf, start + ERR.size)[3]
