"""The OCF agent (cli/ocf/nfsreset) managing a real VIP inside a lab namespace.

ocf-tester from resource-agents drives the agent with the real nfsreset
binary; the other tests give it a small recording `nfsreset` (a shell script
that writes its argv and whether the VIP is configured at that moment) so the
order of the calls against the real IPaddr2 can be checked, and failures of
nfsreset (exit codes, missing binary, a hang) can be provoked on purpose.
"""
from __future__ import annotations

import os
import pathlib
import statistics
import time

import pytest

from nfsreset.lab.run import ClientLog
from nfsreset.lab.topology import VIP4, VIP6
from tests.ns.scene import ganesha_heads, needs_ganesha, nfs_client, wait_for

pytestmark = pytest.mark.netns

ROOT = pathlib.Path(__file__).resolve().parents[2]
AGENT = ROOT / "cli" / "ocf" / "nfsreset"
REAL_NFSRESET = ROOT / ".venv" / "bin" / "nfsreset"
IPADDR2 = pathlib.Path("/usr/lib/ocf/resource.d/heartbeat/IPaddr2")
OCF_RC = {"OCF_SUCCESS": 0, "OCF_NOT_RUNNING": 7}

if not IPADDR2.exists() or not pathlib.Path("/usr/sbin/ocf-tester").exists():
    pytest.skip("needs resource-agents (IPaddr2, ocf-tester): apt-get install resource-agents",
                allow_module_level=True)

# Records each call: "<subcommand> vip=<present|absent> <argv...>", then sleeps
# and exits as the STUB_* variables say (they pass through the agent's env).
STUB = r"""#!/bin/sh
vip=""
prev=""
for a in "$@"; do
    [ "$prev" = "--vip" ] && vip=$a
    prev=$a
done
present() { ip -o addr show | grep -v tentative | awk '{print $4}' | grep -qx "$vip/[0-9]*"; }
case " $* " in *" --wait "*)   # the contract: wait until the VIP is usable
    i=0; while [ $i -lt 100 ] && ! present; do sleep 0.05; i=$((i + 1)); done ;;
esac
if present; then
    where=present
else
    where=absent
fi
echo "$1 vip=$where $*" >> "$STUB_LOG"
echo "$1 $(date +%s.%N)" >> "$STUB_LOG.times"
case $1 in
tickle) sleep "${STUB_TICKLE_SLEEP:-0}" ;;
kill) sleep "${STUB_KILL_SLEEP:-0}" ;;
esac
echo "stub summary: $1 ended 0 sessions"
exit "${STUB_RC:-0}"
"""


def _plen(ip: str) -> str:
    return "64" if ":" in ip else "24"


@pytest.fixture
def stub(tmp_path):
    path = tmp_path / "nfsreset-stub"
    path.write_text(STUB)
    path.chmod(0o755)
    return path


def agent_env(tmp_path, ip, **params) -> list[str]:
    """`env` argv prefix: the OCF environment Pacemaker would give the agent."""
    env = {
        "OCF_ROOT": "/usr/lib/ocf",
        "OCF_RESOURCE_INSTANCE": "vip1",
        "HA_RSCTMP": str(tmp_path / "rsctmp"),
        "OCF_RESKEY_ip": ip,
        "OCF_RESKEY_cidr_netmask": _plen(ip),
        "OCF_RESKEY_nic": "eth0",
        "OCF_RESKEY_nodad": "true",  # IPv6 DAD would only add a second to every start
        "STUB_LOG": str(tmp_path / "calls.log"),
    }
    for key, value in params.items():
        env[key if key.isupper() else f"OCF_RESKEY_{key}"] = str(value)
    return ["env", *(f"{k}={v}" for k, v in env.items())]


def run_agent(topo, tmp_path, action, ip=VIP4, agent=AGENT, **params):
    t0 = time.monotonic()
    res = topo.run("node1", *agent_env(tmp_path, ip, **params), str(agent), action,
                   check=False, timeout=60)
    return res, time.monotonic() - t0


