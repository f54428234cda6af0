"""Packet bytes against known-good references.

The expected hex strings were checked by tcpdump -vv ("cksum ... (correct)",
no "bad cksum" for IPv4 headers); the two RST checksums (0x6da2, 0x89bd) are
also exactly what the kernel put on its own RSTs for the same header fields,
seen on the wire in the lab.
"""
import struct

import pytest

from nfsreset.kernel import packets as P
from nfsreset.core.model import FlowKey

K4 = FlowKey("198.51.100.10", 2049, "198.51.100.100", 44552)
K6 = FlowKey("2001:db8::10", 2049, "2001:db8::100", 55424)

KNOWN = [
    (lambda: P.tickle_to_client(K4),
     "45000028000040004006e5fac633640ac63364640801ae08000000000000000050100000a4f50000"),
    (lambda: P.tickle_to_client(K6),
     "600000000014064020010db800000000000000000000001020010db8000000000000000000000100"
     "0801d88000000000000000005010000072d10000"),
    (lambda: P.probe_to_server(K4),
     "45000029000040004006e5f9c6336464c633640aae080801000000000000000050100000a4f4000000"),
    (lambda: P.probe_to_server(K6),
     "600000000015064020010db800000000000000000000010020010db8000000000000000000000010"
     "d880080100000000000000005010000072d0000000"),
    (lambda: P.rst_to_server(K4, 3803403435),
     "45000028000040004006e5fac6336464c633640aae080801e2b354ab00000000500400006da20000"),
    (lambda: P.rst_to_server(K6, 840480519),
     "600000000014064020010db800000000000000000000010020010db8000000000000000000000010"
     "d88008013218b707000000005004000089bd0000"),
    (lambda: P.tcp_packet("203.0.113.5", "198.51.100.7", 65535, 1, 0xFFFFFFFF, 0x12345678,
                          P.SYN | P.ACK, 65535, b"abc"),
     "4500002b000040004006d48ccb007105c6336407ffff0001ffffffff123456785012ffff1c7f0000616263"),
    (lambda: P.tcp_packet("2001:db8:1:2:3:4:5:6", "2001:db8:ffff::1", 1234, 80, 1, 2,
                          P.PSH | P.ACK, 512, b"hello"),
     "600000000019064020010db800010002000300040005000620010db8ffff0000000000000000000104d2"
     "00500000000100000002501802000949000068656c6c6f"),
]


@pytest.mark.parametrize("build,expected", KNOWN)
def test_bytes_match_known_good(build, expected):
    assert build().hex() == expected


@pytest.mark.parametrize("build,expected", KNOWN)
def test_checksums_verify(build, expected):
    pkt = build()
    assert P.tcp_checksum_ok(pkt)
    if pkt[0] >> 4 == 4:
        assert P.ipv4_header_ok(pkt)


def test_checksum_detects_a_flipped_bit():
    pkt = bytearray(P.tickle_to_client(K6))
    pkt[-8] ^= 0x01                      # a bit of the TCP header (data offset byte)
    assert not P.tcp_checksum_ok(bytes(pkt))


def test_rfc1071_example():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (folded).
    assert P.checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2) & 0xFFFF


def test_checksum_pads_odd_length():
    assert P.checksum(b"\x12") == P.checksum(b"\x12\x00")


@pytest.mark.parametrize("src,dst", [("198.51.100.1", "203.0.113.9"), ("2001:db8::1", "2001:db8:0:1::ff")])
def test_parse_round_trip(src, dst):
    pkt = P.tcp_packet(src, dst, 800, 2049, 0xDEADBEEF, 7, P.FIN | P.ACK, 4096, b"xyz")
    seg = P.parse_tcp_packet(pkt)
    assert seg == P.ParsedTcp(src, dst, 800, 2049, 0xDEADBEEF, 7, P.FIN | P.ACK, 4096, b"xyz")


def test_v4_mapped_addresses_make_ipv4():
    pkt = P.tcp_packet("::ffff:198.51.100.1", "::ffff:198.51.100.2", 1, 2, 3, 4, P.ACK)
    assert pkt[0] >> 4 == 4 and len(pkt) == 40
    assert P.parse_tcp_packet(pkt).src == "198.51.100.1"


