"""What the lab client says on its connection: record echo (sim server) or real NFS.

client.py owns the socket and the Linux client's transport discipline; a
protocol here only makes the next call and judges its reply:

    next_call(xid) -> (RPC message body, kind)
    on_reply(kind, msg) -> "reply" (an NFS operation answered NFS_OK: the
                           thing a stall is measured on), "setup" (a state
                           call answered: MOUNT, EXCHANGE_ID, CREATE_SESSION)
                           "state" (a state error: the next call makes new
                           state, at once) or "retry" (another NFS error:
                           the next call after the usual pause)

Echo is what the sim server (server.py) answers: it echoes each record. The
NFS versions speak to NFS-Ganesha: MOUNT v3 MNT then NFSv3 GETATTR of the
root handle; NFSv4.0 COMPOUND(PUTROOTFH, GETATTR); NFSv4.1 the same behind
SEQUENCE, after EXCHANGE_ID and CREATE_SESSION, redone when the server does
not know the session (a failover to the other head: its own Ganesha).
"""
from __future__ import annotations

import os
import socket
import struct
import time

from nfsreset.lab import rpc

MOUNT_PORT = 20048
VERSIONS = ("echo", "3", "4.0", "4.1")


class ProtocolError(Exception):
    """A reply that cannot belong to our call (wrong xid handled by the caller)."""


class Echo:
    """Record-level echo: the sim server sends every record back unchanged."""

    vers = "echo"

    def __init__(self, payload: int = 128) -> None:
        self.payload = payload
        self._sent = b""

    def prepare(self, server: str, deadline: float, emit) -> None:
        pass

    def next_call(self, xid: int) -> tuple[bytes, str]:
        self._sent = struct.pack(">I", xid) + b"\0" * max(0, self.payload - 4)
        return self._sent, "echo"

    def on_reply(self, kind: str, msg: bytes, emit) -> str:
        if msg != self._sent:
            raise ProtocolError("echo reply differs from the request")
        return "reply"


class V3:
    """MOUNT v3 MNT once (and again on a stale handle), then NFSv3 GETATTR of the root."""

    vers = "3"

    def __init__(self, export: str, mount_port: int = MOUNT_PORT) -> None:
        self.export, self.mount_port = export, mount_port
        self.fh: bytes | None = None

    def prepare(self, server: str, deadline: float, emit) -> None:
        if self.fh is None:
            self.fh = mount(server, self.mount_port, self.export, deadline)
            emit("setup", op="MNT", fh=self.fh.hex())

    def next_call(self, xid: int) -> tuple[bytes, str]:
        assert self.fh is not None
        return rpc.call(xid, rpc.NFS_PROG, 3, rpc.NFSPROC3_GETATTR, rpc.getattr3_args(self.fh)), "GETATTR"

    def on_reply(self, kind: str, msg: bytes, emit) -> str:
        status, _attr = rpc.getattr3_result(rpc.parse_reply(msg).results)
        if status == 0:
            return "reply"
        emit("nfs_error", op=kind, status=status)
        if status in (70, 10001):  # NFS3ERR_STALE, NFS3ERR_BADHANDLE: mount again
            self.fh = None
        return "retry"


class V40:
    """NFSv4.0 COMPOUND(PUTROOTFH, GETATTR(type, size)): no state needed."""

    vers = "4.0"

    def prepare(self, server: str, deadline: float, emit) -> None:
        pass

    def next_call(self, xid: int) -> tuple[bytes, str]:
        args = rpc.compound_args(0, [rpc.op_putrootfh(), rpc.op_getattr(rpc.FATTR4_TYPE, rpc.FATTR4_SIZE)])
        return rpc.call(xid, rpc.NFS_PROG, 4, rpc.NFSPROC4_COMPOUND, args), "COMPOUND"

    def on_reply(self, kind: str, msg: bytes, emit) -> str:
        res = rpc.compound_result(rpc.parse_reply(msg).results)
        if res.status == 0:
            rpc.fattr4_type_size(res.attr_mask, res.attr_vals)
            return "reply"
        emit("nfs_error", op=kind, status=res.status)
        return "retry"


