"""nft guard and quarantine against the real kernel, with real packets.

node1 owns the VIPs and runs the server sockets; the client namespace
connects. Sockets are opened inside `netns.entered(...)` and keep their
namespace, so one test thread plays both ends.
"""
import contextlib
import socket
import struct
import time

import pytest

from nfsreset.kernel import netns
from nfsreset.kernel.guard import Guard, available
from nfsreset.lab.topology import HOST_ADDRS, IFACE, VIP4, VIP4_B, VIP6, VIP6_B
from nfsreset.core.model import FlowKey
from tests.ns.scene import wait_for

pytestmark = pytest.mark.netns

PORT = 2049
TCP_ESTABLISHED, TCP_CLOSE = 1, 7
PACKET_OUTGOING = 4


def _family(ip):
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _client_ip(vip):
    v4, v6 = HOST_ADDRS["client"]
    return v6 if ":" in vip else v4


def tcp_state(sock):
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]  # tcpi_state


def nft_tables(topo, node):
    return topo.run(node, "nft", "list", "tables").stdout.strip()


class Sockets:
    """Every socket a test opens, closed at the end whatever happens."""

    def __init__(self, topo):
        self.topo, self.all = topo, []

    def _keep(self, s):
        self.all.append(s)
        s.settimeout(3)
        return s

    def listen(self, node, ip, port=PORT):
        with netns.entered(self.topo.ns(node)):
            s = self._keep(socket.socket(_family(ip), socket.SOCK_STREAM))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ip, port))
            s.listen(16)
        return s

    def connect(self, ip, cport, port=PORT, timeout=3):
        with netns.entered(self.topo.ns("client")):
            s = self._keep(socket.socket(_family(ip), socket.SOCK_STREAM))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", cport))
            s.settimeout(timeout)
            s.connect((ip, port))
            s.settimeout(3)
        return s

    def pair(self, listener, ip, cport):
        cli = self.connect(ip, cport)
        srv, _ = listener.accept()
        self._keep(srv)
        return cli, srv

    def capture(self, node):
        """AF_PACKET socket on the node's eth0: every frame it receives."""
        with netns.entered(self.topo.ns(node)):
            s = self._keep(socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)))
            s.bind((IFACE, 0))
        return s

    def close(self):
        for s in self.all:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def socks(topo):
    s = Sockets(topo)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def guard1(topo):
    """A Guard bound to node1's namespace; its table is removed afterwards."""
    with netns.entered(topo.ns("node1")):
        g = Guard()
    try:
        yield g
    finally:
        g.remove_all()


def echo_works(cli, srv, payload=b"hello"):
    cli.sendall(payload)
    assert srv.recv(64) == payload
    srv.sendall(payload[::-1])
    assert cli.recv(64) == payload[::-1]
    return True


def frames_from(cap, ip, seconds):
    """Frames received (not sent) on the capture socket whose IP source is `ip`, for `seconds`."""
    want = socket.inet_pton(_family(ip), ip)
    seen = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        cap.settimeout(left)
        try:
            frame, addr = cap.recvfrom(65535)
        except (socket.timeout, TimeoutError):
            break
        if addr[2] == PACKET_OUTGOING:
            continue
        ethertype = struct.unpack("!H", frame[12:14])[0]
        src = frame[22:38] if ethertype == 0x86DD else frame[26:30] if ethertype == 0x0800 else b""
        if src == want:
            seen.append(frame)
    return seen


def drain(cap):
    cap.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(10000):
            cap.recv(65535)
    cap.settimeout(3)


# -- guard ------------------------------------------------------------------------