def test_mixed_families_refused():
    with pytest.raises(ValueError):
        P.tcp_packet("198.51.100.1", "2001:db8::1", 1, 2, 3, 4, P.ACK)


def test_parse_skips_tcp_options():
    # A kernel ACK with a timestamp option (data offset 8 words).
    pkt = bytearray(P.tcp_packet("198.51.100.1", "198.51.100.2", 5, 6, 7, 8, P.ACK, 9, b"\1\1\x08\x0a" + b"\0" * 8))
    pkt[20 + 12] = 8 << 4
    seg = P.parse_tcp_packet(bytes(pkt))
    assert (seg.seq, seg.ack, seg.payload) == (7, 8, b"")


@pytest.mark.parametrize("data", [b"", b"\x45" + b"\0" * 10, bytes(40), b"\x60" + bytes(39),
                                  # UDP in IPv4
                                  bytes.fromhex("450000200000400040110000c6336401c6336402") + bytes(12)])
def test_parse_rejects_non_tcp_and_truncated(data):
    assert P.parse_tcp_packet(data) is None


def test_flags_and_segment_shapes():
    assert (P.FIN, P.SYN, P.RST, P.PSH, P.ACK) == (1, 2, 4, 8, 16)
    assert P.flags_text(P.SYN | P.ACK) == "S." and P.flags_text(P.RST) == "R"
    tickle = P.parse_tcp_packet(P.tickle_to_client(K4))
    assert (tickle.src, tickle.sport, tickle.dst, tickle.dport) == (K4.vip, K4.vport, K4.client, K4.cport)
    assert (tickle.flags, tickle.seq, tickle.ack, tickle.payload) == (P.ACK, 0, 0, b"")
    rst = P.parse_tcp_packet(P.rst_to_server(K6, 0xFFFFFFFF))
    assert (rst.src, rst.sport, rst.dst, rst.dport) == (K6.client, K6.cport, K6.vip, K6.vport)
    assert (rst.flags, rst.seq) == (P.RST, 0xFFFFFFFF)
    probe = P.parse_tcp_packet(P.probe_to_server(K6))
    assert probe.flags == P.ACK and len(probe.payload) == 1   # data escapes the oow rate limit


def test_sequence_numbers_wrap():
    seg = P.parse_tcp_packet(P.rst_to_server(K4, 2**32 + 5))
    assert seg.seq == 5


def test_ipv4_total_length_and_ttl():
    pkt = P.tickle_to_client(K4)
    version_ihl, _, total, _, frag, ttl, proto = struct.unpack_from("!BBHHHBB", pkt)
    assert (version_ihl, total, frag, ttl, proto) == (0x45, 40, 0x4000, 64, 6)


def test_announce_frames_match_known_good():
    # tcpdump -e -vvv: "Request who-has 198.51.100.10 tell 198.51.100.10", "Reply 198.51.100.10
    # is-at 02:00:5e:00:00:aa", "[icmp6 sum ok] ... neighbor advertisement ... Flags [override]".
    from nfsreset.kernel import announce as A

    mac = bytes.fromhex("02005e0000aa")
    request, reply = A.arp_frames("198.51.100.10", mac)
    assert request.hex() == ("ffffffffffff02005e0000aa0806000108000604000102005e0000aac633640a"
                             "000000000000c633640a" + "00" * 18)
    assert reply.hex() == ("ffffffffffff02005e0000aa0806000108000604000202005e0000aac633640a"
                           "02005e0000aac633640a" + "00" * 18)
    assert A.na_frame("2001:db8::10", mac).hex() == (
        "33330000000102005e0000aa86dd6000000000203aff20010db8000000000000000000000010"
        "ff02000000000000000000000000000188009a632000000020010db8000000000000000000000010"
        "020102005e0000aa")


def test_seqprobe_filter_jumps_land_on_drop():
    from nfsreset.kernel import seqprobe

    for key, whole in ((K4, True), (K6, True), (K4, False), (K6, False)):
        prog = seqprobe.filter_program(key, whole)
        drop = len(prog) - 1
        assert prog[-1] == (0x06, 0, 0, 0) and prog[-2][0] == 0x06 and prog[-2][3] > 0
        for i, (code, jt, jf, _k) in enumerate(prog):
            if code == 0x15:
                assert jt == 0 and i + 1 + jf == drop
