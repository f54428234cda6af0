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
import ipaddress
import mmap
import platform
import select
import time
from typing import Iterable

from nfsreset.core.model import Flow, TCP_STATES, norm_ip
from nfsreset.flows.clock import _clock_pairs
from nfsreset.flows.program import TrackerError, _source, _window_flags, bpf_offsets
from nfsreset.flows.ring import (_CLOSE, _CallbackRing, _FLOW, _MappedRing, _OPEN, _POS, _SK_IN_FLOW, _SLOT_BUSY, _STATE,
    _V4MAPPED, _to_flow, map_slots, occupied_slots, slot_bits, slot_index)


EVENT_KINDS = {1: "open", 2: "state", 3: "close"}
AF_INET, AF_INET6 = 2, 10
# -- events --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FlowEvent:
    kind: str                 # 'open' | 'state' | 'close'
    flow: Flow
    old_state: str | None     # state before this change (None when unknown)


class _Addr16(ctypes.Structure):
    _fields_ = [("a", ctypes.c_ubyte * 16)]

_CFG_NETNS = 0
def _addr_key(ip: str) -> bytes:
    """16 bytes as flowtrack.c keys addresses: IPv4 as v4-mapped IPv6."""
    addr = ipaddress.ip_address(norm_ip(ip))
    if addr.version == 4:
        return _V4MAPPED + addr.packed
    return addr.packed

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
