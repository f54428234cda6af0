"""Many established connections for the benchmarks, held by a child in the client netns.

Shared by bench_kill.py and bench_watch.py (imported as a sibling script module).
"""
from __future__ import annotations

import os
import resource
import select
import socket
import time

from nfsreset.kernel import netns

PORT = 2049
SERVER, CLIENT = "node1", "client"
VIPS = {4: "198.51.100.10", 6: "2001:db8::10"}
# Extra client addresses (the client's own is .100 / ::100): source addresses
# vary as on a real NFS head with many clients.
CLIENT_ADDRS = {4: [f"198.51.100.{100 + i}" for i in range(8)],
                6: [f"2001:db8::{100 + i:x}" for i in range(8)]}
SETUP_TIMEOUT_S = 120


def raise_nofile(need: int) -> str | None:
    """Raise this process's soft RLIMIT_NOFILE to `need` (held sockets + slack);
    the reason it cannot, or None."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < need:
        return f"RLIMIT_NOFILE hard limit {hard} < {need} needed"
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return None


def accept_all(listener: socket.socket, held: list) -> None:
    while True:
        try:
            s, _ = listener.accept()
        except BlockingIOError:
            return
        held.append(s)


class ClientChild:
    """A forked child in the client netns holding n connections to VIP:2049.

    A child of its own because one process may not hold 2 x 10,000
    descriptors under this machine's hard RLIMIT_NOFILE (20,000). It writes
    "C" when all are connected and holds them until the pipe closes.
    """

    def __init__(self, ns: str, vip: str, addrs: list[str], n: int) -> None:
        r_cmd, self.w_cmd = os.pipe()
        self.r_out, w_out = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(self.w_cmd)
                os.close(self.r_out)
                code = _client_main(ns, vip, addrs, n, r_cmd, w_out)
            finally:
                os._exit(code)
        os.close(r_cmd)
        os.close(w_out)
        self._ready = False

    def failed(self) -> bool:
        r, _, _ = select.select([self.r_out], [], [], 0)
        if r and not self._ready:
            self._ready = os.read(self.r_out, 1) == b"C"
            return not self._ready
        return False

    def wait_ready(self) -> None:
        if self._ready:
            return
        r, _, _ = select.select([self.r_out], [], [], SETUP_TIMEOUT_S)
        if not r or os.read(self.r_out, 1) != b"C":
            raise RuntimeError("client child failed to connect")
        self._ready = True

    def finish(self) -> None:
        for fd in (self.w_cmd, self.r_out):
            try:
                os.close(fd)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return
            time.sleep(0.01)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)


def _client_main(ns: str, vip: str, addrs: list[str], n: int, cmd_r: int, out_w: int) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 500), hard))
    netns.enter_for_good(ns)
    fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
    socks = []
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    for i in range(n):
        c = socket.socket(fam, socket.SOCK_STREAM)
        c.setsockopt(socket.IPPROTO_IP, 24, 1)     # IP_BIND_ADDRESS_NO_PORT: the port is picked per 4-tuple
        c.bind((addrs[i % len(addrs)], 0))
        c.settimeout(5)
        c.connect((vip, PORT))
        socks.append(c)
        if time.monotonic() > deadline:
            return 1
    os.write(out_w, b"C")
    os.read(cmd_r, 1)           # returns b"" when the parent closes the pipe
    for c in socks:
        c.close()
    return 0
