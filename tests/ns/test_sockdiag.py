"""sock_diag dump and destroy against the real kernel, in the lab namespaces.

node1 serves (VIP on its eth0), the client namespace connects over the
bridge; both ends are sockets of this process, created inside the namespaces
with netns.entered(). Every test ends its sockets in `finally` blocks and the
`topo` fixture removes the namespaces.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import resource
import select
import socket
import time

import pytest

from nfsreset.kernel import netns, sockdiag
from nfsreset.lab.topology import VIP4, VIP4_B, VIP6, VIP6_B

pytestmark = pytest.mark.netns

AF4, AF6 = socket.AF_INET, socket.AF_INET6


class Sockets:
    """Every socket a test makes, closed at the end whatever happens."""

    def __init__(self) -> None:
        self.all: list[socket.socket] = []

    def keep(self, s: socket.socket) -> socket.socket:
        self.all.append(s)
        return s

    def listen(self, host: str, port: int, family: int | None = None, dual_stack: bool = False) -> socket.socket:
        family = family or (AF6 if ":" in host else AF4)
        s = self.keep(socket.socket(family, socket.SOCK_STREAM))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == AF6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        s.bind((host, port))
        s.listen(4096)
        return s

    def connect(self, host: str, port: int) -> socket.socket:
        s = self.keep(socket.socket(AF6 if ":" in host else AF4, socket.SOCK_STREAM))
        s.settimeout(5)
        s.connect((host, port))
        return s

    def accept(self, listener: socket.socket) -> socket.socket:
        listener.settimeout(5)
        return self.keep(listener.accept()[0])

    def close(self) -> None:
        for s in self.all:
            s.close()
        self.all.clear()


@pytest.fixture
def socks():
    s = Sockets()
    try:
        yield s
    finally:
        s.close()


def connect_pair(topo, socks: Sockets, listener: socket.socket, vip: str, port: int):
    """(client socket, accepted server socket) for one connection client -> vip:port."""
    with netns.entered(topo.ns("client")):
        client = socks.connect(vip, port)
    return client, socks.accept(listener)


def died(sock: socket.socket, timeout: float = 3.0) -> str | None:
    """How the connection of `sock` ended ("ECONNRESET", "EOF", ...) or None if it is alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([sock], [], [], 0.05)[0]:
            try:
                data = sock.recv(1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as exc:
                return errno.errorcode.get(exc.errno, str(exc.errno))
            return "EOF" if data == b"" else "DATA"
    return None


# -- dump --------------------------------------------------------------------------

@pytest.mark.parametrize("vip, other_vip", [(VIP4, VIP4_B), (VIP6, VIP6_B)], ids=["v4", "v6"])
def test_dump_filters_by_local_address_and_port(topo, socks, vip, other_vip):
    for ip in (vip, other_vip):
        topo.add_addr("node1", ip, nodad=True)
    with netns.entered(topo.ns("node1")):
        wanted = socks.listen(vip, 2049)
        other_port = socks.listen(vip, 2050)
        other_addr = socks.listen(other_vip, 2049)
    client, server = connect_pair(topo, socks, wanted, vip, 2049)
    connect_pair(topo, socks, other_port, vip, 2050)
    connect_pair(topo, socks, other_addr, other_vip, 2049)

    with netns.entered(topo.ns("node1")):
        found = sockdiag.dump([vip], [2049])
        ns_inode = netns.current_inode()
        everything = sockdiag.dump(exclude_listen=False)
        listeners = sockdiag.dump([vip], [2049], states={"LISTEN"})
        both_ports = sockdiag.dump([vip], [2049, 2050])
    with netns.entered(topo.ns("node2")):
        elsewhere = sockdiag.dump([vip], [2049])

    assert len(found) == 1, found
    flow, sid = found[0]
    client_ip = "198.51.100.100" if ":" not in vip else "2001:db8::100"
    assert flow.key.vip == vip and flow.key.vport == 2049
    assert flow.key.client == client_ip and flow.key.cport == client.getsockname()[1]
    assert flow.state == "ESTABLISHED" and flow.netns == ns_inode
    assert flow.inode and flow.cookie == sid.cookie
    assert sid.family == (AF6 if ":" in vip else AF4) and (sid.sport, sid.dport) == (2049, flow.key.cport)
    # the unfiltered dump has the other two connections and the three listeners
    assert {(f.key.vip, f.key.vport, f.state) for f, _ in everything} >= {
        (vip, 2050, "ESTABLISHED"), (other_vip, 2049, "ESTABLISHED"), (vip, 2049, "LISTEN")}
    assert [f.state for f, _ in listeners] == ["LISTEN"]
    assert sorted(f.key.vport for f, _ in both_ports) == [2049, 2050]
    assert elsewhere == []                              # a sock_diag socket sees its own netns only


def test_dump_finds_dual_stack_sockets_by_v4_vip(topo, socks):
    """nfsd listens on [::]:2049: its v4 clients are AF_INET6 sockets with ::ffff: addresses."""
    topo.add_addr("node1", VIP4)
    topo.add_addr("node1", VIP4_B)
    topo.add_addr("node1", VIP6, nodad=True)
    with netns.entered(topo.ns("node1")):
        listener = socks.listen("::", 2049, dual_stack=True)
    c4, _ = connect_pair(topo, socks, listener, VIP4, 2049)
    connect_pair(topo, socks, listener, VIP4_B, 2049)
    connect_pair(topo, socks, listener, VIP6, 2049)

    with netns.entered(topo.ns("node1")):
        found = sockdiag.dump(VIP4, 2049)
        by_mapped_text = sockdiag.dump(["::ffff:" + VIP4], [2049])
        v6 = sockdiag.dump([VIP6], [2049])

    assert len(found) == 1, found
    flow, sid = found[0]
    assert flow.key.vip == VIP4 and flow.key.client == "198.51.100.100" and flow.key.cport == c4.getsockname()[1]
    assert sid.family == AF6 and sid.src == socket.inet_pton(AF6, "::ffff:" + VIP4)
    assert by_mapped_text == found
    assert [f.key.vip for f, _ in v6] == [VIP6]


# -- destroy -----------------------------------------------------------------------

@pytest.mark.parametrize("vip", [VIP4, VIP6], ids=["v4", "v6"])
def test_destroy_resets_the_client_while_vip_is_configured(topo, socks, vip):
    topo.add_addr("node1", vip, nodad=True)
    with netns.entered(topo.ns("node1")):
        listener = socks.listen(vip, 2049)
    client, server = connect_pair(topo, socks, listener, vip, 2049)
    keep_client, keep_server = connect_pair(topo, socks, listener, vip, 2049)

    with netns.entered(topo.ns("node1")):
        found = [(f, sid) for f, sid in sockdiag.dump([vip], [2049]) if f.key.cport == client.getsockname()[1]]
        res = sockdiag.destroy([sid for _, sid in found])
        left = {f.key.cport for f, _ in sockdiag.dump([vip], [2049])}

    assert len(found) == 1 and len(res.destroyed) == 1 and not res.gone and not res.failed, res
    assert died(client) in ("ECONNRESET", "EOF")
    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNABORTED
    assert left == {keep_client.getsockname()[1]}          # the other connection is untouched
    keep_server.sendall(b"x")
    assert keep_client.recv(1) == b"x"


@pytest.mark.parametrize("vip", [VIP4, VIP6], ids=["v4", "v6"])
def test_destroy_after_vip_was_deleted(topo, socks, vip):
    """The socket outlives its address; the kernel still finds it by 4-tuple."""
    topo.add_addr("node1", vip, nodad=True)
    with netns.entered(topo.ns("node1")):
        listener = socks.listen(vip, 2049)
    client, server = connect_pair(topo, socks, listener, vip, 2049)
    topo.del_addr("node1", vip)

    with netns.entered(topo.ns("node1")):
        before = sockdiag.dump([vip], [2049])
        res = sockdiag.destroy(sid for _, sid in before)
        after = sockdiag.dump([vip], [2049])

    assert [f.state for f, _ in before] == ["ESTABLISHED"]
    assert len(res.destroyed) == 1 and not res.failed, res
    assert after == []
    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNABORTED
    if ":" in vip:
        # Kernel quirk (docs/design.md §1): IPv6 still sends from a deleted address, so
        # the RST of the destroy reaches the client; IPv4 sends nothing.
        assert died(client) in ("ECONNRESET", "EOF")


def test_destroy_reports_gone_and_never_touches_a_reused_tuple(topo, socks):
    topo.add_addr("node1", VIP4)
    with netns.entered(topo.ns("node1")):
        listener = socks.listen(VIP4, 2049)
    client, server = connect_pair(topo, socks, listener, VIP4, 2049)
    with netns.entered(topo.ns("node1")):
        ((_, sid),) = sockdiag.dump([VIP4], [2049])
        # same 4-tuple, other cookie: what a destroy sees when the tuple was reused
        impostor = dataclasses.replace(sid, cookie=sid.cookie + 1)
        first = sockdiag.destroy([impostor])
        alive = sockdiag.dump([VIP4], [2049])
        second = sockdiag.destroy([sid])
        third = sockdiag.destroy([sid])
    assert first.gone == [impostor] and not first.destroyed, first
    assert len(alive) == 1
    assert second.destroyed == [sid]
    assert third.gone == [sid] and not third.destroyed


def test_destroy_time_wait_reports_what_the_kernel_says(topo, socks):
    topo.add_addr("node1", VIP4)
    with netns.entered(topo.ns("node1")):
        listener = socks.listen(VIP4, 2049)
    client, server = connect_pair(topo, socks, listener, VIP4, 2049)
    server.close()                       # server closes first: its side ends in TIME_WAIT
    assert died(client) == "EOF"
    client.close()
    with netns.entered(topo.ns("node1")):
        deadline = time.monotonic() + 3
        while not (tw := sockdiag.dump([VIP4], [2049], states={"TIME_WAIT"})) and time.monotonic() < deadline:
            time.sleep(0.02)
        res = sockdiag.destroy(sid for _, sid in tw)
        after = sockdiag.dump([VIP4], [2049], states={"TIME_WAIT"})
    assert [f.state for f, _ in tw] == ["TIME_WAIT"]
    # 6.x deschedules the timewait sock (tcp_abort); older kernels may refuse.
    if res.destroyed:
        assert after == []
    else:
        assert len(res.failed) == 1 and after, res


def test_destroy_a_thousand(topo, socks):
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n + 200
    if hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    try:
        topo.add_addr("node1", VIP4)
        with netns.entered(topo.ns("node1")):
            listener = socks.listen(VIP4, 2049)
        clients = []
        with netns.entered(topo.ns("client")):
            for i in range(n):
                clients.append(socks.connect(VIP4, 2049))
                if i % 200 == 199:
                    _accept_pending(socks, listener)
        _accept_pending(socks, listener)

        with netns.entered(topo.ns("node1")):
            found = sockdiag.dump([VIP4], [2049])
            t0 = time.monotonic()
            res = sockdiag.destroy((sid for _, sid in found), batch=128)   # several batches
            took = time.monotonic() - t0
            left = sockdiag.dump([VIP4], [2049])

        assert len(found) == n
        assert len(res.destroyed) == n and not res.gone and not res.failed, res
        assert left == []
        assert took < 2.0, f"destroying {n} sockets took {took:.2f} s"
        deadline = time.monotonic() + 5
        alive = clients
        while alive and time.monotonic() < deadline:
            alive = [c for c in alive if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != errno.ECONNRESET
                     and not _eof(c)]
            time.sleep(0.02)
        assert not alive, f"{len(alive)} clients still connected"
    finally:
        socks.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _accept_pending(socks: Sockets, listener: socket.socket) -> None:
    listener.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            socks.keep(listener.accept()[0])


def _eof(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_probe_destroy_works_here(topo):
    with netns.entered(topo.ns("node1")):
        ok, why = sockdiag.probe_destroy()
        leftovers = sockdiag.dump(["127.0.0.1", "::1"], exclude_listen=False)
    assert ok, why
    assert leftovers == []                   # the probe cleans up after itself


def test_destroy_survives_lost_acks(topo, socks, monkeypatch):
    """A receive buffer too small for a batch's acks: the kernel drops some
    (ENOBUFS); destroy() re-asks for those, and every socket is accounted for."""
    monkeypatch.setattr(sockdiag, "RCVBUF", 4096)
    n = 300
    topo.add_addr("node1", VIP4)
    with netns.entered(topo.ns("node1")):
        listener = socks.listen(VIP4, 2049)
    with netns.entered(topo.ns("client")):
        for _ in range(n):
            socks.connect(VIP4, 2049)
    with netns.entered(topo.ns("node1")):
        found = sockdiag.dump([VIP4], [2049])
        res = sockdiag.destroy((sid for _, sid in found), batch=n)
        left = sockdiag.dump([VIP4], [2049])
    assert len(found) == n
    assert not res.failed and left == []
    assert len(res.destroyed) + len(res.gone) == n
    assert res.gone, "expected lost acks with a 4 KiB receive buffer"
    assert set(res.destroyed + res.gone) == {sid for _, sid in found}


def test_dump_without_the_old_both_families_request(topo, socks, monkeypatch):
    """A kernel that refuses TCPDIAG_GETSOCK (here: a type it does not know,
    answered with EINVAL) gets one SOCK_DIAG_BY_FAMILY walk per family."""
    monkeypatch.setattr(sockdiag, "_both_in_one_walk", True)
    monkeypatch.setattr(sockdiag, "TCPDIAG_GETSOCK", 23)
    topo.add_addr("node1", VIP4)
    with netns.entered(topo.ns("node1")):
        dual = socks.listen("::", 2049, dual_stack=True)
        plain = socks.listen(VIP4, 2050)
    connect_pair(topo, socks, dual, VIP4, 2049)
    connect_pair(topo, socks, plain, VIP4, 2050)
    with netns.entered(topo.ns("node1")):
        found = sockdiag.dump([VIP4], [2049, 2050])
    assert sockdiag._both_in_one_walk is False
    assert sorted((sid.family, f.key.vport) for f, sid in found) == [(AF4, 2050), (AF6, 2049)]


def test_probe_destroy_says_why_without_loopback(topo):
    from nfsreset.lab.topology import sh

    sh("ip", "-n", topo.bridge_ns, "link", "set", "lo", "down")   # our own namespace, nothing else in it uses lo
    with netns.entered(topo.bridge_ns):
        ok, why = sockdiag.probe_destroy()
    assert not ok and "loopback" in why
