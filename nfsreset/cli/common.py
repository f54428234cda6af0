"""What both CLI front ends share: errors, option specs and checks, and the hook commands.

Each option is declared once, as an Opt in a command's table (KILL_OPTIONS,
TICKLE_OPTIONS here; flows, doctor, watch in cli_app); both front ends are
built from those tables, and the bodies take the options as keywords.

Exit codes, for every command: 0 done, 1 some sessions could not be ended (or,
for `flows`, stale sessions exist), 2 bad input, 3 refused for safety.
Errors are one line on stderr: `nfsreset CMD: what and why`. Bad input is
refused before anything is created (no state dir, nft table, BPF program). An
unexpected exception is one line `nfsreset CMD: internal error: TYPE: MSG` and
exit 1 on both front ends; NFSRESET_DEBUG=1 adds its traceback.

nfsreset.cli.main (the entry point) picks the front end: nfsreset.cli.hooks parses
`kill`/`tickle` when they run, nfsreset.cli.app (typer) everything else. Both
import this module and neither imports nfsreset.cli.main, so the entry point can
load either without an import cycle. Everything this module imports at load
time is cheap (sys, os, nfsreset.core.pace's constants): it is on the hooks' start-up path.
"""
from __future__ import annotations

import os
import sys

from nfsreset.core.pace import TICKLE_MAX_PACKETS, TICKLE_RATE_PPS


