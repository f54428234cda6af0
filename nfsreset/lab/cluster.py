"""A real two-node Corosync + Pacemaker cluster inside the lab's head namespaces.

Each head is a "host": its network namespace plus mount and UTS namespaces
of its own (hostname node1/node2, a private tmpfs on /dev/shm), held by a small
process for the lab's whole run (`host_argv()` runs a command there: a daemon
of the head, such as `nfsreset watch`, reaches Pacemaker's IPC from it, as on
a real head: libqb's endpoints are abstract sockets of the network namespace
plus files in /dev/shm). The cluster node runs inside its host, in its own
mount, PID and UTS namespaces on top (`unshare`), with

    private tmpfs   /run
    host's tmpfs    /dev/shm  (libqb's IPC files; one per head: corosync has
                               the same PID in both PID namespaces, shared they
                               collide; a node's stale files are removed when
                               it starts again after a crash)
    bind mounts     /etc/corosync, /var/lib/corosync, /var/lib/pacemaker,
                    /var/log/corosync, /var/log/pacemaker <- per-node
                    directories under the lab's workdir
    resource.d      a per-node copy of /usr/lib/ocf/resource.d (each
                    provider bind-mounted) plus nfsreset/IPaddr2nfs bound to
                    the checkout's cli/ocf/nfsreset

so nothing is written to the host's /etc, /var or /usr, and every mount
disappears with the node's mount namespace (the host's tmpfs with the host). PID 1 of a node is a bash that starts
`corosync -f`, waits for `corosync-cfgtool -s` to answer, then runs
`pacemakerd -f`; SIGKILL to it ends the whole node (that is the lab's crash).
Tools (crm_resource, crm_mon) run inside the node with nsenter: libqb's
endpoints are abstract sockets of the network namespace and files in the
node's /dev/shm.

The CIB is seeded (cluster options, the two nodes, the VIP primitive), so the
first election does not wait the default 20 s dc-deadtime.
"""
from __future__ import annotations

import contextlib
import dataclasses
import grp
import os
import pwd
import re
import select
import shlex
import signal
import subprocess
import time
from typing import Callable
from xml.sax.saxutils import quoteattr

from nfsreset.lab.topology import HOST_ADDRS, IFACE, Topology

OCF_RESOURCE_D = "/usr/lib/ocf/resource.d"
NODES = ("node1", "node2")
NODE_IDS = {"node1": 1, "node2": 2}
RESOURCE = "VIP"
TOOL_TIMEOUT_S = 20.0        # one crm_resource/crm_mon call; they answer in ~0.1 s
INIT_PID_TIMEOUT_S = 5.0

# What each node binds over the host's directory, and the owner/mode Pacemaker
# needs (its daemons run as hacluster:haclient; the CIB refuses other modes).
BIND_DIRS = {
    "/etc/corosync": "etc-corosync",
    "/var/lib/corosync": "lib-corosync",
    "/var/lib/pacemaker": "lib-pacemaker",
    "/var/log/corosync": "log-corosync",
    "/var/log/pacemaker": "log-pacemaker",
}
PCMK_SUBDIRS = ("cib", "pengine", "blackbox", "cores")

COROSYNC_CONF = """\
totem {{
    version: 2
    cluster_name: nfsreset-lab
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: 1000
}}
nodelist {{
{nodes}
}}
quorum {{
    provider: corosync_votequorum
    two_node: 1
}}
logging {{
    to_logfile: yes
    logfile: /var/log/corosync/corosync.log
    to_syslog: no
    to_stderr: no
    timestamp: on
}}
"""

# PID 1 of a node. Runs with `set -e` until pacemakerd is started; then waits,
# reaping (bash's SIGCHLD handler collects orphans such as send_arp too).
NODE_INIT = r"""
set -eu
root=$1 node=$2 agent=$3 private=$4
mount -t tmpfs -o mode=0755 nfsr-run /run
rm -rf /dev/shm/qb-*      # the host's tmpfs: what a crashed node left
mount --bind "$root/etc-corosync" /etc/corosync
mount --bind "$root/lib-corosync" /var/lib/corosync
mount --bind "$root/lib-pacemaker" /var/lib/pacemaker
mount --bind "$root/log-corosync" /var/log/corosync
mount --bind "$root/log-pacemaker" /var/log/pacemaker
for p in "$root"/resource.d/*/; do
    name=$(basename "$p")
    [ -d "/usr/lib/ocf/resource.d/$name" ] && mount --bind "/usr/lib/ocf/resource.d/$name" "$p"
done
[ -n "$agent" ] && mount --bind "$agent" "$root/resource.d/nfsreset/IPaddr2nfs"
mount --rbind "$root/resource.d" /usr/lib/ocf/resource.d
for p in $private; do     # a per-node directory over a shared path (one state dir per head)
    mkdir -p "$root/private$p"
    mount --bind "$root/private$p" "$p"
done
mkdir -p /run/resource-agents /run/crm
hostname "$node"
corosync -f &
i=0
until corosync-cfgtool -s >/dev/null 2>&1; do
    i=$((i + 1)); [ "$i" -le 200 ] || { echo "corosync did not answer in 10 s" >&2; exit 1; }
    sleep 0.05
done
echo "corosync up" >&2
pacemakerd -f &
set +e
while :; do wait; sleep 1; done
"""


