"""The move report (nfsreset.core.movereport): events in, one report out."""
from nfsreset.core.movereport import MOVE_REPORT_BOUND_S, Move, Tuple

VIP = "198.51.100.10"
A, B, C = "198.51.100.20", "198.51.100.21", "198.51.100.22"


def test_all_back_gives_median_and_slowest_and_closes_at_once():
    m = Move(VIP, 100.0, [Tuple(A, 871, 2049), Tuple(B, 700, 2049), Tuple(C, 701, 2049)])
    assert not m.due(100.1)
    assert m.seen(A, 871, 2049, 100.31) == Tuple(A, 871, 2049)
    assert m.seen(B, 700, 2049, 100.02) == Tuple(B, 700, 2049)
    assert not m.due(100.4)
    m.seen(C, 701, 2049, 100.05)
    assert m.due(100.4)
    r = m.report(100.4, stale_left=0)
    assert r.complete and r.expected == 3
    assert round(r.median, 3) == 0.05
    assert r.line() == (f"arrival of {VIP}: 3 of 3 clients back, median 0.050 s, "
                        f"slowest {A}:871 0.310 s, 0 stale sockets left")
    j = r.as_json()
    assert j["back"] == 3 and j["slowest"] == {"client": f"{A}:871", "s": 0.31} and j["not_back"] == []


def test_a_client_not_back_within_the_bound_is_named():
    m = Move(VIP, 10.0, [Tuple(A, 871, 2049), Tuple(B, 700, 2049)], bound_s=5.0)
    m.seen(A, 871, 2049, 10.2)
    assert not m.due(14.9) and m.due(15.0)
    r = m.report(15.0, stale_left=1)
    assert not r.complete
    assert r.line().endswith(f"1 stale socket left; not back within 5 s: {B}:700")
    assert r.as_json()["not_back"] == [{"client": B, "cport": 700, "vport": 2049}]


def test_a_new_port_of_the_same_client_counts_once_and_others_do_not():
    m = Move(VIP, 0.0, [Tuple(A, 871, 2049), Tuple(A, 872, 2049)])
    assert m.seen(C, 900, 2049, 0.1) is None               # not a known client
    assert m.seen(A, 40000, 20048, 0.1) is None            # known client, another service
    assert m.seen(A, 40000, 2049, 0.2) == Tuple(A, 871, 2049)
    assert m.seen(A, 40001, 2049, 0.3) == Tuple(A, 872, 2049)
    assert m.seen(A, 40002, 2049, 0.4) is None             # nobody left waiting


def test_a_connection_from_before_usable_is_not_a_return():
    m = Move(VIP, 5.0, [Tuple(A, 871, 2049)])
    assert m.seen(A, 871, 2049, 4.99) is None
    assert m.report(5.0 + MOVE_REPORT_BOUND_S).line().endswith(f"not back within {MOVE_REPORT_BOUND_S:g} s: {A}:871")


def test_no_client_known_reports_at_once_and_many_missing_are_cut():
    assert Move(VIP, 0.0, []).due(0.0)
    assert Move(VIP, 0.0, []).report(0.0).line() == f"arrival of {VIP}: 0 of 0 clients back, 0 stale sockets left"
    m = Move(VIP, 0.0, [Tuple(A, p, 2049) for p in range(700, 720)], bound_s=1.0)
    line = m.report(1.0).line()
    assert line.endswith("(+12 more)") and line.count(A) == 8
    v6 = Move("2001:db8::10", 0.0, [Tuple("2001:db8::20", 871, 2049)])
    v6.seen("2001:db8::20", 871, 2049, 0.5)
    assert "slowest [2001:db8::20]:871 0.500 s" in v6.report(0.5).line()


def test_the_report_feeds_the_prometheus_histogram():
    from nfsreset.daemon.metrics import Metrics
    m = Move(VIP, 0.0, [Tuple(A, 871, 2049), Tuple(B, 700, 2049)], bound_s=1.0)
    m.seen(A, 871, 2049, 0.02)
    metrics = Metrics()
    metrics.observe_move(m.report(1.0))
    text = metrics.render()
    assert "# TYPE nfsreset_client_return_seconds histogram" in text
    assert 'nfsreset_client_return_seconds_bucket{le="0.01"} 0' in text
    assert 'nfsreset_client_return_seconds_bucket{le="0.025"} 1' in text
    assert 'nfsreset_client_return_seconds_bucket{le="+Inf"} 1' in text
    assert "nfsreset_client_return_seconds_count 1" in text
    assert "nfsreset_clients_not_back_total 1" in text
