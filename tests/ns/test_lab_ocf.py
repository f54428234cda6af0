"""`nfsreset lab --mover ipaddr2,ocf`: the VIP moved by the real resource agents.

One lab run moves the VIP with plain ocf:heartbeat:IPaddr2 (the baseline) and
with cli/ocf/nfsreset (ocf:nfsreset:IPaddr2nfs, running the real nfsreset from
the venv, state dir shared by both nodes), node1 -> node2 -> node1, for IPv4
and IPv6. Both agents run inside the node namespaces around the real IPaddr2;
the lab learns when the address came and went from the kernel (ip monitor).

What must hold:
- with plain IPaddr2 the IPv4 failover recovers within the cap (the lab
  works), and the failback stalls until the client's own timeout
  (past the small cap here): the old owner's stale socket swallows it;
- with the agent, failback's first reply comes within 0.3 s of the VIP being
  usable (after DAD for IPv6), and nothing stale is left on the old owner;
- the agent's start and stop take at most 0.5 s longer than IPaddr2's,
  measured in the same run. IPv6 starts are compared as medians of three
  (first start, failover, failback): IPaddr2 polls DAD once a second, so a
  start of either agent now and then takes a whole second more.

~50 s: four lab runs (two families x two agents) on the sim server; ~17 s
more for both agents on real NFS-Ganesha with an NFSv3 client (IPv4).
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess

import pytest

from nfsreset.lab.mover_ocf import IPADDR2
from nfsreset.lab.topology import list_netns
from tests.ns.scene import NFSRESET, ganesha_args, needs_ganesha

pytestmark = pytest.mark.netns

CAP = 5
if not os.access(IPADDR2, os.X_OK):
    pytest.skip("needs resource-agents (IPaddr2): apt-get install resource-agents", allow_module_level=True)


@functools.cache
def lab(*args: str) -> tuple[dict, str, int]:
    """One lab run (cached: every test reads it); (JSON, verbose log, the lab's pid).
    `args` replace `--family both` (the Ganesha case runs one family). --state shared:
    the failover figures need the old owner's client list on the new owner (docs/lab.md)."""
    proc = subprocess.Popen([NFSRESET, "lab", *(args or ("--family", "both")), "--mover", "ipaddr2,ocf",
                             "--state", "shared", "--cap", str(CAP), "--json", "--verbose"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()       # SIGKILL: its namespaces are swept by the next Topology.create()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out), err, proc.pid


def runs() -> dict[tuple[str, int], dict]:
    doc, _, _ = lab()
    got = {(r["mover"], r["family"]): r for r in doc["runs"]}
    assert set(got) == {("ipaddr2", 4), ("ipaddr2", 6), ("ocf", 4), ("ocf", 6)}
    for run in got.values():
        assert run["error"] is None, run["error"]
        assert run["remedy"] == "none"
    return got


def figures(run: dict) -> str:
    return "; ".join(
        f"{d} stall {run[d]['stall']} usable->reply {run[d]['usable_to_first_reply']} "
        f"stop {run[d]['stop_s']} start {run[d]['start_s']}" for d in ("failover", "failback"))


@pytest.mark.slow
def test_plain_ipaddr2_failback_stalls_past_the_cap():
    for fam in (4, 6):
        run = runs()[("ipaddr2", fam)]
        print(f"ipaddr2 v{fam}: {figures(run)}")
        fo = run["failover"]
        assert fo["del_to_usable"] is not None, fo      # the address did come up on node2
        if fam == 4:
            # The lab itself works: without a remedy the failover waits for the
            # client's retransmissions, ~0.2 (tail loss probe), 0.4, 0.8, 1.6,
            # 3.3, 6.5 s after the loss (design.md §1: 1.7 s and 3.4 s stalls). IPv4
            # is usable ~1.1 s after the delete (1 s gap + 0.07 s start): the
            # 1.6 s one, or after a stall the 3.3 s one, reaches node2 in the cap.
            # Not asserted for IPv6: the VIP is usable 2.4 s or more after the
            # delete (1 s gap + DAD with its random start delay; IPaddr2's start
            # then takes 3-4 s), before or after the 3.3 s retransmission; once
            # past it the next one (6.5 s) is beyond the cap. CI saw both.
            assert fo["recovered"] is True, fo
        fb = run["failback"]
        assert fb["recovered"] is False and fb["stall"] is None and fb["cap"] == CAP, fb
        if fo["recovered"]:
            # The client reached node2, so node2 (the failback's old owner) keeps that
            # session. When an IPv6 failover did not recover within the cap (above),
            # node2 never had one: the failback then stalls on node1's own stale
            # socket from the VIP's first stay there, and node2 holds nothing.
            assert fb["stale_sockets"], "the old owner must still hold the client's session"


@pytest.mark.slow
def test_agent_failback_first_reply_within_0_3_s_of_usable():
    for fam in (4, 6):
        run = runs()[("ocf", fam)]
        print(f"ocf v{fam}: {figures(run)}")
        for direction in ("failover", "failback"):
            m = run[direction]
            assert m["recovered"] is True, (fam, direction, m)
            # the agent's post-stop kill ended the old owner's session
            assert m["stale_sockets"] == [], (fam, direction, m["stale_sockets"])
        # The state dir is shared, so failover is tickled too; failback is the
        # move that otherwise stalls for minutes.
        assert run["failback"]["usable_to_first_reply"] <= 0.3, (fam, run["failback"])
        assert run["failover"]["usable_to_first_reply"] <= 0.3, (fam, run["failover"])


@pytest.mark.slow
def test_agent_start_and_stop_within_0_5_s_of_ipaddr2():
    for fam in (4, 6):
        plain, ours = runs()[("ipaddr2", fam)], runs()[("ocf", fam)]

        def starts(run):
            return [run["first_start_s"], run["failover"]["start_s"], run["failback"]["start_s"]]

        def stops(run):
            return [run["failover"]["stop_s"], run["failback"]["stop_s"]]

        print(f"v{fam} start IPaddr2 {starts(plain)} agent {starts(ours)}; "
              f"stop IPaddr2 {stops(plain)} agent {stops(ours)}")
        assert statistics.median(starts(ours)) - statistics.median(starts(plain)) <= 0.5
        assert statistics.median(stops(ours)) - statistics.median(stops(plain)) <= 0.5


@pytest.mark.slow
def test_agent_logged_no_nfsreset_failure():
    _, log, _ = lab()
    agent_lines = [line for line in log.splitlines() if "[node" in line and " ocf]" in line]
    # IPv4's leftover dies by ss -K in the agent's stop, IPv6's by nfsreset's post-stop (quarantine first)
    assert any("nfsreset (stop) 198.51.100.10" in line and "1 session(s) left on the VIP ended (ss -K)" in line
               for line in agent_lines), log
    assert any("nfsreset kill (post-stop) 2001:db8::10" in line and "destroyed 1 of 1" in line
               for line in agent_lines), log
    assert any("nfsreset tickle (post-start)" in line and "1 reconnected" in line for line in agent_lines), log
    # every nfsreset call the agent made succeeded (a failure is an ocf_log warn)
    assert not [line for line in agent_lines if "WARNING" in line or "ERROR" in line]


@pytest.mark.slow
def test_no_namespace_left_behind():
    _, _, pid = lab()
    assert not [n for n in list_netns() if n.startswith(f"nfsr-{pid}-")]


@pytest.mark.slow
@needs_ganesha
def test_on_ganesha_v3_ipaddr2_failback_stalls_and_the_agent_recovers_it():
    """The same two agents, NFS-Ganesha on the heads and the client speaking NFSv3
    (MOUNT, then GETATTR; a reply counts when it says NFS3_OK). IPv4 only: its
    socket is Ganesha's dual-stack one ([::ffff:198.51.100.10]), the form the sim
    server never shows; IPv6 is the same path as above, ~3 s more per IPaddr2 start."""
    doc, log, pid = lab("--family", "4", *ganesha_args("3"))
    got = {r["mover"]: r for r in doc["runs"]}
    assert set(got) == {"ipaddr2", "ocf"}
    for run in got.values():
        assert run["error"] is None and run["server"] == "ganesha" and run["vers"] == "3", run
        print(f"ganesha NFSv3 {run['mover']} v4: {figures(run)}")
    plain, ours = got["ipaddr2"], got["ocf"]
    assert plain["failover"]["recovered"] is True, plain["failover"]
    fb = plain["failback"]
    assert fb["recovered"] is False and fb["stall"] is None and fb["cap"] == CAP, fb
    # what swallows the failback: ganesha.nfsd's socket, still ESTABLISHED on the old owner
    assert any(line.endswith("ganesha.nfsd") for line in fb["stale_sockets"]), fb["stale_sockets"]
    for direction in ("failover", "failback"):
        m = ours[direction]
        assert m["recovered"] is True, (direction, m)
        assert m["stale_sockets"] == [], (direction, m["stale_sockets"])
        assert m["usable_to_first_reply"] <= 0.3, (direction, m)
    agent_lines = [line for line in log.splitlines() if "[node" in line and " ocf]" in line]
    # ganesha.nfsd's dual-stack socket ([::ffff:VIP]) matches ss's IPv4 filter: ended by ss -K
    assert any("1 session(s) left on the VIP ended (ss -K)" in line for line in agent_lines), log
    assert not [line for line in agent_lines if "WARNING" in line or "ERROR" in line]
    assert not [n for n in list_netns() if n.startswith(f"nfsr-{pid}-")]


def test_unknown_mover_exits_2_before_building_anything():
    res = subprocess.run([NFSRESET, "lab", "--mover", "ipaddr2,teleport"], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2
    assert res.stderr.strip() == "nfsreset lab: unknown mover 'teleport'; known: ip, ipaddr2, ocf, pacemaker, pacemaker-ocf"
    assert res.stdout == ""
