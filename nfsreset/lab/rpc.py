"""ONC RPC over TCP (RFC 5531) and the few NFS messages the lab client sends.

Plain functions over bytes, no sockets: the transport lives in nfs_client.py.
Calls carry AUTH_SYS (uid/gid 0; the lab exports with no root squash).

What is encoded and decoded, and nothing more:
  MOUNT v3   MNT                                   (RFC 1813 appendix I)
  NFSv3      GETATTR                               (RFC 1813)
  NFSv4.0    COMPOUND(PUTROOTFH, GETATTR)          (RFC 7530)
  NFSv4.1    COMPOUND(EXCHANGE_ID), (CREATE_SESSION),
             (SEQUENCE, PUTROOTFH, GETATTR)        (RFC 8881)

Every decoder checks lengths against the bytes it was given and raises
XdrError on anything short, too long or out of range: replies come from the
network.
"""
from __future__ import annotations

import dataclasses
import struct

LAST_FRAGMENT = 0x80000000
MAX_RECORD = 1 << 20          # a reply to our calls is < 1 KiB; anything this big is garbage
MAX_OPAQUE = 1024             # longest opaque/string we accept in a reply (fh3 <= 64, ids small)

RPC_VERS = 2
CALL, REPLY = 0, 1
MSG_ACCEPTED, MSG_DENIED = 0, 1
SUCCESS = 0
AUTH_NONE, AUTH_SYS = 0, 1

MOUNT_PROG, MOUNT_V3, MOUNTPROC3_MNT = 100005, 3, 1
NFS_PROG, NFSPROC3_GETATTR, NFSPROC4_COMPOUND = 100003, 1, 1

OP_GETATTR, OP_PUTROOTFH = 9, 24
OP_EXCHANGE_ID, OP_CREATE_SESSION, OP_SEQUENCE = 42, 43, 53
EXCHGID4_FLAG_USE_NON_PNFS = 0x00010000
SP4_NONE = 0
FATTR4_TYPE, FATTR4_SIZE, FATTR4_FILEID = 1, 4, 20

# NFSv4 errors the client reacts to (RFC 8881 §15.1).
NFS4ERR_STALE_CLIENTID, NFS4ERR_BADSESSION, NFS4ERR_DEADSESSION = 10022, 10052, 10078
NFS4ERR_SEQ_MISORDERED, NFS4ERR_EXPIRED = 10063, 10011


class XdrError(ValueError):
    """Bytes that are not the message they should be."""


# -- XDR ----------------------------------------------------------------------------
class Packer:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u32(self, v: int) -> "Packer":
        self._parts.append(struct.pack(">I", v))
        return self

    def u64(self, v: int) -> "Packer":
        self._parts.append(struct.pack(">Q", v))
        return self

    def fixed(self, data: bytes) -> "Packer":
        self._parts.append(data + b"\0" * (-len(data) % 4))
        return self

    def opaque(self, data: bytes) -> "Packer":
        return self.u32(len(data)).fixed(data)

    def bytes(self) -> bytes:
        return b"".join(self._parts)


