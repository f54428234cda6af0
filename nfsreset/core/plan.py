"""The pure core: which sessions are stale, and what to do about them, in what order.

Nothing here touches the kernel. The inputs are plain data (flows from a dump or
the BPF tracker, the addresses configured here, what this kernel can do, the
user's options); the output is an ordered list of actions that an executor
(nfsreset.engine) carries out. Every rule about safety lives here, so it can be
tested exhaustively without root.

Rule zero: a socket whose local address is configured on this host is live and
is never touched, except
  - it existed while that address was NOT configured here (it predates the
    address's arrival: a stale socket from the VIP's previous stay), or
  - the user named exactly that session (VIP, VIP port, client, client port)
    and said --force.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence

from nfsreset.core.model import Flow, FlowKey
from nfsreset.core.pace import TICKLE_MAX_PACKETS, TICKLE_RATE_PPS

# Tickle repeats (seconds after the first). The client answers at most one
# invalid segment per 500 ms (tcp_invalid_ratelimit), so a tickle right after
# the stale socket provoked an answer is swallowed: repeat past that window.
TICKLE_SCHEDULE = (0.0, 0.6, 1.5)

STRATEGIES = ("auto", "destroy", "rst", "nft")


class Moment(enum.Enum):
    """When in a VIP's move we are acting (docs/design.md §4)."""
    POST_STOP = "post-stop"    # the VIP has just left this host
    PRE_START = "pre-start"    # the VIP is about to arrive here
    POST_START = "post-start"  # the VIP has arrived here
    AWAY = "away"              # periodic check while the VIP is elsewhere


@dataclasses.dataclass(frozen=True)
class Caps:
    """What this kernel and host offer (see `nfsreset doctor`)."""
    destroy: bool = True   # SOCK_DESTROY over sock_diag
    raw: bool = True       # raw sockets for tickles and exact RSTs
    nft: bool = True       # nftables guard and quarantine


@dataclasses.dataclass(frozen=True)
class Session:
    """A session the user named: client address, and port if given."""
    client: str
    cport: int | None = None

    def matches(self, key: FlowKey) -> bool:
        return key.client == self.client and (self.cport is None or key.cport == self.cport)


@dataclasses.dataclass(frozen=True)
class Options:
    vips: frozenset[str]
    ports: frozenset[int] = frozenset({2049})
    strategy: str = "auto"
    clients: tuple[Session, ...] = ()      # restrict to these clients (empty: all)
    force: bool = False                    # allow acting on a configured VIP for named sessions
    tickle_rounds: int = len(TICKLE_SCHEDULE)
    announce: bool = True                  # False while an IPv6 VIP is still in DAD
    tickle_rate: int = TICKLE_RATE_PPS     # forged ACKs per second (nfsreset.core.pace)
    tickle_max_packets: int = TICKLE_MAX_PACKETS   # forged ACKs per call, all rounds


# --- actions -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Record:
    """Write the VIP's client tuples to the state dir (for the node taking it over)."""
    vip: str
    keys: tuple[FlowKey, ...]


@dataclasses.dataclass(frozen=True)
class Quarantine:
    """Drop egress whose source is the VIP while it is away (IPv6 keeps sending)."""
    vip: str


@dataclasses.dataclass(frozen=True)
class LiftQuarantine:
    vip: str


@dataclasses.dataclass(frozen=True)
class Destroy:
    """SOCK_DESTROY these sockets."""
    flows: tuple[Flow, ...]


@dataclasses.dataclass(frozen=True)
class ExactRst:
    """Learn each local socket's rcv_nxt and RST it from the client's side (VIP local)."""
    flows: tuple[Flow, ...]


@dataclasses.dataclass(frozen=True)
class GuardTuples:
    """nft: reject non-SYN non-RST segments of these tuples with a reset, until a SYN."""
    keys: tuple[FlowKey, ...]


@dataclasses.dataclass(frozen=True)
class Defer:
    """Cannot end these here and now (the rung needs the VIP local): record them as
    pending, so post-start on this node finishes them before it tickles."""
    vip: str
    flows: tuple[Flow, ...]


@dataclasses.dataclass(frozen=True)
class Announce:
    """Gratuitous ARP / unsolicited NA, so the clients' answers come here."""
    vip: str