# A head's host (see the module docstring): its mount and UTS namespaces live
# as long as this bash, which ends when the lab closes its stdin (or dies), or
# after an hour.
HOST_INIT = r"""
set -eu
mount -t tmpfs -o mode=1777 nfsr-shm /dev/shm
hostname "$1"
echo "up $$"
read -r -t 3600 _ || true
"""


class ClusterError(Exception):
    pass


def primitive_xml(vip: str, agent: str, params: dict[str, str],
                  per_node: dict[str, dict[str, str]] | None = None) -> str:
    """The VIP primitive: ocf:heartbeat:IPaddr2 (agent "ipaddr2") or ocf:nfsreset:IPaddr2nfs ("ocf").
    `per_node`: parameters that differ by head (e.g. one state dir each), as a
    set of instance attributes per node with a `#uname` rule."""
    provider, type_ = ("heartbeat", "IPaddr2") if agent == "ipaddr2" else ("nfsreset", "IPaddr2nfs")
    attrs = {"ip": vip, "cidr_netmask": "64" if ":" in vip else "24", "nic": IFACE, **params}
    nv = "\n".join(f'          <nvpair id="{RESOURCE}-ia-{k}" name="{k}" value={quoteattr(v)}/>'
                   for k, v in attrs.items())
    sets = "".join(f"""
        <instance_attributes id="{RESOURCE}-ia-{node}" score="10">
          <rule id="{RESOURCE}-ia-{node}-rule" score="0">
            <expression id="{RESOURCE}-ia-{node}-expr" attribute="#uname" operation="eq" value={quoteattr(node)}/>
          </rule>
""" + "\n".join(f'          <nvpair id="{RESOURCE}-ia-{node}-{k}" name="{k}" value={quoteattr(v)}/>'
                for k, v in values.items()) + """
        </instance_attributes>""" for node, values in (per_node or {}).items())
    return f"""\
      <primitive id="{RESOURCE}" class="ocf" provider="{provider}" type="{type_}">
        <instance_attributes id="{RESOURCE}-ia">
{nv}
        </instance_attributes>{sets}
        <meta_attributes id="{RESOURCE}-meta">
          <nvpair id="{RESOURCE}-meta-stickiness" name="resource-stickiness" value="100"/>
        </meta_attributes>
        <operations>
          <op id="{RESOURCE}-start" name="start" interval="0s" timeout="30s"/>
          <op id="{RESOURCE}-stop" name="stop" interval="0s" timeout="30s"/>
          <op id="{RESOURCE}-monitor" name="monitor" interval="10s" timeout="20s"/>
        </operations>
      </primitive>"""


GROUP = f"{RESOURCE}-group"      # with a stop delay: the Delay resource, then the VIP
DELAY = f"{RESOURCE}-delay"


def move_target(stop_delay: float | None) -> str:
    """What crm_resource --move/--clear names: the VIP, or its group when a stop delay is seeded."""
    return GROUP if stop_delay is not None else RESOURCE


def delay_group_xml(primitive: str, stop_delay: float) -> str:
    """A group [Delay, VIP]: a group stops in reverse order, so the VIP goes
    first, then ocf:heartbeat:Delay sleeps `stop_delay` s in its stop (as
    exportfs's ~12 s stop does in the seed setup), and only then the new owner
    starts Delay (no start delay) and the VIP."""
    d = f"{stop_delay:g}"
    return f"""\
      <group id="{GROUP}">
        <primitive id="{DELAY}" class="ocf" provider="heartbeat" type="Delay">
          <instance_attributes id="{DELAY}-ia">
            <nvpair id="{DELAY}-ia-startdelay" name="startdelay" value="0"/>
            <nvpair id="{DELAY}-ia-stopdelay" name="stopdelay" value="{d}"/>
            <nvpair id="{DELAY}-ia-mondelay" name="mondelay" value="0"/>
          </instance_attributes>
          <operations>
            <op id="{DELAY}-start" name="start" interval="0s" timeout="30s"/>
            <op id="{DELAY}-stop" name="stop" interval="0s" timeout="{stop_delay + 30:g}s"/>
            <op id="{DELAY}-monitor" name="monitor" interval="10s" timeout="20s"/>
          </operations>
        </primitive>
{primitive}
      </group>"""


