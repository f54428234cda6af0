"""Move the lab's VIP with a real Corosync + Pacemaker cluster (cluster.py).

    pacemaker      the VIP is the primitive ocf:heartbeat:IPaddr2 (the baseline)
    pacemaker-ocf  the VIP is ocf:nfsreset:IPaddr2nfs (cli/ocf/nfsreset of this
                   checkout, running the venv's nfsreset), the agent column

A planned move is what an operator types, run inside the node that gets the
VIP: `crm_resource --move --resource VIP --node NEW`, then, once Pacemaker
logged the start, `crm_resource --clear --resource VIP` (stickiness keeps the
VIP where it went). Pacemaker decides the gap between stop and start; with
`stop_delay` (the lab's --gap, when given) the VIP sits in a group after an
ocf:heartbeat:Delay resource whose stop sleeps that long, like a slow exportfs
stop, and the group is what moves (cluster.delay_group_xml).

With crash=True the failover is a crash of node1 instead: SIGKILL to PID 1 of
its PID namespace (corosync and pacemaker die at once), the VIP deleted from
its interface and its bridge port taken down (a dead machine's address is
gone; left in place, IPv6 DAD fails on the survivor). Corosync on node2 sees
the token lost and Pacemaker starts the VIP there. With pacemaker-ocf the crash
waits (at most 15 s) until node1's monitor has published the client list
to attrd for node2, as it would have on a head up for more than 10 s. Before the failback node1
is started again (bridge port up, same node directories) and rejoins; then a
planned move brings the VIP back. The network namespace, and so the server
and its sockets, survives the "crash", and so does the head's host (Cluster's
mount and UTS namespaces around the node) with the daemons on it (the lab's
`watch`): like a head whose cluster stack died, not one that rebooted.

As with the agent movers, the address events come from the kernel (one `ip
monitor address` per node, mover_ocf.AddrMonitor). stop_s / start_s are the
agent's execution times as pacemaker-execd logged them ("VIP start (call N,
PID P) exited with status 0 (execution time 75ms)").

Remedy hooks cannot run inside Pacemaker's transition here: post_stop and
pre_start run once the kernel shows the delete (like a notification; the new
node's start may already be running), post_start once the start is logged.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Callable

from nfsreset.lab.cluster import RESOURCE, Cluster, ClusterError, move_target, primitive_xml
from nfsreset.lab.mover import Hook, MoveTimes, Mover
from nfsreset.lab.mover_ocf import REPO_AGENT, AddrMonitor, AgentError, agent_path, nfsreset_bin
from nfsreset.lab.topology import Topology, sh

COLD_START_TIMEOUT_S = 45.0   # seeded cold start to VIP usable: ~8 s measured
MOVE_TIMEOUT_S = 30.0         # command -> address event; Pacemaker answers within ~1 s
CRASH_TIMEOUT_S = 30.0        # crash -> VIP on the survivor; ~2.5 s (token 1000 ms + consensus)
REJOIN_TIMEOUT_S = 45.0
PUBLISH_TIMEOUT_S = 15.0      # the agent's monitor publishes a changed list every 10 s
TOOLS = ("corosync", "corosync-cfgtool", "pacemakerd", "crm_resource", "crm_mon", "unshare", "nsenter")


def check_installed(mover: str) -> None:
    """AgentError naming what to install when the cluster or the agents are missing."""
    missing = [t for t in TOOLS if shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") is None]
    if missing:
        raise AgentError(f"--mover {mover} needs {', '.join(missing)}: "
                         "apt-get install corosync pacemaker pacemaker-cli-utils (or run setup.sh)")
    agent_path("ipaddr2" if mover == "pacemaker" else "ocf")
    if mover == "pacemaker-ocf" and not os.access(REPO_AGENT, os.X_OK):
        raise AgentError(f"--mover {mover} binds {REPO_AGENT} into the nodes; it is missing")


class PacemakerMover(Mover):
    """Same interface as mover.Mover; see the module docstring."""

    def __init__(self, topo: Topology, vip: str, mover: str, state_dir: "str | dict[str, str]", workdir: str = "/tmp",
                 ports: list[int] | None = None, strategy: str | None = None, crash: bool = False,
                 usable_timeout: float = 10.0, log: Callable[[str], None] = lambda _m: None,
                 per_head_state: bool | None = None, stop_delay: float | None = None) -> None:
        super().__init__(topo, vip, gap=0.0, workdir=workdir, usable_timeout=usable_timeout, log=log)
        self.target = move_target(stop_delay)   # what crm_resource --move/--clear names
        check_installed(mover)
        self.name, self.crash = mover, crash
        params: dict[str, str] = {}
        per_node: dict[str, dict[str, str]] = {}
        agent_src = None
        if mover == "pacemaker-ocf":
            agent_src = str(REPO_AGENT)
            params = {"nfsreset_bin": nfsreset_bin(workdir),
                      "nfsreset_port": " ".join(str(p) for p in (ports or [2049]))}
            if isinstance(state_dir, dict):   # one per head: a node-rule set each
                per_node = {node: {"nfsreset_state_dir": d} for node, d in state_dir.items()}
            else:
                params["nfsreset_state_dir"] = state_dir
            if strategy:
                params["nfsreset_strategy"] = strategy
        self.monitor = AddrMonitor(topo, ("node1", "node2"), vip)
        # One state dir per head (no shared storage, as on most real clusters):
        # `nfsreset lab --state per-head` passes {node: dir} (rule sets above);
        # NFSRESET_LAB_STATE=per-head, for a shared `state_dir`, makes each node
        # see its own directory at that path instead (bind mount in the node).
        if per_head_state is None:
            per_head_state = os.environ.get("NFSRESET_LAB_STATE") == "per-head"
        self.per_head_state = per_head_state
        self.cluster = Cluster(topo, workdir, primitive_xml(vip, "ipaddr2" if mover == "pacemaker" else "ocf",
                                                            params, per_node), agent_src=agent_src, log=log,
                               private_dirs=(state_dir,) if per_head_state and isinstance(state_dir, str) else (),
                               stop_delay=stop_delay)
        # Figures for the report (report.FamilyResult.cluster).
        self.figures: dict = {"crash": crash, "cold_start_s": None, "rejoin_s": None, "stop_delay_s": stop_delay}

    def host_argv(self, node: str) -> list[str]:
        """Run a command on `node`'s host (Cluster.host_argv): where a daemon of
        a real head runs, Pacemaker's attrd reachable while the node is up."""
        return self.cluster.host_argv(node)

    # -- first start: the cluster's cold start ---------------------------------------
    def start(self, node: str, times: MoveTimes, pre_start: Hook | None = None,
              post_start: Hook | None = None) -> MoveTimes:
        if node != "node1":
            raise ValueError("the seeded cluster starts the VIP on node1")
        if pre_start:
            pre_start(node, self.vip)
        t0 = time.monotonic()
        self.cluster.start()
        times.t_add = self._wait_addr(node, ("tentative", "usable"), t0, COLD_START_TIMEOUT_S, "cold start")
        times.t_usable = self._wait_addr(node, ("usable",), times.t_add, self.usable_timeout, "cold start")
        self.figures["cold_start_s"] = times.t_usable - t0
        op = self._wait_start_op(node)
        times.start_s = op.seconds
        times.announcer = f"pacemaker:{RESOURCE}"
        self.log(f"cluster cold start: {self.vip} usable on {node} {times.t_usable - t0:.3f} s after launch")
        if post_start:
            post_start(node, self.vip)
        times.t_done = time.monotonic()
        return times

    # -- moves --------------------------------------------------------------------------------
    def move(self, old: str, new: str, post_stop: Hook | None = None, pre_start: Hook | None = None,
             post_start: Hook | None = None) -> MoveTimes:
        for name in ("node1", "node2"):
            if not self.cluster.alive(name):
                self._rejoin(name, via=new if name != new else old)
        times = MoveTimes(old=old, new=new, t_start=time.monotonic())
        crash = self.crash and old == "node1" and new == "node2"
        if crash:
            self._crash(old, times)
        else:
            self.cluster.tool(new, "crm_resource", "--move", "--resource", self.target, "--node", new)
            times.t_del = self._wait_addr(old, ("deleted",), times.t_start, MOVE_TIMEOUT_S, "stop")
            stop = self.cluster.wait_op(old, "stop", MOVE_TIMEOUT_S)
            times.stop_s = stop.seconds if stop else None
            self._check(stop, old, "stop")
            self.log(f"{self.vip} deleted on {old} by Pacemaker's stop")
            if post_stop:
                post_stop(old, self.vip)
        if pre_start:
            pre_start(new, self.vip)
        limit = (CRASH_TIMEOUT_S if crash else MOVE_TIMEOUT_S) + (self.figures["stop_delay_s"] or 0.0)
        times.t_add = self._wait_addr(new, ("tentative", "usable"), times.t_del, limit, "start")
        times.t_usable = self._wait_addr(new, ("usable",), times.t_add, self.usable_timeout, "start")
        times.start_s = self._wait_start_op(new).seconds
        times.announcer = f"pacemaker:{RESOURCE}"
        if not crash:
            self.cluster.tool(new, "crm_resource", "--clear", "--resource", self.target)
        self.log(f"{self.vip} usable on {new} {times.t_usable - times.t_del:.3f} s after the delete")
        if post_start:
            post_start(new, self.vip)
        times.t_done = time.monotonic()
        return times

    def _wait_published(self, node: str, peer: str, timeout: float = PUBLISH_TIMEOUT_S) -> None:
        """The agent: wait until `node`'s monitor published the VIP's clients under
        `peer`'s name in attrd (a crashed head runs no stop: what the peer
        tickles is what the monitor last published). Bounded; going on without."""
        t0 = time.monotonic()
        attr = f"nfsreset-clients-{self.vip}"
        while time.monotonic() - t0 < timeout:
            res = self.cluster.tool(peer, "attrd_updater", "-Q", "-n", attr, "-N", peer, check=False, timeout=5.0)
            if res.returncode == 0 and 'value="g1:' in res.stdout:
                self.log(f"{node}'s client list is in attrd for {peer} {time.monotonic() - t0:.3f} s after the wait began")
                return
            time.sleep(0.5)
        self.log(f"{node} published no client list for {peer} within {timeout:g} s; crashing anyway")

    def _crash(self, node: str, times: MoveTimes) -> None:
        """Kill `node`'s cluster stack at once, its VIP and its link gone with it."""
        if self.name == "pacemaker-ocf":
            self._wait_published(node, "node2" if node == "node1" else "node1")
            times.t_start = time.monotonic()
        self.cluster.kill_node(node)
        if self.topo.has_addr(node, self.vip, usable=False):
            self.topo.del_addr(node, self.vip)
        times.t_del = self._wait_addr(node, ("deleted",), times.t_start, 5.0, "crash")
        sh("ip", "-n", self.topo.bridge_ns, "link", "set", f"p-{node}", "down")
        times.stop_s = None          # nothing stopped it
        self.cluster.new_ops(node)   # what the dead node logged is history
        self.log(f"{node} crashed (PID namespace killed, {self.vip} deleted, link down)")

    def _rejoin(self, node: str, via: str) -> None:
        """Start a crashed node again and wait until its peer sees it online."""
        t0 = time.monotonic()
        sh("ip", "-n", self.topo.bridge_ns, "link", "set", f"p-{node}", "up")
        self.cluster.start_node(node)
        t = self.cluster.wait_online(via, {node}, REJOIN_TIMEOUT_S)
        self.figures["rejoin_s"] = t - t0
        self.log(f"{node} rejoined the cluster {t - t0:.3f} s after its start")

    # -- helpers -----------------------------------------------------------------------------
    def _wait_addr(self, node: str, kinds: tuple[str, ...], after: float, timeout: float, what: str) -> float:
        t = self.monitor.first(node, kinds, after, timeout)
        if t is None:
            raise ClusterError(f"{what}: no {'/'.join(kinds)} event for {self.vip} on {node} within "
                               f"{timeout:g} s; {self._state()}")
        return t

    def _wait_start_op(self, node: str):
        op = self.cluster.wait_op(node, "start", MOVE_TIMEOUT_S)
        self._check(op, node, "start")
        return op

    def _relay(self, node: str) -> None:
        """The agent's own log lines, as the ocf mover relays them: "[node1 pacemaker-ocf] ..."."""
        for line in self.cluster.agent_lines(node):
            self.log(f"[{node} {self.name}] {' '.join(line.split()[3:])}")

    def _check(self, op, node: str, action: str) -> None:
        self._relay(node)
        if op is None:
            raise ClusterError(f"Pacemaker logged no {RESOURCE} {action} result on {node}; {self._state()}")
        if op.rc != 0:
            raise ClusterError(f"{RESOURCE} {action} on {node} exited with status {op.rc} (pacemaker log)")

    def _state(self) -> str:
        """One line of cluster state for an error message."""
        for name in ("node1", "node2"):
            if self.cluster.alive(name):
                try:
                    res = self.cluster.tool(name, "crm_mon", "-1", "-r", check=False, timeout=10.0)
                    return " ".join(res.stdout.split())[-400:]
                except Exception as e:
                    return f"crm_mon failed: {e}"
        return "no cluster node running: " + " | ".join(self.cluster.init_errors(n) for n in ("node1", "node2"))

    def close(self) -> None:
        """Kill both nodes (everything in their PID namespaces, their mounts with them)."""
        try:
            self.cluster.stop()
            for node in ("node1", "node2"):
                self._relay(node)
        finally:
            super().close()
            self.monitor.close()
