"""Presence is the kernel's answer (address table + FIB local), not one event's.

Issue 10, items 2 and 3: an address on two devices, an `ip addr replace`, and
addresses local through a `local` route range (AnyIP, LVS-DR) must never make
a configured VIP look away: no session ended, no quarantine, no "left".
"""
from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time

import pytest

from nfsreset.kernel import netns
from nfsreset.lab.topology import HOST_ADDRS, IFACE, VIP4, VIP4_B, VIP6, VIP6_B
from tests.ns.scene import one_line, wait_for
from tests.ns.test_watch import READY_TIMEOUT_S, StderrLines, remove_live_table

pytestmark = [pytest.mark.netns]

MARK = {4: VIP4_B, 6: VIP6_B}   # a second watched VIP: its arrival proves earlier events were handled
VIPS_OF = {4: (VIP4, VIP4_B, "198.51.100.12", "198.51.100.13"),
           6: (VIP6, VIP6_B, "2001:db8::12", "2001:db8::13")}
# A `local` route range and a VIP inside it (no address configured for it anywhere).
RANGE = {4: ("198.51.100.64/27", "198.51.100.70"), 6: ("2001:db8::40/124", "2001:db8::4a")}
SETTLE_S = 0.6   # after the marker: a POST_STOP/POST_START queued before it has run by then


def plen(vip: str, host: bool = False) -> str:
    return ("128" if host else "64") if ":" in vip else ("32" if host else "24")


def ip(topo, node: str, *argv: str) -> None:
    topo.run(node, "ip", *argv)


def quarantined(topo, node: str = "node1") -> set[str]:
    """Elements of the quarantine sets, as `nft` lists them (empty: no table)."""
    res = topo.run(node, "nft", "-j", "list", "ruleset", check=False)
    out = set()
    for item in json.loads(res.stdout or "{}").get("nftables", []):
        s = item.get("set")
        if s and s.get("family") == "inet" and "quarantine" in s.get("name", ""):
            for e in s.get("elem", []):   # a plain address, or {"elem": {"val": ...}} with a timeout
                out.add(e if isinstance(e, str) else e.get("elem", {}).get("val"))
    return out


def alive(scene, *clients) -> bool:
    return all(c.echo() for c in clients) and all(scene.holds("node1", c) for c in clients)