class V41:
    """NFSv4.1: EXCHANGE_ID, CREATE_SESSION, then COMPOUND(SEQUENCE, PUTROOTFH, GETATTR)
    on slot 0. Any session error makes a new session (a new client ID if that is
    what the server says), as the Linux client's state manager does."""

    vers = "4.1"

    def __init__(self) -> None:
        # A verifier per client process: a new process is a rebooted client.
        self.verifier = os.urandom(8)
        self.owner = f"nfsreset-lab-{socket.gethostname()}-{os.getpid()}".encode()
        self.clientid: int | None = None
        self.cs_seq = 0
        self.sessionid: bytes | None = None
        self.slot_seq = 1

    def prepare(self, server: str, deadline: float, emit) -> None:
        pass

    def next_call(self, xid: int) -> tuple[bytes, str]:
        if self.clientid is None:
            ops, kind = [rpc.op_exchange_id(self.verifier, self.owner)], "EXCHANGE_ID"
        elif self.sessionid is None:
            ops, kind = [rpc.op_create_session(self.clientid, self.cs_seq)], "CREATE_SESSION"
        else:
            ops = [rpc.op_sequence(self.sessionid, self.slot_seq), rpc.op_putrootfh(),
                   rpc.op_getattr(rpc.FATTR4_TYPE, rpc.FATTR4_SIZE)]
            kind = "COMPOUND"
        return rpc.call(xid, rpc.NFS_PROG, 4, rpc.NFSPROC4_COMPOUND, rpc.compound_args(1, ops)), kind

    def on_reply(self, kind: str, msg: bytes, emit) -> str:
        res = rpc.compound_result(rpc.parse_reply(msg).results)
        if kind == "EXCHANGE_ID" and res.status == 0:
            self.clientid, self.cs_seq = res.clientid, res.sequenceid
            emit("setup", op=kind, clientid=f"{res.clientid:#x}")
            return "setup"
        if kind == "CREATE_SESSION" and res.status == 0:
            self.sessionid, self.slot_seq = res.sessionid, 1
            self.cs_seq = (self.cs_seq + 1) & 0xFFFFFFFF
            emit("setup", op=kind, session=res.sessionid.hex())
            return "setup"
        if kind == "COMPOUND" and res.status == 0:
            rpc.fattr4_type_size(res.attr_mask, res.attr_vals)
            self.slot_seq = (self.slot_seq + 1) & 0xFFFFFFFF
            return "reply"
        emit("nfs_error", op=kind, status=res.status)
        if kind == "COMPOUND" and res.ops and res.ops[0] == (rpc.OP_SEQUENCE, 0):
            # SEQUENCE passed, a later op failed: the slot advanced
            self.slot_seq = (self.slot_seq + 1) & 0xFFFFFFFF
            return "retry"
        if kind == "COMPOUND" and res.status not in (rpc.NFS4ERR_STALE_CLIENTID, rpc.NFS4ERR_EXPIRED):
            self.sessionid = None
        else:
            self.clientid = self.sessionid = None
        return "state"


def make(vers: str, export: str = "/", payload: int = 128):
    if vers == "echo":
        return Echo(payload)
    if vers == "3":
        return V3(export)
    if vers == "4.0":
        return V40()
    if vers == "4.1":
        return V41()
    raise ValueError(f"unknown version {vers!r}; known: {', '.join(VERSIONS)}")


# -- one-shot RPC over a connection of its own (MOUNT) ------------------------------------
class CallFailed(OSError):
    pass


def recv_record(sock: socket.socket, deadline: float) -> bytes:
    """One RPC record (all its fragments) from a blocking-with-timeout socket."""
    out = bytearray()
    while True:
        length, last = rpc.fragment_header(_recv_exact(sock, 4, deadline))
        if len(out) + length > rpc.MAX_RECORD:
            raise rpc.XdrError("record too large")
        out += _recv_exact(sock, length, deadline)
        if last:
            return bytes(out)


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no reply")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("EOF")
        buf += chunk
    return bytes(buf)


def mount(server: str, port: int, export: str, deadline: float, timeout: float = 5.0) -> bytes:
    """MOUNT v3 MNT of `export`; the root file handle. One short connection, like
    mount.nfs's call to mountd (its port is fixed in the lab: no portmapper)."""
    limit = min(deadline, time.monotonic() + timeout)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(max(0.01, limit - time.monotonic()))
        sock.connect((server, port))
        xid = int.from_bytes(os.urandom(4), "big")
        sock.sendall(rpc.frame(rpc.call(xid, rpc.MOUNT_PROG, rpc.MOUNT_V3, rpc.MOUNTPROC3_MNT,
                                        rpc.mnt_args(export))))
        while True:
            msg = recv_record(sock, limit)
            if rpc.reply_xid(msg) == xid:
                break
    status, fh = rpc.mnt_result(rpc.parse_reply(msg).results)
    if status != 0:
        raise CallFailed(f"MNT {export}: mountstat3 {status}")
    return fh
