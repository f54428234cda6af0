"""`nfsreset lab --mover pacemaker --remedy watch`, one state dir per head (the
lab's default): `watch` runs on each head's host, where the cluster node's
attrd is reachable, as on a real head, with its default `--store auto`. The
daemon starts before the cluster (as after network-online.target on a real
head), so auto has to find attrd once it comes up.

What must hold (sim server, real Corosync + Pacemaker):
- planned failover, IPv6: node2's watch reads the list node1's watch published
  and tickles the client; the first reply comes within 0.3 s of the VIP being
  usable. Without the list (main's lab: the watch had no attrd) node2 has
  nothing to tickle and the client waits for its own retransmission, ~1.3 s
  after usable here;
- crash of node1 instead of the planned failover, IPv4: node1's watch had
  published its list before the crash, node2 tickles it (main's lab: nothing
  tickled, the client's back-off after a ~3 s gap);
- nothing is left: no namespace, no node or host process.

~50 s: two lab runs (two cluster cold starts, one rejoin, four moves).
"""
from __future__ import annotations

import functools
import json
import re
import subprocess

import pytest

from tests.ns.scene import NFSRESET, lab_leftovers

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("pacemaker_installed")]


BOUND_S = 0.3    # measured 0.01-0.05 s; without the list ~1.3 s (IPv6) or the client's back-off (crash)


def _lab(*args: str) -> tuple[dict, str, int]:
    proc = subprocess.Popen([NFSRESET, "lab", "--mover", "pacemaker", "--remedy", "watch", *args,
                             "--json", "--verbose"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out), err, proc.pid


@functools.cache
def planned() -> tuple[dict, str, int]:
    return _lab("--family", "6", "--cap", "5")


@functools.cache
def crashed() -> tuple[dict, str, int]:
    return _lab("--family", "4", "--crash", "--cap", "10")


def failover_log(log: str) -> str:
    """The verbose log from the failover's start to its result line."""
    start = log.index("[1/2]")
    return log[start:log.index("failover: recovered=", start)]


def tickled(text: str, node: str) -> list[int]:
    """How many tuples each of `node`'s watch tickles in `text` covered."""
    return [int(n) for n in re.findall(rf"\[{node}\] \S+ INFO nfsreset watch: tickled (\d+) client tuple", text)]


def test_planned_failover_per_head_tickles_what_the_peer_published_through_attrd():
    doc, log, _ = planned()
    (run,) = doc["runs"]
    assert run["error"] is None and run["state"] == "per-head", run
    fo_log = failover_log(log)
    fo, fb = run["failover"], run["failback"]
    print(f"\nwatch per head IPv6: usable->reply failover {fo['usable_to_first_reply']} "
          f"failback {fb['usable_to_first_reply']}")
    # node2's own state dir is empty at the failover: the tuple came through attrd
    assert tickled(fo_log, "node2") and tickled(fo_log, "node2")[0] >= 1, fo_log[-3000:]
    assert fo["usable_to_first_reply"] is not None and fo["usable_to_first_reply"] <= BOUND_S, fo
    assert fb["usable_to_first_reply"] is not None and fb["usable_to_first_reply"] <= BOUND_S, fb
    # the daemon started before the cluster: `auto` found attrd when it came up
    assert "attrd is reachable now" in log, log[-3000:]


def test_crash_the_survivor_tickles_what_the_dead_node_published():
    doc, log, _ = crashed()
    (run,) = doc["runs"]
    assert run["error"] is None and run["cluster"]["crash"] is True, run
    fo_log = failover_log(log)
    assert "node1 crashed" in fo_log, fo_log[-3000:]
    assert tickled(fo_log, "node2") and tickled(fo_log, "node2")[0] >= 1, fo_log[-3000:]
    fo, fb = run["failover"], run["failback"]
    print(f"\nwatch per head, crash, IPv4: usable->reply failover {fo['usable_to_first_reply']} "
          f"failback {fb['usable_to_first_reply']}")
    assert fo["stop_s"] is None, fo      # nothing stopped it: node1 was dead
    assert fo["usable_to_first_reply"] is not None and fo["usable_to_first_reply"] <= BOUND_S, fo
    assert fb["usable_to_first_reply"] is not None and fb["usable_to_first_reply"] <= BOUND_S, fb


def test_nothing_left_behind():
    for _, _, pid in (planned(), crashed()):
        assert not lab_leftovers(pid)
