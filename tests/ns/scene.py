"""The scene shared by the command tests (tests/ns/test_cli_*.py, test_watch.py),
and the "lab on NFS-Ganesha" helpers the recovery tests share (at the end).

An nfsd-like echo server in node1 and node2 (listens on the wildcard
addresses, keeps every accepted socket whatever happens to the address), and
client sockets made in the test process inside the client namespace (a socket
keeps the namespace it was created in) from a fixed source port, so every
4-tuple is known. The `scene` fixture lives in tests/ns/conftest.py.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time

import pytest

from nfsreset.kernel import netns
from nfsreset.lab.topology import HOST_ADDRS, VIP4, VIP4_B, VIP6, VIP6_B
from nfsreset.core.model import format_endpoint, norm_ip

NFSRESET = os.path.join(os.path.dirname(sys.executable), "nfsreset")
NFS_PORT = 2049
VIPS = {4: (VIP4, VIP4_B), 6: (VIP6, VIP6_B)}


def wait_until(cond, timeout: float, step: float = 0.02) -> float | None:
    """Seconds until cond() held, or None (bounded)."""
    start = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(step)


def wait_for(cond, timeout: float = 5.0, step: float = 0.02) -> bool:
    """Whether cond() held within timeout s."""
    return wait_until(cond, timeout, step) is not None


# -- the scene ------------------------------------------------------------------------------
def client_ip(vip: str) -> str:
    return HOST_ADDRS["client"][1 if ":" in vip else 0]


class EchoServer:
    """Like nfsd or NFS-Ganesha as far as the network goes: listens on [::]:2049
    (v6only) and 0.0.0.0:2049, never closes a socket because its address went
    away; closes only on EOF or an error (a destroyed socket reads ECONNABORTED)."""

    def __init__(self, ns: str, port: int = NFS_PORT):
        self.sel = selectors.DefaultSelector()
        with netns.entered(ns):
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for s, host in ((v6, "::"), (v4, "0.0.0.0")):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(64)
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ, "listen")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name=f"echo-{ns}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.sel.select(timeout=0.05):
                s = key.fileobj
                if key.data == "listen":
                    try:
                        conn, _ = s.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    self.sel.register(conn, selectors.EVENT_READ, "conn")
                    continue
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    try:
                        s.send(data)   # a few bytes: fits the send buffer
                    except OSError:
                        pass
                else:
                    self.sel.unregister(s)
                    s.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


class Client:
    """One client TCP connection from a fixed source port, like the NFS client's
    reserved port: it reconnects from the same port."""

    def __init__(self, ns: str, vip: str, cport: int):
        self.ns, self.vip, self.cport = ns, vip, cport
        self.ip = client_ip(vip)
        self.sock: socket.socket | None = None
        self.connect()

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.ip, self.cport)

    def connect(self, timeout: float = 3.0) -> None:
        self.close()
        fam = socket.AF_INET6 if ":" in self.vip else socket.AF_INET
        with netns.entered(self.ns):
            s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.ip, self.cport))
            s.settimeout(timeout)
            s.connect((self.vip, NFS_PORT))
        except BaseException:
            s.close()
            raise
        self.sock = s

    def echo(self, payload: bytes = b"ping\n", timeout: float = 2.0) -> bool:
        """One round trip on the current connection; False if it failed in any way."""
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = self.sock.recv(len(payload) - len(got))
                if not chunk:
                    return False
                got += chunk
            return got == payload
        except OSError:
            return False

    def send(self, payload: bytes = b"data\n") -> None:
        self.sock.sendall(payload)

    def wait_dead(self, timeout: float) -> str | None:
        """Block until the connection dies: 'ECONNRESET', 'EOF' or another errno
        name; None if it is still alive after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                return None
            except OSError as e:
                return errno.errorcode.get(e.errno, str(e.errno))
            if not data:
                return "EOF"

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def vip_sockets(topo, node: str, vip: str, port: int = NFS_PORT) -> list[tuple[str, str, int]]:
    """(state, client ip, client port) of every non-LISTEN socket on vip:port in
    `node`, as `ss` (not nfsreset) sees them."""
    rows = []
    for line in topo.run(node, "ss", "-tanH").stdout.splitlines():
        f = line.split()
        if len(f) < 5 or f[0] == "LISTEN":
            continue
        (lhost, _, lport), (phost, _, pport) = f[3].rpartition(":"), f[4].rpartition(":")
        try:
            if norm_ip(lhost.split("%")[0]) == vip and int(lport) == port:
                rows.append((f[0], norm_ip(phost.split("%")[0]), int(pport)))
        except ValueError:
            continue
    return rows


def nft_tables(topo, node: str) -> str:
    return topo.run(node, "nft", "list", "tables").stdout.strip()


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


