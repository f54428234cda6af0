"""Carry out a plan: the one place where the pure core meets the kernel adapters.

The loop is: dump -> plan -> act -> dump again -> re-plan what survived with the
rungs already tried excluded (the ladder: destroy, exact RST, nft guard), at
most one pass per rung. The adapters come as one interface
(nfsreset.adapters: the real `Kernel`, or a test's fakes) whose modules are
imported where used: `kill` and `tickle` run as fresh processes at the worst
moment of a failover, and their first destroy or packet must leave within
~0.1 s of exec.

Failure policy (docs/internals.md): every adapter call is caught. A failed
step is logged in one line, recorded in the Outcome with its reason, and the
plan goes on; a rung that failed outright (an exception, or every socket
refused) counts as tried and the next rung is planned at once, in the same
run. What this host lacks is learnt from the first refusal (Caps), never
probed up front. Any failed step makes the exit code 1 (3, refused for
safety, stays 3).
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import errno
import time
from collections.abc import Callable

from nfsreset.core import plan as P
from nfsreset.core.model import Flow, FlowKey, format_endpoint

TICKLE_POLL_S = 0.05    # how often a tickle run looks for reconnected clients
TICKLE_LINGER_S = 0.5   # after the last round, how long to wait for late reconnects
EXACT_RST_TIMEOUT_S = 2.0   # covers the probe repeats at 0, 0.55, 1.5 s (answers are rate-limited)
GUARD_TIMEOUT_S = 300   # a guard element outlives a failback; the stale socket dies on the client's RST

CAP_NAMES = {"destroy": "SOCK_DESTROY", "raw": "raw sockets", "nft": "nftables"}
# The capability each action needs; when it is found missing, the rest of the run does without.
NEEDS = {P.Quarantine: "nft", P.LiftQuarantine: "nft", P.GuardTuples: "nft", P.Destroy: "destroy",
         P.ExactRst: "raw", P.Announce: "raw", P.Tickle: "raw"}
RUNG_OF = {P.Destroy: "destroy", P.ExactRst: "rst", P.GuardTuples: "nft"}


class Kind(enum.Enum):
    """What a step was; the value is its `action` in --json."""
    RECORD = "record"
    QUARANTINE = "quarantine"
    LIFT = "lift-quarantine"
    DESTROY = "destroy"
    RST = "rst"
    GUARD = "guard"
    DEFER = "defer"
    ANNOUNCE = "announce"
    TICKLE = "tickle"
    VERIFY = "verify"
    # Observations: a step only when they fail.
    ADDRESSES = "addresses"
    DUMP = "dump"
    PENDING = "pending"
    PRUNE = "prune"


# One dataclass for every kind, not one per kind: each dataclass costs ~0.3 ms
# of import on the hooks' path. Fields a kind does not use stay None and are
# left out of --json.
@dataclasses.dataclass(eq=False)
class Step:
    """One thing the engine did or tried. `error`: why it failed (one line), None if it did not."""
    kind: Kind
    vip: str | None = None
    sessions: list[Flow] | None = None   # the flows themselves; dicts only for --json
    clients: int | None = None           # record: tuples given
    written: int | None = None           # record: tuples written
    destroyed: int | None = None
    gone: int | None = None              # destroy: ENOENT (already dead)
    refused: list[str] | None = None     # destroy: errno names of refused sockets (--json: "failed")
    reset: int | None = None             # rst: RSTs sent
    tuples: int | None = None            # guard, tickle
    added: int | None = None             # guard: new elements
    timeout_s: int | None = None
    ifname: str | None = None
    sent: int | None = None              # tickle: ACKs sent
    rounds: int | None = None            # tickle (dry run)
    rate: int | None = None              # tickle: ACKs per second at most
    max_packets: int | None = None       # tickle: ACKs per call at most
    capped: bool | None = None           # tickle: stopped at max_packets
    reconnected: list[str] | None = None
    silent: list[str] | None = None
    left: int | None = None              # verify
    by: str | None = None                # verify: "acks" or "dump"
    ms: float | None = None
    error: str | None = None

    @property
    def action(self) -> str:
        return self.kind.value

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_json(self) -> dict:
        out = {"action": self.kind.value}
        for name, value in self.__dict__.items():
            if name == "kind" or value is None:
                continue
            if name == "sessions":
                value = [flow_json(f) for f in value]
            out["failed" if name == "refused" else name] = value
        return out


@dataclasses.dataclass
class Outcome:
    """What one run did, for the log lines, --json and the exit code."""
    moment: str
    vip: str
    dry_run: bool
    steps: list[Step] = dataclasses.field(default_factory=list)
    left: list[Flow] = dataclasses.field(default_factory=list)
    code: int = 0
    reason: str = ""
    lost: dict[str, str] = dataclasses.field(default_factory=dict)   # capability -> why it is missing
    started: float = dataclasses.field(default_factory=time.monotonic)

    def add(self, step: Step) -> Step:
        self.steps.append(step)
        return step

    @property
    def failed(self) -> list[Step]:
        return [s for s in self.steps if s.error is not None]

    def as_json(self) -> dict:
        return {"moment": self.moment, "vip": self.vip, "dry_run": self.dry_run, "exit": self.code,
                "reason": self.reason, "steps": [s.as_json() for s in self.steps],
                "failed": [s.action for s in self.failed], "unavailable": dict(self.lost),
                "left": [flow_json(f) for f in self.left],
                "elapsed_s": round(time.monotonic() - self.started, 4)}


def flow_json(f: Flow) -> dict:
    return {"vip": f.key.vip, "vport": f.key.vport, "client": f.key.client, "cport": f.key.cport,
            "state": f.state}


def describe(flows, limit: int = 8) -> str:
    parts = [f"{format_endpoint(f.key.client, f.key.cport)} {f.state}" for f in list(flows)[:limit]]
    more = len(flows) - limit
    return ", ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def why(e: BaseException) -> str:
    """One line for an exception: its text, and the errno name or the type."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        text = f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)})"
        return f"{text}: {e.filename}" if e.filename else text
    text = " ".join(str(e).split())[:300] or "no detail"
    # nfsreset's own exceptions are worded for the operator already.
    return text if type(e).__module__.startswith("nfsreset.") else f"{text} ({type(e).__name__})"


