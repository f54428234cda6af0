"""Fixtures for the namespace tests (the `topo` fixture is in tests/conftest.py)."""
import shutil

import pytest

from tests.ns.scene import Scene


@pytest.fixture
def pacemaker_installed():
    """The tests of a real cluster fail, not skip, when it is missing: setup.sh
    installs it, and a skip would hide a run that proved nothing. The lab's own
    check (nfsreset.lab.mover_pacemaker.check_installed) plus attrd_updater."""
    from nfsreset.lab.mover_ocf import AgentError
    from nfsreset.lab.mover_pacemaker import check_installed
    try:
        check_installed("pacemaker-ocf")
    except AgentError as e:
        pytest.fail(str(e))
    if shutil.which("attrd_updater", path="/usr/sbin:/usr/bin") is None:
        pytest.fail("attrd_updater missing: apt-get install pacemaker-cli-utils (setup.sh installs it)")


@pytest.fixture
def scene(topo, tmp_path):
    s = Scene(topo, tmp_path)
    try:
        yield s
    finally:
        s.close()


# -- 1. the hook sequence -------------------------------------------------------------------
