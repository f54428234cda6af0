"""Send whole forged IP packets through raw sockets.

IPv4: AF_INET/SOCK_RAW/IPPROTO_RAW implies IP_HDRINCL; the kernel sends our
header as is, except that it always recomputes the header checksum and fills
in a zero id. IPv6: AF_INET6/SOCK_RAW/IPPROTO_RAW likewise implies header
inclusion on Linux (inet6_create sets hdrincl for IPPROTO_RAW; IPV6_HDRINCL
exists as an option only since 4.5); the source address is not checked.

The destination given to sendto() only picks the route. A packet addressed to
a local address takes the loopback path into this host's own TCP stack, with
CHECKSUM_NONE, so the kernel verifies our TCP checksum like a wire packet
(that is how ctdb_killtcp resets local sockets; verified for both families, with
a corrupted checksum as control, in tests/ns/test_seqprobe.py).

Sockets belong to the network namespace the thread was in when they were
made, and they are made lazily, at the first packet of each family. So a
sender remembers the namespace it was *constructed* in (or the one named by
`netns`) and makes its sockets there even when the first send() happens after
the caller left nfsreset.kernel.netns.entered(): a sender built for a lab node must
never send from the host's namespace by accident.
"""
from __future__ import annotations

import os
import socket


def close_later(sock: socket.socket) -> None:
    """Close `sock` on a daemon thread.

    For AF_PACKET sockets: packet_release() waits for an RCU grace period
    (synchronize_net), 8-20 ms here, which would otherwise sit between an
    announcement and the tickles that follow it, or between one exact RST and
    the next. If the process exits first the kernel closes the fd anyway.
    """
    import threading

    threading.Thread(target=sock.close, name="close-packet-socket", daemon=True).start()


class RawSocketError(Exception):
    """A raw socket could not be opened (no CAP_NET_RAW, no such namespace)."""


class RawSender:
    """Lazily opened v4/v6 raw sockets. Counts what it sent and what failed."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        self._home = None
        if netns is None:
            # Pin the constructing thread's namespace (an fd keeps it alive).
            self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.sent = 0
        self.errors = 0
        self.last_error: OSError | None = None
        self._socks: dict[int, socket.socket] = {}

    def _sock(self, version: int) -> socket.socket:
        sock = self._socks.get(version)
        if sock is None:
            fam = socket.AF_INET if version == 4 else socket.AF_INET6
            try:
                if self.netns is not None:
                    from nfsreset.kernel import netns as _netns
                    with _netns.entered(self.netns):
                        sock = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
                elif os.fstat(self._home).st_ino == os.stat("/proc/thread-self/ns/net").st_ino:
                    sock = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
                else:
                    sock = self._socket_at_home(fam)
            except Exception as exc:
                raise RawSocketError(f"cannot open a raw IPv{version} socket: {exc}") from exc
            # A burst of 10k tickles should not fail with ENOBUFS; blocking
            # sends just wait for the device queue.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            self._socks[version] = sock
        return sock

    def _socket_at_home(self, fam: int) -> socket.socket:
        from nfsreset.kernel import netns as _netns

        back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _netns._setns(self._home)
            try:
                return socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
            finally:
                _netns._setns(back)
        finally:
            os.close(back)

    def send(self, packet: bytes) -> None:
        """Send one IP packet (family from its version nibble). Raises OSError, RawSocketError."""
        version = packet[0] >> 4
        if version == 4:
            dst = socket.inet_ntop(socket.AF_INET, packet[16:20])
        elif version == 6:
            dst = socket.inet_ntop(socket.AF_INET6, packet[24:40])
        else:
            raise ValueError(f"not an IP packet (version {version})")
        self._sock(version).sendto(packet, (dst, 0))
        self.sent += 1

    def send_many(self, packets) -> int:
        """Send every packet; a failing one (unreachable client...) does not stop the rest.

        Returns how many went out; failures are counted in `errors` and the
        last one kept in `last_error`. Not being able to open a socket at all
        raises RawSocketError.
        """
        before = self.sent
        for packet in packets:
            try:
                self.send(packet)
            except OSError as exc:
                self.errors += 1
                self.last_error = exc
        return self.sent - before

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
        if self._home is not None:
            os.close(self._home)
            self._home = None

    def __del__(self) -> None:
        if getattr(self, "_home", None) is not None:
            os.close(self._home)

    def __enter__(self) -> "RawSender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
