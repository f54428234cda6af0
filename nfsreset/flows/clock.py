"""Pairing the program's clock (jiffies) with CLOCK_MONOTONIC, from samples the
program takes when run once (BPF_PROG_TEST_RUN)."""
from __future__ import annotations

import ctypes
import platform
import struct
import time
from typing import Iterable

from nfsreset.kernel.netns import libc


# -- jiffies ---------------------------------------------------------------------
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_BPF_PROG_TEST_RUN = 10
_TEST_RUN_ATTR = 80                     # union bpf_attr's test member, padded


def _test_run(attr) -> bool:
    """Run a raw tracepoint program once, now (BPF_PROG_TEST_RUN, no ctx);
    `attr` is union bpf_attr with test.prog_fd set."""
    return libc.syscall(_SYS_BPF, _BPF_PROG_TEST_RUN, attr, _TEST_RUN_ATTR) == 0


# Pairing ends once two jiffies edges at least span_ns apart are dated to
# within this fraction of the time between them: the HZ values a kernel is
# built with are >= 17% apart, and the pair's tick is snapped to one of them.
_PAIR_REL_WIDTH = 0.01


def clock_pair_from(samples: Iterable[tuple[int, int, int]], span_ns: int = 20_000_000) -> tuple[int, int, int] | None:
    """(t0 ns, j0, tick ns) from (jiffies, lo, hi) samples taken back to back
    (jiffies read between CLOCK_MONOTONIC lo and hi ns): jiffies became j0 at
    t0, and a tick is tick ns. None with fewer than two edges, or ticks that
    match no HZ a kernel is built with (within 5%): a tick that is not exact
    would put old flows' births ever further off.

    An edge lies between the lo of the last sample before it and the hi of
    the first after. Back to back that bracket is ~10 us, but a sampler
    preempted or interrupted around an edge widens it to milliseconds (2 CPUs
    busy: a third of the edges). So the tick comes from the pair of edges
    dated best relative to the time between them (midpoints), and t0 from
    the well-dated ones (below). Reading ends when a pair span_ns apart
    is within _PAIR_REL_WIDTH (after 20 ms when the sampler runs freely), or
    when the samples end (the caller's deadline): then the best pair seen
    counts, if its tick snaps."""
    edges: list[tuple[int, int, int]] = []         # (jiffies, lo, hi): became jiffies in [lo, hi] ns
    best = None                                    # (relative width, span, edge a, edge b)
    prev = None
    for j, lo, hi in samples:
        if prev is not None and j != prev[0]:
            b = (j, prev[1], hi)
            mid_b, w_b = (b[1] + b[2]) / 2, b[2] - b[1]
            for a in edges:
                span = mid_b - (a[1] + a[2]) / 2
                rel = (w_b + a[2] - a[1]) / span
                if best is None or rel < best[0]:
                    best = (rel, span, a, b)
            edges.append(b)
            if best is not None and best[1] >= span_ns and best[0] <= _PAIR_REL_WIDTH:
                break
        prev = (j, lo, hi)
    if best is None:
        return None
    _, span, a, b = best
    # One tick seen alone is off by up to ~3% here (tick interrupts jitter in
    # a VM); over 20 ms the estimate is within a fraction of a percent.
    hz = 1e9 * (b[0] - a[0]) / span
    near = [h for h in (100, 250, 300, 1000) if abs(h - hz) <= h * 0.05]
    if not near:
        return None
    tick = (1_000_000_000 + near[0] // 2) // near[0]
    # A narrow bracket dates when jiffies moved; a tick that comes late moves
    # it late, never early. The median phase of the well-dated edges is not
    # fooled by one such edge. (Shifts of the whole schedule by up to half a
    # tick were seen with both CPUs busy: docs/internals.md, "Young or old".)
    narrow = min(e[2] - e[1] for e in edges) + 10_000
    j0 = edges[-1][0]
    phases = sorted((lo + hi) // 2 + (j0 - j) * tick for j, lo, hi in edges if hi - lo <= narrow)
    return phases[(len(phases) - 1) // 2], j0, tick


def _clock_pairs(prog_fd: int, sample, span_s: float = 0.02, timeout_s: float = 0.2) -> tuple[int, int, int] | None:
    """clock_pair_from() over samples the unattached program `clock_pair`
    takes when run (BPF_PROG_TEST_RUN), for at most timeout_s; None when the
    program cannot be run."""
    if _SYS_BPF is None:
        return None
    zero = ctypes.c_int(0)
    attr = ctypes.create_string_buffer(_TEST_RUN_ATTR)
    struct.pack_into("I", attr, 0, prog_fd)

    def samples():
        deadline = time.monotonic() + timeout_s
        for _ in range(200_000):
            if time.monotonic() > deadline or not _test_run(attr):
                return
            s = sample[zero]
            yield int(s.jiffies), int(s.before), int(s.after)

    return clock_pair_from(samples(), int(span_s * 1e9))
