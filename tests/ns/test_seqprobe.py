"""Learning a local socket's sequence numbers and resetting it with an exact RST."""
import select
import socket
import time

import pytest

from nfsreset.kernel import netns, packets, seqprobe
from nfsreset.lab.topology import VIP4, VIP6
from nfsreset.core.model import FlowKey, norm_ip
from nfsreset.kernel.rawsend import RawSender
from tests.ns.test_packets import connection, corrupt_tcp_checksum

pytestmark = pytest.mark.netns


def ss_has(topo, node: str, key: FlowKey) -> bool:
    """Whether `ss -tn` on `node` lists the socket of `key` (any state but LISTEN)."""
    def addr(ip: str) -> str:
        return f"[{ip}]" if ":" in ip else ip

    out = topo.run(node, "ss", "-Htn", "src", addr(key.vip), "sport", f"= :{key.vport}",
                   "dst", addr(key.client), "dport", f"= :{key.cport}").stdout
    return bool(out.strip())


def server_reset_within(sock, seconds: float) -> bool:
    ready, _, _ = select.select([sock], [], [], seconds)
    if not ready:
        return False
    with pytest.raises(ConnectionResetError):
        sock.recv(16)
    return True


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_learn_seq_tracks_bytes_both_ways(topo, vip):
    topo.add_addr("node1", vip, nodad=True)
    with connection(topo, "node1", vip) as (key, client, server):
        with netns.entered(topo.ns("node1")):
            first = seqprobe.learn_seq(key)
            assert first is not None
            client.sendall(b"x" * 100)
            assert len(server.recv(200)) == 100
            server.sendall(b"y" * 50)
            assert len(client.recv(200)) == 50
            time.sleep(0.05)              # let the client's ACK of those 50 bytes land
            second = seqprobe.learn_seq(key)
        snd1, rcv1 = first
        assert second == ((snd1 + 50) % 2**32, (rcv1 + 100) % 2**32)


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_kill_local_ends_server_socket(topo, vip):
    topo.add_addr("node1", vip, nodad=True)
    with connection(topo, "node1", vip) as (key, _client, server):
        assert ss_has(topo, "node1", key)
        with netns.entered(topo.ns("node1")):
            sender = RawSender()
            with sender:
                snd_nxt, rcv_nxt = seqprobe.learn_seq(key, sender=sender)
                # Controls, both into the local stack: a bad TCP checksum is dropped
                # (loopback delivery verifies it), and an RST one off rcv_nxt only
                # earns a challenge ACK (RFC 5961).
                sender.send(corrupt_tcp_checksum(packets.rst_to_server(key, rcv_nxt)))
                sender.send(packets.rst_to_server(key, rcv_nxt + 1))
                time.sleep(0.05)
                assert ss_has(topo, "node1", key)
                start = time.monotonic()
                assert seqprobe.kill_local(key, sender=sender)
                took = time.monotonic() - start
        assert server_reset_within(server, 0.5)
        assert not ss_has(topo, "node1", key)
        assert took < 0.2


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_probe_with_data_escapes_the_invalid_segment_rate_limit(topo, vip):
    """tcp_invalid_ratelimit swallows a second bare-ACK probe within 500 ms; the data-carrying one is answered."""
    topo.add_addr("node1", vip, nodad=True)
    with connection(topo, "node1", vip) as (key, _client, _server):
        bare_probe = packets.tcp_packet(key.client, key.vip, key.cport, key.vport, 0, 0, packets.ACK)
        with netns.entered(topo.ns("node1")):
            sender = RawSender()
            with sender, seqprobe.capture_socket(key) as cap:
                def answers(wait: float) -> int:
                    n, deadline = 0, time.monotonic() + wait
                    while (left := deadline - time.monotonic()) > 0:
                        if select.select([cap], [], [], left)[0]:
                            cap.recv(65535)
                            n += 1
                    return n

                sender.send(bare_probe)
                assert answers(0.1) == 1
                sender.send(bare_probe)
                assert answers(0.1) == 0, "second bare probe answered: rate limit gone?"
                assert seqprobe.learn_seq(key, timeout=0.2, sender=sender) is not None


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_no_socket_means_none(topo, vip):
    topo.add_addr("node1", vip, nodad=True)
    key = FlowKey(vip, 2049, "198.51.100.100" if ":" not in vip else "2001:db8::100", 40000)
    topo.run("node1", "ping", "-c1", "-W2", key.client)     # neighbour resolved: the RST goes out at once
    with netns.entered(topo.ns("node1")):
        start = time.monotonic()
        assert seqprobe.learn_seq(key, timeout=1.0) is None   # the kernel's RST answer ends the wait
        assert time.monotonic() - start < 0.5
        assert seqprobe.kill_local(key, timeout=0.2) is False


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_kill_local_ends_stale_fin_wait1_socket(topo, vip):
    """The stale kind docs/design.md §1 saw live ~111 s: a FIN that the vanished client never ACKs."""
    topo.add_addr("node1", vip, nodad=True)
    with connection(topo, "node1", vip) as (key, _client, server):
        topo.run("client", "ip", "link", "set", "eth0", "down")
        server.shutdown(2)                # FIN goes out, is never acknowledged
        time.sleep(0.3)                   # at least one FIN retransmission (rto ~0.2 s)
        state = topo.run("node1", "ss", "-Htn", "state", "fin-wait-1").stdout
        assert str(key.cport) in state
        with netns.entered(topo.ns("node1")):
            assert seqprobe.kill_local(key, timeout=0.3)
        time.sleep(0.05)
        assert not ss_has(topo, "node1", key)


def test_kill_local_many_both_families_in_one_pass(topo):
    n = 150
    for vip in (VIP4, VIP6):
        topo.add_addr("node1", vip, nodad=True)
    socks, keys = [], []
    try:
        for vip in (VIP4, VIP6):
            fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
            with netns.entered(topo.ns("node1")):
                listener = socket.socket(fam, socket.SOCK_STREAM)
                socks.append(listener)
                listener.bind((vip, 2049))
                listener.listen(n)
            with netns.entered(topo.ns("client")):
                for _ in range(n):
                    c = socket.socket(fam, socket.SOCK_STREAM)
                    socks.append(c)
                    c.connect((vip, 2049))
            for _ in range(n):
                s, peer = listener.accept()
                socks.append(s)
                keys.append(FlowKey(vip, 2049, norm_ip(peer[0]), peer[1]))
        nobody = FlowKey(VIP4, 2049, "198.51.100.100", 1)          # no such socket: answered by RST
        count = lambda: len(topo.run("node1", "ss", "-Htn", "state", "established").stdout.splitlines())
        assert count() == 2 * n
        with netns.entered(topo.ns("node1")):
            start = time.monotonic()
            killed = seqprobe.kill_local_many(keys + [nobody], timeout=0.5)
            took = time.monotonic() - start
        assert killed == set(keys)
        assert took < 0.3                  # returns once every key answered, not at the timeout
        time.sleep(0.05)
        assert count() == 0
    finally:
        for s in socks:
            s.close()
