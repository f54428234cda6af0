"""State dir: atomic, root-only, refuses what it cannot trust. (Runs as any user;
ownership checks need root to create a root-owned file and are skipped otherwise.)"""
import json
import os
import stat

import pytest

from nfsreset.core.model import FlowKey
from nfsreset.state.statedir import MAX_ENTRIES, StateDir, StateError, StateUnsafe

VIP = "198.51.100.10"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks expect root-owned files")


@root_only
def test_round_trip_is_0600_and_atomic(tmp_path):
    sd = StateDir(str(tmp_path / "s"))
    keys = [FlowKey(VIP, 2049, "198.51.100.100", 800), FlowKey(VIP, 2049, "198.51.100.101", 799)]
    assert sd.write_clients(VIP, keys) == 2
    assert sorted(sd.read_clients(VIP)) == sorted(keys)
    path = tmp_path / "s" / f"{VIP}.clients.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".tmp-")]


@root_only
def test_empty_write_keeps_previous_clients(tmp_path):
    sd = StateDir(str(tmp_path / "s"))
    k = FlowKey(VIP, 2049, "198.51.100.100", 800)
    sd.write_clients(VIP, [k])
    assert sd.write_clients(VIP, []) == 0
    assert sd.read_clients(VIP) == [k]


@root_only
def test_entries_are_capped(tmp_path):
    sd = StateDir(str(tmp_path / "s"), max_entries=10)
    keys = [FlowKey(VIP, 2049, "198.51.100.100", p) for p in range(1, 50)]
    assert sd.write_clients(VIP, keys) == 10


@root_only
def test_world_writable_dir_or_file_is_refused(tmp_path):
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o777)
    with pytest.raises(StateUnsafe, match="world-writable"):
        StateDir(str(d))
    os.chmod(d, 0o700)
    sd = StateDir(str(d))
    sd.write_clients(VIP, [FlowKey(VIP, 2049, "198.51.100.100", 800)])
    os.chmod(d / f"{VIP}.clients.json", 0o666)
    with pytest.raises(StateUnsafe):
        sd.read_clients(VIP)


@root_only
def test_file_not_owned_by_root_is_refused(tmp_path):
    sd = StateDir(str(tmp_path / "s"))
    sd.write_clients(VIP, [FlowKey(VIP, 2049, "198.51.100.100", 800)])
    os.chown(tmp_path / "s" / f"{VIP}.clients.json", 65534, 65534)
    with pytest.raises(StateUnsafe, match="not root"):
        sd.read_clients(VIP)


@root_only
@pytest.mark.parametrize("content", [b"{not json", b"[]", json.dumps({"format": 1, "clients": [[2049, "x", 1]]}).encode(),
                                     json.dumps({"format": 1, "clients": [[2049, "2001:db8::1", 1]]}).encode(),
                                     json.dumps({"format": 1, "clients": [[0, "198.51.100.1", 1]]}).encode()])
def test_bad_content_is_refused_with_a_reason(tmp_path, content):
    sd = StateDir(str(tmp_path / "s"))
    p = tmp_path / "s" / f"{VIP}.clients.json"
    p.write_bytes(content)
    os.chmod(p, 0o600)
    with pytest.raises(StateError) as e:
        sd.read_clients(VIP)
    assert str(p) in str(e.value) and e.value.exit_code == 2


@root_only
def test_pending_is_per_node_and_cleared(tmp_path):
    sd = StateDir(str(tmp_path / "s"))
    k = FlowKey(VIP, 2049, "198.51.100.100", 800)
    sd.write_pending(VIP, {k: 1234}, node="a")
    assert sd.read_pending(VIP, node="a") == {k: 1234}
    assert sd.read_pending(VIP, node="b") == {}
    sd.clear_pending(VIP, node="a")
    assert sd.read_pending(VIP, node="a") == {}


def test_cap_constant_is_sane():
    assert 1000 <= MAX_ENTRIES <= 1_000_000


# --- the state dir as untrusted input (issue 10, item 7 and 8) --------------------------
import contextlib
import math
import signal

from nfsreset.core.model import client_address
from nfsreset.state.statedir import MAX_CLIENTS_PER_VIP, MAX_FILE_BYTES, boot_id