def cib_xml(primitive: str, stop_delay: float | None = None) -> str:
    """A seeded CIB: options, both nodes, the VIP, and a weak preference for node1
    (50 < stickiness 100: after a move and --clear the VIP stays where it went).
    `stop_delay`: the VIP in a group after a Delay resource (delay_group_xml)."""
    if stop_delay is not None:
        primitive = delay_group_xml(primitive, stop_delay)
    nodes = "\n".join(f'      <node id="{NODE_IDS[n]}" uname="{n}"/>' for n in NODES)
    return f"""\
<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="opt-stonith-enabled" name="stonith-enabled" value="false"/>
        <nvpair id="opt-dc-deadtime" name="dc-deadtime" value="5s"/>
        <nvpair id="opt-no-quorum-policy" name="no-quorum-policy" value="stop"/>
        <nvpair id="opt-cluster-name" name="cluster-name" value="nfsreset-lab"/>
      </cluster_property_set>
    </crm_config>
    <nodes>
{nodes}
    </nodes>
    <resources>
{primitive}
    </resources>
    <constraints>
      <rsc_location id="{RESOURCE}-first-on-node1" rsc="{move_target(stop_delay)}" node="node1" score="50"/>
    </constraints>
  </configuration>
  <status/>
</cib>
"""


# pacemaker-execd's line for a finished action, e.g.
#   ... pacemaker-execd [77] (log_finished) info: VIP start (call 9, PID 130) exited with
#   status 0 (execution time 61ms, queue time 0ms)
_FINISHED_RE = re.compile(
    r"\b" + RESOURCE + r" (start|stop) \(call (\d+)(?:, PID \d+)?\) exited with status (\d+) "
    r"\(execution time ([0-9.]+)(ms|s)")


@dataclasses.dataclass
class OpResult:
    action: str
    call: int
    rc: int
    seconds: float


def parse_finished(text: str) -> list[OpResult]:
    """start/stop results of the VIP in a pacemaker log, in order."""
    out = []
    for m in _FINISHED_RE.finditer(text):
        secs = float(m.group(4)) / (1000.0 if m.group(5) == "ms" else 1.0)
        out.append(OpResult(m.group(1), int(m.group(2)), int(m.group(3)), secs))
    return out


@dataclasses.dataclass
class Node:
    name: str
    root: str
    proc: subprocess.Popen | None = None
    init_pid: int | None = None
    stderr_path: str = ""
    host: subprocess.Popen | None = None     # the head's host (HOST_INIT)
    host_pid: int | None = None


