"""Pending sockets are honoured only when the planner says so (issue 10, item 7).

A pending file names sockets (by kernel cookie) that `kill` saw while their VIP
was away and could not end then. At post-start they are ended even though the
VIP is now configured here. That is right only for sockets that existed before
the VIP arrived: a record written after the arrival (forged, or a file of
another run) may name a live session, and rule zero says those are never touched.
"""
from hypothesis import given, settings, strategies as st

from nfsreset.core import plan as P
from nfsreset.core.model import Flow, FlowKey

VIP, VIP6 = "198.51.100.10", "2001:db8::10"
LOCAL = frozenset({"198.51.100.1", VIP})


def flow(cport=800, cookie=77, vip=VIP, state="ESTABLISHED"):
    return Flow(FlowKey(vip, 2049, "198.51.100.100", cport), state, cookie=cookie)


def pending(written, *flows):
    return P.Pending({f.cookie: f.key for f in flows}, written)


def test_written_before_the_arrival_is_honoured():
    f = flow()
    ok, why = P.honoured_pending(pending(1000.0, f), VIP, [f], LOCAL, vip_arrival=1050.0)
    assert ok == {77} and why == ""


def test_written_after_the_arrival_is_not_honoured_and_says_why():
    f = flow()
    ok, why = P.honoured_pending(pending(1100.0, f), VIP, [f], LOCAL, vip_arrival=1050.0)
    assert ok == frozenset()
    assert why == f"it may have been written after {VIP} arrived here (0.50 s: not before, to the kernel's 10 ms steps)"


def test_the_bounds_meeting_is_proof_and_one_step_past_is_not():
    """write_bound is the latest instant of the write, arrival_bound the earliest of
    the arrival: equal bounds still order them; anything more does not."""
    f = flow()
    assert P.honoured_pending(pending(1050.0, f), VIP, [f], LOCAL, vip_arrival=1050.0)[0] == {77}
    assert P.honoured_pending(pending(1050.4, f), VIP, [f], LOCAL, vip_arrival=1050.0)[0] == frozenset()


def test_unknown_write_time_or_arrival_is_not_honoured_while_the_vip_is_here():
    f = flow()
    assert P.honoured_pending(pending(None, f), VIP, [f], LOCAL, 1050.0)[0] == frozenset()
    ok, why = P.honoured_pending(pending(1.0, f), VIP, [f], LOCAL, None)
    assert ok == frozenset() and "arrival time" in why


def test_while_the_vip_is_away_every_named_socket_is_stale_anyway():
    f = flow()
    ok, _ = P.honoured_pending(pending(None, f), VIP, [f], frozenset({"198.51.100.1"}), None)
    assert ok == {77}


def test_a_cookie_counts_only_for_the_4_tuple_recorded_with_it():
    f = flow(cport=800, cookie=77)
    forged = P.Pending({77: FlowKey(VIP, 2049, "198.51.100.100", 999)}, 1.0)
    ok, why = P.honoured_pending(forged, VIP, [f], LOCAL, 1000.0)
    assert ok == frozenset() and "another 4-tuple" in why


def test_cookies_of_sockets_on_other_vips_or_gone_are_not_returned():
    here, other = flow(cookie=1), flow(cookie=2, vip="198.51.100.11")
    gone = FlowKey(VIP, 2049, "198.51.100.100", 5)
    p = P.Pending({1: here.key, 2: other.key, 3: gone}, 1.0)
    ok, _ = P.honoured_pending(p, VIP, [here, other], LOCAL | {"198.51.100.11"}, 1000.0)
    assert ok == {1}


def test_the_plan_ends_nothing_for_a_file_written_after_the_arrival():
    old, live = flow(cport=800, cookie=77), flow(cport=801, cookie=78)
    ok, _ = P.honoured_pending(P.Pending({78: live.key}, 1200.0), VIP, [old, live], LOCAL, vip_arrival=1050.0)
    acts = P.plan(P.Moment.POST_START, VIP, [old, live], LOCAL, P.Caps(), P.Options(vips=frozenset({VIP})),
                  old_cookies=ok)
    assert not any(isinstance(a, P.DESTRUCTIVE) for a in acts)


# --- the clock: times(2) ticks and IFA_CACHEINFO cstamp, both the jiffies counter -----------
def _kernel(hz: int, jiffies: int) -> tuple[int, int]:
    """(what times(2) reads, what cstamp would be) at this jiffies count since boot,
    computed as the kernel does: jiffies_64_to_clock_t(INITIAL_JIFFIES + j) and
    cstamp_delta() = j * 100 / HZ cut to 32 bits."""
    initial = 2**32 - 300 * hz
    return (initial + jiffies) * 100 // hz, (jiffies * 100 // hz) % 2**32


def test_jiffies_zero_tells_hz_from_times_minus_monotonic():
    for hz in (100, 250, 300, 1000):
        ticks, _ = _kernel(hz, 5000 * hz)
        mono = 5000 * 1.0 + 0.27      # the monotonic clock runs 0.27 s ahead (measured here)
        assert P.jiffies_zero(ticks / 100, mono) == 2**32 * 100 / hz - 30000
    assert P.jiffies_zero(5000.0 + 7 * 86400, 5000.0) is None


