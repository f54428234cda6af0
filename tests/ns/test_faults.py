"""`nfsreset kill` and `tickle` under real faults: one failing step never stops the others.

Each fault is real and private to the hook's process: libnftables that cannot
be loaded (hidden by a bind mount in a mount namespace of the hook's own),
CAP_NET_ADMIN or CAP_NET_RAW dropped from the hook (setpriv), a state dir that
is read-only or full (a read-only bind mount / a tiny full tmpfs, again only
in the hook's mount namespace). Nothing outside the hook's process sees them,
and they end with it. The engine's policy under the same faults, with fakes,
is in tests/unit/test_engine.py.

A corrupt pending file (the state dir is input, not trusted) is the last case:
its read fails, and the tickle still runs.
"""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import time

import pytest

from tests.ns.scene import NFSRESET, VIPS, nft_tables

pytestmark = [pytest.mark.netns]

NO_NET_ADMIN = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"]
NO_NET_RAW = ["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw", "--"]


def libnftables() -> str:
    """The file behind libnftables.so.1 (what python3-nftables dlopen()s)."""
    found = sorted({os.path.realpath(p) for p in glob.glob("/usr/lib/*/libnftables.so.1")
                    + glob.glob("/usr/lib/libnftables.so.1")})
    assert found, "libnftables.so.1 not found: run setup.sh (nftables, python3-nftables)"
    return found[0]