def calls(tmp_path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_ocf_tester_passes_with_the_real_nfsreset(topo, tmp_path):
    """The agent is OCF compliant, whatever state the nfsreset commands are in."""
    res = topo.run(
        "node1", "env", "OCF_ROOT=/usr/lib/ocf", f"HA_RSCTMP={tmp_path}", "ocf-tester",
        "-n", "vip1", "-o", f"ip={VIP4}", "-o", "cidr_netmask=24", "-o", "nic=eth0",
        "-o", f"nfsreset_bin={REAL_NFSRESET}", str(AGENT), check=False, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "passed all tests" in res.stdout
    assert not topo.has_addr("node1", VIP4, usable=False)


def leave_a_session(topo, tmp_path, vip=VIP4):
    """A session left on the VIP of node1 while the VIP is gone (a plain IPaddr2
    start, a client connecting to a listener that keeps its sockets, a plain
    IPaddr2 stop): what makes the agent run nfsreset at all. Returns the
    processes to end (listener, client)."""
    import subprocess
    res, _ = run_agent(topo, tmp_path / "plain", "start", ip=vip, agent=IPADDR2)
    assert res.returncode == 0, res.stderr
    lst = topo.popen("node1", "python3", "-c", LISTENER, stdout=subprocess.PIPE, text=True)
    assert lst.stdout.readline().strip() == "listening"
    keeper = _client_keeps_a_session(topo, vip)
    assert keeper.stdout.readline().strip() == "up"
    assert wait_for(lambda: sessions_on(topo, "node1", vip))
    res, _ = run_agent(topo, tmp_path / "plain", "stop", ip=vip, agent=IPADDR2)
    assert res.returncode == 0, res.stderr
    assert sessions_on(topo, "node1", vip)
    return lst, keeper


@pytest.fixture
def ends(topo):
    """Processes a test started, ended whatever happens."""
    procs = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(timeout=5)


def test_nothing_left_on_the_vip_means_no_nfsreset_before_the_start(topo, tmp_path, stub):
    """The cheap check: with no socket on VIP:port only the (background) tickle
    runs nfsreset; start and stop exec no Python of their own."""
    res, _ = run_agent(topo, tmp_path, "start", nfsreset_bin=stub)
    assert res.returncode == 0, res.stderr
    assert wait_for(lambda: len(calls(tmp_path)) >= 1)
    time.sleep(0.3)
    assert [c.split()[0] for c in calls(tmp_path)] == ["tickle"], calls(tmp_path)
    res, _ = run_agent(topo, tmp_path, "stop", nfsreset_bin=stub)
    assert res.returncode == 0, res.stderr
    assert [c.split()[0] for c in calls(tmp_path)] == ["tickle"], calls(tmp_path)
    assert "no client on the VIP; nothing to publish, no session left" in res.stderr


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_calls_come_in_order_around_the_real_ipaddr2(topo, tmp_path, stub, vip, ends):
    # IPv4 with auto|destroy ends leftovers with ss -K, no nfsreset call
    # (test_ipv4_leftovers_end_by_ss_k_with_no_python): rst keeps the calls here
    strategy = "rst" if vip == VIP4 else "destroy"
    ends.extend(leave_a_session(topo, tmp_path, vip))
    res, _ = run_agent(topo, tmp_path, "start", ip=vip, nfsreset_bin=stub,
                       nfsreset_port="2049 20048", nfsreset_strategy=strategy,
                       nfsreset_state_dir=tmp_path / "state")
    started_at = time.time()
    assert res.returncode == 0, res.stderr
    assert topo.has_addr("node1", vip, usable=False)
    assert wait_for(lambda: len(calls(tmp_path)) >= 2), calls(tmp_path)
    kill, tickle = calls(tmp_path)
    # pre-start kill while the address is not there yet; tickle once it is
    assert kill.startswith("kill vip=absent kill --vip " + vip + " --store auto --moment pre-start")
    assert f"--state-dir {tmp_path / 'state'}" in kill
    assert f"--strategy {strategy}" in kill and "--port 2049 --port 20048" in kill
    # started before IPaddr2 start, it waited for the VIP (--wait)
    assert tickle.startswith("tickle vip=present tickle --vip " + vip + " --store auto --wait 5")
    assert "--port 2049 --port 20048" in tickle and f"--strategy {strategy}" in tickle
    # ... and fired while IPaddr2 was still announcing, not after start returned
    tickled_at = float((tmp_path / "calls.log.times").read_text().splitlines()[1].split()[1])
    assert tickled_at < started_at - 0.3, (started_at - tickled_at)
    # the background tickle leaves its result for the operator
    status = tmp_path / "rsctmp" / "nfsreset-vip1.tickle"
    assert wait_for(status.exists)
    assert status.read_text().startswith("rc=0 stub summary: tickle ended 0 sessions")
    assert "nfsreset kill (pre-start) " + vip + ": stub summary" in res.stderr

    res, _ = run_agent(topo, tmp_path, "stop", ip=vip, nfsreset_bin=stub, nfsreset_strategy=strategy)
    assert res.returncode == 0, res.stderr
    assert not topo.has_addr("node1", vip, usable=False)
    # the clients were recorded while the address was still there
    assert "1 client tuple(s) recorded before the address went" in res.stderr
    # the post-stop kill runs after stop returned (Pacemaker waits for stop)
    assert wait_for(lambda: len(calls(tmp_path)) >= 3), calls(tmp_path)
    post_stop = calls(tmp_path)[2]
    assert post_stop.startswith("kill vip=absent kill --vip " + vip + " --store auto --moment post-stop")
    assert post_stop.endswith("--port 2049") and f"--strategy {strategy}" in post_stop


def test_ipv4_leftovers_end_by_ss_k_with_no_python(topo, tmp_path, stub, ends):
    """IPv4, strategy auto: a stale session found before the start, and one left
    after the stop, are ended by ss -K in the agent itself (SOCK_DESTROY, ~7 ms):
    no nfsreset process at either (the old agent ran a Python kill for each, the
    pre-start one synchronously: ~0.2 s of CPU on the start's path)."""
    lst, keeper = leave_a_session(topo, tmp_path)
    ends.extend((lst, keeper))
    params = {"nfsreset_bin": stub, "nfsreset_state_dir": tmp_path / "state"}
    res, _ = run_agent(topo, tmp_path, "start", **params)
    assert res.returncode == 0, res.stderr
    assert "1 stale session(s) ended (ss -K)" in res.stderr, res.stderr
    assert wait_for(lambda: len(calls(tmp_path)) >= 1)
    time.sleep(0.3)
    assert [c.split()[0] for c in calls(tmp_path)] == ["tickle"], calls(tmp_path)
    # a new session while the VIP is here; the stop records it, then ends what is left
    again = _client_keeps_a_session(topo, VIP4)
    ends.append(again)
    assert again.stdout.readline().strip() == "up"
    assert wait_for(lambda: sessions_on(topo, "node1", VIP4))
    res, _ = run_agent(topo, tmp_path, "stop", **params)
    assert res.returncode == 0, res.stderr
    assert "1 client tuple(s) recorded before the address went" in res.stderr
    assert "1 session(s) left on the VIP ended (ss -K)" in res.stderr, res.stderr
    assert not sessions_on(topo, "node1", VIP4)
    time.sleep(0.3)
    assert [c.split()[0] for c in calls(tmp_path)] == ["tickle"], calls(tmp_path)
    assert not (tmp_path / "rsctmp" / "nfsreset-vip1.poststop").exists()


def test_netns_parameter_is_passed_on(topo, tmp_path, stub):
    """IPaddr2's network_namespace becomes nfsreset's --netns."""
    ns = topo.ns("node2")
    res = topo.run("node1", *agent_env(tmp_path, VIP4, nfsreset_bin=stub, network_namespace=ns),
                   str(AGENT), "start", check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    assert topo.has_addr("node2", VIP4) and not topo.has_addr("node1", VIP4, usable=False)
    # the tickle only (nothing left to kill); the stub waits its --wait 5 s for the VIP
    # in its own netns (it ignores --netns), and only then logs: wait longer than that.
    assert wait_for(lambda: len(calls(tmp_path)) >= 1, timeout=15)
    assert all(f"--netns {ns}" in line for line in calls(tmp_path))
    topo.run("node1", *agent_env(tmp_path, VIP4, nfsreset_bin=stub, network_namespace=ns),
             str(AGENT), "stop", timeout=60)
    assert not topo.has_addr("node2", VIP4, usable=False)


@pytest.mark.parametrize("failure", [
    {"STUB_RC": 1}, {"STUB_RC": 2}, {"STUB_RC": 3}, {"STUB_RC": 70},
    {"nfsreset_bin": "/nonexistent/nfsreset"},
])
def test_nfsreset_failure_never_fails_the_ip(topo, tmp_path, stub, failure, ends):
    ends.extend(leave_a_session(topo, tmp_path))
    # rst: the leftover goes to nfsreset's pre-start kill (auto would end it with ss -K)
    params = {"nfsreset_bin": stub, "nfsreset_strategy": "rst", **failure}
    res, _ = run_agent(topo, tmp_path, "start", **params)
    assert res.returncode == 0, res.stderr
    assert topo.has_addr("node1", VIP4)
    assert "nfsreset kill (pre-start)" in res.stderr
    level = "INFO" if failure.get("STUB_RC") == 3 else "WARNING"
    assert f"{level}: nfsreset kill (pre-start)" in res.stderr
    res, _ = run_agent(topo, tmp_path, "monitor", **params)
    assert res.returncode == 0
    res, _ = run_agent(topo, tmp_path, "stop", **params)
    assert res.returncode == 0, res.stderr
    assert not topo.has_addr("node1", VIP4, usable=False)
    res, _ = run_agent(topo, tmp_path, "monitor", **params)
    assert res.returncode == 7


def test_a_timeout_of_0_is_not_unbounded(topo, tmp_path, stub, ends):
    """timeout(1) takes 0 as no limit: the old agent accepted nfsreset_timeout=0
    and its start waited for a hanging nfsreset as long as it hung."""
    ends.extend(leave_a_session(topo, tmp_path))
    res, took = run_agent(topo, tmp_path, "start", nfsreset_bin=stub, nfsreset_timeout=0,
                          STUB_KILL_SLEEP=30, nfsreset_strategy="rst")
    assert res.returncode == 0 and topo.has_addr("node1", VIP4)
    assert took < 12, took
    assert "nfsreset_timeout: '0' is not whole seconds from 1 to 999; using 5" in res.stderr
    assert "timed out after 5 s" in res.stderr
    run_agent(topo, tmp_path, "stop", nfsreset_bin=stub, nfsreset_strategy="rst")


def test_a_hanging_nfsreset_is_cut_off(topo, tmp_path, stub, ends):
    ends.extend(leave_a_session(topo, tmp_path))
    res, took = run_agent(topo, tmp_path, "start", nfsreset_bin=stub, nfsreset_timeout=1,
                          STUB_KILL_SLEEP=30, nfsreset_strategy="rst")
    assert res.returncode == 0
    assert topo.has_addr("node1", VIP4)
    assert took < 4, took
    assert "timed out after 1 s" in res.stderr
    res, took = run_agent(topo, tmp_path, "stop", nfsreset_bin=stub, nfsreset_timeout=1,
                          STUB_KILL_SLEEP=30, nfsreset_strategy="rst")
    assert res.returncode == 0 and took < 4
    assert not topo.has_addr("node1", VIP4, usable=False)


def test_stop_ends_a_tickle_still_running(topo, tmp_path, stub):
    res, took = run_agent(topo, tmp_path, "start", nfsreset_bin=stub, nfsreset_timeout=30,
                          STUB_TICKLE_SLEEP=30)
    assert res.returncode == 0 and took < 3, (took, res.stderr)
    pidfile = tmp_path / "rsctmp" / "nfsreset-vip1.tickle.pid"
    assert wait_for(pidfile.exists)
    pid = int(pidfile.read_text())
    res, took = run_agent(topo, tmp_path, "stop", nfsreset_bin=stub, STUB_TICKLE_SLEEP=30)
    assert res.returncode == 0 and took < 3
    assert "ended the tickle still running" in res.stderr
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"))
    status = tmp_path / "rsctmp" / "nfsreset-vip1.tickle"
    assert wait_for(status.exists)
    assert not status.read_text().startswith("rc=0")


def test_ipaddr2_failure_is_the_result(topo, tmp_path, stub):
    """A bad nic fails IPaddr2; the agent returns exactly that and tickles nobody."""
    plain, _ = run_agent(topo, tmp_path, "start", agent=IPADDR2, nic="nosuch0")
    ours, _ = run_agent(topo, tmp_path, "start", nfsreset_bin=stub, nic="nosuch0")
    assert plain.returncode != 0
    assert ours.returncode == plain.returncode
    time.sleep(0.3)
    assert not any(line.startswith("tickle") for line in calls(tmp_path))


def test_meta_data_is_ipaddr2s_plus_ours(topo, tmp_path):
    ours = topo.run("node1", *agent_env(tmp_path, VIP4), str(AGENT), "meta-data").stdout
    theirs = topo.run("node1", *agent_env(tmp_path, VIP4), str(IPADDR2), "meta-data").stdout
    import xml.etree.ElementTree as ET
    names = lambda xml: [p.get("name") for p in ET.fromstring(xml).iter("parameter")]  # noqa: E731
    extra = ["nfsreset_port", "nfsreset_state_dir", "nfsreset_strategy", "nfsreset_bin",
             "nfsreset_timeout", "nfsreset_store"]
    assert names(ours) == names(theirs) + extra
    root = ET.fromstring(ours)
    assert root.get("name") == "IPaddr2nfs" and root.findtext("version") == "1.1"


def _timed(topo, tmp_path, agent, action, **params) -> float:
    res, took = run_agent(topo, tmp_path, action, agent=agent, **params)
    assert res.returncode == 0, res.stderr
    return took


def test_start_stop_cost_compared_with_plain_ipaddr2(topo, tmp_path, stub):
    """The agent's own overhead stays well within the 0.5 s goal.

    Measured three ways, median of 3: plain IPaddr2, the agent with a stub
    nfsreset that returns at once (the agent's own cost), and the agent with
    the real nfsreset (printed; its cost is the commands', not the agent's).
    """
    rounds = 3
    results = {}
    for label, agent, params in (
        ("IPaddr2", IPADDR2, {}),
        ("agent+stub", AGENT, {"nfsreset_bin": stub}),
        ("agent+real", AGENT, {"nfsreset_bin": REAL_NFSRESET}),
    ):
        starts, stops = [], []
        for _ in range(rounds):
            starts.append(_timed(topo, tmp_path, agent, "start", **params))
            stops.append(_timed(topo, tmp_path, agent, "stop", **params))
        results[label] = (statistics.median(starts), statistics.median(stops))
    print()
    for label, (start, stop) in results.items():
        print(f"  {label:11s} start {start:.3f} s  stop {stop:.3f} s")
    base_start, base_stop = results["IPaddr2"]
    own_start, own_stop = results["agent+stub"]
    assert own_start - base_start < 0.5
    assert own_stop - base_stop < 0.5


# -- with the real nfsreset: a real session, a real stop/start cycle ----------

LISTENER = r"""
import socket, sys, time
srv = socket.socket(socket.AF_INET6)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", 2049)); srv.listen(16); srv.settimeout(0.5)
print("listening", flush=True)
held = []                      # like nfsd: never closes because an address went away
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        held.append(srv.accept()[0])
    except socket.timeout:
        pass
"""

CONNECT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 2049), timeout=3)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
print("connected", s.getsockname()[1])
"""


def sessions_on(topo, node, vip) -> list[str]:
    out = topo.run(node, "ss", "-Htn", "state", "all", "sport", "= :2049").stdout
    return [line for line in out.splitlines() if vip in line and "LISTEN" not in line]


def quarantined(topo, node) -> str:
    return topo.run(node, "nft", "list", "table", "inet", "nfsreset", check=False).stdout


@pytest.fixture
def listener(topo):
    proc = topo.popen("node1", "python3", "-c", LISTENER, stdout=__import__("subprocess").PIPE,
                      text=True)
    try:
        assert proc.stdout.readline().strip() == "listening"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=5)


def _client_keeps_a_session(topo, vip=VIP4):
    """A client session to the VIP that outlives the connect (kept by a sleeper)."""
    return topo.popen("client", "python3", "-c",
                      "import socket,sys,time; s=socket.create_connection((sys.argv[1],2049),3); "
                      "print('up', flush=True); time.sleep(30)", vip,
                      stdout=__import__("subprocess").PIPE, text=True)


def test_real_cycle_ends_sessions_and_leaves_the_vip_usable(topo, tmp_path, listener):
    params = {"nfsreset_bin": REAL_NFSRESET, "nfsreset_state_dir": tmp_path / "state"}
    res, _ = run_agent(topo, tmp_path, "start", **params)
    assert res.returncode == 0, res.stderr
    keeper = _client_keeps_a_session(topo)
    try:
        assert keeper.stdout.readline().strip() == "up"
        assert wait_for(lambda: sessions_on(topo, "node1", VIP4))
        res, _ = run_agent(topo, tmp_path, "stop", **params)
        assert res.returncode == 0, res.stderr
        print(res.stderr)
        # IPv4: ended by ss -K before the stop returned, no Python post-stop
        assert "1 session(s) left on the VIP ended (ss -K)" in res.stderr
        assert not (tmp_path / "rsctmp" / "nfsreset-vip1.poststop").exists()
        assert not sessions_on(topo, "node1", VIP4), sessions_on(topo, "node1", VIP4)
        # the stop's shell wrote the state dir's file (in the background)
        assert wait_for((tmp_path / "state" / f"{VIP4}.clients.json").exists)
        status = tmp_path / "rsctmp" / "nfsreset-vip1.tickle"
        status.unlink(missing_ok=True)  # the first start's tickle had nobody to tickle
        res, _ = run_agent(topo, tmp_path, "start", **params)
        assert res.returncode == 0, res.stderr
        assert wait_for(status.exists, timeout=15)
        print(status.read_text())
        # the client recorded at post-stop was tickled from the state dir
        assert status.read_text().startswith("rc=0 ")
        assert "no known client" not in status.read_text()
        # whatever the tickle did, the VIP answers again: no quarantine left over
        assert VIP4 not in quarantined(topo, "node1")
        topo.run("client", "python3", "-c", CONNECT, VIP4)
    finally:
        keeper.kill()
        keeper.wait(timeout=5)
        run_agent(topo, tmp_path, "stop", **params)


def test_a_failed_tickle_does_not_leave_the_vip_quarantined(topo, tmp_path, listener):
    """post-stop quarantines the VIP; pre-start kill and tickle would lift it. If
    both fail, the agent deletes the quarantine element itself."""
    wrapper = tmp_path / "half-broken-nfsreset"
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *post-stop*) exec {REAL_NFSRESET} "$@" ;; esac\nexit 70\n')
    wrapper.chmod(0o755)
    # strategy nft: not one ss -K stands in for, so the stop runs nfsreset's post-stop
    params = {"nfsreset_bin": wrapper, "nfsreset_state_dir": tmp_path / "state", "nfsreset_strategy": "nft"}
    res, _ = run_agent(topo, tmp_path, "start", **params)
    assert res.returncode == 0, res.stderr
    keeper = _client_keeps_a_session(topo)     # a session, so the stop runs nfsreset's post-stop
    assert keeper.stdout.readline().strip() == "up"
    assert wait_for(lambda: sessions_on(topo, "node1", VIP4))
    res, _ = run_agent(topo, tmp_path, "stop", **params)
    keeper.kill()
    keeper.wait(timeout=5)
    assert res.returncode == 0, res.stderr
    assert wait_for((tmp_path / "rsctmp" / "nfsreset-vip1.poststop").exists, timeout=10)
    q4 = lambda: topo.run("node1", "nft", "list", "set", "inet", "nfsreset", "quarantine4",  # noqa: E731
                          check=False).stdout
    assert VIP4 in q4()
    res, _ = run_agent(topo, tmp_path, "start", **params)
    assert res.returncode == 0
    status = tmp_path / "rsctmp" / "nfsreset-vip1.tickle"
    assert wait_for(status.exists, timeout=10)
    assert status.read_text().startswith("rc=70")
    assert wait_for(lambda: VIP4 not in q4(), timeout=5)
    run_agent(topo, tmp_path, "stop", **params)


# -- with the real nfsreset and real NFS-Ganesha ---------------------------------------------
@needs_ganesha    # ~4 s
def test_real_cycle_on_ganesha_ends_its_socket_and_the_nfs_client_is_back(topo, tmp_path):
    """The same stop/start cycle with NFS-Ganesha holding the session and the lab's
    NFSv3 client (MOUNT, then GETATTR) on it: the agent's post-stop kill ends the
    socket ganesha.nfsd holds on the departed VIP (plain IPaddr2 leaves it, see
    test_lab_ocf.py), and after start the tickle brings the client back, from its
    reserved port, to an NFS3_OK reply within 1 s of start returning."""
    params = {"nfsreset_bin": REAL_NFSRESET, "nfsreset_state_dir": tmp_path / "state"}
    with ganesha_heads(topo, tmp_path, nodes=("node1",)) as (_, export):
        res, _ = run_agent(topo, tmp_path, "start", **params)
        assert res.returncode == 0, res.stderr
        client = nfs_client(topo, VIP4, "3", export)
        try:
            log = ClientLog(client)
            assert wait_for(lambda: log.first_reply_after(0.0) is not None, 10), log.events()
            port = log.port()
            assert wait_for(lambda: any("ganesha.nfsd" in line for line in
                                        topo.run("node1", "ss", "-Htnp", "sport", "= :2049").stdout.splitlines()))
            res, _ = run_agent(topo, tmp_path, "stop", **params)
            assert res.returncode == 0, res.stderr
            assert "1 session(s) left on the VIP ended (ss -K)" in res.stderr
            # Ganesha's own socket on the departed VIP is gone (it shows as ::ffff:VIP)
            assert not sessions_on(topo, "node1", VIP4), sessions_on(topo, "node1", VIP4)
            res, _ = run_agent(topo, tmp_path, "start", **params)
            started = time.monotonic()
            assert res.returncode == 0, res.stderr
            assert wait_for(lambda: log.first_reply_after(started) is not None, 5), log.events()[-6:]
            back = log.first_reply_after(started) - started
            print(f"Ganesha NFSv3: start returned -> first NFS3_OK reply {back:.3f} s")
            assert back <= 1.0, (back, log.events()[-6:])
            assert {e["port"] for e in log.events() if e["ev"] == "connected"} == {port}
            assert sum(e["ev"] == "connected" for e in log.events()) >= 2, "the client never reconnected"
        finally:
            client.kill()
            client.wait(timeout=5)
            run_agent(topo, tmp_path, "stop", **params)


# -- what reaches Pacemaker's log -----------------------------------------------------------
def ha_log_lines(path: pathlib.Path) -> list[tuple[str, str]]:
    """(level, message) of the agent's nfsreset lines in an HA_LOGFILE
    ("<date> <tag>:    INFO: nfsreset kill (post-stop) VIP: ...")."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        _, sep, rest = line.partition(":    ")
        level, _, msg = rest.partition(": ")
        if sep and msg.startswith("nfsreset"):
            out.append((level, msg))
    return out


def test_every_action_of_a_stop_and_a_start_reaches_the_log_once(topo, tmp_path, listener):
    """Each step nfsreset took is one ocf_log line at its level (before, only
    the last line of each call was logged: post-stop's record and quarantine,
    pre-start's steps before its last were lost); the background post-stop kill's
    and tickle's lines too, logged as each exits; nothing twice. The stop's own
    record (before the address goes, in shell) is one line of its own."""
    hlog = tmp_path / "ha.log"
    params = {"nfsreset_bin": REAL_NFSRESET, "nfsreset_state_dir": tmp_path / "state",
              "HA_LOGFILE": hlog}
    res, _ = run_agent(topo, tmp_path, "start", **params)
    assert res.returncode == 0, res.stderr
    status = tmp_path / "rsctmp" / "nfsreset-vip1.tickle"
    poststop = tmp_path / "rsctmp" / "nfsreset-vip1.poststop"
    assert wait_for(status.exists, timeout=15)
    keeper = _client_keeps_a_session(topo)
    try:
        assert keeper.stdout.readline().strip() == "up"
        assert wait_for(lambda: sessions_on(topo, "node1", VIP4))
        hlog.unlink()
        res, _ = run_agent(topo, tmp_path, "stop", **params)
        assert res.returncode == 0, res.stderr
        # IPv4: ss -K ended the session, no Python post-stop; the stop's one
        # line is written after the stop returned
        assert wait_for(lambda: ha_log_lines(hlog), timeout=5)
        time.sleep(0.3)
        assert not poststop.exists()
        stop_lines = ha_log_lines(hlog)
        status.unlink()
        hlog.unlink()
        res, _ = run_agent(topo, tmp_path, "start", **params)
        assert res.returncode == 0, res.stderr
        assert wait_for(status.exists, timeout=15)
        start_lines = ha_log_lines(hlog)
    finally:
        keeper.kill()
        keeper.wait(timeout=5)
        run_agent(topo, tmp_path, "stop", **params)
    print("\nstop:", *stop_lines, "start:", *start_lines, sep="\n  ")
    expected_stop = [("INFO", f"nfsreset (stop) {VIP4}: 1 client tuple(s) recorded before the address went")]
    tickle = f"nfsreset tickle (post-start) {VIP4}: "
    # No session is left on the VIP here (the post-stop kill ended it): the start
    # runs no pre-start kill; the quarantine is lifted by nft, said at debug.
    expected_start = [("INFO", tickle + f"announced {VIP4}"),
                      ("INFO", tickle + "tickled 1 client tuple(s)")]
    for lines, expected in ((stop_lines, expected_stop), (start_lines, expected_start)):
        for level, prefix in expected:
            hits = [lv for lv, msg in lines if msg.startswith(prefix)]
            assert hits == [level], (prefix, lines)
        # no line that is not one of these actions, none twice
        assert len(lines) == len(expected), lines


FAILING = r"""#!/bin/sh
# Says what the engine says when a step fails (its wording), then exits 1 as it does.
case " $* " in *" post-stop "*)
    echo "nfsreset kill: recorded 2 client tuple(s) of VIP in /state"
    echo "nfsreset kill: quarantine of VIP failed: nft said no (OSError); going on without nftables"
    echo "nfsreset kill: destroyed 2 of 2 session(s) on VIP in 1.0 ms: 198.51.100.100:700 ESTABLISHED"
    echo "nfsreset kill: failed: quarantine; unavailable here: nftables" >&2
    exit 1 ;;
esac
case " $* " in *" tickle "*)
    echo "nfsreset tickle: tickle of 2 client tuple(s) of VIP skipped: raw sockets unavailable here (EPERM)"
    echo "nfsreset tickle: failed: tickle" >&2
    exit 1 ;;
esac
exit 0
"""


def test_failed_and_skipped_steps_are_warnings_with_their_reason_once(topo, tmp_path, listener):
    """A failed step is one WARNING line with its reason; the run's closing line
    (exit 1: "failed: ...") is not a second one; done steps stay INFO."""
    fake = tmp_path / "failing-nfsreset"
    fake.write_text(FAILING)
    fake.chmod(0o755)
    hlog = tmp_path / "ha.log"
    # strategy rst: the stop leaves the session to nfsreset's post-stop (not to ss -K)
    params = {"nfsreset_bin": fake, "HA_LOGFILE": hlog, "nfsreset_strategy": "rst"}
    res, _ = run_agent(topo, tmp_path, "start", **params)
    assert res.returncode == 0, res.stderr
    status = tmp_path / "rsctmp" / "nfsreset-vip1.tickle"
    poststop = tmp_path / "rsctmp" / "nfsreset-vip1.poststop"
    assert wait_for(status.exists, timeout=15)
    keeper = _client_keeps_a_session(topo)    # a session left, so the post-stop kill runs
    try:
        assert keeper.stdout.readline().strip() == "up"
        assert wait_for(lambda: sessions_on(topo, "node1", VIP4))
        res, _ = run_agent(topo, tmp_path, "stop", **params)
        assert res.returncode == 0, res.stderr
        assert wait_for(poststop.exists, timeout=15)
    finally:
        keeper.kill()
        keeper.wait(timeout=5)
    lines = ha_log_lines(hlog)
    post = f"nfsreset kill (post-stop) {VIP4}: "
    tickle = f"nfsreset tickle (post-start) {VIP4}: "
    expected = [
        ("WARNING", tickle + "tickle of 2 client tuple(s) of VIP skipped: raw sockets unavailable here (EPERM)"),
        ("INFO", post + "recorded 2 client tuple(s) of VIP in /state"),
        ("WARNING", post + "quarantine of VIP failed: nft said no (OSError); going on without nftables"),
        ("INFO", post + "destroyed 2 of 2 session(s) on VIP in 1.0 ms: 198.51.100.100:700 ESTABLISHED"),
    ]
    stop_line = [(lv, msg) for lv, msg in lines if msg.startswith(f"nfsreset (stop) {VIP4}: ")]
    assert [lv for lv, _ in stop_line] == ["INFO"], lines
    assert [x for x in lines if x not in stop_line] == expected, lines


@pytest.mark.parametrize("action", ["stop", "start"])
def test_a_vip_local_through_a_local_route_keeps_its_sessions(topo, tmp_path, listener, action, ends):
    """A VIP with no address but inside a `local` route range (AnyIP, LVS-DR) is
    here: its sessions are live. The agent's ss -K path must ask the FIB, not only
    the address table (it asked only the address table and ended the live session)."""
    rng, vip = "198.51.100.64/27", "198.51.100.70"
    topo.run("node1", "ip", "route", "add", "local", rng, "dev", "lo", "table", "local")
    node1_addr = topo.run("node1", "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout.split()[3].split("/")[0]
    topo.run("client", "ip", "route", "add", rng, "via", node1_addr, "dev", "eth0")
    keeper = _client_keeps_a_session(topo, vip)
    ends.append(keeper)
    assert keeper.stdout.readline().strip() == "up"
    assert wait_for(lambda: sessions_on(topo, "node1", vip))
    params = {"nfsreset_bin": REAL_NFSRESET, "nfsreset_state_dir": tmp_path / "state"}
    res, _ = run_agent(topo, tmp_path, action, ip=vip, **params)
    assert res.returncode == 0, res.stderr
    assert "ss -K" not in res.stderr, res.stderr
    # the background post-stop (real nfsreset) refuses a VIP that is here; give it time to act
    poststop = tmp_path / "rsctmp" / "nfsreset-vip1.poststop"
    if action == "stop":
        assert wait_for(poststop.exists, timeout=15), res.stderr
    else:
        time.sleep(1.0)
    live = sessions_on(topo, "node1", vip)
    assert live and all(line.startswith("ESTAB") for line in live), (live, res.stderr)
    assert keeper.poll() is None


# ss on the agent's PATH that, at its ss -K call, holds on until the test says go:
# the moment between the agent's vip_here and its ss -K, made wide on purpose.
SS_AT_KILL = r"""#!/bin/sh
case $1 in -*K*)
    : > "$RACE_DIR/at-kill"
    i=0; while [ $i -lt 200 ] && [ ! -e "$RACE_DIR/go" ]; do sleep 0.05; i=$((i + 1)); done ;;
esac
exec /usr/bin/ss "$@"
"""


@pytest.mark.parametrize("action", ["stop", "start"])
def test_a_session_made_after_the_check_survives_the_ss_k(topo, tmp_path, action, ends):
    """The VIP arrives between the agent's vip_here (away) and its ss -K, and a
    client connects: that session is live and must survive; the stale one the
    agent listed is still ended. The old agent's ss -K ended every socket on
    VIP:port, the new one too."""
    import subprocess
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "ss").write_text(SS_AT_KILL)
    (shims / "ss").chmod(0o755)
    race = tmp_path / "race"
    race.mkdir()
    params = {"nfsreset_bin": REAL_NFSRESET, "nfsreset_state_dir": tmp_path / "state"}
    if action == "stop":        # the session is the VIP's, left once the stop deletes it
        lst = topo.popen("node1", "python3", "-c", LISTENER, stdout=subprocess.PIPE, text=True)
        ends.append(lst)
        assert lst.stdout.readline().strip() == "listening"
        res, _ = run_agent(topo, tmp_path, "start", **params)
        assert res.returncode == 0, res.stderr
        old = _client_keeps_a_session(topo)
        ends.append(old)
        assert old.stdout.readline().strip() == "up"
    else:                       # left by a plain IPaddr2 start and stop
        ends.extend(leave_a_session(topo, tmp_path / "left"))
    assert wait_for(lambda: sessions_on(topo, "node1", VIP4))
    old_lines = sessions_on(topo, "node1", VIP4)
    env = agent_env(tmp_path, VIP4, **params, RACE_DIR=race,
                    PATH=f"{shims}:/usr/sbin:/usr/bin:/sbin:/bin")
    agent = topo.popen("node1", *env, str(AGENT), action, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    ends.append(agent)
    try:
        assert wait_for((race / "at-kill").exists, timeout=20), "the agent never reached ss -K"
        # the VIP arrives (another start, an operator) and a client connects
        if not topo.has_addr("node1", VIP4, usable=False):
            topo.run("node1", "ip", "addr", "add", f"{VIP4}/24", "dev", "eth0")
        new = _client_keeps_a_session(topo)
        ends.append(new)
        assert new.stdout.readline().strip() == "up"
        assert wait_for(lambda: len(sessions_on(topo, "node1", VIP4)) == 2)
    finally:
        (race / "go").touch()
    out, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    left = sessions_on(topo, "node1", VIP4)
    assert len(left) == 1 and left[0] not in old_lines, (left, old_lines, err)
    assert left[0].startswith("ESTAB") and new.poll() is None
    topo.run("node1", "ip", "addr", "del", f"{VIP4}/24", "dev", "eth0", check=False)


# Pacemaker's command-line tools as this node of a two-node cluster would answer;
# attrd_updater records its argv (the cluster is not under test here: the agent's
# reading of its own state files is).
CRM_NODE = """#!/bin/sh
case $1 in -n) echo node1 ;; -l) printf '1 node1 member\\n2 node2 member\\n' ;; esac
"""
ATTRD_UPDATER = """#!/bin/sh
echo "$*" >> "$SHIM_LOG"
"""


def _pacemaker_tools(tmp_path, crm_node=CRM_NODE, attrd_updater=ATTRD_UPDATER) -> dict:
    """Agent parameters with store attrd and the two tools as `shims/` has them."""
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in (("crm_node", crm_node), ("attrd_updater", attrd_updater)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    return {"nfsreset_bin": REAL_NFSRESET, "nfsreset_state_dir": tmp_path / "state",
            "nfsreset_store": "attrd", "SHIM_LOG": tmp_path / "attrd.log",
            "PATH": f"{shims}:/usr/sbin:/usr/bin:/sbin:/bin"}


@pytest.mark.parametrize("poison", ["fifo", "devzero", "glob"])
def test_garbage_state_files_in_ha_rsctmp_neither_hang_nor_steer(topo, tmp_path, listener, poison):
    """The agent's $RUN_BASE.published and .peers are read back by the monitor and
    the stop. A FIFO there, or a link to /dev/zero, hung the old agent's read
    (the monitor never returned: Pacemaker times it out and recovers the VIP);
    peers that are not node names ('*') were globbed into attrd_updater -N
    arguments. Now such files count as nothing known: the members are asked."""
    params = _pacemaker_tools(tmp_path)
    shim_log = params["SHIM_LOG"]
    res, _ = run_agent(topo, tmp_path, "start", **params)
    assert res.returncode == 0, res.stderr
    keeper = _client_keeps_a_session(topo)
    try:
        assert keeper.stdout.readline().strip() == "up"
        assert wait_for(lambda: sessions_on(topo, "node1", VIP4))
        base = tmp_path / "rsctmp" / "nfsreset-vip1"
        for f in (base.with_name(base.name + ".published"), base.with_name(base.name + ".peers")):
            f.unlink(missing_ok=True)
            if poison == "fifo":
                os.mkfifo(f)
            elif poison == "devzero":
                f.symlink_to("/dev/zero")
            else:
                f.write_text("*\n*\n")
        action = "stop" if poison == "glob" else "monitor"
        try:
            res = topo.run("node1", *agent_env(tmp_path, VIP4, **params), str(AGENT), action,
                           check=False, timeout=15)
        except __import__("subprocess").TimeoutExpired:
            pytest.fail(f"the {action} hung on a {poison} in HA_RSCTMP")
        assert res.returncode == 0, res.stderr
        # the list went to the one peer crm_node names, and nowhere else
        assert wait_for(shim_log.exists)
        time.sleep(0.5)
        targets = {line.split(" -N ")[1].split()[0] for line in shim_log.read_text().splitlines()}
        assert targets == {"node2"}, shim_log.read_text()
    finally:
        keeper.kill()
        keeper.wait(timeout=5)
        run_agent(topo, tmp_path, "stop", **params)


def test_fifos_where_the_agent_keeps_its_jobs_files_block_nothing(topo, tmp_path, stub):
    """FIFOs at the pid files a start reads (to end a tickle or post-stop still
    running) and at the files the background tickle writes: the old agent's
    start hung reading the pid file; a FIFO at the tickle's output kept the
    tickle (and the quarantine lift after a failed one) from ever running."""
    rsctmp = tmp_path / "rsctmp"
    rsctmp.mkdir()
    for name in ("tickle.pid", "poststop.pid", "tickle.out", "tickle.pid.new", "tickle.new"):
        os.mkfifo(rsctmp / f"nfsreset-vip1.{name}")
    try:
        res = topo.run("node1", *agent_env(tmp_path, VIP4, nfsreset_bin=stub), str(AGENT), "start",
                       check=False, timeout=15)
    except __import__("subprocess").TimeoutExpired:
        pytest.fail("the start hung on a FIFO in HA_RSCTMP")
    assert res.returncode == 0, res.stderr
    status = rsctmp / "nfsreset-vip1.tickle"
    assert wait_for(status.exists, timeout=10), calls(tmp_path)
    assert status.read_text().startswith("rc=0 stub summary: tickle"), status.read_text()
    res, _ = run_agent(topo, tmp_path, "stop", nfsreset_bin=stub)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("action", ["monitor", "stop"])
def test_a_hung_attrd_costs_one_bound_not_one_per_peer(topo, tmp_path, listener, action):
    """Eight peers, attrd not answering: the old agent waited 2 s per peer in
    turn (monitor and stop 16 s each, of their 20 s and 30 s: a few peers more
    and they time out; a failed stop fences the node). All peers are asked at
    once now, each still bounded, each failure logged."""
    crm_node = ("#!/bin/sh\ncase $1 in -n) echo node1 ;; -l) for i in 1 2 3 4 5 6 7 8 9; do "
                "echo \"$i node$i member\"; done ;; esac\n")
    hung = '#!/bin/sh\necho "$*" >> "$SHIM_LOG"\nexec sleep 30\n'
    params = _pacemaker_tools(tmp_path, crm_node, hung)
    res, _ = run_agent(topo, tmp_path, "start", **params)
    assert res.returncode == 0, res.stderr
    keeper = _client_keeps_a_session(topo)
    try:
        assert keeper.stdout.readline().strip() == "up"
        assert wait_for(lambda: sessions_on(topo, "node1", VIP4))
        res, took = run_agent(topo, tmp_path, action, **params)
        assert res.returncode == 0, res.stderr
        assert took < 10, (took, res.stderr)
        assert res.stderr.count("attrd_updater for node") >= 8, res.stderr
    finally:
        keeper.kill()
        keeper.wait(timeout=5)
        run_agent(topo, tmp_path, "stop", **params)


SS_FAILS = "#!/bin/sh\necho 'ss: cannot open netlink socket' >&2\nexit 1\n"


def test_when_ss_cannot_list_the_python_kill_decides(topo, tmp_path, stub, ends):
    """ss failing is not "nothing left": the agent says so in one line and hands
    the leftovers to nfsreset's pre-start kill (its own sock_diag dump), instead
    of skipping the cleanup (it used to read a failed listing as no session)."""
    ends.extend(leave_a_session(topo, tmp_path / "left"))
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "ss").write_text(SS_FAILS)
    (shims / "ss").chmod(0o755)
    res = topo.run("node1", *agent_env(tmp_path, VIP4, nfsreset_bin=stub,
                                       PATH=f"{shims}:/usr/sbin:/usr/bin:/sbin:/bin"),
                   str(AGENT), "start", check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "ss could not list the sessions on" in res.stderr, res.stderr
    assert wait_for(lambda: any(c.startswith("kill ") for c in calls(tmp_path)))
    assert calls(tmp_path)[0].startswith("kill vip=absent kill --vip " + VIP4), calls(tmp_path)
    topo.run("node1", *agent_env(tmp_path, VIP4, nfsreset_bin=stub), str(AGENT), "stop", timeout=60)
