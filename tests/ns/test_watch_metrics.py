"""`watch --metrics`: an endpoint that cannot take the daemon down, and a port in
use refused before anything is created (issue 10, items 6 and 8).

Before: a thread per connection and no timeout; ~1,000 idle connections from a
local user ran the daemon out of descriptors (EMFILE), it died, removed its
table and left a stale session. A port in use was a traceback after the state
dir, the BPF program and the nft context existed.
"""
from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time

import pytest

from nfsreset.kernel import netns
from nfsreset.lab.topology import HOST_ADDRS, VIP4
from nfsreset.daemon.livetable import live_table_path
from nfsreset.daemon.metrics import METRICS_MAX_CONNS
from tests.ns.scene import nft_tables, one_line, wait_until
from tests.ns.test_watch import READY_TIMEOUT_S, StderrLines, remove_live_table

pytestmark = [pytest.mark.netns]

IDLE_CONNS = 1000
DAEMON_NOFILE = 1024      # the soft limit a daemon gets by default (systemd, a shell)


def _daemon_nofile() -> None:
    # What the daemon would have on a real node; the test process raises its own.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(DAEMON_NOFILE, hard), hard))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _get_metrics(topo, host: str, port: int, timeout: float = 1.0) -> str | None:
    """GET /metrics from the client namespace; the body, or None on any failure."""
    with netns.entered(topo.ns("client")):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        for _ in range(1000):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        return None
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return body.decode() if head.startswith(b"HTTP/1.0 200") else None


def test_a_thousand_idle_connections_do_not_take_the_daemon_down(scene):
    topo = scene.topo
    host, port = HOST_ADDRS["node1"][0], 9449
    topo.add_addr("node1", VIP4)
    c = scene.connect(VIP4, 46001)
    assert c.echo()
    proc = subprocess.Popen(topo.exec_argv("node1", *_nfsreset_argv(
        "watch", "--vip", VIP4, "--state-dir", scene.state, "--no-bpf", "--metrics", f"{host}:{port}")),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_daemon_nofile)
    err = StderrLines(proc)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    idle: list[socket.socket] = []
    try:
        assert err.wait_for(r"\bready\b", READY_TIMEOUT_S), err.text()
        assert "nfsreset_sessions" in (_get_metrics(topo, host, port) or ""), err.text()
        base = _fds(proc.pid)

        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, soft + IDLE_CONNS + 100), hard))
        # One after the other, each handshake done before the next (the way a
        # local user fills a listener's queue faster than a short backlog drops them).
        connected, misses, deadline = 0, 0, time.monotonic() + 40
        for _ in range(IDLE_CONNS):
            if misses >= 3 or time.monotonic() > deadline:
                break
            with netns.entered(topo.ns("client")):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            idle.append(s)
            s.settimeout(3.5)        # two SYN retransmissions (1 s, 3 s): a full backlog drops SYNs
            try:
                s.connect((host, port))
                connected += 1
                misses = 0
            except OSError:
                misses += 1
        time.sleep(0.3)
        peak = max(_fds(proc.pid) for _ in range(5) if time.sleep(0.05) is None)

        # The daemon still does its job: the VIP leaves, its session is ended.
        topo.del_addr("node1", VIP4)
        took = wait_until(lambda: not scene.sockets("node1", VIP4), 3.0)
        assert took is not None, (scene.sockets("node1", VIP4), err.text())
        assert proc.poll() is None, err.text()
        peak = max(peak, _fds(proc.pid))
        # The idle ones are timed out; /metrics answers again.
        t0 = time.monotonic()
        back = wait_until(lambda: _get_metrics(topo, host, port, timeout=0.5) is not None, 6.0, step=0.2)
        print(f"\n{connected} of {IDLE_CONNS} idle connections made: daemon fds {base} before, peak {peak}; session ended "
              f"{took:.3f} s after ip addr del; /metrics answered again after "
              f"{None if back is None else round(time.monotonic() - t0, 2)} s")
        assert back is not None, err.text()
        assert connected == IDLE_CONNS
        assert peak <= base + METRICS_MAX_CONNS + 8, (base, peak)
        for s in idle:
            s.close()
        idle.clear()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, err.text()
        err.thread.join(timeout=5)
        assert "Traceback" not in err.text(), err.text()
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        remove_live_table(topo, "node1")
    assert nft_tables(topo, "node1") == ""


def _nfsreset_argv(*args: str) -> list[str]:
    from tests.ns.scene import NFSRESET
    return [NFSRESET, *args]


@pytest.mark.parametrize("host", [HOST_ADDRS["node1"][0], HOST_ADDRS["node1"][1]], ids=["v4", "v6"])
def test_metrics_port_in_use_exits_2_and_creates_nothing(scene, tmp_path, host):
    topo = scene.topo
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with netns.entered(topo.ns("node1")):
        taken = socket.socket(fam, socket.SOCK_STREAM)
    state = tmp_path / "never-made"
    ino = os.stat(f"/run/netns/{topo.ns('node1')}").st_ino
    try:
        taken.bind((host, 9450))
        taken.listen(1)
        shown = f"[{host}]:9450" if ":" in host else f"{host}:9450"
        res = scene.nfsreset("node1", "watch", "--vip", VIP4, "--state-dir", str(state), "--metrics", shown)
    finally:
        taken.close()
    assert res.returncode == 2, res.stderr
    assert one_line(res.stderr) == f"nfsreset watch: --metrics {shown}: address in use"
    assert not state.exists()
    assert nft_tables(topo, "node1") == ""
    assert not os.path.exists(live_table_path(ino))


# The endpoint alone, in a process with almost no descriptors left: accept fails
# with EMFILE, and the endpoint must live through it and answer once it can.
_EMFILE_CHILD = r"""
import os, resource, sys, time
from nfsreset.daemon.metrics import Metrics, MetricsServer, bind_metrics
sock = bind_metrics(sys.argv[1], int(sys.argv[2]))
srv = MetricsServer(Metrics(), sock, lambda line: print(line, file=sys.stderr, flush=True))
srv.start()
open_now = len(os.listdir("/proc/self/fd"))
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 4, hard))   # room for ~3 connections
print("ready", flush=True)
sys.stdin.read()          # until the test closes our stdin
srv.close()
print(f"accept_errors={srv.accept_errors} refused={srv.refused}", flush=True)
"""


def test_metrics_endpoint_lives_through_emfile(scene):
    import sys
    topo = scene.topo
    host, port = HOST_ADDRS["node1"][0], 9451
    child = subprocess.Popen(topo.exec_argv("node1", sys.executable, "-c", _EMFILE_CHILD, host, str(port)),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    conns: list[socket.socket] = []
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        with netns.entered(topo.ns("client")):
            for _ in range(12):          # more than the child can hold
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                conns.append(s)
                s.settimeout(2)
                s.connect((host, port))   # completed by the kernel's backlog
        time.sleep(0.5)
        assert child.poll() is None
        for s in conns:
            s.close()
        conns.clear()
        back = wait_until(lambda: _get_metrics(topo, host, port, timeout=0.5) is not None, 6.0, step=0.2)
        assert back is not None, "the endpoint did not answer again"
        out, err = child.communicate("", timeout=10)
    finally:
        for s in conns:
            s.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    print(f"\nmetrics under EMFILE: answered again after {back:.2f} s; child: {out.strip()}; log: {err.strip()}")
    assert child.returncode == 0, err
    assert "accept failed (Too many open files)" in err, err
    assert "Traceback" not in err
