"""tracefs for bcc programs with classic tracepoints (the tracker needs none: raw
tracepoints): tests/ns/test_tracker.py shows the tracker loads without it and
that it can be had under `ip netns exec`."""
from __future__ import annotations

import ctypes
import os

from nfsreset.kernel.netns import libc

TRACEFS = "/sys/kernel/tracing"
_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_SLAVE = 0x4000, 0x80000


def ensure_tracefs() -> None:
    """Mount tracefs at /sys/kernel/tracing if it is missing, privately.

    bcc attaches tracepoints through ids and formats found in tracefs. Under
    `ip netns exec` /sys is a fresh sysfs mount without tracefs on it. We
    mount it in a mount namespace of our own (unshare + make-rslave) so that
    nobody else's view of the file system changes, in particular not the
    host's when this runs there by mistake. unshare(CLONE_NEWNS) applies to
    the calling thread (and threads it starts later).
    """
    if os.path.exists(os.path.join(TRACEFS, "events")):
        return
    if libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), f"unshare(CLONE_NEWNS) failed: {os.strerror(ctypes.get_errno())}")
    # Slave, not private: mounts made later on the host still propagate to us.
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None) != 0:
        raise OSError(ctypes.get_errno(), f"make-rslave / failed: {os.strerror(ctypes.get_errno())}")
    if libc.mount(b"tracefs", TRACEFS.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t tracefs {TRACEFS} failed: {os.strerror(err)}")
