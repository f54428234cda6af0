"""The state dir is untrusted input (issue 10, item 7 and the state-file part of 8).

End to end, with `nfsreset tickle` as the agent runs it (a fresh process inside
the node) and every packet that reaches the client counted on the client's eth0:
- a state file of a bad shape, or whose every record is bad (link-local with a
  zone, multicast, the wrong family, ports 0 / 65536 / true...), a directory or a
  FIFO where the file should be: exit 2, one line, nothing sent, nothing changed,
  and the FIFO does not hang the hook;
- a file with some bad records: the good ones are tickled, one line counts the rest;
- a pending file naming the cookie of a live session on a configured VIP (forged:
  root-owned, in the format the old code accepted): the session survives;
- the tickle is paced and bounded (--rate, --max-packets), measured at the client;
- the live table of `watch` (sequence numbers of live sessions) is root-only.
"""
from __future__ import annotations

import json
import os
import select
import socket
import stat
import struct
import subprocess
import threading
import time

import pytest

from nfsreset.kernel import netns, sockdiag
from nfsreset.lab.topology import HOST_ADDRS, IFACE, VIP4, VIP6
from tests.ns.scene import NFS_PORT, NFSRESET, VIPS, nft_tables, one_line, wait_until

pytestmark = [pytest.mark.netns]

ETH_P_ALL, ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0003, 0x0800, 0x0806, 0x86DD
PACKET_OUTGOING = 4
SO_RCVBUFFORCE, SO_TIMESTAMPNS = 33, 35
CLIENT4, CLIENT6 = HOST_ADDRS["client"][0], HOST_ADDRS["client"][1]


class Capture:
    """Frames that reach the client namespace's eth0 from a VIP: tickle ACKs (bare
    ACKs from VIP:2049) and announcements (ARP / NA about the VIP), with the
    kernel's receive time. A thread reads until stop(); bounded in time."""

    def __init__(self, topo, vip: str, limit_s: float = 60.0):
        self.vip = vip
        with netns.entered(topo.ns("client")):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind((IFACE, ETH_P_ALL))
        self.tickles: list[tuple[float, int]] = []      # (receive time, client port)
        self.announces = 0
        self.stopping = threading.Event()
        self.deadline = time.monotonic() + limit_s
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            r, _, _ = select.select([self.sock], [], [], 0.05)
            if not r:
                continue
            frame, anc, _, addr = self.sock.recvmsg(2048, 64)
            if addr[2] == PACKET_OUTGOING:
                continue
            ts = next((struct.unpack("ll", d[:16]) for lvl, typ, d in anc
                       if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS), None)
            t = ts[0] + ts[1] / 1e9 if ts else time.time()
            kind, cport = self._classify(frame)
            if kind == "tickle":
                self.tickles.append((t, cport))
            elif kind == "announce":
                self.announces += 1

    def _classify(self, frame: bytes):
        if len(frame) < 14:
            return None, None
        (etype,) = struct.unpack_from("!H", frame, 12)
        if etype == ETH_P_ARP and len(frame) >= 42:
            return ("announce" if socket.inet_ntop(socket.AF_INET, frame[28:32]) == self.vip else None), None
        if etype == ETH_P_IP and len(frame) >= 34:
            if frame[23] != socket.IPPROTO_TCP or socket.inet_ntop(socket.AF_INET, frame[26:30]) != self.vip:
                return None, None
            tcp = 14 + (frame[14] & 0x0F) * 4
        elif etype == ETH_P_IPV6 and len(frame) >= 54:
            src = socket.inet_ntop(socket.AF_INET6, frame[22:38])
            if frame[20] == 58 and len(frame) >= 78 and frame[54] == 136:
                return ("announce" if self.vip in (src, socket.inet_ntop(socket.AF_INET6, frame[62:78]))
                        else None), None
            if frame[20] != socket.IPPROTO_TCP or src != self.vip:
                return None, None
            tcp = 54
        else:
            return None, None
        if len(frame) < tcp + 14:
            return None, None
        sport, dport = struct.unpack_from("!HH", frame, tcp)
        return ("tickle" if sport == NFS_PORT and frame[tcp + 13] & 0x17 == 0x10 else None), dport

    def stop(self, settle: float = 0.2) -> "Capture":
        time.sleep(settle)          # frames in flight
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()
        return self