class Unpacker:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise XdrError(f"short message: need {n} bytes at {self.pos}, have {len(self.data) - self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return struct.unpack(">I", self._take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self._take(8))[0]

    def fixed(self, n: int) -> bytes:
        out = self._take(n)
        self._take(-n % 4)
        return out

    def opaque(self, limit: int = MAX_OPAQUE) -> bytes:
        n = self.u32()
        if n > limit:
            raise XdrError(f"opaque of {n} bytes, limit {limit}")
        return self.fixed(n)

    def count(self, limit: int) -> int:
        n = self.u32()
        if n > limit:
            raise XdrError(f"array of {n} items, limit {limit}")
        return n

    def rest(self) -> bytes:
        return self.data[self.pos:]


# -- record marking (RFC 5531 §11) ------------------------------------------------------
def frame(body: bytes) -> bytes:
    """One record, one fragment."""
    return struct.pack(">I", LAST_FRAGMENT | len(body)) + body


def fragment_header(marker: bytes) -> tuple[int, bool]:
    """(length, last) from a 4-byte record marker; refuses absurd lengths."""
    (word,) = struct.unpack(">I", marker)
    length = word & ~LAST_FRAGMENT
    if length > MAX_RECORD:
        raise XdrError(f"fragment of {length} bytes, limit {MAX_RECORD}")
    return length, bool(word & LAST_FRAGMENT)


# -- RPC call and reply -----------------------------------------------------------------
def auth_sys(stamp: int, machine: str = "nfsreset-lab", uid: int = 0, gid: int = 0) -> bytes:
    body = Packer().u32(stamp).opaque(machine.encode()).u32(uid).u32(gid).u32(0).bytes()
    return Packer().u32(AUTH_SYS).opaque(body).bytes()


def call(xid: int, prog: int, vers: int, proc: int, args: bytes, stamp: int = 0) -> bytes:
    """An RPC CALL message body (no record marker)."""
    head = Packer().u32(xid).u32(CALL).u32(RPC_VERS).u32(prog).u32(vers).u32(proc).bytes()
    verf = Packer().u32(AUTH_NONE).opaque(b"").bytes()
    return head + auth_sys(stamp) + verf + args


@dataclasses.dataclass(frozen=True)
class Reply:
    xid: int
    results: bytes            # the procedure's results, undecoded


class RpcError(Exception):
    """A well-formed reply that is not SUCCESS (denied, PROG_MISMATCH, ...)."""


def parse_reply(msg: bytes) -> Reply:
    """An RPC REPLY message body; RpcError if not accepted with SUCCESS."""
    u = Unpacker(msg)
    xid = u.u32()
    if u.u32() != REPLY:
        raise XdrError("not a reply")
    stat = u.u32()
    if stat == MSG_DENIED:
        raise RpcError(f"xid {xid:#x}: call denied (reject_stat {u.u32()})")
    if stat != MSG_ACCEPTED:
        raise XdrError(f"reply_stat {stat}")
    u.u32()               # verifier flavor
    u.opaque(400)         # verifier body (RFC 5531: at most 400 bytes)
    accept = u.u32()
    if accept != SUCCESS:
        raise RpcError(f"xid {xid:#x}: accept_stat {accept}")
    return Reply(xid, u.rest())


def reply_xid(msg: bytes) -> int:
    if len(msg) < 4:
        raise XdrError("reply shorter than its xid")
    return struct.unpack_from(">I", msg)[0]


# -- MOUNT v3 and NFSv3 ------------------------------------------------------------------
def mnt_args(path: str) -> bytes:
    return Packer().opaque(path.encode()).bytes()


def mnt_result(results: bytes) -> tuple[int, bytes]:
    """(mountstat3, file handle); the handle is b"" unless the status is 0."""
    u = Unpacker(results)
    status = u.u32()
    if status != 0:
        return status, b""
    fh = u.opaque(64)     # FHSIZE3
    for _ in range(u.count(16)):
        u.u32()           # auth flavors
    return 0, fh


def getattr3_args(fh: bytes) -> bytes:
    return Packer().opaque(fh).bytes()


@dataclasses.dataclass(frozen=True)
class Attr3:
    type: int
    mode: int
    size: int
    fileid: int


def getattr3_result(results: bytes) -> tuple[int, Attr3 | None]:
    """(nfsstat3, fattr3 fields we print) — attributes only when the status is NFS3_OK."""
    u = Unpacker(results)
    status = u.u32()
    if status != 0:
        return status, None
    ftype, mode = u.u32(), u.u32()
    u.u32(); u.u32(); u.u32()          # nlink uid gid
    size = u.u64()
    u.u64(); u.u32(); u.u32(); u.u64()  # used, rdev, fsid
    fileid = u.u64()
    u.fixed(24)                         # atime mtime ctime
    return 0, Attr3(ftype, mode, size, fileid)


# -- NFSv4 COMPOUND ---------------------------------------------------------------------
def compound_args(minor: int, ops: list[bytes], tag: bytes = b"") -> bytes:
    return Packer().opaque(tag).u32(minor).u32(len(ops)).bytes() + b"".join(ops)


def op_putrootfh() -> bytes:
    return Packer().u32(OP_PUTROOTFH).bytes()


def op_getattr(*attrs: int) -> bytes:
    words = [0, 0]
    for a in attrs:
        words[a // 32] |= 1 << (a % 32)
    return Packer().u32(OP_GETATTR).u32(2).u32(words[0]).u32(words[1]).bytes()


def op_exchange_id(verifier: bytes, owner: bytes) -> bytes:
    return (Packer().u32(OP_EXCHANGE_ID).fixed(verifier[:8].ljust(8, b"\0")).opaque(owner)
            .u32(EXCHGID4_FLAG_USE_NON_PNFS).u32(SP4_NONE).u32(0).bytes())


def _channel_attrs(p: Packer) -> Packer:
    # headerpad, maxrequest, maxresponse, maxresponse_cached, maxops, maxrequests, no rdma_ird
    return p.u32(0).u32(1 << 16).u32(1 << 16).u32(4096).u32(8).u32(1).u32(0)


def op_create_session(clientid: int, sequence: int) -> bytes:
    p = Packer().u32(OP_CREATE_SESSION).u64(clientid).u32(sequence).u32(0)
    _channel_attrs(_channel_attrs(p))
    # cb_program, then one callback security parameter: AUTH_NONE
    return p.u32(0x40000000).u32(1).u32(AUTH_NONE).bytes()


def op_sequence(sessionid: bytes, seqid: int, slot: int = 0) -> bytes:
    return Packer().u32(OP_SEQUENCE).fixed(sessionid).u32(seqid).u32(slot).u32(0).u32(0).bytes()


@dataclasses.dataclass(frozen=True)
class Compound:
    status: int                       # the COMPOUND's status: that of its last op
    ops: list[tuple[int, int]]        # (op, status) of each op result present
    clientid: int | None = None       # EXCHANGE_ID
    sequenceid: int | None = None     # EXCHANGE_ID
    sessionid: bytes | None = None    # CREATE_SESSION
    attr_mask: tuple[int, ...] = ()   # GETATTR
    attr_vals: bytes = b""            # GETATTR


def compound_result(results: bytes) -> Compound:
    """Decode a COMPOUND reply made of the ops above; stops after the first failed op
    (the server sends nothing after it, RFC 7530 §15.2)."""
    u = Unpacker(results)
    status = u.u32()
    u.opaque(64)                      # tag
    n = u.count(16)
    ops: list[tuple[int, int]] = []
    out: dict = {}
    for _ in range(n):
        op, st = u.u32(), u.u32()
        ops.append((op, st))
        if st != 0:
            break
        if op == OP_PUTROOTFH:
            pass
        elif op == OP_GETATTR:
            mask = tuple(u.u32() for _ in range(u.count(8)))
            out["attr_mask"], out["attr_vals"] = mask, u.opaque()
        elif op == OP_SEQUENCE:
            u.fixed(16); u.u32(); u.u32(); u.u32(); u.u32(); u.u32()
        elif op == OP_EXCHANGE_ID:
            out["clientid"], out["sequenceid"] = u.u64(), u.u32()
            u.u32()                   # flags
            if u.u32() != SP4_NONE:
                raise XdrError("EXCHANGE_ID: state protection we did not ask for")
            u.u64(); u.opaque()       # server_owner: minor id, major id
            u.opaque()                # server_scope
            for _ in range(u.count(1)):
                u.opaque(); u.opaque(); u.u64(); u.u32()   # impl id: domain, name, date
        elif op == OP_CREATE_SESSION:
            out["sessionid"] = u.fixed(16)
            u.u32(); u.u32()          # sequence, flags
            for _ in range(2):        # fore and back channel attrs
                for _ in range(6):
                    u.u32()
                for _ in range(u.count(1)):
                    u.u32()
        else:
            raise XdrError(f"op {op} in a reply: we never send it")
    return Compound(status=status, ops=ops, **out)


def fattr4_type_size(mask: tuple[int, ...], vals: bytes) -> tuple[int, int]:
    """(type, size) from a GETATTR(type, size[, fileid]) answer."""
    if not mask or not mask[0] & (1 << FATTR4_TYPE) or not mask[0] & (1 << FATTR4_SIZE):
        raise XdrError(f"GETATTR answer without type and size: mask {mask}")
    u = Unpacker(vals)
    return u.u32(), u.u64()
