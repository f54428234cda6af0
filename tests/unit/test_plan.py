"""The planning core: staleness, the ladder, the order of actions, and rule zero."""
from hypothesis import given, settings, strategies as st

from nfsreset.core import plan as P
from nfsreset.core import presence
from nfsreset.core.model import TCP_STATES, Flow, FlowKey

VIP, OTHER = "198.51.100.10", "198.51.100.11"
VIP6 = "2001:db8::10"
LOCAL_HOST = frozenset({"198.51.100.1"})


def flow(vip=VIP, cport=800, state="ESTABLISHED", client="198.51.100.100", first_seen=None, vport=2049):
    return Flow(FlowKey(vip, vport, client, cport), state, first_seen=first_seen)


def opts(**kw):
    kw.setdefault("vips", frozenset({VIP, VIP6}))
    return P.Options(**kw)


def kinds(actions):
    return [type(a).__name__ for a in actions]


def test_post_stop_records_quarantines_then_destroys_in_that_order():
    flows = [flow(), flow(cport=801, state="FIN_WAIT1"), flow(state="LISTEN", cport=1)]
    acts = P.plan(P.Moment.POST_STOP, VIP, flows, LOCAL_HOST, P.Caps(), opts())
    assert kinds(acts) == ["Record", "Quarantine", "Destroy"]
    assert {f.key.cport for f in acts[2].flows} == {800, 801}     # never the listener
    assert P.exit_code(acts) == 0


def test_other_vip_other_port_and_other_client_are_left_alone():
    flows = [flow(vip=OTHER), flow(vport=22), flow(client="198.51.100.200", cport=900), flow()]
    o = opts(clients=(P.Session("198.51.100.100"),))
    acts = P.plan(P.Moment.PRE_START, VIP, flows, LOCAL_HOST, P.Caps(), o)
    (d,) = [a for a in acts if isinstance(a, P.Destroy)]
    assert [f.key for f in d.flows] == [flow().key]


def test_configured_vip_is_refused_without_force_and_without_exact_session():
    local = LOCAL_HOST | {VIP}
    acts = P.plan(P.Moment.POST_STOP, VIP, [flow()], local, P.Caps(), opts())
    assert kinds(acts) == ["Refuse"] and P.exit_code(acts) == 3
    acts = P.plan(P.Moment.POST_STOP, VIP, [flow()], local, P.Caps(),
                  opts(force=True, clients=(P.Session("198.51.100.100"),)))
    assert kinds(acts) == ["Refuse"]


def test_force_ends_only_the_session_named_exactly():
    local = LOCAL_HOST | {VIP}
    flows = [flow(cport=800), flow(cport=801)]
    acts = P.plan(P.Moment.POST_STOP, VIP, flows, local, P.Caps(),
                  opts(force=True, clients=(P.Session("198.51.100.100", 801),)))
    (d,) = [a for a in acts if isinstance(a, P.Destroy)]
    assert [f.key.cport for f in d.flows] == [801]
    assert not any(isinstance(a, P.Quarantine) for a in acts)      # VIP is here: no quarantine


def test_ladder_falls_back_when_destroy_is_missing_or_tried():
    assert P.rungs("auto", P.Caps(destroy=False), vip_local=True) == ["rst", "nft"]
    assert P.rungs("auto", P.Caps(destroy=False), vip_local=False) == ["nft"]
    assert P.rungs("auto", P.Caps(), vip_local=True, tried={"destroy"}) == ["rst", "nft"]
    assert P.rungs("rst", P.Caps(), vip_local=False) == []


def test_forced_rst_before_the_vip_arrives_is_deferred_to_post_start():
    acts = P.plan(P.Moment.PRE_START, VIP, [flow()], LOCAL_HOST, P.Caps(), opts(strategy="rst"))
    assert kinds(acts) == ["Defer", "LiftQuarantine"]
    assert P.exit_code(acts) == 0


def test_nothing_available_is_unable_with_exit_1():
    acts = P.plan(P.Moment.PRE_START, VIP, [flow()], LOCAL_HOST, P.Caps(False, False, False), opts())
    assert kinds(acts) == ["Unable"] and P.exit_code(acts) == 1
    assert "SOCK_DESTROY" in acts[0].reason


