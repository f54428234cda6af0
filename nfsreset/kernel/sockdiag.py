"""TCP sockets through sock_diag netlink: dump with a kernel-side filter, destroy.

What `ss -K 'src VIP and sport = :2049'` does, without the subprocess and without
a round trip per socket: the dump carries an INET_DIAG_REQ_BYTECODE filter, and
SOCK_DESTROY requests go many per send(), each acked, every ack read. pyroute2 has
neither, so this is plain `socket` + `struct` (layouts: include/uapi/linux/
{netlink,sock_diag,inet_diag}.h). Every call works in the calling thread's netns.
The kernel behaviour relied on (6.18): docs/internals.md, "sock_diag".
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import itertools
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable

from nfsreset.kernel import netlink as nl
from nfsreset.kernel import netns
from nfsreset.kernel.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSGHDR
from nfsreset.core.model import STATE_NUMBERS, TCP_STATES, Flow, FlowKey, norm_ip

# include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h
NETLINK_SOCK_DIAG = 4
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10          # acks without a copy of our request: 36 bytes each
TCPDIAG_GETSOCK = 18            # the pre-3.3 request: still the only one dumping both families at once
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF

BC_JMP, BC_S_COND = 1, 7

ALL_STATES_MASK = sum(1 << n for n in TCP_STATES)
LISTEN_BIT = 1 << STATE_NUMBERS["LISTEN"]

_BC_OP = struct.Struct("=BBH")                          # code yes no
_HOSTCOND = struct.Struct("=BBxxi")                     # family prefix_len port(-1 = any)
# nlmsghdr + inet_diag_req_v2 with its inet_diag_sockid; ports go in already
# byte-swapped so the whole request is one pack() (they are __be16 on the wire).
_REQUEST = struct.Struct("=IHHII" "BBBxI" "HH16s16sIII")
# nlmsghdr + inet_diag_req (v1): family src_len dst_len ext, sockid, states, dbs
_REQUEST_V1 = struct.Struct("=IHHII" "BBBB" "HH16s16sIII" "II")
_ACK = struct.Struct("=IHHIIi")                          # nlmsghdr + nlmsgerr.error

RCVBUF = 8 << 20
DEFAULT_BATCH = 1024           # ~1024 acks of ~1 KiB truesize each: far below RCVBUF
MAX_BATCH = 2048               # 2048 x 72 bytes stays under the default netlink sndbuf (EMSGSIZE past it)
RECV_TIMEOUT = 5.0             # one kernel reply never takes this long
MAX_DUMP_MESSAGES = 10_000_000


class SockDiagError(OSError):
    """The kernel refused a sock_diag request (errno set)."""


@dataclasses.dataclass(frozen=True)
class SockId:
    """Exactly what the kernel needs to find a socket again (inet_diag_sockid).

    `family` is the socket's own family: a dual-stack socket serving a v4
    client is AF_INET6 with ::ffff:a.b.c.d addresses. Addresses are the 16
    raw bytes of the sockid (a v4 address is the first 4, rest zero).
    """
    family: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    if_index: int
    cookie: int


@dataclasses.dataclass
class DestroyResult:
    """Outcome per socket, as the kernel's acks said.

    gone: ENOENT, the socket no longer exists, or its 4-tuple now belongs to
    a socket with another cookie (left alone). If acks were lost to a full
    receive buffer (ENOBUFS), the requests without an ack are sent again and
    one we had destroyed the first time shows up here too.
    """
    destroyed: list[SockId] = dataclasses.field(default_factory=list)
    gone: list[SockId] = dataclasses.field(default_factory=list)      # ENOENT: already dead (or reused 4-tuple)
    failed: list[tuple[SockId, int]] = dataclasses.field(default_factory=list)  # (sock, errno)

    def __str__(self) -> str:
        errs = sorted({_errname(e) for _, e in self.failed})
        return (f"destroyed {len(self.destroyed)}, gone {len(self.gone)}, "
                f"failed {len(self.failed)}{' (' + ', '.join(errs) + ')' if errs else ''}")


def _errname(err: int) -> str:
    # Linux has one number for both; the kernel code says EOPNOTSUPP, Python's table ENOTSUP.
    return "EOPNOTSUPP" if err == errno.EOPNOTSUPP else errno.errorcode.get(err, str(err))


# -- codec (pure; tests/unit/test_sockdiag_codec.py) --------------------------------

def _as_list(value, kind) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [kind(value)]
    return [kind(v) for v in value]


def states_mask(states: Iterable[str] | None, exclude_listen: bool = True) -> int:
    """idiag_states bitmask. None: all states (but LISTEN when exclude_listen)."""
    if states is None:
        return ALL_STATES_MASK & ~LISTEN_BIT if exclude_listen else ALL_STATES_MASK
    mask = 0
    for name in states:
        try:
            mask |= 1 << STATE_NUMBERS[name.upper()]
        except KeyError:
            raise ValueError(f"unknown TCP state {name!r}; known: {', '.join(STATE_NUMBERS)}") from None
    return mask


def _hostcond(ip: str | None, port: int | None) -> bytes:
    if ip is None:
        return _HOSTCOND.pack(socket.AF_UNSPEC, 0, -1 if port is None else port)
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    addr = socket.inet_pton(fam, ip)
    return _HOSTCOND.pack(fam, len(addr) * 8, -1 if port is None else port) + addr


def encode_bytecode(local_ips: Iterable[str] | None, local_ports: Iterable[int] | None) -> bytes:
    """Filter program: local (ip, port) is any of local_ips x local_ports.

    Empty/None on one side means "any". Each pair is one S_COND op (a host
    condition carries both address and port). Layout, with C = condition,
    J = unconditional jump:

        C1 [no -> C2]  J [-> end]  C2 [no -> C3]  J [-> end] ... Cn [no -> end+4]

    A matching Ci falls through (yes) to its J, which jumps to the end:
    accept. The last condition falls through to the end itself; its `no`
    jumps 4 bytes past the end: reject (inet_diag_bc_audit allows `no` on an op
    boundary, the end, or 4 bytes past it). Returns b"" when nothing filters.
    """
    ips = [norm_ip(ip) for ip in _as_list(local_ips, str)] or [None]
    ports = _as_list(local_ports, int) or [None]
    for p in ports:
        if p is not None and not 0 < p < 65536:
            raise ValueError(f"bad port {p}")
    if ips == [None] and ports == [None]:
        return b""
    conds = [_hostcond(ip, port) for ip in dict.fromkeys(ips) for port in dict.fromkeys(ports)]
    total = sum(4 + len(c) for c in conds) + 4 * (len(conds) - 1)
    out = bytearray()
    for i, cond in enumerate(conds):
        size = 4 + len(cond)
        if i < len(conds) - 1:
            # miss: skip our J to the next condition; hit: J jumps to the end.
            out += _BC_OP.pack(BC_S_COND, size, size + 4) + cond
            out += _BC_OP.pack(BC_JMP, 4, total - len(out))
        else:
            out += _BC_OP.pack(BC_S_COND, size, total - len(out) + 4) + cond
    if len(out) > 0xFFFF - 4:
        raise ValueError("filter too large: too many address x port pairs")
    return bytes(out)


def encode_dump_request(family: int, states: int, bytecode: bytes, seq: int) -> bytes:
    """Request for a TCP dump (+ INET_DIAG_REQ_BYTECODE when `bytecode`).

    AF_INET / AF_INET6: SOCK_DIAG_BY_FAMILY with inet_diag_req_v2.
    AF_UNSPEC: both families in ONE walk of the socket hash, which only the
    older TCPDIAG_GETSOCK request with inet_diag_req (v1) can ask for
    (inet_diag_dump_compat); SOCK_DIAG_BY_FAMILY has no AF_UNSPEC handler.
    Replies carry the request's type.
    """
    attrs = nl.attr(INET_DIAG_REQ_BYTECODE, bytecode) if bytecode else b""
    flags = NLM_F_REQUEST | NLM_F_DUMP
    if family == socket.AF_UNSPEC:
        return _REQUEST_V1.pack(_REQUEST_V1.size + len(attrs), TCPDIAG_GETSOCK, flags, seq, 0,
                                socket.AF_INET, 0, 0, 0,
                                0, 0, bytes(16), bytes(16), 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE,
                                states, 0) + attrs
    head = _REQUEST.pack(_REQUEST.size + len(attrs), SOCK_DIAG_BY_FAMILY, flags,
                         seq, 0, family, socket.IPPROTO_TCP, 0, states,
                         0, 0, bytes(16), bytes(16), 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    return head + attrs


def encode_destroy_request(sock: SockId, seq: int) -> bytes:
    """One SOCK_DESTROY for `sock`, asking for an ack."""
    return _REQUEST.pack(_REQUEST.size, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, 0,
                         sock.family, socket.IPPROTO_TCP, 0, ALL_STATES_MASK,
                         socket.htons(sock.sport), socket.htons(sock.dport), sock.src, sock.dst,
                         sock.if_index, sock.cookie & 0xFFFFFFFF, sock.cookie >> 32)


_TEXT_CACHE: dict[int, dict[bytes, str]] = {socket.AF_INET: {}, socket.AF_INET6: {}}


def _addr_text(family: int, raw: bytes) -> str:
    """Normalised text of a sockid address, cached: a dump repeats a few VIPs
    and clients thousands of times, and inet_ntop + norm_ip cost 1.5 us."""
    cache = _TEXT_CACHE[family]
    text = cache.get(raw)
    if text is None:
        if len(cache) >= 65536:
            cache.clear()
        if family == socket.AF_INET:
            text = socket.inet_ntop(socket.AF_INET, raw[:4])
        else:
            text = norm_ip(socket.inet_ntop(socket.AF_INET6, raw))
        cache[raw] = text
    return text


def _plain_frozen(cls, filled: set[str]) -> bool:
    """May `cls` be built by filling its __dict__ (see _make)? Yes unless it
    has a __post_init__, slots, or a field outside `filled` without a plain default."""
    return not (hasattr(cls, "__post_init__") or hasattr(cls, "__slots__")) and all(
        f.name in filled or f.default is not dataclasses.MISSING for f in dataclasses.fields(cls))


_object_new, _object_setattr = object.__new__, object.__setattr__
_FLOW_FROM_DUMP = {"key", "state", "netns", "cookie", "inode", "recvq", "sendq"}
_FLOW_REST = {f.name: f.default for f in dataclasses.fields(Flow) if f.name not in _FLOW_FROM_DUMP}
# A frozen dataclass's __init__ does one object.__setattr__ per field (0.85 us
# for Flow, a third of decoding a socket); filling __dict__ in one go makes the
# same object (eq, hash, repr and replace() read the fields). bench/README.md.
_FAST_OBJECTS = (_plain_frozen(Flow, _FLOW_FROM_DUMP)
                 and _plain_frozen(SockId, {f.name for f in dataclasses.fields(SockId)}))
_new_key = tuple.__new__      # FlowKey is a named tuple: skip its Python-level __new__
_STATE_NAMES = tuple(TCP_STATES.get(n, str(n)) for n in range(256))
# inet_diag_msg: ports are __be16, the rest host order; two unpacks.
_MSG = struct.Struct("=BBBB4x16s16sIIIIIIII")
_MSG_PORTS = struct.Struct(">HH")


def decode_diag_msg(buf: bytes, start: int, netns_inode: int | None) -> tuple[Flow, SockId]:
    """One inet_diag_msg -> (Flow seen from the local side, SockId). Attributes are ignored."""
    (family, state, _timer, _retrans, src, dst,
     ifindex, ck_lo, ck_hi, _expires, rqueue, wqueue, _uid, inode) = _MSG.unpack_from(buf, start)
    sport, dport = _MSG_PORTS.unpack_from(buf, start + 4)
    cookie = (ck_hi << 32) | ck_lo
    texts = _TEXT_CACHE.get(family)
    if texts is None:
        raise SockDiagError(errno.EBADMSG, f"inet_diag message of family {family}")
    key = _new_key(FlowKey, (texts.get(src) or _addr_text(family, src), sport,
                             texts.get(dst) or _addr_text(family, dst), dport))
    flow_fields = {"key": key, "state": _STATE_NAMES[state], "netns": netns_inode, "cookie": cookie,
                   "inode": inode, "recvq": rqueue, "sendq": wqueue, **_FLOW_REST}
    sid_fields = {"family": family, "src": src, "dst": dst, "sport": sport, "dport": dport,
                  "if_index": ifindex, "cookie": cookie}
    if not _FAST_OBJECTS:
        return Flow(**flow_fields), SockId(**sid_fields)
    flow = _object_new(Flow)
    _object_setattr(flow, "__dict__", flow_fields)
    sid = _object_new(SockId)
    _object_setattr(sid, "__dict__", sid_fields)
    return flow, sid


# -- kernel I/O ---------------------------------------------------------------------

def _open() -> socket.socket:
    """A sock_diag socket in the current thread's netns."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)   # SO_RCVBUFFORCE: past rmem_max (root)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        except OSError:
            pass                                             # < 4.3: acks carry our request back
        sock.bind((0, 0))
        sock.settimeout(RECV_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return sock


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 17)
    except socket.timeout:
        raise SockDiagError(errno.ETIMEDOUT, f"no answer from sock_diag in {RECV_TIMEOUT} s") from None


