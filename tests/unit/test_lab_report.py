"""The lab's measurements and their presentation: pure, no root."""
import json

import pytest

from nfsreset.lab import report as R


def steady(start, end, step=0.02):
    out, t = [], start
    while t <= end + 1e-9:
        out.append(round(t, 6))
        t += step
    return out


# -- measure -------------------------------------------------------------------------
def test_stall_runs_from_last_reply_before_delete_to_first_after_usable():
    replies = steady(10.0, 11.0) + steady(12.7, 13.0)
    ok, stall, to_reply = R.measure(replies, t_del=11.01, t_usable=12.0, cap=20)
    assert ok
    assert stall == pytest.approx(1.7)
    assert to_reply == pytest.approx(0.7)


def test_no_reply_after_usable_is_not_recovered():
    replies = steady(10.0, 11.0)
    assert R.measure(replies, t_del=11.01, t_usable=12.0, cap=20) == (False, None, None)


def test_stall_longer_than_cap_is_not_recovered_even_if_a_reply_came_late():
    replies = steady(10.0, 11.0) + [40.0]
    assert R.measure(replies, t_del=11.01, t_usable=12.0, cap=20) == (False, None, None)


def test_reply_inside_the_move_splits_the_stall():
    # IPv6: the old owner can still send from the deleted address
    replies = [10.0, 10.5, 11.2, 12.9]
    ok, stall, to_reply = R.measure(replies, t_del=10.6, t_usable=12.0, cap=20)
    assert ok and stall == pytest.approx(1.7) and to_reply == pytest.approx(0.9)


def test_no_reply_before_delete_opens_window_at_delete():
    ok, stall, _ = R.measure([13.0], t_del=11.0, t_usable=12.0, cap=20)
    assert ok and stall == pytest.approx(2.0)


def test_address_never_usable_is_not_recovered():
    assert R.measure(steady(10, 11), t_del=11.0, t_usable=None, cap=5) == (False, None, None)


# -- ss lines ---------------------------------------------------------------------------
@pytest.mark.parametrize("line, want", [
    ("ESTAB 0 132 198.51.100.10:2049 198.51.100.100:1023",
     ("ESTAB", "198.51.100.10", 2049, "198.51.100.100", 1023)),
    ("ESTAB      0      0      [2001:db8::10]:2049     [2001:db8::100]:1023",
     ("ESTAB", "2001:db8::10", 2049, "2001:db8::100", 1023)),
    ("ESTAB 0 0 [::ffff:198.51.100.10]:2049 [::ffff:198.51.100.100]:1000",
     ("ESTAB", "198.51.100.10", 2049, "198.51.100.100", 1000)),
    ("LISTEN 0 128 0.0.0.0:2049 0.0.0.0:*", ("LISTEN", "0.0.0.0", 2049, "0.0.0.0", 0)),
    ("LISTEN 0 128 [::]:2049 [::]:*", ("LISTEN", "::", 2049, "[::]", 0)),
])
def test_parse_ss_line(line, want):
    assert R.parse_ss_line(line) == want


@pytest.mark.parametrize("line", ["", "State Recv-Q Send-Q Local Peer", "garbage 0 0 x y"])
def test_parse_ss_line_rejects_non_socket_lines(line):
    assert R.parse_ss_line(line) is None


# -- formatting ------------------------------------------------------------------------
STALE4 = "ESTAB 0 132 198.51.100.10:2049 198.51.100.100:1023"


def baseline(fam=4, vip="198.51.100.10"):
    return R.FamilyResult(
        family=fam, remedy="none", vip=vip, client_port=1023,
        failover=R.DirectionResult("failover", "node1", "node2", cap=8.0, recovered=True, stall=1.69849,
                                   usable_to_first_reply=0.6881, del_to_usable=1.0061, stale=[STALE4],
                                   client_events=["+1.690 recv ECONNRESET"]),
        failback=R.DirectionResult("failback", "node2", "node1", cap=8.0, recovered=False, stall=None,
                                   usable_to_first_reply=None, del_to_usable=1.0059, stale=[STALE4]),
        hook_timings=[R.HookTiming("failover", "post_stop", "node1", 0.00012)],
    )


def remedied(fam=4):
    r = baseline(fam)
    r.remedy = "hooks"
    r.failback = R.DirectionResult("failback", "node2", "node1", cap=8.0, recovered=True, stall=1.1,
                                   usable_to_first_reply=0.061, del_to_usable=1.0)
    r.hook_timings = [R.HookTiming("failover", "post_stop", "node1", 0.041),
                      R.HookTiming("failback", "pre_start", "node1", 0.2)]
    return r


def test_json_expresses_unrecovered_as_recovered_false_with_cap():
    obj = json.loads(R.format_json([baseline()], cap=8.0, gap=1.0, user_timeout=180))
    run = obj["runs"][0]
    assert run["failover"]["recovered"] is True
    assert run["failover"]["stall"] == 1.698          # rounded to ms
    assert run["failover"]["usable_to_first_reply"] == 0.688
    assert run["failback"] == {
        "old": "node2", "new": "node1", "recovered": False, "stall": None, "cap": 8.0,
        "usable_to_first_reply": None, "del_to_usable": 1.006, "stale_sockets": [STALE4],
        "client_events": [], "stop_s": None, "start_s": None,
    }
    assert obj["settings"] == {"cap": 8.0, "gap": 1.0, "user_timeout": 180.0, "strategy": None,
                               "families": [4], "remedies": ["none"], "movers": ["ip"],
                               "servers": ["sim"], "versions": ["echo"], "states": ["shared"]}
    assert run["hook_timings"] == [{"phase": "failover", "hook": "post_stop", "node": "node1",
                                    "seconds": 0.0, "error": None}]


