"""Member offsets of kernel structs, read from the running kernel's BTF.

bcc compiles against whatever headers /lib/modules/$(uname -r)/build points at,
and on kernels without their own headers package those belong to another kernel
(Debian's 6.1 headers say tcp_sock.rcv_nxt is at 1464; on 6.18 it is at 1664).
BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF) describes the kernel that
is actually running, so every struct offset our BPF code uses comes from here.

Format: include/uapi/linux/btf.h and Documentation/bpf/btf.rst. Only what a
member lookup needs is decoded; no external package does this (libbpf's
Python bindings are not packaged for Debian 12).
"""
from __future__ import annotations

import dataclasses
import functools
import struct

VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

# BTF_KIND_* numbers.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_MODIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)
# Bytes that follow the 12-byte btf_type, as (fixed, per vlen item).
_TRAILER = {INT: (4, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
            FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), DECL_TAG: (4, 0), ENUM64: (0, 12)}
POINTER_SIZE = 8  # BTF has no pointer size; every kernel we run on is 64-bit


class BTFError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Member:
    """Where a (possibly nested) member sits from the start of the outer struct."""
    path: str
    bit_offset: int
    bit_size: int      # the bitfield width, or 8 * byte size of the member's type
    bitfield: bool

    @property
    def offset(self) -> int:
        if self.bit_offset % 8:
            raise BTFError(f"{self.path} is a bitfield not on a byte boundary (bit {self.bit_offset})")
        return self.bit_offset // 8

    @property
    def size(self) -> int:
        return self.bit_size // 8


class BTF:
    """The types of one BTF blob (vmlinux only: split BTF of modules is not needed)."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BTFError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BTFError(f"bad BTF magic {magic:#x} (big-endian BTF is not supported)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<4I", data, 8)
        self._data = data
        self._strings = hdr_len + str_off, hdr_len + str_off + str_len
        # One record per type id (id 0 is void): (kind, name_off, vlen, kind_flag, size_or_type, trailer_pos).
        self._types: list[tuple[int, int, int, bool, int, int]] = [(0, 0, 0, False, 0, 0)]
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, size_or_type = struct.unpack_from("<3I", data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            fixed, per_item = _TRAILER.get(kind, (0, 0))
            self._types.append((kind, name_off, vlen, bool(info >> 31), size_or_type, pos + 12))
            pos += 12 + fixed + per_item * vlen
        self._by_name: dict[str, int] | None = None

    @classmethod
    def load(cls, path: str = VMLINUX) -> "BTF":
        with open(path, "rb") as f:
            return cls(f.read())

    def name(self, type_id: int) -> str:
        return self._string(self._types[type_id][1])

    def _string(self, off: int) -> str:
        start = self._strings[0] + off
        return self._data[start:self._data.index(b"\0", start)].decode()

    def find_struct(self, name: str) -> int:
        """Type id of the first struct or union called `name` (or typedef'd
        to it: possible_net_t is a typedef of an anonymous struct)."""
        if self._by_name is None:
            self._by_name = {}
            for tid, (kind, name_off, *_rest) in enumerate(self._types):
                if kind in (STRUCT, UNION) and name_off:
                    self._by_name.setdefault(self._string(name_off), tid)
            for tid, (kind, name_off, *_rest) in enumerate(self._types):
                if kind == TYPEDEF and self._types[self.resolve(tid)][0] in (STRUCT, UNION):
                    self._by_name.setdefault(self._string(name_off), tid)
        try:
            return self._by_name[name]
        except KeyError:
            raise BTFError(f"no struct or union {name!r} in BTF") from None

    def resolve(self, type_id: int) -> int:
        """Skip typedefs and qualifiers."""
        for _ in range(64):
            kind, _n, _v, _k, size_or_type, _p = self._types[type_id]
            if kind not in _MODIFIERS:
                return type_id
            type_id = size_or_type
        raise BTFError(f"type chain too long at id {type_id}")

    def sizeof(self, type_id: int) -> int:
        tid = self.resolve(type_id)
        kind, _n, _v, _k, size_or_type, pos = self._types[tid]
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            return size_or_type
        if kind == PTR:
            return POINTER_SIZE
        if kind == ARRAY:
            elem, _index, nelems = struct.unpack_from("<3I", self._data, pos)
            return nelems * self.sizeof(elem)
        raise BTFError(f"type id {tid} (kind {kind}) has no size")

    def members(self, type_id: int):
        """(name, type_id, bit_offset, bitfield_size or 0) of a struct/union."""
        kind, _n, vlen, kflag, _s, pos = self._types[type_id]
        if kind not in (STRUCT, UNION):
            raise BTFError(f"type id {type_id} is not a struct or union")
        for i in range(vlen):
            name_off, mtype, offset = struct.unpack_from("<3I", self._data, pos + 12 * i)
            # With kind_flag, the offset word packs the bitfield width in its top
            # byte; without it, a bitfield's width lives in the INT encoding.
            bits, bit_offset = (offset >> 24, offset & 0xFFFFFF) if kflag else (0, offset)
            yield self._string(name_off) if name_off else "", mtype, bit_offset, bits

    def _find_member(self, type_id: int, name: str):
        """Search `name` in a struct, descending into anonymous structs/unions."""
        for mname, mtype, bit_offset, bits in self.members(type_id):
            if mname == name:
                return mtype, bit_offset, bits
            if not mname and self._types[self.resolve(mtype)][0] in (STRUCT, UNION):
                found = self._find_member(self.resolve(mtype), name)
                if found:
                    return found[0], bit_offset + found[1], found[2]
        return None

    def member(self, path: str) -> Member:
        """'tcp_sock.rcv_nxt', 'sock.__sk_common.skc_net.net': offset from the outer struct.

        Stops at pointers: 'net.ns.inum' is looked up separately from the
        pointer that leads to a struct net.
        """
        outer, *names = path.split(".")
        if not names:
            raise BTFError(f"{path!r}: expected STRUCT.MEMBER[.MEMBER...]")
        tid, bit_offset, bits = self.find_struct(outer), 0, 0
        for i, name in enumerate(names):
            inner = self.resolve(tid)
            if self._types[inner][0] not in (STRUCT, UNION):
                raise BTFError(f"{path!r}: {'.'.join([outer, *names[:i]])} is not a struct or union")
            found = self._find_member(inner, name)
            if found is None:
                raise BTFError(f"{path!r}: no member {name!r} in {self.name(inner) or '(anon)'}")
            tid, off, bits = found
            bit_offset += off
        if not bits:
            # Without kind_flag, an INT's encoding may still carry a bitfield width.
            res = self.resolve(tid)
            if self._types[res][0] == INT:
                enc = struct.unpack_from("<I", self._data, self._types[res][5])[0]
                width, enc_off = enc & 0xFF, (enc >> 16) & 0xFF
                if width != 8 * self._types[res][4]:
                    bits, bit_offset = width, bit_offset + enc_off
        if bits:
            return Member(path, bit_offset, bits, True)
        return Member(path, bit_offset, 8 * self.sizeof(tid), False)

    def offset(self, path: str) -> int:
        return self.member(path).offset


@functools.cache
def vmlinux() -> BTF:
    """The running kernel's BTF, parsed once per process (~0.2 s)."""
    try:
        return BTF.load(VMLINUX)
    except FileNotFoundError:
        raise BTFError(f"{VMLINUX} missing: the kernel was built without CONFIG_DEBUG_INFO_BTF") from None
