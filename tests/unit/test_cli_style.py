"""The CLI's conventions: -h as --help everywhere, -V/--version, worked examples at
the end of every command's help (bcc's style), metavars that name the thing, help
within 80 columns, and a `flows` table within 80 columns unless asked to be wide.

Each example's command line is parsed by the real parser of its command, so a
renamed or dropped option cannot leave a stale example behind.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
import typer

from nfsreset.cli import main as cli, app as cli_app, common as cli_common, doctor as cli_doctor, flows as cli_flows, hooks as cli_hooks

COMMANDS = sorted(typer.main.get_command(cli_app.app).commands)
ENV = {**os.environ, "COLUMNS": "80"}


NFSRESET = os.path.join(os.path.dirname(sys.executable), "nfsreset")   # the installed entry point


def _run(*argv):
    return subprocess.run([NFSRESET, *argv], capture_output=True, text=True, timeout=30, env=ENV)


def test_every_command_is_covered():
    assert COMMANDS == ["doctor", "flows", "kill", "lab", "tickle", "watch"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_dash_h_is_help(command):
    argv = [command] if command else []
    short, long = _run(*argv, "-h"), _run(*argv, "--help")
    assert (short.returncode, long.returncode) == (0, 0), short.stderr + long.stderr
    assert short.stdout == long.stdout and short.stdout.startswith(f"Usage: nfsreset {command or ''}".rstrip())
    assert "-h, --help" in short.stdout


@pytest.mark.parametrize("command", cli.HOOK_COMMANDS)
def test_dash_h_of_a_hook_is_not_parsed_by_the_hook_parser(command):
    # The hook parser would have said "Got unexpected extra argument (-h)"; -h anywhere asks for help.
    res = _run(command, "--vip", "198.51.100.10", "-h")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout == _run(command, "--help").stdout


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag):
    from importlib.metadata import version
    res = _run(flag)
    assert (res.returncode, res.stdout, res.stderr) == (0, f"nfsreset {version('nfsreset')}\n", "")
    assert res.stdout == "nfsreset 0.1.0\n"


def test_version_falls_back_to_the_package_constant(monkeypatch):
    import importlib.metadata

    import nfsreset

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", missing)
    monkeypatch.setattr(nfsreset, "__version__", "9.9.9")
    from nfsreset.cli import common as cli_common
    assert cli_common.version() == "9.9.9"


def _help(command: str | None) -> str:
    res = _run(*([command] if command else []), "--help")
    assert res.returncode == 0, res.stderr
    return res.stdout


def _examples(text: str) -> list[tuple[list[str], str]]:
    """(argv, comment) of each example after the `examples:` line; a command line
    ending in a backslash continues on the next."""
    lines = text.split("\n  examples:\n", 1)[1].splitlines()
    out: list[tuple[list[str], str]] = []
    pending = ""
    for ln in lines:
        cmd, _, comment = ln.partition("#")
        if cmd.strip():
            pending += cmd.strip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            out.append((shlex.split(pending.rstrip("& ")), ""))
            pending = ""
        elif not out or not comment.strip():
            raise AssertionError(f"neither an example nor its comment: {ln!r}")
        if comment.strip():
            out[-1] = (out[-1][0], f"{out[-1][1]} {comment.strip()}".strip())
    assert not pending, pending
    assert all(comment for _argv, comment in out), out    # one comment per example, as bcc writes them
    return out


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_help_ends_with_worked_examples_that_parse(command):
    examples = _examples(_help(command))
    assert len(examples) >= 3
    group = typer.main.get_command(cli_app.app)
    for argv, comment in examples:
        assert argv[0] == "nfsreset" and comment, argv
        if command is None:
            assert argv[1] in COMMANDS or argv[1:] == ["COMMAND", "-h"], argv
            continue
        assert argv[1] == command, argv
        sub = group.commands[command]
        ctx = sub.make_context(command, argv[2:])     # raises on an unknown option or a bad type
        assert ctx.params
        if command in cli.HOOK_COMMANDS:
            cli_hooks.parse(cli_common.HOOKS[command][0], argv[2:])   # and the parser the hooks use


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_fits_80_columns(command):
    text = _help(command)
    assert max(len(ln) for ln in text.splitlines()) <= 80, text


@pytest.mark.parametrize("command", COMMANDS)
def test_metavars_name_the_thing(command):
    text = _help(command)
    for generic in ("TEXT", "INTEGER", "FLOAT", "<list", "[str]", "[int]"):
        assert generic not in text, (command, generic)
    sub = typer.main.get_command(cli_app.app).commands[command]
    for p in sub.params:
        if getattr(p, "is_flag", False) or p.name == "help":
            continue
        assert p.metavar and p.metavar.upper() == p.metavar, (command, p.name, p.metavar)
    if command in ("kill", "tickle", "flows", "watch"):
        assert "--vip VIP" in text and "--port PORT" in text and "--netns NAME" in text
    if command == "kill":
        assert "--client ADDR[:PORT]" in text and "--state-dir DIR" in text
    if command == "tickle":
        assert "--client ADDR:PORT" in text and "--wait S" in text and "--rate PPS" in text
    if command == "watch":
        assert "--metrics HOST:PORT" in text


def test_lab_offers_only_strategies_that_exist():
    from nfsreset.core.plan import STRATEGIES
    text = " ".join(_help("lab").split())
    assert "guard" not in text and ", ".join(STRATEGIES[:-1]) + " or nft" in text
    # refused before anything is built; --server bogus: the old code failed on that
    # instead (it never checked --strategy), and a lab never starts either way.
    res = _run("lab", "--strategy", "guard", "--server", "bogus")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == "nfsreset lab: --strategy must be one of auto, destroy, rst, nft, not 'guard'\n"


# -- the flows table ---------------------------------------------------------------------------------
def _row(vip, vport, client, cport, stale=True, **kw):
    return {"vip": vip, "vport": vport, "client": client, "cport": cport, "state": kw.get("state", "ESTABLISHED"),
            "age_s": kw.get("age_s"), "recvq": kw.get("recvq", 0), "sendq": kw.get("sendq", 0),
            "snd_nxt": kw.get("snd_nxt"), "rcv_nxt": kw.get("rcv_nxt"), "stale": stale}


ROWS = [_row("2001:db8::10", 2049, "2001:db8::100", 65001, age_s=86399.6, recvq=123456, sendq=4194304,
             snd_nxt=4294967295, rcv_nxt=1),
        _row("2001:db8::10", 2049, "2001:db8::100", 871, stale=False, state="CLOSE_WAIT"),
        _row("198.51.100.10", 2049, "203.0.113.254", 1023)]


def test_flows_table_fits_80_columns_by_default_and_widens_on_request():
    table = cli_flows.flows_table(ROWS, wide=False, seqs=True)
    assert table[0].split() == ["VIP", "CLIENT", "STATE", "AGE", "STALE"]
    assert max(map(len, table)) <= 80, "\n".join(table)
    assert table[1].split() == ["[2001:db8::10]:2049", "[2001:db8::100]:65001", "ESTABLISHED", "86400s", "STALE"]
    assert table[2].split()[-1] == "-" and table[2].split()[3] == "-"
    wide = cli_flows.flows_table(ROWS, wide=True, seqs=True)
    assert wide[0].split() == ["VIP", "CLIENT", "STATE", "AGE", "STALE", "RECVQ", "SENDQ", "SND_NXT", "RCV_NXT"]
    assert wide[1].split()[5:] == ["123456", "4194304", "4294967295", "1"]
    assert wide[2].split()[7:] == ["-", "-"]
    # sequence numbers only when a BPF tracker supplies them
    assert cli_flows.flows_table(ROWS, wide=True, seqs=False)[0].split()[-1] == "SENDQ"


def test_flows_table_columns_line_up():
    table = cli_flows.flows_table(ROWS, wide=True, seqs=True)
    header = table[0]
    for ln in table[1:]:
        # each right-aligned number ends where its header does
        for name in ("RECVQ", "SENDQ", "RCV_NXT"):
            end = header.index(name) + len(name)
            assert ln[end - 1] != " " and (end == len(ln) or ln[end] == " "), (name, ln)


# -- the doctor report -------------------------------------------------------------------------------
LONG = ("SOCK_DESTROY unavailable: the kernel refused sock_diag destroy with EOPNOTSUPP "
        "(CONFIG_INET_DIAG_DESTROY is not set in /boot/config-6.1.0-28-amd64)")


def test_doctor_report_wraps_within_80_columns_and_wide_keeps_one_line_each():
    results = {"sock-destroy": {"ok": False, "why": LONG}, "btf": {"ok": True, "why": "/sys/kernel/btf/vmlinux"}}
    strat = {"destroy": {"ok": False, "why": LONG}, "rst": {"ok": True, "why": "raw sockets"}}
    store = {"ok": True, "backend": "dir", "why": "state dir /var/lib/nfsreset",
             "vips": {"2001:db8::10": {"node1": 3, "node2": "unreadable: " + LONG}}}
    lines = cli_doctor.doctor_lines(results, strat, store, wide=False)
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    assert lines[0].startswith("--  sock-destroy   SOCK_DESTROY unavailable:")
    assert lines[1].startswith(" " * 19) and lines[1][19] != " "          # continued under its column
    assert "ok  btf            /sys/kernel/btf/vmlinux" in lines
    wide = cli_doctor.doctor_lines(results, strat, store, wide=True)
    assert len(wide) == 2 + 1 + 2 + 1 + 1 + 1 and max(map(len, wide)) > 80
    assert wide[0] == f"--  sock-destroy   {LONG}"
    assert wide[4] == "yes  strategy rst      raw sockets"
    assert wide[-1] == f"    2001:db8::10: node1: 3 tuple(s), node2: unreadable: {LONG}"
    # the same words either way
    assert " ".join(" ".join(lines).split()) == " ".join(" ".join(wide).split())
