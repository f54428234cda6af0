"""Track the TCP sockets of watched VIPs and ports with BPF (bcc), as they change.

The kernel side is bpf/flowtrack.c (package data of nfsreset.bpf). It filters
in BPF - TCP, local port, local address, optionally netns - before touching
any per-flow map, keeps one entry per socket, and streams open/state/close
events through a ring buffer. Sequence numbers (snd_nxt/rcv_nxt) are refreshed
on every state change and on every segment an ESTABLISHED flow receives.

Kernel facts this is built on (6.18, Debian 12's bcc 0.26):
- kprobes are not built and fentry/kfunc are refused: tracepoints only. Raw
  tracepoints (inet_sock_set_state, tcp_probe) cost less than classic ones
  and, unlike them, need no tracefs: the tracker loads under `ip netns exec`
  as it is. ensure_tracefs() remains for bcc programs with classic ones.
- bcc compiles against headers that may belong to another kernel; struct
  offsets come from BTF (nfsreset.btf) and reach the C code as -D flags.
- Compile + load + attach takes ~0.2-0.4 s (the program includes no kernel
  headers beyond linux/types.h). BTF offsets and the source are cached per
  process; the compiled object cannot be (bcc 0.26 has no API to load one).

bcc is imported inside functions: hooks import this module and must start fast.
"""
from __future__ import annotations

import atexit
import ctypes
import dataclasses
import functools
import ipaddress
import os
import socket
import struct
from pathlib import Path
from typing import Iterable

from nfsreset import btf
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
    libc = ctypes.CDLL(None, use_errno=True)
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
_V4MAPPED = bytes(10) + b"\xff\xff"


@functools.lru_cache(maxsize=4096)
def _ip(raw: bytes) -> str:
    """Text of a 16-byte key; v4-mapped becomes plain v4 (as model.norm_ip)."""
    if raw[:12] == _V4MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _to_flow(raw: bytes, offset: int = 0) -> Flow:
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


# -- the tracker -------------------------------------------------------------------
class FlowTracker:
    """Loaded and attached on construction; close() detaches and frees it all.

    Empty `vips` watches nothing (add them with set_vips); empty
    `netns_inodes` means every network namespace. Filters change at run time
    through BPF maps, without recompiling.
    """

    def __init__(self, ports: Iterable[int], vips: Iterable[str] = (), netns_inodes: Iterable[int] = (),
                 max_flows: int = 65536, ring_pages: int = 64):
        from bcc import BPF  # heavy (~0.3 s), only here

        cflags = [f"-D{k}={v}" for k, v in bpf_offsets().items()]
        cflags += [f"-DMAX_FLOWS={int(max_flows)}", f"-DRING_PAGES={int(ring_pages)}", "-w"]
        self._pending: list[FlowEvent] = []
        self._lost_seen = 0
        self._bpf = BPF(text=_source().encode(), cflags=cflags)
        try:
            leaf = ctypes.sizeof(self._bpf[b"flows"].Leaf)
            if leaf != _FLOW.size:
                raise TrackerError(f"struct flow is {leaf} bytes in flowtrack.c, {_FLOW.size} in tracker.py")
            self._bpf[b"events"].open_ring_buffer(self._on_event)
            self._ports: set[int] = set()
            self._vips: set[bytes] = set()
            self._netns: set[int] = set()
            self.set_ports(ports)
            self.set_vips(vips)
            self.set_netns(netns_inodes)
        except BaseException:
            self.close()
            raise

    # filters: add the new keys before removing old ones, so a flow watched
    # before and after a change is never missed in between.
    def set_ports(self, ports: Iterable[int]) -> None:
        new = {int(p) for p in ports}
        if any(not 0 < p < 65536 for p in new):
            raise ValueError(f"bad port in {sorted(new)}")
        self._sync("ports", self._ports, new, lambda p: ctypes.c_uint16(p))
        self._ports = new

    def set_vips(self, vips: Iterable[str]) -> None:
        new = {_addr_key(v) for v in vips}
        self._sync("vips", self._vips, new, lambda k: _Addr16.from_buffer_copy(k))
        self._vips = new

    def set_netns(self, inodes: Iterable[int]) -> None:
        new = {int(i) for i in inodes}
        config = self._bpf[b"config"]
        if not new:  # switch the filter off first: all namespaces
            config[ctypes.c_int(0)] = ctypes.c_uint32(0)
        self._sync("netns_ok", self._netns, new, lambda i: ctypes.c_uint32(i))
        if new:
            config[ctypes.c_int(0)] = ctypes.c_uint32(1)
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
    def _on_event(self, _ctx, data, size) -> None:
        raw = ctypes.string_at(data, _EVENT_SIZE)
        kind, old_state = _EVENT_HEAD.unpack_from(raw)
        self._pending.append(FlowEvent(EVENT_KINDS.get(kind) or str(kind),
                                       _to_flow(raw, _EVENT_HEAD.size), TCP_STATES.get(old_state)))

    def poll(self, timeout_ms: int = 100) -> list[FlowEvent]:
        """Events that arrived, waiting up to timeout_ms for the first one."""
        if not self._pending:
            self._bpf.ring_buffer_poll(int(timeout_ms))
        self._bpf.ring_buffer_consume()
        out, self._pending = self._pending, []
        return out

    def flows(self) -> list[Flow]:
        """The current table, read from the BPF hash map."""
        return [_to_flow(bytes(v)) for _k, v in self._bpf[b"flows"].items()]

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
