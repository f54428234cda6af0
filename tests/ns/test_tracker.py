"""The BPF flow tracker against real sockets in lab namespaces.

Ground truth for sequence numbers comes from a packet capture on the client's
interface (AF_PACKET), not from the tracker: the SYN gives the client's ISN,
the SYN-ACK the server's.
"""
from __future__ import annotations

import contextlib
import socket
import struct
import sys
import time

import pytest

from nfsreset import netns
from nfsreset.lab import topology as T

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

PORT, OTHER_PORT, PLAIN_V4_PORT = 2049, 2050, 2051
ETH_P_ALL = 0x0003


@pytest.fixture
def lab(topo):
    """node1 holds two v4 VIPs and a v6 VIP. Dual-stack listeners on 2049 and
    2050 (v4 clients give v4-mapped sockets); a plain AF_INET one on 2051."""
    for ip in (T.VIP4, T.VIP4_B, T.VIP6):
        topo.add_addr("node1", ip, nodad=True)
    topo.wait_usable("node1", T.VIP6)
    listeners = {}
    try:
        with netns.entered(topo.ns("node1")):
            for port in (PORT, OTHER_PORT, PLAIN_V4_PORT):
                if port == PLAIN_V4_PORT:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                else:
                    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                listeners[port] = s
                s.bind(("", port))
                s.listen(16)
                s.settimeout(3)
        yield topo, listeners
    finally:
        for s in listeners.values():
            s.close()


@pytest.fixture
def tracker(lab):
    from nfsreset.tracker import FlowTracker

    topo, _ = lab
    tr = FlowTracker([PORT], [T.VIP4, T.VIP6], [netns.inode_of(topo.ns("node1"))])
    try:
        yield tr
    finally:
        tr.close()


def connect(topo, listeners, vip, port):
    """(client socket, server socket) of a fresh connection client -> vip:port."""
    fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
    with netns.entered(topo.ns("client")):
        c = socket.socket(fam, socket.SOCK_STREAM)
    c.settimeout(3)
    c.connect((vip, port))
    s, _ = listeners[port].accept()
    s.settimeout(3)
    return c, s


