"""Forge and parse TCP segments as whole IPv4/IPv6 packets. Pure: bytes in, bytes out.

Three segments matter to nfsreset (CTDB's ctdb_killtcp and tickle_tcp use the
same tricks):

- tickle_to_client: an ACK with seq=0 ack=0 from the VIP to the client. It
  is out of the client's window, so the client answers with a duplicate ACK
  carrying its true seq/ack. On the new owner there is no socket for that
  4-tuple, so the kernel answers *that* with an RST whose seq is exactly the
  client's rcv_nxt, and the client's stale connection dies at once instead of
  waiting for its retransmission timer.
- probe_to_server: the same idea aimed at a local (stale) server socket; its
  answer tells us snd_nxt/rcv_nxt (see seqprobe).
- rst_to_server: an RST the local socket accepts. Linux (RFC 5961) kills a
  socket only when the RST's seq equals rcv_nxt exactly; any other in-window
  seq only provokes a challenge ACK.

Checksums are computed here, always: Debian's tickle_tcp got the IPv6 one
wrong, and the kernel does verify them (locally delivered raw packets arrive
with CHECKSUM_NONE).

Module imports stay at struct/socket: hooks import this and must reach their
first packet within 0.1 s.
"""
from __future__ import annotations

import socket
import struct
from typing import NamedTuple

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_FLAG_NAMES = ((FIN, "F"), (SYN, "S"), (RST, "R"), (PSH, "P"), (ACK, "."), (URG, "U"))

IPPROTO_TCP = 6
TTL = 64

_TCP = struct.Struct("!HHIIBBHHH")          # ports, seq, ack, offset, flags, window, csum, urg
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6_FIXED = struct.Struct("!IHBB")         # ver/class/flow, payload length, next header, hop limit


class ParsedTcp(NamedTuple):
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes = b""


def flags_text(flags: int) -> str:
    """tcpdump-style flag letters: 'S.', 'R', '.'."""
    return "".join(name for bit, name in _FLAG_NAMES if flags & bit) or "none"


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes, start: int = 0) -> int:
    """RFC 1071 Internet checksum of `data` (plus a running 32-bit sum `start`)."""
    if len(data) & 1:
        data += b"\0"
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    return ~_fold(total) & 0xFFFF


def _addr(text: str) -> tuple[int, bytes]:
    """(family, packed) of an address given as text; v4-mapped v6 counts as v4.

    inet_pton rather than ipaddress: that module alone costs more import time
    than the rest of the hook's path to its first packet.
    """
    if ":" in text:
        packed = socket.inet_pton(socket.AF_INET6, text)
        if packed[:12] == b"\0" * 10 + b"\xff\xff":
            return 4, packed[12:]
        return 6, packed
    return 4, socket.inet_pton(socket.AF_INET, text)


def tcp_packet(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
               window: int = 0, payload: bytes = b"") -> bytes:
    """A whole IP packet (v4 or v6 from the addresses) with one TCP segment, checksums set."""
    fam_s, s = _addr(src)
    fam_d, d = _addr(dst)
    if fam_s != fam_d:
        raise ValueError(f"address families differ: {src} -> {dst}")
    tcp_len = 20 + len(payload)
    header = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags,
                       window, 0, 0)
    if fam_s == 4:
        pseudo = s + d + struct.pack("!HH", IPPROTO_TCP, tcp_len)
    else:
        pseudo = s + d + struct.pack("!IxxxB", tcp_len, IPPROTO_TCP)
    csum = checksum(pseudo + header + payload)
    segment = header[:16] + struct.pack("!H", csum) + header[18:] + payload
    if fam_s == 4:
        # DF set and id 0, like the kernel's own RSTs; the kernel refills a
        # zero id for IP_HDRINCL sends, and always recomputes the header sum.
        ip = _IP4.pack(0x45, 0, 20 + tcp_len, 0, 0x4000, TTL, IPPROTO_TCP, 0, s, d)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        return ip + segment
    return _IP6_FIXED.pack(6 << 28, tcp_len, IPPROTO_TCP, TTL) + s + d + segment


