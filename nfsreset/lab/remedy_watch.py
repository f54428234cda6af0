"""Remedy "watch": `nfsreset watch` running on both heads, nothing else."""
from __future__ import annotations

import subprocess
import threading
import time

from nfsreset.lab.remedies import LabContext, Remedy, register

READY_TIMEOUT_S = 60   # two bcc compiles at once on a 2-core machine take a few seconds


@register
class Watch(Remedy):
    name = "watch"
    help = "the nfsreset watch daemon on both nodes; no hooks"

    def setup(self, lab: LabContext) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.ready: dict[str, threading.Event] = {}
        args = ["watch", "--vip", lab.vip]
        for p in lab.ports:
            args += ["--port", str(p)]
        if lab.strategy:
            args += ["--strategy", lab.strategy]
        for node in ("node1", "node2"):
            proc = lab.topo.popen(node, *lab.nfsreset_argv, *args, "--state-dir", lab.state_dir_for(node), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, bufsize=1)
            self.procs[node] = proc
            self.ready[node] = threading.Event()
            threading.Thread(target=self._pump, args=(lab, node, proc), daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        for node, ev in self.ready.items():
            if not ev.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"nfsreset watch on {node} not ready after {READY_TIMEOUT_S} s")

    def _pump(self, lab: LabContext, node: str, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            line = line.rstrip()
            lab.log(f"[{node}] {line}")
            if "ready" in line:
                self.ready[node].set()

    def teardown(self, lab: LabContext) -> None:
        for proc in getattr(self, "procs", {}).values():
            if proc.poll() is None:
                proc.terminate()
        for node, proc in getattr(self, "procs", {}).items():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            if proc.returncode not in (0, -15):
                lab.log(f"[{node}] nfsreset watch exited {proc.returncode}")
