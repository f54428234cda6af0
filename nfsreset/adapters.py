"""What the engine needs from the kernel and the disk, as one small interface.

`Adapters` names every call the engine makes; `Kernel` is the real one. Unit
tests of the engine pass fakes that fail on purpose (tests/unit/test_engine.py).
Nothing is imported at load time: `kill` and `tickle` are fresh processes whose
first destroy or packet must leave within ~0.1 s of exec, so each kernel module
is imported by the call that needs it.

Failures are plain exceptions; the engine catches every one of them, and tells
from the action and the exception which capability this host lacks.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class DestroyAcks:
    """The kernel's answer per socket, by cookie: destroyed (0), gone (ENOENT:
    already dead, or its 4-tuple reused by a socket with another cookie), or
    refused with an errno (EPERM, EOPNOTSUPP, ...)."""
    destroyed: list[int] = dataclasses.field(default_factory=list)
    gone: list[int] = dataclasses.field(default_factory=list)
    failed: list[tuple[int, int]] = dataclasses.field(default_factory=list)   # (cookie, errno)


class Adapters:
    """The engine's view of the host. Each method may raise; none is called in a dry run
    unless it only reads (local_addrs, dump, read_pending)."""

    state_path: str | None = None   # the state dir, or None: nothing is recorded

    # -- observation
    def local_addrs(self, vips) -> frozenset[str]:
        """The address table, plus those of `vips` a FIB lookup finds local."""
        raise NotImplementedError

    def arrival_stamps(self, vip: str) -> list[int]:
        """IFA_CACHEINFO cstamps (jiffies/100 since boot) of the rows configuring vip."""
        raise NotImplementedError

    def dump(self, vip: str, ports) -> list:
        """Flows (nfsreset.core.model.Flow) on vip:ports in this thread's netns."""
        raise NotImplementedError

    # -- the ladder
    def destroy(self, flows) -> DestroyAcks:
        """SOCK_DESTROY the sockets of these flows (from the last dump)."""
        raise NotImplementedError

    def exact_rst(self, flows, timeout: float) -> int:
        """Exact-sequence RST to each local socket of these flows; how many went out."""
        raise NotImplementedError

    # -- nftables: the guard and the quarantine
    def quarantine(self, vip: str) -> None:
        raise NotImplementedError

    def lift_quarantine(self, vip: str) -> None:
        raise NotImplementedError

    def quarantined(self) -> set[str]:
        raise NotImplementedError

    def add_stale(self, keys, timeout_s: int) -> int:
        raise NotImplementedError

    def prune(self) -> None:
        raise NotImplementedError

    # -- the state dir
    def write_clients(self, vip: str, keys) -> int:
        raise NotImplementedError

    def read_pending(self, vip: str) -> dict:
        raise NotImplementedError

    def write_pending(self, vip: str, pending: dict) -> None:
        raise NotImplementedError

    def clear_pending(self, vip: str) -> None:
        raise NotImplementedError

    # -- telling the clients
    def announce(self, vip: str) -> str:
        """Gratuitous ARP / unsolicited NA; the device it went out on."""
        raise NotImplementedError

    def tickle_sender(self):
        """A context manager with send_many(packets) -> int (nfsreset.kernel.rawsend.RawSender)."""
        raise NotImplementedError


class Kernel(Adapters):
    """The real adapters, in the network namespace of the calling thread.

    state: a StateDir or None. guard: a long-lived caller's one Guard (the
    daemon's: each libnftables context costs a netlink socket, and one opened
    while the process holds >= 1024 descriptors aborts it); else one is made
    at the first nft call.
    """

    def __init__(self, *, state=None, guard=None):
        self.state = state
        self.state_path = state.path if state is not None else None
        self._guard = guard
        self._sids: dict[int, object] = {}   # cookie -> sockdiag.SockId of the last dumps

    def local_addrs(self, vips) -> frozenset[str]:
        from nfsreset.kernel import addrs
        return addrs.local_ips(vips=vips)

    def arrival_stamps(self, vip: str) -> list[int]:
        from nfsreset.kernel import addrs
        return [a.cstamp for a in addrs.dump() if a.ip == vip and a.cstamp is not None]

    def dump(self, vip: str, ports) -> list:
        from nfsreset.kernel import sockdiag
        pairs = sockdiag.dump(local_ips=[vip], local_ports=sorted(ports))
        self._sids.update({f.cookie: sid for f, sid in pairs})
        return [f for f, _ in pairs]

    def destroy(self, flows) -> DestroyAcks:
        from nfsreset.kernel import sockdiag
        res = sockdiag.destroy([self._sids[f.cookie] for f in flows])
        return DestroyAcks([s.cookie for s in res.destroyed], [s.cookie for s in res.gone],
                           [(s.cookie, e) for s, e in res.failed])

    def exact_rst(self, flows, timeout: float) -> int:
        from nfsreset.kernel import seqprobe
        return len(seqprobe.kill_local_many([f.key for f in flows], timeout=timeout))

    def guard(self):
        if self._guard is None:
            self._guard = _new_guard()
        return self._guard

    def quarantine(self, vip: str) -> None:
        self.guard().quarantine(vip)

    def lift_quarantine(self, vip: str) -> None:
        self.guard().lift_quarantine(vip)

    def quarantined(self) -> set[str]:
        return self.guard().quarantined()

    def add_stale(self, keys, timeout_s: int) -> int:
        return self.guard().add_stale(keys, timeout_s=timeout_s)

    def prune(self) -> None:
        if self._guard is not None:
            self._guard.prune()

    def write_clients(self, vip: str, keys) -> int:
        return self.state.write_clients(vip, keys)

    def read_pending(self, vip: str) -> dict:
        return self.state.read_pending(vip)

    def write_pending(self, vip: str, pending: dict) -> None:
        self.state.write_pending(vip, pending)

    def clear_pending(self, vip: str) -> None:
        self.state.clear_pending(vip)

    def announce(self, vip: str) -> str:
        from nfsreset.kernel.announce import announce
        return announce(vip)

    def tickle_sender(self):
        from nfsreset.kernel.rawsend import RawSender
        return RawSender()


def _new_guard():
    """A Guard, or the reason there is none as one exception without its traceback.

    python3-nftables' Nftables.__del__ raises AttributeError when its __init__
    failed (e.g. libnftables.so.1 cannot be loaded), and the interpreter prints
    that as "Exception ignored in ... Traceback" when the half-made object is
    freed: that happens here, under a hook that swallows exactly that."""
    import sys
    from nfsreset.kernel.guard import Guard

    def quiet(u) -> None:
        if not (u.exc_type is AttributeError and getattr(u.object, "__qualname__", "") == "Nftables.__del__"):
            before(u)

    before = sys.unraisablehook
    sys.unraisablehook = quiet
    why = None
    try:
        try:
            return Guard()
        except Exception as e:   # ImportError, OSError from dlopen, GuardError
            why = f"{type(e).__name__}: {e}"
        # Leaving the except block freed the exception, its frames and the half-made context.
    finally:
        sys.unraisablehook = before
    raise NftUnavailable(f"nftables unavailable: {why}")


class NftUnavailable(Exception):
    """No libnftables context could be made here."""
