"""NFS-Ganesha heads for the lab: rpcbind + ganesha.nfsd on node1 and node2.

Each head runs in the node's network namespace plus a mount and PID namespace
of its own (`unshare --mount --pid --fork --mount-proc --propagation
private`), with a private tmpfs over /run and /var/lib/nfs: Ganesha keeps its
pid file, rpcbind's socket and the NFSv4 recovery state there, and two
instances must not share them. Both heads export the same lab directory (the
"shared disk"), so an NFSv3 file handle from one head works on the other.

The namespace's init is a shell that starts rpcbind (Ganesha will not
register NFSv3 without it), waits for its socket, then starts Ganesha and
waits. `unshare --kill-child` gives that init SIGKILL when unshare dies, and
the kernel kills everything in a PID namespace whose init died; the mount
namespace (and with it both tmpfs) goes with its last process. So stopping a
head is: SIGKILL to that init, wait for unshare. Nothing is mounted on the
host.

Ganesha listens on the wildcard, dual stack: IPv4 clients show in ss as
[::ffff:a.b.c.d], and it answers on the VIP wherever the VIP is.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time

from nfsreset.lab.topology import Topology

NFS_PORT, MOUNT_PORT = 2049, 20048
PSEUDO = "/export"
# Short grace and lease: a lab run must not wait out the 90 s defaults.
GRACE_S = LEASE_S = 5


class GaneshaError(Exception):
    pass


def available() -> str | None:
    """None if the packages are there, else what is missing (one line)."""
    missing = [b for b in ("ganesha.nfsd", "rpcbind", "unshare") if shutil.which(b) is None]
    if missing:
        return (f"{', '.join(missing)} not found; install nfs-ganesha nfs-ganesha-vfs rpcbind "
                "(bash setup.sh does)")
    return None


def config(export_dir: str) -> str:
    """ganesha.conf for one head: NFSv3 and v4 over TCP only, no NLM/RQUOTA."""
    return f"""\
NFS_CORE_PARAM {{
    Protocols = 3, 4;
    NFS_Port = {NFS_PORT};
    MNT_Port = {MOUNT_PORT};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}}
NFSV4 {{
    RecoveryBackend = fs;
    Grace_Period = {GRACE_S};
    Lease_Lifetime = {LEASE_S};
}}
NFS_KRB5 {{
    Active_krb5 = false;
}}
EXPORT {{
    Export_Id = 1;
    Path = {export_dir};
    Pseudo = {PSEUDO};
    Access_Type = RW;
    Squash = No_Root_Squash;
    Protocols = 3, 4;
    Transports = TCP;
    SecType = sys;
    FSAL {{
        Name = VFS;
    }}
}}
"""


# The init of the head's PID namespace. Every wait is bounded.
_INIT = r"""
set -eu
mount -t tmpfs -o mode=0755,size=16m nfsreset-run /run
mount -t tmpfs -o mode=0755,size=16m nfsreset-nfs /var/lib/nfs
mkdir -p /run/rpcbind /run/ganesha /var/lib/nfs/ganesha
chown _rpc /run/rpcbind 2>/dev/null || true
rpcbind -f &
i=0
while [ ! -S /run/rpcbind.sock ]; do
    i=$((i + 1)); [ "$i" -le 200 ] || { echo "rpcbind did not start" >&2; exit 1; }
    sleep 0.01
done
ganesha.nfsd -F -f "$1" -L "$2" -p /run/ganesha/ganesha.pid -N NIV_EVENT &
wait
"""


class Head:
    """One running head; stop() leaves nothing behind."""

    def __init__(self, topo: Topology, node: str, proc: subprocess.Popen, log: str) -> None:
        self.topo, self.node, self.proc, self.log = topo, node, proc, log

    def init_pid(self) -> int | None:
        """Host pid of the namespace's init (unshare's only child)."""
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                kids = f.read().split()
        except OSError:
            return None
        return int(kids[0]) if kids else None

    def listening(self) -> bool:
        out = self.topo.run(self.node, "ss", "-tlnH", check=False, timeout=5).stdout
        ports = {line.split()[3].rsplit(":", 1)[-1] for line in out.splitlines() if len(line.split()) > 3}
        return {str(NFS_PORT), str(MOUNT_PORT)} <= ports

    def stop(self, timeout: float = 5.0) -> None:
        # SIGKILL to the namespace's init ends every process in it at once (the
        # kernel's rule for a PID namespace); unshare then exits with its child.
        # unshare itself ignores SIGTERM while it waits for the child, so if the
        # init is not known yet it gets SIGKILL, and --kill-child does the rest.
        init = self.init_pid()
        if init is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)
        elif self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        if init is not None:
            deadline = time.monotonic() + timeout
            while _alive(init) and time.monotonic() < deadline:
                time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start(topo: Topology, node: str, workdir: str, export_dir: str) -> Head:
    """Start rpcbind + Ganesha on `node`; returns at once (see wait_listening)."""
    conf = os.path.join(workdir, f"ganesha-{node}.conf")
    log = os.path.join(workdir, f"ganesha-{node}.log")
    with open(conf, "w") as f:
        f.write(config(export_dir))
    out = open(os.path.join(workdir, f"ganesha-{node}.out"), "w")
    try:
        proc = topo.popen(node, "unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
                          "--propagation", "private", "sh", "-c", _INIT, "nfsreset-head", conf, log,
                          stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()
    return Head(topo, node, proc, log)


def start_heads(topo: Topology, workdir: str, export_dir: str, nodes=("node1", "node2"),
                timeout: float = 15.0) -> list[Head]:
    """Start a head on each node and wait until all listen on 2049 and 20048.
    On failure every head started is stopped and GaneshaError says why."""
    heads: list[Head] = []
    try:
        for node in nodes:
            heads.append(start(topo, node, workdir, export_dir))
        deadline = time.monotonic() + timeout
        pending = list(heads)
        while pending:
            if time.monotonic() > deadline:
                raise GaneshaError(f"Ganesha not listening after {timeout:g} s on "
                                   + ", ".join(h.node for h in pending) + ": " + _tail(pending[0]))
            for h in pending:
                if h.proc.poll() is not None:
                    raise GaneshaError(f"Ganesha head on {h.node} exited: {_tail(h)}")
            pending = [h for h in pending if not h.listening()]
            if pending:
                time.sleep(0.03)
        return heads
    except BaseException:
        for h in heads:
            h.stop()
        raise


def _tail(head: Head) -> str:
    text = ""
    for path in (head.log, head.log[:-4] + ".out"):
        try:
            with open(path, errors="replace") as f:
                text += " ".join(line.strip() for line in f.readlines()[-3:]) + " "
        except OSError:
            pass
    return text.strip()[-400:]
