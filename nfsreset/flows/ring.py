"""What flowtrack.c shares with us, read in place: the layout of its records,
the `slots` array of flows, and its ring buffer of events (mapped, or through
bcc's callback where the CPU needs barriers)."""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import mmap
import socket
import struct

from nfsreset.core.model import Flow, FlowKey, TCP_STATES
from nfsreset.flows.program import TrackerError


# struct flow and struct event of flowtrack.c, decoded with struct rather than
# ctypes attributes: the reader must keep up with ~10^5 events/s of churn.
_FLOW = struct.Struct("<16s16sHHIIIIIQQQQ")
_EVENT_HEAD = struct.Struct("<II")
_EVENT_SIZE = _EVENT_HEAD.size + _FLOW.size
# Every ring record is one struct event behind the kernel's 8-byte header (u32
# length with the BUSY/DISCARD bits, u32 page offset), padded to 8 bytes: a
# batch is an array of _STRIDE-byte records, read a column at a time.
_STRIDE = (8 + _EVENT_SIZE + 7) & ~7
_SK_AT = _EVENT_HEAD.size + _FLOW.size - 8            # flow.sk (last) in struct event
# Native format: unpack/pack of one native u64 is one 8-byte load/store
# (CPython memcpy), so the positions shared with the kernel are never torn.
_POS = struct.Struct("Q")
_RB_BUSY, _RB_DISCARD = 1 << 31, 1 << 30
_V4MAPPED = bytes(10) + b"\xff\xff"
_OPEN, _STATE, _CLOSE = 1, 2, 3
_SK_IN_FLOW = _FLOW.size - 8                          # flow.sk (last) in struct flow
_SLOT_BUSY = 1                                        # flowtrack.c SLOT_BUSY: claimed, being filled
_U64 = (1 << 64) - 1


def slot_index(sk: int, bits: int) -> int:
    """The `slots` index of a socket pointer, as flowtrack.c slot_index() has it."""
    return (((sk >> 6) * 0x9E3779B97F4A7C15) & _U64) >> (64 - bits)


def slot_bits(max_flows: int) -> int:
    """log2 of the slot count for a table of max_flows (at least 1024 slots)."""
    return max(10, (int(max_flows) - 1).bit_length())


def map_slots(map_fd: int, entries: int) -> mmap.mmap:
    """A read-only mapping of a `slots` array of `entries` flows (its fd)."""
    size = entries * _FLOW.size
    return mmap.mmap(map_fd, (size + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1), mmap.MAP_SHARED, mmap.PROT_READ)


