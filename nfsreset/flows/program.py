"""bpf/flowtrack.c as bcc compiles it: its source, and the struct offsets it
reads, from the running kernel's BTF, as -D flags."""
from __future__ import annotations

import functools
from pathlib import Path

from nfsreset.flows import btf


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
