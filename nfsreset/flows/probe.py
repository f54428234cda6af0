"""doctor's probe: can this process track flows with BPF?"""
from __future__ import annotations

import functools
import os

from nfsreset.flows import btf
from nfsreset.flows.program import bpf_offsets
from nfsreset.flows.tracker import FlowTracker


TRACEFS = "/sys/kernel/tracing"
# -- doctor ---------------------------------------------------------------------
@functools.cache
def available() -> tuple[bool, str]:
    """Can this process track flows? (ok, what was found or what is missing).

    Loads the real program once (compile + attach + detach, ~0.3 s), so the
    answer is cached per process. tracefs is reported, not required: the
    tracker uses raw tracepoints only.
    """
    try:
        offsets = bpf_offsets()
    except (btf.BTFError, OSError) as e:
        return False, f"BTF: {e}"
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return False, f"bcc not importable ({e}); install python3-bpfcc"
    try:
        FlowTracker(ports=()).close()
    except Exception as e:  # bcc raises bare Exception on compile/load errors
        return False, f"compile/load of flowtrack.c failed: {e}"
    tracefs = "mounted" if os.path.exists(os.path.join(TRACEFS, "events")) else "not mounted (not needed)"
    return True, f"{len(offsets)} struct offsets from BTF; flowtrack.c loads; tracefs {tracefs}"
