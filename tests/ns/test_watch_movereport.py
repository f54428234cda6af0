"""The move report of `nfsreset watch` against the lab client's own clock.

For each arrival of the VIP the daemon follows the known clients (the state
dir's list) from the moment the VIP is usable until each opens a connection
to this node again, and writes one line. Here, with watch on both heads and
the lab client (modelled on the Linux NFS client, CLOCK_MONOTONIC stamps):
its per-client time agrees with the client's own first reply after usable,
and a client whose packets are dropped on purpose (an nft rule in the
client's namespace) past the report's bound is named as not back.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import threading
import time

import pytest

from nfsreset.lab.remedy_watch import Watch
from nfsreset.lab.run import _Run
from nfsreset.lab.topology import HOST_ADDRS
from nfsreset.daemon.livetable import read_live_table
from tests.ns.scene import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

MOVES = 10
BOUND_S = 3.0          # NFSRESET_MOVE_REPORT_BOUND_S (10 s in service)
STUCK_S = 5.0          # the client's packets dropped this long after the move starts
AGREE_S = 0.020
REPORT = re.compile(r"^\[(node\d)\] .*nfsreset watch: arrival of (\S+): (\d+) of (\d+) clients back"
                    r"(?:, median ([0-9.]+) s, slowest (\S+) ([0-9.]+) s)?, (\d+) stale sockets? left"
                    r"(?:; not back within [0-9.]+ s: (.*))?$")


def _report(logs: list[str], start: int, node: str, timeout: float) -> re.Match | None:
    found = []

    def seen() -> bool:
        found[:] = [m for m in map(REPORT.match, logs[start:]) if m and m[1] == node]
        return bool(found)
    wait_until(seen, timeout)
    return found[0] if found else None


@pytest.mark.parametrize("family", [4, 6])
def test_move_report_agrees_with_the_client_and_names_a_stuck_one(family, monkeypatch, tmp_path):
    monkeypatch.setenv("NFSRESET_MOVE_REPORT_BOUND_S", f"{BOUND_S:g}")
    logs: list[str] = []
    run = _Run(family=family, cap=8.0, remedy=Watch(), user_timeout=180.0, gap=0.3,
               progress=lambda *_: None, strategy=None, log=logs.append, steady=1.0, settle=0.3,
               server="sim", vers="echo")
    rows = []
    try:
        run.begin()
        topo, vip = run.topo, run.vip
        client = f"[{HOST_ADDRS['client'][1]}]" if family == 6 else HOST_ADDRS["client"][0]
        me = f"{client}:{run.result.client_port}"
        nodes = ("node1", "node2")
        usable_before: dict[str, float] = {}   # per node: the last move's usable_at there
        for i in range(MOVES):
            old, new = nodes[i % 2], nodes[(i + 1) % 2]
            start = len(logs)
            m = run.move("failover" if new == "node2" else "failback", old, new)
            rep = _report(logs, start, new, BOUND_S + 2)
            assert rep is not None, "\n".join(logs[start:])
            assert rep.group(3, 4) == ("1", "1") and rep[6] == me and rep[8] == "0", rep[0]
            # The same figures in the live table (`nfsreset flows --json`), with the
            # daemon's own moment of usable: the client's first reply is measured
            # from there too (the mover's t_usable comes from a poll of `ip`, tens
            # of ms late under load: that lag is no part of either figure).
            ino = os.stat(f"/run/netns/{topo.ns(new)}").st_ino
            last = {}

            def written() -> bool:   # the table file follows within a flush period (0.5 s)
                last.clear()
                last.update((read_live_table(ino) or {}).get("moves", {}).get(vip) or {})
                # this move's report, not the one of this node's previous arrival (their
                # times can agree to the report line's 3 decimals)
                return (bool(last.get("returns")) and last.get("usable_at") != usable_before.get(new)
                        and abs(last["returns"][0]["s"] - float(rep[7])) < 1e-3)
            assert wait_until(written, 2.0) is not None, last
            usable = usable_before[new] = last["usable_at"]
            own = run.client_log.first_reply_after(usable) - usable
            rows.append((m.direction, float(rep[7]), own, own - m.usable_to_first_reply))
        res = topo.run(new, *run.lab.nfsreset_argv, "flows", "--vip", vip, "--json")
        assert json.loads(res.stdout)["moves"][vip] == last

        # A client kept stuck: its packets to the VIP dropped from before the move for STUCK_S.
        old, new = new, old
        rules = tmp_path / "stuck.nft"
        rules.write_text("table inet nfsr_stuck {\n chain out {\n  type filter hook output priority 0;\n"
                         f"  ip{'6' if family == 6 else ''} daddr {vip} tcp dport 2049 drop\n }}\n}}\n")
        topo.run("client", "nft", "-f", str(rules))
        lift = threading.Timer(STUCK_S, lambda: topo.run("client", "nft", "delete", "table", "inet",
                                                          "nfsr_stuck", check=False))
        lift.start()
        try:
            start = len(logs)
            stuck = run.move("stuck", old, new)
            rep = _report(logs, start, new, BOUND_S + 2)
        finally:
            lift.join(timeout=STUCK_S + 5)
            topo.run("client", "nft", "delete", "table", "inet", "nfsr_stuck", check=False)
    finally:
        run.teardown()
    print(f"\nv{family}: move, report's time of {me}, the client's first reply after usable, difference"
          " (the lab mover's usable seen ... ms after the daemon's)")
    for direction, reported, own, lag in rows:
        print(f"  {direction:9s} {reported:.3f} s  {own:.3f} s  {(reported - own) * 1000:+.1f} ms  ({lag * 1000:+.0f} ms)")
    diffs = [abs(r - o) for _, r, o, _ in rows]
    print(f"  |difference| median {statistics.median(diffs) * 1000:.1f} ms, max {max(diffs) * 1000:.1f} ms")
    print(f"  stuck: {rep[0] if rep else None}; client's own first reply after usable: "
          f"{stuck.usable_to_first_reply}")
    assert max(diffs) <= AGREE_S, rows
    assert rep is not None and rep.group(3, 4) == ("0", "1") and rep[9] == me, rep[0] if rep else logs[-20:]
    assert stuck.usable_to_first_reply is None or stuck.usable_to_first_reply > BOUND_S
    assert not any("Traceback" in ln for ln in logs), "\n".join(logs)


def test_move_report_without_bpf_sees_the_return_in_its_dumps(scene):
    """--no-bpf: the report's new connections come from sock_diag dumps, every
    MOVE_DUMP_PERIOD_S while a report is open; the time is that coarse."""
    import signal

    from nfsreset.lab.topology import VIP4
    from nfsreset.daemon.daemon import MOVE_DUMP_PERIOD_S
    from tests.ns.test_watch import READY_TIMEOUT_S, StderrLines, remove_live_table

    topo = scene.topo
    topo.add_addr("node1", VIP4, nodad=True)
    client = scene.connect(VIP4, 47041)
    env = dict(os.environ, NFSRESET_MOVE_REPORT_BOUND_S=f"{BOUND_S:g}")
    procs = {n: scene.popen(n, "watch", "--vip", VIP4, "--state-dir", scene.state, "--no-bpf",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
             for n in ("node1", "node2")}
    errs = {n: StderrLines(p) for n, p in procs.items()}
    try:
        for e in errs.values():
            assert e.wait_for(r"\bready\b", READY_TIMEOUT_S), e.text()
        assert client.echo()
        assert wait_until(lambda: os.path.exists(scene.state_file(VIP4)), 3.0) is not None
        time.sleep(0.6)        # node1's list written (flush period 0.5 s)
        scene.move(VIP4, "node1", "node2")
        assert client.wait_dead(3.0) is not None     # tickled by node2: reset
        before = time.monotonic()
        client.connect()
        after = time.monotonic()
        assert client.echo()
        line = errs["node2"].wait_for(r"arrival of .*clients back", BOUND_S + 2)
        assert line is not None, errs["node2"].text()
        assert "1 of 1 clients back" in line and client.endpoint in line, line
        ino = os.stat(f"/run/netns/{topo.ns('node2')}").st_ino
        doc = {}
        assert wait_until(lambda: doc.update((read_live_table(ino) or {}).get("moves", {}).get(VIP4) or {})
                          or doc.get("back") == 1, 2.0) is not None, doc
        reported = doc["returns"][0]["s"]
        lo, hi = before - doc["usable_at"], after - doc["usable_at"]
        print(f"\nno BPF: reported {reported:.3f} s; the client connected between {lo:.3f} and {hi:.3f} s")
        assert lo - 0.001 <= reported <= hi + MOVE_DUMP_PERIOD_S + 0.05, (lo, reported, hi)
    finally:
        for n, p in procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    remove_live_table(topo, n)