def parse_tcp_packet(data: bytes) -> ParsedTcp | None:
    """The TCP segment of an IPv4/IPv6 packet; None when it is not one (or is truncated).

    IPv6 extension headers are not walked: packets whose next header is not
    TCP are reported as None (the kernel's own TCP segments carry none).
    """
    if not data:
        return None
    version = data[0] >> 4
    if version == 4:
        if len(data) < 20:
            return None
        ihl = (data[0] & 0x0F) * 4
        total = struct.unpack_from("!H", data, 2)[0]
        frag = struct.unpack_from("!H", data, 6)[0]
        if data[9] != IPPROTO_TCP or ihl < 20 or frag & 0x1FFF:
            return None
        src = socket.inet_ntop(socket.AF_INET, data[12:16])
        dst = socket.inet_ntop(socket.AF_INET, data[16:20])
        off, end = ihl, min(total, len(data))
    elif version == 6:
        if len(data) < 40 or data[6] != IPPROTO_TCP:
            return None
        plen = struct.unpack_from("!H", data, 4)[0]
        src = socket.inet_ntop(socket.AF_INET6, data[8:24])
        dst = socket.inet_ntop(socket.AF_INET6, data[24:40])
        off, end = 40, min(40 + plen, len(data))
    else:
        return None
    if end - off < 20:
        return None
    sport, dport, seq, ack, doff, flags, window, _csum, _urg = _TCP.unpack_from(data, off)
    hlen = (doff >> 4) * 4
    if hlen < 20 or off + hlen > end:
        return None
    return ParsedTcp(src, dst, sport, dport, seq, ack, flags, window, bytes(data[off + hlen:end]))


def tcp_checksum_ok(data: bytes) -> bool:
    """Whether the TCP checksum of an IP packet verifies (for tests and debugging)."""
    version = data[0] >> 4
    if version == 4:
        ihl = (data[0] & 0x0F) * 4
        total = struct.unpack_from("!H", data, 2)[0]
        seg = data[ihl:total]
        pseudo = data[12:20] + struct.pack("!HH", IPPROTO_TCP, len(seg))
    elif version == 6:
        seg = data[40:40 + struct.unpack_from("!H", data, 4)[0]]
        pseudo = data[8:40] + struct.pack("!IxxxB", len(seg), IPPROTO_TCP)
    else:
        return False
    return checksum(pseudo + seg) == 0


def ipv4_header_ok(data: bytes) -> bool:
    return data[0] >> 4 == 4 and checksum(data[:(data[0] & 0x0F) * 4]) == 0


# -- the segments nfsreset sends ------------------------------------------------
# `key` is a nfsreset.core.model.FlowKey (vip/vport = server side, client/cport =
# client side); only its attributes are used so this module need not import it.

def tickle_to_client(key) -> bytes:
    """ACK seq=0 ack=0 from VIP to client: the client answers with its true seq/ack.

    A bare ACK (no payload) on purpose: a segment with data would slip past the
    client's invalid-segment rate limit, but if seq and ack happened to fall in
    the client's windows its byte would be queued into the client's stream.
    The answer to a bare one is rate-limited (one per 500 ms per socket,
    tcp_invalid_ratelimit), so callers repeat it.
    """
    return tcp_packet(key.vip, key.client, key.vport, key.cport, 0, 0, ACK)


def rst_to_server(key, seq: int) -> bytes:
    """RST from client to VIP with seq = the server socket's rcv_nxt (nothing else is accepted)."""
    return tcp_packet(key.client, key.vip, key.cport, key.vport, seq, 0, RST)


PROBE_SEQ = 0
PROBE_ACK = 0


def probe_to_server(key) -> bytes:
    """Bogus segment from client to VIP; the local socket answers with an ACK (seq=snd_nxt, ack=rcv_nxt).

    It carries one byte of data at seq 0 (out of window unless extremely
    unlucky) with ack 0 (an unacceptable ack, which makes the kernel drop the
    segment before queueing any data even if seq were in window). The data
    byte is what matters: tcp_oow_rate_limited() exempts segments that carry
    data, so this probe is answered even right after the socket answered
    something else, where a bare ACK would be swallowed by the 500 ms
    tcp_invalid_ratelimit. If no socket owns the 4-tuple the kernel answers
    with an RST instead.
    """
    return tcp_packet(key.client, key.vip, key.cport, key.vport, PROBE_SEQ, PROBE_ACK, ACK,
                      payload=b"\0")
