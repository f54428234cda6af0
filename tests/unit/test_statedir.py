"""State dir: atomic, root-only, refuses what it cannot trust. (Runs as any user;
ownership checks need root to create a root-owned file and are skipped otherwise.)"""
import json
import os
import stat

import pytest

from nfsreset.model import FlowKey
from nfsreset.statedir import MAX_ENTRIES, StateDir, StateError, StateUnsafe

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
