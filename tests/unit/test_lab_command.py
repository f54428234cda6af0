"""`nfsreset lab` without options: which runs it picks, and its progress lines (no root)."""
from __future__ import annotations

import io

import pytest

from nfsreset.lab.command import DEFAULT_SHOW, _Progress, resolve_defaults, run_label


def test_no_options_is_the_showcase_ganesha_v3_pacemaker_baseline_and_agent():
    server, movers, remedies, vers, showcase = resolve_defaults(None, [], [], [], False)
    assert showcase
    assert (server, movers, remedies, vers) == ("ganesha", ["pacemaker", "pacemaker-ocf"], ["none"], ["3"])
    assert DEFAULT_SHOW["mover"] == ["pacemaker", "pacemaker-ocf"]


@pytest.mark.parametrize("given, want", [
    # any option that picks the experiment: the others keep the lab's older defaults
    (dict(remedy=["hooks"]), ("sim", ["ip"], ["hooks"], [])),
    (dict(mover=["ipaddr2,ocf"]), ("sim", ["ipaddr2,ocf"], ["none"], [])),
    (dict(server="ganesha"), ("ganesha", ["ip"], ["none"], [])),
    (dict(vers=["3"]), ("sim", ["ip"], ["none"], ["3"])),          # -> "--vers needs --server ganesha"
    (dict(crash=True, mover=["pacemaker-ocf"]), ("sim", ["pacemaker-ocf"], ["none"], [])),
    (dict(crash=True), ("sim", ["ip"], ["none"], [])),              # -> "--crash needs a Pacemaker mover"
])
def test_explicit_options_keep_the_older_defaults(given, want):
    args = dict(server=None, mover=[], remedy=[], vers=[], crash=False) | given
    *got, showcase = resolve_defaults(**args)
    assert tuple(got) == want and not showcase


def test_run_label_names_problem_and_fix():
    assert run_label("pacemaker", "none", 4, "3") == "baseline (IPaddr2 under Pacemaker), IPv4, NFSv3"
    assert run_label("pacemaker-ocf", "none", 6, "3") == "nfsreset (IPaddr2nfs under Pacemaker), IPv6, NFSv3"
    assert run_label("pacemaker", "watch", 6) == "nfsreset watch (IPaddr2 under Pacemaker), IPv6"
    assert run_label("ip", "none", 4) == "baseline (ip addr, like IPaddr2), IPv4"


def test_progress_prints_one_line_per_phase_when_not_a_tty():
    out = io.StringIO()
    p = _Progress(out, total=4)
    for label in ("baseline (IPaddr2 under Pacemaker), IPv4", "nfsreset (IPaddr2nfs under Pacemaker), IPv4"):
        p.label = label
        for stage, el in [("building namespaces", None), ("starting NFS-Ganesha on node1 and node2", None),
                          ("steady traffic", None), ("failover: moving the VIP node1 -> node2", None),
                          ("failover: waiting for replies", 0.1), ("failover: waiting for replies", 0.2),
                          ("failback: moving the VIP node2 -> node1", None), ("failback: waiting for replies", 0.3)]:
            p(stage, el, 20.0 if el else None)
    p.done()
    assert out.getvalue().splitlines() == [
        "[1/4] baseline (IPaddr2 under Pacemaker), IPv4: failover ...",
        "[2/4] baseline (IPaddr2 under Pacemaker), IPv4: failback ...",
        "[3/4] nfsreset (IPaddr2nfs under Pacemaker), IPv4: failover ...",
        "[4/4] nfsreset (IPaddr2nfs under Pacemaker), IPv4: failback ...",
    ]


@pytest.mark.parametrize("argv, line", [
    (["--server", "sim-nfsd", "--vers", "3"], "nfsreset lab: --vers needs --server ganesha: the sim-nfsd server only echoes records"),
    (["--server", "nfsd"], "nfsreset lab: --server must be sim, sim-nfsd, ganesha, not 'nfsd'"),
    (["--mover", "pacemaker", "--gap", "61"], "nfsreset lab: --gap must be between 0 and 60 seconds, not 61"),
])
def test_bad_server_or_gap_is_one_line_and_exit_2_before_anything_is_built(argv, line):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "nfsreset", "lab", *argv], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr, res.stdout) == (2, line + "\n", "")
