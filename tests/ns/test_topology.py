import pytest

from nfsreset.lab import topology as T

pytestmark = pytest.mark.netns


def test_nodes_reach_each_other_and_vanish_afterwards():
    with T.Topology.create() as topo:
        names = list(topo.created)
        topo.run("client", "ping", "-c1", "-W2", T.HOST_ADDRS["node1"][0])
        topo.run("client", "ping", "-c1", "-W2", T.HOST_ADDRS["node2"][1])
        topo.add_addr("node1", T.VIP6)
        topo.wait_usable("node1", T.VIP6)
        topo.run("client", "ping", "-c1", "-W2", T.VIP6)
    left = set(T.list_netns()) & set(names)
    assert not left


def test_fixture_gives_private_namespaces(topo):
    assert all(n.startswith(topo.prefix) for n in topo.created)
    assert len(topo.created) == 4
    out = topo.run("node1", "ip", "-o", "link").stdout
    assert "eth0" in out and "br0" not in out
