"""The state dir: per VIP, the client 4-tuples last seen, for the node that takes
the VIP over (it tickles them), and the stale sockets a hook could not end yet.

Files (root-owned, 0600, written atomically):
    <dir>/<vip>.clients.json          client tuples; written by the VIP's owner
    <dir>/<vip>.pending.<node>.json   sockets `kill` could not end before the VIP
                                      arrived; `tickle` finishes them (same node)

Everything read here is untrusted input: it decides which packets we forge and
which sockets we end. A file or dir that someone other than root could have
written is refused (exit 3). A file that is not a regular file (a FIFO would
block the reader for ever), is larger than MAX_FILE_BYTES or has the wrong shape
is refused whole (exit 2). Each record is checked on its own (ports, and the
client address with model.client_address: family, scope); bad ones are refused
and counted, the good ones used, and one line says how many and the first
reason. At most MAX_CLIENTS_PER_VIP tuples per VIP are written or read; hitting
the limit is reported, never silent.
"""
from __future__ import annotations

import json
import math
import os
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable

from nfsreset.core.model import FlowKey, _short, client_address, norm_ip

DEFAULT_DIR = "/var/lib/nfsreset"
# Tuples per VIP, written or read (client lists and pending files alike). A
# tickle sends one ACK per tuple per round (nfsreset.core.pace bounds the rate), and
# reading 65,536 records costs ~0.2 s; a list cut here is reported, not silent.
# StateDir(max_entries=N) changes it.
MAX_CLIENTS_PER_VIP = 65536
MAX_ENTRIES = MAX_CLIENTS_PER_VIP     # the old name
# A full list is ~3 MB of JSON; anything beyond this is not ours. Bounds the
# memory a hostile file can make a hook spend.
MAX_FILE_BYTES = 16 << 20
FORMAT = 1
_MAX_COOKIE = (1 << 64) - 1


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


_BOOT_ID: list[str] = []


def boot_id() -> str:
    """This boot's id: pending files carry it, since socket cookies and
    CLOCK_MONOTONIC both start again at boot."""
    if not _BOOT_ID:
        with open("/proc/sys/kernel/random/boot_id") as f:
            _BOOT_ID.append(f.read().strip())
    return _BOOT_ID[0]


def _check_owner(path: str, st: os.stat_result, what: str) -> None:
    if st.st_uid != 0:
        raise StateUnsafe(f"state {what} {path} is owned by uid {st.st_uid}, not root; refusing to trust it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateUnsafe(f"state {what} {path} is group/world-writable (mode {stat.S_IMODE(st.st_mode):o}); "
                          f"refusing to trust it (chmod go-w)")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _stderr(line: str) -> None:
    print(f"nfsreset: {line}", file=sys.stderr, flush=True)


class PendingRecords(dict):
    """read_pending's answer: FlowKey -> socket cookie (or None), and when the file
    was written, as times(2) ticks (the jiffies clock that stamps addresses: what
    plan.honoured_pending decides on) and CLOCK_MONOTONIC seconds; None if nothing
    was read."""
    ticks: int | None = None
    mono: float | None = None


