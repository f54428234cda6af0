"""Argument parsing for the hook commands `kill` and `tickle`, without typer.

Cluster agents exec these at the worst moment of a failover; typer would spend
~75 ms importing pydantic and building a TypeAdapter per option before the
first socket is touched. This parser reads the same option specs
(cli_common.KILL_OPTIONS, TICKLE_OPTIONS) that cli_app builds the typer
commands from, and follows click's order and wording of errors, so an operator
sees the same message whichever front end parsed the line
(tests/unit/test_cli_parity.py runs both on the same lines).
"""
from __future__ import annotations

from nfsreset.cli import common
from nfsreset.cli.common import REQUIRED, Fail, Opt

_TYPE_WORD = {int: "integer", float: "float"}


def parse(options: tuple[Opt, ...], argv: list[str]) -> dict:
    """argv (after the command name) -> the body's keyword arguments. Raises Fail.

    As click does: first the words (unknown option, missing value, a value given
    to a flag), then each option's value, those given in the order first given,
    then the rest in declaration order (a missing required one), last any extra
    argument. A single-valued option given twice keeps the last value."""
    by_flag = {f: o for o in options for f in o.flags}
    raw: dict[str, list[str | bool]] = {}          # option name -> values, in the order given
    extra: list[str] = []
    rest = list(argv)

    def take(flag: str, opt: Opt, value: str | None) -> None:
        if opt.type is bool:
            raw.setdefault(opt.name, []).append(True)
            return
        if value is None:
            if not rest:
                raise Fail(f"Option '{flag}' requires an argument.")
            value = rest.pop(0)
        raw.setdefault(opt.name, []).append(value)

    while rest:
        arg = rest.pop(0)
        if arg == "--":
            extra += rest
            break
        if not arg.startswith("-") or arg == "-":
            extra.append(arg)
            continue
        flag, eq, inline = arg.partition("=")
        opt = by_flag.get(flag) if flag.startswith("--") else None
        if opt is not None:
            if eq and opt.type is bool:
                raise Fail(f"Option '{flag}' does not take a value.")
            take(flag, opt, inline if eq else None)
        elif flag.startswith("--"):
            raise Fail(_no_such_option(flag, by_flag))
        else:
            # short options, clustered as click reads them: -qv, -n5, -w=... (`=` is one more option)
            for k, ch in enumerate(arg[1:], start=2):
                opt = by_flag.get("-" + ch)
                if opt is None:
                    raise Fail(f"No such option: -{ch}")
                if opt.type is not bool:
                    take("-" + ch, opt, arg[k:] or None)
                    break
                take("-" + ch, opt, None)
    out = {}
    given = sorted((o for o in options if o.name in raw), key=lambda o: list(raw).index(o.name))
    for opt in given + [o for o in options if o.name not in raw]:
        if opt.name in raw:
            values = [_convert(opt, v) for v in (raw[opt.name] if opt.multiple else raw[opt.name][-1:])]
            out[opt.name] = values if opt.multiple else values[0]
        elif opt.default is REQUIRED:
            raise Fail(f"Missing option '{opt.flag}'.")
        else:
            out[opt.name] = list(opt.default) if opt.multiple else opt.default
    if extra:
        raise Fail(f"Got unexpected extra argument{'s' if len(extra) > 1 else ''} ({' '.join(extra)})")
    return {o.name: out[o.name] for o in options}


def _convert(opt: Opt, text):
    if opt.type in (bool, str):
        return text
    try:
        return opt.type(text)
    except ValueError:
        raise Fail(f"Invalid value for '{opt.flag}': {text!r} is not a valid {_TYPE_WORD[opt.type]}.") from None


def _no_such_option(flag: str, by_flag: dict) -> str:
    """click's words (8.1), with its guess at a misspelt long flag."""
    from difflib import get_close_matches
    near = get_close_matches(flag, [f for f in [*by_flag, "--help"] if f.startswith("--")])
    if not near:
        return f"No such option: {flag}"
    if len(near) == 1:
        return f"No such option: {flag} Did you mean {near[0]}?"
    return f"No such option: {flag} (Possible options: {', '.join(sorted(near))})"


def run(command: str, argv: list[str]) -> int:
    """Parse and run one hook command; the exit code (errors already printed)."""
    options, body = common.HOOKS[command]
    try:
        return body(**parse(options, argv))
    except Fail as e:
        common.fail_exit(e)
    except KeyboardInterrupt:
        common.interrupted()
    except Exception as e:
        common.internal_error(e)
    return 2  # not reached: every handler exits
