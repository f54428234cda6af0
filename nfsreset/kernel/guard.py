"""nftables adapter: the guard for stale 4-tuples and the quarantine of a departed VIP.

Everything lives in one table, `inet nfsreset`, that we own: created on demand,
deleted when nothing is left in it. Documents go through libnftables' JSON API
(python3-nftables), built the way firewalld's nftables backend builds them
(the table as `nft list` shows it: docs/internals.md).

Guard: the ladder's last rung (after SOCK_DESTROY and the exact RST). It resets
the client's non-SYN, non-RST segments of a stale 4-tuple, keyed as they arrive
(client . cport . vip . vport); the client's first SYN deletes the element in the
kernel, and its RST to the challenge ACK kills the stale socket.
Quarantine: while a VIP is away nothing leaves from it (IPv6 keeps sending from a
deleted address); the fib test lifts it by itself once the VIP is local again.
Why each piece is so, with what was measured: docs/internals.md, "The nft table".
"""
from __future__ import annotations

import fcntl
import functools
import os
import socket
import threading
from typing import Iterable

from nfsreset.kernel import netns
from nfsreset.core.model import FlowKey, family_of, norm_ip

TABLE = "nfsreset"
FAMILY = "inet"
STALE_SETS = {4: "stale4", 6: "stale6"}
QUARANTINE_SETS = {4: "quarantine4", 6: "quarantine6"}
GUARD_CHAIN = "guard"
QUARANTINE_CHAIN = "quarantine"
# Before the usual filter chains: a user's `drop` there would otherwise keep
# the client's SYN from reaching our element-deleting rule.
GUARD_PRIORITY = -10
QUARANTINE_PRIORITY = 0
# Upper bound of elements per stale set (nft would pick 65535 for a set that a
# rule writes to; the kernel refuses additions beyond it with ENFILE).
STALE_SET_SIZE = 65536
DEFAULT_TIMEOUT_S = 120

_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_L3 = {4: "ip", 6: "ip6"}
_METAINFO = {"metainfo": {"json_schema_version": 1}}
_NETLINK_NETFILTER = 12
_SIOCGSKNS = 0x894C


class GuardError(Exception):
    """One line: what we tried and nft's own error text."""


# -- pure document builders ---------------------------------------------------

def document(commands: list[dict]) -> dict:
    return {"nftables": [_METAINFO, *commands]}


def _obj(**fields) -> dict:
    return {"family": FAMILY, "table": TABLE, **fields}


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _packet_tuple(family: int) -> dict:
    """client . cport . vip . vport, read from a packet arriving from the client."""
    l3 = _L3[family]
    return {"concat": [_payload(l3, "saddr"), _payload("tcp", "sport"),
                       _payload(l3, "daddr"), _payload("tcp", "dport")]}


def guard_rules(family: int, syn_delete: bool = True) -> list[dict]:
    name = STALE_SETS[family]
    reject = {"rule": _obj(chain=GUARD_CHAIN, comment=f"{name}: reset non-SYN non-RST", expr=[
        # (flags & (syn|rst)) == 0; before the lookup so the element counters
        # count only what is rejected.
        {"match": {"op": "!", "left": _payload("tcp", "flags"), "right": ["syn", "rst"]}},
        {"match": {"op": "==", "left": _packet_tuple(family), "right": f"@{name}"}},
        {"reject": {"type": "tcp reset"}},
    ])}
    rules = [reject]
    if syn_delete:
        rules.append({"rule": _obj(chain=GUARD_CHAIN, comment=f"{name}: first SYN ends the guard", expr=[
            # A pure SYN (not SYN-ACK): the client starts over on this tuple.
            {"match": {"op": "==", "left": {"&": [_payload("tcp", "flags"), ["syn", "rst", "ack"]]},
                       "right": "syn"}},
            {"set": {"op": "delete", "elem": _packet_tuple(family), "set": f"@{name}"}},
        ])})
    return rules


# `fib saddr type != local`: the source is not (or no longer, or not yet: IPv6
# DAD) a usable local address. As `nft -j list` prints a rule made by the CLI.
def not_local_source() -> dict:
    return {"match": {"op": "!=", "left": {"fib": {"result": "type", "flags": ["saddr"]}}, "right": "local"}}


