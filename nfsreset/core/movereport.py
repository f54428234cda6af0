"""What a move cost the clients: from the moment a VIP is usable here until each
known client talks to this node again. Pure: events in, a report out; the
daemon (nfsreset.daemon.daemon) feeds it what its flow tracker (or its dumps) saw.

A client tuple (client address, client port, VIP port) from the state dir is
back when a new connection from it reaches the VIP: the same tuple (NFS
clients reconnect from their reserved port), or failing that the same client
address to the same VIP port from another port (counted for one waiting tuple
of that address). The report closes when every tuple is back, or
MOVE_REPORT_BOUND_S after usable; tuples not back by then are named.
"""
from __future__ import annotations

import dataclasses
import statistics

from nfsreset.core.model import format_endpoint

# A client not back this long after the VIP was usable is reported as not back
# (a Linux NFS client left alone retries after up to ~60 s+; with nfsreset it
# is back within a second: 10 s separates the two with room to spare).
MOVE_REPORT_BOUND_S = 10.0
NAMED_MAX = 8     # clients named in the line at most; the JSON has them all


@dataclasses.dataclass(frozen=True, order=True)
class Tuple:
    client: str
    cport: int
    vport: int

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.client, self.cport)


@dataclasses.dataclass
class Report:
    vip: str
    usable_at: float
    expected: int
    back: dict[Tuple, float]          # tuple -> seconds from usable to its first new connection
    missing: list[Tuple]
    stale_left: int
    bound_s: float
    closed_at: float

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def median(self) -> float | None:
        return statistics.median(self.back.values()) if self.back else None

    @property
    def slowest(self) -> tuple[Tuple, float] | None:
        if not self.back:
            return None
        return max(self.back.items(), key=lambda kv: (kv[1], kv[0]))

    def line(self) -> str:
        """One line for the log, e.g. `arrival of 198.51.100.10: 12 of 12 clients
        back, median 0.020 s, slowest 198.51.100.20:871 0.310 s, 0 stale sockets left`."""
        parts = [f"arrival of {self.vip}: {len(self.back)} of {self.expected} clients back"]
        if self.back:
            who, t = self.slowest
            parts.append(f"median {self.median:.3f} s")
            parts.append(f"slowest {who.endpoint} {t:.3f} s")
        parts.append(f"{self.stale_left} stale socket{'' if self.stale_left == 1 else 's'} left")
        text = ", ".join(parts)
        if self.missing:
            named = ", ".join(t.endpoint for t in self.missing[:NAMED_MAX])
            more = len(self.missing) - NAMED_MAX
            text += (f"; not back within {self.bound_s:g} s: {named}"
                     + (f" (+{more} more)" if more > 0 else ""))
        return text

    def as_json(self) -> dict:
        slow = self.slowest
        return {"vip": self.vip, "usable_at": round(self.usable_at, 6), "clients": self.expected, "back": len(self.back),
                "median_s": None if self.median is None else round(self.median, 4),
                "slowest": None if slow is None else {"client": slow[0].endpoint, "s": round(slow[1], 4)},
                "stale_left": self.stale_left, "bound_s": self.bound_s,
                "returns": [{"client": t.client, "cport": t.cport, "vport": t.vport, "s": round(s, 4)}
                            for t, s in sorted(self.back.items())],
                "not_back": [{"client": t.client, "cport": t.cport, "vport": t.vport} for t in self.missing]}


class Move:
    """One arrival of `vip`, usable at `usable_at` (monotonic seconds), followed
    for `clients` (Tuples)."""

    def __init__(self, vip: str, usable_at: float, clients, bound_s: float = MOVE_REPORT_BOUND_S):
        self.vip = vip
        self.usable_at = usable_at
        self.bound_s = bound_s
        self.waiting: set[Tuple] = set(clients)
        self.expected = len(self.waiting)
        self.back: dict[Tuple, float] = {}
        # (client, vport) -> its waiting tuples: a connection from a new port finds
        # them without a scan of every waiting tuple (65,536 at most).
        # An insertion-ordered dict per address: the lowest port first, in O(1).
        self.by_addr: dict[tuple[str, int], dict[Tuple, None]] = {}
        for t in sorted(self.waiting, key=lambda t: (t.client, t.vport, t.cport)):
            self.by_addr.setdefault((t.client, t.vport), {})[t] = None

    def seen(self, client: str, cport: int, vport: int, at: float) -> Tuple | None:
        """A new connection from client:cport to the VIP's vport at `at`. Returns
        the tuple it brought back, if any. One made before usable cannot be a
        return (it is not new), and is ignored."""
        if at < self.usable_at or not self.waiting:
            return None
        t = Tuple(client, cport, vport)
        pool = self.by_addr.get((client, vport))
        if not pool:
            return None
        if t not in pool:
            t = next(iter(pool))
        del pool[t]
        self.waiting.discard(t)
        self.back[t] = at - self.usable_at
        return t

    def due(self, now: float) -> bool:
        """Time to report: every client is back, or the bound has passed."""
        return not self.waiting or now >= self.usable_at + self.bound_s

    def report(self, now: float, stale_left: int = 0) -> Report:
        return Report(self.vip, self.usable_at, self.expected, dict(self.back), sorted(self.waiting),
                      stale_left, self.bound_s, now)