@dataclasses.dataclass(frozen=True)
class Tickle:
    """Tickle ACKs to these client tuples at TICKLE_SCHEDULE, stopping per tuple
    once it has reconnected; at most `rate` per second and `max_packets` in all
    (a round starts at its offset or when the previous one has been sent)."""
    vip: str
    keys: tuple[FlowKey, ...]
    schedule: tuple[float, ...] = TICKLE_SCHEDULE
    rate: int = TICKLE_RATE_PPS
    max_packets: int = TICKLE_MAX_PACKETS


@dataclasses.dataclass(frozen=True)
class Refuse:
    """Nothing may be done; say why (exit code 3)."""
    reason: str


@dataclasses.dataclass(frozen=True)
class Unable:
    """Some sessions cannot be ended by any rung available (exit code 1)."""
    flows: tuple[Flow, ...]
    reason: str


@dataclasses.dataclass(frozen=True)
class Reconnected:
    """Known client tuples that already have a live socket here (the client came
    back on its own before we acted): not tickled, only reported."""
    vip: str
    keys: tuple[FlowKey, ...]


Action = (Record | Quarantine | LiftQuarantine | Destroy | ExactRst | GuardTuples | Defer
          | Announce | Tickle | Reconnected | Refuse | Unable)
DESTRUCTIVE = (Destroy, ExactRst, GuardTuples)


# --- what is stale -------------------------------------------------------------
def watched(flow: Flow, opts: Options) -> bool:
    return (flow.key.vip in opts.vips and flow.key.vport in opts.ports
            and flow.state != "LISTEN"
            and (not opts.clients or any(s.matches(flow.key) for s in opts.clients)))


def named_exactly(key: FlowKey, opts: Options) -> bool:
    """The user named this very session (client and client port)."""
    return any(s.cport is not None and s.matches(key) for s in opts.clients)


def is_stale(flow: Flow, local_addrs: frozenset[str] | set[str],
             vip_since: Mapping[str, float] | None = None,
             old_cookies: frozenset[int] = frozenset()) -> bool:
    """docs/design.md §3: local address not configured here, or the socket existed while
    it was not: first seen before the address arrived, or seen by a hook while
    the address was away (its cookie recorded as pending). Unknown age = live."""
    if flow.key.vip not in local_addrs:
        return True
    if flow.cookie is not None and flow.cookie in old_cookies:
        return True
    since = (vip_since or {}).get(flow.key.vip)
    return since is not None and flow.first_seen is not None and flow.first_seen < since


def may_touch(flow: Flow, local_addrs, opts: Options, vip_since=None,
              old_cookies: frozenset[int] = frozenset()) -> bool:
    """Rule zero, in one place."""
    if is_stale(flow, local_addrs, vip_since, old_cookies):
        return True
    return opts.force and named_exactly(flow.key, opts)


# --- pending files: sockets a hook saw while their VIP was away -----------------
# The clock: the address's IFA_CACHEINFO cstamp is jiffies (10 ms steps), not
# CLOCK_MONOTONIC; times(2) reads the same counter, so a file stamped with it is
# ordered against the address exactly, with no offset to calibrate.
# docs/internals.md, "The state dir is untrusted input", has the measured details.


@dataclasses.dataclass(frozen=True)
class Pending:
    """A pending file as read: the sockets (cookie -> 4-tuple) that a hook saw while
    the VIP was away and could not end then, and the latest instant its write can
    have happened, on the jiffies clock (centiseconds since boot, write_bound());
    None if unknown. statedir refuses a file of another boot."""
    cookies: Mapping[int, FlowKey]
    written: float | None


def honoured_pending(pending: Pending, vip: str, flows: Iterable[Flow], local_addrs,
                     vip_arrival: float | None) -> tuple[frozenset[int], str]:
    """Which cookies of a pending file name stale sockets, and why the others are
    not honoured ('' if none was refused). vip_arrival: the earliest instant the VIP
    can have arrived here, on the same clock as pending.written (arrival_bound()).

    A cookie is unique for the life of a boot, so a record written while the VIP was
    away names a socket that existed then: stale. One that may have been written
    after the VIP arrived here proves nothing (a socket named there may be a live
    session), nor does one whose write time or the VIP's arrival is unknown. A
    cookie counts only for a socket with the very 4-tuple recorded next to it."""
    by_cookie = {f.cookie: f for f in flows if f.cookie is not None and f.key.vip == vip}
    named = frozenset(c for c, key in pending.cookies.items()
                      if c in by_cookie and by_cookie[c].key == key)
    mismatched = sum(1 for c, key in pending.cookies.items() if c in by_cookie and by_cookie[c].key != key)
    why = f"{mismatched} cookie(s) name a socket of another 4-tuple" if mismatched else ""
    if vip not in local_addrs or not named:
        return named, why     # away: every socket on the VIP is stale anyway
    if pending.written is None:
        return frozenset(), "its write time is unknown"
    if vip_arrival is None:
        return frozenset(), f"the arrival time of {vip} is unknown"
    if pending.written <= vip_arrival:
        return named, why
    after = (pending.written - vip_arrival) / 100
    return frozenset(), (f"it may have been written after {vip} arrived here "
                         f"({after:.2f} s: not before, to the kernel's 10 ms steps)")


