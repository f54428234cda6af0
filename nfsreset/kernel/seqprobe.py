"""Learn the sequence numbers of a local TCP socket from outside, then reset it.

The VIP must be configured on this host (in the current network namespace):
probe_to_server() is sent through a raw socket to the VIP, the kernel delivers
it into its own stack, and the socket answers with an ACK that carries
seq = snd_nxt and ack = rcv_nxt. That answer goes out towards the client; an
AF_PACKET socket (ETH_P_ALL also sees outgoing frames) catches it. A classic
BPF filter on the capture socket keeps everything but that one 4-tuple out of
Python. With rcv_nxt known, rst_to_server() is accepted (seq == rcv_nxt).
kill_local_many() does many sockets in one pass: one capture socket per
(VIP, port), all probes sent at once, each RST sent as its answer arrives.

The answer is only seen once it reaches a device: with the client's neighbour
entry unresolved it waits in the neighbour queue until ARP/ND resolves. Rate
limits and the AF_PACKET close cost: at PROBE_SCHEDULE and close_later below, and
docs/internals.md ("Kernel facts found while building").
"""
from __future__ import annotations

import ctypes
import select
import socket
import struct
import time

from nfsreset.kernel import packets

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33

# When the probe is (re)sent, in seconds after the start. It carries one byte:
# tcp_oow_rate_limited() exempts data from the 500 ms limit on answers to invalid
# segments, so it is answered even right after the socket answered the client.
PROBE_SCHEDULE = (0.0, 0.55, 1.5)

# Classic BPF opcodes (linux/filter.h).
_LD_B_ABS, _LD_H_ABS, _LD_W_ABS, _LD_W_IND, _LD_H_IND = 0x30, 0x28, 0x20, 0x40, 0x48
_LDX_B_MSH, _ALU_AND_K, _JEQ_K, _RET_K = 0xB1, 0x54, 0x15, 0x06
_DROP = "drop"


def _words(packed: bytes) -> list[int]:
    return list(struct.unpack(f"!{len(packed) // 4}I", packed))


def filter_program(key, whole_tuple: bool = True) -> list[tuple[int, int, int, int]]:
    """cBPF for a SOCK_DGRAM packet socket (data starts at the IP header):
    accept TCP from key.vip:key.vport (to key.client:key.cport when
    `whole_tuple`), drop the rest."""
    fam, vip = packets._addr(key.vip)
    prog: list = []

    def match(load: tuple, value: int) -> None:
        prog.append(load)
        prog.append((_JEQ_K, 0, _DROP, value))

    # (offset of the source address, of the ports) and the words to compare
    if fam == 4:
        prog.append((_LD_B_ABS, 0, 0, 0))
        prog.append((_ALU_AND_K, 0, 0, 0xF0))
        prog.append((_JEQ_K, 0, _DROP, 0x40))
        match((_LD_B_ABS, 0, 0, 9), packets.IPPROTO_TCP)
        addr_at, nwords = 12, 1
    else:
        prog.append((_LD_B_ABS, 0, 0, 0))
        prog.append((_ALU_AND_K, 0, 0, 0xF0))
        prog.append((_JEQ_K, 0, _DROP, 0x60))
        match((_LD_B_ABS, 0, 0, 6), packets.IPPROTO_TCP)   # the kernel's TCP carries no ext headers
        addr_at, nwords = 8, 4
    words = _words(vip)
    if whole_tuple:
        words += _words(packets._addr(key.client)[1])
    for i, word in enumerate(words):
        match((_LD_W_ABS, 0, 0, addr_at + 4 * i), word)
    if fam == 4:
        prog.append((_LDX_B_MSH, 0, 0, 0))             # X = IHL * 4
        port_load = (_LD_W_IND, 0, 0, 0) if whole_tuple else (_LD_H_IND, 0, 0, 0)
    else:
        port_load = (_LD_W_ABS, 0, 0, 40) if whole_tuple else (_LD_H_ABS, 0, 0, 40)
    match(port_load, (key.vport << 16) | key.cport if whole_tuple else key.vport)
    prog.append((_RET_K, 0, 0, 0x40000))
    drop_at = len(prog)
    prog.append((_RET_K, 0, 0, 0))
    return [(code, jt, (drop_at - i - 1) if jf == _DROP else jf, k)
            for i, (code, jt, jf, k) in enumerate(prog)]


