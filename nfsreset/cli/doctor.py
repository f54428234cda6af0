"""`nfsreset doctor`: what this kernel and host offer, each with its reason.

Every check is real (it opens the socket, destroys the connection, creates the
nft table) and cleans up after itself; nothing is inferred from version numbers.
"""
from __future__ import annotations

import json
import os
import platform
import sys

from nfsreset.cli.common import JSON, NETNS, STORE, VIP, Opt, in_netns, parse_vip


def _check(fn) -> dict:
    try:
        ok, why = fn()
    except Exception as e:   # a check must report, never crash the doctor
        ok, why = False, f"{type(e).__name__}: {e}"
    return {"ok": bool(ok), "why": why}


def _btf():
    p = "/sys/kernel/btf/vmlinux"
    return (True, f"{p} ({os.path.getsize(p)} bytes)") if os.path.exists(p) else \
        (False, f"{p} missing: kernel built without CONFIG_DEBUG_INFO_BTF")


def _tracefs():
    if os.path.isdir("/sys/kernel/tracing/events/sock/inet_sock_set_state"):
        return True, "sock:inet_sock_set_state tracepoint visible"
    return False, ("tracefs not mounted here (normal under `ip netns exec`); "
                   "not needed: the flow tracker attaches raw tracepoints")


def _headers():
    d = f"/lib/modules/{platform.release()}/build"
    if not os.path.isdir(os.path.join(d, "include")):
        return False, (f"{d} missing: bcc needs kernel headers to build the flow tracker: "
                       f"apt install linux-headers-{platform.release()} (or your architecture's "
                       "linux-headers meta-package; from a checkout, setup.sh links the nearest); "
                       "without them `watch` runs on sock_diag dumps")
    real = os.path.realpath(d)
    exact = platform.release() in real
    return True, f"{real}" + ("" if exact else " (not this kernel's: harmless, struct offsets come from BTF)")


def _bcc():
    import bcc  # noqa: F401
    return True, f"bcc {getattr(bcc, '__version__', '?')} importable"


def _tracker():
    from nfsreset.flows.probe import available
    # bcc's compiler prints some errors ("Unable to find kernel headers...") on
    # fd 1, which would break `doctor --json`: point fd 1 at stderr meanwhile.
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        return available()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _destroy():
    from nfsreset.kernel.sockdiag import probe_destroy
    return probe_destroy()


def _raw():
    import socket
    for fam in (socket.AF_INET, socket.AF_INET6):
        socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    return True, "raw IPv4 and IPv6 sockets open (CAP_NET_RAW)"


def _nft():
    from nfsreset.kernel.guard import available
    return available()


CHECKS = {"btf": _btf, "tracefs": _tracefs, "headers": _headers, "bcc": _bcc, "bpf-tracker": _tracker,
          "sock-destroy": _destroy, "raw-sockets": _raw, "nftables": _nft}


def checks() -> dict[str, dict]:
    return {name: _check(fn) for name, fn in CHECKS.items()}


def strategies(c: dict[str, dict]) -> dict[str, dict]:
    """Which rungs of the ladder (docs/design.md §3) follow from the checks."""
    def s(ok, yes, no):
        return {"ok": ok, "why": yes if ok else no}
    return {
        "destroy": s(c["sock-destroy"]["ok"], "SOCK_DESTROY ends sockets in the kernel, any time",
                     "SOCK_DESTROY unavailable: " + c["sock-destroy"]["why"]),
        "rst": s(c["raw-sockets"]["ok"], "exact-sequence RST into the local stack, once the VIP is here",
                 "no raw sockets: " + c["raw-sockets"]["why"]),
        "nft": s(c["nftables"]["ok"], "nft guard resets the stale tuple's segments until the client's SYN",
                 "nftables unusable: " + c["nftables"]["why"]),
        "tickle": s(c["raw-sockets"]["ok"], "tickle ACKs and VIP announcements",
                    "no raw sockets: " + c["raw-sockets"]["why"]),
        "watch-bpf": s(c["bpf-tracker"]["ok"], "`watch` tracks flows with BPF (ages, sequence numbers)",
                       "`watch` will run on sock_diag dumps: " + c["bpf-tracker"]["why"]),
    }


# --- the command: its options and body (the typer front end declares it from these) ---
OPTIONS = (
    NETNS,
    JSON.but(help="One JSON object with every check and strategy."),
    VIP.but(default=(), multiple=True,
            help="Also say whose client list of this VIP is visible from here (repeatable)."),
    STORE.but(help="The client-list store to describe: auto|dir|attrd."),
    Opt(("-w", "--wide"), "wide", bool, False,
        help="One line per check, however long (by default reasons wrap within 80 columns)."),
)


def doctor(*, netns_name: str | None, json_out: bool, vip: list[str], store: str, wide: bool) -> int:
    """Say what this kernel and host offer, and which strategies follow.

    Checks BTF, tracefs, bcc and the BPF flow tracker, SOCK_DESTROY (by destroying
    a loopback connection of its own), raw sockets, nftables and kernel headers,
    and which client-list store is active (dir or Pacemaker's attrd) and whose
    lists are visible from here. Exit 1 when no strategy to end stale sessions
    is available.
    """
    from nfsreset.state.store import describe
    vips = [parse_vip(v) for v in vip]
    with in_netns(netns_name):
        results = checks()
    store_info = describe(store, vips)      # attrd's IPC is in the cluster's namespace, not --netns
    strat = strategies(results)
    if json_out:
        print(json.dumps({"checks": results, "strategies": strat, "store": store_info}))
    else:
        for line in doctor_lines(results, strat, store_info, wide):
            print(line)
    return 0 if any(r["ok"] for k, r in strat.items() if k in ("destroy", "rst", "nft")) else 1


def doctor_lines(results: dict, strat: dict, store_info: dict, wide: bool) -> list[str]:
    """doctor's report: a line per check, strategy and store; by default each
    reason wraps under its column within 80 columns, --wide keeps one line each
    (for grep)."""
    import textwrap

    def item(head: str, why: str, indent: int | None = None) -> list[str]:
        if wide:
            return [f"{head}{why}".rstrip()]
        pad = " " * (len(head) if indent is None else indent)
        return textwrap.wrap(why, 80, initial_indent=head, subsequent_indent=pad, break_on_hyphens=False) or [head]
    out = []
    for name, r in results.items():
        out += item(f"{'ok' if r['ok'] else '--':<3} {name:<14} ", r["why"])
    out.append("")
    for name, r in strat.items():
        out += item(f"{'yes' if r['ok'] else 'no':<4} strategy {name:<8} ", r["why"])
    out.append("")
    out += item(f"{'ok' if store_info.get('ok') else '--':<3} {'store':<14} ", f"{store_info['backend']}: "
                                                                              f"{store_info['why']}")
    for v, row in store_info.get("vips", {}).items():
        seen = ", ".join(f"{h}: {n if isinstance(n, str) else f'{n} tuple(s)'}" for h, n in row.items())
        out += item(f"    {v}: ", seen or "no node has published a list", indent=6)
    return out
