"""Command line: `nfsreset COMMAND`.

Exit codes, for every command: 0 done, 1 some sessions could not be ended (or,
for `flows`, stale sessions exist), 2 bad input, 3 refused for safety.
Errors are one line on stderr: `nfsreset CMD: what and why`.

Imports stay lazy: `kill` and `tickle` are exec'd at the worst moment of a
failover and their first destroy or packet must leave within ~0.1 s.
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Make TCP clients (NFS first) recover at once when a floating IP (VIP) moves between "
         "cluster nodes: end the stale sessions a VIP leaves behind, and tickle its clients "
         "where it arrives.",
)


class Fail(Exception):
    """A one-line error with its exit code."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def main() -> None:
    # typer vendors click as typer._click (0.29); its exceptions are not re-exported.
    from typer._click import exceptions as click_exc
    try:
        code = app(standalone_mode=False)
    except Fail as e:
        print(f"nfsreset {_command()}: {e}", file=sys.stderr)
        sys.exit(e.code)
    except click_exc.NoArgsIsHelpError as e:
        print(e.format_message())
        sys.exit(0)
    except click_exc.UsageError as e:
        print(f"nfsreset {_command()}: {e.format_message()}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except click_exc.Abort:
        print(f"nfsreset {_command()}: interrupted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(f"nfsreset {_command()}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _command() -> str:
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    return args[0] if args else ""


def _say(line: str) -> None:
    print(f"nfsreset {_command()}: {line}", file=sys.stderr, flush=True)


# --- shared option parsing ------------------------------------------------------------
PORT_HELP = "TCP port of the service on the VIP (repeatable). NFS: 2049."
NETNS_HELP = "Act inside this named network namespace (/run/netns/NAME); it must exist."


def _vip(text: str) -> str:
    from nfsreset.model import norm_ip
    try:
        return norm_ip(text)
    except ValueError:
        raise Fail(f"--vip: {text!r} is not an IP address") from None


def _ports(ports: List[int]) -> frozenset[int]:
    for p in ports:
        if not 0 < p < 65536:
            raise Fail(f"--port: {p} is not a TCP port (1-65535)")
    return frozenset(ports)


def _clients(texts: List[str], need_port: bool = False):
    from nfsreset.model import parse_endpoint
    from nfsreset.plan import Session
    out = []
    for t in texts:
        try:
            ip, port = parse_endpoint(t)
        except ValueError as e:
            raise Fail(f"--client: {e}") from None
        if need_port and port is None:
            raise Fail(f"--client: {t!r} needs a port (ADDR:PORT, [V6ADDR]:PORT)")
        out.append(Session(ip, port))
    return tuple(out)


def _strategy(s: str) -> str:
    from nfsreset.plan import STRATEGIES
    if s not in STRATEGIES:
        raise Fail(f"--strategy must be one of {', '.join(STRATEGIES)}, not {s!r}")
    return s


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise Fail(f"needs root ({what}); run with sudo or use --dry-run")


def _state(path: Optional[str]):
    if path is None:
        return None
    from nfsreset.statedir import StateDir, StateError
    try:
        return StateDir(path)
    except StateError as e:
        raise Fail(str(e), e.exit_code) from None
    except OSError as e:
        raise Fail(f"state dir {path}: {e.strerror}") from None


def _in_netns(name: Optional[str]):
    from nfsreset import netns
    if name is None:
        return netns.entered(None)
    if not netns.exists(name):
        raise Fail(f"--netns: network namespace {name!r} does not exist (see `ip netns list`)")
    return netns.entered(name)


def _finish(out, json_out: bool) -> int:
    if json_out:
        print(json.dumps(out.as_json(), indent=None))
    if out.reason:
        _say(out.reason)
    return out.code


# --- kill ------------------------------------------------------------------------------------
@app.command()
def kill(
    vip: str = typer.Option(..., "--vip", help="The VIP whose sessions to end. It must NOT be configured here."),
    client: List[str] = typer.Option([], "--client", help="Only sessions of this client: ADDR or ADDR:PORT (repeatable)."),
    port: List[int] = typer.Option([2049], "--port", help=PORT_HELP),
    state_dir: Optional[str] = typer.Option("/var/lib/nfsreset", "--state-dir",
                                            help="Where the VIP's client tuples are recorded for the node that takes it over."),
    strategy: str = typer.Option("auto", "--strategy",
                                 help="auto: destroy, else exact RST, else nft guard. Or force one: destroy|rst|nft."),
    moment: str = typer.Option("post-stop", "--moment",
                               help="post-stop (the VIP just left: record clients, quarantine, end sessions) or "
                                    "pre-start (the VIP is about to arrive: only end sessions left from its last stay)."),
    force: bool = typer.Option(False, "--force", help="Allow ending sessions of a VIP configured here, "
                                                     "but only those named exactly with --client ADDR:PORT."),
    netns_name: Optional[str] = typer.Option(None, "--netns", help=NETNS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be done; change nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as one JSON object on stdout."),
) -> int:
    """End every session on a VIP that is no longer (or not yet) configured here.

    Run it right after the VIP left this node (IPaddr2 post-stop) and right before
    it arrives (pre-start, with --moment pre-start). Sessions are destroyed in the
    kernel (SOCK_DESTROY), never reset towards the client from here: an early
    RST would push the client into SYN back-off before the new owner is up.
    """
    from nfsreset import plan as P
    vip_ = _vip(vip)
    opts = P.Options(vips=frozenset({vip_}), ports=_ports(port), strategy=_strategy(strategy),
                     clients=_clients(client), force=force)
    moments = {"post-stop": P.Moment.POST_STOP, "pre-start": P.Moment.PRE_START}
    if moment not in moments:
        raise Fail(f"--moment must be post-stop or pre-start, not {moment!r}")
    if not dry_run:
        _need_root("it destroys sockets and changes nftables")
    state = _state(state_dir)
    from nfsreset.engine import Engine
    with _in_netns(netns_name):
        out = Engine(opts, state=state, dry_run=dry_run, log=_say).run(moments[moment], vip_)
    if not out.steps and out.code == 0:
        _say(f"no session on {vip_} port(s) {','.join(map(str, sorted(opts.ports)))}")
    return _finish(out, json_out)


# --- tickle ------------------------------------------------------------------------------
@app.command()
def tickle(
    vip: str = typer.Option(..., "--vip", help="The VIP that has just arrived here."),
    state_dir: Optional[str] = typer.Option(None, "--state-dir", help="Read the VIP's client tuples from here."),
    client: List[str] = typer.Option([], "--client", help="A client tuple ADDR:PORT to tickle (repeatable)."),
    port: List[int] = typer.Option([2049], "--port", help=PORT_HELP),
    rounds: int = typer.Option(3, "--rounds", help="Tickle rounds at 0, 0.6, 1.5 s, ... (stops early per client once it reconnected)."),
    wait: float = typer.Option(0.0, "--wait", help="First wait up to this many seconds for the VIP to be configured "
                               "and usable here (IPv6: DAD done). Start it in the background just before IPaddr2 "
                               "start: IPaddr2 announces an IPv6 VIP for ~0.8 s before a post-start hook could run."),
    strategy: str = typer.Option("auto", "--strategy", help="How to end sockets left from the VIP's last stay here."),
    netns_name: Optional[str] = typer.Option(None, "--netns", help=NETNS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be done; send nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as one JSON object on stdout."),
) -> int:
    """Make the clients of a VIP that just arrived here reconnect at once.

    Run it right after the VIP is up (IPaddr2 post-start). It lifts this node's
    quarantine of the VIP, ends sockets left from the VIP's last stay here,
    announces the VIP (gratuitous ARP / unsolicited NA) so answers come here, then
    sends each known client tuple a tickle ACK: the client answers, this host has
    no such socket and resets it, and the client reconnects without waiting for
    its retransmission timer.
    """
    from nfsreset import plan as P
    from nfsreset.model import FlowKey, family_of
    vip_ = _vip(vip)
    ports = _ports(port)
    if rounds < 0 or rounds > 10:
        raise Fail(f"--rounds must be 0-10, not {rounds}")
    sessions = _clients(client, need_port=True)
    if state_dir is None and not sessions:
        raise Fail("give --state-dir DIR (client tuples recorded by the old owner) or --client ADDR:PORT")
    for s in sessions:
        if family_of(s.client) != family_of(vip_):
            raise Fail(f"--client {s.client} is not of the VIP's address family")
    if not dry_run:
        _need_root("it sends raw packets and changes nftables")
    state = _state(state_dir)
    known = [FlowKey(vip_, p, s.client, s.cport) for s in sessions for p in ports]
    if state is not None:
        from nfsreset.statedir import StateError
        try:
            known += state.read_clients(vip_)
        except StateError as e:
            raise Fail(str(e), e.exit_code) from None
    if not 0 <= wait <= 600:
        raise Fail(f"--wait must be 0-600 seconds, not {wait}")
    opts = P.Options(vips=frozenset({vip_}), ports=ports, strategy=_strategy(strategy), tickle_rounds=rounds)
    from nfsreset.engine import Engine
    with _in_netns(netns_name):
        if wait and not _wait_usable(vip_, wait):
            raise Fail(f"{vip_} was not configured and usable here within {wait:g} s; nothing sent", 1)
        out = Engine(opts, state=state, dry_run=dry_run, log=_say).run(P.Moment.POST_START, vip_,
                                                                      known_clients=known)
    if not known and out.code == 0:
        _say(f"no known client of {vip_} to tickle")
    return _finish(out, json_out)


def _wait_usable(vip: str, timeout: float) -> bool:
    import time
    from nfsreset import addrs
    deadline = time.monotonic() + timeout
    while True:
        if any(a.ip == vip and not a.tentative for a in addrs.dump()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


# --- flows -----------------------------------------------------------------------------
@app.command()
def flows(
    vip: List[str] = typer.Option([], "--vip", help="Only sessions on this VIP (repeatable). Default: every local address."),
    port: List[int] = typer.Option([2049], "--port", help=PORT_HELP),
    netns_name: Optional[str] = typer.Option(None, "--netns", help=NETNS_HELP),
    json_out: bool = typer.Option(False, "--json", help="One JSON object: sessions and a summary per VIP."),
) -> int:
    """Show the sessions on the watched ports, and which are stale.

    A session is stale when its local address is not configured here (the VIP
    moved away and the socket stayed). Exit code 1 when any is stale, so a
    monitor can call it during and after a move.
    """
    import time
    from nfsreset import addrs, netns, sockdiag
    from nfsreset.plan import is_stale
    from nfsreset.watch import read_live_table
    vips = [_vip(v) for v in vip]
    ports = _ports(port)
    with _in_netns(netns_name):
        local = addrs.local_ips()
        pairs = sockdiag.dump(local_ips=vips or None, local_ports=sorted(ports))
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
        print(json.dumps({"source": source, "sessions": rows, "vips": summary}))
    else:
        from nfsreset.model import format_endpoint
        seqs = live is not None and live.get("bpf")
        print(f"{'VIP':<28} {'CLIENT':<28} {'STATE':<12} {'AGE':>7} {'RECVQ':>7} {'SENDQ':>7}  STALE"
              + ("  SND_NXT/RCV_NXT" if seqs else ""))
        for r in rows:
            age = f"{r['age_s']:.0f}s" if r["age_s"] is not None else "-"
            seq = f"  {r['snd_nxt']}/{r['rcv_nxt']}" if seqs and r["snd_nxt"] is not None else ""
            print(f"{format_endpoint(r['vip'], r['vport']):<28} {format_endpoint(r['client'], r['cport']):<28} "
                  f"{r['state']:<12} {age:>7} {r['recvq']:>7} {r['sendq']:>7}  "
                  f"{'STALE' if r['stale'] else '-':<5}{seq}")
        print(f"# source: {source}")
        for v, s in sorted(summary.items()):
            where = "configured here" if s["configured"] else "NOT configured here"
            print(f"# {v}: {s['sessions']} session(s), {s['stale']} stale; {where}")
    return 1 if any(r["stale"] for r in rows) else 0


# --- doctor ------------------------------------------------------------------------------
@app.command()
def doctor(
    netns_name: Optional[str] = typer.Option(None, "--netns", help=NETNS_HELP),
    json_out: bool = typer.Option(False, "--json", help="One JSON object with every check and strategy."),
) -> int:
    """Say what this kernel and host offer, and which strategies follow.

    Checks BTF, tracefs, bcc and the BPF flow tracker, SOCK_DESTROY (by destroying
    a loopback connection of its own), raw sockets, nftables and kernel headers.
    Exit 1 when no strategy to end stale sessions is available.
    """
    from nfsreset.doctor import checks, strategies
    with _in_netns(netns_name):
        results = checks()
    strat = strategies(results)
    if json_out:
        print(json.dumps({"checks": results, "strategies": strat}))
    else:
        for name, r in results.items():
            print(f"{'ok' if r['ok'] else '--':<3} {name:<14} {r['why']}")
        print()
        for name, r in strat.items():
            print(f"{'yes' if r['ok'] else 'no':<4} strategy {name:<8} {r['why']}")
    return 0 if any(r["ok"] for k, r in strat.items() if k in ("destroy", "rst", "nft")) else 1


# --- watch -----------------------------------------------------------------------------
@app.command()
def watch(
    vip: List[str] = typer.Option([], "--vip", help="A VIP to watch (repeatable)."),
    port: List[int] = typer.Option([], "--port", help=PORT_HELP + " Default 2049."),
    state_dir: Optional[str] = typer.Option(None, "--state-dir", help="Client tuples per VIP, kept current "
                                            "for the peer (default /var/lib/nfsreset)."),
    netns_name: Optional[str] = typer.Option(None, "--netns", help=NETNS_HELP),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="auto|destroy|rst|nft (default auto)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Serve Prometheus text metrics on HOST:PORT."),
    config: Optional[str] = typer.Option(None, "--config", help="TOML file with vips, ports, state_dir, strategy, "
                                         "netns, metrics; command-line options win."),
    no_bpf: bool = typer.Option(False, "--no-bpf", help="Do not load the BPF flow tracker; use sock_diag dumps."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Log what would be done; change nothing."),
) -> int:
    """Run as a daemon: act the moment a VIP leaves or arrives.

    When a watched VIP is deleted here it records the VIP's clients, quarantines
    it and destroys its sessions; when it arrives it ends sessions left from its
    last stay, announces it and tickles the clients the old owner recorded. It
    keeps the state dir current while it owns a VIP. Prints a line containing
    `ready` on stderr once it is watching. SIGTERM/SIGINT: clean shutdown.
    """
    from nfsreset.watch import Config, ConfigError, load_config, parse_metrics, run_daemon
    try:
        doc = load_config(config) if config else {}
        vips_text = list(vip) or list(doc.get("vips") or [])
        if not vips_text:
            raise Fail("give at least one --vip (or vips = [...] in --config)")
        vips = frozenset(_vip(str(v)) for v in vips_text)
        ports = _ports(list(port) or [int(p) for p in doc.get("ports") or [2049]])
        strat = _strategy(strategy or doc.get("strategy") or "auto")
        mtext = metrics or doc.get("metrics")
        cfg = Config(vips=vips, ports=ports, state_dir=state_dir or doc.get("state_dir") or "/var/lib/nfsreset",
                     strategy=strat, netns=netns_name or doc.get("netns"),
                     metrics=parse_metrics(mtext) if mtext else None, dry_run=dry_run, bpf=not no_bpf)
    except ConfigError as e:
        raise Fail(str(e)) from None
    except (TypeError, ValueError) as e:
        raise Fail(f"bad config value: {e}") from None
    if cfg.netns is not None:
        from nfsreset import netns
        if not netns.exists(cfg.netns):
            raise Fail(f"--netns: network namespace {cfg.netns!r} does not exist (see `ip netns list`)")
    _need_root("it loads BPF, destroys sockets and changes nftables")
    _state(cfg.state_dir)
    return run_daemon(cfg)


# `lab` lives with the lab; its module imports only typer at load time.
from nfsreset.lab.command import lab  # noqa: E402

app.command("lab")(lab)
