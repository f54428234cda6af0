"""sock_diag message and bytecode codec against hand-built bytes (no root, no kernel).

The bytecode is also run through a transcription of the kernel's own
interpreter and validator (net/ipv4/inet_diag.c: inet_diag_bc_run,
inet_diag_bc_audit), so "which sockets does this filter keep" is checked for
many address/port sets, not only for the few programs written out by hand.
The real kernel runs the same programs in tests/ns/test_sockdiag.py.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfsreset.kernel import netlink, sockdiag
from nfsreset.core.model import Flow, FlowKey, norm_ip

AF4, AF6 = socket.AF_INET, socket.AF_INET6


# -- a transcription of the kernel's bytecode interpreter and auditor ------------------

def _bitstring_match(a: bytes, b: bytes, bits: int) -> bool:
    whole, rest = divmod(bits, 8)
    if a[:whole] != b[:whole]:
        return False
    if rest:
        mask = (0xFF << (8 - rest)) & 0xFF
        return (a[whole] & mask) == (b[whole] & mask)
    return True


def kernel_bc_run(bc: bytes, family: int, saddr: bytes, sport: int) -> bool:
    """inet_diag_bc_run() for S_COND and JMP (the only ops the encoder emits)."""
    pos, length = 0, len(bc)
    while length > 0:
        code, yes_len, no_len = struct.unpack_from("=BBH", bc, pos)
        yes = True
        if code == sockdiag.BC_JMP:
            yes = False
        elif code == sockdiag.BC_S_COND:
            cfam, plen, port = struct.unpack_from("=BBxxi", bc, pos + 4)
            addr = bc[pos + 12:pos + 12 + (4 if cfam == AF4 else 16 if cfam == AF6 else 0)]
            if port != -1 and port != sport:
                yes = False
            elif cfam != socket.AF_UNSPEC and cfam != family:
                yes = (family == AF6 and cfam == AF4 and saddr[:12] == bytes(10) + b"\xff\xff"
                       and _bitstring_match(saddr[12:], addr, plen))
            elif plen:
                yes = _bitstring_match(saddr, addr, plen)
        else:
            raise AssertionError(f"unexpected op {code}")
        step = yes_len if yes else no_len
        pos += step
        length -= step
    return length == 0


def kernel_bc_audit(bc: bytes) -> bool:
    """inet_diag_bc_audit(): would the kernel accept this program (else EINVAL)?"""
    def valid_cc(cc: int) -> bool:
        pos, length = 0, len(bc)
        while length >= 0:
            if cc > length:
                return False
            if cc == length:
                return True
            yes_len = bc[pos + 1]
            if yes_len < 4 or yes_len & 3:
                return False
            length -= yes_len
            pos += yes_len
        return False

    if len(bc) < 4:
        return False
    pos, length = 0, len(bc)
    while length > 0:
        code, yes_len, no_len = struct.unpack_from("=BBH", bc, pos)
        min_len = 4
        if code in (sockdiag.BC_S_COND, 8):
            min_len += 8
            if length < min_len:
                return False
            cfam, plen = bc[pos + 4], bc[pos + 5]
            alen = {socket.AF_UNSPEC: 0, AF4: 4, AF6: 16}.get(cfam)
            if alen is None:
                return False
            min_len += alen
            if length < min_len or plen > 8 * alen:
                return False
        elif code not in (0, sockdiag.BC_JMP, 6):
            return False
        if code != 0:
            if no_len < min_len or no_len > length + 4 or no_len & 3:
                return False
            if no_len < length and not valid_cc(length - no_len):
                return False
        if yes_len < min_len or yes_len > length + 4 or yes_len & 3:
            return False
        pos += yes_len
        length -= yes_len
    return length == 0


def sockid_addr(family: int, ip: str) -> bytes:
    raw = socket.inet_pton(family, ip)
    return raw + bytes(16 - len(raw))


# -- bytecode ---------------------------------------------------------------------

def test_bytecode_one_v4_address_and_port_by_hand():
    bc = sockdiag.encode_bytecode(["198.51.100.10"], [2049])
    expected = (bytes([7, 16]) + struct.pack("=H", 20)          # S_COND, yes=16 (itself), no=20 (end+4: reject)
                + bytes([AF4, 32, 0, 0]) + struct.pack("=i", 2049)
                + bytes([198, 51, 100, 10]))
    assert bc == expected


def test_bytecode_two_conditions_by_hand():
    bc = sockdiag.encode_bytecode(["2001:db8::10"], [2049, 20048])
    cond = lambda port: (bytes([AF6, 128, 0, 0]) + struct.pack("=i", port)
                         + socket.inet_pton(AF6, "2001:db8::10"))
    expected = (bytes([7, 28]) + struct.pack("=H", 32) + cond(2049)    # miss: skip the JMP to cond 2
                + bytes([1, 4]) + struct.pack("=H", 32)                # hit: JMP (4) + cond 2 (28) to the end
                + bytes([7, 28]) + struct.pack("=H", 32) + cond(20048))  # last: miss -> end+4
    assert bc == expected
    assert kernel_bc_audit(bc)


def test_bytecode_port_only_and_address_only():
    port_only = sockdiag.encode_bytecode(None, 2049)
    assert port_only == bytes([7, 12]) + struct.pack("=H", 16) + bytes([0, 0, 0, 0]) + struct.pack("=i", 2049)
    addr_only = sockdiag.encode_bytecode("198.51.100.10", None)
    assert addr_only[4:12] == bytes([AF4, 32, 0, 0]) + struct.pack("=i", -1)
    assert sockdiag.encode_bytecode(None, None) == b""
    assert sockdiag.encode_bytecode([], []) == b""


def test_bytecode_normalises_v4_mapped_and_dedups():
    assert (sockdiag.encode_bytecode(["::ffff:198.51.100.10", "198.51.100.10"], [2049, 2049])
            == sockdiag.encode_bytecode(["198.51.100.10"], [2049]))


def test_bytecode_rejects_bad_input():
    with pytest.raises(ValueError):
        sockdiag.encode_bytecode(["not-an-ip"], [2049])
    with pytest.raises(ValueError):
        sockdiag.encode_bytecode(["198.51.100.10"], [0])
    with pytest.raises(ValueError):
        sockdiag.encode_bytecode(["198.51.100.10"], [65536])


def test_bytecode_semantics_by_hand():
    bc = sockdiag.encode_bytecode(["198.51.100.10", "2001:db8::10"], [2049])
    vip4, vip6 = sockid_addr(AF4, "198.51.100.10"), sockid_addr(AF6, "2001:db8::10")
    mapped = sockid_addr(AF6, "::ffff:198.51.100.10")
    assert kernel_bc_run(bc, AF4, vip4, 2049)
    assert kernel_bc_run(bc, AF6, vip6, 2049)
    assert kernel_bc_run(bc, AF6, mapped, 2049)          # dual-stack socket on the v4 VIP
    assert not kernel_bc_run(bc, AF4, vip4, 2050)
    assert not kernel_bc_run(bc, AF4, sockid_addr(AF4, "198.51.100.11"), 2049)
    assert not kernel_bc_run(bc, AF6, sockid_addr(AF6, "::198.51.100.10"), 2049)  # v4-compatible is not mapped


POOL4 = ["198.51.100.10", "198.51.100.11", "203.0.113.1"]
POOL6 = ["2001:db8::10", "2001:db8::11", "2001:db8:1::10"]
PORTS = [111, 2049, 20048, 65535]


@settings(max_examples=300, deadline=None)
@given(ips=st.lists(st.sampled_from(POOL4 + POOL6), max_size=4),
       ports=st.lists(st.sampled_from(PORTS), max_size=3),
       local=st.sampled_from(POOL4 + POOL6),
       as_mapped=st.booleans(),
       sport=st.sampled_from(PORTS))
def test_bytecode_matches_exactly_the_requested_pairs(ips, ports, local, as_mapped, sport):
    bc = sockdiag.encode_bytecode(ips, ports)
    if ":" in local:
        family, saddr = AF6, sockid_addr(AF6, local)
    elif as_mapped:
        family, saddr = AF6, sockid_addr(AF6, "::ffff:" + local)
    else:
        family, saddr = AF4, sockid_addr(AF4, local)
    wanted = (not ips or local in ips) and (not ports or sport in ports)
    if not bc:
        assert not ips and not ports
        return
    assert kernel_bc_audit(bc)
    assert kernel_bc_run(bc, family, saddr, sport) == wanted


def test_states_mask():
    assert sockdiag.states_mask(None) == 0b1_1011_1111_1110          # bits 1..12 but 10 (LISTEN)
    assert sockdiag.states_mask(None, exclude_listen=False) == 0b1_1111_1111_1110
    assert sockdiag.states_mask({"ESTABLISHED", "time_wait"}) == (1 << 1) | (1 << 6)
    assert sockdiag.states_mask({"LISTEN"}) == 1 << 10             # explicit states win over exclude_listen
    with pytest.raises(ValueError):
        sockdiag.states_mask({"ESTABLISHED", "BOGUS"})


# -- requests ------------------------------------------------------------------------

def test_dump_request_by_hand():
    bc = sockdiag.encode_bytecode(["198.51.100.10"], [2049])
    msg = sockdiag.encode_dump_request(AF6, 0x2, bc, seq=7)
    payload = (bytes([AF6, socket.IPPROTO_TCP, 0, 0]) + struct.pack("=I", 2)
               + bytes(4 + 32 + 4) + b"\xff" * 8)                    # sockid: all zero, NOCOOKIE
    attr = struct.pack("=HH", 4 + len(bc), 1) + bc
    header = struct.pack("=IHHII", 16 + len(payload) + len(attr), 20, 0x301, 7, 0)
    assert msg == header + payload + attr
    assert len(payload) == 56                                         # sizeof(struct inet_diag_req_v2)


def test_dump_request_for_both_families_by_hand():
    bc = sockdiag.encode_bytecode(None, [2049])
    msg = sockdiag.encode_dump_request(socket.AF_UNSPEC, 0x2, bc, seq=3)
    payload = (bytes([AF4, 0, 0, 0]) + bytes(4 + 32 + 4) + b"\xff" * 8   # inet_diag_req: family.. sockid
               + struct.pack("=II", 2, 0))                                  # states, dbs
    attr = struct.pack("=HH", 4 + len(bc), 1) + bc
    assert msg == struct.pack("=IHHII", 16 + 60 + len(attr), 18, 0x301, 3, 0) + payload + attr


def test_dump_request_without_filter_has_no_attribute():
    msg = sockdiag.encode_dump_request(AF4, 0xFFF, b"", seq=1)
    assert len(msg) == 72 and struct.unpack_from("=I", msg)[0] == 72


def test_destroy_request_by_hand():
    sid = sockdiag.SockId(AF6, sockid_addr(AF6, "::ffff:198.51.100.10"), sockid_addr(AF6, "2001:db8::100"),
                          2049, 800, 3, 0x1122334455667788)
    msg = sockdiag.encode_destroy_request(sid, seq=0x42)
    expected = (struct.pack("=IHHII", 72, 21, 0x5, 0x42, 0)                 # SOCK_DESTROY, REQUEST|ACK
                + bytes([AF6, 6, 0, 0]) + struct.pack("=I", 0x1FFE)
                + b"\x08\x01" + b"\x03\x20"                                  # ports big-endian
                + sid.src + sid.dst
                + struct.pack("=I", 3) + struct.pack("=II", 0x55667788, 0x11223344))  # cookie[0] = low word
    assert msg == expected


# -- replies -------------------------------------------------------------------------

def diag_msg(family, state, src, dst, sport, dport, cookie, inode=0, rq=0, wq=0, ifindex=0, attrs=b""):
    body = (bytes([family, state, 0, 0]) + struct.pack(">HH", sport, dport) + src + dst
            + struct.pack("=III", ifindex, cookie & 0xFFFFFFFF, cookie >> 32)
            + struct.pack("=IIIII", 0, rq, wq, 0, inode) + attrs)
    return struct.pack("=IHHII", 16 + len(body), 20, 0x2, 1, 0) + body


def test_decode_v4_message():
    msg = diag_msg(AF4, 1, sockid_addr(AF4, "198.51.100.10"), sockid_addr(AF4, "198.51.100.100"),
                   2049, 700, cookie=(5 << 32) | 9, inode=1234, rq=3, wq=4, ifindex=2)
    flow, sid = sockdiag.decode_diag_msg(msg, 16, 4026531840)
    assert flow == Flow(key=FlowKey("198.51.100.10", 2049, "198.51.100.100", 700), state="ESTABLISHED",
                        netns=4026531840, cookie=(5 << 32) | 9, inode=1234, recvq=3, sendq=4)
    assert sid == sockdiag.SockId(AF4, sockid_addr(AF4, "198.51.100.10"), sockid_addr(AF4, "198.51.100.100"),
                                  2049, 700, 2, (5 << 32) | 9)
    # an object made by the fast path is a normal one: hashable, equal, replaceable
    assert hash(flow) == hash(dataclasses.replace(flow)) and flow.first_seen is None
    assert sockdiag.encode_destroy_request(sid, 1)[24:72] == msg[20:68]   # sockid goes back as it came


def test_decode_mapped_and_v6_messages():
    src, dst = sockid_addr(AF6, "::ffff:198.51.100.10"), sockid_addr(AF6, "::ffff:198.51.100.100")
    flow, sid = sockdiag.decode_diag_msg(diag_msg(AF6, 4, src, dst, 2049, 701, cookie=1), 16, None)
    assert flow.key == FlowKey("198.51.100.10", 2049, "198.51.100.100", 701) and flow.state == "FIN_WAIT1"
    assert sid.family == AF6 and sid.src == src                           # the socket's own family stays
    src6, dst6 = sockid_addr(AF6, "2001:db8::10"), sockid_addr(AF6, "2001:db8::100")
    flow, _ = sockdiag.decode_diag_msg(diag_msg(AF6, 6, src6, dst6, 2049, 702, cookie=2), 16, None)
    assert flow.key == FlowKey("2001:db8::10", 2049, "2001:db8::100", 702) and flow.state == "TIME_WAIT"


def test_decode_text_agrees_with_norm_ip():
    for text in ["::", "::1", "::102:304", "2001:db8::", "2001:db8:0:1:0:0:0:1", "fe80::1:0:0:1", "1:0:0:2::3"]:
        raw = socket.inet_pton(AF6, text)
        assert sockdiag._addr_text(AF6, raw) == norm_ip(text) == str(ipaddress.ip_address(text))


def test_iter_messages_multipart_and_errors():
    src, dst = sockid_addr(AF4, "198.51.100.10"), sockid_addr(AF4, "198.51.100.100")
    m1 = diag_msg(AF4, 1, src, dst, 2049, 1, cookie=1, attrs=struct.pack("=HHB3x", 5, 8, 0))  # + SHUTDOWN attr
    m2 = diag_msg(AF4, 1, src, dst, 2049, 2, cookie=2)
    done = struct.pack("=IHHIIi", 20, 3, 0x2, 1, 0, 0)
    msgs = list(netlink.messages(m1 + m2 + done))
    assert [(k, s) for k, _f, s, _b, _e in msgs] == [(20, 1), (20, 1), (3, 1)]
    assert sockdiag.decode_diag_msg(m1 + m2, msgs[1][3], None)[0].key.cport == 2
    with pytest.raises(OSError):
        list(netlink.messages(m1[:40] + struct.pack("=I", 0)))
    with pytest.raises(OSError):                                      # not AF_INET/AF_INET6
        sockdiag.decode_diag_msg(diag_msg(1, 1, src, dst, 1, 2, cookie=1), 16, None)
    # NLMSG_ERROR: int error, then the header of the request it answers (NETLINK_CAP_ACK: nothing more)
    ack = struct.pack("=IHHIIi", 36, 2, 0x100, 9, 0, -errno.ENOENT) + struct.pack("=IHHII", 72, 21, 5, 9, 0)
    ((kind, _f, seq, start, _e),) = netlink.messages(ack)
    assert (kind, seq) == (2, 9) and netlink.error(ack, start) == (errno.ENOENT, 9)


def test_fast_construction_only_for_plain_dataclasses():
    @dataclasses.dataclass(frozen=True)
    class WithPostInit:
        a: int

        def __post_init__(self):
            if self.a < 0:
                raise ValueError("negative")

    @dataclasses.dataclass(frozen=True)
    class NeedsMore:
        a: int
        b: int

    assert sockdiag._plain_frozen(Flow, sockdiag._FLOW_FROM_DUMP)
    assert sockdiag._plain_frozen(sockdiag.SockId, {"family", "src", "dst", "sport", "dport", "if_index", "cookie"})
    assert not sockdiag._plain_frozen(WithPostInit, {"a"})
    assert not sockdiag._plain_frozen(NeedsMore, {"a"})
    assert sockdiag._FAST_OBJECTS


def test_decoded_objects_are_ordinary(monkeypatch):
    src, dst = sockid_addr(AF4, "198.51.100.10"), sockid_addr(AF4, "198.51.100.100")
    msg = diag_msg(AF4, 1, src, dst, 2049, 700, cookie=3)
    fast = sockdiag.decode_diag_msg(msg, 16, 1)
    monkeypatch.setattr(sockdiag, "_FAST_OBJECTS", False)
    checked = sockdiag.decode_diag_msg(msg, 16, 1)
    assert fast == checked and hash(fast) == hash(checked) and repr(fast) == repr(checked)
    assert dataclasses.replace(fast[0], state="CLOSE").state == "CLOSE"
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast[1].cookie = 4


def test_destroy_result_str():
    sid = sockdiag.SockId(AF4, bytes(16), bytes(16), 1, 2, 0, 3)
    res = sockdiag.DestroyResult(destroyed=[sid], gone=[], failed=[(sid, errno.EOPNOTSUPP)])
    assert str(res) == "destroyed 1, gone 0, failed 1 (EOPNOTSUPP)"
