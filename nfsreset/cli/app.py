"""The typer front end: every command's --help, and parsing for all but the hooks.

Each command is made from a table of options (nfsreset.cli.common.Opt: flag,
name, type, default, metavar, help): `command()` turns the table into the
signature typer reads, and calls the body with keyword arguments. `kill` and
`tickle` are parsed by nfsreset.cli.hooks when they run (typer costs ~75 ms of
a hook's start), from the very same tables, which live in nfsreset.cli.common
with their bodies. `lab` declares its options in typer (nfsreset.lab.command).

Every command's help ends with worked examples (`examples:`, one comment per line,
as bcc's tools do); tests/unit/test_cli_style.py checks they are there.
"""
from __future__ import annotations

import inspect
import json
import sys
from typing import List, Optional

import typer

from nfsreset.cli import common as cli
from nfsreset.cli import doctor, flows
from nfsreset.cli.common import (
    DRY_RUN, JSON, NETNS, PORT, REQUIRED, STORE, STRATEGY, VIP, Fail, Opt, check_netns, check_strategy,
    need_root, open_state, parse_ports, parse_vip,
)


def examples(text: str) -> str:
    """A help epilog of worked examples, kept as written: click rewraps an epilog
    paragraph unless it starts with a \\b line."""
    return "\b\n" + text.strip("\n")


def _annotation(o: Opt):
    # typing.List/Optional, not list[int] | None: Debian 12's typer 0.7 cannot read those.
    if o.multiple:
        return List[o.type]
    return Optional[o.type] if o.default is None else o.type


def signature_of(options: tuple[Opt, ...]) -> inspect.Signature:
    """The typer signature a table of options stands for: typer reads a command's
    options from its callback's signature, and this is that signature."""
    params = []
    for o in options:
        default = ... if o.default is REQUIRED else list(o.default) if o.multiple else o.default
        info = typer.Option(default, *o.flags, metavar=o.metavar or None, help=o.help)
        params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=_annotation(o)))
    return inspect.Signature(params)


# command name -> its option table, as registered (kill and tickle: the very tables cli_hooks parses with).
OPTIONS: dict[str, tuple[Opt, ...]] = {}
BODIES: dict = {}    # command -> the body its table feeds (tests check they agree)


def command(name: str, options: tuple[Opt, ...], body, help: str | None = None, epilog: str = "") -> None:
    """Register `nfsreset NAME`: its options from the table, the body called with keywords."""
    OPTIONS[name] = options
    BODIES[name] = body
    def callback(**kwargs):
        return body(**kwargs)
    callback.__name__ = callback.__qualname__ = name
    callback.__doc__ = body.__doc__
    callback.__signature__ = signature_of(options)
    callback.__annotations__ = {o.name: _annotation(o) for o in options}
    app.command(name, help=help, epilog=examples(epilog) if epilog else None)(callback)


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


def usage_error(argv: list[str], click_message: str) -> str:
    """The words for a command line click refused: those of cli_hooks.parse over the
    same table, so both front ends say the same on every typer (0.29 words a bad
    number as pydantic does, Debian's 0.7 as click 8.1 does); click's own words
    for a command without a table (lab) or a line the table parser accepts."""
    if argv and argv[0] in OPTIONS:
        from nfsreset.cli.hooks import parse
        try:
            parse(OPTIONS[argv[0]], argv[1:])
        except Fail as e:
            return str(e)
    return click_message


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
        print(f"nfsreset {cli.command_name()}: {usage_error(sys.argv[1:], e.format_message())}".replace("\n", " "),
              file=sys.stderr)
        sys.exit(2)
    except (Abort, _Interrupted, KeyboardInterrupt):
        cli.interrupted()
    except Exception as e:
        cli.internal_error(e)
    sys.exit(code if isinstance(code, int) else 0)


# --- kill and tickle: options and bodies in cli_common; parsed by cli_hooks when run -------
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


