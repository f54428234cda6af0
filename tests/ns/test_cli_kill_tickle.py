"""`nfsreset kill` and `nfsreset tickle` as fresh processes against real sockets.

The commands run as the resource agent runs them: `ip netns exec NODE
nfsreset ...`, a fresh process each time, against the scene of tests/ns/scene.py.
"""
from __future__ import annotations

import glob
import json
import os
import socket
import stat
import subprocess
import time

import pytest

from nfsreset.kernel import netns
from nfsreset.lab.topology import VIP4
from tests.ns.scene import NFS_PORT, NFSRESET, VIPS, Client, nft_tables, one_line

pytestmark = [pytest.mark.netns]


@pytest.mark.parametrize("fam", [4, 6])
def test_hooks_end_the_stale_session_and_the_real_client_recovers(scene, fam):
    vip = VIPS[fam][0]
    scene.topo.add_addr("node1", vip, nodad=True)
    c = scene.connect(vip, 41001)
    assert c.echo()
    scene.move(vip, "node1", "node2")
    assert scene.holds("node1", c), "the old owner must be left holding the session"

    res = scene.nfsreset("node1", "kill", "--vip", vip, "--state-dir", scene.state, "--json")
    assert res.returncode == 0, res.stderr
    assert f"destroyed 1 of 1 session(s) on {vip}" in res.stderr and c.endpoint in res.stderr, res.stderr
    # The kernel's per-socket acks are the check that none is left (no second
    # dump); this dump confirms what they said.
    verify = [s for s in json.loads(res.stdout)["steps"] if s["action"] == "verify"]
    assert verify == [{"action": "verify", "left": 0, "sessions": [], "by": "acks"}]
    assert scene.sockets("node1", vip) == []
    path = scene.state_file(vip)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
        assert json.load(f)["clients"] == [[NFS_PORT, c.ip, c.cport]]

    started = time.monotonic()
    tickle = scene.popen("node2", "tickle", "--vip", vip, "--state-dir", scene.state, "--json",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        death = c.wait_dead(3.0)
        died_after = time.monotonic() - started
        # the NFS client reconnects at once from the same port, now to node2
        c.connect()
        assert c.echo()
        out, err = tickle.communicate(timeout=15)
    finally:
        if tickle.poll() is None:
            tickle.kill()
            tickle.wait()
    print(f"v{fam}: client socket {death} {died_after:.3f} s after tickle exec")
    assert death in ("ECONNRESET", "EOF"), death
    assert died_after < 1.2       # includes the exec of a fresh python process
    assert tickle.returncode == 0, err
    doc = json.loads(out)
    assert doc["exit"] == 0 and doc["moment"] == "post-start" and doc["vip"] == vip
    steps = {s["action"]: s for s in doc["steps"]}
    assert "announce" in steps
    assert steps["tickle"]["reconnected"] == [c.endpoint], steps["tickle"]
    assert scene.holds("node2", c)


# -- 2. safety ------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", [4, 6])
def test_sessions_on_a_vip_configured_here_are_never_touched_unless_named_exactly(scene, fam):
    vip, second = VIPS[fam]
    for v in (vip, second):
        scene.topo.add_addr("node1", v, nodad=True)
    moving = scene.connect(vip, 42001)
    keep = scene.connect(second, 42002)
    other = scene.connect(second, 42003)
    scene.move(vip, "node1", "node2")

    def both_alive() -> None:
        assert keep.echo() and other.echo()
        assert scene.holds("node1", keep) and scene.holds("node1", other)

    res = scene.nfsreset("node1", "kill", "--vip", vip, "--state-dir", scene.state)
    assert res.returncode == 0, res.stderr
    assert not scene.holds("node1", moving)
    both_alive()
    res = scene.nfsreset("node2", "tickle", "--vip", vip, "--state-dir", scene.state, "--rounds", "1")
    assert res.returncode == 0, res.stderr
    both_alive()
    res = scene.nfsreset("node1", "flows")
    assert res.returncode == 0, res.stdout + res.stderr
    both_alive()

    res = scene.nfsreset("node1", "kill", "--vip", second, "--state-dir", scene.state)
    assert res.returncode == 3
    assert "configured on this host" in one_line(res.stderr)
    both_alive()

    res = scene.nfsreset("node1", "kill", "--vip", second, "--force", "--state-dir", scene.state)
    assert res.returncode == 3
    assert "--client ADDR:PORT" in one_line(res.stderr)
    res = scene.nfsreset("node1", "kill", "--vip", second, "--force", "--client", keep.ip,
                         "--state-dir", scene.state)
    assert res.returncode == 3, "an address without a port does not name one session"
    one_line(res.stderr)
    both_alive()

    res = scene.nfsreset("node1", "kill", "--vip", second, "--force", "--client", keep.endpoint,
                         "--state-dir", scene.state)
    assert res.returncode == 0, res.stderr
    assert keep.wait_dead(1.0) in ("ECONNRESET", "EOF")
    assert not scene.holds("node1", keep)
    assert other.echo() and scene.holds("node1", other)


# -- 3. dry run ------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", [4, 6])
def test_dry_run_says_what_it_would_do_and_changes_nothing(scene, fam):
    vip = VIPS[fam][0]
    scene.topo.add_addr("node1", vip, nodad=True)
    c = scene.connect(vip, 43001)
    scene.topo.del_addr("node1", vip)
    # From outside, with --netns: a dry run that looked in the wrong namespace
    # would find no session at all.
    res = subprocess.run([NFSRESET, "kill", "--vip", vip, "--state-dir", scene.state, "--dry-run", "--json",
                          "--netns", scene.topo.ns("node1")], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "would destroy 1 session(s)" in res.stderr and c.endpoint in res.stderr, res.stderr
    assert "dry run" in res.stderr
    doc = json.loads(res.stdout)
    assert doc["dry_run"] is True
    assert {s["action"] for s in doc["steps"]} >= {"record", "destroy"}
    assert scene.holds("node1", c)
    assert not os.path.exists(scene.state) or os.listdir(scene.state) == []
    assert nft_tables(scene.topo, "node1") == ""


# -- 4. bad input ------------------------------------------------------------------------------
BAD_INPUT = [
    pytest.param(["kill", "--vip", "nonsense"], "is not an IP address", id="kill-vip-nonsense"),
    pytest.param(["kill", "--vip", "{vip}", "--port", "0"], "not a TCP port", id="kill-port-0"),
    pytest.param(["kill", "--vip", "{vip}", "--strategy", "foo"], "--strategy", id="kill-strategy-foo"),
    pytest.param(["kill", "--vip", "{vip}", "--moment", "later"], "--moment", id="kill-moment-later"),
    pytest.param(["kill", "--vip", "{vip}", "--client", "{vip}:99999"], "--client", id="kill-client-port"),
    pytest.param(["tickle", "--vip", "{vip}"], "--state-dir", id="tickle-no-clients"),
    pytest.param(["tickle", "--vip", "{vip}", "--client", "198.51.100.100"], "needs a port",
                 id="tickle-client-no-port"),
    pytest.param(["tickle", "--vip", "{vip}", "--rounds", "11", "--client", "{client}:700"], "--rounds",
                 id="tickle-rounds"),
    pytest.param(["flows", "--vip", "nonsense"], "is not an IP address", id="flows-vip-nonsense"),
    pytest.param(["kill", "--vip", "{vip}", "--no-such-option"], "", id="kill-unknown-option"),
]


@pytest.mark.parametrize("argv, why", BAD_INPUT)
def test_bad_input_exits_2_with_one_line_and_does_nothing(scene, argv, why):
    vip = VIP4
    scene.topo.add_addr("node1", vip, nodad=True)
    c = scene.connect(vip, 44001)
    scene.topo.del_addr("node1", vip)
    argv = [a.format(vip=vip, client=c.ip) for a in argv]
    if argv[0] == "kill":   # never the default /var/lib/nfsreset
        argv += ["--state-dir", scene.state]
    res = scene.nfsreset("node1", *argv)
    assert res.returncode == 2, (res.returncode, res.stderr)
    line = one_line(res.stderr)
    assert line.startswith(f"nfsreset {argv[0]}: ") and why in line, line
    assert res.stdout == ""
    assert scene.holds("node1", c)
    assert not os.path.exists(scene.state) or os.listdir(scene.state) == []
    assert nft_tables(scene.topo, "node1") == ""


def test_missing_netns_is_an_error_and_is_not_created(tmp_path):
    missing = f"nfsr-{os.getpid()}-does-not-exist"
    path = os.path.join(netns.NETNS_RUN_DIR, missing)
    try:
        for argv in (["kill", "--vip", VIP4, "--state-dir", str(tmp_path / "s")],
                     ["tickle", "--vip", VIP4, "--client", "198.51.100.100:700", "--state-dir", str(tmp_path / "s")],
                     ["flows"], ["doctor"]):
            res = subprocess.run([NFSRESET, *argv, "--netns", missing], capture_output=True, text=True, timeout=30)
            assert res.returncode == 2, (argv, res.stderr)
            assert "does not exist" in one_line(res.stderr)
            assert res.stdout == ""
            assert not os.path.exists(path), f"{argv[0]} created the namespace it was told to use"
    finally:
        if os.path.exists(path):   # ours: named after this pid
            subprocess.run(["ip", "netns", "del", missing], check=False)


def test_group_writable_state_dir_is_refused_with_3(scene):
    vip = VIP4
    scene.topo.add_addr("node1", vip, nodad=True)
    c = scene.connect(vip, 44101)
    scene.topo.del_addr("node1", vip)
    os.mkdir(scene.state, 0o700)
    os.chmod(scene.state, 0o770)
    for argv in (["kill", "--vip", vip], ["tickle", "--vip", vip]):
        res = scene.nfsreset("node1", *argv, "--state-dir", scene.state)
        assert res.returncode == 3, (argv, res.stderr)
        assert "writable" in one_line(res.stderr)
    assert scene.holds("node1", c)
    assert os.listdir(scene.state) == []
    assert nft_tables(scene.topo, "node1") == ""


# -- 5. forced rungs --------------------------------------------------------------------------
def _stale_on_node1_then_pre_start(scene, vip: str, cport: int) -> Client:
    """A session whose VIP left node1 and is about to come back to node1 (failback):
    node1 holds the stale socket; `kill --moment pre-start --strategy rst` cannot
    reset it without the VIP here, so it records it as pending for post-start."""
    scene.topo.add_addr("node1", vip, nodad=True)
    c = scene.connect(vip, cport)
    assert c.echo()
    scene.topo.del_addr("node1", vip)
    res = scene.nfsreset("node1", "kill", "--vip", vip, "--moment", "pre-start", "--strategy", "rst",
                         "--state-dir", scene.state, "--json")
    assert res.returncode == 0, res.stderr
    assert "deferred 1 session(s)" in res.stderr, res.stderr
    assert [s["action"] for s in json.loads(res.stdout)["steps"]].count("defer") == 1
    assert len(glob.glob(os.path.join(glob.escape(scene.state), f"{glob.escape(vip)}.pending.*.json"))) == 1
    assert scene.holds("node1", c)
    scene.topo.add_addr("node1", vip, nodad=True)
    return c


@pytest.mark.parametrize("fam", [4, 6])
def test_strategy_rst_defers_at_pre_start_and_resets_exactly_at_post_start(scene, fam):
    vip = VIPS[fam][0]
    c = _stale_on_node1_then_pre_start(scene, vip, 45001)
    res = scene.nfsreset("node1", "tickle", "--vip", vip, "--strategy", "rst", "--state-dir", scene.state,
                         "--json")
    assert res.returncode == 0, res.stderr
    rst = [s for s in json.loads(res.stdout)["steps"] if s["action"] == "rst"]
    assert rst and rst[0]["reset"] == 1, res.stdout
    assert not scene.holds("node1", c)
    assert glob.glob(os.path.join(glob.escape(scene.state), "*.pending.*")) == []
    # The client never heard of it; its next request meets no socket, is reset,
    # and it reconnects from the same port.
    c.send()
    assert c.wait_dead(1.0) == "ECONNRESET"
    c.connect()
    assert c.echo()


def _guard_elements(topo, node: str) -> list:
    doc = json.loads(topo.run(node, "nft", "-j", "list", "ruleset").stdout)
    assert any(i["table"]["family"] == "inet" and i["table"]["name"] == "nfsreset"
               for i in doc["nftables"] if "table" in i), doc
    return [e for i in doc["nftables"] if "set" in i for e in i["set"].get("elem", [])]


@pytest.mark.parametrize("fam", [4, 6])
def test_strategy_nft_guards_the_stale_tuple_and_the_clients_next_segment_is_reset(scene, fam):
    vip = VIPS[fam][0]
    c = _stale_on_node1_then_pre_start(scene, vip, 45101)
    res = scene.nfsreset("node1", "tickle", "--vip", vip, "--strategy", "nft", "--state-dir", scene.state,
                         "--json")
    assert res.returncode == 0, res.stderr
    guard = [s for s in json.loads(res.stdout)["steps"] if s["action"] == "guard"]
    assert guard and guard[0]["added"] == 1, res.stdout
    elems = json.dumps(_guard_elements(scene.topo, "node1"))
    assert vip in elems and c.ip in elems and str(c.cport) in elems, elems
    assert scene.holds("node1", c), "the guard leaves the socket; the client's segments are what it resets"
    c.send()
    assert c.wait_dead(1.0) == "ECONNRESET"
    # Its SYN on the same tuple lifts the guard; the stale socket answers it with
    # a challenge ACK, the client's RST (exact: it echoes that ACK's number) ends
    # the stale socket, and the SYN goes again. Linux re-arms the SYN timer at
    # TCP_TIMEOUT_MIN after such an ACK on a first attempt (tcp_rcv_synsent_state_process:
    # "Previous FIN/ACK or RST/ACK might be ignored"), so this takes ~10 ms, not 1 s.
    started = time.monotonic()
    c.connect(timeout=5.0)
    assert c.echo()
    took = time.monotonic() - started
    print(f"v{fam}: reconnect through the guarded tuple took {took:.3f} s")
    assert took < 2.0
    assert scene.sockets("node1", vip) == [("ESTAB", c.ip, c.cport)]