@pytest.fixture
def capture(scene):
    caps = []

    def start(vip: str) -> Capture:
        c = Capture(scene.topo, vip)
        caps.append(c)
        return c
    yield start
    for c in caps:
        if not c.stopping.is_set():
            c.stop(0)


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _state_dir(scene) -> str:
    os.makedirs(scene.state, mode=0o700, exist_ok=True)
    return scene.state


def _put(scene, name: str, content) -> str:
    path = os.path.join(_state_dir(scene), name)
    if callable(content):
        content(path)
    else:
        with open(path, "wb") as f:
            f.write(content if isinstance(content, bytes) else json.dumps(content).encode())
        os.chmod(path, 0o600)
    return path


def _clients(vip: str, rows) -> dict:
    return {"format": 1, "vip": vip, "written": time.time(), "node": "peer", "clients": rows}


def _listing(d: str) -> dict:
    return {n: (os.lstat(os.path.join(d, n)).st_mode, os.lstat(os.path.join(d, n)).st_mtime_ns)
            for n in sorted(os.listdir(d))}


# -- 1. a bad clients file: exit 2, one line, nothing sent -------------------------------------
BAD_CLIENT_FILES = [
    pytest.param(4, b"123", "is not an nfsreset state file", id="v4-number"),
    pytest.param(4, b"null", "is not an nfsreset state file", id="v4-null"),
    pytest.param(4, b'[[2049, "203.0.113.9", 800]]', "is not an nfsreset state file", id="v4-a-list"),
    pytest.param(4, _clients(VIP4, [[2049, 123, 800]]), "123 is not an address string", id="v4-client-123"),
    pytest.param(4, _clients(VIP4, [[2049, None, 800]]), "None is not an address string", id="v4-client-null"),
    pytest.param(4, _clients(VIP4, [[2049, [CLIENT4], 800]]), "is not an address string", id="v4-client-a-list"),
    pytest.param(4, _clients(VIP4, 123), "'clients' is 123, not a list", id="v4-clients-123"),
    pytest.param(4, _clients(VIP4, None), "'clients' is None, not a list", id="v4-clients-null"),
    pytest.param(4, lambda p: os.mkdir(p, 0o700), "is a directory, not a regular file", id="v4-directory"),
    pytest.param(4, lambda p: os.mkfifo(p, 0o600), "is a FIFO, not a regular file", id="v4-fifo"),
    pytest.param(6, _clients(VIP6, [[2049, "fe80::12%eth0", 800]]), "has a zone", id="v6-link-local-zone"),
    pytest.param(6, _clients(VIP6, [[2049, "fe80::12", 800]]), "is link-local", id="v6-link-local"),
    pytest.param(4, _clients(VIP4, [[2049, "224.0.0.1", 800], [2049, "198.51.100.255", 0]]), "is multicast",
                 id="v4-multicast"),
    pytest.param(6, _clients(VIP6, [[2049, "ff02::1", 800]]), "is multicast", id="v6-multicast"),
    pytest.param(4, _clients(VIP4, [[2049, "255.255.255.255", 800]]), "broadcast", id="v4-broadcast"),
    pytest.param(4, _clients(VIP4, [[2049, "2001:db8::100", 800]]), "not of the VIP's family", id="v4-mixed-family"),
    pytest.param(4, _clients(VIP4, [[2049, CLIENT4, 0]]), "client port 0 is not a TCP port", id="v4-port-0"),
    pytest.param(4, _clients(VIP4, [[2049, CLIENT4, 65536]]), "client port 65536", id="v4-port-65536"),
    pytest.param(4, _clients(VIP4, [[True, CLIENT4, 800]]), "VIP port True", id="v4-port-true"),
]