VIP6 = "2001:db8::10"


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail, instead of hanging the suite, if the body blocks (a FIFO's open())."""
    def expired(*_):
        raise TimeoutError(f"still blocked after {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Lines(list):
    def __call__(self, line):
        self.append(line)


def _sd(tmp_path, **kw):
    lines = Lines()
    return StateDir(str(tmp_path / "s"), log=lines, **kw), lines


def _put(tmp_path, name, doc) -> str:
    p = tmp_path / "s" / name
    p.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    os.chmod(p, 0o600)
    return str(p)


def clients_doc(rows, vip=VIP, **kw):
    return {"format": 1, "vip": vip, "written": 1.0, "node": "n", "clients": rows, **kw}


def pending_doc(rows, cookies, vip=VIP, **kw):
    return {"format": 1, "vip": vip, "written": 1.0, "mono": 5.0, "ticks": 1718000000, "boot_id": boot_id(),
            "pending": rows, "cookies": cookies, **kw}


BAD_DOCS = [
    pytest.param(b"123", "not an nfsreset state file", id="number"),
    pytest.param(b"null", "not an nfsreset state file", id="null"),
    pytest.param(b"[[2049, \"198.51.100.100\", 800]]", "not an nfsreset state file", id="list"),
    pytest.param(b"\"text\"", "not an nfsreset state file", id="string"),
    pytest.param(b"{not json", "does not parse as JSON", id="not-json"),
    pytest.param(b"[" * 100000 + b"]" * 100000, "does not parse as JSON", id="nested-100000-deep"),
    pytest.param(clients_doc(123), "'clients' is 123, not a list", id="clients-123"),
    pytest.param(clients_doc(None), "'clients' is None, not a list", id="clients-null"),
    pytest.param(clients_doc({"a": 1}), "not a list", id="clients-object"),
    pytest.param(clients_doc("198.51.100.100"), "not a list", id="clients-string"),
    pytest.param({"format": True, "vip": VIP, "clients": []}, "not an nfsreset state file", id="format-true"),
    pytest.param({"format": 2, "vip": VIP, "clients": []}, "not an nfsreset state file", id="format-2"),
    pytest.param({"format": 1, "clients": []}, "holds 'vip' None", id="no-vip"),
    pytest.param(clients_doc([], vip="198.51.100.11"), "not 198.51.100.10", id="other-vip"),
    pytest.param(clients_doc([], written="yesterday"), "'written'", id="written-string"),
    pytest.param(b'{"format": 1, "vip": "198.51.100.10", "written": NaN, "clients": []}', "'written'", id="written-nan"),
    pytest.param(clients_doc([], node=5), "'node'", id="node-number"),
    pytest.param(clients_doc([[2049, "2001:db8::1", 800]]), "refused all 1 client tuple(s)", id="all-refused"),
]


@root_only
@pytest.mark.parametrize("doc, why", BAD_DOCS)
def test_a_clients_file_of_the_wrong_shape_is_refused_whole_with_one_reason(tmp_path, doc, why):
    sd, lines = _sd(tmp_path)
    path = _put(tmp_path, f"{VIP}.clients.json", doc)
    with pytest.raises(StateError) as e:
        sd.read_clients(VIP)
    msg = str(e.value)
    assert why in msg and path in msg and e.value.exit_code == 2, msg
    assert "\n" not in msg and len(msg) < 400, msg


@root_only
@pytest.mark.parametrize("make, kind", [
    (lambda p: os.mkdir(p), "a directory"),
    (lambda p: os.mkfifo(p, 0o600), "a FIFO"),
    (lambda p: os.symlink("/etc/hostname", p), "a symbolic link"),
    (lambda p: os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 3)), "a character device"),
], ids=["dir", "fifo", "symlink", "chardev"])
def test_a_state_file_that_is_not_a_regular_file_is_refused_and_never_blocks(tmp_path, make, kind):
    sd, _ = _sd(tmp_path)
    for name, read in ((f"{VIP}.clients.json", lambda: sd.read_clients(VIP)),
                       (f"{VIP}.pending.a.json", lambda: sd.read_pending(VIP, node="a"))):
        p = str(tmp_path / "s" / name)
        make(p)
        with deadline(5), pytest.raises(StateError, match=f"is {kind}, not a regular file") as e:
            read()
        assert e.value.exit_code == 2


