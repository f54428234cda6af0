"""Track the TCP sockets of watched VIPs and ports with BPF (bcc), as they change.

The kernel side is bpf/flowtrack.c (package data of nfsreset.bpf): it filters in
BPF before touching any per-flow map, keeps one entry per socket in an mmapable
array of slots, and sends opens, closes and the state changes of flows older than
STATE_AGE_S through a ring buffer. Raw tracepoints only (no kprobes or fentry
here; no tracefs needed), struct offsets from BTF as -D flags (bcc may compile
against another kernel's headers). Why it is built so, and what churn costs:
docs/internals.md, "The BPF flow tracker"; bench/bench_tracker.py.

bcc is imported inside functions: hooks import this module and must start fast.
"""
from __future__ import annotations

import atexit
import collections
import ctypes
import dataclasses
import functools
import ipaddress
import mmap
import os
import platform
import select
import socket
import struct
import time
from pathlib import Path
from typing import Iterable

from nfsreset import btf
from nfsreset.netns import libc
from nfsreset.model import TCP_STATES, Flow, FlowKey, norm_ip

TRACEFS = "/sys/kernel/tracing"

# -D name -> (BTF member path, size in bytes that the C code reads).
_OFFSETS = {
    "OFF_TCP_RCV_NXT": ("tcp_sock.rcv_nxt", 4),
    "OFF_TCP_SND_NXT": ("tcp_sock.snd_nxt", 4),
    "OFF_SK_NET": ("sock.__sk_common.skc_net.net", 8),
    "OFF_NET_INUM": ("net.ns.inum", 4),
    "OFF_SK_COOKIE": ("sock.__sk_common.skc_cookie", 8),
    "OFF_SKB_CB": ("sk_buff.cb", None),
    "OFF_TCB_SEQ": ("tcp_skb_cb.seq", 4),
    "OFF_TCB_END_SEQ": ("tcp_skb_cb.end_seq", 4),
    "OFF_SK_PROTOCOL": ("sock.sk_protocol", 2),
    "OFF_SK_FAMILY": ("sock.__sk_common.skc_family", 2),
    "OFF_INET_SPORT": ("inet_sock.inet_sport", 2),
    "OFF_SK_DPORT": ("sock.__sk_common.skc_dport", 2),
    "OFF_SK_RCV_SADDR": ("sock.__sk_common.skc_rcv_saddr", 4),
    "OFF_SK_DADDR": ("sock.__sk_common.skc_daddr", 4),
    "OFF_SK_V6_RCV_SADDR": ("sock.__sk_common.skc_v6_rcv_saddr", 16),
    "OFF_SK_V6_DADDR": ("sock.__sk_common.skc_v6_daddr", 16),
}
EVENT_KINDS = {1: "open", 2: "state", 3: "close"}
AF_INET, AF_INET6 = 2, 10


class TrackerError(Exception):
    pass


@functools.cache
def bpf_offsets() -> dict[str, int]:
    """The -D values for flowtrack.c, resolved from the running kernel's BTF."""
    table = btf.vmlinux()
    out = {}
    for define, (path, size) in _OFFSETS.items():
        member = table.member(path)
        if member.bitfield or (size is not None and member.size != size):
            raise btf.BTFError(f"{path} is {member.bit_size} bits here; flowtrack.c reads {size} bytes")
        out[define] = member.offset
    return out


# Members read together with one probe read each: (-D prefix, members, most bytes).
_WINDOWS = (
    ("COMMON", ("OFF_SK_DADDR", "OFF_SK_RCV_SADDR", "OFF_SK_DPORT", "OFF_SK_FAMILY", "OFF_SK_NET",
                "OFF_SK_V6_DADDR", "OFF_SK_V6_RCV_SADDR", "OFF_SK_COOKIE"), 128),
    ("SEQS", ("OFF_TCP_RCV_NXT", "OFF_TCP_SND_NXT"), 64),
    ("TCB", ("OFF_TCB_SEQ", "OFF_TCB_END_SEQ"), 16),
)