def quarantine_rule(family: int) -> dict:
    name = QUARANTINE_SETS[family]
    return {"rule": _obj(chain=QUARANTINE_CHAIN, comment=f"{name}: VIP away, send nothing from it", expr=[
        {"match": {"op": "==", "left": _payload(_L3[family], "saddr"), "right": f"@{name}"}},
        # After the lookup: the fib lookup runs only for a quarantined source.
        not_local_source(),
        {"drop": None},
    ])}


def skeleton(syn_delete: bool = True, existing_sets: Iterable[str] = ()) -> list[dict]:
    """Commands that (re)create table, sets, chains and rules without losing elements.

    Sets already in the kernel are left out: nft marks a set `dynamic` when a
    rule writing to it is created in the same transaction, the kernel then
    refuses an `add set` with other flags (EEXIST), and nft 1.0.6's JSON
    parser does not know the flag "dynamic" to say it ourselves."""
    existing = set(existing_sets)
    cmds: list[dict] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
    for fam in (4, 6):
        addr = _ADDR_TYPE[fam]
        if STALE_SETS[fam] not in existing:
            cmds.append({"add": {"set": _obj(
                name=STALE_SETS[fam], type=[addr, "inet_service", addr, "inet_service"],
                flags=["timeout"], size=STALE_SET_SIZE, stmt=[{"counter": None}])}})
    for fam in (4, 6):
        if QUARANTINE_SETS[fam] not in existing:
            cmds.append({"add": {"set": _obj(name=QUARANTINE_SETS[fam], type=_ADDR_TYPE[fam])}})
    cmds.append({"add": {"chain": _obj(name=GUARD_CHAIN, type="filter", hook="input",
                                       prio=GUARD_PRIORITY, policy="accept")}})
    cmds.append({"add": {"chain": _obj(name=QUARANTINE_CHAIN, type="filter", hook="output",
                                       prio=QUARANTINE_PRIORITY, policy="accept")}})
    cmds.append({"flush": {"chain": _obj(name=GUARD_CHAIN)}})
    cmds.append({"flush": {"chain": _obj(name=QUARANTINE_CHAIN)}})
    for fam in (4, 6):
        cmds.extend({"add": r} for r in guard_rules(fam, syn_delete))
    for fam in (4, 6):
        cmds.append({"add": quarantine_rule(fam)})
    return cmds


# Thousands of keys share a handful of VIPs and clients: parse each address once.
_norm = functools.lru_cache(maxsize=4096)(norm_ip)


def stale_tuple(key: FlowKey) -> tuple[int, tuple]:
    """(family, (client, cport, vip, vport)) with normalised addresses; ValueError if mixed."""
    vip, client = _norm(key.vip), _norm(key.client)
    fam = family_of(vip)
    if family_of(client) != fam:
        raise ValueError(f"mixed address families in {key}")
    for port in (key.vport, key.cport):
        if not (isinstance(port, int) and 0 < port < 65536):
            raise ValueError(f"bad port in {key}")
    return fam, (client, key.cport, vip, key.vport)


def key_of(tup: tuple) -> FlowKey:
    client, cport, vip, vport = tup
    return FlowKey(vip=_norm(vip), vport=int(vport), client=_norm(client), cport=int(cport))


def group_stale(keys: Iterable[FlowKey]) -> dict[int, list[tuple]]:
    """Distinct tuples per family, in first-seen order."""
    out: dict[int, dict[tuple, None]] = {4: {}, 6: {}}
    for key in keys:
        fam, tup = stale_tuple(key)
        out[fam][tup] = None
    return {fam: list(tups) for fam, tups in out.items() if tups}


