"""`nfsreset flows` and `nfsreset doctor`, run as fresh processes, from inside a
node (`ip netns exec`) and from outside with `--netns`.

doctor runs only with --netns of a namespace this test made: its checks create
sockets and an nft table, which must never happen in the host's namespace.
"""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from nfsreset.lab.topology import VIP4, VIP6
from nfsreset.core.model import format_endpoint
from tests.ns.scene import NFSRESET, Scene, nft_tables, wait_until

pytestmark = [pytest.mark.netns]

VIP_OF = {4: VIP4, 6: VIP6}



def outside(*argv: str) -> subprocess.CompletedProcess:
    """nfsreset run in the host's namespace, acting in the one --netns names."""
    return subprocess.run([NFSRESET, *argv], capture_output=True, text=True, timeout=60)


def column(stdout: str, row: str, name: str) -> str:
    """The cell of column `name` in a row of the `flows` table (cells hold no blanks)."""
    header = stdout.splitlines()[0].split()
    return row.split()[header.index(name)]


@pytest.mark.parametrize("fam", [4, 6])
def test_flows_exit_1_and_stale_line_only_while_the_vip_is_away(scene, fam):
    vip = VIP_OF[fam]
    node1 = scene.topo.ns("node1")
    scene.topo.add_addr("node1", vip, nodad=True)
    c = scene.connect(vip, 46001)
    assert c.echo()
    session = re.compile(rf"^{re.escape(format_endpoint(vip, 2049))}\s+{re.escape(c.endpoint)}\s+ESTABLISHED\b")

    # The VIP is here: the session is live.
    res = outside("flows", "--netns", node1)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [ln for ln in res.stdout.splitlines() if session.match(ln)]
    assert len(rows) == 1 and column(res.stdout, rows[0], "STALE") == "-", res.stdout
    assert f"# {vip}: 1 session(s), 0 stale; configured here" in res.stdout
    doc = json.loads(scene.nfsreset("node1", "flows", "--vip", vip, "--json").stdout)
    assert doc["vips"] == {vip: {"sessions": 1, "stale": 0, "configured": True}}
    assert [(s["client"], s["cport"], s["stale"]) for s in doc["sessions"]] == [(c.ip, c.cport, False)]

    # The VIP left node1 and the server kept the socket: stale.
    scene.topo.del_addr("node1", vip)
    res = outside("flows", "--netns", node1)
    assert res.returncode == 1, res.stdout + res.stderr
    rows = [ln for ln in res.stdout.splitlines() if session.match(ln)]
    assert len(rows) == 1 and column(res.stdout, rows[0], "STALE") == "STALE", res.stdout
    assert f"# {vip}: 1 session(s), 1 stale; NOT configured here" in res.stdout
    res = scene.nfsreset("node1", "flows", "--vip", vip, "--json")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert doc["vips"] == {vip: {"sessions": 1, "stale": 1, "configured": False}}
    assert doc["sessions"][0]["state"] == "ESTABLISHED" and doc["sessions"][0]["stale"] is True

    # flows only looks: the session is still there, nothing in nft.
    assert scene.holds("node1", c)
    assert nft_tables(scene.topo, "node1") == ""

    # node2 (the VIP never was there) and a filter on another VIP: nothing stale.
    assert scene.nfsreset("node2", "flows").returncode == 0
    res = scene.nfsreset("node1", "flows", "--vip", "203.0.113.9", "--json")
    assert res.returncode == 0
    doc = json.loads(res.stdout)
    assert doc["sessions"] == []
    assert doc["vips"] == {"203.0.113.9": {"sessions": 0, "stale": 0, "configured": False}}


def test_flows_table_fits_80_columns_with_ipv6_and_wide_adds_the_queues(scene):
    # 2001:db8::10 (VIP) and 2001:db8::100 (client), five-digit client ports: the
    # default table was 101 columns wide.
    vip = VIP6
    node1 = scene.topo.ns("node1")
    scene.topo.add_addr("node1", vip, nodad=True)
    clients = [scene.connect(vip, p) for p in (46002, 65001)]
    assert all(c.echo() for c in clients)
    scene.topo.del_addr("node1", vip)     # one row each, STALE: the widest cells
    res = outside("flows", "--netns", node1)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["VIP", "CLIENT", "STATE", "AGE", "STALE"], res.stdout
    rows = [ln for ln in lines if ln.startswith(f"[{vip}]:2049 ")]
    assert sorted(column(res.stdout, r, "CLIENT") for r in rows) == sorted(c.endpoint for c in clients)
    assert all(column(res.stdout, r, "STALE") == "STALE" for r in rows)
    assert max(len(ln) for ln in lines) <= 80, res.stdout
    wide = outside("flows", "--netns", node1, "-w")
    assert wide.returncode == 1, wide.stdout + wide.stderr
    assert wide.stdout.splitlines()[0].split()[:7] == ["VIP", "CLIENT", "STATE", "AGE", "STALE", "RECVQ", "SENDQ"]
    for r in (ln for ln in wide.stdout.splitlines() if ln.startswith(f"[{vip}]:2049 ")):
        assert column(wide.stdout, r, "RECVQ").isdigit() and column(wide.stdout, r, "SENDQ").isdigit(), r
    assert outside("flows", "--netns", node1, "--wide").stdout == wide.stdout
    # --json is the same whether or not --wide
    plain, extended = (json.loads(outside("flows", "--netns", node1, *a, "--json").stdout) for a in ([], ["-w"]))
    assert plain == extended and {"recvq", "sendq", "snd_nxt", "rcv_nxt", "age_s"} <= set(plain["sessions"][0])