@pytest.mark.parametrize("fam, content, why", BAD_CLIENT_FILES)
def test_tickle_with_a_bad_clients_file_exits_2_with_one_line_and_sends_nothing(scene, capture, fam, content, why):
    vip = VIPS[fam][0]
    scene.topo.add_addr("node2", vip, nodad=True)
    path = _put(scene, f"{vip}.clients.json", content)
    before = _listing(scene.state)
    cap = capture(vip)
    started = time.monotonic()
    res = scene.nfsreset("node2", "tickle", "--vip", vip, "--state-dir", scene.state, timeout=20)
    took = time.monotonic() - started
    cap.stop()
    assert res.returncode == 2, (res.returncode, res.stderr)
    line = one_line(res.stderr)
    assert line.startswith("nfsreset tickle: ") and why in line and path in line, line
    assert took < 5.0, f"tickle took {took:.1f} s"
    assert cap.tickles == [] and cap.announces == 0, "sent packets although the input was refused"
    assert _listing(scene.state) == before
    assert nft_tables(scene.topo, "node2") == ""


# -- 2. a bad pending file: the same ------------------------------------------------------------
def _node_id(scene, node: str) -> str:
    return f"{socket.gethostname()}-{os.stat(f'/run/netns/{scene.topo.ns(node)}').st_ino}"


def _pending(vip: str, rows, cookies, **kw) -> dict:
    return {"format": 1, "vip": vip, "written": time.time(), "pending": rows, "cookies": cookies,
            "ticks": round(os.times().elapsed * 100), "mono": time.clock_gettime(time.CLOCK_MONOTONIC),
            "boot_id": boot_id(), **kw}


@pytest.mark.parametrize("content, why", [
    pytest.param(_pending(VIP4, [[2049, CLIENT4, 800]], [[1]]), "cookie [1] is not a socket cookie", id="cookies-[[1]]"),
    pytest.param({k: v for k, v in _pending(VIP4, [[2049, CLIENT4, 800]], [7]).items() if k != "ticks"},
                 "'ticks' is None", id="no-write-time"),
    pytest.param(lambda p: os.mkfifo(p, 0o600), "is a FIFO", id="fifo"),
])
def test_tickle_with_a_bad_pending_file_exits_2_with_one_line_and_sends_nothing(scene, capture, content, why):
    vip = VIP4
    scene.topo.add_addr("node2", vip, nodad=True)
    path = _put(scene, f"{vip}.pending.{_node_id(scene, 'node2')}.json", content)
    cap = capture(vip)
    res = scene.nfsreset("node2", "tickle", "--vip", vip, "--state-dir", scene.state, "--client",
                         f"{CLIENT4}:800", timeout=20)
    cap.stop()
    assert res.returncode == 2, (res.returncode, res.stderr)
    line = one_line(res.stderr)
    assert line.startswith("nfsreset tickle: ") and why in line and path in line, line
    assert cap.tickles == [] and cap.announces == 0
    assert nft_tables(scene.topo, "node2") == ""


def test_a_bad_pending_file_is_found_with_netns_too(scene, capture):
    """Pending files are named after the node's network namespace: `--netns`
    from outside must check the node's file, not the host's."""
    vip = VIP4
    scene.topo.add_addr("node2", vip, nodad=True)
    path = _put(scene, f"{vip}.pending.{_node_id(scene, 'node2')}.json",
                _pending(vip, [[2049, CLIENT4, 800]], [[1]]))
    cap = capture(vip)
    res = subprocess.run([NFSRESET, "tickle", "--vip", vip, "--state-dir", scene.state, "--client", f"{CLIENT4}:800",
                          "--netns", scene.topo.ns("node2")], capture_output=True, text=True, timeout=20)
    cap.stop()
    assert res.returncode == 2, res.stderr
    assert path in one_line(res.stderr)
    assert cap.tickles == [] and cap.announces == 0


