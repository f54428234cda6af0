"""What the lab measured, and how it is shown: pure data and formatting, no I/O.

Definitions (all times CLOCK_MONOTONIC seconds):

- stall: the longest gap between two consecutive replies the client received,
  from its last reply before `ip addr del` to its first reply after the VIP
  was usable on the new owner. A move recovered when that first reply came
  and the stall is at most the cap; otherwise the stall is shown as ">CAP s"
  and in JSON as `"recovered": false, "stall": null, "cap": CAP`.
- usable -> first reply: from the moment the new owner's address left
  DAD/tentative state to the client's first reply after it; the part of the
  stall a remedy can remove (the rest is the move itself).
- stop / start: wall time of the mover's stop action on the old owner and
  start action on the new one (for the agent movers, the agent process from
  exec to exit; remedy hooks are not in it).
"""
from __future__ import annotations

import dataclasses
import json
from bisect import bisect_left, bisect_right
from typing import Iterable

FAMILY_LABEL = {4: "IPv4", 6: "IPv6"}


@dataclasses.dataclass
class HookTiming:
    phase: str          # "start", "failover", "failback", "setup", "teardown"
    hook: str           # "setup", "post_stop", "pre_start", "post_start", "teardown"
    node: str | None
    seconds: float
    error: str | None = None


@dataclasses.dataclass
class DirectionResult:
    """One move of the VIP, old owner -> new owner."""
    direction: str                          # "failover" (node1->node2) or "failback"
    old: str
    new: str
    cap: float
    recovered: bool
    stall: float | None                     # None when not recovered
    usable_to_first_reply: float | None
    del_to_usable: float | None = None      # the move itself: gap + DAD
    stale: list[str] = dataclasses.field(default_factory=list)   # ss lines on the old owner afterwards
    client_events: list[str] = dataclasses.field(default_factory=list)
    stop_s: float | None = None             # the mover's stop action on the old owner
    start_s: float | None = None            # the mover's start action on the new owner

    def stall_text(self) -> str:
        return f"{self.stall:.3f} s" if self.recovered and self.stall is not None else f">{_num(self.cap)} s"


@dataclasses.dataclass
class FamilyResult:
    """One lab run: one family, one remedy, a failover and a failback."""
    family: int
    remedy: str
    vip: str
    client_port: int | None = None
    failover: DirectionResult | None = None
    failback: DirectionResult | None = None
    hook_timings: list[HookTiming] = dataclasses.field(default_factory=list)
    error: str | None = None
    mover: str = "ip"                       # what moved the VIP: lab.mover.MOVERS
    first_start_s: float | None = None      # the start action that first brought the VIP up on node1
    server: str = "sim"                     # what the heads run: lab.run.SERVERS
    vers: str = "echo"                      # what the client speaks: lab.run.VERSIONS
    server_start_s: float | None = None     # heads launched -> both listening (Ganesha)
    cluster: dict | None = None             # Pacemaker movers: {"crash", "cold_start_s", "rejoin_s"}
    state: str = "shared"                   # nfsreset state dir: lab.run.STATES

    @property
    def stale_after_failover(self) -> list[str]:
        return self.failover.stale if self.failover else []


def measure(replies: list[float], t_del: float, t_usable: float | None, cap: float) -> tuple[bool, float | None, float | None]:
    """(recovered, stall, usable_to_first_reply) from sorted reply times of one move.

    The stall window opens at the last reply at or before the delete (the
    delete itself if there was none) and closes at the first reply after the
    address became usable. Replies inside the window (an IPv6 old owner can
    still send from a deleted address) split it; the longest piece counts.
    """
    i = bisect_right(replies, t_del)
    opened = replies[i - 1] if i else t_del
    if t_usable is None:
        return False, None, None
    j = bisect_right(replies, t_usable)
    if j >= len(replies):
        return False, None, None
    closed = replies[j]
    points = [opened] + replies[i:j + 1]
    stall = max(b - a for a, b in zip(points, points[1:]))
    if stall > cap:
        return False, None, None
    return True, stall, closed - t_usable


def replies_between(replies: list[float], start: float, end: float) -> list[float]:
    return replies[bisect_left(replies, start):bisect_right(replies, end)]


