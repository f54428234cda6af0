"""Pacing of the tickle: how many forged ACKs leave when. Pure; the engine sends.

A tickle forges one ACK per client tuple per round, towards addresses read from
the state dir. Without a bound, a long (or hostile) list made `tickle` a packet
cannon: 10,000 tuples left in one 65-155 ms burst (up to ~150,000 packets/s).
Now a call sends at most `rate` packets per second, in small batches, and at most
`max_packets` in all; `nfsreset tickle --rate/--max-packets` change both.

Defaults: 25,000 packets/s lets a round of up to 15,000 tuples finish before the
next round is due (0.6 s later, TICKLE_SCHEDULE); 200,000 packets cover three
rounds of a full list (3 x 65,536, statedir.MAX_CLIENTS_PER_VIP), 8 s at the
default rate.
"""
from __future__ import annotations

import time

# Imported by the hooks' parser at load (its defaults): nothing but builtins here,
# no collections.abc (1.4 ms before a hook's first packet).

TICKLE_RATE_PPS = 25_000        # forged ACKs per second, per tickle call
TICKLE_MAX_PACKETS = 200_000    # forged ACKs per tickle call, all rounds together
RATE_RANGE = (1, 1_000_000)      # what --rate accepts
MAX_PACKETS_RANGE = (1, 10_000_000)   # what --max-packets accepts
TICK_S = 0.002   # batch period: a sleep costs ~0.1 ms of overshoot, so batches, not packets


def batches(n: int, rate: float, cap: int, start: float = 0.0, tick: float = TICK_S) -> list[tuple[float, int]]:
    """Send times (same clock as `start`) and sizes for min(n, cap) packets at
    `rate` per second: equal batches of max(1, rate * tick) packets, the first at
    `start`. In any window of w seconds at most rate * w + one batch leave."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, not {rate}")
    total = max(0, min(n, cap))
    per = max(1, int(rate * tick))
    gap = per / rate
    out = []
    sent = 0
    while sent < total:
        k = min(per, total - sent)
        out.append((start + len(out) * gap, k))
        sent += k
    return out


def end_of(plan: list[tuple[float, int]], rate: float) -> float | None:
    """When the rate budget of these batches is used up: the earliest time the next
    batch may leave (None for no batches)."""
    if not plan:
        return None
    t, k = plan[-1]
    return t + k / rate


def send(plan: list[tuple[float, int]], rate: float, emit, clock=time.monotonic, sleep=time.sleep) -> float | None:
    """emit(k) for each batch of `plan`, not before its time (clock() and sleep(s)
    as in `time`), and never catching up: a batch that leaves late (the sender was
    descheduled, or the list took time to sort) shifts every later batch by as
    much, so no window ever holds more than rate x its length + one batch. Measured without this: a 10,000-tuple
    round that started 80 ms late sent 4,550 ACKs in 100 ms at 25,000/s. Returns
    the earliest time the next batch may leave (end_of, shifted), None if none."""
    lag = 0.0
    for at, k in plan:
        at += lag
        now = clock()
        if at > now:
            sleep(at - now)
            now = clock()
        lag += max(0.0, now - at)
        emit(k)
    return None if not plan else plan[-1][0] + lag + plan[-1][1] / rate
