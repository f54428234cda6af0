"""The engine under failing adapters: one failing step never stops the others.

The adapters are fakes (nfsreset.adapters.Adapters): they keep sockets in a
dict and fail where a test tells them to. The engine is the thing under test:
its plan, its ladder on failure, its exit codes and what it reports. The same
faults from a real kernel are in tests/ns/test_faults.py.
"""
from __future__ import annotations

import errno
import os
import time

import pytest

from nfsreset import engine as E
from nfsreset.core import plan as P
from nfsreset.adapters import Adapters, DestroyAcks
from nfsreset.core.model import Flow, FlowKey
from nfsreset.state.statedir import PendingRecords

VIP, OTHER = "198.51.100.10", "198.51.100.11"
HOST = "198.51.100.1"
CLIENT = "198.51.100.100"


def flow(cport: int, vip: str = VIP, state: str = "ESTABLISHED") -> Flow:
    return Flow(FlowKey(vip, 2049, CLIENT, cport), state, cookie=cport)


class FakeSender:
    def __init__(self, host: "Fake"):
        self.host = host

    def __enter__(self):
        if self.host.fail.get("tickle_sender"):
            raise self.host.fail["tickle_sender"]
        return self

    def __exit__(self, *exc):
        return None

    def send_many(self, packets) -> int:
        n = len(list(packets))
        self.host.calls.append(("send_many", n))
        return n


class Fake(Adapters):
    """A host with sockets on VIP; `fail[name]` is raised by that call."""

    def __init__(self, flows=(), local=frozenset({HOST}), state_path: str | None = "/fake/state",
                 fail: dict | None = None, refuse: int | None = None, rst_kills: bool = True):
        self.socks = {f.cookie: f for f in flows}
        self.local = frozenset(local)
        self.state_path = state_path
        self.fail = fail or {}
        self.refuse = refuse            # destroy: every socket answered with this errno
        self.rst_kills = rst_kills
        self.calls: list[tuple] = []
        self.pending: dict = {}
        self.clients: dict = {}
        self.quarantine_set: set[str] = set()
        self.stale_keys: set = set()

    def _call(self, name: str, *args):
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def local_addrs(self, vips):
        self._call("local_addrs")
        return self.local

    def dump(self, vip, ports):
        self._call("dump", vip)
        return [f for f in self.socks.values() if f.key.vip == vip and f.key.vport in ports]

    def destroy(self, flows):
        self._call("destroy", len(flows))
        if self.refuse is not None:
            return DestroyAcks(failed=[(f.cookie, self.refuse) for f in flows])
        acks = DestroyAcks()
        for f in flows:
            if self.socks.pop(f.cookie, None) is not None:
                acks.destroyed.append(f.cookie)
            else:
                acks.gone.append(f.cookie)
        return acks

    def exact_rst(self, flows, timeout):
        self._call("exact_rst", len(flows))
        if self.rst_kills:
            for f in flows:
                self.socks.pop(f.cookie, None)
        return len(flows)

    def quarantine(self, vip):
        self._call("quarantine", vip)
        self.quarantine_set.add(vip)

    def lift_quarantine(self, vip):
        self._call("lift_quarantine", vip)
        self.quarantine_set.discard(vip)

    def quarantined(self):
        self._call("quarantined")
        return set(self.quarantine_set)

    def add_stale(self, keys, timeout_s):
        self._call("add_stale", len(keys))
        new = set(keys) - self.stale_keys
        self.stale_keys |= set(keys)
        return len(new)

    def prune(self):
        self._call("prune")

    def write_clients(self, vip, keys):
        self._call("write_clients", vip)
        self.clients[vip] = list(keys)
        return len(keys)

    def read_pending(self, vip):
        # A genuine pending file: written (times(2) ticks) 1 s before the VIP arrived.
        self._call("read_pending", vip)
        out = PendingRecords(self.pending)
        out.ticks = round(os.times().elapsed * 100) - 100
        return out

    def arrival_stamps(self, vip):
        self._call("arrival_stamps", vip)
        elapsed = os.times().elapsed
        return [round(elapsed * 100 - P.jiffies_zero(elapsed, time.clock_gettime(time.CLOCK_MONOTONIC)))]

    def write_pending(self, vip, pending):
        self._call("write_pending", vip)
        self.pending = dict(pending)

    def clear_pending(self, vip):
        self._call("clear_pending", vip)
        self.pending = {}

    def announce(self, vip):
        self._call("announce", vip)
        return "eth0"

    def tickle_sender(self):
        self.calls.append(("tickle_sender",))
        return FakeSender(self)


