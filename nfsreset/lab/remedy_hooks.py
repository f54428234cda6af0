"""Remedy "hooks": what the Pacemaker agent runs, as fresh processes at the right
moments. `kill` post-stop on the old owner; `kill --moment pre-start` and then
`tickle` post-start on the new owner; one state dir both nodes see."""
from __future__ import annotations

from nfsreset.lab.remedies import LabContext, Remedy, register


@register
class Hooks(Remedy):
    name = "hooks"
    help = "nfsreset kill (post-stop, pre-start) and tickle (post-start) run as resource-agent hooks"

    def _run(self, lab: LabContext, node: str, *args: str) -> None:
        common = ["--vip", lab.vip, "--state-dir", lab.state_dir]
        for p in lab.ports:
            common += ["--port", str(p)]
        if lab.strategy:
            common += ["--strategy", lab.strategy]
        res = lab.nfsreset(node, *args, *common, check=False, timeout=30)
        for line in (res.stderr or "").splitlines():
            lab.log(f"[{node}] {line}")
        if res.returncode not in (0,):
            lab.log(f"[{node}] nfsreset {args[0]} exited {res.returncode}")

    def post_stop(self, lab, node, vip):
        self._run(lab, node, "kill", "--moment", "post-stop")

    def pre_start(self, lab, node, vip):
        self._run(lab, node, "kill", "--moment", "pre-start")

    def post_start(self, lab, node, vip):
        self._run(lab, node, "tickle")