def denied(e: BaseException) -> bool:
    """The kernel said no for want of a privilege or a feature (EPERM, EACCES, EOPNOTSUPP),
    here or in what it wraps (RawSocketError keeps the PermissionError as its cause)."""
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OSError) and x.errno in (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP):
            return True
    return False


def _errname(err: int) -> str:
    return "EOPNOTSUPP" if err == errno.EOPNOTSUPP else errno.errorcode.get(err, str(err))


class Engine:
    """Acts for one VIP in the current thread's network namespace.

    adapters: an nfsreset.adapters.Adapters; by default the real one, made from
    `state` (a StateDir or None) and `guard` (a long-lived caller's one Guard:
    each libnftables context costs a netlink socket, and one opened while the
    process holds >= 1024 descriptors aborts it, docs/internals.md).
    """

    def __init__(self, opts: P.Options, *, adapters=None, state=None, dry_run: bool = False,
                 caps: P.Caps | None = None, log: Callable[[str], None] = lambda line: None, guard=None):
        if adapters is None:
            from nfsreset.adapters import Kernel
            adapters = Kernel(state=state, guard=guard)
        self.adapters = adapters
        self.opts = opts
        self.dry_run = dry_run
        self.caps = caps or P.Caps()
        self.log = log
        self._acked_all = False     # did the last destroy get 0/ENOENT for every socket?
        self._nft_used = False      # prune only where this run touched nftables
        # The daemon adds what a dump cannot know (first-seen times, sequence
        # numbers) from its BPF flow table.
        self.enrich: Callable[[list[Flow]], list[Flow]] | None = None

    # -- observation -------------------------------------------------------------------
    def dump(self, vip: str) -> list[Flow]:
        flows = self.adapters.dump(vip, self.opts.ports)
        return self.enrich(flows) if self.enrich else flows

    def local_addrs(self, vip: str) -> frozenset[str]:
        """What the kernel says is local: the address table, plus the VIPs of
        these options (and `vip`) that a FIB lookup finds local (a `local` route
        range: AnyIP, LVS-DR). One netlink round trip."""
        return self.adapters.local_addrs(self.opts.vips | {vip})

    # -- one moment ------------------------------------------------------------------------
    def run(self, moment: P.Moment, vip: str, *, known_clients=(), vip_since=None,
            old_cookies: frozenset[int] = frozenset()) -> Outcome:
        """Act for `vip` at `moment`. old_cookies: sockets known to predate the VIP here."""
        out = Outcome(moment.value, vip, self.dry_run)
        try:
            local = self.local_addrs(vip)
        except Exception as e:
            # Without the addresses configured here no socket may be touched (rule zero).
            self._fail(out, Step(Kind.ADDRESSES), "reading the addresses configured here", e,
                       going_on="nothing done")
            return self._conclude(out)
        pending = {}
        if moment is P.Moment.POST_START and self.adapters.state_path is not None:
            try:
                pending = self.adapters.read_pending(vip)
            except Exception as e:
                self._fail(out, Step(Kind.PENDING, vip=vip), f"reading the pending sessions of {vip}", e)
        try:
            flows = self.dump(vip)
        except Exception as e:
            self._fail(out, Step(Kind.DUMP, vip=vip), f"listing the sessions on {vip}", e)
            flows = []
        if pending:
            old_cookies = old_cookies | self._honoured_pending(vip, pending, flows, local, out)

        def replan(flows: list[Flow], tried: set[str]) -> list:
            return P.plan(moment, vip, flows, local, self.caps, self.opts, vip_since=vip_since,
                          known_clients=known_clients, tried=tried, old_cookies=old_cookies)

        tried: set[str] = set()
        deferred: list[Flow] = []
        for _ in range(4):   # one pass per rung at most
            actions = replan(flows, tried)
            refuse = next((a for a in actions if isinstance(a, P.Refuse)), None)
            if refuse is not None:
                out.code, out.reason = 3, refuse.reason
                return out
            stale = {f.cookie for f in flows if P.is_stale(f, local, vip_since, old_cookies)}
            targeted: list[Flow] = []
            rung = None
            unable: list[P.Unable] = []
            queue = collections.deque(actions)
            while queue:
                act = queue.popleft()
                if isinstance(act, P.DESTRUCTIVE):
                    acted = self._flows_of(act, flows)
                    if self._end(act, out):
                        targeted += acted
                        rung = RUNG_OF[type(act)]
                    else:
                        # Failed outright: the next rung now, before the rest of the plan
                        # (a tickle must not meet a stale socket that is still there).
                        tried.add(RUNG_OF[type(act)])
                        queue.extendleft(reversed(replan(acted, tried)))
                elif isinstance(act, P.Unable):
                    unable.append(act)
                else:
                    done = self._do(act, out, stale)
                    if isinstance(act, P.Defer):
                        (deferred if done else out.left).extend(act.flows)
            if unable:
                out.left += [f for a in unable for f in a.flows]
                out.code, out.reason = 1, unable[0].reason
                break
            if not targeted or self.dry_run or rung == "nft":
                break    # nft guards end sockets only when the client talks: nothing to verify now
            if rung == "destroy" and self._acked_all:
                # The kernel answered every SOCK_DESTROY with 0 (tcp_abort ran: the
                # socket is closed and unhashed) or ENOENT (already gone): that is
                # the check, per socket. A second dump would walk the whole
                # host-wide TCP hash again (~12 ms at 10,000 sockets).
                out.add(Step(Kind.VERIFY, left=0, sessions=[], by="acks"))
                break
            survivors = self._verify(vip, targeted, out)
            if survivors is None:
                out.left += targeted
                break
            if not survivors:
                break
            tried.add(rung)
            flows = survivors
        if (moment is P.Moment.POST_START and pending and not self.dry_run and out.code == 0
                and not out.left):
            try:
                self.adapters.clear_pending(vip)
            except Exception as e:
                self._fail(out, Step(Kind.PENDING, vip=vip), f"removing the pending sessions of {vip}", e)
        if self._nft_used and not self.dry_run and self.caps.nft:
            try:
                self.adapters.prune()
            except Exception as e:
                self._fail(out, Step(Kind.PRUNE), "removing the empty nft table", e)
        return self._conclude(out, deferred)

    def _conclude(self, out: Outcome, deferred: list[Flow] = ()) -> Outcome:
        """Exit 1 and one line of reason when a step failed; the steps' own lines said why."""
        failed = out.failed
        if not failed:
            return out
        out.code = max(out.code, 1)
        parts = [out.reason] if out.reason else []
        parts.append("failed: " + ", ".join(dict.fromkeys(s.action for s in failed)))
        if out.left:
            parts.append(f"{len(out.left)} session(s) on {out.vip} left: {describe(out.left)}")
        if deferred:
            parts.append(f"{len(deferred)} session(s) deferred to post-start: {describe(deferred)}")
        out.reason = "; ".join(parts)
        return out

    def _verify(self, vip: str, targeted: list[Flow], out: Outcome) -> list[Flow] | None:
        """The targeted flows still there; None when the dump failed (unknown)."""
        wanted = {f.cookie for f in targeted}
        try:
            left = [f for f in self.dump(vip) if f.cookie in wanted]
        except Exception as e:
            self._fail(out, Step(Kind.VERIFY, by="dump"), f"checking that the sessions on {vip} ended", e,
                       going_on="their fate is unknown")
            return None
        out.add(Step(Kind.VERIFY, left=len(left), sessions=list(left), by="dump"))
        if left:
            self.log(f"{len(left)} session(s) on {vip} survived: {describe(left)}")
        return left

    @staticmethod
    def _flows_of(act, flows: list[Flow]) -> list[Flow]:
        if isinstance(act, P.GuardTuples):
            keys = set(act.keys)
            return [f for f in flows if f.key in keys]
        return list(act.flows)

    # -- failures ------------------------------------------------------------------------------
    def _fail(self, out: Outcome, step: Step, what: str, e: BaseException, cap: str | None = None,
              going_on: str = "going on") -> None:
        """A step that raised. `cap` is turned off when the failure shows this host
        lacks it: for nftables any failure, for the others a refusal (denied())."""
        lose = cap if cap is not None and (cap == "nft" or denied(e)) else None
        self._failed(out, step, what, why(e), lose, going_on)

    def _failed(self, out: Outcome, step: Step, what: str, reason: str, lose: str | None = None,
                going_on: str = "going on") -> None:
        """Record a failed step and say so in one line: what, why, and that the run goes on."""
        step.error = reason
        out.add(step)
        if lose is not None and self._lose(lose, reason, out):
            going_on += f" without {CAP_NAMES[lose]}"
        self.log(f"{what} failed: {reason}; {going_on}")

    def _lose(self, cap: str, reason: str, out: Outcome) -> bool:
        """Plan the rest of this run without `cap`; False if it was off already."""
        if not getattr(self.caps, cap):
            return False
        self.caps = dataclasses.replace(self.caps, **{cap: False})
        out.lost[cap] = reason
        return True

    def _skipped(self, act, out: Outcome, cap: str) -> bool:
        """An action whose capability was found missing earlier in this run: a failed step."""
        if getattr(self.caps, cap):
            return False
        step = Step(_KIND_OF[type(act)], vip=getattr(act, "vip", None),
                    error=f"skipped: {CAP_NAMES[cap]} unavailable here ({out.lost.get(cap, 'not offered')})")
        if isinstance(act, (P.Destroy, P.ExactRst)):
            step.vip, step.sessions = None, list(act.flows)
            what = f"{step.action} of {len(act.flows)} session(s) on {act.flows[0].key.vip}"
        elif isinstance(act, P.GuardTuples):
            step.tuples = len(act.keys)
            what = f"guard of {len(act.keys)} stale tuple(s)"
        else:
            what = f"{step.action} of {step.vip}"
            if isinstance(act, P.Tickle):
                step.tuples, step.sent = len(act.keys), 0
        out.add(step)
        self.log(f"{what} {step.error}")
        return True

    # -- actions ------------------------------------------------------------------------------
    def _do(self, act, out: Outcome, stale_cookies: set[int]) -> bool:
        """One non-destructive action. False when it failed (already recorded and logged)."""
        need = NEEDS.get(type(act))
        if need is not None and self._skipped(act, out, need):
            return False
        dry = " (dry run)" if self.dry_run else ""
        ad = self.adapters
        if isinstance(act, P.Record):
            step = Step(Kind.RECORD, vip=act.vip, clients=len(act.keys), written=0)
            if ad.state_path is not None and not self.dry_run:
                try:
                    step.written = ad.write_clients(act.vip, act.keys)
                except Exception as e:
                    self._fail(out, step, f"record of {len(act.keys)} client tuple(s) of {act.vip} "
                               f"in {ad.state_path}", e)
                    return False
            out.add(step)
            if ad.state_path is not None:
                self.log(f"recorded {len(act.keys)} client tuple(s) of {act.vip} in {ad.state_path}{dry}")
        elif isinstance(act, P.Quarantine):
            step = Step(Kind.QUARANTINE, vip=act.vip)
            if not self.dry_run:
                self._nft_used = True
                try:
                    ad.quarantine(act.vip)
                except Exception as e:
                    self._fail(out, step, f"quarantine of {act.vip}", e, cap="nft")
                    return False
            out.add(step)
            self.log(f"quarantined {act.vip}: egress from it is dropped while it is away{dry}")
        elif isinstance(act, P.LiftQuarantine):
            step = Step(Kind.LIFT, vip=act.vip)
            if not self.dry_run:
                self._nft_used = True
                try:
                    if act.vip not in ad.quarantined():
                        return True
                    ad.lift_quarantine(act.vip)
                except Exception as e:
                    self._fail(out, step, f"lifting the quarantine of {act.vip}", e, cap="nft")
                    return False
            out.add(step)
            self.log(f"lifted the quarantine of {act.vip}{dry}")
        elif isinstance(act, P.Defer):
            step = Step(Kind.DEFER, vip=act.vip, sessions=list(act.flows))
            if ad.state_path is not None and not self.dry_run:
                try:
                    pend = ad.read_pending(act.vip)
                    pend.update({f.key: f.cookie for f in act.flows})
                    ad.write_pending(act.vip, pend)
                except Exception as e:
                    self._fail(out, step, f"deferring {len(act.flows)} session(s) on {act.vip} to post-start", e)
                    return False
            out.add(step)
            self.log(f"deferred {len(act.flows)} session(s) on {act.vip} to post-start "
                     f"(the strategy needs the VIP here): {describe(act.flows)}{dry}")
            if ad.state_path is None:
                out.code, out.reason = 1, "deferred sessions need --state-dir to be finished at post-start"
        elif isinstance(act, P.Announce):
            step = Step(Kind.ANNOUNCE, vip=act.vip, ifname="?")
            if not self.dry_run:
                try:
                    step.ifname = ad.announce(act.vip)
                except Exception as e:
                    self._fail(out, step, f"announce of {act.vip}", e, cap="raw")
                    return False
            out.add(step)
            self.log(f"announced {act.vip} on {step.ifname}{dry}")
        elif isinstance(act, P.Reconnected):
            out.add(Step(Kind.TICKLE, vip=act.vip, tuples=len(act.keys), sent=0,
                         reconnected=[format_endpoint(k.client, k.cport) for k in act.keys], silent=[]))
            self.log(f"{len(act.keys)} known client tuple(s) of {act.vip} already reconnected here, "
                     f"not tickled: {', '.join(format_endpoint(k.client, k.cport) for k in act.keys[:8])}"
                     + (f" (+{len(act.keys) - 8} more)" if len(act.keys) > 8 else ""))
        elif isinstance(act, P.Tickle):
            try:
                self._tickle(act, out, stale_cookies)
            except Exception as e:
                self._fail(out, Step(Kind.TICKLE, vip=act.vip, tuples=len(act.keys), sent=0),
                           f"tickle of {len(act.keys)} client tuple(s) of {act.vip}", e, cap="raw")
                return False
        return True

    def _end(self, act, out: Outcome) -> bool:
        """One rung. False when it failed outright: raised, or every socket was refused."""
        need = NEEDS[type(act)]
        if self._skipped(act, out, need):
            return False
        if isinstance(act, P.Destroy):
            return self._destroy(act, out)
        if isinstance(act, P.ExactRst):
            return self._exact_rst(act, out)
        return self._guard_tuples(act, out)

    def _destroy(self, act: P.Destroy, out: Outcome) -> bool:
        n, vip = len(act.flows), act.flows[0].key.vip
        if self.dry_run:
            out.add(Step(Kind.DESTROY, sessions=list(act.flows), destroyed=0))
            self.log(f"would destroy {n} session(s): {describe(act.flows)} (dry run)")
            return True
        t0 = time.monotonic()
        step = Step(Kind.DESTROY, sessions=list(act.flows), destroyed=0)
        try:
            acks = self.adapters.destroy(act.flows)
        except Exception as e:
            self._acked_all = False
            self._fail(out, step, f"destroy of {n} session(s) on {vip}", e, cap="destroy")
            return False
        ms = (time.monotonic() - t0) * 1000
        failed = acks.failed
        acked = set(acks.destroyed) | set(acks.gone)
        self._acked_all = not failed and all(f.cookie in acked for f in act.flows)
        names = [_errname(e) for _, e in failed]
        step.destroyed, step.gone, step.refused, step.ms = len(acks.destroyed), len(acks.gone), names, round(ms, 2)
        lacking = next((e for _, e in failed if e in (errno.EOPNOTSUPP, errno.EPERM)), None)
        if failed and len(failed) >= n:
            self._failed(out, step, f"destroy of {n} session(s) on {vip}",
                         f"the kernel refused every one ({', '.join(sorted(set(names)))})",
                         lose="destroy" if lacking is not None else None)
            return False
        if lacking is not None:
            self._lose("destroy", _errname(lacking), out)
        out.add(step)
        self.log(f"destroyed {len(acks.destroyed)} of {n} session(s) on {vip} "
                 f"in {ms:.1f} ms: {describe(act.flows)}"
                 + (f"; {len(failed)} failed ({names[0]})" if failed else ""))
        return True

    def _exact_rst(self, act: P.ExactRst, out: Outcome) -> bool:
        n = len(act.flows)
        if self.dry_run:
            out.add(Step(Kind.RST, sessions=list(act.flows), reset=0))
            self.log(f"would reset {n} session(s) by exact RST: {describe(act.flows)} (dry run)")
            return True
        t0 = time.monotonic()
        try:
            ok = self.adapters.exact_rst(act.flows, EXACT_RST_TIMEOUT_S)
        except Exception as e:
            self._fail(out, Step(Kind.RST, sessions=list(act.flows), reset=0),
                       f"exact RST of {n} session(s) on {act.flows[0].key.vip}", e, cap="raw")
            return False
        ms = (time.monotonic() - t0) * 1000
        out.add(Step(Kind.RST, sessions=list(act.flows), reset=ok, ms=round(ms, 1)))
        self.log(f"reset {ok} of {n} session(s) by exact-sequence RST in {ms:.0f} ms: "
                 f"{describe(act.flows)}")
        return True

    def _guard_tuples(self, act: P.GuardTuples, out: Outcome) -> bool:
        dry = " (dry run)" if self.dry_run else ""
        step = Step(Kind.GUARD, tuples=len(act.keys), added=0, timeout_s=GUARD_TIMEOUT_S)
        if not self.dry_run:
            self._nft_used = True
            try:
                step.added = self.adapters.add_stale(act.keys, GUARD_TIMEOUT_S)
            except Exception as e:
                self._fail(out, step, f"guard of {len(act.keys)} stale tuple(s)", e, cap="nft")
                return False
        out.add(step)
        self.log(f"guarded {len(act.keys)} stale tuple(s): their non-SYN segments get a reset "
                 f"for up to {GUARD_TIMEOUT_S} s{dry}")
        return True

    def _honoured_pending(self, vip: str, pending, flows: list[Flow], local, out: Outcome) -> frozenset[int]:
        """The pending sockets the planner says are stale (plan.honoured_pending): the
        VIP is away, or the file was written before the VIP's arrival here, which the
        kernel tells by the address's creation stamp (jiffies; see plan.py)."""
        import os
        cookies = {c: k for k, c in pending.items() if c is not None}
        written = arrival = None
        if vip in local:
            try:
                cstamps = self.adapters.arrival_stamps(vip)
            except Exception as e:   # unknown arrival: nothing pending is honoured (the safe side)
                self._fail(out, Step(Kind.PENDING, vip=vip), f"reading when {vip} arrived", e)
                cstamps = []
            elapsed = os.times().elapsed        # after the dump (plan.arrival_bound)
            zero = P.jiffies_zero(elapsed, time.clock_gettime(time.CLOCK_MONOTONIC))
            ticks = getattr(pending, "ticks", None)
            if zero is not None:
                arrival = P.arrival_bound(cstamps, round(elapsed * 100), zero)
                written = None if ticks is None else P.write_bound(ticks, zero)
        ok, reason = P.honoured_pending(P.Pending(cookies, written), vip, flows, local, arrival)
        if reason:
            self.log(f"{len(cookies) - len(ok)} pending socket(s) of {vip} not honoured: {reason}")
        return ok

    def _tickle(self, act: P.Tickle, out: Outcome, stale_cookies: set[int]) -> None:
        """Tickle at the scheduled offsets; a tuple is done once a live (not stale)
        ESTABLISHED connection on it exists: the client has reconnected. A client
        that reconnected before we started (its own retransmission found this
        node) is not tickled at all. Paced (nfsreset.core.pace): at most act.rate ACKs
        per second and act.max_packets in all; a round starts at its offset or
        once the previous round has been sent, whichever is later."""
        old = stale_cookies
        if self.dry_run:
            out.add(Step(Kind.TICKLE, vip=act.vip, tuples=len(act.keys), rounds=len(act.schedule), sent=0))
            self.log(f"would tickle {len(act.keys)} client tuple(s) at {list(act.schedule)} s, at most "
                     f"{act.rate:,}/s and {act.max_packets:,} in all (dry run)")
            return
        from nfsreset.kernel import packets
        from nfsreset.core import pace
        todo = set(act.keys)
        sent = 0
        capped = False
        t0 = time.monotonic()
        def reconnected_now() -> set[FlowKey]:
            return {f.key for f in self.dump(act.vip) if f.cookie not in old and f.state == "ESTABLISHED"}

        # Poll between rounds so a hook returns as soon as every client is back
        # (typically ~0.1 s), not after the whole schedule.
        free = t0          # when the rate allows the next batch
        polled = True      # todo is fresh (a round that overran its gap was not followed by a poll)
        todo -= reconnected_now()
        with self.adapters.tickle_sender() as tx:
            for i, offset in enumerate(act.schedule):
                if not polled:
                    todo -= reconnected_now()
                if not todo:
                    break
                keys = sorted(todo)
                budget = act.max_packets - sent
                capped = capped or budget < len(keys)
                batches = pace.batches(len(keys), act.rate, budget, start=max(t0 + offset, free))
                done = 0

                def emit(k: int) -> None:
                    nonlocal done
                    tx.send_many(packets.tickle_to_client(key) for key in keys[done:done + k])
                    done += k
                free = pace.send(batches, act.rate, emit) or free
                sent += done
                last = i + 1 == len(act.schedule)
                if not last and sent >= act.max_packets:
                    capped = True
                    break
                until = (max(t0 + act.schedule[i + 1], free) if not last
                         else max(t0 + act.schedule[-1], free) + TICKLE_LINGER_S)
                polled = False
                while todo and time.monotonic() < until:
                    time.sleep(min(TICKLE_POLL_S, max(0.0, until - time.monotonic())))
                    todo -= reconnected_now()
                    polled = True
                if not todo:
                    break
        reconnected = sorted(set(act.keys) - todo)
        step = Step(Kind.TICKLE, vip=act.vip, tuples=len(act.keys), sent=sent, rate=act.rate,
                    max_packets=act.max_packets, capped=capped, ms=round((time.monotonic() - t0) * 1000, 1),
                    reconnected=[format_endpoint(k.client, k.cport) for k in reconnected],
                    silent=[format_endpoint(k.client, k.cport) for k in sorted(todo)])
        # The sender counts what sendto() refused (e.g. EPERM: an nft output rule
        # dropped it) instead of raising: none sent is a failed step.
        errors, last_err = getattr(tx, "errors", 0), getattr(tx, "last_error", None)
        if errors and errors >= sent:
            self._failed(out, step, f"tickle of {len(act.keys)} client tuple(s) of {act.vip}",
                         f"none of its {sent} ACK(s) went out ({why(last_err) if last_err else 'refused'})")
            return
        out.add(step)
        self.log(f"tickled {len(act.keys)} client tuple(s) of {act.vip} ({sent} ACKs); "
                 f"{len(reconnected)} reconnected, {len(todo)} not seen again yet"
                 + (f"; stopped at --max-packets {act.max_packets:,}" if capped else "")
                 + (f"; {errors} ACK(s) not sent ({why(last_err)})" if errors else ""))


_KIND_OF = {P.Quarantine: Kind.QUARANTINE, P.LiftQuarantine: Kind.LIFT, P.Destroy: Kind.DESTROY,
            P.ExactRst: Kind.RST, P.GuardTuples: Kind.GUARD, P.Announce: Kind.ANNOUNCE, P.Tickle: Kind.TICKLE}
