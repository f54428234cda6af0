"""The daemon's log lines (nfsreset.daemon.log.Log): level, time, journald priority."""
import io
import os
import re

from nfsreset.daemon.log import Log, journal_stream, level_of


def test_engine_lines_get_their_level_from_their_wording():
    assert level_of("destroyed 2 of 2 session(s) on 198.51.100.10 in 1.0 ms: x") == "info"
    assert level_of("quarantine of 198.51.100.10 failed: nft said no; going on") == "warning"
    assert level_of("tickle of 2 client tuple(s) of V skipped: raw sockets unavailable here (x)") == "warning"
    assert level_of("refused 3 of 5 client tuples of V in /s; first: x") == "warning"
    assert level_of("BPF flow tracker unavailable (OSError: x); running on sock_diag dumps") == "warning"


def test_stamped_lines_and_threshold():
    out = io.StringIO()
    log = Log("info", stream=out, journal=False)
    log("198.51.100.10 left")
    log("per-pass detail", "debug")
    log("a\nb", "warning")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d INFO nfsreset watch: 198.51.100.10 left$",
                    lines[0])
    assert lines[1].endswith("WARNING nfsreset watch: a b")
    quiet = io.StringIO()
    Log("notice", stream=quiet, journal=False)("198.51.100.10 left")
    assert quiet.getvalue() == ""


def test_journal_lines_carry_the_priority_only():
    out = io.StringIO()
    log = Log("debug", stream=out, journal=True)
    log("ready: watching", "notice")
    log("x failed: y; going on")
    log("per pass", "debug")
    assert out.getvalue() == ("<5>nfsreset watch: ready: watching\n<4>nfsreset watch: x failed: y; going on\n"
                              "<7>nfsreset watch: per pass\n")


def test_journal_stream_must_name_this_descriptor(tmp_path, monkeypatch):
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert journal_stream(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not journal_stream(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", "nonsense")
        assert not journal_stream(f.fileno())
