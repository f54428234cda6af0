"""What `nfsreset watch` writes on stderr: each change of state once, with a
time and a level (or a journald priority under systemd), however many away
passes run meanwhile; --quiet and --verbose."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from nfsreset.lab.topology import VIP4
from tests.ns.scene import wait_until
from tests.ns.test_watch import READY_TIMEOUT_S, StderrLines, remove_live_table

pytestmark = [pytest.mark.netns]

AWAY_CHECK_S = 0.3      # NFSRESET_AWAY_CHECK_S: the tests' knob (2 s in service)
STAMPED = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d) "
                     r"(ERROR|WARNING|NOTICE|INFO|DEBUG) nfsreset watch: (.*)$")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    return env | {"NFSRESET_AWAY_CHECK_S": str(AWAY_CHECK_S)} | extra


def _stop(proc, topo) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            remove_live_table(topo, "node1")


def _away_and_back(scene, *flags: str, away_s: float, env: dict, stderr) -> subprocess.Popen:
    """VIP4 here with one client session; watch (nft strategy: the stale socket
    stays, so every away pass finds it and acts again); the VIP moves to node2
    for away_s, then back. Returns the stopped process."""
    topo = scene.topo
    topo.add_addr("node1", VIP4, nodad=True)
    client = scene.connect(VIP4, 47031)
    proc = scene.popen("node1", "watch", "--vip", VIP4, "--state-dir", scene.state, "--strategy", "nft",
                       *flags, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        err = StderrLines(proc) if stderr is subprocess.PIPE else None
        ready = (lambda: err.wait_for(r"\bready\b", 0.1)) if err else \
            (lambda: "ready" in open(stderr.name).read())
        assert wait_until(ready, READY_TIMEOUT_S) is not None
        assert client.echo()
        scene.move(VIP4, "node1", "node2")
        time.sleep(away_s)
        scene.move(VIP4, "node2", "node1")
        time.sleep(1.0)
    finally:
        _stop(proc, topo)
    proc.err = err
    return proc


def test_watch_logs_each_change_once_with_time_and_level_over_many_away_passes(scene):
    """Old code: 'quarantined VIP' and 'guarded 1 stale tuple(s)' again on every
    away pass (every 2 s in service), and no time or level on any line."""
    proc = _away_and_back(scene, "--verbose", away_s=3.0, env=_env(), stderr=subprocess.PIPE)
    lines = proc.err.text().splitlines()
    print("\n" + "\n".join(lines))
    parsed = [STAMPED.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m]
    passes = [m for m in parsed if m[2] == "DEBUG" and m[3].startswith("away check:")]
    assert len(passes) >= 5, len(passes)
    news = [m[3] for m in parsed if m[2] != "DEBUG"]
    arrived = next(i for i, m in enumerate(news) if m.startswith(f"{VIP4} arrived"))
    away, back = news[:arrived], news[arrived:]
    for period, change in ((away, f"{VIP4} left"), (away, f"quarantined {VIP4}"),
                           (away, "guarded 1 stale tuple(s)"), (back, f"{VIP4} arrived"),
                           (back, f"lifted the quarantine of {VIP4}"), (back, f"announced {VIP4}"),
                           (back, "tickled 1 client tuple(s)")):
        assert sum(m.startswith(change) for m in period) == 1, (change, period)
    # nothing said twice in either period (timings aside)
    for period in (away, back):
        keys = [re.sub(r"[0-9.]+ ms", "", m) for m in period]
        assert len(keys) == len(set(keys)), period
    # the per-pass repeats went to debug
    assert any(m[2] == "DEBUG" and m[3].startswith(f"quarantined {VIP4}") for m in parsed)


def test_watch_under_journald_prefixes_priorities_and_quiet_keeps_warnings_only(scene, tmp_path):
    """JOURNAL_STREAM naming stderr -> "<N>" priority prefixes; --quiet -> no
    info lines (ready and stopped are notices)."""
    out = tmp_path / "journal-stream"
    with open(out, "w") as f:
        st = os.fstat(f.fileno())
        proc = _away_and_back(scene, "--quiet", away_s=1.0, stderr=f,
                              env=_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"))
    lines = out.read_text().splitlines()
    print("\n" + "\n".join(lines))
    assert proc.returncode == 0
    assert lines and all(re.match(r"^<[0-7]>nfsreset watch: ", line) for line in lines), lines
    assert all(int(line[1]) <= 5 for line in lines), lines
    assert any(line.startswith("<5>") and "ready" in line for line in lines)


def test_watch_with_a_journal_stream_that_is_not_stderr_stamps_lines(scene, tmp_path):
    """An inherited JOURNAL_STREAM of another descriptor (stderr redirected to a
    file) is not the journal: lines get time and level, not "<N>"."""
    out = tmp_path / "redirected"
    with open(out, "w") as f:
        st = os.fstat(f.fileno())
        _away_and_back(scene, away_s=0.5, stderr=f, env=_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino + 1}"))
    lines = out.read_text().splitlines()
    assert lines and all(STAMPED.match(line) for line in lines), lines
    assert not any(m[2] == "DEBUG" for m in map(STAMPED.match, lines))