@contextlib.contextmanager
def _gc_paused():
    """No cyclic GC while decoding a dump or collecting acks.

    Tens of thousands of small acyclic objects trigger several collections,
    each walking every object of the process (a daemon holding 10,000
    sockets has many): 6-35 ms of a 40 ms dump. Nothing made here can form
    a cycle, so there is nothing for the collector to find.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_NO_COMPAT_ERRNOS = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT, errno.EPROTONOSUPPORT)
_both_in_one_walk = True      # cleared if this kernel refuses TCPDIAG_GETSOCK
_dump_seqs = itertools.count(1)


def _families_for(ips: list[str]) -> tuple[int, ...]:
    # A v4 address also lives in AF_INET6 sockets (v4-mapped); a v6 one only there.
    # AF_UNSPEC: TCPDIAG_GETSOCK, one walk of the (host-wide) hash for both families;
    # SOCK_DIAG_BY_FAMILY has no AF_UNSPEC handler and walks once per family.
    if ips and all(":" in ip for ip in ips):
        return (socket.AF_INET6,)
    return (socket.AF_UNSPEC,) if _both_in_one_walk else (socket.AF_INET, socket.AF_INET6)


def dump(local_ips=None, local_ports=None, states=None, exclude_listen=True) -> list[tuple[Flow, SockId]]:
    """TCP sockets of the current thread's netns whose local side matches.

    local_ips: addresses (str or iterable; v4-mapped forms are normalised, a
    v4 address also matches dual-stack sockets); local_ports: int or
    iterable; None = any. states: names from model.TCP_STATES, None = all but
    LISTEN (all with exclude_listen=False). The filter runs in the kernel.
    """
    ips = [norm_ip(ip) for ip in _as_list(local_ips, str)]
    bytecode = encode_bytecode(ips, local_ports)
    mask = states_mask(states, exclude_listen)
    inode = netns.current_inode()
    found: list[tuple[Flow, SockId]] = []
    with _open() as sock, _gc_paused():
        _dump_into(sock, _families_for(ips), mask, bytecode, inode, found)
    return found


def _dump_into(sock, families, mask: int, bytecode: bytes, inode: int, found: list) -> None:
    global _both_in_one_walk
    for family in families:
        seq = next(_dump_seqs)
        sock.sendto(encode_dump_request(family, mask, bytecode, seq), (0, 0))
        try:
            _read_dump(sock, seq, inode, found)
        except SockDiagError as exc:
            if family != socket.AF_UNSPEC or found or exc.errno not in _NO_COMPAT_ERRNOS:
                raise
            _both_in_one_walk = False       # a kernel without the old request: one walk per family
            _dump_into(sock, (socket.AF_INET, socket.AF_INET6), mask, bytecode, inode, found)


def _read_dump(sock: socket.socket, seq: int, inode: int, found: list) -> None:
    # The message walk is netlink.messages() inlined: at 10,000 sockets the
    # generator alone costs as much as the kernel takes to fill the buffers.
    count = 0
    deadline = time.monotonic() + 60
    header, decode, append = NLMSGHDR.unpack_from, decode_diag_msg, found.append
    while True:
        buf = _recv(sock)
        off, size = 0, len(buf)
        while off + 16 <= size:
            length, kind, _flags, mseq, _pid = header(buf, off)
            if length < 16 or off + length > size:
                raise SockDiagError(errno.EBADMSG, f"truncated netlink message at {off} (len {length})")
            if mseq == seq:                      # else: stale answer of an aborted request
                if kind == SOCK_DIAG_BY_FAMILY or kind == TCPDIAG_GETSOCK:
                    append(decode(buf, off + 16, inode))
                    count += 1
                elif kind == NLMSG_DONE:
                    return
                elif kind == NLMSG_ERROR:
                    err, _ = nl.error(buf, off + 16)
                    raise SockDiagError(err, f"sock_diag dump: {os.strerror(err)}")
            off += (length + 3) & ~3
        if count > MAX_DUMP_MESSAGES or time.monotonic() > deadline:
            raise SockDiagError(errno.E2BIG, f"sock_diag dump did not end ({count} sockets)")


def destroy(socks: Iterable[SockId], batch: int = DEFAULT_BATCH) -> DestroyResult:
    """SOCK_DESTROY each socket (current thread's netns); classify every ack.

    The kernel answers a destroyed socket with an RST to its peer (when the
    local address still routes) and ECONNABORTED to its owner. It looks the
    socket up by 4-tuple, so one whose local address was deleted is still found.
    ENOENT means gone (or 4-tuple reused by a socket with another cookie: left
    alone); EOPNOTSUPP, no CONFIG_INET_DIAG_DESTROY (or a minisocket on an old
    kernel): reported in `failed`. At most `batch` requests are in flight: the
    kernel runs one send()'s requests synchronously, so its acks are all queued.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    batch = min(batch, MAX_BATCH)
    result = DestroyResult()
    todo = iter(socks)
    seqs = itertools.count(1)
    with _open() as sock, _gc_paused():
        reader = _AckReader(sock, batch)
        while chunk := list(itertools.islice(todo, batch)):
            _destroy_batch(sock, reader, chunk, seqs, result)
    return result


def _destroy_batch(sock: socket.socket, reader: "_AckReader", chunk: list[SockId], seqs,
                   result: DestroyResult) -> None:
    waiting = {next(seqs): sid for sid in chunk}
    parts = [encode_destroy_request(sid, seq) for seq, sid in waiting.items()]
    # The kernel runs every request of this send() before it returns, so all
    # acks are queued now; reading them is a loop over what is already there.
    sock.sendto(b"".join(parts), (0, 0))
    lost = False
    deadline = time.monotonic() + RECV_TIMEOUT
    while waiting:
        try:
            acks = reader.read()
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:      # ENOBUFS: acks dropped, receive buffer overflowed
                raise
            lost = True
            continue
        if not acks:
            if lost or time.monotonic() > deadline:
                break
            select.select([sock], [], [], 0.05)
            continue
        for err, seq in acks:
            sid = waiting.pop(seq, None)
            if sid is None:
                continue
            if err == 0:
                result.destroyed.append(sid)
            elif err == errno.ENOENT:
                result.gone.append(sid)
            else:
                result.failed.append((sid, err))
    if waiting and lost:
        # The kernel ran every request; only acks were dropped. Ask again, one
        # at a time: ENOENT now most likely means "destroyed by the first try".
        for sid in list(waiting.values()):
            _destroy_batch(sock, reader, [sid], seqs, result)
    elif waiting:
        raise SockDiagError(errno.ETIMEDOUT, f"{len(waiting)} SOCK_DESTROY requests unanswered")


class _AckReader:
    """Drains queued netlink acks, many per syscall where recvmmsg(2) exists.

    Every ack is a datagram of its own, so recv() would cost one syscall per
    destroyed socket; Python has no recvmmsg binding, hence ctypes. Each slot
    only needs the first 36 bytes (nlmsghdr, error, echoed nlmsghdr): a
    longer ack (kernel without NETLINK_CAP_ACK) is truncated harmlessly.
    The ctypes arrays take milliseconds to build, so each thread keeps its
    own for reuse (one reader per thread at a time: destroy() is not reentrant).
    """
    SLOT = 128
    MSG_DONTWAIT = 0x40
    _per_thread = threading.local()

    def __init__(self, sock: socket.socket, vlen: int) -> None:
        self.sock = sock
        self.vlen = max(1, min(vlen, 1024))
        self._recvmmsg = None
        arrays = getattr(self._per_thread, "arrays", None)
        if arrays is None or arrays[0] < self.vlen:
            arrays = self._per_thread.arrays = _mmsg_arrays(self.vlen, self.SLOT)
        _size, self._recvmmsg, self.buf, self.msgs, self._iovs = arrays
        if self._recvmmsg is not None:
            import ctypes

            self._ctypes = ctypes
            self._msgs_addr = ctypes.addressof(self.msgs)

    def read(self) -> list[tuple[int, int]]:
        """(errno, seq) of the acks queued now; [] when none is."""
        if self._recvmmsg is None:
            return self._read_one()
        n = self._recvmmsg(self.sock.fileno(), self._msgs_addr, self.vlen, self.MSG_DONTWAIT, None)
        if n < 0:
            err = self._ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return []
            raise OSError(err, os.strerror(err))
        out = []
        unpack, buf, slot = _ACK.unpack_from, self.buf, self.SLOT
        for i in range(n):
            _len, kind, _flags, seq, _pid, err = unpack(buf, i * slot)
            if kind == NLMSG_ERROR:
                out.append((-err, seq))
        return out

    def _read_one(self) -> list[tuple[int, int]]:
        try:
            buf = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return []
        return [nl.error(buf, start) for kind, _f, _s, start, _e in nl.messages(buf, error=SockDiagError)
                if kind == NLMSG_ERROR]


def _mmsg_arrays(vlen: int, slot: int):
    """(vlen, recvmmsg, buffer, struct mmsghdr[vlen], struct iovec[vlen]); recvmmsg None if libc lacks it."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).recvmmsg
    except (OSError, AttributeError):
        return vlen, None, None, None, None

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    class MsgHdr(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                    ("iov", ctypes.c_void_p), ("iovlen", ctypes.c_size_t),
                    ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int)]

    class MMsgHdr(ctypes.Structure):
        _fields_ = [("hdr", MsgHdr), ("len", ctypes.c_uint)]

    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    buf = ctypes.create_string_buffer(slot * vlen)
    base = ctypes.addressof(buf)
    iovs = (IoVec * vlen)(*[IoVec(base + i * slot, slot) for i in range(vlen)])
    iov0, iov_size = ctypes.addressof(iovs), ctypes.sizeof(IoVec)
    msgs = (MMsgHdr * vlen)(*[MMsgHdr(MsgHdr(None, 0, iov0 + i * iov_size, 1, None, 0, 0), 0)
                              for i in range(vlen)])
    return vlen, fn, buf, msgs, iovs


def probe_destroy() -> tuple[bool, str]:
    """Can this kernel destroy sockets here? Tries on a loopback connection of our own.

    (True, detail) when the destroyed socket really died; (False, reason)
    otherwise (EOPNOTSUPP: no CONFIG_INET_DIAG_DESTROY; EPERM: no
    CAP_NET_ADMIN over this netns; or no usable loopback to try on).
    """
    if not _loopback_up():
        return False, "lo is down in this netns: no loopback connection to probe on"
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            return _probe_on(family, host)
        except TimeoutError:
            continue
        except OSError as exc:
            if exc.errno in (errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.ECONNREFUSED, errno.EAFNOSUPPORT):
                continue      # no 127.0.0.1 / ::1 here: try the other family
            return False, f"probe failed: {exc}"
    return False, "no usable loopback address in this netns"


def _loopback_up() -> bool:
    # SIOCGIFFLAGS on a socket of this netns (/sys may show another netns's devices).
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s, 0x8913, struct.pack("16sH14x", b"lo", 0))   # SIOCGIFFLAGS
        except OSError:
            return False
    return bool(struct.unpack_from("=H", raw, 16)[0] & 0x1)                 # IFF_UP


def _probe_on(family: int, host: str) -> tuple[bool, str]:
    with socket.socket(family, socket.SOCK_STREAM) as listener, socket.socket(family, socket.SOCK_STREAM) as client:
        listener.bind((host, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client.settimeout(1)                # a loopback handshake completes inside connect()
        client.connect((host, port))
        listener.settimeout(1)
        server, _ = listener.accept()
        with server:
            cport = client.getsockname()[1]
            mine = [sid for flow, sid in dump([host], [port]) if flow.key.cport == cport]
            if len(mine) != 1:
                return False, f"dump found {len(mine)} sockets for our own probe connection"
            res = destroy(mine)
            if res.failed:
                err = res.failed[0][1]
                why = {errno.EOPNOTSUPP: "kernel without CONFIG_INET_DIAG_DESTROY",
                       errno.EPERM: "no CAP_NET_ADMIN in this netns"}.get(err, "")
                return False, f"SOCK_DESTROY: {os.strerror(err)}{' (' + why + ')' if why else ''}"
            if not res.destroyed:
                return False, f"SOCK_DESTROY did not destroy the probe socket ({res})"
            err = server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err != errno.ECONNABORTED:
                return False, f"destroy acked but the socket is alive (SO_ERROR={err})"
            return True, f"SOCK_DESTROY works ({'v4' if family == socket.AF_INET else 'v6'} loopback probe)"
