"""`nfsreset lab`: the failover lab as a command (registered by nfsreset/cli/main.py).

Module-level imports stay at typer: the lab modules load when the command runs.
"""
from __future__ import annotations

import math
import os
import sys

import typer
from typing import Optional  # not `str | None`: Debian 12's typer 0.7 cannot read PEP 604 unions



def _fail(msg: str) -> None:
    typer.echo(f"nfsreset lab: {msg}", err=True)
    raise typer.Exit(2)


class _Progress:
    """One line per phase (a move: failover or failback of one run) on stderr,
    `[3/8] nfsreset (IPaddr2nfs under Pacemaker), IPv6: failback ...`; on a tty a
    status line below it shows the stage and the seconds waited."""

    def __init__(self, stream=None, total: int = 0) -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label = ""
        self.total = total          # phases in the whole lab: runs x 2
        self.done_phases = 0
        self._phase = None          # (label, direction) of the phase shown last
        self._status = False

    def _line(self, text: str) -> None:
        self.stream.write(("\r\x1b[K" if self._status else "") + text + "\n")
        self._status = False
        self.stream.flush()

    def __call__(self, stage: str, elapsed: float | None, limit: float | None) -> None:
        # A run's set-up belongs to its failover phase: the line comes at once.
        direction = "failback" if stage.startswith("failback") else "failover"
        if (self.label, direction) != self._phase:
            self._phase = (self.label, direction)
            self.done_phases += 1
            self._line(f"[{self.done_phases}/{self.total}] {self.label}: {direction} ...")
        if self.tty:
            text = f"  {stage}" + (f" {elapsed:.1f} s / cap {limit:g} s" if elapsed is not None else "")
            self.stream.write("\r" + text + "\x1b[K")
            self._status = True
            self.stream.flush()

    def done(self) -> None:
        if self._status:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._status = False


# What each mover is, in a progress line.
_MOVER_WORDS = {"ip": "ip addr, like IPaddr2", "ipaddr2": "IPaddr2", "ocf": "IPaddr2nfs",
                "pacemaker": "IPaddr2 under Pacemaker", "pacemaker-ocf": "IPaddr2nfs under Pacemaker"}


def run_label(mover: str, remedy: str, family: int, vers: str | None = None, state: str | None = None) -> str:
    """A run in words: `baseline (IPaddr2 under Pacemaker), IPv4`; `nfsreset watch (...)`."""
    if remedy == "none":
        what = "nfsreset" if mover in ("ocf", "pacemaker-ocf") else "baseline"
    else:
        what = f"nfsreset {remedy}" if remedy in ("watch", "hooks") else f"remedy {remedy}"
    extra = [x for x in (f"NFSv{vers}" if vers else None, f"state {state}" if state else None) if x]
    return f"{what} ({_MOVER_WORDS.get(mover, mover)}), " + ", ".join([f"IPv{family}"] + extra)


# `nfsreset lab` with none of --server/--mover/--remedy/--vers/--crash: the
# problem and the fix as a new user would deploy them (see the help text).
DEFAULT_SHOW = {"server": "ganesha", "vers": ["3"], "mover": ["pacemaker", "pacemaker-ocf"], "remedy": ["none"]}
# Any of them named: the others fall back to these (the lab as it always was).
DEFAULT_EXPLICIT = {"server": "sim", "mover": ["ip"], "remedy": ["none"]}


def resolve_defaults(server: str | None, mover: list[str], remedy: list[str], vers: list[str],
                     crash: bool) -> tuple[str, list[str], list[str], list[str], bool]:
    """(server, movers, remedies, versions, showcase): the no-option showcase when
    nothing that picks the experiment was given, else the options with the
    older defaults filled in."""
    if server is None and not mover and not remedy and not vers and not crash:
        d = DEFAULT_SHOW
        return d["server"], list(d["mover"]), list(d["remedy"]), list(d["vers"]), True
    d = DEFAULT_EXPLICIT
    return (server if server is not None else d["server"], list(mover) or list(d["mover"]),
            list(remedy) or list(d["remedy"]), list(vers), False)


