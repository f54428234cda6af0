"""Pairing jiffies with CLOCK_MONOTONIC (tracker.clock_pair_from), on sample
streams shaped like the ones the BPF program clock_pair gives: jiffies read
between two clock readings ~1 us apart, a sample every ~10 us, now and then a
sampler preempted between samples or within one."""
from __future__ import annotations

import random

from nfsreset.flows.clock import clock_pair_from

T0 = 5_000_000_123          # some CLOCK_MONOTONIC ns
J0 = 4_294_937_296          # jiffies start near a 32-bit wrap on purpose: 64-bit values go on
PHASE = 1_234_567           # the first edge, after T0
HZ_TICKS = ((100, 10_000_000), (250, 4_000_000), (300, 3_333_333), (1000, 1_000_000))


def stream(tick_ns: int, until_ns: int, every_ns: int = 10_000, gaps: dict[int, int] | None = None,
           inside: dict[int, int] | None = None, taken: list | None = None):
    """(jiffies, lo, hi) samples from T0 every `every_ns` for until_ns; jiffies
    step every tick_ns from PHASE on and are read 0.5 us after lo, hi is 1 us
    after lo. gaps: before sample i the sampler stalls that many ns. inside:
    sample i stalls that many ns after reading jiffies, before hi. taken:
    gets every sample handed out."""
    gaps, inside = gaps or {}, inside or {}
    t, i = T0, 0
    while t - T0 < until_ns:
        t += gaps.get(i, 0)
        since = t + 500 - T0 - PHASE
        hi = t + 1_000 + inside.get(i, 0)
        sample = (J0 + (since // tick_ns + 1 if since >= 0 else 0), t, hi)
        if taken is not None:
            taken.append(sample)
        yield sample
        t = hi - 1_000 + every_ns
        i += 1


def edge_time(k: int, tick_ns: int) -> int:
    """CLOCK_MONOTONIC of jiffies' k-th step (k = 1: the first)."""
    return T0 + PHASE + (k - 1) * tick_ns


def dated(pair, tick_ns: int, within_ns: int) -> bool:
    """The pair's t0 is within within_ns of when jiffies became j0."""
    t0, j0, _ = pair
    return abs(t0 - edge_time(j0 - J0, tick_ns)) <= within_ns


def before(tick_ns: int, k: int) -> int:
    """Index of the last sample before edge k, in a stream without stalls."""
    return (edge_time(k, tick_ns) - T0 - 500) // 10_000


def test_a_free_sampler_pairs_to_the_sample_and_the_exact_tick_in_20_ms():
    for hz, tick in HZ_TICKS:
        taken = []
        pair = clock_pair_from(stream(tick, 200_000_000, taken=taken))
        assert pair is not None and pair[2] == tick, hz
        assert dated(pair, tick, 10_000), (hz, pair)
        # it stopped at the first edge 20 ms after the first one
        last = taken[-1][2] - edge_time(1, tick)
        assert 20_000_000 - 10_000 <= last < 20_000_000 + tick + 10_000, (hz, last)


def test_an_edge_seen_only_after_a_stall_does_not_date_the_pair():
    """A sampler stalled 3 ms across the first edge sees it 3 ms late: taken
    as the edge, that put the tick 15% off over 20 ms (no HZ matched, and the
    daemon went without the young-flow test)."""
    tick = 4_000_000
    at = before(tick, 1) + 1
    samples = list(stream(tick, 200_000_000, gaps={at: 3_000_000}))
    assert samples[at][0] == J0 + 1 and samples[at][1] - edge_time(1, tick) > 2_900_000
    pair = clock_pair_from(iter(samples))
    assert pair is not None and pair[2] == tick
    assert dated(pair, tick, 10_000) and pair[1] != J0 + 1


def test_a_sample_stalled_after_reading_jiffies_does_not_date_the_pair():
    """Preempted between reading jiffies and the clock: the old jiffies with a
    clock 3 ms later. Read as one instant, the next sample would date the edge
    to within 10 us, 3 ms late."""
    tick = 4_000_000
    at = before(tick, 1)
    samples = list(stream(tick, 200_000_000, inside={at: 3_000_000}))
    assert samples[at][0] == J0 and samples[at + 1][0] == J0 + 1
    assert samples[at][2] - edge_time(1, tick) > 2_900_000     # its hi is 3 ms past the edge
    pair = clock_pair_from(iter(samples))
    assert pair is not None and pair[2] == tick
    assert dated(pair, tick, 10_000) and pair[1] != J0 + 1


def test_a_preempted_sampler_still_pairs_exactly():
    """Both CPUs busy: a third of the edges fall into a stall of 0.5-4 ms,
    between samples or within one. The tick comes from two clean edges, t0
    from a clean one."""
    rng = random.Random(7)
    for hz, tick in HZ_TICKS:
        gaps, inside = {}, {}
        for k in range(1, 200):
            if rng.random() < 0.33:
                # stalls shift later samples: these land near edges, not on each one
                rng.choice((gaps, inside))[before(tick, k)] = rng.randrange(500_000, 4_000_000)
        pair = clock_pair_from(stream(tick, 200_000_000, gaps=gaps, inside=inside))
        assert pair is not None and pair[2] == tick, hz
        assert dated(pair, tick, 10_000), (hz, pair)


def test_wide_brackets_everywhere_still_give_the_tick_from_a_longer_span():
    """Samples 1 ms apart: no edge is dated better than 1 ms. The tick is still
    known once the span is long enough (or at the caller's deadline)."""
    for hz, tick in HZ_TICKS:
        pair = clock_pair_from(stream(tick, 200_000_000, every_ns=1_000_000))
        assert pair is not None and pair[2] == tick, hz
        assert dated(pair, tick, 1_000_000), (hz, pair)


def test_too_few_edges_or_an_odd_tick_give_no_pair():
    assert clock_pair_from(iter([])) is None
    assert clock_pair_from(stream(4_000_000, 1_000_000)) is None           # no edge at all
    assert clock_pair_from(stream(4_000_000, 5_000_000)) is None           # one edge (at 1.23 ms)
    # a 6 ms tick (~167 Hz) is no kernel's HZ
    assert clock_pair_from(stream(6_000_000, 200_000_000)) is None


def test_samples_that_end_early_still_pair_on_the_edges_seen():
    """The caller stops sampling at its deadline: two clean edges one tick
    apart still give the tick."""
    pair = clock_pair_from(stream(4_000_000, 6_000_000))
    assert pair is not None and pair[2] == 4_000_000 and dated(pair, 4_000_000, 10_000)
