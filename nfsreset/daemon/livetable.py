"""The live table: the running daemon's flows in /run/nfsreset, for `nfsreset flows`
(its writer is identified by pid and start time, from /proc)."""
from __future__ import annotations

import json
import os


RUN_DIR = "/run/nfsreset"
def live_table_path(netns_ino: int | None) -> str:
    return os.path.join(RUN_DIR, f"flows-{netns_ino}.json")


def read_live_table(netns_ino: int) -> dict | None:
    """The running daemon's table for this namespace, or None (no daemon, or a
    file its writer left behind). The file is rewritten only on change, so its
    age says nothing; the writer's pid and that pid's start time (clock ticks
    since boot, /proc/PID/stat) identify the very process that wrote it: a
    crashed daemon's file is refused even if its pid was reused since."""
    try:
        with open(live_table_path(netns_ino)) as f:
            doc = json.load(f)
        if _start_ticks(int(doc["pid"])) != int(doc["started"]):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return doc


def _start_ticks(pid: int) -> int:
    """Field 22 (starttime) of /proc/PID/stat; OSError if there is no such process."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        # comm (field 2) may hold spaces and parentheses: split after its last ')'
        return int(f.read().rsplit(b")", 1)[1].split()[19])