def capture_socket(key, whole_tuple: bool = True, rcvbuf: int = 0) -> socket.socket:
    """A non-blocking packet socket (current netns, every device) that receives
    only what the local socket of `key` (or, without `whole_tuple`, any socket
    on key.vip:key.vport) sends.

    Frames that arrive between socket() and the filter attach are drained.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    try:
        if rcvbuf:
            # Every queued frame costs ~1 KiB of truesize: 10k answers need MBs.
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        prog = filter_program(key, whole_tuple)
        code = b"".join(struct.pack("HBBI", *insn) for insn in prog)
        buf = ctypes.create_string_buffer(code, len(code))
        fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        sock.setblocking(False)
        while True:
            try:
                sock.recv(65535)
            except BlockingIOError:
                break
    except BaseException:
        sock.close()
        raise
    return sock


def _classify(data: bytes) -> tuple[tuple, tuple[int, int] | None] | None:
    """A captured frame as (tuple id, (seq, ack)) for a bare ACK, (tuple id, None)
    for an RST (nobody owns the tuple), or None for anything else.

    Our answer is a bare ACK (maybe with SACK/timestamp options). A data
    segment or a FIN retransmission of the same socket carries an older seq
    than snd_nxt, so it is not taken for the answer.
    """
    seg = packets.parse_tcp_packet(data)
    if seg is None:
        return None
    tid = (packets._addr(seg.src)[1], seg.sport, packets._addr(seg.dst)[1], seg.dport)
    if seg.flags & packets.RST:
        return tid, None
    if seg.flags & (packets.SYN | packets.FIN) or seg.payload or not seg.flags & packets.ACK:
        return None
    return tid, (seg.seq, seg.ack)


def _tuple_id(key) -> tuple:
    return (packets._addr(key.vip)[1], key.vport, packets._addr(key.client)[1], key.cport)


def probe_many(keys, timeout: float = 0.3, sender=None, on_answer=None) -> dict:
    """Probe every local socket of `keys` at once; {key: (snd_nxt, rcv_nxt)} for those that answered.

    One capture socket per (VIP, port) sees all answers; probes are repeated
    at PROBE_SCHEDULE offsets within `timeout` for keys still silent.
    `on_answer(key, snd_nxt, rcv_nxt)` is called as each answer arrives (kill
    uses it to send the RST at once, before the socket moves on). A key whose
    probe drew an RST (no such socket) is dropped from the wait.
    """
    from nfsreset.kernel.rawsend import RawSender, close_later

    by_id = {_tuple_id(k): k for k in keys}
    if not by_id:
        return {}
    own = sender is None
    sender = sender or RawSender()
    groups: dict = {}
    for k in by_id.values():
        groups.setdefault((k.vip, k.vport), k)
    many = len(by_id) > 1
    socks = []
    found: dict = {}
    pending = set(by_id)
    try:
        for k in groups.values():
            socks.append(capture_socket(k, whole_tuple=not many,
                                        rcvbuf=min(64 << 20, 2048 * len(by_id)) if many else 0))

        def drain() -> None:
            for sock in socks:
                for _ in range(100_000):
                    try:
                        data = sock.recv(65535)
                    except BlockingIOError:
                        break
                    got = _classify(data)
                    if got is None or got[0] not in pending:
                        continue
                    tid, seqs = got
                    pending.discard(tid)
                    if seqs is not None:
                        key = by_id[tid]
                        found[key] = seqs
                        if on_answer is not None:
                            on_answer(key, *seqs)

        start = time.monotonic()
        deadline = start + timeout
        schedule = [start + t for t in PROBE_SCHEDULE if t < timeout]
        while pending:
            now = time.monotonic()
            if schedule and schedule[0] <= now:
                schedule.pop(0)
                for n, tid in enumerate(sorted(pending)):
                    sender.send(packets.probe_to_server(by_id[tid]))
                    if n % 256 == 255:
                        drain()          # keep the capture queue short
                drain()
                continue
            if now >= deadline:
                break
            wake = min([deadline] + schedule[:1])
            if select.select(socks, [], [], max(0.0, wake - now))[0]:
                drain()
        return found
    finally:
        for sock in socks:
            close_later(sock)
        if own:
            sender.close()


def learn_seq(key, timeout: float = 0.3, sender=None) -> tuple[int, int] | None:
    """(snd_nxt, rcv_nxt) of the local socket for `key`, or None (no answer, or no socket).

    Runs in the current network namespace, where key.vip must be configured.
    `sender` is an optional nfsreset.kernel.rawsend.RawSender to reuse.
    """
    return probe_many([key], timeout, sender).get(key)


def kill_local_many(keys, timeout: float = 0.5, sender=None) -> set:
    """Exact-RST every local socket of `keys`; returns the keys an RST was sent for
    (each right after its answer arrived). The caller verifies with a dump."""
    from nfsreset.kernel.rawsend import RawSender

    own = sender is None
    sender = sender or RawSender()
    killed = set()

    def reset(key, _snd_nxt: int, rcv_nxt: int) -> None:
        sender.send(packets.rst_to_server(key, rcv_nxt))
        killed.add(key)

    try:
        probe_many(keys, timeout, sender, on_answer=reset)
    finally:
        if own:
            sender.close()
    return killed


def kill_local(key, timeout: float = 0.5, sender=None) -> bool:
    """End the local socket of `key` with an exact RST. True when the RST went out
    after its sequence numbers were learnt (the caller verifies with a dump)."""
    return key in kill_local_many([key], timeout, sender)