class StateDir:
    def __init__(self, path: str = DEFAULT_DIR, max_entries: int = MAX_CLIENTS_PER_VIP, create: bool = True,
                 dry_run: bool = False, log: Callable[[str], None] | None = None):
        self.path = os.path.abspath(path)
        self.max_entries = max_entries
        self.log = log if log is not None else _stderr     # where refused records and cut lists are reported
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

    def _read(self, path: str, vip: str) -> dict | None:
        """The document in `path` (None if there is none), its shape checked."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot stat {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            # Refused before open(): a FIFO blocks the opener until a writer
            # comes, and opening a device can have effects of its own.
            raise StateError(f"{path} is {_kind(st.st_mode)}, not a regular file; remove it")
        try:
            # O_NONBLOCK and O_NOFOLLOW: whatever replaced the file since lstat,
            # open() neither blocks nor follows a link.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot open {path}: {e.strerror}") from None
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                raise StateError(f"{path} was replaced while being opened; not read")
            _check_owner(path, fst, "file")
            if fst.st_size > MAX_FILE_BYTES:
                raise StateError(f"{path} is {fst.st_size:,} bytes, more than the {MAX_FILE_BYTES:,} "
                                 f"a state file may have; remove it")
            chunks, size = [], 0
            while size <= MAX_FILE_BYTES:     # bounded even if the file grows meanwhile
                chunk = os.read(fd, min(1 << 20, MAX_FILE_BYTES + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror}") from None
        finally:
            os.close(fd)
        if size > MAX_FILE_BYTES:
            raise StateError(f"{path} grew past {MAX_FILE_BYTES:,} bytes while being read; not read")
        try:
            doc = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:
            raise StateError(f"{path} does not parse as JSON ({_short(str(e), 80)}); remove it or fix it") from None
        if not isinstance(doc, dict) or type(doc.get("format")) is not int or doc["format"] != FORMAT:
            raise StateError(f"{path} is not an nfsreset state file (a JSON object with format {FORMAT})")
        if doc.get("vip") != norm_ip(vip):
            raise StateError(f"{path} holds 'vip' {_short(doc.get('vip'))}, not {norm_ip(vip)}")
        for field, kinds in (("written", (int, float)), ("node", (str,))):
            if field in doc and (type(doc[field]) not in kinds or not _finite(doc[field])):
                raise StateError(f"{path}: '{field}' is {_short(doc[field])}, not a {kinds[0].__name__}")
        return doc

    def _write(self, path: str, doc: dict) -> None:
        """Atomically, 0600. StateError (with the path and why) if it cannot be done:
        a full or read-only dir, a directory where the file should be."""
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-")
        except OSError as e:
            raise StateError(f"cannot write {path}: {e.strerror}") from None
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:                 # os.write may write less than asked
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(tmp, path)
        except BaseException as e:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp)
            if isinstance(e, OSError):
                raise StateError(f"cannot write {path}: {e.strerror}") from None
            raise
        # No fsync of the directory: `kill` writes this right before its first
        # destroy, and a second fsync puts disk latency (an NFS head's disk is
        # busy during a failover) on that path once more. The data was synced
        # before the rename, so a crash leaves either this file or the previous
        # one whole, never a torn file that `tickle` would have to refuse.

    def _cut(self, n: int, what: str, vip: str, where: str) -> int:
        """How many of n tuples to keep; says so when the limit cuts."""
        if n <= self.max_entries:
            return n
        self.log(f"kept {self.max_entries:,} of {n:,} {what} of {vip} {where} "
                 f"(limit {self.max_entries:,} per VIP: MAX_CLIENTS_PER_VIP)")
        return self.max_entries

    def _records(self, doc: dict, field: str, path: str, vip: str, cookies: list | None = None):
        """The good records of doc[field] (at most max_entries), as (FlowKey, cookie);
        bad ones are refused one by one and reported in one line. Raises StateError
        if the field is not a list, or if there were records and none was good."""
        rows = doc.get(field)
        if not isinstance(rows, list):
            raise StateError(f"{path}: '{field}' is {_short(rows)}, not a list")
        what = "client tuple(s)" if field == "clients" else "pending socket(s)"
        vip = norm_ip(vip)
        keep = self._cut(len(rows), what, vip, f"in {path}")
        out, refused, first = [], 0, ""
        for i, row in enumerate(rows):
            if len(out) >= keep:
                break
            try:
                key = _row(row, vip)
                cookie = None if cookies is None else _cookie(cookies[i])
            except ValueError as e:
                refused += 1
                first = first or f"record {i} {_short(row)}: {e}"
                continue
            out.append((key, cookie))
        if refused and not out:
            raise StateError(f"{path}: refused all {refused:,} {what} of {vip}; first: {first}")
        if refused:
            self.log(f"refused {refused:,} of {refused + len(out):,} {what} of {vip} in {path}; first: {first}")
        return out

    # -- client tuples ---------------------------------------------------------------
    def read_clients(self, vip: str) -> list[FlowKey]:
        path = self._file(vip, "clients")
        doc = self._read(path, vip)
        return [] if doc is None else list(dict.fromkeys(k for k, _ in self._records(doc, "clients", path, vip)))

    def write_clients(self, vip: str, keys) -> int:
        """Replace the VIP's client list; returns how many were written (capped).
        An empty list does not clobber a previous one: kernel nfsd closes its own
        sockets on address deletion, so a post-stop hook may find nothing while
        the clients it should pass on are the ones recorded earlier."""
        # Deduplicated on what the file holds: every key is of this VIP.
        rows = sorted({(k.vport, k.client, k.cport) for k in keys})
        rows = rows[: self._cut(len(rows), "client tuple(s)", norm_ip(vip), "to record")]
        if not rows:
            return 0
        self._write(self._file(vip, "clients"), {
            "format": FORMAT, "vip": norm_ip(vip), "written": time.time(), "node": node_id(),
            "clients": [list(r) for r in rows]})
        return len(rows)

    # -- pending (could not end before the VIP came) -------------------------------
    def read_pending(self, vip: str, node: str | None = None) -> PendingRecords:
        """The sockets recorded as pending for the VIP on this node, with the time
        the file was written. A file of another boot is ignored (its cookies may
        name sockets of this one): said once, returns nothing."""
        path = self._file(vip, f"pending.{node or node_id()}")
        out = PendingRecords()
        doc = self._read(path, vip)
        if doc is None:
            return out
        for field, ok in (("boot_id", lambda v: type(v) is str and v != ""),
                          ("ticks", lambda v: type(v) is int and v >= 0),
                          ("mono", lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0)):
            if not ok(doc.get(field)):
                raise StateError(f"{path}: '{field}' is {_short(doc.get(field))}, not "
                                 f"{'a non-negative number' if field != 'boot_id' else 'a boot id'} "
                                 f"(written by an older nfsreset? remove it)")
        cookies = doc.get("cookies")
        if not isinstance(cookies, list) or not isinstance(doc.get("pending"), list) \
                or len(cookies) != len(doc["pending"]):
            raise StateError(f"{path}: 'cookies' is not a list as long as 'pending'")
        if doc["boot_id"] != boot_id():
            self.log(f"ignored {path}: written in another boot (boot_id {_short(doc['boot_id'])}); "
                     f"its socket cookies mean nothing now")
            return out
        out.update(self._records(doc, "pending", path, vip, cookies))
        out.ticks, out.mono = doc["ticks"], float(doc["mono"])
        return out

    def write_pending(self, vip: str, pending: dict[FlowKey, int | None], node: str | None = None) -> None:
        """Record sockets to end at post-start. The file carries this boot's id and
        the time of this write, on the jiffies clock (times(2) ticks) and on
        CLOCK_MONOTONIC: a pending socket is honoured only if the file predates the
        VIP's arrival (plan.honoured_pending)."""
        path = self._file(vip, f"pending.{node or node_id()}")
        items = sorted(pending.items())     # keys are distinct: cookies are never compared
        items = items[: self._cut(len(items), "pending socket(s)", norm_ip(vip), "to record")]
        if not items:
            self.clear_pending(vip, node)
            return
        self._write(path, {"format": FORMAT, "vip": norm_ip(vip), "written": time.time(),
                           "ticks": round(os.times().elapsed * 100),
                           "mono": time.clock_gettime(time.CLOCK_MONOTONIC), "boot_id": boot_id(),
                           "pending": [[k.vport, k.client, k.cport] for k, _ in items],
                           "cookies": [c for _, c in items]})

    def clear_pending(self, vip: str, node: str | None = None) -> None:
        try:
            os.unlink(self._file(vip, f"pending.{node or node_id()}"))
        except FileNotFoundError:
            pass


def _finite(x) -> bool:
    return not isinstance(x, float) or math.isfinite(x)


def _port(value, what: str) -> int:
    if type(value) is not int or not 0 < value < 65536:
        raise ValueError(f"{what} {_short(value)} is not a TCP port (1-65535)")
    return value


def _row(row, vip: str) -> FlowKey:
    """One [vport, client, cport] record; ValueError says what is wrong with it."""
    if not isinstance(row, list) or len(row) != 3:
        raise ValueError("is not [vport, client, cport]")
    vport, client, cport = row
    return FlowKey(vip, _port(vport, "VIP port"), client_address(client, vip), _port(cport, "client port"))


def _cookie(value) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 < value <= _MAX_COOKIE:
        raise ValueError(f"cookie {_short(value)} is not a socket cookie (1 to 2**64-1)")
    return value
