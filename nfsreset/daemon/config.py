"""`nfsreset watch`'s configuration: the TOML file, every value checked before anything is made."""
from __future__ import annotations

import dataclasses
import json
import os

from nfsreset.core import plan as P


@dataclasses.dataclass
class Config:
    vips: frozenset[str]
    ports: frozenset[int] = frozenset({2049})
    state_dir: str = "/var/lib/nfsreset"
    strategy: str = "auto"
    netns: str | None = None
    metrics: tuple[str, int] | None = None
    dry_run: bool = False
    bpf: bool = True
    log_level: str = "info"     # --quiet: notice (warnings, errors, start, stop), --verbose: debug
    store: str = "auto"


class ConfigError(Exception):
    pass


CONFIG_KEYS = ("vips", "ports", "state_dir", "strategy", "netns", "metrics", "store")
CONFIG_MAX_BYTES = 1 << 20


def load_config(path: str) -> dict:
    """TOML: vips, ports, state_dir, strategy, netns, metrics ("HOST:PORT").

    Every value is checked for its type and meaning here, before anything is
    made: a config is input, and `ports = "12"` must not run on ports 1 and 2.
    Returns the keys present, with canonical values (vips normalised)."""
    import stat
    import tomllib
    if not path:
        raise ConfigError("--config: '' is not a file (an empty path)")
    try:
        # O_NONBLOCK: a FIFO given as the config must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"config {path} not found") from None
    except OSError as e:
        raise ConfigError(f"config {path}: cannot open it: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"config {path} is not a regular file"
                              + (" (a directory)" if stat.S_ISDIR(os.fstat(fd).st_mode) else ""))
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(CONFIG_MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read it: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > CONFIG_MAX_BYTES:
        raise ConfigError(f"config {path} is larger than {CONFIG_MAX_BYTES} bytes; not a config")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: {_one_line(str(e))}") from None
    unknown = set(doc) - set(CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"config {path}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(CONFIG_KEYS))})")
    try:
        return check_config(doc)
    except ValueError as e:
        raise ConfigError(f"config {path}: {e}") from None


def check_config(doc: dict) -> dict:
    """The values of a parsed config, checked strictly (bool is not int), or
    ValueError naming the key, the value and the type expected."""
    from nfsreset.kernel import netns as N
    from nfsreset.core.model import vip_address
    out: dict = {}
    if "vips" in doc:
        vips = _list_of(doc, "vips", str, "a list of addresses, e.g. vips = [\"198.51.100.10\"]")
        try:
            out["vips"] = [vip_address(v) for v in vips]
        except ValueError as e:
            raise ValueError(f"vips = {_toml(vips)}: {e}") from None
    if "ports" in doc:
        ports = _list_of(doc, "ports", int, "a list of TCP ports (integers 1-65535), e.g. ports = [2049]")
        bad = [p for p in ports if not 0 < p < 65536]
        if bad:
            raise ValueError(f"ports = {_toml(ports)}: {bad[0]} is not a TCP port; expected integers 1-65535")
        out["ports"] = ports
    if "state_dir" in doc:
        out["state_dir"] = _text(doc, "state_dir", "a directory path")
    if "store" in doc:
        from nfsreset.state.store import BACKENDS
        store = _text(doc, "store", f"one of {'|'.join(BACKENDS)}")
        if store not in BACKENDS:
            raise ValueError(f"store = {_toml(store)}: expected one of {'|'.join(BACKENDS)}")
        out["store"] = store
    if "strategy" in doc:
        strategy = _text(doc, "strategy", f"one of {'|'.join(P.STRATEGIES)}")
        if strategy not in P.STRATEGIES:
            raise ValueError(f"strategy = {_toml(strategy)}: expected one of {'|'.join(P.STRATEGIES)}")
        out["strategy"] = strategy
    if "netns" in doc:
        name = _text(doc, "netns", "a name from `ip netns list`", empty_ok=True)
        try:
            out["netns"] = N.check_name(name)
        except N.NetnsError as e:
            raise ValueError(f"netns = {_toml(name)}: {e}") from None
    if "metrics" in doc:
        text = _text(doc, "metrics", "HOST:PORT, e.g. metrics = \"127.0.0.1:9449\"")
        try:
            parse_metrics(text)
        except ConfigError as e:
            raise ValueError(f"metrics = {_toml(text)}: expected HOST:PORT with a port 1-65535, "
                             f"e.g. \"127.0.0.1:9449\"") from None
        out["metrics"] = text
    return out


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
               dict: "a table"}


def _type_name(v) -> str:
    return _TYPE_NAMES.get(type(v), f"a {type(v).__name__}")


def _toml(v) -> str:
    """A value as it would be written in the config (true, "x", [1, 2])."""
    return json.dumps(v, default=str)


def _list_of(doc: dict, key: str, kind: type, expected: str) -> list:
    v = doc[key]
    if not isinstance(v, list):
        raise ValueError(f"{key} = {_toml(v)} is {_type_name(v)}; expected {expected}")
    if not v:
        raise ValueError(f"{key} = [] is empty; expected {expected} (or leave {key} out)")
    for item in v:
        # type() and not isinstance(): a TOML true is a bool, which isinstance() takes for an int.
        if type(item) is not kind:
            raise ValueError(f"{key} = {_toml(v)}: {_toml(item)} is {_type_name(item)}; expected {expected}")
    return v


def _text(doc: dict, key: str, expected: str, empty_ok: bool = False) -> str:
    v = doc[key]
    if type(v) is not str:
        raise ValueError(f"{key} = {_toml(v)} is {_type_name(v)}; expected a string: {expected}")
    if not v and not empty_ok:
        raise ValueError(f"{key} = \"\" is empty; expected {expected}")
    return v


def _one_line(text: str) -> str:
    return " ".join(text.split())


def parse_metrics(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"--metrics wants HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)