def run(fake: Fake, moment=P.Moment.POST_STOP, vip=VIP, dry_run=False, **kw):
    lines: list[str] = []
    opts = P.Options(vips=frozenset({vip}), **kw.pop("opts", {}))
    eng = E.Engine(opts, adapters=fake, dry_run=dry_run, log=lines.append)
    out = eng.run(moment, vip, **kw)
    return out, lines, eng


def kinds(out) -> list[str]:
    return [s.action for s in out.steps]


def step(out, kind: E.Kind) -> E.Step:
    (s,) = [s for s in out.steps if s.kind is kind]
    return s


# -- a failing quarantine never stops the destroy -----------------------------------------
def test_nft_raising_on_quarantine_still_destroys_and_exits_1():
    fake = Fake([flow(801), flow(802)], fail={"quarantine": OSError(errno.ENOENT, "libnftables.so.1: file too short")})
    out, lines, eng = run(fake)
    assert fake.names().count("destroy") == 1 and fake.socks == {}
    q = step(out, E.Kind.QUARANTINE)
    assert not q.ok and "file too short" in q.error
    assert step(out, E.Kind.DESTROY).ok and step(out, E.Kind.DESTROY).destroyed == 2
    assert out.code == 1 and "failed: quarantine" in out.reason
    assert [s["action"] for s in out.as_json()["steps"]] == ["record", "quarantine", "destroy", "verify"]
    assert out.as_json()["failed"] == ["quarantine"]
    assert out.as_json()["steps"][1]["error"] == q.error
    # one line: what, why, and that it went on
    (line,) = [ln for ln in lines if "quarantine" in ln]
    assert line.startswith(f"quarantine of {VIP} failed: ") and line.endswith("going on without nftables")
    assert eng.caps.nft is False and "nft" in out.lost
    assert "prune" not in fake.names()     # nftables is known to be missing: not called again


def test_a_guard_error_on_quarantine_turns_nft_off_for_the_rest_of_the_run():
    from nfsreset.kernel.guard import GuardError
    fake = Fake([flow(801)], fail={"quarantine": GuardError("quarantine 198.51.100.10: Operation not permitted")})
    out, lines, eng = run(fake, opts={"strategy": "nft"})
    # strategy nft: the guard rung is skipped (nft found missing), nothing else may be used
    assert "add_stale" not in fake.names()
    assert out.code == 1 and [f.cookie for f in out.left] == [801]
    assert {s.action for s in out.failed} == {"quarantine", "guard"}
    assert "skipped: nftables unavailable here" in step(out, E.Kind.GUARD).error


# -- a failing record never stops the destroy ---------------------------------------------
def test_record_failing_still_destroys():
    fake = Fake([flow(801)], fail={"write_clients": OSError(errno.EROFS, "Read-only file system")})
    out, lines, _ = run(fake)
    assert "destroy" in fake.names() and "quarantine" in fake.names() and fake.socks == {}
    r = step(out, E.Kind.RECORD)
    assert r.error == "Read-only file system (EROFS)" and r.written == 0
    assert out.code == 1 and out.reason.startswith("failed: record")
    assert any(ln.startswith(f"record of 1 client tuple(s) of {VIP} in /fake/state failed: Read-only")
               for ln in lines), lines


def test_record_full_disk_still_destroys():
    fake = Fake([flow(801)], fail={"write_clients": OSError(errno.ENOSPC, "No space left on device")})
    out, _, _ = run(fake)
    assert fake.socks == {} and out.code == 1 and step(out, E.Kind.RECORD).error.endswith("(ENOSPC)")


# -- a failing destroy falls down the ladder in the same run -----------------------------------
def test_destroy_raising_falls_to_the_nft_guard_at_post_stop():
    # The VIP is away: the exact RST needs it here, so the next rung is the guard.
    fake = Fake([flow(801), flow(802)], fail={"destroy": RuntimeError("netlink went away")})
    out, lines, _ = run(fake)
    assert fake.names().index("destroy") < fake.names().index("add_stale")
    assert step(out, E.Kind.GUARD).ok and step(out, E.Kind.GUARD).added == 2
    assert not step(out, E.Kind.DESTROY).ok
    assert out.code == 1 and "failed: destroy" in out.reason and out.left == []


