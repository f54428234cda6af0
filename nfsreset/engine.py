"""Carry out a plan: the one place where the pure core meets the kernel adapters.

The loop is: dump -> plan -> act -> dump again -> re-plan what survived with the
rungs already tried excluded (DESIGN §3 ladder), at most one pass per rung.
Adapters are imported where used: `kill` and `tickle` run as fresh processes at
the worst moment of a failover, and their first destroy or packet must leave
within ~0.1 s of exec.
"""
from __future__ import annotations

import dataclasses
import errno
import time
from collections.abc import Callable

from nfsreset import plan as P
from nfsreset.model import Flow, FlowKey, format_endpoint

TICKLE_POLL_S = 0.05    # how often a tickle run looks for reconnected clients
TICKLE_LINGER_S = 0.5   # after the last round, how long to wait for late reconnects
EXACT_RST_TIMEOUT_S = 2.0   # covers the probe repeats at 0, 0.55, 1.5 s (answers are rate-limited)
GUARD_TIMEOUT_S = 300   # a guard element outlives a failback; the stale socket dies on the client's RST


@dataclasses.dataclass
class Outcome:
    """What one run did, for the log lines, --json and the exit code."""
    moment: str
    vip: str
    dry_run: bool
    steps: list[dict] = dataclasses.field(default_factory=list)
    left: list[Flow] = dataclasses.field(default_factory=list)
    code: int = 0
    reason: str = ""
    started: float = dataclasses.field(default_factory=time.monotonic)

    def step(self, **kw) -> dict:
        """Record a step. `sessions` is kept as the flows themselves, turned
        into dicts only for --json: the daemon only counts them (2.5 ms per
        10,000 saved on its action path)."""
        self.steps.append(kw)
        return kw

    def as_json(self) -> dict:
        steps = [{k: [flow_json(f) for f in v] if k == "sessions" else v for k, v in st.items()}
                 for st in self.steps]
        return {"moment": self.moment, "vip": self.vip, "dry_run": self.dry_run, "exit": self.code,
                "reason": self.reason, "steps": steps,
                "left": [flow_json(f) for f in self.left],
                "elapsed_s": round(time.monotonic() - self.started, 4)}


def flow_json(f: Flow) -> dict:
    return {"vip": f.key.vip, "vport": f.key.vport, "client": f.key.client, "cport": f.key.cport,
            "state": f.state}


def describe(flows, limit: int = 8) -> str:
    parts = [f"{format_endpoint(f.key.client, f.key.cport)} {f.state}" for f in list(flows)[:limit]]
    more = len(flows) - limit
    return ", ".join(parts) + (f" (+{more} more)" if more > 0 else "")


