"""Pick the lab's mover by name (`nfsreset lab --mover NAME`).

Apart from nfsreset.lab.mover because the agent and Pacemaker movers build on
its Mover, MoveTimes and helpers: picking them from there made an import cycle.
"""
from __future__ import annotations

from typing import Callable

from nfsreset.lab.mover import MOVERS, PACEMAKER_MOVERS, Mover
from nfsreset.lab.topology import Topology


def make_mover(name: str, topo: Topology, vip: str, gap: float, workdir: str, state_dir: "str | dict[str, str]",
               ports: list[int], strategy: str | None, log: Callable[[str], None], crash: bool = False,
               stop_delay: float | None = None):
    """The mover called `name` (a key of MOVERS) for one lab run; `crash` (Pacemaker
    movers only): the failover is a crash of node1; `state_dir`: one dir both
    heads see, or {node: dir}, one per head; `stop_delay` (Pacemaker movers):
    seconds a Delay resource sleeps between the VIP's stop and its next start."""
    if name in PACEMAKER_MOVERS:
        from nfsreset.lab.mover_pacemaker import PacemakerMover
        return PacemakerMover(topo, vip, name, state_dir, workdir=workdir, ports=ports, strategy=strategy,
                              crash=crash, log=log, stop_delay=stop_delay)
    if crash:
        raise ValueError(f"crash needs a Pacemaker mover ({', '.join(PACEMAKER_MOVERS)}), not {name!r}")
    if name == "ip":
        return Mover(topo, vip, gap=gap, workdir=workdir, log=log)
    if name not in MOVERS:
        raise ValueError(f"unknown mover {name!r}; known: {', '.join(MOVERS)}")
    from nfsreset.lab.mover_ocf import AgentMover
    return AgentMover(topo, vip, name, state_dir, gap=gap, workdir=workdir, ports=ports,
                      strategy=strategy, log=log)