class Scene:
    """Servers on both heads, clients, a state dir, and nfsreset run inside a node."""

    def __init__(self, topo, tmp_path):
        self.topo = topo
        self.state = str(tmp_path / "state")
        self.servers = []
        self.clients: list[Client] = []
        for node in ("node1", "node2"):
            self.servers.append(EchoServer(topo.ns(node)))

    def connect(self, vip: str, cport: int) -> Client:
        c = Client(self.topo.ns("client"), vip, cport)
        self.clients.append(c)
        return c

    def nfsreset(self, node: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.topo.run(node, NFSRESET, *args, check=False, timeout=timeout)

    def popen(self, node: str, *args: str, **kw) -> subprocess.Popen:
        return self.topo.popen(node, NFSRESET, *args, text=True, **kw)

    def sockets(self, node: str, vip: str) -> list[tuple[str, str, int]]:
        return vip_sockets(self.topo, node, vip)

    def holds(self, node: str, client: Client, vip: str | None = None) -> bool:
        return any((ip, p) == (client.ip, client.cport) for _, ip, p in self.sockets(node, vip or client.vip))

    def move(self, vip: str, old: str, new: str) -> None:
        """IPaddr2 stop on `old`, start on `new` (no DAD wait: not the point here)."""
        self.topo.del_addr(old, vip)
        self.topo.add_addr(new, vip, nodad=True)

    def state_file(self, vip: str, kind: str = "clients") -> str:
        return os.path.join(self.state, f"{vip}.{kind}.json")

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for s in self.servers:
            s.close()


# -- the lab on NFS-Ganesha -----------------------------------------------------------------
# The recovery tests (test_lab*.py, test_watch_moves.py, test_ocf_agent.py) each run at
# least one case against real NFS-Ganesha heads with the lab's NFS client; these are the
# pieces they share. setup.sh installs the packages; without them those cases skip.
def _ganesha_missing() -> str | None:
    from nfsreset.lab.ganesha import available
    return available()


GANESHA_MISSING = _ganesha_missing()
needs_ganesha = pytest.mark.skipif(GANESHA_MISSING is not None, reason=f"NFS-Ganesha: {GANESHA_MISSING}")


def ganesha_args(vers: str) -> list[str]:
    """`nfsreset lab` options for real Ganesha heads and a client speaking NFSv`vers`."""
    return ["--server", "ganesha", "--vers", vers]


def pids_in_netns(ns: str) -> set[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout
    return {int(p) for p in out.split()}


def comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def ganesha_pids(namespaces) -> set[int]:
    """ganesha.nfsd and rpcbind processes in these network namespaces (ours only: other
    tests on the machine may run heads of their own)."""
    return {p for ns in namespaces for p in pids_in_netns(ns) if comm(p) in ("ganesha.nfsd", "rpcbind")}


def alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def host_head_mounts() -> list[str]:
    """A head's private tmpfs (ganesha.py names them) seen from the host: must be none."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if "nfsreset-run" in line or "nfsreset-nfs" in line]


def lab_leftovers(pid: int) -> list[str]:
    """What the Pacemaker lab run by process `pid` left: its namespaces, the
    processes carrying its NFSRESET_LAB marker, its nodes' tmpfs mounts."""
    from nfsreset.lab.topology import list_netns
    left = [f"netns {n}" for n in list_netns() if n.startswith(f"nfsr-{pid}-")]
    marker = f"NFSRESET_LAB={pid}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        left.append(f"process {entry}")
            except OSError:
                pass
    with open("/proc/self/mounts") as f:
        left += [f"mount {line.split()[0]}" for line in f if line.startswith(("nfsr-run ", "nfsr-shm "))]
    return left


@contextlib.contextmanager
def ganesha_heads(topo, tmp_path, nodes=("node1", "node2")):
    """rpcbind + NFS-Ganesha on `nodes` (as `nfsreset lab --server ganesha` runs them),
    exporting one directory; yields (heads, export_dir). Afterwards no process of
    theirs and no mount of theirs is left, even when the test failed."""
    from nfsreset.lab import ganesha

    workdir = tmp_path / "ganesha"
    export = workdir / "export"
    export.mkdir(parents=True)
    heads = ganesha.start_heads(topo, str(workdir), str(export), nodes=nodes)
    pids = ganesha_pids(topo.ns(n) for n in nodes)
    try:
        yield heads, str(export)
    finally:
        for h in heads:
            h.stop()
    assert wait_for(lambda: not any(alive(p) for p in pids), 5.0), [p for p in pids if alive(p)]
    assert host_head_mounts() == []


def nfs_client(topo, vip: str, vers: str, export_dir: str, duration: float = 60.0) -> subprocess.Popen:
    """The lab's NFS client (reserved port kept across reconnects, 180 s user timeout)
    talking NFSv`vers` to `vip`; JSON lines on stdout (read them with run.ClientLog)."""
    return topo.popen("client", sys.executable, "-m", "nfsreset.lab.client", "--server", vip,
                      "--port", str(NFS_PORT), "--vers", vers, "--export", export_dir,
                      "--duration", f"{duration:g}", stdout=subprocess.PIPE,
                      stderr=subprocess.DEVNULL, text=True, bufsize=1)