def test_json_keys_are_the_same_for_a_failed_run():
    ok = R.run_json(baseline())
    failed = R.run_json(R.FamilyResult(family=6, remedy="none", vip="", error="LabError: boom"))
    assert ok.keys() == failed.keys()
    assert failed["failover"] is None and failed["error"] == "LabError: boom"


def test_text_table_shows_stalls_cap_and_stale_lines():
    text = R.format_text([baseline(4), baseline(6, "2001:db8::10")], cap=8.0, gap=1.0, user_timeout=180)
    lines = text.splitlines()
    fo4 = next(line for line in lines if line.startswith("IPv4"))
    assert "failover stall" in fo4 and "1.698 s" in fo4
    assert any("failback stall" in line and ">8 s" in line for line in lines)
    assert any(line.startswith("IPv6") for line in lines)
    assert sum(STALE4 in line for line in lines) == 4   # 2 families x 2 directions
    assert "0.688 s / -" in text


def test_text_table_puts_remedies_side_by_side():
    text = R.format_text([baseline(), remedied()], cap=8.0, gap=1.0, user_timeout=180)
    header = next(line for line in text.splitlines() if "none" in line and "hooks" in line)
    assert header.index("none") < header.index("hooks")
    fb = next(line for line in text.splitlines() if "failback stall" in line)
    assert ">8 s" in fb and "1.100 s" in fb
    assert fb.index(">8 s") < fb.index("1.100 s")       # columns follow the header
    assert "slowest hook" in text and "pre_start@node1" in text


def test_text_puts_movers_side_by_side_with_their_stop_and_start_times():
    plain, agent = baseline(), remedied()
    plain.mover, agent.mover, agent.remedy = "ipaddr2", "ocf", "none"
    for run, stop, start in ((plain, 0.065, 0.064), (agent, 0.115, 0.164)):
        run.failover.stop_s = run.failback.stop_s = stop
        run.failover.start_s = run.failback.start_s = start
    text = R.format_text([plain, agent], cap=8.0, gap=1.0, user_timeout=180)
    lines = text.splitlines()
    assert lines[0].startswith("ipaddr2: VIP moved by the real IPaddr2 agent")
    header = next(line for line in lines if "ipaddr2" in line and "ocf" in line and "VIP" not in line)
    assert header.index("ipaddr2") < header.index("ocf")
    fo = next(line for line in lines if "stop / start fo" in line)
    assert fo.index("0.065 s / 0.064 s") < fo.index("0.115 s / 0.164 s")
    obj = json.loads(R.format_json([plain, agent], cap=8.0, gap=1.0, user_timeout=180))
    assert obj["settings"]["movers"] == ["ipaddr2", "ocf"]
    assert [(r["mover"], r["failback"]["stop_s"], r["failback"]["start_s"]) for r in obj["runs"]] == [
        ("ipaddr2", 0.065, 0.064), ("ocf", 0.115, 0.164)]


def test_text_shows_an_error_run_without_crashing():
    err = R.FamilyResult(family=6, remedy="none", vip="", error="TopologyError: no bridge")
    text = R.format_text([baseline(), err], cap=8.0, gap=1.0, user_timeout=180)
    assert "TopologyError: no bridge" in text


def test_showcase_note_sets_baseline_failback_against_nfsreset_first_reply():
    """The default `nfsreset lab` ends with one sentence per family: problem, then fix."""
    base, fix = baseline(), remedied()
    base.mover, fix.mover, fix.remedy, fix.state = "pacemaker", "pacemaker-ocf", "none", "per-head"
    six_base, six_fix = baseline(6, "2001:db8::10"), remedied(6)
    six_base.mover, six_fix.mover, six_fix.remedy = "pacemaker", "pacemaker-ocf", "none"
    note = R.showcase_note([base, fix, six_base, six_fix], cap=8.0)
    assert note.splitlines() == [
        "IPv4: without nfsreset the failback got no reply within 8 s (1 stale socket on the old owner); "
        "with nfsreset the first reply came 0.061 s after the VIP was usable (failover 0.688 s).",
        "IPv6: without nfsreset the failback got no reply within 8 s (1 stale socket on the old owner); "
        "with nfsreset the first reply came 0.061 s after the VIP was usable (failover 0.688 s).",
    ]
    text = R.format_text([base, fix], cap=8.0, gap=1.0, user_timeout=180)
    assert "nfsreset state dir: one per head" in text


def test_state_line_only_when_nfsreset_ran():
    assert "state dir" not in R.format_text([baseline()], cap=8.0, gap=1.0, user_timeout=180)
    assert "nfsreset state dir: one dir both heads see" in R.format_text(
        [baseline(), remedied()], cap=8.0, gap=1.0, user_timeout=180)