@root_only
def test_a_file_over_the_size_bound_is_refused_unread(tmp_path):
    sd, _ = _sd(tmp_path)
    p = tmp_path / "s" / f"{VIP}.clients.json"
    with open(p, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    os.chmod(p, 0o600)
    with pytest.raises(StateError, match="bytes, more than"):
        sd.read_clients(VIP)


BAD_RECORDS = [   # (record, reason): each must be refused on its own, the good ones kept
    ([2049, "fe80::1%eth0", 800], "has a zone", VIP6),
    ([2049, "fe80::1", 800], "is link-local", VIP6),
    ([2049, "169.254.1.1", 800], "is link-local", VIP),
    ([2049, "224.0.0.1", 800], "is multicast", VIP),
    ([2049, "ff02::1", 800], "is multicast", VIP6),
    ([2049, "255.255.255.255", 800], "is the broadcast address", VIP),
    ([2049, "240.0.0.1", 800], "is reserved", VIP),
    ([2049, "0.0.0.0", 800], "is unspecified", VIP),
    ([2049, "::", 800], "is unspecified", VIP6),
    ([2049, "0.1.2.3", 800], "this network", VIP),
    ([2049, "127.0.0.1", 800], "is loopback", VIP),
    ([2049, "::1", 800], "is loopback", VIP6),
    ([2049, "::ffff:127.0.0.1", 800], "is loopback", VIP),
    ([2049, "2001:db8::1", 800], "is not of the VIP's family", VIP),
    ([2049, "198.51.100.100", 800], "is not of the VIP's family", VIP6),
    ([2049, "198.51.100.10", 800], "is the VIP itself", VIP),
    ([2049, "198.51.100.0100", 800], "is not an IP address", VIP),
    ([2049, " 198.51.100.100", 800], "is not an IP address", VIP),
    ([2049, "x" * 10000, 800], "is not an IP address", VIP),
    ([2049, 3325256804, 800], "is not an address string", VIP),
    ([2049, 123, 800], "123 is not an address string", VIP),
    ([2049, None, 800], "None is not an address string", VIP),
    ([2049, ["198.51.100.100"], 800], "is not an address string", VIP),
    ([0, "198.51.100.100", 800], "VIP port 0 is not a TCP port", VIP),
    ([65536, "198.51.100.100", 800], "VIP port 65536 is not a TCP port", VIP),
    ([True, "198.51.100.100", 800], "VIP port True is not a TCP port", VIP),
    ([2049.0, "198.51.100.100", 800], "VIP port 2049.0 is not a TCP port", VIP),
    (["2049", "198.51.100.100", 800], "VIP port '2049' is not a TCP port", VIP),
    ([2049, "198.51.100.100", 0], "client port 0 is not a TCP port", VIP),
    ([2049, "198.51.100.100", 65536], "client port 65536", VIP),
    ([2049, "198.51.100.100", True], "client port True", VIP),
    ([2049, "198.51.100.100", -1], "client port -1", VIP),
    ([2049, "198.51.100.100"], "is not [vport, client, cport]", VIP),
    ({"vport": 2049}, "is not [vport, client, cport]", VIP),
    (None, "is not [vport, client, cport]", VIP),
]


@root_only
@pytest.mark.parametrize("bad, why, vip", BAD_RECORDS, ids=[f"{r!r:.40}" for r, _, _ in BAD_RECORDS])
def test_each_bad_client_record_is_refused_counted_and_the_good_ones_kept(tmp_path, bad, why, vip):
    sd, lines = _sd(tmp_path)
    client = "2001:db8::100" if ":" in vip else "198.51.100.100"
    good = [[2049, client, 801], [2049, client, 802]]
    path = _put(tmp_path, f"{vip}.clients.json", clients_doc([good[0], bad, bad, good[1]], vip=vip))
    got = sd.read_clients(vip)
    assert got == [FlowKey(vip, 2049, client, 801), FlowKey(vip, 2049, client, 802)]
    (line,) = lines
    assert line.startswith(f"refused 2 of 4 client tuple(s) of {vip} in {path}; first: record 1 "), line
    assert why in line and len(line) < 400, line


@root_only
def test_every_bad_record_alone_is_refused_whole(tmp_path):
    sd, _ = _sd(tmp_path)
    _put(tmp_path, f"{VIP}.clients.json", clients_doc([[2049, "224.0.0.1", 800], [2049, "169.254.0.9", 1]]))
    with pytest.raises(StateError, match="refused all 2 client tuple"):
        sd.read_clients(VIP)


@root_only
def test_the_limit_per_vip_is_reported_on_write_and_on_read(tmp_path):
    sd, lines = _sd(tmp_path, max_entries=10)
    keys = [FlowKey(VIP, 2049, "198.51.100.100", p) for p in range(1, 16)]
    assert sd.write_clients(VIP, keys) == 10
    assert lines == [f"kept 10 of 15 client tuple(s) of {VIP} to record (limit 10 per VIP: MAX_CLIENTS_PER_VIP)"]
    lines.clear()
    assert len(sd.read_clients(VIP)) == 10 and lines == []
    path = _put(tmp_path, f"{VIP}.clients.json",
                clients_doc([[2049, "198.51.100.100", p] for p in range(1, 16)]))
    assert len(sd.read_clients(VIP)) == 10
    assert lines == [f"kept 10 of 15 client tuple(s) of {VIP} in {path} (limit 10 per VIP: MAX_CLIENTS_PER_VIP)"]
    lines.clear()
    sd.write_pending(VIP, {k: i + 1 for i, k in enumerate(keys)}, node="a")
    assert lines and lines[0].startswith("kept 10 of 15 pending socket(s)")


@root_only
def test_the_default_limit_is_65536_and_a_longer_list_is_not_cut_silently(tmp_path):
    assert MAX_CLIENTS_PER_VIP == MAX_ENTRIES == 65536
    sd, lines = _sd(tmp_path)
    keys = [FlowKey(VIP, 2049, f"198.51.{100 + p // 60000}.{1 + p % 200}", 1 + p % 60000) for p in range(70000)]
    assert sd.write_clients(VIP, keys) == 65536
    assert lines == [f"kept 65,536 of 70,000 client tuple(s) of {VIP} to record "
                     f"(limit 65,536 per VIP: MAX_CLIENTS_PER_VIP)"]


# --- pending files ----------------------------------------------------------------------
@root_only
def test_pending_round_trip_carries_this_boot_and_the_monotonic_write_time(tmp_path):
    import time
    sd, lines = _sd(tmp_path)
    k = FlowKey(VIP, 2049, "198.51.100.100", 800)
    before = time.clock_gettime(time.CLOCK_MONOTONIC)
    sd.write_pending(VIP, {k: 1234}, node="a")
    after = time.clock_gettime(time.CLOCK_MONOTONIC)
    got = sd.read_pending(VIP, node="a")
    assert got == {k: 1234} and before <= got.mono <= after and abs(got.ticks / 100 - os.times().elapsed) < 5
    p = tmp_path / "s" / f"{VIP}.pending.a.json"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    doc = json.loads(p.read_text())
    assert doc["boot_id"] == boot_id() and len(boot_id()) == 36
    assert lines == []


BAD_PENDING = [
    pytest.param(pending_doc([[2049, "198.51.100.100", 800]], [[1]]), "refused all 1 pending", id="cookies-[[1]]"),
    pytest.param(pending_doc([[2049, "198.51.100.100", 800]], [True]), "refused all 1 pending", id="cookie-true"),
    pytest.param(pending_doc([[2049, "198.51.100.100", 800]], [0]), "refused all 1 pending", id="cookie-0"),
    pytest.param(pending_doc([[2049, "198.51.100.100", 800]], [2**64]), "refused all 1 pending", id="cookie-2**64"),
    pytest.param(pending_doc([[2049, "198.51.100.100", 800]], [1, 2]), "not a list as long as", id="more-cookies"),
    pytest.param(pending_doc([[2049, "198.51.100.100", 800]], None), "not a list as long as", id="cookies-null"),
    pytest.param(pending_doc(5, []), "not a list as long as", id="pending-5"),
    pytest.param({**pending_doc([], []), "mono": None}, "'mono' is None", id="no-mono"),
    pytest.param({**pending_doc([], []), "mono": True}, "'mono' is True", id="mono-true"),
    pytest.param({**pending_doc([], []), "boot_id": 7}, "'boot_id' is 7", id="boot-id-7"),
    pytest.param({**pending_doc([], []), "ticks": 1.5}, "'ticks' is 1.5", id="ticks-float"),
    pytest.param({**pending_doc([], []), "ticks": -1}, "'ticks' is -1", id="ticks-negative"),
    pytest.param({k: v for k, v in pending_doc([], []).items() if k != "boot_id"}, "older nfsreset",
                 id="old-format-no-boot-id"),
    pytest.param(b"{}", "not an nfsreset state file", id="empty-object"),
]


@root_only
@pytest.mark.parametrize("doc, why", BAD_PENDING)
def test_a_bad_pending_file_is_refused_with_one_reason(tmp_path, doc, why):
    sd, _ = _sd(tmp_path)
    path = _put(tmp_path, f"{VIP}.pending.a.json", doc)
    with pytest.raises(StateError) as e:
        sd.read_pending(VIP, node="a")
    assert why in str(e.value) and path in str(e.value) and e.value.exit_code == 2, str(e.value)


@root_only
def test_a_bad_cookie_refuses_its_record_only(tmp_path):
    sd, lines = _sd(tmp_path)
    rows = [[2049, "198.51.100.100", 800], [2049, "198.51.100.100", 801], [2049, "198.51.100.100", 802]]
    _put(tmp_path, f"{VIP}.pending.a.json", pending_doc(rows, [7, [1], None]))
    got = sd.read_pending(VIP, node="a")
    assert got == {FlowKey(VIP, 2049, "198.51.100.100", 800): 7, FlowKey(VIP, 2049, "198.51.100.100", 802): None}
    assert got.mono == 5.0 and got.ticks == 1718000000
    (line,) = lines
    assert line.startswith("refused 1 of 3 pending socket(s)") and "cookie [1] is not a socket cookie" in line


@root_only
def test_a_pending_file_of_another_boot_is_ignored_and_said_so(tmp_path):
    sd, lines = _sd(tmp_path)
    _put(tmp_path, f"{VIP}.pending.a.json",
         {**pending_doc([[2049, "198.51.100.100", 800]], [7]), "boot_id": "00000000-0000-0000-0000-000000000000"})
    got = sd.read_pending(VIP, node="a")
    assert got == {} and got.ticks is None
    (line,) = lines
    assert "written in another boot" in line


# --- the per-record address check, shared with the command line --------------------------
@pytest.mark.parametrize("text, vip, want", [
    ("198.51.100.100", VIP, "198.51.100.100"),
    ("::ffff:198.51.100.100", VIP, "198.51.100.100"),
    ("2001:DB8::0:100", VIP6, "2001:db8::100"),
    ("203.0.113.5", None, "203.0.113.5"),
])
def test_client_address_canonicalises_good_addresses(text, vip, want):
    assert client_address(text, vip) == want


@pytest.mark.parametrize("bad, why, vip", [(r[1], w, v) for r, w, v in BAD_RECORDS
                                            if isinstance(r, list) and len(r) == 3 and type(r[0]) is int and r[0] == 2049
                                            and r[2] == 800])
def test_client_address_says_why_not(bad, why, vip):
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("(", r"\(")):
        client_address(bad, vip)


def test_no_nan_or_infinite_number_slips_through_as_a_port():
    with pytest.raises(ValueError):
        from nfsreset.state.statedir import _row
        _row([math.nan, "198.51.100.100", 800], VIP)


@root_only
def test_a_directory_where_the_file_should_be_fails_the_write_with_a_reason_and_no_temp_file(tmp_path):
    sd, _ = _sd(tmp_path)
    os.mkdir(tmp_path / "s" / f"{VIP}.clients.json")
    with pytest.raises(StateError, match=f"cannot write .*{VIP}.clients.json: Is a directory"):
        sd.write_clients(VIP, [FlowKey(VIP, 2049, "198.51.100.100", 800)])
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".tmp-")]
