"""Command line: `nfsreset COMMAND` (the entry point; exit codes and error lines in nfsreset.cli.common).

Two front ends, built from one table of options per command (nfsreset.cli.common.Opt):
- `kill` and `tickle` are exec'd by cluster agents at the worst moment of a
  failover, and their first destroy or packet must leave within ~0.1 s of exec.
  They are parsed by nfsreset.cli.hooks, a small parser over their option
  tables. Typer is not imported on that path: typer 0.29 imports pydantic and
  builds a TypeAdapter per option while parsing, ~75 ms of a ~140 ms hook
  (bench/README.md, bench_hook_latency.py).
- Every other command, `-h`/`--help` of every command and `-V`/`--version` go
  through typer (nfsreset.cli.app), whose commands are made from the same
  tables. tests/unit/test_cli_parity.py checks both parse any line alike.
Nothing imports this module back: it only picks a front end.
"""
from __future__ import annotations

import sys

# Commands parsed without typer (see above).
HOOK_COMMANDS = ("kill", "tickle")
HELP_FLAGS = ("-h", "--help")


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in HOOK_COMMANDS and not any(a in HELP_FLAGS for a in argv[1:]):
        from nfsreset.cli.hooks import run
        sys.exit(run(argv[0], argv[1:]))
    from nfsreset.cli.app import main as typer_main
    typer_main()