def test_post_start_lifts_quarantine_ends_old_sockets_announces_then_tickles():
    local = LOCAL_HOST | {VIP}
    old = flow(cport=800, first_seen=10.0)
    new = flow(cport=801, first_seen=30.0)
    unknown_age = flow(cport=802)
    known = [FlowKey(VIP, 2049, "198.51.100.100", 800), FlowKey(OTHER, 2049, "198.51.100.100", 5)]
    acts = P.plan(P.Moment.POST_START, VIP, [old, new, unknown_age], local, P.Caps(), opts(),
                  vip_since={VIP: 20.0}, known_clients=known)
    assert kinds(acts) == ["LiftQuarantine", "Destroy", "Announce", "Tickle"]
    assert [f.key.cport for f in acts[1].flows] == [800]
    assert acts[3].keys == (known[0],)
    assert acts[3].schedule == P.TICKLE_SCHEDULE


def test_post_start_never_tickles_a_tuple_live_here():
    """The union of the peers' lists may name a client that already reconnected
    here (its socket is newer than the VIP's arrival): it is not tickled. A
    stale socket of the same list is ended and its tuple still tickled."""
    local = LOCAL_HOST | {VIP}
    live = flow(cport=801, first_seen=30.0)
    stale = flow(cport=800, first_seen=10.0)
    known = [stale.key, live.key, FlowKey(VIP, 2049, "198.51.100.100", 802)]
    acts = P.plan(P.Moment.POST_START, VIP, [live, stale], local, P.Caps(), opts(),
                  vip_since={VIP: 20.0}, known_clients=known)
    (t,) = [a for a in acts if isinstance(a, P.Tickle)]
    assert [k.cport for k in t.keys] == [800, 802]


def test_more_tickle_rounds_extend_the_schedule():
    assert P._schedule(5) == (0.0, 0.6, 1.5, 3.3, 6.9)
    assert P._schedule(1) == (0.0,)


def test_post_start_on_a_host_without_the_vip_is_refused():
    acts = P.plan(P.Moment.POST_START, VIP, [], LOCAL_HOST, P.Caps(), opts())
    assert P.exit_code(acts) == 3


# --- rule zero, for any input ---------------------------------------------------
addrs = st.sampled_from([VIP, OTHER, VIP6, "2001:db8::11"])
flows_st = st.lists(st.builds(
    flow, vip=addrs, cport=st.integers(1, 65535), vport=st.sampled_from([2049, 111]),
    state=st.sampled_from(sorted(TCP_STATES.values())),
    first_seen=st.one_of(st.none(), st.floats(0, 100))), max_size=12)


@settings(max_examples=400, deadline=None)
@given(flows=flows_st, local=st.sets(addrs), vip=addrs, moment=st.sampled_from(list(P.Moment)),
       strategy=st.sampled_from(P.STRATEGIES), since=st.one_of(st.none(), st.floats(0, 100)),
       force=st.booleans(), caps=st.builds(P.Caps, st.booleans(), st.booleans(), st.booleans()),
       named=st.lists(st.builds(P.Session, st.just("198.51.100.100"),
                                st.one_of(st.none(), st.integers(1, 65535))), max_size=2),
       tried=st.sets(st.sampled_from(["destroy", "rst", "nft"])))
def test_rule_zero_no_live_session_is_ever_touched(flows, local, vip, moment, strategy, since,
                                                   force, caps, named, tried):
    vip_since = {} if since is None else {vip: since}
    o = opts(strategy=strategy, force=force, clients=tuple(named))
    acts = P.plan(moment, vip, flows, frozenset(local), caps, o, vip_since=vip_since, tried=tried)
    touched = []
    for a in acts:
        if isinstance(a, (P.Destroy, P.ExactRst, P.Defer)):
            touched += a.flows
        elif isinstance(a, P.GuardTuples):
            touched += [f for f in flows if f.key in a.keys]
    for f in touched:
        assert f.state != "LISTEN"
        assert f.key.vip == vip and f.key.vport in o.ports
        configured = f.key.vip in local
        predates = since is not None and f.first_seen is not None and f.first_seen < since
        exactly_named = force and any(s.cport == f.key.cport for s in named)
        assert not configured or predates or exactly_named, (f, acts)


@settings(max_examples=200, deadline=None)
@given(flows=flows_st, local=st.sets(addrs), vip=addrs)
def test_exactly_one_outcome_for_every_stale_session(flows, local, vip):
    every_vip = frozenset({VIP, OTHER, VIP6, "2001:db8::11"})
    acts = P.plan(P.Moment.PRE_START, vip, flows, frozenset(local), P.Caps(), opts(vips=every_vip))
    ended = [f for a in acts if isinstance(a, P.Destroy) for f in a.flows]
    if vip in local:
        assert not ended
    else:
        want = [f for f in flows if f.key.vip == vip and f.key.vport == 2049 and f.state != "LISTEN"]
        assert sorted(ended, key=repr) == sorted(want, key=repr)