@pytest.mark.parametrize("vip,vip_b", [(VIP4, VIP4_B), (VIP6, VIP6_B)], ids=["v4", "v6"])
def test_guard_resets_data_lets_rst_and_syn_through(topo, socks, guard1, vip, vip_b):
    topo.add_addr("node1", vip, nodad=True)
    topo.add_addr("node1", vip_b, nodad=True)
    client = _client_ip(vip)
    lsn = socks.listen("node1", vip)
    lsn_b = socks.listen("node1", vip_b)
    a, a_srv = socks.pair(lsn, vip, 40001)      # its data gets reset, then it reconnects
    b, b_srv = socks.pair(lsn, vip, 40002)      # it sends an RST
    c, c_srv = socks.pair(lsn_b, vip_b, 40001)  # other VIP, same client port: untouched
    d, d_srv = socks.pair(lsn, vip, 40003)      # same VIP, other port: untouched
    key_a, key_b = FlowKey(vip, PORT, client, 40001), FlowKey(vip, PORT, client, 40002)

    assert guard1.add_stale([key_a, key_b, key_a], timeout_s=60) == 2
    assert guard1.add_stale([key_a], timeout_s=60) == 0   # already there: only refreshed
    assert {k for k, _ in guard1.stale()} == {key_a, key_b}

    # A data segment of a guarded tuple is answered with an RST by node1 and
    # never reaches the (stale) server socket.
    a.sendall(b"ping")
    with pytest.raises(ConnectionResetError):
        a.recv(16)
    a_srv.setblocking(False)
    with pytest.raises(BlockingIOError):
        a_srv.recv(16)
    assert tcp_state(a_srv) == TCP_ESTABLISHED
    counts = dict(guard1.stale())
    assert counts[key_a] >= 1 and counts[key_b] == 0
    assert guard1.add_stale([key_a], timeout_s=90) == 0    # a refresh keeps the counter
    assert dict(guard1.stale())[key_a] == counts[key_a]

    # The client's RST passes and kills the stale server socket; the element stays.
    b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    b.close()
    assert wait_for(lambda: tcp_state(b_srv) == TCP_CLOSE), "client RST did not reach the server socket"
    assert key_b in dict(guard1.stale())

    # Tuples not in the set are untouched.
    assert echo_works(c, c_srv) and echo_works(d, d_srv)

    # A SYN of the guarded tuple passes and deletes its element (nft `delete
    # @set` from the packet path). The stale socket answers it with a challenge
    # ACK, the client's RST kills it, and the SYN retransmitted ~1 s later
    # makes a new connection that is not reset after its handshake.
    a.close()
    t0 = time.monotonic()
    a2 = socks.connect(vip, 40001, timeout=5)
    connect_s = time.monotonic() - t0
    a2_srv, _ = lsn.accept()
    socks._keep(a2_srv)
    assert guard1.syn_delete
    assert key_a not in dict(guard1.stale())
    assert tcp_state(a_srv) == TCP_CLOSE
    assert echo_works(a2, a2_srv)
    time.sleep(0.3)
    assert echo_works(a2, a2_srv, b"still there")
    print(f"\nreconnect on the guarded tuple took {connect_s:.2f} s")
    assert connect_s < 3.5, f"reconnect took {connect_s:.2f} s"


