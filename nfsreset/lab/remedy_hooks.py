"""Remedy "hooks": what the Pacemaker agent runs, as fresh processes at the right
moments. `kill` post-stop on the old owner; on the new owner `kill --moment
pre-start`, then `tickle --wait` started in the background before the address is
added (it acts the moment the VIP is usable: IPaddr2 spends ~0.8 s announcing an
IPv6 VIP before a post-start hook could run), and post-start waits for it.
Each node's state dir (LabContext.state_dir_for: shared, or one per head)."""
from __future__ import annotations

import subprocess

from nfsreset.lab.remedies import LabContext, Remedy, register


@register
class Hooks(Remedy):
    name = "hooks"
    help = "nfsreset kill (post-stop, pre-start) and tickle (post-start) run as resource-agent hooks"

    TICKLE_WAIT_S = 15

    @staticmethod
    def _common(lab: LabContext, node: str) -> list[str]:
        common = ["--vip", lab.vip, "--state-dir", lab.state_dir_for(node)]
        for p in lab.ports:
            common += ["--port", str(p)]
        if lab.strategy:
            common += ["--strategy", lab.strategy]
        return common

    def _run(self, lab: LabContext, node: str, *args: str) -> None:
        res = lab.nfsreset(node, *args, *self._common(lab, node), check=False, timeout=30)
        for line in (res.stderr or "").splitlines():
            lab.log(f"[{node}] {line}")
        if res.returncode not in (0,):
            lab.log(f"[{node}] nfsreset {args[0]} exited {res.returncode}")

    def post_stop(self, lab, node, vip):
        self._run(lab, node, "kill", "--moment", "post-stop")

    def pre_start(self, lab, node, vip):
        self._run(lab, node, "kill", "--moment", "pre-start")
        argv = lab.topo.exec_argv(node, *lab.nfsreset_argv, "tickle", "--wait", str(self.TICKLE_WAIT_S),
                                  *self._common(lab, node))
        self.tickler = (node, subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))

    def post_start(self, lab, node, vip):
        node, proc = self.tickler
        try:
            _, err = proc.communicate(timeout=self.TICKLE_WAIT_S + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        for line in (err or "").splitlines():
            lab.log(f"[{node}] {line}")
        if proc.returncode != 0:
            lab.log(f"[{node}] nfsreset tickle exited {proc.returncode}")

    def teardown(self, lab):
        t = getattr(self, "tickler", None)
        if t and t[1].poll() is None:
            t[1].kill()
            t[1].wait(timeout=5)
