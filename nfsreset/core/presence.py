"""Is a VIP here? Decided from what the kernel says now, never from one event (pure).

A VIP is local when the address table holds it on any device (a tentative IPv6
address counts: its sockets are live-to-be) or when a FIB lookup for it answers
RTN_LOCAL (a `local` route range: AnyIP, LVS-DR; what `ip route get` and
nftables `fib saddr type` answer). Events only say *when* to ask again: an
address on two devices, an `ip addr replace`, a route range or a missed event
then cannot make a configured VIP look away. nfsreset.kernel.addrs asks the kernel;
this module decides from the rows it got, so the rules are tested without root.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class Presence:
    local: bool    # configured here: sessions on it are live
    usable: bool   # it can send now: some row out of DAD (or local by route only)


AWAY = Presence(False, False)

ARRIVED, USABLE, LEFT = "arrived", "usable", "left"


def decide(vip: str, rows: Iterable, fib_local: bool) -> Presence:
    """rows: address-table rows with .ip and .tentative (tentative includes
    DAD failed: configured, not usable). fib_local: a lookup for `vip` answered
    RTN_LOCAL. A row still in DAD keeps the VIP unusable even under a local
    route (it must not be announced before DAD ends)."""
    mine = [r for r in rows if r.ip == vip]
    if mine:
        return Presence(True, any(not r.tentative for r in mine))
    return Presence(True, True) if fib_local else AWAY


def presence(vips: Iterable[str], rows: Iterable, fib_local: Iterable[str]) -> dict[str, Presence]:
    rows = list(rows)
    fib = frozenset(fib_local)
    return {v: decide(v, rows, v in fib) for v in vips}


def local_set(rows: Iterable, fib_local: Iterable[str]) -> frozenset[str]:
    """Every address the planner must treat as configured here: the whole
    address table (any device, tentative too) plus the VIPs the FIB says are local."""
    return frozenset(r.ip for r in rows) | frozenset(fib_local)


def change(was: Presence, now: Presence) -> str | None:
    """The one thing the daemon acts on: a real change of presence."""
    if now.local and not was.local:
        return ARRIVED
    if was.local and not now.local:
        return LEFT
    if now.local and now.usable and not was.usable:
        return USABLE
    return None


def covered(vips: Iterable[str], family: int, dst: str | None, dst_len: int) -> set[str]:
    """The VIPs inside a route's destination (family 4 or 6; dst None is the default route)."""
    import ipaddress
    net = ipaddress.ip_network(f"{dst or ('::' if family == 6 else '0.0.0.0')}/{dst_len}", strict=False)
    out = set()
    for v in vips:
        a = ipaddress.ip_address(v)
        if a.version == net.version and a in net:
            out.add(v)
    return out
