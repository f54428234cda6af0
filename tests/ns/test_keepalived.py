"""Real keepalived moving the lab's VIPs, with the nfsreset-notify script as the
Debian package installs it.

keepalived (Debian's) runs VRRP on node1 and node2 over the lab bridge, one
instance for 198.51.100.10 and one for 2001:db8::10 (unicast peers, the
nodes' own documentation addresses), each with its own config, pid files and
log under tmp_path. node1 has priority 150, node2 100; a track_file lowers
node1 by 100 (failover to node2) and raises it back (failback, node1
preempts). An nfsd-like lab server runs on both nodes, a Linux-NFS-like lab
client talks to each VIP, and `ip monitor` times the address changes.

The main case runs the package: the .deb (built by packaging/build-deb.sh
when dist/ has none up to date) is unpacked with dpkg-deb -x, and each
keepalived runs in a mount namespace of its own where that tree is overlaid
on /usr (read-only overlayfs; gone with the processes, the host's /usr is
never written). So keepalived calls /usr/sbin/nfsreset-notify with no
--nfsreset, the script its default /usr/bin/nfsreset, and that runs on
/usr/bin/python3 with Debian's python3-pyroute2 and python3-typer, as on a
head after `apt install`; the script's environment is systemd's PATH alone,
as under keepalived.service (no venv). A second case (slow) runs the checkout's
cli/keepalived/nfsreset-notify with the venv's nfsreset, the development path.

With the notify script calling the real nfsreset, the old MASTER's BACKUP
transition runs `nfsreset kill --moment post-stop` (its session on the VIP is
destroyed and the client recorded), the new MASTER's runs `nfsreset tickle`:
on failback the client is back within 0.5 s of node1 holding the VIP. The
same scene without the notify script is the baseline: node1 keeps the stale
session and the failback stalls past the cap (until the client's 180 s user
timeout in real life).

VRRP runs version 3 with advert_int 0.5 s: only how soon an election ends,
which the stall does not count (it is measured from the address change).
~12 s per case (plus ~8 s once when the package has to be built).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from nfsreset.lab import report
from nfsreset.lab.mover_ocf import AddrMonitor
from nfsreset.lab.run import ClientLog
from nfsreset.lab.topology import HOST_ADDRS, VIP4, VIP6
from tests import debpkg
from tests.ns.scene import wait_for

pytestmark = pytest.mark.netns

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTIFY = ROOT / "cli" / "keepalived" / "nfsreset-notify"
NFSRESET = pathlib.Path(sys.executable).parent / "nfsreset"
KEEPALIVED = shutil.which("keepalived")
VIPS = (VIP4, VIP6)
CAP = 4.0                 # baseline failback: no reply within this = stalled
ELECTION_TIMEOUT = 8.0    # an election with advert_int 0.5 ends within ~2 s
# The package's tree over the host's /usr, for the command after it only (the
# mount namespace is private: nothing propagates back to the host).
OVERLAY = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           'mount -t overlay nfsreset-pkg -o "lowerdir=$0:/usr" /usr && exec "$@"']
# The environment keepalived's scripts see on a head: systemd's PATH, no venv.
HEAD_ENV = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]

if KEEPALIVED is None:
    pytest.skip("keepalived not installed (apt-get install keepalived)", allow_module_level=True)


@pytest.fixture(scope="module")
def package_usr(tmp_path_factory) -> pathlib.Path:
    """The built .deb's /usr, unpacked; checked to be what runs under OVERLAY."""
    usr = debpkg.unpack(debpkg.built_deb(), tmp_path_factory.mktemp("deb")) / "usr"
    # What the package's postinst does (py3compile): hooks start from .pyc.
    subprocess.run(["/usr/bin/python3", "-m", "compileall", "-q", str(usr / "lib" / "python3" / "dist-packages")],
                   check=True, capture_output=True, timeout=120)
    # The packaged script is the checkout's with its nfsreset pointed at /usr/bin.
    packaged = (usr / "sbin" / "nfsreset-notify").read_text().splitlines()
    checkout = NOTIFY.read_text().splitlines()
    assert [(a, b) for a, b in zip(packaged, checkout) if a != b] == [("NFSRESET=/usr/bin/nfsreset", "NFSRESET=nfsreset")]
    assert len(packaged) == len(checkout)
    probe = ("import sys, nfsreset, pyroute2, typer; "
             "print(sys.executable, nfsreset.__file__, pyroute2.__file__, typer.__file__)")
    res = subprocess.run([*OVERLAY, str(usr), *HEAD_ENV, "sh", "-c",
                          'head -n 1 /usr/bin/nfsreset && exec /usr/bin/python3 -c "$0"', probe],
                         capture_output=True, text=True, timeout=30, cwd="/")   # -c puts cwd on sys.path
    assert res.returncode == 0, res.stderr
    shebang, found = res.stdout.splitlines()
    assert shebang == "#!/usr/bin/python3"
    # The package's nfsreset, Debian's pyroute2 and typer (setup.sh installs
    # python3-pyroute2; the host has no nfsreset of its own in /usr).
    assert found.split() == ["/usr/bin/python3", "/usr/lib/python3/dist-packages/nfsreset/__init__.py",
                             "/usr/lib/python3/dist-packages/pyroute2/__init__.py",
                             "/usr/lib/python3/dist-packages/typer/__init__.py"], res.stdout
    return usr