# Kernel HZ values (Kconfig choices across architectures), told apart by what
# times(2) reads: 2**32/HZ - 300 s more than CLOCK_MONOTONIC, give or take the
# jiffies clock's offset (under a second).
_HZ_CANDIDATES = (100, 250, 300, 1000, 24, 32, 48, 64, 128, 200, 256, 500, 1024, 1200)


def jiffies_zero(times_elapsed: float, mono_now: float) -> float | None:
    """What times(2) reads at the jiffies clock's zero, in 1/100 s (INITIAL_JIFFIES
    in centiseconds: 2**32 * 100 / HZ - 30000, not a whole number for every HZ),
    from one reading of os.times().elapsed and CLOCK_MONOTONIC. None if no HZ fits
    (a 32-bit clock_t, a time namespace with an offset...)."""
    offset = times_elapsed - mono_now
    hz = min(_HZ_CANDIDATES, key=lambda h: abs(offset - (2**32 / h - 300)))
    if abs(offset - (2**32 / hz - 300)) > 3600:
        return None
    return 2**32 * 100 / hz - 30000


def write_bound(ticks: int, zero: float) -> float:
    """The latest instant, in jiffies centiseconds since boot, at which times(2)
    can have read `ticks` (it reads floor(zero + jiffies_cs))."""
    return ticks + 1 - zero


def arrival_bound(cstamps: Iterable[int], now_ticks: int, zero: float) -> float | None:
    """The earliest instant, in jiffies centiseconds since boot, at which an address
    whose instances carry these cstamps arrived (an address on two devices has
    been here since its first). cstamp is 32 bits and wraps after 497 days: each
    is placed at the latest instant it can name before now. Read `now_ticks` after
    the cstamps (an address added in between would look 497 days old)."""
    now = now_ticks + 1 - zero        # the jiffies clock is below this now
    ages = [(now - c) % 2**32 for c in cstamps]
    return now - max(ages) if ages else None
