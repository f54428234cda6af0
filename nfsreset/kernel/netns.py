"""Enter a named network namespace for the current thread, never creating one.

Sockets keep the namespace they were created in, so the pattern is: enter,
open the sockets (sock_diag, raw, nft, rtnetlink), leave. pyroute2's pushns()
would *create* a missing namespace; a typo in --netns must be an error instead.
"""
from __future__ import annotations

import contextlib
import ctypes
import os

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

# The process's C library, with errno; tracker.py calls through it too.
libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(Exception):
    pass


def check_name(name: str) -> str:
    """`name` if `ip netns` could have made it (one entry of /run/netns), else
    NetnsError saying why: '', '..' or a path must not open some other file."""
    if not isinstance(name, str):
        raise NetnsError(f"{name!r} is not a network namespace name (expected a string)")
    if not name:
        raise NetnsError("'' is not a network namespace name (it is empty)")
    if "/" in name or name in (".", ".."):
        raise NetnsError(f"{name!r} is not a network namespace name: give a name from `ip netns list`, "
                         f"not a path")
    if "\0" in name or len(name.encode("utf-8", "surrogateescape")) > 255:
        raise NetnsError(f"{name!r} is not a network namespace name (a NUL byte or longer than 255 bytes)")
    return name


def path_of(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, check_name(name))


def exists(name: str) -> bool:
    return os.path.exists(path_of(name))


def _setns(fd: int) -> None:
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(err)}")


def current_inode() -> int:
    """Inode of this thread's network namespace (what BPF sees as net->ns.inum)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def inode_of(name: str | None) -> int:
    return current_inode() if name is None else os.stat(path_of(name)).st_ino


@contextlib.contextmanager
def entered(name: str | None):
    """Run the block in namespace `name` (None: stay where we are)."""
    if name is None:
        yield
        return
    try:
        target = os.open(path_of(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {name!r} does not exist ({path_of(name)})") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def enter_for_good(name: str) -> None:
    """Move this thread into `name` for the rest of its life (daemons, hooks)."""
    try:
        fd = os.open(path_of(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {name!r} does not exist ({path_of(name)})") from None
    try:
        _setns(fd)
    finally:
        os.close(fd)
