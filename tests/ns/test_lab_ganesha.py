"""The failover lab on real parts: NFS-Ganesha on both heads, a client that speaks NFS.

`nfsreset lab --server ganesha`: rpcbind + ganesha.nfsd in each head's network
namespace (plus its own mount and PID namespace), both exporting one lab
directory; the lab client sends NFSv3 GETATTR (after MOUNT) or NFSv4.0
COMPOUND(PUTROOTFH, GETATTR) over TCP from a reserved port it keeps across
reconnects. A reply counts only when its xid matches and it says NFS_OK.

What must hold on the real server:
- baseline: after the failover Ganesha still holds the client's 4-tuple on
  node1 (ss shows ganesha.nfsd on it); on failback the client's segments land
  on that socket and nothing comes back within the cap;
- with the hooks, both moves recover and the failback's first NFS reply comes
  within 0.3 s of the VIP being usable, nothing stale left;
- a head leaves nothing behind: no ganesha/rpcbind process, no mount.

Each run_lab is ~8-14 s; eight run here (~100 s).
"""
from __future__ import annotations

import functools
import tempfile
import shutil
import os
import subprocess

import pytest

from nfsreset.lab import report
from nfsreset.lab.remedies import load_plugins
from nfsreset.lab.run import run_lab
from nfsreset.lab.topology import HOST_ADDRS, VIP4, VIP6
from tests.ns.scene import NFSRESET

pytestmark = [pytest.mark.netns, pytest.mark.slow]

CAP = 5.0
CASES = [("3", 4), ("3", 6), ("4.0", 4), ("4.0", 6)]


def _pids(name: str) -> set[int]:
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _ours(pid: int, mark: str) -> bool:
    """Whether `pid` descends from a head of our run: a head's processes are children
    of its namespace's init, whose command line names the config in the run's
    workdir (under `mark`). Other sessions on the machine may run heads too."""
    for _ in range(64):     # bounded walk up the parents
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/status") as f:
                ppid = int(next(ln for ln in f if ln.startswith("PPid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            return False
        if mark.encode() in cmd:
            return True
        if ppid <= 1:
            return False
        pid = ppid
    return False


def _host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if "nfsreset-run" in line or "nfsreset-nfs" in line]


@functools.cache
def lab(vers: str, family: int, remedy: str) -> report.FamilyResult:
    """One run (cached: several tests read it), checked to leave nothing behind."""
    before = _pids("ganesha.nfsd") | _pids("rpcbind")
    logs: list[str] = []
    # The run's workdir goes under a directory of our own, so a process left by
    # this run can be told from another session's heads.
    mark = tempfile.mkdtemp(prefix=f"nfsr-ganesha-test-{os.getpid()}-")
    saved, tempfile.tempdir = tempfile.tempdir, mark
    try:
        res = run_lab(family, CAP, load_plugins()[remedy](), server="ganesha", vers=vers, log=logs.append)
        leaked = {p for p in (_pids("ganesha.nfsd") | _pids("rpcbind")) - before if _ours(p, mark)}
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(mark, ignore_errors=True)
    assert not leaked, f"processes left after the lab: {leaked}"
    assert _host_mounts() == [], "a head's tmpfs is visible on the host"
    assert res.error is None, res.error
    assert res.server == "ganesha" and res.vers == vers
    assert res.server_start_s is not None and res.server_start_s < 15
    assert all(h.error is None for h in res.hook_timings), (res.hook_timings, logs[-20:])
    return res


def _tuple_on(lines: list[str], vip: str, client: str, port: int) -> list[str]:
    return [line for line in lines if report.parse_ss_line(line) == ("ESTAB", vip, 2049, client, port)]


@pytest.mark.parametrize("vers,family", CASES)
def test_baseline_ganesha_keeps_the_stale_socket_and_failback_stalls(vers, family):
    r = lab(vers, family, "none")
    vip = VIP4 if family == 4 else VIP6
    client = HOST_ADDRS["client"][0 if family == 4 else 1]
    print(f"NFSv{vers} IPv{family} none: failover {r.failover.stall_text()} "
          f"(usable->reply {r.failover.usable_to_first_reply}), failback {r.failback.stall_text()}, "
          f"Ganesha listening after {r.server_start_s:.3f} s")
    assert r.failover.recovered, r.failover
    # node1's Ganesha still holds the client's connection after the VIP left it
    held = _tuple_on(r.failover.stale, vip, client, r.client_port)
    assert held and all(line.endswith("ganesha.nfsd") for line in held), r.failover.stale
    # failback: the client comes back from the same port onto that socket; no NFS reply within the cap
    assert not r.failback.recovered, r.failback
    assert r.failback.usable_to_first_reply is None


@pytest.mark.parametrize("vers,family", CASES)
def test_hooks_recover_ganesha_failback_within_0_3_s_of_usable(vers, family):
    r = lab(vers, family, "hooks")
    print(f"NFSv{vers} IPv{family} hooks: failover {r.failover.stall_text()} "
          f"(usable->reply {r.failover.usable_to_first_reply:.3f}), failback {r.failback.stall_text()} "
          f"(usable->reply {r.failback.usable_to_first_reply:.3f})")
    for d in (r.failover, r.failback):
        assert d.recovered, d
        assert d.stale == [], d.stale
    assert r.failback.usable_to_first_reply <= 0.3, r.failback
    assert r.failover.usable_to_first_reply <= 0.3, r.failover


def test_vers_needs_the_ganesha_server():
    res = subprocess.run([NFSRESET, "lab", "--vers", "3"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "nfsreset lab: --vers needs --server ganesha: the sim server only echoes records"]
    res = subprocess.run([NFSRESET, "lab", "--server", "ganesha", "--vers", "2"], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--vers must be" in res.stderr
