"""Move a VIP between lab nodes the way Pacemaker's IPaddr2 does.

stop on the old owner:  `ip addr del`
gap:                    ~1 s (cluster manager: notify, next action, ...)
start on the new owner: `ip addr add` (IPv6 WITH duplicate address detection,
                        as IPaddr2 does: no `nodad`), wait until usable, then
                        announce: IPv4 gratuitous ARP with resource-agents'
                        send_arp (`-i 200 -r 5`, in the background, IPaddr2's
                        arp_bg default for v4), IPv6 unsolicited neighbour
                        advertisements with send_ua (`-i 200 -c 5`, in the
                        FOREGROUND: IPaddr2's default for v6, so a post-start
                        step runs ~0.8 s after the address is usable).
Without resource-agents the fallbacks are iputils `arping -U` and nothing for
IPv6 (the kernel only sends unsolicited NA with ndisc_notify=1).

Hooks are plain callables so this module knows nothing about remedies; each
moment is stamped with CLOCK_MONOTONIC.

This is the lab's default mover ("ip"). mover_ocf.AgentMover moves the VIP
with the real resource agents instead ("ipaddr2", "ocf"), mover_pacemaker a real
cluster; movers.make_mover() picks (not here: those modules import this one).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from typing import Callable

from nfsreset.lab.topology import IFACE, Topology

SEND_ARP = "/usr/libexec/heartbeat/send_arp"
SEND_UA = "/usr/libexec/heartbeat/send_ua"
ARP_INTERVAL_MS, ARP_COUNT = 200, 5      # IPaddr2 arp_interval / arp_count defaults

Hook = Callable[[str, str], None]        # (node, vip)

# `nfsreset lab --mover NAME`: what moves the VIP. The agents are in mover_ocf.py.
MOVERS = {
    "ip": "ip addr del/add + send_arp/send_ua, timed like IPaddr2 (no agent)",
    "ipaddr2": "the real ocf:heartbeat:IPaddr2 agent: stop on the old owner, start on the new one",
    "ocf": "the real ocf:nfsreset:IPaddr2nfs agent (cli/ocf/nfsreset) with the real nfsreset",
    # mover_pacemaker.py: a real Corosync + Pacemaker cluster, one node per head
    "pacemaker": "a real Corosync + Pacemaker cluster moves an ocf:heartbeat:IPaddr2 VIP (crm_resource --move/--clear)",
    "pacemaker-ocf": "the same cluster with the VIP as ocf:nfsreset:IPaddr2nfs (our agent)",
}
PACEMAKER_MOVERS = ("pacemaker", "pacemaker-ocf")


@dataclasses.dataclass
class MoveTimes:
    """CLOCK_MONOTONIC stamps of one move; None where the step did not happen."""
    old: str | None
    new: str
    t_start: float
    t_del: float | None = None
    t_add: float | None = None
    t_usable: float | None = None
    t_announced: float | None = None
    t_done: float | None = None
    announcer: str = ""
    stop_s: float | None = None       # wall time of the stop action (ip: `ip addr del`; agents: `AGENT stop`)
    start_s: float | None = None      # wall time of the start action, remedy hooks excluded


def announcer_argv(vip: str, pidfile: str) -> tuple[list[str], bool]:
    """(argv, background) for announcing `vip` on IFACE, as IPaddr2 would."""
    if ":" in vip:
        if os.access(SEND_UA, os.X_OK):
            return [SEND_UA, "-i", str(ARP_INTERVAL_MS), "-c", str(ARP_COUNT), vip, "64", IFACE], False
        return [], False
    if os.access(SEND_ARP, os.X_OK):
        return [SEND_ARP, "-i", str(ARP_INTERVAL_MS), "-r", str(ARP_COUNT), "-p", pidfile,
                IFACE, vip, "auto", "not_used", "not_used"], True
    if shutil.which("arping"):
        return ["arping", "-q", "-U", "-c", "1", "-I", IFACE, "-s", vip, vip], True
    return [], True


class Mover:
    def __init__(self, topo: Topology, vip: str, gap: float = 1.0, workdir: str = "/tmp",
                 usable_timeout: float = 10.0, log: Callable[[str], None] = lambda _m: None,
                 nodad: bool = False) -> None:
        self.topo, self.vip, self.gap = topo, vip, gap
        self.nodad = nodad     # IPv6 without DAD (usable at once): IPaddr2 nodad=true
        self.workdir, self.usable_timeout, self.log = workdir, usable_timeout, log
        self._background: list[subprocess.Popen] = []

    def start(self, node: str, times: MoveTimes, pre_start: Hook | None = None,
              post_start: Hook | None = None) -> MoveTimes:
        """Bring the VIP up on `node`: pre_start, add, wait usable, announce, post_start."""
        if pre_start:
            pre_start(node, self.vip)
        t0 = time.monotonic()
        self.topo.add_addr(node, self.vip, nodad=self.nodad)   # with DAD for IPv6 unless nodad
        times.t_add = time.monotonic()
        times.t_usable = self.topo.wait_usable(node, self.vip, timeout=self.usable_timeout)
        self._announce(node, times)
        times.start_s = time.monotonic() - t0
        if post_start:
            post_start(node, self.vip)
        times.t_done = time.monotonic()
        return times

    def move(self, old: str, new: str, post_stop: Hook | None = None, pre_start: Hook | None = None,
             post_start: Hook | None = None) -> MoveTimes:
        times = MoveTimes(old=old, new=new, t_start=time.monotonic())
        self._remove(old, times)
        if post_stop:
            post_stop(old, self.vip)
        # The gap counts from the delete: slow stop hooks eat into it, as they
        # would under a cluster manager that starts the resource right after.
        time.sleep(max(0.0, times.t_del + self.gap - time.monotonic()))
        self.start(new, times, pre_start, post_start)
        self.log(f"{self.vip} usable on {new} {times.t_usable - times.t_del:.3f} s after the delete")
        return times

    def _remove(self, node: str, times: MoveTimes) -> None:
        """Take the VIP off `node`; sets t_del and stop_s."""
        self.topo.del_addr(node, self.vip)
        times.t_del = time.monotonic()
        times.stop_s = times.t_del - times.t_start
        self.log(f"{self.vip} deleted on {node}")

    def _announce(self, node: str, times: MoveTimes) -> None:
        pidfile = os.path.join(self.workdir, f"send_arp-{node}-{self.vip}.pid")
        argv, background = announcer_argv(self.vip, pidfile)
        if not argv:
            times.announcer = "none"
            return
        times.announcer = os.path.basename(argv[0])
        proc = self.topo.popen(node, *argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.t_announced = time.monotonic()
        if background:
            # Reap the finished ones as we go: a soak of 1,000 moves would keep 500 zombies.
            self._background = [p for p in self._background if p.poll() is None] + [proc]
            return
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=2.0)

    def close(self) -> None:
        """Reap background announcers (they finish within ~1 s by themselves)."""
        for proc in self._background:
            stop_process(proc, terminate=False)
        self._background.clear()


def stop_process(proc: subprocess.Popen | None, terminate: bool = True, grace: float = 2.0) -> None:
    """End a helper process of the lab: SIGTERM (unless it ends by itself), then
    SIGKILL after `grace` seconds; always reaped."""
    if proc is None or proc.poll() is not None:
        return
    if terminate:
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)
