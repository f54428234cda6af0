"""nfsreset.kernel.netlink: the one framing rtnetlink (addrs) and sock_diag (sockdiag) share."""
from __future__ import annotations

import errno
import socket
import struct

import pytest

from nfsreset.kernel import addrs, netlink as nl, sockdiag


def test_message_pads_and_counts_its_header():
    m = nl.message(22, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, 7, b"\x0a\0\0\0\0\0\0\0\1")   # 9 bytes -> 12
    assert len(m) == 28 and struct.unpack_from("=IHHII", m) == (28, 22, 0x301, 7, 0)
    assert m[16:] == b"\x0a" + bytes(7) + b"\1" + bytes(3)


def test_attrs_round_trip_and_a_short_header_ends_them():
    body = bytes(8) + nl.attr(1, b"\xc6\x33\x64\x0a") + nl.attr(3, b"eth0\0") + nl.attr(8, struct.pack("=I", 0x40))
    assert nl.attrs(body, 8) == {1: b"\xc6\x33\x64\x0a", 3: b"eth0\0", 8: struct.pack("=I", 0x40)}
    assert nl.attrs(body + struct.pack("=HH", 2, 9), 8) == nl.attrs(body, 8)     # len 2 < header: stop


def test_messages_walks_a_datagram_and_refuses_a_truncated_one():
    two = nl.message(20, 2, 1, b"abcd") + nl.message(3, 2, 1, struct.pack("=i", 0))
    assert [(k, s, two[a:b]) for k, _f, s, a, b in nl.messages(two)] == [(20, 1, b"abcd"), (3, 1, bytes(4))]
    with pytest.raises(OSError) as e:
        list(nl.messages(two[:-2]))                   # the second says 20 bytes, 18 are there
    assert e.value.errno == errno.EBADMSG
    with pytest.raises(sockdiag.SockDiagError):
        list(nl.messages(struct.pack("=IHHII", 40, 2, 0, 1, 0), error=sockdiag.SockDiagError))


def test_error_payload():
    ack = struct.pack("=IHHIIi", 36, 2, 0x100, 9, 0, -errno.ENOENT) + struct.pack("=IHHII", 72, 21, 5, 9, 0)
    ((kind, _f, seq, start, _e),) = nl.messages(ack)
    assert (kind, seq, nl.error(ack, start)) == (nl.NLMSG_ERROR, 9, (errno.ENOENT, 9))


def test_both_users_frame_through_it():
    # the RTM_GETROUTE request of addrs and the bytecode attribute of sockdiag are nl.attr's
    raw = socket.inet_pton(socket.AF_INET, "198.51.100.10")
    assert addrs._route_lookup("198.51.100.10")[2].endswith(nl.attr(addrs.RTA_DST, raw))
    req = sockdiag.encode_dump_request(socket.AF_INET, 2, b"\1\2\3\4\5", 1)
    assert req.endswith(nl.attr(sockdiag.INET_DIAG_REQ_BYTECODE, b"\1\2\3\4\5"))
    assert addrs.NLMSG_DONE is nl.NLMSG_DONE and sockdiag.NLMSG_DONE is nl.NLMSG_DONE
