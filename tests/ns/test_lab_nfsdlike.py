"""The lab's sim server as kernel nfsd >= 4.5 behaves (`--server sim-nfsd`),
and the agent against it.

Kernel nfsd aborts its own sockets the moment their local address is deleted,
so after IPaddr2's stop the old owner holds no session: a client list taken
after the delete is empty. The agent therefore records the VIP's clients in
its stop, before IPaddr2 deletes the address (on main since the attrd store;
these tests guard that against regressions: with a post-stop-only record the
new owner logs "no known client of VIP to tickle" and the client waits for
its own retransmission).

- server: `--close-on-delete` aborts exactly the sockets of the deleted
  address (within 1 s), keeps the others; without it the socket stays
  ESTABLISHED (the sim server as before, like NFS-Ganesha). Fails on main:
  the option did not exist.
- agent (`--mover ocf` with a shared state dir; `--mover pacemaker-ocf` per
  head, the list through attrd): on both moves the old owner's stop recorded
  the client before the address went, the new owner's tickle had a list, the
  first reply came within 0.3 s of the VIP being usable (0.05 s is the goal;
  measured figures in docs/lab.md), nothing stale is left.

~15 s for the server tests, ~25 s per agent lab run (IPv4; Pacemaker ~40 s).
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from nfsreset.lab.mover import stop_process
from nfsreset.lab.mover_ocf import IPADDR2
from nfsreset.lab.run import start_servers
from nfsreset.lab.topology import VIP4, VIP4_B, VIP6, VIP6_B, list_netns
from tests.ns.scene import NFSRESET, Client, vip_sockets, wait_for

pytestmark = pytest.mark.netns

CAP = 5
# One RPC record (marker: last fragment, 5 bytes): the lab server echoes whole records.
RECORD = (0x80000005).to_bytes(4, "big") + b"ping\n"


def _events(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


@pytest.mark.parametrize("close_on_delete", [True, False], ids=["sim-nfsd", "sim"])
@pytest.mark.parametrize("vip, other", [(VIP4, VIP4_B), (VIP6, VIP6_B)], ids=["v4", "v6"])
def test_server_aborts_the_sockets_of_a_deleted_address_and_only_those(topo, tmp_path, vip, other,
                                                                        close_on_delete):
    for addr in (vip, other):
        topo.add_addr("node1", addr, nodad=True)
    (server,) = start_servers(topo, str(tmp_path), nodes=("node1",), duration=60.0,
                              close_on_delete=close_on_delete)
    clients = []
    try:
        gone, kept = Client(topo.ns("client"), vip, 1001), Client(topo.ns("client"), other, 1002)
        clients += [gone, kept]
        assert gone.echo(RECORD) and kept.echo(RECORD)
        topo.del_addr("node1", vip)
        if close_on_delete:
            # nfsd closes from an nfsd thread soon after the notifier: here at once
            assert wait_for(lambda: not vip_sockets(topo, "node1", vip), timeout=1.0), \
                vip_sockets(topo, "node1", vip)
            log = _events(tmp_path / "server-node1.log")
            assert [e for e in log if e["ev"] == "address-deleted" and e["addr"] == vip and e["closed"] == 1], log
            assert [e for e in log if e["ev"] == "close" and e["why"] == "address-deleted"
                    and e["peer"][1] == 1001], log
        else:
            # the sim server as before: the session stays, as with NFS-Ganesha
            assert not wait_for(lambda: not vip_sockets(topo, "node1", vip), timeout=1.0)
            assert [s for s in vip_sockets(topo, "node1", vip) if s[0] == "ESTAB" and s[2] == 1001]
        # the other address's session is untouched either way
        assert kept.echo(RECORD), "the session on the address that stayed must keep working"
        assert [s for s in vip_sockets(topo, "node1", other) if s[0] == "ESTAB" and s[2] == 1002]
    finally:
        for c in clients:
            c.close()
        stop_process(server)


LAB_PIDS: list[int] = []


def _lab(*args: str, timeout: float = 300) -> tuple[dict, list[str]]:
    proc = subprocess.Popen([NFSRESET, "lab", "--server", "sim-nfsd", "--family", "4", "--cap", str(CAP),
                             "--json", "--verbose", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    LAB_PIDS.append(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()       # SIGKILL: its namespaces are swept by the next Topology.create()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out), err.splitlines()


def _check_agent_run(run: dict, lines: list[str], tag: str) -> None:
    assert run["error"] is None, run["error"]
    for direction, old, new in (("failover", "node1", "node2"), ("failback", "node2", "node1")):
        m = run[direction]
        print(f"{tag} {direction}: usable->reply {m['usable_to_first_reply']} stall {m['stall']} "
              f"stop {m['stop_s']} start {m['start_s']}")
        assert m["recovered"] is True, (direction, m)
        assert m["stale_sockets"] == [], (direction, m["stale_sockets"])
        assert m["usable_to_first_reply"] is not None and m["usable_to_first_reply"] <= 0.3, (direction, m)
    # The old owner's stop took the record while the address was still there
    # (afterwards the nfsd-like server had aborted the session: nothing to find).
    for old in ("node1", "node2"):
        stops = [x for x in lines if f"[{old} {tag}]" in x and "recorded before the address went" in x]
        assert stops and "1 client tuple(s)" in stops[0], (old, [x for x in lines if f"[{old} {tag}]" in x])
    # Each new owner's tickle had a list ("tickled 1 client tuple(s)"; without
    # one: "no known client of VIP to tickle", which node1's cold start says).
    for new in ("node2", "node1"):
        tickles = [x for x in lines if f"[{new} {tag}]" in x and "tickle (post-start)" in x]
        assert [x for x in tickles if "tickled 1 client tuple(s)" in x], (new, tickles)
        if new == "node2":   # its only start is the failover
            assert not [x for x in tickles if "no known client" in x], tickles


@pytest.mark.slow
@pytest.mark.skipif(not os.access(IPADDR2, os.X_OK), reason="needs resource-agents (IPaddr2)")
def test_agent_tickles_both_moves_when_the_server_closes_on_delete():
    """--mover ocf, one state dir both heads see (the agents called directly have no attrd)."""
    doc, lines = _lab("--mover", "ipaddr2,ocf", "--state", "shared")
    runs = {r["mover"]: r for r in doc["runs"]}
    base = runs["ipaddr2"]
    print("baseline ipaddr2: " + "; ".join(f"{d} usable->reply {base[d]['usable_to_first_reply']}"
                                           for d in ("failover", "failback")))
    # the nfsd-like server leaves no stale session even with plain IPaddr2
    assert base["failover"]["stale_sockets"] == [] and base["failback"]["stale_sockets"] == []
    _check_agent_run(runs["ocf"], lines, "ocf")


@pytest.mark.slow
def test_agent_under_pacemaker_tickles_both_moves_per_head_when_the_server_closes_on_delete(pacemaker_installed):
    """--mover pacemaker-ocf, one state dir per head: the list reaches the peer through attrd."""
    doc, lines = _lab("--mover", "pacemaker-ocf", "--state", "per-head")
    (run,) = doc["runs"]
    assert any("[node1 pacemaker-ocf]" in x and "attrd(for node2)" in x for x in lines), lines[-40:]
    _check_agent_run(run, lines, "pacemaker-ocf")


def test_no_namespace_left_behind():
    assert not [n for n in list_netns() for pid in LAB_PIDS if n.startswith(f"nfsr-{pid}-")], list_netns()