@settings(max_examples=500, deadline=None)
@given(hz=st.sampled_from([100, 250, 300, 1000]), j_write=st.integers(0, 2**40), gap=st.integers(-500, 500),
       later=st.integers(0, 10_000))
def test_a_write_is_proven_before_an_arrival_only_if_it_was(hz, j_write, gap, later):
    """For any jiffies counts of the write and of the address's creation (past the
    32-bit wrap of cstamp too), the bounds order them only when the write came first."""
    j_add = j_write + gap
    if j_add < 0:
        return
    j_now = max(j_write, j_add) + later
    ticks_w, _ = _kernel(hz, j_write)
    _, cstamp = _kernel(hz, j_add)
    ticks_now, _ = _kernel(hz, j_now)
    zero = 2**32 * 100 / hz - 30000
    proven = P.write_bound(ticks_w, zero) <= P.arrival_bound([cstamp], ticks_now, zero)
    if proven:
        assert j_write < j_add
    if (j_add - j_write) * 100 / hz >= 2:      # two centiseconds apart: always told
        assert proven


def test_an_address_on_two_devices_arrived_with_its_first_instance():
    hz, zero = 250, 2**32 * 100 / 250 - 30000
    first, second = _kernel(hz, 1000)[1], _kernel(hz, 5000)[1]
    ticks_now = _kernel(hz, 9000)[0]
    assert P.arrival_bound([second, first], ticks_now, zero) == P.arrival_bound([first], ticks_now, zero)
    assert P.arrival_bound([], ticks_now, zero) is None


def test_an_address_stamped_in_the_current_centisecond_is_not_taken_for_497_days_old():
    hz, zero = 250, 2**32 * 100 / 250 - 30000
    ticks_now, cstamp = _kernel(hz, 123_457)
    _, cstamp_next = _kernel(hz, 123_458)    # a stamp up to one step ahead of what times() said
    for c in (cstamp, cstamp_next):
        assert 0 <= ticks_now + 1 - zero - P.arrival_bound([c], ticks_now, zero) < 2


def test_the_real_clocks_give_an_hz_and_a_sane_now():
    import os
    import time
    e, mono = os.times().elapsed, time.clock_gettime(time.CLOCK_MONOTONIC)
    zero = P.jiffies_zero(e, mono)
    assert zero is not None and abs((round(e * 100) - zero) / 100 - mono) < 5.0


# --- property: an honest pending file never makes a live session stale ---------------------
sock = st.builds(lambda cport, born, cookie: (flow(cport=cport, cookie=cookie), born),
                 st.integers(1, 65535), st.floats(0, 10_000), st.integers(1, 2**64 - 1))


@settings(max_examples=400, deadline=None)
@given(socks=st.lists(sock, max_size=8, unique_by=lambda s: s[0].cookie),
       written=st.floats(0, 10_000), arrival=st.floats(0, 10_000), here=st.booleans(),
       forged=st.lists(st.tuples(st.integers(1, 2**64 - 1), st.integers(1, 65535)), max_size=3))
def test_rule_zero_holds_for_honest_pending_files_and_forged_ones_written_late(socks, written, arrival, here,
                                                                             forged):
    """Sockets are born at `born`; an honest file written at `written` names only
    sockets born by then. Whatever else a file written after the arrival names
    (forged cookies, any tuple), no socket born after the arrival (a live session)
    is ever ended while the VIP is here."""
    flows = [f for f, _ in socks]
    born = {f.cookie: b for f, b in socks}
    honest = {f.cookie: f.key for f, b in socks if b <= written}
    local = LOCAL if here else frozenset({"198.51.100.1"})
    ok, _ = P.honoured_pending(P.Pending(honest, written), VIP, flows, local, arrival)
    assert ok <= set(honest)
    if here:
        assert all(born[c] <= arrival for c in ok)
    late = dict(honest) | {c: FlowKey(VIP, 2049, "198.51.100.100", p) for c, p in forged}
    late_ok, _ = P.honoured_pending(P.Pending(late, arrival + 1 + abs(written)), VIP, flows, local, arrival)
    if here:
        assert late_ok == frozenset()
    acts = P.plan(P.Moment.POST_START, VIP, flows, local, P.Caps(), P.Options(vips=frozenset({VIP})),
                  old_cookies=ok | late_ok)
    for a in acts:
        for f in getattr(a, "flows", ()):
            assert not here or born[f.cookie] <= arrival


@settings(max_examples=200, deadline=None)
@given(written=st.floats(0, 10_000), earlier=st.floats(0, 5_000),
       arrival=st.one_of(st.none(), st.floats(0, 10_000)))
def test_an_earlier_write_never_honours_less(written, earlier, arrival):
    f = flow()
    a, _ = P.honoured_pending(pending(written, f), VIP, [f], LOCAL, arrival)
    b, _ = P.honoured_pending(pending(written - earlier, f), VIP, [f], LOCAL, arrival)
    assert a <= b
