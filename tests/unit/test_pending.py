"""Pending sockets are honoured only when the planner says so (issue 10, item 7).

A pending file names sockets (by kernel cookie) that `kill` saw while their VIP
was away and could not end then. At post-start they are ended even though the
VIP is now configured here. That is right only for sockets that existed before
the VIP arrived: a record written after the arrival (forged, or a file of
another run) may name a live session, and rule zero says those are never touched.
"""
from hypothesis import given, settings, strategies as st

from nfsreset import plan as P
from nfsreset.model import Flow, FlowKey

VIP, VIP6 = "198.51.100.10", "2001:db8::10"
LOCAL = frozenset({"198.51.100.1", VIP})


def flow(cport=800, cookie=77, vip=VIP, state="ESTABLISHED"):
    return Flow(FlowKey(vip, 2049, "198.51.100.100", cport), state, cookie=cookie)


def pending(written, *flows):
    return P.Pending({f.cookie: f.key for f in flows}, written)


def test_written_before_the_arrival_is_honoured():
    f = flow()
    ok, why = P.honoured_pending(pending(10.0, f), VIP, [f], LOCAL, vip_arrival=10.5)
    assert ok == {77} and why == ""


def test_written_after_the_arrival_is_not_honoured_and_says_why():
    f = flow()
    ok, why = P.honoured_pending(pending(11.0, f), VIP, [f], LOCAL, vip_arrival=10.5)
    assert ok == frozenset()
    assert why == f"it was written 0.50 s after {VIP} arrived here"


def test_written_within_the_clock_resolution_of_the_arrival_is_not_proof():
    f = flow()
    ok, why = P.honoured_pending(pending(10.49, f), VIP, [f], LOCAL, vip_arrival=10.5)
    assert ok == frozenset() and "not proof" in why
    ok, _ = P.honoured_pending(pending(10.5 - P.PENDING_SLACK_S, f), VIP, [f], LOCAL, vip_arrival=10.5)
    assert ok == {77}


def test_unknown_write_time_or_arrival_is_not_honoured_while_the_vip_is_here():
    f = flow()
    assert P.honoured_pending(pending(None, f), VIP, [f], LOCAL, 10.5)[0] == frozenset()
    ok, why = P.honoured_pending(pending(1.0, f), VIP, [f], LOCAL, None)
    assert ok == frozenset() and "arrival time" in why


def test_while_the_vip_is_away_every_named_socket_is_stale_anyway():
    f = flow()
    ok, _ = P.honoured_pending(pending(None, f), VIP, [f], frozenset({"198.51.100.1"}), None)
    assert ok == {77}


def test_a_cookie_counts_only_for_the_4_tuple_recorded_with_it():
    f = flow(cport=800, cookie=77)
    forged = P.Pending({77: FlowKey(VIP, 2049, "198.51.100.100", 999)}, 1.0)
    ok, why = P.honoured_pending(forged, VIP, [f], LOCAL, 10.0)
    assert ok == frozenset() and "another 4-tuple" in why


def test_cookies_of_sockets_on_other_vips_or_gone_are_not_returned():
    here, other = flow(cookie=1), flow(cookie=2, vip="198.51.100.11")
    gone = FlowKey(VIP, 2049, "198.51.100.100", 5)
    p = P.Pending({1: here.key, 2: other.key, 3: gone}, 1.0)
    ok, _ = P.honoured_pending(p, VIP, [here, other], LOCAL | {"198.51.100.11"}, 10.0)
    assert ok == {1}


def test_the_plan_ends_only_the_honoured_pending_socket():
    old, live = flow(cport=800, cookie=77), flow(cport=801, cookie=78)
    p = P.Pending({77: old.key, 78: live.key}, 10.0)
    ok, _ = P.honoured_pending(p, VIP, [old, live], LOCAL, vip_arrival=10.5)
    assert ok == {77, 78}     # both predate the arrival: both stale
    p_late = P.Pending({78: live.key}, 12.0)
    ok_late, _ = P.honoured_pending(p_late, VIP, [old, live], LOCAL, vip_arrival=10.5)
    acts = P.plan(P.Moment.POST_START, VIP, [old, live], LOCAL, P.Caps(), P.Options(vips=frozenset({VIP})),
                  old_cookies=ok_late)
    assert not any(isinstance(a, P.DESTRUCTIVE) for a in acts)