# --- the ladder ------------------------------------------------------------------
def rungs(strategy: str, caps: Caps, vip_local: bool, tried: Iterable[str] = ()) -> list[str]:
    """Rungs to use, best first. 'rst' needs the VIP local (the RST must enter the
    local stack from the client's address). 'nft' guards work whenever the VIP
    comes here, so they can be laid in advance."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    offered = {"destroy": caps.destroy, "rst": caps.raw and vip_local, "nft": caps.nft}
    wanted = ("destroy", "rst", "nft") if strategy == "auto" else (strategy,)
    return [r for r in wanted if offered[r] and r not in set(tried)]


def _end(flows: Sequence[Flow], vip: str, opts: Options, caps: Caps, vip_local: bool,
         tried: Iterable[str]) -> list[Action]:
    if not flows:
        return []
    ladder = rungs(opts.strategy, caps, vip_local, tried)
    if ladder:
        first = ladder[0]
        if first == "destroy":
            return [Destroy(tuple(flows))]
        if first == "rst":
            return [ExactRst(tuple(flows))]
        return [GuardTuples(tuple(f.key for f in flows))]
    wants_local = opts.strategy == "rst" or (opts.strategy == "auto" and caps.raw)
    if not vip_local and wants_local and "rst" not in set(tried):
        return [Defer(vip, tuple(flows))]
    return [Unable(tuple(flows), _why_unable(opts.strategy, caps, vip_local, tried))]


def _why_unable(strategy: str, caps: Caps, vip_local: bool, tried: Iterable[str]) -> str:
    tried = set(tried)
    if tried:
        return f"still alive after {', '.join(sorted(tried))}; no rung left for strategy {strategy}"
    missing = [n for n, ok in (("SOCK_DESTROY", caps.destroy), ("raw sockets", caps.raw),
                               ("nftables", caps.nft)) if not ok]
    return f"strategy {strategy} not available here (missing: {', '.join(missing) or 'VIP not local'})"


# --- plans per moment ---------------------------------------------------------
def plan(moment: Moment, vip: str, flows: Iterable[Flow], local_addrs: frozenset[str] | set[str],
         caps: Caps, opts: Options, *, vip_since: Mapping[str, float] | None = None,
         known_clients: Iterable[FlowKey] = (), tried: Iterable[str] = (),
         old_cookies: frozenset[int] = frozenset()) -> list[Action]:
    """Ordered actions for `vip` at `moment` (docs/design.md §4).

    flows: sockets seen here (any VIP; filtered here). known_clients: client
    tuples from the state dir (for the tickle). tried: rungs already used this
    round whose sockets survived (the executor re-plans after verifying).
    old_cookies: sockets known to predate the VIP's arrival (pending from pre-start).
    POST_STOP records the clients and quarantines; PRE_START only ends sockets
    (recording there would overwrite the list the old owner just wrote, and a
    quarantine there would outlive a start that fails half-way).
    """
    vip_local = vip in local_addrs
    mine = [f for f in flows if f.key.vip == vip and watched(f, opts)]
    if moment is Moment.POST_START:
        return _post_start(vip, mine, local_addrs, caps, opts, vip_since, known_clients, tried,
                           old_cookies)

    if vip_local and not opts.force:
        return [Refuse(f"{vip} is configured on this host: its sessions are live "
                       "(name one session with --client ADDR:PORT and --force to end it anyway)")]
    if vip_local and not any(s.cport is not None for s in opts.clients):
        return [Refuse(f"{vip} is configured on this host: --force ends only sessions named "
                       "exactly with --client ADDR:PORT")]
    targets = [f for f in mine if may_touch(f, local_addrs, opts, vip_since, old_cookies)]
    actions: list[Action] = []
    if moment is Moment.POST_STOP and not tried:
        actions.append(Record(vip, tuple(sorted({f.key for f in mine}))))
    if moment in (Moment.POST_STOP, Moment.AWAY) and not vip_local and caps.nft and not tried:
        actions.append(Quarantine(vip))
    actions += _end(targets, vip, opts, caps, vip_local, tried)
    if moment is Moment.PRE_START and caps.nft and not tried:
        # The VIP is about to be added here: its announcements (IPaddr2's
        # unsolicited NA is sent from the VIP) and its new sessions must get
        # out. Lifted after the destroy, so the RSTs of the destroyed stale
        # sockets (IPv6 still sends them) were dropped.
        actions.append(LiftQuarantine(vip))
    return actions


def _post_start(vip, mine, local_addrs, caps, opts, vip_since, known_clients, tried,
                old_cookies) -> list[Action]:
    if vip not in local_addrs:
        return [Refuse(f"{vip} is not configured on this host: nothing to tickle from here")]
    actions: list[Action] = []
    if caps.nft and not tried:
        actions.append(LiftQuarantine(vip))
    stale = [f for f in mine if may_touch(f, local_addrs, opts, vip_since, old_cookies)]
    actions += _end(stale, vip, opts, caps, True, tried)
    if tried:
        return actions
    # A tuple with a live socket here (made since the VIP arrived) is a client
    # that already reconnected: a tickle would only disturb it.
    live = {f.key for f in mine} - {f.key for f in stale}
    known = {k for k in known_clients
             if k.vip == vip and k.vport in opts.ports
             and (not opts.clients or any(s.matches(k) for s in opts.clients))}
    keys = tuple(sorted(known - live))
    back = tuple(sorted(known & live))
    if caps.raw and opts.announce:
        actions.append(Announce(vip))
        if keys and opts.tickle_rounds > 0:
            actions.append(Tickle(vip, keys, _schedule(opts.tickle_rounds), opts.tickle_rate,
                                  opts.tickle_max_packets))
    if back:
        actions.append(Reconnected(vip, back))
    return actions


def _schedule(rounds: int) -> tuple[float, ...]:
    """TICKLE_SCHEDULE, extended by doubling gaps when more rounds are asked for."""
    sched = list(TICKLE_SCHEDULE[:rounds])
    while len(sched) < rounds:
        sched.append(round(sched[-1] + 2 * (sched[-1] - sched[-2]), 3))
    return tuple(sched)


def exit_code(actions: Sequence[Action]) -> int:
    """0 done, 1 some sessions could not be ended, 3 refused for safety."""
    if any(isinstance(a, Refuse) for a in actions):
        return 3
    if any(isinstance(a, Unable) for a in actions):
        return 1
    return 0
