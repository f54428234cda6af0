"""Fixtures for the namespace tests (the `topo` fixture is in tests/conftest.py)."""
import pytest

from tests.ns.scene import Scene


@pytest.fixture
def scene(topo, tmp_path):
    s = Scene(topo, tmp_path)
    try:
        yield s
    finally:
        s.close()


# -- 1. the hook sequence -------------------------------------------------------------------