@pytest.mark.bpf   # watch loads the BPF flow tracker
def test_flows_of_flows_tracked_by_watch_fit_80_columns_and_wide_adds_sequence_numbers(scene, tmp_path):
    # A real tracked flow: `watch` (BPF) in node1 knows each session's age and
    # sequence numbers; the default table stays within 80 columns with IPv6.
    vip = VIP6
    node1 = scene.topo.ns("node1")
    scene.topo.add_addr("node1", vip, nodad=True)
    with open(tmp_path / "watch.log", "w") as log:
        proc = scene.popen("node1", "watch", "--vip", vip, "--state-dir", scene.state,
                           stdout=subprocess.DEVNULL, stderr=log)
    try:
        def tracked():
            if proc.poll() is not None:
                return None
            doc = json.loads(outside("flows", "--netns", node1, "--vip", vip, "--json").stdout)
            return (doc["source"] == f"watch pid {proc.pid}" and len(doc["sessions"]) == 2
                    and all(s["snd_nxt"] is not None and s["age_s"] is not None for s in doc["sessions"]))
        ready = wait_until(lambda: "ready" in (tmp_path / "watch.log").read_text() or proc.poll() is not None, 60)
        assert ready is not None and proc.poll() is None, (tmp_path / "watch.log").read_text()
        clients = [scene.connect(vip, p) for p in (46003, 65002)]
        assert all(c.echo() for c in clients)
        assert wait_until(tracked, 10) is not None, (tmp_path / "watch.log").read_text()
        res = outside("flows", "--netns", node1)
        wide = outside("flows", "--netns", node1, "-w")
        print(f"\n$ nfsreset flows --netns NODE1\n{res.stdout}$ nfsreset flows --netns NODE1 -w\n{wide.stdout}")
        assert res.returncode == 0 and wide.returncode == 0, res.stderr + wide.stderr
        lines = res.stdout.splitlines()
        assert lines[0].split() == ["VIP", "CLIENT", "STATE", "AGE", "STALE"], res.stdout
        rows = [ln for ln in lines if ln.startswith(f"[{vip}]:2049 ")]
        assert sorted(column(res.stdout, r, "CLIENT") for r in rows) == sorted(c.endpoint for c in clients)
        assert all(re.fullmatch(r"\d+s", column(res.stdout, r, "AGE")) for r in rows), res.stdout
        assert f"# source: watch pid {proc.pid}" in lines
        assert max(len(ln) for ln in lines) <= 80, res.stdout
        assert wide.stdout.splitlines()[0].split() == ["VIP", "CLIENT", "STATE", "AGE", "STALE", "RECVQ", "SENDQ",
                                                       "SND_NXT", "RCV_NXT"], wide.stdout
        for r in (ln for ln in wide.stdout.splitlines() if ln.startswith(f"[{vip}]:2049 ")):
            assert column(wide.stdout, r, "SND_NXT").isdigit() and column(wide.stdout, r, "RCV_NXT").isdigit(), r
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, (tmp_path / "watch.log").read_text()


@pytest.mark.bpf   # the bpf-tracker check compiles and loads flowtrack.c
def test_doctor_in_a_test_namespace_reports_sock_destroy_and_the_strategies(topo):
    ns = topo.ns("node1")
    res = outside("doctor", "--netns", ns)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^ok\s+sock-destroy\s", res.stdout, re.M), res.stdout
    assert re.search(r"^yes\s+strategy destroy\s", res.stdout, re.M), res.stdout
    assert max(len(ln) for ln in res.stdout.splitlines()) <= 80, res.stdout
    wide = outside("doctor", "--netns", ns, "-w")
    assert wide.returncode == 0, wide.stderr
    assert " ".join(wide.stdout.split()) == " ".join(res.stdout.split())      # the same words, unwrapped
    assert not any(ln.startswith(" " * 19) for ln in wide.stdout.splitlines()), wide.stdout
    res = outside("doctor", "--netns", ns, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert set(doc["checks"]) >= {"sock-destroy", "raw-sockets", "nftables", "btf"}
    assert doc["checks"]["sock-destroy"]["ok"] is True, doc["checks"]["sock-destroy"]
    assert all(doc["strategies"][s]["ok"] for s in ("destroy", "rst", "nft", "tickle")), doc["strategies"]
    # its probes clean up after themselves
    assert nft_tables(topo, "node1") == ""
    assert topo.run("node1", "ss", "-tanH").stdout.strip() == ""
