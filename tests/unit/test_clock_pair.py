"""Pairing jiffies with CLOCK_MONOTONIC (tracker.clock_pair_from), on sample
streams shaped like the ones the BPF program clock_pair gives: a sample every
~10 us, now and then a sampler preempted across a tick edge."""
from __future__ import annotations

from nfsreset.tracker import clock_pair_from

T0 = 5_000_000_123          # some CLOCK_MONOTONIC ns
J0 = 4_294_937_296          # jiffies start near a 32-bit wrap on purpose: 64-bit values go on


def stream(tick_ns: int, until_ns: int, every_ns: int = 10_000, phase_ns: int = 1_234_567,
           gaps: dict[int, int] | None = None):
    """(jiffies, ns) samples from T0 every `every_ns`; jiffies step every
    tick_ns, the first step `phase_ns` after T0. gaps: at sample index i the
    sampler stalls for that many ns before taking it."""
    gaps = gaps or {}
    t, i = T0, 0
    while t - T0 < until_ns:
        t += gaps.get(i, 0)
        since = t - T0 - phase_ns
        yield J0 + (since // tick_ns + 1 if since >= 0 else 0), t
        t += every_ns
        i += 1


def edge_time(k: int, tick_ns: int, phase_ns: int = 1_234_567) -> int:
    """CLOCK_MONOTONIC of jiffies' k-th step after T0 (k = 1: the first)."""
    return T0 + phase_ns + (k - 1) * tick_ns


def test_clean_samples_give_the_edge_to_the_sample_and_the_exact_tick():
    for hz, tick in ((100, 10_000_000), (250, 4_000_000), (300, 3_333_333), (1000, 1_000_000)):
        pair = clock_pair_from(stream(tick, 200_000_000))
        assert pair is not None, hz
        t0, j0, tick_ns = pair
        assert tick_ns == tick, hz
        k = j0 - J0                              # the edge it stopped at
        assert 0 <= t0 - edge_time(k, tick) < 10_000, (hz, t0, k)   # dated by the first sample after it
        # the first edge 20 ms after the first (as dated: to a sample, 10 us)
        assert (k - 1) * tick + 10_000 >= 20_000_000 > (k - 2) * tick


def test_an_edge_seen_only_after_a_stall_is_not_used():
    """A sampler stalled 3 ms across the first edge would date it 3 ms late
    (the tick estimate off by 15% over 20 ms at HZ 250: no HZ matched, and the
    daemon lost the pair). That edge is skipped; the next ones date exactly."""
    tick = 4_000_000
    stalled = {123: 3_000_000}                   # sample 123 (1.23 ms in) taken 3 ms late, past the 1st edge
    samples = list(stream(tick, 200_000_000, gaps=stalled))
    assert samples[123][0] == J0 + 1 and samples[123][1] - edge_time(1, tick) > 2_900_000
    t0, j0, tick_ns = clock_pair_from(iter(samples))
    assert tick_ns == tick
    assert 0 <= t0 - edge_time(j0 - J0, tick) < 10_000
    # ... and counting from the second edge (the first clean one), 20 ms later
    assert j0 - J0 == 2 + 5


def test_a_stall_over_the_last_edge_moves_the_pair_to_the_next_clean_one():
    tick = 4_000_000
    # the edge 20 ms after the first (6th) is seen 2 ms late: the 7th is used
    at6 = (edge_time(6, tick) - T0) // 10_000 - 1
    t0, j0, tick_ns = clock_pair_from(stream(tick, 200_000_000, gaps={at6: 2_000_000}))
    assert (j0 - J0, tick_ns) == (7, tick)
    assert 0 <= t0 - edge_time(7, tick) < 10_000


def test_too_few_clean_edges_or_an_odd_tick_give_no_pair():
    assert clock_pair_from(iter([])) is None
    assert clock_pair_from(stream(4_000_000, 3_000_000)) is None            # no edge at all
    assert clock_pair_from(stream(4_000_000, 5_000_000)) is None            # one edge (at 1.23 ms)
    # samples 1 ms apart: every edge bracket is too wide to date it
    assert clock_pair_from(stream(4_000_000, 200_000_000, every_ns=1_000_000)) is None
    # a 6 ms tick (~167 Hz) is no kernel's HZ
    assert clock_pair_from(stream(6_000_000, 200_000_000)) is None


def test_samples_that_end_early_still_pair_on_the_edges_seen():
    """The caller stops sampling at its deadline: two clean edges one tick
    apart still give the tick (HZ values are >= 17% apart, a bracket is 50 us)."""
    t0, j0, tick_ns = clock_pair_from(stream(4_000_000, 6_000_000))
    assert (j0 - J0, tick_ns) == (2, 4_000_000)