class Engine:
    """Acts for one VIP in the current thread's network namespace."""

    def __init__(self, opts: P.Options, *, state=None, dry_run: bool = False, caps: P.Caps | None = None,
                 log: Callable[[str], None] = lambda line: None, guard=None):
        self.opts = opts
        self.state = state
        self.dry_run = dry_run
        self.caps = caps or P.Caps()
        self.log = log
        self._sids: dict[int, object] = {}
        self._acked_all = False     # did the last destroy get 0/ENOENT for every socket?
        # A long-lived caller (the daemon) passes its one Guard: each libnftables
        # context costs a netlink socket, and one opened while the process holds
        # >= 1024 descriptors aborts it (docs/internals.md).
        self._guard = guard
        # The daemon adds what a dump cannot know (first-seen times, sequence
        # numbers) from its BPF flow table.
        self.enrich: Callable[[list[Flow]], list[Flow]] | None = None

    # -- observation -------------------------------------------------------------------
    def dump(self, vip: str) -> list[Flow]:
        from nfsreset import sockdiag
        pairs = sockdiag.dump(local_ips=[vip], local_ports=sorted(self.opts.ports))
        self._sids.update({f.cookie: sid for f, sid in pairs})
        flows = [f for f, _ in pairs]
        return self.enrich(flows) if self.enrich else flows

    def local_addrs(self, vip: str) -> frozenset[str]:
        """What the kernel says is local: the address table, plus the VIPs of
        these options (and `vip`) that a FIB lookup finds local (a `local` route
        range: AnyIP, LVS-DR). One netlink round trip."""
        from nfsreset import addrs
        return addrs.local_ips(vips=self.opts.vips | {vip})

    def guard(self):
        if self._guard is None:
            from nfsreset.guard import Guard
            self._guard = Guard(dry_run=self.dry_run)
        return self._guard

    # -- one moment ------------------------------------------------------------------------
    def run(self, moment: P.Moment, vip: str, *, known_clients=(), vip_since=None,
            old_cookies: frozenset[int] = frozenset()) -> Outcome:
        """Act for `vip` at `moment`. old_cookies: sockets known to predate the VIP here."""
        out = Outcome(moment.value, vip, self.dry_run)
        local = self.local_addrs(vip)
        pending = {}
        if moment is P.Moment.POST_START and self.state is not None:
            pending = self.state.read_pending(vip)
            old_cookies = old_cookies | frozenset(c for c in pending.values() if c is not None)
        flows = self.dump(vip)
        tried: set[str] = set()
        for _ in range(4):   # one pass per rung at most
            actions = P.plan(moment, vip, flows, local, self.caps, self.opts, vip_since=vip_since,
                             known_clients=known_clients, tried=tried, old_cookies=old_cookies)
            targeted: list[Flow] = []
            rung = None
            stale = {f.cookie for f in flows
                     if P.is_stale(f, local, vip_since, old_cookies)}
            for act in actions:
                r = self._do(act, out, stale)
                if isinstance(act, P.DESTRUCTIVE):
                    if isinstance(act, P.GuardTuples):
                        keys = set(act.keys)
                        targeted += [f for f in flows if f.key in keys]
                    else:
                        targeted += act.flows
                    rung = r
            code = P.exit_code(actions)
            if code == 3:
                out.code, out.reason = 3, next(a.reason for a in actions if isinstance(a, P.Refuse))
                return out
            if code == 1:
                unable = [a for a in actions if isinstance(a, P.Unable)]
                out.left = [f for a in unable for f in a.flows]
                out.code, out.reason = 1, unable[0].reason
                return out
            if not targeted or self.dry_run or rung == "nft":
                break    # nft guards end sockets only when the client talks: nothing to verify now
            if rung == "destroy" and self._acked_all:
                # The kernel answered every SOCK_DESTROY with 0 (tcp_abort ran: the
                # socket is closed and unhashed) or ENOENT (already gone): that is
                # the check, per socket. A second dump would walk the whole
                # host-wide TCP hash again (~12 ms at 10,000 sockets).
                out.step(action="verify", left=0, sessions=[], by="acks")
                break
            survivors = self._verify(vip, targeted, out)
            if not survivors:
                break
            tried.add(rung)
            flows = survivors
        if moment is P.Moment.POST_START and pending and not self.dry_run and out.code == 0:
            self.state.clear_pending(vip)
        if self._guard is not None and not self.dry_run:
            self._guard.prune()
        return out

    def _verify(self, vip: str, targeted: list[Flow], out: Outcome) -> list[Flow]:
        wanted = {f.cookie for f in targeted}
        left = [f for f in self.dump(vip) if f.cookie in wanted]
        out.step(action="verify", left=len(left), sessions=list(left), by="dump")
        if left:
            self.log(f"{len(left)} session(s) on {vip} survived: {describe(left)}")
        return left

    # -- actions ------------------------------------------------------------------------------
    def _do(self, act, out: Outcome, stale_cookies: set[int]) -> str | None:
        dry = " (dry run)" if self.dry_run else ""
        if isinstance(act, P.Record):
            n = 0
            if self.state is not None and not self.dry_run:
                n = self.state.write_clients(act.vip, act.keys)
            out.step(action="record", vip=act.vip, clients=len(act.keys), written=n)
            if self.state is not None:
                self.log(f"recorded {len(act.keys)} client tuple(s) of {act.vip} in {self.state.path}{dry}")
        elif isinstance(act, P.Quarantine):
            self.guard().quarantine(act.vip)
            out.step(action="quarantine", vip=act.vip)
            self.log(f"quarantined {act.vip}: egress from it is dropped while it is away{dry}")
        elif isinstance(act, P.LiftQuarantine):
            if self.dry_run or act.vip in self.guard().quarantined():
                self.guard().lift_quarantine(act.vip)
                out.step(action="lift-quarantine", vip=act.vip)
                self.log(f"lifted the quarantine of {act.vip}{dry}")
        elif isinstance(act, P.Destroy):
            return self._destroy(act, out)
        elif isinstance(act, P.ExactRst):
            return self._exact_rst(act, out)
        elif isinstance(act, P.GuardTuples):
            n = self.guard().add_stale(act.keys, timeout_s=GUARD_TIMEOUT_S)
            out.step(action="guard", tuples=len(act.keys), added=n, timeout_s=GUARD_TIMEOUT_S)
            self.log(f"guarded {len(act.keys)} stale tuple(s): their non-SYN segments get a reset "
                     f"for up to {GUARD_TIMEOUT_S} s{dry}")
            return "nft"
        elif isinstance(act, P.Defer):
            if self.state is not None and not self.dry_run:
                pend = self.state.read_pending(act.vip)
                pend.update({f.key: f.cookie for f in act.flows})
                self.state.write_pending(act.vip, pend)
            out.step(action="defer", vip=act.vip, sessions=list(act.flows))
            self.log(f"deferred {len(act.flows)} session(s) on {act.vip} to post-start "
                     f"(the strategy needs the VIP here): {describe(act.flows)}{dry}")
            if self.state is None:
                out.code, out.reason = 1, "deferred sessions need --state-dir to be finished at post-start"
        elif isinstance(act, P.Announce):
            if not self.dry_run:
                from nfsreset.announce import announce
                ifname = announce(act.vip)
            else:
                ifname = "?"
            out.step(action="announce", vip=act.vip, ifname=ifname)
            self.log(f"announced {act.vip} on {ifname}{dry}")
        elif isinstance(act, P.Tickle):
            self._tickle(act, out, stale_cookies)
        return None

    def _destroy(self, act: P.Destroy, out: Outcome) -> str:
        if self.dry_run:
            out.step(action="destroy", sessions=list(act.flows), destroyed=0)
            self.log(f"would destroy {len(act.flows)} session(s): {describe(act.flows)} (dry run)")
            return "destroy"
        from nfsreset import sockdiag
        t0 = time.monotonic()
        res = sockdiag.destroy([self._sids[f.cookie] for f in act.flows])
        ms = (time.monotonic() - t0) * 1000
        failed = [(sid, e) for sid, e in res.failed]
        acked = {sid.cookie for sid in res.destroyed} | {sid.cookie for sid in res.gone}
        self._acked_all = not failed and all(f.cookie in acked for f in act.flows)
        if any(e == errno.EOPNOTSUPP for _, e in failed):
            self.caps = dataclasses.replace(self.caps, destroy=False)
        out.step(action="destroy", sessions=list(act.flows), destroyed=len(res.destroyed),
                 gone=len(res.gone), failed=[errno.errorcode.get(e, str(e)) for _, e in failed],
                 ms=round(ms, 2))
        self.log(f"destroyed {len(res.destroyed)} of {len(act.flows)} session(s) on {act.flows[0].key.vip} "
                 f"in {ms:.1f} ms: {describe(act.flows)}"
                 + (f"; {len(failed)} failed ({errno.errorcode.get(failed[0][1], failed[0][1])})" if failed else ""))
        return "destroy"

    def _exact_rst(self, act: P.ExactRst, out: Outcome) -> str:
        if self.dry_run:
            out.step(action="rst", sessions=list(act.flows), reset=0)
            self.log(f"would reset {len(act.flows)} session(s) by exact RST: {describe(act.flows)} (dry run)")
            return "rst"
        from nfsreset import seqprobe
        t0 = time.monotonic()
        ok = len(seqprobe.kill_local_many([f.key for f in act.flows], timeout=EXACT_RST_TIMEOUT_S))
        ms = (time.monotonic() - t0) * 1000
        out.step(action="rst", sessions=list(act.flows), reset=ok, ms=round(ms, 1))
        self.log(f"reset {ok} of {len(act.flows)} session(s) by exact-sequence RST in {ms:.0f} ms: "
                 f"{describe(act.flows)}")
        return "rst"

    def _tickle(self, act: P.Tickle, out: Outcome, stale_cookies: set[int]) -> None:
        """Tickle at the scheduled offsets; a tuple is done once a live (not stale)
        ESTABLISHED connection on it exists: the client has reconnected. A client
        that reconnected before we started (its own retransmission found this
        node) is not tickled at all."""
        old = stale_cookies
        if self.dry_run:
            out.step(action="tickle", vip=act.vip, tuples=len(act.keys), rounds=len(act.schedule), sent=0)
            self.log(f"would tickle {len(act.keys)} client tuple(s) at {list(act.schedule)} s (dry run)")
            return
        from nfsreset import packets
        from nfsreset.rawsend import RawSender
        todo = set(act.keys)
        sent = 0
        t0 = time.monotonic()
        def reconnected_now() -> set[FlowKey]:
            return {f.key for f in self.dump(act.vip) if f.cookie not in old and f.state == "ESTABLISHED"}

        # Poll between rounds so a hook returns as soon as every client is back
        # (typically ~0.1 s), not after the whole schedule.
        end = t0 + act.schedule[-1] + TICKLE_LINGER_S
        todo -= reconnected_now()
        with RawSender() as tx:
            for i, offset in enumerate(act.schedule):
                if not todo:
                    break
                tx.send_many(packets.tickle_to_client(k) for k in sorted(todo))
                sent += len(todo)
                until = t0 + act.schedule[i + 1] if i + 1 < len(act.schedule) else end
                while todo and time.monotonic() < until:
                    time.sleep(min(TICKLE_POLL_S, max(0.0, until - time.monotonic())))
                    todo -= reconnected_now()
                if not todo:
                    break
        reconnected = sorted(set(act.keys) - todo)
        out.step(action="tickle", vip=act.vip, tuples=len(act.keys), sent=sent,
                 reconnected=[format_endpoint(k.client, k.cport) for k in reconnected],
                 silent=[format_endpoint(k.client, k.cport) for k in sorted(todo)])
        self.log(f"tickled {len(act.keys)} client tuple(s) of {act.vip} ({sent} ACKs); "
                 f"{len(reconnected)} reconnected, {len(todo)} not seen again yet")