def add_stale_commands(by_family: dict[int, list[tuple]], timeout_s: int) -> list[dict]:
    if not (isinstance(timeout_s, int) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive int, not {timeout_s!r}")
    return [{"add": {"element": _obj(name=STALE_SETS[fam], elem=[
                {"elem": {"val": {"concat": list(t)}, "timeout": timeout_s}} for t in tups])}}
            for fam, tups in sorted(by_family.items()) if tups]


def delete_stale_commands(by_family: dict[int, list[tuple]]) -> list[dict]:
    return [{"delete": {"element": _obj(name=STALE_SETS[fam], elem=[{"concat": list(t)} for t in tups])}}
            for fam, tups in sorted(by_family.items()) if tups]


def quarantine_commands(vip: str, add: bool) -> list[dict]:
    vip = norm_ip(vip)
    return [{"add" if add else "delete": {"element": _obj(name=QUARANTINE_SETS[family_of(vip)], elem=[vip])}}]


def release_commands(stale_by_family: dict[int, list[tuple]], quarantined: Iterable[str]) -> list[dict]:
    """Delete these stale tuples and quarantine elements (all present), one transaction."""
    cmds = delete_stale_commands(stale_by_family)
    by_family: dict[int, list[str]] = {}
    for vip in sorted(norm_ip(v) for v in quarantined):
        by_family.setdefault(family_of(vip), []).append(vip)
    cmds += [{"delete": {"element": _obj(name=QUARANTINE_SETS[fam], elem=vips)}}
             for fam, vips in sorted(by_family.items())]
    return cmds


def delete_table_commands() -> list[dict]:
    # add+delete in one transaction: deletes the table if present, no ENOENT
    # if not (the idiom of firewalld's backend).
    table = {"table": {"family": FAMILY, "name": TABLE}}
    return [{"add": table}, {"delete": table}]


def list_table_commands() -> list[dict]:
    return [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]


# -- parsing `list table` output ------------------------------------------------

def _sets_in(output: dict) -> dict[str, list]:
    sets = {}
    for item in (output or {}).get("nftables", []):
        s = item.get("set")
        if s and s.get("table") == TABLE and s.get("family") == FAMILY:
            sets[s["name"]] = s.get("elem", [])
    return sets


def _elem_value_and_counter(elem) -> tuple[object, int]:
    if isinstance(elem, dict) and "elem" in elem:
        inner = elem["elem"]
        return inner.get("val"), int((inner.get("counter") or {}).get("packets", 0))
    return elem, 0


def parse_stale(output: dict) -> list[tuple[FlowKey, int]]:
    """(key, packets rejected) for every element of the stale sets."""
    sets = _sets_in(output)
    out = []
    for fam in (4, 6):
        for elem in sets.get(STALE_SETS[fam], []):
            val, packets = _elem_value_and_counter(elem)
            out.append((key_of(tuple(val["concat"])), packets))
    return sorted(out)


def parse_quarantined(output: dict) -> set[str]:
    sets = _sets_in(output)
    return {norm_ip(_elem_value_and_counter(e)[0]) for fam in (4, 6)
            for e in sets.get(QUARANTINE_SETS[fam], [])}


def set_names(output: dict) -> set[str]:
    return set(_sets_in(output))


def table_present(output: dict) -> bool:
    return any("table" in item for item in (output or {}).get("nftables", []))


def is_empty(output: dict) -> bool:
    return not any(_sets_in(output).values())


# -- talking to libnftables -------------------------------------------------------

def _socket_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                fds.add(int(name))
        except OSError:
            pass  # closed meanwhile, or the listing's own fd
    return fds


def _is_nfnetlink(fd: int) -> bool:
    try:
        s = socket.socket(fileno=os.dup(fd))  # family/proto read back by SO_DOMAIN/SO_PROTOCOL
    except OSError:
        return False
    try:
        return s.family == socket.AF_NETLINK and s.proto == _NETLINK_NETFILTER
    finally:
        s.close()


def socket_netns(fd: int) -> int:
    """Inode of the network namespace a socket belongs to (SIOCGSKNS)."""
    nsfd = fcntl.ioctl(fd, _SIOCGSKNS)
    try:
        return os.fstat(nsfd).st_ino
    finally:
        os.close(nsfd)


def _one_line(text: str) -> str:
    lines = [ln.split("Error:", 1)[-1].strip() for ln in text.splitlines() if ln.strip()]
    return "; ".join(dict.fromkeys(lines))[:400] or "no error text"


def open_context():
    """A libnftables context whose netlink socket is in this thread's netns (verified)."""
    try:
        import nftables
    except ImportError as e:
        raise GuardError(f"python3-nftables not available: {e}") from None
    here = netns.current_inode()
    before = _socket_fds()
    nft = nftables.Nftables()
    fresh = [fd for fd in sorted(_socket_fds() - before) if _is_nfnetlink(fd)]
    if not fresh:
        # A libnftables that opens its socket lazily would open it wherever
        # the first command happens to run: refuse rather than guess.
        raise GuardError("libnftables opened no netfilter socket in nft_ctx_new(); cannot pin its namespace")
    wrong = {socket_netns(fd) for fd in fresh} - {here}
    if wrong:
        raise GuardError(f"nft netlink socket is in netns {sorted(wrong)}, this thread is in {here}")
    nft.set_handle_output(False)
    return nft


class Guard:
    """The `inet nfsreset` table of the namespace this object was created in
    (libnftables opens its socket in nft_ctx_new(): create it inside
    netns.entered(...); afterwards any thread may use it)."""

    def __init__(self, dry_run: bool = False):
        self.dry_run = dry_run
        self.documents: list[dict] = []   # what dry_run would have sent
        # False when the kernel refused `delete @set` from a rule (before 5.19):
        # elements then last their timeout; no caller removes them early
        # (docs/internals.md, "Known limits").
        self.syn_delete = True
        self._lock = threading.Lock()
        self._nft = None if dry_run else open_context()
        self.netns_inode = netns.current_inode()

    # -- transport ---------------------------------------------------------
    def _send(self, commands: list[dict], what: str) -> dict:
        doc = document(commands)
        if self.dry_run:
            self.documents.append(doc)
            return {}
        with self._lock:
            rc, out, err = self._nft.json_cmd(doc)
        if rc != 0:
            raise GuardError(f"{what}: {_one_line(err)}")
        return out or {}

    def _list(self) -> dict:
        """`list table`, or {} when the table does not exist."""
        if self.dry_run:
            return {}
        with self._lock:
            rc, out, err = self._nft.json_cmd(document(list_table_commands()))
        if rc != 0:
            if "No such file or directory" in err:
                return {}
            raise GuardError(f"list table {FAMILY} {TABLE}: {_one_line(err)}")
        return out or {}

    def _change(self, commands: list[dict], what: str, listing: dict | None = None) -> None:
        """Send skeleton + commands as one transaction.

        Retried once with a fresh listing (another writer may have created a
        set meanwhile), then once without the SYN rule: kernels before 5.19
        have no NFT_DYNSET_OP_DELETE; there the guard still rejects, until the
        element times out (see syn_delete)."""
        if self.dry_run:
            self._send(skeleton(self.syn_delete) + commands, what)
            return
        if listing is None:
            listing = self._list()
        try:
            self._send(skeleton(self.syn_delete, set_names(listing)) + commands, what)
            return
        except GuardError as e:
            first = e
        existing = set_names(self._list())
        try:
            self._send(skeleton(self.syn_delete, existing) + commands, what)
            return
        except GuardError:
            if not self.syn_delete:
                raise first from None
        try:
            self._send(skeleton(False, existing) + commands, what)
        except GuardError:
            raise first from None
        self.syn_delete = False

    # -- guard -------------------------------------------------------------
    def add_stale(self, keys: Iterable[FlowKey], timeout_s: int = DEFAULT_TIMEOUT_S) -> int:
        """Guard these 4-tuples for timeout_s seconds. Returns how many were new
        (an element already present only has its timeout refreshed)."""
        by_family = group_stale(keys)
        commands = add_stale_commands(by_family, timeout_s)
        if not commands:
            return 0
        listing = self._list()
        present = {stale_tuple(k)[1] for k, _ in parse_stale(listing)}
        wanted = {t for tups in by_family.values() for t in tups}
        self._change(commands, f"add {len(wanted)} stale tuple(s)", listing)
        return len(wanted - present)

    def remove_stale(self, keys: Iterable[FlowKey]) -> int:
        """Stop guarding these 4-tuples; returns how many were guarded. Drops the
        table if nothing is left. Lists first: `delete element` of a missing
        element fails the whole transaction (`destroy element` is nft >= 1.0.8)."""
        wanted = {key_of(t) for tups in group_stale(keys).values() for t in tups}
        if self.dry_run:
            self._send(delete_stale_commands(group_stale(wanted)), "remove stale tuples")
            return len(wanted)
        for attempt in (1, 2):
            present = wanted & {k for k, _ in self.stale()}
            if not present:
                removed = 0
                break
            try:
                self._send(delete_stale_commands(group_stale(present)), f"remove {len(present)} stale tuple(s)")
                removed = len(present)
                break
            except GuardError:
                # An element timed out (or a SYN deleted it) between the list
                # and the delete: look again, once.
                if attempt == 2:
                    raise
        self.prune()
        return removed

    def stale(self) -> list[tuple[FlowKey, int]]:
        """Guarded tuples and how many segments of each were rejected."""
        return parse_stale(self._list())

    # -- quarantine --------------------------------------------------------
    def quarantine(self, vip: str) -> None:
        self._change(quarantine_commands(vip, add=True), f"quarantine {vip}")

    def lift_quarantine(self, vip: str) -> None:
        vip = norm_ip(vip)
        if self.dry_run:
            self._send(quarantine_commands(vip, add=False), f"lift quarantine of {vip}")
            return
        if vip in self.quarantined():
            self._send(quarantine_commands(vip, add=False), f"lift quarantine of {vip}")
        self.prune()

    def quarantined(self) -> set[str]:
        return parse_quarantined(self._list())

    # -- lifecycle ---------------------------------------------------------
    def release(self, vips: Iterable[str]) -> tuple[int, int]:
        """Remove what belongs to these VIPs (their quarantine elements and the
        stale tuples on them), nothing else; drop the table if that emptied it.
        What a `watch` owns: the hooks' elements for other VIPs stay.
        Returns (stale tuples removed, quarantine elements removed)."""
        vips = {norm_ip(v) for v in vips}
        if self.dry_run:
            self._send(release_commands({}, sorted(vips)), f"release {', '.join(sorted(vips))}")
            return 0, len(vips)
        for attempt in (1, 2):
            listing = self._list()
            stale = [k for k, _ in parse_stale(listing) if k.vip in vips]
            quarantined = parse_quarantined(listing) & vips
            if not stale and not quarantined:
                break
            try:
                self._send(release_commands(group_stale(stale), quarantined),
                           f"release {len(stale)} stale tuple(s) and {len(quarantined)} quarantine(s)")
                break
            except GuardError:
                # An element timed out or a SYN deleted it since the listing: once more.
                if attempt == 2:
                    raise
        self.prune()
        return len(stale), len(quarantined)

    def remove_all(self) -> None:
        self._send(delete_table_commands(), f"delete table {FAMILY} {TABLE}")

    def prune(self) -> None:
        """Delete the table when no set holds an element (e.g. all timed out).

        Not atomic with respect to another writer adding an element between
        our list and our delete; nfsreset has one writer per namespace."""
        if self.dry_run:
            return
        listing = self._list()
        if table_present(listing) and is_empty(listing):
            self.remove_all()


def available() -> tuple[bool, str]:
    """Can we build our kind of table here (this thread's netns)? For `doctor`.

    Adds a scratch table with the same set types, reject, set-delete and fib
    rules (the skeleton, quarantine included), and deletes it in the same transaction: the kernel initialises every
    expression (loading modules) yet nothing is left behind."""
    probe = f"{TABLE}-probe-{os.getpid()}"
    try:
        nft = open_context()
    except GuardError as e:
        return False, str(e)
    cmds = []
    for c in skeleton(True):
        ((verb, body),) = c.items()
        ((kind, obj),) = body.items()
        obj = dict(obj)
        if kind == "table":
            obj["name"] = probe
        else:
            obj["table"] = probe
        cmds.append({verb: {kind: obj}})
    cmds.append({"delete": {"table": {"family": FAMILY, "name": probe}}})
    rc, _, err = nft.json_cmd(document(cmds))
    if rc != 0:
        return False, f"nftables refused our table: {_one_line(err)}"
    return True, ("nftables: inet table with concatenated timeout sets, reject and set-delete rules, "
                  "fib saddr type (self-lifting quarantine)")
