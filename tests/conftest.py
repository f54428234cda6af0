"""Shared fixtures.

Unit tests (tests/unit) need nothing. Tests marked `netns` need root and build
their own namespaces through the `topo` fixture, which removes them even when
the test fails. Run only one kind with `-m "not netns and not bpf"` or `-m netns`.
"""
from __future__ import annotations

import os
import shutil

import pytest


def _is_root() -> bool:
    return os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    if _is_root() and shutil.which("ip"):
        return
    skip = pytest.mark.skip(reason="needs root and iproute2 (network namespaces)")
    for item in items:
        if "netns" in item.keywords or "bpf" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def topo(request):
    """A fresh node1/node2/client topology (nfsreset.lab.topology), removed afterwards."""
    from nfsreset.lab.topology import Topology

    t = Topology.create()
    try:
        yield t
    finally:
        t.destroy()
