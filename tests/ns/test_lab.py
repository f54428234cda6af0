"""`nfsreset lab` end to end: real namespaces, real sockets, real VIP moves.

The baseline must show the problem nfsreset exists for: after a failover the
old owner keeps the client's ESTABLISHED socket, and on failback the client,
coming back from the same source port, stalls past the cap (its segments hit
that stale socket), for both families. (On real NFS-Ganesha the same is
asserted per NFS version in test_lab_ganesha.py; here Ganesha runs the
registered-remedy seam and the SIGTERM clean-up, heads included.)
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import typer
from typer.testing import CliRunner

from nfsreset.lab import report
from nfsreset.lab.command import lab
from nfsreset.lab.topology import HOST_ADDRS, VIP4, VIP6, list_netns
from tests.ns.scene import alive, ganesha_args, ganesha_pids, host_head_mounts, needs_ganesha, wait_for

pytestmark = pytest.mark.netns

CAP = 7.0
LAB_MAIN = "import typer; from nfsreset.lab.command import lab; typer.run(lab)"


def app() -> typer.Typer:
    a = typer.Typer(add_completion=False)
    a.command()(lab)
    return a


def ours(pid: int) -> set[str]:
    return {n for n in list_netns() if n.startswith(f"nfsr-{pid}-")}


def stale_tuple(lines: list[str], vip: str, client: str, port: int) -> list[str]:
    hits = []
    for line in lines:
        parsed = report.parse_ss_line(line)
        if parsed == ("ESTAB", vip, 2049, client, port):
            hits.append(line)
    return hits


@pytest.mark.slow
def test_baseline_failover_recovers_failback_stalls_on_stale_socket():
    before = ours(os.getpid())
    # --remedy none: the plain lab (sim server, ip mover); no options at all is the
    # Pacemaker showcase (tests/ns/test_lab_default.py)
    res = CliRunner().invoke(app(), ["--family", "both", "--cap", str(CAP), "--remedy", "none", "--json"])
    assert res.exit_code == 0, res.output
    assert ours(os.getpid()) == before, "the lab left namespaces behind"
    obj = json.loads(res.stdout)
    runs = {r["family"]: r for r in obj["runs"]}
    assert set(runs) == {4, 6}
    for fam, vip, client in ((4, VIP4, HOST_ADDRS["client"][0]), (6, VIP6, HOST_ADDRS["client"][1])):
        run = runs[fam]
        assert run["error"] is None
        port = run["client_port"]
        assert 665 <= port <= 1023, "client must use a reserved port"
        fo, fb = run["failover"], run["failback"]
        # node1 never learnt that the VIP left: the client's 4-tuple is still ESTABLISHED there
        assert stale_tuple(fo["stale_sockets"], vip, client, port), (fam, fo["stale_sockets"])
        # failover: the new owner has no socket, answers RST, client reconnects at once
        assert fo["recovered"] is True, (fam, fo)
        assert fo["stall"] < CAP
        assert fo["del_to_usable"] <= fo["stall"]
        assert any("ECONNRESET" in e for e in fo["client_events"]), fo["client_events"]
        assert any(f"from port {port}" in e for e in fo["client_events"]), "reconnect must keep the port"
        # failback: the client's segments land on the stale socket: no RST, no reply within the cap
        assert fb["recovered"] is False and fb["stall"] is None and fb["cap"] == CAP, (fam, fb)
        assert not any("ECONNRESET" in e for e in fb["client_events"])
    # one progress line per phase when stderr is no tty
    assert [line for line in res.stderr.splitlines() if line.startswith("[")] == [
        "[1/4] baseline (ip addr, like IPaddr2), IPv4: failover ...",
        "[2/4] baseline (ip addr, like IPaddr2), IPv4: failback ...",
        "[3/4] baseline (ip addr, like IPaddr2), IPv6: failover ...",
        "[4/4] baseline (ip addr, like IPaddr2), IPv6: failback ...",
    ], res.stderr


@pytest.mark.parametrize("args, message", [
    (["--family", "5"], "nfsreset lab: --family must be 4, 6 or both, not '5'"),
    (["--cap", "0"], "nfsreset lab: --cap must be a positive number"),
    (["--cap", "-2"], "nfsreset lab: --cap must be a positive number"),
    (["--remedy", "none", "--remedy", "no-such-remedy"], "nfsreset lab: unknown remedy 'no-such-remedy'"),
    (["--state", "both"], "nfsreset lab: --state must be per-head or shared, not 'both'"),
])
def test_bad_input_exits_2_with_one_line_and_builds_nothing(args, message):
    before = ours(os.getpid())
    res = CliRunner().invoke(app(), args)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), res.stderr
    assert res.stdout == ""
    assert ours(os.getpid()) == before


def test_not_root_is_refused_before_anything_is_built():
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", LAB_MAIN, "--family", "4", "--cap", "5"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "nfsreset lab: needs root (it creates network namespaces)"


@pytest.mark.parametrize("server", ["sim", pytest.param("ganesha", marks=needs_ganesha)])
def test_sigterm_mid_run_removes_every_namespace(server):
    extra = ganesha_args("3") if server == "ganesha" else ["--server", "sim"]
    proc = subprocess.Popen([sys.executable, "-c", LAB_MAIN, "--family", "4", "--cap", "30", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    heads: set[int] = set()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(ours(proc.pid)) < 4 and proc.poll() is None:
            time.sleep(0.05)
        assert len(ours(proc.pid)) == 4, "lab never built its namespaces"
        if server == "ganesha":
            # both heads' rpcbind and ganesha.nfsd running: a PID namespace each must go too
            assert wait_for(lambda: len(ganesha_pids(ours(proc.pid))) >= 4, 15), ganesha_pids(ours(proc.pid))
            heads = ganesha_pids(ours(proc.pid))
        time.sleep(1.0)   # let servers and client start: they must go too
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert ours(proc.pid) == set()
    assert not [p for p in heads if alive(p)], "a head's process outlived the lab"
    assert host_head_mounts() == []


class _SsKill:
    """A remedy made for this test: `ss -K` the VIP's sockets on the old owner
    after the delete (docs/design.md §1, row 2). It proves the seam: the hook runs in
    the old owner's namespace after `ip addr del`, and the failback recovers."""

    name = "test-ss-kill"

    @classmethod
    def make(cls):
        from nfsreset.lab.remedies import Remedy

        class SsKill(Remedy):
            name = cls.name
            calls: list = []

            def post_stop(self, lab, node, vip):
                from nfsreset.lab.run import vip_sockets

                self.calls.append(("post_stop", node, vip, lab.topo.has_addr(node, vip, usable=False),
                                   len(vip_sockets(lab.topo, node, vip))))
                lab.topo.run(node, "ss", "-K", "-tn", "src", f"[{vip}]" if ":" in vip else vip)

        return SsKill