# -- 3. some bad records: the good ones are used, the rest counted in one line --------------------
def test_tickle_uses_the_good_records_and_counts_the_refused_ones_in_one_line(scene, capture):
    vip = VIP4
    scene.topo.add_addr("node2", vip, nodad=True)
    rows = [[2049, CLIENT4, 801], [2049, "fe80::1%eth0", 802], [2049, "224.0.0.5", 803], [2049, CLIENT4, 804],
            [2049, CLIENT4, 0]]
    path = _put(scene, f"{vip}.clients.json", _clients(vip, rows))
    cap = capture(vip)
    res = scene.nfsreset("node2", "tickle", "--vip", vip, "--state-dir", scene.state, "--rounds", "1", "--json")
    cap.stop()
    assert res.returncode == 0, res.stderr
    refused = [ln for ln in res.stderr.splitlines() if "refused" in ln]
    assert refused == [f"nfsreset tickle: refused 3 of 5 client tuple(s) of {vip} in {path}; first: record 1 "
                       f"[2049, 'fe80::1%eth0', 802]: 'fe80::1%eth0' has a zone: scoped (link-local) "
                       f"addresses are refused"], res.stderr
    assert sorted(p for _, p in cap.tickles) == [801, 804]
    tickle = next(s for s in json.loads(res.stdout)["steps"] if s["action"] == "tickle")
    assert tickle["tuples"] == 2 and tickle["sent"] == 2


# -- 4. a forged pending file never ends a live session -----------------------------------------------
def _cookie(scene, node: str, vip: str, cport: int) -> int:
    with netns.entered(scene.topo.ns(node)):
        pairs = sockdiag.dump(local_ips=[vip], local_ports=[NFS_PORT])
    (cookie,) = [f.cookie for f, _ in pairs if f.key.cport == cport]
    return cookie


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("forgery", ["written-now", "another-boot"])
def test_a_forged_pending_file_naming_a_live_session_does_not_end_it(scene, fam, forgery):
    vip = VIPS[fam][0]
    scene.topo.add_addr("node1", vip, nodad=True)
    time.sleep(0.05)      # the session is made after the VIP arrived: live
    c = scene.connect(vip, 46001)
    assert c.echo()
    cookie = _cookie(scene, "node1", vip, c.cport)
    # Root-owned, 0600, in the format the old `tickle` honoured (format 1, pending
    # and cookies), plus this version's clock fields.
    doc = _pending(vip, [[NFS_PORT, c.ip, c.cport]], [cookie])
    if forgery == "another-boot":
        doc["ticks"], doc["boot_id"] = 1, "00000000-0000-4000-8000-000000000000"
    path = _put(scene, f"{vip}.pending.{_node_id(scene, 'node1')}.json", doc)
    res = scene.nfsreset("node1", "tickle", "--vip", vip, "--state-dir", scene.state, "--client",
                         f"[{c.ip}]:700" if fam == 6 else f"{c.ip}:700", "--rounds", "1", "--json")
    assert res.returncode == 0, res.stderr
    assert c.echo(), "the live session was ended"
    assert c.echo() and scene.holds("node1", c)
    assert not [s for s in json.loads(res.stdout)["steps"] if s["action"] in ("destroy", "rst", "guard")]
    said = "written in another boot" if forgery == "another-boot" else "may have been written after"
    assert said in res.stderr, res.stderr
    if forgery == "written-now":
        assert f"1 pending socket(s) of {vip} not honoured" in res.stderr
    else:
        assert os.path.exists(path), "a file of another boot is left for the operator to see"


# -- 5. pacing: bounded per second and per call, observed at the client ------------------------------
def _write_clients(scene, vip: str, n: int) -> None:
    _put(scene, f"{vip}.clients.json", _clients(vip, [[NFS_PORT, CLIENT4, 1024 + i] for i in range(n)]))