def lab(
    family: str = typer.Option("both", "--family", metavar="FAMILY", help="4, 6 or both: which VIP (198.51.100.10, 2001:db8::10) to move."),
    cap: float = typer.Option(20.0, "--cap", metavar="S", help="Longest wait for the client after each move, in seconds; a longer stall shows as >CAP."),
    remedy: list[str] = typer.Option([], "--remedy", metavar="NAME", help="Remedy to run around the moves (repeat, or comma-separate, to compare side by side); 'none' (default) is the baseline."),
    mover: list[str] = typer.Option([], "--mover", metavar="NAME", help="What moves the VIP: ip (ip addr + send_arp/send_ua, timed like IPaddr2), ipaddr2 (the real ocf:heartbeat:IPaddr2 agent), ocf (the real ocf:nfsreset:IPaddr2nfs agent, nfsreset inside), pacemaker (a real Corosync + Pacemaker cluster, VIP as ocf:heartbeat:IPaddr2), pacemaker-ocf (same cluster, VIP as ocf:nfsreset:IPaddr2nfs). Repeat or comma-separate to compare side by side."),
    crash: bool = typer.Option(False, "--crash", help="Pacemaker movers only: the failover is a crash of node1 (its cluster stack SIGKILLed, its VIP and link gone); node1 then rejoins and the failback is a planned move."),
    server: Optional[str] = typer.Option(None, "--server", metavar="NAME", help="What the heads run: sim (a Python server that keeps its sockets when the VIP is deleted, like NFS-Ganesha; fast, record echo), sim-nfsd (the same server, but it aborts the VIP's sockets the moment the address is deleted, as kernel nfsd >= 4.5 does: nothing is left to record after the stop), or ganesha (real NFS-Ganesha + rpcbind on each head, exporting one lab directory; the client speaks real NFS)."),
    vers: list[str] = typer.Option([], "--vers", metavar="VERSION", help="With --server ganesha: NFS version the client speaks, 3, 4.0 or 4.1 (repeat or comma-separate to compare; default 3). The sim server only echoes records."),
    state: str = typer.Option("per-head", "--state", metavar="WHERE", help="Where nfsreset keeps its client list on the heads: per-head (one state dir each, as on two real machines) or shared (one dir both heads see)."),
    user_timeout: float = typer.Option(180.0, "--user-timeout", metavar="S", help="Client TCP_USER_TIMEOUT in seconds (Linux NFS: timeo x (retrans+1) = 180)."),
    gap: Optional[float] = typer.Option(None, "--gap", metavar="S", help="Seconds from the VIP's removal on the old owner to its start (ip addr add, or the agent's start) on the new one; default 1. With a Pacemaker mover only when given: the VIP is grouped after an ocf:heartbeat:Delay resource whose stop sleeps S s (a slow exportfs stop: --gap 12)."),
    strategy: Optional[str] = typer.Option(None, "--strategy", metavar="NAME", help="Passed to remedies that use nfsreset (auto, destroy, rst or nft) and to the ocf mover's agent (nfsreset_strategy)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step of the lab on stderr."),
) -> None:
    """Show what a VIP move does to a TCP client, in throwaway network namespaces.

    Builds node1, node2 and a client on a private bridge (documentation
    addresses only; the host's network is not touched) and moves the VIP
    node1 -> node2 (failover), then back (failback).

    With no options (none of --server, --mover, --remedy, --vers, --crash) it
    shows the problem and the fix side by side, as a new user would deploy
    them: real NFS-Ganesha on both heads, the client speaking NFSv3, a real
    Corosync + Pacemaker cluster moving the VIP with crm_resource --move.
    Column `pacemaker` is the baseline, the plain ocf:heartbeat:IPaddr2 every
    cluster runs today: its failback gets no reply within the cap (node1 still
    holds the client's old socket and answers with bare ACKs; the client waits
    for its 180 s user timeout). Column `pacemaker-ocf` is the fix as
    deployed, the VIP as ocf:nfsreset:IPaddr2nfs (the agent runs nfsreset at
    stop and start; nothing else to install): first reply ~0.03 s after the
    VIP is usable. IPv4 and IPv6; about 2 minutes here. The `watch` daemon is
    the other way to deploy it (--mover pacemaker --remedy watch); it is left
    out of the default to keep the run short.

    --state per-head (the default) gives each head its own nfsreset state
    dir, as on two real machines: a head knows only the clients it served
    itself, unless the list reaches it another way. The agent publishes it
    through Pacemaker's attrd (nfsreset_store=auto), so under Pacemaker it is
    as fast per head as with --state shared (one dir both heads see).
    `watch` (--remedy watch) runs on each head's host, beside the cluster
    node, and finds attrd there as on a real head (--store auto): it
    publishes its list within 1 s of a change and the new owner tickles it,
    after a planned move or a crash (--crash). docs/lab.md has the figures.

    Name any of --server/--mover/--remedy/--vers/--crash and the others take
    the lab's plain defaults: --server sim (a Python server that keeps its
    sockets when the VIP goes, like NFS-Ganesha; fast, record echo), --mover
    ip (ip addr, timed like IPaddr2), --remedy none.

    --mover ipaddr2,ocf moves the VIP with the real resource agents called
    directly: plain ocf:heartbeat:IPaddr2 (the baseline) and this project's
    ocf:nfsreset:IPaddr2nfs (cli/ocf/nfsreset, running the real nfsreset; keep
    --remedy none, the agent is the remedy), with each agent's stop and start
    times.

    --mover pacemaker,pacemaker-ocf runs a real two-node Corosync + Pacemaker
    cluster (one node per head, seeded CIB, ~8 s cold start) and moves the VIP
    as an operator does: crm_resource --move, then --clear. --remedy
    hooks|watch also work with `pacemaker` (hooks run when the kernel shows
    the delete, not inside Pacemaker). Pacemaker decides the gap between
    stop and start, unless --gap is given: then the VIP is seeded in a group after
    an ocf:heartbeat:Delay resource (startdelay 0, stopdelay S), so a planned
    move is VIP stop, S seconds, VIP start elsewhere, like the seed setup's
    exportfs stop (~12 s): `nfsreset lab --mover pacemaker,pacemaker-ocf
    --gap 12 --cap 30 --family 4`. Add --crash to make the failover a crash
    of node1 (no stop runs on a crashed node, so no delay either).

    --server sim-nfsd is the sim server taught kernel nfsd's habit (Linux >=
    4.5): it listens for address deletions (rtnetlink) and aborts every
    socket on the deleted address at once (linger 0, shutdown, close), so
    the old owner holds no session after the stop and the agent must have
    recorded its clients before IPaddr2 deleted the address:
    `nfsreset lab --server sim-nfsd --mover pacemaker,pacemaker-ocf
    --family 4`.

    --server ganesha runs real NFS-Ganesha on both heads (each in its own mount
    and PID namespace, private /run and /var/lib/nfs, about 0.1-0.3 s to
    listen) and the client sends NFSv3 GETATTR after MOUNT, or NFSv4.0/4.1
    COMPOUND with GETATTR (--vers); a stall is measured on replies that say
    NFS_OK.

    Several --remedy, --mover or --vers options run each one and print them side by side.
    Needs root. Takes about 2 x (cap + 8) seconds per family, mover and remedy.
    """
    # -- validate everything before a single namespace exists -------------------------
    server, mover, remedy, vers, showcase = resolve_defaults(server, mover, remedy, vers, crash)
    families = {"4": [4], "6": [6], "both": [4, 6]}.get(family.strip().lower())
    if families is None:
        _fail(f"--family must be 4, 6 or both, not {family!r}")
    if not (math.isfinite(cap) and cap > 0):
        _fail(f"--cap must be a positive number of seconds, not {cap:g}")
    if gap is not None and not (math.isfinite(gap) and 0 <= gap <= 60):
        _fail(f"--gap must be between 0 and 60 seconds, not {gap:g}")
    # A Pacemaker mover gets a Delay resource only when --gap was given.
    stop_delay, gap = gap, (1.0 if gap is None else gap)
    if not (math.isfinite(user_timeout) and user_timeout >= 1):
        _fail(f"--user-timeout must be at least 1 second, not {user_timeout:g}")
    from nfsreset.core.plan import STRATEGIES

    if strategy is not None and strategy not in STRATEGIES:
        _fail(f"--strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    from nfsreset.lab.remedies import load_plugins

    known = load_plugins()
    names = [n.strip() for item in remedy for n in item.split(",") if n.strip()]
    if not names:
        _fail("--remedy needs a name; known: " + ", ".join(sorted(known)))
    unknown = [n for n in names if n not in known]
    if unknown:
        _fail(f"unknown remedy {unknown[0]!r}; known: {', '.join(sorted(known))}")
    names = list(dict.fromkeys(names))
    from nfsreset.lab.mover import MOVERS

    movers = list(dict.fromkeys(n.strip() for item in mover for n in item.split(",") if n.strip()))
    if not movers:
        _fail("--mover needs a name; known: " + ", ".join(MOVERS))
    unknown = [n for n in movers if n not in MOVERS]
    if unknown:
        _fail(f"unknown mover {unknown[0]!r}; known: {', '.join(MOVERS)}")
    from nfsreset.lab.mover import PACEMAKER_MOVERS
    from nfsreset.lab.mover_ocf import AgentError, agent_path

    if crash and any(n not in PACEMAKER_MOVERS for n in movers):
        _fail(f"--crash needs a Pacemaker mover ({', '.join(PACEMAKER_MOVERS)}), not "
              f"{next(n for n in movers if n not in PACEMAKER_MOVERS)!r}")
    for name in movers:
        try:
            if name in PACEMAKER_MOVERS:
                from nfsreset.lab.mover_pacemaker import check_installed
                check_installed(name)
            elif name != "ip":
                agent_path(name)
        except AgentError as e:
            _fail(str(e))
    server = server.strip().lower()
    from nfsreset.lab.run import SERVERS, VERSIONS

    if server not in SERVERS:
        _fail(f"--server must be {', '.join(SERVERS)}, not {server!r}")
    versions = list(dict.fromkeys(v.strip() for item in vers for v in item.split(",") if v.strip()))
    from nfsreset.lab.run import SIM_SERVERS

    if server in SIM_SERVERS and versions:
        _fail(f"--vers needs --server ganesha: the {server} server only echoes records")
    versions = versions or [VERSIONS[server][0]]
    bad = [v for v in versions if v not in VERSIONS[server]]
    if bad:
        _fail(f"--vers must be {', '.join(VERSIONS[server])}, not {bad[0]!r}")
    if server == "ganesha":
        from nfsreset.lab.ganesha import available

        missing = available()
        if missing:
            _fail(f"--server ganesha: {missing}")
    state = state.strip().lower()
    from nfsreset.lab.run import STATES

    if state not in STATES:
        _fail(f"--state must be {' or '.join(STATES)}, not {state!r}")
    if os.geteuid() != 0:
        _fail("needs root (it creates network namespaces)")

    from nfsreset.lab import report
    from nfsreset.lab.run import run_lab

    progress = _Progress(total=2 * len(families) * len(movers) * len(versions) * len(names))
    log = (lambda msg: typer.echo(f"\r\x1b[K  {msg}" if progress.tty else f"  {msg}", err=True)) if verbose else None
    results = []
    restore = _sigterm_raises()
    try:
        for fam in families:
            for how in movers:
                for ver in versions:
                    for name in names:
                        progress.label = run_label(how, name, fam, ver if server not in SIM_SERVERS else None)
                        try:
                            results.append(run_lab(fam, cap, known[name](), user_timeout=user_timeout, gap=gap,
                                                   progress=progress, strategy=strategy, log=log, mover=how,
                                                   server=server, vers=ver, crash=crash, state=state,
                                                   stop_delay=stop_delay if how in PACEMAKER_MOVERS else None))
                        except Exception as e:
                            results.append(report.FamilyResult(family=fam, remedy=name, vip="", mover=how,
                                                               server=server, vers=ver, state=state,
                                                               error=f"{type(e).__name__}: {e}"))
                        progress.done_phases = 2 * len(results)   # a failed run keeps the count
    except KeyboardInterrupt:
        progress.done()
        typer.echo("nfsreset lab: interrupted; the lab's namespaces are removed", err=True)
        raise typer.Exit(130)
    finally:
        restore()
    progress.done()
    if json_out:
        typer.echo(report.format_json(results, cap, gap, user_timeout, strategy))
    else:
        typer.echo(report.format_text(results, cap, gap, user_timeout))
        if showcase:
            typer.echo("\n" + report.showcase_note(results, cap))
    if any(r.error for r in results):
        raise typer.Exit(1)



def _sigterm_raises():
    """SIGTERM behaves like Ctrl-C while the lab runs, so `finally` removes the namespaces."""
    import signal

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread: leave SIGTERM alone
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, old)