def parse_ss_line(line: str) -> tuple[str, str, int, str, int] | None:
    """`ss -tan` line -> (state, local ip, local port, peer ip, peer port); None if not one.

    Addresses come back normalised (nfsreset.core.model.norm_ip): brackets and
    v4-mapped prefixes gone, so they compare with the lab's VIP constants.
    """
    from nfsreset.core.model import norm_ip

    fields = line.split()
    if len(fields) < 5 or not fields[1].isdigit():
        return None
    try:
        lhost, _, lport = fields[3].rpartition(":")
        phost, _, pport = fields[4].rpartition(":")
        local = norm_ip(lhost.split("%")[0])
        peer = norm_ip(phost.split("%")[0]) if phost not in ("*", "0.0.0.0", "[::]") else phost
        return fields[0], local, int(lport), peer, int(pport) if pport.isdigit() else 0
    except ValueError:
        return None


# -- text ----------------------------------------------------------------------------
def _num(x: float) -> str:
    return f"{x:g}"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


def _cells(run: FamilyResult) -> list[tuple[str, str]]:
    if run.error:
        return [("failover stall", "error"), ("failback stall", "error"),
                ("VIP usable -> 1st reply", "-"), ("stale sockets, old owner", "-"),
                ("error", run.error)]
    fo, fb = run.failover, run.failback
    rows = [
        ("failover stall", fo.stall_text() if fo else "-"),
        ("failback stall", fb.stall_text() if fb else "-"),
        ("usable -> 1st reply fo/fb", f"{_secs(fo.usable_to_first_reply if fo else None)} / "
                                      f"{_secs(fb.usable_to_first_reply if fb else None)}"),
        ("stale sockets fo/fb", f"{len(fo.stale) if fo else '-'} / {len(fb.stale) if fb else '-'}"),
    ]
    if run.mover != "ip" and fo and fb:
        rows.append(("stop / start fo", f"{_secs(fo.stop_s)} / {_secs(fo.start_s)}"))
        rows.append(("stop / start fb", f"{_secs(fb.stop_s)} / {_secs(fb.start_s)}"))
    if run.cluster:
        rows.append(("cluster start / rejoin", f"{_secs(run.cluster.get('cold_start_s'))} / "
                                               f"{_secs(run.cluster.get('rejoin_s'))}"))
        if run.cluster.get("crash"):
            rows.append(("failover by", "crash of node1"))
    if run.remedy != "none" and run.hook_timings:
        slow = max(run.hook_timings, key=lambda h: h.seconds)
        rows.append(("slowest hook", f"{slow.seconds:.3f} s {slow.hook}@{slow.node or '-'}"))
    failed = [h for h in run.hook_timings if h.error]
    if failed:
        first = " ".join(f"{failed[0].hook}: {failed[0].error}".split())
        rows.append(("hook errors", f"{len(failed)} ({first[:70]}{'...' if len(first) > 70 else ''})"))
    return rows


MOVED_BY = {
    "ip": "VIP moved like IPaddr2 (del, {gap} s gap, add, DAD, announce)",
    "ipaddr2": "VIP moved by the real IPaddr2 agent (stop, {gap} s gap, start)",
    "ocf": "VIP moved by the real IPaddr2nfs agent with nfsreset (stop, {gap} s gap, start)",
    "pacemaker": "VIP (ocf:heartbeat:IPaddr2) moved by Pacemaker: crm_resource --move, --clear",
    "pacemaker-ocf": "VIP (ocf:nfsreset:IPaddr2nfs) moved by Pacemaker: crm_resource --move, --clear",
}


def column(run: FamilyResult, several_movers: bool, several_remedies: bool, several_vers: bool = False) -> str:
    """A run's column heading: the remedy ("none", "hooks"), the mover ("ipaddr2",
    "ocf"), or "mover+remedy" when both say something; "v3 " etc. in front when
    NFS versions are compared."""
    parts = [run.mover] if several_movers or run.mover != "ip" else []
    if several_remedies or run.remedy != "none" or not parts:
        parts.append(run.remedy)
    return (f"v{run.vers} " if several_vers else "") + "+".join(parts)