command("kill", cli.KILL_OPTIONS, cli.kill, help=cli.KILL_DOC, epilog=KILL_EXAMPLES)


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


command("tickle", cli.TICKLE_OPTIONS, cli.tickle, help=cli.TICKLE_DOC, epilog=TICKLE_EXAMPLES)


# --- flows -----------------------------------------------------------------------------
FLOWS_EXAMPLES = """examples:
    nfsreset flows                      # sessions on port 2049, every address
    nfsreset flows --vip 198.51.100.10  # only the sessions on this VIP
    nfsreset flows -w                   # add queues and sequence numbers
    nfsreset flows --port 2049 --port 111
                                        # sessions on ports 2049 and 111
    nfsreset flows --netns node1 --json # inside netns node1, as JSON
"""


command("flows", flows.OPTIONS, flows.flows, epilog=FLOWS_EXAMPLES)


# --- doctor ------------------------------------------------------------------------------
DOCTOR_EXAMPLES = """examples:
    nfsreset doctor                     # checks and strategies of this host
    nfsreset doctor --netns node1       # the same inside netns node1
    nfsreset doctor -w                  # one line per check, for grep
    nfsreset doctor --json              # as one JSON object
"""


command("doctor", doctor.OPTIONS, doctor.doctor, epilog=DOCTOR_EXAMPLES)


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


WATCH_OPTIONS = (
    VIP.but(default=(), multiple=True, help="A VIP to watch (repeatable)."),
    PORT.but(default=(), help=cli.PORT_HELP + " Default 2049."),
    Opt("--state-dir", "state_dir", str, None, "DIR",
        "Client tuples per VIP, kept current for the peer (default /var/lib/nfsreset)."),
    NETNS,
    STRATEGY.but(default=None, help="auto|destroy|rst|nft (default auto)."),
    Opt("--metrics", "metrics", str, None, "HOST:PORT", "Serve Prometheus text metrics on HOST:PORT."),
    Opt("--config", "config", str, None, "FILE",
        "TOML file with vips, ports, state_dir, strategy, netns, metrics; command-line options win."),
    STORE.but(default=None, help="Client lists also through Pacemaker's attrd (attrd), only the state dir "
                                 "(dir), or attrd if it runs here (auto, the default)."),
    Opt("--no-bpf", "no_bpf", bool, False, help="Do not load the BPF flow tracker; use sock_diag dumps."),
    DRY_RUN.but(help="Log what would be done; change nothing."),
    Opt(("--quiet", "-q"), "quiet", bool, False, help="Log only warnings, errors, start and stop."),
    Opt(("--verbose", "-v"), "verbose", bool, False, help="Log per-pass details too (debug)."),
)


def watch(*, vip: list[str], port: list[int], state_dir: str | None, netns_name: str | None,
          strategy: str | None, metrics: str | None, config: str | None, store: str | None, no_bpf: bool,
          dry_run: bool, quiet: bool, verbose: bool) -> int:
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
            vips = frozenset(parse_vip(v) for v in vip)
        elif doc.get("vips"):
            vips = frozenset(doc["vips"])           # checked by load_config
        else:
            raise Fail("give at least one --vip (or vips = [...] in --config)")
        ports = parse_ports(list(port) or doc.get("ports") or [2049])
        strat = check_strategy(strategy if strategy is not None else doc.get("strategy", "auto"))
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
    check_netns(cfg.netns)
    need_root("it loads BPF, destroys sockets and changes nftables")
    # The metrics port first: if it is taken, nothing else may have been created yet.
    try:
        metrics_sock = bind_metrics(*cfg.metrics, cfg.netns) if cfg.metrics else None
    except ConfigError as e:
        raise Fail(str(e)) from None
    open_state(cfg.state_dir, dry_run)
    return run_daemon(cfg, metrics_sock)


command("watch", WATCH_OPTIONS, watch, epilog=WATCH_EXAMPLES)


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
