"""Argument parsing for the hook commands `kill` and `tickle`, without typer.

Cluster agents exec these at the worst moment of a failover; typer would spend
~75 ms importing pydantic and building a TypeAdapter per option before the
first socket is touched. This parser reads a table of the same options that
nfsreset/cli_app.py declares for `--help` (tests/unit/test_cli_parity.py
compares the two) and words its errors like click does, so an operator sees
the same message whichever front end parsed the line.
"""
from __future__ import annotations

from nfsreset.cli import common
from nfsreset.core.pace import TICKLE_MAX_PACKETS, TICKLE_RATE_PPS

REQUIRED = object()

# flag -> (parameter name, type, default). A list type means repeatable: the
# given values replace the default, as with click's multiple=True.
OPTIONS: dict[str, dict[str, tuple[str, object, object]]] = {
    "kill": {
        "--vip": ("vip", str, REQUIRED),
        "--client": ("client", [str], []),
        "--port": ("port", [int], [2049]),
        "--state-dir": ("state_dir", str, "/var/lib/nfsreset"),
        "--strategy": ("strategy", str, "auto"),
        "--moment": ("moment", str, "post-stop"),
        "--force": ("force", bool, False),
        "--netns": ("netns_name", str, None),
        "--dry-run": ("dry_run", bool, False),
        "--json": ("json_out", bool, False),
        "--store": ("store", str, "auto"),
    },
    "tickle": {
        "--vip": ("vip", str, REQUIRED),
        "--state-dir": ("state_dir", str, None),
        "--client": ("client", [str], []),
        "--port": ("port", [int], [2049]),
        "--rounds": ("rounds", int, 3),
        "--rate": ("rate", int, TICKLE_RATE_PPS),
        "--max-packets": ("max_packets", int, TICKLE_MAX_PACKETS),
        "--wait": ("wait", float, 0.0),
        "--strategy": ("strategy", str, "auto"),
        "--netns": ("netns_name", str, None),
        "--dry-run": ("dry_run", bool, False),
        "--json": ("json_out", bool, False),
        "--store": ("store", str, "auto"),
    },
}

_TYPE_WORD = {int: "integer", float: "float"}


def parse(command: str, argv: list[str]) -> dict:
    """argv (after the command name) -> keyword arguments of cli_common.<command>(). Raises common.Fail."""
    table = OPTIONS[command]
    given: dict[str, object] = {}
    extra: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            extra.append(arg)
            continue
        flag, eq, inline = arg.partition("=")
        if flag not in table:
            raise common.Fail(f"No such option: {flag}")
        name, kind, _default = table[flag]
        if kind is bool:
            if eq:
                raise common.Fail(f"Option '{flag}' does not take a value.")
            given[name] = True
            continue
        if eq:
            text = inline
        elif i < len(argv):
            text = argv[i]
            i += 1
        else:
            raise common.Fail(f"Option '{flag}' requires an argument.")
        item = kind[0] if isinstance(kind, list) else kind
        try:
            value = item(text)
        except ValueError:
            raise common.Fail(f"Invalid value for '{flag}': {text!r} is not a valid {_TYPE_WORD[item]}.") from None
        if isinstance(kind, list):
            given.setdefault(name, []).append(value)
        else:
            given[name] = value
    if extra:
        raise common.Fail(f"Got unexpected extra argument{'s' if len(extra) > 1 else ''} ({' '.join(extra)})")
    out = {}
    for flag, (name, _kind, default) in table.items():
        if name in given:
            out[name] = given[name]
        elif default is REQUIRED:
            raise common.Fail(f"Missing option '{flag}'.")
        else:
            out[name] = list(default) if isinstance(default, list) else default
    return out


def run(command: str, argv: list[str]) -> int:
    """Parse and run one hook command; the exit code (errors already printed)."""
    try:
        return getattr(common, command)(**parse(command, argv))
    except common.Fail as e:
        common.fail_exit(e)
    except KeyboardInterrupt:
        common.interrupted()
    except Exception as e:
        common.internal_error(e)
    return 2  # not reached: every handler exits