def test_pre_start_destroys_first_then_lifts_the_quarantine():
    acts = P.plan(P.Moment.PRE_START, VIP, [flow()], LOCAL_HOST, P.Caps(), opts())
    assert kinds(acts) == ["Destroy", "LiftQuarantine"]


def test_post_start_during_dad_ends_old_sockets_but_does_not_announce():
    local = LOCAL_HOST | {VIP}
    acts = P.plan(P.Moment.POST_START, VIP, [flow(first_seen=1.0)], local, P.Caps(), opts(announce=False),
                  vip_since={VIP: 2.0}, known_clients=[flow().key])
    assert kinds(acts) == ["LiftQuarantine", "Destroy"]


def test_pending_cookies_from_pre_start_mark_sockets_stale_at_post_start():
    local = LOCAL_HOST | {VIP}
    old = Flow(FlowKey(VIP, 2049, "198.51.100.100", 800), "ESTABLISHED", cookie=77)
    live = Flow(FlowKey(VIP, 2049, "198.51.100.100", 801), "ESTABLISHED", cookie=78)
    acts = P.plan(P.Moment.POST_START, VIP, [old, live], local, P.Caps(), opts(), old_cookies=frozenset({77}))
    (d,) = [a for a in acts if isinstance(a, P.Destroy)]
    assert d.flows == (old,)


# --- rule zero when local_addrs is the kernel's answer (nfsreset.core.presence) ---------
RANGES = {"198.51.100.64/27": ("198.51.100.70",), "2001:db8::40/124": ("2001:db8::4a",),
          "198.51.100.0/28": (VIP, OTHER)}
kernel_addrs = st.sampled_from([VIP, OTHER, VIP6, "2001:db8::11", "198.51.100.70", "2001:db8::4a"])


class Row:
    """An address-table row as nfsreset.kernel.addrs.Addr has it."""
    def __init__(self, ip, tentative=False):
        self.ip, self.tentative = ip, tentative


def touched(acts, flows):
    out = []
    for a in acts:
        if isinstance(a, (P.Destroy, P.ExactRst, P.Defer)):
            out += a.flows
        elif isinstance(a, P.GuardTuples):
            out += [f for f in flows if f.key in a.keys]
    return out


@settings(max_examples=400, deadline=None)
@given(flows=st.lists(st.builds(
           flow, vip=kernel_addrs, cport=st.integers(1, 65535), vport=st.sampled_from([2049, 111]),
           state=st.sampled_from(sorted(TCP_STATES.values())),
           first_seen=st.one_of(st.none(), st.floats(0, 100))), max_size=12),
       rows=st.lists(st.tuples(kernel_addrs, st.booleans()), max_size=4),
       ranges=st.sets(st.sampled_from(sorted(RANGES))), vip=kernel_addrs,
       moment=st.sampled_from(list(P.Moment)), strategy=st.sampled_from(P.STRATEGIES),
       since=st.one_of(st.none(), st.floats(0, 100)), force=st.booleans(),
       caps=st.builds(P.Caps, st.booleans(), st.booleans(), st.booleans()),
       named=st.lists(st.builds(P.Session, st.just("198.51.100.100"),
                                st.one_of(st.none(), st.integers(1, 65535))), max_size=2),
       tried=st.sets(st.sampled_from(["destroy", "rst", "nft"])))
def test_rule_zero_holds_with_local_addrs_from_the_kernel_answer(flows, rows, ranges, vip, moment, strategy,
                                                                 since, force, caps, named, tried):
    """local_addrs as Engine.local_addrs builds it: the address table (any device,
    tentative rows too) plus the VIPs a FIB lookup finds local (`local` route
    ranges). A session on an address that is in the table or in a range is
    configured: never touched unless it predates the VIP or was named exactly."""
    table = [Row(ip, tentative) for ip, tentative in rows]
    in_range = {a for r in ranges for a in RANGES[r]}
    o = opts(vips=frozenset({vip}), strategy=strategy, force=force, clients=tuple(named))
    local = presence.local_set(table, in_range & (o.vips | {vip}))
    vip_since = {} if since is None else {vip: since}
    acts = P.plan(moment, vip, flows, local, caps, o, vip_since=vip_since, tried=tried)
    for f in touched(acts, flows):
        configured = any(r.ip == f.key.vip for r in table) or f.key.vip in in_range
        predates = since is not None and f.first_seen is not None and f.first_seen < since
        exactly_named = force and any(s.cport == f.key.cport for s in named)
        assert not configured or predates or exactly_named, (f, acts)
    if vip in in_range or any(r.ip == vip for r in table):
        assert not any(isinstance(a, P.Quarantine) for a in acts), "a configured VIP is never quarantined"
