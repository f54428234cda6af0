"""Presence from the kernel's rows (nfsreset.core.presence): a configured VIP never looks away.

A small model of the kernel stands in for it: address rows per (ip, device)
with their DAD state, and `local` route ranges; the FIB says local for an
address with a row out of DAD (the kernel inserts its local route then) or
inside a range. The daemon re-reads presence after some of the changes (events
can be missed) and acts only on what `change` says.
"""
from __future__ import annotations

import dataclasses
import ipaddress

from hypothesis import given, settings, strategies as st

from nfsreset.core.presence import ARRIVED, AWAY, LEFT, USABLE, Presence, change, covered, decide, local_set, presence

VIP, VIP6 = "198.51.100.10", "2001:db8::10"
IN_RANGE, IN_RANGE6 = "198.51.100.70", "2001:db8::4a"
VIPS = (VIP, VIP6, IN_RANGE, IN_RANGE6)
DEVS = ("eth0", "eth1", "lo")
RANGES = ("198.51.100.64/27", "2001:db8::40/124", "198.51.100.0/28")


@dataclasses.dataclass(frozen=True)
class Row:
    """An address-table row as nfsreset.kernel.addrs.Addr has it (ip, tentative: in DAD or failed it)."""
    ip: str
    dev: str = "eth0"
    tentative: bool = False


class Kernel:
    def __init__(self):
        self.rows: dict[tuple[str, str], bool] = {}   # (ip, dev) -> tentative
        self.ranges: set[str] = set()

    def apply(self, op) -> None:
        kind, ip, dev, arg = op
        if kind == "add":
            self.rows.setdefault((ip, dev), arg and ":" in ip)   # v4 has no DAD
        elif kind == "replace":
            self.rows[(ip, dev)] = self.rows.get((ip, dev), arg and ":" in ip)
        elif kind == "del":
            self.rows.pop((ip, dev), None)
        elif kind == "dad_done" and (ip, dev) in self.rows:
            self.rows[(ip, dev)] = False
        elif kind == "route_add":
            self.ranges.add(arg)
        elif kind == "route_del":
            self.ranges.discard(arg)

    def table(self) -> list[Row]:
        return [Row(ip, dev, t) for (ip, dev), t in sorted(self.rows.items())]

    def in_range(self, vip: str) -> bool:
        return any(ipaddress.ip_address(vip) in ipaddress.ip_network(r) for r in self.ranges)

    def fib_local(self) -> set[str]:
        return {v for v in VIPS if self.in_range(v) or any(ip == v and not t for (ip, _), t in self.rows.items())}

    def configured(self, vip: str) -> bool:
        return any(ip == vip for ip, _ in self.rows) or self.in_range(vip)

    def read(self) -> dict[str, Presence]:
        return presence(VIPS, self.table(), self.fib_local())


ops_st = st.lists(st.one_of(
    st.tuples(st.sampled_from(["add", "replace", "del", "dad_done"]), st.sampled_from(VIPS),
              st.sampled_from(DEVS), st.booleans()),
    st.tuples(st.sampled_from(["route_add", "route_del"]), st.just(""), st.just(""), st.sampled_from(RANGES)),
), max_size=25)


# -- the cases of the issue ---------------------------------------------------------------------
def test_address_on_two_devices_removed_from_one_stays_here():
    both = [Row(VIP, "eth0"), Row(VIP, "lo")]
    assert decide(VIP, both, fib_local=True) == Presence(True, True)
    after = decide(VIP, [Row(VIP, "eth0")], fib_local=True)
    assert change(Presence(True, True), after) is None


def test_the_kill_sequence_of_the_issue_changes_nothing():
    k = Kernel()
    k.apply(("add", VIP, "eth0", False))
    start = k.read()
    seen = []
    for op in (("add", VIP, "lo", False), ("del", VIP, "lo", False), ("replace", VIP, "eth0", False)):
        k.apply(op)
        now = k.read()
        seen += [(v, change(start[v], now[v])) for v in VIPS if change(start[v], now[v])]
        start = now
    assert seen == []


