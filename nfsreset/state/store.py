"""Where a VIP's client list travels from the old owner to the new one.

Backends: `dir`, the state dir (shared storage carries failovers, a local dir only
failbacks); `attrd`, Pacemaker's attribute daemon through `attrd_updater -p`
(private: never written into the CIB), one attribute nfsreset-clients-<vip> per
node, published under each OTHER node's name because attrd forgets a lost node's
own values, read back as the union of all (`--query --all`) and of the local dir,
which is written too (pending sockets, and it outlives a whole-cluster restart);
`auto`, attrd when its IPC socket is in /proc/net/unix, else dir.

A value is "g1:" + base64 of gzip of sorted "vport client cport" lines, so the
agent's shell can write one with ss | awk | sort | gzip | base64; one longer than
MAX_VALUE_CHARS (execve's 128 KiB argument limit) is cut in sorted order, logged.
Everything read back is untrusted (any root or haclient process may set it):
bounded before and after inflating, each record checked as statedir._row does.
Measured sizes and times: bench/README.md, docs/internals.md ("attrd").
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import subprocess
import zlib
from typing import Callable

from nfsreset.core.model import FlowKey, _short, norm_ip
from nfsreset.state.statedir import MAX_CLIENTS_PER_VIP, StateDir, StateError, _row, _stderr

BACKENDS = ("auto", "dir", "attrd")
ATTR_PREFIX = "nfsreset-clients-"
PREFIX = "g1:"
# execve caps one argument at MAX_ARG_STRLEN (32 pages = 128 KiB); attrd_updater
# takes the value on its command line. Leave room for the prefix.
MAX_VALUE_CHARS = 120_000
# A record is at most "65535 " + 39 (IPv6) + " 65535\n" = 52 bytes.
MAX_PLAIN_BYTES = MAX_CLIENTS_PER_VIP * 52
ATTRD_TIMEOUT_S = 5.0
ATTRD_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
_QUERY_RE = re.compile(r'^name="([^"]*)" host="([^"]*)" value="([^"]*)"$')


def attr_name(vip: str) -> str:
    return ATTR_PREFIX + norm_ip(vip)


# -- encoding (pure) ----------------------------------------------------------------
def encode(keys, limit: int = MAX_VALUE_CHARS) -> tuple[str, int]:
    """(value, how many tuples it holds). Sorted, deduplicated; cut to fit `limit`."""
    rows = sorted({(k.vport, k.client, k.cport) for k in keys})
    rows = rows[:MAX_CLIENTS_PER_VIP]
    n = len(rows)
    while True:
        plain = "".join(f"{v} {c} {p}\n" for v, c, p in rows[:n]).encode()
        # mtime=0-equivalent: zlib with gzip wrapper (wbits 31) writes mtime 0.
        comp = zlib.compressobj(9, zlib.DEFLATED, 31)
        value = PREFIX + base64.b64encode(comp.compress(plain) + comp.flush()).decode()
        if len(value) <= limit or n == 0:
            return value, n
        n = int(n * limit / len(value) * 0.95)     # shrink by the measured ratio, then check again


def decode(value: str, vip: str, where: str, log: Callable[[str], None],
           max_entries: int = MAX_CLIENTS_PER_VIP) -> list[FlowKey]:
    """The valid tuples of one published value. StateError if the value as a whole
    is not ours (wrong prefix, not base64/gzip, too large) or every record is bad;
    bad records among good ones are refused and reported in one line."""
    vip = norm_ip(vip)
    if len(value) > MAX_VALUE_CHARS * 2:
        raise StateError(f"{where}: value is {len(value):,} characters, more than an nfsreset list "
                         f"may have ({MAX_VALUE_CHARS:,}); not read")
    if not value.startswith(PREFIX):
        raise StateError(f"{where}: value {_short(value)} is not an nfsreset client list ({PREFIX}...)")
    try:
        raw = base64.b64decode(value[len(PREFIX):], validate=True)
        d = zlib.decompressobj(31)
        plain = d.decompress(raw, MAX_PLAIN_BYTES + 1)
        if len(plain) > MAX_PLAIN_BYTES or d.unconsumed_tail:
            raise StateError(f"{where}: value inflates past {MAX_PLAIN_BYTES:,} bytes; not read")
        if not d.eof:
            raise StateError(f"{where}: value is a truncated gzip stream; not read")
        text = plain.decode("ascii")
    except (binascii.Error, zlib.error, UnicodeDecodeError, ValueError) as e:
        raise StateError(f"{where}: value does not decode ({_short(str(e), 60)}); not read") from None
    lines = text.splitlines()
    if len(lines) > max_entries:
        log(f"kept {max_entries:,} of {len(lines):,} client tuple(s) of {vip} in {where} "
            f"(limit {max_entries:,} per VIP: MAX_CLIENTS_PER_VIP)")
        lines = lines[:max_entries]
    out, refused, first = [], 0, ""
    for i, line in enumerate(lines):
        parts = line.split(" ")
        try:
            if len(parts) != 3 or not all(parts) or not parts[0].isdigit() or not parts[2].isdigit() \
                    or len(parts[0]) > 5 or len(parts[2]) > 5:
                raise ValueError("is not 'vport client cport'")
            out.append(_row([int(parts[0]), parts[1], int(parts[2])], vip))
        except ValueError as e:
            refused += 1
            first = first or f"record {i} {_short(line)}: {e}"
    if refused and not out:
        raise StateError(f"{where}: refused all {refused:,} client tuple(s) of {vip}; first: {first}")
    if refused:
        log(f"refused {refused:,} of {refused + len(out):,} client tuple(s) of {vip} in {where}; first: {first}")
    return list(dict.fromkeys(out))


def parse_query(text: str, name: str) -> dict[str, str]:
    """host -> value from `attrd_updater --query --all` output (lines
    `name="N" host="H" value="V"`); lines of other names or another shape are skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines()[:1024]:       # a cluster has at most a few dozen nodes
        m = _QUERY_RE.match(line.strip())
        if m and m.group(1) == name and m.group(3):
            out[m.group(2)] = m.group(3)
    return out