class Cluster:
    """Two cluster nodes in the heads of `topo`; `stop()` leaves nothing behind."""

    def __init__(self, topo: Topology, workdir: str, primitive: str, agent_src: str | None = None,
                 log: Callable[[str], None] = lambda _m: None, private_dirs: tuple[str, ...] = (),
                 stop_delay: float | None = None) -> None:
        """private_dirs: existing directories each node sees as its own (a per-node
        directory bind-mounted over them inside the node), e.g. the state dir.
        stop_delay: seconds between the VIP's stop and its start elsewhere
        (cib_xml); move the VIP with move_target(stop_delay) then."""
        self.topo, self.workdir, self.agent_src, self.log = topo, workdir, agent_src, log
        if any(not os.path.isabs(d) or any(c.isspace() for c in d) for d in private_dirs):
            raise ClusterError(f"private_dirs must be absolute paths without blanks: {private_dirs}")
        self.private_dirs = private_dirs
        self.cib = cib_xml(primitive, stop_delay)
        self.nodes = {n: Node(n, os.path.join(workdir, f"pcmk-{n}")) for n in NODES}
        self._ops_seen: dict[str, int] = {n: 0 for n in NODES}
        self._agent_lines_seen: dict[str, int] = {n: 0 for n in NODES}
        for node in self.nodes.values():
            self._prepare(node)

    # -- per-node directories ------------------------------------------------------
    def _prepare(self, node: Node) -> None:
        uid, gid = pwd.getpwnam("hacluster").pw_uid, grp.getgrnam("haclient").gr_gid
        os.makedirs(node.root, exist_ok=True)
        for sub in BIND_DIRS.values():
            os.makedirs(os.path.join(node.root, sub), exist_ok=True)
        lib = os.path.join(node.root, "lib-pacemaker")
        for sub in PCMK_SUBDIRS:
            path = os.path.join(lib, sub)
            os.makedirs(path, exist_ok=True)
            os.chown(path, uid, gid)
            os.chmod(path, 0o750)
        logdir = os.path.join(node.root, "log-pacemaker")
        os.chown(logdir, uid, gid)
        os.chmod(logdir, 0o770)
        nodelist = "\n".join(
            f"    node {{\n        ring0_addr: {HOST_ADDRS[n][0]}\n        name: {n}\n"
            f"        nodeid: {NODE_IDS[n]}\n    }}" for n in NODES)
        with open(os.path.join(node.root, "etc-corosync", "corosync.conf"), "w") as f:
            f.write(COROSYNC_CONF.format(nodes=nodelist))
        self._seed_cib(node)
        rd = os.path.join(node.root, "resource.d")
        for provider in os.listdir(OCF_RESOURCE_D):
            if os.path.isdir(os.path.join(OCF_RESOURCE_D, provider)):
                os.makedirs(os.path.join(rd, provider), exist_ok=True)
        if self.agent_src:
            os.makedirs(os.path.join(rd, "nfsreset"), exist_ok=True)
            open(os.path.join(rd, "nfsreset", "IPaddr2nfs"), "a").close()   # the bind mount's target

    def _seed_cib(self, node: Node) -> None:
        """A fresh node: the seeded CIB, nothing else (a restarted node gets its
        state from the peer; its own CIB is as it was when it died)."""
        cib = os.path.join(node.root, "lib-pacemaker", "cib", "cib.xml")
        if os.path.exists(cib):
            return
        with open(cib, "w") as f:
            f.write(self.cib)
        os.chown(cib, pwd.getpwnam("hacluster").pw_uid, grp.getgrnam("haclient").gr_gid)
        os.chmod(cib, 0o600)

    # -- the heads' hosts -------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C",
                # No syslog: the host's /dev/log is not the lab's business.
                "PCMK_logfile": "/var/log/pacemaker/pacemaker.log", "PCMK_logfacility": "none",
                "PCMK_debug": "no",
                # Marks every process of the node, so a test can tell none was left behind.
                "NFSRESET_LAB": str(os.getpid())}

    def start_host(self, name: str) -> int:
        """Start `name`'s host if it is not running; its bash's pid."""
        node = self.nodes[name]
        if node.host is not None and node.host.poll() is None and node.host_pid is not None:
            return node.host_pid
        argv = self.topo.exec_argv(name, "unshare", "--mount", "--uts", "--propagation", "private",
                                   "bash", "-c", HOST_INIT, "nfsr-host", name)
        node.host = subprocess.Popen(argv, env=self._env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        line = _readline(node.host, INIT_PID_TIMEOUT_S)
        if not line.startswith("up "):
            self._end_host(node)
            raise ClusterError(f"{name}: host namespaces did not start: {line.strip()[-300:]}")
        node.host_pid = int(line.split()[1])
        return node.host_pid

    def host_argv(self, name: str) -> list[str]:
        """Prefix that runs a command on `name`'s host (under `ip netns exec` of
        its network namespace): Pacemaker's IPC is reachable there while the
        node runs, and the command outlives a crash of the node."""
        return ["nsenter", "-t", str(self.start_host(name)), "-m", "-u", "--"]

    def _end_host(self, node: Node) -> None:
        proc, node.host, node.host_pid = node.host, None, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)
        with contextlib.suppress(OSError):
            proc.stdout.close()

    # -- life cycle ------------------------------------------------------------------
    def start(self, names: tuple[str, ...] = NODES) -> None:
        for name in names:
            self.start_node(name)

    def start_node(self, name: str) -> None:
        node = self.nodes[name]
        if node.proc is not None and node.proc.poll() is None:
            raise ClusterError(f"{name} is already running")
        node.stderr_path = os.path.join(node.root, "init.err")
        env = self._env()
        argv = self.topo.exec_argv(name, *self.host_argv(name), "unshare", "--mount", "--pid", "--uts", "--fork", "--kill-child", "--mount-proc",
                                   "--propagation", "private", "bash", "-c", NODE_INIT, "nfsr-node-init",
                                   node.root, name, self.agent_src or "", " ".join(self.private_dirs))
        # --kill-child: should unshare itself be killed, the node dies with it.
        with open(node.stderr_path, "a") as err:
            node.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         start_new_session=True)
        node.init_pid = None
        deadline = time.monotonic() + INIT_PID_TIMEOUT_S
        while node.init_pid is None:
            node.init_pid = _child_pid(node.proc.pid)
            if node.init_pid is None:
                if node.proc.poll() is not None or time.monotonic() > deadline:
                    raise ClusterError(f"{name}: node init did not start: {self.init_errors(name)}")
                time.sleep(0.01)
        self.log(f"cluster node {name} started (init pid {node.init_pid})")

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's PID 1: the kernel kills everything in its PID namespace."""
        node = self.nodes[name]
        if node.init_pid is not None:
            try:
                os.kill(node.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if node.proc is not None:
            try:
                node.proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:   # unshare itself stuck: end it too
                node.proc.kill()
                node.proc.wait(timeout=5.0)
        node.init_pid = None

    def stop(self) -> None:
        """Kill both nodes (the lab is throwaway: a clean Pacemaker shutdown costs seconds),
        then end their hosts."""
        for name in NODES:
            try:
                self.kill_node(name)
            except Exception as e:   # one node's trouble must not leave the other running
                self.log(f"cluster node {name}: {type(e).__name__}: {e}")
        for name in NODES:
            try:
                self._end_host(self.nodes[name])
            except Exception as e:
                self.log(f"host of {name}: {type(e).__name__}: {e}")

    def alive(self, name: str) -> bool:
        node = self.nodes[name]
        return node.proc is not None and node.proc.poll() is None

    def init_errors(self, name: str) -> str:
        try:
            with open(self.nodes[name].stderr_path) as f:
                return " | ".join(f.read().strip().splitlines()[-3:])
        except OSError:
            return ""

    # -- inside a node -------------------------------------------------------------------
    def tool(self, name: str, *argv: str, check: bool = True,
             timeout: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess:
        """Run a Pacemaker tool inside node `name` (its network, mount, UTS and PID namespaces)."""
        node = self.nodes[name]
        if node.init_pid is None or not self.alive(name):
            raise ClusterError(f"{name} is not running; cannot run {argv[0]}")
        full = ["nsenter", "-t", str(node.init_pid), "-n", "-m", "-u", "-p", "--", *argv]
        res = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"})
        if check and res.returncode != 0:
            raise ClusterError(f"{shlex.join(argv)} on {name} exited {res.returncode}: "
                               f"{(res.stderr or res.stdout).strip()[-300:]}")
        return res

    def online(self, via: str) -> set[str]:
        """Nodes `via` sees online in the cluster (crm_mon's XML)."""
        res = self.tool(via, "crm_mon", "-1", "--output-as=xml", check=False, timeout=10.0)
        if res.returncode != 0:
            return set()
        return {m.group(1) for m in re.finditer(r'<node name="([^"]+)"[^>]*\bonline="true"', res.stdout)}

    def wait_online(self, via: str, names: set[str], timeout: float) -> float:
        """Wait until `via` sees all of `names` online; returns when (monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if names <= self.online(via):
                return time.monotonic()
            time.sleep(0.1)
        raise ClusterError(f"{', '.join(sorted(names))} not online on {via} after {timeout:g} s")

    def log_text(self, name: str) -> str:
        try:
            with open(os.path.join(self.nodes[name].root, "log-pacemaker", "pacemaker.log"),
                      errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def new_ops(self, name: str) -> list[OpResult]:
        """VIP start/stop results node `name` logged since the last call."""
        ops = parse_finished(self.log_text(name))
        seen = self._ops_seen[name]
        self._ops_seen[name] = len(ops)
        return ops[seen:]

    def agent_lines(self, name: str) -> list[str]:
        """Lines the VIP's agent logged (ocf_log goes to Pacemaker's log) since the last call."""
        lines = [line for line in self.log_text(name).splitlines() if f"({RESOURCE})[" in line]
        seen = self._agent_lines_seen[name]
        self._agent_lines_seen[name] = len(lines)
        return lines[seen:]

    def wait_op(self, name: str, action: str, timeout: float) -> OpResult | None:
        """The next finished VIP `action` on `name` (None after `timeout`); earlier
        results of the node are consumed."""
        deadline = time.monotonic() + timeout
        pending: list[OpResult] = []
        while True:
            pending += self.new_ops(name)
            for op in pending:
                if op.action == action:
                    return op
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """One line of `proc`'s stdout, or "" after `timeout` or at its end."""
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if r else ""


def _child_pid(pid: int) -> int | None:
    """The one child of `pid` (unshare --fork's child: PID 1 of the new namespace)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None
