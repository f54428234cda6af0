"""The state dir: per VIP, the client 4-tuples last seen, for the node that takes
the VIP over (it tickles them), and the stale sockets a hook could not end yet.

Files (root-owned, 0600, written atomically):
    <dir>/<vip>.clients.json          client tuples; written by the VIP's owner
    <dir>/<vip>.pending.<node>.json   sockets `kill` could not end before the VIP
                                      arrived; `tickle` finishes them (same node)

Anything we read here decides which packets we forge, so a file or dir that
someone other than root could have written is refused, not trusted.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import time

from nfsreset.model import FlowKey, family_of, key_order, norm_ip

DEFAULT_DIR = "/var/lib/nfsreset"
MAX_ENTRIES = 65536
FORMAT = 1


class StateError(Exception):
    """Bad content (exit 2)."""
    exit_code = 2


class StateUnsafe(StateError):
    """Ownership or permissions make the state untrustworthy (exit 3)."""
    exit_code = 3


def node_id() -> str:
    """This node's name for pending files: hostname plus network namespace, so two
    lab nodes (namespaces on one host) sharing a state dir keep theirs apart."""
    ino = os.stat("/proc/thread-self/ns/net").st_ino
    return f"{socket.gethostname()}-{ino}"


def _check_owner(path: str, st: os.stat_result, what: str) -> None:
    if st.st_uid != 0:
        raise StateUnsafe(f"state {what} {path} is owned by uid {st.st_uid}, not root; refusing to trust it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateUnsafe(f"state {what} {path} is group/world-writable (mode {stat.S_IMODE(st.st_mode):o}); "
                          f"refusing to trust it (chmod go-w)")


class StateDir:
    def __init__(self, path: str = DEFAULT_DIR, max_entries: int = MAX_ENTRIES, create: bool = True,
                 dry_run: bool = False):
        self.path = os.path.abspath(path)
        self.max_entries = max_entries
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            if not create:
                raise StateError(f"state dir {self.path} does not exist") from None
            if dry_run:   # a dry run makes nothing: a missing dir reads as empty (its writes are skipped)
                return
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            st = os.lstat(self.path)
        if not stat.S_ISDIR(st.st_mode):
            raise StateError(f"state dir {self.path} is not a directory")
        _check_owner(self.path, st, "dir")

    # -- files ---------------------------------------------------------------------
    def _file(self, vip: str, kind: str) -> str:
        return os.path.join(self.path, f"{norm_ip(vip)}.{kind}.json")

    def _read(self, path: str) -> dict | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot open {path}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            _check_owner(path, os.fstat(f.fileno()), "file")
            raw = f.read(64 * 1024 * 1024)
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise StateError(f"{path} does not parse as JSON ({e}); remove it or fix it") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise StateError(f"{path} is not an nfsreset state file (format {FORMAT})")
        return doc

    def _write(self, path: str, doc: dict) -> None:
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp)
            raise
        # No fsync of the directory: `kill` writes this right before its first
        # destroy, and a second fsync puts disk latency (an NFS head's disk is
        # busy during a failover) on that path once more. The data was synced
        # before the rename, so a crash leaves either this file or the previous
        # one whole, never a torn file that `tickle` would have to refuse.

    # -- client tuples ---------------------------------------------------------------
    def read_clients(self, vip: str) -> list[FlowKey]:
        doc = self._read(self._file(vip, "clients"))
        return [] if doc is None else _keys(doc, "clients", self._file(vip, "clients"), vip)

    def write_clients(self, vip: str, keys) -> int:
        """Replace the VIP's client list; returns how many were written (capped).
        An empty list does not clobber a previous one: kernel nfsd closes its own
        sockets on address deletion, so a post-stop hook may find nothing while
        the clients it should pass on are the ones recorded earlier."""
        # Plain tuples: set and sort run in C (10,000 FlowKeys through their
        # Python-level __hash__ and a sort key cost ~3x more, on a hook's path).
        rows = sorted({(k.vport, k.client, k.cport) for k in keys})[: self.max_entries]
        if not rows:
            return 0
        self._write(self._file(vip, "clients"), {
            "format": FORMAT, "vip": norm_ip(vip), "written": time.time(), "node": node_id(),
            "clients": [list(r) for r in rows]})
        return len(rows)

    # -- pending (could not end before the VIP came) -------------------------------
    def read_pending(self, vip: str, node: str | None = None) -> dict[FlowKey, int | None]:
        path = self._file(vip, f"pending.{node or node_id()}")
        doc = self._read(path)
        if doc is None:
            return {}
        keys = _keys(doc, "pending", path, vip)
        cookies = doc.get("cookies") or [None] * len(keys)
        return dict(zip(keys, cookies))

    def write_pending(self, vip: str, pending: dict[FlowKey, int | None], node: str | None = None) -> None:
        path = self._file(vip, f"pending.{node or node_id()}")
        items = sorted(pending.items(), key=lambda kv: key_order(kv[0]))[: self.max_entries]
        if not items:
            self.clear_pending(vip, node)
            return
        self._write(path, {"format": FORMAT, "vip": norm_ip(vip), "written": time.time(),
                           "pending": [[k.vport, k.client, k.cport] for k, _ in items],
                           "cookies": [c for _, c in items]})

    def clear_pending(self, vip: str, node: str | None = None) -> None:
        try:
            os.unlink(self._file(vip, f"pending.{node or node_id()}"))
        except FileNotFoundError:
            pass


def _keys(doc: dict, field: str, path: str, vip: str) -> list[FlowKey]:
    rows = doc.get(field)
    if not isinstance(rows, list):
        raise StateError(f"{path}: '{field}' is not a list")
    vip = norm_ip(vip)
    out = []
    for row in rows[:MAX_ENTRIES]:
        try:
            vport, client, cport = row
            if not (isinstance(vport, int) and isinstance(cport, int)
                    and 0 < vport < 65536 and 0 < cport < 65536):
                raise ValueError
            key = FlowKey(vip, vport, norm_ip(client), cport)
            if family_of(key.client) != family_of(vip):
                raise ValueError
            out.append(key)
        except (TypeError, ValueError):
            raise StateError(f"{path}: bad entry {row!r} in '{field}'") from None
    return out
