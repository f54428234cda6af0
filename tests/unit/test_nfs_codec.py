"""The lab client's ONC RPC / NFS codec against replies captured from NFS-Ganesha 4.3.

tests/unit/data/ganesha/*.bin are RPC reply messages (record marker removed) as
Ganesha sent them to `python -m nfsreset.lab.client --capture DIR` in the lab
(and to hand-made MNT calls): see docs/lab.md.
"""
from __future__ import annotations

import pathlib
import socket
import struct
import time

import pytest

from nfsreset.lab import nfs_client, rpc

DATA = pathlib.Path(__file__).parent / "data" / "ganesha"


def load(name: str) -> bytes:
    return (DATA / f"{name}.bin").read_bytes()


def results(name: str) -> bytes:
    return rpc.parse_reply(load(name)).results


# -- replies, decoded -----------------------------------------------------------------
def test_mnt_ok_gives_the_root_handle():
    status, fh = rpc.mnt_result(results("mnt-ok"))
    assert status == 0
    assert len(fh) == 24 and fh.hex().startswith("43000001")


def test_mnt_of_a_missing_export_is_an_error_without_handle():
    assert rpc.mnt_result(results("mnt-noent")) == (13, b"")   # MNT3ERR_ACCES


def test_prog_mismatch_is_an_rpc_error():
    with pytest.raises(rpc.RpcError, match="accept_stat 2"):
        rpc.parse_reply(load("mnt-progmismatch"))


def test_v3_getattr_of_the_export_root():
    status, attr = rpc.getattr3_result(results("v3-getattr-ok"))
    assert status == 0
    assert attr.type == 2 and attr.mode == 0o755 and attr.size == 4096   # NF3DIR


def test_v40_compound_putrootfh_getattr():
    res = rpc.compound_result(results("v40-compound-ok"))
    assert res.status == 0
    assert res.ops == [(rpc.OP_PUTROOTFH, 0), (rpc.OP_GETATTR, 0)]
    assert rpc.fattr4_type_size(res.attr_mask, res.attr_vals) == (2, 0)  # NF4DIR: the pseudo root


def test_v41_exchange_id_create_session_sequence():
    ex = rpc.compound_result(results("v41-exchange-id-ok"))
    assert ex.status == 0 and ex.clientid == 0x6B116E3F00000001 and ex.sequenceid == 1
    cs = rpc.compound_result(results("v41-create-session-ok"))
    assert cs.status == 0 and cs.sessionid.hex() == "010000003f6e116b0100000000000000"
    seq = rpc.compound_result(results("v41-compound-ok"))
    assert seq.ops == [(rpc.OP_SEQUENCE, 0), (rpc.OP_PUTROOTFH, 0), (rpc.OP_GETATTR, 0)]
    assert rpc.fattr4_type_size(seq.attr_mask, seq.attr_vals) == (2, 0)


def test_v41_errors_stop_at_the_failed_op():
    bad = rpc.compound_result(results("v41-compound-badsession"))
    assert bad.status == rpc.NFS4ERR_BADSESSION and bad.ops == [(rpc.OP_SEQUENCE, rpc.NFS4ERR_BADSESSION)]
    stale = rpc.compound_result(results("v41-create-session-stale-clientid"))
    assert stale.status == rpc.NFS4ERR_STALE_CLIENTID and stale.sessionid is None


@pytest.mark.parametrize("name,decode", [
    ("mnt-ok", rpc.mnt_result), ("v3-getattr-ok", rpc.getattr3_result),
    ("v40-compound-ok", rpc.compound_result), ("v41-compound-ok", rpc.compound_result),
    ("v41-exchange-id-ok", rpc.compound_result), ("v41-create-session-ok", rpc.compound_result),
])
def test_every_truncation_is_an_xdr_error(name, decode):
    msg = load(name)
    for cut in range(len(msg)):
        with pytest.raises(rpc.XdrError):
            decode(rpc.parse_reply(msg[:cut]).results)


def test_absurd_lengths_are_refused():
    # a GETATTR reply claiming a 2 GiB opaque where fattr4 values go
    head = load("v40-compound-ok")
    i = head.rindex(struct.pack(">I", 12))          # attr_vals length (12 bytes: type + size)
    forged = head[:i] + struct.pack(">I", 0x7FFFFFFF) + head[i + 4:]
    with pytest.raises(rpc.XdrError, match="limit"):
        rpc.compound_result(rpc.parse_reply(forged).results)
    with pytest.raises(rpc.XdrError, match="limit"):
        rpc.fragment_header(struct.pack(">I", rpc.LAST_FRAGMENT | (64 << 20)))