@pytest.mark.parametrize("server", ["sim", pytest.param("ganesha", marks=needs_ganesha)])
def test_a_registered_remedy_runs_at_post_stop_and_fixes_failback(server):
    """On Ganesha too: its socket is AF_INET6 with the VIP as ::ffff:198.51.100.10."""
    from nfsreset.lab.remedies import REMEDIES, register

    extra = ganesha_args("3") if server == "ganesha" else []
    cls = register(_SsKill.make())
    try:
        res = CliRunner().invoke(app(), ["--family", "4", "--cap", "5", "--remedy", cls.name, "--json", *extra])
    finally:
        REMEDIES.pop(cls.name, None)
    assert res.exit_code == 0, res.output
    run = json.loads(res.stdout)["runs"][0]
    assert run["remedy"] == cls.name and run["server"] == server
    # post_stop ran on the old owner, after the delete, while the stale socket was still there
    assert cls.calls == [("post_stop", "node1", VIP4, False, 1), ("post_stop", "node2", VIP4, False, 1)]
    assert run["failover"]["stale_sockets"] == [] and run["failback"]["stale_sockets"] == []
    assert run["failover"]["recovered"] and run["failback"]["recovered"], run
    # IPv4 is usable ~1.05 s after the delete; the client's 1.6 s retransmission
    # (0.2 tail loss probe, 0.4, 0.8, 1.6, 3.3 s) meets a node1 without the
    # stale socket. A lab stall of ~0.5 s would leave it to the 3.3 s one; the
    # baseline never recovers at all, so the bound still proves the hook.
    assert run["failback"]["stall"] < 3.5
    hooks = {(h["phase"], h["hook"], h["node"]) for h in run["hook_timings"]}
    assert {("failover", "post_stop", "node1"), ("failover", "pre_start", "node2"),
            ("failover", "post_start", "node2"), ("failback", "post_stop", "node2"),
            ("setup", "setup", None), ("teardown", "teardown", None)} <= hooks
    assert all(h["error"] is None for h in run["hook_timings"])


