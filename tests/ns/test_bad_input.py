"""Bad input given to the real commands, as real processes inside a test
namespace: each must exit 2 with ONE line on stderr naming the input and why,
no traceback, and nothing created or changed: no state dir, no nft table (in
the namespace the command ran in), no BPF program left, no namespace.

Every command runs under `ip netns exec` of a test-private node, so a command
that wrongly went ahead could only touch that namespace. A dry run, given
good input, changes nothing on disk either.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from nfsreset.lab.topology import VIP4, VIP6, Topology
from tests.ns.scene import NFSRESET, nft_tables, wait_until

pytestmark = [pytest.mark.netns]

NODE = "node1"
CLIENT = "198.51.100.100:700"
MISSING_NS = f"nfsr-{os.getpid()}-no-such-namespace"


@pytest.fixture(scope="module")
def lab():
    """One topology for the module (each case is a short-lived process); removed
    afterwards even when a test failed."""
    t = Topology.create()
    try:
        yield t
    finally:
        t.destroy()


# The flow tracker's programs (nfsreset/bpf/flowtrack.c, tracker.py) by name.
OUR_PROGS = ("raw_tracepoint__", "tcp_probe", "clock_pair")


def _our_progs() -> set[int]:
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return {p["id"] for p in json.loads(out or "[]") if str(p.get("name", "")).startswith(OUR_PROGS)}


def _held_prog_ids() -> set[int]:
    """Programs some live process holds a descriptor of (this bpftool does not list holders)."""
    ids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    ids.update(int(line.split()[1]) for line in f if line.startswith("prog_id:"))
            except (OSError, ValueError, IndexError):
                pass
    return ids


def _left_progs(before: set[int]) -> set[int]:
    """Tracker programs loaded since `before` that no process holds: left behind
    (pinned). Other sessions' daemons may load theirs meanwhile; they hold them.
    A program whose process just exited can stay listed for a moment: asked
    again for up to 1 s."""
    def unheld() -> set[int]:
        new = _our_progs() - before
        return new - _held_prog_ids() if new else set()
    return set() if wait_until(lambda: not unheld(), 1.0) is not None else unheld()


def _run(lab, argv, user: str | None = None) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", user, "--"] if user else []
    return lab.run(NODE, *prefix, NFSRESET, *argv, check=False, timeout=30)


def _refused(lab, tmp_path, argv, named: str | tuple[str, ...], why: str, user: str | None = None) -> None:
    """Run argv ({state} is a path that must stay absent); assert it was refused
    as the house rules say, the line holding `named` (the input) and `why`."""
    state = str(tmp_path / "state")
    argv = [a.replace("{state}", state) for a in argv]
    tables = nft_tables(lab, NODE)
    progs = _our_progs()
    res = _run(lab, argv, user)
    assert res.returncode == 2, (argv, res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    named = (named,) if isinstance(named, str) else named
    assert line.startswith(f"nfsreset {argv[0]}: ") and all(n in line for n in named) and why in line, line
    assert res.stdout == ""
    assert not os.path.lexists(state), f"{argv} created its state dir"
    assert nft_tables(lab, NODE) == tables, f"{argv} changed the nft ruleset"
    left = _left_progs(progs)
    assert not left, f"{argv} left BPF program(s) {left}"
    assert not os.path.exists(f"/run/netns/{MISSING_NS}")


# -- VIPs that are not unicast host addresses --------------------------------------------------
NOT_A_VIP = [
    ("fe80::12%eth0", "link-local address with a zone"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
]
COMMANDS = {
    "kill": ["kill", "--vip", "{vip}", "--state-dir", "{state}"],
    "tickle": ["tickle", "--vip", "{vip}", "--client", "{client}", "--state-dir", "{state}"],
    "flows": ["flows", "--vip", "{vip}"],
    "watch": ["watch", "--vip", "{vip}", "--state-dir", "{state}"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("vip, why", NOT_A_VIP, ids=[v for v, _ in NOT_A_VIP])
def test_a_vip_that_is_not_a_unicast_host_address_is_refused(lab, tmp_path, command, vip, why):
    client = "[2001:db8::100]:700" if ":" in vip else CLIENT
    argv = [a.format(vip=vip, client=client) if "{vip}" in a or "{client}" in a else a
            for a in COMMANDS[command]]
    _refused(lab, tmp_path, argv, f"--vip: {vip!r}", why)


@pytest.mark.parametrize("client, why", [("[fe80::1%eth0]:700", "with a zone"), ("[ff02::1]:700", "multicast"),
                                         ("[::]:700", "unspecified")])
@pytest.mark.parametrize("command", ["kill", "tickle"])
def test_a_client_that_is_not_a_unicast_host_address_is_refused(lab, tmp_path, command, client, why):
    _refused(lab, tmp_path, [command, "--vip", VIP6, "--client", client, "--state-dir", "{state}"],
             "--client: ", why)


# -- network namespace names ---------------------------------------------------------------------
NETNS = [("", "is not a network namespace name"), ("..", "not a path"),
         ("../../proc/1/ns/net", "not a path"), (MISSING_NS, "does not exist")]
NETNS_COMMANDS = {
    "kill": ["kill", "--vip", VIP4, "--state-dir", "{state}"],
    "tickle": ["tickle", "--vip", VIP4, "--client", CLIENT, "--state-dir", "{state}"],
    "flows": ["flows"],
    "doctor": ["doctor"],
    "watch": ["watch", "--vip", VIP4, "--state-dir", "{state}"],
}


@pytest.mark.parametrize("command", NETNS_COMMANDS)
@pytest.mark.parametrize("name, why", NETNS, ids=["empty", "dotdot", "traversal", "missing"])
def test_a_bad_or_missing_netns_is_refused_before_anything_is_made(lab, tmp_path, command, name, why):
    _refused(lab, tmp_path, [*NETNS_COMMANDS[command], "--netns", name], ("--netns: ", repr(name)), why)


# -- the state dir ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["kill", "--vip", VIP4], ["tickle", "--vip", VIP4, "--client", CLIENT],
                                  ["watch", "--vip", VIP4]], ids=["kill", "tickle", "watch"])
def test_an_empty_state_dir_is_refused_not_taken_for_the_current_directory(lab, tmp_path, argv):
    _refused(lab, tmp_path, [*argv, "--state-dir", ""], "--state-dir: ''", "is not a directory")


# -- the config file ----------------------------------------------------------------------------
CONFIGS = [
    ('ports = "12"', 'ports = "12" is a string', "expected a list of TCP ports"),
    ("ports = [true]", "ports = [true]: true is a boolean", "expected a list of TCP ports"),
    ("ports = [2049.9]", "ports = [2049.9]: 2049.9 is a float", "expected a list of TCP ports"),
    ('netns = 5', "netns = 5 is an integer", "expected a string"),
    ('netns = ""', 'netns = ""', "is not a network namespace name"),
    ('state_dir = 5', "state_dir = 5 is an integer", "expected a string: a directory path"),
    ('metrics = 9449', "metrics = 9449 is an integer", "expected a string: HOST:PORT"),
]


@pytest.mark.parametrize("line, named, why", CONFIGS, ids=[c for c, _, _ in CONFIGS])
def test_a_bad_config_value_is_refused_naming_key_value_and_type(lab, tmp_path, line, named, why):
    path = tmp_path / "nfsreset.toml"
    path.write_text(f'vips = ["{VIP4}"]\n{line}\n')
    _refused(lab, tmp_path, ["watch", "--config", str(path), "--state-dir", "{state}"], named, why)


def test_vips_given_as_a_string_in_the_config_is_refused(lab, tmp_path):
    # It used to be read character by character: "'1' is not an IP address".
    path = tmp_path / "nfsreset.toml"
    path.write_text(f'vips = "{VIP4}"\n')
    _refused(lab, tmp_path, ["watch", "--config", str(path), "--state-dir", "{state}"],
             f'vips = "{VIP4}" is a string', "expected a list of addresses")


def test_a_config_that_is_a_directory_fifo_missing_or_unreadable_is_refused(lab, tmp_path):
    cdir = tmp_path / "confdir"
    cdir.mkdir()
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    secret = tmp_path / "secret.toml"       # under pytest's 0700 tmp dir: nobody cannot open it
    secret.write_text(f'vips = ["{VIP4}"]\n')
    for path, why, user in ((cdir, "is not a regular file (a directory)", None),
                            (fifo, "is not a regular file", None),
                            (tmp_path / "missing.toml", "not found", None),
                            (secret, "cannot open it: Permission denied", "nobody")):
        _refused(lab, tmp_path, ["watch", "--config", str(path), "--state-dir", "{state}"],
                 f"config {path}", why, user=user)


# -- a dry run changes nothing on disk ----------------------------------------------------------
def test_dry_runs_of_kill_and_tickle_create_no_state_dir(lab, tmp_path):
    state = str(tmp_path / "state")
    tables = nft_tables(lab, NODE)
    lab.add_addr(NODE, VIP4, nodad=True)
    try:
        for argv in (["kill", "--vip", VIP6, "--state-dir", state, "--dry-run"],
                     ["tickle", "--vip", VIP4, "--client", CLIENT, "--rounds", "1", "--state-dir", state,
                      "--dry-run"]):
            res = _run(lab, argv)
            assert res.returncode == 0, (argv, res.stderr)
            assert "(dry run)" in res.stderr, res.stderr
            assert not os.path.lexists(state), f"{argv} created its state dir"
            assert nft_tables(lab, NODE) == tables
    finally:
        lab.del_addr(NODE, VIP4)


def test_a_dry_run_watch_creates_no_state_dir(lab, tmp_path):
    state = str(tmp_path / "state")
    tables = nft_tables(lab, NODE)
    proc = lab.popen(NODE, NFSRESET, "watch", "--vip", VIP4, "--state-dir", state, "--dry-run", "--no-bpf",
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # `ready` is its last start-up line; the state dir, if it were made, is made before it.
        line = proc.stderr.readline()
        for _ in range(50):
            if not line or "ready" in line:
                break
            line = proc.stderr.readline()
        assert "ready" in line, line
        assert not os.path.lexists(state), "watch --dry-run created its state dir"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not os.path.lexists(state)
        assert nft_tables(lab, NODE) == tables
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert wait_until(lambda: proc.returncode is not None, 1.0) is not None