def server_line(runs: list[FamilyResult]) -> str:
    """What answered the client: the sim server or Ganesha (with its start cost)."""
    texts = []
    for server in dict.fromkeys(r.server for r in runs):
        mine = [r for r in runs if r.server == server]
        if server == "ganesha":
            vers = ", ".join(f"NFSv{v}" for v in dict.fromkeys(r.vers for r in mine))
            starts = [r.server_start_s for r in mine if r.server_start_s is not None]
            cost = f", both listening {min(starts):.2f}-{max(starts):.2f} s after launch" if starts else ""
            texts.append(f"NFS-Ganesha on both heads{cost}; client: {vers} GETATTR, replies NFS_OK")
        elif server == "sim":
            texts.append("sim server (keeps its sockets like nfsd); client: record echo")
        elif server == "sim-nfsd":
            texts.append("sim server closing the sockets of a deleted address (like kernel nfsd >= 4.5); "
                         "client: record echo")
        else:
            texts.append(f"{server} server")
    return "server: " + "; ".join(texts)


STATE_WORDS = {"per-head": "one per head (as on two real machines: a head knows only the clients it served)",
               "shared": "one dir both heads see (the new owner knows the old owner's clients)"}


def uses_state(run: FamilyResult) -> bool:
    """Whether nfsreset ran in this run, so its state dir mattered."""
    return run.remedy != "none" or run.mover in ("ocf", "pacemaker-ocf")


def showcase_note(runs: list[FamilyResult], cap: float) -> str:
    """What the default `nfsreset lab` table says, in a sentence per family:
    the baseline's failback against nfsreset's first reply after usable."""
    out = []
    for fam in dict.fromkeys(r.family for r in runs):
        base = next((r for r in runs if r.family == fam and not uses_state(r)), None)
        fix = next((r for r in runs if r.family == fam and uses_state(r)), None)
        if base is None or fix is None:
            continue
        label = FAMILY_LABEL.get(fam, str(fam))
        if base.error or base.failback is None:
            said = f"the baseline run failed ({base.error})"
        elif base.failback.recovered:
            said = f"without nfsreset the failback stalled {base.failback.stall_text()}"
        else:
            n = len(base.failback.stale)
            said = (f"without nfsreset the failback got no reply within {_num(cap)} s "
                    f"({n} stale socket{'s' if n != 1 else ''} on the old owner)")
        if fix.error or fix.failback is None:
            fixed = f"the nfsreset run failed ({fix.error})"
        elif fix.failback.recovered:
            fixed = (f"with nfsreset the first reply came {_secs(fix.failback.usable_to_first_reply)} after "
                     f"the VIP was usable (failover {_secs(fix.failover.usable_to_first_reply if fix.failover else None)})")
        else:
            fixed = f"with nfsreset the failback got no reply within {_num(cap)} s either"
        out.append(f"{label}: {said}; {fixed}.")
    return "\n".join(out)


def _delay_words(runs: list[FamilyResult], mover: str) -> str:
    """What a Pacemaker run seeded with a stop delay does between stop and start, in words."""
    delays = {(r.cluster or {}).get("stop_delay_s") for r in runs if r.mover == mover} - {None}
    return f" (VIP stop, then {', '.join(_num(d) for d in sorted(delays))} s Delay stop, then start)" if delays else ""