# -- calls, encoded ------------------------------------------------------------------
def test_call_header_with_auth_sys():
    msg = rpc.call(0x01020304, rpc.NFS_PROG, 3, rpc.NFSPROC3_GETATTR, rpc.getattr3_args(b"\xaa" * 5))
    u = rpc.Unpacker(msg)
    assert [u.u32() for _ in range(6)] == [0x01020304, rpc.CALL, 2, 100003, 3, 1]
    assert u.u32() == rpc.AUTH_SYS
    cred = rpc.Unpacker(u.opaque())
    cred.u32()
    assert cred.opaque() == b"nfsreset-lab"
    assert (cred.u32(), cred.u32(), cred.count(16)) == (0, 0, 0)      # uid gid, no groups
    assert (u.u32(), u.opaque()) == (rpc.AUTH_NONE, b"")               # verifier
    assert u.opaque() == b"\xaa" * 5 and u.rest() == b""              # fh3, padded


def test_compound_bytes():
    args = rpc.compound_args(0, [rpc.op_putrootfh(), rpc.op_getattr(rpc.FATTR4_TYPE, rpc.FATTR4_SIZE)])
    # tag "", minor 0, 2 ops; PUTROOTFH; GETATTR bitmap {type, size}
    assert args.hex() == "00000000" "00000000" "00000002" "00000018" "00000009" "00000002" "00000012" "00000000"


def test_frame_and_multi_fragment_record():
    a, b = socket.socketpair()
    with a, b:
        body = b"x" * 10 + b"y" * 6
        a.sendall(struct.pack(">I", 10) + body[:10] + rpc.frame(body[10:]))
        assert nfs_client.recv_record(b, time.monotonic() + 2) == body


# -- the client's protocol state, driven by real replies -----------------------------
def test_v41_state_follows_the_server():
    events = []
    emit = lambda ev, **kw: events.append((ev, kw))  # noqa: E731
    p = nfs_client.V41()
    assert p.next_call(1)[1] == "EXCHANGE_ID"
    assert p.on_reply("EXCHANGE_ID", load("v41-exchange-id-ok"), emit) == "setup"
    assert p.next_call(2)[1] == "CREATE_SESSION"
    assert p.on_reply("CREATE_SESSION", load("v41-create-session-ok"), emit) == "setup"
    body, kind = p.next_call(3)
    assert kind == "COMPOUND" and bytes.fromhex("010000003f6e116b0100000000000000") in body
    assert p.on_reply("COMPOUND", load("v41-compound-ok"), emit) == "reply"
    assert p.slot_seq == 2
    # failover: the other head does not know the session, then not the client ID
    assert p.on_reply("COMPOUND", load("v41-compound-badsession"), emit) == "state"
    assert p.sessionid is None and p.clientid is not None
    assert p.on_reply("CREATE_SESSION", load("v41-create-session-stale-clientid"), emit) == "state"
    assert p.clientid is None and p.next_call(4)[1] == "EXCHANGE_ID"
    assert [e for e, _ in events].count("nfs_error") == 2


def test_v3_and_v40_accept_only_nfs_ok():
    emit = lambda *a, **k: None  # noqa: E731
    v3 = nfs_client.V3("/x")
    v3.fh = b"\1" * 8
    assert v3.on_reply("GETATTR", load("v3-getattr-ok"), emit) == "reply"
    assert nfs_client.V40().on_reply("COMPOUND", load("v40-compound-ok"), emit) == "reply"
    with pytest.raises(rpc.RpcError):
        nfs_client.V40().on_reply("COMPOUND", load("mnt-progmismatch"), emit)


def test_echo_checks_the_bytes():
    e = nfs_client.Echo(payload=16)
    body, _ = e.next_call(7)
    assert len(body) == 16 and rpc.reply_xid(body) == 7
    assert e.on_reply("echo", body, None) == "reply"
    with pytest.raises(nfs_client.ProtocolError):
        e.on_reply("echo", body[:-1] + b"\1", None)


def test_v3_stale_handle_means_mount_again():
    # Ganesha's own GETATTR reply header, with the status made NFS3ERR_STALE (70)
    stale = load("v3-getattr-ok")[:24] + struct.pack(">I", 70) + b"\0" * 4   # post_op_attr: none
    events = []
    v3 = nfs_client.V3("/x")
    v3.fh = b"\1" * 8
    assert v3.on_reply("GETATTR", stale, lambda ev, **kw: events.append((ev, kw))) == "retry"
    assert v3.fh is None and events == [("nfs_error", {"op": "GETATTR", "status": 70})]
