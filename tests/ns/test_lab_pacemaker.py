"""`nfsreset lab --mover pacemaker,pacemaker-ocf`: the VIP moved by a real
Corosync + Pacemaker cluster.

One lab run (IPv4, real NFS-Ganesha heads, the client speaking NFSv3) builds
a two-node cluster in the head namespaces (each node also in its own mount,
PID and UTS namespaces, seeded CIB) twice: once with the VIP as
ocf:heartbeat:IPaddr2 (the baseline), once as our ocf:nfsreset:IPaddr2nfs
(cli/ocf/nfsreset bound into the nodes, the venv's nfsreset, one state dir
per node: the lab's default, as deployed). Each moves the VIP node1 -> node2 -> node1 with
`crm_resource --move` / `--clear`, as an operator does. A second run (sim
server) crashes node1 instead of the planned failover.

What must hold:
- plain IPaddr2: the failover recovers within the cap, the failback stalls
  past it on ganesha.nfsd's stale socket;
- IPaddr2nfs: failback's first reply comes within 0.3 s of the VIP being
  usable, and nothing stale is left on either move;
- the actions were Pacemaker's (their results are in pacemaker-execd's log)
  and the agent's nfsreset calls ran and succeeded;
- crash: Pacemaker fails the VIP over to node2, node1 rejoins, and with
  IPaddr2nfs the failback's first reply is within 0.3 s of usable again;
- nothing is left: no node process, no namespace, no mount.

~55 s: three cluster cold starts (~8 s each), one rejoin (~3 s), six moves.
"""
from __future__ import annotations

import functools
import json
import subprocess

import pytest

from nfsreset.lab import ganesha
from nfsreset.lab.topology import list_netns
from tests.ns.scene import NFSRESET, lab_leftovers

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("pacemaker_installed")]

CAP = 5
CRASH_CAP = 10    # a crash failover waits for the client's retransmission after ~2.5-4.5 s
if ganesha.available():
    pytest.skip(ganesha.available(), allow_module_level=True)


def _lab(*args: str) -> tuple[dict, str, int]:
    """(JSON, verbose log, the lab's pid) of one `nfsreset lab ... --json --verbose`."""
    proc = subprocess.Popen([NFSRESET, "lab", "--family", "4", *args, "--json", "--verbose"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()       # SIGKILL: its namespaces are swept by the next Topology.create()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out), err, proc.pid


@functools.cache
def lab() -> tuple[dict, str, int]:
    """Planned moves on Ganesha, both agents (cached: every test reads it)."""
    return _lab("--server", "ganesha", "--vers", "3", "--mover", "pacemaker,pacemaker-ocf", "--cap", str(CAP))


@functools.cache
def crash_lab() -> tuple[dict, str, int]:
    """node1 crashed instead of the planned failover, our agent, the sim server.
    --state shared: a crashed node1 never ran its stop, so only a shared dir gives
    it the client list at failback (per head: ~0.4-0.6 s instead of ~0.1-0.2 s, docs/lab.md)."""
    return _lab("--mover", "pacemaker-ocf", "--crash", "--state", "shared", "--cap", str(CRASH_CAP))


def runs() -> dict[str, dict]:
    doc, _, _ = lab()
    got = {r["mover"]: r for r in doc["runs"]}
    assert set(got) == {"pacemaker", "pacemaker-ocf"}
    for run in got.values():
        assert run["error"] is None, run["error"]
        assert run["family"] == 4 and run["remedy"] == "none" and run["server"] == "ganesha"
        assert run["cluster"]["crash"] is False
        assert 0 < run["cluster"]["cold_start_s"] < 45, run["cluster"]
    return got


def figures(run: dict) -> str:
    return "; ".join(
        f"{d} stall {run[d]['stall']} usable->reply {run[d]['usable_to_first_reply']} "
        f"stop {run[d]['stop_s']} start {run[d]['start_s']}" for d in ("failover", "failback"))


@pytest.mark.slow
def test_pacemaker_ipaddr2_failback_stalls_past_the_cap():
    run = runs()["pacemaker"]
    print(f"pacemaker IPaddr2: cold start {run['cluster']['cold_start_s']} s; {figures(run)}")
    fo, fb = run["failover"], run["failback"]
    assert fo["recovered"] is True, fo
    assert fb["recovered"] is False and fb["stall"] is None and fb["cap"] == CAP, fb
    assert fb["stale_sockets"], "the old owner must still hold the client's session"


@pytest.mark.slow
def test_pacemaker_ipaddr2nfs_failback_first_reply_within_0_3_s_of_usable():
    run = runs()["pacemaker-ocf"]
    print(f"pacemaker IPaddr2nfs: cold start {run['cluster']['cold_start_s']} s; {figures(run)}")
    for direction in ("failover", "failback"):
        m = run[direction]
        assert m["recovered"] is True, (direction, m)
        assert m["stale_sockets"] == [], (direction, m["stale_sockets"])
    assert run["failback"]["usable_to_first_reply"] <= 0.3, run["failback"]


@pytest.mark.slow
def test_moves_were_pacemakers_and_the_agent_ran_nfsreset():
    _, log, _ = lab()
    for mover, run in runs().items():
        for direction in ("failover", "failback"):
            # execution times come from pacemaker-execd's log: Pacemaker ran them
            assert run[direction]["stop_s"] is not None and run[direction]["start_s"] is not None, run
    assert log.count("by Pacemaker's stop") == 4, log
    agent = [line for line in log.splitlines() if "pacemaker-ocf]" in line and "IPaddr2nfs(VIP)" in line]
    # IPv4: the stop ended ganesha.nfsd's leftover with ss -K (no Python post-stop)
    assert any("nfsreset (stop)" in line and "session(s) left on the VIP ended (ss -K)" in line for line in agent), log
    assert any("nfsreset tickle (post-start)" in line and "reconnected" in line for line in agent), log
    # every nfsreset call the agent made succeeded (a failure is an ocf_log warn)
    assert not [line for line in agent if "WARNING" in line or "ERROR" in line], agent


@pytest.mark.slow
def test_crash_fails_over_rejoins_and_fails_back_at_once():
    doc, log, _ = crash_lab()
    (run,) = doc["runs"]
    assert run["error"] is None, run["error"]
    print(f"crash IPaddr2nfs: rejoin {run['cluster']['rejoin_s']} s; {figures(run)}")
    assert run["cluster"]["crash"] is True and run["cluster"]["rejoin_s"] is not None, run["cluster"]
    assert "node1 crashed" in log and "node1 rejoined" in log, log
    fo, fb = run["failover"], run["failback"]
    # nothing stopped the VIP on node1: Pacemaker started it on node2 on its own
    assert fo["stop_s"] is None and fo["start_s"] is not None, fo
    assert fo["recovered"] is True, fo
    assert fb["recovered"] is True and fb["stale_sockets"] == [], fb
    assert fb["usable_to_first_reply"] <= 0.3, fb


@pytest.mark.slow
def test_nothing_left_behind():
    for _, _, pid in (lab(), crash_lab()):
        assert not lab_leftovers(pid)


def test_crash_needs_a_pacemaker_mover_exit_2_before_building_anything():
    before = set(list_netns())
    res = subprocess.run([NFSRESET, "lab", "--mover", "ipaddr2", "--crash"], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2
    assert res.stderr.strip() == "nfsreset lab: --crash needs a Pacemaker mover (pacemaker, pacemaker-ocf), not 'ipaddr2'"
    assert res.stdout == ""
    assert not set(list_netns()) - before
