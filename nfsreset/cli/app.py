"""The typer front end: every command's --help, and parsing for all but the hooks.

`kill` and `tickle` are parsed by nfsreset.cli_hooks when they run (typer costs
~75 ms of a hook's start); they are declared here too, for `--help` and for the
command list, and their bodies live in nfsreset.cli_common. tests/unit/test_cli_parity.py
keeps the two declarations the same.

Every command's help ends with worked examples (`examples:`, one comment per line,
as bcc's tools do); tests/unit/test_cli_style.py checks they are there.
"""
from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from nfsreset.cli import common as cli
from nfsreset.cli.common import NETNS_HELP, PORT_HELP, Fail, _in_netns, _need_root, _netns, _ports, _state, _strategy, _vip
from nfsreset.core.pace import TICKLE_MAX_PACKETS, TICKLE_RATE_PPS


def examples(text: str) -> str:
    """A help epilog of worked examples, kept as written: click rewraps an epilog
    paragraph unless it starts with a \\b line."""
    return "\b\n" + text.strip("\n")


ROOT_EXAMPLES = """examples:
    nfsreset flows                      # sessions on port 2049, stale or not
    nfsreset kill --vip 198.51.100.10   # the VIP left: end its sessions here
    nfsreset tickle --vip 198.51.100.10 --state-dir /var/lib/nfsreset
                                        # it arrived: its clients reconnect
    nfsreset watch --vip 198.51.100.10  # a daemon doing both by itself
    nfsreset doctor                     # what this kernel and host offer
    nfsreset COMMAND -h                 # a command's options and examples
"""

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    # -h as well as --help, for the group and (inherited) every command.
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Make TCP clients (NFS first) recover at once when a floating IP (VIP) moves between "
         "cluster nodes: end the stale sessions a VIP leaves behind, and tickle its clients "
         "where it arrives.",
    epilog=f"An unexpected error prints one line `nfsreset CMD: internal error: ...` and exits 1; "
           f"set {cli.DEBUG_ENV}=1 to see its traceback too.\n\n" + examples(ROOT_EXAMPLES),
)