class Fail(Exception):
    """A one-line error with its exit code."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def fail_exit(e: Fail) -> None:
    print(f"nfsreset {command_name()}: {one_line(str(e))}", file=sys.stderr)
    sys.exit(e.code)


def interrupted() -> None:
    print(f"nfsreset {command_name()}: interrupted", file=sys.stderr)
    sys.exit(130)


DEBUG_ENV = "NFSRESET_DEBUG"


def internal_error(e: BaseException) -> None:
    """A bug, not bad input: one line and exit 1; the traceback only with NFSRESET_DEBUG=1."""
    print(f"nfsreset {command_name()}: internal error: {type(e).__name__}: {one_line(str(e))}",
          file=sys.stderr, flush=True)
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        import traceback
        traceback.print_exception(e)
    sys.exit(1)


def version() -> str:
    """The installed distribution's version; the package constant when run from a
    checkout without one. Imported only for --version: importlib.metadata is not cheap."""
    try:
        from importlib.metadata import version as dist_version
        return dist_version("nfsreset")
    except Exception:       # PackageNotFoundError, or unreadable metadata
        from nfsreset import __version__
        return __version__


def one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


def command_name() -> str:
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    return args[0] if args else ""


def say(line: str) -> None:
    print(f"nfsreset {command_name()}: {line}", file=sys.stderr, flush=True)


# --- option specs: every option of every command is declared once, here or in cli_app -----
REQUIRED = object()     # an Opt default: the option must be given


class Opt:
    """One command-line option. Both front ends are built from these: cli_hooks
    parses `kill`/`tickle` with them and cli_app makes each typer command's
    signature from them (a plain class: `typing` is not imported on the hook path)."""

    __slots__ = ("flags", "name", "type", "default", "metavar", "help", "multiple")

    def __init__(self, flags: str | tuple[str, ...], name: str, type: type = str, default: object = None,
                 metavar: str = "", help: str = "", multiple: bool = False):
        self.flags = (flags,) if isinstance(flags, str) else tuple(flags)
        self.name = name            # the body's keyword argument
        self.type = type            # str, int, float or bool (a flag: no value)
        self.default = default      # REQUIRED, or a tuple when multiple
        self.metavar = metavar      # names the thing: VIP, ADDR[:PORT], N, S, FILE
        self.help = help
        self.multiple = multiple    # repeatable; the values given replace the default

    def but(self, **changes) -> "Opt":
        """The same option with other help, default, ... (for another command)."""
        kw = {k: getattr(self, k) for k in self.__slots__}
        kw.update(changes)
        return Opt(**kw)

    @property
    def flag(self) -> str:
        """The long flag: what errors name."""
        return self.flags[-1]


PORT_HELP = "TCP port of the service on the VIP (repeatable). NFS: 2049."
NETNS_HELP = "Act inside this named network namespace (/run/netns/NAME); it must exist."
STORE_HELP = ("Where client lists travel: dir (the state dir), attrd (also Pacemaker's attribute daemon: "
              "every node's list is read), auto (attrd if it runs here, else dir).")
STATE_DIR = "/var/lib/nfsreset"

# Options several commands share; a command changes only what differs (Opt.but).
VIP = Opt("--vip", "vip", str, REQUIRED, "VIP", "The VIP.")
PORT = Opt("--port", "port", int, (2049,), "PORT", PORT_HELP, multiple=True)
NETNS = Opt("--netns", "netns_name", str, None, "NAME", NETNS_HELP)
STORE = Opt("--store", "store", str, "auto", "NAME", STORE_HELP)
STRATEGY = Opt("--strategy", "strategy", str, "auto", "NAME", "auto|destroy|rst|nft.")
DRY_RUN = Opt("--dry-run", "dry_run", bool, False, help="Say what would be done; change nothing.")
JSON = Opt("--json", "json_out", bool, False, help="Print the outcome as one JSON object on stdout.")


# --- shared option checks ----------------------------------------------------------------


def parse_vip(text: str) -> str:
    from nfsreset.core.model import vip_address
    try:
        return vip_address(text)
    except ValueError as e:
        raise Fail(f"--vip: {e}") from None


def parse_ports(ports: list[int]) -> frozenset[int]:
    for p in ports:
        if not 0 < p < 65536:
            raise Fail(f"--port: {p} is not a TCP port (1-65535)")
    return frozenset(ports)


def parse_clients(texts: list[str], need_port: bool = False):
    from nfsreset.core.model import host_address, parse_endpoint
    from nfsreset.core.plan import Session
    out = []
    for t in texts:
        try:
            ip, port = parse_endpoint(t)
            ip = host_address(ip)
        except ValueError as e:
            raise Fail(f"--client: {e}") from None
        if need_port and port is None:
            raise Fail(f"--client: {t!r} needs a port (ADDR:PORT, [V6ADDR]:PORT)")
        out.append(Session(ip, port))
    return tuple(out)


def check_strategy(s: str) -> str:
    from nfsreset.core.plan import STRATEGIES
    if s not in STRATEGIES:
        raise Fail(f"--strategy must be one of {', '.join(STRATEGIES)}, not {s!r}")
    return s


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise Fail(f"needs root ({what}); run with sudo or use --dry-run")


def open_state(path: str | None, dry_run: bool = False, store: str = "dir"):
    """The state dir, made if missing; a dry run makes nothing (a missing dir reads as empty).
    store: dir, attrd (client lists also through Pacemaker's attrd) or auto (attrd if it runs)."""
    if path is None:
        return None
    if not path:
        raise Fail("--state-dir: '' is not a directory (an empty path)")
    from nfsreset.state.statedir import StateError
    from nfsreset.state.store import BACKENDS, open_store
    if store not in BACKENDS:
        raise Fail(f"--store must be one of {', '.join(BACKENDS)}, not {store!r}")
    try:
        return open_store(store, path, dry_run=dry_run, log=say)
    except StateError as e:
        raise Fail(str(e), e.exit_code) from None
    except OSError as e:
        raise Fail(f"state dir {path}: {e.strerror}") from None


def check_netns(name: str | None) -> None:
    """Check --netns before anything is made: a name under /run/netns, and there."""
    if name is None:
        return
    from nfsreset.kernel import netns
    try:
        there = netns.exists(name)
    except netns.NetnsError as e:
        raise Fail(f"--netns: {e}") from None
    if not there:
        raise Fail(f"--netns: network namespace {name!r} does not exist (see `ip netns list`)")


def check_pending(state, vip: str) -> None:
    """Refuse a bad pending file of this node (named after its network namespace:
    call it inside --netns) before anything is done."""
    if state is None:
        return
    from nfsreset.state.statedir import StateError
    try:
        state.read_pending(vip)
    except StateError as e:
        raise Fail(str(e), e.exit_code) from None


def in_netns(name: str | None):
    from nfsreset.kernel import netns
    check_netns(name)
    return netns.entered(name)


def note_lacking(out) -> None:
    """Name, in the closing line, what this host turned out to refuse (learnt from the
    first failure of each, not probed), and where to look next."""
    if out.lost:
        from nfsreset.engine import CAP_NAMES
        note = (f"unavailable here: {', '.join(CAP_NAMES[c] for c in sorted(out.lost))} "
                "(`nfsreset doctor` says what this host offers)")
        out.reason = f"{out.reason}; {note}" if out.reason else note


def finish(out, json_out: bool) -> int:
    if json_out:
        import json
        print(json.dumps(out.as_json(), indent=None))
    if out.reason:
        say(out.reason)
    return out.code




# --- kill ------------------------------------------------------------------------------------
KILL_DOC = """End every session on a VIP that is no longer (or not yet) configured here.

    Run it right after the VIP left this node (IPaddr2 post-stop) and right before
    it arrives (pre-start, with --moment pre-start). Sessions are destroyed in the
    kernel (SOCK_DESTROY), never reset towards the client from here: an early
    RST would push the client into SYN back-off before the new owner is up.
    """


KILL_OPTIONS = (
    VIP.but(help="The VIP whose sessions to end. It must NOT be configured here."),
    Opt("--client", "client", str, (), "ADDR[:PORT]",
        "Only sessions of this client: ADDR or ADDR:PORT (repeatable).", multiple=True),
    PORT,
    Opt("--state-dir", "state_dir", str, STATE_DIR, "DIR",
        "Where the VIP's client tuples are recorded for the node that takes it over."),
    STRATEGY.but(help="auto: destroy, else exact RST, else nft guard. Or force one: destroy|rst|nft."),
    STORE,
    Opt("--moment", "moment", str, "post-stop", "MOMENT",
        "post-stop (the VIP just left: record clients, quarantine, end sessions) or pre-start (the VIP "
        "is about to arrive: only end sessions left from its last stay)."),
    Opt("--force", "force", bool, False,
        help="Allow ending sessions of a VIP configured here, but only those named exactly with "
             "--client ADDR:PORT."),
    NETNS,
    DRY_RUN,
    JSON,
)


def kill(*, vip: str, client: list[str], port: list[int], state_dir: str | None, strategy: str, store: str,
         moment: str, force: bool, netns_name: str | None, dry_run: bool, json_out: bool) -> int:
    from nfsreset.core import plan as P
    vip_ = parse_vip(vip)
    opts = P.Options(vips=frozenset({vip_}), ports=parse_ports(port), strategy=check_strategy(strategy),
                     clients=parse_clients(client), force=force)
    moments = {"post-stop": P.Moment.POST_STOP, "pre-start": P.Moment.PRE_START}
    if moment not in moments:
        raise Fail(f"--moment must be post-stop or pre-start, not {moment!r}")
    if not dry_run:
        need_root("it destroys sockets and changes nftables")
    check_netns(netns_name)
    state = open_state(state_dir, dry_run, store)
    if moment == "post-stop" and state is not None:
        state.merge_own = True    # add to what the agent's stop published (attrd), never replace it
    from nfsreset.engine import Engine
    with in_netns(netns_name):
        # No pending-file check here: a teardown must never wait on it (only a
        # deferral reads it, and a bad one fails that step alone, exit 1).
        # No capability probe here (it would delay the first destroy): the engine
        # starts from all rungs and drops one at its first refusal.
        out = Engine(opts, state=state, dry_run=dry_run, log=say).run(moments[moment], vip_)
    note_lacking(out)
    if not out.steps and out.code == 0:
        say(f"no session on {vip_} port(s) {','.join(map(str, sorted(opts.ports)))}")
    return finish(out, json_out)


# --- tickle ------------------------------------------------------------------------------
TICKLE_DOC = """Make the clients of a VIP that just arrived here reconnect at once.

    Run it right after the VIP is up (IPaddr2 post-start). It lifts this node's
    quarantine of the VIP, ends sockets left from the VIP's last stay here,
    announces the VIP (gratuitous ARP / unsolicited NA) so answers come here, then
    sends each known client tuple a tickle ACK: the client answers, this host has
    no such socket and resets it, and the client reconnects without waiting for
    its retransmission timer.

    It paces itself: at most --rate ACKs per second and --max-packets in all
    (defaults 25,000/s and 200,000: three rounds of the longest client list the
    state dir keeps, 65,536 tuples). Client tuples read from the state dir are
    checked one by one (family, scope, ports); refused ones are counted in one line.
    """


TICKLE_OPTIONS = (
    VIP.but(help="The VIP that has just arrived here."),
    Opt("--state-dir", "state_dir", str, None, "DIR", "Read the VIP's client tuples from here."),
    Opt("--client", "client", str, (), "ADDR:PORT", "A client tuple ADDR:PORT to tickle (repeatable).",
        multiple=True),
    PORT,
    Opt("--rounds", "rounds", int, 3, "N",
        "Tickle rounds at 0, 0.6, 1.5 s, ... (stops early per client once it reconnected)."),
    Opt("--rate", "rate", int, TICKLE_RATE_PPS, "PPS",
        "At most this many tickle ACKs per second (nfsreset.core.pace.TICKLE_RATE_PPS): a round of N tuples "
        "takes N/rate s, and the next round starts no earlier."),
    Opt("--max-packets", "max_packets", int, TICKLE_MAX_PACKETS, "N",
        "At most this many tickle ACKs in all rounds of this call (nfsreset.core.pace.TICKLE_MAX_PACKETS); the "
        "rest are not sent, and the outcome says so."),
    Opt("--wait", "wait", float, 0.0, "S",
        "First wait up to this many seconds for the VIP to be configured and usable here (IPv6: DAD "
        "done). Start it in the background just before IPaddr2 start: IPaddr2 announces an IPv6 VIP "
        "for ~0.8 s before a post-start hook could run."),
    STRATEGY.but(help="How to end sockets left from the VIP's last stay here: auto|destroy|rst|nft."),
    STORE,
    NETNS,
    DRY_RUN.but(help="Say what would be done; send nothing."),
    JSON,
)


def tickle(*, vip: str, state_dir: str | None, client: list[str], port: list[int], rounds: int, rate: int,
           max_packets: int, wait: float, strategy: str, store: str, netns_name: str | None, dry_run: bool,
           json_out: bool) -> int:
    from nfsreset.core import pace
    from nfsreset.core import plan as P
    from nfsreset.core.model import FlowKey, family_of
    vip_ = parse_vip(vip)
    ports = parse_ports(port)
    if rounds < 0 or rounds > 10:
        raise Fail(f"--rounds must be 0-10, not {rounds}")
    for flag, value, (lo, hi) in (("--rate", rate, pace.RATE_RANGE),
                                  ("--max-packets", max_packets, pace.MAX_PACKETS_RANGE)):
        if not lo <= value <= hi:
            raise Fail(f"{flag} must be {lo:,}-{hi:,}, not {value}")
    sessions = parse_clients(client, need_port=True)
    if state_dir is None and not sessions:
        raise Fail("give --state-dir DIR (client tuples recorded by the old owner) or --client ADDR:PORT")
    for s in sessions:
        if family_of(s.client) != family_of(vip_):
            raise Fail(f"--client {s.client} is not of the VIP's address family")
    if not 0 <= wait <= 600:
        raise Fail(f"--wait must be 0-600 seconds, not {wait}")
    if not dry_run:
        need_root("it sends raw packets and changes nftables")
    check_netns(netns_name)
    state = open_state(state_dir, dry_run, store)
    known = [FlowKey(vip_, p, s.client, s.cport) for s in sessions for p in ports]
    if state is not None:
        from nfsreset.state.statedir import StateError
        try:
            known += state.read_clients(vip_)
        except StateError as e:
            raise Fail(str(e), e.exit_code) from None
    opts = P.Options(vips=frozenset({vip_}), ports=ports, strategy=check_strategy(strategy), tickle_rounds=rounds,
                     tickle_rate=rate, tickle_max_packets=max_packets)
    from nfsreset.engine import Engine
    with in_netns(netns_name):
        check_pending(state, vip_)     # before anything is done; the engine reads it again
        if wait and not _wait_usable(vip_, wait):
            raise Fail(f"{vip_} was not configured and usable here within {wait:g} s; nothing sent", 1)
        out = Engine(opts, state=state, dry_run=dry_run, log=say).run(P.Moment.POST_START, vip_,
                                                                      known_clients=known)
    note_lacking(out)
    if not known and out.code == 0:
        say(f"no known client of {vip_} to tickle")
    return finish(out, json_out)


def _wait_usable(vip: str, timeout: float) -> bool:
    import time
    from nfsreset.kernel import addrs
    deadline = time.monotonic() + timeout
    while True:
        if any(a.ip == vip and not a.tentative for a in addrs.dump()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


# The commands cli_hooks runs without typer: name -> (options, body).
HOOKS = {"kill": (KILL_OPTIONS, kill), "tickle": (TICKLE_OPTIONS, tickle)}
