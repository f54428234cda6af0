"""Tell the segment that a VIP now lives here: gratuitous ARP (v4), unsolicited NA (v6).

Frames are written whole through an AF_PACKET socket on the interface that
holds the VIP, in the current network namespace. The interface comes from the
same RTM_GETADDR dump as every other "is this address here" question
(nfsreset.kernel.addrs; no pyroute2 import in a hook), named by if_indextoname() on a
socket of the calling thread's namespace. Not /sys: sysfs shows the namespace
it was mounted in.

What receivers do with them (Linux):
- ARP: an existing neighbour entry is overridden by a gratuitous request
  (sender IP == target IP) even within its locktime; a gratuitous *reply* only
  counts when its target MAC equals its sender MAC. Both are sent, so older
  stacks that only learn from replies update too.
- NA: must come with hop limit 255, unsolicited (S=0) to ff02::1; the Override
  flag makes an existing entry take the new MAC (state STALE). A tentative
  address (DAD still running) must not be advertised: that is an error here.
"""
from __future__ import annotations

import socket
import struct
import time

from nfsreset.kernel.packets import _addr, checksum

ARPHRD_ETHER = 1
ETH_P_ARP, ETH_P_IP, ETH_P_IPV6 = 0x0806, 0x0800, 0x86DD
ARPOP_REQUEST, ARPOP_REPLY = 1, 2
ND_NEIGHBOR_ADVERT = 136
ND_OPT_TARGET_LL_ADDR = 2
ND_NA_FLAG_OVERRIDE = 0x20000000
ALL_NODES = socket.inet_pton(socket.AF_INET6, "ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"
BROADCAST_MAC = b"\xff" * 6


class AnnounceError(Exception):
    pass


def devices_of(vip: str) -> list[tuple[str, "object"]]:
    """(device, nfsreset.kernel.addrs.Addr) for each place `vip` is configured here."""
    from nfsreset.kernel import addrs
    return [(socket.if_indextoname(a.ifindex), a) for a in addrs.dump() if a.ip == vip]


def find_interface(vip: str) -> str:
    """The device holding `vip` here. AnnounceError when it is not configured (or not usable)."""
    for dev, a in devices_of(vip):
        if a.tentative:
            state = "failed DAD" if a.dadfailed else "is tentative (DAD running)"
            raise AnnounceError(f"{vip} on {dev} {state}; it must not be advertised yet")
        return dev
    raise AnnounceError(f"{vip} is not configured in this network namespace")


def arp_frames(vip: str, mac: bytes) -> list[bytes]:
    """Gratuitous ARP request and reply for `vip` at `mac` (broadcast Ethernet frames)."""
    ip = socket.inet_pton(socket.AF_INET, vip)
    eth = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP)
    head = struct.pack("!HHBBH", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST)
    request = eth + head + mac + ip + b"\0" * 6 + ip
    head = struct.pack("!HHBBH", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REPLY)
    reply = eth + head + mac + ip + mac + ip
    return [f.ljust(60, b"\0") for f in (request, reply)]


def na_frame(vip: str, mac: bytes) -> bytes:
    """Unsolicited neighbour advertisement (Override set) for `vip` at `mac`, to ff02::1."""
    src = socket.inet_pton(socket.AF_INET6, vip)
    body = struct.pack("!BBHI", ND_NEIGHBOR_ADVERT, 0, 0, ND_NA_FLAG_OVERRIDE) + src \
        + struct.pack("!BB", ND_OPT_TARGET_LL_ADDR, 1) + mac
    pseudo = src + ALL_NODES + struct.pack("!IxxxB", len(body), socket.IPPROTO_ICMPV6)
    csum = checksum(pseudo + body)
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(body), socket.IPPROTO_ICMPV6, 255) + src + ALL_NODES
    return ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6) + ip6 + body


def announce(vip: str, ifname: str | None = None, count: int = 1, interval: float = 0.2) -> str:
    """Announce `vip` (configured here) `count` times, `interval` s apart; returns the device used.

    With `ifname`, the VIP must be on that device. Raises AnnounceError when
    the VIP is not configured (or still tentative), or the device is not Ethernet.
    """
    # Canonical text (v4-mapped becomes v4) without nfsreset.core.model: ipaddress
    # costs ~5 ms of import in a hook that should reach its packets first.
    family, packed = _addr(vip.strip().strip("[]"))
    vip = socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, packed)
    dev = find_interface(vip)
    if ifname is not None and ifname != dev:
        # The same v4 address may sit on two devices; check the one asked for.
        if ifname not in {d for d, _ in devices_of(vip)}:
            raise AnnounceError(f"{vip} is not configured on {ifname} (it is on {dev})")
        dev = ifname
    from nfsreset.kernel.rawsend import close_later

    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((dev, 0))
        _, _, _, hatype, mac = sock.getsockname()
        if hatype != ARPHRD_ETHER or len(mac) != 6:
            raise AnnounceError(f"{dev} is not an Ethernet device (hardware type {hatype})")
        frames = arp_frames(vip, mac) if ":" not in vip else [na_frame(vip, mac)]
        for i in range(count):
            if i:
                time.sleep(interval)
            for frame in frames:
                sock.send(frame)
    finally:
        # The tickles come right after this: don't make them wait for the
        # 8-20 ms RCU grace period of an AF_PACKET close.
        close_later(sock)
    return dev
