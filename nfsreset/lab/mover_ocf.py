"""Move the lab's VIP with a real OCF resource agent, as Pacemaker would.

    ipaddr2  /usr/lib/ocf/resource.d/heartbeat/IPaddr2 (resource-agents): the
             baseline, what a cluster runs today
    ocf      cli/ocf/nfsreset (ocf:nfsreset:IPaddr2nfs), which wraps that same
             IPaddr2 and runs the real nfsreset around it

A move is `AGENT stop` on the old owner, then, `gap` seconds after the address
went, `AGENT start` on the new one; each runs inside the node's namespace
(`ip netns exec`) with the environment Pacemaker's executor gives an agent
(OCF_ROOT, OCF_RESKEY_*, HA_RSCTMP per node, HA_LOGFILE). Every ocf:nfsreset
parameter points at the lab: nfsreset_state_dir is one directory both nodes
see, nfsreset_bin the nfsreset of the running interpreter.

The agent adds and removes the address itself, so the lab learns when that
happened from the kernel: one `ip monitor address` per node, read on a thread.
"added" is the address's first RTM_NEWADDR, "usable" the first without the
tentative flag (IPv6 DAD done; at once for IPv4), "deleted" its RTM_DELADDR.

Wall times: an action lasts until the agent's process exits, not until its
stdout closes. IPaddr2 leaves send_arp running in the background with the
agent's stdio for ~1 s (IPv4 start 1.0 s timed to EOF, 0.06 s to exit), so
the agent's output goes to a file, never a pipe.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import Callable

from nfsreset.lab.mover import Hook, MoveTimes, Mover, stop_process
from nfsreset.lab.topology import IFACE, Topology

OCF_ROOT = "/usr/lib/ocf"
IPADDR2 = f"{OCF_ROOT}/resource.d/heartbeat/IPaddr2"
INSTALLED_AGENT = f"{OCF_ROOT}/resource.d/nfsreset/IPaddr2nfs"
# The checkout's agent first: the lab exists to prove the one in this tree.
REPO_AGENT = pathlib.Path(__file__).resolve().parents[2] / "cli" / "ocf" / "nfsreset"
ACTION_TIMEOUT_S = 60.0     # an agent start/stop that takes longer is broken, not slow
MONITOR_GRACE_S = 2.0       # an address event the agent's exit already implies arrives within this


class AgentError(Exception):
    pass


def agent_path(mover: str) -> str:
    """The agent a mover runs; AgentError naming what to install when it is missing."""
    if mover == "ipaddr2":
        if not os.access(IPADDR2, os.X_OK):
            raise AgentError(f"--mover ipaddr2 needs {IPADDR2}: apt-get install resource-agents")
        return IPADDR2
    for path in (str(REPO_AGENT), INSTALLED_AGENT):
        if os.access(path, os.X_OK):
            if not os.access(IPADDR2, os.X_OK):
                raise AgentError(f"--mover ocf wraps {IPADDR2}: apt-get install resource-agents")
            return path
    raise AgentError(f"--mover ocf needs the agent: {REPO_AGENT} or {INSTALLED_AGENT} (see cli/README.md)")


def nfsreset_bin(workdir: str) -> str:
    """One executable for nfsreset_bin: the console script beside this interpreter,
    or a two-line wrapper around `python -m nfsreset` when there is none."""
    beside = os.path.join(os.path.dirname(sys.executable), "nfsreset")
    if os.access(beside, os.X_OK):
        return beside
    wrapper = os.path.join(workdir, "nfsreset")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec "{sys.executable}" -m nfsreset "$@"\n')
    os.chmod(wrapper, 0o755)
    return wrapper


class AddrMonitor:
    """Times of one address's kernel events on each node, from `ip monitor address`."""

    def __init__(self, topo: Topology, nodes: tuple[str, ...], ip: str) -> None:
        self.ip = ip
        self._cond = threading.Condition()
        self._events: list[tuple[str, str, float]] = []      # (node, kind, monotonic)
        self._procs: list[subprocess.Popen] = []
        for node in nodes:
            # Inside the namespace, not `ip -n`: a lab killed with SIGKILL leaves
            # it behind, and the sweep of orphaned namespaces kills what is in them.
            proc = topo.popen(node, "ip", "-o", "monitor", "address", "dev", IFACE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
            self._procs.append(proc)
            threading.Thread(target=self._read, args=(node, proc), daemon=True,
                             name=f"addr-monitor-{node}").start()

    def _kind(self, line: str) -> str | None:
        fields = line.split()
        for fam in ("inet", "inet6"):
            if fam in fields:
                i = fields.index(fam)
                if i + 1 < len(fields) and fields[i + 1].split("/")[0] == self.ip:
                    if fields[0] == "Deleted":
                        return "deleted"
                    return "tentative" if "tentative" in fields else "usable"
        return None

    def _read(self, node: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            t = time.monotonic()
            kind = self._kind(line)
            if kind is None:
                continue
            with self._cond:
                self._events.append((node, kind, t))
                self._cond.notify_all()

    def first(self, node: str, kinds: tuple[str, ...], after: float, timeout: float) -> float | None:
        """Time of `node`'s first event of one of `kinds` at or after `after`; None after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for n, k, t in self._events:
                    if n == node and k in kinds and t >= after:
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def close(self) -> None:
        for proc in self._procs:
            stop_process(proc)
        self._procs.clear()


class AgentMover(Mover):
    """Same interface as mover.Mover; the VIP is moved by `agent stop` / `agent start`."""

    def __init__(self, topo: Topology, vip: str, mover: str, state_dir: "str | dict[str, str]", gap: float = 1.0,
                 workdir: str = "/tmp", ports: list[int] | None = None, strategy: str | None = None,
                 usable_timeout: float = 10.0, log: Callable[[str], None] = lambda _m: None) -> None:
        super().__init__(topo, vip, gap=gap, workdir=workdir, usable_timeout=usable_timeout, log=log)
        self.name = mover
        self.agent = agent_path(mover)
        # one dir both heads see (str), or one per head ({node: dir}, as deployed)
        self.state_dirs = state_dir if isinstance(state_dir, dict) else {}
        self.env = self._environment(state_dir if isinstance(state_dir, str) else "", ports or [2049], strategy)
        self._log_seen: dict[str, int] = {}
        # Started long before the first action (servers start in between), so
        # the netlink socket is listening when the first address arrives.
        self.monitor = AddrMonitor(topo, ("node1", "node2"), vip)

    def _environment(self, state_dir: str, ports: list[int], strategy: str | None) -> dict[str, str]:
        env = dict(os.environ)
        # Pacemaker runs agents without a terminal and with its own variables;
        # drop any OCF/HA settings of whoever started the lab.
        for key in [k for k in env if k.startswith(("OCF_", "HA_"))]:
            del env[key]
        env.update({
            "OCF_ROOT": OCF_ROOT,
            "OCF_RESOURCE_INSTANCE": "labvip",
            "OCF_RESOURCE_PROVIDER": "heartbeat" if self.name == "ipaddr2" else "nfsreset",
            "OCF_RESOURCE_TYPE": "IPaddr2" if self.name == "ipaddr2" else "IPaddr2nfs",
            "OCF_RESKEY_ip": self.vip,
            "OCF_RESKEY_cidr_netmask": "64" if ":" in self.vip else "24",
            "OCF_RESKEY_nic": IFACE,
        })
        if self.name == "ocf":
            bin_ = nfsreset_bin(self.workdir)
            env.update({
                "OCF_RESKEY_nfsreset_bin": bin_,
                "OCF_RESKEY_nfsreset_state_dir": state_dir,
                "OCF_RESKEY_nfsreset_port": " ".join(str(p) for p in ports),
                "PATH": os.path.dirname(bin_) + os.pathsep + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            })
            if strategy:
                env["OCF_RESKEY_nfsreset_strategy"] = strategy
        return env

    def _node_env(self, node: str) -> dict[str, str]:
        # Each head has its own /run/resource-agents and its own log.
        rsctmp = os.path.join(self.workdir, f"rsctmp-{node}")
        os.makedirs(rsctmp, exist_ok=True)
        env = {**self.env, "HA_RSCTMP": rsctmp, "HA_LOGFILE": self._logfile(node)}
        if self.name == "ocf" and node in self.state_dirs:
            env["OCF_RESKEY_nfsreset_state_dir"] = self.state_dirs[node]
        return env

    def _logfile(self, node: str) -> str:
        return os.path.join(self.workdir, f"agent-{node}.log")

    def _new_log_lines(self, node: str) -> list[str]:
        """Lines the agent logged on `node` since the last call (its ocf_log goes to HA_LOGFILE)."""
        try:
            with open(self._logfile(node)) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        seen = self._log_seen.get(node, 0)
        self._log_seen[node] = len(lines)
        return lines[seen:]

    def action(self, node: str, action: str) -> tuple[float, float]:
        """Run `agent ACTION` in `node`; (when it was called, how long it took). AgentError unless rc 0."""
        out_path = os.path.join(self.workdir, f"agent-{node}-{action}.out")
        with open(out_path, "w") as out:
            t0 = time.monotonic()
            proc = subprocess.Popen(self.topo.exec_argv(node, self.agent, action), env=self._node_env(node),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=ACTION_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)
                rc = None
            took = time.monotonic() - t0
        for line in self._new_log_lines(node):
            self.log(f"[{node} {self.name}] {line}")
        if rc != 0:
            with open(out_path) as f:
                tail = " | ".join(f.read().strip().splitlines()[-3:])
            what = "timed out" if rc is None else f"exited {rc}"
            raise AgentError(f"{os.path.basename(self.agent)} {action} on {node} {what}: {tail}")
        self.log(f"{self.name} {action} on {node}: {took:.3f} s")
        return t0, took

    def start(self, node: str, times: MoveTimes, pre_start: Hook | None = None,
              post_start: Hook | None = None) -> MoveTimes:
        """pre_start, `agent start` (add, DAD, announce: the agent's business), post_start."""
        if pre_start:
            pre_start(node, self.vip)
        called, times.start_s = self.action(node, "start")
        times.t_add = self.monitor.first(node, ("tentative", "usable"), called, MONITOR_GRACE_S)
        if times.t_add is None:
            raise AgentError(f"{self.name} start on {node} returned 0 but {self.vip} never appeared")
        # IPaddr2 returns after DAD for IPv6 (it polls for it), at once for IPv4:
        # usable is normally already recorded; a nodad/optimistic setup would not be.
        times.t_usable = self.monitor.first(node, ("usable",), times.t_add, self.usable_timeout)
        if times.t_usable is None:
            raise AgentError(f"{self.vip} not usable on {node} {self.usable_timeout:g} s after it was added")
        times.announcer = os.path.basename(self.agent)
        if post_start:
            post_start(node, self.vip)
        times.t_done = time.monotonic()
        return times

    def _remove(self, node: str, times: MoveTimes) -> None:
        called, times.stop_s = self.action(node, "stop")
        times.t_del = self.monitor.first(node, ("deleted",), called, MONITOR_GRACE_S)
        if times.t_del is None:
            raise AgentError(f"{self.name} stop on {node} returned 0 but {self.vip} was never deleted")
        self.log(f"{self.vip} deleted on {node} by {self.name} stop")
        # Mover.move counts the gap from the delete: the agent's own post-stop
        # work (ocf: nfsreset kill) eats into it, as under Pacemaker.

    def close(self) -> None:
        """Stop the monitors; the agents' background work (send_arp, the ocf
        agent's tickle) lives in the node namespaces and goes with them."""
        super().close()
        self.monitor.close()
        for node in ("node1", "node2"):
            for line in self._new_log_lines(node):
                self.log(f"[{node} {self.name}] {line}")