def format_text(runs: list[FamilyResult], cap: float, gap: float, user_timeout: float) -> str:
    """Side-by-side table: one column per remedy (or mover), one block of rows per family."""
    movers = list(dict.fromkeys(r.mover for r in runs))
    several_movers = len(movers) > 1
    several_remedies = len({r.remedy for r in runs}) > 1
    several_vers = len({r.vers for r in runs}) > 1
    remedies = list(dict.fromkeys(column(r, several_movers, several_remedies, several_vers) for r in runs))
    families = list(dict.fromkeys(r.family for r in runs))
    by_key = {(column(r, several_movers, several_remedies, several_vers), r.family): r for r in runs}
    moved = [MOVED_BY.get(m, f"VIP moved by {m}").format(gap=_num(gap)) + _delay_words(runs, m) for m in movers]
    if several_movers:
        moved = [f"{m}: {text}" for m, text in zip(movers, moved)]
    out = [
        f"{'; '.join(moved)}; client TCP_USER_TIMEOUT {_num(user_timeout)} s; cap {_num(cap)} s",
        "stall = longest gap between client replies across the move; "
        f">{_num(cap)} s = no reply within the cap",
        "",
    ]
    if any(r.server != "sim" for r in runs):
        out.insert(2, server_line(runs))
    if any(uses_state(r) for r in runs):
        states = [STATE_WORDS.get(st, st) for st in dict.fromkeys(r.state for r in runs if uses_state(r))]
        out.insert(2, "nfsreset state dir: " + "; ".join(states))
    if any(m != "ip" for m in movers):
        out.insert(2, "stop / start = wall time of the agent's stop on the old owner / start on the new one")
    table: list[list[str]] = [["", ""] + remedies]
    for fam in families:
        label = FAMILY_LABEL.get(fam, str(fam))
        block: dict[str, list[str]] = {}
        for col, rem in enumerate(remedies):
            run = by_key.get((rem, fam))
            for name, value in (_cells(run) if run else []):
                block.setdefault(name, [""] * len(remedies))[col] = value
        for k, (name, values) in enumerate(block.items()):
            table.append([label if k == 0 else "", name] + values)
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    for row in table:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    stale = [(r, d) for r in runs for d in (r.failover, r.failback) if d and d.stale]
    if stale:
        out += ["", "Stale sockets left on the old owner after the move (ss -tan, VIP side):"]
        for run, d in stale:
            for line in d.stale:
                out.append(f"  {column(run, several_movers, several_remedies, several_vers):<{max(len(x) for x in remedies)}}  "
                           f"{FAMILY_LABEL.get(run.family, run.family)} {d.direction:<8} {d.old}: {line}")
    return "\n".join(out)


# -- JSON ------------------------------------------------------------------------------
def _ms(x: float | None) -> float | None:
    return None if x is None else round(float(x), 3)


def direction_json(d: DirectionResult | None) -> dict | None:
    if d is None:
        return None
    return {
        "old": d.old,
        "new": d.new,
        "recovered": d.recovered,
        "stall": _ms(d.stall) if d.recovered else None,
        "cap": _ms(d.cap),
        "usable_to_first_reply": _ms(d.usable_to_first_reply),
        "del_to_usable": _ms(d.del_to_usable),
        "stale_sockets": list(d.stale),
        "client_events": list(d.client_events),
        "stop_s": _ms(d.stop_s),
        "start_s": _ms(d.start_s),
    }


def run_json(r: FamilyResult) -> dict:
    return {
        "family": r.family,
        "remedy": r.remedy,
        "mover": r.mover,
        "server": r.server,
        "vers": r.vers,
        "state": r.state,
        "server_start_s": _ms(r.server_start_s),
        "vip": r.vip,
        "client_port": r.client_port,
        "error": r.error,
        "first_start_s": _ms(r.first_start_s),
        "cluster": ({k: (_ms(v) if isinstance(v, float) else v) for k, v in r.cluster.items()}
                    if r.cluster else None),
        "failover": direction_json(r.failover),
        "failback": direction_json(r.failback),
        "hook_timings": [
            {"phase": h.phase, "hook": h.hook, "node": h.node, "seconds": _ms(h.seconds), "error": h.error}
            for h in r.hook_timings
        ],
    }


def to_json_obj(runs: Iterable[FamilyResult], cap: float, gap: float, user_timeout: float,
                strategy: str | None = None) -> dict:
    runs = list(runs)
    return {
        "settings": {
            "cap": _ms(cap),
            "gap": _ms(gap),
            "user_timeout": _ms(user_timeout),
            "strategy": strategy,
            "families": list(dict.fromkeys(r.family for r in runs)),
            "remedies": list(dict.fromkeys(r.remedy for r in runs)),
            "movers": list(dict.fromkeys(r.mover for r in runs)),
            "servers": list(dict.fromkeys(r.server for r in runs)),
            "versions": list(dict.fromkeys(r.vers for r in runs)),
            "states": list(dict.fromkeys(r.state for r in runs)),
        },
        "runs": [run_json(r) for r in runs],
    }


def format_json(runs: Iterable[FamilyResult], cap: float, gap: float, user_timeout: float,
                strategy: str | None = None) -> str:
    return json.dumps(to_json_obj(runs, cap, gap, user_timeout, strategy), indent=2)