def _max_in_window(times: list[float], window: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_tickle_paces_itself_at_rate_and_stops_at_max_packets(scene, capture):
    vip = VIP4
    scene.topo.add_addr("node2", vip, nodad=True)
    _write_clients(scene, vip, 1500)
    cap = capture(vip)
    res = scene.nfsreset("node2", "tickle", "--vip", vip, "--state-dir", scene.state, "--rounds", "1",
                         "--rate", "5000", "--json")
    cap.stop()
    assert res.returncode == 0, res.stderr
    times = sorted(t for t, _ in cap.tickles)
    assert len(times) == 1500
    span = times[-1] - times[0]
    window = _max_in_window(times, 0.1)
    print(f"--rate 5000, 1500 tuples: sent over {span:.3f} s ({1499 / span:.0f}/s), "
          f"at most {window} in any 100 ms")
    assert span >= 0.28                   # 1500 at 5000/s: 0.3 s less one 2 ms batch
    assert window <= 5000 * 0.1 + 10 + 25      # rate x window + one batch (+ scheduling jitter)

    cap = capture(vip)
    res = scene.nfsreset("node2", "tickle", "--vip", vip, "--state-dir", scene.state, "--rounds", "3",
                         "--max-packets", "2000", "--json")
    cap.stop()
    assert res.returncode == 0, res.stderr
    step = next(s for s in json.loads(res.stdout)["steps"] if s["action"] == "tickle")
    assert step["sent"] == 2000 and step["capped"] is True, step
    assert len(cap.tickles) == 2000
    assert "stopped at --max-packets 2,000" in res.stderr


def test_ten_thousand_tuples_at_the_default_rate(scene, capture):
    """The measurement for docs/internals.md: default rate, one round."""
    from nfsreset.core.pace import TICKLE_RATE_PPS
    vip = VIP4
    scene.topo.add_addr("node2", vip, nodad=True)
    _write_clients(scene, vip, 10_000)
    cap = capture(vip)
    started = time.monotonic()
    res = scene.nfsreset("node2", "tickle", "--vip", vip, "--state-dir", scene.state, "--rounds", "1", "--json")
    took = time.monotonic() - started
    cap.stop()
    assert res.returncode == 0, res.stderr
    times = sorted(t for t, _ in cap.tickles)
    span = times[-1] - times[0]
    step = next(s for s in json.loads(res.stdout)["steps"] if s["action"] == "tickle")
    print(f"10,000 tuples at the default {TICKLE_RATE_PPS:,}/s: {len(times)} ACKs seen at the client over "
          f"{span:.3f} s = {(len(times) - 1) / span:,.0f}/s, at most {_max_in_window(times, 0.1)} in any 100 ms; "
          f"tickle step {step['ms']:.0f} ms (incl. {0.5:.1f} s linger), exec to exit {took:.2f} s")
    assert len(times) == 10_000
    assert (len(times) - 1) / span <= TICKLE_RATE_PPS * 1.05
    assert _max_in_window(times, 0.1) <= TICKLE_RATE_PPS * 0.1 + 50 + 50


# -- 6. the live table of `watch` is root-only -------------------------------------------------------------
def test_the_live_table_is_0600_and_flows_still_reads_it_as_root(scene):
    from nfsreset.daemon.livetable import RUN_DIR, live_table_path, read_live_table
    topo = scene.topo
    topo.add_addr("node1", VIP4, nodad=True)
    c = scene.connect(VIP4, 46101)
    ino = os.stat(f"/run/netns/{topo.ns('node1')}").st_ino
    path = live_table_path(ino)
    old_umask = os.umask(0o022)
    proc = scene.popen("node1", "watch", "--vip", VIP4, "--state-dir", scene.state, "--no-bpf",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.umask(old_umask)
    try:
        assert wait_until(lambda: read_live_table(ino) is not None, 30.0) is not None
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == 0o600, oct(mode)
        assert os.stat(RUN_DIR).st_uid == 0 and not os.stat(RUN_DIR).st_mode & 0o022
        nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", path],
                                capture_output=True, text=True, timeout=10)
        assert nobody.returncode != 0 and "Permission denied" in nobody.stderr, nobody
        res = scene.nfsreset("node1", "flows", "--vip", VIP4, "--json")
        assert json.loads(res.stdout)["source"] == f"watch pid {proc.pid}", res.stdout + res.stderr
        assert c.echo()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