def config(tmp: pathlib.Path, node: str, peer: str, priority: int, notify: bool,
           nfsreset: pathlib.Path | None) -> str:
    """keepalived.conf for `node`: one VRRP instance per family, both tracking one file."""
    def instance(name: str, vrid: int, vip: str, plen: int, me: str, other: str) -> str:
        lines = [
            f"vrrp_instance {name} {{",
            "    state BACKUP",
            "    interface eth0",
            f"    virtual_router_id {vrid}",
            f"    priority {priority}",
            "    advert_int 0.5",
            *(["    native_ipv6"] if ":" in vip else []),
            f"    unicast_src_ip {me}",
            f"    unicast_peer {{\n        {other}\n    }}",
            f"    virtual_ipaddress {{\n        {vip}/{plen} dev eth0\n    }}",
            "    track_file {\n        prio\n    }",
        ]
        if notify:
            # nfsreset None: the script's own default (the package's /usr/bin/nfsreset)
            binary = f" --nfsreset {nfsreset}" if nfsreset else ""
            lines.append(f'    notify "{tmp}/notify-{node} --vip {vip} --port 2049 '
                         f'--state-dir {tmp}/state{binary}" root')
        return "\n".join(lines + ["}"])

    (v4, v6), (p4, p6) = HOST_ADDRS[node], HOST_ADDRS[peer]
    return "\n".join([
        "global_defs {",
        f"    router_id {node}",
        "    script_user root",
        "    vrrp_version 3",
        "}",
        "track_file prio {",
        f'    file "{tmp}/prio-{node}"',
        "    weight 1",
        "    init_file 0 overwrite",
        "}",
        instance("nfs4", 51, VIP4, 24, v4, p4),
        instance("nfs6", 52, VIP6, 64, v6, p6),
    ]) + "\n"


