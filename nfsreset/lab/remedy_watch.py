"""Remedy "watch": `nfsreset watch` running on both heads, nothing else."""
from __future__ import annotations

import re
import signal
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
        for node in ("node1", "node2"):
            self.spawn(lab, node)
        self.wait_ready(("node1", "node2"))

    def argv(self, lab: LabContext, node: str) -> list[str]:
        """`nfsreset watch ...` arguments: one daemon per node watches every VIP."""
        args = ["watch", "--state-dir", lab.state_dir_for(node)]
        for v in lab.all_vips:
            args += ["--vip", v]
        for p in lab.ports:
            args += ["--port", str(p)]
        if lab.strategy:
            args += ["--strategy", lab.strategy]
        return args

    def spawn(self, lab: LabContext, node: str) -> subprocess.Popen:
        """Start the daemon on `node` (see wait_ready)."""
        # On the head's host (Pacemaker movers), so `--store auto` finds attrd as on a real head.
        proc = lab.topo.popen(node, *lab.on_host(node), *lab.nfsreset_argv, *self.argv(lab, node),
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, bufsize=1)
        self.procs[node] = proc
        self.ready[node] = threading.Event()
        threading.Thread(target=self._pump, args=(lab, node, proc), daemon=True).start()
        return proc

    def wait_ready(self, nodes, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        for node in nodes:
            if not self.ready[node].wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"nfsreset watch on {node} not ready after {timeout:g} s")

    def restart(self, lab: LabContext, node: str, sig: int = signal.SIGTERM) -> int | None:
        """What `systemctl restart` (SIGTERM) or a crash and restart (SIGKILL) does
        to one node's daemon: returns the old one's exit status once the new one is ready."""
        old = self.procs[node]
        rc = old.poll()
        if rc is None:
            old.send_signal(sig)
            try:
                rc = old.wait(timeout=10)
            except subprocess.TimeoutExpired:
                old.kill()
                rc = old.wait(timeout=5)
        self.spawn(lab, node)
        self.wait_ready((node,))
        return rc

    def _pump(self, lab: LabContext, node: str, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            line = line.rstrip()
            lab.log(f"[{node}] {line}")
            if re.search(r"\bready\b", line):     # not "already"
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