def test_destroy_refused_for_every_socket_falls_to_the_exact_rst_when_the_vip_is_here():
    # post-start: stale sockets from the VIP's last stay (their cookies were pending)
    f1, f2 = flow(801), flow(802)
    fake = Fake([f1, f2], local={HOST, VIP}, refuse=errno.EPERM)
    fake.pending = {f1.key: 801, f2.key: 802}
    known = [FlowKey(VIP, 2049, CLIENT, 900)]
    out, lines, eng = run(fake, P.Moment.POST_START, known_clients=known)
    names = fake.names()
    # the rst runs right after the refused destroy, before the announce and the tickle
    assert names.index("destroy") < names.index("exact_rst") < names.index("announce") < names.index("send_many")
    assert fake.socks == {}
    assert step(out, E.Kind.RST).reset == 2
    d = step(out, E.Kind.DESTROY)
    assert d.refused == ["EPERM", "EPERM"] and "refused every one (EPERM)" in d.error
    assert eng.caps.destroy is False and out.lost["destroy"]
    assert step(out, E.Kind.VERIFY).left == 0                 # the rst is checked by a dump
    assert "clear_pending" in names                           # none left: pending done
    assert out.code == 1 and "failed: destroy" in out.reason


def test_destroy_refused_and_no_rung_left_defers_and_names_what_is_left():
    # post-stop, no nftables, SOCK_DESTROY refused: the rst needs the VIP here -> deferred
    fake = Fake([flow(801)], refuse=errno.EPERM,
                fail={"quarantine": PermissionError(errno.EPERM, "Operation not permitted")})
    out, lines, _ = run(fake)
    assert "add_stale" not in fake.names() and "exact_rst" not in fake.names()
    assert list(fake.pending.values()) == [801]
    assert out.code == 1
    assert "failed: quarantine, destroy" in out.reason and "1 session(s) deferred to post-start" in out.reason


def test_every_rung_failing_is_unable_with_the_sessions_left():
    fake = Fake([flow(801)], local={HOST, VIP}, refuse=errno.EOPNOTSUPP,
                fail={"exact_rst": PermissionError(errno.EPERM, "Operation not permitted"),
                      "add_stale": RuntimeError("nft said no")})
    fake.pending = {flow(801).key: 801}
    out, _, eng = run(fake, P.Moment.POST_START)
    assert [n for n in fake.names() if n in ("destroy", "exact_rst", "add_stale")] == ["destroy", "exact_rst", "add_stale"]
    assert out.code == 1 and [f.cookie for f in out.left] == [801]
    assert eng.caps == P.Caps(destroy=False, raw=False, nft=False)
    assert "clear_pending" not in fake.names()       # a session is left: keep it pending
    assert "still alive after" in out.reason


def test_a_partly_refused_destroy_is_verified_and_the_rest_goes_down_the_ladder():
    class Partial(Fake):
        def destroy(self, flows):
            self._call("destroy", len(flows))
            first, rest = flows[0], flows[1:]
            self.socks.pop(first.cookie)
            return DestroyAcks(destroyed=[first.cookie], failed=[(f.cookie, errno.EBUSY) for f in rest])

    fake = Partial([flow(801), flow(802)])
    out, _, _ = run(fake)
    assert step(out, E.Kind.DESTROY).ok and step(out, E.Kind.DESTROY).refused == ["EBUSY"]
    assert step(out, E.Kind.VERIFY).left == 1 and step(out, E.Kind.GUARD).added == 1
    assert out.code == 0


# -- telling the clients ----------------------------------------------------------------------
def test_announce_refused_skips_the_tickle_and_reports_both():
    fake = Fake([], local={HOST, VIP}, fail={"announce": PermissionError(errno.EPERM, "Operation not permitted")})
    out, lines, _ = run(fake, P.Moment.POST_START, known_clients=[FlowKey(VIP, 2049, CLIENT, 900)])
    assert "tickle_sender" not in fake.names()
    assert [s.action for s in out.failed] == ["announce", "tickle"]
    assert "skipped: raw sockets unavailable here" in step(out, E.Kind.TICKLE).error
    assert out.code == 1


def test_tickle_failing_is_reported():
    from nfsreset.kernel.rawsend import RawSocketError
    err = RawSocketError("cannot open a raw IPv4 socket: [Errno 1] Operation not permitted")
    err.__cause__ = PermissionError(errno.EPERM, "Operation not permitted")
    fake = Fake([], local={HOST, VIP}, fail={"tickle_sender": err})
    out, lines, eng = run(fake, P.Moment.POST_START, known_clients=[FlowKey(VIP, 2049, CLIENT, 900)])
    t = step(out, E.Kind.TICKLE)
    assert t.error.startswith("cannot open a raw IPv4 socket") and t.sent == 0
    assert out.code == 1 and eng.caps.raw is False
    assert out.as_json()["steps"][-1] == {"action": "tickle", "vip": VIP, "tuples": 1, "sent": 0,
                                          "error": t.error}