class _Lines:
    """The client's JSON lines, read until a condition holds (bounded).

    Raw os.read on the pipe: a buffered readline() would hide lines already
    read into Python's buffer from select()."""

    def __init__(self, proc):
        self.fd, self.buf, self.events = proc.stdout.fileno(), b"", []

    def until(self, want, timeout):
        import select

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not want(self.events):
            if not select.select([self.fd], [], [], 0.2)[0]:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            *lines, self.buf = (self.buf + chunk).split(b"\n")
            self.events += [json.loads(line) for line in lines if line]
        return self.events


def test_client_walks_ports_down_keeps_its_port_and_backs_off(topo):
    server_ip = HOST_ADDRS["node1"][0]
    server = topo.popen("node1", sys.executable, "-m", "nfsreset.lab.server", "--port", "2049",
                        stdout=subprocess.PIPE)
    # something else holds 1023 in the client namespace: xs_bind walks down to 1022
    squatter = topo.popen("client", sys.executable, "-c",
                          "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',1023)); s.listen(); "
                          "print('{\"ev\": \"bound\"}', flush=True); time.sleep(30)", stdout=subprocess.PIPE)
    client = None
    try:
        # both must be in place before the client starts (a fixed sleep raced two interpreter starts)
        assert _Lines(server).until(lambda e: any(x["ev"] == "listening" for x in e), 10)
        assert _Lines(squatter).until(lambda e: e, 10) == [{"ev": "bound"}]
        client = topo.popen("client", sys.executable, "-m", "nfsreset.lab.client", "--server", server_ip,
                            "--duration", "30", stdout=subprocess.PIPE)
        lines = _Lines(client)
        evs = lines.until(lambda e: sum(x["ev"] == "reply" for x in e) >= 5, 10)
        connected = [e for e in evs if e["ev"] == "connected"]
        assert connected and connected[0]["port"] == 1022, evs[:5]
        replies = [e["t"] for e in evs if e["ev"] == "reply"]
        gaps = sorted(b - a for a, b in zip(replies, replies[1:]))
        assert len(replies) >= 5 and 0.01 < gaps[len(gaps) // 2] < 0.1, gaps    # median: one stall is no pace
        # the server goes away: EOF, an immediate reconnect from the same port, refused, then 3 s, 6 s
        server.terminate()
        server.wait(timeout=5)
        evs = lines.until(lambda e: sum(x["ev"] == "reconnect" for x in e) >= 3, 8)
        delays = [e["delay"] for e in evs if e["ev"] == "reconnect"]
        assert delays[:3] == [0.0, 3.0, 6.0], evs
        errors = [e["err"] for e in evs if e["ev"] == "error"]
        # EOF, or a reset when the server died with a request unread (tcp_close sends RST then)
        assert errors[0] in ("EOF", "ECONNRESET") and errors[1] == "ECONNREFUSED", errors
        assert {e["port"] for e in evs if e["ev"] == "connecting"} == {1022}
    finally:
        for p in (client, squatter, server):
            if p and p.poll() is None:
                p.kill()
                p.wait()
