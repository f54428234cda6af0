"""Plain data shared by the pure core and the kernel adapters.

Addresses are kept as normalised strings: IPv4-mapped IPv6 addresses (what a
dual-stack socket reports) become plain IPv4, so one VIP matches both kinds of
socket. Everything here is hashable and free of kernel objects.
"""
from __future__ import annotations

import collections
import dataclasses
import ipaddress

# Linux TCP states (include/net/tcp_states.h), named as ss prints them.
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
    11: "CLOSING", 12: "NEW_SYN_RECV",
}
STATE_NUMBERS = {name: num for num, name in TCP_STATES.items()}


def norm_ip(text: str) -> str:
    """Canonical text of an address; v4-mapped v6 becomes v4. Raises ValueError."""
    addr = ipaddress.ip_address(text.strip().strip("[]"))
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def vip_address(text: str) -> str:
    """The canonical text of a VIP given by a user (command line, config), or
    ValueError saying why it cannot be one. See host_address."""
    return host_address(text)


def host_address(text: str) -> str:
    """Canonical text of a unicast address of one host (a VIP, or a client of
    one), or ValueError with the reason. Loopback never leaves its host; a zone
    (fe80::1%eth0) ties the address to one interface and is no part of what the
    kernel, sock_diag and nft match on (inet_pton refuses it)."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an IP address")
    try:
        addr = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    if addr.version == 6 and addr.scope_id is not None:
        kind = "a link-local address" if addr.is_link_local else "an address"
        raise ValueError(f"{text!r} is {kind} with a zone (%{addr.scope_id}); give an address without a zone")
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        raise ValueError(f"{text!r} is the unspecified address (any), not a host address")
    if addr.is_multicast:
        raise ValueError(f"{text!r} is a multicast address, not a host address")
    if addr.version == 4 and addr == _BROADCAST:
        raise ValueError(f"{text!r} is the broadcast address, not a host address")
    if addr.is_loopback:
        raise ValueError(f"{text!r} is a loopback address: it never leaves this host, so it cannot "
                         f"move between nodes or be reached from another")
    return str(addr)


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def family_of(ip: str) -> int:
    """4 or 6."""
    return ipaddress.ip_address(ip).version


def parse_endpoint(text: str, default_port: int | None = None) -> tuple[str, int | None]:
    """'198.51.100.7', '198.51.100.7:800', '2001:db8::7', '[2001:db8::7]:800'."""
    text = text.strip()
    port: int | None = default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"missing ']' in {text!r}")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':PORT' after ']' in {text!r}")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p, text)
    else:
        host = text
    return norm_ip(host), port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {whole!r}")
    return int(text)


def format_endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class FlowKey(collections.namedtuple("FlowKey", "vip vport client cport")):
    """A TCP 4-tuple seen from the server: local (VIP) side and remote (client) side.

    A named tuple, not a dataclass: built, hashed and sorted in C, ~2.5x faster at
    10,000 keys (bench/bench_flowkey.py); equal to the plain tuple of its fields.
    collections, not typing.NamedTuple: typing costs ~2 ms of the hooks' start-up."""
    __slots__ = ()

    @property
    def family(self) -> int:
        return family_of(self.vip)

    def __str__(self) -> str:
        return f"{format_endpoint(self.vip, self.vport)} <- {format_endpoint(self.client, self.cport)}"


@dataclasses.dataclass(frozen=True)
class Flow:
    """One TCP socket on a watched port, as a dump or the BPF tracker saw it.

    `netns` is the namespace inode; `cookie` the kernel socket cookie (what
    SOCK_DESTROY needs); times are CLOCK_MONOTONIC seconds where known.
    """
    key: FlowKey
    state: str
    netns: int | None = None
    cookie: int | None = None
    inode: int | None = None
    recvq: int = 0
    sendq: int = 0
    first_seen: float | None = None
    last_change: float | None = None
    snd_nxt: int | None = None
    rcv_nxt: int | None = None


def client_address(text: object, vip: str | None = None) -> str:
    """A session's client address from untrusted input (a state file), as canonical
    text; ValueError says why it cannot be one. Tickles and RSTs are forged towards
    it, so only a unicast address that can be a remote peer of `vip` passes: no zone
    (`fe80::1%eth0`), no link-local, loopback, multicast, broadcast, unspecified or
    reserved address, same family as the VIP and not the VIP itself. inet_pton, not
    ipaddress: strict (no leading zeros, no blanks) and ~10x faster per record."""
    if not isinstance(text, str):
        raise ValueError(f"{_short(text)} is not an address string")
    if "%" in text:
        raise ValueError(f"{_short(text)} has a zone: scoped (link-local) addresses are refused")
    import socket
    try:
        raw = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        try:
            raw = socket.inet_pton(socket.AF_INET6, text)
        except (OSError, ValueError):
            raise ValueError(f"{_short(text)} is not an IP address") from None
        if raw[:12] == b"\0" * 10 + b"\xff\xff":     # v4-mapped: what a dual-stack socket reports
            raw = raw[12:]
    except ValueError:       # embedded NUL
        raise ValueError(f"{_short(text)} is not an IP address") from None
    why = _not_unicast(raw)
    ip = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    if why:
        raise ValueError(f"{ip} is {why}")
    if vip is not None:
        if (":" in ip) != (":" in vip):
            raise ValueError(f"{ip} is not of the VIP's family (IPv{6 if ':' in vip else 4})")
        if ip == vip:
            raise ValueError(f"{ip} is the VIP itself")
    return ip


def _not_unicast(raw: bytes) -> str:
    """Why a packed address cannot be a remote unicast peer ('' if it can)."""
    if len(raw) == 4:
        a, b = raw[0], raw[1]
        if raw == b"\0\0\0\0":
            return "unspecified"
        if a == 0:
            return "in 0.0.0.0/8 (this network)"
        if a == 127:
            return "loopback"
        if (a, b) == (169, 254):
            return "link-local"
        if 224 <= a <= 239:
            return "multicast"
        if raw == b"\xff\xff\xff\xff":
            return "the broadcast address"
        if a >= 240:
            return "reserved (240.0.0.0/4)"
        return ""
    if raw == b"\0" * 16:
        return "unspecified"
    if raw == b"\0" * 15 + b"\1":
        return "loopback"
    if raw[0] == 0xFF:
        return "multicast"
    if raw[0] == 0xFE and raw[1] & 0xC0 == 0x80:
        return "link-local"
    return ""


def _short(value: object, limit: int = 60) -> str:
    """repr() of untrusted input, bounded for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
