"""Forged segments against the real kernel: the tickle resets a client whose VIP moved.

Sockets live in this process, made inside the lab namespaces with
netns.entered(); the topo fixture removes the namespaces afterwards.
"""
import contextlib
import select
import socket
import time

import pytest

from nfsreset.kernel import announce, netns, packets
from nfsreset.lab.topology import VIP4, VIP6, HOST_ADDRS
from nfsreset.core.model import FlowKey, norm_ip
from nfsreset.kernel.rawsend import RawSender

pytestmark = pytest.mark.netns

PORT = 2049


@contextlib.contextmanager
def connection(topo, node: str, vip: str, port: int = PORT):
    """A TCP connection client -> vip:port served on `node`: yields (key, client_sock, server_sock)."""
    fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
    socks = []
    try:
        with netns.entered(topo.ns(node)):
            listener = socket.socket(fam, socket.SOCK_STREAM)
            socks.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((vip, port))
            listener.listen()
            listener.settimeout(5)
        with netns.entered(topo.ns("client")):
            client = socket.socket(fam, socket.SOCK_STREAM)
            socks.append(client)
            client.settimeout(5)
            client.connect((vip, port))
        server, peer = listener.accept()
        socks.append(server)
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        yield FlowKey(norm_ip(vip), port, norm_ip(peer[0]), peer[1]), client, server
    finally:
        for s in socks:
            s.close()


def move_vip(topo, vip: str, src: str = "node1", dst: str = "node2") -> None:
    topo.del_addr(src, vip)
    topo.add_addr(dst, vip, nodad=True)


def corrupt_tcp_checksum(pkt: bytes) -> bytes:
    b = bytearray(pkt)
    off = 20 if b[0] >> 4 == 4 else 40
    b[off + 16] ^= 0x5A
    return bytes(b)


def reset_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until `sock` reports ECONNRESET, or None if it stays quiet that long."""
    start = time.monotonic()
    ready, _, _ = select.select([sock], [], [], seconds)
    if not ready:
        return None
    with pytest.raises(ConnectionResetError):
        sock.recv(16)
    return time.monotonic() - start


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_tickle_resets_client_after_vip_moved(topo, vip):
    topo.add_addr("node1", vip, nodad=True)
    with connection(topo, "node1", vip) as (key, client, _server):
        move_vip(topo, vip)
        with netns.entered(topo.ns("node2")):
            # The client must send its answer to node2's MAC (docs/design.md §1: announce, then tickle).
            announce.announce(vip)
            sender = RawSender()
        with sender:
            # Control: a tickle with a broken TCP checksum is dropped by the client's
            # kernel, and the idle client notices nothing by itself. Waiting 0.6 s also
            # keeps the real tickle clear of the client's 500 ms invalid-segment limit.
            sender.send(corrupt_tcp_checksum(packets.tickle_to_client(key)))
            assert reset_within(client, 0.6) is None
            sender.send(packets.tickle_to_client(key))
            took = reset_within(client, 0.2)
            assert took is not None, "client socket survived the tickle"
            assert sender.sent == 2 and sender.errors == 0


def test_send_many_counts_and_survives_unreachable(topo):
    with netns.entered(topo.ns("node1")):
        sender = RawSender()
    bad = packets.tcp_packet("203.0.113.1", "203.0.113.2", 1, 2, 0, 0, packets.ACK)   # no route here
    good = packets.tcp_packet(HOST_ADDRS["node1"][1], HOST_ADDRS["client"][1], 1, 9, 0, 0, packets.ACK)
    with sender:
        assert sender.send_many([good, bad, good]) == 2
        assert sender.errors == 1 and sender.last_error is not None
        with pytest.raises(OSError):
            sender.send(bad)
        with pytest.raises(ValueError):
            sender.send(b"\x10" + bytes(39))


def test_sender_sockets_stay_in_the_namespace_it_was_built_in(topo):
    """Sockets are opened lazily; they must still belong to the builder's namespace.

    Checked with SIOCGSKNS (the socket's own netns) and without sending, so a
    regression cannot spray packets from the host namespace.
    """
    import fcntl
    import os

    SIOCGSKNS = 0x894C
    with netns.entered(topo.ns("node1")):
        sender = RawSender()
    by_name = RawSender(netns=topo.ns("node2"))
    with sender, by_name:
        for s, node in ((sender, "node1"), (by_name, "node2")):
            for version in (4, 6):
                fd = fcntl.ioctl(s._sock(version).fileno(), SIOCGSKNS)
                try:
                    assert os.fstat(fd).st_ino == netns.inode_of(topo.ns(node))
                finally:
                    os.close(fd)
    assert netns.current_inode() != netns.inode_of(topo.ns("node1"))


def _tcp_in_segs(topo, node: str) -> int:
    lines = [l.split() for l in topo.run(node, "cat", "/proc/net/snmp").stdout.splitlines() if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index("InSegs")])


def test_send_many_10000_tickles_arrive(topo):
    """Throughput of forged tickles; the client's kernel must really receive them."""
    c4 = HOST_ADDRS["client"][0]
    keys = [FlowKey(HOST_ADDRS["node2"][0], PORT, c4, 10000 + i) for i in range(10000)]
    topo.run("node2", "ping", "-c1", "-W2", c4)         # resolve the neighbour first
    before = _tcp_in_segs(topo, "client")
    with netns.entered(topo.ns("node2")):
        sender = RawSender()
    with sender:
        start = time.perf_counter()
        built = [packets.tickle_to_client(k) for k in keys]
        sent = sender.send_many(built)
        took = time.perf_counter() - start
    assert sent == 10000 and sender.errors == 0
    deadline = time.monotonic() + 3
    while _tcp_in_segs(topo, "client") - before < 9900 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _tcp_in_segs(topo, "client") - before >= 9900
    print(f"built+sent 10000 tickles in {took:.3f} s = {10000 / took:.0f} packets/s")
