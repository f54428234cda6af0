"""The daemon's log lines: level, time, journald priority."""
from __future__ import annotations

import os
import sys


# -- the daemon's log ----------------------------------------------------------------------------
# syslog priorities: what journald reads from a "<N>" prefix (sd-daemon(3)).
# notice: start and stop (`ready` is the contract a starter waits for), shown by --quiet too.
LEVELS = {"error": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}
# How the engine and the state dir word what failed, was skipped or refused:
# their lines come without a level (they are shared with the one-shot hooks).
_WARNING_WORDS = (" failed: ", " failed (", " skipped: ", " survived: ", " not honoured: ", "cannot ",
                  "could not ", " lost ", " unavailable ")
_ERROR_WORDS = ("Traceback", "internal error")


def level_of(line: str) -> str:
    if any(w in line for w in _ERROR_WORDS):
        return "error"
    if any(w in line for w in _WARNING_WORDS) or line.startswith(("refused ", "ignored ", "kept ")):
        return "warning"
    return "info"


def journal_stream(fd: int) -> bool:
    """stderr is journald's stream: $JOURNAL_STREAM ("DEV:INODE", set by systemd
    for a unit whose stderr is the journal) names this very descriptor. A child
    whose stderr was redirected inherits the variable but not the stream."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(fd)
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError):
        return False


class Log:
    """The daemon's log lines on stderr, one write each (two threads' lines
    never run together). Under journald each line starts with "<N>", its
    priority; elsewhere with an ISO 8601 time (ms, UTC offset) and a level.
    Lines above `threshold` (--quiet: notice, --verbose: debug) are dropped.
    Called with one argument (as the engine does), a line's level is read from
    its wording (level_of)."""

    def __init__(self, threshold: str = "info", stream=None, journal: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.max = LEVELS[threshold]
        if journal is None:
            try:
                journal = journal_stream(self.stream.fileno())
            except (AttributeError, OSError, ValueError):
                journal = False
        self.journal = journal

    def __call__(self, line: str, level: str | None = None) -> None:
        level = level or level_of(line)
        prio = LEVELS[level]
        if prio > self.max:
            return
        line = " ".join(line.splitlines())
        if self.journal:
            text = f"<{prio}>nfsreset watch: {line}\n"
        else:
            import datetime
            stamp = datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")
            text = f"{stamp} {level.upper()} nfsreset watch: {line}\n"
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):   # stderr gone (journald restarted): nothing to tell it
            pass
