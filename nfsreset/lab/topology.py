"""Lab and test topology: two heads and a client on a bridge, all in namespaces.

Every namespace is created here and removed here. The bridge lives in a
namespace of its own so nothing touches the host's interfaces. Names carry the
creating pid (`nfsr-<pid>-<n>-node1`), so a later run can sweep what a killed
run left behind without disturbing runs that are still alive.

Addresses are documentation ranges only (RFC 5737 / RFC 3849):

    node1   198.51.100.1   2001:db8::1
    node2   198.51.100.2   2001:db8::2
    client  198.51.100.100 2001:db8::100
    VIPs    198.51.100.10  2001:db8::10   (and .11 / ::11, a second VIP)
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shlex
import subprocess
import time

NODES = ("node1", "node2", "client")
HOST_ADDRS = {
    "node1": ("198.51.100.1", "2001:db8::1"),
    "node2": ("198.51.100.2", "2001:db8::2"),
    "client": ("198.51.100.100", "2001:db8::100"),
}
VIP4, VIP6 = "198.51.100.10", "2001:db8::10"
VIP4_B, VIP6_B = "198.51.100.11", "2001:db8::11"
IFACE = "eth0"

_PREFIX_RE = re.compile(r"^nfsr-(\d+)-\d+-")
_counter = itertools.count()


class TopologyError(Exception):
    pass


def sh(*argv: str, check: bool = True, timeout: float = 20, input: str | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise TopologyError(f"{shlex.join(argv)}: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def kill_netns(name: str) -> None:
    """Kill every process in `name`, then delete it. Never raises."""
    pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
    for sig in (15, 9):
        for pid in pids:
            try:
                os.kill(int(pid), sig)
            except (ProcessLookupError, ValueError):
                pass
        if not pids:
            break
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(_pid_alive(int(p)) for p in pids):
            time.sleep(0.02)
    sh("ip", "netns", "del", name, check=False)


def sweep_orphans() -> list[str]:
    """Remove lab namespaces whose creating process is gone."""
    removed = []
    for name in list_netns():
        m = _PREFIX_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            kill_netns(name)
            removed.append(name)
    return removed


@dataclasses.dataclass
class Topology:
    """node1, node2 and client namespaces on one bridge (in a fourth namespace)."""
    prefix: str
    created: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def create(cls, tag: str = "") -> "Topology":
        sweep_orphans()
        prefix = f"nfsr-{os.getpid()}-{next(_counter)}{('-' + tag) if tag else ''}"
        topo = cls(prefix)
        try:
            topo._build()
        except BaseException:
            topo.destroy()
            raise
        return topo

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    @property
    def bridge_ns(self) -> str:
        return self.ns("br")

    def _add_ns(self, name: str) -> None:
        # Listed before it exists: a signal between the two would otherwise leak
        # it (kill_netns tolerates a name that was never created).
        self.created.append(name)
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        br = self.bridge_ns
        self._add_ns(br)
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        sh("ip", "-n", br, "link", "set", "br0", "up")
        for node in NODES:
            ns = self.ns(node)
            self._add_ns(ns)
            port = f"p-{node}"
            sh("ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name", IFACE, "netns", ns)
            sh("ip", "-n", br, "link", "set", port, "master", "br0", "up")
            v4, v6 = HOST_ADDRS[node]
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", IFACE)
            sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", IFACE, "nodad")
            sh("ip", "-n", ns, "link", "set", IFACE, "up")

    def destroy(self) -> None:
        for name in reversed(self.created):
            kill_netns(name)
        self.created.clear()

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    # -- running things inside -------------------------------------------------
    def exec_argv(self, node: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(node), *argv]

    def run(self, node: str, *argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
        return sh(*self.exec_argv(node, *argv), check=check, timeout=timeout)

    def popen(self, node: str, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.exec_argv(node, *argv), **kw)

    # -- addresses ---------------------------------------------------------------
    def add_addr(self, node: str, ip: str, nodad: bool = False) -> None:
        plen = "64" if ":" in ip else "24"
        extra = ["nodad"] if (nodad and ":" in ip) else []
        sh("ip", "-n", self.ns(node), "addr", "add", f"{ip}/{plen}", "dev", IFACE, *extra)

    def del_addr(self, node: str, ip: str) -> None:
        plen = "64" if ":" in ip else "24"
        sh("ip", "-n", self.ns(node), "addr", "del", f"{ip}/{plen}", "dev", IFACE)

    def has_addr(self, node: str, ip: str, usable: bool = True) -> bool:
        """Address configured (and, with usable, past DAD: not tentative)."""
        out = sh("ip", "-n", self.ns(node), "-o", "addr", "show", "dev", IFACE).stdout
        for line in out.splitlines():
            fields = line.split()
            if "inet" in fields or "inet6" in fields:
                i = fields.index("inet6") if "inet6" in fields else fields.index("inet")
                if fields[i + 1].split("/")[0] == ip:
                    return not (usable and "tentative" in fields)
        return False

    def wait_usable(self, node: str, ip: str, timeout: float = 5.0) -> float:
        """Wait until `ip` is usable on `node` (IPv6: DAD done). Returns when, monotonic."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.has_addr(node, ip):
                return time.monotonic()
            time.sleep(0.01)
        raise TopologyError(f"{ip} not usable on {node} after {timeout} s")
