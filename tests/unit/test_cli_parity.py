"""One declaration of each option (cli_common.Opt tables) and two front ends built from it:
cli_hooks parses `kill`/`tickle` when they run, typer (cli_app) serves --help and
parses the other commands. Both must take the same options with the same
defaults and word errors alike; otherwise `nfsreset kill --help` would document a
command that runs differently.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import typer
from hypothesis import given, settings, strategies as st

from nfsreset.cli import main as cli, app as cli_app, common as cli_common, hooks as cli_hooks
from nfsreset.cli.common import REQUIRED, Fail

GROUP = typer.main.get_command(cli_app.app)
TABLED = sorted(cli_app.OPTIONS)        # every command built from a table (lab declares its own, in typer)


def test_the_hooks_and_typer_are_built_from_the_very_same_tables():
    assert set(cli.HOOK_COMMANDS) == set(cli_common.HOOKS)
    assert TABLED == ["doctor", "flows", "kill", "tickle", "watch"]
    assert sorted(GROUP.commands) == sorted(TABLED + ["lab"])
    for command, (options, _body) in cli_common.HOOKS.items():
        assert cli_app.OPTIONS[command] is options, command


@pytest.mark.parametrize("command", TABLED)
def test_each_typer_option_is_its_table_entry(command):
    options = cli_app.OPTIONS[command]
    params = [p for p in GROUP.commands[command].params if p.name != "help"]
    assert [p.name for p in params] == [o.name for o in options]      # help lists them in table order
    for p, o in zip(params, options):
        assert tuple(p.opts) + tuple(p.secondary_opts) == o.flags, o.name
        assert p.multiple == o.multiple and p.is_flag == (o.type is bool), o.name
        assert p.required == (o.default is REQUIRED), o.name
        if o.default is not REQUIRED:
            got = list(p.default) if isinstance(p.default, (list, tuple)) else p.default
            assert got == (list(o.default) if o.multiple else o.default), o.name
        assert (p.metavar or "") == o.metavar and p.help == o.help, o.name
        assert o.help and (o.type is bool or o.metavar.isupper()), o.name


@pytest.mark.parametrize("command", TABLED)
def test_the_bodies_take_the_table_names_as_keywords_only(command):
    body = cli_common.HOOKS[command][1] if command in cli_common.HOOKS else cli_app.BODIES[command]
    params = inspect.signature(body).parameters.values()
    assert sorted(p.name for p in params) == sorted(o.name for o in cli_app.OPTIONS[command])
    assert {p.kind for p in params} == {inspect.Parameter.KEYWORD_ONLY}


def _gist(message: str) -> str:
    """Which error, about what: the part every click and typer version words alike
    (typer 0.29 words a bad number as pydantic does; click 8.2 says `argument(s)`)."""
    import re
    for pattern in (r"No such option: \S+", r"Invalid value for '[^']+'", r"Got unexpected extra argument.*?\((.*)\)"):
        m = re.match(pattern, message)
        if m:
            return re.sub(r"argument\S*", "argument", m.group(0))
    return message


def _click(command: str, argv: list[str]):
    """click's (typer's) parse of a line: the parameters, or the gist of its error
    and the line main() prints for it."""
    from nfsreset.cli.app import usage_error
    try:
        ctx = GROUP.commands[command].make_context(command, list(argv))
    except Exception as e:           # a UsageError of typer's click, whichever typer this is
        return ("error", _gist(e.format_message()), usage_error([command, *argv], e.format_message()))
    return ("ok", {k: list(v) if isinstance(v, tuple) else v for k, v in ctx.params.items()})


def _hooks(command: str, argv: list[str]):
    try:
        return ("ok", cli_hooks.parse(cli_app.OPTIONS[command], list(argv)))
    except Fail as e:
        return ("error", _gist(str(e)), str(e))


LINES = [
    ["--vip=198.51.100.10", "--port", "2049", "--port", "111", "--force"],
    ["--vip", "2001:db8::10", "--wait", "1.5", "--rounds", "x", "--rounds", "2"],   # the last value counts
    ["--vip", "--port"],                                                          # a value may look like a flag
    ["--port", "x", "--bogus"],                    # an unknown option before a bad value, wherever it stands
    ["--port", "x", "--vip"], ["--rate", "fast", "--wait", "soon"], ["--wait", "soon", "--rate", "fast"],
    ["stray"], ["--vip", "1", "a", "b"], ["--vip", "1", "--", "--port"], ["--vip", "1", "-"],
    ["--vi", "1"], ["--hel"], ["--force=yes"], ["-x=1"], ["--vip=", "--port="], ["--client"],
]


@pytest.mark.parametrize("command", TABLED)
@pytest.mark.parametrize("argv", LINES, ids=[" ".join(a) for a in LINES])
def test_both_front_ends_parse_a_line_alike(command, argv):
    assert _hooks(command, argv) == _click(command, argv)


def _tokens(command: str):
    flags = [f for o in cli_app.OPTIONS[command] for f in o.flags]
    values = st.sampled_from(["198.51.100.10", "2001:db8::10", "1", "-1", "1.5", "x", "", "--", "-", "stray",
                              "--bogus", "--vi", "--port=", "-q", "-z"])
    flag = st.sampled_from(flags)
    return st.one_of(flag, values, st.builds(lambda f, v: f"{f}={v}", flag, values))


@pytest.mark.parametrize("command", TABLED)
def test_both_front_ends_parse_any_line_alike(command):
    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.lists(_tokens(command), max_size=7))
    def check(argv):
        assert _hooks(command, argv) == _click(command, argv)
    check()


def test_parse_fills_defaults_and_repeats():
    got = cli_hooks.parse(cli_common.KILL_OPTIONS, ["--vip=198.51.100.10", "--port", "2049", "--port", "111", "--force"])
    assert got["vip"] == "198.51.100.10" and got["port"] == [2049, 111] and got["force"] is True
    assert got["state_dir"] == "/var/lib/nfsreset" and got["client"] == [] and got["json_out"] is False
    got = cli_hooks.parse(cli_common.TICKLE_OPTIONS, ["--vip", "2001:db8::10", "--wait", "1.5"])
    assert got["wait"] == 1.5 and got["rounds"] == 3 and got["state_dir"] is None
    assert got["rate"] == 25_000 and got["max_packets"] == 200_000
    got = cli_hooks.parse(cli_common.TICKLE_OPTIONS, ["--vip", "2001:db8::10", "--rate", "100", "--max-packets=7"])
    assert got["rate"] == 100 and got["max_packets"] == 7


def _run(*argv):
    return subprocess.run([sys.executable, "-m", "nfsreset", *argv], capture_output=True, text=True, timeout=30)


BAD = [
    (["kill"], "Missing option '--vip'."),
    (["kill", "--vip"], "Option '--vip' requires an argument."),
    (["kill", "--vip", "198.51.100.10", "--port", "x"], "Invalid value for '--port': 'x' is not a valid integer."),
    (["tickle", "--vip", "198.51.100.10", "--wait", "soon"], "Invalid value for '--wait': 'soon' is not a valid float."),
    (["kill", "--vip", "198.51.100.10", "--bogus"], "No such option: --bogus"),
    (["kill", "--vip", "198.51.100.10", "--dryrun"], "No such option: --dryrun Did you mean --dry-run?"),
    (["kill", "--port", "x", "--bogus"], "No such option: --bogus"),
    (["tickle", "--vip", "198.51.100.10", "a", "b"], "Got unexpected extra arguments (a b)"),
    (["kill", "--vip", "198.51.100.10", "--force=yes"], "Option '--force' does not take a value."),
    (["tickle", "--vip", "198.51.100.10", "stray"], "Got unexpected extra argument (stray)"),
    (["tickle", "--vip", "198.51.100.10", "--rate", "fast"], "Invalid value for '--rate': 'fast' is not a valid integer."),
    (["tickle", "--vip", "198.51.100.10", "--rate", "0"], "--rate must be 1-1,000,000, not 0"),
    (["tickle", "--vip", "198.51.100.10", "--max-packets", "0"], "--max-packets must be 1-10,000,000, not 0"),
    (["tickle", "--vip", "198.51.100.10", "--max-packets", "10000001"],
     "--max-packets must be 1-10,000,000, not 10000001"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_command_lines_fail_with_one_line_and_exit_2(argv, message):
    for res in (_run(*argv), _run_typer(*argv)):        # the hook parser, and typer's
        assert res.returncode == 2
        assert res.stdout == ""
        assert res.stderr == f"nfsreset {argv[0]}: {message}\n"


@pytest.mark.parametrize("command", cli.HOOK_COMMANDS)
def test_help_still_comes_from_typer(command):
    res = _run(command, "--help")
    assert res.returncode == 0, res.stderr
    assert f"nfsreset {command} [OPTIONS]" in res.stdout.splitlines()[0]
    for o in cli_common.HOOKS[command][0]:
        assert f"{o.flag} {o.metavar}".strip() in res.stdout


def test_the_hook_path_does_not_import_typer():
    # The point of the second front end: measured ~75 ms of a ~140 ms hook.
    res = subprocess.run([sys.executable, "-c",
                          "import sys; sys.argv = ['nfsreset', 'kill']\n"
                          "from nfsreset.cli import main as cli\n"
                          "try:\n    cli.main()\n"
                          "except SystemExit:\n    pass\n"
                          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('typer', 'pydantic', 'click')))"],
                         capture_output=True, text=True, timeout=30)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


# -- bad values: the same one line from both front ends ------------------------------------------
# The hooks run through cli_hooks; typer parses them only for --help, but
# cli_app.main() is a complete front end for them too: both must word a bad
# value alike. --dry-run: these need no root and change nothing.
def _run_typer(*argv):
    code = ("import sys\nsys.argv = ['nfsreset', *sys.argv[1:]]\n"
            "from nfsreset.cli.app import main\nmain()")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=30)


BAD_VALUES = [
    (["kill", "--vip", "fe80::12%eth0"], "--vip: 'fe80::12%eth0' is a link-local address with a zone (%eth0)"),
    (["kill", "--vip", "0.0.0.0"], "--vip: '0.0.0.0' is the unspecified address"),
    (["tickle", "--vip", "ff02::1", "--client", "[2001:db8::7]:700"], "--vip: 'ff02::1' is a multicast address"),
    (["tickle", "--vip", "127.0.0.1", "--client", "198.51.100.7:700"], "--vip: '127.0.0.1' is a loopback address"),
    (["kill", "--vip", "198.51.100.10", "--netns", ""], "--netns: '' is not a network namespace name"),
    (["kill", "--vip", "198.51.100.10", "--netns", "../../proc/1/ns/net"],
     "--netns: '../../proc/1/ns/net' is not a network namespace name"),
    (["tickle", "--vip", "198.51.100.10", "--client", "198.51.100.7:700", "--netns", ".."],
     "--netns: '..' is not a network namespace name"),
    (["kill", "--vip", "198.51.100.10", "--state-dir", ""], "--state-dir: '' is not a directory"),
    (["tickle", "--vip", "2001:db8::10", "--client", "[fe80::1%eth0]:700"],
     "--client: 'fe80::1%eth0' is a link-local address with a zone"),
]


@pytest.mark.parametrize("argv, start", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_get_the_same_one_line_from_both_front_ends(argv, start, tmp_path):
    argv = [*argv, "--dry-run"]
    if "--state-dir" not in argv:
        argv += ["--state-dir", str(tmp_path / "state")]
    hook, typer_ = _run(*argv), _run_typer(*argv)
    for res in (hook, typer_):
        assert res.returncode == 2, res.stderr
        assert res.stdout == ""
        assert res.stderr.startswith(f"nfsreset {argv[0]}: {start}") and res.stderr.count("\n") == 1, res.stderr
    assert hook.stderr == typer_.stderr
    assert not os.path.exists(tmp_path / "state")


# A fault inside a command body, on either front end: one line and exit 1
# (the traceback only with NFSRESET_DEBUG=1); Ctrl-C: one line and exit 130.
_INJECT = ("import sys\nfront = sys.argv[1]\nsys.argv = ['nfsreset', *sys.argv[2:]]\n"
           "from nfsreset.cli import common as cli_common\n"
           "def body(*a, **k):\n"
           "    raise {exc}\n"
           "cli_common.parse_vip = body\n"      # the first thing the body of kill calls
           "if front == 'typer':\n"
           "    from nfsreset.cli.app import main\n"
           "else:\n"
           "    from nfsreset.cli.main import main\n"
           "main()")


def _inject(exc: str, front: str, env=None):
    argv = ["kill", "--vip", "198.51.100.10"]
    return subprocess.run([sys.executable, "-c", _INJECT.format(exc=exc), front, *argv], capture_output=True,
                          text=True, timeout=30, env=env)


@pytest.mark.parametrize("front", ["hooks", "typer"])
def test_an_unexpected_exception_is_one_line_and_exit_1(front):
    res = _inject("RuntimeError('the adapter\\nbroke')", front, env={**os.environ, "NFSRESET_DEBUG": ""})
    assert res.returncode == 1, res.stderr
    assert res.stderr == "nfsreset kill: internal error: RuntimeError: the adapter broke\n"
    debug = _inject("RuntimeError('the adapter broke')", front, env={**os.environ, "NFSRESET_DEBUG": "1"})
    assert debug.returncode == 1
    first, *rest = debug.stderr.splitlines()
    assert first == "nfsreset kill: internal error: RuntimeError: the adapter broke"
    assert rest and rest[0] == "Traceback (most recent call last):" and "RuntimeError" in rest[-1]
    assert {"typer": "cli/app.py", "hooks": "cli/hooks.py"}[front] in debug.stderr   # the front end named


@pytest.mark.parametrize("front", ["hooks", "typer"])
def test_ctrl_c_is_one_line_and_exit_130(front):
    res = _inject("KeyboardInterrupt", front)
    assert (res.returncode, res.stderr) == (130, "nfsreset kill: interrupted\n")


def test_typer_abort_is_reported_as_interrupted():
    # typer 0.29 keeps Abort in typer.exceptions; the old handler looked it up in
    # typer._click.exceptions and raised AttributeError after every traceback.
    res = _inject("__import__('typer').Abort()", "typer")
    assert (res.returncode, res.stderr) == (130, "nfsreset kill: interrupted\n")


def test_the_debug_variable_is_documented_in_help():
    res = _run("--help")
    assert res.returncode == 0 and "NFSRESET_DEBUG=1" in res.stdout


def test_tickle_help_documents_the_pacing_bounds_and_their_defaults():
    from nfsreset.core import pace
    res = _run("tickle", "--help")
    text = " ".join(res.stdout.split())
    assert f"{pace.TICKLE_RATE_PPS:,}" in text and f"{pace.TICKLE_MAX_PACKETS:,}" in text
    assert "--rate" in text and "--max-packets" in text and "per second" in text
    assert f"defaults {pace.TICKLE_RATE_PPS:,}/s and {pace.TICKLE_MAX_PACKETS:,}" in " ".join(cli_common.TICKLE_DOC.split())
