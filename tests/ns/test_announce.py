"""Gratuitous ARP / unsolicited NA move the client's neighbour entry to the new owner."""
import json
import time

import pytest

from nfsreset.kernel import announce, netns
from nfsreset.lab.topology import VIP4, VIP6, IFACE

pytestmark = pytest.mark.netns


def mac_of(topo, node: str) -> str:
    return json.loads(topo.run(node, "ip", "-j", "link", "show", IFACE).stdout)[0]["address"]


def client_neigh_mac(topo, vip: str) -> str | None:
    entries = json.loads(topo.run("client", "ip", "-j", "neigh", "show", vip).stdout or "[]")
    return entries[0].get("lladdr") if entries else None


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_announce_moves_client_neighbour_entry(topo, vip):
    topo.add_addr("node1", vip, nodad=True)
    topo.run("client", "ping", "-c1", "-W2", vip)
    old, new = mac_of(topo, "node1"), mac_of(topo, "node2")
    assert client_neigh_mac(topo, vip) == old
    topo.del_addr("node1", vip)
    topo.add_addr("node2", vip, nodad=True)
    time.sleep(0.2)
    assert client_neigh_mac(topo, vip) == old, "the entry moved without our announcement"
    with netns.entered(topo.ns("node2")):
        assert announce.announce(vip) == IFACE
    deadline = time.monotonic() + 1.0
    while client_neigh_mac(topo, vip) != new and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client_neigh_mac(topo, vip) == new


def test_announce_count_repeats(topo):
    topo.add_addr("node2", VIP4)
    with netns.entered(topo.ns("node2")):
        start = time.monotonic()
        assert announce.announce(VIP4, IFACE, count=3, interval=0.05) == IFACE
        assert time.monotonic() - start >= 0.1


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_announce_refuses_address_not_configured_here(topo, vip):
    with netns.entered(topo.ns("node2")):
        with pytest.raises(announce.AnnounceError, match="not configured"):
            announce.announce(vip)


def test_announce_refuses_tentative_ipv6(topo):
    topo.add_addr("node2", VIP6)          # DAD running (~1 s here)
    with netns.entered(topo.ns("node2")):
        with pytest.raises(announce.AnnounceError, match="tentative"):
            announce.announce(VIP6)


def test_announce_refuses_wrong_device_and_finds_addresses(topo):
    topo.add_addr("node2", VIP4)
    topo.add_addr("node2", VIP6, nodad=True)
    with netns.entered(topo.ns("node2")):
        assert [d for d, _ in announce.devices_of(VIP4)] == [IFACE]
        assert [d for d, _ in announce.devices_of(VIP6)] == [IFACE]
        with pytest.raises(announce.AnnounceError, match="not configured on lo"):
            announce.announce(VIP4, "lo")
        assert announce.announce("::ffff:" + VIP4) == IFACE      # v4-mapped means v4
