"""Learn the sequence numbers of a local TCP socket from outside, then reset it.

The VIP must be configured on this host (in the current network namespace):
probe_to_server() is sent through a raw socket to the VIP, the kernel delivers
it into its own stack, and the socket answers with an ACK that carries
seq = snd_nxt and ack = rcv_nxt. That answer goes out towards the client; an
AF_PACKET socket (ETH_P_ALL also sees outgoing frames) catches it. A classic
BPF filter on the capture socket keeps everything but that one 4-tuple out of
Python. With rcv_nxt known, rst_to_server() is accepted (seq == rcv_nxt).

Kernel quirks:
- Answers to invalid segments are limited to one per 500 ms per socket
  (tcp_invalid_ratelimit) but tcp_oow_rate_limited() exempts segments with
  data, so the probe carries one byte and is answered even right after the
  socket answered the client. The probe is still repeated (0.55 s, 1.5 s) when
  the timeout allows.
- The answer is only seen when it reaches a device: if the client's neighbour
  entry is unresolved, it waits in the neighbour queue until ARP/ND resolves.
- With nobody owning the 4-tuple the kernel answers with an RST: reported as
  None (nothing to kill).
"""
from __future__ import annotations

import ctypes
import select
import socket
import struct
import time

from nfsreset import packets

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
PACKET_OUTGOING = 4

# When the probe is (re)sent, in seconds after the start.
PROBE_SCHEDULE = (0.0, 0.55, 1.5)

# Classic BPF opcodes (linux/filter.h).
_LD_B_ABS, _LD_H_ABS, _LD_W_ABS, _LD_W_IND = 0x30, 0x28, 0x20, 0x40
_LDX_B_MSH, _ALU_AND_K, _JEQ_K, _RET_K = 0xB1, 0x54, 0x15, 0x06
_DROP = "drop"


def _words(packed: bytes) -> list[int]:
    return list(struct.unpack(f"!{len(packed) // 4}I", packed))


def filter_program(key) -> list[tuple[int, int, int, int]]:
    """cBPF for a SOCK_DGRAM packet socket (data starts at the IP header):
    accept TCP from key.vip:key.vport to key.client:key.cport, drop the rest."""
    fam, vip = packets._addr(key.vip)
    _, client = packets._addr(key.client)
    ports = (key.vport << 16) | key.cport
    prog: list = []

    def match(load: tuple, value: int) -> None:
        prog.append(load)
        prog.append((_JEQ_K, 0, _DROP, value))

    if fam == 4:
        prog.append((_LD_B_ABS, 0, 0, 0))
        prog.append((_ALU_AND_K, 0, 0, 0xF0))
        prog.append((_JEQ_K, 0, _DROP, 0x40))
        match((_LD_B_ABS, 0, 0, 9), packets.IPPROTO_TCP)
        match((_LD_W_ABS, 0, 0, 12), _words(vip)[0])
        match((_LD_W_ABS, 0, 0, 16), _words(client)[0])
        prog.append((_LDX_B_MSH, 0, 0, 0))             # X = IHL * 4
        match((_LD_W_IND, 0, 0, 0), ports)
    else:
        prog.append((_LD_B_ABS, 0, 0, 0))
        prog.append((_ALU_AND_K, 0, 0, 0xF0))
        prog.append((_JEQ_K, 0, _DROP, 0x60))
        match((_LD_B_ABS, 0, 0, 6), packets.IPPROTO_TCP)
        for i, word in enumerate(_words(vip) + _words(client)):
            match((_LD_W_ABS, 0, 0, 8 + 4 * i), word)
        match((_LD_W_ABS, 0, 0, 40), ports)
    prog.append((_RET_K, 0, 0, 0x40000))
    drop_at = len(prog)
    prog.append((_RET_K, 0, 0, 0))
    return [(code, jt, (drop_at - i - 1) if jf == _DROP else jf, k)
            for i, (code, jt, jf, k) in enumerate(prog)]


def capture_socket(key) -> socket.socket:
    """A packet socket (current netns, every device) that receives only the answers for `key`.

    Frames that arrive between socket() and the filter attach are drained.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    try:
        prog = filter_program(key)
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


def _answer(sock: socket.socket, key) -> tuple[int, int] | None | bool:
    """Read one captured frame: (seq, ack) of an ACK; False for an RST; None for noise."""
    data = sock.recv(65535)
    seg = packets.parse_tcp_packet(data)
    if seg is None or (seg.sport, seg.dport) != (key.vport, key.cport):
        return None
    if seg.flags & packets.RST:
        return False
    if seg.flags & packets.ACK:
        return seg.seq, seg.ack
    return None


def learn_seq(key, timeout: float = 0.3, sender=None) -> tuple[int, int] | None:
    """(snd_nxt, rcv_nxt) of the local socket for `key`, or None (no answer, or no socket).

    Runs in the current network namespace, where key.vip must be configured.
    `sender` is an optional nfsreset.rawsend.RawSender to reuse.
    """
    from nfsreset.rawsend import RawSender

    own = sender is None
    sender = sender or RawSender()
    probe = packets.probe_to_server(key)
    try:
        with capture_socket(key) as sock:
            start = time.monotonic()
            deadline = start + timeout
            schedule = [start + t for t in PROBE_SCHEDULE if t < timeout]
            while True:
                now = time.monotonic()
                while schedule and schedule[0] <= now:
                    schedule.pop(0)
                    sender.send(probe)
                if now >= deadline:
                    return None
                wake = min([deadline] + schedule[:1])
                ready, _, _ = select.select([sock], [], [], max(0.0, wake - now))
                if ready:
                    got = _answer(sock, key)
                    if got is False:
                        return None
                    if got is not None:
                        return got
    finally:
        if own:
            sender.close()


def kill_local(key, timeout: float = 0.5, sender=None) -> bool:
    """End the local socket of `key` with an exact RST. True when the RST went out
    after its sequence numbers were learnt (the caller verifies with a dump)."""
    from nfsreset.rawsend import RawSender

    own = sender is None
    sender = sender or RawSender()
    try:
        seqs = learn_seq(key, timeout, sender)
        if seqs is None:
            return False
        _snd_nxt, rcv_nxt = seqs
        sender.send(packets.rst_to_server(key, rcv_nxt))
        return True
    finally:
        if own:
            sender.close()
