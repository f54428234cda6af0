"""Bad input on the command line and in the config file, checked where it is
checked: pure functions (model.vip_address, netns.check_name) and the config
loader on real files. Each must say what is wrong and why, as a ValueError or
ConfigError that the command line turns into one line and exit 2.
tests/ns/test_bad_input.py runs the same inputs through the real commands.
"""
from __future__ import annotations

import os
import threading

import pytest

from nfsreset.kernel import netns
from nfsreset.core.model import host_address, vip_address
from nfsreset.daemon.config import ConfigError, check_config, load_config

# -- VIPs and client addresses ------------------------------------------------------------------
GOOD_VIPS = [
    ("198.51.100.10", "198.51.100.10"),
    (" 198.51.100.10 ", "198.51.100.10"),
    ("2001:db8::10", "2001:db8::10"),
    ("2001:DB8:0::10", "2001:db8::10"),
    ("[2001:db8::10]", "2001:db8::10"),
    ("::ffff:198.51.100.10", "198.51.100.10"),    # what a dual-stack socket reports
    ("203.0.113.255", "203.0.113.255"),            # the last address of a /24 is still a host's
]

BAD_VIPS = [
    ("fe80::12%eth0", "link-local address with a zone (%eth0)"),
    ("2001:db8::10%eth0", "with a zone (%eth0)"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("127.0.0.1", "loopback address: it never leaves this host"),
    ("127.0.0.53", "loopback"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:0.0.0.0", "unspecified"),
    ("", "is not an IP address"),
    ("nonsense", "is not an IP address"),
    ("198.51.100.10/32", "is not an IP address"),
    ("198.51.100.256", "is not an IP address"),
]


@pytest.mark.parametrize("text, want", GOOD_VIPS)
def test_vip_address_accepts_unicast_host_addresses_in_canonical_form(text, want):
    assert vip_address(text) == want


@pytest.mark.parametrize("text, why", BAD_VIPS, ids=[t or "empty" for t, _ in BAD_VIPS])
def test_vip_address_refuses_what_is_not_a_unicast_host_address_and_says_why(text, why):
    with pytest.raises(ValueError) as e:
        vip_address(text)
    msg = str(e.value)
    assert msg.startswith(repr(text)) and why in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("value", [5, None, True, ["198.51.100.10"], b"198.51.100.10"])
def test_vip_address_refuses_what_is_not_text(value):
    with pytest.raises(ValueError, match="is not an IP address"):
        vip_address(value)


def test_client_addresses_follow_the_same_rules():
    assert host_address("2001:db8::7") == "2001:db8::7"
    with pytest.raises(ValueError, match="zone"):
        host_address("fe80::1%eth0")
    with pytest.raises(ValueError, match="multicast"):
        host_address("ff02::1")


# -- network namespace names --------------------------------------------------------------------
@pytest.mark.parametrize("name, why", [
    ("", "empty"),
    (".", "not a path"),
    ("..", "not a path"),
    ("../../proc/1/ns/net", "not a path"),
    ("/proc/1/ns/net", "not a path"),
    ("a/b", "not a path"),
    ("x\0y", "NUL"),
    ("n" * 256, "longer than 255"),
    (5, "expected a string"),
], ids=["empty", "dot", "dotdot", "traversal", "absolute", "slash", "nul", "long", "int"])
def test_netns_names_that_are_not_one_entry_of_run_netns_are_refused(name, why):
    with pytest.raises(netns.NetnsError) as e:
        netns.check_name(name)
    assert why in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(netns.NetnsError):
        netns.path_of(name)        # every use of a name goes through the check


@pytest.mark.parametrize("name", ["nfsr-1-2-node1", "blue", "ns.1", "n" * 255])
def test_netns_names_ip_netns_could_make_pass(name):
    assert netns.check_name(name) == name
    assert netns.path_of(name) == os.path.join(netns.NETNS_RUN_DIR, name)


# -- the config file ----------------------------------------------------------------------------
def _config(tmp_path, text: str) -> str:
    path = tmp_path / "nfsreset.toml"
    path.write_text(text)
    return str(path)


BAD_CONFIGS = [
    # (TOML, the words the one line must hold: key = value, and what was expected)
    ('ports = "12"', ['ports = "12" is a string', "expected a list of TCP ports"]),
    ("ports = [true]", ["ports = [true]: true is a boolean", "expected a list of TCP ports"]),
    ("ports = [2049.9]", ["ports = [2049.9]: 2049.9 is a float", "expected a list of TCP ports"]),
    ("ports = 2049", ["ports = 2049 is an integer", "expected a list of TCP ports"]),
    ("ports = [0]", ["ports = [0]: 0 is not a TCP port", "1-65535"]),
    ("ports = [65536]", ["ports = [65536]: 65536 is not a TCP port"]),
    ("ports = []", ["ports = [] is empty"]),
    ('vips = "198.51.100.10"', ['vips = "198.51.100.10" is a string', "expected a list of addresses"]),
    ("vips = [5]", ["vips = [5]: 5 is an integer", "expected a list of addresses"]),
    ('vips = ["0.0.0.0"]', ['vips = ["0.0.0.0"]', "'0.0.0.0' is the unspecified address"]),
    ('vips = ["fe80::12%eth0"]', ["'fe80::12%eth0' is a link-local address with a zone"]),
    ('vips = ["224.0.0.1"]', ["multicast"]),
    ("vips = []", ["vips = [] is empty"]),
    ("netns = 5", ["netns = 5 is an integer", "expected a string"]),
    ('netns = ""', ['netns = ""', "'' is not a network namespace name"]),
    ('netns = "../../proc/1/ns/net"', ['netns = "../../proc/1/ns/net"', "not a path"]),
    ("state_dir = 5", ["state_dir = 5 is an integer", "expected a string: a directory path"]),
    ('state_dir = ""', ['state_dir = "" is empty', "expected a directory path"]),
    ("state_dir = true", ["state_dir = true is a boolean"]),
    ("metrics = 9449", ["metrics = 9449 is an integer", "expected a string: HOST:PORT"]),
    ('metrics = "9449"', ['metrics = "9449"', "expected HOST:PORT"]),
    ('metrics = "127.0.0.1:99999"', ["expected HOST:PORT with a port 1-65535"]),
    ('metrics = "127.0.0.1:\u0662"', ["expected HOST:PORT"]),      # a non-ASCII digit
    ('strategy = "fast"', ['strategy = "fast"', "expected one of auto|destroy|rst|nft"]),
    ("strategy = 1", ["strategy = 1 is an integer"]),
    ("vip = [\"198.51.100.10\"]", ["unknown key(s) vip"]),
    ("ports = [", ["nfsreset.toml: "]),
]


@pytest.mark.parametrize("toml, words", BAD_CONFIGS, ids=[t for t, _ in BAD_CONFIGS])
def test_a_bad_config_value_is_named_with_its_key_value_and_expected_type(tmp_path, toml, words):
    path = _config(tmp_path, toml)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"config {path}"), msg
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg


def test_a_good_config_comes_back_checked_and_canonical(tmp_path):
    path = _config(tmp_path, 'vips = ["2001:DB8::10", "198.51.100.10"]\nports = [2049, 111]\n'
                             'state_dir = "/var/lib/nfsreset"\nstrategy = "destroy"\nnetns = "blue"\n'
                             'metrics = "127.0.0.1:9449"\n')
    assert load_config(path) == {"vips": ["2001:db8::10", "198.51.100.10"], "ports": [2049, 111],
                                 "state_dir": "/var/lib/nfsreset", "strategy": "destroy", "netns": "blue",
                                 "metrics": "127.0.0.1:9449"}
    assert load_config(_config(tmp_path, "")) == {}


def test_bool_is_not_taken_for_an_int_anywhere():
    # isinstance(True, int) holds in Python; a config's `true` must never be port 1.
    for doc in ({"ports": [True]}, {"ports": [2049, False]}):
        with pytest.raises(ValueError, match="is a boolean"):
            check_config(doc)


def test_a_directory_given_as_the_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"is not a regular file \(a directory\)"):
        load_config(str(tmp_path))


def test_a_missing_or_empty_config_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nodir" / "nope.toml"))
    with pytest.raises(ConfigError, match="empty path"):
        load_config("")


def test_a_fifo_given_as_the_config_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "config.fifo")
    os.mkfifo(fifo)
    got: list = []
    t = threading.Thread(target=lambda: got.append(_raises(load_config, fifo)), daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():
        with open(fifo, "wb"):   # unblock the reader so the thread ends
            pass
        t.join(5)
        pytest.fail("load_config blocked on a FIFO")
    assert got and isinstance(got[0], ConfigError) and "is not a regular file" in str(got[0])


def test_a_config_that_is_not_utf8_or_too_large_is_refused(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'state_dir = "/var/lib/\xe9"\n')
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(str(bad))
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="is larger than"):
        load_config(str(big))


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as e:
        return e
    return None
