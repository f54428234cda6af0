"""The hook commands have two front ends: typer for --help, cli_hooks when they run.

They must accept the same options with the same defaults and word errors alike;
otherwise `nfsreset kill --help` would document a command that runs differently.
"""
from __future__ import annotations

import os
import subprocess
import sys
import typing

import pytest

from nfsreset.cli import main as cli, common as cli_common, hooks as cli_hooks


def _click_params(command: str) -> dict:
    import typer
    from nfsreset.cli.app import app
    group = typer.main.get_command(app)
    cmd = group.commands[command]
    out = {}
    for p in cmd.params:
        if not getattr(p, "opts", None) or p.name == "help":
            continue
        (flag,) = p.opts
        out[flag] = p
    return out


@pytest.mark.parametrize("command", cli.HOOK_COMMANDS)
def test_both_front_ends_declare_the_same_options(command):
    typer_side = _click_params(command)
    table = cli_hooks.OPTIONS[command]
    assert set(typer_side) == set(table)
    for flag, (name, kind, default) in table.items():
        p = typer_side[flag]
        assert p.name == name, flag
        assert p.multiple == isinstance(kind, list), flag
        assert p.is_flag == (kind is bool), flag
        if default is cli_hooks.REQUIRED:
            assert p.required, flag
        else:
            assert not p.required, flag
            want = list(default) if isinstance(default, list) else default
            got = list(p.default) if isinstance(p.default, (list, tuple)) else p.default
            assert got == want, flag
        annotation = p.type_descriptor.annotation
        if isinstance(kind, list):
            assert typing.get_origin(annotation) is list and typing.get_args(annotation) == (kind[0],), flag
        else:
            assert annotation is kind, flag


@pytest.mark.parametrize("command", cli.HOOK_COMMANDS)
def test_the_bodies_take_exactly_the_declared_parameters(command):
    import inspect
    body = inspect.signature(getattr(cli_common, command)).parameters
    assert list(body) == [name for name, _k, _d in cli_hooks.OPTIONS[command].values()]


def test_parse_fills_defaults_and_repeats():
    got = cli_hooks.parse("kill", ["--vip=198.51.100.10", "--port", "2049", "--port", "111", "--force"])
    assert got["vip"] == "198.51.100.10" and got["port"] == [2049, 111] and got["force"] is True
    assert got["state_dir"] == "/var/lib/nfsreset" and got["client"] == [] and got["json_out"] is False
    got = cli_hooks.parse("tickle", ["--vip", "2001:db8::10", "--wait", "1.5"])
    assert got["wait"] == 1.5 and got["rounds"] == 3 and got["state_dir"] is None
    assert got["rate"] == 25_000 and got["max_packets"] == 200_000
    got = cli_hooks.parse("tickle", ["--vip", "2001:db8::10", "--rate", "100", "--max-packets=7"])
    assert got["rate"] == 100 and got["max_packets"] == 7


def _run(*argv):
    return subprocess.run([sys.executable, "-m", "nfsreset", *argv], capture_output=True, text=True, timeout=30)


BAD = [
    (["kill"], "Missing option '--vip'."),
    (["kill", "--vip"], "Option '--vip' requires an argument."),
    (["kill", "--vip", "198.51.100.10", "--port", "x"], "Invalid value for '--port': 'x' is not a valid integer."),
    (["tickle", "--vip", "198.51.100.10", "--wait", "soon"], "Invalid value for '--wait': 'soon' is not a valid float."),
    (["kill", "--vip", "198.51.100.10", "--bogus"], "No such option: --bogus"),
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
    res = _run(*argv)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr == f"nfsreset {argv[0]}: {message}\n"


@pytest.mark.parametrize("command", cli.HOOK_COMMANDS)
def test_help_still_comes_from_typer(command):
    res = _run(command, "--help")
    assert res.returncode == 0, res.stderr
    assert f"nfsreset {command} [OPTIONS]" in res.stdout.splitlines()[0]
    for flag in cli_hooks.OPTIONS[command]:
        assert flag in res.stdout


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
           "cli_common.kill = body\n"
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