# -- attrd ------------------------------------------------------------------------------
def attrd_present() -> bool:
    """Is Pacemaker's attribute daemon reachable from here? Its libqb IPC server
    is an abstract unix socket named after it ("@attrd-..."), in this network
    namespace: no process is run to find out."""
    try:
        with open("/proc/net/unix", "rb") as f:
            return any(b"@attrd" in line for line in f)
    except OSError:
        return False


class Attrd:
    """attrd_updater, bounded in time; every failure is a StateError with its stderr."""

    def __init__(self, log: Callable[[str], None] = _stderr, timeout: float = ATTRD_TIMEOUT_S):
        self.log, self.timeout = log, timeout

    def _run(self, *argv: str) -> str:
        try:
            res = subprocess.run(["attrd_updater", *argv], capture_output=True, text=True, timeout=self.timeout,
                                 stdin=subprocess.DEVNULL, env={**os.environ, "PATH": ATTRD_PATH})
        except FileNotFoundError:
            raise StateError("attrd_updater not found (install pacemaker-cli-utils)") from None
        except subprocess.TimeoutExpired:
            raise StateError(f"attrd_updater {argv[0]} did not answer in {self.timeout:g} s") from None
        if res.returncode != 0:
            msg = " ".join((res.stderr or res.stdout).split())[:200]
            raise StateError(f"attrd_updater {argv[0]} exited {res.returncode}: {msg}")
        return res.stdout

    def peers(self) -> list[str]:
        """The other cluster members (crm_node -l, minus crm_node -n)."""
        try:
            res = subprocess.run(["crm_node", "-n"], capture_output=True, text=True, timeout=self.timeout,
                                 stdin=subprocess.DEVNULL, env={**os.environ, "PATH": ATTRD_PATH})
            me = res.stdout.strip()
            res = subprocess.run(["crm_node", "-l"], capture_output=True, text=True, timeout=self.timeout,
                                 stdin=subprocess.DEVNULL, env={**os.environ, "PATH": ATTRD_PATH})
        except (OSError, subprocess.TimeoutExpired) as e:
            raise StateError(f"crm_node: {e}") from None
        out = []
        for line in res.stdout.splitlines()[:256]:
            f = line.split()
            if len(f) >= 3 and f[2] == "member" and f[1] != me and _NODE_RE.match(f[1]):
                out.append(f[1])
        return out

    def publish(self, vip: str, keys, peers: list[str] | None = None) -> int:
        """Publish under each other node's name: attrd drops a node's own values
        when the node is lost, so a list kept under the peer's name is still
        there for the peer after this node crashes (measured: bench_attrd.py)."""
        value, n = encode(keys)
        total = len({(k.vport, k.client, k.cport) for k in keys})
        if n < total:
            self.log(f"published {n:,} of {total:,} client tuple(s) of {vip} to attrd: the value is capped "
                     f"at {MAX_VALUE_CHARS:,} characters (one command-line argument)")
        targets = self.peers() if peers is None else peers
        if not targets:
            raise StateError(f"no other cluster member to publish the clients of {vip} for (crm_node -l)")
        # One peer attrd_updater failed for must not cost the others their copy.
        failed = []
        for node in targets:
            try:
                self._run("--private", "--name", attr_name(vip), "--node", node, "--update", value)
            except StateError as e:
                failed.append(f"for {_short(node, 40)}: {e}")
        if failed:
            raise StateError(f"published the clients of {vip} for {len(targets) - len(failed)} of "
                             f"{len(targets)} node(s); " + "; ".join(failed[:3]))
        return n

    def values(self, vip: str) -> dict[str, str]:
        """host -> published value, every node's (this one's too). An attribute
        nobody has set yet is no list, not an error (attrd_updater exits non-zero
        with "Could not query value")."""
        name = attr_name(vip)
        try:
            return parse_query(self._run("--query", "--all", "--name", name), name)
        except StateError as e:
            if "Could not query value" in str(e):
                return {}
            raise

    def read(self, vip: str, max_entries: int = MAX_CLIENTS_PER_VIP) -> list[FlowKey]:
        """The union of every node's published list (each validated; a bad node's
        value is refused in one line and the others are still read)."""
        out: dict[FlowKey, None] = {}
        for host, value in self.values(vip).items():
            where = f"attrd {attr_name(vip)} of node {_short(host, 40)}"
            try:
                out.update(dict.fromkeys(decode(value, vip, where, self.log, max_entries)))
            except StateError as e:
                self.log(str(e))
        return list(out)[:max_entries]