def _window_flags(offsets: dict[str, int]) -> list[str]:
    """-D<NAME>_LO/_LEN: the span that covers a group of members."""
    out = []
    for name, members, most in _WINDOWS:
        lo = min(offsets[m] for m in members)
        hi = max(offsets[m] + _OFFSETS[m][1] for m in members)
        if hi - lo > most:
            raise TrackerError(f"{name.lower()} members span {hi - lo} bytes here; flowtrack.c reads at most {most}")
        out += [f"-D{name}_LO={lo}", f"-D{name}_LEN={hi - lo}"]
    return out


@functools.cache
def _source() -> str:
    import nfsreset.bpf
    return (Path(nfsreset.bpf.__file__).parent / "flowtrack.c").read_text()


# -- tracefs ---------------------------------------------------------------------
_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_SLAVE = 0x4000, 0x80000


def ensure_tracefs() -> None:
    """Mount tracefs at /sys/kernel/tracing if it is missing, privately.

    bcc attaches tracepoints through ids and formats found in tracefs. Under
    `ip netns exec` /sys is a fresh sysfs mount without tracefs on it. We
    mount it in a mount namespace of our own (unshare + make-rslave) so that
    nobody else's view of the file system changes, in particular not the
    host's when this runs there by mistake. unshare(CLONE_NEWNS) applies to
    the calling thread (and threads it starts later): call this from the
    thread that creates the FlowTracker (its __init__ does).
    """
    if os.path.exists(os.path.join(TRACEFS, "events")):
        return
    if libc.unshare(_CLONE_NEWNS) != 0:
        raise TrackerError(f"unshare(CLONE_NEWNS) failed: {os.strerror(ctypes.get_errno())}")
    # Slave, not private: mounts made later on the host still propagate to us.
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None) != 0:
        raise TrackerError(f"make-rslave / failed: {os.strerror(ctypes.get_errno())}")
    if libc.mount(b"tracefs", TRACEFS.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise TrackerError(f"mount -t tracefs {TRACEFS} failed: {os.strerror(err)}")


# -- events --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FlowEvent:
    kind: str                 # 'open' | 'state' | 'close'
    flow: Flow
    old_state: str | None     # state before this change (None when unknown)


class _Addr16(ctypes.Structure):
    _fields_ = [("a", ctypes.c_ubyte * 16)]


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
_CFG_NETNS = 0
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


def _addr_key(ip: str) -> bytes:
    """16 bytes as flowtrack.c keys addresses: IPv4 as v4-mapped IPv6."""
    addr = ipaddress.ip_address(norm_ip(ip))
    if addr.version == 4:
        return _V4MAPPED + addr.packed
    return addr.packed


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


# -- jiffies ---------------------------------------------------------------------
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_BPF_PROG_TEST_RUN = 10
_TEST_RUN_ATTR = 80                     # union bpf_attr's test member, padded


def _test_run(attr) -> bool:
    """Run a raw tracepoint program once, now (BPF_PROG_TEST_RUN, no ctx);
    `attr` is union bpf_attr with test.prog_fd set."""
    return libc.syscall(_SYS_BPF, _BPF_PROG_TEST_RUN, attr, _TEST_RUN_ATTR) == 0


# Pairing ends once two jiffies edges at least span_ns apart are dated to
# within this fraction of the time between them: the HZ values a kernel is
# built with are >= 17% apart, and the pair's tick is snapped to one of them.
_PAIR_REL_WIDTH = 0.01


def clock_pair_from(samples: Iterable[tuple[int, int, int]], span_ns: int = 20_000_000) -> tuple[int, int, int] | None:
    """(t0 ns, j0, tick ns) from (jiffies, lo, hi) samples taken back to back
    (jiffies read between CLOCK_MONOTONIC lo and hi ns): jiffies became j0 at
    t0, and a tick is tick ns. None with fewer than two edges, or ticks that
    match no HZ a kernel is built with (within 5%): a tick that is not exact
    would put old flows' births ever further off.

    An edge lies between the lo of the last sample before it and the hi of
    the first after. Back to back that bracket is ~10 us, but a sampler
    preempted or interrupted around an edge widens it to milliseconds (2 CPUs
    busy: a third of the edges). So the tick comes from the pair of edges
    dated best relative to the time between them (midpoints), and t0 from
    the well-dated ones (below). Reading ends when a pair span_ns apart
    is within _PAIR_REL_WIDTH (after 20 ms when the sampler runs freely), or
    when the samples end (the caller's deadline): then the best pair seen
    counts, if its tick snaps."""
    edges: list[tuple[int, int, int]] = []         # (jiffies, lo, hi): became jiffies in [lo, hi] ns
    best = None                                    # (relative width, span, edge a, edge b)
    prev = None
    for j, lo, hi in samples:
        if prev is not None and j != prev[0]:
            b = (j, prev[1], hi)
            mid_b, w_b = (b[1] + b[2]) / 2, b[2] - b[1]
            for a in edges:
                span = mid_b - (a[1] + a[2]) / 2
                rel = (w_b + a[2] - a[1]) / span
                if best is None or rel < best[0]:
                    best = (rel, span, a, b)
            edges.append(b)
            if best is not None and best[1] >= span_ns and best[0] <= _PAIR_REL_WIDTH:
                break
        prev = (j, lo, hi)
    if best is None:
        return None
    _, span, a, b = best
    # One tick seen alone is off by up to ~3% here (tick interrupts jitter in
    # a VM); over 20 ms the estimate is within a fraction of a percent.
    hz = 1e9 * (b[0] - a[0]) / span
    near = [h for h in (100, 250, 300, 1000) if abs(h - hz) <= h * 0.05]
    if not near:
        return None
    tick = (1_000_000_000 + near[0] // 2) // near[0]
    # A narrow bracket dates when jiffies moved; a tick that comes late moves
    # it late, never early. The median phase of the well-dated edges is not
    # fooled by one such edge. (Shifts of the whole schedule by up to half a
    # tick were seen with both CPUs busy: docs/internals.md, "Young or old".)
    narrow = min(e[2] - e[1] for e in edges) + 10_000
    j0 = edges[-1][0]
    phases = sorted((lo + hi) // 2 + (j0 - j) * tick for j, lo, hi in edges if hi - lo <= narrow)
    return phases[(len(phases) - 1) // 2], j0, tick


def _clock_pairs(prog_fd: int, sample, span_s: float = 0.02, timeout_s: float = 0.2) -> tuple[int, int, int] | None:
    """clock_pair_from() over samples the unattached program `clock_pair`
    takes when run (BPF_PROG_TEST_RUN), for at most timeout_s; None when the
    program cannot be run."""
    if _SYS_BPF is None:
        return None
    zero = ctypes.c_int(0)
    attr = ctypes.create_string_buffer(_TEST_RUN_ATTR)
    struct.pack_into("I", attr, 0, prog_fd)

    def samples():
        deadline = time.monotonic() + timeout_s
        for _ in range(200_000):
            if time.monotonic() > deadline or not _test_run(attr):
                return
            s = sample[zero]
            yield int(s.jiffies), int(s.before), int(s.after)

    return clock_pair_from(samples(), int(span_s * 1e9))


# -- the tracker -------------------------------------------------------------------
class FlowTracker:
    """Loaded and attached on construction; close() detaches and frees it all.

    Empty `vips` watches nothing (add them with set_vips); empty
    `netns_inodes` means every network namespace. Filters change at run time
    through BPF maps, without recompiling; they decide which new sockets are
    followed, and a socket followed is followed until it closes.

    poll() reports what changed since the last poll (coalesce=True, the
    default): each flow's open, its latest state, its close. A flow that
    opened and closed in between is not reported at all; several changes to
    one flow become one event with the newest values, whose old_state is the
    state before the first of them. A flow's state changes in its first
    STATE_AGE_S are not sent by the kernel: they stay in the map, and poll()
    reports the flow's state then (one map look-up per flow reported open)
    with the state it reported before as old_state. flows() always reads the
    kernel's current table. coalesce=False reports every change the kernel
    sees, as it happens (for tests and tools: under churn the reader decodes
    four records per connection instead of folding two).

    `slots` (a power of 2) overrides the size of the slot array, which is
    otherwise max_flows rounded up, at least 1024. Socket pointers come from
    a slab in steps of its object size, and the Fibonacci hash spreads such
    steps evenly, so 150 sockets in 1024 slots can share none (seen): a test that
    needs collisions asks for a few slots instead of hoping for them.
    """

    # The reader looks again this long after it found records, for those
    # submitted without waking it (flowtrack.c WAKE_GAP_NS, plus timer slack).
    WAKE_GAP_S = 0.010
    RECHECK_S = WAKE_GAP_S + 0.002
    STATE_AGE_S = 0.050
    # A flow is looked up this long after it is STATE_AGE_S old: the kernel's
    # map update, made before that age, is long visible by then.
    LOOKUP_SLACK_S = 0.005

    def __init__(self, ports: Iterable[int], vips: Iterable[str] = (), netns_inodes: Iterable[int] = (),
                 max_flows: int = 65536, ring_pages: int = 256, coalesce: bool = True,
                 reader: str = "auto", slots: int | None = None):
        from bcc import BPF  # heavy (~0.3 s), only here
        from bcc.libbcc import lib

        if ring_pages < 1 or ring_pages & (ring_pages - 1):
            raise ValueError(f"ring_pages must be a power of 2, not {ring_pages}")
        if reader not in ("auto", "mapped", "callback"):
            raise ValueError(f"reader is 'auto', 'mapped' or 'callback', not {reader!r}")
        if slots is not None and (slots < 2 or slots & (slots - 1)):   # 1 slot: a shift by 64 in C
            raise ValueError(f"slots must be a power of 2 from 2 up, not {slots}")
        ring_bytes = int(ring_pages) * mmap.PAGESIZE
        offsets = bpf_offsets()
        cflags = [f"-D{k}={v}" for k, v in offsets.items()] + _window_flags(offsets)
        # Wake the reader by the time a quarter of the ring is waiting: it has
        # the other three quarters' worth of time to be scheduled.
        # A slot per flow allowed; the hash map for collisions holds half as many.
        self._slot_bits = slot_bits(max_flows) if slots is None else int(slots).bit_length() - 1
        cflags += [f"-DSLOT_BITS={self._slot_bits}", f"-DSPILL_FLOWS={max(1024, int(max_flows) // 2)}",
                   f"-DRING_PAGES={int(ring_pages)}",
                   f"-DWAKE_BYTES={ring_bytes // 4}", f"-DWAKE_GAP_NS={int(self.WAKE_GAP_S * 1e9)}ULL", "-w"]
        self._coalesce = coalesce
        self._recheck_at = 0.0
        self._lost_seen = 0
        self._ring = None
        self._epoll = None
        self._slots = None
        # sk -> [look-up due (monotonic s), first_seen, state last reported]
        # for flows reported open and not yet STATE_AGE_S old; due times ascend.
        self._young: collections.OrderedDict[int, list] = collections.OrderedDict()
        self._lookup = lib.bpf_lookup_elem
        self._key = ctypes.c_uint64()
        self._leaf = ctypes.create_string_buffer(_FLOW.size)
        self._bpf = BPF(text=_source().encode(), cflags=cflags)
        try:
            flows = self._bpf[b"flows"]
            leaf = ctypes.sizeof(flows.Leaf)
            if leaf != _FLOW.size:
                raise TrackerError(f"struct flow is {leaf} bytes in flowtrack.c, {_FLOW.size} in tracker.py")
            self._flows_fd = flows.map_fd
            self._slots = map_slots(self._bpf[b"slots"].map_fd, 1 << self._slot_bits)
            events = self._bpf[b"events"]
            if events.max_entries != ring_bytes:
                raise TrackerError(f"ring is {events.max_entries} bytes, expected {ring_bytes}")
            mapped = reader == "mapped" or (reader == "auto" and platform.machine() in ("x86_64", "i686", "AMD64"))
            self._ring = (_MappedRing if mapped else _CallbackRing)(self._bpf, b"events", ring_bytes)
            # Edge-triggered: reports the kernel's wakeups only. A ring with
            # data in it is always "readable", so level-triggered polling
            # would read (and pay per read) whenever one record was waiting.
            self._epoll = select.epoll()
            self._epoll.register(events.map_fd, select.EPOLLIN | select.EPOLLET)
            if coalesce:
                self._set_young_age()
            self._ports: set[int] = set()
            self._vips: set[bytes] = set()
            self._netns: set[int] = set()
            # The namespace filter first: set last, it would let other
            # namespaces' flows on these ports and VIPs in meanwhile.
            self.set_netns(netns_inodes)
            self.set_ports(ports)
            self.set_vips(vips)
        except BaseException:
            self.close()
            raise

    def _set_young_age(self) -> None:
        """Let the kernel keep the state changes of flows younger than ~STATE_AGE_S.

        The program tells young from old in jiffies (cheap) against a flow's
        birth in ns: this pairs the two clocks at a tick edge and measures the
        tick (flowtrack.c, struct clock). Without the pair (BPF_PROG_TEST_RUN
        refused, a tick not seen in time) every change is sent: correct,
        only dearer under churn.
        """
        from bcc import BPF

        pair = _clock_pairs(self._bpf.load_func(b"clock_pair", BPF.RAW_TRACEPOINT).fd,
                            self._bpf[b"clock_sample"])
        if pair is None:
            return
        t0, j0, tick_ns = pair
        # A jiffies difference of n is a real age in (n-1, n+1) ticks, and the
        # birth is put on the jiffies scale to the tick: one tick less keeps the
        # real age at the switch under STATE_AGE_S (the reader looks up then).
        age_j = max(1, int(self.STATE_AGE_S * 1e9) // tick_ns - 1)
        table = self._bpf[b"clock"]
        leaf = table.Leaf()
        leaf.age_j, leaf.t0, leaf.j0, leaf.tick_ns = age_j, t0, j0, tick_ns
        table[ctypes.c_int(0)] = leaf

    # filters: add the new keys before removing old ones, so a flow watched
    # before and after a change is never missed in between.
    def set_ports(self, ports: Iterable[int]) -> None:
        new = {int(p) for p in ports}
        if any(not 0 < p < 65536 for p in new):
            raise ValueError(f"bad port in {sorted(new)}")
        table = self._bpf[b"ports"]
        for p in new - self._ports:
            table[ctypes.c_int(p)] = ctypes.c_uint8(1)
        # 2: no new flows on this port, but the ones followed are followed to
        # their close (flowtrack.c tests the port before it looks a flow up).
        for p in self._ports - new:
            table[ctypes.c_int(p)] = ctypes.c_uint8(2)
        self._ports = new

    def set_vips(self, vips: Iterable[str]) -> None:
        new = {_addr_key(v) for v in vips}
        self._sync("vips", self._vips, new, lambda k: _Addr16.from_buffer_copy(k))
        self._vips = new

    def set_netns(self, inodes: Iterable[int]) -> None:
        new = {int(i) for i in inodes}
        config = self._bpf[b"config"]
        if not new:  # switch the filter off first: all namespaces
            config[ctypes.c_int(_CFG_NETNS)] = ctypes.c_uint64(0)
        self._sync("netns_ok", self._netns, new, lambda i: ctypes.c_uint32(i))
        if new:
            config[ctypes.c_int(_CFG_NETNS)] = ctypes.c_uint64(1)
        self._netns = new

    def _sync(self, name: str, old: set, new: set, make_key) -> None:
        table = self._bpf[name.encode()]
        for k in new - old:
            table[make_key(k)] = ctypes.c_uint8(1)
        for k in old - new:
            try:
                del table[make_key(k)]
            except KeyError:
                pass

    # events and state
    def _read(self) -> tuple[int, list[FlowEvent]]:
        """(records consumed, events) from what the ring holds now."""
        batch = self._ring.take()
        if batch is None:
            return 0, []
        kinds, olds, sks = batch.kinds, batch.olds, batch.sks
        # (record index, kind, old_state) of what to report
        picked = self._coalesced(kinds, olds, sks) if self._coalesce else \
            [(i, k, olds[i]) for i, k in enumerate(kinds) if k]
        out = []
        young = self._young
        for i, kind, old in picked:
            flow = batch.flow(i)
            sk = sks[i]
            if kind == _CLOSE:
                young.pop(sk, None)
            elif kind == _OPEN:
                if self._coalesce and flow.first_seen is not None:
                    young[sk] = [flow.first_seen + self.STATE_AGE_S + self.LOOKUP_SLACK_S,
                                 flow.first_seen, flow.state]
            elif sk in young:
                young[sk][2] = flow.state
            out.append(FlowEvent(EVENT_KINDS.get(kind) or str(kind), flow, TCP_STATES.get(old)))
        self._ring.release(batch)
        return len(kinds), out

    @staticmethod
    def _coalesced(kinds: list, olds: list, sks: list) -> list:
        """(record index, kind, old_state) of what a batch says once each
        socket's records are folded together, in record order.

        The records of one socket pointer form a chain. The allocator hands a
        freed socket's memory to the next one at once, so under churn a chain
        is often long: [close of the flow reported earlier,] open, close,
        open, close, ... [, open of a flow still there]. Only its ends matter:
        the first flow if it was known before the batch, the last if it is
        still open. (A lost record, counted in `lost`, can break that shape;
        the caller reconciles then anyway.)
        """
        n = len(sks)
        first = dict(zip(reversed(sks), range(n - 1, -1, -1)))
        picked = []
        old = olds.__getitem__
        for sk, last in dict(zip(sks, range(n))).items():
            f = i = first[sk]
            if f == last:                       # one record: report it as it is
                if kinds[f]:
                    picked.append((f, kinds[f], old(f)))
                continue
            if kinds[f] != _OPEN:
                # A flow known before this batch: its states, then its close.
                while kinds[i] not in (_CLOSE, _OPEN) and i != last:
                    i = sks.index(sk, i + 1, last + 1)
                if kinds[i] == _CLOSE:
                    picked.append((i, _CLOSE, old(f) if kinds[f] == _STATE else old(i)))
                    if i == last:
                        continue
                elif kinds[i] != _OPEN:         # i == last: still there, changed
                    picked.append((i, _STATE, old(f)))
                    continue
            tail = kinds[last]
            if tail == _OPEN:
                picked.append((last, _OPEN, old(last)))
            elif tail == _STATE:
                # The last flow opened and changed within the batch (a reader
                # slower than STATE_AGE_S): its open, with its newest values.
                j = next((j for j in range(last, i - 1, -1) if sks[j] == sk and kinds[j] == _OPEN), last)
                picked.append((last, _OPEN if kinds[j] == _OPEN else _STATE, old(j)))
            # tail == _CLOSE: the last flow came and went (churn): nothing to say
        picked.sort()
        return picked

    def _look_up_young(self, now: float) -> list[FlowEvent]:
        """State changes of flows that came of age (not sent by the kernel)."""
        out = []
        young = self._young
        while young:
            sk, (due, first_seen, reported) = next(iter(young.items()))
            if due > now:
                break
            young.popitem(last=False)
            raw = self._entry(sk)
            if raw is None:
                continue                        # closed: its close record tells
            flow = _to_flow(raw)
            # The same socket (not another one at the same address) and changed.
            if flow.first_seen == first_seen and flow.state != reported:
                out.append(FlowEvent("state", flow, reported))
        return out

    def _entry(self, sk: int) -> bytes | None:
        """The table's entry of socket `sk`: its slot, or the collision map."""
        at = slot_index(sk, self._slot_bits) * _FLOW.size
        raw = self._slots[at:at + _FLOW.size]   # one copy, then checked: the kernel may be writing
        if _POS.unpack_from(raw, _SK_IN_FLOW)[0] == sk:
            return raw
        self._key.value = sk
        if self._lookup(self._flows_fd, ctypes.byref(self._key), self._leaf) != 0:
            return None
        return self._leaf.raw

    def poll(self, timeout_ms: int = 100) -> list[FlowEvent]:
        """Events that arrived, waiting up to timeout_ms for the first one.

        The ring is read when the kernel wakes us (the first record after a
        quiet WAKE_GAP_S, or a quarter of the ring waiting) and RECHECK_S
        after any read that found records, however often this is called, so
        a read costs per batch, not per call; poll(0) reads at once. An event
        reaches the caller within ~RECHECK_S (a young flow's state change
        within STATE_AGE_S) while poll() is called.
        """
        deadline = time.monotonic() + max(timeout_ms, 0) / 1000
        woken = timeout_ms <= 0 or bool(self._epoll.poll(0))
        while True:
            now = time.monotonic()
            out = []
            if self._young and next(iter(self._young.values()))[0] <= now:
                # Look-ups before the read: a record read after one is newer.
                out = self._look_up_young(now)
            if woken or (self._recheck_at and now >= self._recheck_at):
                records, got = self._read()
                out += got
                if records:
                    self._recheck_at = now + self.RECHECK_S
                elif self._recheck_at and now >= self._recheck_at:
                    self._recheck_at = 0.0   # quiet since: the next record wakes us
            if out or now >= deadline:
                return out
            wait = deadline - now
            if self._recheck_at:
                wait = min(wait, self._recheck_at - now)
            if self._young:
                wait = min(wait, next(iter(self._young.values()))[0] - now)
            woken = bool(self._epoll.poll(max(wait, 0.0005)))

    def flows(self) -> list[Flow]:
        """The current table: the occupied slots, then the collision map."""
        out = []
        for i in occupied_slots(self._slots):
            raw = self._slots[i * _FLOW.size:(i + 1) * _FLOW.size]
            if _POS.unpack_from(raw, _SK_IN_FLOW)[0] > _SLOT_BUSY:     # not freed since
                out.append(_to_flow(raw))
        return out + [_to_flow(bytes(v)) for _k, v in self._bpf[b"flows"].items()]

    def set_attached(self, on: bool) -> None:
        """Attach or detach the programs, keeping maps, filters and reader.

        For benchmarks: the same load with and without the kernel side, phase
        after phase, without a reload (bench/bench_churn.py). Flows that change
        while detached are missed; a socket born again at the same address
        replaces its stale entry (flowtrack.c), and a daemon would reconcile.
        """
        for tp in (b"inet_sock_set_state", b"tcp_probe"):
            attached = tp in self._bpf.raw_tracepoint_fds
            if on and not attached:
                self._bpf.attach_raw_tracepoint(tp=tp, fn_name=b"raw_tracepoint__" + tp)
            elif not on and attached:
                self._bpf.detach_raw_tracepoint(tp)

    def table_sizes(self) -> tuple[int, int]:
        """(flows in slots, flows in the collision map): how full the table is."""
        return len(occupied_slots(self._slots)), len(self._bpf[b"flows"].items())

    @property
    def lost(self) -> int:
        """Events dropped because the ring buffer was full, plus flows not kept
        because the table was full (max_flows). Nonzero: reconcile with a dump,
        then set `lost = 0` to count afresh (the kernel counter is not reset,
        so nothing lost meanwhile is forgotten)."""
        return self._lost_in_kernel() - self._lost_seen

    @lost.setter
    def lost(self, value: int) -> None:
        self._lost_seen = self._lost_in_kernel() - int(value)

    def _lost_in_kernel(self) -> int:
        return int(self._bpf[b"lost"][ctypes.c_int(0)].value)

    def close(self) -> None:
        # Readers of the maps first, then the maps (the bcc object) they map.
        for name in ("_epoll", "_ring", "_slots"):
            held = getattr(self, name, None)
            setattr(self, name, None)
            if held is not None:
                held.close()
        bpf, self._bpf = getattr(self, "_bpf", None), None
        if bpf is not None:
            bpf.cleanup()
            # bcc registers cleanup with atexit; drop it so the object can go.
            atexit.unregister(bpf.cleanup)

    def __enter__(self) -> "FlowTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- doctor ---------------------------------------------------------------------
@functools.cache
def available() -> tuple[bool, str]:
    """Can this process track flows? (ok, what was found or what is missing).

    Loads the real program once (compile + attach + detach, ~0.3 s), so the
    answer is cached per process. tracefs is reported, not required: the
    tracker uses raw tracepoints only.
    """
    try:
        offsets = bpf_offsets()
    except (btf.BTFError, OSError) as e:
        return False, f"BTF: {e}"
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return False, f"bcc not importable ({e}); install python3-bpfcc"
    try:
        FlowTracker(ports=()).close()
    except Exception as e:  # bcc raises bare Exception on compile/load errors
        return False, f"compile/load of flowtrack.c failed: {e}"
    tracefs = "mounted" if os.path.exists(os.path.join(TRACEFS, "events")) else "not mounted (not needed)"
    return True, f"{len(offsets)} struct offsets from BTF; flowtrack.c loads; tracefs {tracefs}"
