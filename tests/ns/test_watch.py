"""`nfsreset watch`, the daemon, as a real process in node1: it must see the VIP
leave (rtnetlink), end its sessions and pass the clients on (state dir) within
a second, and leave nothing behind on SIGTERM (nft table, BPF programs).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from nfsreset.lab.topology import VIP4, VIP6
from tests.ns.scene import NFS_PORT, Scene, nft_tables, wait_until

pytestmark = [pytest.mark.netns]

READY_TIMEOUT_S = 60
MISSING_NS = f"nfsr-{os.getpid()}-no-such-namespace"



class StderrLines:
    """Reads a process's stderr in a thread so the test can wait for a line
    without ever blocking on the pipe (bounded waits only)."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)   # EOF marker
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> str | None:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if line is None:
                        return None
                    if rx.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def text(self) -> str:
        with self.cond:
            return "\n".join(x for x in self.lines if x is not None)


def prog_ids_held_by(pid: int) -> set[int]:
    """BPF programs a process holds open (fdinfo of a BPF prog fd has `prog_id:`)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            pass
    return ids


def loaded_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return {p["id"] for p in json.loads(out or "[]")}


def remove_live_table(topo, node: str) -> None:
    from nfsreset.daemon.livetable import live_table_path
    try:
        os.unlink(live_table_path(os.stat(f"/run/netns/{topo.ns(node)}").st_ino))
    except FileNotFoundError:
        pass


def _watch_end_to_end(scene, vip: str, bpf: bool) -> None:
    topo = scene.topo
    topo.add_addr("node1", vip, nodad=True)
    before_start = scene.connect(vip, 47001)        # found by the start-up dump
    args = ["watch", "--vip", vip, "--state-dir", scene.state] + ([] if bpf else ["--no-bpf"])
    proc = scene.popen("node1", *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = StderrLines(proc)
    try:
        ready = err.wait_for(r"\bready\b", READY_TIMEOUT_S)
        assert ready is not None, err.text()
        assert ("with BPF" if bpf else "with sock_diag dumps") in ready, ready
        progs = prog_ids_held_by(proc.pid) if bpf else set()
        if bpf:
            assert progs and progs <= loaded_prog_ids(), progs
        after_start = scene.connect(vip, 47002)     # seen by the tracker (or the next dump)
        clients = (before_start, after_start)
        assert all(c.echo() for c in clients)
        want = sorted([NFS_PORT, c.ip, c.cport] for c in clients)

        def listed() -> bool:
            try:
                with open(scene.state_file(vip)) as f:
                    return sorted(json.load(f)["clients"]) == want
            except (OSError, ValueError):
                return False

        # While the VIP is here the daemon keeps its client list current (for the peer).
        assert wait_until(listed, 3.0) is not None, err.text()
        os.unlink(scene.state_file(vip))   # from here on, only the teardown can write it

        topo.del_addr("node1", vip)
        took = wait_until(lambda: not scene.sockets("node1", vip) and listed(), 3.0)
        print(f"watch ({'BPF' if bpf else 'sock_diag'}, {vip}): sessions gone and clients recorded "
              f"{took if took is None else round(took, 3)} s after ip addr del")
        assert took is not None and took < 1.0, (took, scene.sockets("node1", vip), err.text())
        assert os.stat(scene.state_file(vip)).st_mode & 0o777 == 0o600
        assert err.wait_for(r"destroyed 2 of 2 session\(s\)", 1.0), err.text()
        # Ended in node1's kernel, never reset towards the client from here (an
        # early RST would push it into SYN back-off before the new owner is up).
        assert all(c.wait_dead(0.2) is None for c in clients)
        assert "nfsreset" in nft_tables(topo, "node1"), "the VIP away must be quarantined"

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        print(f"watch stopped {time.monotonic() - started:.3f} s after SIGTERM")
        assert rc == 0, err.text()
        err.thread.join(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            remove_live_table(topo, "node1")   # a killed daemon leaves its file behind
    assert "Traceback" not in err.text(), err.text()
    assert nft_tables(topo, "node1") == ""
    if bpf:
        assert not progs & loaded_prog_ids(), "watch left BPF programs loaded"


@pytest.mark.bpf
@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_watch_with_bpf_ends_sessions_when_the_vip_leaves_and_cleans_up(scene, vip):
    _watch_end_to_end(scene, vip, bpf=True)


def test_watch_without_bpf_does_the_same_on_sock_diag_dumps(scene):
    _watch_end_to_end(scene, VIP4, bpf=False)


@pytest.mark.parametrize("args, why", [
    pytest.param(["--vip", "nonsense"], "is not an IP address", id="vip-nonsense"),
    pytest.param(["--vip", VIP4, "--port", "0"], "not a TCP port", id="port-0"),
    pytest.param(["--vip", VIP4, "--strategy", "foo"], "--strategy", id="strategy-foo"),
    pytest.param(["--vip", VIP4, "--metrics", "nope"], "--metrics", id="metrics-nope"),
    pytest.param(["--vip", VIP4, "--netns", MISSING_NS], "does not exist", id="netns-missing"),
    pytest.param([], "--vip", id="no-vip"),
])
def test_watch_bad_input_exits_2_before_ready(scene, args, why):
    res = scene.nfsreset("node1", "watch", *args, "--state-dir", scene.state, timeout=30)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nfsreset watch: ") and why in lines[0], res.stderr
    assert "ready" not in res.stderr
    assert not os.path.exists(f"/run/netns/{MISSING_NS}")
    assert nft_tables(scene.topo, "node1") == ""


@pytest.mark.bpf
def test_watch_live_table_is_written_on_change_and_refused_once_its_writer_is_gone(scene):
    """The file `nfsreset flows` reads (/run/nfsreset/flows-<netns>.json) is
    rewritten when the daemon's table changes and not while it is idle; a
    reader trusts it only while the very process that wrote it (pid and start
    time) is alive, so a killed daemon's file is ignored however fresh it is."""
    from nfsreset.daemon.livetable import _start_ticks, live_table_path, read_live_table

    topo = scene.topo
    topo.add_addr("node1", VIP4, nodad=True)
    ino = os.stat(f"/run/netns/{topo.ns('node1')}").st_ino
    path = live_table_path(ino)
    first = scene.connect(VIP4, 47011)
    proc = scene.popen("node1", "watch", "--vip", VIP4, "--state-dir", scene.state,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = StderrLines(proc)

    def clients() -> set[int]:
        doc = read_live_table(ino)
        return set() if doc is None else {r["cport"] for r in doc["flows"]}

    def flows_source() -> str:
        res = scene.nfsreset("node1", "flows", "--vip", VIP4, "--json")
        return json.loads(res.stdout)["source"]

    try:
        assert err.wait_for(r"\bready\b", READY_TIMEOUT_S), err.text()
        assert wait_until(lambda: clients() == {47011}, 2.0) is not None, err.text()
        assert flows_source() == f"watch pid {proc.pid}"
        st = os.stat(path)
        time.sleep(1.6)                    # > 3 flush periods, nothing changes
        again = os.stat(path)
        assert (again.st_ino, again.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), "rewritten while idle"
        second = scene.connect(VIP4, 47012)
        took = wait_until(lambda: clients() == {47011, 47012}, 2.0)
        print(f"live table: new session listed {took} s after connect")
        assert took is not None and took < 1.0, err.text()
        assert first.echo() and second.echo()

        proc.kill()                        # no clean shutdown: the file stays behind
        proc.wait(timeout=10)
        assert os.path.exists(path)
        assert read_live_table(ino) is None
        assert flows_source() == "sock_diag dump"
        # A live pid is not enough: it must be the writer (same start time).
        with open(path) as f:
            doc = json.load(f)
        me = os.getpid()
        for started, trusted in ((_start_ticks(me) + 1, False), (_start_ticks(me), True)):
            with open(path, "w") as f:
                json.dump(doc | {"pid": me, "started": started}, f)
            assert (read_live_table(ino) is not None) is trusted
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
