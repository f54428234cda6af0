"""The seam where remedies plug into the lab.

A remedy is what a cluster would run around the VIP resource: the lab calls
its hooks at the same moments a resource agent (or a watcher daemon) would
act. The base class does nothing: it is the baseline, "none".

    setup       once, before the VIP first comes up (start daemons on both nodes)
    post_stop   on the old owner, right after `ip addr del`
    pre_start   on the new owner, right before `ip addr add`
    post_start  on the new owner, after add + usable (DAD) + announce
    teardown    once, at the end, also after a failure

The start hooks also run for the VIP's first start on node1 (a cluster runs
them for every start). Every hook call is timed and the timing lands in the
result. Hooks must return promptly: the lab waits for them, as IPaddr2 would.

Adding one: put it in `nfsreset/lab/remedy_<name>.py` and decorate the class
with `@register`; `load_plugins()` imports those modules, so the lab command
finds it without anyone editing this file.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import sys
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from nfsreset.lab.topology import Topology


@dataclasses.dataclass
class LabContext:
    """What a remedy sees of the lab."""
    topo: "Topology"
    state_dir: str                   # a directory both nodes see; runner creates and removes it
    family: int                      # 4 or 6
    vip: str
    ports: list[int] = dataclasses.field(default_factory=lambda: [2049])
    nfsreset_argv: list[str] = dataclasses.field(default_factory=lambda: [sys.executable, "-m", "nfsreset"])
    strategy: str | None = None      # passed through from `nfsreset lab --strategy`
    log: Callable[[str], None] = lambda _msg: None
    # Every VIP of the cluster, for a remedy that watches them all at once (the
    # watch daemon); empty: just `vip`. Hooks act on `vip`, one resource each.
    vips: tuple[str, ...] = ()

    @property
    def all_vips(self) -> tuple[str, ...]:
        return self.vips or (self.vip,)
    # one state dir per head ({node: dir}, as deployed); empty: state_dir is shared
    state_dirs: dict[str, str] = dataclasses.field(default_factory=dict)
    # argv prefix that runs a command on a head's own host (Pacemaker movers:
    # the mount and UTS namespaces a cluster node runs in, where Pacemaker's
    # IPC is reachable, as for a daemon on a real head); None: the netns alone
    host_argv: "Callable[[str], list[str]] | None" = None

    def on_host(self, node: str) -> list[str]:
        return self.host_argv(node) if self.host_argv else []

    def state_dir_for(self, node: str) -> str:
        """The state dir `node` uses: its own (per-head lab) or the shared one."""
        return self.state_dirs.get(node, self.state_dir)

    def ns(self, node: str) -> str:
        """Name of `node`'s network namespace (for --netns style options)."""
        return self.topo.ns(node)

    def nfsreset(self, node: str, *args: str, timeout: float = 20, check: bool = True):
        """Run `nfsreset ARGS` inside `node` and wait for it (CompletedProcess)."""
        return self.topo.run(node, *self.on_host(node), *self.nfsreset_argv, *args, timeout=timeout, check=check)


class Remedy:
    """Baseline: does nothing, so the lab shows the problem."""
    name = "none"
    help = "nothing done: what a cluster sees today"

    def setup(self, lab: LabContext) -> None:
        pass

    def post_stop(self, lab: LabContext, node: str, vip: str) -> None:
        pass

    def pre_start(self, lab: LabContext, node: str, vip: str) -> None:
        pass

    def post_start(self, lab: LabContext, node: str, vip: str) -> None:
        pass

    def teardown(self, lab: LabContext) -> None:
        pass


REMEDIES: dict[str, type[Remedy]] = {"none": Remedy}


def register(cls: type[Remedy]) -> type[Remedy]:
    """Class decorator: make `cls` available as `nfsreset lab --remedy <cls.name>`."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    if name in REMEDIES and REMEDIES[name] is not cls:
        raise ValueError(f"remedy {name!r} registered twice ({REMEDIES[name].__name__}, {cls.__name__})")
    REMEDIES[name] = cls
    return cls


def load_plugins() -> dict[str, type[Remedy]]:
    """Import nfsreset/lab/remedy_*.py (each registers itself); return REMEDIES."""
    import nfsreset.lab as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("remedy_"):
            importlib.import_module(f"nfsreset.lab.{mod.name}")
    return REMEDIES