def events_until(tr, pred, timeout=2.0):
    """Poll events until pred(all events so far) holds or the time is up."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got += tr.poll(50)
        if pred(got):
            break
    return got


@contextlib.contextmanager
def capture(topo, node="client"):
    with netns.entered(topo.ns(node)):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        s.bind((T.IFACE, 0))
        s.setblocking(False)
        yield s
    finally:
        s.close()


def handshake_isns(cap, cport, timeout=2.0):
    """(client ISN, server ISN) from the SYN and SYN-ACK of client port `cport`."""
    syn = synack = None
    deadline = time.monotonic() + timeout
    while (syn is None or synack is None) and time.monotonic() < deadline:
        try:
            frame = cap.recv(65535)
        except BlockingIOError:
            time.sleep(0.005)
            continue
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == 0x0800 and frame[14 + 9] == 6:
            tcp = 14 + (frame[14] & 0x0F) * 4
        elif ethertype == 0x86DD and frame[14 + 6] == 6:
            tcp = 14 + 40
        else:
            continue
        sport, dport, seq = struct.unpack_from("!HHI", frame, tcp)
        flags = frame[tcp + 13]
        if flags & 0x02 and not flags & 0x10 and sport == cport:
            syn = seq
        elif flags & 0x12 == 0x12 and dport == cport:
            synack = seq
    assert syn is not None and synack is not None, "handshake not captured"
    return syn, synack


@pytest.mark.parametrize("vip", [T.VIP4, T.VIP6], ids=["v4-mapped", "v6"])
def test_connection_lifecycle_with_exact_sequence_numbers(lab, tracker, vip):
    topo, listeners = lab
    node1_ns = netns.inode_of(topo.ns("node1"))
    with capture(topo) as cap:
        c, s = connect(topo, listeners, vip, PORT)
        cport = c.getsockname()[1]
        client_isn, server_isn = handshake_isns(cap, cport)
    try:
        evs = events_until(tracker, lambda e: any(x.kind == "open" for x in e))
        opens = [e for e in evs if e.kind == "open"]
        assert len(opens) == 1, evs
        f = opens[0].flow
        assert (f.key.vip, f.key.vport, f.key.client, f.key.cport) == (
            vip, PORT, T.HOST_ADDRS["client"][1 if ":" in vip else 0], cport)
        assert f.state == "ESTABLISHED" and opens[0].old_state == "SYN_RECV"
        assert f.netns == node1_ns
        assert f.rcv_nxt == (client_isn + 1) % 2**32
        assert f.snd_nxt == (server_isn + 1) % 2**32
        assert f.first_seen == f.last_change and abs(f.first_seen - time.monotonic()) < 5

        # Data both ways; the table follows without any state change.
        request, reply = b"x" * 1000, b"y" * 300
        c.sendall(request)
        assert len(s.recv(4096)) == len(request)
        s.sendall(reply)
        assert len(c.recv(4096)) == len(reply)
        want = ((client_isn + 1 + len(request)) % 2**32, (server_isn + 1 + len(reply)) % 2**32)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            (now,) = [x for x in tracker.flows() if x.key.cport == cport]
            if (now.rcv_nxt, now.snd_nxt) == want:
                break
            # the server's snd_nxt is seen with the client's next segment (its ACK)
            time.sleep(0.02)
        assert (now.rcv_nxt, now.snd_nxt) == want
        assert now.state == "ESTABLISHED" and now.first_seen == f.first_seen

        # Client closes first: CLOSE_WAIT (FIN counted in rcv_nxt), then ours.
        c.close()
        evs = events_until(tracker, lambda e: any(x.flow.state == "CLOSE_WAIT" for x in e))
        (cw,) = [e for e in evs if e.flow.state == "CLOSE_WAIT"]
        assert cw.kind == "state" and cw.old_state == "ESTABLISHED"
        assert cw.flow.rcv_nxt == (want[0] + 1) % 2**32
        s.close()
        evs = events_until(tracker, lambda e: any(x.kind == "close" for x in e))
        assert [(e.kind, e.old_state, e.flow.state) for e in evs] == [
            ("state", "CLOSE_WAIT", "LAST_ACK"), ("close", "LAST_ACK", "CLOSE")]
        assert evs[-1].flow.first_seen == f.first_seen
        assert not [x for x in tracker.flows() if x.key.cport == cport]
        assert tracker.lost == 0
    finally:
        c.close()
        s.close()


def test_plain_ipv4_socket_is_tracked(lab, tracker):
    """An AF_INET socket (not v4-mapped) on the second VIP, once it is watched."""
    topo, listeners = lab
    tracker.set_vips([T.VIP4_B])
    tracker.set_ports([PLAIN_V4_PORT])
    c, s = connect(topo, listeners, T.VIP4_B, PLAIN_V4_PORT)
    assert s.family == socket.AF_INET
    with c, s:
        evs = events_until(tracker, lambda e: e)
        assert [(e.kind, e.flow.key.vip, e.flow.key.cport) for e in evs] == [
            ("open", T.VIP4_B, c.getsockname()[1])]


def test_filters_and_runtime_changes(lab, tracker):
    topo, listeners = lab
    node1_ns = netns.inode_of(topo.ns("node1"))
    node2_ns = netns.inode_of(topo.ns("node2"))

    def opened_after(vip, port):
        c, s = connect(topo, listeners, vip, port)
        cport = c.getsockname()[1]
        evs = events_until(tracker, lambda e: any(x.kind == "open" for x in e), timeout=0.5)
        c.close()
        s.close()
        return [e for e in evs if e.kind == "open" and e.flow.key.cport == cport]

    assert opened_after(T.VIP4, PORT)
    assert not opened_after(T.VIP4, OTHER_PORT), "other port reported"
    assert not opened_after(T.VIP4_B, PORT), "other VIP reported"

    tracker.set_vips([T.VIP4_B])                  # at run time, no reload
    assert opened_after(T.VIP4_B, PORT)
    assert not opened_after(T.VIP4, PORT)

    tracker.set_ports([PORT, OTHER_PORT])
    assert opened_after(T.VIP4_B, OTHER_PORT)

    tracker.set_netns([node2_ns])                 # node1's sockets no longer watched
    assert not opened_after(T.VIP4_B, PORT)
    tracker.set_netns([])                         # empty: every namespace
    assert opened_after(T.VIP4_B, PORT)
    tracker.set_netns([node1_ns, node2_ns])
    assert opened_after(T.VIP4_B, PORT)
    events_until(tracker, lambda e: False, timeout=0.3)  # drain closes
    assert tracker.flows() == []


def test_flow_that_predates_the_tracker_is_reported_when_it_closes(lab):
    from nfsreset.tracker import FlowTracker

    topo, listeners = lab
    c, s = connect(topo, listeners, T.VIP4, PORT)
    cport = c.getsockname()[1]
    with FlowTracker([PORT], [T.VIP4]) as tr:
        assert tr.flows() == []
        c.close()
        s.close()
        evs = events_until(tr, lambda e: any(x.kind == "close" for x in e))
    kinds = [(e.kind, e.flow.state) for e in evs]
    # first sight is a state change: reported as open, with what we know
    assert kinds[0] == ("open", "CLOSE_WAIT") and kinds[-1] == ("close", "CLOSE"), kinds
    assert {e.flow.key.cport for e in evs} == {cport}
    assert evs[0].flow.first_seen is not None and evs[-1].old_state == "LAST_ACK"


def test_loads_under_ip_netns_exec(topo):
    """`ip netns exec` hides tracefs: the tracker (raw tracepoints) loads
    without it, and ensure_tracefs() mounts it privately for whoever needs it."""
    code = (
        "import os; from nfsreset import tracker as t;"
        "ev = '/sys/kernel/tracing/events'; before = os.path.exists(ev);"
        "tr = t.FlowTracker([2049], ['198.51.100.10']); tr.close();"
        "t.ensure_tracefs(); print(before, os.path.exists(ev), t.available()[0])"
    )
    res = topo.run("node1", sys.executable, "-c", code, timeout=60)
    assert res.stdout.split() == ["False", "True", "True"], res.stderr


def test_full_ring_counts_lost_events(lab):
    """A one-page ring overflows; the loss is counted and can be acknowledged."""
    from nfsreset.tracker import FlowTracker

    topo, listeners = lab
    with FlowTracker([PORT], [T.VIP4], ring_pages=1) as tr:
        for _ in range(25):         # 4 events each, ~39 fit in a page
            c, s = connect(topo, listeners, T.VIP4, PORT)
            c.close()
            s.close()
        got = events_until(tr, lambda e: False, timeout=0.3)
        assert tr.lost > 0 and len(got) + tr.lost == 100, (len(got), tr.lost)
        assert tr.flows() == []     # the table does not depend on the ring
        tr.lost = 0
        assert tr.lost == 0