def _print_version(value: bool) -> None:
    if value:
        print(f"nfsreset {cli.version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "-V", "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    pass


class _Interrupted(BaseException):
    """Ctrl-C inside a command, carried past typer: typer 0.29 turns KeyboardInterrupt
    into a silent exit code 130 when not in standalone mode."""


def _interruptible(callback):
    import functools

    @functools.wraps(callback)
    def run(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt:
            raise _Interrupted() from None
    return run


def main() -> None:
    # typer 0.29 vendors click as typer._click (its Abort lives in typer.exceptions);
    # Debian 12's typer 0.7 uses click 8.1, which has no NoArgsIsHelpError (it
    # prints the help and exits 0 itself). typer.Abort is the right class in both.
    try:
        from typer._click import exceptions as click_exc
    except ImportError:
        from click import exceptions as click_exc
    no_args_help = getattr(click_exc, "NoArgsIsHelpError", ())
    Abort = typer.Abort
    try:
        group = typer.main.get_command(app)
        for command in group.commands.values():
            command.callback = _interruptible(command.callback)
        code = group.main(standalone_mode=False)
    except Fail as e:
        cli.fail_exit(e)
    except no_args_help as e:
        print(e.format_message())
        sys.exit(0)
    except click_exc.UsageError as e:
        print(f"nfsreset {cli._command()}: {e.format_message()}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except (Abort, _Interrupted, KeyboardInterrupt):
        cli.interrupted()
    except Exception as e:
        cli.internal_error(e)
    sys.exit(code if isinstance(code, int) else 0)


# --- kill and tickle: declared for --help; parsed by cli_hooks when run ---------------------
KILL_EXAMPLES = """examples:
    nfsreset kill --vip 198.51.100.10   # the VIP left: record its clients in
                                        # /var/lib/nfsreset, end its sessions
    nfsreset kill --vip 2001:db8::10 --moment pre-start
                                        # it is about to arrive: end sessions
                                        # left from its last stay here
    nfsreset kill --vip 198.51.100.10 --dry-run
                                        # say what it would do; change nothing
    nfsreset kill --vip 198.51.100.10 --port 2049 --port 20048
                                        # sessions on ports 2049 and 20048
    nfsreset kill --vip 198.51.100.10 --client 203.0.113.7
                                        # only this client's sessions
    nfsreset kill --vip 198.51.100.10 --client 203.0.113.7:871 --force
                                        # this one session, though the VIP is
                                        # configured here
    nfsreset kill --vip 198.51.100.10 --netns node1 --json
                                        # inside netns node1; outcome as JSON
"""


@app.command(help=cli.KILL_DOC, epilog=examples(KILL_EXAMPLES))
def kill(
    vip: str = typer.Option(..., "--vip", metavar="VIP",
                            help="The VIP whose sessions to end. It must NOT be configured here."),
    client: List[str] = typer.Option([], "--client", metavar="ADDR[:PORT]",
                                     help="Only sessions of this client: ADDR or ADDR:PORT (repeatable)."),
    port: List[int] = typer.Option([2049], "--port", metavar="PORT", help=PORT_HELP),
    state_dir: Optional[str] = typer.Option("/var/lib/nfsreset", "--state-dir", metavar="DIR",
                                            help="Where the VIP's client tuples are recorded for the node that takes it over."),
    strategy: str = typer.Option("auto", "--strategy", metavar="NAME",
                                 help="auto: destroy, else exact RST, else nft guard. Or force one: destroy|rst|nft."),
    store: str = typer.Option("auto", "--store", metavar="NAME",
                              help="Where client lists travel: dir (the state dir), attrd "
                              "(also Pacemaker's attribute daemon: every node's list is read), auto (attrd if it "
                              "runs here, else dir)."),
    moment: str = typer.Option("post-stop", "--moment", metavar="MOMENT",
                               help="post-stop (the VIP just left: record clients, quarantine, end sessions) or "
                                    "pre-start (the VIP is about to arrive: only end sessions left from its last stay)."),
    force: bool = typer.Option(False, "--force", help="Allow ending sessions of a VIP configured here, "
                                                     "but only those named exactly with --client ADDR:PORT."),
    netns_name: Optional[str] = typer.Option(None, "--netns", metavar="NAME", help=NETNS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be done; change nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as one JSON object on stdout."),
) -> int:
    return cli.kill(vip, client, port, state_dir, strategy, moment, force, netns_name, dry_run, json_out, store)


TICKLE_EXAMPLES = """examples:
    nfsreset tickle --vip 198.51.100.10 --state-dir /var/lib/nfsreset
                                        # the clients the old owner recorded
    nfsreset tickle --vip 2001:db8::10 --client '[2001:db8::7]:871'
                                        # one client tuple, no state dir
    nfsreset tickle --vip 198.51.100.10 --state-dir /var/lib/nfsreset \\
        --wait 10 &                     # started just before IPaddr2 start:
                                        # waits until the VIP is usable here
    nfsreset tickle --vip 198.51.100.10 --state-dir /var/lib/nfsreset \\
        --rate 5000                     # at most 5,000 tickle ACKs a second
    nfsreset tickle --vip 198.51.100.10 --client 203.0.113.7:871 --dry-run
                                        # say what would be sent; send nothing
"""


@app.command(help=cli.TICKLE_DOC, epilog=examples(TICKLE_EXAMPLES))
def tickle(
    vip: str = typer.Option(..., "--vip", metavar="VIP", help="The VIP that has just arrived here."),
    state_dir: Optional[str] = typer.Option(None, "--state-dir", metavar="DIR",
                                            help="Read the VIP's client tuples from here."),
    client: List[str] = typer.Option([], "--client", metavar="ADDR:PORT",
                                     help="A client tuple ADDR:PORT to tickle (repeatable)."),
    port: List[int] = typer.Option([2049], "--port", metavar="PORT", help=PORT_HELP),
    rounds: int = typer.Option(3, "--rounds", metavar="N", help="Tickle rounds at 0, 0.6, 1.5 s, ... (stops early per client once it reconnected)."),
    rate: int = typer.Option(TICKLE_RATE_PPS, "--rate", metavar="PPS", help="At most this many tickle ACKs per second "
                             "(nfsreset.pace.TICKLE_RATE_PPS): a round of N tuples takes N/rate s, and the next "
                             "round starts no earlier."),
    max_packets: int = typer.Option(TICKLE_MAX_PACKETS, "--max-packets", metavar="N", help="At most this many tickle ACKs in "
                                    "all rounds of this call (nfsreset.pace.TICKLE_MAX_PACKETS); the rest are not "
                                    "sent, and the outcome says so."),
    wait: float = typer.Option(0.0, "--wait", metavar="S", help="First wait up to this many seconds for the VIP to be configured "
                               "and usable here (IPv6: DAD done). Start it in the background just before IPaddr2 "
                               "start: IPaddr2 announces an IPv6 VIP for ~0.8 s before a post-start hook could run."),
    strategy: str = typer.Option("auto", "--strategy", metavar="NAME",
                                 help="How to end sockets left from the VIP's last stay here: auto|destroy|rst|nft."),
    store: str = typer.Option("auto", "--store", metavar="NAME",
                              help="Where client lists travel: dir (the state dir), attrd "
                              "(also Pacemaker's attribute daemon: every node's list is read), auto (attrd if it "
                              "runs here, else dir)."),
    netns_name: Optional[str] = typer.Option(None, "--netns", metavar="NAME", help=NETNS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be done; send nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as one JSON object on stdout."),
) -> int:
    return cli.tickle(vip, state_dir, client, port, rounds, rate, max_packets, wait, strategy, netns_name, dry_run,
                      json_out, store)


# --- flows -----------------------------------------------------------------------------
FLOWS_EXAMPLES = """examples:
    nfsreset flows                      # sessions on port 2049, every address
    nfsreset flows --vip 198.51.100.10  # only the sessions on this VIP
    nfsreset flows -w                   # add queues and sequence numbers
    nfsreset flows --port 2049 --port 111
                                        # sessions on ports 2049 and 111
    nfsreset flows --netns node1 --json # inside netns node1, as JSON
"""


@app.command(epilog=examples(FLOWS_EXAMPLES))
def flows(
    vip: List[str] = typer.Option([], "--vip", metavar="VIP",
                                  help="Only sessions on this VIP (repeatable). Default: every local address."),
    port: List[int] = typer.Option([2049], "--port", metavar="PORT", help=PORT_HELP),
    netns_name: Optional[str] = typer.Option(None, "--netns", metavar="NAME", help=NETNS_HELP),
    wide: bool = typer.Option(False, "-w", "--wide", help="Add the columns RECVQ, SENDQ and, while `watch` "
                              "runs with BPF here, SND_NXT and RCV_NXT."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object: sessions and a summary per VIP "
                                  "(every column, whether or not --wide)."),
) -> int:
    """Show the sessions on the watched ports, and which are stale.

    A session is stale when its local address is not configured here (the VIP
    moved away and the socket stayed). Exit code 1 when any is stale, so a
    monitor can call it during and after a move. The table fits 80 columns
    unless addresses are long; AGE is known only while `watch` runs here.
    """
    import time
    from nfsreset.kernel import addrs, netns, sockdiag
    from nfsreset.core.plan import is_stale
    from nfsreset.daemon.livetable import read_live_table
    vips = [_vip(v) for v in vip]
    ports = _ports(port)
    with _in_netns(netns_name):
        pairs = sockdiag.dump(local_ips=vips or None, local_ports=sorted(ports))
        # after the dump, and with a FIB lookup per address seen (`local` route ranges)
        local = addrs.local_ips(vips=set(vips) | {f.key.vip for f, _ in pairs})
        live = read_live_table(netns.current_inode())
    # A running `watch` for this namespace knows what a dump cannot: how old each
    # session is and its sequence numbers (from BPF). Queues come from the dump.
    tracked = {}
    if live is not None:
        for r in live.get("flows", []):
            tracked[(r["vip"], r["vport"], r["client"], r["cport"])] = r
    now = time.monotonic()
    rows = []
    for f, _ in sorted(pairs, key=lambda p: p[0].key):
        t = tracked.get((f.key.vip, f.key.vport, f.key.client, f.key.cport), {})
        first = t.get("first_seen")
        rows.append({"vip": f.key.vip, "vport": f.key.vport, "client": f.key.client, "cport": f.key.cport,
                     "state": f.state, "age_s": round(now - first, 1) if first else None,
                     "recvq": f.recvq, "sendq": f.sendq,
                     "snd_nxt": t.get("snd_nxt"), "rcv_nxt": t.get("rcv_nxt"),
                     "stale": is_stale(f, local)})
    summary: dict[str, dict] = {}
    for r in rows:
        s = summary.setdefault(r["vip"], {"sessions": 0, "stale": 0, "configured": r["vip"] in local})
        s["sessions"] += 1
        s["stale"] += r["stale"]
    for v in vips:
        summary.setdefault(v, {"sessions": 0, "stale": 0, "configured": v in local})
    source = f"watch pid {live['pid']}" if live else "sock_diag dump"
    if json_out:
        # The last move report per VIP (`watch` only: a dump cannot know it).
        moves = {v: m for v, m in (live or {}).get("moves", {}).items() if not vips or v in vips}
        print(json.dumps({"source": source, "sessions": rows, "vips": summary, "moves": moves}))
    else:
        for line in flows_table(rows, wide, seqs=bool(live is not None and live.get("bpf"))):
            print(line)
        print(f"# source: {source}")
        for v, s in sorted(summary.items()):
            where = "configured here" if s["configured"] else "NOT configured here"
            print(f"# {v}: {s['sessions']} session(s), {s['stale']} stale; {where}")
    return 1 if any(r["stale"] for r in rows) else 0


def flows_table(rows: list[dict], wide: bool, seqs: bool) -> list[str]:
    """The `flows` table, each column as wide as its widest cell. By default five
    columns: within 80 while VIP:PORT and CLIENT:PORT take at most 26 characters
    each (`[2001:db8::100]:65535` takes 21) and AGE at most 8. --wide adds the
    queues (and sequence numbers when the BPF tracker knows them): bcc's tools too
    keep extended columns behind a flag."""
    from nfsreset.core.model import format_endpoint
    cols = ["VIP", "CLIENT", "STATE", "AGE", "STALE"] + (["RECVQ", "SENDQ"] if wide else [])
    if wide and seqs:
        cols += ["SND_NXT", "RCV_NXT"]
    right = {"AGE", "RECVQ", "SENDQ", "SND_NXT", "RCV_NXT"}
    cells = []
    for r in rows:
        row = {"VIP": format_endpoint(r["vip"], r["vport"]), "CLIENT": format_endpoint(r["client"], r["cport"]),
               "STATE": r["state"], "AGE": f"{r['age_s']:.0f}s" if r["age_s"] is not None else "-",
               "STALE": "STALE" if r["stale"] else "-", "RECVQ": str(r["recvq"]), "SENDQ": str(r["sendq"]),
               "SND_NXT": "-" if r["snd_nxt"] is None else str(r["snd_nxt"]),
               "RCV_NXT": "-" if r["rcv_nxt"] is None else str(r["rcv_nxt"])}
        cells.append([row[c] for c in cols])
    width = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]

    def line(values: list[str]) -> str:
        return " ".join(v.rjust(w) if c in right else v.ljust(w)
                        for c, v, w in zip(cols, values, width)).rstrip()
    return [line(cols)] + [line(row) for row in cells]


# --- doctor ------------------------------------------------------------------------------
DOCTOR_EXAMPLES = """examples:
    nfsreset doctor                     # checks and strategies of this host
    nfsreset doctor --netns node1       # the same inside netns node1
    nfsreset doctor --json              # as one JSON object
"""


@app.command(epilog=examples(DOCTOR_EXAMPLES))
def doctor(
    netns_name: Optional[str] = typer.Option(None, "--netns", metavar="NAME", help=NETNS_HELP),
    json_out: bool = typer.Option(False, "--json", help="One JSON object with every check and strategy."),
    vip: List[str] = typer.Option([], "--vip", metavar="VIP", help="Also say whose client list of this VIP is visible "
                                  "from here (repeatable)."),
    store: str = typer.Option("auto", "--store", metavar="NAME", help="The client-list store to describe: auto|dir|attrd."),
) -> int:
    """Say what this kernel and host offer, and which strategies follow.

    Checks BTF, tracefs, bcc and the BPF flow tracker, SOCK_DESTROY (by destroying
    a loopback connection of its own), raw sockets, nftables and kernel headers,
    and which client-list store is active (dir or Pacemaker's attrd) and whose
    lists are visible from here. Exit 1 when no strategy to end stale sessions
    is available.
    """
    from nfsreset.cli.doctor import checks, strategies
    from nfsreset.state.store import describe
    vips = [_vip(v) for v in vip]
    with _in_netns(netns_name):
        results = checks()
    store_info = describe(store, vips)      # attrd's IPC is in the cluster's namespace, not --netns
    strat = strategies(results)
    if json_out:
        print(json.dumps({"checks": results, "strategies": strat, "store": store_info}))
    else:
        for name, r in results.items():
            print(f"{'ok' if r['ok'] else '--':<3} {name:<14} {r['why']}")
        print()
        for name, r in strat.items():
            print(f"{'yes' if r['ok'] else 'no':<4} strategy {name:<8} {r['why']}")
        print()
        print(f"{'ok' if store_info.get('ok') else '--':<3} {'store':<14} {store_info['backend']}: "
              f"{store_info['why']}")
        for v, row in store_info.get("vips", {}).items():
            seen = ", ".join(f"{h}: {n if isinstance(n, str) else f'{n} tuple(s)'}" for h, n in row.items())
            print(f"    {v}: {seen or 'no node has published a list'}")
    return 0 if any(r["ok"] for k, r in strat.items() if k in ("destroy", "rst", "nft")) else 1


# --- watch -----------------------------------------------------------------------------
WATCH_EXAMPLES = """examples:
    nfsreset watch --vip 198.51.100.10  # act when this VIP leaves or arrives
    nfsreset watch --vip 198.51.100.10 --vip 2001:db8::10
                                        # two VIPs
    nfsreset watch --config /etc/nfsreset/nfs.toml
                                        # VIPs, ports, ... from a file
    nfsreset watch --vip 198.51.100.10 --metrics 127.0.0.1:9449
                                        # serve Prometheus metrics there
    nfsreset watch --vip 198.51.100.10 --no-bpf --dry-run
                                        # sock_diag dumps only; log what would
                                        # be done, change nothing
"""


@app.command(epilog=examples(WATCH_EXAMPLES))
def watch(
    vip: List[str] = typer.Option([], "--vip", metavar="VIP", help="A VIP to watch (repeatable)."),
    port: List[int] = typer.Option([], "--port", metavar="PORT", help=PORT_HELP + " Default 2049."),
    state_dir: Optional[str] = typer.Option(None, "--state-dir", metavar="DIR", help="Client tuples per VIP, kept current "
                                            "for the peer (default /var/lib/nfsreset)."),
    netns_name: Optional[str] = typer.Option(None, "--netns", metavar="NAME", help=NETNS_HELP),
    strategy: Optional[str] = typer.Option(None, "--strategy", metavar="NAME",
                                           help="auto|destroy|rst|nft (default auto)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", metavar="HOST:PORT",
                                          help="Serve Prometheus text metrics on HOST:PORT."),
    config: Optional[str] = typer.Option(None, "--config", metavar="FILE", help="TOML file with vips, ports, state_dir, strategy, "
                                         "netns, metrics; command-line options win."),
    store: Optional[str] = typer.Option(None, "--store", metavar="NAME", help="Client lists also through Pacemaker's attrd "
                                        "(attrd), only the state dir (dir), or attrd if it runs here (auto, "
                                        "the default)."),
    no_bpf: bool = typer.Option(False, "--no-bpf", help="Do not load the BPF flow tracker; use sock_diag dumps."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Log what would be done; change nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log only warnings, errors, start and stop."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log per-pass details too (debug)."),
) -> int:
    """Run as a daemon: act the moment a VIP leaves or arrives.

    When a watched VIP is deleted here it records the VIP's clients, quarantines
    it and destroys its sessions; when it arrives it ends sessions left from its
    last stay, announces it and tickles the clients the old owner recorded. It
    keeps the state dir current while it owns a VIP. Prints a line containing
    `ready` on stderr once it is watching. SIGTERM/SIGINT: clean shutdown.
    """
    from nfsreset.daemon.config import Config, ConfigError, load_config, parse_metrics
    from nfsreset.daemon.daemon import run_daemon
    from nfsreset.daemon.metrics import bind_metrics
    # A command-line option wins over the config whenever it was given, even as ''
    # (`is not None`, not `or`: `--netns ''` must be an error, not "no namespace").
    try:
        doc = load_config(config) if config is not None else {}
        if vip:
            vips = frozenset(_vip(v) for v in vip)
        elif doc.get("vips"):
            vips = frozenset(doc["vips"])           # checked by load_config
        else:
            raise Fail("give at least one --vip (or vips = [...] in --config)")
        ports = _ports(list(port) or doc.get("ports") or [2049])
        strat = _strategy(strategy if strategy is not None else doc.get("strategy", "auto"))
        if metrics is not None:
            mtarget = parse_metrics(metrics)
        else:
            mtarget = parse_metrics(doc["metrics"]) if "metrics" in doc else None
        sdir = state_dir if state_dir is not None else doc.get("state_dir", "/var/lib/nfsreset")
        if not sdir:
            raise Fail("--state-dir: '' is not a directory (an empty path)")
        cfg = Config(vips=vips, ports=ports, state_dir=sdir, strategy=strat,
                     netns=netns_name if netns_name is not None else doc.get("netns"),
                     metrics=mtarget, dry_run=dry_run, bpf=not no_bpf,
                     log_level="notice" if quiet else "debug" if verbose else "info",
                     store=store if store is not None else doc.get("store", "auto"))
        if quiet and verbose:
            raise Fail("--quiet and --verbose contradict each other; give one")
        from nfsreset.state.store import BACKENDS
        if cfg.store not in BACKENDS:
            raise Fail(f"--store must be one of {', '.join(BACKENDS)}, not {cfg.store!r}")
    except ConfigError as e:
        raise Fail(str(e)) from None
    _netns(cfg.netns)
    _need_root("it loads BPF, destroys sockets and changes nftables")
    # The metrics port first: if it is taken, nothing else may have been created yet.
    try:
        metrics_sock = bind_metrics(*cfg.metrics, cfg.netns) if cfg.metrics else None
    except ConfigError as e:
        raise Fail(str(e)) from None
    _state(cfg.state_dir, dry_run)
    return run_daemon(cfg, metrics_sock)


# `lab` lives with the lab; its module imports only typer at load time.
from nfsreset.lab.command import lab  # noqa: E402

LAB_EXAMPLES = """examples:
    nfsreset lab                        # IPv4 and IPv6, no remedy: see the
                                        # failback stall (needs root)
    nfsreset lab --family 4 --remedy none,hooks
                                        # baseline and hooks side by side
    nfsreset lab --mover ipaddr2,ocf    # the real resource agents
    nfsreset lab --mover pacemaker,pacemaker-ocf --crash
                                        # a real cluster; failover by a crash
    nfsreset lab --server ganesha --vers 3,4.1
                                        # real NFS-Ganesha, NFSv3 and NFSv4.1
    nfsreset lab --family 6 --cap 10 --json
                                        # IPv6 only, stalls capped at 10 s
"""

app.command("lab", epilog=examples(LAB_EXAMPLES))(lab)