class AttrdStateDir(StateDir):
    """A state dir whose client lists are also published to, and read back from,
    attrd. Pending files stay in the dir (they are this node's alone)."""
    backend = "attrd"

    def __init__(self, *args, attrd: Attrd | None = None, **kw):
        super().__init__(*args, **kw)
        self.attrd = attrd or Attrd(log=self.log)
        self.merge_own = False       # post-stop: add to what the stop published, do not replace it

    def write_clients(self, vip: str, keys) -> int:
        keys = set(keys)
        try:
            n = super().write_clients(vip, keys)
        except StateError as e:        # the dir failing must not stop the publish
            self.log(str(e))
            n = 0
        if not keys:
            return n       # nothing found (kernel nfsd closed its sockets): keep what was published
        peers = self.attrd.peers()
        if self.merge_own:
            # What this node published for its peers (the agent's stop, before
            # the address went) plus what is found now.
            try:
                values = self.attrd.values(vip)
                for host in peers:
                    if host in values:
                        keys.update(decode(values[host], vip, f"attrd {attr_name(vip)} for node {host}", self.log))
            except StateError as e:
                self.log(f"{e}; publishing what is found now only")
        return max(n, self.attrd.publish(vip, keys, peers))

    def read_clients(self, vip: str) -> list[FlowKey]:
        out: dict[FlowKey, None] = {}
        errors = []
        for read in (super().read_clients, lambda v: self.attrd.read(v, self.max_entries)):
            try:
                out.update(dict.fromkeys(read(vip)))
            except StateError as e:    # one source failing must not lose the other
                errors.append(e)
        if len(errors) == 2:     # neither source could be read
            raise errors[0]
        for e in errors:
            self.log(str(e))
        return list(out)[: self.max_entries]


def choose(backend: str) -> str:
    """The backend `auto` resolves to here."""
    if backend not in BACKENDS:
        raise StateError(f"store {_short(backend)} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "attrd" if attrd_present() else "dir"
    return backend


def open_store(backend: str, path: str, **kw) -> StateDir:
    """A StateDir (dir) or AttrdStateDir (attrd) at `path`."""
    cls = AttrdStateDir if choose(backend) == "attrd" else StateDir
    return cls(path, **kw)


def describe(backend: str = "auto", vips=(), log: Callable[[str], None] | None = None) -> dict:
    """For `doctor`: which backend is active here, the peers it publishes for,
    and per VIP which nodes' lists are visible from here (and how many tuples)."""
    notes: list[str] = []
    say = log if log is not None else notes.append
    try:
        active = choose(backend)
    except StateError as e:
        return {"backend": None, "ok": False, "why": str(e)}
    out: dict = {"backend": active, "asked": backend, "attrd_running": attrd_present(), "vips": {}}
    if active == "dir":
        out["ok"] = True
        out["why"] = ("state dir only: failovers need it on storage both heads share; "
                      "failbacks work with a local one" + ("" if backend == "dir" else
                                                           " (no Pacemaker attribute daemon reachable here)"))
        return out
    a = Attrd(log=say)
    try:
        out["peers"] = a.peers()
    except StateError as e:
        out.update(ok=False, why=f"attrd backend, but the cluster's members are unknown: {e}")
        return out
    out["ok"] = bool(out["peers"])
    out["why"] = (f"attrd: lists are published for {', '.join(out['peers'])}" if out["peers"]
                  else "attrd: no other cluster member online to publish for")
    for vip in vips:
        try:
            values = a.values(vip)
        except StateError as e:
            out["vips"][vip] = {"error": str(e)}
            continue
        row = {}
        for host, value in values.items():
            try:
                row[host] = len(decode(value, vip, f"attrd {attr_name(vip)} of node {host}", say))
            except StateError as e:
                row[host] = f"refused: {e}"
        out["vips"][vip] = row
    if notes:
        out["notes"] = notes
    return out
