"""`nfsreset lab` with nfsreset's own remedies: the failover lab (real VIP moves
between namespaces, an nfsd-like server, a client that behaves like the Linux
NFS client) must show both moves recovering, in both families, once the hooks
or the daemon run.

The baseline (tests/ns/test_lab.py) shows failback stalling past the cap;
here the measure is `usable_to_first_reply`: from the VIP being usable on
the new owner to the client's first reply, the part of the stall a remedy
can remove (the rest, `del_to_usable`, is the move itself: gap + DAD).

Each lab run takes ~20 s (two families, two moves); seven of them run here:
four on the sim server, three on real NFS-Ganesha with the lab's NFS client
(watch with NFSv4.0, the forced rst and nft rungs with NFSv3).
"""
from __future__ import annotations

import functools
import json
import subprocess

import pytest

from tests.ns.scene import NFSRESET, ganesha_args, needs_ganesha

pytestmark = [pytest.mark.netns, pytest.mark.slow]

CAP = 8


@functools.cache
def lab(*args: str) -> tuple[dict, str]:
    """One `nfsreset lab --family both` run (cached: several tests read one run).
    --state shared: the failover figures need the old owner's client list on the
    new owner; with one state dir per head (the lab's default) the failover waits
    for the client's own retransmission (docs/lab.md)."""
    res = subprocess.run([NFSRESET, "lab", "--family", "both", "--cap", str(CAP), "--state", "shared", "--json",
                          "--verbose", *args],
                         capture_output=True, text=True, timeout=4 * (CAP + 15) + 60)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout), res.stderr


def moves(doc: dict):
    """(family, direction, result) for every move, after checking the run itself went well."""
    assert {r["family"] for r in doc["runs"]} == {4, 6}
    for run in doc["runs"]:
        assert run["error"] is None, run["error"]
        assert all(h["error"] is None for h in run["hook_timings"]), run["hook_timings"]
        for direction in ("failover", "failback"):
            yield run["family"], direction, run[direction]


def numbers(doc: dict) -> str:
    return "; ".join(f"v{fam} {d}: stall {m['stall']} usable->reply {m['usable_to_first_reply']} "
                     f"del->usable {m['del_to_usable']}" for fam, d, m in moves(doc))


def test_hooks_make_both_moves_recover_within_0_3_s_of_usable():
    doc, log = lab("--remedy", "hooks")
    print(f"hooks: {numbers(doc)}")
    for fam, direction, m in moves(doc):
        assert m["recovered"] is True, (fam, direction, m)
        assert m["usable_to_first_reply"] <= 0.3, (fam, direction, m)
        # kill post-stop ended the old owner's session: nothing stale is left there
        assert m["stale_sockets"] == [], (fam, direction, m["stale_sockets"])
    # every hook (kill post-stop, kill pre-start, tickle) exited 0
    assert " exited " not in log, log


@pytest.mark.parametrize("strategy,server", [
    ("rst", "sim"), ("nft", "sim"),
    # Ganesha's sockets are dual stack: the exact-sequence RST and the guard must find
    # the IPv4 session as [::ffff:VIP] (the sim server's is plain AF_INET)
    pytest.param("rst", "ganesha", marks=needs_ganesha), pytest.param("nft", "ganesha", marks=needs_ganesha),
])
def test_forced_strategy_hooks_recover_the_failback(strategy, server):
    extra = ganesha_args("3") if server == "ganesha" else []
    doc, log = lab("--remedy", "hooks", "--strategy", strategy, *extra)
    print(f"hooks --strategy {strategy} on {server}: {numbers(doc)}")
    for fam, direction, m in moves(doc):
        assert m["recovered"] is True, (fam, direction, m)
        if direction == "failback":
            # The stale socket on node1 is ended late (rst needs the VIP back,
            # nft acts on the client's first segment): allow up to 2 s past usable.
            assert m["stall"] <= m["del_to_usable"] + 2.0, (fam, m)
            assert m["usable_to_first_reply"] <= 2.0, (fam, m)
    assert "Traceback" not in log, log


@pytest.mark.bpf   # the daemon loads its BPF flow tracker on both heads
@pytest.mark.parametrize("server,vers", [
    ("sim", None),
    # real NFS-Ganesha and NFSv4.0 (COMPOUND PUTROOTFH+GETATTR; a reply counts when NFS4_OK)
    pytest.param("ganesha", "4.0", marks=needs_ganesha, id="ganesha-v4.0"),
])
def test_watch_makes_both_moves_recover_within_0_2_s_of_usable(server, vers):
    doc, log = lab("--remedy", "watch", *(ganesha_args(vers) if vers else []))
    assert {r["server"] for r in doc["runs"]} == {server}
    print(f"watch on {server}: {numbers(doc)}")
    for fam, direction, m in moves(doc):
        assert m["recovered"] is True, (fam, direction, m)
        assert m["usable_to_first_reply"] <= 0.2, (fam, direction, m)
        assert m["stale_sockets"] == [], (fam, direction, m["stale_sockets"])
    assert "Traceback" not in log and " exited " not in log, log
