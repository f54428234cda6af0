"""The daemon's address/route events, decoded by pyroute2's message classes.

The datagrams are built here by hand, byte by byte as the kernel lays them out
(struct nlmsghdr, ifaddrmsg/rtmsg, rtattrs), so the decoder is checked against
the wire format and not against itself. Runs with whichever pyroute2 is first
on sys.path: the venv's 0.9.7, or Debian 12's 0.7.2 (PYTHONPATH=its dist-packages).
"""
from __future__ import annotations

import socket
import struct
import subprocess
import sys

import pytest

from nfsreset.kernel import addrs as A
from nfsreset.daemon.config import Config
from nfsreset.daemon.daemon import Daemon
from nfsreset.daemon.rtnl import decode_rtnl

IFA_LOCAL, IFA_ADDRESS, RTA_DST = 2, 1, 1
RTN_UNICAST = 1


def attr(atype: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), atype) + payload + b"\0" * (-len(payload) % 4)


def nlmsg(mtype: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body


def addr_msg(mtype: int, ip: str, plen: int, local: bool = True) -> bytes:
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    raw = socket.inet_pton(fam, ip)
    body = struct.pack("=BBBBI", fam, plen, 0, 0, 2) + attr(IFA_ADDRESS, raw)
    if local:
        body += attr(IFA_LOCAL, raw)
    return nlmsg(mtype, body)


def route_msg(mtype: int, dst: str, plen: int, rtype: int) -> bytes:
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    body = struct.pack("=BBBBBBBBI", fam, plen, 0, 0, 255, 2, 254, rtype, 0)
    return nlmsg(mtype, body + attr(RTA_DST, socket.inet_pton(fam, dst)))


def test_decodes_address_and_route_events_by_field_name_and_skips_the_rest():
    link = nlmsg(16, struct.pack("=BxHiII", 0, 1, 2, 0, 0))   # RTM_NEWLINK: not subscribed to, skipped
    data = (addr_msg(A.RTM_DELADDR, "198.51.100.10", 24) + link
            + addr_msg(A.RTM_NEWADDR, "2001:db8::10", 64, local=False)
            + route_msg(A.RTM_NEWROUTE, "198.51.100.64", 27, A.RTN_LOCAL))
    msgs = decode_rtnl(data)
    assert [m["header"]["type"] for m in msgs] == [A.RTM_DELADDR, A.RTM_NEWADDR, A.RTM_NEWROUTE]
    v4, v6, route = msgs
    assert (v4["family"], v4["prefixlen"], v4.get_attr("IFA_LOCAL")) == (socket.AF_INET, 24, "198.51.100.10")
    assert v6.get_attr("IFA_LOCAL") is None and v6.get_attr("IFA_ADDRESS") == "2001:db8::10"
    assert (route["type"], route["dst_len"], route.get_attr("RTA_DST")) == (A.RTN_LOCAL, 27, "198.51.100.64")


def test_broken_framing_is_an_error_not_a_silent_skip():
    good = addr_msg(A.RTM_DELADDR, "198.51.100.10", 24)
    bad = struct.pack("=IHHII", 400, A.RTM_DELADDR, 0, 0, 0) + good[16:]   # says 400 bytes, holds 40
    with pytest.raises(ValueError):
        decode_rtnl(good + bad)


def test_one_batch_of_events_rereads_every_vip_it_concerns_once():
    """Four VIPs deleted at once, a `local` route range appearing and an ordinary
    route: one re-read, of exactly the five watched VIPs concerned."""
    vips = ["198.51.100.10", "198.51.100.11", "2001:db8::10", "2001:db8::11"]
    in_range, elsewhere = "198.51.100.70", "203.0.113.5"
    d = Daemon(Config(vips=frozenset(vips + [in_range, elsewhere])), log=lambda line: None)
    asked = []
    d.refresh = lambda v, now: asked.append(set(v))   # the kernel read itself is covered in tests/ns
    data = b"".join(addr_msg(A.RTM_DELADDR, v, 64 if ":" in v else 24) for v in vips)
    data += route_msg(A.RTM_NEWROUTE, "198.51.100.64", 27, A.RTN_LOCAL)
    data += route_msg(A.RTM_NEWROUTE, "203.0.113.0", 24, RTN_UNICAST)      # not local: not a presence change
    data += addr_msg(A.RTM_NEWADDR, "198.51.100.99", 24)                   # not watched
    d.handle_rtnl(decode_rtnl(data))
    assert asked == [set(vips) | {in_range}]
    assert d.metrics.events == 5


def test_hooks_and_flows_do_not_import_pyroute2():
    """pyroute2 costs ~0.1 s to import: the hooks (addrs) and `nfsreset flows`
    (watch.read_live_table) must not pay it; only the daemon's event socket does."""
    code = ("import sys\nimport nfsreset.kernel.addrs, nfsreset.daemon.daemon\n"
            "print('pyroute2' in sys.modules)\n"
            "nfsreset.daemon.rtnl._event_classes()\nprint('pyroute2' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert res.stdout.split() == ["False", "True"], res.stdout + res.stderr