def test_a_tickle_whose_every_ack_was_refused_is_a_failed_step():
    class Refusing(FakeSender):
        errors, last_error = 0, None

        def send_many(self, packets):
            n = len(list(packets))
            self.errors += n
            self.last_error = PermissionError(errno.EPERM, "Operation not permitted")
            return 0

    class Host(Fake):
        def tickle_sender(self):
            self.calls.append(("tickle_sender",))
            return Refusing(self)

    fake = Host([], local={HOST, VIP})
    out, lines, eng = run(fake, P.Moment.POST_START, known_clients=[FlowKey(VIP, 2049, CLIENT, 900)],
                          opts={"tickle_rounds": 1})
    t = step(out, E.Kind.TICKLE)
    assert t.error == "none of its 1 ACK(s) went out (Operation not permitted (EPERM))"
    assert out.code == 1 and eng.caps.raw        # a refused send is not a missing capability


# -- observation failures ---------------------------------------------------------------------
def test_addresses_unreadable_touches_nothing():
    fake = Fake([flow(801)], fail={"local_addrs": OSError(errno.ENOBUFS, "No buffer space available")})
    out, lines, _ = run(fake)
    assert fake.names() == ["local_addrs"] and out.code == 1
    assert lines == ["reading the addresses configured here failed: No buffer space available (ENOBUFS); nothing done"]


def test_a_dump_failing_still_quarantines():
    fake = Fake([flow(801)], fail={"dump": OSError(errno.ETIMEDOUT, "no answer")})
    out, _, _ = run(fake)
    assert "quarantine" in fake.names() and out.code == 1 and kinds(out)[0] == "dump"


def test_a_corrupt_pending_file_still_announces_and_tickles():
    from nfsreset.state.statedir import StateError
    fake = Fake([], local={HOST, VIP}, fail={"read_pending": StateError("x.pending.json: bad entry 1")})
    out, _, _ = run(fake, P.Moment.POST_START, known_clients=[FlowKey(VIP, 2049, CLIENT, 900)])
    assert "announce" in fake.names() and "send_many" in fake.names()
    assert out.code == 1 and step(out, E.Kind.PENDING).error == "x.pending.json: bad entry 1"


# -- safety and dry runs stay as they were ------------------------------------------------------
DESTRUCTIVE = {"destroy", "exact_rst", "quarantine", "lift_quarantine", "add_stale", "prune",
               "write_clients", "write_pending", "clear_pending", "announce", "tickle_sender", "send_many"}


@pytest.mark.parametrize("moment", [P.Moment.POST_STOP, P.Moment.PRE_START])
def test_dry_run_calls_nothing_destructive(moment):
    fake = Fake([flow(801), flow(802)])
    out, lines, _ = run(fake, moment, dry_run=True)
    assert not DESTRUCTIVE & set(fake.names()), fake.names()
    assert len(fake.socks) == 2 and out.code == 0
    assert "destroy" in kinds(out) and all("dry run" in ln for ln in lines)


def test_dry_run_post_start_calls_nothing_destructive():
    fake = Fake([flow(801)], local={HOST, VIP})
    fake.pending = {flow(801).key: 801}
    out, _, _ = run(fake, P.Moment.POST_START, dry_run=True, known_clients=[FlowKey(VIP, 2049, CLIENT, 900)])
    assert not DESTRUCTIVE & set(fake.names()), fake.names()
    assert {"lift-quarantine", "destroy", "announce", "tickle"} <= set(kinds(out))


@pytest.mark.parametrize("moment", [P.Moment.POST_STOP, P.Moment.PRE_START])
def test_a_configured_vip_is_refused_and_nothing_is_called(moment):
    fake = Fake([flow(801)], local={HOST, VIP})
    out, lines, _ = run(fake, moment)
    assert fake.names() == ["local_addrs", "dump"]
    assert out.code == 3 and "configured on this host" in out.reason and out.steps == []


def test_all_well_is_exit_0_with_the_same_json_keys_as_before():
    fake = Fake([flow(801)])
    out, _, _ = run(fake)
    doc = out.as_json()
    assert out.code == 0 and out.reason == "" and doc["failed"] == []
    assert [set(s) for s in doc["steps"]] == [
        {"action", "vip", "clients", "written"}, {"action", "vip"},
        {"action", "sessions", "destroyed", "gone", "failed", "ms"}, {"action", "left", "sessions", "by"}]
    assert fake.names()[-1] == "prune"


def test_metrics_count_typed_steps():
    from nfsreset.daemon.metrics import Metrics
    fake = Fake([flow(801), flow(802)], fail={"destroy": RuntimeError("boom")})
    out, _, _ = run(fake)
    m = Metrics()
    m.count(out)
    assert m.ended == {"destroy": 0, "nft": 2} and m.guard_elements == 2