def test_dual_stack_listener_is_guarded_through_its_v4_mapped_keys(topo, socks, guard1):
    # sock_diag reports a v4 client of a [::] listener as ::ffff:a.b.c.d; the
    # guard must file it under stale4, where the IPv4 packets are matched.
    topo.add_addr("node1", VIP4)
    with netns.entered(topo.ns("node1")):
        lsn = socks._keep(socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
        lsn.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        lsn.bind(("::", PORT))
        lsn.listen(4)
    cli, srv = socks.pair(lsn, VIP4, 40020)
    mapped = FlowKey("::ffff:" + VIP4, PORT, "::ffff:198.51.100.100", 40020)
    assert guard1.add_stale([mapped]) == 1
    assert guard1.stale() == [(FlowKey(VIP4, PORT, "198.51.100.100", 40020), 0)]
    cli.sendall(b"x")
    with pytest.raises(ConnectionResetError):
        cli.recv(8)


def test_a_stale_view_of_the_table_is_recovered(topo):
    # Two writers in one namespace: the second deletes the table between the
    # first one's listing and its change. The retry with a fresh listing
    # rebuilds the whole table.
    from nfsreset.kernel import guard as G
    with netns.entered(topo.ns("node1")):
        first, second = Guard(), Guard()
    try:
        first.add_stale([FlowKey(VIP4, PORT, "198.51.100.100", 903)])
        old_listing = first._list()
        second.remove_all()
        cmds = G.add_stale_commands(G.group_stale([FlowKey(VIP4, PORT, "198.51.100.100", 904)]), 60)
        first._change(cmds, "add after a concurrent delete", old_listing)
        assert [k.cport for k, _ in second.stale()] == [904]
        out = topo.run("node1", "nft", "list", "chain", "inet", "nfsreset", "guard").stdout
        assert out.count("reject with tcp reset") == 2 and out.count("delete @stale") == 2
    finally:
        first.remove_all()


def test_guard_elements_time_out_and_prune_leaves_no_table(topo, guard1):
    keys = [FlowKey(VIP4, PORT, "198.51.100.100", 900), FlowKey(VIP6, PORT, "2001:db8::100", 900)]
    assert guard1.add_stale(keys, timeout_s=1) == 2
    assert "inet nfsreset" in nft_tables(topo, "node1")
    guard1.prune()                                   # elements left: the table stays
    assert "inet nfsreset" in nft_tables(topo, "node1")
    assert wait_for(lambda: guard1.stale() == [], timeout=4, step=0.2)
    assert "inet nfsreset" in nft_tables(topo, "node1")   # nft alone leaves the empty table
    guard1.prune()
    assert nft_tables(topo, "node1") == ""


def test_remove_stale_and_lift_drop_the_table_when_empty(topo, guard1):
    k4, k6 = FlowKey(VIP4, PORT, "198.51.100.100", 901), FlowKey(VIP6, PORT, "2001:db8::100", 901)
    guard1.add_stale([k4, k6])
    guard1.quarantine(VIP6)
    assert guard1.quarantined() == {VIP6}
    assert guard1.remove_stale([k4, FlowKey(VIP4, PORT, "198.51.100.100", 1)]) == 1
    assert guard1.remove_stale([k6]) == 1
    assert guard1.remove_stale([k6]) == 0
    assert "inet nfsreset" in nft_tables(topo, "node1")   # the quarantine is still there
    guard1.lift_quarantine(VIP6)
    guard1.lift_quarantine(VIP6)                    # idempotent
    assert nft_tables(topo, "node1") == ""


def test_remove_all_leaves_nothing_and_is_idempotent(topo, guard1):
    guard1.add_stale([FlowKey(VIP4, PORT, "198.51.100.100", 902)])
    guard1.quarantine(VIP4)
    guard1.remove_all()
    assert nft_tables(topo, "node1") == ""
    guard1.remove_all()
    guard1.prune()
    assert guard1.stale() == [] and guard1.quarantined() == set()


def test_release_removes_only_the_named_vips_elements(topo, guard1):
    mine = [FlowKey(VIP4, PORT, "198.51.100.100", 905), FlowKey(VIP6, PORT, "2001:db8::100", 905)]
    theirs = FlowKey(VIP4_B, PORT, "198.51.100.100", 905)
    guard1.add_stale(mine + [theirs])
    for v in (VIP4, VIP6, VIP4_B):
        guard1.quarantine(v)
    assert guard1.release([VIP4, VIP6, "2001:db8::99"]) == (2, 2)
    assert guard1.quarantined() == {VIP4_B}
    assert [k for k, _ in guard1.stale()] == [theirs]
    assert guard1.release([VIP4, VIP6]) == (0, 0)           # nothing of theirs left: idempotent
    assert guard1.release([VIP4_B]) == (1, 1)
    assert nft_tables(topo, "node1") == ""                  # emptied: the table goes


def test_guard_is_pinned_to_the_namespace_it_was_made_in(topo, guard1):
    # guard1 was created in node1 and is used here from the test's own
    # namespace: the table must still land in node1, and only there.
    assert guard1.netns_inode == netns.inode_of(topo.ns("node1"))
    guard1.quarantine(VIP4)
    assert "inet nfsreset" in nft_tables(topo, "node1")
    assert nft_tables(topo, "node2") == "" and nft_tables(topo, "client") == ""


def test_available_probes_without_leaving_a_table(topo):
    with netns.entered(topo.ns("node2")):
        ok, why = available()
    assert ok, why
    assert nft_tables(topo, "node2") == ""


# -- quarantine ---------------------------------------------------------------------

def test_quarantine_silences_a_deleted_v6_vip_until_lifted(topo, socks, guard1):
    topo.add_addr("node1", VIP6, nodad=True)
    lsn = socks.listen("node1", VIP6)
    cli, srv = socks.pair(lsn, VIP6, 40010)
    assert echo_works(cli, srv)
    cap = socks.capture("client")

    topo.del_addr("node1", VIP6)
    guard1.quarantine(VIP6)
    drain(cap)
    # IPv6 keeps sending from a deleted address: data, then retransmissions,
    # then the FIN of close().
    srv.sendall(b"from a ghost")
    srv.shutdown(socket.SHUT_WR)
    assert frames_from(cap, VIP6, 1.5) == [], "quarantine let packets from the VIP out"
    cli.settimeout(0.1)
    with pytest.raises((socket.timeout, TimeoutError)):
        cli.recv(64)

    guard1.lift_quarantine(VIP6)
    assert nft_tables(topo, "node1") == ""
    # The next retransmission (RTO backed off to ~1.6 s by now) gets through.
    assert frames_from(cap, VIP6, 5.0), "no packet from the VIP after lifting the quarantine"
    cli.settimeout(3)
    assert cli.recv(64) == b"from a ghost"


def test_quarantine_lifts_itself_when_the_v6_vip_is_back(topo, socks, guard1):
    # Nobody lifts the element: the address comes back (an operator's `ip addr
    # add`) and the rule's `fib saddr type != local` lets the VIP send again.
    topo.add_addr("node1", VIP6, nodad=True)
    lsn = socks.listen("node1", VIP6)
    cli, srv = socks.pair(lsn, VIP6, 40012)
    cap = socks.capture("client")
    topo.del_addr("node1", VIP6)
    guard1.quarantine(VIP6)
    drain(cap)
    srv.sendall(b"back again")
    assert frames_from(cap, VIP6, 1.0) == [], "quarantine let packets from the absent VIP out"
    topo.add_addr("node1", VIP6, nodad=True)
    assert guard1.quarantined() == {VIP6}
    assert frames_from(cap, VIP6, 5.0), "no packet from the VIP once it was configured again"
    cli.settimeout(3)
    assert cli.recv(64) == b"back again"     # delivered by a retransmission
    assert echo_works(cli, srv)


@pytest.mark.parametrize("vip", [VIP4, VIP6], ids=["v4", "v6"])
def test_quarantine_never_mutes_a_vip_that_is_configured(topo, socks, guard1, vip):
    # An element for a VIP that is here (left by a killed daemon, or a hook that
    # ran out of order) drops nothing: new connections, old ones, and the
    # node's own address all talk.
    topo.add_addr("node1", vip, nodad=True)
    host_ip = HOST_ADDRS["node1"][1 if ":" in vip else 0]
    lsn = socks.listen("node1", vip)
    lsn_host = socks.listen("node1", host_ip)
    cli, srv = socks.pair(lsn, vip, 40011)
    hcli, hsrv = socks.pair(lsn_host, host_ip, 40011)

    guard1.quarantine(vip)
    assert guard1.quarantined() == {vip}
    assert echo_works(cli, srv) and echo_works(hcli, hsrv)
    t0 = time.monotonic()
    new_cli, new_srv = socks.pair(lsn, vip, 40013)
    assert time.monotonic() - t0 < 0.5
    assert echo_works(new_cli, new_srv)


# -- scale ----------------------------------------------------------------------------

def test_ten_thousand_elements(topo, guard1, record_property):
    keys = [FlowKey(VIP4, PORT, f"198.51.100.{1 + i // 5000}", 1024 + i % 5000) for i in range(5000 * 2)]
    t0 = time.monotonic()
    assert guard1.add_stale(keys, timeout_s=60) == 10000
    add_s = time.monotonic() - t0
    t0 = time.monotonic()
    listed = guard1.stale()
    list_s = time.monotonic() - t0
    assert len(listed) == 10000
    t0 = time.monotonic()
    assert guard1.remove_stale(keys) == 10000
    remove_s = time.monotonic() - t0
    assert nft_tables(topo, "node1") == ""
    record_property("add_10k_s", round(add_s, 3))
    record_property("list_10k_s", round(list_s, 3))
    record_property("remove_10k_s", round(remove_s, 3))
    print(f"\n10k elements: add_stale {add_s:.3f} s, stale() {list_s:.3f} s, remove_stale {remove_s:.3f} s")
    assert add_s < 3.0