def test_local_route_range_is_here_and_usable():
    assert decide(IN_RANGE, [Row(VIP)], fib_local=True) == Presence(True, True)
    assert decide(IN_RANGE, [Row(VIP)], fib_local=False) == AWAY


def test_tentative_v6_is_configured_but_not_usable_until_dad_ends():
    tentative = decide(VIP6, [Row(VIP6, tentative=True)], fib_local=False)
    assert tentative == Presence(True, False)
    assert change(AWAY, tentative) == ARRIVED
    assert change(tentative, decide(VIP6, [Row(VIP6)], fib_local=True)) == USABLE
    # a local route does not make a row still in DAD announceable
    assert decide(VIP6, [Row(VIP6, tentative=True)], fib_local=True) == Presence(True, False)
    # the same address usable on another device: usable
    assert decide(VIP6, [Row(VIP6, "eth1", True), Row(VIP6, "eth0")], fib_local=True).usable


def test_a_missed_event_is_caught_by_the_next_read():
    k = Kernel()
    k.apply(("add", VIP, "eth0", False))
    was = k.read()
    k.apply(("del", VIP, "eth0", False))       # its event is lost
    k.apply(("add", IN_RANGE, "eth0", False))  # this one is seen: the read is about all VIPs
    now = k.read()
    assert change(was[VIP], now[VIP]) == LEFT and change(was[IN_RANGE], now[IN_RANGE]) == ARRIVED


def test_local_set_is_the_whole_table_plus_the_fib_local_vips():
    rows = [Row(VIP), Row("198.51.100.1"), Row(VIP6, tentative=True)]
    assert local_set(rows, {IN_RANGE}) == {VIP, "198.51.100.1", VIP6, IN_RANGE}


def test_covered_by_a_route():
    assert covered(VIPS, 4, "198.51.100.64", 27) == {IN_RANGE}
    assert covered(VIPS, 6, "2001:db8::40", 124) == {IN_RANGE6}
    assert covered(VIPS, 4, None, 0) == {VIP, IN_RANGE}
    assert covered(VIPS, 6, VIP6, 128) == {VIP6}
    assert covered(VIPS, 4, "203.0.113.0", 24) == set()


# -- properties ------------------------------------------------------------------------------
@settings(max_examples=500, deadline=None)
@given(ops=ops_st, seen=st.lists(st.booleans(), min_size=25, max_size=25))
def test_a_configured_vip_never_looks_away(ops, seen):
    """Whatever the changes and whichever events are missed: every read says local
    exactly when the kernel has the VIP (any device, DAD or not, or a range); "left"
    only when it has not; a VIP configured throughout yields no arrival or departure;
    the last read agrees with the kernel."""
    k = Kernel()
    cur = k.read()
    here_throughout = {v for v in VIPS if k.configured(v)}
    for op, delivered in zip(ops, seen):
        k.apply(op)
        here_throughout &= {v for v in VIPS if k.configured(v)}
        if not delivered:
            continue
        now = k.read()
        for v in VIPS:
            assert now[v].local == k.configured(v), (v, now[v], k.rows, k.ranges)
            c = change(cur[v], now[v])
            if c == LEFT:
                assert not k.configured(v)
            if v in here_throughout:
                assert c in (None, USABLE), (v, c)
        cur = now
    final = k.read()   # the daemon's periodic re-read
    for v in VIPS:
        cur[v] = final[v]
        assert cur[v].local == k.configured(v)
        if cur[v].usable:
            assert k.configured(v) and (any(ip == v and not t for (ip, _), t in k.rows.items())
                                        or (k.in_range(v) and not any(ip == v for ip, _ in k.rows)))


@settings(max_examples=300, deadline=None)
@given(was_local=st.booleans(), was_usable=st.booleans(), local=st.booleans(), usable=st.booleans())
def test_change_is_exactly_the_real_change(was_local, was_usable, local, usable):
    was, now = Presence(was_local, was_local and was_usable), Presence(local, local and usable)
    c = change(was, now)
    if was.local == now.local:
        assert c == (USABLE if now.usable and not was.usable else None)
    else:
        assert c == (ARRIVED if now.local else LEFT)