class Cluster:
    """keepalived on node1 (priority 150) and node2 (100), an nfsd-like server on
    both, a client per VIP; stop() ends every process it started. With
    `package` (the unpacked .deb's /usr), keepalived and its scripts see it
    as /usr; else the checkout's script and the venv's nfsreset run."""

    def __init__(self, topo, tmp: pathlib.Path, notify: bool, package: pathlib.Path | None = None) -> None:
        self.topo, self.tmp = topo, tmp
        (tmp / "state").mkdir(mode=0o700)
        self.monitor = {vip: AddrMonitor(topo, ("node1", "node2"), vip) for vip in VIPS}
        self.procs: list[subprocess.Popen] = []
        self.keepalived: dict[str, subprocess.Popen] = {}
        self.clients: dict[str, ClientLog] = {}
        for node in ("node1", "node2"):
            self._spawn(node, sys.executable, "-m", "nfsreset.lab.server", "--duration", "90",
                        stdout=subprocess.DEVNULL)
        for node, peer, prio in (("node1", "node2", 150), ("node2", "node1", 100)):
            # The real script; the wrapper only keeps its stderr, which
            # keepalived would send to /dev/null.
            wrapper = tmp / f"notify-{node}"
            if package:
                script = f'exec {" ".join(HEAD_ENV)} /usr/sbin/nfsreset-notify'
            else:
                script = f"exec {NOTIFY}"
            wrapper.write_text(f'#!/bin/sh\n{script} "$@" 2>>{tmp}/notify-{node}.log\n')
            wrapper.chmod(0o755)
            conf = tmp / f"{node}.conf"
            conf.write_text(config(tmp, node, peer, prio, notify, None if package else NFSRESET))
            prefix = [*OVERLAY, str(package)] if package else []
            with open(tmp / f"keepalived-{node}.log", "w") as log:
                self.keepalived[node] = self._spawn(
                    node, *prefix, KEEPALIVED, "--dont-fork", "--log-console", "--log-detail", "--no-syslog",
                    "--vrrp", "--use-file", str(conf), "--pid", str(tmp / f"{node}.pid"),
                    "--vrrp_pid", str(tmp / f"{node}-vrrp.pid"), stdout=log, stderr=subprocess.STDOUT,
                    cwd="/")   # as under systemd: not the checkout

    def _spawn(self, node: str, *argv: str, **kw) -> subprocess.Popen:
        proc = self.topo.popen(node, *argv, **kw)
        self.procs.append(proc)
        return proc

    def wait_owner(self, node: str, after: float) -> dict[str, float]:
        """When each VIP became usable on `node` (at or after `after`)."""
        got = {vip: self.monitor[vip].first(node, ("usable",), after, ELECTION_TIMEOUT) for vip in VIPS}
        missing = [vip for vip, t in got.items() if t is None]
        assert not missing, f"{missing} never came up on {node}: {self.log(node)[-1500:]}"
        return got

    def start_clients(self) -> None:
        for vip in VIPS:
            proc = self._spawn("client", sys.executable, "-m", "nfsreset.lab.client", "--server", vip,
                               "--duration", "60", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, bufsize=1)
            self.clients[vip] = ClientLog(proc)
        deadline = time.monotonic() + 10
        while not all(c.first_reply_after(0) for c in self.clients.values()):
            assert time.monotonic() < deadline, "a client got no reply from its VIP"
            time.sleep(0.05)

    def set_priority_offset(self, node: str, value: int) -> float:
        t = time.monotonic()
        tmp = self.tmp / f"prio-{node}.new"
        tmp.write_text(f"{value}\n")
        tmp.rename(self.tmp / f"prio-{node}")   # keepalived reads it on inotify: whole, never half-written
        return t

    def move(self, old: str, new: str, offset: int) -> dict[str, tuple]:
        """Change node1's priority; per VIP (recovered, stall, usable->1st reply, t_usable)."""
        t = self.set_priority_offset("node1", offset)
        usable = self.wait_owner(new, t)
        out = {}
        for vip in VIPS:
            deleted = self.monitor[vip].first(old, ("deleted",), t, ELECTION_TIMEOUT)
            assert deleted is not None, f"{vip} never left {old}"
            # VRRP adds on the new MASTER and deletes on the old one within ms of
            # each other, in either order: the window spans both.
            t_gone, t_here = min(deleted, usable[vip]), max(deleted, usable[vip])
            out[vip] = (t_gone, t_here)
        deadline = time.monotonic() + CAP + 1
        while time.monotonic() < deadline and not all(
                self.clients[vip].first_reply_after(t_here) for vip, (_, t_here) in out.items()):
            time.sleep(0.05)
        time.sleep(0.5)      # settle: the client's and the scripts' last words
        return {vip: (*report.measure(self.clients[vip].replies(), t_gone, t_here, CAP), t_here)
                for vip, (t_gone, t_here) in out.items()}

    def log(self, node: str) -> str:
        return (self.tmp / f"keepalived-{node}.log").read_text(errors="replace")

    def notify_log(self, node: str) -> str:
        path = self.tmp / f"notify-{node}.log"
        return path.read_text() if path.exists() else ""

    def ours(self) -> list[int]:
        """keepalived processes (any node) started with one of our config files."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"keepalived" in cmd and str(self.tmp).encode() in cmd:
                found.append(int(pid))
        return found

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for monitor in self.monitor.values():
            monitor.close()


@pytest.fixture
def cluster_factory(topo, tmp_path):
    made: list[Cluster] = []

    def make(notify: bool, package: pathlib.Path | None = None) -> Cluster:
        made.append(Cluster(topo, tmp_path, notify, package))
        return made[-1]

    try:
        yield make
    finally:
        for c in made:
            c.stop()
        # keepalived is gone, its VRRP child too, before the namespaces are
        for c in made:
            deadline = time.monotonic() + 5
            while c.ours() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.ours() == [], "keepalived left running"


def run_scene(cluster: Cluster) -> tuple[dict, dict]:
    cluster.wait_owner("node1", 0.0)
    cluster.start_clients()
    time.sleep(1.0)
    failover = cluster.move("node1", "node2", -100)
    failback = cluster.move("node2", "node1", 0)
    return failover, failback


@pytest.mark.parametrize("install", ["package", pytest.param("checkout", marks=pytest.mark.slow)])
def test_failback_is_fast_with_the_notify_script(cluster_factory, request, install):
    package = request.getfixturevalue("package_usr") if install == "package" else None
    cluster = cluster_factory(notify=True, package=package)
    failover, failback = run_scene(cluster)
    # The failback tickle's line is written when the tickle exits, which may be
    # after the client's first reply (it repeats for a while): wait for it, the
    # second MASTER line per VIP on node1 (the first is from the initial election).
    assert wait_for(lambda: all(cluster.notify_log("node1").count(f"MASTER: nfsreset tickle {vip}: ") >= 2
                                for vip in VIPS), timeout=8.0), cluster.notify_log("node1")
    node1, node2 = cluster.notify_log("node1"), cluster.notify_log("node2")
    for vip in VIPS:
        print(f"keepalived+notify ({install}) {vip}: failover {failover[vip][:3]} failback {failback[vip][:3]}")
    for vip in VIPS:
        recovered, stall, to_reply, _ = failback[vip]
        assert recovered, (vip, failback[vip], cluster.log("node1")[-1500:])
        assert to_reply <= 0.5, (vip, failback[vip])
        assert stall <= 1.0, (vip, failback[vip])
        assert failover[vip][0], (vip, failover[vip])
        # node1's BACKUP transition destroyed the client's session on the VIP ...
        assert f"BACKUP: nfsreset kill {vip}: rc=0 nfsreset kill: destroyed 1 of 1" in node1, node1
        # ... and its MASTER transition tickled the client recorded then, or found it
        # already back on its own (its tuple live here: a tickle would only disturb it)
        assert (f"MASTER: nfsreset tickle {vip}: rc=0 nfsreset tickle: tickled 1 client" in node1
                or f"MASTER: nfsreset tickle {vip}: rc=0 nfsreset tickle: 1 known client tuple(s) of {vip} "
                   "already reconnected here" in node1), node1
    assert "timed out" not in node1 + node2


@pytest.mark.slow
def test_failback_stalls_without_it(cluster_factory):
    """The baseline: same scene, no notify script; node1's stale session eats the failback."""
    cluster = cluster_factory(notify=False)
    failover, failback = run_scene(cluster)
    for vip in VIPS:
        print(f"keepalived alone {vip}: failover {failover[vip][:3]} failback {failback[vip][:3]}")
        assert failover[vip][0], (vip, failover[vip])
        assert failback[vip][0] is False, (vip, failback[vip])
        stale = [line for line in cluster.topo.run("node1", "ss", "-tanH", "state", "established").stdout.splitlines()
                 if ":2049" in line and (vip in line)]
        assert stale, f"node1 should still hold the client's session on {vip}"
