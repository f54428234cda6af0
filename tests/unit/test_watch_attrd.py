"""watch's client lists through attrd (nfsreset.daemon.clientlists.DaemonState), with a fake
attrd_updater adapter: `store auto` follows attrd coming up after the daemon
started, a list attrd did not take is offered again, the peers' lists of an
away VIP are prefetched off the path and a copy is flagged for a fresh read."""
from __future__ import annotations

import threading
import time

import pytest

from nfsreset.state import store as S
from nfsreset.daemon import clientlists as W
from nfsreset.core.model import FlowKey
from nfsreset.state.statedir import StateError

VIP = "198.51.100.10"
K1 = FlowKey(VIP, 2049, "203.0.113.7", 900)
K2 = FlowKey(VIP, 2049, "203.0.113.8", 901)


class FakeAttrd:
    def __init__(self):
        self.lists: list[FlowKey] = []
        self.published: list[tuple[str, frozenset]] = []
        self.reads = 0
        self.refuse = False
        self.lock = threading.Lock()

    def publish(self, vip, keys, peers=None):
        if self.refuse:
            raise StateError("no other cluster member to publish the clients of x for (crm_node -l)")
        with self.lock:
            self.published.append((vip, frozenset(keys)))
        return len(keys)

    def read(self, vip, max_entries=0):
        with self.lock:
            self.reads += 1
        return list(self.lists)


@pytest.fixture
def up(monkeypatch):
    state = {"up": False}
    monkeypatch.setattr(S, "attrd_present", lambda: state["up"])
    return state


def make(tmp_path, store="auto"):
    logs: list[str] = []
    st = W.DaemonState(str(tmp_path), log=logs.append, store=store)
    fake = FakeAttrd()
    st.attrd = fake
    return st, fake, logs


def wait(cond, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_auto_started_before_pacemaker_publishes_once_attrd_is_up(tmp_path, up):
    st, fake, logs = make(tmp_path)
    assert st.backend == "dir"
    st.write_clients(VIP, [K1])           # attrd not up yet: the dir only
    assert fake.published == []
    up["up"] = True
    st.retry_publish(time.monotonic(), {VIP})    # the next flush
    assert wait(lambda: fake.published == [(VIP, frozenset({K1}))]), fake.published
    assert any("reachable now" in m for m in logs), logs
    st.close_publisher()


def test_a_list_attrd_refused_is_offered_again_and_logged_once(tmp_path, up):
    up["up"] = True
    st, fake, logs = make(tmp_path)
    fake.refuse = True
    st.write_clients(VIP, [K1])
    assert wait(lambda: VIP in st._unpublished)
    for _ in range(3):
        st.retry_publish(time.monotonic() + 10 * W.PUBLISH_RETRY_S, {VIP})
        st._retry_at = 0.0
        time.sleep(0.05)
    assert len([m for m in logs if "failed" in m]) == 1, logs
    fake.refuse = False
    st.retry_publish(time.monotonic() + 10 * W.PUBLISH_RETRY_S, {VIP})
    assert wait(lambda: (VIP, frozenset({K1})) in fake.published), fake.published
    assert wait(lambda: VIP not in st._unpublished)
    st.close_publisher()


def test_a_vip_that_left_is_not_published_again(tmp_path, up):
    """Its slots are the next owner's now: a late retry would overwrite its list."""
    up["up"] = True
    st, fake, _ = make(tmp_path)
    fake.refuse = True
    st.write_clients(VIP, [K1])
    assert wait(lambda: VIP in st._unpublished)
    fake.refuse = False
    st.retry_publish(time.monotonic() + 10 * W.PUBLISH_RETRY_S, set())
    time.sleep(0.1)
    assert fake.published == [] and VIP not in st._unpublished
    st.close_publisher()


def test_dir_store_never_touches_attrd(tmp_path, up):
    up["up"] = True
    st, fake, _ = make(tmp_path, store="dir")
    st.attrd = None       # what __init__ leaves for `dir`
    st.write_clients(VIP, [K1])
    st.prefetch([VIP], time.monotonic())
    assert st.read_clients(VIP) == [K1]
    assert fake.reads == 0 and fake.published == []


def test_away_vip_is_prefetched_and_the_arrival_uses_the_copy(tmp_path, up):
    up["up"] = True
    st, fake, _ = make(tmp_path)
    fake.lists = [K1]
    st.prefetch([VIP], time.monotonic())
    assert wait(lambda: fake.reads == 1 and not st._prefetching)
    st.prefetch([VIP], time.monotonic())     # within PREFETCH_S: no second read
    time.sleep(0.05)
    assert fake.reads == 1
    time.sleep(W.ATTRD_FRESH_S + 0.02)
    assert st.read_clients(VIP) == [K1]      # the copy: no attrd_updater on the path
    assert fake.reads == 1 and st.used_copy()
    fake.lists = [K1, K2]                    # published after the copy
    assert sorted(st.read_clients(VIP, 0.0)) == [K1, K2]
    assert fake.reads == 2 and not st.used_copy()


def test_a_copy_older_than_max_age_is_read_again(tmp_path, up):
    up["up"] = True
    st, fake, _ = make(tmp_path)
    fake.lists = [K1]
    st.read_clients(VIP, 0.0)
    st._read_cache[VIP] = (time.monotonic() - W.ATTRD_READ_REUSE_S - 1, [])
    assert st.read_clients(VIP) == [K1] and fake.reads == 2


def test_later_returns_only_what_the_first_read_missed():
    later = W._Later(lambda: [K1, K2])
    assert later.result({K1}) == [K2]
    failing = W._Later(lambda: (_ for _ in ()).throw(StateError("bad")))
    assert failing.result(set()) == []
