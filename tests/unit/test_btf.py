"""nfsreset.flows.btf on a hand-made blob (every layout rule) and on the running kernel.

The kernel part compares with bpftool's own decoding of the same file, so a
reader bug cannot agree with itself. Needs no root: the BTF file is readable.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess

import pytest

from nfsreset.flows import btf


# -- a BTF blob built by hand ------------------------------------------------------
def _blob() -> bytes:
    strings = b"\0"
    names: dict[str, int] = {}

    def s(name: str) -> int:
        nonlocal strings
        if not name:
            return 0
        if name not in names:
            names[name] = len(strings)
            strings += name.encode() + b"\0"
        return names[name]

    def t(name, kind, vlen, size_or_type, kflag=False):
        return struct.pack("<3I", s(name), (kflag << 31) | (kind << 24) | vlen, size_or_type)

    def m(name, type_id, offset):
        return struct.pack("<3I", s(name), type_id, offset)

    types = b"".join([
        # [1] u32
        t("u32", btf.INT, 0, 4) + struct.pack("<I", 32),
        # [2] anonymous union { u32 x; u32 y; }
        t("", btf.UNION, 2, 4) + m("x", 1, 0) + m("y", 1, 0),
        # [3] struct outer (kind_flag: bitfield width in the offset's top byte)
        t("outer", btf.STRUCT, 4, 12, kflag=True)
        + m("a", 1, 0) + m("", 2, 32) + m("bf", 1, (3 << 24) | 64) + m("bf2", 1, (5 << 24) | 67),
        # [4] typedef outer_t, [5] pointer to outer, [6] const outer_t
        t("outer_t", btf.TYPEDEF, 0, 3),
        t("", btf.PTR, 0, 3),
        t("", btf.CONST, 0, 4),
        # [7] struct holder { struct outer *p; const outer_t o; u32 arr[3]; u32 old:4 }
        t("holder", btf.STRUCT, 4, 36) + m("p", 5, 0) + m("o", 6, 64) + m("arr", 8, 160) + m("old", 9, 256),
        # [8] u32[3]
        t("", btf.ARRAY, 0, 0) + struct.pack("<3I", 1, 1, 3),
        # [9] old-style bitfield: width in the INT encoding (bits 0-7), offset bits 16-23
        t("u4", btf.INT, 0, 4) + struct.pack("<I", (0 << 16) | 4),
    ])
    hdr_len = 24
    header = struct.pack("<HBBI4I", btf.BTF_MAGIC, 1, 0, hdr_len, 0, len(types), len(types), len(strings))
    return header + types + strings


@pytest.fixture(scope="module")
def made():
    return btf.BTF(_blob())


def test_plain_and_anonymous_members(made):
    assert made.member("outer.a") == btf.Member("outer.a", 0, 32, False)
    assert made.offset("outer.y") == 4          # inside the anonymous union
    assert made.member("outer.x").size == 4


def test_bitfields_with_kind_flag(made):
    bf, bf2 = made.member("outer.bf"), made.member("outer.bf2")
    assert (bf.bit_offset, bf.bit_size, bf.bitfield) == (64, 3, True)
    assert (bf2.bit_offset, bf2.bit_size) == (67, 5)
    with pytest.raises(btf.BTFError, match="byte boundary"):
        bf2.offset


def test_bitfield_in_int_encoding(made):
    old = made.member("holder.old")
    assert (old.bit_offset, old.bit_size, old.bitfield) == (256, 4, True)


def test_nested_through_typedef_and_const(made):
    assert made.offset("holder.o") == 8
    assert made.offset("holder.o.y") == 12
    assert made.member("holder.p").size == btf.POINTER_SIZE
    assert made.member("holder.arr").size == 12


@pytest.mark.parametrize("path, message", [
    ("holder.nope", "no member 'nope'"),
    ("holder.p.x", "not a struct"),             # pointers are not followed
    ("nosuch.x", "no struct or union"),
    ("holder", "expected STRUCT.MEMBER"),
])
def test_errors(made, path, message):
    with pytest.raises(btf.BTFError, match=message):
        made.member(path)


def test_rejects_other_blobs():
    with pytest.raises(btf.BTFError, match="magic"):
        btf.BTF(b"\0" * 32)


# -- the running kernel ---------------------------------------------------------------
needs_vmlinux = pytest.mark.skipif(not os.path.exists(btf.VMLINUX), reason="no /sys/kernel/btf/vmlinux")
STRUCTS = ("tcp_sock", "sock", "sock_common", "net", "ns_common", "tcp_skb_cb", "sk_buff", "inet_sock")


@pytest.fixture(scope="module")
def bpftool_members() -> dict[str, dict[str, int]]:
    """{struct: {direct named member: bits_offset}} as bpftool decodes vmlinux."""
    if not shutil.which("bpftool"):
        pytest.skip("bpftool not installed")
    out = subprocess.run(["bpftool", "btf", "dump", "file", btf.VMLINUX, "format", "raw"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    found: dict[str, dict[str, int]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("["):
            m = re.match(r"\[\d+\] (?:STRUCT|UNION) '([^']+)' size=\d+ vlen=\d+", line)
            name = m.group(1) if m else None
            # first definition wins, as in nfsreset.flows.btf
            current = name if name in STRUCTS and name not in found else None
            if current:
                found[current] = {}
        elif current:
            m = re.match(r"\s+'([^']+)' type_id=\d+ bits_offset=(\d+)", line)
            if m and m.group(1) != "(anon)":
                found[current][m.group(1)] = int(m.group(2))
    return found


@needs_vmlinux
def test_every_direct_member_matches_bpftool(bpftool_members):
    kernel = btf.vmlinux()
    checked = 0
    for struct_name in STRUCTS:
        assert bpftool_members.get(struct_name), f"bpftool shows no {struct_name}"
        for member, bits in bpftool_members[struct_name].items():
            assert kernel.member(f"{struct_name}.{member}").bit_offset == bits, (struct_name, member)
            checked += 1
    assert checked > 300


@needs_vmlinux
def test_offsets_the_tracker_uses(bpftool_members):
    kernel = btf.vmlinux()
    rcv, snd = kernel.member("tcp_sock.rcv_nxt"), kernel.member("tcp_sock.snd_nxt")
    assert rcv.offset > 0 and rcv.size == 4 and snd.offset == rcv.offset + 4
    assert rcv.bit_offset == bpftool_members["tcp_sock"]["rcv_nxt"]
    # sock.__sk_common.skc_net.net: three levels, the last through possible_net_t
    net = kernel.member("sock.__sk_common.skc_net.net")
    assert net.size == 8
    assert net.bit_offset == (bpftool_members["sock"]["__sk_common"]
                              + bpftool_members["sock_common"]["skc_net"]
                              + kernel.member("possible_net_t.net").bit_offset)
    inum = kernel.member("net.ns.inum")
    assert inum.size == 4
    assert inum.bit_offset == bpftool_members["net"]["ns"] + bpftool_members["ns_common"]["inum"]


@needs_vmlinux
def test_member_inside_anonymous_unions_of_the_kernel():
    """sock_common.skc_daddr sits in anonymous unions/structs (skc_addrpair)."""
    kernel = btf.vmlinux()
    daddr, rcv_saddr = kernel.member("sock_common.skc_daddr"), kernel.member("sock_common.skc_rcv_saddr")
    pair = kernel.member("sock_common.skc_addrpair")
    assert daddr.offset == pair.offset and rcv_saddr.offset == pair.offset + 4