@contextlib.contextmanager
def watching(scene, *vips: str):
    """`nfsreset watch` in node1 (sock_diag dumps: presence does not depend on BPF);
    yields its stderr reader once ready; SIGTERM at the end, exit 0, no traceback."""
    args = ["watch", "--no-bpf", "--state-dir", scene.state]
    for v in vips:
        args += ["--vip", v]
    proc = scene.popen("node1", *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = StderrLines(proc)
    err.proc = proc
    try:
        assert err.wait_for(r"\bready\b", READY_TIMEOUT_S), err.text()
        yield err
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, err.text()
        err.thread.join(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            remove_live_table(scene.topo, "node1")
    assert "Traceback" not in err.text(), err.text()


def main_thread_cpu_s(pid: int) -> float:
    """CPU time of a process's main thread (the one that reads events), from schedstat (ns)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def add_range(topo, fam: int) -> str:
    """The `local` route range in node1's table local, and a route to it from the
    client through node1 (nothing answers ARP/ND for the range's addresses on
    every kernel: IPv6 never does). Returns the VIP inside it."""
    rng, vip = RANGE[fam]
    ip(topo, "node1", f"-{fam}", "route", "add", "local", rng, "dev", "lo", "table", "local")
    ip(topo, "client", f"-{fam}", "route", "add", rng, "via", HOST_ADDRS["node1"][fam == 6], "dev", IFACE)
    return vip


# -- the adapter against the kernel ---------------------------------------------------------------
def test_kernel_presence_counts_every_device_local_routes_and_tentative_v6(topo):
    from nfsreset.kernel import addrs
    from nfsreset.core.presence import Presence

    ip(topo, "node1", "addr", "add", f"{VIP4}/24", "dev", IFACE)
    ip(topo, "node1", "addr", "add", f"{VIP4}/32", "dev", "lo")          # the same VIP on two devices
    ip(topo, "node1", "-6", "addr", "add", f"{VIP6}/64", "dev", IFACE)   # DAD runs (~1 s): tentative
    ip(topo, "node1", "-6", "addr", "add", f"{VIP6_B}/64", "dev", IFACE, "nodad")
    v4_range, v6_range = add_range(topo, 4), add_range(topo, 6)
    away = ("198.51.100.99", "2001:db8::99", "203.0.113.1")
    with netns.entered(topo.ns("node1")):
        seen = addrs.presence([VIP4, VIP6, VIP6_B, v4_range, v6_range, *away])
    assert seen[VIP4] == Presence(True, True)
    assert seen[VIP6] == Presence(True, False), "a tentative address is configured, not yet usable"
    assert seen[VIP6_B] == Presence(True, True)
    assert seen[v4_range] == Presence(True, True) and seen[v6_range] == Presence(True, True)
    assert all(seen[v] == Presence(False, False) for v in away)
    # What `ip route get` (and nft `fib saddr type`) say, for the ranges.
    for v in (v4_range, v6_range):
        assert topo.run("node1", "ip", "route", "get", v).stdout.startswith("local "), v
    ip(topo, "node1", "addr", "del", f"{VIP4}/32", "dev", "lo")
    topo.wait_usable("node1", VIP6)
    with netns.entered(topo.ns("node1")):
        seen = addrs.presence([VIP4, VIP6])
        local = addrs.local_ips(vips=[v4_range])
    assert seen == {VIP4: Presence(True, True), VIP6: Presence(True, True)}
    assert {VIP4, VIP6, VIP6_B, v4_range} <= local and v6_range not in local


# -- item 2: an address on two devices, then a replace ------------------------------------------------
@pytest.mark.parametrize("fam", [4, 6])
def test_watch_ignores_the_vip_added_and_removed_on_lo_and_replaced(scene, fam):
    """`watch` with the VIP on eth0: adding and removing it on lo, then `ip addr
    replace` on eth0, must not log "left", quarantine it, or end its sessions
    (the old code logged "left", then "arrived" and destroyed both)."""
    topo = scene.topo
    vip, mark = (VIP4, VIP6)[fam == 6], MARK[fam]
    topo.add_addr("node1", vip, nodad=True)
    clients = [scene.connect(vip, 43001), scene.connect(vip, 43002)]
    assert alive(scene, *clients)
    with watching(scene, vip, mark) as err:
        assert err.wait_for(rf"{vip} is configured here", 5), err.text()
        ip(topo, "node1", "addr", "add", f"{vip}/{plen(vip, True)}", "dev", "lo")
        ip(topo, "node1", "addr", "del", f"{vip}/{plen(vip, True)}", "dev", "lo")
        ip(topo, "node1", "addr", "replace", f"{vip}/{plen(vip)}", "dev", IFACE,
           *(["nodad"] if fam == 6 else []))
        topo.add_addr("node1", mark, nodad=True)
        assert err.wait_for(rf"{mark} arrived", 5), err.text()
        time.sleep(SETTLE_S)
        text = err.text()
        assert f"{vip} left" not in text and f"{vip} arrived" not in text, text
        assert "destroyed" not in text, text
        assert vip not in quarantined(topo), quarantined(topo)
        assert alive(scene, *clients), text
        # and a real departure is still seen (the re-read is not stuck on "here")
        topo.del_addr("node1", vip)
        assert err.wait_for(rf"{vip} left", 3), err.text()
        assert err.wait_for(r"destroyed 2 of 2 session\(s\)", 3), err.text()


# -- item 3: a VIP local through a `local` route range ---------------------------------------------
@pytest.mark.parametrize("fam", [4, 6])
def test_kill_refuses_a_vip_local_through_a_local_route(scene, fam):
    topo = scene.topo
    vip = add_range(topo, fam)
    c = scene.connect(vip, 44001)
    assert alive(scene, c)
    res = scene.nfsreset("node1", "flows", "--json")   # no --vip: the sessions' addresses are asked about
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["vips"][vip] == {"sessions": 1, "stale": 0, "configured": True}
    res = scene.nfsreset("node1", "kill", "--vip", vip, "--state-dir", scene.state)
    assert res.returncode == 3, res.stderr
    assert "configured on this host" in one_line(res.stderr)
    assert alive(scene, c)
    assert quarantined(topo) == set()
    assert topo.run("node1", "nft", "list", "tables").stdout.strip() == ""


@pytest.mark.parametrize("fam", [4, 6])
def test_watch_sees_a_route_local_vip_as_configured_and_follows_the_route(scene, fam):
    """At start-up the VIP is here (the old code said "away" and ended the live
    session); deleting the route is a departure, adding it back an arrival."""
    topo = scene.topo
    rng, _ = RANGE[fam]
    vip = add_range(topo, fam)
    c = scene.connect(vip, 45001)
    assert alive(scene, c)
    with watching(scene, vip) as err:
        assert err.wait_for(rf"{vip} is configured here", 5), err.text()
        time.sleep(SETTLE_S)
        assert "destroyed" not in err.text() and vip not in quarantined(topo), err.text()
        assert alive(scene, c)
        ip(topo, "node1", f"-{fam}", "route", "del", "local", rng, "dev", "lo", "table", "local")
        assert err.wait_for(rf"{vip} left", 3), err.text()
        assert err.wait_for(r"destroyed 1 of 1 session\(s\)", 3), err.text()
        assert wait_for(lambda: vip in quarantined(topo), 3), err.text()
        ip(topo, "node1", f"-{fam}", "route", "add", "local", rng, "dev", "lo", "table", "local")
        assert err.wait_for(rf"{vip} arrived", 3), err.text()
        assert wait_for(lambda: vip not in quarantined(topo), 3), err.text()


# -- the route subscription must not cost the daemon its events ------------------------------------------
def test_route_churn_is_filtered_in_the_kernel_and_the_vip_still_followed(scene):
    """10,000 ordinary routes loaded at once (a routing daemon's table) never
    reach the daemon: the socket filter drops them in the kernel (without it
    its main thread spent ~40 ms on them). It still acts on the VIP's
    departure at once."""
    topo = scene.topo
    topo.add_addr("node1", VIP4)
    c = scene.connect(VIP4, 46001)
    with watching(scene, VIP4) as err:
        assert err.wait_for(rf"{VIP4} is configured here", 5), err.text()
        batch = "".join(f"route add 10.{i // 250}.{i % 250}.0/24 via {HOST_ADDRS['node2'][0]}\n"
                        for i in range(10000))
        cpu = main_thread_cpu_s(err.proc.pid)
        subprocess.run(topo.exec_argv("node1", "ip", "-batch", "-"), input=batch, text=True,
                       check=True, timeout=60)
        time.sleep(0.3)
        cpu = main_thread_cpu_s(err.proc.pid) - cpu
        print(f"daemon main thread CPU while 10,000 routes were loaded: {cpu * 1000:.1f} ms")
        assert cpu < 0.010, "route notifications reached the daemon"   # ~40 ms when they do
        started = time.monotonic()
        topo.del_addr("node1", VIP4)
        assert err.wait_for(r"destroyed 1 of 1 session\(s\)", 3), err.text()
        took = time.monotonic() - started
        print(f"VIP departure acted on {took:.3f} s after ip addr del, 10,000 routes loaded just before")
        assert took < 1.0, err.text()
        assert "events lost" not in err.text(), err.text()
        assert c.wait_dead(0.1) is None   # ended in node1's kernel, not reset towards the client


def test_watch_v6_arrival_during_dad_then_usable(scene):
    """Kept as it was: an IPv6 VIP that arrives tentative is here at once (old
    sockets ended, quarantine lifted); it is announced only once DAD is done."""
    topo = scene.topo
    with watching(scene, VIP6) as err:
        assert err.wait_for(rf"{VIP6} is away", 5), err.text()
        assert wait_for(lambda: VIP6 in quarantined(topo), 3), err.text()
        topo.add_addr("node1", VIP6)                      # with DAD (~1-2 s here)
        assert err.wait_for(rf"{VIP6} arrived \(tentative: waiting for DAD\)", 3), err.text()
        assert wait_for(lambda: VIP6 not in quarantined(topo), 3), err.text()
        topo.wait_usable("node1", VIP6)
        assert err.wait_for(rf"{VIP6} usable \(DAD done\)", 3), err.text()
        assert err.wait_for(rf"announced {VIP6} on {IFACE}", 3), err.text()
        text = err.text()
        assert text.index(f"{VIP6} usable (DAD done)") < text.index(f"announced {VIP6}"), text
        assert text.count(f"{VIP6} arrived") == 1 and f"{VIP6} left" not in text, text


@pytest.mark.parametrize("fam", [4, 6])
def test_watch_sees_four_vips_leave_at_once(scene, fam):
    """Four watched VIPs deleted in one `ip -batch`: every departure is acted on
    at once. (The old pyroute2 event socket read datagrams ahead into a queue of
    its own and handed out one per select wakeup: the other VIPs' events waited
    for whatever event came next.)"""
    topo = scene.topo
    vips = VIPS_OF[fam]
    for v in vips:
        topo.add_addr("node1", v, nodad=True)
    clients = [scene.connect(v, 47100 + i) for i, v in enumerate(vips)]
    assert alive(scene, *clients)
    with watching(scene, *vips) as err:
        for v in vips:
            assert err.wait_for(rf"{v} is configured here", 5), err.text()
        batch = "".join(f"addr del {v}/{plen(v)} dev {IFACE}\n" for v in vips)
        started = time.monotonic()
        subprocess.run(topo.exec_argv("node1", "ip", "-batch", "-"), input=batch, text=True,
                       check=True, timeout=20)
        for v in vips:
            assert err.wait_for(rf"destroyed 1 of 1 session\(s\) on {v}\b", 1.0), err.text()
        print(f"v{fam}: all departures acted on {time.monotonic() - started:.3f} s after the batch")


def test_event_reader_reports_lost_events_and_goes_on(topo):
    """ENOBUFS on the event socket (a burst larger than its buffer) is reported
    once as lost, and the events queued after it are still read."""
    from nfsreset.kernel.addrs import RTM_NEWADDR
    from nfsreset.daemon.rtnl import RTNL_GROUPS, read_rtnl

    with netns.entered(topo.ns("node1")):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # the kernel's minimum is ~2 KiB
        sock.bind((0, RTNL_GROUPS))
        batch = "".join(f"addr add 203.0.113.{i}/32 dev lo\n" for i in range(1, 201))
        subprocess.run(topo.exec_argv("node1", "ip", "-batch", "-"), input=batch, text=True,
                       check=True, timeout=20)
        msgs, lost = read_rtnl(sock)
        assert lost == "receive buffer full" and len(msgs) < 200, (lost, len(msgs))   # what fitted is read after it
        ip(topo, "node1", "addr", "add", "203.0.113.250/32", "dev", "lo")
        msgs, lost = read_rtnl(sock)
        assert not lost and RTM_NEWADDR in {m["header"]["type"] for m in msgs}   # and the socket goes on
        assert "203.0.113.250" in {m.get_attr("IFA_LOCAL") for m in msgs}
    finally:
        sock.close()