def occupied_slots(table) -> list[int]:
    """Indexes of the slots that hold a flow, in a mapped `slots` array."""
    col = memoryview(table).cast("Q")
    try:
        sks = col[_SK_IN_FLOW // 8::_FLOW.size // 8].tolist()
    finally:
        col.release()
    return [i for i, sk in enumerate(sks) if sk > _SLOT_BUSY]


@functools.lru_cache(maxsize=4096)
def _ip(raw: bytes) -> str:
    """Text of a 16-byte key; v4-mapped becomes plain v4 (as model.norm_ip)."""
    if raw[:12] == _V4MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _to_flow(raw, offset: int = 0) -> Flow:
    (laddr, raddr, lport, rport, netns_inode, state, snd_nxt, rcv_nxt, _family,
     first_seen, last_change, cookie, _sk) = _FLOW.unpack_from(raw, offset)
    return Flow(
        key=FlowKey(_ip(laddr), lport, _ip(raddr), rport),
        state=TCP_STATES.get(state) or str(state),
        netns=netns_inode,
        cookie=cookie or None,
        first_seen=first_seen / 1e9 if first_seen else None,
        last_change=last_change / 1e9 if last_change else None,
        snd_nxt=snd_nxt,
        rcv_nxt=rcv_nxt,
    )

@dataclasses.dataclass
class _Batch:
    """Records read at once: columns of kind, old state and socket pointer;
    struct event i starts at buf[at + i * stride]."""
    kinds: list[int]
    olds: list[int]
    sks: list[int]
    buf: memoryview
    at: int
    stride: int

    @classmethod
    def of(cls, buf: memoryview, n: int, at: int, stride: int) -> "_Batch":
        u32, u64 = buf.cast("I"), buf.cast("Q")
        try:
            return cls(u32[at // 4::stride // 4].tolist()[:n], u32[at // 4 + 1::stride // 4].tolist()[:n],
                       u64[(at + _SK_AT) // 8::stride // 8].tolist()[:n], buf, at, stride)
        finally:
            u32.release()
            u64.release()

    def flow(self, i: int) -> Flow:
        return _to_flow(self.buf, self.at + i * self.stride + _EVENT_HEAD.size)


class _MappedRing:
    """The consumer side of a BPF ring buffer, mapped into this process.

    bcc's reader (libbpf's ring_buffer__consume) calls a Python callback
    through ctypes for every record: ~1.5 us each before any decoding. Mapped
    here, a batch is read in place, a column at a time, and the consumer
    position is written once per batch. Layout (kernel/bpf/ringbuf.c): page
    0 holds consumer_pos (ours to write); from page 1, producer_pos, then the
    data pages mapped twice in a row, so a batch that wraps is still
    contiguous. A record whose length has the BUSY bit is reserved but not
    yet submitted: the batch ends there (records of several CPUs can be
    submitted out of order). The positions are loaded and stored as single
    8-byte accesses and x86 keeps loads in order (and stores after loads), so
    a record is read only after its header says it is complete and handed
    back only after it was read. Other CPUs would need barriers that Python
    cannot issue: there, _CallbackRing.
    """

    def __init__(self, bpf, name: bytes, size: int):
        table = bpf[name]
        page = mmap.PAGESIZE
        self.mask = size - 1
        self._cons = mmap.mmap(table.map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self._prod = mmap.mmap(table.map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            self._cons.close()
            raise
        self._buf = memoryview(self._prod)
        self._pos = _POS.unpack_from(self._cons, 0)[0]
        self._next = self._pos

    def take(self) -> _Batch | None:
        n = (_POS.unpack_from(self._prod, 0)[0] - self._pos) // _STRIDE
        if not n:
            return None
        at = mmap.PAGESIZE + (self._pos & self.mask)
        buf = self._buf[at:at + n * _STRIDE]
        u32 = buf.cast("I")
        lens = u32[::_STRIDE // 4].tolist()
        u32.release()
        odd = lens.count(_EVENT_SIZE) != n
        if odd:
            # A record still reserved ends the batch; a discarded one (the
            # program never discards) is skipped.
            n = next((i for i, ln in enumerate(lens) if ln & _RB_BUSY), n)
            if any(ln & ~_RB_DISCARD != _EVENT_SIZE for ln in lens[:n]):
                buf.release()
                raise TrackerError(f"ring record lengths {sorted(set(lens[:n]))}, expected {_EVENT_SIZE}")
            if not n:
                buf.release()
                return None
        batch = _Batch.of(buf, n, 8, _STRIDE)
        if odd:
            batch.kinds = [k if ln == _EVENT_SIZE else 0 for k, ln in zip(batch.kinds, lens)]
        self._next = self._pos + n * _STRIDE
        return batch

    def release(self, batch: _Batch) -> None:
        """Hand the records of `batch` back to the kernel."""
        batch.buf.release()
        _POS.pack_into(self._cons, 0, self._next)
        self._pos = self._next

    def close(self) -> None:
        self._buf.release()
        self._prod.close()
        self._cons.close()


class _CallbackRing:
    """The same through bcc's reader (libbpf's, with the barriers a weakly
    ordered CPU needs): a Python callback copies each record; slower."""

    def __init__(self, bpf, name: bytes, size: int):
        self._bpf = bpf
        self._records: list[bytes] = []
        bpf[name].open_ring_buffer(self._on_record)

    def _on_record(self, _ctx, data, size) -> int:
        self._records.append(ctypes.string_at(data, _EVENT_SIZE))
        return 0

    def take(self) -> _Batch | None:
        self._bpf.ring_buffer_consume()
        records, self._records = self._records, []
        if not records:
            return None
        return _Batch.of(memoryview(b"".join(records)), len(records), 0, _EVENT_SIZE)

    def release(self, batch: _Batch) -> None:
        batch.buf.release()

    def close(self) -> None:
        pass
