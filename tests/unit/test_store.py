"""nfsreset.state.store: the attrd encoding round-trips, and what is read back is
validated like a state file (family, scope, ports, limits), refused in one line."""
from __future__ import annotations

import base64
import gzip
import subprocess
import zlib

import pytest

from nfsreset.state import store
from nfsreset.core.model import FlowKey
from nfsreset.state.statedir import StateError

VIP4, VIP6 = "198.51.100.10", "2001:db8::10"


def keys(vip, n):
    base = "203.0.113." if ":" not in vip else "2001:db8:1::"
    return [FlowKey(vip, 2049, f"{base}{1 + i % 200:x}" if ":" in vip else f"{base}{1 + i % 200}",
                    1024 + i // 200) for i in range(n)]


def raw_value(text: str) -> str:
    return store.PREFIX + base64.b64encode(gzip.compress(text.encode(), mtime=0)).decode()


@pytest.mark.parametrize("vip", [VIP4, VIP6])
@pytest.mark.parametrize("n", [1, 10, 1000, 10000])
def test_round_trip(vip, n):
    ks = keys(vip, n)
    value, kept = store.encode(ks + ks[:5])      # duplicates count once
    assert kept == n and value.startswith("g1:") and len(value) <= store.MAX_VALUE_CHARS
    lines = []
    assert set(store.decode(value, vip, "t", lines.append)) == set(ks)
    assert lines == []


def test_the_shell_encoding_decodes():
    """The agent's stop writes the value with ss | awk | sort | gzip | base64: the same format."""
    text = "2049 203.0.113.5 801\n2049 203.0.113.6 802\n"
    out = subprocess.run(["sh", "-c", "printf '%s' \"$1\" | gzip -9n | base64 -w0", "sh", text],
                         capture_output=True, text=True, check=True).stdout
    got = store.decode(store.PREFIX + out, VIP4, "t", print)
    assert got == [FlowKey(VIP4, 2049, "203.0.113.5", 801), FlowKey(VIP4, 2049, "203.0.113.6", 802)]


def test_a_list_too_large_is_cut_in_order_and_said():
    ks = keys(VIP4, 5000)
    lines = []
    value, kept = store.encode(ks, limit=4000)
    assert len(value) <= 4000 and 0 < kept < 5000
    got = store.decode(value, VIP4, "t", lines.append)
    assert set(got) == set(sorted(ks, key=lambda k: (k.vport, k.client, k.cport))[:kept])


@pytest.mark.parametrize("text, why", [
    ("2049 203.0.113.5 70000\n", "not a TCP port"),
    ("2049 127.0.0.1 801\n", "loopback"),
    ("2049 2001:db8::5 801\n", "family"),
    ("2049 198.51.100.10 801\n", "VIP"),
    ("2049 fe80::1%eth0 801\n", "zone"),
    ("0 203.0.113.5 801\n", "not a TCP port"),
    ("2049 203.0.113.5\n", "is not 'vport client cport'"),
    ("-1 203.0.113.5 801\n", "is not 'vport client cport'"),
    ("2049 224.0.0.1 801\n", "multicast"),
])
def test_hostile_records_are_refused_in_one_line(text, why):
    lines = []
    value = raw_value(text + "2049 203.0.113.7 900\n")
    got = store.decode(value, VIP4, "attrd X of node node1", lines.append)
    assert got == [FlowKey(VIP4, 2049, "203.0.113.7", 900)]
    assert len(lines) == 1 and "refused 1 of 2" in lines[0] and why in lines[0], lines


@pytest.mark.parametrize("value, why", [
    ("hello", "is not an nfsreset client list"),
    ("g1:!!!!", "does not decode"),
    ("g1:" + base64.b64encode(b"not gzip").decode(), "does not decode"),
    ("g1:" + base64.b64encode(gzip.compress(b"2049 203.0.113.5 801\n")[:-12]).decode(), "truncated"),
    ("g1:" + "A" * 300_000, "more than an nfsreset list"),
    (raw_value("2049 127.0.0.1 1\n\x00"), "refused all"),
    ("g1:" + base64.b64encode(gzip.compress(b"\xff\xfe")).decode(), "does not decode"),
])
def test_a_bad_value_is_refused_whole(value, why):
    with pytest.raises(StateError, match=why):
        store.decode(value, VIP4, "attrd X of node node1", print)


def test_a_gzip_bomb_is_bounded():
    bomb = store.PREFIX + base64.b64encode(gzip.compress(b"2049 203.0.113.5 801\n" * 400_000)).decode()
    assert len(bomb) < store.MAX_VALUE_CHARS
    with pytest.raises(StateError, match="inflates past"):
        store.decode(bomb, VIP4, "t", print)


def test_more_records_than_the_limit_are_cut_and_said():
    lines = []
    got = store.decode(store.encode(keys(VIP4, 300))[0], VIP4, "t", lines.append, max_entries=100)
    assert len(got) == 100 and len(lines) == 1 and "kept 100 of 300" in lines[0]


def test_parse_query_keeps_only_well_formed_lines_of_the_name():
    name = store.attr_name(VIP4)
    text = (f'name="{name}" host="node1" value="g1:AAA"\n'
            f'name="{name}" host="node2" value=""\n'
            f'name="other" host="node3" value="g1:BBB"\n'
            f'garbage line\n'
            f'name="{name}" host="node4" value="a"b"\n')
    assert store.parse_query(text, name) == {"node1": "g1:AAA"}


def test_attr_name_is_canonical():
    assert store.attr_name("2001:DB8:0::10") == "nfsreset-clients-2001:db8::10"


def test_one_bad_node_does_not_hide_the_others(tmp_path):
    lines = []
    good = store.encode([FlowKey(VIP4, 2049, "203.0.113.9", 901)])[0]

    class FakeAttrd(store.Attrd):     # the attrd_updater call is faked; decoding is real
        def values(self, vip):
            return {"node1": "junk", "node2": good}
    got = FakeAttrd(log=lines.append).read(VIP4)
    assert got == [FlowKey(VIP4, 2049, "203.0.113.9", 901)]
    assert len(lines) == 1 and "node 'node1'" in lines[0] and "not an nfsreset client list" in lines[0]


def test_one_peer_attrd_refuses_still_publishes_for_the_others():
    """The old loop stopped at the first attrd_updater that failed: the peers
    after it never got the list (their failover then tickles nobody)."""
    done = []

    class FakeAttrd(store.Attrd):     # the attrd_updater exec is faked; the loop is real
        def _run(self, *argv):
            node = argv[argv.index("--node") + 1]
            if node == "node2":
                raise StateError("attrd_updater --private exited 1: node2 unknown")
            done.append(node)
            return ""
    with pytest.raises(StateError) as e:
        FakeAttrd().publish(VIP4, [FlowKey(VIP4, 2049, "203.0.113.9", 901)], ["node2", "node3"])
    assert done == ["node3"]
    assert "for 1 of 2 node(s)" in str(e.value) and "node2 unknown" in str(e.value)


def test_choose():
    assert store.choose("dir") == "dir"
    assert store.choose("attrd") == "attrd"
    assert store.choose("auto") in ("dir", "attrd")
    with pytest.raises(StateError):
        store.choose("nfs")