def private_mounts(setup: str, path: str) -> list[str]:
    """Prefix: run the rest in a mount namespace of its own after `setup` (sh; the path is $0)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{setup} && exec "$@"', path]


def run_hook(scene, node: str, *args: str, wrap: list[str] = (), timeout: float = 30):
    """`ip netns exec NODE [wrap...] nfsreset ARGS`, as the resource agent runs it."""
    return subprocess.run(scene.topo.exec_argv(node, *wrap, NFSRESET, *args),
                          capture_output=True, text=True, timeout=timeout)


def no_traceback(res) -> None:
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr


def lines_with(stderr: str, text: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if text in ln]


def steps(res) -> dict:
    return {s["action"]: s for s in json.loads(res.stdout)["steps"]}


def departed(scene, vip: str, cport: int):
    """A client session whose VIP just moved node1 -> node2; node1 holds the stale socket."""
    scene.topo.add_addr("node1", vip, nodad=True)
    c = scene.connect(vip, cport)
    assert c.echo()
    scene.move(vip, "node1", "node2")
    assert scene.holds("node1", c)
    return c


# -- (a) nftables unavailable: the quarantine fails, the destroy still runs ----------------------
@pytest.mark.parametrize("fam", [4, 6])
def test_kill_without_libnftables_still_destroys(scene, fam):
    vip = VIPS[fam][0]
    c = departed(scene, vip, 46001 + fam)
    hide = private_mounts('mount --bind /dev/null "$0"', libnftables())
    res = run_hook(scene, "node1", "kill", "--vip", vip, "--state-dir", scene.state, "--json", wrap=hide)
    print(res.stderr)
    no_traceback(res)
    assert res.returncode == 1, res.stderr
    assert not scene.holds("node1", c), "the quarantine failed, the destroy must run anyway"
    (line,) = lines_with(res.stderr, f"quarantine of {vip} failed")
    assert "libnftables" in line and line.endswith("going on without nftables"), line
    assert lines_with(res.stderr, f"destroyed 1 of 1 session(s) on {vip}")
    st = steps(res)
    assert "error" in st["quarantine"] and st["destroy"]["destroyed"] == 1 and "error" not in st["destroy"]
    assert json.loads(res.stdout)["failed"] == ["quarantine"]
    with open(scene.state_file(vip)) as f:
        assert json.load(f)["clients"] == [[2049, c.ip, c.cport]]
    assert nft_tables(scene.topo, "node1") == ""
    # v6: with no quarantine the destroy's RST leaves from the deleted address and
    # reaches the client (the thing the quarantine is for: reported, not hidden).
    if fam == 6:
        assert c.wait_dead(2.0) in ("ECONNRESET", "EOF")


# -- (b) sock_diag SOCK_DESTROY refused (no CAP_NET_ADMIN): down the ladder ----------------------
def test_kill_without_net_admin_defers_and_the_failback_ends_the_session_by_exact_rst(scene):
    """No CAP_NET_ADMIN: SOCK_DESTROY and nftables are both refused. At post-stop the
    exact RST needs the VIP here, so nothing can end the session now: it is deferred
    (exit 1, named). When the VIP comes back (failback), `tickle` without
    CAP_NET_ADMIN tries SOCK_DESTROY, is refused, and the exact RST ends it in the same run."""
    vip = VIPS[4][0]
    c = departed(scene, vip, 46101)
    res = run_hook(scene, "node1", "kill", "--vip", vip, "--state-dir", scene.state, "--json", wrap=NO_NET_ADMIN)
    print(res.stderr)
    no_traceback(res)
    assert res.returncode == 1, res.stderr
    (q,) = lines_with(res.stderr, f"quarantine of {vip} failed")
    assert "Operation not permitted" in q, q
    (d,) = lines_with(res.stderr, f"destroy of 1 session(s) on {vip} failed")
    assert "EPERM" in d and d.endswith("going on without SOCK_DESTROY"), d
    assert lines_with(res.stderr, "deferred 1 session(s)")
    last = res.stderr.strip().splitlines()[-1]
    assert "failed: quarantine, destroy" in last and c.endpoint in last, last
    assert "unavailable here: SOCK_DESTROY, nftables" in last, last
    doc = json.loads(res.stdout)
    assert doc["steps"][2]["failed"] == ["EPERM"] and set(doc["unavailable"]) == {"destroy", "nft"}
    assert scene.holds("node1", c), "nothing here could end it at post-stop"
    assert glob.glob(os.path.join(glob.escape(scene.state), f"{glob.escape(vip)}.pending.*.json"))

    scene.move(vip, "node2", "node1")       # failback: the stale socket meets its VIP again
    res = run_hook(scene, "node1", "tickle", "--vip", vip, "--state-dir", scene.state, "--json",
                   wrap=NO_NET_ADMIN)
    print(res.stderr)
    no_traceback(res)
    assert res.returncode == 1, res.stderr
    st = steps(res)
    assert st["destroy"]["failed"] == ["EPERM"] and "error" in st["destroy"]
    assert st["rst"]["reset"] == 1 and st["verify"] == {"action": "verify", "left": 0, "sessions": [], "by": "dump"}
    assert "lift-quarantine" in json.loads(res.stdout)["failed"]
    assert c.wait_dead(3.0) in ("ECONNRESET", "EOF"), "the old session must be over"
    assert glob.glob(os.path.join(glob.escape(scene.state), "*.pending.*")) == []


# -- (c) raw sockets refused (no CAP_NET_RAW): tickle reports and exits 1 ----------------------
def test_tickle_without_net_raw_reports_what_it_could_not_send(scene):
    vip = VIPS[4][0]
    c = departed(scene, vip, 46201)
    res = run_hook(scene, "node1", "kill", "--vip", vip, "--state-dir", scene.state)
    assert res.returncode == 0, res.stderr
    res = run_hook(scene, "node2", "tickle", "--vip", vip, "--state-dir", scene.state, "--json", wrap=NO_NET_RAW)
    print(res.stderr)
    no_traceback(res)
    assert res.returncode == 1, res.stderr
    (a,) = lines_with(res.stderr, f"announce of {vip} failed")
    assert "Operation not permitted" in a and a.endswith("going on without raw sockets"), a
    (t,) = lines_with(res.stderr, f"tickle of {vip} skipped")
    assert "raw sockets unavailable" in t, t
    doc = json.loads(res.stdout)
    assert doc["failed"] == ["announce", "tickle"] and doc["steps"][-1]["sent"] == 0
    assert "unavailable here: raw sockets" in res.stderr.strip().splitlines()[-1]
    # Nothing was sent: the client still waits on its dead session (what the tickle is for).
    assert c.wait_dead(0.3) is None


# -- (d) the state dir read-only or full: the record fails, the sessions still die ----------------
STATE_FAULTS = {
    "read-only": ('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"', "Read-only file system (EROFS)"),
    # 16 KiB of tmpfs, filled: the record's write() gets ENOSPC
    "full": ('mount -t tmpfs -o size=16k,mode=0700 nfsr-full "$0" && '
             '{ dd if=/dev/zero of="$0/fill" bs=4k count=64 2>/dev/null; true; }',
             "No space left on device (ENOSPC)"),
}


@pytest.mark.parametrize("fault", sorted(STATE_FAULTS))
def test_kill_with_a_state_dir_it_cannot_write_still_destroys(scene, fault):
    vip = VIPS[4][0]
    c = departed(scene, vip, 46301)
    os.mkdir(scene.state, 0o700)
    setup, why = STATE_FAULTS[fault]
    res = run_hook(scene, "node1", "kill", "--vip", vip, "--state-dir", scene.state, "--json",
                   wrap=private_mounts(setup, scene.state))
    print(res.stderr)
    no_traceback(res)
    assert res.returncode == 1, res.stderr
    (line,) = lines_with(res.stderr, "failed")[:1]
    assert line.startswith(f"nfsreset kill: record of 1 client tuple(s) of {vip} in {scene.state} failed: {why}"), line
    assert not scene.holds("node1", c), "the record failed, the destroy must run anyway"
    st = steps(res)
    assert st["record"]["error"].startswith(why) and st["destroy"]["destroyed"] == 1 and "quarantine" in st
    assert json.loads(res.stdout)["failed"] == ["record"]
    assert os.listdir(scene.state) == [], "the fault was private to the hook"


# -- (e) a corrupt pending file: reported, and the tickle still brings the client back ----------
def test_tickle_with_a_corrupt_pending_file_still_tickles(scene):
    vip = VIPS[4][0]
    c = departed(scene, vip, 46401)
    res = run_hook(scene, "node1", "kill", "--vip", vip, "--state-dir", scene.state)
    assert res.returncode == 0, res.stderr
    node2 = f"{socket.gethostname()}-{os.stat(os.path.join('/run/netns', scene.topo.ns('node2'))).st_ino}"
    path = scene.state_file(vip, f"pending.{node2}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b'{"format": 1, "pending": [[2049, "198.51')    # cut short, as by a full disk
    os.close(fd)
    started = time.monotonic()
    tickle = scene.popen("node2", "tickle", "--vip", vip, "--state-dir", scene.state, "--json",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        death = c.wait_dead(3.0)
        took = time.monotonic() - started
        assert death in ("ECONNRESET", "EOF") and took < 1.5, (death, took)
        c.connect()     # the NFS client reconnects from the same port, now to node2
        assert c.echo()
        out, err = tickle.communicate(timeout=15)
    finally:
        if tickle.poll() is None:
            tickle.kill()
            tickle.wait()
    print(err)
    assert "Traceback" not in err and tickle.returncode == 1, err
    (line,) = lines_with(err, f"reading the pending sessions of {vip} failed")
    assert path in line and line.endswith("going on"), line
    doc = json.loads(out)
    assert doc["failed"] == ["pending"] and "announce" in {s["action"] for s in doc["steps"]}
    assert [s["reconnected"] for s in doc["steps"] if s["action"] == "tickle"] == [[c.endpoint]]
