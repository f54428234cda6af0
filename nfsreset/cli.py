"""Command line: `nfsreset COMMAND`. Imports stay lazy: hooks are exec'd at the
worst moment of a failover and every millisecond before the first packet counts."""
from __future__ import annotations

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Make TCP clients recover at once when a floating IP (VIP) moves between cluster nodes.",
)


def main() -> None:
    app()