# --- the VIP's arrival from the address's creation stamp -------------------------------
def _times_elapsed(mono: float, hz: int, lag: float = 0.27) -> float:
    """What times(2) reads at CLOCK_MONOTONIC `mono` on a kernel of this HZ whose
    jiffies started `lag` s after the monotonic clock (0.27 s on this machine)."""
    return (2**32 / hz - 300) + mono - lag


def test_arrival_is_the_address_age_on_the_jiffies_clock_subtracted_from_monotonic_now():
    for hz in (100, 250, 300, 1000):
        mono = 5000.0
        cstamp = int((4000.0 - 0.27) * 100)      # added at mono 4000 on the jiffies clock
        got = P.vip_arrival([cstamp], _times_elapsed(mono, hz), mono)
        assert abs(got - 4000.0) <= 0.02, (hz, got)


def test_arrival_survives_the_32_bit_wrap_of_cstamp():
    mono = 2**32 / 100 + 1000.0        # 497 days and a bit after boot
    cstamp = int((mono - 600.0 - 0.27) * 100) % 2**32
    got = P.vip_arrival([cstamp], _times_elapsed(mono, 250), mono)
    assert abs(got - (mono - 600.0)) <= 0.02


def test_an_address_on_two_devices_arrived_with_its_first_instance():
    mono = 5000.0
    got = P.vip_arrival([int(4500 * 100), int(3000 * 100)], _times_elapsed(mono, 250, lag=0), mono)
    assert abs(got - 3000.0) <= 0.02


def test_no_stamp_or_an_unknown_clock_gives_no_arrival():
    assert P.vip_arrival([], _times_elapsed(5000.0, 250), 5000.0) is None
    assert P.vip_arrival([100], 5000.0 + 7 * 86400, 5000.0) is None


def test_arrival_from_the_real_kernel_clock_is_sane():
    """This machine's clocks: an address 'added' now (cstamp computed as the kernel
    would, from times()) arrives now, within the 10 ms resolution."""
    import os
    import time
    e, mono = os.times().elapsed, time.clock_gettime(time.CLOCK_MONOTONIC)
    hz = min((100, 250, 300, 1000), key=lambda h: abs(e - mono - (2**32 / h - 300)))
    cstamp = int((e - (2**32 / hz - 300)) * 100) % 2**32
    assert abs(P.vip_arrival([cstamp], e, mono) - mono) <= 0.02


# --- property: an honest pending file never makes a live session stale ---------------------
sock = st.builds(lambda cport, born, cookie: (flow(cport=cport, cookie=cookie), born),
                 st.integers(1, 65535), st.floats(0, 100), st.integers(1, 2**64 - 1))


@settings(max_examples=400, deadline=None)
@given(socks=st.lists(sock, max_size=8, unique_by=lambda s: (s[0].cookie, s[0].key)),
       written=st.floats(0, 100), arrival=st.floats(0, 100), here=st.booleans(),
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
        assert all(born[c] < arrival for c in ok)
    # A forged file (any cookies, any tuples) written at or after the arrival honours nothing.
    late = dict(honest) | {c: FlowKey(VIP, 2049, "198.51.100.100", p) for c, p in forged}
    late_ok, _ = P.honoured_pending(P.Pending(late, arrival + abs(written)), VIP, flows, local, arrival)
    if here:
        assert late_ok == frozenset()
    acts = P.plan(P.Moment.POST_START, VIP, flows, local, P.Caps(), P.Options(vips=frozenset({VIP})),
                  old_cookies=ok | late_ok)
    for a in acts:
        for f in getattr(a, "flows", ()):
            assert not here or born[f.cookie] < arrival


@settings(max_examples=200, deadline=None)
@given(written=st.floats(0, 100), earlier=st.floats(0, 50), arrival=st.one_of(st.none(), st.floats(0, 100)))
def test_an_earlier_write_never_honours_less(written, earlier, arrival):
    f = flow()
    a, _ = P.honoured_pending(pending(written, f), VIP, [f], LOCAL, arrival)
    b, _ = P.honoured_pending(pending(written - earlier, f), VIP, [f], LOCAL, arrival)
    assert a <= b
