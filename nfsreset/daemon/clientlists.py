"""The state dir as the daemon and its engines share it: client lists written
only on change, and published through attrd by a thread of their own."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from nfsreset.core.model import FlowKey
from nfsreset.state.statedir import StateDir, StateError


PUBLISH_RETRY_S = 2.0     # a list attrd did not take (not up, no peer online) is offered again
ATTRD_READ_REUSE_S = 2.0  # one attrd read serves an arrival (IPv6 DAD takes ~1 s)
ATTRD_FRESH_S = 0.1       # a copy older than this is read again after the arrival's tickle
PREFETCH_S = 1.0          # peers' lists of an away VIP are read this often (off the path)
ATTRD_TIMEOUT_JOIN_S = 6.0   # attrd_updater is bounded at 5 s (store.ATTRD_TIMEOUT_S)
PREFETCH_PER_S = 4.0      # at most this many attrd_updater reads a second for it


class _Later:
    """A read started now in a thread, its result (minus `known`) taken later."""

    def __init__(self, read: Callable[[], list[FlowKey]]):
        self._out: list[FlowKey] = []
        self._thread = threading.Thread(target=self._run, args=(read,), name="attrd-read", daemon=True)
        self._thread.start()

    def _run(self, read) -> None:
        try:
            self._out = read()
        except Exception:   # the arrival's first read already reported a bad list
            pass

    def result(self, known: set[FlowKey]) -> list[FlowKey]:
        self._thread.join(ATTRD_TIMEOUT_JOIN_S)
        return [k for k in self._out if k not in known]


class DaemonState(StateDir):
    """The state dir as the daemon and its engines share it: a client list is not
    written again while the file on disk is still the one this process wrote
    with the same clients (same inode and mtime: the peer's write or a removal
    changes them). The daemon keeps the list current while it owns a VIP, so
    the post-stop Record usually finds it there already; writing it anyway
    (sort, JSON, fsync) cost 60 ms of a 10,000-session teardown, before
    the first destroy."""

    def __init__(self, path: str, dry_run: bool = False, log: Callable[[str], None] | None = None,
                 store: str = "dir"):
        super().__init__(path, dry_run=dry_run, log=log)
        self.written: dict[str, tuple[frozenset[FlowKey], int, int]] = {}
        # attrd: each changed list is also published through Pacemaker's attrd, by
        # a thread of its own (an attrd_updater exec per peer, ~20 ms each, must
        # not hold up the loop that reacts to a VIP leaving); only the newest list
        # of a VIP is published, and one that did not change is not published again.
        # `auto` is decided at each publish and read, not once: the daemon
        # usually starts before Pacemaker (network-online.target), and a cluster
        # stack restarted under it comes back.
        from nfsreset.state import store as S
        self.store = store
        self.backend = S.choose(store)
        self.attrd = S.Attrd(log=self.log) if store != "dir" else None
        self._attrd_seen = self.backend == "attrd"
        self._to_publish: dict[str, frozenset[FlowKey]] = {}
        self._published: dict[str, frozenset[FlowKey]] = {}
        # Lists attrd did not take (not up yet, no peer online): offered again
        # every PUBLISH_RETRY_S until it does or the list changes.
        self._unpublished: dict[str, frozenset[FlowKey]] = {}
        self._retry_at = 0.0
        self._read_cache: dict[str, tuple[float, list[FlowKey]]] = {}
        self._read_lock = threading.Lock()
        self._read_locks: dict[str, threading.Lock] = {}
        self._used = threading.local()       # .age: of the attrd copy this thread's last read used
        self._prefetch_at = 0.0
        self._prefetching = False
        self._publish_cv = threading.Condition()
        self._publisher: threading.Thread | None = None
        self._stop_publisher = False

    def _publish_loop(self) -> None:
        while True:
            with self._publish_cv:
                while not self._to_publish and not self._stop_publisher:
                    self._publish_cv.wait()
                if self._stop_publisher and not self._to_publish:
                    return
                vip, keys = self._to_publish.popitem()
            try:
                self.attrd.publish(vip, keys)
                self._published[vip] = keys
                self._unpublished.pop(vip, None)
            except Exception as e:   # attrd down or refusing: the dir still has the list
                if self._unpublished.get(vip) != keys:    # one line per list, not per retry
                    self.log(f"publishing the clients of {vip} to attrd failed: {e}; "
                             f"trying again every {PUBLISH_RETRY_S:g} s")
                self._unpublished[vip] = keys

    def attrd_now(self):
        """The Attrd to use now (None: the dir alone). `auto` follows attrd coming and going."""
        if self.attrd is None:
            return None
        if self.store == "auto":
            from nfsreset.state.store import attrd_present
            up = attrd_present()
            if up != self._attrd_seen:
                self._attrd_seen = up
                self.log("client lists: Pacemaker's attrd is " + ("reachable now; lists go through it too"
                                                                  if up else "gone; the state dir only"))
            if not up:
                return None
        return self.attrd

    def retry_publish(self, now: float, here) -> None:
        """Offer lists attrd did not take again (from the flush, at most every
        PUBLISH_RETRY_S), for the VIPs still `here` only: once a VIP left, its
        slots belong to the next owner's lists."""
        if not self._unpublished or now < self._retry_at:
            return
        self._retry_at = now + PUBLISH_RETRY_S
        for vip, keys in list(self._unpublished.items()):
            if vip in here:
                self.publish(vip, keys)
            else:
                self._unpublished.pop(vip, None)

    def publish(self, vip: str, keys: frozenset[FlowKey]) -> None:
        if not keys or self._published.get(vip) == keys:
            return
        if self.attrd_now() is None:
            if self.attrd is not None:
                self._unpublished[vip] = keys     # published once attrd is up
            return
        with self._publish_cv:
            self._to_publish[vip] = keys
            if self._publisher is None:
                self._publisher = threading.Thread(target=self._publish_loop, name="attrd-publish", daemon=True)
                self._publisher.start()
            self._publish_cv.notify()

    def close_publisher(self, timeout: float = 5.0) -> None:
        with self._publish_cv:
            self._stop_publisher = True
            self._publish_cv.notify()
        if self._publisher is not None:
            self._publisher.join(timeout)

    def read_clients(self, vip: str, max_age: float = ATTRD_READ_REUSE_S) -> list[FlowKey]:
        """The dir's list, plus every node's list in attrd (attrd backend; a copy
        read at most `max_age` s ago is used as is)."""
        self._used.age = 0.0
        out: dict[FlowKey, None] = {}
        try:
            out.update(dict.fromkeys(super().read_clients(vip)))
        except StateError as e:
            if self.attrd_now() is None:
                raise
            self.log(str(e))
        attrd = self.attrd_now()
        if attrd is not None:
            try:
                out.update(dict.fromkeys(self._attrd_read(attrd, vip, max_age)))
            except StateError as e:
                self.log(str(e))
        return list(out)[: self.max_entries]

    def _attrd_read(self, attrd, vip: str, max_age: float) -> list[FlowKey]:
        """attrd's lists of `vip`. An attrd_updater exec is 20-40 ms here, so a
        copy at most `max_age` s old is used instead: the one prefetched while
        the VIP was away, the move report's and the post-start's read of the
        same arrival, IPv6's tentative read at usable."""
        with self._read_lock:
            lock = self._read_locks.setdefault(vip, threading.Lock())
        with lock:
            hit = self._read_cache.get(vip)
            if hit is not None and time.monotonic() - hit[0] < max_age:
                self._used.age = time.monotonic() - hit[0]
                return hit[1]
            keys = attrd.read(vip, self.max_entries)
            self._read_cache[vip] = (time.monotonic(), keys)
            return keys

    def used_copy(self) -> bool:
        """Did this thread's last read_clients() use an attrd copy older than ATTRD_FRESH_S?"""
        return getattr(self._used, "age", 0.0) > ATTRD_FRESH_S

    def prefetch(self, away, now: float) -> None:
        """Keep a copy of the peers' lists of the VIPs away from here, read by a
        thread at most every PREFETCH_S (slower with many VIPs: at most
        PREFETCH_PER_S execs a second): the VIP's arrival then tickles without
        waiting for attrd_updater, and reads it afresh in parallel (Daemon.act)."""
        away = sorted(away)
        if not away or now < self._prefetch_at or self._prefetching or self.attrd_now() is None:
            return
        self._prefetch_at = now + max(PREFETCH_S, len(away) / PREFETCH_PER_S)
        self._prefetching = True

        def run() -> None:
            try:
                for vip in away:
                    try:
                        self._attrd_read(self.attrd, vip, 0.0)
                    except Exception:   # the arrival's own read reports what is wrong
                        self._read_cache.pop(vip, None)
            finally:
                self._prefetching = False
        threading.Thread(target=run, name="attrd-prefetch", daemon=True).start()

    def _stamp(self, vip: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self._file(vip, "clients"))
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def write_clients(self, vip: str, keys) -> int:
        keys = frozenset(keys)
        self._read_cache.pop(vip, None)     # owner of the VIP now, or it left: read afresh next time
        self.publish(vip, keys)
        last = self.written.get(vip)
        if keys and last is not None and last[0] == keys and last[1:] == self._stamp(vip):
            return min(len(keys), self.max_entries)
        n = super().write_clients(vip, keys)
        stamp = self._stamp(vip) if n else None
        if stamp is not None:
            self.written[vip] = (keys, *stamp)
        return n
