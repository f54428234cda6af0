"""Pacing of the tickle (nfsreset.core.pace): bounded per second and per call."""
import pytest
from hypothesis import given, settings, strategies as st

from nfsreset.core import pace


def test_defaults_are_the_documented_ones():
    assert pace.TICKLE_RATE_PPS == 25_000 and pace.TICKLE_MAX_PACKETS == 200_000
    # three rounds of the longest list the state dir keeps fit the per-call bound
    from nfsreset.state.statedir import MAX_CLIENTS_PER_VIP
    assert 3 * MAX_CLIENTS_PER_VIP <= pace.TICKLE_MAX_PACKETS


def test_a_small_list_leaves_at_once_in_one_batch():
    assert pace.batches(3, 25_000, 200_000, start=7.0) == [(7.0, 3)]


def test_10000_packets_at_the_default_rate_take_0_4_s():
    b = pace.batches(10_000, pace.TICKLE_RATE_PPS, pace.TICKLE_MAX_PACKETS)
    assert sum(k for _, k in b) == 10_000
    assert b[0][0] == 0.0 and abs(pace.end_of(b, pace.TICKLE_RATE_PPS) - 0.4) < 1e-9
    assert {k for _, k in b} == {50}     # 2 ms batches of 50


def test_the_cap_cuts_and_a_slow_rate_sends_one_at_a_time():
    assert sum(k for _, k in pace.batches(500, 1000, 120)) == 120
    assert pace.batches(3, 10, 100) == [(0.0, 1), (0.1, 1), (0.2, 1)]
    assert pace.batches(5, 10, 0) == [] and pace.end_of([], 10) is None
    assert pace.batches(5, 10, -3) == []


def test_a_zero_rate_is_an_error():
    with pytest.raises(ValueError):
        pace.batches(1, 0, 10)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 20_000), rate=st.integers(1, 200_000), cap=st.integers(0, 30_000),
       window=st.floats(0.001, 2.0), start=st.floats(0, 100))
def test_no_window_holds_more_than_rate_times_its_length_plus_one_batch(n, rate, cap, window, start):
    b = pace.batches(n, rate, cap, start=start)
    assert sum(k for _, k in b) == min(n, max(cap, 0))
    assert all(k >= 1 for _, k in b)
    times = [t for t, _ in b]
    assert times == sorted(times) and (not b or b[0][0] == start)
    per = max(1, int(rate * pace.TICK_S))
    j, inside = 0, 0      # sliding window [t_i, t_i + window)
    for i, (t, _) in enumerate(b):
        while j < len(b) and b[j][0] < t + window:
            inside += b[j][1]
            j += 1
        assert inside <= rate * window + per + 1e-6
        inside -= b[i][1]


class FakeClock:
    """A clock that sleep() advances, and that a test can push forward (a stall)."""

    def __init__(self, t=0.0):
        self.t = t
        self.slept = []

    def __call__(self):
        return self.t

    def sleep(self, s):
        assert s > 0
        self.slept.append(s)
        self.t += s


def test_send_keeps_the_times_when_on_time():
    clock, sent = FakeClock(), []
    plan = pace.batches(150, 25_000, 1000)          # 3 batches of 50, 2 ms apart
    nxt = pace.send(plan, 25_000, lambda k: sent.append((clock(), k)), clock, clock.sleep)
    assert sent == [(0.0, 50), (0.002, 50), (0.004, 50)]
    assert abs(nxt - 0.006) < 1e-12


def test_a_late_batch_shifts_the_rest_and_nothing_catches_up():
    clock, sent = FakeClock(), []

    def emit(k):
        sent.append(clock())
        if len(sent) == 2:
            clock.t += 0.05     # the sender stalls 50 ms after the second batch
    plan = pace.batches(250, 25_000, 1000)
    pace.send(plan, 25_000, emit, clock, clock.sleep)
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert all(g >= 0.002 - 1e-12 for g in gaps), gaps      # never two batches closer than one batch's time
    assert abs(sent[2] - 0.052) < 1e-12 and abs(sent[3] - 0.054) < 1e-12


def test_a_start_already_past_does_not_burst():
    clock, sent = FakeClock(t=10.0), []
    plan = pace.batches(500, 25_000, 1000, start=9.9)       # planned 100 ms ago
    pace.send(plan, 25_000, lambda k: sent.append(clock()), clock, clock.sleep)
    assert sent[0] == 10.0 and all(b - a >= 0.002 - 1e-12 for a, b in zip(sent, sent[1:]))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 3000), rate=st.integers(100, 100_000), stalls=st.lists(st.floats(0, 0.2), max_size=20),
       start=st.floats(-1, 1))
def test_send_never_exceeds_the_rate_whatever_stalls(n, rate, stalls, start):
    clock, times = FakeClock(), []
    stalls = list(stalls)

    def emit(k):
        times.append((clock(), k))
        if stalls:
            clock.t += stalls.pop()
    plan = pace.batches(n, rate, n, start=start)
    pace.send(plan, rate, emit, clock, clock.sleep)
    assert sum(k for _, k in times) == n
    for (a, ka), (b, _) in zip(times, times[1:]):
        assert b - a >= ka / rate - 1e-9
